package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

const (
	// helloTimeout bounds the wait for the answer to Hello.
	helloTimeout = 5 * time.Second
	// drainTimeout bounds how long a closing session keeps sending what is
	// queued (the CANCELLED statuses of a shutdown).
	drainTimeout = 2 * time.Second
	// defaultLease applies when a leader's Welcome leaves it zero;
	// defaultHeartbeat before any Welcome.
	defaultLease     = 10 * time.Second
	defaultHeartbeat = time.Second
	// leaseCheckInterval is how often watchLease looks at the lease.
	leaseCheckInterval = 25 * time.Millisecond
	// directoryPoll is how often run looks for a coordinator in the gossip
	// directory while it knows none.
	directoryPoll = 50 * time.Millisecond
	// maxRedirectHops bounds the redirects run follows in a row without
	// backing off.
	maxRedirectHops = 3
	// maxOutbox bounds the messages queued for the leader.
	maxOutbox = 8192
	// maxControlMessage is the largest leader message a worker accepts: a
	// DeployTask of a map task carries every keyed blob of the checkpoint it
	// restores.
	maxControlMessage = 256 << 20
)

// outbox queues the messages tasks send to the leader. Tasks push from any
// goroutine without blocking; only the session goroutine takes and sends.
type outbox struct {
	mu      sync.Mutex
	q       []*transport.WorkerMessage
	wake    chan struct{} // capacity 1: "the queue is not empty"
	dropped prometheus.Counter
}

func newOutbox(dropped prometheus.Counter) *outbox {
	return &outbox{wake: make(chan struct{}, 1), dropped: dropped}
}

