package integration

// Benchmarks of the sink (issue 7): throughput of the wordcount job with no
// sink, an at-least-once sink and an exactly-once sink on the same input, in
// one run; and the end-to-end latency from producing a record to its output
// being visible to a read_committed consumer. docs/benchmarks.md has the
// figures. Run them alone on the machine:
//
//	go test ./integration -run '^$' -bench BenchmarkSinkThroughput -benchtime 1x -count 3 -timeout 30m
//	go test ./integration -run '^$' -bench BenchmarkSinkLatency -benchtime 1x -count 3 -timeout 30m

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// benchSinkRecords is the input of the sink throughput scenario: about 3.2
// million words, so as many sink records per job.
const benchSinkRecords = 500_000

// benchSinkVariants are the jobs the throughput scenario runs, in order.
var benchSinkVariants = []string{"none", "at_least_once", "exactly_once"}

// benchSinkResult is what TestBenchScenarioSinkThroughput measures: per
// variant, seconds from the job's submission to the end time of the first
// completed checkpoint that covers the whole input (for exactly_once, its
// outputs are then committed).
type benchSinkResult struct {
	Records int64              `json:"records"`
	Words   int64              `json:"words"`
	Seconds map[string]float64 `json:"seconds"`
	// VisibleSeconds (exactly_once): from the submission until a
	// read_committed consumer could read every output (no open transaction
	// left on the output topic).
	VisibleSeconds float64 `json:"visible_s"`
	LoadAvg        string  `json:"loadavg"`
}

// BenchmarkSinkThroughput runs, in one run on one cluster (devkafka, 3
// coordd, 2 workerd), the wordcount job (parallelism 2 and 2, checkpoints
// every second, memory state) over the same 500,000 lines three times:
// without a sink, with an at-least-once sink and with an exactly-once sink,
// and reports each one's records a second, input to covering checkpoint.
func BenchmarkSinkThroughput(b *testing.B) {
	var runs []benchSinkResult
	for i := range b.N {
		var r benchSinkResult
		benchRunScenario(b, "TestBenchScenarioSinkThroughput", &r)
		runs = append(runs, r)
		var parts []string
		for _, v := range benchSinkVariants {
			parts = append(parts, fmt.Sprintf("%s %.2fs = %.0f records/s", v, r.Seconds[v], float64(r.Records)/r.Seconds[v]))
		}
		b.Logf("run %d: %d records, %d words (one sink record each): %s; exactly_once all visible to read_committed after %.2fs; exactly_once / at_least_once = %.2f; load before: %s",
			i+1, r.Records, r.Words, strings.Join(parts, "; "), r.VisibleSeconds, r.Seconds["at_least_once"]/r.Seconds["exactly_once"], r.LoadAvg)
	}
	b.ReportMetric(0, "ns/op")
	for _, v := range benchSinkVariants {
		b.ReportMetric(benchMedian(benchMap(runs, func(r benchSinkResult) float64 { return float64(r.Records) / r.Seconds[v] })), v+"-records/s")
	}
	b.ReportMetric(benchMedian(benchMap(runs, func(r benchSinkResult) float64 { return r.Seconds["at_least_once"] / r.Seconds["exactly_once"] })), "eo/alo")
}

