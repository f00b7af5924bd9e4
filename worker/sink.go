package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// A sink sends its buffer once it holds sinkBatch outputs or
// sinkBatchBytes of keys and values. Sends are synchronous, and each costs
// requests and acks whatever its size, so large sends are what make a
// sink fast:
// 500 outputs a send cost about twice the CPU per record of 5,000, in the
// workers and the broker alike (BenchmarkThroughput, docs/benchmarks.md).
const (
	sinkBatch      = 10_000
	sinkBatchBytes = 4 << 20
)

// sinkMaxHeld is how many outputs a sink that cannot write holds before
// its map task stops taking input (sink.full).
const sinkMaxHeld = 50_000

// sinkRetryMin and sinkRetryMax bound the backoff between a held sink's
// tries to write again (sinkHold).
const (
	sinkRetryMin = 200 * time.Millisecond
	sinkRetryMax = 5 * time.Second
)

// kafkaConfig returns the sarama configuration every task uses: a protocol
// version kfake and real brokers since 2.8 speak, and timeouts bounded by
// cfg.KafkaTimeout so that a missing broker or topic fails a task rather than
// hanging it.
func kafkaConfig(cfg *Config, clientID string) *sarama.Config {
	c := sarama.NewConfig()
	c.Version = sarama.V2_8_0_0
	c.ClientID = clientID
	c.Net.DialTimeout = cfg.KafkaTimeout
	c.Net.ReadTimeout = 2 * cfg.KafkaTimeout
	c.Net.WriteTimeout = cfg.KafkaTimeout
	c.Metadata.Retry.Max = 2
	c.Metadata.Retry.Backoff = 200 * time.Millisecond
	c.Metadata.Timeout = 2 * cfg.KafkaTimeout
	c.Metadata.Full = false
	c.Metadata.AllowAutoTopicCreation = false
	c.Consumer.Return.Errors = true
	// Retry a failing partition often enough that a source sees an outage
	// as a steady stream of errors (see sourceTask.pump and errorCycle).
	c.Consumer.Retry.Backoff = 500 * time.Millisecond
	c.Consumer.MaxWaitTime = 250 * time.Millisecond
	return c
}

// sink writes a map task's outputs to the job's sink topic. Outputs are
// buffered and sent synchronously in batches; flush returns only once the
// broker has acknowledged everything added before it. At least once, that is
// all: a map task flushes before it acks a checkpoint. Exactly once, the
// records go into Kafka transactions that checkpoints commit (txnPool).
// While the sink cannot write (its brokers cannot be reached, its topic is
// missing, a write failed: sinkHold) it holds its outputs, flush fails with
// errSinkUnavailable, and add goes on buffering. Only the map task loop
// calls it.
type sink struct {
	client sarama.Client
	w      *sinkWriter
	txn    *txnPool // exactly once
	hold   *sinkHold
	topic  string
	// retryWindow is how long an at-least-once write tries again before
	// the sink is held: -kafka-timeout, not the twice that an exactly-once
	// request gets, since the task loop waits meanwhile and a held sink
	// tries again anyway (sarama's producer, which the sink used before,
	// gave up after three retries 100 ms apart).
	retryWindow time.Duration
	buf         []sinkRecord
	bufBytes    int // keys and values in buf
	slab        outSlab
}

