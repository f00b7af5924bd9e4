package coordinator

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// TestLeaderWriteStages: the trigger and the completion of a checkpoint are
// each observed in every stage of coordflow_leader_write_stage_seconds, the
// metric that says whether a slow checkpoint waited behind its job's
// writes, on Raft, or for the leader loop.
func TestLeaderWriteStages(t *testing.T) {
	h := newLeaderHarness(t)
	h.startJob("j1", testJobSpec(1, 1))
	if id := h.completeCheckpoint("j1"); id != 1 {
		t.Fatalf("checkpoint id = %d, want 1", id)
	}
	for _, command := range []fsm.CommandType{fsm.CommandCheckpointTriggered, fsm.CommandCheckpointCompleted} {
		for _, stage := range []string{"queued", "commit", "loop"} {
			var m dto.Metric
			hist := h.l.metrics.leaderWriteStage.WithLabelValues(command.String(), stage).(prometheus.Metric)
			if err := hist.Write(&m); err != nil || m.GetHistogram().GetSampleCount() != 1 {
				t.Errorf("%s, stage %s: %d observations (%v) after one checkpoint, want 1", command, stage, m.GetHistogram().GetSampleCount(), err)
			}
		}
	}
}

func TestLeaderPendingCheckpointFencesAcks(t *testing.T) {
	tasks := map[string]*trackedTask{
		"source-0": {task: fsm.Task{ID: "source-0", Kind: fsm.TaskSource, Worker: "w1", Partitions: []int32{0}, Attempt: 3}},
		"map-0":    {task: fsm.Task{ID: "map-0", Kind: fsm.TaskMap, Worker: "w2", Attempt: 3}},
	}
	order := []*trackedTask{tasks["source-0"], tasks["map-0"]}
	now := time.Unix(1000, 0)
	p := newPendingCheckpoint(7, 3, now, time.Second)
	ack := func(attempt uint64, id uint64, task string, kind transport.TaskKind) *transport.CheckpointAck {
		return &transport.CheckpointAck{
			Task:         &transport.TaskRef{JobId: "j", Attempt: attempt, TaskId: task},
			CheckpointId: id,
			State:        &transport.TaskState{Kind: kind, Offsets: map[int32]int64{0: 42}},
		}
	}
	src := transport.TaskKind_TASK_KIND_SOURCE
	dropped := []struct {
		name   string
		ack    *transport.CheckpointAck
		worker string
	}{
		{"stale attempt", ack(2, 7, "source-0", src), "w1"},
		{"newer attempt", ack(4, 7, "source-0", src), "w1"},
		{"other checkpoint", ack(3, 6, "source-0", src), "w1"},
		{"unknown task", ack(3, 7, "source-9", src), "w1"},
		{"wrong worker", ack(3, 7, "source-0", src), "w2"},
		{"wrong kind", ack(3, 7, "source-0", transport.TaskKind_TASK_KIND_MAP), "w1"},
	}
	for _, d := range dropped {
		if err := p.add(d.ack, d.worker, tasks, now); err == nil {
			t.Errorf("%s: ack accepted", d.name)
		}
	}
	if len(p.acks) != 0 || p.complete(order) {
		t.Fatalf("dropped acks were recorded: %v", p.acks)
	}
	if err := p.add(ack(3, 7, "source-0", src), "w1", tasks, now.Add(time.Millisecond)); err != nil {
		t.Fatalf("valid ack dropped: %v", err)
	}
	if err := p.add(ack(3, 7, "source-0", src), "w1", tasks, now); err == nil {
		t.Fatalf("duplicate ack accepted")
	}
	if p.complete(order) {
		t.Fatalf("complete with one of two acks")
	}
	if got := p.missing(order); len(got) != 1 || got[0] != "map-0" {
		t.Fatalf("missing = %v, want [map-0]", got)
	}
	st := p.acks["source-0"]
	if st.Worker != "w1" || st.Kind != fsm.TaskSource || st.AckedAt != now.Add(time.Millisecond).UnixNano() || st.Offsets[0] != 42 {
		t.Fatalf("recorded state = %+v", st)
	}
	if got := p.timeoutReason(order); got != "timed out after 1s waiting for acks from map-0" {
		t.Fatalf("timeout reason = %q", got)
	}
}

