package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// TestPartitionDiscovery: partitions added to the topic of a running
// wordcount job are picked up without a restart, from their earliest offset
// (records written to them before the sources looked are counted), and
// exactly once through the SIGKILL of a worker that runs a source right after
// it discovered a partition: a checkpoint taken before it did has no offset
// for the partition, and the restored attempt reads it from the start again.
func TestPartitionDiscovery(t *testing.T) {
	const (
		before, after = 2, 6 // partitions of the topic before and after the change
		firstRecords  = 20_000
		newRecords    = 40_000 // produced after the change, half of them at once
		producerRate  = 10_000
	)
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": before}})

	corpus := newCorpus(20261202)
	want := map[string]int64{}
	line := func() string {
		l := corpus.line()
		for _, w := range strings.Fields(l) {
			want[w]++
		}
		return l
	}
	var first []record
	for i := range firstRecords {
		first = append(first, record{key: fmt.Sprint(i), value: line(), partition: int32(i % before)})
	}
	// After the change: every partition, the new ones twice as often.
	var burst, trickle []record
	for i := range newRecords {
		p := int32(i % (2*after - before))
		if p >= after {
			p -= after - before
		}
		r := record{key: fmt.Sprint(firstRecords + i), value: line(), partition: p}
		if i < newRecords/2 {
			burst = append(burst, r)
		} else {
			trickle = append(trickle, r)
		}
	}
	produce(t, c.brokers(), "words", first)

	spec := wordcountSpec(c.brokers(), "words")
	spec.Checkpoint.Interval = "500ms"
	job := c.submitJob(t, withPartitionDiscovery(t, spec, "1s"))
	var running jobView
	c.waitFor(t, 2*time.Minute, "a completed checkpoint that has read records", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		running = j
		st, err := c.getJobState(t, job)
		if err != nil {
			return false, err
		}
		return sumOffsets(st.Offsets) > 0, fmt.Errorf("job %s (attempt %d), checkpoint %d has read nothing", j.Status, j.Attempt, st.CheckpointID)
	})

	createPartitions(t, c.brokers(), "words", after)
	produce(t, c.brokers(), "words", burst)
	producerDone := produceInBackground(t, c.brokers(), "words", trickle, producerRate)

	// The first worker whose source logs a partition it discovered is
	// killed at once.
	victim := ""
	c.waitFor(t, time.Minute, "a source to read a partition added to the topic", func() (bool, error) {
		for _, w := range c.workers {
			b, err := os.ReadFile(w.p.logPath)
			if err != nil {
				return false, err
			}
			if strings.Contains(string(b), "reading a partition added to the topic") {
				victim = w.id
				return true, nil
			}
		}
		return false, fmt.Errorf("no worker has logged a discovered partition")
	})
	c.killWorker(t, victim)
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if j.Attempt != running.Attempt {
		t.Fatalf("job went from attempt %d to %d before the kill: discovery must not restart it", running.Attempt, j.Attempt)
	}
	if st, err := c.getJobState(t, job); err == nil {
		t.Logf("killed %s after it discovered a partition; last completed checkpoint %d has offsets %v", victim, st.CheckpointID, st.Offsets)
	}
	c.waitFor(t, time.Minute, "a new attempt after "+victim+"'s death", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		return j.Attempt > running.Attempt && j.Status == "running", fmt.Errorf("attempt %d, %s %s", j.Attempt, j.Status, j.Reason)
	})

	producerDone()
	end := topicEndOffsets(t, c.brokers(), "words")
	if len(end) != after {
		t.Fatalf("words has %d partitions, want %d", len(end), after)
	}
	if n := sumOffsets(end); n != firstRecords+newRecords {
		t.Fatalf("words holds %d records after producing %d", n, firstRecords+newRecords)
	}
	final := c.waitCaughtUp(t, 3*time.Minute, job, "words", end)
	if diff := diffCounts(final.Keyed, want); diff != "" {
		t.Fatalf("checkpoint %d's state differs from the counts of the input:\n%s", final.CheckpointID, diff)
	}
	c.waitFor(t, time.Minute, "the coordinators to agree on the FSM", c.sameLiveFSM)
}

// withPartitionDiscovery is spec with source.partition_discovery set, as
// JSON a user would submit.
func withPartitionDiscovery(t *testing.T, spec jobSpec, every string) map[string]any {
	t.Helper()
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	doc["source"].(map[string]any)["partition_discovery"] = every
	return doc
}

// createPartitions raises topic's partition count to total, as
// kafka-topics.sh --alter --partitions does.
func createPartitions(t *testing.T, brokers []string, topic string, total int32) {
	t.Helper()
	adm, err := sarama.NewClusterAdmin(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("create partitions of %s: %v", topic, err)
	}
	defer adm.Close()
	if err := adm.CreatePartitions(topic, total, nil, false); err != nil {
		t.Fatalf("create partitions of %s up to %d: %v", topic, total, err)
	}
	t.Logf("topic %s now has %d partitions", topic, total)
}
