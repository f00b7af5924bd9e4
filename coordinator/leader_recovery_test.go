package coordinator

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// A lost worker's tasks are restored alone: partial deploys of just those
// tasks on live workers, from the newest completed checkpoint, a retarget
// for the workers of the others, which are not cancelled and whose acks
// (in their own, older attempt) complete the next checkpoint with the
// restored tasks'.
func TestLeaderRecoversLostTasksAlone(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.jobOnThreeWorkers("j1", testJobSpec(2, 2))
	ck := h.completeCheckpoint("j1")
	h.advance(time.Duration(h.job("j1").Spec.Checkpoint.Interval))
	h.checkpointPass()
	if h.job("j1").Pending == nil {
		t.Fatal("no checkpoint pending before the worker is lost")
	}
	lost := job.Tasks[0].Worker
	var lostTasks []string
	for _, task := range job.Tasks {
		if task.Worker == lost {
			lostTasks = append(lostTasks, task.ID)
		}
	}

	h.lose(lost, 4)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRunning || j.Attempt != 2 || j.Pending != nil {
		t.Fatalf("status %s attempt %d pending %v reason %q, want running attempt 2 with the pending checkpoint aborted", j.Status, j.Attempt, j.Pending, j.Reason)
	}
	for _, task := range j.Tasks {
		want := uint64(1)
		if task.Worker == lost {
			t.Fatalf("task %s left on the dead worker", task.ID)
		}
		if slices.Contains(lostTasks, task.ID) {
			want = 2
		}
		if task.Attempt != want {
			t.Fatalf("task %s in attempt %d, want %d", task.ID, task.Attempt, want)
		}
	}
	var deployed []string
	retargets := 0
	for _, w := range []string{"w1", "w2", "w3"} {
		msgs := h.drain(w)
		if len(cancels(msgs)) > 0 {
			t.Errorf("worker %s got cancels %v: surviving tasks must run on", w, cancels(msgs))
		}
		for id, d := range deploys(msgs) {
			deployed = append(deployed, id)
			if !d.GetPartial() || d.GetTask().GetAttempt() != 2 || d.GetRestoreCheckpointId() != ck {
				t.Errorf("deploy %s: partial %v attempt %d restore %d, want partial, attempt 2, checkpoint %d",
					id, d.GetPartial(), d.GetTask().GetAttempt(), d.GetRestoreCheckpointId(), ck)
			}
			for _, m := range d.GetMapTasks() {
				if want := j.TaskAttempt(taskByID(j, m.GetTaskId())); m.GetAttempt() != want {
					t.Errorf("deploy %s names map task %s in attempt %d, want %d", id, m.GetTaskId(), m.GetAttempt(), want)
				}
			}
		}
		for _, m := range msgs {
			if r := m.GetRetarget(); r != nil {
				retargets++
				if w == lost || r.GetAttempt() != 2 || r.GetRestoreCheckpointId() != ck || len(r.GetRestoreOffsets()) == 0 ||
					strings.Join(r.GetRestored(), ",") != strings.Join(lostTasks, ",") {
					t.Errorf("retarget to %s: %v", w, r)
				}
			}
		}
	}
	if !slices.Equal(slices.Sorted(slices.Values(deployed)), slices.Sorted(slices.Values(lostTasks))) {
		t.Fatalf("deployed %v, want only the lost tasks %v", deployed, lostTasks)
	}
	if retargets == 0 {
		t.Fatal("no retarget sent to the workers of the surviving tasks")
	}

	// The restored tasks come up; the next checkpoint covers every task.
	h.runAll("j1")
	next := h.completeCheckpoint("j1")
	j = h.job("j1")
	rec := j.Recoveries[len(j.Recoveries)-1]
	if rec.Scope != fsm.RecoveryScopeTasks || rec.CheckpointID != next || rec.RestoredFrom != ck ||
		!strings.Contains(rec.Reason, "worker "+lost) {
		t.Fatalf("recovery record %+v, want scope tasks restored from %d, checkpointed at %d", rec, ck, next)
	}
	var m dto.Metric
	if err := h.l.metrics.recoveries.WithLabelValues("j1", fsm.RecoveryScopeTasks).Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
		t.Fatalf("task-scoped recoveries metric = %v (%v), want 1", m.GetCounter().GetValue(), err)
	}

	// The lost worker comes back as a zombie, with a new session: its old
	// tasks' acks and statuses are fenced and its tasks cancelled.
	h.connect(lost, 4)
	h.advance(time.Duration(j.Spec.Checkpoint.Interval))
	h.checkpointPass()
	p := h.job("j1").Pending
	if p == nil {
		t.Fatal("no checkpoint pending after the recovery")
	}
	old := taskByID(job, lostTasks[0])
	h.ack(lost, ref(job, old), old, p.ID)
	h.report(lost, ref(job, old), transport.TaskPhase_TASK_PHASE_RUNNING, "")
	if got := cancels(h.drain(lost)); len(got) != 1 || got[0].GetAttempt() != 1 || got[0].GetTaskId() != old.ID {
		t.Fatalf("cancels sent to %s: %v, want attempt 1's %s", lost, got, old.ID)
	}
	if acks := h.l.jobs["j1"].ckpt.pending.acks; len(acks) != 0 {
		t.Fatalf("a zombie's ack was recorded: %v", acks)
	}
}