// openSink creates the sink of map task key. It fails on a spec it cannot
// run, and on a broker's refusal of the topic (lookRefused); it does not
// need the sink's brokers to answer. It looks the sink topic up once
// (sinkHold.look: a metadata request, which fails within the Kafka
// timeouts when no broker answers), and if that fails otherwise the sink
// starts held: the task runs, holds its outputs and declines checkpoints
// until a later look passes. Exactly once, the caller must then call
// txnPool.recover, which commits the restored checkpoint's transactions
// and fences the task's other ids, before anything is added; when the sink
// is held, before its first write instead. ctx is the task's: the sink's
// retries, and a Produce in flight, stop when it ends.
func openSink(ctx context.Context, env *taskEnv, key taskKey, spec *transport.SinkSpec, log *slog.Logger) (*sink, error) {
	topic, brokers := spec.GetTopic(), spec.GetBrokers()
	conf := kafkaConfig(env.cfg, "coordflow-"+env.workerID)
	// A stopping task must not wait for a broker that does not answer a
	// Produce (sinkConns).
	conns := newSinkConns(conf.Net.DialTimeout)
	conf.Net.Proxy.Enable = true
	conf.Net.Proxy.Dialer = conns
	switch spec.GetDelivery() {
	case fsm.DeliveryAtLeastOnce:
	case fsm.DeliveryExactlyOnce, "":
		if spec.GetTransactionalIdPrefix() == "" || spec.GetTransactionTimeoutMs() <= 0 || spec.GetCheckpointTimeoutMs() <= 0 {
			return nil, fmt.Errorf("deploy of map task %s: exactly-once sink without transactional_id_prefix, transaction_timeout_ms or checkpoint_timeout_ms", key.id)
		}
		conf.Version = txnKafkaVersion
	default:
		return nil, fmt.Errorf("deploy of map task %s: sink delivery %q: want %q or %q", key.id, spec.GetDelivery(), fsm.DeliveryExactlyOnce, fsm.DeliveryAtLeastOnce)
	}
	if len(brokers) == 0 {
		return nil, fmt.Errorf("sink topic %q: no brokers given", topic)
	}
	// With Metadata.Full off (kafkaConfig), NewClient sends nothing: it
	// fails on a bad configuration only, and each request connects itself.
	client, err := sarama.NewClient(brokers, conf)
	if err != nil {
		return nil, fmt.Errorf("sink topic %q: Kafka client for brokers %v: %w", topic, brokers, err)
	}
	s := &sink{
		client: client, w: newSinkWriter(ctx, client, topic, conns), topic: topic, retryWindow: env.cfg.KafkaTimeout,
		hold: &sinkHold{ctx: ctx, log: log, client: client, topic: topic, brokers: brokers},
	}
	if err := s.hold.look(); err != nil {
		if refused(err) {
			client.Close()
			return nil, err
		}
		_ = s.hold.fail(err, time.Now())
	}
	if spec.GetDelivery() == fsm.DeliveryAtLeastOnce {
		return s, nil
	}
	s.txn = newTxnPool(ctx, env, key.job, key.id, spec, client, s.w, s.hold, log)
	return s, nil
}

// sinkHold is how a sink that cannot write holds its outputs and tries
// again. Before its first write, and before the first after a failed one,
// a sink looks its topic up (look: a metadata request, which passes once a
// broker answers and the topic exists); an exactly-once sink then starts
// (txnPool.start: the restored transactions are recovered first) and makes
// its producer ready again. While any of that fails, or a write did, the
// sink is held: flush fails with errSinkUnavailable, which says why, and
// tries again at a backoff from sinkRetryMin to sinkRetryMax.
//
// Only the task loop calls it. The first look, at the task's start, is
// waited for; the ones of a held sink run in the background, so that a
// broker that does not answer at all (each dial waits for -kafka-timeout,
// and a metadata request tries three times) never blocks the task loop.
type sinkHold struct {
	ctx     context.Context
	log     *slog.Logger
	client  sarama.Client
	topic   string
	brokers []string
	// seen: a look passed, and no write failed since.
	seen bool
	// looking has the answer of the look under way; nil if none.
	looking chan error
	// down is why the sink cannot write, wrapping errSinkUnavailable; nil
	// while it can. The sink tries again at retryAt.
	down    error
	retryAt time.Time
	backoff time.Duration
}

// due returns why the sink is held until its next try is due, and nil once
// it is (or when the sink is not held).
func (h *sinkHold) due(now time.Time) error {
	if h.down != nil && now.Before(h.retryAt) {
		return h.down
	}
	return nil
}

// look returns nil when the sink may write as far as its topic goes: a
// look passed and no write failed since. Otherwise it looks the topic up:
// a look of a held sink runs in the background, and until its answer is in
// look returns h.down; the first look, of a sink that is not held, is
// waited for. It returns why the look failed: the brokers did not answer,
// the topic does not exist, or a broker refused the look (lookRefused).
func (h *sinkHold) look() error {
	if h.seen {
		return nil
	}
	if h.looking == nil {
		answer := make(chan error, 1)
		h.looking = answer
		client, topic, brokers := h.client, h.topic, h.brokers
		go func() { answer <- lookTopic(client, topic, brokers) }()
	}
	var err error
	if h.down == nil {
		select {
		case err = <-h.looking:
		case <-h.ctx.Done():
			return fmt.Errorf("sink topic %q: look-up: %w", h.topic, h.ctx.Err())
		}
	} else {
		select {
		case err = <-h.looking:
		default:
			return h.down
		}
	}
	h.looking = nil
	if err != nil {
		return err
	}
	h.seen = true
	return nil
}

