package worker

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// txnTestSink opens the exactly-once sink of map task task against brokers,
// as an attempt of job "j" would, and recovers restored first.
func txnTestSink(t *testing.T, env *taskEnv, brokers []string, task string, restored []*transport.SinkTxn) *sink {
	t.Helper()
	return txnTestSinkWith(t, env, brokers, task, restored, 60*time.Second, 10*time.Second)
}

// txnTestSinkWith is txnTestSink with the transaction and checkpoint timeouts.
func txnTestSinkWith(t *testing.T, env *taskEnv, brokers []string, task string, restored []*transport.SinkTxn, txnTimeout, ckptTimeout time.Duration) *sink {
	t.Helper()
	spec := &transport.SinkSpec{
		Brokers: brokers, Topic: "out", Delivery: "exactly_once",
		TransactionTimeoutMs: txnTimeout.Milliseconds(), CheckpointTimeoutMs: ckptTimeout.Milliseconds(), TransactionalIdPrefix: "coordflow-j",
	}
	s, err := openSink(env, taskKey{job: "j", attempt: 1, id: task}, spec, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	if err := s.txn.recover(restored, []string{task}); err != nil {
		t.Fatal(err)
	}
	return s
}

func txnTestEnv() *taskEnv {
	return &taskEnv{workerID: "w1", cfg: &Config{KafkaTimeout: 2 * time.Second}, metrics: newMetrics()}
}

// write adds outputs "<prefix>0".."<prefix>n-1" and flushes them.
func write(t *testing.T, s *sink, prefix string, n int) {
	t.Helper()
	for i := range n {
		v := []byte(fmt.Sprintf("%s%d", prefix, i))
		if err := s.add(&operator.Output{Key: v, Value: v}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
}

// readCommitted returns the values of the records of partition 0 of topic
// a read_committed consumer sees: want of them, or what it has after a few
// seconds, plus any that follow within a moment (duplicates would).
func readCommitted(t *testing.T, brokers []string, topic string, want int) []string {
	t.Helper()
	var out []string
	for _, m := range readCommittedMessages(t, brokers, topic, want) {
		out = append(out, string(m.Value))
	}
	return out
}

func seq(prefix string, n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("%s%d", prefix, i))
	}
	return out
}

func TestExactlyOnceSinkCommitsWhenTheCheckpointCompletes(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	env := txnTestEnv()
	s := txnTestSink(t, env, brokers, "map-0", nil)

	write(t, s, "a", 3)
	txns, err := s.txn.preCommit(1)
	if err != nil {
		t.Fatal(err)
	}
	if len(txns) != 1 || txns[0].GetCheckpointId() != 1 || txns[0].GetTransactionalId() != "coordflow-j-map-0-0" || txns[0].GetProducerId() < 0 {
		t.Fatalf("pre-committed transactions: %v", txns)
	}
	write(t, s, "b", 2) // the next checkpoint's, in the next transaction
	if got := readCommittedFor(t, brokers, "out", 1, time.Second); len(got) != 0 {
		t.Fatalf("read_committed saw %v before the checkpoint completed", got)
	}
	if err := s.txn.completed(1); err != nil {
		t.Fatal(err)
	}
	if got := readCommitted(t, brokers, "out", 3); !slices.Equal(got, seq("a", 3)) {
		t.Fatalf("after checkpoint 1: read_committed saw %v, want %v", got, seq("a", 3))
	}
	// An idle checkpoint lists no transaction of its own.
	if txns, err = s.txn.preCommit(2); err != nil || len(txns) != 1 || txns[0].GetCheckpointId() != 2 {
		t.Fatalf("checkpoint 2: %v, %v", txns, err)
	}
	if txns, err = s.txn.preCommit(3); err != nil || len(txns) != 1 {
		t.Fatalf("checkpoint 3 (nothing written since 2): %v, %v", txns, err)
	}
	if err := s.txn.completed(3); err != nil {
		t.Fatal(err)
	}
	if got := readCommitted(t, brokers, "out", 5); !slices.Equal(got, append(seq("a", 3), seq("b", 2)...)) {
		t.Fatalf("after checkpoint 3: read_committed saw %v", got)
	}
}

// TestExactlyOnceSinkReusesIdsOnlyWhenNoRestoreNeedsThem runs many
// checkpoints with some aborted and checks the ids cycle without ever
// running out, and every record is committed once.
func TestExactlyOnceSinkReusesIdsOnlyWhenNoRestoreNeedsThem(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	var want []string
	for id := uint64(1); id <= 12; id++ {
		prefix := fmt.Sprintf("c%d-", id)
		write(t, s, prefix, 2)
		want = append(want, seq(prefix, 2)...)
		txns, err := s.txn.preCommit(id)
		if err != nil {
			t.Fatalf("checkpoint %d: %v", id, err)
		}
		for _, tx := range txns {
			if tx.GetCheckpointId() > id {
				t.Fatalf("checkpoint %d lists %v", id, tx)
			}
		}
		if id%3 == 0 {
			continue // aborted: its transaction waits for the next completion
		}
		if err := s.txn.completed(id); err != nil {
			t.Fatalf("complete %d: %v", id, err)
		}
	}
	// 12 was aborted: the next completed checkpoint commits its records.
	if _, err := s.txn.preCommit(13); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(13); err != nil {
		t.Fatal(err)
	}
	if got := readCommitted(t, brokers, "out", len(want)); !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %v\nwant %v", got, want)
	}
}

