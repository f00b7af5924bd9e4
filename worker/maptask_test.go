package worker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/worker/operator"
)

// nopRegistry stands in for the task manager when a map task runs alone.
type nopRegistry struct{}

func (nopRegistry) registerMap(*mapTask)   {}
func (nopRegistry) unregisterMap(*mapTask) {}

// unitEnv is a task environment without a worker: messages to the leader go
// to the returned channel.
func unitEnv(t testing.TB) (*taskEnv, chan *transport.WorkerMessage) {
	cfg := DefaultConfig()
	cfg.ID = "w-unit"
	sent := make(chan *transport.WorkerMessage, 1024)
	env := &taskEnv{
		workerID: cfg.ID, cfg: &cfg, logger: testLogger(t), metrics: newMetrics(), operators: operator.Builtins(),
		send: func(m *transport.WorkerMessage) { sent <- m },
	}
	return env, sent
}

// runMapTask starts a map task for d and waits until it is running; it stops
// when the test ends.
func runMapTask(t *testing.T, env *taskEnv, d *transport.DeployTask) *mapTask {
	t.Helper()
	return runMapTaskCtl(t, env, d, make(chan control))
}

// runMapTaskCtl is runMapTask with the channel the task reads leader
// messages (completions) from.
func runMapTaskCtl(t *testing.T, env *taskEnv, d *transport.DeployTask, ctl chan control) *mapTask {
	t.Helper()
	mt, err := newMapTask(env, d, ctl, nopRegistry{}, env.logger)
	if err != nil {
		t.Fatalf("new map task: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- mt.run(ctx, func() { close(ready) }) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(waitTimeout):
			t.Error("map task did not stop")
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("map task ended before running: %v", err)
	case <-time.After(waitTimeout):
		t.Fatal("map task not running")
	}
	return mt
}

func mapDeploy(job string, attempt uint64, op string, numSources int32, maxPar int32, refs []*transport.MapTaskRef, own int) *transport.DeployTask {
	return &transport.DeployTask{
		Task: ref(job, attempt, refs[own].GetTaskId()), Kind: transport.TaskKind_TASK_KIND_MAP, Index: int32(own),
		Operator: op, MaxParallelism: maxPar, NumSources: numSources, MapTasks: refs,
	}
}

func batchMsg(maxPar int, keys ...string) *transport.DataMessage {
	return batchMessage(packed(maxPar, keys...))
}

// packed packs one item of count 1 per key.
func packed(maxPar int, keys ...string) []byte {
	var w transport.BatchWriter
	for _, k := range keys {
		w.Item(operator.KeyGroup([]byte(k), maxPar), []byte(k), 1, nil)
	}
	return w.Bytes()
}

func barrierMsg(id uint64) *transport.DataMessage {
	return &transport.DataMessage{Payload: &transport.DataMessage_Barrier{Barrier: &transport.Barrier{CheckpointId: id}}}
}

// decodeKeyed checks an inline ack's checksum and returns its int64 state
// as key -> value, and key -> key group.
func decodeKeyed(t *testing.T, st *transport.TaskState) (map[string]int64, map[string]int32) {
	t.Helper()
	sum := sha256.Sum256(st.GetKeyed())
	if hex.EncodeToString(sum[:]) != st.GetKeyedSha256() {
		t.Fatalf("ack checksum %s does not match its inline state", st.GetKeyedSha256())
	}
	rd, err := statefile.NewReader(bytes.NewReader(st.GetKeyed()), int64(len(st.GetKeyed())))
	if err != nil {
		t.Fatalf("decode keyed state: %v", err)
	}
	vals, groups := map[string]int64{}, map[string]int32{}
	err = rd.Range(0, statefile.MaxKeyGroups, func(kg int32, key, value []byte, _ bool) error {
		n, err := operator.DecodeInt64(value)
		vals[string(key)], groups[string(key)] = n, kg
		return err
	})
	if err != nil {
		t.Fatalf("read keyed state: %v", err)
	}
	if int64(len(vals)) != st.GetKeys() {
		t.Fatalf("ack says %d keys, its state holds %d", st.GetKeys(), len(vals))
	}
	return vals, groups
}

// awaitSent returns the next message the task sent, failing on timeout.
func awaitSent(t *testing.T, sent chan *transport.WorkerMessage) *transport.WorkerMessage {
	t.Helper()
	select {
	case m := <-sent:
		return m
	case <-time.After(waitTimeout):
		t.Fatal("no message from the task")
		return nil
	}
}

func send(t *testing.T, lc *localChannel, m *transport.DataMessage) {
	t.Helper()
	if err := lc.send(context.Background(), m); err != nil {
		t.Fatalf("send on in-process channel: %v", err)
	}
}

// TestBarrierAlignment checks invariant 2 with three inputs: what input A
// sends after Barrier(1) is not applied before snapshot 1, even while B and C
// still send pre-barrier items; snapshot 1 holds exactly the pre-barrier
// items; the held-back items are applied afterwards.
func TestBarrierAlignment(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 3, 128, refs, 0))
	in := make([]*localChannel, 3)
	for i := range in {
		lc, err := mt.attachLocal(i, 1)
		if err != nil {
			t.Fatalf("attach input %d: %v", i, err)
		}
		in[i] = lc
	}
	if _, err := mt.attachLocal(1, 0); !errors.Is(err, errOlderSource) {
		t.Fatalf("a channel of an older source attempt attached: %v", err)
	}
	applied := func() float64 {
		return metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap})
	}
	a, b, c := in[0], in[1], in[2]

	send(t, a, batchMsg(128, "a", "a"))
	firstBarrier := time.Now()
	send(t, a, barrierMsg(1))
	send(t, a, batchMsg(128, "a-post"))
	send(t, b, batchMsg(128, "b"))
	waitFor(t, "pre-barrier items of A and B applied", func() bool { return applied() == 3 })
	// A is blocked: its post-barrier batch stays unread in its buffer.
	if n := len(a.ch); n != 1 {
		t.Fatalf("input A buffer holds %d messages, want its 1 post-barrier batch unread", n)
	}
	send(t, b, barrierMsg(1))
	send(t, b, batchMsg(128, "b-post"))
	send(t, c, batchMsg(128, "c", "c", "c"))
	waitFor(t, "pre-barrier items of C applied", func() bool { return applied() == 6 })
	if len(a.ch) != 1 || len(b.ch) != 1 {
		t.Fatalf("blocked inputs read on: buffers A=%d B=%d, want 1 each", len(a.ch), len(b.ch))
	}
	select {
	case m := <-sent:
		t.Fatalf("task sent %v before barrier 1 was aligned", m)
	default:
	}

	send(t, c, barrierMsg(1))
	ack := awaitSent(t, sent).GetAck()
	if ack.GetCheckpointId() != 1 {
		t.Fatalf("first message after alignment is %v, want ack of checkpoint 1", ack)
	}
	// The ack reports how long the first barrier waited for the last.
	if us := ack.GetState().GetAlignmentUs(); us <= 0 || us > time.Since(firstBarrier).Microseconds() {
		t.Fatalf("alignment %d µs, want more than 0 and at most the %s since A's barrier", us, time.Since(firstBarrier))
	}
	got, _ := decodeKeyed(t, ack.GetState())
	if want := map[string]int64{"a": 2, "b": 1, "c": 3}; !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot 1 = %v, want exactly the pre-barrier items %v", got, want)
	}

	waitFor(t, "post-barrier items applied after the snapshot", func() bool { return applied() == 8 })
	for _, lc := range in {
		send(t, lc, barrierMsg(2))
	}
	got, _ = decodeKeyed(t, awaitSent(t, sent).GetAck().GetState())
	if want := map[string]int64{"a": 2, "b": 1, "c": 3, "a-post": 1, "b-post": 1}; !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot 2 = %v, want %v", got, want)
	}
}

