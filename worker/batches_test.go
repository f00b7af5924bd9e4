package worker

import (
	"fmt"
	"log/slog"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// stalling counts records per key, as count does, but every Process waits
// until release is closed: a map task that cannot keep up.
type stalling struct {
	operator.Operator
	release chan struct{}
}

func (s stalling) Process(ctx operator.Context, it operator.Item) error {
	<-s.release
	return s.Operator.Process(ctx, it)
}

// TestBackpressureBoundsBuffers: while both map tasks are stalled (one in
// process with its source, one on another worker), the source reads only
// what its bounded buffers hold (sarama's fetch and channel, the pumps'
// queues of about 1 MiB each, the in-process channel's batches, gRPC's
// flow-control window), not the topic: memory does not grow with input that
// has not been processed. Let go, the job counts every record exactly once.
func TestBackpressureBoundsBuffers(t *testing.T) {
	const n, bound = 60_000, 25_000
	brokers := newKafka(t, map[string]int32{"in": 1})
	var recs []record
	want := map[string]int64{}
	pad := strings.Repeat("x", 150)
	for i := range n {
		k := "k" + strconv.Itoa(i%100)
		recs = append(recs, record{partition: 0, key: k, value: pad})
		want[k]++
	}
	produce(t, brokers, "in", recs)

	release := make(chan struct{})
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	count, _ := operator.Builtins().Lookup(operator.Count)
	withStall := func(c *Config) {
		c.Operators = operator.NewRegistry()
		if err := c.Operators.Register("stall", stalling{count, release}); err != nil {
			t.Fatal(err)
		}
	}
	f := newFakeCoord(t, true, "")
	w1 := startWorker(t, "w1", f, withStall)
	w2 := startWorker(t, "w2", f, withStall)
	refs := mapRefs(128, w1, w2)
	m0, m1 := mapDeploy("bp", 1, "stall", 1, 128, refs, 0), mapDeploy("bp", 1, "stall", 1, 128, refs, 1)
	f.deploy(t, "w1", m0)
	f.deploy(t, "w2", m1)
	src := sourceDeploy("bp", 1, 0, "stall", brokers, "in", []int32{0}, refs)
	f.deploy(t, "w1", src)
	for _, r := range []*transport.TaskRef{m0.Task, m1.Task, src.Task} {
		f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_RUNNING)
	}

	// The source reads until its buffers are full and then stops: wait
	// until two reads 300 ms apart agree.
	last := sourcePlateau(t, w1, "bp", 2, "its map tasks were stalled", n)
	if last > bound {
		t.Fatalf("the source read %v of %d records while its map tasks applied none: buffers hold more than %d", last, n, bound)
	}
	t.Logf("stalled: the source read %v of %d records and stopped", last, n)

	close(release)
	released = true
	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": src.Task}, []*transport.TaskRef{m0.Task, m1.Task}, map[int32]int64{0: n}, nil)
	got := map[string]int64{}
	for _, m := range []string{"map-0", "map-1"} {
		vals, _ := decodeKeyed(t, acks[m].GetState())
		for k, v := range vals {
			got[k] += v
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after the stall the counts are %v, want %v", fmt.Sprint(got), fmt.Sprint(want))
	}
}

// TestSinkOutputsOutliveTheirBatch: a passthrough job's outputs point into
// the batch their item came in, whose buffer the in-process channel hands
// back to the source for its next batch; the sink must have copied them, so
// the topic holds every record exactly as it was read.
func TestSinkOutputsOutliveTheirBatch(t *testing.T) {
	const n = 20_000
	brokers := newKafka(t, map[string]int32{"in": 2, "out": 1})
	want := map[string]string{}
	var recs []record
	for i := range n {
		k, v := fmt.Sprintf("key-%06d", i), fmt.Sprintf("value-%d-%s", i, strings.Repeat("v", i%40))
		recs = append(recs, record{partition: int32(i % 2), key: k, value: v})
		want[k] = v
	}
	produce(t, brokers, "in", recs)
	f := newFakeCoord(t, true, "")
	// Small batches: the sink holds the outputs of many of them at once.
	w := startWorker(t, "w1", f, func(c *Config) { c.BatchSize = 7 })
	sd, md := deploySinkJob(t, f, w, "pt", operator.Passthrough, brokers, "in", "out")
	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: n / 2, 1: n / 2}, nil)
	// The acks count the records each task took in and sent on: the
	// dashboard's records per second.
	src, mt := acks[sd.Task.GetTaskId()].GetState(), acks[md.Task.GetTaskId()].GetState()
	if src.GetRecordsIn() != n || src.GetRecordsOut() != n || mt.GetRecordsIn() != n || mt.GetRecordsOut() != n {
		t.Fatalf("acks count source %d in, %d out; map task %d in, %d out; want %d each",
			src.GetRecordsIn(), src.GetRecordsOut(), mt.GetRecordsIn(), mt.GetRecordsOut(), n)
	}

	got := map[string]string{}
	for _, m := range readTopic(t, brokers, "out", 0) {
		if prev, dup := got[string(m.Key)]; dup {
			t.Fatalf("output key %q twice (%q, then %q)", m.Key, prev, m.Value)
		}
		got[string(m.Key)] = string(m.Value)
	}
	if len(got) != n {
		t.Fatalf("the sink wrote %d distinct keys, want %d", len(got), n)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("output of %q is %q, want %q", k, got[k], v)
		}
	}
}

