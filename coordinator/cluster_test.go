package coordinator

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.etcd.io/bbolt"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
)

// TestClusterAPI bootstraps three coordinators with -bootstrap-expect 3 and
// drives the HTTP API through a follower: writes are forwarded to the leader,
// reads answer from each node's own FSM, and every replica ends equal.
func TestClusterAPI(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	follower := followers(leader, servers)[0]

	t.Run("status names the leader everywhere", func(t *testing.T) {
		for _, s := range servers {
			wantState := "Follower"
			if s == leader {
				wantState = "Leader"
			}
			// A follower may not have the leader's first entries yet.
			waitFor(t, 10*time.Second, func() error {
				var st apiStatus
				if code := apiCall(t, s, http.MethodGet, "/v1/status", nil, &st); code != http.StatusOK {
					return fmt.Errorf("GET /v1/status on %s: %d", s.ID(), code)
				}
				if st.ID != s.ID() || st.State != wantState || st.LeaderID != leader.ID() || st.LeaderHTTPAddr != leader.HTTPAddr() || st.Term == 0 || st.LastIndex == 0 {
					return fmt.Errorf("GET /v1/status on %s = %+v, want state %s, leader %s at %s", s.ID(), st, wantState, leader.ID(), leader.HTTPAddr())
				}
				return nil
			})
		}
	})

	t.Run("raft peers are the three voters", func(t *testing.T) {
		var peers struct{ Servers []apiPeer }
		if code := apiCall(t, follower, http.MethodGet, "/v1/raft/peers", nil, &peers); code != http.StatusOK {
			t.Fatalf("GET /v1/raft/peers: %d", code)
		}
		want := []apiPeer{
			{ID: "c1", Address: servers[0].RaftAddr(), Suffrage: "voter", Leader: leader == servers[0]},
			{ID: "c2", Address: servers[1].RaftAddr(), Suffrage: "voter", Leader: leader == servers[1]},
			{ID: "c3", Address: servers[2].RaftAddr(), Suffrage: "voter", Leader: leader == servers[2]},
		}
		if !slices.Equal(peers.Servers, want) {
			t.Errorf("GET /v1/raft/peers = %+v, want %+v", peers.Servers, want)
		}
	})

	t.Run("members lists the coordinators", func(t *testing.T) {
		var members []Member
		if code := apiCall(t, follower, http.MethodGet, "/v1/members", nil, &members); code != http.StatusOK {
			t.Fatalf("GET /v1/members: %d", code)
		}
		if len(members) != 3 {
			t.Fatalf("GET /v1/members = %+v, want 3 members", members)
		}
		for i, m := range members {
			s := servers[i]
			want := Member{ID: s.ID(), Role: transport.RoleCoordinator, GossipAddr: s.GossipAddr(), Status: StatusAlive,
				RaftAddr: s.RaftAddr(), RPCAddr: s.RPCAddr(), HTTPAddr: s.HTTPAddr(), Voter: true, FeatureLevel: transport.FeatureLevel}
			if m != want {
				t.Errorf("member %d = %+v, want %+v", i, m, want)
			}
		}
	})

	var jobID string
	t.Run("a job posted to a follower is on every node", func(t *testing.T) {
		jobID = submitJob(t, follower, wordcountSpec)
		if !strings.HasPrefix(jobID, "wordcount-") {
			t.Errorf("job id %q, want wordcount-<hex>", jobID)
		}
		// Read your writes: the follower answers the forwarded POST only
		// once it has applied the job itself.
		var job apiJob
		if code := apiCall(t, follower, http.MethodGet, "/v1/jobs/"+jobID, nil, &job); code != http.StatusOK {
			t.Errorf("GET /v1/jobs/%s on %s right after the POST: %d", jobID, follower.ID(), code)
		}
		for _, s := range servers {
			waitFor(t, 10*time.Second, func() error {
				var job apiJob
				if code := apiCall(t, s, http.MethodGet, "/v1/jobs/"+jobID, nil, &job); code != http.StatusOK {
					return fmt.Errorf("GET /v1/jobs/%s on %s: %d", jobID, s.ID(), code)
				}
				if job.ID != jobID || job.Name != "wordcount" || job.Spec.Source.Topic != "words" || job.Spec.Source.Group != "coordflow-wordcount" {
					return fmt.Errorf("GET /v1/jobs/%s on %s = %+v", jobID, s.ID(), job)
				}
				return nil
			})
		}
		var jobs []apiJob
		if code := apiCall(t, servers[0], http.MethodGet, "/v1/jobs", nil, &jobs); code != http.StatusOK || len(jobs) != 1 || jobs[0].ID != jobID {
			t.Errorf("GET /v1/jobs = %d %+v, want the one job", code, jobs)
		}
		waitForEqualDigests(t, servers...)
	})

	t.Run("bad specs are refused naming the field", func(t *testing.T) {
		for _, tc := range []struct {
			name, spec, field string
		}{
			{"unknown field", strings.Replace(wordcountSpec, `"name"`, `"colour": "red", "name"`, 1), "colour"},
			{"parallelism 0", strings.Replace(wordcountSpec, `"parallelism": 2}`, `"parallelism": 0}`, 1), "source.parallelism"},
			{"missing topic", strings.Replace(wordcountSpec, `"topic": "words", `, "", 1), "source.topic"},
			{"unknown operator", strings.Replace(wordcountSpec, `"name": "wordcount", "parallelism"`, `"name": "median", "parallelism"`, 1), "operator.name"},
			{"not json", "{", ""},
		} {
			t.Run(tc.name, func(t *testing.T) {
				var out struct{ Error string }
				code := apiCall(t, follower, http.MethodPost, "/v1/jobs", tc.spec, &out)
				if code != http.StatusBadRequest || !strings.Contains(out.Error, tc.field) {
					t.Errorf("POST /v1/jobs = %d %q, want 400 naming %q", code, out.Error, tc.field)
				}
			})
		}
	})

	t.Run("unknown jobs are 404", func(t *testing.T) {
		for _, req := range []struct{ method, path string }{
			{http.MethodGet, "/v1/jobs/nope"},
			{http.MethodGet, "/v1/jobs/nope/checkpoints"},
			{http.MethodGet, "/v1/jobs/nope/state"},
			{http.MethodDelete, "/v1/jobs/nope"},
		} {
			var out struct{ Error string }
			if code := apiCall(t, follower, req.method, req.path, nil, &out); code != http.StatusNotFound || out.Error == "" {
				t.Errorf("%s %s = %d %q, want 404 with an error", req.method, req.path, code, out.Error)
			}
		}
	})

	t.Run("state before any checkpoint is 404", func(t *testing.T) {
		var out struct{ Error string }
		code := apiCall(t, follower, http.MethodGet, "/v1/jobs/"+jobID+"/state", nil, &out)
		if code != http.StatusNotFound || !strings.Contains(out.Error, "no completed checkpoint") {
			t.Errorf("GET state = %d %q, want 404 saying no checkpoint completed", code, out.Error)
		}
	})

	t.Run("cancel through a follower, twice", func(t *testing.T) {
		var out struct{ ID, Status, Error string }
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+jobID, nil, &out); code != http.StatusOK || out.Status != "cancelled" {
			t.Fatalf("DELETE /v1/jobs/%s = %d %+v, want 200 cancelled", jobID, code, out)
		}
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+jobID, nil, &out); code != http.StatusConflict {
			t.Errorf("second DELETE /v1/jobs/%s = %d %+v, want 409", jobID, code, out)
		}
		var job apiJob
		apiCall(t, follower, http.MethodGet, "/v1/jobs/"+jobID, nil, &job)
		if job.Status != fsm.JobCancelled {
			t.Errorf("job status on %s = %q, want cancelled", follower.ID(), job.Status)
		}
		waitForEqualDigests(t, servers...)
	})

	t.Run("a forwarded write is not forwarded again", func(t *testing.T) {
		req, err := http.NewRequest(http.MethodPost, "http://"+follower.HTTPAddr()+"/v1/jobs", strings.NewReader(wordcountSpec))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set(forwardedHeader, "c9")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("POST marked forwarded to follower %s: %d, want 503", follower.ID(), resp.StatusCode)
		}
	})

	t.Run("purge through a follower", func(t *testing.T) {
		var out struct {
			ID, Status, Error string
			FilesDeleted      int `json:"files_deleted"`
		}
		second := submitJob(t, follower, wordcountSpec)
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+second+"?purge=true&savepoint=true", nil, &out); code != http.StatusBadRequest || !strings.Contains(out.Error, "savepoint first") {
			t.Errorf("DELETE ?purge=true&savepoint=true = %d %+v, want 400 saying to stop with a savepoint first", code, out)
		}
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+second+"?force=true", nil, &out); code != http.StatusBadRequest || !strings.Contains(out.Error, "purge=true only") {
			t.Errorf("DELETE ?force=true = %d %+v, want 400 saying it goes with purge=true", code, out)
		}
		// A value that is not a boolean is refused, not read as false (a
		// cancel without the savepoint asked for would lose it), and an
		// empty one is not read as true. The longest wait, with the cancel's
		// Raft write before it, fits in a forwarding follower's wait for
		// the leader's answer.
		if maxPurgeWait+defaultApplyTimeout >= forwardTransport.ResponseHeaderTimeout {
			t.Errorf("a purge may wait %v after a write of up to %v, a forwarding follower waits %v", maxPurgeWait, defaultApplyTimeout, forwardTransport.ResponseHeaderTimeout)
		}
		for _, q := range []string{"savepoint=yes", "purge=please", "purge=true&force=always", "purge=", "purge=true&force=", "purge=true&wait=forever", "purge=true&wait=0s", "purge=true&wait=6m"} {
			out.Error = ""
			name := q[strings.LastIndex(q, "&")+1 : strings.LastIndex(q, "=")]
			if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+second+"?"+q, nil, &out); code != http.StatusBadRequest || !strings.Contains(out.Error, name+"=") {
				t.Errorf("DELETE ?%s = %d %+v, want 400 naming %s", q, code, out, name)
			}
		}
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+second+"?wait=5s", nil, &out); code != http.StatusBadRequest || !strings.Contains(out.Error, "purge=true only") {
			t.Errorf("DELETE ?wait=5s = %d %+v, want 400 saying it goes with purge=true", code, out)
		}
		if code := apiCall(t, follower, http.MethodGet, "/v1/jobs/"+second, nil, &out); code != http.StatusOK || out.Status == "cancelled" {
			t.Fatalf("GET /v1/jobs/%s after refused cancels = %d, status %q, want it not cancelled", second, code, out.Status)
		}
		// The cancelled job of the subtest above, and a running one that
		// the same request cancels: neither has tasks, and the threshold
		// (4 h) does not hold them.
		for _, id := range []string{jobID, second} {
			if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+id+"?purge=true", nil, &out); code != http.StatusOK || out.Status != "purged" {
				t.Fatalf("DELETE /v1/jobs/%s?purge=true = %d %+v, want 200 purged", id, code, out)
			}
			// Read your writes: the follower has applied the purge.
			if code := apiCall(t, follower, http.MethodGet, "/v1/jobs/"+id, nil, &out); code != http.StatusNotFound {
				t.Errorf("GET /v1/jobs/%s on %s after its purge = %d, want 404", id, follower.ID(), code)
			}
		}
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+jobID+"?purge=true", nil, &out); code != http.StatusNotFound {
			t.Errorf("DELETE ?purge=true of a purged job = %d %+v, want 404", code, out)
		}

		// A job whose checkpoint storage cannot be opened (a file where
		// its directory should be): the purge is pending with the
		// storage's error; forced, it goes, and says what is left.
		notADir := filepath.Join(t.TempDir(), "not-a-dir")
		if err := os.WriteFile(notADir, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		stuck := submitJob(t, follower, strings.Replace(wordcountSpec, `"retained": 3`, `"retained": 3, "storage": "file://`+notADir+`"`, 1))
		var pending struct{ Status, Purge, Reason string }
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+stuck+"?purge=true", nil, &pending); code != http.StatusAccepted ||
			pending.Purge != "pending" || !strings.Contains(pending.Reason, "checkpoint files") {
			t.Fatalf("DELETE ?purge=true of a job whose storage fails = %d %+v, want 202 pending naming its files", code, pending)
		}
		var forced struct {
			Status    string
			FilesLeft string `json:"files_left"`
		}
		if code := apiCall(t, follower, http.MethodDelete, "/v1/jobs/"+stuck+"?purge=true&force=true", nil, &forced); code != http.StatusOK ||
			forced.Status != "purged" || !strings.Contains(forced.FilesLeft, "could not be deleted") {
			t.Fatalf("DELETE ?purge=true&force=true = %d %+v, want 200 purged, naming the files left", code, forced)
		}
		if code := apiCall(t, follower, http.MethodGet, "/v1/jobs/"+stuck, nil, &out); code != http.StatusNotFound {
			t.Errorf("GET /v1/jobs/%s after its forced purge = %d, want 404", stuck, code)
		}
		waitForEqualDigests(t, servers...)
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + leader.HTTPAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, want := range []string{"coordflow_raft_state 2", "coordflow_raft_term ", "coordflow_raft_last_index ", "coordflow_raft_apply_duration_seconds",
			`coordflow_raft_log_store_duration_seconds_count{op="append"}`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("GET /metrics on the leader lacks %q", want)
			}
		}
	})
}

