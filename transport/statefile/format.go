package statefile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
)

// MaxKeyGroups bounds key groups: a state file holds key groups in
// [0, MaxKeyGroups). It equals fsm.MaxKeyGroups.
const MaxKeyGroups = 32768

// Kind says whether a state file is a full snapshot or a delta.
type Kind uint8

// The kinds of state file. The values are stored in files; never reuse one.
const (
	// Full is a snapshot of its key groups: every live entry, no tombstones.
	Full Kind = 1
	// Delta holds the changes since an earlier file: entries written since,
	// and tombstones for keys deleted since.
	Delta Kind = 2
)

// String returns "full", "delta" or "Kind(n)".
func (k Kind) String() string {
	switch k {
	case Full:
		return "full"
	case Delta:
		return "delta"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

func (k Kind) valid() bool { return k == Full || k == Delta }

// GroupInfo describes the section of one key group in a state file.
type GroupInfo struct {
	KeyGroup int32
	Offset   int64 // of the section's first byte in the file
	Length   int64 // of the section in bytes
	Entries  int64 // values and tombstones
}

// ErrCorrupt is matched (with errors.Is) by every error that reports a
// problem with the content of a state file: bad magic, a checksum mismatch,
// a truncated file, an inconsistent index, and so on.
var ErrCorrupt = errors.New("statefile: corrupt state file")

// corruptError is an error about the content of a file. It matches ErrCorrupt.
type corruptError struct {
	msg      string
	checksum bool // the whole-file checksum did not match
}

func (e *corruptError) Error() string        { return "statefile: corrupt state file: " + e.msg }
func (e *corruptError) Is(target error) bool { return target == ErrCorrupt }

func corruptf(format string, args ...any) error {
	return &corruptError{msg: fmt.Sprintf(format, args...)}
}

// Layout constants; see the package documentation.
const (
	magicLen      = 8
	headerLen     = magicLen + 1
	trailerLen    = 8 + 8 + 32 + magicLen
	endOfDataLen  = 4
	endOfData     = 0xFFFFFFFF
	recValue      = 0x00
	recTombstone  = 0x01
	recEndSection = 0x02
	// minSectionLen is a key group, one tombstone with an empty key (2 bytes)
	// and the end-of-section byte.
	minSectionLen = 4 + 2 + 1
	// minRecordLen is the length of the shortest record.
	minRecordLen = 2
	// minFileLen is a file without sections and an index without entries.
	minFileLen = headerLen + endOfDataLen + 2 + trailerLen
	// maxIndexEntryLen is an index entry with the longest uvarints possible.
	maxIndexEntryLen = 3 + 3*binary.MaxVarintLen64 + 32
	// maxIndexLen bounds the index: one entry per key group.
	maxIndexLen = 1 + 3 + MaxKeyGroups*maxIndexEntryLen
)

var magic = [magicLen]byte{'C', 'F', 'S', 'T', 'A', 'T', 'E', 0x01}

// appendIndex appends the index of a file of the given kind with the given
// sections and section checksums.
func appendIndex(b []byte, kind Kind, groups []GroupInfo, sums [][32]byte) []byte {
	b = append(b, byte(kind))
	b = binary.AppendUvarint(b, uint64(len(groups)))
	for i, g := range groups {
		b = binary.AppendUvarint(b, uint64(g.KeyGroup))
		b = binary.AppendUvarint(b, uint64(g.Offset))
		b = binary.AppendUvarint(b, uint64(g.Length))
		b = binary.AppendUvarint(b, uint64(g.Entries))
		b = append(b, sums[i][:]...)
	}
	return b
}

// appendTrailer appends the trailer for an index at indexOffset.
func appendTrailer(b []byte, indexOffset int64, index []byte, indexSum [32]byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(indexOffset))
	b = binary.BigEndian.AppendUint64(b, uint64(len(index)))
	b = append(b, indexSum[:]...)
	return append(b, magic[:]...)
}

// parseTrailer checks the trailer t of a file of the given size and returns
// where the index is. The returned offset and length are within the file.
func parseTrailer(t []byte, size int64) (indexOffset, indexLen int64, indexSum [32]byte, err error) {
	if !bytes.Equal(t[48:], magic[:]) {
		if bytes.Equal(t[48:55], magic[:7]) {
			return 0, 0, indexSum, corruptf("unsupported format version %d", t[55])
		}
		return 0, 0, indexSum, corruptf("bad magic in trailer (truncated, or not a state file)")
	}
	off := binary.BigEndian.Uint64(t[0:8])
	n := binary.BigEndian.Uint64(t[8:16])
	copy(indexSum[:], t[16:48])
	indexEnd := uint64(size) - trailerLen
	if n < 2 || n > maxIndexLen || n > indexEnd || off != indexEnd-n || off < headerLen+endOfDataLen {
		return 0, 0, indexSum, corruptf("trailer: index offset %d and length %d do not fit a file of %d bytes", off, n, size)
	}
	return int64(off), int64(n), indexSum, nil
}

// parseIndex decodes and checks the index b of a file whose index starts at
// indexOffset. Every section it returns lies within the file's data region.
func parseIndex(b []byte, indexOffset int64) (Kind, []GroupInfo, [][32]byte, error) {
	kind := Kind(b[0])
	if !kind.valid() {
		return 0, nil, nil, corruptf("index: unknown file kind %d", b[0])
	}
	b = b[1:]
	n, err := takeUvarint(&b)
	if err != nil {
		return 0, nil, nil, corruptf("index: section count: %v", err)
	}
	// Each entry takes at least 4+32 bytes, which bounds n by len(b).
	if n > MaxKeyGroups || n > uint64(len(b))/(4+32) {
		return 0, nil, nil, corruptf("index: %d sections do not fit an index of %d bytes", n, len(b))
	}
	groups := make([]GroupInfo, 0, n)
	sums := make([][32]byte, 0, n)
	dataEnd := uint64(indexOffset - endOfDataLen)
	next := uint64(headerLen)
	for i := range n {
		var f [4]uint64
		for j := range f {
			if f[j], err = takeUvarint(&b); err != nil {
				return 0, nil, nil, corruptf("index: section %d: %v", i, err)
			}
		}
		kg, off, length, entries := f[0], f[1], f[2], f[3]
		switch {
		case kg >= MaxKeyGroups:
			return 0, nil, nil, corruptf("index: section %d: key group %d out of range", i, kg)
		case len(groups) > 0 && kg <= uint64(groups[len(groups)-1].KeyGroup):
			return 0, nil, nil, corruptf("index: section %d: key group %d not after key group %d", i, kg, groups[len(groups)-1].KeyGroup)
		case off != next:
			return 0, nil, nil, corruptf("index: key group %d: section offset %d, want %d", kg, off, next)
		case length < minSectionLen || length > dataEnd-off:
			return 0, nil, nil, corruptf("index: key group %d: section length %d out of range", kg, length)
		case entries < 1 || entries > (length-5)/minRecordLen:
			return 0, nil, nil, corruptf("index: key group %d: %d entries do not fit a section of %d bytes", kg, entries, length)
		case len(b) < 32:
			return 0, nil, nil, corruptf("index: key group %d: truncated checksum", kg)
		}
		var sum [32]byte
		copy(sum[:], b)
		b = b[32:]
		groups = append(groups, GroupInfo{KeyGroup: int32(kg), Offset: int64(off), Length: int64(length), Entries: int64(entries)})
		sums = append(sums, sum)
		next = off + length
	}
	if next != dataEnd {
		return 0, nil, nil, corruptf("index: sections end at offset %d, want %d", next, dataEnd)
	}
	if len(b) != 0 {
		return 0, nil, nil, corruptf("index: %d bytes after the last entry", len(b))
	}
	return kind, groups, sums, nil
}

// takeUvarint decodes a uvarint from the start of *b and advances *b past it.
func takeUvarint(b *[]byte) (uint64, error) {
	v, n := binary.Uvarint(*b)
	if n == 0 {
		return 0, errors.New("truncated uvarint")
	}
	if n < 0 {
		return 0, errors.New("uvarint overflows 64 bits")
	}
	*b = (*b)[n:]
	return v, nil
}

// quoteKey formats a key for an error message, eliding the middle of long
// keys.
func quoteKey(k []byte) string {
	const max = 48
	if len(k) <= max {
		return strconv.Quote(string(k))
	}
	return strconv.Quote(string(k[:max/2])) + "..." + strconv.Quote(string(k[len(k)-max/2:])) +
		" (" + strconv.Itoa(len(k)) + " bytes)"
}
