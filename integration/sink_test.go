package integration

// The exactly-once sink (issue 7), seen as a downstream consumer sees it:
// the output topic read with kcat (librdkafka, a client nobody here wrote)
// in read_committed mode while processes are killed at the worst moments.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// sinkJobSpec is the failover wordcount job writing every word's new count
// to topic with delivery (exactly_once, at_least_once).
func sinkJobSpec(brokers []string, interval, topic, delivery string) jobSpec {
	spec := failoverSpec(brokers, interval)
	spec.Sink = &sinkSpec{Brokers: brokers, Topic: topic, Delivery: delivery}
	return spec
}

// kcatCounts reads all of topic with kcat, read_committed or not, and
// returns every word's counts in the order the topic holds them (a word's
// outputs go to one partition, in order).
func kcatCounts(t *testing.T, brokers []string, topic string, readCommitted bool) map[string][]int64 {
	t.Helper()
	counts := map[string][]int64{}
	for _, line := range kcatRecords(t, brokers, topic, readCommitted) {
		word, value, ok := strings.Cut(line, "\t")
		n, err := strconv.ParseInt(value, 10, 64)
		if !ok || err != nil {
			t.Fatalf("output record %q: want word<TAB>count", line)
		}
		counts[word] = append(counts[word], n)
	}
	return counts
}

// kcatRecords reads all of topic with kcat, read_committed or not, and
// returns its records as key<TAB>value, partition by partition.
func kcatRecords(t *testing.T, brokers []string, topic string, readCommitted bool) []string {
	t.Helper()
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		t.Fatal("kcat is not installed (apt-get install kcat; .ci/run installs it): the sink tests read the output with it")
	}
	args := []string{"-b", strings.Join(brokers, ","), "-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%k\\t%s\\n"}
	// librdkafka's default is read_committed: say which, always.
	if readCommitted {
		args = append(args, "-X", "isolation.level=read_committed")
	} else {
		args = append(args, "-X", "isolation.level=read_uncommitted")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, kcat, args...).Output()
	if err != nil {
		t.Fatalf("kcat %s: %v", strings.Join(args, " "), err)
	}
	var lines []string
	for _, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
		if line != "" {
			lines = append(lines, line)
		}
	}
	return lines
}

// exactlyOnceProblems compares the counts a read_committed consumer saw with
// the input: every word must have shown 1, 2, ..., its count, each once, in
// order; no repeat, no step back, no gap.
func exactlyOnceProblems(got map[string][]int64, want map[string]int64) []string {
	var problems []string
	for _, w := range slices.Sorted(maps.Keys(want)) {
		seq := got[w]
		for i, n := range seq {
			if n != int64(i+1) {
				problems = append(problems, fmt.Sprintf("%q: output %d is %d after %v, want %d", w, i, n, seq[max(0, i-3):i], i+1))
				break
			}
		}
		if int64(len(seq)) != want[w] && len(problems) < 20 {
			problems = append(problems, fmt.Sprintf("%q: %d outputs, want %d (the word's count)", w, len(seq), want[w]))
		}
	}
	for w := range got {
		if _, ok := want[w]; !ok {
			problems = append(problems, fmt.Sprintf("%q is in the output but not in the input", w))
		}
	}
	return problems
}

// waitOutput waits until every word's last output in topic (read_committed
// or not) is its count in want, and returns what it read.
func (c *cluster) waitOutput(t *testing.T, topic string, readCommitted bool, want map[string]int64) map[string][]int64 {
	t.Helper()
	var got map[string][]int64
	c.waitFor(t, 2*time.Minute, "the output to reach every word's count", func() (bool, error) {
		got = kcatCounts(t, c.brokers(), topic, readCommitted)
		for w, n := range want {
			seq := got[w]
			if len(seq) == 0 || seq[len(seq)-1] != n {
				return false, fmt.Errorf("%q: last output %v, want %d", w, seq[max(0, len(seq)-1):], n)
			}
		}
		return true, nil
	})
	return got
}

