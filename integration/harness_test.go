package integration

// The harness: builds the binaries once (TestMain), starts clusters of real
// processes, kills and restarts them, talks to them over the HTTP API, the
// CLI and Kafka, and waits for conditions with deadlines. A test reads like
// its scenario:
//
//	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
//	c.killWorker(t, "w1")
//	c.waitFor(t, time.Minute, "a new attempt", func() (bool, error) { ... })
//
// Every process writes stdout and stderr to a file in the test's temp dir. If
// the test fails, the tail of every log is printed. Every process is killed
// (by process group) when the test ends. Any process that exits without the
// harness stopping it fails the test at the next wait, with its log tail.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// Timeouts of the harness's own steps. Scenario deadlines are in the tests.
const (
	startTimeout   = 30 * time.Second // a process is ready (listening, answering)
	stopTimeout    = 15 * time.Second // a process exits after SIGTERM
	leaderTimeout  = 60 * time.Second // the coordinators agree on a leader
	httpTimeout    = 5 * time.Second  // one HTTP request
	cliTimeout     = 30 * time.Second // one CLI command
	pollInterval   = 100 * time.Millisecond
	progressPeriod = 15 * time.Second // how often a long wait logs why it still waits
	logTailLines   = 60
	portRetries    = 3 // starts retried when a picked free port was taken meanwhile
)

// binaries are built once per test binary run by TestMain. A binary that
// does not build fails only the tests that need it.
var binaries struct {
	dir  string
	errs map[string]error // by command name; nil error: built
}

var commands = []string{"devkafka", "coordd", "workerd"}

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "coordflow-it-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: temp dir for binaries:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	binaries.dir = dir
	binaries.errs = buildCommands(dir)
	return m.Run()
}

// buildCommands builds every command into dir, concurrently, and returns
// each one's build error.
func buildCommands(dir string) map[string]error {
	args := []string{"build"}
	if os.Getenv("COORDFLOW_IT_RACE") == "1" {
		args = append(args, "-race")
	}
	errs := make(map[string]error, len(commands))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range commands {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			cmdArgs := append(slices.Clone(args), "-o", filepath.Join(dir, name), "github.com/coordflow/coordflow/cmd/"+name)
			out, err := exec.CommandContext(ctx, "go", cmdArgs...).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("go %s: %w\n%s", strings.Join(cmdArgs, " "), err, out)
			}
			mu.Lock()
			errs[name] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	return errs
}

// binary returns the path of a built command, or fails the test with the
// build's output.
func binary(t *testing.T, name string) string {
	t.Helper()
	if err := binaries.errs[name]; err != nil {
		t.Fatalf("%s did not build:\n%v", name, err)
	}
	return filepath.Join(binaries.dir, name)
}

// ---- processes ----

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
// appended to logPath.
func startProc(name, logPath, bin string, args ...string) (*proc, error) {
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

// freeAddrs returns n distinct loopback addresses whose TCP and UDP ports
// (memberlist binds both) were free a moment ago. The ports are drawn below
// the kernel's ephemeral range, so that the outgoing connections of other
// processes cannot take a port while a restarted process re-binds it. All are
// held open together so none is returned twice; another process can still
// take one before our child binds it, which launch retries.
func freeAddrs(t *testing.T, n int) []string {
	t.Helper()
	lo, hi := 20000, ephemeralLow()
	if hi-lo < 1000 {
		lo = 1024 // an unusual ip_local_port_range: use what lies below it
	}
	addrs := make([]string, 0, n)
	for attempts := 0; len(addrs) < n; attempts++ {
		if attempts == 10000 {
			t.Fatalf("no free TCP+UDP port in [%d, %d) after %d attempts", lo, hi, attempts)
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(lo+rand.IntN(hi-lo)))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		defer l.Close()
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			continue
		}
		defer u.Close()
		addrs = append(addrs, addr)
	}
	return addrs
}

// ephemeralLow returns the low end of the kernel's ephemeral port range, or
// the IANA default 32768 when it cannot be read.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil || lo <= 1024 {
		return 32768
	}
	return lo
}

// ---- cluster ----

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
}

type brokerProc struct {
	addr    string
	dataDir string
	topics  map[string]int32
	p       *proc
}

type coordProc struct {
	id                                      string
	dataDir                                 string
	raftAddr, rpcAddr, httpAddr, gossipAddr string
	flags                                   []string // added to this coordinator's command line
	p                                       *proc    // current run; nil before the first start
}

type workerProc struct {
	id                                string
	dataAddr, gossipAddr, metricsAddr string
	slots                             int
	flags                             []string // added to this worker's command line
	p                                 *proc
}

// startCluster starts devkafka, then the coordinators, waits for a leader,
// then starts the workers and waits until the leader sees them alive.
func startCluster(t *testing.T, opts clusterOpts) *cluster {
	t.Helper()
	if opts.slots == 0 {
		opts.slots = 4
	}
	c := &cluster{dir: t.TempDir(), opts: opts, client: &http.Client{Timeout: httpTimeout}}
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
		if i := bytes.Index(b, []byte("WARNING: DATA RACE")); i >= 0 {
			t.Errorf("%s reported a data race:\n%s", filepath.Base(path), truncate(string(b[i:]), 4000))
		}
	}
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

