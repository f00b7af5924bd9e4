package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

func TestLeaderAssignSpreadsTasksOverFreeSlots(t *testing.T) {
	spec := testJobSpec(2, 3)
	workers := []workerSlots{
		{id: "w2", dataAddr: "w2:7401", free: 2},
		{id: "w1", dataAddr: "w1:7401", free: 4},
		{id: "w3", dataAddr: "w3:7401", free: 2},
	}
	tasks, err := assign(spec, 5, workers)
	if err != nil {
		t.Fatalf("assign: %v", err)
	}
	// Most free first, then by id: sources on w1, w2, and maps from w1
	// again, so that map-i shares source-i's worker.
	want := []struct {
		id, worker string
	}{{"source-0", "w1"}, {"source-1", "w2"}, {"map-0", "w1"}, {"map-1", "w2"}, {"map-2", "w3"}}
	if len(tasks) != len(want) {
		t.Fatalf("got %d tasks, want %d", len(tasks), len(want))
	}
	for i, w := range want {
		if tasks[i].ID != w.id || tasks[i].Worker != w.worker || tasks[i].DataAddr != w.worker+":7401" {
			t.Errorf("task %d = %s on %s (%s), want %s on %s", i, tasks[i].ID, tasks[i].Worker, tasks[i].DataAddr, w.id, w.worker)
		}
	}
	if got := tasks[0].Partitions; !slices.Equal(got, []int32{0, 2, 4}) {
		t.Errorf("source-0 partitions = %v, want [0 2 4]", got)
	}
	if got := tasks[1].Partitions; !slices.Equal(got, []int32{1, 3}) {
		t.Errorf("source-1 partitions = %v, want [1 3]", got)
	}
	wantKG := fsm.KeyGroupRanges(spec.Operator.MaxParallelism, 3)
	for i := range 3 {
		if kg := tasks[2+i].KeyGroups; kg == nil || *kg != wantKG[i] {
			t.Errorf("map-%d key groups = %v, want %v", i, kg, wantKG[i])
		}
	}
	if workers[1].free != 4 {
		t.Errorf("assign changed its input: w1 free = %d", workers[1].free)
	}
}

// Map task i goes to source task i's worker while it has room: a job of one
// source and one map task runs on one worker.
func TestLeaderAssignKeepsPipelinesTogether(t *testing.T) {
	for _, tc := range []struct {
		name    string
		sources int
		maps    int
		workers []workerSlots
		want    map[string]string // task id: worker
	}{
		{"one of each", 1, 1, []workerSlots{{id: "w1", free: 3}, {id: "w2", free: 3}},
			map[string]string{"source-0": "w1", "map-0": "w1"}},
		{"two of each on three workers", 2, 2, []workerSlots{{id: "w1", free: 2}, {id: "w2", free: 2}, {id: "w3", free: 2}},
			map[string]string{"source-0": "w1", "source-1": "w2", "map-0": "w1", "map-1": "w2"}},
		{"no room left beside the source", 1, 1, []workerSlots{{id: "w1", free: 1}, {id: "w2", free: 1}},
			map[string]string{"source-0": "w1", "map-0": "w2"}},
	} {
		tasks, err := assign(testJobSpec(tc.sources, tc.maps), 4, tc.workers)
		if err != nil {
			t.Fatalf("%s: assign: %v", tc.name, err)
		}
		if got := workersOf(tasks); !maps.Equal(got, tc.want) {
			t.Errorf("%s: placed %v, want %v", tc.name, got, tc.want)
		}
	}
}

// workersOf returns the worker of each task, by task id.
func workersOf(tasks []fsm.Task) map[string]string {
	got := make(map[string]string, len(tasks))
	for _, task := range tasks {
		got[task.ID] = task.Worker
	}
	return got
}

