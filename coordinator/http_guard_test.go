package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// TestHTTPBodyNeverArrives sends the headers of a POST /v1/jobs that
// announce a body and never sends it: the connection is cut within the body
// deadline, not held.
func TestHTTPBodyNeverArrives(t *testing.T) {
	s := startClusterWith(t, 1, func(*Config) {})[0]
	for _, path := range []string{"/v1/jobs", "/v1/jobs/nope/savepoints"} {
		conn, err := net.Dial("tcp", s.HTTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = conn.SetDeadline(start.Add(bodyTimeout + 10*time.Second))
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{", path)
		// The answer comes (408 when the handler reads the body, at
		// once otherwise), and then the connection closes.
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s: no answer: %v", path, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		_, err = conn.Read(make([]byte, 1))
		took := time.Since(start)
		conn.Close()
		if !errors.Is(err, io.EOF) && !isConnReset(err) {
			t.Errorf("%s: connection not closed after the answer: %v", path, err)
		}
		if took > bodyTimeout+2*time.Second {
			t.Errorf("%s: connection held %v, want at most %v", path, took, bodyTimeout)
		}
		if path == "/v1/jobs" && resp.StatusCode != http.StatusRequestTimeout {
			t.Errorf("%s: answer %d, want 408", path, resp.StatusCode)
		}
		t.Logf("%s: %d, closed after %v", path, resp.StatusCode, took.Round(time.Millisecond))
	}
}

func isConnReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// TestHTTPBounds checks the caps on bodies and headers and the limit on
// concurrent full-state reads.
func TestHTTPBounds(t *testing.T) {
	s := startClusterWith(t, 1, func(*Config) {})[0]
	base := "http://" + s.HTTPAddr()

	// The server answers an oversized body with 413 and closes the
	// connection while the client may still be writing; the client then
	// sees the reset instead of the answer. That loses the answer, it does
	// not contradict it: post again (a few times) to read it.
	postStatus := func(path, body string) int {
		t.Helper()
		for attempt := 1; ; attempt++ {
			resp, err := http.Post(base+path, "application/json", strings.NewReader(body))
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return resp.StatusCode
			}
			if (!isConnReset(err) && !strings.Contains(err.Error(), "broken pipe")) || attempt == 10 {
				t.Fatalf("POST %s with a %d-byte body: %v (attempt %d)", path, len(body), err, attempt)
			}
		}
	}
	if code := postStatus("/v1/jobs/x/savepoints", strings.Repeat("x", maxSmallBody+1)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("savepoint request with a %d-byte body: %d, want 413", maxSmallBody+1, code)
	}
	if code := postStatus("/v1/jobs", "{"+strings.Repeat(" ", maxSpecBytes)+"}"); code != http.StatusRequestEntityTooLarge {
		t.Errorf("job spec of %d bytes: %d, want 413", maxSpecBytes+2, code)
	}
	req, _ := http.NewRequest("GET", base+"/v1/jobs", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 2*maxHeaderBytes))
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("headers of %d bytes: %v %v, want 431", 2*maxHeaderBytes, resp, err)
	} else {
		resp.Body.Close()
	}

	// Full-state reads beyond maxStateReads are answered 429.
	for range maxStateReads {
		s.api.stateReads <- struct{}{}
	}
	for _, path := range []string{"/v1/jobs/x/state", "/v1/jobs/x/state/export"} {
		a := request(t, http.DefaultClient, base, "GET", path, "", "")
		if a.code != http.StatusTooManyRequests || a.header.Get("Retry-After") == "" {
			t.Errorf("GET %s with every slot taken: %d %s (Retry-After %q), want 429 with Retry-After", path, a.code, a.body, a.header.Get("Retry-After"))
		}
	}
	if a := request(t, http.DefaultClient, base, "GET", "/v1/jobs/x/state?key=a", "", ""); a.code != http.StatusNotFound {
		t.Errorf("GET one key with every slot taken: %d, want 404 (no job): one key is cheap", a.code)
	}
	for range maxStateReads {
		<-s.api.stateReads
	}
	if a := request(t, http.DefaultClient, base, "GET", "/v1/jobs/x/state/export", "", ""); a.code != http.StatusNotFound {
		t.Errorf("GET export with free slots: %d %s, want 404 (no job)", a.code, a.body)
	}
}

