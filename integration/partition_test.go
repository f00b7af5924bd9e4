package integration

// Real network partitions (issue 8): every process runs in a network
// namespace of its own (harness_netns_test.go) and the tests cut links with
// blackhole routes, TCP and UDP alike, while a wordcount job reads a steady
// stream. Each ends by comparing the job's keyed state with the input, word
// by word, and checks every checkpoint the job completed, as a watcher saw
// them through the checkpoints API.

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// partitionSpec is the wordcount job of these tests: checkpoints every
// 300 ms, ten retained so that the checkpoint watcher sees every completed
// one even when a poll is slow.
func partitionSpec(brokers []string) jobSpec {
	spec := failoverSpec(brokers, "300ms")
	spec.Checkpoint.Retained = 10
	return spec
}

// TestPartitionWorkerFromCoordinators: a worker cut off from all three
// coordinators, but not from Kafka nor from the other worker, stops its
// tasks once its lease runs out; the leader restores its tasks alone on the
// other worker (task-scoped recovery), whose own tasks run on; no checkpoint completes with the cut worker's acks after the cut,
// and the state is exact. After healing, the worker comes back without
// tasks, nothing it sends is accepted, and the state stays exact with more
// input.
func TestPartitionWorkerFromCoordinators(t *testing.T) {
	const lease, heartbeat = 2 * time.Second, 200 * time.Millisecond
	// ackSlack allows for an ack that reached the leader's socket before
	// the cut and its loop just after.
	const ackSlack = 500 * time.Millisecond
	nw := newTestNet(t, "devkafka", "c1", "c2", "c3", "w1", "w2")
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}, net: nw,
		coordFlags: []string{"-worker-lease", lease.String(), "-worker-heartbeat", heartbeat.String()}})
	nw.checkProcesses(t, c)
	in := newWordInput(121, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	job := c.submitJob(t, partitionSpec(c.brokers()))
	watch := c.watchCheckpoints(t, job)
	before := c.waitCheckpointed(t, job)
	if got := workersOf(before); !slices.Equal(got, []string{"w1", "w2"}) {
		t.Fatalf("attempt %d runs on %v, want tasks on both w1 and w2", before.Attempt, got)
	}
	w1, w2 := c.worker(t, "w1"), c.worker(t, "w2")
	coords := []string{"c1", "c2", "c3"}
	var coordAddrs []string
	for _, id := range coords {
		cp := c.coordinator(t, id)
		coordAddrs = append(coordAddrs, cp.raftAddr, cp.rpcAddr, cp.gossipAddr)
	}

	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[20_000:40_000], 5_000)
	cutStart := time.Now()
	nw.cutRoutes(t, []string{"w1"}, coords)
	cutAt := time.Now()
	nw.checkPaths(t,
		map[string][]string{"w1": {c.broker.addr, w2.dataAddr, w2.gossipAddr}, "w2": {c.coordinator(t, "c1").rpcAddr}},
		map[string][]string{"w1": coordAddrs, "c1": {w1.dataAddr, w1.gossipAddr}})

	// w1 hears no leader, and stops its tasks when its lease runs out: not
	// before (it last heard from the leader at most a heartbeat before the
	// cut began), and not much after.
	c.waitFor(t, lease+10*time.Second, "the cut-off w1 to stop its tasks", func() (bool, error) {
		n, err := c.workerMetric(t, "w1", "coordflow_worker_tasks")
		if err != nil {
			return false, err
		}
		return n == 0, fmt.Errorf("w1 runs %v tasks", n)
	})
	stopped := time.Since(cutAt)
	t.Logf("w1 stopped its tasks %v after the cut (lease %v)", stopped.Round(time.Millisecond), lease)
	if early := time.Since(cutStart); early < lease-heartbeat-100*time.Millisecond {
		t.Errorf("w1 stopped its tasks %v after the cut began, before its lease of %v ran out", early.Round(time.Millisecond), lease)
	}
	if stopped > lease+time.Second {
		t.Errorf("w1 stopped its tasks %v after the cut, want within its lease of %v (+1s for polling)", stopped.Round(time.Millisecond), lease)
	}
	if n, err := c.workerMetric(t, "w1", "coordflow_worker_lease_expiries_total"); err != nil || n < 1 {
		t.Errorf("w1: lease expiries %v (%v), want at least 1", n, err)
	}
	if n, err := c.workerMetric(t, "w2", "coordflow_worker_lease_expiries_total"); err != nil || n != 0 {
		t.Errorf("w2, which reaches the coordinators: lease expiries %v (%v), want 0", n, err)
	}

	// The leader restarts the job on w2, the only worker it has a session
	// with, while w1 is still cut off.
	restarted := c.waitJob(t, 2*time.Minute, job, "a new attempt on w2 alone, checkpointing", func(j jobView) error {
		if j.Attempt <= before.Attempt || j.Status != "running" {
			return errors.New("no new attempt running yet")
		}
		if got := workersOf(j); !slices.Equal(got, []string{"w2"}) {
			return fmt.Errorf("attempt %d runs on %v", j.Attempt, got)
		}
		if !watch.completedOf(j.Attempt) {
			return fmt.Errorf("no completed checkpoint of attempt %d yet", j.Attempt)
		}
		return nil
	})
	t.Logf("attempt %d runs on w2 %v after the cut (reason of the restart: %q)", restarted.Attempt, time.Since(cutAt).Round(time.Millisecond), c.restartReason(t, job))
	// Task-scoped recovery (the default): only w1's tasks were restored;
	// w2's kept running in their attempt, fed by w1's zombie sources until
	// w1's lease ran out and then by the restored ones, deduplicated.
	if len(restarted.Recoveries) == 0 || restarted.Recoveries[0].Scope != "tasks" {
		t.Errorf("recoveries %+v, want a task-scoped one first", restarted.Recoveries)
	}
	for _, task := range before.Tasks {
		if task.Worker != "w2" {
			continue
		}
		for _, now := range restarted.Tasks {
			if now.ID == task.ID && (now.Attempt != task.Attempt || now.StartedAt != task.StartedAt) {
				t.Errorf("task %s on w2 was restarted: attempt %d started %s, was %d started %s", task.ID, now.Attempt, now.StartedAt, task.Attempt, task.StartedAt)
			}
		}
	}
	c.logMember(t, "w1")
	producerDone()
	c.checkExact(t, job, countWords(in.recs[:40_000]))

	nw.healRoutes(t)
	healedAt := time.Now()
	c.waitFor(t, time.Minute, "w1 to have a control session again, without tasks", func() (bool, error) {
		open, err := c.workerMetric(t, "w1", "coordflow_worker_session_open")
		if err != nil {
			return false, err
		}
		tasks, err := c.workerMetric(t, "w1", "coordflow_worker_tasks")
		if err != nil {
			return false, err
		}
		return open == 1 && tasks == 0, fmt.Errorf("w1: session open %v, %v tasks", open, tasks)
	})
	produce(t, c.brokers(), "words", in.recs[40_000:])
	c.checkExact(t, job, in.want)
	if j, err := c.getJob(t, job); err != nil {
		t.Fatal(err)
	} else if j.Attempt != restarted.Attempt || !slices.Equal(workersOf(j), []string{"w2"}) {
		t.Errorf("after healing the job is at attempt %d on %v, want attempt %d on w2: healing restarted it", j.Attempt, workersOf(j), restarted.Attempt)
	}

	// Every checkpoint the job completed: none triggered after the cut
	// belongs to the attempt that ran when w1 was cut off, and none holds
	// an ack of w1 that arrived after the cut (a completed checkpoint holds
	// an ack of every task of its attempt, so none belongs to an attempt
	// with a task on w1 either: the job stays on w2 after healing).
	cps := watch.stop(t)
	var lastW1Ack time.Time
	afterCut := 0
	for _, cp := range cps {
		if cp.Status != "completed" {
			continue
		}
		if cp.Trigger.After(cutAt) {
			afterCut++
			if cp.Attempt <= before.Attempt {
				t.Errorf("checkpoint %d, triggered %v after the cut, completed for attempt %d, which ran on the cut-off w1", cp.ID, cp.Trigger.Sub(cutAt).Round(time.Millisecond), cp.Attempt)
			}
		}
		for _, a := range cp.Acks {
			if a.worker != "w1" {
				continue
			}
			if a.at.After(lastW1Ack) {
				lastW1Ack = a.at
			}
			if a.at.After(cutAt.Add(ackSlack)) {
				t.Errorf("checkpoint %d (attempt %d) completed with an ack of w1's task %s that arrived %v after the cut", cp.ID, cp.Attempt, a.task, a.at.Sub(cutAt).Round(time.Millisecond))
			}
		}
	}
	t.Logf("%d checkpoints triggered after the cut completed, none of attempt %d; the last ack of w1 in a completed checkpoint arrived %v after the cut",
		afterCut, before.Attempt, lastW1Ack.Sub(cutAt).Round(time.Millisecond))
	if afterCut == 0 {
		t.Error("no checkpoint completed after the cut")
	}
	leader := c.coordinator(t, c.leader(t))
	if text, err := c.coordMetrics(leader); err == nil {
		fenced, _ := metricSum(text, "coordflow_fenced_messages_total")
		t.Logf("the leader %s dropped %v messages of a stale attempt (%v after healing)", leader.id, fenced, time.Since(healedAt).Round(time.Millisecond))
	}
	c.waitFor(t, time.Minute, "every coordinator to hold the same FSM", c.sameFSM)
}

