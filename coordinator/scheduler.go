package coordinator

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// lookupTimeout bounds one partition-count lookup against Kafka.
const lookupTimeout = 5 * time.Second

// jobState is the leader's memory of one job: the FSM's view of it as last
// read, what the workers reported about the tasks of its current attempt, and
// what only this term knows (restart backoff, bad checkpoints, the pending
// checkpoint's acks).
type jobState struct {
	id      string
	spec    fsm.JobSpec
	status  fsm.JobStatus
	reason  string
	attempt uint64
	// tasks are the current attempt's tasks by id; order lists them in
	// assignment order, for deterministic iteration.
	tasks map[string]*trackedTask
	order []*trackedTask

	deployedAt time.Time // when the current attempt was deployed (or first seen by this term)
	// deployProgress is when a task of the current attempt last reported
	// progress while deploying (a restore that goes on).
	deployProgress time.Time
	restoredFrom   uint64 // checkpoint the current attempt restored from (replicated in the FSM); 0 if fresh
	lastCompleted  uint64 // the job's newest completed checkpoint, which triggers name
	// bad holds checkpoints a map task failed to verify, with the reason;
	// deploys restore from an older retained checkpoint instead.
	bad map[uint64]string

	failures   int       // consecutive failed attempts since the backoff last reset
	detectedAt time.Time // when the failure that restarts the job was seen
	retryAt    time.Time // no deploy before then
	cause      string    // why the job is being restarted, for the next deploy's reason
	lookup     bool      // a partition lookup is in flight
	cancelSent bool      // CancelTask sent for the tasks of a cancelled job
	// restarting is the attempt whose tasks beginRestart cancelled, from
	// the cancel on: its tasks are stale before the JobStatus write says so.
	restarting uint64
	// purging: the job's purge is under way (jobgc.go); purgeHeld: a
	// coordinator below jobGCLevel holds it, logged once; purgeQueued: it
	// waits in leader.purgeQueue; purgeRetryAt: no purge is tried before
	// then; cancelledAt: when the job was cancelled.
	purging, purgeHeld, purgeQueued bool
	purgeRetryAt, cancelledAt       time.Time

	// log is the job's logger for attempt logAttempt (leader.jobLogger).
	log        *slog.Logger
	logAttempt uint64

	ckpt checkpointState
	// savepoints are the savepoint requests waiting for the job's next
	// checkpoint slot.
	savepoints []savepointRequest

	// reconcileAt and checkpointAt are the job's earliest timers in the
	// leader's heap (zero: none).
	reconcileAt, checkpointAt time.Time
	// holds lists the worker of each task while the job is running: the
	// slots it counts in leader.used.
	holds []string
	// reserved lists the workers of the tasks a deploy placed, counted in
	// leader.used from the placement until attempt reservedFor is applied
	// and holds them instead, so that jobs placed meanwhile see them taken.
	reserved    []string
	reservedFor uint64
}

// trackedTask is one task of a job's current attempt: where the FSM placed it
// and what its worker last said about it.
type trackedTask struct {
	task   fsm.Task
	phase  transport.TaskPhase // UNSPECIFIED until the worker reports
	reason string
	cause  transport.FailureCause // of a failure
	// missing is set when the worker opened a session without listing the task.
	missing bool
	// replaced is set while a task-scoped recovery that restores the task
	// on another worker commits: the task is stale on its old worker.
	replaced bool
	// catchingUp is set while a running source restored by task-scoped
	// recovery catches up (TaskStatus.catching_up), since catchingUpSince:
	// no trigger meanwhile, within catchUpHoldLimit; heldTooLong once the
	// limit has been logged.
	catchingUp      bool
	catchingUpSince time.Time
	heldTooLong     bool
}

// currentTask reports whether ref names a task of js in the attempt the
// task runs in now (each task has its own since task-scoped recovery).
func (js *jobState) currentTask(ref *transport.TaskRef) bool {
	tv := js.tasks[ref.GetTaskId()]
	return tv != nil && ref.GetAttempt() == tv.task.Attempt
}

// partitionsResult is the outcome of a partition lookup for a job's deploy.
type partitionsResult struct {
	jobID   string
	attempt uint64 // the job's attempt when the lookup started
	n       int
	err     error
}

// observe updates the leader's memory of job from an FSM copy and returns it.
// A new attempt resets the task views and voids the pending checkpoint.
func (l *leader) observe(job fsm.Job) *jobState {
	js := l.jobs[job.ID]
	if js == nil {
		js = &jobState{id: job.ID, bad: make(map[uint64]string)}
		l.jobs[job.ID] = js
		// A predecessor may have sent the trigger of the next id without
		// committing it (pipelined triggers): never issue it again.
		js.ckpt.issued = l.maybeSent[job.ID]
		delete(l.maybeSent, job.ID)
		js.ckpt.afterSavepoint = newestIsSavepoint(job)
	}
	js.ckpt.issued = max(js.ckpt.issued, job.LastCheckpointID)
	js.ckpt.committed = max(js.ckpt.committed, job.LastCheckpointID)
	js.spec, js.status, js.reason = job.Spec, job.Status, job.Reason
	js.restoredFrom = job.RestoredFrom
	if n := len(job.Completed); n > 0 {
		js.lastCompleted = job.Completed[n-1].ID
	}
	if js.tasks == nil || js.attempt != job.Attempt {
		l.unindex(js)
		js.attempt = job.Attempt
		old := js.tasks
		js.tasks = make(map[string]*trackedTask, len(job.Tasks))
		js.order = make([]*trackedTask, 0, len(job.Tasks))
		for _, t := range job.Tasks {
			t.Attempt = job.TaskAttempt(t)
			tv := &trackedTask{task: t}
			if o := old[t.ID]; o != nil && o.task.Attempt == t.Attempt && o.task.Worker == t.Worker {
				// A task-scoped recovery left this task running: what its
				// worker said about it still holds.
				o.task = t
				tv = o
			}
			js.tasks[t.ID] = tv
			js.order = append(js.order, tv)
		}
		js.deployedAt, js.deployProgress = l.env.now(), time.Time{}
		js.cancelSent = false
		l.dropPending(js, "the job restarted")
		l.index(js)
	}
	if needsDeploy(js) && js.status != fsm.JobCancelled {
		l.waiting[js.id] = struct{}{}
	} else {
		delete(l.waiting, js.id)
	}
	l.account(js)
	if p := js.ckpt.pending; p != nil && js.triggerCommitted(p) && (job.Pending == nil || job.Pending.ID != p.id) {
		l.dropPending(js, "aborted or completed by a write of another term") // behind this loop's back (job restarted or cancelled)
	}
	return js
}