// TestExactlyOnceSinkThroughCrashes runs a wordcount job with an
// exactly-once sink while, in turn: a worker crashes between pre-commit and
// commit (a failpoint); the leader crashes after a checkpoint completed and
// before it told the tasks (a failpoint); a worker is SIGKILLed; and a
// worker is frozen (SIGSTOP) past its lease, so that its tasks are
// restarted elsewhere while it is a zombie, and then let go. kcat in
// read_committed mode then sees every word's counts 1, 2, ..., n exactly
// once.
func TestExactlyOnceSinkThroughCrashes(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, topics: map[string]int32{"words": 4, "counts": 4}})
	in := newWordInput(7, 40_000, 4)
	produce(t, c.brokers(), "words", in.recs[:10_000])
	job := c.submitJob(t, sinkJobSpec(c.brokers(), "200ms", "counts", ""))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[10_000:], 1_500)
	before := c.waitCheckpointed(t, job)

	// 1. A worker dies after its map task pre-committed a checkpoint's
	// transaction and learnt that the checkpoint completed, before it
	// committed it: the restored task commits it.
	victim := c.crashAt(t, "worker-before-sink-commit", time.Minute)
	c.startWorker(t, "w4")
	restarted := c.waitJob(t, time.Minute, job, "the job restarted after "+victim+" crashed", func(j jobView) error {
		return j.recoveredSince(before)
	})

	// 2. The leader dies after it committed a checkpoint and before it
	// told the tasks: the next barrier tells them, and no task restarts.
	leader := c.crashAt(t, "leader-before-complete-notice", time.Minute)
	c.restartCoordinator(t, leader)
	c.leader(t)
	afterLeader := c.waitJob(t, time.Minute, job, "checkpoints completing under the new leader", func(j jobView) error {
		if j.lastCheckpointID() < restarted.lastCheckpointID()+5 {
			return fmt.Errorf("last checkpoint %d", j.lastCheckpointID())
		}
		return nil
	})
	if afterLeader.Attempt != restarted.Attempt {
		t.Errorf("the leader's crash restarted the job: attempt %d, was %d (%s)", afterLeader.Attempt, restarted.Attempt, afterLeader.Reason)
	}

	// 3. SIGKILL of a worker that runs tasks of the job.
	killed := afterLeader.Tasks[0].Worker
	c.killWorker(t, killed)
	c.startWorker(t, "w5")
	afterKill := c.waitJob(t, time.Minute, job, "the job restarted after "+killed+" was killed", func(j jobView) error {
		return j.recoveredSince(afterLeader)
	})

	// 4. A worker frozen past its lease becomes a zombie: its tasks run
	// again elsewhere, and when it wakes up Kafka fences its producers.
	frozen := afterKill.Tasks[len(afterKill.Tasks)-1].Worker
	c.pauseWorker(t, frozen)
	c.waitJob(t, time.Minute, job, "the job restarted without frozen "+frozen, func(j jobView) error {
		if j.Attempt <= afterKill.Attempt || j.Status != "running" || slices.Contains(workersOf(j), frozen) {
			return fmt.Errorf("attempt %d %s on %v", j.Attempt, j.Status, workersOf(j))
		}
		return nil
	})
	c.resumeWorker(t, frozen)

	producerDone()
	c.checkExact(t, job, in.want)
	got := c.waitOutput(t, "counts", true, in.want)
	if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
		t.Fatalf("read_committed output of %d words is not exactly once (%d problems):\n%s", len(in.want), len(problems), strings.Join(problems[:min(20, len(problems))], "\n"))
	}
	var outputs int
	for _, seq := range got {
		outputs += len(seq)
	}
	t.Logf("kcat read_committed: %d words, %d outputs, each count once and in order", len(got), outputs)

	// The restores did commit transactions their checkpoints promised.
	var recovered, fenced float64
	for _, w := range c.workers {
		if w.p.hasExited() {
			continue
		}
		text, err := c.workerMetrics(w)
		if err != nil {
			t.Fatal(err)
		}
		n, _ := metricSum(linesWith(text, `outcome="recovered"`), "coordflow_sink_transactions_total")
		recovered += n
		n, _ = metricSum(text, "coordflow_sink_fenced_total")
		fenced += n
	}
	if recovered == 0 {
		t.Errorf("no restored task committed a transaction its checkpoint listed (coordflow_sink_transactions_total{outcome=\"recovered\"} is 0)")
	}
	t.Logf("restored tasks committed %v transactions their checkpoints listed; %v producers were fenced", recovered, fenced)
}

