package integration

// BenchmarkThroughput (issue 9): a checkpointed job next to a plain sarama
// consumer in one process doing the same work, on the same topic of the same
// broker, in one run. Three jobs, each a sub-benchmark and a scenario of its
// own on a fresh cluster (devkafka, 3 coordd, 2 workerd), 4 input
// partitions, source and map parallelism 2, checkpoints every 200 ms:
//
//   - job=wordcount: the wordcount operator, memory backend, no sink, over
//     4,000,000 corpus lines. The plain consumer splits and counts:
//     strings.Fields and a map[string]int64 per partition, merged at the end.
//   - job=distinct: the distinct operator, disk backend (checkpoint storage
//     in a file:// directory), no sink, over 4,000,000 records whose keys
//     ("id-%d") are drawn from 1,000,000, so about 982,000 distinct keys.
//     The keys are partitioned by key, as a keyed topic is. The plain
//     consumer counts the records of every key in a map per partition (the
//     partitions' key sets are disjoint).
//   - job=passthrough: the passthrough operator with an exactly_once sink to
//     a 4-partition output topic, over 2,000,000 records with a key of their
//     own and 60-byte values. The plain consumer only reads (adds up value
//     lengths).
//
// Each scenario produces the input before anything reads it, then times the
// plain consumer (every partition, oldest to end), then submits the job and
// times it from the submission: until every input item is applied by the map
// tasks (a metrics poll every 100 ms or so: it can come out a little later
// than the checkpoint, which follows the items) and until the first
// completed checkpoint whose offsets cover every input partition's end (its
// end time, from the API; for passthrough its transactions are then
// committed). The ratios are job
// records/s over consumer records/s. It also reports the duration of every
// checkpoint up to the covering one (p50, p99, max; with a few dozen
// checkpoints p99 is close to the max), the map tasks' barrier alignment
// (coordflow_barrier_alignment_seconds of each worker, and each map task's
// alignment_ms in the checkpoint list where the API has it), the CPU
// seconds of each process group in each phase and each process's peak RSS
// (VmHWM at the end of the job phase), and ends by checking the job's result
// against the input: wordcount's counts word by word, distinct's state key by
// key (through the state export), passthrough's output read with
// read_committed record by record (each input record exactly once). The plain
// consumer's result is checked the same way.
//
// Run one job at a time, alone on the machine:
//
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=wordcount' -benchtime 1x -timeout 30m -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=distinct' -benchtime 1x -timeout 30m -v
//	flock /tmp/coordflow-it.lock go test ./integration -run '^$' -bench 'BenchmarkThroughput/job=passthrough' -benchtime 1x -timeout 30m -v
//
// -bench BenchmarkThroughput runs the three in turn (-timeout 1h). Like the
// other benchmarks (bench_test.go) each run is the scenario
// TestBenchScenarioThroughput in a child process; the sub-benchmark passes
// the job in COORDFLOW_BENCH_THROUGHPUT_JOB.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
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
	// benchTPJobEnv names the job the scenario runs: one of benchTPJobs.
	benchTPJobEnv     = "COORDFLOW_BENCH_THROUGHPUT_JOB"
	benchTPTopic      = "in"
	benchTPOutTopic   = "out"
	benchTPPartitions = 4
	benchTPSeed       = 20261128
	// benchTPInterval is every job's checkpoint interval (the spec
	// for wordcount; the same for the others, so that their checkpoint
	// figures compare).
	benchTPInterval = "200ms"
	// benchTPRetained is every job's checkpoint.retained: the checkpoint
	// list (polled every pollInterval, 100 ms) keeps the last 50 completed
	// ones, 10 s at 200 ms, so the poll sees each one. Checkpoints it did
	// not see are counted (Unseen) all the same.
	benchTPRetained = 50
	// benchTPWordcountRecords: about 26 million words, 129 MB of values.
	benchTPWordcountRecords = 4_000_000
	// benchTPDistinctRecords records with keys drawn from
	// benchTPDistinctKeySpace: 1M(1-e^-4), about 982,000 distinct keys. The
	// final check streams the whole state through the export (about 10 s).
	benchTPDistinctRecords  = 4_000_000
	benchTPDistinctKeySpace = 1_000_000
	benchTPDistinctValue    = 8 // bytes of each distinct record's value
	// benchTPPassRecords records of benchTPPassValue bytes, each with a
	// key of its own ("k%09d").
	benchTPPassRecords = 2_000_000
	benchTPPassValue   = 60
)

// benchTPJobs are the sub-benchmarks of BenchmarkThroughput, in order.
var benchTPJobs = []string{"wordcount", "distinct", "passthrough"}

