package transport

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"
)

func bigAck(n int) *WorkerMessage {
	keyed := make([]byte, n)
	rng := rand.New(rand.NewPCG(1, uint64(n)))
	for i := range keyed {
		keyed[i] = byte(rng.Uint32())
	}
	return &WorkerMessage{Msg: &WorkerMessage_Ack{Ack: &CheckpointAck{
		Task:         &TaskRef{JobId: "job", Attempt: 3, TaskId: "map-1"},
		CheckpointId: 7,
		State: &TaskState{
			Kind:          TaskKind_TASK_KIND_MAP,
			Keyed:         keyed,
			KeyedSha256:   "sum",
			Applied:       map[int32]int64{0: 10, 1: 20},
			ValueEncoding: "int64",
			Keys:          1234,
			StateBytes:    int64(n),
			SinkTxns:      []*SinkTxn{{TransactionalId: "t-1", ProducerId: 5, CheckpointId: 7}},
			AlignmentUs:   99,
		},
	}}}
}

// TestSplitAckRoundTrip: state of every size around the chunk size comes
// out of AckJoiner exactly as it went into SplitAck, in messages no larger
// than a chunk and the ack, and the original message is left whole.
func TestSplitAckRoundTrip(t *testing.T) {
	for _, n := range []int{0, 1, StateChunkSize, StateChunkSize + 1, 3*StateChunkSize - 7, 5 * StateChunkSize} {
		m := bigAck(n)
		orig := proto.Clone(m)
		parts := SplitAck(m)
		wantParts := 1
		if n > StateChunkSize {
			wantParts = (n+StateChunkSize-1)/StateChunkSize + 1
		}
		if len(parts) != wantParts {
			t.Fatalf("%d bytes: %d messages, want %d", n, len(parts), wantParts)
		}
		if !proto.Equal(m, orig) {
			t.Fatalf("%d bytes: SplitAck changed the message it split", n)
		}
		j := AckJoiner{Limit: 5 * StateChunkSize}
		var got *CheckpointAck
		for i, p := range parts {
			if size := proto.Size(p); size > StateChunkSize+1024 {
				t.Errorf("%d bytes: message %d is %d bytes", n, i, size)
			}
			switch {
			case p.GetChunk() != nil:
				if err := j.Chunk(p.GetChunk()); err != nil {
					t.Fatalf("%d bytes: chunk %d: %v", n, i, err)
				}
			case p.GetAck() != nil:
				if i != len(parts)-1 {
					t.Fatalf("%d bytes: the ack is message %d of %d", n, i, len(parts))
				}
				got = p.GetAck()
				if err := j.Ack(got); err != nil {
					t.Fatalf("%d bytes: %v", n, err)
				}
			}
		}
		if !proto.Equal(got, orig.(*WorkerMessage).GetAck()) {
			t.Errorf("%d bytes: joined ack differs from the original", n)
		}
		if j.Pending() {
			t.Errorf("%d bytes: state left pending after the ack", n)
		}
	}
}

// TestAckJoinerRefuses: the joiner refuses what a confused or hostile
// sender does: more state than the limit, chunks without their ack, an ack
// announcing chunks that did not come, and chunks next to inline state.
func TestAckJoinerRefuses(t *testing.T) {
	chunk := &StateChunk{Data: bytes.Repeat([]byte{1}, 1000)}
	ack := func(chunked int64, keyed []byte) *CheckpointAck {
		return &CheckpointAck{CheckpointId: 4, State: &TaskState{Keyed: keyed}, ChunkedBytes: chunked}
	}
	tests := []struct {
		name   string
		chunks int
		ack    *CheckpointAck
	}{
		{"over the limit", 3, nil},
		{"chunks before an ack without them", 1, ack(0, []byte("x"))},
		{"fewer bytes than announced", 1, ack(2000, nil)},
		{"more bytes than announced", 2, ack(1000, nil)},
		{"chunks and inline state", 1, ack(1000, []byte("x"))},
		{"chunks and no state", 1, &CheckpointAck{ChunkedBytes: 1000}},
		{"announced chunks, none came", 0, ack(1000, nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := AckJoiner{Limit: 2500}
			var err error
			for range tt.chunks {
				if err = j.Chunk(chunk); err != nil {
					break
				}
			}
			if err == nil && tt.ack != nil {
				err = j.Ack(tt.ack)
			}
			if !errors.Is(err, ErrChunks) {
				t.Fatalf("got %v, want ErrChunks", err)
			}
		})
	}
	var j AckJoiner
	if err := j.Chunk(chunk); !errors.Is(err, ErrChunks) {
		t.Errorf("zero AckJoiner took a chunk: %v", err)
	}
	if err := (&AckJoiner{Limit: 10}).Chunk(&StateChunk{}); !errors.Is(err, ErrChunks) {
		t.Errorf("empty chunk: %v", err)
	}
}

func TestKeyedField(t *testing.T) {
	fd := (&TaskState{}).ProtoReflect().Descriptor().Fields().ByName("keyed")
	if fd == nil || fd.Number() != keyedField {
		t.Fatalf("TaskState.keyed is %v, keyedField %d", fd, keyedField)
	}
}
