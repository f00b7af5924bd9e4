package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
)

// gcEnv is what a job garbage collection test controls of the leader's
// environment: the coordinators below a level, and the file deletions.
type gcEnv struct {
	mu      sync.Mutex
	below   []string
	fail    error
	deleted []string // jobs whose files were deleted, in order
	// joinDuring, if set, becomes below during the next file deletion: a
	// coordinator below the level joined meanwhile.
	joinDuring []string
}

func (e *gcEnv) install(h *leaderHarness, threshold time.Duration) {
	h.jobGC = threshold
	h.env.coordinatorsBelow = func(level int) ([]string, error) {
		e.mu.Lock()
		defer e.mu.Unlock()
		if level != jobGCLevel {
			return nil, nil
		}
		return e.below, nil
	}
	h.env.purgeFiles = func(_ context.Context, job string) (int, error) {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.fail != nil {
			return 0, e.fail
		}
		e.deleted = append(e.deleted, job)
		if e.joinDuring != nil {
			e.below, e.joinDuring = e.joinDuring, nil
		}
		return 3, nil
	}
	h.newTerm()
}

func (e *gcEnv) set(below []string, fail error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.below, e.fail = below, fail
}

func (e *gcEnv) deletions() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.deleted...)
}

// gcStep fires the leader's due timers and waits for the file deletions
// they start, handing their results to the loop.
func (h *leaderHarness) gcStep() {
	h.t.Helper()
	h.l.settle()
	h.flush()
	h.l.lookups.Wait()
	h.flush()
}

// tasksStopped reports every task of job id cancelled by its worker.
func (h *leaderHarness) tasksStopped(id string) {
	h.t.Helper()
	job := h.job(id)
	for _, task := range job.Tasks {
		h.report(task.Worker, ref(job, task), transport.TaskPhase_TASK_PHASE_CANCELLED, "job cancelled")
	}
}

// cancelStopped cancels job id and reports its tasks stopped.
func (h *leaderHarness) cancelStopped(id string) {
	h.t.Helper()
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: id, Reason: "user", Time: h.clock.UnixNano()})
	h.step()
	h.tasksStopped(id)
}

// cancelFor cancels job id and lets the leader run for d after it.
func (h *leaderHarness) cancelFor(id string, d time.Duration) {
	h.t.Helper()
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: id, Reason: "user", Time: h.clock.UnixNano()})
	h.step()
	h.advance(d)
	h.step()
	h.gcStep()
}

