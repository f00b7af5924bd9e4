package worker

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

func sourceDeploy(job string, attempt uint64, index int32, op string, brokers []string, topic string, parts []int32, refs []*transport.MapTaskRef) *transport.DeployTask {
	return &transport.DeployTask{
		Task: ref(job, attempt, fmt.Sprintf("source-%d", index)), Kind: transport.TaskKind_TASK_KIND_SOURCE, Index: index,
		JobName: job, Operator: op, MaxParallelism: 128, MapTasks: refs,
		Source: &transport.SourceSpec{Brokers: brokers, Topic: topic, Partitions: parts, Start: "earliest"},
	}
}

// checkpointUntil triggers checkpoints first, first+1, ... on the sources until one
// acks offsets equal to want (every record consumed), waits for every task's
// ack of it and returns its id and the acks by task id. check, if not nil,
// sees every checkpoint's acks and the offsets they cover.
func checkpointUntil(t *testing.T, f *fakeCoord, first uint64, sources map[string]*transport.TaskRef, mapTasks []*transport.TaskRef, want map[int32]int64,
	check func(id uint64, offsets map[int32]int64, acks map[string]*transport.CheckpointAck)) (uint64, map[string]*transport.CheckpointAck) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for id := first; ; id++ {
		acks := map[string]*transport.CheckpointAck{}
		got := map[int32]int64{}
		for worker, r := range sources {
			f.trigger(t, worker, r, id)
		}
		for _, r := range sources {
			a := f.awaitAck(t, r, id)
			acks[r.GetTaskId()] = a
			maps.Copy(got, a.GetState().GetOffsets())
		}
		for _, r := range mapTasks {
			acks[r.GetTaskId()] = f.awaitAck(t, r, id)
		}
		if check != nil {
			check(id, got, acks)
		}
		if reflect.DeepEqual(got, want) {
			return id, acks
		}
		if time.Now().After(deadline) {
			t.Fatalf("checkpoint %d acked offsets %v, want %v", id, got, want)
		}
	}
}

// TestSourceToMapEndToEnd runs a wordcount job over kfake on two workers:
// two sources and two map tasks, so that every source has one in-process and
// one gRPC channel. Checkpoints are taken while records flow; each one must
// hold exactly the fold of the records below its offsets (invariant 1), each
// map task only its own key groups. Completing one commits its offsets to
// Kafka. It runs with the sources' combiner off and on: a combined batch is
// flushed before every barrier, so each checkpoint is exact all the same,
// and the map tasks' applied offsets (through marks) reach the end.
func TestSourceToMapEndToEnd(t *testing.T) {
	for _, combine := range []bool{false, true} {
		t.Run(fmt.Sprintf("combine=%v", combine), func(t *testing.T) { testSourceToMap(t, combine) })
	}
}

