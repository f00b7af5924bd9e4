package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// encodeAll encodes (type, command) pairs as Encode would.
func encodeAll(t *testing.T, cmds ...any) [][]byte {
	t.Helper()
	var out [][]byte
	for i := 0; i < len(cmds); i += 2 {
		data, err := Encode(cmds[i].(CommandType), cmds[i+1])
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		out = append(out, data)
	}
	return out
}

// TestBatchMixedCommands applies one batch with valid and invalid commands of
// several jobs: each command gets the result it would get alone, the invalid
// ones change nothing, and the state equals that of the same commands applied
// one entry at a time.
func TestBatchMixedCommands(t *testing.T) {
	for _, enc := range batchEncoders {
		t.Run(enc.name, func(t *testing.T) { testBatchMixedCommands(t, enc.encode) })
	}
}

// batchEncoders are the two envelopes of a group commit.
var batchEncoders = []struct {
	name   string
	encode func([][]byte) ([]byte, error)
}{
	{"json", EncodeBatch},
	{"framed", EncodeFramedBatch},
}

func testBatchMixedCommands(t *testing.T, encodeBatch func([][]byte) ([]byte, error)) {
	h := newHarness(t)
	a, b := h.runningJob("a"), h.runningJob("b")
	spec := testSpec()
	cmds := []any{
		CommandCheckpointTriggered, h.trigger("a", a.Attempt), // ok: id 1
		CommandCheckpointTriggered, h.trigger("a", a.Attempt), // rejected: one pending already
		CommandCheckpointTriggered, h.trigger("b", 9), // rejected: not b's attempt
		CommandCheckpointTriggered, h.trigger("b", b.Attempt), // ok: id 1
		CommandCheckpointCompleted, h.complete("a", a.Attempt, 1, statesFor(a.Tasks, 1)), // ok
		CommandCheckpointCompleted, h.complete("b", b.Attempt, 1, nil), // rejected: no states
		CommandRegisterJob, h.register("c", spec), // ok
		CommandRegisterJob, h.register("c", spec), // rejected: exists
		CommandJobStatus, JobStatusCmd{JobID: "nope", Status: JobRunning, Time: h.tick()}, // rejected: no job
	}
	payloads := encodeAll(t, cmds...)
	data, err := encodeBatch(payloads)
	if err != nil {
		t.Fatal(err)
	}

	// A replica that applies the same commands as single entries.
	single := newHarness(t)
	single.runningJob("a")
	single.runningJob("b")
	if data[0] == byte(CommandFramedBatch) {
		// The batch also marks the state as having applied a framed
		// batch: so does this one, whose commands all fail.
		nothing := encodeAll(t, CommandJobCancelled, JobCancelledCmd{JobID: "nope"}, CommandJobCancelled, JobCancelledCmd{JobID: "nope"})
		mark, err := EncodeFramedBatch(nothing)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := single.applyRaw(mark); err != nil {
			t.Fatal(err)
		}
	}
	var want []any
	for _, p := range payloads {
		res, err := single.applyRaw(p)
		if err != nil {
			res = err
		}
		want = append(want, res)
	}

	var changed []string
	h.f.OnJobChange(func(jobs []string) { changed = append(changed, jobs...) })
	res := h.f.Apply(rawLog(h, data))
	got, ok := res.(BatchResult)
	if !ok {
		t.Fatalf("batch result is %T %v, want BatchResult", res, res)
	}
	if len(got) != len(want) {
		t.Fatalf("%d results, want %d", len(got), len(want))
	}
	wantErrs := []bool{false, true, true, false, false, true, false, true, true}
	for i := range got {
		gerr, gotErr := got[i].(error)
		_, wantErr := want[i].(error)
		if gotErr != wantErrs[i] || wantErr != wantErrs[i] {
			t.Errorf("command %d: batch result %v, alone %v, want error=%v", i, got[i], want[i], wantErrs[i])
		}
		if gotErr && gerr.Error() != want[i].(error).Error() {
			t.Errorf("command %d: batch error %q, alone %q", i, gerr, want[i])
		}
		if !gotErr && got[i] != want[i] {
			t.Errorf("command %d: batch result %v, alone %v", i, got[i], want[i])
		}
	}
	if got[0] != uint64(1) || got[3] != uint64(1) {
		t.Errorf("trigger results %v, %v, want checkpoint ids 1 and 1", got[0], got[3])
	}
	if h.digest() != single.digest() {
		t.Errorf("state after the batch differs from the same commands applied one by one")
	}
	slices.Sort(changed)
	if want := []string{"a", "a", "b", "c"}; !slices.Equal(changed, want) {
		t.Errorf("changed jobs %v, want %v (accepted commands only)", changed, want)
	}

	// A third replica applying the batch entry holds the same state.
	replica := newHarness(t)
	replica.runningJob("a")
	replica.runningJob("b")
	replica.f.Apply(rawLog(replica, data))
	if replica.digest() != h.digest() {
		t.Error("replicas applying the same batch differ")
	}
}

