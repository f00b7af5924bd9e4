package fsm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// Scenario helpers: they build valid commands so that each test states only
// what it changes.

// t0 is the time of the first command; each command a harness applies is one
// second later than the previous, so tests can tell commands apart by time.
const t0 = int64(1_700_000_000_000_000_000)

const testPartitions = 5

// harness applies commands to one FSM the way raft would.
type harness struct {
	t     testing.TB
	f     *FSM
	index uint64
	now   int64
}

func newHarness(t testing.TB) *harness {
	t.Helper()
	return &harness{t: t, f: New(), now: t0}
}

// tick returns the time for the next command.
func (h *harness) tick() int64 {
	h.now += int64(time.Second)
	return h.now
}

// apply encodes cmd, applies it as the next log entry and returns Result's view.
func (h *harness) apply(ct CommandType, cmd any) (any, error) {
	h.t.Helper()
	data, err := Encode(ct, cmd)
	if err != nil {
		h.t.Fatalf("encode %v: %v", ct, err)
	}
	return h.applyRaw(data)
}

func (h *harness) applyRaw(data []byte) (any, error) {
	h.index++
	return Result(h.f.Apply(&raft.Log{Index: h.index, Term: 1, Type: raft.LogCommand, Data: data}))
}

// must applies cmd and fails the test if the FSM rejects it.
func (h *harness) must(ct CommandType, cmd any) any {
	h.t.Helper()
	res, err := h.apply(ct, cmd)
	if err != nil {
		h.t.Fatalf("apply %v: %v", ct, err)
	}
	return res
}

func (h *harness) job(id string) Job {
	h.t.Helper()
	j, ok := h.f.Job(id)
	if !ok {
		h.t.Fatalf("job %s not found", id)
	}
	return j
}

func (h *harness) digest() string {
	h.t.Helper()
	return mustDigest(h.t, h.f)
}

func mustDigest(t testing.TB, f *FSM) string {
	t.Helper()
	d, err := f.Digest()
	if err != nil {
		t.Fatalf("digest: %v", err)
	}
	return d
}

// testSpec is a valid spec: 2 sources, 3 map tasks over 8 key groups, 2 retained.
func testSpec() JobSpec {
	s := JobSpec{
		Name:     "wc",
		Source:   SourceSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "words", Parallelism: 2},
		Operator: OperatorSpec{Name: "wordcount", Parallelism: 3, MaxParallelism: 8},
		Sink:     &SinkSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "counts"},
		Checkpoint: CheckpointSpec{
			Interval: Duration(time.Second), Timeout: Duration(30 * time.Second), Retained: 2, TolerableFailures: 3,
		},
	}
	s.ApplyDefaults()
	return s
}

// assignment places every task of spec round robin on workers.
func assignment(spec JobSpec, workers ...string) []Task {
	var tasks []Task
	n := 0
	next := func() string { w := workers[n%len(workers)]; n++; return w }
	for i := range spec.Source.Parallelism {
		tasks = append(tasks, Task{
			ID: TaskID(TaskSource, i), Kind: TaskSource, Index: i, Worker: next(),
			Partitions: SourcePartitions(testPartitions, spec.Source.Parallelism, i),
		})
	}
	for i, kg := range KeyGroupRanges(spec.Operator.MaxParallelism, spec.Operator.Parallelism) {
		w := next()
		tasks = append(tasks, Task{
			ID: TaskID(TaskMap, i), Kind: TaskMap, Index: i, Worker: w, DataAddr: w + ":7401", KeyGroups: &kg,
		})
	}
	return tasks
}

func (h *harness) register(id string, spec JobSpec) RegisterJobCmd {
	return RegisterJobCmd{ID: id, Spec: spec, Time: h.tick()}
}

func (h *harness) restart(id string, attempt uint64, tasks []Task, reason string) JobRestartedCmd {
	return JobRestartedCmd{JobID: id, Attempt: attempt, Tasks: tasks, Reason: reason, Time: h.tick()}
}

func (h *harness) trigger(id string, attempt uint64) CheckpointTriggeredCmd {
	return CheckpointTriggeredCmd{JobID: id, Attempt: attempt, Time: h.tick()}
}

