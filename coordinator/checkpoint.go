package coordinator

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// The checkpoint coordinator, in the vocabulary of Flink's
// CheckpointCoordinator: per running job at most one pending checkpoint,
// triggered through Raft and sent to the source tasks; every task acks (or
// declines) it; once all have acked it is completed through Raft and the
// sources are notified. Acks are fenced by attempt, checkpoint id, task and
// worker.
//
// Once every coordinator can apply it (chosenIDLevel), the leader chooses
// the id and sends the trigger at once, while CheckpointTriggered commits
// (a pipelined trigger): the commit's latency overlaps the barrier's round
// trip instead of adding to it. The job's writes commit in order, so the
// completion still follows the trigger in the log. Ids stay unique: a job
// triggers only when none of its writes is in flight, and pipelines a
// trigger only when every id issued before it is committed, so at most its
// next id can have been sent without being committed; a new leader skips
// that id (inherit). Only a loop whose term is still Raft's pipelines
// (leadsTerm): a deposed one may read its successor's ids as committed.

// checkpointState is the leader's checkpoint bookkeeping for one job.
type checkpointState struct {
	pending *pendingCheckpoint
	// issued is the highest checkpoint id that may have been sent for the
	// job: the FSM's last issued id, the ids this term chose, and at the
	// start of the term the one after the FSM's, which a predecessor may
	// have sent without committing it (leader.inherit). committed is the
	// FSM's last issued id as this term knows it; a trigger is pipelined
	// only while the two are equal, and unsure is not set: a write that
	// aborted or completed a checkpoint failed, so the FSM may still hold
	// a pending checkpoint this loop no longer tracks, which would refuse a
	// trigger sent ahead of its commit. A committed trigger clears it.
	issued, committed uint64
	unsure            bool
	lastTrigger       time.Time // when this term last triggered (or tried to)
	lastCompletion    time.Time // when this term last completed one
	aborts            int       // aborted since the last completion, in this term
	// afterSavepoint is set once a savepoint that did not stop the job
	// completed, until the checkpoint that follows it is triggered: its
	// sink transactions wait for a checkpoint to commit them
	// (notifyCompleted).
	afterSavepoint bool
}

// pendingCheckpoint is a checkpoint in flight and the acks it has collected.
type pendingCheckpoint struct {
	id          uint64
	attempt     uint64
	triggeredAt time.Time
	// sentAt is when the trigger was sent to the sources (after its
	// commit, or at once when pipelined); ackedAt when the last task acked.
	// With triggeredAt and the commit they split a checkpoint's duration
	// into its phases (metrics).
	sentAt, ackedAt time.Time
	deadline        time.Time
	acks            map[string]fsm.TaskState // by task id
	// savepoint and stop say what was triggered, lastCompleted the
	// checkpoint the trigger named as the base of incremental snapshots;
	// savepointWaiters are the requests its outcome answers.
	savepoint, stop  bool
	lastCompleted    uint64
	savepointWaiters []savepointRequest
}

// triggerCommitted reports whether the CheckpointTriggered of js's pending
// checkpoint p is committed: a pipelined trigger is sent before, and the
// FSM does not show p meanwhile.
func (js *jobState) triggerCommitted(p *pendingCheckpoint) bool {
	return p.id <= js.ckpt.committed
}

func newPendingCheckpoint(id, attempt uint64, now time.Time, timeout time.Duration) *pendingCheckpoint {
	return &pendingCheckpoint{
		id: id, attempt: attempt, triggeredAt: now, deadline: now.Add(timeout),
		acks: make(map[string]fsm.TaskState),
	}
}

// check returns why a message about checkpoint id from task ref, sent by
// worker, does not belong to p, or nil if it does: another attempt, another
// checkpoint, a task not of the attempt, or a task placed on another worker.
func (p *pendingCheckpoint) check(ref *transport.TaskRef, id uint64, worker string, tasks map[string]*trackedTask) error {
	if id != p.id {
		return fmt.Errorf("checkpoint %d, pending is %d", id, p.id)
	}
	tv := tasks[ref.GetTaskId()]
	switch {
	case tv == nil:
		return fmt.Errorf("task %q is not in attempt %d", ref.GetTaskId(), p.attempt)
	case ref.GetAttempt() != tv.task.Attempt:
		return fmt.Errorf("attempt %d, task %s runs in attempt %d", ref.GetAttempt(), tv.task.ID, tv.task.Attempt)
	case tv.task.Worker != worker:
		return fmt.Errorf("from worker %s, task %s runs on %s", worker, tv.task.ID, tv.task.Worker)
	}
	return nil
}