// TestBatchRejectsBadEntries: unknown, malformed and nested commands inside a
// batch fail alone; an oversized batch is refused whole.
func TestBatchRejectsBadEntries(t *testing.T) {
	h := newHarness(t)
	h.runningJob("a")
	before := h.digest()
	inner, err := EncodeBatch(encodeAll(t,
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobFailing, Reason: "x", Time: h.tick()},
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: h.tick()}))
	if err != nil {
		t.Fatal(err)
	}
	b := BatchCmd{Commands: []BatchEntry{
		{Type: 200, Body: []byte(`{}`)},
		{Type: CommandJobStatus, Body: []byte(`[1, 2]`)},
		{Type: CommandBatch, Body: inner[1:]},
		{Type: CommandJobStatus, Body: []byte(`{"job_id":"a","status":"failing","reason":"disk","time":5}`)},
	}}
	data, err := Encode(CommandBatch, b)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Result(h.f.Apply(rawLog(h, data)))
	if err != nil {
		t.Fatalf("batch: %v", err)
	}
	got := res.(BatchResult)
	wantErr(t, got[0].(error), ErrUnknownCommand)
	wantErr(t, got[1].(error), ErrMalformedCommand)
	wantErr(t, got[2].(error), ErrMalformedCommand)
	if got[3] != nil {
		t.Errorf("valid command after bad ones: %v", got[3])
	}
	if j := h.job("a"); j.Status != JobFailing || j.Reason != "disk" {
		t.Errorf("job a is %s %q, want failing \"disk\"", j.Status, j.Reason)
	}
	if h.f.UnknownCommands() != 1 {
		t.Errorf("unknown commands %d, want 1", h.f.UnknownCommands())
	}
	if h.digest() == before {
		t.Error("the valid command of the batch was not applied")
	}

	big := BatchCmd{Commands: make([]BatchEntry, MaxBatch+1)}
	data, _ = Encode(CommandBatch, big)
	before = h.digest()
	if _, err := Result(h.f.Apply(rawLog(h, data))); !errors.Is(err, ErrMalformedCommand) {
		t.Errorf("oversized batch: %v, want ErrMalformedCommand", err)
	}
	if h.digest() != before {
		t.Error("an oversized batch changed the state")
	}
	for _, enc := range batchEncoders {
		if _, err := enc.encode(nil); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: empty batch: %v", enc.name, err)
		}
		one := encodeAll(t, CommandJobCancelled, JobCancelledCmd{JobID: "a"})
		if got, err := enc.encode(one); err != nil || string(got) != string(one[0]) {
			t.Errorf("%s: a batch of one is the command itself: %q, %v", enc.name, got, err)
		}
		if _, err := enc.encode([][]byte{one[0], inner}); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: a batch inside a batch encoded: %v", enc.name, err)
		}
		if _, err := enc.encode([][]byte{one[0], nil}); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: an empty command encoded: %v", enc.name, err)
		}
		if _, err := enc.encode([][]byte{nil}); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: a lone empty command encoded: %v", enc.name, err)
		}
	}
}

// TestFramedBatchRejectsGarbledFrames: a framed batch whose framing is
// wrong anywhere is refused whole, with ErrMalformedCommand and the state
// untouched; inside good framing, bad commands fail alone, as in a JSON
// batch.
func TestFramedBatchRejectsGarbledFrames(t *testing.T) {
	h := newHarness(t)
	h.runningJob("a")
	status := encodeAll(t,
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobFailing, Reason: "x", Time: h.tick()},
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: h.tick()})
	good, err := EncodeFramedBatch(status)
	if err != nil {
		t.Fatal(err)
	}
	frame := func(count uint64, cmds ...[]byte) []byte {
		out := binary.AppendUvarint([]byte{byte(CommandFramedBatch)}, count)
		for _, c := range cmds {
			out = binary.AppendUvarint(out, uint64(len(c)))
			out = append(out, c...)
		}
		return out
	}
	garbled := map[string][]byte{
		"no count":               {byte(CommandFramedBatch)},
		"count of one":           frame(1, status[0]),
		"count above MaxBatch":   frame(MaxBatch+1, status...),
		"fewer than counted":     frame(3, status...),
		"truncated command":      good[:len(good)-1],
		"bytes after the last":   append(slices.Clone(good), 0),
		"length past the end":    append(frame(2, status[0]), 0xff, 0x01),
		"empty command":          frame(2, status[0], nil),
		"count beyond the bytes": frame(1000, status[0]),
		"count overflows":        append([]byte{byte(CommandFramedBatch)}, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),
	}
	before := h.digest()
	for name, data := range garbled {
		if _, err := h.applyRaw(data); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: %v, want ErrMalformedCommand", name, err)
		}
	}
	if h.digest() != before || h.f.FramedBatches() {
		t.Fatal("a garbled framed batch changed the state")
	}
	// Refused before anything is allocated for the commands it names.
	if _, err := h.applyRaw(garbled["count beyond the bytes"]); err == nil || !strings.Contains(err.Error(), "1000 commands in") {
		t.Errorf("a count beyond the entry's bytes: %v, want it refused for that", err)
	}

	// Good framing around a nested batch and an unknown type.
	nested := frame(3, status[0], good, []byte{200, '{', '}'})
	res, err := h.applyRaw(nested)
	if err != nil {
		t.Fatalf("framed batch with bad commands: %v", err)
	}
	got := res.(BatchResult)
	if got[0] != nil {
		t.Errorf("valid command: %v", got[0])
	}
	wantErr(t, got[1].(error), ErrMalformedCommand)
	wantErr(t, got[2].(error), ErrUnknownCommand)
	if j := h.job("a"); j.Status != JobFailing {
		t.Errorf("job a is %s, want failing", j.Status)
	}
}

