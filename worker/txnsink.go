package worker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/IBM/sarama"
	"github.com/prometheus/client_golang/prometheus"
	kerrors "github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/coordflow/coordflow/transport"
)

// txnSlots is how many transactional ids each map task of an exactly-once
// sink cycles through. A steady job uses three at a time: the open
// transaction, the one pre-committed at the last barrier, and the one
// committed before it, whose id is not reused until a checkpoint taken
// after its commit completes. The rest absorb aborted checkpoints and late
// completion notices.
const txnSlots = 5

// Transaction protocol versions, as a snapshot records them
// (SinkTxn.protocol_version). A restore must end a transaction with the
// rules of the version that wrote it: the same EndTxn means different
// things under each (docs/protocol.md, "Exactly-once sink").
const (
	// txnProtocolV1 is what sarama's request types speak (EndTxn up to v3,
	// Produce up to v10): a producer keeps its epoch across transactions;
	// the broker bumps it only at InitProducerId or when it aborts a
	// transaction at its timeout. A second commit with the same epoch is a
	// retry. Every transaction this worker writes is version 1; 0 (not
	// recorded) means version 1 too.
	txnProtocolV1 = 1
	// txnProtocolV2 is KIP-890's (EndTxn v5, Produce v12, on brokers whose
	// transaction.version is 2): the broker bumps the epoch at every
	// EndTxn, and answers a commit that carries the epoch before the bump
	// as the retry it is: NONE if that transaction was committed,
	// INVALID_TXN_STATE if it was aborted. sarama cannot send EndTxn v5;
	// a restore ends such a transaction through franz-go (endTxnV2).
	txnProtocolV2 = 2
)

// txnProtocolVersion is the version of the transactions this worker writes.
const txnProtocolVersion = txnProtocolV1

// txnKafkaVersion is the Kafka version an exactly-once sink assumes: 3.0
// brought DescribeTransactions (KIP-664), from which a task learns whether
// another producer took one of its ids (fencedOut) and how a restored
// transaction ended (explainEnded).
var txnKafkaVersion = sarama.V3_0_0_0

// errFenced says Kafka fenced a producer of the task: a newer attempt owns
// its transactional id, so this task is a zombie.
var errFenced = errors.New("fenced by a newer attempt of the task")

// errSinkUnavailable is wrapped by the errors of a sink's flush (and of
// txnPool's send and preCommit) when the sink cannot write now: its brokers
// cannot be reached (at the task's start too), its topic is missing or was
// deleted, or a write failed before the open transaction had any record
// (sinkHold). The caller keeps the records, declines the checkpoint and
// goes on; the sink tries again after a backoff. Nothing is lost: no
// transaction holds any of the held records.
var errSinkUnavailable = errors.New("outputs are held and checkpoints declined until the sink can write them")

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

// txnSlot is one transactional id of a map task and the producer id and
// epoch the task holds it with.
type txnSlot struct {
	id string
	// inited: the slot has a producer id and epoch of this attempt's
	// (InitProducerID); seq is the next sequence number of each partition
	// under that epoch.
	inited bool
	pid    int64
	epoch  int16
	seq    map[int32]int32
	// added are the partitions the open transaction has written to
	// (AddPartitionsToTxn).
	added map[int32]bool
	state slotState
	wrote bool      // the open transaction has records: a write of it succeeded
	began time.Time // when its first successful write was sent
	ckpt  uint64    // pending: the checkpoint whose barrier pre-committed it
	// freeAfter (committed) is the first checkpoint whose snapshot does not
	// list this transaction: once it completes no restore can ask for the
	// transaction again and the id can be reused. 0 until that barrier.
	freeAfter uint64
	// stale: the producer's epoch ended a transaction a checkpoint may name;
	// it is initialised again (a new epoch) before the id is reused, so a
	// late commit of the old transaction can never commit a new one.
	stale bool
	// checkFence: a write of the open transaction failed without an answer
	// from Kafka; before its new epoch, ready asks the broker whether the
	// id still has this one.
	checkFence bool
}

