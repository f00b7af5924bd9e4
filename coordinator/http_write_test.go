package coordinator

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// TestFollowerForwardsToALeaderBoundOnEveryInterface: coordinators whose
// HTTP and gRPC listeners are bound on every interface (-http-addr
// 0.0.0.0:PORT, as in a container) advertise their Raft host instead, so a
// follower forwards a write to the leader, not to itself.
func TestFollowerForwardsToALeaderBoundOnEveryInterface(t *testing.T) {
	servers := startClusterWith(t, 3, func(c *Config) { c.HTTPAddr, c.RPCAddr = "0.0.0.0:0", "0.0.0.0:0" })
	leader := waitForLeader(t, servers...)
	for _, s := range servers {
		for _, addr := range []string{s.HTTPAddr(), s.RPCAddr()} {
			host, _, err := net.SplitHostPort(addr)
			if err != nil || host != "127.0.0.1" {
				t.Fatalf("coordinator %s advertises %q, want its Raft host 127.0.0.1", s.ID(), addr)
			}
		}
	}
	for _, s := range servers {
		if s == leader {
			continue
		}
		id := submitJob(t, s, wordcountSpec) // forwarded to the leader
		if _, ok := leader.fsm.Job(id); !ok {
			t.Fatalf("job %s submitted through follower %s is not in the leader's state", id, s.ID())
		}
		// A write of the follower's own origin (its dashboard) is not of
		// another origin on the leader either.
		base := "http://" + s.HTTPAddr()
		req, err := http.NewRequest("POST", base+"/v1/jobs", strings.NewReader(wordcountSpec))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Origin", base)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("POST /v1/jobs of %s's own origin, forwarded: %d, want 201", s.ID(), resp.StatusCode)
		}
	}
}

// TestWriteErrorsSayWhetherToSendAgain: a write refused before it reached
// the log answers 503 (safe to send again); one whose outcome is unknown
// answers 504 saying so, since sending it again may apply it twice.
func TestWriteErrorsSayWhetherToSendAgain(t *testing.T) {
	s := &Server{logger: testLogger(t)}
	for _, tc := range []struct {
		err     error
		code    int
		unknown bool
	}{
		{fmt.Errorf("raft apply %v: %w: %w", fsm.CommandRegisterJob, ErrNotLeader, raft.ErrNotLeader), http.StatusServiceUnavailable, false},
		{fmt.Errorf("raft apply %v: %w", fsm.CommandRegisterJob, raft.ErrEnqueueTimeout), http.StatusServiceUnavailable, false},
		{fmt.Errorf("raft apply %v: %w", fsm.CommandRegisterJob, errCommitterStopped), http.StatusServiceUnavailable, false},
		{fmt.Errorf("raft apply %v: %w", fsm.CommandRegisterJob, raft.ErrLeadershipLost), http.StatusGatewayTimeout, true},
		{fmt.Errorf("raft apply %v: %w", fsm.CommandRegisterJob, context.DeadlineExceeded), http.StatusGatewayTimeout, true},
	} {
		rec := httptest.NewRecorder()
		s.writeApplyError(rec, tc.err)
		if rec.Code != tc.code || strings.Contains(rec.Body.String(), "outcome unknown") != tc.unknown {
			t.Errorf("%v: %d %s, want %d (outcome unknown said: %v)", tc.err, rec.Code, rec.Body.String(), tc.code, tc.unknown)
		}
	}
}

