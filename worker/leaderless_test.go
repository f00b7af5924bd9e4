package worker

import (
	"context"
	"io"
	"log"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// Leaderless holds with several coordinators: the worker held by one that
// knows no leader asks the others, goes to a leader one of them is, and
// renews its lease only while none of them may lead.

// advertise starts a gossip member that advertises a coordinator at rpcAddr
// and joins it to the member at join, so that workers that joined there
// learn of it.
func advertise(t *testing.T, rpcAddr, join string) {
	t.Helper()
	meta, err := newMetaDelegate(transport.NodeMeta{Role: transport.RoleCoordinator, RPCAddr: rpcAddr})
	if err != nil {
		t.Fatal(err)
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = "c-" + strings.ReplaceAll(rpcAddr, ":", "-")
	mc.BindAddr, mc.BindPort = "127.0.0.1", 0
	mc.ProbeInterval, mc.ProbeTimeout, mc.GossipInterval = 200*time.Millisecond, 100*time.Millisecond, 50*time.Millisecond
	mc.Delegate = meta
	mc.Logger = log.New(io.Discard, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	if _, err := ml.Join([]string{join}); err != nil {
		t.Fatalf("join %s: %v", join, err)
	}
}

// refusedAddr returns an address where nothing listens: connections to it
// are refused, as to a killed coordinator.
func refusedAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	return addr
}

// silentAddr returns an address that accepts connections and never answers,
// like a coordinator behind a blackhole: gRPC's handshake hangs there.
func silentAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var conns []net.Conn
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				for _, c := range conns {
					_ = c.Close()
				}
				close(done)
				return
			}
			conns = append(conns, c) // held open, never read
		}
	}()
	t.Cleanup(func() { _ = lis.Close(); <-done })
	return lis.Addr().String()
}

// leaderlessSetup runs w1 with a fake leader a (gossip), advertises the
// coordinators at others beside it, deploys a map task through a, and then
// makes a step down: a knows no leader and ends w1's session, so that w1 is
// held by a. It returns the worker and the task.
func leaderlessSetup(t *testing.T, a *fakeCoord, others ...string) (*Worker, *transport.TaskRef) {
	t.Helper()
	w, task := runningWith(t, a, func(c *Config) { c.MetricsAddr = "127.0.0.1:0" }, others...)
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_session_open", nil); n != 1 {
		t.Fatalf("session open = %v, want 1 with the leader", n)
	}
	a.leaderless.Store(true)
	a.kick("w1")
	return w, task
}

// runningWith runs w1 (tuned by tune) with a fake leader a (gossip),
// advertises the coordinators at others beside it, and deploys a map task
// through a. It returns the worker and the task, running.
func runningWith(t *testing.T, a *fakeCoord, tune func(*Config), others ...string) (*Worker, *transport.TaskRef) {
	t.Helper()
	w := startWorker(t, "w1", a, tune)
	a.awaitSession(t, "w1")
	for _, addr := range others {
		advertise(t, addr, a.gossipAddr)
	}
	waitFor(t, "w1 to know every coordinator", func() bool { return len(w.coordinators()) == 1+len(others) })
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	a.deploy(t, "w1", d)
	a.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	return w, d.Task
}

// noTaskEnded fails the test if any fake coordinator got a terminal status.
func noTaskEnded(t *testing.T, coords ...*fakeCoord) {
	t.Helper()
	for _, f := range coords {
		for _, r := range f.messages() {
			if st := r.msg.GetStatus(); st != nil && isTerminal(st.GetPhase()) {
				t.Fatalf("task ended: %v", st)
			}
		}
	}
}