// account keeps l.used, the slots in use per worker, in step with js: a
// running job holds a slot per task on its task's worker, any other job
// none. Slots freed wake the jobs waiting for a deploy.
func (l *leader) account(js *jobState) {
	var holds []string
	if js.status == fsm.JobRunning {
		for _, tv := range js.order {
			holds = append(holds, tv.task.Worker)
		}
	}
	for _, w := range js.holds {
		if l.used[w]--; l.used[w] <= 0 {
			delete(l.used, w)
		}
	}
	for _, w := range holds {
		l.used[w]++
	}
	if js.status == fsm.JobRunning && js.attempt >= js.reservedFor {
		l.unreserve(js) // held now
	}
	freed := len(holds) < len(js.holds)
	js.holds = holds
	if freed {
		l.slotsChanged()
	}
}

// reserve counts the slots of tasks, placed for attempt of js but not yet
// committed, as used.
func (l *leader) reserve(js *jobState, attempt uint64, tasks []fsm.Task) {
	l.unreserve(js)
	for _, t := range tasks {
		l.used[t.Worker]++
		js.reserved = append(js.reserved, t.Worker)
	}
	js.reservedFor = attempt
}

// unreserve gives back the slots js reserved, if any, and reports whether
// there were some.
func (l *leader) unreserve(js *jobState) bool {
	if js.reserved == nil {
		return false
	}
	for _, w := range js.reserved {
		if l.used[w]--; l.used[w] <= 0 {
			delete(l.used, w)
		}
	}
	js.reserved = nil
	return true
}

// index records the workers js's tasks run on, so that a worker's events
// reach its jobs; unindex forgets them.
func (l *leader) index(js *jobState) {
	for _, tv := range js.order {
		set := l.byWorker[tv.task.Worker]
		if set == nil {
			set = make(map[string]struct{})
			l.byWorker[tv.task.Worker] = set
		}
		set[js.id] = struct{}{}
	}
}

func (l *leader) unindex(js *jobState) {
	for _, tv := range js.order {
		if set := l.byWorker[tv.task.Worker]; set != nil {
			delete(set, js.id)
			if len(set) == 0 {
				delete(l.byWorker, tv.task.Worker)
			}
		}
	}
}

// reconcile compares every job in the FSM with what runs and acts on each
// (reconcileJob). The loop runs it when a term starts, when its reconnect
// grace ends, and as a slow safety net; events reconcile single jobs.
func (l *leader) reconcile() {
	now := l.env.now()
	jobs := l.env.jobs()
	members := memberStatus(l.env.members())
	seen := make(map[string]bool, len(jobs))
	for _, job := range jobs {
		seen[job.ID] = true
		delete(l.dirty, job.ID)
		if l.busy(job.ID) {
			continue
		}
		l.reconcileJob(job, members, now)
	}
	for id, js := range l.jobs {
		if !seen[id] {
			l.forget(js)
		}
	}
}

// reconcileJob compares one job of the FSM with what runs and acts: cancels
// the tasks of a cancelled job, deploys a pending or restarting job, and
// restarts a running job whose tasks failed or were lost. members is every
// gossip member's status. The caller has checked the job has no write in
// flight.
func (l *leader) reconcileJob(job fsm.Job, members map[string]string, now time.Time) {
	graceOver := !now.Before(l.graceEnd)
	js := l.observe(job)
	l.abortUntracked(js, job.Pending)
	switch {
	case js.status == fsm.JobCancelled:
		l.cancelJob(js, job)
		l.collectJob(js, job, now)
	case !graceOver:
	case needsDeploy(js):
		l.tryDeploy(js, now)
	default:
		if cp := stopAborted(job); cp != nil {
			l.beginRestart(js, fmt.Sprintf("stop with savepoint %d was aborted (%s), and its barrier may have stopped the sources: restarting from the last checkpoint", cp.ID, cp.Reason), "checkpoint", cp.ID)
			break
		}
		if tolerable := job.Spec.Checkpoint.TolerableFailures; job.ConsecutiveAborts > tolerable && l.workerInDoubt(js) == "" {
			// Held while a worker of the job had no session (abortCheckpoint):
			// it is back, and the aborts stand.
			l.beginRestart(js, fmt.Sprintf("%d consecutive checkpoint aborts exceed tolerable_failures %d", job.ConsecutiveAborts, tolerable))
			break
		}
		if reason, task := l.taskFailure(js, members, now); reason != "" {
			recovering, why := l.recoverTasks(js, members, reason, now)
			if recovering {
				break
			}
			if why != "" {
				reason += "; not recovered task by task: " + why
			}
			l.beginRestart(js, reason, "task", task)
		}
	}
	l.touchCheckpoint(js)
}

// needsDeploy reports whether a job waits for a new attempt: never deployed,
// or pending, restarting or failing after a failure.
func needsDeploy(js *jobState) bool {
	return js.attempt == 0 || js.status != fsm.JobRunning
}

// memberStatus maps member id to gossip status.
func memberStatus(members []Member) map[string]string {
	m := make(map[string]string, len(members))
	for _, mem := range members {
		m[mem.ID] = mem.Status
	}
	return m
}