// TestSavepointInUse: a savepoint a live job was started from, and still
// restores at every restart because it has no completed checkpoint of its
// own, may not be deleted; once the job has one, or is cancelled, it may.
func TestSavepointInUse(t *testing.T) {
	sp := &fsm.Savepoint{ID: "wc-1-sp-7"}
	for _, tc := range []struct {
		name  string
		job   fsm.Job
		inUse bool
	}{
		{"restored until its first checkpoint", fsm.Job{ID: "j", Status: fsm.JobRunning, FromSavepoint: sp}, true},
		{"restarting, restores it again", fsm.Job{ID: "j", Status: fsm.JobRestarting, FromSavepoint: sp}, true},
		{"a checkpoint of its own", fsm.Job{ID: "j", Status: fsm.JobRunning, FromSavepoint: sp, Completed: []fsm.Checkpoint{{ID: 1}}}, false},
		{"cancelled", fsm.Job{ID: "j", Status: fsm.JobCancelled, FromSavepoint: sp}, false},
		{"started from another", fsm.Job{ID: "j", Status: fsm.JobRunning, FromSavepoint: &fsm.Savepoint{ID: "other"}}, false},
		{"started fresh", fsm.Job{ID: "j", Status: fsm.JobRunning}, false},
	} {
		err := savepointInUse([]fsm.Job{tc.job}, sp.ID)
		if (err != nil) != tc.inUse || (err != nil && !strings.Contains(err.Error(), "job j restores")) {
			t.Errorf("%s: %v, want in use: %v (naming the job)", tc.name, err, tc.inUse)
		}
	}
}

// TestSavepointUsesOrderDeletionsAndRestores: on the leader, a savepoint
// is not deleted while a job registration from it is in flight (the FSM
// does not show it yet), and no job is registered from a savepoint whose
// deletion is in flight (its command, or its files) or that is gone.
func TestSavepointUsesOrderDeletionsAndRestores(t *testing.T) {
	var u savepointUses
	unused := func() error { return nil }
	there := func() bool { return true }
	endRestore, err := u.beginRestore("sp-1", there)
	if err != nil {
		t.Fatalf("a restore of a kept savepoint: %v", err)
	}
	endRestore2, err := u.beginRestore("sp-1", nil) // a second job, by the savepoint's URL
	if err != nil {
		t.Fatalf("a second restore: %v", err)
	}
	if _, err := u.beginDelete("sp-1", unused); err == nil || !strings.Contains(err.Error(), "2 job registrations in flight") {
		t.Fatalf("a deletion while two registrations are in flight: %v, want refused naming them", err)
	}
	endRestore()
	if _, err := u.beginDelete("sp-1", unused); err == nil {
		t.Fatal("a deletion while one registration is still in flight was allowed")
	}
	endRestore2()
	if _, err := u.beginDelete("sp-1", func() error { return errors.New("job j restores it") }); err == nil || err.Error() != "job j restores it" {
		t.Fatalf("a deletion of a savepoint a registered job needs: %v, want the in-use error", err)
	}
	endDelete, err := u.beginDelete("sp-1", unused)
	if err != nil {
		t.Fatalf("a deletion once the registrations settled: %v", err)
	}
	if _, err := u.beginRestore("sp-1", nil); err == nil || !strings.Contains(err.Error(), "being deleted") {
		t.Fatalf("a restore by URL while the deletion is in flight: %v, want refused", err)
	}
	if _, err := u.beginDelete("sp-1", unused); err == nil {
		t.Fatal("a second deletion of the same savepoint in flight was allowed")
	}
	endDelete()
	if _, err := u.beginRestore("sp-1", func() bool { return false }); err == nil || !strings.Contains(err.Error(), "was deleted") {
		t.Fatalf("a restore by id of a deleted savepoint: %v, want refused", err)
	}
	if _, err := u.beginRestore("sp-2", there); err != nil {
		t.Fatalf("a restore of another savepoint: %v", err)
	}
}