// add records an ack received at now from worker, after checking it belongs
// to p. It returns why the ack was dropped, or nil.
func (p *pendingCheckpoint) add(ack *transport.CheckpointAck, worker string, tasks map[string]*trackedTask, now time.Time) error {
	ref := ack.GetTask()
	if err := p.check(ref, ack.GetCheckpointId(), worker, tasks); err != nil {
		return err
	}
	t := tasks[ref.GetTaskId()].task
	if _, dup := p.acks[t.ID]; dup {
		return fmt.Errorf("task %s already acked", t.ID)
	}
	st := ack.GetState()
	if k := st.GetKind(); k != transport.TaskKind_TASK_KIND_UNSPECIFIED && k != protoKind(t.Kind) {
		return fmt.Errorf("state of kind %s for %s task %s", k, t.Kind, t.ID)
	}
	state := fsm.TaskState{
		TaskID:        t.ID,
		Kind:          t.Kind,
		Worker:        worker,
		AckedAt:       now.UnixNano(),
		Offsets:       maps.Clone(st.GetOffsets()),
		Keyed:         st.GetKeyed(),
		KeyedSHA256:   st.GetKeyedSha256(),
		Files:         fsmFiles(st.GetFiles()),
		Applied:       maps.Clone(st.GetApplied()),
		SinkTxns:      fsmSinkTxns(st.GetSinkTxns()),
		ValueEncoding: st.GetValueEncoding(),
		Keys:          st.GetKeys(),
		StateBytes:    st.GetStateBytes(),
		// The worker measures it; a negative one is clamped, not trusted.
		AlignmentMicros: max(0, st.GetAlignmentUs()),
		RecordsIn:       max(0, st.GetRecordsIn()),
		RecordsOut:      max(0, st.GetRecordsOut()),
	}
	if t.Kind == fsm.TaskMap && t.KeyGroups != nil {
		kg := *t.KeyGroups // the range the map task's snapshot covers
		state.KeyGroups = &kg
	}
	p.acks[t.ID] = state
	return nil
}

// fsmFiles converts the file handles of an ack.
func fsmFiles(files []*transport.StateFile) []fsm.StateFile {
	if len(files) == 0 {
		return nil
	}
	out := make([]fsm.StateFile, len(files))
	for i, f := range files {
		out[i] = fsm.StateFile{
			Path: f.GetPath(), Size: f.GetSize(), SHA256: f.GetSha256(), Full: f.GetFull(),
			KeyGroups: fsm.KeyGroupRange{Start: int(f.GetKeyGroupStart()), End: int(f.GetKeyGroupEnd())},
		}
	}
	return out
}

// protoFiles is the reverse of fsmFiles, for deployments.
func protoFiles(files []fsm.StateFile) []*transport.StateFile {
	out := make([]*transport.StateFile, len(files))
	for i, f := range files {
		out[i] = &transport.StateFile{
			Path: f.Path, Size: f.Size, Sha256: f.SHA256, Full: f.Full,
			KeyGroupStart: int32(f.KeyGroups.Start), KeyGroupEnd: int32(f.KeyGroups.End),
		}
	}
	return out
}

// complete reports whether every one of the attempt's tasks has acked.
func (p *pendingCheckpoint) complete(tasks []*trackedTask) bool {
	for _, tv := range tasks {
		if _, ok := p.acks[tv.task.ID]; !ok {
			return false
		}
	}
	return len(tasks) > 0
}

// missing lists the tasks that have not acked, in assignment order.
func (p *pendingCheckpoint) missing(tasks []*trackedTask) []string {
	var ids []string
	for _, tv := range tasks {
		if _, ok := p.acks[tv.task.ID]; !ok {
			ids = append(ids, tv.task.ID)
		}
	}
	return ids
}

