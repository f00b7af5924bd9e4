package integration

// Benchmarks with real processes: throughput of checkpointed jobs next to a
// plain sarama consumer (bench_throughput_test.go), and failover times.
// docs/benchmarks.md has the method and the figures; run them one at a time,
// with nothing else on the machine:
//
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=wordcount' -benchtime 1x -timeout 30m -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=distinct' -benchtime 1x -timeout 30m -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=passthrough' -benchtime 1x -timeout 30m -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench BenchmarkFailover -benchtime 1x -timeout 30m
//
// The harness works with *testing.T, so each benchmark runs its scenario in a
// child process: it starts this test binary again with -test.run selecting
// TestBenchScenarioX, an ordinary harness test that skips unless it was
// started that way, and reads the scenario's figures from a JSON file. One
// benchmark iteration is one whole scenario; the figures are custom metrics
// and ns/op is suppressed (it would be the scenario's wall time).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	// benchResultEnv names the file a scenario writes its figures to; a
	// scenario test skips when it is not set.
	benchResultEnv = "COORDFLOW_BENCH_RESULT"
	// benchScenarioTimeout bounds one scenario run (the child process).
	benchScenarioTimeout = 15 * time.Minute
	// benchKills is the number of kills each failover scenario measures.
	benchKills = 7
	// benchFailoverRate is the steady input of the failover scenarios, in
	// records a second.
	benchFailoverRate = 2000
	// benchPoll is how often the failover scenarios poll what they time;
	// times taken from the API (checkpoint end times) do not depend on it.
	benchPoll = 10 * time.Millisecond
)

// ---- the benchmarks ----

// benchFailoverResult is what the failover scenarios measure, one entry per
// kill.
type benchFailoverResult struct {
	Kills []benchKill `json:"kills"`
	// Records is the input of the whole scenario, checked word by word
	// against the job's final checkpoint.
	Records int64  `json:"records"`
	LoadAvg string `json:"loadavg"` // /proc/loadavg before the cluster started
}

// benchKill is one kill. Times are milliseconds from the SIGKILL; -1 where a
// figure does not apply.
type benchKill struct {
	Victim string `json:"victim"`
	// Leader kill.
	ElectedMS    float64 `json:"elected_ms"`    // a surviving coordinator reports Leader (poll)
	LoopMS       float64 `json:"loop_ms"`       // the new leader logs "leader loop started"
	SessionsMS   float64 `json:"sessions_ms"`   // the new leader logs "worker session opened" for the last worker
	TriggerMS    float64 `json:"trigger_ms"`    // trigger time of the first checkpoint triggered after the kill
	CheckpointMS float64 `json:"checkpoint_ms"` // end time of the first checkpoint triggered after the kill
	AttemptDelta int     `json:"attempt_delta"` // job attempt after minus before
	RestartDelta int     `json:"restart_delta"` // the job's FSM restart count after minus before
	MetricDelta  float64 `json:"metric_delta"`  // coordflow_job_restarts_total of the surviving coordinators, after minus before
	TaskStarts   int     `json:"task_starts"`   // "task running" lines the workers logged meanwhile
	// Worker kill.
	AttemptSeenMS float64 `json:"attempt_seen_ms"` // the new attempt is visible in GET /v1/jobs/{id} (poll)
	DeployMS      float64 `json:"deploy_ms"`       // the survivor logs the first "deploying task" of the new attempt
	RunningMS     float64 `json:"running_ms"`      // the survivor logs the last "task running" of the new attempt
	FirstRecordMS float64 `json:"first_record_ms"` // the survivor's map tasks have applied a record of the new attempt (metrics poll)
	ProgressMS    float64 `json:"progress_ms"`     // end time of the first checkpoint of the new attempt past the restored offsets
	Residual      float64 `json:"residual"`        // items the survivor applied between the kill and the new attempt's deploy
}

