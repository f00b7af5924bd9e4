package integration

// Benchmark of task-scoped recovery (issue 11): SIGKILL of a worker running
// a map task of a wordcount job with an at-least-once sink, with
// "recovery": {"scope": "tasks"} and, for comparison, "job". The output's
// arrival times, read by a consumer in this process, show when each map
// task produced. docs/benchmarks.md has the method and the figures; run it
// alone on the machine:
//
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkRecovery' -benchtime 1x -timeout 30m -v

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
)

const (
	// benchRecoveryScopeEnv passes the recovery scope to the scenario.
	benchRecoveryScopeEnv = "COORDFLOW_BENCH_RECOVERY_SCOPE"
	// benchRecoveryRate is the steady input, in records (lines) a second:
	// about 20,000 words, so as many sink records a second.
	benchRecoveryRate = 3000
	// benchRecoverySteady is the window held before each kill: the
	// baseline of the output's gaps.
	benchRecoverySteady = 4 * time.Second
	// benchRecoveryGapBefore and benchRecoveryGapAfter bound the window
	// around a kill in which the surviving map tasks' longest output gap
	// is measured.
	benchRecoveryGapBefore = time.Second
	benchRecoveryGapAfter  = 3 * time.Second
	// benchRecoveryMaxParallelism is wordcountSpec's max_parallelism.
	benchRecoveryMaxParallelism = 128
)

// benchRecoveryScopes are the sub-benchmarks, in order.
var benchRecoveryScopes = []string{fsm.RecoveryScopeTasks, fsm.RecoveryScopeJob}

// benchRecoveryResult is what TestBenchScenarioRecovery measures, one entry
// per kill.
type benchRecoveryResult struct {
	Scope   string              `json:"scope"`
	Kills   []benchRecoveryKill `json:"kills"`
	Records int64               `json:"records"` // input of the whole scenario, checked exactly at the end
	Outputs int64               `json:"outputs"` // sink records the consumer read
	LoadAvg string              `json:"loadavg"` // /proc/loadavg before the cluster started
}

// benchRecoveryKill is one kill. Times are milliseconds from the moment just
// before the SIGKILL; -1 where a figure does not apply.
type benchRecoveryKill struct {
	Victim      string   `json:"victim"`
	VictimTasks []string `json:"victim_tasks"`
	Scope       string   `json:"scope"` // of the last recovery the kill caused
	Restored    []string `json:"restored"`
	// Recoveries are the scope and reason of every recovery the kill
	// caused, oldest first; Fallback is set when one was not of the
	// scenario's scope (a task-scoped recovery that became a job restart).
	Recoveries []string `json:"recoveries"`
	Fallback   bool     `json:"fallback"`
	DetectedMS float64  `json:"detected_ms"` // the recovery's detected_at
	StartedMS  float64  `json:"started_ms"`  // the recovery's started_at
	// RunningMS is when the last restored map task logged "task running".
	RunningMS float64 `json:"running_ms"`
	// FirstOutputMS (a) is the receipt of the first output of the victim's
	// map tasks written after the kill (at an offset past the topic's end
	// once the victim had exited) and received after the recovery started:
	// the restored task's first output (the latest of them when the victim
	// ran more than one).
	FirstOutputMS float64 `json:"first_output_ms"`
	// CheckpointMS (b) is the end of the first checkpoint completed after
	// the recovery (its checkpointed_at).
	CheckpointMS float64 `json:"checkpoint_ms"`
	// GapMS (c) is the longest gap between consecutive output receipts of
	// any map task that was not on the victim, from benchRecoveryGapBefore
	// before the kill to benchRecoveryGapAfter after it; BaselineGapMS is
	// the same over the benchRecoverySteady window just before the kill.
	GapMS         float64 `json:"gap_ms"`
	BaselineGapMS float64 `json:"baseline_gap_ms"`
	// InFlight counts outputs of the victim's map tasks written before the
	// kill and received after it; they do not count for (a).
	InFlight int `json:"in_flight"`
}