// timeoutReason is the abort reason of a checkpoint that timed out.
func (p *pendingCheckpoint) timeoutReason(tasks []*trackedTask) string {
	return fmt.Sprintf("timed out after %v waiting for acks from %s",
		p.deadline.Sub(p.triggeredAt), strings.Join(p.missing(tasks), ", "))
}

// checkpointPass runs the checkpoint step of every job whose checkpoint
// timer is due. The loop does this in settle; tests call it after moving
// their clock.
func (l *leader) checkpointPass() { l.runTimers() }

// checkpointStep triggers js's checkpoint if one is due, aborts its pending
// checkpoint if it timed out, and otherwise sets the job's checkpoint timer
// to when there is something to do. It reads only the leader's memory.
func (l *leader) checkpointStep(js *jobState, now time.Time) {
	if l.busy(js.id) {
		return // the write's result looks at the job again
	}
	if p := js.ckpt.pending; p != nil {
		if now.Before(p.deadline) {
			l.checkpointAt(js, p.deadline)
		} else {
			l.abortCheckpoint(js, p.timeoutReason(js.order), "timeout", true)
		}
		return
	}
	if !allRunning(js) {
		return // a task's RUNNING status touches the job again
	}
	if until := l.catchUpHold(js, now); !until.IsZero() {
		l.checkpointAt(js, until) // its caught-up status touches the job sooner
		return
	}
	if l.workerInDoubt(js) != "" {
		// The worker cannot ack, and while its session is broken and its
		// fate undecided (gossip, the lease), the tasks that feed it or
		// read from it decline: each of those aborts would count toward
		// tolerable_failures. Its next session, or the recovery that
		// follows its loss, touches the job again.
		return
	}
	c := js.spec.Checkpoint
	if js.ckpt.afterSavepoint && exactlyOnceSink(js.spec) {
		// A checkpoint at once (min_pause allowing), before another
		// savepoint: it commits the savepoint's sink transactions while
		// they are as young as the checkpoints' own (they are aborted by
		// the broker at the transaction timeout), and each savepoint
		// holds one of the map tasks' few transactional ids until then.
		// Once: a checkpoint that aborts is tried again at the interval.
		if due := js.ckpt.lastCompletion.Add(time.Duration(c.MinPause)); now.Before(due) {
			l.checkpointAt(js, due)
			return
		}
		js.ckpt.afterSavepoint = false
		l.triggerCheckpoint(js, now, false, false)
		return
	}
	if want, stop := js.wantsSavepoint(); want {
		l.triggerCheckpoint(js, now, true, stop)
		return
	}
	if js.ckpt.lastTrigger.IsZero() {
		// The first checkpoint of this term: at a random point of the
		// first interval, so that jobs started (or inherited) together do
		// not all checkpoint in the same instant, every interval.
		js.ckpt.lastTrigger = now.Add(-time.Duration(float64(c.Interval) * (1 - l.env.jitter())))
	}
	due := later(js.ckpt.lastTrigger.Add(time.Duration(c.Interval)), js.ckpt.lastCompletion.Add(time.Duration(c.MinPause)))
	if now.Before(due) {
		l.checkpointAt(js, due)
		return
	}
	l.triggerCheckpoint(js, now, false, false)
}

