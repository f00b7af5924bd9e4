package fsm

import (
	"encoding/json"
	"fmt"
	"time"
)

// CommandType identifies a command in the Raft log. The numbers are written to
// disk: they are explicit and never reused.
type CommandType uint8

// Command types. Add new ones at the end with a new number.
const (
	CommandRegisterJob         CommandType = 1
	CommandJobRestarted        CommandType = 2
	CommandJobStatus           CommandType = 3
	CommandCheckpointTriggered CommandType = 4
	CommandCheckpointCompleted CommandType = 5
	CommandCheckpointAborted   CommandType = 6
	CommandJobCancelled        CommandType = 7
	CommandSavepointDeleted    CommandType = 8
	// CommandBatch is a group commit of commands of other types (batch.go).
	CommandBatch CommandType = 9
	// CommandTasksRestarted is a task-scoped recovery (TasksRestartedCmd).
	CommandTasksRestarted CommandType = 10
	// CommandJobPurged removes a cancelled job from the state (JobPurgedCmd).
	CommandJobPurged CommandType = 11
	// CommandFramedBatch is a group commit like CommandBatch, its commands
	// framed by their lengths instead of wrapped in JSON (batch.go).
	CommandFramedBatch CommandType = 12
	// CommandCompressed carries another entry, a lone command or a batch,
	// compressed (compress.go).
	CommandCompressed CommandType = 13
)

// JobStatus is the lifecycle state of a job as users see it.
type JobStatus string

// Job statuses, as shown by the HTTP API.
const (
	// JobPending: registered, waiting for free worker slots.
	JobPending JobStatus = "pending"
	// JobRunning: the current attempt's tasks are deployed.
	JobRunning JobStatus = "running"
	// JobRestarting: a restart is scheduled (backoff) or tasks are being redeployed.
	JobRestarting JobStatus = "restarting"
	// JobFailing: the job cannot run (broker unreachable, topic missing); retried with backoff.
	JobFailing JobStatus = "failing"
	// JobCancelled: stopped for good by the user.
	JobCancelled JobStatus = "cancelled"
)

// TaskKind says what a task does.
type TaskKind string

// Task kinds.
const (
	TaskSource TaskKind = "source"
	TaskMap    TaskKind = "map"
)

// CheckpointStatus is the outcome of a checkpoint.
type CheckpointStatus string

// Checkpoint statuses.
const (
	CheckpointPending   CheckpointStatus = "pending"
	CheckpointCompleted CheckpointStatus = "completed"
	CheckpointAborted   CheckpointStatus = "aborted"
)

// Duration is a time.Duration that reads and writes Go duration strings ("500ms") in JSON.
type Duration time.Duration

// MarshalJSON writes the duration as a Go duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads a Go duration string; null leaves d unchanged, as
// encoding/json does for built-in types.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"500ms\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// JobSpec is what a user submits: one pipeline Kafka source -> keyBy -> map
// operator -> optional Kafka sink. See docs/architecture.md for every field.
type JobSpec struct {
	Name       string         `json:"name"`
	Source     SourceSpec     `json:"source"`
	Operator   OperatorSpec   `json:"operator"`
	Sink       *SinkSpec      `json:"sink,omitempty"`
	State      StateSpec      `json:"state"`
	Checkpoint CheckpointSpec `json:"checkpoint"`
	Restart    RestartSpec    `json:"restart"`
	Recovery   RecoverySpec   `json:"recovery"`
}

// RecoverySpec says what the leader restores when a worker is lost.
type RecoverySpec struct {
	// Scope is RecoveryScopeTasks (the default: only the lost worker's
	// tasks are restored, the others run on) or RecoveryScopeJob (every
	// task restarts from the last completed checkpoint, as Flink does).
	Scope string `json:"scope"`
}

// Recovery scopes.
const (
	RecoveryScopeTasks = "tasks"
	RecoveryScopeJob   = "job"
)

// TaskScoped reports whether a lost worker's tasks are restored alone. A
// spec stored before the field existed (empty scope) gets the default.
func (r RecoverySpec) TaskScoped() bool { return r.Scope != RecoveryScopeJob }

// StateSpec says where map tasks keep their keyed state while they run.
type StateSpec struct {
	// Backend is "memory" (hash maps; the default) or "disk" (an LSM on the
	// worker's local disk, for state larger than memory).
	Backend string `json:"backend"`
}

