package worker

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/IBM/sarama"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport"
)

// txnSlots is how many transactional ids each map task of an exactly-once
// sink cycles through. A steady job uses three at a time: the open
// transaction, the one pre-committed at the last barrier, and the one
// committed before it, whose id is not reused until a checkpoint taken
// after its commit completes. The rest absorb aborted checkpoints and late
// completion notices.
const txnSlots = 5

// txnProtocolVersion is the transaction protocol sarama's producer speaks:
// EndTxn up to v3, under which a producer keeps its epoch across
// transactions and the broker bumps it only at InitProducerId or when it
// aborts a transaction at its timeout.
const txnProtocolVersion = 1

// txnKafkaVersion is the Kafka version an exactly-once sink assumes: 3.0
// brought DescribeTransactions (KIP-664), from which a task learns the
// producer id and epoch of its transactions (sarama does not expose them).
var txnKafkaVersion = sarama.V3_0_0_0

// errFenced says Kafka fenced a producer of the task: a newer attempt owns
// its transactional id, so this task is a zombie.
var errFenced = errors.New("fenced by a newer attempt of the task")

// errNoFreeTxn is returned by preCommit when every transactional id of the
// task is still needed: the checkpoint is declined and the open transaction
// goes on.
var errNoFreeTxn = errors.New("every transactional id of the task is in use by a transaction that awaits a completed checkpoint")

// slotState is where one transactional id of a txnPool is in its cycle.
type slotState int

const (
	slotFree      slotState = iota // no transaction; a fresh epoch
	slotOpen                       // the transaction outputs go into now
	slotPending                    // pre-committed at barrier ckpt, awaiting its completion
	slotCommitted                  // committed; reusable once freeAfter completes
)

// txnSlot is one transactional id of a map task and the producer that holds it.
type txnSlot struct {
	id       string
	client   sarama.Client
	producer sarama.SyncProducer
	pid      int64
	epoch    int16
	state    slotState
	wrote    bool      // the open transaction has records
	began    time.Time // when its first record was sent
	ckpt     uint64    // pending: the checkpoint whose barrier pre-committed it
	// freeAfter (committed) is the first checkpoint whose snapshot does not
	// list this transaction: once it completes no restore can ask for the
	// transaction again and the id can be reused. 0 until that barrier.
	freeAfter uint64
	// stale: the producer's epoch ended a transaction a checkpoint may name;
	// it is initialised again (a new epoch) before the id is reused, so a
	// late commit of the old transaction can never commit a new one.
	stale bool
}

// txnPool is the exactly-once part of a sink. Outputs go into the open
// transaction; at a barrier the task flushes it (pre-commit), lists it in
// its snapshot, and opens the next one on another transactional id; when
// the checkpoint completes it commits it. Kafka's producer fencing on the
// transactional ids, which every attempt of the task shares, stops a zombie
// of an older attempt. docs/protocol.md, "Exactly-once sink", has the rules.
type txnPool struct {
	log         *slog.Logger
	cfg         *Config
	brokers     []string
	topic       string
	prefix      string // the spec's transactional id prefix
	task        string // the map task id
	timeout     time.Duration
	ckptTimeout time.Duration
	// admin is a plain client for the requests the producers cannot make:
	// committing a restored transaction, fencing ids nobody produces with.
	admin  sarama.Client
	slots  []*txnSlot
	cur    *txnSlot
	counts *prometheus.CounterVec // outcome
	fenced prometheus.Counter
	now    func() time.Time
}

// txnID is the transactional id of slot i of task: the same in every attempt,
// so that a new attempt fences the producers of the old one.
func txnID(prefix, task string, i int) string { return fmt.Sprintf("%s-%s-%d", prefix, task, i) }

