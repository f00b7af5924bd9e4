package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// The write path. Every command this node commits as leader, from the leader
// loop and from the HTTP API alike, goes through one committer:
//
//   - submit never blocks: it queues the command and returns;
//   - the committer's loop takes every command that waits (up to
//     maxBatchCommands and maxBatchBytes) into one Raft entry, a batch when
//     there are several (group commit: fsm.CommandFramedBatch once every
//     coordinator knows it, fsm.CommandBatch before);
//   - up to maxEntriesInFlight entries are in Raft's pipeline at once; while
//     they are, new commands accumulate into the next batch, so the batch
//     size follows the load and an idle group still commits one command with
//     one entry's latency;
//   - an entry of minCompressBytes or more is compressed
//     (fsm.CommandCompressed) once every coordinator knows that type, when
//     that makes it smaller: Raft's log store rewrites whole pages per
//     append and followers receive every byte;
//   - results come back in the order of submission, each to its own
//     callback, from one goroutine.
//
// The leader loop's callbacks post events to the loop, so it never waits on
// Raft; see leader.write for the ordering per job.

const (
	// maxBatchCommands and maxBatchBytes bound one batch entry; a large
	// CheckpointCompleted goes alone once the bytes are reached.
	maxBatchCommands = 512
	maxBatchBytes    = 1 << 20
	// maxEntriesInFlight is how many entries the committer keeps in Raft's
	// pipeline at once: enough to overlap the disk write of one with the
	// replication of the next, few enough that waiting commands batch.
	maxEntriesInFlight = 4
	// enqueueTimeout bounds raft.Apply's wait to enqueue an entry.
	enqueueTimeout = 10 * time.Second
	// minCompressBytes is the smallest entry worth compressing: a lone
	// trigger (about 100 bytes) saves too little for a zstd frame's
	// header and checksum.
	minCompressBytes = 512
)

// raftApplier is the part of *raft.Raft the committer uses.
type raftApplier interface {
	Apply(cmd []byte, timeout time.Duration) raft.ApplyFuture
}

// proposal is one command waiting to be committed.
type proposal struct {
	t    fsm.CommandType
	data []byte
	done func(res any, index uint64, err error)
}

// entry is one Raft entry in flight and the proposals it carries.
type entry struct {
	future    raft.ApplyFuture
	proposals []proposal
	start     time.Time
	bytes     int // the commands', as encoded
	// entryBytes is the entry's, as given to Raft: after the envelope of a
	// batch and any compression.
	entryBytes int
}

// committer groups commands into Raft entries and reports their results.
type committer struct {
	raft    raftApplier
	metrics *metrics

	mu      sync.Mutex
	queue   []proposal
	stopped bool
	ready   chan struct{} // buffered 1: the queue is not empty

	// slots holds a token per entry in Raft's pipeline; inflight carries
	// those entries, in order, to report.
	slots    chan struct{}
	inflight chan entry

	// framed says whether the next batch may use the framed envelope, and
	// compressed whether the next entry may be compressed; asked once per
	// entry that could. nil: never.
	framed, compressed func() bool
}

// newCommitter returns the write path to r; framed and compressed (either
// may be nil) say when batches may be framed and entries compressed.
func newCommitter(r raftApplier, m *metrics, framed, compressed func() bool) *committer {
	return &committer{raft: r, metrics: m, ready: make(chan struct{}, 1), framed: framed, compressed: compressed,
		slots: make(chan struct{}, maxEntriesInFlight), inflight: make(chan entry, maxEntriesInFlight)}
}

// errCommitterStopped answers commands submitted after the node shut down.
var errCommitterStopped = errors.New("coordd is shutting down")

// submit queues the encoded command data of type t; done is called once,
// from the committer's goroutine, with the FSM's result and the entry's
// index, or with an error. It never blocks.
func (c *committer) submit(t fsm.CommandType, data []byte, done func(res any, index uint64, err error)) {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		done(nil, 0, fmt.Errorf("raft apply %v: %w", t, errCommitterStopped))
		return
	}
	c.queue = append(c.queue, proposal{t: t, data: data, done: done})
	c.mu.Unlock()
	select {
	case c.ready <- struct{}{}:
	default:
	}
}

