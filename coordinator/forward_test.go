package coordinator

import (
	"net"
	"testing"
)

// TestFollowerForwardsToALeaderBoundOnEveryInterface: coordinators whose
// HTTP and gRPC listeners are bound on every interface (-http-addr
// 0.0.0.0:PORT, as in a container) advertise their Raft host instead, so a
// follower forwards a write to the leader, not to itself.
func TestFollowerForwardsToALeaderBoundOnEveryInterface(t *testing.T) {
	servers := startClusterWith(t, 3, func(c *Config) { c.HTTPAddr, c.RPCAddr = "0.0.0.0:0", "0.0.0.0:0" })
	leader := waitForLeader(t, servers...)
	for _, s := range servers {
		for _, addr := range []string{s.HTTPAddr(), s.RPCAddr()} {
			host, _, err := net.SplitHostPort(addr)
			if err != nil || host != "127.0.0.1" {
				t.Fatalf("coordinator %s advertises %q, want its Raft host 127.0.0.1", s.ID(), addr)
			}
		}
	}
	for _, s := range servers {
		if s == leader {
			continue
		}
		id := submitJob(t, s, wordcountSpec) // forwarded to the leader
		if _, ok := leader.fsm.Job(id); !ok {
			t.Fatalf("job %s submitted through follower %s is not in the leader's state", id, s.ID())
		}
	}
}
