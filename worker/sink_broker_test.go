package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// refuseTopic has cluster c answer every metadata request for topic alone
// with kerr for it, as a broker does to a client whose ACLs do not let it
// see the topic. Other metadata requests are the broker's own.
func refuseTopic(t *testing.T, c *kfake.Cluster, topic string, kerr sarama.KError) {
	t.Helper()
	host, portStr, err := net.SplitHostPort(c.ListenAddrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatal(err)
	}
	c.ControlKey(int16(kmsg.Metadata), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		md := req.(*kmsg.MetadataRequest)
		if len(md.Topics) != 1 || md.Topics[0].Topic == nil || *md.Topics[0].Topic != topic {
			return nil, nil, false
		}
		resp := md.ResponseKind().(*kmsg.MetadataResponse)
		b := kmsg.NewMetadataResponseBroker()
		b.NodeID, b.Host, b.Port = 0, host, int32(port)
		resp.Brokers = append(resp.Brokers, b)
		resp.ControllerID = 0
		rt := kmsg.NewMetadataResponseTopic()
		rt.Topic = kmsg.StringPtr(topic)
		rt.ErrorCode = int16(kerr)
		resp.Topics = append(resp.Topics, rt)
		return resp, nil, true
	})
}

// TestMapTaskFailsWhenTheBrokerRefusesItsSinkTopic: a broker that refuses
// the sink topic's look-up (TOPIC_AUTHORIZATION_FAILED: the worker's
// principal may not see it) fails the map task with a reason that names the
// topic and the refusal, as the same answer to a write does, whether the
// refusal meets the task at its deploy or while its sink is held for a
// missing topic. Holding instead would decline every checkpoint until
// someone looked; a restart shows the reason and backs off.
func TestMapTaskFailsWhenTheBrokerRefusesItsSinkTopic(t *testing.T) {
	for _, when := range []string{"at deploy", "while held for a missing topic"} {
		t.Run(when, func(t *testing.T) {
			opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(1, "nums")}
			if when == "at deploy" {
				opts = append(opts, kfake.SeedTopics(1, "sums"))
			}
			c, err := kfake.NewCluster(opts...)
			if err != nil {
				t.Fatalf("start kfake: %v", err)
			}
			t.Cleanup(c.Close)
			brokers := c.ListenAddrs()
			produce(t, brokers, "nums", []record{{0, "a", "1"}})

			var md *transport.DeployTask
			var f *fakeCoord
			if when == "at deploy" {
				refuseTopic(t, c, "sums", sarama.ErrTopicAuthorizationFailed)
				f = newFakeCoord(t, true, "")
				w := startWorker(t, "w1", f, nil)
				md = mapDeploy("sum", 1, operator.Sum, 1, 128, mapRefs(128, w), 0)
				md.Sink = &transport.SinkSpec{Brokers: brokers, Topic: "sums", Delivery: "at_least_once"}
				f.deploy(t, "w1", md)
			} else {
				j := startSinkJob(t, brokers)
				j.declineWhileMissing(t, 0, 0, 1)
				j.noFailure(t)
				refuseTopic(t, c, "sums", sarama.ErrTopicAuthorizationFailed)
				f, md = j.f, j.md
			}
			reason := f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_FAILED)
			if !strings.Contains(reason, `sink topic "sums"`) || !strings.Contains(reason, sarama.ErrTopicAuthorizationFailed.Error()) {
				t.Fatalf("map task failed with %q; want the topic and the broker's refusal named", reason)
			}
			if testing.Verbose() {
				t.Log(reason)
			}
		})
	}
}

// TestSinkStopsMidProduceWithoutWaitingForTheBroker: a task that stops
// while its sink waits for a broker's answer to a Produce (the broker took
// the request and says nothing) stops at once, under either delivery: it
// does not wait out the read timeout, here 20 minutes, and the sink closes.
func TestSinkStopsMidProduceWithoutWaitingForTheBroker(t *testing.T) {
	for _, delivery := range []string{"at_least_once", "exactly_once"} {
		t.Run(delivery, func(t *testing.T) {
			_, stall, s, stop := stalledSink(t, kmsg.Produce, delivery)
			stall.arm()
			stall.stopMidFlush(t, s, stop)
			closesPromptly(t, s)
		})
	}
}