func newTxnPool(env *taskEnv, job, task string, spec *transport.SinkSpec, admin sarama.Client, log *slog.Logger) *txnPool {
	p := &txnPool{
		log:         log,
		cfg:         env.cfg,
		brokers:     spec.GetBrokers(),
		topic:       spec.GetTopic(),
		prefix:      spec.GetTransactionalIdPrefix(),
		task:        task,
		timeout:     time.Duration(spec.GetTransactionTimeoutMs()) * time.Millisecond,
		ckptTimeout: time.Duration(spec.GetCheckpointTimeoutMs()) * time.Millisecond,
		admin:       admin,
		counts:      env.metrics.sinkTxns.MustCurryWith(prometheus.Labels{"job": job}),
		fenced:      env.metrics.sinkFenced.WithLabelValues(job),
		now:         time.Now,
	}
	for i := range txnSlots {
		p.slots = append(p.slots, &txnSlot{id: txnID(p.prefix, task, i)})
	}
	return p
}

// recover finishes what the restored checkpoint promised and fences what
// it did not: it commits every transaction the checkpoint lists (whoever
// wrote it), then initialises every other transactional id of the tasks
// whose state this task restored, which aborts their open transactions and
// fences their producers. The ids of the committed transactions are left
// alone until a checkpoint of this attempt completes, so that a restore
// from the same checkpoint commits them again harmlessly.
func (p *txnPool) recover(restored []*transport.SinkTxn, tasks []string) error {
	held := make(map[string]bool)
	for _, t := range restored {
		if err := p.commitRestored(t); err != nil {
			return err
		}
		held[t.GetTransactionalId()] = true
	}
	for _, task := range tasks {
		for i := range txnSlots {
			id := txnID(p.prefix, task, i)
			if held[id] {
				continue
			}
			if err := p.fence(id); err != nil {
				return err
			}
		}
	}
	for _, s := range p.slots {
		if held[s.id] {
			s.state, s.stale = slotCommitted, true
		}
	}
	return p.openNext()
}

// commitRestored commits a transaction a restored checkpoint lists, with
// its producer id and epoch and without its producer (EndTxn, as the
// producer would send it). Committing a transaction that was committed
// already succeeds. If the id has moved on to another epoch, the
// transaction ended some other way: committed by an attempt that then
// reused the id, or aborted by the broker at its timeout.
func (p *txnPool) commitRestored(t *transport.SinkTxn) error {
	id := t.GetTransactionalId()
	log := p.log.With("transactional_id", id, "checkpoint", t.GetCheckpointId(),
		"producer_id", t.GetProducerId(), "producer_epoch", t.GetProducerEpoch())
	kerr, err := p.retry(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.EndTxn(&sarama.EndTxnRequest{
			Version: endTxnVersion(p.admin), TransactionalID: id,
			ProducerID: t.GetProducerId(), ProducerEpoch: int16(t.GetProducerEpoch()), TransactionResult: true,
		})
		if err != nil {
			return 0, err
		}
		return resp.Err, nil
	})
	if err != nil {
		return fmt.Errorf("commit transaction %s of checkpoint %d: %w", id, t.GetCheckpointId(), err)
	}
	switch kerr {
	case sarama.ErrNoError:
		p.counts.WithLabelValues("recovered").Inc()
		log.Info("committed a transaction of the restored checkpoint")
		return nil
	case sarama.ErrProducerFenced, sarama.ErrInvalidProducerEpoch, sarama.ErrInvalidProducerIDMapping, sarama.ErrInvalidTxnState:
		p.counts.WithLabelValues("ended_before").Inc()
		// The id has moved on. The broker may still say how its last
		// transaction ended (Kafka does; kfake reports only Empty).
		st, derr := p.describe(id)
		switch {
		case derr == nil && st.TransactionState == sarama.TransactionStateCompleteCommit && st.ProducerID == t.GetProducerId():
			log.Info("a transaction of the restored checkpoint was committed before", "state", st.TransactionState, "epoch_now", st.ProducerEpoch)
		case derr == nil && st.TransactionState == sarama.TransactionStateCompleteAbort && st.ProducerID == t.GetProducerId() &&
			st.ProducerEpoch == int16(t.GetProducerEpoch())+1:
			log.Error("a transaction of the restored checkpoint was aborted by the broker, most likely at its timeout: the checkpoint's output in it is lost",
				"transaction_timeout", p.timeout)
		default:
			log.Error("a transaction of the restored checkpoint has already ended with another epoch: committed by an earlier attempt that reused its id, "+
				"or aborted by the broker after the transaction timeout, in which case the checkpoint's output in it is lost",
				"err", kerr, "state_now", st.TransactionState, "epoch_now", st.ProducerEpoch, "transaction_timeout", p.timeout)
		}
		return nil
	default:
		return fmt.Errorf("commit transaction %s of checkpoint %d: %w", id, t.GetCheckpointId(), kerr)
	}
}

