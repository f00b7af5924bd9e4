package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
	"github.com/coordflow/coordflow/worker/operator"
)

// errStaleAttempt marks a message for an attempt older than the one the
// worker runs for that job or task (fencing).
var errStaleAttempt = errors.New("stale attempt")

// taskEnv is what every task needs from its worker.
type taskEnv struct {
	workerID  string
	cfg       *Config
	logger    *slog.Logger
	metrics   *metrics
	operators *operator.Registry
	// send queues a message for the leader; it never blocks.
	send func(*transport.WorkerMessage)
	// maps finds the map tasks running on this worker, for in-process channels.
	maps mapLocator
	// conns holds the gRPC connections to other workers' data servers.
	conns *connPool
	// stores holds the checkpoint storages map tasks write to.
	stores *storage.Pool
	// kafka holds the Kafka clients source tasks share.
	kafka *kafkaPool
	// cache tracks the local copies of state files map tasks hold (nil in
	// tests: nothing is swept).
	cache *localCache
}

// mapLocator finds a running map task of this worker; see
// taskManager.awaitMap.
type mapLocator interface {
	awaitMap(ctx context.Context, job string, attempt uint64, taskID string, wait time.Duration) (*mapTask, error)
}

// taskKey names one task of one attempt.
type taskKey struct {
	job     string
	attempt uint64
	id      string
}

func keyOf(ref *transport.TaskRef) taskKey {
	return taskKey{job: ref.GetJobId(), attempt: ref.GetAttempt(), id: ref.GetTaskId()}
}

func (k taskKey) ref() *transport.TaskRef {
	return &transport.TaskRef{JobId: k.job, Attempt: k.attempt, TaskId: k.id}
}

// control is a leader message for a running task: a trigger (trigger != 0,
// sources only), a completion (complete != 0, with a source's offsets) or a
// retarget (retarget != nil: task-scoped recovery restored some of the job's
// tasks elsewhere; sources reopen their channels to them and replay, map
// tasks only log it).
type control struct {
	trigger       uint64
	lastCompleted uint64 // with trigger
	savepoint     bool   // with trigger or complete
	stop          bool   // with trigger and savepoint
	complete      uint64
	offsets       map[int32]int64
	retarget      *transport.RetargetTasks
}

// controlQueue is how many control messages may wait for a busy source task;
// a trigger beyond that is declined.
const controlQueue = 16

// taskHandle is the task manager's record of one task.
type taskHandle struct {
	key     taskKey
	kind    transport.TaskKind
	control chan control
	cancel  context.CancelFunc
	done    chan struct{} // closed when the task goroutine has returned

	// Guarded by taskManager.mu.
	phase      transport.TaskPhase
	stopReason string // non-empty once stopped on purpose: the task ends CANCELLED
	// catchingUp is set while a running source restored by task-scoped
	// recovery catches up (catchUpReporter); statuses carry it, and the
	// RUNNING note with it.
	catchingUp bool
	note       string
	// interrupt, set once the task runs (sources), breaks off at once its
	// sends to map tasks a retarget moves: the task loop may be blocked in
	// one and would otherwise not get to the retarget.
	interrupt func(*transport.RetargetTasks)
}

// interrupter is a runner whose blocked sends a retarget can break off.
type interrupter interface {
	interrupt(*transport.RetargetTasks)
}

// runner is one task's body. run returns when the task fails or ctx ends; it
// calls running once it is ready (docs/protocol.md "Tasks").
type runner interface {
	run(ctx context.Context, running func()) error
}

// catchUpReporter is a runner that may be RUNNING while it catches up (a
// source restored by task-scoped recovery): catchingUp, asked when it calls
// running, says whether it is, and it calls the func given to
// onCaughtUp, from its own goroutine, once it has caught up.
type catchUpReporter interface {
	catchingUp() bool
	onCaughtUp(func())
}

