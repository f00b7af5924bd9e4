package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TestClientReadsAgainWhileTheCoordinatorCatchesUp: a read refused with 503
// because the coordinator is catching up (restarted, or just elected) is
// asked again until it is served; a write, or another 503, is not.
func TestClientReadsAgainWhileTheCoordinatorCatchesUp(t *testing.T) {
	var refusals atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/other" || refusals.Add(1) <= 3 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			msg := `{"error": "coordinator c1 is catching up (it has just become the leader), so its state may be stale"}`
			if r.URL.Path == "/v1/other" {
				msg = `{"error": "no leader"}`
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
	if _, err := c.do(ctx, http.MethodGet, "/v1/other", nil); !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
		t.Fatalf("a read refused for another reason: %v, want the 503 at once", err)
	}
}

// TestJobRunSendsAgainWithTheSameKey: `job run` sends its submission with
// an idempotency key, and sends it again with that key while the outcome is
// unknown (504, 502), no coordinator could take it (503) or no answer came,
// and stops at an answer that settles it: the coordinators answer the same
// submission sent again with its job, so it is registered once.
func TestJobRunSendsAgainWithTheSameKey(t *testing.T) {
	spec := filepath.Join(t.TempDir(), "job.json")
	if err := os.WriteFile(spec, []byte(`{"name": "wc", "source": {}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var keys []string
	answers := []int{http.StatusGatewayTimeout, http.StatusServiceUnavailable, 0, http.StatusBadGateway, http.StatusOK}
	answer409 := `{"error": "outcome unknown"}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		code := answers[min(len(keys), len(answers)-1)]
		keys = append(keys, strings.Join(r.Header.Values("Idempotency-Key"), ","))
		body409 := answer409
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
			_, _ = w.Write([]byte(body409))
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
	id, err := jobRun(context.Background(), c, spec, "", "", &out, &warn)
	if err != nil {
		t.Fatalf("job run: %v (warnings %q)", err, warn.String())
	}
	mu.Lock()
	defer mu.Unlock()
	if id != "wc-0000abcd" || len(keys) != 5 || len(keys[0]) < 16 || strings.Contains(keys[0], ",") {
		t.Fatalf("job run: id %q after requests with keys %q, want the job after 5 requests with one key each", id, keys)
	}
	for i, sent := range keys {
		if sent != keys[0] {
			t.Errorf("request %d sent key %q, want %q every time", i, sent, keys[0])
		}
	}
	// net/http sends a request with an Idempotency-Key again itself when
	// its connection breaks before an answer, without a warning of ours.
	if n := strings.Count(warn.String(), "sending it again"); out.String() != id+"\n" || n < 3 || n > 4 {
		t.Errorf("stdout %q, stderr %q: want the id alone, and a warning per resend of an answer", out.String(), warn.String())
	}

	// An answer that settles it is not sent again; -idempotency-key is
	// sent as given.
	keys, answers, answer409 = nil, []int{http.StatusConflict}, `{"error": "Idempotency-Key \"k\" is job wc-1's, which was submitted with another spec"}`
	mu.Unlock()
	var ae *apiError
	_, err = jobRun(context.Background(), c, spec, "", "deploy-42", &out, &warn)
	mu.Lock()
	if !errors.As(err, &ae) || ae.Status != http.StatusConflict || len(keys) != 1 || keys[0] != "deploy-42" {
		t.Fatalf("job run -idempotency-key deploy-42 answered 409: %v after keys %q, want the 409 after one request with deploy-42", err, keys)
	}

	// A cluster whose coordinators are not all at the level of keys yet:
	// submitted once more, without a key.
	keys, answers, answer409 = nil, []int{http.StatusConflict, http.StatusCreated}, `{"error": "Idempotency-Key needs every coordinator at feature level 5 or newer"}`
	warn.Reset()
	mu.Unlock()
	id, err = jobRun(context.Background(), c, spec, "", "", &out, &warn)
	mu.Lock()
	if err != nil || id != "wc-0000abcd" || len(keys) != 2 || keys[0] == "" || keys[1] != "" || !strings.Contains(warn.String(), "without a key") {
		t.Fatalf("job run on an older cluster: %q, %v after keys %q (stderr %q), want the job after a keyed request and one without", id, err, keys, warn.String())
	}
}
