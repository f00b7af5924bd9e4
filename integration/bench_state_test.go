package integration

// BenchmarkState: the figures of the issue "State for real". For 1M and 10M
// distinct keys with 100-byte values, on each state backend: checkpoint
// duration p50/p99 while 1% of the keys change per second, bytes written to
// checkpoint storage per checkpoint, Raft log bytes per checkpoint, coordd and
// workerd peak RSS, and the time from a worker SIGKILL to the restored
// attempt's first record; then the job's exported state is checked key by key
// against the input. Targets at 10M keys: checkpoint p50 <= 1 s, Raft <= 64 KiB
// per checkpoint whatever the state size, coordd RSS <= 150 MB, and with disk
// a workerd RSS <= 512 MB.
//
// The scenario: devkafka, 3 coordd, 2 workerd (4 slots each, so that either
// can run the whole job), checkpoint storage in a file:// directory. It
// produces N records (key i is "k%09d", always in partition i mod 4, so its
// updates stay in order; its value is a function of i and a version) before
// the job starts, runs the job (operator latest, parallelism 2 and 2,
// checkpoints every 1 s, inline threshold 16 KiB) until a checkpoint covers
// them, then updates random keys at 1% of N a second until 20 checkpoints
// triggered since have completed: that is the measured phase. Then it reads
// every process's VmHWM, SIGKILLs the worker running map-0 while the updates
// go on, and finally stops them and compares the export of a checkpoint
// covering all input with the latest value of every key (the test process
// keeps one version counter per key, not the values). With the memory
// backend at 10M keys the surviving worker holds the whole state: expect
// several GB of RAM.
//
// Run it alone on the machine (docs/benchmarks.md), one combination at a
// time, with a go test -timeout that covers it (a 10M run takes minutes):
//
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkState/keys=1M/backend=memory$' -benchtime 1x -timeout 2h -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkState/keys=10M/backend=disk$' -benchtime 1x -timeout 2h -v
//
// -bench 'BenchmarkState$' runs all four combinations one after the other.
// COORDFLOW_BENCH_STATE_KEYS (a comma-separated list of key counts: 200k, 1M,
// 10000000) and COORDFLOW_BENCH_STATE_BACKEND (memory, disk or both,
// comma-separated) replace the default lists, and
// COORDFLOW_BENCH_STATE_CHECKPOINTS the number of checkpoints the churn phase
// measures (default 20), and COORDFLOW_BENCH_STATE_INTERVAL the checkpoint
// interval (default 1s; the churn is 1% of the keys per interval, so a longer
// interval is a slower churn, one a job that cannot update 1% of its keys a
// second keeps up with):
//
//	COORDFLOW_BENCH_STATE_KEYS=200k flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench BenchmarkState -benchtime 1x -timeout 1h
//
// Like the other benchmarks (bench_test.go), each combination runs its
// scenario, TestBenchScenarioState, in a child process of the test binary;
// the benchmark passes the combination in the same environment variables
// (one value each) and reads the figures the child writes as JSON.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

const (
	benchStateKeysEnv        = "COORDFLOW_BENCH_STATE_KEYS"
	benchStateBackendEnv     = "COORDFLOW_BENCH_STATE_BACKEND"
	benchStateCheckpointsEnv = "COORDFLOW_BENCH_STATE_CHECKPOINTS"
	benchStateIntervalEnv    = "COORDFLOW_BENCH_STATE_INTERVAL"
	// benchStateScenarioTimeout bounds one scenario run (the child process):
	// a 10M-key run produces 1.1 GB of input and exports as much.
	benchStateScenarioTimeout = 90 * time.Minute
	benchStateTopic           = "state"
	benchStatePartitions      = 4
	benchStateKeyBytes        = 10 // "k%09d"
	benchStateValueBytes      = 100
	// benchStateChurnPerInterval is the share of the keys the churn phase
	// updates per checkpoint interval.
	benchStateChurnPerInterval = 0.01
	// benchStateCheckpoints is how many checkpoints the churn phase
	// measures, at least (COORDFLOW_BENCH_STATE_CHECKPOINTS overrides it).
	benchStateCheckpoints = 20
	// benchStatePoll is how often the collector reads the checkpoint list and
	// the coordinators' metrics. With retained 3 and 1 s checkpoints no
	// completed checkpoint leaves the list before it is seen.
	benchStatePoll = 200 * time.Millisecond
)

