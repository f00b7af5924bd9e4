package worker

import (
	"maps"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// sinkJob is a sum job of one source and one map task on worker w1 of f,
// whose map task writes to topic "sums" with an exactly-once sink.
type sinkJob struct {
	f       *fakeCoord
	brokers []string
	md, sd  *transport.DeployTask
}

func startSinkJob(t *testing.T, brokers []string) *sinkJob {
	t.Helper()
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	refs := mapRefs(128, w)
	md := mapDeploy("sum", 1, operator.Sum, 1, 128, refs, 0)
	md.Sink = &transport.SinkSpec{Brokers: brokers, Topic: "sums", Delivery: "exactly_once",
		TransactionTimeoutMs: 60_000, CheckpointTimeoutMs: 10_000, TransactionalIdPrefix: "coordflow-sum"}
	sd := sourceDeploy("sum", 1, 0, operator.Sum, brokers, "nums", []int32{0}, refs)
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	return &sinkJob{f: f, brokers: brokers, md: md, sd: sd}
}

// checkpoint triggers checkpoint id and returns the offsets the source
// acked and the map task's ack or decline of it.
func (j *sinkJob) checkpoint(t *testing.T, id uint64) (map[int32]int64, *transport.CheckpointAck, *transport.CheckpointDecline) {
	t.Helper()
	j.f.trigger(t, "w1", j.sd.Task, id)
	offsets := j.f.awaitAck(t, j.sd.Task, id).GetState().GetOffsets()
	m := j.f.await(t, "ack or decline of checkpoint by the map task", func(rc received) bool {
		if a := rc.msg.GetAck(); a != nil {
			return sameTask(a.GetTask(), j.md.Task) && a.GetCheckpointId() == id
		}
		d := rc.msg.GetDecline()
		return d != nil && sameTask(d.GetTask(), j.md.Task) && d.GetCheckpointId() == id
	})
	return offsets, m.GetAck(), m.GetDecline()
}

// complete tells the map task that checkpoint id completed.
func (j *sinkJob) complete(t *testing.T, id uint64) {
	t.Helper()
	j.f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
		Task: j.md.Task, CheckpointId: id,
	}}})
}

// declineWhileMissing is declineWhile for a missing sink topic: every
// decline names the topic.
func (j *sinkJob) declineWhileMissing(t *testing.T, id uint64, written int64, n int) uint64 {
	t.Helper()
	return j.declineWhile(t, "the sink topic is missing", id, written, n,
		func(reason string) bool { return strings.Contains(reason, `sink topic "sums"`) })
}

// checkpointUntilAcked triggers checkpoints from id+1 on until the map task
// acks one whose source offsets are want, and returns its id. Declines
// before it must name the sink topic: the map task retries its writes at a
// backoff, so the first checkpoints after the topic appears may still be
// declined.
func (j *sinkJob) checkpointUntilAcked(t *testing.T, id uint64, want map[int32]int64) uint64 {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		id++
		offsets, ack, decl := j.checkpoint(t, id)
		if ack != nil && maps.Equal(offsets, want) {
			return id
		}
		if decl != nil && !strings.Contains(decl.GetReason(), `sink topic "sums"`) {
			t.Fatalf("checkpoint %d declined with reason %q, want one that names the sink topic", id, decl.GetReason())
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint acked by the map task with source offsets %v within %v; last: %v, decline %v", want, waitTimeout, offsets, decl)
		}
		time.Sleep(50 * time.Millisecond) // poll interval, not a synchronisation
	}
}

// noFailure fails the test if a task of the job reported FAILED.
func (j *sinkJob) noFailure(t *testing.T) {
	t.Helper()
	for _, rc := range j.f.messages() {
		if st := rc.msg.GetStatus(); st != nil && st.GetPhase() == transport.TaskPhase_TASK_PHASE_FAILED {
			t.Fatalf("task %s failed: %s", st.GetTask().GetTaskId(), st.GetReason())
		}
	}
}

// committedKV reads want records of topic sums read_committed, as key,
// value, key, value...
func committedKV(t *testing.T, brokers []string, want int) []string {
	t.Helper()
	var kv []string
	for _, m := range readCommittedMessages(t, brokers, "sums", want) {
		kv = append(kv, string(m.Key), string(m.Value))
	}
	return kv
}

