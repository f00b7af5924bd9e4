package worker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// transactionalInput writes partition 0 of topic in as a job's exactly-once
// output looks after a crash: a committed transaction (a, b: offsets 0-1,
// its marker 2), an aborted one (x, y: 3-4, marker 5), a committed one (c:
// 6, marker 7) and one still open (z: 8), whose producer it returns. The
// high watermark is 9, the last stable offset 8.
func transactionalInput(t *testing.T, brokers []string) sarama.SyncProducer {
	t.Helper()
	if err := beginTxn(t, brokers, "in", "committed", "a", "b").CommitTxn(); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if err := beginTxn(t, brokers, "in", "aborted", "x", "y").AbortTxn(); err != nil {
		t.Fatalf("abort: %v", err)
	}
	if err := beginTxn(t, brokers, "in", "committed-2", "c").CommitTxn(); err != nil {
		t.Fatalf("commit: %v", err)
	}
	return beginTxn(t, brokers, "in", "open", "z")
}

// TestSourceReadsCommitted: a source reading committed records hands over
// those of committed transactions only: not those of an aborted one, and
// those of an open one once it commits. Reading uncommitted, Kafka's
// default, it hands over every record of data. Checkpoints name the offset
// after the last record handed over.
func TestSourceReadsCommitted(t *testing.T) {
	for _, tc := range []struct {
		name          string
		readCommitted bool
		// before and after the open transaction commits: the offset the
		// source reaches, and the state
		offsetOpen, offsetEnd int64
		stateOpen, stateEnd   map[string]int64
	}{
		{"read_committed", true,
			7, 9,
			map[string]int64{"a": 1, "b": 1, "c": 1},
			map[string]int64{"a": 1, "b": 1, "c": 1, "z": 1}},
		{"read_uncommitted", false,
			9, 9,
			map[string]int64{"a": 1, "b": 1, "x": 1, "y": 1, "c": 1, "z": 1},
			map[string]int64{"a": 1, "b": 1, "x": 1, "y": 1, "c": 1, "z": 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			brokers := newKafka(t, map[string]int32{"in": 1})
			open := transactionalInput(t, brokers)
			f := newFakeCoord(t, true, "")
			w := startWorker(t, "w1", f, nil)
			own := []*transport.MapTaskRef{{TaskId: "map-0", WorkerId: w.ID(), DataAddr: w.DataAddr(), KeyGroupStart: 0, KeyGroupEnd: 128}}
			m0 := mapDeploy("job", 1, operator.Count, 1, 128, own, 0)
			s0 := sourceDeploy("job", 1, 0, operator.Count, brokers, "in", []int32{0}, own)
			s0.Source.ReadCommitted = tc.readCommitted
			for _, d := range []*transport.DeployTask{m0, s0} {
				f.deploy(t, "w1", d)
				f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
			}
			sources := map[string]*transport.TaskRef{"w1": s0.Task}
			mapTasks := []*transport.TaskRef{m0.Task}
			stateOf := func(acks map[string]*transport.CheckpointAck) map[string]int64 {
				state, _ := decodeKeyed(t, acks["map-0"].GetState())
				return state
			}
			id, acks := checkpointUntil(t, f, 1, sources, mapTasks, map[int32]int64{0: tc.offsetOpen}, nil)
			if got := stateOf(acks); !maps.Equal(got, tc.stateOpen) {
				t.Fatalf("checkpoint %d with a transaction open: state %v, want %v", id, got, tc.stateOpen)
			}
			if err := open.CommitTxn(); err != nil {
				t.Fatalf("commit the open transaction: %v", err)
			}
			id, acks = checkpointUntil(t, f, id+1, sources, mapTasks, map[int32]int64{0: tc.offsetEnd}, nil)
			if got := stateOf(acks); !maps.Equal(got, tc.stateEnd) {
				t.Fatalf("checkpoint %d after the commit: state %v, want %v", id, got, tc.stateEnd)
			}
		})
	}
}

