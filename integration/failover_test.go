package integration

// Failover scenarios (issue 3): each test kills, stops or freezes real
// processes while a wordcount job reads a steady stream, and ends by
// comparing the job's final keyed state with the input, word by word.

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// wordInput is a deterministic wordcount input over the partitions of a
// topic and the count of every word in it.
type wordInput struct {
	recs []record
	want map[string]int64
}

// newWordInput returns n lines from a corpus seeded with seed, dealt round
// robin over partitions.
func newWordInput(seed uint64, n int, partitions int32) wordInput {
	corpus := newCorpus(seed)
	in := wordInput{recs: make([]record, n), want: map[string]int64{}}
	for i := range in.recs {
		line := corpus.line()
		in.recs[i] = record{key: fmt.Sprint(i), value: line, partition: int32(i) % partitions}
		for _, w := range strings.Fields(line) {
			in.want[w]++
		}
	}
	return in
}

// failoverSpec is the wordcount job of these tests: parallelism 2 and 2,
// checkpoints every interval, restarts backing off from 100 ms to 1 s.
func failoverSpec(brokers []string, interval string) jobSpec {
	spec := wordcountSpec(brokers, "words")
	spec.Checkpoint.Interval = interval
	spec.Restart = &restartSpec{Initial: "100ms", Max: "1s", ResetAfter: "10m"}
	return spec
}

// waitCheckpointed waits until job runs and has a completed checkpoint that
// has read records, and returns the job.
func (c *cluster) waitCheckpointed(t *testing.T, job string) jobView {
	t.Helper()
	return c.waitJob(t, 2*time.Minute, job, "job "+job+" running with a checkpoint that has read records", func(j jobView) error {
		if j.Status != "running" || j.lastCheckpointID() == 0 {
			return errors.New("not running with a completed checkpoint")
		}
		st, err := c.getJobState(t, job)
		if err != nil {
			return err
		}
		if sumOffsets(st.Offsets) == 0 {
			return fmt.Errorf("checkpoint %d has read no record", st.CheckpointID)
		}
		return nil
	})
}

// checkExact waits until the job's last completed checkpoint has read all of
// topic and compares its state with want.
func (c *cluster) checkExact(t *testing.T, job string, want map[string]int64) {
	t.Helper()
	end := topicEndOffsets(t, c.brokers(), "words")
	final := c.waitCaughtUp(t, 2*time.Minute, job, "words", end)
	if diff := diffCounts(final.Keyed, want); diff != "" {
		t.Fatalf("checkpoint %d's state differs from the counts of the input:\n%s", final.CheckpointID, diff)
	}
	t.Logf("checkpoint %d counts every word of the %d records exactly once", final.CheckpointID, sumOffsets(end))
}

// workersOf returns the workers the job's tasks are placed on, sorted.
func workersOf(j jobView) []string {
	var ws []string
	for _, task := range j.Tasks {
		if !slices.Contains(ws, task.Worker) {
			ws = append(ws, task.Worker)
		}
	}
	slices.Sort(ws)
	return ws
}

