package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// A batch is also sent once it packs maxBatchBytes, so that a message stays
// well below the data server's maxDataMessage whatever the record sizes.
const maxBatchBytes = 1 << 20

// combineMaxKeys bounds the keys a source's combiner holds per map task
// between two flushes: a table that reaches it is flushed at once, so memory
// does not grow with the number of distinct keys.
const combineMaxKeys = 4096

// pumpBatch is the most records a partition pump hands the task loop at
// once: one channel operation per run of records instead of one per record.
const pumpBatch = 256

// maxUnconfirmed bounds how many acked checkpoints a source remembers while
// it waits for their completion (older ones are aborted or superseded).
const maxUnconfirmed = 16

// sourceTask reads its Kafka partitions, splits each record into keyed items
// with the operator, and sends the items to the map task owning their key
// group, with checkpoint barriers in-band. Everything but the partition pumps
// runs on one goroutine, the task loop, so a barrier always falls between
// two records. Its Kafka client is shared with the worker's other source
// tasks (kafkaPool).
type sourceTask struct {
	env    *taskEnv
	key    taskKey
	log    *slog.Logger
	index  int32
	opName string
	op     operator.Operator
	spec   *transport.SourceSpec
	// token is the attempt's data-channel credential, sent in each
	// channel's header.
	token     string
	group     string
	maxPar    int
	mapTasks  []*transport.MapTaskRef // by index; output i goes to mapTasks[i]
	route     []int                   // key group -> output
	restore   map[int32]int64
	restoreID uint64
	// unread holds the restored offsets of partitions the topic's metadata
	// did not list at the start, until the task reads them: every ack
	// carries them, so that a restore from a checkpoint taken meanwhile
	// does not read them from their earliest offset again.
	unread  map[int32]int64
	control <-chan control
	// numSources is the job's source parallelism: the task owns the
	// partitions p with p mod numSources == index (0: unknown, so only those
	// of spec). discovery is how often it looks for partitions added to the
	// topic (0: never; see discover).
	numSources int32
	discovery  time.Duration
	// partial marks a task restored by task-scoped recovery
	// (DeployTask.partial): the job's other tasks ran on, so a restored
	// offset no longer in Kafka fails the task, and it combines only once
	// it has read past what the surviving map tasks may have applied
	// (catchUp).
	partial bool

	// combine is set when the operator's items are merged before they are
	// sent (an operator.Combiner, in a job without a sink).
	combine  operator.Combiner
	emitItem func(operator.Item) // s.collect, made once: Split is called per record

	// shared mirrors outputs for other goroutines (interrupt): the task
	// loop publishes an output whenever it opens or loses one.
	sharedMu sync.Mutex
	shared   []sharedOutput

	// Task loop only.
	outputs    []output
	batches    []pending       // by output: what waits to be sent
	batched    int             // items in all batches, so that the loop knows at once whether any waits
	partitions []int32         // read, sorted: the assignment, restored and discovered ones
	offsets    map[int32]int64 // next offset to read, per own partition
	// progress is, per partition read in this attempt, the offset of the
	// last record whose items are all in the batches: what a through mark
	// of a combined batch says.
	progress map[int32]int64
	// startOffsets are the offsets this attempt started reading each
	// partition at: where a replay starts when nothing newer is known.
	startOffsets map[int32]int64
	// catchUp holds, for a partial source that combines, the end offset
	// each partition had when the task started, until it has read past it;
	// until then items go out record-marked, for the map tasks to drop the
	// ones they applied already. nil once crossed (or never needed).
	catchUp map[int32]int64
	// caught is how the catch-up goes, for its progress logs; zero when
	// there is none.
	caught catchUpProgress
	// held is a checkpoint trigger that came while catching up, taken once
	// caught up.
	held *control
	// reportCaughtUp tells the task manager, and through it the leader,
	// that the catch-up is over (catchUpReporter); nil in tests.
	reportCaughtUp func()
	// due lists the outputs whose batch or table is full after the items
	// of the record being processed: they are sent once the record is
	// whole in them.
	due []int
	// lost is, by output, why and since when its channel is lost (nil:
	// open); nLost counts the lost ones. See replay.go.
	lost  []*lostOutput
	nLost int
	// dial makes one short attempt to open output o (dialOutput; tests
	// replace it).
	dial        func(ctx context.Context, o int) (output, error)
	lastBarrier uint64
	unconfirmed map[uint64]map[int32]int64 // offsets of acked checkpoints not yet completed
	// completedOffsets are the next offsets of the last completed
	// checkpoint, per partition (the lag metric).
	completedOffsets map[int32]int64
	halted           bool // stopped at a final savepoint: reads no more records
	scratch          []operator.Item
	in               prometheus.Counter
	out              prometheus.Counter
	skipped          prometheus.Counter
	acked            prometheus.Counter
	// recordsIn and recordsOut count the records read and the items sent
	// since the task started, for its acks (TaskState.records_in/out).
	recordsIn, recordsOut int64
}

func newSourceTask(env *taskEnv, d *transport.DeployTask, ctl <-chan control, log *slog.Logger) (*sourceTask, error) {
	k := keyOf(d.GetTask())
	op, ok := env.operators.Lookup(d.GetOperator())
	if !ok {
		return nil, fmt.Errorf("unknown operator %q (this worker has %s)", d.GetOperator(), strings.Join(env.operators.Names(), ", "))
	}
	spec := d.GetSource()
	if spec.GetTopic() == "" {
		return nil, fmt.Errorf("deploy of source task %s: no source topic", k.id)
	}
	maxPar := int(d.GetMaxParallelism())
	if maxPar <= 0 {
		maxPar = operator.DefaultMaxParallelism
	}
	mapTasks, route, err := routeTable(d.GetMapTasks(), maxPar)
	if err != nil {
		return nil, fmt.Errorf("deploy of source task %s: %w", k.id, err)
	}
	group := spec.GetGroup()
	if group == "" {
		name := d.GetJobName()
		if name == "" {
			name = k.job
		}
		group = "coordflow-" + name
	}
	s := &sourceTask{
		env:              env,
		key:              k,
		log:              log.With("kind", kindSource, "topic", spec.GetTopic(), "partitions", spec.GetPartitions()),
		index:            d.GetIndex(),
		opName:           d.GetOperator(),
		op:               op,
		spec:             spec,
		token:            d.GetChannelToken(),
		group:            group,
		maxPar:           maxPar,
		mapTasks:         mapTasks,
		route:            route,
		restore:          d.GetRestoreOffsets(),
		restoreID:        d.GetRestoreCheckpointId(),
		control:          ctl,
		numSources:       d.GetNumSources(),
		discovery:        time.Duration(spec.GetPartitionDiscoveryMs()) * time.Millisecond,
		partial:          d.GetPartial(),
		batches:          make([]pending, len(mapTasks)),
		lost:             make([]*lostOutput, len(mapTasks)),
		offsets:          make(map[int32]int64),
		startOffsets:     make(map[int32]int64),
		progress:         make(map[int32]int64),
		unconfirmed:      make(map[uint64]map[int32]int64),
		completedOffsets: make(map[int32]int64),
		in:               env.metrics.recordsIn.WithLabelValues(k.job, kindSource, k.id),
		out:              env.metrics.recordsOut.WithLabelValues(k.job, kindSource, k.id),
		skipped:          env.metrics.recordsSkipped.WithLabelValues(k.job, d.GetOperator()),
		acked:            env.metrics.checkpointsAcked.WithLabelValues(k.job, kindSource),
	}
	if s.numSources <= 0 {
		s.discovery = 0 // ownership unknown
	}
	s.emitItem = s.collect
	s.dial = s.dialOutput
	// A restored checkpoint is the last completed one.
	maps.Copy(s.completedOffsets, s.restore)
	if c, ok := op.(operator.Combiner); ok && d.GetCombine() {
		s.combine = c
		if !s.partial {
			s.startCombining()
		}
		// A partial source starts combining in beginCatchUp or later,
		// once it has caught up (catchUp).
	}
	return s, nil
}