// SourceSpec says which topic a job reads and with how many source tasks.
type SourceSpec struct {
	Brokers     []string `json:"brokers"`
	Topic       string   `json:"topic"`
	Start       string   `json:"start"` // "earliest" or "latest"
	Parallelism int      `json:"parallelism"`
	Group       string   `json:"group"` // consumer group for offset commits; default coordflow-<name>
	// PartitionDiscovery is how often each source task looks for partitions
	// added to the topic while it runs (MinPartitionDiscovery to
	// MaxPartitionDiscovery). Zero, the field left out (also in specs stored
	// before it existed), means DefaultPartitionDiscovery: see
	// PartitionDiscoveryInterval.
	PartitionDiscovery Duration `json:"partition_discovery,omitempty"`
	// IsolationLevel is Kafka's isolation.level for the source's reads:
	// IsolationReadUncommitted (the default, left out) or
	// IsolationReadCommitted, which hands over only records of committed
	// transactions, as a job reading another job's exactly-once output
	// needs.
	IsolationLevel string `json:"isolation_level,omitempty"`
}

// OperatorSpec names the operator and its parallelism.
type OperatorSpec struct {
	Name           string `json:"name"`
	Parallelism    int    `json:"parallelism"`
	MaxParallelism int    `json:"max_parallelism"` // number of key groups; default 128
}

// SinkSpec is the optional Kafka topic each map task writes its output to.
type SinkSpec struct {
	Brokers []string `json:"brokers"`
	Topic   string   `json:"topic"`
	// Delivery is DeliveryExactlyOnce (the default: each map task writes in
	// Kafka transactions that checkpoints commit) or DeliveryAtLeastOnce.
	Delivery string `json:"delivery"`
	// TransactionTimeout is the Kafka transaction timeout of an exactly-once
	// sink: how long the broker keeps a transaction open before it aborts
	// it, and so the longest a read_committed consumer can be held back by
	// a transaction nobody finishes. Default: DefaultTransactionTimeout.
	TransactionTimeout Duration `json:"transaction_timeout,omitempty"`
	// TransactionalIDPrefix starts every transactional id of the job's
	// producers (for brokers with ACLs on transactional ids). Default:
	// "coordflow-" and the job id.
	TransactionalIDPrefix string `json:"transactional_id_prefix,omitempty"`
}

// Delivery guarantees of a sink.
const (
	DeliveryExactlyOnce = "exactly_once"
	DeliveryAtLeastOnce = "at_least_once"
)

// SinkTxn is a Kafka transaction a map task pre-committed at a checkpoint's
// barrier and had not committed when it took its snapshot: a restore from
// the checkpoint commits it with the producer id and epoch recorded here.
type SinkTxn struct {
	TransactionalID string `json:"transactional_id"`
	ProducerID      int64  `json:"producer_id"`
	ProducerEpoch   int16  `json:"producer_epoch"`
	// CheckpointID is the checkpoint whose barrier pre-committed it.
	CheckpointID uint64 `json:"checkpoint_id"`
	// ProtocolVersion is the transaction protocol the producer spoke (1, or
	// 2 for KIP-890).
	ProtocolVersion int `json:"protocol_version"`
}

// CheckpointSpec configures the checkpoint coordinator for one job.
type CheckpointSpec struct {
	Interval          Duration `json:"interval"`
	Timeout           Duration `json:"timeout"`
	MinPause          Duration `json:"min_pause"`
	Retained          int      `json:"retained"`
	TolerableFailures int      `json:"tolerable_failures"`
	// Storage is the checkpoint storage URL (file:///dir or s3://bucket?...)
	// where map tasks write their state files. Empty: the coordinator's
	// -checkpoint-storage, filled in when the job is submitted; if that is
	// empty too, state stays inline in Raft, bounded by MaxInlineStateBytes.
	Storage string `json:"storage,omitempty"`
	// InlineThreshold: a map task whose state is smaller than this many bytes
	// sends it inline instead of writing a file. Default 16 KiB.
	InlineThreshold int64 `json:"inline_threshold"`
}

// RestartSpec configures the exponential backoff between job restarts.
type RestartSpec struct {
	Initial    Duration `json:"initial"`
	Max        Duration `json:"max"`
	ResetAfter Duration `json:"reset_after"`
}

