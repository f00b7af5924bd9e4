package integration

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// clusterOpts says what startCluster starts. A zero clusterOpts starts only
// devkafka.
type clusterOpts struct {
	coordinators int              // coordd agents; all are voters, -bootstrap-expect is this number
	workers      int              // workerd processes, w1..wN
	slots        int              // task slots per worker; default 4
	topics       map[string]int32 // devkafka topics and their partition counts
	// coordFlags and workerFlags are added to every coordd agent and workerd
	// command line (tighter timings, for instance).
	coordFlags  []string
	workerFlags []string
	// net, when set, runs every process in a network of its own (such as a
	// namespace of newTestNet, harness_netns_test.go), bound to addresses
	// net gives instead of free loopback ports.
	net procNet
	// env is added to the environment of every process the cluster starts
	// ("KEY=value"), such as the credentials of s3Server.Env.
	env []string
	// secure turns on mutual TLS, gossip encryption and API tokens on every
	// process (harness_security_test.go); the harness's API calls then use
	// https and the operator token.
	secure bool
	// image, when set, runs every process from the container image's files
	// (buildImage, harness_image_test.go) instead of the harness's builds.
	image *image
	// noFailpoints starts the processes without a failpoint directory, as
	// in production: benchmarks, which crash nothing at a failpoint and
	// should not pay a file lookup at each point.
	noFailpoints bool
}

// cluster is one test's set of processes: one devkafka, coordd agents c1..cN
// and workerd processes.
type cluster struct {
	dir     string
	opts    clusterOpts
	broker  *brokerProc
	coords  []*coordProc
	workers []*workerProc
	all     []*proc // every run ever started, for cleanup and log tails
	client  *http.Client
	sec     *clusterSecurity // nil unless opts.secure
}

// startCluster starts devkafka, then the coordinators, waits for a leader,
// then starts the workers and waits until the leader sees them alive.
func startCluster(t *testing.T, opts clusterOpts) *cluster {
	t.Helper()
	if opts.slots == 0 {
		opts.slots = 4
	}
	c := &cluster{dir: t.TempDir(), opts: opts, client: &http.Client{Timeout: httpTimeout}}
	if opts.image != nil {
		c.dir = opts.image.dataDir(t) // where the image's user may write
		c.opts.env = append(c.opts.env, opts.image.env()...)
	}
	if opts.secure {
		c.sec = newClusterSecurity(t, c.dir)
		c.client = c.sec.httpClient(httpTimeout)
	}
	if !opts.noFailpoints {
		c.armFailpoints(t)
	}
	// Cleanups run last-registered first: processes are killed, their logs
	// checked for data races, then printed if the test failed.
	t.Cleanup(func() { c.printLogsIfFailed(t) })
	t.Cleanup(func() { c.checkLogsForRaces(t) })
	t.Cleanup(c.killAll)

	c.startBroker(t)
	for i := range opts.coordinators {
		c.coords = append(c.coords, &coordProc{
			id:      fmt.Sprintf("c%d", i+1),
			dataDir: filepath.Join(c.dir, fmt.Sprintf("c%d", i+1)),
		})
	}
	for _, cp := range c.coords {
		c.pickCoordAddrs(t, cp)
	}
	for _, cp := range c.coords {
		c.launchCoordinator(t, cp, true)
	}
	if opts.coordinators > 0 {
		c.leader(t)
	}
	for i := range opts.workers {
		c.startWorker(t, fmt.Sprintf("w%d", i+1))
	}
	return c
}

func (c *cluster) killAll() {
	for _, p := range c.all {
		_ = p.signal(syscall.SIGKILL, stopTimeout)
	}
}

// checkLogsForRaces fails the test if a process built with -race
// (COORDFLOW_IT_RACE=1) reported a data race: the harness kills processes
// with SIGKILL, so the race detector's exit status is never seen.
func (c *cluster) checkLogsForRaces(t *testing.T) {
	for _, path := range c.logFiles() {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		for rest := b; ; {
			i := bytes.Index(rest, []byte("WARNING: DATA RACE"))
			if i < 0 {
				break
			}
			rest = rest[i:]
			report := rest
			if j := bytes.Index(rest[1:], []byte("WARNING: DATA RACE")); j >= 0 {
				report = rest[:j+1]
			}
			rest = rest[len(report):]
			if known := knownRace(report); known != "" {
				t.Logf("%s reported a known data race in a dependency (%s); not ours to fix", filepath.Base(path), known)
				continue
			}
			t.Errorf("%s reported a data race:\n%s", filepath.Base(path), truncate(string(report), 4000))
			break
		}
	}
}

// knownRaces are data races inside dependencies, by the two functions of
// the report: each is documented where it is listed and reported upstream.
var knownRaces = []struct{ why, write, read string }{
	// sarama v1.61.1: transactionManager.transitionTo writes lastError
	// under statusLock, publishTxnPartitions reads it under another lock.
	// It happens when a transactional producer is fenced while it sends
	// (a zombie of an exactly-once sink); the value read is an error the
	// producer fails with either way.
	{"sarama transactionManager.lastError", "sarama.(*transactionManager).transitionTo", "sarama.(*transactionManager).publishTxnPartitions"},
}