// TestWritesRefuseQueryParametersTheyDoNotTake: a write refuses a query
// parameter it does not take (misspelled, it would be ignored and the write
// done without it: a cancel without its savepoint) and one given empty (a
// script's ?from_savepoint=$SP with SP unset would start the job afresh).
func TestWritesRefuseQueryParametersTheyDoNotTake(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	id := submitJob(t, s, wordcountSpec)
	for _, tc := range []struct{ method, path, name string }{
		{http.MethodDelete, "/v1/jobs/" + id + "?save_point=true", "save_point="},
		{http.MethodDelete, "/v1/jobs/" + id + "?savepoint=true&savepoint=false", "savepoint= given 2 times"},
		{http.MethodPost, "/v1/jobs?from_savepoint=", `from_savepoint="": empty`},
		{http.MethodPost, "/v1/jobs?from_save_point=sp-1", "from_save_point="},
		{http.MethodPost, "/v1/jobs/" + id + "/savepoints?stop=true", "this endpoint takes none"},
		{http.MethodDelete, "/v1/savepoints/x?force=true", "force="},
		{http.MethodDelete, "/v1/jobs/" + id + "?savepoint=true;", "invalid semicolon"},
		{http.MethodPost, "/v1/jobs?from_savepoint=file:///sp/50%zz", "invalid URL escape"},
	} {
		var out struct{ Error string }
		if code := apiCall(t, s, tc.method, tc.path, wordcountSpec, &out); code != http.StatusBadRequest || !strings.Contains(out.Error, tc.name) {
			t.Errorf("%s %s = %d %q, want 400 naming %s", tc.method, tc.path, code, out.Error, tc.name)
		}
	}
	if j, ok := s.fsm.Job(id); !ok || j.Status == fsm.JobCancelled {
		t.Fatalf("job %s after refused writes: %+v", id, j.Status)
	}
	if jobs := s.fsm.Jobs(); len(jobs) != 1 {
		t.Fatalf("%d jobs after refused submits, want 1", len(jobs))
	}
}

// TestWritesFromAnotherSiteRefused: a write a browser sends from a page of
// another site (an open API on 127.0.0.1 reached by any page its user opens)
// is refused; the same write from a client that sends no Origin, or from the
// API's own origin, is not, and reads are never.
func TestWritesFromAnotherSiteRefused(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	base := "http://" + s.HTTPAddr()
	post := func(hdr map[string]string) httpAnswer {
		req, err := http.NewRequest("POST", base+"/v1/jobs", strings.NewReader(wordcountSpec))
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return httpAnswer{code: resp.StatusCode, header: resp.Header, body: body}
	}
	for _, hdr := range []map[string]string{
		{"Origin": "https://evil.example"},
		{"Sec-Fetch-Site": "cross-site"},
	} {
		if a := post(hdr); a.code != http.StatusForbidden || !strings.Contains(a.errorText(), "another origin") {
			t.Errorf("POST /v1/jobs with %v: %d %s, want 403", hdr, a.code, a.body)
		}
	}
	if jobs := s.fsm.Jobs(); len(jobs) != 0 {
		t.Fatalf("%d jobs registered by refused writes", len(jobs))
	}
	for _, hdr := range []map[string]string{nil, {"Origin": base}, {"Sec-Fetch-Site": "same-origin"}} {
		if a := post(hdr); a.code != http.StatusCreated {
			t.Errorf("POST /v1/jobs with %v: %d %s, want 201", hdr, a.code, a.body)
		}
	}
	req, _ := http.NewRequest("GET", base+"/v1/jobs", nil)
	req.Header.Set("Sec-Fetch-Site", "cross-site")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("a cross-site read: %d, want 200", resp.StatusCode)
	}
}

