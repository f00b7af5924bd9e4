package operator

import (
	"errors"
	"reflect"
	"testing"
)

// split runs op.Split on a record and returns the items it emitted.
func split(t *testing.T, op Operator, r Record) ([]Item, error) {
	t.Helper()
	var items []Item
	err := op.Split(r, func(it Item) { items = append(items, it) })
	return items, err
}

// fold applies Update for each item in order over a fresh state map, the way
// a map task does, and returns the state and the outputs.
func fold(op Operator, items []Item) (map[string]int64, []Output) {
	state := make(map[string]int64)
	var outs []Output
	for _, it := range items {
		v, keep, out := op.Update(state[it.Key], it)
		if keep {
			state[it.Key] = v
		} else {
			delete(state, it.Key)
		}
		if out != nil {
			outs = append(outs, *out)
		}
	}
	return state, outs
}

func mustLookup(t *testing.T, name string) Operator {
	t.Helper()
	op, ok := Builtins().Lookup(name)
	if !ok {
		t.Fatalf("builtin %q not registered", name)
	}
	return op
}

func TestWordCount(t *testing.T) {
	op := mustLookup(t, WordCount)
	items, err := split(t, op, Record{Value: []byte("  the cat\tsaw\nthe  dog ")})
	if err != nil {
		t.Fatalf("split: %v", err)
	}
	want := []Item{{Key: "the", Num: 1}, {Key: "cat", Num: 1}, {Key: "saw", Num: 1}, {Key: "the", Num: 1}, {Key: "dog", Num: 1}}
	if !reflect.DeepEqual(items, want) {
		t.Fatalf("items = %v, want %v", items, want)
	}
	state, outs := fold(op, items)
	if want := map[string]int64{"the": 2, "cat": 1, "saw": 1, "dog": 1}; !reflect.DeepEqual(state, want) {
		t.Fatalf("state = %v, want %v", state, want)
	}
	if last := outs[len(outs)-2]; string(last.Key) != "the" || string(last.Value) != "2" {
		t.Fatalf("output for second \"the\" = %q -> %q, want the -> 2", last.Key, last.Value)
	}
	if items, _ := split(t, op, Record{Value: []byte(" \t\n")}); len(items) != 0 {
		t.Fatalf("blank value split into %v, want nothing", items)
	}
}

func TestCount(t *testing.T) {
	op := mustLookup(t, Count)
	var all []Item
	for _, k := range [][]byte{[]byte("a"), nil, []byte("a"), []byte("")} {
		items, err := split(t, op, Record{Key: k, Value: []byte("ignored")})
		if err != nil {
			t.Fatalf("split: %v", err)
		}
		all = append(all, items...)
	}
	state, outs := fold(op, all)
	if want := map[string]int64{"a": 2, "": 2}; !reflect.DeepEqual(state, want) {
		t.Fatalf("state = %v, want %v", state, want)
	}
	if string(outs[3].Value) != "2" {
		t.Fatalf("last output = %q, want 2", outs[3].Value)
	}
}

func TestSum(t *testing.T) {
	op := mustLookup(t, Sum)
	var all []Item
	for _, v := range []string{"5", " 7\n", "-3", "9223372036854775807"} {
		items, err := split(t, op, Record{Key: []byte("k"), Value: []byte(v)})
		if err != nil {
			t.Fatalf("split %q: %v", v, err)
		}
		all = append(all, items...)
	}
	state, _ := fold(op, all[:3])
	if state["k"] != 9 {
		t.Fatalf("sum = %d, want 9", state["k"])
	}
	for _, bad := range []string{"", "x", "1.5", "12abc", "99999999999999999999"} {
		items, err := split(t, op, Record{Key: []byte("k"), Value: []byte(bad)})
		if err == nil || len(items) != 0 {
			t.Fatalf("split %q = %v, %v; want an error and no items", bad, items, err)
		}
	}
}

func TestPassthrough(t *testing.T) {
	op := mustLookup(t, Passthrough)
	for _, r := range []Record{{Key: []byte("k"), Value: []byte("v 1")}, {Value: []byte("no key")}} {
		items, err := split(t, op, r)
		if err != nil || len(items) != 1 {
			t.Fatalf("split = %v, %v; want one item", items, err)
		}
		state, outs := fold(op, items)
		if len(state) != 0 {
			t.Fatalf("passthrough kept state %v", state)
		}
		if !reflect.DeepEqual(outs, []Output{{Key: r.Key, Value: r.Value}}) {
			t.Fatalf("outputs = %v, want the record %v", outs, r)
		}
	}
}

func TestRegistry(t *testing.T) {
	r := Builtins()
	if got, want := r.Names(), []string{Count, Passthrough, Sum, WordCount}; !reflect.DeepEqual(got, want) {
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
			if got, want := KeyGroup(v.key, max), int32(v.hash%uint64(max)); got != want {
				t.Errorf("KeyGroup(%q, %d) = %d, want %d", v.key, max, got, want)
			}
		}
	}
	// Hard-coded results for the default 128 key groups: a change here breaks
	// every stored snapshot.
	for key, want := range map[string]int32{"": 37, "a": 12, "foobar": 104} {
		if got := KeyGroup(key, DefaultMaxParallelism); got != want {
			t.Errorf("KeyGroup(%q, 128) = %d, want %d", key, got, want)
		}
	}
	if got := KeyGroup("a", 0); got != 0 {
		t.Errorf("KeyGroup with max 0 = %d, want 0", got)
	}
}

func TestKeyGroupRange(t *testing.T) {
	for _, par := range []int{1, 2, 3, 5, 128} {
		next := int32(0)
		for i := 0; i < par; i++ {
			s, e := KeyGroupRange(i, par, 128)
			if s != next || e <= s {
				t.Fatalf("parallelism %d: range %d = [%d, %d), want start %d and non-empty", par, i, s, e, next)
			}
			next = e
		}
		if next != 128 {
			t.Fatalf("parallelism %d: ranges end at %d, want 128", par, next)
		}
	}
	if s, e := KeyGroupRange(1, 3, 128); s != 42 || e != 85 {
		t.Fatalf("range 1 of 3 = [%d, %d), want [42, 85)", s, e)
	}
}

// TestUpdateStateMatchesUpdate: every builtin has the sink-less fast path,
// and it folds state exactly as Update does.
func TestUpdateStateMatchesUpdate(t *testing.T) {
	items := []Item{{Key: "a", Num: 3, Raw: []byte("x")}, {Key: "b", Num: -1}, {Key: "a", Num: 4, Raw: []byte("y")}, {Key: "", Num: 2}}
	for _, name := range []string{WordCount, Count, Sum, Passthrough} {
		op := mustLookup(t, name)
		su, ok := op.(StateUpdater)
		if !ok {
			t.Fatalf("builtin %q has no UpdateState", name)
		}
		want, _ := fold(op, items)
		got := make(map[string]int64)
		for _, it := range items {
			if v, keep := su.UpdateState(got[it.Key], it); keep {
				got[it.Key] = v
			} else {
				delete(got, it.Key)
			}
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: UpdateState folds to %v, Update to %v", name, got, want)
		}
	}
}