// TestPartitionLeaderFromCoordinators: the Raft leader cut off from the other
// two coordinators, but not from the workers nor from Kafka, steps down; the
// other two elect a leader, which goes on checkpointing the job without
// restarting a task, with the cluster's default worker lease. The state is
// exact. After healing, the old leader rejoins as a follower with the same
// FSM. A failure of the no-restart contract is reported and the test goes
// on: it heals and checks that the job recovers with exact state.
func TestPartitionLeaderFromCoordinators(t *testing.T) {
	// The coordinators' default Raft timeouts (heartbeat, election and
	// leader lease) are 300 ms; "a few election timeouts" is this bound.
	const stepDownBound = 5 * 300 * time.Millisecond
	nw := newTestNet(t, "devkafka", "c1", "c2", "c3", "w1", "w2")
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}, net: nw})
	nw.checkProcesses(t, c)
	in := newWordInput(122, 60_000, 4)
	produce(t, c.brokers(), "words", in.recs[:20_000])
	job := c.submitJob(t, partitionSpec(c.brokers()))
	watch := c.watchCheckpoints(t, job)
	before := c.waitCheckpointed(t, job)
	// restarted says how the job has left its attempt, or "" if it has not.
	restarted := func(j jobView) string {
		if j.Attempt != before.Attempt || j.Restarts != before.Restarts || j.Status != "running" {
			return fmt.Sprintf("job %s at attempt %d (%d restarts), was %d (%d restarts) running; reason %q",
				j.Status, j.Attempt, j.Restarts, before.Attempt, before.Restarts, j.Reason)
		}
		return ""
	}
	tasksBefore := c.workerTasks(t)

	oldID := c.leader(t)
	old := c.coordinator(t, oldID)
	var others, otherAddrs []string
	for _, cp := range c.coords {
		if cp.id != oldID {
			others = append(others, cp.id)
			otherAddrs = append(otherAddrs, cp.raftAddr, cp.gossipAddr)
		}
	}
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[20_000:50_000], 5_000)
	nw.cutRoutes(t, []string{oldID}, others)
	cutAt := time.Now()
	old.isolated = true // cluster-wide views (leader, api) ask the other two
	nw.checkPaths(t,
		map[string][]string{oldID: {c.broker.addr, c.worker(t, "w1").dataAddr, c.worker(t, "w2").gossipAddr}},
		map[string][]string{oldID: otherAddrs})

	c.waitFor(t, 30*time.Second, "the cut-off leader "+oldID+" to step down", func() (bool, error) {
		st, err := c.status(old)
		if err != nil {
			return false, err
		}
		return st.State != "Leader", fmt.Errorf("%s is %s in term %d", oldID, st.State, st.Term)
	})
	steppedDown := time.Since(cutAt)
	if steppedDown > stepDownBound {
		t.Errorf("%s stepped down %v after the cut, want within %v", oldID, steppedDown.Round(time.Millisecond), stepDownBound)
	}
	newID := c.leader(t)
	electedAt := time.Now()
	if newID == oldID {
		t.Fatalf("the other coordinators still name the cut-off %s leader", oldID)
	}
	t.Logf("%s stepped down %v after the cut; %s leads the other two %v after the cut", oldID, steppedDown.Round(time.Millisecond), newID, electedAt.Sub(cutAt).Round(time.Millisecond))

	// The new leader goes on with the same attempt: three checkpoints
	// triggered after its election complete. A worker lease (5 s) and the
	// new leader's reconnect grace (3 s) bound how long this may take
	// before the leader gives up on the workers.
	wentOn := c.tryWait(t, 20*time.Second, "three checkpoints triggered and completed under the new leader "+newID+", same attempt", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		if why := restarted(j); why != "" {
			return false, fmt.Errorf("%s; %s", why, c.workerSessions(t))
		}
		if n := watch.completedSince(electedAt); n < 3 {
			return false, fmt.Errorf("%d checkpoints triggered since the election completed; %s", n, c.workerSessions(t))
		}
		return true, nil
	})
	if st, err := c.status(old); err == nil {
		t.Logf("the cut-off %s: %s, term %d, leader %q; workers: %s", oldID, st.State, st.Term, st.LeaderID, c.workerSessions(t))
	}
	producerDone()
	if wentOn {
		c.checkExact(t, job, countWords(in.recs[:50_000]))
		c.checkNoTaskRestart(t, tasksBefore)
	}

	nw.healRoutes(t)
	old.isolated = false
	c.waitFor(t, time.Minute, "the old leader "+oldID+" to rejoin as a follower of "+newID+" with the same FSM", func() (bool, error) {
		st, err := c.status(old)
		if err != nil {
			return false, err
		}
		if st.State != "Follower" || st.LeaderID != newID {
			return false, fmt.Errorf("%s is %s in term %d, naming leader %q", oldID, st.State, st.Term, st.LeaderID)
		}
		return c.sameFSM()
	})
	if id := c.leader(t); id != newID {
		t.Errorf("after healing %s leads, want %s: the old leader disrupted the cluster", id, newID)
	}
	produce(t, c.brokers(), "words", in.recs[50_000:])
	c.checkExact(t, job, in.want)
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if why := restarted(j); why != "" && wentOn {
		t.Errorf("after healing: %s", why)
	}
	if wentOn {
		c.checkNoTaskRestart(t, tasksBefore)
	}
	for _, cp := range watch.stop(t) {
		if cp.Status == "completed" && cp.Attempt != before.Attempt && wentOn {
			t.Errorf("checkpoint %d completed for attempt %d, want %d", cp.ID, cp.Attempt, before.Attempt)
		}
	}
	c.waitFor(t, time.Minute, "every coordinator to hold the same FSM", c.sameFSM)
}

