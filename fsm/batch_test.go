package fsm

import (
	"errors"
	"slices"
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
	data, err := EncodeBatch(payloads)
	if err != nil {
		t.Fatal(err)
	}

	// A replica that applies the same commands as single entries.
	single := newHarness(t)
	single.runningJob("a")
	single.runningJob("b")
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
	if _, err := EncodeBatch(nil); !errors.Is(err, ErrMalformedCommand) {
		t.Errorf("empty batch: %v", err)
	}
	if one := encodeAll(t, CommandJobCancelled, JobCancelledCmd{JobID: "a"}); true {
		got, err := EncodeBatch(one)
		if err != nil || string(got) != string(one[0]) {
			t.Errorf("a batch of one is the command itself: %q, %v", got, err)
		}
	}
}
