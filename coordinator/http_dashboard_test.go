package coordinator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// dashboardFixture is a bare Server over an FSM that the test drives with
// commands, as a leader would.
type dashboardFixture struct {
	*applier
	s *Server
	h http.Handler
}

func newDashboardFixture(t *testing.T) *dashboardFixture {
	f := fsm.New()
	s := &Server{cfg: Config{ID: "c1"}, logger: slog.New(slog.DiscardHandler), fsm: f, metrics: newMetrics(),
		memberState: make(map[string]*memberRecord), ctx: t.Context()}
	return &dashboardFixture{applier: &applier{t: t, f: f}, s: s, h: s.newHTTPServer().Handler}
}

func (d *dashboardFixture) get(path string, out any) int {
	d.t.Helper()
	rec := httptest.NewRecorder()
	d.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if out != nil {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			d.t.Fatalf("GET %s: %d %q: %v", path, rec.Code, rec.Body, err)
		}
	}
	return rec.Code
}

// at is a fixed clock for commands: t0 plus ms milliseconds.
func at(ms int64) int64 {
	return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano() + ms*int64(time.Millisecond)
}

var dashboardTasks = []fsm.Task{
	{ID: "source-0", Kind: fsm.TaskSource, Index: 0, Worker: "w1", Partitions: []int32{0, 2}},
	{ID: "source-1", Kind: fsm.TaskSource, Index: 1, Worker: "w2", Partitions: []int32{1}},
	{ID: "map-0", Kind: fsm.TaskMap, Index: 0, Worker: "w1", KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 64}},
	{ID: "map-1", Kind: fsm.TaskMap, Index: 1, Worker: "w1", KeyGroups: &fsm.KeyGroupRange{Start: 64, End: 128}},
}

// checkpoint triggers and completes checkpoint id of attempt at time ms,
// each source having read in records and each map task emitted out.
func (d *dashboardFixture) checkpoint(job string, attempt, id uint64, ms, in, out int64, offsets map[int32]int64) {
	d.t.Helper()
	d.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: attempt, Time: at(ms)})
	states := make(map[string]fsm.TaskState)
	for _, task := range dashboardTasks {
		st := fsm.TaskState{TaskID: task.ID, Kind: task.Kind, Worker: task.Worker, AckedAt: at(ms + 5)}
		if task.Kind == fsm.TaskSource {
			st.RecordsIn, st.RecordsOut = in, 3*in
			st.Offsets = map[int32]int64{}
			for _, p := range task.Partitions {
				st.Offsets[p] = offsets[p]
			}
		} else {
			st.RecordsIn, st.RecordsOut = 3*in, out
			st.Keyed = fmt.Appendf(nil, "state %d", id)
			st.StateBytes = int64(len(st.Keyed))
			sum := sha256.Sum256(st.Keyed)
			st.KeyedSHA256 = hex.EncodeToString(sum[:])
			st.KeyGroups = task.KeyGroups
		}
		states[task.ID] = st
	}
	d.apply(fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{JobID: job, Attempt: attempt, CheckpointID: id, Time: at(ms + 10), States: states})
}