// taskManager owns the worker's tasks: it starts them on DeployTask with
// fencing and slot accounting, stops them, routes control messages to them,
// and reports every phase change to the leader.
type taskManager struct {
	env *taskEnv
	ctx context.Context // parent of every task; set by start
	wg  sync.WaitGroup

	mu    sync.Mutex
	tasks map[taskKey]*taskHandle
	// attempts is the job fence: per job, the highest attempt of a full
	// (non-partial) deploy seen. Messages for attempts below it are dropped.
	attempts map[string]uint64
	// fences is the task fence: per task, the highest attempt of any deploy
	// seen. After a task-scoped recovery the job's tasks run in different
	// attempts, so the job fence cannot tell a restored task's superseded
	// predecessor (dropped) from a surviving task of an older attempt (kept).
	fences map[mapKey]uint64
	maps   map[mapKey]*mapTask
	// mapsChanged is closed and replaced whenever a map task registers, to
	// wake awaitMap.
	mapsChanged chan struct{}
	// idle holds, per job none of whose tasks is here any more, the timer
	// that drops the job's metric series and fences after
	// Config.MetricsLinger.
	idle   map[string]*time.Timer
	closed bool
}

// mapKey names a task of a job across its attempts: it finds a map task for
// the data plane (the attempt is checked apart) and keys the task fence.
type mapKey struct{ job, id string }

func newTaskManager(env *taskEnv) *taskManager {
	return &taskManager{
		env:         env,
		ctx:         context.Background(),
		tasks:       make(map[taskKey]*taskHandle),
		attempts:    make(map[string]uint64),
		fences:      make(map[mapKey]uint64),
		maps:        make(map[mapKey]*mapTask),
		mapsChanged: make(chan struct{}),
		idle:        make(map[string]*time.Timer),
	}
}

// jobIdleLocked starts, if job has no task here, the timer that drops the
// job's metric series and its fences unless one of its tasks comes back
// first. Without it a worker would keep a fence per job and task it ever
// ran. A fence only has to outlast the deploys of older attempts still on
// their way, and those come only from a leader that has not learned yet
// that it was deposed, for about a leader lease; the linger is minutes. A
// task of the job deployed later is fenced from then on, as on a worker
// that never ran the job.
func (m *taskManager) jobIdleLocked(job string) {
	if m.closed || m.idle[job] != nil {
		return
	}
	for k := range m.tasks {
		if k.job == job {
			return
		}
	}
	var t *time.Timer
	t = time.AfterFunc(m.env.cfg.MetricsLinger, func() {
		// Under the lock, so that a task of the job deployed meanwhile
		// makes its metric handles after the series are gone, not before.
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.idle[job] == t {
			delete(m.idle, job)
			m.env.metrics.forgetJob(job)
			delete(m.attempts, job)
			for k := range m.fences {
				if k.job == job {
					delete(m.fences, k)
				}
			}
		}
	})
	m.idle[job] = t
}

// start sets the context every task runs under; call it before the first
// deploy.
func (m *taskManager) start(ctx context.Context) {
	m.mu.Lock()
	m.ctx = ctx
	m.mu.Unlock()
}

func statusMsg(k taskKey, kind transport.TaskKind, phase transport.TaskPhase, reason string) *transport.WorkerMessage {
	return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{
		Task: k.ref(), Kind: kind, Phase: phase, Reason: transport.ClipReason(reason),
	}}}
}

func kindLabel(k transport.TaskKind) string {
	if k == transport.TaskKind_TASK_KIND_SOURCE {
		return kindSource
	}
	return kindMap
}

// fencedLocked reports the fence k is below, or 0: the job fence (a full
// deploy of a newer attempt) or the task fence (a newer deploy of the same
// task, e.g. a partial one restoring it). Callers hold m.mu.
func (m *taskManager) fencedLocked(k taskKey) uint64 {
	if cur := m.attempts[k.job]; k.attempt < cur {
		return cur
	}
	if cur := m.fences[mapKey{k.job, k.id}]; k.attempt < cur {
		return cur
	}
	return 0
}

