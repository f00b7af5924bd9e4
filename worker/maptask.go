package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
	"github.com/coordflow/coordflow/worker/state"
)

const (
	// localChannelDepth is how many messages an in-process channel buffers,
	// standing in for gRPC's flow-control window.
	localChannelDepth = 16
	// sinkFlushInterval bounds how long sink output waits in the buffer.
	sinkFlushInterval = 100 * time.Millisecond
)

// errMapStopped is returned to inputs of a map task that has stopped.
var errMapStopped = errors.New("map task stopped")

// errInputReplaced is returned to an input whose place a newer channel of the
// same source took (a reopened channel, or a restored source's).
var errInputReplaced = errors.New("input replaced by a newer channel of its source")

// errOlderSource refuses a channel from an older attempt of a source than the
// one the map task's input comes from: a zombie never feeds the task.
var errOlderSource = errors.New("channel from an older source attempt")

// mapRegistry is where a map task makes itself reachable for data channels
// once its state is restored.
type mapRegistry interface {
	registerMap(*mapTask)
	unregisterMap(*mapTask)
}

// mapTask owns the keyed state of one key-group range. Its task loop is the
// only goroutine that touches the state; one goroutine per input (a Data
// server handler, or a local one for in-process channels) reads the input and
// forwards to the loop, and after a barrier waits for the loop to release it.
// A snapshot is captured on the loop (a consistent view of the backend) and
// written by the task's snapshot goroutine while the loop goes on.
type mapTask struct {
	env        *taskEnv
	key        taskKey
	log        *slog.Logger
	op         operator.Operator
	numSources int
	// token is the attempt's data-channel credential: a channel that does
	// not present it is refused before it can attach as an input.
	token     string
	kgStart   int32
	kgEnd     int32
	restoreID uint64
	// partial marks a task restored by task-scoped recovery: it keeps the
	// restored checkpoint's applied offsets, to drop what surviving sources
	// send again.
	partial   bool
	blobs     []*transport.KeyedBlob
	sinkSpec  *transport.SinkSpec
	stateSpec *transport.StateSpec
	reg       mapRegistry
	control   <-chan control

	// ctx is the task's context: set by run before the task is registered,
	// read by input goroutines.
	ctx    context.Context
	events chan inputEvent

	mu      sync.Mutex
	inputs  []*input       // by source index: the newest attached; nil until connected
	gens    uint64         // inputs attached so far: the next input's generation
	stopped bool           // no more inputs may attach
	wg      sync.WaitGroup // in-process input goroutines

	// live is, by source index, the input the task loop takes events from:
	// the newest whose attachment the loop has seen. An event of any other
	// input is stale and dropped. Task loop only.
	live []*input

	// Task loop only.
	keyed *keyedState
	item  itemContext
	batch batchApplier
	// prefetch is the backend if it reads a batch's keys ahead (the disk
	// backend), else nil; batchKeys gathers those keys.
	prefetch  prefetcher
	batchKeys batchKeys
	writer    *snapshotWriter
	snaps     chan *snapshotJob    // to the snapshot goroutine
	results   chan snapshotResult  // from it
	acked     map[uint64]chainInfo // acked snapshots not known complete
	baseID    uint64               // the completed checkpoint base describes
	base      chainInfo            // what the next delta builds on
	fullSize  int64                // bytes of the last full snapshot
	// cached lists the local copies of state files this task wrote.
	cached []string
	// restoredLocal and restoredRemote count the state files the restore
	// read from the local cache and from checkpoint storage.
	restoredLocal, restoredRemote int
	// barrierLast is the last_completed the barriers of checkpoint id carry.
	barrierLast struct {
		id, last  uint64
		savepoint bool
		// ahead says why the task's state is ahead of a barrier's
		// offsets ("" if it is not): the checkpoint is declined.
		ahead string
	}
	align *aligner
	sink  *sink
	in    prometheus.Counter
	out   prometheus.Counter
	// recordsIn and recordsOut count the items applied and the outputs
	// emitted since the task started, for its acks (TaskState.records_in/out).
	recordsIn, recordsOut int64
	skipped               prometheus.Counter
	duplicates            prometheus.Counter
	ackedN                prometheus.Counter
	declined              prometheus.Counter
	aligned               prometheus.Observer
}

// chainInfo describes the state files of one snapshot: the chain a delta can
// build on. An inline snapshot has no files and is no base for a delta.
type chainInfo struct {
	files      []*transport.StateFile
	fullBytes  int64
	deltaBytes int64
	deltas     int
}

// maxAcked bounds the acked snapshots a map task remembers while it waits
// to learn which completed.
const maxAcked = 16

// restoreReportEvery is how often a restoring map task tells the leader it
// progresses (a DEPLOYING status), so that a long restore is not taken for a
// stuck deploy.
const restoreReportEvery = 2 * time.Second

// input is one connected channel of a source of a map task. A source may
// connect again (its stream broke, or task-scoped recovery restored it
// elsewhere): the new channel's input takes the old one's place if its
// source attempt is at least as new (attach).
type input struct {
	idx int
	// sourceAttempt is the attempt of the sending source task
	// (ChannelHeader.source_attempt).
	sourceAttempt uint64
	// gen orders the inputs of a task by attachment: a newer input of the
	// same source has a higher gen.
	gen     uint64
	release chan struct{} // capacity 1; the loop releases a blocked input here
	// gone is closed when a newer input took this one's place: its goroutine
	// forwards nothing more and returns errInputReplaced.
	gone chan struct{}
	// recycle takes back the buffers of applied batches, for an in-process
	// input whose source reuses them; nil for a remote one.
	recycle chan<- []byte
}

// inputEvent is what an input goroutine forwards to the task loop: its
// attachment (attached, always its first event), a packed batch, a barrier
// (barrier != 0) or the end of the input (closed). in says which input sent
// it, so that the loop drops the events of an input that was replaced.
type inputEvent struct {
	input         int
	in            *input
	attached      bool
	batch         []byte
	recycle       chan<- []byte // where batch goes once applied (input.recycle)
	barrier       uint64
	offsets       map[int32]int64 // with barrier: the source's next offsets
	namesAll      bool            // with barrier: offsets name every partition (Barrier.names_all)
	lastCompleted uint64          // with barrier
	savepoint     bool            // with barrier
	closed        bool
	err           error
}

