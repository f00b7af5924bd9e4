package state

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
)

// backendCase names a Backend constructor the contract tests run against.
type backendCase struct {
	name string
	open func(t testing.TB) Backend
}

// backendCases returns a constructor per backend. The disk backend gets a
// small memtable so that the tests also read from tables on disk, not only
// from the memtable.
func backendCases() []backendCase {
	return []backendCase{
		{"memory", func(t testing.TB) Backend {
			m := NewMemory()
			t.Cleanup(func() { _ = m.Close() })
			return m
		}},
		{"disk", func(t testing.TB) Backend {
			d, err := OpenDisk(t.TempDir(), DiskOptions{MemTableSize: 256 << 10, CacheSize: 1 << 20})
			if err != nil {
				t.Fatalf("OpenDisk: %v", err)
			}
			t.Cleanup(func() {
				if err := d.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			return d
		}},
	}
}

// forEachBackend runs test as a subtest against a fresh instance of every
// backend.
func forEachBackend(t *testing.T, test func(t *testing.T, b Backend)) {
	t.Helper()
	for _, bc := range backendCases() {
		t.Run(bc.name, func(t *testing.T) { test(t, bc.open(t)) })
	}
}

// model is the expected content of a Backend or View: key group, key, value.
type model map[int32]map[string]string

// clone returns a deep copy of m.
func (m model) clone() model {
	c := make(model, len(m))
	for kg, keys := range m {
		c[kg] = maps.Clone(keys)
	}
	return c
}

func (m model) put(kg int32, key, value string) {
	if m[kg] == nil {
		m[kg] = make(map[string]string)
	}
	m[kg][key] = value
}

func (m model) delete(kg int32, key string) {
	delete(m[kg], key)
	if len(m[kg]) == 0 {
		delete(m, kg)
	}
}

func (m model) dropRange(start, end int32) {
	for kg := range m {
		if kg >= start && kg < end {
			delete(m, kg)
		}
	}
}

// entries returns the entries of key groups [start, end) in the order
// View.Range promises.
func (m model) entries(start, end int32) []entry {
	var es []entry
	for kg, keys := range m {
		if kg < start || kg >= end {
			continue
		}
		for k, v := range keys {
			es = append(es, entry{kg, k, v})
		}
	}
	slices.SortFunc(es, func(a, b entry) int {
		if a.kg != b.kg {
			return int(a.kg - b.kg)
		}
		return bytes.Compare([]byte(a.key), []byte(b.key))
	})
	return es
}

// entry is one key of a Backend, as Range reports it.
type entry struct {
	kg         int32
	key, value string
}

// collect returns what v.Range(start, end) reports, failing t on error.
func collect(t testing.TB, v View, start, end int32) []entry {
	t.Helper()
	var es []entry
	err := v.Range(start, end, func(kg int32, key, value []byte) error {
		es = append(es, entry{kg, string(key), string(value)})
		return nil
	})
	if err != nil {
		t.Fatalf("Range(%d, %d): %v", start, end, err)
	}
	return es
}

// getter is the Get method that Backend and View share.
type getter interface {
	Get(kg int32, key []byte) ([]byte, bool, error)
}

// mustGet returns the value of key in kg and whether it is set, failing t on
// error. It copies the value, which is valid only until the next call.
func mustGet(t testing.TB, g getter, kg int32, key string) (string, bool) {
	t.Helper()
	v, ok, err := g.Get(kg, []byte(key))
	if err != nil {
		t.Fatalf("Get(%d, %q): %v", kg, key, err)
	}
	if !ok && v != nil {
		t.Fatalf("Get(%d, %q) = %q, false; want nil value for a missing key", kg, key, v)
	}
	return string(v), ok
}

// mustPut puts key in kg, failing t on error.
func mustPut(t testing.TB, b Backend, kg int32, key, value string) {
	t.Helper()
	if err := b.Put(kg, []byte(key), []byte(value)); err != nil {
		t.Fatalf("Put(%d, %q): %v", kg, key, err)
	}
}

// mustDelete deletes key from kg, failing t on error.
func mustDelete(t testing.TB, b Backend, kg int32, key string) {
	t.Helper()
	if err := b.Delete(kg, []byte(key)); err != nil {
		t.Fatalf("Delete(%d, %q): %v", kg, key, err)
	}
}

// mustSnapshot takes a snapshot of b, failing t on error.
func mustSnapshot(t testing.TB, b Backend) View {
	t.Helper()
	v, err := b.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	return v
}

// checkGet fails t unless g holds value under key in kg (or, if !want,
// does not hold key).
func checkGet(t testing.TB, g getter, kg int32, key, value string, want bool) {
	t.Helper()
	got, ok := mustGet(t, g, kg, key)
	if ok != want || got != value {
		t.Errorf("Get(%d, %q) = %q, %t; want %q, %t", kg, key, got, ok, value, want)
	}
}

// checkView fails t unless v holds exactly the content of m.
func checkView(t testing.TB, v View, m model) {
	t.Helper()
	got := collect(t, v, 0, MaxKeyGroups)
	want := m.entries(0, MaxKeyGroups)
	if !slices.Equal(got, want) {
		t.Fatalf("Range(0, %d) =\n%v\nwant\n%v", MaxKeyGroups, got, want)
	}
	for kg, keys := range m {
		for k, val := range keys {
			checkGet(t, v, kg, k, val, true)
		}
	}
}

// checkBackend fails t unless b holds exactly the content of m.
func checkBackend(t testing.TB, b Backend, m model) {
	t.Helper()
	v := mustSnapshot(t, b)
	defer v.Release()
	checkView(t, v, m)
	for kg, keys := range m {
		for k, val := range keys {
			checkGet(t, b, kg, k, val, true)
		}
	}
}

func TestGetPutDelete(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		checkGet(t, b, 1, "a", "", false)
		mustPut(t, b, 1, "a", "one")
		checkGet(t, b, 1, "a", "one", true)
		checkGet(t, b, 2, "a", "", false) // key groups are separate
		mustPut(t, b, 2, "a", "two")

		mustPut(t, b, 1, "a", "uno") // overwrite
		checkGet(t, b, 1, "a", "uno", true)
		checkGet(t, b, 2, "a", "two", true)

		mustDelete(t, b, 1, "a")
		checkGet(t, b, 1, "a", "", false)
		checkGet(t, b, 2, "a", "two", true)
		mustDelete(t, b, 1, "a")       // deleting a deleted key
		mustDelete(t, b, 7, "missing") // and one never set, in an empty key group
		mustPut(t, b, 1, "a", "again")
		checkBackend(t, b, model{1: {"a": "again"}, 2: {"a": "two"}})
	})
}

