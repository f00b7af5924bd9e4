// Package coordinator is coordd: a Raft node holding the fsm, gossip
// membership shared with the workers, the leader's scheduler and checkpoint
// coordinator, the worker control sessions, and the HTTP API.
//
// One Server owns, and starts in this order: the Raft stores and node
// (raft.go), the gRPC Control service and the HTTP API (http.go), and the
// memberlist pool (membership.go). Background goroutines (join retries,
// bootstrap, the leadership monitor and, while leader, the leader loops) are
// all children of Server.ctx and stop in Shutdown before the components they
// use are closed.
package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// Config configures one coordd. DefaultConfig gives LAN-tuned defaults; tests
// tighten timings through the same fields.
type Config struct {
	ID      string
	DataDir string
	// Version is the build's version, as /v1/status reports it.
	Version string
	// RaftAddr, RPCAddr, HTTPAddr and GossipAddr are host:port to bind and
	// advertise. Port 0 binds a free port (tests); the accessors of Server
	// report the port actually bound.
	RaftAddr   string
	RPCAddr    string
	HTTPAddr   string
	GossipAddr string
	// Join lists gossip addresses of members to join; retried until one answers.
	Join []string
	// BootstrapExpect is how many voting coordinators must be visible in
	// gossip before a node with no Raft state bootstraps the cluster with
	// all of them; 0 never bootstraps (the node waits to be added).
	BootstrapExpect int
	// CheckpointStorage is the checkpoint storage URL of jobs whose spec
	// names none (checkpoint.storage); empty keeps their state inline.
	CheckpointStorage string
	// Voter says whether this node asks to be a Raft voter (or a nonvoter
	// that only replicates and serves reads).
	Voter bool

	RaftHeartbeatTimeout   time.Duration
	RaftElectionTimeout    time.Duration
	RaftLeaderLeaseTimeout time.Duration
	// SnapshotThreshold is how many log entries since the last snapshot
	// trigger a new one; TrailingLogs is how many entries a snapshot leaves
	// in the log for slow followers. Both keep the log, and so the catch-up
	// of a restarted node, small.
	SnapshotThreshold uint64
	TrailingLogs      uint64
	// SnapshotInterval is how often Raft checks SnapshotThreshold.
	SnapshotInterval time.Duration
	// RaftReconcileInterval is how often the leader compares the Raft
	// configuration with the coordinators in gossip (it also does on every
	// member event).
	RaftReconcileInterval time.Duration

	ProbeInterval  time.Duration
	ProbeTimeout   time.Duration
	SuspicionMult  int
	GossipInterval time.Duration
	// GossipKeys, if set, encrypt gossip (memberlist's keyring: 16, 24 or
	// 32 bytes each): the first encrypts, all decrypt, and members without
	// a matching key are refused. transport.LoadGossipKeys reads them.
	GossipKeys [][]byte

	// WorkerLease is how long a worker may run tasks without hearing from a
	// leader; sent to workers in Welcome.
	WorkerLease time.Duration
	// WorkerHeartbeat is how often workers heartbeat on their session.
	WorkerHeartbeat time.Duration
	// ReconcileInterval is how often the leader re-reads every job from the
	// FSM and compares it with what runs: a safety net only, since events
	// and per-job timers do that work as it comes (leader_work.go).
	ReconcileInterval time.Duration
	// DeployTimeout is how long a task of a job's current attempt may take to
	// report RUNNING after the deploy (or after a new leader first sees the
	// attempt) before the leader restarts the job: a task stuck deploying, or
	// whose RUNNING status was lost, would otherwise block checkpoints for
	// ever. The default, 45 s, covers the worker's wait for its data
	// channels and for the previous attempt's tasks to stop, with a margin.
	DeployTimeout time.Duration
	// JobGCThreshold is how long a cancelled job stays, with its retained
	// checkpoints and their files, before the leader purges it (jobgc.go);
	// 0 keeps cancelled jobs for ever. Savepoints stay either way.
	JobGCThreshold time.Duration

	// Operators are the operator names job specs may use; empty accepts any
	// name (the workers then fail the tasks of an unknown operator).
	Operators []string

	// EnableDebug serves Go's profiler under /debug/pprof/ on the HTTP
	// address, as Consul's enable_debug does. Off by default: a profile
	// reveals much and costs CPU.
	EnableDebug bool

	// TLS, if set, turns on mutual TLS on every listener and dialer: Raft
	// and the Control service take only coordinator and worker certificates
	// as docs/security.md describes, and the HTTP API is served over TLS.
	// Its certificate must be a coordinator certificate.
	TLS *tlsutil.Config

	// ACLTokensFile, if set, names the API tokens file (JSON: [{"name",
	// "token", "role"}], role read, write or operator): requests then need
	// a token or a client certificate (acl.go, docs/operations.md). Reread
	// by Server.ReloadACL.
	ACLTokensFile string
	// MaxStale is how long a follower may go without hearing from the
	// Raft leader and still answer reads of its FSM; past it, or when it
	// cannot apply the log, reads need ?stale=true (Consul's convention).
	MaxStale time.Duration
	// HTTPMaxConnsPerClient bounds the HTTP connections one client IP
	// address may hold open at once (0: no bound): one client cannot take
	// every file descriptor or goroutine of the API, as Consul's
	// http_max_conns_per_client.
	HTTPMaxConnsPerClient int

	// Logger receives every log line of this node, Raft's and memberlist's
	// included; nil means slog.Default().
	Logger *slog.Logger
	// Failpoint, if set, is called at named points of the protocol so that
	// tests can crash the process exactly there (cmd/internal/failpoint).
	// Points: "leader-before-complete-notice".
	Failpoint func(name string)
}

