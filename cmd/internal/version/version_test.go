package version

import (
	"bytes"
	"encoding/json"
	"io"
	"runtime"
	"strings"
	"testing"
)

func TestLine(t *testing.T) {
	l := Line("coordd")
	if !strings.HasPrefix(l, "coordd ") || !strings.Contains(l, runtime.Version()) || String() == "" {
		t.Fatalf("Line = %q, String = %q", l, String())
	}
	// A test binary records its module; only "unknown" would mean nothing.
	if String() == "unknown" {
		t.Fatalf("no build information in the test binary")
	}
}

// TestCommand: `BINARY version` prints the line, -format json an object
// with stable fields, and bad arguments exit 2 naming what is wrong.
func TestCommand(t *testing.T) {
	var out, errs bytes.Buffer
	if code := Command("workerd", nil, &out, &errs); code != 0 || strings.TrimSpace(out.String()) != Line("workerd") {
		t.Fatalf("version: exit %d, %q", code, out.String())
	}
	out.Reset()
	if code := Command("workerd", []string{"-format", "json"}, &out, &errs); code != 0 {
		t.Fatalf("version -format json: exit %d: %s", code, errs.String())
	}
	var v map[string]string
	if err := json.Unmarshal(out.Bytes(), &v); err != nil {
		t.Fatalf("version -format json: %q: %v", out.String(), err)
	}
	if v["binary"] != "workerd" || v["version"] != String() || v["go"] != runtime.Version() || v["platform"] != runtime.GOOS+"/"+runtime.GOARCH {
		t.Fatalf("version -format json = %v", v)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-format", "yaml"}, `-format "yaml": want table or json`},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"-verbose"}, "flag provided but not defined: -verbose"},
	} {
		errs.Reset()
		if code := Command("workerd", tc.args, io.Discard, &errs); code != 2 || !strings.Contains(errs.String(), tc.want) {
			t.Errorf("version %v: exit %d, stderr %q, want 2 and %q", tc.args, code, errs.String(), tc.want)
		}
	}
}
