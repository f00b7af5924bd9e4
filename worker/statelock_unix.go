//go:build unix

package worker

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// lockStateDir takes the lock of a worker's state directory: an exclusive
// flock on its mark, held as long as the returned file is open (the
// kernel releases it when the process dies, however it dies). A second
// worker given the same directory would otherwise empty the first one's
// cache/ and db/ under its running tasks.
func lockStateDir(dir string) (*os.File, error) {
	mark := stateDirMarkPath(dir)
	f, err := os.OpenFile(mark, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s is in use by another worker (it holds %s locked); give each worker a directory of its own", dir, mark)
		}
		return nil, fmt.Errorf("lock %s: %w", mark, err)
	}
	return f, nil
}
