package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kversion"

	"github.com/coordflow/coordflow/fsm"
)

// TestKafkaSinkCheck: a broker without transactions (or without the
// DescribeTransactions of Kafka 3.0) fails an exactly-once job's deploy with
// a reason that says what is missing and what to do.
func TestKafkaSinkCheck(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version *kversion.Versions
		missing string
	}{
		{"current", nil, ""},
		{"kafka 2.8", kversion.V2_8_0(), "(no DescribeTransactions)"},
		{"kafka 0.10", kversion.V0_10_2(), "(no InitProducerId, AddPartitionsToTxn, EndTxn, DescribeTransactions)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(1, "out")}
			if tc.version != nil {
				opts = append(opts, kfake.MaxVersions(tc.version))
			}
			c, err := kfake.NewCluster(opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err = kafkaSinkCheck(ctx, c.ListenAddrs())
			switch {
			case tc.missing == "" && err != nil:
				t.Fatalf("check: %v", err)
			case tc.missing != "" && (err == nil || !strings.Contains(err.Error(), tc.missing) || !strings.Contains(err.Error(), `"at_least_once"`)):
				t.Fatalf("check: %v, want an error naming %s and at_least_once", err, tc.missing)
			}
		})
	}
}

// openTxn leaves a transaction open on transactional id id with one record.
func openTxn(t *testing.T, brokers []string, id string) (pid int64, epoch int16) {
	t.Helper()
	return openTxnAt(t, brokers, id, sarama.V3_0_0_0)
}

