package coordinator

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
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

// TestSubmissionWithAChosenIDIsIdempotent: a submission that names its job's
// id (?id=) may be sent again after an unknown outcome, or twice at once,
// and registers one job: the same spec again is answered 200 with the job,
// another spec 409, an id that is no job id's 400, and an id whose earlier
// job left files in the checkpoint storage 409, naming them.
func TestSubmissionWithAChosenIDIsIdempotent(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	post := func(path, spec string) (int, string) {
		var out struct{ ID, Error string }
		code := apiCall(t, s, http.MethodPost, path, spec, &out)
		return code, out.ID + out.Error
	}
	if code, got := post("/v1/jobs?id=wc-prod", wordcountSpec); code != http.StatusCreated || got != "wc-prod" {
		t.Fatalf("first submission: %d %q, want 201 wc-prod", code, got)
	}
	if code, got := post("/v1/jobs?id=wc-prod", wordcountSpec); code != http.StatusOK || got != "wc-prod" {
		t.Fatalf("the same submission again: %d %q, want 200 wc-prod", code, got)
	}
	other := strings.Replace(wordcountSpec, `"retained": 3`, `"retained": 4`, 1)
	if code, got := post("/v1/jobs?id=wc-prod", other); code != http.StatusConflict || !strings.Contains(got, "another spec") {
		t.Fatalf("another spec under the id: %d %q, want 409 naming another spec", code, got)
	}
	if code, got := post("/v1/jobs?id=wc-prod&from_savepoint=wc-1-sp-3", wordcountSpec); code != http.StatusConflict || !strings.Contains(got, "no savepoint") {
		t.Fatalf("the id again from a savepoint: %d %q, want 409", code, got)
	}
	if code, got := post("/v1/jobs?id=wc/prod", wordcountSpec); code != http.StatusBadRequest || !strings.Contains(got, `id "wc/prod"`) {
		t.Fatalf("an id with a slash: %d %q, want 400 naming it", code, got)
	}

	// Sent several times at once: whichever reaches the FSM first registers
	// the job; the others are answered as resubmissions.
	var wg sync.WaitGroup
	codes := make([]int, 8)
	ids := make([]string, 8)
	for i := range codes {
		wg.Go(func() { codes[i], ids[i] = post("/v1/jobs?id=wc-burst", wordcountSpec) })
	}
	wg.Wait()
	created := 0
	for i := range codes {
		switch {
		case codes[i] == http.StatusCreated && ids[i] == "wc-burst":
			created++
		case codes[i] == http.StatusOK && ids[i] == "wc-burst":
		default:
			t.Errorf("submission %d of wc-burst: %d %q, want 201 or 200 with the id", i, codes[i], ids[i])
		}
	}
	if created != 1 {
		t.Errorf("%d of the concurrent submissions created the job, want 1", created)
	}
	if n := len(s.fsm.Jobs()); n != 2 {
		t.Errorf("%d jobs, want 2 (wc-prod and wc-burst)", n)
	}

	// A purged job's files left in storage (a forced purge): its id is not
	// given to a new job, which would write under the same paths.
	dir := t.TempDir()
	left := filepath.Join(dir, "checkpoints", "wc-old", "chk-7", "map-0.state")
	if err := os.MkdirAll(filepath.Dir(left), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(left, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	stored := strings.Replace(wordcountSpec, `"retained": 3`, `"retained": 3, "storage": "file://`+dir+`"`, 1)
	if code, got := post("/v1/jobs?id=wc-old", stored); code != http.StatusConflict || !strings.Contains(got, "checkpoints/wc-old/chk-7/map-0.state") {
		t.Fatalf("an id with files left: %d %q, want 409 naming the file", code, got)
	}
	if code, got := post("/v1/jobs?id=wc-new", stored); code != http.StatusCreated || got != "wc-new" {
		t.Fatalf("an id without files in the same storage: %d %q, want 201", code, got)
	}
	// A job's own files are no earlier job's: sent again once it has
	// checkpointed, the submission is still answered with it.
	own := filepath.Join(dir, "checkpoints", "wc-new", "chk-1", "map-0.state")
	if err := os.MkdirAll(filepath.Dir(own), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(own, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, got := post("/v1/jobs?id=wc-new", stored); code != http.StatusOK || got != "wc-new" {
		t.Fatalf("sent again after its first checkpoint: %d %q, want 200 wc-new", code, got)
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
	} {
		err := sameSubmission(tc.job, tc.spec, tc.ref)
		if (err == nil) != (tc.want == "") || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
