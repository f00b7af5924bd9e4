package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// requestSavepoint hands a savepoint request to the leader loop and returns
// the channel its answer comes on.
func (h *leaderHarness) requestSavepoint(job string, stop bool) chan savepointReply {
	r := savepointRequest{jobID: job, stop: stop, reply: make(chan savepointReply, 1)}
	h.handle(r)
	return r.reply
}

// triggerSavepoint asks for a savepoint of job (a stop-with-savepoint with
// stop), has the leader trigger it and returns it, pending.
func (h *leaderHarness) triggerSavepoint(job string, stop bool) *fsm.Checkpoint {
	h.t.Helper()
	h.requestSavepoint(job, stop)
	h.checkpointPass() // no interval wait for a savepoint
	p := h.job(job).Pending
	if p == nil || !p.Savepoint || p.Stop != stop {
		h.t.Fatalf("pending %+v, want a savepoint (stop %v)", p, stop)
	}
	return p
}

// savepointTriggers returns the savepoint triggers among msgs, by task.
func savepointTriggers(msgs []*transport.CoordinatorMessage) map[string]*transport.TriggerCheckpoint {
	out := make(map[string]*transport.TriggerCheckpoint)
	for _, m := range msgs {
		if tr := m.GetTrigger(); tr != nil {
			out[tr.GetTask().GetTaskId()] = tr
		}
	}
	return out
}

// TestLeaderSavepoint: a savepoint is triggered at once, carries the
// savepoint flag (and stop) to the sources, is recorded with file paths
// relative to its own directory, and answers the request; a final one
// cancels the job; an aborted one answers with the reason and, when it was
// to stop the job, restarts it from its last checkpoint.
func TestLeaderSavepoint(t *testing.T) {
	h := newLeaderHarness(t)
	spec := testJobSpec(1, 2)
	spec.Checkpoint.Storage = "file:///ck"
	h.startJob("j1", spec)
	last := h.completeCheckpoint("j1")

	reply := h.requestSavepoint("j1", false)
	h.checkpointPass() // no interval wait for a savepoint
	job := h.job("j1")
	if job.Pending == nil || !job.Pending.Savepoint || job.Pending.Stop {
		t.Fatalf("pending %+v, want a savepoint", job.Pending)
	}
	id := job.Pending.ID
	msgs := append(h.drain("w1"), h.drain("w2")...)
	for task, tr := range savepointTriggers(msgs) {
		if !tr.GetSavepoint() || tr.GetStop() || tr.GetLastCompleted() != last {
			t.Fatalf("trigger to %s = %v, want a savepoint naming checkpoint %d", task, tr, last)
		}
	}
	dir := transport.SavepointDir("j1", id)
	for _, task := range job.Tasks {
		st := validState(task, id)
		if task.Kind == fsm.TaskMap {
			st = &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Files: []*transport.StateFile{{
				Path: dir + task.ID + "-a1.cfs", Size: 10, Sha256: strings.Repeat("ab", 32), Full: true,
				KeyGroupStart: int32(task.KeyGroups.Start), KeyGroupEnd: int32(task.KeyGroups.End),
			}}}
		}
		h.handle(workerMessage{sess: h.sessions[task.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{
			Ack: &transport.CheckpointAck{Task: ref(job, task), CheckpointId: id, State: st},
		}}})
	}
	var rep savepointReply
	select {
	case rep = <-reply:
	default:
		t.Fatal("savepoint request not answered after every task acked")
	}
	if rep.err != nil {
		t.Fatal(rep.err)
	}
	sp := rep.sp
	if sp.ID != fsm.SavepointID("j1", id) || !strings.Contains(sp.Location, "prefix=savepoints%2Fj1%2Fsp-") {
		t.Fatalf("savepoint %+v, want id %s located in its own directory", sp, fsm.SavepointID("j1", id))
	}
	if f := sp.Tasks["map-0"].Files[0].Path; f != "map-0-a1.cfs" {
		t.Fatalf("savepoint file path %q, want it relative to the savepoint's directory", f)
	}
	if got, _ := h.f.LastCompleted("j1"); got.ID != last {
		t.Fatalf("newest completed checkpoint %d, want %d: a savepoint is not a checkpoint", got.ID, last)
	}
	// No task is told: a savepoint that does not stop the job commits no
	// sink transaction (a recovery restores the last checkpoint and would
	// write its output again), and sources commit no offsets for it.
	for _, m := range append(h.drain("w1"), h.drain("w2")...) {
		if c := m.GetComplete(); c != nil {
			t.Fatalf("completion %v sent for a savepoint that does not stop the job", c)
		}
	}
	// The next checkpoint's barrier still names the last checkpoint, and
	// its completion is told as usual: map tasks commit the savepoint's
	// transactions with its own.
	next := h.completeCheckpoint("j1")
	if next <= id {
		t.Fatalf("checkpoint %d after savepoint %d", next, id)
	}

	// A stop-with-savepoint that times out restarts the job.
	reply = h.requestSavepoint("j1", true)
	h.checkpointPass()
	if p := h.job("j1").Pending; p == nil || !p.Stop {
		t.Fatalf("pending %+v, want a final savepoint", p)
	}
	h.advance(10*time.Second + time.Millisecond)
	h.checkpointPass()
	select {
	case rep = <-reply:
	default:
		t.Fatal("aborted savepoint not answered")
	}
	if rep.err == nil || !strings.Contains(rep.err.Error(), "aborted") {
		t.Fatalf("answer %v, want the abort", rep.err)
	}
	if j := h.job("j1"); j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "stop with savepoint failed") {
		t.Fatalf("job %s (%q), want a restart after the failed stop", j.Status, j.Reason)
	}

	// Requests for a job that is not running are refused at once.
	reply = h.requestSavepoint("nope", false)
	if rep := <-reply; rep.err == nil {
		t.Fatal("savepoint of an unknown job accepted")
	}
}

