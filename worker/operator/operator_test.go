package operator

import (
	"bytes"
	"errors"
	"hash/fnv"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"testing"
)

// memContext is a Context over a map, the way a map task drives Process,
// with every output recorded.
type memContext struct {
	state map[string][]byte
	key   []byte
	sink  bool
	outs  []Output
}

func newMemContext(sink bool) *memContext {
	return &memContext{state: make(map[string][]byte), sink: sink}
}

func (c *memContext) Key() []byte { return c.key }
func (c *memContext) Get() ([]byte, bool, error) {
	v, ok := c.state[string(c.key)]
	return v, ok, nil
}
func (c *memContext) Put(v []byte) error {
	c.state[string(c.key)] = append([]byte(nil), v...)
	return nil
}
func (c *memContext) Delete() error   { delete(c.state, string(c.key)); return nil }
func (c *memContext) Emit(out Output) { c.outs = append(c.outs, out) }
func (c *memContext) HasSink() bool   { return c.sink }

// process runs op.Process for each item in order, as a map task does.
func (c *memContext) process(t *testing.T, op Operator, items []Item) {
	t.Helper()
	for _, it := range items {
		c.key = it.Key
		if err := op.Process(c, it); err != nil {
			t.Fatalf("process %q: %v", it.Key, err)
		}
	}
}

// ints decodes every value of an int64-state operator.
func (c *memContext) ints(t *testing.T) map[string]int64 {
	t.Helper()
	out := make(map[string]int64, len(c.state))
	for k, v := range c.state {
		n, err := DecodeInt64(v)
		if err != nil {
			t.Fatalf("state of %q: %v", k, err)
		}
		out[k] = n
	}
	return out
}

// split runs op.Split on a record and returns the items it emitted.
func split(t *testing.T, op Operator, r Record) ([]Item, error) {
	t.Helper()
	var items []Item
	err := op.Split(r, func(it Item) { items = append(items, it) })
	return items, err
}

func mustLookup(t *testing.T, name string) Operator {
	t.Helper()
	op, ok := Builtins().Lookup(name)
	if !ok {
		t.Fatalf("builtin %q not registered", name)
	}
	return op
}

func keys(ss ...string) []Item {
	items := make([]Item, len(ss))
	for i, s := range ss {
		items[i] = Item{Key: []byte(s), Num: 1}
	}
	return items
}

func TestWordCount(t *testing.T) {
	op := mustLookup(t, WordCount)
	items, err := split(t, op, Record{Value: []byte("  the cat\tsaw\nthe  dog ")})
	if err != nil {
		t.Fatalf("split: %v", err)
	}
	if want := keys("the", "cat", "saw", "the", "dog"); !reflect.DeepEqual(items, want) {
		t.Fatalf("items = %v, want %v", items, want)
	}
	c := newMemContext(true)
	c.process(t, op, items)
	if want := map[string]int64{"the": 2, "cat": 1, "saw": 1, "dog": 1}; !reflect.DeepEqual(c.ints(t), want) {
		t.Fatalf("state = %v, want %v", c.ints(t), want)
	}
	if last := c.outs[len(c.outs)-2]; string(last.Key) != "the" || string(last.Value) != "2" {
		t.Fatalf("output for second \"the\" = %q -> %q, want the -> 2", last.Key, last.Value)
	}
	if items, _ := split(t, op, Record{Value: []byte(" \t\n")}); len(items) != 0 {
		t.Fatalf("blank value split into %v, want nothing", items)
	}
	if EncodingOf(op) != EncodingInt64 {
		t.Fatalf("wordcount state encoding = %q, want int64", EncodingOf(op))
	}
}

