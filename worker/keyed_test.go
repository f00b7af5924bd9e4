package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/worker/state"
)

// changedKeys lists what changedGroups yields, as "kg/key".
func changedKeys(t *testing.T, sets []changes) []string {
	t.Helper()
	var out []string
	for _, g := range changedGroups(sets) {
		for _, k := range g.keys {
			out = append(out, fmt.Sprintf("%d/%s", g.kg, k))
		}
	}
	return out
}

// TestChangeTracking: changes are kept per snapshot epoch, merged in
// (key group, key) order without repeats, forgotten once a completed
// checkpoint covers them, and a span that overflowed allows no delta.
func TestChangeTracking(t *testing.T) {
	s := newKeyedState(state.NewMemory(), true)
	s.maxDirty = 3
	s.touch(5, []byte("b"))
	s.touch(1, []byte("z"))
	s.touch(5, []byte("b")) // a repeat costs nothing
	s.closeEpoch(1)
	s.touch(5, []byte("a"))
	s.closeEpoch(2)

	sets, ok := s.changedSince(0)
	if got := changedKeys(t, sets); !ok || !reflect.DeepEqual(got, []string{"1/z", "5/a", "5/b"}) {
		t.Fatalf("changes since 0 = %v (%v), want both epochs merged in order", got, ok)
	}
	sets, ok = s.changedSince(1)
	if got := changedKeys(t, sets); !ok || !reflect.DeepEqual(got, []string{"5/a"}) {
		t.Fatalf("changes since 1 = %v (%v), want epoch 2 only", got, ok)
	}
	s.forget(1)
	if _, kept := s.closed[1]; kept {
		t.Fatal("epoch 1 kept after checkpoint 1 completed")
	}

	// Four distinct keys in one epoch overflow a limit of 3.
	for _, k := range []string{"p", "q", "r", "s"} {
		s.touch(2, []byte(k))
	}
	s.closeEpoch(3)
	if _, ok := s.changedSince(2); ok {
		t.Fatal("a delta over an overflowed epoch was allowed")
	}
	s.touch(2, []byte("t"))
	s.closeEpoch(4)
	if sets, ok := s.changedSince(3); !ok || len(changedKeys(t, sets)) != 1 {
		t.Fatal("tracking did not start over after the overflowed epoch")
	}

	off := newKeyedState(state.NewMemory(), false)
	off.touch(1, []byte("x"))
	off.closeEpoch(1)
	if _, ok := off.changedSince(0); ok {
		t.Fatal("a state without tracking allowed a delta")
	}
}

// TestWriteDelta: whether a key group is scanned (many changes) or looked up
// key by key (few), the delta holds every changed key once, with its value
// as of the view or a tombstone.
func TestWriteDelta(t *testing.T) {
	b := state.NewMemory()
	const perGroup = 100
	for kg := int32(0); kg < 4; kg++ {
		for i := range perGroup {
			if err := b.Put(kg, []byte(fmt.Sprintf("k%03d", i)), []byte(fmt.Sprintf("v%d-%d", kg, i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	set := changes{
		0: {"k005": {}, "k050": {}, "gone-0": {}}, // few: lookups
		1: {},                                     // many: a scan
		3: {"zz-gone": {}},                        // only a deleted key
	}
	for i := range 60 {
		set[1][fmt.Sprintf("k%03d", i*3%perGroup)] = struct{}{}
	}
	set[1]["a-gone"], set[1]["k500-gone"] = struct{}{}, struct{}{}
	view, err := b.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer view.Release()
	var buf bytes.Buffer
	fw, err := statefile.NewWriter(&buf, statefile.Delta)
	if err != nil {
		t.Fatal(err)
	}
	job := &snapshotJob{view: view, kgStart: 0, kgEnd: 4, keys: 4 * perGroup, changed: []changes{set}}
	if err := writeDelta(context.Background(), fw, job); err != nil {
		t.Fatal(err)
	}
	if _, err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	rd, err := statefile.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	err = rd.Range(0, 4, func(kg int32, key, value []byte, tomb bool) error {
		v := string(value)
		if tomb {
			v = "<deleted>"
		}
		got[fmt.Sprintf("%d/%s", kg, key)] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for kg, keys := range set {
		for k := range keys {
			v, ok, _ := view.Get(kg, []byte(k))
			if ok {
				want[fmt.Sprintf("%d/%s", kg, k)] = string(v)
			} else {
				want[fmt.Sprintf("%d/%s", kg, k)] = "<deleted>"
			}
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("delta has %d entries, want %d:\ngot  %v\nwant %v", len(got), len(want), got, want)
	}
}

// TestAwaitMapWhileRestoring: a data channel to a map task that is deployed
// but still restoring its state is told to wait on (errMapDeploying, which
// does not spend the source's open timeout); one to a task the worker does
// not have is refused.
func TestAwaitMapWhileRestoring(t *testing.T) {
	env, _ := unitEnv(t)
	m := newTaskManager(env)
	k := taskKey{job: "j", attempt: 2, id: "map-0"}
	m.tasks[k] = &taskHandle{key: k, kind: transport.TaskKind_TASK_KIND_MAP, phase: transport.TaskPhase_TASK_PHASE_DEPLOYING}
	m.attempts["j"] = 2
	if _, err := m.awaitMap(context.Background(), "j", 2, "map-0", time.Millisecond); !errors.Is(err, errMapDeploying) {
		t.Fatalf("await a restoring map task: %v, want errMapDeploying", err)
	}
	delete(m.tasks, k)
	if _, err := m.awaitMap(context.Background(), "j", 2, "map-0", time.Millisecond); !errors.Is(err, errMapNotFound) {
		t.Fatalf("await a map task that is gone: %v, want errMapNotFound", err)
	}
}