// binaryStrings returns keys and values that are not text: the empty
// string, every byte value, invalid UTF-8, NULs, and strings that are
// prefixes of each other.
func binaryStrings() []string {
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	return []string{
		"", "\x00", "\x00\x00", "\xff", "\xff\xff", "\xfe\xff\xfd", "a\x00b",
		"\xc3\x28", // invalid UTF-8
		string(all), string(all[:128]),
	}
}

func TestBinaryKeysAndValues(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		m := model{}
		strs := binaryStrings()
		for i, k := range strs {
			v := strs[(i+3)%len(strs)] // the empty value included
			kg := int32(i % 3)
			mustPut(t, b, kg, k, v)
			m.put(kg, k, v)
		}
		checkBackend(t, b, m)

		// An empty value is set, not missing.
		mustPut(t, b, 5, "", "")
		v, ok, err := b.Get(5, nil)
		if err != nil || !ok || len(v) != 0 {
			t.Fatalf("Get(5, nil) = %q, %t, %v; want empty value, true", v, ok, err)
		}
		mustDelete(t, b, 5, "")
		checkGet(t, b, 5, "", "", false)
	})
}

func TestPutCopiesBuffers(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		key := []byte("key")
		val := []byte("value")
		if err := b.Put(0, key, val); err != nil {
			t.Fatal(err)
		}
		view := mustSnapshot(t, b)
		defer view.Release()

		// The caller reuses both buffers for the next Put.
		copy(key, "KEY")
		copy(val, "VALUE")
		checkGet(t, b, 0, "key", "value", true)
		if err := b.Put(0, []byte("key"), val); err != nil {
			t.Fatal(err)
		}
		copy(val, "xxxxx")
		checkGet(t, b, 0, "key", "VALUE", true)
		checkGet(t, b, 0, "KEY", "", false)
		checkGet(t, view, 0, "key", "value", true)

		// Appending to a returned value never changes the stored one.
		got, _, err := b.Get(0, []byte("key"))
		if err != nil {
			t.Fatal(err)
		}
		_ = append(got, "!!!"...)
		checkGet(t, b, 0, "key", "VALUE", true)
		checkGet(t, view, 0, "key", "value", true)
	})
}

