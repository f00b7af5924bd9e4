package integration

// Task-scoped recovery (issue 11): after a worker's SIGKILL only its tasks
// are restored; the others keep running with their state, connections and
// sink transactions, and state and output stay exact.

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestTaskScopedRecoveryKeepsSurvivors SIGKILLs the worker that runs the
// most tasks of a wordcount job with an exactly-once sink on three workers.
// The tasks on the other two keep their attempt and start time; the lost
// ones run again elsewhere in a new attempt; the job's state and the
// read_committed output (per word, counts 1, 2, ..., n, each once) are
// exact.
func TestTaskScopedRecoveryKeepsSurvivors(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, topics: map[string]int32{"words": 4, "counts": 4}})
	in := newWordInput(11, 30_000, 4)
	produce(t, c.brokers(), "words", in.recs[:8_000])
	job := c.submitJob(t, sinkJobSpec(c.brokers(), "200ms", "counts", ""))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[8_000:], 2_000)
	before := c.waitCheckpointed(t, job)

	victim := busiestWorker(before)
	survivors := map[string]taskView{}
	for _, task := range before.Tasks {
		if task.Worker != victim {
			survivors[task.ID] = task
		}
	}
	if len(survivors) == 0 || len(survivors) == len(before.Tasks) {
		t.Fatalf("tasks %+v: want some on %s and some elsewhere", before.Tasks, victim)
	}
	killedAt := time.Now()
	c.killWorker(t, victim)
	after := c.waitJob(t, time.Minute, job, "a task-scoped recovery without "+victim+" and a checkpoint after it", func(j jobView) error {
		if len(j.Recoveries) == 0 || j.Recoveries[0].Attempt <= before.Attempt {
			return errors.New("no recovery yet")
		}
		if r := j.Recoveries[0]; r.Scope != "tasks" {
			return fmt.Errorf("recovery of scope %q (%s), want tasks", r.Scope, r.Reason)
		}
		if j.Recoveries[0].CheckpointID == 0 || j.Status != "running" {
			return fmt.Errorf("status %s, no checkpoint after the recovery yet", j.Status)
		}
		return nil
	})
	rec := after.Recoveries[0]
	t.Logf("SIGKILL of %s: recovery of %v started %v after, first checkpoint %d %v after (%s)", victim, rec.Tasks,
		sinceKill(killedAt, rec.StartedAt), rec.CheckpointID, sinceKill(killedAt, rec.CheckpointedAt), rec.Reason)
	for _, task := range after.Tasks {
		old, survived := survivors[task.ID]
		switch {
		case survived && (task.Attempt != old.Attempt || task.StartedAt != old.StartedAt || task.Worker != old.Worker):
			t.Errorf("surviving task %s was restarted: now attempt %d started %s on %s, was attempt %d started %s on %s",
				task.ID, task.Attempt, task.StartedAt, task.Worker, old.Attempt, old.StartedAt, old.Worker)
		case !survived && (task.Worker == victim || task.Attempt != rec.Attempt):
			t.Errorf("lost task %s: attempt %d on %s, want attempt %d elsewhere than %s", task.ID, task.Attempt, task.Worker, rec.Attempt, victim)
		}
	}
	if len(rec.Tasks) != len(before.Tasks)-len(survivors) {
		t.Errorf("recovery restored %v, want the %d tasks of %s", rec.Tasks, len(before.Tasks)-len(survivors), victim)
	}

	producerDone()
	c.checkExact(t, job, in.want)
	got := c.waitOutput(t, "counts", true, in.want)
	if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
		t.Fatalf("read_committed output of %d words is not exactly once (%d problems):\n%s", len(in.want), len(problems),
			strings.Join(problems[:min(20, len(problems))], "\n"))
	}
	var dropped float64
	for _, w := range c.workers {
		if w.p.hasExited() {
			continue
		}
		text, err := c.workerMetrics(w)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := metricSum(text, "coordflow_duplicate_items_dropped_total")
		dropped += n
	}
	t.Logf("read_committed output exact for %d words; surviving map tasks dropped %v items they had applied already", len(got), dropped)
}