// BenchmarkRecovery measures recovery after a worker's SIGKILL on a cluster
// of 3 coordd and 3 workerd running a wordcount job (parallelism 2 and 2,
// checkpoints every 200 ms) with an at-least-once sink, on a steady input,
// benchKills kills per scope: (a) kill to the restored map task's first
// output, (b) kill to the next completed checkpoint, (c) the longest output
// gap of the map tasks that were not on the victim, next to its steady
// baseline.
func BenchmarkRecovery(b *testing.B) {
	for _, scope := range benchRecoveryScopes {
		b.Run("scope="+scope, func(b *testing.B) {
			var kills []benchRecoveryKill
			for range b.N {
				var r benchRecoveryResult
				benchRunScenarioWith(b, "TestBenchScenarioRecovery", []string{benchRecoveryScopeEnv + "=" + scope}, benchScenarioTimeout, &r)
				kills = append(kills, r.Kills...)
				for i, k := range r.Kills {
					b.Logf("kill %d (%s running %v): %s recovery of %v%s detected %4.0f ms, started %4.0f ms, restored map running %4.0f ms, (a) first output %4.0f ms, (b) checkpoint %4.0f ms, (c) survivors' longest gap %4.0f ms (steady %4.0f ms); %d in-flight outputs",
						i+1, k.Victim, k.VictimTasks, k.Scope, k.Restored, benchFallbackNote(k), k.DetectedMS, k.StartedMS, k.RunningMS, k.FirstOutputMS, k.CheckpointMS, k.GapMS, k.BaselineGapMS, k.InFlight)
				}
				b.Logf("%d records, %d outputs read, final state exact; load average before: %s", r.Records, r.Outputs, r.LoadAvg)
			}
			for i, k := range kills {
				if k.Fallback {
					b.Errorf("kill %d (%s): not a %s recovery: %s", i+1, k.Victim, scope, strings.Join(k.Recoveries, "; then "))
				}
			}
			b.ReportMetric(0, "ns/op")
			for _, f := range []struct {
				name string
				of   func(benchRecoveryKill) float64
			}{
				{"first-output-ms", func(k benchRecoveryKill) float64 { return k.FirstOutputMS }},
				{"checkpoint-ms", func(k benchRecoveryKill) float64 { return k.CheckpointMS }},
				{"survivor-gap-ms", func(k benchRecoveryKill) float64 { return k.GapMS }},
				{"steady-gap-ms", func(k benchRecoveryKill) float64 { return k.BaselineGapMS }},
			} {
				vs := slices.DeleteFunc(benchMap(kills, f.of), func(v float64) bool { return v < 0 })
				if len(vs) == 0 {
					continue
				}
				b.Logf("%s: median %.0f, min %.0f, max %.0f over %d kills", f.name, benchMedian(vs), slices.Min(vs), slices.Max(vs), len(vs))
				b.ReportMetric(benchMedian(vs), f.name)
				b.ReportMetric(slices.Max(vs), "max-"+f.name)
			}
		})
	}
}

// benchFallbackNote describes, for the log, the recoveries of a kill that
// fell back to another scope.
func benchFallbackNote(k benchRecoveryKill) string {
	if !k.Fallback {
		return ""
	}
	return " (FALLBACK: " + strings.Join(k.Recoveries, "; then ") + ")"
}

