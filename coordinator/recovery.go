package coordinator

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// recoverTasks tries a task-scoped recovery of a running job whose attempt
// failed with reason (docs/protocol.md, "Task-scoped recovery"): when every
// failure is a lost worker, only the tasks of the lost workers are restored
// from the newest completed checkpoint, on live workers, and the others run
// on. It reports whether the recovery is under way; when it is not, why
// says why a task-scoped recovery could not keep exactly once ("" when the
// job does not ask for one or the failure is not a lost worker), and the
// caller restarts the whole job.
func (l *leader) recoverTasks(js *jobState, members map[string]string, reason string, now time.Time) (recovering bool, why string) {
	if !js.spec.Recovery.TaskScoped() {
		return false, ""
	}
	lostWorkers := make(map[string]bool)
	var lost []*trackedTask
	var notUp *trackedTask // a surviving task not running yet
	for _, tv := range js.order {
		if !live(tv.phase) {
			return false, "" // a task failed by itself: the job restarts
		}
		if l.workerLost(js, tv.task.Worker, members, now) != "" {
			lostWorkers[tv.task.Worker] = true
			lost = append(lost, tv)
			continue
		}
		if tv.missing {
			return false, ""
		}
		if tv.phase != transport.TaskPhase_TASK_PHASE_RUNNING && notUp == nil {
			notUp = tv
		}
	}
	if len(lost) == 0 {
		return false, ""
	}
	if notUp != nil {
		// A task not up yet cannot survive the recovery: it would get the
		// new attempt's deploy timeout anew (the job has one, and its
		// restore's progress starts over), so losses every so often
		// would keep it from timing out; and a source still opening its
		// channels dials the lost worker's map task, the retarget queued
		// behind, until it fails. A second loss during a large restore
		// costs a whole-job restart.
		return false, fmt.Sprintf("task %s on worker %s is not running yet (phase %s)", notUp.task.ID, notUp.task.Worker, notUp.phase)
	}
	if p := js.ckpt.pending; p != nil && p.stop {
		return false, "a stop-with-savepoint was in progress"
	}
	job, ok := l.env.job(js.id)
	if !ok || job.Status != fsm.JobRunning || job.Attempt != js.attempt {
		return false, ""
	}
	if (job.Pending != nil && job.Pending.Stop) || stopAborted(job) != nil {
		// A predecessor's stop (the abort of an untracked one may be on its
		// way): its barrier may have stopped sources that would survive.
		return false, "a stop-with-savepoint was in progress"
	}
	if len(job.Completed) == 0 {
		return false, "the job has no completed checkpoint to restore the lost tasks from"
	}
	// The surviving tasks have committed everything up to the newest
	// completed checkpoint (sink transactions included): the lost ones
	// must restore exactly that one, or their output would repeat.
	restore := &job.Completed[len(job.Completed)-1]
	if bad, isBad := js.bad[restore.ID]; isBad {
		return false, fmt.Sprintf("the newest checkpoint %d failed verification (%s)", restore.ID, bad)
	}
	if !ofLineage(job, restore) {
		// The running tasks descend from an older checkpoint (a restart
		// fell back past this one, which a predecessor found bad): their
		// state and this one's offsets do not meet.
		return false, fmt.Sprintf("the newest checkpoint %d is not one the running tasks took or restored (they restored %d)", restore.ID, job.RestoredFrom)
	}
	// A lost source may have read partitions it discovered, and the
	// surviving map tasks applied their records: its successor must read
	// them too, from the checkpoint's offsets or, added since, from the
	// earliest, where they would otherwise be read again later.
	for _, tv := range lost {
		if tv.task.Kind != fsm.TaskSource {
			continue
		}
		if why := l.discoveryBlocked(); why != "" {
			return false, "partition discovery cannot be on in a restored source (" + why + "), and the lost one may have read partitions it discovered"
		}
		break
	}
	workers, old := l.placeable(js.spec, "")
	placed, err := placeLost(lost, js.order, workers, lostWorkers)
	if err != nil {
		return false, err.Error() + tooOldNote(js.spec, old)
	}

	attempt := js.attempt + 1
	cmd := fsm.TasksRestartedCmd{
		JobID: js.id, Attempt: attempt, Tasks: placed, RestoreFrom: restore.ID,
		Reason: reason, DetectedAt: now.UnixNano(), Time: now.UnixNano(),
	}
	// The pending checkpoint cannot complete without the lost tasks; the
	// command aborts it, and no completion may overtake it.
	l.dropPending(js, "a recovery of lost tasks aborts it: "+reason)
	for _, tv := range lost {
		tv.replaced = true
	}
	ids := make([]string, len(placed))
	for i, t := range placed {
		ids[i] = t.ID
	}
	log := l.jobLogger(js).With("restore_checkpoint", restore.ID, "next_attempt", attempt)
	log.Warn("recovering the lost tasks alone", "reason", reason, "tasks", ids)
	// The jobs of a lost worker recover together, each before the others'
	// commands are applied: each reserves the slots it takes (deploy).
	l.reserve(js, attempt, placed)
	l.write(js, fsm.CommandTasksRestarted, cmd, func(_ any, err error) {
		freed := l.unreserve(js)
		if err != nil {
			if freed {
				l.slotsChanged()
			}
			log.Error("commit task-scoped recovery; restarting the job instead", "err", err)
			l.beginRestart(js, reason+"; task-scoped recovery failed: "+err.Error())
			return
		}
		l.tasksRestarted(js, attempt, ids, restore.ID, now)
	})
	return true, ""
}

