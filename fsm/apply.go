package fsm

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"math"
	"regexp"
	"slices"
)

// Every applyX below validates the whole command before it changes anything,
// so a rejected command leaves the state exactly as it was: the same on every
// replica, whatever the error. None reads a clock or a random source.

// jobIDPattern is what job ids may look like: they appear in URL paths and
// in Kafka consumer-group names.
var jobIDPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// TaskID is the canonical id of task index of the given kind ("source-0",
// "map-1"); JobRestarted accepts no other.
func TaskID(kind TaskKind, index int) string {
	return fmt.Sprintf("%s-%d", kind, index)
}

// liveJob returns the job a command names, refusing unknown and cancelled jobs.
func (s *State) liveJob(id string) (*Job, error) {
	j, ok := s.Jobs[id]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrNoSuchJob, id)
	}
	if j.Status == JobCancelled {
		return nil, ErrJobCancelled
	}
	// Copy on write: the job an apply changes is a copy that replaces the
	// stored one, so that a snapshot may share every stored job instead of
	// copying the whole state while Apply waits (FSM.Snapshot).
	c := j.sharedCopy()
	s.Jobs[id] = &c
	return &c, nil
}

// MaxSubmissionKeyLength bounds a submission key.
const MaxSubmissionKeyLength = 128

// ValidSubmissionKey returns an error unless key may be a submission key:
// 1 to MaxSubmissionKeyLength printable ASCII characters, no space (a UUID,
// say).
func ValidSubmissionKey(key string) error {
	if len(key) == 0 || len(key) > MaxSubmissionKeyLength {
		return fmt.Errorf("submission key of %d characters: want 1 to %d", len(key), MaxSubmissionKeyLength)
	}
	for _, c := range []byte(key) {
		if c < 0x21 || c > 0x7e {
			return fmt.Errorf("submission key: character %q: want printable ASCII without spaces", c)
		}
	}
	return nil
}

// jobBySubmissionKey returns the job submitted with key, or nil. It looks
// at every job: it runs for submissions that carry a key, at the rate
// people and deploy scripts submit jobs, where an index kept through every
// copy of the state would cost more than it saves.
func (s *State) jobBySubmissionKey(key string) *Job {
	for _, j := range s.Jobs {
		if j.SubmissionKey == key {
			return j
		}
	}
	return nil
}

func (s *State) applyRegisterJob(c *RegisterJobCmd) error {
	if c.SubmissionKey != "" {
		s.SubmissionKeys = true // taken or refused: the log holds one
	}
	if !jobIDPattern.MatchString(c.ID) {
		return fmt.Errorf("register job %q: %w: id must be 1-128 characters of A-Z a-z 0-9 . _ -", c.ID, ErrMalformedCommand)
	}
	if _, ok := s.Jobs[c.ID]; ok {
		return fmt.Errorf("register job %s: %w", c.ID, ErrJobExists)
	}
	// A purged job's id stays taken while a savepoint of it is kept: a new
	// job of that id would write its savepoints under the same ids and paths.
	// In id order: the error names the same savepoint on every replica.
	for _, id := range slices.Sorted(maps.Keys(s.Savepoints)) {
		if sp := s.Savepoints[id]; sp.JobID == c.ID {
			return fmt.Errorf("register job %s: %w: savepoint %s of a purged job of that id is kept", c.ID, ErrJobExists, sp.ID)
		}
	}
	if c.SubmissionKey != "" {
		if err := ValidSubmissionKey(c.SubmissionKey); err != nil {
			return fmt.Errorf("register job %s: %w: %w", c.ID, ErrMalformedCommand, err)
		}
		if j := s.jobBySubmissionKey(c.SubmissionKey); j != nil {
			return fmt.Errorf("register job %s: %w: job %s was submitted with it", c.ID, ErrDuplicateSubmission, j.ID)
		}
	}
	if err := c.Spec.Validate(nil); err != nil {
		return fmt.Errorf("register job %s: %w: %w", c.ID, ErrInvalidSpec, err)
	}
	if sp := c.FromSavepoint; sp != nil {
		if err := checkRestorable(c.Spec, sp); err != nil {
			return fmt.Errorf("register job %s from savepoint %s: %w", c.ID, sp.ID, err)
		}
	}
	s.Jobs[c.ID] = &Job{
		ID:            c.ID,
		SubmissionKey: c.SubmissionKey,
		Spec:          c.Spec,
		Status:        JobPending,
		Tasks:         []Task{},
		SubmittedAt:   c.Time,
		UpdatedAt:     c.Time,
		Completed:     []Checkpoint{},
		Aborted:       []Checkpoint{},
	}
	if c.FromSavepoint != nil {
		sp := c.FromSavepoint.clone(false)
		s.Jobs[c.ID].FromSavepoint = &sp
	}
	return nil
}

