package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

func TestRegisterJob(t *testing.T) {
	h := newHarness(t)
	cmd := h.register("j1", testSpec())
	if res := h.must(CommandRegisterJob, cmd); res != nil {
		t.Fatalf("RegisterJob returned %v, want nil", res)
	}
	j := h.job("j1")
	if j.Status != JobPending || j.Attempt != 0 || j.SubmittedAt != cmd.Time || j.UpdatedAt != cmd.Time {
		t.Fatalf("registered job = %+v", j)
	}
	if !reflect.DeepEqual(j.Spec, cmd.Spec) {
		t.Fatalf("spec = %+v, want %+v", j.Spec, cmd.Spec)
	}
	if j.Tasks == nil || j.Completed == nil || j.Aborted == nil {
		t.Fatalf("tasks/completed/aborted must be empty, not null: %+v", j)
	}
}

// TestRegisterJobOncePerSubmissionKey: a submission key registers one job
// while that job is kept, whatever its status, and after a snapshot; a
// refused second job leaves the state as it was, but for the mark that the
// log holds keys; a purge frees the key; a snapshot with two jobs of a key
// is refused.
func TestRegisterJobOncePerSubmissionKey(t *testing.T) {
	h := newHarness(t)
	first := h.register("j1", testSpec())
	first.SubmissionKey = "6f1c2a9e-run-1"
	h.must(CommandRegisterJob, first)
	if j, ok := h.f.JobBySubmissionKey(first.SubmissionKey); !ok || j.ID != "j1" || j.SubmissionKey != first.SubmissionKey {
		t.Fatalf("JobBySubmissionKey = %+v %v, want j1", j, ok)
	}
	if !h.f.SubmissionKeys() {
		t.Fatal("SubmissionKeys() false after a keyed RegisterJob")
	}
	before := h.digest()
	again := h.register("j2", testSpec())
	again.SubmissionKey = first.SubmissionKey
	_, err := h.apply(CommandRegisterJob, again)
	wantErr(t, err, ErrDuplicateSubmission)
	if !strings.Contains(err.Error(), "job j1") {
		t.Fatalf("refusal %q does not name the job of the key", err)
	}
	if h.digest() != before {
		t.Fatal("a refused RegisterJob changed the state")
	}
	for _, bad := range []string{"has space", strings.Repeat("k", MaxSubmissionKeyLength+1), "tab\t", "é"} {
		cmd := h.register("j3", testSpec())
		cmd.SubmissionKey = bad
		_, err := h.apply(CommandRegisterJob, cmd)
		wantErr(t, err, ErrMalformedCommand)
	}
	// Refused, a keyed RegisterJob still marks the log as holding keys,
	// on a state that had none.
	fresh := newHarness(t)
	bad := fresh.register("j1", testSpec())
	bad.SubmissionKey = "has space"
	_, err = fresh.apply(CommandRegisterJob, bad)
	wantErr(t, err, ErrMalformedCommand)
	if !fresh.f.SubmissionKeys() || len(fresh.f.Jobs()) != 0 {
		t.Fatalf("after a refused keyed RegisterJob: SubmissionKeys %v, %d jobs; want the mark and no job", fresh.f.SubmissionKeys(), len(fresh.f.Jobs()))
	}
	h.must(CommandRegisterJob, h.register("j3", testSpec())) // no key, no check

	restored := New()
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatal(err)
	}
	if j, ok := restored.JobBySubmissionKey(first.SubmissionKey); !ok || j.ID != "j1" || !restored.SubmissionKeys() {
		t.Fatalf("after a restore: JobBySubmissionKey = %+v %v, SubmissionKeys %v", j, ok, restored.SubmissionKeys())
	}

	dup := newHarness(t)
	for id, key := range map[string]string{"a": "key-a", "b": "key-b"} {
		cmd := dup.register(id, testSpec())
		cmd.SubmissionKey = key
		dup.must(CommandRegisterJob, cmd)
	}
	data := bytes.ReplaceAll(persist(t, dup.f), []byte(`"key-b"`), []byte(`"key-a"`))
	if err := New().Restore(readCloser(data)); !errors.Is(err, ErrCorruptSnapshot) || !strings.Contains(err.Error(), "same submission key") {
		t.Fatalf("restore of a snapshot with two jobs of a key: %v, want ErrCorruptSnapshot naming it", err)
	}

	h.must(CommandJobCancelled, JobCancelledCmd{JobID: "j1", Reason: "user request", Time: h.tick()})
	_, err = h.apply(CommandRegisterJob, again)
	wantErr(t, err, ErrDuplicateSubmission)
	h.must(CommandJobPurged, JobPurgedCmd{JobID: "j1", Time: h.tick()})
	h.must(CommandRegisterJob, again)
	if j, ok := h.f.JobBySubmissionKey(first.SubmissionKey); !ok || j.ID != "j2" {
		t.Fatalf("after the purge of j1: JobBySubmissionKey = %+v %v, want j2", j, ok)
	}
}

