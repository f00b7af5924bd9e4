package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// The answers of the HTTP API, as README.md and docs/operations.md show them. Only
// the fields the tests read are declared; the API may return more.
type (
	statusView struct {
		ID             string `json:"id"`
		State          string `json:"state"`
		Term           uint64 `json:"term"`
		LastIndex      uint64 `json:"last_index"`
		LeaderID       string `json:"leader_id"`
		LeaderHTTPAddr string `json:"leader_http_addr"`
	}
	memberView struct {
		ID         string `json:"id"`
		Role       string `json:"role"`
		GossipAddr string `json:"gossip_addr"`
		Status     string `json:"status"`
	}
	jobView struct {
		ID             string     `json:"id"`
		Name           string     `json:"name"`
		Status         string     `json:"status"`
		Reason         string     `json:"reason"`
		Attempt        uint64     `json:"attempt"`
		Restarts       int        `json:"restarts"`
		Tasks          []taskView `json:"tasks"`
		LastCheckpoint *struct {
			ID uint64 `json:"id"`
		} `json:"last_checkpoint"`
		// Attempts are the latest attempts, newest first.
		Attempts []struct {
			Attempt uint64 `json:"attempt"`
			Reason  string `json:"reason"`
		} `json:"attempts"`
		// Recoveries are the latest recoveries, newest first.
		Recoveries []recoveryView `json:"recoveries"`
	}
	taskView struct {
		ID     string `json:"id"`
		Kind   string `json:"kind"`
		Worker string `json:"worker"`
		// Attempt and StartedAt are the task's own: a task-scoped
		// recovery leaves them as they were for the tasks it kept.
		Attempt   uint64 `json:"attempt"`
		StartedAt string `json:"started_at"`
	}
	// recoveryView is one recovery of a job from a failure.
	recoveryView struct {
		Attempt        uint64   `json:"attempt"`
		Scope          string   `json:"scope"` // tasks, job
		Tasks          []string `json:"tasks"`
		Reason         string   `json:"reason"`
		DetectedAt     string   `json:"detected_at"`
		StartedAt      string   `json:"started_at"`
		CheckpointID   uint64   `json:"checkpoint_id"`
		CheckpointedAt string   `json:"checkpointed_at"`
	}
	stateView struct {
		CheckpointID uint64           `json:"checkpoint_id"`
		Offsets      map[string]int64 `json:"offsets"`
		Keyed        map[string]int64 `json:"keyed"`
	}
	// checkpointView is one entry of GET /v1/jobs/{id}/checkpoints.
	checkpointView struct {
		ID          uint64               `json:"id"`
		Attempt     uint64               `json:"attempt"`
		Status      string               `json:"status"` // pending, completed, aborted
		Reason      string               `json:"reason"`
		TriggerTime string               `json:"trigger_time"` // RFC 3339
		DurationMS  *float64             `json:"duration_ms"`  // of a completed checkpoint
		Tasks       []checkpointTaskView `json:"tasks"`
	}
	// checkpointTaskView is one task's acknowledgement of a checkpoint.
	checkpointTaskView struct {
		ID        string           `json:"id"`
		Kind      string           `json:"kind"` // source, map
		Worker    string           `json:"worker"`
		StateSize int64            `json:"state_size"` // bytes a map task's snapshot wrote
		Keys      int64            `json:"keys"`
		Files     int              `json:"files"` // state files in checkpoint storage it references
		Offsets   map[string]int64 `json:"offsets"`
	}
)

