package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/twmb/franz-go/pkg/kfake"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// TestLeaderSessionCheckpointsThroughRaft runs three coordinators, an
// embedded Kafka and a fake worker (gossip member plus control session) that
// runs what it is deployed and acks every trigger. Checkpoints complete
// through Raft with growing ids, a stale attempt's ack is ignored, and after
// the leader is stopped the worker reconnects to the new leader, which keeps
// its tasks running, aborts its predecessor's pending checkpoint and goes on
// checkpointing with higher ids.
func TestLeaderSessionCheckpointsThroughRaft(t *testing.T) {
	kafka, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "words"))
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(kafka.Close)
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)

	w := startFakeWorker(t, "w1", 4, servers[0].GossipAddr(), rpcAddrs(servers))
	spec := fmt.Sprintf(`{
	  "name": "wc",
	  "source": {"brokers": [%q], "topic": "words", "parallelism": 2},
	  "operator": {"name": "wordcount", "parallelism": 2, "max_parallelism": 16},
	  "checkpoint": {"interval": "50ms", "timeout": "10s", "retained": 100, "tolerable_failures": 3}
	}`, kafka.ListenAddrs()[0])
	id := submitJob(t, servers[1], spec)

	waitFor(t, 30*time.Second, func() error { return completedAtLeast(leader, id, 4) })
	job, _ := leader.fsm.Job(id)
	if job.Attempt != 1 || len(job.Tasks) != 4 {
		t.Fatalf("job at attempt %d with %d tasks, want attempt 1 with 4", job.Attempt, len(job.Tasks))
	}
	checkGrowingIDs(t, job.Completed)
	stale := w.staleAckedID()
	i := slices.IndexFunc(job.Completed, func(ck fsm.Checkpoint) bool { return ck.ID == stale })
	if stale == 0 || i < 0 {
		t.Fatalf("checkpoint %d, which got a stale ack, is not among the completed ones", stale)
	}
	if got := string(job.Completed[i].Tasks["map-0"].Keyed); got == staleBlob {
		t.Fatalf("checkpoint %d completed with the stale attempt's ack", stale)
	}
	waitForEqualDigests(t, servers...)

	// Leader change: the worker finds the new leader; tasks are kept.
	stopServer(t, leader)
	rest := followers(leader, servers)
	newLeader := waitForLeader(t, rest...)
	before := lastCompletedID(t, newLeader, id)
	waitFor(t, 30*time.Second, func() error {
		if last := lastCompletedID(t, newLeader, id); last < before+3 {
			return fmt.Errorf("last completed checkpoint %d, want %d", last, before+3)
		}
		return nil
	})
	job, _ = newLeader.fsm.Job(id)
	if job.Attempt != 1 || job.Status != fsm.JobRunning {
		t.Fatalf("leader change restarted the job: attempt %d status %s reason %q", job.Attempt, job.Status, job.Reason)
	}
	if n := w.deployCount(); n != 4 {
		t.Fatalf("worker got %d deployments, want the first 4 only", n)
	}
	checkGrowingIDs(t, job.Completed)
	for _, ab := range job.Aborted {
		// The new leader aborts its predecessor's pending checkpoint and
		// skips the id the predecessor may have sent uncommitted.
		if ab.Reason != "leader changed" && ab.Reason != fsm.SkippedReason {
			t.Errorf("checkpoint %d aborted: %s", ab.ID, ab.Reason)
		}
	}
	waitForEqualDigests(t, rest...)
}

func rpcAddrs(servers []*Server) []string {
	var out []string
	for _, s := range servers {
		out = append(out, s.RPCAddr())
	}
	return out
}

func completedAtLeast(s *Server, jobID string, n int) error {
	job, ok := s.fsm.Job(jobID)
	if !ok {
		return fmt.Errorf("%s does not know job %s", s.ID(), jobID)
	}
	if len(job.Completed) < n {
		return fmt.Errorf("%d checkpoints completed, want %d (status %s %q, attempt %d)", len(job.Completed), n, job.Status, job.Reason, job.Attempt)
	}
	return nil
}

func lastCompletedID(t *testing.T, s *Server, jobID string) uint64 {
	t.Helper()
	ck, ok := s.fsm.LastCompleted(jobID)
	if !ok {
		t.Fatalf("%s: no completed checkpoint of %s", s.ID(), jobID)
	}
	return ck.ID
}

