package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// Session limits.
const (
	// helloTimeout is how long a new stream may take to send its Hello.
	helloTimeout = 10 * time.Second
	// sessionQueue bounds the messages waiting to be sent to one worker; a
	// worker that falls this far behind loses its session and reconnects.
	// The bound grows with the worker's slots (queuePerSlot): a checkpoint
	// of every job at once sends each task a message.
	sessionQueue = 512
	// sessionInbox bounds the worker messages a session has read and the
	// leader loop has not taken yet; a worker that gets this far ahead of a
	// stalled leader loop loses its session and reconnects. It grows with
	// the slots too.
	sessionInbox = 1024
	// queuePerSlot is how many messages per task slot either queue holds
	// at least: a trigger or completion and a deploy or cancel per task,
	// with room to spare.
	queuePerSlot = 4
	// maxQueuedState bounds the bytes of the messages a session has read
	// and the leader loop has not handled yet, in the session's inbox or
	// the loop's event queue: with bounds on the number of messages alone,
	// a worker could queue a thousand acks of 64 MiB each.
	maxQueuedState = 4 * fsm.MaxInlineStateBytes
	// maxSmallMessage bounds a heartbeat, task status or decline once
	// decoded, its reason cut to transport.MaxReasonBytes.
	maxSmallMessage = 64 << 10
	// maxAckFields bounds an ack without its inline state: offsets of a
	// source's partitions, a chain of state files, sink transactions.
	maxAckFields = 1 << 20
)

// Reasons a session ends, as its context's cause.
var (
	errLeadershipLost  = errors.New("leadership lost")
	errSessionReplaced = errors.New("replaced by a newer session of the same worker")
	errQueueFull       = errors.New("outgoing queue full: worker too slow")
	errInboxFull       = errors.New("incoming queue full: leader loop stalled")
	errProtocol        = errors.New("protocol violation")
	errSilent          = errors.New("worker silent")
)

// Why the leader loop did not send a message (leader.sendTo), besides the
// session's own end.
var (
	errNoSession = errors.New("the worker has no open session")
	errTermMoved = errors.New("raft term moved on: a deposed leader loop sends nothing")
)

// controlService is the Control gRPC service. Every coordd serves it; only
// the leader keeps sessions.
type controlService struct {
	transport.UnimplementedControlServer
	s *Server
}

// session is one worker's open control stream. The leader loop and the
// session's receive goroutine enqueue on out; the Session handler goroutine
// alone calls stream.Send. The session ends when ctx ends, which a newer
// session, a full queue, a broken stream or the end of the leader's term
// (ctx derives from the term's context) causes.
type session struct {
	worker   string
	dataAddr string
	inbox    int // capacity of receive's queue
	out      chan *transport.CoordinatorMessage
	ctx      context.Context
	// close ends the session with a cause, and calls the ended func that
	// newSession was given, if any.
	close func(cause error)
	// queued is the size, in bytes, of the messages receive has read and
	// the leader loop has not handled yet; maxQueued bounds it.
	queued    atomic.Int64
	maxQueued int64
}

// newSession returns the session of the worker hello names, ended with
// parent. Each close of it calls ended, if not nil, with the worker's id:
// the Session handler passes the leader's noteWorker, so that the loop
// looks at the worker's jobs as soon as the session ends, not when the
// handler's send, which may be blocked on the worker, returns and the
// close reaches the loop (liveSession).
func newSession(parent context.Context, hello *transport.Hello, ended func(worker string)) *session {
	ctx, cancel := context.WithCancelCause(parent)
	slots := int(min(max(hello.GetSlots(), 0), 1<<16))
	s := &session{
		worker:    hello.GetWorkerId(),
		dataAddr:  hello.GetDataAddr(),
		inbox:     max(sessionInbox, queuePerSlot*slots),
		out:       make(chan *transport.CoordinatorMessage, max(sessionQueue, queuePerSlot*slots)),
		ctx:       ctx,
		maxQueued: maxQueuedState,
	}
	s.close = func(cause error) {
		cancel(cause)
		if ended != nil {
			ended(s.worker)
		}
	}
	return s
}

