package integration

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// peerView is one server of GET /v1/raft/peers.
type peerView struct {
	ID       string `json:"id"`
	Suffrage string `json:"suffrage"`
	Leader   bool   `json:"leader"`
}

// raftPeers reads GET /v1/raft/peers from the coordinator at addr.
func (c *cluster) raftPeers(addr string) ([]peerView, error) {
	var out struct {
		Servers []peerView `json:"servers"`
	}
	err := c.call("GET", addr, "/v1/raft/peers", nil, &out)
	return out.Servers, err
}

// peersAre reports whether the leader's Raft configuration holds exactly
// want (id -> suffrage).
func (c *cluster) peersAre(t *testing.T, want map[string]string) (bool, error) {
	t.Helper()
	peers, err := c.raftPeers(c.coordinator(t, c.leader(t)).httpAddr)
	if err != nil {
		return false, err
	}
	got := map[string]string{}
	for _, p := range peers {
		got[p.ID] = p.Suffrage
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		return false, fmt.Errorf("raft peers %v, want %v", got, want)
	}
	return true, nil
}

// snapshotCount returns how many Raft snapshots a coordinator keeps on disk.
func snapshotCount(cp *coordProc) int {
	metas, _ := filepath.Glob(filepath.Join(cp.dataDir, "snapshots", "*", "meta.json"))
	return len(metas)
}

// TestCoordinatorMembership: a fourth coordinator started after the cluster
// has compacted its log is not added from gossip (no TLS); `coordd raft
// add-peer` adds it as a voter and it catches up from a snapshot; a fifth
// started with -voter=false is added with add-peer -non-voter; `coordd raft
// remove-peer` removes a dead coordinator (through a follower, which forwards
// to the leader) and refuses to remove the leader or a live coordinator.
func TestCoordinatorMembership(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, topics: map[string]int32{"words": 1},
		coordFlags: []string{"-raft-snapshot-threshold", "32", "-raft-trailing-logs", "8", "-raft-snapshot-interval", "100ms"}})

	// Each job adds two log entries (registered, then pending for want of
	// workers): enough for every coordinator to snapshot and trim its log.
	for i := range 40 {
		spec := wordcountSpec(c.brokers(), "words")
		spec.Name = fmt.Sprintf("job%02d", i)
		if _, err := c.postJob(c.api(t), spec); err != nil {
			t.Fatalf("submit job %d: %v", i, err)
		}
	}
	c.waitFor(t, 30*time.Second, "every coordinator to snapshot its log", func() (bool, error) {
		for _, cp := range c.coords {
			if snapshotCount(cp) == 0 {
				return false, fmt.Errorf("%s has no snapshot yet", cp.id)
			}
		}
		return true, nil
	})

	before := c.coordinator(t, c.leader(t)) // c.leader waits for c4 too once it runs
	c4 := c.addCoordinator(t, "c4")
	// Without TLS the leader adds no coordinator it sees in gossip: c4
	// waits for an operator, and both coordd members and the leader's log
	// say so.
	c.waitFor(t, 15*time.Second, "coordd members to show c4 waiting for add-peer", func() (bool, error) {
		out := c.cli(t, c.api(t), "members")
		for line := range strings.Lines(out) {
			if strings.HasPrefix(line, "c4 ") && strings.Contains(line, "not-in-raft (coordd raft add-peer)") {
				return true, nil
			}
		}
		return false, fmt.Errorf("coordd members:\n%s", out)
	})
	if log := c.coordLog(t, before.id); !strings.Contains(log, "run coordd raft add-peer -id c4 -raft-addr "+c4.raftAddr) {
		t.Errorf("the leader's log does not tell the operator to add c4")
	}
	if peers, err := c.raftPeers(before.httpAddr); err != nil || len(peers) != 3 {
		t.Errorf("raft peers %+v (%v): want c1, c2 and c3 only; c4 must not be added from gossip alone", peers, err)
	}
	if out := c.cli(t, c.api(t), "raft", "add-peer", "-id", "c4", "-raft-addr", c4.raftAddr); !strings.Contains(out, "added c4 as a voter") {
		t.Errorf("raft add-peer c4 printed %q", out)
	}
	c.waitFor(t, 30*time.Second, "c4 to be a voter", func() (bool, error) {
		return c.peersAre(t, map[string]string{"c1": "voter", "c2": "voter", "c3": "voter", "c4": "voter"})
	})
	c.waitFor(t, 30*time.Second, "c4 to reach the others' FSM digest", c.sameLiveFSM)
	if log := c.coordLog(t, "c4"); !strings.Contains(log, "Installed remote snapshot") {
		t.Errorf("c4 caught up without installing the leader's snapshot")
	}
	var jobs []jobView
	if err := c.call("GET", c4.httpAddr, "/v1/jobs", nil, &jobs); err != nil || len(jobs) != 40 {
		t.Errorf("c4 lists %d jobs (%v), want 40", len(jobs), err)
	}

	c5 := c.addCoordinator(t, "c5", "-voter=false", "-bootstrap-expect", "0") // a nonvoter never bootstraps
	c.waitFor(t, 15*time.Second, "c5 to be alive in gossip", func() (bool, error) { return c.memberStatusIs("c5", "alive") })
	c.cli(t, c.api(t), "raft", "add-peer", "-id", "c5", "-raft-addr", c5.raftAddr, "-non-voter")
	c.waitFor(t, 30*time.Second, "c5 to be a nonvoter", func() (bool, error) {
		return c.peersAre(t, map[string]string{"c1": "voter", "c2": "voter", "c3": "voter", "c4": "voter", "c5": "nonvoter"})
	})
	c.waitFor(t, 30*time.Second, "c5 to reach the others' FSM digest", c.sameLiveFSM)

	leader := c.leader(t)
	var follower *coordProc
	for _, cp := range c.liveCoordinators() {
		if cp.id != leader && cp.id != "c4" {
			follower = cp
			break
		}
	}
	refused := func(id, why string) {
		t.Helper()
		code, _, stderr := c.cliResult(t, follower.httpAddr, "raft", "remove-peer", id)
		if code != 1 || !strings.Contains(stderr, why) {
			t.Errorf("raft remove-peer %s = %d %q, want 1 and %q", id, code, stderr, why)
		}
	}
	refused(leader, "cannot remove itself")
	refused("c4", "is alive in gossip")
	refused("c9", `no raft peer "c9"`)

	c.killCoordinator(t, "c4")
	c.waitFor(t, 15*time.Second, "c4 to be dead in gossip", func() (bool, error) { return c.memberStatusIs("c4", "dead") })
	out := c.cli(t, follower.httpAddr, "raft", "remove-peer", "c4")
	if !strings.Contains(out, "removed c4") {
		t.Errorf("raft remove-peer c4 printed %q", out)
	}
	c.waitFor(t, 15*time.Second, "c4 to be out of the raft configuration", func() (bool, error) {
		return c.peersAre(t, map[string]string{"c1": "voter", "c2": "voter", "c3": "voter", "c5": "nonvoter"})
	})
	peers := c.cli(t, follower.httpAddr, "raft", "peers")
	if strings.Contains(peers, "c4") || !strings.Contains(peers, "nonvoter") {
		t.Errorf("raft peers after removing c4:\n%s", peers)
	}

	// The cluster still writes with the remaining voters.
	spec := wordcountSpec(c.brokers(), "words")
	spec.Name = "after-remove"
	if _, err := c.postJob(follower.httpAddr, spec); err != nil {
		t.Fatalf("write after removing c4: %v", err)
	}
	c.waitFor(t, 30*time.Second, "the live coordinators to hold the same FSM", c.sameLiveFSM)
}
