package worker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// fakeOutput is an output that keeps a copy of every message sent on it, and
// fails every send once broken is set.
type fakeOutput struct {
	mu     sync.Mutex
	msgs   []*transport.DataMessage
	broken error
	closed bool
}

func (f *fakeOutput) send(_ context.Context, msg *transport.DataMessage) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken != nil {
		return f.broken
	}
	f.msgs = append(f.msgs, msg)
	return nil
}

func (f *fakeOutput) sendBatch(ctx context.Context, w *transport.BatchWriter) error {
	packed := slices.Clone(w.Bytes())
	w.Reset()
	return f.send(ctx, batchMessage(packed))
}

func (f *fakeOutput) close() {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
}

func (f *fakeOutput) breakWith(err error) {
	f.mu.Lock()
	f.broken = err
	f.mu.Unlock()
}

// sentItem is one item decoded from a packed batch, with the record mark it
// came after (p, off; -1 without one) and the batch it was in.
type sentItem struct {
	p     int32
	off   int64
	kg    int32
	key   string
	num   int64
	batch int
}

// sentBatches decodes the batches sent on f: their items, their through marks
// (partition -> offset, per batch) and the number of barriers.
type sentBatches struct {
	items    []sentItem
	through  []map[int32]int64
	marks    int // record marks seen
	barriers int
}

// decoder is a transport.BatchVisitor that appends to a sentBatches.
type decoder struct {
	out   *sentBatches
	batch int
	p     int32
	off   int64
}

func (d *decoder) Record(p int32, off int64) error {
	d.p, d.off = p, off
	d.out.marks++
	return nil
}

func (d *decoder) Through(p int32, off int64) error {
	d.out.through[d.batch][p] = off
	return nil
}

func (d *decoder) Item(it *transport.BatchItem) error {
	d.out.items = append(d.out.items, sentItem{p: d.p, off: d.off, kg: it.KeyGroup, key: string(it.Key), num: it.Num, batch: d.batch})
	return nil
}

func (f *fakeOutput) decode(t *testing.T) sentBatches {
	t.Helper()
	f.mu.Lock()
	msgs := slices.Clone(f.msgs)
	f.mu.Unlock()
	var out sentBatches
	for _, m := range msgs {
		if m.GetBarrier() != nil {
			out.barriers++
			continue
		}
		d := &decoder{out: &out, batch: len(out.through), p: -1, off: -1}
		out.through = append(out.through, map[int32]int64{})
		if err := transport.ReadBatch(m.GetBatch().GetPacked(), d); err != nil {
			t.Fatalf("decode batch %d: %v", d.batch, err)
		}
	}
	return out
}

// testMapRefs are n map tasks over maxPar key groups, all on worker "w9"
// (none runs here: the tests give the source fake outputs).
func testMapRefs(maxPar, n int) []*transport.MapTaskRef {
	var refs []*transport.MapTaskRef
	for i, r := range fsm.KeyGroupRanges(maxPar, n) {
		refs = append(refs, &transport.MapTaskRef{
			TaskId: fmt.Sprintf("map-%d", i), Index: int32(i), WorkerId: "w9", DataAddr: "127.0.0.1:1",
			KeyGroupStart: int32(r.Start), KeyGroupEnd: int32(r.End),
		})
	}
	return refs
}

// newTestSource builds a source task of job "job" attempt 1 on a worker
// "w1" that has no map tasks, sending to fake outputs. It leases the Kafka
// client of brokers (if any), resolves its offsets and begins the catch-up
// as run does.
func newTestSource(t *testing.T, d *transport.DeployTask, ctl <-chan control, tune func(*Config)) (*sourceTask, []*fakeOutput, *kafkaLease) {
	t.Helper()
	s, fakes, lease := newResolvedSource(t, d, ctl, tune)
	if lease != nil {
		if err := s.beginCatchUp(lease.client); err != nil {
			t.Fatal(err)
		}
	}
	return s, fakes, lease
}

// newResolvedSource is newTestSource up to the catch-up, which run begins
// once the outputs are open (beginCatchUp).
func newResolvedSource(t *testing.T, d *transport.DeployTask, ctl <-chan control, tune func(*Config)) (*sourceTask, []*fakeOutput, *kafkaLease) {
	t.Helper()
	cfg := Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", KafkaTimeout: 2 * time.Second, OffsetCommitInterval: time.Hour, StateDir: t.TempDir()}
	if tune != nil {
		tune(&cfg)
	}
	cfg = defaultedConfig(t, cfg)
	log := testLogger(t)
	m := newMetrics()
	env := &taskEnv{
		workerID: "w1", cfg: &cfg, logger: log, metrics: m, operators: operator.Builtins(),
		send: func(*transport.WorkerMessage) {}, kafka: newKafkaPool(&cfg, "w1", log, m),
	}
	s, err := newSourceTask(env, d, ctl, log.With("task", d.GetTask().GetTaskId()))
	if err != nil {
		t.Fatal(err)
	}
	var fakes []*fakeOutput
	for range s.mapTasks {
		f := &fakeOutput{}
		fakes = append(fakes, f)
		s.outputs = append(s.outputs, f)
	}
	if brokers := d.GetSource().GetBrokers(); len(brokers) > 0 {
		lease, parts, err := env.kafka.acquire(brokers, s.isolation(), d.GetSource().GetTopic(), "source")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(lease.release)
		if err := s.resolveOffsets(lease.client, parts); err != nil {
			t.Fatal(err)
		}
		maps.Copy(s.startOffsets, s.offsets)
		return s, fakes, lease
	}
	return s, fakes, nil
}

