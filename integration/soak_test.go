package integration

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestSoakNoSpuriousFailover runs a checkpointing wordcount job under a
// steady stream for COORDFLOW_SOAK (a Go duration, e.g. 10m; the test skips
// without it) and checks all along (every poll) that nothing failed over although
// nothing failed: no election (the term stays), no member ever leaves
// "alive", no task restart, no lease expiry, and no checkpoint aborted. It
// ends with the exact-state check. It is the evidence that the LAN timings of
// docs/operations.md raise no false alarm on a loaded 2-core machine.
func TestSoakNoSpuriousFailover(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("COORDFLOW_SOAK"))
	if err != nil || d <= 0 {
		t.Skip("set COORDFLOW_SOAK to a duration (e.g. 10m) to run the soak test")
	}
	const rate = 5_000 // records a second
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
	in := newWordInput(110, rate*int(d/time.Second), 4)
	job := c.submitJob(t, failoverSpec(c.brokers(), "200ms"))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs, rate)
	first := c.waitCheckpointed(t, job)
	leader := c.coordinator(t, c.leader(t))
	st, err := c.status(leader)
	if err != nil {
		t.Fatal(err)
	}
	term := st.Term

	start := time.Now()
	checks := 0
	c.waitFor(t, d+time.Minute, fmt.Sprintf("%v of steady running", d), func() (bool, error) {
		checks++
		for _, cp := range c.coords {
			s, err := c.status(cp)
			if err != nil {
				return false, err
			}
			if s.Term != term || s.LeaderID != leader.id {
				t.Fatalf("%s: term %d, leader %q after %v; was term %d, leader %s: a spurious election",
					cp.id, s.Term, s.LeaderID, time.Since(start).Round(time.Second), term, leader.id)
			}
			var ms []memberView
			if err := c.call("GET", cp.httpAddr, "/v1/members", nil, &ms); err != nil {
				return false, err
			}
			for _, m := range ms {
				if m.Status != "alive" {
					t.Fatalf("%s sees %s %s after %v: a false failure detection", cp.id, m.ID, m.Status, time.Since(start).Round(time.Second))
				}
			}
		}
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		if j.Attempt != first.Attempt || j.Status != "running" {
			t.Fatalf("job at attempt %d, %s %q after %v: a spurious restart", j.Attempt, j.Status, j.Reason, time.Since(start).Round(time.Second))
		}
		for _, w := range []string{"w1", "w2"} {
			if n, err := c.workerMetric(t, w, "coordflow_worker_lease_expiries_total"); err != nil || n != 0 {
				t.Fatalf("%s: lease expiries %v (%v)", w, n, err)
			}
		}
		if time.Since(start) < d {
			return false, fmt.Errorf("%v so far, last checkpoint %d", time.Since(start).Round(time.Second), j.lastCheckpointID())
		}
		return true, nil
	})
	cps, err := c.getCheckpoints(leader.httpAddr, job)
	if err != nil {
		t.Fatal(err)
	}
	var aborted []string
	for _, cp := range cps {
		if cp.Status == "aborted" {
			aborted = append(aborted, fmt.Sprintf("%d: %s", cp.ID, cp.Reason))
		}
	}
	if len(aborted) > 0 {
		t.Errorf("checkpoints aborted while nothing failed: %s", strings.Join(aborted, "; "))
	}
	producerDone()
	c.checkExact(t, job, in.want)
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%v steady: %d checks, term %d throughout, attempt %d, %d checkpoints completed", d, checks, term, j.Attempt, j.lastCheckpointID())
}
