package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
// Each pushed message is numbered, so that a session can tell the messages
// queued before its Hello (up to the mark Hello took) from those queued after.
type outbox struct {
	mu      sync.Mutex
	q       []queued      // requeued messages (seq 0) first, then by seq
	seq     uint64        // of the last message pushed
	wake    chan struct{} // capacity 1: "the queue is not empty"
	dropped prometheus.Counter
}

type queued struct {
	seq uint64
	m   *transport.WorkerMessage
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
	o.seq++
	o.q = append(o.q, queued{seq: o.seq, m: m})
	o.mu.Unlock()
	o.poke()
}

func (o *outbox) poke() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// mark returns the number of the last message pushed: takeUpTo(mark) later
// takes what was queued until now.
func (o *outbox) mark() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.seq
}

// take removes and returns everything queued.
func (o *outbox) take() []*transport.WorkerMessage { return o.takeUpTo(^uint64(0)) }

// takeUpTo removes and returns the messages queued up to mark, and any
// requeued ones (older than every mark a session still holds: only the
// session goroutine requeues, between sessions or in one).
func (o *outbox) takeUpTo(mark uint64) []*transport.WorkerMessage {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for n < len(o.q) && o.q[n].seq <= mark {
		n++
	}
	out := make([]*transport.WorkerMessage, n)
	for i, e := range o.q[:n] {
		out[i] = e.m
	}
	o.q = slices.Delete(o.q, 0, n)
	return out
}