// wordRecords are n records of 1 to 5 words out of 40, spread round robin
// over parts partitions; byPartition returns their values by partition in
// offset order.
func wordRecords(n int, parts int32) (recs []record, byPartition map[int32][]string) {
	byPartition = map[int32][]string{}
	for i := range n {
		var words []string
		for j := range 1 + i%5 {
			words = append(words, fmt.Sprintf("w%d", (i*7+j*13)%40))
		}
		p := int32(i) % parts
		v := strings.Join(words, " ")
		recs = append(recs, record{partition: p, value: v})
		byPartition[p] = append(byPartition[p], v)
	}
	return recs, byPartition
}

// wantItems is what output o of s must get for the records of values (by
// partition, offset order) in [from[p], to[p]): every word routed to o, after
// the mark of its record.
func wantItems(s *sourceTask, o int, values map[int32][]string, from, to map[int32]int64) []sentItem {
	var want []sentItem
	for _, p := range slices.Sorted(maps.Keys(values)) {
		for off := from[p]; off < to[p]; off++ {
			for _, w := range strings.Fields(values[p][off]) {
				kg := operator.KeyGroup([]byte(w), s.maxPar)
				if s.route[kg] == o {
					want = append(want, sentItem{p: p, off: off, kg: kg, key: w, num: 1})
				}
			}
		}
	}
	return want
}

// sameItems compares items without their batch numbers, and with the
// partitions apart: each partition's items must come in its order, but a
// replay reads the partitions at once and interleaves their records.
func sameItems(got, want []sentItem) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d items, want %d", len(got), len(want))
	}
	got = slices.Clone(got)
	last := map[int32]int64{}
	for i := range got {
		g := &got[i]
		if off, ok := last[g.p]; ok && g.off < off {
			return fmt.Errorf("item %d, of record %d/%d, comes after one of record %d/%d", i, g.p, g.off, g.p, off)
		}
		last[g.p] = g.off
		g.batch = 0
	}
	slices.SortStableFunc(got, func(a, b sentItem) int { return cmp.Compare(a.p, b.p) })
	for i := range got {
		if got[i] != want[i] {
			return fmt.Errorf("item %d of the items sorted by partition is %+v, want %+v", i, got[i], want[i])
		}
	}
	return nil
}

// checkWholeRecords fails unless every record's items are in one batch, and
// every batch ends with whole records within size items (a record alone may
// exceed it).
func checkWholeRecords(t *testing.T, what string, items []sentItem, size int) {
	t.Helper()
	type rec struct {
		p   int32
		off int64
	}
	batchOf := map[rec]int{}
	perBatch := map[int]int{}
	recsPerBatch := map[int]int{}
	for _, it := range items {
		r := rec{it.p, it.off}
		if b, ok := batchOf[r]; ok && b != it.batch {
			t.Fatalf("%s: record %d/%d is cut across batches %d and %d", what, it.p, it.off, b, it.batch)
		} else if !ok {
			batchOf[r] = it.batch
			recsPerBatch[it.batch]++
		}
		perBatch[it.batch]++
	}
	for b, n := range perBatch {
		// A batch is sent once it holds size items: only its last record
		// may take it past that.
		if n > size+4 && recsPerBatch[b] > 1 {
			t.Fatalf("%s: batch %d holds %d items of %d records, more than a record beyond the batch size %d", what, b, n, recsPerBatch[b], size)
		}
	}
}

func wordSourceDeploy(brokers []string, topic string, parts []int32, mapTasks int) *transport.DeployTask {
	d := sourceDeploy("job", 1, 0, operator.WordCount, brokers, topic, parts, testMapRefs(128, mapTasks))
	d.NumSources = 1
	return d
}

// TestReplayFiltersByKeyGroup: replaying output o sends exactly the items of
// the records in [start, end) of every partition whose key group is o's, each
// after its record's mark, in whole records per batch, and nothing else: not
// the other outputs' items, not the records before start or from end on
// (written to the topic already). The start is the retarget's restore
// offsets when given, else the last completed checkpoint's, else where the
// attempt started.
func TestReplayFiltersByKeyGroup(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	recs, values := wordRecords(80, 2)
	produce(t, brokers, "words", recs)
	s, fakes, _ := newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0, 1}, 3), nil, func(c *Config) { c.BatchSize = 6 })
	// The source has read up to these offsets; the topic has 40 records in
	// each partition.
	s.offsets = map[int32]int64{0: 31, 1: 27}
	ctx := context.Background()

	from := map[int32]int64{0: 5, 1: 2}
	if err := s.replay(ctx, 1, from); err != nil {
		t.Fatal(err)
	}
	got := fakes[1].decode(t)
	if err := sameItems(got.items, wantItems(s, 1, values, from, s.offsets)); err != nil {
		t.Fatalf("replay from the restore offsets: %v", err)
	}
	checkWholeRecords(t, "replay", got.items, 6)
	for _, th := range got.through {
		if len(th) > 0 {
			t.Fatalf("a replay sent through marks %v: its batches are record-marked only", th)
		}
	}
	if got.marks != distinctRecords(got.items) {
		t.Fatalf("%d record marks for the items of %d records: one per record and batch, none without items", got.marks, distinctRecords(got.items))
	}
	for _, o := range []int{0, 2} {
		if n := len(fakes[o].decode(t).items); n != 0 {
			t.Fatalf("replay to output 1 sent %d items to output %d", n, o)
		}
	}

	// Without a retarget: partition 0 from the last completed checkpoint,
	// partition 1 (none completed) from where the attempt started.
	fakes[2].msgs = nil
	s.completedOffsets = map[int32]int64{0: 12}
	s.startOffsets = map[int32]int64{0: 0, 1: 9}
	if err := s.replay(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}
	if err := sameItems(fakes[2].decode(t).items, wantItems(s, 2, values, map[int32]int64{0: 12, 1: 9}, s.offsets)); err != nil {
		t.Fatalf("replay from the completed checkpoint and the start offsets: %v", err)
	}

	// Records no longer in Kafka: the replay fails, saying so.
	deleteRecords(t, brokers, "words", map[int32]int64{0: 20})
	err := s.replay(ctx, 0, map[int32]int64{0: 10, 1: 0})
	if err == nil || !strings.Contains(err.Error(), "replay to map task map-0: records of words/0 from offset 10 are no longer in Kafka") {
		t.Fatalf("replay from a deleted offset: %v, want an error saying the records are gone", err)
	}
}

