package state

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"

	"github.com/coordflow/coordflow/transport/statefile"
)

// openTestDisk opens a Disk on fs with the contract tests' small memtable
// and, if tableSize > 0, tables of tableSize bytes for its Loaders.
func openTestDisk(t testing.TB, fs vfs.FS, tableSize int) *Disk {
	t.Helper()
	d, err := openDisk(t.TempDir(), DiskOptions{MemTableSize: 256 << 10, CacheSize: 1 << 20}, fs)
	if err != nil {
		t.Fatalf("OpenDisk: %v", err)
	}
	if tableSize > 0 {
		d.loadTableSize = tableSize
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

// addAll adds es to l through two buffers it reuses, as statefile.Merge
// does, so that a Loader keeping a caller's slice would be caught.
func addAll(l *Loader, es []entry) error {
	var key, value []byte
	for _, e := range es {
		key = append(key[:0], e.key...)
		value = append(value[:0], e.value...)
		if err := l.Add(e.kg, key, value); err != nil {
			return err
		}
	}
	return nil
}

// mustLoad bulk-loads es into the key groups [start, end) of d and returns
// how many tables the load wrote.
func mustLoad(t testing.TB, d *Disk, start, end int32, es []entry) int {
	t.Helper()
	l, err := d.Load(start, end)
	if err != nil {
		t.Fatalf("Load(%d, %d): %v", start, end, err)
	}
	if err := addAll(l, es); err != nil {
		t.Fatalf("Add: %v", err)
	}
	if got := l.Keys(); got != int64(len(es)) {
		t.Errorf("Keys() = %d after adding %d", got, len(es))
	}
	if err := l.Finish(); err != nil {
		t.Fatalf("Finish: %v", err)
	}
	return l.tables
}

// checkNoLoadFiles fails t if a Loader left its directory behind.
func checkNoLoadFiles(t testing.TB, d *Disk) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(d.dir, loadDir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left behind: stat: %v", loadDir, err)
	}
}

// loadModel returns a model of what a restore loads: keys in key groups
// 0, 1, 255, 256 (the big-endian prefix changes its last two bytes there),
// 1000 and MaxKeyGroups-1, binary keys among them, empty and large values.
func loadModel(rng *rand.Rand, perGroup int) model {
	m := model{}
	for _, kg := range []int32{0, 1, 255, 256, 1000, MaxKeyGroups - 1} {
		for i, s := range binaryStrings() {
			m.put(kg, s, binaryStrings()[(i+int(kg))%len(binaryStrings())])
		}
		for i := range perGroup {
			k := make([]byte, 1+rng.IntN(24))
			for j := range k {
				k[j] = byte(rng.Uint32())
			}
			var v []byte
			switch i % 100 {
			case 0, 50: // empty value
			case 1:
				v = bytes.Repeat([]byte{byte(i)}, 64<<10) // larger than a table
			default:
				v = fmt.Appendf(nil, "%d/%x", kg, k)
			}
			m.put(kg, string(k), string(v))
		}
	}
	return m
}

// TestLoadMatchesPut loads the same state by bulk load and by Put, with
// tables small enough that the load writes many, and checks that both
// backends, their views and later writes agree with the model.
func TestLoadMatchesPut(t *testing.T) {
	m := loadModel(rand.New(rand.NewPCG(1, 1)), 300)
	es := m.entries(0, MaxKeyGroups)

	loaded := openTestDisk(t, vfs.Default, 2<<10)
	if n := mustLoad(t, loaded, 0, MaxKeyGroups, es); n < 40 {
		t.Errorf("bulk load wrote %d tables; the test wants many", n)
	}
	checkNoLoadFiles(t, loaded)
	for _, bc := range backendCases() {
		t.Run("put/"+bc.name, func(t *testing.T) {
			b := bc.open(t)
			for _, e := range es {
				mustPut(t, b, e.kg, e.key, e.value)
			}
			checkBackend(t, b, m)
		})
	}
	checkBackend(t, loaded, m)
	view := mustSnapshot(t, loaded)
	defer view.Release()
	for _, r := range [][2]int32{{0, 1}, {1, 256}, {255, 257}, {2, 1000}, {1000, MaxKeyGroups}} {
		if got, want := collect(t, view, r[0], r[1]), m.entries(r[0], r[1]); !slices.Equal(got, want) {
			t.Errorf("Range(%d, %d) after a bulk load: %d entries, want %d", r[0], r[1], len(got), len(want))
		}
	}

	// The loaded state takes writes like any other, the view keeps its own.
	before := m.clone()
	mustPut(t, loaded, 256, es[len(es)/2].key, "over")
	mustDelete(t, loaded, 0, "")
	mustPut(t, loaded, 7, "new", "key group")
	if err := loaded.DropRange(1000, 1001); err != nil {
		t.Fatal(err)
	}
	m.put(256, es[len(es)/2].key, "over")
	m.delete(0, "")
	m.put(7, "new", "key group")
	m.dropRange(1000, 1001)
	checkBackend(t, loaded, m)
	checkView(t, view, before)
}

// TestLoadSubRange is a restore at another parallelism: a task loads the
// key groups of one old task's state, then those of another, into one
// backend, each a sub-range of its own.
func TestLoadSubRange(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 4<<10)
	m := loadModel(rand.New(rand.NewPCG(2, 2)), 100)
	// The backend already holds key groups [0, 256), loaded by Put.
	for _, e := range m.entries(0, 256) {
		mustPut(t, d, e.kg, e.key, e.value)
	}
	mustLoad(t, d, 1000, MaxKeyGroups, m.entries(1000, MaxKeyGroups))
	mustLoad(t, d, 256, 1000, m.entries(256, 1000))
	checkBackend(t, d, m)
	checkNoLoadFiles(t, d)

	// A range that holds a key is refused, so the caller Puts instead.
	for _, r := range [][2]int32{{0, 1}, {100, 300}, {MaxKeyGroups - 1, MaxKeyGroups}, {0, MaxKeyGroups}} {
		if l, err := d.Load(r[0], r[1]); !errors.Is(err, ErrRangeNotEmpty) {
			if l != nil {
				_ = l.Abort()
			}
			t.Errorf("Load(%d, %d) of a range with keys = %v; want ErrRangeNotEmpty", r[0], r[1], err)
		}
	}
	// Ranges without keys, dropped or never written, are loadable.
	if err := d.DropRange(1000, MaxKeyGroups); err != nil {
		t.Fatal(err)
	}
	mustLoad(t, d, 1000, 2000, []entry{{1000, "a", "b"}, {1999, "c", "d"}})
	mustLoad(t, d, 2, 255, nil)
	mustLoad(t, d, 5, 5, nil)
	m.dropRange(1000, MaxKeyGroups)
	m.put(1000, "a", "b")
	m.put(1999, "c", "d")
	checkBackend(t, d, m)

	// An entry outside the Loader's range is an error, and nothing stays.
	l, err := d.Load(2000, 3000)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Add(2000, []byte("in"), nil); err != nil {
		t.Fatal(err)
	}
	if err := l.Add(3000, []byte("out"), nil); !errors.Is(err, ErrKeyGroupRange) {
		t.Errorf("Add outside the range = %v; want ErrKeyGroupRange", err)
	}
	if err := l.Finish(); !errors.Is(err, ErrKeyGroupRange) {
		t.Errorf("Finish after a failed Add = %v; want the Add's error", err)
	}
	checkBackend(t, d, m)
	checkNoLoadFiles(t, d)
}