// exactlyOnceSink reports whether spec's job writes an exactly-once sink,
// whose map tasks commit transactions when checkpoints complete.
func exactlyOnceSink(spec fsm.JobSpec) bool {
	return spec.Sink != nil && spec.Sink.Delivery != fsm.DeliveryAtLeastOnce
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// allRunning reports whether a job is running and every task of its current
// attempt has reported RUNNING: only then can a checkpoint be taken.
func allRunning(js *jobState) bool {
	if js.status != fsm.JobRunning || js.attempt == 0 || len(js.order) == 0 {
		return false
	}
	for _, tv := range js.order {
		if tv.phase != transport.TaskPhase_TASK_PHASE_RUNNING {
			return false
		}
	}
	return true
}

// catchUpHold returns until when js's checkpoints wait for its restored
// sources that are catching up, or zero if they need not. A source catching
// up would hold the trigger, and the surviving sources' barriers would
// block the map tasks' inputs from them for the whole catch-up. The wait is
// bounded (catchUpHoldLimit): a catch-up that does not end (a partition
// whose last records Kafka no longer hands over, say) must not stop the
// job's checkpoints for good; past it, checkpoints are triggered as before
// the wait existed, time out if the catch-up goes on, and the job restarts
// whole past tolerable_failures, which needs no catch-up.
func (l *leader) catchUpHold(js *jobState, now time.Time) time.Time {
	limit := catchUpHoldLimit(js.spec.Checkpoint)
	var until time.Time
	for _, tv := range js.order {
		if !tv.catchingUp {
			continue
		}
		end := tv.catchingUpSince.Add(limit)
		if now.Before(end) {
			until = later(until, end)
			continue
		}
		if !tv.heldTooLong {
			tv.heldTooLong = true
			l.jobLogger(js).Warn("restored source still catching up: checkpoints are triggered again, and wait for it",
				"task", tv.task.ID, "worker", tv.task.Worker, "since", tv.catchingUpSince, "limit", limit)
		}
	}
	return until
}

// catchUpHoldLimit bounds how long a job's checkpoints wait for a restored
// source to catch up: as long as the checkpoints that would have waited for
// it could time out before the job restarted, tolerable_failures + 1 of
// them.
func catchUpHoldLimit(c fsm.CheckpointSpec) time.Duration {
	return time.Duration(c.Timeout) * time.Duration(c.TolerableFailures+1)
}

// triggerCheckpoint takes the next checkpoint id through Raft and sends
// TriggerCheckpoint to every source task. Where every coordinator can apply
// an id the leader chose, the trigger carries one; it is sent at once
// (pipelined) when every id issued before it is committed and the loop's
// term is still Raft's, and after the commit otherwise, and always for a
// savepoint, whose trigger may stop the job's sources. A savepoint takes the job's waiting savepoint requests
// along, and answers them if it cannot start.
func (l *leader) triggerCheckpoint(js *jobState, now time.Time, savepoint, stop bool) {
	js.ckpt.lastTrigger = now
	log := l.jobLogger(js)
	var waiters []savepointRequest
	if savepoint {
		waiters, js.savepoints = js.savepoints, nil
	}
	fail := func(err error) {
		if errors.Is(err, fsm.ErrJobCancelled) || errors.Is(err, fsm.ErrJobNotRunning) || errors.Is(err, fsm.ErrStaleAttempt) {
			// The job moved on before the trigger committed: no savepoint
			// was started, and the job's state is why (409).
			err = fmt.Errorf("%w: %w", errSavepointState, err)
		}
		for _, r := range waiters {
			r.reply <- savepointReply{err: fmt.Errorf("trigger savepoint: %w", err)}
		}
	}
	attempt := js.attempt
	cmd := fsm.CheckpointTriggeredCmd{JobID: js.id, Attempt: attempt, Time: now.UnixNano(), Savepoint: savepoint, Stop: stop}
	mayBeSent := js.ckpt.issued // every id up to it may have reached a source
	if l.env.chosenIDs != nil && l.env.chosenIDs() {
		js.ckpt.issued++
		cmd.ID = js.ckpt.issued
	}
	// Pipelined only with no sent id uncommitted, so that a new leader,
	// which skips one id, never reuses one (inherit), and only while this
	// loop's term is Raft's: a deposed leader's FSM may apply its
	// successor's entries before the loop stops, and the ids committed
	// there are the successor's to follow, not this loop's.
	if cmd.ID != 0 && !savepoint && mayBeSent == js.ckpt.committed && !js.ckpt.unsure && l.leadsTerm() {
		p := l.startCheckpoint(js, cmd.ID, now, false, false, nil)
		l.write(js, fsm.CommandCheckpointTriggered, cmd, func(_ any, err error) {
			if err == nil {
				js.ckpt.committed = max(js.ckpt.committed, cmd.ID)
				js.ckpt.unsure = false
			}
			if js.ckpt.pending != p {
				return // aborted or restarted meanwhile; the abort's write follows this one
			}
			if err != nil {
				// The sources may have taken the barrier: their acks are
				// dropped from now on, the id is never used again, and the
				// next trigger waits for its commit.
				log.Warn("trigger checkpoint: the commit failed after the trigger was sent", "checkpoint", p.id, "err", err)
				js.ckpt.pending = nil // a pipelined trigger is never a savepoint's
				l.checkpointAt(js, l.env.now())
			}
		})
		return
	}
	l.write(js, fsm.CommandCheckpointTriggered, cmd, func(res any, err error) {
		if err != nil {
			log.Warn("trigger checkpoint", "savepoint", savepoint, "err", err)
			fail(err)
			return
		}
		id, ok := res.(uint64)
		if !ok {
			log.Error("trigger checkpoint: the FSM returned no checkpoint id", "result", fmt.Sprintf("%T", res))
			fail(errors.New("the FSM returned no checkpoint id"))
			return
		}
		js.ckpt.issued = max(js.ckpt.issued, id)
		js.ckpt.committed = max(js.ckpt.committed, id)
		js.ckpt.unsure = false
		if id <= mayBeSent {
			// The FSM took the id (a coordinator below chosenIDLevel)
			// that a trigger sent before its commit may have used: it is
			// never sent again, the savepoint requests wait for the next
			// trigger, and that comes as soon as the abort is in, not an
			// interval later.
			log.Warn("checkpoint id taken by the FSM may have been sent before; skipping it", "checkpoint", id)
			js.savepoints = append(waiters, js.savepoints...)
			js.ckpt.lastTrigger = l.env.now().Add(-time.Duration(js.spec.Checkpoint.Interval))
			l.commitAbort(js, id, fsm.SkippedReason, "skipped", false, func(error) {})
			return
		}
		if js.attempt != attempt || l.jobs[js.id] != js {
			fail(fmt.Errorf("attempt %d ended", attempt)) // the next reconcile aborts it as untracked
			return
		}
		l.startCheckpoint(js, id, now, savepoint, stop, waiters)
	})
}

// startCheckpoint makes checkpoint id, triggered at now, js's pending
// checkpoint and sends its trigger to every source task.
func (l *leader) startCheckpoint(js *jobState, id uint64, now time.Time, savepoint, stop bool, waiters []savepointRequest) *pendingCheckpoint {
	p := newPendingCheckpoint(id, js.attempt, now, time.Duration(js.spec.Checkpoint.Timeout))
	p.savepoint, p.stop, p.savepointWaiters = savepoint, stop, waiters
	p.sentAt = l.env.now()
	js.ckpt.pending = p
	l.checkpointAt(js, p.deadline)
	p.lastCompleted = js.lastCompleted
	log := l.jobLogger(js)
	for _, tv := range js.order {
		if tv.task.Kind != fsm.TaskSource {
			continue
		}
		if err := l.sendTo(tv.task.Worker, triggerMsg(js, tv, p)); err != nil {
			// A worker whose session comes back gets it then (retrigger).
			log.Warn("checkpoint trigger not sent", "checkpoint", id, "task", tv.task.ID, "worker", tv.task.Worker, "err", err)
		}
	}
	log.Debug("checkpoint triggered", "checkpoint", id)
	return p
}

// leadsTerm reports whether Raft's current term is still the one this loop
// leads. Raft moves its term before it takes a newer leader's entries, so
// while this holds, the local FSM holds only entries of this term and
// earlier ones.
func (l *leader) leadsTerm() bool { return l.env.term() == l.term }

// triggerMsg is the TriggerCheckpoint of p for source task tv of js.
func triggerMsg(js *jobState, tv *trackedTask, p *pendingCheckpoint) *transport.CoordinatorMessage {
	return &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Trigger{Trigger: &transport.TriggerCheckpoint{
		Task: taskRef(js, tv.task), CheckpointId: p.id, LastCompleted: p.lastCompleted, Savepoint: p.savepoint, Stop: p.stop,
	}}}
}

