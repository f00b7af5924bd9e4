package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

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
	return txnTestSinkLog(t, env, brokers, task, restored, txnTimeout, ckptTimeout, testLogger(t))
}

// txnTestSinkLog is txnTestSinkWith with the task's logger.
func txnTestSinkLog(t *testing.T, env *taskEnv, brokers []string, task string, restored []*transport.SinkTxn, txnTimeout, ckptTimeout time.Duration, log *slog.Logger) *sink {
	t.Helper()
	spec := &transport.SinkSpec{
		Brokers: brokers, Topic: "out", Delivery: "exactly_once",
		TransactionTimeoutMs: txnTimeout.Milliseconds(), CheckpointTimeoutMs: ckptTimeout.Milliseconds(), TransactionalIdPrefix: "coordflow-j",
	}
	s, err := openSink(t.Context(), env, taskKey{job: "j", attempt: 1, id: task}, spec, log)
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

// commitThrough pre-commits s's open transaction at checkpoint id's
// barrier and commits it as id completes.
func commitThrough(t *testing.T, s *sink, id uint64) {
	t.Helper()
	if _, err := s.txn.preCommit(id); err != nil {
		t.Fatalf("barrier %d: %v", id, err)
	}
	if err := s.txn.completed(id); err != nil {
		t.Fatalf("completion of %d: %v", id, err)
	}
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
	commitThrough(t, s, 13)
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
	commitThrough(t, again, 2)
	if got := readCommitted(t, brokers, "out", 4); !slices.Equal(got, append(seq("a", 3), "b0")) {
		t.Fatalf("after a second restore: read_committed saw %v", got)
	}
	_ = restored
}

// TestExactlyOnceSinkZombieLeavesItsSuccessorsIds: a task a recovery
// replaced (its worker frozen past its lease, say) that learns late that a
// checkpoint completed frees a transactional id it had committed on, and
// gives it a new epoch. It does so as the id's holder (KIP-360): the broker
// refuses that once the restored task has initialised the id, and the
// zombie fails instead of taking the id back from its successor. Kafka
// refuses so only while the id has no open transaction (an open one it
// aborts whatever epoch is named): the successor has taken the id but not
// written on it yet. kfake takes any epoch up to its own, so the test
// refuses what Kafka refuses: an initialisation as holder with an epoch
// below the one the id has now.
func TestExactlyOnceSinkZombieLeavesItsSuccessorsIds(t *testing.T) {
	c := newKafkaCluster(t, "out")
	brokers := c.ListenAddrs()
	var mu sync.Mutex
	current := map[string]int16{} // epochs of the ids the restored task holds
	var asHolder []string         // initialisations as holder: id@epoch
	c.ControlKey(int16(kmsg.InitProducerID), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		r := req.(*kmsg.InitProducerIDRequest)
		if r.TransactionalID == nil || r.ProducerID < 0 {
			return nil, nil, false
		}
		mu.Lock()
		defer mu.Unlock()
		asHolder = append(asHolder, fmt.Sprintf("%s@%d", *r.TransactionalID, r.ProducerEpoch))
		if e, ok := current[*r.TransactionalID]; ok && r.ProducerEpoch < e {
			resp := r.ResponseKind().(*kmsg.InitProducerIDResponse)
			resp.ErrorCode = kerr.ProducerFenced.Code
			return resp, nil, true
		}
		return nil, nil, false
	})

	old := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	write(t, old, "a", 2)
	commitThrough(t, old, 1)
	first := old.txn.slots[0] // committed at 1, free once 2 completes
	zombieEpoch := first.epoch
	write(t, old, "b", 2)
	txns, err := old.txn.preCommit(2)
	if err != nil {
		t.Fatal(err)
	}

	// Checkpoint 2 completes while old's worker is frozen; its task is
	// restored elsewhere from 2 and writes on.
	restored := txnTestSink(t, txnTestEnv(), brokers, "map-0", txns)
	mu.Lock()
	for _, s := range restored.txn.slots {
		if s.inited {
			current[s.id] = s.epoch
		}
	}
	mu.Unlock()
	if cur := restored.txn.cur; cur == nil || cur.id != first.id {
		t.Fatalf("the restored task writes on %v, want %s, the id the zombie frees", cur, first.id)
	}

	// The zombie resumes and hears that 2 completed.
	err = old.txn.completed(2)
	if !isFenced(err) || !errors.Is(err, errFenced) {
		t.Fatalf("the zombie's completion of 2: %v, want it fenced", err)
	}
	mu.Lock()
	sent := slices.Clone(asHolder)
	mu.Unlock()
	if want := fmt.Sprintf("%s@%d", first.id, zombieEpoch); !slices.Contains(sent, want) {
		t.Fatalf("initialisations as holder %v, want the zombie's %s", sent, want)
	}

	write(t, restored, "c", 2) // on the id the zombie failed to take back

	if _, err := restored.txn.preCommit(3); err != nil {
		t.Fatalf("the restored task's barrier after the zombie's try: %v", err)
	}
	if err := restored.txn.completed(3); err != nil {
		t.Fatalf("the restored task's commit after the zombie's try: %v", err)
	}
	want := append(append(seq("a", 2), seq("b", 2)...), seq("c", 2)...)
	if got := readCommitted(t, brokers, "out", len(want)); !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %v, want %v", got, want)
	}
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

