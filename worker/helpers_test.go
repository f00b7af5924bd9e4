package worker

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// waitTimeout bounds every wait in these tests; generous for a loaded
// 2-core machine running with -race.
const waitTimeout = 20 * time.Second

// waitFor polls cond until it holds or waitTimeout passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitForWithin(t, waitTimeout, what, cond)
}

// waitForWithin polls cond until it holds or timeout passes: for a
// condition that takes a known while by design, such as a client's retries.
func waitForWithin(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond) // poll interval, not a synchronisation
	}
}

// testLogger logs to t until the test ends (later lines are dropped: the
// testing package panics on Log after a test completed).
func testLogger(t testing.TB) *slog.Logger {
	w := &testLogWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testLogWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// metricValue sums the samples of counter or gauge name whose labels include
// want.
func metricValue(t *testing.T, g prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if have[k] != v {
					continue next
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

func ref(job string, attempt uint64, task string) *transport.TaskRef {
	return &transport.TaskRef{JobId: job, Attempt: attempt, TaskId: task}
}

// mapRefs places map tasks of parallelism len(workers) over maxPar key
// groups: map-i on workers[i].
func mapRefs(maxPar int, workers ...*Worker) []*transport.MapTaskRef {
	var refs []*transport.MapTaskRef
	for i, r := range fsm.KeyGroupRanges(maxPar, len(workers)) {
		w := workers[i]
		refs = append(refs, &transport.MapTaskRef{
			TaskId: "map-" + string(rune('0'+i)), Index: int32(i), WorkerId: w.ID(), DataAddr: w.DataAddr(),
			KeyGroupStart: int32(r.Start), KeyGroupEnd: int32(r.End),
		})
	}
	return refs
}

// received is one message the fake coordinator got, with the sending worker.
type received struct {
	worker string
	msg    *transport.WorkerMessage
}

// fakeCoord is an in-test coordd leader: a Control server that welcomes every
// worker, answers heartbeats, records everything workers send, and lets the
// test send leader messages. With redirect set it acts as a follower instead.
type fakeCoord struct {
	transport.UnimplementedControlServer
	t          *testing.T
	rpcAddr    string
	gossipAddr string
	leaseMs    int64
	hbMs       int64
	redirect   atomic.Pointer[string] // if set: answer NotLeader naming this leader
	// stop stops the fake's server, as a kill would: its connections end
	// and new ones are refused.
	stop   func()
	silent atomic.Bool // stop answering heartbeats
	// leaderless makes the fake a coordinator that knows no leader: it
	// answers Hello and heartbeats with an empty NotLeader (counted in
	// leaderlessAnswers) until elected names a leader's address.
	leaderless        atomic.Bool
	elected           atomic.Pointer[string]
	leaderlessAnswers atomic.Int64
	// noChunks makes the fake an older leader, which does not take an
	// ack's state in chunks (Welcome.state_chunks).
	noChunks bool
	chunks   atomic.Int64 // state chunks received
	// chunkDelay makes the fake a leader on a slow link: it reads a state
	// chunk this long after the one before. beatsInChunks counts the
	// heartbeats received between a chunk and its ack.
	chunkDelay    time.Duration
	beatsInChunks atomic.Int64

	mu       sync.Mutex
	log      []received
	sessions map[string]*fakeSession
}

// fakeSession is one worker's open session with the fake coordinator.
type fakeSession struct {
	out  chan *transport.CoordinatorMessage
	kick chan struct{} // closed to end the session from the leader's side
}

// newFakeCoord starts a fake coordinator; withGossip also starts a memberlist
// member advertising it, for workers to join.
func newFakeCoord(t *testing.T, withGossip bool, redirect string) *fakeCoord {
	t.Helper()
	f := &fakeCoord{t: t, leaseMs: 5000, hbMs: 50, sessions: make(map[string]*fakeSession)}
	if redirect != "" {
		f.redirect.Store(&redirect)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.rpcAddr = lis.Addr().String()
	// A leader of the version before state chunks (noChunks) took
	// messages up to 256 MiB; one that takes chunks, 4 MiB, which the
	// fake's receive loop checks.
	// Fixed flow-control windows, as on a link whose bandwidth and delay
	// gRPC has not learnt: a sender then waits for the fake to read.
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(256<<20), grpc.InitialWindowSize(64<<10), grpc.InitialConnWindowSize(64<<10))
	transport.RegisterControlServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	f.stop = srv.Stop
	t.Cleanup(srv.Stop)
	if !withGossip {
		return f
	}
	meta, err := newMetaDelegate(transport.NodeMeta{Role: transport.RoleCoordinator, RPCAddr: f.rpcAddr})
	if err != nil {
		t.Fatal(err)
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = "c-" + strings.ReplaceAll(f.rpcAddr, ":", "-")
	mc.BindAddr, mc.BindPort = "127.0.0.1", 0
	mc.ProbeInterval, mc.ProbeTimeout, mc.GossipInterval = 200*time.Millisecond, 100*time.Millisecond, 50*time.Millisecond
	mc.Delegate = meta
	mc.Logger = log.New(io.Discard, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	f.gossipAddr = ml.LocalNode().Address()
	return f
}

func (f *fakeCoord) Session(stream transport.Control_SessionServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		f.t.Errorf("fake coordinator: first message %v is not hello", first)
		return nil
	}
	if r := f.redirect.Load(); r != nil {
		return stream.Send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_NotLeader{NotLeader: &transport.NotLeader{LeaderId: "leader", LeaderRpcAddr: *r}}})
	}
	if f.leaderless.Load() {
		return f.holdLeaderless(stream)
	}
	if err := stream.Send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Welcome{Welcome: &transport.Welcome{
		LeaderId: "fake", Term: 1, LeaseMs: f.leaseMs, HeartbeatMs: f.hbMs, StateChunks: !f.noChunks,
	}}}); err != nil {
		return err
	}
	sess := &fakeSession{out: make(chan *transport.CoordinatorMessage, 256), kick: make(chan struct{})}
	out := sess.out
	f.mu.Lock()
	f.sessions[hello.GetWorkerId()] = sess
	f.log = append(f.log, received{hello.GetWorkerId(), first})
	f.mu.Unlock()

	recvErr := make(chan error, 1)
	go func() {
		// Acks are logged whole, their state chunks joined back in.
		joiner := transport.AckJoiner{Limit: 64 << 20}
		inChunks := false
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			if n := proto.Size(m); !f.noChunks && n > 4<<20 {
				f.t.Errorf("fake coordinator: a %T of %d bytes, over a leader's 4 MiB", m.GetMsg(), n)
			}
			if c := m.GetChunk(); c != nil {
				f.chunks.Add(1)
				if err := joiner.Chunk(c); err != nil {
					recvErr <- err
					return
				}
				inChunks = true
				time.Sleep(f.chunkDelay)
				continue
			}
			if a := m.GetAck(); a != nil {
				if err := joiner.Ack(a); err != nil {
					recvErr <- err
					return
				}
				inChunks = false
			}
			if m.GetHeartbeat() != nil {
				if inChunks {
					f.beatsInChunks.Add(1)
				}
				if !f.silent.Load() {
					select {
					case out <- &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}:
					default:
					}
				}
				continue
			}
			f.mu.Lock()
			f.log = append(f.log, received{hello.GetWorkerId(), m})
			f.mu.Unlock()
		}
	}()
	for {
		select {
		case m := <-out:
			if err := stream.Send(m); err != nil {
				return err
			}
		case err := <-recvErr:
			return err
		case <-sess.kick:
			return status.Error(codes.Unavailable, "fake coordinator ended the session")
		case <-stream.Context().Done():
			return nil
		}
	}
}