// A task-scoped recovery that cannot keep exactly once falls back to a
// job-scoped restart and says why.
func TestLeaderTaskRecoveryFallsBack(t *testing.T) {
	t.Run("no completed checkpoint", func(t *testing.T) {
		h := newLeaderHarness(t)
		h.connect("w3", 4)
		job := h.startJob("j1", testJobSpec(2, 2))
		h.lose(job.Tasks[0].Worker, 4)
		h.step()
		j := h.job("j1")
		if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "not recovered task by task: the job has no completed checkpoint") {
			t.Fatalf("status %s reason %q, want a restart saying there is no checkpoint", j.Status, j.Reason)
		}
	})
	t.Run("no free slots", func(t *testing.T) {
		h := newLeaderHarness(t)
		job := h.startJob("j1", testJobSpec(3, 3))
		h.completeCheckpoint("j1")
		h.lose(job.Tasks[0].Worker, 4)
		h.step()
		j := h.job("j1")
		if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "lost tasks cannot be placed") {
			t.Fatalf("status %s reason %q, want a restart saying the tasks cannot be placed", j.Status, j.Reason)
		}
	})
	// A restored source must read the partitions the lost one may have
	// discovered, which the surviving map tasks applied: without discovery
	// (a coordinator below its level, or one not seen in gossip) they would
	// be read again, from the earliest, once discovery is back.
	t.Run("discovery cannot be on", func(t *testing.T) {
		h := newLeaderHarness(t)
		h.connect("w3", 4)
		job := h.startJob("j1", testJobSpec(2, 2))
		h.completeCheckpoint("j1")
		h.l.env.coordinatorsBelow = func(int) ([]string, error) { return []string{"c3 (not seen in gossip)"}, nil }
		h.lose(taskByID(job, "source-0").Worker, 4)
		h.step()
		j := h.job("j1")
		if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "partition discovery cannot be on in a restored source (coordinators below feature level 1: c3 (not seen in gossip))") {
			t.Fatalf("status %s reason %q, want a job restart saying discovery cannot be on", j.Status, j.Reason)
		}
	})
	t.Run("a task failed by itself", func(t *testing.T) {
		h := newLeaderHarness(t)
		h.connect("w3", 4)
		job := h.startJob("j1", testJobSpec(1, 1))
		h.completeCheckpoint("j1")
		m := job.Tasks[1]
		h.report(m.Worker, ref(job, m), transport.TaskPhase_TASK_PHASE_FAILED, "operator panicked")
		h.step()
		if j := h.job("j1"); j.Status != fsm.JobRestarting || strings.Contains(j.Reason, "task by task") {
			t.Fatalf("status %s reason %q, want a plain job restart", j.Status, j.Reason)
		}
	})
}

func taskByID(job fsm.Job, id string) fsm.Task {
	for _, t := range job.Tasks {
		if t.ID == id {
			return t
		}
	}
	return fsm.Task{}
}