// TestFollowerRestartRejoins stops a follower, writes while it is down, and
// starts it again with the same data dir: it rejoins as a follower without
// bootstrapping and catches up.
func TestFollowerRestartRejoins(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	submitJob(t, leader, wordcountSpec)
	waitForEqualDigests(t, servers...)

	i := slices.IndexFunc(servers, func(s *Server) bool { return s != leader })
	stopped := servers[i]
	stopServer(t, stopped)
	waitFor(t, 10*time.Second, func() error {
		return memberStatusIs(leader, stopped.ID(), StatusLeft)
	})

	submitJob(t, leader, strings.Replace(wordcountSpec, `"name": "wordcount"`, `"name": "second"`, 1))

	restarted := startServer(t, restartConfig(stopped, leader.GossipAddr()))
	servers[i] = restarted
	if !restarted.raftHadState {
		t.Errorf("restarted %s found no raft state in %s", restarted.ID(), restarted.cfg.DataDir)
	}
	if got := waitForLeader(t, servers...); got == restarted {
		t.Errorf("restarted %s became leader", restarted.ID())
	}
	waitForEqualDigests(t, servers...)
	waitFor(t, 10*time.Second, func() error {
		return memberStatusIs(leader, restarted.ID(), StatusAlive)
	})
	if jobs := restarted.fsm.Jobs(); len(jobs) != 2 {
		t.Errorf("restarted %s holds %d jobs, want 2", restarted.ID(), len(jobs))
	}
}

