package integration

// BenchmarkManyJobs measures one Raft group coordinating many small jobs, as
// docs/benchmarks.md reports it ("Many jobs"). Run one combination at a
// time, with nothing else on the machine:
//
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkManyJobs/jobs=1000/input=idle$' -benchtime 1x -timeout 1h -v
//
// The scenario: devkafka, 3 coordd, 2 workerd; n jobs of one source and one
// map task (count), each on a topic of its own with one partition,
// checkpoints every second; idle topics, or a light steady input of 100
// records a second per job. Once every job has completed a checkpoint and
// a warm-up has passed, a 30 s window is measured: checkpoints completed per
// job, the duration of each checkpoint triggered in the window (from the
// API), the leader's Raft entries, commands and bytes, and the CPU of every
// process.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"math"
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

	"github.com/twmb/franz-go/pkg/kgo"
)

const (
	benchJobsEnv      = "COORDFLOW_BENCH_JOBS"
	benchJobsInputEnv = "COORDFLOW_BENCH_INPUT"
	benchJobsWindow   = 30 * time.Second
	benchJobsWarmUp   = 10 * time.Second
	benchJobsRate     = 100 // records a second per job with input=light
	benchJobsTimeout  = 40 * time.Minute
	// benchJobsProfileEnv, if set, names a directory for CPU profiles of
	// the leader, a follower and a worker, an allocation profile of the
	// worker and 5 s of the leader's execution trace, taken during the
	// window.
	benchJobsProfileEnv = "COORDFLOW_BENCH_PROFILE"
)

// benchJobsResult is what TestBenchScenarioManyJobs measures.
type benchJobsResult struct {
	Jobs  int    `json:"jobs"`
	Input string `json:"input"`
	// StartSeconds is from the first submission until every job has
	// completed a checkpoint.
	StartSeconds float64 `json:"start_s"`
	// Per job, over the window: checkpoints completed per second.
	RateMin, RateMean float64
	JobsBelow09       int // jobs below 0.9 checkpoints a second
	// Checkpoints completed and aborted in the window (all jobs).
	Checkpoints, Aborted int
	// Quantiles of the duration of every checkpoint completed in the
	// window, from the leader's histogram (interpolated within buckets, as
	// histogram_quantile does).
	HistP50MS, HistP99MS float64
	// Quantiles of the leader's Raft writes (submission to FSM result).
	RaftP50MS, RaftP99MS float64
	// Quantiles of each phase of a checkpoint: the trigger's commit, the
	// tasks' acks, the completion's commit.
	Phases                      map[string][2]float64
	WriteStages                 map[string][2]float64 // the leader loop's trigger writes, p50 and p99 ms
	EntriesPerS, CommandsPerS   float64               // the leader's Raft log
	CommandsPerEntry, BytesPerS float64
	// EntryBytesPerS is what the entries took in the log: BytesPerS after
	// batching and compression.
	EntryBytesPerS float64
	LeaderCPU      float64            // cores (CPU seconds per second) of the leader coordd
	CPU            map[string]float64 // cores, by process group
	Restarts       int                // job attempts beyond the first, at the end
	// DeadOverruled is how many times the leader, since it took over,
	// overruled gossip calling a worker dead while its session was live.
	DeadOverruled int
	// The leader's Raft snapshots in the window: how many, their mean
	// persist time and the last one's size; and its log store's appends
	// (p99) and compactions (mean).
	Snapshots                       int
	SnapshotMeanMS, SnapshotMB      float64
	LogAppendP99MS, LogDeleteMeanMS float64
	// SlowAppends is how many of the leader's log appends (fsyncs) took
	// over 128 ms in the window: a stalled disk, which holds every commit.
	SlowAppends int
	// WrittenMBps is what each group of daemons had written to storage, MB
	// a second: the coordinators' Raft logs and snapshots above all (0 on
	// tmpfs, which writes to no device).
	WrittenMBps  map[string]float64
	RecordsPerS  float64 // read by the source tasks in the window, all jobs
	ProducedPerS float64 // acknowledged to the producer in the window, all jobs
	LoadAvg      string
}

