package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/statefile"
	"github.com/coordflow/coordflow/transport/storage"
)

// stateReader reads the keyed state of completed checkpoints, inline or from
// checkpoint storage, for the state API. It never holds the FSM's lock: it
// works on copies of checkpoints.
type stateReader struct {
	stores *storage.Pool
}

// read calls fn for every live key of st in key groups [start, end), in
// (key group, key) order.
func (r *stateReader) read(ctx context.Context, url string, st fsm.TaskState, start, end int32, fn func(kg int32, key, value []byte) error) error {
	if st.KeyGroups != nil {
		start = max(start, int32(st.KeyGroups.Start))
		end = min(end, int32(st.KeyGroups.End))
	}
	if start >= end {
		return nil
	}
	var sources []statefile.Source
	switch {
	case len(st.Files) > 0:
		store, err := r.stores.Get(ctx, url)
		if err != nil {
			return fmt.Errorf("open checkpoint storage: %w", err)
		}
		for _, f := range st.Files {
			if int32(f.KeyGroups.End) <= start || end <= int32(f.KeyGroups.Start) {
				continue
			}
			ra, err := store.ReaderAt(ctx, f.Path, f.Size)
			if err != nil {
				return fmt.Errorf("state file %s: %w", f.Path, err)
			}
			defer ra.Close()
			rd, err := statefile.NewReader(ra, f.Size)
			if err != nil {
				return fmt.Errorf("state file %s: %w", f.Path, err)
			}
			sources = append(sources, rd)
		}
	case len(st.Keyed) > 0:
		rd, err := statefile.OpenInline(st.Keyed, st.KeyedSHA256)
		if err != nil {
			return fmt.Errorf("inline state of task %s: %w", st.TaskID, err)
		}
		sources = append(sources, rd)
	default:
		return nil
	}
	return statefile.Merge(sources, start, end, fn)
}

// gcInterval is the least time between two garbage collections of one
// job's checkpoint files.
const gcInterval = 10 * time.Second

// gcGrace is how long a file stays after the collector first finds it
// unreferenced: a reader of a checkpoint just dropped (a state export or
// query that began while it was the newest, on any coordinator) keeps its
// files for that long.
const gcGrace = 2 * time.Minute

// collector deletes the checkpoint files of a job that no retained
// checkpoint references (docs/state.md, Garbage collection). It runs one
// collection per job at a time, in the background, so the leader loop never
// waits for storage.
type collector struct {
	stores *storage.Pool
	job    func(id string) (fsm.Job, bool)
	// kept reports whether the cluster keeps the savepoint of that id.
	kept    func(savepoint string) bool
	logger  *slog.Logger
	metrics *metrics

	mu      sync.Mutex
	running map[string]bool
	last    map[string]time.Time
	// unreferenced holds, per job, when each unreferenced file was first
	// found so. It outlives this node's leadership (it is cleared only
	// when the job is purged): an entry from an earlier term only shortens
	// the wait of a file that was unreferenced then and still is, and no
	// checkpoint takes up such a file again, as a new one builds only on
	// the newest completed one's. Another leader waits the grace anew.
	unreferenced map[string]map[string]time.Time
	now          func() time.Time
	wg           sync.WaitGroup
}

func newCollector(stores *storage.Pool, job func(string) (fsm.Job, bool), kept func(string) bool, logger *slog.Logger, m *metrics) *collector {
	return &collector{stores: stores, job: job, kept: kept, logger: logger, metrics: m,
		running: make(map[string]bool), last: make(map[string]time.Time), unreferenced: make(map[string]map[string]time.Time),
		now: time.Now}
}

// collect starts a collection of job's files unless one is running or one
// ran in the last gcInterval. It does not block.
func (c *collector) collect(ctx context.Context, jobID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running[jobID] || time.Since(c.last[jobID]) < gcInterval {
		return
	}
	c.running[jobID] = true
	c.last[jobID] = time.Now()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		n, err := c.run(ctx, jobID)
		log := c.logger.With("job", jobID)
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("collect checkpoint files", "deleted", n, "err", err)
		case n > 0:
			log.Debug("collected checkpoint files", "deleted", n)
		}
		c.mu.Lock()
		delete(c.running, jobID)
		c.mu.Unlock()
		// A purge committed while this collection ran has had the job
		// forgotten already (Server.jobsChanged): forget what this run
		// recorded after that, or it would stay for good.
		if _, ok := c.job(jobID); !ok {
			c.forget(jobID)
			c.metrics.stateFilesDeleted.DeleteLabelValues(jobID)
		}
	}()
}

// wait waits for the collections in flight.
func (c *collector) wait() { c.wg.Wait() }

