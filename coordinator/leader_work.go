package coordinator

import (
	"container/heap"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/coordflow/coordflow/fsm"
)

// How the leader loop keeps its work per event independent of the number of
// jobs:
//
//   - Dirty jobs. What can change a job's fate marks that job dirty: the FSM
//     reports every job an entry changed (fsm.OnJobChange), a worker's gossip
//     status or session marks the jobs with tasks on it (byWorker), and a
//     change of free slots marks the jobs waiting to be deployed. The loop
//     reconciles only dirty jobs, reading each from the FSM alone.
//   - One timer heap. A job's next deadline (checkpoint trigger or timeout,
//     restart backoff, lease or deploy timeout) is one entry in a heap; the
//     loop sleeps until the earliest.
//   - Writes in order per job. A job's commands are committed one at a time,
//     in the order the loop decided them (leader.write); while one is in
//     flight the job takes no new decision, so the callback of each write
//     sees the state its decision was made on. Other jobs go on meanwhile.
//
// A full pass over every job (reconcile) runs only when a term starts and
// when its reconnect grace ends.

// timerKind says what a timer entry is for.
type timerKind uint8

const (
	timerReconcile  timerKind = iota // reconcile the job (backoff, lease, deploy timeout)
	timerCheckpoint                  // trigger or time out the job's checkpoint
	timerGraceEnd                    // the reconnect grace ended: reconcile every job
)

// timer is one entry of the leader's timer heap.
type timer struct {
	at   time.Time
	job  string
	kind timerKind
}

// timerHeap orders timers by time; ties keep no particular order.
type timerHeap []timer

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h timerHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *timerHeap) Push(x any)        { *h = append(*h, x.(timer)) }
func (h *timerHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	*h = old[:len(old)-1]
	return t
}

// scheduleJob asks for a reconcile of js at t at the latest.
func (l *leader) scheduleJob(js *jobState, t time.Time) {
	if js.reconcileAt.IsZero() || t.Before(js.reconcileAt) {
		js.reconcileAt = t
		heap.Push(&l.timers, timer{at: t, job: js.id, kind: timerReconcile})
	}
}

// checkpointAt asks for js's checkpoint to be looked at at t at the latest.
func (l *leader) checkpointAt(js *jobState, t time.Time) {
	if js.checkpointAt.IsZero() || t.Before(js.checkpointAt) {
		js.checkpointAt = t
		heap.Push(&l.timers, timer{at: t, job: js.id, kind: timerCheckpoint})
	}
}

// touchCheckpoint asks for js's checkpoint to be looked at in this iteration
// of the loop: something it depends on changed.
func (l *leader) touchCheckpoint(js *jobState) { l.checkpointAt(js, l.env.now()) }

// untilDue returns how long the loop may sleep before its earliest timer.
func (l *leader) untilDue() time.Duration {
	if len(l.timers) == 0 {
		return time.Hour
	}
	return max(l.timers[0].at.Sub(l.env.now()), time.Millisecond)
}

// runTimers fires every timer due at now: reconcile timers mark their job
// dirty, checkpoint timers run the job's checkpoint step. A timer that a later
// or earlier one of its job replaced does nothing.
func (l *leader) runTimers() {
	now := l.env.now()
	for len(l.timers) > 0 && !l.timers[0].at.After(now) {
		t := heap.Pop(&l.timers).(timer)
		if t.kind == timerGraceEnd {
			l.reconcile()
			continue
		}
		js := l.jobs[t.job]
		if js == nil {
			continue
		}
		switch t.kind {
		case timerReconcile:
			if js.reconcileAt.Equal(t.at) {
				js.reconcileAt = time.Time{}
				l.dirty[js.id] = struct{}{}
			}
		case timerCheckpoint:
			if js.checkpointAt.Equal(t.at) {
				js.checkpointAt = time.Time{}
				l.checkpointStep(js, now)
			}
		}
	}
}

// noteJobs records jobs the FSM changed; any goroutine may call it.
func (l *leader) noteJobs(ids []string) {
	l.notesMu.Lock()
	for _, id := range ids {
		l.notedJobs[id] = struct{}{}
	}
	l.notesMu.Unlock()
	l.poke()
}

// noteWorker records a worker whose gossip status changed; any goroutine may
// call it.
func (l *leader) noteWorker(id string) {
	l.notesMu.Lock()
	l.notedWorkers[id] = struct{}{}
	l.notesMu.Unlock()
	l.poke()
}