// take removes the next batch's proposals from the queue.
func (c *committer) take() []proposal {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, bytes := 0, 0
	for n < len(c.queue) && n < maxBatchCommands {
		if n > 0 && bytes+len(c.queue[n].data) > maxBatchBytes {
			break
		}
		bytes += len(c.queue[n].data)
		n++
	}
	batch := make([]proposal, n)
	copy(batch, c.queue)
	c.queue = c.queue[n:]
	if len(c.queue) == 0 {
		c.queue = nil // let the backing array go
	} else {
		select { // more waits: come back at once
		case c.ready <- struct{}{}:
		default:
		}
	}
	return batch
}

// run commits batches until ctx ends, then fails what still waits. It
// returns after every result has been reported.
func (c *committer) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(c.report)
	defer wg.Wait()
	defer close(c.inflight)
	for {
		select {
		case <-ctx.Done():
			c.stop()
			return
		case <-c.ready:
		}
		// Wait for room in the pipeline before taking the batch, so that
		// what arrives meanwhile goes into it.
		select {
		case c.slots <- struct{}{}:
		case <-ctx.Done():
			c.stop()
			return
		}
		batch := c.take()
		if len(batch) == 0 {
			<-c.slots
			continue
		}
		payloads := make([][]byte, len(batch))
		bytes := 0
		for i, p := range batch {
			payloads[i] = p.data
			bytes += len(p.data)
		}
		encode := fsm.EncodeBatch
		if len(payloads) > 1 && c.framed != nil && c.framed() {
			encode = fsm.EncodeFramedBatch
		}
		data, err := encode(payloads)
		if err == nil {
			data = c.compress(data)
		}
		e := entry{proposals: batch, start: time.Now(), bytes: bytes, entryBytes: len(data)}
		if err != nil {
			e.future = errFuture{err}
		} else {
			e.future = c.raft.Apply(data, enqueueTimeout)
		}
		c.inflight <- e
	}
}

// compress returns the compressed form of entry data when the gate allows
// it and it is smaller, and data itself otherwise.
func (c *committer) compress(data []byte) []byte {
	if len(data) < minCompressBytes || c.compressed == nil || !c.compressed() {
		return data
	}
	z, err := fsm.EncodeCompressed(data)
	if err != nil || len(z) >= len(data) {
		return data // larger than fsm.MaxCompressedPayload, or not worth it
	}
	return z
}

// stop fails what waits and every later submit.
func (c *committer) stop() {
	c.mu.Lock()
	c.stopped = true
	left := c.queue
	c.queue = nil
	c.mu.Unlock()
	for _, p := range left {
		p.done(nil, 0, fmt.Errorf("raft apply %v: %w", p.t, errCommitterStopped))
	}
}

// report waits for the entries in order and answers their proposals.
func (c *committer) report() {
	for e := range c.inflight {
		err := e.future.Error()
		if err == nil {
			c.metrics.raftBatchCommands.Observe(float64(len(e.proposals)))
			c.metrics.raftEntryBytes.Add(float64(e.entryBytes))
			took := time.Since(e.start).Seconds()
			for _, p := range e.proposals {
				c.metrics.raftApplyDuration.WithLabelValues(p.t.String()).Observe(took)
				c.metrics.raftApplyBytes.WithLabelValues(p.t.String()).Add(float64(len(p.data)))
			}
		}
		answer(e, err)
		<-c.slots
	}
}

// answer calls every proposal's done with its own result.
func answer(e entry, err error) {
	if err != nil {
		for _, p := range e.proposals {
			p.done(nil, 0, applyError(p.t, err))
		}
		return
	}
	index, resp := e.future.Index(), e.future.Response()
	results, isBatch := resp.(fsm.BatchResult)
	for i, p := range e.proposals {
		r := resp
		switch {
		case len(e.proposals) == 1:
		case !isBatch || len(results) != len(e.proposals):
			r = fmt.Errorf("batch of %d commands answered with %T", len(e.proposals), resp)
		default:
			r = results[i]
		}
		res, err := fsm.Result(r)
		if err != nil {
			err = fmt.Errorf("raft apply %v at index %d: %w", p.t, index, err)
		}
		p.done(res, index, err)
	}
}

// applyError wraps the error of an entry that was not committed.
func applyError(t fsm.CommandType, err error) error {
	if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
		return fmt.Errorf("raft apply %v: %w: %w", t, ErrNotLeader, err)
	}
	return fmt.Errorf("raft apply %v: %w", t, err)
}

// errFuture is an ApplyFuture that failed before reaching Raft.
type errFuture struct{ err error }

func (f errFuture) Error() error  { return f.err }
func (f errFuture) Index() uint64 { return 0 }
func (f errFuture) Response() any { return nil }