// deploy starts the task d describes, after fencing: a deploy for an attempt
// below the job's or the task's fence is ignored. A full deploy above the
// job fence raises it and stops the job's older tasks first; a partial one
// (task-scoped recovery) stops only an older attempt of the same task, and
// the job's other tasks run on in their own attempts. A deploy that finds
// every slot taken fails at once. It does not block: the task starts in its
// own goroutine.
func (m *taskManager) deploy(d *transport.DeployTask) {
	k := keyOf(d.GetTask())
	log := m.env.logger.With("job", k.job, "attempt", k.attempt, "task", k.id)
	if k.job == "" || k.id == "" {
		log.Warn("ignoring deploy without job or task id")
		return
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	if cur := m.fencedLocked(k); cur != 0 {
		m.mu.Unlock()
		log.Info("ignoring deploy of a stale attempt", "current_attempt", cur, "partial", d.GetPartial())
		return
	}
	if h, ok := m.tasks[k]; ok {
		// The leader repeats a deploy it is unsure of; report where it is.
		msg := statusMsg(k, h.kind, h.phase, h.note)
		msg.GetStatus().CatchingUp = h.catchingUp
		m.mu.Unlock()
		m.env.send(msg)
		return
	}
	var older []*taskHandle
	id := mapKey{k.job, k.id}
	m.fences[id] = max(m.fences[id], k.attempt)
	switch {
	case d.GetPartial():
		for _, h := range m.tasks {
			if h.key.job == k.job && h.key.id == k.id && h.key.attempt < k.attempt {
				m.stopLocked(h, fmt.Sprintf("superseded by attempt %d (task-scoped recovery)", k.attempt))
				older = append(older, h)
			}
		}
	case k.attempt > m.attempts[k.job]:
		m.attempts[k.job] = k.attempt
		for _, h := range m.tasks {
			if h.key.job == k.job && h.key.attempt < k.attempt {
				m.stopLocked(h, fmt.Sprintf("superseded by attempt %d", k.attempt))
				older = append(older, h)
			}
		}
	}
	busy := 0
	for _, h := range m.tasks {
		if h.stopReason == "" {
			busy++
		}
	}
	if busy >= m.env.cfg.Slots {
		m.env.metrics.taskFailures.WithLabelValues(k.job, kindLabel(d.GetKind())).Inc()
		m.jobIdleLocked(k.job)
		m.mu.Unlock()
		reason := fmt.Sprintf("no free slot on worker %s: %d of %d slots in use", m.env.workerID, busy, m.env.cfg.Slots)
		log.Warn("deploy refused", "reason", reason)
		m.env.send(statusMsg(k, d.GetKind(), transport.TaskPhase_TASK_PHASE_FAILED, reason))
		return
	}
	ctx, cancel := context.WithCancel(m.ctx)
	h := &taskHandle{
		key:    k,
		kind:   d.GetKind(),
		cancel: cancel,
		done:   make(chan struct{}),
		phase:  transport.TaskPhase_TASK_PHASE_DEPLOYING,
	}
	h.control = make(chan control, controlQueue)
	m.tasks[k] = h
	if t := m.idle[k.job]; t != nil {
		t.Stop()
		delete(m.idle, k.job)
	}
	m.env.metrics.tasks.Inc()
	m.wg.Add(1)
	m.mu.Unlock()

	log.Info("deploying task", "kind", kindLabel(h.kind), "operator", d.GetOperator(), "restore_checkpoint", d.GetRestoreCheckpointId(),
		"partial", d.GetPartial(), "superseding", len(older))
	m.env.send(statusMsg(k, h.kind, h.phase, ""))
	go m.runTask(ctx, h, d, older, log)
}

// runTask is the goroutine of one task: it waits for the tasks it
// supersedes to stop (they may hold this worker's map inboxes or Kafka
// clients), runs the task and reports how it ended.
func (m *taskManager) runTask(ctx context.Context, h *taskHandle, d *transport.DeployTask, older []*taskHandle, log *slog.Logger) {
	defer m.wg.Done()
	defer close(h.done)
	err := m.awaitStopped(ctx, older)
	if err == nil {
		err = m.runBody(ctx, h, d, log)
	}
	h.cancel()

	m.mu.Lock()
	delete(m.tasks, h.key)
	phase, reason := transport.TaskPhase_TASK_PHASE_CANCELLED, h.stopReason
	cause := transport.FailureCause_FAILURE_CAUSE_UNSPECIFIED
	if reason == "" {
		phase = transport.TaskPhase_TASK_PHASE_FAILED
		if err == nil {
			err = errors.New("task ended without error or cancellation")
		}
		reason = err.Error()
		cause = failureCause(err)
	}
	h.phase = phase
	if phase == transport.TaskPhase_TASK_PHASE_FAILED {
		m.env.metrics.taskFailures.WithLabelValues(h.key.job, kindLabel(h.kind)).Inc()
	}
	m.jobIdleLocked(h.key.job)
	m.mu.Unlock()

	m.env.metrics.tasks.Dec()
	if phase == transport.TaskPhase_TASK_PHASE_FAILED {
		log.Error("task failed", "reason", reason)
	} else {
		log.Info("task cancelled", "reason", reason)
	}
	msg := statusMsg(h.key, h.kind, phase, reason)
	msg.GetStatus().Cause = cause
	m.env.send(msg)
}

// failureCause classifies a task's error for the leader.
func failureCause(err error) transport.FailureCause {
	switch {
	case errors.Is(err, errStateCorrupt):
		return transport.FailureCause_FAILURE_CAUSE_STATE_CORRUPT
	case errors.Is(err, errDiskFull):
		return transport.FailureCause_FAILURE_CAUSE_DISK_FULL
	}
	return transport.FailureCause_FAILURE_CAUSE_UNSPECIFIED
}

// awaitStopped waits, up to StopTimeout, for the older tasks to return.
func (m *taskManager) awaitStopped(ctx context.Context, older []*taskHandle) error {
	if len(older) == 0 {
		return nil
	}
	t := time.NewTimer(m.env.cfg.StopTimeout)
	defer t.Stop()
	for _, o := range older {
		select {
		case <-o.done:
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return fmt.Errorf("task %s of attempt %d did not stop within %s", o.key.id, o.key.attempt, m.env.cfg.StopTimeout)
		}
	}
	return nil
}

// runBody builds and runs the task, turning a panic in it (operator code is
// user code) into a task failure instead of a worker crash.
func (m *taskManager) runBody(ctx context.Context, h *taskHandle, d *transport.DeployTask, log *slog.Logger) (err error) {
	defer func() {
		if p := recover(); p != nil {
			log.Error("task panicked", "panic", p, "stack", string(debug.Stack()))
			err = fmt.Errorf("task panicked: %v", p)
		}
	}()
	var r runner
	switch h.kind {
	case transport.TaskKind_TASK_KIND_SOURCE:
		r, err = newSourceTask(m.env, d, h.control, log)
	case transport.TaskKind_TASK_KIND_MAP:
		r, err = newMapTask(m.env, d, h.control, m, log)
	default:
		err = fmt.Errorf("unknown task kind %v", h.kind)
	}
	if err != nil {
		return err
	}
	if i, ok := r.(interrupter); ok {
		m.mu.Lock()
		h.interrupt = i.interrupt
		m.mu.Unlock()
	}
	c, reportsCatchUp := r.(catchUpReporter)
	if reportsCatchUp {
		c.onCaughtUp(func() { m.caughtUp(h) })
	}
	return r.run(ctx, func() {
		note := ""
		if n, ok := r.(interface{ runningNote() string }); ok {
			note = n.runningNote()
		}
		m.setRunning(h, note, reportsCatchUp && c.catchingUp())
	})
}

// setRunning moves a deploying task to RUNNING and reports it, and whether
// it is catching up.
func (m *taskManager) setRunning(h *taskHandle, note string, catchingUp bool) {
	m.mu.Lock()
	if h.stopReason != "" || h.phase != transport.TaskPhase_TASK_PHASE_DEPLOYING {
		m.mu.Unlock()
		return
	}
	h.phase, h.catchingUp, h.note = transport.TaskPhase_TASK_PHASE_RUNNING, catchingUp, note
	m.mu.Unlock()
	m.env.logger.Info("task running", "job", h.key.job, "attempt", h.key.attempt, "task", h.key.id, "note", note, "catching_up", catchingUp)
	msg := statusMsg(h.key, h.kind, h.phase, note)
	msg.GetStatus().CatchingUp = catchingUp
	m.env.send(msg)
}

// caughtUp reports that running task h, which was catching up, has caught
// up: the leader may trigger the job's checkpoints again.
func (m *taskManager) caughtUp(h *taskHandle) {
	m.mu.Lock()
	if !h.catchingUp || h.stopReason != "" || h.phase != transport.TaskPhase_TASK_PHASE_RUNNING {
		h.catchingUp = false
		m.mu.Unlock()
		return
	}
	h.catchingUp = false
	note := h.note
	m.mu.Unlock()
	m.env.logger.Info("task caught up", "job", h.key.job, "attempt", h.key.attempt, "task", h.key.id)
	m.env.send(statusMsg(h.key, h.kind, transport.TaskPhase_TASK_PHASE_RUNNING, note))
}

// stopLocked cancels h with reason; its goroutine reports CANCELLED when it
// returns. Callers hold m.mu.
func (m *taskManager) stopLocked(h *taskHandle, reason string) {
	if h.stopReason != "" {
		return
	}
	h.stopReason = reason
	h.cancel()
}

// cancel handles CancelTask. A cancel for a task the worker does not run is
// answered CANCELLED so that the leader's reconciliation converges.
func (m *taskManager) cancel(c *transport.CancelTask) {
	k := keyOf(c.GetTask())
	reason := "cancelled by leader"
	if c.GetReason() != "" {
		reason += ": " + c.GetReason()
	}
	m.mu.Lock()
	if m.fencedLocked(k) != 0 {
		m.mu.Unlock()
		return // fenced: that attempt of the task is stopped already
	}
	h, ok := m.tasks[k]
	if ok {
		m.stopLocked(h, reason)
	}
	m.mu.Unlock()
	if !ok {
		m.env.send(statusMsg(k, transport.TaskKind_TASK_KIND_UNSPECIFIED, transport.TaskPhase_TASK_PHASE_CANCELLED, "not running on worker "+m.env.workerID))
	}
}

// trigger hands TriggerCheckpoint to its source task, or declines it when the
// task cannot take it.
func (m *taskManager) trigger(t *transport.TriggerCheckpoint) {
	k := keyOf(t.GetTask())
	if reason := m.toSource(k, control{
		trigger: t.GetCheckpointId(), lastCompleted: t.GetLastCompleted(), savepoint: t.GetSavepoint(), stop: t.GetStop(),
	}); reason != "" {
		m.env.metrics.checkpointsDecl.WithLabelValues(k.job, kindSource).Inc()
		m.env.send(declineMsg(k.ref(), t.GetCheckpointId(), reason))
	}
}

// complete hands CheckpointComplete to its task; a completion for a task
// that is gone is dropped (sources commit offsets for monitoring only; map
// tasks learn the same from the next barrier).
func (m *taskManager) complete(c *transport.CheckpointComplete) {
	m.toTask(keyOf(c.GetTask()), control{complete: c.GetCheckpointId(), offsets: c.GetOffsets(), savepoint: c.GetSavepoint()})
}

// toSource queues a trigger for the running source task k without
// blocking. It returns why it could not, or "" (also for fenced messages,
// which are dropped silently).
func (m *taskManager) toSource(k taskKey, c control) string {
	m.mu.Lock()
	h, ok := m.tasks[k]
	m.mu.Unlock()
	if ok && h.kind != transport.TaskKind_TASK_KIND_SOURCE {
		return fmt.Sprintf("task %s is not a source task", k.id)
	}
	return m.toTask(k, c)
}

// toTask queues c for the running task k without blocking. It returns why
// it could not, or "" (also for fenced messages, which are dropped
// silently: below the job fence, or below the task's own fence; a surviving
// task of an older attempt than the job's newest partial one is not fenced).
func (m *taskManager) toTask(k taskKey, c control) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fencedLocked(k) != 0 {
		return ""
	}
	h, ok := m.tasks[k]
	if !ok || h.stopReason != "" {
		return fmt.Sprintf("task %s is not running on worker %s", k.id, m.env.workerID)
	}
	select {
	case h.control <- c:
		return ""
	default:
		return fmt.Sprintf("task %s has %d control messages queued", k.id, controlQueue)
	}
}