// send enqueues msg without blocking. A full queue closes the session; send
// returns false then and once the session has ended.
func (s *session) send(msg *transport.CoordinatorMessage) bool {
	if s.ctx.Err() != nil {
		return false
	}
	select {
	case s.out <- msg:
		return true
	default:
		s.close(errQueueFull)
		return false
	}
}

// cause says why the session ended, mapping the end of the term's context to
// errLeadershipLost.
func (s *session) cause() error {
	err := context.Cause(s.ctx)
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return errLeadershipLost
	}
	return err
}

// sessionOpened registers a new session with the leader loop.
type sessionOpened struct {
	sess  *session
	hello *transport.Hello
}

// sessionClosed tells the leader loop that a session has ended.
type sessionClosed struct {
	sess *session
	err  error
}

// workerMessage carries a status, ack or decline from a session.
type workerMessage struct {
	sess *session
	msg  *transport.WorkerMessage
	size int64 // counted in sess.queued until the loop handles it
}

// Session serves one worker's control stream: Hello first, then on the leader
// Welcome and the session; elsewhere NotLeader naming the leader, or, while
// no leader is known, NotLeader naming none, held until one is (see
// holdLeaderless). It returns when the stream ends; the error tells the
// worker why.
func (c *controlService) Session(stream transport.Control_SessionServer) error {
	hello, err := recvHello(stream)
	if err != nil {
		return err
	}
	if err := c.authenticate(stream.Context(), hello); err != nil {
		c.s.logger.Warn("refusing control session", "worker", hello.GetWorkerId(), "err", err)
		return err
	}
	l := c.s.currentLeader()
	if l == nil || !c.s.isLeader() {
		return c.redirect(stream, hello.GetWorkerId())
	}
	sess := newSession(l.ctx, hello, l.noteWorker)
	sess.send(welcome(l))
	if !l.post(sess.ctx, sessionOpened{sess: sess, hello: hello}) {
		return c.redirect(stream, hello.GetWorkerId())
	}
	c.s.metrics.workerSessions.Inc()
	defer c.s.metrics.workerSessions.Dec()

	// The receive goroutine ends when the stream does, which is at the latest
	// when this handler returns.
	go receive(stream, sess, l)
	err = sendLoop(stream, sess)
	l.post(l.ctx, sessionClosed{sess: sess, err: err})
	return err
}

// authenticate checks, with TLS, that the stream's client holds the
// certificate of the worker its Hello names: a session is a worker's
// identity, and another worker's id would take over its tasks.
func (c *controlService) authenticate(ctx context.Context, hello *transport.Hello) error {
	if c.s.cfg.TLS == nil {
		return nil
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer information on the stream")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "the stream is not mutual TLS")
	}
	ident, err := tlsutil.PeerIdentity(info.State)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "%v", err)
	}
	if ident.Role != tlsutil.RoleWorker || ident.ID != hello.GetWorkerId() {
		return status.Errorf(codes.PermissionDenied, "Hello names worker %q, but the certificate is %s", hello.GetWorkerId(), ident)
	}
	return nil
}

// recvHello reads the first message of a stream, which must be a Hello with
// a worker id, within helloTimeout.
func recvHello(stream transport.Control_SessionServer) (*transport.Hello, error) {
	msg, err := transport.RecvFirst(stream.Context(), helloTimeout, "Hello", stream.Recv)
	switch {
	case status.Code(err) == codes.DeadlineExceeded:
		return nil, err // no Hello in time: the status says so
	case err != nil:
		return nil, fmt.Errorf("receive hello: %w", err)
	}
	hello := msg.GetHello()
	if hello == nil {
		return nil, status.Errorf(codes.InvalidArgument, "the first message of a session must be Hello, not %T", msg.GetMsg())
	}
	if err := validateHello(hello); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "Hello: %v", err)
	}
	return hello, nil
}