// TestAlignerAbandons covers the alignment corner cases: a newer barrier
// before the pending one aligned, a late barrier, and a closed input.
func TestAlignerAbandons(t *testing.T) {
	now := time.Now()
	a := newAligner(2)
	if s := a.barrier(0, 1, now); len(s.release) != 0 || s.snapshot != 0 {
		t.Fatalf("first barrier: %+v, want input 0 blocked", s)
	}
	// Input 1 missed checkpoint 1 and sends 2: 1 is abandoned, input 0 released.
	s := a.barrier(1, 2, now)
	if len(s.abandoned) != 1 || s.abandoned[0].id != 1 || !reflect.DeepEqual(s.release, []int{0}) {
		t.Fatalf("newer barrier: %+v, want 1 abandoned and input 0 released", s)
	}
	// Input 0 now sends 2: aligned.
	s = a.barrier(0, 2, now.Add(time.Millisecond))
	if s.snapshot != 2 || s.aligned != time.Millisecond || len(s.release) != 2 {
		t.Fatalf("aligned barrier: %+v, want snapshot 2 releasing both", s)
	}
	// A late barrier 1 is released at once.
	if s := a.barrier(1, 1, now); !reflect.DeepEqual(s.release, []int{1}) || s.snapshot != 0 {
		t.Fatalf("late barrier: %+v, want released", s)
	}
	// Closing an input abandons the pending checkpoint and every later one.
	a.barrier(0, 3, now)
	s = a.inputClosed(1)
	if len(s.abandoned) != 1 || s.abandoned[0].id != 3 || !reflect.DeepEqual(s.release, []int{0}) {
		t.Fatalf("closed input: %+v, want 3 abandoned and input 0 released", s)
	}
	s = a.barrier(0, 4, now)
	if len(s.abandoned) != 1 || s.abandoned[0].id != 4 || !reflect.DeepEqual(s.release, []int{0}) {
		t.Fatalf("barrier after close: %+v, want 4 abandoned and released", s)
	}
}