// pending is what a source task holds for one output between two sends: the
// packed batch, and with a combiner the table of merged items that the next
// flush packs.
type pending struct {
	w transport.BatchWriter
	// marked and markP/markOff are the last record mark written to w, so
	// that a record's items carry one mark per batch.
	marked  bool
	markP   int32
	markOff int64
	table   *combineTable
	// due is set while the output is listed in sourceTask.due.
	due bool
}

// combineTable merges the items of each key between two flushes, in the
// order the keys first came, so that a replay sends the same batches.
type combineTable struct {
	index map[string]int
	items []combinedItem
}

type combinedItem struct {
	kg       int32
	key, raw []byte
	num      int64
}

func newCombineTable() *combineTable { return &combineTable{index: make(map[string]int)} }

// add merges it (of key group kg) into the table with c.
func (t *combineTable) add(c operator.Combiner, kg int32, it operator.Item) {
	if i, ok := t.index[string(it.Key)]; ok {
		e := &t.items[i]
		m := c.Combine(operator.Item{Key: it.Key, Num: e.num, Raw: e.raw}, it)
		e.num = m.Num
		if !bytesSame(m.Raw, e.raw) {
			e.raw = append([]byte(nil), m.Raw...)
		}
		return
	}
	t.index[string(it.Key)] = len(t.items)
	t.items = append(t.items, combinedItem{kg: kg, key: append([]byte(nil), it.Key...), num: it.Num, raw: append([]byte(nil), it.Raw...)})
}

// bytesSame reports whether a and b are the same bytes in memory, so that a
// combiner returning the accumulated Raw unchanged costs no copy.
func bytesSame(a, b []byte) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// packInto writes the merged items to w and empties the table.
func (t *combineTable) packInto(w *transport.BatchWriter) {
	for i := range t.items {
		e := &t.items[i]
		w.Item(e.kg, e.key, e.num, e.raw)
	}
	clear(t.index)
	clear(t.items) // drop the keys and raws for the collector
	t.items = t.items[:0]
}

// routeTable sorts the map tasks by index and maps every key group to the
// task owning it; the ranges must cover [0, maxPar) exactly once.
func routeTable(refs []*transport.MapTaskRef, maxPar int) ([]*transport.MapTaskRef, []int, error) {
	if len(refs) == 0 {
		return nil, nil, fmt.Errorf("map_tasks is empty")
	}
	sorted := slices.Clone(refs)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].GetIndex() < sorted[j].GetIndex() })
	route := make([]int, maxPar)
	for i := range route {
		route[i] = -1
	}
	for i, mt := range sorted {
		start, end := int(mt.GetKeyGroupStart()), int(mt.GetKeyGroupEnd())
		if start < 0 || end > maxPar || start >= end {
			return nil, nil, fmt.Errorf("map task %s: key-group range [%d, %d) is not within [0, %d)", mt.GetTaskId(), start, end, maxPar)
		}
		for kg := start; kg < end; kg++ {
			if route[kg] != -1 {
				return nil, nil, fmt.Errorf("key group %d belongs to both %s and %s", kg, sorted[route[kg]].GetTaskId(), mt.GetTaskId())
			}
			route[kg] = i
		}
	}
	for kg, o := range route {
		if o == -1 {
			return nil, nil, fmt.Errorf("key group %d belongs to no map task", kg)
		}
	}
	return sorted, route, nil
}

func (s *sourceTask) run(ctx context.Context, running func()) error {
	lease, topicParts, err := s.env.kafka.acquire(s.spec.GetBrokers(), s.isolation(), s.spec.GetTopic(), "source")
	if err != nil {
		return err
	}
	// The partition consumers close, and the lease goes, after the task
	// has stopped: closing a partition consumer waits for sarama to let go
	// of it, which in a Kafka outage is a metadata refresh or a fetch that
	// runs to the client's timeouts, longer than a stop may take; so may a
	// catch-up probe's fetch or the discovery's offset lookup
	// (partitionReaders.lingering). A stopping worker waits for them
	// (kafkaPool.wait).
	var r *partitionReaders
	defer func() {
		var closers []func()
		if r != nil {
			closers = append([]func(){r.lingering.Wait}, r.closers...)
		}
		lease.releaseAfter(closers)
	}()
	defer s.forgetLag()
	if err := s.resolveOffsets(lease.client, topicParts); err != nil {
		return err
	}
	maps.Copy(s.startOffsets, s.offsets)

	defer func() {
		for _, o := range s.outputs {
			if o != nil { // nil: lost, closed already
				o.close()
			}
		}
	}()
	for _, mt := range s.mapTasks {
		o, err := openOutput(ctx, s.env, s.header(mt), mt)
		if err != nil {
			return err
		}
		s.outputs = append(s.outputs, o)
		s.publish(len(s.outputs) - 1)
	}
	if err := s.beginCatchUp(lease.client); err != nil {
		return err
	}

	loopCtx, stopLoop := context.WithCancel(ctx)
	r = &partitionReaders{
		ctx: loopCtx, lease: lease,
		merged: make(chan []*sarama.ConsumerMessage), failed: make(chan error, 1),
		consumers: make(map[int32]sarama.PartitionConsumer),
	}
	// Stop the pumps before the partition consumers close.
	defer func() {
		stopLoop()
		r.wg.Wait()
		// Tell every partition consumer to stop now; their closes, which
		// wait for sarama to let go of them, run in the background
		// (releaseAfter). Closed one after another without this, each
		// partition would go on retrying until the ones before it closed.
		for _, pc := range r.consumers {
			pc.AsyncClose()
		}
	}()
	for _, p := range s.partitions {
		if err := s.read(r, p); err != nil {
			return err
		}
	}
	var found chan []discovered
	if s.discovery > 0 {
		found = make(chan []discovered)
		known := slices.Clone(s.partitions)
		r.lingering.Go(func() { s.discover(loopCtx, lease, known, found) })
	}

	s.log.Info("source running", "offsets", s.offsets, "outputs", len(s.outputs), "group", s.group, "partition_discovery", s.discovery)
	running()
	return s.loop(ctx, r, found)
}

// sharedOutput is one output as interrupt sees it: the channel and the map
// task place it goes to.
type sharedOutput struct {
	out          output // nil while lost
	task, worker string
	attempt      uint64
}

