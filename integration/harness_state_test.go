package integration

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"
)

// Keyed state as the HTTP API shows it (GET /v1/jobs/{id}/state, its
// ?key= form and /state/export), savepoints, and the files of checkpoint
// storage on a file:// URL.

// longTimeout bounds one request that streams or waits: a state export of a
// million keys, a savepoint.
const longTimeout = 2 * time.Minute

type (
	// stateHeaderView is GET /v1/jobs/{id}/state without the keyed maps,
	// whose values are not numbers for every operator.
	stateHeaderView struct {
		CheckpointID uint64           `json:"checkpoint_id"`
		Attempt      uint64           `json:"attempt"`
		Offsets      map[string]int64 `json:"offsets"`
		Keys         int64            `json:"keys"`
		KeyedOmitted string           `json:"keyed_omitted"`
	}
	// savepointView is one savepoint of /v1/savepoints and of the answers
	// that take one.
	savepointView struct {
		ID             string `json:"id"`
		JobID          string `json:"job_id"`
		CheckpointID   uint64 `json:"checkpoint_id"`
		Location       string `json:"location"`
		Topic          string `json:"topic"`
		Operator       string `json:"operator"`
		MaxParallelism int    `json:"max_parallelism"`
		Tasks          int    `json:"tasks"`
		StateBytes     int64  `json:"state_bytes"`
		Keys           int64  `json:"keys"`
	}
)

// stateEntry is one key of an export: its bytes (from "key" or
// "key_base64") and its value, a number for int64 state, else bytes (from a
// string "value" or "value_base64").
type stateEntry struct {
	key   []byte
	num   int64
	isNum bool
	value []byte
}

// exportLineJSON is one line of /state/export as it is written.
type exportLineJSON struct {
	Key         *string         `json:"key"`
	KeyBase64   *string         `json:"key_base64"`
	Value       json.RawMessage `json:"value"`
	ValueBase64 *string         `json:"value_base64"`
	Error       *string         `json:"error"`
}

// exportHeader is the first line of /state/export.
type exportHeader struct {
	CheckpointID uint64           `json:"checkpoint_id"`
	Offsets      map[string]int64 `json:"offsets"`
}

func (l exportLineJSON) entry() (stateEntry, error) {
	var e stateEntry
	switch {
	case l.Key != nil && l.KeyBase64 == nil:
		e.key = []byte(*l.Key)
	case l.KeyBase64 != nil && l.Key == nil:
		k, err := base64.StdEncoding.DecodeString(*l.KeyBase64)
		if err != nil {
			return e, fmt.Errorf("key_base64 %q: %w", *l.KeyBase64, err)
		}
		if utf8.Valid(k) {
			return e, fmt.Errorf("key_base64 %q is valid UTF-8: it belongs in \"key\"", *l.KeyBase64)
		}
		e.key = k
	default:
		return e, errors.New(`want exactly one of "key" and "key_base64"`)
	}
	switch {
	case l.ValueBase64 != nil && l.Value == nil:
		v, err := base64.StdEncoding.DecodeString(*l.ValueBase64)
		if err != nil {
			return e, fmt.Errorf("value_base64 %q: %w", *l.ValueBase64, err)
		}
		e.value = v
	case l.Value != nil && l.ValueBase64 == nil:
		dec := json.NewDecoder(bytes.NewReader(l.Value))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			return e, fmt.Errorf("value %s: %w", l.Value, err)
		}
		switch v := v.(type) {
		case string:
			e.value = []byte(v)
		case json.Number:
			n, err := v.Int64()
			if err != nil {
				return e, fmt.Errorf("value %s is not an int64: %w", l.Value, err)
			}
			e.num, e.isNum = n, true
		default:
			return e, fmt.Errorf("value %s is neither a string nor a number", l.Value)
		}
	default:
		return e, errors.New(`want exactly one of "value" and "value_base64"`)
	}
	return e, nil
}

