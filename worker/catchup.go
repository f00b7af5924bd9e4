package worker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/IBM/sarama"
)

// A restored partial source catches up to the end offsets its partitions had
// once its outputs were open (beginCatchUp) before it combines or takes a
// checkpoint.
// This file holds how the catch-up ends and how it reports itself.

// caughtUp ends the catch-up of a partial source once msg, just processed,
// took every partition past the end offset it had at the start: the batches
// so far (record-marked) are sent, and from here on items are combined.
func (s *sourceTask) caughtUp(ctx context.Context, msg *sarama.ConsumerMessage) error {
	if s.catchUp == nil {
		return nil
	}
	if end, ok := s.catchUp[msg.Partition]; !ok || msg.Offset+1 < end {
		return nil
	}
	return s.partitionCaughtUp(ctx, msg.Partition)
}

// partitionCaughtUp ends partition p's catch-up, and the task's once every
// partition's is over.
func (s *sourceTask) partitionCaughtUp(ctx context.Context, p int32) error {
	delete(s.catchUp, p)
	if len(s.catchUp) > 0 {
		return nil
	}
	s.catchUp = nil
	if err := s.flushAll(ctx); err != nil {
		return err
	}
	s.startCombining()
	took := time.Since(s.caught.began)
	s.log.Info("restored partial source caught up", "offsets", s.offsets, "combining", s.combine != nil, "held_trigger", s.held != nil,
		"records", s.caught.behind, "took", took.Round(time.Millisecond), "records_per_second", perSecond(s.caught.behind, took),
		"waiting_on_map_tasks", s.caught.sendWait.Round(time.Millisecond))
	s.caught = catchUpProgress{}
	if s.reportCaughtUp != nil {
		s.reportCaughtUp()
	}
	if c := s.held; c != nil {
		s.held = nil
		return s.checkpoint(ctx, *c)
	}
	return nil
}

// catchingUp reports whether the source is catching up (catchUpReporter):
// asked when it calls running, from its goroutine, after beginCatchUp.
func (s *sourceTask) catchingUp() bool { return s.catchUp != nil }

// onCaughtUp sets what partitionCaughtUp calls once the catch-up is over
// (catchUpReporter). It is called before run.
func (s *sourceTask) onCaughtUp(f func()) { s.reportCaughtUp = f }

// catchUpLogEvery is how often a restored source that is still catching up
// says how far it is.
const catchUpLogEvery = 10 * time.Second

// catchUpProgress is how a restored partial source's catch-up goes: a
// catch-up that takes long holds every checkpoint of the job meanwhile, so
// its logs say how fast it reads and how much of that time it waited on map
// tasks (sendBatch), which tells a slow Kafka read from slow map tasks.
type catchUpProgress struct {
	began, logged time.Time
	warned        time.Time     // last warning of a failed probe
	behind        int64         // records to read at the start
	sendWait      time.Duration // time spent in sendBatch since began
	// seen is each partition's offset at the last tick; probing is set
	// while a probe runs, whose result comes on probed.
	seen    map[int32]int64
	probing bool
	probed  chan catchUpProbe
	// passed is, per partition, how far probes from the partition's
	// current offset have found no data: the next probe goes on from there
	// rather than fetch the same bytes again, so a stretch of markers or
	// aborted records longer than one probe reads is passed in several.
	passed map[int32]probePassed
	goOn   bool // the last probe got further: probe on (probed)
}

// probePassed says probes from offset from saw no data below to.
type probePassed struct{ from, to int64 }

// behind returns the records left to read before the catch-up ends.
func (s *sourceTask) behind() int64 {
	var n int64
	for p, end := range s.catchUp {
		if off := s.offsets[p]; off < end {
			n += end - off
		}
	}
	return n
}

// logCatchUp logs the progress of the catch-up under way.
func (s *sourceTask) logCatchUp() {
	now := time.Now()
	left := s.behind()
	took := now.Sub(s.caught.began)
	s.caught.logged = now
	s.log.Info("restored partial source still catching up; the job's checkpoints wait for it",
		"records_left", left, "records_read", s.caught.behind-left, "for", took.Round(time.Millisecond),
		"records_per_second", perSecond(s.caught.behind-left, took), "waiting_on_map_tasks", s.caught.sendWait.Round(time.Millisecond),
		"offsets", s.offsets, "until", s.catchUp, "probes_passed", s.caught.passed)
}

// perSecond returns n per d, truncated, 0 for no time.
func perSecond(n int64, d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64(float64(n) / d.Seconds())
}

