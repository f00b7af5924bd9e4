// Package operator defines coordflow's operators: the user code a job runs.
// An operator has two halves. Split runs in a source task and turns one Kafka
// record into keyed items; Update runs in the map task that owns an item's key
// group and folds the item into that key's state.
//
// Keyed state is one int64 per key in this version: it is what the snapshot
// format (transport.KeyGroupState) stores. Operators that need richer state
// (sets, windows, structs) are not expressible yet.
//
// Error handling: Split returns an error for a malformed record; the source
// task skips the record, counts it in coordflow_records_skipped_total and goes
// on. Update cannot fail. Neither half may panic on any input, and both must
// be deterministic: a record replayed after a restore must produce the same
// items and the same state.
package operator

import (
	"errors"
	"fmt"
	"sort"
	"sync"
)

// Record is one Kafka record as a source task hands it to Split.
type Record struct {
	Key, Value []byte
	Partition  int32
	Offset     int64
}

// Item is one keyed item produced by Split. Key decides the key group and so
// the map task the item goes to; Num and Raw carry the payload Update needs.
type Item struct {
	Key string
	Num int64
	Raw []byte
}

// Output is one record a map task writes to the job's sink topic, if the job
// has one.
type Output struct {
	Key, Value []byte
}

// Operator is the user code of a job. One Operator value serves every task of
// every job that names it, from many goroutines at once: implementations must
// be safe for concurrent use, which they are when they keep no mutable fields.
type Operator interface {
	// Split turns a record into keyed items by calling emit for each. An
	// error marks the record as malformed: the items it already emitted are
	// discarded and the record is skipped.
	Split(r Record, emit func(Item)) error
	// Update folds it into state, the current value of it.Key (0 for a key
	// not seen yet). keep says whether to store newState; false deletes the
	// key, which is how a stateless operator keeps no state. out, when not
	// nil, is written to the sink.
	Update(state int64, it Item) (newState int64, keep bool, out *Output)
}

// StateUpdater is an optional fast path for an Operator: map tasks of a job
// without a sink call UpdateState instead of Update, so that no Output is
// built only to be dropped. It must fold state exactly as Update does.
type StateUpdater interface {
	UpdateState(state int64, it Item) (newState int64, keep bool)
}

// Registry maps operator names, as job specs use them, to operators. It is
// safe for concurrent use.
type Registry struct {
	mu  sync.RWMutex
	ops map[string]Operator
}

// ErrDuplicate is returned by Register for a name that is already taken.
var ErrDuplicate = errors.New("operator already registered")

// NewRegistry returns an empty registry; Builtins returns one with the
// built-in operators.
func NewRegistry() *Registry {
	return &Registry{ops: make(map[string]Operator)}
}

// Register adds op under name. Names are unique: registering a name twice is
// an error rather than a silent replacement, so a custom operator cannot
// shadow a built-in by accident.
func (r *Registry) Register(name string, op Operator) error {
	if name == "" {
		return errors.New("register operator: empty name")
	}
	if op == nil {
		return fmt.Errorf("register operator %q: nil operator", name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.ops[name]; ok {
		return fmt.Errorf("register operator %q: %w", name, ErrDuplicate)
	}
	r.ops[name] = op
	return nil
}

// Lookup returns the operator registered under name.
func (r *Registry) Lookup(name string) (Operator, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	op, ok := r.ops[name]
	return op, ok
}

// Names returns the registered names, sorted, e.g. for a coordinator's list of
// operators a job spec may use.
func (r *Registry) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	names := make([]string, 0, len(r.ops))
	for n := range r.ops {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
