package coordinator

import (
	"container/heap"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// The leader's work is split over these files:
//
//   - leader.go: the leader goroutine, its state and its event loop;
//   - leader_work.go: what the loop does per event (dirty jobs, the timer
//     heap, writes in order per job);
//   - commit.go: the write path all of this node's Raft writes take;
//   - session.go: the Control service and one session per worker;
//   - scheduler.go: assignment, deployment and restarts with backoff;
//   - checkpoint.go: the checkpoint coordinator.
//
// One goroutine, started by runLeader, owns every piece of leader state: the
// sessions by worker, what each worker reported about each task, and per job
// the restart backoff and the pending checkpoint. Sessions hand it what workers
// send over a channel; it never blocks on a worker (sending is a non-blocking
// enqueue on the session) nor on Raft (writes come back as events). Everything it holds is rebuilt from the FSM and from
// the workers' Hello messages each time this node gains leadership.

// Leader timings that are not worth a Config field.
const (
	// maxReconnectGrace bounds how long a new leader waits for workers to
	// reconnect and report their tasks before it judges tasks missing.
	maxReconnectGrace = 3 * time.Second
	// eventQueue is how many session events may wait for the leader loop
	// before sessions block (backpressure, not loss).
	eventQueue = 1024
	// defaultLease and defaultReconcile are used when Config leaves the
	// corresponding field at zero.
	defaultLease     = 5 * time.Second
	defaultReconcile = 30 * time.Second
	// defaultDeployTimeout is Config.DeployTimeout's default.
	defaultDeployTimeout = 45 * time.Second
)

// leaderEnv is what the leader loop needs from the rest of coordd. runLeader
// fills it from the Server; tests fill it with an in-memory FSM, fake
// membership and a fake clock, so that the loop's decisions can be checked
// step by step without Raft or gossip.
type leaderEnv struct {
	// submit hands an encoded command to the write path without blocking;
	// done is called, from another goroutine, with the FSM's result.
	submit func(t fsm.CommandType, data []byte, done func(res any, err error))
	// jobs and job read the local FSM: copies whose checkpoints and
	// histories are shared, to be read only (fsm.FSM.Job). The loop reads
	// every job only when a term starts, when its reconnect grace ends and
	// on its safety-net pass.
	jobs func() []fsm.Job
	job  func(id string) (fsm.Job, bool)
	// members is every gossip member; aliveWorkers the workers that are alive.
	members      func() []Member
	aliveWorkers func() []Member
	// partitions asks Kafka how many partitions topic has.
	partitions func(ctx context.Context, brokers []string, topic string) (int, error)
	// checkSink asks an exactly-once sink's brokers whether they support
	// transactions; nil checks nothing.
	checkSink func(ctx context.Context, brokers []string) error
	// coordinatorsBelow lists the coordinators of the Raft configuration
	// below a feature level or of unknown level; nil finds none.
	coordinatorsBelow func(level int) ([]string, error)
	// failpoint is Config.Failpoint.
	failpoint func(name string)
	// probe pings a gossip member once, directly, and returns the round
	// trip; it blocks for at most the gossip probe timeout. Nil skips probes.
	probe func(member string) (time.Duration, error)
	// refused reports whether a member's process is gone from a host that
	// is up: its ports refuse connections. Nil never finds one gone.
	refused func(member string) bool
	// leaderID names this node for Welcome; term is Raft's current term
	// (leader.leadsTerm).
	leaderID string
	term     func() uint64
	now      func() time.Time
	// jitter returns a uniform random number in [0, 1).
	jitter func() float64
	// collect starts, in the background, a garbage collection of a job's
	// checkpoint files; nil never collects.
	collect func(ctx context.Context, jobID string)
	// purgeFiles deletes every checkpoint file of a cancelled job before
	// its purge and returns how many; nil deletes nothing.
	purgeFiles func(ctx context.Context, jobID string) (int, error)
	// savepoint reads one savepoint of the local FSM.
	savepoint func(id string) (fsm.Savepoint, bool)
	// chosenIDs reports whether the leader may choose checkpoint ids, and
	// so send triggers before they commit: every coordinator is at
	// chosenIDLevel. Nil: it may not.
	chosenIDs func() bool
}

// serverEnv returns the leaderEnv of a running Server.
func serverEnv(s *Server) leaderEnv {
	return leaderEnv{
		submit: func(t fsm.CommandType, data []byte, done func(any, error)) {
			s.committer.submit(t, data, func(res any, _ uint64, err error) { done(res, err) })
		},
		jobs:              s.fsm.SharedJobs,
		job:               s.fsm.Job,
		members:           s.Members,
		aliveWorkers:      s.aliveWorkers,
		partitions:        kafkaPartitions,
		checkSink:         kafkaSinkCheck,
		coordinatorsBelow: s.coordinatorsBelow,
		failpoint:         s.cfg.Failpoint,
		probe:             s.probeMember,
		refused:           s.portsRefused,
		leaderID:          s.cfg.ID,
		term:              s.raft.CurrentTerm,
		now:               time.Now,
		jitter:            rand.Float64,
		collect:           s.collector.collect,
		purgeFiles:        s.collector.purge,
		savepoint:         s.fsm.Savepoint,
		chosenIDs:         s.chosenIDs.allow,
	}
}

// leader is the state of one term of leadership. Only its run goroutine
// touches its fields, except ctx, events, wake and the immutable settings,
// which sessions use to reach it.
type leader struct {
	env     leaderEnv
	ctx     context.Context
	logger  *slog.Logger
	metrics *metrics

	lease          time.Duration // worker lease, sent in Welcome
	heartbeat      time.Duration // worker heartbeat interval, sent in Welcome
	reconcileEvery time.Duration
	deployTimeout  time.Duration // see Config.DeployTimeout
	jobGC          time.Duration // see Config.JobGCThreshold

	// events carries what sessions and lookups report; wake asks for a
	// reconcile pass (buffered 1, sends never block).
	events chan leaderEvent
	wake   chan struct{}
	// lookups tracks the partition lookups and purges' file deletions in
	// flight, and probes the direct probes of workers whose session broke,
	// so that run returns only after they have.
	lookups sync.WaitGroup
	probes  sync.WaitGroup

	// term is the Raft term this loop leads, read before the Barrier that
	// started it. Once Raft's current term has moved past it, the local FSM
	// may hold a successor's entries, so the loop sends nothing ahead of a
	// commit (leadsTerm).
	term     uint64
	started  time.Time // when this term's loop started
	graceEnd time.Time // before it, tasks are not judged missing and nothing is deployed

	sessions map[string]*session // open session by worker id
	// noSessionSince is when a worker's last session closed; a worker with no
	// entry and no session has had none since started.
	noSessionSince map[string]time.Time
	// gone holds the workers without a session whose process is known to
	// have died (portsRefused): their tasks fail at once, without waiting
	// for gossip or the lease. A new session clears it.
	gone map[string]bool
	// overruled holds the workers gossip calls dead whose session was still
	// live when their jobs were looked at: the verdict is logged once until
	// gossip or the session changes (overruleDead).
	overruled map[string]bool
	jobs      map[string]*jobState
	// inherited holds, per job, the pending checkpoint this term found in the
	// FSM when it started: it is aborted as "leader changed".
	inherited map[string]uint64
	// maybeSent holds, per job this term found in the FSM, the id after its
	// last issued one, which a predecessor may have sent; observe takes it
	// into the job's checkpoint state.
	maybeSent map[string]uint64

	// timers holds every job's next deadline; dirty the jobs to reconcile
	// in this iteration; byWorker the jobs with tasks on each worker;
	// waiting the jobs that wait for a deploy; used the slots in use per
	// worker; writes each job's queue of commands, the first in flight
	// (leader_work.go).
	timers   timerHeap
	dirty    map[string]struct{}
	byWorker map[string]map[string]struct{}
	waiting  map[string]struct{}
	used     map[string]int // slots in use per worker (account)
	writes   map[string][]*write
	// purges counts the purges whose files are being deleted; purgeQueue
	// holds the jobs due for a purge that wait for one of them to end.
	purges     int
	purgeQueue []string
	// purgeNow holds the cancelled jobs a user asked to purge without
	// waiting for the threshold (jobgc.go).
	purgeNow map[string]*purgeAsk

	// notedJobs and notedWorkers are what other goroutines (the FSM,
	// gossip) report, under notesMu, until the loop takes them.
	notesMu      sync.Mutex
	notedJobs    map[string]struct{}
	notedWorkers map[string]struct{}
}

// leaderEvent is something a session or a lookup reports to the leader loop.
type leaderEvent interface{ leaderEvent() }

func (sessionOpened) leaderEvent()    {}
func (sessionClosed) leaderEvent()    {}
func (workerMessage) leaderEvent()    {}
func (partitionsResult) leaderEvent() {}

// currentLeader returns the leader state of this node's current term, or nil
// when this node is not running as leader.
func (s *Server) currentLeader() *leader { return s.leader.Load() }

// runLeader runs every leader-only loop (scheduler, checkpoint coordinators,
// worker sessions) until ctx is cancelled on loss of leadership. C1 calls it
// in its own goroutine after a raft Barrier on gaining leadership, and waits
// for it to return before leadership can be gained again. Every session of
// the term ends with it, so that workers reconnect to the next leader.
func (s *Server) runLeader(ctx context.Context, term uint64) {
	l := newLeader(ctx, serverEnv(s), s.cfg, s.logger, s.metrics, term)
	s.leader.Store(l)
	defer s.leader.CompareAndSwap(l, nil)
	l.run()
}

// memberChanged is called by the gossip event delegate on every join, leave,
// failure or update of member id. It only tells the leader loop, if this node
// runs one.
func (s *Server) memberChanged(id string) {
	if l := s.currentLeader(); l != nil {
		l.noteWorker(id)
	}
}

// jobsChanged is called by the FSM after each applied entry with the jobs it
// changed. It only tells the leader loop, if this node runs one.
func (s *Server) jobsChanged(ids []string) {
	if l := s.currentLeader(); l != nil {
		l.noteJobs(ids)
	}
	for _, id := range ids {
		if !s.fsm.HasJob(id) { // purged
			s.metrics.forgetJob(id)
			s.collector.forget(id)
		}
	}
}

// newControlService returns the gRPC Control service registered on -rpc-addr
// by C1. On a follower, Session answers NotLeader and returns.
func newControlService(s *Server) transport.ControlServer {
	return &controlService{s: s}
}

// newLeader returns the state of a new term of leadership, the Raft term
// given; call run to start it.
func newLeader(ctx context.Context, env leaderEnv, cfg Config, logger *slog.Logger, m *metrics, term uint64) *leader {
	l := &leader{
		env:            env,
		term:           term,
		ctx:            ctx,
		logger:         logger.With("leader", env.leaderID),
		metrics:        m,
		lease:          orDefault(cfg.WorkerLease, defaultLease),
		heartbeat:      orDefault(cfg.WorkerHeartbeat, orDefault(cfg.WorkerLease, defaultLease)/4),
		reconcileEvery: orDefault(cfg.ReconcileInterval, defaultReconcile),
		deployTimeout:  orDefault(cfg.DeployTimeout, defaultDeployTimeout),
		jobGC:          cfg.JobGCThreshold,
		events:         make(chan leaderEvent, eventQueue),
		wake:           make(chan struct{}, 1),
		sessions:       make(map[string]*session),
		noSessionSince: make(map[string]time.Time),
		gone:           make(map[string]bool),
		overruled:      make(map[string]bool),
		jobs:           make(map[string]*jobState),
		inherited:      make(map[string]uint64),
		maybeSent:      make(map[string]uint64),
		dirty:          make(map[string]struct{}),
		byWorker:       make(map[string]map[string]struct{}),
		waiting:        make(map[string]struct{}),
		used:           make(map[string]int),
		writes:         make(map[string][]*write),
		purgeNow:       make(map[string]*purgeAsk),
		notedJobs:      make(map[string]struct{}),
		notedWorkers:   make(map[string]struct{}),
	}
	l.started = env.now()
	l.graceEnd = l.started.Add(min(l.lease, maxReconnectGrace))
	heap.Push(&l.timers, timer{at: l.graceEnd, kind: timerGraceEnd})
	return l
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// run is the leader loop. It returns when ctx is cancelled, after the
// partition lookups it started have returned.
func (l *leader) run() {
	defer l.probes.Wait()
	defer l.lookups.Wait()
	l.logger.Info("leader loop started", "grace", l.graceEnd.Sub(l.started))
	defer l.logger.Info("leader loop stopped")

	if l.termOver() {
		return
	}
	l.inherit()
	l.reconcile()

	sweep := time.NewTicker(l.reconcileEvery)
	defer sweep.Stop()
	timer := time.NewTimer(l.untilDue())
	defer timer.Stop()
	for {
		if l.termOver() {
			return
		}
		l.settle()
		timer.Reset(l.untilDue())
		select {
		case <-l.ctx.Done():
			return
		case ev := <-l.events:
			l.handle(ev)
		case <-l.wake:
		case <-timer.C:
		case <-sweep.C:
			l.reconcile()
		}
	}
}

// termOver reports whether Raft's term has moved past the loop's, and then
// returns only once the loop's context has ended. This node was deposed:
// its FSM may apply the successor's entries before the loss of leadership
// ends the loop, within moments, and the loop must not act on them as if
// they were its own term's. The loop checks between iterations; what an
// iteration decides after the term moved is never sent (sendTo) and its
// writes fail.
func (l *leader) termOver() bool {
	if l.leadsTerm() {
		return false
	}
	l.logger.Warn("raft term moved on: this leader loop acts on nothing more and waits for its end", "term", l.term, "raft_term", l.env.term())
	<-l.ctx.Done()
	return true
}

// poke asks the loop for a reconcile pass without blocking; it may be called
// from any goroutine.
func (l *leader) poke() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// handle dispatches one event to its handler.
func (l *leader) handle(ev leaderEvent) {
	switch ev := ev.(type) {
	case sessionOpened:
		l.openSession(ev.sess, ev.hello)
	case sessionClosed:
		l.closeSession(ev.sess, ev.err)
	case workerGone:
		l.onWorkerGone(ev)
	case workerMessage:
		if ev.sess != nil {
			ev.sess.queued.Add(-ev.size)
		}
		l.onWorkerMessage(ev.sess, ev.msg)
	case partitionsResult:
		l.onPartitions(ev)
	case purgeFilesResult:
		l.onPurgeFiles(ev)
	case savepointRequest:
		l.onSavepointRequest(ev)
	case purgeRequest:
		l.onPurgeRequest(ev)
	case writeResult:
		l.onWriteResult(ev)
	}
}

// post hands an event to the loop, blocking while the loop is busy. It
// returns false if ctx ended first; ctx is the sender's own context (a
// session's, or the term's), which ends at the latest with the term.
func (l *leader) post(ctx context.Context, ev leaderEvent) bool {
	select {
	case l.events <- ev:
		return true
	case <-ctx.Done():
		return false
	}
}

// sendTo enqueues msg on worker's session (sendOn). It fails with
// errNoSession when the worker has no open session, and as sendOn does.
func (l *leader) sendTo(worker string, msg *transport.CoordinatorMessage) error {
	sess := l.sessions[worker]
	if sess == nil {
		return errNoSession
	}
	return l.sendOn(sess, msg)
}

// sendOn enqueues msg, a decision of the loop, on sess. It fails when the
// session has ended or its queue overflowed (which closes it), and with
// errTermMoved when Raft's term has moved past the loop's: the decision may
// rest on a successor's entries the loop read from the FSM, and the check
// after the read proves it did not (leadsTerm). Only the session's own
// answers (Welcome, a heartbeat's echo) go out without it: they rest on no
// FSM read.
func (l *leader) sendOn(sess *session, msg *transport.CoordinatorMessage) error {
	if !l.leadsTerm() {
		return errTermMoved
	}
	if !sess.send(msg) {
		return fmt.Errorf("session closed: %w", sess.cause())
	}
	return nil
}

// sessionlessSince returns since when worker has had no open session, and false
// if it has one. A session that has ended but whose close has not reached
// the loop (its handler blocked in a send to the worker) still counts: that
// send may yet get through and renew the worker's lease, so the leader's
// lease clock starts only at the close, which bounds the send.
func (l *leader) sessionlessSince(worker string) (time.Time, bool) {
	if l.sessions[worker] != nil {
		return time.Time{}, false
	}
	if t, ok := l.noSessionSince[worker]; ok {
		return t, true
	}
	return l.started, true
}

// jobLogger returns a logger with the job and attempt attributes. It is
// made once per attempt: a logger's attributes are formatted when it is
// made, and at 1,000 jobs a new one per event took a tenth of the leader
// loop's time.
func (l *leader) jobLogger(js *jobState) *slog.Logger {
	if js.log == nil || js.logAttempt != js.attempt {
		js.log, js.logAttempt = l.logger.With("job", js.id, "attempt", js.attempt), js.attempt
	}
	return js.log
}