// TestLoadOrder checks that entries out of (key group, key) order are
// refused with an error, and that what a state file merge gives is in the
// order Pebble sorts the disk backend's keys.
func TestLoadOrder(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	for _, es := range [][]entry{
		{{1, "b", ""}, {1, "a", ""}},
		{{1, "a", ""}, {1, "a", "again"}},
		{{2, "", ""}, {1, "\xff", ""}},
		{{1, "a\x00", ""}, {1, "a", ""}},
	} {
		l, err := d.Load(0, 10)
		if err != nil {
			t.Fatal(err)
		}
		err = addAll(l, es)
		if !errors.Is(err, ErrLoadOrder) {
			t.Errorf("adding %v = %v; want ErrLoadOrder", es, err)
		}
		if err := l.Add(5, []byte("later"), nil); !errors.Is(err, ErrLoaderDone) {
			t.Errorf("Add after a failed Add = %v; want ErrLoaderDone", err)
		}
		if err := l.Abort(); err != nil {
			t.Errorf("Abort: %v", err)
		}
		if err := l.Finish(); !errors.Is(err, ErrLoaderDone) {
			t.Errorf("Finish after Abort = %v; want ErrLoaderDone", err)
		}
	}
	checkBackend(t, d, model{})
	// Across key groups only the key group counts: a long key of key group
	// 1 comes before the empty key of key group 2.
	mustLoad(t, d, 0, 300, []entry{{1, "\xff\xff\xff", "x"}, {2, "", "y"}, {255, "", ""}, {256, "\x00", ""}})
	checkBackend(t, d, model{1: {"\xff\xff\xff": "x"}, 2: {"": "y"}, 255: {"": ""}, 256: {"\x00": ""}})
}