// A cancelled job is purged once it has been cancelled for the threshold:
// its files first, then the job, from the FSM and from the leader's memory.
// A running job is never purged, and nothing is purged while a coordinator
// is below the level that knows the command, or while its files cannot be
// deleted.
func TestLeaderPurgesCancelledJobsAfterThreshold(t *testing.T) {
	h := newLeaderHarness(t)
	var env gcEnv
	env.install(h, time.Hour)
	h.startJob("gone", testJobSpec(1, 1))
	h.startJob("kept", testJobSpec(1, 1))
	h.completeCheckpoint("gone")
	h.cancelFor("gone", 59*time.Minute)
	if got := env.deletions(); len(got) != 0 {
		t.Fatalf("files of %v deleted before the job was cancelled for the threshold", got)
	}
	h.job("gone")

	// Due, but its tasks never said they stopped, and their workers are
	// connected: one may still upload a file under the job's prefix. The
	// cancel goes again, in case the answer to the first was lost.
	h.drain("w1")
	h.drain("w2")
	h.advance(2 * time.Minute)
	h.gcStep()
	if got := env.deletions(); len(got) != 0 {
		t.Fatalf("files of %v deleted while the job's tasks still run", got)
	}
	if got := append(cancels(h.drain("w1")), cancels(h.drain("w2"))...); len(got) == 0 || got[0].GetJobId() != "gone" {
		t.Fatalf("cancels sent while the purge waits for the tasks: %v, want the job's tasks cancelled again", got)
	}

	// The tasks stop (each stop has the job looked at again), but a
	// coordinator cannot apply JobPurged.
	env.set([]string{"c3 (feature level 1)"}, nil)
	h.tasksStopped("gone")
	h.gcStep()
	if got := env.deletions(); len(got) != 0 {
		t.Fatalf("files of %v deleted while a coordinator is below level %d", got, jobGCLevel)
	}
	h.job("gone")

	// The coordinator is upgraded; the files cannot be deleted.
	env.set(nil, errors.New("storage down"))
	h.advance(jobGCRetry)
	h.gcStep()
	h.job("gone")
	if h.l.jobs["gone"] == nil || h.l.jobs["gone"].purging {
		t.Fatal("after a failed deletion the leader forgot the job or still counts its purge as under way")
	}

	// Storage is back, but a coordinator below the level joins while the
	// files are being deleted: the purge is not committed.
	env.set(nil, nil)
	env.joinDuring = []string{"c4 (feature level 1)"}
	h.advance(2 * jobGCRetry)
	h.gcStep()
	if got := env.deletions(); len(got) != 1 {
		t.Fatalf("file deletions %v, want one", got)
	}
	h.job("gone")

	// It is upgraded: the purge goes through at the next retry.
	env.set(nil, nil)
	h.advance(2 * jobGCRetry)
	h.gcStep()
	if got := env.deletions(); len(got) != 2 || got[1] != "gone" {
		t.Fatalf("file deletions %v, want [gone gone]", got)
	}
	if _, ok := h.f.Job("gone"); ok {
		t.Fatal("job gone still in the FSM after its purge")
	}
	if h.l.jobs["gone"] != nil {
		t.Fatal("the leader still tracks the purged job")
	}
	if h.f.Purged() != 1 {
		t.Fatalf("FSM counts %d purged jobs, want 1", h.f.Purged())
	}

	// The running job stays, however old; a new term finds nothing to purge.
	h.advance(48 * time.Hour)
	h.step()
	h.gcStep()
	if _, ok := h.f.Job("kept"); !ok {
		t.Fatal("job kept, never cancelled, was purged")
	}
	h.newTerm()
	h.pastGrace()
	h.step()
	h.gcStep()
	if got := env.deletions(); len(got) != 2 {
		t.Fatalf("file deletions %v after a new term, want only the first two", got)
	}
}

// With the threshold 0, cancelled jobs stay for ever.
func TestLeaderKeepsCancelledJobsWithoutThreshold(t *testing.T) {
	h := newLeaderHarness(t)
	var env gcEnv
	env.install(h, 0)
	h.startJob("j1", testJobSpec(1, 1))
	h.cancelFor("j1", 1000*time.Hour)
	if got := env.deletions(); len(got) != 0 {
		t.Fatalf("files of %v deleted with job garbage collection off", got)
	}
	if j := h.job("j1"); j.Status != fsm.JobCancelled {
		t.Fatalf("job j1: %s", j.Status)
	}
}

// The purge of a job's files deletes everything under its checkpoint prefix,
// partial uploads included, and the files of its savepoints the cluster does
// not keep; a kept savepoint and other jobs' files stay.
func TestCollectorPurgesJobFiles(t *testing.T) {
	ctx := context.Background()
	fx := newGCFixture(t)
	store, put, a := fx.store, fx.put, fx.a
	const job = gcJob
	full1 := put(transport.CheckpointDir(job, 1) + "map-0-a1-full.cfs")
	full1.Full = true
	a.completeWithFiles(job, 1, full1)
	orphan := put(transport.CheckpointDir(job, 2) + "map-0-a1-delta.cfs")
	partial := transport.CheckpointDir(job, 2) + "map-1-a1-full.cfs.0a1b2c3d4e5f.tmp"
	if err := os.WriteFile(filepath.Join(fx.root, filepath.FromSlash(partial)), []byte("part"), 0o644); err != nil {
		t.Fatal(err)
	}
	keptSP := put(transport.SavepointDir(job, 7) + "map-0-a1-full.cfs")
	droppedSP := put(transport.SavepointDir(job, 8) + "map-0-a1-full.cfs")
	foreign := put(transport.CheckpointDir("other-job", 1) + "map-0-a1-full.cfs")

	m := newMetrics()
	c := newCollector(storage.NewPool(), a.f.Job, func(id string) bool { return id == fsm.SavepointID(job, 7) },
		slog.New(slog.DiscardHandler), m)
	defer c.stores.Close()
	n, err := c.purge(ctx, job)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	err = store.List(ctx, "", func(p string, _ int64, _ time.Time) error { left = append(left, p); return nil })
	if err == nil {
		err = store.ListPartial(ctx, "", func(p, _ string, _ int64, _ time.Time) error { left = append(left, p); return nil })
	}
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(left)
	want := []string{foreign.Path, keptSP.Path}
	slices.Sort(want)
	if n != 4 || !slices.Equal(left, want) {
		t.Fatalf("purge deleted %d, left %v; want %s, %s, %s and %s deleted, leaving %v",
			n, left, full1.Path, orphan.Path, partial, droppedSP.Path, want)
	}
	if n, err := c.purge(ctx, job); err != nil || n != 0 {
		t.Fatalf("second purge: deleted %d, err %v; want nothing left to delete", n, err)
	}

	// Once the job is gone from the FSM its metric series go too.
	m.checkpointsCompleted.WithLabelValues(job).Inc()
	m.checkpointsCompleted.WithLabelValues("other-job").Inc()
	m.checkpointsAborted.WithLabelValues(job, "timeout").Inc()
	m.forgetJob(job)
	if got := testutil.CollectAndCount(m.checkpointsCompleted); got != 1 {
		t.Fatalf("%d completed-checkpoint series after forgetting %s, want other-job's alone", got, job)
	}
	if got := testutil.CollectAndCount(m.checkpointsAborted) + testutil.CollectAndCount(m.stateFilesDeleted); got != 0 {
		t.Fatalf("%d series of %s left after forgetting it", got, job)
	}
}

