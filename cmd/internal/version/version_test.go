package version

import (
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
