package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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
	var out bytes.Buffer
	var v struct{ Key string }
	if code := run([]string{"keygen", "-format", "json"}, &out, &bytes.Buffer{}); code != 0 || json.Unmarshal(out.Bytes(), &v) != nil || len(v.Key) != 44 {
		t.Errorf("coordd keygen -format json = %d %q", code, out.String())
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

// TestAgentConfigFile: `coordd agent -config FILE` takes its options from the
// file (here far enough for the gossip key check to fail on them), from the
// environment where the file says so, lets flags override the file, and names
// a bad option.
func TestAgentConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	opts := fmt.Sprintf(`"id": "c1", "data-dir": %q, "raft-heartbeat-timeout": "250ms", "join": ["127.0.0.1:1", "127.0.0.1:2"]`, t.TempDir())
	good := base64.StdEncoding.EncodeToString(make([]byte, 32))
	t.Setenv("TEST_GOSSIP_KEY", "c2VjcmV0LXNob3J0")
	for _, tc := range []struct {
		file string
		args []string
		code int
		want string
	}{
		{write("plain.json", `{`+opts+`, "encrypt": "not-base64!"}`), nil, 2, "-encrypt: gossip key 1 of 1: not base64"},
		{write("env.json", `{`+opts+`, "encrypt": {"env": "TEST_GOSSIP_KEY"}}`), nil, 2, "-encrypt: gossip key 1 of 1: 12 bytes"},
		{write("override.json", `{`+opts+`, "encrypt": "not-base64!"}`), []string{"-encrypt", good + ",c2VjcmV0LXNob3J0"}, 2, "gossip key 2 of 2: 12 bytes"},
		{write("unknown.json", `{`+opts+`, "bootstrap": 3}`), nil, 1, `unknown option "bootstrap"`},
		{write("badvalue.json", `{`+opts+`, "raft-election-timeout": 300}`), nil, 1, `option "raft-election-timeout": invalid value "300"`},
		{write("noenv.json", `{`+opts+`, "encrypt": {"env": "TEST_UNSET_VARIABLE"}}`), nil, 1, "environment variable TEST_UNSET_VARIABLE is not set"},
	} {
		var errOut bytes.Buffer
		args := append([]string{"agent", "-config", tc.file}, tc.args...)
		code := run(args, &bytes.Buffer{}, &errOut)
		if code != tc.code || !strings.Contains(errOut.String(), tc.want) || strings.Contains(errOut.String(), "c2VjcmV0") {
			t.Errorf("coordd %v = %d %q, want %d and %q, without the key", args, code, errOut.String(), tc.code, tc.want)
		}
	}
}

// TestAgentOptionsDocumented: docs/operations.md's option reference lists
// every flag of coordd agent, so a config file's every option is documented.
func TestAgentOptionsDocumented(t *testing.T) {
	var usage bytes.Buffer
	run([]string{"agent", "-h"}, &bytes.Buffer{}, &usage)
	docs, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	ref := string(docs)
	if i, j := strings.Index(ref, "#### coordd agent"), strings.Index(ref, "#### workerd"); i >= 0 && j > i {
		ref = ref[i:j]
	}
	names := flagNames(usage.String())
	if len(names) < 30 {
		t.Fatalf("found %d flags in coordd agent -h: %q", len(names), usage.String())
	}
	for _, name := range names {
		if name != "config" && !strings.Contains(ref, "| `"+name+"` |") {
			t.Errorf("docs/operations.md (Config files) does not list option %q", name)
		}
	}
	for _, name := range documentedOptions(t, "#### coordd agent") {
		if !slices.Contains(names, name) {
			t.Errorf("docs/operations.md (Config files) lists option %q, which coordd agent does not have", name)
		}
	}
}

// flagNames returns the flag names a flag set's usage text lists.
func flagNames(usage string) []string {
	var names []string
	for _, line := range strings.Split(usage, "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			names = append(names, strings.Fields(rest)[0])
		}
	}
	return names
}
