package worker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

const (
	// localChannelDepth is how many messages an in-process channel buffers,
	// standing in for gRPC's flow-control window.
	localChannelDepth = 16
	// sinkFlushInterval bounds how long sink output waits in the buffer.
	sinkFlushInterval = 100 * time.Millisecond
)

// errMapStopped is returned to inputs of a map task that has stopped.
var errMapStopped = errors.New("map task stopped")

// mapRegistry is where a map task makes itself reachable for data channels
// once its state is restored.
type mapRegistry interface {
	registerMap(*mapTask)
	unregisterMap(*mapTask)
}

// mapTask owns the keyed state of one key-group range. Its task loop is the
// only goroutine that touches the state; one goroutine per input (a Data
// server handler, or a local one for in-process channels) reads the input and
// forwards to the loop, and after a barrier waits for the loop to release it.
type mapTask struct {
	env        *taskEnv
	key        taskKey
	log        *slog.Logger
	op         operator.Operator
	numSources int
	kgStart    int32
	kgEnd      int32
	restoreID  uint64
	blobs      []*transport.KeyedBlob
	sinkSpec   *transport.SinkSpec
	reg        mapRegistry

	// ctx is the task's context: set by run before the task is registered,
	// read by input goroutines.
	ctx    context.Context
	events chan inputEvent

	mu      sync.Mutex
	inputs  []*input       // by source index; nil until connected
	stopped bool           // no more inputs may attach
	wg      sync.WaitGroup // in-process input goroutines

	// Task loop only.
	groups   map[int32]map[string]int64
	align    *aligner
	sink     *sink
	in       prometheus.Counter
	out      prometheus.Counter
	acked    prometheus.Counter
	declined prometheus.Counter
	aligned  prometheus.Observer
}

// input is one connected source of a map task.
type input struct {
	idx     int
	release chan struct{} // capacity 1; the loop releases a blocked input here
}

// inputEvent is what an input goroutine forwards to the task loop: a batch, a
// barrier (barrier != 0) or the end of the input (closed).
type inputEvent struct {
	input   int
	items   []*transport.Item
	barrier uint64
	closed  bool
	err     error
}

func newMapTask(env *taskEnv, d *transport.DeployTask, reg mapRegistry, log *slog.Logger) (*mapTask, error) {
	k := keyOf(d.GetTask())
	op, ok := env.operators.Lookup(d.GetOperator())
	if !ok {
		return nil, fmt.Errorf("unknown operator %q (this worker has %s)", d.GetOperator(), strings.Join(env.operators.Names(), ", "))
	}
	if d.GetNumSources() <= 0 {
		return nil, fmt.Errorf("deploy of map task %s: num_sources is %d, want at least 1", k.id, d.GetNumSources())
	}
	maxPar := d.GetMaxParallelism()
	if maxPar <= 0 {
		maxPar = operator.DefaultMaxParallelism
	}
	var own *transport.MapTaskRef
	for _, mt := range d.GetMapTasks() {
		if mt.GetTaskId() == k.id {
			own = mt
		}
	}
	if own == nil {
		return nil, fmt.Errorf("deploy of map task %s: map_tasks has no entry for it, so its key-group range is unknown", k.id)
	}
	start, end := own.GetKeyGroupStart(), own.GetKeyGroupEnd()
	if start < 0 || end > maxPar || start >= end {
		return nil, fmt.Errorf("deploy of map task %s: key-group range [%d, %d) is not within [0, %d)", k.id, start, end, maxPar)
	}
	var sinkSpec *transport.SinkSpec
	if d.GetSink().GetTopic() != "" {
		sinkSpec = d.GetSink()
	}
	m := &mapTask{
		env:        env,
		key:        k,
		log:        log.With("kind", kindMap, "key_groups", fmt.Sprintf("[%d,%d)", start, end)),
		op:         op,
		numSources: int(d.GetNumSources()),
		kgStart:    start,
		kgEnd:      end,
		restoreID:  d.GetRestoreCheckpointId(),
		blobs:      d.GetRestoreKeyed(),
		sinkSpec:   sinkSpec,
		reg:        reg,
		events:     make(chan inputEvent),
		inputs:     make([]*input, d.GetNumSources()),
		align:      newAligner(int(d.GetNumSources())),
		in:         env.metrics.recordsIn.WithLabelValues(k.job, kindMap),
		out:        env.metrics.recordsOut.WithLabelValues(k.job, kindMap),
		acked:      env.metrics.checkpointsAcked.WithLabelValues(k.job, kindMap),
		declined:   env.metrics.checkpointsDecl.WithLabelValues(k.job, kindMap),
		aligned:    env.metrics.alignment.WithLabelValues(k.job),
	}
	return m, nil
}