// push queues m for the leader. When the queue is full m is dropped: the
// leader times out the checkpoint an ack was for, and re-learns task phases
// from the next Hello.
func (o *outbox) push(m *transport.WorkerMessage) {
	o.mu.Lock()
	if len(o.q) >= maxOutbox {
		o.mu.Unlock()
		o.dropped.Inc()
		return
	}
	o.q = append(o.q, m)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// take removes and returns everything queued.
func (o *outbox) take() []*transport.WorkerMessage {
	o.mu.Lock()
	defer o.mu.Unlock()
	q := o.q
	o.q = nil
	return q
}

// requeue puts back messages a broken session could not send, ahead of
// anything queued since.
func (o *outbox) requeue(ms []*transport.WorkerMessage) {
	if len(ms) == 0 {
		return
	}
	o.mu.Lock()
	o.q = append(append([]*transport.WorkerMessage(nil), ms...), o.q...)
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// carried returns which of held, the messages queued before a Hello, the
// session that Hello opened may still send. Terminal statuses (FAILED,
// CANCELLED) always stay: Hello does not list ended tasks, so this is how the
// leader learns of them. Other statuses are superseded by Hello.running. Acks
// and declines stay only when the session is with the same leader in the same
// term as the previous one (sameLeader): a new leader has aborted the
// checkpoints they belong to.
func carried(held []*transport.WorkerMessage, sameLeader bool) []*transport.WorkerMessage {
	kept := held[:0]
	for _, m := range held {
		switch {
		case m.GetStatus() != nil && isTerminal(m.GetStatus().GetPhase()):
		case sameLeader && (m.GetAck() != nil || m.GetDecline() != nil):
		default:
			continue
		}
		kept = append(kept, m)
	}
	clear(held[len(kept):])
	return kept
}

func isTerminal(p transport.TaskPhase) bool {
	return p == transport.TaskPhase_TASK_PHASE_FAILED || p == transport.TaskPhase_TASK_PHASE_CANCELLED
}

// session keeps the worker's control session with the leader
// (docs/protocol.md "Control session") and enforces the lease: a worker that
// hears from no leader for lease_ms stops all its tasks.
type session struct {
	w      *Worker
	logger *slog.Logger

	// now reads the clock every lease deadline is measured on: monotonic,
	// never the wall clock (leaseclock.go). Tests may replace it before run.
	now leaseClock
	// lastHeard is when a leader last sent anything, or a coordinator that
	// knows no leader last answered (a reading of now; 0 = never); lease and
	// heartbeat are those of the last Welcome (nanoseconds). Written by the
	// session goroutines, read by watchLease.
	lastHeard atomic.Int64
	lease     atomic.Int64
	heartbeat atomic.Int64

	// leaderID and term are those of the last Welcome; only the session
	// goroutine uses them.
	leaderID string
	term     uint64
}

func newSession(w *Worker) *session {
	return &session{w: w, logger: w.logger.With("component", "session"), now: monotonicClock()}
}

// run opens sessions until ctx ends: to the leader a follower named, else to
// the last leader, else to the coordinators gossip knows in turn. Between
// attempts it waits a capped exponential backoff with jitter, reset by every
// Welcome, except that a leader a coordinator names is dialled at once (up to
// maxRedirectHops in a row, so that coordinators with stale views cannot
// make it spin), unless it is the leader whose session just failed; a
// coordinator that names that one has not seen the election yet, and is asked
// again after the shortest wait. Tasks keep running while it looks, until the
// lease expires.
func (s *session) run(ctx context.Context) {
	bo := newBackoff(s.w.cfg.SessionBackoffMin, s.w.cfg.SessionBackoffMax)
	var redirect, lastLeader, failed string
	turn, hops := 0, 0
	for ctx.Err() == nil {
		addr := redirect
		redirect = ""
		if addr == "" && lastLeader != "" {
			addr, lastLeader = lastLeader, ""
		}
		if addr == "" {
			coords := s.w.coordinators()
			if len(coords) == 0 {
				// Only the local gossip directory is asked: no need to back off.
				s.logger.Debug("no coordinator known yet")
				if !sleepCtx(ctx, directoryPoll) {
					return
				}
				continue
			}
			addr = coords[turn%len(coords)]
			turn++
			if addr == failed && len(coords) > 1 {
				// Gossip may not have seen it die yet: ask another first.
				addr = coords[turn%len(coords)]
				turn++
			}
		}
		end, err := s.runOnce(ctx, addr)
		if end.welcomed || end.held {
			bo.reset()
			hops = 0
		}
		switch {
		case end.welcomed:
			lastLeader = addr
			failed = addr // its session ended: do not rush back to it
		case end.redirect == "":
			failed = addr
		}
		if end.redirect != "" && end.redirect != addr {
			redirect = end.redirect
		}
		if ctx.Err() != nil {
			return
		}
		s.logger.Info("control session ended", "coordinator", addr, "redirect", end.redirect, "err", err)
		if redirect != "" && redirect != failed && hops < maxRedirectHops {
			hops++
			continue
		}
		hops = 0
		wait := bo.next
		if end.redirect != "" {
			// A live coordinator answered, naming a leader that just failed:
			// it will know the new one within an election, so retry soon.
			wait = bo.first
		}
		if !sleepCtx(ctx, wait()) {
			return
		}
	}
}

// sessionEnd says how one session with a coordinator ended.
type sessionEnd struct {
	// redirect is the leader's RPC address a coordinator named.
	redirect string
	// welcomed: the coordinator was the leader and opened a session.
	welcomed bool
	// held: the coordinator knew no leader and kept the worker's lease
	// renewed until it ended (see leaderless).
	held bool
}

// runOnce runs one session with the coordinator at addr until it breaks or
// ctx ends, and says how it ended.
func (s *session) runOnce(ctx context.Context, addr string) (sessionEnd, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(clientCredentials(s.w.cfg.TLS, tlsutil.RoleCoordinator)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxControlMessage)))
	if err != nil {
		return sessionEnd{}, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	// The stream outlives ctx by up to drainTimeout so that a stopping worker
	// can still send what it queued; cancel ends it on every return path.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	// Until the Welcome, the attempt is bounded by helloTimeout and by ctx.
	helloTimer := time.AfterFunc(helloTimeout, cancel)
	stopOnCtx := context.AfterFunc(ctx, cancel)
	first, err := s.hello(sctx, conn, addr)
	stopOnCtx()
	timedOut := !helloTimer.Stop()
	wel := first.msg.GetWelcome()
	if err != nil || timedOut || wel == nil {
		// No leader took the session: what was queued waits for the next one.
		s.w.outbox.requeue(first.held)
	}
	if timedOut {
		return sessionEnd{}, fmt.Errorf("no answer to hello within %s", helloTimeout)
	}
	if err != nil {
		return sessionEnd{}, err
	}
	stream := first.stream
	if nl := first.msg.GetNotLeader(); nl != nil {
		if noLeader(nl) {
			return s.leaderless(ctx, cancel, stream, addr, first.running)
		}
		return sessionEnd{redirect: nl.GetLeaderRpcAddr()}, &notLeaderError{id: nl.GetLeaderId(), addr: nl.GetLeaderRpcAddr()}
	}
	if wel == nil {
		return sessionEnd{}, fmt.Errorf("protocol error: first answer to hello is %T, want welcome or not_leader", first.msg.GetMsg())
	}
	sameLeader := wel.GetLeaderId() == s.leaderID && wel.GetTerm() == s.term
	s.leaderID, s.term = wel.GetLeaderId(), wel.GetTerm()
	s.w.outbox.requeue(carried(first.held, sameLeader))

	lease := time.Duration(wel.GetLeaseMs()) * time.Millisecond
	if lease <= 0 {
		lease = defaultLease
	}
	hb := time.Duration(wel.GetHeartbeatMs()) * time.Millisecond
	if hb <= 0 || hb >= lease {
		hb = lease / 3
	}
	s.lease.Store(int64(lease))
	s.heartbeat.Store(int64(hb))
	now := int64(s.now())
	s.lastHeard.Store(now)
	var lastRecv atomic.Int64 // a reading of s.now
	lastRecv.Store(now)
	log := s.logger.With("leader", wel.GetLeaderId(), "term", wel.GetTerm())
	log.Info("control session open", "coordinator", addr, "lease", lease, "heartbeat", hb, "running", first.running)
	s.w.metrics.sessionOpen.Set(1)
	defer s.w.metrics.sessionOpen.Set(0)

	// The receiver is the only goroutine that calls Recv; runOnce is the only
	// one that calls Send.
	recvErr := make(chan error, 1)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if nl := m.GetNotLeader(); nl != nil {
				recvErr <- &notLeaderError{id: nl.GetLeaderId(), addr: nl.GetLeaderRpcAddr()}
				return
			}
			t := int64(s.now())
			s.lastHeard.Store(t)
			lastRecv.Store(t)
			s.dispatch(log, m)
		}
	}()
	defer func() { cancel(); <-recvDone }()

	send := func(ms []*transport.WorkerMessage) error {
		for i, m := range ms {
			if err := stream.Send(m); err != nil {
				s.w.outbox.requeue(ms[i:])
				return fmt.Errorf("send: %w", err)
			}
		}
		return nil
	}
	ticker := time.NewTicker(hb)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			drain := time.AfterFunc(drainTimeout, cancel)
			err := send(s.w.outbox.take())
			drain.Stop()
			if err == nil {
				_ = stream.CloseSend()
			}
			return sessionEnd{welcomed: true}, ctx.Err()
		case err := <-recvErr:
			var nl *notLeaderError
			if errors.As(err, &nl) {
				return sessionEnd{redirect: nl.addr, welcomed: true}, err
			}
			return sessionEnd{welcomed: true}, fmt.Errorf("receive: %w", err)
		case <-ticker.C:
			if silent := s.now() - time.Duration(lastRecv.Load()); silent > lease {
				return sessionEnd{welcomed: true}, fmt.Errorf("leader silent for %s (lease %s)", silent.Round(time.Millisecond), lease)
			}
			if err := stream.Send(heartbeatMsg()); err != nil {
				return sessionEnd{welcomed: true}, fmt.Errorf("send heartbeat: %w", err)
			}
		case <-s.w.outbox.wake:
			if err := send(s.w.outbox.take()); err != nil {
				return sessionEnd{welcomed: true}, err
			}
		}
	}
}

