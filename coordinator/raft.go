package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

const (
	// raftDBFile holds the Raft log and stable store under the data dir.
	raftDBFile = "raft.db"
	// boltOpenTimeout bounds the wait for bolt's file lock: a data dir in
	// use by another process fails the start instead of hanging it.
	boltOpenTimeout = 2 * time.Second
	// snapshotsRetained is how many Raft snapshots stay on disk.
	snapshotsRetained = 2
	// raftMaxPool and raftIOTimeout configure the Raft TCP transport.
	raftMaxPool   = 3
	raftIOTimeout = 10 * time.Second
	// defaultApplyTimeout bounds raftApplyAt when its ctx has no deadline.
	defaultApplyTimeout = 10 * time.Second
	// barrierTimeout bounds the Barrier a new leader waits for before it
	// starts its loops; a failed Barrier is retried after barrierRetry.
	barrierTimeout = 30 * time.Second
	barrierRetry   = time.Second
	// membershipChangeTimeout bounds AddVoter and AddNonvoter.
	membershipChangeTimeout = 10 * time.Second
	// bootstrapPoll is how often a node waiting to bootstrap looks at gossip.
	bootstrapPoll = 200 * time.Millisecond
	// peerStatusTimeout bounds the status query of a peer before bootstrap.
	peerStatusTimeout = time.Second
	// slowLeaderLoop is how long the monitor waits for the leader loops to
	// return before it warns, and then warns again.
	slowLeaderLoop = 5 * time.Second
)

// ErrNotLeader is returned (wrapped) by raftApplyAt on a node that is not the
// Raft leader: the command was not appended. HTTP answers it by forwarding
// to the leader or with 503.
var ErrNotLeader = errors.New("not the raft leader")

// errPeerHasState says a peer already holds Raft state, so the cluster
// exists and this node must wait to be added instead of bootstrapping.
var errPeerHasState = errors.New("a peer already holds raft state")

// setupRaft opens the stores under the data dir, binds the Raft transport and
// starts the Raft node.
func (s *Server) setupRaft() error {
	hl := newHCLogger(s.logger.With("component", "raft"), "raft")
	store, err := openCheckedBoltStore(filepath.Join(s.cfg.DataDir, raftDBFile))
	if err != nil {
		return err
	}
	s.store = store
	snaps, err := raft.NewFileSnapshotStoreWithLogger(s.cfg.DataDir, snapshotsRetained, hl.Named("snapshots"))
	if err != nil {
		return fmt.Errorf("open raft snapshot store in %s: %w", s.cfg.DataDir, err)
	}
	trans, err := newRaftTransport(s.cfg.RaftAddr, s.cfg.TLS, hl.Named("transport"))
	if err != nil {
		return fmt.Errorf("raft transport on %s: %w", s.cfg.RaftAddr, err)
	}
	s.raftTransport = trans

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(s.cfg.ID)
	rc.HeartbeatTimeout = s.cfg.RaftHeartbeatTimeout
	rc.ElectionTimeout = s.cfg.RaftElectionTimeout
	rc.LeaderLeaseTimeout = s.cfg.RaftLeaderLeaseTimeout
	if s.cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = s.cfg.SnapshotThreshold
	}
	if s.cfg.TrailingLogs > 0 {
		rc.TrailingLogs = s.cfg.TrailingLogs
	}
	if s.cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = s.cfg.SnapshotInterval
	}
	rc.Logger = hl
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("raft config: %w", err)
	}

	s.raftHadState, err = raft.HasExistingState(store, store, snaps)
	if err != nil {
		return fmt.Errorf("inspect raft state in %s: %w", s.cfg.DataDir, err)
	}
	if err := checkRaftData(s.cfg.DataDir, store, snaps, s.logger); err != nil {
		return err
	}
	s.applied = &indexedFSM{FSM: s.fsm, metrics: s.metrics}
	r, err := newRaft(s.cfg.DataDir, rc, s.applied, s.watchLogStore(store), store, snaps, trans)
	if err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	s.raft = r
	s.framed.below = func() ([]string, error) { return s.coordinatorsBelow(framedBatchLevel) }
	s.chosenIDs.below = func() ([]string, error) { return s.coordinatorsBelow(chosenIDLevel) }
	s.keys.below = func() ([]string, error) { return s.coordinatorsBelow(SubmissionKeyLevel) }
	s.compressed.below = func() ([]string, error) { return s.coordinatorsBelow(compressedLevel) }
	s.committer = newCommitter(r, s.metrics, s.framed.allow, s.compressed.allow)
	return nil
}

