package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Defaults of DiskOptions.
const (
	// DefaultMemTableSize is the default DiskOptions.MemTableSize. Small
	// memtables make reads fast: a Get searches each memtable's skiplist,
	// and one of 64 MiB (about a million small keys) costs twice as much as
	// one of 8 MiB, where the tables on disk answer through bloom filters
	// and the block cache (BenchmarkGetOrPut; docs/benchmarks.md).
	DefaultMemTableSize = 8 << 20
	// DefaultCacheSize is the default DiskOptions.CacheSize. Pebble
	// reserves the memtables' memory in the cache, so with two or three
	// memtables of 8 MiB about 24 to 32 MiB are left for blocks: the
	// distinct job's half a million keys per task fit, where with 32 MiB a
	// Get read a block from the file every few calls (BenchmarkGetOrPut).
	DefaultCacheSize = 48 << 20
)

// DiskOptions configures a Disk backend. The zero value is ready to use.
//
// However many keys it holds, a Disk uses about CacheSize bytes of memory:
// Pebble reserves its memtables' memory (one taking writes, one or two being
// flushed) in the block cache, which holds data, index and filter blocks in
// the rest. To that come the fast read path's bloom filters, a few
// 1/16 MemTableSize each (48 MiB and about 1.5 MiB with the defaults), and
// the keys and values of the last Prefetch: one batch of items, whose
// buffers are kept for the next batch up to about a MiB each.
type DiskOptions struct {
	// MemTableSize is the size of one Pebble memtable, the in-memory write
	// buffer that is flushed to a table on disk when full. Larger memtables
	// mean fewer, larger flushes. Zero means DefaultMemTableSize.
	MemTableSize uint64

	// CacheSize is the size of the block cache, which caches the data,
	// index and filter blocks read from tables. Zero means DefaultCacheSize.
	CacheSize int64

	// Logger receives Pebble's log messages and the backend's own, with the
	// directory as attribute "dir". Nil discards them.
	Logger *slog.Logger
}