// tryWait is waitFor that reports a timeout as an error, not fatal, and
// returns whether cond held: for a contract whose failure the test reports
// and then goes on to check recovery. A process exit is still fatal.
func (c *cluster) tryWait(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) bool {
	t.Helper()
	start := time.Now()
	var lastErr error
	for {
		if err := c.unexpectedExits(); err != nil {
			t.Fatalf("while waiting for %s: %v", what, err)
		}
		ok, err := cond()
		if ok {
			t.Logf("%s: after %v", what, time.Since(start).Round(time.Millisecond))
			return true
		}
		if err != nil {
			lastErr = err
		}
		if time.Since(start) > timeout {
			t.Errorf("not within %v: %s; last reason: %v", timeout, what, lastErr)
			return false
		}
		time.Sleep(pollInterval) // poll interval, not synchronization: the loop re-checks cond
	}
}

// countWords returns the count of every word in recs.
func countWords(recs []record) map[string]int64 {
	counts := map[string]int64{}
	for _, r := range recs {
		for _, w := range strings.Fields(r.value) {
			counts[w]++
		}
	}
	return counts
}

// workerTasks returns, per worker, its running tasks and lease expiries.
func (c *cluster) workerTasks(t *testing.T) map[string][2]float64 {
	t.Helper()
	out := map[string][2]float64{}
	for _, w := range c.workers {
		text, err := c.workerMetrics(w)
		if err != nil {
			t.Fatalf("metrics of %s: %v", w.id, err)
		}
		tasks, _ := metricSum(text, "coordflow_worker_tasks")
		expiries, _ := metricSum(text, "coordflow_worker_lease_expiries_total")
		out[w.id] = [2]float64{tasks, expiries}
	}
	return out
}

