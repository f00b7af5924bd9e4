package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestTLSCreate: `coordd tls ca create` and `tls cert create` write their
// files and say where, in sentences or, with -format json, as an object a
// script reads; bad flags exit 2 naming them.
func TestTLSCreate(t *testing.T) {
	dir := t.TempDir()
	code, stdout, stderr := runCLI("tls", "ca", "create", "-dir", dir)
	if code != 0 || !strings.Contains(stdout, "==> CA certificate "+filepath.Join(dir, "ca.pem")) {
		t.Fatalf("tls ca create = %d %q %q", code, stdout, stderr)
	}
	code, stdout, stderr = runCLI("tls", "cert", "create", "-dir", dir, "-worker", "w1", "-format", "json")
	var files struct{ Identity, Cert, Key string }
	if err := json.Unmarshal([]byte(stdout), &files); code != 0 || err != nil || files.Identity == "" {
		t.Fatalf("tls cert create -format json = %d %q %q: %v", code, stdout, stderr, err)
	}
	for _, f := range []string{files.Cert, files.Key} {
		if _, err := os.Stat(f); err != nil || filepath.Dir(f) != dir {
			t.Errorf("-format json names %q, which is not a file written in %s: %v", f, dir, err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"tls", "cert", "create", "-dir", dir, "-worker", "w2", "-format", "yaml"}, `-format "yaml": want table or json`},
		{[]string{"tls", "cert", "create", "-dir", dir}, "give exactly one of -coordinator, -worker and -client"},
		// As a duration, 200,000 days wrap around to a certificate that
		// expired before it was made.
		{[]string{"tls", "ca", "create", "-dir", t.TempDir(), "-days", "200000"}, "-days 200000: want 1 to 36500 (0: the default)"},
	} {
		if code, _, stderr := runCLI(tc.args...); code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("coordd %v = %d %q, want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
}