// TestSlowSinkBoundsBuffers: while the sink's broker takes no writes (its
// Produce requests go unanswered), the map task's loop waits on its sink's
// sends (between them it would hold at most sinkMaxHeld outputs), and its
// source reads only what the buffers between them hold, not the topic.
// Once the broker answers again, every record reaches the sink.
func TestSlowSinkBoundsBuffers(t *testing.T) {
	const n = 150_000
	// Held outputs, a send in flight and the buffers of the stalled
	// TestBackpressureBoundsBuffers, with room to spare.
	const bound = sinkMaxHeld + sinkBatch + 25_000
	brokers := newKafka(t, map[string]int32{"in": 1})
	sinkKafka, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "out"))
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(sinkKafka.Close)
	var stalled atomic.Bool
	stalled.Store(true)
	sinkKafka.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		sinkKafka.KeepControl()
		// Handled with neither answer nor error: the request goes
		// unanswered, as on a broker that hangs.
		return nil, nil, stalled.Load()
	})

	var recs []record
	for i := range n {
		recs = append(recs, record{partition: 0, key: fmt.Sprintf("key-%06d", i), value: fmt.Sprintf("value-%d", i)})
	}
	produce(t, brokers, "in", recs)

	var held atomic.Bool
	again, wroteAgain := writesAgain()
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) {
		c.KafkaTimeout = time.Second
		again(c)
		c.Logger = slog.New(onLog{c.Logger.Handler(), func(msg string) {
			if strings.HasPrefix(msg, "sink cannot write") {
				held.Store(true)
			}
		}})
	})
	refs := mapRefs(128, w)
	md := mapDeploy("slow", 1, operator.Passthrough, 1, 128, refs, 0)
	md.Sink = &transport.SinkSpec{Brokers: sinkKafka.ListenAddrs(), Topic: "out", Delivery: "at_least_once"}
	f.deploy(t, "w1", md)
	sd := sourceDeploy("slow", 1, 0, operator.Passthrough, brokers, "in", []int32{0}, refs)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	// The producer gives up after its retries, each waiting out a read
	// timeout of 2 x KafkaTimeout: about 15 s here, over 20 s in a CI run
	// of every package at once with -race.
	waitForWithin(t, time.Minute, "the sink to give up a write and hold its outputs", held.Load)
	// A plateau: five equal samples over 1.2 s, longer than a pause of a
	// busy machine.
	last := sourcePlateau(t, w, "slow", 5, "the sink took no writes", n)
	if last > bound {
		t.Fatalf("the source read %v of %d records while the sink took no writes: buffers hold more than %d", last, n, bound)
	}
	t.Logf("sink stalled: the source read %v of %d records and stopped", last, n)

	stalled.Store(false)
	waitFor(t, "the sink to write again", wroteAgain.Load)
	checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: n}, nil)
	got := map[string]string{}
	for _, m := range readTopic(t, sinkKafka.ListenAddrs(), "out", 0) {
		got[string(m.Key)] = string(m.Value)
	}
	for _, r := range recs {
		if got[r.key] != r.value {
			t.Fatalf("the sink holds %q for %s, want %q (%d of %d keys written)", got[r.key], r.key, r.value, len(got), n)
		}
	}
}