// launch starts a process and waits until ready reports true. If the process
// exits first because a port it was given was taken meanwhile (the race
// freeAddrs cannot close), repick is called and the start retried; repick nil
// means the ports are fixed (a restart) and such an exit fails the test.
func (c *cluster) launch(t *testing.T, name, logName string, repick func(), args func() []string, ready func(*proc) (bool, error)) *proc {
	t.Helper()
	bin := binary(t, strings.Fields(name)[0])
	for attempt := 1; ; attempt++ {
		p, err := startProc(name, filepath.Join(c.dir, logName), bin, args()...)
		if err != nil {
			t.Fatal(err)
		}
		c.all = append(c.all, p)
		deadline := time.Now().Add(startTimeout)
		var lastErr error
		for {
			if p.hasExited() {
				break
			}
			ok, err := ready(p)
			if ok {
				return p
			}
			lastErr = err
			if time.Now().After(deadline) {
				_ = p.signal(syscall.SIGKILL, stopTimeout)
				t.Fatalf("%s not ready within %v (last check: %v); last lines of its log:\n%s", name, startTimeout, lastErr, tail(p.output(), 30))
			}
			select {
			case <-p.exited:
			case <-time.After(pollInterval):
			}
		}
		if repick != nil && attempt < portRetries && strings.Contains(p.output(), "address already in use") {
			t.Logf("%s: a picked port was taken meanwhile; retrying with new ports", name)
			repick()
			continue
		}
		t.Fatal(p.exitError())
	}
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

// ---- devkafka ----

func (c *cluster) startBroker(t *testing.T) {
	t.Helper()
	b := &brokerProc{dataDir: filepath.Join(c.dir, "devkafka-data"), topics: c.opts.topics}
	c.broker = b
	pick := func() { b.addr = freeAddrs(t, 1)[0] }
	pick()
	b.p = c.launch(t, "devkafka", "devkafka.log", pick, b.argv, brokerReady)
}

func (b *brokerProc) argv() []string {
	args := []string{"-addr", b.addr, "-data-dir", b.dataDir}
	for _, name := range slices.Sorted(maps.Keys(b.topics)) {
		args = append(args, "-topic", fmt.Sprintf("%s:%d", name, b.topics[name]))
	}
	return args
}

// brokerReady waits for the line devkafka prints once it accepts connections.
func brokerReady(p *proc) (bool, error) {
	if strings.Contains(p.output(), "devkafka listening on ") {
		return true, nil
	}
	return false, errors.New(`no "devkafka listening on" line yet`)
}

// brokers returns the bootstrap addresses of devkafka.
func (c *cluster) brokers() []string { return []string{c.broker.addr} }

// killBroker SIGKILLs devkafka.
func (c *cluster) killBroker(t *testing.T) {
	t.Helper()
	if err := c.broker.p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		t.Fatal(err)
	}
}

// stopBroker stops devkafka with SIGTERM and checks that it exits cleanly.
func (c *cluster) stopBroker(t *testing.T) {
	t.Helper()
	p := c.broker.p
	if err := p.signal(syscall.SIGTERM, stopTimeout); err != nil {
		t.Fatal(err)
	}
	if p.err != nil {
		t.Fatalf("devkafka exited with %v after SIGTERM; last lines:\n%s", p.err, tail(p.output(), 20))
	}
}

// restartBroker starts devkafka again on the same address and data dir.
func (c *cluster) restartBroker(t *testing.T) {
	t.Helper()
	c.broker.p = c.launch(t, "devkafka", "devkafka.log", nil, c.broker.argv, brokerReady)
}

// ---- coordd ----

func (c *cluster) pickCoordAddrs(t *testing.T, cp *coordProc) {
	a := freeAddrs(t, 4)
	cp.raftAddr, cp.rpcAddr, cp.httpAddr, cp.gossipAddr = a[0], a[1], a[2], a[3]
}

// coordArgs is the contract's `coordd agent` command line for cp.
func (c *cluster) coordArgs(cp *coordProc) []string {
	join := make([]string, 0, len(c.coords))
	for _, o := range c.coords {
		join = append(join, o.gossipAddr)
	}
	return slices.Concat([]string{"agent",
		"-id", cp.id,
		"-data-dir", cp.dataDir,
		"-raft-addr", cp.raftAddr,
		"-rpc-addr", cp.rpcAddr,
		"-http-addr", cp.httpAddr,
		"-gossip-addr", cp.gossipAddr,
		"-bootstrap-expect", fmt.Sprint(c.opts.coordinators),
		"-join", strings.Join(join, ","),
	}, c.opts.coordFlags, cp.flags)
}