// redirect answers NotLeader with the leader this node knows. When it
// knows none, the cluster has no leader (lost quorum, or an election in
// progress): it then holds the stream (holdLeaderless) until one is known. A
// node outside the Raft configuration (not yet added, or removed) knows
// nothing about the cluster's leadership: it refuses the stream instead, so
// that its silence renews no lease.
func (c *controlService) redirect(stream transport.Control_SessionServer, worker string) error {
	id, rpcAddr := c.knownLeader()
	if id == "" && !c.s.inRaftConfiguration() {
		return status.Errorf(codes.Unavailable, "coordinator %s is not in the raft configuration and knows no leader", c.s.cfg.ID)
	}
	if err := sendNotLeader(stream, id, rpcAddr); err != nil {
		return err
	}
	if id != "" {
		return nil
	}
	return c.holdLeaderless(stream, worker)
}

// knownLeader returns the leader a worker should be sent to: its id and RPC
// address, the id alone when its address is not known (yet), or nothing when
// this node knows no leader.
func (c *controlService) knownLeader() (id, rpcAddr string) {
	id, rpcAddr, _ = c.s.leaderInfo()
	if id == c.s.cfg.ID && c.s.currentLeader() == nil {
		// This node leads, but its loop is not (or no longer) running: name
		// it without an address so that the worker retries shortly, rather
		// than being told that there is no leader.
		rpcAddr = ""
	}
	return id, rpcAddr
}

func sendNotLeader(stream transport.Control_SessionServer, id, rpcAddr string) error {
	err := stream.Send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_NotLeader{
		NotLeader: &transport.NotLeader{LeaderId: id, LeaderRpcAddr: rpcAddr},
	}})
	if err != nil {
		return fmt.Errorf("send NotLeader: %w", err)
	}
	return nil
}

// leaderlessPoll is how often a held leaderless stream looks for a leader.
const leaderlessPoll = 50 * time.Millisecond

// holdLeaderless keeps the stream of a worker that reached this coordinator
// while it knows no leader. Every heartbeat of the worker is answered with
// NotLeader naming no leader, which renews the worker's lease: with no leader
// nobody can commit a new attempt of its jobs, so its tasks may run on
// (checkpoints cannot complete meanwhile). As soon as a leader is known, the
// worker gets NotLeader naming it and the stream ends. It returns when the
// stream, the worker or this node ends.
func (c *controlService) holdLeaderless(stream transport.Control_SessionServer, worker string) error {
	c.s.metrics.leaderlessStreams.Inc()
	defer c.s.metrics.leaderlessStreams.Dec()
	c.s.logger.Debug("no leader known: holding worker stream until one is elected", "worker", worker)
	// The receiver ends with the stream, at the latest when this handler returns.
	recvErr := make(chan error, 1)
	beats := make(chan struct{}, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if m.GetHeartbeat() != nil {
				select {
				case beats <- struct{}{}:
				default:
				}
			}
		}
	}()
	// named ends the hold once a leader is known: NotLeader names it. When
	// this node itself has just won, it waits for its leader loop, so that
	// the worker is sent here with an address rather than told to retry.
	named := func() (bool, error) {
		id, rpcAddr := c.knownLeader()
		if id == "" || (id == c.s.cfg.ID && rpcAddr == "") {
			return false, nil
		}
		return true, sendNotLeader(stream, id, rpcAddr)
	}
	poll := time.NewTicker(leaderlessPoll)
	defer poll.Stop()
	for {
		select {
		case <-c.s.ctx.Done():
			return status.Error(codes.Unavailable, "coordinator shutting down")
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("receive from worker %s: %w", worker, err)
		case <-beats:
			if done, err := named(); done || err != nil {
				return err
			}
			if id, _ := c.knownLeader(); id == "" {
				// Still no leader: this answer renews the worker's lease.
				if err := sendNotLeader(stream, "", ""); err != nil {
					return err
				}
			}
		case <-poll.C:
			if done, err := named(); done || err != nil {
				return err
			}
		}
	}
}

func welcome(l *leader) *transport.CoordinatorMessage {
	return &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Welcome{Welcome: &transport.Welcome{
		LeaderId:    l.env.leaderID,
		Term:        l.term,
		LeaseMs:     l.lease.Milliseconds(),
		HeartbeatMs: l.heartbeat.Milliseconds(),
		StateChunks: true,
	}}}
}