// ofLineage reports whether completed checkpoint cp of job is one its
// running tasks took or restored: cp is what the oldest running task's
// attempt restored, or was taken by that attempt or a later one. A
// checkpoint that a restart fell back past is neither.
func ofLineage(job fsm.Job, cp *fsm.Checkpoint) bool {
	if cp.ID == job.RestoredFrom {
		return true
	}
	oldest := job.Attempt
	for _, t := range job.Tasks {
		oldest = min(oldest, job.TaskAttempt(t))
	}
	return cp.Attempt >= oldest && cp.ID > job.RestoredFrom
}

// placeLost places the lost tasks of a job whose tasks are all, never on a
// lost worker. A task goes beside its partner (source i and map task i, as
// assign pairs them for slot sharing: their items then go through memory)
// where the partner runs or was just placed, if that worker has a free slot;
// otherwise on the worker with the most free slots. It returns copies of the
// lost tasks with their new places.
func placeLost(lost, all []*trackedTask, workers []workerSlots, lostWorkers map[string]bool) ([]fsm.Task, error) {
	workers = slices.DeleteFunc(slices.Clone(workers), func(w workerSlots) bool { return lostWorkers[w.id] })
	if free := totalFree(workers); free < len(lost) {
		return nil, fmt.Errorf("the %d lost tasks cannot be placed: %d free slots on live workers", len(lost), free)
	}
	// where is each task's worker: the new one of a lost task once placed.
	where := make(map[string]string, len(all))
	for _, tv := range all {
		if !lostWorkers[tv.task.Worker] {
			where[tv.task.ID] = tv.task.Worker
		}
	}
	// Tasks whose partner survived go first, so that a lost pair placed
	// most free first does not take the slot beside a survivor.
	lost = slices.Clone(lost)
	slices.SortStableFunc(lost, func(a, b *trackedTask) int {
		_, as := where[partner(a.task)]
		_, bs := where[partner(b.task)]
		switch {
		case as && !bs:
			return -1
		case bs && !as:
			return 1
		}
		return 0
	})
	placed := make([]fsm.Task, 0, len(lost))
	for _, tv := range lost {
		t := tv.task
		w := beside(workers, where[partner(t)])
		if w == nil {
			slices.SortFunc(workers, func(a, b workerSlots) int {
				return cmp.Or(cmp.Compare(b.free, a.free), strings.Compare(a.id, b.id))
			})
			w = &workers[0]
		}
		t.Worker, t.DataAddr = w.id, w.dataAddr
		w.free--
		where[t.ID] = w.id
		placed = append(placed, t)
	}
	return placed, nil
}

// partner returns the id of the task slot sharing pairs with t: map task i
// for source i and the other way round.
func partner(t fsm.Task) string {
	if t.Kind == fsm.TaskSource {
		return fsm.TaskID(fsm.TaskMap, t.Index)
	}
	return fsm.TaskID(fsm.TaskSource, t.Index)
}

