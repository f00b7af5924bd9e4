package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The dashboard's views of the API that the test compares the pages with.
type (
	workerTasksView struct {
		ID    string `json:"id"`
		Tasks []struct {
			Job  string `json:"job"`
			Task string `json:"task"`
		} `json:"tasks"`
	}
	historyEntryView struct {
		ID     uint64 `json:"id"`
		Status string `json:"status"`
	}
	keyStateView struct {
		CheckpointID uint64          `json:"checkpoint_id"`
		Found        bool            `json:"found"`
		Value        json.RawMessage `json:"value"`
	}
)

// TestDashboard drives the web dashboard of a follower in a real browser
// while a wordcount job runs: the pages show the numbers the API returns
// (coordinators, each worker's task count, the job's last checkpoint, a
// key's count), the checkpoint history grows, and the banner says "No
// leader" while the page's coordinator has lost its quorum and goes when the
// others are back, after which the last checkpoint moves on.
func TestDashboard(t *testing.T) {
	const (
		partitions = 4
		// probeKey is a word of the input with a known, fixed count. It
		// looks like markup, so the lookup also checks that the page
		// shows API data as text.
		probeKey   = `<i>dash&board</i>`
		probeCount = 2
		// Input keeps arriving at producerRate records a second, so that
		// every checkpoint has read something.
		producerRate = 200
	)
	b := startBrowser(t) // first: without a browser the test skips before starting processes
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": partitions}})

	corpus := newCorpus(20261201)
	first := []record{{value: strings.Repeat(probeKey+" ", probeCount), partition: 0}}
	for i := range 5000 {
		first = append(first, record{key: fmt.Sprint(i), value: corpus.line(), partition: int32(i % partitions)})
	}
	produce(t, c.brokers(), "words", first)
	job := c.submitJob(t, wordcountSpec(c.brokers(), "words"))
	more := make([]record, producerRate*15*60) // more than the test lasts; the producer stops when it ends
	for i := range more {
		more[i] = record{key: fmt.Sprint(len(first) + i), value: corpus.line(), partition: int32(i % partitions)}
	}
	_ = produceInBackground(t, c.brokers(), "words", more, producerRate) // nothing waits for the end: it is stopped with the test
	c.waitJob(t, 2*time.Minute, job, "the job running with a completed checkpoint", func(j jobView) error {
		if j.Status != "running" || j.lastCheckpointID() == 0 {
			return errors.New("not yet")
		}
		return nil
	})

	page := c.follower(t)
	base := c.scheme() + page.httpAddr
	t.Logf("the dashboard under test is %s's, a follower", page.id)

	t.Run("root redirects to the dashboard", func(t *testing.T) {
		client := &http.Client{Timeout: httpTimeout, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		}}
		resp, err := client.Get(base + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/ui/" {
			t.Fatalf("GET /: %s, Location %q; want 302 to /ui/", resp.Status, resp.Header.Get("Location"))
		}
	})

	// Cluster page: the coordinators as /v1/coordinators gives them, and
	// every worker's task count as /v1/workers gives it.
	b.open(base + "/ui/")
	leader := c.leader(t)
	c.waitFor(t, time.Minute, "the cluster page to list the 3 coordinators, "+leader+" as the leader", func() (bool, error) {
		rows, err := b.queryAll(`[data-testid="coordinator-row"]`)
		if err != nil {
			return false, err
		}
		var ids []string
		for _, r := range rows {
			ids = append(ids, r.Data["id"])
		}
		if !slices.Equal(ids, []string{"c1", "c2", "c3"}) {
			return false, fmt.Errorf("coordinator rows %v", ids)
		}
		for _, id := range ids {
			st, err := b.query(fmt.Sprintf(`[data-testid="coordinator-state-%s"]`, id))
			if err != nil {
				return false, err
			}
			want := "Follower"
			if id == leader {
				want = "Leader"
			}
			if st.Text != want {
				return false, fmt.Errorf("%s's Raft state shows %q, want %s", id, st.Text, want)
			}
		}
		mark, err := b.query(fmt.Sprintf(`[data-testid="coordinator-leader-%s"]`, leader))
		if err != nil {
			return false, err
		}
		return mark.Found, fmt.Errorf("%s has no leader mark", leader)
	})
	c.waitFor(t, time.Minute, "each worker's task count on the cluster page to equal /v1/workers'", func() (bool, error) {
		var workers []workerTasksView
		if err := c.call("GET", page.httpAddr, "/v1/workers", nil, &workers); err != nil {
			return false, err
		}
		var j jobView
		if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job, nil, &j); err != nil {
			return false, err
		}
		placed := 0
		for _, w := range workers {
			e, err := b.query(fmt.Sprintf(`[data-testid="worker-tasks-%s"]`, w.ID))
			if err != nil {
				return false, err
			}
			if !e.Found || e.Text != strconv.Itoa(len(w.Tasks)) {
				return false, fmt.Errorf("worker %s: the page shows %q tasks, /v1/workers %d", w.ID, e.Text, len(w.Tasks))
			}
			placed += len(w.Tasks)
		}
		if len(workers) != 2 || placed != len(j.Tasks) {
			return false, fmt.Errorf("/v1/workers lists %d workers with %d tasks; the job has %d", len(workers), placed, len(j.Tasks))
		}
		return true, nil
	})
	b.screenshot("cluster")

	// Jobs page: the job with the last checkpoint the API gives.
	b.click(`a[data-nav="jobs"]`)
	shown := b.waitLastCheckpoint(c, page, job, fmt.Sprintf(`[data-testid="job-last-checkpoint-%s"]`, job), "the jobs page")
	b.waitElement(c, 30*time.Second, "the jobs page to show the job running", fmt.Sprintf(`[data-testid="job-status-%s"]`, job), func(e element) error {
		if e.Text != "running" {
			return errors.New("not running")
		}
		return nil
	})
	b.waitElement(c, 30*time.Second, "the jobs page to show the job's consumer lag", fmt.Sprintf(`[data-testid="job-lag-%s"]`, job), func(e element) error {
		if _, err := strconv.ParseInt(strings.ReplaceAll(e.Text, ",", ""), 10, 64); err != nil {
			return errors.New("not a number")
		}
		return nil
	})
	b.waitElement(c, 30*time.Second, "the jobs page to show the job's records in per second", fmt.Sprintf(`[data-testid="job-in-%s"]`, job), func(e element) error {
		if !strings.HasSuffix(e.Text, "/s") {
			return errors.New("no rate yet: two checkpoints of the attempt are needed")
		}
		return nil
	})
	t.Logf("the jobs page shows last checkpoint %d", shown)
	b.screenshot("jobs")

	// Job page: its tasks, its last checkpoint, a history that grows.
	b.click(fmt.Sprintf(`a[href="#/jobs/%s"]`, url.PathEscape(job)))
	shown = b.waitLastCheckpoint(c, page, job, `[data-testid="last-checkpoint"]`, "the job page")
	t.Logf("the job page shows last checkpoint %d", shown)
	c.waitFor(t, 30*time.Second, "the job page to list the job's tasks", func() (bool, error) {
		var j jobView
		if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job, nil, &j); err != nil {
			return false, err
		}
		rows, err := b.queryAll(`[data-testid="task-row"]`)
		if err != nil {
			return false, err
		}
		for _, task := range j.Tasks {
			i := slices.IndexFunc(rows, func(r element) bool { return r.Data["id"] == task.ID })
			if i < 0 || !strings.Contains(rows[i].Text, task.Worker) {
				return false, fmt.Errorf("task %s on %s: not in the page's %d task rows", task.ID, task.Worker, len(rows))
			}
		}
		return len(rows) == len(j.Tasks), fmt.Errorf("%d task rows, the job has %d tasks", len(rows), len(j.Tasks))
	})
	rows, newest := b.waitHistory(c, 30*time.Second, "the job page's checkpoint history", 0, 1)
	rows, newest = b.waitHistory(c, time.Minute, "the job page's checkpoint history to grow", newest, rows+1)
	t.Logf("the job page's history shows %d checkpoints, the newest %d", rows, newest)
	var hist []historyEntryView
	if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job+"/checkpoints/history", nil, &hist); err != nil {
		t.Fatal(err)
	}
	if len(hist) == 0 || hist[0].ID < newest {
		t.Fatalf("the page's newest history row is checkpoint %d; the API's history, read after, has %d entries, newest %+v", newest, len(hist), hist[:min(1, len(hist))])
	}

	// The key lookup: the probe key's count, as the state API gives it,
	// shown as text.
	found := b.lookup(c, probeKey, "found")
	var want keyStateView
	if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job+"/state?key="+url.QueryEscape(probeKey), nil, &want); err != nil {
		t.Fatal(err)
	}
	value, err := b.query(`[data-testid="state-value"]`)
	if err != nil {
		t.Fatal(err)
	}
	if !want.Found || string(want.Value) != strconv.Itoa(probeCount) || value.Text != string(want.Value) {
		t.Fatalf("the lookup of %q shows %q (%q); the state API answers %+v (value %s); the input has it %d times", probeKey, value.Text, found.Text, want, want.Value, probeCount)
	}
	if !strings.Contains(found.Text, probeKey) {
		t.Fatalf("the lookup result %q does not show the key %q as text", found.Text, probeKey)
	}
	if markup, err := b.query(`[data-testid="state-result"] i`); err != nil || markup.Found {
		t.Fatalf("the key %q became markup in the lookup result (err %v)", probeKey, err)
	}
	b.lookup(c, "no-such-word-in-the-corpus", "not-found")

	// No quorum: kill the two other coordinators, the leader among them.
	// The page's coordinator keeps showing its state, under the banner.
	var others []string
	for _, cp := range c.coords {
		if cp.id != page.id {
			others = append(others, cp.id)
		}
	}
	if !slices.Contains(others, leader) {
		t.Fatalf("the page's coordinator %s is the leader %s", page.id, leader)
	}
	shown = b.lastCheckpointShown(t)
	for _, id := range others {
		c.killCoordinator(t, id)
	}
	b.waitElement(c, time.Minute, "the banner to say there is no leader", "#banner", func(e element) error {
		if !e.Visible || !strings.Contains(e.Text, "No leader") {
			return fmt.Errorf("visible %v", e.Visible)
		}
		return nil
	})
	// The page reads the coordinator's local state (stale reads): its
	// data stays.
	b.waitElement(c, 30*time.Second, "the job page to keep showing the job without a leader", `[data-testid="job-summary"]`, func(e element) error {
		// A refused read shows as the API error "GET <path>: 503 ...";
		// a bare "503" could be any number on the page (a lag of 1,503).
		if refusedRead.MatchString(e.Text) {
			return fmt.Errorf("a read was refused: %s", refusedRead.FindString(e.Text))
		}
		if id := b.lastCheckpointShown(t); id < shown {
			return fmt.Errorf("last checkpoint %d, before the kill %d", id, shown)
		}
		return nil
	})
	b.screenshot("no-leader")

	// Quorum back: the banner goes and checkpoints move on.
	shown = b.lastCheckpointShown(t)
	for _, id := range others {
		c.restartCoordinator(t, id)
	}
	c.leader(t)
	b.waitElement(c, time.Minute, "the banner to go once a leader is back", "#banner", func(e element) error {
		if e.Visible {
			return errors.New("still shown")
		}
		return nil
	})
	b.waitElement(c, 3*time.Minute, fmt.Sprintf("the job page's last checkpoint to move past %d", shown), `[data-testid="last-checkpoint"]`, func(e element) error {
		if id, _ := strconv.ParseUint(e.Data["id"], 10, 64); id <= shown {
			return fmt.Errorf("checkpoint %d", id)
		}
		return nil
	})
	// A few more checkpoints, for charts worth a screenshot.
	b.waitHistory(c, time.Minute, "the checkpoint history to grow after the outage", shown+3, 1)
	b.lookup(c, probeKey, "found")
	b.screenshot("job")
	c.checkAlive(t)
}

