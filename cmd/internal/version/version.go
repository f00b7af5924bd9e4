// Package version says which build of coordflow a binary is, from what the
// Go toolchain records in it: the module version, the VCS revision and
// whether the tree had changes, and the Go version.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

// String is the version of this build: "v1.2.3", or for a build from a
// checkout "(devel) 664724f", with "+dirty" when the tree had changes, and
// "unknown" when the binary records nothing.
func String() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && !strings.Contains(v, rev) {
		v += " " + rev + dirty
	}
	return v
}

// Line is what `BINARY version` prints: the binary, its version and the Go
// toolchain and platform it was built for.
func Line(binary string) string {
	return fmt.Sprintf("%s %s %s %s/%s", binary, String(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
