// Package coordinator is coordd: a Raft node holding the fsm, gossip
// membership shared with the workers, the leader's scheduler and checkpoint
// coordinator, the worker control sessions, and the HTTP API.
package coordinator

import (
	"context"
	"log/slog"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// Config configures one coordd. DefaultConfig gives LAN-tuned defaults; tests
// tighten timings through the same fields.
type Config struct {
	ID              string
	DataDir         string
	RaftAddr        string
	RPCAddr         string
	HTTPAddr        string
	GossipAddr      string
	Join            []string
	BootstrapExpect int
	Voter           bool

	RaftHeartbeatTimeout   time.Duration
	RaftElectionTimeout    time.Duration
	RaftLeaderLeaseTimeout time.Duration
	SnapshotThreshold      uint64

	ProbeInterval  time.Duration
	ProbeTimeout   time.Duration
	SuspicionMult  int
	GossipInterval time.Duration

	// WorkerLease is how long a worker may run tasks without hearing from a
	// leader; sent to workers in Welcome.
	WorkerLease time.Duration
	// WorkerHeartbeat is how often workers heartbeat on their session.
	WorkerHeartbeat time.Duration
	// ReconcileInterval is how often the leader compares jobs with what runs.
	ReconcileInterval time.Duration

	// Operators are the operator names job specs may use.
	Operators []string

	Logger *slog.Logger
}

// Member is one member of the gossip pool as coordd sees it.
type Member struct {
	ID         string `json:"id"`
	Role       string `json:"role"`
	GossipAddr string `json:"gossip_addr"`
	Status     string `json:"status"` // alive, suspect, dead, left
	RaftAddr   string `json:"raft_addr,omitempty"`
	RPCAddr    string `json:"rpc_addr,omitempty"`
	HTTPAddr   string `json:"http_addr,omitempty"`
	DataAddr   string `json:"data_addr,omitempty"`
	Slots      int    `json:"slots,omitempty"`
}

// Server is one running coordd.
type Server struct {
	cfg     Config
	logger  *slog.Logger
	raft    *raft.Raft
	fsm     *fsm.FSM
	members *memberlist.Memberlist
	metrics *metrics
}

// raftApply encodes cmd, applies it through Raft on this node (which must be
// the leader) and returns the FSM's result, or the FSM's error. [C1]
func (s *Server) raftApply(ctx context.Context, t fsm.CommandType, cmd any) (any, error) {
	panic("TODO C1")
}

// isLeader reports whether this node is the Raft leader. [C1]
func (s *Server) isLeader() bool { panic("TODO C1") }

// leaderInfo returns the current leader's id and its RPC and HTTP addresses
// (from gossip metadata); empty when unknown. [C1]
func (s *Server) leaderInfo() (id, rpcAddr, httpAddr string) { panic("TODO C1") }

// Members returns every gossip member this node knows, including dead and left
// ones, sorted by id. [C1]
func (s *Server) Members() []Member { panic("TODO C1") }

// aliveWorkers returns the workers memberlist considers alive (alive or suspect). [C1]
func (s *Server) aliveWorkers() []Member { panic("TODO C1") }
