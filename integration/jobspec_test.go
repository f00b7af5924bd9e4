package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport"
)

// TestBadJobSpecs: bad specs are refused with a 400 that names the field; a
// job on a missing topic says so and crashes nothing; a sum job skips the
// values that are not integers and counts them in a metric. The sum job goes
// through the CLI (`coordd job run`), which the test checks on the way, with
// `coordd job status`, `job checkpoints`, `job state` and `members`.
func TestBadJobSpecs(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 1, topics: map[string]int32{"numbers": 2}})
	leader := c.leader(t)
	var follower *coordProc
	for _, cp := range c.coords {
		if cp.id != leader {
			follower = cp
			break
		}
	}

	t.Run("refused with the field named", func(t *testing.T) {
		for i, tc := range []struct {
			name  string
			spec  func(*jobSpec)
			raw   string   // used instead of spec when set
			words []string // the error must name these
		}{
			{name: "unknown operator", spec: func(s *jobSpec) { s.Operator.Name = "no-such-operator" }, words: []string{"operator", "no-such-operator"}},
			{name: "operator parallelism 0", spec: func(s *jobSpec) { s.Operator.Parallelism = 0 }, words: []string{"operator", "parallelism"}},
			{name: "source parallelism 0", spec: func(s *jobSpec) { s.Source.Parallelism = 0 }, words: []string{"source", "parallelism"}},
			{name: "no topic", spec: func(s *jobSpec) { s.Source.Topic = "" }, words: []string{"topic"}},
			{name: "unknown field", raw: `{"name": "x", "source": {"brokers": ["127.0.0.1:1"], "topic": "numbers", "parallelism": 1}, "operator": {"name": "sum", "parallelism": 1}, "surprise": true}`, words: []string{"surprise"}},
			{name: "unknown nested field", raw: `{"name": "x", "source": {"brokers": ["127.0.0.1:1"], "topic": "numbers", "parallelism": 1, "partitions": 3}, "operator": {"name": "sum", "parallelism": 1}}`, words: []string{"partitions"}},
			{name: "bad duration", spec: func(s *jobSpec) { s.Checkpoint.Interval = "soon" }, words: []string{"interval"}},
		} {
			var body any
			if tc.raw != "" {
				body = []byte(tc.raw)
			} else {
				s := wordcountSpec(c.brokers(), "numbers")
				tc.spec(&s)
				body = s
			}
			// Alternate between the leader and a follower (which forwards).
			addr := c.coordinator(t, leader).httpAddr
			if i%2 == 1 {
				addr = follower.httpAddr
			}
			id, err := c.postJob(addr, body)
			var ae *apiError
			switch {
			case err == nil:
				t.Errorf("%s: accepted as job %s, want 400", tc.name, id)
			case !errors.As(err, &ae):
				t.Errorf("%s: %v, want a 400 answer", tc.name, err)
			case ae.status != http.StatusBadRequest:
				t.Errorf("%s: %v, want status 400", tc.name, err)
			default:
				t.Logf("%s: 400 %q", tc.name, ae.message)
				for _, w := range tc.words {
					if !strings.Contains(strings.ToLower(ae.message), w) {
						t.Errorf("%s: error %q does not name %q", tc.name, ae.message, w)
					}
				}
			}
		}
	})

	t.Run("missing topic", func(t *testing.T) {
		s := wordcountSpec(c.brokers(), "no-such-topic")
		s.Name = "ghost"
		s.Source.Parallelism, s.Operator.Parallelism = 1, 1
		id := c.submitJob(t, s)
		c.waitFor(t, time.Minute, "job "+id+" to give a reason naming the missing topic", func() (bool, error) {
			j, err := c.getJob(t, id)
			if err != nil {
				return false, err
			}
			return strings.Contains(j.Reason, "no-such-topic"), fmt.Errorf("status %s, reason %q", j.Status, j.Reason)
		})
		c.checkAlive(t)
		if err := c.call("DELETE", c.api(t), "/v1/jobs/"+id, nil, nil); err != nil {
			t.Fatalf("cancel job %s: %v", id, err)
		}
		c.waitFor(t, 30*time.Second, "job "+id+" to be cancelled", func() (bool, error) {
			j, err := c.getJob(t, id)
			if err != nil {
				return false, err
			}
			return j.Status == "cancelled", fmt.Errorf("status %s", j.Status)
		})
	})

	t.Run("sum skips values that are not integers, through the CLI", func(t *testing.T) {
		values := []string{"5", "-3", "abc", "", "1.5", "12x", "0", "--3", "40", "+7", "x1", "1e3"}
		var recs []record
		want := map[string]int64{}
		var skipped int
		for i := range 600 {
			key := fmt.Sprintf("k%d", i%7)
			v := values[i%len(values)]
			recs = append(recs, record{key: key, value: v, partition: anyPartition})
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				skipped++
				continue
			}
			want[key] += n
		}
		produce(t, c.brokers(), "numbers", recs)
		end := topicEndOffsets(t, c.brokers(), "numbers")
		if sumOffsets(end) != int64(len(recs)) {
			t.Fatalf("numbers holds %d records, want %d", sumOffsets(end), len(recs))
		}

		s := jobSpec{
			Name:       "sum-it",
			Source:     sourceSpec{Brokers: c.brokers(), Topic: "numbers", Start: "earliest", Parallelism: 2},
			Operator:   operatorSpec{Name: "sum", Parallelism: 1},
			Checkpoint: checkpointSpec{Interval: "300ms"},
		}
		b, err := json.MarshalIndent(s, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "sum.json")
		if err := os.WriteFile(file, b, 0o644); err != nil {
			t.Fatal(err)
		}
		// -wait returns once the first checkpoint completed.
		id := strings.TrimSpace(c.cli(t, follower.httpAddr, "job", "run", "-wait", "-idempotency-key", "sum-it-deploy-1", file))
		if id == "" || strings.ContainsAny(id, " \n") {
			t.Fatalf("coordd job run printed %q, want the job id alone", id)
		}
		var j0 jobView
		if err := c.call("GET", follower.httpAddr, "/v1/jobs/"+id, nil, &j0); err != nil {
			t.Fatalf("job %q printed by coordd job run: %v", id, err)
		}
		if j0.lastCheckpointID() == 0 {
			t.Fatalf("coordd job run -wait returned before job %s had a completed checkpoint: %+v", id, j0)
		}
		// The same submission sent again with its key (as after an unknown
		// outcome) is answered with the job, through the follower too, and
		// registers none.
		if again := strings.TrimSpace(c.cli(t, follower.httpAddr, "job", "run", "-idempotency-key", "sum-it-deploy-1", file)); again != id {
			t.Fatalf("coordd job run sent again with its key printed %q, want the job %s", again, id)
		}
		var all []jobView
		if err := c.call("GET", follower.httpAddr, "/v1/jobs", nil, &all); err != nil {
			t.Fatal(err)
		}
		named := 0
		for _, j := range all {
			if j.Name == "sum-it" {
				named++
			}
		}
		if named != 1 {
			t.Fatalf("%d jobs named sum-it after the submission was sent again, want 1", named)
		}

		final := c.waitCaughtUp(t, 2*time.Minute, id, "numbers", end)
		if diff := diffCounts(final.Keyed, want); diff != "" {
			t.Errorf("sum state differs from the sums of the integer values:\n%s", diff)
		}
		j, err := c.getJob(t, id)
		if err != nil {
			t.Fatal(err)
		}
		c.waitFor(t, 30*time.Second, "coordflow_records_skipped_total to count the unparsable values", func() (bool, error) {
			var total float64
			for _, w := range c.workers {
				text, err := c.workerMetrics(w)
				if err != nil {
					return false, err
				}
				n, _ := metricSum(text, "coordflow_records_skipped_total")
				total += n
			}
			// A restarted attempt reads some records again, and counts them again.
			if j.Attempt <= 1 {
				return total == float64(skipped), fmt.Errorf("coordflow_records_skipped_total is %v, want %d", total, skipped)
			}
			return total >= float64(skipped), fmt.Errorf("coordflow_records_skipped_total is %v, want at least %d (attempt %d)", total, skipped, j.Attempt)
		})

		out := c.cli(t, c.api(t), "job", "status", id)
		if !strings.Contains(out, id) && !strings.Contains(out, j.Status) {
			t.Errorf("coordd job status %s printed neither the id nor its status %q:\n%s", id, j.Status, out)
		}
		// The job goes on checkpointing and retains only its last few
		// completed checkpoints, so the one waited for above may be gone by
		// now: the listing must show it or a later completed one.
		if out := c.cli(t, c.api(t), "job", "checkpoints", id); newestCompleted(out) < final.CheckpointID {
			t.Errorf("coordd job checkpoints %s shows no completed checkpoint at or after %d:\n%s", id, final.CheckpointID, out)
		}
		if out := c.cli(t, c.api(t), "job", "state", id); !strings.Contains(out, "k3") {
			t.Errorf("coordd job state %s does not show key k3:\n%s", id, out)
		}
		if out := c.cli(t, c.api(t), "job", "list"); !strings.Contains(out, id) {
			t.Errorf("coordd job list does not show job %s:\n%s", id, out)
		}
	})

	t.Run("members lists both roles", func(t *testing.T) {
		out := c.cli(t, c.api(t), "members")
		for _, want := range []string{"coordinator", "worker", "c1", "c2", "c3", "w1"} {
			if !strings.Contains(out, want) {
				t.Errorf("coordd members does not show %q:\n%s", want, out)
			}
		}
		// Every member runs this build: its feature level is the fourth
		// column.
		for line := range strings.Lines(out) {
			f := strings.Fields(line)
			if len(f) < 4 || f[0] == "ID" {
				continue
			}
			if want := strconv.Itoa(transport.FeatureLevel); f[3] != want {
				t.Errorf("coordd members shows feature level %q for %s, want %s:\n%s", f[3], f[0], want, out)
			}
		}
	})

	c.checkAlive(t)
}

// newestCompleted returns the highest id of a completed checkpoint in the
// table coordd job checkpoints prints, or 0 if it lists none.
func newestCompleted(table string) uint64 {
	var newest uint64
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[2] != "completed" {
			continue
		}
		if id, err := strconv.ParseUint(f[0], 10, 64); err == nil && id > newest {
			newest = id
		}
	}
	return newest
}