// catchUpProbeEvery is how often a catching-up source looks at partitions
// that sent nothing since the last look.
const catchUpProbeEvery = time.Second

// catchUpProbe is what a probe found about partition p when the source's
// offset in it was from.
type catchUpProbe struct {
	partition int32
	from      int64
	none      bool  // no record of data in [from, end)
	passed    int64 // no record of data in [from, passed), when not none
	err       error
}

// catchUpTick logs the catch-up's progress every catchUpLogEvery, and
// probes one partition that is still behind but sent nothing since the last
// tick. Records a consumer never hands over hold such a partition below its
// end offset: transaction markers (control records) at the end of a topic
// written transactionally, such as another job's exactly-once output. The
// catch-up would then wait for the next record of data, forever on an idle
// topic, and the job's checkpoints with it.
func (s *sourceTask) catchUpTick(r *partitionReaders) {
	if time.Since(s.caught.logged) >= catchUpLogEvery {
		s.logCatchUp()
	}
	if s.caught.probing {
		return
	}
	for p := range s.catchUp {
		from := s.offsets[p]
		idle := s.caught.seen[p] == from
		s.caught.seen[p] = from
		if !idle {
			continue
		}
		s.probe(r, p)
		return
	}
}

// probe starts a probe of partition p, which is catching up, from where
// the last probes from its offset stopped (catchUpProgress.passed).
func (s *sourceTask) probe(r *partitionReaders, p int32) {
	from, end := s.offsets[p], s.catchUp[p]
	start := from
	if done, ok := s.caught.passed[p]; ok && done.from == from {
		start = done.to
	}
	s.caught.probing = true
	topic, client, results, isolation := s.spec.GetTopic(), r.lease.client, s.caught.probed, s.isolation()
	r.lingering.Go(func() {
		none, passed, err := dataBelow(client, topic, p, start, end, isolation)
		select {
		case results <- catchUpProbe{partition: p, from: from, none: none, passed: passed, err: err}:
		case <-r.ctx.Done():
		}
	})
}

// probed ends partition res.partition's catch-up if the probe found no data
// below its end offset and the partition has sent nothing since: every
// record of data below the end is then processed. A probe that got further
// than the last without seeing the end sets caught.goOn: the caller probes
// on at once rather than at the next tick, so a long stretch without data
// takes a probe's time per probeFetches fetches, not a tick's.
func (s *sourceTask) probed(ctx context.Context, res catchUpProbe) error {
	s.caught.probing = false
	s.caught.goOn = false
	if s.catchUp == nil {
		return nil
	}
	end, ok := s.catchUp[res.partition]
	switch {
	case !ok || s.offsets[res.partition] != res.from:
		return nil // caught up or read on meanwhile
	case res.err != nil:
		if prev := s.caught.passed[res.partition]; res.passed > res.from && (prev.from != res.from || res.passed > prev.to) {
			// Progress: the next probe goes on from here.
			if s.caught.passed == nil {
				s.caught.passed = make(map[int32]probePassed)
			}
			s.caught.passed[res.partition] = probePassed{from: res.from, to: res.passed}
			s.caught.goOn = true
			return nil
		}
		// Every tick otherwise: the progress log repeats it.
		if time.Since(s.caught.warned) >= catchUpLogEvery {
			s.caught.warned = time.Now()
			s.log.Warn("restored partial source: a partition sends nothing and a look below its end offset found no answer; trying again",
				"partition", res.partition, "offset", res.from, "end", end, "err", res.err)
		}
		return nil
	case !res.none:
		return nil
	}
	s.log.Info("restored partial source: no records of data left below the end offset of a partition (transaction markers, or reading committed records of aborted transactions); it is caught up",
		"partition", res.partition, "offset", res.from, "end", end)
	return s.partitionCaughtUp(ctx, res.partition)
}

// Bounds of a probe (dataBelow): its fetches, and the bytes of each. A
// fetch returns records of one log segment at most, so crossing the end of a
// segment takes another.
const (
	probeFetches    = 16
	probeFetchBytes = 64 << 10
)

// errProbeShort says a probe could not see up to the end offset.
var errProbeShort = errors.New("could not read up to the end offset")