// lookTopic asks the brokers of client for topic's partitions, which takes
// a broker that answers and a topic that exists. A broker's answer that
// waiting does not cure (not authorised to see the topic, an invalid topic
// name) is returned as a lookRefused.
func lookTopic(client sarama.Client, topic string, brokers []string) error {
	err := client.RefreshMetadata(topic)
	var parts []int32
	if err == nil {
		parts, err = client.Partitions(topic)
	}
	var kerr sarama.KError
	switch {
	case errors.Is(err, sarama.ErrUnknownTopicOrPartition) || err == nil && len(parts) == 0:
		return fmt.Errorf("sink topic %q does not exist", topic)
	case err != nil && sinkUnreachable(err):
		return fmt.Errorf("sink brokers %v unreachable: %w", brokers, err)
	case errors.As(err, &kerr):
		return &lookRefused{fmt.Errorf("sink topic %q: a broker refused its look-up: %w", topic, err)}
	case err != nil:
		return fmt.Errorf("sink topic %q: read partitions: %w", topic, err)
	}
	return nil
}

// lookRefused is a topic look-up's error that a broker answered and that
// waiting does not cure, such as TOPIC_AUTHORIZATION_FAILED. The task fails
// on it, as it does on the same answer to a write, instead of holding its
// outputs and declining checkpoints until the operator notices: the job
// restarts with the broker's answer as its reason. A missing topic and
// unreachable brokers are held instead: creating the topic, or the brokers
// coming back, cures them without a restart.
type lookRefused struct{ err error }

func (e *lookRefused) Error() string { return e.err.Error() }
func (e *lookRefused) Unwrap() error { return e.err }

// refused reports whether err is a look-up's refusal (lookRefused).
func refused(err error) bool {
	var r *lookRefused
	return errors.As(err, &r)
}

// lost says a write failed: the topic is looked up again before the next.
func (h *sinkHold) lost() { h.seen = false }

// fail holds the sink for cause, schedules its next try and returns the
// error flush fails with: cause, wrapping errSinkUnavailable. An error that
// says the sink is held already, and a look-up's refusal, which fails the
// task (lookRefused), are returned as they are.
func (h *sinkHold) fail(cause error, now time.Time) error {
	if errors.Is(cause, errSinkUnavailable) || refused(cause) {
		return cause
	}
	if h.down == nil {
		h.backoff = sinkRetryMin
		h.log.Warn("sink cannot write: holding its outputs and declining checkpoints until it can", "topic", h.topic, "brokers", h.brokers, "err", cause)
	} else {
		h.backoff = min(2*h.backoff, sinkRetryMax)
	}
	h.down = fmt.Errorf("%w: %w", cause, errSinkUnavailable)
	h.retryAt = now.Add(h.backoff)
	return h.down
}

// ok says the sink wrote, or is ready to: it is held no more.
func (h *sinkHold) ok() {
	if h.down != nil {
		h.log.Info("sink writes again", "topic", h.topic, "was", h.down)
		h.down = nil
	}
}

// add buffers out, sending the buffer when it is full. Outputs a sink
// that cannot write holds are no error here.
func (s *sink) add(out *operator.Output) error {
	s.buf = append(s.buf, s.slab.record(out))
	s.bufBytes += len(out.Key) + len(out.Value)
	if len(s.buf) >= sinkBatch || s.bufBytes >= sinkBatchBytes {
		if err := s.flush(); err != nil && !errors.Is(err, errSinkUnavailable) {
			return err
		}
	}
	return nil
}

// sinkRecord is an output the sink holds until it is written: copies of
// its key (nil for none) and value, in the sink's slabs.
type sinkRecord struct{ key, value []byte }

// outSlab is where the bytes of a sink's records are copied: an output's
// may point into the item's batch, which is reused once applied. A slab
// holds the bytes of many outputs, one allocation instead of two per
// output. Once the records of its slabs are written (reuse), the slabs
// serve the next ones: nothing refers to them any more, and fresh memory
// costs a page fault per page and the collector's work.
type outSlab struct {
	data []byte // the slab being filled; nil before the first record
	// filled are the slabs filled since the last reuse; spare those
	// ready for new records.
	filled, spare [][]byte
}

// slabsKept bounds the spare slabs a sink keeps: a batch's worth
// (sinkBatchBytes over slabBytes), not what a long hold of up to
// sinkMaxHeld outputs once needed.
const slabsKept = 16

const slabBytes = 256 << 10

// record returns a record holding a copy of out.
func (sl *outSlab) record(out *operator.Output) sinkRecord {
	n := len(out.Key) + len(out.Value)
	if sl.data == nil || cap(sl.data)-len(sl.data) < n {
		sl.next(n)
	}
	// A value is never nil, even when empty: nil would be written as a
	// null value, a tombstone to a compacted topic.
	r := sinkRecord{value: sl.copy(out.Value)}
	if out.Key != nil {
		r.key = sl.copy(out.Key)
	}
	return r
}

