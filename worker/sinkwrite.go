package worker

import (
	"cmp"
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/IBM/sarama"
)

// sinkRecordOverhead bounds what a record adds to a batch besides its key and
// value (length, attributes, timestamp and offset deltas, key and value
// lengths, header count: varints), and sinkBatchOverhead a batch's header; as
// sarama's producer counted them when the sink wrote through it.
const (
	sinkRecordOverhead = 5*5 + 10 + 1
	sinkBatchOverhead  = 61
)

// sinkWriter is how a sink writes its records: itself, with sarama's
// request types, rather than through sarama's producer. That producer
// hands every record through four goroutines (dispatcher, topic,
// partition, broker) and back, which was about half of a passthrough
// job's CPU (docs/benchmarks.md); a sink's writes are synchronous and one
// at a time anyway. So a write sends each partition's leader one Produce
// request (acks=all) holding one record batch per partition. Exactly once,
// the write first adds the partitions new to the transaction
// (AddPartitionsToTxn), and the batches carry the transaction's producer
// id, epoch and per-partition sequences, so that the broker drops a batch
// sent again after a lost answer (idempotence). At least once, they carry
// no producer id: a batch sent again may be written twice, which at least
// once allows. Only the map task's goroutine uses it; its buffers are
// reused by every write.
type sinkWriter struct {
	client sarama.Client
	topic  string
	// ctx is the task's; when it ends, conns cuts the Produce requests
	// in flight (sinkConns).
	ctx   context.Context
	conns *sinkConns
	part  sarama.Partitioner
	// produceVersion and addVersion are the Produce and AddPartitionsToTxn
	// versions sarama's producer would send with the client's Kafka version.
	produceVersion int16
	addVersion     int16
	// ackTimeout is how long a leader may wait for its replicas: shorter
	// than the client's read timeout, so that a slow write is answered
	// (REQUEST_TIMED_OUT) and sent again within the caller's retry window.
	ackTimeout time.Duration
	maxBatch   int // bytes of one record batch (sinkMaxBatch)
	maxRequest int // bytes of one Produce request

	byPart  [][]sinkRecord // the write's records by partition
	acked   []int          // how many of byPart's are acknowledged
	parts   []int32        // the partitions byPart has records for
	records []sarama.Record
	ptrs    []*sarama.Record
	// sending says the last write got past partitioning its records (and
	// adding the partitions): w.acked counts what it wrote.
	sending bool
	// msg and key are what the partitioner is asked about: one record's
	// key at a time.
	msg sarama.ProducerMessage
	key keyBytes
}

func newSinkWriter(ctx context.Context, client sarama.Client, topic string, conns *sinkConns) *sinkWriter {
	conf := client.Config()
	return &sinkWriter{
		client:         client,
		topic:          topic,
		ctx:            ctx,
		conns:          conns,
		part:           sarama.NewHashPartitioner(topic),
		produceVersion: requestVersion(conf.Version, produceVersions),
		addVersion:     requestVersion(conf.Version, txnRequestVersions),
		ackTimeout:     conf.Net.ReadTimeout / 2,
		maxBatch:       sinkMaxBatch,
		maxRequest:     maxProduceRequest,
	}
}

// sinkMaxBatch bounds a record batch: sarama's producer's default
// (Producer.MaxMessageBytes), what the sink's batches were when it wrote
// through that producer, and under the 1,048,588 bytes a broker takes by
// default (message.max.bytes). A record larger than that goes alone, and
// the broker decides.
const sinkMaxBatch = 1_000_000

// maxProduceRequest bounds a Produce request's batches: a leader of many
// partitions gets the rest in the next round. Brokers refuse requests over
// socket.request.max.bytes (100 MiB by default), and sarama will not
// encode them; a held sink's buffer may be far larger than one batch.
const maxProduceRequest = 16 << 20