// TestHTTPDigestComputedOnce sends concurrent GET /v1/fsm/digest: they are
// answered by one computation, and a later call at the same applied index
// by the cache.
func TestHTTPDigestComputedOnce(t *testing.T) {
	s := startClusterWith(t, 1, func(*Config) {})[0]
	release := make(chan struct{})
	s.api.digest.compute = func() (string, error) {
		<-release
		return s.fsm.Digest()
	}
	const n = 16
	var wg sync.WaitGroup
	answers := make([]httpAnswer, n)
	for i := range n {
		wg.Go(func() {
			answers[i] = request(t, http.DefaultClient, "http://"+s.HTTPAddr(), "GET", "/v1/fsm/digest", "", "")
		})
	}
	time.Sleep(300 * time.Millisecond) // let them all arrive
	close(release)
	wg.Wait()
	for i, a := range answers {
		if a.code != http.StatusOK || string(a.body) != string(answers[0].body) {
			t.Errorf("answer %d: %d %s, want 200 and %s", i, a.code, a.body, answers[0].body)
		}
	}
	if got := s.api.digest.computed.Load(); got != 1 {
		t.Errorf("%d concurrent digest calls computed it %d times, want once", n, got)
	}
	before := s.appliedIndex()
	request(t, http.DefaultClient, "http://"+s.HTTPAddr(), "GET", "/v1/fsm/digest", "", "")
	if got := s.api.digest.computed.Load(); got != 1 && s.appliedIndex() == before {
		t.Errorf("a digest call at the same applied index computed it again (%d computations)", got)
	}
}