// TestLeaderRestartsAJobWhoseStopALeaderChangeAborted: a stop-with-savepoint
// whose barrier stopped the sources, cut short by a leader change (pending
// at the change, or aborted by the predecessor before it wrote the restart),
// restarts the job: a source stopped at a stop's barrier reads nothing more
// until a new attempt replaces it. An ordinary savepoint cut short the same
// way leaves the job running.
func TestLeaderRestartsAJobWhoseStopALeaderChangeAborted(t *testing.T) {
	for _, tc := range []struct {
		name        string
		stop        bool
		abortedOnce bool // the predecessor committed the abort, not the restart
	}{
		{name: "stop pending", stop: true},
		{name: "stop aborted", stop: true, abortedOnce: true},
		{name: "savepoint pending", stop: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newLeaderHarness(t)
			job := h.startJob("j1", testJobSpec(1, 1))
			h.completeCheckpoint("j1")
			h.requestSavepoint("j1", tc.stop)
			h.checkpointPass()
			p := h.job("j1").Pending
			if p == nil || !p.Savepoint || p.Stop != tc.stop {
				t.Fatalf("pending %+v, want a savepoint with stop %v", p, tc.stop)
			}
			if tc.abortedOnce {
				h.apply(fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{JobID: "j1", CheckpointID: p.ID, Reason: "timed out", Time: h.clock.UnixNano(), NotCounted: true})
			}

			h.newTerm()
			for _, w := range []string{"w1", "w2"} {
				h.connect(w, 4, runningOn(job, w)...)
			}
			h.pastGrace()
			h.step()
			j := h.job("j1")
			if j.Pending != nil && j.Pending.ID == p.ID {
				t.Fatalf("savepoint %d still pending after the leader change", p.ID)
			}
			restarted := j.Status == fsm.JobRestarting && strings.Contains(j.Reason, "stop with savepoint")
			if tc.stop && !restarted {
				t.Fatalf("job %s (%q) at attempt %d after an aborted stop: want it restarting", j.Status, j.Reason, j.Attempt)
			}
			if !tc.stop && j.Status != fsm.JobRunning {
				t.Fatalf("job %s (%q) after an aborted savepoint: want it running on", j.Status, j.Reason)
			}
			if tc.stop {
				h.advance(time.Minute)
				h.step()
				if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 2 {
					t.Fatalf("job %s at attempt %d after the backoff: want attempt 2 running", j.Status, j.Attempt)
				}
				h.runAll("j1")
				h.step()
				if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 2 {
					t.Fatalf("job %s (%q) at attempt %d: the new attempt restarted again", j.Status, j.Reason, j.Attempt)
				}
			}
		})
	}
}