func TestJobRestarted(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	if j.Status != JobRunning || j.Attempt != 1 || j.Restarts != 0 || j.Reason != "deployed" {
		t.Fatalf("after first deploy: %+v", j)
	}
	if len(j.Tasks) != 5 {
		t.Fatalf("got %d tasks, want 5", len(j.Tasks))
	}

	cp := h.triggered("j1")
	h.must(CommandCheckpointAborted, h.abort("j1", cp, "timeout"))
	pending := h.triggered("j1")
	spec := testSpec()
	cmd := h.restart("j1", 2, assignment(spec, "w2"), "worker w1 lost")
	h.must(CommandJobRestarted, cmd)

	j = h.job("j1")
	if j.Attempt != 2 || j.Restarts != 1 || j.Status != JobRunning || j.Reason != "worker w1 lost" || j.ConsecutiveAborts != 0 {
		t.Fatalf("after restart: %+v", j)
	}
	if j.Pending != nil {
		t.Fatalf("pending checkpoint survived the restart: %+v", j.Pending)
	}
	last := j.Aborted[len(j.Aborted)-1]
	if last.ID != pending || last.Status != CheckpointAborted || last.Reason != "job restarted: worker w1 lost" || last.EndedAt != cmd.Time {
		t.Fatalf("aborted by restart = %+v", last)
	}
	for _, task := range j.Tasks {
		if task.Worker != "w2" {
			t.Fatalf("task %s on %s, want w2", task.ID, task.Worker)
		}
	}
	if j.UpdatedAt != cmd.Time {
		t.Fatalf("UpdatedAt = %d, want %d", j.UpdatedAt, cmd.Time)
	}
}

func TestJobStatus(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	for _, st := range []JobStatus{JobFailing, JobRestarting, JobPending, JobRunning} {
		cmd := JobStatusCmd{JobID: "j1", Status: st, Reason: "because " + string(st), Time: h.tick()}
		h.must(CommandJobStatus, cmd)
		j := h.job("j1")
		if j.Status != st || j.Reason != cmd.Reason || j.UpdatedAt != cmd.Time || j.Attempt != 1 {
			t.Fatalf("after status %s: %+v", st, j)
		}
	}
}

func TestCheckpointLifecycle(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")

	trig := h.trigger("j1", 1)
	res := h.must(CommandCheckpointTriggered, trig)
	if res != uint64(1) {
		t.Fatalf("first checkpoint id = %v (%T), want uint64(1)", res, res)
	}
	j := h.job("j1")
	want := &Checkpoint{ID: 1, Attempt: 1, Status: CheckpointPending, TriggeredAt: trig.Time}
	if !reflect.DeepEqual(j.Pending, want) || j.LastCheckpointID != 1 {
		t.Fatalf("pending = %+v, last id %d", j.Pending, j.LastCheckpointID)
	}

	states := statesFor(j.Tasks, 1)
	done := h.complete("j1", 1, 1, states)
	h.must(CommandCheckpointCompleted, done)
	j = h.job("j1")
	if j.Pending != nil || len(j.Completed) != 1 || j.ConsecutiveAborts != 0 {
		t.Fatalf("after complete: %+v", j)
	}
	got, ok := h.f.LastCompleted("j1")
	if !ok {
		t.Fatal("no last completed checkpoint")
	}
	wantCP := Checkpoint{ID: 1, Attempt: 1, Status: CheckpointCompleted, TriggeredAt: trig.Time, EndedAt: done.Time, Tasks: states}
	if !reflect.DeepEqual(got, wantCP) {
		t.Fatalf("last completed = %+v\nwant %+v", got, wantCP)
	}

	abortAt := h.triggered("j1")
	ab := h.abort("j1", abortAt, "timeout after 30s")
	if res := h.must(CommandCheckpointAborted, ab); res != nil {
		t.Fatalf("CheckpointAborted returned %v, want nil", res)
	}
	j = h.job("j1")
	wantAb := Checkpoint{ID: 2, Attempt: 1, Status: CheckpointAborted, TriggeredAt: ab.Time - 1e9, EndedAt: ab.Time, Reason: "timeout after 30s"}
	if j.Pending != nil || j.ConsecutiveAborts != 1 || !reflect.DeepEqual(j.Aborted, []Checkpoint{wantAb}) {
		t.Fatalf("after abort: pending %+v, aborts %d, aborted %+v", j.Pending, j.ConsecutiveAborts, j.Aborted)
	}
	if cp := h.checkpointed("j1"); cp != 3 {
		t.Fatalf("checkpoint after an abort got id %d, want 3", cp)
	}
	if j = h.job("j1"); j.ConsecutiveAborts != 0 {
		t.Fatalf("a completed checkpoint must reset ConsecutiveAborts, got %d", j.ConsecutiveAborts)
	}
}

func TestRetainedTrimming(t *testing.T) {
	for _, retained := range []int{1, 2, 3} {
		h := newHarness(t)
		spec := testSpec()
		spec.Checkpoint.Retained = retained
		h.must(CommandRegisterJob, h.register("j1", spec))
		h.must(CommandJobRestarted, h.restart("j1", 1, assignment(spec, "w1"), ""))
		for n := 1; n <= 5; n++ {
			h.checkpointed("j1")
			j := h.job("j1")
			if want := min(n, retained); len(j.Completed) != want {
				t.Fatalf("retained %d, after %d checkpoints: %d kept, want %d", retained, n, len(j.Completed), want)
			}
			if last := j.Completed[len(j.Completed)-1].ID; last != uint64(n) {
				t.Fatalf("newest completed is %d, want %d", last, n)
			}
		}
	}
}

// A state restored from an older build may hold Retained 0; trimming must
// still keep the newest checkpoint.
func TestRetainedNeverBelowOne(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	h.f.state.Jobs["j1"].Spec.Checkpoint.Retained = 0
	h.checkpointed("j1")
	h.checkpointed("j1")
	if j := h.job("j1"); len(j.Completed) != 1 || j.Completed[0].ID != 2 {
		t.Fatalf("completed = %+v, want only checkpoint 2", j.Completed)
	}
}

