package worker

import (
	"fmt"
	"maps"
	"strings"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// TestSourceReopensABrokenChannel runs a wordcount job on two real workers:
// a source and map-0 on w1, map-1 on w2. The source's gRPC channel to map-1
// breaks under it (w1 drops its data connections) while records flow; the
// source does not fail: it feeds map-0 on, reopens the channel to the map
// task (which survived, and lets the source's channel of the same attempt
// replace its input), replays from where it started (no checkpoint
// completed), and map-1 drops the items it applied already. The checkpoint
// that covers every record holds exactly the word counts.
func TestSourceReopensABrokenChannel(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"in": 2})
	recs, values := wordRecords(600, 2)
	produce(t, brokers, "in", recs[:300])
	f := newFakeCoord(t, true, "")
	w1 := startWorker(t, "w1", f, func(c *Config) { c.BatchSize = 16 })
	w2 := startWorker(t, "w2", f, nil)
	refs := mapRefs(128, w1, w2)
	m0, m1 := mapDeploy("ro", 1, operator.WordCount, 1, 128, refs, 0), mapDeploy("ro", 1, operator.WordCount, 1, 128, refs, 1)
	f.deploy(t, "w1", m0)
	f.deploy(t, "w2", m1)
	src := sourceDeploy("ro", 1, 0, operator.WordCount, brokers, "in", []int32{0, 1}, refs)
	f.deploy(t, "w1", src)
	for _, r := range []*transport.TaskRef{m0.Task, m1.Task, src.Task} {
		f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_RUNNING)
	}
	applied := func() float64 {
		return metricValue(t, w2.Gatherer(), "coordflow_records_in_total", map[string]string{"job": "ro", "kind": kindMap})
	}
	waitFor(t, "map-1 to apply items", func() bool { return applied() > 0 })

	w1.conns.close() // breaks the source's stream to map-1
	produce(t, brokers, "in", recs[300:])
	// A checkpoint triggered while the channel is lost cannot complete
	// (the leader would abort it): trigger once the replay has reached
	// map-1, which drops the items it applied before the break.
	dropped := func() float64 {
		return metricValue(t, w2.Gatherer(), "coordflow_duplicate_items_dropped_total", map[string]string{"job": "ro"})
	}
	waitFor(t, "map-1 to drop replayed items it had applied", func() bool { return dropped() > 0 })
	_, acks := checkpointUntil(t, f, 1, map[string]*transport.TaskRef{"w1": src.Task}, []*transport.TaskRef{m0.Task, m1.Task}, map[int32]int64{0: 300, 1: 300}, nil)

	want := map[string]int64{}
	for _, vs := range values {
		for _, v := range vs {
			for _, w := range strings.Fields(v) {
				want[w]++
			}
		}
	}
	got := map[string]int64{}
	for _, m := range []string{"map-0", "map-1"} {
		vals, _ := decodeKeyed(t, acks[m].GetState())
		maps.Copy(got, vals) // key groups are disjoint
	}
	if !maps.Equal(got, want) {
		t.Fatalf("after the channel broke and was reopened the counts are %v, want %v", fmt.Sprint(got), fmt.Sprint(want))
	}
	if st := f.messages(); failedTask(st, src.Task) {
		t.Fatal("the source failed when its channel broke")
	}
}

// failedTask reports whether msgs hold a FAILED status of r.
func failedTask(msgs []received, r *transport.TaskRef) bool {
	for _, m := range msgs {
		if st := m.msg.GetStatus(); st != nil && sameTask(st.GetTask(), r) && st.GetPhase() == transport.TaskPhase_TASK_PHASE_FAILED {
			return true
		}
	}
	return false
}
