package coordinator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// leaderHarness drives one leader's state step by step, on a fake clock,
// against a real FSM applied in memory (no Raft), fake gossip membership and
// fake sessions whose outgoing queues the test reads. The test goroutine
// plays the leader loop: it calls reconcile, checkpointPass and handle.
type leaderHarness struct {
	t      *testing.T
	l      *leader
	env    leaderEnv
	f      *fsm.FSM
	cancel context.CancelFunc
	clock  time.Time
	index  uint64

	mu         sync.Mutex // guards members, partitions, partErr and probed (read by lookup and probe goroutines)
	members    map[string]Member
	partitions int
	partErr    error
	probed     []string        // workers probed, in order
	refused    map[string]bool // workers whose ports refuse connections (env.refused)

	sessions map[string]*session
	// results are the write results the leader has yet to see, in order.
	results []func()
	// applyLater holds each write back from the FSM until its result is
	// handed to the leader, as Raft takes a while to apply it: the leader
	// goes on meanwhile.
	applyLater bool
	// jobGC is Config.JobGCThreshold of the terms newTerm starts.
	jobGC time.Duration
	// fsmIDs has the leader leave checkpoint ids to the FSM, as it does
	// while a coordinator below chosenIDLevel is in the cluster: triggers
	// are sent after their commit.
	fsmIDs bool
	// raftTerm is Raft's current term as the leader reads it (env.term);
	// newTerm moves it on.
	raftTerm uint64
	// failWrite, if set, fails the writes of the command types it returns
	// an error for, without applying them (a lost leadership, say).
	failWrite func(fsm.CommandType) error
}

func newLeaderHarness(t *testing.T) *leaderHarness {
	t.Helper()
	h := &leaderHarness{
		t:          t,
		f:          fsm.New(),
		clock:      time.Unix(1_700_000_000, 0),
		members:    make(map[string]Member),
		partitions: 4,
	}
	h.env = leaderEnv{
		// The write path applies at once, as Raft would, but the result
		// waits in results until the test's loop takes it (flush).
		submit: func(ct fsm.CommandType, data []byte, done func(any, error)) {
			if h.failWrite != nil {
				if err := h.failWrite(ct); err != nil {
					h.results = append(h.results, func() { done(nil, err) })
					return
				}
			}
			if h.applyLater {
				h.results = append(h.results, func() { done(h.applyData(data)) })
				return
			}
			res, err := h.applyData(data)
			h.results = append(h.results, func() { done(res, err) })
		},
		jobs:         h.f.SharedJobs,
		job:          h.f.Job,
		savepoint:    h.f.Savepoint,
		members:      h.memberList,
		aliveWorkers: h.aliveWorkers,
		partitions: func(context.Context, []string, string) (int, error) {
			h.mu.Lock()
			defer h.mu.Unlock()
			return h.partitions, h.partErr
		},
		probe: func(member string) (time.Duration, error) {
			h.mu.Lock()
			defer h.mu.Unlock()
			h.probed = append(h.probed, member)
			if m, ok := h.members[member]; ok && m.Status == StatusAlive {
				return time.Millisecond, nil
			}
			return 0, errors.New("no ack")
		},
		refused: func(member string) bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			return h.refused[member]
		},
		leaderID:  "c1",
		term:      func() uint64 { return h.raftTerm },
		now:       func() time.Time { return h.clock },
		jitter:    func() float64 { return 0.5 }, // no jitter: delays are exact
		chosenIDs: func() bool { return !h.fsmIDs },
	}
	h.f.OnJobChange(func(ids []string) {
		if h.l != nil {
			h.l.noteJobs(ids)
		}
	})
	h.newTerm()
	t.Cleanup(h.endTerm)
	return h
}

// applyData applies an encoded command as the next log entry.
func (h *leaderHarness) applyData(data []byte) (any, error) {
	h.index++
	return fsm.Result(h.f.Apply(&raft.Log{Index: h.index, Term: h.raftTerm, Type: raft.LogCommand, Data: data}))
}