func BenchmarkManyJobs(b *testing.B) {
	for _, n := range []int{100, 300, 1000} {
		for _, input := range []string{"idle", "light"} {
			b.Run(fmt.Sprintf("jobs=%d/input=%s", n, input), func(b *testing.B) {
				var r benchJobsResult
				for range b.N {
					benchRunScenarioWith(b, "TestBenchScenarioManyJobs",
						[]string{benchJobsEnv + "=" + strconv.Itoa(n), benchJobsInputEnv + "=" + input}, benchJobsTimeout, &r)
					b.Logf("%d jobs, input %s (%.0f records/s read, %.0f produced): all checkpointed %.1fs after the first submission; over %v: "+
						"checkpoints/s per job min %.2f mean %.2f (%d jobs below 0.9); %d checkpoints completed, %d aborted, duration p50 %.0f ms p99 %.0f ms; "+
						"phases p50/p99 ms: %v; trigger write stages p50/p99 ms: %v; Raft %.0f entries/s, %.0f commands/s (%.1f per entry), %.0f KB/s (%.0f KB/s in entries), write p50 %.1f ms p99 %.1f ms; "+
						"leader: %d snapshots (persist mean %.0f ms, %.1f MB), log append p99 %.1f ms (%d over 128 ms), compaction mean %.1f ms; written MB/s: %s; leader coordd %.2f cores; cores by group: %s; restarts %d, gossip deaths overruled %d; load average before: %s",
						r.Jobs, r.Input, r.RecordsPerS, r.ProducedPerS, r.StartSeconds, benchJobsWindow, r.RateMin, r.RateMean, r.JobsBelow09, r.Checkpoints, r.Aborted,
						r.HistP50MS, r.HistP99MS, r.Phases, r.WriteStages, r.EntriesPerS, r.CommandsPerS, r.CommandsPerEntry, r.BytesPerS/1e3, r.EntryBytesPerS/1e3, r.RaftP50MS, r.RaftP99MS,
						r.Snapshots, r.SnapshotMeanMS, r.SnapshotMB, r.LogAppendP99MS, r.SlowAppends, r.LogDeleteMeanMS, benchFormat(r.WrittenMBps, "coordd", "workerd", "devkafka"), r.LeaderCPU, benchFormatCPU(r.CPU), r.Restarts, r.DeadOverruled, r.LoadAvg)
				}
				b.ReportMetric(0, "ns/op")
				b.ReportMetric(r.RateMin, "min-checkpoints/s/job")
				b.ReportMetric(r.HistP99MS, "checkpoint-p99-ms")
				b.ReportMetric(r.EntriesPerS, "raft-entries/s")
			})
		}
	}
}