// keyedBlobs builds a checkpoint's inline blobs: int64 state spread over
// parallelism map tasks of maxPar key groups, as those tasks would have
// snapshotted it.
func keyedBlobs(t *testing.T, state map[string]int64, parallelism, maxPar int) []*transport.KeyedBlob {
	t.Helper()
	var blobs []*transport.KeyedBlob
	for i, r := range fsm.KeyGroupRanges(maxPar, parallelism) {
		var buf bytes.Buffer
		w, err := statefile.NewWriter(&buf, statefile.Full)
		if err != nil {
			t.Fatal(err)
		}
		for kg := int32(r.Start); kg < int32(r.End); kg++ {
			var keys []string
			for k := range state {
				if operator.KeyGroup([]byte(k), maxPar) == kg {
					keys = append(keys, k)
				}
			}
			slices.Sort(keys)
			for _, k := range keys {
				if err := w.Add(kg, []byte(k), operator.AppendInt64(nil, state[k])); err != nil {
					t.Fatal(err)
				}
			}
		}
		sum, err := w.Close()
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, &transport.KeyedBlob{
			TaskId: fmt.Sprintf("map-%d", i), Data: buf.Bytes(), Sha256: hex.EncodeToString(sum.SHA256[:]),
			KeyGroupStart: int32(r.Start), KeyGroupEnd: int32(r.End),
		})
	}
	return blobs
}

// TestRestoreOtherParallelism restores state written by 4 map tasks into map
// task 1 of 3: it must load exactly the keys of key groups [42, 85), and
// snapshot them again in its own range only.
func TestRestoreOtherParallelism(t *testing.T) {
	const maxPar = 128
	state := map[string]int64{}
	for i := 0; i < 500; i++ {
		state[fmt.Sprintf("key-%d", i)] = int64(i)
	}
	blobs := keyedBlobs(t, state, 4, maxPar)
	r := fsm.KeyGroupRanges(maxPar, 3)[1]
	start, end := int32(r.Start), int32(r.End)
	want := map[string]int64{}
	for k, v := range state {
		if kg := operator.KeyGroup([]byte(k), maxPar); kg >= start && kg < end {
			want[k] = v
		}
	}
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{
		{TaskId: "map-0", Index: 0, KeyGroupStart: 0, KeyGroupEnd: start},
		{TaskId: "map-1", Index: 1, KeyGroupStart: start, KeyGroupEnd: end},
		{TaskId: "map-2", Index: 2, KeyGroupStart: end, KeyGroupEnd: maxPar},
	}
	d := mapDeploy("job", 2, operator.Count, 1, maxPar, refs, 1)
	d.RestoreCheckpointId, d.RestoreKeyed = 7, blobs
	mt := runMapTask(t, env, d)
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, lc, barrierMsg(8))
	snap, groupsOf := decodeKeyed(t, awaitSent(t, sent).GetAck().GetState())
	if len(want) == 0 || !reflect.DeepEqual(snap, want) {
		t.Fatalf("snapshot after restore has %d keys, want the %d keys of key groups [%d, %d)", len(snap), len(want), start, end)
	}
	for k, kg := range groupsOf {
		if kg < start || kg >= end || operator.KeyGroup([]byte(k), maxPar) != kg {
			t.Fatalf("snapshot holds key %q in key group %d", k, kg)
		}
	}
	// An item of a foreign key group fails the task instead of being applied.
	var foreign transport.BatchWriter
	foreign.Item(end, []byte("x"), 1, nil)
	if err := mt.apply(foreign.Bytes()); err == nil || !strings.Contains(err.Error(), "outside this task's range") {
		t.Fatalf("apply of a foreign key group: %v, want an error", err)
	}
}