// At most maxPurges purges delete files at once; the others wait their
// turn and all are purged in the end.
func TestLeaderBoundsPurgesInFlight(t *testing.T) {
	h := newLeaderHarness(t)
	h.jobGC = time.Hour
	var (
		mu             sync.Mutex
		inFlight, most int
		release        = make(chan struct{})
		deleted        []string
	)
	h.env.purgeFiles = func(_ context.Context, job string) (int, error) {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		<-release
		mu.Lock()
		inFlight--
		deleted = append(deleted, job)
		mu.Unlock()
		return 0, nil
	}
	h.newTerm()
	const n = maxPurges + 3
	for i := range n {
		id := fmt.Sprintf("j%d", i)
		h.register(id, testJobSpec(1, 1)) // never deployed: no task to wait for
		h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: id, Reason: "user", Time: h.clock.UnixNano()})
	}
	h.pastGrace()
	h.step()
	h.advance(2 * time.Hour)
	h.reconcile()
	waitFor(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if inFlight != maxPurges {
			return fmt.Errorf("%d purges deleting files, want %d", inFlight, maxPurges)
		}
		return nil
	})
	close(release)
	for range n {
		h.l.lookups.Wait()
		h.flush()
	}
	if jobs := h.f.Jobs(); len(jobs) != 0 {
		t.Fatalf("%d jobs left after every purge could go on, want none", len(jobs))
	}
	if len(h.l.purgeQueue) != 0 || h.l.purges != 0 {
		t.Fatalf("after every purge: %d queued, %d counted in flight; want none", len(h.l.purgeQueue), h.l.purges)
	}
	mu.Lock()
	defer mu.Unlock()
	if most != maxPurges || len(deleted) != n {
		t.Fatalf("at most %d purges at once and %d done, want %d and %d", most, len(deleted), maxPurges, n)
	}
}

// requestPurge hands a purge request to the leader loop and returns the
// channel its answer comes on.
func (h *leaderHarness) requestPurge(job string, force bool) chan purgeReply {
	r := purgeRequest{jobID: job, force: force, reply: make(chan purgeReply, 1)}
	h.handle(r)
	return r.reply
}

// answered returns the answer waiting on c, or false if none came yet.
func answered(c chan purgeReply) (purgeReply, bool) {
	select {
	case rep := <-c:
		return rep, true
	default:
		return purgeReply{}, false
	}
}