// txnPool is the exactly-once part of a sink. Outputs go into the open
// transaction; at a barrier the task flushes it (pre-commit), lists it in
// its snapshot, and opens the next one on another transactional id; when
// the checkpoint completes it commits it. Kafka's producer fencing on the
// transactional ids, which every attempt of the task shares, stops a zombie
// of an older attempt. docs/protocol.md, "Exactly-once sink", has the rules.
type txnPool struct {
	// ctx is the map task's: every retry stops when it ends. Only the
	// task's goroutine calls the pool, and a call blocks it, for up to
	// twice cfg.KafkaTimeout per request retried (retry).
	ctx         context.Context
	log         *slog.Logger
	cfg         *Config
	brokers     []string
	topic       string
	prefix      string // the spec's transactional id prefix
	task        string // the map task id
	timeout     time.Duration
	ckptTimeout time.Duration
	// admin is the sink's client, through which every request goes.
	admin sarama.Client
	w     *sinkWriter
	// tv2 sends what sarama cannot: EndTxn v5 for a restored transaction
	// of protocol version 2. Opened at the first such transaction.
	tv2    *kgo.Client
	slots  []*txnSlot
	cur    *txnSlot
	counts *prometheus.CounterVec // outcome
	fenced prometheus.Counter
	now    func() time.Time
	// hold is the sink's: whether it may write, and when it tries again.
	hold *sinkHold
	// restore is the recovery recover asked for and start has not finished
	// yet (the brokers could not be reached); nil once done. Nothing is
	// written before it is done.
	restore *txnRecovery
}

// txnRecovery is what is left of a restore's recovery (txnPool.recover):
// the transactions of the restored checkpoint to commit, then the ids to
// fence. Each step done is dropped, so that a recovery the brokers broke
// off goes on where it stopped; doing one again would be harmless anyway
// (committing twice succeeds, fencing twice bumps the epoch once more).
type txnRecovery struct {
	commit []*transport.SinkTxn
	fence  []string
	// held are the ids of the listed transactions: left alone until a
	// checkpoint of this attempt completes.
	held map[string]bool
}

// txnID is the transactional id of slot i of task: the same in every attempt,
// so that a new attempt fences the producers of the old one.
func txnID(prefix, task string, i int) string { return fmt.Sprintf("%s-%s-%d", prefix, task, i) }