func distinctRecords(items []sentItem) int {
	type rec struct {
		p     int32
		off   int64
		batch int
	}
	seen := map[rec]bool{}
	for _, it := range items {
		seen[rec{it.p, it.off, it.batch}] = true
	}
	return len(seen)
}

// deleteRecords deletes the records of topic below offsets, as retention
// does.
func deleteRecords(t *testing.T, brokers []string, topic string, offsets map[int32]int64) {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	admin, err := sarama.NewClusterAdmin(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if err := admin.DeleteRecords(topic, offsets); err != nil {
		t.Fatalf("delete records: %v", err)
	}
}

// TestPartialSourceFailsWhenItsOffsetIsGone: a source restored by task-scoped
// recovery whose checkpoint offset is no longer in Kafka (expired, or beyond
// the end of a recreated topic) fails with a reason that says so, instead of
// reading from its start policy as a whole-job restore does.
func TestPartialSourceFailsWhenItsOffsetIsGone(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, _ := wordRecords(30, 1)
	produce(t, brokers, "words", recs)
	deleteRecords(t, brokers, "words", map[int32]int64{0: 10})
	for _, tc := range []struct {
		restored int64
		want     string
	}{
		{4, "task-scoped recovery of source task source-0: checkpoint 7's offset 4 of words/0 is no longer in Kafka (oldest 10, end 30)"},
		{45, "task-scoped recovery of source task source-0: checkpoint 7's offset 45 of words/0 is no longer in Kafka (oldest 10, end 30)"},
	} {
		d := wordSourceDeploy(nil, "words", []int32{0}, 2)
		d.RestoreOffsets, d.RestoreCheckpointId, d.Partial = map[int32]int64{0: tc.restored}, 7, true
		s, _, _ := newTestSource(t, d, nil, nil)
		err := resolveOn(t, s, brokers, nil)
		if err == nil || err.Error() != tc.want {
			t.Fatalf("partial source restored at %d: %v, want %q", tc.restored, err, tc.want)
		}

		// Not partial: the start policy, as before.
		d.Partial = false
		s, _, _ = newTestSource(t, d, nil, nil)
		if err := resolveOn(t, s, brokers, nil); err != nil || s.offsets[0] != 10 {
			t.Fatalf("whole-job restore at %d: %v, offset %d; want the earliest offset 10", tc.restored, err, s.offsets[0])
		}
	}
}

// TestPartialSourceFailsOnAPartitionItsCheckpointLacks: a source restored by
// task-scoped recovery that finds a partition its checkpoint does not name
// (its predecessor may have found it, and surviving map tasks applied its
// records) fails, combining or not, and the whole job restarts: combined,
// its batches carry no record marks to drop those records by, and marked,
// the map tasks would decline checkpoints until it had read past them.
// Restored with the whole job, it reads the partition from its start.
func TestPartialSourceFailsOnAPartitionItsCheckpointLacks(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	recs, _ := wordRecords(30, 2)
	produce(t, brokers, "words", recs)
	for _, tc := range []struct {
		name             string
		combine, partial bool
		fails            bool
	}{
		{"partial, combining", true, true, true},
		{"partial, not combining", false, true, true},
		{"whole-job restore, combining", true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := wordSourceDeploy(brokers, "words", []int32{0}, 1) // S = 1: it owns partition 1 too
			d.Combine, d.Partial, d.RestoreOffsets, d.RestoreCheckpointId = tc.combine, tc.partial, map[int32]int64{0: 4}, 3
			s, _, lease := newTestSource(t, d, nil, nil)
			if slices.Contains(s.partitions, 1) {
				t.Fatalf("partitions at the start %v: without discovery, want 0 alone", s.partitions)
			}
			ctx, stop := context.WithCancel(context.Background())
			r := &partitionReaders{ctx: ctx, lease: lease, merged: make(chan []*sarama.ConsumerMessage, 16),
				failed: make(chan error, 1), consumers: make(map[int32]sarama.PartitionConsumer)}
			defer func() {
				stop()
				r.wg.Wait()
				for _, c := range r.closers {
					c()
				}
			}()
			pc, closePC, err := lease.consume("words", 1, sarama.OffsetOldest)
			if err != nil {
				t.Fatal(err)
			}
			err = s.readDiscovered(r, []discovered{{partition: 1, offset: 0, pc: pc, closePC: closePC}})
			switch {
			case tc.fails && (err == nil || !strings.Contains(err.Error(), "found partition 1 of words, which the checkpoint this source was restored from (task-scoped recovery) does not name")):
				t.Fatalf("readDiscovered: %v, want the task failed naming partition 1", err)
			case !tc.fails && (err != nil || s.offsets[1] != 0):
				t.Fatalf("readDiscovered: %v, offsets %v; want partition 1 read from 0", err, s.offsets)
			}
		})
	}
}

