package integration

import (
	"fmt"
	"maps"
	"testing"
	"time"
)

// TestManyJobsThroughLeaderAndWorkerKill runs 200 jobs (one source and one
// map task each, a topic each) on one Raft group while input arrives, and
// SIGKILLs the Raft leader, then a worker. The leader kill restarts no task;
// the worker kill restarts the jobs it ran on the survivors; at the end every
// job's state counts its input exactly, key by key, and the coordinators'
// FSMs are equal.
func TestManyJobsThroughLeaderAndWorkerKill(t *testing.T) {
	if testing.Short() {
		t.Skip("200 jobs: not in -short")
	}
	const (
		jobs    = 200
		perJob  = 60 // records per job
		keys    = 6
		rateAll = 1000 // records a second, all jobs together
	)
	// Three workers with room for every task on any two of them.
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, slots: jobs, topics: manyTopics(jobs, 1)})
	specs := make([]jobSpec, jobs)
	for i := range specs {
		specs[i] = smallJobSpec(c.brokers(), fmt.Sprintf("many-%04d", i), manyTopic(i), 500*time.Millisecond)
	}
	ids := c.submitJobs(t, specs)
	before := c.waitJobsCheckpointed(t, 5*time.Minute, ids, nil)

	// Input for every job, interleaved, produced while the kills happen.
	want := make([]map[string]int64, jobs)
	var recs []record
	for r := range perJob {
		for j := range jobs {
			if want[j] == nil {
				want[j] = make(map[string]int64)
			}
			key := fmt.Sprintf("k%d", (r+j)%keys)
			want[j][key]++
			recs = append(recs, record{topic: manyTopic(j), key: key, value: "x", partition: 0})
		}
	}
	producing := produceInBackground(t, c.brokers(), manyTopic(0), recs, rateAll)

	// The leader: every job goes on checkpointing under the next one,
	// without a task restart.
	old := c.leader(t)
	last := lastCheckpoints(before)
	c.killCoordinator(t, old)
	if now := c.leader(t); now == old {
		t.Fatalf("leader %s still leads after its SIGKILL", old)
	}
	after := c.waitJobsCheckpointed(t, 2*time.Minute, ids, last)
	for _, id := range ids {
		if a, b := before[id].Attempt, after[id].Attempt; a != b {
			t.Errorf("job %s went from attempt %d to %d across the leader kill; tasks restarted", id, a, b)
		}
	}

	// A worker that runs tasks: its jobs restart on the other two.
	victim := after[ids[0]].Tasks[0].Worker
	onVictim := 0
	for _, id := range ids {
		for _, task := range after[id].Tasks {
			if task.Worker == victim {
				onVictim++
				break
			}
		}
	}
	t.Logf("killing worker %s, which runs tasks of %d jobs", victim, onVictim)
	c.killWorker(t, victim)
	producing()

	// Every job reaches the end of its topic, and counts each record once.
	end := make([]map[int32]int64, jobs)
	for j := range jobs {
		end[j] = topicEndOffsets(t, c.brokers(), manyTopic(j))
	}
	c.waitFor(t, 5*time.Minute, "every job's last checkpoint to cover its topic", func() (bool, error) {
		behind := 0
		example := ""
		for j, id := range ids {
			st, err := c.getJobState(t, id)
			if err != nil {
				return false, err
			}
			if got := st.Offsets[manyTopic(j)+"/0"]; got < end[j][0] {
				if behind++; example == "" {
					example = fmt.Sprintf("%s at %d of %d", id, got, end[j][0])
				}
			}
		}
		if behind > 0 {
			return false, fmt.Errorf("%d jobs behind, e.g. %s", behind, example)
		}
		return true, nil
	})
	for j, id := range ids {
		st := c.jobState(t, id)
		if !maps.Equal(st.Keyed, want[j]) {
			t.Errorf("job %s: state %v, want %v: %s", id, st.Keyed, want[j], diffCounts(st.Keyed, want[j]))
		}
	}
	final, err := c.listJobs(t)
	if err != nil {
		t.Fatal(err)
	}
	restarted := 0
	for _, id := range ids {
		if final[id].Attempt > after[id].Attempt {
			restarted++
		}
	}
	t.Logf("%d jobs restarted after the worker kill (%d had tasks on %s)", restarted, onVictim, victim)
	if restarted < onVictim {
		t.Errorf("%d jobs restarted, but %d had tasks on the killed worker", restarted, onVictim)
	}
	// Cancelled, the jobs stop writing, and every replica must come to the
	// same state.
	for _, id := range ids {
		if err := c.call("DELETE", c.api(t), "/v1/jobs/"+id, nil, nil); err != nil {
			t.Fatalf("cancel job %s: %v", id, err)
		}
	}
	c.waitFor(t, time.Minute, "the live coordinators' FSMs to be equal", c.sameLiveFSM)
}

// lastCheckpoints returns each job's last completed checkpoint id.
func lastCheckpoints(jobs map[string]jobView) map[string]uint64 {
	out := make(map[string]uint64, len(jobs))
	for id, j := range jobs {
		out[id] = j.lastCheckpointID()
	}
	return out
}