func newMapTask(env *taskEnv, d *transport.DeployTask, ctl <-chan control, reg mapRegistry, log *slog.Logger) (*mapTask, error) {
	k := keyOf(d.GetTask())
	op, ok := env.operators.Lookup(d.GetOperator())
	if !ok {
		return nil, fmt.Errorf("unknown operator %q (this worker has %s)", d.GetOperator(), strings.Join(env.operators.Names(), ", "))
	}
	if d.GetNumSources() <= 0 {
		return nil, fmt.Errorf("deploy of map task %s: num_sources is %d, want at least 1", k.id, d.GetNumSources())
	}
	maxPar := d.GetMaxParallelism()
	if maxPar <= 0 || maxPar > fsm.MaxKeyGroups {
		return nil, fmt.Errorf("deploy of map task %s: max_parallelism %d is not within [1, %d]", k.id, maxPar, fsm.MaxKeyGroups)
	}
	var own *transport.MapTaskRef
	for _, mt := range d.GetMapTasks() {
		if mt.GetTaskId() == k.id {
			own = mt
		}
	}
	if own == nil {
		return nil, fmt.Errorf("deploy of map task %s: map_tasks has no entry for it, so its key-group range is unknown", k.id)
	}
	start, end := own.GetKeyGroupStart(), own.GetKeyGroupEnd()
	if start < 0 || end > maxPar || start >= end {
		return nil, fmt.Errorf("deploy of map task %s: key-group range [%d, %d) is not within [0, %d)", k.id, start, end, maxPar)
	}
	var sinkSpec *transport.SinkSpec
	if d.GetSink().GetTopic() != "" {
		sinkSpec = d.GetSink()
	}
	stateSpec := d.GetState()
	if stateSpec == nil {
		stateSpec = &transport.StateSpec{Backend: fsm.DefaultStateBackend, InlineThreshold: fsm.DefaultInlineThreshold}
	}
	switch stateSpec.GetBackend() {
	case "memory", "disk":
	default:
		return nil, fmt.Errorf("deploy of map task %s: state backend %q: want \"memory\" or \"disk\"", k.id, stateSpec.GetBackend())
	}
	m := &mapTask{
		env:        env,
		key:        k,
		log:        log.With("kind", kindMap, "key_groups", fmt.Sprintf("[%d,%d)", start, end)),
		op:         op,
		numSources: int(d.GetNumSources()),
		token:      d.GetChannelToken(),
		kgStart:    start,
		kgEnd:      end,
		restoreID:  d.GetRestoreCheckpointId(),
		partial:    d.GetPartial(),
		blobs:      d.GetRestoreKeyed(),
		sinkSpec:   sinkSpec,
		stateSpec:  stateSpec,
		reg:        reg,
		control:    ctl,
		events:     make(chan inputEvent),
		inputs:     make([]*input, d.GetNumSources()),
		live:       make([]*input, d.GetNumSources()),
		snaps:      make(chan *snapshotJob, 1),
		results:    make(chan snapshotResult, 1),
		acked:      make(map[uint64]chainInfo),
		align:      newAligner(int(d.GetNumSources())),
		in:         env.metrics.recordsIn.WithLabelValues(k.job, kindMap, k.id),
		out:        env.metrics.recordsOut.WithLabelValues(k.job, kindMap, k.id),
		skipped:    env.metrics.recordsSkipped.WithLabelValues(k.job, d.GetOperator()),
		duplicates: env.metrics.duplicates.WithLabelValues(k.job),
		ackedN:     env.metrics.checkpointsAcked.WithLabelValues(k.job, kindMap),
		declined:   env.metrics.checkpointsDecl.WithLabelValues(k.job, kindMap),
		aligned:    env.metrics.alignment.WithLabelValues(k.job),
	}
	return m, nil
}

// openBackend opens the task's state backend: memory, or a fresh disk
// database in a directory of its own under the worker's state directory,
// removed again when the task ends.
func (m *mapTask) openBackend() (state.Backend, func(), error) {
	if m.stateSpec.GetBackend() != "disk" {
		b := state.NewMemory()
		return b, func() { _ = b.Close() }, nil
	}
	dir := filepath.Join(m.env.cfg.StateDir, "db", m.key.job, fmt.Sprintf("%s-a%d", m.key.id, m.key.attempt))
	b, err := state.OpenDisk(dir, state.DiskOptions{Logger: m.log})
	if err != nil {
		return nil, nil, localError(fmt.Errorf("open disk state backend: %w", err))
	}
	return b, func() {
		if err := b.Close(); err != nil {
			m.log.Warn("close disk state backend", "dir", dir, "err", err)
		}
		if err := os.RemoveAll(dir); err != nil {
			m.log.Warn("remove disk state directory", "dir", dir, "err", err)
		}
	}, nil
}

