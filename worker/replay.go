package worker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// A source task whose channel to a map task breaks does not fail: it marks
// the output lost, serves its other outputs, and tries to reopen the lost one
// every reopenInterval, each try bounded by reopenTry so that the task loop
// (and with it the other outputs) never waits long. Once reopened, the output
// first gets a replay of the items of its key groups that it may have missed,
// read again from Kafka, then the live stream. A map task restored elsewhere
// by task-scoped recovery (RetargetTasks) is reached the same way.
const (
	reopenInterval = 150 * time.Millisecond
	reopenTry      = 250 * time.Millisecond
)

// lostOutput is the state of a source task's output whose channel is lost:
// since when, why, and where its replay starts.
type lostOutput struct {
	since time.Time
	// restoring is when a try to reopen it last found the map task still
	// restoring its state: the loss is timed from then, since a restore
	// takes as long as the state is large (the leader's deploy timeout
	// bounds it), as openOutput's open timeout starts over.
	restoring time.Time
	// cause is why the channel was lost; last is the latest failed try to
	// reopen it. Both go into the task's error if it is not reopened within
	// OutputLostTimeout.
	cause, last error
	// from are the offsets the replay starts at, per partition
	// (RetargetTasks.restore_offsets): the map task was restored from that
	// checkpoint. nil: it was not restored, so everything up to the last
	// completed checkpoint is in its state (see replayStart).
	from map[int32]int64
}

// markLost closes output o and marks it lost for cause: its pending batch or
// table is dropped, and so are the items routed to it until it is reopened;
// the replay sends them all. from are the replay's start offsets, if the map
// task was restored (nil keeps those of an earlier loss not yet replayed).
// Task loop only.
func (s *sourceTask) markLost(o int, cause error, from map[int32]int64) {
	if out := s.outputs[o]; out != nil {
		out.close()
		s.outputs[o] = nil
		s.publish(o)
	}
	b := &s.batches[o]
	if t := b.table; t != nil {
		if len(t.items) > 0 {
			s.batched--
		}
		clear(t.index)
		clear(t.items)
		t.items = t.items[:0]
	}
	s.batched -= b.w.Items()
	b.w.Reset()
	b.marked = false
	l := s.lost[o]
	if l == nil {
		l = &lostOutput{}
		s.lost[o] = l
		s.nLost++
	}
	l.since, l.cause, l.last = time.Now(), cause, nil
	if from != nil {
		l.from = from
	}
	mt := s.mapTasks[o]
	s.log.Warn("output to map task lost: serving the other outputs, reopening it and replaying to it",
		"map_task", mt.GetTaskId(), "map_worker", mt.GetWorkerId(), "map_attempt", mt.GetAttempt(),
		"cause", cause, "lost_timeout", s.env.cfg.OutputLostTimeout)
}

// reopenLost makes one try to reopen each lost output, and replays to each
// one that opens. It fails the task when an output has been lost for
// OutputLostTimeout, or when a replay cannot be done (see replay). Task loop
// only; it blocks for up to reopenTry per lost output, and for the replays.
func (s *sourceTask) reopenLost(ctx context.Context) error {
	for o, l := range s.lost {
		if l == nil {
			continue
		}
		mt := s.mapTasks[o]
		out, err := s.dial(ctx, o)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			l.last = err
			if mapRestoring(err) {
				l.restoring = time.Now()
			}
			if lost := time.Since(l.since); lost >= s.env.cfg.OutputLostTimeout && time.Since(l.restoring) >= s.env.cfg.OutputLostTimeout {
				return fmt.Errorf("channel to map task %s on worker %s lost for %s (output lost timeout %s): %v; last try to reopen it: %w",
					mt.GetTaskId(), mt.GetWorkerId(), lost.Round(time.Millisecond), s.env.cfg.OutputLostTimeout, l.cause, err)
			}
			s.log.Debug("reopening a lost output failed; retrying", "map_task", mt.GetTaskId(), "err", err)
			continue
		}
		s.outputs[o] = out
		s.publish(o)
		s.lost[o] = nil
		s.nLost--
		s.log.Info("reopened lost output", "map_task", mt.GetTaskId(), "map_worker", mt.GetWorkerId(),
			"map_attempt", mt.GetAttempt(), "lost_for", time.Since(l.since).Round(time.Millisecond))
		if _, open := s.unconfirmed[s.lastBarrier]; open && l.from == nil {
			// The map task lives on (a blip, not a recovery, whose
			// retarget carries replay offsets and follows an abort), and
			// the last barrier, sent before the loss, may not have reached
			// it: the reopened channel does not carry it, and the map task
			// would align it over its other inputs and hold them until it
			// timed out. Declined; a decline the map task's ack disproves
			// is dropped by the leader.
			s.decline(s.lastBarrier, fmt.Sprintf("channel to map task %s was lost before checkpoint %d completed (%v): its barrier may not have reached it", mt.GetTaskId(), s.lastBarrier, l.cause))
		}
		if err := s.replay(ctx, o, l.from); err != nil {
			return err
		}
	}
	return nil
}