// DefaultConfig returns the LAN tuning of docs/design: 300 ms Raft timeouts
// (fast failover without spurious elections on a loaded 2-core machine) and
// memberlist timings that see a dead member in about one second.
func DefaultConfig() Config {
	return Config{
		Voter:                  true,
		RaftHeartbeatTimeout:   300 * time.Millisecond,
		RaftElectionTimeout:    300 * time.Millisecond,
		RaftLeaderLeaseTimeout: 300 * time.Millisecond,
		SnapshotThreshold:      1024,
		TrailingLogs:           512,
		SnapshotInterval:       30 * time.Second,
		RaftReconcileInterval:  3 * time.Second,
		ProbeInterval:          200 * time.Millisecond,
		ProbeTimeout:           100 * time.Millisecond,
		SuspicionMult:          3,
		GossipInterval:         50 * time.Millisecond,
		WorkerLease:            5 * time.Second,
		WorkerHeartbeat:        500 * time.Millisecond,
		ReconcileInterval:      30 * time.Second,
		DeployTimeout:          defaultDeployTimeout,
		JobGCThreshold:         4 * time.Hour,
		MaxStale:               5 * time.Second,
		HTTPMaxConnsPerClient:  200,
	}
}

// badJoinAddr returns the first of addrs whose port is not a port number,
// or "". An address without a port (c1, fd00::1) is memberlist's to take:
// it joins on this node's own gossip port, which coordinators share.
func badJoinAddr(addrs []string) string {
	for _, a := range addrs {
		if _, port, err := net.SplitHostPort(a); err == nil && !transport.ValidPort(port) {
			return a
		}
	}
	return ""
}

// validate reports the first unusable field of c.
func (c Config) validate() error {
	switch {
	case c.ID == "":
		return errors.New("id is required")
	case c.DataDir == "":
		return errors.New("data dir is required")
	case fsm.ValidateStorageURL(c.CheckpointStorage) != nil:
		return fmt.Errorf("checkpoint storage: %w", fsm.ValidateStorageURL(c.CheckpointStorage))
	case c.RaftAddr == "", c.RPCAddr == "", c.HTTPAddr == "", c.GossipAddr == "":
		return errors.New("raft, rpc, http and gossip addresses are required")
	case badJoinAddr(c.Join) != "":
		// Joins are tried again and again, and a bootstrap waits for
		// them: a typo would wait for ever.
		return fmt.Errorf("join address %q: its port is not a port number", badJoinAddr(c.Join))
	case c.BootstrapExpect < 0:
		return fmt.Errorf("bootstrap-expect must not be negative, not %d", c.BootstrapExpect)
	case c.BootstrapExpect > 0 && !c.Voter:
		return errors.New("a nonvoter cannot bootstrap: set bootstrap-expect 0 or make it a voter")
	case c.RaftHeartbeatTimeout <= 0, c.RaftElectionTimeout <= 0, c.RaftLeaderLeaseTimeout <= 0:
		return errors.New("raft timeouts must be positive")
	case c.RaftReconcileInterval <= 0, c.ReconcileInterval <= 0:
		return errors.New("reconcile intervals must be positive")
	case c.MaxStale <= 0:
		return errors.New("max stale must be positive")
	case c.HTTPMaxConnsPerClient < 0:
		return errors.New("http max conns per client must be 0 (no bound) or positive")
	case c.DeployTimeout <= 0:
		return errors.New("deploy timeout must be positive")
	case c.JobGCThreshold < 0:
		return errors.New("job gc threshold must be 0 (keep cancelled jobs) or positive")
	case c.ProbeInterval <= 0, c.ProbeTimeout <= 0, c.GossipInterval <= 0, c.SuspicionMult < 1:
		return errors.New("memberlist timings must be positive")
	case c.WorkerLease <= 0, c.WorkerHeartbeat <= 0 || c.WorkerHeartbeat >= c.WorkerLease:
		return errors.New("worker heartbeat must be positive and shorter than the worker lease")
	}
	return nil
}

