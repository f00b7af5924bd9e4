package fsm

import (
	"errors"
	"fmt"
)

// Sentinel errors returned (wrapped with context) by Apply and the command
// helpers. Callers test them with errors.Is; the wrapping text names the job,
// attempt, checkpoint or task concerned.
var (
	// ErrUnknownCommand: the log entry's type byte names no known command.
	ErrUnknownCommand = errors.New("unknown command type")
	// ErrMalformedCommand: the log entry is empty, its body is not valid JSON,
	// or a required field of the command is missing.
	ErrMalformedCommand = errors.New("malformed command")
	// ErrNoSuchJob: the command names a job the state does not hold.
	ErrNoSuchJob = errors.New("no such job")
	// ErrJobExists: RegisterJob for an id that is already taken.
	ErrJobExists = errors.New("job already exists")
	// ErrDuplicateSubmission: RegisterJob with a submission key a kept
	// job was registered with.
	ErrDuplicateSubmission = errors.New("submission key already used")
	// ErrInvalidSpec: RegisterJob with a spec that fails Validate; the
	// *FieldError is wrapped too.
	ErrInvalidSpec = errors.New("invalid job spec")
	// ErrInvalidAssignment: JobRestarted with tasks that do not form a valid
	// assignment of the job's spec.
	ErrInvalidAssignment = errors.New("invalid task assignment")
	// ErrInvalidStatus: JobStatus with a status it may not set.
	ErrInvalidStatus = errors.New("invalid job status")
	// ErrStaleAttempt: the command's attempt is not the one the job expects,
	// typically a late message from a fenced-off attempt or leader.
	ErrStaleAttempt = errors.New("stale attempt")
	// ErrJobNotRunning: a checkpoint command for a job whose status is not running.
	ErrJobNotRunning = errors.New("job not running")
	// ErrNotDeployed: the job has no attempt yet, so it cannot be running.
	ErrNotDeployed = errors.New("job has no deployed attempt")
	// ErrCheckpointPending: CheckpointTriggered while another checkpoint is in flight.
	ErrCheckpointPending = errors.New("a checkpoint is already pending")
	// ErrCheckpointIDUsed: CheckpointTriggered with an id that is not above
	// every id issued for the job; ids only grow.
	ErrCheckpointIDUsed = errors.New("checkpoint id not above the last issued")
	// ErrNoPendingCheckpoint: complete or abort with no checkpoint in flight.
	ErrNoPendingCheckpoint = errors.New("no pending checkpoint")
	// ErrCheckpointMismatch: complete or abort naming another checkpoint than the pending one.
	ErrCheckpointMismatch = errors.New("checkpoint id does not match the pending checkpoint")
	// ErrIncompleteStates: CheckpointCompleted whose states are not exactly
	// one valid state per task of the attempt.
	ErrIncompleteStates = errors.New("incomplete or invalid task states")
	// ErrStateChecksum: a map task's keyed state does not match its SHA-256.
	// It wraps ErrIncompleteStates, so either sentinel matches.
	ErrStateChecksum = fmt.Errorf("%w: keyed state checksum mismatch", ErrIncompleteStates)
	// ErrStateTooLarge: a map task's keyed state exceeds MaxInlineStateBytes.
	// It wraps ErrIncompleteStates: the checkpoint is the tasks' failure.
	ErrStateTooLarge = fmt.Errorf("%w: keyed state too large", ErrIncompleteStates)
	// ErrNoSuchSavepoint: the command names a savepoint the state does not hold.
	ErrNoSuchSavepoint = errors.New("no such savepoint")
	// ErrTooManySavepoints: a savepoint would exceed MaxSavepoints.
	ErrTooManySavepoints = errors.New("too many savepoints")
	// ErrJobCancelled: any command for a job that was cancelled.
	ErrJobCancelled = errors.New("job cancelled")
	// ErrSavepointExists: a savepoint would replace one of the same id.
	ErrSavepointExists = errors.New("savepoint exists already")
	// ErrJobNotCancelled: JobPurged for a job that is not cancelled.
	ErrJobNotCancelled = errors.New("job not cancelled")
	// ErrCorruptSnapshot: Restore read a snapshot it cannot decode or whose
	// state breaks an invariant; the state in place is kept.
	ErrCorruptSnapshot = errors.New("corrupt snapshot")
)
