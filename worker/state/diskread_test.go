package state

import (
	"fmt"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// flushAll ends the current generation of writes and waits until every
// generation is flushed, as the fast read path sees it: from then on every
// Get takes the fast path.
func flushAll(t *testing.T, d *Disk) {
	t.Helper()
	if err := d.endGeneration(len(d.reads.gens) > 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.reads.dropFlushed()
		if len(d.reads.gens) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d generations of writes still not flushed after 30s", len(d.reads.gens))
		}
		time.Sleep(time.Millisecond)
	}
}

// checkPaths runs check and fails t unless its Gets took fast Gets of the
// fast path and slow of Pebble's.
func checkPaths(t *testing.T, d *Disk, what string, fast, slow int64, check func()) {
	t.Helper()
	f0, s0 := d.reads.fast, d.reads.slow
	check()
	if f, s := d.reads.fast-f0, d.reads.slow-s0; f != fast || s != slow {
		t.Errorf("%s: %d Gets took the fast path and %d Pebble's; want %d and %d", what, f, s, fast, slow)
	}
}

// TestFastReadPath checks that Get reads keys not written since the last
// flush through the iterator over the tables, and every other key through
// Pebble's Get, and that both give the right value across overwrites,
// deletes, range drops and bulk loads made after the iterator was.
func TestFastReadPath(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 4<<10)
	m := model{}
	value := func(i, round int) string { return fmt.Sprintf("value %d of round %d %0200d", i, round, 0) }
	key := func(i int) string { return fmt.Sprintf("key-%05d", i) }
	const keys = 3000 // about 900 KB: generations of 224 KB end and flush
	for i := range keys {
		mustPut(t, d, int32(i%8), key(i), value(i, 0))
		m.put(int32(i%8), key(i), value(i, 0))
	}
	if d.reads.gens[0].done == nil {
		t.Fatal("no generation of writes ended after 900 KB of writes into 256 KB memtables")
	}
	flushAll(t, d)
	checkPaths(t, d, "flushed keys", keys, 0, func() { checkBackend(t, d, m) })

	// Overwrite and delete some flushed keys: they are in the current
	// generation, so Pebble's Get must find the new values in the memtable.
	for i := 0; i < keys; i += 10 {
		mustPut(t, d, int32(i%8), key(i), value(i, 1))
		m.put(int32(i%8), key(i), value(i, 1))
		mustDelete(t, d, int32((i+1)%8), key(i+1))
		m.delete(int32((i+1)%8), key(i+1))
	}
	checkPaths(t, d, "keys written since the flush", 0, 2*keys/10, func() {
		for i := 0; i < keys; i += 10 {
			checkGet(t, d, int32(i%8), key(i), value(i, 1), true)
			checkGet(t, d, int32((i+1)%8), key(i+1), "", false)
		}
	})
	checkBackend(t, d, m)
	// Flushed, the new values and the deletions are read from the tables.
	flushAll(t, d)
	checkPaths(t, d, "flushed overwrites and deletes", 2*keys/10, 0, func() {
		for i := 0; i < keys; i += 10 {
			checkGet(t, d, int32(i%8), key(i), value(i, 1), true)
			checkGet(t, d, int32((i+1)%8), key(i+1), "", false)
		}
	})

	// A range drop covers keys no filter names: until it is flushed every
	// Get takes Pebble's path, and after, the tables say the keys are gone.
	if err := d.DropRange(2, 4); err != nil {
		t.Fatal(err)
	}
	m.dropRange(2, 4)
	checkPaths(t, d, "keys under an unflushed range drop", 0, 2, func() {
		checkGet(t, d, 2, key(2), "", false)
		checkGet(t, d, 3, key(3), "", false)
	})
	flushAll(t, d)
	checkPaths(t, d, "keys under a flushed range drop", 2, 0, func() {
		checkGet(t, d, 2, key(2), "", false)
		checkGet(t, d, 3, key(3), "", false)
	})
	checkBackend(t, d, m)

	// A bulk load into an empty range after the iterator was made: the
	// loaded keys must be found.
	var es []entry
	for i := range 500 {
		es = append(es, entry{kg: 100, key: key(i), value: value(i, 3)})
		m.put(100, key(i), value(i, 3))
	}
	mustLoad(t, d, 100, 101, es)
	checkPaths(t, d, "loaded keys", 500, 0, func() {
		for _, e := range es {
			checkGet(t, d, e.kg, e.key, e.value, true)
		}
	})
	checkBackend(t, d, m)
}

// TestFastReadPathLoadOverDeletes loads a key group whose only keys were
// deleted and are still in a memtable: Pebble would queue such a table
// behind the memtable, where the fast path's iterator does not look, were
// that not turned off.
func TestFastReadPathLoadOverDeletes(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 4<<10)
	mustPut(t, d, 100, "m", "gone soon")
	mustDelete(t, d, 100, "m")
	var es []entry
	for c := 'a'; c <= 'z'; c++ {
		es = append(es, entry{kg: 100, key: string(c), value: "loaded " + string(c)})
	}
	mustLoad(t, d, 100, 101, es)
	for _, e := range es {
		checkGet(t, d, e.kg, e.key, e.value, true)
	}
	if d.reads.fast == 0 {
		t.Error("no Get of a loaded key took the fast path")
	}
}

// TestFastReadPathWritesOnly checks that a Disk that only writes, and never
// reads, does not keep the filters of flushed generations.
func TestFastReadPathWritesOnly(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	value := make([]byte, 1000)
	gens := 0
	for i := 0; gens < 40; i++ {
		before := len(d.reads.gens) > 0 && d.reads.gens[len(d.reads.gens)-1].done == nil
		if err := d.Put(int32(i%128), fmt.Appendf(nil, "key-%d", i), value); err != nil {
			t.Fatal(err)
		}
		if before && d.reads.gens[len(d.reads.gens)-1].done != nil {
			gens++
		}
	}
	// Writes wait for flushes once three memtables are queued (admit), so
	// a handful of generations at most can be waiting for theirs.
	if n := len(d.reads.gens); n > 8 {
		t.Errorf("%d generations kept after 40 ended with no Get; want a handful", n)
	}
}

// TestDropFlushedMakesIteratorStale checks the rule the fast path's
// correctness rests on: once a generation's flush is done its keys are read
// from the tables, so an iterator made before the flush must not be used.
// (Compactions also make it stale, which hides a missing rule from the test
// above whenever one runs in time.)
func TestDropFlushedMakesIteratorStale(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	mustPut(t, d, 1, "k", "v")
	checkGet(t, d, 1, "other", "", false) // makes the iterator
	if d.reads.iter == nil {
		t.Fatal("a Get of a key never written did not make the fast path's iterator")
	}
	done := make(chan struct{})
	d.reads.seal(done) // stands in for the flush's channel
	d.reads.dropFlushed()
	if d.reads.iter == nil || len(d.reads.gens) != 1 {
		t.Fatalf("a generation whose flush is not done was dropped (iterator %v, %d generations)", d.reads.iter, len(d.reads.gens))
	}
	close(done)
	d.reads.dropFlushed()
	if d.reads.iter != nil || len(d.reads.gens) != 0 {
		t.Fatalf("after its flush: iterator %v, %d generations; want none and none", d.reads.iter, len(d.reads.gens))
	}
}
