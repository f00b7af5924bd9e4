// Package fsm is coordflow's replicated state machine: jobs, their attempts and
// task assignments, and their checkpoints. It is pure and deterministic: no
// clock, no randomness, no network; time and ids come in the commands.
//
// Error handling: Apply never panics on what it reads from the log. A command
// it cannot decode or must reject is answered with an error value (wrapping
// one of the sentinel errors in errors.go) and leaves the state untouched, the
// same way on every replica. Result turns that answer back into an error.
package fsm

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
)

// FSM is the raft.FSM of coordd. Raft calls Apply, Snapshot and Restore from
// its FSM goroutine; the read methods may be called from any goroutine at the
// same time and return copies that the caller owns, except for what their
// documentation says is shared and read-only (keyed-state blobs; in Job and
// SharedJobs, a job's checkpoint lists, histories and savepoint origin).
type FSM struct {
	mu    sync.RWMutex // guards state; Apply and Restore take it for writing
	state *State

	logger  *slog.Logger
	unknown atomic.Uint64
	// onChange is called after Apply with the jobs it changed; see OnJobChange.
	onChange func(jobs []string)
}

var _ raft.FSM = (*FSM)(nil)

// New returns an FSM with no jobs that logs to slog's default logger; see
// SetLogger.
func New() *FSM {
	return &FSM{state: newState(), logger: slog.Default()}
}

// SetLogger sets where Apply logs what it must not drop silently. Call it
// before Raft starts.
func (f *FSM) SetLogger(l *slog.Logger) { f.logger = l }

// Apply applies one committed log entry. It returns an error value for a
// command it rejects (never panicking, whatever the bytes), the new checkpoint
// id (uint64) for CheckpointTriggered, a BatchResult for a batch, and nil
// otherwise. Entries other than
// raft.LogCommand are skipped. The entry is decoded before the write lock is
// taken, so readers wait only for the state change itself.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	t, cmd, err := Decode(l.Data)
	if err != nil {
		// Every replica rejects the entry alike. An unknown type may be a
		// command of a newer version that this replica cannot apply: say so
		// loudly, since a rolling upgrade must not skip one silently.
		if errors.Is(err, ErrUnknownCommand) {
			f.unknown.Add(1)
			f.logger.Error("raft log entry of an unknown command type: is a newer coordd leading?", "index", l.Index, "type", uint8(t), "err", err)
		}
		return fmt.Errorf("apply log index %d: %w", l.Index, err)
	}
	f.mu.Lock()
	res := commands[t].apply(f.state, cmd)
	touched := f.state.touched
	f.state.touched = nil
	f.mu.Unlock()
	if n := unknownIn(res); n > 0 {
		f.unknown.Add(uint64(n))
		f.logger.Error("raft log entry batches commands of an unknown type: is a newer coordd leading?", "index", l.Index, "unknown", n)
	}
	if len(touched) > 0 && f.onChange != nil {
		f.onChange(touched)
	}
	return res
}

// OnJobChange sets fn to be called, from Raft's FSM goroutine after each
// applied entry, with the ids of the jobs its commands changed (a job may
// repeat), and after a Restore with the jobs the restored state no longer
// holds. It is a notification, not state: the leader uses it to look at
// only the jobs that changed instead of every job. fn must not block. Call it
// before Raft starts.
func (f *FSM) OnJobChange(fn func(jobs []string)) { f.onChange = fn }

// UnknownCommands counts the log entries of an unknown command type this
// replica has rejected, for a metric.
func (f *FSM) UnknownCommands() uint64 { return f.unknown.Load() }

// Result interprets a raft ApplyFuture's Response: an error the FSM returned
// becomes the error, anything else is the command's result.
func Result(resp any) (any, error) {
	if err, ok := resp.(error); ok {
		return nil, err
	}
	return resp, nil
}

// Jobs returns a copy of every job, sorted by id. The keyed-state blobs in
// the copies are shared with the FSM, which never modifies a blob once
// applied: callers must not modify them either.
func (f *FSM) Jobs() []Job {
	return copyJobs(f.storedJobs(), func(j *Job) Job { return j.clone(true) })
}

// SharedJobs returns every job, sorted by id, as Job returns one: its
// checkpoints, histories and FromSavepoint are shared with the FSM, to be
// read only. It is for a pass over every job that only reads them (the
// leader's safety-net reconcile): at a thousand jobs, Jobs's deep copies of
// their checkpoints and histories cost tens of milliseconds.
func (f *FSM) SharedJobs() []Job {
	return copyJobs(f.storedJobs(), (*Job).sharedCopy)
}

// storedJobs returns the stored jobs. Apply replaces a job it changes with
// a changed copy and never changes a stored one (copy on write), so they
// may be copied after the read lock is released: it is held only for the
// map's walk, and Apply does not wait for the copies.
func (f *FSM) storedJobs() []*Job {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return slices.Collect(maps.Values(f.state.Jobs))
}