// requeue puts back messages a broken session could not send, ahead of
// anything queued since.
func (o *outbox) requeue(ms []*transport.WorkerMessage) {
	if len(ms) == 0 {
		return
	}
	o.mu.Lock()
	back := make([]queued, len(ms), len(ms)+len(o.q))
	for i, m := range ms {
		back[i] = queued{m: m}
	}
	o.q = append(back, o.q...)
	o.mu.Unlock()
	o.poke()
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
	// lastHeard is when a leader last sent anything, or until when a
	// leaderless hold has shown that no coordinator led (a reading of now;
	// 0 = never); lease and heartbeat are those of the last Welcome
	// (nanoseconds). Written by the session goroutines, read by watchLease.
	lastHeard atomic.Int64
	lease     atomic.Int64
	heartbeat atomic.Int64

	// leaderID and term are those of the last Welcome; only the session
	// goroutine uses them.
	leaderID string
	term     uint64

	// seen is when each coordinator (RPC address) was last listed by
	// gossip, answered, or was named leader; ids are their ids (gossip
	// names). A leaderless hold must account for every coordinator seen
	// within twice the lease (refreshSeen), also one gossip has since declared dead: from a
	// minority partition, the majority looks dead. Only the session
	// goroutine uses them.
	seen map[string]time.Duration
	ids  map[string]string
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
// coordinator that names that one may not have seen the election yet, and is
// asked again after the shortest wait, before the leader it names is, for up
// to a lease after that failure. A leaderless hold that found the leader hands
// over the session it opened, which run goes on with at once. Tasks keep
// running while it looks, until the lease expires, so the backoff grows only
// once every coordinator gossip knows was tried (a dead one refuses at once,
// and must not delay asking a live one), and no wait is longer than a
// quarter of the lease.
func (s *session) run(ctx context.Context) {
	bo := newBackoff(s.w.cfg.SessionBackoffMin, s.w.cfg.SessionBackoffMax)
	var redirect, lastLeader, failed string
	var failedAt time.Time // when failed's session failed
	misses := 0            // attempts that failed since the backoff last grew
	lastEnded := ""        // the coordinator and redirect of the last session logged
	askedAgain := false    // the last attempt asked a coordinator again instead of the leader it named
	var next *opened       // a session with the leader that a hold handed over
	defer func() {
		if next != nil {
			next.close()
		}
	}()
	turn, hops := 0, 0
	for ctx.Err() == nil {
		var addr string
		var end sessionEnd
		var err error
		if next != nil {
			o := next
			next = nil
			addr = o.addr
			end, err = s.serve(ctx, o)
		} else {
			addr = redirect
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
			end, err = s.runOnce(ctx, addr)
		}
		if end.welcomed || end.held {
			bo.reset()
			hops, misses = 0, 0
		}
		switch {
		case end.welcomed:
			lastLeader = addr
			failed, failedAt = addr, time.Now() // its session ended: do not rush back to it
		case end.next != nil:
			// The hold ended because a probe found the leader.
		case end.redirect == "":
			failed, failedAt = addr, time.Now()
		}
		if end.redirect != "" && end.redirect != addr {
			redirect = end.redirect
		}
		if ctx.Err() != nil {
			if end.next != nil {
				end.next.close()
			}
			return
		}
		// A follower that has not seen the election yet is asked again
		// every few tens of milliseconds: the same answer twice in a row
		// is logged once. (The re-asks alternate with dials of the leader
		// it names, so during an election about every other attempt is
		// logged.)
		level := slog.LevelInfo
		if ended := addr + " " + end.redirect; end.redirect != "" && ended == lastEnded {
			level = slog.LevelDebug
		} else {
			lastEnded = ended
		}
		s.logger.Log(ctx, level, "control session ended", "coordinator", addr, "redirect", end.redirect, "err", err)
		if end.next != nil {
			next, redirect = end.next, ""
			continue
		}
		if redirect != "" && redirect != failed && hops < maxRedirectHops {
			hops++
			continue
		}
		hops = 0
		lease := orDefault(time.Duration(s.lease.Load()), defaultLease)
		wait := bo.next
		if misses++; misses < len(s.w.coordinators()) {
			wait = bo.first // others not tried yet in this round
		} else {
			misses = 0
		}
		if end.redirect != "" {
			// A live coordinator answered, naming a leader that just failed:
			// it will know the new one, or that there is none and hold the
			// worker, within an election, so ask it again soon, before the
			// leader it names, which is dialled every other time: it may
			// be dead, or only have ended the session (a hold it ended on
			// becoming leader).
			wait = bo.first
			if end.redirect == failed && time.Since(failedAt) < lease && !askedAgain {
				redirect, askedAgain = addr, true
			} else {
				askedAgain = false
			}
		}
		if !sleepCtx(ctx, min(wait(), lease/4)) {
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
	// held: the coordinator knew no leader and held the worker's stream
	// until it ended (see leaderless).
	held bool
	// next is the session a probe opened with the leader during the hold,
	// for run to go on with.
	next *opened
}

// opened is a control stream whose Hello a coordinator has answered.
type opened struct {
	addr   string
	conn   *grpc.ClientConn
	cancel context.CancelFunc // ends the stream
	helloAnswer
}

// close ends the stream and the connection.
func (o *opened) close() {
	o.cancel()
	_ = o.conn.Close()
}

// open dials addr, sends Hello and reads the first answer, within timeout
// and while ctx lasts. The stream it returns outlives ctx (a stopping worker
// can still send what it queued, for up to drainTimeout); close ends it.
// With probe, open also reports whether every connection attempt was
// refused (nothing listens at addr).
func (s *session) open(ctx context.Context, addr string, timeout time.Duration, probe bool) (*opened, bool, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(clientCredentials(s.w.cfg.TLS, tlsutil.RoleCoordinator)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxControlMessage)),
	}
	var dials dialRecord
	if probe {
		opts = append(opts, grpc.WithContextDialer(dials.dial))
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, false, fmt.Errorf("dial %s: %w", addr, err)
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	// Until the first answer, the attempt is bounded by timeout and by ctx.
	timer := time.AfterFunc(timeout, cancel)
	stopOnCtx := context.AfterFunc(ctx, cancel)
	first, err := s.hello(sctx, conn, addr)
	stopOnCtx()
	timedOut := !timer.Stop()
	if timedOut || err != nil {
		cancel()
		_ = conn.Close()
		if timedOut {
			err = fmt.Errorf("no answer to hello within %s", timeout)
		}
		return nil, dials.refused(), err
	}
	return &opened{addr: addr, conn: conn, cancel: cancel, helloAnswer: first}, false, nil
}

// dialRecord counts a probe's connection attempts and those refused.
type dialRecord struct {
	mu              sync.Mutex
	tries, refusals int
}

func (d *dialRecord) dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	d.mu.Lock()
	d.tries++
	if errors.Is(err, syscall.ECONNREFUSED) {
		d.refusals++
	}
	d.mu.Unlock()
	return c, err
}

// refused reports that there were connection attempts and all were refused.
func (d *dialRecord) refused() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.tries > 0 && d.refusals == d.tries
}

