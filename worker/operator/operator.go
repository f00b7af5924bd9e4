// Package operator defines coordflow's operators: the user code a job runs.
//
// An operator has two halves. Split runs in a source task and turns one Kafka
// record into keyed items; Process runs in the map task that owns an item's
// key group, with access to the keyed state of the item's key, and may emit
// output records to the job's sink.
//
// Keyed state is bytes per key: Context.Get, Put and Delete read and write the
// value of the current item's key, and GetInt64/PutInt64 and GetJSON/PutJSON
// are typed helpers on top. Keys and values are arbitrary bytes end to end;
// nothing assumes UTF-8. The runtime keeps the state in the job's state
// backend (memory or disk) and checkpoints it; an operator never sees
// checkpoints, restores or rescaling.
//
// # Writing an operator
//
// A user operator is a type with Split and Process, registered under a name
// in a Registry that a custom workerd is built with:
//
//	// maxPerKey keeps the largest value seen per record key and emits it
//	// whenever it grows.
//	type maxPerKey struct{}
//
//	func (maxPerKey) Split(r operator.Record, emit func(operator.Item)) error {
//		v, err := strconv.ParseInt(string(r.Value), 10, 64)
//		if err != nil {
//			return fmt.Errorf("value %q is not an integer", r.Value)
//		}
//		emit(operator.Item{Key: r.Key, Num: v})
//		return nil
//	}
//
//	func (maxPerKey) Process(ctx operator.Context, it operator.Item) error {
//		cur, ok, err := operator.GetInt64(ctx)
//		if err != nil || (ok && cur >= it.Num) {
//			return err
//		}
//		if err := operator.PutInt64(ctx, it.Num); err != nil {
//			return err
//		}
//		ctx.Emit(operator.Output{Key: it.Key, Value: strconv.AppendInt(nil, it.Num, 10)})
//		return nil
//	}
//
//	func (maxPerKey) StateEncoding() operator.Encoding { return operator.EncodingInt64 }
//
// and a workerd of your own that knows it (cmd/workerd is the template):
//
//	ops := operator.Builtins()
//	if err := ops.Register("max", maxPerKey{}); err != nil { ... }
//	cfg := worker.DefaultConfig()
//	cfg.Operators = ops
//	w, err := worker.New(cfg)
//
// A job spec then names "operator": {"name": "max"}. The coordinators need
// not know the operator; every worker a job may run on must.
//
// # Extending the interface
//
// New capabilities come as optional interfaces that an operator implements
// and the runtime looks for, and as new methods on Context, which only the
// runtime implements: neither breaks an existing operator. Timers are planned
// that way: Context will gain a Timers method (register a processing-time or
// event-time timer for the current key), and an operator that registers
// timers implements an OnTimer(ctx Context, t Timer) error method, called
// with the timer's key as the current key. StateEncoding below is such an
// optional interface already, and so is Combiner.
//
// # Error handling
//
// Split returns an error for a malformed record; the source task skips the
// record, counts it in coordflow_records_skipped_total and goes on. Process
// returns an error for an item it cannot handle (say, a state value it cannot
// decode); the map task counts and logs it and goes on with the next item,
// keeping whatever the operator wrote before it returned. Neither half may
// panic on any input, and both must be deterministic: a record replayed after
// a restore must produce the same items, the same state and the same output.
package operator

import (
	"errors"
	"fmt"
	"sort"
	"sync"
)

// Record is one Kafka record as a source task hands it to Split. Key and
// Value are only valid during the call: an Item that keeps them must not
// outlive it unless it copies them, which the runtime does for Item.Key and
// Item.Raw when it sends an item on.
type Record struct {
	Key, Value []byte
	Partition  int32
	Offset     int64
}

// Item is one keyed item produced by Split. Key decides the key group and so
// the map task the item goes to (any bytes; nil and empty are the same key);
// Num and Raw carry the payload Process needs.
type Item struct {
	Key []byte
	Num int64
	Raw []byte
}

// Output is one record a map task writes to the job's sink topic, if the job
// has one.
type Output struct {
	Key, Value []byte
}

// Context is the map task's side of one Process call: the keyed state of the
// current item's key, and the job's sink. It is valid only during the call
// and must not be kept or used from another goroutine.
type Context interface {
	// Key is the current item's key.
	Key() []byte
	// Get returns the state of the current key; ok is false when the key has
	// none. The value is only valid until the next call on the Context and
	// must not be modified.
	Get() (value []byte, ok bool, err error)
	// Put sets the state of the current key; the runtime copies value.
	Put(value []byte) error
	// Delete removes the state of the current key.
	Delete() error
	// Emit writes out to the job's sink; without a sink it is dropped. The
	// runtime copies out's bytes.
	Emit(out Output)
	// HasSink reports whether the job has a sink, so an operator can skip
	// building outputs nobody reads.
	HasSink() bool
}

// Operator is the user code of a job. One Operator value serves every task of
// every job that names it, from many goroutines at once: implementations must
// be safe for concurrent use, which they are when they keep no mutable fields.
type Operator interface {
	// Split turns a record into keyed items by calling emit for each. An
	// error marks the record as malformed: the items it already emitted are
	// discarded and the record is skipped.
	Split(r Record, emit func(Item)) error
	// Process handles one item in the map task that owns its key, reading
	// and writing that key's state through ctx. The item's Key and Raw are
	// only valid during the call (they point into the batch it came in):
	// state and outputs are copied by the runtime, anything else the
	// operator keeps it must copy.
	Process(ctx Context, it Item) error
}

// Combiner is an optional interface for an operator whose items of one key
// can be merged before they reach Process: the source task then merges the
// items of each key between two flushes (always before a checkpoint barrier,
// so every checkpoint stays exact) and sends one item per key instead of one
// per occurrence, as Flink's local-global aggregation does. Merging must not
// change the state: Process of Combine(a, b) must leave the key's state as
// Process of a and then of b would. It does change what a sink sees, one
// update for the merged items instead of one each, so the runtime combines
// only for jobs without a sink.
type Combiner interface {
	// Combine merges it into acc, an earlier item of the same key (or a
	// result of Combine), and returns the merged item. Its Key is ignored,
	// and the runtime copies its Raw.
	Combine(acc, it Item) Item
}

// Encoding says how an operator's state values are encoded, so that tools
// that did not write them (the state API, exports) can show them.
type Encoding string

// State value encodings.
const (
	// EncodingBytes: opaque bytes, shown as a string when valid UTF-8, else
	// as base64. The default.
	EncodingBytes Encoding = "bytes"
	// EncodingInt64: 8 bytes big-endian, as PutInt64 writes; shown as a number.
	EncodingInt64 Encoding = "int64"
	// EncodingJSON: one JSON value, as PutJSON writes; shown as that value.
	EncodingJSON Encoding = "json"
)

// StateEncoder is an optional interface: an operator whose state values all
// use one encoding says which.
type StateEncoder interface {
	StateEncoding() Encoding
}

// EncodingOf returns op's state encoding, EncodingBytes when it does not say.
func EncodingOf(op Operator) Encoding {
	if e, ok := op.(StateEncoder); ok {
		return e.StateEncoding()
	}
	return EncodingBytes
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