func (m *mapTask) run(ctx context.Context, running func()) error {
	ctx, cancel := context.WithCancel(ctx)
	m.ctx = ctx
	defer func() {
		m.reg.unregisterMap(m)
		cancel()
		m.mu.Lock()
		m.stopped = true
		m.mu.Unlock()
		m.wg.Wait()
	}()

	groups, err := restoreKeyed(m.blobs, m.kgStart, m.kgEnd)
	if err != nil {
		return fmt.Errorf("restore checkpoint %d: %w", m.restoreID, err)
	}
	m.groups = groups
	if len(m.blobs) > 0 {
		keys := 0
		for _, g := range groups {
			keys += len(g)
		}
		m.log.Info("restored keyed state", "checkpoint", m.restoreID, "blobs", len(m.blobs), "keys", keys)
	}
	if m.sinkSpec != nil {
		m.sink, err = openSink(m.env.cfg, m.env.workerID, m.sinkSpec)
		if err != nil {
			return err
		}
		defer m.sink.close()
	}

	m.reg.registerMap(m)
	running()

	var flush <-chan time.Time
	if m.sink != nil {
		t := time.NewTicker(sinkFlushInterval)
		defer t.Stop()
		flush = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-flush:
			if err := m.sink.flush(); err != nil {
				return err
			}
		case ev := <-m.events:
			if err := m.handle(ev); err != nil {
				return err
			}
		}
	}
}

// handle applies one input event on the task loop.
func (m *mapTask) handle(ev inputEvent) error {
	switch {
	case ev.closed:
		if ev.err != nil && status.Code(ev.err) != codes.Canceled {
			m.log.Warn("input closed with an error", "source", ev.input, "err", ev.err)
		} else {
			m.log.Info("input closed", "source", ev.input)
		}
		return m.carry(m.align.inputClosed(ev.input))
	case ev.barrier != 0:
		return m.carry(m.align.barrier(ev.input, ev.barrier, time.Now()))
	default:
		return m.apply(ev.items)
	}
}

// apply folds a batch into the keyed state.
func (m *mapTask) apply(items []*transport.Item) error {
	// Without a sink, outputs would only be dropped: use the operator's fast
	// path that builds none, if it has one.
	stateOnly, _ := m.op.(operator.StateUpdater)
	if m.sink != nil {
		stateOnly = nil
	}
	for _, it := range items {
		kg := it.GetKeyGroup()
		if kg < m.kgStart || kg >= m.kgEnd {
			return fmt.Errorf("item with key %q has key group %d, outside this task's range [%d, %d): source and map task disagree on the assignment", it.GetKey(), kg, m.kgStart, m.kgEnd)
		}
		vals := m.groups[kg]
		var (
			state int64
			keep  bool
			out   *operator.Output
		)
		if oi := (operator.Item{Key: it.GetKey(), Num: it.GetNum(), Raw: it.GetRaw()}); stateOnly != nil {
			state, keep = stateOnly.UpdateState(vals[it.GetKey()], oi)
		} else {
			state, keep, out = m.op.Update(vals[it.GetKey()], oi)
		}
		switch {
		case keep && vals == nil:
			m.groups[kg] = map[string]int64{it.GetKey(): state}
		case keep:
			vals[it.GetKey()] = state
		default:
			delete(vals, it.GetKey())
		}
		if out != nil && m.sink != nil {
			if err := m.sink.add(out); err != nil {
				return err
			}
			m.out.Inc()
		}
	}
	m.in.Add(float64(len(items)))
	return nil
}