// taskFailure returns why the current attempt of a running job cannot go
// on, and the task concerned, or "" if it can. A lost worker (workerLost:
// left in gossip, its process gone, or without a session for longer than
// the lease), a task reported failed or cancelled, a task its worker does
// not report running, and a task that has not reported RUNNING within the
// deploy timeout all fail the attempt. A session lost for less than the
// lease is not a failure, dead in gossip or not: the worker stops its
// tasks by lease.
func (l *leader) taskFailure(js *jobState, members map[string]string, now time.Time) (reason, task string) {
	for _, tv := range js.order {
		id, w := tv.task.ID, tv.task.Worker
		switch tv.phase {
		case transport.TaskPhase_TASK_PHASE_FAILED:
			return fmt.Sprintf("task %s failed on worker %s: %s", id, w, tv.reason), id
		case transport.TaskPhase_TASK_PHASE_CANCELLED:
			return fmt.Sprintf("task %s was cancelled on worker %s", id, w), id
		}
		if why := l.workerLost(js, w, members, now); why != "" {
			return fmt.Sprintf("worker %s of task %s %s", w, id, why), id
		}
		if _, none := l.sessionlessSince(w); !none && tv.missing {
			return fmt.Sprintf("worker %s does not run task %s", w, id), id
		}
		if tv.phase != transport.TaskPhase_TASK_PHASE_RUNNING {
			// A task restoring a large state reports its progress; the
			// deploy times out only once the attempt stops progressing.
			deadline := later(js.deployedAt, js.deployProgress).Add(l.deployTimeout)
			if now.After(deadline) {
				return fmt.Sprintf("task %s on worker %s has not reported RUNNING within %v of its deploy or its last progress (phase %s)",
					id, w, l.deployTimeout, tv.phase), id
			}
			l.scheduleJob(js, deadline.Add(time.Millisecond))
		}
	}
	return "", ""
}

// workerLost says how worker w is lost for good (its tasks cannot go on
// there), or "" if it is not: gone (its process died: session broken,
// ports refusing), left in gossip, or without a control session for longer
// than the lease, dead in gossip (or unknown to it) or not. A shorter loss
// of session is not, even with gossip calling the worker dead: a frozen
// worker (SIGSTOP, a stalled VM) looks so too, and its tasks run on until
// its lease ends, counted from no later than the session's end; restarted
// elsewhere before, they would overlap their successors, and a zombie that
// acts on a late completion can abort a successor's open sink transaction,
// which Kafka's fencing does not prevent. js is looked at again when the
// lease would run out. Nor is a gossip death while the worker's session is
// live: that is overruled (overruleDead, which logs it), and js is looked
// at again when the session ends, at the latest once it has heard nothing
// for silenceLimit.
func (l *leader) workerLost(js *jobState, w string, members map[string]string, now time.Time) string {
	if l.gone[w] {
		return "is gone: its session broke and its ports refuse connections"
	}
	gossip := ""
	switch st := members[w]; st {
	case StatusLeft:
		return "is " + st
	case "", StatusDead:
		if l.liveSession(w) == nil {
			gossip = "is " + st + ", and "
			if st == "" {
				gossip = "is not a gossip member, and "
			}
		} else {
			l.overruleDead(w, st)
		}
	}
	if since, none := l.sessionlessSince(w); none {
		if gone := now.Sub(since); gone > l.lease {
			return fmt.Sprintf("%shas had no control session for %v (lease %v)", gossip, gone.Round(time.Millisecond), l.lease)
		}
		l.scheduleJob(js, since.Add(l.lease+time.Millisecond))
	}
	return ""
}

// liveSession returns worker w's control session if it is open and has not
// ended: a session ended by its watchdog (silence) or its receiver can wait
// in a blocked send before the loop hears of its close.
func (l *leader) liveSession(w string) *session {
	if sess := l.sessions[w]; sess != nil && sess.ctx.Err() == nil {
		return sess
	}
	return nil
}

// overruleDead records that gossip calls worker w dead (status dead), or
// does not know it (""), while its control session is live, and logs and
// counts it once until gossip or the session changes (workerChanged). The
// session is the surer sign: it ends when the worker has sent nothing for
// silenceLimit (2 s by default), and a crashed worker's breaks at once
// (portsRefused), while memberlist's probes, tuned to notice a death in
// about a second, can miss a live worker whose machine is saturated
// (docs/benchmarks.md). The worker's tasks go on; it gets no new ones
// meanwhile (placeable takes the workers alive in gossip). Only the leader
// loop calls it.
func (l *leader) overruleDead(w, status string) {
	if l.overruled[w] {
		return
	}
	l.overruled[w] = true
	l.metrics.deadOverruled.Inc()
	if status == "" {
		status = "not a member"
	}
	l.logger.Warn("gossip says the worker is "+status+", but its control session still hears from it: its tasks go on, and fail if the session ends",
		"worker", w, "silence_limit", l.silenceLimit())
}

// beginRestart fails the current attempt of a running job: it aborts its
// pending checkpoint, cancels its tasks, sets the job restarting and
// schedules the next attempt after the backoff.
func (l *leader) beginRestart(js *jobState, reason string, attrs ...any) {
	now := l.env.now()
	if now.Sub(js.deployedAt) >= time.Duration(js.spec.Restart.ResetAfter) {
		js.failures = 0 // the attempt ran long enough: start the backoff over
	}
	delay := restartDelay(js.spec.Restart, js.failures, l.env.jitter())
	js.failures++
	js.retryAt = now.Add(delay)
	js.cause = reason
	js.detectedAt = now
	l.scheduleJob(js, js.retryAt)
	l.jobLogger(js).With(attrs...).Warn("restarting job", "reason", reason, "retry_in", delay)
	js.restarting = js.attempt

	if js.ckpt.pending != nil {
		l.abortCheckpoint(js, "job restarting: "+reason, "restart", false)
	}
	for _, tv := range js.order {
		if live(tv.phase) {
			l.sendTo(tv.task.Worker, cancelMsg(taskRef(js, tv.task), "job restarting: "+reason))
		}
	}
	l.setStatus(js, fsm.JobRestarting, reason)
}