// tv2Txn plays an attempt of map task map-0 whose sink writes with
// transaction protocol version 2 (KIP-890): franz-go's transactional
// producer, which speaks it (Produce v12 adds the partition to the
// transaction, EndTxn v5 bumps the epoch) against kfake, whose
// transaction.version is 2. It writes values in one transaction on the
// task's first transactional id and returns what the pre-commit at
// checkpoint 1 records, and the producer, its transaction still open.
func tv2Txn(t *testing.T, brokers []string, values []string, timeout time.Duration) (*transport.SinkTxn, *kgo.Client) {
	t.Helper()
	id := txnID("coordflow-j", "map-0", 0)
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.TransactionalID(id), kgo.TransactionTimeout(timeout),
		kgo.DefaultProduceTopic("out"), kgo.RequiredAcks(kgo.AllISRAcks()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	if err := cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	for _, v := range values {
		if err := cl.ProduceSync(t.Context(), &kgo.Record{Key: []byte(v), Value: []byte(v)}).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	st := describeTxn(t, brokers, id)
	if st.State != "Ongoing" {
		t.Fatalf("transaction %s after the writes: %s, want Ongoing", id, st.State)
	}
	return &transport.SinkTxn{TransactionalId: id, ProducerId: st.ProducerID, ProducerEpoch: int32(st.ProducerEpoch),
		CheckpointId: 1, ProtocolVersion: txnProtocolV2}, cl
}

// describeTxn asks the broker for transactional id id's state.
func describeTxn(t *testing.T, brokers []string, id string) kmsg.DescribeTransactionsResponseTransactionState {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	req := kmsg.NewPtrDescribeTransactionsRequest()
	req.TransactionalIDs = []string{id}
	resp, err := req.RequestWith(t.Context(), cl)
	if err != nil || len(resp.TransactionStates) != 1 || resp.TransactionStates[0].ErrorCode != 0 {
		t.Fatalf("describe transaction %s: %v %+v", id, err, resp)
	}
	return resp.TransactionStates[0]
}

// TestExactlyOnceSinkRestoresTV2Transactions: a transaction written under
// transaction protocol version 2, whose every EndTxn bumps the producer
// epoch (the case of FLINK-40689), is finished by a restore exactly once,
// whether the old attempt committed it before it crashed (the restore's
// commit carries the epoch before the bump, and must be taken as done) or
// crashed before EndTxn (the restore commits it); and a second restore from
// the same checkpoint is harmless.
func TestExactlyOnceSinkRestoresTV2Transactions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		commit bool // the old attempt committed before it crashed
	}{
		{"committed before the crash", true},
		{"crashed before EndTxn", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			brokers := newKafka(t, map[string]int32{"out": 1})
			txn, old := tv2Txn(t, brokers, seq("a", 3), time.Minute)
			if tc.commit {
				if err := old.EndTransaction(t.Context(), kgo.TryCommit); err != nil {
					t.Fatal(err)
				}
				if st := describeTxn(t, brokers, txn.GetTransactionalId()); st.ProducerEpoch != int16(txn.GetProducerEpoch())+1 {
					t.Fatalf("epoch after a commit: %d, want %d: the broker did not speak transaction protocol version 2",
						st.ProducerEpoch, txn.GetProducerEpoch()+1)
				}
			}
			old.Close() // the crash

			for restore := 1; restore <= 2; restore++ {
				env := txnTestEnv()
				s := txnTestSink(t, env, brokers, "map-0", []*transport.SinkTxn{txn})
				recovered := metricValue(t, env.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "recovered"})
				ended := metricValue(t, env.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "ended_before"})
				if recovered != 1 || ended != 0 {
					t.Fatalf("restore %d: recovered %v, ended_before %v; want the transaction taken as committed", restore, recovered, ended)
				}
				// One bump, by whichever EndTxn v5 committed it.
				if st := describeTxn(t, brokers, txn.GetTransactionalId()); st.State == "Ongoing" || st.ProducerEpoch != int16(txn.GetProducerEpoch())+1 {
					t.Fatalf("restore %d: the id is %s at epoch %d, want ended at epoch %d", restore, st.State, st.ProducerEpoch, txn.GetProducerEpoch()+1)
				}
				if got := readCommitted(t, brokers, "out", 3); !slices.Equal(got, seq("a", 3)) {
					t.Fatalf("restore %d: read_committed saw %v, want %v once", restore, got, seq("a", 3))
				}
				if restore == 2 {
					// The restored task goes on writing.
					write(t, s, "b", 1)
					commitThrough(t, s, 2)
					if got := readCommitted(t, brokers, "out", 4); !slices.Equal(got, append(seq("a", 3), "b0")) {
						t.Fatalf("after the restored task's checkpoint: read_committed saw %v", got)
					}
				}
			}
		})
	}
}

