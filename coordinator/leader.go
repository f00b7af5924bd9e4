package coordinator

import (
	"context"

	"github.com/coordflow/coordflow/transport"
)

// runLeader runs every leader-only loop (scheduler, checkpoint coordinators,
// worker sessions) until ctx is cancelled on loss of leadership. C1 calls it
// in its own goroutine after a raft Barrier on gaining leadership, and waits
// for it to return before leadership can be gained again. [C2: placeholder]
func (s *Server) runLeader(ctx context.Context) { <-ctx.Done() }

// memberChanged is called by the gossip event delegate on every join, leave,
// failure or update. It must not block. [C2: placeholder]
func (s *Server) memberChanged() {}

// newControlService returns the gRPC Control service registered on -rpc-addr
// by C1. On a follower, Session answers NotLeader and returns. [C2: placeholder]
func newControlService(s *Server) transport.ControlServer {
	return transport.UnimplementedControlServer{}
}