// benchTPResult is what TestBenchScenarioThroughput measures for one job.
// Seconds of the job are from the POST that submitted it.
type benchTPResult struct {
	Job        string `json:"job"`
	Records    int64  `json:"records"`
	Items      int64  `json:"items"` // items the operator splits the input into: words (wordcount), else records
	Keys       int64  `json:"keys"`  // distinct keys of the input (distinct)
	ValueBytes int64  `json:"value_bytes"`
	LoadAvg    string `json:"loadavg"` // /proc/loadavg before the cluster started
	Cores      int    `json:"cores"`

	ProduceSeconds float64 `json:"produce_s"`

	// The plain consumer: one sarama consumer, a goroutine per partition,
	// oldest offset to end, doing ConsumerWork.
	ConsumerWork    string             `json:"consumer_work"`
	ConsumerSeconds float64            `json:"consumer_s"`
	ConsumerCPU     map[string]float64 `json:"consumer_cpu"` // by process group (benchCPUSnapshot)
	ConsumerCPUWall float64            `json:"consumer_cpu_wall_s"`

	// The job.
	FirstRecordSeconds float64 `json:"first_record_s"` // a source has read a record (metrics poll)
	AppliedSeconds     float64 `json:"applied_s"`      // the map tasks have applied every item (metrics poll)
	// AppliedRule says how "applied" was decided: "items" (the map tasks'
	// coordflow_records_in_total reached Items) or "drained" (sources have
	// read every record and the map tasks applied all the items the sources
	// sent, unchanged over two polls: for a runtime that combines or chains
	// items, where the map tasks apply fewer than Items).
	AppliedRule            string  `json:"applied_rule"`
	CheckpointedSeconds    float64 `json:"checkpointed_s"`     // end time of the first completed checkpoint covering every partition's end
	VisibleSeconds         float64 `json:"visible_s"`          // passthrough: no open transaction left on the output (poll after the covering checkpoint)
	FirstCheckpointSeconds float64 `json:"first_checkpoint_s"` // end time of the first completed checkpoint
	CoveringID             uint64  `json:"covering_id"`
	Checkpoints            int     `json:"checkpoints"` // completed up to the covering one, inclusive
	Aborted                int     `json:"aborted"`
	Unseen                 int     `json:"unseen"` // ids up to the covering one the poll never saw completed or aborted
	CheckpointP50MS        float64 `json:"checkpoint_p50_ms"`
	CheckpointP99MS        float64 `json:"checkpoint_p99_ms"`
	CheckpointMaxMS        float64 `json:"checkpoint_max_ms"`
	// Phases are the p50 and p99 (ms) of the leader's checkpoint phases
	// (coordflow_checkpoint_phase_seconds: trigger, acks, commit) over the
	// job phase; RaftAppendP99MS and SlowAppends are its log appends'
	// p99 and those over 128 ms: where a checkpoint's tail went.
	Phases          map[string][2]float64 `json:"phases_ms"`
	RaftAppendP99MS float64               `json:"raft_append_p99_ms"`
	SlowAppends     int                   `json:"slow_appends"`
	StateBytes      int64                 `json:"state_bytes"` // the map tasks' state_size in the covering checkpoint: what they wrote for it (a delta on the disk backend)
	StateKeys       int64                 `json:"state_keys"`  // keys of the last completed checkpoint at the end
	Attempt         uint64                `json:"attempt"`     // the job's attempt at the end (1: never restarted)
	// The workers' counters at the end, summed: records read and items sent
	// by sources, items applied and sink records written by map tasks.
	SourceIn  float64 `json:"source_in"`
	SourceOut float64 `json:"source_out"`
	MapIn     float64 `json:"map_in"`
	MapOut    float64 `json:"map_out"`
	// Alignment is coordflow_barrier_alignment_seconds of the job on each
	// worker (the histogram is per job and worker, not per task).
	Alignment []benchTPAlignment `json:"alignment"`
	// TaskAlignment is each map task's alignment_ms over the completed
	// checkpoints up to the covering one, where the checkpoint API reports
	// it (empty where it does not).
	TaskAlignment []benchTPTaskAlignment `json:"task_alignment"`
	JobCPU        map[string]float64     `json:"job_cpu"` // submission until the covering checkpoint was seen
	JobCPUWall    float64                `json:"job_cpu_wall_s"`
	// PeakRSSMB is VmHWM (MB) of every process at the end of the job phase,
	// by name ("workerd w1"); "test" is the scenario's process, whose peak
	// includes generating and producing the input and the plain consumer.
	PeakRSSMB       map[string]float64 `json:"peak_rss_mb"`
	WorkerPeakRSSMB float64            `json:"workerd_peak_rss_mb"` // the larger of the two workers
	// Check says what the final checks compared.
	Check string `json:"check"`
}

// benchTPAlignment is one worker's barrier alignment histogram for the job.
type benchTPAlignment struct {
	Worker   string   `json:"worker"`
	MapTasks []string `json:"map_tasks"`
	Count    float64  `json:"count"`
	Seconds  float64  `json:"seconds"` // sum
	P99MS    float64  `json:"p99_ms"`  // interpolated within buckets
}

// benchTPTaskAlignment is one map task's barrier alignment over the
// checkpoints, from the checkpoint API.
type benchTPTaskAlignment struct {
	Task        string  `json:"task"`
	Checkpoints int     `json:"checkpoints"`
	MeanMS      float64 `json:"mean_ms"`
	P50MS       float64 `json:"p50_ms"`
	P99MS       float64 `json:"p99_ms"`
	MaxMS       float64 `json:"max_ms"`
}

// BenchmarkThroughput runs TestBenchScenarioThroughput for each job of
// benchTPJobs (see the top of this file).
func BenchmarkThroughput(b *testing.B) {
	for _, job := range benchTPJobs {
		b.Run("job="+job, func(b *testing.B) {
			var runs []benchTPResult
			for i := range b.N {
				var r benchTPResult
				benchRunScenarioWith(b, "TestBenchScenarioThroughput", []string{benchTPJobEnv + "=" + job}, benchScenarioTimeout, &r)
				runs = append(runs, r)
				for _, line := range r.summary() {
					b.Logf("run %d: %s", i+1, line)
				}
			}
			med := func(f func(benchTPResult) float64) float64 { return benchMedian(benchMap(runs, f)) }
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(med(func(r benchTPResult) float64 { return r.ConsumerSeconds / r.AppliedSeconds }), "ratio-applied")
			b.ReportMetric(med(func(r benchTPResult) float64 { return r.ConsumerSeconds / r.CheckpointedSeconds }), "ratio-checkpointed")
			b.ReportMetric(med(func(r benchTPResult) float64 { return float64(r.Records) / r.ConsumerSeconds }), "consumer-records/s")
			b.ReportMetric(med(func(r benchTPResult) float64 { return float64(r.Records) / r.AppliedSeconds }), "job-applied-records/s")
			b.ReportMetric(med(func(r benchTPResult) float64 { return float64(r.Records) / r.CheckpointedSeconds }), "job-checkpointed-records/s")
			b.ReportMetric(med(func(r benchTPResult) float64 { return r.CheckpointP99MS }), "checkpoint-p99-ms")
			b.ReportMetric(med(func(r benchTPResult) float64 { return r.WorkerPeakRSSMB }), "workerd-peak-rss-MB")
		})
	}
}