// TestLeaderNoticesBeforeItCancels: the map tasks of a cancelled job are
// told of its newest completed checkpoint, or the savepoint that stopped
// it, before their cancel, for the notice its commit sent may have been
// lost, and a cancelled job has no next barrier to make up for it: the
// sink transactions it covers would never be committed. A savepoint that
// did not stop the job is not told: it commits nothing. Sources get the
// cancel alone.
func TestLeaderNoticesBeforeItCancels(t *testing.T) {
	t.Run("stop with savepoint, notices lost in a leader change", func(t *testing.T) {
		h := newLeaderHarness(t)
		job := h.startJob("j1", testJobSpec(1, 2))
		h.completeCheckpoint("j1")
		h.requestSavepoint("j1", true)
		h.checkpointPass()
		p := h.job("j1").Pending
		if p == nil || !p.Stop {
			t.Fatalf("pending %+v, want a stop-with-savepoint", p)
		}
		h.ackAll("j1", p.ID)
		if j := h.job("j1"); j.Status != fsm.JobCancelled {
			t.Fatalf("job %s after its stop-with-savepoint completed, want cancelled", j.Status)
		}
		h.drain("w1") // lost with the leader
		h.drain("w2")

		h.newTerm()
		msgs := map[string][]*transport.CoordinatorMessage{}
		for _, w := range []string{"w1", "w2"} {
			h.connect(w, 4, runningOn(job, w)...)
			msgs[w] = h.drain(w)
		}
		checkNoticedBeforeCancel(t, job, msgs, p.ID, true)
	})
	t.Run("cancel after a checkpoint whose notice was lost", func(t *testing.T) {
		h := newLeaderHarness(t)
		job := h.startJob("j1", testJobSpec(1, 2))
		h.completeCheckpoint("j1")
		last := h.completeCheckpoint("j1")
		h.drain("w1")
		h.drain("w2")
		h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
		h.flush()
		checkNoticedBeforeCancel(t, job, map[string][]*transport.CoordinatorMessage{"w1": h.drain("w1"), "w2": h.drain("w2")}, last, false)
	})
	t.Run("cancel after a savepoint that did not stop the job", func(t *testing.T) {
		h := newLeaderHarness(t)
		job := h.startJob("j1", testJobSpec(1, 2))
		last := h.completeCheckpoint("j1")
		h.requestSavepoint("j1", false)
		h.checkpointPass()
		p := h.job("j1").Pending
		if p == nil || !p.Savepoint || p.Stop {
			t.Fatalf("pending %+v, want a savepoint", p)
		}
		h.ackAll("j1", p.ID)
		h.drain("w1")
		h.drain("w2")
		h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
		h.flush()
		checkNoticedBeforeCancel(t, job, map[string][]*transport.CoordinatorMessage{"w1": h.drain("w1"), "w2": h.drain("w2")}, last, false)
	})
}