// publish makes output o, as the task loop has it now, visible to
// interrupt. Task loop only.
func (s *sourceTask) publish(o int) {
	mt := s.mapTasks[o]
	s.sharedMu.Lock()
	if len(s.shared) < len(s.mapTasks) {
		s.shared = append(s.shared, make([]sharedOutput, len(s.mapTasks)-len(s.shared))...)
	}
	s.shared[o] = sharedOutput{out: s.outputs[o], task: mt.GetTaskId(), worker: mt.GetWorkerId(), attempt: s.header(mt).GetAttempt()}
	s.sharedMu.Unlock()
}

// interrupt closes, from the worker's session goroutine, the outputs to map
// tasks that r moves to another worker or attempt. A send to a map task
// whose process is frozen or cut off blocks on gRPC's flow control once the
// socket buffers are full, and the task loop would then never get to the
// retarget in its control queue; closed, the send fails at once, the loop
// marks the output lost and then follows the retarget. Closing an output is
// safe from any goroutine.
func (s *sourceTask) interrupt(r *transport.RetargetTasks) {
	var stale []sharedOutput
	s.sharedMu.Lock()
	for _, ref := range r.GetMapTasks() {
		for _, so := range s.shared {
			if so.out != nil && so.task == ref.GetTaskId() && ref.GetAttempt() > so.attempt && ref.GetWorkerId() != so.worker {
				stale = append(stale, so)
			}
		}
	}
	s.sharedMu.Unlock()
	for _, so := range stale {
		s.log.Info("breaking off the channel to a map task a retarget moved", "map_task", so.task, "map_worker", so.worker)
		so.out.close()
	}
}

// partitionReaders are a source task's partition consumers and the pumps
// that forward their records to the task loop. Only the task goroutine adds
// to them.
type partitionReaders struct {
	ctx   context.Context // ends the pumps and the discovery
	lease *kafkaLease
	// consumers are the partition consumers by partition, for the end
	// offsets they last fetched (the lag metric).
	consumers map[int32]sarama.PartitionConsumer
	merged    chan []*sarama.ConsumerMessage
	failed    chan error // a pump or consumer that failed the task
	wg        sync.WaitGroup
	// lingering are the goroutines whose Kafka requests do not end with
	// ctx: the catch-up's probes (catchUpTick) and the partition discovery,
	// which looks up a new partition's earliest offset. The stop does not
	// wait for them: the lease is released once they and the closers are
	// done, in the background.
	lingering sync.WaitGroup
	closers   []func()
}

// read starts reading partition p at s.offsets[p]. It may block up to
// Consumer.MaxWaitTime while sarama adds p to a running fetch loop.
func (s *sourceTask) read(r *partitionReaders, p int32) error {
	pc, closePC, err := r.lease.consume(s.spec.GetTopic(), p, s.offsets[p])
	if err != nil {
		return fmt.Errorf("source: consume %s/%d from offset %d: %w", s.spec.GetTopic(), p, s.offsets[p], err)
	}
	s.pumpFrom(r, p, pc, closePC)
	return nil
}

// pumpFrom makes pc, which closePC closes, partition p's consumer, and
// starts its pump.
func (s *sourceTask) pumpFrom(r *partitionReaders, p int32, pc sarama.PartitionConsumer, closePC func()) {
	r.closers = append(r.closers, closePC)
	r.consumers[p] = pc
	r.wg.Go(func() { s.pump(r.ctx, p, pc, r.merged, r.failed) })
}

// header is the channel header of the output to map task mt: the map
// task's own attempt (which after a task-scoped recovery may differ from the
// source's), and the source's attempt, by which the map task tells a
// reopened channel from a zombie's.
func (s *sourceTask) header(mt *transport.MapTaskRef) *transport.ChannelHeader {
	attempt := mt.GetAttempt()
	if attempt == 0 {
		attempt = s.key.attempt // a leader that predates per-task attempts
	}
	return &transport.ChannelHeader{
		JobId: s.key.job, Attempt: attempt, SourceAttempt: s.key.attempt,
		SourceIndex: s.index, MapTaskId: mt.GetTaskId(), ChannelToken: s.token,
	}
}

// owns reports whether partition p is this task's: p mod S == index.
func (s *sourceTask) owns(p int32) bool {
	return s.numSources > 0 && p >= 0 && p%s.numSources == s.index
}

// discovered is a partition added to the topic that the source owns, with
// the earliest offset it starts reading at and a consumer reading from there,
// which closePC closes.
type discovered struct {
	partition int32
	offset    int64
	pc        sarama.PartitionConsumer
	closePC   func()
}

// discover runs beside the task loop until ctx ends. Every half discovery
// interval it looks at the topic's partitions (sharing metadata refreshes
// with the worker's other tasks on the topic, kafkaLease.partitions, so a
// partition is seen within one interval of its creation), and hands the
// loop the partitions it owns that are not in known, each with its earliest
// offset: everything written to a new partition is the job's input, also
// what came before the source saw it. It also makes their partition
// consumers, whose start asks Kafka for the partition's offsets: in an
// outage that takes up to the client's timeouts, which must hold up
// neither the task loop nor its stop (partitionReaders.lingering). Errors
// are logged and the look is retried: a topic that went away fails the task
// through its pumps.
func (s *sourceTask) discover(ctx context.Context, lease *kafkaLease, known []int32, found chan<- []discovered) {
	topic := s.spec.GetTopic()
	every := s.discovery / 2
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		parts, err := lease.partitions(ctx, topic, every)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Warn("partition discovery: reading the topic's partitions failed; retrying", "err", err)
			continue
		}
		var batch []discovered
		for _, p := range slices.Sorted(slices.Values(parts)) {
			if !s.owns(p) || slices.Contains(known, p) {
				continue
			}
			off, err := s.discoveredStart(lease.client, topic, p)
			if err != nil {
				s.log.Warn("partition discovery: the start offset of a new partition failed; retrying", "partition", p, "err", err)
				continue
			}
			pc, closePC, err := lease.consume(topic, p, off)
			if err != nil {
				s.log.Warn("partition discovery: reading a new partition failed; retrying", "partition", p, "offset", off, "err", err)
				continue
			}
			batch = append(batch, discovered{partition: p, offset: off, pc: pc, closePC: closePC})
			if ctx.Err() != nil {
				break // stopped: the rest would only wait on Kafka
			}
		}
		if len(batch) == 0 {
			continue
		}
		select {
		case found <- batch:
		case <-ctx.Done():
			for _, d := range batch {
				d.pc.AsyncClose()
			}
			for _, d := range batch {
				d.closePC()
			}
			return
		}
		for _, d := range batch {
			known = append(known, d.partition)
		}
	}
}

// discoveredStart returns the offset a partition discovery found starts
// at: its earliest, since a checkpoint holds nothing of a partition added
// after it, unless the restored checkpoint has an offset for it (the
// metadata resolveOffsets read did not list it yet): that offset while
// Kafka has it, else the start policy's (restoredStart).
func (s *sourceTask) discoveredStart(client sarama.Client, topic string, p int32) (int64, error) {
	off, restored := s.restore[p] // read only once the task started
	if !restored {
		return client.GetOffset(topic, p, sarama.OffsetOldest)
	}
	start, _, err := s.restoredStart(client, topic, p, off) // readDiscovered sees a reset
	return start, err
}