// dataBelow reports whether the records of topic/p in [from, end) hold none
// of data a consumer at isolation hands over: only control records
// (transaction markers), and reading committed, records of aborted
// transactions. It fetches from from, and on from where each fetch
// ended, until it finds a record of data (false), has seen every offset
// below end (true), or cannot go on: a fetch that makes no progress (a
// partition whose high watermark is below end, say, on a new leader),
// probeFetches fetches, or batches sarama leaves out of its answers (batches
// emptied by compaction) give an error wrapping errProbeShort, which the
// caller retries later. With that error, passed is the offset below which it
// saw no data: a retry can start there.
func dataBelow(client sarama.Client, topic string, p int32, from, end int64, isolation sarama.IsolationLevel) (none bool, passed int64, err error) {
	covered := from
	for range probeFetches {
		next, data, err := probeFetch(client, topic, p, covered, end, isolation)
		switch {
		case err != nil:
			return false, covered, err
		case data:
			return false, covered, nil
		case next >= end:
			return true, end, nil
		case next <= covered:
			return false, covered, fmt.Errorf("%w: a fetch of %s/%d from %d returned nothing below %d", errProbeShort, topic, p, covered, end)
		}
		covered = next
	}
	return false, covered, fmt.Errorf("%w: %d fetches of %s/%d read from %d to %d, below %d", errProbeShort, probeFetches, topic, p, from, covered, end)
}

// probeFetch fetches topic/p from offset from at isolation and returns the
// offset after the last whole batch it returned, and whether a record of
// data below end is among them. A leader that is not one any more has the
// client refresh the topic's metadata for the next try.
func probeFetch(client sarama.Client, topic string, p int32, from, end int64, isolation sarama.IsolationLevel) (next int64, data bool, err error) {
	broker, err := client.Leader(topic, p)
	if err != nil {
		return 0, false, fmt.Errorf("leader of %s/%d: %w", topic, p, err)
	}
	// The partition's bound is the one that applies, as in Kafka's
	// consumer (fetch.max.bytes above max.partition.fetch.bytes): kfake
	// leaves out the aborted transactions of a partition cut short by the
	// request's bound.
	req := &sarama.FetchRequest{Version: 4, MaxWaitTime: 0, MinBytes: 1, MaxBytes: 2 * probeFetchBytes, Isolation: isolation}
	req.AddBlock(topic, p, from, probeFetchBytes, -1)
	resp, err := broker.Fetch(req)
	if err != nil {
		return 0, false, fmt.Errorf("fetch %s/%d from %d: %w", topic, p, from, err)
	}
	block := resp.GetBlock(topic, p)
	if block == nil {
		return 0, false, fmt.Errorf("fetch %s/%d from %d: no answer for the partition", topic, p, from)
	}
	if !errors.Is(block.Err, sarama.ErrNoError) {
		if errors.Is(block.Err, sarama.ErrNotLeaderForPartition) || errors.Is(block.Err, sarama.ErrUnknownTopicOrPartition) {
			_ = client.RefreshMetadata(topic)
		}
		return 0, false, fmt.Errorf("fetch %s/%d from %d: %w", topic, p, from, block.Err)
	}
	// Reading committed, the broker lists the transactions it aborted that
	// overlap the records it returns: a transactional batch of such a
	// producer, from the transaction's first offset up to the producer's
	// next marker, is not handed over, as Kafka's consumer does it.
	abortedFrom := slices.SortedFunc(slices.Values(block.AbortedTransactions), func(a, b *sarama.AbortedTransaction) int {
		return cmp.Compare(a.FirstOffset, b.FirstOffset)
	})
	aborted := make(map[int64]bool)
	next = from
	for _, rs := range block.RecordsSet {
		b := rs.RecordBatch
		if b == nil {
			return next, true, nil // a legacy message set: data
		}
		if b.PartialTrailingRecord {
			break
		}
		last := b.FirstOffset + int64(b.LastOffsetDelta)
		for len(abortedFrom) > 0 && abortedFrom[0].FirstOffset <= last {
			aborted[abortedFrom[0].ProducerID] = true
			abortedFrom = abortedFrom[1:]
		}
		if b.Control {
			// The marker ends its producer's transaction. Kafka's
			// consumer clears the producer at an abort marker only; a
			// producer runs one transaction at a time, so no commit marker
			// of it falls inside an aborted one, and clearing at any
			// marker needs no parsing of the control record.
			delete(aborted, b.ProducerID)
		}
		if !b.Control && !(b.IsTransactional && aborted[b.ProducerID]) {
			for _, rec := range b.Records {
				if off := b.FirstOffset + rec.OffsetDelta; off >= from && off < end {
					return next, true, nil
				}
			}
		}
		next = max(next, b.FirstOffset+int64(b.LastOffsetDelta)+1)
		if next >= end {
			break
		}
	}
	return next, false, nil
}
