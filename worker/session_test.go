package worker

import (
	"bytes"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/transport"
)

// TestHeartbeatsBetweenChunks: a worker whose large ack crawls to the
// leader over a slow link (the leader reads a chunk a heartbeat interval
// after the one before) sends heartbeats between the chunks, so that its
// lease does not lapse behind its own state.
func TestHeartbeatsBetweenChunks(t *testing.T) {
	f := newFakeCoord(t, true, "")
	f.chunkDelay = 2 * time.Duration(f.hbMs) * time.Millisecond
	w := startWorker(t, "w1", f, nil)
	f.awaitSession(t, "w1")

	r := ref("job", 1, "map-0")
	const chunks = 8
	keyed := bytes.Repeat([]byte{7}, chunks*transport.StateChunkSize)
	w.outbox.push(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
		Task: r, CheckpointId: 1,
		State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: keyed, KeyedSha256: "sum", Keys: 1},
	}}})
	if got := f.awaitAck(t, r, 1); !bytes.Equal(got.GetState().GetKeyed(), keyed) {
		t.Fatalf("the leader got %d bytes of state, want the %d sent", len(got.GetState().GetKeyed()), len(keyed))
	}
	// The chunks took 16 heartbeat intervals to be read. gRPC takes a
	// chunk or two ahead of the reader, so the worker sees fewer intervals
	// pass than that between its sends, but never none: without heartbeats
	// between chunks there would be none at all.
	if n := f.beatsInChunks.Load(); n == 0 {
		t.Fatalf("no heartbeat between the %d chunks of an ack read at %v a chunk", chunks, f.chunkDelay)
	}
}

// TestAckStateInChunks: an ack with more inline state than a chunk reaches a
// leader that takes state chunks in chunks, none over the leader's message
// cap, and an older leader whole; both get exactly the ack the task made.
func TestAckStateInChunks(t *testing.T) {
	for _, old := range []bool{false, true} {
		name := map[bool]string{false: "chunks", true: "older leader"}[old]
		t.Run(name, func(t *testing.T) {
			f := newFakeCoord(t, true, "")
			f.noChunks = old
			w := startWorker(t, "w1", f, nil)
			f.awaitSession(t, "w1")

			r := ref("job", 1, "map-0")
			keyed := bytes.Repeat([]byte("0123456789abcdef"), (5<<20)/16+3)
			ack := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{
				Task: r, CheckpointId: 3,
				State: &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: keyed, KeyedSha256: "sum", Keys: 9},
			}}}
			want := proto.Clone(ack)
			w.outbox.push(ack)

			got := f.awaitAck(t, r, 3)
			if !proto.Equal(got, want.(*transport.WorkerMessage).GetAck()) {
				t.Fatalf("the leader got an ack of %d bytes of state, want the %d the task sent", len(got.GetState().GetKeyed()), len(keyed))
			}
			chunks := f.chunks.Load()
			if wantChunks := int64((len(keyed) + transport.StateChunkSize - 1) / transport.StateChunkSize); !old && chunks != wantChunks {
				t.Errorf("the state came in %d chunks, want %d", chunks, wantChunks)
			}
			if old && chunks != 0 {
				t.Errorf("an older leader got %d chunks", chunks)
			}
		})
	}
}
