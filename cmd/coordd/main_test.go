package main

import (
	"bytes"
	"encoding/json"
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
		{[]string{"job", "lag", id}, 1, "source brokers 127.0.0.1:"},
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
		{[]string{"job", "list", "-format", "xml"}, 2, `-format "xml": want table or json`},
	} {
		code, _, stderr := cli(tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.stderr) {
			t.Errorf("%v = %d %q, want %d and %q", tc.args, code, stderr, tc.code, tc.stderr)
		}
	}

	// -purge: a cancelled job without tasks goes at once, and is then
	// unknown; -purge does not go with -savepoint. -purge-wait goes to
	// the API, which refuses one past its 5 minutes.
	if code, _, stderr := cli("job", "cancel", "-purge", "-purge-wait", "6m", id); code != 1 || !strings.Contains(stderr, `wait="6m0s"`) {
		t.Errorf("job cancel -purge -purge-wait 6m = %d %q, want 1 naming the wait", code, stderr)
	}
	if code, out, stderr := cli("job", "cancel", "-purge", "-purge-wait", "20s", id); code != 0 || !strings.Contains(out, "job "+id+" purged (0 checkpoint files deleted)") {
		t.Errorf("job cancel -purge %s = %d %q %q, want it purged", id, code, out, stderr)
	}
	if code, _, stderr := cli("job", "cancel", "-purge-wait", "1s", strings.TrimSpace(waitID)); code != 1 || !strings.Contains(stderr, "-purge-wait goes with -purge") {
		t.Errorf("job cancel -purge-wait without -purge = %d %q, want 1 saying it goes with -purge", code, stderr)
	}
	if code, _, stderr := cli("job", "status", id); code != 1 || !strings.Contains(stderr, "no job") {
		t.Errorf("job status of a purged job = %d %q, want 1 and no job", code, stderr)
	}
	if code, _, stderr := cli("job", "cancel", "-purge", "-savepoint", strings.TrimSpace(waitID)); code != 1 || !strings.Contains(stderr, "savepoint first") {
		t.Errorf("job cancel -purge -savepoint = %d %q, want 1 saying to stop with a savepoint first", code, stderr)
	}
	if code, _, stderr := cli("job", "cancel", "-force", strings.TrimSpace(waitID)); code != 1 || !strings.Contains(stderr, "-force goes with -purge") {
		t.Errorf("job cancel -force = %d %q, want 1 saying it goes with -purge", code, stderr)
	}

	// -format json: every API command prints the API's JSON, which scripts
	// decode; each answer names what the table shows.
	asJSON := func(args ...string) any {
		t.Helper()
		code, out, stderr := cli(append(args, "-format", "json")...)
		var v any
		if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil {
			t.Fatalf("%v -format json = %d %q %q: %v", args, code, out, stderr, err)
		}
		return v
	}
	field := func(v any, key string) any {
		m, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("%v is not a JSON object", v)
		}
		return m[key]
	}
	first := func(v any) any {
		l, ok := v.([]any)
		if !ok || len(l) == 0 {
			t.Fatalf("%v is not a JSON list with elements", v)
		}
		return l[0]
	}
	jid, _ := field(asJSON("job", "run", spec), "id").(string)
	if !strings.HasPrefix(jid, "wc-") {
		t.Fatalf("job run -format json gave id %q", jid)
	}
	if field(asJSON("job", "status", jid), "id") != jid {
		t.Error("job status -format json does not name the job")
	}
	found := false
	for _, j := range asJSON("job", "list").([]any) {
		found = found || field(j, "id") == jid
	}
	if !found {
		t.Errorf("job list -format json does not list %s", jid)
	}
	if _, ok := asJSON("job", "checkpoints", jid).([]any); !ok {
		t.Error("job checkpoints -format json is not a list")
	}
	if field(first(asJSON("members")), "id") != "c1" {
		t.Error("members -format json does not list c1")
	}
	if field(first(field(asJSON("raft", "peers"), "servers")), "id") != "c1" {
		t.Error("raft peers -format json does not list c1")
	}
	if _, ok := asJSON("savepoint", "list").([]any); !ok {
		t.Error("savepoint list -format json is not a list")
	}
	if field(asJSON("job", "cancel", jid), "status") == nil {
		t.Error("job cancel -format json has no status")
	}
	if got := field(asJSON("job", "cancel", "-purge", jid), "status"); got != "purged" {
		t.Errorf("job cancel -purge -format json: status %v, want purged", got)
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
	out.Reset()
	var v struct{ Binary, Version, Go, Platform string }
	if code := run([]string{"version", "-format", "json"}, &out, &bytes.Buffer{}); code != 0 || json.Unmarshal(out.Bytes(), &v) != nil ||
		v.Binary != "coordd" || v.Version == "" || v.Go != runtime.Version() {
		t.Fatalf("coordd version -format json = %d %q", code, out.String())
	}
}