// retrigger sends the pending checkpoints' triggers again to the source
// tasks on worker that have not acked them: a worker whose session was lost
// (its queue overflowed, its stream broke) may never have got them, and a
// source ignores a trigger it has already taken.
func (l *leader) retrigger(worker string) {
	for id := range l.byWorker[worker] {
		js := l.jobs[id]
		p := js.ckpt.pending
		if p == nil || p.attempt != js.attempt {
			continue
		}
		for _, tv := range js.order {
			if _, acked := p.acks[tv.task.ID]; tv.task.Kind == fsm.TaskSource && tv.task.Worker == worker && !acked {
				l.sendTo(worker, triggerMsg(js, tv, p))
			}
		}
	}
}

// onAck records a task's ack of the pending checkpoint and completes the
// checkpoint once every task has acked. Acks of other attempts, other
// checkpoints, unknown tasks or other workers are dropped.
func (l *leader) onAck(worker string, ack *transport.CheckpointAck) {
	ref := ack.GetTask()
	js := l.jobs[ref.GetJobId()]
	if js != nil && !js.currentTask(ref) {
		l.fenced(js, "ack", worker, ref, "checkpoint", ack.GetCheckpointId())
		return
	}
	if js == nil || js.ckpt.pending == nil {
		l.logger.Debug("dropping ack: no pending checkpoint", "job", ref.GetJobId(), "attempt", ref.GetAttempt(),
			"checkpoint", ack.GetCheckpointId(), "task", ref.GetTaskId(), "worker", worker)
		return
	}
	p := js.ckpt.pending
	if err := p.add(ack, worker, js.tasks, l.env.now()); err != nil {
		l.jobLogger(js).Debug("dropping ack", "checkpoint", ack.GetCheckpointId(), "task", ref.GetTaskId(),
			"ack_attempt", ref.GetAttempt(), "worker", worker, "why", err)
		return
	}
	if p.complete(js.order) {
		p.ackedAt = l.env.now()
		l.completeCheckpoint(js)
	}
}