// TestMergeOrderIsPebbleOrder merges random chains of state files (a full
// file and deltas with tombstones, binary keys, key groups around byte
// boundaries) and checks that the merge gives the disk backend's encoded
// keys in strictly increasing order of Pebble's comparer, the order a bulk
// load needs, and that a bulk load of it holds the chain's state.
func TestMergeOrderIsPebbleOrder(t *testing.T) {
	kgs := []int32{0, 1, 127, 128, 255, 256, 257, 65 << 8, MaxKeyGroups - 1}
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 7))
		want := model{}
		var sources []statefile.Source
		for file := range 4 {
			kind := statefile.Delta
			if file == 0 {
				kind = statefile.Full
			}
			// A file's entries, sorted as a state file needs them.
			fm := model{}
			tomb := map[[2]string]bool{}
			for range 200 {
				kg := kgs[rng.IntN(len(kgs))]
				k := make([]byte, rng.IntN(4))
				for i := range k {
					k[i] = []byte{0x00, 0x01, 'a', 0x7f, 0x80, 0xff}[rng.IntN(6)]
				}
				if kind == statefile.Delta && rng.IntN(3) == 0 {
					fm.put(kg, string(k), "")
					tomb[[2]string{fmt.Sprint(kg), string(k)}] = true
					continue
				}
				delete(tomb, [2]string{fmt.Sprint(kg), string(k)})
				fm.put(kg, string(k), fmt.Sprintf("f%d-%d", file, rng.IntN(100)))
			}
			var buf bytes.Buffer
			w, err := statefile.NewWriter(&buf, kind)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range fm.entries(0, MaxKeyGroups) {
				if tomb[[2]string{fmt.Sprint(e.kg), e.key}] {
					err = w.Delete(e.kg, []byte(e.key))
					want.delete(e.kg, e.key)
				} else {
					err = w.Add(e.kg, []byte(e.key), []byte(e.value))
					want.put(e.kg, e.key, e.value)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if _, err := w.Close(); err != nil {
				t.Fatal(err)
			}
			rd, err := statefile.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
			if err != nil {
				t.Fatal(err)
			}
			sources = append(sources, rd)
		}

		for _, r := range [][2]int32{{0, MaxKeyGroups}, {1, 256}, {128, 257}} {
			var prev []byte
			n := 0
			err := statefile.Merge(sources, r[0], r[1], func(kg int32, key, _ []byte) error {
				k := appendKey(nil, kg, key)
				if n > 0 && pebble.DefaultComparer.Compare(prev, k) >= 0 {
					return fmt.Errorf("entry %d: %x not after %x", n, k, prev)
				}
				prev, n = k, n+1
				return nil
			})
			if err != nil {
				t.Fatalf("seed %d, range %v: %v", seed, r, err)
			}
			if wantN := len(want.entries(r[0], r[1])); n != wantN {
				t.Fatalf("seed %d, range %v: merge gave %d entries, want %d", seed, r, n, wantN)
			}
		}

		d := openTestDisk(t, vfs.Default, 1<<10)
		l, err := d.Load(0, MaxKeyGroups)
		if err != nil {
			t.Fatal(err)
		}
		if err := statefile.Merge(sources, 0, MaxKeyGroups, l.Add); err != nil {
			t.Fatalf("seed %d: merge into a bulk load: %v", seed, err)
		}
		if err := l.Finish(); err != nil {
			t.Fatal(err)
		}
		checkBackend(t, d, want)
	}
}

