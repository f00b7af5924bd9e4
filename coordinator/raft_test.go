package coordinator

import (
	"testing"

	"github.com/hashicorp/raft"
)

// TestLastCommand: the last FSM command at or before an index, over
// entries that never reach the FSM (a leader's no-op, a membership change),
// and what lastCommand cannot tell: entries compacted away, or too many
// that are not commands in a row.
func TestLastCommand(t *testing.T) {
	store := raft.NewInmemStore()
	types := []raft.LogType{raft.LogCommand, raft.LogNoop, raft.LogConfiguration, raft.LogCommand, raft.LogNoop}
	for i, typ := range types {
		if err := store.StoreLog(&raft.Log{Index: uint64(i + 1), Type: typ}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		index, want uint64
		found       bool
	}{
		{5, 4, true}, {4, 4, true}, {3, 1, true}, {2, 1, true}, {1, 1, true}, {0, 0, true},
	} {
		if got, found := lastCommand(store, c.index); got != c.want || found != c.found {
			t.Errorf("lastCommand(%d) = %d, %v; want %d, %v", c.index, got, found, c.want, c.found)
		}
	}

	noops := raft.NewInmemStore()
	for i := uint64(1); i <= lastCommandScan+10; i++ {
		if err := noops.StoreLog(&raft.Log{Index: i, Type: raft.LogNoop}); err != nil {
			t.Fatal(err)
		}
	}
	if got, found := lastCommand(noops, lastCommandScan); got != 0 || !found {
		t.Errorf("no command down to the start: %d, %v; want 0, true", got, found)
	}
	if _, found := lastCommand(noops, lastCommandScan+10); found {
		t.Error("more than lastCommandScan entries without a command: found, want not")
	}

	if err := store.DeleteRange(1, 3); err != nil {
		t.Fatal(err)
	}
	if _, found := lastCommand(store, 3); found {
		t.Error("a compacted entry: found, want not")
	}
	if got, found := lastCommand(store, 5); got != 4 || !found {
		t.Errorf("after compaction, lastCommand(5) = %d, %v; want 4, true", got, found)
	}
}
