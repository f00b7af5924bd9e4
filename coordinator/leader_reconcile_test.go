package coordinator

import (
	"context"
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

func TestLeaderWaitsForSlotsThenDeploys(t *testing.T) {
	h := newLeaderHarness(t)
	h.register("j1", testJobSpec(2, 2))
	h.connect("w1", 2)
	h.step()
	if j := h.job("j1"); j.Attempt != 0 || j.Reason != "" {
		t.Fatalf("deployed or judged during the grace period: %+v", j)
	}
	h.pastGrace()
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobPending || j.Reason != "waiting for 4 free slots (2 free)" {
		t.Fatalf("status %s reason %q, want pending waiting for slots", j.Status, j.Reason)
	}
	// A worker that is alive in gossip but has no session does not count.
	h.setMember("w2", StatusAlive, 2)
	h.step()
	if j := h.job("j1"); j.Attempt != 0 {
		t.Fatalf("deployed on a worker without a session")
	}
	h.connect("w2", 2)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRunning || j.Attempt != 1 || j.Reason != "first deployment" {
		t.Fatalf("not deployed once slots freed: status %s attempt %d reason %q", j.Status, j.Attempt, j.Reason)
	}
	d1, d2 := deploys(h.drain("w1")), deploys(h.drain("w2"))
	if len(d1) != 2 || len(d2) != 2 {
		t.Fatalf("deploys: w1 %d, w2 %d; want 2 each", len(d1), len(d2))
	}
	for id, d := range d1 {
		if d.GetTask().GetAttempt() != 1 || d.GetRestoreCheckpointId() != 0 || d.GetOperator() != "wordcount" {
			t.Errorf("deploy %s = %v", id, d)
		}
	}
}

func TestLeaderMissingTopicFailsJobAndRecovers(t *testing.T) {
	h := newLeaderHarness(t)
	h.setPartitions(0, errors.New(`source topic "words" does not exist on 127.0.0.1:9092`))
	h.register("j1", testJobSpec(1, 1)) // restart initial 1s, max 8s
	h.connect("w1", 4)
	h.pastGrace()
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobFailing || j.Reason != `source topic "words" does not exist on 127.0.0.1:9092` {
		t.Fatalf("status %s reason %q, want failing with the lookup error", j.Status, j.Reason)
	}
	retry := h.l.jobs["j1"].retryAt
	if got := retry.Sub(h.clock); got != time.Second {
		t.Fatalf("first retry in %v, want 1s", got)
	}
	h.advance(999 * time.Millisecond)
	h.step()
	if h.l.jobs["j1"].retryAt != retry {
		t.Fatalf("retried before the backoff elapsed")
	}
	h.advance(time.Millisecond)
	h.step()
	if got := h.l.jobs["j1"].retryAt.Sub(h.clock); got != 2*time.Second {
		t.Fatalf("second retry in %v, want 2s", got)
	}
	h.setPartitions(3, nil) // the topic appears
	h.advance(2 * time.Second)
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("job did not recover: status %s attempt %d reason %q", j.Status, j.Attempt, j.Reason)
	}
}

// TestLeaderOverrulesGossipDeathWhileTheSessionHears: gossip calling a
// worker dead while its control session is live does not fail its tasks
// (memberlist's probes can miss a live worker on a saturated machine; the
// session ends once the worker goes silent). The verdict is counted and
// logged once; the session's end, as soon as its watchdog ends it (before
// the handler's close reaches the loop), has the job looked at, and the
// tasks fail once the lease has run out from the close: a worker gossip
// calls dead may be frozen, and run its tasks until then.
func TestLeaderOverrulesGossipDeathWhileTheSessionHears(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w3", 4)
	spec := testJobSpec(2, 2)
	spec.Recovery.Scope = fsm.RecoveryScopeJob
	job := h.startJob("j1", spec)
	h.completeCheckpoint("j1")
	w := job.Tasks[0].Worker

	h.setMember(w, StatusDead, 4)
	h.l.workerChanged(w)
	for range 3 {
		h.step()
		if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
			t.Fatalf("status %s attempt %d reason %q, want attempt 1 running on: %s's session is open", j.Status, j.Attempt, j.Reason, w)
		}
	}
	var m dto.Metric
	if err := h.l.metrics.deadOverruled.Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
		t.Fatalf("overruled gossip deaths = %v (%v), want 1: counted once until gossip or the session changes", m.GetCounter().GetValue(), err)
	}

	if _, ok := h.l.dirty["j1"]; ok {
		t.Fatal("j1 is to be looked at before the session ends")
	}
	h.sessions[w].close(errSilent) // the watchdog's end; sessionClosed is not in yet
	h.l.takeNotes()
	if _, ok := h.l.dirty["j1"]; !ok {
		t.Fatalf("the session's end did not have j1, a job of %s, looked at", w)
	}
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("right after the session ended: status %s reason %q, want attempt 1 running on until %s's lease has run out: it may be frozen", j.Status, j.Reason, w)
	}
	h.handle(sessionClosed{sess: h.sessions[w], err: errSilent})
	h.advance(h.l.lease + time.Millisecond)
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "worker "+w+" of task source-0 is dead, and has had no control session for") {
		t.Fatalf("after the session ended and the lease ran out: status %s reason %q, want restarting because %s is dead", j.Status, j.Reason, w)
	}
}