// refusedRead matches the error the pages show for a read the
// coordinator refused with 503 (api.js's ApiError message).
var refusedRead = regexp.MustCompile(`GET \S+: 503\b`)

// waitLastCheckpoint waits until the element sel of the page shows (in its
// data-id) a last checkpoint id of job at least the one the API of the
// page's coordinator gave before the wait, and checks that it is at most
// the one it gives after: the page shows the API's number, or a later one
// it read since. It returns the id shown.
func (b *browser) waitLastCheckpoint(c *cluster, page *coordProc, job, sel, where string) uint64 {
	b.t.Helper()
	var j jobView
	if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job, nil, &j); err != nil {
		b.t.Fatal(err)
	}
	before := j.lastCheckpointID()
	e := b.waitElement(c, 30*time.Second, fmt.Sprintf("%s to show last checkpoint %d or later", where, before), sel, func(e element) error {
		if id, _ := strconv.ParseUint(e.Data["id"], 10, 64); id < before {
			return fmt.Errorf("checkpoint %d", id)
		}
		return nil
	})
	shown, _ := strconv.ParseUint(e.Data["id"], 10, 64)
	if e.Text != strconv.FormatUint(shown, 10) {
		b.t.Fatalf("%s shows %q for last checkpoint %d", where, e.Text, shown)
	}
	if err := c.call("GET", page.httpAddr, "/v1/jobs/"+job, nil, &j); err != nil {
		b.t.Fatal(err)
	}
	if after := j.lastCheckpointID(); shown > after {
		b.t.Fatalf("%s shows last checkpoint %d; the API said %d before and %d after", where, shown, before, after)
	}
	return shown
}