// TestLeaderlessHoldFindsLeader: the leader a is cut off from the other
// coordinator b and steps down; w1, which still reaches both, is held by a,
// which knows no leader. While b knows none either (the election), the hold
// renews w1's lease. Once b leads, w1 has a session with it within a few
// heartbeats, although a never learns of b, and its task runs on untouched.
func TestLeaderlessHoldFindsLeader(t *testing.T) {
	a := newFakeCoord(t, true, "")
	b := newFakeCoord(t, false, "")
	for _, f := range []*fakeCoord{a, b} {
		f.leaseMs, f.hbMs = 1000, 50
	}
	b.leaderless.Store(true)
	w, task := leaderlessSetup(t, a, b.rpcAddr)

	// During the election, both know no leader: the hold renews the lease.
	start := a.leaderlessAnswers.Load()
	waitFor(t, "40 answers of the holding coordinator", func() bool { return a.leaderlessAnswers.Load() >= start+40 })
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil); n != 1 {
		t.Fatalf("leaderless gauge = %v, want 1 while neither coordinator leads", n)
	}
	if b.leaderlessAnswers.Load() == 0 {
		t.Fatal("w1 never asked b while held by a")
	}

	// b is elected; a, cut off, goes on answering that it knows no leader.
	b.leaderless.Store(false)
	elected := time.Now()
	hello := b.await(t, "hello at the new leader b", func(r received) bool { return r.msg.GetHello() != nil }).GetHello()
	took := time.Since(elected)
	if took > 2*time.Second {
		t.Errorf("w1 reached the new leader %v after its election, want within 2s (heartbeat 50ms)", took.Round(time.Millisecond))
	}
	t.Logf("w1 reached the new leader %v after its election", took.Round(time.Millisecond))
	if len(hello.GetRunning()) != 1 || !sameTask(hello.GetRunning()[0].GetTask(), task) || hello.GetRunning()[0].GetPhase() != transport.TaskPhase_TASK_PHASE_RUNNING {
		t.Fatalf("hello at b lists %v, want the running map task", hello.GetRunning())
	}
	b.awaitSession(t, "w1")
	waitFor(t, "the session with b open and the hold of a over", func() bool {
		return metricValue(t, w.Gatherer(), "coordflow_worker_session_open", nil) == 1 &&
			metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil) == 0
	})
	// The session with b holds: a's stream ended, and b renews the lease.
	time.Sleep(1500 * time.Millisecond) // one and a half leases
	noTaskEnded(t, a, b)
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n != 0 {
		t.Fatalf("lease expiries = %v, want 0", n)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_tasks", nil); n != 1 {
		t.Fatalf("tasks = %v, want 1", n)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_session_open", nil); n != 1 {
		t.Fatalf("session open = %v, want 1 with b", n)
	}
}

// TestLeaderlessHoldFindsLeaderPastHangingCoordinator: a probe that hangs
// (c, behind a blackhole) delays neither the heartbeats to a nor the switch
// to the leader b that another probe finds. While c stays unconfirmed, the
// hold does not renew the lease: c may lead.
func TestLeaderlessHoldFindsLeaderPastHangingCoordinator(t *testing.T) {
	a := newFakeCoord(t, true, "")
	b := newFakeCoord(t, false, "")
	for _, f := range []*fakeCoord{a, b} {
		f.leaseMs, f.hbMs = 3000, 50
	}
	b.leaderless.Store(true)
	w, task := leaderlessSetup(t, a, b.rpcAddr, silentAddr(t))
	start := a.leaderlessAnswers.Load()
	waitFor(t, "10 answers of the holding coordinator", func() bool { return a.leaderlessAnswers.Load() >= start+10 })
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil); n != 0 {
		t.Fatalf("leaderless gauge = %v, want 0 while c cannot be asked", n)
	}

	b.leaderless.Store(false)
	elected := time.Now()
	hello := b.await(t, "hello at the new leader b", func(r received) bool { return r.msg.GetHello() != nil }).GetHello()
	if took := time.Since(elected); took > time.Second {
		t.Errorf("w1 reached the new leader %v after its election, want within 1s (heartbeat 50ms)", took.Round(time.Millisecond))
	}
	if len(hello.GetRunning()) != 1 || !sameTask(hello.GetRunning()[0].GetTask(), task) {
		t.Fatalf("hello at b lists %v, want the running map task", hello.GetRunning())
	}
	b.awaitSession(t, "w1")
	noTaskEnded(t, a, b)
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n != 0 {
		t.Fatalf("lease expiries = %v, want 0", n)
	}
}