// summary is the account of a run, a line per subject.
func (r benchTPResult) summary() []string {
	n := float64(r.Records)
	perRecord := func(cpu map[string]float64, groups ...string) float64 {
		var s float64
		for _, g := range groups {
			s += cpu[g]
		}
		return s / n * 1e6
	}
	keys := ""
	if r.Keys > 0 {
		keys = fmt.Sprintf(", %d distinct keys", r.Keys)
	}
	visible := ""
	if r.VisibleSeconds > 0 {
		visible = fmt.Sprintf("; all visible to read_committed %.2fs", r.VisibleSeconds)
	}
	lines := []string{
		fmt.Sprintf("job=%s: %d records, %d items%s, %.1f MB of values; produced in %.1fs; load average before: %s",
			r.Job, r.Records, r.Items, keys, float64(r.ValueBytes)/1e6, r.ProduceSeconds, r.LoadAvg),
		fmt.Sprintf("plain consumer (%s): %.2fs = %.0f records/s; CPU over %.1fs wall: %s; %.2f µs CPU per record (test + devkafka)",
			r.ConsumerWork, r.ConsumerSeconds, n/r.ConsumerSeconds, r.ConsumerCPUWall, benchFormatCPU(r.ConsumerCPU), perRecord(r.ConsumerCPU, "test", "devkafka")),
		fmt.Sprintf("job: first record %.2fs; all applied %.2fs = %.0f records/s (rule %s); checkpointed (checkpoint %d) %.2fs = %.0f records/s%s",
			r.FirstRecordSeconds, r.AppliedSeconds, n/r.AppliedSeconds, r.AppliedRule, r.CoveringID, r.CheckpointedSeconds, n/r.CheckpointedSeconds, visible),
		fmt.Sprintf("ratio job/consumer: applied %.3f, checkpointed %.3f", r.ConsumerSeconds/r.AppliedSeconds, r.ConsumerSeconds/r.CheckpointedSeconds),
		fmt.Sprintf("checkpoints: %d completed up to the covering one (%d aborted, %d not seen by the poll), first completed %.2fs; duration p50 %.0f ms, p99 %.0f ms, max %.0f ms; the covering one wrote %d bytes of state; %d keys at the end; attempt %d",
			r.Checkpoints, r.Aborted, r.Unseen, r.FirstCheckpointSeconds, r.CheckpointP50MS, r.CheckpointP99MS, r.CheckpointMaxMS, r.StateBytes, r.StateKeys, r.Attempt),
	}
	if r.Phases != nil {
		lines = append(lines, fmt.Sprintf("the leader's checkpoint phases, p50 / p99: trigger %.0f / %.0f ms, acks %.0f / %.0f ms, commit %.0f / %.0f ms; its Raft log appends p99 %.0f ms, %d over 128 ms",
			r.Phases["trigger"][0], r.Phases["trigger"][1], r.Phases["acks"][0], r.Phases["acks"][1],
			r.Phases["commit"][0], r.Phases["commit"][1], r.RaftAppendP99MS, r.SlowAppends))
	}
	var align []string
	for _, a := range r.Alignment {
		mean := 0.0
		if a.Count > 0 {
			mean = a.Seconds / a.Count * 1e3
		}
		align = append(align, fmt.Sprintf("%s %v: %.0f alignments, %.3fs in all, mean %.2f ms, p99 %.1f ms", a.Worker, a.MapTasks, a.Count, a.Seconds, mean, a.P99MS))
	}
	var perTask []string
	for _, a := range r.TaskAlignment {
		perTask = append(perTask, fmt.Sprintf("%s: mean %.2f ms, p50 %.2f ms, p99 %.2f ms, max %.2f ms over %d checkpoints", a.Task, a.MeanMS, a.P50MS, a.P99MS, a.MaxMS, a.Checkpoints))
	}
	if len(perTask) == 0 {
		perTask = []string{"not in the checkpoint API"}
	}
	lines = append(lines,
		"barrier alignment (worker metrics): "+strings.Join(align, "; "),
		"barrier alignment per map task (checkpoint API): "+strings.Join(perTask, "; "),
		fmt.Sprintf("job CPU over %.1fs wall: %s; %.2f µs CPU per record (workerd + coordd + devkafka)",
			r.JobCPUWall, benchFormatCPU(r.JobCPU), perRecord(r.JobCPU, "workerd", "coordd", "devkafka")),
		fmt.Sprintf("metrics at the end: sources read %.0f records, sent %.0f items; map tasks applied %.0f items, wrote %.0f sink records",
			r.SourceIn, r.SourceOut, r.MapIn, r.MapOut),
	)
	// Load from outside: CPU the machine spent beyond the cluster's
	// processes and this test's (other work on the machine, and the
	// kernel's own, such as loopback networking) above a tenth of the
	// phase's capacity.
	for _, ph := range []struct {
		name string
		cpu  map[string]float64
		wall float64
	}{{"plain consumer", r.ConsumerCPU, r.ConsumerCPUWall}, {"job", r.JobCPU, r.JobCPUWall}} {
		if capacity := ph.wall * float64(max(r.Cores, 1)); ph.cpu["other"] > 0.1*capacity {
			lines = append(lines, fmt.Sprintf("WARNING: %.1f CPU seconds of the %s phase's %.1f (%.1fs on %d cores) went to other processes or the kernel: its figures are disturbed",
				ph.cpu["other"], ph.name, capacity, ph.wall, r.Cores))
		}
	}
	var rss []string
	for _, name := range slices.Sorted(maps.Keys(r.PeakRSSMB)) {
		label := name
		if name == "test" {
			label = "test process (input, producer, plain consumer included)"
		}
		rss = append(rss, fmt.Sprintf("%s %.0f", label, r.PeakRSSMB[name]))
	}
	return append(lines,
		"peak RSS (VmHWM, MB) at the end of the job phase: "+strings.Join(rss, ", "),
		"checked: "+r.Check)
}

