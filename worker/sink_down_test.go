package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// Issue 7, item 6: a sink whose brokers are down. The map task starts all
// the same, holds its outputs and declines checkpoints naming the sink's
// brokers; once they answer, an exactly-once sink first recovers the
// restored checkpoint's transactions, then writes what it held, and
// checkpoints complete again by themselves.

// freePort returns a port of 127.0.0.1 that nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return port
}

// startKafkaOn starts kfake on port of 127.0.0.1 with topic sums.
func startKafkaOn(t *testing.T, port int) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.SeedTopics(1, "sums"))
	if err != nil {
		t.Fatalf("start kfake on port %d: %v", port, err)
	}
	t.Cleanup(c.Close)
	return c
}

// sumsSink is the sink of the sum job: topic sums on brokers, with delivery.
func sumsSink(brokers []string, delivery string) *transport.SinkSpec {
	spec := &transport.SinkSpec{Brokers: brokers, Topic: "sums", Delivery: delivery}
	if delivery == "exactly_once" {
		spec.TransactionTimeoutMs, spec.CheckpointTimeoutMs, spec.TransactionalIdPrefix = 60_000, 10_000, "coordflow-sum"
	}
	return spec
}

// writesAgain returns a worker tuning whose logger sets the flag it returns
// once a sink logs that it writes again after it was held.
func writesAgain() (func(*Config), *atomic.Bool) {
	var again atomic.Bool
	return func(cfg *Config) {
		cfg.Logger = slog.New(onLog{cfg.Logger.Handler(), func(msg string) {
			if msg == "sink writes again" {
				again.Store(true)
			}
		}})
	}, &again
}

// sumJob is the sum job of one source, reading topic nums from srcBrokers,
// and one map task writing to sink, on worker w1 of f.
type sumJob struct {
	f    *fakeCoord
	w    *Worker
	refs []*transport.MapTaskRef
	src  []string
	sink *transport.SinkSpec
}

func newSumJob(t *testing.T, srcBrokers []string, sink *transport.SinkSpec, tune func(*Config)) *sumJob {
	t.Helper()
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, tune)
	return &sumJob{f: f, w: w, refs: mapRefs(128, w), src: srcBrokers, sink: sink}
}

// deploy deploys attempt of the job, restored from checkpoint restore (0:
// none) with the source's offsets and the map task's state of acks, and
// waits for both tasks to run: a map task whose sink cannot reach its
// brokers must run too.
func (j *sumJob) deploy(t *testing.T, attempt, restore uint64, acks map[string]*transport.CheckpointAck) *sinkJob {
	t.Helper()
	md := mapDeploy("sum", attempt, operator.Sum, 1, 128, j.refs, 0)
	md.Sink = j.sink
	sd := sourceDeploy("sum", attempt, 0, operator.Sum, j.src, "nums", []int32{0}, j.refs)
	if restore != 0 {
		st := acks["map-0"].GetState()
		md.RestoreCheckpointId = restore
		md.RestoreKeyed = []*transport.KeyedBlob{{TaskId: "map-0", Data: st.GetKeyed(), Sha256: st.GetKeyedSha256(),
			KeyGroupStart: 0, KeyGroupEnd: 128, Applied: st.GetApplied(), SinkTxns: st.GetSinkTxns()}}
		sd.RestoreCheckpointId, sd.RestoreOffsets = restore, acks["source-0"].GetState().GetOffsets()
	}
	j.f.deploy(t, "w1", md)
	j.f.deploy(t, "w1", sd)
	j.f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	j.f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	return &sinkJob{f: j.f, brokers: j.sink.GetBrokers(), md: md, sd: sd}
}

// namesBrokers is a decline reason of a sink held because its brokers do
// not answer.
func namesBrokers(brokers []string) func(string) bool {
	return func(reason string) bool {
		return strings.HasPrefix(reason, fmt.Sprintf("sink: sink brokers %v unreachable: ", brokers)) &&
			strings.HasSuffix(reason, errSinkUnavailable.Error())
	}
}