// benchStateResult is what TestBenchScenarioState measures. Times in ms are
// from the SIGKILL of the victim worker; sizes are bytes unless named MB
// (10^6 bytes).
type benchStateResult struct {
	Keys int `json:"keys"`
	// IntervalSeconds is the checkpoint interval; the churn is 1% of the
	// keys per interval.
	IntervalSeconds float64 `json:"interval_s"`
	Backend         string  `json:"backend"`
	ValueBytes      int     `json:"value_bytes"`
	LoadAvg         string  `json:"loadavg"` // /proc/loadavg before the cluster started

	// Load: every key once, produced before the job starts.
	ProduceSeconds       float64 `json:"produce_s"`
	LoadSeconds          float64 `json:"load_s"` // job submission to the end time of the first checkpoint covering the load
	LoadCheckpoints      int     `json:"load_checkpoints"`
	LoadAborted          int     `json:"load_aborted"`
	LoadCheckpointMaxMS  float64 `json:"load_checkpoint_max_ms"`
	LoadCoveringID       uint64  `json:"load_covering_id"`
	LoadCoveringKeys     int64   `json:"load_covering_keys"`
	LoadCoveringWritten  int64   `json:"load_covering_written"`
	FullSnapshotBytesMax int64   `json:"full_snapshot_bytes_max"` // largest bytes written by a checkpoint in which every map task wrote a full file (whole state)

	// Churn: 1% of the keys per interval, random existing keys, new values.
	ChurnSeconds    float64   `json:"churn_s"`
	ChurnRecords    int64     `json:"churn_records"` // produced in the measured phase
	ChurnRate       float64   `json:"churn_rate"`    // records a second achieved in the measured phase
	ChurnTargetRate float64   `json:"churn_target_rate"`
	Checkpoints     int       `json:"checkpoints"` // completed, triggered in the phase
	Aborted         int       `json:"aborted"`
	AbortReasons    []string  `json:"abort_reasons,omitempty"`
	DurationsMS     []float64 `json:"durations_ms"`
	DurationP50MS   float64   `json:"duration_p50_ms"`
	DurationP99MS   float64   `json:"duration_p99_ms"`
	DurationMaxMS   float64   `json:"duration_max_ms"`
	// Bytes the map tasks wrote per checkpoint (sum of their state_size).
	Written         []int64 `json:"written"`
	WrittenP50      float64 `json:"written_p50"`
	WrittenMean     float64 `json:"written_mean"`
	WrittenMax      float64 `json:"written_max"`
	FullCheckpoints int     `json:"full_checkpoints"` // checkpoints in which some map task started a new chain (one file)
	FilesPerTaskMax int     `json:"files_per_task_max"`
	FilesPerTask    [][]int `json:"files_per_task"` // per checkpoint: the chain length of each map task, by task id
	// ChurnLag is the input produced by the end of the phase that the last
	// checkpoint completed by then had not read: whether the job kept up.
	ChurnLag int64 `json:"churn_lag"`
	// Restarts is the job's attempt before the kill minus one: restarts
	// nobody caused (0 expected).
	Restarts uint64 `json:"restarts"`
	// Elections is how far the Raft term moved from the job's submission to
	// the end of the churn phase (0 expected: every election aborts the
	// pending checkpoint as "leader changed").
	Elections uint64 `json:"elections"`
	// Raft: coordflow_raft_apply_bytes_total of every coordinator (each
	// counts what it committed as leader), after minus before the phase,
	// over the checkpoints completed meanwhile (coordflow_checkpoints_completed_total).
	RaftCheckpointsCounted float64          `json:"raft_checkpoints_counted"`
	RaftBytesPerCheckpoint float64          `json:"raft_bytes_per_checkpoint"` // Triggered + Completed + Aborted commands
	RaftTriggeredPerCkpt   float64          `json:"raft_triggered_bytes_per_checkpoint"`
	RaftCompletedPerCkpt   float64          `json:"raft_completed_bytes_per_checkpoint"`
	RaftAbortedBytes       float64          `json:"raft_aborted_bytes"`
	RaftCompletedMax       float64          `json:"raft_completed_bytes_max"` // largest CheckpointCompleted seen alone between two scrapes
	RaftCompletedSamples   int              `json:"raft_completed_samples"`
	StorageBytes           int64            `json:"storage_bytes"` // checkpoint storage dir at the end of the phase
	StorageFiles           int              `json:"storage_files"`
	StorageMaxBytes        int64            `json:"storage_max_bytes"`      // largest seen during the phase (sampled every 2 s)
	WorkerStateDirBytes    map[string]int64 `json:"worker_state_dir_bytes"` // each worker's -state-dir at the end of the phase

	// Memory: VmHWM of each process at the end of the churn phase, in MB.
	PeakRSSMB        map[string]float64 `json:"peak_rss_mb"` // by process ("coordd c1")
	CoorddPeakRSSMB  float64            `json:"coordd_peak_rss_mb"`
	WorkerdPeakRSSMB float64            `json:"workerd_peak_rss_mb"`
	DevkafkaRSSMB    float64            `json:"devkafka_peak_rss_mb"`

	// Recovery: SIGKILL of the worker running map-0; the other worker
	// (4 slots) runs every task of the restored attempt.
	Victim      string   `json:"victim"`
	Survivor    string   `json:"survivor"`
	VictimTasks []string `json:"victim_tasks"`
	// RecoveryScope is the scope of the recovery after the kill: "tasks"
	// (only the victim's tasks restarted) or "job".
	RecoveryScope      string   `json:"recovery_scope"`
	RestoredCheckpoint uint64   `json:"restored_checkpoint"`
	AttemptSeenMS      float64  `json:"attempt_seen_ms"`
	DeployMS           float64  `json:"deploy_ms"`            // first "deploying task" of the new attempt
	RunningMS          float64  `json:"running_ms"`           // last "task running" of the new attempt (after the restore)
	FirstRecordMS      float64  `json:"first_record_ms"`      // the survivor's map tasks applied a record of the new attempt (10 ms poll)
	CheckpointMS       float64  `json:"checkpoint_ms"`        // end of the first completed checkpoint of the new attempt
	ProgressMS         float64  `json:"progress_ms"`          // end of the first one past the restored offsets
	RestoreLines       []string `json:"restore_lines"`        // the survivor's "restored keyed state" log lines
	SurvivorPeakRSSMB  float64  `json:"survivor_peak_rss_mb"` // VmHWM of the survivor after it restored every map task
	SurvivorStateBytes int64    `json:"survivor_state_dir_bytes"`

	// Verification: the export of a checkpoint covering all input against
	// the latest value produced for every key.
	TotalRecords            int64    `json:"total_records"`
	CatchUpSeconds          float64  `json:"catch_up_s"` // end of the input to the end time of the first checkpoint covering it
	ExportCheckpoint        uint64   `json:"export_checkpoint"`
	ExportSeconds           float64  `json:"export_s"`
	ExportBytes             int64    `json:"export_bytes"`
	ExportKeys              int64    `json:"export_keys"`
	Missing                 int64    `json:"missing"`
	Extra                   int64    `json:"extra"`
	Wrong                   int64    `json:"wrong"`
	Duplicates              int64    `json:"duplicates"`
	MismatchExamples        []string `json:"mismatch_examples,omitempty"`
	CoorddPeakRSSAfterExpMB float64  `json:"coordd_peak_rss_after_export_mb"`
}

// BenchmarkState runs TestBenchScenarioState for every combination of key
// count and backend (see the top of this file) and reports its figures.
func BenchmarkState(b *testing.B) {
	keys := []int{1_000_000, 10_000_000}
	if s := os.Getenv(benchStateKeysEnv); s != "" {
		keys = nil
		for f := range strings.SplitSeq(s, ",") {
			n, err := benchStateParseCount(strings.TrimSpace(f))
			if err != nil {
				b.Fatalf("%s: %v", benchStateKeysEnv, err)
			}
			keys = append(keys, n)
		}
	}
	backends := []string{"memory", "disk"}
	if s := os.Getenv(benchStateBackendEnv); s != "" {
		backends = strings.Split(s, ",")
	}
	for _, n := range keys {
		for _, backend := range backends {
			backend = strings.TrimSpace(backend)
			b.Run(fmt.Sprintf("keys=%s/backend=%s", benchStateCountName(n), backend), func(b *testing.B) {
				benchState(b, n, backend)
			})
		}
	}
}

func benchState(b *testing.B, n int, backend string) {
	var runs []benchStateResult
	for i := range b.N {
		var r benchStateResult
		benchStateRunScenario(b, []string{
			benchStateKeysEnv + "=" + strconv.Itoa(n),
			benchStateBackendEnv + "=" + backend,
		}, &r)
		runs = append(runs, r)
		b.Logf("run %d: %s", i+1, r.summary())
	}
	med := func(f func(benchStateResult) float64) float64 { return benchMedian(benchMap(runs, f)) }
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.DurationP50MS }), "ckpt-p50-ms")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.DurationP99MS }), "ckpt-p99-ms")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.WrittenMean }), "written-B/ckpt")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.RaftBytesPerCheckpoint }), "raft-B/ckpt")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.RaftCompletedMax }), "raft-max-completed-B")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.CoorddPeakRSSMB }), "coordd-rss-MB")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.WorkerdPeakRSSMB }), "workerd-rss-MB")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.SurvivorPeakRSSMB }), "survivor-rss-MB")
	b.ReportMetric(med(func(r benchStateResult) float64 { return float64(r.StorageBytes) / 1e6 }), "storage-MB")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.FirstRecordMS }), "kill-to-first-record-ms")
	b.ReportMetric(med(func(r benchStateResult) float64 { return r.CheckpointMS }), "kill-to-checkpoint-ms")
}

