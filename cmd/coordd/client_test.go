package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TestClientReadsAgainWhileTheCoordinatorCatchesUp: a read refused with 503
// because the coordinator is catching up (restarted, or just elected) is
// asked again until it is served, and so is a write a just elected leader
// refused with nothing done; another write, or another 503, is not.
func TestClientReadsAgainWhileTheCoordinatorCatchesUp(t *testing.T) {
	var refusals atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/other" || refusals.Add(1) <= 3 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			msg := `{"error": "coordinator c1 is catching up (it has just become the leader), so its state may be stale"}`
			switch {
			case r.URL.Path == "/v1/other":
				msg = `{"error": "no leader"}`
			case r.URL.Path == "/v1/savepoints/sp1":
				msg = `{"error": "coordinator c1 is catching up (it has just become the leader, in term 3, and has not yet applied every entry of earlier terms): nothing done; send it again"}`
			}
			_, _ = w.Write([]byte(msg))
			return
		}
		_, _ = w.Write([]byte(`[]`))
	}))
	defer srv.Close()
	c, err := newAPIClient(clientOptions{addr: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if data, err := c.do(ctx, http.MethodGet, "/v1/jobs", nil); err != nil || string(data) != "[]" {
		t.Fatalf("GET while catching up, then served: %q, %v", data, err)
	}
	if n := refusals.Load(); n != 4 {
		t.Fatalf("%d requests, want 3 refused and the one served", n)
	}
	refusals.Store(0)
	var ae *apiError
	if _, err := c.do(ctx, http.MethodPost, "/v1/jobs", []byte(`{}`)); !errors.As(err, &ae) || refusals.Load() != 1 {
		t.Fatalf("a write refused while catching up: %v after %d requests, want the refusal after one", err, refusals.Load())
	}
	refusals.Store(0)
	if data, err := c.do(ctx, http.MethodDelete, "/v1/savepoints/sp1", nil); err != nil || string(data) != "[]" {
		t.Fatalf("a write the new leader refused with nothing done, then served: %q, %v", data, err)
	}
	if n := refusals.Load(); n != 4 {
		t.Fatalf("%d requests of the write, want 3 refused and the one served", n)
	}
	if _, err := c.do(ctx, http.MethodGet, "/v1/other", nil); !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
		t.Fatalf("a read refused for another reason: %v, want the 503 at once", err)
	}
}

