package fsm

import (
	"encoding/json"
	"fmt"
	"reflect"
)

// command describes one command type: its name in errors and logs, the Go
// type of its body, and how Apply applies it. The table below is the one
// place a command type is listed.
type command struct {
	name   string
	body   reflect.Type // the command struct, such as RegisterJobCmd
	decode func(t CommandType, body []byte) (any, error)
	apply  func(s *State, cmd any) any
}

// def builds the table entry of command struct C applied by apply.
func def[C any](name string, apply func(s *State, c *C) any) command {
	return command{
		name: name,
		body: reflect.TypeFor[C](),
		decode: func(t CommandType, body []byte) (any, error) {
			return decodeBody[C](t, body)
		},
		apply: func(s *State, cmd any) any {
			c := cmd.(C) // decode made it
			res := apply(s, &c)
			if j, ok := any(&c).(jobCommand); ok {
				if _, failed := res.(error); !failed && j.job() != "" {
					s.touched = append(s.touched, j.job())
				}
			}
			return res
		},
	}
}

// jobCommand is a command that changes one job.
type jobCommand interface{ job() string }

func (c *RegisterJobCmd) job() string         { return c.ID }
func (c *JobRestartedCmd) job() string        { return c.JobID }
func (c *JobStatusCmd) job() string           { return c.JobID }
func (c *CheckpointTriggeredCmd) job() string { return c.JobID }
func (c *CheckpointCompletedCmd) job() string { return c.JobID }
func (c *CheckpointAbortedCmd) job() string   { return c.JobID }
func (c *JobCancelledCmd) job() string        { return c.JobID }
func (c *TasksRestartedCmd) job() string      { return c.JobID }
func (c *JobPurgedCmd) job() string           { return c.JobID }

// errResult turns an applyX's error into Apply's response: the error, or
// nil (an untyped nil, not a nil error in an interface).
func errResult(err error) any {
	if err != nil {
		return err
	}
	return nil
}

// commands is every command type by number. Numbers are written to disk:
// add new ones at the end of the const block in types.go, never reuse one.
var commands = map[CommandType]command{
	CommandRegisterJob: def("RegisterJob", func(s *State, c *RegisterJobCmd) any { return errResult(s.applyRegisterJob(c)) }),
	CommandJobRestarted: def("JobRestarted", func(s *State, c *JobRestartedCmd) any {
		return errResult(s.applyJobRestarted(c))
	}),
	CommandJobStatus: def("JobStatus", func(s *State, c *JobStatusCmd) any { return errResult(s.applyJobStatus(c)) }),
	CommandCheckpointTriggered: def("CheckpointTriggered", func(s *State, c *CheckpointTriggeredCmd) any {
		id, err := s.applyCheckpointTriggered(c)
		if err != nil {
			return err
		}
		return id
	}),
	CommandCheckpointCompleted: def("CheckpointCompleted", func(s *State, c *CheckpointCompletedCmd) any {
		return errResult(s.applyCheckpointCompleted(c))
	}),
	CommandCheckpointAborted: def("CheckpointAborted", func(s *State, c *CheckpointAbortedCmd) any {
		return errResult(s.applyCheckpointAborted(c))
	}),
	CommandJobCancelled: def("JobCancelled", func(s *State, c *JobCancelledCmd) any { return errResult(s.applyJobCancelled(c)) }),
	CommandTasksRestarted: def("TasksRestarted", func(s *State, c *TasksRestartedCmd) any {
		return errResult(s.applyTasksRestarted(c))
	}),
	CommandSavepointDeleted: def("SavepointDeleted", func(s *State, c *SavepointDeletedCmd) any {
		return errResult(s.applySavepointDeleted(c))
	}),
	CommandJobPurged: def("JobPurged", func(s *State, c *JobPurgedCmd) any { return errResult(s.applyJobPurged(c)) }),
}

// The batch command applies commands from the table, so it joins the table
// at init, which Go's initialization order otherwise calls a cycle.
func init() {
	commands[CommandBatch] = def("Batch", func(s *State, c *BatchCmd) any { return s.applyBatch(c) })
	commands[CommandFramedBatch] = command{
		name:   "FramedBatch",
		body:   reflect.TypeFor[framedBatch](),
		decode: decodeFramedBatch,
		apply: func(s *State, cmd any) any {
			c := BatchCmd(cmd.(framedBatch))
			s.FramedBatches = true
			return s.applyBatch(&c)
		},
	}
	commands[CommandCompressed] = compressedCommand()
	for t, c := range commands {
		if t != CommandFramedBatch && t != CommandCompressed { // built by their own encoders, never Encode
			commandTypes[c.body] = t
		}
	}
}

// commandTypes finds a command's type from its Go type.
var commandTypes = make(map[reflect.Type]CommandType)

// String names a command type in errors and logs.
func (t CommandType) String() string {
	if c, ok := commands[t]; ok {
		return c.name
	}
	return fmt.Sprintf("CommandType(%d)", uint8(t))
}

// commandTypeOf returns the command type of a command struct or a pointer to one.
func commandTypeOf(cmd any) (CommandType, bool) {
	rt := reflect.TypeOf(cmd)
	if rt != nil && rt.Kind() == reflect.Pointer {
		rt = rt.Elem()
	}
	t, ok := commandTypes[rt]
	return t, ok
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
	if len(data) == 0 {
		return 0, nil, fmt.Errorf("decode command: %w: empty log entry", ErrMalformedCommand)
	}
	t, body := CommandType(data[0]), data[1:]
	c, ok := commands[t]
	if !ok {
		return t, nil, fmt.Errorf("decode command: %w %d", ErrUnknownCommand, uint8(t))
	}
	cmd, err := c.decode(t, body)
	if err != nil {
		return t, nil, err
	}
	return t, cmd, nil
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
