package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// proc is one run of one process. A restart is a new proc writing to the
// same log file.
type proc struct {
	name    string // "coordd c1"
	logPath string
	logFrom int64 // size of the log when this run started
	cmd     *exec.Cmd
	exited  chan struct{} // closed once the process has exited and err is set
	err     error
	// stopping is set before the harness signals the process, so that its
	// exit is not reported as a crash.
	stopping atomic.Bool
	// paused is set while the process is stopped with SIGSTOP.
	paused atomic.Bool
}

// startProc starts bin in its own process group with stdout and stderr
// appended to logPath, in the test binary's environment plus env
// ("KEY=value"; a key in env overrides the inherited one).
func startProc(name, logPath, bin string, env []string, args ...string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: open log: %w", name, err)
	}
	defer f.Close() // the child has its own descriptor
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("start %s: stat log: %w", name, err)
	}
	fmt.Fprintf(f, "=== harness %s: start %s %s\n", time.Now().Format("15:04:05.000"), filepath.Base(bin), strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group: a kill reaches anything the process started.
	// Pdeathsig: if the test binary dies (test timeout), so does the process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, logPath: logPath, logFrom: fi.Size(), cmd: cmd, exited: make(chan struct{})}
	// This goroutine ends when the process exits; cluster cleanup kills every
	// process, so none outlives the test.
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// launchSpec says how launchProc starts a process and when it is ready.
type launchSpec struct {
	name    string   // for messages: "coordd c1"
	bin     string   // the executable
	logPath string   // stdout and stderr are appended here
	env     []string // added to the test binary's environment
	args    func() []string
	ready   func(*proc) (bool, error) // an error says why not yet
	// repick picks new ports before a retry; nil means the ports are fixed
	// (a restart).
	repick func()
	// started is called with every run started, ready or not, so that the
	// caller can kill it when the test ends.
	started func(*proc)
}

// launchProc starts a process and polls ready until it reports true,
// failing the test after startTimeout. If the process exits first because a
// port it was given was taken meanwhile (the race freeAddrs cannot close),
// s.repick is called and the start retried, up to portRetries starts; with
// repick nil, or on any other exit, the test fails with the log's tail.
func launchProc(t *testing.T, s launchSpec) *proc {
	t.Helper()
	for attempt := 1; ; attempt++ {
		p, err := startProc(s.name, s.logPath, s.bin, s.env, s.args()...)
		if err != nil {
			t.Fatal(err)
		}
		s.started(p)
		deadline := time.Now().Add(startTimeout)
		var lastErr error
		for {
			if p.hasExited() {
				break
			}
			ok, err := s.ready(p)
			if ok {
				return p
			}
			lastErr = err
			if time.Now().After(deadline) {
				_ = p.signal(syscall.SIGKILL, stopTimeout)
				t.Fatalf("%s not ready within %v (last check: %v); last lines of its log:\n%s", s.name, startTimeout, lastErr, tail(p.output(), 30))
			}
			select {
			case <-p.exited:
			case <-time.After(pollInterval):
			}
		}
		if s.repick != nil && attempt < portRetries && strings.Contains(p.output(), "address already in use") {
			t.Logf("%s: a picked port was taken meanwhile; retrying with new ports", s.name)
			s.repick()
			continue
		}
		t.Fatal(p.exitError())
	}
}

func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// signal sends sig to the process group and waits up to timeout for the
// process to exit.
func (p *proc) signal(sig syscall.Signal, timeout time.Duration) error {
	p.stopping.Store(true)
	if p.hasExited() {
		return nil
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("%s: send %v: %w", p.name, sig, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("%s did not exit within %v of %v", p.name, timeout, sig)
	}
}

// pause freezes the process group with SIGSTOP: the process keeps its
// sockets open but answers nothing, like a machine that stalls.
func (p *proc) pause() error {
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("%s: SIGSTOP: %w", p.name, err)
	}
	p.paused.Store(true)
	return nil
}

// resume lets a paused process group go on with SIGCONT.
func (p *proc) resume() error {
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGCONT); err != nil {
		return fmt.Errorf("%s: SIGCONT: %w", p.name, err)
	}
	p.paused.Store(false)
	return nil
}

// output returns what this run has written to the log so far.
func (p *proc) output() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil || int64(len(b)) < p.logFrom {
		return ""
	}
	return string(b[p.logFrom:])
}

// exitError describes an exit the harness did not cause, with the log tail.
func (p *proc) exitError() error {
	return fmt.Errorf("%s exited unexpectedly (%v); last lines of %s:\n%s", p.name, p.err, p.logPath, tail(p.output(), 30))
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
