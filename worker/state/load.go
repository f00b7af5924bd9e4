package state

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

var (
	// ErrRangeNotEmpty is returned by Disk.Load when the key-group range to
	// load already holds keys. The caller loads with Put instead.
	ErrRangeNotEmpty = errors.New("state: bulk load: key-group range not empty")
	// ErrLoadOrder is wrapped by the error Loader.Add returns for an entry
	// that is not strictly after the one before it in (key group, key)
	// order.
	ErrLoadOrder = errors.New("state: bulk load: entries out of order")
	// ErrLoaderDone is returned by Loader.Add after Add failed, and by Add
	// and Finish after Finish or Abort.
	ErrLoaderDone = errors.New("state: bulk load: loader failed or done")
)

const (
	// loadDir is the directory, inside a Disk's directory, where a Loader
	// writes its tables before Pebble ingests them. Pebble hard-links an
	// ingested table into its own directory, which needs the same file
	// system.
	loadDir = "bulk-load"
	// defaultLoadTableSize bounds the key and value bytes of one table a
	// Loader writes (the file is smaller: blocks are compressed). Larger
	// tables mean fewer ingestions, each of which writes and syncs Pebble's
	// MANIFEST; at 64 MiB, one ingestion per 64 MiB costs next to nothing
	// and the table waiting for ingestion stays small on disk.
	defaultLoadTableSize = 64 << 20
)

// Load returns a Loader that fills the key groups [start, end), which must
// hold no keys, from entries given in order. It is how a restore loads a
// task's state: writing Pebble tables of 64 MiB of entries and ingesting
// them skips the memtable and the flushes and compactions that Puts cause,
// which BenchmarkRestoreDisk measures at about half the time and a third of
// the CPU of one Put per key.
//
// The range must be empty because the caller counts every entry it adds as a
// new key, and a table ingested over keys of the range would shadow them
// without the caller knowing. Load returns an error wrapping
// ErrRangeNotEmpty if a key of the range is set; the caller then loads with
// Put, which is always correct. A restore loads into a fresh Disk, or into
// the key groups of another task's blob, which no earlier blob covered.
//
// One Loader at a time: Load fails while another Loader of the Disk is
// neither finished nor aborted. Only the writer goroutine uses the Loader, and
// until it is finished or aborted the writer must not write into [start,
// end): such a write could be shadowed by a table ingested after it.
func (d *Disk) Load(start, end int32) (*Loader, error) {
	// The kept writes of a Prefetch count for the emptiness check, and
	// none are kept during the load (Prefetch refuses to run then).
	if err := d.commitKept(); err != nil {
		return nil, err
	}
	if err := d.usable(); err != nil {
		return nil, err
	}
	if err := checkRange(start, end); err != nil {
		return nil, err
	}
	if d.loading {
		return nil, fmt.Errorf("state: disk backend %s: bulk load of [%d, %d): another bulk load is under way", d.dir, start, end)
	}
	if start < end {
		empty, err := d.emptyRange(start, end)
		if err != nil {
			return nil, err
		}
		if !empty {
			return nil, fmt.Errorf("%w: [%d, %d) in %s", ErrRangeNotEmpty, start, end, d.dir)
		}
	}
	tmp := d.fs.PathJoin(d.dir, loadDir)
	// A directory left by a Loader whose cleanup failed holds nothing of
	// use.
	if err := d.fs.RemoveAll(tmp); err != nil {
		return nil, d.errorf("bulk load: remove old table directory", err)
	}
	if err := d.fs.MkdirAll(tmp, 0o755); err != nil {
		return nil, d.errorf("bulk load: create table directory", err)
	}
	d.loading = true
	return &Loader{d: d, start: start, end: end, tmp: tmp, tableSize: d.loadTableSize}, nil
}

// emptyRange reports whether the key groups [start, end) hold no key.
func (d *Disk) emptyRange(start, end int32) (empty bool, err error) {
	iter, err := d.db.NewIter(&pebble.IterOptions{LowerBound: groupPrefix(start), UpperBound: groupPrefix(end)})
	if err != nil {
		return false, d.errorf("bulk load: check the range is empty", err)
	}
	found := iter.First()
	if err := iter.Close(); err != nil {
		return false, d.errorf("bulk load: check the range is empty", err)
	}
	return !found, nil
}

// Loader fills an empty key-group range of a Disk from entries in (key
// group, key) order, by writing Pebble tables and ingesting them. Disk.Load
// returns one.
//
// Entries become visible table by table, as each is ingested: while loading,
// the range holds a prefix of what was added. Finish ingests the rest; Abort
// drops what was ingested, leaving the range empty again. Either must be
// called, and after either the Loader is done.
//
// Every error names what failed (writing a table, ingesting it) and wraps the
// cause, such as syscall.ENOSPC from a full disk. After an error from Add the
// Loader takes no more entries, and Finish or Abort undoes the load.
type Loader struct {
	d          *Disk
	start, end int32
	tmp        string // the directory of the tables before ingestion
	tableSize  int    // key and value bytes per table

	w       *sstable.Writer // the table being written, if any
	path    string          // its file
	name    string          // its file, relative to the Disk's directory
	inTable int             // key and value bytes added to it
	tables  int             // tables started, which names the next one

	key, prev []byte // the encoded key of the current and the last entry
	keys      int64  // entries added
	ingested  bool   // a table was ingested: Abort must drop the range
	err       error  // the failure of Add, if any
	closed    bool   // Finish or Abort was called
}

