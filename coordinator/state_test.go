package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/transport/storage"
)

// kgEntry is one int64 state entry of a test state file.
type kgEntry struct {
	kg    int32
	key   string
	value int64
}

// writeStateFile writes a full state file of int64 entries (in order) to w
// and returns its SHA-256 in hex.
func writeStateFile(t *testing.T, w io.Writer, entries ...kgEntry) string {
	t.Helper()
	fw, err := statefile.NewWriter(w, statefile.Full)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		var v [8]byte
		for i := range 8 {
			v[i] = byte(uint64(e.value) >> (56 - 8*i))
		}
		if err := fw.Add(e.kg, []byte(e.key), v[:]); err != nil {
			t.Fatal(err)
		}
	}
	sum, err := fw.Close()
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(sum.SHA256[:])
}

// applier applies commands to an FSM the way Raft would.
type applier struct {
	t     *testing.T
	f     *fsm.FSM
	index uint64
}

// oneMapTaskJob registers job with spec (one map task over 128 key groups,
// two sources) and deploys attempt 1 on one worker.
func oneMapTaskJob(t *testing.T, job string, spec fsm.JobSpec) *applier {
	t.Helper()
	a := &applier{t: t, f: fsm.New()}
	tasks := []fsm.Task{
		{ID: "source-0", Kind: fsm.TaskSource, Index: 0, Worker: "w1", Partitions: []int32{0}},
		{ID: "source-1", Kind: fsm.TaskSource, Index: 1, Worker: "w1", Partitions: []int32{}},
		{ID: "map-0", Kind: fsm.TaskMap, Index: 0, Worker: "w1", KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 128}},
	}
	now := time.Now().UnixNano()
	a.apply(fsm.CommandRegisterJob, fsm.RegisterJobCmd{ID: job, Spec: spec, Time: now})
	a.apply(fsm.CommandJobRestarted, fsm.JobRestartedCmd{JobID: job, Attempt: 1, Tasks: tasks, Time: now})
	return a
}

// completeWithFiles triggers and completes checkpoint id of job with the map
// task's state in files and offset id for partition 0.
func (a *applier) completeWithFiles(job string, id uint64, files ...fsm.StateFile) {
	a.t.Helper()
	now := time.Now().UnixNano()
	a.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: now})
	a.apply(fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{JobID: job, Attempt: 1, CheckpointID: id, Time: now, States: map[string]fsm.TaskState{
		"source-0": {TaskID: "source-0", Kind: fsm.TaskSource, Offsets: map[int32]int64{0: int64(id)}},
		"source-1": {TaskID: "source-1", Kind: fsm.TaskSource, Offsets: map[int32]int64{}},
		"map-0": {TaskID: "map-0", Kind: fsm.TaskMap, Files: files, Keys: 3, ValueEncoding: "bytes",
			KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 128}},
	}})
}

func (a *applier) apply(ct fsm.CommandType, cmd any) {
	a.t.Helper()
	data, err := fsm.Encode(ct, cmd)
	if err != nil {
		a.t.Fatal(err)
	}
	a.index++
	if _, err := fsm.Result(a.f.Apply(&raft.Log{Index: a.index, Type: raft.LogCommand, Data: data})); err != nil {
		a.t.Fatalf("apply %v: %v", ct, err)
	}
}

