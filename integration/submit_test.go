package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSubmissionSentAgainAfterTheLeaderDied: the leader dies (SIGKILL) after
// it registered a job and before it answered. `coordd job run`, talking to a
// follower, gets no answer it can trust (the follower's forward fails), sends
// the submission again with the same idempotency key once a new leader is
// elected, and is answered with the job the dead leader registered: one
// job, not two.
func TestSubmissionSentAgainAfterTheLeaderDied(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, topics: map[string]int32{"words": 1}})
	leaderID := c.leader(t)
	var leader *coordProc
	for _, cp := range c.coords {
		if cp.id == leaderID {
			leader = cp
		}
	}
	follower := c.followerOf(t, leader)
	spec, err := json.Marshal(jobSpec{
		Name:       "resent",
		Source:     sourceSpec{Brokers: c.brokers(), Topic: "words", Start: "earliest", Parallelism: 1},
		Operator:   operatorSpec{Name: "wordcount", Parallelism: 1},
		Checkpoint: checkpointSpec{Interval: "1s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "resent.json")
	if err := os.WriteFile(file, spec, 0o644); err != nil {
		t.Fatal(err)
	}

	c.armFailpoint(t, "leader-after-register-job")
	code, stdout, stderr := c.cliResult(t, follower.httpAddr, "job", "run", file)
	if crashed := c.crashedAt(t, "leader-after-register-job", time.Minute); crashed != leaderID {
		t.Fatalf("coordd %s crashed at the failpoint, want the leader %s", crashed, leaderID)
	}
	id := strings.TrimSpace(stdout)
	if code != 0 || id == "" || !strings.Contains(stderr, "sending it again") {
		t.Fatalf("coordd job run through %s: exit %d, stdout %q, stderr:\n%s\nwant the job's id after a resend", follower.id, code, stdout, stderr)
	}
	t.Logf("coordd job run: %s after:\n%s", id, stderr)

	var jobs []jobView
	if err := c.call("GET", follower.httpAddr, "/v1/jobs", nil, &jobs); err != nil {
		t.Fatal(err)
	}
	var named []string
	for _, j := range jobs {
		if j.Name == "resent" {
			named = append(named, j.ID)
		}
	}
	if len(named) != 1 || named[0] != id {
		t.Fatalf("jobs named resent: %q, want the one job coordd job run printed, %s", named, id)
	}
}