// takeNotes turns the notes of other goroutines into dirty jobs.
func (l *leader) takeNotes() {
	var jobs, workers map[string]struct{}
	l.notesMu.Lock()
	if len(l.notedJobs) > 0 {
		jobs, l.notedJobs = l.notedJobs, make(map[string]struct{})
	}
	if len(l.notedWorkers) > 0 {
		workers, l.notedWorkers = l.notedWorkers, make(map[string]struct{})
	}
	l.notesMu.Unlock()
	for id := range jobs {
		l.dirty[id] = struct{}{}
	}
	for w := range workers {
		l.workerChanged(w)
	}
}

// workerChanged marks dirty the jobs with tasks on worker w and, since its
// slots may have come or gone, the jobs waiting to be deployed.
func (l *leader) workerChanged(w string) {
	delete(l.overruled, w) // gossip or the session changed: tell again
	for id := range l.byWorker[w] {
		l.dirty[id] = struct{}{}
	}
	l.slotsChanged()
}

// slotsChanged marks dirty every job waiting for a deploy.
func (l *leader) slotsChanged() {
	for id := range l.waiting {
		l.dirty[id] = struct{}{}
	}
}

// settle does the work events left: notes, due timers, dirty jobs. The loop
// runs it after every event.
func (l *leader) settle() {
	l.takeNotes()
	l.runTimers()
	// Reconciling a job may mark others dirty (slots it frees): go on until
	// none is, a few rounds at most, and then come back after the events
	// that wait.
	for round := 0; len(l.dirty) > 0; round++ {
		if round == 3 {
			l.poke()
			return
		}
		now := l.env.now()
		members := memberStatus(l.env.members())
		dirty := slices.Sorted(maps.Keys(l.dirty)) // in job id order, as a full pass goes
		clear(l.dirty)
		for _, id := range dirty {
			if l.busy(id) {
				continue // the write's result marks it dirty again
			}
			job, ok := l.env.job(id)
			if !ok {
				if js := l.jobs[id]; js != nil {
					l.forget(js) // purged
				}
				continue
			}
			l.reconcileJob(job, members, now)
		}
	}
}

// write is one command the leader loop decided for a job, and what to do
// with its result.
type write struct {
	job  string
	t    fsm.CommandType
	data []byte
	then func(res any, err error)
	// queued and submitted are when the loop decided the write and when it
	// handed it to the committer (coordflow_leader_write_stage_seconds).
	queued, submitted time.Time
}

// writeResult reports a write's outcome to the loop.
type writeResult struct {
	w   *write
	res any
	err error
	at  time.Time // when the committer answered
}

func (writeResult) leaderEvent() {}

// busy reports whether job has a write queued or in flight.
func (l *leader) busy(job string) bool { return len(l.writes[job]) > 0 }

// write queues cmd for js behind the job's earlier writes and returns at
// once; then runs in the loop with the FSM's result once cmd is committed or
// has failed. A job's writes are committed one after the other, in order;
// writes of different jobs are committed together.
func (l *leader) write(js *jobState, t fsm.CommandType, cmd any, then func(res any, err error)) {
	data, err := fsm.Encode(t, cmd)
	if err != nil {
		then(nil, fmt.Errorf("raft apply: %w", err))
		return
	}
	w := &write{job: js.id, t: t, data: data, then: then, queued: time.Now()}
	q := append(l.writes[js.id], w)
	l.writes[js.id] = q
	if len(q) == 1 {
		l.submit(w)
	}
}

// submit hands w to the write path; its result comes back as an event.
func (l *leader) submit(w *write) {
	w.submitted = time.Now()
	l.env.submit(w.t, w.data, func(res any, err error) {
		l.post(l.ctx, writeResult{w: w, res: res, err: err, at: time.Now()})
	})
}

// onWriteResult runs a write's continuation, submits the job's next write,
// and has the job looked at again.
func (l *leader) onWriteResult(r writeResult) {
	q := l.writes[r.w.job]
	if len(q) == 0 || q[0] != r.w {
		l.logger.Error("write result out of order; dropped", "job", r.w.job, "command", r.w.t)
		return
	}
	// Wall-clock stages, not l.env.now: a test's clock does not move while
	// a write is in flight.
	command := r.w.t.String()
	l.metrics.leaderWriteStage.WithLabelValues(command, "queued").Observe(r.w.submitted.Sub(r.w.queued).Seconds())
	l.metrics.leaderWriteStage.WithLabelValues(command, "commit").Observe(r.at.Sub(r.w.submitted).Seconds())
	l.metrics.leaderWriteStage.WithLabelValues(command, "loop").Observe(time.Since(r.at).Seconds())
	if q = q[1:]; len(q) == 0 {
		delete(l.writes, r.w.job)
	} else {
		l.writes[r.w.job] = q
		l.submit(q[0])
	}
	r.w.then(r.res, r.err)
	if js := l.jobs[r.w.job]; js != nil && !l.busy(js.id) {
		l.dirty[js.id] = struct{}{}
		l.touchCheckpoint(js)
	}
}