// maxControlMessage bounds one message a coordinator reads from a control
// stream, checked on its length prefix before anything is allocated for it:
// gRPC's default, ample for a Hello of a full worker, and an ack's inline
// state larger than a chunk comes in StateChunks (transport.SplitAck).
const maxControlMessage = 4 << 20

// maxDeployMessage bounds one message the leader sends: a deployment of a
// map task carries every keyed blob of the checkpoint it restores.
// Larger state belongs in checkpoint storage.
const maxDeployMessage = 256 << 20

// maxControlStreams bounds the concurrent streams of one client connection
// to the Control service: a worker needs one session.
const maxControlStreams = 16

// serverCredentials returns the gRPC credentials of a listener: mutual TLS
// accepting only accept's certificates, or none without TLS.
func serverCredentials(tc *tlsutil.Config, accept ...tlsutil.Role) credentials.TransportCredentials {
	if tc == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(tc.ServerConfig(accept...))
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
	Voter      bool   `json:"voter,omitempty"`
	DataAddr   string `json:"data_addr,omitempty"`
	Slots      int    `json:"slots,omitempty"`
	// FeatureLevel is the member's transport.FeatureLevel: which jobs it
	// can take part in (0: a build older than the field).
	FeatureLevel int `json:"feature_level"`
	// Problem says why the member is ignored (its gossip meta is invalid);
	// its role is then "unknown".
	Problem string `json:"problem,omitempty"`
}

// Member statuses.
const (
	StatusAlive   = "alive"
	StatusSuspect = "suspect"
	StatusDead    = "dead"
	StatusLeft    = "left"
)

// Server is one running coordd.
type Server struct {
	cfg     Config
	logger  *slog.Logger
	raft    *raft.Raft
	fsm     *fsm.FSM
	applied *indexedFSM // fsm as Raft sees it, with the last index applied
	// caughtUp is set once this node, as a follower, has applied the
	// commit index the leader told it after its start (http_guard.go).
	caughtUp atomic.Bool
	// barrierTerm is the last Raft term whose leader loop, on this node,
	// has passed its Barrier: until then a new leader's FSM may lack
	// entries of earlier terms, and its reads say so.
	barrierTerm atomic.Uint64
	// applyBehindSince is, in unix nanoseconds, since when an entry this
	// node knows committed has waited to be applied; 0 when none has
	// waited since the last look (watchApply, http_guard.go).
	applyBehindSince atomic.Int64
	members          *memberlist.Memberlist
	metrics          *metrics

	// leader is the state of this node's current term of leadership, nil
	// when it is not leader; sessions accepted by the Control service find it here.
	leader atomic.Pointer[leader]

	// ctx is cancelled first in Shutdown; every background goroutine is
	// derived from it and counted in wg.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// serveWG counts the HTTP and gRPC Serve goroutines, which end when
	// their servers stop, after the loops in wg.
	serveWG sync.WaitGroup

	store         *raftboltdb.BoltStore
	raftTransport *raft.NetworkTransport
	// raftHadState says the stores held Raft state at startup: such a node
	// rejoins with its data and never bootstraps.
	raftHadState bool

	// stores are the checkpoint storages the state API and the garbage
	// collector read; state reads checkpoints' keyed state through them.
	stores    *storage.Pool
	state     *stateReader
	collector *collector
	committer *committer // the write path of this node as leader (commit.go)
	// framed decides whether the committer's batches use the framed
	// envelope, chosenIDs whether the leader chooses checkpoint ids (and
	// pipelines triggers), keys whether a submission's key may go into the
	// log, compressed whether the committer compresses entries; joins hold
	// every gate's mu (features.go).
	framed     writeGate
	chosenIDs  writeGate
	keys       writeGate
	compressed writeGate
	api        *httpAPI // what the HTTP API keeps: tokens, caches (http_guard.go)

	grpc     *grpc.Server
	http     *http.Server
	rpcAddr  string // bound address of the gRPC listener
	httpAddr string // bound address of the HTTP listener

	memberMu    sync.Mutex
	memberState map[string]*memberRecord // every member ever seen, by id
	// memberEvents wakes the leader's Raft membership reconciliation on
	// gossip events; buffered 1, written without blocking.
	memberEvents chan struct{}
	// leaving is set just before the memberlist Leave so that peers can
	// tell a graceful leave from a failure.
	leaving atomic.Bool

	shutdownOnce sync.Once
	shutdownErr  error
}

