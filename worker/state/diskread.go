package state

import (
	"bytes"
	"hash/maphash"
	"math/bits"
	"slices"

	"github.com/cockroachdb/pebble/v2"
)

// flushedReads is the Disk's fast path for Get: a key with no write in a
// memtable is read with one long-lived iterator over the flushed tables,
// skipping the memtables.
//
// A Pebble Get searches every memtable's skiplist before the tables, and
// with a state larger than the memtables most keys are not in them: the
// distinct operator spent a third of its time in those searches (see
// docs/benchmarks.md). So the Disk remembers which keys were written since
// the last flush it knows complete, in a bloom filter per generation of
// writes, and sends only those keys, and the rare false positives, through
// Pebble's Get. A generation ends once about seven eighths of a memtable of
// writes were made in it, by an estimate that errs on the high side: the
// Disk then asks Pebble to flush (DB.AsyncFlush, which also starts a new
// memtable), and drops the generation's filter when that flush is done.
// Pebble's own flushes, when a memtable fills up first, only make writes
// durable earlier than the Disk assumes.
//
// The iterator is a Pebble iterator with OnlyReadGuaranteedDurable: a view of
// the tables as of its creation. It is made again after every change to the
// set of tables the Disk hears of (a flush, a compaction, an ingestion), so
// that a key whose generation was dropped is read from the tables its flush
// wrote, and so that it does not keep compacted tables on disk. While a
// range deletion is not yet flushed, every Get takes Pebble's path: the
// deletion covers keys the filters do not name.
// A bulk load's tables are in the tables as soon as Ingest returns: the Disk
// turns off Pebble's ingestion as a flushable (a table queued behind the
// memtables, which this iterator would not see until flushed).
//
// Only the writer goroutine uses it.
type flushedReads struct {
	seed maphash.Seed
	// iter reads the flushed tables; nil until first used and after it is
	// found stale. iterAt is Disk.tableChanges when it was made.
	iter   *pebble.Iterator
	iterAt uint64
	// gens are the generations of writes not known to be flushed, oldest
	// first. The last one takes new writes; the others wait for the flush
	// in done.
	gens []*writeGen
	// spare is the filter of a dropped generation, for the next one.
	spare []uint64
	// sealAt is the estimated memtable bytes of writes that end a
	// generation; filterBits is the size of a generation's filter.
	sealAt     int
	filterBits uint64
	// fast and slow count the Gets of each path, for tests; off sends
	// every Get through Pebble's, for benchmarks.
	fast, slow int64
	off        bool
}

// flushed reports whether the flush that ended g is done.
func (g *writeGen) flushed() bool {
	if g.done == nil {
		return false
	}
	select {
	case <-g.done:
		return true
	default:
		return false
	}
}

// writeGen is one generation of writes: a bloom filter of the keys written.
type writeGen struct {
	filter   []uint64
	bytes    int  // estimated memtable bytes of the writes
	rangeDel bool // a range deletion was written
	// done is closed by Pebble once the flush that the generation's end
	// asked for is done, and with it every write before it. Nil while the
	// generation takes writes.
	done <-chan struct{}
}

const (
	// genFill is the share of a memtable a generation takes before it
	// ends: less than all of it, so that the Disk's flush, not Pebble's,
	// usually ends a memtable, and flushes are not made twice as often.
	genFillNum, genFillDen = 7, 8
	// genEntryOverhead estimates the memtable bytes of a write beyond its
	// encoded key and value, on the high side: Pebble's skiplist node is
	// 24 bytes and 8 per level of its tower (1.6 on average), plus the
	// key's 8-byte trailer and up to 3 bytes of alignment
	// (arenaskl.MaxNodeSize).
	genEntryOverhead = 48
	// filterBitsPerKey and filterProbes size the bloom filters: at 16 bits
	// a key and 4 probes, under 0.3 % of the keys a full generation does
	// not hold take Pebble's path.
	filterBitsPerKey = 16
	filterProbes     = 4
)

func newFlushedReads(memTableSize uint64) flushedReads {
	sealAt := int(memTableSize * genFillNum / genFillDen)
	// Every write costs at least genEntryOverhead bytes and a 4-byte key
	// group in the estimate, which bounds a generation's keys.
	maxKeys := uint64(sealAt/(genEntryOverhead+4)) + 1
	return flushedReads{
		seed:       maphash.MakeSeed(),
		sealAt:     sealAt,
		filterBits: max(64, uint64(1)<<bits.Len64(maxKeys*filterBitsPerKey-1)),
	}
}

// hash returns the hash the filters use for the encoded key k.
func (r *flushedReads) hash(k []byte) uint64 { return maphash.Bytes(r.seed, k) }

