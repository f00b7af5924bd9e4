package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coordflow/coordflow/coordinator"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// startLeader starts a single-node coordinator changed by mutate and waits
// until it leads.
func startLeader(t *testing.T, mutate func(*coordinator.Config)) *coordinator.Server {
	t.Helper()
	cfg := coordinator.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.BootstrapExpect = "c1", t.TempDir(), 1
	cfg.RaftAddr, cfg.RPCAddr, cfg.HTTPAddr, cfg.GossipAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Operators = []string{"wordcount"}
	cfg.Logger = slog.New(slog.DiscardHandler)
	mutate(&cfg)
	srv, err := coordinator.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Error(err)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); !srv.IsLeader(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("single coordinator did not become leader")
		}
	}
	return srv
}

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// clearCLIEnv unsets the CLI's environment for the test.
func clearCLIEnv(t *testing.T) {
	for _, v := range []string{"COORD_ADDR", "COORD_TOKEN", "COORD_CACERT", "COORD_CLIENT_CERT", "COORD_CLIENT_KEY"} {
		t.Setenv(v, "")
	}
}

// TestCLITokens runs the CLI against a coordinator with API tokens: -token
// and COORD_TOKEN, and clear 401 and 403 errors.
func TestCLITokens(t *testing.T) {
	clearCLIEnv(t)
	dir := t.TempDir()
	const readTok, writeTok = "cli-read-token-0123456789", "cli-write-token-0123456789"
	tokens := filepath.Join(dir, "tokens.json")
	if err := os.WriteFile(tokens, []byte(fmt.Sprintf(`[{"name": "reader", "token": %q, "role": "read"}, {"name": "ci", "token": %q, "role": "write"}]`, readTok, writeTok)), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startLeader(t, func(c *coordinator.Config) { c.ACLTokensFile = tokens })
	t.Setenv("COORD_ADDR", srv.HTTPAddr())
	spec := filepath.Join(dir, "job.json")
	if err := os.WriteFile(spec, []byte(`{"name": "wc", "source": {"brokers": ["127.0.0.1:9092"], "topic": "words", "parallelism": 1},
		"operator": {"name": "wordcount", "parallelism": 1}}`), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		env    string // COORD_TOKEN
		args   []string
		code   int
		stderr string
	}{
		{"", []string{"job", "list"}, 1, "coordd job list: 401 Unauthorized: missing API token: send Authorization: Bearer TOKEN (set -token or COORD_TOKEN"},
		{"", []string{"job", "list", "-token", "wrong-token-0123456789"}, 1, "401 Unauthorized: unknown API token (the token of -token or COORD_TOKEN was refused)"},
		{"", []string{"job", "list", "-token", readTok}, 0, ""},
		{readTok, []string{"members"}, 0, ""},
		{readTok, []string{"job", "list", "-stale"}, 0, ""},
		{readTok, []string{"job", "run", spec}, 1, `403 Forbidden: token "reader" has role read; POST /v1/jobs needs role write`},
		{readTok, []string{"job", "run", spec, "-token", writeTok}, 0, ""},
		{writeTok, []string{"job", "run", spec}, 0, ""},
		{writeTok, []string{"raft", "remove-peer", "c9"}, 1, "needs role operator"},
		{writeTok, []string{"raft", "peers"}, 0, ""},
	} {
		t.Setenv("COORD_TOKEN", tc.env)
		code, _, stderr := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.stderr) {
			t.Errorf("COORD_TOKEN=%q %v = %d %q, want %d and %q", tc.env, tc.args, code, stderr, tc.code, tc.stderr)
		}
	}
	// -h never shows the token of the environment.
	t.Setenv("COORD_TOKEN", writeTok)
	if _, _, stderr := runCLI("job", "list", "-h"); strings.Contains(stderr, writeTok) || !strings.Contains(stderr, "-token") {
		t.Errorf("job list -h printed %q: want -token described and no token", stderr)
	}
}

// TestCLITLS runs the CLI against a coordinator serving its API over TLS
// without tokens: a client certificate from flags or the environment, the
// CA to check the server, and hints when either is missing.
func TestCLITLS(t *testing.T) {
	clearCLIEnv(t)
	dir := t.TempDir()
	ca, _, err := tlsutil.CreateCA(dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(ident tlsutil.Identity) (string, string) {
		cert, key, err := tlsutil.CreateCert(tlsutil.CertRequest{Dir: dir, Identity: ident, Validity: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		return cert, key
	}
	srvCert, srvKey := issue(tlsutil.Identity{Role: tlsutil.RoleCoordinator, ID: "c1"})
	tc, err := tlsutil.Load(tlsutil.Files{CA: ca, Cert: srvCert, Key: srvKey}, tlsutil.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	srv := startLeader(t, func(c *coordinator.Config) { c.TLS = tc })
	cert, key := issue(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "alice", APIRole: "read"})
	addr := srv.HTTPAddr()

	for _, tc := range []struct {
		env    map[string]string
		args   []string
		code   int
		stderr string
	}{
		{nil, []string{"members", "-addr", addr, "-ca-file", ca, "-client-cert", cert, "-client-key", key}, 0, ""},
		{nil, []string{"members", "-addr", "http://" + addr, "-ca-file", ca, "-client-cert", cert, "-client-key", key}, 0, ""},
		{map[string]string{"COORD_ADDR": addr, "COORD_CACERT": ca, "COORD_CLIENT_CERT": cert, "COORD_CLIENT_KEY": key}, []string{"job", "list"}, 0, ""},
		{map[string]string{"COORD_ADDR": addr, "COORD_CACERT": ca}, []string{"members"}, 1, "401 Unauthorized: missing client certificate"},
		{map[string]string{"COORD_ADDR": addr, "COORD_CACERT": ca}, []string{"job", "list", "-client-cert", cert}, 2, "-client-cert and -client-key"},
		{nil, []string{"members", "-addr", "https://" + addr}, 1, "set -ca-file or COORD_CACERT"},
		{nil, []string{"members", "-addr", addr, "-ca-file", cert}, 1, "not from the CA"},
	} {
		clearCLIEnv(t)
		for k, v := range tc.env {
			t.Setenv(k, v)
		}
		code, _, stderr := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.stderr) {
			t.Errorf("%v %v = %d %q, want %d and %q", tc.env, tc.args, code, stderr, tc.code, tc.stderr)
		}
	}
}