// restoreReadingCommitted runs, on a worker of its own, a count job's map
// task and its source reading committed from partition 0 of topic in,
// restored task by task (partial) from checkpoint 1 at offset 1, and
// triggers checkpoint 2, which the source holds until it has caught up.
func restoreReadingCommitted(t *testing.T, brokers []string) (f *fakeCoord, s0, m0 *transport.DeployTask) {
	t.Helper()
	f = newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, nil)
	own := []*transport.MapTaskRef{{TaskId: "map-0", WorkerId: w.ID(), DataAddr: w.DataAddr(), KeyGroupStart: 0, KeyGroupEnd: 128}}
	m0 = mapDeploy("job", 2, operator.Count, 1, 128, own, 0)
	s0 = sourceDeploy("job", 2, 0, operator.Count, brokers, "in", []int32{0}, own)
	s0.Source.ReadCommitted = true
	s0.Partial, s0.RestoreCheckpointId, s0.RestoreOffsets = true, 1, map[int32]int64{0: 1}
	for _, d := range []*transport.DeployTask{m0, s0} {
		f.deploy(t, "w1", d)
		f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	}
	f.trigger(t, "w1", s0.Task, 2)
	return f, s0, m0
}

// TestRestoredSourceCatchesUpReadingCommitted: a restored partial source
// reading committed catches up to the last stable offset its partitions had
// at its start, not to their end: records of a transaction open then are
// not readable, and its predecessor cannot have sent them. Below it, records
// of aborted transactions are passed over like transaction markers. Without
// either, the catch-up, and the checkpoint trigger it holds, would wait for
// the open transaction to end.
func TestRestoredSourceCatchesUpReadingCommitted(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"in": 1})
	transactionalInput(t, brokers)
	f, s0, m0 := restoreReadingCommitted(t, brokers)
	if got := f.awaitAck(t, s0.Task, 2).GetState().GetOffsets()[0]; got != 7 {
		t.Fatalf("checkpoint 2 acked at offset %d, want 7: b and c read, the aborted x and y passed over, z still open", got)
	}
	state, _ := decodeKeyed(t, f.awaitAck(t, m0.Task, 2).GetState())
	if want := map[string]int64{"b": 1, "c": 1}; !maps.Equal(state, want) {
		t.Fatalf("checkpoint 2: state %v, want %v (restored at offset 1)", state, want)
	}
}

// TestProbeReadingCommitted: the catch-up's probe of a partition reading
// committed counts records of aborted transactions as no data, like
// transaction markers; reading uncommitted, they are data.
func TestProbeReadingCommitted(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"in": 1})
	transactionalInput(t, brokers)
	client := probeClient(t, brokers)
	for _, tc := range []struct {
		from, end              int64
		committed, uncommitted bool // none: no data below end
	}{
		{2, 6, true, false},  // commit marker, aborted x and y, abort marker
		{3, 5, true, false},  // x and y
		{5, 6, true, true},   // the abort marker
		{2, 7, false, false}, // c at 6
		{0, 2, false, false}, // a and b
	} {
		for _, iso := range []struct {
			level sarama.IsolationLevel
			want  bool
		}{{sarama.ReadCommitted, tc.committed}, {sarama.ReadUncommitted, tc.uncommitted}} {
			none, _, err := dataBelow(client, "in", 0, tc.from, tc.end, iso.level)
			if err != nil || none != iso.want {
				t.Errorf("probe of [%d, %d) at isolation %d: none %v, err %v; want none %v", tc.from, tc.end, iso.level, none, err, iso.want)
			}
		}
	}
	// The open transaction's record is beyond what reading committed sees.
	if _, _, err := dataBelow(client, "in", 0, 8, 9, sarama.ReadCommitted); err == nil {
		t.Error("probe of [8, 9) reading committed, at the open transaction: no error, want errProbeShort")
	}
	for _, tc := range []struct {
		level sarama.IsolationLevel
		want  int64
	}{{sarama.ReadCommitted, 8}, {sarama.ReadUncommitted, 9}} {
		if got, err := readableEnd(client, "in", 0, tc.level); err != nil || got != tc.want {
			t.Errorf("readable end at isolation %d: %d, %v; want %d", tc.level, got, err, tc.want)
		}
	}
}