// summary is the one-line account of a run.
func (r benchStateResult) summary() string {
	return fmt.Sprintf("%s keys, %s backend, %gs interval: load %.1fs (produce %.1fs); churn %.0f rec/s (lag %d) over %d checkpoints (%d aborted, %d full, %d restarts, %d elections): "+
		"duration p50 %.0f ms, p99 %.0f ms, max %.0f ms; written p50 %.2f MB, mean %.2f MB, max %.2f MB; files/task max %d; "+
		"Raft %.0f B/checkpoint (completed %.0f, largest %.0f); storage %.1f MB (max %.1f MB) in %d files; "+
		"peak RSS coordd %.0f MB, workerd %.0f MB, survivor after restore %.0f MB, devkafka %.0f MB; "+
		"kill of %s: first record %.0f ms, checkpoint %.0f ms, with progress %.0f ms; "+
		"export of checkpoint %d: %d keys in %.1fs, %d missing, %d extra, %d wrong, %d duplicated; coordd peak RSS after export %.0f MB; load average before: %s",
		benchStateCountName(r.Keys), r.Backend, r.IntervalSeconds, r.LoadSeconds, r.ProduceSeconds, r.ChurnRate, r.ChurnLag, r.Checkpoints, r.Aborted, r.FullCheckpoints, r.Restarts, r.Elections,
		r.DurationP50MS, r.DurationP99MS, r.DurationMaxMS, r.WrittenP50/1e6, r.WrittenMean/1e6, r.WrittenMax/1e6, r.FilesPerTaskMax,
		r.RaftBytesPerCheckpoint, r.RaftCompletedPerCkpt, r.RaftCompletedMax, float64(r.StorageBytes)/1e6, float64(r.StorageMaxBytes)/1e6, r.StorageFiles,
		r.CoorddPeakRSSMB, r.WorkerdPeakRSSMB, r.SurvivorPeakRSSMB, r.DevkafkaRSSMB,
		r.Victim, r.FirstRecordMS, r.CheckpointMS, r.ProgressMS,
		r.ExportCheckpoint, r.ExportKeys, r.ExportSeconds, r.Missing, r.Extra, r.Wrong, r.Duplicates, r.CoorddPeakRSSAfterExpMB, r.LoadAvg)
}

// benchStateRunScenario runs TestBenchScenarioState with the combination in
// env and a longer timeout.
func benchStateRunScenario(b *testing.B, env []string, out any) {
	b.Helper()
	benchRunScenarioWith(b, "TestBenchScenarioState", env, benchStateScenarioTimeout, out)
}