// runOnce runs one session with the coordinator at addr until it breaks or
// ctx ends, and says how it ended.
func (s *session) runOnce(ctx context.Context, addr string) (sessionEnd, error) {
	o, _, err := s.open(ctx, addr, helloTimeout, false)
	if err != nil {
		return sessionEnd{}, err
	}
	return s.serve(ctx, o)
}

// serve runs the session o opened, by the coordinator's first answer: a
// session with the leader, a leaderless hold, or a redirect. It returns when
// the session breaks or ctx ends, and closes o.
func (s *session) serve(ctx context.Context, o *opened) (sessionEnd, error) {
	defer o.close()
	addr, stream := o.addr, o.stream
	if nl := o.msg.GetNotLeader(); nl != nil {
		if noLeader(nl) {
			return s.leaderless(ctx, o)
		}
		s.noteSeen(nl.GetLeaderRpcAddr())
		return sessionEnd{redirect: nl.GetLeaderRpcAddr()}, &notLeaderError{id: nl.GetLeaderId(), addr: nl.GetLeaderRpcAddr()}
	}
	wel := o.msg.GetWelcome()
	if wel == nil {
		return sessionEnd{}, fmt.Errorf("protocol error: first answer to hello is %T, want welcome or not_leader", o.msg.GetMsg())
	}
	sameLeader := wel.GetLeaderId() == s.leaderID && wel.GetTerm() == s.term
	s.leaderID, s.term = wel.GetLeaderId(), wel.GetTerm()
	// What was queued before the Hello: Hello supersedes part of it.
	s.w.outbox.requeue(carried(s.w.outbox.takeUpTo(o.mark), sameLeader))
	s.noteSeen(addr)

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
	s.expireLease()
	now := int64(s.now())
	s.lastHeard.Store(now)
	var lastRecv atomic.Int64 // a reading of s.now
	lastRecv.Store(now)
	log := s.logger.With("leader", wel.GetLeaderId(), "term", wel.GetTerm())
	log.Info("control session open", "coordinator", addr, "lease", lease, "heartbeat", hb, "running", o.running)
	s.w.metrics.sessionOpen.Set(1)
	defer s.w.metrics.sessionOpen.Set(0)

	// The receiver is the only goroutine that calls Recv; serve is the only
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
			// Read after a freeze longer than the lease, a message the
			// leader sent before it must not revive the tasks it has
			// restarted elsewhere since: renew ends the lease first.
			lastRecv.Store(s.renew())
			s.dispatch(log, m)
		}
	}()
	defer func() { o.cancel(); <-recvDone }()

	// A leader that takes state chunks gets a large ack's inline state in
	// them: it refuses any message over 4 MiB. An older leader takes the
	// ack whole. Heartbeats go on between chunks, so that 64 MiB of state
	// on a slow link does not look like a silent worker.
	chunks := wel.GetStateChunks()
	lastBeat := time.Now()
	send := func(ms []*transport.WorkerMessage) error {
		for i, m := range ms {
			parts := []*transport.WorkerMessage{m}
			if chunks {
				parts = transport.SplitAck(m)
			}
			for j, p := range parts {
				if j > 0 && time.Since(lastBeat) >= hb {
					if err := stream.Send(heartbeatMsg()); err != nil {
						s.w.outbox.requeue(ms[i:])
						return fmt.Errorf("send heartbeat: %w", err)
					}
					lastBeat = time.Now()
				}
				if err := stream.Send(p); err != nil {
					// The whole message goes again, on the next session.
					s.w.outbox.requeue(ms[i:])
					return fmt.Errorf("send: %w", err)
				}
			}
		}
		return nil
	}
	ticker := time.NewTicker(hb)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			drain := time.AfterFunc(drainTimeout, o.cancel)
			err := send(s.w.outbox.take())
			drain.Stop()
			if err == nil {
				_ = stream.CloseSend()
			}
			return sessionEnd{welcomed: true}, ctx.Err()
		case err := <-recvErr:
			var nl *notLeaderError
			if errors.As(err, &nl) {
				s.noteSeen(nl.addr)
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
			lastBeat = time.Now()
			// Keep the coordinators a later hold must account for current.
			s.refreshSeen()
			s.noteSeen(addr)
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

// leaderless keeps the stream of a coordinator X that answered Hello with
// NotLeader naming no leader: the cluster has lost its quorum, is electing,
// or X is cut off from the majority, which may have elected a leader X
// cannot see. The worker heartbeats X at the last leader's interval; X
// answers each with NotLeader naming no leader, or the leader once it knows
// one, which ends the stream with that redirect.
//
// Meanwhile the worker asks every other coordinator it knows (gossip, and
// those seen within twice the lease (refreshSeen), so that a majority gossip
// has declared dead still counts) every probeInterval, concurrently, with the same Hello. One
// that welcomes the worker is the leader: the hold ends and run goes on with
// that session, with the tasks untouched. One that names a leader is asked
// in turn.
//
// The lease is renewed only as far as every coordinator has been shown not
// to lead: to the oldest of the latest times each answered NotLeader (naming
// no leader, or a leader other than itself) or refused the connection
// (nothing listens: no leader runs there). A coordinator that cannot be
// reached, or does not answer within helloTimeout, may lead a majority that
// is restarting the worker's jobs: while it stays so, the lease runs out and
// the tasks stop, as they would on a worker cut off from every coordinator.
// With no leader anywhere (a quorum loss: the others refuse, or answer that
// they know no leader either) nobody can commit a new attempt of a job, so
// the tasks run on while no checkpoint can complete.
//
// A hanging probe never delays the heartbeats to X, nor the switch to a
// leader another probe found. X silent for the lease ends the hold too.
// Messages queued for the leader wait for the next session.
func (s *session) leaderless(ctx context.Context, o *opened) (sessionEnd, error) {
	addr, stream := o.addr, o.stream
	lease := orDefault(time.Duration(s.lease.Load()), defaultLease)
	hb := orDefault(time.Duration(s.heartbeat.Load()), defaultHeartbeat)
	every := probeInterval(hb, lease)
	lastRecv := s.now()
	s.noteSeen(addr)
	h := &hold{
		s: s, addr: addr, log: s.logger.With("held_by", s.label(addr)),
		stale:     staleRounds * every,
		confirmed: map[string]time.Duration{addr: lastRecv},
		last:      make(map[string]probeResult),
		inflight:  make(map[string]time.Duration),
	}
	h.pr = newProber(ctx, s)
	defer s.w.metrics.leaderless.Set(0)
	h.log.Info("coordinator knows no leader: holding its stream and asking the other coordinators; the lease is renewed while none of them may lead",
		"running", o.running, "heartbeat", hb, "probe_interval", every)

	// The receiver is the only goroutine that calls Recv; it ends with the
	// stream, which serve's close ends on every return path.
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
	defer func() { o.cancel(); <-recvDone }()

	h.round()
	h.decide()
	ticker := time.NewTicker(hb)
	defer ticker.Stop()
	probes := time.NewTicker(every)
	defer probes.Stop()
	for {
		select {
		case <-ctx.Done():
			return h.finish(ctx, sessionEnd{held: true}, ctx.Err())
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return h.finish(ctx, sessionEnd{held: true}, errors.New("coordinator ended the stream"))
			}
			return h.finish(ctx, sessionEnd{held: true}, fmt.Errorf("receive: %w", err))
		case nl := <-answers:
			if !noLeader(nl) {
				h.log.Info("leader known again", "leader", nl.GetLeaderId(), "leader_rpc_addr", nl.GetLeaderRpcAddr())
				s.noteSeen(nl.GetLeaderRpcAddr())
				return h.finish(ctx, sessionEnd{redirect: nl.GetLeaderRpcAddr(), held: true}, &notLeaderError{id: nl.GetLeaderId(), addr: nl.GetLeaderRpcAddr()})
			}
			lastRecv = s.now()
			h.confirmed[addr] = lastRecv
			s.noteSeen(addr)
			h.decide()
		case <-h.pr.wake:
			if next := h.collect(); next != nil {
				return h.finish(ctx, sessionEnd{held: true, next: next}, errLeaderFound)
			}
			h.decide()
		case <-ticker.C:
			if silent := s.now() - lastRecv; silent > lease {
				return h.finish(ctx, sessionEnd{held: true}, fmt.Errorf("coordinator without leader silent for %s (lease %s)", silent.Round(time.Millisecond), lease))
			}
			if err := stream.Send(heartbeatMsg()); err != nil {
				return h.finish(ctx, sessionEnd{held: true}, fmt.Errorf("send heartbeat: %w", err))
			}
			h.decide()
		case <-probes.C:
			h.round()
		}
	}
}