// TestStateAPIFromFiles serves a checkpoint whose map state is a chain of
// files in file:// checkpoint storage, with keys and values that are not
// UTF-8: the whole state, one key, and the NDJSON export agree, and a state
// over maxStateKeys keys is summarized instead of listed.
func TestStateAPIFromFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	url := "file://" + dir
	store, err := storage.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()

	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	spec.Checkpoint.Storage = url
	spec.Operator.Parallelism = 1
	spec.Operator.Name = "latest"
	const job = "latest-1"
	binKey := "\xff\xfekey"
	binVal := []byte{0x00, 0xff, 0x80}
	// A full file with a, b and the binary key, then a delta that changes a,
	// deletes b and adds c.
	var full, delta bytes.Buffer
	fw, _ := statefile.NewWriter(&full, statefile.Full)
	kgA, kgB := fsm.KeyGroup([]byte("a"), 128), fsm.KeyGroup([]byte("b"), 128)
	kgBin, kgC := fsm.KeyGroup([]byte(binKey), 128), fsm.KeyGroup([]byte("c"), 128)
	type e struct {
		kg  int32
		key string
		val []byte
	}
	entries := []e{{kgA, "a", []byte("1")}, {kgB, "b", []byte("2")}, {kgBin, binKey, binVal}}
	slices.SortFunc(entries, func(x, y e) int {
		if x.kg != y.kg {
			return int(x.kg - y.kg)
		}
		return strings.Compare(x.key, y.key)
	})
	for _, en := range entries {
		if err := fw.Add(en.kg, []byte(en.key), en.val); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	dw, _ := statefile.NewWriter(&delta, statefile.Delta)
	changes := []e{{kgA, "a", []byte("3")}, {kgB, "b", nil}, {kgC, "c", []byte(`x`)}}
	slices.SortFunc(changes, func(x, y e) int { return int(x.kg - y.kg) })
	for _, c := range changes {
		if c.val == nil {
			err = dw.Delete(c.kg, []byte(c.key))
		} else {
			err = dw.Add(c.kg, []byte(c.key), c.val)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dw.Close(); err != nil {
		t.Fatal(err)
	}
	var files []fsm.StateFile
	for i, b := range [][]byte{full.Bytes(), delta.Bytes()} {
		path := transport.CheckpointDir(job, 1) + []string{"map-0-a1-full.cfs", "map-0-a1-delta.cfs"}[i]
		h, err := store.Create(ctx, path, func(w io.Writer) error { _, err := w.Write(b); return err })
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, fsm.StateFile{Path: h.Path, Size: h.Size, SHA256: h.SHA256, Full: i == 0, KeyGroups: fsm.KeyGroupRange{Start: 0, End: 128}})
	}

	a := oneMapTaskJob(t, job, spec)
	a.completeWithFiles(job, 1, files...)

	s := &Server{cfg: Config{ID: "c1"}, logger: slog.New(slog.DiscardHandler), fsm: a.f, metrics: newMetrics(), stores: storage.NewPool()}
	s.state = &stateReader{stores: s.stores}
	defer s.stores.Close()
	h := s.newHTTPServer().Handler
	get := func(path string) (int, []byte) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec.Code, rec.Body.Bytes()
	}

	code, body := get("/v1/jobs/" + job + "/state")
	var st apiState
	if err := json.Unmarshal(body, &st); err != nil || code != http.StatusOK {
		t.Fatalf("GET state: %d %s %v", code, body, err)
	}
	binB64 := base64.StdEncoding.EncodeToString([]byte(binKey))
	if st.Keyed["a"] != "3" || st.Keyed["c"] != "x" || st.Keyed["b"] != nil || len(st.Keyed) != 2 || st.Offsets["words/0"] != 1 {
		t.Fatalf("state %s: want a=3, c=x, no b, offset 1", body)
	}
	if v, ok := st.KeyedBase64[binB64].(map[string]any); !ok || v["value_base64"] != base64.StdEncoding.EncodeToString(binVal) {
		t.Fatalf("state %s: want the binary key under keyed_base64 with its value in base64", body)
	}

	for _, q := range []string{"key=a", "key_base64=" + url2(binB64), "key=b"} {
		code, body := get("/v1/jobs/" + job + "/state?" + q)
		var ks apiKeyState
		if err := json.Unmarshal(body, &ks); err != nil || code != http.StatusOK {
			t.Fatalf("GET state?%s: %d %s %v", q, code, body, err)
		}
		switch q {
		case "key=a":
			if !ks.Found || ks.Value != "3" {
				t.Fatalf("key a: %s", body)
			}
		case "key=b":
			if ks.Found {
				t.Fatalf("deleted key b found: %s", body)
			}
		default:
			if !ks.Found || ks.KeyBase64 != binB64 || ks.ValueBase64 != base64.StdEncoding.EncodeToString(binVal) {
				t.Fatalf("binary key: %s", body)
			}
		}
	}

	code, body = get("/v1/jobs/" + job + "/state/export")
	if code != http.StatusOK {
		t.Fatalf("export: %d %s", code, body)
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	var lines []map[string]any
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("export line %q: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 4 || lines[0]["checkpoint_id"] != 1.0 {
		t.Fatalf("export has %d lines (%s), want a header and 3 keys", len(lines), body)
	}
	got := map[string]any{}
	for _, l := range lines[1:] {
		k, _ := l["key"].(string)
		if k == "" {
			k = "b64:" + l["key_base64"].(string)
		}
		v := l["value"]
		if v == nil {
			v = "b64:" + l["value_base64"].(string)
		}
		got[k] = v
	}
	want := map[string]any{"a": "3", "c": "x", "b64:" + binB64: "b64:" + base64.StdEncoding.EncodeToString(binVal)}
	if len(got) != len(want) || got["a"] != want["a"] || got["c"] != want["c"] || got["b64:"+binB64] != want["b64:"+binB64] {
		t.Fatalf("export keys %v, want %v", got, want)
	}

	// A missing file is an error naming the task, not an empty answer.
	if err := store.Delete(ctx, files[1].Path); err != nil {
		t.Fatal(err)
	}
	if code, body := get("/v1/jobs/" + job + "/state"); code != http.StatusInternalServerError || !strings.Contains(string(body), "map-0") {
		t.Fatalf("state with a missing file: %d %s, want 500 naming map-0", code, body)
	}
}

func url2(s string) string { return url.QueryEscape(s) }

// TestRenderValue shows each encoding, and base64 for what does not fit it.
func TestRenderValue(t *testing.T) {
	for _, c := range []struct {
		v        []byte
		enc      string
		want     any
		wantB64  bool
		describe string
	}{
		{[]byte{0, 0, 0, 0, 0, 0, 0, 42}, "int64", int64(42), false, "int64"},
		{[]byte{1, 2}, "int64", nil, true, "short int64"},
		{[]byte(`{"a":1}`), "json", json.RawMessage(`{"a":1}`), false, "json"},
		{[]byte(`{bad`), "json", nil, true, "bad json"},
		{[]byte("héllo"), "bytes", "héllo", false, "utf8"},
		{[]byte{0xff}, "bytes", nil, true, "binary"},
	} {
		got, b64 := renderValue(c.v, c.enc)
		if (b64 != "") != c.wantB64 {
			t.Errorf("%s: base64 %q", c.describe, b64)
		}
		if gb, ok := got.(json.RawMessage); ok {
			if string(gb) != string(c.want.(json.RawMessage)) {
				t.Errorf("%s: %s", c.describe, gb)
			}
		} else if got != c.want {
			t.Errorf("%s: got %v, want %v", c.describe, got, c.want)
		}
	}
}

// TestGarbageCollection: the collector deletes exactly the files of
// checkpoints at or below the newest completed one that no retained
// checkpoint references, once they have been so for gcGrace, and never a
// file of a newer checkpoint, which may still be being written.
func TestGarbageCollection(t *testing.T) {
	ctx := context.Background()
	fx := newGCFixture(t)
	store, url, put, a := fx.store, fx.url, fx.put, fx.a
	const job = gcJob
	dir := func(id uint64) string { return transport.CheckpointDir(job, id) }

	complete := func(id uint64, files ...fsm.StateFile) { a.completeWithFiles(job, id, files...) }
	full1 := put(dir(1) + "map-0-a1-full.cfs")
	full1.Full = true
	complete(1, full1)
	delta2 := put(dir(2) + "map-0-a1-delta.cfs")
	complete(2, full1, delta2)
	orphan3 := put(dir(3) + "map-0-a1-full.cfs") // checkpoint 3 aborted after the upload
	now := time.Now().UnixNano()
	a.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: now})
	a.apply(fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{JobID: job, CheckpointID: 3, Reason: "timeout", Time: now})
	full4 := put(dir(4) + "map-0-a1-full.cfs")
	full4.Full = true
	complete(4, full4)                        // retained: 2 and 4; 1's full file stays, 2 references it
	dead := put(dir(4) + "map-0-a0-full.cfs") // a dead attempt's upload
	inFlight := put(dir(5) + "map-0-a1-delta.cfs")
	foreign := put("checkpoints/other-job/chk-1/map-0-a1-full.cfs")
	// What fileblob leaves of uploads a killed worker never finished: one
	// of checkpoint 4, which completed without it, and one of the pending
	// checkpoint 5, whose upload may still be going on.
	partial := func(path string) string {
		t.Helper()
		p := path + ".18f3a2b4c5d6e7f8.tmp"
		full := filepath.Join(strings.TrimPrefix(url, "file://"), filepath.FromSlash(p))
		if err := os.WriteFile(full, []byte("part"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	partial4 := partial(dir(4) + "map-1-a1-full.cfs")
	partial5 := partial(dir(5) + "map-1-a1-delta.cfs")
	partials := func() []string {
		var left []string
		if err := store.ListPartial(ctx, "", func(p, _ string, _ int64, _ time.Time) error { left = append(left, p); return nil }); err != nil {
			t.Fatal(err)
		}
		slices.Sort(left)
		return left
	}

	c := newCollector(storage.NewPool(), a.f.Job, func(string) bool { return false }, slog.New(slog.DiscardHandler), newMetrics())
	defer c.stores.Close()
	clock := time.Unix(1_700_000_000, 0)
	c.now = func() time.Time { return clock }
	listAll := func() []string {
		var left []string
		if err := store.List(ctx, "", func(p string, _ int64, _ time.Time) error { left = append(left, p); return nil }); err != nil {
			t.Fatal(err)
		}
		slices.Sort(left)
		return left
	}
	// The first run finds the unreferenced files and keeps them: a reader
	// of a checkpoint just dropped may still need them.
	all := listAll()
	if n, err := c.run(ctx, job); err != nil || n != 0 {
		t.Fatalf("first run deleted %d (%v), want none within the grace", n, err)
	}
	clock = clock.Add(gcGrace - time.Second)
	if n, err := c.run(ctx, job); err != nil || n != 0 || !slices.Equal(listAll(), all) {
		t.Fatalf("run within the grace deleted %d (%v)", n, err)
	}
	clock = clock.Add(time.Second)
	n, err := c.run(ctx, job)
	if err != nil {
		t.Fatal(err)
	}
	left := listAll()
	want := []string{foreign.Path, full1.Path, delta2.Path, full4.Path, inFlight.Path}
	slices.Sort(want)
	if n != 3 || !slices.Equal(left, want) {
		t.Fatalf("deleted %d, left %v; want the orphan %s, the dead attempt's %s and the partial %s deleted, leaving %v", n, left, orphan3.Path, dead.Path, partial4, want)
	}
	if got := partials(); !slices.Equal(got, []string{partial5}) {
		t.Fatalf("partial files left: %v; want only the pending checkpoint's %s (%s collected)", got, partial5, partial4)
	}
}

// TestGarbageCollectionOfAbortedCheckpoints: a job whose checkpoints keep
// aborting, none completed, does not keep their files: the collector
// deletes those of every checkpoint and savepoint that is over (issued and
// not pending), partial files included, once unreferenced for gcGrace, and
// keeps the pending checkpoint's and those of an id not issued yet, which a
// leader's pipelined trigger may be writing.
func TestGarbageCollectionOfAbortedCheckpoints(t *testing.T) {
	fx := newGCFixture(t)
	put, a := fx.put, fx.a
	const job = gcJob
	dir := func(id uint64) string { return transport.CheckpointDir(job, id) }
	now := time.Now().UnixNano()
	trigger := func(savepoint bool) {
		a.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: now, Savepoint: savepoint})
	}
	abort := func(id uint64) {
		a.apply(fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{JobID: job, CheckpointID: id, Reason: "timeout", Time: now})
	}
	trigger(false)
	aborted1 := put(dir(1) + "map-0-a1-full.cfs")
	abort(1)
	trigger(false)
	aborted2 := put(dir(2) + "map-0-a1-full.cfs")
	partial2 := dir(2) + "map-1-a1-full.cfs.0a1b2c3d4e5f.tmp"
	if err := os.WriteFile(filepath.Join(fx.root, filepath.FromSlash(partial2)), []byte("part"), 0o644); err != nil {
		t.Fatal(err)
	}
	abort(2)
	trigger(true)
	abortedSavepoint := put(transport.SavepointDir(job, 3) + "map-0-a1-full.cfs")
	abort(3)
	trigger(false)
	pending := put(dir(4) + "map-0-a1-full.cfs")
	notIssued := put(dir(5) + "map-0-a1-full.cfs")
	if j, _ := a.f.Job(job); len(j.Completed) != 0 || j.Pending == nil || j.Pending.ID != 4 {
		t.Fatalf("job has %d completed checkpoints and pending %v, want none and 4", len(j.Completed), j.Pending)
	}

	c, clock := fx.collector(func(string) bool { return false })
	files := fx.files
	n := fx.collectPastGrace(c, clock, job)
	want := []string{pending.Path, notIssued.Path}
	slices.Sort(want)
	if left := files(); n != 4 || !slices.Equal(left, want) {
		t.Fatalf("deleted %d, left %v; want %s, %s, %s and %s deleted, leaving %v",
			n, left, aborted1.Path, aborted2.Path, partial2, abortedSavepoint.Path, want)
	}
}