// closesPromptly closes s, the sink of a stopped task, and fails the test
// unless the close returns within waitTimeout.
func closesPromptly(t *testing.T, s *sink) {
	t.Helper()
	closed := make(chan struct{})
	go func() { s.close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(waitTimeout):
		t.Fatalf("the sink of a stopped task did not close within %v", waitTimeout)
	}
}

// requestStall has a broker take the first request of one kind after arm
// and say nothing until the test ends.
type requestStall struct {
	// armed is set by arm; slept once the request is held; asleep is
	// closed then.
	armed, slept atomic.Bool
	asleep       chan struct{}
}

// stallRequest sets up a requestStall of requests of key on cluster c.
func stallRequest(t *testing.T, c *kfake.Cluster, key kmsg.Key) *requestStall {
	return stallRequestOn(t, c, key, -1)
}

// stallRequestOn sets up a requestStall of requests of key to broker node
// of cluster c, or to any broker if node is -1.
func stallRequestOn(t *testing.T, c *kfake.Cluster, key kmsg.Key, node int32) *requestStall {
	st := &requestStall{asleep: make(chan struct{})}
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // before the cluster closes
	c.ControlKey(int16(key), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if (node == -1 || c.CurrentNode() == node) && st.armed.Load() && st.slept.CompareAndSwap(false, true) {
			close(st.asleep)
			c.SleepControl(func() { <-release })
		}
		return nil, nil, false
	})
	return st
}

// arm has the broker hold the next request of the stall's kind.
func (st *requestStall) arm() { st.armed.Store(true) }

