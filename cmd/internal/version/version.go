// Package version says which build of coordflow a binary is, from what the
// Go toolchain records in it: the module version, the VCS revision and
// whether the tree had changes, and the Go version.
package version

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
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

// Command runs `BINARY version [-format table|json]`: the line of Line, or a
// JSON object with stable fields for scripts. It returns the exit code: 2
// for bad arguments, after a usage message on stderr.
func Command(binary string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(binary+" version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	format := fs.String("format", "table", "output `FORMAT`: table (one line) or json ({\"binary\", \"version\", \"go\", \"platform\"})")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s version: unexpected argument %q\n", binary, fs.Arg(0))
		return 2
	}
	switch *format {
	case "table":
		fmt.Fprintln(stdout, Line(binary))
	case "json":
		_ = json.NewEncoder(stdout).Encode(map[string]string{
			"binary": binary, "version": String(), "go": runtime.Version(), "platform": runtime.GOOS + "/" + runtime.GOARCH,
		})
	default:
		fmt.Fprintf(stderr, "%s version: -format %q: want table or json\n", binary, *format)
		return 2
	}
	return 0
}