// benchStateParseCount reads a key count: 200000, 200k, 1M.
func benchStateParseCount(s string) (int, error) {
	mult := 1
	switch {
	case strings.HasSuffix(s, "k"), strings.HasSuffix(s, "K"):
		mult, s = 1_000, s[:len(s)-1]
	case strings.HasSuffix(s, "M"), strings.HasSuffix(s, "m"):
		mult, s = 1_000_000, s[:len(s)-1]
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n*mult > 999_999_999 {
		return 0, fmt.Errorf("key count %q: want a positive number below 10^9, with an optional k or M", s)
	}
	return n * mult, nil
}

func benchStateCountName(n int) string {
	switch {
	case n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n%1_000 == 0:
		return fmt.Sprintf("%dk", n/1_000)
	}
	return strconv.Itoa(n)
}

// ---- the scenario ----

func TestBenchScenarioState(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkState")
	n, err := benchStateParseCount(os.Getenv(benchStateKeysEnv))
	if err != nil {
		t.Fatalf("%s: %v", benchStateKeysEnv, err)
	}
	backend := os.Getenv(benchStateBackendEnv)
	if backend != "memory" && backend != "disk" {
		t.Fatalf("%s=%q: want memory or disk", benchStateBackendEnv, backend)
	}
	minCheckpoints := benchStateCheckpoints
	if s := os.Getenv(benchStateCheckpointsEnv); s != "" {
		if minCheckpoints, err = strconv.Atoi(s); err != nil || minCheckpoints < 1 {
			t.Fatalf("%s=%q: want a positive number", benchStateCheckpointsEnv, s)
		}
	}
	interval := time.Second
	if s := os.Getenv(benchStateIntervalEnv); s != "" {
		if interval, err = time.ParseDuration(s); err != nil || interval < 100*time.Millisecond {
			t.Fatalf("%s=%q: want a duration of at least 100ms", benchStateIntervalEnv, s)
		}
	}
	res := benchStateResult{Keys: n, Backend: backend, ValueBytes: benchStateValueBytes, LoadAvg: benchLoadAvg(), IntervalSeconds: interval.Seconds()}
	// Deadlines grow with the state: at 10M keys a phase takes minutes.
	scaled := func(base time.Duration, perMillion time.Duration) time.Duration {
		return base + time.Duration(float64(perMillion)*float64(n)/1e6)
	}

	// 1. The cluster. Each worker gets its own -state-dir, to measure it;
	// 4 slots each, so that either one can run every task of the job.
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, topics: map[string]int32{benchStateTopic: benchStatePartitions}})
	stateDirs := map[string]string{}
	for _, id := range []string{"w1", "w2"} {
		stateDirs[id] = filepath.Join(t.TempDir(), "state-"+id)
		c.startWorkerWith(t, id, 4, "-state-dir", stateDirs[id])
	}
	storeDir := t.TempDir()

	// 2. Load: every key once, as fast as the producers go, before the job
	// starts (so that the two do not share the cores).
	in := newBenchStateInput(n)
	produceStart := time.Now()
	if err := in.load(c.brokers()); err != nil {
		t.Fatal(err)
	}
	res.ProduceSeconds = time.Since(produceStart).Seconds()
	end := topicEndOffsets(t, c.brokers(), benchStateTopic)
	if got := sumOffsets(end); got != int64(n) {
		t.Fatalf("%s holds %d records after producing %d", benchStateTopic, got, n)
	}
	t.Logf("produced %d records (%d-byte keys, %d-byte values) in %.1fs = %.0f records/s",
		n, benchStateKeyBytes, benchStateValueBytes, res.ProduceSeconds, float64(n)/res.ProduceSeconds)

	spec := jobSpec{
		Name:     "state-" + backend,
		Source:   sourceSpec{Brokers: c.brokers(), Topic: benchStateTopic, Start: "earliest", Parallelism: 2},
		Operator: operatorSpec{Name: "latest", Parallelism: 2, MaxParallelism: 128},
		State:    &stateSpec{Backend: backend},
		Checkpoint: checkpointSpec{
			Interval: interval.String(), Timeout: "60s", MinPause: "0s", Retained: 3, TolerableFailures: 3,
			Storage: "file://" + storeDir, InlineThreshold: 16384,
		},
	}
	termAtSubmit := benchStateTerm(t, c)
	submitted := time.Now()
	job := c.submitJob(t, spec)
	col := benchStartStateCollector(c, job, storeDir)
	t.Cleanup(col.stop)

	var covering benchStateCheckpoint
	c.waitFor(t, scaled(2*time.Minute, 2*time.Minute), "a completed checkpoint covering the load", func() (bool, error) {
		cp, ok := col.firstCovering(end)
		covering = cp
		return ok, col.why()
	})
	res.LoadSeconds = covering.ended(t).Sub(submitted).Seconds()
	res.LoadCoveringID = covering.ID
	for _, task := range covering.mapTasks() {
		res.LoadCoveringKeys += task.Keys
		res.LoadCoveringWritten += task.StateSize
	}
	if res.LoadCoveringKeys != int64(n) {
		t.Fatalf("checkpoint %d covers the load but its map tasks hold %d keys, want %d", covering.ID, res.LoadCoveringKeys, n)
	}
	for _, cp := range col.between(submitted, covering.triggered(t)) {
		switch cp.Status {
		case "completed":
			res.LoadCheckpoints++
			res.LoadCheckpointMaxMS = max(res.LoadCheckpointMaxMS, cp.DurationMS)
		case "aborted":
			res.LoadAborted++
			t.Logf("load: checkpoint %d aborted: %s", cp.ID, cp.Reason)
		}
	}
	t.Logf("load: checkpoint %d covers it %.1fs after submission (%.0f records/s): %d keys, it wrote %d bytes; %d checkpoints completed up to it (%d aborted), longest %.0f ms",
		covering.ID, res.LoadSeconds, float64(n)/res.LoadSeconds, res.LoadCoveringKeys, res.LoadCoveringWritten, res.LoadCheckpoints, res.LoadAborted, res.LoadCheckpointMaxMS)

	// 3. Churn: 1% of the keys per interval, until at least minCheckpoints
	// checkpoints triggered since the churn began have completed.
	res.ChurnTargetRate = float64(n) * benchStateChurnPerInterval / interval.Seconds()
	raftBefore, err := benchStateScrapeRaft(c, job)
	if err != nil {
		t.Fatal(err)
	}
	churnStart := time.Now()
	churn := in.startChurn(c.brokers(), res.ChurnTargetRate, 20261202)
	t.Cleanup(func() { _ = churn.stop() })
	col.trackStorage(true)
	c.waitFor(t, scaled(5*time.Minute, time.Minute)+time.Duration(minCheckpoints)*interval, fmt.Sprintf("%d checkpoints completed under churn", minCheckpoints), func() (bool, error) {
		if err := churn.failed(); err != nil {
			t.Fatal(err)
		}
		got := col.completedSince(churnStart)
		return got >= minCheckpoints, fmt.Errorf("%d of %d; %v", got, minCheckpoints, col.why())
	})
	churnEnd := time.Now()
	raftAfter, err := benchStateScrapeRaft(c, job)
	if err != nil {
		t.Fatal(err)
	}
	col.trackStorage(false)
	res.Elections = benchStateTerm(t, c) - termAtSubmit
	res.ChurnSeconds = churnEnd.Sub(churnStart).Seconds()
	res.ChurnRecords = churn.sent.Load()
	if last, ok := col.lastCompleted(); ok {
		res.ChurnLag = int64(n) + res.ChurnRecords - last.offsetSum()
	}
	res.ChurnRate = float64(res.ChurnRecords) / res.ChurnSeconds
	for _, cp := range col.between(churnStart, churnEnd) {
		if cp.Status == "aborted" {
			res.Aborted++
			res.AbortReasons = append(res.AbortReasons, fmt.Sprintf("%d: %s", cp.ID, cp.Reason))
			continue
		}
		if cp.Status != "completed" {
			continue
		}
		res.Checkpoints++
		res.DurationsMS = append(res.DurationsMS, cp.DurationMS)
		var written int64
		anyFull := false
		var files []int
		for _, task := range cp.mapTasks() {
			written += task.StateSize
			res.FilesPerTaskMax = max(res.FilesPerTaskMax, task.Files)
			anyFull = anyFull || task.Files == 1
			files = append(files, task.Files)
		}
		res.Written = append(res.Written, written)
		res.FilesPerTask = append(res.FilesPerTask, files)
		if anyFull {
			res.FullCheckpoints++
		}
	}
	if res.Checkpoints == 0 {
		t.Fatal("no checkpoint triggered during the churn completed")
	}
	res.DurationP50MS = benchStatePercentile(res.DurationsMS, 50)
	res.DurationP99MS = benchStatePercentile(res.DurationsMS, 99)
	res.DurationMaxMS = slices.Max(res.DurationsMS)
	written := benchMap(res.Written, func(v int64) float64 { return float64(v) })
	res.WrittenP50 = benchStatePercentile(written, 50)
	res.WrittenMax = slices.Max(written)
	for _, v := range written {
		res.WrittenMean += v / float64(len(written))
	}
	for _, cp := range col.between(submitted, churnEnd) {
		if cp.Status != "completed" {
			continue
		}
		var w int64
		allFull := len(cp.mapTasks()) > 0
		for _, task := range cp.mapTasks() {
			w += task.StateSize
			allFull = allFull && task.Files == 1
		}
		if allFull {
			res.FullSnapshotBytesMax = max(res.FullSnapshotBytesMax, w)
		}
	}

	d := raftAfter.minus(raftBefore)
	res.RaftCheckpointsCounted = d.checkpoints
	if d.checkpoints > 0 {
		res.RaftBytesPerCheckpoint = (d.triggered + d.completed + d.aborted) / d.checkpoints
		res.RaftTriggeredPerCkpt = d.triggered / d.checkpoints
		res.RaftCompletedPerCkpt = d.completed / d.checkpoints
	}
	res.RaftAbortedBytes = d.aborted
	singles := col.raftSingles(churnStart, churnEnd)
	res.RaftCompletedSamples = len(singles)
	if len(singles) > 0 {
		res.RaftCompletedMax = slices.Max(singles)
	}
	res.StorageBytes, res.StorageFiles = benchStateDirSize(storeDir)
	res.StorageMaxBytes = max(col.storageMax(), res.StorageBytes)
	res.WorkerStateDirBytes = map[string]int64{}
	for id, dir := range stateDirs {
		res.WorkerStateDirBytes[id], _ = benchStateDirSize(dir)
	}
	t.Logf("churn: %d records in %.1fs = %.0f records/s (target %.0f), %d not yet checkpointed at the end; %d checkpoints completed (%d aborted, %d with a new chain), durations (ms) %v; written (bytes) %v; files per map task %v",
		res.ChurnRecords, res.ChurnSeconds, res.ChurnRate, res.ChurnTargetRate, res.ChurnLag, res.Checkpoints, res.Aborted, res.FullCheckpoints, res.DurationsMS, res.Written, res.FilesPerTask)
	t.Logf("churn: Raft %.0f bytes per checkpoint over %.0f checkpoints (triggered %.0f, completed %.0f, aborted %.0f in all; largest completion %.0f over %d samples); storage %d bytes in %d files (max %d); worker state dirs %v",
		res.RaftBytesPerCheckpoint, d.checkpoints, res.RaftTriggeredPerCkpt, res.RaftCompletedPerCkpt, d.aborted, res.RaftCompletedMax, len(singles),
		res.StorageBytes, res.StorageFiles, res.StorageMaxBytes, res.WorkerStateDirBytes)

	// 4. Peak RSS of every process, before any is killed.
	mem := benchStateMemory(t, c)
	res.PeakRSSMB = map[string]float64{}
	for name, m := range mem {
		res.PeakRSSMB[name] = m.hwm
		switch strings.Fields(name)[0] {
		case "coordd":
			res.CoorddPeakRSSMB = max(res.CoorddPeakRSSMB, m.hwm)
		case "workerd":
			res.WorkerdPeakRSSMB = max(res.WorkerdPeakRSSMB, m.hwm)
		case "devkafka":
			res.DevkafkaRSSMB = max(res.DevkafkaRSSMB, m.hwm)
		}
	}
	t.Logf("peak RSS (VmHWM, MB): %v", res.PeakRSSMB)

	// 5. Recovery: SIGKILL the worker running map-0, with the churn going
	// on, and time the restored attempt on the survivor.
	benchStateRecover(t, c, col, job, &res, stateDirs)

	// 6. Verification: stop the input, wait for a checkpoint covering it,
	// and compare its export with the latest value of every key.
	if err := churn.stop(); err != nil {
		t.Fatal(err)
	}
	inputEnd := time.Now()
	res.TotalRecords = int64(n) + churn.sent.Load()
	end = topicEndOffsets(t, c.brokers(), benchStateTopic)
	if got := sumOffsets(end); got != res.TotalRecords {
		t.Fatalf("%s holds %d records, the producers had %d acknowledged", benchStateTopic, got, res.TotalRecords)
	}
	var final benchStateCheckpoint
	c.waitFor(t, scaled(2*time.Minute, time.Minute), "a completed checkpoint covering all input", func() (bool, error) {
		cp, ok := col.firstCovering(end)
		final = cp
		return ok, col.why()
	})
	res.CatchUpSeconds = final.ended(t).Sub(inputEnd).Seconds()
	col.stop()
	for name, m := range benchStateMemory(t, c) {
		if strings.HasPrefix(name, "coordd") {
			res.CoorddPeakRSSMB = max(res.CoorddPeakRSSMB, m.hwm)
		}
	}
	v := benchStateVerify(t, c, job, in, end, scaled(5*time.Minute, 3*time.Minute))
	res.ExportCheckpoint, res.ExportSeconds, res.ExportBytes, res.ExportKeys = v.checkpoint, v.seconds, v.bytes, v.keys
	res.Missing, res.Extra, res.Wrong, res.Duplicates, res.MismatchExamples = v.missing, v.extra, v.wrong, v.duplicates, v.examples
	for name, m := range benchStateMemory(t, c) {
		if strings.HasPrefix(name, "coordd") {
			res.CoorddPeakRSSAfterExpMB = max(res.CoorddPeakRSSAfterExpMB, m.hwm)
		}
	}
	t.Logf("export of checkpoint %d (the first covering all input, %d, ended %.1fs after the input did): %d keys, %d bytes in %.1fs; %d missing, %d extra, %d wrong, %d duplicated",
		v.checkpoint, final.ID, res.CatchUpSeconds, v.keys, v.bytes, v.seconds, v.missing, v.extra, v.wrong, v.duplicates)

	t.Logf("SUMMARY %s", res.summary())
	benchWriteResult(t, resultPath, res)
	if v.missing+v.extra+v.wrong+v.duplicates > 0 {
		t.Errorf("checkpoint %d's state differs from the input: %d missing, %d extra, %d wrong, %d duplicated keys; first: %s",
			v.checkpoint, v.missing, v.extra, v.wrong, v.duplicates, strings.Join(v.examples, "; "))
	}
}