func (m *mapTask) run(ctx context.Context, running func()) error {
	ctx, cancel := context.WithCancel(ctx)
	m.ctx = ctx
	defer func() {
		m.reg.unregisterMap(m)
		// A task that stopped has no state here any more.
		m.env.metrics.stateKeys.DeleteLabelValues(m.key.job, m.key.id)
		m.env.metrics.stateSize.DeleteLabelValues(m.key.job, m.key.id)
		cancel()
		m.mu.Lock()
		m.stopped = true
		m.mu.Unlock()
		m.wg.Wait()
		// Its local copies stay a while, for a restart here; then the
		// worker's cache sweeps them away.
		m.env.cache.release(m.key)
	}()

	backend, closeBackend, err := m.openBackend()
	if err != nil {
		return err
	}
	defer closeBackend()
	// The snapshot goroutine reads views of the backend: it stops, and the
	// views it did not get to are released, before the backend closes.
	var writers sync.WaitGroup
	defer func() {
		cancel()
		writers.Wait()
		for {
			select {
			case job := <-m.snaps:
				job.view.Release()
			default:
				return
			}
		}
	}()
	m.writer = &snapshotWriter{job: m.key.job, task: m.key.id, attempt: m.key.attempt, failpoint: m.env.cfg.Failpoint}
	if url := m.stateSpec.GetStorage(); url != "" {
		if m.writer.store, err = m.env.stores.Get(ctx, url); err != nil {
			return fmt.Errorf("open checkpoint storage: %w", err)
		}
		if m.env.cfg.StateDir != "" {
			m.writer.cache = filepath.Join(m.env.cfg.StateDir, "cache")
		}
	}
	// Only incremental snapshots, which need storage, read the changed keys.
	m.keyed = newKeyedState(backend, m.writer.store != nil)
	if err := m.restore(ctx); err != nil {
		return fmt.Errorf("restore checkpoint %d: %w", m.restoreID, err)
	}
	if m.sinkSpec != nil {
		// Neither fails for want of the sink's brokers or topic: the sink
		// then starts held, the task runs and declines checkpoints, and the
		// sink recovers the restored transactions before its first write.
		m.sink, err = openSink(ctx, m.env, m.key, m.sinkSpec, m.log)
		if err != nil {
			return err
		}
		defer m.sink.close()
		if m.sink.txn != nil {
			restored, tasks := m.restoredTxns()
			if err := m.sink.txn.recover(restored, tasks); err != nil {
				return fmt.Errorf("recover sink transactions of checkpoint %d: %w", m.restoreID, err)
			}
		}
	}
	m.item = itemContext{s: m.keyed, sink: m.sink != nil, emit: m.emit}
	m.batch = batchApplier{m: m}
	m.prefetch, _ = backend.(prefetcher)

	writers.Add(1)
	go func() {
		defer writers.Done()
		m.writeSnapshots(ctx)
	}()

	m.reg.registerMap(m)
	running()

	var flush <-chan time.Time
	if m.sink != nil {
		t := time.NewTicker(sinkFlushInterval)
		defer t.Stop()
		flush = t.C
	}
	// However the loop ends while the task is stopping (a write cut short
	// by the stop returns its error), the completion notices queued by
	// then still get their commits, before the sink closes.
	defer func() {
		if ctx.Err() != nil {
			m.lastCompletions()
		}
	}()
	for {
		events := m.events
		if m.sink != nil && m.sink.full() {
			// The sink cannot write and holds enough: the inputs wait, and
			// their barriers with them, until a flush gets through.
			events = nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-flush:
			if err := m.sink.flush(); err != nil && !errors.Is(err, errSinkUnavailable) {
				return err
			}
		case ev := <-events:
			if err := m.handle(ev); err != nil {
				return err
			}
		case r := <-m.results:
			if err := m.snapshotDone(r); err != nil {
				return err
			}
		case c := <-m.control:
			if c.complete != 0 {
				if err := m.completed(c.complete, c.savepoint); err != nil {
					return err
				}
			}
			if r := c.retarget; r != nil {
				// The sources act on it; this task sees its effect as
				// inputs replaced by reopened channels (attach).
				m.log.Info("job retargeted by task-scoped recovery", "job_attempt", r.GetAttempt(),
					"restored", r.GetRestored(), "restore_checkpoint", r.GetRestoreCheckpointId())
			}
		}
	}
}

// lastCompletions handles the completion notices still queued when the task
// is stopped: the one of a stop-with-savepoint comes just before the stop,
// and its sink transactions are best committed now rather than at the next
// restore.
func (m *mapTask) lastCompletions() {
	for {
		select {
		case c := <-m.control:
			if c.complete != 0 {
				if err := m.completed(c.complete, c.savepoint); err != nil {
					m.log.Warn("completion notice after stop", "checkpoint", c.complete, "err", err)
				}
			}
		default:
			return
		}
	}
}

// restoredTxns returns the sink transactions the restored checkpoint
// promises, and the tasks of that checkpoint whose transactional ids this
// task fences: its own, and (after a rescale) those of the old tasks whose
// key groups begin in its range, so that each old task has one owner.
func (m *mapTask) restoredTxns() ([]*transport.SinkTxn, []string) {
	var txns []*transport.SinkTxn
	tasks := []string{m.key.id}
	for _, b := range m.blobs {
		txns = append(txns, b.GetSinkTxns()...)
		if id := b.GetTaskId(); id != m.key.id && b.GetKeyGroupStart() >= m.kgStart && b.GetKeyGroupStart() < m.kgEnd && b.GetKeyGroupEnd() > 0 {
			tasks = append(tasks, id)
		}
	}
	return txns, tasks
}

