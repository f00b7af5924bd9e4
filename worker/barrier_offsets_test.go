package worker

import (
	"strings"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// recordsMsg packs one record of partition p at each offset, with one item
// of key k each.
func recordsMsg(p int32, k string, offsets ...int64) *transport.DataMessage {
	var w transport.BatchWriter
	for _, off := range offsets {
		w.Record(p, off)
		w.Item(operator.KeyGroup([]byte(k), 128), []byte(k), 1, nil)
	}
	return batchMessage(w.Bytes())
}

// barrierAt is Barrier(id) of a source whose next offsets are offsets, every
// partition it reads named, as sources send them.
func barrierAt(id uint64, offsets map[int32]int64) *transport.DataMessage {
	return &transport.DataMessage{Payload: &transport.DataMessage_Barrier{Barrier: &transport.Barrier{CheckpointId: id, Offsets: offsets, NamesAll: true}}}
}

// A map task whose state holds records at or past a barrier's offsets (a
// restored source that took a barrier before catching up with what its
// predecessor sent) declines that checkpoint instead of snapshotting a state
// its offsets do not cover; once the source's barrier is past what the task
// applied, checkpoints are taken again.
func TestMapTaskDeclinesBarrierBehindItsState(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 1, 128, refs, 0))
	old, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, old, recordsMsg(0, "a", 10, 11, 12)) // the predecessor got to offset 12
	waitFor(t, "the predecessor's records applied", func() bool {
		return metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap}) == 3
	})
	old.close()

	restored, err := mt.attachLocal(0, 2)
	if err != nil {
		t.Fatal(err)
	}
	send(t, restored, recordsMsg(0, "a", 10, 11)) // re-read: dropped
	send(t, restored, barrierAt(1, map[int32]int64{0: 12}))
	dec := awaitSent(t, sent).GetDecline()
	if dec.GetCheckpointId() != 1 || !strings.Contains(dec.GetReason(), "past source 0's barrier") {
		t.Fatalf("got %v, want checkpoint 1 declined: the state holds offset 12, the barrier's next offset is 12", dec)
	}
	send(t, restored, recordsMsg(0, "a", 12, 13)) // 12 dropped, 13 applied
	send(t, restored, barrierAt(2, map[int32]int64{0: 14}))
	ack := awaitSent(t, sent).GetAck()
	if ack.GetCheckpointId() != 2 {
		t.Fatalf("got %v, want checkpoint 2 acked", ack)
	}
	if got, _ := decodeKeyed(t, ack.GetState()); got["a"] != 4 {
		t.Fatalf("snapshot 2 counts a %d times, want 4 (offsets 10 to 13, each once)", got["a"])
	}
	if got := ack.GetState().GetApplied()[0]; got != 13 {
		t.Fatalf("snapshot 2 applied offset %d of partition 0, want 13", got)
	}
}

