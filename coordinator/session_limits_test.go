package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// TestLeaderTakesChunkedInlineState: a map task's inline state of 9 MiB,
// more than the 4 MiB any control message may have, reaches the FSM whole
// in state chunks, and checkpoints complete with it.
func TestLeaderTakesChunkedInlineState(t *testing.T) {
	kafka, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "words"))
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(kafka.Close)
	servers := startCluster(t, 1)
	leader := waitForLeader(t, servers...)
	const blob = 9 << 20
	startFakeWorkerBlob(t, "w1", 2, leader.GossipAddr(), rpcAddrs(servers), blob)
	id := submitJob(t, leader, fmt.Sprintf(`{
	  "name": "big",
	  "source": {"brokers": [%q], "topic": "words", "parallelism": 1},
	  "operator": {"name": "wordcount", "parallelism": 1, "max_parallelism": 4},
	  "checkpoint": {"interval": "1s", "timeout": "20s", "retained": 3}
	}`, kafka.ListenAddrs()[0]))

	waitFor(t, 60*time.Second, func() error { return completedAtLeast(leader, id, 2) })
	job, _ := leader.fsm.Job(id)
	for _, ck := range job.Completed {
		keyed := ck.Tasks["map-0"].Keyed
		prefix := fmt.Appendf(nil, "map-0@%d", ck.ID)
		if len(keyed) != blob || !bytes.HasPrefix(keyed, prefix) || keyed[blob-1] != byte(ck.ID) {
			t.Errorf("checkpoint %d: map-0's state is %d bytes starting %.16q, want %d starting %q", ck.ID, len(keyed), keyed, blob, prefix)
		}
	}
}

// TestControlStreamBounds: what a client sends on a control session is
// bounded per message and per kind, before the leader keeps it. A message
// over the 4 MiB cap, an ack whose fields outside its state are over their
// bound, chunks announcing more state than one ack may carry, a status
// between an ack's chunks and chunks that fall short of their ack each end
// the session with a status naming what was wrong. A long reason is cut
// rather than refused, a heartbeat between chunks is answered, and the
// leader goes on serving sessions.
func TestControlStreamBounds(t *testing.T) {
	servers := startCluster(t, 1)
	leader := waitForLeader(t, servers...)
	ref := &transport.TaskRef{JobId: "job", Attempt: 1, TaskId: "map-0"}
	failed := func(reason int) *transport.WorkerMessage {
		return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{
			Task: ref, Phase: transport.TaskPhase_TASK_PHASE_FAILED, Reason: strings.Repeat("x", reason),
		}}}
	}
	chunk := func(total int64) *transport.WorkerMessage {
		return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Chunk{Chunk: &transport.StateChunk{
			Data: make([]byte, transport.StateChunkSize), TotalBytes: total,
		}}}
	}
	heartbeat := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}
	ack := func(chunked int64, sha string) *transport.WorkerMessage {
		return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
			Task: ref, CheckpointId: 1, State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, KeyedSha256: sha}, ChunkedBytes: chunked,
		}}}
	}
	tests := []struct {
		name string
		send []*transport.WorkerMessage
		code codes.Code
		msg  string
	}{
		{"over the cap", []*transport.WorkerMessage{failed(5 << 20)}, codes.ResourceExhausted, "larger than max"},
		{"ack fields over their bound", []*transport.WorkerMessage{ack(0, strings.Repeat("0", 2<<20))}, codes.InvalidArgument, "over the 1048576 bytes"},
		{"chunks of more state than an ack may carry", []*transport.WorkerMessage{chunk(fsm.MaxInlineStateBytes + 1)}, codes.InvalidArgument, "over the 67108864 bytes an ack may have"},
		{"a status between chunks", []*transport.WorkerMessage{chunk(5 << 20), failed(10)}, codes.InvalidArgument, "between an ack's state chunks"},
		{"an ack whose chunks did not all come", []*transport.WorkerMessage{chunk(5 << 20), ack(5<<20, "")}, codes.InvalidArgument, "announces 5242880 bytes, 1048576 came"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stream := rawSession(t, leader.RPCAddr(), fmt.Sprintf("w%d", i))
			for _, m := range tt.send {
				if err := stream.Send(m); err != nil {
					break // the leader has ended the stream; Recv says why
				}
			}
			err := sessionEnd(t, stream)
			if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("session ended with %v, want %v naming %q", err, tt.code, tt.msg)
			}
		})
	}
	// A reason of 100 KiB is cut, and a heartbeat between two chunks is
	// answered: the session goes on.
	stream := rawSession(t, leader.RPCAddr(), "after")
	for _, m := range []*transport.WorkerMessage{failed(100 << 10), chunk(3 << 20), heartbeat} {
		if err := stream.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	if m, err := stream.Recv(); err != nil || m.GetHeartbeat() == nil {
		t.Fatalf("a heartbeat after a long reason and between chunks got %v, %v", m, err)
	}
}

