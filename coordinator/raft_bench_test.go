package coordinator

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// BenchmarkBoltStoreLogsWritten measures what one Raft log write puts on
// the disk through openBoltStore (the free list not synced): the
// bytes the process sends to storage per entry (/proc/self/io write_bytes)
// against the entry's size, for an entry of 5 KB and one of 44 KB (a group
// commit of 60 commands, as 1,000 jobs with input write them). bbolt is a
// copy-on-write B+tree: every commit writes anew the pages it changed, the
// leaf the entry goes into (which holds earlier entries too) and those
// above it, and a meta page.
func BenchmarkBoltStoreLogsWritten(b *testing.B) {
	for _, size := range []int{5 << 10, 44 << 10} {
		b.Run(fmt.Sprintf("entry=%dKB", size>>10), func(b *testing.B) {
			store, err := openBoltStore(filepath.Join(b.TempDir(), "raft.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer store.Close()
			data := make([]byte, size)
			index := uint64(0)
			store1 := func() {
				index++
				if err := store.StoreLogs([]*raft.Log{{Index: index, Term: 1, Type: raft.LogCommand, Data: data}}); err != nil {
					b.Fatal(fmt.Errorf("store log %d: %w", index, err))
				}
			}
			for range 2000 { // past the first pages' growth
				store1()
			}
			before := processWriteBytes(b)
			b.ResetTimer()
			for b.Loop() {
				store1()
			}
			written := float64(processWriteBytes(b)-before) / float64(b.N)
			if written == 0 {
				b.Skip("nothing counted as written to storage: is the temporary directory in memory (tmpfs)?")
			}
			b.ReportMetric(written, "disk-B/entry")
			b.ReportMetric(written/float64(size), "disk-bytes/entry-byte")
		})
	}
}

// processWriteBytes is the bytes this process has caused to be sent to
// storage (write_bytes of /proc/self/io).
func processWriteBytes(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		b.Skipf("no /proc/self/io: %v", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				b.Fatalf("/proc/self/io: %q: %v", line, err)
			}
			return n
		}
	}
	b.Fatal("/proc/self/io has no write_bytes")
	return 0
}
