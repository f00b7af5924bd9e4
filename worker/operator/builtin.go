package operator

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// Names of the built-in operators.
const (
	WordCount   = "wordcount"
	Count       = "count"
	Sum         = "sum"
	Passthrough = "passthrough"
)

// Builtins returns a new registry holding the built-in operators. Callers may
// Register their own operators on it.
func Builtins() *Registry {
	r := NewRegistry()
	for name, op := range map[string]Operator{
		WordCount:   wordCount{},
		Count:       count{},
		Sum:         sum{},
		Passthrough: passthrough{},
	} {
		// Cannot fail: the names are distinct and non-empty.
		_ = r.Register(name, op)
	}
	return r
}

// decimalOutput is the sink record of the counting operators: key -> state as
// a base-10 number.
func decimalOutput(key string, v int64) *Output {
	return &Output{Key: []byte(key), Value: strconv.AppendInt(nil, v, 10)}
}

// wordCount counts words: one item per white-space separated word of the
// record value, keyed by the word.
type wordCount struct{}

func (wordCount) Split(r Record, emit func(Item)) error {
	for _, w := range strings.Fields(string(r.Value)) {
		emit(Item{Key: w, Num: 1})
	}
	return nil
}

func (wordCount) Update(state int64, it Item) (int64, bool, *Output) {
	state++
	return state, true, decimalOutput(it.Key, state)
}

func (wordCount) UpdateState(state int64, _ Item) (int64, bool) { return state + 1, true }

// count counts records per record key; a record without a key counts under "".
type count struct{}

func (count) Split(r Record, emit func(Item)) error {
	emit(Item{Key: string(r.Key), Num: 1})
	return nil
}

func (count) Update(state int64, it Item) (int64, bool, *Output) {
	state++
	return state, true, decimalOutput(it.Key, state)
}

func (count) UpdateState(state int64, _ Item) (int64, bool) { return state + 1, true }

// sum sums record values, parsed as base-10 int64, per record key.
type sum struct{}

func (sum) Split(r Record, emit func(Item)) error {
	v, err := strconv.ParseInt(string(bytes.TrimSpace(r.Value)), 10, 64)
	if err != nil {
		return fmt.Errorf("sum: value %q is not a base-10 int64", truncate(r.Value, 32))
	}
	emit(Item{Key: string(r.Key), Num: v})
	return nil
}

func (sum) Update(state int64, it Item) (int64, bool, *Output) {
	// Overflow wraps, as int64 addition does; deterministic across replays.
	state += it.Num
	return state, true, decimalOutput(it.Key, state)
}

func (sum) UpdateState(state int64, it Item) (int64, bool) { return state + it.Num, true }

// passthrough forwards every record unchanged to the sink, partitioned by its
// key, and keeps no state. A record with a nil key comes out with a nil key.
type passthrough struct{}

func (passthrough) Split(r Record, emit func(Item)) error {
	emit(Item{Key: string(r.Key), Raw: r.Value})
	return nil
}

func (passthrough) Update(_ int64, it Item) (int64, bool, *Output) {
	var key []byte
	if it.Key != "" {
		key = []byte(it.Key)
	}
	return 0, false, &Output{Key: key, Value: it.Raw}
}

func (passthrough) UpdateState(int64, Item) (int64, bool) { return 0, false }

// truncate bounds a malformed value quoted in an error message.
func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "..."
}
