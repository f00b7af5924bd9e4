package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestConfigFile: `workerd -config FILE` takes its options from the file
// (here far enough for the -log-level check to fail on them), lets flags
// override it, and names a bad option.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-config", write("a.json", `{"id": "w1", "slots": 8, "batch-size": 1000, "log-level": "loud"}`)}, `-log-level`},
		{[]string{"-config", write("b.json", `{"id": "w1", "log-level": "loud"}`), "-log-level", "shouty"}, `"shouty"`},
		{[]string{"-config", write("c.json", `{"id": "w1", "slot": 8}`)}, `unknown option "slot"`},
		{[]string{"-config", write("d.json", `{"id": "w1", "flush-interval": 10}`)}, `option "flush-interval": invalid value "10"`},
		{[]string{"-config", filepath.Join(dir, "missing.json")}, "missing.json"},
	} {
		err := run(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("workerd %v: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// TestOptionsDocumented: docs/operations.md's option reference lists every
// flag of workerd.
func TestOptionsDocumented(t *testing.T) {
	var usage bytes.Buffer
	_ = run([]string{"-h"}, &usage)
	docs, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	ref := string(docs)
	if i := strings.Index(ref, "#### workerd"); i >= 0 {
		ref = ref[i:]
	}
	var names []string
	for _, line := range strings.Split(usage.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			names = append(names, strings.Fields(rest)[0])
		}
	}
	if len(names) < 20 {
		t.Fatalf("found %d flags in workerd -h: %q", len(names), usage.String())
	}
	for _, name := range names {
		if name != "config" && !strings.Contains(ref, "| `"+name+"` |") {
			t.Errorf("docs/operations.md (Config files, workerd) does not list option %q", name)
		}
	}
	if i := strings.Index(ref, "\n#"); i >= 0 {
		ref = ref[:i]
	}
	for _, m := range regexp.MustCompile("(?m)^\\| `([a-z0-9-]+)` \\|").FindAllStringSubmatch(ref, -1) {
		if !slices.Contains(names, m[1]) {
			t.Errorf("docs/operations.md (Config files, workerd) lists option %q, which workerd does not have", m[1])
		}
	}
}