// Task is one task of one attempt, placed on a worker.
type Task struct {
	ID       string   `json:"id"` // "source-0", "map-1"
	Kind     TaskKind `json:"kind"`
	Index    int      `json:"index"`
	Worker   string   `json:"worker"`
	DataAddr string   `json:"data_addr"`
	// Partitions is set for source tasks: p with p mod S == Index.
	Partitions []int32 `json:"partitions,omitempty"`
	// KeyGroups is set for map tasks: the range [Start, End).
	KeyGroups *KeyGroupRange `json:"key_groups,omitempty"`
	// Attempt is the job attempt the task was last started in, and
	// StartedAt when (unix nanoseconds, from the command). A job-scoped
	// restart starts every task anew; a task-scoped recovery only the
	// restored ones, and the others keep both. Zero in jobs stored before
	// the fields existed: see Job.TaskAttempt.
	Attempt   uint64 `json:"attempt,omitempty"`
	StartedAt int64  `json:"started_at,omitempty"`
}

// KeyGroupRange is the half-open range [Start, End) of key groups a map task owns.
type KeyGroupRange struct {
	Start int `json:"start"`
	End   int `json:"end"`
}

// TaskState is one task's acknowledged snapshot for a checkpoint.
type TaskState struct {
	TaskID  string   `json:"task_id"`
	Kind    TaskKind `json:"kind"`
	Worker  string   `json:"worker"`
	AckedAt int64    `json:"acked_at"` // unix nanoseconds, from the leader's clock when the ack arrived
	// Offsets (sources): next offset to read, per partition.
	Offsets map[int32]int64 `json:"offsets,omitempty"`
	// Keyed (map tasks): a whole full state file (transport/statefile) held
	// inline, and its SHA-256 (hex). Empty when Files is set.
	Keyed       []byte `json:"keyed,omitempty"`
	KeyedSHA256 string `json:"keyed_sha256,omitempty"`
	// Files (map tasks): the chain of state files in checkpoint storage that
	// make up the state, oldest first: full files, then deltas. Raft holds
	// only these handles, never the state itself.
	Files []StateFile `json:"files,omitempty"`
	// Applied (map tasks): per source partition, the offset of the last
	// record whose items the task had applied at the snapshot.
	Applied map[int32]int64 `json:"applied,omitempty"`
	// SinkTxns (map tasks with an exactly-once sink) are the transactions
	// the task had pre-committed and not committed at the snapshot, oldest
	// first; a restore from this checkpoint commits them.
	SinkTxns []SinkTxn `json:"sink_txns,omitempty"`
	// ValueEncoding (map tasks) is how values are encoded: int64, json or bytes.
	ValueEncoding string `json:"value_encoding,omitempty"`
	// Keys is the number of keys in the state; StateBytes the bytes this
	// checkpoint wrote for it (inline or new files).
	Keys       int64 `json:"keys,omitempty"`
	StateBytes int64 `json:"state_bytes,omitempty"`
	// AlignmentMicros (map tasks) is the time from the first to the last of
	// the checkpoint's barriers at the task, in microseconds.
	AlignmentMicros int64 `json:"alignment_us,omitempty"`
	// RecordsIn and RecordsOut count what the task took in and sent on
	// from its start in the attempt to the snapshot: a source's Kafka
	// records and the items it sent, a map task's items and its output
	// records. The difference between two checkpoints is a rate.
	RecordsIn  int64 `json:"records_in,omitempty"`
	RecordsOut int64 `json:"records_out,omitempty"`
	// KeyGroups (map tasks) is the range the state covers, the task's range
	// in its attempt. It makes a checkpoint self-describing: a restore with
	// another parallelism sends each new map task only the state that
	// overlaps its own range.
	KeyGroups *KeyGroupRange `json:"key_groups,omitempty"`
}

// StateFile is a handle on one immutable state file in checkpoint storage.
type StateFile struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// KeyGroups is the range of key groups the file may hold.
	KeyGroups KeyGroupRange `json:"key_groups"`
	// Full marks a full snapshot of its key groups; a delta holds changes
	// over the files before it in a chain.
	Full bool `json:"full,omitempty"`
}

// Checkpoint is one checkpoint of one job attempt.
type Checkpoint struct {
	ID          uint64               `json:"id"`
	Attempt     uint64               `json:"attempt"`
	Status      CheckpointStatus     `json:"status"`
	TriggeredAt int64                `json:"triggered_at"`
	EndedAt     int64                `json:"ended_at,omitempty"` // completed or aborted
	Reason      string               `json:"reason,omitempty"`   // why it was aborted
	Tasks       map[string]TaskState `json:"tasks,omitempty"`
	// Savepoint marks a savepoint: self-contained, kept until deleted, and
	// not a checkpoint the job restores from by itself. Stop marks the final
	// savepoint of a job that is stopped with it.
	Savepoint bool `json:"savepoint,omitempty"`
	Stop      bool `json:"stop,omitempty"`
}

