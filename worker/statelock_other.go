//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package worker

import "os"

// lockStateDir takes no lock on this platform, which has no flock: the
// caller warns that two workers given one directory are not told apart.
func lockStateDir(string) (*os.File, error) { return nil, nil }