// jobFailing marks a job that cannot be deployed for a reason of its own
// (missing topic, unreachable broker, no usable checkpoint) and schedules a
// retry after the backoff.
func (l *leader) jobFailing(js *jobState, reason string) {
	delay := restartDelay(js.spec.Restart, js.failures, l.env.jitter())
	js.failures++
	js.retryAt = l.env.now().Add(delay)
	l.scheduleJob(js, js.retryAt)
	if js.status != fsm.JobFailing || js.reason != reason {
		l.jobLogger(js).Warn("job failing", "reason", reason, "retry_in", delay)
	}
	l.setStatus(js, fsm.JobFailing, reason)
}

// restartDelay is the backoff before the next attempt after failures
// consecutive failures: Initial doubled per failure up to Max, with ±20%
// jitter (jitter in [0, 1)), and never above Max.
func restartDelay(spec fsm.RestartSpec, failures int, jitter float64) time.Duration {
	initial := time.Duration(cmp.Or(spec.Initial, fsm.DefaultRestartInitial))
	ceiling := max(time.Duration(cmp.Or(spec.Max, fsm.DefaultRestartMax)), initial)
	d := initial
	for i := 0; i < failures && d < ceiling; i++ {
		d *= 2
	}
	d = time.Duration(float64(min(d, ceiling)) * (0.8 + 0.4*jitter))
	return min(d, ceiling)
}

// setStatus commits a job's status and reason unless they are already set.
// The leader's memory of them changes once the write is committed.
func (l *leader) setStatus(js *jobState, status fsm.JobStatus, reason string) {
	if js.status == status && js.reason == reason {
		return
	}
	l.write(js, fsm.CommandJobStatus, fsm.JobStatusCmd{
		JobID: js.id, Status: status, Reason: reason, Time: l.env.now().UnixNano(),
	}, func(_ any, err error) {
		if err != nil {
			l.jobLogger(js).Warn("set job status", "status", status, "reason", reason, "err", err)
			return
		}
		js.status, js.reason = status, reason
		l.account(js)
	})
}

// cancelJob sends CancelTask for every task of cancelled job (js of job),
// once per term; workers that reconnect later are reconciled by their
// Hello.
func (l *leader) cancelJob(js *jobState, job fsm.Job) {
	if js.cancelSent {
		return
	}
	js.cancelSent = true
	l.dropPending(js, "the job was cancelled")
	for _, r := range js.savepoints { // queued for the next checkpoint slot
		r.reply <- savepointReply{err: fmt.Errorf("%w: job %s was cancelled", errSavepointState, js.id)}
	}
	js.savepoints = nil
	last := newestCompleted(job)
	for _, tv := range js.order {
		if live(tv.phase) {
			for _, msg := range finalMsgs(js, tv, last) {
				l.sendTo(tv.task.Worker, msg)
			}
		}
	}
	l.jobLogger(js).Info("job cancelled; tasks stopped", "tasks", len(js.order))
}

// newestIsSavepoint reports whether job's newest completed checkpoint or
// savepoint is a savepoint: for a running job, one whose sink transactions
// wait for a checkpoint (checkpointState.afterSavepoint), which a new term
// learns here.
func newestIsSavepoint(job fsm.Job) bool {
	h, ok := newestInHistory(job, func(fsm.CheckpointSummary) bool { return true })
	return ok && h.Savepoint
}

// newestInHistory returns the newest completed checkpoint or savepoint of
// job's history that keep accepts.
func newestInHistory(job fsm.Job, keep func(fsm.CheckpointSummary) bool) (fsm.CheckpointSummary, bool) {
	for i := len(job.History) - 1; i >= 0; i-- {
		if h := job.History[i]; h.Status == fsm.CheckpointCompleted && keep(h) {
			return h, true
		}
	}
	return fsm.CheckpointSummary{}, false
}

// newestCompleted returns job's newest completed checkpoint, or the
// savepoint that stopped it (ID 0: none): what its map tasks' sink
// transactions may be committed up to. Another savepoint commits nothing
// (notifyCompleted).
func newestCompleted(job fsm.Job) fsm.CheckpointSummary {
	if h, ok := newestInHistory(job, func(h fsm.CheckpointSummary) bool { return !h.Savepoint || job.StoppedWith(h.ID) }); ok {
		return h
	}
	if n := len(job.Completed); n > 0 {
		return fsm.CheckpointSummary{ID: job.Completed[n-1].ID}
	}
	return fsm.CheckpointSummary{}
}

// finalMsgs are the messages that stop task tv of cancelled job js: its
// cancel, preceded for a map task by the notice that last, the job's newest
// completed checkpoint or the savepoint that stopped it, completed. The notice its commit sent
// may have been lost (a leader change between the two, a worker without a
// session then), and a cancelled job has no next barrier to make up for it:
// the sink transactions it covers, a stop-with-savepoint's above all, would
// never be committed. A map task commits them once (txnPool.completed), so
// a second notice changes nothing, and one still queued when the cancel
// stops the task is handled first (mapTask.lastCompletions).
func finalMsgs(js *jobState, tv *trackedTask, last fsm.CheckpointSummary) []*transport.CoordinatorMessage {
	ref := taskRef(js, tv.task)
	cancel := cancelMsg(ref, "job cancelled")
	if tv.task.Kind != fsm.TaskMap || last.ID == 0 {
		return []*transport.CoordinatorMessage{cancel}
	}
	return []*transport.CoordinatorMessage{{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
		Task: ref, CheckpointId: last.ID, Savepoint: last.Savepoint,
	}}}, cancel}
}