// namesBrokersOrTopic is namesBrokers, or a write to topic sums that failed.
func namesBrokersOrTopic(brokers []string) func(string) bool {
	return func(reason string) bool {
		return namesBrokers(brokers)(reason) ||
			strings.HasPrefix(reason, `sink: sink topic "sums"`) && strings.Contains(reason, ": write ") && strings.HasSuffix(reason, errSinkUnavailable.Error())
	}
}

// declineWhile triggers checkpoints from id+1 on until n in a row are
// declined, each with a reason reasonOK accepts, while the sink cannot
// write (what says why), and returns the last id. A checkpoint may be acked
// only before the first decline, and only if its source offset is at most
// written: every output below it is written.
func (j *sinkJob) declineWhile(t *testing.T, what string, id uint64, written int64, n int, reasonOK func(string) bool) uint64 {
	t.Helper()
	for declined := 0; declined < n; {
		id++
		offsets, ack, decl := j.checkpoint(t, id)
		if ack != nil {
			if declined > 0 || offsets[0] > written {
				t.Fatalf("checkpoint %d acked (source offsets %v) while %s", id, offsets, what)
			}
			continue
		}
		if !reasonOK(decl.GetReason()) {
			t.Fatalf("checkpoint %d declined with reason %q while %s", id, decl.GetReason(), what)
		}
		if declined == 0 {
			t.Logf("checkpoint %d declined: %s", id, decl.GetReason())
		}
		declined++
	}
	return id
}

// declineWhileDown is declineWhile while the sink's brokers are down.
func (j *sinkJob) declineWhileDown(t *testing.T, id uint64, written int64, n int, reasonOK func(string) bool) uint64 {
	t.Helper()
	return j.declineWhile(t, "the sink's brokers are down", id, written, n, reasonOK)
}

// ackUntil triggers checkpoints from id+1 on until the map task acks one
// whose source offsets are want, and returns its id. A decline before it
// must be one reasonOK accepts.
func (j *sinkJob) ackUntil(t *testing.T, id uint64, want map[int32]int64, reasonOK func(string) bool) uint64 {
	t.Helper()
	waitFor(t, fmt.Sprintf("a checkpoint acked by the map task with source offsets %v", want), func() bool {
		id++
		offsets, ack, decl := j.checkpoint(t, id)
		if decl != nil && !reasonOK(decl.GetReason()) {
			t.Fatalf("checkpoint %d declined with reason %q after the brokers came back", id, decl.GetReason())
		}
		return ack != nil && maps.Equal(offsets, want)
	})
	return id
}

// noFailureOf fails the test if task reported FAILED.
func (j *sinkJob) noFailureOf(t *testing.T, task *transport.TaskRef) {
	t.Helper()
	for _, rc := range j.f.messages() {
		if st := rc.msg.GetStatus(); st != nil && sameTask(st.GetTask(), task) && st.GetPhase() == transport.TaskPhase_TASK_PHASE_FAILED {
			t.Fatalf("task %s failed: %s", task.GetTaskId(), st.GetReason())
		}
	}
}