func testSourceToMap(t *testing.T, combine bool) {
	const n, parts = 4000, 4
	brokers := newKafka(t, map[string]int32{"words": parts})
	var recs []record
	for i := 0; i < n; i++ {
		line := fmt.Sprintf("the quick fox %d jumps over the dog %d", i%7, i%13)
		recs = append(recs, record{partition: int32(i % parts), value: line})
	}
	// Record i is at offset i/parts of partition i%parts.
	fold := func(offsets map[int32]int64) map[string]int64 {
		state := map[string]int64{}
		for i, r := range recs {
			if int64(i/parts) < offsets[r.partition] {
				for _, w := range strings.Fields(r.value) {
					state[w]++
				}
			}
		}
		return state
	}
	// Half the records first: a checkpoint covering exactly them is a
	// mid-stream one with state, whatever the timing.
	produce(t, brokers, "words", recs[:n/2])

	f := newFakeCoord(t, true, "")
	w1 := startWorker(t, "w1", f, nil)
	w2 := startWorker(t, "w2", f, nil)
	refs := mapRefs(128, w1, w2)
	m0, m1 := ref("wc", 1, "map-0"), ref("wc", 1, "map-1")
	f.deploy(t, "w1", mapDeploy("wc", 1, operator.WordCount, 2, 128, refs, 0))
	f.deploy(t, "w2", mapDeploy("wc", 1, operator.WordCount, 2, 128, refs, 1))
	s0 := sourceDeploy("wc", 1, 0, operator.WordCount, brokers, "words", []int32{0, 2}, refs)
	s1 := sourceDeploy("wc", 1, 1, operator.WordCount, brokers, "words", []int32{1, 3}, refs)
	s0.Source.Group = "wc-group"
	s1.Source.Group = "wc-group"
	s0.Combine, s1.Combine = combine, combine
	f.deploy(t, "w1", s0)
	f.deploy(t, "w2", s1)
	for _, r := range []*transport.TaskRef{m0, m1, s0.Task, s1.Task} {
		f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_RUNNING)
	}

	end := map[int32]int64{0: n / parts, 1: n / parts, 2: n / parts, 3: n / parts}
	var restoreFrom map[string]*transport.CheckpointAck // a checkpoint taken mid-stream, if any
	var restoreID uint64
	partial := 0
	// verify checks invariant 1 and key-group ownership on every checkpoint.
	verify := func(refs []*transport.MapTaskRef) func(uint64, map[int32]int64, map[string]*transport.CheckpointAck) {
		return func(id uint64, offsets map[int32]int64, acks map[string]*transport.CheckpointAck) {
			got := map[string]int64{}
			for _, mr := range refs {
				vals, groups := decodeKeyed(t, acks[mr.GetTaskId()].GetState())
				for k, kg := range groups {
					if kg < mr.GetKeyGroupStart() || kg >= mr.GetKeyGroupEnd() {
						t.Fatalf("%s holds key %q of key group %d outside its range", mr.GetTaskId(), k, kg)
					}
					if kg != operator.KeyGroup([]byte(k), 128) {
						t.Fatalf("key %q stored in key group %d, want %d", k, kg, operator.KeyGroup([]byte(k), 128))
					}
				}
				maps.Copy(got, vals)
			}
			if want := fold(offsets); !reflect.DeepEqual(got, want) {
				t.Fatalf("keyed state of checkpoint %d = %v, want the fold of the records below %v: %v", id, got, offsets, want)
			}
			if !reflect.DeepEqual(offsets, end) {
				partial++
				if restoreFrom == nil && len(got) > 0 {
					restoreFrom, restoreID = acks, id
				}
			}
		}
	}
	sources := map[string]*transport.TaskRef{"w1": s0.Task, "w2": s1.Task}
	half := map[int32]int64{0: n / parts / 2, 1: n / parts / 2, 2: n / parts / 2, 3: n / parts / 2}
	id, _ := checkpointUntil(t, f, 1, sources, []*transport.TaskRef{m0, m1}, half, verify(refs))
	if restoreFrom == nil {
		t.Fatalf("checkpoint %d covers half the records but holds no state", id)
	}
	halfID := id
	produce(t, brokers, "words", recs[n/2:])
	id, acks := checkpointUntil(t, f, id+1, sources, []*transport.TaskRef{m0, m1}, end, verify(refs))

	// The lag metric: end offsets minus the last completed checkpoint's.
	lagOf := func(w *Worker, p int32) float64 {
		return metricValue(t, w.Gatherer(), "coordflow_source_lag_records", map[string]string{"job": "wc", "topic": "words", "partition": fmt.Sprint(p)})
	}
	lagIs := func(want func(p int32) float64) func() bool {
		return func() bool {
			for p := range int32(parts) {
				w := w1
				if p%2 == 1 {
					w = w2
				}
				if lagOf(w, p) != want(p) {
					return false
				}
			}
			return true
		}
	}
	for w, r := range sources {
		f.send(t, w, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
			Task: r, CheckpointId: halfID, Offsets: half,
		}}})
	}
	waitFor(t, "lag of every partition to be the records after the half checkpoint", lagIs(func(p int32) float64 { return float64(end[p] - half[p]) }))
	t.Logf("checkpoint %d covers every record; %d checkpoints before it were taken mid-stream", id, partial)
	words := 0
	for _, r := range recs {
		words += len(strings.Fields(r.value))
	}
	sent := metricValue(t, w1.Gatherer(), "coordflow_records_out_total", map[string]string{"job": "wc", "kind": kindSource}) +
		metricValue(t, w2.Gatherer(), "coordflow_records_out_total", map[string]string{"job": "wc", "kind": kindSource})
	// Each map task reports its state's keys and size at its last checkpoint.
	for _, mt := range []struct {
		w   *Worker
		ref *transport.TaskRef
	}{{w1, m0}, {w2, m1}} {
		st := acks[mt.ref.GetTaskId()].GetState()
		labels := map[string]string{"job": "wc", "task": mt.ref.GetTaskId()}
		keys := metricValue(t, mt.w.Gatherer(), "coordflow_state_keys", labels)
		size := metricValue(t, mt.w.Gatherer(), "coordflow_state_size_bytes", labels)
		if keys != float64(st.GetKeys()) || size != float64(len(st.GetKeyed())) || size == 0 {
			t.Errorf("%s: state metrics %v keys, %v bytes; its ack: %d keys, %d bytes", mt.ref.GetTaskId(), keys, size, st.GetKeys(), len(st.GetKeyed()))
		}
	}
	// Per task too: each source counts what it read.
	if r0 := metricValue(t, w1.Gatherer(), "coordflow_records_in_total", map[string]string{"job": "wc", "kind": kindSource, "task": "source-0"}); r0 != n/2 {
		t.Errorf("source-0 read %v records, want its %d", r0, n/2)
	}
	switch {
	case !combine && sent != float64(words):
		t.Fatalf("the sources sent %v items for %d words without a combiner", sent, words)
	case combine && sent >= float64(words)/2:
		t.Fatalf("the sources sent %v items for %d words of 22 distinct ones: the combiner merged little or nothing", sent, words)
	}
	for _, m := range []*transport.TaskRef{m0, m1} {
		applied := acks[m.GetTaskId()].GetState().GetApplied()
		for p, off := range end {
			if combine && applied[p] != off-1 || applied[p] > off-1 {
				t.Fatalf("%s applied %v at the end, want every partition's last offset %v", m.GetTaskId(), applied, end)
			}
		}
	}

	// Completion commits the offsets under the job's group (monitoring only).
	for w, r := range map[string]*transport.TaskRef{"w1": s0.Task, "w2": s1.Task} {
		f.send(t, w, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
			Task: r, CheckpointId: id, Offsets: end,
		}}})
	}
	waitFor(t, "offsets committed to Kafka", func() bool {
		return reflect.DeepEqual(committedOffsets(t, brokers, "wc-group", "words", 4), end)
	})
	waitFor(t, "no lag once the last checkpoint completed", lagIs(func(int32) float64 { return 0 }))

	// Attempt 2 restores a mid-stream checkpoint (the last one if none was)
	// with three map tasks instead of two, and must end with every record
	// counted exactly once.
	if restoreFrom == nil {
		restoreFrom, restoreID = acks, id
	}
	var blobs []*transport.KeyedBlob
	for _, r := range []*transport.TaskRef{m0, m1} {
		st := restoreFrom[r.GetTaskId()].GetState()
		blobs = append(blobs, &transport.KeyedBlob{TaskId: r.GetTaskId(), Data: st.GetKeyed(), Sha256: st.GetKeyedSha256()})
	}
	refs2 := mapRefs(128, w1, w2, w1)
	var maps2 []*transport.TaskRef
	for i, mr := range refs2 {
		d := mapDeploy("wc", 2, operator.WordCount, 2, 128, refs2, i)
		d.RestoreCheckpointId, d.RestoreKeyed = restoreID, blobs
		f.deploy(t, mr.GetWorkerId(), d)
		maps2 = append(maps2, d.Task)
	}
	sources2 := map[string]*transport.TaskRef{}
	for i, w := range []string{"w1", "w2"} {
		d := sourceDeploy("wc", 2, int32(i), operator.WordCount, brokers, "words", []int32{int32(i), int32(i + 2)}, refs2)
		d.Combine = combine
		d.RestoreCheckpointId = restoreID
		d.RestoreOffsets = restoreFrom["source-"+fmt.Sprint(i)].GetState().GetOffsets()
		f.deploy(t, w, d)
		sources2[w] = d.Task
	}
	for _, r := range []*transport.TaskRef{m0, m1, s0.Task, s1.Task} {
		if reason := f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "superseded by attempt 2") {
			t.Fatalf("attempt 1 task %s cancelled with reason %q", r.GetTaskId(), reason)
		}
	}
	id2, _ := checkpointUntil(t, f, id+1, sources2, maps2, end, verify(refs2))
	t.Logf("attempt 2 restored checkpoint %d (source-0 at %v) and reached every record at checkpoint %d", restoreID, restoreFrom["source-0"].GetState().GetOffsets(), id2)
}