// flush plays the leader loop until it has nothing left to do: it hands the
// leader every write result (in order) and lets it settle after each.
func (h *leaderHarness) flush() {
	h.t.Helper()
	for i := 0; ; i++ {
		if i > 10000 {
			h.t.Fatal("the leader keeps writing: no fixed point after 10000 results")
		}
		for len(h.l.events) > 0 {
			h.l.handle(<-h.l.events)
			h.l.settle()
		}
		if len(h.results) == 0 {
			h.l.settle()
			if len(h.results) == 0 && len(h.l.events) == 0 {
				return
			}
			continue
		}
		next := h.results[0]
		h.results = h.results[1:]
		next() // posts a writeResult event
	}
}

// handle hands the leader one event and plays the loop until it settles.
func (h *leaderHarness) handle(ev leaderEvent) {
	h.t.Helper()
	h.l.handle(ev)
	h.flush()
}

// reconcile runs a full reconcile pass and plays the loop until it settles.
func (h *leaderHarness) reconcile() {
	h.t.Helper()
	h.l.reconcile()
	h.flush()
}

// checkpointPass fires the due checkpoint timers and plays the loop until
// it settles.
func (h *leaderHarness) checkpointPass() {
	h.t.Helper()
	h.l.checkpointPass()
	h.flush()
}

// newTerm ends the current leader's term, if any, and starts a new one on
// the same FSM at the current time: no sessions, and a new grace period.
func (h *leaderHarness) newTerm() {
	if h.l != nil {
		h.endTerm()
	}
	cfg := Config{WorkerLease: 2 * time.Second, WorkerHeartbeat: 500 * time.Millisecond, ReconcileInterval: time.Second, JobGCThreshold: h.jobGC}
	var ctx context.Context
	ctx, h.cancel = context.WithCancel(context.Background())
	h.raftTerm++
	h.l = newLeader(ctx, h.env, cfg, testLogger(h.t), newMetrics(), h.raftTerm)
	h.l.inherit() // as run does first
	h.sessions = make(map[string]*session)
}

func (h *leaderHarness) endTerm() {
	h.cancel()
	h.l.lookups.Wait()
	h.l.probes.Wait()
}

// probes waits for the probes the leader started and returns the workers
// probed so far.
func (h *leaderHarness) probes() []string {
	h.l.probes.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.probed)
}

func (h *leaderHarness) memberList() []Member {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Member
	for _, m := range h.members {
		out = append(out, m)
	}
	return out
}

func (h *leaderHarness) aliveWorkers() []Member {
	var out []Member
	for _, m := range h.memberList() {
		if m.Role == transport.RoleWorker && (m.Status == StatusAlive || m.Status == StatusSuspect) {
			out = append(out, m)
		}
	}
	return out
}

func (h *leaderHarness) setMember(id, status string, slots int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.members[id] = Member{ID: id, Role: transport.RoleWorker, Status: status, Slots: slots, DataAddr: id + ":7401"}
}

// lose has worker die as the leader sees a machine lost: gossip calls it
// dead, and its session closes once it has heard nothing from it.
func (h *leaderHarness) lose(worker string, slots int) {
	h.setMember(worker, StatusDead, slots)
	h.handle(sessionClosed{sess: h.sessions[worker], err: errors.New("no message from the worker within the silence limit")})
	// Its tasks are restarted elsewhere once its lease has run out: it may
	// be frozen, not dead.
	h.advance(h.l.lease + time.Millisecond)
}

func (h *leaderHarness) setPartitions(n int, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.partitions, h.partErr = n, err
}

func (h *leaderHarness) advance(d time.Duration) { h.clock = h.clock.Add(d) }

// apply commits cmd as the leader would and fails the test on error.
func (h *leaderHarness) apply(ct fsm.CommandType, cmd any) any {
	h.t.Helper()
	data, err := fsm.Encode(ct, cmd)
	if err != nil {
		h.t.Fatalf("encode %v: %v", ct, err)
	}
	res, err := h.applyData(data)
	if err != nil {
		h.t.Fatalf("apply %v: %v", ct, err)
	}
	return res
}

func (h *leaderHarness) register(id string, spec fsm.JobSpec) {
	h.t.Helper()
	h.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: id, Spec: spec, Time: h.clock.UnixNano()})
}

func (h *leaderHarness) job(id string) fsm.Job {
	h.t.Helper()
	j, ok := h.f.Job(id)
	if !ok {
		h.t.Fatalf("job %s not in the FSM", id)
	}
	return j
}