// dialOutput makes one short attempt (reopenTry) to open output o, where
// openOutput retries for ChannelOpenTimeout: the task loop must not wait on
// one output while the others have records to send.
func (s *sourceTask) dialOutput(ctx context.Context, o int) (output, error) {
	mt := s.mapTasks[o]
	header := s.header(mt)
	if mt.GetWorkerId() == s.env.workerID {
		return openLocal(ctx, s.env, header, mt, reopenTry, false)
	}
	// A remote stream lives as long as the ctx it was opened with: one
	// openRemote try, bounded by its limit instead.
	if mt.GetDataAddr() == "" {
		return nil, fmt.Errorf("map task %s on worker %s has no data address", mt.GetTaskId(), mt.GetWorkerId())
	}
	conn, err := s.env.conns.get(mt.GetDataAddr())
	if err != nil {
		return nil, err
	}
	out, err := openRemote(ctx, transport.NewDataClient(conn), header, reopenTry)
	if err != nil {
		return nil, fmt.Errorf("open data channel to %s at %s: %w", mt.GetTaskId(), mt.GetDataAddr(), err)
	}
	return out, nil
}

// retarget acts on a RetargetTasks: every map task that runs elsewhere or in
// another attempt now (task-scoped recovery restored it) gets its new ref;
// its old channel is closed and the output is lost with the replay starting
// at the restored checkpoint's offsets, and reopened at once if the map task
// is ready (else by the reopen timer). The key-group ranges must be the
// ones the source routes by: a retarget moves tasks, it does not rescale.
// Task loop only.
func (s *sourceTask) retarget(ctx context.Context, rt *transport.RetargetTasks) error {
	byID := make(map[string]int, len(s.mapTasks))
	for o, mt := range s.mapTasks {
		byID[mt.GetTaskId()] = o
	}
	var moved []string
	for _, ref := range rt.GetMapTasks() {
		o, ok := byID[ref.GetTaskId()]
		if !ok {
			return fmt.Errorf("retarget of job %s (attempt %d): map task %s is not one this source sends to", rt.GetJobId(), rt.GetAttempt(), ref.GetTaskId())
		}
		cur := s.mapTasks[o]
		if ref.GetKeyGroupStart() != cur.GetKeyGroupStart() || ref.GetKeyGroupEnd() != cur.GetKeyGroupEnd() {
			return fmt.Errorf("retarget of job %s (attempt %d): map task %s has key groups [%d, %d), this source routes [%d, %d) to it",
				rt.GetJobId(), rt.GetAttempt(), ref.GetTaskId(), ref.GetKeyGroupStart(), ref.GetKeyGroupEnd(), cur.GetKeyGroupStart(), cur.GetKeyGroupEnd())
		}
		newAttempt := ref.GetAttempt()
		if newAttempt == 0 {
			newAttempt = s.key.attempt // as in header: the deploy's attempt
		}
		curAttempt := s.header(cur).GetAttempt()
		if newAttempt < curAttempt {
			s.log.Info("retarget: ignoring the ref of a map task older than the one the source sends to",
				"map_task", ref.GetTaskId(), "ref_attempt", newAttempt, "attempt", curAttempt)
			continue
		}
		if ref.GetWorkerId() == cur.GetWorkerId() && ref.GetDataAddr() == cur.GetDataAddr() && newAttempt == curAttempt {
			continue
		}
		next := &transport.MapTaskRef{
			TaskId: ref.GetTaskId(), Index: cur.GetIndex(), WorkerId: ref.GetWorkerId(), DataAddr: ref.GetDataAddr(),
			KeyGroupStart: ref.GetKeyGroupStart(), KeyGroupEnd: ref.GetKeyGroupEnd(), Attempt: newAttempt,
		}
		s.mapTasks[o] = next
		s.markLost(o, fmt.Errorf("map task %s restored on worker %s in attempt %d from checkpoint %d (task-scoped recovery)",
			ref.GetTaskId(), ref.GetWorkerId(), newAttempt, rt.GetRestoreCheckpointId()), replayFrom(rt.GetRestoreOffsets()))
		moved = append(moved, ref.GetTaskId())
	}
	s.log.Info("retarget", "retarget_attempt", rt.GetAttempt(), "restored", rt.GetRestored(), "moved", moved,
		"checkpoint", rt.GetRestoreCheckpointId(), "restore_offsets", rt.GetRestoreOffsets())
	if len(moved) == 0 {
		return nil
	}
	return s.reopenLost(ctx)
}