// sendLoop sends the session's queue on the stream until the session ends
// or a send fails. It is the only caller of stream.Send for the session.
func sendLoop(stream transport.Control_SessionServer, sess *session) error {
	for {
		select {
		case <-sess.ctx.Done():
			return sessionError(sess.cause())
		case msg := <-sess.out:
			if err := stream.Send(msg); err != nil {
				err = fmt.Errorf("send to worker %s: %w", sess.worker, err)
				sess.close(err)
				return err
			}
		}
	}
}

// sessionError is the gRPC status a worker sees when its session ends.
func sessionError(cause error) error {
	switch {
	case errors.Is(cause, errLeadershipLost):
		return status.Error(codes.Unavailable, "leadership lost; reconnect to the new leader")
	case errors.Is(cause, errSessionReplaced):
		return status.Error(codes.Aborted, cause.Error())
	case errors.Is(cause, errQueueFull), errors.Is(cause, errInboxFull):
		return status.Error(codes.ResourceExhausted, cause.Error())
	case errors.Is(cause, errProtocol):
		return status.Error(codes.InvalidArgument, cause.Error())
	}
	// A stream gRPC broke keeps its code: ResourceExhausted for a message
	// over maxControlMessage says what the worker did wrong.
	if st, ok := status.FromError(cause); ok && st.Code() != codes.Unknown && st.Code() != codes.OK {
		return status.Error(st.Code(), cause.Error())
	}
	return status.Error(codes.Unavailable, cause.Error())
}

// receive reads the worker's messages until the stream or the session ends.
// Heartbeats are answered here, at once; everything else is queued for
// forward, so that a leader loop stalled on a slow Raft write delays acks and
// statuses but never the heartbeat answers that keep the worker's lease.
// An ack's inline state larger than a chunk comes ahead of it in
// StateChunks, which receive joins back into the ack; each message is
// checked against its kind's bound (checkSize) before it is queued.
func receive(stream transport.Control_SessionServer, sess *session, l *leader) {
	inbox := make(chan leaderEvent, sess.inbox)
	defer close(inbox)
	go forward(sess, l, inbox)
	silence := l.silenceLimit()
	watchdog := time.AfterFunc(silence, func() {
		sess.close(fmt.Errorf("%w: nothing from worker %s for %v", errSilent, sess.worker, silence))
	})
	defer watchdog.Stop()
	joiner := transport.AckJoiner{Limit: fsm.MaxInlineStateBytes}
	for {
		msg, err := stream.Recv()
		if err != nil {
			sess.close(fmt.Errorf("receive from worker %s: %w", sess.worker, err))
			return
		}
		watchdog.Reset(silence)
		if err := receiveOne(sess, &joiner, inbox, msg); err != nil {
			sess.close(err)
			return
		}
	}
}

// receiveOne handles one message of receive; an error ends the session.
// What it queues for the leader loop counts against the session's bound on
// queued bytes (maxQueuedState) until the loop takes it (leader.handle).
func receiveOne(sess *session, joiner *transport.AckJoiner, inbox chan<- leaderEvent, msg *transport.WorkerMessage) error {
	clipReasons(msg)
	size := proto.Size(msg)
	if err := checkSize(msg, size); err != nil {
		return fmt.Errorf("%w: worker %s: %v", errProtocol, sess.worker, err)
	}
	switch m := msg.GetMsg().(type) {
	case *transport.WorkerMessage_Heartbeat:
		// Answered between an ack's chunks too: a large state on a slow
		// link must not cost the worker its lease.
		sess.send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Heartbeat{
			Heartbeat: &transport.Heartbeat{UnixNano: time.Now().UnixNano()},
		}})
		return nil
	case *transport.WorkerMessage_Chunk:
		if err := joiner.Chunk(m.Chunk); err != nil {
			return fmt.Errorf("%w: worker %s: %v", errProtocol, sess.worker, err)
		}
		return nil
	case *transport.WorkerMessage_Ack:
		chunked := m.Ack.GetChunkedBytes()
		if err := joiner.Ack(m.Ack); err != nil {
			return fmt.Errorf("%w: worker %s: %v", errProtocol, sess.worker, err)
		}
		size += int(chunked) // the joined state
	case *transport.WorkerMessage_Status, *transport.WorkerMessage_Decline:
		if joiner.Pending() {
			return fmt.Errorf("%w: worker %s sent %T between an ack's state chunks", errProtocol, sess.worker, msg.GetMsg())
		}
	default:
		return fmt.Errorf("%w: worker %s sent %T on an open session", errProtocol, sess.worker, m)
	}
	if q := sess.queued.Add(int64(size)); q > sess.maxQueued {
		return fmt.Errorf("%w: worker %s has %d MiB of messages waiting", errInboxFull, sess.worker, q>>20)
	}
	select {
	case inbox <- workerMessage{sess: sess, msg: msg, size: int64(size)}:
		return nil
	default:
		return fmt.Errorf("%w: worker %s has %d messages waiting", errInboxFull, sess.worker, sess.inbox)
	}
}