// tryDeploy starts deploying a job that waits for an attempt, once its
// backoff has passed and enough worker slots are free: it first asks Kafka for
// the topic's partition count (and whether an exactly-once sink's brokers
// support transactions), in the background; onPartitions goes on.
func (l *leader) tryDeploy(js *jobState, now time.Time) {
	if now.Before(js.retryAt) {
		l.scheduleJob(js, js.retryAt)
		return
	}
	if js.lookup {
		return
	}
	workers, old := l.placeable(js.spec, js.id)
	if need, free := numTasks(js.spec), totalFree(workers); free < need {
		l.setStatus(js, fsm.JobPending, slotsReason(need, free)+tooOldNote(js.spec, old))
		return
	}
	js.lookup = true
	src, sink, id, attempt := js.spec.Source, js.spec.Sink, js.id, js.attempt
	checkSink := exactlyOnceSink(js.spec) && l.env.checkSink != nil
	log := l.jobLogger(js)
	l.lookups.Add(1)
	go func() {
		defer l.lookups.Done()
		ctx, cancel := context.WithTimeout(l.ctx, lookupTimeout)
		defer cancel()
		n, err := l.env.partitions(ctx, src.Brokers, src.Topic)
		if err == nil && checkSink {
			if cerr := l.env.checkSink(ctx, sink.Brokers); errors.Is(cerr, errSinkUnreachable) {
				log.Warn("deploying without knowing whether the sink brokers support transactions: its map tasks hold their outputs and decline checkpoints until the brokers answer", "err", cerr)
			} else {
				err = cerr
			}
		}
		l.post(l.ctx, partitionsResult{jobID: id, attempt: attempt, n: n, err: err})
	}()
}

// onPartitions goes on with a deploy once the partition count is known:
// assign the tasks, commit the new attempt, and send DeployTask to each.
func (l *leader) onPartitions(r partitionsResult) {
	if js := l.jobs[r.jobID]; js != nil {
		js.lookup = false
	}
	if l.busy(r.jobID) {
		l.dirty[r.jobID] = struct{}{} // decide again once its write is in
		return
	}
	job, ok := l.env.job(r.jobID)
	if !ok {
		return
	}
	js := l.observe(job)
	if js.status == fsm.JobCancelled || !needsDeploy(js) || js.attempt != r.attempt {
		return // the job moved on while Kafka was asked
	}
	if r.err != nil {
		l.jobFailing(js, r.err.Error())
		return
	}
	l.deploy(js, job, r.n)
}

// deploy assigns job's tasks over the placeable workers, commits attempt+1
// and sends the deployments.
func (l *leader) deploy(js *jobState, job fsm.Job, numPartitions int) {
	now := l.env.now()
	workers, old := l.placeable(js.spec, js.id)
	tasks, err := assign(js.spec, numPartitions, workers)
	var slots *slotsError
	if errors.As(err, &slots) {
		l.setStatus(js, fsm.JobPending, slots.Error()+tooOldNote(js.spec, old))
		return
	}
	if err != nil {
		l.jobFailing(js, err.Error())
		return
	}
	restore, note, err := chooseRestore(job.Completed, js.bad)
	if err != nil {
		l.jobFailing(js, err.Error())
		return
	}
	reason := cmp.Or(js.cause, "first deployment")
	if js.attempt > 0 && js.cause == "" {
		reason = "restart: " + js.reason
	}
	if note != "" {
		reason += "; " + note
	}
	attempt := js.attempt + 1
	// The new attempt holds its slots once its command is applied
	// (account); until then they are reserved, or the jobs placed
	// meanwhile would be placed on the same free slots.
	l.reserve(js, attempt, tasks)
	var restoreFrom uint64
	var restoreStorage string // where restored files are, if not in the job's storage
	if restore != nil {
		restoreFrom = restore.ID
	} else if sp := job.FromSavepoint; sp != nil {
		restore, restoreStorage = savepointRestore(sp), sp.Location
		reason += "; restoring savepoint " + sp.ID
	}
	l.write(js, fsm.CommandJobRestarted, fsm.JobRestartedCmd{
		JobID: js.id, Attempt: attempt, Tasks: tasks, Reason: reason, Time: now.UnixNano(), RestoreFrom: restoreFrom,
		// Random, so that nobody can open data channels for an attempt
		// before its deployments name it (docs/security.md).
		ChannelToken: rand.Text(),
		DetectedAt:   unixNano(js.detectedAt),
	}, func(_ any, err error) {
		// Applied, the job holds the slots from now on (deployed observes
		// it); refused, they are free again for the jobs waiting.
		freed := l.unreserve(js)
		if err != nil {
			if freed {
				l.slotsChanged()
			}
			l.jobLogger(js).Error("commit new attempt", "next_attempt", attempt, "err", err)
			js.retryAt = l.env.now().Add(restartDelay(js.spec.Restart, js.failures, l.env.jitter()))
			l.scheduleJob(js, js.retryAt)
			return
		}
		l.deployed(js, attempt, now, numPartitions, note, reason, restore, restoreStorage)
	})
}

// deployed sends the deployments of the attempt deploy committed.
func (l *leader) deployed(js *jobState, attempt uint64, now time.Time, numPartitions int, note, reason string,
	restore *fsm.Checkpoint, restoreStorage string) {
	job, ok := l.env.job(js.id)
	if !ok || job.Attempt != attempt {
		return
	}
	js = l.observe(job)
	js.deployedAt, js.cause = now, ""
	if attempt > 1 {
		l.metrics.jobRestarts.WithLabelValues(js.id).Inc()
		l.metrics.recoveries.WithLabelValues(js.id, fsm.RecoveryScopeJob).Inc()
	}
	js.detectedAt = time.Time{}
	log := l.jobLogger(js)
	if note != "" {
		log.Warn("deploying from an older checkpoint", "note", note)
	}
	log.Info("deploying job", "tasks", len(job.Tasks), "partitions", numPartitions, "restore_checkpoint", js.restoredFrom, "reason", reason)
	discover := l.discovers(js, log)
	for _, t := range job.Tasks {
		msg := &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Deploy{Deploy: buildDeploy(job, t, restore, restoreStorage, discover)}}
		if err := l.sendTo(t.Worker, msg); err != nil {
			log.Warn("task's deploy not sent", "task", t.ID, "worker", t.Worker, "err", err)
		}
	}
}