// While a worker of a job has no session, the leader triggers none of the
// job's checkpoints: the worker cannot ack, and the tasks that talk to it
// would decline each one, every abort counting toward tolerable_failures
// before the worker's loss is even decided. Its next session resumes them.
func TestLeaderHoldsCheckpointsWhileAWorkerHasNoSession(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	h.completeCheckpoint("j1")
	w := job.Tasks[1].Worker
	sess := h.sessions[w]
	sess.close(errors.New("connection reset"))
	h.handle(sessionClosed{sess: sess, err: errors.New("connection reset")})
	// Intervals pass, all within the lease (after it the worker's tasks
	// would be recovered elsewhere).
	step := time.Duration(job.Spec.Checkpoint.Interval) / 2
	for waited := step; waited < h.l.lease; waited += step {
		h.advance(step)
		h.checkpointPass()
		if p := h.job("j1").Pending; p != nil {
			t.Fatalf("checkpoint %d triggered %v after %s lost its session", p.ID, waited, w)
		}
	}
	var running []*transport.TaskStatus
	for _, task := range job.Tasks {
		if task.Worker == w {
			running = append(running, &transport.TaskStatus{Task: ref(job, task), Kind: protoKind(task.Kind), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
		}
	}
	h.connect(w, 4, running...)
	h.step()
	h.advance(time.Duration(job.Spec.Checkpoint.Interval))
	h.checkpointPass()
	if h.job("j1").Pending == nil {
		j := h.job("j1")
		t.Fatalf("no checkpoint triggered once %s has a session again: job %s attempt %d %q, tasks %+v", w, j.Status, j.Attempt, j.Reason, j.Tasks)
	}
}

// The jobs of a lost worker recover in one pass, each placing its lost tasks
// before the others' commands are applied: each reserves the slots it takes,
// so that no worker ends up with more tasks than slots.
func TestLeaderRecoveriesTogetherStayWithinSlots(t *testing.T) {
	h := newLeaderHarness(t)
	slots := map[string]int{"w1": 4, "w2": 3, "w3": 1}
	for _, w := range []string{"w1", "w2", "w3"} {
		h.connect(w, slots[w])
	}
	// Slot sharing: j1 and j3 run on w1, j2 on w2; one slot each is left
	// on w2 and w3.
	ids := []string{"j1", "j2", "j3"}
	for _, id := range ids {
		h.startJob(id, testJobSpec(1, 1))
		h.drain("w3")
		h.completeCheckpoint(id)
	}
	h.lose("w1", slots["w1"])
	h.step()
	h.flush()
	used := make(map[string]int)
	for _, id := range ids {
		j := h.job(id)
		if j.Status != fsm.JobRunning {
			continue // waits for slots, as it should when there are none
		}
		for _, task := range j.Tasks {
			if task.Worker == "w1" {
				t.Fatalf("job %s attempt %d still places %s on the dead w1", id, j.Attempt, task.ID)
			}
			used[task.Worker]++
		}
	}
	for w, n := range used {
		if n > slots[w] {
			t.Fatalf("%d tasks placed on %s of %d slots (%v)", n, w, slots[w], used)
		}
	}
	if used["w2"] != 3 || used["w3"] != 1 {
		t.Fatalf("tasks per worker %v, want the lost job that fits on the free slots of w2 and w3", used)
	}
}

// TestLeaderCancelsALostWorkersTasksWhileTheirRecoveryCommits: a worker the
// leader counts lost comes back while the task-scoped recovery that places
// its tasks elsewhere commits, reporting them running. It is told to stop
// them: adopted, they would run on untracked once the recovery is in.
func TestLeaderCancelsALostWorkersTasksWhileTheirRecoveryCommits(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.jobOnThreeWorkers("j1", testJobSpec(2, 2))
	lost := job.Tasks[0].Worker
	running := runningOn(job, lost)

	h.holdWrites()
	h.setMember(lost, StatusDead, 4)
	h.l.handle(sessionClosed{sess: h.sessions[lost], err: errors.New("no message from the worker within the silence limit")})
	h.l.settle()
	h.advance(h.l.lease + time.Millisecond) // it may be frozen: its lease first
	h.l.settle()                            // the recovery's write waits
	if !h.l.busy("j1") || h.job("j1").Attempt != 1 {
		t.Fatalf("busy %v attempt %d: want the task-scoped recovery in flight", h.l.busy("j1"), h.job("j1").Attempt)
	}

	h.setMember(lost, StatusAlive, 4)
	h.connect(lost, 4, running...) // plays the loop on: the recovery commits
	if j := h.job("j1"); j.Attempt != 2 || j.Status != fsm.JobRunning {
		t.Fatalf("attempt %d status %s: want the task-scoped recovery committed", j.Attempt, j.Status)
	}
	got := cancels(h.drain(lost))
	for _, st := range running {
		if !slices.ContainsFunc(got, func(r *transport.TaskRef) bool { return sameTask(r, st.GetTask()) }) {
			t.Errorf("task %s, restored elsewhere, reported running by its old worker: not cancelled; cancels %v", st.GetTask().GetTaskId(), got)
		}
	}
}

// TestLeaderRecoversNoTaskFromACheckpointTheRestartFellBackPast: a restart
// that fell back past the newest checkpoint (a map task found it bad)
// leaves tasks whose state descends from an older one. A new leader, which
// does not know the newest was bad, must not restore a lost task from it:
// its offsets and the running tasks' state do not meet, and the records
// between them would be lost. It restarts the whole job instead.
func TestLeaderRecoversNoTaskFromACheckpointTheRestartFellBackPast(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w3", 4)
	job := h.startJob("j1", testJobSpec(2, 2))
	h.drain("w3")
	older := h.completeCheckpoint("j1")
	newest := h.completeCheckpoint("j1")
	// The predecessor's restart from the older checkpoint, the newest
	// having failed a map task's verification.
	h.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: "j1", Attempt: 2, Tasks: job.Tasks, RestoreFrom: older,
		Reason: fmt.Sprintf("checkpoint %d failed verification", newest), Time: h.clock.UnixNano(), ChannelToken: "t"})

	h.newTerm()
	job = h.job("j1")
	for _, w := range []string{"w1", "w2", "w3"} {
		h.connect(w, 4, runningOn(job, w)...)
	}
	h.pastGrace()
	h.step()
	h.lose(job.Tasks[0].Worker, 4)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, fmt.Sprintf("the newest checkpoint %d is not one the running tasks took or restored", newest)) {
		t.Fatalf("job %s at attempt %d (%q): want a whole-job restart, saying why no task-scoped recovery", j.Status, j.Attempt, j.Reason)
	}
}