// openBoltStore opens the Raft log and stable store, failing after
// boltOpenTimeout with a clear error when another process holds its lock.
//
// bbolt's free list is kept out of the file (NoFreelistSync, as Consul's and
// Nomad's no_freelist_sync): Raft compacts its log after every snapshot, and
// the list of the pages the compacted entries leave free would otherwise be
// written again with every commit, on every node: about 150 KB per append
// after a compaction of 16,000 entries of 26 KB, and twice the time for an
// append of 5 KB after 10,000 (docs/benchmarks.md). Open rebuilds the list by
// walking the file's pages instead; checkBoltFile reads them first, where
// a garbled page is an error rather than a crash.
func openBoltStore(path string) (*raftboltdb.BoltStore, error) {
	store, err := raftboltdb.New(raftboltdb.Options{
		Path: path,
		BoltOptions: &bbolt.Options{
			Timeout:        boltOpenTimeout,
			NoFreelistSync: true,
			FreelistType:   bbolt.FreelistMapType,
		},
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("open raft store %s: locked by another process (is another coordd running with this data dir?): gave up after %v: %w",
			path, boltOpenTimeout, err)
	}
	if err != nil {
		return nil, fmt.Errorf("open raft store %s: %w", path, err)
	}
	return store, nil
}

// raftApplyAt encodes cmd, commits it through the committer on this node
// (which must be the leader) and returns the FSM's result, or the FSM's
// error, and the entry's log index, also when the FSM rejected it. It waits
// until ctx ends, or defaultApplyTimeout without a deadline; a caller that
// gives up leaves the command in flight: it may still commit. An error
// wrapping ErrNotLeader means the command was not appended;
// raft.ErrLeadershipLost means it may or may not commit. [C1]
func (s *Server) raftApplyAt(ctx context.Context, t fsm.CommandType, cmd any) (res any, index uint64, err error) {
	return s.raftApplySettled(ctx, t, cmd, nil)
}

// raftApplySettled is raftApplyAt that also calls settled (if not nil) once
// with the command's outcome (nil: committed and applied without error),
// when it is known: after raftApplySettled returned if ctx ended first. Its
// callers keep what the FSM does not show yet, a write in flight, until
// then. settled runs on the committer's goroutine and must not block.
func (s *Server) raftApplySettled(ctx context.Context, t fsm.CommandType, cmd any, settled func(error)) (res any, index uint64, err error) {
	if settled == nil {
		settled = func(error) {}
	}
	data, err := fsm.Encode(t, cmd)
	if err != nil {
		settled(err)
		return nil, 0, fmt.Errorf("raft apply: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultApplyTimeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil {
		settled(err)
		return nil, 0, fmt.Errorf("raft apply %v: %w", t, context.Cause(ctx))
	}
	type result struct {
		res   any
		index uint64
		err   error
	}
	out := make(chan result, 1)
	s.committer.submit(t, data, func(res any, index uint64, err error) {
		settled(err)
		out <- result{res, index, err}
	})
	select {
	case r := <-out:
		return r.res, r.index, r.err
	case <-ctx.Done():
		return nil, 0, fmt.Errorf("raft apply %v: %w", t, context.Cause(ctx))
	}
}

// indexedFSM is the raft.FSM coordd gives Raft: the fsm, plus the index of
// the last entry it has applied. raft.AppliedIndex runs ahead of the FSM (it
// moves when entries are handed to the FSM goroutine, before they are
// applied), so a follower that must read its own forwarded write waits on
// this index instead.
type indexedFSM struct {
	*fsm.FSM
	metrics *metrics // times and sizes the snapshots
	applied atomic.Uint64
}

// Apply applies l and then records its index. Raft calls it from its FSM
// goroutine only.
func (f *indexedFSM) Apply(l *raft.Log) any {
	res := f.FSM.Apply(l)
	f.applied.Store(l.Index)
	return res
}

// Snapshot takes the FSM's snapshot and times its Persist.
func (f *indexedFSM) Snapshot() (raft.FSMSnapshot, error) {
	snap, err := f.FSM.Snapshot()
	if err != nil {
		return nil, err
	}
	return &timedSnapshot{FSMSnapshot: snap, metrics: f.metrics}, nil
}

// timedSnapshot records how long Persist takes and how many bytes it
// writes: a snapshot competes with the log for the disk and the CPU.
type timedSnapshot struct {
	raft.FSMSnapshot
	metrics *metrics
}

func (s *timedSnapshot) Persist(sink raft.SnapshotSink) error {
	timer := prometheus.NewTimer(s.metrics.raftSnapshotDuration)
	counted := &countingSink{SnapshotSink: sink}
	if err := s.FSMSnapshot.Persist(counted); err != nil {
		return err
	}
	timer.ObserveDuration()
	s.metrics.raftSnapshotBytes.Set(float64(counted.n))
	return nil
}

// countingSink counts the bytes written through it.
type countingSink struct {
	raft.SnapshotSink
	n int64
}

func (c *countingSink) Write(p []byte) (int, error) {
	n, err := c.SnapshotSink.Write(p)
	c.n += int64(n)
	return n, err
}

// hasApplied reports whether this node's FSM reflects log index, the index of
// an FSM command: applied it, or restored a snapshot that covers it.
func (s *Server) hasApplied(index uint64) bool {
	if s.applied.applied.Load() >= index {
		return true
	}
	if s.raft.AppliedIndex() < index {
		return false
	}
	// Raft has handed index over: the FSM goroutine is applying it (a
	// moment), or a snapshot restored since covers it.
	snap, err := strconv.ParseUint(s.raft.Stats()["last_snapshot_index"], 10, 64)
	return err == nil && snap >= index
}

// fsmReflects reports whether this node's FSM reflects the log up to index,
// whatever the type of the entry there: Raft has handed the entries over
// to the FSM goroutine (raft.AppliedIndex, which runs ahead of the FSM),
// and the FSM has applied the last command among them or restored a
// snapshot that covers it. No-ops and configuration entries never reach
// the FSM, so waiting for index itself could wait for good.
func (s *Server) fsmReflects(index uint64) bool {
	if s.raft.AppliedIndex() < index {
		return false
	}
	cmd, found := lastCommand(s.store, index)
	switch {
	case !found:
		return s.hasApplied(index) // compacted: a snapshot covers it
	case cmd == 0:
		return true // no command at all up to index
	}
	return s.hasApplied(cmd)
}

// lastCommandScan bounds lastCommand's walk back over entries that are not
// commands: a leader's no-op per term and membership changes, never many
// in a row.
const lastCommandScan = 256

// lastCommand returns the index of the last FSM command at or before index
// in logs (0 if there is none down to the log's start), and false if it
// cannot tell: the log no longer holds the entries (a snapshot does), or
// more than lastCommandScan in a row are not commands.
func lastCommand(logs raft.LogStore, index uint64) (uint64, bool) {
	i := index
	for ; i > 0 && index-i < lastCommandScan; i-- {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			return 0, false
		}
		if l.Type == raft.LogCommand {
			return i, true
		}
	}
	return 0, i == 0
}

// inRaftConfiguration reports whether this node is in the latest Raft
// configuration it knows, as a voter or a nonvoter.
func (s *Server) inRaftConfiguration() bool {
	f := s.raft.GetConfiguration()
	if f.Error() != nil {
		return false
	}
	for _, srv := range f.Configuration().Servers {
		if string(srv.ID) == s.cfg.ID {
			return true
		}
	}
	return false
}

// waitApplied waits until this node's FSM has applied index, or ctx is done.
// Raft offers no notification for this; the wait is usually one commit
// round (at most raft's CommitTimeout, 50 ms), so polling is cheap.
func (s *Server) waitApplied(ctx context.Context, index uint64) error {
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for !s.hasApplied(index) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for raft index %d (applied %d): %w", index, s.raft.AppliedIndex(), ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// monitorLeadership runs the leader loops while this node leads: it starts
// them on gaining leadership and cancels them, waiting for them to return,
// on losing it. Runs until Server.ctx is cancelled.
func (s *Server) monitorLeadership() {
	type term struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	var cur *term
	stopLeader := func() {
		if cur == nil {
			return
		}
		cur.cancel()
		s.waitLeaderLoops(cur.done)
		cur = nil
	}
	defer stopLeader()
	for {
		select {
		case <-s.ctx.Done():
			return
		case leader := <-s.raft.LeaderCh():
			// LeaderCh keeps only the latest transition: true while loops
			// run means leadership was lost and regained, so always stop
			// the old loops first.
			stopLeader()
			if !leader {
				s.logger.Info("lost raft leadership")
				continue
			}
			ctx, cancel := context.WithCancel(s.ctx)
			cur = &term{cancel: cancel, done: make(chan struct{})}
			go func(done chan struct{}) {
				defer close(done)
				s.leaderLoop(ctx)
			}(cur.done)
		}
	}
}

// waitLeaderLoops waits for the leader loops to close done, warning while
// they take long: the next leadership term must not start beside them.
func (s *Server) waitLeaderLoops(done <-chan struct{}) {
	t := time.NewTicker(slowLeaderLoop)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			s.logger.Warn("leader loops still running after loss of leadership", "waited", time.Since(start).Round(time.Millisecond))
		}
	}
}