// fence initialises transactional id id with no producer behind it: the
// broker aborts its open transaction, if any, and bumps its epoch, fencing
// whoever held it.
func (p *txnPool) fence(id string) error {
	kerr, err := p.retry(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.InitProducerID(&sarama.InitProducerIDRequest{
			Version: initProducerIDVersion(p.admin), TransactionalID: &id, TransactionTimeout: p.timeout,
			ProducerID: -1, ProducerEpoch: -1,
		})
		if err != nil {
			return 0, err
		}
		return resp.Err, nil
	})
	if err == nil && kerr != sarama.ErrNoError {
		err = kerr
	}
	if err != nil {
		return fmt.Errorf("fence transactional id %s: %w", id, err)
	}
	p.counts.WithLabelValues("aborted_stale").Inc()
	return nil
}

// retry sends a request to id's transaction coordinator until it answers
// with anything but a retriable error, for up to KafkaTimeout.
func (p *txnPool) retry(id string, do func(*sarama.Broker) (sarama.KError, error)) (sarama.KError, error) {
	deadline := p.now().Add(2 * p.cfg.KafkaTimeout)
	backoff := 50 * time.Millisecond
	for {
		b, err := p.admin.TransactionCoordinator(id)
		var kerr sarama.KError
		if err == nil {
			kerr, err = do(b)
		}
		retriable := err != nil || kerr == sarama.ErrNotCoordinatorForConsumer || kerr == sarama.ErrConsumerCoordinatorNotAvailable ||
			kerr == sarama.ErrOffsetsLoadInProgress || kerr == sarama.ErrConcurrentTransactions
		if !retriable {
			return kerr, nil
		}
		if err == nil {
			err = kerr
		}
		if p.now().Add(backoff).After(deadline) {
			return 0, err
		}
		if kerr == sarama.ErrNotCoordinatorForConsumer || kerr == sarama.ErrConsumerCoordinatorNotAvailable || b == nil {
			_ = p.admin.RefreshTransactionCoordinator(id)
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
	}
}

// endTxnVersion and initProducerIDVersion are the request versions the
// client's Kafka version allows, as sarama's own transaction manager
// picks them.
func endTxnVersion(c sarama.Client) int16 {
	switch v := c.Config().Version; {
	case v.IsAtLeast(sarama.V2_8_0_0):
		return 3
	case v.IsAtLeast(sarama.V2_7_0_0):
		return 2
	case v.IsAtLeast(sarama.V2_0_0_0):
		return 1
	}
	return 0
}

func initProducerIDVersion(c sarama.Client) int16 {
	switch v := c.Config().Version; {
	case v.IsAtLeast(sarama.V2_7_0_0):
		return 4
	case v.IsAtLeast(sarama.V2_5_0_0):
		return 3
	case v.IsAtLeast(sarama.V2_4_0_0):
		return 2
	case v.IsAtLeast(sarama.V2_0_0_0):
		return 1
	}
	return 0
}

// next returns the slot the next transaction should use: a free one, else
// the committed one committed first (reusing it is safe, since it gets a new
// epoch first, but a restore from a checkpoint that listed its last
// transaction can then no longer tell that it was committed), or nil when
// every other slot holds a transaction that awaits a completed checkpoint.
func (p *txnPool) next() *txnSlot {
	var oldest *txnSlot
	for _, s := range p.slots {
		switch {
		case s.state == slotFree:
			return s
		case s.state == slotCommitted && (oldest == nil || s.ckpt < oldest.ckpt):
			oldest = s
		}
	}
	return oldest
}

// openNext makes the next slot the open transaction. It fails with
// errNoFreeTxn when there is none.
func (p *txnPool) openNext() error {
	s := p.next()
	if s == nil {
		return errNoFreeTxn
	}
	if s.producer == nil || s.stale {
		if err := p.initSlot(s); err != nil {
			return err
		}
	}
	if err := s.producer.BeginTxn(); err != nil {
		return p.producerErr(s, "begin transaction", err)
	}
	s.state, s.wrote, s.began = slotOpen, false, time.Time{}
	p.cur = s
	return nil
}

// initSlot gives slot s a producer with a new epoch, and learns the
// producer id and epoch (sarama does not expose them) from the broker.
func (p *txnPool) initSlot(s *txnSlot) error {
	if s.producer != nil {
		_ = s.producer.Close()
		s.producer = nil
	}
	if s.client == nil {
		conf := kafkaConfig(p.cfg, "coordflow-"+s.id)
		conf.Version = txnKafkaVersion
		conf.Producer.Idempotent = true
		conf.Net.MaxOpenRequests = 1
		conf.Producer.Transaction.ID = s.id
		conf.Producer.Transaction.Timeout = p.timeout
		conf.Producer.Transaction.Retry.Max = 10
		conf.Producer.Transaction.Retry.Backoff = 100 * time.Millisecond
		c, err := sarama.NewClient(p.brokers, conf)
		if err != nil {
			return fmt.Errorf("sink topic %q: connect transactional producer %s: %w", p.topic, s.id, err)
		}
		s.client = c
	}
	producer, err := sarama.NewSyncProducerFromClient(s.client)
	if err != nil {
		return p.producerErr(s, "initialise transactional producer", err)
	}
	s.producer, s.stale = producer, false
	resp, err := p.describe(s.id)
	if err != nil {
		return err
	}
	s.pid, s.epoch = resp.ProducerID, resp.ProducerEpoch
	return nil
}

// describe asks id's transaction coordinator for its state.
func (p *txnPool) describe(id string) (sarama.TransactionState, error) {
	var st sarama.TransactionState
	kerr, err := p.retry(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.DescribeTransactions(&sarama.DescribeTransactionsRequest{TransactionalIDs: []string{id}})
		if err != nil {
			return 0, err
		}
		if len(resp.TransactionStates) != 1 {
			return 0, fmt.Errorf("%d states for one transactional id", len(resp.TransactionStates))
		}
		st = resp.TransactionStates[0]
		return st.ErrorCode, nil
	})
	if err == nil && kerr != sarama.ErrNoError {
		err = kerr
	}
	if err != nil {
		return st, fmt.Errorf("describe transactional id %s: %w", id, err)
	}
	return st, nil
}