// checkNoticedBeforeCancel checks that msgs, the messages to each worker,
// cancel every task of job, and that each map task's first cancel comes
// after a notice that checkpoint id completed (savepoint says whether it
// is one), and a source's with none.
func checkNoticedBeforeCancel(t *testing.T, job fsm.Job, msgs map[string][]*transport.CoordinatorMessage, id uint64, savepoint bool) {
	t.Helper()
	for _, task := range job.Tasks {
		noticed, cancelled := false, false
		for _, m := range msgs[task.Worker] {
			if c := m.GetComplete(); c != nil && c.GetTask().GetTaskId() == task.ID && !cancelled {
				if c.GetCheckpointId() != id || c.GetSavepoint() != savepoint {
					t.Errorf("task %s told %d (savepoint %v) completed, want %d (savepoint %v)", task.ID, c.GetCheckpointId(), c.GetSavepoint(), id, savepoint)
				}
				noticed = true
			}
			if c := m.GetCancel(); c != nil && c.GetTask().GetTaskId() == task.ID {
				cancelled = true
			}
		}
		switch {
		case !cancelled:
			t.Errorf("task %s of the cancelled job not cancelled", task.ID)
		case task.Kind == fsm.TaskMap && !noticed:
			t.Errorf("map task %s cancelled without the notice that %d completed", task.ID, id)
		case task.Kind == fsm.TaskSource && noticed:
			t.Errorf("source task %s told of a completion at its cancel", task.ID)
		}
	}
}

// TestLeaderDropsASavepointRequestItsClientGaveUp: a stop-with-savepoint
// waiting for the job's checkpoint slot whose client has given up (timed
// out, gone) is dropped, not triggered: the client was told it did not
// complete, and must not find its job stopped later.
func TestLeaderDropsASavepointRequestItsClientGaveUp(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 1))
	h.completeCheckpoint("j1")
	p := h.nextCheckpoint("j1")
	ctx, cancel := context.WithCancel(context.Background())
	h.handle(savepointRequest{jobID: "j1", stop: true, reply: make(chan savepointReply, 1), ctx: ctx})
	cancel() // the client's wait ended
	h.ackAll("j1", p.ID)
	h.checkpointPass()
	j := h.job("j1")
	if j.Status != fsm.JobRunning || (j.Pending != nil && j.Pending.Savepoint) {
		t.Fatalf("job %s, pending %+v: the abandoned stop-with-savepoint was triggered", j.Status, j.Pending)
	}
	// A request whose client still waits is triggered.
	h.requestSavepoint("j1", false)
	h.checkpointPass()
	if p := h.job("j1").Pending; p == nil || !p.Savepoint {
		t.Fatalf("pending %+v, want the savepoint of the request still waited for", p)
	}
}

// TestLeaderAnswersASavepointTheJobMovedPast: a savepoint pending when the
// job restarts, or is cancelled, behind the loop's back (another term's
// writes) is answered at once, as of unknown outcome, and requests queued
// behind it are refused when the job is cancelled: none waits out its
// timeout for an answer that never comes.
func TestLeaderAnswersASavepointTheJobMovedPast(t *testing.T) {
	pendingSavepoint := func(h *leaderHarness) chan savepointReply {
		h.t.Helper()
		h.completeCheckpoint("j1")
		reply := h.requestSavepoint("j1", false)
		h.checkpointPass()
		if p := h.job("j1").Pending; p == nil || !p.Savepoint {
			h.t.Fatalf("pending %+v, want a savepoint", p)
		}
		return reply
	}
	answered := func(t *testing.T, reply chan savepointReply, want error, what string) {
		t.Helper()
		select {
		case rep := <-reply:
			if !errors.Is(rep.err, want) {
				t.Fatalf("%s: answered %v, want %v", what, rep.err, want)
			}
		default:
			t.Fatalf("%s: not answered", what)
		}
	}
	t.Run("restarted", func(t *testing.T) {
		h := newLeaderHarness(t)
		job := h.startJob("j1", testJobSpec(1, 2))
		reply := pendingSavepoint(h)
		h.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: "j1", Attempt: job.Attempt + 1, Tasks: job.Tasks,
			Reason: "another term's restart", Time: h.clock.UnixNano(), ChannelToken: "t"})
		h.flush()
		answered(t, reply, errSavepointUnknown, "the pending savepoint of a restarted job")
	})
	t.Run("cancelled before its trigger committed", func(t *testing.T) {
		h := newLeaderHarness(t)
		h.startJob("j1", testJobSpec(1, 2))
		h.completeCheckpoint("j1")
		// The loop takes the request and submits the trigger, whose
		// write reaches the FSM only after the cancel.
		h.applyLater = true
		req := savepointRequest{jobID: "j1", reply: make(chan savepointReply, 1)}
		h.l.handle(req)
		h.l.settle()
		if len(h.results) == 0 {
			t.Fatal("no trigger submitted for the savepoint")
		}
		h.applyLater = false
		h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
		h.flush()
		reply := req.reply
		answered(t, reply, errSavepointState, "a savepoint whose trigger the FSM refused: the job was cancelled")
	})
	t.Run("cancelled", func(t *testing.T) {
		h := newLeaderHarness(t)
		h.startJob("j1", testJobSpec(1, 2))
		reply := pendingSavepoint(h)
		queued := h.requestSavepoint("j1", true)
		h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
		h.flush()
		answered(t, reply, errSavepointUnknown, "the pending savepoint of a cancelled job")
		answered(t, queued, errSavepointState, "a savepoint queued behind it")
	})
}