func heartbeatMsg() *transport.WorkerMessage {
	return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{UnixNano: time.Now().UnixNano()}}}
}

// noLeader reports whether a NotLeader answer says that the coordinator knows
// no leader at all (rather than naming one, with or without its address).
func noLeader(nl *transport.NotLeader) bool {
	return nl.GetLeaderId() == "" && nl.GetLeaderRpcAddr() == ""
}

// leaderless keeps the stream of a coordinator that answered Hello with
// NotLeader naming no leader: the cluster has lost its quorum or is electing.
// With no leader nobody can commit a new attempt of a job, so it is safe to
// run on: each such answer renews the lease, and tasks keep running while no
// checkpoint can complete. The worker heartbeats at the last leader's
// interval; the coordinator answers each with NotLeader, naming no leader
// (a renewal) or the leader once there is one, which ends the stream with
// that redirect. A coordinator silent for the lease ends it too; the lease
// then runs out unless another coordinator renews it. Messages queued for
// the leader wait for the next session.
func (s *session) leaderless(ctx context.Context, cancel context.CancelFunc, stream grpc.BidiStreamingClient[transport.WorkerMessage, transport.CoordinatorMessage], addr string, running int) (sessionEnd, error) {
	s.renew()
	lastRecv := s.now()
	lease := orDefault(time.Duration(s.lease.Load()), defaultLease)
	hb := orDefault(time.Duration(s.heartbeat.Load()), defaultHeartbeat)
	s.w.metrics.leaderless.Set(1)
	defer s.w.metrics.leaderless.Set(0)
	s.logger.Warn("coordinator knows no leader: its answers renew the lease until one is elected; checkpoints wait",
		"coordinator", addr, "running", running, "heartbeat", hb)

	// The receiver is the only goroutine that calls Recv; it ends with the
	// stream, which cancel ends on every return path.
	answers := make(chan *transport.NotLeader, 1)
	recvErr := make(chan error, 1)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			nl := m.GetNotLeader()
			if nl == nil {
				recvErr <- fmt.Errorf("protocol error: %T from a coordinator that knows no leader, want not_leader", m.GetMsg())
				return
			}
			select {
			case answers <- nl:
			case <-stream.Context().Done():
				return
			}
		}
	}()
	defer func() { cancel(); <-recvDone }()

	ticker := time.NewTicker(hb)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return sessionEnd{held: true}, ctx.Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return sessionEnd{held: true}, errors.New("coordinator ended the stream")
			}
			return sessionEnd{held: true}, fmt.Errorf("receive: %w", err)
		case nl := <-answers:
			if !noLeader(nl) {
				s.logger.Info("leader known again", "leader", nl.GetLeaderId(), "leader_rpc_addr", nl.GetLeaderRpcAddr())
				return sessionEnd{redirect: nl.GetLeaderRpcAddr(), held: true}, &notLeaderError{id: nl.GetLeaderId(), addr: nl.GetLeaderRpcAddr()}
			}
			s.renew()
			lastRecv = s.now()
		case <-ticker.C:
			if silent := s.now() - lastRecv; silent > lease {
				return sessionEnd{held: true}, fmt.Errorf("coordinator without leader silent for %s (lease %s)", silent.Round(time.Millisecond), lease)
			}
			if err := stream.Send(heartbeatMsg()); err != nil {
				return sessionEnd{held: true}, fmt.Errorf("send heartbeat: %w", err)
			}
		}
	}
}