// workerSlots is a worker tasks can be placed on.
type workerSlots struct {
	id       string
	dataAddr string
	free     int
}

// placeable returns the workers that are alive in gossip, have a live
// session and are at the feature level a job of spec needs, with their free
// slots, leaving out the tasks of job exclude (which is being redeployed);
// and the ids of the workers left out for their level. Slots in use come
// from l.used, kept by account: the cost is in the number of workers, not
// of jobs.
func (l *leader) placeable(spec fsm.JobSpec, exclude string) (workers []workerSlots, old []string) {
	var alive []Member
	for _, m := range l.env.aliveWorkers() {
		if l.liveSession(m.ID) != nil {
			alive = append(alive, m)
		}
	}
	alive, old = capableWorkers(spec, alive)
	used := maps.Clone(l.used)
	if js := l.jobs[exclude]; js != nil {
		for _, w := range js.holds {
			used[w]--
		}
	}
	return freeSlots(alive, used), old
}

// tooOldNote is what a pending job's reason adds when workers were left out
// of its placement for their feature level.
func tooOldNote(spec fsm.JobSpec, old []string) string {
	if len(old) == 0 {
		return ""
	}
	_, what := specFeatureLevel(spec)
	return fmt.Sprintf("; workers %s run a build too old for %s: upgrade them", named(old), what)
}

// freeSlots returns each worker's slots minus those used (one per task of a
// running job), leaving out workers with no free slot.
func freeSlots(workers []Member, used map[string]int) []workerSlots {
	var out []workerSlots
	for _, w := range workers {
		if free := w.Slots - used[w.ID]; free > 0 {
			out = append(out, workerSlots{id: w.ID, dataAddr: w.DataAddr, free: free})
		}
	}
	return out
}

// totalFree sums the free slots, saturating instead of overflowing: slots
// come from gossip, and a wrapped sum would make every job wait.
// (transport.NodeMeta.Validate caps each worker's slots anyway.)
func totalFree(workers []workerSlots) int {
	n := 0
	for _, w := range workers {
		if w.free > math.MaxInt-n {
			return math.MaxInt
		}
		n += w.free
	}
	return n
}

func numTasks(spec fsm.JobSpec) int {
	return spec.Source.Parallelism + spec.Operator.Parallelism
}

// slotsError says a job needs more free slots than the workers have.
type slotsError struct{ need, free int }

func (e *slotsError) Error() string { return slotsReason(e.need, e.free) }

func slotsReason(need, free int) string {
	return fmt.Sprintf("waiting for %d free slots (%d free)", need, free)
}

// assign places the source and map tasks of spec on workers: source task s
// reads the partitions p with p mod S == s, map task i owns key-group range i
// of max_parallelism. The source tasks are dealt round robin over the
// workers sorted by free slots (most first), then id, and the map tasks are
// dealt the same way from the same first worker, so that map task i runs
// where source task i does while that worker has room. As Flink's slot
// sharing does, this keeps a job of one source and one map task on one
// worker, where its items go through memory instead of a data channel over
// the network. It returns a *slotsError when the workers have fewer free
// slots than the job has tasks.
func assign(spec fsm.JobSpec, numPartitions int, workers []workerSlots) ([]fsm.Task, error) {
	numSources, numMaps := spec.Source.Parallelism, spec.Operator.Parallelism
	if need, free := numSources+numMaps, totalFree(workers); free < need {
		return nil, &slotsError{need: need, free: free}
	}
	ranges := fsm.KeyGroupRanges(spec.Operator.MaxParallelism, numMaps)
	if ranges == nil {
		return nil, fmt.Errorf("cannot split %d key groups over %d map tasks", spec.Operator.MaxParallelism, numMaps)
	}
	order := slices.Clone(workers)
	slices.SortFunc(order, func(a, b workerSlots) int {
		return cmp.Or(cmp.Compare(b.free, a.free), cmp.Compare(a.id, b.id))
	})
	next := 0
	place := func(t fsm.Task) fsm.Task {
		for order[next%len(order)].free == 0 {
			next++
		}
		w := &order[next%len(order)]
		next++
		w.free--
		t.Worker, t.DataAddr = w.id, w.dataAddr
		return t
	}
	tasks := make([]fsm.Task, 0, numSources+numMaps)
	for i := range numSources {
		tasks = append(tasks, place(fsm.Task{
			ID: fsm.TaskID(fsm.TaskSource, i), Kind: fsm.TaskSource, Index: i,
			Partitions: fsm.SourcePartitions(numPartitions, numSources, i),
		}))
	}
	next = 0
	for i := range numMaps {
		kg := ranges[i]
		tasks = append(tasks, place(fsm.Task{
			ID: fsm.TaskID(fsm.TaskMap, i), Kind: fsm.TaskMap, Index: i, KeyGroups: &kg,
		}))
	}
	return tasks, nil
}