// Task-scoped recovery places a lost task beside its partner (source i and
// map task i) as assign does, where the partner survived or was just placed,
// while that worker has room; otherwise on the worker with the most free
// slots. Never on a lost worker.
func TestPlaceLostKeepsPipelinesTogether(t *testing.T) {
	job := func(places map[string]string) []*trackedTask {
		var all []*trackedTask
		for _, id := range []string{"source-0", "source-1", "map-0", "map-1"} {
			kind, index := fsm.TaskSource, 0
			if strings.HasPrefix(id, "map-") {
				kind = fsm.TaskMap
			}
			if strings.HasSuffix(id, "-1") {
				index = 1
			}
			all = append(all, &trackedTask{task: fsm.Task{ID: id, Kind: kind, Index: index, Worker: places[id]}})
		}
		return all
	}
	for _, tc := range []struct {
		name    string
		places  map[string]string // task id: worker before the loss
		lost    string            // the lost worker
		workers []workerSlots
		want    map[string]string // lost task id: new worker
	}{
		{"a lost pair stays together, though another worker has as many free slots",
			map[string]string{"source-0": "w1", "map-0": "w1", "source-1": "w2", "map-1": "w2"}, "w1",
			[]workerSlots{{id: "w2", free: 2}, {id: "w3", free: 2}},
			map[string]string{"source-0": "w2", "map-0": "w2"}},
		{"a lost map task goes beside its surviving source, not to the most free worker",
			map[string]string{"source-0": "w1", "map-0": "w1", "source-1": "w2", "map-1": "w3"}, "w3",
			[]workerSlots{{id: "w1", free: 1}, {id: "w2", free: 1}, {id: "w4", free: 4}},
			map[string]string{"map-1": "w2"}},
		{"no room beside the partner: the most free worker",
			map[string]string{"source-0": "w1", "map-0": "w2", "source-1": "w1", "map-1": "w3"}, "w2",
			[]workerSlots{{id: "w1", free: 0}, {id: "w3", free: 1}, {id: "w4", free: 2}},
			map[string]string{"map-0": "w4"}},
		{"a lost pair does not take the slot beside a survivor whose partner was lost",
			map[string]string{"source-0": "w1", "map-0": "w1", "source-1": "w2", "map-1": "w1"}, "w1",
			[]workerSlots{{id: "w2", free: 2}, {id: "w3", free: 2}},
			map[string]string{"map-1": "w2", "source-0": "w3", "map-0": "w3"}},
		{"never on the lost worker, though it is listed with free slots",
			map[string]string{"source-0": "w1", "map-0": "w1", "source-1": "w2", "map-1": "w2"}, "w1",
			[]workerSlots{{id: "w1", free: 4}, {id: "w2", free: 0}, {id: "w3", free: 2}},
			map[string]string{"source-0": "w3", "map-0": "w3"}},
	} {
		all := job(tc.places)
		var lost []*trackedTask
		for _, tv := range all {
			if tv.task.Worker == tc.lost {
				lost = append(lost, tv)
			}
		}
		placed, err := placeLost(lost, all, tc.workers, map[string]bool{tc.lost: true})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := workersOf(placed); !maps.Equal(got, tc.want) {
			t.Errorf("%s: placed %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Jobs placed one after the other before Raft applied the first one's
// placement do not take the same slots: a deploy reserves its slots until
// the job holds them.
func TestLeaderPlacesJobsDeployedTogetherWithinSlots(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w1", 4)
	h.connect("w2", 4)
	h.pastGrace()
	const jobs = 4 // of two tasks each: every slot
	for i := range jobs {
		h.register(fmt.Sprintf("j%d", i), testJobSpec(1, 1))
	}
	h.applyLater = true
	h.l.reconcile() // asks for every job's partitions
	for range jobs {
		select {
		case ev := <-h.l.events:
			h.l.handle(ev) // places a job; its write waits for Raft
		case <-time.After(10 * time.Second):
			t.Fatal("partition lookups did not report within 10s")
		}
	}
	h.flush()
	tasks := make(map[string]int)
	for i := range jobs {
		j := h.job(fmt.Sprintf("j%d", i))
		if j.Status != fsm.JobRunning {
			t.Fatalf("job %s: %s %q, want running", j.ID, j.Status, j.Reason)
		}
		for _, task := range j.Tasks {
			tasks[task.Worker]++
		}
	}
	if tasks["w1"] != 4 || tasks["w2"] != 4 {
		t.Fatalf("tasks per worker %v, want 4 on each worker of 4 slots", tasks)
	}
	if len(h.l.used) != 2 || h.l.used["w1"] != 4 || h.l.used["w2"] != 4 {
		t.Fatalf("slots counted as used %v once every job runs, want 4 on each worker", h.l.used)
	}
}

func TestLeaderAssignWithoutEnoughSlotsSaysHowMany(t *testing.T) {
	_, err := assign(testJobSpec(2, 3), 4, []workerSlots{{id: "w1", free: 2}, {id: "w2", free: 1}})
	var slots *slotsError
	if !errors.As(err, &slots) {
		t.Fatalf("assign error = %v, want a *slotsError", err)
	}
	if got, want := err.Error(), "waiting for 5 free slots (3 free)"; got != want {
		t.Fatalf("reason = %q, want %q", got, want)
	}
}

func TestLeaderFreeSlotsCountsOnlyRunningJobs(t *testing.T) {
	workers := []Member{
		{ID: "w1", Slots: 4, DataAddr: "w1:1"},
		{ID: "w2", Slots: 2, DataAddr: "w2:1"},
		{ID: "w3", Slots: 1, DataAddr: "w3:1"},
		{ID: "w4", Slots: 8, DataAddr: "w4:1"}, // no session: not placeable
	}
	env := leaderEnv{aliveWorkers: func() []Member { return workers }, now: time.Now}
	l := newLeader(context.Background(), env, Config{}, testLogger(t), newMetrics(), 1)
	for _, w := range []string{"w1", "w2", "w3"} {
		l.sessions[w] = newSession(t.Context(), &transport.Hello{WorkerId: w}, nil)
	}
	job := func(id string, status fsm.JobStatus, on ...string) {
		js := &jobState{id: id, status: status}
		for _, w := range on {
			js.order = append(js.order, &trackedTask{task: fsm.Task{Worker: w}})
		}
		l.jobs[id] = js
		l.account(js)
	}
	job("a", fsm.JobRunning, "w1", "w2", "w3")
	job("b", fsm.JobRestarting, "w1")
	job("c", fsm.JobCancelled, "w1")
	job("self", fsm.JobRunning, "w2")
	spec := testJobSpec(1, 1)
	got, _ := l.placeable(spec, "self")
	want := []workerSlots{{id: "w1", dataAddr: "w1:1", free: 3}, {id: "w2", dataAddr: "w2:1", free: 1}}
	if !slices.Equal(got, want) {
		t.Fatalf("placeable = %+v, want %+v", got, want)
	}
	// Job a stops running: its slots are free again, and the count follows.
	l.jobs["a"].status = fsm.JobRestarting
	l.account(l.jobs["a"])
	got, _ = l.placeable(spec, "self")
	want = []workerSlots{{id: "w1", dataAddr: "w1:1", free: 4}, {id: "w2", dataAddr: "w2:1", free: 2}, {id: "w3", dataAddr: "w3:1", free: 1}}
	if !slices.Equal(got, want) {
		t.Fatalf("after a stops: placeable = %+v, want %+v", got, want)
	}
}

// TestLeaderPlacesByFeatureLevel: a job reading committed is placed only on
// workers whose build implements it (transport.FeatureLevel 1); an older
// worker ignores the field and would read uncommitted. Its pending reason
// names the workers left out. Other jobs go anywhere.
func TestLeaderPlacesByFeatureLevel(t *testing.T) {
	workers := []Member{
		{ID: "w1", Slots: 4, DataAddr: "w1:1", FeatureLevel: 1},
		{ID: "w2", Slots: 4, DataAddr: "w2:1"}, // an older build
	}
	env := leaderEnv{aliveWorkers: func() []Member { return workers }, now: time.Now}
	l := newLeader(context.Background(), env, Config{}, testLogger(t), newMetrics(), 1)
	for _, w := range workers {
		l.sessions[w.ID] = newSession(t.Context(), &transport.Hello{WorkerId: w.ID}, nil)
	}
	plain := testJobSpec(1, 1)
	if got, old := l.placeable(plain, ""); len(got) != 2 || old != nil {
		t.Fatalf("a job reading uncommitted: placeable %+v, left out %v; want both workers", got, old)
	}
	committed := testJobSpec(1, 1)
	committed.Source.IsolationLevel = fsm.IsolationReadCommitted
	got, old := l.placeable(committed, "")
	if want := []workerSlots{{id: "w1", dataAddr: "w1:1", free: 4}}; !slices.Equal(got, want) || !slices.Equal(old, []string{"w2"}) {
		t.Fatalf("a job reading committed: placeable %+v, left out %v; want only w1, w2 left out", got, old)
	}
	tasks, err := assign(committed, 2, got)
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		if task.Worker != "w1" {
			t.Fatalf("task %s placed on %s, whose build does not read committed", task.ID, task.Worker)
		}
	}
	workers[0].FeatureLevel = 0
	got, old = l.placeable(committed, "")
	if len(got) != 0 {
		t.Fatalf("no worker at the level: placeable %+v, want none", got)
	}
	if note := tooOldNote(committed, old); note != "; workers w1, w2 run a build too old for source.isolation_level read_committed: upgrade them" {
		t.Fatalf("pending note %q", note)
	}
}

func TestLeaderRestoreOffsetsFollowPartitionsAcrossParallelism(t *testing.T) {
	// Checkpointed with 3 sources over 6 partitions; restored with 2 sources.
	ck := &fsm.Checkpoint{ID: 7, Tasks: map[string]fsm.TaskState{
		"source-0": {Kind: fsm.TaskSource, Offsets: map[int32]int64{0: 100, 3: 130}},
		"source-1": {Kind: fsm.TaskSource, Offsets: map[int32]int64{1: 110, 4: 140}},
		"source-2": {Kind: fsm.TaskSource, Offsets: map[int32]int64{2: 120, 5: 150}},
		"map-0":    {Kind: fsm.TaskMap, Keyed: []byte("a"), KeyedSHA256: "x"},
	}}
	got0 := restoreOffsets(ck, fsm.SourcePartitions(6, 2, 0))
	want0 := map[int32]int64{0: 100, 2: 120, 4: 140}
	got1 := restoreOffsets(ck, fsm.SourcePartitions(6, 2, 1))
	want1 := map[int32]int64{1: 110, 3: 130, 5: 150}
	if !maps.Equal(got0, want0) || !maps.Equal(got1, want1) {
		t.Fatalf("restore offsets = %v and %v, want %v and %v", got0, got1, want0, want1)
	}
	// A partition added since the checkpoint has no offset: the source starts it from spec.start.
	if got := restoreOffsets(ck, []int32{0, 6}); !maps.Equal(got, map[int32]int64{0: 100}) {
		t.Fatalf("restore offsets with a new partition = %v", got)
	}
}

func TestLeaderBuildDeployCarriesRestoreState(t *testing.T) {
	spec := testJobSpec(2, 2)
	tasks, err := assign(spec, 4, []workerSlots{{id: "w1", dataAddr: "w1:7401", free: 2}, {id: "w2", dataAddr: "w2:7401", free: 2}})
	if err != nil {
		t.Fatalf("assign: %v", err)
	}
	job := fsm.Job{ID: "j1", Spec: spec, Attempt: 3, Tasks: tasks}
	ck := &fsm.Checkpoint{ID: 9, Tasks: map[string]fsm.TaskState{
		"source-0": {Kind: fsm.TaskSource, Offsets: map[int32]int64{0: 5, 2: 6}},
		"source-1": {Kind: fsm.TaskSource, Offsets: map[int32]int64{1: 7, 3: 8}},
		"map-1":    {Kind: fsm.TaskMap, Keyed: []byte("b"), KeyedSHA256: "hb"},
		"map-0":    {Kind: fsm.TaskMap, Keyed: []byte("a"), KeyedSHA256: "ha"},
	}}
	src := buildDeploy(job, tasks[1], ck, "", true)
	if src.GetTask().GetAttempt() != 3 || src.GetKind() != transport.TaskKind_TASK_KIND_SOURCE || src.GetIndex() != 1 {
		t.Fatalf("source deploy header = %v", src)
	}
	if src.GetSource().GetGroup() != "coordflow-wc" || !slices.Equal(src.GetSource().GetPartitions(), []int32{1, 3}) {
		t.Fatalf("source spec = %v", src.GetSource())
	}
	if src.GetRestoreCheckpointId() != 9 || !maps.Equal(src.GetRestoreOffsets(), map[int32]int64{1: 7, 3: 8}) {
		t.Fatalf("source restore = %d %v", src.GetRestoreCheckpointId(), src.GetRestoreOffsets())
	}
	if src.GetNumSources() != 2 || len(src.GetMapTasks()) != 2 || src.GetMapTasks()[1].GetDataAddr() != tasks[3].DataAddr {
		t.Fatalf("source routing = %d sources, map tasks %v", src.GetNumSources(), src.GetMapTasks())
	}
	m := buildDeploy(job, tasks[2], ck, "", true)
	blobs := m.GetRestoreKeyed()
	if len(blobs) != 2 || blobs[0].GetTaskId() != "map-0" || string(blobs[1].GetData()) != "b" || blobs[1].GetSha256() != "hb" {
		t.Fatalf("map restore blobs = %v", blobs)
	}
	if len(m.GetRestoreOffsets()) != 0 || m.GetSink().GetTopic() != "counts" {
		t.Fatalf("map deploy = %v", m)
	}
	if fresh := buildDeploy(job, tasks[0], nil, "", true); fresh.GetRestoreCheckpointId() != 0 || len(fresh.GetRestoreOffsets()) != 0 {
		t.Fatalf("fresh deploy restores: %v", fresh)
	}
}

// TestLeaderRestoreKeyedSendsOverlappingBlobs: a map task is sent the blobs
// whose key groups overlap its own range, and every blob that names none.
func TestLeaderRestoreKeyedSendsOverlappingBlobs(t *testing.T) {
	ck := &fsm.Checkpoint{ID: 4, Tasks: map[string]fsm.TaskState{
		"map-0":    {Kind: fsm.TaskMap, KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 64}},
		"map-1":    {Kind: fsm.TaskMap, KeyGroups: &fsm.KeyGroupRange{Start: 64, End: 128}},
		"source-0": {Kind: fsm.TaskSource, Offsets: map[int32]int64{0: 1}},
	}}
	ids := func(own *fsm.KeyGroupRange) []string {
		var out []string
		for _, b := range restoreKeyed(ck, own) {
			out = append(out, b.GetTaskId())
		}
		return out
	}
	for _, tc := range []struct {
		own  *fsm.KeyGroupRange
		want []string
	}{
		{&fsm.KeyGroupRange{Start: 0, End: 42}, []string{"map-0"}},
		{&fsm.KeyGroupRange{Start: 42, End: 85}, []string{"map-0", "map-1"}},
		{&fsm.KeyGroupRange{Start: 64, End: 128}, []string{"map-1"}},
		{nil, []string{"map-0", "map-1"}},
	} {
		if got := ids(tc.own); !slices.Equal(got, tc.want) {
			t.Errorf("own %v: blobs of %v, want %v", tc.own, got, tc.want)
		}
	}
	ck.Tasks["map-2"] = fsm.TaskState{Kind: fsm.TaskMap} // written before states named their range
	if got := ids(&fsm.KeyGroupRange{Start: 0, End: 10}); !slices.Equal(got, []string{"map-0", "map-2"}) {
		t.Errorf("blobs %v, want map-0 and the unranged map-2", got)
	}
}

func TestLeaderChooseRestoreSkipsBadCheckpoints(t *testing.T) {
	completed := []fsm.Checkpoint{{ID: 3}, {ID: 5}, {ID: 8}}
	ck, note, err := chooseRestore(completed, map[uint64]string{})
	if err != nil || ck.ID != 8 || note != "" {
		t.Fatalf("no bad: %v %q %v", ck, note, err)
	}
	ck, note, err = chooseRestore(completed, map[uint64]string{8: "task map-0: checksum mismatch"})
	if err != nil || ck.ID != 5 || !strings.Contains(note, "checkpoint 8: task map-0: checksum mismatch") {
		t.Fatalf("8 bad: %v %q %v", ck, note, err)
	}
	_, _, err = chooseRestore(completed, map[uint64]string{3: "x", 5: "y", 8: "z"})
	if err == nil || !strings.Contains(err.Error(), "every retained checkpoint failed verification") {
		t.Fatalf("all bad: err = %v", err)
	}
	if ck, _, err := chooseRestore(nil, nil); ck != nil || err != nil {
		t.Fatalf("none: %v %v", ck, err)
	}
}

func TestLeaderRestartDelayGrowsWithJitterAndCaps(t *testing.T) {
	spec := fsm.RestartSpec{Initial: fsm.Duration(100 * time.Millisecond), Max: fsm.Duration(time.Second)}
	mid := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for failures, base := range mid {
		base *= time.Millisecond
		lo := restartDelay(spec, failures, 0)
		hi := restartDelay(spec, failures, 0.999)
		if got := restartDelay(spec, failures, 0.5); got != base {
			t.Errorf("failures %d: delay without jitter = %v, want %v", failures, got, base)
		}
		if want := time.Duration(float64(base) * 0.8); lo != want {
			t.Errorf("failures %d: lowest delay = %v, want %v", failures, lo, want)
		}
		if hi <= base && base < time.Second {
			t.Errorf("failures %d: highest delay %v not above %v", failures, hi, base)
		}
		if hi > time.Second {
			t.Errorf("failures %d: delay %v exceeds the cap", failures, hi)
		}
	}
	if got := restartDelay(spec, 1000, 0.5); got != time.Second {
		t.Errorf("many failures: delay %v, want the cap", got)
	}
}

func TestLeaderBackoffResetsAfterALongRun(t *testing.T) {
	h := newLeaderHarness(t)
	js := &jobState{id: "j", bad: map[uint64]string{}, spec: testJobSpec(1, 1)}
	js.spec.Restart = fsm.RestartSpec{
		Initial: fsm.Duration(time.Second), Max: fsm.Duration(time.Minute), ResetAfter: fsm.Duration(10 * time.Second),
	}
	h.l.jobs["j"] = js
	js.deployedAt = h.clock
	for range 3 {
		h.l.beginRestart(js, "boom")
	}
	if js.failures != 3 || js.retryAt.Sub(h.clock) != 4*time.Second {
		t.Fatalf("after 3 quick failures: failures %d, retry in %v; want 3 and 4s", js.failures, js.retryAt.Sub(h.clock))
	}
	js.deployedAt = h.clock
	h.advance(11 * time.Second)
	h.l.beginRestart(js, "boom")
	if js.failures != 1 || js.retryAt.Sub(h.clock) != time.Second {
		t.Fatalf("after a long run: failures %d, retry in %v; want 1 and 1s", js.failures, js.retryAt.Sub(h.clock))
	}
}

func TestLeaderKafkaPartitions(t *testing.T) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(6, "words"))
	if err != nil {
		t.Fatalf("kfake: %v", err)
	}
	defer cluster.Close()
	brokers := cluster.ListenAddrs()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if n, err := kafkaPartitions(ctx, brokers, "words"); err != nil || n != 6 {
		t.Fatalf("words: %d partitions, err %v; want 6", n, err)
	}
	_, err = kafkaPartitions(ctx, brokers, "nope")
	if want := `source topic "nope" does not exist on ` + brokers[0]; err == nil || err.Error() != want {
		t.Fatalf("missing topic: err %v, want %q", err, want)
	}
	if _, err := kafkaPartitions(ctx, brokers, "nope"); err == nil {
		t.Fatalf("the lookup created the topic")
	}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	closed := lis.Addr().String()
	if err := lis.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	_, err = kafkaPartitions(ctx, []string{closed}, "words")
	if err == nil || !strings.HasPrefix(err.Error(), "source brokers "+closed+" unreachable") {
		t.Fatalf("unreachable broker: err %v", err)
	}
}