// checkRestorable verifies that a job of spec can restore sp: the same
// source topic (offsets are per partition of it) and the same number of key
// groups (state is per key group); operator and parallelism may differ.
func checkRestorable(spec JobSpec, sp *Savepoint) error {
	switch {
	case sp.Topic != spec.Source.Topic:
		return fmt.Errorf("%w: savepoint reads topic %q, the job reads %q", ErrInvalidSpec, sp.Topic, spec.Source.Topic)
	case sp.MaxParallelism != spec.Operator.MaxParallelism:
		return fmt.Errorf("%w: operator.max_parallelism: savepoint has %d key groups, the job %d", ErrInvalidSpec, sp.MaxParallelism, spec.Operator.MaxParallelism)
	case len(sp.Tasks) == 0:
		return fmt.Errorf("%w: savepoint has no task states", ErrInvalidSpec)
	}
	return nil
}

func (s *State) applyJobRestarted(c *JobRestartedCmd) error {
	fail := func(err error) error {
		return fmt.Errorf("restart job %s as attempt %d: %w", c.JobID, c.Attempt, err)
	}
	j, err := s.liveJob(c.JobID)
	if err != nil {
		return fail(err)
	}
	if c.Attempt != j.Attempt+1 {
		return fail(fmt.Errorf("%w: job is at attempt %d, the next is %d", ErrStaleAttempt, j.Attempt, j.Attempt+1))
	}
	if err := checkAssignment(j.Spec, c.Tasks); err != nil {
		return fail(err)
	}
	if len(c.ChannelToken) > MaxChannelToken {
		return fail(fmt.Errorf("%w: channel token of %d bytes, at most %d", ErrInvalidAssignment, len(c.ChannelToken), MaxChannelToken))
	}
	if c.RestoreFrom != 0 && !slices.ContainsFunc(j.Completed, func(cp Checkpoint) bool { return cp.ID == c.RestoreFrom }) {
		return fail(fmt.Errorf("%w: restore from checkpoint %d, which is not a retained completed checkpoint", ErrInvalidAssignment, c.RestoreFrom))
	}
	if j.Pending != nil {
		j.abortPending("job restarted: "+c.Reason, c.Time)
	}
	if c.Attempt > 1 {
		j.Restarts++
	}
	j.Attempt = c.Attempt
	j.Tasks = slices.Clone(c.Tasks)
	for i := range j.Tasks {
		// Every task starts anew in a job-scoped (re)start.
		j.Tasks[i].Attempt, j.Tasks[i].StartedAt = c.Attempt, c.Time
	}
	if c.Attempt > 1 {
		j.Recoveries = appendBounded(j.Recoveries, MaxRecoveryHistory, RecoveryRecord{
			Attempt: c.Attempt, Scope: RecoveryScopeJob, Tasks: taskIDs(j.Tasks), Reason: c.Reason,
			DetectedAt: c.DetectedAt, StartedAt: c.Time, RestoredFrom: c.RestoreFrom,
		})
	}
	j.RestoredFrom = c.RestoreFrom
	j.ChannelToken = c.ChannelToken
	j.Status = JobRunning
	j.Reason = c.Reason
	j.ConsecutiveAborts = 0
	j.UpdatedAt = c.Time
	j.Attempts = appendBounded(j.Attempts, MaxAttemptHistory,
		AttemptRecord{Attempt: c.Attempt, StartedAt: c.Time, Reason: c.Reason, RestoredFrom: c.RestoreFrom})
	return nil
}

// taskIDs lists the ids of tasks in order.
func taskIDs(tasks []Task) []string {
	ids := make([]string, len(tasks))
	for i, t := range tasks {
		ids[i] = t.ID
	}
	return ids
}

