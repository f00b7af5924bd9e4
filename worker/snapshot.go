package worker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/transport/storage"
	"github.com/coordflow/coordflow/worker/state"
)

// How a map task snapshots its keyed state (docs/state.md): inline in the ack
// while it is small, else as files in checkpoint storage. A file chain is a
// full file followed by deltas; a long chain's deltas are compacted into one,
// and a full file is written again once the deltas weigh half as much as it,
// so that a restore reads a bounded number of files.
const (
	// maxChainDeltas bounds the deltas after the full files of a chain: a
	// snapshot over that many writes one delta in place of them all.
	maxChainDeltas = 8
)

// errStateCorrupt marks restored state that failed verification or could
// not be read whole: the leader falls back to an older checkpoint.
var errStateCorrupt = errors.New("checkpoint state corrupt or missing")

// errDiskFull marks a failure to write the local state directory for lack
// of space.
var errDiskFull = errors.New("no space left on the state directory")

// snapshotMode is what kind of snapshot a capture writes.
type snapshotMode int

const (
	modeInline    snapshotMode = iota // a full file, inline in the ack
	modeFull                          // a full file in storage
	modeDelta                         // the changed keys, in storage, over a base chain
	modeSavepoint                     // a full file in the savepoint's own directory
)

// snapshotJob is one captured snapshot on its way to storage: the view
// taken at the barrier and everything needed to describe it. The map task's
// loop builds it; the snapshot writer goroutine consumes it.
type snapshotJob struct {
	id      uint64
	began   time.Time // when the barrier was aligned
	view    state.View
	kgStart int32
	kgEnd   int32
	mode    snapshotMode
	changed []changes // modeDelta: the keys changed since the base
	// compact (modeDelta) lists deltas the new delta replaces: their keys
	// are written again, with their values as of this snapshot.
	compact  []*transport.StateFile
	base     []*transport.StateFile
	applied  map[int32]int64
	keys     int64
	encoding string
	// sinkTxns are the sink transactions pre-committed and not committed.
	sinkTxns []*transport.SinkTxn
	// inlineLimit is the most bytes an inline snapshot may take; past it a
	// job with storage writes a full file instead, one without fails.
	inlineLimit int64
	// savepoint marks a savepoint's snapshot.
	savepoint bool
	// alignment is the time from the first to the last barrier.
	alignment time.Duration
	// recordsIn and recordsOut are the task's counts at the barrier.
	recordsIn, recordsOut int64
}

// snapshotResult is what the writer reports back to the task loop.
type snapshotResult struct {
	id        uint64
	began     time.Time
	mode      snapshotMode // what was written
	state     *transport.TaskState
	full      bool // the chain starts over with this snapshot's file
	savepoint bool // a savepoint: no base for later snapshots
	err       error
}

// errInlineTooBig stops an inline snapshot that outgrew its limit.
var errInlineTooBig = errors.New("state outgrew the inline limit")

// snapshotWriter writes captured snapshots: inline, or as files in
// checkpoint storage, with a copy in the worker's local cache for local
// recovery.
type snapshotWriter struct {
	store *storage.Store // nil: no checkpoint storage, inline only
	cache string         // local copies of written files; "" for none
	job   string
	task  string
	// attempt names files so that no other attempt can produce the same name.
	attempt uint64
	// failpoint is Config.Failpoint: failpointMidUpload is hit in every
	// upload, once it has begun and before it is complete.
	failpoint func(name string)
}

// failpointMidUpload is the failpoint (Config.Failpoint) a snapshot writer
// hits after the first bytes of a state file reached storage and before the
// file is complete: a crash there leaves a partial object, which no
// checkpoint may reference and the leader's collector must delete.
const failpointMidUpload = "worker-mid-upload"

// upload returns out, wrapped to hit failpointMidUpload after its first write
// when the writer has a failpoint hook.
func (w *snapshotWriter) upload(out io.Writer) io.Writer {
	if w.failpoint == nil {
		return out
	}
	return &midUpload{w: out, hit: w.failpoint}
}

// midUpload hits failpointMidUpload once, after the first bytes written to w.
type midUpload struct {
	w   io.Writer
	hit func(name string)
	hot bool // hit already
}

func (m *midUpload) Write(p []byte) (int, error) {
	n, err := m.w.Write(p)
	if n > 0 && !m.hot {
		m.hot = true
		m.hit(failpointMidUpload)
	}
	return n, err
}