func TestBenchScenarioSinkThroughput(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkSinkThroughput")
	const partitions = 4
	res := benchSinkResult{Seconds: map[string]float64{}, LoadAvg: benchLoadAvg()}
	topics := map[string]int32{"words": partitions}
	for _, v := range benchSinkVariants {
		topics["out-"+v] = partitions
	}
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 2, topics: topics})
	in := newWordInput(20261202, benchSinkRecords, partitions)
	res.Records = int64(len(in.recs))
	for _, n := range in.want {
		res.Words += n
	}
	produce(t, c.brokers(), "words", in.recs)
	end := topicEndOffsets(t, c.brokers(), "words")

	for _, v := range benchSinkVariants {
		spec := wordcountSpec(c.brokers(), "words")
		spec.Name = "wc-" + strings.ReplaceAll(v, "_", "-")
		if v != "none" {
			spec.Sink = &sinkSpec{Brokers: c.brokers(), Topic: "out-" + v, Delivery: v}
		}
		submitted := time.Now()
		job := c.submitJob(t, spec)
		var covering *benchCheckpoint
		c.waitFor(t, 10*time.Minute, v+": a completed checkpoint covering the end of words", func() (bool, error) {
			cps, err := benchCheckpoints(c, c.api(t), job)
			if err != nil {
				return false, err
			}
			for _, cp := range cps {
				if cp.Status == "completed" && cp.covers("words", end) && (covering == nil || cp.ID < covering.ID) {
					covering = &cp
				}
			}
			return covering != nil, fmt.Errorf("no covering checkpoint yet")
		})
		res.Seconds[v] = covering.ended(t).Sub(submitted).Seconds()
		if v == "exactly_once" {
			c.waitFor(t, time.Minute, "no open transaction on out-exactly_once", func() (bool, error) {
				open := openOutput(t, c.brokers(), "out-exactly_once")
				return len(open) == 0, fmt.Errorf("open: %v", open)
			})
			res.VisibleSeconds = time.Since(submitted).Seconds()
		}
		if diff := diffCounts(c.jobState(t, job).Keyed, in.want); diff != "" {
			t.Fatalf("%s: state differs from the input:\n%s", v, diff)
		}
		if v != "none" {
			got := c.waitOutput(t, "out-"+v, v == "exactly_once", in.want)
			if v == "exactly_once" {
				if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
					t.Fatalf("exactly_once output: %s", strings.Join(problems[:min(10, len(problems))], "; "))
				}
			}
		}
		if err := c.call("DELETE", c.api(t), "/v1/jobs/"+job, nil, nil); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: covered by checkpoint %d after %.2fs = %.0f records/s", v, covering.ID, res.Seconds[v], float64(res.Records)/res.Seconds[v])
	}
	benchWriteResult(t, resultPath, res)
}

// benchLatencyResult is what TestBenchScenarioSinkLatency measures, per
// checkpoint interval: milliseconds from producing a record to a
// read_committed consumer reading its output.
type benchLatencyResult struct {
	Intervals []string           `json:"intervals"`
	P50MS     map[string]float64 `json:"p50_ms"`
	P99MS     map[string]float64 `json:"p99_ms"`
	Samples   map[string]int     `json:"samples"`
	LoadAvg   string             `json:"loadavg"`
}

// benchLatencyRate and benchLatencyDuration are the latency scenario's
// steady input: records a second, each with a key of its own, for so long.
const (
	benchLatencyRate     = 1000
	benchLatencyDuration = 20 * time.Second
	benchLatencyWarmup   = 3 * time.Second
)

// BenchmarkSinkLatency measures, for a count job (parallelism 2 and 2) with
// an exactly-once sink at a 200 ms and a 1 s checkpoint interval, the time
// from producing a record (1,000 a second, each with a new key) to a
// read_committed consumer reading the count it caused.
func BenchmarkSinkLatency(b *testing.B) {
	var runs []benchLatencyResult
	for i := range b.N {
		var r benchLatencyResult
		benchRunScenario(b, "TestBenchScenarioSinkLatency", &r)
		runs = append(runs, r)
		for _, iv := range r.Intervals {
			b.Logf("run %d: interval %s: produce to read_committed p50 %.0f ms, p99 %.0f ms over %d records; load before: %s",
				i+1, iv, r.P50MS[iv], r.P99MS[iv], r.Samples[iv], r.LoadAvg)
		}
	}
	b.ReportMetric(0, "ns/op")
	for _, iv := range runs[0].Intervals {
		b.ReportMetric(benchMedian(benchMap(runs, func(r benchLatencyResult) float64 { return r.P50MS[iv] })), "p50-ms-"+iv)
		b.ReportMetric(benchMedian(benchMap(runs, func(r benchLatencyResult) float64 { return r.P99MS[iv] })), "p99-ms-"+iv)
	}
}