// launchCoordinator starts cp and waits until its /v1/status answers.
// firstStart allows new ports if a picked one was taken meanwhile.
func (c *cluster) launchCoordinator(t *testing.T, cp *coordProc, firstStart bool) {
	t.Helper()
	var repick func()
	if firstStart {
		repick = func() { c.pickCoordAddrs(t, cp) }
	}
	cp.p = c.launch(t, "coordd "+cp.id, "coordd-"+cp.id+".log", repick,
		func() []string { return c.coordArgs(cp) },
		func(*proc) (bool, error) {
			_, err := c.status(cp)
			return err == nil, err
		})
}

// coordinator returns the coordinator with the given id.
func (c *cluster) coordinator(t *testing.T, id string) *coordProc {
	t.Helper()
	for _, cp := range c.coords {
		if cp.id == id {
			return cp
		}
	}
	t.Fatalf("no coordinator %q", id)
	return nil
}

// liveCoordinators returns the coordinators the harness has not stopped or
// paused.
func (c *cluster) liveCoordinators() []*coordProc {
	var live []*coordProc
	for _, cp := range c.coords {
		if cp.p != nil && !cp.p.stopping.Load() && !cp.p.paused.Load() {
			live = append(live, cp)
		}
	}
	return live
}

// api returns the HTTP address of a live coordinator, for calls any
// coordinator answers (followers forward writes).
func (c *cluster) api(t *testing.T) string {
	t.Helper()
	live := c.liveCoordinators()
	if len(live) == 0 {
		t.Fatal("no live coordinator")
	}
	return live[0].httpAddr
}

// leader waits until every live coordinator names the same leader, which
// says it is the leader, and returns its id.
func (c *cluster) leader(t *testing.T) string {
	t.Helper()
	var id string
	c.waitFor(t, leaderTimeout, "a leader all live coordinators agree on", func() (bool, error) {
		id = ""
		for _, cp := range c.liveCoordinators() {
			st, err := c.status(cp)
			if err != nil {
				return false, err
			}
			if st.LeaderID == "" {
				return false, fmt.Errorf("%s (%s) knows no leader", cp.id, st.State)
			}
			if id != "" && st.LeaderID != id {
				return false, fmt.Errorf("%s names leader %s, another names %s", cp.id, st.LeaderID, id)
			}
			id = st.LeaderID
			if st.ID == id && st.State != "Leader" {
				return false, fmt.Errorf("%s is named leader but is %s", cp.id, st.State)
			}
		}
		for _, cp := range c.liveCoordinators() {
			if cp.id == id {
				return true, nil
			}
		}
		return false, fmt.Errorf("the named leader %s is not a live coordinator", id)
	})
	return id
}

// killCoordinator SIGKILLs a coordinator.
func (c *cluster) killCoordinator(t *testing.T, id string) {
	t.Helper()
	if err := c.coordinator(t, id).p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed coordd %s (SIGKILL)", id)
}

// restartCoordinator starts a stopped coordinator again with the same data
// dir and addresses.
func (c *cluster) restartCoordinator(t *testing.T, id string) {
	t.Helper()
	cp := c.coordinator(t, id)
	if !cp.p.hasExited() {
		t.Fatalf("restart coordd %s: it is still running", id)
	}
	c.launchCoordinator(t, cp, false)
	t.Logf("restarted coordd %s", id)
}

// pauseCoordinator freezes a coordinator with SIGSTOP. A paused coordinator
// is not live: api, leader and memberStatusIs leave it out.
func (c *cluster) pauseCoordinator(t *testing.T, id string) {
	t.Helper()
	if err := c.coordinator(t, id).p.pause(); err != nil {
		t.Fatal(err)
	}
	t.Logf("paused coordd %s (SIGSTOP)", id)
}

// resumeCoordinator lets a paused coordinator go on (SIGCONT).
func (c *cluster) resumeCoordinator(t *testing.T, id string) {
	t.Helper()
	if err := c.coordinator(t, id).p.resume(); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed coordd %s (SIGCONT)", id)
}

// addCoordinator starts a new coordinator with a fresh data dir, joining the
// others through gossip with the cluster's -bootstrap-expect (so it must join
// the existing cluster, not bootstrap one) and extra flags, and waits until
// its HTTP API answers.
func (c *cluster) addCoordinator(t *testing.T, id string, flags ...string) *coordProc {
	t.Helper()
	cp := &coordProc{id: id, dataDir: filepath.Join(c.dir, id), flags: flags}
	c.pickCoordAddrs(t, cp)
	c.coords = append(c.coords, cp)
	c.launchCoordinator(t, cp, true)
	t.Logf("added coordd %s %s", id, strings.Join(flags, " "))
	return cp
}

// coordLog returns everything coordinator id has logged, over all its runs.
func (c *cluster) coordLog(t *testing.T, id string) string {
	t.Helper()
	b, err := os.ReadFile(c.coordinator(t, id).p.logPath)
	if err != nil {
		t.Fatalf("log of coordd %s: %v", id, err)
	}
	return string(b)
}

// coordMetrics returns the Prometheus text a coordinator serves on /metrics.
func (c *cluster) coordMetrics(cp *coordProc) (string, error) {
	resp, err := c.client.Get("http://" + cp.httpAddr + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read %s metrics: %w", cp.id, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s/metrics: %s", cp.httpAddr, resp.Status)
	}
	return string(b), nil
}