// The job view carries what the dashboard's job list shows: uptime from
// the attempt's start, each attempt's reason, and records per second from
// the record counts of the last two completed checkpoints.
func TestJobViewAttemptsAndThroughput(t *testing.T) {
	d := newDashboardFixture(t)
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	const job = "wordcount-1"
	d.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: job, Spec: spec, Time: at(0)})
	d.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 1, Tasks: dashboardTasks, Reason: "deployed", Time: at(100)})
	var jv apiJob
	d.get("/v1/jobs/"+job, &jv)
	if jv.Throughput != nil || jv.AttemptStartedAt != formatTime(at(100)) || len(jv.Attempts) != 1 {
		t.Fatalf("before any checkpoint: throughput %+v, attempt started %q, attempts %+v", jv.Throughput, jv.AttemptStartedAt, jv.Attempts)
	}

	offsets := map[int32]int64{0: 10, 1: 20, 2: 30}
	d.checkpoint(job, 1, 1, 1000, 100, 10, offsets)
	d.get("/v1/jobs/"+job, &jv)
	if jv.Throughput != nil {
		t.Fatalf("throughput %+v from one checkpoint", jv.Throughput)
	}
	// 2 s later: each of 2 sources read 4,000 more, each of 2 map tasks
	// emitted 1,000 more.
	d.checkpoint(job, 1, 2, 3000, 4100, 1010, offsets)
	d.get("/v1/jobs/"+job, &jv)
	want := apiThroughput{RecordsInPerSecond: 4000, RecordsOutPerSecond: 1000, FromCheckpoint: 1, ToCheckpoint: 2}
	if jv.Throughput == nil || *jv.Throughput != want {
		t.Fatalf("throughput %+v, want %+v", jv.Throughput, want)
	}

	d.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 2, Tasks: dashboardTasks, Reason: "worker w2 lost", RestoreFrom: 2, Time: at(5000)})
	d.get("/v1/jobs/"+job, &jv)
	if jv.Throughput != nil {
		t.Fatalf("throughput %+v across attempts: counts restart with each attempt", jv.Throughput)
	}
	wantAttempts := []apiAttempt{
		{Attempt: 2, StartedAt: formatTime(at(5000)), Reason: "worker w2 lost", RestoredFrom: 2},
		{Attempt: 1, StartedAt: formatTime(at(100)), Reason: "deployed"},
	}
	if fmt.Sprint(jv.Attempts) != fmt.Sprint(wantAttempts) || jv.AttemptStartedAt != formatTime(at(5000)) {
		t.Fatalf("attempts %+v (current started %s), want %+v", jv.Attempts, jv.AttemptStartedAt, wantAttempts)
	}

	// The history keeps what the retained checkpoints drop, newest first.
	for i := range uint64(5) {
		d.checkpoint(job, 2, 3+i, 6000+1000*int64(i), 10*int64(i), 0, offsets)
	}
	var hist []apiCheckpointSummary
	if code := d.get("/v1/jobs/"+job+"/checkpoints/history", &hist); code != http.StatusOK {
		t.Fatalf("history: %d", code)
	}
	if len(hist) != 7 || hist[0].ID != 7 || hist[6].ID != 1 {
		t.Fatalf("history %+v, want checkpoints 7..1", hist)
	}
	if h := hist[0]; h.Status != fsm.CheckpointCompleted || h.DurationMS != 10 || h.StateSize != 2*int64(len("state 7")) || h.Attempt != 2 {
		t.Fatalf("newest history entry %+v", h)
	}
	var cps []apiCheckpoint
	d.get("/v1/jobs/"+job+"/checkpoints", &cps)
	if len(cps) != spec.Checkpoint.Retained {
		t.Fatalf("%d checkpoints in full, want the %d retained", len(cps), spec.Checkpoint.Retained)
	}
	for _, tv := range cps[0].Tasks {
		if tv.ID == "source-0" && (tv.RecordsIn != 40 || tv.RecordsOut != 120) {
			t.Fatalf("source-0 in checkpoint %d: records %d in, %d out", cps[0].ID, tv.RecordsIn, tv.RecordsOut)
		}
	}
}

// GET /v1/workers counts the slots of running jobs' tasks on each worker
// gossip knows.
func TestWorkersView(t *testing.T) {
	d := newDashboardFixture(t)
	d.s.memberState["w1"] = &memberRecord{Member: Member{ID: "w1", Role: transport.RoleWorker, Status: StatusAlive, Slots: 8, DataAddr: "127.0.0.1:1"}}
	d.s.memberState["w2"] = &memberRecord{Member: Member{ID: "w2", Role: transport.RoleWorker, Status: StatusSuspect, Slots: 2}}
	d.s.memberState["w3"] = &memberRecord{Member: Member{ID: "w3", Role: transport.RoleWorker, Status: StatusAlive, Slots: 4}}
	d.s.memberState["c1"] = &memberRecord{Member: Member{ID: "c1", Role: transport.RoleCoordinator, Status: StatusAlive}}
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, job := range []string{"a", "b"} {
		d.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: job, Spec: spec, Time: at(0)})
		d.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 1, Tasks: dashboardTasks, Reason: "deployed", Time: at(1)})
	}
	// A job that is not running holds no slots.
	d.apply(fsm.CommandJobStatus, fsm.JobStatusCmd{JobID: "b", Status: fsm.JobRestarting, Reason: "worker lost", Time: at(2)})

	var ws []apiWorker
	if code := d.get("/v1/workers", &ws); code != http.StatusOK {
		t.Fatalf("GET /v1/workers: %d", code)
	}
	got := make(map[string]string)
	for _, w := range ws {
		got[w.ID] = fmt.Sprintf("%s %d/%d/%d %v", w.Status, w.SlotsUsed, w.SlotsFree, w.Slots, w.Tasks)
	}
	want := map[string]string{
		"w1": "alive 3/5/8 [{a source-0} {a map-0} {a map-1}]",
		"w2": "suspect 1/1/2 [{a source-1}]",
		"w3": "alive 0/4/4 []",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("workers:\n got %v\nwant %v", got, want)
	}
}