// committedOffsets fetches the group's committed offsets of topic.
func committedOffsets(t *testing.T, brokers []string, group, topic string, parts int32) map[int32]int64 {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	client, err := sarama.NewClient(brokers, cfg)
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	defer client.Close()
	coord, err := client.Coordinator(group)
	if err != nil {
		return nil
	}
	req := &sarama.OffsetFetchRequest{Version: 1, ConsumerGroup: group}
	for p := int32(0); p < parts; p++ {
		req.AddPartition(topic, p)
	}
	resp, err := coord.FetchOffset(req)
	if err != nil {
		return nil
	}
	out := map[int32]int64{}
	for p := int32(0); p < parts; p++ {
		if b := resp.GetBlock(topic, p); b != nil && b.Err == sarama.ErrNoError && b.Offset >= 0 {
			out[p] = b.Offset
		}
	}
	return out
}

// TestSumSkipsMalformedAndSinks runs sum with malformed values: they are
// skipped and counted, the state holds the sum of the rest, and every update
// reached the sink before the checkpoint was acked.
func TestSumSkipsMalformedAndSinks(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"nums": 2, "sums": 1})
	produce(t, brokers, "nums", []record{
		{0, "a", "1"}, {0, "a", "x"}, {0, "b", " 10 "}, {1, "a", "2"}, {1, "b", "1.5"}, {1, "b", "5"}, {1, "", "7"},
	})
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	sd, md := deploySinkJob(t, f, w, "sum", operator.Sum, brokers, "nums", "sums")

	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 3, 1: 4}, nil)
	got, _ := decodeKeyed(t, acks["map-0"].GetState())
	if want := map[string]int64{"a": 3, "b": 15, "": 7}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sums = %v, want %v", got, want)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_records_skipped_total", map[string]string{"job": "sum", "operator": operator.Sum}); n != 2 {
		t.Fatalf("skipped records = %v, want 2", n)
	}
	// The sink holds one record per applied item, acknowledged before the ack.
	sunk := readTopic(t, brokers, "sums", 0)
	last := map[string]string{}
	for _, m := range sunk {
		last[string(m.Key)] = string(m.Value)
	}
	if len(sunk) != 5 || !reflect.DeepEqual(last, map[string]string{"a": "3", "b": "15", "": "7"}) {
		t.Fatalf("sink has %d records ending in %v, want 5 ending in a=3 b=15 \"\"=7", len(sunk), last)
	}
}