// Savepoint is a self-contained snapshot of a job, taken on request and kept
// until deleted: the state of every task of one attempt, with state files
// that no checkpoint shares. Its file paths are relative to Location.
type Savepoint struct {
	ID           string `json:"id"`
	JobID        string `json:"job_id"`
	JobName      string `json:"job_name"`
	CheckpointID uint64 `json:"checkpoint_id"`
	Attempt      uint64 `json:"attempt"`
	CreatedAt    int64  `json:"created_at"`
	// Location is the checkpoint storage URL of the savepoint's directory
	// (its files and a _metadata document); empty when its state is inline.
	Location string `json:"location,omitempty"`
	// Topic, Operator and MaxParallelism are what a job restored from the
	// savepoint must match: offsets are per partition of the topic, state per
	// key group of max_parallelism.
	Topic          string               `json:"topic"`
	Operator       string               `json:"operator"`
	MaxParallelism int                  `json:"max_parallelism"`
	Tasks          map[string]TaskState `json:"tasks"`
}

// SavepointID is the id of the savepoint of checkpoint id of job.
func SavepointID(job string, id uint64) string {
	return fmt.Sprintf("%s-sp-%d", job, id)
}

// MaxSavepoints bounds the savepoints the cluster keeps at once.
const MaxSavepoints = 1000

// Job is the replicated record of one job.
type Job struct {
	ID          string    `json:"id"`
	Spec        JobSpec   `json:"spec"`
	Status      JobStatus `json:"status"`
	Reason      string    `json:"reason,omitempty"`
	Attempt     uint64    `json:"attempt"` // 0 until first deployed
	Tasks       []Task    `json:"tasks"`
	SubmittedAt int64     `json:"submitted_at"`
	UpdatedAt   int64     `json:"updated_at"`
	// LastCheckpointID is the highest checkpoint id ever issued for the job; ids only grow.
	LastCheckpointID uint64 `json:"last_checkpoint_id"`
	// Pending is the checkpoint in flight, if any (at most one).
	Pending *Checkpoint `json:"pending,omitempty"`
	// Completed holds the retained completed checkpoints, oldest first; never empty once one completed.
	Completed []Checkpoint `json:"completed"`
	// Aborted holds the most recent aborted checkpoints, oldest first, bounded by MaxAbortedHistory.
	Aborted []Checkpoint `json:"aborted"`
	// ConsecutiveAborts counts aborts since the last completed checkpoint or restart.
	ConsecutiveAborts int `json:"consecutive_aborts"`
	// Restarts counts attempts after the first.
	Restarts int `json:"restarts"`
	// RestoredFrom is the completed checkpoint the current attempt restored
	// from (0: started fresh). Replicated so that a new leader knows which
	// checkpoint a failing restore used and can fall back past it.
	RestoredFrom uint64 `json:"restored_from,omitempty"`
	// FromSavepoint is the savepoint the job was started from: attempts
	// restore from it until the job has a completed checkpoint of its own.
	FromSavepoint *Savepoint `json:"from_savepoint,omitempty"`
	// SubmissionKey is the idempotency key the job was submitted with, if
	// any: the same submission sent again names it, and is answered with
	// this job.
	SubmissionKey string `json:"submission_key,omitempty"`
	// ChannelToken is the current attempt's data-channel credential: every
	// leader puts it in the attempt's deployments, and map tasks accept only
	// data channels that present it. Never shown by the API.
	ChannelToken string `json:"channel_token,omitempty"`
	// Attempts are the job's most recent attempts, oldest first, bounded by
	// MaxAttemptHistory: when each started and why.
	Attempts []AttemptRecord `json:"attempts,omitempty"`
	// History summarizes the job's most recent completed and aborted
	// checkpoints and savepoints, oldest first, bounded by
	// MaxCheckpointHistory: what a dashboard charts, kept beyond the
	// retained checkpoints without their state.
	History []CheckpointSummary `json:"history,omitempty"`
	// Recoveries are the job's most recent recoveries from failures, task-
	// or job-scoped, oldest first, bounded by MaxRecoveryHistory.
	Recoveries []RecoveryRecord `json:"recoveries,omitempty"`
}

