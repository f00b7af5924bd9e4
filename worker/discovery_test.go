package worker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// discoveryInput is the wordcount input of a test, kept so that the state a
// checkpoint must hold can be folded from its offsets.
type discoveryInput struct {
	byPartition map[int32][]string // values in offset order
}

// produce writes n records to partition p and remembers them.
func (in *discoveryInput) produce(t *testing.T, brokers []string, p int32, n int) {
	t.Helper()
	recs := make([]record, n)
	for i := range recs {
		off := len(in.byPartition[p])
		v := fmt.Sprintf("w%d x%d p%d", off%7, off%3, p)
		recs[i] = record{partition: p, value: v}
		in.byPartition[p] = append(in.byPartition[p], v)
	}
	produce(t, brokers, "words", recs)
}

// end is the next offset of every partition written to.
func (in *discoveryInput) end() map[int32]int64 {
	end := map[int32]int64{}
	for p, vs := range in.byPartition {
		end[p] = int64(len(vs))
	}
	return end
}

// fold is the wordcount state of exactly the records below offsets.
func (in *discoveryInput) fold(offsets map[int32]int64) map[string]int64 {
	state := map[string]int64{}
	for p, vs := range in.byPartition {
		for _, v := range vs[:min(int64(len(vs)), offsets[p])] {
			for _, w := range strings.Fields(v) {
				state[w]++
			}
		}
	}
	return state
}

// addPartitions raises topic's partition count to total, as an operator
// does with kafka-topics --alter.
func addPartitions(t *testing.T, brokers []string, topic string, total int32) {
	t.Helper()
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V2_8_0_0
	adm, err := sarama.NewClusterAdmin(brokers, cfg)
	if err != nil {
		t.Fatalf("cluster admin: %v", err)
	}
	defer adm.Close()
	if err := adm.CreatePartitions(topic, total, nil, false); err != nil {
		t.Fatalf("create partitions of %s up to %d: %v", topic, total, err)
	}
}