// TestLoadAbort gives a load up halfway, after several tables were
// ingested, as a cancelled restore does: the range is empty again, the files
// are gone, and the range can be loaded again.
func TestLoadAbort(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 4<<10)
	m := loadModel(rand.New(rand.NewPCG(3, 3)), 200)
	es := m.entries(0, MaxKeyGroups)
	mustPut(t, d, MaxKeyGroups-1, "outside", "the range")

	l, err := d.Load(0, MaxKeyGroups-1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Load(0, 1); err == nil {
		t.Error("a second Load while one is under way succeeded")
	}
	half := es[:len(es)/2]
	if err := addAll(l, half); err != nil {
		t.Fatal(err)
	}
	if l.tables < 5 {
		t.Fatalf("%d tables after half the load; the test wants some ingested", l.tables)
	}
	if err := l.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	if err := l.Abort(); err != nil {
		t.Errorf("second Abort: %v", err)
	}
	checkBackend(t, d, model{MaxKeyGroups - 1: {"outside": "the range"}})
	checkNoLoadFiles(t, d)

	want := m.clone()
	want.dropRange(MaxKeyGroups-1, MaxKeyGroups)
	mustLoad(t, d, 0, MaxKeyGroups-1, want.entries(0, MaxKeyGroups))
	want.put(MaxKeyGroups-1, "outside", "the range")
	checkBackend(t, d, want)
}

// TestLoadFullDisk fails the bulk load's writes as a full disk does, at
// each step of it, and checks that the error names the step, the directory
// and the cause, that nothing was loaded and no file was left, and that the
// backend still works.
func TestLoadFullDisk(t *testing.T) {
	for _, step := range []string{"create", "write", "sync", "ingest"} {
		t.Run(step, func(t *testing.T) {
			var full atomic.Bool
			fs := errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
				if !full.Load() {
					return nil
				}
				inLoadDir := strings.Contains(op.Path, string(filepath.Separator)+loadDir+string(filepath.Separator))
				switch {
				case step == "create" && inLoadDir && op.Kind == errorfs.OpCreate,
					step == "write" && inLoadDir && op.Kind == errorfs.OpFileWrite,
					step == "sync" && inLoadDir && op.Kind == errorfs.OpFileSync,
					// Ingestion links the table into the database, or
					// copies it if it cannot.
					step == "ingest" && op.Kind == errorfs.OpLink,
					step == "ingest" && !inLoadDir && strings.HasSuffix(op.Path, ".sst") && op.Kind == errorfs.OpCreate:
					return syscall.ENOSPC
				}
				return nil
			}))
			d := openTestDisk(t, fs, 16<<10)
			m := loadModel(rand.New(rand.NewPCG(4, 4)), 100)
			es := m.entries(0, MaxKeyGroups)
			l, err := d.Load(0, MaxKeyGroups)
			if err != nil {
				t.Fatal(err)
			}
			// Some tables go in before the disk fills up.
			if err := addAll(l, es[:len(es)/3]); err != nil {
				t.Fatal(err)
			}
			full.Store(true)
			err = addAll(l, es[len(es)/3:])
			if err == nil {
				err = l.Finish()
			} else if ferr := l.Finish(); ferr == nil {
				t.Error("Finish after a failed Add succeeded")
			}
			if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "bulk load") || !strings.Contains(err.Error(), d.dir) {
				t.Fatalf("load onto a full disk = %v; want ENOSPC, naming the bulk load and %s", err, d.dir)
			}
			t.Logf("load onto a full disk: %v", err)
			full.Store(false)
			checkBackend(t, d, model{})
			checkNoLoadFiles(t, d)
			mustPut(t, d, 1, "after", "the failure")
			checkBackend(t, d, model{1: {"after": "the failure"}})
		})
	}
}

// TestLoadClosed checks that a closed backend refuses to load, and that a
// Loader whose backend was closed under it fails instead of panicking.
func TestLoadClosed(t *testing.T) {
	d, err := OpenDisk(t.TempDir(), DiskOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := d.Load(0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Add(1, []byte("k"), []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Finish(); !errors.Is(err, ErrClosed) {
		t.Errorf("Finish after Close = %v; want ErrClosed", err)
	}
	if _, err := d.Load(0, 10); !errors.Is(err, ErrClosed) {
		t.Errorf("Load after Close = %v; want ErrClosed", err)
	}
}