// exportState streams GET /v1/jobs/{id}/state/export from addr, calling fn
// for every key, and returns the first line. A line {"error": ...} or a
// malformed line is an error.
func (c *cluster) exportState(addr, job string, fn func(stateEntry) error) (exportHeader, error) {
	var h exportHeader
	u := c.scheme() + addr + "/v1/jobs/" + job + "/state/export"
	client := *c.client
	client.Timeout = longTimeout
	resp, err := c.get(&client, u)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		return h, &apiError{method: "GET", url: u, status: resp.StatusCode, message: strings.TrimSpace(b.String())}
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	if !sc.Scan() {
		return h, fmt.Errorf("GET %s: no first line (%v)", u, sc.Err())
	}
	if err := json.Unmarshal(sc.Bytes(), &h); err != nil || h.CheckpointID == 0 {
		return h, fmt.Errorf("GET %s: first line %q: %v", u, truncate(sc.Text(), 300), err)
	}
	for line := 2; sc.Scan(); line++ {
		var l exportLineJSON
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return h, fmt.Errorf("GET %s: line %d %q: %w", u, line, truncate(sc.Text(), 300), err)
		}
		if l.Error != nil {
			return h, fmt.Errorf("GET %s: line %d: the export failed: %s", u, line, *l.Error)
		}
		e, err := l.entry()
		if err != nil {
			return h, fmt.Errorf("GET %s: line %d %q: %w", u, line, truncate(sc.Text(), 300), err)
		}
		if err := fn(e); err != nil {
			return h, err
		}
	}
	if err := sc.Err(); err != nil {
		return h, fmt.Errorf("GET %s: %w", u, err)
	}
	return h, nil
}

// getStateHeader reads GET /v1/jobs/{id}/state from a live coordinator,
// without its keyed maps.
func (c *cluster) getStateHeader(t *testing.T, job string) (stateHeaderView, error) {
	var s stateHeaderView
	err := c.call("GET", c.api(t), "/v1/jobs/"+job+"/state", nil, &s)
	return s, err
}

// coversEnd describes the partitions of topic whose offset in offsets is
// below end ("" when none is).
func coversEnd(offsets map[string]int64, topic string, end map[int32]int64) string {
	var behind []string
	for _, p := range slices.Sorted(maps.Keys(end)) {
		key := fmt.Sprintf("%s/%d", topic, p)
		if got, ok := offsets[key]; !ok || got < end[p] {
			behind = append(behind, fmt.Sprintf("%s at %d of %d", key, got, end[p]))
		}
	}
	return strings.Join(behind, ", ")
}

// waitStateCovers waits until the job's last completed checkpoint has read
// every partition of topic up to end, and returns its header. It reads only
// the header, so it suits any operator and any state size.
func (c *cluster) waitStateCovers(t *testing.T, timeout time.Duration, job, topic string, end map[int32]int64) stateHeaderView {
	t.Helper()
	var st stateHeaderView
	c.waitFor(t, timeout, fmt.Sprintf("job %s's last checkpoint to reach the end of %s", job, topic), func() (bool, error) {
		s, err := c.getStateHeader(t, job)
		if err != nil {
			return false, err
		}
		if behind := coversEnd(s.Offsets, topic, end); behind != "" {
			return false, fmt.Errorf("checkpoint %d: %s", s.CheckpointID, behind)
		}
		st = s
		return true, nil
	})
	return st
}

// exportAll waits until an export of the job's state reads through, from a
// checkpoint whose offsets reach end on topic, and returns its entries by
// key and its header. Keys seen twice fail the test.
func (c *cluster) exportAll(t *testing.T, job, topic string, end map[int32]int64) (map[string]stateEntry, exportHeader) {
	t.Helper()
	var got map[string]stateEntry
	var h exportHeader
	c.waitFor(t, longTimeout, "an export of job "+job+"'s state that covers all input", func() (bool, error) {
		got = map[string]stateEntry{}
		var dup []string
		var err error
		h, err = c.exportState(c.api(t), job, func(e stateEntry) error {
			if _, ok := got[string(e.key)]; ok && len(dup) < 5 {
				dup = append(dup, fmt.Sprintf("%q", e.key))
			}
			got[string(e.key)] = e
			return nil
		})
		if err != nil {
			return false, err
		}
		if len(dup) > 0 {
			t.Fatalf("export of checkpoint %d lists keys twice: %s", h.CheckpointID, strings.Join(dup, ", "))
		}
		if behind := coversEnd(h.Offsets, topic, end); behind != "" {
			return false, fmt.Errorf("export of checkpoint %d: %s", h.CheckpointID, behind)
		}
		return true, nil
	})
	return got, h
}

// mapTasks returns the map tasks of a checkpoint view.
func (cp checkpointView) mapTasks() []checkpointTaskView {
	var out []checkpointTaskView
	for _, tv := range cp.Tasks {
		if tv.Kind == "map" {
			out = append(out, tv)
		}
	}
	return out
}