// ---- workerd ----

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
	w := &workerProc{id: id, slots: slots, flags: flags}
	c.workers = append(c.workers, w)
	pick := func() {
		a := freeAddrs(t, 3)
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
		"-data-addr", w.dataAddr,
		"-gossip-addr", w.gossipAddr,
		"-join", strings.Join(join, ","),
		"-slots", fmt.Sprint(w.slots),
		"-metrics-addr", w.metricsAddr,
	}, c.opts.workerFlags, w.flags)
}

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

// ---- HTTP API ----

// The answers of the HTTP API, as the contract in design.md shows them. Only
// the fields the tests read are declared; the API may return more.
type (
	statusView struct {
		ID             string `json:"id"`
		State          string `json:"state"`
		Term           uint64 `json:"term"`
		LastIndex      uint64 `json:"last_index"`
		LeaderID       string `json:"leader_id"`
		LeaderHTTPAddr string `json:"leader_http_addr"`
	}
	memberView struct {
		ID         string `json:"id"`
		Role       string `json:"role"`
		GossipAddr string `json:"gossip_addr"`
		Status     string `json:"status"`
	}
	jobView struct {
		ID             string     `json:"id"`
		Name           string     `json:"name"`
		Status         string     `json:"status"`
		Reason         string     `json:"reason"`
		Attempt        uint64     `json:"attempt"`
		Restarts       int        `json:"restarts"`
		Tasks          []taskView `json:"tasks"`
		LastCheckpoint *struct {
			ID uint64 `json:"id"`
		} `json:"last_checkpoint"`
	}
	taskView struct {
		ID     string `json:"id"`
		Kind   string `json:"kind"`
		Worker string `json:"worker"`
	}
	stateView struct {
		CheckpointID uint64           `json:"checkpoint_id"`
		Offsets      map[string]int64 `json:"offsets"`
		Keyed        map[string]int64 `json:"keyed"`
	}
	// checkpointView is one entry of GET /v1/jobs/{id}/checkpoints.
	checkpointView struct {
		ID          uint64 `json:"id"`
		Attempt     uint64 `json:"attempt"`
		Status      string `json:"status"` // pending, completed, aborted
		Reason      string `json:"reason"`
		TriggerTime string `json:"trigger_time"` // RFC 3339
	}
)

// jobSpec is the job spec of the user contract (design.md), declared here
// rather than imported so that the tests check the JSON users write.
type (
	jobSpec struct {
		Name       string         `json:"name"`
		Source     sourceSpec     `json:"source"`
		Operator   operatorSpec   `json:"operator"`
		Sink       *sinkSpec      `json:"sink,omitempty"`
		Checkpoint checkpointSpec `json:"checkpoint"`
		Restart    *restartSpec   `json:"restart,omitempty"`
	}
	restartSpec struct {
		Initial    string `json:"initial,omitempty"`
		Max        string `json:"max,omitempty"`
		ResetAfter string `json:"reset_after,omitempty"`
	}
	sourceSpec struct {
		Brokers     []string `json:"brokers"`
		Topic       string   `json:"topic"`
		Start       string   `json:"start,omitempty"`
		Parallelism int      `json:"parallelism"`
		Group       string   `json:"group,omitempty"`
	}
	operatorSpec struct {
		Name           string `json:"name"`
		Parallelism    int    `json:"parallelism"`
		MaxParallelism int    `json:"max_parallelism,omitempty"`
	}
	sinkSpec struct {
		Brokers []string `json:"brokers"`
		Topic   string   `json:"topic"`
	}
	checkpointSpec struct {
		Interval          string `json:"interval,omitempty"`
		Timeout           string `json:"timeout,omitempty"`
		MinPause          string `json:"min_pause,omitempty"`
		Retained          int    `json:"retained,omitempty"`
		TolerableFailures int    `json:"tolerable_failures,omitempty"`
	}
)

// wordcountSpec is the job spec of design.md without its sink: wordcount
// over topic from the earliest offset, parallelism 2 and 2, checkpoints every
// second.
func wordcountSpec(brokers []string, topic string) jobSpec {
	return jobSpec{
		Name:     "wordcount",
		Source:   sourceSpec{Brokers: brokers, Topic: topic, Start: "earliest", Parallelism: 2},
		Operator: operatorSpec{Name: "wordcount", Parallelism: 2, MaxParallelism: 128},
		Checkpoint: checkpointSpec{
			Interval: "1s", Timeout: "30s", MinPause: "0s", Retained: 3, TolerableFailures: 3,
		},
	}
}

// lastCheckpointID is 0 until the job has a completed checkpoint.
func (j jobView) lastCheckpointID() uint64 {
	if j.LastCheckpoint == nil {
		return 0
	}
	return j.LastCheckpoint.ID
}

// apiError is a non-2xx answer of the HTTP API.
type apiError struct {
	method, url string
	status      int
	message     string // the "error" field, or the raw body
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.method, e.url, e.status, http.StatusText(e.status), e.message)
}