// BenchmarkFailover measures failover on a cluster of 3 coordd and 2 workerd
// running a wordcount job on a steady input, benchKills kills each:
// LeaderKill, SIGKILL of the Raft leader to the next completed checkpoint
// (200 ms interval) and the task restarts it causes; WorkerKill, SIGKILL of a
// worker running tasks to the first record applied by the restored attempt.
// Each kill's process is restarted before the next one.
func BenchmarkFailover(b *testing.B) {
	b.Run("LeaderKill", func(b *testing.B) {
		var kills []benchKill
		for range b.N {
			var r benchFailoverResult
			benchRunScenario(b, "TestBenchScenarioLeaderKill", &r)
			kills = append(kills, r.Kills...)
			for i, k := range r.Kills {
				b.Logf("leader kill %d (%s): new leader %4.0f ms, its loop %4.0f ms, all worker sessions %4.0f ms, checkpoint triggered %4.0f ms, completed %4.0f ms; attempt +%d, FSM restarts +%d, coordflow_job_restarts_total +%.0f, tasks started %d",
					i+1, k.Victim, k.ElectedMS, k.LoopMS, k.SessionsMS, k.TriggerMS, k.CheckpointMS, k.AttemptDelta, k.RestartDelta, k.MetricDelta, k.TaskStarts)
			}
			b.Logf("%d records, final state exact; load average before: %s", r.Records, r.LoadAvg)
		}
		ms := func(f func(benchKill) float64) float64 { return benchMedian(benchMap(kills, f)) }
		elected := ms(func(k benchKill) float64 { return k.ElectedMS })
		ckpt := ms(func(k benchKill) float64 { return k.CheckpointMS })
		restarts := slices.Max(benchMap(kills, func(k benchKill) float64 {
			return float64(max(k.AttemptDelta, k.RestartDelta, k.TaskStarts, int(k.MetricDelta)))
		}))
		b.Logf("median over %d kills: new leader %.0f ms, all worker sessions %.0f ms, checkpoint triggered %.0f ms, next completed checkpoint %.0f ms (target <= 1200 ms); most task restarts after one kill: %.0f (target 0)",
			len(kills), elected, ms(func(k benchKill) float64 { return k.SessionsMS }), ms(func(k benchKill) float64 { return k.TriggerMS }), ckpt, restarts)
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(elected, "elected-ms")
		b.ReportMetric(ms(func(k benchKill) float64 { return k.SessionsMS }), "sessions-ms")
		b.ReportMetric(ckpt, "kill-to-checkpoint-ms")
		b.ReportMetric(restarts, "max-task-restarts")
	})
	b.Run("WorkerKill", func(b *testing.B) {
		var kills []benchKill
		for range b.N {
			var r benchFailoverResult
			benchRunScenario(b, "TestBenchScenarioWorkerKill", &r)
			kills = append(kills, r.Kills...)
			for i, k := range r.Kills {
				b.Logf("worker kill %d (%s): attempt seen %4.0f ms, deploy %4.0f ms, running %4.0f ms, first record %4.0f ms, checkpoint with progress %4.0f ms (old attempt applied %.0f items after the kill)",
					i+1, k.Victim, k.AttemptSeenMS, k.DeployMS, k.RunningMS, k.FirstRecordMS, k.ProgressMS, k.Residual)
			}
			b.Logf("%d records, final state exact; load average before: %s", r.Records, r.LoadAvg)
		}
		ms := func(f func(benchKill) float64) float64 { return benchMedian(benchMap(kills, f)) }
		first := ms(func(k benchKill) float64 { return k.FirstRecordMS })
		b.Logf("median over %d kills: deploy %.0f ms, running %.0f ms, first record %.0f ms (target <= 2000 ms), checkpoint with progress %.0f ms",
			len(kills), ms(func(k benchKill) float64 { return k.DeployMS }), ms(func(k benchKill) float64 { return k.RunningMS }),
			first, ms(func(k benchKill) float64 { return k.ProgressMS }))
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(ms(func(k benchKill) float64 { return k.DeployMS }), "kill-to-deploy-ms")
		b.ReportMetric(first, "kill-to-first-record-ms")
		b.ReportMetric(ms(func(k benchKill) float64 { return k.ProgressMS }), "kill-to-progress-checkpoint-ms")
	})
}

// benchRunScenario runs the scenario test name in a child process of this
// test binary and decodes its figures into out. The child's output is
// streamed with -v and printed on failure.
func benchRunScenario(b *testing.B, name string, out any) {
	b.Helper()
	benchRunScenarioWith(b, name, nil, benchScenarioTimeout, out)
}