// memberStatusIs reports whether s sees member id with the given status.
func memberStatusIs(s *Server, id, status string) error {
	for _, m := range s.Members() {
		if m.ID == id {
			if m.Status != status {
				return fmt.Errorf("%s sees %s %s, want %s", s.ID(), id, m.Status, status)
			}
			return nil
		}
	}
	return fmt.Errorf("%s does not know member %s", s.ID(), id)
}

// TestFourthCoordinatorJoins starts a fourth coordinator with the same
// -bootstrap-expect 3 after the cluster formed: it must not bootstrap a
// second cluster, and `coordd raft add-peer` (POST /v1/raft/peers, sent to
// a follower, which forwards it) adds it to the existing one as a voter:
// without TLS the leader adds no coordinator from gossip
// (TestPeerNotAddedFromGossipWithoutTLS).
func TestFourthCoordinatorJoins(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	submitJob(t, leader, wordcountSpec)

	cfg := testConfig(t, servers[0].cfg.Logger, "c4")
	cfg.BootstrapExpect = 3
	cfg.Join = []string{servers[1].GossipAddr()}
	fourth := startServer(t, cfg)
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(leader, "c4", StatusAlive) })
	if fourth.raft.LastIndex() != 0 {
		t.Fatalf("c4 has raft entries before it was added: it bootstrapped a cluster of its own")
	}
	var added apiAddedPeer
	if code := apiCall(t, followers(leader, servers)[0], http.MethodPost, "/v1/raft/peers",
		map[string]any{"id": "c4", "address": fourth.RaftAddr(), "voter": true}, &added); code != http.StatusOK || !added.Changed {
		t.Fatalf("POST /v1/raft/peers c4 = %d %+v", code, added)
	}
	servers = append(servers, fourth)

	waitFor(t, 15*time.Second, func() error {
		f := leader.raft.GetConfiguration()
		if err := f.Error(); err != nil {
			return err
		}
		for _, srv := range f.Configuration().Servers {
			if srv.ID == "c4" {
				if srv.Suffrage != raft.Voter || string(srv.Address) != fourth.RaftAddr() {
					return fmt.Errorf("c4 in the raft configuration as %+v", srv)
				}
				return nil
			}
		}
		return fmt.Errorf("c4 not in the raft configuration %+v", f.Configuration().Servers)
	})
	if got := waitForLeader(t, servers...); got != leader {
		t.Errorf("leader changed from %s to %s when c4 joined", leader.ID(), got.ID())
	}
	waitForEqualDigests(t, servers...)
	if n := len(fourth.fsm.Jobs()); n != 1 {
		t.Errorf("c4 holds %d jobs, want 1", n)
	}
}

