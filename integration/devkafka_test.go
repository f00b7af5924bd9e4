package integration

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestDevkafkaRestartKeepsData: records and a consumer group's committed
// offsets survive a SIGKILL of devkafka and a restart on the same data dir,
// and again a clean stop (SIGTERM) and restart. Sarama and kcat (librdkafka)
// both produce and consume.
func TestDevkafkaRestartKeepsData(t *testing.T) {
	c := startCluster(t, clusterOpts{topics: map[string]int32{"events": 3, "kcat": 1}})
	const perPartition = 100
	var recs []record
	want := map[int32][]string{}
	for p := range int32(3) {
		for i := range perPartition {
			v := fmt.Sprintf("event-%d-%03d", p, i)
			recs = append(recs, record{key: fmt.Sprint(i), value: v, partition: p})
			want[p] = append(want[p], v)
		}
	}
	produce(t, c.brokers(), "events", recs)

	read := consumeGroup(t, c.brokers(), "it-group", "events", len(recs))
	if len(read) != len(recs) {
		t.Fatalf("consumer group read %d records, want %d", len(read), len(recs))
	}
	wantCommitted := map[int32]int64{0: perPartition, 1: perPartition, 2: perPartition}
	if got := committedOffsets(t, c.brokers(), "it-group", "events"); !maps.Equal(got, wantCommitted) {
		t.Fatalf("committed offsets before the kill: %v, want %v", got, wantCommitted)
	}

	checkKept := func(when string) {
		t.Helper()
		if got := readTopic(t, c.brokers(), "events"); !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("%s: records differ:\n got %s\nwant %s", when, summarize(got), summarize(want))
		}
		if got := committedOffsets(t, c.brokers(), "it-group", "events"); !maps.Equal(got, wantCommitted) {
			t.Fatalf("%s: committed offsets %v, want %v", when, got, wantCommitted)
		}
	}

	c.killBroker(t)
	c.restartBroker(t)
	checkKept("after SIGKILL and restart")

	// Producing after the restart continues each partition's offsets.
	produce(t, c.brokers(), "events", []record{{value: "after-restart", partition: 1}})
	want[1] = append(want[1], "after-restart")
	if end := topicEndOffsets(t, c.brokers(), "events"); end[1] != perPartition+1 {
		t.Fatalf("end offset of events/1 after one more record: %d, want %d", end[1], perPartition+1)
	}

	t.Run("kcat", func(t *testing.T) {
		kcat, err := exec.LookPath("kcat")
		if err != nil {
			t.Skip("kcat is not installed (apt-get install kcat): the librdkafka client check needs it")
		}
		broker := c.brokers()[0]
		run := func(stdin string, args ...string) string {
			t.Helper()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, kcat, append([]string{"-b", broker}, args...)...)
			cmd.Stdin = strings.NewReader(stdin)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("kcat %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			return string(out)
		}
		run("one\ntwo\nthree\n", "-P", "-t", "kcat", "-p", "0")
		got := run("", "-C", "-t", "kcat", "-p", "0", "-o", "beginning", "-e", "-q", "-f", "%o:%s\n")
		if got != "0:one\n1:two\n2:three\n" {
			t.Errorf("kcat read back %q, want offsets 0-2 with one, two, three", got)
		}
		// kcat reads what sarama wrote before the kill.
		got = run("", "-C", "-t", "events", "-p", "2", "-o", "beginning", "-e", "-q", "-f", "%s\n")
		if got != strings.Join(want[2], "\n")+"\n" {
			t.Errorf("kcat read events/2 as %q, want the %d records sarama produced", truncate(got, 200), len(want[2]))
		}
	})

	c.stopBroker(t)
	c.restartBroker(t)
	checkKept("after SIGTERM and restart")
}

// TestDevkafkaBadFlags: a malformed flag is a clear error and exit status 2.
func TestDevkafkaBadFlags(t *testing.T) {
	bin := binary(t, "devkafka")
	for _, args := range [][]string{
		{"-topic", "words:x"},
		{"-topic", "words"},
		{"-topic", "words:0"},
		{"-topic", "bad name:2"},
		{"-topic", "words:4", "-topic", "words:2"},
		{"-addr", "0.0.0.0:9092"},
		{"-addr", "nonsense"},
		{"stray-argument"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		cancel()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("devkafka %s: %v, want exit status 2; output:\n%s", strings.Join(args, " "), err, out)
			continue
		}
		if bad := args[len(args)-1]; !strings.Contains(string(out), bad) {
			t.Errorf("devkafka %s: the error does not name %q:\n%s", strings.Join(args, " "), bad, out)
		}
	}
}

// summarize shows the record count and the first and last value of each
// partition: enough to see which records a failure is about.
func summarize(m map[int32][]string) string {
	var b strings.Builder
	for _, p := range slices.Sorted(maps.Keys(m)) {
		vs := m[p]
		fmt.Fprintf(&b, "[p%d: %d records", p, len(vs))
		if len(vs) > 0 {
			fmt.Fprintf(&b, " %q..%q", vs[0], vs[len(vs)-1])
		}
		b.WriteString("] ")
	}
	return b.String()
}