// linesWith keeps the lines of text that contain s.
func linesWith(text, s string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// TestAtLeastOnceSinkRepeatsAfterKill is the same job with delivery
// at_least_once and one SIGKILL of a worker: the output shows counts again
// that it showed before the kill. It tells the two deliveries apart, so the
// exactly-once test above cannot pass by accident.
func TestAtLeastOnceSinkRepeatsAfterKill(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 1, workers: 2, topics: map[string]int32{"words": 4, "counts": 4}})
	in := newWordInput(8, 30_000, 4)
	produce(t, c.brokers(), "words", in.recs[:5_000])
	// Checkpoints every 2 s: a kill finds a second or so of output that no
	// completed checkpoint covers.
	job := c.submitJob(t, sinkJobSpec(c.brokers(), "2s", "counts", "at_least_once"))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[5_000:], 2_000)
	before := c.waitCheckpointed(t, job)
	c.waitJob(t, time.Minute, job, "a moment after a checkpoint completed", func(j jobView) error {
		if j.lastCheckpointID() <= before.lastCheckpointID()+1 {
			return fmt.Errorf("last checkpoint %d", j.lastCheckpointID())
		}
		return nil
	})
	time.Sleep(time.Second) // let output run ahead of the checkpoint; timing makes the repeats, not the result
	victim := before.Tasks[0].Worker
	c.killWorker(t, victim)
	c.startWorker(t, "w3")
	producerDone()
	c.checkExact(t, job, in.want)
	got := c.waitOutput(t, "counts", false, in.want)
	var repeated []string
	for w, seq := range got {
		for i := 1; i < len(seq); i++ {
			if seq[i] <= seq[i-1] {
				repeated = append(repeated, fmt.Sprintf("%q: %d after %d", w, seq[i], seq[i-1]))
				break
			}
		}
	}
	if len(repeated) == 0 {
		t.Fatalf("at_least_once output shows no repeat after killing %s: the test cannot tell the deliveries apart", victim)
	}
	t.Logf("at_least_once: %d of %d words show counts again after the kill, such as %s", len(repeated), len(got), repeated[0])
}

// TestExactlyOnceSinkTransactionTimeoutEndsOpenTransactions: a worker that
// held an open transaction is killed and its job cannot run again (no other
// worker): the broker aborts the transaction at its timeout, and a
// read_committed consumer's lag is back at zero within it.
func TestExactlyOnceSinkTransactionTimeoutEndsOpenTransactions(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 1, workers: 1, topics: map[string]int32{"words": 2, "counts": 2}})
	in := newWordInput(9, 50_000, 2)
	produce(t, c.brokers(), "words", in.recs[:5_000])
	spec := sinkJobSpec(c.brokers(), "200ms", "counts", "")
	spec.Checkpoint.Timeout = "2s"
	spec.Sink.TransactionTimeout = "5s"
	job := c.submitJob(t, spec)
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[5_000:], 5_000)
	c.waitCheckpointed(t, job)
	var open map[int32]int64
	c.waitFor(t, 30*time.Second, "an open transaction on the output", func() (bool, error) {
		open = openOutput(t, c.brokers(), "counts")
		return len(open) > 0, fmt.Errorf("read_committed end offsets equal the high watermarks")
	})
	// What an operator sees first: `coordd job transactions` lists the
	// sink's open transactions from the broker, as JSON and as a table.
	// Each lives one checkpoint interval: wait for the CLI to catch one.
	var txns []struct {
		TransactionalID string `json:"transactional_id"`
		State           string `json:"state"`
	}
	c.waitFor(t, 20*time.Second, "coordd job transactions to list an open transaction", func() (bool, error) {
		out := c.cli(t, c.api(t), "job", "transactions", "-format", "json", job)
		if err := json.Unmarshal([]byte(out), &txns); err != nil {
			return false, fmt.Errorf("coordd job transactions -format json printed %q: %w", out, err)
		}
		return len(txns) > 0, fmt.Errorf("no open transaction listed: %s", out)
	})
	for _, tx := range txns {
		if !strings.Contains(tx.TransactionalID, "-map-") || tx.State == "" {
			t.Errorf("transaction %+v: want a map task's transactional id and its state", tx)
		}
	}
	if table := c.cli(t, c.api(t), "job", "transactions", job); !strings.Contains(table, "TRANSACTIONAL ID") && !strings.Contains(table, "has no open transactions") {
		t.Errorf("coordd job transactions printed %q, want a table", table)
	}
	c.killWorker(t, "w1")
	killedAt := time.Now()
	defer producerDone()
	// Nobody aborts the killed worker's transactions but the broker.
	c.waitFor(t, 5*time.Second+15*time.Second, "the broker to end the open transactions", func() (bool, error) {
		open = openOutput(t, c.brokers(), "counts")
		return len(open) == 0, fmt.Errorf("records behind the last stable offset: %v", open)
	})
	took := time.Since(killedAt)
	t.Logf("read_committed lag back at zero %v after the kill (transaction timeout 5s)", took.Round(100*time.Millisecond))
	if took > 5*time.Second+5*time.Second {
		t.Errorf("open transactions lasted %v after the kill, want about the 5s transaction timeout", took)
	}
}