// stopMidFlush adds an output to s and flushes it; once the broker has
// taken the stalled request, it stops the task (stop) and checks that the
// flush returns the task's end at once, not after the read timeout.
func (st *requestStall) stopMidFlush(t *testing.T, s *sink, stop func()) {
	t.Helper()
	if err := s.add(&operator.Output{Key: []byte("k"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	st.stopMidCall(t, "flush", s.flush, stop)
}

// stopMidCall calls call (named what) in a goroutine; once the broker has
// taken the stalled request, it stops the task (stop) and checks that call
// returns the task's end at once, not after the read timeout.
func (st *requestStall) stopMidCall(t *testing.T, what string, call func() error, stop func()) {
	t.Helper()
	returned := make(chan error, 1)
	go func() { returned <- call() }()
	select {
	case <-st.asleep:
	case err := <-returned:
		t.Fatalf("%s returned %v before the broker took the stalled request", what, err)
	case <-time.After(waitTimeout):
		t.Fatal("the stalled request never reached the broker")
	}
	stop()
	select {
	case err := <-returned:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("%s of a stopped task: %v, want the task's end", what, err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("%s still waits for the broker's answer %v after the task stopped", what, waitTimeout)
	}
}

// TestSinkStopsMidTransactionRequestWithoutWaitingForTheBroker: besides
// its Produce requests, an exactly-once sink sends its transaction
// coordinator AddPartitionsToTxn in a write (the partitions a transaction
// writes to first), InitProducerID at a barrier (the epoch of the next
// transaction, which opens there) and DescribeTransactions before the
// write after one that failed without an answer. A task that stops while
// the coordinator took one of them and says nothing stops at once, as it
// does in a Produce: it does not wait out the read timeout, here 20
// minutes.
func TestSinkStopsMidTransactionRequestWithoutWaitingForTheBroker(t *testing.T) {
	for _, key := range []kmsg.Key{kmsg.AddPartitionsToTxn, kmsg.InitProducerID, kmsg.DescribeTransactions} {
		t.Run(key.Name(), func(t *testing.T) {
			_, stall, s, stop := stalledSink(t, key, "exactly_once")
			switch key {
			case kmsg.AddPartitionsToTxn:
				stall.arm()
				stall.stopMidFlush(t, s, stop)
			case kmsg.InitProducerID:
				write(t, s, "a", 5)
				stall.arm()
				stall.stopMidCall(t, "preCommit", func() error { _, err := s.txn.preCommit(1); return err }, stop)
			case kmsg.DescribeTransactions:
				// A write failed without an answer (txnPool.send): before
				// the next, the sink asks whether the id moved on.
				write(t, s, "a", 5)
				s.txn.cur.stale, s.txn.cur.checkFence = true, true
				stall.arm()
				stall.stopMidFlush(t, s, stop)
			}
			closesPromptly(t, s)
		})
	}
}

// TestSinkStopsWithoutALookupAfterTheCut: a request cut by the stop fails
// as a lost connection would, after which a running task looks up where to
// send it again (the partition leaders' metadata, the transaction
// coordinator). A stopped task does not: that lookup, to a broker that
// says nothing to it either, would hold the stop for the read timeout.
func TestSinkStopsWithoutALookupAfterTheCut(t *testing.T) {
	for _, tc := range []struct {
		delivery    string
		cut, lookup kmsg.Key
	}{
		{"at_least_once", kmsg.Produce, kmsg.Metadata},
		{"exactly_once", kmsg.Produce, kmsg.Metadata},
		{"exactly_once", kmsg.AddPartitionsToTxn, kmsg.FindCoordinator},
	} {
		t.Run(tc.delivery+"/"+tc.cut.Name(), func(t *testing.T) {
			c, stall, s, stop := stalledSink(t, tc.cut, tc.delivery)
			t.Cleanup(s.close)
			lookup := stallRequest(t, c, tc.lookup)
			stall.arm()
			lookup.arm()
			stall.stopMidFlush(t, s, stop)
		})
	}
}

// TestExactlyOnceSinkCommitsAfterTheCutOfAnIdleConnection: a write's
// Produce requests go to every partition leader at once. The stop comes
// while one leader has answered and another says nothing, and the cut
// closes the connections to both, the answered one idle by then. The
// commit of the checkpoint pre-committed before (a completion handled
// after the stop) goes to the answered broker, the transaction's
// coordinator: it must not be sent on the connection closed under sarama,
// which would fail it, with no retry after a stop.
func TestExactlyOnceSinkCommitsAfterTheCutOfAnIdleConnection(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(2), kfake.SeedTopics(4, "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for p := range int32(4) { // two partitions led by each broker
		if err := c.MoveTopicPartition("out", p, p/2); err != nil {
			t.Fatal(err)
		}
	}
	ctx, stop := context.WithCancel(t.Context())
	s := openTaskSink(t, ctx, slowKafkaEnv(), c.ListenAddrs(), "exactly_once")
	t.Cleanup(s.close)
	write(t, s, "a", 40)
	txns, err := s.txn.preCommit(1)
	if err != nil || len(txns) != 1 {
		t.Fatalf("pre-commit of checkpoint 1: %v, %v", txns, err)
	}
	coord, err := s.txn.admin.TransactionCoordinator(txns[0].GetTransactionalId())
	if err != nil {
		t.Fatal(err)
	}
	stall := stallRequestOn(t, c, kmsg.Produce, 1-coord.ID()) // the other broker
	stall.arm()
	// The coordinator leads partitions 2c and 2c+1; their newest offsets
	// tell when it has taken its Produce, and its connection is all but
	// certainly idle by the time the test has read them. Were sarama's
	// read of the answer still under way, the cut would end it and sarama
	// would close the broker itself: the test would then pass without the
	// close after the cut, but never fail for want of it.
	client, err := sarama.NewClient(c.ListenAddrs(), sarama.NewConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	written := func() int64 {
		var n int64
		for _, p := range []int32{2 * coord.ID(), 2*coord.ID() + 1} {
			off, err := client.GetOffset("out", p, sarama.OffsetNewest)
			if err != nil {
				t.Fatal(err)
			}
			n += off
		}
		return n
	}
	before := written()
	for i := range 40 {
		v := []byte(fmt.Sprintf("b%d", i))
		if err := s.add(&operator.Output{Key: v, Value: v}); err != nil {
			t.Fatal(err)
		}
	}
	stall.stopMidCall(t, "flush", s.flush, func() {
		waitFor(t, "the coordinator to take its share of the write", func() bool { return written() > before })
		stop()
	})
	if err := s.txn.completed(1); err != nil {
		t.Fatalf("commit of checkpoint 1 after the cut: %v", err)
	}
	var got []string
	for _, r := range readCommittedAll(t, c.ListenAddrs(), "out", 40) {
		got = append(got, string(r.Value))
	}
	slices.Sort(got)
	want := seq("a", 40)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %v, want %v", got, want)
	}
}

// TestExactlyOnceSinkFreesIdsWithoutInitAfterTheStop: a completion frees
// the transactional ids no restore can ask for any more, and a running
// task gives each at once the epoch of its next use (InitProducerID). A
// completion handled after the task stopped commits, and leaves the freed
// ids to the restore, which fences them: it sends no InitProducerID, which
// nothing could cut and which a coordinator that says nothing would hold
// for the read timeout.
func TestExactlyOnceSinkFreesIdsWithoutInitAfterTheStop(t *testing.T) {
	c, stall, s, stop := stalledSink(t, kmsg.InitProducerID, "exactly_once")
	t.Cleanup(s.close)
	write(t, s, "a", 5)
	if _, err := s.txn.preCommit(1); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(1); err != nil {
		t.Fatal(err)
	}
	write(t, s, "b", 5)
	if _, err := s.txn.preCommit(2); err != nil { // frees checkpoint 1's id once 2 completes
		t.Fatal(err)
	}
	stop()
	stall.arm()
	done := make(chan error, 1)
	go func() { done <- s.txn.completed(2) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("completion of checkpoint 2 after the stop: %v", err)
		}
	case <-stall.asleep:
		t.Fatal("a completion after the stop initialised a freed transactional id")
	case <-time.After(waitTimeout):
		t.Fatalf("completion of checkpoint 2 after the stop did not return within %v", waitTimeout)
	}
	if !slices.ContainsFunc(s.txn.slots, func(sl *txnSlot) bool { return sl.state == slotFree }) {
		t.Fatal("checkpoint 2's completion freed no transactional id: the test shows nothing")
	}
	want := append(seq("a", 5), seq("b", 5)...)
	if got := readCommitted(t, c.ListenAddrs(), "out", 10); !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %v, want %v", got, want)
	}
}

// slowKafkaEnv is a task environment whose Kafka requests wait 20 minutes
// for an answer (the read timeout, 2 x -kafka-timeout).
func slowKafkaEnv() *taskEnv {
	env := txnTestEnv()
	env.cfg.KafkaTimeout = 10 * time.Minute
	return env
}

// openTaskSink opens the sink of map task map-0 to topic out with delivery,
// as a task whose context is ctx would; exactly once, with no restored
// transactions. The caller closes it.
func openTaskSink(t *testing.T, ctx context.Context, env *taskEnv, brokers []string, delivery string) *sink {
	t.Helper()
	spec := &transport.SinkSpec{Brokers: brokers, Topic: "out", Delivery: delivery}
	if delivery == "exactly_once" {
		spec.TransactionTimeoutMs, spec.CheckpointTimeoutMs, spec.TransactionalIdPrefix = 60_000, 10_000, "coordflow-j"
	}
	s, err := openSink(ctx, env, taskKey{job: "j", attempt: 1, id: "map-0"}, spec, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if s.txn != nil {
		if err := s.txn.recover(nil, []string{"map-0"}); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// stalledSink is a task's sink (openTaskSink, with delivery) on a new
// one-broker cluster that takes the first request of key after stall.arm
// and never answers it, and whose Kafka requests otherwise wait 20
// minutes for an answer; stop stops the task. The caller closes the sink.
func stalledSink(t *testing.T, key kmsg.Key, delivery string) (c *kfake.Cluster, stall *requestStall, s *sink, stop func()) {
	t.Helper()
	c = newKafkaCluster(t, "out")
	stall = stallRequest(t, c, key)
	ctx, stop := context.WithCancel(t.Context())
	s = openTaskSink(t, ctx, slowKafkaEnv(), c.ListenAddrs(), delivery)
	return c, stall, s, stop
}

// TestExactlyOnceSinkCommitsAfterTheTaskStopped: the completion notice of
// a stop-with-savepoint comes just before the stop, and the map task
// handles it after its context ended (mapTask.lastCompletions): the
// commit still goes through, and read_committed sees the savepoint's
// output. (Cutting every connection of a stopped task broke this once.)
func TestExactlyOnceSinkCommitsAfterTheTaskStopped(t *testing.T) {
	c := newKafkaCluster(t, "out")
	ctx, stop := context.WithCancel(t.Context())
	s := openTaskSink(t, ctx, txnTestEnv(), c.ListenAddrs(), "exactly_once")
	t.Cleanup(s.close)
	write(t, s, "a", 5)
	if _, err := s.txn.preCommit(1); err != nil {
		t.Fatal(err)
	}
	stop()
	if err := s.txn.completed(1); err != nil {
		t.Fatalf("commit after the task stopped: %v", err)
	}
	if got := readCommitted(t, c.ListenAddrs(), "out", 5); !slices.Equal(got, seq("a", 5)) {
		t.Fatalf("read_committed saw %v, want %v", got, seq("a", 5))
	}
}

// TestExactlyOnceSinkCommitsAfterARequestCutByTheStop: the task stops
// while its open transaction's write waits for a broker that took the
// request and says nothing: a Produce, or the AddPartitionsToTxn sent to
// the transaction's coordinator before it. The request is cut, and the
// commit of the checkpoint pre-committed before (a completion notice
// handled after the stop) still goes through, on a new connection to the
// same broker.
func TestExactlyOnceSinkCommitsAfterARequestCutByTheStop(t *testing.T) {
	for _, key := range []kmsg.Key{kmsg.Produce, kmsg.AddPartitionsToTxn} {
		t.Run(key.Name(), func(t *testing.T) {
			c, stall, s, stop := stalledSink(t, key, "exactly_once")
			t.Cleanup(s.close)
			write(t, s, "a", 5)
			if _, err := s.txn.preCommit(1); err != nil {
				t.Fatal(err)
			}
			stall.arm()
			stall.stopMidFlush(t, s, stop)
			if err := s.txn.completed(1); err != nil {
				t.Fatalf("commit of checkpoint 1 after the cut: %v", err)
			}
			if got := readCommitted(t, c.ListenAddrs(), "out", 5); !slices.Equal(got, seq("a", 5)) {
				t.Fatalf("read_committed saw %v, want %v", got, seq("a", 5))
			}
		})
	}
}

// TestMapTaskCommitsACompletionQueuedBehindACutProduce: a map task's loop is
// in a sink write the broker took and does not answer when checkpoint 1's
// completion arrives, and then the task is stopped. The stop cuts the write,
// whose error ends the loop; the completion queued meanwhile still commits
// checkpoint 1's transaction before the sink closes (mapTask.lastCompletions),
// rather than waiting for the next restore.
func TestMapTaskCommitsACompletionQueuedBehindACutProduce(t *testing.T) {
	src := newKafka(t, map[string]int32{"nums": 1})
	out := newKafkaCluster(t, "sums")
	stall := stallRequest(t, out, kmsg.Produce)
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	refs := mapRefs(128, w)
	md := mapDeploy("sum", 1, operator.Sum, 1, 128, refs, 0)
	md.Sink = &transport.SinkSpec{Brokers: out.ListenAddrs(), Topic: "sums", Delivery: "exactly_once",
		TransactionTimeoutMs: 60_000, CheckpointTimeoutMs: 10_000, TransactionalIdPrefix: "coordflow-sum"}
	sd := sourceDeploy("sum", 1, 0, operator.Sum, src, "nums", []int32{0}, refs)

	produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	id, _ := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 3}, nil)

	// The next write's Produce stalls at the broker, with the loop in it.
	stall.arm()
	produce(t, src, "nums", []record{{0, "c", "7"}})
	select {
	case <-stall.asleep:
	case <-time.After(waitTimeout):
		t.Fatal("the map task wrote no output after checkpoint 1")
	}
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
		Task: md.Task, CheckpointId: id,
	}}})
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: md.Task, Reason: "test"}}})

	var got []string
	for _, m := range readCommittedMessages(t, out.ListenAddrs(), "sums", 3) {
		got = append(got, string(m.Key)+"="+string(m.Value))
	}
	if want := []string{"a=1", "b=10", "a=3"}; !slices.Equal(got, want) {
		t.Fatalf("read_committed after the stop saw %v, want checkpoint %d's outputs %v", got, id, want)
	}
	// The cut write's transaction (c=7) belongs to no checkpoint: it must
	// not be committed with them.
	if more := readCommittedFor(t, out.ListenAddrs(), "sums", 4, time.Second); len(more) != 3 {
		t.Fatalf("read_committed saw %d outputs after the stop, want checkpoint %d's 3", len(more), id)
	}
}