// Disk is a Backend that keeps the state in a Pebble database in a private
// directory on local disk.
//
// A key is stored under its key group as 4 big-endian bytes followed by the
// key's bytes, so the keys of a range of key groups form one contiguous range
// of Pebble keys, in the order View.Range promises. A View is a Pebble
// snapshot.
//
// The database is scratch space, not a durable store: durability comes from
// checkpoints, and a restarted task restores its state from its last
// checkpoint into a fresh Disk. So the database has no write-ahead log
// (writes go to memtables and reach files only when a memtable is flushed),
// writes are not synced, OpenDisk deletes whatever an earlier run left in
// the directory, and Close does not flush.
//
// # Failures and write throttling
//
// Writes only fill memtables, so a full disk shows itself as a failed flush
// or compaction in one of Pebble's goroutines. Such a failure, or data
// corruption detected by Pebble, does not stop the process: the first one is
// logged and then returned, wrapped with the directory, by every later call
// of Get, Put, Delete, DropRange, Snapshot and Prefetch, so the task fails with that
// reason and restarts from its checkpoint.
//
// Writes must also wait while flushes or compactions fall behind, lest
// memtables pile up in memory. Pebble's own write stall cannot be ended by a
// failure: a write stalled behind a flush that keeps failing would block
// forever. So Disk turns Pebble's stall off and throttles writes itself, in
// the writer's goroutine, before they reach Pebble: a write waits while two
// full memtables are waiting to be flushed or level 0 is as deep as Pebble's
// default stall threshold, and returns the failure as soon as one is
// recorded.
//
// # Bulk loading
//
// A restore fills empty key-group ranges with sorted entries. Load returns a
// Loader that writes them into Pebble tables and ingests the tables, which
// skips the memtable, its flushes and their compactions.
//
// Pebble treats a few failures as fatal, such as a failed write of its
// MANIFEST (on a full disk, say); it reports those through its logger's
// Fatalf and expects Fatalf not to return. Pebble's default logger would exit
// the process, which would stop every task of the worker. Disk instead fails
// the backend with the error, as for a background error, and then ends the
// goroutine that called Fatalf: with a panic on the goroutine that opened the
// Disk (the task's, whose recover turns it into a task failure), with
// runtime.Goexit on Pebble's own goroutines, which have no recover. The
// database is then left open, never closed: its goroutines may have stopped
// halfway, and Close would wait for them forever.
type Disk struct {
	dir string
	fs  vfs.FS
	db  *pebble.DB
	log *slog.Logger

	// tableOpts are the options of the tables a Loader writes: those Pebble
	// uses for its own tables.
	tableOpts sstable.WriterOptions

	// failure holds the first background error Pebble reported, wrapped.
	// Pebble's goroutines store it; the writer loads it.
	failure atomic.Pointer[error]
	// fatal is set once Pebble called Fatalf: the database must not be
	// used, or closed, again.
	fatal atomic.Bool
	// owner is the id of the goroutine that opened the Disk, the writer's.
	owner uint64

	// progress is signalled, without blocking, when a flush or compaction
	// ends or the backend fails; a write waiting in admit wakes on it.
	progress chan struct{}
	// tableChanges counts the changes to the set of tables (flushes,
	// compactions, ingestions): the fast read path's iterator is made
	// anew when it moved.
	tableChanges atomic.Uint64

	// reads is the fast path of Get, for keys not written since the last
	// flush (flushedReads). Only the writer uses it.
	reads flushedReads
	// ahead holds the keys of the last Prefetch and their writes. Only the
	// writer uses it.
	ahead readAhead

	// Used only by the writer goroutine.
	keyBuf        []byte        // the encoded key of the current call
	getBuf        []byte        // the value Get last returned
	unchecked     int           // bytes written since admit last checked Pebble
	checkEvery    int           // bytes written between checks in admit
	memTableSize  uint64        // DiskOptions.MemTableSize
	loadTableSize int           // key and value bytes per table of a Loader
	loading       bool          // a Loader is neither finished nor aborted
	stalled       time.Duration // writes' waits in admit since stallSince
	stalls        int           // waits in admit since stallSince
	stallSince    time.Time     // start of the window stalled counts in
	stallLogged   time.Time     // when stalls were last logged

	// mu guards views and closed, which Release changes or reads from other
	// goroutines. Only the writer changes closed, so it reads it without mu.
	mu     sync.Mutex
	views  int  // views not yet released
	closed bool // Close was called
}

var _ Backend = (*Disk)(nil)

const (
	// lockFile is the name of Pebble's lock file in a database directory.
	lockFile = "LOCK"

	// maxMemTables bounds the memtables: writes wait for a flush while the
	// memtables, the one taking writes included, add up to maxMemTables
	// times DiskOptions.MemTableSize, that is while about two full
	// memtables wait to be flushed. Pebble starts a flush once half a
	// MemTableSize waits, so a flush is always under way to end the wait.
	maxMemTables = 3
	// maxL0Sublevels is the read amplification of level 0 at which writes
	// wait for compactions, Pebble's default L0StopWritesThreshold.
	maxL0Sublevels = 12
	// entryOverhead estimates the memtable bytes of a write beyond its key
	// and value.
	entryOverhead = 32
	// stallPoll is the longest a waiting write sleeps between checks.
	stallPoll = 50 * time.Millisecond
)

// OpenDisk opens a Disk backend in dir, the task's private working
// directory, creating dir if needed.
//
// OpenDisk always starts from an empty database: it deletes everything dir
// holds, such as the database of an earlier run, because state is restored
// from checkpoints and never from local disk. It fails, and deletes nothing,
// if a Disk of this process still has dir open.
func OpenDisk(dir string, opts DiskOptions) (*Disk, error) {
	return openDisk(dir, opts, vfs.Default)
}

