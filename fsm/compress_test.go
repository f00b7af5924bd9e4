package fsm

import (
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// compressed wraps entry data in a CommandCompressed, as the leader does.
func compressed(t *testing.T, data []byte) []byte {
	t.Helper()
	z, err := EncodeCompressed(data)
	if err != nil {
		t.Fatalf("compress: %v", err)
	}
	return z
}

// TestCompressedEntryAppliesWhatItCarries: a compressed batch and a
// compressed lone command give every command the result it would get
// uncompressed, lead to the same state but for the mark, which a snapshot
// keeps; a compressed command the FSM refuses sets the mark too.
func TestCompressedEntryAppliesWhatItCarries(t *testing.T) {
	for _, enc := range batchEncoders {
		t.Run(enc.name, func(t *testing.T) {
			plain, packed := newHarness(t), newHarness(t)
			for _, h := range []*harness{plain, packed} {
				h.runningJob("a")
				h.runningJob("b")
			}
			a := plain.job("a")
			batch, err := enc.encode(encodeAll(t,
				CommandCheckpointTriggered, plain.trigger("a", a.Attempt), // ok: id 1
				CommandCheckpointTriggered, plain.trigger("b", 9), // refused: not b's attempt
				CommandCheckpointCompleted, plain.complete("a", a.Attempt, 1, statesFor(a.Tasks, 1)), // ok
				CommandRegisterJob, plain.register("c", testSpec()), // ok
			))
			if err != nil {
				t.Fatal(err)
			}
			lone := encodeAll(t, CommandJobStatus, JobStatusCmd{JobID: "b", Status: JobFailing, Reason: "broker down", Time: plain.tick()})[0]
			refused := encodeAll(t, CommandJobStatus, JobStatusCmd{JobID: "nope", Status: JobRunning, Time: plain.tick()})[0]

			if packed.f.CompressedEntries() {
				t.Fatal("a fresh state says compressed entries were applied")
			}
			for _, data := range [][]byte{batch, lone, refused} {
				want, wantErr := plain.applyRaw(data)
				got, gotErr := packed.applyRaw(compressed(t, data))
				if (gotErr == nil) != (wantErr == nil) || (gotErr != nil && gotErr.Error() != wantErr.Error()) {
					t.Fatalf("%v entry: compressed error %v, plain %v", CommandType(data[0]), gotErr, wantErr)
				}
				if gb, ok := got.(BatchResult); ok {
					wb := want.(BatchResult)
					if len(gb) != len(wb) {
						t.Fatalf("%d results, want %d", len(gb), len(wb))
					}
					for i := range gb {
						ge, gIsErr := gb[i].(error)
						we, wIsErr := wb[i].(error)
						if gIsErr != wIsErr || (gIsErr && ge.Error() != we.Error()) || (!gIsErr && gb[i] != wb[i]) {
							t.Errorf("batch command %d: compressed %v, plain %v", i, gb[i], wb[i])
						}
					}
				} else if got != want {
					t.Errorf("%v entry: compressed result %v, plain %v", CommandType(data[0]), got, want)
				}
				if !packed.f.CompressedEntries() {
					t.Fatalf("after a compressed %v entry (err %v): no mark", CommandType(data[0]), gotErr)
				}
			}
			if _, err := packed.applyRaw(refused); err == nil {
				t.Fatal("the refused command applied")
			}
			// The same state as the plain replica's, once it has the mark.
			plain.f.state.CompressedEntries = true
			if plain.digest() != packed.digest() {
				t.Error("the state after compressed entries differs from the state after the same entries plain")
			}
			restored := New()
			if err := restored.Restore(readCloser(persist(t, packed.f))); err != nil {
				t.Fatalf("restore: %v", err)
			}
			if !restored.CompressedEntries() {
				t.Error("a snapshot forgot that compressed entries were applied")
			}
		})
	}
}

// TestCompressedEntryRejectsGarbledFrames: a compressed entry whose length,
// frame or content is wrong is refused whole, on every replica alike, with
// the state and its mark untouched; so are envelopes nested the wrong way.
func TestCompressedEntryRejectsGarbledFrames(t *testing.T) {
	h := newHarness(t)
	h.runningJob("a")
	status := encodeAll(t,
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobFailing, Reason: "x", Time: h.tick()},
		CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: h.tick()})
	batch, err := EncodeFramedBatch(status)
	if err != nil {
		t.Fatal(err)
	}
	good := compressed(t, batch)
	_, k := binary.Uvarint(good[1:])
	frame := good[1+k:]
	raw := func(length uint64, frame []byte) []byte {
		return append(binary.AppendUvarint([]byte{byte(CommandCompressed)}, length), frame...)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	zframe := func(payload []byte) []byte { return enc.EncodeAll(payload, nil) }
	flipped := slices.Clone(good)
	flipped[len(flipped)-6] ^= 0x40 // inside the last block or the checksum
	garbled := map[string][]byte{
		"no length":             {byte(CommandCompressed)},
		"zero length":           raw(0, frame),
		"length above the max":  raw(MaxCompressedPayload+1, frame),
		"length too short":      raw(uint64(len(batch)-1), frame),
		"length too long":       raw(uint64(len(batch)+1), frame),
		"no frame":              raw(uint64(len(batch)), nil),
		"truncated frame":       good[:len(good)-3],
		"a byte flipped":        flipped,
		"not zstd":              raw(uint64(len(batch)), batch),
		"compressed in itself":  raw(uint64(len(good)), zframe(good)),
		"empty payload":         raw(1, zframe(nil)),
		"a malformed payload":   raw(5, zframe([]byte{byte(CommandJobStatus), 'n', 'u', 'l', '!'})),
		"length overflows":      append([]byte{byte(CommandCompressed)}, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),
		"bytes after the frame": append(slices.Clone(good), 0),
	}
	before := h.digest()
	for name, data := range garbled {
		if _, err := h.applyRaw(data); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: %v, want ErrMalformedCommand", name, err)
		}
	}
	if _, err := h.applyRaw(raw(3, zframe([]byte{200, '{', '}'}))); !errors.Is(err, ErrUnknownCommand) {
		t.Errorf("a compressed command of unknown type: %v, want ErrUnknownCommand", err)
	}
	if h.digest() != before || h.f.CompressedEntries() {
		t.Fatal("a garbled compressed entry changed the state")
	}

	// A compressed entry inside a batch fails alone; the batch encoders
	// refuse one, and EncodeCompressed refuses to compress twice.
	res, err := h.applyRaw(append(binary.AppendUvarint(binary.AppendUvarint([]byte{byte(CommandFramedBatch)}, 2), uint64(len(status[0]))), append(status[0], append(binary.AppendUvarint(nil, uint64(len(good))), good...)...)...))
	if err != nil {
		t.Fatalf("framed batch around a compressed entry: %v", err)
	}
	if got := res.(BatchResult); got[0] != nil || !errors.Is(got[1].(error), ErrMalformedCommand) {
		t.Errorf("framed batch around a compressed entry: results %v, want nil and ErrMalformedCommand", got)
	}
	for _, enc := range batchEncoders {
		if _, err := enc.encode([][]byte{status[0], good}); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("%s: a compressed command encoded into a batch: %v", enc.name, err)
		}
	}
	for name, payload := range map[string][]byte{"empty": nil, "compressed": good} {
		if _, err := EncodeCompressed(payload); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("EncodeCompressed of an %s payload: %v", name, err)
		}
	}
}

