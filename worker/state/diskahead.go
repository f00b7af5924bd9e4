package state

import (
	"bytes"
	"fmt"
	"slices"
	"sort"

	"github.com/cockroachdb/pebble/v2"
)

// GroupKey names a key in a key group: what Disk.Prefetch reads.
type GroupKey struct {
	Group int32
	Key   []byte
}

// Prefetch reads the values of keys ahead of the Gets, Puts and Deletes that
// follow, and keeps the writes of those keys until the next Prefetch, which
// makes them in one batch. A map task calls it with the keys of a batch of
// items before it applies them.
//
// A Pebble read or write costs less when it follows one of a nearby key:
// Pebble's iterator seeks on from where it stands, and its skiplist inserts
// from where the last insert spliced. Keys in item order are scattered;
// Prefetch sorts them, reads them in key order, and writes the ones written
// in key order too (BenchmarkGetOrPut; docs/benchmarks.md).
//
// Gets, Puts and Deletes of other keys go to Pebble as before. The writes
// kept are made before the next Snapshot, DropRange or Load, so views and
// range drops see them. An invalid key group is skipped: Get and Put report
// it. A failed write of the kept writes fails the backend, as Pebble's
// background errors do: the writes of acknowledged Puts would be lost.
func (d *Disk) Prefetch(keys []GroupKey) error {
	if err := d.flushAhead(); err != nil {
		return err
	}
	if err := d.usable(); err != nil {
		return err
	}
	if d.loading {
		return fmt.Errorf("state: disk backend %s: prefetch: a bulk load is under way", d.dir)
	}
	a := &d.ahead
	n := 0
	for _, k := range keys {
		n += 4 + len(k.Key)
	}
	// The entries' keys are slices of a.keys: it must not grow below them.
	a.keys = slices.Grow(a.keys[:0], n)
	for _, k := range keys {
		if checkKeyGroup(k.Group) != nil {
			continue
		}
		start := len(a.keys)
		a.keys = appendKey(a.keys, k.Group, k.Key)
		a.entries = append(a.entries, aheadEntry{key: a.keys[start:len(a.keys):len(a.keys)]})
	}
	slices.SortFunc(a.entries, func(x, y aheadEntry) int { return bytes.Compare(x.key, y.key) })
	a.entries = slices.CompactFunc(a.entries, func(x, y aheadEntry) bool { return bytes.Equal(x.key, y.key) })
	for i := range a.entries {
		e := &a.entries[i]
		e.hash = d.reads.hash(e.key)
		val, found, err := d.read(e.key, e.hash)
		if err != nil {
			a.reset()
			return err
		}
		if found {
			e.val, e.found = a.value(val), true
		}
	}
	return nil
}

// readAhead holds the keys of the last Prefetch with their values: as read,
// or as written since, in which case the write is not yet in Pebble.
type readAhead struct {
	entries []aheadEntry // sorted by key, no two equal
	keys    []byte       // the entries' encoded keys
	vals    []byte       // the entries' values
	dirty   int          // entries written since the Prefetch
}

// aheadEntry is one key of a Prefetch.
type aheadEntry struct {
	key   []byte // encoded (appendKey)
	hash  uint64 // flushedReads.hash of key
	val   []byte
	found bool // the key is set, to val
	dirty bool // written since the Prefetch, not in Pebble
}

// find returns the entry of the encoded key k, or nil if the last Prefetch
// did not read k.
func (a *readAhead) find(k []byte) *aheadEntry {
	if len(a.entries) == 0 {
		return nil
	}
	i := sort.Search(len(a.entries), func(i int) bool { return bytes.Compare(a.entries[i].key, k) >= 0 })
	if i == len(a.entries) || !bytes.Equal(a.entries[i].key, k) {
		return nil
	}
	return &a.entries[i]
}

// value returns a copy of v in a.vals. A copy made earlier stays as it was,
// in the array it was made in, even when a.vals grows.
func (a *readAhead) value(v []byte) []byte {
	start := len(a.vals)
	a.vals = append(a.vals, v...)
	return a.vals[start:len(a.vals):len(a.vals)]
}

// write records a Put (found) or a Delete of e's key.
func (a *readAhead) write(e *aheadEntry, value []byte, found bool) {
	e.val, e.found = nil, found
	if found {
		e.val = a.value(value)
	}
	if !e.dirty {
		e.dirty = true
		a.dirty++
	}
}

// reset forgets the entries, keeping the buffers for the next Prefetch: a
// value Get returned is valid only until the next call of a Disk method.
func (a *readAhead) reset() {
	clear(a.entries) // drop the slices' references for the collector
	a.entries, a.dirty = a.entries[:0], 0
	a.vals = a.vals[:0]
}

// flushAhead writes the entries written since the last Prefetch to Pebble in
// one batch, in key order, and forgets the entries.
func (d *Disk) flushAhead() error {
	a := &d.ahead
	if a.dirty == 0 {
		a.reset()
		return nil
	}
	defer a.reset()
	if err := d.usable(); err != nil {
		return err
	}
	n := 0
	for i := range a.entries {
		if e := &a.entries[i]; e.dirty {
			n += len(e.key) + len(e.val)
		}
	}
	if err := d.admit(n, a.dirty); err != nil {
		return err
	}
	b := d.db.NewBatch()
	defer b.Close()
	full := false
	for i := range a.entries {
		e := &a.entries[i]
		if !e.dirty {
			continue
		}
		var err error
		if e.found {
			err = b.Set(e.key, e.val, nil)
		} else {
			err = b.Delete(e.key, nil)
		}
		if err != nil {
			return d.failWrite(err)
		}
		// A generation that ends here takes the whole batch: the flush
		// that endGeneration asks for comes after the commit.
		full = d.reads.wrote(e.hash, entryBytes(len(e.key), len(e.val))) || full
	}
	if err := b.Commit(pebble.NoSync); err != nil {
		return d.failWrite(err)
	}
	return d.endGeneration(full)
}

// failWrite fails the backend with err, a failed write of Prefetch's kept
// writes, and returns the failure: those writes were acknowledged and are
// lost, so no later call may succeed.
func (d *Disk) failWrite(err error) error {
	d.fail(fmt.Errorf("write prefetched keys: %w", err))
	return *d.failure.Load()
}