// replayFrom copies a retarget's restore offsets; a retarget without any
// still names a restore (an empty map, not nil: see lostOutput.from).
func replayFrom(offsets map[int32]int64) map[int32]int64 {
	from := maps.Clone(offsets)
	if from == nil {
		from = map[int32]int64{}
	}
	return from
}

// replayStart is where output o's replay of partition p starts: the restored
// checkpoint's offset (from, when the map task was restored), else the last
// completed checkpoint's (the map task has applied everything before it),
// else where this attempt started reading p (its restored state covers what
// came before).
func (s *sourceTask) replayStart(p int32, from map[int32]int64) int64 {
	if from != nil {
		if off, ok := from[p]; ok {
			return off
		}
		// Not in the restored checkpoint: a partition found after it, read
		// from its start by this attempt.
		return s.startOffsets[p]
	}
	if off, ok := s.completedOffsets[p]; ok {
		return off
	}
	return s.startOffsets[p]
}

// errReplayLost ends a replay whose output broke again: the output is lost
// once more (and replayed to from the start again when reopened), which is
// not a failure of the task.
var errReplayLost = errors.New("output lost during the replay")

// replay sends output o, before any live item, the items of its key groups of
// every record the source has read (up to s.offsets, exclusive) from the
// replay's start offsets (replayStart), as record-marked batches of whole
// records: the map task drops the ones it has applied already. Records at or
// beyond s.offsets, which the live stream sends, are not replayed.
//
// The records are read again from Kafka on a client of the replay's own:
// the task's consumers already serve the partitions, and a broker answers
// the requests of one connection in order, so on the shared client each
// fetch of the replay would wait behind the live consumers' long polls
// (Consumer.MaxWaitTime). The partitions are read at once (sarama batches
// the partitions a consumer starts together into one subscription), within
// ReplayTimeout.
//
// A replay that cannot be done fails the task, saying why (records no
// longer in Kafka, Kafka unreachable or too slow): the leader then restarts
// the whole job, which is exact again. An output that breaks during the
// replay is lost again, not a failure. Task loop only: the other outputs
// wait for the replay, which covers about one checkpoint interval.
func (s *sourceTask) replay(ctx context.Context, o int, from map[int32]int64) error {
	mt := s.mapTasks[o]
	topic := s.spec.GetTopic()
	ranges := make(map[int32][2]int64)
	for _, p := range s.partitions {
		start, end := s.replayStart(p, from), s.offsets[p]
		if start > end {
			// The restored map task's state holds records this attempt
			// never read (its offsets were reset: a topic recreated, records
			// expired): no replay can make its state and the stream agree.
			return fmt.Errorf("replay of %s/%d to map task %s: the replay would start at offset %d, past the %d this attempt has read (the restored checkpoint's offsets are not where this attempt started reading); the job restarts whole",
				topic, p, mt.GetTaskId(), start, end)
		}
		if start < end {
			ranges[p] = [2]int64{start, end}
		}
	}
	log := s.log.With("map_task", mt.GetTaskId(), "map_worker", mt.GetWorkerId(), "map_attempt", mt.GetAttempt())
	if len(ranges) == 0 {
		log.Info("replay: nothing to replay", "offsets", s.offsets)
		return nil
	}
	log.Info("replay start", "ranges", ranges, "restored", from != nil)
	began := time.Now()
	rctx, cancel := context.WithTimeout(ctx, s.env.cfg.ReplayTimeout)
	defer cancel()
	r := &replayer{s: s, o: o, from: from, next: make(map[int32]int64)}
	r.emit = func(it operator.Item) { r.scratch = append(r.scratch, it) }
	err := r.run(rctx, ranges)
	if err == nil {
		err = r.send(rctx)
	}
	switch {
	case err == nil:
		log.Info("replay end", "ranges", ranges, "records", r.records, "items", r.items, "batches", r.batches,
			"duration", time.Since(began).Round(time.Millisecond))
		return nil
	case errors.Is(err, errReplayLost):
		log.Warn("replay: the output broke again; replaying again once it is reopened", "records", r.records, "items", r.items)
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case rctx.Err() != nil:
		return fmt.Errorf("replay to map task %s: %s %v not read within the replay timeout %s (read up to %v): %w",
			mt.GetTaskId(), topic, ranges, s.env.cfg.ReplayTimeout, r.next, err)
	default:
		return fmt.Errorf("replay to map task %s: %w", mt.GetTaskId(), err)
	}
}