// readDiscovered starts reading partitions discover found. From here on
// every ack names their offsets; a checkpoint taken before has none, and a
// restore from it starts them at their earliest offset again, before
// anything of theirs is in the restored state. A restored partition the
// metadata did not list at the start starts at its restored offset
// (discoveredStart). A partition the restored checkpoint does not name
// fails a partial source (the error says why).
func (s *sourceTask) readDiscovered(r *partitionReaders, batch []discovered) error {
	for i, d := range batch {
		if _, ok := s.offsets[d.partition]; ok {
			d.pc.AsyncClose()
			r.closers = append(r.closers, d.closePC)
			continue
		}
		off, restored := s.restore[d.partition]
		if s.partial && !restored {
			// The predecessor may have found it and sent records of it that
			// surviving map tasks applied. Combined, they would be applied
			// again, having no record marks to drop them by; marked, the
			// map tasks would decline checkpoints (counted) until the
			// source had read past them. A whole-job restart restores
			// every map task from the checkpoint instead.
			for _, d := range batch[i:] {
				d.pc.AsyncClose()
				r.closers = append(r.closers, d.closePC)
			}
			return fmt.Errorf("source: found partition %d of %s, which the checkpoint this source was restored from (task-scoped recovery) does not name: its predecessor may have read it, and surviving map tasks applied its records; the whole job restarts",
				d.partition, s.spec.GetTopic())
		}
		if restored && off != d.offset {
			// As resolveOffsets does for a restored offset Kafka no
			// longer has (replayStart).
			delete(s.completedOffsets, d.partition)
		}
		delete(s.unread, d.partition)
		s.offsets[d.partition] = d.offset
		s.startOffsets[d.partition] = d.offset
		s.partitions = append(s.partitions, d.partition)
		slices.Sort(s.partitions)
		s.pumpFrom(r, d.partition, d.pc, d.closePC)
		s.log.Info("reading a partition added to the topic", "partition", d.partition, "offset", d.offset)
	}
	return nil
}

// resolveOffsets chooses the partitions to read and sets the start offset
// of each: the restored one, or one resolved to a concrete offset now, so
// that an ack names a next offset even for a partition without records yet.
//
// The partitions are the assignment, every partition the task owns that the
// restored checkpoint has an offset for (discovered by an earlier attempt:
// the leader's lookup may not list it yet), and with discovery on, every
// partition the task owns that the topic has now.
//
// A partition without a restored offset starts at the start policy, except
// when the task restores a checkpoint with discovery on: then it starts at
// the earliest offset, because a partition the checkpoint lacks was added to
// the topic after it, and is read from its start as discover does; an
// earlier attempt may have read it, but no state restored has. A restored
// offset outside the partition's records (the topic was deleted and
// recreated, or records expired before they were read) is replaced by the
// start policy, as Kafka's auto.offset.reset does, and logged; except in a
// partial source (task-scoped recovery), which fails instead: the surviving
// tasks' state goes on from the checkpoint, so reading anything else would
// lose or double records, and the leader falls back to a job-scoped restart.
//
// A partial source that combines also notes each partition's end offset
// now (catchUp): records below it may be applied already by surviving map
// tasks, which drop them only by record marks.
func (s *sourceTask) resolveOffsets(client sarama.Client, topicParts []int32) error {
	topic := s.spec.GetTopic()
	policy, err := s.startPolicy()
	if err != nil {
		return err
	}
	parts := slices.Clone(s.spec.GetPartitions())
	for _, p := range parts {
		if !slices.Contains(topicParts, p) {
			return fmt.Errorf("source topic %q has no partition %d (it has %d partitions)", topic, p, len(topicParts))
		}
	}
	for _, p := range slices.Sorted(maps.Keys(s.restore)) {
		if slices.Contains(parts, p) || !s.owns(p) {
			continue
		}
		if !slices.Contains(topicParts, p) {
			// Stale metadata (a broker that has not heard of the partition
			// yet) or a topic recreated with fewer partitions. The state
			// holds p's records below the restored offset: read later from
			// the earliest offset, they would be counted twice.
			if s.partial {
				return fmt.Errorf("task-scoped recovery of source task %s: checkpoint %d has an offset of %s/%d, which the topic's metadata does not list (%d partitions): the whole job must restart",
					s.key.id, s.restoreID, s.spec.GetTopic(), p, len(topicParts))
			}
			what := "reading it from the restored offset once partition discovery finds it"
			if s.discovery == 0 {
				what = "partition discovery is off, so this attempt does not read it; its restored offset stays in every checkpoint"
			}
			s.log.Warn("the restored checkpoint has an offset of a partition the topic's metadata does not list (stale metadata, or the topic recreated with fewer partitions?): "+what,
				"partition", p, "restored_offset", s.restore[p], "topic_partitions", len(topicParts))
			if s.unread == nil {
				s.unread = make(map[int32]int64)
			}
			s.unread[p] = s.restore[p]
			continue
		}
		parts = append(parts, p)
	}
	if s.discovery > 0 {
		for _, p := range topicParts {
			if s.owns(p) && !slices.Contains(parts, p) {
				parts = append(parts, p)
			}
		}
	}
	slices.Sort(parts)
	if len(parts) > len(s.spec.GetPartitions()) {
		s.log.Info("reading partitions beyond the assignment (restored or added to the topic)", "read", parts)
	}
	s.partitions = parts
	for _, p := range parts {
		if off, ok := s.restore[p]; ok {
			start, reset, err := s.restoredStart(client, topic, p, off)
			if err != nil {
				return err
			}
			if reset {
				// The restored offset is no longer where this attempt's
				// map tasks took p up from: a replay to a map task that
				// lost a batch starts where this attempt starts reading
				// (replayStart).
				delete(s.completedOffsets, p)
			}
			s.offsets[p] = start
			continue
		}
		at := policy
		if s.restoreID != 0 && s.discovery > 0 {
			at = sarama.OffsetOldest // added after the checkpoint
		}
		off, err := s.policyOffset(client, topic, p, at)
		if err != nil {
			return err
		}
		s.offsets[p] = off
	}
	return nil
}

// restoredStart returns where to read partition p, restored at off: off
// while Kafka still has it; otherwise, in a whole-job restore, the start
// policy's offset (reset), and in a task-scoped recovery an error, since the
// surviving map tasks hold state up to off.
func (s *sourceTask) restoredStart(client sarama.Client, topic string, p int32, off int64) (start int64, reset bool, err error) {
	oldest, newest, err := partitionBounds(client, topic, p)
	if err != nil {
		return 0, false, err
	}
	if off >= oldest && off <= newest {
		return off, false, nil
	}
	if s.partial {
		return 0, false, fmt.Errorf("task-scoped recovery of source task %s: checkpoint %d's offset %d of %s/%d is no longer in Kafka (oldest %d, end %d)",
			s.key.id, s.restoreID, off, topic, p, oldest, newest)
	}
	log := s.log.With("partition", p, "restored_offset", off, "oldest", oldest, "newest", newest, "start", s.spec.GetStart())
	if off > newest {
		log.Warn("restored offset is beyond the end of the partition (topic deleted and recreated?): reading from the start policy")
	} else {
		log.Error("restored offset is below the oldest record (records expired before they were read): reading from the start policy")
	}
	at, err := s.startPolicy()
	if err != nil {
		return 0, false, err
	}
	start, err = s.policyOffset(client, topic, p, at)
	return start, true, err
}

