package integration

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// TestWordcountSurvivesWorkerAndLeaderKill is the scenario of the issue: a
// wordcount job over a 4-partition topic keeps exactly-once state through the
// SIGKILL of a worker, then of the Raft leader, then a replacement worker;
// the killed coordinator rejoins with its data and ends with the same FSM as
// the others.
func TestWordcountSurvivesWorkerAndLeaderKill(t *testing.T) {
	const (
		partitions   = 4
		totalRecords = 200_000
		// Records produced before the job starts; the rest arrive at
		// producerRate while the scenario kills processes, so every failure
		// hits a job that is reading.
		firstRecords = 50_000
		producerRate = 10_000 // records a second
	)
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": partitions}})

	corpus := newCorpus(20261128)
	recs := make([]record, totalRecords)
	want := map[string]int64{}
	for i := range recs {
		line := corpus.line()
		recs[i] = record{key: fmt.Sprint(i), value: line, partition: int32(i % partitions)}
		for _, w := range strings.Fields(line) {
			want[w]++
		}
	}
	produce(t, c.brokers(), "words", recs[:firstRecords])

	spec := wordcountSpec(c.brokers(), "words")
	spec.Source.Parallelism = 2
	spec.Operator.Parallelism = 2
	spec.Checkpoint.Interval = "500ms"
	job := c.submitJob(t, spec)
	producerDone := produceInBackground(t, c.brokers(), "words", recs[firstRecords:], producerRate)
	progress := func(when string) {
		t.Helper()
		if st, err := c.getJobState(t, job); err == nil {
			end := topicEndOffsets(t, c.brokers(), "words")
			t.Logf("%s: last completed checkpoint %d has read %d of the %d records produced so far", when, st.CheckpointID, sumOffsets(st.Offsets), sumOffsets(end))
		}
	}

	var first jobView
	c.waitFor(t, 2*time.Minute, "a first completed checkpoint that has read records", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		first = j
		if j.lastCheckpointID() == 0 {
			return false, fmt.Errorf("job is %s (attempt %d) %s, no completed checkpoint", j.Status, j.Attempt, j.Reason)
		}
		st, err := c.getJobState(t, job)
		if err != nil {
			return false, err
		}
		return sumOffsets(st.Offsets) > 0, fmt.Errorf("checkpoint %d has read no record", st.CheckpointID)
	})

	// Worker lost: the job restarts from the last completed checkpoint. The
	// victim is a worker that runs tasks of the job.
	victim := "w1"
	if len(first.Tasks) > 0 && first.Tasks[0].Worker != "" {
		victim = first.Tasks[0].Worker
	}
	progress("before killing " + victim)
	c.killWorker(t, victim)
	var restarted jobView
	c.waitFor(t, time.Minute, "a new job attempt after "+victim+"'s death", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		restarted = j
		return j.Attempt > first.Attempt, fmt.Errorf("attempt %d, status %s %s", j.Attempt, j.Status, j.Reason)
	})
	ckptBefore := restarted.lastCheckpointID()
	c.waitFor(t, 2*time.Minute, "a completed checkpoint of the new attempt", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		restarted = j
		return j.Status == "running" && j.lastCheckpointID() > ckptBefore,
			fmt.Errorf("attempt %d is %s %s, last checkpoint %d", j.Attempt, j.Status, j.Reason, j.lastCheckpointID())
	})
	for _, task := range restarted.Tasks {
		if task.Worker == victim {
			t.Fatalf("attempt %d still places task %s on the dead worker %s", restarted.Attempt, task.ID, victim)
		}
	}

	// Leader lost: a new leader takes over the checkpoints.
	oldLeader := c.leader(t)
	progress("before killing the leader " + oldLeader)
	c.killCoordinator(t, oldLeader)
	newLeader := c.leader(t)
	if newLeader == oldLeader {
		t.Fatalf("the killed coordinator %s is still named leader", oldLeader)
	}
	t.Logf("leader %s killed; new leader %s", oldLeader, newLeader)

	c.startWorker(t, "w3")
	producerDone()
	end := topicEndOffsets(t, c.brokers(), "words")
	if n := sumOffsets(end); n != totalRecords {
		t.Fatalf("words holds %d records after producing %d: the producer is not exactly-once", n, totalRecords)
	}
	progress("all input produced")

	final := c.waitCaughtUp(t, 5*time.Minute, job, "words", end)
	if j, err := c.getJob(t, job); err == nil {
		t.Logf("caught up at checkpoint %d; job attempt %d (after the worker kill: %d), status %s", final.CheckpointID, j.Attempt, restarted.Attempt, j.Status)
	}
	if diff := diffCounts(final.Keyed, want); diff != "" {
		t.Fatalf("checkpoint %d's state differs from the counts of the input:\n%s", final.CheckpointID, diff)
	}

	// The killed coordinator rejoins as a follower and converges.
	c.restartCoordinator(t, oldLeader)
	c.waitFor(t, 2*time.Minute, "restarted coordd "+oldLeader+" to be a follower with the others' FSM digest", func() (bool, error) {
		st, err := c.status(c.coordinator(t, oldLeader))
		if err != nil {
			return false, err
		}
		if st.State != "Follower" {
			return false, fmt.Errorf("%s is %s", oldLeader, st.State)
		}
		return c.sameFSM()
	})

	// No input arrived since: later checkpoints hold the same counts.
	if st := c.jobState(t, job); st.CheckpointID < final.CheckpointID {
		t.Fatalf("last completed checkpoint went back from %d to %d", final.CheckpointID, st.CheckpointID)
	} else if diff := diffCounts(st.Keyed, want); diff != "" {
		t.Fatalf("checkpoint %d, taken with no new input after %d, differs from the counts of the input:\n%s", st.CheckpointID, final.CheckpointID, diff)
	}
}