// benchRunScenarioWith is benchRunScenario with extra environment for the
// child (the scenario's parameters) and its own timeout.
func benchRunScenarioWith(b *testing.B, name string, env []string, timeout time.Duration, out any) {
	b.Helper()
	if os.Getenv("COORDFLOW_IT_RACE") == "1" {
		b.Log("COORDFLOW_IT_RACE=1: the daemons are built with the race detector; these are not performance figures")
	}
	resultPath := filepath.Join(b.TempDir(), "result.json")
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0],
		"-test.run=^"+name+"$", "-test.count=1", "-test.v=true", "-test.timeout="+timeout.String())
	cmd.Env = append(append(os.Environ(), env...), benchResultEnv+"="+resultPath)
	var buf bytes.Buffer
	w := io.Writer(&buf)
	if testing.Verbose() {
		w = io.MultiWriter(&buf, os.Stdout)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Run(); err != nil {
		b.Fatalf("scenario %s (%s): %v; last lines of its output:\n%s", name, strings.Join(env, " "), err, tail(buf.String(), 150))
	}
	data, err := os.ReadFile(resultPath)
	if err != nil {
		b.Fatalf("scenario %s wrote no figures (%v); last lines of its output:\n%s", name, err, tail(buf.String(), 150))
	}
	if err := json.Unmarshal(data, out); err != nil {
		b.Fatalf("scenario %s: decode figures: %v", name, err)
	}
}

// benchScenario returns where a scenario test writes its figures, or skips
// the test when it was not started by its benchmark.
func benchScenario(t *testing.T, bench string) string {
	t.Helper()
	path := os.Getenv(benchResultEnv)
	if path == "" {
		t.Skipf("a benchmark scenario: run it with go test -run '^$' -bench %s", bench)
	}
	return path
}

// benchWriteResult writes a scenario's figures for its benchmark.
func benchWriteResult(t *testing.T, path string, v any) {
	t.Helper()
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func benchMedian(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vs))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func benchMap[T any](xs []T, f func(T) float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

// benchCPU is the CPU time used so far by each group of processes: the
// cluster's daemons by kind, this test process ("test": the plain consumer,
// the producer and the polling), and the machine as a whole ("machine");
// and the bytes each group of daemons has written to storage.
type benchCPU struct {
	at      time.Time
	seconds map[string]float64
	// written is the bytes each group of the cluster's daemons has had
	// written to storage (/proc/PID/io write_bytes).
	written map[string]float64
}

// benchClockTick is USER_HZ, the unit of /proc/stat and /proc/PID/stat
// times: 100 on every Linux this runs on.
const benchClockTick = 100

// benchCPUSnapshot reads /proc for the CPU time of every current process of
// the cluster, this process and the machine.
func benchCPUSnapshot(t *testing.T, c *cluster) benchCPU {
	t.Helper()
	snap := benchCPU{at: time.Now(), seconds: map[string]float64{}, written: map[string]float64{}}
	procTime := func(pid string) float64 {
		b, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			t.Fatalf("CPU time of %s: %v", pid, err)
		}
		// The fields after the command name (in parentheses): state is
		// field 3, utime 14 and stime 15 (man 5 proc).
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		return (ut + st) / benchClockTick
	}
	procWritten := func(pid string) float64 {
		b, err := os.ReadFile("/proc/" + pid + "/io")
		if err != nil {
			t.Fatalf("bytes written by %s: %v", pid, err)
		}
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "write_bytes:"); ok {
				n, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
				return n
			}
		}
		return 0
	}
	for _, p := range c.current() {
		if !p.hasExited() {
			pid, group := strconv.Itoa(p.cmd.Process.Pid), strings.Fields(p.name)[0]
			snap.seconds[group] += procTime(pid)
			snap.written[group] += procWritten(pid)
		}
	}
	snap.seconds["test"] = procTime("self")
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		t.Fatalf("CPU time of the machine: %v", err)
	}
	// cpu user nice system idle iowait irq softirq steal ...: busy is all
	// but idle and iowait.
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:min(9, len(f))] {
		if i == 3 || i == 4 {
			continue
		}
		n, _ := strconv.ParseFloat(v, 64)
		snap.seconds["machine"] += n / benchClockTick
	}
	return snap
}

// benchFormatCPU lists CPU seconds by group, in a fixed order.
func benchFormatCPU(m map[string]float64) string {
	return benchFormat(m, "workerd", "devkafka", "coordd", "test", "other", "machine")
}

