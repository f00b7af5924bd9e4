package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

type coordProc struct {
	id                                      string
	dataDir                                 string
	raftAddr, rpcAddr, httpAddr, gossipAddr string
	flags                                   []string // added to this coordinator's command line
	p                                       *proc    // current run; nil before the first start
	// isolated is set while a network partition cuts the coordinator off
	// from the others (partition_test.go): like a paused one it is not
	// live, so that cluster-wide views ask the majority.
	isolated bool
}

func (c *cluster) pickCoordAddrs(t *testing.T, cp *coordProc) {
	a := c.addrs(t, cp.id, 4)
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
	}, c.secFlags("coordinator", cp.id), c.opts.coordFlags, cp.flags)
}

// launchCoordinator starts cp and waits until its /v1/status answers with
// its id.
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
			st, err := c.status(cp)
			if err == nil && st.ID != cp.id {
				// Another process answers on cp's HTTP address, one
				// that took the port first: cp cannot bind it and exits,
				// which launch sees and retries on new ports.
				return false, fmt.Errorf("%s answers on %s, not %s", st.ID, cp.httpAddr, cp.id)
			}
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

// liveCoordinators returns the coordinators the harness has not stopped,
// paused or isolated.
func (c *cluster) liveCoordinators() []*coordProc {
	var live []*coordProc
	for _, cp := range c.coords {
		if cp.p != nil && !cp.p.stopping.Load() && !cp.p.paused.Load() && !cp.isolated {
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
	resp, err := c.get(c.client, c.scheme()+cp.httpAddr+"/metrics")
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