// GET /v1/jobs/{id}/lag asks the broker for the end of each partition and
// subtracts the last completed checkpoint's offsets.
func TestLagView(t *testing.T) {
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "words"))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	cfg := sarama.NewConfig()
	cfg.Producer.Return.Successes = true
	cfg.Producer.Partitioner = sarama.NewManualPartitioner
	producer, err := sarama.NewSyncProducer(kc.ListenAddrs(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer producer.Close()
	ends := map[int32]int64{0: 7, 1: 3, 2: 12}
	for p, n := range ends {
		for range n {
			if _, _, err := producer.SendMessage(&sarama.ProducerMessage{Topic: "words", Partition: p, Value: sarama.StringEncoder("a b")}); err != nil {
				t.Fatal(err)
			}
		}
	}

	d := newDashboardFixture(t)
	d.s.api.lag = viewCache[apiLag]{} // fresh, whatever the fixture did
	specJSON := strings.ReplaceAll(wordcountSpec, "127.0.0.1:9092", kc.ListenAddrs()[0])
	spec, err := fsm.ParseJobSpec([]byte(specJSON), nil)
	if err != nil {
		t.Fatal(err)
	}
	d.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: "wc", Spec: spec, Time: at(0)})
	d.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: "wc", Attempt: 1, Tasks: dashboardTasks, Reason: "deployed", Time: at(1)})

	var lag apiLag
	if code := d.get("/v1/jobs/wc/lag", &lag); code != http.StatusOK {
		t.Fatalf("GET lag: %d %+v", code, lag)
	}
	if lag.CheckpointID != 0 || lag.Total != 0 || len(lag.Partitions) != 3 || lag.Partitions[2].EndOffset != 12 || lag.Partitions[2].Lag != nil {
		t.Fatalf("lag before any checkpoint: %+v", lag)
	}

	d.checkpoint("wc", 1, 1, 1000, 5, 0, map[int32]int64{0: 5, 1: 3, 2: 2})
	d.s.api.lag = viewCache[apiLag]{} // the answer above is cached for a second
	if code := d.get("/v1/jobs/wc/lag", &lag); code != http.StatusOK {
		t.Fatalf("GET lag: %d %+v", code, lag)
	}
	var got []string
	for _, p := range lag.Partitions {
		got = append(got, fmt.Sprintf("%d:%d-%d=%d", p.Partition, p.EndOffset, *p.CheckpointOffset, *p.Lag))
	}
	if lag.CheckpointID != 1 || lag.Total != 12 || strings.Join(got, " ") != "0:7-5=2 1:3-3=0 2:12-2=10" {
		t.Fatalf("lag after checkpoint 1: total %d, %v", lag.Total, got)
	}

	// A broker that is gone: 502 naming it, not a hang.
	addr := kc.ListenAddrs()[0]
	kc.Close()
	d.s.api.lag = viewCache[apiLag]{}
	var e struct{ Error string }
	if code := d.get("/v1/jobs/wc/lag", &e); code != http.StatusBadGateway || !strings.Contains(e.Error, addr) {
		t.Fatalf("lag with the broker gone: %d %q, want 502 naming %s", code, e.Error, addr)
	}
}

