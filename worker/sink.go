package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// A sink sends its buffer once it holds sinkBatch outputs or
// sinkBatchBytes of keys and values. Sends are synchronous and every message
// crosses sarama's goroutines, so large sends are what make a sink fast:
// 500 outputs a send cost about twice the CPU per record of 5,000, in the
// workers and the broker alike (BenchmarkThroughput, docs/benchmarks.md).
const (
	sinkBatch      = 10_000
	sinkBatchBytes = 4 << 20
)

// sinkMaxHeld is how many outputs an exactly-once sink that cannot write
// holds before its map task stops taking input (sink.full).
const sinkMaxHeld = 50_000

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
	// as a steady stream of errors within KafkaTimeout (see sourceTask.pump).
	c.Consumer.Retry.Backoff = 500 * time.Millisecond
	c.Consumer.MaxWaitTime = 250 * time.Millisecond
	c.Producer.RequiredAcks = sarama.WaitForAll
	c.Producer.Return.Successes = true
	c.Producer.Retry.Max = 3
	c.Producer.Timeout = 2 * cfg.KafkaTimeout
	return c
}

// connectKafka opens a client of its own (a sink's producer is not shared,
// unlike the sources' clients in kafkaPool) and checks that topic exists, so
// that the task can fail with a reason an operator understands.
func connectKafka(conf *sarama.Config, brokers []string, topic, role string) (sarama.Client, error) {
	client, err := dialKafka(conf, brokers, topic, role)
	if err != nil {
		return nil, err
	}
	if _, err := topicPartitions(client, topic, role, brokers); err != nil {
		client.Close()
		return nil, err
	}
	return client, nil
}

// dialKafka is connectKafka without the topic check.
func dialKafka(conf *sarama.Config, brokers []string, topic, role string) (sarama.Client, error) {
	if len(brokers) == 0 {
		return nil, fmt.Errorf("%s topic %q: no brokers given", role, topic)
	}
	client, err := sarama.NewClient(brokers, conf)
	if err != nil {
		return nil, fmt.Errorf("%s: connect to brokers %v: %w", role, brokers, err)
	}
	return client, nil
}

// sink writes a map task's outputs to the job's sink topic. Outputs are
// buffered and sent synchronously in batches; flush returns only once the
// broker has acknowledged everything added before it. At least once, that is
// all: a map task flushes before it acks a checkpoint. Exactly once, the
// records go into Kafka transactions that checkpoints commit (txnPool);
// while the sink cannot write (txnPool.send, errSinkUnavailable) it holds
// them, and add goes on buffering. Only the map task loop calls it.
type sink struct {
	client   sarama.Client
	producer sarama.SyncProducer // at least once
	txn      *txnPool            // exactly once
	topic    string
	buf      []*sarama.ProducerMessage
	bufBytes int // keys and values in buf
	slab     outSlab
}

// openSink connects the sink of map task key. Exactly once, the caller
// must then recover the transactions of the restored checkpoint
// (txnPool.recover) before it adds anything; ctx is the task's, and the
// sink's retries stop when it ends.
func openSink(ctx context.Context, env *taskEnv, key taskKey, spec *transport.SinkSpec, log *slog.Logger) (*sink, error) {
	conf := kafkaConfig(env.cfg, "coordflow-"+env.workerID)
	connect := connectKafka
	if spec.GetDelivery() != fsm.DeliveryAtLeastOnce {
		conf.Version = txnKafkaVersion
		// The topic is checked at the first write: a missing one is
		// waited for, its outputs held and checkpoints declined.
		connect = dialKafka
	}
	client, err := connect(conf, spec.GetBrokers(), spec.GetTopic(), "sink")
	if err != nil {
		return nil, err
	}
	s := &sink{client: client, topic: spec.GetTopic()}
	switch spec.GetDelivery() {
	case fsm.DeliveryAtLeastOnce:
		if s.producer, err = sarama.NewSyncProducerFromClient(client); err != nil {
			client.Close()
			return nil, fmt.Errorf("sink topic %q: create producer: %w", spec.GetTopic(), err)
		}
	case fsm.DeliveryExactlyOnce, "":
		if spec.GetTransactionalIdPrefix() == "" || spec.GetTransactionTimeoutMs() <= 0 || spec.GetCheckpointTimeoutMs() <= 0 {
			client.Close()
			return nil, fmt.Errorf("deploy of map task %s: exactly-once sink without transactional_id_prefix, transaction_timeout_ms or checkpoint_timeout_ms", key.id)
		}
		s.txn = newTxnPool(ctx, env, key.job, key.id, spec, client, log)
	default:
		client.Close()
		return nil, fmt.Errorf("deploy of map task %s: sink delivery %q: want %q or %q", key.id, spec.GetDelivery(), fsm.DeliveryExactlyOnce, fsm.DeliveryAtLeastOnce)
	}
	return s, nil
}

