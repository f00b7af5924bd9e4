package fsm

import (
	"encoding/json"
	"fmt"
)

// String names a command type in errors and logs.
func (t CommandType) String() string {
	switch t {
	case CommandRegisterJob:
		return "RegisterJob"
	case CommandJobRestarted:
		return "JobRestarted"
	case CommandJobStatus:
		return "JobStatus"
	case CommandCheckpointTriggered:
		return "CheckpointTriggered"
	case CommandCheckpointCompleted:
		return "CheckpointCompleted"
	case CommandCheckpointAborted:
		return "CheckpointAborted"
	case CommandJobCancelled:
		return "JobCancelled"
	}
	return fmt.Sprintf("CommandType(%d)", uint8(t))
}

// commandTypeOf returns the command type of a command struct or a pointer to one.
func commandTypeOf(cmd any) (CommandType, bool) {
	switch cmd.(type) {
	case RegisterJobCmd, *RegisterJobCmd:
		return CommandRegisterJob, true
	case JobRestartedCmd, *JobRestartedCmd:
		return CommandJobRestarted, true
	case JobStatusCmd, *JobStatusCmd:
		return CommandJobStatus, true
	case CheckpointTriggeredCmd, *CheckpointTriggeredCmd:
		return CommandCheckpointTriggered, true
	case CheckpointCompletedCmd, *CheckpointCompletedCmd:
		return CommandCheckpointCompleted, true
	case CheckpointAbortedCmd, *CheckpointAbortedCmd:
		return CommandCheckpointAborted, true
	case JobCancelledCmd, *JobCancelledCmd:
		return CommandJobCancelled, true
	}
	return 0, false
}

// Encode builds the Raft log payload of a command: one type byte, then the
// command as JSON. cmd must be the struct (or a pointer to the struct) that
// t names, so that a mismatch is caught on the leader before it reaches the log.
func Encode(t CommandType, cmd any) ([]byte, error) {
	ct, ok := commandTypeOf(cmd)
	if !ok {
		return nil, fmt.Errorf("encode %v: %w: %T is not a command", t, ErrUnknownCommand, cmd)
	}
	if ct != t {
		return nil, fmt.Errorf("encode %v: %w: %T is a %v command", t, ErrMalformedCommand, cmd, ct)
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("encode %v: %w", t, err)
	}
	return append([]byte{byte(t)}, body...), nil
}

// Decode is the reverse of Encode: it returns the command type and the
// command struct (a value, such as RegisterJobCmd). It never panics on bad
// input; errors match ErrMalformedCommand or ErrUnknownCommand.
func Decode(data []byte) (CommandType, any, error) {
	t, body, err := splitCommand(data)
	if err != nil {
		return 0, nil, err
	}
	var cmd any
	switch t {
	case CommandRegisterJob:
		cmd, err = decodeBody[RegisterJobCmd](t, body)
	case CommandJobRestarted:
		cmd, err = decodeBody[JobRestartedCmd](t, body)
	case CommandJobStatus:
		cmd, err = decodeBody[JobStatusCmd](t, body)
	case CommandCheckpointTriggered:
		cmd, err = decodeBody[CheckpointTriggeredCmd](t, body)
	case CommandCheckpointCompleted:
		cmd, err = decodeBody[CheckpointCompletedCmd](t, body)
	case CommandCheckpointAborted:
		cmd, err = decodeBody[CheckpointAbortedCmd](t, body)
	case CommandJobCancelled:
		cmd, err = decodeBody[JobCancelledCmd](t, body)
	default:
		return t, nil, fmt.Errorf("decode command: %w %d", ErrUnknownCommand, uint8(t))
	}
	if err != nil {
		return t, nil, err
	}
	return t, cmd, nil
}

// splitCommand separates the type byte from the JSON body.
func splitCommand(data []byte) (CommandType, []byte, error) {
	if len(data) == 0 {
		return 0, nil, fmt.Errorf("decode command: %w: empty log entry", ErrMalformedCommand)
	}
	return CommandType(data[0]), data[1:], nil
}

// decodeBody decodes the JSON body of a command of type t. Unknown fields are
// ignored so that a log written by a newer version stays readable.
func decodeBody[C any](t CommandType, body []byte) (C, error) {
	var cmd C
	if err := json.Unmarshal(body, &cmd); err != nil {
		return cmd, fmt.Errorf("decode %v command: %w: %v", t, ErrMalformedCommand, err)
	}
	return cmd, nil
}
