package integration

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// failpointsEnv is cmd/internal/failpoint's environment variable.
const failpointsEnv = "COORDFLOW_FAILPOINTS"

// armFailpoints gives every process of the cluster a failpoint directory,
// empty until a test arms a point with crashAt.
func (c *cluster) armFailpoints(t *testing.T) {
	t.Helper()
	dir := filepath.Join(c.dir, "failpoints")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c.opts.env = append(c.opts.env, failpointsEnv+"="+dir)
}

// crashAt arms failpoint name and waits until a process of the cluster
// reached it and SIGKILLed itself there. It returns that process's
// coordinator or worker id; the exit is expected from then on.
func (c *cluster) crashAt(t *testing.T, name string, timeout time.Duration) string {
	t.Helper()
	c.armFailpoint(t, name)
	return c.crashedAt(t, name, timeout)
}

// armFailpoint arms failpoint name: the first process of the cluster to
// reach it SIGKILLs itself there.
func (c *cluster) armFailpoint(t *testing.T, name string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(c.dir, "failpoints", name), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// crashedAt waits until a process of the cluster reached the armed
// failpoint name and died there, and returns its id, as crashAt does.
func (c *cluster) crashedAt(t *testing.T, name string, timeout time.Duration) string {
	t.Helper()
	path := filepath.Join(c.dir, "failpoints", name)
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			_ = os.Remove(path)
			t.Fatalf("no process reached failpoint %s within %v", name, timeout)
		}
		time.Sleep(pollInterval)
	}
	// The process that removed the file is about to die: find it.
	for {
		for _, cp := range c.coords {
			if cp.p != nil && cp.p.hasExited() && !cp.p.stopping.Load() {
				cp.p.stopping.Store(true)
				t.Logf("coordd %s crashed at failpoint %s", cp.id, name)
				return cp.id
			}
		}
		for _, w := range c.workers {
			if w.p != nil && w.p.hasExited() && !w.p.stopping.Load() {
				w.p.stopping.Store(true)
				t.Logf("workerd %s crashed at failpoint %s", w.id, name)
				return w.id
			}
		}
		if time.Now().After(deadline.Add(stopTimeout)) {
			t.Fatal(fmt.Errorf("failpoint %s fired but no process exited", name))
		}
		time.Sleep(pollInterval)
	}
}
