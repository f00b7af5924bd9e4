package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Cluster helpers shared by the coordinator tests. Every server binds
// 127.0.0.1:0 for Raft, gRPC, HTTP and gossip, keeps its data in t.TempDir,
// logs into the test's output, and is shut down when the test ends.

// testOperators are the operator names test servers accept.
var testOperators = []string{"wordcount", "count", "sum", "passthrough"}

// testLogWriter writes log lines into a test's output until the test's
// cleanup has run; later lines (from goroutines that outlive a server) are
// dropped instead of failing the test binary.
type testLogWriter struct {
	mu   sync.Mutex
	w    io.Writer
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return len(p), nil
	}
	return w.w.Write(p)
}

// testLogger returns a logger into t's output (shown for failed tests, or
// with -v). COORDFLOW_TEST_LOG sets the level: debug, info (default), warn, error.
func testLogger(t testing.TB) *slog.Logger {
	w := &testLogWriter{w: t.Output()}
	t.Cleanup(func() { // registered first, so it runs after every server's shutdown
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	level := slog.LevelInfo
	if v := os.Getenv("COORDFLOW_TEST_LOG"); v != "" {
		if err := level.UnmarshalText([]byte(v)); err != nil {
			t.Fatalf("COORDFLOW_TEST_LOG=%q: %v", v, err)
		}
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// testConfig returns the config of a test coordinator id: DefaultConfig
// timings, free ports on 127.0.0.1, a fresh data dir, no bootstrap and no join.
func testConfig(t testing.TB, logger *slog.Logger, id string) Config {
	cfg := DefaultConfig()
	cfg.ID = id
	cfg.DataDir = filepath.Join(t.TempDir(), id)
	cfg.RaftAddr, cfg.RPCAddr, cfg.HTTPAddr, cfg.GossipAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.RaftReconcileInterval = 500 * time.Millisecond
	cfg.Operators = testOperators
	cfg.Logger = logger
	return cfg
}

// startServer starts a coordinator and shuts it down when the test ends.
func startServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatalf("start coordinator %s: %v", cfg.ID, err)
	}
	t.Cleanup(func() { stopServer(t, s) })
	return s
}

// stopServer shuts s down, failing the test if that fails or takes over 15 s.
// Stopping a server twice is fine.
func stopServer(t testing.TB, s *Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Errorf("shutdown %s: %v", s.ID(), err)
	}
}

// startCluster starts n coordinators c1..cn with -bootstrap-expect n, each
// joining c1's gossip address, and waits until they agree on one leader.
func startCluster(t testing.TB, n int) []*Server {
	t.Helper()
	logger := testLogger(t)
	servers := make([]*Server, 0, n)
	for i := 1; i <= n; i++ {
		cfg := testConfig(t, logger, fmt.Sprintf("c%d", i))
		cfg.BootstrapExpect = n
		if i > 1 {
			cfg.Join = []string{servers[0].GossipAddr()}
		}
		servers = append(servers, startServer(t, cfg))
	}
	waitForLeader(t, servers...)
	return servers
}

// restartConfig returns the config to start s again after it stopped: the
// same id, data dir, Raft and gossip addresses, joining through join.
func restartConfig(s *Server, join ...string) Config {
	cfg := s.cfg
	// The Raft address is in the others' configuration, and gossip knows
	// the node by it; the API's ports may change, as a restarted process's
	// may, and are not held meanwhile (another test's listener may take
	// them).
	cfg.RaftAddr, cfg.GossipAddr = s.RaftAddr(), s.GossipAddr()
	cfg.RPCAddr, cfg.HTTPAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Join = join
	cfg.BootstrapExpect = 0
	return cfg
}

// waitForLeader waits until exactly one of servers leads, has passed its
// Barrier (it serves reads) and every other one names it as leader, and
// returns it.
func waitForLeader(t testing.TB, servers ...*Server) *Server {
	t.Helper()
	var leader *Server
	waitFor(t, 15*time.Second, func() error {
		leader = nil
		for _, s := range servers {
			if s.IsLeader() {
				if leader != nil {
					return fmt.Errorf("two leaders: %s and %s", leader.ID(), s.ID())
				}
				leader = s
			}
		}
		if leader == nil {
			return errors.New("no leader")
		}
		if leader.barrierTerm.Load() != leader.raft.CurrentTerm() {
			// Until then it refuses reads of its state.
			return fmt.Errorf("leader %s has not passed its barrier", leader.ID())
		}
		for _, s := range servers {
			if id, _, httpAddr := s.leaderInfo(); id != leader.ID() || httpAddr != leader.HTTPAddr() {
				return fmt.Errorf("%s sees leader %q at %q, want %s at %s", s.ID(), id, httpAddr, leader.ID(), leader.HTTPAddr())
			}
		}
		return nil
	})
	return leader
}

// followers returns the servers that are not leader.
func followers(leader *Server, servers []*Server) []*Server {
	var out []*Server
	for _, s := range servers {
		if s != leader {
			out = append(out, s)
		}
	}
	return out
}

// waitForEqualDigests waits until every server's FSM digest is the same, or
// until every server has been seen at one applied index with one digest: a
// job that checkpoints keeps the replicas moving, and a follower applies each
// entry a moment after the leader, so their current digests may never match
// at the instant they are read. The FSM is deterministic, so agreeing at one
// index is what the invariant asks. Digests are read concurrently, each
// between two reads of its server's applied index; a reading during which the
// index moved is not tagged with an index.
func waitForEqualDigests(t testing.TB, servers ...*Server) {
	t.Helper()
	seen := make([]map[uint64]string, len(servers)) // per server: digest at an applied index
	for i := range seen {
		seen[i] = make(map[uint64]string)
	}
	waitFor(t, 15*time.Second, func() error {
		digests := make([]string, len(servers))
		errs := make([]error, len(servers))
		var wg sync.WaitGroup
		for i, s := range servers {
			wg.Go(func() {
				before := s.applied.applied.Load()
				digests[i], errs[i] = s.Digest()
				if errs[i] == nil && s.applied.applied.Load() == before {
					seen[i][before] = digests[i]
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
		if !slices.ContainsFunc(digests, func(d string) bool { return d != digests[0] }) {
			return nil
		}
	indexes:
		for index, d := range seen[0] {
			for _, other := range seen[1:] {
				if other[index] != d {
					continue indexes
				}
			}
			return nil
		}
		return fmt.Errorf("digests differ: %s is at %.12s, %s at %.12s", servers[0].ID(), digests[0], servers[1].ID(), digests[1])
	})
}

// waitFor polls cond every 20 ms until it returns nil, and fails the test
// with cond's last error if that takes longer than timeout.
func waitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// apiCall sends method path (with body, if not nil, as JSON) to s's HTTP API
// and decodes the JSON answer into out (if not nil). It returns the status.
func apiCall(t testing.TB, s *Server, method, path string, body, out any) int {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = bytes.NewBufferString(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatalf("encode %s %s body: %v", method, path, err)
		}
		r = bytes.NewReader(data)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+s.HTTPAddr()+path, r)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s on %s: %v", method, path, s.ID(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s on %s: read answer: %v", method, path, s.ID(), err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s on %s: answer %d %q: %v", method, path, s.ID(), resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

// postKeyed posts spec to path on s's HTTP API with an Idempotency-Key
// (none if key is "") and returns the status and the answer's body. A
// request that fails is an error of the test, answered with status 0, not
// a fatal one: callers send submissions from several goroutines at once.
func postKeyed(t testing.TB, s *Server, key, path, spec string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+s.HTTPAddr()+path, strings.NewReader(spec))
	if err != nil {
		t.Errorf("POST %s: %v", path, err)
		return 0, nil
	}
	if key != "" {
		req.Header.Set(SubmissionKeyHeader, key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("POST %s on %s: %v", path, s.ID(), err)
		return 0, nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Errorf("POST %s on %s: read answer: %v", path, s.ID(), err)
	}
	return resp.StatusCode, body
}

// wordcountSpec is a valid job spec as users submit it.
const wordcountSpec = `{
  "name": "wordcount",
  "source": {"brokers": ["127.0.0.1:9092"], "topic": "words", "start": "earliest", "parallelism": 2},
  "operator": {"name": "wordcount", "parallelism": 2, "max_parallelism": 128},
  "sink": {"brokers": ["127.0.0.1:9092"], "topic": "counts"},
  "checkpoint": {"interval": "1s", "timeout": "30s", "min_pause": "0s", "retained": 3, "tolerable_failures": 3}
}`

// submitJob posts spec to s and returns the new job's id.
func submitJob(t testing.TB, s *Server, spec string) string {
	t.Helper()
	var out struct {
		ID    string `json:"id"`
		Error string `json:"error"`
	}
	if code := apiCall(t, s, http.MethodPost, "/v1/jobs", spec, &out); code != http.StatusCreated {
		t.Fatalf("POST /v1/jobs on %s: %d %s", s.ID(), code, out.Error)
	}
	return out.ID
}
