package main

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/coordflow/coordflow/coordinator"
)

// TestCLI runs the CLI commands against a real single-node coordinator.
func TestCLI(t *testing.T) {
	srv := startLeader(t, func(*coordinator.Config) {})
	t.Setenv("COORD_ADDR", srv.HTTPAddr())

	cli := func(args ...string) (code int, stdout, stderr string) {
		var out, errOut bytes.Buffer
		code = run(args, &out, &errOut)
		return code, out.String(), errOut.String()
	}
	spec := filepath.Join(t.TempDir(), "job.json")
	if err := os.WriteFile(spec, []byte(`{"name": "wc", "source": {"brokers": ["127.0.0.1:9092"], "topic": "words", "parallelism": 1},
		"operator": {"name": "wordcount", "parallelism": 1}}`), 0o600); err != nil {
		t.Fatal(err)
	}

	code, id, stderr := cli("job", "run", spec)
	id = strings.TrimSpace(id)
	if code != 0 || !strings.HasPrefix(id, "wc-") || strings.Contains(id, "\n") {
		t.Fatalf("job run = %d %q %q, want 0 and the job id alone", code, id, stderr)
	}
	// No worker runs here: -wait gives up at its timeout, naming the
	// status, and still prints the id first.
	code, waitID, stderr := cli("job", "run", "-wait", "-wait-timeout", "700ms", spec)
	if code != 1 || !strings.HasPrefix(waitID, "wc-") || !strings.Contains(stderr, "no checkpoint completed in time") || !strings.Contains(stderr, `"pending"`) {
		t.Fatalf("job run -wait = %d %q %q, want 1, the id, and a timeout naming status pending", code, waitID, stderr)
	}
	if code, _, stderr := cli("job", "cancel", strings.TrimSpace(waitID)); code != 0 {
		t.Fatalf("cancel %s: %s", waitID, stderr)
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"job", "list"}, []string{"ID", "STATUS", id}},
		{[]string{"job", "status", id}, []string{`"id": "` + id + `"`, `"last_checkpoint": null`}},
		{[]string{"job", "checkpoints", "-addr", "http://" + srv.HTTPAddr(), id}, []string{"ID", "TRIGGERED"}},
		{[]string{"members"}, []string{"c1", "coordinator", "alive", "raft="}},
		{[]string{"raft", "peers"}, []string{"c1", "voter", "*"}},
		{[]string{"job", "cancel", id}, []string{"cancelled"}},
	} {
		code, out, stderr := cli(tc.args...)
		if code != 0 {
			t.Errorf("%v = %d, stderr %q", tc.args, code, stderr)
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v printed %q, want %q in it", tc.args, out, w)
			}
		}
	}

	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"job", "state", id}, 1, "no completed checkpoint"},
		{[]string{"job", "cancel", id}, 1, "already cancelled"},
		{[]string{"job", "status", "nope"}, 1, `no job "nope"`},
		{[]string{"job", "status"}, 2, "want 1 argument"},
		{[]string{"raft", "remove-peer", "c1"}, 1, "cannot remove itself"},
		{[]string{"raft", "remove-peer", "c9"}, 1, `no raft peer "c9"`},
		{[]string{"raft", "remove-peer"}, 2, "want 1 argument"},
		{[]string{"raft", "frob"}, 2, "unknown command"},
		{[]string{"job", "frob"}, 2, "unknown command"},
		{[]string{"frob"}, 2, "unknown command"},
		{[]string{"agent", "-id", "c9"}, 2, "-data-dir are required"},
	} {
		code, _, stderr := cli(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.stderr) {
			t.Errorf("%v = %d %q, want %d and %q", tc.args, code, stderr, tc.code, tc.stderr)
		}
	}
}

// TestLastLine keeps the last complete line of a stream written in pieces.
func TestLastLine(t *testing.T) {
	var sink strings.Builder
	l := &lastLine{w: &sink}
	for _, p := range []string{"{\"a\":1}\n{\"err", "or\":\"boom\"}", "\n"} {
		if _, err := l.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	if string(l.line) != `{"error":"boom"}` || sink.String() != "{\"a\":1}\n{\"error\":\"boom\"}\n" {
		t.Fatalf("last line %q, passed on %q", l.line, sink.String())
	}
}

// TestVersion: `coordd version` prints the binary, its build and the Go
// version.
func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"version"}, &out, &bytes.Buffer{}); code != 0 {
		t.Fatalf("coordd version exited %d", code)
	}
	if s := out.String(); !strings.HasPrefix(s, "coordd ") || !strings.Contains(s, runtime.Version()) {
		t.Fatalf("coordd version printed %q", s)
	}
}