func TestBenchScenarioManyJobs(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkManyJobs")
	n, err := strconv.Atoi(os.Getenv(benchJobsEnv))
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a number of jobs", benchJobsEnv, os.Getenv(benchJobsEnv))
	}
	input := os.Getenv(benchJobsInputEnv)
	if input != "idle" && input != "light" {
		t.Fatalf("%s=%q: want idle or light", benchJobsInputEnv, input)
	}
	res := benchJobsResult{Jobs: n, Input: input, LoadAvg: benchLoadAvg()}
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 2, slots: n + 2, topics: manyTopics(n, 1),
		coordFlags: []string{"-enable-debug"}, workerFlags: []string{"-enable-debug"}})

	specs := make([]jobSpec, n)
	for i := range specs {
		specs[i] = smallJobSpec(c.brokers(), fmt.Sprintf("job-%04d", i), manyTopic(i), time.Second)
	}
	start := time.Now()
	ids := c.submitJobs(t, specs)
	c.waitJobsCheckpointed(t, 10*time.Minute, ids, nil)
	res.StartSeconds = time.Since(start).Seconds()
	t.Logf("%d jobs checkpointed after %.1fs", n, res.StartSeconds)

	var producer *steadyProducer
	if input == "light" {
		producer = produceSteady(t, c.brokers(), n, benchJobsRate)
	}
	time.Sleep(benchJobsWarmUp) // the only sleep: a warm-up before a measured window

	leader := c.coordinator(t, c.leader(t))
	type snap struct {
		at        time.Time
		status    statusView
		metrics   string
		cpu       benchCPU
		completed map[string]float64
		read      float64 // records the source tasks read
		produced  int64   // records the broker acknowledged to the producer
	}
	take := func() snap {
		s := snap{cpu: benchCPUSnapshot(t, c)}
		var err error
		if s.status, err = c.status(leader); err != nil {
			t.Fatal(err)
		}
		if s.metrics, err = c.coordMetrics(leader); err != nil {
			t.Fatal(err)
		}
		s.at = time.Now()
		s.completed = benchMetricBy(s.metrics, "coordflow_checkpoints_completed_total", "job")
		for _, w := range c.workers {
			text, err := c.workerMetrics(w)
			if err != nil {
				t.Fatal(err)
			}
			s.read += benchMetric(text, "coordflow_records_in_total", `kind="source"`)
		}
		if producer != nil {
			s.produced = producer.acked.Load()
		}
		return s
	}
	s0 := take()
	if dir := os.Getenv(benchJobsProfileEnv); dir != "" {
		// CPU profiles of the leader and of a follower over most of the
		// window, taken together.
		secs := int(benchJobsWindow.Seconds()) - 5
		targets := map[string]string{ // file name: profile URL
			"leader": fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", leader.httpAddr, secs),
			"worker": fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.workers[0].metricsAddr, secs),
			// A delta: what the worker allocated during the window.
			"worker-allocs": fmt.Sprintf("http://%s/debug/pprof/allocs?seconds=%d", c.workers[0].metricsAddr, secs),
			// An execution trace of the leader's first seconds: where its
			// goroutines wait to run (go tool trace -pprof=sched).
			"leader-trace": fmt.Sprintf("http://%s/debug/pprof/trace?seconds=5", leader.httpAddr),
		}
		for _, cp := range c.coords {
			if cp != leader {
				targets["follower"] = fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", cp.httpAddr, secs)
			}
		}
		var wg sync.WaitGroup
		for role, url := range targets {
			wg.Go(func() {
				resp, err := (&http.Client{Timeout: benchJobsWindow}).Get(url)
				if err != nil {
					t.Errorf("profile %s: %v", role, err)
					return
				}
				data, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("%s: %s", resp.Status, data)
				}
				if err == nil {
					err = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%d-%s.pprof", role, n, input)), data, 0o644)
				}
				if err != nil {
					t.Errorf("profile %s: %v", role, err)
				}
			})
		}
		wg.Wait()
	}
	time.Sleep(time.Until(s0.at.Add(benchJobsWindow)))
	s1 := take()
	if s0.status.LeaderID != s1.status.LeaderID || s0.status.Term != s1.status.Term {
		t.Fatalf("the leader changed during the window: %s (term %d) to %s (term %d)",
			s0.status.LeaderID, s0.status.Term, s1.status.LeaderID, s1.status.Term)
	}
	window := s1.at.Sub(s0.at).Seconds()
	res.RecordsPerS = (s1.read - s0.read) / window
	res.ProducedPerS = float64(s1.produced-s0.produced) / window
	if producer != nil {
		if err := producer.err(); err != nil {
			t.Fatalf("steady producer: %v", err)
		}
		if want := float64(n * benchJobsRate); res.ProducedPerS < 0.95*want {
			t.Logf("the producer wrote %.0f records a second, short of the %.0f the scenario names", res.ProducedPerS, want)
		}
	}

	res.RateMin = math.Inf(1)
	for _, id := range ids {
		rate := (s1.completed[id] - s0.completed[id]) / window
		res.RateMin = min(res.RateMin, rate)
		res.RateMean += rate / float64(n)
		if rate < 0.9 {
			res.JobsBelow09++
		}
	}
	// grown is how much the samples of name with all of labels grew in
	// the window.
	grown := func(name string, labels ...string) float64 {
		return benchMetric(s1.metrics, name, labels...) - benchMetric(s0.metrics, name, labels...)
	}
	res.Aborted = int(grown("coordflow_checkpoints_aborted_total"))
	res.Checkpoints = int(grown("coordflow_checkpoints_completed_total"))
	res.HistP50MS = 1000 * histogramQuantile(0.5, s0.metrics, s1.metrics, "coordflow_checkpoint_duration_seconds")
	res.HistP99MS = 1000 * histogramQuantile(0.99, s0.metrics, s1.metrics, "coordflow_checkpoint_duration_seconds")
	res.RaftP50MS = 1000 * histogramQuantile(0.5, s0.metrics, s1.metrics, "coordflow_raft_apply_duration_seconds")
	res.RaftP99MS = 1000 * histogramQuantile(0.99, s0.metrics, s1.metrics, "coordflow_raft_apply_duration_seconds")
	// p50 and p99 in ms of each label value's histogram among the series
	// that have also, over the window.
	quantiles := func(name, also, label string, values ...string) map[string][2]float64 {
		q := make(map[string][2]float64, len(values))
		for _, v := range values {
			sel := func(text string) string { return benchSelect(benchSelect(text, also), label+`="`+v+`"`) }
			before, after := sel(s0.metrics), sel(s1.metrics)
			q[v] = [2]float64{
				1000 * histogramQuantile(0.5, before, after, name),
				1000 * histogramQuantile(0.99, before, after, name),
			}
		}
		return q
	}
	res.Phases = checkpointPhases(s0.metrics, s1.metrics)
	res.WriteStages = quantiles("coordflow_leader_write_stage_seconds", `command="CheckpointTriggered"`, "stage", "queued", "commit", "loop")
	// Of the commit stage, the part from the entry's raft.Apply on.
	res.WriteStages["raft"] = quantiles("coordflow_raft_apply_duration_seconds", "", "command", "CheckpointTriggered")["CheckpointTriggered"]
	entries := float64(s1.status.LastIndex - s0.status.LastIndex)
	unlabeled := func(text, name string) float64 { v, _ := metricSum(text, name); return v }
	delta := func(name string) float64 { return unlabeled(s1.metrics, name) - unlabeled(s0.metrics, name) }
	commands := delta("coordflow_raft_batch_commands_sum")
	res.EntriesPerS, res.CommandsPerS = entries/window, commands/window
	if entries > 0 {
		res.CommandsPerEntry = commands / entries
	}
	res.BytesPerS = grown("coordflow_raft_apply_bytes_total") / window
	res.EntryBytesPerS = delta("coordflow_raft_entry_bytes_total") / window
	res.Snapshots = int(delta("coordflow_raft_snapshot_persist_duration_seconds_count"))
	if res.Snapshots > 0 {
		res.SnapshotMeanMS = 1000 * delta("coordflow_raft_snapshot_persist_duration_seconds_sum") / float64(res.Snapshots)
	}
	res.SnapshotMB = unlabeled(s1.metrics, "coordflow_raft_snapshot_bytes") / 1e6
	res.DeadOverruled = int(unlabeled(s1.metrics, "coordflow_worker_dead_overruled_total"))
	res.LogAppendP99MS, res.SlowAppends = logAppends(s0.metrics, s1.metrics)
	const logStore = "coordflow_raft_log_store_duration_seconds"
	if n := grown(logStore+"_count", `op="delete"`); n > 0 {
		res.LogDeleteMeanMS = 1000 * grown(logStore+"_sum", `op="delete"`) / n
	}
	res.LeaderCPU = delta("process_cpu_seconds_total") / window
	res.WrittenMBps = s1.cpu.writtenSince(s0.cpu)
	cpu, wall := s1.cpu.since(s0.cpu)
	res.CPU = make(map[string]float64, len(cpu))
	for k, v := range cpu {
		res.CPU[k] = v / wall
	}
	jobs, err := c.listJobs(t)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		res.Restarts += int(jobs[id].Attempt) - 1
	}
	if res.Restarts > 0 || res.Aborted > 0 || res.DeadOverruled > 0 {
		c.keepLogs(t) // to see why
	}
	benchWriteResult(t, resultPath, res)
}

