package fsm

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

// A task-scoped recovery moves only the restored tasks to the next attempt:
// the others keep their attempt and start time, the pending checkpoint is
// aborted, and the recovery is recorded until the first checkpoint after it
// completes.
func TestTasksRestartedKeepsSurvivors(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	for _, task := range j.Tasks {
		if task.Attempt != 1 || task.StartedAt == 0 {
			t.Fatalf("task %s after the first deploy: attempt %d started %d, want attempt 1 and a start time", task.ID, task.Attempt, task.StartedAt)
		}
	}
	restore := h.checkpointed("j1")
	pending := h.triggered("j1")

	// w2 is lost: its tasks go to w3.
	var lost []Task
	for _, task := range j.Tasks {
		if task.Worker == "w2" {
			task.Worker, task.DataAddr = "w3", "w3:7401"
			lost = append(lost, task)
		}
	}
	cmd := TasksRestartedCmd{JobID: "j1", Attempt: 2, Tasks: lost, RestoreFrom: restore, Reason: "worker w2 is dead", DetectedAt: h.tick(), Time: h.tick()}
	h.must(CommandTasksRestarted, cmd)

	after := h.job("j1")
	if after.Attempt != 2 || after.Status != JobRunning || after.Pending != nil {
		t.Fatalf("after recovery: attempt %d status %s pending %v, want attempt 2, running, no pending checkpoint", after.Attempt, after.Status, after.Pending)
	}
	if n := len(after.Aborted); n == 0 || after.Aborted[n-1].ID != pending {
		t.Fatalf("pending checkpoint %d was not aborted: aborted %v", pending, after.Aborted)
	}
	for i, task := range after.Tasks {
		before := j.Tasks[i]
		if before.Worker == "w2" {
			if task.Worker != "w3" || task.Attempt != 2 || task.StartedAt != cmd.Time {
				t.Fatalf("restored task %+v: want worker w3, attempt 2, started at %d", task, cmd.Time)
			}
			continue
		}
		if !reflect.DeepEqual(task, before) {
			t.Fatalf("surviving task changed: %+v, was %+v", task, before)
		}
	}
	rec := after.Recoveries[len(after.Recoveries)-1]
	wantIDs := taskIDs(lost)
	if rec.Scope != RecoveryScopeTasks || rec.Attempt != 2 || !slices.Equal(rec.Tasks, wantIDs) || rec.RestoredFrom != restore ||
		rec.DetectedAt != cmd.DetectedAt || rec.StartedAt != cmd.Time || rec.CheckpointedAt != 0 {
		t.Fatalf("recovery record %+v, want scope tasks, attempt 2, tasks %v, restored from %d", rec, wantIDs, restore)
	}

	// Acks of the old attempt cannot complete a checkpoint of the new one,
	// and the first checkpoint after the recovery is recorded with it.
	cp := h.triggered("j1")
	done := h.must(CommandCheckpointCompleted, h.complete("j1", 2, cp, statesFor(after.Tasks, int64(cp))))
	if done != nil {
		t.Fatalf("complete: %v", done)
	}
	rec = h.job("j1").Recoveries[len(after.Recoveries)-1]
	if rec.CheckpointID != cp || rec.CheckpointedAt == 0 {
		t.Fatalf("recovery record after checkpoint %d: %+v", cp, rec)
	}
}