// resolveOn resolves s's offsets with a Kafka client of brokers, as the
// task's start does, the topic listing partitions parts (nil: what the
// brokers list).
func resolveOn(t *testing.T, s *sourceTask, brokers []string, parts []int32) error {
	t.Helper()
	lease, listed, err := s.env.kafka.acquire(brokers, sarama.ReadUncommitted, s.spec.GetTopic(), "source")
	if err != nil {
		t.Fatal(err)
	}
	defer lease.release()
	if parts == nil {
		parts = listed
	}
	return s.resolveOffsets(lease.client, parts)
}

// consumerMessages are the records of values (one partition) as the pumps
// hand them to process, from offset from.
func consumerMessages(p int32, values []string, from int) []*sarama.ConsumerMessage {
	var msgs []*sarama.ConsumerMessage
	for off := from; off < len(values); off++ {
		msgs = append(msgs, &sarama.ConsumerMessage{Topic: "words", Partition: p, Offset: int64(off), Value: []byte(values[off])})
	}
	return msgs
}

// TestBatchesHoldWholeRecords: a batch is sent once full, but only after the
// last item of the record that filled it, so no record is cut across two
// batches (a map task marks a record applied with its batch).
func TestBatchesHoldWholeRecords(t *testing.T) {
	_, values := wordRecords(200, 1)
	s, fakes, _ := newTestSource(t, wordSourceDeploy(nil, "words", []int32{0}, 2), nil, func(c *Config) { c.BatchSize = 3 })
	ctx := context.Background()
	for _, msg := range consumerMessages(0, values[0], 0) {
		if err := s.process(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.flushAll(ctx); err != nil {
		t.Fatal(err)
	}
	all := map[int32]int64{0: int64(len(values[0]))}
	for o, f := range fakes {
		got := f.decode(t)
		if err := sameItems(got.items, wantItems(s, o, values, map[int32]int64{}, all)); err != nil {
			t.Fatalf("output %d: %v", o, err)
		}
		checkWholeRecords(t, fmt.Sprintf("output %d", o), got.items, 3)
		if len(got.through) < 20 {
			t.Fatalf("output %d got %d batches: the batch size was not applied", o, len(got.through))
		}
	}
	if s.batched != 0 {
		t.Fatalf("%d items counted as waiting after a flush of everything", s.batched)
	}
}

// TestPartialSourceCombinesOnceCaughtUp: a restored partial source of a
// combining job sends record-marked items (which surviving map tasks can
// drop one by one) until it has read past the end offsets the partitions
// had when it started; then it combines, with through marks.
func TestPartialSourceCombinesOnceCaughtUp(t *testing.T) {
	s, fakes, d, values := restoredWordSource(t)
	if s.catchUp[0] != 30 || s.batches[0].table != nil {
		t.Fatalf("partial source: catch-up %v, combining %v; want catch-up to 30, not combining", s.catchUp, s.batches[0].table != nil)
	}
	more, _ := wordRecords(40, 1) // offsets 30-39 come after the start
	ctx := context.Background()
	for _, msg := range consumerMessages(0, append(values[0], recordValues(more[30:])...), 4) {
		if err := s.process(ctx, msg); err != nil {
			t.Fatal(err)
		}
		if msg.Offset == 28 && s.batches[0].table != nil {
			t.Fatal("combining before the end offset of the start was read")
		}
	}
	if err := s.flushAll(ctx); err != nil {
		t.Fatal(err)
	}
	got := fakes[0].decode(t)
	if err := sameItems(marked(got.items), wantItems(s, 0, values, map[int32]int64{0: 4}, map[int32]int64{0: 30})); err != nil {
		t.Fatalf("record-marked items of the catch-up: %v", err)
	}
	last := got.through[len(got.through)-1]
	if last[0] != 39 {
		t.Fatalf("last batch's through mark %v, want 0: 39 (combined after catching up)", last)
	}
	if n := len(got.items) - len(marked(got.items)); n == 0 {
		t.Fatal("no combined items after catching up")
	}

	// Without combining too, a partial source catches up, and holds a
	// checkpoint trigger until then: its barrier and ack name offsets past
	// whatever its predecessor may have sent.
	d.Combine = false
	s, fakes, _ = newTestSource(t, d, nil, nil)
	var acks []*transport.CheckpointAck
	s.env.send = func(m *transport.WorkerMessage) {
		if a := m.GetAck(); a != nil {
			acks = append(acks, a)
		}
	}
	if s.catchUp[0] != 30 {
		t.Fatalf("partial source without combining: catch-up %v, want to 30", s.catchUp)
	}
	if err := s.trigger(ctx, control{trigger: 7}); err != nil {
		t.Fatal(err)
	}
	for _, msg := range consumerMessages(0, values[0], 4) {
		if msg.Offset == 29 && len(acks) > 0 {
			t.Fatalf("checkpoint acked at offsets %v, before the source caught up", acks[0].GetState().GetOffsets())
		}
		if err := s.process(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	if len(acks) != 1 || acks[0].GetCheckpointId() != 7 || acks[0].GetState().GetOffsets()[0] != 30 {
		t.Fatalf("acks %v, want checkpoint 7 at offset 30 once caught up", acks)
	}
	var barrier *transport.Barrier
	for _, m := range fakes[0].msgs {
		if b := m.GetBarrier(); b != nil {
			barrier = b
		}
	}
	if barrier.GetCheckpointId() != 7 || barrier.GetOffsets()[0] != 30 {
		t.Fatalf("barrier %v, want checkpoint 7 with next offset 30", barrier)
	}

	// Not partial: combining from the start.
	d.Combine, d.Partial = true, false
	s, _, _ = newTestSource(t, d, nil, nil)
	if s.catchUp != nil || s.batches[0].table == nil {
		t.Fatalf("whole-job restore: catch-up %v, combining %v; want none and combining", s.catchUp, s.batches[0].table != nil)
	}
}

// restoredWordSource starts a restored partial source of a combining job
// (task-scoped recovery) over 30 word records in one partition, at offset 4
// of checkpoint 3: it has to catch up to offset 30. It returns the source,
// its outputs, its deploy and the records' values by partition.
func restoredWordSource(t *testing.T) (*sourceTask, []*fakeOutput, *transport.DeployTask, map[int32][]string) {
	t.Helper()
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, values := wordRecords(30, 1)
	produce(t, brokers, "words", recs)
	d := wordSourceDeploy(brokers, "words", []int32{0}, 1)
	d.Combine, d.Partial, d.RestoreOffsets, d.RestoreCheckpointId = true, true, map[int32]int64{0: 4}, 3
	s, fakes, _ := newTestSource(t, d, nil, nil)
	return s, fakes, d, values
}

func recordValues(recs []record) []string {
	var vs []string
	for _, r := range recs {
		vs = append(vs, r.value)
	}
	return vs
}

// marked returns the items that came after a record mark in their batch
// (decoded with off >= 0 and in a batch without through marks).
func marked(items []sentItem) []sentItem {
	var out []sentItem
	for _, it := range items {
		if it.off >= 0 {
			out = append(out, it)
		}
	}
	return out
}

// runSourceLoop starts the task loop of s on its partitions as run does,
// and returns a channel with its result.
func runSourceLoop(t *testing.T, ctx context.Context, s *sourceTask, lease *kafkaLease) <-chan error {
	t.Helper()
	loopCtx, stop := context.WithCancel(ctx)
	r := &partitionReaders{
		ctx: loopCtx, lease: lease,
		merged: make(chan []*sarama.ConsumerMessage), failed: make(chan error, 1),
		consumers: make(map[int32]sarama.PartitionConsumer),
	}
	for _, p := range s.partitions {
		if err := s.read(r, p); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() {
		err := s.loop(ctx, r, nil)
		stop()
		r.wg.Wait()
		for _, c := range r.closers {
			c()
		}
		done <- err
	}()
	return done
}

// TestLostOutputReopensAndReplays: a source whose channel to one map task
// breaks keeps feeding the other; it reopens the lost channel and replays to
// it, before the live stream, the items of its key groups it may have
// missed, so that it gets every item exactly once; a retarget (the map task
// restored elsewhere) reopens it again with a replay from the restore
// offsets. An output not reopened within OutputLostTimeout fails the task.
func TestLostOutputReopensAndReplays(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, values := wordRecords(150, 1)
	produce(t, brokers, "words", recs[:50])
	ctl := make(chan control, 4)
	s, fakes, lease := newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0}, 2), ctl, func(c *Config) {
		c.BatchSize = 8
		c.OutputLostTimeout = 20 * time.Second
	})
	rig := &reopenRig{refuse: errors.New("map task not there yet")}
	s.dial = rig.dial
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runSourceLoop(t, ctx, s, lease)

	upTo := func(f *fakeOutput, o int, n int64, from int64) func() bool {
		return hasItems(t, s, values, f, o, from, n)
	}
	waitFor(t, "both outputs to get the first 50 records", func() bool { return upTo(fakes[0], 0, 50, 0)() && upTo(fakes[1], 1, 50, 0)() })

	// Output 1 breaks; output 0 goes on.
	fakes[1].breakWith(errors.New("stream broken"))
	produce(t, brokers, "words", recs[50:100])
	waitFor(t, "output 0 to get 100 records while output 1 is lost", upTo(fakes[0], 0, 100, 0))
	waitFor(t, "tries to reopen output 1", func() bool { return rig.dials.Load() >= 2 })
	f1 := fakes[1].decode(t)
	if !fakes[1].isClosed() {
		t.Fatal("the broken output was not closed")
	}

	// Reopened: the replay (from where the attempt started: no checkpoint
	// completed) and then the live records, each item once.
	reopened := &fakeOutput{}
	rig.open.Store(reopened)
	produce(t, brokers, "words", recs[100:120])
	waitFor(t, "the reopened output 1 to get every record up to 120", upTo(reopened, 1, 120, 0))
	if len(f1.items) == 0 {
		t.Fatal("output 1 got nothing before it broke")
	}

	// A retarget moves map-1 to another worker in attempt 2, restored from
	// a checkpoint at offset 37: the new channel gets a replay from there.
	restored := &fakeOutput{}
	rig.open.Store(restored)
	refs := testMapRefs(128, 2)
	refs[1].WorkerId, refs[1].DataAddr, refs[1].Attempt = "w7", "127.0.0.1:2", 2
	ctl <- control{retarget: &transport.RetargetTasks{JobId: "job", Attempt: 2, MapTasks: refs, Restored: []string{"map-1"},
		RestoreCheckpointId: 4, RestoreOffsets: map[int32]int64{0: 37}}}
	produce(t, brokers, "words", recs[120:150])
	waitFor(t, "the restored map-1 to get records 37 to 150", upTo(restored, 1, 150, 37))
	waitFor(t, "output 0 to get all 150 records", upTo(fakes[0], 0, 150, 0))
	if !reopened.isClosed() {
		t.Fatal("the retargeted output's old channel was not closed")
	}
	stopLoop(t, cancel, done)
	if got := s.header(s.mapTasks[1]); got.GetAttempt() != 2 || got.GetSourceAttempt() != 1 || got.GetMapTaskId() != "map-1" {
		t.Fatalf("header after the retarget: %v; want map-1 in attempt 2 from source attempt 1", got)
	}

	// An output that stays lost fails the task, naming the map task.
	s, fakes, lease = newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0}, 2), nil, func(c *Config) { c.OutputLostTimeout = 300 * time.Millisecond })
	s.dial = func(context.Context, int) (output, error) { return nil, errors.New("connection refused") }
	fakes[0].breakWith(errors.New("stream broken"))
	done = runSourceLoop(t, context.Background(), s, lease)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "channel to map task map-0 on worker w9 lost for") ||
			!strings.Contains(err.Error(), "stream broken") || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("task failed with %v, want the lost channel named, with its cause and the last try's error", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("a source whose output stays lost did not fail")
	}
}