// onDecline aborts the pending checkpoint a task of the attempt declined.
func (l *leader) onDecline(worker string, d *transport.CheckpointDecline) {
	ref := d.GetTask()
	js := l.jobs[ref.GetJobId()]
	if js != nil && !js.currentTask(ref) {
		l.fenced(js, "decline", worker, ref, "checkpoint", d.GetCheckpointId())
		return
	}
	if js == nil || js.ckpt.pending == nil {
		return
	}
	if err := js.ckpt.pending.check(ref, d.GetCheckpointId(), worker, js.tasks); err != nil {
		l.jobLogger(js).Debug("dropping decline", "checkpoint", d.GetCheckpointId(), "task", ref.GetTaskId(),
			"worker", worker, "why", err)
		return
	}
	if p := js.ckpt.pending; !p.ackedAt.IsZero() {
		// Every task acked, and the completion is being committed: a
		// source declining after its ack (a channel lost and reopened)
		// feared its map task missed the barrier, which that task's ack
		// disproves. Aborting now would only keep the commit's notices
		// from going out.
		l.jobLogger(js).Info("dropping decline of a checkpoint every task acked", "checkpoint", p.id,
			"task", ref.GetTaskId(), "worker", worker, "reason", d.GetReason())
		return
	}
	reason := fmt.Sprintf("declined by task %s on worker %s: %s", ref.GetTaskId(), worker, d.GetReason())
	l.abortCheckpoint(js, reason, "declined", true)
}

// completeCheckpoint commits the pending checkpoint with every task's state
// and notifies the source tasks, which then commit their offsets to Kafka.
// A commit the FSM or Raft refuses aborts the checkpoint.
func (l *leader) completeCheckpoint(js *jobState) {
	p := js.ckpt.pending
	if p.savepoint {
		l.completeSavepoint(js, p)
		return
	}
	l.write(js, fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{
		JobID: js.id, Attempt: p.attempt, CheckpointID: p.id, States: p.acks, Time: l.env.now().UnixNano(),
	}, func(_ any, err error) {
		if js.ckpt.pending != p {
			return // the job moved on (cancelled, restarted) while the commit was in flight
		}
		if err != nil {
			l.jobLogger(js).Error("commit checkpoint", "checkpoint", p.id, "err", err)
			// States the FSM rejects come from the tasks and count as a failed
			// checkpoint; a Raft failure does not.
			l.abortCheckpoint(js, "commit failed: "+err.Error(), "commit_failed", errors.Is(err, fsm.ErrIncompleteStates))
			return
		}
		l.checkpointCompleted(js, p)
	})
}