// next starts a slab with room for n bytes: a spare one if it has the
// room, else a new one.
func (sl *outSlab) next(n int) {
	if sl.data != nil {
		sl.filled = append(sl.filled, sl.data)
	}
	if k := len(sl.spare); k > 0 && cap(sl.spare[k-1]) >= n {
		sl.data = sl.spare[k-1]
		sl.spare = sl.spare[:k-1]
		return
	}
	sl.data = make([]byte, 0, max(slabBytes, n))
}

// reuse makes every slab spare: the caller has written all their records
// and keeps none.
func (sl *outSlab) reuse() {
	if sl.data != nil {
		sl.filled = append(sl.filled, sl.data)
		sl.data = nil
	}
	for _, b := range sl.filled {
		if len(sl.spare) == slabsKept {
			break
		}
		if cap(b) > slabBytes {
			continue // made for one large output: not kept for the sink's life
		}
		sl.spare = append(sl.spare, b[:0])
	}
	clear(sl.filled)
	sl.filled = sl.filled[:0]
}

// copy appends b to the slab's data, which has room for it.
func (sl *outSlab) copy(b []byte) []byte {
	start := len(sl.data)
	sl.data = append(sl.data, b...)
	return sl.data[start:len(sl.data):len(sl.data)]
}

// full reports whether the sink holds so many outputs it cannot write that
// its task should take no more input until it can.
func (s *sink) full() bool { return len(s.buf) >= sinkMaxHeld }

// flush sends the buffered outputs and waits for the broker's acks. With
// errSinkUnavailable the outputs stay buffered, to be sent again (at least
// once, only those no broker acknowledged; exactly once, all of them); any
// other error fails the task.
func (s *sink) flush() error {
	if s.txn != nil {
		// With nothing buffered too: a held exactly-once sink tries again
		// at the flush ticks, so that it gets ready, and checkpoints
		// complete again, without new outputs (txnPool.send).
		if err := s.txn.send(s.buf); err != nil {
			return err
		}
		s.written()
		return nil
	}
	if len(s.buf) == 0 {
		return nil
	}
	now := time.Now()
	if err := s.hold.due(now); err != nil {
		return err
	}
	if err := s.hold.look(); err != nil {
		return s.hold.fail(err, now)
	}
	n := len(s.buf)
	err := s.w.write(nil, s.buf, s.retry, nil)
	if err == nil {
		s.written()
		s.hold.ok()
		return nil
	}
	if !sinkUnreachable(err) {
		return fmt.Errorf("sink topic %q: write %s: %w", s.topic, countRecords(n), err)
	}
	// The records not acknowledged are held and sent again, those of a
	// request whose answer was lost too: at least once allows the
	// duplicates, and a consumer still sees each key's outputs end with
	// its last (a key's records keep their order within its partition).
	if unacked, ok := s.w.unacked(s.buf[:0]); ok {
		clear(s.buf[len(unacked):])
		s.buf, s.bufBytes = unacked, 0
		for _, r := range s.buf {
			s.bufBytes += len(r.key) + len(r.value)
		}
	}
	s.hold.lost()
	return s.hold.fail(fmt.Errorf("sink topic %q: write %s, %d not acknowledged: %w", s.topic, countRecords(n), len(s.buf), err), now)
}

// countRecords says "1 record" or "n records", for error messages.
func countRecords(n int) string {
	if n == 1 {
		return "1 record"
	}
	return strconv.Itoa(n) + " records"
}

// retry is an at-least-once write's retryFunc: retryKafka within
// retryWindow, stopped when the task's context ends.
func (s *sink) retry(do func(context.Context) (sarama.KError, error)) (sarama.KError, error) {
	return retryKafka(s.hold.ctx, s.retryWindow, do)
}

// written empties the buffer, which is written, and makes its memory
// ready for the next outputs.
func (s *sink) written() {
	clear(s.buf)
	s.buf, s.bufBytes = s.buf[:0], 0
	s.slab.reuse()
}

// close drops unflushed outputs (they belong to no completed checkpoint and
// are produced again after a restore) and releases the client.
func (s *sink) close() {
	if s.txn != nil {
		s.txn.close()
	}
	if answer := s.hold.looking; answer != nil {
		// A look is under way on the client: it closes once the look has
		// its answer (within the client's metadata timeout).
		go func() {
			<-answer
			_ = s.client.Close()
		}()
		return
	}
	_ = s.client.Close()
}