func TestKeyGroupBounds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		for _, kg := range []int32{-1, MaxKeyGroups, MaxKeyGroups + 1, -1 << 31} {
			if err := b.Put(kg, []byte("k"), []byte("v")); !errors.Is(err, ErrKeyGroupRange) {
				t.Errorf("Put(%d) = %v; want ErrKeyGroupRange", kg, err)
			}
			if _, _, err := b.Get(kg, []byte("k")); !errors.Is(err, ErrKeyGroupRange) {
				t.Errorf("Get(%d) = %v; want ErrKeyGroupRange", kg, err)
			}
			if err := b.Delete(kg, []byte("k")); !errors.Is(err, ErrKeyGroupRange) {
				t.Errorf("Delete(%d) = %v; want ErrKeyGroupRange", kg, err)
			}
		}
		view := mustSnapshot(t, b)
		defer view.Release()
		if _, _, err := view.Get(MaxKeyGroups, nil); !errors.Is(err, ErrKeyGroupRange) {
			t.Errorf("View.Get(%d) = %v; want ErrKeyGroupRange", MaxKeyGroups, err)
		}
		for _, r := range [][2]int32{{-1, 3}, {5, 4}, {0, MaxKeyGroups + 1}} {
			if err := b.DropRange(r[0], r[1]); !errors.Is(err, ErrKeyGroupRange) {
				t.Errorf("DropRange(%d, %d) = %v; want ErrKeyGroupRange", r[0], r[1], err)
			}
			err := view.Range(r[0], r[1], func(int32, []byte, []byte) error { return nil })
			if !errors.Is(err, ErrKeyGroupRange) {
				t.Errorf("Range(%d, %d) = %v; want ErrKeyGroupRange", r[0], r[1], err)
			}
		}
	})
}

func TestDropRange(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		m := model{}
		for _, kg := range []int32{0, 1, 2, 3, 4, 5, 6, 7, 8, 100, MaxKeyGroups - 1} {
			for _, k := range []string{"", "a", "\xff"} {
				v := fmt.Sprintf("%d/%q", kg, k)
				mustPut(t, b, kg, k, v)
				m.put(kg, k, v)
			}
		}
		for _, r := range [][2]int32{
			{3, 7}, {5, 5}, {5, 6}, {0, 1}, {MaxKeyGroups - 1, MaxKeyGroups}, {101, 200},
		} {
			if err := b.DropRange(r[0], r[1]); err != nil {
				t.Fatalf("DropRange(%d, %d): %v", r[0], r[1], err)
			}
			m.dropRange(r[0], r[1])
			checkBackend(t, b, m)
		}
		// A dropped key group takes writes again.
		mustPut(t, b, 4, "a", "back")
		m.put(4, "a", "back")
		checkBackend(t, b, m)

		if err := b.DropRange(0, MaxKeyGroups); err != nil {
			t.Fatal(err)
		}
		checkBackend(t, b, model{})
	})
}