// openDisk is OpenDisk on file system fs, which tests use to inject errors.
func openDisk(dir string, opts DiskOptions, fs vfs.FS) (*Disk, error) {
	if dir == "" {
		return nil, errors.New("state: open disk backend: empty directory name")
	}
	dir = filepath.Clean(dir)
	if opts.MemTableSize == 0 {
		opts.MemTableSize = DefaultMemTableSize
	}
	if opts.CacheSize == 0 {
		opts.CacheSize = DefaultCacheSize
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	d := &Disk{
		dir:      dir,
		fs:       fs,
		log:      logger.With("dir", dir),
		progress: make(chan struct{}, 1),
		// Checking 8 times per memtable bounds the overshoot past
		// maxMemTables to an eighth of a memtable, and costs little.
		checkEvery:    int(opts.MemTableSize / 8),
		memTableSize:  opts.MemTableSize,
		loadTableSize: defaultLoadTableSize,
		owner:         goid(),
		stallSince:    time.Now(),
		reads:         newFlushedReads(opts.MemTableSize),
	}

	if err := clearDir(fs, dir); err != nil {
		return nil, fmt.Errorf("state: open disk backend %s: %w", dir, err)
	}
	po := &pebble.Options{
		FS:                 fs,
		FormatMajorVersion: pebble.FormatNewest,
		// No crash recovery is needed: the directory is wiped on open.
		DisableWAL:   true,
		MemTableSize: opts.MemTableSize,
		// admit throttles writes instead of Pebble; see Disk.
		MemTableStopWritesThreshold: 1000,
		L0StopWritesThreshold:       1000,
		CacheSize:                   opts.CacheSize,
		Logger:                      pebbleLogger{d: d},
		EventListener: &pebble.EventListener{
			BackgroundError: func(err error) { d.fail(fmt.Errorf("background error: %w", err)) },
			DataCorruption:  func(info pebble.DataCorruptionInfo) { d.fail(errors.New(info.String())) },
			FlushEnd:        func(pebble.FlushInfo) { d.tablesChanged(); d.signalProgress() },
			CompactionEnd:   func(pebble.CompactionInfo) { d.tablesChanged(); d.signalProgress() },
		},
	}
	// A table ingested over keys still in a memtable would otherwise be
	// queued behind it, unseen by the fast read path's iterator until
	// flushed (flushedReads); Ingest flushes and waits instead.
	po.Experimental.DisableIngestAsFlushable = func() bool { return true }
	// Bloom filters let Get of a missing key, the first Get of every new
	// key, skip reading most tables.
	for i := range po.Levels {
		po.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := openPebble(dir, po)
	if err != nil {
		return nil, fmt.Errorf("state: open disk backend %s: %w", dir, err)
	}
	d.db = db
	// A Loader writes tables as Pebble would (filters, compression, block
	// sizes, the format this database reads), from the options with
	// Pebble's defaults filled in.
	wo := po.Clone()
	wo.EnsureDefaults()
	d.tableOpts = wo.MakeWriterOptions(0, db.TableFormat())
	return d, nil
}

// clearDir creates dir if needed and deletes everything in it. It holds
// Pebble's lock file meanwhile, so it fails rather than delete the files of a
// database open in this process.
func clearDir(fs vfs.FS, dir string) (err error) {
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create directory: %w", err)
	}
	lock, err := fs.Lock(fs.PathJoin(dir, lockFile))
	if err != nil {
		return fmt.Errorf("lock directory (still in use?): %w", err)
	}
	defer func() {
		if cerr := lock.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("unlock directory: %w", cerr)
		}
	}()
	names, err := fs.List(dir)
	if err != nil {
		return fmt.Errorf("list directory: %w", err)
	}
	for _, name := range names {
		if name == lockFile {
			continue
		}
		if err := fs.RemoveAll(fs.PathJoin(dir, name)); err != nil {
			return fmt.Errorf("remove earlier contents: %w", err)
		}
	}
	return nil
}

// Get returns the value of key in key group kg. The returned slice is a
// buffer of the Disk, valid until the next call of a method of the Disk.
func (d *Disk) Get(kg int32, key []byte) ([]byte, bool, error) {
	if err := d.check(kg); err != nil {
		return nil, false, err
	}
	d.keyBuf = appendKey(d.keyBuf[:0], kg, key)
	if e := d.ahead.find(d.keyBuf); e != nil {
		return d.getEntry(e)
	}
	return d.read(d.keyBuf, d.reads.hash(d.keyBuf))
}