// staleRounds is how many probe rounds a coordinator may stay unconfirmed
// before a hold reports that it blocks the renewal of the lease.
const staleRounds = 3

// probeInterval is how often a hold asks the other coordinators: every other
// heartbeat, and at least four times a lease, so that renewals, which wait
// for every coordinator's answer, come well within it. Each probe is a new
// connection: fresh enough to tell a refused one, cheap enough for the
// seconds an election lasts; a long quorum loss costs a connection per
// other coordinator and interval.
func probeInterval(hb, lease time.Duration) time.Duration {
	return max(min(2*hb, lease/4), time.Millisecond)
}

// errLeaderFound ends a leaderless hold whose probe found the leader.
var errLeaderFound = errors.New("another coordinator leads: leaving the hold for a session with it")

// hold is the state of one leaderless hold (see leaderless). Only the
// session goroutine uses it.
type hold struct {
	s    *session
	addr string // of the coordinator that holds the worker
	log  *slog.Logger
	pr   *prober
	// stale is how long a coordinator may go unconfirmed before the hold
	// reports that it blocks the renewal (it blocks it anyway).
	stale time.Duration

	// peers are the other coordinators to account for: those known at the
	// last round, and any named leader since.
	peers []string
	// confirmed is, by coordinator, the last time it was shown not to lead
	// (a reading of s.now); last is the last verdict of a probe of each.
	confirmed map[string]time.Duration
	last      map[string]probeResult
	inflight  map[string]time.Duration // when each probe not back yet started; one per coordinator
	// state is the decision last logged: "renewing", or the coordinators
	// that block the renewal; "" before the first.
	state string
}

