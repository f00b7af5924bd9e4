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
	"fmt"
	"slices"
	"sync"

	"github.com/hashicorp/raft"
)

// FSM is the raft.FSM of coordd. Raft calls Apply, Snapshot and Restore from
// its FSM goroutine; the read methods may be called from any goroutine at the
// same time and always return deep copies that the caller owns.
type FSM struct {
	mu    sync.RWMutex // guards state; Apply and Restore take it for writing
	state *State
}

var _ raft.FSM = (*FSM)(nil)

// New returns an FSM with no jobs.
func New() *FSM {
	return &FSM{state: newState()}
}

// Apply applies one committed log entry. It returns an error value for a
// command it rejects (never panicking, whatever the bytes), the new checkpoint
// id (uint64) for CheckpointTriggered, and nil otherwise. Entries other than
// raft.LogCommand are skipped. The entry is decoded before the write lock is
// taken, so readers wait only for the state change itself.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	_, cmd, err := Decode(l.Data)
	if err != nil {
		return fmt.Errorf("apply log index %d: %w", l.Index, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.state
	switch c := cmd.(type) {
	case RegisterJobCmd:
		return s.applyRegisterJob(&c)
	case JobRestartedCmd:
		return s.applyJobRestarted(&c)
	case JobStatusCmd:
		return s.applyJobStatus(&c)
	case CheckpointTriggeredCmd:
		id, err := s.applyCheckpointTriggered(&c)
		if err != nil {
			return err
		}
		return id
	case CheckpointCompletedCmd:
		return s.applyCheckpointCompleted(&c)
	case CheckpointAbortedCmd:
		return s.applyCheckpointAborted(&c)
	case JobCancelledCmd:
		return s.applyJobCancelled(&c)
	}
	// Unreachable: Decode returns one of the types above or an error.
	return fmt.Errorf("apply log index %d: %w: %T", l.Index, ErrUnknownCommand, cmd)
}

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
// applied: callers must not modify them either. Sharing them keeps this read
// cheap enough for the leader's reconcile loop, which calls it several times
// a second.
func (f *FSM) Jobs() []Job {
	f.mu.RLock()
	defer f.mu.RUnlock()
	jobs := make([]Job, 0, len(f.state.Jobs))
	for _, j := range f.state.Jobs {
		jobs = append(jobs, j.clone(true))
	}
	slices.SortFunc(jobs, func(a, b Job) int { return cmp.Compare(a.ID, b.ID) })
	return jobs
}

// Job returns a copy of one job; its keyed-state blobs are shared, as in Jobs.
func (f *FSM) Job(id string) (Job, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	j, ok := f.state.Jobs[id]
	if !ok {
		return Job{}, false
	}
	return j.clone(true), true
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
	f.mu.RLock()
	defer f.mu.RUnlock()
	b, err := json.Marshal(f.state)
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