// TestHTTPStaleReads cuts a follower off from the leader (the other two
// coordinators stop): past MaxStale it refuses reads of its FSM with 503
// unless ?stale=true, and every read answer says how stale it is.
func TestHTTPStaleReads(t *testing.T) {
	const maxStale = time.Second
	servers := startClusterWith(t, 3, func(c *Config) { c.MaxStale = maxStale })
	leader := waitForLeader(t, servers...)
	fs := followers(leader, servers)
	f := fs[0]
	base := "http://" + f.HTTPAddr()
	submitJob(t, leader, wordcountSpec)

	a := request(t, http.DefaultClient, base, "GET", "/v1/jobs", "", "")
	ms, err := strconv.ParseInt(a.header.Get(lastContactHeader), 10, 64)
	if a.code != http.StatusOK || err != nil || ms < 0 || ms > maxStale.Milliseconds() || a.header.Get(knownLeaderHeader) != "true" {
		t.Errorf("GET /v1/jobs on follower %s: %d, %s %q, %s %q; want 200 with a recent contact and a known leader",
			f.ID(), a.code, lastContactHeader, a.header.Get(lastContactHeader), knownLeaderHeader, a.header.Get(knownLeaderHeader))
	}
	a = request(t, http.DefaultClient, "http://"+leader.HTTPAddr(), "GET", "/v1/jobs", "", "")
	if a.header.Get(lastContactHeader) != "0" || a.header.Get(knownLeaderHeader) != "true" {
		t.Errorf("leader's headers: %s %q, %s %q; want 0 and true", lastContactHeader, a.header.Get(lastContactHeader), knownLeaderHeader, a.header.Get(knownLeaderHeader))
	}

	stopServer(t, fs[1])
	stopServer(t, leader)
	waitFor(t, 15*time.Second, func() error {
		a := request(t, http.DefaultClient, base, "GET", "/v1/jobs", "", "")
		if a.code != http.StatusServiceUnavailable || !strings.Contains(a.errorText(), "last heard from the raft leader") {
			// The leader's leaving may hand c2 the leadership for a
			// moment, before it finds it has no quorum.
			return fmt.Errorf("GET /v1/jobs on %s: %d %s", f.ID(), a.code, a.errorText())
		}
		if !strings.Contains(a.errorText(), "?stale=true") || a.header.Get("Retry-After") == "" {
			t.Fatalf("refusal %q (Retry-After %q): want the reason, ?stale=true and Retry-After", a.body, a.header.Get("Retry-After"))
		}
		return nil
	})
	var jobs []apiJob
	if code := apiCall(t, f, "GET", "/v1/jobs?stale=true", nil, &jobs); code != http.StatusOK || len(jobs) != 1 {
		t.Errorf("GET /v1/jobs?stale=true on the cut-off follower: %d %+v, want 200 and the job", code, jobs)
	}
	if code := apiCall(t, f, "GET", "/v1/jobs?stale=false", nil, nil); code != http.StatusServiceUnavailable {
		t.Errorf("GET /v1/jobs?stale=false on the cut-off follower: %d, want 503", code)
	}
	var bad struct{ Error string }
	if code := apiCall(t, f, "GET", "/v1/jobs?stale=yes", nil, &bad); code != http.StatusBadRequest || !strings.Contains(bad.Error, `stale="yes"`) {
		t.Errorf("GET /v1/jobs?stale=yes: %d %q, want 400 naming the parameter and its value", code, bad.Error)
	}
	a = request(t, http.DefaultClient, base, "GET", "/v1/jobs/"+jobs[0].ID+"?stale", "", "")
	ms, _ = strconv.ParseInt(a.header.Get(lastContactHeader), 10, 64)
	if a.code != http.StatusOK || ms <= maxStale.Milliseconds() {
		t.Errorf("GET /v1/jobs/ID?stale: %d, last contact %q; want 200 and more than %v", a.code, a.header.Get(lastContactHeader), maxStale)
	}
	var st apiStatus
	if code := apiCall(t, f, "GET", "/v1/status", nil, &st); code != http.StatusOK || st.ServesReads || st.LastContactMS <= maxStale.Milliseconds() ||
		!strings.Contains(st.StaleReason, "last heard from the raft leader") || !st.CanApply {
		t.Errorf("GET /v1/status on the cut-off follower: %d %+v; want serves_reads false, the last contact and why", code, st)
	}
	// Endpoints that do not read the FSM answer anyway.
	if code := apiCall(t, f, "GET", "/v1/members", nil, nil); code != http.StatusOK {
		t.Errorf("GET /v1/members on the cut-off follower: %d, want 200", code)
	}
}

// failingLogStore fails every write while fail is set.
type failingLogStore struct {
	raft.LogStore
	mu   sync.Mutex
	fail error
}

func (f *failingLogStore) StoreLogs(logs []*raft.Log) error {
	f.mu.Lock()
	err := f.fail
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.LogStore.StoreLogs(logs)
}