// checkpointCompleted records that p committed and tells every task.
func (l *leader) checkpointCompleted(js *jobState, p *pendingCheckpoint) {
	now := l.env.now()
	js.ckpt.pending = nil
	js.ckpt.lastCompletion = now
	js.ckpt.afterSavepoint = false
	js.lastCompleted = p.id
	took := now.Sub(p.triggeredAt)
	l.metrics.checkpointDuration.WithLabelValues(js.id).Observe(took.Seconds())
	l.metrics.checkpointPhase.WithLabelValues("trigger").Observe(p.sentAt.Sub(p.triggeredAt).Seconds())
	l.metrics.checkpointPhase.WithLabelValues("acks").Observe(p.ackedAt.Sub(p.sentAt).Seconds())
	l.metrics.checkpointPhase.WithLabelValues("commit").Observe(now.Sub(p.ackedAt).Seconds())
	l.metrics.checkpointsCompleted.WithLabelValues(js.id).Inc()
	// One line per checkpoint of every job would drown the log of a leader
	// of many jobs (the metrics count them all): a completion is logged at
	// Info only when it took longer than the interval or ends a run of
	// aborts.
	level := slog.LevelDebug
	if took > time.Duration(js.spec.Checkpoint.Interval) || js.ckpt.aborts > 0 {
		level = slog.LevelInfo
	}
	l.jobLogger(js).Log(l.ctx, level, "checkpoint completed", "checkpoint", p.id, "duration", took, "aborts_before", js.ckpt.aborts)
	js.ckpt.aborts = 0
	if l.env.failpoint != nil {
		l.env.failpoint("leader-before-complete-notice")
	}
	l.notifyCompleted(js, p)
	l.collectGarbage(js)
}

// notifyCompleted tells every task of the attempt that p completed. Sources
// commit their offsets to Kafka; map tasks commit their sink transactions
// and take the checkpoint's files as the base of their next incremental
// snapshot. A notice that is lost (a leader dies first) is made up for by
// the next barrier, which names the newest completed checkpoint.
//
// A savepoint that does not stop the job commits nothing, as in Flink
// since 1.15: a recovery restores the newest completed checkpoint, never a
// savepoint, and replays what followed it, so output a savepoint's
// transactions committed would be written again. Its transactions stay
// pre-committed, listed in the next checkpoint's state, and are committed
// with it; a job started from the savepoint commits them when it restores.
// A stop-with-savepoint's are committed: the job ends there.
func (l *leader) notifyCompleted(js *jobState, p *pendingCheckpoint) {
	if p.savepoint && !p.stop {
		return
	}
	for _, tv := range js.order {
		if p.savepoint && tv.task.Kind != fsm.TaskMap {
			continue // a savepoint's offsets are not the group's: sources commit a checkpoint's
		}
		l.sendTo(tv.task.Worker, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
			Task: taskRef(js, tv.task), CheckpointId: p.id, Offsets: p.acks[tv.task.ID].Offsets, Savepoint: p.savepoint,
		}}})
	}
}

// collectGarbage asks for the job's unreferenced checkpoint files to be
// deleted; the collector rate-limits and runs it off the loop.
func (l *leader) collectGarbage(js *jobState) {
	if l.env.collect != nil && js.spec.Checkpoint.Storage != "" {
		l.env.collect(l.ctx, js.id)
	}
}

