package worker

import (
	"strings"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// fenceOf returns the fence task k is below on w, or 0 when messages for it
// are delivered.
func fenceOf(w *Worker, k *transport.TaskRef) uint64 {
	w.tasks.mu.Lock()
	defer w.tasks.mu.Unlock()
	return w.tasks.fencedLocked(keyOf(k))
}

// TestPartialDeploy: on a worker running source-0 and map-0 and map-1 of
// attempt 1, a partial deploy of map-1 in attempt 2 (task-scoped recovery)
// stops only map-1 of attempt 1; source-0 and map-0 run on in attempt 1 and
// still get their triggers (a checkpoint over them completes). A full
// deploy of attempt 3 then stops them all, map-1 of attempt 2 too.
func TestPartialDeploy(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	brokers := newKafka(t, map[string]int32{"in": 1})
	produce(t, brokers, "in", []record{{key: "a"}, {key: "b"}, {key: "a"}})

	// source-0 feeds map-0, which owns every key group in its own view:
	// map-1 has no source, so that its restart touches no channel.
	own := []*transport.MapTaskRef{{TaskId: "map-0", WorkerId: w.ID(), DataAddr: w.DataAddr(), KeyGroupStart: 0, KeyGroupEnd: 128}}
	m0 := mapDeploy("job", 1, operator.Count, 1, 128, own, 0)
	m1 := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w, w), 1)
	s0 := sourceDeploy("job", 1, 0, operator.Count, brokers, "in", []int32{0}, own)
	for _, d := range []*transport.DeployTask{m0, m1, s0} {
		f.deploy(t, "w1", d)
		f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	}

	m1b := mapDeploy("job", 2, operator.Count, 1, 128, mapRefs(128, w, w), 1)
	m1b.Partial = true
	f.deploy(t, "w1", m1b)
	if reason := f.awaitStatus(t, m1.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "superseded by attempt 2") {
		t.Fatalf("map-1 of attempt 1 cancelled with reason %q", reason)
	}
	f.awaitStatus(t, m1b.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	if fence := fenceOf(w, m1.Task); fence != 2 {
		t.Fatalf("map-1 of attempt 1: fence %d, want 2: its messages are dropped", fence)
	}
	for _, d := range []*transport.DeployTask{s0, m0} {
		if fence := fenceOf(w, d.Task); fence != 0 {
			t.Fatalf("%s of attempt 1 fenced at %d after a partial deploy", d.Task.GetTaskId(), fence)
		}
	}
	// Triggers reach source-0 of attempt 1, and its barriers map-0.
	id, _ := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": s0.Task}, []*transport.TaskRef{m0.Task}, map[int32]int64{0: 3}, nil)
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{Task: m0.Task, CheckpointId: id}}})
	// A stale partial deploy (attempt 1 of map-1) is ignored.
	f.deploy(t, "w1", m1)
	marker := ref("job", 2, "no-such-task")
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: marker}}})
	f.awaitStatus(t, marker, transport.TaskPhase_TASK_PHASE_CANCELLED)
	deploying := 0
	for _, r := range f.messages() {
		st := r.msg.GetStatus()
		if st == nil {
			continue
		}
		for _, d := range []*transport.DeployTask{s0, m0, m1b} {
			if sameTask(st.GetTask(), d.Task) && st.GetPhase() != transport.TaskPhase_TASK_PHASE_RUNNING && st.GetPhase() != transport.TaskPhase_TASK_PHASE_DEPLOYING {
				t.Fatalf("%s of attempt %d reported %v (%s) after a partial deploy", d.Task.GetTaskId(), d.Task.GetAttempt(), st.GetPhase(), st.GetReason())
			}
		}
		if sameTask(st.GetTask(), m1.Task) && st.GetPhase() == transport.TaskPhase_TASK_PHASE_DEPLOYING {
			deploying++
		}
	}
	if deploying != 1 {
		t.Fatalf("map-1 of attempt 1 reported DEPLOYING %d times: the stale deploy must be ignored", deploying)
	}

	full := mapDeploy("job", 3, operator.Count, 1, 128, own, 0)
	f.deploy(t, "w1", full)
	for _, d := range []*transport.DeployTask{s0, m0, m1b} {
		if reason := f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "superseded by attempt 3") {
			t.Fatalf("%s of attempt %d cancelled with reason %q", d.Task.GetTaskId(), d.Task.GetAttempt(), reason)
		}
		if fence := fenceOf(w, d.Task); fence != 3 {
			t.Fatalf("%s of attempt %d: fence %d after the full deploy, want 3", d.Task.GetTaskId(), d.Task.GetAttempt(), fence)
		}
	}
	f.awaitStatus(t, full.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
}