// write adds msgs to slot s's open transaction and returns once every
// record is acknowledged by all in-sync replicas, or the error that
// stopped it: fenced (isFenced), refused for good (a Kafka error that is
// not retriable), or one that waiting may cure after p.retry gave up on
// it (sinkUnreachable). After an error some records may be in the
// transaction and others not: the caller must not commit it.
func (p *txnPool) write(s *txnSlot, msgs []sinkRecord) error {
	// A failed write is sent again whole, acknowledged records too: the
	// slot's new epoch aborts them.
	// The caller's error names the topic and the transaction.
	return p.w.write(s, msgs, p.retry, func() error { return p.addPartitions(s) })
}

// write sends msgs in rounds (produce) through retry until every record
// is acknowledged by all in-sync replicas, or returns the error that
// stopped it; after an error some of msgs may be written and others not
// (unacked tells which). s is the transaction the records go into, nil for
// none (at least once); add, if not nil, is called once the records are
// partitioned and before anything is sent, to add the partitions new to
// the transaction. msgs is left as it is.
func (w *sinkWriter) write(s *txnSlot, msgs []sinkRecord, retry retryFunc, add func() error) error {
	w.reset() // what the last write left for unacked
	if err := w.partition(msgs); err != nil {
		return err
	}
	if add != nil {
		if err := add(); err != nil {
			return err
		}
	}
	w.sending = true
	for w.pending() {
		kerr, err := retry(func(context.Context) (sarama.KError, error) { return w.produce(s) })
		if err == nil && kerr != sarama.ErrNoError {
			err = kerr
		}
		if err != nil {
			return err
		}
	}
	w.reset()
	return nil
}

// unacked appends to dst the records of the last write, which failed, that
// no broker acknowledged, each partition's in their order, and reports
// true; it reports false if that write failed before it sent anything
// (every record is unacknowledged). dst may share memory with the write's
// msgs: w.byPart holds copies of them. Valid until the next write.
func (w *sinkWriter) unacked(dst []sinkRecord) ([]sinkRecord, bool) {
	if !w.sending {
		return dst, false
	}
	for _, pt := range w.parts {
		dst = append(dst, w.byPart[pt][w.acked[pt]:]...)
	}
	return dst, true
}

// partition sorts msgs into w.byPart by the partitioner sarama's producer
// uses by default (a hash of the key; a record without a key goes to a
// random partition), so that a key's outputs land where they always did.
func (w *sinkWriter) partition(msgs []sinkRecord) error {
	ids, err := w.client.Partitions(w.topic)
	if err != nil {
		return fmt.Errorf("partitions of sink topic %q: %w", w.topic, err)
	}
	if len(ids) == 0 {
		return fmt.Errorf("sink topic %q: %w", w.topic, sarama.ErrUnknownTopicOrPartition)
	}
	n := int32(len(ids))
	if cap(w.byPart) < len(ids) {
		w.byPart = make([][]sinkRecord, len(ids))
		w.acked = make([]int, len(ids))
	}
	w.byPart, w.acked = w.byPart[:len(ids)], w.acked[:len(ids)]
	for _, m := range msgs {
		w.msg.Key = nil
		if m.key != nil {
			w.key.b = m.key
			w.msg.Key = &w.key
		}
		pt, err := w.part.Partition(&w.msg, n)
		if err != nil {
			return fmt.Errorf("sink topic %q: partition a record: %w", w.topic, err)
		}
		if len(w.byPart[pt]) == 0 {
			w.parts = append(w.parts, pt)
		}
		w.byPart[pt] = append(w.byPart[pt], m)
	}
	w.msg.Key, w.key.b = nil, nil
	return nil
}

// keyBytes is a key as sarama's partitioner reads it. A pointer to the
// writer's one makes the interface value free of allocation.
type keyBytes struct{ b []byte }

func (k *keyBytes) Encode() ([]byte, error) { return k.b, nil }
func (k *keyBytes) Length() int             { return len(k.b) }

// reset empties the buffers of the last write, keeping their memory.
func (w *sinkWriter) reset() {
	w.sending = false
	for i := range w.byPart {
		clear(w.byPart[i])
		w.byPart[i], w.acked[i] = w.byPart[i][:0], 0
	}
	w.parts = w.parts[:0]
	clear(w.records)
	clear(w.ptrs)
}