// A task-scoped recovery that would change more than a task's place, name
// a task the job lacks, skip an attempt, or restore nothing completed is
// refused, deterministically, and leaves the job as it was.
func TestTasksRestartedRefusesBadCommands(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	older := h.checkpointed("j1")
	restore := h.checkpointed("j1")
	moved := j.Tasks[0]
	moved.Worker = "w9"
	otherPartitions := moved
	otherPartitions.Partitions = []int32{1}
	cases := map[string]TasksRestartedCmd{
		"skips an attempt":       {JobID: "j1", Attempt: 3, Tasks: []Task{moved}, RestoreFrom: restore},
		"no checkpoint":          {JobID: "j1", Attempt: 2, Tasks: []Task{moved}},
		"unknown checkpoint":     {JobID: "j1", Attempt: 2, Tasks: []Task{moved}, RestoreFrom: restore + 7},
		"older checkpoint":       {JobID: "j1", Attempt: 2, Tasks: []Task{moved}, RestoreFrom: older},
		"no tasks":               {JobID: "j1", Attempt: 2, RestoreFrom: restore},
		"unknown task":           {JobID: "j1", Attempt: 2, Tasks: []Task{{ID: "map-9", Kind: TaskMap, Index: 9, Worker: "w9"}}, RestoreFrom: restore},
		"task twice":             {JobID: "j1", Attempt: 2, Tasks: []Task{moved, moved}, RestoreFrom: restore},
		"changes its partitions": {JobID: "j1", Attempt: 2, Tasks: []Task{otherPartitions}, RestoreFrom: restore},
		"unknown job":            {JobID: "nope", Attempt: 2, Tasks: []Task{moved}, RestoreFrom: restore},
	}
	before := h.digest()
	for name, cmd := range cases {
		cmd.Time = h.tick()
		if _, err := h.apply(CommandTasksRestarted, cmd); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if h.digest() != before {
		t.Fatal("a refused TasksRestarted changed the state")
	}

	h.must(CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobRestarting, Reason: "restarting", Time: h.tick()})
	if _, err := h.apply(CommandTasksRestarted, TasksRestartedCmd{JobID: "j1", Attempt: 2, Tasks: []Task{moved}, RestoreFrom: restore, Time: h.tick()}); err == nil {
		t.Fatal("a job that is not running recovered tasks alone")
	}
}

// A job-scoped restart starts every task anew and is recorded as a
// recovery of scope job.
func TestJobRestartedRecordsJobScopedRecovery(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	restore := h.checkpointed("j1")
	spec := testSpec()
	cmd := h.restart("j1", 2, assignment(spec, "w3"), "worker w1 is dead")
	cmd.RestoreFrom, cmd.DetectedAt = restore, cmd.Time-5
	h.must(CommandJobRestarted, cmd)
	j := h.job("j1")
	for _, task := range j.Tasks {
		if task.Attempt != 2 || task.StartedAt != cmd.Time {
			t.Fatalf("task %s: attempt %d started %d, want 2 and %d", task.ID, task.Attempt, task.StartedAt, cmd.Time)
		}
	}
	rec := j.Recoveries[len(j.Recoveries)-1]
	if rec.Scope != RecoveryScopeJob || len(rec.Tasks) != len(j.Tasks) || rec.DetectedAt != cmd.DetectedAt {
		t.Fatalf("recovery record %+v, want scope job over all %d tasks", rec, len(j.Tasks))
	}
}

// The recovery scope of a spec defaults to tasks and is either tasks or job.
func TestRecoveryScopeSpec(t *testing.T) {
	for _, tc := range []struct {
		json, want, err string
	}{
		{`{}`, RecoveryScopeTasks, ""},
		{`{"recovery": {"scope": "job"}}`, RecoveryScopeJob, ""},
		{`{"recovery": {"scope": "tasks"}}`, RecoveryScopeTasks, ""},
		{`{"recovery": {"scope": "region"}}`, "", "recovery.scope"},
		{`{"recovery": {"scope": ""}}`, "", "recovery.scope"},
	} {
		doc := `{"name": "wc", "source": {"brokers": ["localhost:9092"], "topic": "words", "parallelism": 1},
			"operator": {"name": "count", "parallelism": 1}`
		if tc.json != `{}` {
			doc += `, ` + tc.json[1:len(tc.json)-1]
		}
		doc += `}`
		spec, err := ParseJobSpec([]byte(doc), knownOps)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: err %v, want one naming %s", tc.json, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.json, err)
		}
		if spec.Recovery.Scope != tc.want {
			t.Errorf("%s: scope %q, want %q", tc.json, spec.Recovery.Scope, tc.want)
		}
	}
}
