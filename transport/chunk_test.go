package transport

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

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
// sender does: more state than the limit, chunks that disagree on the
// total or exceed it, chunks without their ack, an ack announcing chunks
// that did not come, and chunks next to inline state.
func TestAckJoinerRefuses(t *testing.T) {
	chunk := func(total int64) *StateChunk {
		return &StateChunk{Data: bytes.Repeat([]byte{1}, 1000), TotalBytes: total}
	}
	ack := func(chunked int64, keyed []byte) *CheckpointAck {
		return &CheckpointAck{CheckpointId: 4, State: &TaskState{Keyed: keyed}, ChunkedBytes: chunked}
	}
	tests := []struct {
		name   string
		chunks []*StateChunk
		ack    *CheckpointAck
	}{
		{"over the limit", []*StateChunk{chunk(2501)}, nil},
		{"no total", []*StateChunk{chunk(0)}, nil},
		{"totals that differ", []*StateChunk{chunk(2000), chunk(2500)}, nil},
		{"more bytes than the total", []*StateChunk{chunk(1500), chunk(1500)}, nil},
		{"a chunk over the chunk size", []*StateChunk{{Data: make([]byte, StateChunkSize+1), TotalBytes: 2000}}, nil},
		{"an empty chunk", []*StateChunk{{TotalBytes: 2000}}, nil},
		{"chunks before an ack without them", []*StateChunk{chunk(1000)}, ack(0, []byte("x"))},
		{"fewer bytes than announced", []*StateChunk{chunk(2000)}, ack(2000, nil)},
		{"an ack announcing other than the chunks", []*StateChunk{chunk(1000)}, ack(2000, nil)},
		{"chunks and inline state", []*StateChunk{chunk(1000)}, ack(1000, []byte("x"))},
		{"chunks and no state", []*StateChunk{chunk(1000)}, &CheckpointAck{ChunkedBytes: 1000}},
		{"announced chunks, none came", nil, ack(1000, nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := AckJoiner{Limit: 2500}
			var err error
			for _, c := range tt.chunks {
				if err = j.Chunk(c); err != nil {
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
	if err := j.Chunk(chunk(1000)); !errors.Is(err, ErrChunks) {
		t.Errorf("zero AckJoiner took a chunk: %v", err)
	}
}

// TestClipReason: a reason over MaxReasonBytes is cut at a rune boundary
// and says how much was cut; a shorter one is left alone.
func TestClipReason(t *testing.T) {
	if got := ClipReason("short"); got != "short" {
		t.Errorf("ClipReason(short) = %q", got)
	}
	long := strings.Repeat("é", MaxReasonBytes) // 2 bytes a rune
	got := ClipReason(long)
	if len(got) > MaxReasonBytes || !utf8.ValidString(got) || !strings.HasSuffix(got, " more bytes)") {
		t.Fatalf("ClipReason of %d bytes = %d bytes, valid UTF-8 %v, ending %q", len(long), len(got), utf8.ValidString(got), got[len(got)-20:])
	}
	cut := strings.TrimSuffix(got[strings.LastIndex(got, "... ("):], " more bytes)")
	if want := fmt.Sprintf("... (%d", len(long)-strings.Index(got, "... (")); cut != want {
		t.Errorf("ClipReason notes %q, want %q", cut, want)
	}
}

func TestKeyedField(t *testing.T) {
	fd := (&TaskState{}).ProtoReflect().Descriptor().Fields().ByName("keyed")
	if fd == nil || fd.Number() != keyedField {
		t.Fatalf("TaskState.keyed is %v, keyedField %d", fd, keyedField)
	}
}