// TestSubmissionWithAKeyIsRegisteredOnce: a submission with an
// Idempotency-Key may be sent again after an unknown outcome, or several
// times at once, and registers one job: the same spec again is answered 200
// with the job and its status, another spec or savepoint 409, a malformed
// key 400; without a key every submission registers a job.
func TestSubmissionWithAKeyIsRegisteredOnce(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	post := func(key, path, spec string) (int, string, string) {
		t.Helper()
		code, body := postKeyed(t, s, key, path, spec)
		if code == 0 {
			return 0, "", ""
		}
		var out struct{ ID, Status, Error string }
		if err := json.Unmarshal(body, &out); err != nil {
			t.Errorf("POST %s: answer %d: %v", path, code, err)
		}
		return code, out.ID + out.Error, out.Status
	}
	code, id, _ := post("run-7f3a", "/v1/jobs", wordcountSpec)
	if code != http.StatusCreated || !strings.HasPrefix(id, "wordcount-") {
		t.Fatalf("first submission: %d %q, want 201 and a new id", code, id)
	}
	if code, got, status := post("run-7f3a", "/v1/jobs", wordcountSpec); code != http.StatusOK || got != id || status != string(fsm.JobPending) && status != string(fsm.JobRunning) {
		t.Fatalf("the same submission again: %d %q %q, want 200 %s with its status", code, got, status, id)
	}
	other := strings.Replace(wordcountSpec, `"retained": 3`, `"retained": 4`, 1)
	if code, got, _ := post("run-7f3a", "/v1/jobs", other); code != http.StatusConflict || !strings.Contains(got, "another spec") || !strings.Contains(got, id) {
		t.Fatalf("another spec under the key: %d %q, want 409 naming the job and another spec", code, got)
	}
	if code, got, _ := post("run-7f3a", "/v1/jobs?from_savepoint=wc-1-sp-3", wordcountSpec); code != http.StatusConflict || !strings.Contains(got, "no savepoint") {
		t.Fatalf("the key again from a savepoint: %d %q, want 409", code, got)
	}
	if code, got, _ := post("run 7f3a", "/v1/jobs", wordcountSpec); code != http.StatusBadRequest || !strings.Contains(got, "Idempotency-Key") {
		t.Fatalf("a key with a space: %d %q, want 400 naming the header", code, got)
	}
	if a, b := submitJob(t, s, wordcountSpec), submitJob(t, s, wordcountSpec); a == b {
		t.Fatalf("two submissions without a key both answered %s, want two jobs", a)
	}

	// Sent several times at once: the first to reach the log registers
	// the job, and the FSM refuses the others, which are answered as the
	// same submission sent again.
	var wg sync.WaitGroup
	codes := make([]int, 8)
	ids := make([]string, 8)
	for i := range codes {
		wg.Go(func() { codes[i], ids[i], _ = post("burst-1", "/v1/jobs", wordcountSpec) })
	}
	wg.Wait()
	created := 0
	for i := range codes {
		switch {
		case codes[i] == http.StatusCreated && ids[i] == ids[0]:
			created++
		case codes[i] == http.StatusOK && ids[i] == ids[0]:
		default:
			t.Errorf("submission %d of burst-1: %d %q, want 201 or 200 with the id %s", i, codes[i], ids[i], ids[0])
		}
	}
	if created != 1 {
		t.Errorf("%d of the concurrent submissions created the job, want 1", created)
	}
	if n := len(s.fsm.Jobs()); n != 4 {
		t.Errorf("%d jobs, want 4 (run-7f3a's, two without a key, burst-1's)", n)
	}

	// Cancelled, the job still answers its key; purged, the key registers
	// a new job, of a new id.
	if code := apiCall(t, s, http.MethodDelete, "/v1/jobs/"+id, nil, nil); code != http.StatusOK {
		t.Fatalf("cancel %s: %d", id, code)
	}
	if code, got, status := post("run-7f3a", "/v1/jobs", wordcountSpec); code != http.StatusOK || got != id || status != string(fsm.JobCancelled) {
		t.Fatalf("the submission again once its job is cancelled: %d %q %q, want 200 %s cancelled", code, got, status, id)
	}
	if code := apiCall(t, s, http.MethodDelete, "/v1/jobs/"+id+"?purge=true", nil, nil); code != http.StatusOK {
		t.Fatalf("purge %s: %d", id, code)
	}
	if code, got, _ := post("run-7f3a", "/v1/jobs", wordcountSpec); code != http.StatusCreated || got == id {
		t.Fatalf("the key after its job was purged: %d %q, want 201 and an id other than %s", code, got, id)
	}
}