// TestLeaderRecoversNoTaskBesideOneNotUpYet: a worker lost while a task on
// a live worker has not come up (still deploying) does not make that task a
// survivor of a task-scoped recovery, which would give it the new attempt's
// deploy timeout anew: losses every so often would keep it from ever timing
// out. The job restarts whole, saying why.
func TestLeaderRecoversNoTaskBesideOneNotUpYet(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.jobOnThreeWorkers("j1", testJobSpec(2, 2))
	lost := job.Tasks[0].Worker
	i := slices.IndexFunc(job.Tasks, func(t fsm.Task) bool { return t.Worker != lost })
	stuck := job.Tasks[i]
	h.report(stuck.Worker, ref(job, stuck), transport.TaskPhase_TASK_PHASE_DEPLOYING, "")
	h.lose(lost, 4)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || j.Attempt != 1 || !strings.Contains(j.Reason, "task "+stuck.ID+" on worker "+stuck.Worker+" is not running yet") {
		t.Fatalf("job %s at attempt %d (%q): want a whole-job restart, task %s not being up", j.Status, j.Attempt, j.Reason, stuck.ID)
	}
}

// TestLeaderRetargetsASurvivorWhoseSessionWasDown: a worker of surviving
// tasks without a session when the task-scoped recovery was committed gets
// the retarget when its session opens again: without it, its sources would
// go on sending to the lost worker until they fail, and the job would
// restart whole.
func TestLeaderRetargetsASurvivorWhoseSessionWasDown(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w3", 4)
	job := h.startJob("j1", testJobSpec(2, 2))
	h.drain("w3")
	ck := h.completeCheckpoint("j1")
	lost := job.Tasks[0].Worker
	i := slices.IndexFunc(job.Tasks, func(t fsm.Task) bool { return t.Worker != lost })
	survivor := job.Tasks[i].Worker
	running := runningOn(job, survivor)

	h.lose(lost, 4)
	h.sessions[survivor].close(errors.New("network blip"))
	h.handle(sessionClosed{sess: h.sessions[survivor], err: errors.New("network blip")})
	h.step()
	j := h.job("j1")
	if j.Attempt != 2 || j.Status != fsm.JobRunning {
		t.Fatalf("job %s at attempt %d (%q): want the task-scoped recovery committed", j.Status, j.Attempt, j.Reason)
	}
	h.connect(survivor, 4, running...)
	var got *transport.RetargetTasks
	for _, m := range h.drain(survivor) {
		if r := m.GetRetarget(); r != nil {
			got = r
		}
	}
	if got == nil || got.GetAttempt() != 2 || got.GetRestoreCheckpointId() != ck || len(got.GetRestored()) == 0 || len(got.GetMapTasks()) != 2 {
		t.Fatalf("retarget on reconnect: %v; want attempt 2's, restoring checkpoint %d", got, ck)
	}
	for _, m := range got.GetMapTasks() {
		if want := j.TaskAttempt(taskByID(j, m.GetTaskId())); m.GetAttempt() != want || m.GetWorkerId() == lost {
			t.Errorf("retarget names map task %s on %s in attempt %d, want attempt %d off the lost worker", m.GetTaskId(), m.GetWorkerId(), m.GetAttempt(), want)
		}
	}
}