// TestJobRunSendsAgainWithTheSameKey: `job run` sends its submission with
// an idempotency key, and sends it again with that key while the outcome is
// unknown (504, 502), no coordinator could take it (503) or no answer came,
// and stops at an answer that settles it: the coordinators answer the same
// submission sent again with its job, so it is registered once. Where a
// coordinator is older than keys, and would ignore the header, it submits
// once without one, and not again.
func TestJobRunSendsAgainWithTheSameKey(t *testing.T) {
	spec := filepath.Join(t.TempDir(), "job.json")
	if err := os.WriteFile(spec, []byte(`{"name": "wc", "source": {}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var keys []string // of each POST: its Idempotency-Key
	var answers []int
	var oldLevel int // c3's feature level
	const levelRefusal = `{"error": "Idempotency-Key needs every coordinator at feature level 5 or newer (this build: 5); older: c9 (not seen in gossip)"}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if r.Method == http.MethodGet {
			level := oldLevel
			mu.Unlock()
			fmt.Fprintf(w, `[{"id": "c1", "role": "coordinator", "status": "alive", "feature_level": 5},
				{"id": "c2", "role": "coordinator", "status": "left", "feature_level": 3},
				{"id": "w1", "role": "worker", "status": "alive", "feature_level": 4},
				{"id": "c3", "role": "coordinator", "status": "dead", "feature_level": %d}]`, level)
			return
		}
		code := answers[min(len(keys), len(answers)-1)]
		keys = append(keys, strings.Join(r.Header.Values("Idempotency-Key"), ","))
		mu.Unlock()
		switch code {
		case 0: // no answer: the connection breaks
			panic(http.ErrAbortHandler)
		case http.StatusOK:
			_, _ = w.Write([]byte(`{"id": "wc-0000abcd", "status": "running"}`))
		case http.StatusCreated:
			w.WriteHeader(code)
			_, _ = w.Write([]byte(`{"id": "wc-0000abcd"}`))
		case http.StatusConflict:
			w.WriteHeader(code)
			_, _ = w.Write([]byte(levelRefusal))
		default:
			w.WriteHeader(code)
			_, _ = w.Write([]byte(`{"error": "outcome unknown"}`))
		}
	}))
	defer srv.Close()
	c, err := newAPIClient(clientOptions{addr: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	var out, warn bytes.Buffer
	run := func(key string, level int, codes ...int) (string, []string, error) {
		t.Helper()
		mu.Lock()
		keys, answers, oldLevel = nil, codes, level
		mu.Unlock()
		out.Reset()
		warn.Reset()
		id, err := jobRun(context.Background(), c, spec, "", key, &out, &warn)
		mu.Lock()
		defer mu.Unlock()
		return id, slices.Clone(keys), err
	}

	id, sent, err := run("", 5, http.StatusGatewayTimeout, http.StatusServiceUnavailable, 0, http.StatusBadGateway, http.StatusOK)
	if err != nil || id != "wc-0000abcd" || len(sent) != 5 || len(sent[0]) < 16 || strings.Contains(sent[0], ",") {
		t.Fatalf("job run: %q, %v after requests with keys %q, want the job after 5 requests with one key each", id, err, sent)
	}
	for i, k := range sent {
		if k != sent[0] {
			t.Errorf("request %d sent key %q, want %q every time", i, k, sent[0])
		}
	}
	// net/http sends a request with an Idempotency-Key again itself when
	// its connection breaks before an answer, without a warning of ours.
	if n := strings.Count(warn.String(), "sending it again"); out.String() != id+"\n" || n < 3 || n > 4 {
		t.Errorf("stdout %q, stderr %q: want the id alone, and a warning per resend of an answer", out.String(), warn.String())
	}

	// An answer that settles it is not sent again; -idempotency-key is
	// sent as given, and never dropped.
	var ae *apiError
	if _, sent, err := run("deploy-42", 5, http.StatusConflict); !errors.As(err, &ae) || ae.Status != http.StatusConflict || len(sent) != 1 || sent[0] != "deploy-42" {
		t.Fatalf("job run -idempotency-key deploy-42 answered 409: %v after keys %q, want the 409 after one request with deploy-42", err, sent)
	}

	// The leader refuses keys for a coordinator gossip did not show here:
	// as the first answer, submitted once more without a key; after an
	// unknown outcome, not, since the first may have registered the job.
	if id, sent, err := run("", 5, http.StatusConflict, http.StatusCreated); err != nil || id != "wc-0000abcd" || len(sent) != 2 || sent[0] == "" || sent[1] != "" {
		t.Fatalf("job run refused keys at once: %q, %v after keys %q (stderr %q), want the job after a keyed request and one without", id, err, sent, warn.String())
	}
	if _, sent, err := run("", 5, http.StatusGatewayTimeout, http.StatusConflict, http.StatusCreated); !errors.As(err, &ae) || ae.Status != http.StatusConflict || len(sent) != 2 {
		t.Fatalf("job run refused keys after an unknown outcome: %v after keys %q, want the 409 after the two keyed requests", err, sent)
	}

	// Gossip shows an older coordinator (c3, dead for now, may come back
	// as the leader): once, without a key, and not again after a 504.
	if _, sent, err := run("", 4, http.StatusGatewayTimeout, http.StatusCreated); !errors.As(err, &ae) || ae.Status != http.StatusGatewayTimeout || len(sent) != 1 || sent[0] != "" || !strings.Contains(warn.String(), "c3 (feature level 4)") {
		t.Fatalf("job run beside an older coordinator: %v after keys %q (stderr %q), want the 504 after one request without a key, naming c3", err, sent, warn.String())
	}
	if _, sent, err := run("deploy-43", 4, http.StatusCreated); err == nil || !strings.Contains(err.Error(), "c3 (feature level 4)") || len(sent) != 0 {
		t.Fatalf("job run -idempotency-key beside an older coordinator: %v after keys %q, want an error naming c3 before any submission", err, sent)
	}
}

// TestJobCancelSentAgain: `job cancel` sends the cancel again while its
// outcome is unknown, and a 409 after such an attempt, with the job
// cancelled, is its own first attempt's doing: success. The same 409 as the
// first answer is the user's error, and so is one with the job running.
func TestJobCancelSentAgain(t *testing.T) {
	var mu sync.Mutex
	var answers []int
	sent := 0
	status := "cancelled"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == http.MethodGet {
			fmt.Fprintf(w, `{"id": "j1", "status": %q}`, status)
			return
		}
		code := answers[min(sent, len(answers)-1)]
		sent++
		w.WriteHeader(code)
		if code == http.StatusConflict {
			// As the FSM words a cancel in the log behind another.
			_, _ = w.Write([]byte(`{"error": "raft apply JobCancelled at index 9: cancel job j1: job cancelled"}`))
			return
		}
		_, _ = w.Write([]byte(`{"error": "outcome unknown"}`))
	}))
	defer srv.Close()
	cancel := func(codes ...int) (int, string, error) {
		mu.Lock()
		answers, sent = codes, 0
		mu.Unlock()
		var out, errOut bytes.Buffer
		err := runJob([]string{"cancel", "-addr", srv.URL, "j1"}, &out, &errOut)
		mu.Lock()
		defer mu.Unlock()
		return sent, out.String(), err
	}
	if n, out, err := cancel(http.StatusGatewayTimeout, http.StatusConflict); err != nil || n != 2 || !strings.Contains(out, "job j1 cancelled") {
		t.Fatalf("cancel answered 504, then 409 already cancelled: %v after %d requests, stdout %q; want success after 2", err, n, out)
	}
	if n, _, err := cancel(http.StatusConflict); err == nil || n != 1 {
		t.Fatalf("cancel answered 409 already cancelled at once: %v after %d requests, want the error after 1", err, n)
	}
	mu.Lock()
	status = "running" // refused for another reason
	mu.Unlock()
	if n, _, err := cancel(http.StatusGatewayTimeout, http.StatusConflict); err == nil || n != 2 {
		t.Fatalf("cancel answered 504, then 409 with the job running: %v after %d requests, want the error", err, n)
	}
}