// TestStalledSourceDoesNotSlowItsNeighbours: the source tasks of a worker
// share Kafka consumers, whose fetch loop hands each partition its records
// and waits for them to be taken, up to sarama's MaxProcessingTime. While
// one job's map task is stalled, its source takes no records; the fetch
// loop then drops that partition until it is drained, so another job's
// source on the same worker and broker reads its topic at full speed (a
// slowed one would miss the deadline many times over), and counts it
// exactly.
func TestStalledSourceDoesNotSlowItsNeighbours(t *testing.T) {
	const n = 300_000
	brokers := newKafka(t, map[string]int32{"slow": 1, "fast": 1})
	var slow, fast []record
	want := map[string]int64{}
	for i := range n {
		k := "k" + strconv.Itoa(i%1000)
		fast = append(fast, record{partition: 0, key: k, value: "v"})
		want[k]++
		if i < 50_000 {
			slow = append(slow, record{partition: 0, key: k, value: "v"})
		}
	}
	produce(t, brokers, "slow", slow)
	produce(t, brokers, "fast", fast)

	release := make(chan struct{})
	defer close(release)
	count, _ := operator.Builtins().Lookup(operator.Count)
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) {
		c.Operators = operator.NewRegistry()
		for name, op := range map[string]operator.Operator{"stall": stalling{count, release}, "count": count} {
			if err := c.Operators.Register(name, op); err != nil {
				t.Fatal(err)
			}
		}
	})
	refs := mapRefs(128, w)
	deployJob := func(job, op, topic string) (*transport.DeployTask, *transport.DeployTask) {
		md := mapDeploy(job, 1, op, 1, 128, refs, 0)
		f.deploy(t, "w1", md)
		sd := sourceDeploy(job, 1, 0, op, brokers, topic, []int32{0}, refs)
		f.deploy(t, "w1", sd)
		f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
		return sd, md
	}
	deployJob("stalled", "stall", "slow")
	read := func(job string) float64 {
		return metricValue(t, w.Gatherer(), "coordflow_records_in_total", map[string]string{"job": job, "kind": kindSource})
	}
	waitFor(t, "the stalled job's source to read", func() bool { return read("stalled") > 0 })
	sd, md := deployJob("free", "count", "fast")
	start := time.Now()
	waitFor(t, "the free job's source to read its whole topic", func() bool { return read("free") == n })
	t.Logf("the free job read %d records in %v while the other job's map task was stalled", n, time.Since(start).Round(time.Millisecond))
	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: n}, nil)
	got, _ := decodeKeyed(t, acks[md.Task.GetTaskId()].GetState())
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("the free job's counts are %v, want %v", fmt.Sprint(got), fmt.Sprint(want))
	}
}

// sourcePlateau waits until the records job's source on w has read stop
// growing, that is samples equal readings (above zero) 300 ms apart, and
// returns the count; n is the topic's size, for the failure message.
func sourcePlateau(t *testing.T, w *Worker, job string, samples int, while string, n int) float64 {
	t.Helper()
	read := func() float64 {
		return metricValue(t, w.Gatherer(), "coordflow_records_in_total", map[string]string{"job": job, "kind": kindSource})
	}
	last, same := -1.0, 0
	deadline := time.Now().Add(waitTimeout)
	for {
		now := read()
		if now > 0 && now == last {
			same++
		} else {
			last, same = now, 1
		}
		if same >= samples {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("the source never stopped reading while %s: %v of %d records read", while, now, n)
		}
		time.Sleep(300 * time.Millisecond) // a plateau is equal samples apart in time
	}
}