// holdLeaderless plays a coordinator without a leader: an empty NotLeader for
// the Hello and for each heartbeat (unless silent), and NotLeader naming
// elected once it is set.
func (f *fakeCoord) holdLeaderless(stream transport.Control_SessionServer) error {
	answer := func() (bool, error) {
		if addr := f.elected.Load(); addr != nil {
			return true, stream.Send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_NotLeader{NotLeader: &transport.NotLeader{LeaderId: "leader", LeaderRpcAddr: *addr}}})
		}
		if f.silent.Load() {
			return false, nil
		}
		f.leaderlessAnswers.Add(1)
		return false, stream.Send(&transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_NotLeader{NotLeader: &transport.NotLeader{}}})
	}
	for {
		if done, err := answer(); done || err != nil {
			return err
		}
		m, err := stream.Recv()
		if err != nil {
			return err
		}
		if m.GetHeartbeat() == nil {
			f.t.Errorf("fake coordinator without leader: got %T, want heartbeats only", m.GetMsg())
			return nil
		}
	}
}

// kick ends worker's session from the leader's side, as a leader that steps
// down does.
func (f *fakeCoord) kick(worker string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.sessions[worker]; s != nil {
		close(s.kick)
		delete(f.sessions, worker)
	}
}

// awaitSession waits until worker has a welcomed session.
func (f *fakeCoord) awaitSession(t *testing.T, worker string) {
	t.Helper()
	waitFor(t, "session of "+worker, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.sessions[worker] != nil
	})
}