// jobSpec is the job spec of the user contract (docs/operations.md, Job spec), declared here
// rather than imported so that the tests check the JSON users write.
type (
	jobSpec struct {
		Name       string         `json:"name"`
		Source     sourceSpec     `json:"source"`
		Operator   operatorSpec   `json:"operator"`
		Sink       *sinkSpec      `json:"sink,omitempty"`
		State      *stateSpec     `json:"state,omitempty"`
		Checkpoint checkpointSpec `json:"checkpoint"`
		Restart    *restartSpec   `json:"restart,omitempty"`
		Recovery   *recoverySpec  `json:"recovery,omitempty"`
	}
	// recoverySpec says what is restored when a worker is lost: "tasks"
	// (the default) or "job".
	recoverySpec struct {
		Scope string `json:"scope"`
	}
	restartSpec struct {
		Initial    string `json:"initial,omitempty"`
		Max        string `json:"max,omitempty"`
		ResetAfter string `json:"reset_after,omitempty"`
	}
	sourceSpec struct {
		Brokers     []string `json:"brokers"`
		Topic       string   `json:"topic"`
		Start       string   `json:"start,omitempty"`
		Parallelism int      `json:"parallelism"`
		Group       string   `json:"group,omitempty"`
		// IsolationLevel is "read_committed" or "read_uncommitted" (the
		// default, left out).
		IsolationLevel string `json:"isolation_level,omitempty"`
	}
	operatorSpec struct {
		Name           string `json:"name"`
		Parallelism    int    `json:"parallelism"`
		MaxParallelism int    `json:"max_parallelism,omitempty"`
	}
	sinkSpec struct {
		Brokers  []string `json:"brokers"`
		Topic    string   `json:"topic"`
		Delivery string   `json:"delivery,omitempty"` // exactly_once (default), at_least_once
		// TransactionTimeout is the exactly-once sink's Kafka transaction
		// timeout, such as "90s"; empty: the default.
		TransactionTimeout string `json:"transaction_timeout,omitempty"`
	}
	// stateSpec is where map tasks keep keyed state: "memory" or "disk".
	stateSpec struct {
		Backend string `json:"backend"`
	}
	checkpointSpec struct {
		Interval          string `json:"interval,omitempty"`
		Timeout           string `json:"timeout,omitempty"`
		MinPause          string `json:"min_pause,omitempty"`
		Retained          int    `json:"retained,omitempty"`
		TolerableFailures int    `json:"tolerable_failures,omitempty"`
		// Storage is the checkpoint storage URL (file:///dir, s3://...);
		// empty: the cluster's -checkpoint-storage.
		Storage string `json:"storage,omitempty"`
		// InlineThreshold: state smaller than this stays inline in Raft.
		InlineThreshold int64 `json:"inline_threshold,omitempty"`
	}
)

// wordcountSpec is the README's job spec without its sink: wordcount
// over topic from the earliest offset, parallelism 2 and 2, checkpoints every
// second.
func wordcountSpec(brokers []string, topic string) jobSpec {
	return jobSpec{
		Name:     "wordcount",
		Source:   sourceSpec{Brokers: brokers, Topic: topic, Start: "earliest", Parallelism: 2},
		Operator: operatorSpec{Name: "wordcount", Parallelism: 2, MaxParallelism: 128},
		Checkpoint: checkpointSpec{
			Interval: "1s", Timeout: "30s", MinPause: "0s", Retained: 3, TolerableFailures: 3,
		},
	}
}

// recoveredSince returns nil once the job runs a newer attempt than before's
// and that attempt has completed a checkpoint. A checkpoint newer than
// before's is not enough: the failing attempt can complete one before it is
// restarted, and its offsets can equal the ends a test waits for (a
// recreated topic given as many records as the deleted one had).
func (j jobView) recoveredSince(before jobView) error {
	if j.Attempt <= before.Attempt || j.Status != "running" {
		return fmt.Errorf("attempt %d %s (was %d)", j.Attempt, j.Status, before.Attempt)
	}
	for _, r := range j.Recoveries {
		if r.Attempt == j.Attempt && r.CheckpointID != 0 {
			return nil
		}
	}
	return fmt.Errorf("attempt %d has no completed checkpoint yet (last checkpoint %d)", j.Attempt, j.lastCheckpointID())
}