// read returns the value of the encoded key k, whose hash is h, from Pebble:
// through the fast read path if no write of k may be in a memtable, else
// through Pebble's Get. The value is in d.getBuf.
func (d *Disk) read(k []byte, h uint64) ([]byte, bool, error) {
	if !d.reads.unflushed(h) {
		d.reads.fast++
		var found bool
		var err error
		d.getBuf, found, err = d.reads.get(d.db, d.tableChanges.Load(), k, d.getBuf)
		if err != nil {
			return nil, false, d.errorf("get", err)
		}
		if !found {
			return nil, false, nil
		}
		return slices.Clip(d.getBuf), true, nil
	}
	d.reads.slow++
	val, closer, err := d.db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, d.errorf("get", err)
	}
	d.getBuf = append(d.getBuf[:0], val...)
	if err := closer.Close(); err != nil {
		return nil, false, d.errorf("get", err)
	}
	return slices.Clip(d.getBuf), true, nil
}

// Put sets the value of key in key group kg. Pebble copies key and value.
// The write is not synced: see the type's documentation. The write of a key
// given to the last Prefetch is kept until the next Prefetch, Snapshot,
// DropRange or Load makes it.
func (d *Disk) Put(kg int32, key, value []byte) error {
	if err := checkKeyGroup(kg); err != nil {
		return err
	}
	d.keyBuf = appendKey(d.keyBuf[:0], kg, key)
	if kept, err := d.keep(value, true); kept {
		return err
	}
	if err := d.admit(len(key)+len(value), 1); err != nil {
		return err
	}
	full := d.reads.wrote(d.reads.hash(d.keyBuf), entryBytes(len(d.keyBuf), len(value)))
	if err := d.db.Set(d.keyBuf, value, pebble.NoSync); err != nil {
		return d.errorf("put", err)
	}
	return d.endGeneration(full)
}

// Delete removes key from key group kg. The deletion of a key given to the
// last Prefetch is kept, as Put's write is.
func (d *Disk) Delete(kg int32, key []byte) error {
	if err := checkKeyGroup(kg); err != nil {
		return err
	}
	d.keyBuf = appendKey(d.keyBuf[:0], kg, key)
	if kept, err := d.keep(nil, false); kept {
		return err
	}
	if err := d.admit(len(key), 1); err != nil {
		return err
	}
	full := d.reads.wrote(d.reads.hash(d.keyBuf), entryBytes(len(d.keyBuf), 0))
	if err := d.db.Delete(d.keyBuf, pebble.NoSync); err != nil {
		return d.errorf("delete", err)
	}
	return d.endGeneration(full)
}

// DropRange removes every key of the key groups [start, end) with one Pebble
// range deletion, whatever the number of keys.
func (d *Disk) DropRange(start, end int32) error {
	if err := checkRange(start, end); err != nil {
		return err
	}
	// The kept writes go first, and the range's deletion over them.
	if err := d.commitKept(); err != nil {
		return err
	}
	if err := d.admit(0, 1); err != nil {
		return err
	}
	if start == end {
		return nil
	}
	from, to := groupPrefix(start), groupPrefix(end)
	full := d.reads.wroteRange(entryBytes(len(from), len(to)))
	if err := d.db.DeleteRange(from, to, pebble.NoSync); err != nil {
		return d.errorf("drop key groups", err)
	}
	return d.endGeneration(full)
}

// endGeneration, if full, ends the generation of writes of the fast read
// path and has Pebble flush the memtable that holds its last write
// (flushedReads).
func (d *Disk) endGeneration(full bool) error {
	if !full {
		return nil
	}
	done, err := d.db.AsyncFlush()
	if err != nil {
		return d.errorf("flush", err)
	}
	d.reads.seal(done)
	return nil
}

// tablesChanged records a change to the set of Pebble's tables: Pebble
// calls it from its own goroutines at the end of a flush or compaction, and
// a Loader after each ingestion.
func (d *Disk) tablesChanged() { d.tableChanges.Add(1) }