// GET /v1/coordinators shows every coordinator's own Raft status, read from
// any of them, and says which one cannot be reached.
func TestCoordinatorsView(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	follower := followers(leader, servers)[0]
	var view []apiCoordinator
	waitFor(t, 10*time.Second, func() error {
		if code := apiCall(t, follower, http.MethodGet, "/v1/coordinators", nil, &view); code != http.StatusOK {
			return fmt.Errorf("GET /v1/coordinators: %d", code)
		}
		if len(view) != 3 {
			return fmt.Errorf("%d coordinators: %+v", len(view), view)
		}
		for _, c := range view {
			if c.Error != "" || c.Term == 0 || c.AppliedIndex == 0 || c.HTTPAddr == "" {
				return fmt.Errorf("coordinator %+v", c)
			}
			if (c.ID == leader.ID()) != (c.Leader && c.State == "Leader") {
				return fmt.Errorf("coordinator %s: leader %v, state %s; the leader is %s", c.ID, c.Leader, c.State, leader.ID())
			}
		}
		return nil
	})

	gone := followers(leader, servers)[1]
	stopServer(t, gone)
	waitFor(t, 10*time.Second, func() error {
		apiCall(t, follower, http.MethodGet, "/v1/coordinators", nil, &view)
		for _, c := range view {
			if c.ID == gone.ID() {
				if c.Error == "" {
					return fmt.Errorf("stopped coordinator %s shows no error: %+v", c.ID, c)
				}
				return nil
			}
		}
		return fmt.Errorf("stopped coordinator %s left out: %+v", gone.ID(), view)
	})
}

// The root redirects to the dashboard, whose files need no token.
func TestDashboardRoutes(t *testing.T) {
	d := newDashboardFixture(t)
	rec := httptest.NewRecorder()
	d.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	if rec.Code != http.StatusFound || rec.Header().Get("Location") != "/ui/" {
		t.Fatalf("GET /: %d Location %q", rec.Code, rec.Header().Get("Location"))
	}
	rec = httptest.NewRecorder()
	d.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/ui/", nil))
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "<html") {
		t.Fatalf("GET /ui/: %d %.200q", rec.Code, rec.Body)
	}
	rec = httptest.NewRecorder()
	d.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/nothing", nil))
	if rec.Code != http.StatusNotFound {
		t.Fatalf("GET /nothing: %d", rec.Code)
	}
}

// viewCache computes a key's answer once for the callers that ask while it
// is computed and for a second after; a caller that gives up waiting gets
// its context's error, and the others still get the answer.
func TestViewCache(t *testing.T) {
	var c viewCache[int]
	var calls atomic.Int32
	release := make(chan struct{})
	compute := func() (int, error) {
		calls.Add(1)
		<-release
		return 42, nil
	}
	var wg sync.WaitGroup
	results := make(chan int, 4)
	for range 4 {
		wg.Go(func() {
			v, err := c.get(t.Context(), "job", compute)
			if err != nil {
				t.Error(err)
			}
			results <- v
		})
	}
	// One more caller that leaves before the answer.
	ctx, cancel := context.WithCancel(t.Context())
	waitFor(t, 5*time.Second, func() error {
		if calls.Load() != 1 {
			return fmt.Errorf("%d computations started", calls.Load())
		}
		return nil
	})
	left := make(chan error, 1)
	go func() { _, err := c.get(ctx, "job", compute); left <- err }()
	cancel()
	if err := <-left; !errors.Is(err, context.Canceled) {
		t.Fatalf("a caller that left got %v, want context.Canceled", err)
	}
	close(release)
	wg.Wait()
	close(results)
	for v := range results {
		if v != 42 {
			t.Fatalf("a waiting caller got %d, want 42", v)
		}
	}
	if v, _ := c.get(t.Context(), "job", compute); v != 42 || calls.Load() != 1 {
		t.Fatalf("within the TTL: %d after %d computations, want the cached 42 after 1", v, calls.Load())
	}
	// Another key is computed on its own.
	if v, _ := c.get(t.Context(), "other", func() (int, error) { return 7, nil }); v != 7 {
		t.Fatalf("another key got %d", v)
	}
}