// ---- the scenario ----

func TestBenchScenarioThroughput(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkThroughput")
	job := os.Getenv(benchTPJobEnv)
	if !slices.Contains(benchTPJobs, job) {
		t.Fatalf("%s=%q: want one of %v", benchTPJobEnv, job, benchTPJobs)
	}
	res := benchTPResult{Job: job, LoadAvg: benchLoadAvg(), Cores: runtime.NumCPU()}
	topics := map[string]int32{benchTPTopic: benchTPPartitions}
	if job == "passthrough" {
		topics[benchTPOutTopic] = benchTPPartitions
	}
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 2, topics: topics})
	switch job {
	case "wordcount":
		benchTPWordcount(t, c, &res)
	case "distinct":
		benchTPDistinct(t, c, &res)
	case "passthrough":
		benchTPPassthrough(t, c, &res)
	}
	for _, line := range res.summary() {
		t.Log(line)
	}
	benchWriteResult(t, resultPath, res)
}

// benchTPWordcount: 4,000,000 corpus lines (a corpus per partition); the
// consumer splits and counts; the job's final counts must equal the input's.
func benchTPWordcount(t *testing.T, c *cluster, res *benchTPResult) {
	var wants [benchTPPartitions]map[string]int64
	end := benchTPProduce(t, c, res, benchTPWordcountRecords, func(p int32) benchGen {
		corpus := newCorpus(benchTPSeed + uint64(p))
		want := map[string]int64{}
		wants[p] = want
		return func(buf []byte, _ int) ([]byte, int) {
			line := corpus.line()
			for _, w := range strings.Fields(line) {
				want[w]++
			}
			return append(buf, line...), 0
		}
	})
	want := map[string]int64{}
	for _, w := range wants {
		for k, n := range w {
			want[k] += n
		}
	}
	for _, n := range want {
		res.Items += n
	}

	// The plain consumer: strings.Fields of every value, counted in a map
	// per partition; the maps are merged at the end, inside the timing.
	var parts [benchTPPartitions]map[string]int64
	got := map[string]int64{}
	benchTPConsumerPhase(t, c, res, end, "strings.Fields and count in a map", func(p int32) func(*sarama.ConsumerMessage) {
		counts := map[string]int64{}
		parts[p] = counts
		return func(m *sarama.ConsumerMessage) {
			for _, w := range strings.Fields(string(m.Value)) {
				counts[w]++
			}
		}
	}, func() {
		for _, counts := range parts {
			for w, n := range counts {
				got[w] += n
			}
		}
	})
	if diff := diffCounts(got, want); diff != "" {
		t.Fatalf("the plain consumer's counts differ from the input's:\n%s", diff)
	}

	spec := wordcountSpec(c.brokers(), benchTPTopic)
	spec.State = &stateSpec{Backend: "memory"}
	spec.Checkpoint.Interval = benchTPInterval
	spec.Checkpoint.Retained = benchTPRetained
	job := benchTPJobPhase(t, c, res, spec, end)

	final := c.jobState(t, job)
	if diff := diffCounts(final.Keyed, want); diff != "" {
		t.Fatalf("checkpoint %d's state differs from the counts of the input:\n%s", final.CheckpointID, diff)
	}
	res.StateKeys = int64(len(final.Keyed))
	res.Check = fmt.Sprintf("plain consumer's counts and checkpoint %d's state both equal the input's counts of %d words (%d occurrences)",
		final.CheckpointID, len(want), res.Items)
}