// startPolicy is the spec's start as sarama.OffsetOldest or OffsetNewest.
func (s *sourceTask) startPolicy() (int64, error) {
	switch s.spec.GetStart() {
	case "", "earliest":
		return sarama.OffsetOldest, nil
	case "latest":
		return sarama.OffsetNewest, nil
	}
	return 0, fmt.Errorf("source start %q: want \"earliest\" or \"latest\"", s.spec.GetStart())
}

// policyOffset resolves at (sarama.OffsetOldest or OffsetNewest) to an
// offset of partition p.
func (s *sourceTask) policyOffset(client sarama.Client, topic string, p int32, at int64) (int64, error) {
	var off int64
	var err error
	if at == sarama.OffsetNewest {
		// Reading committed, that is where the records a consumer can read
		// end now: records of transactions open then are read when they
		// commit, as Kafka's consumer does with auto.offset.reset=latest.
		off, err = readableEnd(client, topic, p, s.isolation())
	} else {
		off, err = client.GetOffset(topic, p, at)
	}
	if err != nil {
		return 0, fmt.Errorf("source: resolve %s offset of %s/%d: %w", s.spec.GetStart(), topic, p, err)
	}
	return off, nil
}

// beginCatchUp starts a restored partial source's catch-up to its
// partitions' end offsets: its predecessor may have sent surviving map tasks
// records up to there, which they applied. Until then it does not combine
// (surviving map tasks drop what they applied by record marks) and holds
// checkpoint triggers (a checkpoint taken behind them would name offsets
// below what their state holds). The ends are read once every output is
// open: opening a channel to a map task replaces the predecessor's, so a
// predecessor still running (its worker cut off from the coordinators, not
// from the map tasks) can send them no record past these ends, which would
// come again from this source, combined, and count twice.
func (s *sourceTask) beginCatchUp(client sarama.Client) error {
	if !s.partial {
		return nil
	}
	s.catchUp = make(map[int32]int64)
	for _, p := range s.partitions {
		if err := s.noteCatchUp(client, p, s.offsets[p]); err != nil {
			return err
		}
	}
	if len(s.catchUp) == 0 {
		s.catchUp = nil
		s.startCombining()
		return nil
	}
	s.caught = catchUpProgress{
		began: time.Now(), logged: time.Now(), behind: s.behind(),
		seen: maps.Clone(s.offsets), probed: make(chan catchUpProbe, 1),
	}
	s.log.Info("restored partial source: catching up to the partitions' end offsets before it combines or takes a checkpoint",
		"until", s.catchUp, "records", s.caught.behind)
	return nil
}

// noteCatchUp notes the offset partition p, to be read from off, must be
// read up to before the catch-up ends: the records a consumer of the
// source's isolation level can read now (readableEnd), which are all its
// predecessor can have sent.
func (s *sourceTask) noteCatchUp(client sarama.Client, p int32, off int64) error {
	end, err := readableEnd(client, s.spec.GetTopic(), p, s.isolation())
	if err != nil {
		return fmt.Errorf("source: end offset of %s/%d: %w", s.spec.GetTopic(), p, err)
	}
	if off < end {
		s.catchUp[p] = end
	}
	return nil
}

// isolation is the isolation level of the source's reads: reading
// committed, records of aborted transactions are skipped and records of
// open ones wait until their transaction ends.
func (s *sourceTask) isolation() sarama.IsolationLevel {
	if s.spec.GetReadCommitted() {
		return sarama.ReadCommitted
	}
	return sarama.ReadUncommitted
}

// readableEnd returns the offset up to which a consumer at isolation can
// read topic/p now: the end of the partition (its high watermark) reading
// uncommitted; reading committed, the last stable offset, below the first
// record of a transaction still open. sarama's GetOffset asks only for the
// first.
func readableEnd(client sarama.Client, topic string, p int32, isolation sarama.IsolationLevel) (int64, error) {
	if isolation != sarama.ReadCommitted {
		return client.GetOffset(topic, p, sarama.OffsetNewest)
	}
	// As GetOffset does: a failure (a leader that moved, one that does not
	// know its offsets yet) refreshes the topic's metadata and tries once
	// more.
	off, err := lastStableOffset(client, topic, p)
	if err != nil {
		if rerr := client.RefreshMetadata(topic); rerr != nil {
			return 0, fmt.Errorf("%w (metadata refresh: %w)", err, rerr)
		}
		off, err = lastStableOffset(client, topic, p)
	}
	return off, err
}

// lastStableOffset asks topic/p's leader for its last stable offset.
func lastStableOffset(client sarama.Client, topic string, p int32) (int64, error) {
	broker, err := client.Leader(topic, p)
	if err != nil {
		return 0, fmt.Errorf("leader of %s/%d: %w", topic, p, err)
	}
	req := sarama.NewOffsetRequest(client.Config().Version)
	req.IsolationLevel = sarama.ReadCommitted
	req.AddBlock(topic, p, sarama.OffsetNewest, 1)
	resp, err := broker.GetAvailableOffsets(req)
	if err != nil {
		_ = broker.Close() // reconnect on the next request, as sarama does
		return 0, fmt.Errorf("last stable offset of %s/%d: %w", topic, p, err)
	}
	block := resp.GetBlock(topic, p)
	switch {
	case block == nil:
		return 0, fmt.Errorf("last stable offset of %s/%d: %w", topic, p, sarama.ErrIncompleteResponse)
	case !errors.Is(block.Err, sarama.ErrNoError):
		return 0, fmt.Errorf("last stable offset of %s/%d: %w", topic, p, block.Err)
	case len(block.Offsets) != 1:
		return 0, fmt.Errorf("last stable offset of %s/%d: %w", topic, p, sarama.ErrIncompleteResponse)
	}
	return block.Offsets[0], nil
}

// partitionBounds returns the oldest offset and the end offset (next to be
// written) of topic/p.
func partitionBounds(client sarama.Client, topic string, p int32) (oldest, newest int64, err error) {
	if oldest, err = client.GetOffset(topic, p, sarama.OffsetOldest); err != nil {
		return 0, 0, fmt.Errorf("source: oldest offset of %s/%d: %w", topic, p, err)
	}
	if newest, err = client.GetOffset(topic, p, sarama.OffsetNewest); err != nil {
		return 0, 0, fmt.Errorf("source: end offset of %s/%d: %w", topic, p, err)
	}
	return oldest, newest, nil
}