// restore loads the task's key groups from the restored checkpoint's state
// and takes its files as the base of the next incremental snapshot when they
// are exactly this task's (same key groups: no rescale).
func (m *mapTask) restore(ctx context.Context) error {
	if len(m.blobs) == 0 {
		return nil
	}
	src := &restoreSource{store: m.writer.store, cache: m.writer.cache}
	fromSavepoint := m.stateSpec.GetRestoreStorage() != ""
	if fromSavepoint {
		// A savepoint's files are read where it lives and are never a base
		// for this job's incremental snapshots: the first one is full.
		store, err := m.env.stores.Get(ctx, m.stateSpec.GetRestoreStorage())
		if err != nil {
			return fmt.Errorf("open savepoint storage: %w", err)
		}
		src.store, src.cache = store, ""
	}
	began := time.Now()
	var loaded int64 // keys of the blobs before the one being loaded
	lastReport := began
	src.progress = func(keys int64) {
		if now := time.Now(); now.Sub(lastReport) >= restoreReportEvery {
			lastReport = now
			m.env.send(statusMsg(m.key, transport.TaskKind_TASK_KIND_MAP, transport.TaskPhase_TASK_PHASE_DEPLOYING,
				fmt.Sprintf("restoring checkpoint %d: %d keys loaded", m.restoreID, loaded+keys)))
		}
	}
	for _, b := range m.blobs {
		n, err := src.restoreBlob(ctx, b, m.keyed.backend, m.kgStart, m.kgEnd)
		if err != nil {
			return localError(err)
		}
		m.keyed.keys += n
		loaded += n
		if !m.partial {
			// A whole-job restore: every source starts over at the
			// checkpoint's offsets (or, for a topic deleted and recreated,
			// at its start policy), so nothing can come twice, and the old
			// applied offsets would only drop new records of a recreated
			// topic. Deduplication is for task-scoped recovery.
			continue
		}
		for p, off := range b.GetApplied() {
			if cur, ok := m.keyed.applied[p]; !ok || off > cur {
				m.keyed.applied[p] = off
			}
		}
	}
	if len(m.blobs) == 1 && !fromSavepoint {
		b := m.blobs[0]
		if files := b.GetFiles(); len(files) > 0 && b.GetKeyGroupStart() == m.kgStart && b.GetKeyGroupEnd() == m.kgEnd {
			m.baseID, m.base = m.restoreID, chainOf(files)
			m.fullSize = m.base.fullBytes
			if src.local > 0 {
				// Local copies an earlier attempt wrote are this task's to
				// prune once the chain moves on.
				for _, f := range files {
					m.cached = append(m.cached, f.GetPath())
				}
				m.env.cache.hold(m.key, m.cached)
			}
		}
	}
	m.restoredLocal, m.restoredRemote = src.local, src.remote
	m.env.metrics.restoredFiles.WithLabelValues(m.key.job, "local").Add(float64(src.local))
	m.env.metrics.restoredFiles.WithLabelValues(m.key.job, "storage").Add(float64(src.remote))
	m.log.Info("restored keyed state", "checkpoint", m.restoreID, "blobs", len(m.blobs), "keys", m.keyed.keys,
		"files_local", src.local, "files_downloaded", src.remote, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

// runningNote says how the task restored its state, for the RUNNING status:
// in particular whether it used its local copies (local recovery).
func (m *mapTask) runningNote() string {
	if len(m.blobs) == 0 {
		return ""
	}
	if m.restoredLocal+m.restoredRemote == 0 {
		return fmt.Sprintf("restored checkpoint %d from inline state", m.restoreID)
	}
	how := "from checkpoint storage"
	if m.restoredRemote == 0 {
		how = "locally"
	}
	return fmt.Sprintf("restored checkpoint %d %s: %d files from local copies, %d downloaded",
		m.restoreID, how, m.restoredLocal, m.restoredRemote)
}

// fullFiles and deltaFiles split a chain into its full files and its deltas.
func fullFiles(chain []*transport.StateFile) []*transport.StateFile {
	return slices.DeleteFunc(slices.Clone(chain), func(f *transport.StateFile) bool { return !f.GetFull() })
}

func deltaFiles(chain []*transport.StateFile) []*transport.StateFile {
	return slices.DeleteFunc(slices.Clone(chain), func(f *transport.StateFile) bool { return f.GetFull() })
}

// chainOf describes an existing chain of files.
func chainOf(files []*transport.StateFile) chainInfo {
	c := chainInfo{files: files}
	for _, f := range files {
		if f.GetFull() {
			c.fullBytes += f.GetSize()
		} else {
			c.deltaBytes += f.GetSize()
			c.deltas++
		}
	}
	return c
}

// writeSnapshots is the snapshot goroutine: it writes captured snapshots in
// order and hands the results to the task loop.
func (m *mapTask) writeSnapshots(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case job := <-m.snaps:
			r := m.writer.write(ctx, job)
			select {
			case m.results <- r:
			case <-ctx.Done():
				return
			}
		}
	}
}

// emit writes one operator output to the sink.
func (m *mapTask) emit(out operator.Output) {
	if err := m.sink.add(&out); err != nil {
		m.item.emitErr = err
		return
	}
	m.recordsOut++ // apply adds it to the metric once per batch
}

// handle applies one input event on the task loop. Events of an input that
// a newer one replaced are dropped: the new channel's source sends again
// whatever the old one may have lost (replay), and a replaced input's
// barriers must not count in alignment.
func (m *mapTask) handle(ev inputEvent) error {
	if ev.attached {
		return m.attached(ev.in)
	}
	if m.live[ev.input] != ev.in {
		m.log.Debug("dropping an event of a replaced input", "source", ev.input, "source_attempt", ev.in.sourceAttempt,
			"barrier", ev.barrier, "closed", ev.closed)
		if ev.recycle != nil && ev.batch != nil {
			select {
			case ev.recycle <- ev.batch[:0]:
			default:
			}
		}
		return nil
	}
	switch {
	case ev.closed:
		if ev.err != nil && status.Code(ev.err) != codes.Canceled {
			m.log.Warn("input closed with an error", "source", ev.input, "err", ev.err)
		} else {
			m.log.Info("input closed", "source", ev.input)
		}
		return m.carry(m.align.inputClosed(ev.input))
	case ev.barrier != 0:
		// A late barrier of an older checkpoint (released at once by the
		// aligner) does not replace what the newest one said.
		if ev.barrier > m.barrierLast.id {
			m.barrierLast.id, m.barrierLast.last, m.barrierLast.savepoint = ev.barrier, ev.lastCompleted, ev.savepoint
			m.barrierLast.ahead = ""
		}
		if ev.barrier == m.barrierLast.id && m.barrierLast.ahead == "" {
			m.barrierLast.ahead = m.aheadOf(ev.input, ev.offsets, ev.namesAll)
		}
		return m.carry(m.align.barrier(ev.input, ev.barrier, time.Now()))
	default:
		err := m.apply(ev.batch)
		if ev.recycle != nil {
			select {
			case ev.recycle <- ev.batch[:0]:
			default:
			}
		}
		if err != nil {
			return fmt.Errorf("batch from source %d: %w", ev.input, err)
		}
		return nil
	}
}

