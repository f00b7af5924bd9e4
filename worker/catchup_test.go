package worker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// produceTxn writes values to partition 0 of topic in one committed Kafka
// transaction: the partition then ends with a commit marker, a control
// record that no consumer hands over.
func produceTxn(t *testing.T, brokers []string, topic string, values ...string) {
	t.Helper()
	p := beginTxn(t, brokers, topic, "catchup-test", values...)
	if err := p.CommitTxn(); err != nil {
		t.Fatalf("commit transaction: %v", err)
	}
}

// beginTxn opens a Kafka transaction of transactional id id, writes values
// to partition 0 of topic in it (as keys and values) and returns the
// producer: the caller ends the transaction (CommitTxn, AbortTxn) or leaves
// it open. The test closes the producer.
func beginTxn(t *testing.T, brokers []string, topic, id string, values ...string) sarama.SyncProducer {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	cfg.Producer.Return.Successes = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Idempotent = true
	cfg.Producer.Transaction.ID = id
	cfg.Producer.Partitioner = sarama.NewManualPartitioner
	cfg.Net.MaxOpenRequests = 1
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		t.Fatalf("transactional producer: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	if err := p.BeginTxn(); err != nil {
		t.Fatalf("begin transaction: %v", err)
	}
	msgs := make([]*sarama.ProducerMessage, 0, len(values))
	for _, v := range values {
		msgs = append(msgs, &sarama.ProducerMessage{Topic: topic, Partition: 0, Key: sarama.StringEncoder(v), Value: sarama.StringEncoder(v)})
	}
	if err := p.SendMessages(msgs); err != nil {
		t.Fatalf("produce in a transaction: %v", err)
	}
	return p
}