// copyJobs copies stored jobs with copyJob, sorted by id.
func copyJobs(stored []*Job, copyJob func(*Job) Job) []Job {
	jobs := make([]Job, 0, len(stored))
	for _, j := range stored {
		jobs = append(jobs, copyJob(j))
	}
	slices.SortFunc(jobs, func(a, b Job) int { return cmp.Compare(a.ID, b.ID) })
	return jobs
}

// LiveSpecs calls yield with the id and spec of every job that is not
// cancelled, in no order, until it returns false. It holds the FSM's read
// lock meanwhile, so yield must be quick, must not call into the FSM, and
// must not keep or change the spec's slices; it copies no job, for checks
// over every job (the feature levels they need) that Jobs would make costly.
func (f *FSM) LiveSpecs(yield func(id string, spec JobSpec) bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for id, j := range f.state.Jobs {
		if j.Status == JobCancelled {
			continue
		}
		if !yield(id, j.Spec) {
			return
		}
	}
}

// Job returns a copy of one job for the leader loop, which reads a job on
// every event of it. Its completed and aborted checkpoints, its histories
// and its FromSavepoint are shared with the FSM, which never changes them
// (Job.sharedCopy): read them, and copy what is to be changed.
func (f *FSM) Job(id string) (Job, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	j, ok := f.state.Jobs[id]
	if !ok {
		return Job{}, false
	}
	return j.sharedCopy(), true
}

// JobBySubmissionKey returns a copy of the job submitted with key (shared
// blobs, as in Job), if one is kept.
func (f *FSM) JobBySubmissionKey(key string) (Job, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	j := f.state.jobBySubmissionKey(key)
	if j == nil {
		return Job{}, false
	}
	return j.sharedCopy(), true
}

// LastCompleted returns a copy of the newest completed checkpoint of a job,
// the one a restart restores from; its keyed-state blobs are shared, as in Jobs.
func (f *FSM) LastCompleted(jobID string) (Checkpoint, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	j, ok := f.state.Jobs[jobID]
	if !ok || len(j.Completed) == 0 {
		return Checkpoint{}, false
	}
	return j.Completed[len(j.Completed)-1].clone(true), true
}

// StateJSON returns the canonical JSON of the whole state (map keys sorted),
// for debugging and for comparing replicas.
func (f *FSM) StateJSON() ([]byte, error) {
	// Encoded outside the lock, from the view a snapshot takes: Apply does
	// not wait for the encoding of every job (Snapshot explains why the
	// view holds still).
	f.mu.RLock()
	view := f.state.share()
	f.mu.RUnlock()
	b, err := json.Marshal(view)
	if err != nil {
		return nil, fmt.Errorf("encode fsm state: %w", err)
	}
	return b, nil
}

// Digest returns the SHA-256 (hex) of StateJSON: replicas that applied the
// same log hold the same digest.
func (f *FSM) Digest() (string, error) {
	b, err := f.StateJSON()
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// HasJob reports whether the state holds job id, without copying it.
func (f *FSM) HasJob(id string) bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	_, ok := f.state.Jobs[id]
	return ok
}

// HasCancelledJob reports whether the state holds a cancelled job: one the
// leader may purge.
func (f *FSM) HasCancelledJob() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for _, j := range f.state.Jobs {
		if j.Status == JobCancelled {
			return true
		}
	}
	return false
}

// Purged returns how many jobs JobPurged has removed from the state.
func (f *FSM) Purged() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Purged
}

// FramedBatches reports whether a CommandFramedBatch has been applied: the
// Raft log may hold one.
func (f *FSM) FramedBatches() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.FramedBatches
}

// CompressedEntries reports whether a CommandCompressed has been applied:
// the Raft log may hold one.
func (f *FSM) CompressedEntries() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.CompressedEntries
}

// ChosenCheckpointIDs reports whether a CheckpointTriggered with the id the
// leader chose has been applied: the Raft log may hold one.
func (f *FSM) ChosenCheckpointIDs() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.ChosenCheckpointIDs
}

// SubmissionKeys reports whether a RegisterJob with a submission key has
// been applied: the Raft log may hold one.
func (f *FSM) SubmissionKeys() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.SubmissionKeys
}

// Savepoints returns a copy of every savepoint, sorted by id.
func (f *FSM) Savepoints() []Savepoint {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Savepoint, 0, len(f.state.Savepoints))
	for _, sp := range f.state.Savepoints {
		out = append(out, sp.clone(true))
	}
	slices.SortFunc(out, func(a, b Savepoint) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// Savepoint returns a copy of one savepoint.
func (f *FSM) Savepoint(id string) (Savepoint, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	sp, ok := f.state.Savepoints[id]
	if !ok {
		return Savepoint{}, false
	}
	return sp.clone(true), true
}
