package coordinator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

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

// maxPurges bounds the purges whose files are being deleted at once, so that
// a backlog (after an upgrade turns collection on, or a long-held gate)
// does not send every job's deletions to the storage together.
const maxPurges = 4

// purgeFilesResult reports the deletion of a job's checkpoint files, the
// first step of its purge, to the leader loop.
type purgeFilesResult struct {
	job     string
	deleted int
	err     error
}

func (purgeFilesResult) leaderEvent() {}

// purgeRequest asks the leader to purge a cancelled job as soon as its
// tasks have stopped, whatever Config.JobGCThreshold says (DELETE
// /v1/jobs/{id}?purge=true), as Nomad's job stop -purge does. It lasts for
// the leader's term: a new leader purges the job at the threshold only.
type purgeRequest struct {
	jobID string
	// force purges the job even if its files cannot be deleted (storage
	// gone for good): they stay where they are, named in the answer.
	force bool
	// reply gets the request's first outcome: the purge done, or why it
	// is not done yet (the purge stays asked for, and is tried again).
	reply chan purgeReply
}

func (purgeRequest) leaderEvent() {}

// purgeReply answers a purgeRequest: err is nil once the job is purged;
// filesLeft, of a forced purge, is why some of its files are still there.
type purgeReply struct {
	filesDeleted int
	filesLeft    error
	err          error
}

// purgeAsk is the purge asked for of one job: forced if any request was,
// with the requests still waiting for an answer.
type purgeAsk struct {
	force   bool
	waiters []purgeRequest
}

// errPurgeState is a purge request the job's state refuses.
var errPurgeState = errors.New("job cannot be purged")

// onPurgeRequest marks a cancelled job to be purged now and has it looked
// at; the request is answered when the purge is done or held up.
func (l *leader) onPurgeRequest(r purgeRequest) {
	// Read from the FSM, not from js: the cancel the request follows is
	// committed, but the loop may not have looked at the job since.
	job, ok := l.env.job(r.jobID)
	switch {
	case !ok:
		r.reply <- purgeReply{err: fmt.Errorf("%w: %w: %s", errPurgeState, fsm.ErrNoSuchJob, r.jobID)}
		return
	case job.Status != fsm.JobCancelled:
		r.reply <- purgeReply{err: fmt.Errorf("%w: job %s is %s: cancel it first", errPurgeState, r.jobID, job.Status)}
		return
	}
	ask := l.purgeNow[r.jobID]
	fresh := ask == nil || (r.force && !ask.force)
	if ask == nil {
		ask = &purgeAsk{}
		l.purgeNow[r.jobID] = ask
	}
	ask.force = ask.force || r.force
	ask.waiters = append(ask.waiters, r)
	if js := l.jobs[r.jobID]; js != nil && fresh {
		// A first request, or the first forced one, tries at once; one
		// asked again only waits for the next try, so that a client
		// that repeats itself does not list the storage each time.
		js.purgeRetryAt = time.Time{}
	}
	l.dirty[r.jobID] = struct{}{}
}

// answerPurge answers the requests waiting for job's purge; done says the
// job is gone, which also ends the request.
func (l *leader) answerPurge(job string, rep purgeReply, done bool) {
	ask := l.purgeNow[job]
	if ask == nil {
		return
	}
	for _, r := range ask.waiters {
		r.reply <- rep
	}
	ask.waiters = nil
	if done {
		delete(l.purgeNow, job)
	}
}