// openTxnAt is openTxn with a producer of Kafka version v.
func openTxnAt(t *testing.T, brokers []string, id string, v sarama.KafkaVersion) (pid int64, epoch int16) {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = v
	cfg.Producer.Idempotent = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Return.Successes = true
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Transaction.ID = id
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	if err := p.BeginTxn(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.SendMessage(&sarama.ProducerMessage{Topic: "out", Value: sarama.StringEncoder(id)}); err != nil {
		t.Fatal(err)
	}
	acfg := sarama.NewConfig()
	acfg.Version = sarama.V3_0_0_0 // DescribeTransactions
	admin, err := sarama.NewClusterAdmin(brokers, acfg)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	states, err := admin.(sarama.TransactionClusterAdmin).DescribeTransactions([]string{id})
	if err != nil {
		t.Fatal(err)
	}
	return states[id].ProducerID, states[id].ProducerEpoch
}

// TestSinkTransactions lists a job's open transactions with who needs each,
// and aborts only those nobody needs: not the one its last completed
// checkpoint promises, not one a kept savepoint lists (a job started from
// it commits it), not those of its running map tasks; another job's,
// whose prefix starts with j1's, is not j1's.
func TestSinkTransactions(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	brokers := c.ListenAddrs()
	pid, epoch := openTxn(t, brokers, "coordflow-j1-map-0-0")              // promised by checkpoint 7
	openTxn(t, brokers, "coordflow-j1-map-0-1")                            // map-0's open transaction
	openTxn(t, brokers, "coordflow-j1-map-3-0")                            // a task of a larger parallelism, gone
	spPID, spEpoch := openTxn(t, brokers, "coordflow-j1-map-2-0")          // listed by savepoint j1-sp-5, of a larger parallelism
	oldPID, oldEpoch := openTxn(t, brokers, "coordflow-j1-map-2-1")        // map-2's too; the savepoint lists an earlier epoch of it
	spOnTask, spOnTaskEpoch := openTxn(t, brokers, "coordflow-j1-map-0-2") // map-0's, listed by the savepoint too
	openTxn(t, brokers, "coordflow-j2-map-0-0")                            // another job's
	openTxn(t, brokers, "coordflow-j1-0a1b2c3d-map-0-0")                   // a job named j1 (id j1-0a1b2c3d): its ids start with j1's prefix

	job := fsm.Job{
		ID: "j1", Status: fsm.JobRunning, Attempt: 4,
		Spec:  fsm.JobSpec{Sink: &fsm.SinkSpec{Brokers: brokers, Topic: "out", Delivery: fsm.DeliveryExactlyOnce}},
		Tasks: []fsm.Task{{ID: "source-0", Kind: fsm.TaskSource}, {ID: "map-0", Kind: fsm.TaskMap}},
		Completed: []fsm.Checkpoint{{ID: 7, Tasks: map[string]fsm.TaskState{"map-0": {SinkTxns: []fsm.SinkTxn{
			{TransactionalID: "coordflow-j1-map-0-0", ProducerID: pid, ProducerEpoch: epoch, CheckpointID: 7},
		}}}}},
	}
	savepoints := []fsm.Savepoint{{ID: fsm.SavepointID("j1", 5), JobID: "j1", CheckpointID: 5,
		Tasks: map[string]fsm.TaskState{"map-2": {SinkTxns: []fsm.SinkTxn{
			{TransactionalID: "coordflow-j1-map-2-0", ProducerID: spPID, ProducerEpoch: spEpoch, CheckpointID: 5},
			{TransactionalID: "coordflow-j1-map-2-1", ProducerID: oldPID, ProducerEpoch: oldEpoch - 1, CheckpointID: 5}, // a transaction that ended
		}}, "map-0": {SinkTxns: []fsm.SinkTxn{
			{TransactionalID: "coordflow-j1-map-0-2", ProducerID: spOnTask, ProducerEpoch: spOnTaskEpoch, CheckpointID: 5},
		}}}}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	neededBy := func(txns []apiSinkTxn) map[string]string {
		out := map[string]string{}
		for _, tx := range txns {
			out[tx.TransactionalID] = tx.NeededBy
			if tx.State != "Ongoing" || len(tx.Partitions) != 1 || tx.Partitions[0] != "out/0" {
				t.Errorf("transaction %+v: want Ongoing on out/0", tx)
			}
		}
		return out
	}
	txns, err := sinkTransactions(ctx, job, savepoints, false, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"coordflow-j1-map-0-0": "checkpoint 7 (completed; a restore commits it)",
		"coordflow-j1-map-0-1": "task map-0 of attempt 4",
		"coordflow-j1-map-0-2": "task map-0 of attempt 4", // its next checkpoint commits it first
		"coordflow-j1-map-2-0": "savepoint j1-sp-5 (a job started from it commits it)",
		"coordflow-j1-map-2-1": "",
		"coordflow-j1-map-3-0": "",
	}
	if got := neededBy(txns); !maps.Equal(got, want) {
		t.Fatalf("transactions of j1: %v, want %v", got, want)
	}

	aborted, err := sinkTransactions(ctx, job, savepoints, true, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, tx := range aborted {
		if tx.Aborted != (want[tx.TransactionalID] == "") {
			t.Errorf("abort: %s aborted=%v", tx.TransactionalID, tx.Aborted)
		}
	}
	txns, err = sinkTransactions(ctx, job, savepoints, false, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got := neededBy(txns); len(got) != 4 {
		t.Fatalf("after -abort: %v, want the four needed transactions left", got)
	}

	// Cancelled, the job's tasks need nothing; the savepoint still does.
	job.Status = fsm.JobCancelled
	aborted, err = sinkTransactions(ctx, job, savepoints, true, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got := neededBy(aborted); len(got) != 4 || got["coordflow-j1-map-2-0"] != want["coordflow-j1-map-2-0"] ||
		got["coordflow-j1-map-0-0"] != want["coordflow-j1-map-0-0"] || got["coordflow-j1-map-0-1"] != "" ||
		got["coordflow-j1-map-0-2"] != "savepoint j1-sp-5 (a job started from it commits it)" {
		t.Fatalf("cancelled job's -abort: %v", got)
	}
	for _, tx := range aborted {
		if tx.Aborted != (tx.TransactionalID == "coordflow-j1-map-0-1") {
			t.Errorf("cancelled job's abort: %s aborted=%v", tx.TransactionalID, tx.Aborted)
		}
	}

	job.Spec.Sink.Delivery = fsm.DeliveryAtLeastOnce
	if _, err := sinkTransactions(ctx, job, nil, false, time.Now()); err == nil || !strings.Contains(err.Error(), "no exactly-once sink") {
		t.Fatalf("at-least-once job: %v", err)
	}
}

// TestLookupConfig: the leader's requests to sink brokers time out within
// what is left of the caller's deadline, and within lookupTimeout without
// one.
func TestLookupConfig(t *testing.T) {
	cfg := lookupConfig(context.Background(), sarama.V3_0_0_0)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Metadata.Timeout != lookupTimeout || cfg.Net.ReadTimeout > lookupTimeout || !cfg.Version.IsAtLeast(sarama.V3_0_0_0) {
		t.Fatalf("without a deadline: metadata %v, read %v, version %v", cfg.Metadata.Timeout, cfg.Net.ReadTimeout, cfg.Version)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	cfg = lookupConfig(ctx, sarama.V2_8_0_0)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]time.Duration{"dial": cfg.Net.DialTimeout, "read": cfg.Net.ReadTimeout,
		"write": cfg.Net.WriteTimeout, "metadata": cfg.Metadata.Timeout} {
		if d <= 0 || d > time.Second {
			t.Errorf("%s timeout %v with 1s left", name, d)
		}
	}
}

// TestSinkTransactionsAbortOnABrokerWithAnOlderInitProducerId: -abort
// speaks the InitProducerId version the broker has, not the newest sarama
// knows.
func TestSinkTransactionsAbortOnABrokerWithAnOlderInitProducerId(t *testing.T) {
	versions := kversion.Stable()
	versions.SetMaxKeyVersion(22, 2) // InitProducerId v2, Kafka 2.4's
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "out"), kfake.MaxVersions(versions))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	brokers := c.ListenAddrs()
	openTxnAt(t, brokers, "coordflow-j1-map-3-0", sarama.V2_4_0_0) // nobody's
	job := fsm.Job{
		ID: "j1", Status: fsm.JobRunning, Attempt: 1,
		Spec:  fsm.JobSpec{Sink: &fsm.SinkSpec{Brokers: brokers, Topic: "out", Delivery: fsm.DeliveryExactlyOnce}},
		Tasks: []fsm.Task{{ID: "map-0", Kind: fsm.TaskMap}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	txns, err := sinkTransactions(ctx, job, nil, true, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(txns) != 1 || !txns[0].Aborted {
		t.Fatalf("abort: %+v, want the one transaction aborted", txns)
	}
	if txns, err = sinkTransactions(ctx, job, nil, false, time.Now()); err != nil || len(txns) != 0 {
		t.Fatalf("after the abort: %+v, %v", txns, err)
	}
}

// TestKafkaSinkCheckUnreachable: with no broker answering, the check says so
// (errSinkUnreachable), naming the brokers, rather than that they lack
// transactions.
func TestKafkaSinkCheckUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = kafkaSinkCheck(ctx, []string{addr})
	if !errors.Is(err, errSinkUnreachable) || !strings.Contains(err.Error(), addr) {
		t.Fatalf("check of %s with nothing listening: %v; want errSinkUnreachable naming it", addr, err)
	}
}

// TestLeaderDeploysWhileSinkBrokersAreUnreachable: a deploy whose sink check
// finds no broker goes on (the map tasks decline checkpoints until the
// brokers answer), while one whose brokers answer without transactions
// fails the job with that reason.
func TestLeaderDeploysWhileSinkBrokersAreUnreachable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		deploys bool
	}{
		{"unreachable", fmt.Errorf("%w: 127.0.0.1:9092: dial tcp: connection refused", errSinkUnreachable), true},
		{"no transactions", errors.New(`sink brokers 127.0.0.1:9092 do not support Kafka transactions (no EndTxn)`), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newLeaderHarness(t)
			h.env.checkSink = func(context.Context, []string) error { return tc.err }
			h.newTerm()
			h.register("j1", testJobSpec(1, 1)) // exactly-once sink by default
			h.connect("w1", 4)
			h.pastGrace()
			h.step()
			j := h.job("j1")
			switch {
			case tc.deploys && (j.Status != fsm.JobRunning || j.Attempt != 1):
				t.Fatalf("status %s attempt %d reason %q; want deployed although the sink brokers were unreachable", j.Status, j.Attempt, j.Reason)
			case !tc.deploys && (j.Status != fsm.JobFailing || !strings.Contains(j.Reason, "do not support Kafka transactions")):
				t.Fatalf("status %s reason %q; want failing with the check's reason", j.Status, j.Reason)
			}
		})
	}
}