// corpus generates the wordcount input: lines of 0 to 12 words from a fixed
// vocabulary of 500 words, Zipf-distributed so that a few keys are hot, with
// the odd tab, double space, leading or trailing blank and empty line. It is
// deterministic for a seed, so expected counts need no read-back.
type corpus struct {
	vocab []string
	rng   *rand.Rand
	zipf  *rand.Zipf
}

func newCorpus(seed uint64) *corpus {
	// Two-letter syllables make distinct concatenations: every word is unique.
	var syllables []string
	for _, cons := range "bdfgklmnprst" {
		for _, vow := range "ao" {
			syllables = append(syllables, string(cons)+string(vow))
		}
	}
	vocab := []string{"Über", "café", "naïve", "x", "a-b", "it's", "C++", "50%", "#tag", "{}", `"q"`, `back\slash`}
	for i := 0; len(vocab) < 500; i++ {
		w := syllables[i%len(syllables)] + syllables[(i/len(syllables))%len(syllables)]
		if i >= len(syllables)*len(syllables) {
			w += syllables[i/(len(syllables)*len(syllables))]
		}
		vocab = append(vocab, w)
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return &corpus{vocab: vocab, rng: rng, zipf: rand.NewZipf(rng, 1.1, 2, uint64(len(vocab)-1))}
}

// line returns the next line of text.
func (c *corpus) line() string {
	if c.rng.IntN(200) == 0 {
		return ""
	}
	n := 1 + c.rng.IntN(12)
	var b strings.Builder
	if c.rng.IntN(50) == 0 {
		b.WriteString(" ")
	}
	for i := range n {
		if i > 0 {
			switch c.rng.IntN(50) {
			case 0:
				b.WriteString("\t")
			case 1:
				b.WriteString("  ")
			default:
				b.WriteString(" ")
			}
		}
		b.WriteString(c.vocab[c.zipf.Uint64()])
	}
	if c.rng.IntN(50) == 0 {
		b.WriteString(" ")
	}
	return b.String()
}