// clipReasons cuts the free text of a status or decline to
// transport.MaxReasonBytes: an error text has no bound of its own (a user
// operator's panic value), and a long one is worth keeping, cut, rather
// than ending the session that carries it.
func clipReasons(msg *transport.WorkerMessage) {
	if st := msg.GetStatus(); st != nil {
		st.Reason = transport.ClipReason(st.GetReason())
	}
	if d := msg.GetDecline(); d != nil {
		d.Reason = transport.ClipReason(d.GetReason())
	}
}

// checkSize bounds each kind of worker message, n bytes encoded, past the
// gRPC cap that every message meets before it is read (maxControlMessage):
// only an ack carries much, its inline state, which the joiner bounds.
func checkSize(msg *transport.WorkerMessage, n int) error {
	limit := maxSmallMessage
	switch msg.GetMsg().(type) {
	case *transport.WorkerMessage_Ack:
		limit = maxAckFields
		n -= len(msg.GetAck().GetState().GetKeyed())
	case *transport.WorkerMessage_Chunk:
		return nil // the joiner checks it
	}
	if n > limit {
		return fmt.Errorf("a %T of %d bytes, over the %d bytes its kind may have", msg.GetMsg(), n, limit)
	}
	return nil
}

// silenceLimit is how long a session may go without a message from its
// worker before the leader closes it. Workers heartbeat every l.heartbeat,
// so four missed heartbeats mean the worker or the path to it is gone: a
// partition sends no FIN, and TCP's keepalive takes far longer. Without the
// session the worker gets no new tasks, and its tasks are restarted a lease
// after the close, as for any lost session: by then the worker, which has
// heard nothing either, has stopped them.
func (l *leader) silenceLimit() time.Duration {
	return max(min(4*l.heartbeat, l.lease/2), time.Millisecond)
}

// forward posts a session's worker messages to the leader loop, in order. It
// is owned by receive and ends when receive closes inbox or the session ends.
func forward(sess *session, l *leader, inbox <-chan leaderEvent) {
	for ev := range inbox {
		if !l.post(sess.ctx, ev) {
			return
		}
	}
}

// openSession registers a new session, replacing an older one of the same
// worker, and reconciles the tasks the worker reports against the FSM: tasks
// of a job's current attempt on the worker the FSM assigns them to are kept,
// anything else is cancelled, and tasks the FSM places on the worker that it
// does not report are marked missing.
func (l *leader) openSession(sess *session, hello *transport.Hello) {
	if old := l.sessions[sess.worker]; old != nil {
		old.close(errSessionReplaced)
	}
	l.sessions[sess.worker] = sess
	delete(l.noSessionSince, sess.worker)
	delete(l.gone, sess.worker)
	l.logger.Info("worker session opened", "worker", sess.worker, "data_addr", sess.dataAddr,
		"slots", hello.GetSlots(), "running", len(hello.GetRunning()))

	reported := make(map[*trackedTask]bool)
	for _, st := range hello.GetRunning() {
		if tv := l.onTaskStatus(sess, st); tv != nil {
			reported[tv] = true
		}
	}
	for id := range l.byWorker[sess.worker] {
		for _, tv := range l.jobs[id].order {
			if tv.task.Worker == sess.worker && !reported[tv] {
				tv.missing = true
			}
		}
	}
	l.retarget(sess)
	l.retrigger(sess.worker)
	l.workerChanged(sess.worker)
}

