package worker

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// TestAlignerReplaced: replacing an input while a checkpoint is pending
// abandons it and releases the blocked inputs, the replaced one too; a
// replaced input that had closed counts again, so that the next barriers
// align over every input.
func TestAlignerReplaced(t *testing.T) {
	now := time.Now()
	a := newAligner(3)
	a.barrier(0, 1, now)
	a.barrier(1, 1, now)
	s := a.replaced(1)
	if len(s.abandoned) != 1 || s.abandoned[0].id != 1 || !strings.Contains(s.abandoned[0].reason, "replaced") {
		t.Fatalf("replaced while pending: %+v, want checkpoint 1 abandoned", s)
	}
	if !reflect.DeepEqual(s.release, []int{0, 1}) {
		t.Fatalf("replaced while pending: release %v, want both blocked inputs", s.release)
	}
	// Input 2 delivers the abandoned barrier late: released at once.
	if s := a.barrier(2, 1, now); !reflect.DeepEqual(s.release, []int{2}) || s.snapshot != 0 {
		t.Fatalf("late barrier after the replacement: %+v", s)
	}

	// Input 2 closes: checkpoint 2 cannot align.
	a.inputClosed(2)
	if s := a.barrier(0, 2, now); len(s.abandoned) != 1 || s.abandoned[0].id != 2 {
		t.Fatalf("barrier with input 2 closed: %+v, want 2 abandoned", s)
	}
	// A new channel replaces it: nothing pending, nothing to release.
	if s := a.replaced(2); len(s.abandoned) != 0 || len(s.release) != 0 {
		t.Fatalf("replacing a closed input with nothing pending: %+v", s)
	}
	a.barrier(0, 3, now)
	a.barrier(1, 3, now)
	if s := a.barrier(2, 3, now.Add(time.Millisecond)); s.snapshot != 3 || len(s.release) != 3 {
		t.Fatalf("barrier 3 over every input after the replacement: %+v, want snapshot 3 releasing all", s)
	}
}

// TestMapLoopDropsReplacedInput drives a map task's event handling by hand,
// the test goroutine being its loop: a replaced input's barrier and closure
// do not count; the replacement abandons the pending checkpoint and releases
// the old input through the old input's own release channel; a channel of
// an older source attempt is refused.
func TestMapLoopDropsReplacedInput(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt, err := newMapTask(env, mapDeploy("job", 1, operator.Count, 2, 128, refs, 0), make(chan control), nopRegistry{}, env.logger)
	if err != nil {
		t.Fatal(err)
	}
	mt.ctx = context.Background()
	handle := func(ev inputEvent) {
		t.Helper()
		if err := mt.handle(ev); err != nil {
			t.Fatalf("handle %+v: %v", ev, err)
		}
	}
	attach := func(idx int, attempt uint64) *input {
		t.Helper()
		in, err := mt.attach(idx, attempt)
		if err != nil {
			t.Fatalf("attach source %d of attempt %d: %v", idx, attempt, err)
		}
		return in
	}
	a, old := attach(0, 1), attach(1, 1)
	handle(inputEvent{input: 0, in: a, attached: true})
	handle(inputEvent{input: 1, in: old, attached: true})
	handle(inputEvent{input: 1, in: old, barrier: 4})
	if mt.align.pending != 4 || !mt.align.blocked[1] {
		t.Fatalf("barrier 4 of input 1 not pending: %+v", mt.align)
	}

	repl := attach(1, 2)
	select {
	case <-old.gone:
	default:
		t.Fatal("the replaced input was not told to stop")
	}
	if _, err := mt.attach(1, 1); !errors.Is(err, errOlderSource) || !strings.Contains(err.Error(), "attempt 1") || !strings.Contains(err.Error(), "attempt 2") {
		t.Fatalf("channel of source attempt 1 after attempt 2: %v, want refused naming both attempts", err)
	}
	handle(inputEvent{input: 1, in: repl, attached: true})
	if dec := awaitSent(t, sent).GetDecline(); dec.GetCheckpointId() != 4 || !strings.Contains(dec.GetReason(), "replaced") {
		t.Fatalf("after the replacement: %v, want checkpoint 4 declined", dec)
	}
	if len(old.release) != 1 || len(repl.release) != 0 {
		t.Fatalf("releases: old input %d, new input %d; want the old input's barrier released on its own channel", len(old.release), len(repl.release))
	}
	if mt.live[1] != repl || mt.align.blocked[1] {
		t.Fatal("the new input is not the live one")
	}

	// The old input's late events are dropped: its barrier does not count,
	// its closure does not close the source's input.
	handle(inputEvent{input: 1, in: old, barrier: 5})
	handle(inputEvent{input: 1, in: old, closed: true})
	if mt.align.pending != 0 || mt.align.closed[1] {
		t.Fatalf("a replaced input's events reached the aligner: %+v", mt.align)
	}
	handle(inputEvent{input: 0, in: a, barrier: 5})
	if mt.align.pending != 5 || mt.align.arrived != 1 {
		t.Fatalf("barrier 5 of input 0: %+v, want pending with one arrival", mt.align)
	}
	// A late attachment of an input that was replaced before the loop
	// learnt of it does not displace the newer one.
	newer := attach(1, 2)
	handle(inputEvent{input: 1, in: newer, attached: true})
	handle(inputEvent{input: 1, in: repl, attached: true})
	if mt.live[1] != newer {
		t.Fatal("a stale attachment displaced the newer input")
	}
}