// retarget hands RetargetTasks to every live task of its job on this worker:
// surviving sources reopen their channels to the restored map tasks and
// replay to them; map tasks only log it. A retarget older than the job fence
// (a full restart followed it) is dropped. It does not block: a task whose
// control queue is full misses it, which the leader sees as a replay that
// stalls (and falls back to a job-scoped restart).
func (m *taskManager) retarget(r *transport.RetargetTasks) {
	job := r.GetJobId()
	log := m.env.logger.With("job", job, "attempt", r.GetAttempt())
	m.mu.Lock()
	if cur := m.attempts[job]; r.GetAttempt() < cur {
		m.mu.Unlock()
		log.Info("ignoring retarget of a stale attempt", "current_attempt", cur)
		return
	}
	n := 0
	var interrupts []func(*transport.RetargetTasks)
	for _, h := range m.tasks {
		if h.key.job != job || h.stopReason != "" || m.fencedLocked(h.key) != 0 {
			continue
		}
		if h.interrupt != nil {
			interrupts = append(interrupts, h.interrupt)
		}
		select {
		case h.control <- control{retarget: r}:
			n++
		default:
			log.Warn("task missed a retarget: its control queue is full", "task", h.key.id, "task_attempt", h.key.attempt, "queued", controlQueue)
		}
	}
	m.mu.Unlock()
	for _, interrupt := range interrupts {
		interrupt(r)
	}
	log.Info("retarget handed to the job's tasks", "tasks", n, "restored", r.GetRestored(), "restore_checkpoint", r.GetRestoreCheckpointId())
}

