package coordinator

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// holdWrites has the harness's FSM apply each write only when its result is
// handed to the leader (flush), as Raft takes a while to commit it.
func (h *leaderHarness) holdWrites() { h.applyLater = true }

// sourceTriggers drains every worker's queue and returns the trigger ids
// sent to source tasks, by task.
func (h *leaderHarness) sourceTriggers() map[string]uint64 {
	return triggers(append(h.drain("w1"), h.drain("w2")...))
}

// ackUnflushed hands the leader every task's ack of checkpoint id without
// playing the loop on: writes it makes wait.
func (h *leaderHarness) ackUnflushed(jobID string, id uint64) {
	job := h.job(jobID)
	for _, tk := range job.Tasks {
		h.l.handle(workerMessage{sess: h.sessions[tk.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{
			Ack: &transport.CheckpointAck{Task: ref(job, tk), CheckpointId: id, State: validState(tk, id)},
		}}})
	}
}

// TestLeaderSendsTriggersBeforeTheyCommit: with every coordinator able to
// apply an id the leader chose, the trigger goes to the sources while its
// CheckpointTriggered commits, not after; acks that come before the commit
// complete the checkpoint once it is in, in the log's order (trigger, then
// completion).
func TestLeaderSendsTriggersBeforeTheyCommit(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 1))
	first := h.completeCheckpoint("j1")

	h.holdWrites()
	h.advance(time.Duration(h.job("j1").Spec.Checkpoint.Interval))
	h.l.checkpointPass()
	sent := h.sourceTriggers()
	if sent["source-0"] != first+1 {
		t.Fatalf("triggers sent before the commit: %v, want checkpoint %d to source-0", sent, first+1)
	}
	if j := h.job("j1"); j.Pending != nil || j.LastCheckpointID != first {
		t.Fatalf("the FSM has pending %+v, last issued %d, before the trigger committed", j.Pending, j.LastCheckpointID)
	}

	// A look at the FSM, which does not show the checkpoint yet, keeps it
	// (a worker reporting a newer attempt makes one while writes wait).
	h.l.observe(h.job("j1"))
	if p := h.l.jobs["j1"].ckpt.pending; p == nil || p.id != first+1 {
		t.Fatalf("a look at the FSM before the commit dropped checkpoint %d: %+v", first+1, p)
	}
	h.ackUnflushed("j1", first+1)
	if q := h.l.writes["j1"]; len(q) != 2 || q[0].t != fsm.CommandCheckpointTriggered || q[1].t != fsm.CommandCheckpointCompleted {
		t.Fatalf("the job's writes after every ack: %d, want the trigger's, then the completion queued behind it", len(q))
	}
	h.flush()
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != first+1 {
		t.Fatalf("checkpoint %d did not complete once its trigger committed: last %+v", first+1, last)
	}
	if !h.f.ChosenCheckpointIDs() {
		t.Fatal("the FSM does not mark chosen checkpoint ids")
	}
}

// TestLeaderLeavesIdsToTheFSMBelowChosenIDLevel: while a coordinator cannot
// apply a chosen id, the FSM takes the next id and the trigger is sent only
// once it is committed, as before.
func TestLeaderLeavesIdsToTheFSMBelowChosenIDLevel(t *testing.T) {
	h := newLeaderHarness(t)
	h.fsmIDs = true
	h.startJob("j1", testJobSpec(1, 1))
	first := h.completeCheckpoint("j1")

	h.holdWrites()
	h.advance(time.Duration(h.job("j1").Spec.Checkpoint.Interval))
	h.l.checkpointPass()
	if sent := h.sourceTriggers(); len(sent) != 0 {
		t.Fatalf("triggers sent before the FSM gave the id: %v", sent)
	}
	h.flush()
	if sent := h.sourceTriggers(); sent["source-0"] != first+1 {
		t.Fatalf("triggers after the commit: %v, want checkpoint %d", sent, first+1)
	}
	if h.f.ChosenCheckpointIDs() {
		t.Fatal("the FSM marks chosen checkpoint ids; none was chosen")
	}
}

