package fsm

import (
	"fmt"
	"strings"
	"testing"
)

// filesFor replaces the inline state of every map task with a chain of two
// file handles (a full file and a delta).
func filesFor(tasks []Task, states map[string]TaskState, cp uint64) {
	for _, t := range tasks {
		if t.Kind != TaskMap {
			continue
		}
		st := states[t.ID]
		st.Keyed, st.KeyedSHA256 = nil, ""
		kg := *t.KeyGroups
		st.KeyGroups = &kg
		st.Applied = map[int32]int64{0: int64(cp) * 10}
		st.ValueEncoding, st.Keys, st.StateBytes = "int64", 42, 100
		for i, full := range []bool{true, false} {
			path := fmt.Sprintf("checkpoints/j/chk-%d/%s-%d.cfs", cp, t.ID, i)
			st.Files = append(st.Files, StateFile{Path: path, Size: 100, SHA256: sha256Hex([]byte(path)), KeyGroups: kg, Full: full})
		}
		states[t.ID] = st
	}
}

// checkpointedWithFiles completes a checkpoint of id whose map state is in files.
func (h *harness) checkpointedWithFiles(id string) uint64 {
	h.t.Helper()
	cp := h.triggered(id)
	j := h.job(id)
	states := statesFor(j.Tasks, int64(cp))
	filesFor(j.Tasks, states, cp)
	h.must(CommandCheckpointCompleted, h.complete(id, j.Attempt, cp, states))
	return cp
}

// savepointed takes a savepoint of id (stopping the job with stop) and
// returns it.
func (h *harness) savepointed(id string, stop bool) Savepoint {
	h.t.Helper()
	j := h.job(id)
	trig := h.trigger(id, j.Attempt)
	trig.Savepoint, trig.Stop = true, stop
	cp := h.must(CommandCheckpointTriggered, trig).(uint64)
	states := statesFor(j.Tasks, int64(cp))
	filesFor(j.Tasks, states, cp)
	c := h.complete(id, j.Attempt, cp, states)
	c.Location = "file:///sp/" + id
	h.must(CommandCheckpointCompleted, c)
	sp, ok := h.f.Savepoint(SavepointID(id, cp))
	if !ok {
		h.t.Fatalf("savepoint %s not kept", SavepointID(id, cp))
	}
	return sp
}

func TestFileStates(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j")
	cp := h.checkpointedWithFiles("j")
	last, _ := h.f.LastCompleted("j")
	if last.ID != cp {
		t.Fatalf("last completed %d, want %d", last.ID, cp)
	}
	for id, st := range last.Tasks {
		if st.Kind == TaskMap && (len(st.Files) != 2 || !st.Files[0].Full || st.Applied[0] != int64(cp)*10 || st.Keys != 42) {
			t.Fatalf("state of %s = %+v, want its two files, applied offsets and key count", id, st)
		}
	}

	bad := map[string]func(*TaskState){
		"inline and files":  func(st *TaskState) { st.Keyed, st.KeyedSHA256 = []byte("x"), sha256Hex([]byte("x")) },
		"delta first":       func(st *TaskState) { st.Files[0].Full = false },
		"empty path":        func(st *TaskState) { st.Files[1].Path = "" },
		"zero size":         func(st *TaskState) { st.Files[0].Size = 0 },
		"bad sha256":        func(st *TaskState) { st.Files[0].SHA256 = "abc" },
		"empty key groups":  func(st *TaskState) { st.Files[0].KeyGroups = KeyGroupRange{Start: 3, End: 3} },
		"foreign key group": func(st *TaskState) { st.Files[1].KeyGroups = KeyGroupRange{Start: 100, End: 101} },
		"state of other key groups": func(st *TaskState) {
			kg := *st.KeyGroups
			kg.End++
			st.KeyGroups = &kg
		},
		"too many files": func(st *TaskState) {
			for len(st.Files) <= MaxStateFiles {
				st.Files = append(st.Files, st.Files[1])
			}
		},
	}
	for name, breakIt := range bad {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			j := h.runningJob("j")
			cp := h.triggered("j")
			states := statesFor(j.Tasks, int64(cp))
			filesFor(j.Tasks, states, cp)
			st := states["map-1"]
			breakIt(&st)
			states["map-1"] = st
			before := h.digest()
			_, err := h.apply(CommandCheckpointCompleted, h.complete("j", 1, cp, states))
			wantErr(t, err, ErrIncompleteStates)
			if !strings.Contains(err.Error(), "map-1") {
				t.Fatalf("error %q does not name the task", err)
			}
			if h.digest() != before {
				t.Fatal("a rejected completion changed the state")
			}
		})
	}
}