// round asks every other coordinator known now, except those still being
// asked.
func (h *hold) round() {
	h.peers = h.peers[:0]
	for _, a := range h.s.known() {
		if a != h.addr {
			h.peers = append(h.peers, a)
		}
	}
	for _, a := range h.peers {
		h.ask(a)
	}
}

func (h *hold) ask(addr string) {
	if _, ok := h.inflight[addr]; !ok {
		h.inflight[addr] = h.s.now()
		h.pr.start(addr)
	}
}

// collect records the probes that are back and returns a session a leader
// opened, if one did (another one is closed: the first is kept).
func (h *hold) collect() *opened {
	var next *opened
	for _, r := range h.pr.take() {
		delete(h.inflight, r.addr)
		if r.verdict != probeWelcome {
			h.record(r)
			continue
		}
		h.s.noteSeen(r.addr)
		if next != nil {
			r.o.close()
			continue
		}
		next = r.o
		h.handOver(next)
	}
	return next
}

// handOver logs the switch from the hold to the session next opened.
func (h *hold) handOver(next *opened) {
	wel := next.msg.GetWelcome()
	h.log.Info("a probe found the leader: leaving the hold for a session with it, tasks untouched",
		"leader", h.s.label(next.addr), "leader_id", wel.GetLeaderId(), "term", wel.GetTerm())
}