// NewServer starts a coordd: Raft on its stores under cfg.DataDir, the gRPC
// and HTTP servers, and gossip. It returns once everything listens; joining
// peers and bootstrapping continue in the background. On error, whatever was
// started is stopped again.
func NewServer(cfg Config) (_ *Server, err error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("coordd config: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{
		cfg:          cfg,
		logger:       cfg.Logger.With("node", cfg.ID),
		fsm:          fsm.New(),
		metrics:      newMetrics(),
		api:          newHTTPAPI(),
		memberState:  make(map[string]*memberRecord),
		memberEvents: make(chan struct{}, 1),
		stores:       storage.NewPool(),
	}
	s.fsm.SetLogger(s.logger.With("component", "fsm"))
	s.fsm.OnJobChange(s.jobsChanged)
	s.metrics.registerFSM(s.fsm)
	s.state = &stateReader{stores: s.stores}
	s.collector = newCollector(s.stores, s.fsm.Job, func(id string) bool {
		_, ok := s.fsm.Savepoint(id)
		return ok
	}, s.logger, s.metrics)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if serr := s.Shutdown(ctx); serr != nil {
				s.logger.Warn("cleanup after failed start", "err", serr)
			}
		}
	}()

	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	if err := s.setupRaft(); err != nil {
		return nil, err
	}
	s.metrics.registerRaft(s.raft)
	s.metrics.registerMembers(s.Members)

	rpcLis, err := net.Listen("tcp", cfg.RPCAddr)
	if err != nil {
		return nil, fmt.Errorf("listen rpc %s: %w", cfg.RPCAddr, err)
	}
	s.rpcAddr = s.advertised(rpcLis.Addr().String())
	s.grpc = grpc.NewServer(
		// Only workers open control sessions; with TLS they prove it, and
		// the id they claim in Hello, with their certificate.
		grpc.Creds(serverCredentials(cfg.TLS, tlsutil.RoleWorker)),
		// Sessions are one stream per worker; this bounds what a client can
		// open on one connection.
		grpc.MaxConcurrentStreams(maxControlStreams),
		grpc.ConnectionTimeout(handshakeTimeout),
		// Whatever a client sends is small (acks chunk their state);
		// deployments carry every blob of a checkpoint.
		grpc.MaxRecvMsgSize(maxControlMessage),
		grpc.MaxSendMsgSize(maxDeployMessage),
		// Find worker connections that died without a FIN, and let workers
		// ping to keep their session's connection alive.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	transport.RegisterControlServer(s.grpc, newControlService(s))
	s.serveWG.Go(func() {
		if err := s.grpc.Serve(rpcLis); err != nil {
			s.logger.Error("grpc server stopped", "err", err)
		}
	})

	if err := s.startHTTP(); err != nil {
		return nil, err
	}

	if err := s.setupMemberlist(); err != nil {
		return nil, err
	}

	s.wg.Go(func() { s.committer.run(s.ctx) })
	s.wg.Go(s.joinLoop)
	s.wg.Go(s.monitorLeadership)
	s.wg.Go(s.watchApply)
	if s.raftHadState {
		// Only a node that restarts replays an old log into its FSM; a new
		// one starts empty and lags like any follower.
		s.wg.Go(s.watchCatchUp)
	} else {
		s.caughtUp.Store(true)
	}
	if !s.raftHadState && cfg.BootstrapExpect > 0 {
		s.wg.Go(s.bootstrapLoop)
	}
	s.logger.Info("coordd started", "raft_addr", s.RaftAddr(), "rpc_addr", s.rpcAddr,
		"http_addr", s.httpAddr, "gossip_addr", s.GossipAddr(), "existing_state", s.raftHadState,
		"bootstrap_expect", cfg.BootstrapExpect, "voter", cfg.Voter)
	return s, nil
}

// waitGroup waits for wg, or returns ctx's error once ctx is done.
func waitGroup(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown stops the node in order: leader loops and background goroutines,
// HTTP, gRPC, gossip (leaving gracefully), Raft (handing leadership over
// first), and the Raft store. It is safe to call more than once; later calls
// return the first call's result. ctx bounds the waits that can block.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutdownOnce.Do(func() { s.shutdownErr = s.shutdown(ctx) })
	return s.shutdownErr
}