// Add appends the entry (kg, key, value), which must be in the Loader's
// range and strictly after the previous entry in (key group, key) order,
// keys compared bytewise: the order of statefile.Merge's output and of
// View.Range. The Loader copies key and value. An entry out of order or out
// of range is an error, never a panic.
func (l *Loader) Add(kg int32, key, value []byte) error {
	if l.closed || l.err != nil {
		return ErrLoaderDone
	}
	if err := l.add(kg, key, value); err != nil {
		l.err = err
		return err
	}
	return nil
}

// add does the work of Add.
func (l *Loader) add(kg int32, key, value []byte) error {
	if kg < l.start || kg >= l.end {
		return fmt.Errorf("%w: bulk load of [%d, %d): key group %d", ErrKeyGroupRange, l.start, l.end, kg)
	}
	// Pebble's default comparer, which Disk uses, is bytewise; the 4-byte
	// big-endian key group keeps key groups in numeric order.
	l.key = appendKey(l.key[:0], kg, key)
	if l.keys > 0 && bytes.Compare(l.key, l.prev) <= 0 {
		return fmt.Errorf("%w: key group %d key %q does not follow key group %d key %q",
			ErrLoadOrder, kg, key, binary.BigEndian.Uint32(l.prev), l.prev[4:])
	}
	if l.w == nil {
		if err := l.startTable(); err != nil {
			return err
		}
	}
	if err := l.w.Set(l.key, value); err != nil {
		return l.d.errorf("bulk load: write table "+l.name, err)
	}
	l.key, l.prev = l.prev, l.key
	l.keys++
	l.inTable += len(l.prev) + len(value)
	if l.inTable >= l.tableSize {
		return l.ingestTable()
	}
	return nil
}

// Keys returns the number of entries added.
func (l *Loader) Keys() int64 { return l.keys }

// Finish ingests the table being written, if any, and removes the Loader's
// files. If Add failed, or Finish fails, it aborts the load (see Abort) and
// returns the failure, with Abort's if Abort fails too.
func (l *Loader) Finish() error {
	if l.closed {
		return ErrLoaderDone
	}
	err := l.err
	if err == nil && l.w != nil {
		err = l.ingestTable()
	}
	if err == nil {
		err = l.cleanup()
	}
	if err != nil {
		if aerr := l.Abort(); aerr != nil {
			return fmt.Errorf("%w; undoing the bulk load: %w", err, aerr)
		}
		return err
	}
	l.closed = true
	l.d.loading = false
	return nil
}

// Abort gives the load up: it drops what was ingested, so the range is empty
// again, and removes the Loader's files. It returns nil after Finish or an
// earlier Abort.
func (l *Loader) Abort() error {
	if l.closed {
		return nil
	}
	l.closed = true
	l.d.loading = false
	var errs []error
	if l.w != nil {
		// Close completes or discards the table; its file goes with the
		// directory either way.
		_ = l.w.Close()
		l.w = nil
	}
	if err := l.cleanup(); err != nil {
		errs = append(errs, err)
	}
	if l.ingested {
		if err := l.d.DropRange(l.start, l.end); err != nil {
			errs = append(errs, fmt.Errorf("drop the partly loaded range: %w", err))
		}
	}
	return errors.Join(errs...)
}

// startTable creates the next table file and its writer.
func (l *Loader) startTable() error {
	file := fmt.Sprintf("%06d.sst", l.tables)
	l.path, l.name = l.d.fs.PathJoin(l.tmp, file), loadDir+"/"+file
	l.tables++
	f, err := l.d.fs.Create(l.path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return l.d.errorf("bulk load: create table "+l.name, err)
	}
	l.w = sstable.NewWriter(objstorageprovider.NewFileWritable(f), l.d.tableOpts)
	l.inTable = 0
	return nil
}

// ingestTable finishes the table being written (Close syncs it, as Pebble
// requires of a table to ingest) and has Pebble ingest it. Pebble moves the
// file into its directory, by a hard link, and removes it from the Loader's.
func (l *Loader) ingestTable() error {
	w := l.w
	l.w = nil
	if err := w.Close(); err != nil {
		return l.d.errorf("bulk load: write table "+l.name, err)
	}
	// Ingest panics on a closed database.
	if err := l.d.usable(); err != nil {
		return err
	}
	// Pebble uses the context only for tracing: an ingestion is not
	// abandoned halfway. Its MANIFEST write failing (a full disk) is a
	// Fatalf: recoverFatal makes it the ingestion's error.
	ingest := func() (err error) {
		defer recoverFatal(&err)
		return l.d.db.Ingest(context.Background(), []string{l.path})
	}
	err := ingest()
	// The fast read path must not read from tables made before the
	// ingestion, failed or not.
	l.d.tablesChanged()
	if err != nil {
		return l.d.errorf("bulk load: ingest table "+l.name, err)
	}
	l.ingested = true
	return nil
}

// cleanup removes the Loader's directory and whatever tables are left in it.
func (l *Loader) cleanup() error {
	if err := l.d.fs.RemoveAll(l.tmp); err != nil {
		return l.d.errorf("bulk load: remove table directory", err)
	}
	return nil
}
