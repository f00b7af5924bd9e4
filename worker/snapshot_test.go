package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/transport/storage"
	"github.com/coordflow/coordflow/worker/operator"
)

// fileEnv is unitEnv with file:// checkpoint storage and a state directory.
func fileEnv(t *testing.T) (*taskEnv, chan *transport.WorkerMessage, string) {
	env, sent := unitEnv(t)
	env.cfg.StateDir = t.TempDir()
	env.stores = storage.NewPool()
	t.Cleanup(func() { env.stores.Close() })
	return env, sent, "file://" + t.TempDir()
}

// barrierAfter is a barrier that names the job's newest completed checkpoint.
func barrierAfter(id, lastCompleted uint64) *transport.DataMessage {
	return &transport.DataMessage{Payload: &transport.DataMessage_Barrier{Barrier: &transport.Barrier{CheckpointId: id, LastCompleted: lastCompleted}}}
}

// readChain merges a chain of state files from storage into key -> int64.
func readChain(t *testing.T, url string, files []*transport.StateFile) map[string]int64 {
	t.Helper()
	store, err := storage.Open(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	src := &restoreSource{store: store}
	var sources []statefile.Source
	for _, f := range files {
		rd, release, err := src.open(context.Background(), f)
		if err != nil {
			t.Fatalf("open %s: %v", f.GetPath(), err)
		}
		defer release()
		sources = append(sources, rd)
	}
	out := map[string]int64{}
	err = statefile.Merge(sources, 0, statefile.MaxKeyGroups, func(_ int32, k, v []byte) error {
		n, err := operator.DecodeInt64(v)
		out[string(k)] = n
		return err
	})
	if err != nil {
		t.Fatalf("merge chain: %v", err)
	}
	return out
}

// deltaKeys returns the keys a delta file holds (values and tombstones).
func deltaKeys(t *testing.T, url string, f *transport.StateFile) []string {
	t.Helper()
	store, err := storage.Open(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	rd, release, err := (&restoreSource{store: store}).open(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	var keys []string
	err = rd.Range(0, statefile.MaxKeyGroups, func(_ int32, k, _ []byte, _ bool) error {
		keys = append(keys, string(k))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sortedKeys(keys...)
}

// TestIncrementalCheckpoints runs a map task on each backend with file
// storage: the first snapshot is a full file, later ones are deltas of the
// keys changed since the newest completed checkpoint (including those of an
// aborted one in between), and a restore from the chain gives back the state
// exactly, from the local copies the task wrote.
func TestIncrementalCheckpoints(t *testing.T) {
	for _, backend := range []string{"memory", "disk"} {
		t.Run(backend, func(t *testing.T) {
			env, sent, url := fileEnv(t)
			refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
			d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
			d.State = &transport.StateSpec{Backend: backend, Storage: url, InlineThreshold: 64}
			ctl := make(chan control, 4)
			mt := runMapTaskCtl(t, env, d, ctl)
			lc, err := mt.attachLocal(0, 1)
			if err != nil {
				t.Fatal(err)
			}
			var keys []string
			for i := range 200 {
				keys = append(keys, fmt.Sprintf("key-%03d", i))
			}
			want := map[string]int64{}
			feed := func(ks ...string) {
				send(t, lc, batchMsg(128, ks...))
				for _, k := range ks {
					want[k]++
				}
			}
			ack := func(id, last uint64) *transport.TaskState {
				t.Helper()
				send(t, lc, barrierAfter(id, last))
				m := awaitSent(t, sent)
				if m.GetAck().GetCheckpointId() != id {
					t.Fatalf("got %v, want the ack of checkpoint %d", m, id)
				}
				return m.GetAck().GetState()
			}

			feed(keys...)
			st1 := ack(1, 0)
			if len(st1.GetFiles()) != 1 || !st1.GetFiles()[0].GetFull() || len(st1.GetKeyed()) != 0 || st1.GetKeys() != 200 {
				t.Fatalf("snapshot 1 = %v, want one full file of 200 keys", st1)
			}
			if got := readChain(t, url, st1.GetFiles()); !reflect.DeepEqual(got, want) {
				t.Fatalf("snapshot 1 holds %d keys, want %d", len(got), len(want))
			}
			ctl <- control{complete: 1}

			feed("key-001", "key-002", "new-1")
			st2 := ack(2, 1)
			if f := st2.GetFiles(); len(f) != 2 || f[0].GetPath() != st1.GetFiles()[0].GetPath() || f[1].GetFull() {
				t.Fatalf("snapshot 2 files %v, want the full file of 1 and a delta", f)
			}
			if got := deltaKeys(t, url, st2.GetFiles()[1]); !reflect.DeepEqual(got, sortedKeys("key-001", "key-002", "new-1")) {
				t.Fatalf("delta 2 holds %v, want only the changed keys", got)
			}
			// Checkpoint 2 is never completed (aborted); 3 builds on 1 again
			// and so carries the changes of 2 as well.
			feed("key-003", "new-2")
			st3 := ack(3, 1)
			if f := st3.GetFiles(); len(f) != 2 || f[0].GetPath() != st1.GetFiles()[0].GetPath() {
				t.Fatalf("snapshot 3 files %v, want the full file of 1 and one delta", f)
			}
			if got := deltaKeys(t, url, st3.GetFiles()[1]); !reflect.DeepEqual(got, sortedKeys("key-001", "key-002", "key-003", "new-1", "new-2")) {
				t.Fatalf("delta 3 holds %v, want the changes since checkpoint 1", got)
			}
			if got := readChain(t, url, st3.GetFiles()); !reflect.DeepEqual(got, want) {
				t.Fatalf("chain 3 holds %d keys, want %d", len(got), len(want))
			}
			if st3.GetKeys() != int64(len(want)) {
				t.Fatalf("snapshot 3 counts %d keys, want %d", st3.GetKeys(), len(want))
			}

			// Restore from chain 3 into attempt 2 on this worker: the local
			// copies are used, and the next snapshot goes on from the chain.
			d2 := mapDeploy("job", 2, operator.Count, 1, 128, refs, 0)
			d2.State = d.State
			d2.RestoreCheckpointId = 3
			d2.RestoreKeyed = []*transport.KeyedBlob{{TaskId: "map-0", Files: st3.GetFiles(), KeyGroupStart: 0, KeyGroupEnd: 128}}
			mt2 := runMapTaskCtl(t, env, d2, make(chan control, 1))
			lc2, err := mt2.attachLocal(0, 1)
			if err != nil {
				t.Fatal(err)
			}
			if mt2.restoredLocal != 2 || mt2.keyed.keys != int64(len(want)) {
				t.Fatalf("restore read %d files locally and %d keys, want 2 and %d", mt2.restoredLocal, mt2.keyed.keys, len(want))
			}
			if note := mt2.runningNote(); !strings.Contains(note, "restored checkpoint 3 locally") {
				t.Fatalf("running note %q does not say the restore was local", note)
			}
			send(t, lc2, batchMsg(128, "key-004"))
			want["key-004"]++
			send(t, lc2, barrierAfter(4, 3))
			st4 := awaitSent(t, sent).GetAck().GetState()
			if f := st4.GetFiles(); len(f) != 3 || f[1].GetPath() != st3.GetFiles()[1].GetPath() {
				t.Fatalf("snapshot 4 files %v, want chain 3 and one more delta", f)
			}
			if got := readChain(t, url, st4.GetFiles()); !reflect.DeepEqual(got, want) {
				t.Fatalf("chain 4 holds %v keys, want %d", len(got), len(want))
			}
		})
	}
}

func sortedKeys(ks ...string) []string {
	return slices.Sorted(slices.Values(ks))
}

// TestSmallStateStaysInline: below the inline threshold the state goes in
// the ack, and without storage it always does.
func TestSmallStateStaysInline(t *testing.T) {
	env, sent, url := fileEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	d.State = &transport.StateSpec{Backend: "memory", Storage: url, InlineThreshold: 16 << 10}
	mt := runMapTask(t, env, d)
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, lc, batchMsg(128, "a", "b", "a"))
	send(t, lc, barrierAfter(1, 0))
	st := awaitSent(t, sent).GetAck().GetState()
	if len(st.GetFiles()) != 0 {
		t.Fatalf("small state written to %d files, want inline", len(st.GetFiles()))
	}
	if got, _ := decodeKeyed(t, st); !maps.Equal(got, map[string]int64{"a": 2, "b": 1}) {
		t.Fatalf("inline state %v", got)
	}
}

// TestStorageUnreachableDeclines: a snapshot that cannot be written is
// declined with the reason, and the task keeps running.
func TestStorageUnreachableDeclines(t *testing.T) {
	env, sent, _ := fileEnv(t)
	blocked := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(blocked, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	// A file where the storage directory should be: every write fails.
	d.State = &transport.StateSpec{Backend: "memory", Storage: "file://" + blocked, InlineThreshold: 1}
	env.cfg.StateDir = ""
	mt, err := newMapTask(env, d, make(chan control), nopRegistry{}, env.logger)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	running := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- mt.run(ctx, func() { close(running) }) }()
	select {
	case <-running:
	case err := <-done:
		// Opening storage on a file may already fail: that is a clear
		// task failure naming the storage, which is fine too.
		if err == nil || !strings.Contains(err.Error(), "checkpoint storage") {
			t.Fatalf("run: %v, want an error naming the checkpoint storage", err)
		}
		return
	}
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	send(t, lc, batchMsg(128, "a", "b"))
	send(t, lc, barrierAfter(1, 0))
	dec := awaitSent(t, sent).GetDecline()
	if dec.GetCheckpointId() != 1 || !strings.Contains(dec.GetReason(), "write state file") {
		t.Fatalf("got decline %v, want checkpoint 1 declined naming the write", dec)
	}
	cancel()
	<-done
}

// TestChainCompaction: once the deltas of a chain weigh as much as its full
// file, the next snapshot is full again, so restores read a bounded chain.
func TestChainCompaction(t *testing.T) {
	env, sent, url := fileEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	d.State = &transport.StateSpec{Backend: "memory", Storage: url, InlineThreshold: 1}
	mt := runMapTask(t, env, d)
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for i := range 100 {
		keys = append(keys, fmt.Sprintf("key-%03d", i))
	}
	want := map[string]int64{}
	var last uint64
	snap := func() *transport.TaskState {
		t.Helper()
		send(t, lc, batchMsg(128, keys...))
		for _, k := range keys {
			want[k]++
		}
		send(t, lc, barrierAfter(last+1, last))
		st := awaitSent(t, sent).GetAck().GetState()
		last++
		return st
	}
	// Every snapshot changes every key: the first delta is as large as the
	// full file, so the one after it starts a new chain.
	shapes := []string{}
	for range 4 {
		st := snap()
		shape := ""
		for _, f := range st.GetFiles() {
			if f.GetFull() {
				shape += "F"
			} else {
				shape += "d"
			}
		}
		shapes = append(shapes, shape)
		if got := readChain(t, url, st.GetFiles()); !reflect.DeepEqual(got, want) {
			t.Fatalf("snapshot %d (%s) holds %d keys, want %d", last, shape, len(got), len(want))
		}
	}
	if !reflect.DeepEqual(shapes, []string{"F", "Fd", "F", "Fd"}) {
		t.Fatalf("chains %v, want a full file again once the delta outweighs it", shapes)
	}
}

// TestDeltaCompaction: small changes grow a chain of deltas up to
// maxChainDeltas; the next snapshot writes one delta in place of them all
// (every key they changed, as of now), on the same full file.
func TestDeltaCompaction(t *testing.T) {
	env, sent, url := fileEnv(t)
	refs := []*transport.MapTaskRef{{TaskId: "map-0", KeyGroupStart: 0, KeyGroupEnd: 128}}
	d := mapDeploy("job", 1, operator.Count, 1, 128, refs, 0)
	d.State = &transport.StateSpec{Backend: "disk", Storage: url, InlineThreshold: 1}
	mt := runMapTask(t, env, d)
	lc, err := mt.attachLocal(0, 1)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{}
	feed := func(ks ...string) {
		send(t, lc, batchMsg(128, ks...))
		for _, k := range ks {
			want[k]++
		}
	}
	var all []string
	for i := range 1000 {
		all = append(all, fmt.Sprintf("key-%04d", i))
	}
	feed(all...)
	var last uint64
	var st *transport.TaskState
	for i := range maxChainDeltas + 2 {
		if i > 0 {
			feed(fmt.Sprintf("key-%04d", i), fmt.Sprintf("new-%d", i))
		}
		send(t, lc, barrierAfter(last+1, last))
		st = awaitSent(t, sent).GetAck().GetState()
		last++
		files := st.GetFiles()
		switch {
		case i == 0 && (len(files) != 1 || !files[0].GetFull()):
			t.Fatalf("snapshot 1: %v, want one full file", files)
		case i > 0 && i <= maxChainDeltas && len(files) != 1+i:
			t.Fatalf("snapshot %d: %d files, want the full file and %d deltas", last, len(files), i)
		case i == maxChainDeltas+1 && (len(files) != 2 || !files[0].GetFull() || files[1].GetFull()):
			t.Fatalf("snapshot %d: %d files, want the full file and one compacted delta", last, len(files))
		}
		if got := readChain(t, url, files); !reflect.DeepEqual(got, want) {
			t.Fatalf("snapshot %d holds %d keys, want %d", last, len(got), len(want))
		}
	}
	// The compacted delta holds every key the replaced deltas held.
	var changed []string
	for i := 1; i <= maxChainDeltas+1; i++ {
		changed = append(changed, fmt.Sprintf("key-%04d", i), fmt.Sprintf("new-%d", i))
	}
	if got := deltaKeys(t, url, st.GetFiles()[1]); !reflect.DeepEqual(got, sortedKeys(changed...)) {
		t.Fatalf("compacted delta holds %v, want %v", got, sortedKeys(changed...))
	}
}

// TestRestoreSourceCondemnsOnlyWhatTheFileSays: opening a state file for a
// restore is a corrupt-state failure (the leader falls back to an older
// checkpoint) when the file is missing, shorter than recorded or its
// content is wrong, and an
// ordinary failure (the same checkpoint is tried again) when the storage
// fails to answer: a fallback then would have the sink write again output
// it committed after the older checkpoint.
func TestRestoreSourceCondemnsOnlyWhatTheFileSays(t *testing.T) {
	if _, err := os.Stat("/proc/self/mem"); err != nil {
		t.Skipf("no /proc/self/mem to fail reads with: %v", err)
	}
	dir := t.TempDir()
	store, err := storage.Open(context.Background(), "file://"+dir)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := os.WriteFile(filepath.Join(dir, "garbage"), bytes.Repeat([]byte{7}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	// A file whose reads fail (EIO), as those of a storage that does not
	// answer do, whatever the process may read.
	if err := os.Symlink("/proc/self/mem", filepath.Join(dir, "unreadable")); err != nil {
		t.Fatal(err)
	}
	// A file shorter than recorded (truncated): a 4096-byte one read as
	// 8192 bytes.
	src := &restoreSource{store: store}
	for _, tc := range []struct {
		path    string
		size    int64
		corrupt bool
	}{
		{"missing", 4096, true},
		{"garbage", 4096, true},
		{"garbage", 8192, true},
		{"unreadable", 4096, false},
	} {
		_, _, err := src.open(context.Background(), &transport.StateFile{Path: tc.path, Size: tc.size})
		if err == nil {
			t.Fatalf("open %s of %d bytes: no error", tc.path, tc.size)
		}
		if errors.Is(err, errStateCorrupt) != tc.corrupt {
			t.Errorf("open %s of %d bytes: %v; corrupt %v, want %v", tc.path, tc.size, err, errors.Is(err, errStateCorrupt), tc.corrupt)
		}
	}
}