// busiestWorker is the worker running the most tasks of j (by name on a tie).
func busiestWorker(j jobView) string {
	n := map[string]int{}
	best := ""
	for _, task := range j.Tasks {
		n[task.Worker]++
	}
	for w, k := range n {
		if best == "" || k > n[best] || k == n[best] && w < best {
			best = w
		}
	}
	return best
}

// sinceKill is how long after killedAt the RFC 3339 time at happened.
func sinceKill(killedAt time.Time, at string) time.Duration {
	ts, err := time.Parse(time.RFC3339Nano, at)
	if err != nil {
		return -1
	}
	return ts.Sub(killedAt).Round(time.Millisecond)
}

// TestTaskScopedRecoveryOfAFrozenWorker freezes (SIGSTOP) the worker running
// the most tasks of the job until gossip declares it dead and its lease has
// run out: its tasks are restored alone on the other two, whose tasks run
// on. Woken up (SIGCONT),
// the zombie's tasks are fenced: nothing they send is accepted and their
// sink producers are fenced by Kafka. State and read_committed output stay
// exact.
func TestTaskScopedRecoveryOfAFrozenWorker(t *testing.T) {
	if testing.Short() {
		t.Skip("freezes real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, topics: map[string]int32{"words": 4, "counts": 4}})
	in := newWordInput(13, 30_000, 4)
	produce(t, c.brokers(), "words", in.recs[:8_000])
	job := c.submitJob(t, sinkJobSpec(c.brokers(), "200ms", "counts", ""))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[8_000:], 3_000)
	before := c.waitCheckpointed(t, job)

	victim := busiestWorker(before)
	frozenAt := time.Now()
	c.pauseWorker(t, victim)
	after := c.waitJob(t, time.Minute, job, "a task-scoped recovery without frozen "+victim+" and a checkpoint after it", func(j jobView) error {
		if len(j.Recoveries) == 0 || j.Recoveries[0].Attempt <= before.Attempt || j.Recoveries[0].CheckpointID == 0 {
			return errors.New("no recovery with a checkpoint after it yet")
		}
		if r := j.Recoveries[0]; r.Scope != "tasks" {
			return fmt.Errorf("recovery of scope %q (%s), want tasks", r.Scope, r.Reason)
		}
		return nil
	})
	rec := after.Recoveries[0]
	t.Logf("SIGSTOP of %s: recovery of %v started %v after, first checkpoint %d %v after (%s)", victim, rec.Tasks,
		sinceKill(frozenAt, rec.StartedAt), rec.CheckpointID, sinceKill(frozenAt, rec.CheckpointedAt), rec.Reason)
	for _, task := range after.Tasks {
		var old taskView
		for _, o := range before.Tasks {
			if o.ID == task.ID {
				old = o
			}
		}
		if old.Worker != victim && (task.Attempt != old.Attempt || task.StartedAt != old.StartedAt) {
			t.Errorf("task %s on %s was restarted: attempt %d started %s, was %d started %s", task.ID, old.Worker, task.Attempt, task.StartedAt, old.Attempt, old.StartedAt)
		}
		if task.Worker == victim {
			t.Errorf("task %s still placed on the frozen %s", task.ID, victim)
		}
	}
	c.resumeWorker(t, victim)
	c.waitFor(t, time.Minute, "the woken "+victim+" to run no task", func() (bool, error) {
		n, err := c.workerMetric(t, victim, "coordflow_worker_tasks")
		if err != nil {
			return false, err
		}
		return n == 0, fmt.Errorf("%s runs %v tasks", victim, n)
	})

	producerDone()
	c.checkExact(t, job, in.want)
	got := c.waitOutput(t, "counts", true, in.want)
	if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
		t.Fatalf("read_committed output of %d words is not exactly once (%d problems):\n%s", len(in.want), len(problems),
			strings.Join(problems[:min(20, len(problems))], "\n"))
	}
	final, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if len(final.Recoveries) != len(after.Recoveries) {
		t.Errorf("recoveries after the zombie woke up: %+v", final.Recoveries[:len(final.Recoveries)-len(after.Recoveries)])
	}
}
