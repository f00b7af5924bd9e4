package fsm

import (
	"fmt"
	"testing"
)

// A job keeps a bounded history of its attempts and of its finished
// checkpoints, beyond the retained ones, for the dashboard.
func TestAttemptAndCheckpointHistory(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	spec := testSpec()

	var want []CheckpointSummary
	for i := range MaxCheckpointHistory + 5 {
		if i%7 == 3 {
			cp := h.triggered("j1")
			cmd := h.abort("j1", cp, fmt.Sprintf("declined %d", i))
			h.must(CommandCheckpointAborted, cmd)
			j := h.job("j1")
			want = append(want, CheckpointSummary{ID: cp, Attempt: j.Attempt, Status: CheckpointAborted,
				TriggeredAt: j.Aborted[len(j.Aborted)-1].TriggeredAt, EndedAt: cmd.Time, Reason: cmd.Reason})
			continue
		}
		cp := h.checkpointed("j1")
		j := h.job("j1")
		done := j.Completed[len(j.Completed)-1]
		var bytes int64
		for _, st := range done.Tasks {
			bytes += int64(len(st.Keyed))
		}
		want = append(want, CheckpointSummary{ID: cp, Attempt: j.Attempt, Status: CheckpointCompleted,
			TriggeredAt: done.TriggeredAt, EndedAt: done.EndedAt, StateBytes: bytes})
	}
	j := h.job("j1")
	if len(j.History) != MaxCheckpointHistory {
		t.Fatalf("history holds %d checkpoints, want the last %d", len(j.History), MaxCheckpointHistory)
	}
	want = want[len(want)-MaxCheckpointHistory:]
	for i, got := range j.History {
		if got != want[i] {
			t.Fatalf("history[%d] = %+v, want %+v", i, got, want[i])
		}
	}
	if len(j.Completed) != spec.Checkpoint.Retained {
		t.Fatalf("%d completed checkpoints retained, want %d: the history must not keep state", len(j.Completed), spec.Checkpoint.Retained)
	}

	for attempt := uint64(2); attempt < MaxAttemptHistory+5; attempt++ {
		restore := h.job("j1").Completed[0].ID
		cmd := h.restart("j1", attempt, assignment(spec, "w2"), fmt.Sprintf("worker lost %d", attempt))
		cmd.RestoreFrom = restore
		h.must(CommandJobRestarted, cmd)
		h.checkpointed("j1")
	}
	j = h.job("j1")
	if len(j.Attempts) != MaxAttemptHistory {
		t.Fatalf("%d attempts kept, want %d", len(j.Attempts), MaxAttemptHistory)
	}
	last := j.Attempts[len(j.Attempts)-1]
	if last.Attempt != j.Attempt || last.Reason != fmt.Sprintf("worker lost %d", j.Attempt) || last.RestoredFrom == 0 || last.StartedAt == 0 {
		t.Fatalf("newest attempt record = %+v (job at attempt %d)", last, j.Attempt)
	}
	if first := j.Attempts[0]; first.Attempt != j.Attempt-MaxAttemptHistory+1 {
		t.Fatalf("oldest attempt kept is %d, want %d", first.Attempt, j.Attempt-MaxAttemptHistory+1)
	}
	// The restart aborted nothing here, but a restart with a pending
	// checkpoint records its abort.
	pending := h.triggered("j1")
	h.must(CommandJobRestarted, h.restart("j1", j.Attempt+1, assignment(spec, "w1"), "worker w2 lost"))
	j = h.job("j1")
	if got := j.History[len(j.History)-1]; got.ID != pending || got.Status != CheckpointAborted || got.Reason != "job restarted: worker w2 lost" {
		t.Fatalf("history after a restart with a pending checkpoint ends with %+v", got)
	}
}

// Record counts in a task's state are checked like the rest of it.
func TestNegativeRecordCountsRefused(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	cp := h.triggered("j1")
	states := statesFor(j.Tasks, 1)
	st := states[j.Tasks[0].ID]
	st.RecordsIn = -1
	states[j.Tasks[0].ID] = st
	_, err := h.apply(CommandCheckpointCompleted, h.complete("j1", j.Attempt, cp, states))
	wantErr(t, err, ErrIncompleteStates)
}
