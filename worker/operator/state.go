package operator

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
)

// Int64Size is the length of a value written by PutInt64.
const Int64Size = 8

// GetInt64 reads the current key's state as an int64 written by PutInt64;
// ok is false (and v 0) when the key has no state. A value of another length
// is an error naming it, never a panic.
func GetInt64(ctx Context) (v int64, ok bool, err error) {
	b, ok, err := ctx.Get()
	if err != nil || !ok {
		return 0, ok, err
	}
	v, err = DecodeInt64(b)
	if err != nil {
		return 0, false, fmt.Errorf("state of key %q: %w", truncate(ctx.Key(), 32), err)
	}
	return v, true, nil
}

// PutInt64 stores v as the current key's state: 8 bytes, big-endian.
func PutInt64(ctx Context, v int64) error {
	var b [Int64Size]byte
	return ctx.Put(AppendInt64(b[:0], v))
}

// AppendInt64 appends the state encoding of v (8 bytes, big-endian) to b.
func AppendInt64(b []byte, v int64) []byte {
	return binary.BigEndian.AppendUint64(b, uint64(v))
}

// DecodeInt64 reads a value written by PutInt64 or AppendInt64.
func DecodeInt64(b []byte) (int64, error) {
	if len(b) != Int64Size {
		return 0, fmt.Errorf("int64 state value has %d bytes, want %d", len(b), Int64Size)
	}
	return int64(binary.BigEndian.Uint64(b)), nil
}

// GetJSON decodes the current key's state, written by PutJSON, into v; ok is
// false (and v untouched) when the key has no state.
func GetJSON(ctx Context, v any) (ok bool, err error) {
	b, ok, err := ctx.Get()
	if err != nil || !ok {
		return ok, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("state of key %q: decode JSON: %w", truncate(ctx.Key(), 32), err)
	}
	return true, nil
}

// PutJSON stores the JSON encoding of v as the current key's state.
func PutJSON(ctx Context, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("state of key %q: encode JSON: %w", truncate(ctx.Key(), 32), err)
	}
	return ctx.Put(b)
}
