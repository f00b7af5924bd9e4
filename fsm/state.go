package fsm

import (
	"fmt"
	"maps"
	"slices"
)

// State is the whole replicated state: every job ever registered, keyed by
// job id. Only Apply and Restore change it, under the FSM's write lock.
type State struct {
	Jobs map[string]*Job `json:"jobs"`
	// Savepoints holds every savepoint not deleted, by id.
	Savepoints map[string]*Savepoint `json:"savepoints,omitempty"`
	// Purged counts the jobs JobPurged removed. A coordinator that does not
	// know that command must not replay a log that holds one, so once it is
	// above 0 every coordinator joining needs the feature level of job
	// garbage collection.
	Purged uint64 `json:"purged,omitempty"`
	// FramedBatches is set once a CommandFramedBatch was applied. A
	// coordinator that does not know that command must not replay a log
	// that may hold one, so from then on every coordinator joining needs
	// the feature level of framed batches.
	FramedBatches bool `json:"framed_batches,omitempty"`
	// ChosenCheckpointIDs is set once a CheckpointTriggered with the id
	// the leader chose was applied, whether the FSM took or refused it. A coordinator that does not know that
	// field would take the next id itself and keep another state, so from
	// then on every coordinator joining needs the feature level of chosen
	// checkpoint ids.
	ChosenCheckpointIDs bool `json:"chosen_checkpoint_ids,omitempty"`
	// SubmissionKeys is set once a RegisterJob with a submission key was
	// applied, whether the FSM took or refused it. A coordinator that does
	// not know that field would register a second job of the key, so from
	// then on every coordinator joining needs the feature level of
	// submission keys.
	SubmissionKeys bool `json:"submission_keys,omitempty"`
	// CompressedEntries is set once a CommandCompressed was applied,
	// whatever the result of the entry it carried: from then on every
	// coordinator joining needs the feature level of compressed entries.
	CompressedEntries bool `json:"compressed_entries,omitempty"`

	// touched lists the jobs the commands of the current Apply changed, for
	// FSM.OnJobChange. It is scratch, not state: never encoded, never cloned.
	touched []string
}

// newState returns an empty state.
func newState() *State {
	return &State{Jobs: make(map[string]*Job), Savepoints: make(map[string]*Savepoint)}
}

// clone returns a deep copy of s. With shareBlobs, keyed state blobs are
// shared instead of copied: the FSM never mutates a blob once applied, so a
// snapshot may share them, while copies handed to callers (who may mutate
// what they get) must not.
func (s *State) clone(shareBlobs bool) *State {
	c := &State{Jobs: make(map[string]*Job, len(s.Jobs)), Savepoints: make(map[string]*Savepoint, len(s.Savepoints)), Purged: s.Purged, FramedBatches: s.FramedBatches, ChosenCheckpointIDs: s.ChosenCheckpointIDs, SubmissionKeys: s.SubmissionKeys, CompressedEntries: s.CompressedEntries}
	for id, j := range s.Jobs {
		cj := j.clone(shareBlobs)
		c.Jobs[id] = &cj
	}
	for id, sp := range s.Savepoints {
		csp := sp.clone(shareBlobs)
		c.Savepoints[id] = &csp
	}
	return c
}

// share returns a copy of s that shares every job and savepoint with s. It
// is a consistent view as long as s is only changed by Apply, which never
// changes a stored job or savepoint in place (liveJob copies on write).
func (s *State) share() *State {
	return &State{Jobs: maps.Clone(s.Jobs), Savepoints: maps.Clone(s.Savepoints), Purged: s.Purged, FramedBatches: s.FramedBatches, ChosenCheckpointIDs: s.ChosenCheckpointIDs, SubmissionKeys: s.SubmissionKeys, CompressedEntries: s.CompressedEntries}
}

// check verifies the invariants a restored state must hold, so that a
// snapshot that decodes but is nonsense is refused rather than served.
func (s *State) check() error {
	if s.Jobs == nil {
		return fmt.Errorf("%w: no jobs map", ErrCorruptSnapshot)
	}
	if s.Savepoints == nil {
		s.Savepoints = make(map[string]*Savepoint) // snapshots before savepoints existed
	}
	for id, sp := range s.Savepoints {
		if sp == nil || sp.ID != id {
			return fmt.Errorf("%w: savepoint %q is null or holds another id", ErrCorruptSnapshot, id)
		}
	}
	keyOf := make(map[string]string) // submission key -> job
	for _, id := range slices.Sorted(maps.Keys(s.Jobs)) {
		if err := s.Jobs[id].check(id); err != nil {
			return fmt.Errorf("%w: job %q: %v", ErrCorruptSnapshot, id, err)
		}
		// One job per key is what RegisterJob keeps, and what the lookup
		// of a key relies on to answer the same on every replica.
		if k := s.Jobs[id].SubmissionKey; k != "" {
			if err := ValidSubmissionKey(k); err != nil {
				return fmt.Errorf("%w: job %q: %v", ErrCorruptSnapshot, id, err)
			}
			if other, ok := keyOf[k]; ok {
				return fmt.Errorf("%w: jobs %q and %q have the same submission key", ErrCorruptSnapshot, other, id)
			}
			keyOf[k] = id
		}
	}
	return nil
}