// benchTPDistinct: 4,000,000 records, key "id-<j>" with j drawn from
// [0, 1M) among the j = p mod 4 of its partition p; the consumer counts
// every key's records; the job's state must be exactly the input's keys.
func benchTPDistinct(t *testing.T, c *cluster, res *benchTPResult) {
	times := make([]uint16, benchTPDistinctKeySpace) // records of key id-j; partition p writes only j = p mod 4
	end := benchTPProduce(t, c, res, benchTPDistinctRecords, func(p int32) benchGen {
		rng := rand.New(rand.NewPCG(benchTPSeed, uint64(p)))
		const per = benchTPDistinctKeySpace / benchTPPartitions
		return func(buf []byte, i int) ([]byte, int) {
			j := benchTPPartitions*rng.IntN(per) + int(p)
			times[j]++
			at := len(buf)
			buf = strconv.AppendInt(append(buf, "id-"...), int64(j), 10)
			kl := len(buf) - at
			return benchTPValue(buf, i, benchTPDistinctValue), kl
		}
	})
	res.Items = res.Records
	for _, n := range times {
		if n > 0 {
			res.Keys++
		}
	}

	// The plain consumer: every key's records counted in a map per
	// partition. A key lives in one partition, so the maps are disjoint and
	// the distinct keys are all their keys; no merge.
	var parts [benchTPPartitions]map[string]int64
	benchTPConsumerPhase(t, c, res, end, "count every key in a map", func(p int32) func(*sarama.ConsumerMessage) {
		counts := map[string]int64{}
		parts[p] = counts
		return func(m *sarama.ConsumerMessage) { counts[string(m.Key)]++ }
	}, nil)
	var keys int64
	for p, counts := range parts {
		keys += int64(len(counts))
		for k, n := range counts {
			j, ok := benchTPDistinctIndex(k)
			if !ok || j%benchTPPartitions != p || int64(times[j]) != n {
				t.Fatalf("plain consumer: partition %d: key %q counted %d times, want %d", p, k, n, times[j%len(times)])
			}
		}
	}
	if keys != res.Keys {
		t.Fatalf("plain consumer: %d distinct keys, the input has %d", keys, res.Keys)
	}

	spec := jobSpec{
		Name:     "distinct",
		Source:   sourceSpec{Brokers: c.brokers(), Topic: benchTPTopic, Start: "earliest", Parallelism: 2},
		Operator: operatorSpec{Name: "distinct", Parallelism: 2, MaxParallelism: 128},
		State:    &stateSpec{Backend: "disk"},
		Checkpoint: checkpointSpec{
			Interval: benchTPInterval, Timeout: "30s", MinPause: "0s", Retained: benchTPRetained, TolerableFailures: 3,
			Storage: newFileStorage(t).URL(),
		},
	}
	job := benchTPJobPhase(t, c, res, spec, end)

	// The state, streamed through the export: exactly the input's keys,
	// each once, each with distinct's marker.
	var seen []bool
	var n, extra, dup, wrong int64
	var examples []string
	note := func(format string, args ...any) {
		if len(examples) < 10 {
			examples = append(examples, fmt.Sprintf(format, args...))
		}
	}
	var h exportHeader
	c.waitFor(t, longTimeout, "an export of the job's state covering all input", func() (bool, error) {
		seen = make([]bool, benchTPDistinctKeySpace)
		n, extra, dup, wrong, examples = 0, 0, 0, 0, nil
		var err error
		h, err = c.exportState(c.api(t), job, func(e stateEntry) error {
			n++
			j, ok := benchTPDistinctIndex(string(e.key))
			switch {
			case !ok || times[j] == 0:
				extra++
				note("extra key %q", e.key)
			case seen[j]:
				dup++
				note("key %q twice", e.key)
			default:
				seen[j] = true
				if e.isNum || string(e.value) != "\x01" {
					wrong++
					note("key %q: value %+v, want the byte 0x01", e.key, e)
				}
			}
			return nil
		})
		if err != nil {
			return false, err
		}
		if behind := coversEnd(h.Offsets, benchTPTopic, end); behind != "" {
			return false, fmt.Errorf("export of checkpoint %d: %s", h.CheckpointID, behind)
		}
		return true, nil
	})
	var missing int64
	for j, s := range seen {
		if times[j] > 0 && !s {
			missing++
			note("key id-%d missing", j)
		}
	}
	if missing+extra+dup+wrong > 0 {
		t.Fatalf("checkpoint %d's state is not the input's set of %d keys: %d keys exported, %d missing, %d extra, %d twice, %d with a wrong value; %s",
			h.CheckpointID, res.Keys, n, missing, extra, dup, wrong, strings.Join(examples, "; "))
	}
	res.StateKeys = n
	res.Check = fmt.Sprintf("plain consumer's key counts equal the input's; the export of checkpoint %d is exactly the input's %d keys, each with distinct's marker",
		h.CheckpointID, res.Keys)
}

// benchTPDistinctIndex returns j of key "id-<j>".
func benchTPDistinctIndex(key string) (int, bool) {
	s, ok := strings.CutPrefix(key, "id-")
	if !ok {
		return 0, false
	}
	j, err := strconv.Atoi(s)
	if err != nil || j < 0 || j >= benchTPDistinctKeySpace {
		return 0, false
	}
	return j, true
}

// benchTPPassthrough: 2,000,000 records, record i with key "k%09d" of i and
// a 60-byte value of i; the consumer only reads; the output topic, read
// with read_committed, must hold every input record exactly once.
func benchTPPassthrough(t *testing.T, c *cluster, res *benchTPResult) {
	end := benchTPProduce(t, c, res, benchTPPassRecords, func(int32) benchGen {
		return func(buf []byte, i int) ([]byte, int) {
			return benchTPValue(benchStateKey(buf, i), i, benchTPPassValue), benchStateKeyBytes
		}
	})
	res.Items = res.Records

	var sizes [benchTPPartitions]int64
	benchTPConsumerPhase(t, c, res, end, "read only (add up value lengths)", func(p int32) func(*sarama.ConsumerMessage) {
		return func(m *sarama.ConsumerMessage) { sizes[p] += int64(len(m.Value)) }
	}, nil)
	if got := sizes[0] + sizes[1] + sizes[2] + sizes[3]; got != res.ValueBytes {
		t.Fatalf("plain consumer read %d bytes of values, the input has %d", got, res.ValueBytes)
	}

	spec := jobSpec{
		Name:     "passthrough",
		Source:   sourceSpec{Brokers: c.brokers(), Topic: benchTPTopic, Start: "earliest", Parallelism: 2},
		Operator: operatorSpec{Name: "passthrough", Parallelism: 2, MaxParallelism: 128},
		Sink:     &sinkSpec{Brokers: c.brokers(), Topic: benchTPOutTopic, Delivery: "exactly_once"},
		State:    &stateSpec{Backend: "memory"},
		Checkpoint: checkpointSpec{
			Interval: benchTPInterval, Timeout: "30s", MinPause: "0s", Retained: benchTPRetained, TolerableFailures: 3,
		},
	}
	benchTPJobPhase(t, c, res, spec, end)

	out := benchTPReadOutput(t, c.brokers(), benchTPOutTopic, benchTPPassRecords)
	if out.missing+out.extra+out.dup+out.wrong > 0 {
		// Whose fault: the input read the same way.
		in := benchTPReadOutput(t, c.brokers(), benchTPTopic, benchTPPassRecords)
		t.Logf("the input topic %s read the same way: %d records read, %d missing, %d not from the input, %d more than once, %d with a wrong value; %s",
			benchTPTopic, in.read, in.missing, in.extra, in.dup, in.wrong, strings.Join(in.examples, "; "))
		t.Fatalf("read_committed output of %s: %d records read, %d missing, %d not from the input, %d more than once, %d with a wrong value; %s",
			benchTPOutTopic, out.read, out.missing, out.extra, out.dup, out.wrong, strings.Join(out.examples, "; "))
	}
	res.Check = fmt.Sprintf("plain consumer read every value byte; %s read with read_committed holds each of the %d input records exactly once, key and value equal",
		benchTPOutTopic, res.Records)
}

// ---- phases ----