// retarget sends a newly opened session the RetargetTasks of each job whose
// current attempt a task-scoped recovery started and which has surviving
// tasks on the worker (retargetOf): tasks of an older attempt than the
// job's.
func (l *leader) retarget(sess *session) {
	for id := range l.byWorker[sess.worker] {
		js := l.jobs[id]
		if js.status != fsm.JobRunning || !js.survivorOn(sess.worker) {
			continue
		}
		job, ok := l.env.job(id)
		if !ok || job.Attempt != js.attempt {
			continue
		}
		if rt := retargetOf(job); rt != nil {
			l.sendOn(sess, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Retarget{Retarget: rt}})
		}
	}
}

// survivorOn reports whether worker runs a task of js that a task-scoped
// recovery left running: one of an older attempt than the job's.
func (js *jobState) survivorOn(worker string) bool {
	for _, tv := range js.order {
		if tv.task.Worker == worker && tv.task.Attempt < js.attempt {
			return true
		}
	}
	return false
}

// closeSession forgets a session that ended, unless a newer one replaced it.
func (l *leader) closeSession(sess *session, err error) {
	if l.sessions[sess.worker] != sess {
		return
	}
	delete(l.sessions, sess.worker)
	// Only a worker with tasks needs the time: it bounds how long they may
	// wait for it. Recording every id would let Hellos with made-up ids
	// grow the map without bound.
	if len(l.byWorker[sess.worker]) > 0 {
		l.noSessionSince[sess.worker] = l.env.now()
	}
	cause := sess.cause()
	if cause == nil {
		cause = err
	}
	l.logger.Info("worker session closed", "worker", sess.worker, "err", cause)
	if !errors.Is(cause, errSessionReplaced) && !errors.Is(cause, errLeadershipLost) {
		l.probeWorker(sess.worker, cause)
	}
	l.workerChanged(sess.worker)
}

// probeWorker checks a worker whose control session broke, at once and
// directly, instead of waiting for memberlist's next probe round to reach
// it. A worker whose ports refuse connections has lost its process while
// its host is up (a crash, SIGKILL, OOM kill): it is gone, and its tasks
// fail now (workerGone). Otherwise a broken session is an early hint, never
// a failure on its own: a worker that answers a ping is left to reconnect,
// and one that does not (a stopped process, a lost host, a partition) is
// lost once its lease has run out, whatever gossip's indirect probes and
// suspicion say of it meanwhile (workerLost).
func (l *leader) probeWorker(worker string, cause error) {
	if l.env.probe == nil {
		return
	}
	l.probes.Go(func() {
		if l.env.refused != nil && l.env.refused(worker) {
			l.metrics.workerProbes.WithLabelValues("refused").Inc()
			l.post(l.ctx, workerGone{worker: worker, cause: cause})
			return
		}
		rtt, err := l.env.probe(worker)
		if err != nil {
			l.metrics.workerProbes.WithLabelValues("failed").Inc()
			l.logger.Warn("worker did not answer a direct probe after its session broke; gossip decides whether it is dead",
				"worker", worker, "session_err", cause, "probe_err", err)
			return
		}
		l.metrics.workerProbes.WithLabelValues("answered").Inc()
		l.logger.Info("worker answered a direct probe after its session broke; waiting for it to reconnect",
			"worker", worker, "rtt", rtt, "session_err", cause)
	})
}

// workerGone reports a worker whose session broke and whose ports refuse
// connections: its process is gone.
type workerGone struct {
	worker string
	cause  error // why the session broke
}

func (workerGone) leaderEvent() {}

// onWorkerGone fails the tasks of a worker whose process is gone, unless it
// has reconnected since (a restarted process opens a new session, and its
// Hello says which tasks it runs).
func (l *leader) onWorkerGone(ev workerGone) {
	if l.sessions[ev.worker] != nil {
		return
	}
	_, hasTasks := l.noSessionSince[ev.worker]
	l.logger.Warn("worker process gone: its session broke and its ports refuse connections; failing its tasks without waiting for gossip",
		"worker", ev.worker, "tasks", hasTasks, "session_err", ev.cause)
	if !hasTasks {
		return // its jobs moved on already (a task of another worker failed sending to it)
	}
	l.gone[ev.worker] = true
	l.workerChanged(ev.worker)
}