// pump forwards one partition's records to the task loop, in runs of those
// sarama has ready, until ctx ends. A partition consumer that stops by itself
// fails the task, and so does one that reports nothing but errors for
// KafkaTimeout (broker unreachable, topic deleted): the leader then restarts
// the job with backoff and shows why, instead of the job looking healthy
// while it reads nothing. Errors further apart than KafkaTimeout are
// transient and only logged; timeouts, further apart than errorCycle:
// sarama takes that long between two of them for a partition whose broker
// takes requests but answers none.
//
// The pump reads ahead of the task loop into a pumpQueue, and stops reading
// altogether while the queue is full, until the loop has taken half of it.
// That is for the worker's other tasks: sarama fetches the partitions of
// every task on a shared consumer (kafkaPool) in rounds, and starts the next
// round only when each partition consumer has handed over its share of the
// last one, or has not taken a record for one to two
// Consumer.MaxProcessingTime once its channel is full (it is then left out
// until it catches up). A task that read on slowly, a run whenever its loop
// took one, would hold every other task's partitions to its pace (sarama
// issue 1188, the "naughty neighbour"). A pump whose loop takes half its
// queue in longer than that, a loop slower than some 20,000 records a
// second for small records, is now left out of the rounds; a faster one
// still paces a round to its share of the fetch, as before.
func (s *sourceTask) pump(ctx context.Context, p int32, pc sarama.PartitionConsumer, merged chan<- []*sarama.ConsumerMessage, failed chan<- error) {
	errs := pc.Errors()
	window, cycle := s.env.cfg.KafkaTimeout, s.env.kafka.errorCycle
	kafkaErrors := s.env.metrics.kafkaErrors.WithLabelValues(s.key.job, s.spec.GetTopic())
	var failingSince, lastErr time.Time // both zero while records flow
	var q pumpQueue
	readAhead := time.NewTimer(pumpReadAhead)
	readAhead.Stop()
	defer readAhead.Stop()
	armed := false
	// bulk is set while records come in faster than the loop takes them.
	bulk := false
	for {
		// With nothing queued, or nothing read at the last look, the pump
		// waits for records, as the loop would. While records come in
		// and the loop is busy with queued ones, it reads ahead on a
		// timer, in bulk: waking for each record sarama hands over would
		// cost more than the loop spends on it.
		var in <-chan *sarama.ConsumerMessage
		var tick <-chan time.Time
		head := q.head()
		switch {
		case q.paused:
		case head == nil || !bulk:
			in = pc.Messages()
		default:
			if !armed {
				readAhead.Reset(pumpReadAhead)
				armed = true
			}
			tick = readAhead.C
		}
		var out chan<- []*sarama.ConsumerMessage
		if head != nil {
			out = merged
		}
		select {
		case <-ctx.Done():
			return
		case msg, ok := <-in:
			if !ok {
				fail(ctx, failed, fmt.Errorf("source: consumer of %s/%d stopped", s.spec.GetTopic(), p))
				return
			}
			failingSince, lastErr = time.Time{}, time.Time{}
			q.add(msg, len(pc.Messages()))
			q.drain(pc.Messages())
			bulk = true
		case <-tick:
			armed = false
			if q.drain(pc.Messages()) {
				failingSince, lastErr = time.Time{}, time.Time{}
			} else {
				bulk = false
			}
		case out <- head:
			q.pop()
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			kafkaErrors.Inc()
			if q.head() != nil {
				// Records wait for the loop: Kafka is not failing this
				// partition throughout, whatever a later fetch says.
				s.log.Warn("kafka consumer error", "partition", p, "err", err, "records_queued", true)
				continue
			}
			now := time.Now()
			// A timeout comes only after a read timeout or more: such
			// errors are one outage while closer than the client's
			// retry cycle. Others (refused, reset) come fast, and are
			// one outage only while closer than KafkaTimeout, so that a
			// broker restart is ridden out, also on a quiet partition.
			gap := window
			if errors.Is(err, os.ErrDeadlineExceeded) {
				gap = cycle
			}
			if lastErr.IsZero() || now.Sub(lastErr) > gap {
				failingSince = now
			}
			lastErr = now
			if d := now.Sub(failingSince); d >= window {
				fail(ctx, failed, fmt.Errorf("source: %s/%d: only errors from Kafka for %s (kafka timeout %s): %w",
					s.spec.GetTopic(), p, d.Round(time.Millisecond), window, err))
				return
			}
			s.log.Warn("kafka consumer error", "partition", p, "err", err, "failing_for", now.Sub(failingSince).Round(time.Millisecond))
		}
	}
}

// errorCycle bounds how long sarama's consumer of a partition goes between
// two errors while every request to its brokers times out: the fetch's read
// timeout, then a metadata refresh, which on a connection it must open
// waits for a read timeout for each of two ApiVersions requests and the
// metadata request (the refresh is one try: Metadata.Timeout is the read
// timeout), and may first wait for another topic's refresh on the shared
// client; then Consumer.Retry.Backoff, and a read timeout of slack. Timeout
// errors closer than that are one outage: a broker that answers nothing
// (a frozen host, a black-holed network) yields them this far apart, and a
// window of KafkaTimeout never saw two in a row (TestSourceFailsOnHungBroker).
func errorCycle(c *sarama.Config) time.Duration {
	refresh := 3*c.Net.ReadTimeout + c.Metadata.Retry.Backoff
	return c.Net.ReadTimeout + 2*refresh + c.Consumer.Retry.Backoff + c.Net.ReadTimeout
}

// pumpQueueBytes bounds the records a pump holds for its task loop, by the
// estimate of their memory pumpQueue keeps: for records of a few tens of
// bytes, some 7,000, a seventh of a 1 MiB fetch (sarama's
// Consumer.Fetch.Default counts bytes on the wire). A larger queue would
// leave faster loops out of the rounds too, at the cost of memory per
// partition of every backpressured task.
const pumpQueueBytes = 1 << 20

// pumpReadAhead is how often a pump whose loop is busy takes what sarama has
// ready: often enough to read ahead of a loop that takes tens of thousands
// of records a second, and seldom enough to take them in bulk.
const pumpReadAhead = 5 * time.Millisecond

// recordOverhead estimates the memory of a consumed record beyond its key,
// value and headers: sarama's ConsumerMessage and the pointer to it.
// headerOverhead is that of each header beyond its key and value.
const (
	recordOverhead = 128
	headerOverhead = 64
)

// pumpQueue is a pump's read-ahead: runs of up to pumpBatch records, the
// head one next for the task loop. It pauses (the pump stops reading) once
// it holds pumpQueueBytes, and resumes once the loop has taken it down to
// half: a pause long enough for sarama to leave the partition out of its
// fetch rounds, rather than one run read per run taken.
type pumpQueue struct {
	runs   [][]*sarama.ConsumerMessage
	sizes  []int // bytes of each run
	bytes  int
	paused bool
}

// add appends msg to the last run, or to a new one if that is full; ready
// is how many more records sarama had ready for the partition when msg was
// taken, a hint for the size of a new run.
func (q *pumpQueue) add(msg *sarama.ConsumerMessage, ready int) {
	n := len(msg.Key) + len(msg.Value) + recordOverhead
	for _, h := range msg.Headers {
		n += len(h.Key) + len(h.Value) + headerOverhead
	}
	if last := len(q.runs) - 1; last >= 0 && len(q.runs[last]) < pumpBatch {
		if run := q.runs[last]; len(run) == cap(run) {
			// More came than were ready when the run began: records
			// are streaming in, so make room for a whole run at once
			// rather than doubling up to it.
			q.runs[last] = slices.Grow(run, pumpBatch-len(run))
		}
		q.runs[last] = append(q.runs[last], msg)
		q.sizes[last] += n
	} else {
		// A run is sized for the records ready behind msg: a lightly
		// loaded partition hands over a few records a fetch, and a run
		// of pumpBatch for each was most of a worker's garbage with a
		// thousand such tasks.
		run := make([]*sarama.ConsumerMessage, 1, min(pumpBatch, 1+ready))
		run[0] = msg
		q.runs = append(q.runs, run)
		q.sizes = append(q.sizes, n)
	}
	q.bytes += n
	if q.bytes >= pumpQueueBytes {
		q.paused = true
	}
}