// chooseRestore picks the newest retained completed checkpoint not marked
// bad (nil if the job has none: start fresh). note explains any newer
// checkpoint skipped; an error means every retained checkpoint is bad.
func chooseRestore(completed []fsm.Checkpoint, bad map[uint64]string) (ck *fsm.Checkpoint, note string, err error) {
	var skipped []string
	for i := len(completed) - 1; i >= 0; i-- {
		c := &completed[i]
		if why, isBad := bad[c.ID]; isBad {
			skipped = append(skipped, fmt.Sprintf("checkpoint %d: %s", c.ID, why))
			continue
		}
		if len(skipped) > 0 {
			note = fmt.Sprintf("restoring from checkpoint %d because newer ones failed verification (%s)",
				c.ID, strings.Join(skipped, "; "))
		}
		return c, note, nil
	}
	if len(skipped) > 0 {
		return nil, "", fmt.Errorf("every retained checkpoint failed verification (%s)", strings.Join(skipped, "; "))
	}
	return nil, "", nil
}

// noteFailure marks the checkpoint the current attempt restored from as bad
// when a map task failed verifying or reading its state (the worker says so
// in the status's cause, docs/protocol.md, Restore), so the next deploy
// falls back to an older retained checkpoint.
func (l *leader) noteFailure(js *jobState, tv *trackedTask) {
	if tv.task.Kind != fsm.TaskMap || js.restoredFrom == 0 || tv.cause != transport.FailureCause_FAILURE_CAUSE_STATE_CORRUPT {
		return
	}
	js.bad[js.restoredFrom] = fmt.Sprintf("task %s: %s", tv.task.ID, tv.reason)
	l.jobLogger(js).Warn("checkpoint state failed verification; it will not be restored again",
		"checkpoint", js.restoredFrom, "task", tv.task.ID, "reason", tv.reason)
}

// discovers reports whether the sources of job js deployed now may read
// partitions added to their topic (discoveryBlocked), and logs to log and
// counts why not. Otherwise the job's next deployment looks again.
func (l *leader) discovers(js *jobState, log *slog.Logger) bool {
	why := l.discoveryBlocked()
	if why == "" {
		return true
	}
	l.metrics.noDiscovery.WithLabelValues(js.id).Inc()
	log.Warn("deploying without partition discovery: a coordinator older than it would reject the checkpoints of a source reading an added partition; partitions added meanwhile are read from the job's next deployment on",
		"why", why)
	return false
}

// discoveryBlocked says why partition discovery may not be on in the
// sources deployed now, "" when it may: only while every coordinator is at
// discoveryLevel.
func (l *leader) discoveryBlocked() string { return l.belowLevel(discoveryLevel) }

// belowLevel says why not every coordinator of the Raft configuration is
// known to be at feature level level, "" when every one is.
func (l *leader) belowLevel(level int) string {
	if l.env.coordinatorsBelow == nil {
		return ""
	}
	old, err := l.env.coordinatorsBelow(level)
	switch {
	case err != nil:
		return err.Error()
	case len(old) > 0:
		return fmt.Sprintf("coordinators below feature level %d: %s", level, named(old))
	}
	return ""
}

// buildDeploy returns the DeployTask of task t of job's current attempt,
// restoring from checkpoint restore (nil: start fresh), whose files are in
// restoreStorage when that is not empty (a savepoint's directory). Its
// sources read partitions added to the topic if discover is set (discovers).
func buildDeploy(job fsm.Job, t fsm.Task, restore *fsm.Checkpoint, restoreStorage string, discover bool) *transport.DeployTask {
	spec := job.Spec
	var discovery time.Duration
	if discover {
		discovery = spec.Source.PartitionDiscoveryInterval()
	}
	d := &transport.DeployTask{
		Task:           &transport.TaskRef{JobId: job.ID, Attempt: job.TaskAttempt(t), TaskId: t.ID},
		Kind:           protoKind(t.Kind),
		Index:          int32(t.Index),
		JobName:        spec.Name,
		Operator:       spec.Operator.Name,
		MaxParallelism: int32(spec.Operator.MaxParallelism),
		Source: &transport.SourceSpec{
			Brokers:    slices.Clone(spec.Source.Brokers),
			Topic:      spec.Source.Topic,
			Partitions: slices.Clone(t.Partitions),
			Start:      cmp.Or(spec.Source.Start, fsm.DefaultStart),
			Group:      cmp.Or(spec.Source.Group, fsm.DefaultGroupPrefix+spec.Name),
			// The source reads partitions added to the topic after this
			// assignment itself (docs/protocol.md, Partition discovery).
			PartitionDiscoveryMs: discovery.Milliseconds(),
			ReadCommitted:        spec.Source.ReadCommitted(),
		},
		NumSources:   int32(spec.Source.Parallelism),
		ChannelToken: job.ChannelToken,
		// With a sink every update is an output someone reads: merging
		// items would hide some, so only a job without one combines.
		Combine: spec.Sink == nil,
	}
	if spec.Sink != nil {
		d.Sink = deploySink(job.ID, &spec)
	}
	if t.Kind == fsm.TaskMap {
		d.State = &transport.StateSpec{
			Backend:         spec.State.Backend,
			Storage:         spec.Checkpoint.Storage,
			InlineThreshold: spec.Checkpoint.InlineThreshold,
			RestoreStorage:  restoreStorage,
		}
	}
	d.MapTasks = mapTaskRefs(job)
	if restore == nil {
		return d
	}
	d.RestoreCheckpointId = restore.ID
	switch t.Kind {
	case fsm.TaskSource:
		d.RestoreOffsets = restoreOffsets(restore, restorePartitions(restore, t, spec.Source.Parallelism))
	case fsm.TaskMap:
		d.RestoreKeyed = restoreKeyed(restore, t.KeyGroups)
	}
	return d
}

// mapTaskRefs lists job's map tasks, where they run and in which attempt,
// for the sources that feed them.
func mapTaskRefs(job fsm.Job) []*transport.MapTaskRef {
	var refs []*transport.MapTaskRef
	for _, m := range job.Tasks {
		if m.Kind != fsm.TaskMap || m.KeyGroups == nil {
			continue
		}
		refs = append(refs, &transport.MapTaskRef{
			TaskId: m.ID, Index: int32(m.Index), WorkerId: m.Worker, DataAddr: m.DataAddr,
			KeyGroupStart: int32(m.KeyGroups.Start), KeyGroupEnd: int32(m.KeyGroups.End),
			Attempt: job.TaskAttempt(m),
		})
	}
	return refs
}