// TestExactlyOnceSinkRestoresTV2TransactionsThatMovedOn: under protocol
// version 2 a producer that committed goes on with the bumped epoch. If
// the old attempt opened its next transaction on the same id before it
// died, the broker answers the restore's commit with PRODUCER_FENCED (it
// never commits a transaction of another epoch), and the zombie's open
// transaction must not hold read_committed consumers back: the restore
// aborts it. And a transaction the broker aborted at its timeout is
// reported as such (INVALID_TXN_STATE, by the retry rule), not committed.
func TestExactlyOnceSinkRestoresTV2TransactionsThatMovedOn(t *testing.T) {
	t.Run("a newer transaction open", func(t *testing.T) {
		brokers := newKafka(t, map[string]int32{"out": 1})
		txn, old := tv2Txn(t, brokers, seq("a", 3), time.Minute)
		if err := old.EndTransaction(t.Context(), kgo.TryCommit); err != nil {
			t.Fatal(err)
		}
		if err := old.BeginTransaction(); err != nil {
			t.Fatal(err)
		}
		if err := old.ProduceSync(t.Context(), &kgo.Record{Value: []byte("zombie")}).FirstErr(); err != nil {
			t.Fatal(err)
		}
		old.Close()

		env := txnTestEnv()
		s := txnTestSink(t, env, brokers, "map-0", []*transport.SinkTxn{txn})
		if n := metricValue(t, env.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "ended_before"}); n != 1 {
			t.Fatalf("ended_before: %v, want 1", n)
		}
		if st := describeTxn(t, brokers, txn.GetTransactionalId()); st.State == "Ongoing" {
			t.Fatalf("the zombie's transaction is still open after the restore: %+v", st)
		}
		write(t, s, "b", 1)
		commitThrough(t, s, 2)
		if got := readCommitted(t, brokers, "out", 4); !slices.Equal(got, append(seq("a", 3), "b0")) {
			t.Fatalf("read_committed saw %v, want a0 a1 a2 b0", got)
		}
	})
	t.Run("aborted at its timeout", func(t *testing.T) {
		brokers := newKafka(t, map[string]int32{"out": 1})
		txn, old := tv2Txn(t, brokers, seq("a", 2), 1500*time.Millisecond)
		waitFor(t, "the broker to abort the transaction at its timeout", func() bool {
			return describeTxn(t, brokers, txn.GetTransactionalId()).State != "Ongoing"
		})
		old.Close()
		env := txnTestEnv()
		txnTestSinkWith(t, env, brokers, "map-0", []*transport.SinkTxn{txn}, 1500*time.Millisecond, 100*time.Millisecond)
		if n := metricValue(t, env.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "ended_before"}); n != 1 {
			t.Fatalf("ended_before: %v, want 1", n)
		}
		if got := readCommittedFor(t, brokers, "out", 1, time.Second); len(got) != 0 {
			t.Fatalf("read_committed saw %v of an aborted transaction", got)
		}
	})
}

// outage makes kfake cluster c look like a dead broker while down is set:
// every request's connection is closed before an answer.
type outage struct{ down atomic.Bool }

func newOutage(c *kfake.Cluster) *outage {
	o := &outage{}
	c.Control(func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if o.down.Load() {
			return nil, errors.New("broker down"), true
		}
		return nil, nil, false
	})
	return o
}

