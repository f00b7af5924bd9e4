package integration

// A pipeline of jobs, as users build them: one job's exactly-once output is
// the next job's input, read with source.isolation_level read_committed.

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestChainedJobsReadCommitted runs two jobs in a row: copy passes the words
// to topic mid through an exactly-once sink, count counts the words of mid
// reading committed. A worker of copy crashes right after one of its map
// tasks pre-committed a transaction with records (a failpoint): no
// checkpoint lists that transaction, so the restored task aborts it, and mid
// holds records of an aborted transaction. Then a worker running count's
// tasks is SIGKILLed, so that count restores reading committed too. count's
// state counts every word of the input exactly once; a read uncommitted of
// mid shows the aborted records count would have counted twice.
func TestChainedJobsReadCommitted(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, topics: map[string]int32{"words": 4, "mid": 4}})
	in := newWordInput(23, 24_000, 4)
	produce(t, c.brokers(), "words", in.recs[:6_000])

	copySpec := jobSpec{
		Name:       "copy",
		Source:     sourceSpec{Brokers: c.brokers(), Topic: "words", Start: "earliest", Parallelism: 2},
		Operator:   operatorSpec{Name: "passthrough", Parallelism: 2, MaxParallelism: 128},
		Sink:       &sinkSpec{Brokers: c.brokers(), Topic: "mid"},
		Checkpoint: checkpointSpec{Interval: "200ms", Timeout: "30s"},
		Restart:    &restartSpec{Initial: "100ms", Max: "1s", ResetAfter: "10m"},
	}
	countSpec := failoverSpec(c.brokers(), "200ms")
	countSpec.Name = "count"
	countSpec.Source.Topic = "mid"
	countSpec.Source.IsolationLevel = "read_committed"
	copyJob := c.submitJob(t, copySpec)
	countJob := c.submitJob(t, countSpec)
	// 18 s of input: the failpoint fires at the first pre-commit with
	// records after it is armed, which must come before the input ends
	// however slowly the jobs start.
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[6_000:], 1_000)
	copyBefore := c.waitCheckpointed(t, copyJob)
	c.waitCheckpointed(t, countJob)

	// 1. copy's worker crashes with a pre-committed transaction that no
	// checkpoint will list: its restored task aborts it.
	victim := c.crashAt(t, "worker-after-sink-precommit", time.Minute)
	c.startWorker(t, "w4")
	c.waitJob(t, time.Minute, copyJob, "copy restored and checkpointing after "+victim+" crashed", func(j jobView) error {
		return restoredAway(j, copyBefore, victim)
	})

	// 2. A worker of count dies: its sources restore reading committed.
	j := c.waitJob(t, time.Minute, countJob, "count running with no task on "+victim, func(j jobView) error {
		for _, task := range j.Tasks {
			if task.Worker == victim {
				return fmt.Errorf("task %s still on %s", task.ID, victim)
			}
		}
		if j.Status != "running" {
			return fmt.Errorf("status %s", j.Status)
		}
		return nil
	})
	var killed string
	for _, task := range j.Tasks {
		if task.Kind == "source" && task.Worker != victim {
			killed = task.Worker
			break
		}
	}
	c.killWorker(t, killed)
	c.startWorker(t, "w5")
	c.waitJob(t, time.Minute, countJob, "count restored and checkpointing after "+killed+" was killed", func(now jobView) error {
		return restoredAway(now, j, killed)
	})
	producerDone()

	// copy's committed output is the input, record by record.
	want := make(map[string]string, len(in.recs))
	for _, r := range in.recs {
		want[r.key] = r.value
	}
	var committed []string
	c.waitFor(t, 2*time.Minute, "mid to hold every input record, read committed", func() (bool, error) {
		committed = kcatRecords(t, c.brokers(), "mid", true)
		return len(committed) >= len(in.recs), fmt.Errorf("%d of %d records", len(committed), len(in.recs))
	})
	seen := make(map[string]bool, len(committed))
	for _, line := range committed {
		key, value, _ := strings.Cut(line, "\t")
		if seen[key] {
			t.Fatalf("mid holds record %s twice, read committed", key)
		}
		seen[key] = true
		if w, ok := want[key]; !ok || w != value {
			t.Fatalf("mid holds record %s = %q, want %q (in the input: %v)", key, value, w, ok)
		}
	}
	if len(seen) != len(want) {
		t.Fatalf("mid holds %d records read committed, want the %d of the input", len(seen), len(want))
	}
	uncommitted := kcatRecords(t, c.brokers(), "mid", false)
	if len(uncommitted) <= len(committed) {
		t.Fatalf("mid holds %d records read uncommitted and %d read committed: the crash left no aborted record, so this test shows nothing", len(uncommitted), len(committed))
	}
	t.Logf("mid: %d records committed, %d more in aborted transactions", len(committed), len(uncommitted)-len(committed))

	// count counted what copy committed, every word exactly once.
	var final stateView
	c.waitFor(t, 2*time.Minute, "count's state to equal the input's word counts", func() (bool, error) {
		st, err := c.getJobState(t, countJob)
		if err != nil {
			return false, err
		}
		final = st
		if diff := diffCounts(st.Keyed, in.want); diff != "" {
			return false, fmt.Errorf("checkpoint %d:\n%s", st.CheckpointID, diff)
		}
		return true, nil
	})
	t.Logf("count's checkpoint %d counts every word of the %d records exactly once", final.CheckpointID, len(in.recs))
}

// restoredAway returns nil once job j, as before was before worker died,
// runs a newer attempt with no task on that worker and has completed a
// checkpoint since.
func restoredAway(j, before jobView, worker string) error {
	if err := j.recoveredSince(before); err != nil {
		return err
	}
	for _, task := range j.Tasks {
		if task.Worker == worker {
			return fmt.Errorf("task %s still on %s", task.ID, worker)
		}
	}
	return nil
}