// TestRestoreCorruptBlob fails the restore, naming the blob's task, as a
// corrupt-state failure the leader falls back from.
func TestRestoreCorruptBlob(t *testing.T) {
	blobs := keyedBlobs(t, map[string]int64{"a": 1, "b": 2}, 2, 128)
	blobs[1].Data = append([]byte(nil), blobs[1].Data...)
	blobs[1].Data[0] ^= 0xff
	env, _ := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	d.RestoreCheckpointId, d.RestoreKeyed = 3, blobs
	mt, err := newMapTask(env, d, make(chan control), nopRegistry{}, env.logger)
	if err != nil {
		t.Fatal(err)
	}
	err = mt.run(context.Background(), func() { t.Error("a map task with a corrupt blob reported running") })
	if err == nil || !strings.Contains(err.Error(), "restore checkpoint 3") || !strings.Contains(err.Error(), `task "map-1"`) ||
		!strings.Contains(err.Error(), "sha256 mismatch") {
		t.Fatalf("run with a corrupt blob: %v, want a sha256 mismatch naming map-1", err)
	}
	if failureCause(err) != transport.FailureCause_FAILURE_CAUSE_STATE_CORRUPT {
		t.Fatalf("cause of %v = %v, want STATE_CORRUPT", err, failureCause(err))
	}
}

// TestRouteTable checks that sources send every key group to its owner and
// reject assignments with gaps or overlaps.
func TestRouteTable(t *testing.T) {
	refs := []*transport.MapTaskRef{
		{TaskId: "map-2", Index: 2, KeyGroupStart: 85, KeyGroupEnd: 128},
		{TaskId: "map-0", Index: 0, KeyGroupStart: 0, KeyGroupEnd: 42},
		{TaskId: "map-1", Index: 1, KeyGroupStart: 42, KeyGroupEnd: 85},
	}
	sorted, route, err := routeTable(refs, 128)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"", "a", "the", "foobar", "zebra", "key-17"} {
		kg := operator.KeyGroup([]byte(key), 128)
		owner := sorted[route[kg]]
		if kg < owner.GetKeyGroupStart() || kg >= owner.GetKeyGroupEnd() {
			t.Fatalf("key %q (group %d) routed to %s owning [%d, %d)", key, kg, owner.GetTaskId(), owner.GetKeyGroupStart(), owner.GetKeyGroupEnd())
		}
	}
	gap := []*transport.MapTaskRef{{TaskId: "m0", KeyGroupStart: 0, KeyGroupEnd: 60}, {TaskId: "m1", Index: 1, KeyGroupStart: 64, KeyGroupEnd: 128}}
	if _, _, err := routeTable(gap, 128); err == nil || !strings.Contains(err.Error(), "key group 60 belongs to no map task") {
		t.Fatalf("gap: %v", err)
	}
	overlap := []*transport.MapTaskRef{{TaskId: "m0", KeyGroupStart: 0, KeyGroupEnd: 70}, {TaskId: "m1", Index: 1, KeyGroupStart: 64, KeyGroupEnd: 128}}
	if _, _, err := routeTable(overlap, 128); err == nil || !strings.Contains(err.Error(), "both") {
		t.Fatalf("overlap: %v", err)
	}
}
