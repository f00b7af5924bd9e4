package coordinator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// Job garbage collection. A cancelled job stays in the replicated state, with
// its retained checkpoints (inline state included), histories and files,
// until it has been cancelled for Config.JobGCThreshold; then the leader
// deletes its checkpoint files and commits JobPurged, which removes it from
// every replica, as Nomad collects dead jobs after job_gc_threshold and Flink
// forgets finished jobs after jobstore.expiration-time. Savepoints stay: they
// are deleted only on request. docs/operations.md, "Job garbage collection".

// jobGCLevel is the feature level every coordinator needs before the leader
// purges a job: an older coordinator does not know JobPurged, rejects it,
// and would keep the job the others dropped.
const jobGCLevel = 2

// jobGCRetry is how long the leader waits before it tries a purge again
// that could not go on (files it could not delete, a coordinator below
// jobGCLevel, a failed write).
const jobGCRetry = time.Minute

// jobGCFileTimeout bounds one deletion of a job's checkpoint files.
const jobGCFileTimeout = 5 * time.Minute

// purgeFilesResult reports the deletion of a job's checkpoint files, the
// first step of its purge, to the leader loop.
type purgeFilesResult struct {
	job     string
	deleted int
	err     error
}

func (purgeFilesResult) leaderEvent() {}

// collectJob purges cancelled job js once it has been cancelled for the
// threshold: first its files, in the background (onPurgeFiles goes on),
// then JobPurged. Before that it only sets a timer for the time it is due.
func (l *leader) collectJob(js *jobState, job fsm.Job, now time.Time) {
	if l.jobGC <= 0 || js.purging {
		return
	}
	if due := time.Unix(0, job.UpdatedAt).Add(l.jobGC); now.Before(due) {
		l.scheduleJob(js, due)
		return
	}
	if now.Before(js.purgeRetryAt) {
		l.scheduleJob(js, js.purgeRetryAt)
		return
	}
	if below := l.coordinatorsBelow(jobGCLevel); len(below) > 0 {
		if !js.purgeHeld {
			l.jobLogger(js).Info("not purging a cancelled job: a coordinator cannot apply the purge",
				"needs_feature_level", jobGCLevel, "coordinators", below)
			js.purgeHeld = true
		}
		l.retryPurge(js, now)
		return
	}
	js.purgeHeld = false
	js.purging = true
	id := js.id
	l.lookups.Add(1)
	go func() {
		defer l.lookups.Done()
		n, err := 0, error(nil)
		if l.env.purgeFiles != nil {
			ctx, cancel := context.WithTimeout(l.ctx, jobGCFileTimeout)
			n, err = l.env.purgeFiles(ctx, id)
			cancel()
		}
		l.post(l.ctx, purgeFilesResult{job: id, deleted: n, err: err})
	}()
}

// onPurgeFiles commits JobPurged once the job's files are gone. Deleting the
// files first means a leader that dies in between leaves a job whose next
// purge finds nothing to delete, never files that nothing names.
func (l *leader) onPurgeFiles(r purgeFilesResult) {
	js := l.jobs[r.job]
	if js == nil {
		return
	}
	log := l.jobLogger(js)
	now := l.env.now()
	if r.err != nil {
		js.purging = false
		log.Warn("purge cancelled job: delete its checkpoint files; trying again later", "deleted", r.deleted, "err", r.err, "retry_in", jobGCRetry)
		l.retryPurge(js, now)
		return
	}
	cmd := fsm.JobPurgedCmd{JobID: js.id, Time: now.UnixNano()}
	l.write(js, fsm.CommandJobPurged, cmd, func(_ any, err error) {
		js.purging = false
		if err != nil {
			if errors.Is(err, fsm.ErrNoSuchJob) {
				return // purged already, by an earlier term's write
			}
			log.Warn("purge cancelled job; trying again later", "err", err, "retry_in", jobGCRetry)
			l.retryPurge(js, l.env.now())
			return
		}
		log.Info("cancelled job purged", "files_deleted", r.deleted, "cancelled_for", l.jobGC)
		l.forget(js)
	})
}

// retryPurge has js looked at again after jobGCRetry.
func (l *leader) retryPurge(js *jobState, now time.Time) {
	js.purgeRetryAt = now.Add(jobGCRetry)
	l.scheduleJob(js, js.purgeRetryAt)
}

// coordinatorsBelow lists the coordinators below level, or one line saying
// why they cannot be listed.
func (l *leader) coordinatorsBelow(level int) []string {
	if l.env.coordinatorsBelow == nil {
		return nil
	}
	below, err := l.env.coordinatorsBelow(level)
	if err != nil {
		return []string{err.Error()}
	}
	return below
}

// forget drops the leader's memory of a job the FSM no longer holds.
func (l *leader) forget(js *jobState) {
	l.unindex(js)
	js.status = ""
	l.account(js)
	delete(l.jobs, js.id)
	delete(l.waiting, js.id)
}

// purge deletes every checkpoint file of a job about to be purged, partial
// uploads included, and the files of its savepoints the cluster does not
// keep; the files of kept savepoints stay. It returns how many it deleted.
func (c *collector) purge(ctx context.Context, jobID string) (int, error) {
	job, ok := c.job(jobID)
	if !ok || job.Spec.Checkpoint.Storage == "" {
		return 0, nil
	}
	store, err := c.stores.Get(ctx, job.Spec.Checkpoint.Storage)
	if err != nil {
		return 0, fmt.Errorf("open checkpoint storage: %w", err)
	}
	var doomed []string
	checkpoint := func(path, _ string) { doomed = append(doomed, path) }
	savepoint := func(path, final string) {
		if j, id, ok := transport.ParseSavepointPath(final); !ok || j != jobID || !c.kept(fsm.SavepointID(jobID, id)) {
			doomed = append(doomed, path)
		}
	}
	for prefix, consider := range map[string]func(path, final string){
		transport.CheckpointPrefix + jobID + "/": checkpoint,
		transport.SavepointPrefix + jobID + "/":  savepoint,
	} {
		err := store.List(ctx, prefix, func(path string, _ int64, _ time.Time) error {
			consider(path, path)
			return nil
		})
		if err == nil {
			err = store.ListPartial(ctx, prefix, func(path, final string, _ int64, _ time.Time) error {
				consider(path, final)
				return nil
			})
		}
		if err != nil {
			return 0, fmt.Errorf("list %s: %w", prefix, err)
		}
	}
	deleted := 0
	var errs []error
	for _, p := range doomed {
		if err := store.Delete(ctx, p); err != nil {
			errs = append(errs, err)
			continue
		}
		deleted++
	}
	c.metrics.stateFilesDeleted.WithLabelValues(jobID).Add(float64(deleted))
	return deleted, errors.Join(errs...)
}

// forget drops what the collector remembers of a purged job.
func (c *collector) forget(jobID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.last, jobID)
	delete(c.unreferenced, jobID)
}

// forgetJob deletes every metric series of a purged job, so that a
// coordinator that runs jobs for months does not export each job it ever
// led.
func (m *metrics) forgetJob(jobID string) {
	labels := prometheus.Labels{"job": jobID}
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{
		m.checkpointsCompleted, m.checkpointsAborted, m.checkpointDuration, m.jobRestarts,
		m.noDiscovery, m.recoveries, m.fencedMessages, m.stateFilesDeleted,
	} {
		v.DeletePartialMatch(labels)
	}
}