// workerSessions describes every worker's control session: open with a
// leader, or held by a coordinator that knows no leader.
func (c *cluster) workerSessions(t *testing.T) string {
	t.Helper()
	var parts []string
	for _, w := range c.workers {
		text, err := c.workerMetrics(w)
		if err != nil {
			parts = append(parts, fmt.Sprintf("%s: %v", w.id, err))
			continue
		}
		open, _ := metricSum(text, "coordflow_worker_session_open")
		leaderless, _ := metricSum(text, "coordflow_worker_leaderless")
		tasks, _ := metricSum(text, "coordflow_worker_tasks")
		parts = append(parts, fmt.Sprintf("%s: session open %v, held leaderless %v, %v tasks", w.id, open, leaderless, tasks))
	}
	return strings.Join(parts, "; ")
}

// checkNoTaskRestart fails the test if a worker runs another number of tasks
// than before or has let its lease run out since.
func (c *cluster) checkNoTaskRestart(t *testing.T, before map[string][2]float64) {
	t.Helper()
	now := c.workerTasks(t)
	for _, id := range slices.Sorted(maps.Keys(before)) {
		if now[id] != before[id] {
			t.Errorf("%s: %v tasks and %v lease expiries, were %v and %v", id, now[id][0], now[id][1], before[id][0], before[id][1])
		}
	}
}