func TestLeaderRestartsOnDeadWorkerFromLastCheckpoint(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w3", 4)
	spec := testJobSpec(2, 2)
	spec.Recovery.Scope = fsm.RecoveryScopeJob
	job := h.startJob("j1", spec)
	h.drain("w3")
	ck := h.completeCheckpoint("j1")
	lost := job.Tasks[0].Worker

	h.lose(lost, 4)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || j.Attempt != 1 || !strings.Contains(j.Reason, "worker "+lost+" of task source-0 is dead") {
		t.Fatalf("status %s attempt %d reason %q, want restarting because %s is dead", j.Status, j.Attempt, j.Reason, lost)
	}
	h.advance(h.l.jobs["j1"].retryAt.Sub(h.clock))
	h.step()
	j = h.job("j1")
	if j.Status != fsm.JobRunning || j.Attempt != 2 {
		t.Fatalf("not redeployed: status %s attempt %d reason %q", j.Status, j.Attempt, j.Reason)
	}
	var n int
	for _, w := range []string{"w1", "w2", "w3"} {
		for id, d := range deploys(h.drain(w)) {
			n++
			if w == lost {
				t.Errorf("task %s deployed on dead worker %s", id, w)
			}
			if d.GetTask().GetAttempt() != 2 || d.GetRestoreCheckpointId() != ck {
				t.Errorf("deploy %s: attempt %d restore %d, want 2 and %d", id, d.GetTask().GetAttempt(), d.GetRestoreCheckpointId(), ck)
			}
			if d.GetKind() == transport.TaskKind_TASK_KIND_SOURCE && len(d.GetRestoreOffsets()) == 0 {
				t.Errorf("source %s restored without offsets", id)
			}
			// Same parallelism: each map task gets the one blob of its range.
			if blobs := d.GetRestoreKeyed(); d.GetKind() == transport.TaskKind_TASK_KIND_MAP && (len(blobs) != 1 || blobs[0].GetTaskId() != id) {
				t.Errorf("map %s restored with %v, want its own blob only", id, blobs)
			}
		}
	}
	if n != 4 {
		t.Fatalf("%d tasks deployed, want 4", n)
	}
	var restarts dto.Metric
	if err := h.l.metrics.jobRestarts.WithLabelValues("j1").Write(&restarts); err != nil {
		t.Fatalf("read job restarts metric: %v", err)
	}
	if got := restarts.GetCounter().GetValue(); got != 1 {
		t.Fatalf("job restarts metric = %v, want 1", got)
	}
}

func TestLeaderRestartsOnFailedTaskWithGrowingBackoff(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 1))
	for _, want := range []struct {
		attempt uint64
		delay   time.Duration
	}{{1, time.Second}, {2, 2 * time.Second}, {3, 4 * time.Second}} {
		job := h.job("j1")
		m := job.Tasks[1]
		h.report(m.Worker, ref(job, m), transport.TaskPhase_TASK_PHASE_FAILED, "operator panicked")
		h.step()
		j := h.job("j1")
		wantReason := "task map-0 failed on worker " + m.Worker + ": operator panicked"
		if j.Status != fsm.JobRestarting || j.Reason != wantReason {
			t.Fatalf("attempt %d: status %s reason %q, want restarting %q", want.attempt, j.Status, j.Reason, wantReason)
		}
		if got := h.l.jobs["j1"].retryAt.Sub(h.clock); got != want.delay {
			t.Fatalf("attempt %d: backoff %v, want %v", want.attempt, got, want.delay)
		}
		h.advance(want.delay)
		h.step()
		if j := h.job("j1"); j.Attempt != want.attempt+1 || j.Status != fsm.JobRunning {
			t.Fatalf("attempt %d: not redeployed: %+v", want.attempt, j)
		}
		h.drain("w1")
		h.drain("w2")
		h.runAll("j1")
	}
}