// newKafkaCluster is newKafka with the cluster, for tests that break it.
func newKafkaCluster(t *testing.T, topic string) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, topic))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// TestExactlyOnceSinkCommitThroughABrokerOutage: the broker goes away as
// a checkpoint's completion commits its transaction. Back within the
// sink's retries, the commit completes and the task goes on, its ids
// reused with new epochs; away for longer, the task fails with a reason,
// and the restore from the checkpoint commits the transaction once the
// broker is back.
func TestExactlyOnceSinkCommitThroughABrokerOutage(t *testing.T) {
	t.Run("back within the retries", func(t *testing.T) {
		c := newKafkaCluster(t, "out")
		brokers := c.ListenAddrs()
		o := newOutage(c)
		s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
		write(t, s, "a", 3)
		if _, err := s.txn.preCommit(1); err != nil {
			t.Fatal(err)
		}
		o.down.Store(true)
		back := time.AfterFunc(1500*time.Millisecond, func() { o.down.Store(false) })
		defer back.Stop()
		start := time.Now()
		if err := s.txn.completed(1); err != nil {
			t.Fatalf("commit through a %v outage: %v", 1500*time.Millisecond, err)
		}
		t.Logf("committed after %v", time.Since(start).Round(time.Millisecond))
		if got := readCommitted(t, brokers, "out", 3); !slices.Equal(got, seq("a", 3)) {
			t.Fatalf("read_committed saw %v, want %v", got, seq("a", 3))
		}
		write(t, s, "b", 1)
		commitThrough(t, s, 2)
		if got := readCommitted(t, brokers, "out", 4); !slices.Equal(got, append(seq("a", 3), "b0")) {
			t.Fatalf("after the next checkpoint: read_committed saw %v", got)
		}
		// Every slot, the one committed through the outage too, gets a
		// new epoch before its id is used again.
		for id := uint64(3); id <= txnSlots+3; id++ {
			write(t, s, fmt.Sprintf("c%d-", id), 1)
			commitThrough(t, s, id)
		}
		if got := readCommitted(t, brokers, "out", 4+txnSlots+1); len(got) != 4+txnSlots+1 {
			t.Fatalf("after %d more checkpoints: read_committed saw %v", txnSlots+1, got)
		}
	})
	t.Run("away for longer", func(t *testing.T) {
		c := newKafkaCluster(t, "out")
		brokers := c.ListenAddrs()
		o := newOutage(c)
		env := &taskEnv{workerID: "w1", cfg: &Config{KafkaTimeout: 500 * time.Millisecond}, metrics: newMetrics()}
		s := txnTestSink(t, env, brokers, "map-0", nil)
		write(t, s, "a", 3)
		txns, err := s.txn.preCommit(1)
		if err != nil {
			t.Fatal(err)
		}
		o.down.Store(true)
		start := time.Now()
		err = s.txn.completed(1)
		if err == nil || !strings.Contains(err.Error(), "checkpoint 1") || !strings.Contains(err.Error(), "restore commits it") {
			t.Fatalf("commit while the broker is down: %v, want an error naming the checkpoint and the restore", err)
		}
		t.Logf("gave up after %v: %v", time.Since(start).Round(time.Millisecond), err)
		o.down.Store(false)
		env2 := txnTestEnv()
		txnTestSink(t, env2, brokers, "map-0", txns)
		if n := metricValue(t, env2.metrics.registry, "coordflow_sink_transactions_total", map[string]string{"outcome": "recovered"}); n != 1 {
			t.Fatalf("recovered: %v, want 1", n)
		}
		if got := readCommitted(t, brokers, "out", 3); !slices.Equal(got, seq("a", 3)) {
			t.Fatalf("after the restore: read_committed saw %v, want %v once", got, seq("a", 3))
		}
	})
}

// TestExactlyOnceSinkRetriesStopWithTheTask: a request the sink retries
// while the broker is away gives up as soon as the task's context ends,
// not at the end of its retries.
func TestExactlyOnceSinkRetriesStopWithTheTask(t *testing.T) {
	c := newKafkaCluster(t, "out")
	o := newOutage(c)
	env := &taskEnv{workerID: "w1", cfg: &Config{KafkaTimeout: 5 * time.Second}, metrics: newMetrics()}
	s := txnTestSink(t, env, c.ListenAddrs(), "map-0", nil)
	ctx, cancel := context.WithCancel(t.Context())
	s.txn.ctx = ctx
	o.down.Store(true)
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	_, err := s.txn.describe(txnID("coordflow-j", "map-0", 0))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("describe while the broker is down and the task stops: %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("describe returned %v after the task stopped; its retries run for %v", d, 2*env.cfg.KafkaTimeout)
	}
}

// onLog is a slog.Handler that calls fn with the message of each record it
// passes on to the Handler it wraps.
type onLog struct {
	slog.Handler
	fn func(msg string)
}

func (h onLog) Handle(ctx context.Context, r slog.Record) error {
	h.fn(r.Message)
	return h.Handler.Handle(ctx, r)
}

func (h onLog) WithAttrs(as []slog.Attr) slog.Handler { return onLog{h.Handler.WithAttrs(as), h.fn} }
func (h onLog) WithGroup(name string) slog.Handler    { return onLog{h.Handler.WithGroup(name), h.fn} }
