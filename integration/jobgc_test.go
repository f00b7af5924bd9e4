package integration

// Job garbage collection: a cancelled job is purged after coordd's
// -job-gc-threshold, with its checkpoint files and metric series, while its
// savepoint stays and restores (docs/operations.md, "Job garbage
// collection").

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCancelledJobPurged: a wordcount job with its state in file storage is
// stopped with a savepoint. Three seconds later (the threshold) every
// coordinator answers 404 for it, its checkpoint files are gone, no
// coordinator exports a metric series of it, and its savepoint is still
// listed with its files; a job started from the savepoint then counts the
// whole input exactly; `coordd job cancel -purge` then purges that job,
// with its files, as soon as its frozen worker is back and has stopped its
// tasks, having answered within the wait it was given that the purge is
// pending.
func TestCancelledJobPurged(t *testing.T) {
	const partitions = 2
	store := newFileStorage(t)
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 1,
		topics:     map[string]int32{"words": partitions},
		coordFlags: []string{"-job-gc-threshold", "3s"}})
	in := newWordInput(907, 6_000, partitions)
	produce(t, c.brokers(), "words", in.recs[:3_000])

	spec := stateJobSpec(c.brokers(), "words", "wordcount", "memory", "200ms")
	spec.Checkpoint.Storage = store.URL()
	spec.Checkpoint.InlineThreshold = 1 // every map task's state in a file
	job := c.submitJob(t, spec)
	c.waitCheckpointed(t, job)
	checkpointDir := filepath.Join(store.dir, "checkpoints", job)
	if n := countFiles(t, checkpointDir); n == 0 {
		t.Fatalf("job %s has no checkpoint files under %s", job, checkpointDir)
	}
	stopping := time.Now() // the job is cancelled after this, when its savepoint completes
	sp := c.stopWithSavepoint(t, c.api(t), job)

	c.waitPurged(t, job, checkpointDir)
	if took := time.Since(stopping); took < 3*time.Second {
		t.Errorf("job %s purged %v after its cancellation, before the 3s threshold", job, took)
	}
	if n := countFiles(t, fileURLDir(t, sp.Location)); n == 0 {
		t.Fatalf("the files of savepoint %s went with its job", sp.ID)
	}
	var kept savepointView
	if err := c.call("GET", c.api(t), "/v1/savepoints/"+sp.ID, nil, &kept); err != nil {
		t.Fatalf("savepoint %s after the purge of its job: %v", sp.ID, err)
	}

	// The savepoint of the purged job restores: a new job from it counts
	// every record once, the ones before the savepoint included.
	produce(t, c.brokers(), "words", in.recs[3_000:])
	spec.Name = "wordcount-again"
	again, err := c.postJobFrom(c.api(t), spec, sp.ID)
	if err != nil {
		t.Fatalf("submit a job from savepoint %s of purged job %s: %v", sp.ID, job, err)
	}
	c.checkExact(t, again, in.want)

	// Purged on request, through the CLI: the running job is cancelled and
	// goes as soon as its tasks have stopped, with its checkpoint files.
	againDir := filepath.Join(store.dir, "checkpoints", again)
	if n := countFiles(t, againDir); n == 0 {
		t.Fatalf("job %s has no checkpoint files under %s", again, againDir)
	}
	// Its worker is frozen first: its tasks cannot stop, so the answer,
	// after the wait the CLI asked for, is that the purge is pending (the
	// lease, 5 s, is far from running out); the leader goes on with it once
	// the worker is back and has stopped them.
	c.pauseWorker(t, "w1")
	out := c.cli(t, c.api(t), "job", "cancel", "-purge", "-purge-wait", "300ms", again)
	c.resumeWorker(t, "w1")
	if want := "job " + again + " cancelled; purge pending: not purged within 300ms"; !strings.Contains(out, want) {
		t.Errorf("coordd job cancel -purge -purge-wait 300ms %s with its worker frozen printed %q, want %q", again, out, want)
	}
	c.waitPurged(t, again, againDir)
}

// waitPurged waits until every live coordinator answers 404 for job, and
// then checks that no file is left under its checkpoint dir and that no
// coordinator exports a metric series of it.
func (c *cluster) waitPurged(t *testing.T, job, checkpointDir string) {
	t.Helper()
	for _, cp := range c.liveCoordinators() {
		c.waitFor(t, time.Minute, "coordinator "+cp.id+" to answer 404 for purged job "+job, func() (bool, error) {
			var j jobView
			err := c.call("GET", cp.httpAddr, "/v1/jobs/"+job, nil, &j)
			var apiErr *apiError
			if errors.As(err, &apiErr) && apiErr.status == http.StatusNotFound {
				return true, nil
			}
			if err == nil {
				return false, errors.New("job " + job + " is still " + j.Status)
			}
			return false, err
		})
	}
	if n := countFiles(t, checkpointDir); n != 0 {
		t.Errorf("%d files left under %s after the purge of job %s", n, checkpointDir, job)
	}
	for _, cp := range c.liveCoordinators() {
		text, err := c.coordMetrics(cp)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(text, "\n") {
			if strings.Contains(line, `job="`+job+`"`) {
				t.Errorf("coordinator %s still exports a series of purged job %s: %s", cp.id, job, line)
				break
			}
		}
	}
}

// countFiles returns the number of regular files under dir, 0 if it does
// not exist.
func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			n++
		}
		return nil
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return n
}
