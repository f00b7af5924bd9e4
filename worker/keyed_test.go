package worker

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/coordflow/coordflow/worker/state"
)

// changedKeys lists what mergeChanges yields, as "kg/key".
func changedKeys(t *testing.T, sets []changes) []string {
	t.Helper()
	var out []string
	if err := mergeChanges(sets, func(kg int32, key []byte) error {
		out = append(out, fmt.Sprintf("%d/%s", kg, key))
		return nil
	}); err != nil {
		t.Fatal(err)
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
