//go:build !unix

package worker

import "os"

// lockStateDir opens the mark of a worker's state directory; this platform
// has no flock, so two workers given one directory are not told apart.
func lockStateDir(dir string) (*os.File, error) {
	return os.OpenFile(stateDirMarkPath(dir), os.O_RDWR, 0)
}