// TestBinaryKeys: words and keys that are not UTF-8 are keys like any other.
func TestBinaryKeys(t *testing.T) {
	op := mustLookup(t, WordCount)
	bad := []byte{0xff, 0xfe, 'x', 0x80}
	value := append(append([]byte("ok "), bad...), []byte(" \x00\x01 ok")...)
	items, err := split(t, op, Record{Value: value})
	if err != nil {
		t.Fatalf("split: %v", err)
	}
	c := newMemContext(false)
	c.process(t, op, items)
	want := map[string]int64{"ok": 2, string(bad): 1, "\x00\x01": 1}
	if !reflect.DeepEqual(c.ints(t), want) {
		t.Fatalf("state = %v, want %v", c.ints(t), want)
	}
	if len(c.outs) != 0 {
		t.Fatalf("without a sink wordcount emitted %d outputs", len(c.outs))
	}
}

func TestCount(t *testing.T) {
	op := mustLookup(t, Count)
	c := newMemContext(true)
	for _, k := range [][]byte{[]byte("a"), nil, []byte("a"), []byte("")} {
		items, err := split(t, op, Record{Key: k, Value: []byte("ignored")})
		if err != nil {
			t.Fatalf("split: %v", err)
		}
		c.process(t, op, items)
	}
	if want := map[string]int64{"a": 2, "": 2}; !reflect.DeepEqual(c.ints(t), want) {
		t.Fatalf("state = %v, want %v", c.ints(t), want)
	}
	if string(c.outs[3].Value) != "2" {
		t.Fatalf("last output = %q, want 2", c.outs[3].Value)
	}
}

func TestSum(t *testing.T) {
	op := mustLookup(t, Sum)
	c := newMemContext(false)
	for _, v := range []string{"5", " 7\n", "-3"} {
		items, err := split(t, op, Record{Key: []byte("k"), Value: []byte(v)})
		if err != nil {
			t.Fatalf("split %q: %v", v, err)
		}
		c.process(t, op, items)
	}
	if got := c.ints(t)["k"]; got != 9 {
		t.Fatalf("sum = %d, want 9", got)
	}
	for _, bad := range []string{"", "x", "1.5", "12abc", "99999999999999999999"} {
		items, err := split(t, op, Record{Key: []byte("k"), Value: []byte(bad)})
		if err == nil || len(items) != 0 {
			t.Fatalf("split %q = %v, %v; want an error and no items", bad, items, err)
		}
	}
}

// TestCorruptInt64State: a counting operator given a state value that is not
// 8 bytes returns an error naming the key, and leaves the value alone.
func TestCorruptInt64State(t *testing.T) {
	c := newMemContext(true)
	c.state["w"] = []byte("abc")
	c.key = []byte("w")
	err := mustLookup(t, WordCount).Process(c, Item{Key: []byte("w"), Num: 1})
	if err == nil {
		t.Fatal("Process over a 3-byte int64 state succeeded")
	}
	if string(c.state["w"]) != "abc" || len(c.outs) != 0 {
		t.Fatalf("failed Process changed state to %q or emitted %v", c.state["w"], c.outs)
	}
}

func TestPassthrough(t *testing.T) {
	op := mustLookup(t, Passthrough)
	for _, r := range []Record{{Key: []byte("k"), Value: []byte("v 1")}, {Value: []byte("no key")}} {
		items, err := split(t, op, r)
		if err != nil || len(items) != 1 {
			t.Fatalf("split = %v, %v; want one item", items, err)
		}
		c := newMemContext(true)
		c.process(t, op, items)
		if len(c.state) != 0 {
			t.Fatalf("passthrough kept state %v", c.state)
		}
		if !reflect.DeepEqual(c.outs, []Output{{Key: r.Key, Value: r.Value}}) {
			t.Fatalf("outputs = %v, want the record %v", c.outs, r)
		}
	}
}

// TestLatest: the latest value per key, an empty value deletes the key, and
// every change reaches the sink.
func TestLatest(t *testing.T) {
	op := mustLookup(t, Latest)
	c := newMemContext(true)
	for _, r := range []Record{
		{Key: []byte("a"), Value: []byte("1")},
		{Key: []byte("b"), Value: []byte{0xff, 0x00}},
		{Key: []byte("a"), Value: []byte("2")},
		{Key: []byte("c"), Value: []byte("x")},
		{Key: []byte("c"), Value: nil},
	} {
		items, err := split(t, op, r)
		if err != nil {
			t.Fatalf("split: %v", err)
		}
		c.process(t, op, items)
	}
	want := map[string][]byte{"a": []byte("2"), "b": {0xff, 0x00}}
	if !reflect.DeepEqual(c.state, want) {
		t.Fatalf("state = %q, want %q", c.state, want)
	}
	if len(c.outs) != 5 || c.outs[4].Value != nil || string(c.outs[4].Key) != "c" {
		t.Fatalf("outputs = %q, want 5 ending with the tombstone of c", c.outs)
	}
}