// Snapshot returns a view of the state as of the call, backed by a Pebble
// snapshot. An open view keeps Pebble from discarding the versions of keys
// it can see, so views should be short-lived.
func (d *Disk) Snapshot() (View, error) {
	if err := d.commitKept(); err != nil {
		return nil, err
	}
	if err := d.usable(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.views++
	d.mu.Unlock()
	return &diskView{d: d, snap: d.db.NewSnapshot()}, nil
}

// Close closes the database, or, if views are still open, has the last of
// them close it when released. Close does not delete the directory's files;
// the next OpenDisk of the directory does.
func (d *Disk) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	open := d.views
	d.mu.Unlock()
	d.ahead.reset()      // scratch space: the kept writes go with the rest
	if !d.fatal.Load() { // see closeDB
		d.reads.closeIter()
	}
	if open > 0 {
		d.log.Warn("disk state backend closed with views open; the last view released closes it", "views", open)
		return nil
	}
	return d.closeDB()
}

// closeDB closes the database. It is called once, by Close or by the Release
// of the last view after Close.
func (d *Disk) closeDB() error {
	if d.fatal.Load() {
		d.log.Warn("disk state backend failed fatally: leaving its database open until the worker exits")
		return nil
	}
	if err := d.db.Close(); err != nil {
		return d.errorf("close", err)
	}
	return nil
}

// releaseView records that a view was released, closing the database if it
// was the last view and Close was called.
func (d *Disk) releaseView() {
	d.mu.Lock()
	d.views--
	last := d.closed && d.views == 0
	d.mu.Unlock()
	if last {
		if err := d.closeDB(); err != nil {
			d.log.Error("close disk state backend", "err", err)
		}
	}
}

// check returns an error if the backend is closed or failed, or kg is not a
// valid key group.
func (d *Disk) check(kg int32) error {
	if err := d.usable(); err != nil {
		return err
	}
	return checkKeyGroup(kg)
}

// usable returns ErrClosed after Close, the background error that failed the
// backend if any, and nil otherwise.
func (d *Disk) usable() error {
	if d.closed {
		return ErrClosed
	}
	if p := d.failure.Load(); p != nil {
		return *p
	}
	return nil
}

// admit returns nil when writes of about n bytes of keys and values, in the
// given number of entries, may go to Pebble. Every checkEvery bytes it
// checks whether Pebble is behind with flushes or level-0 compactions and if
// so waits until it catches up. It
// returns ErrClosed after Close and the failure of the backend, if any, as
// soon as it is recorded, waiting or not.
func (d *Disk) admit(n, entries int) error {
	if err := d.usable(); err != nil {
		return err
	}
	d.unchecked += n + entries*entryOverhead
	if d.unchecked < d.checkEvery {
		return nil
	}
	d.unchecked = 0
	d.reads.releaseStale(d.tableChanges.Load())
	var began, logged time.Time
	var first *pebble.Metrics // of the first check that made the write wait
	for {
		m := d.db.Metrics()
		if m.MemTable.Size < maxMemTables*d.memTableSize && m.Levels[0].Sublevels < maxL0Sublevels {
			if !began.IsZero() {
				d.noteStall(time.Since(began), first)
			}
			return nil
		}
		if began.IsZero() {
			began, logged, first = time.Now(), time.Now(), m
		} else if time.Since(logged) >= stallLogEvery {
			// A write that does not get in at all says so while it waits.
			logged = time.Now()
			d.log.Warn("disk state backend: a write is still waiting for Pebble's flushes and compactions",
				"waiting", time.Since(began).Round(time.Millisecond), "memtables_bytes", m.MemTable.Size,
				"l0_sublevels", m.Levels[0].Sublevels, "compactions_in_progress", m.Compact.NumInProgress)
		}
		select {
		case <-d.progress:
		case <-time.After(stallPoll):
		}
		if err := d.usable(); err != nil {
			return err
		}
	}
}

// stallLogEvery is the least time between two logs of write stalls.
const stallLogEvery = 10 * time.Second

// noteStall records that a write waited in admit, m being Pebble's metrics
// when it began to wait, and logs the waits once they add up to a second
// within a minute, at most every stallLogEvery: a map task that applies
// slowly because Pebble is behind says so.
func (d *Disk) noteStall(wait time.Duration, m *pebble.Metrics) {
	now := time.Now()
	if now.Sub(d.stallSince) > time.Minute {
		d.stalled, d.stalls, d.stallSince = 0, 0, now
	}
	d.stalled += wait
	d.stalls++
	if d.stalled < time.Second || now.Sub(d.stallLogged) < stallLogEvery {
		return
	}
	d.log.Warn("disk state backend: writes waited for Pebble's flushes and compactions",
		"waited", d.stalled.Round(time.Millisecond), "stalls", d.stalls, "within", now.Sub(d.stallSince).Round(time.Millisecond),
		"memtables_bytes_at_last_stall", m.MemTable.Size, "l0_sublevels_at_last_stall", m.Levels[0].Sublevels)
	d.stalled, d.stalls, d.stallSince, d.stallLogged = 0, 0, now, now
}

