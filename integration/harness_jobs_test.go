package integration

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// Helpers for scenarios with many jobs: one topic per job, submitted in
// parallel, waited for together.

// manyTopics returns n topic names, "in-0000" on, with partitions each.
func manyTopics(n int, partitions int32) map[string]int32 {
	topics := make(map[string]int32, n)
	for i := range n {
		topics[manyTopic(i)] = partitions
	}
	return topics
}

func manyTopic(i int) string { return fmt.Sprintf("in-%04d", i) }

// smallJobSpec is a job of one source and one map task counting the records
// of topic by key, with checkpoints every interval.
func smallJobSpec(brokers []string, name, topic string, interval time.Duration) jobSpec {
	return jobSpec{
		Name:       name,
		Source:     sourceSpec{Brokers: brokers, Topic: topic, Start: "earliest", Parallelism: 1},
		Operator:   operatorSpec{Name: "count", Parallelism: 1},
		Checkpoint: checkpointSpec{Interval: interval.String(), Timeout: "30s", Retained: 2, TolerableFailures: 3},
	}
}

// submitJobs submits specs from 8 clients at once and returns the job ids,
// in the order of specs.
func (c *cluster) submitJobs(t *testing.T, specs []jobSpec) []string {
	t.Helper()
	ids := make([]string, len(specs))
	errs := make([]error, len(specs))
	next := make(chan int)
	var wg sync.WaitGroup
	addr := c.api(t)
	for range 8 {
		wg.Go(func() {
			for i := range next {
				ids[i], errs[i] = c.postJob(addr, specs[i])
			}
		})
	}
	for i := range specs {
		next <- i
	}
	close(next)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("submit job %s: %v", specs[i].Name, err)
		}
	}
	return ids
}

// listJobs reads GET /v1/jobs from a live coordinator, by job id.
func (c *cluster) listJobs(t *testing.T) (map[string]jobView, error) {
	var jobs []jobView
	if err := c.call("GET", c.api(t), "/v1/jobs", nil, &jobs); err != nil {
		return nil, err
	}
	out := make(map[string]jobView, len(jobs))
	for _, j := range jobs {
		out[j.ID] = j
	}
	return out, nil
}

// waitJobsCheckpointed waits until every job of ids is running and has a
// completed checkpoint newer than after[id] (0 for any), and returns the
// jobs as last listed.
func (c *cluster) waitJobsCheckpointed(t *testing.T, timeout time.Duration, ids []string, after map[string]uint64) map[string]jobView {
	t.Helper()
	var jobs map[string]jobView
	c.waitFor(t, timeout, fmt.Sprintf("%d jobs running with a new completed checkpoint", len(ids)), func() (bool, error) {
		var err error
		if jobs, err = c.listJobs(t); err != nil {
			return false, err
		}
		waiting, example := 0, ""
		for _, id := range ids {
			j := jobs[id]
			if j.Status != "running" || j.lastCheckpointID() <= after[id] {
				if waiting++; example == "" {
					example = fmt.Sprintf("%s is %s (%s), last checkpoint %d", id, j.Status, j.Reason, j.lastCheckpointID())
				}
			}
		}
		if waiting > 0 {
			return false, fmt.Errorf("%d of %d jobs waiting, e.g. %s", waiting, len(ids), example)
		}
		return true, nil
	})
	return jobs
}