// TestDistinct: the first record of a key passes, repeats are dropped.
func TestDistinct(t *testing.T) {
	op := mustLookup(t, Distinct)
	c := newMemContext(true)
	var passed []string
	for i, k := range []string{"id1", "id2", "id1", "id3", "id2", "id1"} {
		items, err := split(t, op, Record{Key: []byte(k), Value: []byte(strconv.Itoa(i))})
		if err != nil {
			t.Fatalf("split: %v", err)
		}
		c.process(t, op, items)
	}
	for _, o := range c.outs {
		passed = append(passed, string(o.Key)+"="+string(o.Value))
	}
	if want := []string{"id1=0", "id2=1", "id3=3"}; !reflect.DeepEqual(passed, want) {
		t.Fatalf("passed %v, want %v", passed, want)
	}
	if got := slices.Sorted(maps.Keys(c.state)); !reflect.DeepEqual(got, []string{"id1", "id2", "id3"}) {
		t.Fatalf("state keys = %v", got)
	}
}

func TestJSONHelpers(t *testing.T) {
	type rec struct {
		N int      `json:"n"`
		S []string `json:"s"`
	}
	c := newMemContext(false)
	c.key = []byte("k")
	var got rec
	if ok, err := GetJSON(c, &got); ok || err != nil {
		t.Fatalf("GetJSON of a missing key = %v, %v", ok, err)
	}
	if err := PutJSON(c, rec{N: 3, S: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	if ok, err := GetJSON(c, &got); !ok || err != nil || got.N != 3 || got.S[0] != "a" {
		t.Fatalf("GetJSON = %+v, %v, %v", got, ok, err)
	}
	c.state["k"] = []byte("{not json")
	if _, err := GetJSON(c, &got); err == nil {
		t.Fatal("GetJSON of bad JSON succeeded")
	}
}

func TestRegistry(t *testing.T) {
	r := Builtins()
	if got, want := r.Names(), []string{Count, Distinct, Latest, Passthrough, Sum, WordCount}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Names = %v, want %v", got, want)
	}
	if err := r.Register(Sum, count{}); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("duplicate Register = %v, want ErrDuplicate", err)
	}
	if err := r.Register("", count{}); err == nil {
		t.Fatal("Register with empty name succeeded")
	}
	if err := r.Register("mine", nil); err == nil {
		t.Fatal("Register of nil operator succeeded")
	}
	if err := r.Register("mine", count{}); err != nil {
		t.Fatalf("Register: %v", err)
	}
	if _, ok := r.Lookup("mine"); !ok {
		t.Fatal("registered operator not found")
	}
	if _, ok := r.Lookup("nope"); ok {
		t.Fatal("Lookup of an unknown name succeeded")
	}
}