// reconnectAll starts a new term whose workers reconnect reporting every
// task of job running, and moves the clock past its grace period and the
// job's first checkpoint interval; the loop has not run yet.
func (h *leaderHarness) reconnectAll(job fsm.Job) {
	h.t.Helper()
	h.newTerm()
	for _, w := range []string{"w1", "w2"} {
		var running []*transport.TaskStatus
		for _, tk := range job.Tasks {
			if tk.Worker == w {
				running = append(running, &transport.TaskStatus{Task: ref(job, tk), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
			}
		}
		h.connect(w, 4, running...)
	}
	h.pastGrace()
	h.advance(time.Duration(job.Spec.Checkpoint.Interval))
}

// TestLeaderNeverReusesAnIdItsPredecessorMayHaveSent: a leader sends a
// trigger before its commit and dies before the commit. The next leader
// cannot know, so it skips the id after the FSM's last for every job it
// takes over, records it as skipped, and sends its first trigger only once
// that trigger is committed; later ones are pipelined again. With a
// coordinator below chosenIDLevel the FSM takes the ids: one the
// predecessor may have sent is aborted as skipped, never sent.
func TestLeaderNeverReusesAnIdItsPredecessorMayHaveSent(t *testing.T) {
	for _, fsmIDs := range []bool{false, true} {
		name := "chosen ids"
		if fsmIDs {
			name = "ids taken by the FSM in the new term"
		}
		t.Run(name, func(t *testing.T) {
			h := newLeaderHarness(t)
			job := h.startJob("j1", testJobSpec(1, 1))
			first := h.completeCheckpoint("j1")

			// The predecessor sends first+1 and dies before its commit.
			h.holdWrites()
			h.advance(time.Duration(job.Spec.Checkpoint.Interval))
			h.l.checkpointPass()
			if sent := h.sourceTriggers(); sent["source-0"] != first+1 {
				t.Fatalf("the predecessor's trigger: %v, want checkpoint %d", sent, first+1)
			}
			h.results = nil // lost with the leader
			h.applyLater = false

			h.fsmIDs = fsmIDs
			h.reconnectAll(job)
			h.holdWrites()
			h.l.reconcile()
			h.l.checkpointPass()
			if sent := h.sourceTriggers(); len(sent) != 0 {
				t.Fatalf("the new leader's first trigger went out before its commit: %v", sent)
			}
			h.flush()
			sent := h.sourceTriggers()
			if sent["source-0"] == first+1 {
				t.Fatalf("the new leader sent checkpoint %d, which its predecessor may have sent", first+1)
			}
			// With ids taken by the FSM, it took first+1, which was
			// aborted as skipped, and the next trigger followed at once
			// (the clock did not move), sent after its commit.
			if sent["source-0"] != first+2 {
				t.Fatalf("the new leader's first trigger: %v, want checkpoint %d (%d skipped)", sent, first+2, first+1)
			}
			h.applyLater = false
			h.ackAll("j1", first+2)
			if last, _ := h.f.LastCompleted("j1"); last.ID != first+2 {
				t.Fatalf("completed checkpoint %d, want %d", last.ID, first+2)
			}
			if j := h.job("j1"); len(j.Aborted) != 1 || j.Aborted[0].ID != first+1 || j.Aborted[0].Reason != fsm.SkippedReason {
				t.Fatalf("the skipped id %d is not in the aborted history: %+v", first+1, j.Aborted)
			}
			if fsmIDs {
				return
			}
			// Every id issued is committed again: the next is pipelined.
			h.holdWrites()
			h.advance(time.Duration(job.Spec.Checkpoint.Interval))
			h.l.checkpointPass()
			if sent := h.sourceTriggers(); sent["source-0"] != first+3 {
				t.Fatalf("the next trigger before its commit: %v, want checkpoint %d", sent, first+3)
			}
			h.flush()
		})
	}
}

// TestLeaderDropsATriggerWhoseCommitFailed: a trigger sent before its commit,
// which then fails, is dropped: the acks of its id are not taken, and the
// next checkpoint takes a new id, never that one.
func TestLeaderDropsATriggerWhoseCommitFailed(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 1))
	first := h.completeCheckpoint("j1")

	submit := h.l.env.submit
	failed := false
	h.l.env.submit = func(ct fsm.CommandType, data []byte, done func(any, error)) {
		if ct == fsm.CommandCheckpointTriggered && !failed {
			failed = true
			h.results = append(h.results, func() { done(nil, errors.New("raft apply: leadership lost")) })
			return
		}
		submit(ct, data, done)
	}
	h.advance(time.Duration(h.job("j1").Spec.Checkpoint.Interval))
	h.l.checkpointPass()
	if sent := h.sourceTriggers(); sent["source-0"] != first+1 {
		t.Fatalf("triggers: %v, want checkpoint %d sent before its commit", sent, first+1)
	}
	h.flush() // the commit fails
	if p := h.l.jobs["j1"].ckpt.pending; p != nil {
		t.Fatalf("the leader still tracks checkpoint %d, whose trigger failed", p.id)
	}
	h.ackAll("j1", first+1)
	if last, _ := h.f.LastCompleted("j1"); last.ID != first {
		t.Fatalf("checkpoint %d completed, whose trigger never committed", last.ID)
	}
	if p := h.l.jobs["j1"].ckpt.pending; p != nil {
		t.Fatalf("the leader still tracks checkpoint %d, whose trigger failed", p.id)
	}
	// The next trigger waits for its commit: were it sent at once and its
	// leader died, a new leader, which skips one id, would issue it again.
	h.holdWrites()
	h.advance(time.Duration(h.job("j1").Spec.Checkpoint.Interval))
	h.l.checkpointPass()
	if sent := h.sourceTriggers(); len(sent) != 0 {
		t.Fatalf("the trigger after a failed one went out before its commit: %v", sent)
	}
	h.flush()
	if sent := h.sourceTriggers(); sent["source-0"] != first+2 {
		t.Fatalf("the trigger after a failed one: %v, want checkpoint %d: the failed trigger's id is never reused", sent, first+2)
	}
	h.applyLater = false
	h.ackAll("j1", first+2)
	if last, _ := h.f.LastCompleted("j1"); last.ID != first+2 {
		t.Fatalf("completed checkpoint %d, want %d", last.ID, first+2)
	}
}