// A map task whose state holds records of a partition of a source that the
// source's barrier does not name (a restored source whose first metadata,
// stale, lacked a partition its predecessor had discovered and read)
// declines: the checkpoint would hold those records without an offset, and
// a restore from it would read them again. Once the source names the
// partition, past what was applied, checkpoints are taken again.
func TestMapTaskDeclinesBarrierWithoutAPartitionItHolds(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 2, 128, refs, 0))
	src0, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	old, err := mt.attachLocal(1, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, src0, recordsMsg(0, "a", 0))
	send(t, old, recordsMsg(1, "b", 0))
	send(t, old, recordsMsg(3, "c", 0, 1)) // partition 3 (source 1's: 3 mod 2), discovered
	waitFor(t, "the records applied", func() bool {
		return metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap}) == 4
	})
	old.close()

	restored, err := mt.attachLocal(1, 2)
	if err != nil {
		t.Fatal(err)
	}
	// The restored source re-reads partition 1 (0 dropped, 1 applied)
	// before any barrier: the map task replaces the input at its first
	// message, which abandons a checkpoint pending then.
	send(t, restored, recordsMsg(1, "b", 0, 1))
	waitFor(t, "the restored source's new record applied", func() bool {
		return metricValue(t, env.metrics.registry, "coordflow_records_in_total", map[string]string{"kind": kindMap}) == 5
	})
	send(t, restored, barrierAt(1, map[int32]int64{1: 2})) // partition 3 not found yet
	send(t, src0, barrierAt(1, map[int32]int64{0: 1}))
	dec := awaitSent(t, sent).GetDecline()
	if dec.GetCheckpointId() != 1 || !strings.Contains(dec.GetReason(), "partition 3 up to offset 1, which source 1's barrier does not name") {
		t.Fatalf("got %v, want checkpoint 1 declined, naming partition 3", dec)
	}
	// A barrier of an older source, which names no partition and does not
	// say it names all, is not checked for them; one that names none and
	// says so (a source left without partitions) is.
	send(t, restored, &transport.DataMessage{Payload: &transport.DataMessage_Barrier{Barrier: &transport.Barrier{CheckpointId: 2}}})
	send(t, src0, barrierAt(2, map[int32]int64{0: 1}))
	if ack := awaitSent(t, sent).GetAck(); ack.GetCheckpointId() != 2 {
		t.Fatalf("got %v, want checkpoint 2 acked: an older source's barrier says nothing of its partitions", ack)
	}
	send(t, restored, barrierAt(3, map[int32]int64{}))
	send(t, src0, barrierAt(3, map[int32]int64{0: 1}))
	if dec := awaitSent(t, sent).GetDecline(); dec.GetCheckpointId() != 3 || !strings.Contains(dec.GetReason(), "partition 1 up to offset 1, which source 1's barrier does not name") {
		t.Fatalf("got %v, want checkpoint 3 declined: the barrier names no partition", dec)
	}
	send(t, restored, recordsMsg(3, "c", 0, 1, 2)) // found: 0 and 1 dropped, 2 applied
	send(t, src0, barrierAt(4, map[int32]int64{0: 1}))
	send(t, restored, barrierAt(4, map[int32]int64{1: 2, 3: 3}))
	ack := awaitSent(t, sent).GetAck()
	if ack.GetCheckpointId() != 4 {
		t.Fatalf("got %v, want checkpoint 4 acked", ack)
	}
	if got, _ := decodeKeyed(t, ack.GetState()); got["c"] != 3 || got["a"] != 1 || got["b"] != 2 {
		t.Fatalf("snapshot 4: %v, want a 1, b 2, c 3 (partition 3's offsets 0 to 2, each once)", got)
	}
}

// A map task restored by a whole-job restart starts without applied
// offsets: every source starts over at the checkpoint's offsets, so nothing
// comes twice, and after a topic was deleted and recreated its offsets start
// again at 0, where the old applied offsets would drop every new record. A
// task restored alone (partial) keeps them, to drop what surviving sources
// send again.
func TestWholeJobRestoreForgetsAppliedOffsets(t *testing.T) {
	env, sent := unitEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	mt := runMapTask(t, env, mapDeploy("job", 1, operator.Count, 1, 128, refs, 0))
	in, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, in, recordsMsg(0, "a", 100, 101))
	send(t, in, barrierAt(1, map[int32]int64{0: 102}))
	st := awaitSent(t, sent).GetAck().GetState()
	if st.GetApplied()[0] != 101 {
		t.Fatalf("snapshot 1 applied %v, want 0: 101", st.GetApplied())
	}
	blob := &transport.KeyedBlob{TaskId: "map-0", Data: st.GetKeyed(), Sha256: st.GetKeyedSha256(), Applied: st.GetApplied(),
		KeyGroupStart: 0, KeyGroupEnd: 128}

	for _, partial := range []bool{false, true} {
		env, sent := unitEnv(t)
		d := mapDeploy("job", 2, operator.Count, 1, 128, refs, 0)
		d.RestoreCheckpointId, d.RestoreKeyed, d.Partial = 1, []*transport.KeyedBlob{blob}, partial
		mt := runMapTask(t, env, d)
		in, err := mt.attachLocal(0, 2)
		if err != nil {
			t.Fatal(err)
		}
		send(t, in, recordsMsg(0, "a", 0, 1)) // the topic was recreated
		send(t, in, barrierAt(2, map[int32]int64{0: 2}))
		msg := awaitSent(t, sent)
		if !partial {
			got, _ := decodeKeyed(t, msg.GetAck().GetState())
			if got["a"] != 4 {
				t.Fatalf("whole-job restore: a counted %d times (%v), want 4: the recreated topic's records are new", got["a"], msg)
			}
			continue
		}
		// Restored alone, offsets 0 and 1 are below what it applied: dropped,
		// and a barrier behind its state is declined.
		if msg.GetDecline().GetCheckpointId() != 2 {
			t.Fatalf("partial restore: got %v, want checkpoint 2 declined", msg)
		}
	}
}