func TestLeaderCheckpointsCompleteWithGrowingIDs(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(2, 2))

	p := h.firstCheckpoint("j1")
	if p == nil || p.ID != 1 {
		t.Fatalf("no checkpoint 1 pending: %+v", p)
	}
	trig := triggers(append(h.drain("w1"), h.drain("w2")...))
	if len(trig) != 2 || trig["source-0"] != 1 || trig["source-1"] != 1 {
		t.Fatalf("triggers = %v, want checkpoint 1 to both sources", trig)
	}

	// A stale attempt's ack and an ack for another id change nothing.
	src := job.Tasks[0]
	h.ack(src.Worker, &transport.TaskRef{JobId: "j1", Attempt: 0, TaskId: src.ID}, src, 1)
	h.ack(src.Worker, ref(job, src), src, 2)
	if got := len(h.l.jobs["j1"].ckpt.pending.acks); got != 0 {
		t.Fatalf("fenced acks recorded: %d", got)
	}
	// All tasks but one: still pending.
	for _, tk := range job.Tasks[:len(job.Tasks)-1] {
		h.ack(tk.Worker, ref(job, tk), tk, 1)
	}
	if _, ok := h.f.LastCompleted("j1"); ok {
		t.Fatalf("checkpoint completed before every task acked")
	}
	last := job.Tasks[len(job.Tasks)-1]
	h.ack(last.Worker, ref(job, last), last, 1)
	done, ok := h.f.LastCompleted("j1")
	if !ok || done.ID != 1 || len(done.Tasks) != len(job.Tasks) || done.Tasks["map-0"].Worker != job.Tasks[2].Worker {
		t.Fatalf("checkpoint 1 not completed with all states: %+v", done)
	}
	// Every task hears of the completion: sources commit offsets, map tasks
	// take the checkpoint's files as their incremental base.
	var completes int
	for _, m := range append(h.drain("w1"), h.drain("w2")...) {
		if c := m.GetComplete(); c != nil {
			completes++
			source := strings.HasPrefix(c.GetTask().GetTaskId(), "source-")
			if c.GetCheckpointId() != 1 || source != (len(c.GetOffsets()) > 0) {
				t.Errorf("CheckpointComplete = %v", c)
			}
		}
	}
	if completes != len(job.Tasks) {
		t.Fatalf("%d CheckpointComplete messages, want one per task", completes)
	}

	// Not before the interval; then the next id.
	h.checkpointPass()
	if h.job("j1").Pending != nil {
		t.Fatalf("triggered before the interval elapsed")
	}
	if id := h.completeCheckpoint("j1"); id != 2 {
		t.Fatalf("second checkpoint id = %d, want 2", id)
	}
}

func TestLeaderCheckpointTimeoutAbortsAndRestartsPastTolerance(t *testing.T) {
	h := newLeaderHarness(t)
	spec := testJobSpec(1, 1) // tolerable_failures 1, timeout 10s
	job := h.startJob("j1", spec)

	for i, wantStatus := range []fsm.JobStatus{fsm.JobRunning, fsm.JobRestarting} {
		h.advance(time.Duration(spec.Checkpoint.Interval))
		h.checkpointPass()
		p := h.job("j1").Pending
		if p == nil {
			t.Fatalf("round %d: no checkpoint triggered", i)
		}
		src := job.Tasks[0]
		h.ack(src.Worker, ref(job, src), src, p.ID) // the map task never acks
		deadline := time.Unix(0, p.TriggeredAt).Add(time.Duration(spec.Checkpoint.Timeout))
		h.advance(deadline.Sub(h.clock) - time.Millisecond)
		h.checkpointPass()
		if q := h.job("j1").Pending; q == nil || q.ID != p.ID {
			t.Fatalf("round %d: aborted before the timeout", i)
		}
		h.advance(time.Millisecond)
		h.checkpointPass()
		// Once aborted, the next checkpoint may be triggered at once (its
		// interval has passed): only a newer one may be pending.
		j := h.job("j1")
		if len(j.Aborted) != i+1 || j.Aborted[i].ID != p.ID || (j.Pending != nil && j.Pending.ID <= p.ID) {
			t.Fatalf("round %d: checkpoint %d not aborted: aborted %d, pending %+v", i, p.ID, len(j.Aborted), j.Pending)
		}
		if reason := j.Aborted[i].Reason; reason != "timed out after 10s waiting for acks from map-0" {
			t.Fatalf("round %d: abort reason %q", i, reason)
		}
		if j.Status != wantStatus {
			t.Fatalf("round %d: status %s after %d consecutive aborts, want %s", i, j.Status, j.ConsecutiveAborts, wantStatus)
		}
	}
	if reason := h.job("j1").Reason; !strings.Contains(reason, "2 consecutive checkpoint aborts exceed tolerable_failures 1") {
		t.Fatalf("restart reason = %q", reason)
	}
	msgs := append(h.drain("w1"), h.drain("w2")...)
	if len(cancels(msgs)) != 2 {
		t.Fatalf("restart did not cancel both tasks: %v", cancels(msgs))
	}
}

func TestLeaderDeclineAbortsCheckpoint(t *testing.T) {
	h := newLeaderHarness(t)
	job := h.startJob("j1", testJobSpec(1, 1))
	h.firstCheckpoint("j1")
	m := job.Tasks[1]
	decline := func(attempt uint64) {
		h.handle(workerMessage{sess: h.sessions[m.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Decline{
			Decline: &transport.CheckpointDecline{
				Task: &transport.TaskRef{JobId: "j1", Attempt: attempt, TaskId: m.ID}, CheckpointId: 1, Reason: "disk full",
			},
		}}})
	}
	decline(0) // stale attempt: ignored
	if h.job("j1").Pending == nil {
		t.Fatalf("a stale decline aborted the checkpoint")
	}
	decline(1)
	j := h.job("j1")
	if j.Pending != nil || len(j.Aborted) != 1 {
		t.Fatalf("decline did not abort: %+v", j.Pending)
	}
	if want := "declined by task map-0 on worker " + m.Worker + ": disk full"; j.Aborted[0].Reason != want {
		t.Fatalf("abort reason %q, want %q", j.Aborted[0].Reason, want)
	}
	if j.Status != fsm.JobRunning {
		t.Fatalf("one abort within tolerance restarted the job: %s", j.Status)
	}
}