// applyTasksRestarted is a task-scoped recovery. Each restored task must be
// one of the job's, with the same kind, index, partitions and key groups:
// only its worker changes, so the job's assignment stays whole and the
// surviving tasks route to it unchanged.
func (s *State) applyTasksRestarted(c *TasksRestartedCmd) error {
	fail := func(err error) error {
		return fmt.Errorf("restore tasks of job %s as attempt %d: %w", c.JobID, c.Attempt, err)
	}
	j, err := s.liveJob(c.JobID)
	if err != nil {
		return fail(err)
	}
	if j.Status != JobRunning {
		return fail(fmt.Errorf("%w: job is %s; only a running job recovers tasks alone", ErrInvalidAssignment, j.Status))
	}
	if c.Attempt != j.Attempt+1 {
		return fail(fmt.Errorf("%w: job is at attempt %d, the next is %d", ErrStaleAttempt, j.Attempt, j.Attempt+1))
	}
	if len(c.Tasks) == 0 {
		return fail(fmt.Errorf("%w: no tasks to restore", ErrInvalidAssignment))
	}
	// The surviving tasks committed their sink output up to the newest
	// completed checkpoint: a restored task restoring an older one would
	// write some of its output again.
	if n := len(j.Completed); n == 0 || j.Completed[n-1].ID != c.RestoreFrom {
		return fail(fmt.Errorf("%w: restore from checkpoint %d, which is not the newest completed checkpoint", ErrInvalidAssignment, c.RestoreFrom))
	}
	tasks := slices.Clone(j.Tasks)
	seen := make(map[string]bool, len(c.Tasks))
	for _, r := range c.Tasks {
		if seen[r.ID] {
			return fail(fmt.Errorf("%w: task %q restored twice", ErrInvalidAssignment, r.ID))
		}
		seen[r.ID] = true
		i := slices.IndexFunc(tasks, func(t Task) bool { return t.ID == r.ID })
		if i < 0 {
			return fail(fmt.Errorf("%w: the job has no task %q", ErrInvalidAssignment, r.ID))
		}
		t := tasks[i]
		if r.Kind != t.Kind || r.Index != t.Index || !slices.Equal(r.Partitions, t.Partitions) || !sameRange(r.KeyGroups, t.KeyGroups) {
			return fail(fmt.Errorf("%w: task %s may change only its worker in a task-scoped recovery", ErrInvalidAssignment, r.ID))
		}
		t.Worker, t.DataAddr = r.Worker, r.DataAddr
		t.Attempt, t.StartedAt = c.Attempt, c.Time
		tasks[i] = t
	}
	if err := checkAssignment(j.Spec, tasks); err != nil {
		return fail(err)
	}
	if j.Pending != nil {
		j.abortPending("tasks restored: "+c.Reason, c.Time)
	}
	j.Restarts++
	j.Attempt = c.Attempt
	j.Tasks = tasks
	j.RestoredFrom = c.RestoreFrom
	j.ConsecutiveAborts = 0
	j.UpdatedAt = c.Time
	ids := make([]string, 0, len(c.Tasks))
	for _, t := range tasks {
		if seen[t.ID] {
			ids = append(ids, t.ID)
		}
	}
	j.Attempts = appendBounded(j.Attempts, MaxAttemptHistory,
		AttemptRecord{Attempt: c.Attempt, StartedAt: c.Time, Reason: c.Reason, RestoredFrom: c.RestoreFrom})
	j.Recoveries = appendBounded(j.Recoveries, MaxRecoveryHistory, RecoveryRecord{
		Attempt: c.Attempt, Scope: RecoveryScopeTasks, Tasks: ids, Reason: c.Reason,
		DetectedAt: c.DetectedAt, StartedAt: c.Time, RestoredFrom: c.RestoreFrom,
	})
	return nil
}

// sameRange reports whether two optional key-group ranges are equal.
func sameRange(a, b *KeyGroupRange) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// appendBounded returns a new slice of the newest elements of s and v, at
// most limit of them. It never writes to s: a job's histories are shared by
// its copies (Job.sharedCopy).
func appendBounded[T any](s []T, limit int, v T) []T {
	keep := s[max(0, len(s)+1-limit):]
	out := make([]T, 0, len(keep)+1)
	return append(append(out, keep...), v)
}