// TaskAttempt is the attempt task t runs in: its own, or the job's for a
// task stored before tasks had their own.
func (j *Job) TaskAttempt(t Task) uint64 {
	if t.Attempt == 0 {
		return j.Attempt
	}
	return t.Attempt
}

// RecoveryRecord is one recovery of a job after a failure: which tasks were
// restored, why, and how long it took.
type RecoveryRecord struct {
	// Attempt is the job attempt the recovery started.
	Attempt uint64 `json:"attempt"`
	// Scope is RecoveryScopeTasks or RecoveryScopeJob.
	Scope string `json:"scope"`
	// Tasks are the ids of the tasks restored (every task for a job scope).
	Tasks  []string `json:"tasks"`
	Reason string   `json:"reason"`
	// DetectedAt is when the leader saw the failure, StartedAt when the
	// restored tasks were deployed, CheckpointedAt when the first
	// checkpoint after the recovery completed (0 until then); unix
	// nanoseconds from the leader's commands.
	DetectedAt     int64  `json:"detected_at,omitempty"`
	StartedAt      int64  `json:"started_at"`
	RestoredFrom   uint64 `json:"restored_from,omitempty"`
	CheckpointID   uint64 `json:"checkpoint_id,omitempty"`
	CheckpointedAt int64  `json:"checkpointed_at,omitempty"`
}

// AttemptRecord is one attempt of a job, as JobRestarted started it.
type AttemptRecord struct {
	Attempt   uint64 `json:"attempt"`
	StartedAt int64  `json:"started_at"` // unix nanoseconds, from the command
	// Reason is why the attempt was started: the first deploy, or the
	// failure that ended the one before.
	Reason string `json:"reason"`
	// RestoredFrom is the completed checkpoint the attempt restored (0: it
	// started fresh or from the job's savepoint).
	RestoredFrom uint64 `json:"restored_from,omitempty"`
}

// CheckpointSummary is what a job's History keeps of one finished checkpoint.
type CheckpointSummary struct {
	ID          uint64           `json:"id"`
	Attempt     uint64           `json:"attempt"`
	Status      CheckpointStatus `json:"status"`
	Savepoint   bool             `json:"savepoint,omitempty"`
	TriggeredAt int64            `json:"triggered_at"`
	EndedAt     int64            `json:"ended_at"`
	// StateBytes sums the tasks' StateBytes (0 for an aborted checkpoint).
	StateBytes int64  `json:"state_bytes,omitempty"`
	Reason     string `json:"reason,omitempty"`
}

// MaxInlineStateBytes bounds one map task's inline keyed state in a
// checkpoint, for jobs without checkpoint storage. Inline state travels in
// the ack and is stored in the Raft log and snapshots, and a restore sends it
// back in deployments: a checkpoint whose state could not be restored within
// the control plane's message limit must never complete.
const MaxInlineStateBytes = 64 << 20

// MaxChannelToken bounds an attempt's data-channel credential.
const MaxChannelToken = 128

// MaxStateFiles bounds the chain of state files of one map task in one
// checkpoint, so that Raft's bytes per checkpoint stay O(tasks + files).
const MaxStateFiles = 1024

// MaxAbortedHistory bounds how many aborted checkpoints a job remembers.
const MaxAbortedHistory = 20

// MaxAttemptHistory bounds a job's Attempts.
const MaxAttemptHistory = 20

// MaxRecoveryHistory bounds a job's Recoveries.
const MaxRecoveryHistory = 20

// MaxCheckpointHistory bounds a job's History: at a few dozen bytes each,
// it costs a job about as much as one retained checkpoint of a small job.
const MaxCheckpointHistory = 100

// RegisterJobCmd adds a new job in status pending.
type RegisterJobCmd struct {
	ID   string  `json:"id"`
	Spec JobSpec `json:"spec"`
	Time int64   `json:"time"`
	// FromSavepoint, if set, is the savepoint the job starts from.
	FromSavepoint *Savepoint `json:"from_savepoint,omitempty"`
	// SubmissionKey, if set, is the client's idempotency key for this
	// submission (ValidSubmissionKey): RegisterJob refuses a second job of
	// a key while one is kept, with ErrDuplicateSubmission.
	SubmissionKey string `json:"submission_key,omitempty"`
}

