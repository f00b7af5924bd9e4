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

// Prefetch prepares the Gets, Puts and Deletes of keys that follow: it reads
// the keys' values in key order (while Gets use them: see below), and keeps the writes of those keys until
// the next Prefetch, Snapshot, DropRange or Load, which makes them in one
// Pebble batch in key order. A map task calls it with the keys of a batch of
// items before it applies them. Prefetch copies keys; the caller may reuse
// them once it returns.
//
// A Pebble read or write costs less when it follows one of a nearby key:
// Pebble's iterator seeks on from where it stands, and its skiplist inserts
// from where the last insert spliced. Keys in item order are scattered;
// sorted, they are not (BenchmarkGetOrPut; docs/benchmarks.md).
//
// Prefetch reads ahead only while Gets use what it reads: if there were
// fewer Gets of the keys of the last Prefetch than half its keys (items of
// an operator that keeps no state, or dropped as duplicates), it leaves the
// values to be read by the Gets that ask for them, and only sorts the
// writes.
//
// Gets, Puts and Deletes of other keys go to Pebble as before. A write kept
// waits for Pebble's flushes (admit) only when it is made, so a slow disk
// can make the next Snapshot wait. An invalid key group is skipped: Get and
// Put report it. A failed write of the kept writes fails the backend, as
// Pebble's background errors do: acknowledged writes would be lost.
func (d *Disk) Prefetch(keys []GroupKey) error {
	if err := d.commitKept(); err != nil {
		return err
	}
	if err := d.usable(); err != nil {
		return err
	}
	if d.loading {
		return fmt.Errorf("state: disk backend %s: prefetch: a bulk load is under way", d.dir)
	}
	a := &d.ahead
	readAll := a.gets*2 >= a.last
	a.gets = 0
	n := 0
	for _, k := range keys {
		n += 4 + len(k.Key)
	}
	// The entries' keys are slices of a.keys, sized once so that they all
	// share one array.
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
	a.last = len(a.entries)
	for i := range a.entries {
		e := &a.entries[i]
		e.hash = d.reads.hash(e.key)
		if !readAll {
			continue
		}
		if err := d.readEntry(e); err != nil {
			a.reset()
			return err
		}
	}
	return nil
}

// readAhead holds the keys of the last Prefetch with their values: as read,
// or as written since, in which case the write is kept, not yet in Pebble.
type readAhead struct {
	entries []aheadEntry // sorted by key, no two equal
	keys    []byte       // the entries' encoded keys
	vals    []byte       // the entries' values
	kept    int          // entries written since the Prefetch
	// gets counts the Gets of the entries since the Prefetch; last is the
	// number of entries it made.
	gets, last int
	// hits and committed count the Gets answered from entries and the
	// writes kept and then made, for tests.
	hits, committed int64
}

// aheadEntry is one key of a Prefetch.
type aheadEntry struct {
	key   []byte // encoded (appendKey)
	hash  uint64 // flushedReads.hash of key
	val   []byte
	found bool // the key is set, to val (if read)
	read  bool // val and found are known: read from Pebble, or written
	kept  bool // written since the Prefetch, not yet in Pebble
}

// Bounds of the buffers a readAhead keeps from one Prefetch to the next:
// past them, a batch of large keys or values does not hold on to its
// memory.
const (
	maxKeptEntries = 1 << 14
	maxKeptBytes   = 1 << 20
)

// find returns the entry of the encoded key k, or nil if the last Prefetch
// was not given k.
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

// readEntry reads e's value from Pebble, unless it is known.
func (d *Disk) readEntry(e *aheadEntry) error {
	if e.read {
		return nil
	}
	val, found, err := d.read(e.key, e.hash)
	if err != nil {
		return err
	}
	e.read, e.found, e.val = true, found, nil
	if found {
		e.val = d.ahead.value(nil, val)
	}
	return nil
}

// getEntry is Get of e's key.
func (d *Disk) getEntry(e *aheadEntry) ([]byte, bool, error) {
	a := &d.ahead
	a.gets++
	a.hits++
	if err := d.readEntry(e); err != nil {
		return nil, false, err
	}
	if !e.found {
		return nil, false, nil
	}
	// Clipped, as every Get's value: an append by the caller must not
	// write into the entry's spare capacity.
	return slices.Clip(e.val), true, nil
}

// value returns a copy of v: in dst if it fits (a value Get returned is
// valid only until the next call of a Disk method, such as the Put that
// overwrites it), else appended to a.vals. A copy in a.vals stays where it
// is, in the array it was made in, when a.vals grows.
func (a *readAhead) value(dst, v []byte) []byte {
	if len(v) <= cap(dst) {
		dst = dst[:len(v)]
		copy(dst, v)
		return dst
	}
	start := len(a.vals)
	a.vals = append(a.vals, v...)
	return a.vals[start:len(a.vals):len(a.vals)]
}

// keep keeps a Put of value (found) or a Delete of the encoded key in
// d.keyBuf, if the last Prefetch was given the key, and reports whether it
// was.
func (d *Disk) keep(value []byte, found bool) (bool, error) {
	e := d.ahead.find(d.keyBuf)
	if e == nil {
		return false, nil
	}
	if err := d.usable(); err != nil {
		return true, err
	}
	d.ahead.write(e, value, found)
	return true, nil
}

// write records a Put (found) or a Delete of e's key, to be made by
// commitKept.
func (a *readAhead) write(e *aheadEntry, value []byte, found bool) {
	if found {
		e.val = a.value(e.val, value)
	} else {
		e.val = e.val[:0]
	}
	e.found, e.read = found, true
	if !e.kept {
		e.kept = true
		a.kept++
	}
}

// reset forgets the entries. It keeps the buffers for the next Prefetch
// unless a large batch grew them past maxKeptEntries or maxKeptBytes.
func (a *readAhead) reset() {
	clear(a.entries) // drop the slices' references for the collector
	a.entries, a.kept = a.entries[:0], 0
	a.keys, a.vals = a.keys[:0], a.vals[:0]
	if cap(a.entries) > maxKeptEntries {
		a.entries = nil
	}
	if cap(a.keys) > maxKeptBytes {
		a.keys = nil
	}
	if cap(a.vals) > maxKeptBytes {
		a.vals = nil
	}
}

// commitKept makes the writes kept since the last Prefetch in one Pebble
// batch, in key order, and forgets the entries.
func (d *Disk) commitKept() error {
	a := &d.ahead
	if a.kept == 0 {
		a.reset()
		return nil
	}
	defer a.reset()
	if err := d.usable(); err != nil {
		return err
	}
	n := 0
	for i := range a.entries {
		if e := &a.entries[i]; e.kept {
			n += len(e.key) + len(e.val)
		}
	}
	if err := d.admit(n, a.kept); err != nil {
		return err
	}
	b := d.db.NewBatch()
	defer b.Close()
	full := false
	for i := range a.entries {
		e := &a.entries[i]
		if !e.kept {
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
	a.committed += int64(a.kept)
	return d.endGeneration(full)
}

// failWrite fails the backend with err, a failed write of the kept writes,
// and returns the failure: those writes were acknowledged and are lost, so
// no later call may succeed.
func (d *Disk) failWrite(err error) error {
	d.fail(fmt.Errorf("write kept writes: %w", err))
	return *d.failure.Load()
}