// write turns job into a task state, and releases its view.
func (w *snapshotWriter) write(ctx context.Context, job *snapshotJob) snapshotResult {
	r := w.writeMode(ctx, job)
	r.began = job.began
	return r
}

// String names a mode in metrics.
func (m snapshotMode) String() string {
	switch m {
	case modeInline:
		return "inline"
	case modeFull:
		return "full"
	case modeDelta:
		return "delta"
	case modeSavepoint:
		return "savepoint"
	}
	return "unknown"
}

// writeMode writes job inline or as a file, as its mode (and the inline
// limit) says.
func (w *snapshotWriter) writeMode(ctx context.Context, job *snapshotJob) snapshotResult {
	defer job.view.Release()
	st := &transport.TaskState{
		Kind:          transport.TaskKind_TASK_KIND_MAP,
		Applied:       job.applied,
		SinkTxns:      job.sinkTxns,
		ValueEncoding: job.encoding,
		Keys:          job.keys,
		AlignmentUs:   job.alignment.Microseconds(),
		RecordsIn:     job.recordsIn,
		RecordsOut:    job.recordsOut,
	}
	mode := job.mode
	if mode == modeInline {
		data, sum, err := w.inline(ctx, job)
		switch {
		case err == nil:
			st.Keyed, st.KeyedSha256, st.StateBytes = data, sum, int64(len(data))
			return snapshotResult{id: job.id, state: st, full: true, savepoint: job.savepoint, mode: modeInline}
		case errors.Is(err, errInlineTooBig) && w.store != nil:
			mode = modeFull
		case errors.Is(err, errInlineTooBig):
			return snapshotResult{id: job.id, err: fmt.Errorf("keyed state is larger than %d bytes and the job has no checkpoint storage: set checkpoint.storage in the job spec or -checkpoint-storage on coordd", job.inlineLimit)}
		default:
			return snapshotResult{id: job.id, err: err}
		}
	}
	if len(job.compact) > 0 {
		keys, err := w.deltaKeys(ctx, job.compact)
		if err != nil {
			return snapshotResult{id: job.id, err: fmt.Errorf("compact %d deltas: %w", len(job.compact), err)}
		}
		job.changed = append(job.changed, keys)
	}
	file, err := w.file(ctx, job, mode)
	if err != nil {
		return snapshotResult{id: job.id, err: err}
	}
	st.StateBytes = file.GetSize()
	if mode == modeDelta {
		st.Files = append(append([]*transport.StateFile(nil), job.base...), file)
	} else {
		st.Files = []*transport.StateFile{file}
	}
	return snapshotResult{id: job.id, state: st, full: mode == modeFull, savepoint: mode == modeSavepoint, mode: mode}
}

// deltaKeys returns every key the delta files hold (values and tombstones
// alike), reading the local copies where they are.
func (w *snapshotWriter) deltaKeys(ctx context.Context, files []*transport.StateFile) (changes, error) {
	src := &restoreSource{store: w.store, cache: w.cache}
	keys := make(changes)
	for _, f := range files {
		rd, release, err := src.open(ctx, f)
		if err != nil {
			return nil, err
		}
		err = rd.Range(0, statefile.MaxKeyGroups, func(kg int32, key, _ []byte, _ bool) error {
			g := keys[kg]
			if g == nil {
				g = make(map[string]struct{})
				keys[kg] = g
			}
			g[string(key)] = struct{}{}
			return nil
		})
		release()
		if err != nil {
			return nil, fmt.Errorf("state file %s: %w", f.GetPath(), err)
		}
	}
	return keys, nil
}

// limitWriter fails once more than n bytes were written to it.
type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > l.n {
		return 0, errInlineTooBig
	}
	l.n -= int64(len(p))
	return l.w.Write(p)
}

// inline encodes the whole state as one full state file in memory.
func (w *snapshotWriter) inline(ctx context.Context, job *snapshotJob) ([]byte, string, error) {
	var buf bytes.Buffer
	sum, err := writeState(ctx, &limitWriter{w: &buf, n: job.inlineLimit}, job, modeFull)
	if err != nil {
		return nil, "", err
	}
	return buf.Bytes(), hex.EncodeToString(sum.SHA256[:]), nil
}

