package fsm

import (
	"encoding/binary"
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
	if lone, err := checkBatch(payloads); lone != nil || err != nil {
		return lone, err
	}
	b := BatchCmd{Commands: make([]BatchEntry, len(payloads))}
	for i, p := range payloads {
		b.Commands[i] = BatchEntry{Type: CommandType(p[0]), Body: p[1:]}
	}
	return Encode(CommandBatch, b)
}

// checkBatch checks the commands of a batch to encode, as Encode wrote
// them: 1 to MaxBatch of them, none empty, none a batch. A lone command
// is returned as it is, the whole entry.
func checkBatch(payloads [][]byte) (lone []byte, err error) {
	switch n := len(payloads); {
	case n == 0:
		return nil, fmt.Errorf("encode batch: %w: no commands", ErrMalformedCommand)
	case n > MaxBatch:
		return nil, fmt.Errorf("encode batch: %w: %d commands, at most %d", ErrMalformedCommand, n, MaxBatch)
	}
	for i, p := range payloads {
		switch {
		case len(p) == 0:
			return nil, fmt.Errorf("encode batch: %w: command %d is empty", ErrMalformedCommand, i)
		case isBatch(CommandType(p[0])):
			return nil, fmt.Errorf("encode batch: %w: command %d is a batch", ErrMalformedCommand, i)
		case CommandType(p[0]) == CommandCompressed:
			return nil, fmt.Errorf("encode batch: %w: command %d is compressed", ErrMalformedCommand, i)
		}
	}
	if len(payloads) == 1 {
		return payloads[0], nil
	}
	return nil, nil
}

// isBatch says whether t is one of the batch types, which never nest.
func isBatch(t CommandType) bool { return t == CommandBatch || t == CommandFramedBatch }

// EncodeFramedBatch is EncodeBatch for a cluster whose every coordinator
// knows CommandFramedBatch (the leader checks their feature level): the
// same commands, applied the same way, in a cheaper envelope. After the
// type byte come the number of commands and then each command's length and
// bytes as Encode wrote them, lengths as uvarints. A JSON envelope costs a
// second encoding of every command on the leader and a second parse on
// every replica, as much as decoding the commands themselves.
func EncodeFramedBatch(payloads [][]byte) ([]byte, error) {
	if lone, err := checkBatch(payloads); lone != nil || err != nil {
		return lone, err
	}
	size := 1 + binary.MaxVarintLen64
	for _, p := range payloads {
		size += binary.MaxVarintLen64 + len(p)
	}
	out := make([]byte, 0, size)
	out = append(out, byte(CommandFramedBatch))
	out = binary.AppendUvarint(out, uint64(len(payloads)))
	for _, p := range payloads {
		out = binary.AppendUvarint(out, uint64(len(p)))
		out = append(out, p...)
	}
	return out, nil
}

// framedBatch is a decoded CommandFramedBatch: the same entries as a
// BatchCmd, whose bodies share the log entry's bytes. A type of its own, so
// that Encode never writes a BatchCmd as a framed batch in JSON.
type framedBatch BatchCmd

// decodeFramedBatch decodes the body of a CommandFramedBatch. Every length
// is checked against what is left, so a garbled entry is an error, never a
// panic or an allocation it names; commands of unknown type decode here and
// fail alone in applyBatch.
func decodeFramedBatch(t CommandType, body []byte) (any, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("decode %v command: %w: %s", t, ErrMalformedCommand, fmt.Sprintf(format, args...))
	}
	n, k := binary.Uvarint(body)
	switch {
	case k <= 0:
		return nil, bad("no command count")
	case n < 2 || n > MaxBatch:
		return nil, bad("%d commands, want 2 to %d", n, MaxBatch)
	case n > uint64(len(body)-k)/2:
		// Each command takes a length and a type byte at least: a short
		// entry cannot make Apply allocate for MaxBatch commands.
		return nil, bad("%d commands in %d bytes", n, len(body)-k)
	}
	body = body[k:]
	b := framedBatch{Commands: make([]BatchEntry, n)}
	for i := range b.Commands {
		size, k := binary.Uvarint(body)
		switch {
		case k <= 0:
			return nil, bad("command %d has no length", i)
		case size == 0:
			return nil, bad("command %d is empty", i)
		case size > uint64(len(body)-k):
			return nil, bad("command %d is %d bytes, %d are left", i, size, len(body)-k)
		}
		p := body[k : k+int(size)]
		b.Commands[i] = BatchEntry{Type: CommandType(p[0]), Body: p[1:]}
		body = body[k+int(size):]
	}
	if len(body) > 0 {
		return nil, bad("%d bytes after the last command", len(body))
	}
	return b, nil
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
		case isBatch(e.Type):
			results[i] = fmt.Errorf("batch command %d: %w: a batch inside a batch", i, ErrMalformedCommand)
			continue
		case e.Type == CommandCompressed: // batches go inside compressed entries, not around them
			results[i] = fmt.Errorf("batch command %d: %w: a compressed entry inside a batch", i, ErrMalformedCommand)
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

// UnknownCommands returns the command types in the log entry data that this
// build does not know: the entry's own, or those of the commands a batch or
// a compressed entry carries; none for a malformed entry. A tool that
// replays a log and then compacts it (coordd raft recover) refuses a log
// that holds any, since the replay would drop those commands for good.
func UnknownCommands(data []byte) []CommandType {
	if len(data) == 0 {
		return nil
	}
	t, body := CommandType(data[0]), data[1:]
	if _, ok := commands[t]; !ok {
		return []CommandType{t}
	}
	switch t {
	case CommandCompressed:
		payload, err := decompress(t, body)
		if err != nil {
			return nil
		}
		return UnknownCommands(payload)
	case CommandBatch, CommandFramedBatch:
		_, cmd, err := Decode(data)
		if err != nil {
			return nil
		}
		var b BatchCmd
		switch c := cmd.(type) {
		case BatchCmd:
			b = c
		case framedBatch:
			b = BatchCmd(c)
		}
		var unknown []CommandType
		for _, e := range b.Commands {
			if _, ok := commands[e.Type]; !ok {
				unknown = append(unknown, e.Type)
			}
		}
		return unknown
	}
	return nil
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