// benchFormat lists the values of m under keys, in their order.
func benchFormat(m map[string]float64, keys ...string) string {
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1f", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// since returns the CPU seconds each group used between from and s, with
// "other" for the machine's busy time that none of the groups used, and the
// wall time between them.
func (s benchCPU) since(from benchCPU) (map[string]float64, float64) {
	d := map[string]float64{}
	var ours float64
	for k, v := range s.seconds {
		d[k] = v - from.seconds[k]
		if k != "machine" {
			ours += d[k]
		}
	}
	d["other"] = d["machine"] - ours
	return d, s.at.Sub(from.at).Seconds()
}

// writtenSince returns the MB a second each group of daemons had written to
// storage between from and s.
func (s benchCPU) writtenSince(from benchCPU) map[string]float64 {
	wall := s.at.Sub(from.at).Seconds()
	d := make(map[string]float64, len(s.written))
	for k, v := range s.written {
		d[k] = (v - from.written[k]) / wall / 1e6
	}
	return d
}

// ---- failover scenarios ----

// benchFailoverCluster starts the failover scenarios' cluster, input and job:
// wordcount with parallelism 2 and 2, checkpoints every 200 ms, over a
// steady stream of benchFailoverRate records a second. It returns when the
// job has completed a checkpoint that read records.
func benchFailoverCluster(t *testing.T, restart *chaosRestartSpec) (*cluster, *chaosStream, string) {
	t.Helper()
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
	stream := chaosStartStream(t, c.brokers(), "words", 4, 20261128, benchFailoverRate)
	spec := chaosJobSpec{jobSpec: wordcountSpec(c.brokers(), "words"), Restart: restart}
	spec.Checkpoint.Interval = "200ms"
	job := c.submitJob(t, spec)
	c.waitFor(t, 2*time.Minute, "a completed checkpoint that has read records", func() (bool, error) {
		st, err := c.getJobState(t, job)
		if err != nil {
			return false, err
		}
		return sumOffsets(st.Offsets) > 0, fmt.Errorf("checkpoint %d has read nothing", st.CheckpointID)
	})
	return c, stream, job
}

// benchFinish stops the input, waits until a checkpoint covers it and checks
// that checkpoint's state against the input word by word.
func benchFinish(t *testing.T, c *cluster, stream *chaosStream, job string) int64 {
	t.Helper()
	stream.stop(t)
	end := topicEndOffsets(t, c.brokers(), "words")
	if n := sumOffsets(end); n != stream.produced() {
		t.Fatalf("words holds %d records, the producer had %d acknowledged", n, stream.produced())
	}
	final := c.waitCaughtUp(t, 2*time.Minute, job, "words", end)
	if diff := diffCounts(final.Keyed, stream.wantAll()); diff != "" {
		t.Fatalf("checkpoint %d's state differs from the counts of the input:\n%s", final.CheckpointID, diff)
	}
	return stream.produced()
}

// benchSteady waits until the job is running and has completed a checkpoint
// triggered after from.
func benchSteady(t *testing.T, c *cluster, job string, from time.Time) {
	t.Helper()
	c.waitFor(t, 2*time.Minute, "a checkpoint completed in steady state", func() (bool, error) {
		j, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			return false, err
		}
		if j.Status != "running" {
			return false, fmt.Errorf("job is %s: %s", j.Status, j.Reason)
		}
		cp, err := benchFirstCompletedAfter(c, c.api(t), job, from)
		if err != nil {
			return false, err
		}
		return cp != nil, fmt.Errorf("no checkpoint triggered after %s has completed", from.Format("15:04:05.000"))
	})
}

