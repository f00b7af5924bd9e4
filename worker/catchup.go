package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/IBM/sarama"
)

// A restored partial source catches up to the end offsets its partitions had
// when it started (resolveOffsets) before it combines or takes a checkpoint.
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
	if c := s.held; c != nil {
		s.held = nil
		return s.checkpoint(ctx, *c)
	}
	return nil
}

// catchUpLogEvery is how often a restored source that is still catching up
// says how far it is.
const catchUpLogEvery = 10 * time.Second

// catchUpProgress is how a restored partial source's catch-up goes: a
// catch-up that takes long holds every checkpoint of the job meanwhile, so
// its logs say how fast it reads and how much of that time it waited on map
// tasks (sendBatch), which tells a slow Kafka read from slow map tasks.
type catchUpProgress struct {
	began, logged time.Time
	behind        int64         // records to read at the start
	sendWait      time.Duration // time spent in sendBatch since began
	// seen is each partition's offset at the last tick; probing is set
	// while a probe runs, whose result comes on probed.
	seen    map[int32]int64
	probing bool
	probed  chan catchUpProbe
}

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
		"offsets", s.offsets, "until", s.catchUp)
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

// catchUpProbe is what a probe found about partition p from offset from.
type catchUpProbe struct {
	partition int32
	from      int64
	none      bool // no record of data in [from, end)
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
	for p, end := range s.catchUp {
		from := s.offsets[p]
		idle := s.caught.seen[p] == from
		s.caught.seen[p] = from
		if !idle {
			continue
		}
		s.caught.probing = true
		topic, client, results := s.spec.GetTopic(), r.lease.client, s.caught.probed
		r.wg.Go(func() {
			none, err := dataBelow(client, topic, p, from, end)
			select {
			case results <- catchUpProbe{partition: p, from: from, none: none, err: err}:
			case <-r.ctx.Done():
			}
		})
		return
	}
}

// probed ends partition res.partition's catch-up if the probe found no data
// below its end offset and the partition has sent nothing since: every
// record of data below the end is then processed.
func (s *sourceTask) probed(ctx context.Context, res catchUpProbe) error {
	s.caught.probing = false
	if s.catchUp == nil {
		return nil
	}
	end, ok := s.catchUp[res.partition]
	switch {
	case !ok || s.offsets[res.partition] != res.from:
		return nil // caught up or read on meanwhile
	case res.err != nil:
		s.log.Warn("restored partial source: probe of a partition that sends nothing failed; trying again", "partition", res.partition, "offset", res.from, "err", res.err)
		return nil
	case !res.none:
		return nil
	}
	s.log.Info("restored partial source: no records of data left below the end offset of a partition (transaction markers only); it is caught up",
		"partition", res.partition, "offset", res.from, "end", end)
	return s.partitionCaughtUp(ctx, res.partition)
}

// dataBelow fetches topic/p from offset from and reports whether the
// records before end hold none of data: only control records (transaction
// markers), which consumers never hand over. It answers true only when the
// fetch covered every offset up to end.
func dataBelow(client sarama.Client, topic string, p int32, from, end int64) (none bool, err error) {
	broker, err := client.Leader(topic, p)
	if err != nil {
		return false, fmt.Errorf("leader of %s/%d: %w", topic, p, err)
	}
	req := &sarama.FetchRequest{Version: 4, MaxWaitTime: 0, MinBytes: 1, MaxBytes: 1 << 20, Isolation: sarama.ReadUncommitted}
	req.AddBlock(topic, p, from, 1<<20, -1)
	resp, err := broker.Fetch(req)
	if err != nil {
		return false, fmt.Errorf("fetch %s/%d from %d: %w", topic, p, from, err)
	}
	block := resp.GetBlock(topic, p)
	if block == nil {
		return false, fmt.Errorf("fetch %s/%d from %d: no answer for the partition", topic, p, from)
	}
	if !errors.Is(block.Err, sarama.ErrNoError) {
		return false, fmt.Errorf("fetch %s/%d from %d: %w", topic, p, from, block.Err)
	}
	covered := from
	for _, rs := range block.RecordsSet {
		b := rs.RecordBatch
		if b == nil {
			return false, nil // a legacy message set: data
		}
		if b.PartialTrailingRecord {
			break
		}
		if !b.Control {
			for _, rec := range b.Records {
				if off := b.FirstOffset + rec.OffsetDelta; off >= from && off < end {
					return false, nil
				}
			}
		}
		covered = max(covered, b.FirstOffset+int64(b.LastOffsetDelta)+1)
		if covered >= end {
			return true, nil
		}
	}
	return covered >= end, nil
}