// aheadOf says why the task's state is ahead of the offsets a barrier of
// source input carries, or "": it has applied a record at or past the next
// offset of one of the source's partitions. That happens after a
// task-scoped recovery, when a restored source re-reads records its
// predecessor had sent and takes a barrier before it has caught up: a
// snapshot now would hold records the checkpoint's offsets do not cover,
// and invariant 1 (docs/architecture.md) would not hold for it.
//
// When the barrier names every partition of the source (namesAll), it is as
// ahead when it has applied records of a partition of the source (p mod S ==
// input) that the barrier does not name: a restored source whose first look
// at the topic (a broker's stale metadata) missed a partition its
// predecessor had discovered and read. The checkpoint would hold those
// records without an offset, and a restore from it read them again.
func (m *mapTask) aheadOf(input int, offsets map[int32]int64, namesAll bool) string {
	if len(offsets) == 0 && !namesAll {
		// An older source's barrier without offsets says nothing of them.
		return ""
	}
	// The lowest such partition is named; no sorted copy of the offsets,
	// since this runs at every barrier.
	ahead, unnamed := int32(-1), int32(-1)
	for p, off := range offsets {
		if applied, ok := m.keyed.applied[p]; ok && applied >= off && (ahead < 0 || p < ahead) {
			ahead = p
		}
	}
	for p := range m.keyed.applied {
		if !namesAll || int(p)%m.numSources != input {
			continue
		}
		if _, ok := offsets[p]; !ok && (unnamed < 0 || p < unnamed) {
			unnamed = p
		}
	}
	switch {
	case ahead >= 0:
		return fmt.Sprintf("state holds records of partition %d up to offset %d, past source %d's barrier at next offset %d (a restored source catching up)",
			ahead, m.keyed.applied[ahead], input, offsets[ahead])
	case unnamed >= 0:
		return fmt.Sprintf("state holds records of partition %d up to offset %d, which source %d's barrier does not name (a restored source that has not found the partition yet)",
			unnamed, m.keyed.applied[unnamed], input)
	}
	return ""
}

// attached makes in the input the loop reads for its source, unless a newer
// input of that source is live already (in was replaced before the loop
// learnt of it). When in replaces a live input, the aligner abandons a
// pending checkpoint (triggered before the recovery; the leader aborts it
// anyway), releases the blocked inputs (the old one through its own release
// channel: it is still live while carry runs) and counts the source's input
// as open again.
func (m *mapTask) attached(in *input) error {
	old := m.live[in.idx]
	switch {
	case old == nil:
		m.live[in.idx] = in
		return nil
	case in.gen < old.gen:
		return nil
	}
	m.log.Info("source input replaced by a new channel", "source", in.idx, "source_attempt", in.sourceAttempt,
		"previous_source_attempt", old.sourceAttempt)
	err := m.carry(m.align.replaced(in.idx))
	m.live[in.idx] = in
	return err
}

// prefetcher is a state backend that reads the keys of a batch of items
// faster together, in key order, than one by one (state.Disk.Prefetch).
type prefetcher interface {
	Prefetch(keys []state.GroupKey) error
}

// apply runs the operator on every item of a packed batch, but for the
// items of records it applied already (batchApplier).
func (m *mapTask) apply(batch []byte) error {
	if m.prefetch != nil {
		// A malformed batch fails in the pass below, with the items
		// before the fault applied as without the read-ahead.
		_ = transport.ReadBatch(batch, &m.batchKeys)
		err := m.prefetch.Prefetch(m.batchKeys.keys)
		m.batchKeys.reset()
		if err != nil {
			return fmt.Errorf("state backend: %w", localError(err))
		}
	}
	m.batch.items, m.batch.dropped, m.batch.skip = 0, 0, false
	outBefore := m.recordsOut
	err := transport.ReadBatch(batch, &m.batch)
	if m.batch.dropped > 0 {
		m.duplicates.Add(float64(m.batch.dropped))
	}
	m.in.Add(float64(m.batch.items))
	m.out.Add(float64(m.recordsOut - outBefore))
	m.recordsIn += int64(m.batch.items)
	return err
}

// batchKeys is a transport.BatchVisitor that gathers the keys of a batch's
// items, for the backend to read ahead. It keeps the items' keys, not the
// items: a key is a slice of the batch (transport.BatchItem), valid while
// apply runs.
type batchKeys struct{ keys []state.GroupKey }

func (b *batchKeys) Record(int32, int64) error  { return nil }
func (b *batchKeys) Through(int32, int64) error { return nil }
func (b *batchKeys) Item(it *transport.BatchItem) error {
	b.keys = append(b.keys, state.GroupKey{Group: it.KeyGroup, Key: it.Key})
	return nil
}

// reset forgets the keys, and the batch they are slices of.
func (b *batchKeys) reset() {
	clear(b.keys)
	b.keys = b.keys[:0]
}

// batchApplier is the map task's transport.BatchVisitor: it applies items
// and notes, per source partition, the last record applied. It drops the
// items of a record at or below that offset (deduplication, issue 11): after
// a task-scoped recovery a surviving source replays from the checkpoint's
// offsets and a restored source re-reads from them, so this task receives
// again records it applied. The rule is exact because a source's batches
// hold whole records and a source partition's records reach a map task in
// offset order on one channel at a time. Its methods run on the task loop
// only.
type batchApplier struct {
	m       *mapTask
	items   int // applied in the current batch
	dropped int // dropped as duplicates in the current batch
	// skip is set by a record mark at or below the partition's applied
	// offset: the items up to the next mark are dropped. apply clears it at
	// the start of every batch (a batch begins with whole records, and
	// batches of different inputs interleave).
	skip bool
	// part and off are the last record mark, for logs.
	part int32
	off  int64
}

// Record notes the record the next items come from: once the batch is
// applied, so is the record (barriers always follow whole records). A record
// at or below the last one applied from its partition is a duplicate: its
// items are dropped and the applied offset stays.
func (a *batchApplier) Record(partition int32, offset int64) error {
	a.part, a.off = partition, offset
	if cur, ok := a.m.keyed.applied[partition]; ok && offset <= cur {
		a.skip = true
		return nil
	}
	a.skip = false
	a.m.keyed.applied[partition] = offset
	return nil
}

// Through notes that every record of partition up to offset is applied. It
// ends a duplicate record's items: the items of a combined batch are never
// duplicates (a restored source combines only past what any map task may
// have applied).
func (a *batchApplier) Through(partition int32, offset int64) error {
	a.skip = false
	if cur, ok := a.m.keyed.applied[partition]; !ok || offset > cur {
		a.m.keyed.applied[partition] = offset
	}
	return nil
}