// lastCheckpointShown returns the last checkpoint id the job page shows.
func (b *browser) lastCheckpointShown(t *testing.T) uint64 {
	t.Helper()
	e, err := b.query(`[data-testid="last-checkpoint"]`)
	if err != nil || !e.Found {
		t.Fatalf("the job page shows no last checkpoint (err %v)", err)
	}
	id, _ := strconv.ParseUint(e.Data["id"], 10, 64)
	return id
}

// waitHistory waits until the job page's checkpoint history has at least
// minRows rows (at most 100 are kept: then it waits for a newer newest row
// only) and a newest row after after, and returns the row count and the
// newest id.
func (b *browser) waitHistory(c *cluster, timeout time.Duration, what string, after uint64, minRows int) (rows int, newest uint64) {
	b.t.Helper()
	const kept = 100 // the API's history length
	c.waitFor(b.t, timeout, what, func() (bool, error) {
		es, err := b.queryAll(`[data-testid="history-row"]`)
		if err != nil {
			return false, err
		}
		rows, newest = len(es), 0
		if len(es) > 0 {
			newest, _ = strconv.ParseUint(es[0].Data["id"], 10, 64)
		}
		if rows < min(minRows, kept) || newest <= after {
			return false, fmt.Errorf("%d rows, the newest checkpoint %d", rows, newest)
		}
		return true, nil
	})
	return rows, newest
}