// TestGarbageCollectionOfSavepoints: the collector deletes the files of a
// savepoint that never completed (aborted after its upload, a partial file
// included) once they have been unreferenced for gcGrace, and never those
// of a savepoint the cluster keeps, of one still pending, or of another job.
func TestGarbageCollectionOfSavepoints(t *testing.T) {
	fx := newGCFixture(t)
	url, put, a := fx.url, fx.put, fx.a
	const job = gcJob
	states := func(id uint64, files ...fsm.StateFile) map[string]fsm.TaskState {
		return map[string]fsm.TaskState{
			"source-0": {TaskID: "source-0", Kind: fsm.TaskSource, Offsets: map[int32]int64{0: int64(id)}},
			"source-1": {TaskID: "source-1", Kind: fsm.TaskSource, Offsets: map[int32]int64{}},
			"map-0": {TaskID: "map-0", Kind: fsm.TaskMap, Files: files, Keys: 3, ValueEncoding: "bytes",
				KeyGroups: &fsm.KeyGroupRange{Start: 0, End: 128}},
		}
	}
	now := time.Now().UnixNano()
	savepoint := func() { // triggers the next id as a savepoint
		a.apply(fsm.CommandCheckpointTriggered, fsm.CheckpointTriggeredCmd{JobID: job, Attempt: 1, Time: now, Savepoint: true})
	}

	// Savepoint 1 completes and is kept.
	savepoint()
	kept := put(transport.SavepointDir(job, 1) + "map-0-a1-full.cfs")
	rel := kept
	rel.Path, rel.Full = strings.TrimPrefix(kept.Path, transport.SavepointDir(job, 1)), true
	a.apply(fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{JobID: job, Attempt: 1, CheckpointID: 1, Time: now,
		States: states(1, rel), Location: url + "/" + transport.SavepointDir(job, 1)})
	meta := put(transport.SavepointDir(job, 1) + transport.SavepointMetadata)
	// Savepoint 2 is aborted after its upload, and after part of another.
	savepoint()
	aborted := put(transport.SavepointDir(job, 2) + "map-0-a1-full.cfs")
	partial := transport.SavepointDir(job, 2) + "map-1-a1-full.cfs.0a1b2c3d4e5f.tmp"
	if err := os.WriteFile(filepath.Join(fx.root, filepath.FromSlash(partial)), []byte("part"), 0o644); err != nil {
		t.Fatal(err)
	}
	a.apply(fsm.CommandCheckpointAborted, fsm.CheckpointAbortedCmd{JobID: job, CheckpointID: 2, Reason: "timeout", Time: now})
	full3 := put(transport.CheckpointDir(job, 3) + "map-0-a1-full.cfs")
	full3.Full = true
	a.completeWithFiles(job, 3, full3)
	// Savepoint 4 is pending: its files may still be being written.
	savepoint()
	pending := put(transport.SavepointDir(job, 4) + "map-0-a1-full.cfs")
	foreign := put(transport.SavepointDir("other-job", 2) + "map-0-a1-full.cfs")

	c, clock := fx.collector(func(id string) bool {
		_, ok := a.f.Savepoint(id)
		return ok
	})
	files := fx.files
	n := fx.collectPastGrace(c, clock, job)
	want := []string{kept.Path, meta.Path, pending.Path, foreign.Path, transport.CheckpointDir(job, 3) + "map-0-a1-full.cfs"}
	slices.Sort(want)
	if left := files(); n != 2 || !slices.Equal(left, want) {
		t.Fatalf("deleted %d, left %v; want the aborted savepoint's %s and %s deleted, leaving %v", n, left, aborted.Path, partial, want)
	}
}