func TestAbortedHistoryBounded(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	for range MaxAbortedHistory + 5 {
		h.must(CommandCheckpointAborted, h.abort("j1", h.triggered("j1"), "declined"))
	}
	j := h.job("j1")
	if len(j.Aborted) != MaxAbortedHistory {
		t.Fatalf("%d aborted kept, want %d", len(j.Aborted), MaxAbortedHistory)
	}
	if first := j.Aborted[0].ID; first != 6 {
		t.Fatalf("oldest aborted kept is %d, want 6", first)
	}
	if j.ConsecutiveAborts != MaxAbortedHistory+5 {
		t.Fatalf("ConsecutiveAborts = %d", j.ConsecutiveAborts)
	}
}

func TestJobCancelled(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	h.checkpointed("j1")
	pending := h.triggered("j1")
	cmd := JobCancelledCmd{JobID: "j1", Reason: "user request", Time: h.tick()}
	h.must(CommandJobCancelled, cmd)

	j := h.job("j1")
	if j.Status != JobCancelled || j.Reason != "user request" || j.Pending != nil || j.UpdatedAt != cmd.Time {
		t.Fatalf("after cancel: %+v", j)
	}
	if last := j.Aborted[len(j.Aborted)-1]; last.ID != pending || last.Reason != "job cancelled" {
		t.Fatalf("pending checkpoint not aborted by the cancel: %+v", last)
	}
	if cp, ok := h.f.LastCompleted("j1"); !ok || cp.ID != 1 {
		t.Fatalf("completed checkpoint of a cancelled job must stay readable, got %+v %v", cp, ok)
	}
}

// A purged job is gone from every read, its savepoint stays, the count of
// purged jobs survives a snapshot, and nothing can address the job again.
func TestJobPurged(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	h.runningJob("j2")
	h.checkpointed("j1")
	sp := h.savepointed("j1", true) // stops j1: cancelled
	if j := h.job("j1"); j.Status != JobCancelled {
		t.Fatalf("j1 after stop with savepoint: %s", j.Status)
	}
	var changed []string
	h.f.OnJobChange(func(ids []string) { changed = append(changed, ids...) })
	before := persist(t, h.f)

	h.must(CommandJobPurged, JobPurgedCmd{JobID: "j1", Time: h.tick()})

	if _, ok := h.f.Job("j1"); ok {
		t.Fatal("purged job j1 still readable")
	}
	if _, ok := h.f.LastCompleted("j1"); ok {
		t.Fatal("purged job j1 still has a completed checkpoint")
	}
	if jobs := h.f.Jobs(); len(jobs) != 1 || jobs[0].ID != "j2" {
		t.Fatalf("jobs after purging j1: %+v, want j2 alone", jobs)
	}
	if _, ok := h.f.Savepoint(sp.ID); !ok {
		t.Fatalf("savepoint %s of the purged job dropped: savepoints go only when deleted", sp.ID)
	}
	if len(changed) != 1 || changed[0] != "j1" {
		t.Fatalf("OnJobChange after the purge reported %v, want [j1]", changed)
	}
	if got := h.f.Purged(); got != 1 {
		t.Fatalf("Purged() = %d, want 1", got)
	}
	_, err := h.apply(CommandJobPurged, JobPurgedCmd{JobID: "j1", Time: h.tick()})
	wantErr(t, err, ErrNoSuchJob)
	_, err = h.apply(CommandCheckpointTriggered, h.trigger("j1", 1))
	wantErr(t, err, ErrNoSuchJob)

	restored := New()
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatal(err)
	}
	if got := restored.Purged(); got != 1 {
		t.Fatalf("Purged() after a restore = %d, want 1", got)
	}
	if mustDigest(t, restored) != h.digest() {
		t.Fatal("restored state differs from the state it was taken of")
	}

	// A replica that catches up by a snapshot taken after the purge hears
	// of the job gone, as Apply of the purge would have told it.
	lagging := New()
	if err := lagging.Restore(readCloser(before)); err != nil {
		t.Fatal(err)
	}
	var gone []string
	lagging.OnJobChange(func(ids []string) { gone = append(gone, ids...) })
	if err := lagging.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatal(err)
	}
	if len(gone) != 1 || gone[0] != "j1" {
		t.Fatalf("Restore of a state without j1 reported %v, want [j1]", gone)
	}

	// The id stays taken while the purged job's savepoint is kept: a new
	// job of that id would take the savepoint's ids and paths.
	_, err = h.apply(CommandRegisterJob, h.register("j1", testSpec()))
	wantErr(t, err, ErrJobExists)
	h.must(CommandSavepointDeleted, SavepointDeletedCmd{ID: sp.ID, Time: h.tick()})
	h.must(CommandRegisterJob, h.register("j1", testSpec()))
}

// Checkpoint ids only grow: across aborts, restarts and a snapshot/restore.
func TestCheckpointIDsOnlyGrow(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	spec := testSpec()
	var last uint64
	next := func(what string, id uint64) {
		t.Helper()
		if id <= last {
			t.Fatalf("%s: checkpoint id %d after %d", what, id, last)
		}
		last = id
	}
	next("complete", h.checkpointed("j1"))
	id := h.triggered("j1")
	next("trigger", id)
	h.must(CommandCheckpointAborted, h.abort("j1", id, "timeout"))
	next("after abort", h.triggered("j1"))
	h.must(CommandJobRestarted, h.restart("j1", 2, assignment(spec, "w3"), "lost w1"))
	next("after restart", h.checkpointed("j1"))

	restored := New()
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatal(err)
	}
	h.f = restored
	next("after restore", h.triggered("j1"))
}