func TestLeaderLostSessionRestartsOnlyAfterLease(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[0].Worker
	sess := h.sessions[w]
	sess.close(errors.New("network blip"))
	h.handle(sessionClosed{sess: sess, err: errors.New("network blip")})

	h.advance(h.l.lease)
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("restarted within the lease: %s %q", j.Status, j.Reason)
	}
	h.advance(time.Millisecond)
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "worker "+w+" of task source-0 has had no control session for") {
		t.Fatalf("status %s reason %q, want restarting for the lost session", j.Status, j.Reason)
	}
}

// TestLeaderLeaseRunsFromTheSessionsClose: a session that ended (its
// watchdog heard nothing) while its handler is still blocked in a send to
// the worker has not closed in the loop yet. That send may still get
// through and renew the worker's lease, so the leader's lease clock starts
// at the close, not at the end: counting from the end would let it restart
// the job while the worker may still run its tasks.
func TestLeaderLeaseRunsFromTheSessionsClose(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[0].Worker
	sess := h.sessions[w]
	sess.close(errSilent)
	h.step()
	h.advance(2 * h.l.lease) // the send stays blocked
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("restarted before the session closed: %s %q", j.Status, j.Reason)
	}

	h.handle(sessionClosed{sess: sess, err: errSilent}) // the blocked send gave up
	h.advance(h.l.lease)
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("restarted within the lease after the close: %s %q", j.Status, j.Reason)
	}
	h.advance(time.Millisecond)
	h.step()
	j := h.job("j1")
	want := "worker " + w + " of task source-0 has had no control session for " + (h.l.lease + time.Millisecond).String()
	if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, want) {
		t.Fatalf("status %s reason %q, want restarting: %q", j.Status, j.Reason, want)
	}
}