// leaderLoop is one term of leadership: a Barrier so that the FSM holds every
// entry of earlier terms, then the Raft membership reconciliation and C2's
// runLeader until ctx is cancelled.
func (s *Server) leaderLoop(ctx context.Context) {
	// The term is read before the Barrier: read after it, it could be a
	// successor's term, were this node deposed in between, and the loop
	// would take the successor's entries for its own (leader.leadsTerm).
	term := s.raft.CurrentTerm()
	for {
		err := s.raft.Barrier(barrierTimeout).Error()
		if err == nil {
			break
		}
		s.logger.Warn("raft barrier after gaining leadership failed", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(barrierRetry):
		}
	}
	s.logger.Info("gained raft leadership", "term", term, "applied_index", s.raft.AppliedIndex())
	s.barrierTerm.Store(term)

	reconciled := make(chan struct{})
	go func() {
		defer close(reconciled)
		s.reconcileRaftMembers(ctx)
	}()
	s.runLeader(ctx, term)
	if ctx.Err() == nil {
		s.logger.Error("leader loop returned while still leader; leader duties stop until the next term")
	}
	<-reconciled
}

// reconcileRaftMembers keeps the Raft configuration in step with the
// coordinators in gossip, every RaftReconcileInterval and on member events,
// until ctx is cancelled. Only the leader runs it. Gossip alone never changes
// the configuration: with TLS a coordinator is added once its certificate
// proved its id, without TLS an operator adds it (peers.go).
func (s *Server) reconcileRaftMembers(ctx context.Context) {
	rc := newRaftReconciler(s)
	t := time.NewTicker(s.cfg.RaftReconcileInterval)
	defer t.Stop()
	for {
		if err := rc.once(ctx); err != nil && ctx.Err() == nil {
			s.logger.Warn("reconcile raft configuration with gossip", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.memberEvents:
		}
	}
}

// bootstrapLoop bootstraps the Raft cluster once BootstrapExpect voting
// coordinators are visible in gossip (the Consul and Nomad convention), and
// stops when this node is bootstrapped, has been added to a cluster, or
// finds that peers already hold Raft state. Runs only on a node that had no
// Raft state at start. With TLS a coordinator counts only once its
// certificate proved its id; without TLS whoever is in gossip counts: the
// first formation trusts the network (docs/operations.md).
func (s *Server) bootstrapLoop() {
	t := time.NewTicker(bootstrapPoll)
	defer t.Stop()
	auth := newPeerAuth(s)
	seen := -1
	for {
		done, voters, err := s.tryBootstrap(auth)
		switch {
		case done:
			return
		case err != nil:
			s.logger.Info("bootstrap: not yet", "reason", err)
		case len(voters) != seen:
			seen = len(voters)
			s.logger.Info("bootstrap: waiting for voting coordinators in gossip", "seen", seen, "expect", s.cfg.BootstrapExpect,
				"authenticated", s.cfg.TLS != nil)
		}
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// tryBootstrap makes one bootstrap attempt. Every node computes the same
// configuration, all the voters it sees (and, with TLS, has authenticated
// through auth) sorted by id, so several nodes bootstrapping at once agree,
// as long as no more than BootstrapExpect fresh coordinators start together.
func (s *Server) tryBootstrap(auth *peerAuth) (done bool, voters []Member, err error) {
	if s.raft.LastIndex() > 0 {
		return true, nil, nil // added by a leader, or bootstrapped
	}
	for _, m := range s.Members() {
		if m.Role != transport.RoleCoordinator || m.Status != StatusAlive || !m.Voter || m.RaftAddr == "" {
			continue
		}
		if s.cfg.TLS != nil && m.ID != s.cfg.ID && auth.check(s.ctx, m.ID, m.RaftAddr) != nil {
			continue
		}
		voters = append(voters, m)
	}
	if len(voters) < s.cfg.BootstrapExpect {
		return false, voters, nil
	}
	if err := s.checkPeersFresh(voters); err != nil {
		if errors.Is(err, errPeerHasState) {
			how := "an operator adds it (coordd raft add-peer -id " + s.cfg.ID + " -raft-addr " + s.RaftAddr() + ")"
			if s.cfg.TLS != nil {
				how = "the leader adds it once it has authenticated this node's certificate"
			}
			s.logger.Info("bootstrap: a peer holds raft state already, so this node does not bootstrap; it joins once the configuration has it: "+
				"it may be in the peers' bootstrap configuration already, else "+how, "reason", err)
			return true, voters, nil
		}
		return false, voters, err
	}
	servers := make([]raft.Server, 0, len(voters))
	for _, m := range voters { // Members is sorted by id
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(m.ID), Address: raft.ServerAddress(m.RaftAddr)})
	}
	err = s.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	if errors.Is(err, raft.ErrCantBootstrap) {
		return true, voters, nil
	}
	if err != nil {
		return false, voters, fmt.Errorf("bootstrap raft cluster: %w", err)
	}
	ids := make([]string, len(servers))
	for i, srv := range servers {
		ids[i] = string(srv.ID)
	}
	s.logger.Info("bootstrapped raft cluster", "servers", ids)
	return true, voters, nil
}

// checkPeersFresh asks every other voter in the list for its Raft status and
// returns errPeerHasState if one already holds a log: a node started with
// -bootstrap-expect after the cluster formed (a replacement or a fourth
// coordinator) must join it, not bootstrap a second one.
func (s *Server) checkPeersFresh(voters []Member) error {
	for _, m := range voters {
		if m.ID == s.cfg.ID {
			continue
		}
		if m.HTTPAddr == "" {
			return fmt.Errorf("coordinator %s advertises no http address", m.ID)
		}
		st, err := fetchStatus(s.ctx, s.peerClient(m.ID, peerStatusTimeout), s.apiScheme()+"://"+m.HTTPAddr)
		if err != nil {
			return fmt.Errorf("status of coordinator %s: %w", m.ID, err)
		}
		if st.LastIndex > 0 || st.LeaderID != "" {
			return fmt.Errorf("%w: coordinator %s is at index %d, leader %q", errPeerHasState, m.ID, st.LastIndex, st.LeaderID)
		}
	}
	return nil
}

// fetchStatus reads GET /v1/status of the coordinator at base (scheme://host:port).
func fetchStatus(ctx context.Context, client *http.Client, base string) (apiStatus, error) {
	var st apiStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/status", nil)
	if err != nil {
		return st, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET /v1/status: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("decode /v1/status: %w", err)
	}
	return st, nil
}

// hclogAdapter is an hclog.Logger that writes into slog, so Raft's logs
// carry the node's attributes and obey its level.
type hclogAdapter struct {
	base   *slog.Logger // the node's logger plus With args, without the name
	logger *slog.Logger // base plus the name
	name   string
	args   []any
}

var _ hclog.Logger = (*hclogAdapter)(nil)

func newHCLogger(base *slog.Logger, name string) *hclogAdapter {
	return &hclogAdapter{base: base, logger: base, name: name}
}

// slogTrace is the slog level of hclog's Trace, below Debug.
const slogTrace = slog.LevelDebug - 4

func slogLevel(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return slogTrace
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	}
	return slog.LevelInfo
}