// deploySinkJob deploys on w, worker w1, a job of op with one map task
// writing at least once to topic out and one source reading partitions 0
// and 1 of topic in, and waits until the source runs.
func deploySinkJob(t *testing.T, f *fakeCoord, w *Worker, job, op string, brokers []string, in, out string) (source, mapTask *transport.DeployTask) {
	t.Helper()
	refs := mapRefs(128, w)
	md := mapDeploy(job, 1, op, 1, 128, refs, 0)
	md.Sink = &transport.SinkSpec{Brokers: brokers, Topic: out, Delivery: "at_least_once"}
	f.deploy(t, "w1", md)
	sd := sourceDeploy(job, 1, 0, op, brokers, in, []int32{0, 1}, refs)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	return sd, md
}

// readTopic reads what one partition of topic holds now.
func readTopic(t *testing.T, brokers []string, topic string, p int32) []*sarama.ConsumerMessage {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	client, err := sarama.NewClient(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	end, err := client.GetOffset(topic, p, sarama.OffsetNewest)
	if err != nil {
		t.Fatal(err)
	}
	consumer, err := sarama.NewConsumerFromClient(client)
	if err != nil {
		t.Fatal(err)
	}
	defer consumer.Close()
	pc, err := consumer.ConsumePartition(topic, p, sarama.OffsetOldest)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var out []*sarama.ConsumerMessage
	for int64(len(out)) < end {
		select {
		case m := <-pc.Messages():
			out = append(out, m)
		case <-time.After(waitTimeout):
			t.Fatalf("read %s/%d: got %d of %d records", topic, p, len(out), end)
		}
	}
	return out
}

// TestSourceMissingTopic fails the source with a reason that names the topic.
func TestSourceMissingTopic(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	sd := sourceDeploy("j", 1, 0, operator.WordCount, brokers, "nope", []int32{0}, mapRefs(128, w))
	f.deploy(t, "w1", sd)
	if reason := f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_FAILED); !strings.Contains(reason, `source topic "nope" does not exist`) {
		t.Fatalf("failure reason %q does not say the topic is missing", reason)
	}
	// So does a source whose brokers cannot be reached, within the timeouts.
	unreachable := sourceDeploy("j3", 1, 0, operator.WordCount, []string{"127.0.0.1:1"}, "words", []int32{0}, mapRefs(128, w))
	f.deploy(t, "w1", unreachable)
	if reason := f.awaitStatus(t, unreachable.Task, transport.TaskPhase_TASK_PHASE_FAILED); !strings.Contains(reason, "source: cannot reach brokers [127.0.0.1:1]") {
		t.Fatalf("failure reason %q does not say the brokers are unreachable", reason)
	}
	// An unknown operator fails too, without touching Kafka.
	bad := sourceDeploy("j2", 1, 0, "nosuchop", brokers, "words", []int32{0}, mapRefs(128, w))
	f.deploy(t, "w1", bad)
	if reason := f.awaitStatus(t, bad.Task, transport.TaskPhase_TASK_PHASE_FAILED); !strings.Contains(reason, `unknown operator "nosuchop"`) {
		t.Fatalf("failure reason %q does not name the operator", reason)
	}
}