// TestNoLeader runs a coordinator that never bootstraps: reads of its own
// (empty) FSM need ?stale=true, since it never heard from a leader; writes
// answer 503 "no leader".
func TestNoLeader(t *testing.T) {
	s := startServer(t, testConfig(t, testLogger(t), "c1"))
	var st apiStatus
	if code := apiCall(t, s, http.MethodGet, "/v1/status", nil, &st); code != http.StatusOK || st.State != "Follower" || st.LeaderID != "" || st.LeaderHTTPAddr != "" ||
		st.LastContactMS != -1 || st.KnownLeader || st.ServesReads {
		t.Errorf("GET /v1/status = %d %+v, want a follower with no leader, never contacted, serving no reads", code, st)
	}
	var out struct{ Error string }
	if code := apiCall(t, s, http.MethodGet, "/v1/jobs", nil, &out); code != http.StatusServiceUnavailable || !strings.Contains(out.Error, "?stale=true") {
		t.Errorf("GET /v1/jobs = %d %q, want 503 naming ?stale=true", code, out.Error)
	}
	var jobs []apiJob
	if code := apiCall(t, s, http.MethodGet, "/v1/jobs?stale=true", nil, &jobs); code != http.StatusOK || len(jobs) != 0 {
		t.Errorf("GET /v1/jobs?stale=true = %d %+v, want 200 and no jobs", code, jobs)
	}
	if code := apiCall(t, s, http.MethodPost, "/v1/jobs", wordcountSpec, &out); code != http.StatusServiceUnavailable || !strings.HasPrefix(out.Error, "no leader: ") {
		t.Errorf("POST /v1/jobs = %d %q, want 503 \"no leader: ...\"", code, out.Error)
	}
	if code := apiCall(t, s, http.MethodGet, "/v1/nothing", nil, &out); code != http.StatusNotFound || out.Error == "" {
		t.Errorf("GET /v1/nothing = %d %q, want a JSON 404", code, out.Error)
	}
}