// recordHistory adds a finished checkpoint to j's History.
func (j *Job) recordHistory(cp Checkpoint, states map[string]TaskState) {
	sum := CheckpointSummary{ID: cp.ID, Attempt: cp.Attempt, Status: cp.Status, Savepoint: cp.Savepoint,
		TriggeredAt: cp.TriggeredAt, EndedAt: cp.EndedAt, Reason: cp.Reason}
	for _, st := range states {
		sum.StateBytes += cmp.Or(st.StateBytes, int64(len(st.Keyed)))
	}
	j.History = appendBounded(j.History, MaxCheckpointHistory, sum)
}

// checkAssignment verifies that tasks are exactly the source and map tasks of
// spec: canonical ids, every index once, a worker each, source partitions
// following p mod S == index, and map key-group ranges that tile
// [0, max_parallelism) in index order.
func checkAssignment(spec JobSpec, tasks []Task) error {
	numSources, numMaps := spec.Source.Parallelism, spec.Operator.Parallelism
	if len(tasks) != numSources+numMaps {
		return fmt.Errorf("%w: %d tasks for %d source and %d map tasks", ErrInvalidAssignment, len(tasks), numSources, numMaps)
	}
	sources := make([]*Task, numSources)
	mapTasks := make([]*Task, numMaps)
	for i := range tasks {
		t := &tasks[i]
		var slot []*Task
		switch t.Kind {
		case TaskSource:
			slot = sources
		case TaskMap:
			slot = mapTasks
		default:
			return fmt.Errorf("%w: task %q has unknown kind %q", ErrInvalidAssignment, t.ID, t.Kind)
		}
		if t.Index < 0 || t.Index >= len(slot) {
			return fmt.Errorf("%w: task %q: %s index %d out of range [0,%d)", ErrInvalidAssignment, t.ID, t.Kind, t.Index, len(slot))
		}
		if slot[t.Index] != nil {
			return fmt.Errorf("%w: task %q: %s index %d assigned twice", ErrInvalidAssignment, t.ID, t.Kind, t.Index)
		}
		slot[t.Index] = t
		if want := TaskID(t.Kind, t.Index); t.ID != want {
			return fmt.Errorf("%w: task %q should have id %q", ErrInvalidAssignment, t.ID, want)
		}
		if t.Worker == "" {
			return fmt.Errorf("%w: task %s has no worker", ErrInvalidAssignment, t.ID)
		}
	}
	seen := make(map[int32]bool)
	for _, t := range sources {
		if t.KeyGroups != nil {
			return fmt.Errorf("%w: source task %s has key groups", ErrInvalidAssignment, t.ID)
		}
		for _, p := range t.Partitions {
			if p < 0 || int(p)%numSources != t.Index {
				return fmt.Errorf("%w: source task %s cannot read partition %d (p mod %d must be %d)", ErrInvalidAssignment, t.ID, p, numSources, t.Index)
			}
			if seen[p] {
				return fmt.Errorf("%w: source task %s lists partition %d twice", ErrInvalidAssignment, t.ID, p)
			}
			seen[p] = true
		}
	}
	next := 0
	for _, t := range mapTasks {
		if len(t.Partitions) > 0 {
			return fmt.Errorf("%w: map task %s has partitions", ErrInvalidAssignment, t.ID)
		}
		kg := t.KeyGroups
		if kg == nil {
			return fmt.Errorf("%w: map task %s has no key groups", ErrInvalidAssignment, t.ID)
		}
		if kg.Start != next || kg.End <= kg.Start {
			return fmt.Errorf("%w: map task %s owns key groups [%d,%d), expected a non-empty range starting at %d", ErrInvalidAssignment, t.ID, kg.Start, kg.End, next)
		}
		next = kg.End
	}
	if groups := spec.Operator.MaxParallelism; next != groups {
		return fmt.Errorf("%w: map tasks cover key groups [0,%d), not [0,%d)", ErrInvalidAssignment, next, groups)
	}
	return nil
}

func (s *State) applyJobStatus(c *JobStatusCmd) error {
	fail := func(err error) error {
		return fmt.Errorf("set status of job %s to %q: %w", c.JobID, c.Status, err)
	}
	j, err := s.liveJob(c.JobID)
	if err != nil {
		return fail(err)
	}
	switch c.Status {
	case JobPending, JobRestarting, JobFailing:
	case JobRunning:
		if j.Attempt == 0 {
			return fail(ErrNotDeployed)
		}
	case JobCancelled:
		return fail(fmt.Errorf("%w: cancel with JobCancelled", ErrInvalidStatus))
	default:
		return fail(ErrInvalidStatus)
	}
	j.Status = c.Status
	j.Reason = c.Reason
	j.UpdatedAt = c.Time
	return nil
}