// TestLeaderLeavesAStopWhoseAbortDidNotCommit: a stop-with-savepoint that
// times out while its abort cannot commit (leadership lost, say) is
// answered as of unknown outcome, not as aborted: its completion may yet
// commit behind a leader change. The job is restarted only once an abort
// has committed (here the loop's next one; after a leader change, the
// successor's: stopAborted), so its stopped sources do not wait for ever.
func TestLeaderLeavesAStopWhoseAbortDidNotCommit(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 2))
	h.completeCheckpoint("j1")
	reply := h.requestSavepoint("j1", true)
	h.checkpointPass()
	p := h.job("j1").Pending
	if p == nil || !p.Stop {
		t.Fatalf("pending %+v, want a stop-with-savepoint", p)
	}
	failed := 0
	h.failWrite = func(ct fsm.CommandType) error {
		if ct == fsm.CommandCheckpointAborted && failed == 0 {
			failed++
			return raft.ErrLeadershipLost
		}
		return nil
	}
	h.advance(10*time.Second + time.Millisecond)
	h.checkpointPass()
	select {
	case rep := <-reply:
		if !errors.Is(rep.err, errSavepointUnknown) {
			t.Fatalf("stop whose abort did not commit: answered %v, want outcome unknown", rep.err)
		}
	default:
		t.Fatal("stop whose abort did not commit: not answered")
	}
	if failed != 1 {
		t.Fatalf("%d aborts failed, want 1", failed)
	}
	h.reconcile()
	j := h.job("j1")
	if j.Pending != nil || (j.Status != fsm.JobRestarting && j.Attempt < 2) {
		t.Fatalf("job %s attempt %d, pending %+v: want the stop aborted and the job restarted", j.Status, j.Attempt, j.Pending)
	}
	if len(j.Aborted) == 0 || j.Aborted[len(j.Aborted)-1].ID != p.ID {
		t.Fatalf("aborted %+v, want the stop %d aborted before the restart", j.Aborted, p.ID)
	}
}

