package worker

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOwnStateDirGoesWithWorker checks that a worker given no StateDir
// removes the directory it made for one when it stops, and when New fails
// after making it (workerd without -data-dir left one behind per run), while
// a directory it was given stays.
func TestOwnStateDirGoesWithWorker(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where os.MkdirTemp, and so the worker, makes it
	made := func() []string {
		t.Helper()
		entries, err := os.ReadDir(tmp)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "coordflow-worker-") {
				names = append(names, e.Name())
			}
		}
		return names
	}
	f := newFakeCoord(t, true, "")

	w, stop := startStoppableWorker(t, "w1", f, func(c *Config) { c.StateDir = "" })
	dir := filepath.Dir(w.cfg.StateDir)
	if got := made(); len(got) != 1 || filepath.Join(tmp, got[0]) != dir {
		t.Fatalf("worker dirs under TMPDIR: %q, want only the worker's state dir's parent %s", got, dir)
	}
	// What a map task's local recovery leaves in it.
	if err := os.MkdirAll(filepath.Join(w.cfg.StateDir, "cache"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.cfg.StateDir, "cache", "state-1"), []byte("state"), 0o644); err != nil {
		t.Fatal(err)
	}
	stop()
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("state dir %s after the worker stopped: %v, want it gone", dir, err)
	}

	cfg := DefaultConfig()
	cfg.ID, cfg.DataAddr, cfg.GossipAddr = "w2", "0.0.0.0:0", "127.0.0.1:0"
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "must name a host") {
		t.Fatalf("New with an unspecified data addr: %v, want an error naming the host", err)
	}
	if got := made(); len(got) != 0 {
		t.Fatalf("worker dirs under TMPDIR after a failed New: %q, want none", got)
	}

	given := t.TempDir()
	w, stop = startStoppableWorker(t, "w3", f, func(c *Config) { c.StateDir = given })
	if w.cfg.StateDir != given {
		t.Fatalf("state dir %s, want the one given, %s", w.cfg.StateDir, given)
	}
	stop()
	if _, err := os.Stat(given); err != nil {
		t.Fatalf("given state dir after the worker stopped: %v, want it kept", err)
	}
	// The stopped worker let go of its lock: a new one takes the directory.
	_, stop = startStoppableWorker(t, "w4", f, func(c *Config) { c.StateDir = given })
	stop()
}