// TestHTTPCannotApply checks that a node whose Raft log writes fail (a full
// disk) says so in /v1/status and refuses reads without ?stale=true until a
// write succeeds again.
func TestHTTPCannotApply(t *testing.T) {
	store := &failingLogStore{LogStore: raft.NewInmemStore()}
	health := newLogStoreHealth(store, newMetrics(), nil)
	logs := []*raft.Log{{Index: 1, Term: 1, Data: []byte("x")}}
	store.fail = errors.New("write raft.db: no space left on device")
	if err := health.StoreLogs(logs); err == nil {
		t.Fatal("the failing store stored")
	}
	if _, err := health.lastError(); err == nil {
		t.Fatal("a failed write was not recorded")
	}
	store.fail = nil
	if err := health.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if _, err := health.lastError(); err != nil {
		t.Fatalf("a good write did not clear the error: %v", err)
	}

	s := startClusterWith(t, 1, func(*Config) {})[0]
	submitJob(t, s, wordcountSpec)
	s.api.logs.record(errors.New("write raft.db: no space left on device"))
	var out struct{ Error string }
	if code := apiCall(t, s, "GET", "/v1/jobs", nil, &out); code != http.StatusServiceUnavailable || !strings.Contains(out.Error, "no space left on device") {
		t.Errorf("GET /v1/jobs while the log store fails: %d %q, want 503 naming the error", code, out.Error)
	}
	var st apiStatus
	if apiCall(t, s, "GET", "/v1/status", nil, &st); st.CanApply || !strings.Contains(st.ApplyError, "no space left") || st.ServesReads {
		t.Errorf("status while the log store fails: %+v, want can_apply false with the error", st)
	}
	if code := apiCall(t, s, "GET", "/v1/jobs?stale=true", nil, nil); code != http.StatusOK {
		t.Errorf("GET /v1/jobs?stale=true while the log store fails: %d, want 200", code)
	}
	// The next write succeeds (the disk has room again): reads are back.
	submitJob(t, s, wordcountSpec)
	if code := apiCall(t, s, "GET", "/v1/jobs", nil, nil); code != http.StatusOK {
		t.Errorf("GET /v1/jobs after a good write: %d, want 200", code)
	}
}