// gcJob is the job of a gcFixture.
const gcJob = "j"

// gcFixture is a file:// checkpoint storage in a directory of the test's and
// job gcJob, of one map task, keeping its state there and retaining two
// checkpoints: what the collector's tests collect in.
// collector returns a collector of the fixture's job, kept telling which
// savepoints the cluster keeps, and the clock it reads, for the test to
// move.
func (fx *gcFixture) collector(kept func(string) bool) (*collector, *time.Time) {
	c := newCollector(storage.NewPool(), fx.a.f.Job, kept, slog.New(slog.DiscardHandler), newMetrics())
	fx.t.Cleanup(func() { c.stores.Close() })
	clock := time.Unix(1_700_000_000, 0)
	c.now = func() time.Time { return clock }
	return c, &clock
}

// collectPastGrace runs c on job twice: first, which must delete nothing
// (unreferenced files are kept for gcGrace), and after gcGrace, whose
// deletions it returns.
func (fx *gcFixture) collectPastGrace(c *collector, clock *time.Time, job string) int {
	fx.t.Helper()
	ctx := context.Background()
	all := fx.files()
	if n, err := c.run(ctx, job); err != nil || n != 0 || !slices.Equal(fx.files(), all) {
		fx.t.Fatalf("first run deleted %d (%v), want none within the grace", n, err)
	}
	*clock = clock.Add(gcGrace)
	n, err := c.run(ctx, job)
	if err != nil {
		fx.t.Fatal(err)
	}
	return n
}