// call makes one API request to addr and decodes a 2xx JSON answer into out
// (if not nil). Other answers are an *apiError.
func (c *cluster) call(method, addr, path string, body []byte, out any) error {
	url := "http://" + addr + path
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read body: %w", method, url, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &apiError{method: method, url: url, status: resp.StatusCode, message: strings.TrimSpace(string(b))}
		var eb struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			e.message = eb.Error
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: decode %q: %w", method, url, truncate(string(b), 300), err)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func (c *cluster) status(cp *coordProc) (statusView, error) {
	var st statusView
	err := c.call("GET", cp.httpAddr, "/v1/status", nil, &st)
	return st, err
}

// digest returns a coordinator's FSM digest (GET /v1/fsm/digest).
func (c *cluster) digest(cp *coordProc) (string, error) {
	var d struct {
		Digest string `json:"digest"`
	}
	if err := c.call("GET", cp.httpAddr, "/v1/fsm/digest", nil, &d); err != nil {
		return "", err
	}
	if d.Digest == "" {
		return "", fmt.Errorf("%s: empty digest", cp.id)
	}
	return d.Digest, nil
}

// memberStatusIs reports whether every live coordinator lists member id with
// the given gossip status.
func (c *cluster) memberStatusIs(id, status string) (bool, error) {
	for _, cp := range c.liveCoordinators() {
		var ms []memberView
		if err := c.call("GET", cp.httpAddr, "/v1/members", nil, &ms); err != nil {
			return false, err
		}
		i := slices.IndexFunc(ms, func(m memberView) bool { return m.ID == id })
		if i < 0 {
			return false, fmt.Errorf("%s does not list member %s", cp.id, id)
		}
		if ms[i].Status != status {
			return false, fmt.Errorf("%s lists %s as %q", cp.id, id, ms[i].Status)
		}
	}
	return true, nil
}

// postJob submits a job spec (any JSON value, or raw []byte) and returns the
// new job's id or the API's error.
func (c *cluster) postJob(addr string, spec any) (string, error) {
	body, ok := spec.([]byte)
	if !ok {
		var err error
		if body, err = json.Marshal(spec); err != nil {
			return "", fmt.Errorf("encode job spec: %w", err)
		}
	}
	var created struct {
		ID string `json:"id"`
	}
	if err := c.call("POST", addr, "/v1/jobs", body, &created); err != nil {
		return "", err
	}
	if created.ID == "" {
		return "", errors.New("POST /v1/jobs: answer has no id")
	}
	return created.ID, nil
}

// submitJob submits a job spec to a live coordinator and returns its id.
func (c *cluster) submitJob(t *testing.T, spec any) string {
	t.Helper()
	id, err := c.postJob(c.api(t), spec)
	if err != nil {
		t.Fatalf("submit job: %v", err)
	}
	t.Logf("submitted job %s", id)
	return id
}

// getJob reads GET /v1/jobs/{id} from a live coordinator.
func (c *cluster) getJob(t *testing.T, id string) (jobView, error) {
	var j jobView
	err := c.call("GET", c.api(t), "/v1/jobs/"+id, nil, &j)
	return j, err
}

// getJobState reads GET /v1/jobs/{id}/state from a live coordinator.
func (c *cluster) getJobState(t *testing.T, id string) (stateView, error) {
	var s stateView
	err := c.call("GET", c.api(t), "/v1/jobs/"+id+"/state", nil, &s)
	return s, err
}

// getCheckpoints reads GET /v1/jobs/{id}/checkpoints (newest first) from the
// coordinator at addr.
func (c *cluster) getCheckpoints(addr, id string) ([]checkpointView, error) {
	var cps []checkpointView
	err := c.call("GET", addr, "/v1/jobs/"+id+"/checkpoints", nil, &cps)
	return cps, err
}

// waitJob polls GET /v1/jobs/{id} until cond returns nil and returns that
// view; cond's error says why not yet.
func (c *cluster) waitJob(t *testing.T, timeout time.Duration, id, what string, cond func(jobView) error) jobView {
	t.Helper()
	var last jobView
	c.waitFor(t, timeout, what, func() (bool, error) {
		j, err := c.getJob(t, id)
		if err != nil {
			return false, err
		}
		last = j
		if err := cond(j); err != nil {
			return false, fmt.Errorf("attempt %d, %s %q, last checkpoint %d: %w", j.Attempt, j.Status, j.Reason, j.lastCheckpointID(), err)
		}
		return true, nil
	})
	return last
}

// jobState returns the job's last completed checkpoint, failing the test if
// it cannot be read.
func (c *cluster) jobState(t *testing.T, id string) stateView {
	t.Helper()
	s, err := c.getJobState(t, id)
	if err != nil {
		t.Fatalf("job %s state: %v", id, err)
	}
	return s
}