// renew renews the lease: a leader, or a coordinator that knows none, answered.
func (s *session) renew() { s.lastHeard.Store(int64(s.now())) }

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// notLeaderError is a coordinator's NotLeader answer: at the start of a
// session from a follower, or later from a leader that stepped down.
type notLeaderError struct{ id, addr string }

func (e *notLeaderError) Error() string {
	return fmt.Sprintf("not the leader (leader %q at %q)", e.id, e.addr)
}

// helloAnswer is the stream of a new session and the leader's first message,
// with the messages queued before the Hello (set on every path: the caller
// decides which of them to send or keep).
type helloAnswer struct {
	stream  grpc.BidiStreamingClient[transport.WorkerMessage, transport.CoordinatorMessage]
	msg     *transport.CoordinatorMessage
	running int
	held    []*transport.WorkerMessage
}

// hello opens the session stream on conn, takes what is queued for the
// leader, sends Hello with the tasks the worker runs now and reads the first
// answer. What was queued is taken before the task list is read, so Hello is
// at least as new as any status held back.
func (s *session) hello(ctx context.Context, conn *grpc.ClientConn, addr string) (helloAnswer, error) {
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		return helloAnswer{}, fmt.Errorf("open session to %s: %w", addr, err)
	}
	held := s.w.outbox.take()
	hello := &transport.Hello{
		WorkerId: s.w.cfg.ID,
		DataAddr: s.w.DataAddr(),
		Slots:    int32(s.w.cfg.Slots),
		Running:  s.w.tasks.running(),
	}
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: hello}}); err != nil {
		return helloAnswer{held: held}, fmt.Errorf("send hello: %w", err)
	}
	first, err := stream.Recv()
	if err != nil {
		return helloAnswer{held: held}, fmt.Errorf("await welcome: %w", err)
	}
	return helloAnswer{stream: stream, msg: first, running: len(hello.Running), held: held}, nil
}