// drain adds the records msgs has ready, until there are none or the queue
// pauses, and reports whether it added any. A closed msgs is left for the
// pump's next receive to see.
func (q *pumpQueue) drain(msgs <-chan *sarama.ConsumerMessage) bool {
	added := false
	for !q.paused {
		select {
		case m, ok := <-msgs:
			if !ok {
				return added
			}
			q.add(m, len(msgs))
			added = true
		default:
			return added
		}
	}
	return added
}

// head returns the next run for the task loop, nil if there is none. The
// pump never appends to a run it has handed over: pop removes it first.
func (q *pumpQueue) head() []*sarama.ConsumerMessage {
	if len(q.runs) == 0 {
		return nil
	}
	return q.runs[0]
}

// pop removes the head run, which the task loop took.
func (q *pumpQueue) pop() {
	q.bytes -= q.sizes[0]
	q.runs[0] = nil
	q.runs, q.sizes = q.runs[1:], q.sizes[1:]
	if q.paused && q.bytes <= pumpQueueBytes/2 {
		q.paused = false
	}
}

// fail reports a pump's error to the task loop, unless the task is ending
// (the loop may have returned on another pump's error).
func fail(ctx context.Context, failed chan<- error, err error) {
	select {
	case failed <- err:
	case <-ctx.Done():
	}
}

// loop is the task loop: records, flushes of batches that waited
// FlushInterval, partitions discovered, leader control messages, and tries
// to reopen lost outputs (with their replays), one at a time. found is nil
// without discovery.
func (s *sourceTask) loop(ctx context.Context, r *partitionReaders, found <-chan []discovered) error {
	// The flush timer runs only while items wait in a batch: an idle
	// source costs nothing, however many there are on the worker. The
	// reopen timer runs only while an output is lost.
	flush := time.NewTimer(s.env.cfg.FlushInterval)
	flush.Stop()
	armed := false
	defer flush.Stop()
	reopen := time.NewTimer(reopenInterval)
	reopen.Stop()
	reopenArmed := false
	defer reopen.Stop()
	// A restored source catching up looks, every catchUpProbeEvery,
	// whether a partition that sent nothing has records left below its
	// end offset at all, and says how it goes.
	var catchUpC <-chan time.Time
	if s.catchUp != nil {
		t := time.NewTicker(catchUpProbeEvery)
		defer t.Stop()
		catchUpC = t.C
	}
	for {
		if !armed && s.batched > 0 {
			flush.Reset(s.env.cfg.FlushInterval)
			armed = true
		}
		if !reopenArmed && s.nLost > 0 {
			reopen.Reset(reopenInterval)
			reopenArmed = true
		}
		records := r.merged
		if s.halted {
			records = nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-r.failed:
			return err
		case batch := <-found:
			if err := s.readDiscovered(r, batch); err != nil {
				return err
			}
		case msgs := <-records:
			for _, msg := range msgs {
				if err := s.process(ctx, msg); err != nil {
					return err
				}
			}
			s.in.Add(float64(len(msgs)))
			s.recordsIn += int64(len(msgs))
		case <-flush.C:
			armed = false
			if err := s.flushAll(ctx); err != nil {
				return err
			}
		case <-reopen.C:
			reopenArmed = false
			if err := s.reopenLost(ctx); err != nil {
				return err
			}
		case <-catchUpC:
			if s.catchUp == nil {
				catchUpC = nil
			} else {
				s.catchUpTick(r)
			}
		case res := <-s.caught.probed:
			if err := s.probed(ctx, res); err != nil {
				return err
			}
			if s.caught.goOn {
				s.probe(r, res.partition)
			}
		case c := <-s.control:
			if c.retarget != nil {
				if err := s.retarget(ctx, c.retarget); err != nil {
					return err
				}
			} else if c.trigger != 0 {
				if err := s.trigger(ctx, c); err != nil {
					return err
				}
			} else if c.complete != 0 {
				s.completed(c.complete, c.offsets, r.lease)
				s.reportLag(r)
			}
		}
	}
}

// trigger takes the checkpoint c triggers, or holds it while a restored
// source catches up (see beginCatchUp): a newer trigger replaces a held
// one, which the leader has aborted or will time out.
func (s *sourceTask) trigger(ctx context.Context, c control) error {
	if s.catchUp != nil {
		s.log.Info("holding a checkpoint trigger until the restored source has caught up", "checkpoint", c.trigger, "until", s.catchUp)
		s.held = &c
		return nil
	}
	return s.checkpoint(ctx, c)
}

// collect is the emit function of Split: it gathers one record's items.
func (s *sourceTask) collect(it operator.Item) { s.scratch = append(s.scratch, it) }

// process splits one record and routes its items: packed into the batch of
// the map task owning their key group, each batch's items after a mark of the
// record they came from, or merged into the output's combiner table. Items
// for a lost output are dropped: its replay sends them once it is reopened.
//
// Full batches and tables are sent after the record, never in the middle of
// its items, so that a batch holds whole records: a map task marks a record
// applied (TaskState.applied) when it has applied a batch's items of it, and
// a record cut across two batches would count as applied before its last
// items came, which a replay after a failure in between would then drop.
func (s *sourceTask) process(ctx context.Context, msg *sarama.ConsumerMessage) error {
	s.offsets[msg.Partition] = msg.Offset + 1
	s.scratch = s.scratch[:0]
	rec := operator.Record{Key: msg.Key, Value: msg.Value, Partition: msg.Partition, Offset: msg.Offset}
	if err := s.op.Split(rec, s.emitItem); err != nil {
		s.skipped.Inc()
		s.log.Debug("skipping malformed record", "partition", msg.Partition, "offset", msg.Offset, "err", err)
		s.progress[msg.Partition] = msg.Offset
		return s.caughtUp(ctx, msg)
	}
	for _, it := range s.scratch {
		kg := operator.KeyGroup(it.Key, s.maxPar)
		o := s.route[kg]
		if s.lost[o] != nil {
			continue
		}
		b := &s.batches[o]
		if b.table != nil {
			if len(b.table.items) == 0 {
				s.batched++
			}
			b.table.add(s.combine, kg, it)
			if len(b.table.items) >= combineMaxKeys && !b.due {
				b.due = true
				s.due = append(s.due, o)
			}
			continue
		}
		if !b.marked || b.markP != msg.Partition || b.markOff != msg.Offset {
			b.w.Record(msg.Partition, msg.Offset)
			b.marked, b.markP, b.markOff = true, msg.Partition, msg.Offset
		}
		b.w.Item(kg, it.Key, it.Num, it.Raw)
		s.batched++
		if !b.due && (b.w.Items() >= s.env.cfg.BatchSize || b.w.Len() >= maxBatchBytes) {
			b.due = true
			s.due = append(s.due, o)
		}
	}
	s.progress[msg.Partition] = msg.Offset
	for _, o := range s.due {
		s.batches[o].due = false
		if err := s.flush(ctx, o); err != nil {
			return err
		}
	}
	s.due = s.due[:0]
	return s.caughtUp(ctx, msg)
}