// declineMsg is a task's decline of checkpoint id, with why.
func declineMsg(task *transport.TaskRef, id uint64, reason string) *transport.WorkerMessage {
	return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Decline{Decline: &transport.CheckpointDecline{
		Task: task, CheckpointId: id, Reason: transport.ClipReason(reason),
	}}}
}

// running lists the tasks that are deploying or running, for Hello.
func (m *taskManager) running() []*transport.TaskStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*transport.TaskStatus, 0, len(m.tasks))
	for _, h := range m.tasks {
		if h.stopReason == "" {
			out = append(out, &transport.TaskStatus{Task: h.key.ref(), Kind: h.kind, Phase: h.phase, CatchingUp: h.catchingUp})
		}
	}
	return out
}

// stopLive stops every task with reason and returns how many it stopped. It
// does not wait for them.
func (m *taskManager) stopLive(reason string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, h := range m.tasks {
		if h.stopReason == "" {
			m.stopLocked(h, reason)
			n++
		}
	}
	return n
}

// shutdown stops every task, refuses further deploys and waits (up to
// StopTimeout) for the task goroutines to return; it reports whether they
// all did.
func (m *taskManager) shutdown(reason string) (stopped bool) {
	m.mu.Lock()
	m.closed = true
	for job, t := range m.idle {
		t.Stop()
		delete(m.idle, job)
	}
	m.mu.Unlock()
	m.stopLive(reason)
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	t := time.NewTimer(m.env.cfg.StopTimeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		m.env.logger.Error("tasks did not stop in time; abandoning them", "timeout", m.env.cfg.StopTimeout)
		return false
	}
}