// replayer is one replay's state: the batch being packed, a scratch of one
// record's items, and counts for the log.
type replayer struct {
	s       *sourceTask
	o       int
	from    map[int32]int64 // the replay's start offsets, kept if it is lost again
	w       transport.BatchWriter
	scratch []operator.Item
	emit    func(operator.Item)
	// next is, per partition, the offset after the last record replayed.
	next                    map[int32]int64
	records, items, batches int
}

// replayed is what a partition reader hands the replay: a record, or the
// end of its partition (msg nil), or an error.
type replayed struct {
	p   int32
	msg *sarama.ConsumerMessage
	err error
}

// run reads ranges (partition -> [start, end)) on a client of its own, one
// reader goroutine per partition, and replays the records in the order each
// partition has them.
func (r *replayer) run(ctx context.Context, ranges map[int32][2]int64) error {
	s := r.s
	topic := s.spec.GetTopic()
	conf := kafkaConfig(s.env.cfg, s.env.kafka.clientID+"-replay")
	// The replay hands over what the source was handed: reading committed,
	// not the records of aborted transactions.
	conf.Consumer.IsolationLevel = s.isolation()
	client, err := sarama.NewClient(s.spec.GetBrokers(), conf)
	if err != nil {
		return fmt.Errorf("connect to brokers %v: %w", s.spec.GetBrokers(), err)
	}
	consumer, err := sarama.NewConsumerFromClient(client)
	if err != nil {
		_ = client.Close()
		return fmt.Errorf("create consumer: %w", err)
	}
	var pcs []sarama.PartitionConsumer
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		// The readers go first, then the consumers, in the background:
		// closing a partition consumer waits for its fetch in flight, a
		// long poll of up to Consumer.MaxWaitTime after the last records,
		// which the task loop need not wait for; a stopping worker waits
		// for it with the pool's other closes (kafkaPool.wait).
		stop()
		wg.Wait()
		p := s.env.kafka
		p.mu.Lock()
		done := p.closingOne()
		p.mu.Unlock()
		go func() {
			defer p.closed(done)
			for _, pc := range pcs {
				_ = pc.Close()
			}
			_ = consumer.Close()
			_ = client.Close()
		}()
	}()
	got := make(chan replayed)
	for _, p := range slices.Sorted(maps.Keys(ranges)) {
		rg := ranges[p]
		r.next[p] = rg[0]
		pc, err := consumer.ConsumePartition(topic, p, rg[0])
		if errors.Is(err, sarama.ErrOffsetOutOfRange) {
			return fmt.Errorf("records of %s/%d from offset %d are no longer in Kafka (expired or deleted): %w", topic, p, rg[0], err)
		} else if err != nil {
			return fmt.Errorf("consume %s/%d from offset %d: %w", topic, p, rg[0], err)
		}
		pcs = append(pcs, pc)
		wg.Go(func() { r.read(rctx, pc, p, rg[0], rg[1], got) })
	}
	for left := len(ranges); left > 0; {
		var g replayed
		select {
		case <-ctx.Done():
			return ctx.Err()
		case g = <-got:
		}
		switch {
		case g.err != nil:
			return g.err
		case g.msg == nil:
			left--
		default:
			r.next[g.p] = g.msg.Offset + 1
			if err := r.record(ctx, g.msg); err != nil {
				return err
			}
		}
	}
	return nil
}