func TestBenchScenarioLeaderKill(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkFailover/LeaderKill")
	res := benchFailoverResult{LoadAvg: benchLoadAvg()}
	c, stream, job := benchFailoverCluster(t, nil)
	for i := range benchKills {
		benchSteady(t, c, job, time.Now())
		leader := c.leader(t)
		var survivors []*coordProc
		for _, cp := range c.coords {
			if cp.id != leader {
				survivors = append(survivors, cp)
			}
		}
		before, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			t.Fatal(err)
		}
		metricBefore := benchJobRestartsMetric(t, c, survivors)
		startsBefore := benchTaskStarts(c)
		logFrom := map[string]int{}
		for _, s := range survivors {
			logFrom[s.id] = len(s.p.output())
		}

		k := benchKill{Victim: leader, AttemptSeenMS: -1, DeployMS: -1, RunningMS: -1, FirstRecordMS: -1, ProgressMS: -1}
		killAt := time.Now()
		c.killCoordinator(t, leader)
		benchPollUntil(t, c, time.Minute, "a new leader", func() (bool, error) {
			for _, s := range survivors {
				if st, err := c.status(s); err == nil && st.State == "Leader" {
					return true, nil
				}
			}
			return false, nil
		})
		k.ElectedMS = benchMS(time.Since(killAt))
		var cp *benchCheckpoint
		benchPollUntil(t, c, time.Minute, "the first checkpoint triggered after the kill to complete", func() (bool, error) {
			var err error
			cp, err = benchFirstCompletedAfter(c, survivors[0].httpAddr, job, killAt)
			return cp != nil, err
		})
		k.CheckpointMS = benchMS(cp.ended(t).Sub(killAt))
		k.TriggerMS = benchMS(cp.triggered(t).Sub(killAt))
		// Where the time went, from the new leader's log.
		newLeader := c.leader(t)
		log := c.coordinator(t, newLeader).p.output()[logFrom[newLeader]:]
		k.LoopMS, k.SessionsMS = -1, -1
		if ts := benchLogTimes(log, "leader loop started", ""); len(ts) > 0 {
			k.LoopMS = benchMS(ts[0].Sub(killAt))
		}
		for _, w := range c.workers {
			ts := benchLogTimes(log, "worker session opened", " worker="+w.id+" ")
			if len(ts) == 0 {
				k.SessionsMS = -1
				t.Logf("the new leader %s logged no session of worker %s", newLeader, w.id)
				break
			}
			k.SessionsMS = max(k.SessionsMS, benchMS(ts[0].Sub(killAt)))
		}

		// Restarts show up, if at all, soon after the new leader reconciles:
		// give it two more checkpoints, then bring the old leader back.
		benchSteady(t, c, job, cp.ended(t))
		after, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			t.Fatal(err)
		}
		k.AttemptDelta = int(after.Attempt) - int(before.Attempt)
		k.RestartDelta = after.Restarts - before.Restarts
		k.MetricDelta = benchJobRestartsMetric(t, c, survivors) - metricBefore
		k.TaskStarts = benchTaskStarts(c) - startsBefore
		t.Logf("leader kill %d (%s): new leader %s elected %.0f ms, loop %.0f ms, all worker sessions %.0f ms; checkpoint %d triggered %.0f ms, completed %.0f ms after the kill; attempt %d -> %d, restarts %d -> %d, restart metric +%.0f, task starts %d",
			i+1, leader, newLeader, k.ElectedMS, k.LoopMS, k.SessionsMS, cp.ID, k.TriggerMS, k.CheckpointMS, before.Attempt, after.Attempt, before.Restarts, after.Restarts, k.MetricDelta, k.TaskStarts)
		res.Kills = append(res.Kills, k)

		c.restartCoordinator(t, leader)
		c.leader(t)
	}
	res.Records = benchFinish(t, c, stream, job)
	benchWriteResult(t, resultPath, res)
}

// benchResetAfter is the worker-kill scenario's restart.reset_after: each
// kill comes after the job has run this long, so every kill meets the first
// step of the restart backoff (restart.initial, 100 ms), as an isolated
// failure does. With the default reset_after (10 minutes) the n-th kill
// would wait 100 ms * 2^(n-1): that is the backoff policy, not failover.
const benchResetAfter = 4 * time.Second