// A purge asked for goes ahead without waiting for the threshold, even with
// collection off, once the job's tasks have stopped; it is answered when
// done or held up, and refused for a job that is not cancelled.
func TestLeaderPurgesOnRequest(t *testing.T) {
	h := newLeaderHarness(t)
	var env gcEnv
	env.install(h, 0) // collection off: only requests purge
	h.startJob("j1", testJobSpec(1, 1))
	h.startJob("j2", testJobSpec(1, 1))
	h.completeCheckpoint("j1")

	if rep, ok := answered(h.requestPurge("j1", false)); !ok || !errors.Is(rep.err, errPurgeState) || !strings.Contains(rep.err.Error(), "cancel it first") {
		t.Fatalf("purge of a running job: %+v (answered %v), want refused: cancel it first", rep, ok)
	}
	if rep, ok := answered(h.requestPurge("nope", false)); !ok || !errors.Is(rep.err, fsm.ErrNoSuchJob) {
		t.Fatalf("purge of an unknown job: %+v (answered %v), want no such job", rep, ok)
	}

	// Asked for right after the cancel, before the loop has looked at the
	// job again: the tasks still run, so the request waits for them.
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "j1", Reason: "user", Time: h.clock.UnixNano()})
	reply := h.requestPurge("j1", false)
	h.gcStep()
	if rep, ok := answered(reply); ok {
		t.Fatalf("purge answered %+v while the job's tasks run", rep)
	}
	if got := env.deletions(); len(got) != 0 {
		t.Fatalf("files of %v deleted while the job's tasks run", got)
	}

	// The storage fails: the request hears why, and the purge stays asked
	// for: the next try, a retry later, goes through.
	env.set(nil, errors.New("storage down"))
	h.tasksStopped("j1")
	h.gcStep()
	if rep, ok := answered(reply); !ok || rep.err == nil || !strings.Contains(rep.err.Error(), "storage down") {
		t.Fatalf("purge answered %+v (answered %v), want the storage's error", rep, ok)
	}
	h.job("j1")

	// Asked again, it does not try before the retry (a client repeating
	// itself must not list the storage each time); it is answered once
	// the job is gone.
	env.set(nil, nil)
	reply = h.requestPurge("j1", false)
	h.gcStep()
	if rep, ok := answered(reply); ok {
		t.Fatalf("purge asked again answered %+v before the retry", rep)
	}
	h.advance(2 * jobGCRetry)
	h.gcStep()
	if rep, ok := answered(reply); !ok || rep.err != nil || rep.filesDeleted != 3 {
		t.Fatalf("purge answered %+v (answered %v), want done with 3 files deleted", rep, ok)
	}
	if _, ok := h.f.Job("j1"); ok {
		t.Fatal("job j1 still in the FSM after its purge")
	}
	if got := env.deletions(); !slices.Equal(got, []string{"j1"}) {
		t.Fatalf("file deletions %v, want [j1]", got)
	}
	if len(h.l.purgeNow) != 0 {
		t.Fatalf("the leader still holds purge requests %v", h.l.purgeNow)
	}

	// A purge asked for while a coordinator cannot apply it is answered
	// with why, and happens when it can.
	h.cancelStopped("j2")
	env.set([]string{"c3 (feature level 1)"}, nil)
	reply = h.requestPurge("j2", false)
	h.gcStep()
	if rep, ok := answered(reply); !ok || rep.err == nil || !strings.Contains(rep.err.Error(), "c3 (feature level 1)") {
		t.Fatalf("purge answered %+v (answered %v), want held by c3", rep, ok)
	}
	env.set(nil, nil)
	h.advance(2 * jobGCRetry)
	h.gcStep()
	if _, ok := h.f.Job("j2"); ok {
		t.Fatal("job j2 not purged once every coordinator can apply the purge")
	}

	// Forced: files that cannot be deleted do not hold the purge up; the
	// answer says why they are left.
	h.startJob("j3", testJobSpec(1, 1))
	h.cancelStopped("j3")
	env.set(nil, errors.New("bucket gone"))
	reply = h.requestPurge("j3", true)
	h.gcStep()
	rep, ok := answered(reply)
	if !ok || rep.err != nil || rep.filesLeft == nil || !strings.Contains(rep.filesLeft.Error(), "bucket gone") {
		t.Fatalf("forced purge answered %+v (answered %v), want done, with the files left for the storage's error", rep, ok)
	}
	if _, ok := h.f.Job("j3"); ok {
		t.Fatal("job j3 still in the FSM after a forced purge")
	}

	// The purge's write fails as leadership is lost: the request hears it
	// (the handler answers 503: ask again).
	h.startJob("j4", testJobSpec(1, 1))
	h.cancelStopped("j4")
	env.set(nil, nil)
	submit := h.l.env.submit
	h.l.env.submit = func(ct fsm.CommandType, data []byte, done func(any, error)) {
		if ct == fsm.CommandJobPurged {
			h.results = append(h.results, func() { done(nil, raft.ErrLeadershipLost) })
			return
		}
		submit(ct, data, done)
	}
	reply = h.requestPurge("j4", false)
	h.gcStep()
	h.l.env.submit = submit
	if rep, ok = answered(reply); !ok || !errors.Is(rep.err, raft.ErrLeadershipLost) {
		t.Fatalf("purge answered %+v (answered %v), want leadership lost", rep, ok)
	}
	if code, _ := purgeAnswer("j4", rep); code != http.StatusServiceUnavailable {
		t.Errorf("leadership lost answered %d, want 503", code)
	}
}

