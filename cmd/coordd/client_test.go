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

// TestJobRunSendsAgainWithTheSameID: `job run` chooses the job's id and
// sends the submission again with it while the outcome is unknown (504,
// 502), no coordinator could take it (503) or no answer came, and stops at
// an answer that settles it: the coordinators answer the same submission
// sent again with its job, so it is registered once.
func TestJobRunSendsAgainWithTheSameID(t *testing.T) {
	spec := filepath.Join(t.TempDir(), "job.json")
	if err := os.WriteFile(spec, []byte(`{"name": "wc", "source": {}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var ids []string
	answers := []int{http.StatusGatewayTimeout, http.StatusServiceUnavailable, 0, http.StatusBadGateway, http.StatusOK}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		code := answers[min(len(ids), len(answers)-1)]
		ids = append(ids, r.URL.Query().Get("id"))
		mu.Unlock()
		switch code {
		case 0: // no answer: the connection breaks
			panic(http.ErrAbortHandler)
		case http.StatusOK:
			_, _ = w.Write([]byte(`{"id": "` + r.URL.Query().Get("id") + `"}`))
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
	if len(ids) != 5 || !strings.HasPrefix(id, "wc-") || len(id) != len("wc-")+8 {
		t.Fatalf("job run: id %q after %d requests, want wc- and 8 hex digits after 5", id, len(ids))
	}
	for i, sent := range ids {
		if sent != id {
			t.Errorf("request %d sent id %q, want %q every time", i, sent, id)
		}
	}
	if out.String() != id+"\n" || strings.Count(warn.String(), "sending it again") != 4 {
		t.Errorf("stdout %q, stderr %q: want the id alone, and a warning per resend", out.String(), warn.String())
	}

	// An answer that settles it is not sent again; -id is sent as given.
	ids, answers = nil, []int{http.StatusConflict}
	mu.Unlock()
	var ae *apiError
	_, err = jobRun(context.Background(), c, spec, "", "wc-prod", &out, &warn)
	mu.Lock()
	if !errors.As(err, &ae) || ae.Status != http.StatusConflict || len(ids) != 1 || ids[0] != "wc-prod" {
		t.Fatalf("job run -id wc-prod answered 409: %v after ids %q, want the 409 after one request with wc-prod", err, ids)
	}
}
