package coordinator

import (
	"bytes"
	"context"
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
	  "checkpoint": {"interval": "200ms", "timeout": "20s", "retained": 3}
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
// over the 4 MiB cap, a status larger than its kind may be, more state
// chunks than one ack may carry, and a message between an ack's chunks
// each end the session with a status naming what was wrong, and the
// leader goes on serving sessions.
func TestControlStreamBounds(t *testing.T) {
	servers := startCluster(t, 1)
	leader := waitForLeader(t, servers...)
	ref := &transport.TaskRef{JobId: "job", Attempt: 1, TaskId: "map-0"}
	status1 := func(reason int) *transport.WorkerMessage {
		return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{
			Task: ref, Phase: transport.TaskPhase_TASK_PHASE_FAILED, Reason: strings.Repeat("x", reason),
		}}}
	}
	chunk := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Chunk{Chunk: &transport.StateChunk{Data: make([]byte, transport.StateChunkSize)}}}
	heartbeat := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}
	ack := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
		Task: ref, CheckpointId: 1, State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP}, ChunkedBytes: 5 << 20,
	}}}
	tests := []struct {
		name string
		send []*transport.WorkerMessage
		code codes.Code
		msg  string
	}{
		{"over the cap", []*transport.WorkerMessage{status1(5 << 20)}, codes.ResourceExhausted, "larger than max"},
		{"status over its kind's bound", []*transport.WorkerMessage{status1(100 << 10)}, codes.InvalidArgument, "over the 65536 bytes"},
		{"more chunks than an ack may carry", repeat(chunk, fsm.MaxInlineStateBytes/transport.StateChunkSize+1), codes.InvalidArgument, "more than 67108864 bytes"},
		{"a heartbeat between chunks", []*transport.WorkerMessage{chunk, heartbeat}, codes.InvalidArgument, "between an ack's state chunks"},
		{"an ack whose chunks did not all come", []*transport.WorkerMessage{chunk, ack}, codes.InvalidArgument, "announces 5242880 bytes, 1048576 came"},
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
	// The leader still serves sessions and answers heartbeats.
	stream := rawSession(t, leader.RPCAddr(), "after")
	if err := stream.Send(heartbeat); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetHeartbeat() == nil {
		t.Fatalf("after the refused sessions, a heartbeat got %v, %v", m, err)
	}
}

func repeat(m *transport.WorkerMessage, n int) []*transport.WorkerMessage {
	out := make([]*transport.WorkerMessage, n)
	for i := range out {
		out[i] = m
	}
	return out
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