func TestBenchScenarioRecovery(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkRecovery")
	scope := cmp.Or(os.Getenv(benchRecoveryScopeEnv), fsm.RecoveryScopeTasks)
	if !slices.Contains(benchRecoveryScopes, scope) {
		t.Fatalf("%s=%q: want one of %v", benchRecoveryScopeEnv, scope, benchRecoveryScopes)
	}
	res := benchRecoveryResult{Scope: scope, LoadAvg: benchLoadAvg()}
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 3, topics: map[string]int32{"words": 4, "counts": 4}})
	outputs := benchStartOutputs(t, c.brokers(), "counts", benchRecoveryMaxParallelism, 2)
	stream := chaosStartStream(t, c.brokers(), "words", 4, 20261204, benchRecoveryRate)
	spec := sinkJobSpec(c.brokers(), "200ms", "counts", "at_least_once")
	spec.Recovery = &recoverySpec{Scope: scope}
	// As in BenchmarkFailover/WorkerKill: every kill comes after the
	// attempt ran restart.reset_after, so a job-scoped restart meets the
	// first step of the backoff (100 ms), as an isolated failure does.
	spec.Restart = &restartSpec{Initial: "100ms", Max: "30s", ResetAfter: benchResetAfter.String()}
	job := c.submitJob(t, spec)
	first := c.waitCheckpointed(t, job)

	rng := rand.New(rand.NewPCG(20261204, 11))
	base, lastAttempt, recoveredAt := first.lastCheckpointID(), first.Attempt, time.Now()
	for i := range benchKills {
		c.waitJob(t, 2*time.Minute, job, "steady state: two checkpoints after the last recovery", func(j jobView) error {
			if len(j.Recoveries) > 0 && j.Recoveries[0].Attempt > lastAttempt && len(res.Kills) > 0 {
				// A recovery after the last one's checkpoint: the last kill
				// caused it too (a task-scoped recovery falling back late).
				r, k := j.Recoveries[0], &res.Kills[len(res.Kills)-1]
				k.Recoveries = append(k.Recoveries, r.Scope+": "+r.Reason)
				k.Fallback = k.Fallback || r.Scope != scope
				t.Logf("kill %d of %s: a later %s recovery: %s", len(res.Kills), k.Victim, r.Scope, r.Reason)
				lastAttempt, base, recoveredAt = r.Attempt, 0, time.Now()
			}
			if j.Status != "running" {
				return errors.New("not running")
			}
			if base == 0 && len(j.Recoveries) > 0 {
				base = j.Recoveries[0].CheckpointID // 0 until it has one
			}
			if base == 0 {
				return errors.New("no checkpoint after the last recovery yet")
			}
			if j.lastCheckpointID() < base+2 {
				return fmt.Errorf("checkpoint %d, want %d", j.lastCheckpointID(), base+2)
			}
			if since := time.Since(recoveredAt); since < benchResetAfter+500*time.Millisecond {
				return fmt.Errorf("the attempt has run %v, want restart.reset_after and 500 ms", since.Round(time.Millisecond))
			}
			return nil
		})
		chosen, err := c.getJob(t, job)
		if err != nil {
			t.Fatal(err)
		}
		victim, err := benchRecoveryVictim(chosen, rng)
		if err != nil {
			t.Fatal(err)
		}
		// The steady window: nothing to wait for, the baseline is measured
		// over it.
		time.Sleep(benchRecoverySteady)
		before, err := c.getJob(t, job)
		if err != nil {
			t.Fatal(err)
		}
		if before.Attempt != chosen.Attempt || !slices.Equal(workersOf(before), workersOf(chosen)) {
			t.Fatalf("the job changed during the steady window: attempt %d -> %d, workers %v -> %v (%s)",
				chosen.Attempt, before.Attempt, workersOf(chosen), workersOf(before), before.Reason)
		}
		k := benchRecoveryKill{Victim: victim, RunningMS: -1, GapMS: -1, BaselineGapMS: -1}
		var victimMaps, survivorMaps []int
		for _, task := range before.Tasks {
			if task.Worker == victim {
				k.VictimTasks = append(k.VictimTasks, task.ID)
			}
			if index, ok := benchMapIndex(task); ok {
				if task.Worker == victim {
					victimMaps = append(victimMaps, index)
				} else {
					survivorMaps = append(survivorMaps, index)
				}
			}
		}

		killAt := time.Now()
		c.killWorker(t, victim)
		// The victim's process has exited: its map tasks' outputs from now
		// on are at or past these offsets, and come from restored tasks.
		written := outputs.ends(t)
		after := c.waitJob(t, time.Minute, job, "a recovery after the kill of "+victim+" and a checkpoint after it", func(j jobView) error {
			if len(j.Recoveries) == 0 || j.Recoveries[0].Attempt <= before.Attempt {
				return errors.New("no recovery yet")
			}
			if j.Recoveries[0].CheckpointID == 0 {
				return fmt.Errorf("a %s recovery, no checkpoint after it yet", j.Recoveries[0].Scope)
			}
			return nil
		})
		// Every recovery the kill caused, oldest first: one, unless a
		// task-scoped recovery fell back to a job restart.
		var caused []recoveryView
		for _, r := range after.Recoveries {
			if r.Attempt > before.Attempt {
				caused = append([]recoveryView{r}, caused...)
			}
		}
		rec := caused[len(caused)-1]
		started := benchRecoveryTime(t, "started_at", rec.StartedAt)
		k.Scope, k.Restored = rec.Scope, rec.Tasks
		for _, r := range caused {
			k.Recoveries = append(k.Recoveries, r.Scope+": "+r.Reason)
			k.Fallback = k.Fallback || r.Scope != scope
		}
		k.DetectedMS = benchMS(benchRecoveryTime(t, "detected_at", cmp.Or(caused[0].DetectedAt, caused[0].StartedAt)).Sub(killAt))
		k.StartedMS = benchMS(started.Sub(killAt))
		k.CheckpointMS = benchMS(benchRecoveryTime(t, "checkpointed_at", rec.CheckpointedAt).Sub(killAt))
		if k.Fallback {
			t.Logf("kill %d of %s: not the %s recovery asked for: %s", i+1, victim, scope, strings.Join(k.Recoveries, "; then "))
		} else if scope == fsm.RecoveryScopeTasks {
			benchCheckSurvivorsKept(t, before, after, victim)
		}

		// (a): every restored map task has written an output, and the
		// window of (c) has passed.
		c.waitFor(t, time.Minute, "the restored map tasks' first outputs and the end of the gap window", func() (bool, error) {
			if wait := time.Until(killAt.Add(benchRecoveryGapAfter)); wait > 0 {
				return false, fmt.Errorf("the window ends in %v", wait.Round(time.Millisecond))
			}
			var last time.Time
			for _, m := range victimMaps {
				at, ok := outputs.firstAfter(m, started, written)
				if !ok {
					return false, fmt.Errorf("no output of map-%d since the recovery started", m)
				}
				if at.After(last) {
					last = at
				}
			}
			k.FirstOutputMS = benchMS(last.Sub(killAt))
			return true, nil
		})
		for _, m := range victimMaps {
			k.InFlight += outputs.writtenBefore(m, killAt, written)
		}
		if len(survivorMaps) > 0 {
			k.GapMS = benchMS(outputs.longestGap(survivorMaps, killAt.Add(-benchRecoveryGapBefore), killAt.Add(benchRecoveryGapAfter)))
			k.BaselineGapMS = benchMS(outputs.longestGap(survivorMaps, killAt.Add(-benchRecoverySteady), killAt))
		}
		k.RunningMS = benchRestoredRunning(t, c, after, rec, victimMaps, killAt)
		t.Logf("kill %d: %s (tasks %v) SIGKILLed; %s recovery of %v (%s): detected %.0f ms, started %.0f ms, restored maps running %.0f ms, first output %.0f ms (%d in-flight outputs before), checkpoint %d at %.0f ms; survivors' longest output gap %.0f ms, steady %.0f ms",
			i+1, victim, k.VictimTasks, rec.Scope, rec.Tasks, strings.Join(k.Recoveries, "; then "), k.DetectedMS, k.StartedMS, k.RunningMS, k.FirstOutputMS, k.InFlight, rec.CheckpointID, k.CheckpointMS, k.GapMS, k.BaselineGapMS)
		res.Kills = append(res.Kills, k)

		// A replacement with a fresh id, after the measurement: its start
		// would otherwise share the two cores with the recovery.
		c.startWorker(t, fmt.Sprintf("w%d", len(c.workers)+1))
		base, lastAttempt, recoveredAt = rec.CheckpointID, rec.Attempt, started
	}

	stream.stop(t)
	c.checkExact(t, job, stream.wantAll())
	res.Records = stream.produced()
	res.Outputs = outputs.stop()
	benchWriteResult(t, resultPath, res)
}

