package state

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestPrefetchReadsAheadWhileGetsUseIt checks when Prefetch reads its keys'
// values from Pebble: for the first batch, and after a batch of which at
// least half the keys were read by a Get; not after a batch that was only
// written, whose values are then read by the Gets that ask for them.
func TestPrefetchReadsAheadWhileGetsUseIt(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	batch := func(round int) []GroupKey {
		keys := make([]GroupKey, 100)
		for i := range keys {
			keys[i] = GroupKey{int32(i % 4), fmt.Appendf(nil, "key-%d-%03d", round, i)}
		}
		return keys
	}
	reads := func() int64 { return d.reads.fast + d.reads.slow }
	prefetch := func(keys []GroupKey, wantReads int64) {
		t.Helper()
		before := reads()
		if err := d.Prefetch(keys); err != nil {
			t.Fatal(err)
		}
		if got := reads() - before; got != wantReads {
			t.Fatalf("Prefetch of %d keys read %d values from Pebble; want %d", len(keys), got, wantReads)
		}
	}

	// The first batch is read ahead; its Gets are answered from it.
	b0 := batch(0)
	prefetch(b0, 100)
	before := reads()
	for _, k := range b0 {
		if _, ok, err := d.Get(k.Group, k.Key); err != nil || ok {
			t.Fatalf("Get(%d, %q) = %t, %v; want absent", k.Group, k.Key, ok, err)
		}
		mustPut(t, d, k.Group, string(k.Key), "v0")
	}
	if got := reads() - before; got != 0 {
		t.Fatalf("Gets of prefetched keys read %d values from Pebble; want 0", got)
	}

	// Gets used it: the next batch is read ahead too, and only written.
	b1 := batch(1)
	prefetch(b1, 100)
	for _, k := range b1 {
		mustPut(t, d, k.Group, string(k.Key), "v1")
	}

	// No Get used it: the next batch is left to its Gets, of which there
	// are fewer than half its keys.
	prefetch(b0, 0)
	before = reads()
	for _, k := range b0[:49] {
		checkGet(t, d, k.Group, string(k.Key), "v0", true)
	}
	if got := reads() - before; got != 49 {
		t.Fatalf("49 Gets after a Prefetch left to them read %d values from Pebble; want 49", got)
	}

	// Still fewer than half: left to the Gets again, all of them now.
	prefetch(b1, 0)
	for _, k := range b1 {
		checkGet(t, d, k.Group, string(k.Key), "v1", true)
	}

	// Every key was read: read ahead again.
	prefetch(b0, 100)
	for _, k := range b0 {
		checkGet(t, d, k.Group, string(k.Key), "v0", true)
	}
}

// TestPrefetchAndLoad checks that a bulk load sees the writes a Prefetch
// kept (a range they fall in is not empty) and that Prefetch refuses to
// run while a load is under way, which would keep values the load changes.
func TestPrefetchAndLoad(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	if err := d.Prefetch([]GroupKey{{5, []byte("k")}}); err != nil {
		t.Fatal(err)
	}
	mustPut(t, d, 5, "k", "v")
	if _, err := d.Load(5, 6); !errors.Is(err, ErrRangeNotEmpty) {
		t.Fatalf("Load of the key group of a kept write: %v; want ErrRangeNotEmpty", err)
	}
	l, err := d.Load(6, 7)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Prefetch([]GroupKey{{6, []byte("k")}}); err == nil || !strings.Contains(err.Error(), "bulk load") {
		t.Fatalf("Prefetch during a bulk load: %v; want it refused", err)
	}
	if err := l.Add(6, []byte("k"), []byte("loaded")); err != nil {
		t.Fatal(err)
	}
	if err := l.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := d.Prefetch([]GroupKey{{6, []byte("k")}, {5, []byte("k")}}); err != nil {
		t.Fatal(err)
	}
	checkGet(t, d, 6, "k", "loaded", true)
	checkGet(t, d, 5, "k", "v", true)
}