func TestLeaderAbortsPredecessorsCheckpointWithoutRestarting(t *testing.T) {
	h := newLeaderHarness(t)
	spec := testJobSpec(1, 1)
	spec.Checkpoint.TolerableFailures = 0
	job := h.startJob("j1", spec)
	h.firstCheckpoint("j1") // checkpoint 1 pending when "leadership is lost"

	// A new term on the same FSM: workers reconnect and report their tasks.
	h.newTerm()
	h.step()
	j := h.job("j1")
	if j.Pending != nil || len(j.Aborted) != 1 || j.Aborted[0].Reason != "leader changed" || j.Aborted[0].ID != 1 {
		t.Fatalf("predecessor's checkpoint not aborted as leader changed: pending %+v aborted %+v", j.Pending, j.Aborted)
	}
	h.connect("w1", 4, runningOn(job, "w1")...)
	h.connect("w2", 4, runningOn(job, "w2")...)
	h.pastGrace()
	h.step()
	j = h.job("j1")
	if j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("leader change restarted the job: status %s attempt %d reason %q", j.Status, j.Attempt, j.Reason)
	}
	if c := cancels(append(h.drain("w1"), h.drain("w2")...)); len(c) != 0 {
		t.Fatalf("leader change cancelled tasks: %v", c)
	}
	// It skips id 2, which a predecessor may have sent without committing
	// it (pipelined triggers).
	p := j.Pending
	if p == nil || p.ID != 3 {
		t.Fatalf("new leader did not trigger checkpoint 3: %+v", p)
	}
	h.ackAll("j1", 3)
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != 3 {
		t.Fatalf("checkpoint 3 not completed")
	}
}

// TestLeaderRetriggersOnReconnect: a worker whose session broke may have
// lost the trigger of the pending checkpoint; when it reconnects, its source
// tasks that have not acked get the trigger again, and the checkpoint
// completes instead of timing out.
func TestLeaderRetriggersOnReconnect(t *testing.T) {
	h := newLeaderHarness(t)
	spec := testJobSpec(2, 1)
	job := h.startJob("j1", spec)
	p := h.firstCheckpoint("j1")
	h.drain("w1")
	h.drain("w2") // the triggers are lost with the sessions
	var acked fsm.Task
	for _, task := range job.Tasks {
		if task.Kind == fsm.TaskSource {
			acked = task
			break
		}
	}
	h.ack(acked.Worker, ref(job, acked), acked, p.ID) // one source got it before
	for _, w := range []string{"w1", "w2"} {
		var running []*transport.TaskStatus
		for _, task := range job.Tasks {
			if task.Worker == w {
				running = append(running, &transport.TaskStatus{Task: ref(job, task), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
			}
		}
		h.connect(w, 4, running...)
	}
	got := triggers(append(h.drain("w1"), h.drain("w2")...))
	for _, task := range job.Tasks {
		_, sent := got[task.ID]
		want := task.Kind == fsm.TaskSource && task.ID != acked.ID
		if sent != want {
			t.Errorf("task %s (%s): trigger re-sent %v, want %v", task.ID, task.Kind, sent, want)
		}
		if sent && got[task.ID] != p.ID {
			t.Errorf("task %s: re-sent trigger of checkpoint %d, want %d", task.ID, got[task.ID], p.ID)
		}
	}
	for _, task := range job.Tasks {
		if task.ID != acked.ID {
			h.ack(task.Worker, ref(job, task), task, p.ID)
		}
	}
	if last, ok := h.f.LastCompleted("j1"); !ok || last.ID != p.ID {
		t.Fatalf("checkpoint %d not completed after the re-sent triggers", p.ID)
	}
}

// TestSessionQueuesGrowWithSlots: a worker with many slots gets queues that
// hold a message per task and more, so that a checkpoint of every job at
// once does not overflow its session.
func TestSessionQueuesGrowWithSlots(t *testing.T) {
	small := newSession(t.Context(), &transport.Hello{WorkerId: "w1", Slots: 4}, nil)
	big := newSession(t.Context(), &transport.Hello{WorkerId: "w2", Slots: 1000}, nil)
	if cap(small.out) != sessionQueue || small.inbox != sessionInbox {
		t.Errorf("4 slots: queue %d inbox %d, want the minimums %d and %d", cap(small.out), small.inbox, sessionQueue, sessionInbox)
	}
	if cap(big.out) < 2000 || big.inbox < 2000 {
		t.Errorf("1000 slots: queue %d inbox %d, want room for two messages per task", cap(big.out), big.inbox)
	}
}