// waitCaughtUp waits until the job's last completed checkpoint has read every
// partition of topic up to end (next offset to read >= end offset), and
// returns that checkpoint's state.
func (c *cluster) waitCaughtUp(t *testing.T, timeout time.Duration, jobID, topic string, end map[int32]int64) stateView {
	t.Helper()
	var st stateView
	c.waitFor(t, timeout, fmt.Sprintf("job %s's last checkpoint to reach the end of %s", jobID, topic), func() (bool, error) {
		s, err := c.getJobState(t, jobID)
		if err != nil {
			return false, err
		}
		var behind []string
		for _, p := range slices.Sorted(maps.Keys(end)) {
			key := fmt.Sprintf("%s/%d", topic, p)
			if got, ok := s.Offsets[key]; !ok || got < end[p] {
				behind = append(behind, fmt.Sprintf("%s at %d of %d", key, got, end[p]))
			}
		}
		if len(behind) > 0 {
			return false, fmt.Errorf("checkpoint %d: %s", s.CheckpointID, strings.Join(behind, ", "))
		}
		st = s
		return true, nil
	})
	return st
}

// sameFSM reports whether every coordinator answers and all report the same
// FSM digest (GET /v1/fsm/digest).
func (c *cluster) sameFSM() (bool, error) {
	digests := map[string]string{}
	for _, cp := range c.coords {
		d, err := c.digest(cp)
		if err != nil {
			return false, err
		}
		digests[cp.id] = d
	}
	for _, cp := range c.coords[1:] {
		if digests[cp.id] != digests[c.coords[0].id] {
			return false, fmt.Errorf("digests differ: %v", digests)
		}
	}
	return true, nil
}

// sameLiveFSM reports whether every live coordinator answers and all report
// the same FSM digest.
func (c *cluster) sameLiveFSM() (bool, error) {
	digests := map[string]string{}
	var first string
	for _, cp := range c.liveCoordinators() {
		d, err := c.digest(cp)
		if err != nil {
			return false, err
		}
		digests[cp.id] = d
		if first == "" {
			first = d
		} else if d != first {
			return false, fmt.Errorf("digests differ: %v", digests)
		}
	}
	return true, nil
}

// diffCounts compares keyed state with the expected counts and describes the
// first differences (missing, extra and wrong keys) and the totals; "" when
// they are equal.
func diffCounts(got, want map[string]int64) string {
	const show = 20
	var missing, extra, wrong []string
	var gotTotal, wantTotal int64
	for _, k := range slices.Sorted(maps.Keys(want)) {
		wantTotal += want[k]
		g, ok := got[k]
		switch {
		case !ok:
			missing = append(missing, fmt.Sprintf("%q (want %d)", k, want[k]))
		case g != want[k]:
			wrong = append(wrong, fmt.Sprintf("%q: got %d, want %d", k, g, want[k]))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		gotTotal += got[k]
		if _, ok := want[k]; !ok {
			extra = append(extra, fmt.Sprintf("%q = %d", k, got[k]))
		}
	}
	if len(missing)+len(extra)+len(wrong) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d keys, total %d; want %d keys, total %d\n", len(got), gotTotal, len(want), wantTotal)
	for _, part := range []struct {
		name  string
		items []string
	}{{"missing", missing}, {"extra", extra}, {"wrong count", wrong}} {
		if len(part.items) == 0 {
			continue
		}
		fmt.Fprintf(&b, "%d %s:", len(part.items), part.name)
		for i, s := range part.items {
			if i == show {
				fmt.Fprintf(&b, " ... and %d more", len(part.items)-show)
				break
			}
			b.WriteString(" " + s + ";")
		}
		b.WriteString("\n")
	}
	return b.String()
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

// ---- CLI ----

// cli runs `coordd ARGS...` against the HTTP API at addr (through
// COORD_ADDR) and returns its stdout; a non-zero exit fails the test.
func (c *cluster) cli(t *testing.T, addr string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "coordd"), args...)
	cmd.Env = append(os.Environ(), "COORD_ADDR=http://"+addr)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("coordd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// cliResult runs `coordd ARGS...` against the HTTP API at addr and returns
// its exit code, stdout and stderr, for commands expected to fail.
func (c *cluster) cliResult(t *testing.T, addr string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "coordd"), args...)
	cmd.Env = append(os.Environ(), "COORD_ADDR=http://"+addr)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("coordd %s: %v", strings.Join(args, " "), err)
	}
	return code, out.String(), errOut.String()
}

// ---- Kafka ----

// saramaConfig is the client configuration of every Kafka helper.
func saramaConfig() *sarama.Config {
	cfg := sarama.NewConfig()
	cfg.ClientID = "coordflow-integration"
	cfg.Version = sarama.V3_6_0_0
	cfg.Metadata.AllowAutoTopicCreation = false
	cfg.Net.DialTimeout = 5 * time.Second
	cfg.Net.ReadTimeout = 10 * time.Second
	cfg.Net.WriteTimeout = 10 * time.Second
	return cfg
}

// record is one Kafka record to produce. partition < 0 (anyPartition) lets
// the key's hash choose, as sarama's default partitioner does.
type record struct {
	key, value string
	partition  int32
}

const anyPartition = -1

// recordPartitioner sends a message to its explicit partition if it has one,
// else by key hash.
type recordPartitioner struct{ hash sarama.Partitioner }