// restoreOffsets returns the checkpointed next offset of each of partitions,
// gathered from every source state of ck: partitions move between source
// tasks when the source parallelism changes.
func restoreOffsets(ck *fsm.Checkpoint, partitions []int32) map[int32]int64 {
	all := checkpointOffsets(ck)
	out := make(map[int32]int64, len(partitions))
	for _, p := range partitions {
		if off, ok := all[p]; ok {
			out[p] = off
		}
	}
	return out
}

// checkpointOffsets returns ck's next offset of every source partition,
// from all its source states.
func checkpointOffsets(ck *fsm.Checkpoint) map[int32]int64 {
	all := make(map[int32]int64)
	for _, st := range ck.Tasks {
		if st.Kind == fsm.TaskSource {
			maps.Copy(all, st.Offsets)
		}
	}
	return all
}

// restorePartitions returns the partitions source task t restores offsets
// of: its assignment and every other partition it owns (p mod numSources ==
// index) that ck has an offset for. A source discovers partitions added to
// the topic while it runs, so a checkpoint can hold partitions the next
// assignment lacks (the leader's partition lookup saw an older metadata):
// the source must resume those from the checkpoint, not from the start.
func restorePartitions(ck *fsm.Checkpoint, t fsm.Task, numSources int) []int32 {
	parts := slices.Clone(t.Partitions)
	if numSources < 1 {
		return parts
	}
	for _, st := range ck.Tasks {
		if st.Kind != fsm.TaskSource {
			continue
		}
		for p := range st.Offsets {
			if p >= 0 && int(p)%numSources == t.Index && !slices.Contains(parts, p) {
				parts = append(parts, p)
			}
		}
	}
	slices.Sort(parts)
	return parts
}

// restoreKeyed returns the keyed blobs of ck a map task owning key groups
// own needs, sorted by task id: those whose range overlaps own, and every
// blob that does not name its range (written before states did). The task
// keeps the key groups of its own range. A nil own gets every blob.
func restoreKeyed(ck *fsm.Checkpoint, own *fsm.KeyGroupRange) []*transport.KeyedBlob {
	var blobs []*transport.KeyedBlob
	for _, id := range slices.Sorted(maps.Keys(ck.Tasks)) {
		st := ck.Tasks[id]
		if st.Kind != fsm.TaskMap {
			continue
		}
		if own != nil && st.KeyGroups != nil && (st.KeyGroups.End <= own.Start || own.End <= st.KeyGroups.Start) {
			continue // no key group in common
		}
		b := &transport.KeyedBlob{TaskId: id, Data: st.Keyed, Sha256: st.KeyedSHA256, Applied: maps.Clone(st.Applied),
			SinkTxns: protoSinkTxns(st.SinkTxns)}
		if len(st.Files) > 0 {
			b.Files = protoFiles(st.Files)
		}
		if st.KeyGroups != nil {
			b.KeyGroupStart, b.KeyGroupEnd = int32(st.KeyGroups.Start), int32(st.KeyGroups.End)
		}
		blobs = append(blobs, b)
	}
	return blobs
}

func protoKind(k fsm.TaskKind) transport.TaskKind {
	switch k {
	case fsm.TaskSource:
		return transport.TaskKind_TASK_KIND_SOURCE
	case fsm.TaskMap:
		return transport.TaskKind_TASK_KIND_MAP
	}
	return transport.TaskKind_TASK_KIND_UNSPECIFIED
}

// taskRef names task t in its own attempt: after a task-scoped recovery,
// the job's tasks run in different attempts.
func taskRef(js *jobState, t fsm.Task) *transport.TaskRef {
	return &transport.TaskRef{JobId: js.id, Attempt: cmp.Or(t.Attempt, js.attempt), TaskId: t.ID}
}

// kafkaPartitions asks the brokers how many partitions topic has, with short
// timeouts so that an unreachable broker fails the lookup quickly. Its errors
// are shown to users as the job's reason.
func kafkaPartitions(ctx context.Context, brokers []string, topic string) (int, error) {
	client, err := sourceClient(ctx, brokers)
	if err != nil {
		return 0, err
	}
	defer client.Close()
	parts, err := sourcePartitions(client, brokers, topic)
	return len(parts), err
}

// sourceClient connects to a job's source brokers for a lookup, failing
// fast (lookupConfig) with an error that names them.
func sourceClient(ctx context.Context, brokers []string) (sarama.Client, error) {
	client, err := sarama.NewClient(brokers, lookupConfig(ctx, sarama.DefaultVersion))
	if err != nil {
		return nil, fmt.Errorf("source brokers %s unreachable: %w", strings.Join(brokers, ","), err)
	}
	return client, nil
}

// sourcePartitions lists topic's partitions, with the errors users see as
// a job's reason: a topic that does not exist, brokers that do not answer.
func sourcePartitions(client sarama.Client, brokers []string, topic string) ([]int32, error) {
	addrs := strings.Join(brokers, ",")
	parts, err := client.Partitions(topic)
	switch {
	case errors.Is(err, sarama.ErrUnknownTopicOrPartition) || (err == nil && len(parts) == 0):
		return nil, fmt.Errorf("source topic %q does not exist on %s", topic, addrs)
	case errors.Is(err, sarama.ErrOutOfBrokers):
		return nil, fmt.Errorf("source brokers %s unreachable: %w", addrs, err)
	case err != nil:
		return nil, fmt.Errorf("list partitions of source topic %q on %s: %w", topic, addrs, err)
	}
	return parts, nil
}
