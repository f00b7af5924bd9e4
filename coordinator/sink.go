package coordinator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"regexp"
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
// and DescribeTransactions (Kafka 3.0), from which a map task learns whether
// another producer took one of its transactional ids and how a restored
// transaction ended.
var txnAPIs = map[int16]string{22: "InitProducerId", 24: "AddPartitionsToTxn", 26: "EndTxn", 65: "DescribeTransactions"}

// errSinkUnreachable is wrapped by kafkaSinkCheck's error when no sink
// broker answered: whether they support transactions is then unknown, and
// the deploy goes on. Its map tasks hold their outputs and decline
// checkpoints, naming the brokers, until the brokers answer (issue 7: a
// broker down is a decline, not a job that cannot start).
var errSinkUnreachable = errors.New("sink brokers unreachable")

// kafkaSinkCheck asks an exactly-once sink's brokers which requests they
// support, so that a broker without transactions fails the job at deploy
// time with a reason rather than each map task at its first write.
func kafkaSinkCheck(ctx context.Context, brokers []string) error {
	addrs := strings.Join(brokers, ",")
	client, err := sarama.NewClient(brokers, lookupConfig(ctx, sarama.V2_8_0_0))
	if err != nil {
		return fmt.Errorf("%w: %s: %w", errSinkUnreachable, addrs, err)
	}
	defer client.Close()
	b := client.LeastLoadedBroker()
	if b == nil {
		return fmt.Errorf("%w: %s: no broker connected", errSinkUnreachable, addrs)
	}
	resp, err := b.ApiVersions(&sarama.ApiVersionsRequest{})
	if err != nil {
		return fmt.Errorf("%w: %s: ApiVersions: %w", errSinkUnreachable, addrs, err)
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

// lookupConfig is the sarama configuration of the leader's requests to a
// job's sink brokers (the deploy check, the transactions listing and its
// aborts): requests of Kafka version, and timeouts short enough that an
// unreachable broker fails the lookup rather than the caller's request,
// each bounded by what is left of ctx's deadline (of lookupTimeout without
// one). sarama takes no context: a request under way when ctx ends runs to
// its timeout.
func lookupConfig(ctx context.Context, version sarama.KafkaVersion) *sarama.Config {
	left := lookupTimeout
	if dl, ok := ctx.Deadline(); ok {
		left = max(time.Until(dl), time.Millisecond)
	}
	cfg := sarama.NewConfig()
	cfg.ClientID = "coordd"
	cfg.Version = version
	cfg.Net.DialTimeout = min(2*time.Second, left)
	cfg.Net.ReadTimeout = min(5*time.Second, left)
	cfg.Net.WriteTimeout = min(3*time.Second, left)
	cfg.Metadata.Full = false
	cfg.Metadata.AllowAutoTopicCreation = false
	cfg.Metadata.RefreshFrequency = 0
	cfg.Metadata.Retry.Max = 1
	cfg.Metadata.Retry.Backoff = 100 * time.Millisecond
	cfg.Metadata.Timeout = left
	// Each request's version is then the highest both ends know
	// (abortTxn relies on it).
	cfg.ApiVersionsRequest = true
	return cfg
}

// apiSinkTxn is one open transaction of a job's exactly-once sink in GET
// /v1/jobs/{id}/transactions, as the broker describes it.
type apiSinkTxn struct {
	TransactionalID string   `json:"transactional_id"`
	State           string   `json:"state"`
	ProducerID      int64    `json:"producer_id"`
	ProducerEpoch   int16    `json:"producer_epoch"`
	StartedAt       string   `json:"started_at,omitempty"` // RFC 3339, the broker's clock
	AgeMS           int64    `json:"age_ms"`
	TimeoutMS       int64    `json:"timeout_ms"`
	Partitions      []string `json:"partitions,omitempty"` // topic/partition
	// NeededBy says who will finish the transaction: the completed
	// checkpoint that promises it (a restore commits it), or the job's task
	// whose transactional id it is. Empty: nobody; -abort ends it.
	NeededBy string `json:"needed_by,omitempty"`
	Aborted  bool   `json:"aborted,omitempty"`
}

// openTxnStates are the transaction states that hold back read_committed
// consumers.
var openTxnStates = []string{sarama.TransactionStateOngoing, sarama.TransactionStatePrepareCommit,
	sarama.TransactionStatePrepareAbort, sarama.TransactionStatePrepareEpochFence}

// sinkTransactions lists the open transactions of job's exactly-once sink
// from its brokers (ListTransactions and DescribeTransactions, KIP-664),
// and with abort ends those nobody needs by initialising their
// transactional ids, which aborts them. savepoints are the cluster's: a
// savepoint that did not stop its job leaves its transactions open for a
// job started from it to commit, so the transactions one lists are needed
// for as long as it is kept.
func sinkTransactions(ctx context.Context, job fsm.Job, savepoints []fsm.Savepoint, abort bool, now time.Time) ([]apiSinkTxn, error) {
	if !exactlyOnceSink(job.Spec) {
		return nil, fmt.Errorf("job %s has no exactly-once sink", job.ID)
	}
	sink := job.Spec.Sink
	prefix := cmp.Or(sink.TransactionalIDPrefix, sinkTxnPrefix(job.ID)) + "-"
	addrs := strings.Join(sink.Brokers, ",")
	// Kafka 3.0: ListTransactions and DescribeTransactions (KIP-664).
	cfg := lookupConfig(ctx, sarama.V3_0_0_0)
	cfg.Metadata.Full = true // the cluster admin's first refresh names no topic
	client, err := sarama.NewClient(sink.Brokers, cfg)
	if err != nil {
		return nil, fmt.Errorf("sink brokers %s unreachable: %w", addrs, err)
	}
	admin, err := sarama.NewClusterAdminFromClient(client)
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("sink brokers %s unreachable: %w", addrs, err)
	}
	defer admin.Close() // and client
	tadmin, ok := admin.(sarama.TransactionClusterAdmin)
	if !ok {
		return nil, fmt.Errorf("sink brokers %s: this sarama has no transaction admin", addrs)
	}
	listed, err := tadmin.ListTransactions(openTxnStates, nil, -1)
	if err != nil {
		return nil, fmt.Errorf("list transactions on %s: %w", addrs, err)
	}
	var ids []string
	for _, l := range listed {
		if isJobTxnID(prefix, l.TransactionalID) {
			ids = append(ids, l.TransactionalID)
		}
	}
	slices.Sort(ids)
	if len(ids) == 0 {
		return []apiSinkTxn{}, nil
	}
	states, err := tadmin.DescribeTransactions(ids)
	if err != nil {
		return nil, fmt.Errorf("describe transactions on %s: %w", addrs, err)
	}
	// promised holds who commits each transaction a completed checkpoint
	// or a kept savepoint lists. A transaction is named by who commits it
	// first: the checkpoint's restore, else the running task (its next
	// checkpoint), else a job started from the savepoint.
	type promise struct {
		txn        fsm.SinkTxn
		by         string
		checkpoint bool // the last completed checkpoint's, not a savepoint's
	}
	promised := make(map[string][]promise)
	addPromises := func(states map[string]fsm.TaskState, by string, checkpoint bool) {
		for _, task := range slices.Sorted(maps.Keys(states)) {
			for _, t := range states[task].SinkTxns {
				promised[t.TransactionalID] = append(promised[t.TransactionalID], promise{t, by, checkpoint})
			}
		}
	}
	if n := len(job.Completed); n > 0 {
		addPromises(job.Completed[n-1].Tasks, fmt.Sprintf("checkpoint %d (completed; a restore commits it)", job.Completed[n-1].ID), true)
	}
	for _, sp := range savepoints {
		addPromises(sp.Tasks, fmt.Sprintf("savepoint %s (a job started from it commits it)", sp.ID), false)
	}
	out := make([]apiSinkTxn, 0, len(ids))
	for _, id := range ids {
		st, ok := states[id]
		if !ok || !slices.Contains(openTxnStates, st.TransactionState) {
			continue // ended since it was listed
		}
		v := apiSinkTxn{
			TransactionalID: id, State: st.TransactionState, ProducerID: st.ProducerID, ProducerEpoch: st.ProducerEpoch,
			TimeoutMS: st.TransactionTimeout.Milliseconds(),
		}
		if st.TransactionStartTime > 0 {
			started := time.UnixMilli(st.TransactionStartTime)
			v.StartedAt, v.AgeMS = started.UTC().Format(time.RFC3339Nano), max(now.Sub(started).Milliseconds(), 0)
		}
		for _, tp := range st.Topics {
			for _, p := range tp.Partitions {
				v.Partitions = append(v.Partitions, fmt.Sprintf("%s/%d", tp.Topic, p))
			}
		}
		byCheckpoint := false
		for _, p := range promised[id] {
			if p.txn.ProducerID == st.ProducerID && p.txn.ProducerEpoch == st.ProducerEpoch {
				v.NeededBy, byCheckpoint = p.by, p.checkpoint
				break
			}
		}
		if task := poolOwner(job, prefix, id); task != "" && !byCheckpoint {
			v.NeededBy = fmt.Sprintf("task %s of attempt %d", task, job.Attempt)
		}
		out = append(out, v)
	}
	if !abort {
		return out, nil
	}
	for i := range out {
		if out[i].NeededBy != "" {
			continue
		}
		if err := ctx.Err(); err != nil {
			return out, fmt.Errorf("abort transaction %s: %w", out[i].TransactionalID, err)
		}
		if err := abortTxn(client, out[i].TransactionalID, time.Duration(out[i].TimeoutMS)*time.Millisecond); err != nil {
			return out, err
		}
		out[i].Aborted = true
	}
	return out, nil
}

// jobTxnSuffix is what follows a job's transactional id prefix and "-" in
// the ids of its map tasks' producers: the task and the producer's index in
// the task's pool (worker's txnID).
var jobTxnSuffix = regexp.MustCompile(`^map-[0-9]+-[0-9]+$`)

// isJobTxnID reports whether transactional id id is one of the job's whose
// ids start with prefix (its prefix and "-"). The prefix alone is not
// enough: the ids of a job named after another's id, "etl-0a1b2c3d", say,
// start with that job's prefix too, and aborting them would lose output a
// completed checkpoint of the other job promised.
func isJobTxnID(prefix, id string) bool {
	rest, ok := strings.CutPrefix(id, prefix)
	return ok && jobTxnSuffix.MatchString(rest)
}

// poolOwner returns the map task of job's current attempt whose
// transactional ids include id, if the job still runs tasks.
func poolOwner(job fsm.Job, prefix, id string) string {
	if job.Status == fsm.JobCancelled {
		return ""
	}
	rest := strings.TrimPrefix(id, prefix)
	for _, t := range job.Tasks {
		if t.Kind == fsm.TaskMap && strings.HasPrefix(rest, t.ID+"-") {
			return t.ID
		}
	}
	return ""
}

// abortTxn initialises transactional id id without a producer behind it:
// the broker aborts its open transaction and fences its producer. The
// request asks for the highest InitProducerId version sarama encodes, and
// sarama lowers it to the highest the coordinator named in its ApiVersions
// answer when the connection opened (lookupConfig asks for it).
func abortTxn(client sarama.Client, id string, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = time.Minute
	}
	b, err := client.TransactionCoordinator(id)
	if err != nil {
		return fmt.Errorf("abort transaction %s: find its coordinator: %w", id, err)
	}
	resp, err := b.InitProducerID(&sarama.InitProducerIDRequest{
		Version: saramaInitProducerIDVersion, TransactionalID: &id, TransactionTimeout: timeout, ProducerID: -1, ProducerEpoch: -1,
	})
	if err == nil && resp.Err != sarama.ErrNoError {
		err = resp.Err
	}
	if err != nil {
		return fmt.Errorf("abort transaction %s: %w", id, err)
	}
	return nil
}

// saramaInitProducerIDVersion is the highest InitProducerId version sarama
// encodes; abortTxn's requests are lowered from it to the broker's.
const saramaInitProducerIDVersion = 4

// txnRequestTimeout bounds a transactions request to the sink's brokers.
const txnRequestTimeout = 15 * time.Second

// handleTransactions answers GET /v1/jobs/{id}/transactions with the open
// transactions of the job's exactly-once sink, and POST
// /v1/jobs/{id}/transactions/abort by aborting those nobody needs (on the
// leader, whose FSM is current: a follower could take a transaction a new
// checkpoint promises for one nobody needs).
func (s *Server) handleTransactions(w http.ResponseWriter, r *http.Request) {
	j, ok := s.lookupJob(w, r)
	if !ok {
		return
	}
	if !exactlyOnceSink(j.Spec) {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("job %s has no exactly-once sink: it writes no transactions", j.ID))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), txnRequestTimeout)
	defer cancel()
	txns, err := sinkTransactions(ctx, j, s.fsm.Savepoints(), r.Method == http.MethodPost, time.Now())
	if err != nil {
		writeError(w, http.StatusBadGateway, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, txns)
}