// TestCheckpointTriggeredWithChosenID: a trigger may carry the id the
// leader chose (so that it can send the trigger before the command
// commits): an id above every one issued is taken, the ids it skipped are
// never issued after it, and one not above them is refused without a
// change. The state says from then on that the log holds chosen ids, across
// a snapshot, and replicas that apply the same commands agree.
func TestCheckpointTriggeredWithChosenID(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	first := h.checkpointed("j1")
	if h.f.ChosenCheckpointIDs() {
		t.Fatal("the state says chosen ids before any was applied")
	}
	// A refused one marks the log too: an older build would have taken it.
	_, err := h.apply(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: first})
	wantErr(t, err, ErrCheckpointIDUsed)
	if !h.f.ChosenCheckpointIDs() {
		t.Fatal("the state does not say chosen ids after one was refused")
	}
	chosen := CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: first + 2}
	if res := h.must(CommandCheckpointTriggered, chosen); res != first+2 {
		t.Fatalf("trigger with id %d returned %v", first+2, res)
	}
	if j := h.job("j1"); j.Pending == nil || j.Pending.ID != first+2 || j.LastCheckpointID != first+2 {
		t.Fatalf("after the chosen id %d: pending %+v, last issued %d", first+2, j.Pending, j.LastCheckpointID)
	}
	if !h.f.ChosenCheckpointIDs() {
		t.Fatal("the state does not say chosen ids after one was applied")
	}
	if j := h.job("j1"); len(j.Aborted) != 1 || j.Aborted[0].ID != first+1 || j.Aborted[0].Reason != SkippedReason {
		t.Fatalf("the skipped id %d is not in the aborted history: %+v", first+1, j.Aborted)
	}
	h.must(CommandCheckpointAborted, h.abort("j1", first+2, "timeout"))

	// A far jump records only the newest skipped ids, as many as the
	// history keeps.
	far := first + 3 + 10*MaxAbortedHistory
	h.must(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: far})
	if j := h.job("j1"); len(j.Aborted) != MaxAbortedHistory || j.Aborted[0].ID != far-MaxAbortedHistory || j.Aborted[len(j.Aborted)-1].ID != far-1 {
		t.Fatalf("after a jump to %d: %d aborted, %d..%d", far, len(j.Aborted), j.Aborted[0].ID, j.Aborted[len(j.Aborted)-1].ID)
	}
	h.must(CommandCheckpointAborted, h.abort("j1", far, "timeout"))

	before := h.digest()
	for _, id := range []uint64{first + 1, far - 1, far} {
		_, err := h.apply(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: id})
		wantErr(t, err, ErrCheckpointIDUsed)
		if !strings.Contains(err.Error(), fmt.Sprintf("id %d, last issued %d", id, far)) {
			t.Fatalf("refusal of id %d: %v; want the id and the last issued named", id, err)
		}
	}
	_, err = h.apply(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: math.MaxUint64})
	wantErr(t, err, ErrMalformedCommand)
	if h.digest() != before {
		t.Fatal("a refused trigger changed the state")
	}
	if next := h.triggered("j1"); next != far+1 {
		t.Fatalf("the next id the FSM takes is %d, want %d", next, far+1)
	}

	restored := New()
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatal(err)
	}
	if !restored.ChosenCheckpointIDs() || mustDigest(t, restored) != h.digest() {
		t.Fatal("a restored state lost the chosen ids' mark or differs")
	}
}

func TestNonCommandEntriesSkipped(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	before := h.digest()
	for _, typ := range []raft.LogType{raft.LogNoop, raft.LogConfiguration, raft.LogBarrier} {
		if res := h.f.Apply(&raft.Log{Type: typ, Data: []byte{0xff, 0x00}}); res != nil {
			t.Fatalf("log type %v: got %v, want nil", typ, res)
		}
	}
	if h.digest() != before {
		t.Fatal("a non-command entry changed the state")
	}
}