func TestSavepoints(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j")
	cp := h.checkpointedWithFiles("j")
	sp := h.savepointed("j", false)
	j := h.job("j")
	if j.Status != JobRunning || j.Pending != nil || len(j.Completed) != 1 || j.Completed[0].ID != cp {
		t.Fatalf("after a savepoint the job is %s with pending %v and completed %v; want running, none, only checkpoint %d",
			j.Status, j.Pending, j.Completed, cp)
	}
	if sp.CheckpointID != cp+1 || sp.Location != "file:///sp/j" || sp.Topic != "words" || sp.MaxParallelism != 8 || len(sp.Tasks) != 5 {
		t.Fatalf("savepoint = %+v", sp)
	}
	// Checkpoint ids go on after the savepoint's.
	if next := h.triggered("j"); next != cp+2 {
		t.Fatalf("next checkpoint %d, want %d", next, cp+2)
	}
	h.must(CommandCheckpointAborted, h.abort("j", cp+2, "test"))

	// A job from the savepoint must read the same topic with the same key
	// groups; parallelism may differ.
	spec := testSpec()
	spec.Operator.Parallelism = 1
	ok := h.register("copy", spec)
	ok.FromSavepoint = &sp
	h.must(CommandRegisterJob, ok)
	if got := h.job("copy").FromSavepoint; got == nil || got.ID != sp.ID {
		t.Fatalf("job from savepoint records %v", got)
	}
	for name, edit := range map[string]func(*JobSpec){
		"other topic":           func(s *JobSpec) { s.Source.Topic = "other" },
		"other max parallelism": func(s *JobSpec) { s.Operator.MaxParallelism = 16 },
	} {
		spec := testSpec()
		edit(&spec)
		c := h.register("bad-"+strings.ReplaceAll(name, " ", "-"), spec)
		c.FromSavepoint = &sp
		_, err := h.apply(CommandRegisterJob, c)
		wantErr(t, err, ErrInvalidSpec)
	}

	// Stop with a savepoint cancels the job in the same command.
	final := h.savepointed("j", true)
	if j := h.job("j"); j.Status != JobCancelled || !strings.Contains(j.Reason, final.ID) {
		t.Fatalf("after the final savepoint the job is %s (%q), want cancelled naming %s", j.Status, j.Reason, final.ID)
	}
	if len(h.f.Savepoints()) != 2 {
		t.Fatalf("%d savepoints kept, want 2", len(h.f.Savepoints()))
	}
	h.must(CommandSavepointDeleted, SavepointDeletedCmd{ID: sp.ID, Time: h.tick()})
	_, err := h.apply(CommandSavepointDeleted, SavepointDeletedCmd{ID: sp.ID, Time: h.tick()})
	wantErr(t, err, ErrNoSuchSavepoint)
	if got := h.f.Savepoints(); len(got) != 1 || got[0].ID != final.ID {
		t.Fatalf("savepoints after delete: %v", got)
	}

	// Stop without savepoint is malformed.
	h.runningJob("k")
	trig := h.trigger("k", 1)
	trig.Stop = true
	_, err = h.apply(CommandCheckpointTriggered, trig)
	wantErr(t, err, ErrMalformedCommand)
}
