package integration

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

type brokerProc struct {
	addr    string
	dataDir string
	topics  map[string]int32
	p       *proc
}

func (c *cluster) startBroker(t *testing.T) {
	t.Helper()
	b := &brokerProc{dataDir: filepath.Join(c.dir, "devkafka-data"), topics: c.opts.topics}
	c.broker = b
	pick := func() { b.addr = c.addrs(t, "devkafka", 1)[0] }
	pick()
	b.p = c.launch(t, "devkafka", "devkafka.log", pick, b.argv, brokerReady)
}

func (b *brokerProc) argv() []string {
	args := []string{"-addr", b.addr, "-data-dir", b.dataDir}
	for _, name := range slices.Sorted(maps.Keys(b.topics)) {
		args = append(args, "-topic", fmt.Sprintf("%s:%d", name, b.topics[name]))
	}
	return args
}

// brokerReady waits for the line devkafka prints once it accepts connections.
func brokerReady(p *proc) (bool, error) {
	if strings.Contains(p.output(), "devkafka listening on ") {
		return true, nil
	}
	return false, errors.New(`no "devkafka listening on" line yet`)
}

// brokers returns the bootstrap addresses of devkafka.
func (c *cluster) brokers() []string { return []string{c.broker.addr} }

// killBroker SIGKILLs devkafka.
func (c *cluster) killBroker(t *testing.T) {
	t.Helper()
	if err := c.broker.p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		t.Fatal(err)
	}
}

// stopBroker stops devkafka with SIGTERM and checks that it exits cleanly.
func (c *cluster) stopBroker(t *testing.T) {
	t.Helper()
	p := c.broker.p
	if err := p.signal(syscall.SIGTERM, stopTimeout); err != nil {
		t.Fatal(err)
	}
	if p.err != nil {
		t.Fatalf("devkafka exited with %v after SIGTERM; last lines:\n%s", p.err, tail(p.output(), 20))
	}
}

// restartBroker starts devkafka again on the same address and data dir.
func (c *cluster) restartBroker(t *testing.T) {
	t.Helper()
	c.broker.p = c.launch(t, "devkafka", "devkafka.log", nil, c.broker.argv, brokerReady)
}

// saramaConfig is the client configuration of every Kafka helper.
func saramaConfig() *sarama.Config {
	cfg := sarama.NewConfig()
	cfg.ClientID = "coordflow-integration"
	cfg.Version = sarama.V3_6_0_0
	cfg.Metadata.AllowAutoTopicCreation = false
	cfg.Net.DialTimeout = 5 * time.Second
	cfg.Net.ReadTimeout = 10 * time.Second
	cfg.Net.WriteTimeout = 10 * time.Second
	return cfg
}

// record is one Kafka record to produce. partition < 0 (anyPartition) lets
// the key's hash choose, as sarama's default partitioner does. topic, when
// set, overrides the topic the producer was given (one producer for many
// topics).
type record struct {
	key, value string
	partition  int32
	topic      string
}

const anyPartition = -1

// recordPartitioner sends a message to its explicit partition if it has one,
// else by key hash.
type recordPartitioner struct{ hash sarama.Partitioner }

func (r recordPartitioner) Partition(m *sarama.ProducerMessage, n int32) (int32, error) {
	if m.Partition < 0 {
		return r.hash.Partition(m, n)
	}
	if m.Partition >= n {
		return 0, fmt.Errorf("partition %d of topic %s with %d partitions", m.Partition, m.Topic, n)
	}
	return m.Partition, nil
}

func (recordPartitioner) RequiresConsistency() bool { return true }

// produce writes recs to topic with an idempotent producer, so that every
// record lands exactly once, and fails the test on any error.
func produce(t *testing.T, brokers []string, topic string, recs []record) {
	t.Helper()
	if err := produceRecords(context.Background(), brokers, topic, recs, 0); err != nil {
		t.Fatal(err)
	}
}

// produceInBackground produces recs in a goroutine at about perSecond records
// a second, so that input keeps arriving while a scenario kills processes.
// The returned wait blocks until all are produced and fails the test on an
// error; the goroutine is stopped when the test ends in any case.
func produceInBackground(t *testing.T, brokers []string, topic string, recs []record, perSecond int) (wait func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- produceRecords(ctx, brokers, topic, recs, perSecond) }()
	var once sync.Once
	var err error
	finish := func(timeout time.Duration) error {
		once.Do(func() {
			select {
			case err = <-done:
			case <-time.After(timeout):
				cancel()
				err = fmt.Errorf("background producer to %s: not done after %v", topic, timeout)
				<-done
			}
			cancel()
		})
		return err
	}
	t.Cleanup(func() { cancel(); _ = finish(stopTimeout) })
	budget := 2 * time.Minute
	if perSecond > 0 {
		budget += time.Duration(len(recs)/perSecond) * time.Second
	}
	return func() {
		t.Helper()
		if err := finish(budget); err != nil {
			t.Fatal(err)
		}
	}
}