// probeClient is a Kafka client of brokers for probes (dataBelow), closed
// at the end of the test.
func probeClient(t *testing.T, brokers []string) sarama.Client {
	t.Helper()
	client, err := sarama.NewClient(brokers, kafkaConfig(&Config{KafkaTimeout: 5 * time.Second}, "probe-test"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client
}

// TestRestoredSourceCatchesUpToTransactionMarkers: a restored partial source
// catches up to the end offsets its partitions had at its start before it
// takes a checkpoint. A topic written in Kafka transactions (another job's
// exactly-once output, say) ends with a commit marker, which the consumer
// never hands over: the catch-up, and the checkpoint trigger it holds, must
// end without waiting for a record that may never come. Without the probe of
// idle partitions the trigger is held until new input arrives.
func TestRestoredSourceCatchesUpToTransactionMarkers(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	brokers := newKafka(t, map[string]int32{"in": 1})
	produceTxn(t, brokers, "in", "a", "b", "a") // offsets 0-2, the marker 3

	own := []*transport.MapTaskRef{{TaskId: "map-0", WorkerId: w.ID(), DataAddr: w.DataAddr(), KeyGroupStart: 0, KeyGroupEnd: 128}}
	m0 := mapDeploy("job", 2, operator.Count, 1, 128, own, 0)
	s0 := sourceDeploy("job", 2, 0, operator.Count, brokers, "in", []int32{0}, own)
	s0.Partial, s0.RestoreCheckpointId, s0.RestoreOffsets = true, 1, map[int32]int64{0: 1}
	for _, d := range []*transport.DeployTask{m0, s0} {
		f.deploy(t, "w1", d)
		f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	}
	// The source tells the leader it is catching up when it runs, and
	// when it has caught up, so that no checkpoint is triggered meanwhile.
	runningStatuses := func() []bool {
		var out []bool
		for _, r := range f.messages() {
			if st := r.msg.GetStatus(); st != nil && sameTask(st.GetTask(), s0.Task) && st.GetPhase() == transport.TaskPhase_TASK_PHASE_RUNNING {
				out = append(out, st.GetCatchingUp())
			}
		}
		return out
	}
	if got := runningStatuses(); len(got) == 0 || !got[0] {
		t.Fatalf("the restored source's RUNNING statuses say catching up %v, want true first", got)
	}
	f.trigger(t, "w1", s0.Task, 2)
	start := time.Now()
	ack := f.awaitAck(t, s0.Task, 2)
	if got := ack.GetState().GetOffsets()[0]; got != 3 {
		t.Fatalf("checkpoint 2 acked at offset %d, want 3: the records at 1 and 2 read, the marker at 3 never handed over", got)
	}
	f.awaitAck(t, m0.Task, 2)
	t.Logf("caught up and acked %v after the trigger", time.Since(start).Round(time.Millisecond))
	if got := runningStatuses(); !slices.Equal(got, []bool{true, false}) {
		t.Fatalf("the restored source's RUNNING statuses say catching up %v, want true, then false once caught up", got)
	}
	for _, r := range w.tasks.running() {
		if sameTask(r.GetTask(), s0.Task) && r.GetCatchingUp() {
			t.Fatal("a new session would be told the source still catches up")
		}
	}

	// The probe finds records of data below the end, and only markers.
	// (kfake writes a transaction's markers before EndTxn returns; Kafka
	// writes them after, so there the end offsets would race.)
	produceTxn(t, brokers, "in", "c", "d") // offsets 4-5, the marker 6
	client := probeClient(t, brokers)
	for _, tc := range []struct {
		from, end int64
		none      bool
	}{
		{3, 7, false}, // the marker, then records at 4 and 5
		{5, 6, false}, // the record at 5
		{6, 7, true},  // the marker only
		{3, 4, true},  // the first marker only
		{1, 3, false}, // records at 1 and 2
	} {
		none, _, err := dataBelow(client, "in", 0, tc.from, tc.end, sarama.ReadUncommitted)
		if err != nil || none != tc.none {
			t.Errorf("probe of [%d, %d): none %v, err %v; want none %v", tc.from, tc.end, none, err, tc.none)
		}
	}
	// Beyond the high watermark it cannot say, and says so.
	if none, _, err := dataBelow(client, "in", 0, 6, 9, sarama.ReadUncommitted); !errors.Is(err, errProbeShort) || none {
		t.Errorf("probe of [6, 9) past the end of the partition (7): none %v, err %v; want errProbeShort", none, err)
	}
}

// A probe's answer ends a partition's catch-up only if it says no data is
// left and the source has read nothing of the partition since the probe
// began: a stale, failed or positive answer changes nothing.
func TestCatchUpProbeAnswers(t *testing.T) {
	s, _, _, _ := restoredWordSource(t)
	ctx := context.Background()
	for _, res := range []catchUpProbe{
		{partition: 0, from: 3, none: true},                                 // the source read on since
		{partition: 0, from: 4, err: fmt.Errorf("%w: test", errProbeShort)}, // no answer
		{partition: 0, from: 4, none: false},                                // data left
		{partition: 1, from: 4, none: true},                                 // not a partition catching up
	} {
		s.caught.probing = true
		if err := s.probed(ctx, res); err != nil {
			t.Fatal(err)
		}
		if s.catchUp[0] != 30 || s.batches[0].table != nil || s.caught.probing {
			t.Fatalf("after %+v: catch-up %v, combining %v, probing %v; want the catch-up to 30 going on and no probe running",
				res, s.catchUp, s.batches[0].table != nil, s.caught.probing)
		}
	}
	// A probe that could not see the end but passed offsets without data
	// leaves where the next one starts, for this offset of the source only.
	short := fmt.Errorf("%w: test", errProbeShort)
	for _, res := range []catchUpProbe{
		{partition: 0, from: 4, passed: 12, err: short},
		{partition: 0, from: 4, passed: 9, err: short}, // behind the last: kept
	} {
		if err := s.probed(ctx, res); err != nil {
			t.Fatal(err)
		}
		if got, want := s.caught.passed[0], (probePassed{from: 4, to: 12}); got != want {
			t.Fatalf("after %+v: probes passed %+v, want %+v", res, got, want)
		}
	}
	if err := s.probed(ctx, catchUpProbe{partition: 0, from: 4, none: true}); err != nil {
		t.Fatal(err)
	}
	if s.catchUp != nil || s.batches[0].table == nil {
		t.Fatalf("after a probe found no data from the source's offset: catch-up %v, combining %v; want it over", s.catchUp, s.batches[0].table != nil)
	}
}
