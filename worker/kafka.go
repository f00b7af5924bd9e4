package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"github.com/prometheus/client_golang/prometheus"
	gometrics "github.com/rcrowley/go-metrics"
)

func init() {
	// sarama keeps go-metrics histograms of every request and message,
	// updated under locks on the hot path of sources and sinks; a worker
	// reports its own metrics, so it turns them off. go-metrics has only a
	// process-wide switch.
	gometrics.UseNilMetrics = true
}

// kafkaPool shares Kafka clients among this worker's source tasks, so that a
// thousand lightly loaded tasks cost about what one consumer of a thousand
// partitions costs: one sarama client (broker connections, metadata) per
// broker set and isolation level (sarama's consumers read at their client's),
// and on it consumers whose fetch loop per broker serves every
// partition consumed through them. A consumer serves a topic partition once,
// so a second task reading the same partition (another job, or the next
// attempt overlapping the last) gets another consumer on the same client.
//
// Offset commits of completed checkpoints, which are for monitoring only, are
// coalesced per consumer group and sent on a timer: one OffsetCommit request
// per group and interval, whatever the number of tasks and checkpoints, and
// never on a task's path.
type kafkaPool struct {
	cfg      *Config
	clientID string
	log      *slog.Logger
	commits  *prometheus.CounterVec // result

	// errorCycle is errorCycle of the clients' configuration, for the
	// pumps, which compare the spacing of Kafka errors against it.
	errorCycle time.Duration

	mu      sync.Mutex
	clients map[string]*kafkaClient // by clientKey: broker set and isolation level
	// closing holds a channel per close running in the background, closed
	// once it is done: a client's last offset commit and close after its
	// last lease was released (kafkaLease.release), or a stopped task's
	// partition consumers' closes before its lease goes
	// (kafkaLease.releaseAfter).
	closing []chan struct{}
	// changed, when not nil, is closed at the next change of clients or
	// closing, for wait.
	changed chan struct{}
}

// wait waits up to timeout for the closes running in the background, also
// those that begin while it waits, and reports whether they all ended.
func (p *kafkaPool) wait(timeout time.Duration) bool { return p.settle(timeout, false) }

// drain is wait for a worker that shuts down, whose tasks have been told to
// stop: it also waits for the leases still held, and the closes their
// releases begin, so that their last offset commits are sent. A task that
// outlived its stop timeout releases its lease late.
func (p *kafkaPool) drain(timeout time.Duration) bool { return p.settle(timeout, true) }

// settle waits, up to timeout, until no close runs in the background and,
// with leases, no client is leased.
func (p *kafkaPool) settle(timeout time.Duration, leases bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		closing := slices.Clone(p.closing)
		var changed chan struct{}
		if len(closing) == 0 && leases && len(p.clients) > 0 {
			if p.changed == nil {
				p.changed = make(chan struct{})
			}
			changed = p.changed
		}
		p.mu.Unlock()
		switch {
		case changed != nil:
			select {
			case <-changed:
			case <-deadline.C:
				return false
			}
		case len(closing) == 0:
			return true
		}
		for _, done := range closing {
			select {
			case <-done:
			case <-deadline.C:
				return false
			}
		}
	}
}

// noteChange wakes a wait; p.mu is held.
func (p *kafkaPool) noteChange() {
	if p.changed != nil {
		close(p.changed)
		p.changed = nil
	}
}

func newKafkaPool(cfg *Config, workerID string, log *slog.Logger, m *metrics) *kafkaPool {
	return &kafkaPool{
		cfg: cfg, clientID: "coordflow-" + workerID, log: log, commits: m.offsetCommits,
		clients: make(map[string]*kafkaClient), errorCycle: errorCycle(kafkaConfig(cfg, "")),
	}
}

// kafkaClient is one shared client and what hangs on it.
type kafkaClient struct {
	pool    *kafkaPool
	key     string
	brokers []string // as the first task gave them, for errors
	client  sarama.Client
	refs    int // under pool.mu

	mu        sync.Mutex
	consumers []*sharedConsumer
	offsets   map[string]map[string]map[int32]pendingCommit // group -> topic -> partition

	// metaSem (one slot) serialises the metadata refreshes of partition
	// discovery, so that the tasks looking at one topic at once share one
	// refresh; a task waits for it only while its context lasts.
	metaSem   chan struct{}
	refreshed map[string]refreshResult // topic -> its last refresh, held under metaSem

	stop context.CancelFunc
	done chan struct{}
}

// sharedConsumer is a sarama consumer and the partitions it serves.
type sharedConsumer struct {
	consumer sarama.Consumer
	active   map[topicPartition]bool
}