// lastCheckpointID is 0 until the job has a completed checkpoint.
func (j jobView) lastCheckpointID() uint64 {
	if j.LastCheckpoint == nil {
		return 0
	}
	return j.LastCheckpoint.ID
}

// apiError is a non-2xx answer of the HTTP API.
type apiError struct {
	method, url string
	status      int
	message     string // the "error" field, or the raw body
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.method, e.url, e.status, http.StatusText(e.status), e.message)
}

// call makes one API request to addr and decodes a 2xx JSON answer into out
// (if not nil). Other answers are an *apiError.
func (c *cluster) call(method, addr, path string, body []byte, out any) error {
	return c.callWith(c.client, method, addr, path, body, out)
}

// callWith is call with another client, such as one with a longer timeout
// for a request that waits (a savepoint).
func (c *cluster) callWith(client *http.Client, method, addr, path string, body []byte, out any) error {
	// A coordinator that restarted refuses reads until it has caught up
	// with the leader, and a just elected leader writes until it has
	// applied its predecessors' entries (503, "catching up"): a moment;
	// ask again, as a client honouring Retry-After would.
	deadline := time.Now().Add(catchUpWait)
	for {
		err := c.callOnce(client, method, addr, path, body, out)
		var ae *apiError
		if !errors.As(err, &ae) || ae.status != http.StatusServiceUnavailable || !strings.Contains(ae.message, "catching up") ||
			(method != http.MethodGet && !strings.Contains(ae.message, "nothing done")) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// catchUpWait bounds how long callWith waits for a restarted coordinator
// to catch up before it returns the refusal.
const catchUpWait = 15 * time.Second

// callOnce is one request of callWith.
func (c *cluster) callOnce(client *http.Client, method, addr, path string, body []byte, out any) error {
	url := c.scheme() + addr + path
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	c.authorize(req)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read body: %w", method, url, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &apiError{method: method, url: url, status: resp.StatusCode, message: strings.TrimSpace(string(b))}
		var eb struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			e.message = eb.Error
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: decode %q: %w", method, url, truncate(string(b), 300), err)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func (c *cluster) status(cp *coordProc) (statusView, error) {
	var st statusView
	err := c.call("GET", cp.httpAddr, "/v1/status", nil, &st)
	return st, err
}

// digest returns a coordinator's FSM digest (GET /v1/fsm/digest).
func (c *cluster) digest(cp *coordProc) (string, error) {
	var d struct {
		Digest string `json:"digest"`
	}
	if err := c.call("GET", cp.httpAddr, "/v1/fsm/digest", nil, &d); err != nil {
		return "", err
	}
	if d.Digest == "" {
		return "", fmt.Errorf("%s: empty digest", cp.id)
	}
	return d.Digest, nil
}

// memberStatusIs reports whether every live coordinator lists member id with
// the given gossip status.
func (c *cluster) memberStatusIs(id, status string) (bool, error) {
	for _, cp := range c.liveCoordinators() {
		var ms []memberView
		if err := c.call("GET", cp.httpAddr, "/v1/members", nil, &ms); err != nil {
			return false, err
		}
		i := slices.IndexFunc(ms, func(m memberView) bool { return m.ID == id })
		if i < 0 {
			return false, fmt.Errorf("%s does not list member %s", cp.id, id)
		}
		if ms[i].Status != status {
			return false, fmt.Errorf("%s lists %s as %q", cp.id, id, ms[i].Status)
		}
	}
	return true, nil
}

// postJob submits a job spec (any JSON value, or raw []byte) and returns the
// new job's id or the API's error.
func (c *cluster) postJob(addr string, spec any) (string, error) {
	body, ok := spec.([]byte)
	if !ok {
		var err error
		if body, err = json.Marshal(spec); err != nil {
			return "", fmt.Errorf("encode job spec: %w", err)
		}
	}
	var created struct {
		ID string `json:"id"`
	}
	if err := c.call("POST", addr, "/v1/jobs", body, &created); err != nil {
		return "", err
	}
	if created.ID == "" {
		return "", errors.New("POST /v1/jobs: answer has no id")
	}
	return created.ID, nil
}

// submitJob submits a job spec to a live coordinator and returns its id.
func (c *cluster) submitJob(t *testing.T, spec any) string {
	t.Helper()
	id, err := c.postJob(c.api(t), spec)
	if err != nil {
		t.Fatalf("submit job: %v", err)
	}
	t.Logf("submitted job %s", id)
	return id
}

// getJob reads GET /v1/jobs/{id} from a live coordinator.
func (c *cluster) getJob(t *testing.T, id string) (jobView, error) {
	var j jobView
	err := c.call("GET", c.api(t), "/v1/jobs/"+id, nil, &j)
	return j, err
}

// getJobState reads GET /v1/jobs/{id}/state from a live coordinator.
func (c *cluster) getJobState(t *testing.T, id string) (stateView, error) {
	var s stateView
	err := c.call("GET", c.api(t), "/v1/jobs/"+id+"/state", nil, &s)
	return s, err
}

// getCheckpoints reads GET /v1/jobs/{id}/checkpoints (newest first) from the
// coordinator at addr.
func (c *cluster) getCheckpoints(addr, id string) ([]checkpointView, error) {
	var cps []checkpointView
	err := c.call("GET", addr, "/v1/jobs/"+id+"/checkpoints", nil, &cps)
	return cps, err
}

// inAttempt returns nil when j runs in the attempt of was, and fails the
// test when j restarted since: what (an outage, say) must not restart it.
func inAttempt(t *testing.T, was, j jobView, what string) error {
	t.Helper()
	if j.Attempt != was.Attempt || j.Restarts != was.Restarts {
		t.Fatalf("%s restarted the job: attempt %d (%d restarts), was %d (%d restarts); reason %q",
			what, j.Attempt, j.Restarts, was.Attempt, was.Restarts, j.Reason)
	}
	if j.Status != "running" {
		return fmt.Errorf("job is %s", j.Status)
	}
	return nil
}

// checkpointsSince returns the checkpoints of job triggered at since or
// later, once job is seen running in the attempt of was (inAttempt).
func (c *cluster) checkpointsSince(t *testing.T, job string, was jobView, since time.Time, what string) ([]checkpointView, error) {
	t.Helper()
	j, err := c.getJob(t, job)
	if err != nil {
		return nil, err
	}
	if err := inAttempt(t, was, j, what); err != nil {
		return nil, err
	}
	cps, err := c.getCheckpoints(c.api(t), job)
	if err != nil {
		return nil, err
	}
	var out []checkpointView
	for _, cp := range cps {
		triggered, err := time.Parse(time.RFC3339Nano, cp.TriggerTime)
		if err != nil {
			return nil, fmt.Errorf("checkpoint %d: trigger time %q: %w", cp.ID, cp.TriggerTime, err)
		}
		if !triggered.Before(since) {
			out = append(out, cp)
		}
	}
	return out, nil
}

// waitJob polls GET /v1/jobs/{id} until cond returns nil and returns that
// view; cond's error says why not yet.
func (c *cluster) waitJob(t *testing.T, timeout time.Duration, id, what string, cond func(jobView) error) jobView {
	t.Helper()
	var last jobView
	c.waitFor(t, timeout, what, func() (bool, error) {
		j, err := c.getJob(t, id)
		if err != nil {
			return false, err
		}
		last = j
		if err := cond(j); err != nil {
			return false, fmt.Errorf("attempt %d, %s %q, last checkpoint %d: %w", j.Attempt, j.Status, j.Reason, j.lastCheckpointID(), err)
		}
		return true, nil
	})
	return last
}

// jobState returns the job's last completed checkpoint, failing the test if
// it cannot be read.
func (c *cluster) jobState(t *testing.T, id string) stateView {
	t.Helper()
	s, err := c.getJobState(t, id)
	if err != nil {
		t.Fatalf("job %s state: %v", id, err)
	}
	return s
}

// waitCaughtUp waits until the job's last completed checkpoint has read every
// partition of topic up to end (next offset to read >= end offset), and
// returns that checkpoint's state.
func (c *cluster) waitCaughtUp(t *testing.T, timeout time.Duration, jobID, topic string, end map[int32]int64) stateView {
	t.Helper()
	var st stateView
	c.waitFor(t, timeout, fmt.Sprintf("job %s's last checkpoint to reach the end of %s", jobID, topic), func() (bool, error) {
		s, err := c.getJobState(t, jobID)
		if err != nil {
			return false, err
		}
		var behind []string
		for _, p := range slices.Sorted(maps.Keys(end)) {
			key := fmt.Sprintf("%s/%d", topic, p)
			if got, ok := s.Offsets[key]; !ok || got < end[p] {
				behind = append(behind, fmt.Sprintf("%s at %d of %d", key, got, end[p]))
			}
		}
		if len(behind) > 0 {
			return false, fmt.Errorf("checkpoint %d: %s", s.CheckpointID, strings.Join(behind, ", "))
		}
		st = s
		return true, nil
	})
	return st
}

// sameFSM reports whether every coordinator answers and all report the same
// FSM digest (GET /v1/fsm/digest).
func (c *cluster) sameFSM() (bool, error) {
	digests := map[string]string{}
	for _, cp := range c.coords {
		d, err := c.digest(cp)
		if err != nil {
			return false, err
		}
		digests[cp.id] = d
	}
	for _, cp := range c.coords[1:] {
		if digests[cp.id] != digests[c.coords[0].id] {
			return false, fmt.Errorf("digests differ: %v", digests)
		}
	}
	return true, nil
}

// sameLiveFSM reports whether every live coordinator answers and all report
// the same FSM digest.
func (c *cluster) sameLiveFSM() (bool, error) {
	digests := map[string]string{}
	var first string
	for _, cp := range c.liveCoordinators() {
		d, err := c.digest(cp)
		if err != nil {
			return false, err
		}
		digests[cp.id] = d
		if first == "" {
			first = d
		} else if d != first {
			return false, fmt.Errorf("digests differ: %v", digests)
		}
	}
	return true, nil
}

// diffCounts compares keyed state with the expected counts and describes the
// first differences (missing, extra and wrong keys) and the totals; "" when
// they are equal.
func diffCounts(got, want map[string]int64) string {
	const show = 20
	var missing, extra, wrong []string
	var gotTotal, wantTotal int64
	for _, k := range slices.Sorted(maps.Keys(want)) {
		wantTotal += want[k]
		g, ok := got[k]
		switch {
		case !ok:
			missing = append(missing, fmt.Sprintf("%q (want %d)", k, want[k]))
		case g != want[k]:
			wrong = append(wrong, fmt.Sprintf("%q: got %d, want %d", k, g, want[k]))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(got)) {
		gotTotal += got[k]
		if _, ok := want[k]; !ok {
			extra = append(extra, fmt.Sprintf("%q = %d", k, got[k]))
		}
	}
	if len(missing)+len(extra)+len(wrong) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d keys, total %d; want %d keys, total %d\n", len(got), gotTotal, len(want), wantTotal)
	for _, part := range []struct {
		name  string
		items []string
	}{{"missing", missing}, {"extra", extra}, {"wrong count", wrong}} {
		if len(part.items) == 0 {
			continue
		}
		fmt.Fprintf(&b, "%d %s:", len(part.items), part.name)
		for i, s := range part.items {
			if i == show {
				fmt.Fprintf(&b, " ... and %d more", len(part.items)-show)
				break
			}
			b.WriteString(" " + s + ";")
		}
		b.WriteString("\n")
	}
	return b.String()
}