// benchStateRecover kills the worker running map-0 and measures, on the
// other worker, the restored attempt (as TestBenchScenarioWorkerKill does).
func benchStateRecover(t *testing.T, c *cluster, col *benchStateCollector, job string, res *benchStateResult, stateDirs map[string]string) {
	t.Helper()
	before, err := benchGetJob(c, c.api(t), job)
	if err != nil {
		t.Fatal(err)
	}
	if before.Status != "running" {
		t.Fatalf("job is %s (%s) before the kill", before.Status, before.Reason)
	}
	res.Restarts = before.Attempt - 1
	if res.Restarts > 0 {
		t.Logf("the job restarted %d times before the kill, last: %s", res.Restarts, before.Reason)
	}
	i := slices.IndexFunc(before.Tasks, func(task taskView) bool { return task.ID == "map-0" })
	if i < 0 {
		t.Fatalf("job has no task map-0: %+v", before.Tasks)
	}
	victim := before.Tasks[i].Worker
	var survivor *workerProc
	for _, w := range c.workers {
		if w.id != victim {
			survivor = w
		}
	}
	for _, task := range before.Tasks {
		if task.Worker == victim {
			res.VictimTasks = append(res.VictimTasks, task.ID)
		}
	}
	res.Victim, res.Survivor = victim, survivor.id
	preKill, _ := col.lastCompleted()
	// Only the restored map-0: after a task-scoped recovery the survivor's
	// own map task goes on applying records throughout.
	sampler := benchStartSampler(c, survivor, job, `task="map-0"`)
	defer sampler.stop()
	logFrom := len(survivor.p.output())

	killAt := time.Now()
	c.killWorker(t, victim)
	var after benchJob
	benchPollUntil(t, c, 2*time.Minute, "a new attempt", func() (bool, error) {
		j, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			return false, err
		}
		after = j
		return j.Attempt > before.Attempt, fmt.Errorf("attempt %d, %s %s", j.Attempt, j.Status, j.Reason)
	})
	res.AttemptSeenMS = benchMS(time.Since(killAt))
	var deploys, runs []time.Time
	var log string
	attempt := fmt.Sprintf(" attempt=%d ", after.Attempt)
	// A task-scoped recovery (the default) restarts only the victim's
	// tasks, in the new attempt; a job-scoped one every task.
	restarted := func(j benchJob) int {
		if n := len(j.Recoveries); n > 0 && j.Recoveries[n-1].Scope == "tasks" {
			res.RecoveryScope = "tasks"
			return len(j.Recoveries[n-1].Tasks)
		}
		res.RecoveryScope = "job"
		return len(j.Tasks)
	}
	c.waitFor(t, 10*time.Minute, "every restarted task of the new attempt running on "+survivor.id, func() (bool, error) {
		j, err := benchGetJob(c, c.api(t), job)
		if err != nil {
			return false, err
		}
		if j.Attempt != after.Attempt {
			return false, fmt.Errorf("attempt %d, then %d: more than one restart (%s)", after.Attempt, j.Attempt, j.Reason)
		}
		log = survivor.p.output()[logFrom:]
		deploys = benchLogTimes(log, "deploying task", attempt)
		runs = benchLogTimes(log, "task running", attempt)
		want := restarted(j)
		return want > 0 && len(deploys) > 0 && len(runs) == want, fmt.Errorf("%d of %d restarted tasks running (%s scope)", len(runs), want, res.RecoveryScope)
	})
	firstDeploy, firstRunning, lastRunning := slices.MinFunc(deploys, time.Time.Compare), slices.MinFunc(runs, time.Time.Compare), slices.MaxFunc(runs, time.Time.Compare)
	res.DeployMS, res.RunningMS = benchMS(firstDeploy.Sub(killAt)), benchMS(lastRunning.Sub(killAt))
	for line := range strings.Lines(log) {
		if strings.Contains(line, `msg="restored keyed state"`) && strings.Contains(line, " job="+job) {
			res.RestoreLines = append(res.RestoreLines, strings.TrimSpace(line))
		}
		if strings.Contains(line, `msg="deploying task"`) && strings.Contains(line, attempt) {
			if _, v, ok := strings.Cut(line, " restore_checkpoint="); ok {
				id, _ := strconv.ParseUint(strings.Fields(v)[0], 10, 64)
				res.RestoredCheckpoint = max(res.RestoredCheckpoint, id)
			}
		}
	}
	var first time.Time
	c.waitFor(t, time.Minute, "the new attempt to apply a record", func() (bool, error) {
		var err error
		first, _, err = sampler.firstIncrease(killAt, firstDeploy, firstRunning)
		return err == nil, err
	})
	res.FirstRecordMS = benchMS(first.Sub(killAt))
	sampler.stop()

	restoredSum := preKill.offsetSum()
	if cp, ok := col.get(res.RestoredCheckpoint); ok {
		restoredSum = cp.offsetSum()
	}
	var next, progress benchStateCheckpoint
	c.waitFor(t, 5*time.Minute, "a checkpoint of the new attempt past the restored offsets", func() (bool, error) {
		var ok1, ok2 bool
		next, ok1 = col.firstOfAttempt(after.Attempt, -1)
		progress, ok2 = col.firstOfAttempt(after.Attempt, restoredSum)
		return ok1 && ok2, col.why()
	})
	res.CheckpointMS = benchMS(next.ended(t).Sub(killAt))
	res.ProgressMS = benchMS(progress.ended(t).Sub(killAt))
	if m, ok := benchStateMemory(t, c)["workerd "+survivor.id]; ok {
		res.SurvivorPeakRSSMB = m.hwm
	}
	res.SurvivorStateBytes, _ = benchStateDirSize(stateDirs[survivor.id])
	t.Logf("kill of %s (ran %v; %s survives): attempt %d -> %d seen %.0f ms; deploy %.0f ms; running %.0f ms; first record %.0f ms; checkpoint %d completed %.0f ms, %d with progress %.0f ms; restored checkpoint %d: %s; survivor peak RSS %.0f MB",
		victim, res.VictimTasks, survivor.id, before.Attempt, after.Attempt, res.AttemptSeenMS, res.DeployMS, res.RunningMS, res.FirstRecordMS,
		next.ID, res.CheckpointMS, progress.ID, res.ProgressMS, res.RestoredCheckpoint, strings.Join(res.RestoreLines, " | "), res.SurvivorPeakRSSMB)
}