// Item runs the operator on one item, or drops it when its record was
// applied already.
func (a *batchApplier) Item(it *transport.BatchItem) error {
	m := a.m
	kg := it.KeyGroup
	if kg < m.kgStart || kg >= m.kgEnd {
		return fmt.Errorf("item with key %q has key group %d, outside this task's range [%d, %d): source and map task disagree on the assignment", it.Key, kg, m.kgStart, m.kgEnd)
	}
	if a.skip {
		a.dropped++
		return nil
	}
	a.items++
	m.item.reset(kg, it.Key)
	err := m.op.Process(&m.item, operator.Item{Key: it.Key, Num: it.Num, Raw: it.Raw})
	if err := m.item.takeEmitErr(); err != nil {
		return err
	}
	if err != nil {
		if isBackendError(err) {
			return fmt.Errorf("state backend: %w", localError(err))
		}
		m.skipped.Inc()
		m.log.Debug("operator rejected an item", "key_group", kg, "partition", a.part, "offset", a.off, "err", err)
	}
	return nil
}

// carry performs an alignment step: declines, snapshot + sink flush + ack,
// then releases.
func (m *mapTask) carry(step alignStep) error {
	for _, a := range step.abandoned {
		m.decline(a.id, a.reason)
	}
	if id := step.snapshot; id != 0 && m.barrierLast.id == id && m.barrierLast.ahead != "" {
		m.decline(id, m.barrierLast.ahead)
	} else if id != 0 {
		var (
			last      uint64
			savepoint bool
		)
		if m.barrierLast.id == id {
			last, savepoint = m.barrierLast.last, m.barrierLast.savepoint
		}
		if err := m.capture(id, last, savepoint, step.aligned); err != nil {
			return fmt.Errorf("snapshot for checkpoint %d: %w", id, err)
		}
		m.aligned.Observe(step.aligned.Seconds())
	}
	for _, i := range step.release {
		// The release goes to the input that delivered the barrier: the
		// live one (a barrier of any other is dropped before the aligner).
		// Capacity 1 and one release per delivered barrier: never blocks.
		select {
		case m.live[i].release <- struct{}{}:
		default:
			m.log.Error("input released twice; alignment bookkeeping is broken", "source", i)
		}
	}
	return nil
}

// capture takes snapshot id at the barrier: flush the sink, take a view of
// the backend, close the epoch of changed keys, and hand the rest to the
// snapshot goroutine. lastCompleted is the job's newest completed checkpoint
// as the barrier carried it: a delta builds only on that one's files. A sink
// that cannot write its outputs yet (errSinkUnavailable: its brokers cannot
// be reached, its topic is missing, an exactly-once sink has not recovered
// its restored transactions) declines the checkpoint and the task goes on,
// its outputs held for a later one.
func (m *mapTask) capture(id, lastCompleted uint64, savepoint bool, aligned time.Duration) error {
	var txns []*transport.SinkTxn
	if m.sink != nil {
		if err := m.sink.flush(); err != nil {
			m.decline(id, "sink: "+err.Error())
			if errors.Is(err, errSinkUnavailable) {
				return nil
			}
			return fmt.Errorf("flush sink: %w", err)
		}
		if m.sink.txn != nil {
			// The barrier names the newest completed checkpoint: its notice
			// may have been lost with a leader.
			if err := m.sink.txn.completed(lastCompleted); err != nil {
				m.decline(id, "sink: "+err.Error())
				return err
			}
			var err error
			txns, err = m.sink.txn.preCommit(id)
			if errors.Is(err, errNoFreeTxn) || errors.Is(err, errSinkUnavailable) {
				m.decline(id, "sink: "+err.Error())
				return nil
			}
			if err != nil {
				m.decline(id, "sink: "+err.Error())
				return err
			}
		}
	}
	m.adoptBase(lastCompleted)
	view, err := m.keyed.backend.Snapshot()
	if err != nil {
		return fmt.Errorf("state backend: %w", err)
	}
	job := &snapshotJob{
		id: id, began: time.Now(), view: view, kgStart: m.kgStart, kgEnd: m.kgEnd,
		applied:    maps.Clone(m.keyed.applied),
		keys:       m.keyed.keys,
		encoding:   string(operator.EncodingOf(m.op)),
		sinkTxns:   txns,
		alignment:  aligned,
		recordsIn:  m.recordsIn,
		recordsOut: m.recordsOut,
	}
	job.savepoint = savepoint
	threshold := m.stateSpec.GetInlineThreshold()
	if !savepoint {
		m.keyed.closeEpoch(id)
	}
	switch {
	case savepoint && m.writer.store == nil:
		// Self-contained all the same: the state is in the savepoint itself.
		job.mode, job.inlineLimit = modeInline, fsm.MaxInlineStateBytes
	case savepoint:
		// Changes since the last checkpoint stay in the current epoch: the
		// next checkpoint's delta builds on a checkpoint, never on this.
		job.mode = modeSavepoint
	case m.writer.store == nil:
		job.mode, job.inlineLimit = modeInline, fsm.MaxInlineStateBytes
	case m.fullSize < threshold:
		job.mode, job.inlineLimit = modeInline, threshold
	case m.baseID == 0 || len(m.base.files) == 0 || m.base.deltaBytes >= m.base.fullBytes/2:
		// The changes since the full files weigh as much as half of them: a
		// new full file costs little more than carrying them on.
		job.mode = modeFull
	default:
		changed, ok := m.keyed.changedSince(m.baseID)
		switch {
		case !ok:
			job.mode = modeFull
		case m.base.deltas >= maxChainDeltas:
			// Compact: one delta of every key changed since the full files,
			// read from the deltas it replaces, so a restore reads a bounded
			// chain without a full file being rewritten.
			job.mode, job.changed = modeDelta, changed
			job.base, job.compact = fullFiles(m.base.files), deltaFiles(m.base.files)
		default:
			job.mode, job.changed, job.base = modeDelta, changed, m.base.files
		}
	}
	select {
	case m.snaps <- job:
		return nil
	default:
		// The previous snapshot is still being written: with one checkpoint
		// pending at a time that only happens after it was aborted. Decline
		// rather than queue without bound.
		view.Release()
		m.decline(id, "the previous snapshot is still being written")
		return nil
	}
}