// knownRace names the known race report is, or returns "".
func knownRace(report []byte) string {
	for _, k := range knownRaces {
		if bytes.Contains(report, []byte(k.write)) && bytes.Contains(report, []byte(k.read)) {
			return k.why
		}
	}
	return ""
}

// logFiles returns the log file of every process started, once each.
func (c *cluster) logFiles() []string {
	var paths []string
	for _, p := range c.all {
		if !slices.Contains(paths, p.logPath) {
			paths = append(paths, p.logPath)
		}
	}
	return paths
}

// printLogsIfFailed prints the tail of every process's log if the test
// failed, and keeps the whole logs in a directory that outlives the test;
// with COORDFLOW_IT_KEEP_LOGS=1 it keeps them for passed tests too.
func (c *cluster) printLogsIfFailed(t *testing.T) {
	if !t.Failed() {
		if os.Getenv("COORDFLOW_IT_KEEP_LOGS") == "1" {
			c.keepLogs(t)
		}
		return
	}
	keep := filepath.Join(os.TempDir(), "coordflow-it-logs", strings.ReplaceAll(t.Name(), "/", "_")+"-"+time.Now().Format("150405"))
	if err := os.MkdirAll(keep, 0o755); err != nil {
		keep = ""
	}
	for _, path := range c.logFiles() {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Logf("log %s: %v", path, err)
			continue
		}
		if keep != "" {
			_ = os.WriteFile(filepath.Join(keep, filepath.Base(path)), b, 0o644)
		}
		t.Logf("---- last %d lines of %s ----\n%s", logTailLines, filepath.Base(path), tail(string(b), logTailLines))
	}
	if keep != "" {
		t.Logf("whole logs kept in %s", keep)
	}
}

// keepLogs copies every process's log to a directory that outlives the test.
func (c *cluster) keepLogs(t *testing.T) {
	keep := filepath.Join(os.TempDir(), "coordflow-it-logs", strings.ReplaceAll(t.Name(), "/", "_")+"-"+time.Now().Format("150405"))
	if err := os.MkdirAll(keep, 0o755); err != nil {
		t.Logf("keep logs: %v", err)
		return
	}
	for _, path := range c.logFiles() {
		if b, err := os.ReadFile(path); err == nil {
			_ = os.WriteFile(filepath.Join(keep, filepath.Base(path)), b, 0o644)
		}
	}
	t.Logf("logs kept in %s", keep)
}

// launch starts a process of the cluster with launchProc and waits until
// ready reports true: the command named by name's first word (in its
// node's network with opts.net: c.command), its log logName in the
// cluster's dir, opts.env added to its environment. repick nil means the
// ports are fixed (a restart).
func (c *cluster) launch(t *testing.T, name, logName string, repick func(), args func() []string, ready func(*proc) (bool, error)) *proc {
	t.Helper()
	bin, argv := c.command(t, name, args)
	return launchProc(t, launchSpec{
		name:    name,
		bin:     bin,
		logPath: filepath.Join(c.dir, logName),
		env:     c.opts.env,
		args:    argv,
		ready:   ready,
		repick:  repick,
		started: func(p *proc) { c.all = append(c.all, p) },
	})
}

// unexpectedExits reports every current process that exited without the
// harness stopping it.
func (c *cluster) unexpectedExits() error {
	var errs []error
	for _, p := range c.current() {
		if p.hasExited() && !p.stopping.Load() {
			errs = append(errs, p.exitError())
		}
	}
	return errors.Join(errs...)
}

// current returns the current run of every process started so far.
func (c *cluster) current() []*proc {
	var ps []*proc
	if c.broker != nil && c.broker.p != nil {
		ps = append(ps, c.broker.p)
	}
	for _, cp := range c.coords {
		if cp.p != nil {
			ps = append(ps, cp.p)
		}
	}
	for _, w := range c.workers {
		if w.p != nil {
			ps = append(ps, w.p)
		}
	}
	return ps
}

// waitFor polls cond until it reports true, failing the test after timeout
// or as soon as any process exits unexpectedly. An error from cond means "not
// yet, and this is why": the last one is reported on timeout and logged every
// progressPeriod during long waits.
func (c *cluster) waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	nextProgress := start.Add(progressPeriod)
	var lastErr error
	for {
		if err := c.unexpectedExits(); err != nil {
			t.Fatalf("while waiting for %s: %v", what, err)
		}
		ok, err := cond()
		if ok {
			t.Logf("%s: after %v", what, time.Since(start).Round(time.Millisecond))
			return
		}
		if err != nil {
			lastErr = err
		}
		now := time.Now()
		if now.After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last reason: %v", timeout, what, lastErr)
		}
		if now.After(nextProgress) {
			t.Logf("still waiting for %s (%v so far): %v", what, now.Sub(start).Round(time.Second), lastErr)
			nextProgress = now.Add(progressPeriod)
		}
		time.Sleep(pollInterval) // poll interval, not synchronization: the loop re-checks cond
	}
}

// checkAlive fails the test if any process exited unexpectedly or a live
// coordinator does not answer /v1/status.
func (c *cluster) checkAlive(t *testing.T) {
	t.Helper()
	if err := c.unexpectedExits(); err != nil {
		t.Fatal(err)
	}
	for _, cp := range c.liveCoordinators() {
		if _, err := c.status(cp); err != nil {
			t.Fatalf("coordd %s does not answer: %v", cp.id, err)
		}
	}
}