// benchStateTerm returns the highest Raft term the coordinators report.
func benchStateTerm(t *testing.T, c *cluster) uint64 {
	t.Helper()
	var term uint64
	for _, cp := range c.liveCoordinators() {
		st, err := c.status(cp)
		if err != nil {
			t.Fatalf("coordd %s status: %v", cp.id, err)
		}
		term = max(term, st.Term)
	}
	return term
}

func benchStatePercentile(vs []float64, p float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vs))
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// ---- input: keys, values and their versions ----

// benchStateInput is the job's input: key i ("k%09d") always goes to
// partition i mod 4, so that its updates stay in order, and its value is a
// function of (i, version), so that the expected state is one version
// counter per key.
type benchStateInput struct {
	n       int
	version []uint16 // per key: updates produced after the load; each partition's goroutine owns its keys
}

func newBenchStateInput(n int) *benchStateInput {
	return &benchStateInput{n: n, version: make([]uint16, n)}
}

func benchStateKey(dst []byte, i int) []byte {
	dst = append(dst, 'k')
	var digits [9]byte
	for j := 8; j >= 0; j-- {
		digits[j] = byte('0' + i%10)
		i /= 10
	}
	return append(dst, digits[:]...)
}

// benchStateValue appends the 100-byte value of key i at version v: the
// key, the version, then letters and digits drawn from both.
func benchStateValue(dst []byte, i int, v uint16) []byte {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
	start := len(dst)
	dst = benchStateKey(dst, i)
	dst = append(dst, '.', byte('0'+v/10000%10), byte('0'+v/1000%10), byte('0'+v/100%10), byte('0'+v/10%10), byte('0'+v%10), '.')
	x := uint64(i)<<16 | uint64(v)
	for len(dst)-start < benchStateValueBytes {
		// splitmix64
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		for k := 0; k < 10 && len(dst)-start < benchStateValueBytes; k++ {
			dst = append(dst, alphabet[z&63])
			z >>= 6
		}
	}
	return dst
}

// send produces the records of keys at their current versions to partition
// p, in order, and waits until the broker has acknowledged all of them.
func (in *benchStateInput) send(pr sarama.SyncProducer, p int32, keys []int) error {
	buf := make([]byte, 0, len(keys)*(benchStateKeyBytes+benchStateValueBytes))
	msgs := make([]*sarama.ProducerMessage, len(keys))
	for j, i := range keys {
		at := len(buf)
		buf = benchStateKey(buf, i)
		k := buf[at:len(buf):len(buf)]
		at = len(buf)
		buf = benchStateValue(buf, i, in.version[i])
		msgs[j] = &sarama.ProducerMessage{Topic: benchStateTopic, Partition: p, Key: sarama.ByteEncoder(k), Value: sarama.ByteEncoder(buf[at:len(buf):len(buf)])}
	}
	if err := pr.SendMessages(msgs); err != nil {
		return fmt.Errorf("produce to %s/%d: %w", benchStateTopic, p, err)
	}
	return nil
}

