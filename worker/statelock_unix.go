//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

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
// cache/ and db/ under its running tasks. It returns a nil file, and no
// error, where the file system takes no locks (NFS without a lock
// manager, say): the caller warns and goes on, as before locks.
func lockStateDir(dir string) (*os.File, error) {
	mark := stateDirMarkPath(dir)
	f, err := os.Open(mark) // flock needs no write access
	if err != nil {
		return nil, err
	}
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, syscall.ENOLCK) || errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS):
		f.Close()
		return nil, nil
	case errors.Is(err, syscall.EWOULDBLOCK):
		f.Close()
		return nil, fmt.Errorf("%s is in use by another worker (it holds %s locked), or by an earlier worker of this process whose tasks did not stop; give each worker a directory of its own", dir, mark)
	default:
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", mark, err)
	}
}