type topicPartition struct {
	topic     string
	partition int32
}

// pendingCommit is the newest offset of a partition not yet committed.
type pendingCommit struct {
	offset     int64
	checkpoint uint64
}

// kafkaLease is one task's use of a shared client; release it once.
type kafkaLease struct {
	kc     *kafkaClient
	client sarama.Client
}

// clientKey names the shared client of a broker set and isolation level:
// sarama's consumers take their isolation level from their client's
// configuration, so sources reading committed records only have a client of
// their own.
func clientKey(brokers []string, isolation sarama.IsolationLevel) string {
	s := slices.Clone(brokers)
	sort.Strings(s)
	key := strings.Join(slices.Compact(s), ",")
	if isolation == sarama.ReadCommitted {
		key += " read_committed"
	}
	return key
}

// acquire leases the shared client of brokers whose consumers read at
// isolation, creating it if needed, and checks that topic exists, returning
// its partitions. Errors name the role and what is wrong, as the job's
// reason shows them.
func (p *kafkaPool) acquire(brokers []string, isolation sarama.IsolationLevel, topic, role string) (*kafkaLease, []int32, error) {
	if len(brokers) == 0 {
		return nil, nil, fmt.Errorf("%s topic %q: no brokers given", role, topic)
	}
	key := clientKey(brokers, isolation)
	p.mu.Lock()
	kc := p.clients[key]
	if kc != nil {
		kc.refs++
	}
	p.mu.Unlock()
	if kc == nil {
		// Dial without the pool's lock: an unreachable broker set must not
		// hold up the tasks of another.
		cfg := kafkaConfig(p.cfg, p.clientID)
		cfg.Consumer.IsolationLevel = isolation
		client, err := sarama.NewClient(brokers, cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: connect to brokers %v: %w", role, brokers, err)
		}
		p.mu.Lock()
		if kc = p.clients[key]; kc != nil {
			kc.refs++
			p.mu.Unlock()
			client.Close() // another task won the race
		} else {
			kc = p.start(key, brokers, client)
			p.mu.Unlock()
		}
	}
	lease := &kafkaLease{kc: kc, client: kc.client}
	parts, err := topicPartitions(kc.client, topic, role, brokers)
	if err != nil {
		lease.release()
		return nil, nil, err
	}
	return lease, parts, nil
}

// start registers a new shared client with one reference and starts its
// committer; p.mu is held.
func (p *kafkaPool) start(key string, brokers []string, client sarama.Client) *kafkaClient {
	ctx, stop := context.WithCancel(context.Background())
	kc := &kafkaClient{
		pool: p, key: key, brokers: slices.Clone(brokers), client: client, refs: 1,
		offsets:   make(map[string]map[string]map[int32]pendingCommit),
		metaSem:   make(chan struct{}, 1),
		refreshed: make(map[string]refreshResult),
		stop:      stop, done: make(chan struct{}),
	}
	p.clients[key] = kc
	go kc.commitLoop(ctx)
	return kc
}

// topicPartitions refreshes topic's metadata (a shared client may hold it
// from before the topic was deleted or created) and returns its partitions.
func topicPartitions(client sarama.Client, topic, role string, brokers []string) ([]int32, error) {
	err := client.RefreshMetadata(topic)
	var parts []int32
	if err == nil {
		parts, err = client.Partitions(topic)
	}
	switch {
	case errors.Is(err, sarama.ErrUnknownTopicOrPartition) || (err == nil && len(parts) == 0):
		return nil, fmt.Errorf("%s topic %q does not exist", role, topic)
	case errors.Is(err, sarama.ErrOutOfBrokers):
		return nil, fmt.Errorf("%s: cannot reach brokers %v: %w", role, brokers, err)
	case err != nil:
		return nil, fmt.Errorf("%s topic %q: read partitions: %w", role, topic, err)
	}
	return parts, nil
}

// refreshResult is the outcome of a topic's last metadata refresh.
type refreshResult struct {
	at    time.Time // when it ended
	parts []int32
	err   error
}

