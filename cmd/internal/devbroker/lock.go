package devbroker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
)

// ErrDataDirInUse marks a data directory that another running broker holds
// (devkafka, or the broker of `coordd dev`): two brokers writing the same
// files would corrupt each other's records.
var ErrDataDirInUse = errors.New("data dir in use")

// lockFile is the name of the lock file in a data directory.
const lockFile = "LOCK"

// inUseError says which data dir is held, and by which process if its pid
// could be read. It matches ErrDataDirInUse.
type inUseError struct {
	dir string
	pid int // 0 if unknown
}

func (e *inUseError) Error() string {
	pid := "pid unknown"
	if e.pid > 0 {
		pid = "pid " + strconv.Itoa(e.pid)
	}
	return fmt.Sprintf("data dir %s is in use by another devkafka (%s)", e.dir, pid)
}

func (e *inUseError) Is(target error) bool { return target == ErrDataDirInUse }

// dirLock is an exclusive flock on DIR/LOCK, held while a broker runs. The
// kernel drops it when the process dies, however it dies, so a stale LOCK
// file never blocks a start. The file holds the holder's pid for the error.
type dirLock struct {
	f    *os.File
	once sync.Once
}

// lockDataDir creates dir if needed and takes its lock without waiting: a
// dir another process (or another broker of this process) holds fails with
// an error matching ErrDataDirInUse that names the holder's pid.
func lockDataDir(dir string) (*dirLock, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("devbroker: create data dir: %w", err)
	}
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("devbroker: open %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, &inUseError{dir: dir, pid: readPID(f)}
		}
		return nil, fmt.Errorf("devbroker: lock %s: %w", path, err)
	}
	if err := writePID(f); err != nil {
		f.Close() // releases the lock
		return nil, fmt.Errorf("devbroker: write %s: %w", path, err)
	}
	return &dirLock{f: f}, nil
}

// readPID reads the pid the holder wrote into f, or 0. The holder may not
// have written it yet (it writes right after taking the lock).
func readPID(f *os.File) int {
	data, err := io.ReadAll(io.NewSectionReader(f, 0, 32))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(data)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

func writePID(f *os.File) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err := f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return err
}

// unlock releases the lock; the LOCK file stays (removing it would race with
// a broker that opened it to take the lock). Safe to call more than once.
func (l *dirLock) unlock() {
	if l == nil {
		return
	}
	l.once.Do(func() { l.f.Close() })
}