// connect opens a session for worker reporting running, as the Session
// handler would, and makes the worker an alive gossip member.
func (h *leaderHarness) connect(worker string, slots int, running ...*transport.TaskStatus) *session {
	h.t.Helper()
	h.setMember(worker, StatusAlive, slots)
	hello := &transport.Hello{WorkerId: worker, DataAddr: worker + ":7401", Slots: int32(slots), Running: running}
	sess := newSession(h.l.ctx, hello, h.l.noteWorker)
	h.sessions[worker] = sess
	h.handle(sessionOpened{sess: sess, hello: hello})
	return sess
}

// pastGrace moves the clock past the reconnect grace period.
func (h *leaderHarness) pastGrace() {
	if d := h.l.graceEnd.Sub(h.clock); d >= 0 {
		h.advance(d + time.Millisecond)
	}
}

// step runs one loop iteration's work: a reconcile pass, any partition
// lookup it started, and a checkpoint pass.
func (h *leaderHarness) step() {
	h.t.Helper()
	h.reconcile()
	for h.lookupsPending() {
		select {
		case ev := <-h.l.events:
			h.handle(ev)
		case <-time.After(10 * time.Second):
			h.t.Fatalf("partition lookup did not report within 10s")
		}
	}
	h.checkpointPass()
}

func (h *leaderHarness) lookupsPending() bool {
	for _, js := range h.l.jobs {
		if js.lookup {
			return true
		}
	}
	return false
}

// drain returns and removes every message queued for worker.
func (h *leaderHarness) drain(worker string) []*transport.CoordinatorMessage {
	sess := h.sessions[worker]
	var msgs []*transport.CoordinatorMessage
	for {
		select {
		case m := <-sess.out:
			msgs = append(msgs, m)
		default:
			return msgs
		}
	}
}

// deploys returns the DeployTask messages among msgs, by task id.
func deploys(msgs []*transport.CoordinatorMessage) map[string]*transport.DeployTask {
	out := make(map[string]*transport.DeployTask)
	for _, m := range msgs {
		if d := m.GetDeploy(); d != nil {
			out[d.GetTask().GetTaskId()] = d
		}
	}
	return out
}

// report sends a TaskStatus from worker for one task.
func (h *leaderHarness) report(worker string, ref *transport.TaskRef, phase transport.TaskPhase, reason string) {
	h.reportCause(worker, ref, phase, reason, transport.FailureCause_FAILURE_CAUSE_UNSPECIFIED)
}

// reportCause is report with a failure cause.
func (h *leaderHarness) reportCause(worker string, ref *transport.TaskRef, phase transport.TaskPhase, reason string, cause transport.FailureCause) {
	h.handle(workerMessage{sess: h.sessions[worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{
		Status: &transport.TaskStatus{Task: ref, Phase: phase, Reason: reason, Cause: cause},
	}}})
}

// runAll reports every task of job's current attempt RUNNING from its worker.
func (h *leaderHarness) runAll(jobID string) {
	h.t.Helper()
	job := h.job(jobID)
	for _, t := range job.Tasks {
		h.report(t.Worker, ref(job, t), transport.TaskPhase_TASK_PHASE_RUNNING, "")
	}
}

// ref names task t of job in the attempt it runs in.
func ref(job fsm.Job, t fsm.Task) *transport.TaskRef {
	return &transport.TaskRef{JobId: job.ID, Attempt: job.TaskAttempt(t), TaskId: t.ID}
}

// ack sends worker's ack of checkpoint id for task t, with a valid state.
func (h *leaderHarness) ack(worker string, r *transport.TaskRef, t fsm.Task, id uint64) {
	h.handle(workerMessage{sess: h.sessions[worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{
		Ack: &transport.CheckpointAck{Task: r, CheckpointId: id, State: validState(t, id)},
	}}})
}

// decline sends the decline of checkpoint id by task t of job, from its
// worker, with reason.
func (h *leaderHarness) decline(job fsm.Job, t fsm.Task, id uint64, reason string) {
	h.handle(workerMessage{sess: h.sessions[t.Worker], msg: &transport.WorkerMessage{Msg: &transport.WorkerMessage_Decline{
		Decline: &transport.CheckpointDecline{Task: ref(job, t), CheckpointId: id, Reason: reason},
	}}})
}

// ackAll acks checkpoint id for every task of job's current attempt.
func (h *leaderHarness) ackAll(jobID string, id uint64) {
	job := h.job(jobID)
	for _, t := range job.Tasks {
		h.ack(t.Worker, ref(job, t), t, id)
	}
}