// record takes in the verdict of a probe other than a welcome.
func (h *hold) record(r probeResult) {
	s := h.s
	if r.verdict == probeNotLeader {
		s.noteSeen(r.addr)
		leader := r.leaderAddr
		if leader == "" && r.leaderID != "" {
			leader = s.addrOf(r.leaderID)
		}
		switch {
		case r.leaderID != "" && (leader == r.addr || r.leaderID == s.ids[r.addr]):
			// It names itself: it leads, and takes sessions once its
			// leader loop runs. Asked again at the next round.
			r.verdict = probeLeading
		case leader != "" && leader != h.addr:
			// A leader exists: ask it now, and account for it.
			s.noteSeen(leader)
			if !slices.Contains(h.peers, leader) {
				h.peers = append(h.peers, leader)
			}
			h.ask(leader)
		}
	}
	if r.verdict == probeDown {
		s.noteSeen(r.addr)
	}
	h.last[r.addr] = r
	if r.confirms() {
		h.confirmed[r.addr] = max(h.confirmed[r.addr], r.at)
	}
}

// decide renews the lease as far as every coordinator has been shown not
// to lead, and logs and shows (coordflow_worker_leaderless) whether the hold
// renews it: while every other coordinator has confirmed recently (within
// h.stale).
func (h *hold) decide() {
	s := h.s
	now := s.now()
	until := h.confirmed[h.addr]
	var pending, blocked, reasons, notLeading, down []string
	for _, a := range h.peers {
		t, confirmed := h.confirmed[a]
		if confirmed {
			until = min(until, t)
		} else {
			until = 0
		}
		r, answered := h.last[a]
		started, asking := h.inflight[a]
		switch {
		case answered && r.confirms() && now-t <= h.stale:
			if r.verdict == probeDown {
				down = append(down, s.label(a))
			} else {
				notLeading = append(notLeading, s.label(a))
			}
		case !answered && asking && now-started <= h.stale:
			pending = append(pending, s.label(a))
		default:
			why := "not asked yet"
			switch {
			case answered && !r.confirms():
				why = r.why()
			case asking:
				why = fmt.Sprintf("no answer for %s", (now - started).Round(time.Millisecond))
			}
			blocked = append(blocked, s.label(a))
			reasons = append(reasons, s.label(a)+": "+why)
		}
	}
	if until > 0 {
		s.renewTo(until)
	}
	state := "renewing"
	switch {
	case len(blocked) > 0:
		state = "blocked by " + strings.Join(blocked, ", ")
	case len(pending) > 0:
		return // the first answers are not all back
	}
	if state == h.state {
		return
	}
	h.state = state
	if len(blocked) == 0 {
		s.w.metrics.leaderless.Set(1)
		h.log.Warn("no coordinator leads: the hold renews the lease; tasks run on, checkpoints wait",
			"not_leading", notLeading, "down", down)
		return
	}
	s.w.metrics.leaderless.Set(0)
	silent, lease, _ := s.leaseExpired()
	h.log.Warn("a coordinator this worker cannot confirm may lead: the hold does not renew the lease, which runs out unless that changes",
		"unconfirmed", reasons, "not_leading", notLeading, "down", down, "silent", silent.Round(time.Millisecond), "lease", lease)
}

// finish ends the hold with end and err: it stops the probes, and keeps a
// session a leader opened meanwhile for run to go on with (unless end has
// one, or the worker stops).
func (h *hold) finish(ctx context.Context, end sessionEnd, err error) (sessionEnd, error) {
	for _, r := range h.pr.stop() {
		if r.o == nil {
			continue
		}
		if end.next == nil && ctx.Err() == nil {
			end.next, err = r.o, errLeaderFound
			h.handOver(r.o)
			continue
		}
		r.o.close()
	}
	return end, err
}

// probeVerdict is what asking one coordinator showed.
type probeVerdict int