// idempotentProducer is the producer every test input goes through:
// idempotent, every record acknowledged by all replicas, so that each lands
// exactly once; partitioner places the records.
func idempotentProducer(brokers []string, partitioner sarama.PartitionerConstructor) (sarama.SyncProducer, error) {
	cfg := saramaConfig()
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Idempotent = true
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Return.Successes = true
	cfg.Producer.Flush.Messages = 1000
	cfg.Producer.Flush.Frequency = 5 * time.Millisecond
	cfg.Producer.Partitioner = partitioner
	return sarama.NewSyncProducer(brokers, cfg)
}

// produceRecords writes recs with an idempotent producer in chunks; with
// perSecond > 0 it paces the chunks to about that rate.
func produceRecords(ctx context.Context, brokers []string, topic string, recs []record, perSecond int) error {
	p, err := idempotentProducer(brokers, func(string) sarama.Partitioner {
		return recordPartitioner{hash: sarama.NewHashPartitioner("")}
	})
	if err != nil {
		return fmt.Errorf("produce to %s: new producer: %w", topic, err)
	}
	defer p.Close()
	const tick = 50 * time.Millisecond
	chunk := 20000
	var pace <-chan time.Time
	if perSecond > 0 {
		chunk = max(1, perSecond*int(tick/time.Millisecond)/1000)
		ticker := time.NewTicker(tick)
		defer ticker.Stop()
		pace = ticker.C
	}
	msgs := make([]*sarama.ProducerMessage, 0, chunk)
	for start := 0; start < len(recs); start += chunk {
		if pace != nil && start > 0 {
			select {
			case <-pace:
			case <-ctx.Done():
				return fmt.Errorf("produce to %s: stopped after %d of %d records: %w", topic, start, len(recs), ctx.Err())
			}
		}
		msgs = msgs[:0]
		for _, r := range recs[start:min(start+chunk, len(recs))] {
			m := &sarama.ProducerMessage{Topic: cmp.Or(r.topic, topic), Partition: r.partition, Value: sarama.StringEncoder(r.value)}
			if r.key != "" {
				m.Key = sarama.StringEncoder(r.key)
			}
			msgs = append(msgs, m)
		}
		if err := p.SendMessages(msgs); err != nil {
			var perrs sarama.ProducerErrors
			if errors.As(err, &perrs) && len(perrs) > 0 {
				return fmt.Errorf("produce to %s: %d of %d records failed, first: %w", topic, len(perrs), len(msgs), perrs[0].Err)
			}
			return fmt.Errorf("produce to %s: %w", topic, err)
		}
	}
	return nil
}

// topicEndOffsets returns the end offset (next offset to be written) of
// every partition of topic.
func topicEndOffsets(t *testing.T, brokers []string, topic string) map[int32]int64 {
	t.Helper()
	cl, err := sarama.NewClient(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("end offsets of %s: %v", topic, err)
	}
	defer cl.Close()
	parts, err := cl.Partitions(topic)
	if err != nil {
		t.Fatalf("end offsets of %s: partitions: %v", topic, err)
	}
	end := make(map[int32]int64, len(parts))
	for _, p := range parts {
		if end[p], err = cl.GetOffset(topic, p, sarama.OffsetNewest); err != nil {
			t.Fatalf("end offset of %s/%d: %v", topic, p, err)
		}
	}
	return end
}

// deleteTopic deletes topic from the brokers.
func deleteTopic(t *testing.T, brokers []string, topic string) {
	t.Helper()
	adm, err := sarama.NewClusterAdmin(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("delete topic %s: %v", topic, err)
	}
	defer adm.Close()
	if err := adm.DeleteTopic(topic); err != nil {
		t.Fatalf("delete topic %s: %v", topic, err)
	}
	t.Logf("deleted topic %s", topic)
}

// createTopic creates topic with the given number of partitions.
func createTopic(t *testing.T, brokers []string, topic string, partitions int32) {
	t.Helper()
	adm, err := sarama.NewClusterAdmin(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("create topic %s: %v", topic, err)
	}
	defer adm.Close()
	if err := adm.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: partitions, ReplicationFactor: 1}, false); err != nil {
		t.Fatalf("create topic %s: %v", topic, err)
	}
	t.Logf("created topic %s with %d partitions", topic, partitions)
}