// dispatch hands one leader message to the task manager. It runs on the
// session's receive goroutine and must not block: the task manager only
// records, starts or signals tasks.
func (s *session) dispatch(log *slog.Logger, m *transport.CoordinatorMessage) {
	switch msg := m.GetMsg().(type) {
	case *transport.CoordinatorMessage_Heartbeat:
	case *transport.CoordinatorMessage_Deploy:
		s.w.tasks.deploy(msg.Deploy)
	case *transport.CoordinatorMessage_Cancel:
		s.w.tasks.cancel(msg.Cancel)
	case *transport.CoordinatorMessage_Trigger:
		s.w.tasks.trigger(msg.Trigger)
	case *transport.CoordinatorMessage_Complete:
		s.w.tasks.complete(msg.Complete)
	case *transport.CoordinatorMessage_Welcome:
		log.Warn("ignoring a second welcome on an open session")
	default:
		log.Warn("ignoring unknown message from leader", "type", fmt.Sprintf("%T", m.GetMsg()))
	}
}

// leaseExpired reports whether no leader has been heard for longer than the
// lease, measured on s.now, and for how long none has. Before any leader was
// heard it is false: no task can have been deployed.
func (s *session) leaseExpired() (silent, lease time.Duration, expired bool) {
	last := s.lastHeard.Load()
	lease = time.Duration(s.lease.Load())
	if last == 0 || lease == 0 {
		return 0, lease, false
	}
	silent = s.now() - time.Duration(last)
	return silent, lease, silent > lease
}

// watchLease stops every task once no leader has been heard for the lease, so
// that a partitioned worker never goes on as a zombie while the leader
// restarts its job elsewhere. It returns when ctx ends.
func (s *session) watchLease(ctx context.Context) {
	t := time.NewTicker(leaseCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		silent, lease, expired := s.leaseExpired()
		if !expired {
			continue
		}
		if n := s.w.tasks.stopLive(fmt.Sprintf("lease expired: no leader heard for %s", silent.Round(time.Millisecond))); n > 0 {
			s.w.metrics.leaseExpiries.Inc()
			s.logger.Error("LEASE EXPIRED: no leader heard within the lease; stopped all tasks", "silent", silent, "lease", lease, "tasks", n)
		}
	}
}