// TestSameSubmission: a resubmission matches its job when the spec and the
// savepoint, by id or by URL, are the same.
func TestSameSubmission(t *testing.T) {
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	other := spec
	other.Checkpoint.Retained++
	sp := &fsm.Savepoint{ID: "wc-1-sp-3", Location: "s3://b/savepoints/wc-1/sp-3/"}
	stored, elsewhere := spec, spec
	stored.Checkpoint.Storage = "s3://b/"
	elsewhere.Checkpoint.Storage = "s3://c/"
	for _, tc := range []struct {
		name string
		job  fsm.Job
		spec fsm.JobSpec
		ref  string
		want string // "" for the same
	}{
		{"same spec", fsm.Job{Spec: spec}, spec, "", ""},
		{"another spec", fsm.Job{Spec: spec}, other, "", "another spec"},
		{"savepoint by id", fsm.Job{Spec: spec, FromSavepoint: sp}, spec, sp.ID, ""},
		{"savepoint by URL", fsm.Job{Spec: spec, FromSavepoint: sp}, spec, sp.Location, ""},
		{"another savepoint", fsm.Job{Spec: spec, FromSavepoint: sp}, spec, "wc-1-sp-4", "savepoint wc-1-sp-3"},
		{"without the savepoint", fsm.Job{Spec: spec, FromSavepoint: sp}, spec, "", "savepoint wc-1-sp-3"},
		{"with a savepoint the job had not", fsm.Job{Spec: spec}, spec, sp.ID, "no savepoint"},
		{"an inline savepoint's empty location", fsm.Job{Spec: spec, FromSavepoint: &fsm.Savepoint{ID: "x"}}, spec, "", "savepoint x"},
		{"the storage another leader's default gave", fsm.Job{Spec: stored}, spec, "", ""},
		{"another storage named", fsm.Job{Spec: stored}, elsewhere, "", "another spec"},
	} {
		err := sameSubmission(tc.job, tc.spec, tc.ref)
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestOpenAPIRefusesRebindingHosts: an open API (no tokens, no TLS) reached
// over loopback answers only requests that name it by an IP address,
// localhost or this machine's names. A page of another site whose DNS name
// turns to 127.0.0.1 (DNS rebinding) is same-origin to the browser, which
// would let it read the API and write through it; such a request names the
// site's host. An API with tokens leaves it to the tokens. Every answer,
// refused or not, tells the browser not to sniff its type.
func TestOpenAPIRefusesRebindingHosts(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	_, port, err := net.SplitHostPort(s.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	send := func(s *Server, method, path, host string, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+s.HTTPAddr()+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		if body == "" {
			req.Body = http.NoBody
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		// Refused or answered, no answer may be sniffed into markup.
		if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
			t.Errorf("%s %s with Host %s: X-Content-Type-Options %q, want nosniff", method, path, host, got)
		}
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(data)
	}
	for _, host := range []string{"rebind.example:" + port, "rebind.example", "127.0.0.1.nip.example:" + port} {
		if code, body := send(s, http.MethodGet, "/v1/jobs", host, ""); code != http.StatusForbidden || !strings.Contains(body, "DNS rebinding") {
			t.Errorf("GET /v1/jobs with Host %s: %d %s, want 403 saying why", host, code, body)
		}
		if code, body := send(s, http.MethodPost, "/v1/jobs", host, wordcountSpec); code != http.StatusForbidden {
			t.Errorf("POST /v1/jobs with Host %s: %d %s, want 403", host, code, body)
		}
	}
	if n := len(s.fsm.Jobs()); n != 0 {
		t.Fatalf("%d jobs registered through a rebinding host", n)
	}
	hostname, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.1:" + port, "localhost:" + port, "LocalHost.", "app.localhost:" + port, "[::1]:" + port, hostname + ":" + port} {
		if code, body := send(s, http.MethodGet, "/v1/jobs", host, ""); code != http.StatusOK {
			t.Errorf("GET /v1/jobs with Host %s: %d %s, want 200", host, code, body)
		}
	}

	// An HTTP/1.0 health check sends no Host; a browser always does.
	conn, err := net.Dial("tcp", s.HTTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "GET /v1/status HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if resp, err := http.ReadResponse(bufio.NewReader(conn), nil); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("HTTP/1.0 GET /v1/status without a Host: %v, %v; want 200", resp, err)
	}

	tokens := writeTokensFile(t, t.TempDir())
	guarded := startSingle(t, testLogger(t), "c2", func(c *Config) { c.ACLTokensFile = tokens })
	if code, body := send(guarded, http.MethodGet, "/v1/jobs", "rebind.example", ""); code != http.StatusUnauthorized {
		t.Errorf("GET /v1/jobs with Host rebind.example of an API with tokens: %d %s, want 401: the tokens decide", code, body)
	}
}

// TestForwardFailureSaysWhetherToSendAgain: a follower that could not open
// a connection to the leader sent nothing (503: send it again); any other
// failure may have come after the leader had the write (502, outcome
// unknown).
func TestForwardFailureSaysWhetherToSendAgain(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")}
	if code, msg := forwardFailure(fmt.Errorf("proxy: %w", refused), false); code != http.StatusServiceUnavailable || strings.Contains(msg, "outcome unknown") {
		t.Errorf("dial refused: %d %q, want 503 without outcome unknown", code, msg)
	}
	// net/http may have sent a replayable request on a reused connection
	// before the dial of its second try failed.
	if code, _ := forwardFailure(refused, true); code != http.StatusBadGateway {
		t.Errorf("dial refused for a replayable request: %d, want 502", code)
	}
	del := httptest.NewRequest(http.MethodDelete, "/v1/jobs/j1", nil)
	post := httptest.NewRequest(http.MethodPost, "/v1/jobs", strings.NewReader("{}"))
	post.Header.Set("Idempotency-Key", "k")
	keyedDel := httptest.NewRequest(http.MethodDelete, "/v1/jobs/j1", nil)
	keyedDel.Header.Set("Idempotency-Key", "k")
	if replayable(del) || replayable(post) || !replayable(keyedDel) {
		t.Errorf("replayable: DELETE %v, POST with a body and a key %v, DELETE with a key %v; want false, false, true", replayable(del), replayable(post), replayable(keyedDel))
	}
	for _, err := range []error{io.EOF, &net.OpError{Op: "read", Net: "tcp", Err: errors.New("connection reset by peer")}, context.DeadlineExceeded} {
		if code, msg := forwardFailure(err, false); code != http.StatusBadGateway || !strings.Contains(msg, "outcome unknown") {
			t.Errorf("%v: %d %q, want 502 outcome unknown", err, code, msg)
		}
	}
}

// TestConfigRefusesABadJoinAddress: a -join entry whose port is not a port
// number stops coordd at start; retried for ever, it would hold a
// bootstrap. One without a port joins on coordd's own gossip port.
func TestConfigRefusesABadJoinAddress(t *testing.T) {
	c := testConfig(t, testLogger(t), "c1")
	if err := c.validate(); err != nil {
		t.Fatalf("the test config: %v", err)
	}
	for _, bad := range []string{"10.0.0.1:73O1", "10.0.0.1:0", "c1:"} {
		c.Join = []string{"127.0.0.1:7301", bad}
		if err := c.validate(); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("join address %q", bad)) {
			t.Errorf("join %q: %v, want an error naming it", bad, err)
		}
	}
	c.Join = []string{"coordd-0.coordd:7301", "[::1]:7301", "c2", "fd00::1", "[fd00::1]"}
	if err := c.validate(); err != nil {
		t.Errorf("joins with and without a port: %v", err)
	}
}