// checkpointPhases returns the p50 and p99, in ms, of each phase of the
// checkpoints a coordinator led between its scrapes before and after
// (coordflow_checkpoint_phase_seconds: trigger, acks, commit).
func checkpointPhases(before, after string) map[string][2]float64 {
	const name = "coordflow_checkpoint_phase_seconds"
	q := make(map[string][2]float64, 3)
	for _, phase := range []string{"trigger", "acks", "commit"} {
		sel := func(text string) string { return benchSelect(text, `phase="`+phase+`"`) }
		q[phase] = [2]float64{
			1000 * histogramQuantile(0.5, sel(before), sel(after), name),
			1000 * histogramQuantile(0.99, sel(before), sel(after), name),
		}
	}
	return q
}

// logAppends returns the p99, in ms, of a coordinator's Raft log appends
// between its scrapes before and after, and how many took over 128 ms.
func logAppends(before, after string) (p99MS float64, slow int) {
	const name = "coordflow_raft_log_store_duration_seconds"
	appends := func(text string) string { return benchSelect(text, `op="append"`) }
	p99MS = 1000 * histogramQuantile(0.99, appends(before), appends(after), name)
	grown := func(le string) float64 {
		return benchMetric(after, name+"_bucket", `op="append"`, le) - benchMetric(before, name+"_bucket", `op="append"`, le)
	}
	return p99MS, int(grown(`le="+Inf"`) - grown(`le="0.128"`))
}