func TestRangeOrderAndBounds(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		m := model{}
		kgs := []int32{MaxKeyGroups - 1, 100, 2, 1, 0, 255, 256}
		keys := []string{"b", "\xff\xff", "a", "", "ab", "\x00", "aa", "\x80"}
		// Insert in an order that is neither key-group nor key order.
		for i, kg := range kgs {
			for j := range keys {
				k := keys[(i+j)%len(keys)]
				mustPut(t, b, kg, k, k+"@"+fmt.Sprint(kg))
				m.put(kg, k, k+"@"+fmt.Sprint(kg))
			}
		}
		view := mustSnapshot(t, b)
		defer view.Release()
		for _, r := range [][2]int32{
			{0, MaxKeyGroups}, {0, 1}, {1, 100}, {1, 101}, {2, 3}, {3, 100}, {5, 5},
			{255, 256}, {255, 257}, {MaxKeyGroups - 1, MaxKeyGroups}, {101, MaxKeyGroups - 1},
		} {
			got := collect(t, view, r[0], r[1])
			if want := m.entries(r[0], r[1]); !slices.Equal(got, want) {
				t.Errorf("Range(%d, %d) =\n%v\nwant\n%v", r[0], r[1], got, want)
			}
		}

		// fn's error stops the iteration and is returned as is.
		stop := errors.New("stop")
		calls := 0
		err := view.Range(0, MaxKeyGroups, func(int32, []byte, []byte) error {
			calls++
			if calls == 3 {
				return stop
			}
			return nil
		})
		if err != stop || calls != 3 {
			t.Errorf("Range with fn failing on call 3 = %v after %d calls; want %v after 3", err, calls, stop)
		}
	})
}

func TestSnapshotIsolation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		m := model{}
		for kg := int32(0); kg < 4; kg++ {
			for _, k := range []string{"a", "b", "c"} {
				mustPut(t, b, kg, k, k+"0")
				m.put(kg, k, k+"0")
			}
		}
		first := mustSnapshot(t, b)
		defer first.Release()
		before := m.clone()

		mustPut(t, b, 0, "a", "a1") // overwrite
		m.put(0, "a", "a1")
		mustPut(t, b, 0, "d", "d1") // new key
		m.put(0, "d", "d1")
		mustDelete(t, b, 1, "b") // delete
		m.delete(1, "b")
		mustPut(t, b, 9, "n", "n1") // new key group
		m.put(9, "n", "n1")
		if err := b.DropRange(2, 4); err != nil {
			t.Fatal(err)
		}
		m.dropRange(2, 4)

		checkView(t, first, before)
		checkBackend(t, b, m)
		second := mustSnapshot(t, b)
		defer second.Release()
		checkView(t, second, m)

		// Writes after the second snapshot change neither view.
		mustPut(t, b, 2, "c", "c2")
		mustDelete(t, b, 0, "a")
		checkView(t, first, before)
		checkView(t, second, m)
	})
}

func TestManySnapshots(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		const n = 30
		m := model{}
		views := make([]View, n)
		wants := make([]model, n)
		for i := range n {
			kg := int32(i % 4)
			mustPut(t, b, kg, fmt.Sprint(i%7), fmt.Sprint(i))
			m.put(kg, fmt.Sprint(i%7), fmt.Sprint(i))
			if i%5 == 4 {
				mustDelete(t, b, int32((i+1)%4), fmt.Sprint((i+3)%7))
				m.delete(int32((i+1)%4), fmt.Sprint((i+3)%7))
			}
			if i%11 == 10 {
				if err := b.DropRange(kg, kg+1); err != nil {
					t.Fatal(err)
				}
				m.dropRange(kg, kg+1)
			}
			views[i] = mustSnapshot(t, b)
			wants[i] = m.clone()
		}
		// Release every other view first, and check the rest still hold.
		for i := 0; i < n; i += 2 {
			views[i].Release()
		}
		mustPut(t, b, 0, "after", "x")
		for i := 1; i < n; i += 2 {
			checkView(t, views[i], wants[i])
			views[i].Release()
		}
	})
}