// TestRejections checks every rule: each bad command is rejected with its
// sentinel, and leaves the state exactly as it was.
func TestRejections(t *testing.T) {
	spec := testSpec()
	badSpec := spec
	badSpec.Source.Parallelism = 0

	// withTasks returns a restart of j1 to attempt 2 whose tasks edit changed.
	withTasks := func(edit func([]Task) []Task) func(h *harness) (CommandType, any) {
		return func(h *harness) (CommandType, any) {
			return CommandJobRestarted, h.restart("j1", 2, edit(assignment(spec, "w1", "w2")), "")
		}
	}
	// withStates returns a completion of j1's pending checkpoint whose states edit changed.
	withStates := func(edit func(map[string]TaskState)) func(h *harness) (CommandType, any) {
		return func(h *harness) (CommandType, any) {
			j := h.job("j1")
			states := statesFor(j.Tasks, 7)
			edit(states)
			return CommandCheckpointCompleted, h.complete("j1", 1, j.Pending.ID, states)
		}
	}
	editState := func(id string, edit func(*TaskState)) func(map[string]TaskState) {
		return func(states map[string]TaskState) {
			st := states[id]
			edit(&st)
			states[id] = st
		}
	}

	tests := []struct {
		name  string
		setup string // "", "registered", "running", "pending", "cancelled"
		cmd   func(h *harness) (CommandType, any)
		want  []error
		text  string // the error must contain this, if set
	}{
		// RegisterJob
		{"register without id", "", func(h *harness) (CommandType, any) {
			return CommandRegisterJob, h.register("", spec)
		}, []error{ErrMalformedCommand}, ""},
		{"register id with slash", "", func(h *harness) (CommandType, any) {
			return CommandRegisterJob, h.register("a/b", spec)
		}, []error{ErrMalformedCommand}, ""},
		{"register twice", "registered", func(h *harness) (CommandType, any) {
			return CommandRegisterJob, h.register("j1", spec)
		}, []error{ErrJobExists}, ""},
		{"register invalid spec", "", func(h *harness) (CommandType, any) {
			return CommandRegisterJob, h.register("j2", badSpec)
		}, []error{ErrInvalidSpec}, "source.parallelism: must be at least 1"},

		// JobRestarted
		{"restart unknown job", "", func(h *harness) (CommandType, any) {
			return CommandJobRestarted, h.restart("nope", 1, assignment(spec, "w1"), "")
		}, []error{ErrNoSuchJob}, ""},
		{"restart same attempt", "running", func(h *harness) (CommandType, any) {
			return CommandJobRestarted, h.restart("j1", 1, assignment(spec, "w1"), "")
		}, []error{ErrStaleAttempt}, ""},
		{"restart skipping an attempt", "running", func(h *harness) (CommandType, any) {
			return CommandJobRestarted, h.restart("j1", 3, assignment(spec, "w1"), "")
		}, []error{ErrStaleAttempt}, ""},
		{"restart cancelled job", "cancelled", func(h *harness) (CommandType, any) {
			return CommandJobRestarted, h.restart("j1", 2, assignment(spec, "w1"), "")
		}, []error{ErrJobCancelled}, ""},
		{"restart missing a task", "running", withTasks(func(ts []Task) []Task { return ts[1:] }), []error{ErrInvalidAssignment}, ""},
		{"restart task without worker", "running", withTasks(func(ts []Task) []Task { ts[2].Worker = ""; return ts }), []error{ErrInvalidAssignment}, "map-0"},
		{"restart task with wrong id", "running", withTasks(func(ts []Task) []Task { ts[0].ID = "src-0"; return ts }), []error{ErrInvalidAssignment}, ""},
		{"restart unknown kind", "running", withTasks(func(ts []Task) []Task { ts[0].Kind = "sink"; return ts }), []error{ErrInvalidAssignment}, ""},
		{"restart duplicate index", "running", withTasks(func(ts []Task) []Task {
			ts[1].Index, ts[1].ID = 0, "source-0"
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart index out of range", "running", withTasks(func(ts []Task) []Task {
			ts[1].Index, ts[1].ID = 2, "source-2"
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart overlapping partitions", "running", withTasks(func(ts []Task) []Task {
			ts[0].Partitions = append(ts[0].Partitions, ts[0].Partitions[0])
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart partition of another task", "running", withTasks(func(ts []Task) []Task {
			ts[0].Partitions = append(ts[0].Partitions, 1)
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart negative partition", "running", withTasks(func(ts []Task) []Task {
			ts[0].Partitions = []int32{-2}
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart source with key groups", "running", withTasks(func(ts []Task) []Task {
			ts[0].KeyGroups = &KeyGroupRange{0, 1}
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart map with partitions", "running", withTasks(func(ts []Task) []Task {
			ts[2].Partitions = []int32{0}
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart map without key groups", "running", withTasks(func(ts []Task) []Task {
			ts[3].KeyGroups = nil
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart key group gap", "running", withTasks(func(ts []Task) []Task {
			ts[3].KeyGroups = &KeyGroupRange{ts[3].KeyGroups.Start + 1, ts[3].KeyGroups.End}
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart key groups short of max", "running", withTasks(func(ts []Task) []Task {
			ts[4].KeyGroups = &KeyGroupRange{ts[4].KeyGroups.Start, ts[4].KeyGroups.End - 1}
			return ts
		}), []error{ErrInvalidAssignment}, ""},
		{"restart empty key group range", "running", withTasks(func(ts []Task) []Task {
			ts[2].KeyGroups = &KeyGroupRange{0, 0}
			return ts
		}), []error{ErrInvalidAssignment}, ""},

		// JobStatus
		{"status of unknown job", "", func(h *harness) (CommandType, any) {
			return CommandJobStatus, JobStatusCmd{JobID: "nope", Status: JobFailing}
		}, []error{ErrNoSuchJob}, ""},
		{"status cancelled", "running", func(h *harness) (CommandType, any) {
			return CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobCancelled}
		}, []error{ErrInvalidStatus}, ""},
		{"status unknown", "running", func(h *harness) (CommandType, any) {
			return CommandJobStatus, JobStatusCmd{JobID: "j1", Status: "sleeping"}
		}, []error{ErrInvalidStatus}, ""},
		{"status running before deploy", "registered", func(h *harness) (CommandType, any) {
			return CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobRunning}
		}, []error{ErrNotDeployed}, ""},
		{"status of cancelled job", "cancelled", func(h *harness) (CommandType, any) {
			return CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobFailing}
		}, []error{ErrJobCancelled}, ""},

		// CheckpointTriggered
		{"trigger unknown job", "", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("nope", 1)
		}, []error{ErrNoSuchJob}, ""},
		{"trigger job not deployed", "registered", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("j1", 0)
		}, []error{ErrJobNotRunning}, ""},
		{"trigger stale attempt", "running", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("j1", 0)
		}, []error{ErrStaleAttempt}, ""},
		{"trigger future attempt", "running", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("j1", 2)
		}, []error{ErrStaleAttempt}, ""},
		{"trigger while pending", "pending", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("j1", 1)
		}, []error{ErrCheckpointPending}, ""},
		{"trigger failing job", "running", func(h *harness) (CommandType, any) {
			h.must(CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobFailing, Time: h.tick()})
			return CommandCheckpointTriggered, h.trigger("j1", 1)
		}, []error{ErrJobNotRunning}, ""},
		{"trigger cancelled job", "cancelled", func(h *harness) (CommandType, any) {
			return CommandCheckpointTriggered, h.trigger("j1", 1)
		}, []error{ErrJobCancelled}, ""},

		// CheckpointCompleted
		{"complete unknown job", "", func(h *harness) (CommandType, any) {
			return CommandCheckpointCompleted, h.complete("nope", 1, 1, nil)
		}, []error{ErrNoSuchJob}, ""},
		{"complete without pending", "running", func(h *harness) (CommandType, any) {
			return CommandCheckpointCompleted, h.complete("j1", 1, 1, statesFor(h.job("j1").Tasks, 1))
		}, []error{ErrNoPendingCheckpoint}, ""},
		{"complete wrong id", "pending", func(h *harness) (CommandType, any) {
			return CommandCheckpointCompleted, h.complete("j1", 1, 2, statesFor(h.job("j1").Tasks, 1))
		}, []error{ErrCheckpointMismatch}, ""},
		{"complete stale attempt", "pending", func(h *harness) (CommandType, any) {
			return CommandCheckpointCompleted, h.complete("j1", 0, 1, statesFor(h.job("j1").Tasks, 1))
		}, []error{ErrStaleAttempt}, ""},
		{"complete after the job stopped running", "pending", func(h *harness) (CommandType, any) {
			h.must(CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobRestarting, Time: h.tick()})
			return CommandCheckpointCompleted, h.complete("j1", 1, 1, statesFor(h.job("j1").Tasks, 1))
		}, []error{ErrJobNotRunning}, ""},
		{"complete missing task state", "pending", withStates(func(s map[string]TaskState) { delete(s, "map-1") }),
			[]error{ErrIncompleteStates}, "no state for task map-1"},
		{"complete extra task state", "pending", withStates(func(s map[string]TaskState) {
			s["map-9"] = TaskState{TaskID: "map-9", Kind: TaskMap, KeyedSHA256: sha256Hex(nil)}
		}), []error{ErrIncompleteStates}, "map-9"},
		{"complete state under another task's key", "pending", withStates(editState("map-0", func(st *TaskState) { st.TaskID = "map-1" })),
			[]error{ErrIncompleteStates}, "map-0"},
		{"complete wrong kind", "pending", withStates(editState("source-0", func(st *TaskState) { st.Kind = TaskMap })),
			[]error{ErrIncompleteStates}, "source-0"},
		{"complete from wrong worker", "pending", withStates(editState("source-0", func(st *TaskState) { st.Worker = "w9" })),
			[]error{ErrIncompleteStates}, "w9"},
		{"complete missing partition offset", "pending", withStates(editState("source-0", func(st *TaskState) { delete(st.Offsets, 2) })),
			[]error{ErrIncompleteStates}, "source-0"},
		{"complete offset of foreign partition", "pending", withStates(editState("source-0", func(st *TaskState) {
			delete(st.Offsets, 2)
			st.Offsets[1] = 5
		})), []error{ErrIncompleteStates}, "partition 2"},
		{"complete negative offset", "pending", withStates(editState("source-1", func(st *TaskState) { st.Offsets[1] = -1 })),
			[]error{ErrIncompleteStates}, "source-1"},
		{"complete source with keyed state", "pending", withStates(editState("source-1", func(st *TaskState) { st.Keyed = []byte("x") })),
			[]error{ErrIncompleteStates}, "source-1"},
		{"complete map with offsets", "pending", withStates(editState("map-2", func(st *TaskState) { st.Offsets = map[int32]int64{0: 1} })),
			[]error{ErrIncompleteStates}, "map-2"},
		{"complete bad sha256", "pending", withStates(editState("map-1", func(st *TaskState) { st.Keyed[0] ^= 0xff })),
			[]error{ErrStateChecksum, ErrIncompleteStates}, "task map-1"},
		{"complete sha256 not hex", "pending", withStates(editState("map-1", func(st *TaskState) { st.KeyedSHA256 = "zz" })),
			[]error{ErrIncompleteStates}, "map-1"},
		{"complete sha256 missing", "pending", withStates(editState("map-1", func(st *TaskState) { st.KeyedSHA256 = "" })),
			[]error{ErrIncompleteStates}, "map-1"},

		// CheckpointAborted
		{"abort unknown job", "", func(h *harness) (CommandType, any) {
			return CommandCheckpointAborted, h.abort("nope", 1, "")
		}, []error{ErrNoSuchJob}, ""},
		{"abort without pending", "running", func(h *harness) (CommandType, any) {
			return CommandCheckpointAborted, h.abort("j1", 1, "")
		}, []error{ErrNoPendingCheckpoint}, ""},
		{"abort wrong id", "pending", func(h *harness) (CommandType, any) {
			return CommandCheckpointAborted, h.abort("j1", 5, "")
		}, []error{ErrCheckpointMismatch}, ""},
		{"abort on cancelled job", "cancelled", func(h *harness) (CommandType, any) {
			return CommandCheckpointAborted, h.abort("j1", 1, "")
		}, []error{ErrJobCancelled}, ""},

		// JobCancelled
		{"cancel unknown job", "", func(h *harness) (CommandType, any) {
			return CommandJobCancelled, JobCancelledCmd{JobID: "nope"}
		}, []error{ErrNoSuchJob}, ""},
		{"cancel twice", "cancelled", func(h *harness) (CommandType, any) {
			return CommandJobCancelled, JobCancelledCmd{JobID: "j1"}
		}, []error{ErrJobCancelled}, ""},

		// JobPurged
		{"purge unknown job", "", func(h *harness) (CommandType, any) {
			return CommandJobPurged, JobPurgedCmd{JobID: "nope"}
		}, []error{ErrNoSuchJob}, "nope"},
		{"purge running job", "running", func(h *harness) (CommandType, any) {
			return CommandJobPurged, JobPurgedCmd{JobID: "j1"}
		}, []error{ErrJobNotCancelled}, "running"},
		{"purge registered job", "registered", func(h *harness) (CommandType, any) {
			return CommandJobPurged, JobPurgedCmd{JobID: "j1"}
		}, []error{ErrJobNotCancelled}, "pending"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			switch tc.setup {
			case "registered":
				h.must(CommandRegisterJob, h.register("j1", spec))
			case "running":
				h.runningJob("j1")
			case "pending":
				h.runningJob("j1")
				h.triggered("j1")
			case "cancelled":
				h.runningJob("j1")
				h.triggered("j1")
				h.must(CommandJobCancelled, JobCancelledCmd{JobID: "j1", Time: h.tick()})
			}
			ct, cmd := tc.cmd(h)
			before := h.digest()
			res, err := h.apply(ct, cmd)
			wantErr(t, err, tc.want...)
			if res != nil {
				t.Fatalf("rejected command returned result %v", res)
			}
			if tc.text != "" && !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("error %q does not mention %q", err, tc.text)
			}
			if after := h.digest(); after != before {
				t.Fatalf("rejected command changed the state")
			}
		})
	}
}