// abortCheckpoint aborts the pending checkpoint through Raft with reason
// (class labels the metric). If counted is set, the abort was the tasks' doing:
// it counts toward tolerable_failures, and the attempt is restarted once the
// job's consecutive aborts exceed them. Other aborts are not counted.
func (l *leader) abortCheckpoint(js *jobState, reason, class string, counted bool) {
	p := js.ckpt.pending
	if p == nil {
		return
	}
	js.ckpt.pending = nil
	l.commitAbort(js, p.id, reason, class, counted, func(err error) {
		if p.savepoint {
			l.abortedSavepoint(js, p, reason, err)
			return
		}
		if err != nil || !counted {
			return
		}
		job, ok := l.env.job(js.id)
		if !ok || job.Status != fsm.JobRunning || job.Attempt != js.attempt {
			return
		}
		if tolerable := job.Spec.Checkpoint.TolerableFailures; job.ConsecutiveAborts > tolerable {
			if w := l.workerInDoubt(js); w != "" {
				// The abort may be the loss of that worker seen from the
				// other side (a map task declines when a source's input
				// closes): its fate decides, and a task-scoped recovery
				// resets the count.
				l.jobLogger(js).Info("not restarting for the aborts while a worker of the job has no session", "worker", w,
					"consecutive_aborts", job.ConsecutiveAborts, "tolerable_failures", tolerable)
				return
			}
			l.beginRestart(js, fmt.Sprintf("%d consecutive checkpoint aborts exceed tolerable_failures %d; last: %s",
				job.ConsecutiveAborts, tolerable, reason), "checkpoint", p.id)
		}
	})
}

// workerInDoubt returns a worker of js's tasks that has no open session, or
// "": its tasks cannot ack, and whether it is lost is for the lease to say
// (workerLost).
func (l *leader) workerInDoubt(js *jobState) string {
	for _, tv := range js.order {
		if _, none := l.sessionlessSince(tv.task.Worker); none {
			return tv.task.Worker
		}
	}
	return ""
}

// abortUntracked aborts a pending checkpoint of the FSM that this term does
// not track: one its predecessor started (a new leader never completes
// those), or one whose trigger reported an error yet was committed.
func (l *leader) abortUntracked(js *jobState, pending *fsm.Checkpoint) {
	if pending == nil {
		return
	}
	if p := js.ckpt.pending; p != nil && p.id == pending.ID {
		return
	}
	reason, class := "not tracked by the leader", "untracked"
	if l.inherited[js.id] == pending.ID {
		reason, class = "leader changed", "leader_changed"
	}
	l.commitAbort(js, pending.ID, reason, class, false, func(err error) {
		if err == nil {
			delete(l.inherited, js.id)
		}
	})
}

// inherit reads what this term takes over from its predecessors, once at
// its start, after the Barrier that applied every entry of earlier terms:
// the pending checkpoints, which the first reconcile pass aborts as "leader
// changed", and for every job the id after the FSM's last issued one,
// which a predecessor may have sent in a pipelined trigger without
// committing it, so that this term never issues it (observe takes it).
func (l *leader) inherit() {
	for _, job := range l.env.jobs() {
		if job.Pending != nil {
			l.inherited[job.ID] = job.Pending.ID
		}
		l.maybeSent[job.ID] = job.LastCheckpointID + 1
	}
}

// commitAbort commits CheckpointAborted, logs the outcome and then calls
// then with it. counted says whether the abort counts toward the job's
// tolerable_failures: only the tasks' failures do, not a leader change or a
// restart.
func (l *leader) commitAbort(js *jobState, id uint64, reason, class string, counted bool, then func(error)) {
	log := l.jobLogger(js).With("checkpoint", id)
	l.write(js, fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{
		JobID: js.id, CheckpointID: id, Reason: reason, Time: l.env.now().UnixNano(), NotCounted: !counted,
	}, func(_ any, err error) {
		if err != nil {
			log.Warn("abort checkpoint", "reason", reason, "err", err)
			js.ckpt.unsure = true // the FSM may still hold it pending
		} else {
			js.ckpt.aborts++
			l.metrics.checkpointsAborted.WithLabelValues(js.id, class).Inc()
			log.Warn("checkpoint aborted", "reason", reason)
			// Its files are garbage now: a job whose checkpoints keep
			// aborting must not fill its storage waiting for a completion.
			l.collectGarbage(js)
		}
		then(err)
	})
}