// pauseUntilPending pauses worker, which runs tasks of job, right after one
// of the job's checkpoints has completed, and then waits until the leader
// triggers the next one: a checkpoint that cannot complete while the worker
// is paused. It returns that checkpoint's id, the worker still paused. The
// leader triggers a checkpoint no sooner than interval after the previous
// trigger, so pausing early in that interval leaves no trigger in flight; the
// pause lasts under one interval, well below gossip's failure detection.
func (c *cluster) pauseUntilPending(t *testing.T, job, worker string, leader *coordProc, interval time.Duration) uint64 {
	t.Helper()
	const poll = 5 * time.Millisecond // poll fast: this wait decides how long a worker stays frozen
	checkpoints := func() []checkpointView {
		t.Helper()
		cps, err := c.getCheckpoints(leader.httpAddr, job)
		if err != nil {
			t.Fatal(err)
		}
		return cps
	}
	deadline := time.Now().Add(30 * time.Second)
	var completed uint64
	for completed == 0 {
		if cps := checkpoints(); len(cps) > 0 && cps[0].Status == "completed" {
			triggered, err := time.Parse(time.RFC3339Nano, cps[0].TriggerTime)
			if err != nil {
				t.Fatalf("checkpoint %d: trigger time %q: %v", cps[0].ID, cps[0].TriggerTime, err)
			}
			if time.Until(triggered.Add(interval)) > interval/3 {
				c.pauseWorker(t, worker)
				completed = cps[0].ID
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("found no moment early in a checkpoint interval to pause %s within 30s", worker)
		}
		time.Sleep(poll)
	}
	pausedAt := time.Now()
	for {
		cps := checkpoints()
		if cps[0].Status == "pending" && cps[0].ID > completed {
			t.Logf("checkpoint %d pending %v after pausing %s", cps[0].ID, time.Since(pausedAt).Round(time.Millisecond), worker)
			return cps[0].ID
		}
		if time.Since(pausedAt) > 5*interval {
			t.Fatalf("no checkpoint above %d pending within %v of pausing %s: %+v", completed, 5*interval, worker, cps[:min(3, len(cps))])
		}
		time.Sleep(poll)
	}
}

// TestLeaderKillKeepsTasksRunning: SIGKILL of the Raft leader while a
// checkpoint is pending restarts no task. The job keeps its attempt, the new
// leader aborts its predecessor's pending checkpoint as "leader changed" and
// completes the next ones with higher ids, and the final state counts every
// word exactly once.
func TestLeaderKillKeepsTasksRunning(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
	in := newWordInput(101, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	const interval = 300 * time.Millisecond
	job := c.submitJob(t, failoverSpec(c.brokers(), interval.String()))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[20_000:], 10_000)
	before := c.waitCheckpointed(t, job)

	// Freeze a worker of the job so that the next checkpoint stays pending,
	// and kill the leader while it is.
	oldLeader := c.coordinator(t, c.leader(t))
	victim := before.Tasks[0].Worker
	pending := c.pauseUntilPending(t, job, victim, oldLeader, interval)
	c.killCoordinator(t, oldLeader.id)
	c.resumeWorker(t, victim)
	t.Logf("killed leader %s with checkpoint %d pending (attempt %d)", oldLeader.id, pending, before.Attempt)

	newLeader := c.coordinator(t, c.leader(t))
	sameAttempt := func(j jobView) error {
		if j.Attempt != before.Attempt || j.Restarts != before.Restarts {
			t.Fatalf("the leader change restarted the job: attempt %d (%d restarts), was %d (%d restarts); reason %q",
				j.Attempt, j.Restarts, before.Attempt, before.Restarts, j.Reason)
		}
		return nil
	}
	c.waitFor(t, 30*time.Second, fmt.Sprintf("checkpoint %d aborted as \"leader changed\"", pending), func() (bool, error) {
		cps, err := c.getCheckpoints(newLeader.httpAddr, job)
		if err != nil {
			return false, err
		}
		for _, cp := range cps {
			if cp.ID == pending {
				if cp.Status == "aborted" && cp.Reason == "leader changed" {
					return true, nil
				}
				if cp.Status == "completed" {
					t.Fatalf("checkpoint %d, pending when its leader died, was completed", pending)
				}
				return false, fmt.Errorf("checkpoint %d is %s %q", cp.ID, cp.Status, cp.Reason)
			}
		}
		return false, fmt.Errorf("checkpoint %d not listed", pending)
	})
	c.waitJob(t, 30*time.Second, job, "three checkpoints completed by the new leader "+newLeader.id, func(j jobView) error {
		if err := sameAttempt(j); err != nil {
			return err
		}
		if j.lastCheckpointID() < pending+3 {
			return fmt.Errorf("last checkpoint %d, want at least %d", j.lastCheckpointID(), pending+3)
		}
		return nil
	})

	producerDone()
	c.checkExact(t, job, in.want)
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if err := sameAttempt(j); err != nil {
		t.Fatal(err)
	}
	cps, err := c.getCheckpoints(newLeader.httpAddr, job)
	if err != nil {
		t.Fatal(err)
	}
	for _, cp := range cps {
		if cp.Status == "completed" && cp.Attempt != before.Attempt {
			t.Errorf("checkpoint %d completed for attempt %d, want %d", cp.ID, cp.Attempt, before.Attempt)
		}
	}
	text, err := c.coordMetrics(newLeader)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := metricSum(text, "coordflow_job_restarts_total"); n != 0 {
		t.Errorf("the new leader restarted jobs %v times, want 0", n)
	}
	c.waitFor(t, 30*time.Second, "the live coordinators to hold the same FSM", c.sameLiveFSM)
}

// TestWorkerLossLeftAndDead: a worker stopped cleanly marks itself leaving
// and shows as "left"; a worker killed shows as "dead", and the leader,
// seeing its control session break and its ports refuse connections,
// restarts the job at once, before gossip declares it dead.
// Each loss restarts the job from its last checkpoint on the workers left,
// and the final state is exact.
func TestWorkerLossLeftAndDead(t *testing.T) {
	// Six slots each: the job's six tasks fit on the last worker left.
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, slots: 6, topics: map[string]int32{"words": 4}})
	in := newWordInput(102, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:15_000])
	// Three sources and three map tasks: source i and map task i share a
	// worker, so the job needs three pairs to run on all three.
	spec := failoverSpec(c.brokers(), "300ms")
	spec.Source.Parallelism, spec.Operator.Parallelism = 3, 3
	job := c.submitJob(t, spec)
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[15_000:], 10_000)
	first := c.waitCheckpointed(t, job)
	if got := workersOf(first); !slices.Equal(got, []string{"w1", "w2", "w3"}) {
		t.Fatalf("attempt %d runs on %v, want tasks on each of w1, w2, w3", first.Attempt, got)
	}

	c.stopWorker(t, "w3")
	c.waitFor(t, 10*time.Second, "w3 to show as left", func() (bool, error) { return c.memberStatusIs("w3", "left") })
	second := c.waitJob(t, time.Minute, job, "a new attempt without w3, checkpointing", func(j jobView) error {
		if err := j.recoveredSince(first); err != nil {
			return err
		}
		if slices.Contains(workersOf(j), "w3") {
			return fmt.Errorf("attempt %d places tasks on w3, which left", j.Attempt)
		}
		return nil
	})

	leader := c.coordinator(t, c.leader(t))
	killedAt := time.Now()
	c.killWorker(t, "w1")
	// Its session breaks and its ports refuse connections: the leader
	// knows its process is gone and restarts the job at once, without
	// waiting for gossip to declare it dead.
	restarted := c.waitJob(t, 10*time.Second, job, "a new attempt after w1's SIGKILL", func(j jobView) error {
		if j.Attempt <= second.Attempt {
			return errors.New("not restarted yet")
		}
		return nil
	})
	t.Logf("job restarted %v after w1's SIGKILL", time.Since(killedAt).Round(time.Millisecond))
	// Whichever notices first names the reason: the leader finding w1's
	// ports refused, or a task on w2 whose data channel to w1 broke.
	if len(restarted.Attempts) == 0 || restarted.Attempts[0].Attempt != restarted.Attempt ||
		!(strings.Contains(restarted.Attempts[0].Reason, "worker w1 of task") && strings.Contains(restarted.Attempts[0].Reason, "ports refuse connections") ||
			strings.Contains(restarted.Attempts[0].Reason, "failed on worker w2")) {
		t.Errorf("attempt %d started for %+v, want w1's refused ports (or a task of w2 losing w1) as the reason", restarted.Attempt, restarted.Attempts)
	}
	c.waitFor(t, 10*time.Second, "w1 to show as dead", func() (bool, error) { return c.memberStatusIs("w1", "dead") })
	t.Logf("w1 declared dead by gossip %v after its SIGKILL", time.Since(killedAt).Round(time.Millisecond))
	c.waitFor(t, 10*time.Second, "the leader to log that w1's process is gone", func() (bool, error) {
		log := c.coordLog(t, leader.id)
		for line := range strings.Lines(log) {
			if strings.Contains(line, "worker process gone") && strings.Contains(line, "worker=w1") {
				return true, nil
			}
		}
		return false, errors.New("no line for w1's refused ports in the leader's log")
	})
	text, err := c.coordMetrics(leader)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := metricSum(text, `coordflow_worker_probes_total{result="refused"}`); n < 1 {
		t.Errorf("coordflow_worker_probes_total{result=\"refused\"} = %v, want at least 1", n)
	}
	c.waitJob(t, time.Minute, job, "a new attempt on w2 alone, checkpointing", func(j jobView) error {
		if err := j.recoveredSince(second); err != nil {
			return err
		}
		if got := workersOf(j); !slices.Equal(got, []string{"w2"}) {
			return fmt.Errorf("attempt %d runs on %v", j.Attempt, got)
		}
		return nil
	})

	producerDone()
	c.checkExact(t, job, in.want)
}