func sinkAdmin(t *testing.T, brokers []string) sarama.ClusterAdmin {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	admin, err := sarama.NewClusterAdmin(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = admin.Close() })
	return admin
}

func createSums(t *testing.T, admin sarama.ClusterAdmin) {
	t.Helper()
	if err := admin.CreateTopic("sums", &sarama.TopicDetail{NumPartitions: 1, ReplicationFactor: 1}, false); err != nil {
		t.Fatalf("create topic sums: %v", err)
	}
}

// TestMapTaskExactlyOnceSinkWaitsForAMissingTopic: issue 7, item 6. The
// sink topic does not exist when the job starts. The map task runs all the
// same, keeps its state, and declines every checkpoint it cannot
// pre-commit with a reason that names the topic (the leader aborts those
// and goes on); once the topic is created, checkpoints complete again by
// themselves, and read_committed sees every update once, in order.
func TestMapTaskExactlyOnceSinkWaitsForAMissingTopic(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"nums": 1})
	admin := sinkAdmin(t, brokers)
	produce(t, brokers, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	j := startSinkJob(t, brokers)

	id := j.declineWhileMissing(t, 0, 0, 3)
	j.noFailure(t)

	createSums(t, admin)
	id = j.checkpointUntilAcked(t, id, map[int32]int64{0: 3})
	if got := readCommittedFor(t, brokers, "sums", 1, time.Second); len(got) != 0 {
		t.Fatalf("read_committed saw %d records before checkpoint %d completed", len(got), id)
	}
	j.complete(t, id)
	want := []string{"a", "1", "b", "10", "a", "3"}
	if got := committedKV(t, brokers, 3); !reflect.DeepEqual(got, want) {
		t.Fatalf("after checkpoint %d completed: read_committed saw %v, want %v", id, got, want)
	}

	// It goes on as if nothing happened.
	produce(t, brokers, "nums", []record{{0, "b", "5"}, {0, "c", "7"}})
	id = j.checkpointUntilAcked(t, id, map[int32]int64{0: 5})
	j.complete(t, id)
	want = append(want, "b", "15", "c", "7")
	if got := committedKV(t, brokers, 5); !reflect.DeepEqual(got, want) {
		t.Fatalf("after checkpoint %d completed: read_committed saw %v, want %v", id, got, want)
	}
	j.noFailure(t)
}

// TestMapTaskExactlyOnceSinkWaitsForADeletedTopic: the sink topic is
// deleted while the job runs, between checkpoints (its transactions all
// committed). The next write fails; the map task holds its outputs and
// declines checkpoints naming the topic, and once the topic is created
// again the outputs since the deletion appear in it once, in order.
func TestMapTaskExactlyOnceSinkWaitsForADeletedTopic(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"nums": 1, "sums": 1})
	admin := sinkAdmin(t, brokers)
	produce(t, brokers, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	j := startSinkJob(t, brokers)
	id := j.checkpointUntilAcked(t, 0, map[int32]int64{0: 3})
	j.complete(t, id)
	if got, want := committedKV(t, brokers, 3), []string{"a", "1", "b", "10", "a", "3"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("before the deletion: read_committed saw %v, want %v", got, want)
	}

	if err := admin.DeleteTopic("sums"); err != nil {
		t.Fatalf("delete topic sums: %v", err)
	}
	produce(t, brokers, "nums", []record{{0, "b", "5"}, {0, "c", "7"}, {0, "a", "4"}})
	id = j.declineWhileMissing(t, id, 3, 3)
	j.noFailure(t)

	createSums(t, admin)
	id = j.checkpointUntilAcked(t, id, map[int32]int64{0: 6})
	j.complete(t, id)
	want := []string{"b", "15", "c", "7", "a", "7"}
	if got := committedKV(t, brokers, 3); !reflect.DeepEqual(got, want) {
		t.Fatalf("after the topic was created again: read_committed saw %v, want %v", got, want)
	}
	j.noFailure(t)
}