// lookup looks key up with the job page's form until the answer is want
// (found, not-found: a checkpoint may not have read the key yet), and
// returns the result element.
func (b *browser) lookup(c *cluster, key, want string) element {
	b.t.Helper()
	var result element
	c.waitFor(b.t, time.Minute, fmt.Sprintf("the key lookup of %q to answer %s", key, want), func() (bool, error) {
		before, err := b.query(`[data-testid="state-result"]`)
		if err != nil {
			return false, err
		}
		b.setValue("#state-key", key)
		b.click("#state-lookup")
		deadline := time.Now().Add(httpTimeout + 5*time.Second)
		for {
			result, err = b.query(`[data-testid="state-result"]`)
			if err != nil {
				return false, err
			}
			if result.Data["seq"] != before.Data["seq"] {
				break
			}
			if time.Now().After(deadline) {
				return false, fmt.Errorf("no answer to the lookup: %q", result.Text)
			}
			time.Sleep(pollInterval) // poll interval, not synchronization: the loop re-checks the answer
		}
		if result.Data["state"] != want {
			return false, fmt.Errorf("lookup answered %s: %q", result.Data["state"], result.Text)
		}
		return true, nil
	})
	return result
}

// TestDashboardToken opens the dashboard of a cluster with API tokens: the
// page asks for a token, reads the API with the one given, and asks again
// once it is forgotten.
func TestDashboardToken(t *testing.T) {
	// The browser does not know the cluster's CA; the page's security is
	// not what this test checks.
	b := startBrowser(t, chromedp.IgnoreCertErrors)
	c := startCluster(t, clusterOpts{coordinators: 3, secure: true})
	page := c.follower(t)
	b.open(c.scheme() + page.httpAddr + "/ui/#/jobs")
	b.waitElement(c, 30*time.Second, "the page to ask for a token", "#token-form", func(e element) error {
		if !e.Visible || !strings.Contains(e.Text, "needs a token") {
			return fmt.Errorf("visible %v", e.Visible)
		}
		return nil
	})
	b.setValue("#token-input", c.sec.tokens["read"])
	b.click(`#token-form button[type="submit"]`)
	b.waitElement(c, 30*time.Second, "the jobs page to read the API with the token", `[data-testid="jobs"]`, func(e element) error {
		if !strings.Contains(e.Text, "No job has been submitted") {
			return errors.New("no answer yet")
		}
		return nil
	})
	if form, err := b.query("#token-form"); err != nil || form.Visible {
		t.Fatalf("the token form is still shown with a valid token (err %v)", err)
	}
	b.click("#forget-token")
	b.waitElement(c, 30*time.Second, "the page to ask for a token again once it is forgotten", "#token-form", func(e element) error {
		if !e.Visible {
			return errors.New("hidden")
		}
		return nil
	})
}
