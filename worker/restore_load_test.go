package worker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/worker/state"
)

// restoreEntry is one key of a backend, as View.Range reports it.
type restoreEntry struct {
	kg         int32
	key, value string
}

// fileChain writes a chain of state files for the key groups [start, end)
// into the cache directory of a restoreSource and returns their handles and
// the live entries the chain holds, in order: a full file of about keys
// keys, then deltas that overwrite and delete some of them (tombstones) and
// add new ones. Keys are binary, some values empty, a few large.
func fileChain(t *testing.T, cache, name string, start, end int32, keys int, seed uint64) ([]*transport.StateFile, []restoreEntry) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	type gk struct {
		kg  int32
		key string
	}
	live := map[gk]string{}
	var files []*transport.StateFile
	for i := range 3 {
		kind, n := statefile.Delta, keys/10
		if i == 0 {
			kind, n = statefile.Full, keys
		}
		changes := map[gk]*string{} // nil: a tombstone
		existing := make([]gk, 0, len(live))
		for k := range live {
			existing = append(existing, k)
		}
		slices.SortFunc(existing, func(a, b gk) int {
			if a.kg != b.kg {
				return int(a.kg - b.kg)
			}
			return bytes.Compare([]byte(a.key), []byte(b.key))
		})
		for range n {
			var k gk
			if len(existing) > 0 && rng.IntN(2) == 0 {
				k = existing[rng.IntN(len(existing))]
			} else {
				key := binary.BigEndian.AppendUint64(nil, rng.Uint64())[:1+rng.IntN(8)]
				k = gk{start + rng.Int32N(end-start), string(key)}
			}
			if kind == statefile.Delta && rng.IntN(3) == 0 {
				changes[k] = nil
				continue
			}
			var v string
			switch rng.IntN(100) {
			case 0: // empty
			case 1:
				v = string(bytes.Repeat([]byte{byte(rng.Uint32())}, 64<<10))
			default:
				v = fmt.Sprintf("%d-%d", i, rng.Uint32())
			}
			changes[k] = &v
		}
		order := make([]gk, 0, len(changes))
		for k := range changes {
			order = append(order, k)
		}
		slices.SortFunc(order, func(a, b gk) int {
			if a.kg != b.kg {
				return int(a.kg - b.kg)
			}
			return bytes.Compare([]byte(a.key), []byte(b.key))
		})
		var buf bytes.Buffer
		w, err := statefile.NewWriter(&buf, kind)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range order {
			if v := changes[k]; v == nil {
				err = w.Delete(k.kg, []byte(k.key))
				delete(live, k)
			} else {
				err = w.Add(k.kg, []byte(k.key), []byte(*v))
				live[k] = *v
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if _, err := w.Close(); err != nil {
			t.Fatal(err)
		}
		path := fmt.Sprintf("checkpoints/job/chk-%d/%s-%d.cfs", i+1, name, i)
		local := filepath.Join(cache, filepath.FromSlash(path))
		if err := os.MkdirAll(filepath.Dir(local), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(local, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(buf.Bytes())
		files = append(files, &transport.StateFile{
			Path: path, Size: int64(buf.Len()), Sha256: hex.EncodeToString(sum[:]),
			KeyGroupStart: start, KeyGroupEnd: end, Full: kind == statefile.Full,
		})
	}
	var out []restoreEntry
	for k, v := range live {
		out = append(out, restoreEntry{k.kg, k.key, v})
	}
	slices.SortFunc(out, func(a, b restoreEntry) int {
		if a.kg != b.kg {
			return int(a.kg - b.kg)
		}
		return bytes.Compare([]byte(a.key), []byte(b.key))
	})
	return files, out
}

// backendEntries returns every key of b, in Range order.
func backendEntries(t *testing.T, b state.Backend) []restoreEntry {
	t.Helper()
	v, err := b.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer v.Release()
	var out []restoreEntry
	err = v.Range(0, state.MaxKeyGroups, func(kg int32, key, value []byte) error {
		out = append(out, restoreEntry{kg, string(key), string(value)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// countingDisk is a disk backend that counts the bulk loads it began, so a
// test sees which restores took that path.
type countingDisk struct {
	*state.Disk
	loads int
}

// Load is state.Disk.Load, counted when it succeeds.
func (d *countingDisk) Load(start, end int32) (*state.Loader, error) {
	l, err := d.Disk.Load(start, end)
	if err == nil {
		d.loads++
	}
	return l, err
}

// openRestoreDisk opens a disk backend that the test closes at its end.
func openRestoreDisk(t *testing.T) *countingDisk {
	t.Helper()
	d, err := state.OpenDisk(t.TempDir(), state.DiskOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return &countingDisk{Disk: d}
}

// inRange returns the entries of es in the key groups [start, end).
func inRange(es []restoreEntry, start, end int32) []restoreEntry {
	var out []restoreEntry
	for _, e := range es {
		if start <= e.kg && e.kg < end {
			out = append(out, e)
		}
	}
	return out
}

// TestRestoreBlobDisk restores chains of state files into the disk backend,
// which bulk loads them, and into the memory backend, which Puts them, and
// checks both hold exactly the chains' state: a whole task's chain, a
// restore at another parallelism (two old tasks' chains, a part of each),
// and blobs whose key groups overlap, where the second falls back to Put.
func TestRestoreBlobDisk(t *testing.T) {
	cache := t.TempDir()
	filesA, liveA := fileChain(t, cache, "map-0", 0, 64, 3*restoreLoadMin, 1)
	filesB, liveB := fileChain(t, cache, "map-1", 64, 128, 3*restoreLoadMin, 2)
	blobA := &transport.KeyedBlob{TaskId: "map-0", Files: filesA, KeyGroupStart: 0, KeyGroupEnd: 64}
	blobB := &transport.KeyedBlob{TaskId: "map-1", Files: filesB, KeyGroupStart: 64, KeyGroupEnd: 128}
	all := append(slices.Clone(liveA), liveB...)

	for _, tc := range []struct {
		name       string
		blobs      []*transport.KeyedBlob
		start, end int32
		want       []restoreEntry
		loads      int // bulk loads on the disk backend
	}{
		{"whole task", []*transport.KeyedBlob{blobA}, 0, 64, liveA, 1},
		{"two tasks into one", []*transport.KeyedBlob{blobA, blobB}, 0, 128, all, 2},
		{"other parallelism", []*transport.KeyedBlob{blobA, blobB}, 21, 85, inRange(all, 21, 85), 2},
		// The second blob claims every key group (no end), so its load
		// meets the first one's keys and Puts.
		{"overlapping blobs", []*transport.KeyedBlob{blobB, {TaskId: "map-0", Files: filesA}}, 0, 128, all, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if len(tc.want) < restoreLoadMin {
				t.Fatalf("%d keys: the test wants more than restoreLoadMin", len(tc.want))
			}
			mem := state.NewMemory()
			defer mem.Close()
			disk := openRestoreDisk(t)
			for _, b := range []state.Backend{mem, disk} {
				src := &restoreSource{cache: cache}
				var keys int64
				for _, blob := range tc.blobs {
					n, err := src.restoreBlob(context.Background(), blob, b, tc.start, tc.end)
					if err != nil {
						t.Fatalf("%T: restoreBlob %s: %v", b, blob.GetTaskId(), err)
					}
					keys += n
				}
				got := backendEntries(t, b)
				if !slices.Equal(got, tc.want) {
					t.Fatalf("%T: restored %d keys, want %d (first difference at %d)", b, len(got), len(tc.want), firstDiff(got, tc.want))
				}
				if keys != int64(len(tc.want)) {
					t.Errorf("%T: restoreBlob counted %d keys, want %d", b, keys, len(tc.want))
				}
				if src.local == 0 || src.remote != 0 {
					t.Errorf("%T: %d files read locally, %d remotely; want all local", b, src.local, src.remote)
				}
			}
			if disk.loads != tc.loads {
				t.Errorf("%d bulk loads on the disk backend, want %d", disk.loads, tc.loads)
			}
		})
	}
}

// firstDiff returns the index of the first entry where a and b differ.
func firstDiff[T comparable](a, b []T) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestRestoreBlobDiskCancelled cancels a bulk-loading restore midway, as a
// superseded task is: the restore returns the context's error and leaves the
// backend's range empty, so it holds no half-restored state.
func TestRestoreBlobDiskCancelled(t *testing.T) {
	cache := t.TempDir()
	files, live := fileChain(t, cache, "map-0", 0, 64, 4*restoreCheckEvery, 3)
	if len(live) < 3*restoreCheckEvery {
		t.Fatalf("%d keys: the test wants a cancel after %d", len(live), 2*restoreCheckEvery)
	}
	disk := openRestoreDisk(t)
	if err := disk.Put(100, []byte("other"), []byte("task")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := &restoreSource{cache: cache, progress: func(keys int64) {
		if keys >= 2*restoreCheckEvery {
			cancel()
		}
	}}
	blob := &transport.KeyedBlob{TaskId: "map-0", Files: files, KeyGroupStart: 0, KeyGroupEnd: 64}
	if _, err := src.restoreBlob(ctx, blob, disk, 0, 128); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled restore = %v; want context.Canceled", err)
	}
	if got, want := backendEntries(t, disk), []restoreEntry{{100, "other", "task"}}; !slices.Equal(got, want) {
		t.Fatalf("after a cancelled restore the backend holds %d keys, want only %v", len(got), want)
	}
	// The next attempt restores the same range.
	src = &restoreSource{cache: cache}
	n, err := src.restoreBlob(context.Background(), blob, disk, 0, 128)
	if err != nil || n != int64(len(live)) {
		t.Fatalf("restore after the cancelled one = %d keys, %v; want %d", n, err, len(live))
	}
	if got := backendEntries(t, disk); !slices.Equal(got[:len(got)-1], live) {
		t.Fatalf("restored %d keys, want %d", len(got)-1, len(live))
	}
	if disk.loads != 2 {
		t.Errorf("%d bulk loads, want 2", disk.loads)
	}
}

// BenchmarkRestoreBlobDisk restores one full state file of 1M keys with
// 100-byte values in 128 key groups, read from the local cache as local
// recovery does, into a fresh disk backend: with one Put per key (the
// backend's Load hidden) and with a bulk load. It is BenchmarkRestoreDisk of
// worker/state with the reading and merging of the file added.
func BenchmarkRestoreBlobDisk(b *testing.B) {
	const keys = 1_000_000
	cache := b.TempDir()
	var buf bytes.Buffer
	w, err := statefile.NewWriter(&buf, statefile.Full)
	if err != nil {
		b.Fatal(err)
	}
	value := make([]byte, 100)
	for i := range keys {
		kg := int32(i * 128 / keys)
		key := fmt.Appendf(nil, "k%09d", i)
		copy(value, key)
		if err := w.Add(kg, key, value); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := w.Close(); err != nil {
		b.Fatal(err)
	}
	path := "checkpoints/job/chk-1/map-0-a0-full.cfs"
	if err := os.MkdirAll(filepath.Join(cache, "checkpoints/job/chk-1"), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cache, filepath.FromSlash(path)), buf.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	sum := sha256.Sum256(buf.Bytes())
	blob := &transport.KeyedBlob{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128, Files: []*transport.StateFile{{
		Path: path, Size: int64(buf.Len()), Sha256: hex.EncodeToString(sum[:]), KeyGroupStart: 0, KeyGroupEnd: 128, Full: true,
	}}}
	for _, mode := range []string{"put", "load"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				d, err := state.OpenDisk(b.TempDir(), state.DiskOptions{})
				if err != nil {
					b.Fatal(err)
				}
				var backend state.Backend = d
				if mode == "put" {
					backend = struct{ state.Backend }{d} // no Load
				}
				b.StartTimer()
				n, err := (&restoreSource{cache: cache}).restoreBlob(context.Background(), blob, backend, 0, 128)
				b.StopTimer()
				if err != nil || n != keys {
					b.Fatalf("restoreBlob = %d keys, %v", n, err)
				}
				if err := d.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/keys, "ns/key")
		})
	}
}