func (f *fakeOutput) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// TestLostOutputReplaysFromAResetOffset: a whole-job restore whose offset is
// gone from Kafka (beyond the end of a recreated topic here) starts reading
// at the start policy. A channel lost before this attempt completes a
// checkpoint is replayed from there, not from the restored offset, which
// this attempt never read: every record reaches the reopened map task once.
func TestLostOutputReplaysFromAResetOffset(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, values := wordRecords(100, 1)
	produce(t, brokers, "words", recs[:50])
	d := wordSourceDeploy(brokers, "words", []int32{0}, 2)
	d.RestoreCheckpointId, d.RestoreOffsets = 9, map[int32]int64{0: 5000}
	s, fakes, lease := newTestSource(t, d, nil, func(c *Config) {
		c.BatchSize = 8
		c.OutputLostTimeout = 20 * time.Second
	})
	if got := s.offsets[0]; got != 0 {
		t.Fatalf("restored offset beyond the end reset to %d, want 0 (earliest)", got)
	}
	rig := &reopenRig{refuse: errors.New("map task not there yet")}
	s.dial = rig.dial
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runSourceLoop(t, ctx, s, lease)
	upTo := func(f *fakeOutput, o int, n int64) func() bool { return hasItems(t, s, values, f, o, 0, n) }
	waitFor(t, "both outputs to get the first 50 records", func() bool { return upTo(fakes[0], 0, 50)() && upTo(fakes[1], 1, 50)() })

	fakes[1].breakWith(errors.New("stream broken"))
	produce(t, brokers, "words", recs[50:80])
	waitFor(t, "output 0 to get 80 records while output 1 is lost", upTo(fakes[0], 0, 80))
	reopened := &fakeOutput{}
	rig.open.Store(reopened)
	produce(t, brokers, "words", recs[80:100])
	waitFor(t, "the reopened output 1 to get every record from the reset offset on", func() bool {
		select {
		case err := <-done:
			t.Fatalf("the source ended: %v", err)
		default:
		}
		return upTo(reopened, 1, 100)()
	})
	stopLoop(t, cancel, done)
}