// benchRecoveryVictim picks the worker to kill: one running a map task of
// j but not every task, preferring one with a single map task so that a
// map task survives (figure (c)).
func benchRecoveryVictim(j jobView, rng *rand.Rand) (string, error) {
	tasks, maps := map[string]int{}, map[string]int{}
	for _, task := range j.Tasks {
		tasks[task.Worker]++
		if task.Kind == string(fsm.TaskMap) {
			maps[task.Worker]++
		}
	}
	var one, some []string
	for _, w := range workersOf(j) {
		switch {
		case maps[w] == 0 || tasks[w] == len(j.Tasks):
		case maps[w] == 1:
			one = append(one, w)
		default:
			some = append(some, w)
		}
	}
	if len(one) > 0 {
		return one[rng.IntN(len(one))], nil
	}
	if len(some) > 0 {
		return some[rng.IntN(len(some))], nil
	}
	return "", fmt.Errorf("no worker runs a map task without running every task: %+v", j.Tasks)
}

// benchMapIndex is the index of a map task ("map-1": 1).
func benchMapIndex(task taskView) (int, bool) {
	var index int
	if task.Kind != string(fsm.TaskMap) {
		return 0, false
	}
	if _, err := fmt.Sscanf(task.ID, string(fsm.TaskMap)+"-%d", &index); err != nil {
		return 0, false
	}
	return index, true
}