func checkGrowingIDs(t *testing.T, completed []fsm.Checkpoint) {
	t.Helper()
	for i := 1; i < len(completed); i++ {
		if completed[i].ID <= completed[i-1].ID {
			t.Fatalf("checkpoint ids do not grow: %d after %d", completed[i].ID, completed[i-1].ID)
		}
	}
}

// staleBlob is the keyed state of the fake worker's stale-attempt ack.
const staleBlob = "stale"

// fakeWorker is a gossip member with role worker and a control session that
// follows docs/protocol.md just enough: Hello with its running tasks,
// redirects on NotLeader, RUNNING for every deployment, and acks for every
// trigger (from each source and each map task of the attempt, in place of
// the data plane). For the second checkpoint it first sends a map ack with a
// stale attempt and a bogus blob, which the leader must drop.
type fakeWorker struct {
	t     *testing.T
	id    string
	slots int
	rpcs  []string

	// blob, when set, is the size of the keyed state of each map ack: the
	// worker sends it in state chunks, as a real worker does, when the
	// leader takes them.
	blob int

	mu      sync.Mutex
	running map[string]*transport.DeployTask // by task id
	deploys int
	stale   uint64
}

func startFakeWorker(t *testing.T, id string, slots int, join string, rpcs []string) *fakeWorker {
	return startFakeWorkerBlob(t, id, slots, join, rpcs, 0)
}

// startFakeWorkerBlob starts a fake worker whose map acks carry blob bytes
// of keyed state.
func startFakeWorkerBlob(t *testing.T, id string, slots int, join string, rpcs []string, blob int) *fakeWorker {
	t.Helper()
	w := &fakeWorker{t: t, id: id, slots: slots, rpcs: rpcs, blob: blob, running: make(map[string]*transport.DeployTask)}

	meta, err := transport.NodeMeta{Role: transport.RoleWorker, DataAddr: "127.0.0.1:1", Slots: slots}.Encode()
	if err != nil {
		t.Fatalf("encode meta: %v", err)
	}
	cfg := memberlist.DefaultLANConfig()
	cfg.Name = id
	cfg.BindAddr, cfg.BindPort, cfg.AdvertisePort = "127.0.0.1", 0, 0
	cfg.ProbeInterval, cfg.ProbeTimeout, cfg.SuspicionMult, cfg.GossipInterval = 200*time.Millisecond, 100*time.Millisecond, 3, 50*time.Millisecond
	cfg.Delegate = metaDelegate(meta)
	cfg.LogOutput = io.Discard
	ml, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatalf("create worker memberlist: %v", err)
	}
	if _, err := ml.Join([]string{join}); err != nil {
		t.Fatalf("worker join: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := ml.Shutdown(); err != nil {
			t.Errorf("worker memberlist shutdown: %v", err)
		}
	})
	return w
}

// metaDelegate is a memberlist.Delegate that only advertises node meta.
type metaDelegate []byte

func (m metaDelegate) NodeMeta(int) []byte               { return m }
func (metaDelegate) NotifyMsg([]byte)                    {}
func (metaDelegate) GetBroadcasts(int, int) [][]byte     { return nil }
func (metaDelegate) LocalState(bool) []byte              { return nil }
func (metaDelegate) MergeRemoteState(buf []byte, _ bool) {}

func (w *fakeWorker) staleAckedID() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stale
}

func (w *fakeWorker) deployCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.deploys
}