// TestLeaderWaitsForTheCommitAfterAFailedAbort: a timed-out checkpoint
// whose abort fails to commit stays pending in the FSM, which refuses the
// next trigger (due at once: the timeout is longer than the interval).
// That trigger is not sent ahead of its commit, so the sources do no
// checkpoint for nothing; the reconcile aborts the stale one, and
// checkpoints go on.
func TestLeaderWaitsForTheCommitAfterAFailedAbort(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	first := h.completeCheckpoint("j1")
	h.advance(time.Duration(job.Spec.Checkpoint.Interval))
	h.checkpointPass()
	if sent := h.sourceTriggers(); sent["source-0"] != first+1 {
		t.Fatalf("triggers: %v, want checkpoint %d", sent, first+1)
	}

	submit := h.l.env.submit
	failed, refused := false, 0
	h.l.env.submit = func(ct fsm.CommandType, data []byte, done func(any, error)) {
		switch {
		case ct == fsm.CommandCheckpointAborted && !failed:
			failed = true
			h.results = append(h.results, func() { done(nil, errors.New("raft apply: timed out enqueuing operation")) })
		case ct == fsm.CommandCheckpointTriggered && failed:
			submit(ct, data, func(res any, err error) {
				if errors.Is(err, fsm.ErrCheckpointPending) {
					refused++
				}
				done(res, err)
			})
		default:
			submit(ct, data, done)
		}
	}
	h.advance(time.Duration(job.Spec.Checkpoint.Timeout)) // times out; its abort fails
	h.checkpointPass()
	if !failed || refused == 0 {
		t.Fatalf("abort failed %v, triggers the FSM refused %d: want the abort to fail and the next trigger refused", failed, refused)
	}
	if sent := h.sourceTriggers(); len(sent) != 0 {
		t.Fatalf("a trigger the FSM refused went out ahead of its commit: %v", sent)
	}
	if id := h.completeCheckpoint("j1"); id <= first+1 {
		t.Fatalf("completed checkpoint %d, want one above %d", id, first+1)
	}
}

// successorCompletes commits checkpoint id of job's current attempt as a
// successor's entries reach a deposed leader's FSM: its trigger, then its
// completion with every task's ack.
func (h *leaderHarness) successorCompletes(jobID string, id uint64) {
	h.t.Helper()
	job := h.job(jobID)
	h.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: jobID, Attempt: job.Attempt, ID: id, Time: h.clock.UnixNano()})
	p := newPendingCheckpoint(id, job.Attempt, h.clock, time.Minute)
	tasks := make(map[string]*trackedTask, len(job.Tasks))
	for _, tk := range job.Tasks {
		tk.Attempt = job.TaskAttempt(tk)
		tasks[tk.ID] = &trackedTask{task: tk}
	}
	for _, tk := range job.Tasks {
		ack := &transport.CheckpointAck{Task: ref(job, tk), CheckpointId: id, State: validState(tk, id)}
		if err := p.add(ack, tk.Worker, tasks, h.clock); err != nil {
			h.t.Fatalf("ack of checkpoint %d from %s: %v", id, tk.ID, err)
		}
	}
	h.apply(fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{
		JobID: jobID, Attempt: job.Attempt, CheckpointID: id, States: p.acks, Time: h.clock.UnixNano(),
	})
}