// runningAttempt returns the job a checkpoint command names if it is running
// the command's attempt.
func (s *State) runningAttempt(jobID string, attempt uint64) (*Job, error) {
	j, err := s.liveJob(jobID)
	if err != nil {
		return nil, err
	}
	if j.Status != JobRunning {
		return nil, fmt.Errorf("%w: status is %s", ErrJobNotRunning, j.Status)
	}
	if attempt != j.Attempt {
		return nil, fmt.Errorf("%w: job is at attempt %d", ErrStaleAttempt, j.Attempt)
	}
	return j, nil
}

func (s *State) applyCheckpointTriggered(c *CheckpointTriggeredCmd) (uint64, error) {
	fail := func(err error) error {
		return fmt.Errorf("trigger checkpoint of job %s attempt %d: %w", c.JobID, c.Attempt, err)
	}
	if c.ID != 0 {
		// The log holds a chosen id, applied or refused: a build that
		// ignores the field would have applied it otherwise.
		s.ChosenCheckpointIDs = true
	}
	j, err := s.runningAttempt(c.JobID, c.Attempt)
	if err != nil {
		return 0, fail(err)
	}
	if j.Pending != nil {
		return 0, fail(fmt.Errorf("%w: checkpoint %d", ErrCheckpointPending, j.Pending.ID))
	}
	if c.Stop && !c.Savepoint {
		return 0, fail(fmt.Errorf("%w: stop without savepoint", ErrMalformedCommand))
	}
	if c.ID == math.MaxUint64 || (c.ID == 0 && j.LastCheckpointID >= math.MaxUint64-1) {
		// No id would be left after it: the next would wrap to 0.
		return 0, fail(fmt.Errorf("%w: checkpoint id %d is the last there is", ErrMalformedCommand, max(c.ID, j.LastCheckpointID+1)))
	}
	switch {
	case c.ID == 0:
		j.LastCheckpointID++
	case c.ID <= j.LastCheckpointID:
		return 0, fail(fmt.Errorf("%w: id %d, last issued %d", ErrCheckpointIDUsed, c.ID, j.LastCheckpointID))
	default:
		j.skipIDs(c.ID, c.Time)
		j.LastCheckpointID = c.ID
	}
	j.Pending = &Checkpoint{
		ID:          j.LastCheckpointID,
		Attempt:     j.Attempt,
		Status:      CheckpointPending,
		TriggeredAt: c.Time,
		Savepoint:   c.Savepoint,
		Stop:        c.Stop,
	}
	j.UpdatedAt = c.Time
	return j.LastCheckpointID, nil
}

// pendingCheckpoint returns j's pending checkpoint if its id is id.
func (j *Job) pendingCheckpoint(id uint64) (*Checkpoint, error) {
	if j.Pending == nil {
		return nil, ErrNoPendingCheckpoint
	}
	if j.Pending.ID != id {
		return nil, fmt.Errorf("%w: pending is %d", ErrCheckpointMismatch, j.Pending.ID)
	}
	return j.Pending, nil
}

func (s *State) applyCheckpointCompleted(c *CheckpointCompletedCmd) error {
	fail := func(err error) error {
		return fmt.Errorf("complete checkpoint %d of job %s attempt %d: %w", c.CheckpointID, c.JobID, c.Attempt, err)
	}
	j, err := s.runningAttempt(c.JobID, c.Attempt)
	if err != nil {
		return fail(err)
	}
	cp, err := j.pendingCheckpoint(c.CheckpointID)
	if err != nil {
		return fail(err)
	}
	if err := checkStates(j.Tasks, c.States, j.Spec.Source.Parallelism); err != nil {
		return fail(err)
	}
	if cp.Savepoint {
		return s.completeSavepoint(j, c)
	}
	done := *cp
	done.Status = CheckpointCompleted
	done.EndedAt = c.Time
	done.Tasks = c.States
	j.recordHistory(done, c.States)
	j.Completed = appendBounded(j.Completed, max(j.Spec.Checkpoint.Retained, 1), done)
	j.Pending = nil
	j.ConsecutiveAborts = 0
	j.UpdatedAt = c.Time
	if n := len(j.Recoveries); n > 0 && j.Recoveries[n-1].CheckpointedAt == 0 && j.Recoveries[n-1].Attempt == j.Attempt {
		// The first checkpoint after a recovery covers every task again.
		// The record is changed in a copy: the slice is shared.
		j.Recoveries = slices.Clone(j.Recoveries)
		j.Recoveries[n-1].CheckpointID, j.Recoveries[n-1].CheckpointedAt = done.ID, c.Time
	}
	return nil
}