// send writes msgs in the open transaction and waits for the broker's acks.
func (p *txnPool) send(msgs []*sarama.ProducerMessage) error {
	s := p.cur
	if !s.wrote {
		s.wrote, s.began = true, p.now()
	}
	if err := s.producer.SendMessages(msgs); err != nil {
		return p.producerErr(s, fmt.Sprintf("write %d records", len(msgs)), err)
	}
	return nil
}

// checkAge fails when the oldest transaction the next snapshot would list
// is too old to be committed before the broker aborts it: the checkpoint
// may take a checkpoint timeout to complete, and the commit another.
func (p *txnPool) checkAge() error {
	limit := p.timeout - 2*p.ckptTimeout
	for _, s := range p.slots {
		if (s.state == slotPending || s.state == slotOpen && s.wrote) && p.now().Sub(s.began) > limit {
			return fmt.Errorf("sink transaction %s has been open for %v, too long to be committed safely within the transaction timeout %v: "+
				"restarting from the last completed checkpoint (checkpoints have not completed for a while)",
				s.id, p.now().Sub(s.began).Round(time.Millisecond), p.timeout)
		}
	}
	return nil
}

// preCommit ends the open transaction's share of checkpoint id (its records
// are flushed already) and opens the next one. It returns the transactions
// the snapshot must list: every pre-committed one not yet committed. With
// errNoFreeTxn the caller declines the checkpoint and the open transaction
// goes on; any other error fails the task.
func (p *txnPool) preCommit(id uint64) ([]*transport.SinkTxn, error) {
	if err := p.checkAge(); err != nil {
		return nil, err
	}
	if p.cur.wrote {
		if p.next() == nil {
			return nil, errNoFreeTxn
		}
		p.cur.state, p.cur.ckpt = slotPending, id
		if err := p.openNext(); err != nil {
			return nil, err
		}
	}
	for _, s := range p.slots {
		if s.state == slotCommitted && s.freeAfter == 0 {
			s.freeAfter = id
		}
	}
	return p.pending(), nil
}