// run deletes the files under the job's checkpoint prefix that belong to a
// checkpoint that is over (an id issued, not the pending one), that no
// retained completed checkpoint references, and that were found so gcGrace
// ago, partial files of interrupted uploads included: files of dropped and
// aborted checkpoints and of dead attempts. Files of the pending checkpoint,
// and of ids not issued yet (a leader sends a trigger while its command
// commits), may still be being written; a pending checkpoint's chain only
// references files that the newest completed checkpoint references too, so
// nothing a future completion needs is deleted. Under the job's savepoint
// prefix it deletes, by the same rules, the files of savepoints that never
// completed (aborted, or refused): a savepoint the cluster keeps is deleted
// only with `coordd savepoint delete`.
func (c *collector) run(ctx context.Context, jobID string) (int, error) {
	job, ok := c.job(jobID)
	if !ok || job.Spec.Checkpoint.Storage == "" || job.LastCheckpointID == 0 {
		return 0, nil
	}
	var pending uint64 // 0: none, and no checkpoint has id 0
	if job.Pending != nil {
		pending = job.Pending.ID
	}
	over := func(id uint64) bool { return id <= job.LastCheckpointID && id != pending }
	live := referencedFiles(job)
	store, err := c.stores.Get(ctx, job.Spec.Checkpoint.Storage)
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	since := c.unreferenced[jobID]
	c.mu.Unlock()
	now := c.now()
	still := make(map[string]time.Time) // unreferenced and kept, for the next run
	var doomed []string
	unreferenced := func(path string) {
		first, seen := since[path]
		if !seen {
			first = now
		}
		if now.Sub(first) >= gcGrace {
			doomed = append(doomed, path)
		} else {
			still[path] = first
		}
	}
	checkpoint := func(path, final string) {
		if j, id, ok := transport.ParseCheckpointPath(final); ok && j == jobID && over(id) && !live[path] {
			unreferenced(path)
		}
	}
	savepoint := func(path, final string) {
		if j, id, ok := transport.ParseSavepointPath(final); ok && j == jobID && over(id) && !c.kept(fsm.SavepointID(jobID, id)) {
			unreferenced(path)
		}
	}
	if err := listJobFiles(ctx, store, jobID, checkpoint, savepoint); err != nil {
		return 0, err
	}
	c.mu.Lock()
	c.unreferenced[jobID] = still
	c.mu.Unlock()
	return c.deleteFiles(ctx, store, jobID, doomed)
}

// listJobFiles calls checkpoint for every file under the job's checkpoint
// prefix and savepoint for every file under its savepoint prefix, each with
// its path and the path it is written to (the same, but for a partial
// upload, whose final path names its checkpoint).
func listJobFiles(ctx context.Context, store *storage.Store, jobID string, checkpoint, savepoint func(path, final string)) error {
	for prefix, consider := range map[string]func(path, final string){
		transport.CheckpointPrefix + jobID + "/": checkpoint,
		transport.SavepointPrefix + jobID + "/":  savepoint,
	} {
		err := store.List(ctx, prefix, func(path string, _ int64, _ time.Time) error {
			consider(path, path)
			return nil
		})
		if err == nil {
			// What a worker killed in the middle of an upload left: no
			// checkpoint references it, and nobody else would delete it.
			err = store.ListPartial(ctx, prefix, func(path, final string, _ int64, _ time.Time) error {
				consider(path, final)
				return nil
			})
		}
		if err != nil {
			return fmt.Errorf("list %s: %w", prefix, err)
		}
	}
	return nil
}

// deleteFiles deletes the files of job at paths, counts them in the job's
// metric and returns how many went; it goes on past a failed deletion.
func (c *collector) deleteFiles(ctx context.Context, store *storage.Store, jobID string, paths []string) (int, error) {
	deleted := 0
	var errs []error
	for _, p := range paths {
		if err := ctx.Err(); err != nil { // the term ended: stop, whatever the storage does
			errs = append(errs, err)
			break
		}
		if err := store.Delete(ctx, p); err != nil {
			errs = append(errs, err)
			continue
		}
		deleted++
	}
	c.metrics.stateFilesDeleted.WithLabelValues(jobID).Add(float64(deleted))
	return deleted, errors.Join(errs...)
}

// referencedFiles is the set of state file paths the job's retained
// completed checkpoints reference.
func referencedFiles(job fsm.Job) map[string]bool {
	live := make(map[string]bool)
	for _, cp := range job.Completed {
		for _, st := range cp.Tasks {
			for _, f := range st.Files {
				live[f.Path] = true
			}
		}
	}
	return live
}