// TestSourceFailsOnKafkaOutage: a source whose partitions get nothing but
// errors from Kafka for KafkaTimeout (the broker is gone) fails with the
// reason, so that the leader restarts the job with backoff and shows why,
// instead of the job looking healthy while it reads nothing.
func TestSourceFailsOnKafkaOutage(t *testing.T) {
	kafka := newControlledKafka(t)
	f, sd := runningWordSource(t, kafka.brokers)

	kafka.stop()
	if reason := f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_FAILED); !strings.Contains(reason, "only errors from Kafka") {
		t.Fatalf("failure reason %q does not say that Kafka answers only errors", reason)
	}
}

// TestSourceFailsOnHungBroker: a broker that takes connections and requests
// but answers none (a frozen host, a black-holed network) fails the source
// as an absent one does, although sarama's errors then come further apart
// than KafkaTimeout: each waits for a read timeout of its own.
func TestSourceFailsOnHungBroker(t *testing.T) {
	kafka := newControlledKafka(t)
	f, sd := runningWordSource(t, kafka.brokers)

	kafka.hang()
	began := time.Now()
	reason := f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_FAILED)
	if !strings.Contains(reason, "only errors from Kafka") {
		t.Fatalf("failure reason %q does not say that Kafka answers only errors", reason)
	}
	t.Logf("failed %v after the broker stopped answering: %s", time.Since(began).Round(time.Millisecond), reason)
}

// TestSourceResetsOffsetBeyondEnd: a restored offset beyond the end of its
// partition (the topic was deleted and recreated) is replaced by the start
// policy, earliest here: the source reads the new topic from its start.
func TestSourceResetsOffsetBeyondEnd(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	produce(t, brokers, "words", []record{{0, "", "a b"}, {0, "", "c"}, {0, "", "a"}})
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	refs := mapRefs(128, w)
	md := mapDeploy("j", 2, operator.WordCount, 1, 128, refs, 0)
	sd := sourceDeploy("j", 2, 0, operator.WordCount, brokers, "words", []int32{0}, refs)
	sd.RestoreCheckpointId, sd.RestoreOffsets = 9, map[int32]int64{0: 5000}
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	checkpointUntil(t, f, 10, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 3}, nil)
}

// openChannel opens a data channel to addr with header and reports the
// status it ended with, or codes.OK when the server accepted it.
func openChannel(t *testing.T, addr string, h *transport.ChannelHeader) codes.Code {
	t.Helper()
	out, err := dialChannel(t, addr, h)
	if err != nil {
		return status.Code(err)
	}
	out.close()
	return codes.OK
}

// dialChannel opens a data channel to addr with header, as a source task
// of another worker would; its connection closes when the test ends.
func dialChannel(t *testing.T, addr string, h *transport.ChannelHeader) (*remoteOutput, error) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return openRemote(context.Background(), transport.NewDataClient(conn), h, waitTimeout)
}

