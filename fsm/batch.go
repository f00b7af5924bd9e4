package fsm

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Group commit. The leader's commands of many jobs that are ready at the same
// time go into one Raft entry, so that the group passes as many commands per
// second as its disk passes entries times the batch size. A batch is only an
// envelope: each command in it is decoded, validated and applied on its own,
// in order, exactly as if it had been an entry of its own, and has its own
// result. A command the FSM rejects does not affect the others.

// BatchCmd is the body of a CommandBatch entry.
type BatchCmd struct {
	Commands []BatchEntry `json:"commands"`
}

// BatchEntry is one command of a batch: its type and its JSON body, as
// Encode would write them.
type BatchEntry struct {
	Type CommandType     `json:"type"`
	Body json.RawMessage `json:"body"`
}

// BatchResult is Apply's answer to a batch: one result per command, in the
// order of the batch. An element is what Apply would have answered for the
// command alone: an error value, a checkpoint id, or nil.
type BatchResult []any

// MaxBatch is the most commands one batch entry may carry; Apply rejects
// larger batches whole, before applying any command.
const MaxBatch = 4096

// EncodeBatch builds the Raft log payload of a batch from commands already
// encoded by Encode. A batch of one command is that command's own payload,
// so that nothing changes for a lone command.
func EncodeBatch(payloads [][]byte) ([]byte, error) {
	switch n := len(payloads); {
	case n == 0:
		return nil, fmt.Errorf("encode batch: %w: no commands", ErrMalformedCommand)
	case n == 1:
		return payloads[0], nil
	case n > MaxBatch:
		return nil, fmt.Errorf("encode batch: %w: %d commands, at most %d", ErrMalformedCommand, n, MaxBatch)
	}
	b := BatchCmd{Commands: make([]BatchEntry, len(payloads))}
	for i, p := range payloads {
		if len(p) == 0 {
			return nil, fmt.Errorf("encode batch: %w: command %d is empty", ErrMalformedCommand, i)
		}
		if CommandType(p[0]) == CommandBatch {
			return nil, fmt.Errorf("encode batch: %w: command %d is a batch", ErrMalformedCommand, i)
		}
		b.Commands[i] = BatchEntry{Type: CommandType(p[0]), Body: p[1:]}
	}
	return Encode(CommandBatch, b)
}

// applyBatch applies every command of c in order and returns their results.
// A command that does not decode, is of an unknown type or is itself a batch
// gets an error result; the others are applied as usual.
func (s *State) applyBatch(c *BatchCmd) any {
	if len(c.Commands) > MaxBatch {
		return fmt.Errorf("apply batch: %w: %d commands, at most %d", ErrMalformedCommand, len(c.Commands), MaxBatch)
	}
	results := make(BatchResult, len(c.Commands))
	for i, e := range c.Commands {
		cmd, ok := commands[e.Type]
		switch {
		case !ok:
			results[i] = fmt.Errorf("batch command %d: %w %d", i, ErrUnknownCommand, uint8(e.Type))
			continue
		case e.Type == CommandBatch:
			results[i] = fmt.Errorf("batch command %d: %w: a batch inside a batch", i, ErrMalformedCommand)
			continue
		}
		body, err := cmd.decode(e.Type, e.Body)
		if err != nil {
			results[i] = fmt.Errorf("batch command %d: %w", i, err)
			continue
		}
		results[i] = cmd.apply(s, body)
	}
	return results
}

// unknownIn counts the commands of unknown type in a batch result.
func unknownIn(res any) int {
	br, ok := res.(BatchResult)
	if !ok {
		return 0
	}
	n := 0
	for _, r := range br {
		if err, ok := r.(error); ok && errors.Is(err, ErrUnknownCommand) {
			n++
		}
	}
	return n
}