// current returns the generation that takes writes, starting one if
// needed. A Disk that only writes for a while drops the flushed
// generations here, so that their filters do not pile up.
func (r *flushedReads) current() *writeGen {
	if n := len(r.gens); n > 0 && r.gens[n-1].done == nil {
		return r.gens[n-1]
	}
	r.dropFlushed()
	f := r.spare
	r.spare = nil
	if f == nil {
		f = make([]uint64, r.filterBits/64)
	}
	g := &writeGen{filter: f}
	r.gens = append(r.gens, g)
	return g
}

// entryBytes estimates the memtable bytes of a write of an encoded key of
// k bytes and a value of v bytes.
func entryBytes(k, v int) int { return k + v + genEntryOverhead }

// wrote records a write of the key with hash h and about n memtable bytes
// (entryBytes). It reports whether the generation is full and should end.
func (r *flushedReads) wrote(h uint64, n int) (full bool) {
	g := r.current()
	g.add(h)
	g.bytes += n
	return g.bytes >= r.sealAt
}

// probe returns the filter word and bit of probe i of the key with hash h:
// double hashing over the filter's bits, whose number is a power of two.
func (g *writeGen) probe(h uint64, i int) (word int, bit uint64) {
	h += uint64(i) * (h>>32 | 1)
	mask := uint64(len(g.filter))*64 - 1
	return int((h & mask) / 64), 1 << (h & 63)
}

// add sets the filter bits of the key with hash h.
func (g *writeGen) add(h uint64) {
	for i := range filterProbes {
		w, b := g.probe(h, i)
		g.filter[w] |= b
	}
}

// mayContain reports whether the key with hash h may have been written in
// g: false only if it was not.
func (g *writeGen) mayContain(h uint64) bool {
	for i := range filterProbes {
		if w, b := g.probe(h, i); g.filter[w]&b == 0 {
			return false
		}
	}
	return true
}

// wroteRange records a range deletion of about n memtable bytes: until its
// generation is flushed, no Get takes the fast path. (Ending the generation
// at once would force a flush that a briefly full disk fails for good.)
func (r *flushedReads) wroteRange(n int) (full bool) {
	g := r.current()
	g.rangeDel = true
	g.bytes += n
	return g.bytes >= r.sealAt
}

// seal ends the current generation: done is closed once its writes are
// flushed.
func (r *flushedReads) seal(done <-chan struct{}) {
	if n := len(r.gens); n > 0 && r.gens[n-1].done == nil {
		r.gens[n-1].done = done
	}
}

// dropFlushed drops the generations whose flush is done, oldest first (a
// flush covers every write before it), and makes the iterator stale if it
// dropped any: the keys they name are read from the new tables from now on.
func (r *flushedReads) dropFlushed() {
	dropped := 0
	for dropped < len(r.gens) && r.gens[dropped].flushed() {
		dropped++
	}
	if dropped == 0 {
		return
	}
	for _, g := range r.gens[:dropped] {
		if r.spare == nil {
			clear(g.filter)
			r.spare = g.filter
		}
	}
	r.gens = slices.Delete(r.gens, 0, dropped)
	r.closeIter()
}

// unflushed reports whether the key with hash h may have a write that is not
// flushed, or a range deletion may cover it: then only Pebble's Get, which
// reads the memtables, is right.
func (r *flushedReads) unflushed(h uint64) bool {
	r.dropFlushed()
	if r.off {
		return true
	}
	for _, g := range r.gens {
		if g.rangeDel || g.mayContain(h) {
			return true
		}
	}
	return false
}

// get reads the encoded key k from the flushed tables, making the iterator
// anew if the tables changed since it was made (tables is the Disk's count
// of changes). The value is appended to buf[:0].
func (r *flushedReads) get(db *pebble.DB, tables uint64, k, buf []byte) ([]byte, bool, error) {
	if r.iter == nil || r.iterAt != tables {
		r.closeIter()
		it, err := db.NewIter(&pebble.IterOptions{OnlyReadGuaranteedDurable: true})
		if err != nil {
			return buf, false, err
		}
		r.iter, r.iterAt = it, tables
	}
	if !r.iter.SeekPrefixGE(k) || !bytes.Equal(r.iter.Key(), k) {
		if err := r.iter.Error(); err != nil {
			r.closeIter() // the next Get starts over with a new one
			return buf, false, err
		}
		return buf, false, nil
	}
	v, err := r.iter.ValueAndErr()
	if err != nil {
		r.closeIter()
		return buf, false, err
	}
	return append(buf[:0], v...), true, nil
}

// releaseStale closes the iterator if the tables changed since it was made
// (tables is the Disk's count of changes): it holds on to the memtables and
// tables of its time, which a Disk that only writes for a while would
// otherwise keep in memory and on disk.
func (r *flushedReads) releaseStale(tables uint64) {
	if r.iter != nil && r.iterAt != tables {
		r.closeIter()
	}
}

// closeIter closes the iterator, if any. Its error, if any, was returned by
// the read that met it.
func (r *flushedReads) closeIter() {
	if r.iter != nil {
		_ = r.iter.Close()
		r.iter = nil
	}
}
