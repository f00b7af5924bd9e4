package fsm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/raft"
)

func readCloser(b []byte) io.ReadCloser { return io.NopCloser(bytes.NewReader(b)) }

// richState builds a state with every kind of record: a running job with
// completed, aborted and pending checkpoints, a restarted job, a cancelled
// job and a job never deployed.
func richState(t testing.TB) *harness {
	h := newHarness(t)
	spec := testSpec()
	h.runningJob("running")
	h.checkpointed("running")
	h.must(CommandCheckpointAborted, h.abort("running", h.triggered("running"), "timeout"))
	h.checkpointed("running")
	h.triggered("running")

	h.runningJob("restarted")
	h.checkpointed("restarted")
	h.must(CommandJobRestarted, h.restart("restarted", 2, assignment(spec, "w3"), "lost w1"))
	h.must(CommandJobStatus, JobStatusCmd{JobID: "restarted", Status: JobFailing, Reason: "topic missing", Time: h.tick()})

	h.runningJob("cancelled")
	h.checkpointed("cancelled")
	h.must(CommandJobCancelled, JobCancelledCmd{JobID: "cancelled", Reason: "user", Time: h.tick()})

	noSink := spec
	noSink.Sink = nil
	h.must(CommandRegisterJob, h.register("waiting", noSink))

	// A job with state in files, a savepoint of it, and a job started from
	// that savepoint: every snapshot type round-trips.
	h.runningJob("files")
	h.checkpointedWithFiles("files")
	sp := h.savepointed("files", false)
	from := h.register("from-savepoint", spec)
	from.FromSavepoint = &sp
	h.must(CommandRegisterJob, from)
	return h
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	h := richState(t)
	want := h.digest()
	wantJSON, err := h.f.StateJSON()
	if err != nil {
		t.Fatal(err)
	}

	restored := New()
	restored.state.Jobs["stale"] = &Job{ID: "stale"} // Restore must discard prior state
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if got := mustDigest(t, restored); got != want {
		gotJSON, _ := restored.StateJSON()
		t.Fatalf("digest after restore %s, want %s\ngot  %s\nwant %s", got, want, gotJSON, wantJSON)
	}
	// The restored FSM goes on exactly like the original.
	for _, r := range []*harness{h, {t: t, f: restored, index: h.index, now: h.now}} {
		r.must(CommandCheckpointCompleted, r.complete("running", 1, 4, statesFor(r.job("running").Tasks, 4)))
	}
	if mustDigest(t, restored) != h.digest() {
		t.Fatal("original and restored FSM diverged after the same command")
	}
}