// checkStates verifies that states holds exactly one valid state per task,
// keyed by task id. Tasks are checked in assignment order and extra keys in
// sorted order, so the error is the same on every replica. numSources is the
// attempt's source parallelism.
func checkStates(tasks []Task, states map[string]TaskState, numSources int) error {
	for _, t := range tasks {
		st, ok := states[t.ID]
		if !ok {
			return fmt.Errorf("%w: no state for task %s", ErrIncompleteStates, t.ID)
		}
		if err := checkState(t, st); err != nil {
			return fmt.Errorf("task %s: %w", t.ID, err)
		}
		if err := checkOwnership(t, st, numSources); err != nil {
			return fmt.Errorf("task %s: %w", t.ID, err)
		}
	}
	if len(states) != len(tasks) {
		for _, id := range slices.Sorted(maps.Keys(states)) {
			if !slices.ContainsFunc(tasks, func(t Task) bool { return t.ID == id }) {
				return fmt.Errorf("%w: state for task %q, which is not in the attempt", ErrIncompleteStates, id)
			}
		}
	}
	return nil
}

// checkState checks one task's state. A source's offsets cover every
// partition of its assignment and may name more: checkOwnership checks those.
func checkState(t Task, st TaskState) error {
	if st.TaskID != t.ID {
		return fmt.Errorf("%w: state names task %q", ErrIncompleteStates, st.TaskID)
	}
	if st.Kind != t.Kind {
		return fmt.Errorf("%w: state of kind %q for a %s task", ErrIncompleteStates, st.Kind, t.Kind)
	}
	if st.Worker != "" && st.Worker != t.Worker {
		return fmt.Errorf("%w: state from worker %q, task runs on %q", ErrIncompleteStates, st.Worker, t.Worker)
	}
	if st.RecordsIn < 0 || st.RecordsOut < 0 {
		return fmt.Errorf("%w: negative record counts (%d in, %d out)", ErrIncompleteStates, st.RecordsIn, st.RecordsOut)
	}
	switch t.Kind {
	case TaskSource:
		if len(st.Keyed) > 0 || st.KeyedSHA256 != "" {
			return fmt.Errorf("%w: source state has keyed state", ErrIncompleteStates)
		}
		for _, p := range t.Partitions {
			if _, ok := st.Offsets[p]; !ok {
				return fmt.Errorf("%w: no offset for partition %d", ErrIncompleteStates, p)
			}
		}
		for _, p := range slices.Sorted(maps.Keys(st.Offsets)) {
			if off := st.Offsets[p]; off < 0 {
				return fmt.Errorf("%w: negative offset %d for partition %d", ErrIncompleteStates, off, p)
			}
		}
	case TaskMap:
		if len(st.Offsets) > 0 {
			return fmt.Errorf("%w: map state has offsets", ErrIncompleteStates)
		}
		if st.KeyGroups != nil && (t.KeyGroups == nil || *st.KeyGroups != *t.KeyGroups) {
			return fmt.Errorf("%w: state covers key groups %v, task owns %v", ErrIncompleteStates, *st.KeyGroups, t.KeyGroups)
		}
		if len(st.Files) > 0 {
			return checkFiles(t, st)
		}
		if len(st.Keyed) > MaxInlineStateBytes {
			return fmt.Errorf("%w: %d bytes of keyed state exceed the inline limit of %d bytes per task", ErrStateTooLarge, len(st.Keyed), MaxInlineStateBytes)
		}
		want, err := hex.DecodeString(st.KeyedSHA256)
		if err != nil || len(want) != sha256.Size {
			return fmt.Errorf("%w: keyed_sha256 %q is not a SHA-256 in hex", ErrIncompleteStates, st.KeyedSHA256)
		}
		if got := sha256.Sum256(st.Keyed); !bytes.Equal(got[:], want) {
			return fmt.Errorf("%w: %d bytes hash to %x, ack says %s", ErrStateChecksum, len(st.Keyed), got, st.KeyedSHA256)
		}
	}
	return nil
}

