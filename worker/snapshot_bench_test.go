package worker

import (
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/worker/state"
)

// BenchmarkDeltaKeyGroup compares the two ways writeDelta reads a key
// group's changed keys on the disk backend, for shares of the group's keys
// changed from 1 in 64 to 1 in 2: a lookup per changed key
// (deltaByLookups), or one scan of the group merged with them
// (deltaByScan). ns/op is per key of the group, changed or not, so the
// two compare directly: writeDelta should look keys up where that is the
// cheaper. A million keys in 128 key groups (7,812 per group), values of
// 8 bytes, loaded as a restore loads them (Disk.Load: all in tables, none
// in a memtable, no compaction running); every changed key is set, so no
// tombstone is written. The state file is written to io.Discard.
func BenchmarkDeltaKeyGroup(b *testing.B) {
	const groups, keys = 128, 1_000_000
	d, err := state.OpenDisk(b.TempDir(), state.DiskOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	byGroup := make([][]string, groups)
	for i := range keys {
		kg := i % groups
		byGroup[kg] = append(byGroup[kg], fmt.Sprintf("key-%09d", i*7919%keys))
	}
	l, err := d.Load(0, groups)
	if err != nil {
		b.Fatal(err)
	}
	value := []byte("01234567")
	for kg, ks := range byGroup {
		slices.Sort(ks)
		for _, k := range ks {
			if err := l.Add(int32(kg), []byte(k), value); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := l.Finish(); err != nil {
		b.Fatal(err)
	}
	view, err := d.Snapshot()
	if err != nil {
		b.Fatal(err)
	}
	defer view.Release()
	for _, every := range []int{64, 32, 16, 8, 4, 2} {
		changed := make([][]string, groups)
		for kg, ks := range byGroup {
			for i := 0; i < len(ks); i += every {
				changed[kg] = append(changed[kg], ks[i])
			}
		}
		for _, way := range []struct {
			name  string
			write func(*statefile.Writer, state.View, int32, []string) error
		}{{"lookups", deltaByLookups}, {"scan", deltaByScan}} {
			b.Run(fmt.Sprintf("changed=1in%d/%s", every, way.name), func(b *testing.B) {
				var fw *statefile.Writer
				b.ResetTimer()
				for i, pass := 0, 0; i < b.N; pass++ {
					kg := int32(pass % groups)
					if kg == 0 {
						// A file's keys only grow: a new file per pass.
						if fw, err = statefile.NewWriter(io.Discard, statefile.Delta); err != nil {
							b.Fatal(err)
						}
					}
					if err := way.write(fw, view, kg, changed[kg]); err != nil {
						b.Fatal(err)
					}
					i += len(byGroup[kg])
				}
			})
		}
	}
}