func (h *hclogAdapter) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.Off || !h.enabled(slogLevel(level)) {
		return
	}
	copied := false
	for i, a := range args {
		// Raft passes hclog.Fmt values: a format and its arguments. The
		// caller's slice is copied before the first rewrite: it may reuse it.
		if f, ok := a.(hclog.Format); ok && len(f) > 0 {
			if format, ok := f[0].(string); ok {
				if !copied {
					args, copied = slices.Clone(args), true
				}
				args[i] = fmt.Sprintf(format, f[1:]...)
			}
		}
	}
	h.logger.Log(context.Background(), slogLevel(level), msg, args...)
}
func (h *hclogAdapter) Trace(msg string, args ...any) { h.Log(hclog.Trace, msg, args...) }
func (h *hclogAdapter) Debug(msg string, args ...any) { h.Log(hclog.Debug, msg, args...) }
func (h *hclogAdapter) Info(msg string, args ...any)  { h.Log(hclog.Info, msg, args...) }
func (h *hclogAdapter) Warn(msg string, args ...any)  { h.Log(hclog.Warn, msg, args...) }
func (h *hclogAdapter) Error(msg string, args ...any) { h.Log(hclog.Error, msg, args...) }
func (h *hclogAdapter) enabled(l slog.Level) bool {
	return h.logger.Enabled(context.Background(), l)
}
func (h *hclogAdapter) IsTrace() bool         { return h.enabled(slogTrace) }
func (h *hclogAdapter) IsDebug() bool         { return h.enabled(slog.LevelDebug) }
func (h *hclogAdapter) IsInfo() bool          { return h.enabled(slog.LevelInfo) }
func (h *hclogAdapter) IsWarn() bool          { return h.enabled(slog.LevelWarn) }
func (h *hclogAdapter) IsError() bool         { return h.enabled(slog.LevelError) }
func (h *hclogAdapter) ImpliedArgs() []any    { return h.args }
func (h *hclogAdapter) Name() string          { return h.name }
func (h *hclogAdapter) SetLevel(hclog.Level)  {} // the slog handler owns the level
func (h *hclogAdapter) GetLevel() hclog.Level { return hclog.NoLevel }
func (h *hclogAdapter) With(args ...any) hclog.Logger {
	c := &hclogAdapter{base: h.base.With(args...), name: h.name, args: append(slices.Clone(h.args), args...)}
	c.logger = c.base.With("logger", c.name)
	return c
}
func (h *hclogAdapter) Named(name string) hclog.Logger {
	if h.name != "" {
		name = h.name + "." + name
	}
	return h.ResetNamed(name)
}
func (h *hclogAdapter) ResetNamed(name string) hclog.Logger {
	return &hclogAdapter{base: h.base, logger: h.base.With("logger", name), name: name, args: h.args}
}
func (h *hclogAdapter) StandardLogger(*hclog.StandardLoggerOptions) *log.Logger {
	return log.New(h.StandardWriter(nil), "", 0)
}
func (h *hclogAdapter) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return &levelWriter{logger: h.logger, def: slog.LevelInfo, max: slog.LevelError}
}

// levelWriter is the io.Writer behind a standard *log.Logger (memberlist's,
// net/http's, hclog's StandardLogger): each line becomes one slog record, at
// the level its "[LEVEL]" prefix names (else at def), lowered to max.
type levelWriter struct {
	logger *slog.Logger
	def    slog.Level
	max    slog.Level
}

var levelPrefixes = []struct {
	prefix string
	level  slog.Level
}{
	{"[TRACE]", slogTrace}, {"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo},
	{"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelError}, {"[ERROR]", slog.LevelError},
}

func (w *levelWriter) Write(p []byte) (int, error) {
	for line := range strings.Lines(string(p)) {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		level := w.def
		for _, lp := range levelPrefixes {
			if rest, ok := strings.CutPrefix(line, lp.prefix); ok {
				line, level = strings.TrimSpace(rest), lp.level
				break
			}
		}
		w.logger.Log(context.Background(), min(level, w.max), line)
	}
	return len(p), nil
}