// TestMapTaskExactlyOnceSinkStartsWithoutItsBrokers: nothing listens on
// the sink's broker address when the job is deployed. The map task runs
// all the same (it used to fail at deploy, and the job to restart in a
// loop), keeps its state, and declines every checkpoint with a reason that
// names the brokers. Once a broker listens there, the held outputs are
// written, checkpoints complete by themselves, and read_committed sees
// every output once.
func TestMapTaskExactlyOnceSinkStartsWithoutItsBrokers(t *testing.T) {
	src := newKafka(t, map[string]int32{"nums": 1})
	port := freePort(t)
	sinkBrokers := []string{fmt.Sprintf("127.0.0.1:%d", port)}
	produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	tune, again := writesAgain()
	j := newSumJob(t, src, sumsSink(sinkBrokers, "exactly_once"), tune).deploy(t, 1, 0, nil)

	// Held from the start: no checkpoint is acked, even one that covers
	// no output.
	id := j.declineWhileDown(t, 0, -1, 3, namesBrokers(sinkBrokers))
	produce(t, src, "nums", []record{{0, "c", "7"}})
	id = j.declineWhileDown(t, id, -1, 2, namesBrokers(sinkBrokers))
	j.noFailureOf(t, j.md.Task)

	startKafkaOn(t, port)
	waitFor(t, "the sink to write again", again.Load)
	id = j.ackUntil(t, id, map[int32]int64{0: 4}, namesBrokers(sinkBrokers))
	if got := readCommittedFor(t, sinkBrokers, "sums", 1, time.Second); len(got) != 0 {
		t.Fatalf("read_committed saw %d records before checkpoint %d completed", len(got), id)
	}
	j.complete(t, id)
	want := []string{"a", "1", "b", "10", "a", "3", "c", "7"}
	if got := committedKV(t, sinkBrokers, 4); !reflect.DeepEqual(got, want) {
		t.Fatalf("after checkpoint %d completed: read_committed saw %v, want %v", id, got, want)
	}

	// It goes on as if nothing happened.
	produce(t, src, "nums", []record{{0, "b", "5"}})
	id = j.ackUntil(t, id, map[int32]int64{0: 5}, func(string) bool { return false })
	j.complete(t, id)
	want = append(want, "b", "15")
	if got := committedKV(t, sinkBrokers, 5); !reflect.DeepEqual(got, want) {
		t.Fatalf("after checkpoint %d completed: read_committed saw %v, want %v", id, got, want)
	}
	j.noFailureOf(t, j.md.Task)
}

// txnRequests records, in the order the broker takes them, the EndTxn and
// transactional Produce requests cluster c serves from when start is set.
type txnRequests struct {
	start atomic.Bool
	mu    sync.Mutex
	reqs  []string
}

// recordTxnRequests adds the recording to c's controls, after any control
// already there (an outage drops requests before this sees them).
func recordTxnRequests(c *kfake.Cluster) *txnRequests {
	r := &txnRequests{}
	c.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if !r.start.Load() {
			return nil, nil, false
		}
		var what string
		switch req := req.(type) {
		case *kmsg.EndTxnRequest:
			what = fmt.Sprintf("EndTxn %s commit=%v", req.TransactionalID, req.Commit)
		case *kmsg.ProduceRequest:
			if req.TransactionID != nil {
				what = "Produce " + *req.TransactionID
			}
		}
		if what != "" {
			r.mu.Lock()
			r.reqs = append(r.reqs, what)
			r.mu.Unlock()
		}
		return nil, nil, false
	})
	return r
}

func (r *txnRequests) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reqs)
}