// add buffers out, sending the buffer when it is full. Outputs a sink
// that cannot write holds are no error here.
func (s *sink) add(out *operator.Output) error {
	s.buf = append(s.buf, s.slab.message(s.topic, out))
	s.bufBytes += len(out.Key) + len(out.Value)
	if len(s.buf) >= sinkBatch || s.bufBytes >= sinkBatchBytes {
		if err := s.flush(); err != nil && !errors.Is(err, errSinkUnavailable) {
			return err
		}
	}
	return nil
}

// outSlab is where a sink's messages come from: the outputs' bytes may point
// into the item's batch, which is reused once applied, so each message gets
// a copy; and sarama wants a message and an encoder per key and value. A
// slab holds them for many outputs at once, one allocation instead of four
// per output; sarama keeps a message (and so its slab) until it is sent.
type outSlab struct {
	msgs []sarama.ProducerMessage
	encs []outBytes
	data []byte
}

const (
	slabMessages = 1024
	slabBytes    = 256 << 10
)

// outBytes is a key or value as sarama encodes it. A pointer to one in a
// slab makes the interface value free of allocation.
type outBytes struct{ b []byte }

func (o *outBytes) Encode() ([]byte, error) { return o.b, nil }
func (o *outBytes) Length() int             { return len(o.b) }

// message returns a message of topic holding a copy of out.
func (sl *outSlab) message(topic string, out *operator.Output) *sarama.ProducerMessage {
	n := len(out.Key) + len(out.Value)
	if len(sl.msgs) == cap(sl.msgs) || cap(sl.data)-len(sl.data) < n {
		sl.msgs = make([]sarama.ProducerMessage, 0, slabMessages)
		sl.encs = make([]outBytes, 0, 2*slabMessages)
		sl.data = make([]byte, 0, max(slabBytes, n))
	}
	sl.msgs = append(sl.msgs, sarama.ProducerMessage{Topic: topic})
	msg := &sl.msgs[len(sl.msgs)-1]
	sl.encs = append(sl.encs, outBytes{b: sl.copy(out.Value)})
	msg.Value = &sl.encs[len(sl.encs)-1]
	if out.Key != nil {
		sl.encs = append(sl.encs, outBytes{b: sl.copy(out.Key)})
		msg.Key = &sl.encs[len(sl.encs)-1]
	}
	return msg
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
// errSinkUnavailable the outputs stay buffered, to be sent again.
func (s *sink) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	if s.txn != nil {
		if err := s.txn.send(s.buf); err != nil {
			return err
		}
		s.buf, s.bufBytes = nil, 0
		return nil
	}
	msgs := s.buf
	s.buf, s.bufBytes = nil, 0
	if err := s.producer.SendMessages(msgs); err != nil {
		var perrs sarama.ProducerErrors
		if errors.As(err, &perrs) && len(perrs) > 0 {
			return fmt.Errorf("sink topic %q: %d of %d records not written, first: %w", s.topic, len(perrs), len(msgs), perrs[0].Err)
		}
		return fmt.Errorf("sink topic %q: %w", s.topic, err)
	}
	return nil
}

// close drops unflushed outputs (they belong to no completed checkpoint and
// are produced again after a restore) and releases the producers and client.
func (s *sink) close() {
	if s.txn != nil {
		s.txn.close()
	} else {
		_ = s.producer.Close()
	}
	_ = s.client.Close()
}