// read hands got the records of pc in [start, end), then the end of the
// partition, or an error that ends the replay: the first record at or
// beyond end, or the one at end-1, ends it. It returns when ctx ends.
func (r *replayer) read(ctx context.Context, pc sarama.PartitionConsumer, p int32, start, end int64, got chan<- replayed) {
	topic := r.s.spec.GetTopic()
	hand := func(g replayed) bool {
		select {
		case got <- g:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-pc.Errors():
			if !ok {
				hand(replayed{p: p, err: fmt.Errorf("consumer of %s/%d stopped", topic, p)})
				return
			}
			if errors.Is(e.Err, sarama.ErrOffsetOutOfRange) {
				hand(replayed{p: p, err: fmt.Errorf("records of %s/%d from offset %d are no longer in Kafka (expired or deleted): %w", topic, p, start, e.Err)})
				return
			}
			// Transient (a broker moving, a timeout): the replay timeout
			// bounds how long it may last.
			r.s.log.Debug("replay: kafka consumer error", "partition", p, "err", e.Err)
		case msg, ok := <-pc.Messages():
			switch {
			case !ok:
				hand(replayed{p: p, err: fmt.Errorf("consumer of %s/%d stopped", topic, p)})
				return
			case msg.Offset < start:
				continue
			case msg.Offset >= end:
				// The record at end-1 was not one (a gap of a compacted
				// topic, a transaction marker).
				hand(replayed{p: p})
				return
			}
			if !hand(replayed{p: p, msg: msg}) {
				return
			}
			if msg.Offset >= end-1 {
				hand(replayed{p: p})
				return
			}
		}
	}
}

// record adds the items of msg that route to the output, after a mark of
// msg, and sends the batch once it is full: between records, as process does.
// A record Split rejects is skipped, as it was when it was first read.
func (r *replayer) record(ctx context.Context, msg *sarama.ConsumerMessage) error {
	s := r.s
	r.records++
	r.scratch = r.scratch[:0]
	rec := operator.Record{Key: msg.Key, Value: msg.Value, Partition: msg.Partition, Offset: msg.Offset}
	if err := s.op.Split(rec, r.emit); err != nil {
		return nil
	}
	marked := false
	for _, it := range r.scratch {
		kg := operator.KeyGroup(it.Key, s.maxPar)
		if s.route[kg] != r.o {
			continue
		}
		if !marked {
			r.w.Record(msg.Partition, msg.Offset)
			marked = true
		}
		r.w.Item(kg, it.Key, it.Num, it.Raw)
	}
	if r.w.Items() >= s.env.cfg.BatchSize || r.w.Len() >= maxBatchBytes {
		return r.send(ctx)
	}
	return nil
}

// send sends the packed batch, if any. A send that fails marks the output
// lost again (keeping the replay's start) and returns errReplayLost.
func (r *replayer) send(ctx context.Context) error {
	n := r.w.Items()
	if n == 0 {
		r.w.Reset() // marks of records without items for the output
		return nil
	}
	s := r.s
	if err := s.outputs[r.o].sendBatch(ctx, &r.w); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.markLost(r.o, fmt.Errorf("replay to map task %s: send: %w", s.mapTasks[r.o].GetTaskId(), err), r.from)
		return errReplayLost
	}
	r.items += n
	r.batches++
	return nil
}