// TestReplayPastWhatTheAttemptReadFails: a retarget whose restore offsets lie
// beyond what the surviving source has read names a state this attempt's
// stream cannot match; the replay fails the task, saying so, instead of
// replaying nothing.
func TestReplayPastWhatTheAttemptReadFails(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, _ := wordRecords(40, 1)
	produce(t, brokers, "words", recs)
	s, _, _ := newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0}, 2), nil, nil)
	s.offsets = map[int32]int64{0: 31}
	err := s.replay(context.Background(), 1, map[int32]int64{0: 5000})
	if err == nil || !strings.Contains(err.Error(), "start at offset 5000, past the 31 this attempt has read") {
		t.Fatalf("replay from past what was read: %v, want a failure naming both offsets", err)
	}
}

// TestLostOutputWaitsForAMapTaskThatRestores: a lost output whose map task
// answers that it is still restoring its state (a task-scoped recovery of a
// large state) is not timed out by OutputLostTimeout while it does: the
// loss is timed from its last answer (the leader's deploy timeout bounds
// the restore). Once restored, the output is reopened and replayed to.
func TestLostOutputWaitsForAMapTaskThatRestores(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, values := wordRecords(60, 1)
	produce(t, brokers, "words", recs[:30])
	s, fakes, lease := newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0}, 2), nil, func(c *Config) {
		c.BatchSize = 8
		c.OutputLostTimeout = 300 * time.Millisecond
	})
	rig := &reopenRig{refuse: fmt.Errorf("open in-process channel to map-1: %w", errMapDeploying)}
	s.dial = rig.dial
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runSourceLoop(t, ctx, s, lease)
	upTo := func(f *fakeOutput, o int, n int64) func() bool { return hasItems(t, s, values, f, o, 0, n) }
	waitFor(t, "both outputs to get the first 30 records", func() bool { return upTo(fakes[0], 0, 30)() && upTo(fakes[1], 1, 30)() })

	fakes[1].breakWith(errors.New("stream broken"))
	produce(t, brokers, "words", recs[30:45])
	waitFor(t, "the loss to be found", func() bool { return rig.dials.Load() > 0 })
	lostAt := time.Now()
	waitFor(t, "the map task to answer that it restores for three times the lost timeout", func() bool {
		select {
		case err := <-done:
			t.Fatalf("the source failed while its map task restored: %v", err)
		default:
		}
		return time.Since(lostAt) > 900*time.Millisecond && rig.dials.Load() > 3
	})
	reopened := &fakeOutput{}
	rig.open.Store(reopened)
	produce(t, brokers, "words", recs[45:60])
	waitFor(t, "the reopened output 1 to get every record", upTo(reopened, 1, 60))
	stopLoop(t, cancel, done)
}