// restartReason returns the line the leader logged for the job's last
// restart or task-scoped recovery, or "".
func (c *cluster) restartReason(t *testing.T, job string) string {
	t.Helper()
	reason := ""
	for _, cp := range c.liveCoordinators() {
		for line := range strings.Lines(c.coordLog(t, cp.id)) {
			if (strings.Contains(line, "restarting job") || strings.Contains(line, "recovering the lost tasks alone")) && strings.Contains(line, job) {
				reason = strings.TrimSpace(line)
			}
		}
	}
	return reason
}

// logMember logs how every coordinator sees a gossip member.
func (c *cluster) logMember(t *testing.T, id string) {
	t.Helper()
	var views []string
	for _, cp := range c.coords {
		var ms []memberView
		if err := c.call("GET", cp.httpAddr, "/v1/members", nil, &ms); err != nil {
			views = append(views, fmt.Sprintf("%s: %v", cp.id, err))
			continue
		}
		st := "not listed"
		if i := slices.IndexFunc(ms, func(m memberView) bool { return m.ID == id }); i >= 0 {
			st = ms[i].Status
		}
		views = append(views, cp.id+": "+st)
	}
	t.Logf("gossip status of %s: %s", id, strings.Join(views, ", "))
}

// ckptSeen is one checkpoint of a job as the watcher last saw it.
type ckptSeen struct {
	ID, Attempt  uint64
	Status       string // pending, completed, aborted
	Reason       string
	Trigger, End time.Time
	Acks         []ackSeen
}

// ackSeen is one task's ack of a checkpoint: when it reached the leader.
type ackSeen struct {
	task, worker string
	at           time.Time
}

// ckptWatch polls a job's checkpoints on every coordinator, so that the test
// can check every checkpoint completed, not only the retained ones.
type ckptWatch struct {
	job  string
	mu   sync.Mutex
	seen map[uint64]ckptSeen
	quit chan struct{}
	done chan struct{}
}