// adoptBase makes checkpoint id, the job's newest completed one, the base
// of incremental snapshots if this task acked it, and forgets what it covers.
func (m *mapTask) adoptBase(id uint64) {
	if id == 0 || id == m.baseID {
		return
	}
	c, ok := m.acked[id]
	if !ok {
		// Completed without this task's files (another attempt) or with a
		// snapshot this task no longer remembers: start the chain over.
		m.baseID, m.base = 0, chainInfo{}
		return
	}
	m.baseID, m.base = id, c
	m.keyed.forget(id)
	for a := range m.acked {
		if a <= id {
			delete(m.acked, a)
		}
	}
	m.pruneCache()
}

// pruneCache deletes the local copies this task wrote that neither the base
// chain nor a snapshot still waiting for completion references: the cache
// keeps what a local recovery could need, no more.
func (m *mapTask) pruneCache() {
	if m.writer.cache == "" {
		return
	}
	keep := make(map[string]bool)
	for _, f := range m.base.files {
		keep[f.GetPath()] = true
	}
	for _, c := range m.acked {
		for _, f := range c.files {
			keep[f.GetPath()] = true
		}
	}
	kept := m.cached[:0]
	for _, p := range m.cached {
		if keep[p] {
			kept = append(kept, p)
			continue
		}
		if err := os.Remove(filepath.Join(m.writer.cache, filepath.FromSlash(p))); err != nil && !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("remove local copy of a state file", "path", p, "err", err)
		}
	}
	m.cached = kept
	m.env.cache.hold(m.key, m.cached)
}

// completed handles the leader's notice that checkpoint (or savepoint) id
// completed: its sink transactions are committed, and a checkpoint's files
// become the base of the next incremental snapshot.
func (m *mapTask) completed(id uint64, savepoint bool) error {
	if m.sink != nil && m.sink.txn != nil {
		if err := m.sink.txn.completed(id); err != nil {
			return err
		}
	}
	if !savepoint && id > m.baseID {
		m.adoptBase(id)
	}
	return nil
}

// snapshotDone acks a written snapshot, or declines it.
func (m *mapTask) snapshotDone(r snapshotResult) error {
	if r.err != nil {
		if errors.Is(r.err, errDiskFull) {
			return r.err
		}
		m.decline(r.id, r.err.Error())
		return nil
	}
	c := chainInfo{}
	if files := r.state.GetFiles(); len(files) > 0 {
		c = chainOf(files)
	}
	if r.savepoint {
		m.sendAck(r)
		return nil
	}
	if r.full {
		m.fullSize = r.state.GetStateBytes()
	}
	if m.writer.cache != "" && len(c.files) > 0 {
		m.cached = append(m.cached, c.files[len(c.files)-1].GetPath())
		m.env.cache.hold(m.key, m.cached)
	}
	m.acked[r.id] = c
	if len(m.acked) > maxAcked {
		delete(m.acked, slices.Min(slices.Collect(maps.Keys(m.acked))))
	}
	m.sendAck(r)
	return nil
}

func (m *mapTask) sendAck(r snapshotResult) {
	m.ackedN.Inc()
	m.env.metrics.snapshotBytes.WithLabelValues(m.key.job, r.mode.String()).Add(float64(r.state.GetStateBytes()))
	m.env.metrics.snapshotDuration.WithLabelValues(m.key.job).Observe(time.Since(r.began).Seconds())
	if !r.savepoint {
		size := int64(len(r.state.GetKeyed()))
		if files := r.state.GetFiles(); len(files) > 0 {
			c := chainOf(files)
			size = c.fullBytes + c.deltaBytes
		}
		m.env.metrics.stateKeys.WithLabelValues(m.key.job, m.key.id).Set(float64(r.state.GetKeys()))
		m.env.metrics.stateSize.WithLabelValues(m.key.job, m.key.id).Set(float64(size))
	}
	m.log.Debug("checkpoint acked", "checkpoint", r.id, "savepoint", r.savepoint, "bytes", r.state.GetStateBytes(),
		"files", len(r.state.GetFiles()), "keys", r.state.GetKeys())
	m.env.send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
		Task: m.key.ref(), CheckpointId: r.id, State: r.state,
	}}})
}

func (m *mapTask) decline(id uint64, reason string) {
	m.log.Warn("declining checkpoint", "checkpoint", id, "reason", reason)
	m.declined.Inc()
	m.env.send(declineMsg(m.key.ref(), id, reason))
}

// attach connects a channel of source idx, sent by the source's attempt
// sourceAttempt. A source connects again when its stream broke or when
// task-scoped recovery restored it: a channel whose source attempt is at
// least the current input's replaces that input, open or closed (a broken
// stream may not have been noticed yet here); one of an older attempt is
// refused with errOlderSource. The caller then runs readInput on the input,
// which tells the task loop of the attachment before anything else.
func (m *mapTask) attach(idx int, sourceAttempt uint64) (*input, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.attachLocked(idx, sourceAttempt)
}

func (m *mapTask) attachLocked(idx int, sourceAttempt uint64) (*input, error) {
	if m.stopped || m.ctx.Err() != nil {
		return nil, errMapStopped
	}
	if idx < 0 || idx >= m.numSources {
		return nil, fmt.Errorf("source index %d outside [0, %d)", idx, m.numSources)
	}
	old := m.inputs[idx]
	if old != nil && sourceAttempt < old.sourceAttempt {
		return nil, fmt.Errorf("source %d: channel of source attempt %d refused, the input comes from source attempt %d: %w",
			idx, sourceAttempt, old.sourceAttempt, errOlderSource)
	}
	m.gens++
	in := &input{idx: idx, sourceAttempt: sourceAttempt, gen: m.gens, release: make(chan struct{}, 1), gone: make(chan struct{})}
	if old != nil {
		close(old.gone)
		m.log.Info("source reconnected: the new channel replaces its input", "source", idx,
			"source_attempt", sourceAttempt, "previous_source_attempt", old.sourceAttempt)
	}
	m.inputs[idx] = in
	return in, nil
}