// TestFrozenWorkerIsFenced: a worker frozen with SIGSTOP past failure
// detection loses its tasks to a new attempt on the other worker. Resumed
// with SIGCONT, it runs its old attempt's tasks for a moment: none of their
// acks or state is accepted (the leader drops them as stale; the final state
// is exact), and the worker stops them on its own.
func TestFrozenWorkerIsFenced(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 1, topics: map[string]int32{"words": 4},
		coordFlags: []string{"-worker-lease", "2s", "-worker-heartbeat", "200ms"}})
	in := newWordInput(103, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:15_000])
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	first := c.waitCheckpointed(t, job)
	if got := workersOf(first); !slices.Equal(got, []string{"w1"}) {
		t.Fatalf("attempt %d runs on %v, want w1 alone", first.Attempt, got)
	}
	c.startWorker(t, "w2") // the standby
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[15_000:], 10_000)

	leader := c.coordinator(t, c.leader(t))
	c.pauseWorker(t, "w1")
	pausedAt := time.Now()
	c.waitFor(t, 15*time.Second, "the frozen w1 to be declared dead", func() (bool, error) { return c.memberStatusIs("w1", "dead") })
	restarted := c.waitJob(t, time.Minute, job, "a new attempt on w2, checkpointing", func(j jobView) error {
		if err := j.recoveredSince(first); err != nil {
			return err
		}
		if got := workersOf(j); !slices.Equal(got, []string{"w2"}) {
			return fmt.Errorf("attempt %d runs on %v", j.Attempt, got)
		}
		return nil
	})
	c.resumeWorker(t, "w1")
	t.Logf("w1 was frozen for %v (lease 2s)", time.Since(pausedAt).Round(time.Millisecond))

	c.waitFor(t, 15*time.Second, "w1 to be alive again and run no task", func() (bool, error) {
		if ok, err := c.memberStatusIs("w1", "alive"); !ok {
			return false, err
		}
		n, err := c.workerMetric(t, "w1", "coordflow_worker_tasks")
		if err != nil {
			return false, err
		}
		return n == 0, fmt.Errorf("w1 runs %v tasks", n)
	})
	producerDone()
	c.checkExact(t, job, in.want)

	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if j.Attempt != restarted.Attempt || !slices.Equal(workersOf(j), []string{"w2"}) {
		t.Errorf("after w1 came back the job is at attempt %d on %v, want attempt %d on w2", j.Attempt, workersOf(j), restarted.Attempt)
	}
	if n, err := c.workerMetric(t, "w1", "coordflow_worker_tasks"); err != nil || n != 0 {
		t.Errorf("w1 runs %v tasks (%v), want 0", n, err)
	}
	cps, err := c.getCheckpoints(leader.httpAddr, job)
	if err != nil {
		t.Fatal(err)
	}
	for _, cp := range cps {
		if cp.Status == "completed" && cp.Attempt != restarted.Attempt && cp.ID > restarted.lastCheckpointID() {
			t.Errorf("checkpoint %d completed for the old attempt %d after the restart", cp.ID, cp.Attempt)
		}
	}
	text, err := c.coordMetrics(leader)
	if err != nil {
		t.Fatal(err)
	}
	fenced, _ := metricSum(text, "coordflow_fenced_messages_total")
	t.Logf("the leader dropped %v messages of the old attempt", fenced)
	stale := 0
	for line := range strings.Lines(c.coordLog(t, leader.id)) {
		if strings.Contains(line, "of a stale attempt") && strings.Contains(line, "worker=w1") {
			stale++
		}
	}
	if float64(stale) < fenced {
		t.Errorf("the leader logged %d stale messages of w1, but counted %v", stale, fenced)
	}
}

