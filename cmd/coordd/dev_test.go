package main

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is an io.Writer whose contents can be read while dev writes.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestDev runs `coordd dev` on free ports and checks that the sample job
// reads records and completes checkpoints whose state counts them, and that
// the whole cluster stops when its context ends.
func TestDev(t *testing.T) {
	testDev(t, false)
}

// TestDevSecure is TestDev with -secure: the same job runs with TLS, gossip
// encryption and tokens, the API refuses a request without the token, and
// plain HTTP gets no answer.
func TestDevSecure(t *testing.T) {
	api := testDev(t, true)
	if !strings.HasPrefix(api.base, "https://") || api.token == "" {
		t.Fatalf("secure dev API %s with token %q", api.base, api.token)
	}
}

// TestDevSecureRestart runs `coordd dev -secure` twice on one data dir: the
// second run reuses the CA, certificates, gossip key and operator token the
// first generated (a CLI pointed at the first keeps working) and its cluster
// runs its sample job with them as the first did.
func TestDevSecureRestart(t *testing.T) {
	dir := t.TempDir()
	first := testDevIn(t, true, dir)
	second := testDevIn(t, true, dir)
	if second.token != first.token {
		t.Errorf("second run's operator token %q, want the first's %q", second.token, first.token)
	}
}

func testDev(t *testing.T, secure bool) *devAPI { return testDevIn(t, secure, t.TempDir()) }

// testDevIn runs dev in dataDir until its sample job has a checkpoint whose
// state counts the records it read, then stops it, and returns its API.
func testDevIn(t *testing.T, secure bool, dataDir string) *devAPI {
	if testing.Short() {
		t.Skip("starts a whole cluster")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &syncBuffer{}
	var api *devAPI
	var jobID string
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- dev(ctx, devOptions{rate: 500, freePorts: true, logLevel: 8, out: out, secure: secure, dataDir: dataDir, slowGossip: raceEnabled,
			ready: func(a *devAPI, id string) { api, jobID = a, id; close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("dev stopped before the sample job ran: %v\n%s", err, out.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("sample job not submitted within 60s\n%s", out.String())
	}

	// Wait for a checkpoint whose state has read records and counted words:
	// every sample line has at least one word, so the counts must add up to
	// at least the number of records read.
	deadline := time.Now().Add(90 * time.Second)
	for {
		var state struct {
			CheckpointID uint64           `json:"checkpoint_id"`
			Offsets      map[string]int64 `json:"offsets"`
			Keyed        map[string]int64 `json:"keyed"`
		}
		err := api.getJSON(ctx, "/v1/jobs/"+jobID+"/state", &state)
		if err == nil {
			var records, words int64
			for _, o := range state.Offsets {
				records += o
			}
			for _, n := range state.Keyed {
				words += n
			}
			// dev reports each new checkpoint on its own (1 s) tick: wait
			// for its line too.
			if records > 0 && words >= records && len(state.Offsets) == 4 && strings.Contains(out.String(), "completed:") {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint with counted records within 90s (last error: %v)\n%s", err, out.String())
		}
		time.Sleep(200 * time.Millisecond)
	}

	if secure {
		anon := &devAPI{base: api.base, client: api.client}
		var ae *devHTTPError
		if err := anon.getJSON(ctx, "/v1/jobs", &[]any{}); !errors.As(err, &ae) || ae.status != http.StatusUnauthorized {
			t.Errorf("GET /v1/jobs without a token: %v, want 401", err)
		}
		plain := &devAPI{base: "http://" + strings.TrimPrefix(api.base, "https://"), client: http.DefaultClient}
		if err := plain.getJSON(ctx, "/v1/status", &map[string]any{}); err == nil {
			t.Error("plain HTTP answered by a secure coordinator")
		}
		if !strings.Contains(out.String(), "COORD_TOKEN="+api.token) {
			t.Errorf("dev -secure did not print how to point the CLI at it:\n%s", out.String())
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dev returned %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("dev did not stop within 60s of its context ending")
	}
	if !strings.Contains(out.String(), "checkpoint") || !strings.Contains(out.String(), "completed:") {
		t.Errorf("dev printed no checkpoint progress:\n%s", out.String())
	}
	return api
}