func (j *Job) check(key string) error {
	switch {
	case j == nil:
		return fmt.Errorf("null job")
	case j.ID != key:
		return fmt.Errorf("holds job id %q", j.ID)
	case !validJobStatus(j.Status):
		return fmt.Errorf("unknown status %q", j.Status)
	}
	if p := j.Pending; p != nil {
		if p.Status != CheckpointPending {
			return fmt.Errorf("pending checkpoint %d has status %q", p.ID, p.Status)
		}
		if p.ID != j.LastCheckpointID {
			return fmt.Errorf("pending checkpoint %d is not the last issued id %d", p.ID, j.LastCheckpointID)
		}
	}
	var prev uint64
	for _, cp := range j.Completed {
		if cp.Status != CheckpointCompleted {
			return fmt.Errorf("completed checkpoint %d has status %q", cp.ID, cp.Status)
		}
		if cp.ID <= prev || cp.ID > j.LastCheckpointID {
			return fmt.Errorf("completed checkpoint %d out of order (previous %d, last issued %d)", cp.ID, prev, j.LastCheckpointID)
		}
		prev = cp.ID
	}
	return nil
}

func validJobStatus(s JobStatus) bool {
	switch s {
	case JobPending, JobRunning, JobRestarting, JobFailing, JobCancelled:
		return true
	}
	return false
}

// sharedCopy returns a copy of j that shares with j what the FSM never
// changes once stored: the completed and aborted checkpoints (task states
// included) and the histories, which applies replace by new slices
// (appendBounded) instead of writing to them, and FromSavepoint, set only
// when the job is registered. What applies do change in
// place, the spec, the tasks and the pending checkpoint, is copied. An apply
// changes such a copy and stores it in j's place, so a snapshot holding j
// keeps seeing j as it was; the leader reads such copies. Sharing saves
// copying a hundred history entries and every retained checkpoint's task
// states per command and per read.
func (j *Job) sharedCopy() Job {
	c := *j
	// Clipped, an append to a shared slice by whoever holds the copy
	// allocates rather than writing past its end into the FSM's array
	// (decoded and cloned slices may have room to spare).
	c.Completed, c.Aborted = slices.Clip(j.Completed), slices.Clip(j.Aborted)
	c.Attempts, c.History, c.Recoveries = slices.Clip(j.Attempts), slices.Clip(j.History), slices.Clip(j.Recoveries)
	c.Spec = j.Spec.clone()
	c.Tasks = cloneSlice(j.Tasks, Task.clone)
	if j.Pending != nil {
		p := j.Pending.clone(true)
		c.Pending = &p
	}
	return c
}

// clone returns a deep copy of j: sharedCopy, with the shared parts copied
// too; keyed-state blobs are shared if shareBlobs.
func (j *Job) clone(shareBlobs bool) Job {
	c := j.sharedCopy()
	if j.Pending != nil && !shareBlobs {
		p := j.Pending.clone(false)
		c.Pending = &p
	}
	cloneCP := func(cp Checkpoint) Checkpoint { return cp.clone(shareBlobs) }
	c.Completed = cloneSlice(j.Completed, cloneCP)
	c.Aborted = cloneSlice(j.Aborted, cloneCP)
	c.Attempts = slices.Clone(j.Attempts)
	c.History = slices.Clone(j.History)
	c.Recoveries = cloneSlice(j.Recoveries, func(r RecoveryRecord) RecoveryRecord {
		r.Tasks = slices.Clone(r.Tasks)
		return r
	})
	if j.FromSavepoint != nil {
		sp := j.FromSavepoint.clone(shareBlobs)
		c.FromSavepoint = &sp
	}
	return c
}

func (sp Savepoint) clone(shareBlobs bool) Savepoint {
	c := sp
	c.Tasks = make(map[string]TaskState, len(sp.Tasks))
	for id, ts := range sp.Tasks {
		c.Tasks[id] = ts.clone(shareBlobs)
	}
	return c
}

func (s JobSpec) clone() JobSpec {
	c := s
	c.Source.Brokers = slices.Clone(s.Source.Brokers)
	if s.Sink != nil {
		sink := *s.Sink
		sink.Brokers = slices.Clone(s.Sink.Brokers)
		c.Sink = &sink
	}
	return c
}

func (t Task) clone() Task {
	c := t
	c.Partitions = slices.Clone(t.Partitions)
	if t.KeyGroups != nil {
		kg := *t.KeyGroups
		c.KeyGroups = &kg
	}
	return c
}

func (cp Checkpoint) clone(shareBlobs bool) Checkpoint {
	c := cp
	if cp.Tasks != nil {
		c.Tasks = make(map[string]TaskState, len(cp.Tasks))
		for id, ts := range cp.Tasks {
			c.Tasks[id] = ts.clone(shareBlobs)
		}
	}
	return c
}

func (ts TaskState) clone(shareBlobs bool) TaskState {
	c := ts
	c.Offsets = maps.Clone(ts.Offsets)
	c.Applied = maps.Clone(ts.Applied)
	c.Files = slices.Clone(ts.Files)
	c.SinkTxns = slices.Clone(ts.SinkTxns)
	if ts.KeyGroups != nil {
		kg := *ts.KeyGroups
		c.KeyGroups = &kg
	}
	if !shareBlobs {
		c.Keyed = slices.Clone(ts.Keyed)
	}
	return c
}

// cloneSlice copies s element by element, keeping nil as nil and empty as
// empty so that the JSON (and so the Digest) of a copy equals the original's.
func cloneSlice[T any](s []T, cloneElem func(T) T) []T {
	if s == nil {
		return nil
	}
	c := make([]T, len(s))
	for i, e := range s {
		c[i] = cloneElem(e)
	}
	return c
}