// pending reports whether any record of the write is unacknowledged.
func (w *sinkWriter) pending() bool {
	for _, pt := range w.parts {
		if w.acked[pt] < len(w.byPart[pt]) {
			return true
		}
	}
	return false
}

// addPartitions adds the partitions of the write that slot s's open
// transaction has not written to yet, at its transaction coordinator.
func (p *txnPool) addPartitions(s *txnSlot) error {
	var add []int32
	for _, pt := range p.w.parts {
		if !s.added[pt] {
			add = append(add, pt)
		}
	}
	if len(add) == 0 {
		return nil
	}
	kerr, err := p.retry(p.cutAtCoordinator(s.id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.AddPartitionsToTxn(&sarama.AddPartitionsToTxnRequest{
			Version: p.w.addVersion, TransactionalID: s.id, ProducerID: s.pid, ProducerEpoch: s.epoch,
			TopicPartitions: map[string][]int32{p.topic: add},
		})
		if err != nil {
			return 0, err
		}
		if n := len(resp.Errors[p.topic]); n != len(add) {
			return 0, fmt.Errorf("AddPartitionsToTxn answered for %d of %d partitions", n, len(add))
		}
		// One partition's error fails the others with
		// OPERATION_NOT_ATTEMPTED: the first is the one to report.
		kerr := sarama.ErrNoError
		for _, pe := range resp.Errors[p.topic] {
			if pe.Err != sarama.ErrNoError && (kerr == sarama.ErrNoError || kerr == sarama.ErrOperationNotAttempted) {
				kerr = pe.Err
			}
		}
		return kerr, nil
	}))
	if err == nil && kerr != sarama.ErrNoError {
		err = kerr
	}
	if err != nil {
		return fmt.Errorf("add partitions %v of sink topic %q to transaction %s: %w", add, p.topic, s.id, err)
	}
	for _, pt := range add {
		s.added[pt] = true
	}
	return nil
}

// leaderRequest is one Produce request of a round and what it carries.
type leaderRequest struct {
	broker *sarama.Broker
	req    *sarama.ProduceRequest
	parts  []int32
	counts []int // records per partition, in parts' order
	bytes  int   // of the batches, estimated
	resp   *sarama.ProduceResponse
	err    error
}