// carry performs an alignment step: declines, snapshot + sink flush + ack,
// then releases.
func (m *mapTask) carry(step alignStep) error {
	for _, a := range step.abandoned {
		m.log.Warn("declining checkpoint", "checkpoint", a.id, "reason", a.reason)
		m.declined.Inc()
		m.env.send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Decline{Decline: &transport.CheckpointDecline{
			Task: m.key.ref(), CheckpointId: a.id, Reason: a.reason,
		}}})
	}
	if id := step.snapshot; id != 0 {
		blob, sum, err := m.snapshot()
		if err != nil {
			return fmt.Errorf("snapshot for checkpoint %d: %w", id, err)
		}
		if m.sink != nil {
			if err := m.sink.flush(); err != nil {
				return fmt.Errorf("flush sink for checkpoint %d: %w", id, err)
			}
		}
		m.aligned.Observe(step.aligned.Seconds())
		m.acked.Inc()
		m.log.Debug("checkpoint acked", "checkpoint", id, "bytes", len(blob), "alignment", step.aligned)
		m.env.send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
			Task: m.key.ref(), CheckpointId: id,
			State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: blob, KeyedSha256: sum},
		}}})
	}
	m.mu.Lock()
	inputs := m.inputs
	m.mu.Unlock()
	for _, i := range step.release {
		// Capacity 1 and one release per delivered barrier: never blocks.
		select {
		case inputs[i].release <- struct{}{}:
		default:
			m.log.Error("input released twice; alignment bookkeeping is broken", "source", i)
		}
	}
	return nil
}

// snapshot encodes the keyed state of every key group the task owns, in key
// group order and deterministically, with its SHA-256 (hex).
func (m *mapTask) snapshot() ([]byte, string, error) {
	ks := &transport.KeyedState{Groups: make([]*transport.KeyGroupState, 0, m.kgEnd-m.kgStart)}
	for kg := m.kgStart; kg < m.kgEnd; kg++ {
		ks.Groups = append(ks.Groups, &transport.KeyGroupState{KeyGroup: kg, Values: m.groups[kg]})
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(ks)
	if err != nil {
		return nil, "", err
	}
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:]), nil
}

// restoreKeyed decodes every blob of a checkpoint, verifying its SHA-256
// first, and keeps the key groups in [start, end): blobs written with another
// parallelism split or merge cleanly because state is stored per key group.
func restoreKeyed(blobs []*transport.KeyedBlob, start, end int32) (map[int32]map[string]int64, error) {
	groups := make(map[int32]map[string]int64)
	seen := make(map[int32]string)
	for _, b := range blobs {
		sum := sha256.Sum256(b.GetData())
		if got := hex.EncodeToString(sum[:]); !strings.EqualFold(got, b.GetSha256()) {
			return nil, fmt.Errorf("keyed state blob of task %q: sha256 mismatch (computed %s, recorded %s)", b.GetTaskId(), got, b.GetSha256())
		}
		var ks transport.KeyedState
		if err := proto.Unmarshal(b.GetData(), &ks); err != nil {
			return nil, fmt.Errorf("keyed state blob of task %q: decode: %w", b.GetTaskId(), err)
		}
		for _, g := range ks.GetGroups() {
			kg := g.GetKeyGroup()
			if kg < start || kg >= end {
				continue
			}
			if other, dup := seen[kg]; dup {
				return nil, fmt.Errorf("key group %d is in the blobs of both task %q and task %q", kg, other, b.GetTaskId())
			}
			seen[kg] = b.GetTaskId()
			if len(g.GetValues()) > 0 {
				groups[kg] = g.GetValues()
			}
		}
	}
	return groups, nil
}