// TestExactlyOnceSinkRecoveryCommitsAndFences: an attempt pre-commits
// checkpoint 1 and writes more, and is then replaced before it hears that 1
// completed. The new attempt commits 1's transaction from the checkpoint
// alone, aborts the rest, and the old attempt is fenced when it comes back.
func TestExactlyOnceSinkRecoveryCommitsAndFences(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	oldEnv := txnTestEnv()
	old := txnTestSink(t, oldEnv, brokers, "map-0", nil)
	write(t, old, "a", 3)
	txns, err := old.txn.preCommit(1)
	if err != nil {
		t.Fatal(err)
	}
	write(t, old, "lost", 2) // after the barrier: not in checkpoint 1

	newEnv := txnTestEnv()
	restored := txnTestSink(t, newEnv, brokers, "map-0", txns)
	if got := readCommitted(t, brokers, "out", 3); !slices.Equal(got, seq("a", 3)) {
		t.Fatalf("after recovery: read_committed saw %v, want %v", got, seq("a", 3))
	}
	if n := metricValue(t, newEnv.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "recovered"}); n != 1 {
		t.Fatalf("recovered transactions: %v, want 1", n)
	}

	// The zombie learns that 1 completed: committing again changes nothing.
	// Its next write is fenced.
	if err := old.txn.completed(1); err != nil {
		t.Fatalf("zombie's late commit of a committed transaction: %v", err)
	}
	v := []byte("zombie")
	if err := old.add(&operator.Output{Key: v, Value: v}); err != nil {
		t.Fatal(err)
	}
	if err := old.flush(); !errors.Is(err, errFenced) {
		t.Fatalf("zombie write: %v, want fenced", err)
	}
	if n := metricValue(t, oldEnv.metrics.registry, "coordflow_sink_fenced_total", nil); n != 1 {
		t.Fatalf("fenced metric of the zombie: %v", n)
	}
	// A second restore from the same checkpoint commits again, harmlessly.
	again := txnTestSink(t, txnTestEnv(), brokers, "map-0", txns)
	write(t, again, "b", 1)
	if _, err := again.txn.preCommit(2); err != nil {
		t.Fatal(err)
	}
	if err := again.txn.completed(2); err != nil {
		t.Fatal(err)
	}
	if got := readCommitted(t, brokers, "out", 4); !slices.Equal(got, append(seq("a", 3), "b0")) {
		t.Fatalf("after a second restore: read_committed saw %v", got)
	}
	_ = restored
}