// openOutput returns, per partition of topic, how many records lie beyond
// the last stable offset: records of transactions still open, which hold
// back every read_committed consumer.
func openOutput(t *testing.T, brokers []string, topic string) map[int32]int64 {
	t.Helper()
	client, err := sarama.NewClient(brokers, saramaConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	parts, err := client.Partitions(topic)
	if err != nil {
		t.Fatal(err)
	}
	open := map[int32]int64{}
	for _, p := range parts {
		leader, err := client.Leader(topic, p)
		if err != nil {
			t.Fatal(err)
		}
		ends := map[sarama.IsolationLevel]int64{}
		for _, level := range []sarama.IsolationLevel{sarama.ReadUncommitted, sarama.ReadCommitted} {
			req := &sarama.OffsetRequest{Version: 2, IsolationLevel: level}
			req.AddBlock(topic, p, sarama.OffsetNewest, 1)
			resp, err := leader.GetAvailableOffsets(req)
			if err != nil {
				t.Fatal(err)
			}
			b := resp.GetBlock(topic, p)
			if b == nil || b.Err != sarama.ErrNoError {
				t.Fatalf("list offsets of %s/%d: %v", topic, p, b)
			}
			ends[level] = b.Offset
		}
		if d := ends[sarama.ReadUncommitted] - ends[sarama.ReadCommitted]; d > 0 {
			open[p] = d
		}
	}
	return open
}

// TestSavepointCommitsNoSinkOutput: a savepoint that does not stop the job
// commits none of its sink transactions. The job (no periodic checkpoint
// within the test: a 14 minute interval) has written every count in an open
// transaction when a savepoint is taken; a worker of its map tasks is then
// SIGKILLed, and the job, with no completed checkpoint to restore, starts
// over from the earliest offsets and writes every count again. Had the
// savepoint committed its transactions, read_committed would see those
// counts twice; the stop-with-savepoint at the end, once the new attempt
// has read everything, commits the new ones, and kcat sees each count once.
func TestSavepointCommitsNoSinkOutput(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4, "counts": 4}})
	in := newWordInput(11, 3_000, 4)
	produce(t, c.brokers(), "words", in.recs)
	// No periodic checkpoint in the test's seconds (the first comes at a
	// random point of the first interval), within the 15 minutes Kafka
	// gives a transaction.
	spec := sinkJobSpec(c.brokers(), "14m", "counts", "")
	spec.Checkpoint.Timeout = "5s"
	job := c.submitJob(t, spec)
	c.waitOutput(t, "counts", false, in.want) // written, in open transactions

	out := c.cli(t, c.api(t), "job", "savepoint", job)
	t.Logf("savepoint: %s", strings.TrimSpace(out))
	before, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if before.LastCheckpoint != nil {
		t.Skipf("a periodic checkpoint (%d) completed before the savepoint: the recovery would restore it", before.LastCheckpoint.ID)
	}
	var victim string
	for _, task := range before.Tasks {
		if task.Kind == "map" {
			victim = task.Worker
			break
		}
	}
	c.killWorker(t, victim)
	c.startWorker(t, "w3")
	c.waitJob(t, time.Minute, job, "the job running again after "+victim+" was killed", func(j jobView) error {
		if j.Attempt <= before.Attempt || j.Status != "running" || slices.Contains(workersOf(j), victim) {
			return fmt.Errorf("attempt %d %s on %v", j.Attempt, j.Status, workersOf(j))
		}
		return nil
	})
	// A word of its own at the end of every partition: once the new
	// attempt has written each, it has written everything before it.
	var markers []record
	for p := range int32(4) {
		w := fmt.Sprintf("zzend%d", p)
		markers = append(markers, record{key: w, value: w, partition: p})
		in.want[w] = 1
	}
	produce(t, c.brokers(), "words", markers)
	c.waitFor(t, 2*time.Minute, "the new attempt to write every partition's last word", func() (bool, error) {
		got := kcatCounts(t, c.brokers(), "counts", false)
		for _, m := range markers {
			if len(got[m.value]) == 0 {
				return false, fmt.Errorf("no output of %s yet", m.value)
			}
		}
		return true, nil
	})
	c.stopWithSavepoint(t, c.api(t), job)
	got := c.waitOutput(t, "counts", true, in.want)
	if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
		t.Fatalf("read_committed output is not exactly once after a savepoint and a restart (%d problems):\n%s", len(problems), strings.Join(problems[:min(20, len(problems))], "\n"))
	}
}