func TestRelease(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		mustPut(t, b, 0, "k", "v")
		view := mustSnapshot(t, b)
		view.Release()
		view.Release() // harmless
		if _, _, err := view.Get(0, []byte("k")); !errors.Is(err, ErrReleased) {
			t.Errorf("Get after Release = %v; want ErrReleased", err)
		}
		err := view.Range(0, MaxKeyGroups, func(int32, []byte, []byte) error { return nil })
		if !errors.Is(err, ErrReleased) {
			t.Errorf("Range after Release = %v; want ErrReleased", err)
		}
		// Writes after the last view is released are seen by new views.
		mustPut(t, b, 0, "k", "w")
		checkBackend(t, b, model{0: {"k": "w"}})
	})
}

func TestClose(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		mustPut(t, b, 3, "k", "v")
		open := mustSnapshot(t, b)
		if err := b.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := b.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := b.Put(3, []byte("k"), nil); !errors.Is(err, ErrClosed) {
			t.Errorf("Put after Close = %v; want ErrClosed", err)
		}
		if _, _, err := b.Get(3, []byte("k")); !errors.Is(err, ErrClosed) {
			t.Errorf("Get after Close = %v; want ErrClosed", err)
		}
		if err := b.Delete(3, []byte("k")); !errors.Is(err, ErrClosed) {
			t.Errorf("Delete after Close = %v; want ErrClosed", err)
		}
		if err := b.DropRange(0, 1); !errors.Is(err, ErrClosed) {
			t.Errorf("DropRange after Close = %v; want ErrClosed", err)
		}
		if _, err := b.Snapshot(); !errors.Is(err, ErrClosed) {
			t.Errorf("Snapshot after Close = %v; want ErrClosed", err)
		}
		// A view left open across Close stays readable until released.
		checkView(t, open, model{3: {"k": "v"}})
		open.Release()
		open.Release()
	})
}

// TestConcurrentRange reads views from another goroutine while the writer
// keeps writing; run it with -race.
func TestConcurrentRange(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b Backend) {
		type job struct {
			view View
			want model
		}
		jobs := make(chan job, 4)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				got := make(model)
				err := j.view.Range(0, MaxKeyGroups, func(kg int32, key, value []byte) error {
					got.put(kg, string(key), string(value))
					return nil
				})
				if err != nil {
					t.Errorf("Range: %v", err)
				} else if !maps.EqualFunc(got, j.want, maps.Equal) {
					t.Errorf("view changed under the writer:\n got %v\nwant %v", got, j.want)
				}
				wantV, wantOK := j.want[1]["k3"]
				if v, ok, err := j.view.Get(1, []byte("k3")); err != nil || ok != wantOK || string(v) != wantV {
					t.Errorf("Get(1, k3) = %q, %t, %v; want %q, %t", v, ok, err, wantV, wantOK)
				}
				j.view.Release()
			}
		}()

		m := model{}
		for i := range 3000 {
			kg := int32(i % 8)
			k := fmt.Sprintf("k%d", i%40)
			switch {
			case i%97 == 0:
				if err := b.DropRange(kg, kg+2); err != nil {
					t.Fatal(err)
				}
				m.dropRange(kg, kg+2)
			case i%7 == 0:
				mustDelete(t, b, kg, k)
				m.delete(kg, k)
			default:
				v := fmt.Sprintf("v%d", i)
				mustPut(t, b, kg, k, v)
				m.put(kg, k, v)
			}
			if i%150 == 0 {
				jobs <- job{mustSnapshot(t, b), m.clone()}
			}
		}
		close(jobs)
		wg.Wait()
		checkBackend(t, b, m)
	})
}