func TestRegisterInvalidSpecWrapsFieldError(t *testing.T) {
	h := newHarness(t)
	spec := testSpec()
	spec.Source.Topic = ""
	_, err := h.apply(CommandRegisterJob, h.register("j1", spec))
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "source.topic" {
		t.Fatalf("error %v does not wrap the source.topic FieldError", err)
	}
}

func TestErrorNamesContext(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	cp := h.triggered("j1")
	_, err := h.apply(CommandCheckpointCompleted, h.complete("j1", 1, cp, nil))
	const want = "complete checkpoint 1 of job j1 attempt 1: "
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %q, want prefix %q", err, want)
	}
}

// TestBadBytesNeverPanic feeds Apply entries that are not valid commands.
func TestBadBytesNeverPanic(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"nil", nil, ErrMalformedCommand},
		{"empty", []byte{}, ErrMalformedCommand},
		{"type zero", []byte{0, '{', '}'}, ErrUnknownCommand},
		{"unknown type", []byte{200, '{', '}'}, ErrUnknownCommand},
		{"type byte only", []byte{byte(CommandRegisterJob)}, ErrMalformedCommand},
		{"bad json", append([]byte{byte(CommandJobStatus)}, `{"job_id":`...), ErrMalformedCommand},
		{"wrong json shape", append([]byte{byte(CommandCheckpointTriggered)}, `{"attempt":"one"}`...), ErrMalformedCommand},
		{"json array", append([]byte{byte(CommandJobCancelled)}, `[1,2]`...), ErrMalformedCommand},
		{"trailing garbage", append([]byte{byte(CommandJobCancelled)}, `{} x`...), ErrMalformedCommand},
		{"null body", append([]byte{byte(CommandRegisterJob)}, `null`...), ErrMalformedCommand},
		{"null states", append([]byte{byte(CommandCheckpointCompleted)}, `{"job_id":"j1","attempt":1,"checkpoint_id":1,"states":null}`...), ErrIncompleteStates},
		{"binary", []byte{byte(CommandJobRestarted), 0xff, 0xfe, 0x00}, ErrMalformedCommand},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.runningJob("j1")
			h.triggered("j1")
			before := h.digest()
			_, err := h.applyRaw(tc.data)
			wantErr(t, err, tc.want)
			if h.digest() != before {
				t.Fatal("a bad entry changed the state")
			}
		})
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	spec := testSpec()
	tasks := assignment(spec, "w1")
	cmds := map[CommandType]any{
		CommandRegisterJob:         RegisterJobCmd{ID: "j1", Spec: spec, Time: 1},
		CommandJobRestarted:        JobRestartedCmd{JobID: "j1", Attempt: 1, Tasks: tasks, Reason: "r", Time: 2},
		CommandJobStatus:           JobStatusCmd{JobID: "j1", Status: JobFailing, Reason: "broker down", Time: 3},
		CommandCheckpointTriggered: CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: 4},
		CommandCheckpointCompleted: CheckpointCompletedCmd{JobID: "j1", Attempt: 1, CheckpointID: 1, States: statesFor(tasks, 1), Time: 5},
		CommandCheckpointAborted:   CheckpointAbortedCmd{JobID: "j1", CheckpointID: 1, Reason: "timeout", Time: 6},
		CommandJobCancelled:        JobCancelledCmd{JobID: "j1", Reason: "bye", Time: 7},
	}
	for ct, cmd := range cmds {
		t.Run(ct.String(), func(t *testing.T) {
			data, err := Encode(ct, cmd)
			if err != nil {
				t.Fatal(err)
			}
			if data[0] != byte(ct) {
				t.Fatalf("type byte %d, want %d", data[0], ct)
			}
			gotType, got, err := Decode(data)
			if err != nil {
				t.Fatal(err)
			}
			if gotType != ct || !reflect.DeepEqual(got, cmd) {
				t.Fatalf("decoded %v %+v, want %v %+v", gotType, got, ct, cmd)
			}
			ptr := reflect.New(reflect.TypeOf(cmd))
			ptr.Elem().Set(reflect.ValueOf(cmd))
			if _, err := Encode(ct, ptr.Interface()); err != nil {
				t.Fatalf("encode pointer: %v", err)
			}
		})
	}
}