// TestLockedDataDirFailsFast starts a coordinator on a data dir whose Raft
// store another process holds open: it must fail with a clear error, not hang.
func TestLockedDataDirFailsFast(t *testing.T) {
	cfg := testConfig(t, testLogger(t), "c1")
	cfg.DataDir = t.TempDir()
	db, err := bbolt.Open(filepath.Join(cfg.DataDir, raftDBFile), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	start := time.Now()
	s, err := NewServer(cfg)
	if err == nil {
		stopServer(t, s)
		t.Fatal("NewServer on a locked data dir succeeded")
	}
	if !strings.Contains(err.Error(), "locked by another process") {
		t.Errorf("NewServer on a locked data dir: %v, want an error saying it is locked", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("NewServer took %v to fail", d)
	}
}

// TestMemberStatus feeds memberlist events to the event delegate: a member
// that died is dead, one that marked itself leaving first has left, and one
// that comes back is alive again.
func TestMemberStatus(t *testing.T) {
	s := &Server{cfg: Config{ID: "c1"}, logger: slog.New(slog.DiscardHandler), memberState: make(map[string]*memberRecord), memberEvents: make(chan struct{}, 1)}
	node := func(name string, meta transport.NodeMeta) *memberlist.Node {
		b, err := json.Marshal(meta)
		if err != nil {
			t.Fatal(err)
		}
		return &memberlist.Node{Name: name, Addr: []byte{127, 0, 0, 1}, Port: 7501, Meta: b}
	}
	worker := transport.NodeMeta{Role: transport.RoleWorker, DataAddr: "127.0.0.1:7401", Slots: 4}
	leaving := worker
	leaving.Leaving = true
	ev := eventDelegate{s}

	ev.NotifyJoin(node("w1", worker))
	ev.NotifyJoin(node("w2", worker))
	want := Member{ID: "w1", Role: transport.RoleWorker, GossipAddr: "127.0.0.1:7501", Status: StatusAlive, DataAddr: "127.0.0.1:7401", Slots: 4}
	if got := s.aliveWorkers(); len(got) != 2 || got[0] != want {
		t.Fatalf("alive workers %+v, want w1 %+v and w2", got, want)
	}
	ev.NotifyLeave(node("w1", worker))
	ev.NotifyUpdate(node("w2", leaving))
	ev.NotifyLeave(node("w2", leaving))
	if err := errors.Join(memberStatusIs(s, "w1", StatusDead), memberStatusIs(s, "w2", StatusLeft)); err != nil {
		t.Error(err)
	}
	if got := s.aliveWorkers(); len(got) != 0 {
		t.Errorf("alive workers %+v, want none", got)
	}
	ev.NotifyJoin(node("w2", worker))
	if err := memberStatusIs(s, "w2", StatusAlive); err != nil {
		t.Error(err)
	}
	// The gossip health metric counts them by role and status.
	wantMetric := `
# HELP coordflow_gossip_members Gossip members this coordinator knows, by role and status (alive, suspect, dead, left).
# TYPE coordflow_gossip_members gauge
coordflow_gossip_members{role="worker",status="alive"} 1
coordflow_gossip_members{role="worker",status="dead"} 1
`
	if err := testutil.CollectAndCompare(memberCollector{s.Members}, strings.NewReader(wantMetric)); err != nil {
		t.Error(err)
	}
	// A leaving notice counts even when gossip delivers the leave before
	// the leaving mark.
	notice, err := transport.LeavingNotice{Leaving: "w2"}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	gossipDelegate{s}.NotifyMsg(notice)
	ev.NotifyLeave(node("w2", worker))
	if err := memberStatusIs(s, "w2", StatusLeft); err != nil {
		t.Error(err)
	}
	ev.NotifyJoin(node("w2", worker))
	ev.NotifyLeave(node("w2", worker))
	if err := memberStatusIs(s, "w2", StatusDead); err != nil {
		t.Errorf("after a comeback: %v", err)
	}
	ev.NotifyJoin(&memberlist.Node{Name: "x", Meta: []byte("{")})
	if m := s.Members(); len(m) != 3 || m[2].Role != roleUnknown {
		t.Errorf("members %+v, want x with role %q", m, roleUnknown)
	}
}

// TestJobViews checks the job, checkpoint and state views over an FSM that
// holds a completed, an aborted and a pending checkpoint.
func TestJobViews(t *testing.T) {
	f := fsm.New()
	index := uint64(0)
	apply := func(ct fsm.CommandType, cmd any) {
		t.Helper()
		data, err := fsm.Encode(ct, cmd)
		if err != nil {
			t.Fatal(err)
		}
		index++
		if _, err := fsm.Result(f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: data})); err != nil {
			t.Fatalf("apply %v: %v", ct, err)
		}
	}
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	const job = "wordcount-1"
	sec := func(n int64) int64 {
		return time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano() + n*int64(time.Second)
	}
	keyed := func(entries ...kgEntry) ([]byte, string) {
		var buf bytes.Buffer
		sum := writeStateFile(t, &buf, entries...)
		return buf.Bytes(), sum
	}
	tasks := []fsm.Task{
		{ID: "source-0", Kind: fsm.TaskSource, Index: 0, Worker: "w1", Partitions: []int32{0, 2}},
		{ID: "source-1", Kind: fsm.TaskSource, Index: 1, Worker: "w2", Partitions: []int32{1}},
		{ID: "map-0", Kind: fsm.TaskMap, Index: 0, Worker: "w1", KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 64}},
		{ID: "map-1", Kind: fsm.TaskMap, Index: 1, Worker: "w2", KeyGroups: &fsm.KeyGroupRange{Start: 64, End: 128}},
	}
	k0, sum0 := keyed(kgEntry{3, "a", 2}, kgEntry{3, "b", 1})
	k1, sum1 := keyed(kgEntry{70, "c", 5}, kgEntry{99, "d", 1})

	apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: job, Spec: spec, Time: sec(0)})
	apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 1, Tasks: tasks, Reason: "deployed", Time: sec(1)})
	apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: sec(2)})
	apply(fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{JobID: job, Attempt: 1, CheckpointID: 1, Time: sec(3), States: map[string]fsm.TaskState{
		"source-0": {TaskID: "source-0", Kind: fsm.TaskSource, Worker: "w1", AckedAt: sec(2), Offsets: map[int32]int64{0: 10, 2: 20}},
		"source-1": {TaskID: "source-1", Kind: fsm.TaskSource, Worker: "w2", AckedAt: sec(2), Offsets: map[int32]int64{1: 11}},
		"map-0": {TaskID: "map-0", Kind: fsm.TaskMap, Worker: "w1", AckedAt: sec(3), Keyed: k0, KeyedSHA256: sum0, AlignmentMicros: 2500,
			ValueEncoding: "int64", Keys: 2, KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 64}},
		"map-1": {TaskID: "map-1", Kind: fsm.TaskMap, Worker: "w2", AckedAt: sec(3), Keyed: k1, KeyedSHA256: sum1,
			ValueEncoding: "int64", Keys: 2, KeyGroups: &fsm.KeyGroupRange{Start: 64, End: 128}},
	}})
	apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: sec(4)})
	apply(fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{JobID: job, CheckpointID: 2, Reason: "timeout", Time: sec(34)})
	apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: sec(35)})

	s := &Server{cfg: Config{ID: "c1"}, logger: slog.New(slog.DiscardHandler), fsm: f, metrics: newMetrics(), stores: storage.NewPool()}
	s.state = &stateReader{stores: s.stores}
	defer s.stores.Close()
	h := s.newHTTPServer().Handler
	get := func(path string, out any) int {
		t.Helper()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			t.Fatalf("GET %s: %d %q: %v", path, rec.Code, rec.Body, err)
		}
		return rec.Code
	}

	var jv apiJob
	if code := get("/v1/jobs/"+job, &jv); code != http.StatusOK {
		t.Fatalf("GET job: %d", code)
	}
	if jv.Status != fsm.JobRunning || jv.Attempt != 1 || len(jv.Tasks) != 4 || jv.LastCheckpoint == nil ||
		*jv.LastCheckpoint != (apiCheckpointRef{ID: 1, CompletedAt: "2025-01-02T03:04:08Z"}) {
		t.Errorf("job view %+v", jv)
	}
	if tv := jv.Tasks[0]; tv.ID != "source-0" || !slices.Equal(tv.Partitions, []int32{0, 2}) || tv.KeyGroups != nil {
		t.Errorf("task view %+v", tv)
	}
	if tv := jv.Tasks[3]; tv.ID != "map-1" || tv.Partitions != nil || *tv.KeyGroups != (fsm.KeyGroupRange{Start: 64, End: 128}) {
		t.Errorf("task view %+v", tv)
	}

	var cps []apiCheckpoint
	if code := get("/v1/jobs/"+job+"/checkpoints", &cps); code != http.StatusOK {
		t.Fatalf("GET checkpoints: %d", code)
	}
	var got []string
	for _, cp := range cps {
		d := "-"
		if cp.DurationMS != nil {
			d = fmt.Sprint(*cp.DurationMS)
		}
		got = append(got, fmt.Sprintf("%d %s %s %s %q %d", cp.ID, cp.Status, cp.TriggerTime, d, cp.Reason, len(cp.Tasks)))
	}
	want := []string{
		`3 pending 2025-01-02T03:04:40Z - "" 0`,
		`2 aborted 2025-01-02T03:04:09Z 30000 "timeout" 0`,
		`1 completed 2025-01-02T03:04:07Z 1000 "" 4`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("checkpoints\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if tv := cps[2].Tasks[0]; tv.ID != "map-0" || tv.StateSize != int64(len(k0)) || tv.AckTime != "2025-01-02T03:04:08Z" || tv.AlignmentMS == nil || *tv.AlignmentMS != 2.5 {
		t.Errorf("checkpoint task view %+v", tv)
	}

	var st apiState
	if code := get("/v1/jobs/"+job+"/state", &st); code != http.StatusOK {
		t.Fatalf("GET state: %d", code)
	}
	wantOffsets := map[string]int64{"words/0": 10, "words/1": 11, "words/2": 20}
	wantKeyed := map[string]any{"a": 2.0, "b": 1.0, "c": 5.0, "d": 1.0}
	if st.CheckpointID != 1 || !maps.Equal(st.Offsets, wantOffsets) || !maps.Equal(st.Keyed, wantKeyed) || st.Keys != 4 {
		t.Errorf("state %+v, want checkpoint 1, offsets %v, keyed %v", st, wantOffsets, wantKeyed)
	}
}
