package worker

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/transport"
)

// TestSlowSourceDoesNotHoldUpOthers: the source tasks of a worker fetch
// through one shared consumer (kafkaPool), in rounds that wait for every
// partition's share. A task that reads on slowly, a run now and then, must
// not hold the other tasks' partitions to its pace: its pump stops reading
// while its queue is full, so that sarama leaves the partition out of the
// rounds. Without that (a pump that reads one run per run taken), the fast
// partition needs a round per fetch of the slow one's records, and the slow
// reader takes hundreds of runs before the fast one is through.
func TestSlowSourceDoesNotHoldUpOthers(t *testing.T) {
	const (
		perPartition = 150_000 // about three fetches of 1 MiB per partition
		slowEvery    = 50 * time.Millisecond
		// The slow reader takes a run every slowEvery. With the pump's
		// pause, the fast partition is through in a few rounds, each held
		// up at most 2 x MaxProcessingTime by the slow one: tens of slow
		// runs. Without it, each of its rounds waits for the slow reader
		// to take a whole fetch, about 200 runs.
		maxSlowRuns = 150
	)
	brokers := newKafka(t, map[string]int32{"ids": 2})
	recs := make([]record, 0, 2*perPartition)
	for i := range 2 * perPartition {
		recs = append(recs, record{partition: int32(i % 2), key: fmt.Sprintf("id-%07d", i), value: "v"})
	}
	for i := 0; i < len(recs); i += 50_000 {
		produce(t, brokers, "ids", recs[i:min(i+50_000, len(recs))])
	}
	cfg := defaultedConfig(t, Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", KafkaTimeout: 5 * time.Second, OffsetCommitInterval: time.Hour, StateDir: t.TempDir()})
	m := newMetrics()
	pool := newKafkaPool(&cfg, "w1", testLogger(t), m)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // before the cleanups: the pumps end, then their consumers close
	var wg sync.WaitGroup
	start := func(task string, p int32) chan []*sarama.ConsumerMessage {
		t.Helper()
		lease, _, err := pool.acquire(brokers, sarama.ReadUncommitted, "ids", "source")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(lease.release)
		pc, closePC, err := lease.consume("ids", p, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(closePC)
		s := &sourceTask{env: &taskEnv{cfg: &cfg, kafka: pool, metrics: m}, spec: &transport.SourceSpec{Topic: "ids"}, log: testLogger(t).With("task", task)}
		merged, failed := make(chan []*sarama.ConsumerMessage), make(chan error, 1)
		wg.Go(func() { s.pump(ctx, p, pc, merged, failed) })
		wg.Go(func() {
			select {
			case err := <-failed:
				t.Errorf("pump of %s: %v", task, err)
			case <-ctx.Done():
			}
		})
		return merged
	}
	slow, fast := start("slow", 0), start("fast", 1)
	t.Cleanup(wg.Wait) // runs before the consumers' and leases' cleanups
	if len(pool.clients) != 1 {
		t.Fatalf("%d clients for one broker set, want one shared", len(pool.clients))
	}

	slowRuns, slowRecords := 0, 0
	tick := time.NewTicker(slowEvery)
	defer tick.Stop()
	deadline := time.After(time.Minute)
	for read := 0; read < perPartition; {
		select {
		case run := <-fast:
			for _, m := range run {
				if m.Offset != int64(read) {
					t.Fatalf("fast partition: offset %d after %d records", m.Offset, read)
				}
				read++
			}
		case <-tick.C:
			select {
			case run := <-slow:
				slowRuns++
				for _, m := range run {
					if m.Offset != int64(slowRecords) {
						t.Fatalf("slow partition: offset %d after %d records", m.Offset, slowRecords)
					}
					slowRecords++
				}
			default:
			}
		case <-deadline:
			t.Fatalf("the fast partition read %d of %d records in a minute, the slow one %d runs", read, perPartition, slowRuns)
		}
	}
	t.Logf("the fast partition read all %d records while the slow reader took %d runs (%d records)", perPartition, slowRuns, slowRecords)
	if slowRuns > maxSlowRuns {
		t.Errorf("the slow reader took %d runs before the fast partition was through; want at most %d: it held the shared fetch rounds to its pace", slowRuns, maxSlowRuns)
	}
}

// A pump's queue pauses once it holds pumpQueueBytes and resumes only once
// the loop has taken it down to half, and hands out runs in order, none
// longer than pumpBatch.
func TestPumpQueuePausesWithHysteresis(t *testing.T) {
	var q pumpQueue
	value := make([]byte, 1024-recordOverhead)
	per := len(value) + recordOverhead
	n := 0
	for !q.paused {
		q.add(&sarama.ConsumerMessage{Offset: int64(n), Value: value}, n%300)
		n++
	}
	if n != pumpQueueBytes/per {
		t.Fatalf("paused after %d records of %d bytes, want %d (pumpQueueBytes)", n, per, pumpQueueBytes/per)
	}
	next := int64(0)
	for q.paused {
		run := q.head()
		if len(run) == 0 || len(run) > pumpBatch {
			t.Fatalf("run of %d records", len(run))
		}
		for _, m := range run {
			if m.Offset != next {
				t.Fatalf("offset %d, want %d", m.Offset, next)
			}
			next++
		}
		q.pop()
	}
	if q.bytes > pumpQueueBytes/2 || q.bytes <= pumpQueueBytes/2-pumpBatch*per {
		t.Fatalf("resumed holding %d bytes; want the first run that took it to half (%d) or below", q.bytes, pumpQueueBytes/2)
	}
	for q.head() != nil {
		for _, m := range q.head() {
			if m.Offset != next {
				t.Fatalf("offset %d, want %d", m.Offset, next)
			}
			next++
		}
		q.pop()
	}
	if next != int64(n) || q.bytes != 0 {
		t.Fatalf("handed out %d of %d records, %d bytes left", next, n, q.bytes)
	}
}

// Headers count toward a pump's queue: records whose memory is mostly in
// their headers pause it as soon as records of the same size in values do.
func TestPumpQueueCountsHeaders(t *testing.T) {
	var q pumpQueue
	name, value := []byte("trace-id"), make([]byte, 1024-recordOverhead-headerOverhead-len("trace-id"))
	n := 0
	for !q.paused && n <= pumpQueueBytes {
		q.add(&sarama.ConsumerMessage{Offset: int64(n), Headers: []*sarama.RecordHeader{{Key: name, Value: value}}}, 0)
		n++
	}
	if want := pumpQueueBytes / 1024; n != want {
		t.Fatalf("paused after %d records of 1 KiB, mostly header; want %d", n, want)
	}
}

// A run sized for a few ready records grows to a whole run in one step once
// more stream in: two allocations per run, not one per doubling.
func TestPumpQueueRunGrowsOnce(t *testing.T) {
	var q pumpQueue
	grown := 0 // the run's capacity after its one growth
	for i := range pumpBatch {
		q.add(&sarama.ConsumerMessage{Offset: int64(i)}, 0)
		if len(q.runs) != 1 {
			t.Fatalf("after %d records: %d runs, want one", i+1, len(q.runs))
		}
		c := cap(q.runs[0])
		switch {
		case i == 0 && c != 1:
			t.Fatalf("first record: a run of capacity %d, want 1 (nothing more was ready)", c)
		case i == 1 && c < pumpBatch:
			t.Fatalf("second record: the run grew to capacity %d, want at least %d at once", c, pumpBatch)
		case i == 1:
			grown = c
		case i > 1 && c != grown:
			t.Fatalf("after %d records: the run grew again, to capacity %d from %d", i+1, c, grown)
		}
	}
}