func TestEncodeRejectsMismatch(t *testing.T) {
	_, err := Encode(CommandRegisterJob, JobStatusCmd{})
	wantErr(t, err, ErrMalformedCommand)
	_, err = Encode(CommandRegisterJob, "not a command")
	wantErr(t, err, ErrUnknownCommand)
	_, _, err = Decode([]byte{99, '{', '}'})
	wantErr(t, err, ErrUnknownCommand)
}

func TestResult(t *testing.T) {
	boom := errors.New("boom")
	if v, err := Result(boom); v != nil || err != boom {
		t.Fatalf("Result(error) = %v, %v", v, err)
	}
	if v, err := Result(uint64(7)); v != uint64(7) || err != nil {
		t.Fatalf("Result(7) = %v, %v", v, err)
	}
	if v, err := Result(nil); v != nil || err != nil {
		t.Fatalf("Result(nil) = %v, %v", v, err)
	}
}

// Two replicas applying the same log, rejected entries included, end with
// the same digest.
func TestReplicasAgree(t *testing.T) {
	a, b := newHarness(t), newHarness(t)
	spec := testSpec()
	script := func(h *harness) {
		h.runningJob("j1")
		h.runningJob("j2")
		h.checkpointed("j1")
		_, _ = h.apply(CommandCheckpointCompleted, h.complete("j1", 1, 9, nil)) // rejected
		h.must(CommandCheckpointAborted, h.abort("j2", h.triggered("j2"), "timeout"))
		h.must(CommandJobRestarted, h.restart("j2", 2, assignment(spec, "w3", "w4"), "lost w1"))
		h.checkpointed("j2")
		_, _ = h.applyRaw([]byte{42})
		h.must(CommandJobCancelled, JobCancelledCmd{JobID: "j1", Time: h.tick()})
	}
	script(a)
	script(b)
	if da, db := a.digest(), b.digest(); da != db {
		t.Fatalf("replicas diverged: %s vs %s", da, db)
	}
}