// attachLocal connects a channel of source idx (of attempt sourceAttempt, see
// attach) through an in-process channel, read by a goroutine the map task
// owns.
func (m *mapTask) attachLocal(idx int, sourceAttempt uint64) (*localChannel, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	in, err := m.attachLocked(idx, sourceAttempt)
	if err != nil {
		return nil, err
	}
	lc := &localChannel{
		ch:   make(chan *transport.DataMessage, localChannelDepth),
		free: make(chan []byte, localChannelDepth+2), closed: make(chan struct{}), mapDone: m.ctx.Done(),
		gone: in.gone,
	}
	in.recycle = lc.free
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		switch err := m.readInput(in, lc.recv); {
		case errors.Is(err, errInputReplaced):
			m.log.Info("in-process input replaced", "source", idx, "source_attempt", sourceAttempt)
		case err != nil && !errors.Is(err, errMapStopped):
			m.log.Warn("in-process input ended", "source", idx, "err", err)
		}
	}()
	return lc, nil
}

// readInput reads one input until it ends, forwarding to the task loop; after
// forwarding a barrier it reads nothing until the loop releases it. It
// returns nil when the source closed the input, errMapStopped when the task
// stopped first, errInputReplaced when a newer channel of the source took
// its place (it then forwards nothing more: not even its end).
func (m *mapTask) readInput(in *input, recv func(context.Context) (*transport.DataMessage, error)) error {
	if err := m.forward(in, inputEvent{attached: true}); err != nil {
		return err
	}
	for {
		msg, err := recv(m.ctx)
		if err == nil && msg.GetHeader() != nil {
			err = errors.New("protocol error: header on a message after the first")
		}
		if err == nil && msg.GetPayload() == nil {
			err = errors.New("protocol error: message without payload")
		}
		if err == nil && msg.GetBarrier() != nil && msg.GetBarrier().GetCheckpointId() == 0 {
			err = errors.New("protocol error: barrier for checkpoint 0")
		}
		if err != nil {
			switch {
			case m.ctx.Err() != nil:
				return errMapStopped
			case errors.Is(err, errInputReplaced):
				return err
			}
			ev := inputEvent{closed: true}
			if !errors.Is(err, io.EOF) {
				ev.err = err
			}
			if ferr := m.forward(in, ev); ferr != nil {
				return ferr
			}
			return ev.err
		}
		if b := msg.GetBarrier(); b != nil {
			if err := m.forward(in, inputEvent{barrier: b.GetCheckpointId(), offsets: b.GetOffsets(), namesAll: b.GetNamesAll(), lastCompleted: b.GetLastCompleted(), savepoint: b.GetSavepoint()}); err != nil {
				return err
			}
			// Released by the loop, or let go when replaced: the loop
			// then releases the old input's channel or drops its barrier.
			select {
			case <-in.release:
			case <-in.gone:
				return errInputReplaced
			case <-m.ctx.Done():
				return errMapStopped
			}
			continue
		}
		if err := m.forward(in, inputEvent{batch: msg.GetBatch().GetPacked(), recycle: in.recycle}); err != nil {
			return err
		}
	}
}

// endInput tells the task loop that input in, attached but never read (its
// channel failed at once), ended with err: its attachment first, so that
// the input it replaced does not stay live with nothing reading it.
func (m *mapTask) endInput(in *input, err error) {
	if m.forward(in, inputEvent{attached: true}) == nil {
		_ = m.forward(in, inputEvent{closed: true, err: err})
	}
}

// forward hands ev, an event of input in, to the task loop. It fails with
// errMapStopped when the task has stopped and errInputReplaced once a newer
// input took in's place (an event that races with the replacement may still
// get through: the loop drops it unless it comes before the replacement).
func (m *mapTask) forward(in *input, ev inputEvent) error {
	ev.input, ev.in = in.idx, in
	select {
	case <-in.gone:
		return errInputReplaced
	default:
	}
	select {
	case m.events <- ev:
		return nil
	case <-m.ctx.Done():
		return errMapStopped
	case <-in.gone:
		return errInputReplaced
	}
}

// localChannel is an in-process data channel from a source task to a map task
// on the same worker: the same ordered messages as a gRPC stream, with a
// bounded buffer for backpressure. A batch's buffer goes to the map task with
// it, and comes back on free once applied, for the source's next batch: the
// channel's memory is bounded and reused.
type localChannel struct {
	ch      chan *transport.DataMessage
	free    chan []byte
	closed  chan struct{}
	once    sync.Once
	mapDone <-chan struct{}
	// gone is the input's: closed when a newer channel of the source
	// replaced this one, which then neither sends nor receives.
	gone <-chan struct{}
}

// sendBatch hands w's buffer to the map task and gives w a free one.
func (c *localChannel) sendBatch(ctx context.Context, w *transport.BatchWriter) error {
	var next []byte
	select {
	case next = <-c.free:
	default:
	}
	return c.send(ctx, batchMessage(w.Detach(next)))
}

// send is called by the source task only.
func (c *localChannel) send(ctx context.Context, msg *transport.DataMessage) error {
	select {
	case <-c.gone:
		return errInputReplaced
	default:
	}
	select {
	case c.ch <- msg:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.mapDone:
		return errMapStopped
	case <-c.gone:
		return errInputReplaced
	}
}

// close ends the channel; the reader sees io.EOF after the buffered messages.
func (c *localChannel) close() { c.once.Do(func() { close(c.closed) }) }

func (c *localChannel) recv(ctx context.Context) (*transport.DataMessage, error) {
	select {
	case m := <-c.ch:
		return m, nil
	case <-c.closed:
		select {
		case m := <-c.ch:
			return m, nil
		default:
			return nil, io.EOF
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.gone:
		return nil, errInputReplaced
	}
}