// pending lists the pre-committed transactions, oldest first.
func (p *txnPool) pending() []*transport.SinkTxn {
	var out []*transport.SinkTxn
	for _, s := range p.slots {
		if s.state == slotPending {
			out = append(out, &transport.SinkTxn{
				TransactionalId: s.id, ProducerId: s.pid, ProducerEpoch: int32(s.epoch),
				CheckpointId: s.ckpt, ProtocolVersion: txnProtocolVersion,
			})
		}
	}
	slices.SortFunc(out, func(a, b *transport.SinkTxn) int { return cmp.Compare(a.GetCheckpointId(), b.GetCheckpointId()) })
	return out
}

// completed commits every transaction pre-committed at or before
// checkpoint id, which completed, and frees the ids no restore can ask for
// any more.
func (p *txnPool) completed(id uint64) error {
	for _, s := range p.slots {
		if s.state != slotPending || s.ckpt > id {
			continue
		}
		if p.cfg.Failpoint != nil {
			p.cfg.Failpoint("worker-before-sink-commit")
		}
		if err := s.producer.CommitTxn(); err != nil {
			return p.producerErr(s, fmt.Sprintf("commit the transaction of checkpoint %d", s.ckpt), err)
		}
		p.counts.WithLabelValues("committed").Inc()
		p.log.Debug("committed sink transaction", "checkpoint", s.ckpt, "transactional_id", s.id)
		s.state, s.freeAfter, s.stale = slotCommitted, 0, true
	}
	for _, s := range p.slots {
		if s.state == slotCommitted && s.freeAfter != 0 && s.freeAfter <= id {
			s.state = slotFree
			// A new epoch now, off the barrier's path: the next barrier
			// opens a transaction on it at once.
			if err := p.initSlot(s); err != nil {
				return err
			}
		}
	}
	return nil
}

// producerErr wraps err from slot s's producer, and counts and logs it when
// Kafka fenced the producer: a newer attempt owns the id and this task is a
// zombie that must stop.
func (p *txnPool) producerErr(s *txnSlot, what string, err error) error {
	if p.fencedOut(s, err) {
		p.fenced.Inc()
		p.log.Warn("sink producer fenced: a newer attempt of the task took its transactional id; stopping", "transactional_id", s.id, "err", err)
		return fmt.Errorf("sink transactional id %s: %w (%w)", s.id, errFenced, err)
	}
	return fmt.Errorf("sink topic %q, transactional id %s: %s: %w", p.topic, s.id, what, err)
}

// fencedOut reports whether slot s's producer failed with err because
// another producer took the id: Kafka says so, or (brokers answer a write
// with a stale epoch in more than one way) the id now has another epoch.
func (p *txnPool) fencedOut(s *txnSlot, err error) bool {
	if isFenced(err) {
		return true
	}
	if s.producer == nil {
		return false
	}
	st, derr := p.describe(s.id)
	return derr == nil && (st.ProducerID != s.pid || st.ProducerEpoch != s.epoch)
}

// isFenced reports whether err says a newer producer took the id.
func isFenced(err error) bool {
	if errors.Is(err, sarama.ErrProducerFenced) || errors.Is(err, sarama.ErrInvalidProducerEpoch) {
		return true
	}
	var perrs sarama.ProducerErrors
	if errors.As(err, &perrs) {
		for _, e := range perrs {
			if isFenced(e.Err) {
				return true
			}
		}
	}
	return false
}

// close releases the producers. Their open transactions are left to the
// next attempt, which aborts them, or to the broker's timeout.
func (p *txnPool) close() {
	for _, s := range p.slots {
		if s.producer != nil {
			_ = s.producer.Close()
		}
		if s.client != nil {
			_ = s.client.Close()
		}
	}
}
