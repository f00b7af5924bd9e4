package integration

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

type workerProc struct {
	id                                string
	dataAddr, gossipAddr, metricsAddr string
	// dataDir is the worker's -data-dir, in the test's temp dir: without it
	// workerd keeps its state under $TMPDIR by worker id, which parallel
	// tests with the same ids would share. Its state dir (disk-backend
	// databases, local copies of checkpoint files) is dataDir/state.
	dataDir string
	slots   int
	flags   []string // added to this worker's command line
	p       *proc
}

// startWorker starts a new worker with fresh addresses, joining through the
// live coordinators, and waits until the leader sees it alive.
func (c *cluster) startWorker(t *testing.T, id string) {
	t.Helper()
	c.startWorkerWith(t, id, c.opts.slots)
}

// startWorkerWith is startWorker with the worker's own slot count and extra
// command-line flags (after the cluster's workerFlags).
func (c *cluster) startWorkerWith(t *testing.T, id string, slots int, flags ...string) {
	t.Helper()
	// A worker started again under an id keeps that id's data dir, as a
	// restarted machine keeps its disk.
	w := &workerProc{id: id, dataDir: filepath.Join(c.dir, "workerd-"+id+"-data"), slots: slots, flags: flags}
	c.workers = append(c.workers, w)
	pick := func() {
		a := c.addrs(t, id, 3)
		w.dataAddr, w.gossipAddr, w.metricsAddr = a[0], a[1], a[2]
	}
	pick()
	w.p = c.launch(t, "workerd "+id, "workerd-"+id+".log", pick, func() []string { return c.workerArgs(w) }, func(*proc) (bool, error) {
		_, err := c.workerMetrics(w)
		return err == nil, err
	})
	c.waitFor(t, startTimeout, "coordinators to see worker "+id+" alive", func() (bool, error) {
		return c.memberStatusIs(id, "alive")
	})
}

// workerArgs is the workerd command line of w, joining through the live
// coordinators.
func (c *cluster) workerArgs(w *workerProc) []string {
	join := make([]string, 0, len(c.coords))
	for _, cp := range c.liveCoordinators() {
		join = append(join, cp.gossipAddr)
	}
	return slices.Concat([]string{
		"-id", w.id,
		"-data-dir", w.dataDir,
		"-data-addr", w.dataAddr,
		"-gossip-addr", w.gossipAddr,
		"-join", strings.Join(join, ","),
		"-slots", fmt.Sprint(w.slots),
		"-metrics-addr", w.metricsAddr,
	}, c.secFlags("worker", w.id), c.opts.workerFlags, w.flags)
}

// stateDir is the worker's local state dir: <data-dir>/state, workerd's
// default when -state-dir is not given.
func (w *workerProc) stateDir() string { return filepath.Join(w.dataDir, "state") }

// worker returns the worker with the given id.
func (c *cluster) worker(t *testing.T, id string) *workerProc {
	t.Helper()
	for _, w := range c.workers {
		if w.id == id {
			return w
		}
	}
	t.Fatalf("no worker %q", id)
	return nil
}

// killWorker SIGKILLs a worker.
func (c *cluster) killWorker(t *testing.T, id string) {
	t.Helper()
	if err := c.worker(t, id).p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed workerd %s (SIGKILL)", id)
}

// stopWorker stops a worker with SIGTERM, as an operator does, and checks
// that it exits cleanly: it cancels its tasks and leaves the gossip pool.
func (c *cluster) stopWorker(t *testing.T, id string) {
	t.Helper()
	p := c.worker(t, id).p
	if err := p.signal(syscall.SIGTERM, stopTimeout); err != nil {
		t.Fatal(err)
	}
	if p.err != nil {
		t.Fatalf("workerd %s exited with %v after SIGTERM; last lines:\n%s", id, p.err, tail(p.output(), 20))
	}
	t.Logf("stopped workerd %s (SIGTERM)", id)
}

// pauseWorker freezes a worker with SIGSTOP: its connections stay open but
// it answers neither gossip probes nor its control session.
func (c *cluster) pauseWorker(t *testing.T, id string) {
	t.Helper()
	if err := c.worker(t, id).p.pause(); err != nil {
		t.Fatal(err)
	}
	t.Logf("paused workerd %s (SIGSTOP)", id)
}

// resumeWorker lets a paused worker go on (SIGCONT).
func (c *cluster) resumeWorker(t *testing.T, id string) {
	t.Helper()
	if err := c.worker(t, id).p.resume(); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed workerd %s (SIGCONT)", id)
}

// workerMetric returns the sum of the named metric of a worker (0 if absent).
func (c *cluster) workerMetric(t *testing.T, id, name string) (float64, error) {
	t.Helper()
	text, err := c.workerMetrics(c.worker(t, id))
	if err != nil {
		return 0, err
	}
	v, _ := metricSum(text, name)
	return v, nil
}

// workerMetrics returns the Prometheus text a worker serves on -metrics-addr.
func (c *cluster) workerMetrics(w *workerProc) (string, error) {
	resp, err := c.client.Get("http://" + w.metricsAddr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read %s metrics: %w", w.id, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s/metrics: %s", w.metricsAddr, resp.Status)
	}
	return string(b), nil
}

// metricSum adds up every sample of the named metric (all label sets) in
// Prometheus text format; found is false when there is none.
func metricSum(text, name string) (sum float64, found bool) {
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if !strings.HasPrefix(rest, " ") && !strings.HasPrefix(rest, "{") {
			continue // a longer name with the same prefix
		}
		fields := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(fields) == 0 {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(fields[0], &v); err == nil {
			sum += v
			found = true
		}
	}
	return sum, found
}
