package statefile

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
)

// input is what decodeRecords reads from: a verified section in memory
// (sliceInput) or a stream (streamInput).
type input interface {
	io.ByteReader
	// next returns the next n bytes. Inputs that copy use scratch buffer
	// slot (0, 1 or 2) for them, so the bytes stay valid until next is
	// called again with the same slot.
	next(n uint64, slot int) ([]byte, error)
}

var (
	// errTruncated is returned by inputs that end early.
	errTruncated = errors.New("truncated")
	// errOverflow is returned by readUvarint for a value over 64 bits.
	errOverflow = errors.New("uvarint overflows 64 bits")
)

// readUvarint reads a uvarint like binary.ReadUvarint, but returns
// errOverflow for a value over 64 bits and io.ErrUnexpectedEOF for one cut
// short.
func readUvarint(r io.ByteReader) (uint64, error) {
	var x uint64
	var s uint
	for i := range binary.MaxVarintLen64 {
		b, err := r.ReadByte()
		if err != nil {
			if i > 0 && err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		if b < 0x80 {
			if i == binary.MaxVarintLen64-1 && b > 1 {
				return 0, errOverflow
			}
			return x | uint64(b)<<s, nil
		}
		x |= uint64(b&0x7f) << s
		s += 7
	}
	return 0, errOverflow
}

// decodeRecords decodes the records of the section of key group kg that
// follow its key group, through its end-of-section byte, and returns how
// many there were. It calls fn, if not nil, for each of them. It checks that
// keys are strictly increasing and that a Full file holds no tombstones.
// Errors from fn are returned as they are.
func decodeRecords(in input, kind Kind, kg int32, fn func(kg int32, key, value []byte, tombstone bool) error) (int64, error) {
	var prev []byte
	var n int64
	for ; ; n++ {
		t, err := in.ReadByte()
		if err != nil {
			return n, recordErr(kg, n, err)
		}
		switch t {
		case recEndSection:
			if n == 0 {
				return n, corruptf("key group %d: empty section", kg)
			}
			return n, nil
		case recValue:
		case recTombstone:
			if kind == Full {
				return n, corruptf("key group %d: tombstone in a full state file", kg)
			}
		default:
			return n, corruptf("key group %d: record %d: unknown record type %#x", kg, n, t)
		}
		keyLen, err := readUvarint(in)
		if err != nil {
			return n, recordErr(kg, n, err)
		}
		// Alternate the key between two slots so prev stays valid.
		key, err := in.next(keyLen, int(n%2))
		if err != nil {
			return n, recordErr(kg, n, err)
		}
		if n > 0 && bytes.Compare(prev, key) >= 0 {
			return n, corruptf("key group %d: key %s not after key %s", kg, quoteKey(key), quoteKey(prev))
		}
		var value []byte
		if t == recValue {
			valueLen, err := readUvarint(in)
			if err != nil {
				return n, recordErr(kg, n, err)
			}
			if value, err = in.next(valueLen, 2); err != nil {
				return n, recordErr(kg, n, err)
			}
		}
		if fn != nil {
			if err := fn(kg, key, value, t == recTombstone); err != nil {
				return n, err
			}
		}
		prev = key
	}
}

// recordErr reports an error reading record n of key group kg. Errors of
// the input other than truncation (I/O errors of a stream) are wrapped.
func recordErr(kg int32, n int64, err error) error {
	var ce *corruptError
	switch {
	case errors.As(err, &ce):
		return err
	case errors.Is(err, errTruncated), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return corruptf("key group %d: record %d: truncated", kg, n)
	case errors.Is(err, errOverflow):
		return corruptf("key group %d: record %d: length overflows 64 bits", kg, n)
	}
	return fmt.Errorf("statefile: reading key group %d: %w", kg, err)
}

// sliceInput reads a section held in memory. It never copies.
type sliceInput struct {
	b   []byte
	off int
}

func (s *sliceInput) ReadByte() (byte, error) {
	if s.off >= len(s.b) {
		return 0, errTruncated
	}
	c := s.b[s.off]
	s.off++
	return c, nil
}

func (s *sliceInput) next(n uint64, _ int) ([]byte, error) {
	if n > uint64(len(s.b)-s.off) {
		return nil, errTruncated
	}
	p := s.b[s.off : s.off+int(n)]
	s.off += int(n)
	return p, nil
}

// streamInput reads a file from a stream, counting the bytes it consumes
// and adding them to sum while sum is not nil.
type streamInput struct {
	r    *bufio.Reader
	off  int64
	sum  io.Writer
	bufs [3][]byte
	one  [1]byte
}

// chunkLen is how much a streamInput reads at a time into a buffer that
// must grow, so that a corrupt length makes it allocate in proportion to
// the bytes that actually arrive, not to the length.
const chunkLen = 1 << 20

func (s *streamInput) ReadByte() (byte, error) {
	c, err := s.r.ReadByte()
	if err != nil {
		return 0, err
	}
	s.off++
	if s.sum != nil {
		s.one[0] = c
		s.sum.Write(s.one[:])
	}
	return c, nil
}

func (s *streamInput) next(n uint64, slot int) ([]byte, error) {
	if n > math.MaxInt-chunkLen {
		return nil, errTruncated // no stream is that long
	}
	buf := s.bufs[slot][:0]
	for uint64(len(buf)) < n {
		m := int(min(n-uint64(len(buf)), uint64(max(cap(buf)-len(buf), chunkLen))))
		buf = slices.Grow(buf, m)
		if _, err := io.ReadFull(s.r, buf[len(buf):len(buf)+m]); err != nil {
			s.bufs[slot] = buf
			return nil, err
		}
		buf = buf[:len(buf)+m]
	}
	s.bufs[slot] = buf
	s.off += int64(n)
	if s.sum != nil {
		s.sum.Write(buf)
	}
	return buf, nil
}