// run keeps a session with whichever coordinator leads until ctx ends,
// trying the coordinators in turn (starting with a follower's redirect).
func (w *fakeWorker) run(ctx context.Context) {
	target := ""
	for i := 0; ctx.Err() == nil; i++ {
		addr := target
		if addr == "" {
			addr = w.rpcs[i%len(w.rpcs)]
		}
		redirect, err := w.session(ctx, addr)
		target = redirect
		if err != nil && ctx.Err() == nil {
			w.t.Logf("fake worker session with %s: %v", addr, err)
		}
		if redirect == "" {
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

// session runs one control session with addr; it returns the leader's
// address if addr answered NotLeader with one.
func (w *fakeWorker) session(ctx context.Context, addr string) (string, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		return "", err
	}
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: w.hello()}}); err != nil {
		return "", err
	}
	first, err := stream.Recv()
	if err != nil {
		return "", err
	}
	if nl := first.GetNotLeader(); nl != nil {
		return nl.GetLeaderRpcAddr(), nil
	}
	if first.GetWelcome() == nil {
		return "", fmt.Errorf("first answer %v", first)
	}
	chunks := first.GetWelcome().GetStateChunks()
	for {
		msg, err := stream.Recv()
		if err != nil {
			return "", err
		}
		for _, out := range w.handle(msg) {
			parts := []*transport.WorkerMessage{out}
			if chunks {
				parts = transport.SplitAck(out)
			}
			for _, p := range parts {
				if err := stream.Send(p); err != nil {
					return "", err
				}
			}
		}
	}
}

func (w *fakeWorker) hello() *transport.Hello {
	w.mu.Lock()
	defer w.mu.Unlock()
	h := &transport.Hello{WorkerId: w.id, DataAddr: "127.0.0.1:1", Slots: int32(w.slots)}
	for _, d := range w.running {
		h.Running = append(h.Running, &transport.TaskStatus{Task: d.GetTask(), Kind: d.GetKind(), Phase: transport.TaskPhase_TASK_PHASE_RUNNING})
	}
	return h
}

// handle answers one message from the leader.
func (w *fakeWorker) handle(msg *transport.CoordinatorMessage) []*transport.WorkerMessage {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case msg.GetDeploy() != nil:
		d := msg.GetDeploy()
		w.running[d.GetTask().GetTaskId()] = d
		w.deploys++
		return []*transport.WorkerMessage{{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{
			Task: d.GetTask(), Kind: d.GetKind(), Phase: transport.TaskPhase_TASK_PHASE_RUNNING,
		}}}}
	case msg.GetCancel() != nil:
		w.t.Errorf("fake worker got CancelTask %v", msg.GetCancel())
	case msg.GetTrigger() != nil:
		tr := msg.GetTrigger()
		if !strings.HasPrefix(tr.GetTask().GetTaskId(), "source-0") {
			return nil // one trigger per attempt is enough to ack for every task
		}
		var out []*transport.WorkerMessage
		if w.stale == 0 && tr.GetCheckpointId() >= 2 {
			w.stale = tr.GetCheckpointId()
			ref := &transport.TaskRef{JobId: tr.GetTask().GetJobId(), Attempt: tr.GetTask().GetAttempt() - 1, TaskId: "map-0"}
			out = append(out, ackMsg(ref, tr.GetCheckpointId(), keyedState([]byte(staleBlob))))
		}
		for _, d := range w.running {
			ref := d.GetTask()
			if ref.GetJobId() != tr.GetTask().GetJobId() || ref.GetAttempt() != tr.GetTask().GetAttempt() {
				continue
			}
			out = append(out, ackMsg(ref, tr.GetCheckpointId(), fakeState(d, tr.GetCheckpointId(), w.blob)))
		}
		return out
	}
	return nil
}

func ackMsg(ref *transport.TaskRef, id uint64, st *transport.TaskState) *transport.WorkerMessage {
	return &transport.WorkerMessage{Msg: &transport.WorkerMessage_Ack{Ack: &transport.CheckpointAck{Task: ref, CheckpointId: id, State: st}}}
}

func fakeState(d *transport.DeployTask, id uint64, size int) *transport.TaskState {
	if d.GetKind() == transport.TaskKind_TASK_KIND_SOURCE {
		offsets := make(map[int32]int64)
		for _, p := range d.GetSource().GetPartitions() {
			offsets[p] = int64(id)
		}
		return &transport.TaskState{Kind: d.GetKind(), Offsets: offsets}
	}
	blob := fmt.Appendf(nil, "%s@%d", d.GetTask().GetTaskId(), id)
	if size > len(blob) {
		blob = append(blob, bytes.Repeat([]byte{byte(id)}, size-len(blob))...)
	}
	return keyedState(blob)
}

func keyedState(blob []byte) *transport.TaskState {
	sum := sha256.Sum256(blob)
	return &transport.TaskState{Kind: transport.TaskKind_TASK_KIND_MAP, Keyed: bytes.Clone(blob), KeyedSha256: hex.EncodeToString(sum[:])}
}