// TestHTTPBodyDeadlineSparesLongHandlers checks that the body deadline does
// not cancel a handler that runs past it after reading its body (net/http
// cancels a request's context when a read deadline passes while it reads on
// in the background): forwarded writes and savepoints run that long.
func TestHTTPBodyDeadlineSparesLongHandlers(t *testing.T) {
	s := &Server{cfg: Config{ID: "c1", MaxStale: time.Second}, logger: testLogger(t), fsm: fsm.New(), metrics: newMetrics(), api: newHTTPAPI()}
	h := s.guard(roleNone, routeOpts{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		select {
		case <-r.Context().Done():
			writeError(w, http.StatusInternalServerError, "context cancelled: "+context.Cause(r.Context()).Error())
		case <-time.After(bodyTimeout + time.Second):
			writeJSON(w, http.StatusOK, "done")
		}
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	a := request(t, srv.Client(), srv.URL, "POST", "/", "", `{"a": 1}`)
	if a.code != http.StatusOK {
		t.Errorf("handler running past the body deadline: %d %s, want 200", a.code, a.body)
	}
}

// TestHTTPRestartedFollowerCatchesUpBeforeReads: a follower restarted while
// the cluster went on serves reads only once it has applied what the leader
// committed, never the older state its own log replays first.
func TestHTTPRestartedFollowerCatchesUpBeforeReads(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	f := followers(leader, servers)[0]
	stopServer(t, f)
	var ids []string
	for range 20 {
		ids = append(ids, submitJob(t, leader, wordcountSpec))
	}
	f = startServer(t, restartConfig(f, leader.GossipAddr()))
	base := "http://" + f.HTTPAddr()
	waitFor(t, 30*time.Second, func() error {
		a := request(t, http.DefaultClient, base, "GET", "/v1/jobs", "", "")
		switch {
		case a.code == http.StatusServiceUnavailable:
			return fmt.Errorf("refused: %s", a.errorText())
		case a.code != http.StatusOK:
			t.Fatalf("GET /v1/jobs on the restarted %s: %d %s", f.ID(), a.code, a.body)
		}
		var jobs []apiJob
		if err := json.Unmarshal(a.body, &jobs); err != nil {
			t.Fatal(err)
		}
		if len(jobs) != len(ids) {
			t.Fatalf("the restarted %s served a read with %d jobs before catching up to the %d committed", f.ID(), len(jobs), len(ids))
		}
		return nil
	})
	if !f.caughtUp.Load() {
		t.Error("a follower serving reads is not marked caught up")
	}
	if r := f.staleReason(contactInfo{lastContact: time.Millisecond, catchingUp: "applied 3 of 9"}); !strings.Contains(r, "catching up") {
		t.Errorf("stale reason while catching up: %q", r)
	}
}

// TestStatusReportsVersion: /v1/status names the build each coordinator
// runs, so an operator sees a rolling upgrade's progress node by node.
func TestStatusReportsVersion(t *testing.T) {
	cfg := testConfig(t, testLogger(t), "c1")
	cfg.Version = "v1.2.3 0123456789ab"
	s := startServer(t, cfg)
	resp, err := http.Get("http://" + s.HTTPAddr() + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st apiStatus
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if st.Version != cfg.Version || st.ID != "c1" {
		t.Fatalf("status %+v, want version %q", st, cfg.Version)
	}
}

// applyLag follows one committed entry at a time, so a steady load shows
// as its apply latency and a stuck FSM as a wait that grows.
func TestApplyLag(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	var a applyLag
	for _, step := range []struct {
		commit, applied uint64
		ms              int
		want            time.Time // zero: nothing waits
	}{
		{10, 10, 0, time.Time{}},    // caught up
		{12, 10, 100, at(100)},      // 11 and 12 wait
		{15, 11, 200, at(100)},      // 12 still waits: since 100 ms
		{18, 12, 300, at(300)},      // 12 applied: now 18 waits, since 300 ms
		{18, 18, 400, time.Time{}},  // caught up
		{30, 18, 500, at(500)},      // the FSM stops here...
		{40, 18, 5600, at(500)},     // ...and the wait grows
		{40, 40, 5700, time.Time{}}, // until it applies again
	} {
		if got := a.observe(step.commit, step.applied, at(step.ms)); !got.Equal(step.want) {
			t.Fatalf("at %d ms (commit %d, applied %d): waiting since %v, want %v", step.ms, step.commit, step.applied, got, step.want)
		}
	}
	// A follower in contact whose FSM waits longer than -max-stale refuses
	// fresh reads, saying why.
	s := &Server{cfg: Config{ID: "c2", MaxStale: 5 * time.Second}}
	r := s.staleReason(contactInfo{lastContact: 10 * time.Millisecond, applyBehind: 6 * time.Second})
	if !strings.Contains(r, "coordinator c2 has not applied raft entries committed 6s ago") {
		t.Fatalf("stale reason with the FSM 6 s behind: %q", r)
	}
	if r := s.staleReason(contactInfo{lastContact: 10 * time.Millisecond, applyBehind: 50 * time.Millisecond}); r != "" {
		t.Fatalf("stale reason with the FSM 50 ms behind: %q, want none", r)
	}
}

// slowLogStore is a log store whose appends take takes on clock.
type slowLogStore struct {
	raft.LogStore
	clock *time.Time
	takes time.Duration
}

func (s *slowLogStore) StoreLogs(logs []*raft.Log) error {
	*s.clock = s.clock.Add(s.takes)
	return s.LogStore.StoreLogs(logs)
}

// TestSlowLogAppendsWarned: appends over the threshold are logged with how
// many there were, the slowest and its size, at most once per
// slowAppendLogEvery, and those held back are reported by the first append
// after it, a fast one too; appends under the threshold are not.
func TestSlowLogAppendsWarned(t *testing.T) {
	var out bytes.Buffer
	clock := time.Unix(1_800_000_000, 0)
	store := &slowLogStore{LogStore: raft.NewInmemStore(), clock: &clock}
	health := newLogStoreHealth(store, newMetrics(), slog.New(slog.NewTextHandler(&out, nil)))
	health.now = func() time.Time { return clock }
	index := uint64(0)
	appendTaking := func(d time.Duration, entries int) {
		t.Helper()
		store.takes = d
		var logs []*raft.Log
		for range entries {
			index++
			logs = append(logs, &raft.Log{Index: index, Term: 1, Data: []byte("x")})
		}
		if err := health.StoreLogs(logs); err != nil {
			t.Fatal(err)
		}
	}
	warnings := func() []string {
		var lines []string
		for line := range strings.Lines(out.String()) {
			if strings.Contains(line, "raft log appends are slow") {
				lines = append(lines, line)
			}
		}
		return lines
	}

	appendTaking(slowAppend-time.Millisecond, 1)
	if w := warnings(); len(w) != 0 {
		t.Fatalf("an append under the threshold was warned of: %q", w)
	}
	appendTaking(300*time.Millisecond, 2)
	if w := warnings(); len(w) != 1 || !strings.Contains(w[0], "slow_appends=1 slowest=300ms slowest_entries=2 ") {
		t.Fatalf("after the first slow append: %q, want one warning of it", w)
	}
	appendTaking(400*time.Millisecond, 5)
	appendTaking(time.Second, 1)
	if w := warnings(); len(w) != 1 {
		t.Fatalf("two more slow appends within %v: %d warnings, want still 1", slowAppendLogEvery, len(w))
	}
	clock = clock.Add(slowAppendLogEvery)
	appendTaking(time.Millisecond, 1) // fast: it reports the two held back
	if w := warnings(); len(w) != 2 || !strings.Contains(w[1], "slow_appends=2 slowest=1s slowest_entries=1 ") || !strings.Contains(w[1], "since=") {
		t.Fatalf("a fast append %v later: %q, want a second warning of the 2 held back", slowAppendLogEvery, w)
	}
	clock = clock.Add(slowAppendLogEvery)
	appendTaking(time.Millisecond, 1)
	if w := warnings(); len(w) != 2 {
		t.Fatalf("a fast append with nothing held back: %d warnings, want still 2", len(w))
	}
}

// TestNewLeaderServesReadsOnceItsBarrierPassed: a coordinator that has just
// become the leader may have been elected with entries of earlier terms it
// has not applied; until its Barrier has passed, its reads say so (503
// unless ?stale), as a follower's do while it catches up, and it refuses
// writes whose handlers decide from its FSM, nothing done.
func TestNewLeaderServesReadsOnceItsBarrierPassed(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	waitFor(t, 10*time.Second, func() error {
		if s.barrierTerm.Load() != s.raft.CurrentTerm() {
			return errors.New("the leader loop has not passed its barrier")
		}
		return nil
	})
	if code := apiCall(t, s, "GET", "/v1/jobs", nil, nil); code != http.StatusOK {
		t.Fatalf("GET /v1/jobs on the leader past its barrier: %d, want 200", code)
	}
	s.barrierTerm.Store(0) // as before its Barrier
	var out struct{ Error string }
	if code := apiCall(t, s, "GET", "/v1/jobs", nil, &out); code != http.StatusServiceUnavailable || !strings.Contains(out.Error, "just become the leader") {
		t.Fatalf("GET /v1/jobs on a leader before its barrier: %d %q, want 503 saying it has just become the leader", code, out.Error)
	}
	if code := apiCall(t, s, "GET", "/v1/jobs?stale=true", nil, nil); code != http.StatusOK {
		t.Fatalf("GET /v1/jobs?stale=true on a leader before its barrier: %d, want 200", code)
	}
	// A savepoint a job started from it still needs could be deleted on a
	// leader that has not applied the job's registration.
	if code := apiCall(t, s, "DELETE", "/v1/savepoints/j1-sp-3", nil, &out); code != http.StatusServiceUnavailable ||
		!strings.Contains(out.Error, "catching up") || !strings.Contains(out.Error, "nothing done") {
		t.Fatalf("DELETE /v1/savepoints/j1-sp-3 on a leader before its barrier: %d %q, want 503, catching up, nothing done", code, out.Error)
	}
	s.barrierTerm.Store(s.raft.CurrentTerm())
	if code := apiCall(t, s, "DELETE", "/v1/savepoints/j1-sp-3", nil, &out); code != http.StatusNotFound {
		t.Fatalf("DELETE /v1/savepoints/j1-sp-3 on the leader past its barrier: %d %q, want 404 (no such savepoint)", code, out.Error)
	}
}
