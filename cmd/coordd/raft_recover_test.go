package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coordflow/coordflow/coordinator"
)

// TestRaftRecover runs `coordd raft recover` on the data dir of a single
// coordinator: refused while it runs, done once it stopped, and the node
// starts again as leader of the configuration the peers file names.
func TestRaftRecover(t *testing.T) {
	cli := func(args ...string) (code int, stdout, stderr string) {
		var out, errOut bytes.Buffer
		code = run(args, &out, &errOut)
		return code, out.String(), errOut.String()
	}
	cfg := coordinator.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.BootstrapExpect = "c1", t.TempDir(), 1
	cfg.RaftAddr, cfg.RPCAddr, cfg.HTTPAddr, cfg.GossipAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Logger = slog.New(slog.DiscardHandler)
	start := func() *coordinator.Server {
		t.Helper()
		srv, err := coordinator.NewServer(cfg)
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); !srv.IsLeader(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("coordinator did not become leader")
			}
		}
		return srv
	}
	stop := func(srv *coordinator.Server) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Error(err)
		}
	}

	srv := start()
	cfg.RaftAddr, cfg.RPCAddr, cfg.HTTPAddr, cfg.GossipAddr = srv.RaftAddr(), srv.RPCAddr(), srv.HTTPAddr(), srv.GossipAddr()
	cfg.BootstrapExpect = 0
	peers := filepath.Join(t.TempDir(), "peers.json")
	if err := os.WriteFile(peers, fmt.Appendf(nil, `[{"id": "c1", "address": %q, "non_voter": false}]`, srv.RaftAddr()), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		args []string
		code int
		want string // in stderr
	}{
		{[]string{"raft", "recover", "-peers", peers}, 2, "-data-dir and -peers are required"},
		{[]string{"raft", "recover", "-data-dir", cfg.DataDir}, 2, "-data-dir and -peers are required"},
		{[]string{"raft", "recover", "-data-dir", cfg.DataDir, "-peers", peers, "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"raft", "recover", "-data-dir", cfg.DataDir, "-peers", peers + ".missing"}, 1, "read peers file"},
		{[]string{"raft", "recover", "-data-dir", cfg.DataDir, "-peers", peers}, 1, "locked by another process"},
	} {
		code, _, stderr := cli(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("coordd %s = %d %q, want %d and %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}

	stop(srv)
	code, stdout, stderr := cli("raft", "recover", "-data-dir", cfg.DataDir, "-peers", peers)
	if code != 0 || !strings.Contains(stdout, "raft configuration now: c1 ("+cfg.RaftAddr+", voter)") {
		t.Fatalf("coordd raft recover = %d %q %q, want 0 and the new configuration", code, stdout, stderr)
	}
	srv = start()
	stop(srv)
	// Again, for a script: -format json names the new configuration.
	code, stdout, stderr = cli("raft", "recover", "-data-dir", cfg.DataDir, "-peers", peers, "-format", "json")
	var got struct {
		DataDir string `json:"data_dir"`
		Index   uint64 `json:"index"`
		Servers []struct {
			ID, Address string
		} `json:"servers"`
	}
	if err := json.Unmarshal([]byte(stdout), &got); code != 0 || err != nil || got.DataDir != cfg.DataDir || got.Index == 0 ||
		len(got.Servers) != 1 || got.Servers[0].ID != "c1" || got.Servers[0].Address != cfg.RaftAddr {
		t.Fatalf("coordd raft recover -format json = %d %q %q (%v): %+v", code, stdout, stderr, err, got)
	}
}