// TestWorkerGossipCallsDeadWhileItsSessionHolds: a worker frozen (SIGSTOP)
// until gossip declares it dead, and resumed well within its control
// session's silence limit, keeps its tasks: the leader overrules gossip
// while the session is live, so the job neither restarts nor loses or
// doubles a record, and the leader logs and counts the overruled verdict.
// memberlist's probes (100 ms timeouts) miss live workers on a saturated
// machine; before, each miss restarted every job of the worker.
func TestWorkerGossipCallsDeadWhileItsSessionHolds(t *testing.T) {
	// Heartbeats every 3 s: the leader ends a session after 4 missed ones
	// (12 s), far past the second or so gossip takes to declare a frozen
	// worker dead; the workers' lease (30 s) is longer still.
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4},
		coordFlags: []string{"-worker-lease", "30s", "-worker-heartbeat", "3s"}})
	in := newWordInput(105, 40_000, 4)
	produce(t, c.brokers(), "words", in.recs[:15_000])
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	first := c.waitCheckpointed(t, job)
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[15_000:], 10_000)

	w := workersOf(first)[0]
	leader := c.coordinator(t, c.leader(t))
	c.pauseWorker(t, w)
	pausedAt := time.Now()
	c.waitFor(t, 10*time.Second, "gossip to declare the frozen "+w+" dead", func() (bool, error) { return c.memberStatusIs(w, "dead") })
	c.resumeWorker(t, w)
	t.Logf("%s frozen for %v, until gossip declared it dead", w, time.Since(pausedAt).Round(time.Millisecond))

	resumed, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, 15*time.Second, w+" to be alive in gossip again", func() (bool, error) { return c.memberStatusIs(w, "alive") })
	c.waitJob(t, time.Minute, job, "a checkpoint of the same attempt after the freeze", func(j jobView) error {
		if j.Attempt != first.Attempt {
			return fmt.Errorf("attempt %d, not %d: %+v", j.Attempt, first.Attempt, j.Attempts)
		}
		if j.lastCheckpointID() <= resumed.lastCheckpointID() {
			return errors.New("no checkpoint completed since the freeze")
		}
		return nil
	})
	producerDone()
	c.checkExact(t, job, in.want)

	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if j.Attempt != first.Attempt || !slices.Equal(workersOf(j), workersOf(first)) {
		t.Errorf("the job is at attempt %d on %v, want attempt %d on %v: gossip's verdict restarted it", j.Attempt, workersOf(j), first.Attempt, workersOf(first))
	}
	if c.leader(t) == leader.id {
		text, err := c.coordMetrics(leader)
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := metricSum(text, "coordflow_worker_dead_overruled_total"); n < 1 {
			t.Errorf("the leader counted %v overruled gossip deaths, want at least 1", n)
		}
		if !strings.Contains(c.coordLog(t, leader.id), "gossip says the worker is dead, but its control session still hears from it") {
			t.Errorf("the leader did not log the overruled gossip death of %s", w)
		}
	}
}