// TestDeposedLeaderSendsNoTriggerAheadOfItsCommit: a leader is deposed and
// its FSM applies the successor's checkpoint before its loop stops. The
// loop reads that checkpoint as committed, but its next trigger must not go
// out ahead of a commit: its id, the one after the successor's, is the
// successor's next, and two triggers of one id from two leaders would reach
// the sources. Once Raft's term has moved on, the loop waits for the commit,
// which fails.
func TestDeposedLeaderSendsNoTriggerAheadOfItsCommit(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	first := h.completeCheckpoint("j1")

	// A successor is elected in the next term (the new leader skips
	// first+1) and completes first+2; this node's writes fail from now on.
	h.raftTerm++
	h.l.env.submit = func(_ fsm.CommandType, _ []byte, done func(any, error)) {
		h.results = append(h.results, func() { done(nil, raft.ErrNotLeader) })
	}
	h.successorCompletes("j1", first+2)
	h.flush() // the loop looks at the job the FSM changed
	if js := h.l.jobs["j1"]; js.ckpt.committed != first+2 {
		t.Fatalf("the loop read checkpoint %d as the last committed, want the successor's %d", js.ckpt.committed, first+2)
	}

	h.advance(time.Duration(job.Spec.Checkpoint.Interval))
	h.l.checkpointPass()
	if p := h.l.jobs["j1"].ckpt.pending; p != nil {
		t.Fatalf("a deposed leader started checkpoint %d ahead of its commit (the successor's next id is %d)", p.id, first+3)
	}
	if sent := h.sourceTriggers(); len(sent) != 0 {
		t.Fatalf("a deposed leader sent triggers ahead of their commit: %v (the successor's next id is %d)", sent, first+3)
	}
	if q := h.l.writes["j1"]; len(q) != 1 || q[0].t != fsm.CommandCheckpointTriggered {
		t.Fatalf("the job's writes: %d, want the trigger's, waiting for its commit", len(q))
	}
	h.flush() // the commit fails: this node is no longer the leader
	if sent := h.sourceTriggers(); len(sent) != 0 {
		t.Fatalf("a deposed leader sent triggers whose commit failed: %v", sent)
	}
	if p := h.l.jobs["j1"].ckpt.pending; p != nil {
		t.Fatalf("a deposed leader tracks checkpoint %d", p.id)
	}
}

// successorCancels runs job with a completed checkpoint, then deposes the
// leader: Raft's term moves on, and the successor's cancel of the job
// reaches the FSM. The loop has not run since.
func (h *leaderHarness) successorCancels(job string) {
	h.t.Helper()
	h.startJob(job, testJobSpec(1, 1))
	h.completeCheckpoint(job)
	h.raftTerm++
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: job, Reason: "user", Time: h.clock.UnixNano()})
}

// TestLeaderLoopOfAnEndedTermActsOnNothing: once Raft's term has moved past
// the loop's, what the FSM shows may be a successor's doing (here the job's
// cancel), and the loop must not act on it as if it were its own term's:
// it sends nothing, says why, and returns when its context ends.
func TestLeaderLoopOfAnEndedTermActsOnNothing(t *testing.T) {
	h := newLeaderHarness(t)
	h.successorCancels("j1")
	logger, logs := captureLogger(t)
	h.l.logger = logger
	done := make(chan struct{})
	go func() { defer close(done); h.l.run() }()
	waitFor(t, 10*time.Second, func() error {
		if len(logs.lines("raft term moved on")) == 0 {
			return errors.New("the loop of an ended term has not said it waits for its end")
		}
		return nil
	})
	h.cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the loop of an ended term did not return when its context ended")
	}
	if msgs := append(h.drain("w1"), h.drain("w2")...); len(msgs) != 0 {
		t.Fatalf("the loop of an ended term sent %d messages, the first %v", len(msgs), msgs[0])
	}
}