// TestMapTaskExactlyOnceSinkRecoversOnceItsBrokersAnswer: the job restarts
// from a checkpoint whose transaction was pre-committed and never
// committed (its completion notice was lost), while the sink's broker
// answers nothing. The restored map task runs, declines checkpoints naming
// the brokers and writes nothing; once the broker answers, it commits the
// restored transaction before its first write, and every output appears
// once: the restored checkpoint's, then the new ones.
func TestMapTaskExactlyOnceSinkRecoversOnceItsBrokersAnswer(t *testing.T) {
	src := newKafka(t, map[string]int32{"nums": 1})
	sinkCluster := newKafkaCluster(t, "sums")
	sinkBrokers := sinkCluster.ListenAddrs()
	o := newOutage(sinkCluster)
	reqs := recordTxnRequests(sinkCluster)
	tune, again := writesAgain()
	job := newSumJob(t, src, sumsSink(sinkBrokers, "exactly_once"), tune)

	produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	j1 := job.deploy(t, 1, 0, nil)
	id, acks := checkpointUntil(t, j1.f, 1, map[string]*transport.TaskRef{"w1": j1.sd.Task}, []*transport.TaskRef{j1.md.Task}, map[int32]int64{0: 3}, nil)
	restored := acks["map-0"].GetState().GetSinkTxns()
	if len(restored) == 0 || restored[len(restored)-1].GetCheckpointId() != id {
		t.Fatalf("checkpoint %d's map ack lists sink transactions %v, want one pre-committed at it", id, restored)
	}

	// The broker goes away; the job restarts from checkpoint id, whose
	// completion the old attempt never heard of.
	o.down.Store(true)
	j2 := job.deploy(t, 2, id, acks)
	produce(t, src, "nums", []record{{0, "b", "5"}, {0, "c", "7"}})
	last := j2.declineWhileDown(t, id, -1, 3, namesBrokers(sinkBrokers))
	j2.noFailureOf(t, j2.md.Task)

	reqs.start.Store(true)
	o.down.Store(false)
	waitFor(t, "the sink to write again", again.Load)
	last = j2.ackUntil(t, last, map[int32]int64{0: 5}, namesBrokers(sinkBrokers))

	// The restored transaction was committed before anything was written.
	commit := fmt.Sprintf("EndTxn %s commit=true", restored[0].GetTransactionalId())
	got := reqs.list()
	t.Logf("requests once the broker answered: %v", got)
	first := slices.IndexFunc(got, func(r string) bool { return strings.HasPrefix(r, "Produce ") })
	if i := slices.Index(got, commit); i < 0 || first < 0 || i > first {
		t.Fatalf("requests once the broker answered: %v; want %q before the first Produce", got, commit)
	}
	if got := committedKV(t, sinkBrokers, 3); !reflect.DeepEqual(got, []string{"a", "1", "b", "10", "a", "3"}) {
		t.Fatalf("before checkpoint %d completed: read_committed saw %v, want the restored checkpoint's outputs once", last, got)
	}
	j2.complete(t, last)
	want := []string{"a", "1", "b", "10", "a", "3", "b", "15", "c", "7"}
	if got := committedKV(t, sinkBrokers, 5); !reflect.DeepEqual(got, want) {
		t.Fatalf("after checkpoint %d completed: read_committed saw %v, want %v", last, got, want)
	}
	if n := metricValue(t, job.w.Gatherer(), "coordflow_sink_transactions_total", map[string]string{"job": "sum", "outcome": "recovered"}); n != float64(len(restored)) {
		t.Fatalf("recovered sink transactions: %v, want %d", n, len(restored))
	}
	j2.noFailureOf(t, j2.md.Task)
}

// coordinatorOnlyOutage makes kfake cluster c look like a dead broker
// while down is set, as newOutage does, except that while coordinator is
// set too it serves what fencing a transactional id takes (ApiVersions,
// FindCoordinator, InitProducerId) and nothing else: no metadata, so a
// held sink's look-up still fails.
type coordinatorOnlyOutage struct{ down, coordinator atomic.Bool }

func newCoordinatorOnlyOutage(c *kfake.Cluster) *coordinatorOnlyOutage {
	o := &coordinatorOnlyOutage{}
	c.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if !o.down.Load() {
			return nil, nil, false
		}
		switch req.(type) {
		case *kmsg.ApiVersionsRequest, *kmsg.FindCoordinatorRequest, *kmsg.InitProducerIDRequest:
			if o.coordinator.Load() {
				return nil, nil, false
			}
		}
		return nil, errors.New("broker down"), true
	})
	return o
}

// takeTxnID initialises transactional id id from a connection of its own to
// broker addr, as a newer attempt of its task would, and returns the new
// epoch.
func takeTxnID(t *testing.T, addr, id string) int16 {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_0_0_0
	b := sarama.NewBroker(addr)
	if err := b.Open(cfg); err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	fc, err := b.FindCoordinator(&sarama.FindCoordinatorRequest{Version: 1, CoordinatorKey: id, CoordinatorType: sarama.CoordinatorTransaction})
	if err != nil || fc.Err != sarama.ErrNoError || fc.Coordinator.Addr() != addr {
		t.Fatalf("find the coordinator of %s: %v, %v (want %s)", id, err, fc, addr)
	}
	resp, err := b.InitProducerID(&sarama.InitProducerIDRequest{Version: 4, TransactionalID: &id, TransactionTimeout: time.Minute, ProducerID: -1, ProducerEpoch: -1})
	if err != nil || resp.Err != sarama.ErrNoError {
		t.Fatalf("initialise %s: %v, %v", id, err, resp)
	}
	return resp.ProducerEpoch
}

