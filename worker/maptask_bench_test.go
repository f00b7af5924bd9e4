package worker

import (
	"fmt"
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
			m.skipped = env.metrics.recordsSkipped.WithLabelValues("bench", "wordcount")
			m.item = itemContext{s: m.keyed}
			m.batch = batchApplier{m: m}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += n {
				if err := m.apply(words); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