// writeState writes the state file of job in mode (full or delta) to out.
func writeState(ctx context.Context, out io.Writer, job *snapshotJob, mode snapshotMode) (statefile.Summary, error) {
	kind := statefile.Full
	if mode == modeDelta {
		kind = statefile.Delta
	}
	fw, err := statefile.NewWriter(out, kind)
	if err != nil {
		return statefile.Summary{}, err
	}
	// A stopping task must not wait for a large snapshot to be written out.
	var n int
	add := func(kg int32, key, value []byte) error {
		if n++; n%restoreCheckEvery == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		return fw.Add(kg, key, value)
	}
	if mode == modeDelta {
		if err := writeDelta(ctx, fw, job); err != nil {
			return statefile.Summary{}, err
		}
	} else if err := job.view.Range(job.kgStart, job.kgEnd, add); err != nil {
		return statefile.Summary{}, err
	}
	return fw.Close()
}

// deltaScanShare is the share of a key group's keys changed (one in
// deltaScanShare) from which writeDelta reads the group by a scan rather
// than a lookup per changed key: about where the two cost the same on the
// disk backend (BenchmarkDeltaKeyGroup, docs/benchmarks.md "A delta's
// reads: lookups or a scan").
const deltaScanShare = 8

// writeDelta writes the changed keys of job with their values as of its
// view, and tombstones for those deleted. A key group where many keys
// changed is read in one ordered scan merged with its changed keys; one
// where few did, by a lookup per key (deltaScanShare).
func writeDelta(ctx context.Context, fw *statefile.Writer, job *snapshotJob) error {
	perGroup := job.keys / int64(max(1, job.kgEnd-job.kgStart))
	for _, g := range changedGroups(job.changed) {
		if err := ctx.Err(); err != nil {
			return err
		}
		write := deltaByScan
		if int64(len(g.keys))*deltaScanShare < perGroup {
			write = deltaByLookups
		}
		if err := write(fw, job.view, g.kg, g.keys); err != nil {
			return err
		}
	}
	return nil
}

