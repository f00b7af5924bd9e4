package integration

// Savepoints: taken while a job runs, taken as a job stops, and a job
// started from one, by its id or by its location URL, with another map
// parallelism and another state backend.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// savepointMetadataDoc is the _metadata document in a savepoint's
// directory: what a job started from the savepoint's URL reads.
type savepointMetadataDoc struct {
	Format    string `json:"format"`
	Savepoint struct {
		ID           string `json:"id"`
		JobID        string `json:"job_id"`
		CheckpointID uint64 `json:"checkpoint_id"`
		Tasks        map[string]struct {
			Kind    string           `json:"kind"`
			Offsets map[string]int64 `json:"offsets"` // by partition
			Files   []struct {
				Path string `json:"path"`
			} `json:"files"`
		} `json:"tasks"`
	} `json:"savepoint"`
}

// readSavepointMetadata waits for the _metadata of a savepoint in file://
// storage and returns it with the savepoint's source offsets by partition.
func (c *cluster) readSavepointMetadata(t *testing.T, sp savepointView) (savepointMetadataDoc, map[int32]int64) {
	t.Helper()
	path := filepath.Join(fileURLDir(t, sp.Location), "_metadata")
	var md savepointMetadataDoc
	c.waitFor(t, 30*time.Second, "the _metadata of savepoint "+sp.ID, func() (bool, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return false, err
		}
		return true, json.Unmarshal(b, &md)
	})
	if md.Savepoint.ID != sp.ID || md.Savepoint.CheckpointID != sp.CheckpointID {
		t.Fatalf("%s describes savepoint %s of checkpoint %d, want %s of %d", path, md.Savepoint.ID, md.Savepoint.CheckpointID, sp.ID, sp.CheckpointID)
	}
	offsets := map[int32]int64{}
	for id, task := range md.Savepoint.Tasks {
		if task.Kind == "map" && len(task.Files) == 0 {
			t.Errorf("savepoint %s: map task %s has no state file", sp.ID, id)
		}
		for p, off := range task.Offsets {
			n, err := strconv.ParseInt(p, 10, 32)
			if err != nil {
				t.Fatalf("%s: task %s: partition %q: %v", path, id, p, err)
			}
			offsets[int32(n)] = off
		}
	}
	return md, offsets
}

// readOwnSavepoint reads savepoint id from the follower that forwarded the
// request which made it (what), right after the answer. A follower that
// does not know it yet fails the test (read your writes) but the test goes
// on once it does.
func (c *cluster) readOwnSavepoint(t *testing.T, follower *coordProc, id, what string) savepointView {
	t.Helper()
	var sp savepointView
	err := c.call("GET", follower.httpAddr, "/v1/savepoints/"+id, nil, &sp)
	if err == nil {
		return sp
	}
	t.Errorf("read your writes: right after %s through follower %s answered savepoint %s, GET /v1/savepoints/%s there fails: %v", what, follower.id, id, id, err)
	c.waitFor(t, 10*time.Second, "follower "+follower.id+" to know savepoint "+id, func() (bool, error) {
		err := c.call("GET", follower.httpAddr, "/v1/savepoints/"+id, nil, &sp)
		return err == nil, err
	})
	return sp
}

// fileURLDir returns the directory a file:// storage URL names: its path
// joined with its prefix option.
func fileURLDir(t *testing.T, loc string) string {
	t.Helper()
	u, err := url.Parse(loc)
	if err != nil || u.Scheme != "file" {
		t.Fatalf("location %q is not a file:// URL (%v)", loc, err)
	}
	return filepath.Join(u.Path, filepath.FromSlash(u.Query().Get("prefix")))
}

// countsBelow returns the word counts of the records of in below offsets,
// when the records were produced in order, record i to partition i mod
// partitions.
func countsBelow(in wordInput, partitions int32, offsets map[int32]int64) map[string]int64 {
	want := map[string]int64{}
	for i, r := range in.recs {
		if int64(i)/int64(partitions) < offsets[int32(i)%partitions] {
			for _, w := range strings.Fields(r.value) {
				want[w]++
			}
		}
	}
	return want
}