// TestMapTaskExactlyOnceSinkHoldsThroughABrokerOutage: the broker goes
// away between checkpoints, every output so far committed. The next write
// fails without an answer: the map task holds it and declines checkpoints
// instead of failing. Once the broker is back, the sink checks that its
// transactional id was not taken meanwhile: if not, it writes what it held
// and the outputs appear once; if a newer attempt took it, the task stops
// as the zombie it is, rather than take the id back (a new epoch would
// fence the newer attempt).
func TestMapTaskExactlyOnceSinkHoldsThroughABrokerOutage(t *testing.T) {
	start := func(t *testing.T) (*sinkJob, *coordinatorOnlyOutage, []string, *atomic.Bool, uint64) {
		src := newKafka(t, map[string]int32{"nums": 1})
		sinkCluster := newKafkaCluster(t, "sums")
		sinkBrokers := sinkCluster.ListenAddrs()
		o := newCoordinatorOnlyOutage(sinkCluster)
		tune, again := writesAgain()
		j := newSumJob(t, src, sumsSink(sinkBrokers, "exactly_once"), tune).deploy(t, 1, 0, nil)

		produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
		id := j.ackUntil(t, 0, map[int32]int64{0: 3}, func(string) bool { return false })
		j.complete(t, id)
		if got, want := committedKV(t, sinkBrokers, 3), []string{"a", "1", "b", "10", "a", "3"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("before the outage: read_committed saw %v, want %v", got, want)
		}

		o.down.Store(true)
		produce(t, src, "nums", []record{{0, "b", "5"}, {0, "c", "7"}})
		id = j.declineWhileDown(t, id, 3, 3, namesBrokersOrTopic(sinkBrokers))
		j.noFailureOf(t, j.md.Task)
		return j, o, sinkBrokers, again, id
	}

	t.Run("back", func(t *testing.T) {
		j, o, sinkBrokers, again, id := start(t)
		o.down.Store(false)
		waitFor(t, "the sink to write again", again.Load)
		id = j.ackUntil(t, id, map[int32]int64{0: 5}, namesBrokersOrTopic(sinkBrokers))
		j.complete(t, id)
		want := []string{"a", "1", "b", "10", "a", "3", "b", "15", "c", "7"}
		if got := committedKV(t, sinkBrokers, 5); !reflect.DeepEqual(got, want) {
			t.Fatalf("after the outage: read_committed saw %v, want %v", got, want)
		}
		j.noFailureOf(t, j.md.Task)
	})

	t.Run("its id taken meanwhile", func(t *testing.T) {
		j, o, sinkBrokers, _, _ := start(t)
		// A newer attempt initialises every id of the task as it
		// restores, the open transaction's among them.
		o.coordinator.Store(true)
		epochs := map[string]int16{}
		for i := range txnSlots {
			id := txnID("coordflow-sum", "map-0", i)
			epochs[id] = takeTxnID(t, sinkBrokers[0], id)
		}
		o.down.Store(false)
		reason := j.f.awaitStatus(t, j.md.Task, transport.TaskPhase_TASK_PHASE_FAILED)
		if !strings.Contains(reason, errFenced.Error()) {
			t.Fatalf("map task failed with %q, want it fenced", reason)
		}
		t.Logf("map task failed: %s", reason)
		for id, epoch := range epochs {
			if st := describeTxn(t, sinkBrokers, id); st.ProducerEpoch != epoch {
				t.Fatalf("transactional id %s has epoch %d after the zombie stopped, want the newer attempt's %d", id, st.ProducerEpoch, epoch)
			}
		}
	})
}

