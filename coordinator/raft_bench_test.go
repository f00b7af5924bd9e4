package coordinator

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
)

// BenchmarkBoltStoreLogs times one Raft log write (StoreLogs: a bbolt
// commit and its fsyncs) of a 5 KB entry, about what a batch of commands of
// 1,000 jobs takes, after Raft has compacted 10,000 such entries away: the
// free pages they leave are written with every commit unless the free list
// is kept out of the file (bbolt's NoFreelistSync, Consul's and Nomad's
// no_freelist_sync), as openBoltStore does: docs/benchmarks.md has the
// figures.
func BenchmarkBoltStoreLogs(b *testing.B) {
	for _, tc := range []struct {
		name string
		opts *bbolt.Options
	}{
		{"freelist=synced", &bbolt.Options{Timeout: boltOpenTimeout}},
		{"freelist=not-synced", &bbolt.Options{Timeout: boltOpenTimeout, NoFreelistSync: true, FreelistType: bbolt.FreelistMapType}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(b.TempDir(), "raft.db"), BoltOptions: tc.opts})
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			data := make([]byte, 5<<10)
			index := uint64(0)
			next := func(n int) []*raft.Log {
				logs := make([]*raft.Log, n)
				for i := range logs {
					index++
					logs[i] = &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
				}
				return logs
			}
			// 20,000 entries, then a compaction of the first 10,000.
			for range 20 {
				if err := store.StoreLogs(next(1000)); err != nil {
					b.Fatal(err)
				}
			}
			if err := store.DeleteRange(1, 10_000); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				if err := store.StoreLogs(next(1)); err != nil {
					b.Fatal(fmt.Errorf("store log %d: %w", index, err))
				}
			}
		})
	}
}