// collectJob purges cancelled job js once it has been cancelled for the
// threshold, or a user asked for it, and every task of it has stopped:
// first its files, in the background (onPurgeFiles goes on), then
// JobPurged. Before that it only sets a timer for the time it is due.
func (l *leader) collectJob(js *jobState, job fsm.Job, now time.Time) {
	_, asked := l.purgeNow[js.id]
	if (l.jobGC <= 0 && !asked) || js.purging {
		return
	}
	js.cancelledAt = time.Unix(0, job.UpdatedAt)
	if due := js.cancelledAt.Add(l.jobGC); !asked && now.Before(due) {
		l.scheduleJob(js, due)
		return
	}
	if now.Before(js.purgeRetryAt) {
		l.scheduleJob(js, js.purgeRetryAt)
		return
	}
	if !l.purgeAllowed(js, now) {
		return
	}
	if tv := l.runningTask(js, now); tv != nil {
		// A task still stopping may still upload a file under the job's
		// prefix after the deletion listed it. Its stop (a status, a
		// session or gossip change) marks the job dirty; the lease bounds
		// the wait for a worker that went quiet. The cancel goes again, in
		// case the worker's answer to the first was lost: a worker answers
		// a cancel of a task it does not run with its end.
		for _, msg := range finalMsgs(js, tv, newestCompleted(job)) {
			l.sendTo(tv.task.Worker, msg)
		}
		l.scheduleJob(js, now.Add(l.lease))
		return
	}
	if l.purges >= maxPurges {
		if !js.purgeQueued {
			js.purgeQueued = true
			l.purgeQueue = append(l.purgeQueue, js.id)
		}
		return
	}
	if js.purgeQueued { // its turn came by another way (a timer, a reconcile)
		js.purgeQueued = false
		l.purgeQueue = slices.DeleteFunc(l.purgeQueue, func(id string) bool { return id == js.id })
	}
	js.purging = true
	l.purges++
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

// purgeAllowed reports whether every coordinator can apply JobPurged, and
// has js tried again later when not.
func (l *leader) purgeAllowed(js *jobState, now time.Time) bool {
	why := l.belowLevel(jobGCLevel)
	if why == "" {
		js.purgeHeld = false
		return true
	}
	if !js.purgeHeld {
		l.jobLogger(js).Info("not purging a cancelled job: a coordinator cannot apply the purge", "why", why)
		js.purgeHeld = true
	}
	l.answerPurge(js.id, purgeReply{err: fmt.Errorf("a coordinator cannot apply the purge: %s", why)}, false)
	l.retryPurge(js, now)
	return false
}

// runningTask returns a task of js that may still run, or nil: one whose
// last phase is live, unless its worker said it does not run it, or the
// worker has no session and has left, or its process is gone, or it has
// been without one for its lease (it stops every task then). Gossip's
// "dead" is not enough, as in workerLost: a frozen worker looks dead, and
// may upload a file under the job's prefix as it resumes.
func (l *leader) runningTask(js *jobState, now time.Time) *trackedTask {
	members := memberStatus(l.env.members())
	for _, tv := range js.order {
		if !live(tv.phase) || tv.missing {
			continue
		}
		w := tv.task.Worker
		if l.sessions[w] != nil {
			return tv
		}
		if members[w] == StatusLeft || l.gone[w] {
			continue
		}
		if since, ok := l.sessionlessSince(w); ok && now.Sub(since) >= l.lease {
			continue
		}
		return tv
	}
	return nil
}

// onPurgeFiles commits JobPurged once the job's files are gone. Deleting the
// files first means a leader that dies in between leaves a job whose next
// purge finds nothing to delete, never files that nothing names.
func (l *leader) onPurgeFiles(r purgeFilesResult) {
	l.purges--
	// Hand the free slots to the jobs that waited longest; one that cannot
	// start now (held, or waiting to retry) queues again or has a timer.
	for free := maxPurges - l.purges; free > 0 && len(l.purgeQueue) > 0; {
		next := l.purgeQueue[0]
		l.purgeQueue = l.purgeQueue[1:]
		if q := l.jobs[next]; q != nil {
			q.purgeQueued = false
			l.dirty[next] = struct{}{}
			free--
		}
	}
	js := l.jobs[r.job]
	if js == nil {
		return
	}
	log := l.jobLogger(js)
	now := l.env.now()
	var filesLeft error
	ask := l.purgeNow[js.id]
	switch {
	case r.err != nil && ask != nil && ask.force:
		log.Warn("purge cancelled job without deleting all its checkpoint files: forced; delete what is left under its prefix yourself",
			"deleted", r.deleted, "err", r.err)
		filesLeft = r.err
	case r.err != nil:
		js.purging = false
		log.Warn("purge cancelled job: delete its checkpoint files; trying again later", "deleted", r.deleted, "err", r.err, "retry_in", jobGCRetry)
		l.answerPurge(js.id, purgeReply{filesDeleted: r.deleted, err: fmt.Errorf("delete its checkpoint files: %w", r.err)}, false)
		l.retryPurge(js, now)
		return
	}
	// Checked again: a coordinator below the level may have joined while
	// the files were being deleted. The job then stays, without its files,
	// until every coordinator can apply the purge.
	if !l.purgeAllowed(js, now) {
		js.purging = false
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
			l.answerPurge(js.id, purgeReply{filesDeleted: r.deleted, err: fmt.Errorf("commit the purge: %w", err)}, false)
			l.retryPurge(js, l.env.now())
			return
		}
		log.Info("cancelled job purged", "files_deleted", r.deleted, "cancelled_for", l.env.now().Sub(js.cancelledAt).Round(time.Second),
			"asked", ask != nil, "forced", ask != nil && ask.force)
		l.answerPurge(js.id, purgeReply{filesDeleted: r.deleted, filesLeft: filesLeft}, true)
		l.forget(js)
		// A new job of the same id registered meanwhile waited for this
		// write, whose result would have had it looked at.
		l.dirty[js.id] = struct{}{}
	})
}

// retryPurge has js looked at again after about jobGCRetry, with ±20%
// jitter so that purges that failed together do not retry together.
func (l *leader) retryPurge(js *jobState, now time.Time) {
	js.purgeRetryAt = now.Add(time.Duration(float64(jobGCRetry) * (0.8 + 0.4*l.env.jitter())))
	l.scheduleJob(js, js.purgeRetryAt)
}

// forget drops the leader's memory of a job the FSM no longer holds.
func (l *leader) forget(js *jobState) {
	l.answerPurge(js.id, purgeReply{}, true) // purged in an earlier term
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
	if err := listJobFiles(ctx, store, jobID, checkpoint, savepoint); err != nil {
		return 0, err
	}
	return c.deleteFiles(ctx, store, jobID, doomed)
}

// forget drops what the collector remembers of a purged job.
func (c *collector) forget(jobID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.last, jobID)
	delete(c.unreferenced, jobID)
}