// benchCheckSurvivorsKept fails the test unless every task that was not on
// victim before the kill runs on with the same worker, attempt and start
// time after it.
func benchCheckSurvivorsKept(t *testing.T, before, after jobView, victim string) {
	t.Helper()
	now := map[string]taskView{}
	for _, task := range after.Tasks {
		now[task.ID] = task
	}
	for _, old := range before.Tasks {
		if old.Worker == victim {
			continue
		}
		if task := now[old.ID]; task.Worker != old.Worker || task.Attempt != old.Attempt || task.StartedAt != old.StartedAt {
			t.Fatalf("surviving task %s was restarted by the kill of %s: attempt %d started %s on %s, was attempt %d started %s on %s",
				old.ID, victim, task.Attempt, task.StartedAt, task.Worker, old.Attempt, old.StartedAt, old.Worker)
		}
	}
}

// benchRestoredRunning returns when the last of the victim's map tasks
// logged "task running" in the recovery's attempt on its new worker, in
// milliseconds from killAt, or -1 if a log line is missing.
func benchRestoredRunning(t *testing.T, c *cluster, after jobView, rec recoveryView, victimMaps []int, killAt time.Time) float64 {
	t.Helper()
	last := -1.0
	for _, m := range victimMaps {
		id := fsm.TaskID(fsm.TaskMap, m)
		i := slices.IndexFunc(after.Tasks, func(task taskView) bool { return task.ID == id })
		if i < 0 {
			return -1
		}
		ts := benchLogTimes(c.worker(t, after.Tasks[i].Worker).p.output(), "task running", fmt.Sprintf(" attempt=%d task=%s ", rec.Attempt, id))
		if len(ts) == 0 {
			return -1
		}
		last = max(last, benchMS(ts[0].Sub(killAt)))
	}
	return last
}

// benchRecoveryTime parses a recovery's RFC 3339 time.
func benchRecoveryTime(t *testing.T, what, s string) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("recovery %s %q: %v", what, s, err)
	}
	return at
}

// ---- the output ----

// benchOutputs reads a sink's topic from its start and records when each
// output record arrived, by the map task that wrote it: the one owning the
// key group of the record's key (the word).
type benchOutputs struct {
	maxParallelism int
	ranges         []fsm.KeyGroupRange
	topic          string
	client         sarama.Client
	cons           sarama.Consumer
	cancel         context.CancelFunc
	wg             sync.WaitGroup

	mu       sync.Mutex
	receipts [][]benchReceipt // by map task index, in the order received
	n        int64
}

// benchReceipt is one output record read: when, and where it is.
type benchReceipt struct {
	at        time.Time
	partition int32
	offset    int64
}