// deltaByLookups writes the delta of key group kg, whose changed keys are
// keys (sorted), by a lookup of each in view.
func deltaByLookups(fw *statefile.Writer, view state.View, kg int32, keys []string) error {
	for _, k := range keys {
		v, ok, err := view.Get(kg, []byte(k))
		switch {
		case err != nil:
			return fmt.Errorf("read key group %d: %w", kg, err)
		case ok:
			err = fw.Add(kg, []byte(k), v)
		default:
			err = fw.Delete(kg, []byte(k))
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// deltaByScan writes the delta of key group kg, whose changed keys are keys
// (sorted), by a scan of the key group in view merged with keys.
func deltaByScan(fw *statefile.Writer, view state.View, kg int32, keys []string) error {
	i := 0
	err := view.Range(kg, kg+1, func(_ int32, key, value []byte) error {
		for ; i < len(keys) && keys[i] < string(key); i++ {
			if err := fw.Delete(kg, []byte(keys[i])); err != nil {
				return err
			}
		}
		if i < len(keys) && keys[i] == string(key) {
			i++
			return fw.Add(kg, key, value)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("read key group %d: %w", kg, err)
	}
	for ; i < len(keys); i++ {
		if err := fw.Delete(kg, []byte(keys[i])); err != nil {
			return err
		}
	}
	return nil
}

// path names the file of checkpoint id in storage: unique per job,
// checkpoint, task and attempt, so no two writers ever produce one name. The
// coordinator's garbage collector reads the checkpoint id back from it.
func (w *snapshotWriter) path(id uint64, mode snapshotMode) string {
	if mode == modeSavepoint {
		return fmt.Sprintf("%s%s-a%d.cfs", transport.SavepointDir(w.job, id), w.task, w.attempt)
	}
	kind := "full"
	if mode == modeDelta {
		kind = "delta"
	}
	return fmt.Sprintf("%s%s-a%d-%s.cfs", transport.CheckpointDir(w.job, id), w.task, w.attempt, kind)
}

// file writes job as a state file: first to the local cache (when there is
// one), then to checkpoint storage from there.
func (w *snapshotWriter) file(ctx context.Context, job *snapshotJob, mode snapshotMode) (*transport.StateFile, error) {
	path := w.path(job.id, mode)
	var (
		h   storage.Handle
		err error
	)
	if w.cache != "" && mode != modeSavepoint {
		h, err = w.viaCache(ctx, job, mode, path)
	} else {
		h, err = w.store.Create(ctx, path, func(out io.Writer) error {
			_, err := writeState(ctx, w.upload(out), job, mode)
			return err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("write state file %s to %s: %w", path, w.store.URL(), err)
	}
	return &transport.StateFile{
		Path: h.Path, Size: h.Size, Sha256: h.SHA256,
		KeyGroupStart: job.kgStart, KeyGroupEnd: job.kgEnd, Full: mode != modeDelta,
	}, nil
}

// viaCache writes the file locally, then uploads the local copy, which stays
// for local recovery.
func (w *snapshotWriter) viaCache(ctx context.Context, job *snapshotJob, mode snapshotMode, path string) (storage.Handle, error) {
	local := filepath.Join(w.cache, filepath.FromSlash(path))
	if err := os.MkdirAll(filepath.Dir(local), 0o755); err != nil {
		return storage.Handle{}, localError(err)
	}
	f, err := os.Create(local)
	if err != nil {
		return storage.Handle{}, localError(err)
	}
	sum, err := writeState(ctx, f, job, mode)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(local)
		return storage.Handle{}, localError(err)
	}
	h, err := w.store.Create(ctx, path, func(out io.Writer) error {
		in, err := os.Open(local)
		if err != nil {
			return err
		}
		defer in.Close()
		_, err = io.Copy(w.upload(out), in)
		return err
	})
	if err != nil {
		_ = os.Remove(local)
		return h, err
	}
	if want := hex.EncodeToString(sum.SHA256[:]); !strings.EqualFold(h.SHA256, want) {
		_ = os.Remove(local)
		return h, fmt.Errorf("uploaded %s hashes to %s, the local file to %s", path, h.SHA256, want)
	}
	// The worker's cache sweeps copies nothing wrote lately until the task
	// holds them, which it does once it has this result: a long upload
	// must not age the copy meanwhile.
	now := time.Now()
	_ = os.Chtimes(local, now, now)
	return h, nil
}

// localError marks a full local disk as such, keeping the error's text.
func localError(err error) error {
	if errors.Is(err, syscall.ENOSPC) && !errors.Is(err, errDiskFull) {
		return fmt.Errorf("%w: %w", errDiskFull, err)
	}
	return err
}

// restoreSource opens the state files of one restored blob for reading,
// preferring a verified local copy over a download.
type restoreSource struct {
	store  *storage.Store
	cache  string
	local  int // files read from the local cache
	remote int // files read from storage
	// progress, if set, is called now and then with the keys loaded so far.
	progress func(keys int64)
}

// restoreCheckEvery is how many keys a restore loads between two checks of
// its context and two progress reports.
const restoreCheckEvery = 1 << 14

// open returns a reader over f, and a function that releases it.
func (r *restoreSource) open(ctx context.Context, f *transport.StateFile) (*statefile.Reader, func(), error) {
	if r.cache != "" {
		if rd, closeFn, ok := r.openLocal(f); ok {
			r.local++
			return rd, closeFn, nil
		}
	}
	if r.store == nil {
		return nil, nil, fmt.Errorf("%w: state file %s is in checkpoint storage, but the task has none configured", errStateCorrupt, f.GetPath())
	}
	ra, err := r.store.ReaderAt(ctx, f.GetPath(), f.GetSize())
	if err != nil {
		if errors.Is(err, storage.ErrNotExist) {
			return nil, nil, fmt.Errorf("%w: state file %s: %w", errStateCorrupt, f.GetPath(), err)
		}
		return nil, nil, fmt.Errorf("open state file %s: %w", f.GetPath(), err)
	}
	rd, err := statefile.NewReader(ra, f.GetSize())
	if err != nil {
		_ = ra.Close()
		// Only what the file says, or its absence, condemns the
		// checkpoint: a storage that failed to answer (a timeout, a 503)
		// fails the restore as any error does, and the next restore tries
		// the same checkpoint, rather than fall back to an older one whose
		// sink output after it the sink has committed already.
		if condemns(err) {
			return nil, nil, fmt.Errorf("%w: state file %s: %w", errStateCorrupt, f.GetPath(), err)
		}
		return nil, nil, fmt.Errorf("open state file %s: %w", f.GetPath(), err)
	}
	r.remote++
	return rd, func() { _ = ra.Close() }, nil
}

// openLocal opens the cached copy of f if it is there and its SHA-256 is
// the recorded one.
func (r *restoreSource) openLocal(f *transport.StateFile) (*statefile.Reader, func(), bool) {
	file, err := os.Open(filepath.Join(r.cache, filepath.FromSlash(f.GetPath())))
	if err != nil {
		return nil, nil, false
	}
	h := sha256.New()
	n, err := io.Copy(h, file)
	if err != nil || n != f.GetSize() || !strings.EqualFold(hex.EncodeToString(h.Sum(nil)), f.GetSha256()) {
		_ = file.Close()
		return nil, nil, false
	}
	rd, err := statefile.NewReader(file, n)
	if err != nil {
		_ = file.Close()
		return nil, nil, false
	}
	return rd, func() { _ = file.Close() }, true
}

// bulkLoader is a backend that loads sorted entries into an empty key-group
// range faster than one Put per key: the disk backend, which writes and
// ingests Pebble tables (state.Disk.Load).
type bulkLoader interface {
	Load(start, end int32) (*state.Loader, error)
}

// restoreLoadMin is the fewest entries for which a restore uses a
// bulkLoader: a load writes, syncs and ingests at least one table, about
// 2 ms, which Put beats for a few thousand keys.
const restoreLoadMin = 1 << 13

// restoreBlob loads the key groups [start, end) of one restored task state
// into b and returns how many keys it put.
//
// Merge gives the entries in strictly increasing (key group, key) order, so
// on a backend that can bulk load they go into Pebble tables that are
// ingested, instead of one Put each. A bulk load needs the range empty,
// which it is unless an earlier blob of the same restore covered some of
// these key groups; then, as on the memory backend, every key is Put. A
// restore that fails or is cancelled midway leaves a bulk-loaded range
// empty, and a Put-loaded one with the keys put so far.
func (r *restoreSource) restoreBlob(ctx context.Context, blob *transport.KeyedBlob, b state.Backend, start, end int32) (int64, error) {
	if s := blob.GetKeyGroupStart(); s > start {
		start = s
	}
	if e := blob.GetKeyGroupEnd(); e != 0 && e < end {
		end = e
	}
	var sources []statefile.Source
	if files := blob.GetFiles(); len(files) > 0 {
		for _, f := range files {
			if f.GetKeyGroupEnd() <= start || end <= f.GetKeyGroupStart() {
				continue // none of our key groups
			}
			rd, release, err := r.open(ctx, f)
			if err != nil {
				return 0, err
			}
			defer release()
			sources = append(sources, rd)
		}
	} else {
		rd, err := statefile.OpenInline(blob.GetData(), blob.GetSha256())
		if err != nil {
			return 0, fmt.Errorf("%w: inline state of task %q: %w", errStateCorrupt, blob.GetTaskId(), err)
		}
		sources = append(sources, rd)
	}
	put := b.Put
	var loader *state.Loader
	if bl, ok := b.(bulkLoader); ok && start < end && entriesIn(sources, start, end) >= restoreLoadMin {
		l, err := bl.Load(start, end)
		switch {
		case err == nil:
			loader, put = l, l.Add
		case errors.Is(err, state.ErrRangeNotEmpty):
			// Put, which keeps the keys already there.
		default:
			return 0, err
		}
	}
	var keys int64
	err := statefile.Merge(sources, start, end, func(kg int32, key, value []byte) error {
		keys++
		if keys%restoreCheckEvery == 0 {
			// A restore of a large state takes a while: a superseded task
			// must stop promptly, and the leader must see it progress.
			if err := ctx.Err(); err != nil {
				return err
			}
			if r.progress != nil {
				r.progress(keys)
			}
		}
		return put(kg, key, value)
	})
	if loader != nil {
		if err == nil {
			err = loader.Finish()
		} else if aerr := loader.Abort(); aerr != nil {
			err = fmt.Errorf("%w; undoing the partial bulk load: %w", err, aerr)
		}
	}
	if err != nil && condemns(err) {
		return 0, fmt.Errorf("%w: state of task %q: %w", errStateCorrupt, blob.GetTaskId(), err)
	}
	return keys, err
}

// condemns reports whether err, from reading a checkpoint's state file,
// says the checkpoint is bad: the file's content is wrong, it is shorter
// than recorded, or it is gone. A storage that failed to answer does not.
func condemns(err error) bool {
	return errors.Is(err, statefile.ErrCorrupt) || errors.Is(err, storage.ErrCorrupt) || errors.Is(err, storage.ErrNotExist)
}

// entriesIn returns how many entries (values and tombstones) sources hold in
// the key groups [start, end): at least the keys a merge of them gives.
func entriesIn(sources []statefile.Source, start, end int32) int64 {
	var n int64
	for _, s := range sources {
		for _, g := range s.Groups() {
			if start <= g.KeyGroup && g.KeyGroup < end {
				n += g.Entries
			}
		}
	}
	return n
}