// TestSnapshotCompressedOnceEntriesAre: a snapshot is plain JSON until the
// log holds a compressed entry (every coordinator reads zstd then), and a
// zstd stream after; both restore to the same state, and a damaged
// compressed snapshot is refused like a damaged plain one.
func TestSnapshotCompressedOnceEntriesAre(t *testing.T) {
	h := richState(t)
	plain := persist(t, h.f)
	if plain[0] != '{' {
		t.Fatalf("snapshot before any compressed entry begins %q, want plain JSON", plain[:4])
	}
	// Any compressed command sets the mark; this one changes nothing else.
	cmd, err := Encode(CommandRegisterJob, h.register("running", testSpec()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applyRaw(compressed(t, cmd)); err == nil {
		t.Fatal("registering a job id twice was accepted")
	}
	packed := persist(t, h.f)
	if !bytes.HasPrefix(packed, zstdMagic) {
		t.Fatalf("snapshot after a compressed entry begins %q, want a zstd frame", packed[:4])
	}
	if len(packed)*3 > len(plain) {
		t.Fatalf("compressed snapshot %d bytes, plain %d: want under a third", len(packed), len(plain))
	}
	want := h.digest()
	restored := New()
	if err := restored.Restore(readCloser(packed)); err != nil {
		t.Fatalf("restore the compressed snapshot: %v", err)
	}
	if got := mustDigest(t, restored); got != want || !restored.CompressedEntries() {
		t.Fatalf("restored from the compressed snapshot: digest %s (want %s), mark %v", got, want, restored.CompressedEntries())
	}
	if err := New().Restore(readCloser(plain)); err != nil {
		t.Fatalf("restore the plain snapshot: %v", err)
	}

	flipped := bytes.Clone(packed)
	flipped[len(flipped)/2] ^= 0x40
	for name, data := range map[string][]byte{
		"truncated":     packed[:len(packed)/2],
		"no checksum":   packed[:len(packed)-4],
		"flipped byte":  flipped,
		"trailing data": append(bytes.Clone(packed), 0x01, 0x02),
		"magic only":    zstdMagic,
	} {
		t.Run(name, func(t *testing.T) {
			f := New()
			if err := f.Restore(readCloser(plain)); err != nil {
				t.Fatal(err)
			}
			before := mustDigest(t, f)
			wantErr(t, f.Restore(readCloser(data)), ErrCorruptSnapshot)
			if mustDigest(t, f) != before {
				t.Fatal("a failed restore changed the state")
			}
		})
	}
}

// A snapshot is a point-in-time copy: commands applied after Snapshot (while
// Persist runs) do not leak into it.
func TestSnapshotIsPointInTime(t *testing.T) {
	h := richState(t)
	want := h.digest()
	snap, err := h.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()
	h.must(CommandCheckpointCompleted, h.complete("running", 1, 4, statesFor(h.job("running").Tasks, 4)))
	h.must(CommandJobCancelled, JobCancelledCmd{JobID: "restarted", Time: h.tick()})

	var sink fakeSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	restored := New()
	if err := restored.Restore(readCloser(sink.Bytes())); err != nil {
		t.Fatal(err)
	}
	if mustDigest(t, restored) != want {
		t.Fatal("snapshot holds changes applied after it was taken")
	}
}

// Persist runs concurrently with Apply and reads; the race detector checks
// that nothing is shared unsafely.
func TestPersistConcurrentWithApply(t *testing.T) {
	h := richState(t)
	h.runningJob("running2")
	snap, err := h.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()

	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Add(2)
	go func() {
		defer wg.Done()
		var sink fakeSink
		errs <- snap.Persist(&sink)
	}()
	go func() {
		defer wg.Done()
		for range 20 {
			if _, err := h.f.Digest(); err != nil {
				errs <- err
				return
			}
			_ = h.f.Jobs()
		}
		errs <- nil
	}()
	for range 10 {
		h.checkpointed("running2")
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestPersistCancelsSinkOnError(t *testing.T) {
	for _, compressed := range []bool{false, true} {
		t.Run(fmt.Sprintf("compressed=%v", compressed), func(t *testing.T) {
			h := richState(t)
			h.f.state.CompressedEntries = compressed // zstd buffers: the error comes at its close
			snap, err := h.f.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			defer snap.Release()
			sink := &fakeSink{failWrite: true}
			err = snap.Persist(sink)
			if err == nil || !strings.Contains(err.Error(), "disk full") {
				t.Fatalf("persist error = %v, want the write error", err)
			}
			if !sink.cancelled || sink.closed {
				t.Fatalf("sink cancelled=%v closed=%v, want cancelled only", sink.cancelled, sink.closed)
			}
		})
	}
}

func TestRestoreCorruptKeepsState(t *testing.T) {
	h := richState(t)
	good := persist(t, h.f)
	edit := func(f func(doc map[string]any)) []byte {
		var doc map[string]any
		if err := json.Unmarshal(good, &doc); err != nil {
			t.Fatal(err)
		}
		f(doc)
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	job := func(doc map[string]any, id string) map[string]any {
		return doc["state"].(map[string]any)["jobs"].(map[string]any)[id].(map[string]any)
	}
	tests := []struct {
		name string
		data []byte
		text string
	}{
		{"empty", nil, "decode"},
		{"garbage", []byte("\x00\x01garbage"), "decode"},
		{"truncated", good[:len(good)/2], "decode"},
		{"trailing data", append(append([]byte{}, good...), `{}`...), "data after"},
		{"wrong format", edit(func(d map[string]any) { d["format"] = "other" }), `format "other"`},
		{"future version", edit(func(d map[string]any) { d["version"] = 99 }), "version 99"},
		{"no state", edit(func(d map[string]any) { delete(d, "state") }), "no state"},
		{"no jobs", edit(func(d map[string]any) { d["state"] = map[string]any{} }), "no jobs"},
		{"null job", edit(func(d map[string]any) { d["state"].(map[string]any)["jobs"].(map[string]any)["x"] = nil }), "null job"},
		{"job under wrong key", edit(func(d map[string]any) { job(d, "running")["id"] = "other" }), `job "running"`},
		{"unknown status", edit(func(d map[string]any) { job(d, "running")["status"] = "zombie" }), "zombie"},
		{"pending id behind last id", edit(func(d map[string]any) { job(d, "running")["last_checkpoint_id"] = 1 }), "last issued"},
		{"pending not pending", edit(func(d map[string]any) { job(d, "running")["pending"].(map[string]any)["status"] = "completed" }), "pending checkpoint"},
		{"completed out of order", edit(func(d map[string]any) {
			cps := job(d, "running")["completed"].([]any)
			cps[0], cps[1] = cps[1], cps[0]
		}), "out of order"},
		{"wrong field type", edit(func(d map[string]any) { job(d, "running")["attempt"] = "one" }), "decode"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := New()
			if err := f.Restore(readCloser(good)); err != nil {
				t.Fatal(err)
			}
			before := mustDigest(t, f)
			err := f.Restore(readCloser(tc.data))
			wantErr(t, err, ErrCorruptSnapshot)
			if !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("error %q does not mention %q", err, tc.text)
			}
			if mustDigest(t, f) != before {
				t.Fatal("a failed restore changed the state")
			}
		})
	}
}

// The canonical JSON does not depend on map iteration order or on copies.
func TestDigestStable(t *testing.T) {
	h := richState(t)
	d := h.digest()
	for range 5 {
		if h.digest() != d {
			t.Fatal("digest changed without a command")
		}
	}
	clone := &FSM{state: h.f.state.clone(false)}
	if mustDigest(t, clone) != d {
		t.Fatal("a deep copy has another digest")
	}
	if mustDigest(t, New()) == d {
		t.Fatal("empty state has the same digest as a full one")
	}
	if _, err := h.f.StateJSON(); err != nil {
		t.Fatal(err)
	}
}

// Persist runs while Apply goes on (Raft does this): the snapshot shares the
// stored jobs, and Apply changes only copies, so the snapshot is the state at
// Snapshot and the race detector sees no write to what Persist reads.
func TestSnapshotPersistsWhileApplying(t *testing.T) {
	h := newHarness(t)
	var ids []string
	for i := range 20 {
		id := fmt.Sprintf("job-%02d", i)
		h.runningJob(id)
		h.checkpointed(id)
		ids = append(ids, id)
	}
	want := h.digest()
	snap, err := h.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()
	var sink fakeSink
	done := make(chan error, 1)
	go func() { done <- snap.Persist(&sink) }()
	for range 3 {
		for _, id := range ids {
			h.checkpointed(id) // changes Completed, Pending and more of every job
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	restored := New()
	if err := restored.Restore(readCloser(sink.Bytes())); err != nil {
		t.Fatal(err)
	}
	if mustDigest(t, restored) != want {
		t.Fatal("the snapshot holds changes applied after it was taken")
	}
	if h.digest() == want {
		t.Fatal("the commands after the snapshot changed nothing")
	}
}

// A job's copies share its completed checkpoints and histories
// (Job.sharedCopy), so no command may change them in place: a snapshot
// taken before a command must encode the same after it. The commands run
// past every bound (retained checkpoints, MaxCheckpointHistory,
// MaxAbortedHistory, MaxAttemptHistory, MaxRecoveryHistory) and through the
// recovery record that the first checkpoint after a task-scoped recovery
// updates.
func TestSnapshotUnchangedByLaterCommands(t *testing.T) {
	h := newHarness(t)
	j := h.runningJob("j1")
	persisted := func(s raft.FSMSnapshot) []byte {
		var sink fakeSink
		if err := s.Persist(&sink); err != nil {
			t.Fatal(err)
		}
		return sink.Bytes()
	}
	attempt := j.Attempt
	step := func(i int) {
		switch {
		case i%9 == 4: // a task-scoped recovery of the w2 tasks
			restore := h.job("j1").Completed
			var moved []Task
			for _, task := range h.job("j1").Tasks {
				if task.Worker == "w2" {
					moved = append(moved, task)
				}
			}
			attempt++
			h.must(CommandTasksRestarted, TasksRestartedCmd{JobID: "j1", Attempt: attempt, Tasks: moved,
				RestoreFrom: restore[len(restore)-1].ID, Reason: "lost", DetectedAt: h.tick(), Time: h.tick()})
		case i%11 == 7: // a job-scoped restart
			attempt++
			h.must(CommandJobRestarted, h.restart("j1", attempt, assignment(testSpec(), "w1", "w2"), "restart"))
		case i%5 == 2: // an aborted checkpoint
			cp := h.triggered("j1")
			h.must(CommandCheckpointAborted, h.abort("j1", cp, "timeout"))
		default:
			h.checkpointed("j1")
		}
	}
	step(0)
	for i := 1; i < 2*MaxCheckpointHistory; i++ {
		snap, err := h.f.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		before := persisted(snap)
		step(i)
		if after := persisted(snap); !bytes.Equal(before, after) {
			t.Fatalf("step %d changed a snapshot taken before it", i)
		}
		snap.Release()
	}
	got := h.job("j1")
	if len(got.History) != MaxCheckpointHistory || len(got.Aborted) != MaxAbortedHistory ||
		len(got.Attempts) != MaxAttemptHistory || len(got.Recoveries) != MaxRecoveryHistory {
		t.Fatalf("histories of %d, %d aborted, %d attempts, %d recoveries: the commands did not reach every bound",
			len(got.History), len(got.Aborted), len(got.Attempts), len(got.Recoveries))
	}
	if n := len(got.Completed); n != got.Spec.Checkpoint.Retained {
		t.Fatalf("%d completed checkpoints, want the %d retained", n, got.Spec.Checkpoint.Retained)
	}
}

// manyJobs applies n running jobs of one source and one map task, each with
// checkpoints completed: what a coordinator of many small jobs holds.
func manyJobs(b *testing.B, n, checkpoints int) *harness {
	h := newHarness(b)
	spec := testSpec()
	spec.Source.Parallelism, spec.Operator.Parallelism = 1, 1
	spec.Sink = nil
	for i := range n {
		id := fmt.Sprintf("job-%04d", i)
		h.must(CommandRegisterJob, h.register(id, spec))
		h.must(CommandJobRestarted, h.restart(id, 1, assignment(spec, "w1", "w2"), "deploy"))
		for range checkpoints {
			h.checkpointed(id)
		}
	}
	return h
}

// BenchmarkJobs times a read of every job of 1,000, each with a full
// checkpoint history: the leader's safety-net pass, deep or shared.
func BenchmarkJobs(b *testing.B) {
	h := manyJobs(b, 1000, MaxCheckpointHistory)
	for _, read := range []struct {
		name string
		jobs func() []Job
	}{{"deep", h.f.Jobs}, {"shared", h.f.SharedJobs}} {
		b.Run(read.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if n := len(read.jobs()); n != 1000 {
					b.Fatalf("%d jobs", n)
				}
			}
		})
	}
}

// BenchmarkSnapshotPersist times the encoding of a snapshot of 1,000 running
// jobs of one source and one map task, each with its retained checkpoints:
// what every coordinator of such a cluster pays per Raft snapshot, plain
// and compressed (once the log holds a compressed entry). bytes/op is the
// snapshot's size; MB/s is of the plain JSON in both.
func BenchmarkSnapshotPersist(b *testing.B) {
	h := manyJobs(b, 1000, 5)
	plain := len(persist(b, h.f))
	for _, packed := range []bool{false, true} {
		b.Run(fmt.Sprintf("compressed=%v", packed), func(b *testing.B) {
			h.f.state.CompressedEntries = packed
			b.SetBytes(int64(plain))
			b.ReportAllocs()
			size := 0
			for b.Loop() {
				size = len(persist(b, h.f))
			}
			b.ReportMetric(float64(size), "snapshot-bytes")
		})
	}
}

// SharedJobs reads what Jobs reads, and what it returned stays as it was
// while Apply goes on: copying the jobs after the read lock is released
// relies on Apply replacing a job it changes rather than changing it.
func TestSharedJobsArePointInTime(t *testing.T) {
	h := newHarness(t)
	h.runningJob("a")
	h.runningJob("b")
	h.checkpointed("a")
	shared, deep := h.f.SharedJobs(), h.f.Jobs()
	if !reflect.DeepEqual(shared, deep) {
		t.Fatalf("SharedJobs %+v\nJobs %+v", shared, deep)
	}
	for range 3 { // past the 2 retained: the completed checkpoints shift
		h.checkpointed("a")
	}
	h.must(CommandJobCancelled, JobCancelledCmd{JobID: "b", Reason: "user", Time: h.tick()})
	if !reflect.DeepEqual(shared, deep) {
		t.Fatalf("jobs read before later applies changed with them:\nnow %+v\nread %+v", shared, deep)
	}
	if got := h.f.SharedJobs(); reflect.DeepEqual(got, shared) {
		t.Fatal("SharedJobs after the applies reads what it read before them")
	}
}