// TestDeposedLeaderSendsNothing: the successor's cancel of the job reaches
// this node's FSM while its loop is in an iteration (past termOver's
// check), and a worker reports a task of an attempt before the current one
// as running. The loop reads the cancel and classifies the stale task, but
// once Raft's term has moved, the CancelTask messages it decides are not
// sent; in its own term (the control) they are.
func TestDeposedLeaderSendsNothing(t *testing.T) {
	for _, deposed := range []bool{false, true} {
		t.Run(fmt.Sprintf("deposed=%v", deposed), func(t *testing.T) {
			h := newLeaderHarness(t)
			h.startJob("j1", testJobSpec(1, 1))
			h.completeCheckpoint("j1")
			if deposed {
				h.raftTerm++
			}
			h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
			h.flush() // the loop reconciles the job the FSM changed
			if js := h.l.jobs["j1"]; js == nil || js.status != fsm.JobCancelled {
				t.Fatal("the loop did not read the cancel: the test shows nothing")
			}
			job := h.job("j1")
			stale := ref(job, job.Tasks[0])
			stale.Attempt-- // of an attempt before the current one, still running
			h.report(job.Tasks[0].Worker, stale, transport.TaskPhase_TASK_PHASE_RUNNING, "")
			msgs := append(h.drain("w1"), h.drain("w2")...)
			if deposed && len(msgs) != 0 {
				t.Fatalf("a deposed leader sent %d messages, the first %v", len(msgs), msgs[0])
			}
			if n := len(cancels(msgs)); !deposed && n < len(job.Tasks)+1 {
				t.Fatalf("a leader in its term sent %d cancels, want one per task of the cancelled job and one for the stale task", n)
			}
		})
	}
}

// TestSendToSaysWhyNothingWasSent: the loop's warning about a message it
// did not send names the cause, so that a deposed loop's last moments do not
// read as a worker without a session.
func TestSendToSaysWhyNothingWasSent(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w1", 4)
	msg := cancelMsg(&transport.TaskRef{JobId: "j1", Attempt: 1, TaskId: "t1"}, "test")
	if err := h.l.sendTo("w1", msg); err != nil {
		t.Fatalf("send on an open session: %v", err)
	}
	if n := len(h.drain("w1")); n != 1 {
		t.Fatalf("the open session got %d messages, want 1", n)
	}
	if err := h.l.sendTo("w9", msg); !errors.Is(err, errNoSession) {
		t.Errorf("send to a worker without a session: %v, want %v", err, errNoSession)
	}
	h.raftTerm++
	if err := h.l.sendTo("w1", msg); !errors.Is(err, errTermMoved) {
		t.Errorf("send after the term moved: %v, want %v", err, errTermMoved)
	}
	h.raftTerm--
	h.sessions["w1"].close(errQueueFull)
	if err := h.l.sendTo("w1", msg); !errors.Is(err, errQueueFull) {
		t.Errorf("send on a session closed by its overflow: %v, want %v", err, errQueueFull)
	}
}

// TestLeaderDropsADeclineOfACheckpointEveryTaskAcked: a source that lost
// and reopened a channel after its ack declines the checkpoint, fearing
// its map task missed the barrier. Once every task has acked, the map
// task's own ack disproves it: the completion being committed goes on, and
// its notices go out.
func TestLeaderDropsADeclineOfACheckpointEveryTaskAcked(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	h.completeCheckpoint("j1")
	p := h.nextCheckpoint("j1")
	h.drain("w1")
	h.drain("w2")
	h.holdWrites()
	for _, task := range job.Tasks {
		h.l.handle(workerMessage{sess: h.sessions[task.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{
			Ack: &transport.CheckpointAck{Task: ref(job, task), CheckpointId: p.ID, State: validState(task, p.ID)},
		}}})
	}
	src := job.Tasks[slices.IndexFunc(job.Tasks, func(t fsm.Task) bool { return t.Kind == fsm.TaskSource })]
	h.l.handle(workerMessage{sess: h.sessions[src.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Decline{
		Decline: &transport.CheckpointDecline{Task: ref(job, src), CheckpointId: p.ID, Reason: "channel to map task map-0 was lost before checkpoint completed"},
	}}})
	h.flush()
	last, ok := h.f.LastCompleted("j1")
	if !ok || last.ID != p.ID {
		t.Fatalf("newest completed %d, want %d: the decline after every ack aborted it", last.ID, p.ID)
	}
	notices := 0
	for _, w := range []string{"w1", "w2"} {
		for _, m := range h.drain(w) {
			if c := m.GetComplete(); c != nil && c.GetCheckpointId() == p.ID {
				notices++
			}
		}
	}
	if notices != len(job.Tasks) {
		t.Fatalf("%d notices that checkpoint %d completed, want one per task (%d)", notices, p.ID, len(job.Tasks))
	}
}
