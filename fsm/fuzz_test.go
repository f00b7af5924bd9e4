package fsm

import (
	"testing"
)

// fuzzHarness is the state every FuzzApply input is applied to: a running job
// with a pending checkpoint and one completed, so that seeds of every command
// type can succeed.
func fuzzHarness(t testing.TB) *harness {
	h := newHarness(t)
	h.runningJob("j1")
	h.checkpointed("j1")
	h.triggered("j1")
	return h
}

// fuzzSeeds returns a valid encoding of every command type against fuzzHarness.
func fuzzSeeds(t testing.TB) [][]byte {
	h := fuzzHarness(t)
	j := h.job("j1")
	spec := testSpec()
	keyed, badKey := h.register("j3", spec), h.register("j4", spec)
	keyed.SubmissionKey, badKey.SubmissionKey = "deploy-1", "a key"
	cmds := []struct {
		ct  CommandType
		cmd any
	}{
		{CommandRegisterJob, h.register("j2", spec)},
		{CommandJobRestarted, h.restart("j1", 2, assignment(spec, "w9"), "lost")},
		{CommandJobStatus, JobStatusCmd{JobID: "j1", Status: JobFailing, Time: h.tick()}},
		{CommandCheckpointTriggered, h.trigger("j1", 1)},
		{CommandCheckpointCompleted, h.complete("j1", 1, j.Pending.ID, statesFor(j.Tasks, 3))},
		{CommandCheckpointAborted, h.abort("j1", j.Pending.ID, "timeout")},
		{CommandJobCancelled, JobCancelledCmd{JobID: "j1", Time: h.tick()}},
		{CommandRegisterJob, keyed},
		{CommandRegisterJob, badKey}, // refused, and marks the log as holding keys
	}
	var seeds [][]byte
	for _, c := range cmds {
		data, err := Encode(c.ct, c.cmd)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, data)
	}
	for _, enc := range []func([][]byte) ([]byte, error){EncodeBatch, EncodeFramedBatch} {
		batch, err := enc(seeds[2:4])
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, batch)
		z, err := EncodeCompressed(batch)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, z)
	}
	for _, lone := range seeds[:len(cmds)] { // refused ones included: they set the mark
		z, err := EncodeCompressed(lone)
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, z)
	}
	return append(seeds, nil, []byte{0}, []byte{255, '{'}, []byte{byte(CommandJobStatus), 'n', 'u', 'l', 'l'})
}

// FuzzApply checks that Apply never panics, that a rejected entry leaves the
// state untouched but for the marks that the log holds a newer kind of
// command (set taken or refused), and that whatever state an accepted entry
// leads to survives a snapshot round trip.
func FuzzApply(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h := fuzzHarness(t)
		before, marks := h.digest(), h.marks()
		_, err := h.applyRaw(data)
		after := h.digest()
		if err != nil {
			h.setMarks(marks)
			if h.digest() != before {
				t.Fatalf("rejected entry (%v) changed the state", err)
			}
			return
		}
		restored := New()
		if err := restored.Restore(readCloser(persist(t, h.f))); err != nil {
			t.Fatalf("restore a snapshot of a reachable state: %v", err)
		}
		if mustDigest(t, restored) != after {
			t.Fatal("snapshot round trip changed the digest")
		}
	})
}

// FuzzRestore checks that Restore never panics and either succeeds or keeps
// the state in place.
func FuzzRestore(f *testing.F) {
	f.Add(persist(f, fuzzHarness(f).f))
	f.Add([]byte(`{"format":"coordflow-fsm","version":1,"state":{"jobs":{}}}`))
	f.Add([]byte(`{"format":"coordflow-fsm","version":1,"state":{"jobs":{"a":{"id":"a","status":"running","pending":{"id":3,"status":"pending"}}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		h := fuzzHarness(t)
		before := h.digest()
		if err := h.f.Restore(readCloser(data)); err != nil && h.digest() != before {
			t.Fatalf("failed restore (%v) changed the state", err)
		}
	})
}

// FuzzParseJobSpec checks that parsing never panics and that every accepted
// spec is valid and survives a JSON round trip.
func FuzzParseJobSpec(f *testing.F) {
	f.Add([]byte(designSpec))
	f.Add([]byte(minimalSpec))
	f.Add([]byte(`{"checkpoint": {"interval": null}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		spec, err := ParseJobSpec(data, nil)
		if err != nil {
			return
		}
		if err := spec.Validate(nil); err != nil {
			t.Fatalf("accepted spec fails Validate: %v", err)
		}
		h := newHarness(t)
		if _, err := h.apply(CommandRegisterJob, h.register("j1", spec)); err != nil {
			t.Fatalf("accepted spec rejected by RegisterJob: %v", err)
		}
	})
}

// stateMarks are the marks a refused command may set: that the log holds a
// chosen checkpoint id, a submission key, or a compressed entry.
type stateMarks struct{ chosenIDs, keys, compressed bool }

func (h *harness) marks() stateMarks {
	h.f.mu.RLock()
	defer h.f.mu.RUnlock()
	return stateMarks{h.f.state.ChosenCheckpointIDs, h.f.state.SubmissionKeys, h.f.state.CompressedEntries}
}

func (h *harness) setMarks(m stateMarks) {
	h.f.mu.Lock()
	defer h.f.mu.Unlock()
	h.f.state.ChosenCheckpointIDs, h.f.state.SubmissionKeys, h.f.state.CompressedEntries = m.chosenIDs, m.keys, m.compressed
}
