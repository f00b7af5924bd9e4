// Package failpoint lets the integration tests crash a coordd or workerd at
// an exact point of the protocol, such as between a sink's pre-commit and
// its commit, which no outside signal can hit reliably.
//
// A process started with COORDFLOW_FAILPOINTS=DIR checks, at each named
// point, whether the file DIR/<name> exists; the first process to remove
// it SIGKILLs itself there, as a crash would. Without the variable every
// point is a no-op. A test arms a point by creating its file, so that one
// point fires once in a whole cluster, in whichever process gets there
// first.
package failpoint

import (
	"os"
	"path/filepath"
	"syscall"
)

// Env is the environment variable that names the failpoint directory.
const Env = "COORDFLOW_FAILPOINTS"

// FromEnv returns the failpoint hook of this process, or nil when Env is
// not set.
func FromEnv() func(name string) {
	dir := os.Getenv(Env)
	if dir == "" {
		return nil
	}
	return func(name string) {
		if os.Remove(filepath.Join(dir, name)) == nil {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is delivered before this returns in practice; never go on
		}
	}
}