// TestSavepointRescaleBackend: a wordcount job (memory backend, map
// parallelism 2, a sink) takes a savepoint while it runs, then is stopped
// with a final savepoint while input still arrives. Its sink shows that
// nothing past the savepoint's offsets was processed, and the savepoint
// holds exactly the words below them. Two jobs start from the final
// savepoint, one by its location URL (map parallelism 3, disk backend), one
// by its id (parallelism 1, memory), and both end with the exact counts of
// all the input. The first savepoint is deleted with its files.
func TestSavepointRescaleBackend(t *testing.T) {
	const partitions = 4
	store := newFileStorage(t)
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 3, topics: map[string]int32{"words": partitions, "out": partitions}})
	in := newWordInput(301, 90_000, partitions)
	produce(t, c.brokers(), "words", in.recs[:30_000])

	spec := stateJobSpec(c.brokers(), "words", "wordcount", "memory", "500ms")
	spec.Checkpoint.Storage = store.URL()
	spec.Checkpoint.InlineThreshold = 1
	spec.Sink = &sinkSpec{Brokers: c.brokers(), Topic: "out"}
	jobA := c.submitJob(t, spec)
	c.waitCheckpointed(t, jobA)

	// Every savepoint request goes to a follower, which forwards it to the
	// leader: the answer must be visible on the follower at once, as every
	// other write is (read your writes), since scripts go on with it.
	follower := c.follower(t)

	// A savepoint while the job runs, through the CLI.
	out := c.cli(t, follower.httpAddr, "job", "savepoint", jobA)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	first := c.readOwnSavepoint(t, follower, strings.TrimSpace(lines[0]), "coordd job savepoint")
	if len(lines) < 2 || lines[1] != "location: "+first.Location || first.JobID != jobA {
		t.Fatalf("coordd job savepoint printed %q; the API shows %+v", out, first)
	}
	_, firstOffsets := c.readSavepointMetadata(t, first)
	if want := countsBelow(in, partitions, firstOffsets); first.Keys != int64(len(want)) {
		t.Errorf("savepoint %s holds %d keys, the input below its offsets %v has %d words", first.ID, first.Keys, firstOffsets, len(want))
	}

	// Stop with a savepoint while input arrives.
	specB := stateJobSpec(c.brokers(), "words", "wordcount", "disk", "500ms")
	specB.Name = "wordcount-b"
	specB.Operator.Parallelism = 3
	specB.Checkpoint.Storage = store.URL()
	specB.Checkpoint.InlineThreshold = 1
	specFile := filepath.Join(t.TempDir(), "wordcount-b.json")
	if b, err := json.Marshal(specB); err != nil {
		t.Fatal(err)
	} else if err := os.WriteFile(specFile, b, 0o644); err != nil {
		t.Fatal(err)
	}
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[30_000:60_000], 5_000)
	c.waitFor(t, time.Minute, "job "+jobA+" to checkpoint records of the second batch", func() (bool, error) {
		st, err := c.getJobState(t, jobA)
		if err != nil {
			return false, err
		}
		return sumOffsets(st.Offsets) > 35_000, fmt.Errorf("checkpoint %d has read %d records", st.CheckpointID, sumOffsets(st.Offsets))
	})
	leaderAddr := c.coordinator(t, c.leader(t)).httpAddr
	final := c.stopWithSavepoint(t, follower.httpAddr, jobA)
	// Started at once from the location, as a script would, through the
	// leader: the savepoint's _metadata must be there.
	runB := func() (string, error) {
		code, stdout, stderr := c.cliResult(t, leaderAddr, "job", "run", specFile, "-from-savepoint", final.Location)
		if code != 0 {
			return "", fmt.Errorf("coordd job run -from-savepoint %s: exit %d: %s", final.Location, code, strings.TrimSpace(stderr))
		}
		return strings.TrimSpace(stdout), nil
	}
	jobB, err := runB()
	if err != nil {
		t.Errorf("right after the stop answered: %v", err)
		c.waitFor(t, 30*time.Second, "a job started from "+final.Location, func() (bool, error) {
			jobB, err = runB()
			return err == nil, err
		})
	}
	t.Logf("started job %s from %s", jobB, final.Location)
	producedAtStop := sumOffsets(topicEndOffsets(t, c.brokers(), "words"))

	var stopped jobView
	if err := c.call("GET", follower.httpAddr, "/v1/jobs/"+jobA, nil, &stopped); err != nil {
		t.Fatal(err)
	}
	if stopped.Status != "cancelled" {
		t.Errorf("read your writes: right after DELETE /v1/jobs/%s?savepoint=true through %s answered, %s shows the job %s (%q), not cancelled",
			jobA, follower.id, follower.id, stopped.Status, stopped.Reason)
	}
	c.readOwnSavepoint(t, follower, final.ID, "DELETE ?savepoint=true")

	_, finalOffsets := c.readSavepointMetadata(t, final)
	t.Logf("final savepoint offsets %v: %d records; %d produced right after the stop", finalOffsets, sumOffsets(finalOffsets), producedAtStop)
	if final.CheckpointID <= first.CheckpointID || sumOffsets(finalOffsets) < sumOffsets(firstOffsets) {
		t.Fatalf("final savepoint %s (checkpoint %d, offsets %v) is not past the first %s (checkpoint %d, offsets %v)",
			final.ID, final.CheckpointID, finalOffsets, first.ID, first.CheckpointID, firstOffsets)
	}
	wantFinal := countsBelow(in, partitions, finalOffsets)
	if final.Keys != int64(len(wantFinal)) {
		t.Errorf("savepoint %s holds %d keys, the input below its offsets has %d words", final.ID, final.Keys, len(wantFinal))
	}
	j, err := c.getJob(t, jobA)
	if err != nil {
		t.Fatal(err)
	}
	if j.Status != "cancelled" || !strings.Contains(j.Reason, final.ID) {
		t.Errorf("job %s after the stop: %s %q, want cancelled naming savepoint %s", jobA, j.Status, j.Reason, final.ID)
	}

	// The sink, exactly once (the default), read_committed: A emitted every
	// word's running totals 1, 2, ... up to its count below the savepoint's
	// offsets, once each, and no total past it. The savepoint's completion
	// reached the map tasks before the stop, and they committed its
	// transactions.
	emitted := c.waitOutput(t, "out", true, wantFinal)
	if problems := exactlyOnceProblems(emitted, wantFinal); len(problems) > 0 {
		t.Errorf("job %s's read_committed sink differs from the running totals of the input below the final savepoint (%d problems): %s",
			jobA, len(problems), strings.Join(problems[:min(10, len(problems))], "; "))
	}
	t.Logf("job %s's sink holds the running totals of %d words once each, up to the savepoint", jobA, len(emitted))

	// Another job from the same savepoint, by id, on one map task.
	specC := stateJobSpec(c.brokers(), "words", "wordcount", "memory", "500ms")
	specC.Name = "wordcount-c"
	specC.Operator.Parallelism = 1
	specC.Checkpoint.Storage = store.URL()
	jobC, err := c.postJobFrom(follower.httpAddr, specC, final.ID)
	if err != nil {
		t.Fatalf("submit a job from savepoint %s: %v", final.ID, err)
	}
	t.Logf("submitted job %s from savepoint %s", jobC, final.ID)

	producerDone()
	produce(t, c.brokers(), "words", in.recs[60_000:])
	for _, job := range []string{jobB, jobC} {
		j := c.waitJob(t, time.Minute, job, "job "+job+" running from savepoint "+final.ID, func(j jobView) error {
			if j.Status != "running" {
				return errors.New("not running")
			}
			if !strings.Contains(j.Reason, "restoring savepoint "+final.ID) {
				return errors.New("reason does not name the savepoint")
			}
			return nil
		})
		if got := len(j.Tasks); job == jobB && got != 2+3 || job == jobC && got != 2+1 {
			t.Errorf("job %s runs %d tasks", job, got)
		}
		c.checkExact(t, job, in.want)
	}

	// Both savepoints are listed; the first one is deleted with its files.
	list := c.cli(t, c.api(t), "savepoint", "list")
	for _, sp := range []savepointView{first, final} {
		if !strings.Contains(list, sp.ID) {
			t.Errorf("coordd savepoint list does not show %s:\n%s", sp.ID, list)
		}
	}
	firstDir := fileURLDir(t, first.Location)
	// What a worker killed in the middle of an upload to the savepoint
	// would have left: deleted with the rest.
	partial := filepath.Join(firstDir, "map-0.state.1f2e3d.tmp")
	if err := os.WriteFile(partial, []byte("half a file"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.cli(t, c.api(t), "savepoint", "delete", first.ID)
	c.waitFor(t, 30*time.Second, "savepoint "+first.ID+"'s files to be deleted", func() (bool, error) {
		entries, err := os.ReadDir(firstDir)
		if errors.Is(err, os.ErrNotExist) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		return len(entries) == 0, fmt.Errorf("%d files left in %s", len(entries), firstDir)
	})
	var sps []savepointView
	if err := c.call("GET", c.api(t), "/v1/savepoints", nil, &sps); err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(sps, func(sp savepointView) bool { return sp.ID == first.ID }) ||
		!slices.ContainsFunc(sps, func(sp savepointView) bool { return sp.ID == final.ID }) {
		t.Errorf("after deleting %s, /v1/savepoints lists %+v", first.ID, sps)
	}
}