// TestSourceDeclinesABarrierItsLostChannelMayNotHaveCarried: a channel lost
// while a checkpoint's barrier is sent, or after it was sent and before the
// checkpoint completed, may not have carried the barrier, and the reopened
// channel does not: once it is reopened, the source declines the
// checkpoint, or its map task would align it over its other inputs and
// hold them until it timed out. While the channel stays lost (its worker
// may be gone, and a task-scoped recovery abort the checkpoint itself),
// nothing is declined.
func TestSourceDeclinesABarrierItsLostChannelMayNotHaveCarried(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, values := wordRecords(70, 1)
	produce(t, brokers, "words", recs[:30])
	ctl := make(chan control, 4)
	s, fakes, lease := newTestSource(t, wordSourceDeploy(brokers, "words", []int32{0}, 2), ctl, func(c *Config) {
		c.BatchSize = 8
		c.OutputLostTimeout = 20 * time.Second
	})
	sent := make(chan *transport.WorkerMessage, 64)
	s.env.send = func(m *transport.WorkerMessage) { sent <- m }
	rig := &reopenRig{refuse: errors.New("map task not there yet")}
	s.dial = rig.dial
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runSourceLoop(t, ctx, s, lease)
	upTo := func(f *fakeOutput, o int, n int64) func() bool { return hasItems(t, s, values, f, o, 0, n) }
	waitFor(t, "both outputs to get the first 30 records", func() bool { return upTo(fakes[0], 0, 30)() && upTo(fakes[1], 1, 30)() })
	// next returns the source's next decline or ack.
	next := func() *transport.WorkerMessage {
		t.Helper()
		for {
			select {
			case m := <-sent:
				if m.GetDecline() != nil || m.GetAck() != nil {
					return m
				}
			case err := <-done:
				t.Fatalf("the source ended: %v", err)
			case <-time.After(waitTimeout):
				t.Fatal("no ack or decline from the source")
			}
		}
	}
	none := func(what string) {
		t.Helper()
		select {
		case m := <-sent:
			if m.GetDecline() != nil {
				t.Fatalf("%s: declined %v", what, m.GetDecline())
			}
		default:
		}
	}

	// Lost while the barrier is sent: acked, and nothing declined while
	// the channel stays lost.
	fakes[1].breakWith(errors.New("stream broken"))
	ctl <- control{trigger: 1}
	if m := next(); m.GetAck().GetCheckpointId() != 1 {
		t.Fatalf("first message after the barrier's loss: %v, want the ack of checkpoint 1", m)
	}
	tries := rig.dials.Load()
	waitFor(t, "two more tries to reopen the lost channel", func() bool { return rig.dials.Load() >= tries+2 })
	none("the channel lost, not reopened")
	// Reopened: declined.
	reopened := &fakeOutput{}
	rig.open.Store(reopened)
	if m := next(); m.GetDecline().GetCheckpointId() != 1 || !strings.Contains(m.GetDecline().GetReason(), "before checkpoint 1 completed") {
		t.Fatalf("%v, want the decline of checkpoint 1 once the channel is reopened", m)
	}

	// Lost after the barrier, before the checkpoint completed: declined
	// once reopened.
	produce(t, brokers, "words", recs[30:50])
	waitFor(t, "the reopened output 1 to get 50 records", upTo(reopened, 1, 50))
	ctl <- control{trigger: 2}
	if m := next(); m.GetAck().GetCheckpointId() != 2 {
		t.Fatalf("%v, want the ack of checkpoint 2", m)
	}
	rig.open.Store(nil)
	reopened.breakWith(errors.New("stream broken"))
	produce(t, brokers, "words", recs[50:70])
	tries = rig.dials.Load()
	waitFor(t, "the loss to be found and reopening tried", func() bool { return rig.dials.Load() >= tries+2 })
	none("the channel lost after the barrier, not reopened")
	rig.open.Store(&fakeOutput{})
	if m := next(); m.GetDecline().GetCheckpointId() != 2 || !strings.Contains(m.GetDecline().GetReason(), "before checkpoint 2 completed") {
		t.Fatalf("%v, want the decline of checkpoint 2, whose barrier the lost channel may not have carried", m)
	}
	stopLoop(t, cancel, done)
}

// TestPartialSourceCatchesUpToTheEndsOnceItsOutputsAreOpen: the catch-up's
// end offsets are read when the catch-up begins (run begins it once every
// output is open, which replaces the predecessor's channels), not when the
// offsets are resolved: records a predecessor still running sent meanwhile
// are below them, and so read again record-marked, never combined.
func TestPartialSourceCatchesUpToTheEndsOnceItsOutputsAreOpen(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	recs, _ := wordRecords(50, 1)
	produce(t, brokers, "words", recs[:30])
	d := wordSourceDeploy(brokers, "words", []int32{0}, 1)
	d.Combine, d.Partial, d.RestoreOffsets, d.RestoreCheckpointId = true, true, map[int32]int64{0: 4}, 3
	s, _, lease := newResolvedSource(t, d, nil, nil)
	produce(t, brokers, "words", recs[30:50]) // sent by a predecessor while the outputs opened
	if err := s.beginCatchUp(lease.client); err != nil {
		t.Fatal(err)
	}
	if s.catchUp[0] != 50 || s.batches[0].table != nil {
		t.Fatalf("catch-up %v, combining %v: want to catch up to 50, the end when it began, before combining", s.catchUp, s.batches[0].table != nil)
	}
}