// checkOwnership verifies that a source state names offsets only for
// partitions the task owns, p mod numSources == index: its assignment and
// those it discovered while running (source.partition_discovery).
func checkOwnership(t Task, st TaskState, numSources int) error {
	if t.Kind != TaskSource {
		return nil
	}
	for _, p := range slices.Sorted(maps.Keys(st.Offsets)) {
		if p < 0 || numSources < 1 || int(p)%numSources != t.Index {
			return fmt.Errorf("%w: offset for partition %d, which the task does not own (p mod %d must be %d)", ErrIncompleteStates, p, numSources, t.Index)
		}
	}
	return nil
}

// checkFiles verifies the file chain of a map task's state: handles that
// name a file, a size and a SHA-256, key groups that meet the task's own, a
// chain that starts with a full file, and no inline state beside it.
func checkFiles(t Task, st TaskState) error {
	if len(st.Keyed) > 0 || st.KeyedSHA256 != "" {
		return fmt.Errorf("%w: state has both inline data and files", ErrIncompleteStates)
	}
	if len(st.Files) > MaxStateFiles {
		return fmt.Errorf("%w: %d state files, at most %d", ErrIncompleteStates, len(st.Files), MaxStateFiles)
	}
	if !st.Files[0].Full {
		return fmt.Errorf("%w: state file chain starts with delta %s", ErrIncompleteStates, st.Files[0].Path)
	}
	for _, f := range st.Files {
		switch {
		case f.Path == "" || len(f.Path) > 1024:
			return fmt.Errorf("%w: state file path %q", ErrIncompleteStates, f.Path)
		case f.Size <= 0:
			return fmt.Errorf("%w: state file %s has size %d", ErrIncompleteStates, f.Path, f.Size)
		case !isSHA256Hex(f.SHA256):
			return fmt.Errorf("%w: state file %s: sha256 %q is not a SHA-256 in hex", ErrIncompleteStates, f.Path, f.SHA256)
		case f.KeyGroups.Start < 0 || f.KeyGroups.End <= f.KeyGroups.Start:
			return fmt.Errorf("%w: state file %s covers key groups [%d,%d)", ErrIncompleteStates, f.Path, f.KeyGroups.Start, f.KeyGroups.End)
		case t.KeyGroups != nil && (f.KeyGroups.End <= t.KeyGroups.Start || t.KeyGroups.End <= f.KeyGroups.Start):
			return fmt.Errorf("%w: state file %s covers key groups [%d,%d), none of the task's [%d,%d)", ErrIncompleteStates,
				f.Path, f.KeyGroups.Start, f.KeyGroups.End, t.KeyGroups.Start, t.KeyGroups.End)
		}
	}
	return nil
}

func isSHA256Hex(s string) bool {
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == sha256.Size
}

// completeSavepoint turns j's pending savepoint into a Savepoint; a final
// one cancels the job.
func (s *State) completeSavepoint(j *Job, c *CheckpointCompletedCmd) error {
	if len(s.Savepoints) >= MaxSavepoints {
		return fmt.Errorf("complete savepoint %d of job %s: %w: %d kept; delete some", c.CheckpointID, j.ID, ErrTooManySavepoints, len(s.Savepoints))
	}
	if id := SavepointID(j.ID, c.CheckpointID); s.Savepoints[id] != nil {
		return fmt.Errorf("complete savepoint %d of job %s: %w: %s", c.CheckpointID, j.ID, ErrSavepointExists, id)
	}
	sp := &Savepoint{
		ID:             SavepointID(j.ID, c.CheckpointID),
		JobID:          j.ID,
		JobName:        j.Spec.Name,
		CheckpointID:   c.CheckpointID,
		Attempt:        c.Attempt,
		CreatedAt:      c.Time,
		Location:       c.Location,
		Topic:          j.Spec.Source.Topic,
		Operator:       j.Spec.Operator.Name,
		MaxParallelism: j.Spec.Operator.MaxParallelism,
		Tasks:          c.States,
	}
	s.Savepoints[sp.ID] = sp
	done := *j.Pending
	done.Status, done.EndedAt = CheckpointCompleted, c.Time
	j.recordHistory(done, c.States)
	stop := j.Pending.Stop
	j.Pending = nil
	j.UpdatedAt = c.Time
	if stop {
		j.Status = JobCancelled
		j.Reason = stoppedWithReason + sp.ID
	}
	return nil
}