// TestOutboxMark: a session takes what was queued up to its Hello's mark,
// requeued messages first, and leaves what came later in order.
func TestOutboxMark(t *testing.T) {
	o := newOutbox(prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"}))
	msg := func(id uint64) *transport.WorkerMessage {
		return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{CheckpointId: id}}}
	}
	ids := func(ms []*transport.WorkerMessage) []uint64 {
		var out []uint64
		for _, m := range ms {
			out = append(out, m.GetAck().GetCheckpointId())
		}
		return out
	}
	o.push(msg(1))
	o.push(msg(2))
	o.requeue([]*transport.WorkerMessage{msg(0)}) // a broken session could not send it
	mark := o.mark()
	o.push(msg(3))
	if got := ids(o.takeUpTo(mark)); !slices.Equal(got, []uint64{0, 1, 2}) {
		t.Fatalf("up to the mark: %v, want [0 1 2]", got)
	}
	o.requeue([]*transport.WorkerMessage{msg(2)}) // carried into the session
	o.push(msg(4))
	if got := ids(o.take()); !slices.Equal(got, []uint64{2, 3, 4}) {
		t.Fatalf("then everything: %v, want [2 3 4]", got)
	}
	if got := o.take(); len(got) != 0 {
		t.Fatalf("empty outbox gave %v", got)
	}
}

// TestLeaderlessEverywhereRenewsLease: a quorum loss. The leader a steps
// down, b knows no leader either and c is down (connections refused): no
// coordinator leads, so the hold renews w1's lease for many leases and its
// task runs on.
func TestLeaderlessEverywhereRenewsLease(t *testing.T) {
	a := newFakeCoord(t, true, "")
	b := newFakeCoord(t, false, "")
	// A lease of 2 s, not 300 ms: under the race detector on a loaded
	// 2-vCPU machine the worker's loop has stalled for more than 300 ms,
	// and b's answers to the probes have taken over 600 ms (CI, twice with
	// 1 s), which expired the lease with no fault of the hold's.
	for _, f := range []*fakeCoord{a, b} {
		f.leaseMs, f.hbMs = 2000, 100
	}
	b.leaderless.Store(true)
	w, _ := leaderlessSetup(t, a, b.rpcAddr, refusedAddr(t))

	// 60 answers at the 100 ms heartbeat span three 2 s leases.
	start := a.leaderlessAnswers.Load()
	waitFor(t, "60 answers of the holding coordinator", func() bool { return a.leaderlessAnswers.Load() >= start+60 })
	asked := b.leaderlessAnswers.Load()
	waitFor(t, "b asked again", func() bool { return b.leaderlessAnswers.Load() > asked })
	noTaskEnded(t, a, b)
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n != 0 {
		t.Fatalf("lease expiries = %v, want 0", n)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_tasks", nil); n != 1 {
		t.Fatalf("tasks = %v, want 1", n)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil); n != 1 {
		t.Fatalf("leaderless gauge = %v, want 1", n)
	}
	if silent, lease, _ := w.session.leaseExpired(); silent > lease/2 {
		t.Fatalf("last renewal %v ago, want well within the lease %v", silent, lease)
	}
}

// TestLeaderlessMinorityLetsLeaseExpire: w1 reaches only a, cut off from
// the other coordinator b, which may lead the majority: connections to b
// hang. a goes on answering that it knows no leader, but that shows nothing
// about b, so w1's lease runs out and its task stops, as on a worker cut off
// from every coordinator.
func TestLeaderlessMinorityLetsLeaseExpire(t *testing.T) {
	a := newFakeCoord(t, true, "")
	a.leaseMs, a.hbMs = 500, 30
	w, _ := leaderlessSetup(t, a, silentAddr(t))
	kicked := time.Now()
	start := a.leaderlessAnswers.Load()

	waitFor(t, "the lease to run out", func() bool {
		return metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil) == 1
	})
	after := time.Since(kicked)
	t.Logf("lease ran out %v after the leader stepped down (lease 500ms)", after.Round(time.Millisecond))
	if after < 400*time.Millisecond {
		t.Fatalf("lease ran out %v after the leader stepped down, before the 500ms lease", after)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_tasks", nil); n != 0 {
		t.Fatalf("tasks = %v after the lease ran out, want 0", n)
	}
	if a.leaderlessAnswers.Load() < start+5 {
		t.Fatalf("a answered %d times: the worker was not held by it", a.leaderlessAnswers.Load()-start)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil); n != 0 {
		t.Fatalf("leaderless gauge = %v, want 0: the hold does not renew the lease", n)
	}
}

