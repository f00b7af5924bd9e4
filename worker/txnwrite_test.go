package worker

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"

	"github.com/coordflow/coordflow/worker/operator"
)

// TestExactlyOnceSinkWriteWhoseAnswerIsLost: the broker writes a Produce
// request of the sink but its answer never arrives (the connection
// breaks). The sink sends the same batch again, with the same sequence,
// and the broker drops the copy: each record is in the output once.
func TestExactlyOnceSinkWriteWhoseAnswerIsLost(t *testing.T) {
	c := newKafkaCluster(t, "out")
	brokers := c.ListenAddrs()
	// Produce before v13, which names topics, not topic ids, as sarama's does.
	replayer, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.MaxVersions(kversion.V3_7_0()))
	if err != nil {
		t.Fatal(err)
	}
	defer replayer.Close()
	var armed, lost atomic.Bool
	c.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		produce, ok := req.(*kmsg.ProduceRequest)
		if !ok || !armed.CompareAndSwap(true, false) {
			return nil, nil, false
		}
		// The broker writes the request (sent again by another client
		// while this one waits), and this client's connection breaks
		// before the answer.
		done := make(chan error, 1)
		go func() {
			resp, err := produce.RequestWith(context.Background(), replayer)
			if err == nil {
				for _, tp := range resp.Topics {
					for _, pp := range tp.Partitions {
						if pp.ErrorCode != 0 {
							err = fmt.Errorf("partition %d: error code %d", pp.Partition, pp.ErrorCode)
						}
					}
				}
			}
			done <- err
		}()
		var replayErr error
		c.SleepControl(func() { replayErr = <-done })
		if replayErr != nil {
			t.Errorf("replaying the sink's request: %v", replayErr)
		}
		lost.Store(true)
		return nil, fmt.Errorf("the answer is lost"), true
	})
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	write(t, s, "a", 2)
	armed.Store(true)
	write(t, s, "b", 3)
	if !lost.Load() {
		t.Fatal("no Produce request of the sink was intercepted")
	}
	write(t, s, "c", 1)
	if _, err := s.txn.preCommit(1); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(1); err != nil {
		t.Fatal(err)
	}
	want := append(append(seq("a", 2), seq("b", 3)...), "c0")
	if got := readCommitted(t, brokers, "out", len(want)); !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %v, want %v: each record once", got, want)
	}
}

// TestExactlyOnceSinkPartitionsAndBatches: a write to a topic of several
// partitions puts each record where sarama's hash partitioner does (where
// the sink's records always went), and a write larger than a record batch
// may be, or than a request to one leader may carry, goes out as several
// requests in turn, each within the limits, every batch in order, none
// twice. The writes span several slabs of the sink's memory, reused from
// one write to the next: every record arrives as it was written.
func TestExactlyOnceSinkPartitionsAndBatches(t *testing.T) {
	const parts = 3
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(parts, "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	var largest atomic.Int64 // the largest Produce request's record batches, bytes
	c.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if produce, ok := req.(*kmsg.ProduceRequest); ok {
			n := 0
			for _, tp := range produce.Topics {
				for _, pp := range tp.Partitions {
					n += len(pp.Records)
				}
			}
			if int64(n) > largest.Load() {
				largest.Store(int64(n))
			}
		}
		return nil, nil, false
	})
	brokers := c.ListenAddrs()
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	// A few dozen records a batch, and less than two batches a request
	// (the one broker leads every partition).
	const maxRequest = 6000
	s.txn.w.maxBatch, s.txn.w.maxRequest = 4000, maxRequest
	pad := strings.Repeat("v", 100) // values much larger than a record's overhead
	hash := sarama.NewHashPartitioner("out")
	var want [parts][]string // each partition's records, in the order written
	for _, prefix := range []string{"a", "b", "c"} {
		for _, k := range seq(prefix, 2*slabMessages+100) {
			if err := s.add(&operator.Output{Key: []byte(k), Value: []byte(k + pad)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.flush(); err != nil {
			t.Fatal(err)
		}
		for _, k := range seq(prefix, 2*slabMessages+100) {
			pt, err := hash.Partition(&sarama.ProducerMessage{Key: sarama.StringEncoder(k)}, parts)
			if err != nil {
				t.Fatal(err)
			}
			want[pt] = append(want[pt], k)
		}
	}
	if len(s.slab.spare) == 0 {
		t.Fatal("no slab is spare after three writes")
	}
	if n := largest.Load(); n > maxRequest {
		t.Fatalf("the largest Produce request carried %d bytes of batches, want at most the %d of the limit", n, maxRequest)
	}
	if _, err := s.txn.preCommit(1); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(1); err != nil {
		t.Fatal(err)
	}

	total := 3 * (2*slabMessages + 100)
	var got [parts][]string
	for _, r := range readCommittedAll(t, brokers, "out", total) {
		if string(r.Value) != string(r.Key)+pad {
			t.Fatalf("record with key %s has value %s", r.Key, r.Value)
		}
		got[r.Partition] = append(got[r.Partition], string(r.Key))
	}
	for pt := range parts {
		if !slices.Equal(got[pt], want[pt]) {
			t.Fatalf("partition %d holds %d records, want %d in the order written (sarama's hash partitioner): first difference at %d",
				pt, len(got[pt]), len(want[pt]), firstDiff(got[pt], want[pt]))
		}
	}
}

// readCommittedAll reads topic's every partition with read_committed until
// it has want records, and then for a moment longer (duplicates would
// follow); it fails the test if want do not come within a few seconds.
func readCommittedAll(t *testing.T, brokers []string, topic string, want int) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.FetchMaxWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	deadline := time.Now().Add(5 * time.Second)
	extra := time.Time{}
	for {
		now := time.Now()
		if len(out) >= want && extra.IsZero() {
			extra = now.Add(300 * time.Millisecond)
		}
		if !extra.IsZero() && now.After(extra) {
			return out
		}
		if now.After(deadline) {
			t.Fatalf("read %d of %d records of %s within 5s", len(out), want, topic)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		fs := cl.PollFetches(ctx)
		cancel()
		fs.EachRecord(func(r *kgo.Record) { out = append(out, r) })
	}
}

// TestRequestVersions: the sink sends each request at the version sarama's
// producer and transaction manager would send with the client's Kafka
// version.
func TestRequestVersions(t *testing.T) {
	for _, c := range []struct {
		kafka                     sarama.KafkaVersion
		produce, txn, initProduce int16
	}{
		{sarama.V3_7_0_0, 10, 3, 4},
		{txnKafkaVersion, 9, 3, 4},
		{sarama.V2_7_0_0, 8, 2, 4},
		{sarama.V2_1_0_0, 7, 1, 1},
		{sarama.V0_11_0_0, 3, 0, 0},
	} {
		got := [3]int16{
			requestVersion(c.kafka, produceVersions),
			requestVersion(c.kafka, txnRequestVersions),
			requestVersion(c.kafka, initProducerIDVersions),
		}
		if want := [3]int16{c.produce, c.txn, c.initProduce}; got != want {
			t.Errorf("Kafka %v: Produce, EndTxn/AddPartitionsToTxn, InitProducerID versions %v, want %v", c.kafka, got, want)
		}
	}
}