// TestWorkersStopTasksWithoutCoordinators: with every coordinator frozen,
// no worker reaches a coordinator, and each stops its tasks once its lease
// has run out, not before. When the coordinators are back the job restarts
// from its last checkpoint and the final state is exact.
func TestWorkersStopTasksWithoutCoordinators(t *testing.T) {
	const lease = 2 * time.Second
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4},
		coordFlags: []string{"-worker-lease", lease.String(), "-worker-heartbeat", "200ms"}})
	in := newWordInput(104, 40_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	before := c.waitCheckpointed(t, job)

	coords := slices.Clone(c.coords)
	for _, cp := range coords {
		c.pauseCoordinator(t, cp.id)
	}
	pausedAt := time.Now()
	c.waitFor(t, lease+10*time.Second, "both workers to stop their tasks", func() (bool, error) {
		for _, w := range []string{"w1", "w2"} {
			n, err := c.workerMetric(t, w, "coordflow_worker_tasks")
			if err != nil {
				return false, err
			}
			if n != 0 {
				return false, fmt.Errorf("%s runs %v tasks", w, n)
			}
		}
		return true, nil
	})
	if stopped := time.Since(pausedAt); stopped < lease-300*time.Millisecond {
		t.Fatalf("workers stopped their tasks %v after the coordinators froze, before their %v lease ran out", stopped, lease)
	}
	for _, w := range []string{"w1", "w2"} {
		if n, err := c.workerMetric(t, w, "coordflow_worker_lease_expiries_total"); err != nil || n < 1 {
			t.Errorf("%s: lease expiries %v (%v), want at least 1", w, n, err)
		}
	}

	for _, cp := range coords {
		c.resumeCoordinator(t, cp.id)
	}
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[20_000:], 10_000)
	c.waitJob(t, time.Minute, job, "a new attempt after the lease expiries, checkpointing", func(j jobView) error {
		return j.recoveredSince(before)
	})
	producerDone()
	c.checkExact(t, job, in.want)
}