// validState is a state the FSM accepts for t: an offset per partition for a
// source, a keyed blob with its SHA-256 for a map task.
func validState(t fsm.Task, id uint64) *transport.TaskState {
	if t.Kind == fsm.TaskSource {
		offsets := make(map[int32]int64)
		for _, p := range t.Partitions {
			offsets[p] = int64(id)*100 + int64(p)
		}
		return &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_SOURCE, Offsets: offsets}
	}
	blob := fmt.Appendf(nil, "%s@%d", t.ID, id)
	sum := sha256.Sum256(blob)
	return &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: blob, KeyedSha256: hex.EncodeToString(sum[:])}
}

// triggers returns the checkpoint ids of the TriggerCheckpoint messages in msgs, by task.
func triggers(msgs []*transport.CoordinatorMessage) map[string]uint64 {
	out := make(map[string]uint64)
	for _, m := range msgs {
		if tr := m.GetTrigger(); tr != nil {
			out[tr.GetTask().GetTaskId()] = tr.GetCheckpointId()
		}
	}
	return out
}

// cancels returns the task refs of the CancelTask messages in msgs.
func cancels(msgs []*transport.CoordinatorMessage) []*transport.TaskRef {
	var out []*transport.TaskRef
	for _, m := range msgs {
		if c := m.GetCancel(); c != nil {
			out = append(out, c.GetTask())
		}
	}
	return out
}

// startJob registers job id with spec on workers w1 and w2 (4 slots each),
// deploys it and reports every task RUNNING, and returns the job.
func (h *leaderHarness) startJob(id string, spec fsm.JobSpec) fsm.Job {
	h.t.Helper()
	h.register(id, spec)
	for _, w := range []string{"w1", "w2"} {
		if h.sessions[w] == nil {
			h.connect(w, 4)
		}
	}
	h.pastGrace()
	h.step()
	job := h.job(id)
	if job.Attempt != 1 || job.Status != fsm.JobRunning {
		h.t.Fatalf("job %s not deployed: attempt %d status %s reason %q", id, job.Attempt, job.Status, job.Reason)
	}
	h.drain("w1")
	h.drain("w2")
	h.runAll(id)
	return job
}

// firstCheckpoint moves the clock through job id's first interval, at a
// random point of which (the harness's jitter: the middle) the leader
// triggers its first checkpoint, and returns that checkpoint.
func (h *leaderHarness) firstCheckpoint(id string) *fsm.Checkpoint {
	h.t.Helper()
	h.checkpointPass()
	if p := h.job(id).Pending; p != nil {
		h.t.Fatalf("checkpoint %d triggered at once; the first waits for a random part of the interval", p.ID)
	}
	h.advance(time.Duration(h.job(id).Spec.Checkpoint.Interval))
	h.checkpointPass()
	p := h.job(id).Pending
	if p == nil {
		h.t.Fatalf("no checkpoint of job %s triggered within its first interval", id)
	}
	return p
}

// completeCheckpoint acks the pending checkpoint of job id from every task,
// triggering the next one first if none is pending, and returns its id.
func (h *leaderHarness) completeCheckpoint(id string) uint64 {
	h.t.Helper()
	p := h.job(id).Pending // the loop triggers one as soon as one is due
	if p == nil {
		h.advance(time.Duration(h.job(id).Spec.Checkpoint.Interval))
		h.checkpointPass()
		p = h.job(id).Pending
	}
	if p == nil {
		h.t.Fatalf("no checkpoint triggered for job %s", id)
	}
	h.ackAll(id, p.ID)
	if last, ok := h.f.LastCompleted(id); !ok || last.ID != p.ID {
		h.t.Fatalf("checkpoint %d not completed", p.ID)
	}
	h.drain("w1")
	h.drain("w2")
	return p.ID
}

// nextCheckpoint moves the clock through job id's interval, which triggers
// its next checkpoint, and returns that checkpoint, pending.
func (h *leaderHarness) nextCheckpoint(id string) *fsm.Checkpoint {
	h.t.Helper()
	h.advance(time.Duration(h.job(id).Spec.Checkpoint.Interval))
	h.checkpointPass()
	p := h.job(id).Pending
	if p == nil || p.Savepoint {
		h.t.Fatalf("pending %+v after job %s's interval, want its next checkpoint", p, id)
	}
	return p
}
