package coordinator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/coordflow/coordflow/fsm"
)

// gatedRaft is the committer's Raft in a unit test: it applies each entry
// to a real FSM, in log order, but one entry per token the test sends on
// gate, so that the test controls how many entries are in flight.
type gatedRaft struct {
	f       *fsm.FSM
	mu      sync.Mutex
	entries [][]byte // every entry's payload, in order
	queue   chan *gatedFuture
	gate    chan struct{}
}

type gatedFuture struct {
	data  []byte
	done  chan struct{}
	index uint64
	resp  any
}

func (g *gatedFuture) Error() error  { <-g.done; return nil }
func (g *gatedFuture) Index() uint64 { <-g.done; return g.index }
func (g *gatedFuture) Response() any { <-g.done; return g.resp }

func newGatedRaft() *gatedRaft {
	r := &gatedRaft{f: fsm.New(), queue: make(chan *gatedFuture, 64), gate: make(chan struct{})}
	go func() {
		var index uint64
		for f := range r.queue {
			<-r.gate
			index++
			f.index = index
			f.resp = r.f.Apply(&raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: f.data})
			close(f.done)
		}
	}()
	return r
}

func (r *gatedRaft) Apply(data []byte, _ time.Duration) raft.ApplyFuture {
	r.mu.Lock()
	r.entries = append(r.entries, data)
	r.mu.Unlock()
	f := &gatedFuture{data: data, done: make(chan struct{})}
	r.queue <- f
	return f
}

// TestCommitterBatchesWhileEntriesAreInFlight: a lone command goes alone;
// commands that arrive while the pipeline is full wait and go together in
// one batch entry; every command gets its own result, in submission order,
// the FSM's rejections included.
func TestCommitterBatchesWhileEntriesAreInFlight(t *testing.T) {
	open, closed := func() bool { return true }, func() bool { return false }
	t.Run("json", func(t *testing.T) { testCommitterBatches(t, nil, nil, fsm.CommandBatch) })
	t.Run("framed", func(t *testing.T) { testCommitterBatches(t, open, nil, fsm.CommandFramedBatch) })
	t.Run("gate closed", func(t *testing.T) { testCommitterBatches(t, closed, closed, fsm.CommandBatch) })
	t.Run("framed and compressed", func(t *testing.T) { testCommitterBatches(t, open, open, fsm.CommandFramedBatch) })
	t.Run("compressed", func(t *testing.T) { testCommitterBatches(t, closed, open, fsm.CommandBatch) })
}

// testCommitterBatches runs TestCommitterBatchesWhileEntriesAreInFlight
// with the committer's gates framed and compressed; the batch entry must be
// of type batchType, compressed if compressed is open, and so must every
// lone command of minCompressBytes or more.
func testCommitterBatches(t *testing.T, framed, compressed func() bool, batchType fsm.CommandType) {
	r := newGatedRaft()
	m := newMetrics()
	c := newCommitter(r, m, framed, compressed)
	ctx := t.Context()
	done := make(chan struct{})
	go func() { c.run(ctx); close(done) }()

	type result struct {
		i     int
		res   any
		index uint64
		err   error
	}
	results := make(chan result, 1000)
	submit := func(i int, t fsm.CommandType, cmd any) {
		data, err := fsm.Encode(t, cmd)
		if err != nil {
			panic(err)
		}
		c.submit(t, data, func(res any, index uint64, err error) { results <- result{i, res, index, err} })
	}
	spec := testJobSpec(1, 1)
	entries := func() int {
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.entries)
	}
	// Fill the pipeline: maxEntriesInFlight lone commands, one entry each.
	for i := range maxEntriesInFlight {
		submit(i, fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: fmt.Sprintf("j%d", i), Spec: spec, Time: 1})
		waitFor(t, 5*time.Second, func() error {
			if n := entries(); n != i+1 {
				return fmt.Errorf("%d entries in flight, want %d", n, i+1)
			}
			return nil
		})
	}
	// These wait behind it; every other one is rejected by the FSM (j0 exists).
	const waiting = 100
	for i := maxEntriesInFlight; i < maxEntriesInFlight+waiting; i++ {
		id := fmt.Sprintf("j%d", i)
		if i%2 == 0 {
			id = "j0"
		}
		submit(i, fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: id, Spec: spec, Time: 1})
	}
	total := maxEntriesInFlight + waiting
	got := make([]result, 0, total)
	for len(got) < total {
		select {
		case r.gate <- struct{}{}:
		case res := <-results:
			got = append(got, res)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d results after 10s", len(got), total)
		}
	}
	for n, res := range got {
		if res.i != n {
			t.Fatalf("result %d is of command %d: results out of submission order", n, res.i)
		}
		wantErr := n >= maxEntriesInFlight && n%2 == 0
		if (res.err != nil) != wantErr {
			t.Errorf("command %d: err %v, want error %v", n, res.err, wantErr)
		}
		if wantErr && !errors.Is(res.err, fsm.ErrJobExists) {
			t.Errorf("command %d: err %v, want ErrJobExists", n, res.err)
		}
	}
	if n := entries(); n != maxEntriesInFlight+1 {
		t.Errorf("%d Raft entries for %d commands, want %d (the %d waiting commands in one batch)",
			n, total, maxEntriesInFlight+1, waiting)
	}
	compressing := compressed != nil && compressed()
	r.mu.Lock()
	written := 0
	for i, e := range r.entries {
		written += len(e)
		want := fsm.CommandRegisterJob
		if i == len(r.entries)-1 {
			want = batchType
		}
		payload, wasCompressed := uncompressed(t, e)
		switch {
		case fsm.CommandType(payload[0]) != want:
			t.Errorf("entry %d is a %v, want a %v", i, fsm.CommandType(payload[0]), want)
		case wasCompressed != (compressing && len(payload) >= minCompressBytes):
			t.Errorf("entry %d of %d bytes: compressed %v, with the gate open %v", i, len(payload), wasCompressed, compressing)
		case wasCompressed && len(e) >= len(payload):
			t.Errorf("entry %d: %d bytes compressed, %d plain", i, len(e), len(payload))
		}
	}
	r.mu.Unlock()
	if got := testutil.ToFloat64(m.raftEntryBytes); got != float64(written) {
		t.Errorf("coordflow_raft_entry_bytes_total %v, want the %d bytes given to Raft", got, written)
	}
	if r.f.CompressedEntries() != compressing {
		t.Errorf("the FSM applied compressed entries: %v, want %v", r.f.CompressedEntries(), compressing)
	}
	if got[total-1].index != got[maxEntriesInFlight].index {
		t.Errorf("batched commands at indexes %d and %d, want one entry", got[maxEntriesInFlight].index, got[total-1].index)
	}
	if jobs := r.f.Jobs(); len(jobs) != maxEntriesInFlight+waiting/2 {
		t.Errorf("%d jobs registered, want %d", len(jobs), maxEntriesInFlight+waiting/2)
	}
}