// produce sends one round: the next batch of every partition with
// unacknowledged records, one request per leader, all leaders at once, in
// slot s's transaction (nil: in none, at least once). It counts what was
// acknowledged in w.acked and advances s's sequences. It
// returns a Kafka error the write must fail with, or an error waiting may
// cure (a lost connection, a leader that moved: the metadata is refreshed),
// for the caller's retry to send the rest again.
func (w *sinkWriter) produce(s *txnSlot) (sarama.KError, error) {
	now := time.Now().Truncate(time.Millisecond)
	var reqs []*leaderRequest
	n := 0
	for _, pt := range w.parts {
		n += len(w.byPart[pt]) - w.acked[pt]
	}
	if cap(w.records) < n {
		w.records = make([]sarama.Record, n)
		w.ptrs = make([]*sarama.Record, n)
	}
	records, ptrs := w.records[:n], w.ptrs[:n]
	for _, pt := range w.parts {
		msgs := w.byPart[pt][w.acked[pt]:]
		if len(msgs) == 0 {
			continue
		}
		leader, err := w.client.Leader(w.topic, pt)
		if err != nil {
			return 0, fmt.Errorf("leader of sink partition %d: %w", pt, err)
		}
		var lr *leaderRequest
		for _, r := range reqs {
			if r.broker == leader {
				lr = r
			}
		}
		// One batch per partition and request (Produce v3 and later):
		// records up to the batch limit and what is left of the
		// request's; one at least in a request of its own.
		limit := w.maxBatch
		if lr != nil {
			limit = min(limit, w.maxRequest-lr.bytes)
		}
		size, k := sinkBatchOverhead, 0
		for k < len(msgs) {
			key, value := msgs[k].key, msgs[k].value
			more := len(key) + len(value) + sinkRecordOverhead
			if size+more > limit && (k > 0 || lr != nil) {
				break
			}
			size += more
			records[k] = sarama.Record{Key: key, Value: value, OffsetDelta: int64(k)}
			ptrs[k] = &records[k]
			k++
		}
		if k == 0 {
			continue // no room left in the leader's request: the next round
		}
		batch := &sarama.RecordBatch{
			Version: 2, FirstTimestamp: now, MaxTimestamp: now,
			ProducerID: -1, ProducerEpoch: -1, FirstSequence: -1,
			LastOffsetDelta: int32(k - 1), Records: ptrs[:k:k],
		}
		if s != nil {
			batch.ProducerID, batch.ProducerEpoch, batch.FirstSequence, batch.IsTransactional = s.pid, s.epoch, s.seq[pt], true
		}
		records, ptrs = records[k:], ptrs[k:]
		if lr == nil {
			lr = &leaderRequest{broker: leader, req: &sarama.ProduceRequest{
				RequiredAcks: sarama.WaitForAll, Timeout: int32(w.ackTimeout.Milliseconds()), Version: w.produceVersion,
			}}
			if s != nil {
				id := s.id
				lr.req.TransactionalID = &id
			}
			reqs = append(reqs, lr)
		}
		lr.bytes += size
		lr.req.AddBatch(w.topic, pt, batch)
		lr.parts = append(lr.parts, pt)
		lr.counts = append(lr.counts, k)
	}
	brokers := make([]*sarama.Broker, len(reqs))
	for i, r := range reqs {
		brokers[i] = r.broker
	}
	w.conns.cutDuring(w.ctx, brokers, func() {
		if len(reqs) == 1 {
			reqs[0].send()
			return
		}
		var wg sync.WaitGroup
		for _, r := range reqs {
			wg.Go(r.send)
		}
		wg.Wait()
	})
	var retry, refused error
	fail := sarama.ErrNoError
	for _, r := range reqs {
		if r.err != nil && requestRefused(r.err) {
			// Never sent (sarama could not encode it): it would fail again.
			refused = cmp.Or(refused, fmt.Errorf("produce to broker %s: %w", r.broker.Addr(), r.err))
			continue
		}
		if r.err != nil {
			// The request may have been written. Sent again, exactly
			// once, its batches carry the same sequences and the broker
			// drops the copies; at least once (no producer id) they may
			// be written twice.
			_ = r.broker.Close()
			retry = cmp.Or(retry, fmt.Errorf("produce to broker %s: %w", r.broker.Addr(), r.err))
			continue
		}
		for i, pt := range r.parts {
			block := r.resp.GetBlock(w.topic, pt)
			switch {
			case block == nil:
				retry = cmp.Or(retry, fmt.Errorf("broker %s did not answer for sink partition %d", r.broker.Addr(), pt))
			case block.Err == sarama.ErrNoError || block.Err == sarama.ErrDuplicateSequenceNumber:
				w.acked[pt] += r.counts[i]
				if s != nil {
					s.seq[pt] += int32(r.counts[i])
				}
			case retriableKafkaErr(block.Err):
				retry = cmp.Or(retry, fmt.Errorf("sink partition %d: %w", pt, block.Err))
			case isFenced(block.Err):
				fail = block.Err // what the task must hear above all
			default:
				fail = cmp.Or(fail, block.Err)
			}
		}
	}
	if fail != sarama.ErrNoError {
		return fail, nil
	}
	if refused != nil {
		return 0, refused
	}
	if retry != nil {
		if w.ctx.Err() != nil {
			// The task stopped: its retries end, and a refresh from a
			// broker that says nothing would hold the stop.
			return 0, retry
		}
		if err := w.client.RefreshMetadata(w.topic); err != nil {
			retry = fmt.Errorf("%w (and refreshing the metadata: %w)", retry, err)
		}
		return 0, retry
	}
	return sarama.ErrNoError, nil
}

// send sends r's request and keeps the answer.
func (r *leaderRequest) send() { r.resp, r.err = r.broker.Produce(r.req) }