// TestQuorumLossKeepsTasksRunning: with two of three coordinators killed,
// writes are refused with an error that says there is no leader; the
// workers, whose leases the surviving coordinator renews, keep their tasks
// running and keep reading, while no checkpoint completes. When the two are
// back with their data, checkpoints resume without a restart (same attempt)
// and the final state is exact.
func TestQuorumLossKeepsTasksRunning(t *testing.T) {
	const lease = 2 * time.Second
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4},
		coordFlags: []string{"-worker-lease", lease.String(), "-worker-heartbeat", "200ms"}})
	in := newWordInput(105, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	spec := failoverSpec(c.brokers(), "300ms")
	job := c.submitJob(t, spec)
	before := c.waitCheckpointed(t, job)

	leader := c.leader(t)
	var survivor *coordProc
	var killed []string
	for _, cp := range c.coords {
		if cp.id != leader && survivor == nil {
			survivor = cp
			continue
		}
		killed = append(killed, cp.id)
	}
	// The survivor learns that a checkpoint committed with the leader's
	// next message: wait until it has applied one, or it may be left
	// without any (seen in CI).
	c.waitFor(t, 10*time.Second, survivor.id+" to have applied a completed checkpoint", func() (bool, error) {
		var j jobView
		if err := c.call("GET", survivor.httpAddr, "/v1/jobs/"+job, nil, &j); err != nil {
			return false, err
		}
		return j.lastCheckpointID() >= before.lastCheckpointID(), fmt.Errorf("%s has applied checkpoint %d, not yet %d", survivor.id, j.lastCheckpointID(), before.lastCheckpointID())
	})
	for _, id := range killed {
		c.killCoordinator(t, id)
	}
	lostAt := time.Now()
	c.waitFor(t, 10*time.Second, survivor.id+" to know no leader", func() (bool, error) {
		st, err := c.status(survivor)
		if err != nil {
			return false, err
		}
		return st.LeaderID == "", fmt.Errorf("%s names leader %q", survivor.id, st.LeaderID)
	})

	_, err := c.postJob(survivor.httpAddr, spec)
	var apiErr *apiError
	if !errors.As(err, &apiErr) || apiErr.status != http.StatusServiceUnavailable ||
		!strings.Contains(apiErr.message, "no leader") || !strings.Contains(apiErr.message, "quorum") {
		t.Fatalf("POST /v1/jobs without quorum: %v; want 503 saying there is no leader and no quorum", err)
	}
	t.Logf("write refused: %v", apiErr)

	// Without a leader the survivor serves reads only when asked for stale
	// ones (Consul's convention): its state is as old as its last contact.
	staleState := func() stateView {
		t.Helper()
		var st stateView
		if err := c.call("GET", survivor.httpAddr, "/v1/jobs/"+job+"/state?stale=true", nil, &st); err != nil {
			t.Fatalf("stale read of job %s on %s: %v", job, survivor.id, err)
		}
		return st
	}
	frozen := staleState().CheckpointID
	readBefore := c.sourceRecordsIn(t)
	produce(t, c.brokers(), "words", in.recs[20_000:40_000])
	// Hold the outage for three leases, checking all along that the tasks
	// run on, renewed by the survivor, and that no checkpoint completes.
	c.waitFor(t, 3*lease+30*time.Second, "three leases without quorum, tasks running", func() (bool, error) {
		for _, w := range []string{"w1", "w2"} {
			if n, err := c.workerMetric(t, w, "coordflow_worker_lease_expiries_total"); err != nil || n != 0 {
				t.Fatalf("%s: lease expiries %v (%v) without quorum, want 0", w, n, err)
			}
		}
		tasks := 0.0
		for _, w := range []string{"w1", "w2"} {
			n, err := c.workerMetric(t, w, "coordflow_worker_tasks")
			if err != nil {
				return false, err
			}
			tasks += n
		}
		if tasks != float64(len(before.Tasks)) {
			t.Fatalf("workers run %v tasks without quorum, want %d", tasks, len(before.Tasks))
		}
		if id := staleState().CheckpointID; id != frozen {
			t.Fatalf("checkpoint %d completed without quorum (last was %d)", id, frozen)
		}
		if since := time.Since(lostAt); since < 3*lease {
			return false, fmt.Errorf("%v without quorum", since.Round(time.Millisecond))
		}
		for _, w := range []string{"w1", "w2"} {
			if n, err := c.workerMetric(t, w, "coordflow_worker_leaderless"); err != nil || n != 1 {
				return false, fmt.Errorf("%s: not held by the leaderless %s (%v, %v)", w, survivor.id, n, err)
			}
		}
		if read := c.sourceRecordsIn(t); read <= readBefore {
			return false, fmt.Errorf("sources have read no record without quorum (%v)", read)
		}
		return true, nil
	})

	// Three leases (6 s) exceed -max-stale (5 s): a plain read is refused.
	if err := c.call("GET", survivor.httpAddr, "/v1/jobs/"+job+"/state", nil, nil); !errors.As(err, &apiErr) || apiErr.status != http.StatusServiceUnavailable {
		t.Errorf("a read without ?stale=true on %s, leaderless for %v: %v; want 503", survivor.id, time.Since(lostAt).Round(time.Millisecond), err)
	}
	for _, id := range killed {
		c.restartCoordinator(t, id)
	}
	c.leader(t)
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[40_000:], 10_000)
	c.waitJob(t, time.Minute, job, "checkpoints to resume with the same attempt", func(j jobView) error {
		if j.Attempt != before.Attempt || j.Restarts != before.Restarts {
			t.Fatalf("the job restarted: attempt %d, was %d (reason %q)", j.Attempt, before.Attempt, j.Reason)
		}
		if j.lastCheckpointID() <= frozen {
			return errors.New("no checkpoint since quorum came back")
		}
		return nil
	})
	producerDone()
	c.checkExact(t, job, in.want)
	if j, err := c.getJob(t, job); err != nil || j.Attempt != before.Attempt {
		t.Errorf("job at attempt %d (%v), want %d: tasks were restarted", j.Attempt, err, before.Attempt)
	}
	c.waitFor(t, time.Minute, "every coordinator to hold the same FSM", c.sameLiveFSM)
}