// load produces every key once (version 0), one producer per partition.
func (in *benchStateInput) load(brokers []string) error {
	const chunk = 20_000
	var wg sync.WaitGroup
	errs := make([]error, benchStatePartitions)
	for p := range int32(benchStatePartitions) {
		wg.Go(func() {
			pr, err := idempotentProducer(brokers, sarama.NewManualPartitioner)
			if err != nil {
				errs[p] = err
				return
			}
			defer pr.Close()
			keys := make([]int, 0, chunk)
			for i := int(p); i < in.n; i += benchStatePartitions {
				keys = append(keys, i)
				if len(keys) == chunk || i+benchStatePartitions >= in.n {
					if errs[p] = in.send(pr, p, keys); errs[p] != nil {
						return
					}
					keys = keys[:0]
				}
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// benchStateChurn updates random existing keys at a steady rate until
// stopped.
type benchStateChurn struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sent   atomic.Int64
	mu     sync.Mutex
	err    error
	once   sync.Once
}

// startChurn produces perSecond updates a second in all, one producer per
// partition, each updating random keys of its partition. It keeps to the
// rate on average: a send that took long is made up by the next ones.
func (in *benchStateInput) startChurn(brokers []string, perSecond float64, seed uint64) *benchStateChurn {
	ctx, cancel := context.WithCancel(context.Background())
	ch := &benchStateChurn{cancel: cancel}
	rate := perSecond / benchStatePartitions
	for p := range int32(benchStatePartitions) {
		ch.wg.Go(func() {
			pr, err := idempotentProducer(brokers, sarama.NewManualPartitioner)
			if err != nil {
				ch.fail(err)
				return
			}
			defer pr.Close()
			rng := rand.New(rand.NewPCG(seed, uint64(p)))
			owned := (in.n - int(p) + benchStatePartitions - 1) / benchStatePartitions // keys p, p+4, ...
			start := time.Now()
			var sent int64
			keys := make([]int, 0, 10_000)
			for ctx.Err() == nil {
				due := int64(time.Since(start).Seconds()*rate) - sent
				if due <= 0 {
					select {
					case <-ctx.Done():
					case <-time.After(10 * time.Millisecond): // pacing, not synchronization
					}
					continue
				}
				keys = keys[:0]
				for range min(due, int64(cap(keys))) {
					i := int(p) + benchStatePartitions*rng.IntN(owned)
					in.version[i]++
					keys = append(keys, i)
				}
				if err := in.send(pr, p, keys); err != nil {
					ch.fail(fmt.Errorf("churn: %w", err))
					return
				}
				sent += int64(len(keys))
				ch.sent.Add(int64(len(keys)))
			}
		})
	}
	return ch
}

func (ch *benchStateChurn) fail(err error) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.err == nil {
		ch.err = err
	}
}

func (ch *benchStateChurn) failed() error {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.err
}

// stop ends the churn after the sends in flight are acknowledged.
func (ch *benchStateChurn) stop() error {
	ch.once.Do(func() {
		ch.cancel()
		ch.wg.Wait()
	})
	return ch.failed()
}

// ---- checkpoints, metrics, storage ----

// benchStateCheckpoint is one entry of GET /v1/jobs/{id}/checkpoints.
type benchStateCheckpoint struct {
	benchCheckpoint
	Tasks []benchStateTask `json:"tasks"`
}

type benchStateTask struct {
	ID        string           `json:"id"`
	Kind      string           `json:"kind"`
	Worker    string           `json:"worker"`
	StateSize int64            `json:"state_size"`
	Keys      int64            `json:"keys"`
	Files     int              `json:"files"`
	Offsets   map[string]int64 `json:"offsets"`
}

func (cp benchStateCheckpoint) mapTasks() []benchStateTask {
	var out []benchStateTask
	for _, task := range cp.Tasks {
		if task.Kind == "map" {
			out = append(out, task)
		}
	}
	return out
}

func (cp benchStateCheckpoint) offsets() map[string]int64 {
	offsets := map[string]int64{}
	for _, task := range cp.Tasks {
		maps.Copy(offsets, task.Offsets)
	}
	return offsets
}

func (cp benchStateCheckpoint) offsetSum() int64 { return sumOffsets(cp.offsets()) }

func (cp benchStateCheckpoint) covers(end map[int32]int64) bool {
	offsets := cp.offsets()
	for p, e := range end {
		if offsets[fmt.Sprintf("%s/%d", benchStateTopic, p)] < e {
			return false
		}
	}
	return true
}

// benchStateRaft is what the coordinators' metrics say about checkpoints,
// summed over the coordinators (each counts what it did as leader).
type benchStateRaft struct {
	triggered, completed, aborted float64 // coordflow_raft_apply_bytes_total by command
	checkpoints                   float64 // coordflow_checkpoints_completed_total of the job
}

func (r benchStateRaft) minus(o benchStateRaft) benchStateRaft {
	return benchStateRaft{r.triggered - o.triggered, r.completed - o.completed, r.aborted - o.aborted, r.checkpoints - o.checkpoints}
}

func benchStateScrapeRaft(c *cluster, job string) (benchStateRaft, error) {
	var r benchStateRaft
	for _, cp := range c.coords {
		text, err := c.coordMetrics(cp)
		if err != nil {
			return r, fmt.Errorf("coordd %s metrics: %w", cp.id, err)
		}
		const name = "coordflow_raft_apply_bytes_total"
		r.triggered += benchMetric(text, name, `command="CheckpointTriggered"`)
		r.completed += benchMetric(text, name, `command="CheckpointCompleted"`)
		r.aborted += benchMetric(text, name, `command="CheckpointAborted"`)
		r.checkpoints += benchMetric(text, "coordflow_checkpoints_completed_total", `job="`+job+`"`)
	}
	return r, nil
}

// benchStateCollector polls, in the background, the job's checkpoint list
// (keeping every completed and aborted checkpoint it sees, since the list
// keeps only the retained ones), the coordinators' checkpoint metrics (the
// bytes of each CheckpointCompleted seen alone between two polls) and, while
// asked to, the size of the checkpoint storage directory.
type benchStateCollector struct {
	c        *cluster
	job      string
	storeDir string
	cancel   context.CancelFunc
	done     chan struct{}
	once     sync.Once

	mu        sync.Mutex
	cps       map[uint64]benchStateCheckpoint
	singles   []benchStateSingle
	storage   bool
	storeMax  int64
	lastErr   error
	lastPolls int
}

type benchStateSingle struct {
	at    time.Time
	bytes float64
}

func benchStartStateCollector(c *cluster, job, storeDir string) *benchStateCollector {
	ctx, cancel := context.WithCancel(context.Background())
	col := &benchStateCollector{c: c, job: job, storeDir: storeDir, cancel: cancel, done: make(chan struct{}), cps: map[uint64]benchStateCheckpoint{}}
	go col.run(ctx)
	return col
}

func (col *benchStateCollector) run(ctx context.Context) {
	defer close(col.done)
	ticker := time.NewTicker(benchStatePoll)
	defer ticker.Stop()
	var prev *benchStateRaft
	var lastWalk time.Time
	for {
		var cps []benchStateCheckpoint
		err := col.c.call("GET", col.c.coords[0].httpAddr, "/v1/jobs/"+col.job+"/checkpoints", nil, &cps)
		raft, rerr := benchStateScrapeRaft(col.c, col.job)
		col.mu.Lock()
		col.lastPolls++
		if err != nil {
			col.lastErr = err
		}
		for _, cp := range cps {
			if cp.Status != "pending" {
				col.cps[cp.ID] = cp
			}
		}
		if rerr != nil {
			col.lastErr = rerr
		} else {
			if prev != nil {
				if d := raft.minus(*prev); d.checkpoints == 1 {
					col.singles = append(col.singles, benchStateSingle{at: time.Now(), bytes: d.completed})
				}
			}
			prev = &raft
		}
		walk := col.storage && time.Since(lastWalk) > 2*time.Second
		col.mu.Unlock()
		if walk {
			size, _ := benchStateDirSize(col.storeDir)
			lastWalk = time.Now()
			col.mu.Lock()
			col.storeMax = max(col.storeMax, size)
			col.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

func (col *benchStateCollector) stop() {
	col.once.Do(func() {
		col.cancel()
		<-col.done
	})
}

func (col *benchStateCollector) trackStorage(on bool) {
	col.mu.Lock()
	defer col.mu.Unlock()
	col.storage = on
}

func (col *benchStateCollector) storageMax() int64 {
	col.mu.Lock()
	defer col.mu.Unlock()
	return col.storeMax
}

// why says what the collector has seen, for a wait's progress line.
func (col *benchStateCollector) why() error {
	col.mu.Lock()
	defer col.mu.Unlock()
	var newest uint64
	for id := range col.cps {
		newest = max(newest, id)
	}
	if col.lastErr != nil {
		return fmt.Errorf("%d checkpoints seen, newest %d; last poll error: %v", len(col.cps), newest, col.lastErr)
	}
	return fmt.Errorf("%d checkpoints seen, newest %d", len(col.cps), newest)
}

func (col *benchStateCollector) sorted() []benchStateCheckpoint {
	col.mu.Lock()
	defer col.mu.Unlock()
	var out []benchStateCheckpoint
	for _, id := range slices.Sorted(maps.Keys(col.cps)) {
		out = append(out, col.cps[id])
	}
	return out
}

func (col *benchStateCollector) get(id uint64) (benchStateCheckpoint, bool) {
	col.mu.Lock()
	defer col.mu.Unlock()
	cp, ok := col.cps[id]
	return cp, ok
}

// between returns the checkpoints seen completed or aborted that were
// triggered in [from, to], by id.
func (col *benchStateCollector) between(from, to time.Time) []benchStateCheckpoint {
	var out []benchStateCheckpoint
	for _, cp := range col.sorted() {
		at, err := time.Parse(time.RFC3339Nano, cp.TriggerTime)
		if err == nil && !at.Before(from) && !at.After(to) {
			out = append(out, cp)
		}
	}
	return out
}

func (col *benchStateCollector) completedSince(from time.Time) int {
	n := 0
	for _, cp := range col.between(from, time.Now().Add(time.Hour)) {
		if cp.Status == "completed" {
			n++
		}
	}
	return n
}

// firstCovering returns the completed checkpoint of lowest id whose source
// offsets reach end.
func (col *benchStateCollector) firstCovering(end map[int32]int64) (benchStateCheckpoint, bool) {
	for _, cp := range col.sorted() {
		if cp.Status == "completed" && cp.covers(end) {
			return cp, true
		}
	}
	return benchStateCheckpoint{}, false
}

func (col *benchStateCollector) lastCompleted() (benchStateCheckpoint, bool) {
	cps := col.sorted()
	for i := len(cps) - 1; i >= 0; i-- {
		if cps[i].Status == "completed" {
			return cps[i], true
		}
	}
	return benchStateCheckpoint{}, false
}

// firstOfAttempt returns the completed checkpoint of lowest id of attempt
// whose offsets exceed past (-1: any).
func (col *benchStateCollector) firstOfAttempt(attempt uint64, past int64) (benchStateCheckpoint, bool) {
	for _, cp := range col.sorted() {
		if cp.Status == "completed" && cp.Attempt == attempt && cp.offsetSum() > past {
			return cp, true
		}
	}
	return benchStateCheckpoint{}, false
}

// raftSingles returns the bytes of the CheckpointCompleted commands seen
// alone between two polls in [from, to].
func (col *benchStateCollector) raftSingles(from, to time.Time) []float64 {
	col.mu.Lock()
	defer col.mu.Unlock()
	var out []float64
	for _, s := range col.singles {
		if !s.at.Before(from) && !s.at.After(to) {
			out = append(out, s.bytes)
		}
	}
	return out
}

// benchStateDirSize returns the bytes and number of the regular files under
// dir. Files deleted during the walk are skipped.
func benchStateDirSize(dir string) (int64, int) {
	var size int64
	var files int
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			size += info.Size()
			files++
		}
		return nil
	})
	return size, files
}

// benchStateMem is a process's memory from /proc/PID/status, in MB.
type benchStateMem struct{ hwm, rss float64 }

// benchStateMemory returns VmHWM (peak resident set) and VmRSS of every live
// process of the cluster, by name ("coordd c1").
func benchStateMemory(t *testing.T, c *cluster) map[string]benchStateMem {
	t.Helper()
	out := map[string]benchStateMem{}
	for _, p := range c.current() {
		if p.hasExited() {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
		if err != nil {
			t.Logf("memory of %s: %v", p.name, err)
			continue
		}
		var m benchStateMem
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			kb, _ := strconv.ParseFloat(f[1], 64)
			switch f[0] {
			case "VmHWM:":
				m.hwm = kb * 1024 / 1e6
			case "VmRSS:":
				m.rss = kb * 1024 / 1e6
			}
		}
		out[p.name] = m
	}
	return out
}

// ---- verification ----

type benchStateVerification struct {
	checkpoint                        uint64
	seconds                           float64
	bytes, keys                       int64
	missing, extra, wrong, duplicates int64
	examples                          []string
}

// benchStateVerify streams GET /v1/jobs/{id}/state/export and compares every
// key with the latest value produced for it. It keeps one bit per key, so it
// checks every key at any state size.
func benchStateVerify(t *testing.T, c *cluster, job string, in *benchStateInput, end map[int32]int64, timeout time.Duration) benchStateVerification {
	t.Helper()
	var v benchStateVerification
	note := func(format string, args ...any) {
		if len(v.examples) < 10 {
			v.examples = append(v.examples, fmt.Sprintf(format, args...))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	url := "http://" + c.api(t) + "/v1/jobs/" + job + "/state/export"
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	resp, err := (&http.Client{}).Do(req) // no client timeout: the export of 10M keys streams for a while
	if err != nil {
		t.Fatalf("export: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s: %s", url, resp.Status, b)
	}
	r := bufio.NewReaderSize(resp.Body, 1<<20)
	head, err := r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("export: first line: %v", err)
	}
	v.bytes += int64(len(head))
	var first struct {
		CheckpointID uint64           `json:"checkpoint_id"`
		Offsets      map[string]int64 `json:"offsets"`
	}
	if err := json.Unmarshal(head, &first); err != nil {
		t.Fatalf("export: first line %q: %v", truncate(string(head), 300), err)
	}
	v.checkpoint = first.CheckpointID
	for p, e := range end {
		if got := first.Offsets[fmt.Sprintf("%s/%d", benchStateTopic, p)]; got != e {
			t.Fatalf("export: checkpoint %d read %s/%d to %d, the end is %d: %v", v.checkpoint, benchStateTopic, p, got, e, first.Offsets)
		}
	}
	seen := make([]uint64, (in.n+63)/64)
	const prefix, middle, suffix = `{"key":"`, `","value":"`, `"}`
	want := make([]byte, 0, benchStateValueBytes)
	for {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			rest, err2 := r.ReadBytes('\n')
			line, err = append(slices.Clone(line), rest...), err2
		}
		if len(line) == 0 && err == io.EOF {
			break
		}
		if err != nil && err != io.EOF {
			t.Fatalf("export: after %d keys: %v", v.keys, err)
		}
		v.bytes += int64(len(line))
		line = bytes.TrimSuffix(line, []byte("\n"))
		var key, value string
		if len(line) == len(prefix)+benchStateKeyBytes+len(middle)+benchStateValueBytes+len(suffix) &&
			bytes.HasPrefix(line, []byte(prefix)) && bytes.HasSuffix(line, []byte(suffix)) &&
			string(line[len(prefix)+benchStateKeyBytes:len(prefix)+benchStateKeyBytes+len(middle)]) == middle {
			key = string(line[len(prefix) : len(prefix)+benchStateKeyBytes])
			value = string(line[len(prefix)+benchStateKeyBytes+len(middle) : len(line)-len(suffix)])
		} else {
			var l struct {
				Key         *string `json:"key"`
				KeyBase64   string  `json:"key_base64"`
				Value       any     `json:"value"`
				ValueBase64 string  `json:"value_base64"`
				Error       string  `json:"error"`
			}
			if err := json.Unmarshal(line, &l); err != nil {
				t.Fatalf("export: line %q: %v", truncate(string(line), 300), err)
			}
			if l.Error != "" {
				t.Fatalf("export: after %d keys: %s", v.keys, l.Error)
			}
			if l.Key == nil {
				v.extra++
				note("key_base64 %s", l.KeyBase64)
				continue
			}
			key = *l.Key
			s, ok := l.Value.(string)
			if !ok {
				s = fmt.Sprintf("%v (base64 %q)", l.Value, l.ValueBase64)
			}
			value = s
		}
		v.keys++
		i, ok := benchStateParseKey(key)
		if !ok || i >= in.n {
			v.extra++
			note("extra key %q", key)
			continue
		}
		if seen[i/64]&(1<<(i%64)) != 0 {
			v.duplicates++
			note("key %q twice", key)
			continue
		}
		seen[i/64] |= 1 << (i % 64)
		want = benchStateValue(want[:0], i, in.version[i])
		if value != string(want) {
			v.wrong++
			note("key %q: got %q, want %q (version %d)", key, truncate(value, 30), want[:20], in.version[i])
		}
	}
	v.seconds = time.Since(start).Seconds()
	for i := range in.n {
		if seen[i/64]&(1<<(i%64)) == 0 {
			v.missing++
			note("key %q missing", benchStateKey(nil, i))
		}
	}
	return v
}

// benchStateParseKey returns i of key "k%09d".
func benchStateParseKey(key string) (int, bool) {
	if len(key) != benchStateKeyBytes || key[0] != 'k' {
		return 0, false
	}
	i := 0
	for _, ch := range []byte(key[1:]) {
		if ch < '0' || ch > '9' {
			return 0, false
		}
		i = i*10 + int(ch-'0')
	}
	return i, true
}
