package coordinator

import (
	"testing"

	"github.com/coordflow/coordflow/fsm"
)

// The job view shows each task's own attempt and start time, which a
// task-scoped recovery changes only for the tasks it restored, and the
// recoveries newest first with the time to their first checkpoint.
func TestJobViewTaskAttemptsAndRecoveries(t *testing.T) {
	d := newDashboardFixture(t)
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	const job = "wordcount-1"
	d.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: job, Spec: spec, Time: at(0)})
	d.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 1, Tasks: dashboardTasks, Reason: "deployed", Time: at(100)})
	offsets := map[int32]int64{0: 10, 1: 20, 2: 30}
	d.checkpoint(job, 1, 1, 1000, 100, 10, offsets)

	// w2 (source-1) is lost; the task moves to w1 in attempt 2 and the
	// first checkpoint after it completes at 1,900 ms.
	moved := dashboardTasks[1]
	moved.Worker = "w1"
	d.apply(fsm.CommandTasksRestarted, fsm.TasksRestartedCmd{JobID: job, Attempt: 2, Tasks: []fsm.Task{moved}, RestoreFrom: 1,
		Reason: "worker w2 of task source-1 is gone", DetectedAt: at(1500), Time: at(1520)})
	var jv apiJob
	d.get("/v1/jobs/"+job, &jv)
	for _, tv := range jv.Tasks {
		wantAttempt, wantStart := uint64(1), formatTime(at(100))
		if tv.ID == "source-1" {
			wantAttempt, wantStart = 2, formatTime(at(1520))
		}
		if tv.Attempt != wantAttempt || tv.StartedAt != wantStart {
			t.Fatalf("task %s: attempt %d started %s, want %d and %s", tv.ID, tv.Attempt, tv.StartedAt, wantAttempt, wantStart)
		}
	}
	if len(jv.Recoveries) != 1 {
		t.Fatalf("recoveries %+v, want one", jv.Recoveries)
	}
	r := jv.Recoveries[0]
	if r.Scope != fsm.RecoveryScopeTasks || len(r.Tasks) != 1 || r.Tasks[0] != "source-1" || r.ToCheckpointMS != nil {
		t.Fatalf("recovery before its first checkpoint: %+v", r)
	}

	tasks := append([]fsm.Task(nil), dashboardTasks...)
	tasks[1] = moved
	prev := dashboardTasks
	dashboardTasks = tasks // the fixture acks for the tasks where they run now
	defer func() { dashboardTasks = prev }()
	d.checkpoint(job, 2, 2, 1890, 200, 20, offsets) // completes 10 ms later
	d.get("/v1/jobs/"+job, &jv)
	r = jv.Recoveries[0]
	if r.CheckpointID != 2 || r.ToCheckpointMS == nil || *r.ToCheckpointMS != 400 {
		t.Fatalf("recovery after its first checkpoint: %+v, want checkpoint 2 400 ms after detection", r)
	}
}