// sumOffsets adds up offsets by partition (topicEndOffsets) or by
// "topic/partition" (job state): the record count below them, as every topic
// here starts at offset 0.
func sumOffsets[K comparable](m map[K]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// readTopic reads every record of every partition of topic, from the oldest
// offset to the end offset at the time of the call, and returns the values by
// partition, in offset order.
func readTopic(t *testing.T, brokers []string, topic string) map[int32][]string {
	t.Helper()
	out := make(map[int32][]string)
	for p, recs := range readTopicRecords(t, brokers, topic) {
		out[p] = make([]string, len(recs))
		for i, r := range recs {
			out[p][i] = r.value
		}
	}
	return out
}

// readTopicRecords is readTopic with the records' keys: it returns the
// records of every partition in offset order.
func readTopicRecords(t *testing.T, brokers []string, topic string) map[int32][]record {
	t.Helper()
	end := topicEndOffsets(t, brokers, topic)
	cons, err := sarama.NewConsumer(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("read %s: new consumer: %v", topic, err)
	}
	defer cons.Close()
	out := make(map[int32][]record, len(end))
	for p, last := range end {
		out[p] = []record{}
		if last == 0 {
			continue
		}
		pc, err := cons.ConsumePartition(topic, p, sarama.OffsetOldest)
		if err != nil {
			t.Fatalf("read %s/%d: %v", topic, p, err)
		}
		timeout := time.After(30 * time.Second)
		for int64(len(out[p])) < last {
			select {
			case m := <-pc.Messages():
				if m.Offset != int64(len(out[p])) {
					t.Fatalf("read %s/%d: got offset %d after %d records", topic, p, m.Offset, len(out[p]))
				}
				out[p] = append(out[p], record{key: string(m.Key), value: string(m.Value), partition: p})
			case err := <-pc.Errors():
				t.Fatalf("read %s/%d: %v", topic, p, err)
			case <-timeout:
				t.Fatalf("read %s/%d: %d of %d records after 30s", topic, p, len(out[p]), last)
			}
		}
		pc.Close()
	}
	return out
}

// consumeGroup joins consumer group group on topic, reads n records, marks
// them consumed, commits synchronously and leaves the group. It returns the
// values read.
func consumeGroup(t *testing.T, brokers []string, group, topic string, n int) []string {
	t.Helper()
	cfg := saramaConfig()
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Consumer.Offsets.AutoCommit.Enable = false
	cfg.Consumer.Return.Errors = true
	cg, err := sarama.NewConsumerGroup(brokers, group, cfg)
	if err != nil {
		t.Fatalf("consumer group %s: %v", group, err)
	}
	defer cg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h := &groupHandler{want: n, done: cancel}
	go func() {
		for err := range cg.Errors() {
			t.Logf("consumer group %s: %v", group, err)
		}
	}()
	for ctx.Err() == nil {
		if err := cg.Consume(ctx, []string{topic}, h); err != nil && ctx.Err() == nil {
			t.Fatalf("consumer group %s: %v", group, err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.values) < n || !h.committed {
		t.Fatalf("consumer group %s: read %d of %d records (committed: %v) in 60s", group, len(h.values), n, h.committed)
	}
	return h.values
}

// groupHandler reads until it has want records, then commits and ends the
// session through done.
type groupHandler struct {
	want      int
	done      func()
	mu        sync.Mutex
	values    []string
	committed bool
}

func (h *groupHandler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *groupHandler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (h *groupHandler) ConsumeClaim(sess sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for {
		select {
		case m, ok := <-claim.Messages():
			if !ok {
				return nil
			}
			sess.MarkMessage(m, "")
			h.mu.Lock()
			h.values = append(h.values, string(m.Value))
			full := len(h.values) >= h.want && !h.committed
			if full {
				sess.Commit()
				h.committed = true
			}
			h.mu.Unlock()
			if full {
				h.done()
			}
		case <-sess.Context().Done():
			return nil
		}
	}
}

// committedOffsets returns group's committed offset for every partition of
// topic (-1 where it has none).
func committedOffsets(t *testing.T, brokers []string, group, topic string) map[int32]int64 {
	t.Helper()
	cl, err := sarama.NewClient(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	defer cl.Close()
	adm, err := sarama.NewClusterAdminFromClient(cl)
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	parts, err := cl.Partitions(topic)
	if err != nil {
		t.Fatalf("committed offsets of %s: partitions of %s: %v", group, topic, err)
	}
	resp, err := adm.ListConsumerGroupOffsets(group, map[string][]int32{topic: parts})
	if err != nil {
		t.Fatalf("committed offsets of %s: %v", group, err)
	}
	out := make(map[int32]int64, len(parts))
	for _, p := range parts {
		b := resp.GetBlock(topic, p)
		if b == nil {
			t.Fatalf("committed offsets of %s: no answer for %s/%d", group, topic, p)
		}
		if b.Err != sarama.ErrNoError {
			t.Fatalf("committed offsets of %s: %s/%d: %v", group, topic, p, b.Err)
		}
		out[p] = b.Offset
	}
	return out
}