// TestLeaderRecoversTasksAloneThoughTheLossAbortedACheckpoint: a worker's
// crash during a checkpoint is seen from the other side too: a map task
// whose input from a source there closes declines the checkpoint, which
// counts. With tolerable_failures 0 that abort alone would restart the
// whole job; while a worker of the job has no session, its fate decides
// instead, and its tasks are recovered alone.
func TestLeaderRecoversTasksAloneThoughTheLossAbortedACheckpoint(t *testing.T) {
	h := newLeaderHarness(t)
	_, lost := h.declineWhileAWorkerIsAway("input from source 0 closed")
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 || j.ConsecutiveAborts != 1 {
		t.Fatalf("job %s at attempt %d with %d aborts (%q): want it running on, the abort counted", j.Status, j.Attempt, j.ConsecutiveAborts, j.Reason)
	}
	h.lose(lost, 4)
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 2 || len(j.Recoveries) == 0 || j.Recoveries[len(j.Recoveries)-1].Scope != fsm.RecoveryScopeTasks {
		t.Fatalf("job %s at attempt %d (%q): want the lost tasks recovered alone", j.Status, j.Attempt, j.Reason)
	}
}

// jobOnThreeWorkers starts job id with spec on workers w1, w2 and w3 (4
// slots each) and completes a checkpoint of it: a lost worker's tasks can
// then be restored alone on the others.
func (h *leaderHarness) jobOnThreeWorkers(id string, spec fsm.JobSpec) fsm.Job {
	h.t.Helper()
	h.connect("w3", 4)
	job := h.startJob(id, spec)
	h.drain("w3")
	h.completeCheckpoint(id)
	return job
}

// TestLeaderTriggersNoCheckpointWhileARestoredSourceCatchesUp: after a
// task-scoped recovery, a restored source that reports RUNNING while it
// catches up (TaskStatus.catching_up) holds back the job's checkpoints: the
// surviving sources' barriers would hold the map tasks' inputs from them for
// the whole catch-up. Once it reports it has caught up, checkpoints go on;
// a worker that reconnects while its source catches up says so again; and
// a catch-up that goes on past catchUpHoldLimit holds them no longer.
func TestLeaderTriggersNoCheckpointWhileARestoredSourceCatchesUp(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.jobOnThreeWorkers("j1", testJobSpec(2, 2))
	var lost string
	for _, task := range job.Tasks {
		if task.Kind == fsm.TaskSource {
			lost = task.Worker
			break
		}
	}
	h.lose(lost, 4)
	h.step()
	j := h.job("j1")
	if j.Attempt != 2 || j.Recoveries[len(j.Recoveries)-1].Scope != fsm.RecoveryScopeTasks {
		t.Fatalf("attempt %d, recoveries %+v: want a task-scoped recovery", j.Attempt, j.Recoveries)
	}
	var restored fsm.Task
	for _, task := range j.Tasks {
		if task.Kind == fsm.TaskSource && task.Attempt == 2 {
			restored = task
		}
	}
	if restored.ID == "" {
		t.Fatalf("no source restored in attempt 2: %+v", j.Tasks)
	}
	catchingUp := func(on bool) {
		h.handle(workerMessage{sess: h.sessions[restored.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{
			Status: &transport.TaskStatus{Task: ref(j, restored), Phase: transport.TaskPhase_TASK_PHASE_RUNNING, CatchingUp: on},
		}}})
	}
	for _, task := range j.Tasks {
		if task.ID != restored.ID {
			h.report(task.Worker, ref(j, task), transport.TaskPhase_TASK_PHASE_RUNNING, "")
		}
	}
	catchingUp(true)
	h.advance(3 * time.Duration(j.Spec.Checkpoint.Interval))
	h.checkpointPass()
	if p := h.job("j1").Pending; p != nil {
		t.Fatalf("checkpoint %d triggered while the restored source catches up", p.ID)
	}

	// A new leader hears it from the worker's session.
	h.newTerm()
	for _, w := range []string{"w1", "w2", "w3"} {
		if w == lost {
			continue
		}
		statuses := runningOn(j, w)
		for _, st := range statuses {
			st.CatchingUp = st.GetTask().GetTaskId() == restored.ID
		}
		h.connect(w, 4, statuses...)
	}
	h.pastGrace()
	h.step()
	h.advance(3 * time.Duration(j.Spec.Checkpoint.Interval))
	h.checkpointPass()
	if p := h.job("j1").Pending; p != nil {
		t.Fatalf("checkpoint %d triggered by the new leader while the restored source catches up", p.ID)
	}

	// Not for ever: a catch-up that does not end must not stop the job's
	// checkpoints. Past the bound they are triggered again (and wait for
	// the source, as before the wait existed).
	h.advance(catchUpHoldLimit(j.Spec.Checkpoint))
	h.checkpointPass()
	// The new term's first checkpoint comes within an interval (jittered).
	h.advance(time.Duration(j.Spec.Checkpoint.Interval))
	h.checkpointPass()
	p := h.job("j1").Pending
	if p == nil {
		t.Fatalf("no checkpoint triggered %v into the catch-up", catchUpHoldLimit(j.Spec.Checkpoint))
	}
	h.ackAll("j1", p.ID)

	catchingUp(false)
	h.advance(time.Duration(j.Spec.Checkpoint.Interval))
	h.checkpointPass()
	p = h.job("j1").Pending
	if p == nil {
		t.Fatal("no checkpoint triggered once the restored source caught up")
	}
	h.ackAll("j1", p.ID)
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != p.ID {
		t.Fatalf("checkpoint %d not completed after the catch-up", p.ID)
	}
}

