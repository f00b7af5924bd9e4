package operator

import (
	"bytes"
	"fmt"
	"iter"
	"strconv"
	"unicode"
	"unicode/utf8"
)

// Names of the built-in operators.
const (
	WordCount   = "wordcount"
	Count       = "count"
	Sum         = "sum"
	Passthrough = "passthrough"
	Latest      = "latest"
	Distinct    = "distinct"
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
		Latest:      latest{},
		Distinct:    distinct{},
	} {
		// Cannot fail: the names are distinct and non-empty.
		_ = r.Register(name, op)
	}
	return r
}

// addInt64 adds n to the current key's int64 state and emits the new total,
// as a base-10 number, when the job has a sink: the update step of the
// counting operators. Sums wrap on overflow, as int64 addition does, so a
// replay gives the same result.
func addInt64(ctx Context, n int64) error {
	v, _, err := GetInt64(ctx)
	if err != nil {
		return err
	}
	v += n
	if err := PutInt64(ctx, v); err != nil {
		return err
	}
	if ctx.HasSink() {
		ctx.Emit(Output{Key: ctx.Key(), Value: strconv.AppendInt(nil, v, 10)})
	}
	return nil
}

// counting is embedded by the operators whose state is an int64 sum of
// their items' Num: their items combine by adding.
type counting struct{}

func (counting) StateEncoding() Encoding { return EncodingInt64 }

// Combine adds the counts, wrapping on overflow as the state does.
func (counting) Combine(acc, it Item) Item { return Item{Num: acc.Num + it.Num} }

// wordCount counts words: one item per white-space separated word of the
// record value, keyed by the word's bytes. Words are split on ASCII and
// Unicode white space as strings.Fields does; bytes that are not valid UTF-8
// are part of a word like any other.
type wordCount struct{ counting }

func (wordCount) Split(r Record, emit func(Item)) error {
	for w := range fields(r.Value) {
		emit(Item{Key: w, Num: 1})
	}
	return nil
}

// Process adds the item's count: 1 as Split makes it, more once combined.
func (wordCount) Process(ctx Context, it Item) error { return addInt64(ctx, it.Num) }

// count counts records per record key; a record without a key counts under
// the empty key.
type count struct{ counting }

func (count) Split(r Record, emit func(Item)) error {
	emit(Item{Key: r.Key, Num: 1})
	return nil
}

func (count) Process(ctx Context, it Item) error { return addInt64(ctx, it.Num) }

// sum sums record values, parsed as base-10 int64, per record key.
type sum struct{ counting }

func (sum) Split(r Record, emit func(Item)) error {
	v, err := strconv.ParseInt(string(bytes.TrimSpace(r.Value)), 10, 64)
	if err != nil {
		return fmt.Errorf("sum: value %q is not a base-10 int64", truncate(r.Value, 32))
	}
	emit(Item{Key: r.Key, Num: v})
	return nil
}

func (sum) Process(ctx Context, it Item) error { return addInt64(ctx, it.Num) }

// passthrough forwards every record unchanged to the sink, partitioned by its
// key, and keeps no state. A record with a nil key comes out with a nil key.
type passthrough struct{}

func (passthrough) Split(r Record, emit func(Item)) error {
	emit(Item{Key: r.Key, Raw: r.Value})
	return nil
}

func (passthrough) Process(ctx Context, it Item) error {
	if ctx.HasSink() {
		ctx.Emit(Output{Key: nilIfEmpty(it.Key), Value: it.Raw})
	}
	return nil
}

// latest keeps the latest value per record key: a changelog topic
// materialized as a table. A record with an empty (or null) value is a
// tombstone, as in a compacted Kafka topic: it deletes the key. Every change
// is forwarded to the sink.
type latest struct{}

func (latest) Split(r Record, emit func(Item)) error {
	emit(Item{Key: r.Key, Raw: r.Value})
	return nil
}

func (latest) Process(ctx Context, it Item) error {
	var err error
	if len(it.Raw) == 0 {
		err = ctx.Delete()
	} else {
		err = ctx.Put(it.Raw)
	}
	if err == nil && ctx.HasSink() {
		ctx.Emit(Output{Key: nilIfEmpty(it.Key), Value: it.Raw})
	}
	return err
}

// distinct passes a record on the first time its key is seen and drops
// repeats: deduplication by id. Its state per key is the offset-free marker
// of having been seen (one byte), so the state is the set of keys seen.
type distinct struct{}

// seenMarker is distinct's state value.
var seenMarker = []byte{1}

func (distinct) Split(r Record, emit func(Item)) error {
	emit(Item{Key: r.Key, Raw: r.Value})
	return nil
}

func (distinct) Process(ctx Context, it Item) error {
	_, seen, err := ctx.Get()
	if err != nil || seen {
		return err
	}
	if err := ctx.Put(seenMarker); err != nil {
		return err
	}
	if ctx.HasSink() {
		ctx.Emit(Output{Key: nilIfEmpty(it.Key), Value: it.Raw})
	}
	return nil
}

func nilIfEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}

// truncate bounds a malformed value quoted in an error message.
func truncate(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "..."
}

// asciiSpace marks the ASCII white space bytes, as bytes.Fields has them.
var asciiSpace = [utf8.RuneSelf]bool{'\t': true, '\n': true, '\v': true, '\f': true, '\r': true, ' ': true}

// fields yields the white-space separated words of b exactly as bytes.Fields
// splits it, without building a slice of them: wordcount splits every
// record, and a slice per record was one of its larger costs. Invalid UTF-8
// is never space, so it stays part of a word.
func fields(b []byte) iter.Seq[[]byte] {
	return func(yield func([]byte) bool) {
		start := -1 // start of the current word, -1 between words
		for i := 0; i < len(b); {
			c, size := b[i], 1
			var space bool
			if c < utf8.RuneSelf {
				space = asciiSpace[c]
			} else {
				var r rune
				r, size = utf8.DecodeRune(b[i:])
				space = unicode.IsSpace(r)
			}
			switch {
			case space && start >= 0:
				if !yield(b[start:i:i]) {
					return
				}
				start = -1
			case !space && start < 0:
				start = i
			}
			i += size
		}
		if start >= 0 {
			yield(b[start:len(b):len(b)])
		}
	}
}
