package worker

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestLocalCacheSweepsWhatNoTaskHolds: the local copies of state files that
// no running map task holds are removed once they have been neither
// written nor released by a task for cacheKeep; held copies stay, and so do
// young ones and those a task released lately (a restart on this worker
// reads them); directories left empty go too.
func TestLocalCacheSweepsWhatNoTaskHolds(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	old := now.Add(-time.Hour)
	write := func(rel string, mtime time.Time) {
		t.Helper()
		p := filepath.Join(dir, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("state"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	write("checkpoints/j1/3/map-0-a1.sst", old)  // held by a running task
	write("checkpoints/j1/4/map-0-a1.sst", now)  // written lately
	write("checkpoints/j2/7/map-1-a1.sst", old)  // of a task that ended lately
	write("checkpoints/j3/9/map-0-a2.sst", old)  // nobody's: a cancelled job's
	write("checkpoints/j3/10/map-0-a2.sst", old) // nobody's either
	for _, d := range []string{"checkpoints/j3/9", "checkpoints/j3/10", "checkpoints/j3"} {
		if err := os.Chtimes(filepath.Join(dir, d), old, old); err != nil {
			t.Fatal(err)
		}
	}

	c := newLocalCache(dir)
	c.now = func() time.Time { return now }
	c.hold(taskKey{job: "j1", attempt: 1, id: "map-0"}, []string{"checkpoints/j1/3/map-0-a1.sst"})
	ended := taskKey{job: "j2", attempt: 1, id: "map-1"}
	c.hold(ended, []string{"checkpoints/j2/7/map-1-a1.sst"})
	c.release(ended)

	exists := func(rel string) bool {
		_, err := os.Stat(filepath.Join(dir, filepath.FromSlash(rel)))
		return err == nil
	}
	n, err := c.sweep(now, cacheKeep)
	if err != nil || n != 2 {
		t.Fatalf("first sweep: removed %d (%v), want the 2 copies nobody holds", n, err)
	}
	for rel, want := range map[string]bool{
		"checkpoints/j1/3/map-0-a1.sst":  true,
		"checkpoints/j1/4/map-0-a1.sst":  true,
		"checkpoints/j2/7/map-1-a1.sst":  true,
		"checkpoints/j3/9/map-0-a2.sst":  false,
		"checkpoints/j3/10/map-0-a2.sst": false,
	} {
		if exists(rel) != want {
			t.Errorf("after the first sweep: %s exists %v, want %v", rel, !want, want)
		}
	}

	// Later: the ended task's copies go, the held one stays.
	later := now.Add(cacheKeep + time.Second)
	if n, err := c.sweep(later, cacheKeep); err != nil || n != 2 {
		t.Fatalf("second sweep: removed %d (%v), want the ended task's copy and the one written then", n, err)
	}
	if !exists("checkpoints/j1/3/map-0-a1.sst") || exists("checkpoints/j2/7/map-1-a1.sst") || exists("checkpoints/j1/4/map-0-a1.sst") {
		t.Fatal("after the second sweep: want only the held copy left")
	}
	if n, err := c.sweep(later.Add(cacheKeep), cacheKeep); err != nil || n != 0 {
		t.Fatalf("third sweep: removed %d (%v)", n, err)
	}
	if exists("checkpoints/j3") || exists("checkpoints/j2") {
		t.Error("directories left empty long enough are still there")
	}
	if !exists("checkpoints/j1/3") {
		t.Error("the held copy's directory was removed")
	}
}
