package worker

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/transport"
)

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
