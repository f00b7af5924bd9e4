package main

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestKeygen: coordd keygen prints a new base64 key of 32 bytes, alone on a
// line, different each time.
func TestKeygen(t *testing.T) {
	var keys []string
	for range 2 {
		var out, errOut bytes.Buffer
		if code := run([]string{"keygen"}, &out, &errOut); code != 0 {
			t.Fatalf("coordd keygen = %d %q", code, errOut.String())
		}
		line := out.String()
		if !strings.HasSuffix(line, "\n") || strings.Count(line, "\n") != 1 {
			t.Fatalf("coordd keygen printed %q, want one line", line)
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(line))
		if err != nil || len(key) != 32 {
			t.Fatalf("coordd keygen printed %q: %d bytes (%v), want base64 of 32", line, len(key), err)
		}
		keys = append(keys, line)
	}
	if keys[0] == keys[1] {
		t.Error("two runs of coordd keygen printed the same key")
	}
	if code := run([]string{"keygen", "extra"}, &bytes.Buffer{}, &bytes.Buffer{}); code != 2 {
		t.Errorf("coordd keygen extra = %d, want 2", code)
	}
}

// TestAgentGossipKeyFlags: bad gossip keys stop coordd agent before it
// starts, naming the source and never printing the key.
func TestAgentGossipKeyFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(file, []byte("c2VjcmV0LXNob3J0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := base64.StdEncoding.EncodeToString(make([]byte, 32))
	base := []string{"agent", "-id", "c1", "-data-dir", t.TempDir()}
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{[]string{"-encrypt", "not-base64!"}, "", "-encrypt: gossip key 1 of 1: not base64"},
		{[]string{"-encrypt", good + ",c2VjcmV0LXNob3J0"}, "", "-encrypt: gossip key 2 of 2: 12 bytes"},
		{[]string{"-encrypt-file", file}, "", "gossip key 1 of 1: 12 bytes"},
		{[]string{"-encrypt-file", filepath.Join(t.TempDir(), "missing")}, "", "-encrypt-file: open"},
		{[]string{"-encrypt", good, "-encrypt-file", file}, "", "set one, not both"},
		{nil, "c2VjcmV0LXNob3J0", "$COORD_GOSSIP_KEY: gossip key 1 of 1: 12 bytes"},
	} {
		t.Setenv("COORD_GOSSIP_KEY", tc.env)
		var errOut bytes.Buffer
		code := run(append(append([]string{}, base...), tc.args...), &bytes.Buffer{}, &errOut)
		if code != 2 || !strings.Contains(errOut.String(), tc.want) || strings.Contains(errOut.String(), "c2VjcmV0") {
			t.Errorf("coordd agent %v (env %q) = %d %q, want 2 and %q, without the key", tc.args, tc.env, code, errOut.String(), tc.want)
		}
	}
}

// TestRaftAddPeerUsage: add-peer needs -id and -raft-addr.
func TestRaftAddPeerUsage(t *testing.T) {
	for _, args := range [][]string{{"raft", "add-peer"}, {"raft", "add-peer", "-id", "c4"}, {"raft", "add-peer", "-raft-addr", "127.0.0.1:7004"}} {
		var errOut bytes.Buffer
		if code := run(args, &bytes.Buffer{}, &errOut); code != 2 || !strings.Contains(errOut.String(), "-id and -raft-addr are required") {
			t.Errorf("coordd %v = %d %q, want 2", args, code, errOut.String())
		}
	}
}