// uncompressed returns the entry a CommandCompressed entry carries, and
// whether e was one; any other entry is returned as it is.
func uncompressed(t *testing.T, e []byte) ([]byte, bool) {
	t.Helper()
	if fsm.CommandType(e[0]) != fsm.CommandCompressed {
		return e, false
	}
	_, k := binary.Uvarint(e[1:])
	d, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	payload, err := d.DecodeAll(e[1+k:], nil)
	if err != nil {
		t.Fatalf("decompress entry: %v", err)
	}
	return payload, true
}

// TestLeaderWritesInOrderPerJob: a job's writes reach Raft one at a time and
// in the order the loop made them, and their continuations run in that
// order, however the results of different jobs' writes come back; other
// jobs' writes are not held up by one job's.
func TestLeaderWritesInOrderPerJob(t *testing.T) {
	f := fsm.New()
	var index uint64
	type inflight struct {
		data []byte
		done func(any, error)
	}
	var submitted []inflight
	env := leaderEnv{
		submit: func(_ fsm.CommandType, data []byte, done func(any, error)) {
			submitted = append(submitted, inflight{data, done})
		},
		now: time.Now,
	}
	l := newLeader(t.Context(), env, Config{}, testLogger(t), newMetrics(), 1)
	const jobs, writes = 6, 5
	var order = make(map[string][]int) // continuation order per job
	for j := range jobs {
		id := fmt.Sprintf("j%d", j)
		data, _ := fsm.Encode(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: id, Spec: testJobSpec(1, 1), Time: 1})
		index++
		f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: data})
		js := &jobState{id: id}
		l.jobs[id] = js
		for w := range writes {
			l.write(js, fsm.CommandJobStatus, fsm.JobStatusCmd{JobID: id, Status: fsm.JobFailing, Reason: fmt.Sprint(w), Time: int64(w)},
				func(_ any, err error) {
					if err != nil {
						t.Errorf("job %s write %d: %v", id, w, err)
					}
					order[id] = append(order[id], w)
				})
		}
	}
	if len(submitted) != jobs {
		t.Fatalf("%d writes submitted at first, want one per job (%d)", len(submitted), jobs)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for applied := 0; len(submitted) > 0; applied++ {
		// Complete a random in-flight write: results of different jobs
		// come back in any order.
		k := rng.IntN(len(submitted))
		w := submitted[k]
		submitted = append(submitted[:k], submitted[k+1:]...)
		index++
		res, err := fsm.Result(f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: w.data}))
		w.done(res, err)
		l.handle(<-l.events)
		perJob := make(map[string]int)
		for _, s := range submitted {
			_, cmd, _ := fsm.Decode(s.data)
			perJob[cmd.(fsm.JobStatusCmd).JobID]++
		}
		for id, n := range perJob {
			if n > 1 {
				t.Fatalf("job %s has %d writes in flight at once", id, n)
			}
		}
		if applied > jobs*writes {
			t.Fatal("more results than writes")
		}
	}
	for j := range jobs {
		id := fmt.Sprintf("j%d", j)
		if got := order[id]; fmt.Sprint(got) != "[0 1 2 3 4]" {
			t.Errorf("job %s continuations ran in order %v", id, got)
		}
		job, _ := f.Job(id)
		if job.Reason != fmt.Sprint(writes-1) {
			t.Errorf("job %s ends with reason %q, want its last write's %d", id, job.Reason, writes-1)
		}
		if l.busy(id) {
			t.Errorf("job %s still busy after every result", id)
		}
	}
}

// TestCommitterStopped: once the node shuts down, what waits and what is
// submitted later is answered with an error at once, never left hanging.
func TestCommitterStopped(t *testing.T) {
	c := newCommitter(newGatedRaft(), newMetrics(), nil, nil)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	c.run(ctx) // returns at once: its context has ended
	got := make(chan error, 1)
	c.submit(fsm.CommandJobCancelled, []byte{byte(fsm.CommandJobCancelled)}, func(_ any, _ uint64, err error) { got <- err })
	select {
	case err := <-got:
		if !errors.Is(err, errCommitterStopped) {
			t.Fatalf("submit after stop: %v, want errCommitterStopped", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("submit after stop was not answered")
	}
}