func TestKeyGroupStable(t *testing.T) {
	// FNV-1a 64 test vectors from the FNV reference (draft-eastlake-fnv,
	// isthe.com/chongo/tech/comp/fnv), reduced by hand.
	vectors := []struct {
		key  string
		hash uint64
	}{
		{"", 0xcbf29ce484222325},
		{"a", 0xaf63dc4c8601ec8c},
		{"foobar", 0x85944171f73967e8},
	}
	for _, v := range vectors {
		for _, max := range []int{1, 7, 128, 1 << 15} {
			if got, want := KeyGroup([]byte(v.key), max), int32(v.hash%uint64(max)); got != want {
				t.Errorf("KeyGroup(%q, %d) = %d, want %d", v.key, max, got, want)
			}
		}
	}
	// Hard-coded results for the default 128 key groups: a change here breaks
	// every stored snapshot.
	for key, want := range map[string]int32{"": 37, "a": 12, "foobar": 104} {
		if got := KeyGroup([]byte(key), DefaultMaxParallelism); got != want {
			t.Errorf("KeyGroup(%q, 128) = %d, want %d", key, got, want)
		}
	}
	if got := KeyGroup([]byte("a"), 0); got != 0 {
		t.Errorf("KeyGroup with max 0 = %d, want 0", got)
	}
	// The inline hash equals hash/fnv's on binary keys too.
	for i := range 300 {
		key := []byte{byte(i), byte(i >> 3), 0xff, byte(i * 7)}[:i%5]
		h := fnv.New64a()
		h.Write(key)
		if got, want := KeyGroup(key, 1000), int32(h.Sum64()%1000); got != want {
			t.Fatalf("KeyGroup(%x) = %d, hash/fnv gives %d", key, got, want)
		}
	}
}

// TestCombiners: for every built-in that can combine, processing the merged
// items of each key leaves the same state as processing every item; the
// others say they cannot combine.
func TestCombiners(t *testing.T) {
	recs := []Record{
		{Key: []byte("a"), Value: []byte("3 the fox\tthe\n")},
		{Key: []byte("b"), Value: []byte("-7 fox")},
		{Key: []byte("a"), Value: []byte("9223372036854775807")}, // sums wrap, in either order
		{Key: nil, Value: []byte("1 \xff\xfe the")},
	}
	combinable := map[string]bool{WordCount: true, Count: true, Sum: true}
	for _, name := range Builtins().Names() {
		op := mustLookup(t, name)
		c, ok := op.(Combiner)
		if ok != combinable[name] {
			t.Fatalf("%s: is a Combiner: %v, want %v", name, ok, combinable[name])
		}
		if !ok {
			continue
		}
		one, merged := newMemContext(false), newMemContext(false)
		acc := map[string]Item{}
		var order []string
		for _, r := range recs {
			items, err := split(t, op, r)
			if err != nil {
				continue // sum: not a number
			}
			one.process(t, op, items)
			for _, it := range items {
				k := string(it.Key)
				if a, seen := acc[k]; seen {
					acc[k] = c.Combine(a, it)
				} else {
					acc[k] = it
					order = append(order, k)
				}
			}
		}
		for _, k := range order {
			it := acc[k]
			it.Key = []byte(k)
			merged.process(t, op, []Item{it})
		}
		if !reflect.DeepEqual(one.ints(t), merged.ints(t)) || len(one.state) == 0 {
			t.Fatalf("%s: state item by item %v, combined %v", name, one.ints(t), merged.ints(t))
		}
	}
}

// FuzzFields: wordcount's split finds exactly the words bytes.Fields does,
// for any bytes, valid UTF-8 or not.
func FuzzFields(f *testing.F) {
	for _, s := range []string{"", " ", "a", " a  b\tc\n", "\u00a0x\u2003y\u3000", "\xff \xfe\x80z", "tail "} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var got [][]byte
		for w := range fields(b) {
			got = append(got, w)
		}
		want := bytes.Fields(b)
		if len(got) != len(want) {
			t.Fatalf("fields(%q) = %q, bytes.Fields = %q", b, got, want)
		}
		for i := range got {
			if !bytes.Equal(got[i], want[i]) || cap(got[i]) != len(got[i]) {
				t.Fatalf("fields(%q) = %q, bytes.Fields = %q", b, got, want)
			}
		}
	})
}

// TestWordCountSplitAllocates nothing per word.
func TestWordCountSplitAllocates(t *testing.T) {
	op := mustLookup(t, WordCount)
	r := Record{Value: []byte("the quick brown fox jumps over the lazy dog")}
	n := 0
	emit := func(Item) { n++ }
	if a := testing.AllocsPerRun(100, func() { _ = op.Split(r, emit) }); a > 0 {
		t.Fatalf("wordcount's Split allocates %.0f times per record", a)
	}
}
