package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// readCommittedSpec is wordcountSpec reading committed.
var readCommittedSpec = strings.Replace(wordcountSpec, `"parallelism": 2}`, `"parallelism": 2, "isolation_level": "read_committed"}`, 1)

// TestSubmitNeedsCoordinatorsAtFeatureLevel: a job reading committed is
// accepted only while every coordinator of the Raft configuration runs a
// build that keeps source.isolation_level (an older one would drop it from
// its copy of the state); the answer names those that do not, or whose
// build is unknown. Jobs that need no newer feature are accepted anyway.
func TestSubmitNeedsCoordinatorsAtFeatureLevel(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	keepClosed(&s.compressed) // or compressed entries would need a higher level
	if !strings.Contains(readCommittedSpec, "read_committed") {
		t.Fatal("readCommittedSpec does not read committed")
	}
	submitJob(t, s, readCommittedSpec)

	refused := func(want string) {
		t.Helper()
		var out struct {
			Error string `json:"error"`
		}
		code := apiCall(t, s, http.MethodPost, "/v1/jobs", readCommittedSpec, &out)
		if code != http.StatusConflict || !strings.Contains(out.Error, "source.isolation_level read_committed needs every coordinator at feature level 1") || !strings.Contains(out.Error, want) {
			t.Fatalf("POST /v1/jobs reading committed: %d %q, want 409 naming %q", code, out.Error, want)
		}
		submitJob(t, s, wordcountSpec)
	}

	// A coordinator in the configuration that gossip never showed.
	if err := s.raft.AddNonvoter("c-unseen", "127.0.0.1:1", 0, 10*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	refused("c-unseen (not seen in gossip)")
	if err := s.raft.RemoveServer("c-unseen", 0, 10*time.Second).Error(); err != nil {
		t.Fatal(err)
	}

	// One that gossip shows running an older build.
	old := startGossipMember(t, "c-old", coordinatorMeta(t, "127.0.0.1:2"), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	if err := s.raft.AddNonvoter("c-old", raft.ServerAddress("127.0.0.1:2"), 0, 10*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	refused("c-old (feature level 0)")

	// Nor does add-peer take a coordinator below the level a job needs
	// (a read_committed job exists), or one whose level is unknown.
	older := startGossipMember(t, "c-older", coordinatorMeta(t, "127.0.0.1:3"), nil, s.GossipAddr())
	if older.joinErr != nil {
		t.Fatal(older.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-older", StatusAlive) })
	for id, want := range map[string]string{
		"c-older":  "coordinator c-older runs a build at feature level 0, and job wordcount-",
		"c-nobody": "coordinator c-nobody is not seen in gossip, so its feature level is unknown",
	} {
		var out struct {
			Error string `json:"error"`
		}
		code := apiCall(t, s, http.MethodPost, "/v1/raft/peers", map[string]any{"id": id, "address": "127.0.0.1:3", "voter": false}, &out)
		if code != http.StatusConflict || !strings.Contains(out.Error, want) {
			t.Errorf("POST /v1/raft/peers %s: %d %q, want 409 with %q", id, code, out.Error, want)
		}
		if _, ok := inRaft(s, id); ok {
			t.Errorf("%s added to the raft configuration", id)
		}
	}
}

// TestAddPeerNeedsDiscoveryLevelWhileJobsLive: while any job is live, its
// sources may read partitions they discovered, whose checkpoints a build
// older than discovery rejects in its FSM: add-peer refuses a coordinator
// below discoveryLevel, even for jobs that need no newer spec field. With no
// job, the feature level is not what keeps it out.
func TestAddPeerNeedsDiscoveryLevelWhileJobsLive(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	keepClosed(&s.compressed) // or compressed entries would need a higher level
	old := startGossipMember(t, "c-old", coordinatorMeta(t, "127.0.0.1:3"), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	addPeer := func() (int, string) { return addNonvoter(t, s, "c-old") }
	if code, msg := addPeer(); code == http.StatusConflict {
		t.Fatalf("add-peer of a level 0 coordinator without jobs: %d %q, want no feature-level refusal", code, msg)
	}
	submitJob(t, s, wordcountSpec)
	code, msg := addPeer()
	if code != http.StatusConflict || !strings.Contains(msg, "needs level 1 of every coordinator (partition discovery)") {
		t.Fatalf("add-peer of a level 0 coordinator with a job live: %d %q, want 409 naming partition discovery", code, msg)
	}
	if _, ok := inRaft(s, "c-old"); ok {
		t.Fatal("c-old added to the raft configuration")
	}
}

// TestAddPeerNeedsJobGCLevelOncePurged: a coordinator below jobGCLevel
// cannot join while a cancelled job may be purged, by job garbage
// collection or on request (so with -job-gc-threshold 0 too), nor, with no
// job left at all, once a job has been purged: the log it would replay may
// hold a JobPurged, which it would reject.
func TestAddPeerNeedsJobGCLevelOncePurged(t *testing.T) {
	for _, threshold := range []time.Duration{4 * time.Hour, 0} {
		t.Run(fmt.Sprintf("job-gc-threshold=%v", threshold), func(t *testing.T) {
			addPeerNeedsJobGCLevelOncePurged(t, threshold)
		})
	}
}

func addPeerNeedsJobGCLevelOncePurged(t *testing.T, threshold time.Duration) {
	s := startSingle(t, testLogger(t), "c1", func(c *Config) { c.JobGCThreshold = threshold })
	// Or framed batches and compressed entries would need a higher level
	// still.
	keepClosed(&s.framed, &s.compressed)
	old := startGossipMember(t, "c-old", coordinatorMetaAt(t, "127.0.0.1:3", jobGCLevel-1), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	addPeer := func() (int, string) { return addNonvoter(t, s, "c-old") }
	id := submitJob(t, s, wordcountSpec)
	ctx := context.Background()
	if _, _, err := s.raftApplyAt(ctx, fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: id, Reason: "test", Time: time.Now().UnixNano()}); err != nil {
		t.Fatal(err)
	}
	code, msg := addPeer()
	if code != http.StatusConflict || !strings.Contains(msg, "the cluster needs level 2 of every coordinator (cancelled jobs, which may be purged)") {
		t.Fatalf("add-peer of a level %d coordinator with a cancelled job to purge: %d %q, want 409 naming it", jobGCLevel-1, code, msg)
	}
	if _, _, err := s.raftApplyAt(ctx, fsm.CommandJobPurged, fsm.JobPurgedCmd{JobID: id, Time: time.Now().UnixNano()}); err != nil {
		t.Fatal(err)
	}
	code, msg = addPeer()
	if code != http.StatusConflict || !strings.Contains(msg, "the cluster needs level 2 of every coordinator (purged jobs in the Raft log)") {
		t.Fatalf("add-peer of a level %d coordinator after a purge: %d %q, want 409 naming the purged jobs", jobGCLevel-1, code, msg)
	}
	if _, ok := inRaft(s, "c-old"); ok {
		t.Fatal("c-old added to the raft configuration")
	}
}

// keepClosed closes gates for good, as a coordinator below their level in
// the configuration would (s writes JSON batches only, say), so that a test
// can see the lower levels' rules.
func keepClosed(gates ...*writeGate) {
	for _, g := range gates {
		g.mu.Lock()
		g.below = func() ([]string, error) { return []string{"c-test (feature level 0)"}, nil }
		g.checked = time.Time{}
		g.open.Store(false)
		g.mu.Unlock()
	}
}

// TestAddPeerNeedsLevelOnceWritten: once the leader has written a framed
// batch, or a compressed entry, a coordinator below that feature's level
// may not join (it could not apply the log); nor while the leader's gate
// for it is open; before, nothing about them stops it.
func TestAddPeerNeedsLevelOnceWritten(t *testing.T) {
	t.Run("framed", func(t *testing.T) {
		addPeerNeedsLevelOnceWritten(t, framedBatchLevel, "framed batches in the Raft log",
			func(s *Server) *writeGate { return &s.framed }, (*fsm.FSM).FramedBatches)
	})
	t.Run("compressed", func(t *testing.T) {
		addPeerNeedsLevelOnceWritten(t, compressedLevel, "compressed entries in the Raft log",
			func(s *Server) *writeGate { return &s.compressed }, (*fsm.FSM).CompressedEntries)
	})
}

// addPeerNeedsLevelOnceWritten runs TestAddPeerNeedsLevelOnceWritten for
// the feature of gate at level, which applied reports in the FSM; every
// other gate of a higher level stays closed.
func addPeerNeedsLevelOnceWritten(t *testing.T, level int, what string, gate func(*Server) *writeGate, applied func(*fsm.FSM) bool) {
	s := startSingle(t, testLogger(t), "c1", nil)
	if level < compressedLevel {
		keepClosed(&s.compressed)
	}
	g := gate(s)
	old := startGossipMember(t, "c-old", coordinatorMetaAt(t, "127.0.0.1:3", level-1), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	if got, what, _ := s.neededFeatureLevel(); got >= level {
		t.Fatalf("an empty cluster needs level %d (%s), want below %d", got, what, level)
	}
	wantMsg := fmt.Sprintf("the cluster needs level %d of every coordinator (%s)", level, what)

	// An open gate alone refuses it: the leader may be writing an entry
	// that no replica has applied yet.
	g.mu.Lock()
	g.open.Store(true)
	g.mu.Unlock()
	if code, msg := addNonvoter(t, s, "c-old"); code != http.StatusConflict || !strings.Contains(msg, wantMsg) {
		t.Fatalf("add-peer of a level %d coordinator while the gate is open: %d %q, want 409 naming %s", level-1, code, msg, what)
	}
	if applied(s.fsm) {
		t.Fatalf("%s before any command was submitted", what)
	}

	// Commands that arrive together go in batches, framed and compressed:
	// every coordinator of the configuration (c1) is at the level. Rounds
	// of them until one entry used the feature.
	const n = 64
	payloads := make([][]byte, n)
	for i := range payloads {
		data, err := fsm.Encode(fsm.CommandJobStatus, fsm.JobStatusCmd{JobID: "nope", Status: fsm.JobRunning, Time: 1})
		if err != nil {
			t.Fatal(err)
		}
		payloads[i] = data
	}
	waitFor(t, 10*time.Second, func() error {
		errs := make(chan error, n)
		for _, data := range payloads {
			s.committer.submit(fsm.CommandJobStatus, data, func(_ any, _ uint64, err error) { errs <- err })
		}
		for range n {
			if err := <-errs; !errors.Is(err, fsm.ErrNoSuchJob) {
				t.Fatalf("status of a job that does not exist: %v, want ErrNoSuchJob", err)
			}
		}
		if !applied(s.fsm) {
			return fmt.Errorf("%d commands submitted together, and no entry with %s applied", n, what)
		}
		return nil
	})
	// Closed again (a coordinator below the level appeared), the gate no
	// longer counts: the log does.
	keepClosed(g)
	code, msg := addNonvoter(t, s, "c-old")
	if code != http.StatusConflict || !strings.Contains(msg, wantMsg) {
		t.Fatalf("add-peer of a level %d coordinator after %s: %d %q, want 409 naming them", level-1, what, code, msg)
	}
	if _, ok := inRaft(s, "c-old"); ok {
		t.Fatal("c-old added to the raft configuration")
	}
}

// TestFramedGate: the gate opens when no coordinator is below the level,
// looks again only every gateRecheck, and while a join holds it keeps
// its last answer instead of looking.
func TestFramedGate(t *testing.T) {
	var below []string
	looks := 0
	clock := time.Unix(1000, 0)
	g := &writeGate{below: func() ([]string, error) { looks++; return below, nil }, now: func() time.Time { return clock }}
	if !g.allow() || looks != 1 {
		t.Fatalf("no coordinator below: allow false or %d looks, want true after 1", looks)
	}
	below = []string{"c2 (feature level 2)"}
	clock = clock.Add(gateRecheck - time.Millisecond)
	if !g.allow() || looks != 1 {
		t.Fatalf("within gateRecheck: the gate looked again (%d looks) or closed", looks)
	}
	clock = clock.Add(time.Millisecond)
	if g.allow() || looks != 2 {
		t.Fatalf("c2 below the level: allow true or %d looks, want false after 2", looks)
	}
	g.mu.Lock() // a join is being decided
	below = nil
	clock = clock.Add(gateRecheck)
	if g.allow() || looks != 2 {
		t.Fatalf("during a join: allow true or %d looks, want the last answer (false) and no look", looks)
	}
	g.mu.Unlock()
	if !g.allow() || looks != 3 {
		t.Fatalf("after the join: allow false or %d looks, want true after 3", looks)
	}
	g.below = func() ([]string, error) { return nil, errors.New("no configuration") }
	clock = clock.Add(gateRecheck)
	if g.allow() {
		t.Fatal("the gate opened although the configuration could not be read")
	}
}

// addNonvoter asks s, through the API, to add coordinator id as a nonvoter
// and returns the answer's code and error.
func addNonvoter(t *testing.T, s *Server, id string) (int, string) {
	t.Helper()
	var out struct {
		Error string `json:"error"`
	}
	code := apiCall(t, s, http.MethodPost, "/v1/raft/peers", map[string]any{"id": id, "address": "127.0.0.1:1", "voter": false}, &out)
	return code, out.Error
}

// TestNamedCapsTheList: a reason names at most maxNamed members and counts
// the rest, since pending reasons are replicated.
func TestNamedCapsTheList(t *testing.T) {
	if got := named([]string{"w1", "w2"}); got != "w1, w2" {
		t.Errorf("named two = %q", got)
	}
	ids := []string{"w1", "w2", "w3", "w4", "w5", "w6", "w7"}
	if got, want := named(ids), "w1, w2, w3, w4, w5 and 2 more"; got != want {
		t.Errorf("named seven = %q, want %q", got, want)
	}
}

// TestAddPeerNeedsChosenIDLevelOnceChosen: once the leader may choose
// checkpoint ids (its gate is open) or the log holds a trigger with a
// chosen id, a coordinator below chosenIDLevel may not join: it would take
// the next id itself and keep another state.
func TestAddPeerNeedsChosenIDLevelOnceChosen(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	keepClosed(&s.compressed) // or compressed entries would need a higher level
	old := startGossipMember(t, "c-old", coordinatorMetaAt(t, "127.0.0.1:3", chosenIDLevel-1), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	if level, what, _ := s.neededFeatureLevel(); level >= chosenIDLevel {
		t.Fatalf("an empty cluster needs level %d (%s), want below %d", level, what, chosenIDLevel)
	}
	const wantMsg = "the cluster needs level 4 of every coordinator (checkpoint ids chosen by the leader in the Raft log)"

	// A gate that opened once refuses it for good, even closed again: an
	// entry it allowed may still wait in the write path.
	setGate := func(open bool) {
		s.chosenIDs.mu.Lock()
		defer s.chosenIDs.mu.Unlock()
		s.chosenIDs.below = func() ([]string, error) {
			if open {
				return nil, nil
			}
			return []string{"c-test (feature level 3)"}, nil
		}
		s.chosenIDs.checked = time.Time{}
	}
	setGate(true)
	if !s.chosenIDs.allow() {
		t.Fatal("the gate did not open with every coordinator at the level")
	}
	setGate(false)
	if s.chosenIDs.allow() {
		t.Fatal("the gate did not close with a coordinator below the level")
	}
	if code, msg := addNonvoter(t, s, "c-old"); code != http.StatusConflict || !strings.Contains(msg, wantMsg) {
		t.Fatalf("add-peer of a level %d coordinator after the gate opened: %d %q, want 409 naming chosen ids", chosenIDLevel-1, code, msg)
	}

	// On a coordinator whose gate never opened (a new leader), the log
	// holding a chosen id refuses it: a job's trigger with the id the
	// leader chose, applied in one entry with the job, so that this
	// leader's own loop cannot act on the job in between.
	s.chosenIDs.opened.Store(false)
	spec := testJobSpec(1, 1)
	kg := fsm.KeyGroupRanges(spec.Operator.MaxParallelism, 1)[0]
	tasks := []fsm.Task{
		{ID: fsm.TaskID(fsm.TaskSource, 0), Kind: fsm.TaskSource, Worker: "w1", Partitions: []int32{0}},
		{ID: fsm.TaskID(fsm.TaskMap, 0), Kind: fsm.TaskMap, Worker: "w1", DataAddr: "w1:7401", KeyGroups: &kg},
	}
	var payloads [][]byte
	for _, c := range []struct {
		t   fsm.CommandType
		cmd any
	}{
		{fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: "j1", Spec: spec, Time: 1}},
		{fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: "j1", Attempt: 1, Tasks: tasks, Reason: "deployed", Time: 2}},
		{fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: "j1", Attempt: 1, Time: 3, ID: 7}},
	} {
		data, err := fsm.Encode(c.t, c.cmd)
		if err != nil {
			t.Fatal(err)
		}
		payloads = append(payloads, data)
	}
	entry, err := fsm.EncodeBatch(payloads)
	if err != nil {
		t.Fatal(err)
	}
	f := s.raft.Apply(entry, 10*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	if res, ok := f.Response().(fsm.BatchResult); !ok || len(res) != 3 || res[2] != uint64(7) {
		t.Fatalf("the batch's results: %#v, want the job registered, deployed and checkpoint 7 triggered", f.Response())
	}
	if !s.fsm.ChosenCheckpointIDs() {
		t.Fatal("the FSM does not mark the chosen id")
	}
	if code, msg := addNonvoter(t, s, "c-old"); code != http.StatusConflict || !strings.Contains(msg, wantMsg) {
		t.Fatalf("add-peer of a level %d coordinator after a chosen id: %d %q, want 409 naming chosen ids", chosenIDLevel-1, code, msg)
	}
	if _, ok := inRaft(s, "c-old"); ok {
		t.Fatal("c-old added to the raft configuration")
	}
}

// TestSubmissionKeysNeedLevel: a submission with an Idempotency-Key is
// refused (409, naming the older coordinator) while a coordinator below
// SubmissionKeyLevel is in the Raft configuration, which would register a
// second job of the key where the others refuse it; once the log holds a
// key, no such coordinator may join.
func TestSubmissionKeysNeedLevel(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	keepClosed(&s.compressed) // or compressed entries would need a higher level
	old := startGossipMember(t, "c-old", coordinatorMetaAt(t, "127.0.0.1:3", SubmissionKeyLevel-1), nil, s.GossipAddr())
	if old.joinErr != nil {
		t.Fatal(old.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "c-old", StatusAlive) })
	if err := s.raft.AddNonvoter("c-old", raft.ServerAddress("127.0.0.1:3"), 0, 10*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	recheck := func() {
		s.keys.mu.Lock()
		s.keys.checked = time.Time{}
		s.keys.mu.Unlock()
	}
	recheck()
	keyed := func() (int, string) {
		code, body := postKeyed(t, s, "k1", "/v1/jobs", wordcountSpec)
		return code, string(body)
	}
	if code, body := keyed(); code != http.StatusConflict || !strings.Contains(body, fmt.Sprintf("feature level %d", SubmissionKeyLevel)) || !strings.Contains(body, "c-old (feature level 4)") {
		t.Fatalf("keyed submission beside a level %d coordinator: %d %s, want 409 naming it", SubmissionKeyLevel-1, code, body)
	}
	if s.fsm.SubmissionKeys() || len(s.fsm.Jobs()) != 0 {
		t.Fatal("the refused keyed submission reached the log")
	}
	submitJob(t, s, wordcountSpec) // without a key: accepted

	if err := s.raft.RemoveServer("c-old", 0, 10*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	recheck()
	if code, body := keyed(); code != http.StatusCreated {
		t.Fatalf("keyed submission with every coordinator at the level: %d %s", code, body)
	}
	s.keys.opened.Store(false) // as on a new leader: the log's mark alone refuses
	if !s.fsm.SubmissionKeys() {
		t.Fatal("the FSM does not mark the key")
	}
	if code, msg := addNonvoter(t, s, "c-old"); code != http.StatusConflict || !strings.Contains(msg, "submission keys in the Raft log") {
		t.Fatalf("add-peer of a level %d coordinator once the log holds a key: %d %q, want 409 naming submission keys", SubmissionKeyLevel-1, code, msg)
	}
}