// TestCatchUpPassesLongAbortedTransaction: a restored source reading
// committed whose partition holds, up to its end, an aborted transaction of
// more records than one probe reads (probeFetches fetches of
// probeFetchBytes) ends its catch-up: each probe goes on from where the last
// one stopped. Before, every probe started again at the source's offset and
// the catch-up, with the checkpoints it holds, never ended.
func TestCatchUpPassesLongAbortedTransaction(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"in": 1})
	if err := beginTxn(t, brokers, "in", "committed", "a").CommitTxn(); err != nil { // a at 0, its marker 1
		t.Fatalf("commit: %v", err)
	}
	// One record a batch, as a producer that flushes often writes them, so
	// that no fetch returns more than about probeFetchBytes.
	value := strings.Repeat("x", 1<<10)
	records := 2 * probeFetches * probeFetchBytes / len(value)
	p := beginTxn(t, brokers, "in", "aborted")
	for i := range records {
		msg := &sarama.ProducerMessage{Topic: "in", Partition: 0, Key: sarama.StringEncoder(fmt.Sprint(i)), Value: sarama.StringEncoder(value)}
		if _, _, err := p.SendMessage(msg); err != nil {
			t.Fatalf("produce record %d in a transaction: %v", i, err)
		}
	}
	if err := p.AbortTxn(); err != nil {
		t.Fatalf("abort: %v", err)
	}
	end := int64(2 + records + 1) // the aborted records from 2, then the abort marker

	// One probe from the source's offset cannot see the end; it says how
	// far it saw no data.
	none, passed, err := dataBelow(probeClient(t, brokers), "in", 0, 1, end, sarama.ReadCommitted)
	if !errors.Is(err, errProbeShort) || none || passed <= 1 || passed >= end {
		t.Fatalf("one probe of [1, %d): none %v, passed %d, err %v; want errProbeShort having passed some of the aborted records", end, none, passed, err)
	}

	f, s0, m0 := restoreReadingCommitted(t, brokers)
	if got := f.awaitAck(t, s0.Task, 2).GetState().GetOffsets()[0]; got != 1 {
		t.Fatalf("checkpoint 2 acked at offset %d, want 1: no record handed over after a", got)
	}
	if state, _ := decodeKeyed(t, f.awaitAck(t, m0.Task, 2).GetState()); len(state) != 0 {
		t.Fatalf("checkpoint 2: state %v, want none (restored after a, and the rest aborted)", state)
	}
}

// TestReplayReadsCommitted: a source reading committed replays to a moved
// map task what it was handed itself: the records of committed
// transactions, not those of the aborted one, which the map task would
// otherwise apply (task-scoped recovery).
func TestReplayReadsCommitted(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"in": 1})
	transactionalInput(t, brokers)
	d := wordSourceDeploy(brokers, "in", []int32{0}, 1)
	d.Source.ReadCommitted = true
	s, fakes, _ := newTestSource(t, d, nil, nil)
	s.offsets = map[int32]int64{0: 7} // read up to c at 6
	if err := s.replay(context.Background(), 0, map[int32]int64{0: 0}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, it := range fakes[0].decode(t).items {
		got = append(got, fmt.Sprintf("%s@%d", it.key, it.off))
	}
	if want := []string{"a@0", "b@1", "c@6"}; !slices.Equal(got, want) {
		t.Fatalf("replayed %v, want %v: the committed records below the source's offset", got, want)
	}
}