const (
	// probeNotLeader: it answered NotLeader naming no leader, or a leader
	// other than itself: it did not lead.
	probeNotLeader probeVerdict = iota + 1
	// probeDown: every connection attempt was refused: nothing listens
	// there, so no leader runs there.
	probeDown
	// probeUnknown: unreachable, no answer within helloTimeout, or an
	// error: a leader may run there.
	probeUnknown
	// probeLeading: it names itself leader, without an address (its leader
	// loop is starting).
	probeLeading
	// probeWelcome: it leads and opened a session.
	probeWelcome
)

// probeResult is the outcome of one probe.
type probeResult struct {
	addr    string
	verdict probeVerdict
	// at is when the probe started (a reading of s.now): a NotLeader
	// answer or a refusal shows the coordinator did not lead at some time
	// after it, so no leader it may become was elected before it.
	at                   time.Duration
	leaderID, leaderAddr string  // the leader a NotLeader named
	o                    *opened // the session, with probeWelcome
	err                  error
}

// confirms reports whether the probe showed that the coordinator did not lead.
func (r probeResult) confirms() bool { return r.verdict == probeNotLeader || r.verdict == probeDown }

// why says why a probe does not confirm.
func (r probeResult) why() string {
	switch {
	case r.verdict == probeLeading:
		return "leads, loop starting"
	case r.err != nil:
		return r.err.Error()
	}
	return "no answer"
}

// probe asks the coordinator at addr, with the worker's Hello, whether it
// leads. It runs on a goroutine of its own; it touches nothing of the session
// but the outbox's mark and the task list.
func (s *session) probe(ctx context.Context, addr string) probeResult {
	r := probeResult{addr: addr, at: s.now()}
	o, refused, err := s.open(ctx, addr, helloTimeout, true)
	switch {
	case err != nil && refused:
		r.verdict, r.err = probeDown, err
	case err != nil:
		r.verdict, r.err = probeUnknown, err
	case o.msg.GetWelcome() != nil:
		r.verdict, r.o = probeWelcome, o
	case o.msg.GetNotLeader() != nil:
		nl := o.msg.GetNotLeader()
		r.verdict, r.leaderID, r.leaderAddr = probeNotLeader, nl.GetLeaderId(), nl.GetLeaderRpcAddr()
		o.close()
	default:
		r.verdict, r.err = probeUnknown, fmt.Errorf("protocol error: first answer to hello is %T", o.msg.GetMsg())
		o.close()
	}
	return r
}

// prober runs the probes of one hold, each on a goroutine of its own, and
// collects their results.
type prober struct {
	s      *session
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{} // capacity 1: "results are waiting"
	mu     sync.Mutex
	done   []probeResult
}

func newProber(ctx context.Context, s *session) *prober {
	pctx, cancel := context.WithCancel(ctx)
	return &prober{s: s, ctx: pctx, cancel: cancel, wake: make(chan struct{}, 1)}
}

func (p *prober) start(addr string) {
	p.wg.Go(func() {
		r := p.s.probe(p.ctx, addr)
		p.mu.Lock()
		p.done = append(p.done, r)
		p.mu.Unlock()
		select {
		case p.wake <- struct{}{}:
		default:
		}
	})
}

// take returns the results that are back.
func (p *prober) take() []probeResult {
	p.mu.Lock()
	defer p.mu.Unlock()
	done := p.done
	p.done = nil
	return done
}

// stop ends the probes still running, waits for them and returns every
// result not taken yet.
func (p *prober) stop() []probeResult {
	p.cancel()
	p.wg.Wait()
	return p.take()
}

// renew renews the lease, a leader having answered, and returns when (a
// reading of s.now). An expired lease ends first (expireLease).
func (s *session) renew() int64 {
	s.expireLease()
	t := int64(s.now())
	s.lastHeard.Store(t)
	return t
}

// renewTo renews the lease as of t (a reading of s.now), unless it was
// renewed later already.
func (s *session) renewTo(t time.Duration) {
	s.expireLease()
	for {
		cur := s.lastHeard.Load()
		if int64(t) <= cur || s.lastHeard.CompareAndSwap(cur, int64(t)) {
			return
		}
	}
}