// sourceRecordsIn returns how many records the source tasks of all running,
// unpaused workers have read.
func (c *cluster) sourceRecordsIn(t *testing.T) float64 {
	t.Helper()
	var sum float64
	for _, w := range c.workers {
		if w.p == nil || w.p.hasExited() || w.p.paused.Load() {
			continue
		}
		text, err := c.workerMetrics(w)
		if err != nil {
			t.Fatalf("metrics of %s: %v", w.id, err)
		}
		for line := range strings.Lines(text) {
			if strings.HasPrefix(line, "coordflow_records_in_total{") && strings.Contains(line, `kind="source"`) {
				n, _ := metricSum(line, "coordflow_records_in_total")
				sum += n
			}
		}
	}
	return sum
}

// TestJobWaitsForSlots: a job that needs more slots than the workers have
// waits in "pending" with the reason, and starts when a worker joins.
func TestJobWaitsForSlots(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, topics: map[string]int32{"words": 4}})
	c.startWorkerWith(t, "w1", 2)
	in := newWordInput(106, 20_000, 4)
	produce(t, c.brokers(), "words", in.recs)
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	c.waitJob(t, 30*time.Second, job, "the job to wait for slots", func(j jobView) error {
		if j.Status != "pending" || j.Reason != "waiting for 4 free slots (2 free)" {
			return errors.New(`want pending "waiting for 4 free slots (2 free)"`)
		}
		return nil
	})
	c.startWorkerWith(t, "w2", 2)
	j := c.waitCheckpointed(t, job)
	if got := workersOf(j); !slices.Equal(got, []string{"w1", "w2"}) {
		t.Errorf("attempt %d runs on %v, want w1 and w2", j.Attempt, got)
	}
	c.checkExact(t, job, in.want)
}