// testJobSpec is a valid spec with the given parallelism over 8 key groups.
func testJobSpec(sources, maps int) fsm.JobSpec {
	s := fsm.JobSpec{
		Name:     "wc",
		Source:   fsm.SourceSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "words", Parallelism: sources},
		Operator: fsm.OperatorSpec{Name: "wordcount", Parallelism: maps, MaxParallelism: 8},
		Sink:     &fsm.SinkSpec{Brokers: []string{"127.0.0.1:9092"}, Topic: "counts"},
		Checkpoint: fsm.CheckpointSpec{
			Interval: fsm.Duration(time.Second), Timeout: fsm.Duration(10 * time.Second), Retained: 2, TolerableFailures: 1,
		},
		Restart: fsm.RestartSpec{
			Initial: fsm.Duration(time.Second), Max: fsm.Duration(8 * time.Second), ResetAfter: fsm.Duration(time.Minute),
		},
	}
	s.ApplyDefaults()
	return s
}

// TestLeaderDeploysWaitingJobWhenSlotsFree: a job waiting for slots is
// deployed as soon as another job gives its slots back, from the event that
// freed them, without a full reconcile pass.
func TestLeaderDeploysWaitingJobWhenSlotsFree(t *testing.T) {
	h := newLeaderHarness(t)
	h.connect("w1", 2)
	h.register("a", testJobSpec(1, 1))
	h.pastGrace()
	h.step()
	if j := h.job("a"); j.Status != fsm.JobRunning {
		t.Fatalf("job a is %s (%s), want running", j.Status, j.Reason)
	}
	h.runAll("a")
	h.register("b", testJobSpec(1, 1))
	h.step()
	if j := h.job("b"); j.Status != fsm.JobPending || j.Attempt != 0 {
		t.Fatalf("job b is %s at attempt %d (%s), want pending for slots", j.Status, j.Attempt, j.Reason)
	}

	// Cancelling a (as the HTTP API does) frees w1's slots.
	h.apply(fsm.CommandJobCancelled, fsm.JobCancelledCmd{JobID: "a", Reason: "user", Time: h.clock.UnixNano()})
	h.flush()
	for h.lookupsPending() {
		select {
		case ev := <-h.l.events:
			h.handle(ev)
		case <-time.After(10 * time.Second):
			t.Fatal("partition lookup did not report within 10s")
		}
	}
	if j := h.job("b"); j.Status != fsm.JobRunning || j.Attempt != 1 {
		t.Fatalf("job b is %s at attempt %d (%s) once a's slots are free, want running at attempt 1", j.Status, j.Attempt, j.Reason)
	}
}