// TestSessionQueueBoundedInBytes: while the leader loop takes no events, a
// session queues the messages it reads only up to its bound in bytes,
// whatever room its inbox and the loop's event queue have left, and ends
// with a status saying so; what the loop handles leaves the count.
func TestSessionQueueBoundedInBytes(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := &leader{ctx: ctx, events: make(chan leaderEvent, eventQueue), heartbeat: time.Second, lease: time.Minute} // nobody reads events
	sess := newSession(ctx, &transport.Hello{WorkerId: "w1"}, nil)
	sess.maxQueued = 10 << 20
	stream := &scriptedStream{ctx: ctx, in: make(chan *transport.WorkerMessage)}
	done := make(chan struct{})
	go func() { defer close(done); receive(stream, sess, l) }()

	state := bytes.Repeat([]byte{7}, 3<<20)
	acks := 0
	for sent := false; !sent || sess.ctx.Err() == nil; acks++ {
		ack := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
			Task:         &transport.TaskRef{JobId: "job", Attempt: 1, TaskId: "map-0"},
			CheckpointId: uint64(acks + 1),
			State:        &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: state},
		}}}
		for _, m := range transport.SplitAck(ack) {
			select {
			case stream.in <- m:
			case <-sess.ctx.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("receive stopped reading")
			}
		}
		sent = true
		if acks > 5 {
			t.Fatalf("%d acks of 3 MiB read against a bound of 10 MiB", acks)
		}
	}
	if err := sess.cause(); !errors.Is(err, errInboxFull) || !strings.Contains(err.Error(), "MiB of messages waiting") {
		t.Fatalf("session ended with %v, want errInboxFull naming the bytes waiting", err)
	}
	if n := len(l.events); n > 3 {
		t.Errorf("%d acks reached the event queue, want at most the 3 within 10 MiB", n)
	}
	cancel()
	<-done

	// The loop takes an event off the count when it handles it.
	h := newLeaderHarness(t)
	s := h.connect("w1", 1)
	s.queued.Store(100)
	h.handle(workerMessage{sess: s, size: 100, msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{
		Task: &transport.TaskRef{JobId: "nope", Attempt: 1, TaskId: "map-0"}, Phase: transport.TaskPhase_TASK_PHASE_RUNNING,
	}}}})
	if q := s.queued.Load(); q != 0 {
		t.Errorf("after the loop handled the message, %d bytes still counted", q)
	}
}

// rawSession opens a control session with the leader at addr as worker id,
// past its Welcome, without TLS.
func rawSession(t *testing.T, addr, id string) grpc.BidiStreamingClient[transport.WorkerMessage, transport.CoordinatorMessage] {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hello := &transport.Hello{WorkerId: id, DataAddr: "127.0.0.1:1", Slots: 1}
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: hello}}); err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil || first.GetWelcome() == nil {
		t.Fatalf("Hello answered %v, %v; want Welcome", first, err)
	}
	if !first.GetWelcome().GetStateChunks() {
		t.Fatal("Welcome does not offer state chunks")
	}
	return stream
}

// sessionEnd reads a session's messages until it ends, and returns why.
func sessionEnd(t *testing.T, stream grpc.BidiStreamingClient[transport.WorkerMessage, transport.CoordinatorMessage]) error {
	t.Helper()
	for {
		if _, err := stream.Recv(); err != nil {
			if status.Code(err) == codes.DeadlineExceeded {
				t.Fatal("the session did not end")
			}
			return err
		}
	}
}
