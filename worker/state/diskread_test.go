package state

import (
	"fmt"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// waitFlushed waits until every generation of writes but the current one
// is flushed, as the fast read path sees it.
func waitFlushed(t *testing.T, d *Disk) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.reads.dropFlushed()
		if len(d.reads.gens) <= 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d generations of writes still not flushed after 30s", len(d.reads.gens))
		}
		time.Sleep(time.Millisecond)
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
	const keys = 3000 // about 700 KB: generations of 192 KB end and flush
	for i := range keys {
		mustPut(t, d, int32(i%8), key(i), value(i, 0))
		m.put(int32(i%8), key(i), value(i, 0))
	}
	if d.reads.gens[0].done == nil {
		t.Fatal("no generation of writes ended after 700 KB of writes into 256 KB memtables")
	}
	waitFlushed(t, d)
	fast := d.reads.fast
	checkBackend(t, d, m)
	if got := d.reads.fast - fast; got < keys*9/10 {
		t.Errorf("%d of %d Gets of flushed keys took the fast path", got, keys)
	}

	// Overwrite and delete some flushed keys: they are in the current
	// generation, so Pebble's Get must find the new values in the memtable.
	slow := d.reads.slow
	for i := 0; i < keys; i += 10 {
		mustPut(t, d, int32(i%8), key(i), value(i, 1))
		m.put(int32(i%8), key(i), value(i, 1))
		mustDelete(t, d, int32((i+1)%8), key(i+1))
		m.delete(int32((i+1)%8), key(i+1))
	}
	for i := 0; i < keys; i += 10 {
		checkGet(t, d, int32(i%8), key(i), value(i, 1), true)
		checkGet(t, d, int32((i+1)%8), key(i+1), "", false)
	}
	if got := d.reads.slow - slow; got < 2*keys/10 {
		t.Errorf("%d of %d Gets of keys written since the last flush took Pebble's path", got, 2*keys/10)
	}
	checkBackend(t, d, m)

	// A range drop covers keys no filter names: until it is flushed every
	// Get takes Pebble's path, and after, the tables say the keys are gone.
	if err := d.DropRange(2, 4); err != nil {
		t.Fatal(err)
	}
	m.dropRange(2, 4)
	fast = d.reads.fast
	checkGet(t, d, 2, key(2), "", false)
	checkGet(t, d, 3, key(3), "", false)
	if d.reads.fast != fast {
		t.Error("a Get took the fast path while a range deletion was not flushed")
	}
	for i := range keys { // end the generation that holds the deletion
		mustPut(t, d, 7, fmt.Sprintf("filler-%05d", i), value(i, 2))
		m.put(7, fmt.Sprintf("filler-%05d", i), value(i, 2))
	}
	waitFlushed(t, d)
	checkBackend(t, d, m)

	// A bulk load into an empty range after the iterator was made: the
	// loaded keys must be found.
	fast = d.reads.fast
	checkGet(t, d, 0, key(0), value(0, 1), true)
	if d.reads.fast == fast {
		t.Fatal("the Get of a flushed key did not take the fast path")
	}
	var es []entry
	for i := range 500 {
		es = append(es, entry{kg: 100, key: key(i), value: value(i, 3)})
		m.put(100, key(i), value(i, 3))
	}
	mustLoad(t, d, 100, 101, es)
	fast = d.reads.fast
	checkBackend(t, d, m)
	if d.reads.fast-fast < 500 {
		t.Errorf("%d Gets of loaded keys took the fast path, want 500 or more", d.reads.fast-fast)
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
	d.reads.seal(done)
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