// BenchmarkCompressedBatch measures compressing and decoding a group commit
// shaped as the leader writes it at 1,000 jobs, and reports its bytes; its
// state blobs repeat one byte, so it compresses better than real entries.
func BenchmarkCompressedBatch(b *testing.B) {
	batch, err := EncodeFramedBatch(benchBatch(b))
	if err != nil {
		b.Fatal(err)
	}
	z, err := EncodeCompressed(batch)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("encode", func(b *testing.B) {
		b.SetBytes(int64(len(batch)))
		for b.Loop() {
			if _, err := EncodeCompressed(batch); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(batch)), "plain-bytes")
		b.ReportMetric(float64(len(z)), "compressed-bytes")
	})
	b.Run("decode", func(b *testing.B) {
		b.SetBytes(int64(len(batch)))
		for b.Loop() {
			if _, _, err := Decode(z); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestUnknownCommands: the types this build does not know are found in a
// lone entry, in batches and in compressed entries, and none in what it
// knows or cannot decode.
func TestUnknownCommands(t *testing.T) {
	known := encodeAll(t, CommandJobStatus, JobStatusCmd{JobID: "a", Status: JobRunning, Time: 1})[0]
	future := append([]byte{200}, known[1:]...)
	framed, err := EncodeFramedBatch([][]byte{known, future})
	if err != nil {
		t.Fatal(err)
	}
	plain, err := EncodeBatch([][]byte{future, known})
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		data []byte
		want []CommandType
	}{
		"known":                   {known, nil},
		"unknown":                 {future, []CommandType{200}},
		"framed batch":            {framed, []CommandType{200}},
		"json batch":              {plain, []CommandType{200}},
		"compressed framed batch": {compressed(t, framed), []CommandType{200}},
		"compressed unknown":      {compressed(t, future), []CommandType{200}},
		"compressed known":        {compressed(t, known), nil},
		"garbled compressed":      {[]byte{byte(CommandCompressed), 5, 1, 2}, nil},
		"empty":                   {nil, nil},
	} {
		if got := UnknownCommands(tc.data); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", name, got, tc.want)
		}
	}
}