// partitions returns topic's partitions as of a metadata refresh at most
// maxAge old, refreshing if the last one is older: the source tasks of this
// client that discover partitions of one topic share a refresh per maxAge
// instead of sending one each. A refresh that ended while the caller waited
// for its turn answers it too, failed or not, so that during an outage the
// waiting tasks do not each wait out a refresh of their own. It blocks for
// the refresh (up to the client's metadata timeout, and behind another
// task's) unless ctx ends first; never call it on a task loop. A refresh
// the caller gave up on still ends, bounded by the client's timeouts.
func (l *kafkaLease) partitions(ctx context.Context, topic string, maxAge time.Duration) ([]int32, error) {
	kc := l.kc
	asked := time.Now()
	select {
	case kc.metaSem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("partitions of %s: %w", topic, ctx.Err())
	}
	if last, ok := kc.refreshed[topic]; ok && (last.at.After(asked) || (last.err == nil && time.Since(last.at) < maxAge)) {
		<-kc.metaSem
		return last.parts, last.err
	}
	// The refresh holds the slot until it ends, but the caller waits for
	// it only while ctx lasts: sarama's requests cannot be cancelled, and
	// in an outage one takes read timeouts.
	done := make(chan refreshResult, 1)
	go func() {
		defer func() { <-kc.metaSem }()
		parts, err := topicPartitions(kc.client, topic, "source", kc.brokers)
		r := refreshResult{at: time.Now(), parts: parts, err: err}
		kc.refreshed[topic] = r
		done <- r
	}()
	select {
	case r := <-done:
		return r.parts, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("partitions of %s: %w", topic, ctx.Err())
	}
}

// consume starts consuming topic/partition at offset on a consumer of the
// shared client that does not serve that partition yet. Close the returned
// partition consumer with the returned func, not directly.
func (l *kafkaLease) consume(topic string, partition int32, offset int64) (sarama.PartitionConsumer, func(), error) {
	kc := l.kc
	tp := topicPartition{topic, partition}
	sc, err := kc.reserve(tp)
	if err != nil {
		return nil, nil, err
	}
	unreserve := func() {
		kc.mu.Lock()
		delete(sc.active, tp)
		kc.mu.Unlock()
	}
	// Not under kc.mu: sarama adds a partition to a running fetch loop
	// between two fetches (up to Consumer.MaxWaitTime), and the tasks that
	// start together must wait for that together, not one after the other.
	pc, err := sc.consumer.ConsumePartition(topic, partition, offset)
	if err != nil {
		unreserve()
		return nil, nil, err
	}
	var once sync.Once
	closeFn := func() {
		once.Do(func() {
			_ = pc.Close()
			unreserve()
		})
	}
	return pc, closeFn, nil
}

// reserve picks (or creates) a consumer of kc that does not serve tp and
// marks tp as served by it.
func (kc *kafkaClient) reserve(tp topicPartition) (*sharedConsumer, error) {
	kc.mu.Lock()
	defer kc.mu.Unlock()
	for _, c := range kc.consumers {
		if !c.active[tp] {
			c.active[tp] = true
			return c, nil
		}
	}
	consumer, err := sarama.NewConsumerFromClient(kc.client)
	if err != nil {
		return nil, fmt.Errorf("source: create consumer: %w", err)
	}
	sc := &sharedConsumer{consumer: consumer, active: map[topicPartition]bool{tp: true}}
	kc.consumers = append(kc.consumers, sc)
	return sc, nil
}

// commit queues the offsets of completed checkpoint id for group; a newer
// checkpoint's offset of a partition replaces an older one not yet sent.
func (l *kafkaLease) commit(group, topic string, id uint64, offsets map[int32]int64) {
	l.kc.queue(group, topic, id, offsets)
}

// queue is commit, for the lease's client; a commit that failed is queued
// again through it.
func (kc *kafkaClient) queue(group, topic string, id uint64, offsets map[int32]int64) {
	kc.mu.Lock()
	defer kc.mu.Unlock()
	byTopic := kc.offsets[group]
	if byTopic == nil {
		byTopic = make(map[string]map[int32]pendingCommit)
		kc.offsets[group] = byTopic
	}
	parts := byTopic[topic]
	if parts == nil {
		parts = make(map[int32]pendingCommit)
		byTopic[topic] = parts
	}
	for p, off := range offsets {
		if cur, ok := parts[p]; !ok || cur.checkpoint <= id {
			parts[p] = pendingCommit{offset: off, checkpoint: id}
		}
	}
}

// release gives the lease back; the last one closes the client, after a
// last offset commit. That runs in the background: the commit is for
// monitoring only, and in a Kafka outage it waits out the client's timeouts
// (a coordinator lookup, then the request), which would hold up the stop of
// the task releasing the lease well past its stop timeout.
func (l *kafkaLease) release() {
	kc := l.kc
	p := kc.pool
	p.mu.Lock()
	last := l.drop()
	var done chan struct{}
	if last {
		done = p.closingOne()
	}
	p.mu.Unlock()
	if !last {
		return
	}
	go func() {
		defer p.closed(done)
		kc.close()
	}()
}