// TestFramedBatchIsRemembered: once a framed batch is applied, the state
// says so, and so does every snapshot after it: a coordinator joining later
// replays a log that may hold one (the leader's feature level gate).
func TestFramedBatchIsRemembered(t *testing.T) {
	h := newHarness(t)
	h.runningJob("a")
	if h.f.FramedBatches() {
		t.Fatal("a fresh state says framed batches were applied")
	}
	plain, err := EncodeBatch(encodeAll(t,
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobFailing, Reason: "x", Time: h.tick()},
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: h.tick()}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applyRaw(plain); err != nil || h.f.FramedBatches() {
		t.Fatalf("after a JSON batch (err %v): framed %v, want false", err, h.f.FramedBatches())
	}
	framed, err := EncodeFramedBatch(encodeAll(t,
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobFailing, Reason: "y", Time: h.tick()},
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: h.tick()}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applyRaw(framed); err != nil || !h.f.FramedBatches() {
		t.Fatalf("after a framed batch (err %v): framed %v, want true", err, h.f.FramedBatches())
	}
	restored := New()
	if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if !restored.FramedBatches() {
		t.Error("a snapshot forgot that framed batches were applied")
	}
}

// benchBatch is a group commit as the leader writes it at 1,000 jobs of one
// source and one map task with inline state: 18 triggers and 18 completions.
func benchBatch(b *testing.B) [][]byte {
	var payloads [][]byte
	for i := range 18 {
		job := fmt.Sprintf("job-%04d", i)
		trigger, err := Encode(CommandCheckpointTriggered, CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: 1764866000000000000})
		if err != nil {
			b.Fatal(err)
		}
		complete, err := Encode(CommandCheckpointCompleted, CheckpointCompletedCmd{JobID: job, Attempt: 1, CheckpointID: 12345, Time: 1764866000000000000,
			States: map[string]TaskState{
				"source-0": {TaskID: "source-0", Kind: TaskSource, Worker: "w1", AckedAt: 1764866000000000000, Offsets: map[int32]int64{0: 123456}, RecordsIn: 123456, RecordsOut: 123456},
				"map-0": {TaskID: "map-0", Kind: TaskMap, Worker: "w1", AckedAt: 1764866000000000000, Keyed: bytes.Repeat([]byte{7}, 300),
					KeyedSHA256: strings.Repeat("ab", 32), Applied: map[int32]int64{0: 123455}, ValueEncoding: "int64", Keys: 10, StateBytes: 300,
					AlignmentMicros: 12, RecordsIn: 123456, KeyGroups: &KeyGroupRange{Start: 0, End: 128}},
			}})
		if err != nil {
			b.Fatal(err)
		}
		payloads = append(payloads, trigger, complete)
	}
	return payloads
}

// BenchmarkBatchEnvelope times what a group commit's envelope costs: the
// leader's encoding of it, and every replica's decoding of the entry into
// its commands (the commands' own decoding included, as Apply does it).
func BenchmarkBatchEnvelope(b *testing.B) {
	payloads := benchBatch(b)
	for _, enc := range batchEncoders {
		b.Run("encode/"+enc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := enc.encode(payloads); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("decode/"+enc.name, func(b *testing.B) {
			data, err := enc.encode(payloads)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				t, cmd, err := Decode(data)
				if err != nil {
					b.Fatal(err)
				}
				var entries []BatchEntry
				switch c := cmd.(type) {
				case BatchCmd:
					entries = c.Commands
				case framedBatch:
					entries = c.Commands
				default:
					b.Fatalf("%v decoded as %T", t, cmd)
				}
				for _, e := range entries {
					if _, err := commands[e.Type].decode(e.Type, e.Body); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
