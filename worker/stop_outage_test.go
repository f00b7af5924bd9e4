package worker

import (
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// TestSourceStopDoesNotWaitForKafka: a source task stops at once while its
// broker hangs, although closing its partition consumers then waits for
// sarama's metadata refresh, which runs to the client's timeouts (several
// seconds here, about 30 s with the default -kafka-timeout: more than a
// stop may take). The closes and the lease's release go on in the
// background.
func TestSourceStopDoesNotWaitForKafka(t *testing.T) {
	const parts = 8
	kafka := newControlledKafkaOf(t, parts)
	var all []int32
	for p := range int32(parts) {
		all = append(all, p)
	}
	f, w, _, sd := wordJobOn(t, kafka.brokers, all, 2*time.Second)
	kafka.hang()
	waitKafkaErrors(t, w, "a fetch to time out")
	// The partition consumers now back off (500 ms) and look for their
	// leader again, in a metadata refresh that hangs: timing makes the
	// close wait likely, not the result.
	time.Sleep(time.Second)
	took := cancelTook(t, f, sd.Task)
	// The client's metadata timeout is 4 s (2 x -kafka-timeout): a stop
	// that waited for a refresh takes longer.
	if took >= 3*time.Second {
		t.Fatalf("the source took %v to stop: it waited for Kafka", took.Round(time.Millisecond))
	}
}

// cancelTook cancels task r on worker w1 and returns how long it took to
// report itself cancelled.
func cancelTook(t *testing.T, f *fakeCoord, r *transport.TaskRef) time.Duration {
	t.Helper()
	began := time.Now()
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: r, Reason: "test"}}})
	f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_CANCELLED)
	took := time.Since(began)
	t.Logf("cancelled %v after the cancel", took.Round(time.Millisecond))
	return took
}

// TestSourceRidesOutBrokerRestart: a broker that goes away and is back
// within -kafka-timeout (a restart, which refuses connections meanwhile) does
// not fail a source, also on a partition that gets no records, and the
// source reads what is written after it.
func TestSourceRidesOutBrokerRestart(t *testing.T) {
	first, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "words"))
	if err != nil {
		t.Fatal(err)
	}
	var closeFirst sync.Once
	t.Cleanup(func() { closeFirst.Do(first.Close) })
	brokers := first.ListenAddrs()
	_, portText, err := net.SplitHostPort(brokers[0])
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		t.Fatal(err)
	}
	f, w, md, sd := wordJobOn(t, brokers, []int32{0}, 5*time.Second)
	closeFirst.Do(first.Close)
	waitKafkaErrors(t, w, "the source to see the broker gone")
	time.Sleep(time.Second) // the restart takes a while: errors keep coming
	second, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.SeedTopics(1, "words"))
	if err != nil {
		t.Fatalf("start the broker again on port %d: %v", port, err)
	}
	t.Cleanup(second.Close)
	produce(t, brokers, "words", []record{{value: "back again"}, {value: "again"}})

	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 2}, nil)
	if state, _ := decodeKeyed(t, acks["map-0"].GetState()); state["again"] != 2 || state["back"] != 1 {
		t.Fatalf("state %v after the restart, want back 1, again 2", state)
	}
	for _, m := range f.messages() {
		if st := m.msg.GetStatus(); st != nil && st.GetPhase() == transport.TaskPhase_TASK_PHASE_FAILED {
			t.Fatalf("task %s failed during the restart: %s", st.GetTask().GetTaskId(), st.GetReason())
		}
	}
}

// TestSourceStopDoesNotWaitForNewPartition: a source stops at once while
// the partition consumer of a partition it just discovered is starting and
// Kafka does not answer: sarama's start of a partition consumer asks for the
// partition's offsets, which in an outage runs to the client's timeouts and
// retries. It starts in the discovery's goroutine, not on the task loop.
func TestSourceStopDoesNotWaitForNewPartition(t *testing.T) {
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "words"))
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	var closeKafka sync.Once
	t.Cleanup(func() { closeKafka.Do(kc.Close) })
	brokers := kc.ListenAddrs()
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.KafkaTimeout = 2 * time.Second })
	// Before the worker stops: the lookups left hanging then fail at once,
	// and its stop need not wait them out.
	t.Cleanup(func() { closeKafka.Do(kc.Close) })
	refs := mapRefs(128, w)
	md := mapDeploy("j", 1, operator.WordCount, 1, 128, refs, 0)
	sd := sourceDeploy("j", 1, 0, operator.WordCount, brokers, "words", []int32{0}, refs)
	sd.NumSources, sd.Source.PartitionDiscoveryMs = 1, 200
	for _, d := range []*transport.DeployTask{md, sd} {
		f.deploy(t, "w1", d)
		f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	}

	// The discovery's lookup of the new partition's earliest offset is
	// answered; every lookup of its offsets after that, the partition
	// consumer's, is read and never answered.
	var lookups atomic.Int32
	kc.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
		kc.KeepControl()
		lo, ok := req.(*kmsg.ListOffsetsRequest)
		if !ok || !slices.ContainsFunc(lo.Topics, func(rt kmsg.ListOffsetsRequestTopic) bool {
			return slices.ContainsFunc(rt.Partitions, func(rp kmsg.ListOffsetsRequestTopicPartition) bool { return rp.Partition == 1 })
		}) {
			return nil, nil, false
		}
		if lookups.Add(1) == 1 {
			return nil, nil, false
		}
		return nil, nil, true
	})
	addPartitions(t, brokers, "words", 2)
	waitFor(t, "the new partition's consumer to ask for its offsets", func() bool { return lookups.Load() >= 2 })

	took := cancelTook(t, f, sd.Task)
	// A lookup times out after 2 s (-kafka-timeout) and sarama retries it:
	// a stop that waited for the start takes longer.
	if took >= 2*time.Second {
		t.Fatalf("the source took %v to stop: it waited for the new partition's consumer to start", took.Round(time.Millisecond))
	}
}