// newTxnPool returns the pool of map task task of job, which writes through
// admin's brokers and holds its outputs by hold (the sink's). It connects
// nothing: recover starts it.
func newTxnPool(ctx context.Context, env *taskEnv, job, task string, spec *transport.SinkSpec, admin sarama.Client, w *sinkWriter, hold *sinkHold, log *slog.Logger) *txnPool {
	p := &txnPool{
		ctx:         ctx,
		log:         log,
		cfg:         env.cfg,
		brokers:     spec.GetBrokers(),
		topic:       spec.GetTopic(),
		prefix:      spec.GetTransactionalIdPrefix(),
		task:        task,
		timeout:     time.Duration(spec.GetTransactionTimeoutMs()) * time.Millisecond,
		ckptTimeout: time.Duration(spec.GetCheckpointTimeoutMs()) * time.Millisecond,
		admin:       admin,
		w:           w,
		hold:        hold,
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
// from the same checkpoint commits them again harmlessly. Then it opens
// the first transaction.
//
// The caller calls it once, before anything is added to the sink. When the
// sink is held (its brokers cannot be reached, or its topic is missing),
// recover returns nil and the recovery waits: start does it before the
// first write, which waits for it, and every checkpoint is declined until
// then, so that a checkpoint that does not list the restored transactions
// never completes before they are committed. It fails for what waiting
// would not change (sinkUnreachable): the task then fails with the reason.
func (p *txnPool) recover(restored []*transport.SinkTxn, tasks []string) error {
	r := &txnRecovery{commit: slices.Clone(restored), held: make(map[string]bool)}
	for _, t := range restored {
		r.held[t.GetTransactionalId()] = true
	}
	for _, task := range tasks {
		for i := range txnSlots {
			if id := txnID(p.prefix, task, i); !r.held[id] {
				r.fence = append(r.fence, id)
			}
		}
	}
	p.restore = r
	if p.hold.down != nil {
		p.log.Warn("sink brokers or topic unavailable at the task's start: the restored checkpoint's transactions are recovered before the first write",
			"checkpoint_transactions", len(restored), "brokers", p.brokers, "err", p.hold.down)
		return nil
	}
	if err := p.ready(); err != nil && !errors.Is(err, errSinkUnavailable) {
		return err
	}
	return nil
}

// start does what must precede the pool's first write once its brokers
// answer: the recovery recover left (commit, then fence), then the first
// open transaction. A step that fails is tried again at the next start;
// one done is not done again.
func (p *txnPool) start() error {
	if r := p.restore; r != nil {
		for len(r.commit) > 0 {
			if err := p.commitRestored(r.commit[0]); err != nil {
				return err
			}
			r.commit = r.commit[1:]
		}
		for len(r.fence) > 0 {
			if err := p.fence(r.fence[0]); err != nil {
				return err
			}
			r.fence = r.fence[1:]
		}
		for _, s := range p.slots {
			if r.held[s.id] {
				s.state, s.stale = slotCommitted, true
			}
		}
		p.restore = nil
	}
	if p.cur == nil {
		return p.openNext()
	}
	return nil
}

// commitRestored commits a transaction a restored checkpoint lists, with
// its producer id and epoch and without its producer (EndTxn, as the
// producer would send it), by the rules of the protocol version that wrote
// it. Committing a transaction that was committed already succeeds: under
// version 1 the epoch is unchanged, under version 2 the broker recognises
// the retry of a commit that bumped it. Otherwise the id has moved on and
// the transaction ended some other way: committed by an attempt that then
// reused the id, or aborted by the broker at its timeout. Nothing a restore
// could commit is then left on the id, so it is fenced: a zombie's newer
// transaction on it would otherwise hold read_committed consumers back
// until its timeout.
func (p *txnPool) commitRestored(t *transport.SinkTxn) error {
	id, version := t.GetTransactionalId(), t.GetProtocolVersion()
	pid, epoch := t.GetProducerId(), int16(t.GetProducerEpoch())
	log := p.log.With("transactional_id", id, "checkpoint", t.GetCheckpointId(),
		"producer_id", pid, "producer_epoch", epoch, "protocol_version", version)
	var kerr sarama.KError
	var err error
	switch version {
	case 0, txnProtocolV1:
		kerr, err = p.endTxn(id, pid, epoch)
	case txnProtocolV2:
		kerr, err = p.endTxnV2(id, pid, epoch)
	default:
		return fmt.Errorf("commit transaction %s of checkpoint %d: transaction protocol version %d is unknown to this worker (it knows 1 and 2)",
			id, t.GetCheckpointId(), version)
	}
	if err != nil {
		return fmt.Errorf("commit transaction %s of checkpoint %d: %w", id, t.GetCheckpointId(), err)
	}
	switch kerr {
	case sarama.ErrNoError:
		p.counts.WithLabelValues("recovered").Inc()
		log.Info("committed a transaction of the restored checkpoint (now, or before the restore)")
		return nil
	case sarama.ErrProducerFenced, sarama.ErrInvalidProducerEpoch, sarama.ErrInvalidProducerIDMapping, sarama.ErrInvalidTxnState:
		p.counts.WithLabelValues("ended_before").Inc()
		p.explainEnded(log, t, kerr)
		return p.fence(id)
	default:
		return fmt.Errorf("commit transaction %s of checkpoint %d: %w", id, t.GetCheckpointId(), kerr)
	}
}

// explainEnded logs how a restored transaction that could not be committed
// ended, as far as the broker's answer kerr and its description of the id
// tell (Kafka's do; kfake's describe every ended transaction as Empty).
func (p *txnPool) explainEnded(log *slog.Logger, t *transport.SinkTxn, kerr sarama.KError) {
	pid, epoch := t.GetProducerId(), int16(t.GetProducerEpoch())
	lost := "the checkpoint's output in it is lost"
	if t.GetProtocolVersion() == txnProtocolV2 && kerr == sarama.ErrInvalidTxnState {
		// The retry rule of version 2: the epoch after this transaction's
		// EndTxn, which ended it with the other result.
		log.Error("a transaction of the restored checkpoint was aborted, most likely by the broker at its timeout: "+lost,
			"err", kafkaErr(kerr), "transaction_timeout", p.timeout)
		return
	}
	st, derr := p.describe(t.GetTransactionalId())
	switch {
	case derr == nil && t.GetProtocolVersion() == txnProtocolV2 && st.TransactionState == sarama.TransactionStateCompleteCommit &&
		st.ProducerID == pid && st.ProducerEpoch == epoch+1:
		// Version 2's commit bumped the epoch once.
		log.Info("a transaction of the restored checkpoint was committed before", "state", st.TransactionState, "epoch_now", st.ProducerEpoch)
	case derr == nil && st.TransactionState == sarama.TransactionStateCompleteAbort && st.ProducerID == pid && st.ProducerEpoch == epoch+1:
		log.Error("a transaction of the restored checkpoint was aborted by the broker, most likely at its timeout: "+lost,
			"transaction_timeout", p.timeout)
	default:
		attrs := []any{"err", kafkaErr(kerr), "transaction_timeout", p.timeout}
		if derr != nil {
			// Not described (a broker away, or the task stopping, which
			// sends no more requests): the answer alone.
			attrs = append(attrs, "describe_err", derr)
		} else {
			attrs = append(attrs, "state_now", st.TransactionState, "epoch_now", st.ProducerEpoch)
		}
		log.Error("a transaction of the restored checkpoint has already ended with another epoch: committed by an earlier attempt that reused its id, "+
			"or aborted by the broker after the transaction timeout, in which case "+lost, attrs...)
	}
}

// kafkaErr names Kafka error code k as Kafka does (sarama has no text
// for the newer codes, such as PRODUCER_FENCED).
func kafkaErr(k sarama.KError) error { return kerrors.ErrorForCode(int16(k)) }

// endTxn commits transaction id of protocol version 1 with producer id pid
// and epoch epoch, from the admin client.
func (p *txnPool) endTxn(id string, pid int64, epoch int16) (sarama.KError, error) {
	return p.retry(p.atCoordinator(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.EndTxn(&sarama.EndTxnRequest{
			Version: requestVersion(p.admin.Config().Version, txnRequestVersions), TransactionalID: id,
			ProducerID: pid, ProducerEpoch: epoch, TransactionResult: true,
		})
		if err != nil {
			return 0, err
		}
		return resp.Err, nil
	}))
}

// endTxnV2 commits transaction id of protocol version 2 with EndTxn v5
// (KIP-890), which sarama cannot encode: franz-go's client, which sends it
// to id's transaction coordinator at the highest version both ends know.
// A broker that has lost EndTxn v5 since (transaction.version lowered)
// gets an older version, and answers by version 1's rules.
func (p *txnPool) endTxnV2(id string, pid int64, epoch int16) (sarama.KError, error) {
	if p.tv2 == nil {
		cl, err := kgo.NewClient(kgo.SeedBrokers(p.brokers...), kgo.ClientID("coordflow-"+p.task),
			kgo.DialTimeout(p.cfg.KafkaTimeout), kgo.RequestTimeoutOverhead(p.cfg.KafkaTimeout), kgo.RetryTimeout(2*p.cfg.KafkaTimeout))
		if err != nil {
			return 0, fmt.Errorf("connect to brokers %v: %w", p.brokers, err)
		}
		p.tv2 = cl
	}
	return p.retry(func(ctx context.Context) (sarama.KError, error) {
		req := kmsg.NewPtrEndTxnRequest()
		req.TransactionalID, req.ProducerID, req.ProducerEpoch, req.Commit = id, pid, epoch, true
		resp, err := req.RequestWith(ctx, p.tv2)
		if err != nil {
			return 0, err
		}
		if resp.Version < 5 {
			p.log.Warn("the broker no longer speaks EndTxn v5: a transaction of protocol version 2 is ended by version 1's rules",
				"transactional_id", id, "end_txn_version", resp.Version)
		}
		return sarama.KError(resp.ErrorCode), nil
	})
}

// fence initialises transactional id id with no producer behind it: the
// broker aborts its open transaction, if any, and bumps its epoch, fencing
// whoever held it.
func (p *txnPool) fence(id string) error {
	if _, _, err := p.initProducerID(id, -1, -1); err != nil {
		return fmt.Errorf("fence transactional id %s: %w", id, err)
	}
	p.counts.WithLabelValues("aborted_stale").Inc()
	return nil
}

// initProducerID initialises transactional id id (InitProducerID): the
// broker aborts the id's open transaction, if any, bumps its epoch, which
// fences every earlier holder, and returns the producer id and new epoch.
// With holderPID and holderEpoch (not -1; KIP-360, InitProducerId v3 and
// Kafka 2.5 on) it does so only if the id still has that producer and
// epoch, and answers PRODUCER_FENCED if another holder has initialised it
// since; but an open transaction on the id Kafka aborts whatever epoch is
// named.
func (p *txnPool) initProducerID(id string, holderPID int64, holderEpoch int16) (int64, int16, error) {
	var pid int64
	var epoch int16
	version := requestVersion(p.admin.Config().Version, initProducerIDVersions)
	if version < 3 {
		holderPID, holderEpoch = -1, -1
	}
	kerr, err := p.retry(p.cutAtCoordinator(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.InitProducerID(&sarama.InitProducerIDRequest{
			Version: version, TransactionalID: &id, TransactionTimeout: p.timeout,
			ProducerID: holderPID, ProducerEpoch: holderEpoch,
		})
		if err != nil {
			return 0, err
		}
		pid, epoch = resp.ProducerID, resp.ProducerEpoch
		return resp.Err, nil
	}))
	if err == nil && kerr != sarama.ErrNoError {
		err = kerr
	}
	return pid, epoch, err
}