// TestFencing: a deploy of attempt 2 stops attempt 1's tasks; a late deploy
// of attempt 1 is ignored; data channels of attempt 1 are rejected.
func TestFencing(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.ChannelAcceptWait = 200 * time.Millisecond })
	refs := mapRefs(128, w)
	old := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", old)
	f.awaitStatus(t, old.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	hdr := func(attempt uint64, task string) *transport.ChannelHeader {
		return &transport.ChannelHeader{JobId: "job", Attempt: attempt, SourceIndex: 0, MapTaskId: task}
	}

	cur := mapDeploy("job", 2, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", cur)
	if reason := f.awaitStatus(t, old.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "superseded by attempt 2") {
		t.Fatalf("attempt 1 cancelled with reason %q", reason)
	}
	f.awaitStatus(t, cur.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	// Deploys are handled in order: once the answer to the cancel below is
	// in, the stale deploy before it has been handled, and ignored.
	f.deploy(t, "w1", old)
	marker := ref("job", 2, "no-such-task")
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: marker}}})
	f.awaitStatus(t, marker, transport.TaskPhase_TASK_PHASE_CANCELLED)
	deploying := 0
	for _, r := range f.messages() {
		if st := r.msg.GetStatus(); st != nil && sameTask(st.GetTask(), old.Task) && st.GetPhase() == transport.TaskPhase_TASK_PHASE_DEPLOYING {
			deploying++
		}
	}
	if deploying != 1 {
		t.Fatalf("attempt 1 reported DEPLOYING %d times, want once: the stale deploy must be ignored", deploying)
	}

	if c := openChannel(t, w.DataAddr(), hdr(1, "map-0")); c != codes.FailedPrecondition {
		t.Fatalf("channel of stale attempt 1: %v, want FailedPrecondition", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr(3, "map-0")); c != codes.NotFound {
		t.Fatalf("channel of attempt 3 that is not deployed: %v, want NotFound", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr(2, "map-0")); c != codes.OK {
		t.Fatalf("channel of current attempt 2: %v, want accepted", c)
	}
	if c := openChannel(t, w.DataAddr(), &transport.ChannelHeader{JobId: "job", Attempt: 2, SourceIndex: 5, MapTaskId: "map-0"}); c != codes.FailedPrecondition {
		t.Fatalf("channel of source index 5 of 1: %v, want FailedPrecondition", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr(2, "map-9")); c != codes.NotFound {
		t.Fatalf("channel of an unknown map task: %v, want NotFound", c)
	}
}

// TestMalformedBatchFailsMapTask: a packed batch that does not decode,
// sent on an accepted data channel, fails the map task with a reason that
// says so (the attempt restarts from its checkpoint), never a panic or a
// batch silently skipped: skipping it would lose records.
func TestMalformedBatchFailsMapTask(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	md := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", md)
	f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	out, err := dialChannel(t, w.DataAddr(), &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: 0, MapTaskId: "map-0"})
	if err != nil {
		t.Fatal(err)
	}
	defer out.close()
	// A record mark, then an item cut off inside its key.
	var bw transport.BatchWriter
	bw.Record(0, 0)
	bw.Item(3, []byte("key"), 1, nil)
	packed := bw.Bytes()
	_ = out.send(context.Background(), batchMessage(packed[:len(packed)-4]))
	reason := f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_FAILED)
	if !strings.Contains(reason, "batch from source 0: packed batch: ") || !strings.Contains(reason, "runs past the end") {
		t.Fatalf("map task failed with reason %q, want one naming the malformed batch", reason)
	}
}

