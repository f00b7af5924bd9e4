package worker

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
	"github.com/coordflow/coordflow/worker/state"
)

// BenchmarkMapApply measures a map task's per-item cost on the memory
// backend: wordcount over 10,000 distinct words, with and without change
// tracking (jobs with and without checkpoint storage).
func BenchmarkMapApply(b *testing.B) {
	const n = 512
	var w transport.BatchWriter
	for i := range n {
		k := []byte(fmt.Sprintf("word-%d", (i*7919)%10000))
		w.Record(0, int64(i))
		w.Item(operator.KeyGroup(k, 128), k, 1, nil)
	}
	words := w.Bytes()
	for _, track := range []bool{false, true} {
		b.Run(fmt.Sprintf("track=%v", track), func(b *testing.B) {
			env, _ := unitEnv(b)
			op, _ := env.operators.Lookup(operator.WordCount)
			m := &mapTask{env: env, op: op, kgStart: 0, kgEnd: 128, keyed: newKeyedState(state.NewMemory(), track)}
			m.in = env.metrics.recordsIn.WithLabelValues("bench", kindMap, "map-0")
			m.out = env.metrics.recordsOut.WithLabelValues("bench", kindMap, "map-0")
			m.skipped = env.metrics.recordsSkipped.WithLabelValues("bench", "wordcount")
			m.item = itemContext{s: m.keyed}
			m.batch = batchApplier{m: m}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += n {
				// The same records again: forget them, or the task drops
				// them as duplicates.
				clear(m.keyed.applied)
				if err := m.apply(words); err != nil {
					b.Fatal(err)
				}
				if m.batch.items != n {
					b.Fatalf("%d of %d items applied", m.batch.items, n)
				}
			}
		})
	}
}

// BenchmarkMapApplyDisk measures a map task's per-item cost on the disk
// backend: the distinct operator over keys drawn from a million, in batches
// of 500 items (the default batch size), with the batch's keys read ahead
// (Disk.Prefetch, as the map task does) and without, and without change
// tracking, which BenchmarkMapApply measures. ns/op is per item when the
// -benchtime count is a multiple of 500: run with -benchtime 4000000x to
// reach the steady state, where most keys are in the tables.
func BenchmarkMapApplyDisk(b *testing.B) {
	const n = 500
	for _, prefetch := range []bool{true, false} {
		b.Run(fmt.Sprintf("prefetch=%v", prefetch), func(b *testing.B) {
			env, _ := unitEnv(b)
			op, _ := env.operators.Lookup(operator.Distinct)
			d, err := state.OpenDisk(b.TempDir(), state.DiskOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			m := &mapTask{env: env, op: op, kgStart: 0, kgEnd: 128, keyed: newKeyedState(d, false)}
			m.in = env.metrics.recordsIn.WithLabelValues("bench", kindMap, "map-0")
			m.out = env.metrics.recordsOut.WithLabelValues("bench", kindMap, "map-0")
			m.skipped = env.metrics.recordsSkipped.WithLabelValues("bench", "distinct")
			m.item = itemContext{s: m.keyed}
			m.batch = batchApplier{m: m}
			if prefetch {
				m.prefetch = d
			}
			r := rand.New(rand.NewPCG(1, 2))
			var w transport.BatchWriter
			off := int64(0)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += n {
				b.StopTimer()
				w.Reset()
				for range n {
					k := fmt.Appendf(nil, "id-%07d", r.IntN(1_000_000))
					w.Record(0, off)
					off++
					w.Item(operator.KeyGroup(k, 128), k, 0, nil)
				}
				b.StartTimer()
				if err := m.apply(w.Bytes()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
