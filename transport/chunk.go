package transport

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// StateChunkSize is the most inline state one StateChunk carries. With the
// ack's other fields it keeps every control message well under the
// leader's per-message cap, whatever the size of the state.
const StateChunkSize = 1 << 20

// ErrChunks reports StateChunk messages out of place: a chunk without the
// ack it belongs to, an ack whose chunks are missing, or more state than
// the receiver takes. It is a protocol violation by the sender.
var ErrChunks = errors.New("state chunks")

// SplitAck returns the messages that carry m on a session whose leader takes
// StateChunks: m itself when its inline state is at most StateChunkSize,
// otherwise the state in chunks followed by a copy of the ack without it.
// m is not modified, so it can be sent again whole on a later session.
func SplitAck(m *WorkerMessage) []*WorkerMessage {
	ack := m.GetAck()
	keyed := ack.GetState().GetKeyed()
	if len(keyed) <= StateChunkSize {
		return []*WorkerMessage{m}
	}
	total := int64(len(keyed))
	out := make([]*WorkerMessage, 0, len(keyed)/StateChunkSize+2)
	for rest := keyed; len(rest) > 0; {
		n := min(len(rest), StateChunkSize)
		out = append(out, &WorkerMessage{Msg: &WorkerMessage_Chunk{Chunk: &StateChunk{Data: rest[:n:n], TotalBytes: total}}})
		rest = rest[n:]
	}
	out = append(out, &WorkerMessage{Msg: &WorkerMessage_Ack{Ack: &CheckpointAck{
		Task:         ack.GetTask(),
		CheckpointId: ack.GetCheckpointId(),
		State:        withoutKeyed(ack.GetState()),
		ChunkedBytes: total,
	}}})
	return out
}

// withoutKeyed returns a shallow copy of st without its inline state: the
// copy shares st's maps and lists, which neither changes, and takes any
// field added later without a change here.
func withoutKeyed(st *TaskState) *TaskState {
	out := &TaskState{}
	dst := out.ProtoReflect()
	st.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Number() != keyedField {
			dst.Set(fd, v)
		}
		return true
	})
	return out
}

// keyedField is TaskState.keyed's field number (TestKeyedField checks it
// against the descriptor, which package initialisation builds only after
// variables like this one).
const keyedField protoreflect.FieldNumber = 3

// AckJoiner puts back together, on the receiving end of one session, the
// inline state SplitAck took apart. It holds the chunks of one ack at a
// time, in one buffer of the size the first chunk announces, at most Limit
// bytes: a sender cannot make the receiver buffer more than one ack's worth
// of state. The zero value refuses every chunk; set Limit.
type AckJoiner struct {
	// Limit is the most inline state one ack may carry.
	Limit int
	buf   []byte
}

// Chunk adds a chunk's data to the pending state.
func (j *AckJoiner) Chunk(c *StateChunk) error {
	data, total := c.GetData(), c.GetTotalBytes()
	switch {
	case len(data) == 0:
		return fmt.Errorf("%w: an empty chunk", ErrChunks)
	case len(data) > StateChunkSize:
		return fmt.Errorf("%w: a chunk of %d bytes, over %d", ErrChunks, len(data), StateChunkSize)
	case total <= 0 || total > int64(j.Limit):
		return fmt.Errorf("%w: chunks of %d bytes of inline state, over the %d bytes an ack may have", ErrChunks, total, j.Limit)
	case j.buf != nil && total != int64(cap(j.buf)):
		return fmt.Errorf("%w: a chunk of %d bytes of state among chunks of %d", ErrChunks, total, cap(j.buf))
	}
	if j.buf == nil {
		j.buf = make([]byte, 0, total)
	}
	if len(j.buf)+len(data) > cap(j.buf) {
		return fmt.Errorf("%w: more than the %d bytes of state the chunks announce", ErrChunks, cap(j.buf))
	}
	j.buf = append(j.buf, data...)
	return nil
}

// Ack completes ack with the pending state when it was sent in chunks, and
// checks that nothing is pending when it was not.
func (j *AckJoiner) Ack(ack *CheckpointAck) error {
	want := ack.GetChunkedBytes()
	switch {
	case want == 0 && j.buf != nil:
		return fmt.Errorf("%w: %d bytes of chunks before an ack that has none", ErrChunks, len(j.buf))
	case want == 0:
		return nil
	case want != int64(len(j.buf)) || want != int64(cap(j.buf)):
		return fmt.Errorf("%w: ack of checkpoint %d announces %d bytes, %d came", ErrChunks, ack.GetCheckpointId(), want, len(j.buf))
	case ack.GetState() == nil || len(ack.GetState().GetKeyed()) > 0:
		return fmt.Errorf("%w: ack of checkpoint %d has chunks and inline state", ErrChunks, ack.GetCheckpointId())
	}
	ack.State.Keyed, j.buf = j.buf, nil
	ack.ChunkedBytes = 0
	return nil
}

// Pending reports whether chunks wait for their ack: only heartbeats may
// come in between.
func (j *AckJoiner) Pending() bool { return j.buf != nil }

// MaxReasonBytes bounds the reason of a task status or a checkpoint
// decline: it is logged and may be kept in the job's status, and an error
// text (a user operator's panic value, say) has no bound of its own.
const MaxReasonBytes = 8 << 10

// ClipReason returns reason cut to MaxReasonBytes, at a rune boundary, with
// a note of how much was cut.
func ClipReason(reason string) string {
	if len(reason) <= MaxReasonBytes {
		return reason
	}
	n := MaxReasonBytes - 64 // room for the note
	for n > 0 && !utf8.RuneStart(reason[n]) {
		n--
	}
	return fmt.Sprintf("%s... (%d more bytes)", reason[:n], len(reason)-n)
}