// TestLeaderChecksPointsRightAfterASavepoint: with an exactly-once sink, a
// savepoint that does not stop the job is followed at once by a checkpoint,
// before a savepoint asked for meanwhile, since only a checkpoint commits
// the savepoint's sink transactions (they age towards the broker's
// transaction timeout, and hold one of the map tasks' transactional ids
// until then); that checkpoint's completion is told to the map tasks.
// Without such a sink the queued savepoint goes first, as it always did.
func TestLeaderChecksPointsRightAfterASavepoint(t *testing.T) {
	for _, sink := range []bool{true, false} {
		t.Run(fmt.Sprintf("exactly-once sink %v", sink), func(t *testing.T) {
			h := newLeaderHarness(t)
			spec := testJobSpec(1, 2)
			spec.Sink = nil
			if sink {
				spec.Sink = &fsm.SinkSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "out", Delivery: fsm.DeliveryExactlyOnce,
					TransactionTimeout: fsm.DefaultTransactionTimeout(spec.Checkpoint)}
			}
			h.startJob("j1", spec)
			h.completeCheckpoint("j1")
			sp := h.triggerSavepoint("j1", false)
			queued := h.requestSavepoint("j1", false)
			h.ackAll("j1", sp.ID)
			h.drain("w1")
			h.drain("w2")
			h.checkpointPass() // no time passes
			next := h.job("j1").Pending
			if !sink {
				if next == nil || !next.Savepoint {
					t.Fatalf("pending %+v right after the savepoint, want the queued savepoint, as before sinks waited for checkpoints", next)
				}
				return
			}
			if next == nil || next.Savepoint {
				t.Fatalf("pending %+v right after the savepoint, want a checkpoint before the queued savepoint", next)
			}
			h.ackAll("j1", next.ID)
			toMaps := 0
			for _, m := range append(h.drain("w1"), h.drain("w2")...) {
				if c := m.GetComplete(); c != nil && c.GetCheckpointId() == next.ID && strings.HasPrefix(c.GetTask().GetTaskId(), "map-") {
					toMaps++
				}
			}
			if toMaps != 2 {
				t.Fatalf("checkpoint %d's completion told to %d map tasks, want 2: it commits the savepoint's transactions", next.ID, toMaps)
			}
			h.checkpointPass()
			if p := h.job("j1").Pending; p == nil || !p.Savepoint {
				t.Fatalf("pending %+v after the checkpoint, want the queued savepoint", p)
			}
			select {
			case rep := <-queued:
				t.Fatalf("queued savepoint answered before it was taken: %+v", rep)
			default:
			}
		})
	}
}

// TestNewLeaderChecksPointsRightAfterASavepoint: a leader that takes over
// right after a savepoint that did not stop its job (the newest entry of
// the job's history), of a job with an exactly-once sink, takes a
// checkpoint as soon as the workers are back, without waiting out the
// interval: the savepoint's sink transactions are committed only with the
// next checkpoint, and age towards the broker's timeout until then.
func TestNewLeaderChecksPointsRightAfterASavepoint(t *testing.T) {
	h := newLeaderHarness(t)
	spec := testJobSpec(1, 2)
	spec.Checkpoint.Interval = fsm.Duration(5 * time.Minute) // only the savepoint's follow-up can be due
	spec.Sink = &fsm.SinkSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "out", Delivery: fsm.DeliveryExactlyOnce,
		TransactionTimeout: fsm.DefaultTransactionTimeout(spec.Checkpoint)}
	job := h.startJob("j1", spec)
	h.completeCheckpoint("j1")
	sp := h.triggerSavepoint("j1", false)
	h.ackAll("j1", sp.ID)
	if _, ok := h.f.Savepoint(fsm.SavepointID("j1", sp.ID)); !ok {
		t.Fatalf("savepoint %d not completed", sp.ID)
	}

	h.newTerm()
	h.connect("w1", 4, runningOn(job, "w1")...)
	h.connect("w2", 4, runningOn(job, "w2")...)
	h.pastGrace()
	h.step()
	next := h.job("j1").Pending
	if next == nil || next.Savepoint || next.ID <= sp.ID {
		t.Fatalf("pending %+v under the new leader, want a checkpoint after savepoint %d at once", next, sp.ID)
	}
	h.ackAll("j1", next.ID)
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != next.ID {
		t.Fatalf("checkpoint %d not completed: last %+v", next.ID, last)
	}
}
