package fsm

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Compressed entries. Raft's log store rewrites whole pages for every
// append (raft-boltdb's copy-on-write B+tree), each follower receives every
// byte, and the commands are JSON whose keys repeat in every command of a
// batch: a group commit of checkpoint completions compresses about eight
// times with zstd's fastest level, for a few milliseconds of CPU per
// megabyte. A CommandCompressed entry carries an entry the leader would
// otherwise have written as it is, and is applied exactly as that entry:
// compression is only an envelope, like a batch.

// MaxCompressedPayload bounds the entry a CommandCompressed may carry once
// decompressed. It bounds what a garbled length can make a replica
// allocate; the leader writes larger entries uncompressed. Every replica
// must apply the same bound, so raising it needs a new feature level.
const MaxCompressedPayload = 64 << 20

// compressedCmd is a decoded CommandCompressed: the entry it carried,
// decoded.
type compressedCmd struct {
	t   CommandType
	cmd any
}

// zstd's encoder and decoder are safe for concurrent use and costly to
// build, so the package keeps one of each.
var (
	zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
		// Options that cannot fail; the checksum lets a replica refuse a
		// garbled entry rather than apply what it decodes to.
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(true))
		if err != nil {
			panic(fmt.Sprintf("zstd encoder: %v", err))
		}
		return e
	})
	zstdDecoder = sync.OnceValue(func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderMaxMemory(MaxCompressedPayload))
		if err != nil {
			panic(fmt.Sprintf("zstd decoder: %v", err))
		}
		return d
	})
)

// EncodeCompressed wraps payload, an entry as Encode or a batch encoder
// wrote it, in a CommandCompressed entry for a cluster whose every
// coordinator knows that type (the leader checks their feature level).
// After the type byte come the payload's length, as a uvarint, and the
// payload as one zstd frame. The caller keeps payload when the result is
// not smaller.
func EncodeCompressed(payload []byte) ([]byte, error) {
	switch {
	case len(payload) == 0:
		return nil, fmt.Errorf("encode compressed entry: %w: empty payload", ErrMalformedCommand)
	case len(payload) > MaxCompressedPayload:
		return nil, fmt.Errorf("encode compressed entry: %w: %d bytes, at most %d", ErrMalformedCommand, len(payload), MaxCompressedPayload)
	case CommandType(payload[0]) == CommandCompressed:
		return nil, fmt.Errorf("encode compressed entry: %w: payload is compressed already", ErrMalformedCommand)
	}
	// Room for the frame, which is at most about the payload's size: zstd
	// grows a destination that holds the header by repeated appends.
	out := make([]byte, 0, 1+binary.MaxVarintLen64+len(payload)+len(payload)/64+64)
	out = binary.AppendUvarint(append(out, byte(CommandCompressed)), uint64(len(payload)))
	return zstdEncoder().EncodeAll(payload, out), nil
}

// decodeCompressed decodes the body of a CommandCompressed and then the
// entry it carries. The declared length is checked before anything is
// allocated for it, and the frame must decode to exactly that many bytes,
// its checksum right, so a garbled entry is an error on every replica.
func decodeCompressed(t CommandType, body []byte) (any, error) {
	payload, err := decompress(t, body)
	if err != nil {
		return nil, err
	}
	inner, cmd, err := Decode(payload)
	if err != nil {
		return nil, fmt.Errorf("decode %v command: %w", t, err)
	}
	return compressedCmd{t: inner, cmd: cmd}, nil
}

// decompress returns the entry the body of a CommandCompressed carries.
func decompress(t CommandType, body []byte) ([]byte, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("decode %v command: %w: %s", t, ErrMalformedCommand, fmt.Sprintf(format, args...))
	}
	n, k := binary.Uvarint(body)
	switch {
	case k <= 0:
		return nil, bad("no payload length")
	case n == 0 || n > MaxCompressedPayload:
		return nil, bad("payload of %d bytes, want 1 to %d", n, MaxCompressedPayload)
	}
	payload, err := zstdDecoder().DecodeAll(body[k:], make([]byte, 0, n))
	switch {
	case err != nil:
		return nil, bad("%v", err)
	case uint64(len(payload)) != n:
		return nil, bad("payload of %d bytes, %d declared", len(payload), n)
	case CommandType(payload[0]) == CommandCompressed:
		return nil, bad("a compressed entry inside another")
	}
	return payload, nil
}

// compressedCommand is the command table's entry of CommandCompressed.
func compressedCommand() command {
	return command{
		name:   "Compressed",
		body:   reflect.TypeFor[compressedCmd](),
		decode: decodeCompressed,
		apply: func(s *State, cmd any) any {
			c := cmd.(compressedCmd)
			s.CompressedEntries = true
			return commands[c.t].apply(s, c.cmd)
		},
	}
}