// TestExactlyOnceSinkRestoreReportsATimedOutTransaction: a transaction the
// broker aborted at its timeout before anyone committed it cannot be
// committed by a restore; the restore says so rather than pretend.
func TestExactlyOnceSinkRestoreReportsATimedOutTransaction(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	s := txnTestSinkWith(t, txnTestEnv(), brokers, "map-0", nil, 1500*time.Millisecond, 100*time.Millisecond)
	write(t, s, "a", 2)
	txns, err := s.txn.preCommit(1)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the broker to abort the transaction at its timeout", func() bool {
		st, err := s.txn.describe(txns[0].GetTransactionalId())
		return err == nil && st.ProducerEpoch != int16(txns[0].GetProducerEpoch())
	})
	env := txnTestEnv()
	txnTestSinkWith(t, env, brokers, "map-0", txns, 1500*time.Millisecond, 100*time.Millisecond)
	if n := metricValue(t, env.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "ended_before"}); n != 1 {
		t.Fatalf("ended_before transactions: %v, want 1", n)
	}
	if got := readCommittedFor(t, brokers, "out", 1, time.Second); len(got) != 0 {
		t.Fatalf("read_committed saw %v of an aborted transaction", got)
	}
}

// TestExactlyOnceSinkDeclinesWhenEveryIdIsTaken: with no checkpoint
// completing, the pool runs out of ids; the barrier is then declined and
// the open transaction goes on, and the next completion frees them.
func TestExactlyOnceSinkDeclinesWhenEveryIdIsTaken(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	var declined uint64
	for id := uint64(1); id <= txnSlots+1; id++ {
		write(t, s, fmt.Sprintf("c%d-", id), 1)
		if _, err := s.txn.preCommit(id); errors.Is(err, errNoFreeTxn) {
			declined = id
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if declined != txnSlots {
		t.Fatalf("first declined checkpoint: %d, want %d", declined, txnSlots)
	}
	if err := s.txn.completed(txnSlots - 1); err != nil {
		t.Fatal(err)
	}
	txns, err := s.txn.preCommit(txnSlots + 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(txns) != 1 || txns[0].GetCheckpointId() != txnSlots+1 {
		t.Fatalf("after the completion: %v", txns)
	}
}

// TestExactlyOnceSinkRefusesATransactionTooOldToCommit: a transaction that
// could outlive the transaction timeout before its commit fails the task.
func TestExactlyOnceSinkRefusesATransactionTooOldToCommit(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"out": 1})
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	now := time.Now()
	s.txn.now = func() time.Time { return now }
	write(t, s, "a", 1)
	now = now.Add(41 * time.Second) // timeout 60 s - 2 x checkpoint timeout 10 s
	if _, err := s.txn.preCommit(1); err == nil || errors.Is(err, errNoFreeTxn) {
		t.Fatalf("pre-commit of a 41 s old transaction: %v", err)
	}
}

// TestMapTaskExactlyOnceSink runs sum with an exactly-once sink: the
// outputs stay invisible to a read_committed consumer until the checkpoint
// that covers them completes. Then the next attempt restores from a
// checkpoint whose completion its task never heard of (the worker died
// between pre-commit and commit): the restored task commits the
// checkpoint's transaction, and the outputs appear once.
func TestMapTaskExactlyOnceSink(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"nums": 1, "sums": 1})
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	refs := mapRefs(128, w)
	sinkSpec := &transport.SinkSpec{Brokers: brokers, Topic: "sums", Delivery: "exactly_once",
		TransactionTimeoutMs: 60_000, CheckpointTimeoutMs: 10_000, TransactionalIdPrefix: "coordflow-sum"}
	deploy := func(attempt uint64) (*transport.DeployTask, *transport.DeployTask) {
		md := mapDeploy("sum", attempt, operator.Sum, 1, 128, refs, 0)
		md.Sink = sinkSpec
		sd := sourceDeploy("sum", attempt, 0, operator.Sum, brokers, "nums", []int32{0}, refs)
		return md, sd
	}
	sumsOf := func(recs []string) map[string]string {
		out := map[string]string{}
		for i := 0; i+1 < len(recs); i += 2 {
			out[recs[i]] = recs[i+1]
		}
		return out
	}
	committed := func(want int) []string {
		t.Helper()
		var kv []string
		for _, m := range readCommittedMessages(t, brokers, "sums", want) {
			kv = append(kv, string(m.Key), string(m.Value))
		}
		return kv
	}

	produce(t, brokers, "nums", []record{{0, "a", "1"}, {0, "b", "10"}, {0, "a", "2"}})
	md, sd := deploy(1)
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	id, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 3}, nil)
	txns := acks["map-0"].GetState().GetSinkTxns()
	if len(txns) == 0 || txns[len(txns)-1].GetCheckpointId() != id {
		t.Fatalf("checkpoint %d's map ack lists sink transactions %v, want one pre-committed at it", id, txns)
	}
	if got := readCommittedFor(t, brokers, "sums", 1, time.Second); len(got) != 0 {
		t.Fatalf("read_committed saw %v before checkpoint %d completed", got, id)
	}
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Complete{Complete: &transport.CheckpointComplete{
		Task: md.Task, CheckpointId: id,
	}}})
	if got := sumsOf(committed(3)); !reflect.DeepEqual(got, map[string]string{"a": "3", "b": "10"}) {
		t.Fatalf("after checkpoint %d completed: sums %v, want a=3 b=10", id, got)
	}

	// More input, a checkpoint nobody tells the task about, and a new attempt.
	produce(t, brokers, "nums", []record{{0, "b", "5"}, {0, "c", "7"}})
	id2, acks2 := checkpointUntil(t, f, id+1, map[string]*transport.TaskRef{"w1": sd.Task}, []*transport.TaskRef{md.Task}, map[int32]int64{0: 5}, nil)
	md2, sd2 := deploy(2)
	st := acks2["map-0"].GetState()
	md2.RestoreCheckpointId = id2
	md2.RestoreKeyed = []*transport.KeyedBlob{{TaskId: "map-0", Data: st.GetKeyed(), Sha256: st.GetKeyedSha256(),
		KeyGroupStart: 0, KeyGroupEnd: 128, Applied: st.GetApplied(), SinkTxns: st.GetSinkTxns()}}
	sd2.RestoreCheckpointId, sd2.RestoreOffsets = id2, acks2["source-0"].GetState().GetOffsets()
	f.deploy(t, "w1", md2)
	f.deploy(t, "w1", sd2)
	f.awaitStatus(t, sd2.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	got := committed(7)
	if len(got) != 10 || !reflect.DeepEqual(sumsOf(got[6:]), map[string]string{"b": "15", "c": "7"}) {
		t.Fatalf("after the restore: read_committed saw %v, want a=1 b=10 a=3 then b=15 c=7, once", got)
	}
}

// readCommittedMessages is readCommitted with whole records.
func readCommittedMessages(t *testing.T, brokers []string, topic string, want int) []*sarama.ConsumerMessage {
	return readCommittedFor(t, brokers, topic, want, 5*time.Second)
}

// readCommittedFor is readCommittedMessages waiting up to wait for want.
func readCommittedFor(t *testing.T, brokers []string, topic string, want int, wait time.Duration) []*sarama.ConsumerMessage {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	cfg.Consumer.IsolationLevel = sarama.ReadCommitted
	cfg.Consumer.MaxWaitTime = 50 * time.Millisecond
	c, err := sarama.NewConsumer(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pc, err := c.ConsumePartition(topic, 0, sarama.OffsetOldest)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var got []*sarama.ConsumerMessage
	deadline := time.After(wait)
	for len(got) < want {
		select {
		case m := <-pc.Messages():
			got = append(got, m)
		case <-deadline:
			return got
		}
	}
	quiet := time.After(300 * time.Millisecond)
	for {
		select {
		case m := <-pc.Messages():
			got = append(got, m)
		case <-quiet:
			return got
		}
	}
}