// retry is retryKafka within twice cfg.KafkaTimeout, stopped at once
// when the task's context ends.
func (p *txnPool) retry(do func(context.Context) (sarama.KError, error)) (sarama.KError, error) {
	return retryKafka(p.ctx, 2*p.cfg.KafkaTimeout, do)
}

// atCoordinator turns a request to id's transaction coordinator into a
// step for retry: it finds the coordinator through the admin client, and
// after a transport error or a coordinator's "not me" looks it up again
// (dropping the broken connection, as sarama's transaction manager does).
func (p *txnPool) atCoordinator(id string, req func(*sarama.Broker) (sarama.KError, error)) func(context.Context) (sarama.KError, error) {
	return func(context.Context) (sarama.KError, error) {
		b, err := p.admin.TransactionCoordinator(id)
		if err != nil {
			return 0, err
		}
		kerr, err := req(b)
		if err != nil {
			_ = b.Close()
		}
		// Once the task stopped, no retry follows, and a lookup from a
		// broker that says nothing would hold the stop: none is made.
		if p.ctx.Err() == nil && (err != nil || kerr == sarama.ErrNotCoordinatorForConsumer || kerr == sarama.ErrConsumerCoordinatorNotAvailable) {
			_ = p.admin.RefreshTransactionCoordinator(id)
		}
		return kerr, err
	}
}