// signalProgress wakes a write waiting in admit, if any. Pebble calls it
// from its own goroutines, possibly holding its mutex, so it never blocks.
func (d *Disk) signalProgress() {
	select {
	case d.progress <- struct{}{}:
	default:
	}
}

// fail records err as the error that failed the backend, unless one is
// already recorded, and wakes a waiting write. Pebble calls it from its own
// goroutines.
func (d *Disk) fail(err error) {
	wrapped := fmt.Errorf("state: disk backend %s: %w", d.dir, err)
	if d.failure.CompareAndSwap(nil, &wrapped) {
		d.log.Error("disk state backend failed; every later call returns this error", "err", err)
		d.signalProgress()
	}
}

// errorf wraps err, returned by Pebble from op, with the directory.
func (d *Disk) errorf(op string, err error) error {
	return fmt.Errorf("state: disk backend %s: %s: %w", d.dir, op, err)
}

// diskView is the View of a Disk: a Pebble snapshot.
type diskView struct {
	d        *Disk
	snap     *pebble.Snapshot
	released atomic.Bool
	keyBuf   []byte // the encoded key of the current Get
	valBuf   []byte // the value Get last returned
	// iter serves Get: nil until the first, after an error, and once the
	// tables changed since it was made (iterAt, Disk.tableChanges then).
	iter   *pebble.Iterator
	iterAt uint64
}

// Get returns the value of key in key group kg as of the snapshot. The
// returned slice is a buffer of the view, valid until the next call of a
// method of the view.
//
// Get seeks one iterator of the snapshot rather than calling Pebble's Get,
// which builds one per call: a delta's changed keys are read in key order,
// and a seek to a later key than the last goes on from where that one
// stands. The iterator holds on to the memtables and tables of its time, so
// Get makes it anew once a flush or compaction changed them, as the fast
// read path does (flushedReads): a view read while the task writes on
// would otherwise keep retired memtables in memory and compacted tables on
// disk until it is released.
func (v *diskView) Get(kg int32, key []byte) ([]byte, bool, error) {
	if v.released.Load() {
		return nil, false, ErrReleased
	}
	if err := checkKeyGroup(kg); err != nil {
		return nil, false, err
	}
	if tables := v.d.tableChanges.Load(); v.iter == nil || v.iterAt != tables {
		v.closeIter()
		it, err := v.snap.NewIter(nil)
		if err != nil {
			return nil, false, v.d.errorf("snapshot get", err)
		}
		v.iter, v.iterAt = it, tables
	}
	v.keyBuf = appendKey(v.keyBuf[:0], kg, key)
	if !v.iter.SeekPrefixGE(v.keyBuf) || !bytes.Equal(v.iter.Key(), v.keyBuf) {
		if err := v.iter.Error(); err != nil {
			v.closeIter() // the next Get starts over with a new one
			return nil, false, v.d.errorf("snapshot get", err)
		}
		return nil, false, nil
	}
	val, err := v.iter.ValueAndErr()
	if err != nil {
		v.closeIter()
		return nil, false, v.d.errorf("snapshot get", err)
	}
	v.valBuf = append(v.valBuf[:0], val...)
	return slices.Clip(v.valBuf), true, nil
}

// closeIter closes Get's iterator, if any. Its error, if any, was returned
// by the Get that met it.
func (v *diskView) closeIter() {
	if v.iter != nil {
		_ = v.iter.Close()
		v.iter = nil
	}
}

