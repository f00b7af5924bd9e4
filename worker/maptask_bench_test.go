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
	words := make([]*transport.Item, 512)
	for i := range words {
		k := []byte(fmt.Sprintf("word-%d", (i*7919)%10000))
		words[i] = &transport.Item{Key: k, Num: 1, KeyGroup: operator.KeyGroup(k, 128)}
	}
	for _, track := range []bool{false, true} {
		b.Run(fmt.Sprintf("track=%v", track), func(b *testing.B) {
			env, _ := unitEnv(b)
			op, _ := env.operators.Lookup(operator.WordCount)
			m := &mapTask{env: env, op: op, kgStart: 0, kgEnd: 128, keyed: newKeyedState(state.NewMemory(), track)}
			m.in = env.metrics.recordsIn.WithLabelValues("bench", kindMap)
			m.skipped = env.metrics.recordsSkipped.WithLabelValues("bench", "wordcount")
			m.item = itemContext{s: m.keyed}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += len(words) {
				if err := m.apply(words); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