func TestBenchScenarioWorkerKill(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkFailover/WorkerKill")
	res := benchFailoverResult{LoadAvg: benchLoadAvg()}
	c, stream, job := benchFailoverCluster(t, &chaosRestartSpec{Initial: "100ms", Max: "30s", ResetAfter: benchResetAfter.String()})
	rng := rand.New(rand.NewPCG(20261128, 1))
	deployed := time.Now()
	for i := range benchKills {
		c.waitFor(t, time.Minute, "the attempt to have run for restart.reset_after", func() (bool, error) {
			return time.Since(deployed) > benchResetAfter+500*time.Millisecond, nil
		})
		benchSteady(t, c, job, time.Now())
		before, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			t.Fatal(err)
		}
		restored := c.jobState(t, job)
		var busy []string
		for _, task := range before.Tasks {
			if !slices.Contains(busy, task.Worker) {
				busy = append(busy, task.Worker)
			}
		}
		slices.Sort(busy)
		victim := busy[rng.IntN(len(busy))]
		var survivor *workerProc
		for _, w := range c.workers {
			if w.id != victim {
				survivor = w
			}
		}
		sampler := benchStartSampler(c, survivor, job)
		logFrom := len(survivor.p.output())

		k := benchKill{Victim: victim, ElectedMS: -1, CheckpointMS: -1}
		killAt := time.Now()
		c.killWorker(t, victim)
		var after benchJob
		benchPollUntil(t, c, time.Minute, "a new attempt", func() (bool, error) {
			j, err := benchGetJob(c, c.api(t), job)
			if err != nil {
				return false, err
			}
			after = j
			return j.Attempt > before.Attempt, fmt.Errorf("attempt %d, %s %s", j.Attempt, j.Status, j.Reason)
		})
		k.AttemptSeenMS = benchMS(time.Since(killAt))
		deployed = time.Now()
		// The survivor runs every task of the new attempt: it logs a
		// "deploying task" and a "task running" line for each.
		var deploys, runs []time.Time
		c.waitFor(t, time.Minute, "every task of the new attempt running on "+survivor.id, func() (bool, error) {
			j, err := benchGetJob(c, c.api(t), job)
			if err != nil {
				return false, err
			}
			if j.Attempt != after.Attempt {
				return false, fmt.Errorf("attempt %d, then %d: more than one restart", after.Attempt, j.Attempt)
			}
			log := survivor.p.output()[logFrom:]
			attempt := fmt.Sprintf(" attempt=%d ", after.Attempt)
			deploys = benchLogTimes(log, "deploying task", attempt)
			runs = benchLogTimes(log, "task running", attempt)
			return len(j.Tasks) > 0 && len(deploys) > 0 && len(runs) == len(j.Tasks), fmt.Errorf("%d of %d tasks running", len(runs), len(j.Tasks))
		})
		firstDeploy, firstRunning, lastRunning := slices.MinFunc(deploys, time.Time.Compare), slices.MinFunc(runs, time.Time.Compare), slices.MaxFunc(runs, time.Time.Compare)
		k.DeployMS, k.RunningMS = benchMS(firstDeploy.Sub(killAt)), benchMS(lastRunning.Sub(killAt))
		var first time.Time
		c.waitFor(t, time.Minute, "the new attempt to apply a record", func() (bool, error) {
			var err error
			first, k.Residual, err = sampler.firstIncrease(killAt, firstDeploy, firstRunning)
			return err == nil, err
		})
		k.FirstRecordMS = benchMS(first.Sub(killAt))
		sampler.stop()

		var progress *benchCheckpoint
		c.waitFor(t, time.Minute, "a checkpoint of the new attempt past the restored offsets", func() (bool, error) {
			cps, err := benchCheckpoints(c, c.api(t), job)
			if err != nil {
				return false, err
			}
			for _, cp := range cps {
				if cp.Status == "completed" && cp.Attempt == after.Attempt && cp.offsetSum() > sumOffsets(restored.Offsets) &&
					(progress == nil || cp.ID < progress.ID) {
					progress = &cp
				}
			}
			return progress != nil, fmt.Errorf("none yet")
		})
		k.ProgressMS = benchMS(progress.ended(t).Sub(killAt))
		t.Logf("worker kill %d (%s, %s survives): attempt %d -> %d seen %.0f ms; deploy %.0f ms; running %.0f ms; first record %.0f ms; checkpoint %d with progress %.0f ms; %.0f items applied by the old attempt after the kill",
			i+1, victim, survivor.id, before.Attempt, after.Attempt, k.AttemptSeenMS, k.DeployMS, k.RunningMS, k.FirstRecordMS, progress.ID, k.ProgressMS, k.Residual)
		res.Kills = append(res.Kills, k)

		c.chaosRestartWorker(t, victim)
		c.waitFor(t, time.Minute, "coordinators to see worker "+victim+" alive", func() (bool, error) {
			return c.memberStatusIs(victim, "alive")
		})
	}
	res.Records = benchFinish(t, c, stream, job)
	benchWriteResult(t, resultPath, res)
}

// benchLoadAvg returns the first three fields of /proc/loadavg: how busy the
// machine was before a scenario started.
func benchLoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