// runningOn is what worker reports of job's tasks placed on it: each
// running.
func runningOn(job fsm.Job, worker string) []*transport.TaskStatus {
	var out []*transport.TaskStatus
	for _, task := range job.Tasks {
		if task.Worker == worker {
			out = append(out, &transport.TaskStatus{Task: ref(job, task), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
		}
	}
	return out
}

// TestLeaderRestartsForAbortsHeldWhileAWorkerWasAway: aborts past
// tolerable_failures while a worker of the job had no session restart the
// job once that worker is back, when it was not lost after all.
func TestLeaderRestartsForAbortsHeldWhileAWorkerWasAway(t *testing.T) {
	h := newLeaderHarness(t)
	job, away := h.declineWhileAWorkerIsAway("snapshot failed")
	if j := h.job("j1"); j.Status != fsm.JobRunning {
		t.Fatalf("job %s (%q) while worker %s has no session: want the restart held", j.Status, j.Reason, away)
	}
	h.connect(away, 4, runningOn(job, away)...)
	if j := h.job("j1"); j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "1 consecutive checkpoint aborts exceed tolerable_failures 0") {
		t.Fatalf("job %s (%q) once worker %s is back: want the held restart", j.Status, j.Reason, away)
	}
}

// declineWhileAWorkerIsAway sets up what a lost worker's abort looks like
// from the leader: job j1 (tolerable_failures 0) on three workers, its next
// checkpoint pending, the session of its first task's worker closed, and a
// map task on another worker declining the checkpoint for reason. It
// returns the job and the worker without a session.
func (h *leaderHarness) declineWhileAWorkerIsAway(reason string) (fsm.Job, string) {
	h.t.Helper()
	spec := testJobSpec(2, 2)
	spec.Checkpoint.TolerableFailures = 0
	job := h.jobOnThreeWorkers("j1", spec)
	p := h.nextCheckpoint("j1")
	away := job.Tasks[0].Worker
	m := mapTaskOff(h.t, job, away)
	h.handle(sessionClosed{sess: h.sessions[away], err: errors.New("connection reset")})
	h.decline(job, m, p.ID, reason)
	return job, away
}

// mapTaskOff returns a map task of job placed off worker.
func mapTaskOff(t testing.TB, job fsm.Job, worker string) fsm.Task {
	t.Helper()
	i := slices.IndexFunc(job.Tasks, func(t fsm.Task) bool { return t.Kind == fsm.TaskMap && t.Worker != worker })
	if i < 0 {
		t.Fatalf("tasks %v: want a map task off worker %s", job.Tasks, worker)
	}
	return job.Tasks[i]
}