// fenced counts and logs a message of a job's other attempt that the leader
// drops: a resumed zombie or a worker that has not yet seen the restart.
func (l *leader) fenced(js *jobState, message, worker string, ref *transport.TaskRef, attrs ...any) {
	l.metrics.fencedMessages.WithLabelValues(js.id, message).Inc()
	l.jobLogger(js).With(attrs...).Info("dropping "+message+" of a stale attempt", "message_attempt", ref.GetAttempt(),
		"task", ref.GetTaskId(), "worker", worker)
}

// onWorkerMessage handles a status, ack or decline from an open session.
func (l *leader) onWorkerMessage(sess *session, msg *transport.WorkerMessage) {
	if l.sessions[sess.worker] != sess {
		return // from a session that has since been replaced
	}
	switch m := msg.GetMsg().(type) {
	case *transport.WorkerMessage_Status:
		l.onTaskStatus(sess, m.Status)
	case *transport.WorkerMessage_Ack:
		l.onAck(sess.worker, m.Ack)
	case *transport.WorkerMessage_Decline:
		l.onDecline(sess.worker, m.Decline)
	}
}

// onTaskStatus records a task's phase if the task belongs to its job's
// current attempt on this worker, and returns its view. A task that does not
// and still runs is cancelled, and so is a task the leader has stopped (of
// a cancelled or restarting job, or one restored elsewhere), whose phase is
// recorded too.
func (l *leader) onTaskStatus(sess *session, st *transport.TaskStatus) *trackedTask {
	ref := st.GetTask()
	js, tv, stale := l.classify(sess.worker, ref)
	if stale != "" {
		if js != nil && js.status != fsm.JobCancelled && !js.currentTask(ref) {
			l.fenced(js, "status", sess.worker, ref, "phase", st.GetPhase().String())
		}
		if live(st.GetPhase()) {
			l.logger.Info("cancelling stale task", "job", ref.GetJobId(), "attempt", ref.GetAttempt(),
				"task", ref.GetTaskId(), "worker", sess.worker, "reason", stale)
			msgs := []*transport.CoordinatorMessage{cancelMsg(ref, stale)}
			if tv != nil && js.status == fsm.JobCancelled {
				if job, ok := l.env.job(js.id); ok {
					msgs = finalMsgs(js, tv, newestCompleted(job))
				}
			}
			for _, msg := range msgs {
				l.sendOn(sess, msg)
			}
		}
		if tv != nil { // a task the leader has stopped
			tv.phase, tv.missing = st.GetPhase(), false
			if tv.phase == transport.TaskPhase_TASK_PHASE_FAILED {
				// Why it failed still counts: a state that failed
				// verification is not restored again.
				tv.reason, tv.cause = st.GetReason(), st.GetCause()
				l.noteFailure(js, tv)
			}
			if !live(tv.phase) {
				l.dirty[js.id] = struct{}{}
			}
		}
		return tv
	}
	if tv.phase != st.GetPhase() {
		log := l.jobLogger(js)
		level := slog.LevelDebug
		if st.GetReason() != "" && st.GetPhase() == transport.TaskPhase_TASK_PHASE_RUNNING {
			level = slog.LevelInfo // how a restored task got its state
		}
		log.Log(l.ctx, level, "task phase", "task", ref.GetTaskId(), "worker", sess.worker,
			"phase", st.GetPhase().String(), "reason", st.GetReason())
	}
	catchingUp := st.GetCatchingUp() && st.GetPhase() == transport.TaskPhase_TASK_PHASE_RUNNING
	if catchingUp != tv.catchingUp {
		l.jobLogger(js).Info("restored source catching up", "task", ref.GetTaskId(), "worker", sess.worker, "catching_up", catchingUp)
		tv.catchingUpSince, tv.heldTooLong = l.env.now(), false
	}
	tv.phase, tv.reason, tv.cause, tv.missing = st.GetPhase(), st.GetReason(), st.GetCause(), false
	tv.catchingUp = catchingUp
	if st.GetPhase() == transport.TaskPhase_TASK_PHASE_DEPLOYING && st.GetReason() != "" {
		js.deployProgress = l.env.now()
	}
	if st.GetPhase() == transport.TaskPhase_TASK_PHASE_FAILED {
		l.noteFailure(js, tv)
	}
	if !live(st.GetPhase()) {
		l.dirty[js.id] = struct{}{}
	}
	l.touchCheckpoint(js)
	return tv
}