// Range calls fn for every key of the key groups [start, end), iterating the
// snapshot over the contiguous range of encoded keys they form.
func (v *diskView) Range(start, end int32, fn func(kg int32, key, value []byte) error) (err error) {
	if v.released.Load() {
		return ErrReleased
	}
	if err := checkRange(start, end); err != nil {
		return err
	}
	if start == end {
		return nil
	}
	iter, err := v.snap.NewIter(&pebble.IterOptions{
		LowerBound: groupPrefix(start),
		UpperBound: groupPrefix(end),
	})
	if err != nil {
		return v.d.errorf("snapshot range", err)
	}
	defer func() {
		// Close reports any error the iteration met; fn's error comes first.
		if cerr := iter.Close(); cerr != nil && err == nil {
			err = v.d.errorf("snapshot range", cerr)
		}
	}()
	for ok := iter.First(); ok; ok = iter.Next() {
		k := iter.Key()
		if len(k) < 4 {
			return v.d.errorf("snapshot range", fmt.Errorf("stored key %x has no key group", k))
		}
		val, err := iter.ValueAndErr()
		if err != nil {
			return v.d.errorf("snapshot range", err)
		}
		if err := fn(int32(binary.BigEndian.Uint32(k)), k[4:], val); err != nil {
			return err
		}
	}
	return nil
}

// Release closes the snapshot.
func (v *diskView) Release() {
	if !v.released.CompareAndSwap(false, true) {
		return
	}
	v.closeIter()
	if err := v.snap.Close(); err != nil {
		v.d.log.Error("release disk state view", "err", err)
	}
	v.snap = nil
	v.d.releaseView()
}

// appendKey appends the Pebble key of key in key group kg to dst.
func appendKey(dst []byte, kg int32, key []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(kg))
	return append(dst, key...)
}

// groupPrefix returns the Pebble key that every key of key group kg starts
// with and sorts at or after. groupPrefix(kg+1) bounds key group kg above.
func groupPrefix(kg int32) []byte {
	return binary.BigEndian.AppendUint32(nil, uint32(kg))
}

// pebbleLogger passes Pebble's log messages to the Disk's logger.
type pebbleLogger struct{ d *Disk }

// Infof logs an informational message of Pebble.
func (l pebbleLogger) Infof(format string, args ...any) {
	l.d.log.Info("pebble: " + fmt.Sprintf(format, args...))
}

// Errorf logs an error Pebble met and handled.
func (l pebbleLogger) Errorf(format string, args ...any) {
	l.d.log.Error("pebble: " + fmt.Sprintf(format, args...))
}

// Fatalf fails the backend with an error Pebble cannot continue after and
// ends the calling goroutine, which Pebble expects (see Disk).
func (l pebbleLogger) Fatalf(format string, args ...any) {
	err := &fatalError{msg: "pebble: fatal: " + fmt.Sprintf(format, args...)}
	for _, a := range args {
		if e, ok := a.(error); ok {
			err.cause = e // so that errors.Is finds ENOSPC
		}
	}
	l.d.fatal.Store(true)
	l.d.fail(err)
	if goid() == l.d.owner {
		panic(fmt.Errorf("state: disk backend %s: %w", l.d.dir, err))
	}
	runtime.Goexit()
}

// fatalError is what Pebble reported through Fatalf.
type fatalError struct {
	msg   string
	cause error // the error among Fatalf's arguments, if any
}

func (e *fatalError) Error() string { return e.msg }
func (e *fatalError) Unwrap() error { return e.cause }

// openPebble is pebble.Open, turning a Fatalf during the open into its error.
func openPebble(dir string, opts *pebble.Options) (db *pebble.DB, err error) {
	defer recoverFatal(&err)
	return pebble.Open(dir, opts)
}

// recoverFatal, deferred by a call into Pebble on the writer's goroutine,
// turns the panic of a Fatalf during the call (pebbleLogger) into the call's
// error *err. Any other panic goes on.
func recoverFatal(err *error) {
	p := recover()
	if p == nil {
		return
	}
	var fe *fatalError
	if perr, ok := p.(error); !ok || !errors.As(perr, &fe) {
		panic(p)
	}
	*err = fe
}

// goid returns the id of the calling goroutine, from its stack trace's
// header ("goroutine 123 [running]:"). Go has no other way to tell a
// Pebble goroutine from the writer's.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, _ := strconv.ParseUint(string(b), 10, 64)
	return id
}