// attach connects source idx; each source connects once per attempt.
func (m *mapTask) attach(idx int) (*input, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.attachLocked(idx)
}

func (m *mapTask) attachLocked(idx int) (*input, error) {
	if m.stopped || m.ctx.Err() != nil {
		return nil, errMapStopped
	}
	if idx < 0 || idx >= m.numSources {
		return nil, fmt.Errorf("source index %d outside [0, %d)", idx, m.numSources)
	}
	if m.inputs[idx] != nil {
		return nil, fmt.Errorf("source %d is already connected", idx)
	}
	in := &input{idx: idx, release: make(chan struct{}, 1)}
	m.inputs[idx] = in
	return in, nil
}

// attachLocal connects source idx through an in-process channel, read by a
// goroutine the map task owns.
func (m *mapTask) attachLocal(idx int) (*localChannel, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	in, err := m.attachLocked(idx)
	if err != nil {
		return nil, err
	}
	lc := &localChannel{ch: make(chan *transport.DataMessage, localChannelDepth), closed: make(chan struct{}), mapDone: m.ctx.Done()}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := m.readInput(in, lc.recv); err != nil && !errors.Is(err, errMapStopped) {
			m.log.Warn("in-process input ended", "source", idx, "err", err)
		}
	}()
	return lc, nil
}

// readInput reads one input until it ends, forwarding to the task loop; after
// forwarding a barrier it reads nothing until the loop releases it. It
// returns nil when the source closed the input, errMapStopped when the task
// stopped first.
func (m *mapTask) readInput(in *input, recv func(context.Context) (*transport.DataMessage, error)) error {
	for {
		msg, err := recv(m.ctx)
		if err == nil && msg.GetHeader() != nil {
			err = errors.New("protocol error: header on a message after the first")
		}
		if err == nil && msg.GetPayload() == nil {
			err = errors.New("protocol error: message without payload")
		}
		if err == nil && msg.GetBarrier() != nil && msg.GetBarrier().GetCheckpointId() == 0 {
			err = errors.New("protocol error: barrier for checkpoint 0")
		}
		if err != nil {
			if m.ctx.Err() != nil {
				return errMapStopped
			}
			ev := inputEvent{input: in.idx, closed: true}
			if !errors.Is(err, io.EOF) {
				ev.err = err
			}
			m.forward(ev)
			return ev.err
		}
		if b := msg.GetBarrier(); b != nil {
			if !m.forward(inputEvent{input: in.idx, barrier: b.GetCheckpointId()}) {
				return errMapStopped
			}
			select {
			case <-in.release:
			case <-m.ctx.Done():
				return errMapStopped
			}
			continue
		}
		if !m.forward(inputEvent{input: in.idx, items: msg.GetBatch().GetItems()}) {
			return errMapStopped
		}
	}
}

// forward hands ev to the task loop; false when the task has stopped.
func (m *mapTask) forward(ev inputEvent) bool {
	select {
	case m.events <- ev:
		return true
	case <-m.ctx.Done():
		return false
	}
}

// localChannel is an in-process data channel from a source task to a map task
// on the same worker: the same ordered messages as a gRPC stream, with a
// bounded buffer for backpressure.
type localChannel struct {
	ch      chan *transport.DataMessage
	closed  chan struct{}
	once    sync.Once
	mapDone <-chan struct{}
}

// send is called by the source task only.
func (c *localChannel) send(ctx context.Context, msg *transport.DataMessage) error {
	select {
	case c.ch <- msg:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.mapDone:
		return errMapStopped
	}
}

// close ends the channel; the reader sees io.EOF after the buffered messages.
func (c *localChannel) close() { c.once.Do(func() { close(c.closed) }) }

func (c *localChannel) recv(ctx context.Context) (*transport.DataMessage, error) {
	select {
	case m := <-c.ch:
		return m, nil
	case <-c.closed:
		select {
		case m := <-c.ch:
			return m, nil
		default:
			return nil, io.EOF
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