// classify finds the view of the task ref names as reported by worker. It
// returns a non-empty reason when the task is not a task of its job's
// current attempt placed on worker, or is one the leader has stopped; the
// job's state is returned with it when the attempt is what differs, and the
// task's view too when the leader stopped it.
func (l *leader) classify(worker string, ref *transport.TaskRef) (*jobState, *trackedTask, string) {
	js := l.jobs[ref.GetJobId()]
	if js == nil || js.attempt < ref.GetAttempt() {
		// Unknown here, or newer than what this loop has seen: read the FSM.
		if job, ok := l.env.job(ref.GetJobId()); ok {
			js = l.observe(job)
		}
	}
	switch {
	case js == nil:
		return nil, nil, "unknown job"
	case js.status == fsm.JobCancelled:
		// The view of a task of the cancelled attempt comes back so that
		// its phase is recorded: a purge waits for every task to stop.
		tv := js.tasks[ref.GetTaskId()]
		if tv == nil || !js.currentTask(ref) || tv.task.Worker != worker {
			tv = nil
		}
		return js, tv, "job cancelled"
	}
	tv := js.tasks[ref.GetTaskId()]
	switch {
	case tv == nil:
		return nil, nil, fmt.Sprintf("attempt %d has no task %q", js.attempt, ref.GetTaskId())
	case ref.GetAttempt() != tv.task.Attempt:
		return js, nil, fmt.Sprintf("attempt %d is not task %s's current attempt %d", ref.GetAttempt(), tv.task.ID, tv.task.Attempt)
	case tv.task.Worker != worker:
		return nil, nil, fmt.Sprintf("task is assigned to worker %s", tv.task.Worker)
	case js.status != fsm.JobRunning || js.restarting == js.attempt:
		// The restart cancelled the attempt's tasks; a worker without a
		// session then, reporting them now, is told again. Adopted, they
		// would run on untracked once the next attempt is committed.
		return js, tv, "job restarting"
	case tv.replaced:
		return js, tv, "task restored on another worker"
	}
	return js, tv, ""
}

// live reports whether a task in phase p may still be running.
func live(p transport.TaskPhase) bool {
	return p != transport.TaskPhase_TASK_PHASE_FAILED && p != transport.TaskPhase_TASK_PHASE_CANCELLED
}

func cancelMsg(ref *transport.TaskRef, reason string) *transport.CoordinatorMessage {
	return &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{
		Task: &transport.TaskRef{JobId: ref.GetJobId(), Attempt: ref.GetAttempt(), TaskId: ref.GetTaskId()}, Reason: reason,
	}}}
}

// maxHelloSlots bounds the slots and running tasks a Hello may report.
const maxHelloSlots = transport.MaxSlots

// validateHello checks what a worker claims about itself, so that nothing
// from the network reaches placement unchecked.
func validateHello(h *transport.Hello) error {
	if !tlsutil.ValidID(h.GetWorkerId()) {
		return fmt.Errorf("worker_id %.64q: use 1 to 128 letters, digits, '.', '_' or '-'", h.GetWorkerId())
	}
	if _, port, err := net.SplitHostPort(h.GetDataAddr()); err != nil || port == "" || port == "0" {
		return fmt.Errorf("data_addr %.64q is not host:port", h.GetDataAddr())
	}
	if h.GetSlots() < 1 || h.GetSlots() > maxHelloSlots {
		return fmt.Errorf("slots must be between 1 and %d, not %d", maxHelloSlots, h.GetSlots())
	}
	if len(h.GetRunning()) > maxHelloSlots {
		return fmt.Errorf("reports %d running tasks, more than any worker may run", len(h.GetRunning()))
	}
	return nil
}
