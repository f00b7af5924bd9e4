package worker

import (
	"errors"
	"fmt"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// sinkBatch is how many outputs a sink buffers before it sends them.
const sinkBatch = 500

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
func connectKafka(cfg *Config, clientID string, brokers []string, topic, role string) (sarama.Client, error) {
	if len(brokers) == 0 {
		return nil, fmt.Errorf("%s topic %q: no brokers given", role, topic)
	}
	client, err := sarama.NewClient(brokers, kafkaConfig(cfg, clientID))
	if err != nil {
		return nil, fmt.Errorf("%s: connect to brokers %v: %w", role, brokers, err)
	}
	if _, err := topicPartitions(client, topic, role, brokers); err != nil {
		client.Close()
		return nil, err
	}
	return client, nil
}

// sink writes a map task's outputs to the job's sink topic. Outputs are
// buffered and sent synchronously in batches; flush returns only once the
// broker has acknowledged everything added before it, which is what makes the
// sink at least once: a map task flushes before it acks a checkpoint. Only
// the map task loop calls it.
type sink struct {
	client   sarama.Client
	producer sarama.SyncProducer
	topic    string
	buf      []*sarama.ProducerMessage
}

func openSink(cfg *Config, workerID string, spec *transport.SinkSpec) (*sink, error) {
	client, err := connectKafka(cfg, "coordflow-"+workerID, spec.GetBrokers(), spec.GetTopic(), "sink")
	if err != nil {
		return nil, err
	}
	producer, err := sarama.NewSyncProducerFromClient(client)
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("sink topic %q: create producer: %w", spec.GetTopic(), err)
	}
	return &sink{client: client, producer: producer, topic: spec.GetTopic()}, nil
}

// add buffers out, sending the buffer when it is full.
func (s *sink) add(out *operator.Output) error {
	msg := &sarama.ProducerMessage{Topic: s.topic, Value: sarama.ByteEncoder(out.Value)}
	if out.Key != nil {
		msg.Key = sarama.ByteEncoder(out.Key)
	}
	s.buf = append(s.buf, msg)
	if len(s.buf) >= sinkBatch {
		return s.flush()
	}
	return nil
}

// flush sends the buffered outputs and waits for the broker's acks.
func (s *sink) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	msgs := s.buf
	s.buf = nil
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
// are produced again after a restore) and releases the producer and client.
func (s *sink) close() {
	_ = s.producer.Close()
	_ = s.client.Close()
}
