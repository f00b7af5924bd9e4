package coordinator

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// deploySink is the sink of a deploy: the spec's, with the defaults a spec
// registered before they existed lacks.
func deploySink(jobID string, spec *fsm.JobSpec) *transport.SinkSpec {
	s := spec.Sink
	d := &transport.SinkSpec{
		Brokers: slices.Clone(s.Brokers), Topic: s.Topic, Delivery: s.Delivery,
		TransactionalIdPrefix: s.TransactionalIDPrefix,
		CheckpointTimeoutMs:   time.Duration(spec.Checkpoint.Timeout).Milliseconds(),
	}
	if d.Delivery == "" {
		d.Delivery = fsm.DeliveryExactlyOnce
	}
	if d.Delivery != fsm.DeliveryExactlyOnce {
		return d
	}
	timeout := s.TransactionTimeout
	if timeout == 0 {
		timeout = fsm.DefaultTransactionTimeout(spec.Checkpoint)
	}
	d.TransactionTimeoutMs = time.Duration(timeout).Milliseconds()
	if d.TransactionalIdPrefix == "" {
		d.TransactionalIdPrefix = sinkTxnPrefix(jobID)
	}
	return d
}

// sinkTxnPrefix is the default transactional id prefix of a job's sink.
func sinkTxnPrefix(jobID string) string { return "coordflow-" + jobID }

// protoSinkTxns and fsmSinkTxns convert a map task's pre-committed
// transactions between the wire and the FSM.
func protoSinkTxns(txns []fsm.SinkTxn) []*transport.SinkTxn {
	var out []*transport.SinkTxn
	for _, t := range txns {
		out = append(out, &transport.SinkTxn{
			TransactionalId: t.TransactionalID, ProducerId: t.ProducerID, ProducerEpoch: int32(t.ProducerEpoch),
			CheckpointId: t.CheckpointID, ProtocolVersion: int32(t.ProtocolVersion),
		})
	}
	return out
}

func fsmSinkTxns(txns []*transport.SinkTxn) []fsm.SinkTxn {
	var out []fsm.SinkTxn
	for _, t := range txns {
		out = append(out, fsm.SinkTxn{
			TransactionalID: t.GetTransactionalId(), ProducerID: t.GetProducerId(), ProducerEpoch: int16(t.GetProducerEpoch()),
			CheckpointID: t.GetCheckpointId(), ProtocolVersion: int(t.GetProtocolVersion()),
		})
	}
	return out
}

// Kafka API keys an exactly-once sink needs: the transactions of Kafka 0.11,
// and DescribeTransactions (Kafka 3.0), from which a map task learns its
// producer id and epoch.
var txnAPIs = map[int16]string{22: "InitProducerId", 24: "AddPartitionsToTxn", 26: "EndTxn", 65: "DescribeTransactions"}

// kafkaSinkCheck asks an exactly-once sink's brokers which requests they
// support, so that a broker without transactions fails the job at deploy
// time with a reason rather than each map task at its first write.
func kafkaSinkCheck(ctx context.Context, brokers []string) error {
	addrs := strings.Join(brokers, ",")
	cfg := sarama.NewConfig()
	cfg.ClientID = "coordd"
	cfg.Version = sarama.V2_8_0_0
	cfg.Net.DialTimeout = 2 * time.Second
	cfg.Net.ReadTimeout = 3 * time.Second
	cfg.Net.WriteTimeout = 3 * time.Second
	cfg.Metadata.Full = false
	cfg.Metadata.Retry.Max = 1
	cfg.Metadata.Timeout = lookupTimeout
	if dl, ok := ctx.Deadline(); ok {
		cfg.Metadata.Timeout = max(time.Until(dl), time.Millisecond)
	}
	client, err := sarama.NewClient(brokers, cfg)
	if err != nil {
		return fmt.Errorf("sink brokers %s unreachable: %w", addrs, err)
	}
	defer client.Close()
	for _, b := range client.Brokers() {
		if err := b.Open(client.Config()); err != nil && err != sarama.ErrAlreadyConnected {
			continue
		}
		resp, err := b.ApiVersions(&sarama.ApiVersionsRequest{})
		if err != nil {
			continue
		}
		have := make(map[int16]bool)
		for _, k := range resp.ApiKeys {
			have[k.ApiKey] = true
		}
		var missing []string
		for _, key := range slices.Sorted(maps.Keys(txnAPIs)) {
			if !have[key] {
				missing = append(missing, txnAPIs[key])
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("sink brokers %s do not support Kafka transactions (no %s): an exactly_once sink needs them; use \"delivery\": \"at_least_once\" or a broker that has them",
				addrs, strings.Join(missing, ", "))
		}
		return nil
	}
	return fmt.Errorf("sink brokers %s: no broker answered ApiVersions", addrs)
}
