package worker

import (
	"encoding/binary"
	"errors"
	"maps"
	"slices"

	"github.com/coordflow/coordflow/worker/operator"
	"github.com/coordflow/coordflow/worker/state"
)

// keyedState is a map task's keyed state as its operator sees it: the state
// backend, plus what an incremental checkpoint needs to know about the
// changes since the last one. Only the map task's loop uses it.
type keyedState struct {
	backend state.Backend

	// keys is the number of keys held, kept exact by the writes below.
	keys int64
	// current holds the keys changed since the last snapshot (kg + key, as
	// dirtyKey encodes them); closed holds the change sets of earlier
	// snapshots that no completed checkpoint has covered yet, by checkpoint
	// id.
	current map[string]struct{}
	closed  map[uint64]changeSet
	// overflow is set once more keys changed than maxDirtyKeys since the
	// last snapshot: tracking stops, so that memory does not grow with the
	// state, and no delta can be built over that span.
	overflow bool
	// applied is, per source partition, the offset of the last record whose
	// items were applied.
	applied map[int32]int64
}

// maxDirtyKeys bounds the changed keys remembered between two snapshots.
const maxDirtyKeys = 4 << 20

func newKeyedState(b state.Backend) *keyedState {
	return &keyedState{
		backend: b,
		current: make(map[string]struct{}),
		closed:  make(map[uint64]changeSet),
		applied: make(map[int32]int64),
	}
}

// dirtyKey encodes a key group and a key as one map key: 4 bytes big-endian
// of the key group, then the key.
func dirtyKey(kg int32, key []byte) string {
	b := make([]byte, 4, 4+len(key))
	binary.BigEndian.PutUint32(b, uint32(kg))
	return string(append(b, key...))
}

func splitDirtyKey(k string) (int32, []byte) {
	return int32(binary.BigEndian.Uint32([]byte(k[:4]))), []byte(k[4:])
}

// touch records that key changed.
func (s *keyedState) touch(kg int32, key []byte) {
	if s.overflow {
		return
	}
	if len(s.current) >= maxDirtyKeys {
		s.overflow = true
		clear(s.current)
		return
	}
	s.current[dirtyKey(kg, key)] = struct{}{}
}

// changeSet is the keys changed between two snapshots, or the mark that
// they are not all known.
type changeSet struct {
	keys     map[string]struct{}
	overflow bool
}

// closeEpoch ends the changes of checkpoint id: those made since the last
// snapshot now belong to it, and tracking starts over.
func (s *keyedState) closeEpoch(id uint64) {
	s.closed[id] = changeSet{keys: s.current, overflow: s.overflow}
	s.current = make(map[string]struct{})
	s.overflow = false
}

// changedSince returns, sorted, the keys changed after checkpoint base up to
// the last closed epoch; ok is false when they are not all known (tracking
// overflowed in between), so only a full snapshot is right.
func (s *keyedState) changedSince(base uint64) (keys []string, ok bool) {
	union := make(map[string]struct{})
	for id, set := range s.closed {
		if id <= base {
			continue
		}
		if set.overflow {
			return nil, false
		}
		maps.Copy(union, set.keys)
	}
	return slices.Sorted(maps.Keys(union)), true
}

// forget drops the change sets of checkpoints at or below id, which a
// completed checkpoint covers.
func (s *keyedState) forget(id uint64) {
	for c := range s.closed {
		if c <= id {
			delete(s.closed, c)
		}
	}
}

// itemContext is the operator.Context of one Process call. The map task
// reuses one value for every item.
type itemContext struct {
	s    *keyedState
	kg   int32
	key  []byte
	sink bool
	emit func(operator.Output)
	// emitErr is the first error writing an output to the sink; the map
	// task fails on it after the Process call.
	emitErr error
	// known and exists cache whether key has a value, so the key count stays
	// exact without a second lookup when the operator read the key first.
	known, exists bool
}

var _ operator.Context = (*itemContext)(nil)

func (c *itemContext) reset(kg int32, key []byte) {
	c.kg, c.key, c.known, c.exists = kg, key, false, false
}

// takeEmitErr returns and clears the sink error of the last call.
func (c *itemContext) takeEmitErr() error {
	err := c.emitErr
	c.emitErr = nil
	return err
}

func (c *itemContext) Key() []byte { return c.key }

func (c *itemContext) Get() ([]byte, bool, error) {
	v, ok, err := c.s.backend.Get(c.kg, c.key)
	if err != nil {
		return nil, false, backendError{err}
	}
	c.known, c.exists = true, ok
	return v, ok, nil
}

// existed reports whether the key had a value before this write.
func (c *itemContext) existed() (bool, error) {
	if !c.known {
		if _, _, err := c.Get(); err != nil {
			return false, err
		}
	}
	return c.exists, nil
}

func (c *itemContext) Put(value []byte) error {
	had, err := c.existed()
	if err != nil {
		return err
	}
	if err := c.s.backend.Put(c.kg, c.key, value); err != nil {
		return backendError{err}
	}
	if !had {
		c.s.keys++
	}
	c.exists = true
	c.s.touch(c.kg, c.key)
	return nil
}

func (c *itemContext) Delete() error {
	had, err := c.existed()
	if err != nil || !had {
		return err
	}
	if err := c.s.backend.Delete(c.kg, c.key); err != nil {
		return backendError{err}
	}
	c.s.keys--
	c.exists = false
	c.s.touch(c.kg, c.key)
	return nil
}

func (c *itemContext) Emit(out operator.Output) {
	if c.sink && c.emitErr == nil {
		c.emit(out)
	}
}

func (c *itemContext) HasSink() bool { return c.sink }

// backendError wraps a state backend's error as the operator sees it, so the
// map task can tell a failing backend (the task fails) from an operator's
// own rejection of an item (the item is skipped), whatever the operator
// wraps it in.
type backendError struct{ err error }

func (e backendError) Error() string { return e.err.Error() }
func (e backendError) Unwrap() error { return e.err }

// isBackendError reports whether err came from the state backend.
func isBackendError(err error) bool {
	var be backendError
	return errors.As(err, &be)
}