// startCombining gives every output a combiner table, if the source
// combines: items are merged from here on (see pending).
func (s *sourceTask) startCombining() {
	if s.combine == nil {
		return
	}
	for o := range s.batches {
		s.batches[o].table = newCombineTable()
	}
}

// flush sends output o's pending batch. A combined batch is packed here, its
// merged items followed by a through mark of every partition read: every
// record up to the mark is in it or in an earlier batch. A send that fails
// marks the output lost (markLost) rather than failing the task; only a
// cancelled ctx is returned.
func (s *sourceTask) flush(ctx context.Context, o int) error {
	if s.lost[o] != nil {
		return nil // nothing pending: dropped when it was lost
	}
	b := &s.batches[o]
	if t := b.table; t != nil {
		if len(t.items) == 0 {
			return nil
		}
		s.batched--
		t.packInto(&b.w)
		for _, p := range s.partitions {
			if off, ok := s.progress[p]; ok {
				b.w.Through(p, off)
			}
		}
	} else {
		s.batched -= b.w.Items()
	}
	n := b.w.Items()
	if n == 0 {
		return nil
	}
	b.marked = false
	var began time.Time
	if s.catchUp != nil {
		began = time.Now()
	}
	err := s.outputs[o].sendBatch(ctx, &b.w)
	if !began.IsZero() {
		s.caught.sendWait += time.Since(began)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.markLost(o, fmt.Errorf("send to map task %s: %w", s.mapTasks[o].GetTaskId(), err), nil)
		return nil
	}
	s.out.Add(float64(n))
	s.recordsOut += int64(n)
	return nil
}

// flushAll sends every output's pending batch.
func (s *sourceTask) flushAll(ctx context.Context) error {
	for o := range s.outputs {
		if err := s.flush(ctx, o); err != nil {
			return err
		}
	}
	return nil
}

// checkpoint takes checkpoint id between two records: flush every batch, put
// Barrier(id) on every output, ack with the next offset of each partition.
func (s *sourceTask) checkpoint(ctx context.Context, c control) error {
	id := c.trigger
	if id <= s.lastBarrier {
		s.log.Info("ignoring trigger of an old checkpoint", "checkpoint", id, "last", s.lastBarrier)
		return nil
	}
	if s.nLost > 0 {
		// The leader triggers once every task runs, a restored map task
		// included: a channel lost to it opens now, and is replayed to,
		// before the barrier follows.
		if err := s.reopenLost(ctx); err != nil {
			return err
		}
	}
	if s.nLost > 0 {
		// A map task that gets no barrier from this source would wait for
		// it until the checkpoint times out: decline, so that the leader
		// aborts it now and triggers the next one.
		for o, l := range s.lost {
			if l != nil {
				s.decline(id, fmt.Sprintf("channel to map task %s is lost (%v); reopening it", s.mapTasks[o].GetTaskId(), l.cause))
				break
			}
		}
		return nil
	}
	if err := s.flushAll(ctx); err != nil {
		return err
	}
	// The barrier names what the ack names: the partitions read, and those
	// restored but not read yet (unread).
	offsets := maps.Clone(s.offsets)
	if offsets == nil {
		offsets = map[int32]int64{}
	}
	for p, off := range s.unread {
		offsets[p] = off // nothing read since the restored checkpoint
	}
	barrier := &transport.DataMessage{Payload: &transport.DataMessage_Barrier{Barrier: &transport.Barrier{
		CheckpointId: id, LastCompleted: c.lastCompleted, Savepoint: c.savepoint, Offsets: maps.Clone(offsets), NamesAll: true,
	}}}
	for o, out := range s.outputs {
		if s.lost[o] != nil {
			continue // lost while the batches were flushed
		}
		if err := out.send(ctx, barrier); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			s.markLost(o, fmt.Errorf("send barrier %d to map task %s: %w", id, s.mapTasks[o].GetTaskId(), err), nil)
		}
	}
	// A channel lost while the batches or the barrier were sent did not
	// carry the barrier: the source acks all the same, and declines the
	// checkpoint when it reopens the channel (reopenLost).
	s.lastBarrier = id
	if c.stop {
		// Stop with a savepoint: nothing after the barrier is read, so the
		// savepoint is the job's last state. The leader cancels the job once
		// it completes, or restarts it from its last checkpoint if it fails.
		s.halted = true
		s.log.Info("source stopped at savepoint barrier", "checkpoint", id)
	}
	s.unconfirmed[id] = offsets
	if len(s.unconfirmed) > maxUnconfirmed {
		delete(s.unconfirmed, slices.Min(slices.Collect(maps.Keys(s.unconfirmed))))
	}
	s.acked.Inc()
	s.log.Debug("checkpoint acked", "checkpoint", id, "offsets", offsets)
	s.env.send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
		Task: s.key.ref(), CheckpointId: id,
		State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_SOURCE, Offsets: maps.Clone(offsets),
			RecordsIn: s.recordsIn, RecordsOut: s.recordsOut},
	}}})
	return nil
}

// decline tells the leader the source cannot take checkpoint id.
func (s *sourceTask) decline(id uint64, reason string) {
	s.log.Warn("declining checkpoint", "checkpoint", id, "reason", reason)
	s.env.metrics.checkpointsDecl.WithLabelValues(s.key.job, kindSource).Inc()
	s.env.send(declineMsg(s.key.ref(), id, reason))
}

// reportLag sets the lag metric of every partition the task reads: the end
// offset its consumer last fetched minus the offset of the last completed
// checkpoint (records it has read since count as lag: they are not state
// yet).
func (s *sourceTask) reportLag(r *partitionReaders) {
	topic := s.spec.GetTopic()
	for p, pc := range r.consumers {
		done, ok := s.completedOffsets[p]
		if !ok {
			continue
		}
		end := pc.HighWaterMarkOffset()
		if end <= 0 {
			continue // nothing fetched yet
		}
		s.env.metrics.lag.WithLabelValues(s.key.job, topic, strconv.Itoa(int(p))).Set(float64(max(0, end-done)))
	}
}

// forgetLag removes the task's lag series when it stops, so that a job
// that moved or ended leaves no stale values behind.
func (s *sourceTask) forgetLag() {
	for _, p := range s.partitions {
		s.env.metrics.lag.DeleteLabelValues(s.key.job, s.spec.GetTopic(), strconv.Itoa(int(p)))
	}
}

// completed queues the offsets of completed checkpoint id for the shared
// client's next offset commit: those the leader sent for this task's
// partitions (discovered ones included), else those it acked.
func (s *sourceTask) completed(id uint64, sent map[int32]int64, lease *kafkaLease) {
	offsets := make(map[int32]int64)
	for p, off := range sent {
		if _, own := s.offsets[p]; own {
			offsets[p] = off
		}
	}
	if len(offsets) == 0 {
		offsets = s.unconfirmed[id]
	}
	for c := range s.unconfirmed {
		if c <= id {
			delete(s.unconfirmed, c)
		}
	}
	if len(offsets) > 0 {
		lease.commit(s.group, s.spec.GetTopic(), id, offsets)
		maps.Copy(s.completedOffsets, offsets)
	}
}