// JobRestartedCmd starts attempt Attempt (exactly the job's attempt + 1) with a
// new assignment; any pending checkpoint of the old attempt is aborted.
type JobRestartedCmd struct {
	JobID   string `json:"job_id"`
	Attempt uint64 `json:"attempt"`
	Tasks   []Task `json:"tasks"`
	Reason  string `json:"reason"`
	Time    int64  `json:"time"`
	// RestoreFrom is the completed checkpoint the new attempt restores from;
	// 0 starts fresh. It must be one of the job's retained checkpoints.
	RestoreFrom uint64 `json:"restore_from,omitempty"`
	// ChannelToken is the new attempt's data-channel credential, chosen at
	// random by the leader (docs/security.md).
	ChannelToken string `json:"channel_token,omitempty"`
	// DetectedAt is when the leader saw the failure that ends the previous
	// attempt (0 for a first deploy or when not known).
	DetectedAt int64 `json:"detected_at,omitempty"`
}

// TasksRestartedCmd is a task-scoped recovery: it starts attempt Attempt
// (exactly the job's attempt + 1) for Tasks only, which replace the job's
// tasks of the same ids on new workers and restore completed checkpoint
// RestoreFrom; the job's other tasks keep running in their own attempts.
// The pending checkpoint is aborted: it cannot complete without the lost
// tasks.
type TasksRestartedCmd struct {
	JobID       string `json:"job_id"`
	Attempt     uint64 `json:"attempt"`
	Tasks       []Task `json:"tasks"`
	RestoreFrom uint64 `json:"restore_from"`
	Reason      string `json:"reason"`
	DetectedAt  int64  `json:"detected_at,omitempty"`
	Time        int64  `json:"time"`
}

// JobStatusCmd sets a job's status and reason (pending, restarting, failing,
// running) without changing its attempt.
type JobStatusCmd struct {
	JobID  string    `json:"job_id"`
	Status JobStatus `json:"status"`
	Reason string    `json:"reason"`
	Time   int64     `json:"time"`
}

// CheckpointTriggeredCmd takes the next checkpoint id of a running job's current
// attempt; Apply returns the new id (uint64).
type CheckpointTriggeredCmd struct {
	JobID   string `json:"job_id"`
	Attempt uint64 `json:"attempt"`
	Time    int64  `json:"time"`
	// ID, if not zero, is the id the leader chose, which must be above
	// every id issued for the job; zero takes the next one. A leader that
	// chooses the id can send the trigger before the command commits (the
	// coordinator's pipelined trigger), and skips the id its predecessor
	// may have sent without committing it.
	ID uint64 `json:"id,omitempty"`
	// Savepoint takes a savepoint instead of a checkpoint; Stop (with
	// Savepoint) cancels the job when it completes.
	Savepoint bool `json:"savepoint,omitempty"`
	Stop      bool `json:"stop,omitempty"`
}

// CheckpointCompletedCmd commits a pending checkpoint with the state of every
// task of its attempt.
type CheckpointCompletedCmd struct {
	JobID        string               `json:"job_id"`
	Attempt      uint64               `json:"attempt"`
	CheckpointID uint64               `json:"checkpoint_id"`
	States       map[string]TaskState `json:"states"`
	Time         int64                `json:"time"`
	// Location is a savepoint's directory URL (see Savepoint.Location).
	Location string `json:"location,omitempty"`
}

// SavepointDeletedCmd forgets a savepoint; its files are deleted after.
type SavepointDeletedCmd struct {
	ID   string `json:"id"`
	Time int64  `json:"time"`
}

// CheckpointAbortedCmd aborts a pending checkpoint with a reason.
type CheckpointAbortedCmd struct {
	JobID        string `json:"job_id"`
	CheckpointID uint64 `json:"checkpoint_id"`
	Reason       string `json:"reason"`
	Time         int64  `json:"time"`
	// NotCounted marks an abort that is not the tasks' doing (a leader
	// change, a Raft error): it does not count toward tolerable_failures.
	NotCounted bool `json:"not_counted,omitempty"`
}

// JobCancelledCmd stops a job for good.
type JobCancelledCmd struct {
	JobID  string `json:"job_id"`
	Reason string `json:"reason"`
	Time   int64  `json:"time"`
}

// JobPurgedCmd removes a cancelled job, with its checkpoints and histories,
// from the state: the leader's garbage collection of jobs cancelled longer
// ago than coordd's -job-gc-threshold, whose checkpoint files it has
// deleted already. Savepoints of the job stay.
type JobPurgedCmd struct {
	JobID string `json:"job_id"`
	Time  int64  `json:"time"`
}
