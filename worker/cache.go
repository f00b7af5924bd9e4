package worker

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// localCache keeps the worker's local copies of state files (StateDir/cache)
// in bounds. A copy serves the recovery of a task this worker ran (Flink's
// local recovery), which comes within a restart's backoff; the map task
// that wrote or read it prunes those its own checkpoints no longer need,
// but once the task ends nothing else would remove them: the copies of a
// cancelled job, of a task restarted on another worker, of snapshots that
// never completed, which a long-lived worker would gather until its disk
// filled. The cache tracks what the running map tasks hold and sweeps the
// rest away once it is older than cacheKeep.
type localCache struct {
	dir string // empty: no local copies (no checkpoint storage)

	mu   sync.Mutex
	held map[taskKey][]string // paths under dir, by running map task
	// released is when the last task that held a path ended: a copy's age
	// counts from then, or from its last write if later.
	released map[string]time.Time
	now      func() time.Time
}

const (
	// cacheKeep is how long a copy no running task holds stays: long
	// enough for a task's restart on this worker to find it.
	cacheKeep = 10 * time.Minute
	// cacheSweepEvery is how often the cache looks for such copies.
	cacheSweepEvery = time.Minute
)

func newLocalCache(dir string) *localCache {
	return &localCache{dir: dir, held: make(map[taskKey][]string), released: make(map[string]time.Time), now: time.Now}
}

// hold records paths as the copies map task k holds now, in place of those
// it held before. A nil cache holds nothing.
func (c *localCache) hold(k taskKey, paths []string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held[k] = slices.Clone(paths)
	for _, p := range paths {
		delete(c.released, p)
	}
}

// release forgets what map task k held: it has ended. Its copies are kept
// for cacheKeep from now, for a restart of the task on this worker.
func (c *localCache) release(k taskKey) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	for _, p := range c.held[k] {
		c.released[p] = now
	}
	delete(c.held, k)
}

// sweep removes the copies under dir that no running task holds and that
// were last written before now-keep, and the directories left empty that
// have not changed since then either.
// It returns how many files it removed.
func (c *localCache) sweep(now time.Time, keep time.Duration) (int, error) {
	c.mu.Lock()
	held := make(map[string]bool)
	for _, paths := range c.held {
		for _, p := range paths {
			held[filepath.Join(c.dir, filepath.FromSlash(p))] = true
		}
	}
	released := make(map[string]time.Time, len(c.released))
	for p, t := range c.released {
		released[filepath.Join(c.dir, filepath.FromSlash(p))] = t
	}
	c.mu.Unlock()
	removed := 0
	var dirs []string
	err := filepath.WalkDir(c.dir, func(path string, d fs.DirEntry, err error) error {
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil // removed meanwhile, or no copy written yet
		case err != nil:
			return err
		case d.IsDir():
			// One a task may be about to write into (it was just made)
			// stays, as a recent file does.
			if info, err := d.Info(); err == nil && path != c.dir && now.Sub(info.ModTime()) >= keep {
				dirs = append(dirs, path)
			}
			return nil
		case held[path]:
			return nil
		}
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if now.Sub(info.ModTime()) < keep || now.Sub(released[path]) < keep {
			return nil
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		removed++
		return nil
	})
	c.mu.Lock()
	for p, t := range c.released {
		if now.Sub(t) >= keep {
			delete(c.released, p) // removed above, or gone
		}
	}
	c.mu.Unlock()
	// Deepest first; a directory that is not empty stays.
	for _, d := range slices.Backward(dirs) {
		_ = os.Remove(d)
	}
	return removed, err
}

// run sweeps every cacheSweepEvery until ctx ends.
func (c *localCache) run(ctx context.Context, log *slog.Logger) {
	if c == nil || c.dir == "" {
		return
	}
	t := time.NewTicker(cacheSweepEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			n, err := c.sweep(now, cacheKeep)
			if err != nil {
				log.Warn("sweep local copies of state files", "dir", c.dir, "removed", n, "err", err)
			} else if n > 0 {
				log.Info("removed local copies of state files no task holds", "dir", c.dir, "removed", n, "kept_for", cacheKeep)
			}
		}
	}
}