// watchCheckpoints starts polling job's checkpoints on every coordinator
// every 100 ms; stop ends it (at the latest the test's end).
func (c *cluster) watchCheckpoints(t *testing.T, job string) *ckptWatch {
	t.Helper()
	w := &ckptWatch{job: job, seen: map[uint64]ckptSeen{}, quit: make(chan struct{}), done: make(chan struct{})}
	var addrs []string
	for _, cp := range c.coords {
		addrs = append(addrs, cp.httpAddr)
	}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, addr := range addrs {
				w.poll(c, addr)
			}
			select {
			case <-w.quit:
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() { w.halt() })
	return w
}

func (w *ckptWatch) halt() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
	<-w.done
}

// apiCheckpoint is an entry of GET /v1/jobs/{id}/checkpoints with the
// fields the watcher records.
type apiCheckpoint struct {
	ID          uint64 `json:"id"`
	Attempt     uint64 `json:"attempt"`
	Status      string `json:"status"`
	Reason      string `json:"reason"`
	TriggerTime string `json:"trigger_time"`
	EndTime     string `json:"end_time"`
	Tasks       []struct {
		ID      string `json:"id"`
		Worker  string `json:"worker"`
		AckTime string `json:"ack_time"`
	} `json:"tasks"`
}

// poll reads the checkpoints one coordinator lists and records them. A
// coordinator that does not answer (cut off, stale) is skipped: the others
// hold the same committed checkpoints.
func (w *ckptWatch) poll(c *cluster, addr string) {
	var cps []apiCheckpoint
	if err := c.call("GET", addr, "/v1/jobs/"+w.job+"/checkpoints", nil, &cps); err != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cp := range cps {
		if prev, ok := w.seen[cp.ID]; ok && prev.Status != "pending" {
			continue // completed and aborted are final
		}
		s := ckptSeen{ID: cp.ID, Attempt: cp.Attempt, Status: cp.Status, Reason: cp.Reason,
			Trigger: parseAPITime(cp.TriggerTime), End: parseAPITime(cp.EndTime)}
		for _, task := range cp.Tasks {
			if task.AckTime != "" {
				s.Acks = append(s.Acks, ackSeen{task: task.ID, worker: task.Worker, at: parseAPITime(task.AckTime)})
			}
		}
		w.seen[cp.ID] = s
	}
}

func parseAPITime(s string) time.Time {
	ts, _ := time.Parse(time.RFC3339Nano, s)
	return ts
}

// completedOf reports whether a checkpoint of attempt has completed.
func (w *ckptWatch) completedOf(attempt uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cp := range w.seen {
		if cp.Status == "completed" && cp.Attempt == attempt {
			return true
		}
	}
	return false
}

// completedSince counts the completed checkpoints triggered after t0.
func (w *ckptWatch) completedSince(t0 time.Time) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, cp := range w.seen {
		if cp.Status == "completed" && cp.Trigger.After(t0) {
			n++
		}
	}
	return n
}

// stop ends the watch and returns every checkpoint seen, by id. It fails
// the test if an id below the newest was never seen completed or aborted:
// the watch missed it, and the checks on it would be incomplete.
func (w *ckptWatch) stop(t *testing.T) []ckptSeen {
	t.Helper()
	w.halt()
	w.mu.Lock()
	defer w.mu.Unlock()
	ids := slices.Sorted(maps.Keys(w.seen))
	if len(ids) == 0 {
		t.Fatal("the checkpoint watcher saw no checkpoint")
	}
	var missed []string
	counts := map[string]int{}
	for id := ids[0]; id < ids[len(ids)-1]; id++ {
		cp, ok := w.seen[id]
		switch {
		case !ok:
			missed = append(missed, fmt.Sprint(id))
		case cp.Status == "pending":
			missed = append(missed, fmt.Sprintf("%d (only seen pending)", id))
		}
	}
	out := make([]ckptSeen, 0, len(ids))
	for _, id := range ids {
		out = append(out, w.seen[id])
		counts[w.seen[id].Status]++
	}
	if len(missed) > 0 {
		t.Errorf("the checkpoint watcher missed checkpoints %s of %d..%d", strings.Join(missed, ", "), ids[0], ids[len(ids)-1])
	}
	t.Logf("checkpoints %d..%d seen: %v", ids[0], ids[len(ids)-1], counts)
	return out
}