// TestProbeVerdicts: a refused connection shows the coordinator down; one
// that hangs shows nothing; a leaderless coordinator does not lead; a
// follower names its leader; the leader welcomes.
func TestProbeVerdicts(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	f.awaitSession(t, "w1")
	s := w.session
	probe := func(addr string, timeout time.Duration) probeResult {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		r := s.probe(ctx, addr)
		if r.o != nil {
			r.o.close()
		}
		return r
	}
	if r := probe(refusedAddr(t), waitTimeout); r.verdict != probeDown || !r.confirms() {
		t.Errorf("refused: verdict %v (%v), want down", r.verdict, r.err)
	}
	if r := probe(silentAddr(t), 300*time.Millisecond); r.verdict != probeUnknown || r.confirms() {
		t.Errorf("hanging: verdict %v (%v), want unknown", r.verdict, r.err)
	}
	lone := newFakeCoord(t, false, "")
	lone.leaderless.Store(true)
	if r := probe(lone.rpcAddr, waitTimeout); r.verdict != probeNotLeader || r.leaderID != "" || !r.confirms() {
		t.Errorf("leaderless: verdict %v, leader %q (%v), want not leader, none named", r.verdict, r.leaderID, r.err)
	}
	follower := newFakeCoord(t, false, f.rpcAddr)
	if r := probe(follower.rpcAddr, waitTimeout); r.verdict != probeNotLeader || r.leaderAddr != f.rpcAddr {
		t.Errorf("follower: verdict %v, leader at %q (%v), want not leader, naming %s", r.verdict, r.leaderAddr, r.err, f.rpcAddr)
	}
	leader := newFakeCoord(t, false, "")
	if r := probe(leader.rpcAddr, waitTimeout); r.verdict != probeWelcome {
		t.Errorf("leader: verdict %v (%v), want welcome", r.verdict, r.err)
	}
}

// TestSessionAsksAgainTheFollowerThatNamesTheDeadLeader: the leader a is
// killed; the live coordinator b goes on naming a until it has seen the
// election (as a Raft follower does for an election timeout), then leads;
// the other coordinators are dead too. w1 asks b again before it dials the
// dead leader b names, and the refusals of the dead do not grow its backoff
// before each was tried once, so it asks b often enough to reach it within
// its lease once b leads: its task runs on.
func TestSessionAsksAgainTheFollowerThatNamesTheDeadLeader(t *testing.T) {
	a := newFakeCoord(t, true, "")
	b := newFakeCoord(t, false, a.rpcAddr)
	for _, f := range []*fakeCoord{a, b} {
		f.leaseMs, f.hbMs = 3000, 50
	}
	_, task := runningWith(t, a, nil, b.rpcAddr, refusedAddr(t), refusedAddr(t), refusedAddr(t), refusedAddr(t), refusedAddr(t))

	a.stop()
	time.Sleep(1800 * time.Millisecond) // b has not seen the election yet
	b.redirect.Store(nil)
	elected := time.Now()
	hello := b.await(t, "hello at the new leader b", func(r received) bool { return r.msg.GetHello() != nil }).GetHello()
	t.Logf("w1 reached the new leader %v after its election", time.Since(elected).Round(time.Millisecond))
	if len(hello.GetRunning()) != 1 || !sameTask(hello.GetRunning()[0].GetTask(), task) {
		t.Fatalf("hello at b lists %v, want the running map task: the lease expired first", hello.GetRunning())
	}
	noTaskEnded(t, b)
}