// TestJobExportReplacesTheFileOnlyWhenComplete: an export the server could
// not finish leaves an earlier export of that name as it was and no
// partial file; a complete one replaces it, keeping its mode.
func TestJobExportReplacesTheFileOnlyWhenComplete(t *testing.T) {
	var complete atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, `{"key": "a", "value": 1}`)
		if !complete.Load() {
			fmt.Fprintln(w, `{"error": "read state file: connection reset"}`)
			return
		}
		fmt.Fprintln(w, `{"key": "b", "value": 2}`)
	}))
	defer srv.Close()
	dir := t.TempDir()
	file := filepath.Join(dir, "state.ndjson")
	const earlier = "an earlier export\n"
	if err := os.WriteFile(file, []byte(earlier), 0o640); err != nil {
		t.Fatal(err)
	}
	export := func() error {
		var out, errOut bytes.Buffer
		return runJob([]string{"state", "-addr", srv.URL, "-export", file, "j1"}, &out, &errOut)
	}
	entries := func() []string {
		des, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, de := range des {
			names = append(names, de.Name())
		}
		return names
	}

	complete.Store(false)
	if err := export(); err == nil || !strings.Contains(err.Error(), "export incomplete") {
		t.Fatalf("an export the server could not finish: %v, want it incomplete", err)
	}
	if data, err := os.ReadFile(file); err != nil || string(data) != earlier {
		t.Fatalf("after a failed export the file holds %q (%v), want the earlier export", data, err)
	}
	if names := entries(); len(names) != 1 {
		t.Fatalf("after a failed export the directory holds %v, want the earlier export alone", names)
	}

	complete.Store(true)
	if err := export(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(file)
	if err != nil || string(data) != "{\"key\": \"a\", \"value\": 1}\n{\"key\": \"b\", \"value\": 2}\n" {
		t.Fatalf("after a complete export the file holds %q (%v)", data, err)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("the replaced export's mode: %v (%v), want 0640 as before", fi.Mode().Perm(), err)
	}
	if names := entries(); len(names) != 1 {
		t.Fatalf("after a complete export the directory holds %v", names)
	}
}

// TestAddrWithoutAPort: a bare host goes to coordd's API port, as the
// default address does; a URL keeps its scheme's port.
func TestAddrWithoutAPort(t *testing.T) {
	for addr, want := range map[string]string{
		"c1":                      "http://c1:7201",
		"10.0.0.1":                "http://10.0.0.1:7201",
		"[fd00::1]":               "http://[fd00::1]:7201",
		"c1:9000":                 "http://c1:9000",
		"http://c1":               "http://c1",
		"https://coordflow.test/": "https://coordflow.test",
		defaultAddr:               "http://127.0.0.1:7201",
	} {
		c, err := newAPIClient(clientOptions{addr: addr, format: "table"})
		if err != nil {
			t.Errorf("-addr %s: %v", addr, err)
			continue
		}
		if c.base != want {
			t.Errorf("-addr %s: requests go to %s, want %s", addr, c.base, want)
		}
	}
}

// TestFlagOverridesEnvEvenEmpty: -token "" sends no token from a shell
// that exports COORD_TOKEN; without the flag the variable is taken.
func TestFlagOverridesEnvEvenEmpty(t *testing.T) {
	t.Setenv("COORD_TOKEN", "from-the-environment")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "from-the-environment"},
		{[]string{"-token", ""}, ""},
		{[]string{"-token", "from-the-flag"}, "from-the-flag"},
	} {
		c, _, err := parseCLI("job list", "", tc.args, io.Discard, nil)
		if err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if c.token != tc.want {
			t.Errorf("%q with COORD_TOKEN set: token %q, want %q", tc.args, c.token, tc.want)
		}
	}
}