// benchStartOutputs starts reading topic; stop ends it. parallelism is the
// job's map parallelism.
func benchStartOutputs(t *testing.T, brokers []string, topic string, maxParallelism, parallelism int) *benchOutputs {
	t.Helper()
	cfg := saramaConfig()
	cfg.Consumer.MaxWaitTime = 10 * time.Millisecond // receipt times close to the writes
	client, err := sarama.NewClient(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := sarama.NewConsumerFromClient(client)
	if err != nil {
		t.Fatal(err)
	}
	parts, err := cons.Partitions(topic)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	o := &benchOutputs{
		maxParallelism: maxParallelism, ranges: fsm.KeyGroupRanges(maxParallelism, parallelism),
		topic: topic, client: client, cons: cons, cancel: cancel, receipts: make([][]benchReceipt, parallelism),
	}
	for _, p := range parts {
		pc, err := cons.ConsumePartition(topic, p, sarama.OffsetOldest)
		if err != nil {
			t.Fatal(err)
		}
		o.wg.Go(func() {
			defer pc.Close()
			for {
				select {
				case m := <-pc.Messages():
					o.record(m.Key, benchReceipt{at: time.Now(), partition: m.Partition, offset: m.Offset})
				case <-ctx.Done():
					return
				}
			}
		})
	}
	t.Cleanup(func() { o.stop() })
	return o
}

// record notes the receipt r of an output with key.
func (o *benchOutputs) record(key []byte, r benchReceipt) {
	kg := int(fsm.KeyGroup(key, o.maxParallelism))
	task := slices.IndexFunc(o.ranges, func(kr fsm.KeyGroupRange) bool { return kr.Start <= kg && kg < kr.End })
	o.mu.Lock()
	defer o.mu.Unlock()
	o.receipts[task] = append(o.receipts[task], r)
	o.n++
}

// stop ends the reading (again: no-op) and returns the outputs read.
func (o *benchOutputs) stop() int64 {
	o.cancel()
	o.wg.Wait()
	if o.cons != nil {
		o.cons.Close()
		o.client.Close()
		o.cons = nil
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.n
}

// ends returns the topic's end offsets by partition, asked over the
// reader's own connection: cheaper, while a recovery is timed, than a new
// client.
func (o *benchOutputs) ends(t *testing.T) map[int32]int64 {
	t.Helper()
	parts, err := o.client.Partitions(o.topic)
	if err != nil {
		t.Fatal(err)
	}
	ends := make(map[int32]int64, len(parts))
	for _, p := range parts {
		if ends[p], err = o.client.GetOffset(o.topic, p, sarama.OffsetNewest); err != nil {
			t.Fatalf("end offset of %s/%d: %v", o.topic, p, err)
		}
	}
	return ends
}

// between returns the receipts of map task index received in [from, to],
// sorted by time (the partitions' readers append concurrently).
func (o *benchOutputs) between(task int, from, to time.Time) []benchReceipt {
	o.mu.Lock()
	defer o.mu.Unlock()
	all := o.receipts[task]
	// Receipts are nearly in order: search from the end.
	i := len(all)
	for i > 0 && !all[i-1].at.Before(from.Add(-time.Second)) {
		i--
	}
	var out []benchReceipt
	for _, r := range all[i:] {
		if !r.at.Before(from) && !r.at.After(to) {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b benchReceipt) int { return a.at.Compare(b.at) })
	return out
}

// firstAfter returns the first receipt of map task index at or after from
// of a record at or past the offsets ends (by partition): one written after
// ends were taken.
func (o *benchOutputs) firstAfter(task int, from time.Time, ends map[int32]int64) (time.Time, bool) {
	for _, r := range o.between(task, from, from.Add(time.Hour)) {
		if r.offset >= ends[r.partition] {
			return r.at, true
		}
	}
	return time.Time{}, false
}

// writtenBefore counts the receipts of map task index after from of
// records below the offsets ends: written before ends were taken.
func (o *benchOutputs) writtenBefore(task int, from time.Time, ends map[int32]int64) int {
	n := 0
	for _, r := range o.between(task, from, from.Add(time.Hour)) {
		if r.offset < ends[r.partition] {
			n++
		}
	}
	return n
}

// longestGap returns the longest time, over the map tasks, between two
// consecutive receipts of one task in [from, to], the window's ends
// included: a task silent through the whole window has a gap of to-from.
func (o *benchOutputs) longestGap(tasks []int, from, to time.Time) time.Duration {
	var longest time.Duration
	for _, task := range tasks {
		prev := from
		for _, r := range append(o.between(task, from, to), benchReceipt{at: to}) {
			longest = max(longest, r.at.Sub(prev))
			prev = r.at
		}
	}
	return longest
}