// TestBrokerLossFailsAndRecovers: with the broker killed, the job's sources
// fail and the job shows "failing" with the reason; when devkafka restarts on
// its data dir the job recovers by itself, and the final state is exact.
func TestBrokerLossFailsAndRecovers(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4},
		workerFlags: []string{"-kafka-timeout", "2s"}})
	in := newWordInput(107, 40_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	before := c.waitCheckpointed(t, job)

	c.killBroker(t)
	c.waitJob(t, time.Minute, job, "the job to be failing for the lost broker", func(j jobView) error {
		if j.Status != "failing" || !strings.Contains(j.Reason, "unreachable") {
			return errors.New(`want failing, with "unreachable" in the reason`)
		}
		t.Logf("job failing: %s", j.Reason)
		return nil
	})
	c.restartBroker(t)
	produce(t, c.brokers(), "words", in.recs[20_000:])
	c.waitJob(t, time.Minute, job, "the job to recover by itself", func(j jobView) error {
		return j.recoveredSince(before)
	})
	c.checkExact(t, job, in.want)
}

// TestSourceTopicDeletedFailsAndRecovers: deleting the source topic fails the
// job with the reason; once the topic is recreated the job recovers by
// itself, reading the new topic from its start (the checkpoint's offsets are
// beyond its end), and counts the old and the new records exactly once.
func TestSourceTopicDeletedFailsAndRecovers(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4},
		workerFlags: []string{"-kafka-timeout", "2s"}})
	old := newWordInput(108, 20_000, 4)
	produce(t, c.brokers(), "words", old.recs)
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	c.waitCheckpointed(t, job)
	c.checkExact(t, job, old.want)
	before, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}

	deleteTopic(t, c.brokers(), "words")
	c.waitJob(t, time.Minute, job, "the job to be failing for the missing topic", func(j jobView) error {
		if j.Status != "failing" || !strings.Contains(j.Reason, `source topic "words" does not exist`) {
			return errors.New(`want failing, with "source topic \"words\" does not exist" in the reason`)
		}
		t.Logf("job failing: %s", j.Reason)
		return nil
	})
	createTopic(t, c.brokers(), "words", 4)
	c.waitJob(t, time.Minute, job, "the job to recover on the recreated topic", func(j jobView) error {
		return j.recoveredSince(before)
	})
	fresh := newWordInput(109, 20_000, 4)
	produce(t, c.brokers(), "words", fresh.recs)
	want := maps.Clone(old.want)
	for w, n := range fresh.want {
		want[w] += n
	}
	c.checkExact(t, job, want)
}