// files lists every file of the store, partial uploads included, sorted.
func (fx *gcFixture) files() []string {
	fx.t.Helper()
	ctx := context.Background()
	var left []string
	err := fx.store.List(ctx, "", func(p string, _ int64, _ time.Time) error { left = append(left, p); return nil })
	if err == nil {
		err = fx.store.ListPartial(ctx, "", func(p, _ string, _ int64, _ time.Time) error { left = append(left, p); return nil })
	}
	if err != nil {
		fx.t.Fatal(err)
	}
	slices.Sort(left)
	return left
}

type gcFixture struct {
	root, url string
	store     *storage.Store
	a         *applier
	t         *testing.T
}

func newGCFixture(t *testing.T) *gcFixture {
	t.Helper()
	fx := &gcFixture{root: t.TempDir(), t: t}
	fx.url = "file://" + fx.root
	store, err := storage.Open(context.Background(), fx.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	fx.store = store
	spec, err := fsm.ParseJobSpec([]byte(wordcountSpec), nil)
	if err != nil {
		t.Fatal(err)
	}
	spec.Checkpoint.Storage, spec.Checkpoint.Retained = fx.url, 2
	spec.Operator.Parallelism = 1
	fx.a = oneMapTaskJob(t, gcJob, spec)
	return fx
}

// put writes a file holding its own path at path and returns its handle, a
// delta of every key group.
func (fx *gcFixture) put(path string) fsm.StateFile {
	fx.t.Helper()
	h, err := fx.store.Create(context.Background(), path, func(w io.Writer) error { _, err := w.Write([]byte(path)); return err })
	if err != nil {
		fx.t.Fatal(err)
	}
	return fsm.StateFile{Path: h.Path, Size: h.Size, SHA256: h.SHA256, KeyGroups: fsm.KeyGroupRange{Start: 0, End: 128}}
}

// TestStateDocumentAlwaysHasKeyed: GET /v1/jobs/{id}/state has "keyed"
// (design.md's contract), {} for a state without keys, unless the keys
// are too many for one document and keyed_omitted says so.
func TestStateDocumentAlwaysHasKeyed(t *testing.T) {
	for _, tc := range []struct {
		v    apiState
		want string
		not  string
	}{
		{apiState{Keyed: map[string]any{}}, `"keyed":{}`, "keyed_omitted"},
		{apiState{Keyed: map[string]any{"a": 1}}, `"keyed":{"a":1}`, "keyed_omitted"},
		{apiState{KeyedOmitted: "too many"}, `"keyed_omitted":"too many"`, `"keyed":`},
	} {
		b, err := json.Marshal(tc.v)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), tc.want) || strings.Contains(string(b), tc.not) {
			t.Errorf("%s: want %s and no %s", b, tc.want, tc.not)
		}
	}
}