func benchMS(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// benchPollUntil polls cond every benchPoll until it reports true, failing
// the test after timeout or as soon as a process exits unexpectedly. It is
// cluster.waitFor with an interval short enough to time what it waits for,
// and without its logging.
func benchPollUntil(t *testing.T, c *cluster, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	ticker := time.NewTicker(benchPoll)
	defer ticker.Stop()
	var lastErr error
	for {
		if err := c.unexpectedExits(); err != nil {
			t.Fatalf("while waiting for %s: %v", what, err)
		}
		ok, err := cond()
		if ok {
			return
		}
		if err != nil {
			lastErr = err
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last reason: %v", timeout, what, lastErr)
		}
		<-ticker.C
	}
}

// ---- API, metrics and log readers ----

// benchJob is GET /v1/jobs/{id} with the fields the benchmarks read.
type benchJob struct {
	Status   string     `json:"status"`
	Reason   string     `json:"reason"`
	Attempt  uint64     `json:"attempt"`
	Restarts int        `json:"restarts"`
	Tasks    []taskView `json:"tasks"`
	// Recoveries are the job's recoveries, oldest first: scope "tasks"
	// restarted only the tasks a lost worker ran, "job" every task.
	Recoveries []struct {
		Scope string   `json:"scope"`
		Tasks []string `json:"tasks"`
	} `json:"recoveries"`
	LastCheckpoint *struct {
		ID          uint64 `json:"id"`
		CompletedAt string `json:"completed_at"`
	} `json:"last_checkpoint"`
}

func benchGetJob(c *cluster, addr, job string) (benchJob, error) {
	var j benchJob
	err := c.call("GET", addr, "/v1/jobs/"+job, nil, &j)
	return j, err
}

// benchCheckpoint is one entry of GET /v1/jobs/{id}/checkpoints.
type benchCheckpoint struct {
	ID          uint64  `json:"id"`
	Attempt     uint64  `json:"attempt"`
	Status      string  `json:"status"`
	TriggerTime string  `json:"trigger_time"`
	EndTime     string  `json:"end_time"`
	DurationMS  float64 `json:"duration_ms"`
	Reason      string  `json:"reason"`
	Tasks       []struct {
		ID        string           `json:"id"`
		Kind      string           `json:"kind"`
		StateSize int              `json:"state_size"`
		Offsets   map[string]int64 `json:"offsets"`
		// AlignmentMS is a map task's barrier alignment, where the API
		// reports it.
		AlignmentMS *float64 `json:"alignment_ms"`
	} `json:"tasks"`
}

func benchCheckpoints(c *cluster, addr, job string) ([]benchCheckpoint, error) {
	var cps []benchCheckpoint
	err := c.call("GET", addr, "/v1/jobs/"+job+"/checkpoints", nil, &cps)
	return cps, err
}

// triggered and ended are the checkpoint's trigger and end times, as the
// leaders that triggered and ended it took them.
func (cp benchCheckpoint) triggered(t *testing.T) time.Time {
	return cp.time(t, "trigger", cp.TriggerTime)
}
func (cp benchCheckpoint) ended(t *testing.T) time.Time { return cp.time(t, "end", cp.EndTime) }

func (cp benchCheckpoint) time(t *testing.T, what, s string) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("checkpoint %d: %s time %q: %v", cp.ID, what, s, err)
	}
	return at
}

// offsetSum adds up the source tasks' offsets: records read before it.
func (cp benchCheckpoint) offsetSum() int64 {
	var n int64
	for _, task := range cp.Tasks {
		n += sumOffsets(task.Offsets)
	}
	return n
}

// covers reports whether the checkpoint's sources had read every partition
// of topic up to end.
func (cp benchCheckpoint) covers(topic string, end map[int32]int64) bool {
	offsets := map[string]int64{}
	for _, task := range cp.Tasks {
		maps.Copy(offsets, task.Offsets)
	}
	for p, e := range end {
		if offsets[fmt.Sprintf("%s/%d", topic, p)] < e {
			return false
		}
	}
	return true
}

// benchFirstCompletedAfter returns the completed checkpoint with the lowest
// id among those triggered after from, or nil if there is none yet.
func benchFirstCompletedAfter(c *cluster, addr, job string, from time.Time) (*benchCheckpoint, error) {
	cps, err := benchCheckpoints(c, addr, job)
	if err != nil {
		return nil, err
	}
	var first *benchCheckpoint
	for _, cp := range cps {
		at, err := time.Parse(time.RFC3339Nano, cp.TriggerTime)
		if err != nil {
			return nil, fmt.Errorf("checkpoint %d: trigger time %q: %w", cp.ID, cp.TriggerTime, err)
		}
		if cp.Status == "completed" && at.After(from) && (first == nil || cp.ID < first.ID) {
			first = &cp
		}
	}
	return first, nil
}