// TestSlots fails a deploy beyond the worker's slots with a reason.
func TestSlots(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.Slots = 1 })
	refs := mapRefs(128, w)
	first := mapDeploy("j1", 1, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", first)
	f.awaitStatus(t, first.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	second := mapDeploy("j2", 1, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", second)
	if reason := f.awaitStatus(t, second.Task, transport.TaskPhase_TASK_PHASE_FAILED); !strings.Contains(reason, "no free slot") {
		t.Fatalf("reason %q does not say the slots are full", reason)
	}
	// Cancelling the first frees its slot.
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: first.Task, Reason: "test"}}})
	if reason := f.awaitStatus(t, first.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); reason != "cancelled by leader: test" {
		t.Fatalf("cancel reason %q", reason)
	}
	third := mapDeploy("j3", 1, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", third)
	f.awaitStatus(t, third.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
}

// TestLeaseExpiry: when the leader goes silent, the worker stops its tasks
// after the lease and tells the leader once it is back.
func TestLeaseExpiry(t *testing.T) {
	f := newFakeCoord(t, true, "")
	f.leaseMs, f.hbMs = 400, 50
	w := startWorker(t, "w1", f, nil)
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	f.silent.Store(true)
	reason := f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_CANCELLED)
	if !strings.Contains(reason, "lease expired") {
		t.Fatalf("cancel reason %q does not mention the lease", reason)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n < 1 {
		t.Fatalf("lease expiries = %v, want at least 1", n)
	}
}

// TestLeaderlessCoordinatorRenewsLease: when the cluster has no leader, a
// coordinator that says so renews the worker's lease at every heartbeat, so
// tasks run on for many leases; once it names a leader, the worker goes there
// and reports its tasks; when nobody answers, the lease runs out.
func TestLeaderlessCoordinatorRenewsLease(t *testing.T) {
	f := newFakeCoord(t, true, "")
	f.leaseMs, f.hbMs = 300, 30
	w := startWorker(t, "w1", f, func(c *Config) { c.MetricsAddr = "127.0.0.1:0" })
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	// The leader steps down and no other is elected.
	f.leaderless.Store(true)
	f.kick("w1")
	// 40 answers at the 30 ms heartbeat span four 300 ms leases.
	waitFor(t, "40 answers without a leader", func() bool { return f.leaderlessAnswers.Load() >= 40 })
	for _, r := range f.messages() {
		if st := r.msg.GetStatus(); st != nil && isTerminal(st.GetPhase()) {
			t.Fatalf("task ended without a leader while a coordinator renewed the lease: %v", st)
		}
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_leaderless", nil); n != 1 {
		t.Fatalf("leaderless gauge = %v, want 1", n)
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n != 0 {
		t.Fatalf("lease expiries = %v, want 0", n)
	}

	// A leader is elected: the held stream names it and the worker reports
	// its running task there.
	leader := newFakeCoord(t, false, "")
	leader.leaseMs, leader.hbMs = 300, 30
	f.elected.Store(&leader.rpcAddr)
	hello := leader.await(t, "hello at the new leader", func(r received) bool { return r.msg.GetHello() != nil }).GetHello()
	if len(hello.GetRunning()) != 1 || !sameTask(hello.GetRunning()[0].GetTask(), d.Task) {
		t.Fatalf("hello at the new leader lists %v, want the running map task", hello.GetRunning())
	}

	// Every coordinator falls silent (the leaderless one answers no
	// heartbeat either): nothing renews the lease, and the task stops.
	f.elected.Store(nil)
	f.silent.Store(true)
	leader.silent.Store(true)
	leader.kick("w1")
	if reason := leader.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "lease expired") {
		t.Fatalf("cancel reason %q does not mention the lease", reason)
	}
}

// TestRedirect: a follower's NotLeader sends the worker to the leader, and
// the worker's Hello reports its running tasks.
func TestRedirect(t *testing.T) {
	leader := newFakeCoord(t, false, "")
	follower := newFakeCoord(t, true, leader.rpcAddr)
	startWorker(t, "w1", follower, nil)
	leader.awaitSession(t, "w1")
	hello := leader.await(t, "hello", func(r received) bool { return r.msg.GetHello() != nil }).GetHello()
	if hello.GetWorkerId() != "w1" || hello.GetSlots() != 4 || hello.GetDataAddr() == "" {
		t.Fatalf("hello = %v", hello)
	}
}

// TestRedirectSkipsBackoff: a leader a follower names is dialled at once,
// not after the session backoff, which here outlasts the test's deadline.
func TestRedirectSkipsBackoff(t *testing.T) {
	leader := newFakeCoord(t, false, "")
	follower := newFakeCoord(t, true, leader.rpcAddr)
	startWorker(t, "w1", follower, func(c *Config) {
		c.SessionBackoffMin, c.SessionBackoffMax = 10*time.Minute, 10*time.Minute
	})
	leader.awaitSession(t, "w1")
}

// TestReconnectKeepsTasks: when the leader ends the session (it stepped
// down), the worker keeps its tasks, reconnects and lists them in Hello.
func TestReconnectKeepsTasks(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	f.kick("w1")
	hello := f.await(t, "a second hello", func(r received) bool {
		return r.msg.GetHello() != nil && len(r.msg.GetHello().GetRunning()) > 0
	}).GetHello()
	if len(hello.GetRunning()) != 1 || !sameTask(hello.GetRunning()[0].GetTask(), d.Task) || hello.GetRunning()[0].GetPhase() != transport.TaskPhase_TASK_PHASE_RUNNING {
		t.Fatalf("hello after reconnect lists %v, want the running map task", hello.GetRunning())
	}
	for _, r := range f.messages() {
		if st := r.msg.GetStatus(); st != nil && isTerminal(st.GetPhase()) {
			t.Fatalf("task ended on reconnect: %v", st)
		}
	}
}

// TestShutdownReportsCancelled: a stopping worker cancels its tasks and
// reports it before its session closes; its metrics were served meanwhile.
func TestShutdownReportsCancelled(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w, stop := startStoppableWorker(t, "w1", f, func(c *Config) { c.MetricsAddr = "127.0.0.1:0" })
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	resp, err := http.Get("http://" + w.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatalf("get metrics: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !strings.Contains(string(body), "coordflow_worker_tasks 1") {
		t.Fatalf("metrics page (err %v) does not show one task:\n%s", err, body)
	}

	stop()
	if reason := f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); reason != "worker shutting down" {
		t.Fatalf("cancel reason %q", reason)
	}
}

// TestDebugProfiler: EnableDebug serves Go's profiler next to the metrics,
// a worker without it does not, and EnableDebug without a metrics address
// is refused rather than silently serving nothing.
func TestDebugProfiler(t *testing.T) {
	f := newFakeCoord(t, true, "")
	get := func(w *Worker, path string) int {
		t.Helper()
		resp, err := http.Get("http://" + w.MetricsAddr() + path)
		if err != nil {
			t.Fatalf("get %s: %v", path, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	on := startWorker(t, "w1", f, func(c *Config) { c.MetricsAddr = "127.0.0.1:0"; c.EnableDebug = true })
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/allocs?debug=1", "/debug/pprof/goroutine?debug=1"} {
		if code := get(on, path); code != http.StatusOK {
			t.Errorf("with EnableDebug, %s answered %d, want 200", path, code)
		}
	}
	off := startWorker(t, "w2", f, func(c *Config) { c.MetricsAddr = "127.0.0.1:0" })
	if code := get(off, "/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("without EnableDebug, /debug/pprof/ answered %d, want 404", code)
	}
	if code := get(off, "/metrics"); code != http.StatusOK {
		t.Errorf("/metrics answered %d, want 200", code)
	}

	_, err := New(Config{ID: "w3", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", EnableDebug: true})
	if err == nil || !strings.Contains(err.Error(), "MetricsAddr") {
		t.Fatalf("EnableDebug without MetricsAddr: err %v, want one naming MetricsAddr", err)
	}
}

// TestCarriedAcrossSessions: a new session keeps terminal statuses, keeps
// acks and declines only with the same leader and term, and drops
// non-terminal statuses, which Hello supersedes.
func TestCarriedAcrossSessions(t *testing.T) {
	r := &transport.TaskRef{JobId: "job", Attempt: 1, TaskId: "map-0"}
	queued := func() []*transport.WorkerMessage {
		return []*transport.WorkerMessage{
			{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{Task: r, Phase: transport.TaskPhase_TASK_PHASE_RUNNING}}},
			{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{Task: r, CheckpointId: 7}}},
			{Msg: &transport.WorkerMessage_Decline{Decline: &transport.CheckpointDecline{Task: r, CheckpointId: 8}}},
			{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{Task: r, Phase: transport.TaskPhase_TASK_PHASE_FAILED}}},
		}
	}
	same := carried(queued(), true)
	if len(same) != 3 || same[0].GetAck() == nil || same[1].GetDecline() == nil || same[2].GetStatus().GetPhase() != transport.TaskPhase_TASK_PHASE_FAILED {
		t.Fatalf("same leader: carried %v, want ack, decline, FAILED", same)
	}
	other := carried(queued(), false)
	if len(other) != 1 || other[0].GetStatus().GetPhase() != transport.TaskPhase_TASK_PHASE_FAILED {
		t.Fatalf("new leader: carried %v, want FAILED only", other)
	}
}

// TestChannelCredential: a data channel must present its attempt's channel
// token. One opened early, before the map task is deployed, waits and is then
// refused; the real source, which comes later, is not locked out by it.
func TestChannelCredential(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.ChannelAcceptWait = 10 * time.Second })
	refs := mapRefs(128, w)
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	d.ChannelToken = "attempt-1-secret"
	hdr := func(token string) *transport.ChannelHeader {
		return &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: 0, MapTaskId: "map-0", ChannelToken: token}
	}

	early := make(chan codes.Code, 1)
	go func() { early <- openChannel(t, w.DataAddr(), hdr("guessed")) }()
	// The early channel is waiting for the map task once the data server
	// holds it; deploy only then, so that it is first in line.
	deadline := time.Now().Add(waitTimeout)
	for len(w.data.waiting) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("early channel never reached the data server")
		}
		time.Sleep(5 * time.Millisecond)
	}
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	if c := <-early; c != codes.PermissionDenied {
		t.Fatalf("early channel with a wrong token: %v, want PermissionDenied", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr("")); c != codes.PermissionDenied {
		t.Fatalf("channel without a token: %v, want PermissionDenied", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr("attempt-1-secret")); c != codes.OK {
		t.Fatalf("channel of the real source: %v, want accepted", c)
	}
}

// TestChannelWithoutCredential: an attempt deployed by a leader of a version
// before channel credentials has no token in its DeployTasks, and its
// sources send none: during a rolling upgrade such a channel is accepted,
// while one that brings a token the attempt was never given is refused.
func TestChannelWithoutCredential(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.ChannelAcceptWait = 2 * time.Second })
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	d.ChannelToken = "" // as an older leader deploys
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	hdr := func(token string) *transport.ChannelHeader {
		return &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: 0, MapTaskId: "map-0", ChannelToken: token}
	}
	if c := openChannel(t, w.DataAddr(), hdr("forged")); c != codes.PermissionDenied {
		t.Fatalf("channel with a token the attempt was never given: %v, want PermissionDenied", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr("")); c != codes.OK {
		t.Fatalf("channel of an attempt deployed without credentials: %v, want accepted", c)
	}
}