// benchGen makes the records of one partition, in order: it appends the
// key and then the value of its next record (i is the record's index in the
// whole input) to buf and returns buf and the key's length (0: no key).
type benchGen func(buf []byte, i int) ([]byte, int)

// benchTPProduce produces n records to benchTPTopic, record i to partition i
// mod benchTPPartitions, each partition's made by newGen(p) and sent by a
// producer of its own; it sets the input figures of res and returns the
// topic's end offsets.
func benchTPProduce(t *testing.T, c *cluster, res *benchTPResult, n int, newGen func(p int32) benchGen) map[int32]int64 {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	var errs [benchTPPartitions]error
	var valueBytes [benchTPPartitions]int64
	for p := range int32(benchTPPartitions) {
		gen := newGen(p)
		wg.Go(func() {
			pr, err := idempotentProducer(c.brokers(), sarama.NewManualPartitioner)
			if err != nil {
				errs[p] = err
				return
			}
			defer pr.Close()
			const chunk = 20_000
			var buf []byte
			msgs := make([]*sarama.ProducerMessage, 0, chunk)
			for i := int(p); i < n; i += benchTPPartitions {
				at := len(buf)
				var kl int
				buf, kl = gen(buf, i)
				m := &sarama.ProducerMessage{Topic: benchTPTopic, Partition: p, Value: sarama.ByteEncoder(buf[at+kl : len(buf) : len(buf)])}
				if kl > 0 {
					m.Key = sarama.ByteEncoder(buf[at : at+kl : at+kl])
				}
				valueBytes[p] += int64(len(buf) - at - kl)
				msgs = append(msgs, m)
				if len(msgs) == chunk || i+benchTPPartitions >= n {
					if err := pr.SendMessages(msgs); err != nil {
						errs[p] = fmt.Errorf("produce to %s/%d: %w", benchTPTopic, p, err)
						return
					}
					// Acknowledged: the messages' bytes may be reused.
					msgs, buf = msgs[:0], buf[:0]
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	res.ProduceSeconds = time.Since(start).Seconds()
	res.Records = int64(n)
	for _, b := range valueBytes {
		res.ValueBytes += b
	}
	end := topicEndOffsets(t, c.brokers(), benchTPTopic)
	if got := sumOffsets(end); got != res.Records {
		t.Fatalf("%s holds %d records after producing %d", benchTPTopic, got, res.Records)
	}
	t.Logf("produced %d records (%.1f MB of values) in %.1fs", n, float64(res.ValueBytes)/1e6, res.ProduceSeconds)
	return end
}

// benchTPValue appends an n-byte value of record i: letters and digits
// drawn from i (splitmix64).
func benchTPValue(dst []byte, i, n int) []byte {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
	x := uint64(i) * 0x9e3779b97f4a7c15
	for left := n; left > 0; {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		for k := 0; k < 10 && left > 0; k++ {
			dst = append(dst, alphabet[z&63])
			z >>= 6
			left--
		}
	}
	return dst
}

// benchTPConsumerPhase times the plain consumer (benchConsume) and the CPU
// every process group used meanwhile.
func benchTPConsumerPhase(t *testing.T, c *cluster, res *benchTPResult, end map[int32]int64, work string,
	handler func(p int32) func(*sarama.ConsumerMessage), merge func()) {
	t.Helper()
	runtime.GC() // the input's garbage is not the consumer's
	res.ConsumerWork = work
	cpu0 := benchCPUSnapshot(t, c)
	n, elapsed := benchConsume(t, c.brokers(), benchTPTopic, end, handler, merge)
	res.ConsumerCPU, res.ConsumerCPUWall = benchCPUSnapshot(t, c).since(cpu0)
	if n != res.Records {
		t.Fatalf("plain consumer read %d records, want %d", n, res.Records)
	}
	res.ConsumerSeconds = elapsed.Seconds()
	t.Logf("plain consumer (%s): %d records in %.2fs = %.0f records/s; CPU seconds: %s",
		work, n, res.ConsumerSeconds, float64(n)/res.ConsumerSeconds, benchFormatCPU(res.ConsumerCPU))
}

// benchConsume reads every partition of topic from the oldest offset up to
// end with one plain sarama consumer, a goroutine per partition calling the
// handler handler(p) made for it on every record, then runs merge (if not
// nil). It returns the records read and the time from creating the consumer
// to the end of merge.
func benchConsume(t *testing.T, brokers []string, topic string, end map[int32]int64,
	handler func(p int32) func(*sarama.ConsumerMessage), merge func()) (int64, time.Duration) {
	t.Helper()
	handlers := make(map[int32]func(*sarama.ConsumerMessage), len(end))
	for p := range end {
		handlers[p] = handler(p)
	}
	start := time.Now()
	cons, err := sarama.NewConsumer(brokers, saramaConfig())
	if err != nil {
		t.Fatalf("consume %s: %v", topic, err)
	}
	defer cons.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var total atomic.Int64
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for p, last := range end {
		pc, err := cons.ConsumePartition(topic, p, sarama.OffsetOldest)
		if err != nil {
			t.Fatalf("consume %s/%d: %v", topic, p, err)
		}
		handle := handlers[p]
		wg.Go(func() {
			defer pc.Close()
			var n int64
			for n < last {
				select {
				case m := <-pc.Messages():
					n++
					handle(m)
				case err := <-pc.Errors():
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s/%d: %w", topic, p, err))
					mu.Unlock()
					return
				case <-ctx.Done():
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s/%d: %d of %d records: %w", topic, p, n, last, ctx.Err()))
					mu.Unlock()
					return
				}
			}
			total.Add(n)
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("consume %s: %v", topic, errs)
	}
	if merge != nil {
		merge()
	}
	return total.Load(), time.Since(start)
}

// benchTPCounters are the job's counters summed over the workers.
type benchTPCounters struct{ srcIn, srcOut, mapIn, mapOut float64 }

func benchTPScrape(c *cluster, job string) (benchTPCounters, map[string]string, error) {
	var m benchTPCounters
	texts := map[string]string{}
	for _, w := range c.workers {
		text, err := c.workerMetrics(w)
		if err != nil {
			return m, nil, err
		}
		texts[w.id] = text
		j := `job="` + job + `"`
		m.srcIn += benchMetric(text, "coordflow_records_in_total", j, `kind="source"`)
		m.srcOut += benchMetric(text, "coordflow_records_out_total", j, `kind="source"`)
		m.mapIn += benchMetric(text, "coordflow_records_in_total", j, `kind="map"`)
		m.mapOut += benchMetric(text, "coordflow_records_out_total", j, `kind="map"`)
	}
	return m, texts, nil
}

// benchTPJobPhase submits spec and times the job until its map tasks have
// applied every item and a completed checkpoint covers end; it fills the
// job's figures of res (checkpoints, CPU, peak RSS, alignment) and returns
// the job id.
func benchTPJobPhase(t *testing.T, c *cluster, res *benchTPResult, spec jobSpec, end map[int32]int64) string {
	t.Helper()
	runtime.GC() // the consumer's garbage is not the job's
	leader := c.coordinator(t, c.leader(t))
	leader0, err := c.coordMetrics(leader)
	if err != nil {
		t.Fatal(err)
	}
	cpu0 := benchCPUSnapshot(t, c)
	submitted := time.Now()
	job := c.submitJob(t, spec)
	since := func(at time.Time) float64 { return at.Sub(submitted).Seconds() }

	seen := map[uint64]benchCheckpoint{} // completed and aborted checkpoints, by id
	var covering *benchCheckpoint
	var firstRecord, applied, prevAt time.Time
	var prev benchTPCounters
	n := float64(res.Records)
	c.waitFor(t, 10*time.Minute, "every item applied and a completed checkpoint covering the end of "+benchTPTopic, func() (bool, error) {
		if applied.IsZero() {
			m, _, err := benchTPScrape(c, job)
			now := time.Now()
			if err != nil {
				return false, err
			}
			if m.srcIn > 0 && firstRecord.IsZero() {
				firstRecord = now
			}
			switch {
			case m.srcIn >= n && m.mapIn >= float64(res.Items):
				applied, res.AppliedRule = now, "items"
			case m.srcIn >= n && m.mapIn == m.srcOut && prev == m:
				applied, res.AppliedRule = prevAt, "drained"
			}
			prev, prevAt = m, now
		}
		cps, err := benchCheckpoints(c, c.api(t), job)
		if err != nil {
			return false, err
		}
		for _, cp := range cps {
			if cp.Status != "pending" {
				seen[cp.ID] = cp
			}
			if cp.Status == "completed" && cp.covers(benchTPTopic, end) && (covering == nil || cp.ID < covering.ID) {
				covering = &cp
			}
		}
		if covering == nil || applied.IsZero() {
			return false, fmt.Errorf("%d checkpoints seen; sources read %.0f of %.0f records, map tasks applied %.0f items (sources sent %.0f, the input has %d)",
				len(seen), prev.srcIn, n, prev.mapIn, prev.srcOut, res.Items)
		}
		return true, nil
	})
	res.JobCPU, res.JobCPUWall = benchCPUSnapshot(t, c).since(cpu0)
	if leader1, err := c.coordMetrics(leader); err != nil {
		t.Logf("the leader's metrics after the job phase: %v", err)
	} else {
		res.Phases = checkpointPhases(leader0, leader1)
		res.RaftAppendP99MS, res.SlowAppends = logAppends(leader0, leader1)
	}

	// Peak RSS of every process, before the checks read state or output.
	res.PeakRSSMB = map[string]float64{}
	for name, m := range benchStateMemory(t, c) {
		res.PeakRSSMB[name] = m.hwm
		if strings.HasPrefix(name, "workerd") {
			res.WorkerPeakRSSMB = max(res.WorkerPeakRSSMB, m.hwm)
		}
	}
	res.PeakRSSMB["test"] = benchSelfPeakRSSMB(t)

	if spec.Sink != nil && spec.Sink.Delivery == "exactly_once" {
		c.waitFor(t, time.Minute, "no open transaction on "+spec.Sink.Topic, func() (bool, error) {
			open := openOutput(t, c.brokers(), spec.Sink.Topic)
			return len(open) == 0, fmt.Errorf("open: %v", open)
		})
		res.VisibleSeconds = since(time.Now())
	}

	// Counters and alignment at the end, and where the map tasks ran.
	m, texts, err := benchTPScrape(c, job)
	if err != nil {
		t.Fatal(err)
	}
	res.SourceIn, res.SourceOut, res.MapIn, res.MapOut = m.srcIn, m.srcOut, m.mapIn, m.mapOut
	j, err := benchGetJob(c, c.api(t), job)
	if err != nil {
		t.Fatal(err)
	}
	res.Attempt = j.Attempt
	if j.Attempt != 1 {
		t.Logf("the job restarted: attempt %d, %s %s", j.Attempt, j.Status, j.Reason)
	}
	for _, w := range c.workers {
		a := benchTPAlignment{Worker: w.id}
		for _, task := range j.Tasks {
			if task.Kind == "map" && task.Worker == w.id {
				a.MapTasks = append(a.MapTasks, task.ID)
			}
		}
		sel := benchSelect(texts[w.id], `job="`+job+`"`)
		a.Count = benchMetric(sel, "coordflow_barrier_alignment_seconds_count")
		a.Seconds = benchMetric(sel, "coordflow_barrier_alignment_seconds_sum")
		a.P99MS = histogramQuantile(0.99, "", sel, "coordflow_barrier_alignment_seconds") * 1e3
		res.Alignment = append(res.Alignment, a)
	}
	if st, err := c.getStateHeader(t, job); err == nil {
		res.StateKeys = st.Keys
	}

	// Checkpoints up to the covering one.
	res.FirstRecordSeconds = since(firstRecord)
	res.AppliedSeconds = since(applied)
	res.CheckpointedSeconds = since(covering.ended(t))
	res.CoveringID = covering.ID
	for _, task := range covering.Tasks {
		res.StateBytes += int64(task.StateSize)
	}
	var durations []float64
	alignment := map[string][]float64{} // by map task
	for id := uint64(1); id <= covering.ID; id++ {
		cp, ok := seen[id]
		switch {
		case !ok:
			res.Unseen++
		case cp.Status == "completed":
			durations = append(durations, cp.DurationMS)
			for _, task := range cp.Tasks {
				if task.AlignmentMS != nil {
					alignment[task.ID] = append(alignment[task.ID], *task.AlignmentMS)
				}
			}
			if res.Checkpoints == 0 {
				res.FirstCheckpointSeconds = since(cp.ended(t))
			}
			res.Checkpoints++
		case cp.Status == "aborted":
			res.Aborted++
			t.Logf("checkpoint %d aborted: %s", cp.ID, cp.Reason)
		}
	}
	if res.Unseen > 0 {
		t.Logf("%d of the checkpoints up to %d were never seen completed or aborted by the poll: their durations are missing", res.Unseen, covering.ID)
	}
	res.CheckpointP50MS = benchStatePercentile(durations, 50)
	res.CheckpointP99MS = benchStatePercentile(durations, 99)
	res.CheckpointMaxMS = slices.Max(durations)
	for _, task := range slices.Sorted(maps.Keys(alignment)) {
		ms := alignment[task]
		a := benchTPTaskAlignment{Task: task, Checkpoints: len(ms), P50MS: benchStatePercentile(ms, 50), P99MS: benchStatePercentile(ms, 99), MaxMS: slices.Max(ms)}
		for _, v := range ms {
			a.MeanMS += v / float64(len(ms))
		}
		res.TaskAlignment = append(res.TaskAlignment, a)
	}
	t.Logf("job %s: first record %.2fs, all applied %.2fs (%s), covered by checkpoint %d at %.2fs; durations (ms) %v",
		job, res.FirstRecordSeconds, res.AppliedSeconds, res.AppliedRule, covering.ID, res.CheckpointedSeconds, durations)
	return job
}

// benchSelfPeakRSSMB returns this process's VmHWM in MB.
func benchSelfPeakRSSMB(t *testing.T) float64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatalf("own memory: %v", err)
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb * 1024 / 1e6
		}
	}
	t.Fatal("own memory: no VmHWM in /proc/self/status")
	return 0
}

// ---- passthrough's output ----

type benchTPOutput struct {
	read, missing, extra, dup, wrong int64
	examples                         []string
}

// benchTPReadOutput reads topic with read_committed isolation, a goroutine
// per partition, until it has read n records and then for 2 s more (a
// duplicate or stray record would show up), and checks every record against
// passthrough's input: key "k%09d" of some i < n with i's value, each i
// once.
func benchTPReadOutput(t *testing.T, brokers []string, topic string, n int) benchTPOutput {
	t.Helper()
	cfg := saramaConfig()
	cfg.Consumer.IsolationLevel = sarama.ReadCommitted
	cons, err := sarama.NewConsumer(brokers, cfg)
	if err != nil {
		t.Fatalf("read %s: %v", topic, err)
	}
	defer cons.Close()
	parts, err := cons.Partitions(topic)
	if err != nil {
		t.Fatalf("read %s: %v", topic, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var read atomic.Int64
	type partResult struct {
		indexes      []int32
		extra, wrong int64
		examples     []string
		err          error
	}
	results := make([]partResult, len(parts))
	var wg sync.WaitGroup
	for k, p := range parts {
		pc, err := cons.ConsumePartition(topic, p, sarama.OffsetOldest)
		if err != nil {
			t.Fatalf("read %s/%d: %v", topic, p, err)
		}
		r := &results[k]
		wg.Go(func() {
			defer pc.Close()
			var want []byte
			for {
				select {
				case m := <-pc.Messages():
					read.Add(1)
					i, ok := benchStateParseKey(string(m.Key))
					if !ok || i >= n {
						r.extra++
						if len(r.examples) < 5 {
							r.examples = append(r.examples, fmt.Sprintf("%s/%d@%d: key %q not from the input", topic, p, m.Offset, m.Key))
						}
						continue
					}
					r.indexes = append(r.indexes, int32(i))
					if want = benchTPValue(want[:0], i, benchTPPassValue); !bytes.Equal(m.Value, want) {
						r.wrong++
						if len(r.examples) < 5 {
							r.examples = append(r.examples, fmt.Sprintf("%s/%d@%d: key %q value %q, want %q", topic, p, m.Offset, m.Key, m.Value, want))
						}
					}
				case err := <-pc.Errors():
					r.err = err
					return
				case <-ctx.Done():
					return
				}
			}
		})
	}
	deadline := time.Now().Add(3 * time.Minute)
	for read.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // poll interval, not synchronization
	}
	time.Sleep(2 * time.Second) // anything more would be a duplicate or a stray record
	cancel()
	wg.Wait()

	out := benchTPOutput{read: read.Load()}
	times := make([]uint8, n)
	for k, r := range results {
		if r.err != nil {
			t.Fatalf("read %s/%d: %v", topic, parts[k], r.err)
		}
		out.extra += r.extra
		out.wrong += r.wrong
		out.examples = append(out.examples, r.examples...)
		for _, i := range r.indexes {
			if times[i] > 0 {
				out.dup++
				if len(out.examples) < 10 {
					out.examples = append(out.examples, fmt.Sprintf("key %q read more than once", benchStateKey(nil, int(i))))
				}
			}
			times[i] = min(times[i]+1, 2)
		}
	}
	for i, c := range times {
		if c == 0 {
			out.missing++
			if len(out.examples) < 10 {
				out.examples = append(out.examples, fmt.Sprintf("key %q missing", benchStateKey(nil, i)))
			}
		}
	}
	return out
}