// send queues a leader message for worker's current session.
func (f *fakeCoord) send(t *testing.T, worker string, m *transport.CoordinatorMessage) {
	t.Helper()
	f.awaitSession(t, worker)
	f.mu.Lock()
	sess := f.sessions[worker]
	f.mu.Unlock()
	if sess == nil {
		t.Fatalf("fake coordinator: no session of %s", worker)
	}
	select {
	case sess.out <- m:
	case <-time.After(waitTimeout):
		t.Fatalf("fake coordinator: send queue of %s full", worker)
	}
}

func (f *fakeCoord) deploy(t *testing.T, worker string, d *transport.DeployTask) {
	t.Helper()
	f.send(t, worker, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Deploy{Deploy: d}})
}

func (f *fakeCoord) trigger(t *testing.T, worker string, r *transport.TaskRef, id uint64) {
	t.Helper()
	f.send(t, worker, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Trigger{Trigger: &transport.TriggerCheckpoint{Task: r, CheckpointId: id}}})
}

// await waits for the first message that satisfies match and returns it.
func (f *fakeCoord) await(t *testing.T, what string, match func(received) bool) *transport.WorkerMessage {
	t.Helper()
	var found *transport.WorkerMessage
	waitFor(t, what, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, r := range f.log {
			if match(r) {
				found = r.msg
				return true
			}
		}
		return false
	})
	return found
}

// messages returns a copy of everything received so far.
func (f *fakeCoord) messages() []received {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]received(nil), f.log...)
}

// awaitStatus waits for a status of task r in phase and returns its reason.
func (f *fakeCoord) awaitStatus(t *testing.T, r *transport.TaskRef, phase transport.TaskPhase) string {
	t.Helper()
	m := f.await(t, r.String()+" "+phase.String(), func(rc received) bool {
		st := rc.msg.GetStatus()
		return st != nil && sameTask(st.GetTask(), r) && st.GetPhase() == phase
	})
	return m.GetStatus().GetReason()
}

// awaitAck waits for the ack of checkpoint id by task r.
func (f *fakeCoord) awaitAck(t *testing.T, r *transport.TaskRef, id uint64) *transport.CheckpointAck {
	t.Helper()
	return f.await(t, "ack of checkpoint "+r.GetTaskId(), func(rc received) bool {
		a := rc.msg.GetAck()
		return a != nil && sameTask(a.GetTask(), r) && a.GetCheckpointId() == id
	}).GetAck()
}

func sameTask(a, b *transport.TaskRef) bool {
	return a.GetJobId() == b.GetJobId() && a.GetAttempt() == b.GetAttempt() && a.GetTaskId() == b.GetTaskId()
}

// startWorker runs a worker that joins f's gossip member; it stops when the
// test ends.
func startWorker(t *testing.T, id string, f *fakeCoord, tune func(*Config)) *Worker {
	w, _ := startStoppableWorker(t, id, f, tune)
	return w
}

// startStoppableWorker is startWorker that also returns a function that stops
// the worker and waits for Run to return.
func startStoppableWorker(t *testing.T, id string, f *fakeCoord, tune func(*Config)) (*Worker, func()) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ID = id
	cfg.DataAddr = "127.0.0.1:0"
	cfg.StateDir = t.TempDir()
	cfg.GossipAddr = "127.0.0.1:0"
	cfg.Join = []string{f.gossipAddr}
	cfg.Logger = testLogger(t)
	cfg.KafkaTimeout = 3 * time.Second
	if tune != nil {
		tune(&cfg)
	}
	w, err := New(cfg)
	if err != nil {
		t.Fatalf("new worker: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("worker %s: Run: %v", id, err)
				}
			case <-time.After(waitTimeout):
				t.Errorf("worker %s did not stop within %s", id, waitTimeout)
			}
		})
	}
	t.Cleanup(stop)
	return w, stop
}