func TestBenchScenarioSinkLatency(t *testing.T) {
	resultPath := benchScenario(t, "BenchmarkSinkLatency")
	intervals := []string{"200ms", "1s"}
	res := benchLatencyResult{Intervals: intervals, P50MS: map[string]float64{}, P99MS: map[string]float64{}, Samples: map[string]int{}, LoadAvg: benchLoadAvg()}
	topics := map[string]int32{}
	for _, iv := range intervals {
		topics["in-"+iv] = 2
		topics["out-"+iv] = 2
	}
	c := startCluster(t, clusterOpts{noFailpoints: true, coordinators: 3, workers: 2, topics: topics})
	for _, iv := range intervals {
		spec := wordcountSpec(c.brokers(), "in-"+iv)
		spec.Name = "latency-" + iv
		spec.Operator.Name = "count"
		spec.Checkpoint.Interval = iv
		spec.Sink = &sinkSpec{Brokers: c.brokers(), Topic: "out-" + iv}
		job := c.submitJob(t, spec)
		c.waitJob(t, time.Minute, job, "job running with a completed checkpoint", func(j jobView) error {
			if j.Status != "running" || j.lastCheckpointID() == 0 {
				return fmt.Errorf("%s, last checkpoint %d", j.Status, j.lastCheckpointID())
			}
			return nil
		})
		lat := benchMeasureLatency(t, c.brokers(), "in-"+iv, "out-"+iv)
		res.Samples[iv] = len(lat)
		res.P50MS[iv] = benchPercentile(lat, 50)
		res.P99MS[iv] = benchPercentile(lat, 99)
		t.Logf("interval %s: p50 %.0f ms, p99 %.0f ms over %d records", iv, res.P50MS[iv], res.P99MS[iv], len(lat))
		if err := c.call("DELETE", c.api(t), "/v1/jobs/"+job, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	benchWriteResult(t, resultPath, res)
}

// benchMeasureLatency produces benchLatencyRate records a second with keys
// of their own to in for benchLatencyDuration, reads out read_committed,
// and returns each record's produce-to-visible time in milliseconds (those
// produced after the warm-up). Every record must show up, once.
func benchMeasureLatency(t *testing.T, brokers []string, in, out string) []float64 {
	t.Helper()
	cfg := saramaConfig()
	cfg.Consumer.IsolationLevel = sarama.ReadCommitted
	cfg.Consumer.MaxWaitTime = 10 * time.Millisecond
	cons, err := sarama.NewConsumer(brokers, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	parts, err := cons.Partitions(out)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]time.Time{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for _, p := range parts {
		pc, err := cons.ConsumePartition(out, p, sarama.OffsetNewest)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			defer pc.Close()
			for {
				select {
				case m := <-pc.Messages():
					now := time.Now()
					mu.Lock()
					if _, dup := seen[string(m.Key)]; dup {
						seen["dup:"+string(m.Key)] = now
					} else {
						seen[string(m.Key)] = now
					}
					mu.Unlock()
				case <-ctx.Done():
					return
				}
			}
		})
	}

	p, err := idempotentProducer(brokers, sarama.NewHashPartitioner)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	sent := map[string]time.Time{}
	start := time.Now()
	n := int(benchLatencyRate * benchLatencyDuration / time.Second)
	for i := range n {
		next := start.Add(time.Duration(i) * time.Second / benchLatencyRate)
		time.Sleep(time.Until(next))
		key := "k" + strconv.Itoa(i)
		at := time.Now()
		if _, _, err := p.SendMessage(&sarama.ProducerMessage{Topic: in, Key: sarama.StringEncoder(key), Value: sarama.StringEncoder("1")}); err != nil {
			t.Fatal(err)
		}
		if at.Sub(start) >= benchLatencyWarmup {
			sent[key] = at
		}
	}
	deadline := time.Now().Add(time.Minute)
	for {
		mu.Lock()
		missing := 0
		for k := range sent {
			if _, ok := seen[k]; !ok {
				missing++
			}
		}
		mu.Unlock()
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d records' outputs not read_committed within a minute", missing, len(sent))
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	var lat []float64
	for k, at := range sent {
		if _, dup := seen["dup:"+k]; dup {
			t.Fatalf("output of %s read twice", k)
		}
		lat = append(lat, float64(seen[k].Sub(at))/float64(time.Millisecond))
	}
	return lat
}

// benchPercentile returns the p-th percentile of vs (nearest rank).
func benchPercentile(vs []float64, p float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vs))
	i := int(float64(len(s))*p/100+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}
