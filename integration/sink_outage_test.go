package integration

// The sink's broker goes down under a running job (issue 7, item 6): the
// map tasks hold their outputs and decline checkpoints naming the sink's
// brokers, the job keeps its attempt and its state, and it resumes by itself
// once the broker is back.

import (
	"cmp"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startSinkBroker starts a devkafka of its own for a job's sink, with
// topics, on a port and data dir of its own.
func (c *cluster) startSinkBroker(t *testing.T, topics map[string]int32) *brokerProc {
	t.Helper()
	b := &brokerProc{dataDir: filepath.Join(c.dir, "devkafka-sink-data"), topics: topics}
	pick := func() { b.addr = c.addrs(t, "devkafka", 1)[0] }
	pick()
	b.p = c.launch(t, "devkafka", "devkafka-sink.log", pick, b.argv, brokerReady)
	return b
}

// restartSinkBroker starts b again on its address and data dir.
func (c *cluster) restartSinkBroker(t *testing.T, b *brokerProc) {
	t.Helper()
	b.p = c.launch(t, "devkafka", "devkafka-sink.log", nil, b.argv, brokerReady)
}

// TestSinkOutageDeclinesThenResumes runs a wordcount job with an
// exactly-once sink whose broker is a devkafka of its own. Once every
// output so far is committed, that devkafka is SIGKILLed and more input
// arrives: the map tasks hold their outputs and every checkpoint is aborted,
// declined with a reason that names the sink (its brokers, or the write
// that failed), while the job keeps its attempt. devkafka starts again on
// the same port and data dir: checkpoints complete again by themselves, the
// final state is exact, and kcat in read_committed mode sees every word's
// counts 1, 2, ..., n exactly once.
//
// The outage begins between checkpoints with no transaction open at the
// broker: devkafka (kfake), unlike Kafka, aborts at its restart every
// transaction that was open when it was killed, so a checkpoint's
// pre-committed transaction would be lost with it, which Kafka's durable
// transaction log does not do.
func TestSinkOutageDeclinesThenResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("kills real processes; skipped with -short")
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
	sink := c.startSinkBroker(t, map[string]int32{"counts": 4})
	sinkBrokers := []string{sink.addr}
	in := newWordInput(71, 8_000, 4)
	before, during, after := in.recs[:4_000], in.recs[4_000:5_000], in.recs[5_000:]

	produce(t, c.brokers(), "words", before)
	spec := failoverSpec(c.brokers(), "300ms")
	spec.Sink = &sinkSpec{Brokers: sinkBrokers, Topic: "counts"}
	// The outage must not exhaust it: the test is about one attempt
	// riding it out (with the default 3, the job would restart from its
	// last completed checkpoint).
	spec.Checkpoint.TolerableFailures = 1000
	job := c.submitJob(t, spec)
	start := c.waitCheckpointed(t, job)
	sameAttempt := func(j jobView) error { return inAttempt(t, start, j, "the sink outage") }

	// Quiet: every output of the input so far committed.
	soFar := countWords(before)
	c.waitFor(t, 2*time.Minute, "the outputs of the first records committed", func() (bool, error) {
		got := kcatCounts(t, sinkBrokers, "counts", true)
		for w, n := range soFar {
			if seq := got[w]; len(seq) == 0 || seq[len(seq)-1] != n {
				return false, fmt.Errorf("%q: last output %v, want %d", w, seq[max(0, len(seq)-1):], n)
			}
		}
		return true, nil
	})

	if err := sink.p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	produce(t, c.brokers(), "words", during)
	var declined []checkpointView
	var namesBrokers bool
	c.waitFor(t, 2*time.Minute, "three checkpoints declined for the sink, one naming its brokers", func() (bool, error) {
		cps, err := c.checkpointsSince(t, job, start, killedAt, "the sink outage")
		if err != nil {
			return false, err
		}
		declined, namesBrokers = declined[:0], false
		var completed []uint64
		for _, cp := range cps {
			if cp.Status == "completed" {
				completed = append(completed, cp.ID)
			}
			if cp.Status != "aborted" {
				continue
			}
			if !strings.Contains(cp.Reason, "sink: ") || !strings.Contains(cp.Reason, "outputs are held and checkpoints declined") {
				t.Fatalf("checkpoint %d aborted with reason %q, want a sink decline", cp.ID, cp.Reason)
			}
			declined = append(declined, cp)
			namesBrokers = namesBrokers || strings.Contains(cp.Reason, fmt.Sprintf("sink brokers %v unreachable", sinkBrokers))
		}
		// Before the new input reaches them the map tasks have nothing to
		// write, and checkpoints complete; once one is declined, they hold
		// outputs until the broker is back.
		if len(declined) > 0 {
			first := slices.MinFunc(declined, func(a, b checkpointView) int { return cmp.Compare(a.ID, b.ID) }).ID
			if i := slices.IndexFunc(completed, func(id uint64) bool { return id > first }); i >= 0 {
				t.Fatalf("checkpoint %d completed after checkpoint %d was declined for the sink, while its broker is down", completed[i], first)
			}
		}
		return len(declined) >= 3 && namesBrokers, fmt.Errorf("%d checkpoints declined for the sink since the kill (one naming its brokers: %v)", len(declined), namesBrokers)
	})
	last := slices.MaxFunc(declined, func(a, b checkpointView) int { return cmp.Compare(a.ID, b.ID) })
	t.Logf("checkpoint %d was declined: %s", last.ID, last.Reason)

	c.restartSinkBroker(t, sink)
	c.waitJob(t, time.Minute, job, "a checkpoint completed after the sink's broker is back, in the same attempt", func(j jobView) error {
		if err := sameAttempt(j); err != nil {
			return err
		}
		if j.lastCheckpointID() <= last.ID {
			return errors.New("no checkpoint completed since the outage")
		}
		return nil
	})
	produce(t, c.brokers(), "words", after)
	c.checkExact(t, job, in.want)
	var got map[string][]int64
	c.waitFor(t, 2*time.Minute, "the output to reach every word's count", func() (bool, error) {
		got = kcatCounts(t, sinkBrokers, "counts", true)
		for w, n := range in.want {
			if seq := got[w]; len(seq) == 0 || seq[len(seq)-1] != n {
				return false, fmt.Errorf("%q: last output %v, want %d", w, seq[max(0, len(seq)-1):], n)
			}
		}
		return true, nil
	})
	if problems := exactlyOnceProblems(got, in.want); len(problems) > 0 {
		t.Fatalf("read_committed output of %d words is not exactly once (%d problems):\n%s", len(in.want), len(problems), strings.Join(problems[:min(20, len(problems))], "\n"))
	}
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if err := sameAttempt(j); err != nil {
		t.Fatal(err)
	}
}