// beside returns worker id among workers if it has a free slot, else nil.
func beside(workers []workerSlots, id string) *workerSlots {
	if id == "" {
		return nil
	}
	for i := range workers {
		if workers[i].id == id && workers[i].free > 0 {
			return &workers[i]
		}
	}
	return nil
}

// tasksRestarted deploys the tasks a committed task-scoped recovery restored
// and tells the workers of the surviving tasks where they run now, so that
// surviving sources reopen their channels to restored map tasks and replay
// to them what the checkpoint lacks.
func (l *leader) tasksRestarted(js *jobState, attempt uint64, ids []string, restoreID uint64, detected time.Time) {
	job, ok := l.env.job(js.id)
	if !ok || job.Attempt != attempt {
		return
	}
	js = l.observe(job)
	now := l.env.now()
	js.deployedAt, js.deployProgress = now, time.Time{}
	l.metrics.jobRestarts.WithLabelValues(js.id).Inc()
	l.metrics.recoveries.WithLabelValues(js.id, fsm.RecoveryScopeTasks).Inc()
	var restore *fsm.Checkpoint
	for i := range job.Completed {
		if job.Completed[i].ID == restoreID {
			restore = &job.Completed[i]
		}
	}
	if restore == nil {
		return // cannot be: the FSM checked it; the deploy timeout restarts the job
	}
	log := l.jobLogger(js)
	restored := make(map[string]bool, len(ids))
	for _, id := range ids {
		restored[id] = true
	}
	for _, t := range job.Tasks {
		if !restored[t.ID] {
			continue
		}
		// recoverTasks checked that discovery may be on: a restored
		// source needs it whenever the lost one may have had it.
		d := buildDeploy(job, t, restore, "", true)
		d.Partial = true
		if err := l.sendTo(t.Worker, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Deploy{Deploy: d}}); err != nil {
			log.Warn("restored task's deploy not sent", "task", t.ID, "worker", t.Worker, "err", err)
		}
	}
	retarget := &transport.RetargetTasks{
		JobId: js.id, Attempt: attempt, MapTasks: mapTaskRefs(job), Restored: ids,
		RestoreCheckpointId: restore.ID, RestoreOffsets: checkpointOffsets(restore),
	}
	sent := make(map[string]bool)
	for _, t := range job.Tasks {
		if restored[t.ID] || sent[t.Worker] {
			continue
		}
		sent[t.Worker] = true
		if err := l.sendTo(t.Worker, &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Retarget{Retarget: retarget}}); err != nil {
			log.Warn("retarget not sent; sent again when the worker's session opens", "worker", t.Worker, "err", err)
		}
	}
	log.Info("restored tasks deployed; surviving tasks retargeted", "tasks", ids, "restore_checkpoint", restore.ID,
		"surviving_workers", slices.Sorted(maps.Keys(sent)), "since_detected", now.Sub(detected).Round(time.Millisecond))
}

// retargetOf returns the RetargetTasks of job's current attempt if a
// task-scoped recovery started it, and nil otherwise. A worker whose session
// was down when it was sent, or whose leader died before sending it, gets it
// when its session opens (openSession); a source that has it already finds
// nothing to move.
func retargetOf(job fsm.Job) *transport.RetargetTasks {
	n := len(job.Recoveries)
	if n == 0 || job.Recoveries[n-1].Attempt != job.Attempt || job.Recoveries[n-1].Scope != fsm.RecoveryScopeTasks {
		return nil
	}
	rec := job.Recoveries[n-1]
	i := slices.IndexFunc(job.Completed, func(cp fsm.Checkpoint) bool { return cp.ID == rec.RestoredFrom })
	if i < 0 {
		return nil
	}
	return &transport.RetargetTasks{
		JobId: job.ID, Attempt: job.Attempt, MapTasks: mapTaskRefs(job), Restored: rec.Tasks,
		RestoreCheckpointId: rec.RestoredFrom, RestoreOffsets: checkpointOffsets(&job.Completed[i]),
	}
}

// unixNano is t in unix nanoseconds, 0 for the zero time.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}