// stoppedWithReason begins the reason of a job a stop-with-savepoint
// cancelled, followed by the savepoint's id. Snapshots and replicas keep
// reasons as written: it must never change.
const stoppedWithReason = "stopped with savepoint "

// StoppedWith reports whether the job was stopped with its savepoint of
// checkpoint id: a stop-with-savepoint, whose sink transactions are
// committed, unlike another savepoint's.
func (j *Job) StoppedWith(id uint64) bool {
	return j.Status == JobCancelled && j.Reason == stoppedWithReason+SavepointID(j.ID, id)
}

func (s *State) applySavepointDeleted(c *SavepointDeletedCmd) error {
	if _, ok := s.Savepoints[c.ID]; !ok {
		return fmt.Errorf("delete savepoint %q: %w", c.ID, ErrNoSuchSavepoint)
	}
	delete(s.Savepoints, c.ID)
	return nil
}

func (s *State) applyCheckpointAborted(c *CheckpointAbortedCmd) error {
	fail := func(err error) error {
		return fmt.Errorf("abort checkpoint %d of job %s: %w", c.CheckpointID, c.JobID, err)
	}
	j, err := s.liveJob(c.JobID)
	if err != nil {
		return fail(err)
	}
	if _, err := j.pendingCheckpoint(c.CheckpointID); err != nil {
		return fail(err)
	}
	j.abortPending(c.Reason, c.Time)
	if !c.NotCounted {
		j.ConsecutiveAborts++
	}
	j.UpdatedAt = c.Time
	return nil
}

// SkippedReason is the reason of an id that a leader skipped, recorded as
// an aborted checkpoint: its trigger may have been sent without being
// committed.
const SkippedReason = "id skipped: a leader may have sent its trigger without committing it (a leader change, or a failed commit)"

// skipIDs records the ids from j's last issued one to below next as
// aborted with SkippedReason, so that every id of the history is accounted
// for; at most MaxAbortedHistory of them, the newest, since no more are kept.
func (j *Job) skipIDs(next uint64, at int64) {
	from := j.LastCheckpointID + 1
	if next-from > MaxAbortedHistory {
		from = next - MaxAbortedHistory
	}
	for id := from; id < next; id++ {
		cp := Checkpoint{ID: id, Attempt: j.Attempt, Status: CheckpointAborted, TriggeredAt: at, EndedAt: at, Reason: SkippedReason}
		j.recordHistory(cp, nil)
		j.Aborted = appendBounded(j.Aborted, MaxAbortedHistory, cp)
	}
}

// abortPending moves j's pending checkpoint to the aborted history, keeping
// at most MaxAbortedHistory entries. j.Pending must not be nil.
func (j *Job) abortPending(reason string, at int64) {
	cp := *j.Pending
	cp.Status = CheckpointAborted
	cp.Reason = reason
	cp.EndedAt = at
	j.recordHistory(cp, nil)
	j.Aborted = appendBounded(j.Aborted, MaxAbortedHistory, cp)
	j.Pending = nil
}

func (s *State) applyJobCancelled(c *JobCancelledCmd) error {
	j, err := s.liveJob(c.JobID)
	if err != nil {
		return fmt.Errorf("cancel job %s: %w", c.JobID, err)
	}
	if j.Pending != nil {
		j.abortPending("job cancelled", c.Time)
	}
	j.Status = JobCancelled
	j.Reason = c.Reason
	j.UpdatedAt = c.Time
	return nil
}

// applyJobPurged forgets a cancelled job. Only a cancelled job goes: its
// attempts can no longer write, so nothing but the leader's collection
// refers to it. Purged counts it, for the feature level a coordinator
// replaying the log needs.
func (s *State) applyJobPurged(c *JobPurgedCmd) error {
	j, ok := s.Jobs[c.JobID]
	if !ok {
		return fmt.Errorf("purge job %q: %w", c.JobID, ErrNoSuchJob)
	}
	if j.Status != JobCancelled {
		return fmt.Errorf("purge job %s: %w: it is %s", c.JobID, ErrJobNotCancelled, j.Status)
	}
	delete(s.Jobs, c.JobID)
	s.Purged++
	return nil
}