// benchMetric adds up the samples of the named metric whose labels contain
// every one of labels (`name="value"`), in Prometheus text format.
func benchMetric(text, name string, labels ...string) float64 {
	var sum float64
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		set, value, ok := strings.Cut(rest, "} ")
		if !ok || slices.ContainsFunc(labels, func(l string) bool { return !strings.Contains(set, l) }) {
			continue
		}
		if v, err := strconv.ParseFloat(strings.Fields(value)[0], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// benchMetricBy adds up the samples of the named metric by the value of
// their label, in one pass over text: the scenarios read one counter of
// every job from a leader's metrics, and a pass per job over text that
// holds every job's series would cost the test process seconds of CPU
// inside the window it measures.
func benchMetricBy(text, name, label string) map[string]float64 {
	out := make(map[string]float64)
	prefix := label + `="`
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		set, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		_, key, found := strings.Cut(set, prefix)
		if !found {
			continue
		}
		key, _, _ = strings.Cut(key, `"`)
		if v, err := strconv.ParseFloat(strings.Fields(value)[0], 64); err == nil {
			out[key] += v
		}
	}
	return out
}

// benchJobRestartsMetric sums coordflow_job_restarts_total over coords.
func benchJobRestartsMetric(t *testing.T, c *cluster, coords []*coordProc) float64 {
	t.Helper()
	var sum float64
	for _, cp := range coords {
		resp, err := c.client.Get("http://" + cp.httpAddr + "/metrics")
		if err != nil {
			t.Fatalf("coordd %s metrics: %v", cp.id, err)
		}
		text, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("coordd %s metrics: %v", cp.id, err)
		}
		s, _ := metricSum(string(text), "coordflow_job_restarts_total")
		sum += s
	}
	return sum
}

// benchTaskStarts counts the "task running" lines in the logs of the
// workers' current runs.
func benchTaskStarts(c *cluster) int {
	n := 0
	for _, w := range c.workers {
		n += strings.Count(w.p.output(), `msg="task running"`)
	}
	return n
}

// benchLogTimes returns the times of the log lines (slog text) with message
// msg that contain match.
func benchLogTimes(log, msg, match string) []time.Time {
	var out []time.Time
	for line := range strings.Lines(log) {
		if !strings.Contains(line, `msg="`+msg+`"`) || !strings.Contains(line, match) {
			continue
		}
		ts, ok := strings.CutPrefix(strings.Fields(line)[0], "time=")
		if !ok {
			continue
		}
		if at, err := time.Parse(time.RFC3339Nano, ts); err == nil {
			out = append(out, at)
		}
	}
	return out
}

// benchSampler polls one worker's count of the job's items applied by map
// tasks (those whose labels match, when the sampler was given any) every
// benchPoll, with the time of each sample.
type benchSampler struct {
	cancel  context.CancelFunc
	done    chan struct{}
	mu      sync.Mutex
	samples []benchSample
}

type benchSample struct {
	at      time.Time
	applied float64
}

func benchStartSampler(c *cluster, w *workerProc, job string, labels ...string) *benchSampler {
	labels = append([]string{`job="` + job + `"`, `kind="map"`}, labels...)
	ctx, cancel := context.WithCancel(context.Background())
	s := &benchSampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		ticker := time.NewTicker(benchPoll)
		defer ticker.Stop()
		for {
			if text, err := c.workerMetrics(w); err == nil {
				v := benchMetric(text, "coordflow_records_in_total", labels...)
				s.mu.Lock()
				s.samples = append(s.samples, benchSample{at: time.Now(), applied: v})
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-ticker.C:
			}
		}
	}()
	return s
}

func (s *benchSampler) stop() {
	s.cancel()
	<-s.done
}

// firstIncrease returns the time of the first sample after firstRunning
// whose count exceeds that of the last sample before it: the first item the
// new attempt applied (the worker stops the old attempt's tasks before it
// starts any task of the new one). residual is what the count grew between
// the kill and the first deploy of the new attempt: items of the old attempt
// applied after the kill.
func (s *benchSampler) firstIncrease(killAt, firstDeploy, firstRunning time.Time) (at time.Time, residual float64, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var base, atKill, atDeploy *benchSample
	for i := range s.samples {
		smp := &s.samples[i]
		if !smp.at.After(killAt) {
			atKill = smp
		}
		if smp.at.Before(firstDeploy) {
			atDeploy = smp
		}
		if smp.at.Before(firstRunning) {
			base = smp
			continue
		}
		if base == nil {
			return time.Time{}, 0, fmt.Errorf("no sample before the first task ran at %s", firstRunning.Format("15:04:05.000"))
		}
		if smp.applied > base.applied {
			if atKill != nil && atDeploy != nil {
				residual = atDeploy.applied - atKill.applied
			}
			return smp.at, residual, nil
		}
	}
	return time.Time{}, 0, fmt.Errorf("%d samples, no increase yet", len(s.samples))
}
