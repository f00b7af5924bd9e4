package worker

import (
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
	// track says whether changed keys are recorded: only incremental
	// snapshots (a job with checkpoint storage) need them.
	track bool
	// current holds the keys changed since the last snapshot, by key
	// group; closed holds the change sets of earlier snapshots that no
	// completed checkpoint has covered yet, by checkpoint id. A closed set
	// is never modified again, so the snapshot goroutine may read it.
	current  changes
	currentN int
	closed   map[uint64]changeSet
	// maxDirty is the most changed keys remembered between two snapshots
	// (maxDirtyKeys; tests lower it).
	maxDirty int
	// overflow is set once more keys changed than maxDirty since the
	// last snapshot: tracking stops, so that memory does not grow with the
	// state, and no delta can be built over that span.
	overflow bool
	// applied is, per source partition, the offset of the last record whose
	// items were applied.
	applied map[int32]int64
}

// changes is a set of changed keys by key group.
type changes map[int32]map[string]struct{}

// maxDirtyKeys bounds the changed keys remembered between two snapshots.
const maxDirtyKeys = 4 << 20

func newKeyedState(b state.Backend, track bool) *keyedState {
	return &keyedState{
		backend:  b,
		track:    track,
		maxDirty: maxDirtyKeys,
		current:  make(changes),
		closed:   make(map[uint64]changeSet),
		applied:  make(map[int32]int64),
	}
}

// touch records that key changed. It allocates only for a key not yet
// recorded since the last snapshot.
func (s *keyedState) touch(kg int32, key []byte) {
	if !s.track || s.overflow {
		return
	}
	g := s.current[kg]
	if _, ok := g[string(key)]; ok {
		return
	}
	if s.currentN >= s.maxDirty {
		s.overflow = true
		s.current, s.currentN = make(changes), 0
		return
	}
	if g == nil {
		g = make(map[string]struct{})
		s.current[kg] = g
	}
	g[string(key)] = struct{}{}
	s.currentN++
}

// changeSet is the keys changed between two snapshots, or the mark that
// they are not all known.
type changeSet struct {
	keys     changes
	overflow bool
}

// closeEpoch ends the changes of checkpoint id: those made since the last
// snapshot now belong to it, and tracking starts over.
func (s *keyedState) closeEpoch(id uint64) {
	if !s.track {
		return
	}
	s.closed[id] = changeSet{keys: s.current, overflow: s.overflow}
	s.current, s.currentN, s.overflow = make(changes), 0, false
}

// changedSince returns the change sets of the snapshots after checkpoint
// base; ok is false when they do not hold every change (tracking was off or
// overflowed in between), so only a full snapshot is right. The sets are
// closed: the caller may read them from another goroutine.
func (s *keyedState) changedSince(base uint64) (sets []changes, ok bool) {
	if !s.track {
		return nil, false
	}
	for id, set := range s.closed {
		if id <= base {
			continue
		}
		if set.overflow {
			return nil, false
		}
		sets = append(sets, set.keys)
	}
	return sets, true
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

// changedGroup is the changed keys of one key group, sorted.
type changedGroup struct {
	kg   int32
	keys []string
}

// changedGroups returns the union of sets by key group, in (key group, key)
// order.
func changedGroups(sets []changes) []changedGroup {
	groups := make(map[int32]struct{})
	for _, set := range sets {
		for kg := range set {
			groups[kg] = struct{}{}
		}
	}
	out := make([]changedGroup, 0, len(groups))
	for _, kg := range slices.Sorted(maps.Keys(groups)) {
		union := make(map[string]struct{})
		for _, set := range sets {
			maps.Copy(union, set[kg])
		}
		out = append(out, changedGroup{kg: kg, keys: slices.Sorted(maps.Keys(union))})
	}
	return out
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
