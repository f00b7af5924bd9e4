package coordinator

import (
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// TestLeaderDeployCarriesPartitionDiscovery: a source's deployment names the
// job's discovery interval (the default when the spec has none), and
// restores every checkpointed partition the task owns, also those beyond its
// assignment: partitions an earlier attempt discovered, which the leader's
// partition lookup may not list yet.
func TestLeaderDeployCarriesPartitionDiscovery(t *testing.T) {
	spec := testJobSpec(2, 2)
	workers := []workerSlots{{id: "w1", dataAddr: "w1:7401", free: 4}, {id: "w2", dataAddr: "w2:7401", free: 4}}
	tasks, err := assign(spec, 2, workers)
	if err != nil {
		t.Fatalf("assign: %v", err)
	}
	job := fsm.Job{ID: "j1", Spec: spec, Attempt: 2, Tasks: tasks}
	// Checkpointed when the topic had grown to 5 partitions.
	ck := &fsm.Checkpoint{ID: 4, Tasks: map[string]fsm.TaskState{
		"source-0": {Kind: fsm.TaskSource, Offsets: map[int32]int64{0: 10, 2: 3, 4: 0}},
		"source-1": {Kind: fsm.TaskSource, Offsets: map[int32]int64{1: 11, 3: 5}},
		"map-0":    {Kind: fsm.TaskMap, Keyed: []byte("a"), KeyedSHA256: "x"},
	}}
	for i, want := range []map[int32]int64{{0: 10, 2: 3, 4: 0}, {1: 11, 3: 5}} {
		d := buildDeploy(job, tasks[i], ck, "", true)
		if got := d.GetSource().GetPartitionDiscoveryMs(); got != int64(fsm.DefaultPartitionDiscovery/fsm.Duration(time.Millisecond)) {
			t.Fatalf("source-%d: partition_discovery_ms %d, want the default", i, got)
		}
		if got := d.GetSource().GetPartitions(); !slices.Equal(got, []int32{int32(i)}) {
			t.Fatalf("source-%d: partitions %v, want its assignment [%d]", i, got, i)
		}
		if got := d.GetRestoreOffsets(); !maps.Equal(got, want) {
			t.Fatalf("source-%d: restore offsets %v, want %v", i, got, want)
		}
	}

	// Restored with 3 sources: each takes the checkpointed partitions it
	// owns now, p mod 3 == index.
	spec3 := testJobSpec(3, 2)
	spec3.Source.PartitionDiscovery = fsm.Duration(2 * time.Second)
	tasks3, err := assign(spec3, 2, workers)
	if err != nil {
		t.Fatalf("assign: %v", err)
	}
	job3 := fsm.Job{ID: "j1", Spec: spec3, Attempt: 3, Tasks: tasks3}
	for i, want := range []map[int32]int64{{0: 10, 3: 5}, {1: 11, 4: 0}, {2: 3}} {
		d := buildDeploy(job3, tasks3[i], ck, "", true)
		if got := d.GetRestoreOffsets(); !maps.Equal(got, want) {
			t.Fatalf("3 sources: source-%d: restore offsets %v, want %v", i, got, want)
		}
		if got := d.GetSource().GetPartitionDiscoveryMs(); got != 2000 {
			t.Fatalf("source-%d: partition_discovery_ms %d, want 2000", i, got)
		}
	}
}

// TestLeaderDeployCarriesIsolationLevel: a source's deployment says whether
// it reads committed records only, as the job's spec says; left out, it
// reads uncommitted, Kafka's default.
func TestLeaderDeployCarriesIsolationLevel(t *testing.T) {
	workers := []workerSlots{{id: "w1", dataAddr: "w1:7401", free: 4}}
	for _, tc := range []struct {
		level string
		want  bool
	}{{"", false}, {fsm.IsolationReadUncommitted, false}, {fsm.IsolationReadCommitted, true}} {
		spec := testJobSpec(2, 1)
		spec.Source.IsolationLevel = tc.level
		tasks, err := assign(spec, 1, workers)
		if err != nil {
			t.Fatalf("assign: %v", err)
		}
		job := fsm.Job{ID: "j1", Spec: spec, Attempt: 1, Tasks: tasks}
		for _, task := range tasks {
			if task.Kind != fsm.TaskSource {
				continue
			}
			if got := buildDeploy(job, task, nil, "", true).GetSource().GetReadCommitted(); got != tc.want {
				t.Fatalf("isolation_level %q: %s deployed with read_committed %v, want %v", tc.level, task.ID, got, tc.want)
			}
		}
	}
}

// TestLeaderDeploysDiscoveryOnlyWithCoordinatorsAtLevel: the leader turns
// partition discovery on in the sources it deploys only while every
// coordinator is at discoveryLevel. A build older than discovery rejects, in
// its FSM, the checkpoints of a source reading a partition it discovered,
// which the others accept: the replicas would differ. A coordinator whose
// level is unknown, or a configuration that cannot be read, counts as older.
func TestLeaderDeploysDiscoveryOnlyWithCoordinatorsAtLevel(t *testing.T) {
	on := int64(fsm.DefaultPartitionDiscovery / fsm.Duration(time.Millisecond))
	for _, tc := range []struct {
		name  string
		below func(level int) ([]string, error)
		want  int64
	}{
		{"every coordinator at the level", func(int) ([]string, error) { return nil, nil }, on},
		{"one older", func(level int) ([]string, error) {
			if level != discoveryLevel {
				t.Errorf("asked for coordinators below level %d, want %d", level, discoveryLevel)
			}
			return []string{"c3 (feature level 0)"}, nil
		}, 0},
		{"configuration unreadable", func(int) ([]string, error) { return nil, errors.New("raft is already shutdown") }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newLeaderHarness(t)
			h.l.env.coordinatorsBelow = tc.below
			h.register("j1", testJobSpec(2, 2))
			h.connect("w1", 4)
			h.connect("w2", 4)
			h.pastGrace()
			h.step()
			sources := 0
			for _, w := range []string{"w1", "w2"} {
				for _, m := range h.drain(w) {
					d := m.GetDeploy()
					if d.GetKind() != transport.TaskKind_TASK_KIND_SOURCE {
						continue
					}
					sources++
					if got := d.GetSource().GetPartitionDiscoveryMs(); got != tc.want {
						t.Errorf("%s deployed with partition_discovery_ms %d, want %d", d.GetTask().GetTaskId(), got, tc.want)
					}
				}
			}
			if sources != 2 {
				t.Fatalf("%d sources deployed, want 2", sources)
			}
			off := 0.0
			if tc.want == 0 {
				off = 1
			}
			if n := testutil.ToFloat64(h.l.metrics.noDiscovery.WithLabelValues("j1")); n != off {
				t.Errorf("coordflow_deploys_without_discovery_total %v, want %v", n, off)
			}
		})
	}
}