// newKafka starts an in-process kfake broker with the given topics
// (name -> partitions).
func newKafka(t *testing.T, topics map[string]int32) []string {
	t.Helper()
	opts := []kfake.Opt{kfake.NumBrokers(1)}
	for name, parts := range topics {
		opts = append(opts, kfake.SeedTopics(parts, name))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

// record is one record to produce to a given partition.
type record struct {
	partition int32
	key       string
	value     string
}

// produce writes records, in order, to their partitions.
func produce(t *testing.T, brokers []string, topic string, recs []record) {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	cfg.Producer.Return.Successes = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Partitioner = sarama.NewManualPartitioner
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		t.Fatalf("producer: %v", err)
	}
	defer p.Close()
	msgs := make([]*sarama.ProducerMessage, 0, len(recs))
	for _, r := range recs {
		m := &sarama.ProducerMessage{Topic: topic, Partition: r.partition, Value: sarama.StringEncoder(r.value)}
		if r.key != "" {
			m.Key = sarama.StringEncoder(r.key)
		}
		msgs = append(msgs, m)
	}
	if err := p.SendMessages(msgs); err != nil {
		t.Fatalf("produce: %v", err)
	}
}

// controlledKafka starts an in-process broker with topic words (one
// partition) that the test can take away (stop; also at cleanup) or make
// hang (hang: every request read and never answered, as a frozen host or a
// black-holed network would).
type controlledKafka struct {
	brokers []string
	stop    func()
	hang    func()
}

func newControlledKafka(t *testing.T) controlledKafka {
	t.Helper()
	return newControlledKafkaOf(t, 1)
}

// newControlledKafkaOf is newControlledKafka with partitions partitions of
// words.
func newControlledKafkaOf(t *testing.T, partitions int32) controlledKafka {
	t.Helper()
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(partitions, "words"))
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	var closeOnce sync.Once
	stop := func() { closeOnce.Do(kc.Close) }
	t.Cleanup(stop)
	return controlledKafka{brokers: kc.ListenAddrs(), stop: stop, hang: func() {
		// At the end of the test, the broker goes before what was started
		// since (a worker, whose stop would otherwise wait out its Kafka
		// closes against a broker that answers nothing).
		t.Cleanup(stop)
		kc.Control(func(kmsg.Request) (kmsg.Response, error, bool) {
			kc.KeepControl()
			return nil, nil, true // read, never answered
		})
	}}
}

// testLease returns a pool of worker w1's Kafka clients with kafkaTimeout
// and a lease of it on topic of brokers; the test releases the lease.
func testLease(t *testing.T, brokers []string, topic string, kafkaTimeout time.Duration) (*kafkaPool, *kafkaLease) {
	t.Helper()
	cfg := defaultedConfig(t, Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", KafkaTimeout: kafkaTimeout, OffsetCommitInterval: time.Hour, StateDir: t.TempDir()})
	pool := newKafkaPool(&cfg, "w1", testLogger(t), newMetrics())
	lease, _, err := pool.acquire(brokers, sarama.ReadUncommitted, topic, "source")
	if err != nil {
		t.Fatal(err)
	}
	return pool, lease
}

// runningWordSource starts worker w1 with a KafkaTimeout of a second and
// deploys a wordcount job reading words/0 of brokers on it, running.
func runningWordSource(t *testing.T, brokers []string) (*fakeCoord, *transport.DeployTask) {
	t.Helper()
	f, _, _, sd := wordJobOn(t, brokers, []int32{0}, time.Second)
	return f, sd
}

// wordJobOn starts worker w1 with kafkaTimeout and deploys on it a
// wordcount job j of one map task and one source reading parts of words on
// brokers, both running; it returns the map and source deployments.
func wordJobOn(t *testing.T, brokers []string, parts []int32, kafkaTimeout time.Duration) (f *fakeCoord, w *Worker, md, sd *transport.DeployTask) {
	t.Helper()
	f = newFakeCoord(t, true, "")
	w = startWorker(t, "w1", f, func(c *Config) { c.KafkaTimeout = kafkaTimeout })
	refs := mapRefs(128, w)
	md = mapDeploy("j", 1, operator.WordCount, 1, 128, refs, 0)
	sd = sourceDeploy("j", 1, 0, operator.WordCount, brokers, "words", parts, refs)
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	return f, w, md, sd
}

// waitKafkaErrors waits until job j's sources on w have had an error from
// Kafka: what says what that shows.
func waitKafkaErrors(t *testing.T, w *Worker, what string) {
	t.Helper()
	waitFor(t, what, func() bool {
		return metricValue(t, w.metrics.registry, "coordflow_source_kafka_errors_total", map[string]string{"job": "j", "topic": "words"}) > 0
	})
}

// defaultedConfig returns cfg with its defaults filled in (withDefaults,
// which claims and locks its state dir), and lets go of the lock when the
// test ends.
func defaultedConfig(t testing.TB, cfg Config) Config {
	t.Helper()
	cfg, err := cfg.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cfg.stateLock.Close() })
	return cfg
}