// stopWithSavepoint stops a job with a final savepoint (DELETE
// /v1/jobs/{id}?savepoint=true to the coordinator at addr) and returns the
// savepoint.
func (c *cluster) stopWithSavepoint(t *testing.T, addr, job string) savepointView {
	t.Helper()
	var out struct {
		ID        string        `json:"id"`
		Status    string        `json:"status"`
		Savepoint savepointView `json:"savepoint"`
	}
	client := *c.client
	client.Timeout = longTimeout
	if err := c.callWith(&client, "DELETE", addr, "/v1/jobs/"+job+"?savepoint=true", nil, &out); err != nil {
		t.Fatalf("stop job %s with a savepoint: %v", job, err)
	}
	if out.ID != job || out.Status != "cancelled" || out.Savepoint.ID == "" {
		t.Fatalf("stop job %s with a savepoint: answer %+v, want the job cancelled with a savepoint", job, out)
	}
	sp := out.Savepoint
	t.Logf("job %s stopped with savepoint %s: checkpoint %d, %d keys, %d bytes, at %s", job, sp.ID, sp.CheckpointID, sp.Keys, sp.StateBytes, sp.Location)
	return sp
}

// postJobFrom submits a job spec that starts from a savepoint (its id or
// its location URL) to the coordinator at addr and returns the new job's id
// or the API's error.
func (c *cluster) postJobFrom(addr string, spec jobSpec, savepoint string) (string, error) {
	body, err := json.Marshal(spec)
	if err != nil {
		return "", err
	}
	var created struct {
		ID string `json:"id"`
	}
	if err := c.call("POST", addr, "/v1/jobs?from_savepoint="+url.QueryEscape(savepoint), body, &created); err != nil {
		return "", err
	}
	if created.ID == "" {
		return "", errors.New("POST /v1/jobs: answer has no id")
	}
	return created.ID, nil
}

// follower returns a live coordinator that is not the leader.
func (c *cluster) follower(t *testing.T) *coordProc {
	t.Helper()
	leader := c.leader(t)
	for _, cp := range c.liveCoordinators() {
		if cp.id != leader {
			return cp
		}
	}
	t.Fatal("no live follower")
	return nil
}

// fileStorage is a checkpoint storage directory of the test's temp dir,
// shared by every process (file:// storage).
type fileStorage struct{ dir string }

func newFileStorage(t *testing.T) fileStorage {
	return fileStorage{dir: filepath.Join(t.TempDir(), "storage")}
}

// URL is the storage's file:// URL, as job specs and -checkpoint-storage take it.
func (s fileStorage) URL() string { return "file://" + s.dir }

// checkpointFiles returns the paths (relative to dir) of the files under
// checkpoints/<job>/chk-<id>/ in a storage or cache directory dir.
func checkpointFiles(t *testing.T, dir, job string, id uint64) []string {
	t.Helper()
	sub := filepath.Join("checkpoints", job, fmt.Sprintf("chk-%d", id))
	entries, err := os.ReadDir(filepath.Join(dir, sub))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() {
			out = append(out, filepath.Join(sub, e.Name()))
		}
	}
	return out
}

// corruptFile flips the bits of a few bytes in the middle of a file, keeping
// its size.
func corruptFile(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 {
		t.Fatalf("corrupt %s: empty file", path)
	}
	mid := len(b) / 2
	for i := max(0, mid-4); i < min(len(b), mid+4); i++ {
		b[i] ^= 0xff
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// smallDisk mounts a tmpfs of size bytes at dir (which must exist) for the
// rest of the test, as a small local disk; the test is skipped, with the
// reason, where mounts cannot be made (not root, no mount(8)). Anything
// already in dir is hidden until the unmount.
func smallDisk(t *testing.T, dir string, size int64) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("a small disk is a tmpfs mount, which needs root; the test runs as uid %d", os.Geteuid())
	}
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d,mode=0755", size), "tmpfs", dir).CombinedOutput()
	if err != nil {
		t.Skipf("cannot mount a tmpfs at %s here: %v: %s", dir, err, out)
	}
	t.Cleanup(func() {
		// Lazily: a process of the cluster may still hold files in it.
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("unmount %s: %v: %s", dir, err, out)
		}
	})
}

// fillDisk writes the file path until its file system is full and returns
// a function that removes it again.
func fillDisk(t *testing.T, path string) (free func()) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("fill %s: %v", path, err)
			}
			break
		}
	}
	if err := f.Close(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
	}
}
