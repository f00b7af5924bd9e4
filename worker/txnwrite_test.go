package worker

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"
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
// may be goes out as several batches in turn, each in order, none twice.
func TestExactlyOnceSinkPartitionsAndBatches(t *testing.T) {
	const parts, n = 3, 300
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(parts, "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	brokers := c.ListenAddrs()
	s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
	s.txn.w.maxBatch = 400 // a few records a batch
	write(t, s, "k", n)
	if _, err := s.txn.preCommit(1); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(1); err != nil {
		t.Fatal(err)
	}

	got := readCommittedAll(t, brokers, "out", n)
	hash := sarama.NewHashPartitioner("out")
	var next [parts]int // index of the next record expected in each partition
	for _, r := range got {
		want, err := hash.Partition(&sarama.ProducerMessage{Key: sarama.ByteEncoder(r.Key)}, parts)
		if err != nil {
			t.Fatal(err)
		}
		if r.Partition != want {
			t.Fatalf("record %s in partition %d, want %d (sarama's hash partitioner)", r.Key, r.Partition, want)
		}
		if string(r.Key) != string(r.Value) {
			t.Fatalf("record with key %s has value %s", r.Key, r.Value)
		}
		// Records of a partition come in the order written: k0, k1, ...
		// skipping those of the other partitions.
		var i int
		if _, err := fmt.Sscanf(string(r.Key), "k%d", &i); err != nil {
			t.Fatal(err)
		}
		if i < next[r.Partition] {
			t.Fatalf("partition %d: %s after k%d: out of order or twice", r.Partition, r.Key, next[r.Partition]-1)
		}
		next[r.Partition] = i + 1
	}
	if len(got) != n {
		t.Fatalf("read_committed saw %d records, want %d", len(got), n)
	}
	seen := map[string]bool{}
	for _, r := range got {
		seen[string(r.Key)] = true
	}
	for i := range n {
		if !seen[fmt.Sprintf("k%d", i)] {
			t.Fatalf("k%d is missing", i)
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