// readAll returns key, value, key, value... of every record of partition 0
// of topic sums (read_uncommitted, as an at-least-once consumer reads).
func readAll(t *testing.T, brokers []string, want int) []string {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	cfg.Consumer.MaxWaitTime = 50 * time.Millisecond
	c, err := sarama.NewConsumer(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pc, err := c.ConsumePartition("sums", 0, sarama.OffsetOldest)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var kv []string
	deadline := time.After(waitTimeout)
	for len(kv) < 2*want {
		select {
		case m := <-pc.Messages():
			kv = append(kv, string(m.Key), string(m.Value))
		case <-deadline:
			t.Fatalf("read %v of topic sums, want %d records", kv, want)
		}
	}
	return kv
}

// lastOutputs returns every key's last value in kv (key, value, ...).
func lastOutputs(kv []string) map[string]string {
	out := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

// TestMapTaskAtLeastOnceSinkHoldsWhileItsBrokersAreDown: an at-least-once
// sink whose brokers are down, at the start (nothing listens) or when it
// writes (the broker drops every request), holds its outputs and declines
// checkpoints naming the brokers instead of failing its map task; once
// they answer, it writes what it held: nothing is lost.
func TestMapTaskAtLeastOnceSinkHoldsWhileItsBrokersAreDown(t *testing.T) {
	t.Run("at the start", func(t *testing.T) {
		src := newKafka(t, map[string]int32{"nums": 1})
		port := freePort(t)
		sinkBrokers := []string{fmt.Sprintf("127.0.0.1:%d", port)}
		produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
		tune, again := writesAgain()
		j := newSumJob(t, src, sumsSink(sinkBrokers, "at_least_once"), tune).deploy(t, 1, 0, nil)
		// A checkpoint that covers no output may be acked: none is held.
		id := j.declineWhileDown(t, 0, 0, 3, namesBrokers(sinkBrokers))
		j.noFailureOf(t, j.md.Task)

		startKafkaOn(t, port)
		waitFor(t, "the sink to write again", again.Load)
		j.ackUntil(t, id, map[int32]int64{0: 3}, namesBrokersOrTopic(sinkBrokers))
		if got, want := readAll(t, sinkBrokers, 3), []string{"a", "1", "b", "10", "a", "3"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("topic sums holds %v, want %v", got, want)
		}
		j.noFailureOf(t, j.md.Task)
	})
	t.Run("when it writes", func(t *testing.T) {
		src := newKafka(t, map[string]int32{"nums": 1})
		sinkCluster := newKafkaCluster(t, "sums")
		sinkBrokers := sinkCluster.ListenAddrs()
		o := newOutage(sinkCluster)
		tune, again := writesAgain()
		j := newSumJob(t, src, sumsSink(sinkBrokers, "at_least_once"), tune).deploy(t, 1, 0, nil)
		produce(t, src, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
		id := j.ackUntil(t, 0, map[int32]int64{0: 3}, func(string) bool { return false })

		o.down.Store(true)
		produce(t, src, "nums", []record{{0, "b", "5"}, {0, "c", "7"}})
		id = j.declineWhileDown(t, id, 3, 3, namesBrokersOrTopic(sinkBrokers))
		j.noFailureOf(t, j.md.Task)

		o.down.Store(false)
		waitFor(t, "the sink to write again", again.Load)
		j.ackUntil(t, id, map[int32]int64{0: 5}, namesBrokersOrTopic(sinkBrokers))
		// Duplicates are allowed (a write the broker took before it
		// dropped the answer is sent again); losses are not, and every
		// key ends with its last output.
		got := readAll(t, sinkBrokers, 5)
		if !reflect.DeepEqual(got[:6], []string{"a", "1", "b", "10", "a", "3"}) ||
			!maps.Equal(lastOutputs(got), map[string]string{"a": "3", "b": "15", "c": "7"}) {
			t.Fatalf("topic sums holds %v, want a=1 b=10 a=3, then b=15 and c=7 at least once, last", got)
		}
		j.noFailureOf(t, j.md.Task)
	})
}

// TestExactlyOnceSinkFailsForWhatWaitingCannotCure: the sink's brokers
// are down when the task starts, so its restore waits; a restored
// transaction of a protocol version this worker does not know then fails
// the task once the brokers answer, as it does at once when they answer
// at the start, rather than being held for ever.
func TestExactlyOnceSinkFailsForWhatWaitingCannotCure(t *testing.T) {
	c := newKafkaCluster(t, "out")
	brokers := c.ListenAddrs()
	o := newOutage(c)
	unknown := []*transport.SinkTxn{{TransactionalId: txnID("coordflow-j", "map-0", 0), ProducerId: 1, ProducerEpoch: 0, CheckpointId: 4, ProtocolVersion: 9}}
	open := func() *sink {
		spec := &transport.SinkSpec{Brokers: brokers, Topic: "out", Delivery: "exactly_once",
			TransactionTimeoutMs: 60_000, CheckpointTimeoutMs: 10_000, TransactionalIdPrefix: "coordflow-j"}
		s, err := openSink(t.Context(), txnTestEnv(), taskKey{job: "j", attempt: 1, id: "map-0"}, spec, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.close)
		return s
	}

	if err := open().txn.recover(unknown, []string{"map-0"}); err == nil || !strings.Contains(err.Error(), "protocol version 9") {
		t.Fatalf("restore of an unknown protocol version with the brokers up: %v, want the task to fail naming it", err)
	}

	o.down.Store(true)
	s := open()
	if err := s.txn.recover(unknown, []string{"map-0"}); err != nil {
		t.Fatalf("restore with the brokers down: %v, want it held", err)
	}
	if err := s.flush(); !errors.Is(err, errSinkUnavailable) {
		t.Fatalf("flush with the brokers down: %v, want the sink held", err)
	}
	o.down.Store(false)
	var err error
	waitFor(t, "the held sink to try again", func() bool {
		err = s.flush()
		return !errors.Is(err, errSinkUnavailable)
	})
	if err == nil || !strings.Contains(err.Error(), "protocol version 9") {
		t.Fatalf("flush once the brokers answer: %v, want the task to fail naming the protocol version", err)
	}
}

// TestSinkUnreachable pins which errors hold a sink and which fail its task.
func TestSinkUnreachable(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"retries ran out", fmt.Errorf("commit: %w", &retriesExhausted{err: sarama.ErrConsumerCoordinatorNotAvailable}), true},
		{"no broker", fmt.Errorf("x: %w", sarama.ErrOutOfBrokers), true},
		{"connection refused", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}, true},
		{"connection closed", fmt.Errorf("x: %w", io.EOF), true},
		{"retriable Kafka error", sarama.ErrNotLeaderForPartition, true},
		{"a missing topic", &retriesExhausted{err: fmt.Errorf("sink partition 0: %w", sarama.ErrUnknownTopicOrPartition)}, true},
		{"a record too large", sarama.ErrMessageSizeTooLarge, false},
		{"a request sarama cannot encode", fmt.Errorf("produce to broker b:9092: %w", sarama.PacketEncodingError{Info: "too large"}), false},
		{"fenced", fmt.Errorf("x: %w (%w)", errFenced, sarama.ErrProducerFenced), false},
		{"fenced producer", sarama.ErrProducerFenced, false},
		{"not authorised", sarama.ErrTransactionalIDAuthorizationFailed, false},
		{"unknown protocol version", errors.New("transaction protocol version 9 is unknown to this worker"), false},
		{"stopping", fmt.Errorf("%w (the task is stopping; last error: %v)", context.Canceled, io.EOF), false},
	} {
		if got := sinkUnreachable(tc.err); got != tc.want {
			t.Errorf("%s: sinkUnreachable(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}