// The HTTP answer to each outcome of a purge request.
func TestPurgeAnswer(t *testing.T) {
	for _, tc := range []struct {
		rep  purgeReply
		code int
		want string
	}{
		{purgeReply{filesDeleted: 3}, http.StatusOK, `"status":"purged"`},
		{purgeReply{filesDeleted: 1, filesLeft: errors.New("bucket gone")}, http.StatusOK, `could not be deleted and stay in its storage: bucket gone`},
		{purgeReply{err: fmt.Errorf("%w: %w: j", errPurgeState, fsm.ErrNoSuchJob)}, http.StatusNotFound, `no job \"j\"`},
		{purgeReply{err: fmt.Errorf("%w: job j is running: cancel it first", errPurgeState)}, http.StatusConflict, "cancel it first"},
		{purgeReply{err: fmt.Errorf("commit the purge: %w", raft.ErrLeadershipLost)}, http.StatusServiceUnavailable, "ask again"},
		{purgeReply{err: fmt.Errorf("commit the purge: %w", ErrNotLeader)}, http.StatusServiceUnavailable, "ask again"},
		{purgeReply{err: errors.New("delete its checkpoint files: storage down")}, http.StatusAccepted, `"purge":"pending"`},
	} {
		code, body := purgeAnswer("j", tc.rep)
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		if code != tc.code || !strings.Contains(string(b), tc.want) {
			t.Errorf("%+v answered %d %s, want %d with %s", tc.rep, code, b, tc.code, tc.want)
		}
	}
}

// A collection that runs while its job is purged leaves nothing of the job
// behind: the purge forgets the job's series and the collector's memory of
// it when it commits, and what the collection records after that goes too.
func TestCollectorForgetsJobPurgedMidRun(t *testing.T) {
	ctx := context.Background()
	fx := newGCFixture(t)
	const job = gcJob
	full1 := fx.put(transport.CheckpointDir(job, 1) + "map-0-a1-full.cfs")
	full1.Full = true
	fx.a.completeWithFiles(job, 1, full1)
	orphan := fx.put(transport.CheckpointDir(job, 1) + "map-0-a1-delta.cfs")

	// lookups is how many more reads find the job: then it is purged.
	var lookups atomic.Int32
	lookups.Store(1 << 20)
	m := newMetrics()
	c := newCollector(storage.NewPool(), func(id string) (fsm.Job, bool) {
		if lookups.Add(-1) < 0 {
			return fsm.Job{}, false
		}
		return fx.a.f.Job(id)
	}, func(string) bool { return false }, slog.New(slog.DiscardHandler), m)
	defer c.stores.Close()
	t0 := time.Now()
	c.now = func() time.Time { return t0 }
	c.collect(ctx, job) // finds the orphan unreferenced; its grace starts
	c.wait()

	// The next collection reads the job, deletes the orphan, and the job
	// is purged before it ends.
	c.now = func() time.Time { return t0.Add(gcGrace) }
	c.mu.Lock()
	c.last[job] = time.Time{}
	c.mu.Unlock()
	lookups.Store(1)
	c.collect(ctx, job)
	c.wait()
	if r, err := fx.store.Open(ctx, orphan.Path); err == nil {
		r.Close()
		t.Fatalf("%s still there: the collection did not delete it", orphan.Path)
	}
	if got := testutil.CollectAndCount(m.stateFilesDeleted); got != 0 {
		t.Errorf("%d coordflow_state_files_deleted_total series after the job's purge, want none", got)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.unreferenced[job]; ok {
		t.Error("the collector still remembers unreferenced files of the purged job")
	}
	if _, ok := c.last[job]; ok {
		t.Error("the collector still remembers when it last collected the purged job")
	}
}