// TestSourceDiscoversPartitions: two sources (S = 2) read a 2-partition
// topic; 3 partitions are added while they run and records are written to
// them before the sources look. Source i picks up the new partitions p with
// p mod 2 == i from their earliest offset, its acks name them, and every
// checkpoint holds exactly the fold of the records below its offsets
// (invariant 1). Then two restores with the original assignment: from a
// checkpoint taken before the partitions existed (they start at earliest
// again, even with start "latest"), and from one that has their offsets
// (honoured: nothing is counted twice).
func TestSourceDiscoversPartitions(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	in := &discoveryInput{byPartition: map[int32][]string{}}
	in.produce(t, brokers, 0, 50)
	in.produce(t, brokers, 1, 50)

	f := newFakeCoord(t, true, "")
	w1 := startWorker(t, "w1", f, nil)
	w2 := startWorker(t, "w2", f, nil)
	workers := []string{"w1", "w2"}
	refs := mapRefs(128, w1, w2)

	// deploy starts attempt's two map tasks (restoring blobs if any) and
	// two sources assigned partitions {0} and {1}, with discovery every
	// 200ms, restoring offsets (all of the checkpoint's: each source keeps
	// those it owns, as the leader's restorePartitions does).
	deploy := func(attempt uint64, start string, restoreID uint64, offsets map[int32]int64, blobs []*transport.KeyedBlob) (map[string]*transport.TaskRef, []*transport.TaskRef) {
		var mapTasks []*transport.TaskRef
		for i, mr := range refs {
			d := mapDeploy("disc", attempt, operator.WordCount, 2, 128, refs, i)
			d.RestoreCheckpointId, d.RestoreKeyed = restoreID, blobs
			f.deploy(t, mr.GetWorkerId(), d)
			mapTasks = append(mapTasks, d.Task)
		}
		sources := map[string]*transport.TaskRef{}
		for i, w := range workers {
			d := sourceDeploy("disc", attempt, int32(i), operator.WordCount, brokers, "words", []int32{int32(i)}, refs)
			d.NumSources = 2
			d.Source.Start = start
			d.Source.PartitionDiscoveryMs = 200
			if restoreID != 0 {
				d.RestoreCheckpointId = restoreID
				d.RestoreOffsets = map[int32]int64{}
				for p, off := range offsets {
					if int(p)%2 == i {
						d.RestoreOffsets[p] = off
					}
				}
			}
			f.deploy(t, w, d)
			sources[w] = d.Task
		}
		for _, r := range append(slices.Collect(maps.Values(sources)), mapTasks...) {
			f.awaitStatus(t, r, transport.TaskPhase_TASK_PHASE_RUNNING)
		}
		return sources, mapTasks
	}

	// verify checks ownership of every source's offsets and invariant 1 on
	// every checkpoint; mid keeps the first one with a discovered partition
	// read part of the way.
	var mid map[string]*transport.CheckpointAck
	var midID uint64
	verify := func(id uint64, offsets map[int32]int64, acks map[string]*transport.CheckpointAck) {
		for i := range 2 {
			for p := range acks[fmt.Sprintf("source-%d", i)].GetState().GetOffsets() {
				if int(p)%2 != i {
					t.Fatalf("checkpoint %d: source-%d acked an offset of partition %d, which it does not own", id, i, p)
				}
			}
		}
		got := map[string]int64{}
		for _, mr := range refs {
			vals, _ := decodeKeyed(t, acks[mr.GetTaskId()].GetState())
			maps.Copy(got, vals)
		}
		if want := in.fold(offsets); !reflect.DeepEqual(got, want) {
			t.Fatalf("keyed state of checkpoint %d = %v, want the fold of the records below %v: %v", id, got, offsets, want)
		}
		if mid == nil && offsets[2] > 0 && offsets[2] < in.end()[2] {
			mid, midID = acks, id
		}
	}
	allOffsets := func(acks map[string]*transport.CheckpointAck) map[int32]int64 {
		out := map[int32]int64{}
		for i := range 2 {
			maps.Copy(out, acks[fmt.Sprintf("source-%d", i)].GetState().GetOffsets())
		}
		return out
	}
	blobsOf := func(acks map[string]*transport.CheckpointAck) []*transport.KeyedBlob {
		var blobs []*transport.KeyedBlob
		for _, mr := range refs {
			st := acks[mr.GetTaskId()].GetState()
			blobs = append(blobs, &transport.KeyedBlob{TaskId: mr.GetTaskId(), Data: st.GetKeyed(), Sha256: st.GetKeyedSha256()})
		}
		return blobs
	}

	sources, mapTasks := deploy(1, "earliest", 0, nil, nil)
	before, beforeAcks := checkpointUntil(t, f, 1, sources, mapTasks, in.end(), verify)

	// Three partitions are added and written to at once, then more records
	// follow in every partition, so that checkpoints fall while the
	// sources read the new partitions.
	addPartitions(t, brokers, "words", 5)
	added := time.Now()
	for p := int32(2); p < 5; p++ {
		in.produce(t, brokers, p, 40)
	}
	for round := range 4 {
		for p := int32(0); p < 5; p++ {
			in.produce(t, brokers, p, 10+round)
		}
	}
	id, acks := checkpointUntil(t, f, before+1, sources, mapTasks, in.end(), verify)
	t.Logf("checkpoint %d covers the 5 partitions, %s after they were added", id, time.Since(added).Round(time.Millisecond))
	if got := slices.Sorted(maps.Keys(acks["source-0"].GetState().GetOffsets())); !slices.Equal(got, []int32{0, 2, 4}) {
		t.Fatalf("source-0 acked partitions %v, want [0 2 4]", got)
	}
	if got := slices.Sorted(maps.Keys(acks["source-1"].GetState().GetOffsets())); !slices.Equal(got, []int32{1, 3}) {
		t.Fatalf("source-1 acked partitions %v, want [1 3]", got)
	}

	// Attempt 2 restores the checkpoint taken before the partitions existed,
	// as after a worker kill right after discovery: it has no offsets for
	// 2, 3, 4, and no state of theirs, so they are read from the start,
	// whatever the start policy says.
	sources, mapTasks = deploy(2, "latest", before, allOffsets(beforeAcks), blobsOf(beforeAcks))
	id, acks = checkpointUntil(t, f, id+1, sources, mapTasks, in.end(), verify)

	// Attempt 3 restores a checkpoint that has the discovered partitions'
	// offsets (part of the way through them if one was taken there) with
	// the original assignment: the sources resume them at those offsets.
	restoreID, restoreAcks := id, acks
	if mid != nil {
		restoreID, restoreAcks = midID, mid
	}
	for p := int32(0); p < 5; p++ {
		in.produce(t, brokers, p, 7)
	}
	sources, mapTasks = deploy(3, "earliest", restoreID, allOffsets(restoreAcks), blobsOf(restoreAcks))
	checkpointUntil(t, f, id+1, sources, mapTasks, in.end(), verify)
	t.Logf("attempt 3 restored checkpoint %d (offsets %v) and reached every record", restoreID, allOffsets(restoreAcks))
}

