package main

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
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