func (h *harness) complete(id string, attempt, cp uint64, states map[string]TaskState) CheckpointCompletedCmd {
	return CheckpointCompletedCmd{JobID: id, Attempt: attempt, CheckpointID: cp, States: states, Time: h.tick()}
}

func (h *harness) abort(id string, cp uint64, reason string) CheckpointAbortedCmd {
	return CheckpointAbortedCmd{JobID: id, CheckpointID: cp, Reason: reason, Time: h.tick()}
}

// statesFor builds a valid state for every task; seed varies offsets and blobs.
func statesFor(tasks []Task, seed int64) map[string]TaskState {
	states := make(map[string]TaskState, len(tasks))
	for _, t := range tasks {
		st := TaskState{TaskID: t.ID, Kind: t.Kind, Worker: t.Worker, AckedAt: t0 + seed}
		switch t.Kind {
		case TaskSource:
			st.Offsets = make(map[int32]int64)
			for _, p := range t.Partitions {
				st.Offsets[p] = seed*100 + int64(p)
			}
		case TaskMap:
			st.Keyed = fmt.Appendf(nil, "keyed state of %s at %d", t.ID, seed)
			st.KeyedSHA256 = sha256Hex(st.Keyed)
		}
		states[t.ID] = st
	}
	return states
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// runningJob registers id with testSpec and deploys attempt 1 on two workers.
func (h *harness) runningJob(id string) Job {
	h.t.Helper()
	spec := testSpec()
	h.must(CommandRegisterJob, h.register(id, spec))
	h.must(CommandJobRestarted, h.restart(id, 1, assignment(spec, "w1", "w2"), "deployed"))
	return h.job(id)
}

// triggered triggers the next checkpoint of id's current attempt and returns its id.
func (h *harness) triggered(id string) uint64 {
	h.t.Helper()
	j := h.job(id)
	res := h.must(CommandCheckpointTriggered, h.trigger(id, j.Attempt))
	cp, ok := res.(uint64)
	if !ok {
		h.t.Fatalf("CheckpointTriggered returned %T %v, want uint64", res, res)
	}
	return cp
}

// checkpointed triggers and completes one checkpoint of id and returns its id.
func (h *harness) checkpointed(id string) uint64 {
	h.t.Helper()
	cp := h.triggered(id)
	j := h.job(id)
	h.must(CommandCheckpointCompleted, h.complete(id, j.Attempt, cp, statesFor(j.Tasks, int64(cp))))
	return cp
}

// wantErr fails unless err matches every sentinel in want.
func wantErr(t testing.TB, err error, want ...error) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", want)
	}
	for _, w := range want {
		if !errors.Is(err, w) {
			t.Fatalf("error %q does not match %q", err, w)
		}
	}
}

// fakeSink is a raft.SnapshotSink writing to memory.
type fakeSink struct {
	bytes.Buffer
	failWrite bool
	closed    bool
	cancelled bool
}

func (s *fakeSink) ID() string { return "fake-1" }

func (s *fakeSink) Write(p []byte) (int, error) {
	if s.failWrite {
		return 0, errors.New("disk full")
	}
	return s.Buffer.Write(p)
}

func (s *fakeSink) Close() error  { s.closed = true; return nil }
func (s *fakeSink) Cancel() error { s.cancelled = true; return nil }

var _ raft.SnapshotSink = (*fakeSink)(nil)

// persist snapshots f and returns the bytes Persist wrote.
func persist(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	defer snap.Release()
	var sink fakeSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatalf("persist: %v", err)
	}
	if !sink.closed || sink.cancelled {
		t.Fatalf("persist left sink closed=%v cancelled=%v, want closed only", sink.closed, sink.cancelled)
	}
	return sink.Bytes()
}

// rawLog returns data as h's next log entry, for tests that look at Apply's
// raw answer.
func rawLog(h *harness, data []byte) *raft.Log {
	h.index++
	return &raft.Log{Index: h.index, Term: 1, Type: raft.LogCommand, Data: data}
}