// TestInputReplacedInProcess: a source's in-process channel breaks and a
// new one of the same attempt takes its place: its items are applied and
// the next barriers align over both inputs again. A restored source of a
// newer attempt replaces an open channel while a checkpoint is pending: the
// checkpoint is declined, the old channel sends nothing more, the new one's
// items are applied. Channels of older attempts are refused.
func TestInputReplacedInProcess(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 2, 128, refs, 0))
	attach := func(idx int, attempt uint64) *localChannel {
		t.Helper()
		lc, err := mt.attachLocal(idx, attempt)
		if err != nil {
			t.Fatalf("attach source %d of attempt %d: %v", idx, attempt, err)
		}
		return lc
	}
	applied := func() float64 {
		return metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap})
	}
	a1, b1 := attach(0, 1), attach(1, 1)
	send(t, a1, batchMsg(128, "a"))
	a1.close() // the stream broke
	send(t, b1, barrierMsg(1))
	if dec := awaitSent(t, sent).GetDecline(); dec.GetCheckpointId() != 1 {
		t.Fatalf("got %v, want checkpoint 1 declined: input 0 closed", dec)
	}

	a2 := attach(0, 1)
	send(t, a2, batchMsg(128, "a2"))
	waitFor(t, "the new channel's items applied", func() bool { return applied() == 2 })
	send(t, a2, barrierMsg(2))
	send(t, b1, barrierMsg(2))
	ack := awaitSent(t, sent).GetAck()
	if ack.GetCheckpointId() != 2 {
		t.Fatalf("got %v, want ack of checkpoint 2 over the reopened input", ack)
	}
	if got, _ := decodeKeyed(t, ack.GetState()); !reflect.DeepEqual(got, map[string]int64{"a": 1, "a2": 1}) {
		t.Fatalf("snapshot 2 = %v", got)
	}

	// Source 1 is restored in attempt 2 while its old channel is open and
	// has barrier 3 to deliver (or has delivered it: then the replacement
	// abandons 3, unless source 0's barrier 3 completed it first; else 3 is
	// abandoned when barrier 4 overtakes it; TestMapLoopDropsReplacedInput
	// covers the first case deterministically).
	send(t, b1, barrierMsg(3))
	b2 := attach(1, 2)
	if err := b1.send(context.Background(), batchMsg(128, "zombie")); !errors.Is(err, errInputReplaced) {
		t.Fatalf("send on the replaced channel: %v, want errInputReplaced", err)
	}
	for _, c := range []struct {
		idx     int
		attempt uint64
	}{{1, 1}, {0, 0}} {
		if _, err := mt.attachLocal(c.idx, c.attempt); !errors.Is(err, errOlderSource) {
			t.Fatalf("channel of source %d attempt %d: %v, want errOlderSource", c.idx, c.attempt, err)
		}
	}
	send(t, a2, barrierMsg(3)) // late: released at once
	send(t, b2, batchMsg(128, "b2", "b2"))
	send(t, a2, barrierMsg(4))
	send(t, b2, barrierMsg(4))
	// Checkpoint 3 is declined, unless source 0's barrier 3 reached the
	// loop before the replacement did: then 3 aligned over the old channel
	// and is acked. Either way checkpoint 4 is acked next.
	for {
		msg := awaitSent(t, sent)
		if id := msg.GetDecline().GetCheckpointId(); id == 3 {
			continue
		}
		if ack = msg.GetAck(); ack.GetCheckpointId() == 3 {
			continue
		}
		if ack.GetCheckpointId() != 4 {
			t.Fatalf("got %v, want checkpoint 3 declined or acked, then checkpoint 4 acked", msg)
		}
		break
	}
	if got, _ := decodeKeyed(t, ack.GetState()); !reflect.DeepEqual(got, map[string]int64{"a": 1, "a2": 1, "b2": 2}) {
		t.Fatalf("snapshot 4 = %v, want the old channels' items before the replacement and the new one's", got)
	}
}

