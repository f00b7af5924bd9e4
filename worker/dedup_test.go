package worker

import (
	"math/rand"
	"reflect"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// rec is one source record of a test batch: its partition, offset and the
// keys of the items it splits into (one of count 1 each).
type rec struct {
	part int32
	off  int64
	keys []string
}

// recordBatch packs whole records, each behind its record mark, as a source
// does.
func recordBatch(maxPar int, recs ...rec) []byte {
	var w transport.BatchWriter
	for _, r := range recs {
		w.Record(r.part, r.off)
		for _, k := range r.keys {
			w.Item(operator.KeyGroup([]byte(k), maxPar), []byte(k), 1, nil)
		}
	}
	return w.Bytes()
}

// TestDedupDropsAppliedRecords: a partially restored map task (its
// checkpoint applied partition 0 through offset 10) receives records again,
// as after a task-scoped recovery. The items of every record at or below the
// applied offset are dropped, also once that offset moved on in the same
// batch; the items of the record after a duplicate one are applied, up to
// the end of the batch; the items of a combined batch after a batch that
// ended in a duplicate are applied; nothing above the applied offset is lost.
func TestDedupDropsAppliedRecords(t *testing.T) {
	env, sent := unitEnv(t)
	const maxPar = 128
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: maxPar}}
	d := mapDeploy("job", 2, operator.Count, 1, maxPar, refs, 0)
	d.Partial = true
	d.RestoreCheckpointId = 7
	d.RestoreKeyed = keyedBlobs(t, map[string]int64{"a": 5, "b": 1}, 1, maxPar)
	d.RestoreKeyed[0].Applied = map[int32]int64{0: 10}
	mt := runMapTask(t, env, d)
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}

	send(t, lc, batchMessage(recordBatch(maxPar,
		rec{0, 9, []string{"a", "a"}}, // below applied: dropped
		rec{0, 10, []string{"b"}},     // at applied: dropped
		rec{0, 11, []string{"c", "c", "c"}},
		rec{1, 0, []string{"d"}}, // a partition not applied yet
	)))
	send(t, lc, batchMessage(recordBatch(maxPar,
		rec{0, 11, []string{"c"}}, // applied in the batch before
		rec{0, 12, []string{"e", "e"}},
		rec{1, 0, []string{"d"}}, // the batch ends in a duplicate
	)))
	// A combined batch: merged items, then through marks.
	var w transport.BatchWriter
	w.Item(operator.KeyGroup([]byte("f"), maxPar), []byte("f"), 1, nil)
	w.Through(0, 20)
	w.Through(1, 5)
	send(t, lc, batchMessage(w.Bytes()))
	send(t, lc, batchMessage(recordBatch(maxPar,
		rec{0, 15, []string{"g"}}, // below the through mark: dropped
		rec{0, 21, []string{"h"}},
	)))
	send(t, lc, barrierMsg(8))

	ack := awaitSent(t, sent).GetAck()
	if ack.GetCheckpointId() != 8 {
		t.Fatalf("got %v, want the ack of checkpoint 8", ack)
	}
	got, _ := decodeKeyed(t, ack.GetState())
	if want := map[string]int64{"a": 5, "b": 1, "c": 3, "d": 1, "e": 2, "f": 1, "h": 1}; !reflect.DeepEqual(got, want) {
		t.Fatalf("state %v, want %v", got, want)
	}
	if got, want := ack.GetState().GetApplied(), map[int32]int64{0: 21, 1: 5}; !reflect.DeepEqual(got, want) {
		t.Fatalf("applied %v, want %v", got, want)
	}
	if n := metricValue(t, env.metrics.registry, "coordflow_duplicate_items_dropped_total", map[string]string{"job": "job"}); n != 6 {
		t.Fatalf("duplicate items dropped: %v, want 6", n)
	}
	if n := metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap}); n != 8 {
		t.Fatalf("records in: %v, want the 8 items applied", n)
	}
	if n := ack.GetState().GetRecordsIn(); n != 8 {
		t.Fatalf("ack's records_in %d, want 8", n)
	}
}

// TestDedupReplayExactlyOnce: a source sends two partitions' records in
// batches of whole records and, at random points, rewinds to a random
// earlier offset (at most 30 records back) and sends again from there (a
// replay). Whatever the
// rewinds, the state is the fold of every record exactly once: no item at or
// below the applied offset is applied twice, none above it is lost.
func TestDedupReplayExactlyOnce(t *testing.T) {
	const (
		maxPar  = 128
		records = 300
	)
	rng := rand.New(rand.NewSource(11))
	keys := []string{"k0", "k1", "k2", "k3", "k4"}
	log := map[int32][]rec{}
	want := map[string]int64{}
	for _, p := range []int32{0, 1} {
		for off := int64(0); off < records; off++ {
			r := rec{part: p, off: off}
			for range 1 + rng.Intn(3) {
				k := keys[rng.Intn(len(keys))]
				r.keys = append(r.keys, k)
				want[k]++
			}
			log[p] = append(log[p], r)
		}
	}

	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: maxPar}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 1, maxPar, refs, 0))
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	pos := map[int32]int{0: 0, 1: 0}
	sentItems, rewinds := 0, 0
	for pos[0] < records || pos[1] < records {
		if rng.Intn(10) == 0 {
			// Back to the checkpoint: up to 30 records per partition.
			for p := range pos {
				pos[p] = max(0, pos[p]-rng.Intn(31))
			}
			rewinds++
		}
		var batch []rec
		for range 1 + rng.Intn(6) {
			p := int32(rng.Intn(2))
			if pos[p] >= records {
				p = 1 - p
			}
			if pos[p] >= records {
				break
			}
			batch = append(batch, log[p][pos[p]])
			sentItems += len(log[p][pos[p]].keys)
			pos[p]++
		}
		send(t, lc, batchMessage(recordBatch(maxPar, batch...)))
	}
	send(t, lc, barrierMsg(1))
	ack := awaitSent(t, sent).GetAck()
	got, _ := decodeKeyed(t, ack.GetState())
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after %d rewinds the state is %v, want every record once: %v", rewinds, got, want)
	}
	unique := 0
	for _, n := range want {
		unique += int(n)
	}
	if n := metricValue(t, env.metrics.registry, "coordflow_duplicate_items_dropped_total", map[string]string{"job": "job"}); int(n) != sentItems-unique {
		t.Fatalf("duplicates dropped %v, want %d (%d sent, %d unique)", n, sentItems-unique, sentItems, unique)
	}
	if rewinds == 0 || sentItems == unique {
		t.Fatalf("the test sent no duplicates (%d rewinds)", rewinds)
	}
}