func (r recordPartitioner) Partition(m *sarama.ProducerMessage, n int32) (int32, error) {
	if m.Partition < 0 {
		return r.hash.Partition(m, n)
	}
	if m.Partition >= n {
		return 0, fmt.Errorf("partition %d of topic %s with %d partitions", m.Partition, m.Topic, n)
	}
	return m.Partition, nil
}

func (recordPartitioner) RequiresConsistency() bool { return true }

// produce writes recs to topic with an idempotent producer, so that every
// record lands exactly once, and fails the test on any error.
func produce(t *testing.T, brokers []string, topic string, recs []record) {
	t.Helper()
	if err := produceRecords(context.Background(), brokers, topic, recs, 0); err != nil {
		t.Fatal(err)
	}
}

// produceInBackground produces recs in a goroutine at about perSecond records
// a second, so that input keeps arriving while a scenario kills processes.
// The returned wait blocks until all are produced and fails the test on an
// error; the goroutine is stopped when the test ends in any case.
func produceInBackground(t *testing.T, brokers []string, topic string, recs []record, perSecond int) (wait func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- produceRecords(ctx, brokers, topic, recs, perSecond) }()
	var once sync.Once
	var err error
	finish := func(timeout time.Duration) error {
		once.Do(func() {
			select {
			case err = <-done:
			case <-time.After(timeout):
				cancel()
				err = fmt.Errorf("background producer to %s: not done after %v", topic, timeout)
				<-done
			}
			cancel()
		})
		return err
	}
	t.Cleanup(func() { cancel(); _ = finish(stopTimeout) })
	budget := 2 * time.Minute
	if perSecond > 0 {
		budget += time.Duration(len(recs)/perSecond) * time.Second
	}
	return func() {
		t.Helper()
		if err := finish(budget); err != nil {
			t.Fatal(err)
		}
	}
}

// produceRecords writes recs with an idempotent producer in chunks; with
// perSecond > 0 it paces the chunks to about that rate.
func produceRecords(ctx context.Context, brokers []string, topic string, recs []record, perSecond int) error {
	cfg := saramaConfig()
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Idempotent = true
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Return.Successes = true
	cfg.Producer.Flush.Messages = 1000
	cfg.Producer.Flush.Frequency = 5 * time.Millisecond
	cfg.Producer.Partitioner = func(string) sarama.Partitioner {
		return recordPartitioner{hash: sarama.NewHashPartitioner("")}
	}
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		return fmt.Errorf("produce to %s: new producer: %w", topic, err)
	}
	defer p.Close()
	const tick = 50 * time.Millisecond
	chunk := 20000
	var pace <-chan time.Time
	if perSecond > 0 {
		chunk = max(1, perSecond*int(tick/time.Millisecond)/1000)
		ticker := time.NewTicker(tick)
		defer ticker.Stop()
		pace = ticker.C
	}
	msgs := make([]*sarama.ProducerMessage, 0, chunk)
	for start := 0; start < len(recs); start += chunk {
		if pace != nil && start > 0 {
			select {
			case <-pace:
			case <-ctx.Done():
				return fmt.Errorf("produce to %s: stopped after %d of %d records: %w", topic, start, len(recs), ctx.Err())
			}
		}
		msgs = msgs[:0]
		for _, r := range recs[start:min(start+chunk, len(recs))] {
			m := &sarama.ProducerMessage{Topic: topic, Partition: r.partition, Value: sarama.StringEncoder(r.value)}
			if r.key != "" {
				m.Key = sarama.StringEncoder(r.key)
			}
			msgs = append(msgs, m)
		}
		if err := p.SendMessages(msgs); err != nil {
			var perrs sarama.ProducerErrors
			if errors.As(err, &perrs) && len(perrs) > 0 {
				return fmt.Errorf("produce to %s: %d of %d records failed, first: %w", topic, len(perrs), len(msgs), perrs[0].Err)
			}
			return fmt.Errorf("produce to %s: %w", topic, err)
		}
	}
	return nil
}

// topicEndOffsets returns the end offset (next offset to be written) of
// every partition of topic.
func topicEndOffsets(t *testing.T, brokers []string, topic string) map[int32]int64 {
	t.Helper()
	cl, err := sarama.NewClient(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("end offsets of %s: %v", topic, err)
	}
	defer cl.Close()
	parts, err := cl.Partitions(topic)
	if err != nil {
		t.Fatalf("end offsets of %s: partitions: %v", topic, err)
	}
	end := make(map[int32]int64, len(parts))
	for _, p := range parts {
		if end[p], err = cl.GetOffset(topic, p, sarama.OffsetNewest); err != nil {
			t.Fatalf("end offset of %s/%d: %v", topic, p, err)
		}
	}
	return end
}

// deleteTopic deletes topic from the brokers.
func deleteTopic(t *testing.T, brokers []string, topic string) {
	t.Helper()
	adm, err := sarama.NewClusterAdmin(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("delete topic %s: %v", topic, err)
	}
	defer adm.Close()
	if err := adm.DeleteTopic(topic); err != nil {
		t.Fatalf("delete topic %s: %v", topic, err)
	}
	t.Logf("deleted topic %s", topic)
}