// TestInputReplacedRemote: the same over gRPC data channels to a worker: a
// second channel of the same source attempt is accepted and replaces the
// first, which is ended at its next message without its items being
// applied; a newer attempt replaces that one; an older one is refused with
// FailedPrecondition naming both attempts.
func TestInputReplacedRemote(t *testing.T) {
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	refs := mapRefs(128, w)
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	hdr := func(attempt uint64) *transport.ChannelHeader {
		return &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: 0, MapTaskId: "map-0", SourceAttempt: attempt}
	}
	dial := func(attempt uint64) *remoteOutput {
		t.Helper()
		out, err := dialChannel(t, w.DataAddr(), hdr(attempt))
		if err != nil {
			t.Fatalf("channel of source attempt %d: %v", attempt, err)
		}
		t.Cleanup(out.close)
		return out
	}
	applied := func() float64 {
		return metricValue(t, w.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap})
	}
	sendOn := func(o *remoteOutput, m *transport.DataMessage) error {
		return o.send(context.Background(), m)
	}

	first := dial(1)
	if err := sendOn(first, batchMsg(128, "x")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first channel's item applied", func() bool { return applied() == 1 })
	second := dial(1)
	// The first channel's handler learns at its next message that it was
	// replaced: that message is not applied, and the stream ends.
	// Sends are buffered by gRPC's flow control: the client sees the end
	// once the server's status comes back, which under load takes a while.
	var err error
	for deadline := time.Now().Add(10 * time.Second); err == nil && time.Now().Before(deadline); {
		if err = sendOn(first, batchMsg(128, "zombie")); err == nil {
			time.Sleep(time.Millisecond) // poll interval
		}
	}
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "replaced") {
		t.Fatalf("the replaced channel ended with %v, want FailedPrecondition: replaced", err)
	}
	if err := sendOn(second, batchMsg(128, "y")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the second channel's item applied", func() bool { return applied() == 2 })

	third := dial(2)
	if _, err := dialChannel(t, w.DataAddr(), hdr(1)); status.Code(err) != codes.FailedPrecondition ||
		!strings.Contains(err.Error(), "attempt 1") || !strings.Contains(err.Error(), "attempt 2") {
		t.Fatalf("channel of source attempt 1 after attempt 2: %v, want FailedPrecondition naming both attempts", err)
	}
	if err := sendOn(third, batchMsg(128, "z")); err != nil {
		t.Fatal(err)
	}
	if err := sendOn(third, barrierMsg(1)); err != nil {
		t.Fatal(err)
	}
	ack := f.awaitAck(t, d.Task, 1)
	got, _ := decodeKeyed(t, ack.GetState())
	if want := map[string]int64{"x": 1, "y": 1, "z": 1}; !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot 1 = %v, want %v: nothing of the replaced channel after its replacement", got, want)
	}
}