// histogramQuantile estimates quantile q of the observations the histogram
// name (all label sets added up) received between the scrapes before and
// after, interpolating linearly within a bucket as Prometheus's
// histogram_quantile does.
func histogramQuantile(q float64, before, after, name string) float64 {
	counts := func(text string) map[float64]float64 {
		out := make(map[float64]float64)
		sc := bufio.NewScanner(strings.NewReader(text))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			rest, ok := strings.CutPrefix(line, name+"_bucket{")
			if !ok {
				continue
			}
			set, value, ok := strings.Cut(rest, "} ")
			_, le, found := strings.Cut(set, `le="`)
			if !ok || !found {
				continue
			}
			le, _, _ = strings.Cut(le, `"`)
			bound, err := strconv.ParseFloat(le, 64)
			if err != nil {
				continue
			}
			if v, err := strconv.ParseFloat(strings.Fields(value)[0], 64); err == nil {
				out[bound] += v
			}
		}
		return out
	}
	b0, b1 := counts(before), counts(after)
	bounds := slices.Sorted(maps.Keys(b1))
	if len(bounds) == 0 {
		return 0
	}
	total := b1[bounds[len(bounds)-1]] - b0[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0
	}
	rank := q * total
	prevBound, prevCount := 0.0, 0.0
	for _, ub := range bounds {
		c := b1[ub] - b0[ub]
		if c >= rank {
			if math.IsInf(ub, 1) {
				return prevBound
			}
			return prevBound + (ub-prevBound)*(rank-prevCount)/max(c-prevCount, 1e-9)
		}
		prevBound, prevCount = ub, c
	}
	return prevBound
}

// benchSelect keeps the lines of a metrics text that contain sel, so that a
// histogram of one label set can be read alone.
func benchSelect(text, sel string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		if strings.Contains(line, sel) {
			b.WriteString(line)
		}
	}
	return b.String()
}

// steadyProducer writes the light input of the scenario (produceSteady).
type steadyProducer struct {
	acked  atomic.Int64          // records the broker acknowledged
	failed atomic.Pointer[error] // the first record that failed, if any
}

// err returns the first failed record's error, or nil.
func (p *steadyProducer) err() error {
	if e := p.failed.Load(); e != nil {
		return *e
	}
	return nil
}

// produceSteady writes a steady rate records a second to each of the n
// topics manyTopic(0..n-1), keys k0..k9, until the test ends. It uses
// franz-go's producer and makes each record as it goes: the input is the
// scenario's load, not what it measures, and the test process shares the
// machine with the cluster. (A slice of every record to be written, given
// to sarama's producer, took half a core at 1,000 jobs, most of it the
// collector scanning 12 million records held for two minutes; and it
// delivered a tenth of the rate.) What the broker acknowledged is counted,
// so that a producer that falls behind shows.
func produceSteady(t *testing.T, brokers []string, n, rate int) *steadyProducer {
	t.Helper()
	// Records of a partition wait up to a tick to go in one batch: 5 of
	// them at 100 a second, instead of one request per record. The buffer
	// holds four seconds of input, so that Produce blocks (and the pacing
	// below falls behind, which the acked count shows) only when the
	// broker does not keep up for that long.
	const tick = 50 * time.Millisecond
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.ProducerLinger(tick), kgo.MaxBufferedRecords(4*n*rate))
	if err != nil {
		t.Fatalf("steady producer: %v", err)
	}
	p := &steadyProducer{}
	ctx, cancel := context.WithCancel(context.Background())
	promise := func(_ *kgo.Record, err error) {
		switch {
		case err == nil:
			p.acked.Add(1)
		case ctx.Err() == nil:
			p.failed.CompareAndSwap(nil, &err)
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		keys := make([][]byte, 10)
		for i := range keys {
			keys[i] = fmt.Appendf(nil, "k%d", i)
		}
		topics := make([]string, n)
		for j := range topics {
			topics[j] = manyTopic(j)
		}
		value := []byte("1")
		ticker := time.NewTicker(tick)
		defer ticker.Stop()
		// Each tick writes what the rate owes since the start, so a slow
		// tick is made up for by the next ones rather than lost.
		start := time.Now()
		for seq := 0; ; {
			for ; seq < int(time.Since(start).Seconds()*float64(rate)) && ctx.Err() == nil; seq++ {
				for _, topic := range topics {
					cl.Produce(ctx, &kgo.Record{Topic: topic, Partition: 0, Key: keys[seq%len(keys)], Value: value}, promise)
				}
			}
			select {
			case <-ticker.C:
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		cl.Close()
	})
	return p
}