func (s *Server) shutdown(ctx context.Context) error {
	s.logger.Info("coordd shutting down")
	var errs []error
	s.cancel()
	if err := waitGroup(ctx, &s.wg); err != nil {
		errs = append(errs, fmt.Errorf("wait for background loops (leader loop?): %w", err))
	}
	s.collector.wait()
	if s.http != nil {
		if err := s.http.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("shutdown http: %w", err))
			_ = s.http.Close()
		}
	}
	if s.grpc != nil {
		s.stopGRPC(ctx)
	}
	if err := waitGroup(ctx, &s.serveWG); err != nil {
		errs = append(errs, fmt.Errorf("wait for http and grpc servers: %w", err))
	}
	if s.members != nil {
		if err := s.leaveGossip(); err != nil {
			errs = append(errs, err)
		}
	}
	if s.raft != nil {
		if s.raft.State() == raft.Leader {
			// Hand leadership over so the cluster need not wait for an
			// election timeout; best effort.
			if err := s.raft.LeadershipTransfer().Error(); err != nil {
				s.logger.Info("leadership transfer before shutdown failed", "err", err)
			}
		}
		if err := s.raft.Shutdown().Error(); err != nil {
			errs = append(errs, fmt.Errorf("shutdown raft: %w", err))
		}
	}
	if err := s.stores.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close checkpoint storage: %w", err))
	}
	if s.raftTransport != nil {
		if err := s.raftTransport.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft transport: %w", err))
		}
	}
	if s.store != nil {
		if err := s.store.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft store: %w", err))
		}
	}
	return errors.Join(errs...)
}

// stopGRPC stops the gRPC server gracefully, and forcibly once ctx is done or
// a second has passed: worker sessions are long-lived streams that the
// leader loop ends, but a straggler must not hold up the shutdown.
func (s *Server) stopGRPC(ctx context.Context) {
	stopped := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(stopped)
	}()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-stopped:
		return
	case <-t.C:
	case <-ctx.Done():
	}
	s.grpc.Stop()
	<-stopped
}

// ID returns this node's id: its Raft server id and gossip name.
func (s *Server) ID() string { return s.cfg.ID }

// HTTPAddr returns the advertised address of the HTTP API (host:port; see
// advertised).
func (s *Server) HTTPAddr() string { return s.httpAddr }

// RPCAddr returns the advertised address of the gRPC Control service (see
// advertised).
func (s *Server) RPCAddr() string { return s.rpcAddr }

// advertised is the address the other coordinators and clients reach bound
// by: bound itself, or, bound on every interface (0.0.0.0, [::]), the
// advertised Raft address's host with bound's port. Gossip carries it to the
// other coordinators, which forward writes to it and read its status: a
// wildcard there would have them dial themselves.
func (s *Server) advertised(bound string) string {
	host, port, err := net.SplitHostPort(bound)
	if err != nil {
		return bound
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
		return bound
	}
	raftHost, _, err := net.SplitHostPort(s.RaftAddr())
	if err != nil || raftHost == "" {
		return bound
	}
	return net.JoinHostPort(raftHost, port)
}

// RaftAddr returns the bound and advertised Raft address.
func (s *Server) RaftAddr() string {
	if s.raftTransport == nil {
		return ""
	}
	return string(s.raftTransport.LocalAddr())
}

// GossipAddr returns the advertised memberlist address (host:port).
func (s *Server) GossipAddr() string {
	if s.members == nil {
		return ""
	}
	return s.members.LocalNode().Address()
}

// IsLeader reports whether this node is the Raft leader.
func (s *Server) IsLeader() bool { return s.isLeader() }

// Digest returns the digest of this node's FSM state, equal on replicas
// that applied the same log.
func (s *Server) Digest() (string, error) { return s.fsm.Digest() }

// isLeader reports whether this node is the Raft leader. [C1]
func (s *Server) isLeader() bool { return s.raft.State() == raft.Leader }

// leaderInfo returns the current leader's id and its RPC and HTTP addresses
// (from gossip metadata); empty when unknown. [C1]
func (s *Server) leaderInfo() (id, rpcAddr, httpAddr string) {
	_, lid := s.raft.LeaderWithID()
	if lid == "" {
		return "", "", ""
	}
	id = string(lid)
	if id == s.cfg.ID {
		return id, s.rpcAddr, s.httpAddr
	}
	s.memberMu.Lock()
	defer s.memberMu.Unlock()
	if m, ok := s.memberState[id]; ok && m.Role == transport.RoleCoordinator {
		return id, m.RPCAddr, m.HTTPAddr
	}
	return id, "", ""
}