// cutAtCoordinator is atCoordinator for a request of a running task that
// the task's stop cuts, as it cuts a Produce (sinkConns): a coordinator
// that took an AddPartitionsToTxn (in a write), an InitProducerID (at a
// barrier) or a DescribeTransactions (before a write, at a restore) and
// says nothing would hold the stop for the read timeout. Once the task has
// stopped, neither the request nor the lookup of the coordinator is sent.
// What such a request was for, the restore after the stop does again: it
// fences the task's ids and commits what its checkpoint lists. A commit
// (EndTxn) is never cut: the one of a stop-with-savepoint may be in flight
// when the stop comes, and no restore may follow to make it; one made
// after the stop (a completion handled then, mapTask.lastCompletions) goes
// out on a new connection.
func (p *txnPool) cutAtCoordinator(id string, req func(*sarama.Broker) (sarama.KError, error)) func(context.Context) (sarama.KError, error) {
	step := p.atCoordinator(id, func(b *sarama.Broker) (kerr sarama.KError, err error) {
		p.w.conns.cutDuring(p.ctx, []*sarama.Broker{b}, func() { kerr, err = req(b) })
		return kerr, err
	})
	return func(ctx context.Context) (sarama.KError, error) {
		if err := p.ctx.Err(); err != nil {
			return 0, err
		}
		return step(ctx)
	}
}

// versionSince is a request version and the Kafka version that brought it.
type versionSince struct {
	kafka   sarama.KafkaVersion
	version int16
}