// registerMap makes a ready map task reachable for data channels.
func (m *taskManager) registerMap(t *mapTask) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.maps[mapKey{t.key.job, t.key.id}] = t
	close(m.mapsChanged)
	m.mapsChanged = make(chan struct{})
}

// unregisterMap removes t, if it is still the registered one.
func (m *taskManager) unregisterMap(t *mapTask) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := mapKey{t.key.job, t.key.id}
	if m.maps[k] == t {
		delete(m.maps, k)
	}
}

// errMapNotFound says a data channel names a map task this worker does not run.
var errMapNotFound = errors.New("map task not running here")

// errMapDeploying says the map task a data channel names is deployed here
// but not running yet (it is restoring its state): the source waits on.
var errMapDeploying = errors.New("map task still deploying (restoring its state)")

// awaitMap returns the map task (job, taskID) of attempt, waiting up to wait
// while it deploys. It fails with errStaleAttempt when attempt is below the
// job or the task fence or the registered task is newer, and errMapNotFound
// when the task does not show up. Map tasks carry their own attempts: a
// surviving map task of an older attempt than the job's restored tasks is
// found under its own attempt.
func (m *taskManager) awaitMap(ctx context.Context, job string, attempt uint64, taskID string, wait time.Duration) (*mapTask, error) {
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		m.mu.Lock()
		mt := m.maps[mapKey{job, taskID}]
		cur := m.fencedLocked(taskKey{job: job, attempt: attempt, id: taskID})
		changed := m.mapsChanged
		m.mu.Unlock()
		switch {
		case mt != nil && mt.key.attempt == attempt:
			return mt, nil
		case cur != 0 || (mt != nil && mt.key.attempt > attempt):
			return nil, fmt.Errorf("map task %s of job %s: attempt %d, worker runs attempt %d: %w", taskID, job, attempt, max(cur, attemptOf(mt)), errStaleAttempt)
		}
		select {
		case <-changed:
		case <-t.C:
			if m.deploying(taskKey{job: job, attempt: attempt, id: taskID}) {
				return nil, fmt.Errorf("map task %s of job %s attempt %d on worker %s: %w", taskID, job, attempt, m.env.workerID, errMapDeploying)
			}
			return nil, fmt.Errorf("map task %s of job %s attempt %d on worker %s (waited %s): %w", taskID, job, attempt, m.env.workerID, wait, errMapNotFound)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// deploying reports whether task k is deployed here and not yet running.
func (m *taskManager) deploying(k taskKey) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	h, ok := m.tasks[k]
	return ok && h.stopReason == "" && h.phase == transport.TaskPhase_TASK_PHASE_DEPLOYING
}

func attemptOf(t *mapTask) uint64 {
	if t == nil {
		return 0
	}
	return t.key.attempt
}
