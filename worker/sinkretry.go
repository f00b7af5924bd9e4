package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/IBM/sarama"
	kerrors "github.com/twmb/franz-go/pkg/kerr"
)

// How a sink, of either delivery, retries its Kafka requests and which
// errors hold it (waiting may cure them) or fail its task.

// retryFunc sends a request (do) again while it fails with an error that
// waiting may cure, within a window of its own: txnPool.retry, or an
// at-least-once sink's sink.retry.
type retryFunc func(do func(context.Context) (sarama.KError, error)) (sarama.KError, error)

// retryKafka calls do until it answers with anything but a transport error
// or a retriable Kafka error (an error requestRefused calls final ends it
// too), backing off between calls, for up to window; it returns the last
// error then, as a retriesExhausted. It stops at once when ctx ends. do
// gets a context that ends with the retries.
func retryKafka(ctx context.Context, window time.Duration, do func(context.Context) (sarama.KError, error)) (sarama.KError, error) {
	rctx, cancel := context.WithTimeout(ctx, window)
	defer cancel()
	backoff := 50 * time.Millisecond
	for {
		kerr, err := do(rctx)
		if err == nil && !retriableTxnErr(kerr) {
			return kerr, nil
		}
		if err != nil && requestRefused(err) {
			return 0, err // sent again, it would fail again (an encoding error, a final Kafka error)
		}
		if err == nil {
			err = kerr
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("%w (the task is stopping; last error: %v)", ctx.Err(), err)
		}
		wait := time.NewTimer(backoff)
		select {
		case <-rctx.Done():
			wait.Stop()
			if ctx.Err() != nil {
				return 0, fmt.Errorf("%w (the task is stopping; last error: %v)", ctx.Err(), err)
			}
			return 0, &retriesExhausted{err: err}
		case <-wait.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// retriableTxnErr reports whether a transaction request that failed with
// kerr may succeed when sent again.
func retriableTxnErr(kerr sarama.KError) bool {
	switch kerr {
	case sarama.ErrNotCoordinatorForConsumer, sarama.ErrConsumerCoordinatorNotAvailable,
		sarama.ErrOffsetsLoadInProgress, sarama.ErrConcurrentTransactions, sarama.ErrRequestTimedOut:
		return true
	}
	return false
}

// retriesExhausted is how retryKafka gives up: err, the last error of a request
// that failed only in ways that waiting may cure (a transport error, a
// Kafka error retriableTxnErr accepts) until its retries ran out. Its text
// is err's.
type retriesExhausted struct{ err error }

func (e *retriesExhausted) Error() string { return e.err.Error() }
func (e *retriesExhausted) Unwrap() error { return e.err }

// sinkUnreachable reports whether err says that the sink's brokers could
// not be reached or could not serve the request yet, which waiting may cure,
// by the rules of retryKafka: a request it gave up on, a client that found
// no broker, a broken connection, a Kafka error retriableTxnErr or Kafka
// itself calls retriable. Anything else
// is an answer that waiting would not change: fencing, authorisation, a
// protocol version this worker does not know, a transaction the broker
// will not commit, a record too large; and a task that is stopping.
func sinkUnreachable(err error) bool {
	var exhausted *retriesExhausted
	var kerr sarama.KError
	var nerr net.Error
	switch {
	case err == nil, errors.Is(err, errFenced), errors.Is(err, context.Canceled):
		return false
	case errors.As(err, &exhausted):
		return true
	case errors.Is(err, sarama.ErrOutOfBrokers), errors.Is(err, sarama.ErrNotConnected),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.As(err, &nerr):
		return true
	case errors.As(err, &kerr):
		return retriableKafkaErr(kerr)
	}
	return false
}

// epochCures reports whether err, a broker's answer to an exactly-once
// write, is about the transactional producer's own state, not the records
// or the right to write them: the broker lost or mixed up the epoch's
// sequences, does not know the producer id, or holds the transaction in a
// state it cannot write in. A new epoch of the id, which aborts the
// transaction, starts that state afresh, and the same records may then be
// written. Any other answer (too large, against the topic's policy, not
// authorised, an invalid topic, a version the broker does not support)
// would meet the same records again, under every new epoch, and must fail
// the task rather than hold the sink and decline checkpoints for ever.
func epochCures(err error) bool {
	var kerr sarama.KError
	if !errors.As(err, &kerr) {
		return false
	}
	switch kerr {
	case sarama.ErrOutOfOrderSequenceNumber, sarama.ErrUnknownProducerID,
		sarama.ErrInvalidTxnState, sarama.ErrInvalidProducerIDMapping:
		return true
	}
	return false
}

// requestRefused reports whether a request failed with err for good, so
// that sending it again would fail again: a broker answered with a Kafka
// error that is not retriable, or sarama could not encode it.
func requestRefused(err error) bool {
	var kerr sarama.KError
	var enc sarama.PacketEncodingError
	var conf sarama.ConfigurationError
	switch {
	case errors.As(err, &kerr):
		return !retriableKafkaErr(kerr)
	case errors.As(err, &enc), errors.As(err, &conf):
		return true
	}
	return false
}

// retriableKafkaErr reports whether a request that failed with kerr may
// succeed when sent again: retriableTxnErr's, and those Kafka documents as
// retriable (a partition without leader, a topic the broker does not know
// yet, a timeout, too few replicas in sync...).
func retriableKafkaErr(kerr sarama.KError) bool {
	return retriableTxnErr(kerr) || kerrors.IsRetriable(kafkaErr(kerr))
}