// TestKafkaLeasePartitionsSharesRefreshes: partition discovery refreshes a
// topic's metadata at most once per maxAge per shared client.
func TestKafkaLeasePartitionsSharesRefreshes(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	_, lease := testLease(t, brokers, "words", 2*time.Second)
	defer lease.release()
	count := func(maxAge time.Duration) int {
		t.Helper()
		parts, err := lease.partitions(context.Background(), "words", maxAge)
		if err != nil {
			t.Fatal(err)
		}
		return len(parts)
	}
	if n := count(time.Hour); n != 2 {
		t.Fatalf("%d partitions, want 2", n)
	}
	addPartitions(t, brokers, "words", 3)
	if n := count(time.Hour); n != 2 {
		t.Fatalf("%d partitions within maxAge of the last refresh, want the 2 it saw", n)
	}
	if n := count(0); n != 3 {
		t.Fatalf("%d partitions after a refresh, want 3", n)
	}
}

// TestKafkaLeasePartitionsWaitsOnlyWhileItsContextLasts: a task that waits
// behind another task's refresh (each can take the metadata timeout in an
// outage) gives up when its context ends, so that stopping it is not held
// up; and a refresh that failed while it waited answers it with that error
// instead of a refresh of its own.
func TestKafkaLeasePartitionsWaitsOnlyWhileItsContextLasts(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	_, lease := testLease(t, brokers, "words", 2*time.Second)
	defer lease.release()
	kc := lease.kc

	kc.metaSem <- struct{}{} // another task's refresh, in progress
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := lease.partitions(ctx, "words", 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("partitions behind a refresh that does not end: %v, want the context's deadline", err)
	}

	// That refresh fails while a second task waits for its turn. Its end
	// is set later than the task can have asked, so the outcome does not
	// depend on when the goroutine runs.
	outage := errors.New("source: cannot reach brokers")
	got := make(chan error, 1)
	go func() {
		_, err := lease.partitions(context.Background(), "words", 0)
		got <- err
	}()
	kc.refreshed["words"] = refreshResult{at: time.Now().Add(time.Hour), err: outage}
	<-kc.metaSem
	if err := <-got; !errors.Is(err, outage) {
		t.Fatalf("a task that waited behind a failed refresh got %v, want that refresh's error", err)
	}
}

// TestKafkaLeasePartitionsGivesUpOnItsOwnHungRefresh: a task whose own
// refresh waits on a broker that answers nothing returns when its context
// ends, not after the client's read timeouts.
func TestKafkaLeasePartitionsGivesUpOnItsOwnHungRefresh(t *testing.T) {
	kafka := newControlledKafka(t)
	_, lease := testLease(t, kafka.brokers, "words", 2*time.Second)
	defer lease.release()
	kafka.hang()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	returned := make(chan error, 1)
	go func() {
		_, err := lease.partitions(ctx, "words", 0)
		returned <- err
	}()
	select {
	case err := <-returned:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("partitions with a hung broker: %v, want the context's deadline", err)
		}
	case <-time.After(3 * time.Second): // a read timeout is 4 s here
		t.Fatal("partitions waited for a refresh on a broker that does not answer past its context")
	}
	kafka.stop() // ends the abandoned refresh
}