// createTopic creates topic with the given number of partitions.
func createTopic(t *testing.T, brokers []string, topic string, partitions int32) {
	t.Helper()
	adm, err := sarama.NewClusterAdmin(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("create topic %s: %v", topic, err)
	}
	defer adm.Close()
	if err := adm.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: partitions, ReplicationFactor: 1}, false); err != nil {
		t.Fatalf("create topic %s: %v", topic, err)
	}
	t.Logf("created topic %s with %d partitions", topic, partitions)
}

// sumOffsets adds up offsets by partition (topicEndOffsets) or by
// "topic/partition" (job state): the record count below them, as every topic
// here starts at offset 0.
func sumOffsets[K comparable](m map[K]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// readTopic reads every record of every partition of topic, from the oldest
// offset to the end offset at the time of the call, and returns the values by
// partition, in offset order.
func readTopic(t *testing.T, brokers []string, topic string) map[int32][]string {
	t.Helper()
	end := topicEndOffsets(t, brokers, topic)
	cons, err := sarama.NewConsumer(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("read %s: new consumer: %v", topic, err)
	}
	defer cons.Close()
	out := make(map[int32][]string, len(end))
	for p, last := range end {
		out[p] = []string{}
		if last == 0 {
			continue
		}
		pc, err := cons.ConsumePartition(topic, p, sarama.OffsetOldest)
		if err != nil {
			t.Fatalf("read %s/%d: %v", topic, p, err)
		}
		timeout := time.After(30 * time.Second)
		for int64(len(out[p])) < last {
			select {
			case m := <-pc.Messages():
				if m.Offset != int64(len(out[p])) {
					t.Fatalf("read %s/%d: got offset %d after %d records", topic, p, m.Offset, len(out[p]))
				}
				out[p] = append(out[p], string(m.Value))
			case err := <-pc.Errors():
				t.Fatalf("read %s/%d: %v", topic, p, err)
			case <-timeout:
				t.Fatalf("read %s/%d: %d of %d records after 30s", topic, p, len(out[p]), last)
			}
		}
		pc.Close()
	}
	return out
}

// consumeGroup joins consumer group group on topic, reads n records, marks
// them consumed, commits synchronously and leaves the group. It returns the
// values read.
func consumeGroup(t *testing.T, brokers []string, group, topic string, n int) []string {
	t.Helper()
	cfg := saramaConfig()
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Consumer.Offsets.AutoCommit.Enable = false
	cfg.Consumer.Return.Errors = true
	cg, err := sarama.NewConsumerGroup(brokers, group, cfg)
	if err != nil {
		t.Fatalf("consumer group %s: %v", group, err)
	}
	defer cg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h := &groupHandler{want: n, done: cancel}
	go func() {
		for err := range cg.Errors() {
			t.Logf("consumer group %s: %v", group, err)
		}
	}()
	for ctx.Err() == nil {
		if err := cg.Consume(ctx, []string{topic}, h); err != nil && ctx.Err() == nil {
			t.Fatalf("consumer group %s: %v", group, err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.values) < n || !h.committed {
		t.Fatalf("consumer group %s: read %d of %d records (committed: %v) in 60s", group, len(h.values), n, h.committed)
	}
	return h.values
}

// groupHandler reads until it has want records, then commits and ends the
// session through done.
type groupHandler struct {
	want      int
	done      func()
	mu        sync.Mutex
	values    []string
	committed bool
}

func (h *groupHandler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *groupHandler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (h *groupHandler) ConsumeClaim(sess sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for {
		select {
		case m, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			sess.MarkMessage(m, "")
			h.mu.Lock()
			h.values = append(h.values, string(m.Value))
			full := len(h.values) >= h.want && !h.committed
			if full {
				sess.Commit()
				h.committed = true
			}
			h.mu.Unlock()
			if full {
				h.done()
			}
		case <-sess.Context().Done():
			return nil
		}
	}
}

// committedOffsets returns group's committed offset for every partition of
// topic (-1 where it has none).
func committedOffsets(t *testing.T, brokers []string, group, topic string) map[int32]int64 {
	t.Helper()
	cl, err := sarama.NewClient(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	defer cl.Close()
	adm, err := sarama.NewClusterAdminFromClient(cl)
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	parts, err := cl.Partitions(topic)
	if err != nil {
		t.Fatalf("committed offsets of %s: partitions of %s: %v", group, topic, err)
	}
	resp, err := adm.ListConsumerGroupOffsets(group, map[string][]int32{topic: parts})
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	out := make(map[int32]int64, len(parts))
	for _, p := range parts {
		b := resp.GetBlock(topic, p)
		if b == nil {
			t.Fatalf("committed offsets of %s: no answer for %s/%d", group, topic, p)
		}
		if b.Err != sarama.ErrNoError {
			t.Fatalf("committed offsets of %s: %s/%d: %v", group, topic, p, b.Err)
		}
		out[p] = b.Offset
	}
	return out
}