// refreshSeen records the coordinators gossip lists now, and forgets those
// not seen for forgetAfter: twice the lease, so that a coordinator is
// forgotten only after a lease that it blocked from being renewed has run
// out.
func (s *session) refreshSeen() {
	now := s.now()
	if s.seen == nil {
		s.seen, s.ids = make(map[string]time.Duration), make(map[string]string)
	}
	for addr, id := range s.w.coords.byAddr() {
		s.seen[addr] = now
		s.ids[addr] = id
	}
	forgetAfter := 2 * orDefault(time.Duration(s.lease.Load()), defaultLease)
	for addr, t := range s.seen {
		if now-t > forgetAfter {
			delete(s.seen, addr)
		}
	}
}

// noteSeen records that the coordinator at addr answered or was named.
func (s *session) noteSeen(addr string) {
	if addr == "" {
		return
	}
	if s.seen == nil {
		s.refreshSeen()
	}
	s.seen[addr] = s.now()
}

// known returns the RPC address of every coordinator gossip lists or that
// was seen within twice the lease, sorted.
func (s *session) known() []string {
	s.refreshSeen()
	return slices.Sorted(maps.Keys(s.seen))
}

// label names the coordinator at addr for logs: its id and address.
func (s *session) label(addr string) string {
	if id := s.ids[addr]; id != "" {
		return id + " (" + addr + ")"
	}
	return addr
}

// addrOf returns the RPC address of the coordinator with id, if known.
func (s *session) addrOf(id string) string {
	for addr, i := range s.ids {
		if i == id {
			return addr
		}
	}
	return ""
}

// byAddr returns the id (gossip name) of every coordinator in the
// directory, by RPC address.
func (d *coordDirectory) byAddr() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]string, len(d.rpc))
	for name, addr := range d.rpc {
		out[addr] = name
	}
	return out
}

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

// helloAnswer is the stream of a new session and the coordinator's first
// message, with the outbox's mark as of the Hello: the messages queued up to
// it are older than Hello's task list (see carried).
type helloAnswer struct {
	stream  grpc.BidiStreamingClient[transport.WorkerMessage, transport.CoordinatorMessage]
	msg     *transport.CoordinatorMessage
	running int
	mark    uint64
}

// hello opens the session stream on conn, sends Hello with the tasks the
// worker runs now and reads the first answer. The outbox is marked before
// the task list is read, so Hello is at least as new as any status queued up
// to the mark; nothing is taken from it (concurrent probes may send Hellos).
func (s *session) hello(ctx context.Context, conn *grpc.ClientConn, addr string) (helloAnswer, error) {
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		return helloAnswer{}, fmt.Errorf("open session to %s: %w", addr, err)
	}
	mark := s.w.outbox.mark()
	hello := &transport.Hello{
		WorkerId: s.w.cfg.ID,
		DataAddr: s.w.DataAddr(),
		Slots:    int32(s.w.cfg.Slots),
		Running:  s.w.tasks.running(),
	}
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: hello}}); err != nil {
		return helloAnswer{}, fmt.Errorf("send hello: %w", err)
	}
	first, err := stream.Recv()
	if err != nil {
		return helloAnswer{}, fmt.Errorf("await welcome: %w", err)
	}
	return helloAnswer{stream: stream, msg: first, running: len(hello.Running), mark: mark}, nil
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
	case *transport.CoordinatorMessage_Retarget:
		s.w.tasks.retarget(msg.Retarget)
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
		s.expireLease()
	}
}

// expireLease stops every task if the lease has expired. watchLease calls
// it every leaseCheckInterval, and every renewal first: after a freeze (a
// SIGSTOP, a stalled VM) longer than the lease, the renewal that a message
// read then would make must not come before the tick that ends the lease.
func (s *session) expireLease() {
	silent, lease, expired := s.leaseExpired()
	if !expired {
		return
	}
	if n := s.w.tasks.stopLive(fmt.Sprintf("lease expired: no leader heard for %s", silent.Round(time.Millisecond))); n > 0 {
		s.w.metrics.leaseExpiries.Inc()
		s.logger.Error("LEASE EXPIRED: no leader heard within the lease; stopped all tasks", "silent", silent, "lease", lease, "tasks", n)
	}
}
