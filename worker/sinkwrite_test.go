package worker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// TestExactlyOnceSinkWriteWhoseAnswerIsLost: the broker writes a Produce
// request of the sink but its answer never arrives (the connection
// breaks), or says REQUEST_TIMED_OUT (the followers did not acknowledge
// within the request's ack timeout, while the leader has the records). The
// sink sends the same batch again, with the same sequence, and the broker
// drops the copy: each record is in the output once.
func TestExactlyOnceSinkWriteWhoseAnswerIsLost(t *testing.T) {
	for _, answer := range []string{"lost", "REQUEST_TIMED_OUT"} {
		t.Run(answer, func(t *testing.T) {
			c := newKafkaCluster(t, "out")
			brokers := c.ListenAddrs()
			// Produce before v13, which names topics, not topic ids, as sarama's does.
			replayer, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.MaxVersions(kversion.V3_7_0()))
			if err != nil {
				t.Fatal(err)
			}
			defer replayer.Close()
			var armed, answered atomic.Bool
			c.Control(func(req kmsg.Request) (kmsg.Response, error, bool) {
				c.KeepControl()
				produce, ok := req.(*kmsg.ProduceRequest)
				if !ok || !armed.CompareAndSwap(true, false) {
					return nil, nil, false
				}
				// The broker writes the request (sent again by another
				// client while this one waits), and this client gets no
				// answer, or a timeout's.
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
				answered.Store(true)
				if answer == "lost" {
					return nil, fmt.Errorf("the answer is lost"), true
				}
				return produceAnswer(produce, sarama.ErrRequestTimedOut), nil, true
			})
			s := txnTestSink(t, txnTestEnv(), brokers, "map-0", nil)
			write(t, s, "a", 2)
			armed.Store(true)
			write(t, s, "b", 3)
			if !answered.Load() {
				t.Fatal("no Produce request of the sink was intercepted")
			}
			write(t, s, "c", 1)
			commitCheckpoint(t, s, 1)
			want := append(append(seq("a", 2), seq("b", 3)...), "c0")
			if got := readCommitted(t, brokers, "out", len(want)); !slices.Equal(got, want) {
				t.Fatalf("read_committed saw %v, want %v: each record once", got, want)
			}
		})
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
	var want [parts][]string               // each partition's records, in the order written
	perWrite := 2*slabBytes/len(pad) + 100 // over two slabs' worth
	for _, prefix := range []string{"a", "b", "c"} {
		for _, k := range seq(prefix, perWrite) {
			if err := s.add(&operator.Output{Key: []byte(k), Value: []byte(k + pad)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.flush(); err != nil {
			t.Fatal(err)
		}
		for _, k := range seq(prefix, perWrite) {
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
	commitCheckpoint(t, s, 1)

	total := 3 * perWrite
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
// follow); it fails the test if want do not come within waitTimeout.
func readCommittedAll(t *testing.T, brokers []string, topic string, want int) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.FetchMaxWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	deadline := time.Now().Add(waitTimeout)
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
			t.Fatalf("read %d of %d records of %s within %v", len(out), want, topic, waitTimeout)
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

// TestExactlyOnceSinkLeadersOnSeveralBrokers: a write whose partitions
// are led by three brokers sends each leader its own request, all at once.
// When one leader's request is lost (its connection breaks before the
// broker reads it), the next round goes to that leader alone, with the
// same batches: what the others acknowledged is not sent again. When a
// partition's leader moves, the old one refuses the batch
// (NOT_LEADER_FOR_PARTITION) and the sink sends it to the new one. Every
// partition holds its records once, in the order written.
func TestExactlyOnceSinkLeadersOnSeveralBrokers(t *testing.T) {
	const (
		parts   = 6
		brokers = 3
		perKey  = 300 // records of each write
	)
	c := spreadCluster(t, parts, brokers)

	type produced struct {
		node  int32
		parts []int32
	}
	var (
		mu       sync.Mutex
		requests []produced // the sink's Produce requests, as each broker got them
	)
	var loseAt atomic.Int32 // the node whose next Produce request is lost; -1 for none
	loseAt.Store(-1)
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		node := c.CurrentNode()
		r := produced{node: node}
		for _, tp := range req.(*kmsg.ProduceRequest).Topics {
			for _, pp := range tp.Partitions {
				r.parts = append(r.parts, pp.Partition)
			}
		}
		slices.Sort(r.parts)
		mu.Lock()
		requests = append(requests, r)
		mu.Unlock()
		if loseAt.CompareAndSwap(node, -1) {
			return nil, fmt.Errorf("the request is lost"), true
		}
		return nil, nil, false
	})
	// taken returns the requests seen since the last call.
	taken := func() []produced {
		mu.Lock()
		defer mu.Unlock()
		r := requests
		requests = nil
		return r
	}

	addrs := c.ListenAddrs()
	s := txnTestSink(t, txnTestEnv(), addrs, "map-0", nil)
	var written []string
	writeAll := func(prefix string) {
		t.Helper()
		write(t, s, prefix, perKey)
		written = append(written, seq(prefix, perKey)...)
	}
	led := func(node int32) []int32 { // the partitions node leads
		var out []int32
		for pt := range int32(parts) {
			if c.LeaderFor("out", pt) == node {
				out = append(out, pt)
			}
		}
		return out
	}

	writeAll("a")
	got := taken()
	if len(got) != brokers {
		t.Fatalf("a write to partitions on %d leaders sent %d requests (%v), want one per leader", brokers, len(got), got)
	}
	for _, r := range got {
		if !slices.Equal(r.parts, led(r.node)) {
			t.Fatalf("broker %d got partitions %v, want the ones it leads, %v", r.node, r.parts, led(r.node))
		}
	}

	loseAt.Store(1)
	writeAll("b")
	if loseAt.Load() != -1 {
		t.Fatal("no request to broker 1 was lost")
	}
	perNode := map[int32]int{}
	for _, r := range taken() {
		perNode[r.node]++
		if !slices.Equal(r.parts, led(r.node)) {
			t.Fatalf("broker %d got partitions %v, want the ones it leads, %v", r.node, r.parts, led(r.node))
		}
	}
	if want := map[int32]int{0: 1, 1: 2, 2: 1}; !maps.Equal(perNode, want) {
		t.Fatalf("requests per broker after broker 1's was lost: %v, want %v (broker 1's sent again, no other)", perNode, want)
	}

	// Partition 2 moves from broker 2 to broker 0; the sink's metadata
	// still names broker 2.
	if err := c.MoveTopicPartition("out", 2, 0); err != nil {
		t.Fatal(err)
	}
	writeAll("c")
	var to0 bool
	for _, r := range taken() {
		to0 = to0 || (r.node == 0 && slices.Contains(r.parts, 2))
	}
	if !to0 {
		t.Fatal("partition 2's records never went to its new leader, broker 0")
	}

	commitCheckpoint(t, s, 1)
	checkPartitions(t, addrs, byPartition(t, parts, written))
}

// TestExactlyOnceSinkAddPartitionsAnswerShort: an AddPartitionsToTxn
// answer that names fewer partitions than were asked for adds none the
// sink can count on: it asks again, and writes only once every partition
// is in the transaction (a broker refuses a transactional batch for a
// partition that is not).
func TestExactlyOnceSinkAddPartitionsAnswerShort(t *testing.T) {
	const parts = 3
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(parts, "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	var short, asked atomic.Int32
	short.Store(1)
	c.ControlKey(int16(kmsg.AddPartitionsToTxn), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		asked.Add(1)
		if short.Add(-1) != 0 {
			return nil, nil, false
		}
		add := req.(*kmsg.AddPartitionsToTxnRequest)
		resp := add.ResponseKind().(*kmsg.AddPartitionsToTxnResponse)
		for _, rt := range add.Topics {
			st := kmsg.NewAddPartitionsToTxnResponseTopic()
			st.Topic = rt.Topic
			sp := kmsg.NewAddPartitionsToTxnResponseTopicPartition()
			sp.Partition = rt.Partitions[0] // the others left out, without an error
			st.Partitions = append(st.Partitions, sp)
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
	addrs := c.ListenAddrs()
	s := txnTestSink(t, txnTestEnv(), addrs, "map-0", nil)
	write(t, s, "a", 50) // enough keys for every partition
	if n := asked.Load(); n != 2 {
		t.Fatalf("AddPartitionsToTxn asked %d times, want 2: the short answer, then again", n)
	}
	commitCheckpoint(t, s, 1)
	var got []string
	for _, r := range readCommittedAll(t, addrs, "out", 50) {
		got = append(got, string(r.Value))
	}
	slices.Sort(got)
	want := seq("a", 50)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("read_committed saw %d records, want each of the %d written once", len(got), len(want))
	}
}

// TestAtLeastOnceSinkWritesWithoutATransaction: an at-least-once sink's
// records go out in batches with no producer id and in no transaction, so
// a read_committed consumer sees them with nothing committed, each
// partition's in the order written and where sarama's hash partitioner
// puts them.
func TestAtLeastOnceSinkWritesWithoutATransaction(t *testing.T) {
	const parts = 3
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(parts, "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	var produced, inTxn atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		produced.Add(1)
		produce := req.(*kmsg.ProduceRequest)
		if produce.TransactionID != nil {
			inTxn.Add(1)
		}
		if produce.Acks != -1 {
			t.Errorf("a Produce request with acks %d, want -1 (all in-sync replicas)", produce.Acks)
		}
		for _, tp := range produce.Topics {
			for _, pp := range tp.Partitions {
				var b kmsg.RecordBatch
				if err := b.ReadFrom(pp.Records); err != nil {
					t.Errorf("partition %d: read the record batch: %v", pp.Partition, err)
					continue
				}
				if b.ProducerID != -1 || b.ProducerEpoch != -1 || b.FirstSequence != -1 || b.Attributes&0x10 != 0 {
					t.Errorf("partition %d: a batch with producer id %d, epoch %d, sequence %d, attributes %#x: want none, none, none, not transactional",
						pp.Partition, b.ProducerID, b.ProducerEpoch, b.FirstSequence, b.Attributes)
				}
			}
		}
		return nil, nil, false
	})
	addrs := c.ListenAddrs()
	s := atLeastOnceTestSink(t, addrs)
	if s.txn != nil {
		t.Fatal("an at-least-once sink has a transaction pool")
	}
	const n = 500
	write(t, s, "a", n)
	if produced.Load() == 0 {
		t.Fatal("flush returned without a Produce request")
	}
	if k := inTxn.Load(); k != 0 {
		t.Fatalf("%d Produce requests named a transactional id", k)
	}
	checkPartitions(t, addrs, byPartition(t, parts, seq("a", n)))
}

// TestAtLeastOnceSinkSendsALostRequestAgain: at least once, a Produce
// request that is lost (its connection breaks before the broker reads it)
// is sent again within the write's retry window, and the flush succeeds
// with every record written and the sink not held.
func TestAtLeastOnceSinkSendsALostRequestAgain(t *testing.T) {
	c := newKafkaCluster(t, "out")
	var lost atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if lost.Add(1) == 1 {
			return nil, fmt.Errorf("the request is lost"), true
		}
		return nil, nil, false
	})
	s := atLeastOnceTestSink(t, c.ListenAddrs())
	write(t, s, "a", 20)
	if n := lost.Load(); n < 2 {
		t.Fatalf("%d Produce requests, want the lost one and another", n)
	}
	if s.hold.down != nil {
		t.Fatalf("the sink is held after a write that succeeded: %v", s.hold.down)
	}
	if got, want := readCommitted(t, c.ListenAddrs(), "out", 20), seq("a", 20); !slices.Equal(got, want) {
		t.Fatalf("the sink topic holds %v, want %v", got, want)
	}
}

// atLeastOnceTestSink opens an at-least-once sink of map task map-0 to
// topic out on brokers.
func atLeastOnceTestSink(t *testing.T, brokers []string) *sink {
	t.Helper()
	spec := &transport.SinkSpec{Brokers: brokers, Topic: "out", Delivery: "at_least_once"}
	s, err := openSink(t.Context(), txnTestEnv(), taskKey{job: "j", attempt: 1, id: "map-0"}, spec, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	return s
}

// TestSinkFailsOnARefusedRecord: a record the broker refuses for good
// (MESSAGE_TOO_LARGE) fails the flush, and with it the task, rather than
// holding the sink: sent again, at least once, or exactly once under a new
// epoch, it would be refused again, and the job would decline checkpoints
// for ever.
func TestSinkFailsOnARefusedRecord(t *testing.T) {
	for _, delivery := range []string{"at_least_once", "exactly_once"} {
		t.Run(delivery, func(t *testing.T) {
			c := newKafkaCluster(t, "out")
			answerProduce(c, sarama.ErrMessageSizeTooLarge, -1)
			s := atLeastOnceTestSink
			if delivery == "exactly_once" {
				s = func(t *testing.T, brokers []string) *sink { return txnTestSink(t, txnTestEnv(), brokers, "map-0", nil) }
			}
			sk := s(t, c.ListenAddrs())
			if err := sk.add(&operator.Output{Key: []byte("k"), Value: []byte("v")}); err != nil {
				t.Fatal(err)
			}
			err := sk.flush()
			if err == nil || errors.Is(err, errSinkUnavailable) || !errors.Is(err, sarama.ErrMessageSizeTooLarge) {
				t.Fatalf("flush of a record the broker refuses: %v; want MESSAGE_TOO_LARGE, not a held sink", err)
			}
		})
	}
}

// TestExactlyOnceSinkHoldsOnlyForWhatANewEpochCures: an exactly-once write
// into an empty transaction that a broker answers, in Produce or in
// AddPartitionsToTxn, with an error about the producer's own state (lost
// sequences, an unknown producer id, a transaction in the wrong state)
// holds the sink, and the write goes through under the id's new epoch, each
// record committed once. Any other answer, which the same records would
// meet under every new epoch (an invalid topic, a version the broker does
// not support, an id it does not authorise), fails the task instead of
// declining checkpoints for ever.
func TestExactlyOnceSinkHoldsOnlyForWhatANewEpochCures(t *testing.T) {
	for _, tc := range []struct {
		name  string
		kerr  sarama.KError
		cured bool
		add   bool // the answer is AddPartitionsToTxn's, not Produce's
	}{
		{"OUT_OF_ORDER_SEQUENCE_NUMBER", sarama.ErrOutOfOrderSequenceNumber, true, false},
		{"UNKNOWN_PRODUCER_ID", sarama.ErrUnknownProducerID, true, false},
		{"INVALID_PRODUCER_ID_MAPPING", sarama.ErrInvalidProducerIDMapping, true, false},
		{"INVALID_TXN_STATE from AddPartitionsToTxn", sarama.ErrInvalidTxnState, true, true},
		{"INVALID_TOPIC_EXCEPTION", sarama.ErrInvalidTopic, false, false},
		{"UNSUPPORTED_VERSION", sarama.ErrUnsupportedVersion, false, false},
		{"TRANSACTIONAL_ID_AUTHORIZATION_FAILED from AddPartitionsToTxn", sarama.ErrTransactionalIDAuthorizationFailed, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newKafkaCluster(t, "out")
			if tc.add {
				answerAddPartitions(c, tc.kerr, 1)
			} else {
				answerProduce(c, tc.kerr, 1)
			}
			s := txnTestSink(t, txnTestEnv(), c.ListenAddrs(), "map-0", nil)
			for _, v := range seq("a", 20) {
				if err := s.add(&operator.Output{Key: []byte(v), Value: []byte(v)}); err != nil {
					t.Fatal(err)
				}
			}
			err := s.flush()
			if !tc.cured {
				if err == nil || errors.Is(err, errSinkUnavailable) || !errors.Is(err, tc.kerr) {
					t.Fatalf("flush answered %v: %v; want the task failed with that error, not a held sink", tc.kerr, err)
				}
				return
			}
			if !errors.Is(err, errSinkUnavailable) {
				t.Fatalf("flush answered %v: %v; want the sink held until the id's new epoch", tc.kerr, err)
			}
			epoch := s.txn.cur.epoch
			waitFor(t, "the held sink to write under a new epoch", func() bool { return s.flush() == nil })
			if s.txn.cur.epoch == epoch {
				t.Fatalf("the held write went through under epoch %d, the one the broker answered %v", epoch, tc.kerr)
			}
			commitCheckpoint(t, s, 1)
			checkPartitions(t, c.ListenAddrs(), [][]string{seq("a", 20)})
		})
	}
}

// answerAddPartitions has cluster c answer the next n AddPartitionsToTxn
// requests with kerr for each partition, adding none.
func answerAddPartitions(c *kfake.Cluster, kerr sarama.KError, n int) {
	answerNext(c, kmsg.AddPartitionsToTxn, n, func(req kmsg.Request) kmsg.Response {
		add := req.(*kmsg.AddPartitionsToTxnRequest)
		resp := add.ResponseKind().(*kmsg.AddPartitionsToTxnResponse)
		for _, rt := range add.Topics {
			st := kmsg.NewAddPartitionsToTxnResponseTopic()
			st.Topic = rt.Topic
			for _, pt := range rt.Partitions {
				sp := kmsg.NewAddPartitionsToTxnResponseTopicPartition()
				sp.Partition = pt
				sp.ErrorCode = int16(kerr)
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp
	})
}

// answerProduce has cluster c answer the next n Produce requests (every
// one for n < 0) with kerr for each partition, writing nothing.
func answerProduce(c *kfake.Cluster, kerr sarama.KError, n int) {
	answerNext(c, kmsg.Produce, n, func(req kmsg.Request) kmsg.Response {
		return produceAnswer(req.(*kmsg.ProduceRequest), kerr)
	})
}

// produceAnswer is the answer to produce that gives kerr for each of its
// partitions.
func produceAnswer(produce *kmsg.ProduceRequest, kerr sarama.KError) *kmsg.ProduceResponse {
	resp := produce.ResponseKind().(*kmsg.ProduceResponse)
	for _, rt := range produce.Topics {
		st := kmsg.NewProduceResponseTopic()
		st.Topic = rt.Topic
		for _, rp := range rt.Partitions {
			sp := kmsg.NewProduceResponseTopicPartition()
			sp.Partition = rp.Partition
			sp.ErrorCode = int16(kerr)
			st.Partitions = append(st.Partitions, sp)
		}
		resp.Topics = append(resp.Topics, st)
	}
	return resp
}

// answerNext has cluster c answer the next n requests of kind key (every
// one for n < 0) with what answer makes of each, in place of the broker.
func answerNext(c *kfake.Cluster, key kmsg.Key, n int, answer func(kmsg.Request) kmsg.Response) {
	var answered atomic.Int64
	c.ControlKey(int16(key), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if n >= 0 && answered.Load() >= int64(n) {
			return nil, nil, false
		}
		answered.Add(1)
		return answer(req), nil, true
	})
}

// TestSinkWritesNullKeysAndEmptyValues: under either delivery, an output
// without a key reaches the topic with a null key (and is spread over the
// partitions), an empty key as an empty one, and an empty value or none as
// an empty value, never a null one: a null value is a tombstone to a
// compacted topic, which would delete the key.
func TestSinkWritesNullKeysAndEmptyValues(t *testing.T) {
	for _, delivery := range []string{"at_least_once", "exactly_once"} {
		t.Run(delivery, func(t *testing.T) {
			c := newKafkaCluster(t, "out")
			var s *sink
			if delivery == "exactly_once" {
				s = txnTestSink(t, txnTestEnv(), c.ListenAddrs(), "map-0", nil)
			} else {
				s = atLeastOnceTestSink(t, c.ListenAddrs())
			}
			for _, out := range []operator.Output{
				{},                               // no key, no value
				{Key: []byte{}, Value: []byte{}}, // both empty
				{Key: []byte("k"), Value: []byte("v")},
			} {
				if err := s.add(&out); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.flush(); err != nil {
				t.Fatal(err)
			}
			if s.txn != nil {
				commitCheckpoint(t, s, 1)
			}
			recs := readCommittedAll(t, c.ListenAddrs(), "out", 3)
			if len(recs) != 3 {
				t.Fatalf("read %d records, want 3", len(recs))
			}
			var nullKey, emptyKey, kv int
			for _, r := range recs {
				if r.Value == nil {
					t.Errorf("a record with key %q has a null value (a tombstone)", r.Key)
				}
				switch {
				case r.Key == nil && len(r.Value) == 0:
					nullKey++
				case r.Key != nil && len(r.Key) == 0 && len(r.Value) == 0:
					emptyKey++
				case string(r.Key) == "k" && string(r.Value) == "v":
					kv++
				default:
					t.Errorf("unexpected record: key %q (nil %v), value %q", r.Key, r.Key == nil, r.Value)
				}
			}
			if nullKey != 1 || emptyKey != 1 || kv != 1 {
				t.Fatalf("read %d records with a null key, %d with an empty one, %d k=v; want one of each", nullKey, emptyKey, kv)
			}
		})
	}
}

// TestSinkHoldsWhatAFailedWriteLeft: a write whose requests to one of three
// leaders are lost until its retries give up holds the sink. At least once
// it holds only the records that leader did not acknowledge, so once the
// broker answers again the others are not written twice; exactly once it
// holds them all, since the slot's new epoch aborts what the failed write
// left in its transaction. Outputs added while the sink is held follow
// them. Either way every partition ends with each record once, in the
// order added.
func TestSinkHoldsWhatAFailedWriteLeft(t *testing.T) {
	for _, delivery := range []string{"at_least_once", "exactly_once"} {
		t.Run(delivery, func(t *testing.T) {
			const parts, brokers, n = 6, 3, 300
			c := spreadCluster(t, parts, brokers)
			var down atomic.Bool // broker 1 loses every Produce request
			down.Store(true)
			c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
				c.KeepControl()
				if c.CurrentNode() == 1 && down.Load() {
					return nil, fmt.Errorf("the request is lost"), true
				}
				return nil, nil, false
			})
			addrs := c.ListenAddrs()
			var s *sink
			if delivery == "exactly_once" {
				s = txnTestSink(t, txnTestEnv(), addrs, "map-0", nil)
			} else {
				s = atLeastOnceTestSink(t, addrs)
			}
			add := func(values []string) {
				t.Helper()
				for _, v := range values {
					if err := s.add(&operator.Output{Key: []byte(v), Value: []byte(v)}); err != nil {
						t.Fatal(err)
					}
				}
			}
			add(seq("a", n))
			if err := s.flush(); !errors.Is(err, errSinkUnavailable) {
				t.Fatalf("flush with broker 1 losing every request: %v, want the sink held", err)
			}
			want := n // exactly once: the whole write is held
			if delivery == "at_least_once" {
				want = 0
				for pt, values := range byPartition(t, parts, seq("a", n)) {
					if pt%brokers == 1 {
						want += len(values)
					}
				}
			}
			if len(s.buf) != want {
				t.Fatalf("the held sink holds %d records, want %d", len(s.buf), want)
			}
			add(seq("b", 50)) // while held

			down.Store(false)
			waitFor(t, "the held sink to write", func() bool { return s.flush() == nil })
			if s.txn != nil {
				commitCheckpoint(t, s, 1)
			}
			checkPartitions(t, addrs, byPartition(t, parts, append(seq("a", n), seq("b", 50)...)))
		})
	}
}

// spreadCluster starts a kfake cluster of brokers brokers whose topic
// "out" has parts partitions, partition p led by broker p % brokers.
func spreadCluster(t *testing.T, parts, brokers int) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(brokers), kfake.SeedTopics(int32(parts), "out"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for pt := range int32(parts) {
		if err := c.MoveTopicPartition("out", pt, pt%int32(brokers)); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// commitCheckpoint has exactly-once sink s pre-commit for checkpoint id
// and then learn that it completed: its open transaction is committed.
func commitCheckpoint(t *testing.T, s *sink, id uint64) {
	t.Helper()
	if _, err := s.txn.preCommit(id); err != nil {
		t.Fatal(err)
	}
	if err := s.txn.completed(id); err != nil {
		t.Fatal(err)
	}
}

// byPartition sorts values, each a record's key and value, into the
// partitions of a topic of parts partitions that sarama's hash partitioner
// (the sink's) puts them in, each partition's in the order given.
func byPartition(t *testing.T, parts int, values []string) [][]string {
	t.Helper()
	hash := sarama.NewHashPartitioner("out")
	out := make([][]string, parts)
	for _, v := range values {
		pt, err := hash.Partition(&sarama.ProducerMessage{Key: sarama.StringEncoder(v)}, int32(parts))
		if err != nil {
			t.Fatal(err)
		}
		out[pt] = append(out[pt], v)
	}
	return out
}

// checkPartitions reads topic "out" with read_committed and fails the test
// unless each partition holds the values want names for it, each once, in
// that order.
func checkPartitions(t *testing.T, brokers []string, want [][]string) {
	t.Helper()
	n := 0
	for _, values := range want {
		n += len(values)
	}
	got := make([][]string, len(want))
	for _, r := range readCommittedAll(t, brokers, "out", n) {
		if int(r.Partition) >= len(got) {
			t.Fatalf("a record in partition %d of %d", r.Partition, len(got))
		}
		got[r.Partition] = append(got[r.Partition], string(r.Value))
	}
	for pt := range want {
		if !slices.Equal(got[pt], want[pt]) {
			t.Fatalf("partition %d holds %d records, want %d, each once in the order written: first difference at %d",
				pt, len(got[pt]), len(want[pt]), firstDiff(got[pt], want[pt]))
		}
	}
}

// TestAtLeastOnceSinkRetriesStopWithTheTask: while an at-least-once write
// is retried (every Produce request lost), the task stopping ends the
// flush at once, with the task's context error rather than a held sink.
func TestAtLeastOnceSinkRetriesStopWithTheTask(t *testing.T) {
	c := newKafkaCluster(t, "out")
	c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		return nil, fmt.Errorf("the request is lost"), true
	})
	env := &taskEnv{workerID: "w1", cfg: &Config{KafkaTimeout: 5 * time.Second}, metrics: newMetrics()}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	spec := &transport.SinkSpec{Brokers: c.ListenAddrs(), Topic: "out", Delivery: "at_least_once"}
	s, err := openSink(ctx, env, taskKey{job: "j", attempt: 1, id: "map-0"}, spec, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.close)
	if err := s.add(&operator.Output{Key: []byte("k"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	err = s.flush()
	if !errors.Is(err, context.Canceled) || errors.Is(err, errSinkUnavailable) {
		t.Fatalf("flush while every request is lost and the task stops: %v, want context.Canceled, not a held sink", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("flush returned %v after the task stopped; its retries run for %v", d, env.cfg.KafkaTimeout)
	}
}