// TestLeaderProbesWorkerWhoseSessionBroke: a session that breaks makes the
// leader probe its worker at once, but restarts nothing by itself; a session
// replaced by a newer one, or ended with the term, is not probed.
func TestLeaderProbesWorkerWhoseSessionBroke(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[0].Worker
	sess := h.sessions[w]
	sess.close(errors.New("receive from worker: connection reset"))
	h.handle(sessionClosed{sess: sess})
	if got := h.probes(); !slices.Equal(got, []string{w}) {
		t.Fatalf("probed %v after %s's session broke, want [%s]", got, w, w)
	}
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("a broken session restarted the job: %s %q", j.Status, j.Reason)
	}
	var answered dto.Metric
	if err := h.l.metrics.workerProbes.WithLabelValues("answered").Write(&answered); err != nil || answered.GetCounter().GetValue() != 1 {
		t.Fatalf("answered probes = %v (%v), want 1", answered.GetCounter().GetValue(), err)
	}

	// A reconnect replaces the session: the old one's end is no failure.
	h.connect(w, 4, &transport.TaskStatus{Task: ref(job, job.Tasks[0]), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
	old := h.sessions[w]
	h.connect(w, 4, &transport.TaskStatus{Task: ref(job, job.Tasks[0]), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
	h.handle(sessionClosed{sess: old})
	if got := h.probes(); len(got) != 1 {
		t.Fatalf("probed %v, want no probe for a replaced session", got)
	}
}

// TestLeaderRestartsAtOnceWhenWorkerProcessIsGone: a worker whose session
// broke and whose ports refuse connections lost its process; its job
// restarts at once, while gossip still shows it alive and the lease runs.
// A worker that reconnects before the leader hears of the refusal is not
// failed.
func TestLeaderRestartsAtOnceWhenWorkerProcessIsGone(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[0].Worker
	h.mu.Lock()
	h.refused = map[string]bool{w: true}
	h.mu.Unlock()
	sess := h.sessions[w]
	sess.close(errors.New("receive from worker: EOF"))
	h.handle(sessionClosed{sess: sess})
	h.probes()
	h.step() // takes the workerGone event
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || !strings.Contains(j.Reason, "worker "+w+" of task") || !strings.Contains(j.Reason, "ports refuse connections") {
		t.Fatalf("status %s reason %q, want restarting because %s's process is gone", j.Status, j.Reason, w)
	}
	var refused dto.Metric
	if err := h.l.metrics.workerProbes.WithLabelValues("refused").Write(&refused); err != nil || refused.GetCounter().GetValue() != 1 {
		t.Fatalf("refused probes = %v (%v), want 1", refused.GetCounter().GetValue(), err)
	}
}

func TestLeaderIgnoresGoneWorkerThatReconnected(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[0].Worker
	sess := h.sessions[w]
	sess.close(errors.New("receive from worker: EOF"))
	h.handle(sessionClosed{sess: sess})
	h.probes()
	// The worker restarted and reconnected, running its tasks, before the
	// refusal of its old process's ports reached the loop.
	var running []*transport.TaskStatus
	for _, task := range job.Tasks {
		if task.Worker == w {
			running = append(running, &transport.TaskStatus{Task: ref(job, task), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
		}
	}
	h.connect(w, 4, running...)
	h.handle(workerGone{worker: w, cause: errors.New("receive from worker: EOF")})
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("a worker that reconnected was failed: %s %q", j.Status, j.Reason)
	}
}

// TestLeaderFencesMessagesOfAnOldAttempt: after a restart, an ack and a
// status of the old attempt (a worker that comes back from a freeze) are
// dropped and counted, and a task of the old attempt reported running is
// cancelled.
func TestLeaderFencesMessagesOfAnOldAttempt(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w3", 4)
	spec := testJobSpec(1, 1)
	spec.Recovery.Scope = fsm.RecoveryScopeJob
	first := h.startJob("j1", spec)
	h.completeCheckpoint("j1")
	zombie := first.Tasks[0].Worker
	h.lose(zombie, 4)
	h.step()
	h.advance(h.l.jobs["j1"].retryAt.Sub(h.clock))
	h.step()
	second := h.job("j1")
	if second.Attempt != 2 {
		t.Fatalf("attempt %d, want 2", second.Attempt)
	}
	h.runAll("j1")
	h.advance(time.Duration(second.Spec.Checkpoint.Interval))
	h.checkpointPass()
	pending := h.job("j1").Pending
	if pending == nil {
		t.Fatalf("no checkpoint pending for attempt 2")
	}

	// The zombie is back: alive in gossip, with a new session.
	h.connect(zombie, 4)
	old := first.Tasks[0]
	h.ack(zombie, ref(first, old), old, pending.ID)
	h.report(zombie, ref(first, old), transport.TaskPhase_TASK_PHASE_RUNNING, "")
	if got := cancels(h.drain(zombie)); len(got) != 1 || got[0].GetAttempt() != 1 || got[0].GetTaskId() != old.ID {
		t.Fatalf("cancels sent to %s: %v, want attempt 1's %s", zombie, got, old.ID)
	}
	for _, msg := range []string{"ack", "status"} {
		var m dto.Metric
		if err := h.l.metrics.fencedMessages.WithLabelValues("j1", msg).Write(&m); err != nil || m.GetCounter().GetValue() != 1 {
			t.Errorf("fenced %s messages = %v (%v), want 1", msg, m.GetCounter().GetValue(), err)
		}
	}
	if p := h.l.jobs["j1"].ckpt.pending; p == nil || len(p.acks) != 0 {
		t.Fatalf("the old attempt's ack was recorded: %+v", p)
	}
	h.ackAll("j1", pending.ID)
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != pending.ID || last.Attempt != 2 {
		t.Fatalf("checkpoint %d of attempt 2 not completed: %+v", pending.ID, last)
	}
}

func TestLeaderRestartsWhenWorkerNoLongerRunsTask(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	w := job.Tasks[1].Worker
	old := h.sessions[w]
	// The worker restarted with the same id: a new session without tasks.
	h.connect(w, 4)
	if !errors.Is(context.Cause(old.ctx), errSessionReplaced) {
		t.Fatalf("older session not closed as replaced: %v", context.Cause(old.ctx))
	}
	// The older session's end must not unregister the newer one.
	h.handle(sessionClosed{sess: old})
	if h.l.sessions[w] != h.sessions[w] {
		t.Fatalf("the replaced session's end removed the new session")
	}
	h.step()
	j := h.job("j1")
	if j.Status != fsm.JobRestarting || j.Reason != "worker "+w+" does not run task source-0" && j.Reason != "worker "+w+" does not run task map-0" {
		t.Fatalf("status %s reason %q, want restarting because the task is gone", j.Status, j.Reason)
	}
}

func TestLeaderCancelsWhatTheFSMDoesNotPlace(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(2, 2))
	src := job.Tasks[0] // placed on w1, with map-0; source-1 and map-1 on w2
	running := transport.TaskPhase_TASK_PHASE_RUNNING
	status := func(jobID string, attempt uint64, task string) *transport.TaskStatus {
		return &transport.TaskStatus{Task: &transport.TaskRef{JobId: jobID, Attempt: attempt, TaskId: task}, Phase: running}
	}
	h.newTerm()
	h.connect("w1", 4,
		status("j1", 1, src.ID),     // kept
		status("j1", 1, "map-0"),    // kept
		status("j1", 0, src.ID),     // older attempt
		status("gone", 1, "map-0"),  // unknown job
		status("j1", 1, "map-1"),    // placed on w2
		status("j1", 1, "source-7"), // not in the attempt
		&transport.TaskStatus{Task: &transport.TaskRef{JobId: "j1", Attempt: 0, TaskId: "map-0"}, Phase: transport.TaskPhase_TASK_PHASE_CANCELLED},
	)
	got := cancels(h.drain("w1"))
	if len(got) != 4 {
		t.Fatalf("%d cancels, want 4: %v", len(got), got)
	}
	for _, c := range got {
		if c.GetJobId() == "j1" && c.GetAttempt() == 1 && c.GetTaskId() == src.ID {
			t.Fatalf("the current attempt's task was cancelled")
		}
	}
	if tv := h.l.jobs["j1"].tasks[src.ID]; tv.phase != running {
		t.Fatalf("reported phase not recorded: %v", tv.phase)
	}

	// A cancelled job's tasks are cancelled once.
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
	h.step()
	got = cancels(h.drain("w1"))
	ids := make([]string, len(got))
	for i, c := range got {
		ids[i] = c.GetTaskId()
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"map-0", src.ID}) {
		t.Fatalf("cancelled job: cancels %v, want map-0 and %s, the tasks on w1", got, src.ID)
	}
	h.step()
	if got := cancels(h.drain("w1")); len(got) != 0 {
		t.Fatalf("cancels sent again: %v", got)
	}
}

func TestLeaderFallsBackFromCorruptCheckpoint(t *testing.T) {
	h := newLeaderHarness(t)
	job, first, second := h.restoredFromNewest("j1")
	m := job.Tasks[1]
	// The reason's text does not matter; the cause does.
	h.report(m.Worker, ref(job, m), transport.TaskPhase_TASK_PHASE_FAILED, "restore: blob map-1: checksum mismatch")
	h.step()
	if job := h.job("j1"); h.l.jobs["j1"].bad[second] != "" {
		t.Fatalf("a failure without the STATE_CORRUPT cause marked checkpoint %d bad (attempt %d)", second, job.Attempt)
	}
	h.advance(h.l.jobs["j1"].retryAt.Sub(h.clock))
	h.drain("w1")
	h.drain("w2")
	h.step()
	job = h.job("j1")
	m = job.Tasks[1]
	h.reportCause(m.Worker, ref(job, m), transport.TaskPhase_TASK_PHASE_FAILED, "restore: blob map-1: checksum mismatch",
		transport.FailureCause_FAILURE_CAUSE_STATE_CORRUPT)
	h.step()
	h.advance(h.l.jobs["j1"].retryAt.Sub(h.clock))
	h.drain("w1")
	h.drain("w2")
	h.step()
	job = h.job("j1")
	if job.Attempt != 4 || h.l.jobs["j1"].restoredFrom != first {
		t.Fatalf("attempt %d restored from %d, want 4 from %d", job.Attempt, h.l.jobs["j1"].restoredFrom, first)
	}
	if !strings.Contains(job.Reason, "restoring from checkpoint 1 because newer ones failed verification (checkpoint 2: task map-0") {
		t.Fatalf("reason does not say it fell back: %q", job.Reason)
	}
	for _, w := range []string{"w1", "w2"} {
		for id, d := range deploys(h.drain(w)) {
			if d.GetRestoreCheckpointId() != first {
				t.Errorf("%s restores %d, want %d", id, d.GetRestoreCheckpointId(), first)
			}
		}
	}
}

func TestLeaderRestartsTaskThatNeverRuns(t *testing.T) {
	h := newLeaderHarness(t)
	h.register("j1", testJobSpec(1, 1))
	h.connect("w1", 4)
	h.connect("w2", 4)
	h.pastGrace()
	h.step()
	job := h.job("j1")
	if job.Attempt != 1 || job.Status != fsm.JobRunning {
		t.Fatalf("job not deployed: attempt %d status %s reason %q", job.Attempt, job.Status, job.Reason)
	}
	// Every task runs but map-0, which stays DEPLOYING (its RUNNING was lost).
	var stuck fsm.Task
	for _, tk := range job.Tasks {
		phase := transport.TaskPhase_TASK_PHASE_RUNNING
		if tk.ID == "map-0" {
			stuck, phase = tk, transport.TaskPhase_TASK_PHASE_DEPLOYING
		}
		h.report(tk.Worker, ref(job, tk), phase, "")
	}
	if stuck.ID == "" {
		t.Fatalf("job has no task map-0: %+v", job.Tasks)
	}
	h.step()
	// A restore that reports progress holds the deadline off: 40 s in, a
	// progress report moves it 45 s past the report.
	h.advance(40 * time.Second)
	h.report(stuck.Worker, ref(job, stuck), transport.TaskPhase_TASK_PHASE_DEPLOYING, "restoring checkpoint 3: 16384 keys loaded")
	h.step()
	deadline := h.clock.Add(defaultDeployTimeout)
	if got := h.l.jobs["j1"].deployProgress; !got.Equal(h.clock) {
		t.Fatalf("deploy progress at %v, want the report's %v", got, h.clock)
	}
	if due := h.l.jobs["j1"].reconcileAt; due.IsZero() || due.After(deadline.Add(time.Millisecond)) {
		t.Fatalf("next reconcile due %v, want by the deploy deadline %v", due, deadline)
	}
	h.advance(deadline.Sub(h.clock))
	h.step()
	if j := h.job("j1"); j.Status != fsm.JobRunning {
		t.Fatalf("restarted at the deadline, before it passed: status %s reason %q", j.Status, j.Reason)
	}
	h.advance(time.Millisecond)
	h.step()
	j := h.job("j1")
	want := "task map-0 on worker " + stuck.Worker + " has not reported RUNNING within 45s of its deploy or its last progress (phase TASK_PHASE_DEPLOYING)"
	if j.Status != fsm.JobRestarting || j.Reason != want {
		t.Fatalf("status %s reason %q, want restarting with %q", j.Status, j.Reason, want)
	}
}

// TestSessionsOfMadeUpWorkersLeaveNothing: Hellos with ever new worker ids
// (an intruder without TLS) leave no record once their sessions close, so
// the leader's maps stay bounded by the real workers.
func TestSessionsOfMadeUpWorkersLeaveNothing(t *testing.T) {
	h := newLeaderHarness(t)
	h.newTerm()
	for i := range 500 {
		sess := h.connect(fmt.Sprintf("ghost-%d", i), 1)
		h.handle(sessionClosed{sess: sess, err: errors.New("gone")})
	}
	if n := len(h.l.sessions) + len(h.l.noSessionSince); n != 0 {
		t.Fatalf("leader keeps %d sessions and %d session-less records of workers that never ran a task", len(h.l.sessions), len(h.l.noSessionSince))
	}
}

// TestLeaderCancelsARestartedAttemptsTasksOnReconnect: a worker whose
// session was down when its job restarted never got the cancels of its
// tasks. When it reconnects reporting them running, before the restart's
// status write is in and after, it is told again: adopted, they would run
// on untracked once the next attempt is placed elsewhere.
func TestLeaderCancelsARestartedAttemptsTasksOnReconnect(t *testing.T) {
	for _, statusIn := range []bool{false, true} {
		t.Run(fmt.Sprintf("status_written=%v", statusIn), func(t *testing.T) {
			h := newLeaderHarness(t)
			job := h.startJob("j1", testJobSpec(2, 2))
			var away []*transport.TaskStatus
			var failing *fsm.Task
			for _, task := range job.Tasks {
				if task.Worker == "w2" {
					away = append(away, &transport.TaskStatus{Task: ref(job, task), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
				} else {
					failing = &task
				}
			}
			if len(away) == 0 || failing == nil {
				t.Fatalf("tasks %v: want some on w2 and some elsewhere", job.Tasks)
			}
			sess := h.sessions["w2"]
			sess.close(errors.New("network blip"))
			h.handle(sessionClosed{sess: sess, err: errors.New("network blip")})

			// A task elsewhere fails: the job restarts; w2's cancels have
			// no session to go on.
			fail := workerMessage{sess: h.sessions[failing.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{
				Status: &transport.TaskStatus{Task: ref(job, *failing), Phase: transport.TaskPhase_TASK_PHASE_FAILED, Reason: "boom"},
			}}}
			if statusIn {
				h.handle(fail)
				if j := h.job("j1"); j.Status != fsm.JobRestarting || j.Attempt != 1 {
					t.Fatalf("status %s attempt %d, want restarting attempt 1", j.Status, j.Attempt)
				}
			} else {
				h.l.handle(fail)
				h.l.settle() // the status write's result waits
				if js := h.l.jobs["j1"]; js.status != fsm.JobRunning || !h.l.busy("j1") {
					t.Fatalf("loop's status %s, busy %v: want the restart's status write in flight", js.status, h.l.busy("j1"))
				}
			}

			h.connect("w2", 4, away...)
			got := cancels(h.drain("w2"))
			for _, st := range away {
				if !slices.ContainsFunc(got, func(r *transport.TaskRef) bool { return sameTask(r, st.GetTask()) }) {
					t.Errorf("task %s of the restarted attempt, reported running on reconnect, not cancelled; cancels %v", st.GetTask().GetTaskId(), got)
				}
			}
		})
	}
}

// sameTask reports whether a and b name the same task of the same attempt.
func sameTask(a, b *transport.TaskRef) bool {
	return a.GetJobId() == b.GetJobId() && a.GetAttempt() == b.GetAttempt() && a.GetTaskId() == b.GetTaskId()
}

// TestLeaderRemembersACorruptCheckpointReportedDuringTheRestart: a map task
// whose restored state failed verification may report it after another
// task's failure has begun the restart; the checkpoint is not restored
// again all the same.
func TestLeaderRemembersACorruptCheckpointReportedDuringTheRestart(t *testing.T) {
	h := newLeaderHarness(t)
	job, first, second := h.restoredFromNewest("j1")
	src, m := job.Tasks[0], job.Tasks[1]
	h.report(src.Worker, ref(job, src), transport.TaskPhase_TASK_PHASE_FAILED, "broker gone again")
	if j := h.job("j1"); j.Status != fsm.JobRestarting {
		t.Fatalf("job %s after its source failed, want restarting", j.Status)
	}
	h.reportCause(m.Worker, ref(job, m), transport.TaskPhase_TASK_PHASE_FAILED, "restore: blob map-1: checksum mismatch",
		transport.FailureCause_FAILURE_CAUSE_STATE_CORRUPT)
	h.advance(h.l.jobs["j1"].retryAt.Sub(h.clock))
	h.step()
	if job := h.job("j1"); job.Attempt != 3 || h.l.jobs["j1"].restoredFrom != first {
		t.Fatalf("attempt %d restored from %d, want 3 from %d: checkpoint %d failed verification", job.Attempt, h.l.jobs["j1"].restoredFrom, first, second)
	}
}

// restoredFromNewest starts job id (a source and two map tasks), completes
// two checkpoints, fails the source and returns the job's second attempt,
// which restored the newer checkpoint (second), and both ids.
func (h *leaderHarness) restoredFromNewest(id string) (job fsm.Job, first, second uint64) {
	h.t.Helper()
	h.startJob(id, testJobSpec(1, 2))
	first = h.completeCheckpoint(id)
	second = h.completeCheckpoint(id)
	job = h.job(id)
	h.report(job.Tasks[0].Worker, ref(job, job.Tasks[0]), transport.TaskPhase_TASK_PHASE_FAILED, "broker gone")
	h.step()
	h.advance(h.l.jobs[id].retryAt.Sub(h.clock))
	h.step()
	job = h.job(id)
	if job.Attempt != 2 || h.l.jobs[id].restoredFrom != second {
		h.t.Fatalf("attempt %d restored from %d, want 2 from %d", job.Attempt, h.l.jobs[id].restoredFrom, second)
	}
	return job, first, second
}
