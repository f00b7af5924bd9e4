package fsm

import (
	"bytes"
	"testing"
)

// An abort that is not the tasks' doing (a leader change) does not count
// toward tolerable_failures; a timeout does.
func TestUncountedAbortKeepsConsecutiveAborts(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	cp := h.triggered("j1")
	h.must(CommandCheckpointAborted, CheckpointAbortedCmd{JobID: "j1", CheckpointID: cp, Reason: "leader changed", Time: h.tick(), NotCounted: true})
	if got := h.job("j1").ConsecutiveAborts; got != 0 {
		t.Fatalf("after an uncounted abort ConsecutiveAborts = %d, want 0", got)
	}
	cp = h.triggered("j1")
	h.must(CommandCheckpointAborted, h.abort("j1", cp, "timed out"))
	if got := h.job("j1").ConsecutiveAborts; got != 1 {
		t.Fatalf("after a counted abort ConsecutiveAborts = %d, want 1", got)
	}
	if a := h.job("j1").Aborted; len(a) != 2 || a[0].Reason != "leader changed" {
		t.Fatalf("aborted history = %+v, want both aborts with their reasons", a)
	}
}

// The checkpoint an attempt restores from is replicated, and must be one of
// the job's retained completed checkpoints.
func TestRestartRecordsRestoreCheckpoint(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	cp := h.checkpointed("j1")

	bad := h.restart("j1", 2, j.Tasks, "worker lost")
	bad.RestoreFrom = cp + 7
	if _, err := h.apply(CommandJobRestarted, bad); err == nil {
		t.Fatal("restart from a checkpoint that does not exist was accepted")
	} else {
		wantErr(t, err, ErrInvalidAssignment)
	}

	good := h.restart("j1", 2, j.Tasks, "worker lost")
	good.RestoreFrom = cp
	h.must(CommandJobRestarted, good)
	if got := h.job("j1").RestoredFrom; got != cp {
		t.Fatalf("RestoredFrom = %d, want %d", got, cp)
	}
	h.must(CommandJobRestarted, h.restart("j1", 3, j.Tasks, "fresh"))
	if got := h.job("j1").RestoredFrom; got != 0 {
		t.Fatalf("RestoredFrom after a fresh restart = %d, want 0", got)
	}
}

// A map state must cover its task's key groups when it says which it covers,
// and must fit the inline limit.
func TestMapStateKeyGroupsAndSize(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	var mapTask Task
	for _, task := range j.Tasks {
		if task.Kind == TaskMap {
			mapTask = task
			break
		}
	}

	cp := h.triggered("j1")
	states := statesFor(j.Tasks, 1)
	st := states[mapTask.ID]
	st.KeyGroups = &KeyGroupRange{Start: mapTask.KeyGroups.Start, End: mapTask.KeyGroups.End + 1}
	states[mapTask.ID] = st
	_, err := h.apply(CommandCheckpointCompleted, h.complete("j1", j.Attempt, cp, states))
	wantErr(t, err, ErrIncompleteStates)

	// Checked on the state directly: a 64 MiB command takes long to encode
	// under the race detector, and the size check needs no Raft entry.
	st = statesFor(j.Tasks, 1)[mapTask.ID]
	st.Keyed = bytes.Repeat([]byte{1}, MaxInlineStateBytes+1)
	st.KeyedSHA256 = sha256Hex(st.Keyed)
	wantErr(t, checkState(mapTask, st), ErrStateTooLarge, ErrIncompleteStates)

	states = statesFor(j.Tasks, 1)
	st = states[mapTask.ID]
	kg := *mapTask.KeyGroups
	st.KeyGroups = &kg
	states[mapTask.ID] = st
	h.must(CommandCheckpointCompleted, h.complete("j1", j.Attempt, cp, states))
	last, _ := h.f.LastCompleted("j1")
	if got := last.Tasks[mapTask.ID].KeyGroups; got == nil || *got != kg {
		t.Fatalf("completed state's key groups = %v, want %v", got, kg)
	}
}