// reopenRig is the dial of a source whose lost outputs reopen only once the
// test hands them an output (open); until then each try fails with refuse.
type reopenRig struct {
	open   atomic.Pointer[fakeOutput]
	dials  atomic.Int64 // tries, answered or not
	refuse error
}

// dial is the source's dial (sourceTask.dial).
func (r *reopenRig) dial(context.Context, int) (output, error) {
	r.dials.Add(1)
	if f := r.open.Load(); f != nil {
		return f, nil
	}
	return nil, r.refuse
}

// hasItems is the condition that f holds exactly the items of output o of
// s from the records [from, n) of partition 0 (values).
func hasItems(t *testing.T, s *sourceTask, values map[int32][]string, f *fakeOutput, o int, from, n int64) func() bool {
	return func() bool {
		return sameItems(f.decode(t).items, wantItems(s, o, values, map[int32]int64{0: from}, map[int32]int64{0: n})) == nil
	}
}

// stopLoop cancels a source loop (runSourceLoop) and checks that it ended
// with the cancel.
func stopLoop(t *testing.T, cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("loop ended with %v, want context canceled", err)
	}
}

// TestSourceRestoresAPartitionTheMetadataDidNotList: a restored checkpoint
// has an offset of a partition the metadata read at the start did not list
// (a broker's stale cache). A whole-job restore does not read it at first,
// and when partition discovery finds it, reads it from the restored offset,
// not from its earliest (the state holds its records below that offset:
// read again, they would be counted twice); from its earliest only if that
// offset is no longer in Kafka. A task-scoped recovery fails instead, so
// that the whole job restarts.
func TestSourceRestoresAPartitionTheMetadataDidNotList(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	recs, _ := wordRecords(40, 2)
	produce(t, brokers, "words", recs)
	deleteRecords(t, brokers, "words", map[int32]int64{1: 5})
	stale := []int32{0} // what a broker that has not heard of partition 1 lists

	d := wordSourceDeploy(nil, "words", []int32{0}, 2)
	d.NumSources = 1
	d.RestoreCheckpointId = 7
	d.Source.PartitionDiscoveryMs = 200
	for _, tc := range []struct {
		restored, want int64
	}{
		{12, 12}, // in Kafka: where the restored state ends
		{3, 5},   // expired: the earliest there is
	} {
		d.RestoreOffsets = map[int32]int64{0: 4, 1: tc.restored}
		s, fakes, _ := newTestSource(t, d, nil, nil)
		lease, _, err := s.env.kafka.acquire(brokers, sarama.ReadUncommitted, "words", "source")
		if err != nil {
			t.Fatal(err)
		}
		err = s.resolveOffsets(lease.client, stale)
		if err != nil {
			lease.release()
			t.Fatalf("whole-job restore with stale metadata: %v", err)
		}
		if _, read := s.offsets[1]; read || slices.Contains(s.partitions, 1) {
			lease.release()
			t.Fatalf("partition 1 read at %d before the metadata listed it", s.offsets[1])
		}
		// A checkpoint meanwhile keeps the partition's restored offset:
		// a restore from it must not read the partition from its start.
		var acks []*transport.CheckpointAck
		s.env.send = func(m *transport.WorkerMessage) {
			if a := m.GetAck(); a != nil {
				acks = append(acks, a)
			}
		}
		if err := s.checkpoint(t.Context(), control{trigger: 8, lastCompleted: 7}); err != nil {
			lease.release()
			t.Fatal(err)
		}
		if len(acks) != 1 || !maps.Equal(acks[0].GetState().GetOffsets(), map[int32]int64{0: 4, 1: tc.restored}) {
			lease.release()
			t.Fatalf("checkpoint 8 acked %v before the partition was read, want both restored offsets", acks)
		}
		// Its barrier names what the ack names, and says it names all: a
		// map task checks it for partitions it holds records of.
		var barrier *transport.Barrier
		for _, m := range fakes[0].msgs {
			if b := m.GetBarrier(); b != nil {
				barrier = b
			}
		}
		if !barrier.GetNamesAll() || !maps.Equal(barrier.GetOffsets(), acks[0].GetState().GetOffsets()) {
			lease.release()
			t.Fatalf("barrier of checkpoint 8: %v, want the ack's offsets, all named", barrier)
		}
		got, err := s.discoveredStart(lease.client, "words", 1)
		lease.release()
		if err != nil || got != tc.want {
			t.Fatalf("partition 1 restored at %d, found by discovery: starts at %d (%v), want %d", tc.restored, got, err, tc.want)
		}
	}

	d.Partial = true
	d.RestoreOffsets = map[int32]int64{0: 4, 1: 12}
	s, _, _ := newTestSource(t, d, nil, nil)
	if err := resolveOn(t, s, brokers, stale); err == nil || !strings.Contains(err.Error(), "which the topic's metadata does not list") {
		t.Fatalf("task-scoped recovery with stale metadata: %v, want a failure that restarts the whole job", err)
	}
}