// Reads return copies: changing what they return does not change the FSM.
// Keyed-state blobs are the documented exception: they are shared, read-only;
// and so are, in Job's copy for the leader loop, the completed and aborted
// checkpoints and the histories, which the FSM itself never changes.
func TestReadsReturnCopies(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	h.checkpointed("j1")
	h.triggered("j1")
	before := h.digest()

	j := h.job("j1")
	j.Spec.Source.Brokers[0] = "x:1"
	j.Spec.Sink.Topic = "x"
	j.Tasks[0].Partitions[0] = 99
	j.Tasks[2].KeyGroups.Start = 99
	j.Pending.ID = 99
	j.Status = JobCancelled
	jobs := h.f.Jobs()
	jobs[0].Completed[0].Tasks["source-0"].Offsets[0] = 99
	delete(jobs[0].Completed[0].Tasks, "map-0")
	jobs[0].Completed[0].Tasks["source-1"].Offsets[1] = 99
	cp, _ := h.f.LastCompleted("j1")
	delete(cp.Tasks, "map-2")

	if h.digest() != before {
		t.Fatal("mutating a read result changed the FSM state")
	}
}

func TestJobsSortedAndMissing(t *testing.T) {
	h := newHarness(t)
	for _, id := range []string{"c", "a", "b"} {
		h.must(CommandRegisterJob, h.register(id, testSpec()))
	}
	var ids []string
	for _, j := range h.f.Jobs() {
		ids = append(ids, j.ID)
	}
	if !reflect.DeepEqual(ids, []string{"a", "b", "c"}) {
		t.Fatalf("Jobs ids = %v", ids)
	}
	if _, ok := h.f.Job("zz"); ok {
		t.Fatal("Job of an unknown id found")
	}
	if _, ok := h.f.LastCompleted("a"); ok {
		t.Fatal("LastCompleted of a job without checkpoints found")
	}
	if _, ok := h.f.LastCompleted("zz"); ok {
		t.Fatal("LastCompleted of an unknown job found")
	}
}

// TestCheckpointIDsNeverWrap: the largest id is never issued, chosen or
// taken by the FSM after the one below it: the next would wrap to 0, and
// ids must only grow.
func TestCheckpointIDsNeverWrap(t *testing.T) {
	h := newHarness(t)
	h.runningJob("j1")
	h.must(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: math.MaxUint64 - 1})
	h.must(CommandCheckpointAborted, h.abort("j1", math.MaxUint64-1, "timeout"))
	before := h.digest()
	for _, id := range []uint64{0, math.MaxUint64} {
		_, err := h.apply(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: h.tick(), ID: id})
		wantErr(t, err, ErrMalformedCommand)
	}
	if h.digest() != before {
		t.Fatal("a refused trigger changed the state")
	}
}