// The versions of the requests a sink sends, newest first, as sarama's own
// producer and transaction manager pick them for the client's Kafka
// version (requestVersion). sarama's transaction manager sends EndTxn and
// AddPartitionsToTxn at the same versions.
var (
	txnRequestVersions     = []versionSince{{sarama.V2_8_0_0, 3}, {sarama.V2_7_0_0, 2}, {sarama.V2_0_0_0, 1}}
	initProducerIDVersions = []versionSince{
		{sarama.V2_7_0_0, 4}, {sarama.V2_5_0_0, 3}, {sarama.V2_4_0_0, 2}, {sarama.V2_0_0_0, 1},
	}
	// Record batches need Produce v3 at least.
	produceVersions = []versionSince{
		{sarama.V3_7_0_0, 10}, {sarama.V2_8_0_0, 9}, {sarama.V2_4_0_0, 8}, {sarama.V2_1_0_0, 7},
		{sarama.V2_0_0_0, 6}, {sarama.V1_0_0_0, 5}, {sarama.V0_11_0_0, 3},
	}
)

// requestVersion returns the version of versions (newest first) that
// Kafka version v knows, 0 if none.
func requestVersion(v sarama.KafkaVersion, versions []versionSince) int16 {
	for _, vs := range versions {
		if v.IsAtLeast(vs.kafka) {
			return vs.version
		}
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
	if !s.inited || s.stale {
		// Free or committed: its transaction ended with a commit.
		if err := p.initSlot(s, true); err != nil {
			return err
		}
	}
	s.begin()
	s.state, s.wrote, s.began = slotOpen, false, time.Time{}
	p.cur = s
	return nil
}

// initSlot gives slot s a new epoch (initProducerID), which ends
// whatever transaction the id had open.
//
// With asHolder, a slot this attempt initialised before, whose last
// transaction it committed, is initialised as its producer (initProducerID
// with the slot's producer id and epoch): a task a recovery replaced (a
// zombie: its worker frozen past its lease, say) that learns late of a
// completion would otherwise take the id back from its successor. The
// broker refuses it (PRODUCER_FENCED) and the zombie fails, as long as the
// successor has no transaction open on the id; one open the broker would
// abort, which is why a task's attempts must not overlap (the worker's
// lease, which the leader waits out). The slot of a failed write
// (ready) is initialised as before: its transaction may still be open,
// which a broker answers an initialisation as holder with
// CONCURRENT_TRANSACTIONS and then refuses, and ready has asked the
// broker whether the id is still the slot's.
func (p *txnPool) initSlot(s *txnSlot, asHolder bool) error {
	holderPID, holderEpoch := int64(-1), int16(-1)
	if asHolder && s.inited {
		holderPID, holderEpoch = s.pid, s.epoch
	}
	pid, epoch, err := p.initProducerID(s.id, holderPID, holderEpoch)
	if err != nil {
		if holderPID >= 0 && isFenced(err) {
			// Another producer initialised the id since: this task's
			// attempt has been superseded.
			p.fenced.Inc()
			p.log.Warn("sink producer fenced: a newer attempt of the task took its transactional id; stopping", "transactional_id", s.id, "err", err)
			return fmt.Errorf("sink topic %q: initialise transactional id %s as producer id %d epoch %d: %w: %w", p.topic, s.id, holderPID, holderEpoch, errFenced, err)
		}
		return fmt.Errorf("sink topic %q: initialise transactional id %s: %w", p.topic, s.id, err)
	}
	s.inited, s.stale, s.pid, s.epoch = true, false, pid, epoch
	s.seq = make(map[int32]int32)
	return nil
}

// begin makes s's next transaction the open one. It sends nothing: the
// partitions it writes to are added as it writes.
func (s *txnSlot) begin() { s.added = make(map[int32]bool) }

// describe asks id's transaction coordinator for its state.
func (p *txnPool) describe(id string) (sarama.TransactionState, error) {
	var st sarama.TransactionState
	kerr, err := p.retry(p.cutAtCoordinator(id, func(b *sarama.Broker) (sarama.KError, error) {
		resp, err := b.DescribeTransactions(&sarama.DescribeTransactionsRequest{TransactionalIDs: []string{id}})
		if err != nil {
			return 0, err
		}
		if len(resp.TransactionStates) != 1 {
			return 0, fmt.Errorf("%d states for one transactional id", len(resp.TransactionStates))
		}
		st = resp.TransactionStates[0]
		return st.ErrorCode, nil
	}))
	if err == nil && kerr != sarama.ErrNoError {
		err = kerr
	}
	if err != nil {
		return st, fmt.Errorf("describe transactional id %s: %w", id, err)
	}
	return st, nil
}

// send writes msgs in the open transaction and waits for the broker's acks.
//
// While the sink is held (sinkHold: its brokers cannot be reached, at the
// task's start too; its topic is missing; a write failed), send fails with
// errSinkUnavailable and nothing is lost: the caller holds msgs and sends
// them again. send tries again at the hold's backoff, with msgs empty too,
// so that a held sink with nothing to write gets ready (start: the
// restored transactions recovered first) and lets checkpoints complete.
// A write fails that way only while the open transaction has no record
// yet: its id then gets a new epoch before the next write, which aborts
// whatever part of msgs reached the broker. A write that fails after the
// open transaction has records cannot be made good without them, and
// fails the task: the restore from the last completed checkpoint writes
// them again. So does a write the broker answered with an error that no new
// epoch cures (epochCures: the records are too large, not authorised...),
// which the same records would meet again, and an error that waiting would
// not change (sinkUnreachable) on the way to the next write.
func (p *txnPool) send(msgs []sinkRecord) error {
	if len(msgs) == 0 && p.hold.down == nil {
		return nil
	}
	if err := p.hold.due(p.now()); err != nil {
		return err
	}
	if err := p.ready(); err != nil {
		return err
	}
	if len(msgs) == 0 {
		p.hold.ok()
		return nil
	}
	s := p.cur
	start := p.now()
	err := p.write(s, msgs)
	if err == nil {
		if !s.wrote {
			s.wrote, s.began = true, start
		}
		p.hold.ok()
		return nil
	}
	what := "write " + countRecords(len(msgs))
	// A write no broker answered says nothing of fencing, and asking now
	// (describe) would block the task loop for the request's retries: ready
	// asks once the brokers answer again, before the slot gets a new
	// epoch.
	unanswered := sinkUnreachable(err)
	if s.wrote || isFenced(err) || !unanswered && (!epochCures(err) || p.fencedOut(s, err)) {
		return p.producerErr(s, what, err)
	}
	// The write's records may be in the transaction in part: the new
	// epoch the slot gets before the next write aborts it, and they are
	// all written again.
	s.stale, s.checkFence = true, unanswered
	p.hold.lost()
	return p.unavailable(fmt.Errorf("sink topic %q, transactional id %s: %s: %w", p.topic, s.id, what, err))
}

// ready prepares the next write after the sink was held or before its
// first: the topic must answer (sinkHold.look), the pool must have started
// (start: the restored transactions recovered, a transaction open), and a
// producer a failed write left in error gets a new epoch and a new
// transaction. It returns errSinkUnavailable while the sink must go on
// holding, and any other error when the task must fail.
func (p *txnPool) ready() error {
	if err := p.hold.look(); err != nil {
		return p.unavailable(err)
	}
	if err := p.start(); err != nil {
		return p.heldFor(err)
	}
	s := p.cur
	if s.checkFence {
		// A write failed without an answer: the id may have moved on
		// meanwhile. Initialising it again would fence whoever took it.
		st, err := p.describe(s.id)
		if err != nil {
			return p.heldFor(err)
		}
		if st.ProducerID != s.pid || st.ProducerEpoch != s.epoch {
			p.fenced.Inc()
			return fmt.Errorf("sink transactional id %s: producer id %d epoch %d now, not %d epoch %d: %w, or the broker aborted its transaction at the transaction timeout, while the sink could not reach it",
				s.id, st.ProducerID, st.ProducerEpoch, s.pid, s.epoch, errFenced)
		}
	}
	if s.stale {
		// Checked again until the new epoch is there: a hold after this
		// check could outlast a newer attempt's start, which this
		// initialisation would then fence.
		if err := p.initSlot(s, false); err != nil {
			return p.heldFor(err)
		}
		s.checkFence = false
		s.begin()
		s.wrote, s.began = false, time.Time{}
	}
	return nil
}

// heldFor is what ready returns when a step on the way to the next write
// failed with err: the sink is held if waiting may cure err
// (sinkUnreachable), and the task fails with err otherwise.
func (p *txnPool) heldFor(err error) error {
	if errors.Is(err, errSinkUnavailable) || !sinkUnreachable(err) {
		return err
	}
	return p.hold.fail(fmt.Errorf("sink brokers %v unreachable: %w", p.brokers, err), p.now())
}

// unavailable holds the sink for cause (sinkHold.fail) and returns the
// error send fails with. A fenced producer is not a cause to wait out: it
// is returned as it is, and so is an error that says the sink is held.
func (p *txnPool) unavailable(cause error) error {
	if errors.Is(cause, errFenced) || errors.Is(cause, errSinkUnavailable) {
		return cause
	}
	return p.hold.fail(cause, p.now())
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
// goes on; so it does with errSinkUnavailable, while the sink is held
// (which it is until it has started: a checkpoint must not complete before
// the restored transactions are committed); any other error fails the task.
func (p *txnPool) preCommit(id uint64) ([]*transport.SinkTxn, error) {
	if p.hold.down != nil {
		return nil, p.hold.down
	}
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
		if p.cfg.Failpoint != nil {
			// A crash here leaves a transaction with records that no
			// completed checkpoint lists: the restored task aborts it.
			p.cfg.Failpoint("worker-after-sink-precommit")
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
		if err := p.commit(s); err != nil {
			return err
		}
		p.counts.WithLabelValues("committed").Inc()
		p.log.Debug("committed sink transaction", "checkpoint", s.ckpt, "transactional_id", s.id)
		s.state, s.freeAfter, s.stale = slotCommitted, 0, true
	}
	for _, s := range p.slots {
		if s.state == slotCommitted && s.freeAfter != 0 && s.freeAfter <= id {
			s.state = slotFree
			// A new epoch now, off the barrier's path: the next barrier
			// opens a transaction on it at once. Without brokers, later:
			// openNext initialises a stale slot before it opens it, and
			// a completion with nothing to commit is no reason to fail,
			// nor is the task's stop, after which nothing is sent: the
			// restore that follows fences the id.
			if err := p.initSlot(s, true); err != nil {
				if p.ctx.Err() != nil {
					continue // stale since its commit
				}
				if !sinkUnreachable(err) {
					return err
				}
				s.stale = true
				p.log.Warn("sink brokers unreachable: a free transactional id gets its new epoch when it is next used",
					"transactional_id", s.id, "err", err)
			}
		}
	}
	return nil
}

// commit commits pending slot s's transaction (EndTxn with its producer
// id and epoch), retrying while the broker is unreachable (retry). If the
// broker stays away the task fails, and the restore from the last
// completed checkpoint, which lists the transaction, commits it.
func (p *txnPool) commit(s *txnSlot) error {
	what := fmt.Sprintf("commit the transaction of checkpoint %d", s.ckpt)
	kerr, err := p.endTxn(s.id, s.pid, s.epoch)
	switch {
	case err != nil:
		return fmt.Errorf("sink topic %q, transactional id %s: %s: %w; "+
			"the task restarts from the last completed checkpoint, whose restore commits it", p.topic, s.id, what, err)
	case kerr == sarama.ErrNoError:
		return nil
	case kerr == sarama.ErrProducerFenced || kerr == sarama.ErrInvalidProducerEpoch || kerr == sarama.ErrInvalidProducerIDMapping:
		return p.producerErr(s, what, kerr)
	default:
		return fmt.Errorf("sink topic %q, transactional id %s: %s: %w", p.topic, s.id, what, kerr)
	}
}

// producerErr wraps err from slot s's producer, and counts and logs it when
// Kafka fenced the producer: a newer attempt owns the id and this task is a
// zombie that must stop.
func (p *txnPool) producerErr(s *txnSlot, what string, err error) error {
	if p.fencedOut(s, err) {
		p.fenced.Inc()
		p.log.Warn("sink producer fenced: a newer attempt of the task took its transactional id; stopping", "transactional_id", s.id, "err", err)
		return fmt.Errorf("sink topic %q, transactional id %s: %s: %w (%w)", p.topic, s.id, what, errFenced, err)
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
	if !s.inited || p.ctx.Err() != nil {
		return false // a stopping task need not know, nor wait for the answer
	}
	st, derr := p.describe(s.id)
	return derr == nil && (st.ProducerID != s.pid || st.ProducerEpoch != s.epoch)
}

// isFenced reports whether err says a newer producer took the id.
func isFenced(err error) bool {
	return errors.Is(err, sarama.ErrProducerFenced) || errors.Is(err, sarama.ErrInvalidProducerEpoch)
}

// close releases the client of version 2's commits; the sink closes its
// own. The open transactions are left to the next attempt, which aborts
// them, or to the broker's timeout.
func (p *txnPool) close() {
	if p.tv2 != nil {
		p.tv2.Close()
	}
}