// releaseAfter runs closers (of the lease's partition consumers), then
// releases the lease, in the background: a partition consumer's close can
// wait out the client's timeouts in an outage. Until then the client stays
// in the pool (a task acquiring it meanwhile shares it), and the pool's wait
// waits for it.
func (l *kafkaLease) releaseAfter(closers []func()) {
	if len(closers) == 0 {
		l.release()
		return
	}
	kc := l.kc
	p := kc.pool
	p.mu.Lock()
	done := p.closingOne()
	p.mu.Unlock()
	go func() {
		defer p.closed(done)
		for _, c := range closers {
			c()
		}
		p.mu.Lock()
		last := l.drop()
		p.mu.Unlock()
		if last {
			kc.close()
		}
	}()
}

// drop gives the lease's reference back and reports whether it was the
// last, which takes the client out of the pool; p.mu is held.
func (l *kafkaLease) drop() (last bool) {
	kc := l.kc
	kc.refs--
	if kc.refs > 0 {
		return false
	}
	delete(kc.pool.clients, kc.key)
	kc.pool.noteChange()
	return true
}

// closingOne registers a close in the background, which wait waits for;
// p.mu is held. The caller passes the channel to closed when it is done.
func (p *kafkaPool) closingOne() chan struct{} {
	done := make(chan struct{})
	p.closing = append(p.closing, done)
	p.noteChange()
	return done
}

// closed ends a close registered by closingOne.
func (p *kafkaPool) closed(done chan struct{}) {
	p.mu.Lock()
	p.closing = slices.DeleteFunc(p.closing, func(c chan struct{}) bool { return c == done })
	p.mu.Unlock()
	close(done)
}

// close ends the client's commit loop, which commits once more, and closes
// its consumers and the client.
func (kc *kafkaClient) close() {
	kc.stop()
	<-kc.done
	kc.mu.Lock()
	consumers := kc.consumers
	kc.consumers = nil
	kc.mu.Unlock()
	for _, c := range consumers {
		_ = c.consumer.Close()
	}
	_ = kc.client.Close()
}

// commitLoop sends the queued offsets every OffsetCommitInterval until ctx
// ends, and once more then.
func (kc *kafkaClient) commitLoop(ctx context.Context) {
	defer close(kc.done)
	t := time.NewTicker(kc.pool.cfg.OffsetCommitInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			kc.commitAll()
			return
		case <-t.C:
			kc.commitAll()
		}
	}
}

// commitAll sends one OffsetCommit per group with everything queued for it.
// Failures are logged and counted; the offsets are put back unless a newer
// checkpoint's replaced them meanwhile.
func (kc *kafkaClient) commitAll() {
	kc.mu.Lock()
	queued := kc.offsets
	kc.offsets = make(map[string]map[string]map[int32]pendingCommit)
	kc.mu.Unlock()
	for _, group := range slices.Sorted(maps.Keys(queued)) {
		byTopic := queued[group]
		if err := kc.commitGroup(group, byTopic); err != nil {
			kc.pool.commits.WithLabelValues("failed").Inc()
			kc.pool.log.Warn("commit offsets to Kafka failed (monitoring only)", "group", group, "err", err)
			_ = kc.client.RefreshCoordinator(group)
			for topic, parts := range byTopic {
				for p, pc := range parts {
					kc.queue(group, topic, pc.checkpoint, map[int32]int64{p: pc.offset})
				}
			}
			continue
		}
		kc.pool.commits.WithLabelValues("ok").Inc()
	}
}

// commitGroup commits offsets for group with a standalone OffsetCommit
// (generation -1, as Kafka allows for a group without members) sent to the
// group's coordinator. sarama's OffsetManager is not used: it fetches the
// group's offsets first, which kfake answers with GROUP_ID_NOT_FOUND for a
// group it has never seen.
func (kc *kafkaClient) commitGroup(group string, byTopic map[string]map[int32]pendingCommit) error {
	broker, err := kc.client.Coordinator(group)
	if err != nil {
		return fmt.Errorf("find coordinator of group %q: %w", group, err)
	}
	req := sarama.NewOffsetCommitRequest(kc.client.Config(), group)
	for topic, parts := range byTopic {
		for p, pc := range parts {
			req.AddBlock(topic, p, pc.offset, sarama.ReceiveTime, fmt.Sprintf("coordflow checkpoint %d", pc.checkpoint))
		}
	}
	resp, err := broker.CommitOffset(req)
	if err != nil {
		return fmt.Errorf("offset commit request: %w", err)
	}
	var bad []string
	for topic, parts := range resp.Errors {
		for p, kerr := range parts {
			if kerr != sarama.ErrNoError {
				bad = append(bad, fmt.Sprintf("%s/%d: %v", topic, p, kerr))
			}
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("offset commit rejected: %s", strings.Join(bad, "; "))
	}
	return nil
}
