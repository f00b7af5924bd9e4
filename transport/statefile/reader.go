package statefile

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"sort"
)

// A Reader reads parts of a state file through an io.ReaderAt. It is safe
// for concurrent use if its io.ReaderAt is (as the io.ReaderAt contract
// requires).
type Reader struct {
	r      io.ReaderAt
	size   int64
	kind   Kind
	groups []GroupInfo
	sums   [][32]byte
}

// tailLen is how much of the end of a file NewReader reads at once, hoping
// to get the whole index with the trailer.
const tailLen = 64 << 10

// NewReader reads the trailer and the index of the state file of size bytes
// that r reads, and verifies the index checksum. It does not read the
// header or any section.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	if size < minFileLen {
		return nil, corruptf("file too short (%d bytes, the shortest state file has %d)", size, minFileLen)
	}
	tail := make([]byte, min(size, tailLen))
	tailOff := size - int64(len(tail))
	if err := readFullAt(r, tail, tailOff); err != nil {
		return nil, fmt.Errorf("statefile: reading trailer: %w", err)
	}
	indexOffset, indexLen, indexSum, err := parseTrailer(tail[len(tail)-trailerLen:], size)
	if err != nil {
		return nil, err
	}
	var index []byte
	if indexOffset >= tailOff {
		index = tail[indexOffset-tailOff : indexOffset-tailOff+indexLen]
	} else {
		index = make([]byte, indexLen) // bounded by size and maxIndexLen
		if err := readFullAt(r, index, indexOffset); err != nil {
			return nil, fmt.Errorf("statefile: reading index: %w", err)
		}
	}
	if sha256.Sum256(index) != indexSum {
		return nil, corruptf("index checksum mismatch")
	}
	kind, groups, sums, err := parseIndex(index, indexOffset)
	if err != nil {
		return nil, err
	}
	return &Reader{r: r, size: size, kind: kind, groups: groups, sums: sums}, nil
}

// Kind returns the kind of the file.
func (r *Reader) Kind() Kind { return r.kind }

// Groups returns the sections of the file, in key-group order. The caller
// may modify the returned slice.
func (r *Reader) Groups() []GroupInfo { return slices.Clone(r.groups) }

// Entries returns the number of entries (values and tombstones) in the file.
func (r *Reader) Entries() int64 {
	var n int64
	for _, g := range r.groups {
		n += g.Entries
	}
	return n
}

// Range calls fn for every entry of key groups [start, end) in the file, in
// (key group, key) order: key and value, or key, a nil value and tombstone
// true. It reads
// each section it needs with one ReadAt call into memory and verifies its
// checksum and structure before calling fn for its entries. key and value
// are only valid during fn, which must not retain them. Range stops at the
// first error, and returns an error of fn as it is.
func (r *Reader) Range(start, end int32, fn func(kg int32, key, value []byte, tombstone bool) error) error {
	i := sort.Search(len(r.groups), func(i int) bool { return r.groups[i].KeyGroup >= start })
	var buf []byte
	for ; i < len(r.groups) && r.groups[i].KeyGroup < end; i++ {
		g := r.groups[i]
		buf = slices.Grow(buf[:0], int(g.Length))[:g.Length] // bounded by the file size
		if err := readFullAt(r.r, buf, g.Offset); err != nil {
			return fmt.Errorf("statefile: reading section of key group %d: %w", g.KeyGroup, err)
		}
		if sha256.Sum256(buf) != r.sums[i] {
			return corruptf("key group %d: section checksum mismatch (offset %d, length %d)", g.KeyGroup, g.Offset, g.Length)
		}
		// Check the whole section before passing on any of it.
		if err := decodeSection(buf, r.kind, g, nil); err != nil {
			return err
		}
		if err := decodeSection(buf, r.kind, g, fn); err != nil {
			return err
		}
	}
	return nil
}

// decodeSection decodes the section b described by g, checking it against g.
func decodeSection(b []byte, kind Kind, g GroupInfo, fn func(kg int32, key, value []byte, tombstone bool) error) error {
	if kg := binary.BigEndian.Uint32(b); kg != uint32(g.KeyGroup) {
		return corruptf("section of key group %d starts with key group %d", g.KeyGroup, kg)
	}
	in := &sliceInput{b: b, off: 4}
	n, err := decodeRecords(in, kind, g.KeyGroup, fn)
	if err != nil {
		return err
	}
	if in.off != len(b) {
		return corruptf("key group %d: %d bytes after the end of the section", g.KeyGroup, len(b)-in.off)
	}
	if n != g.Entries {
		return corruptf("key group %d: section has %d entries, the index says %d", g.KeyGroup, n, g.Entries)
	}
	return nil
}

// readFullAt fills p from r at off. A short read is corruption: the caller
// sized p from the file's size.
func readFullAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return corruptf("file shorter than its stated size: read %d bytes at offset %d, want %d", n, off, len(p))
	}
	return err
}

// ReadAll reads a whole state file from r in one pass, and calls fn for the
// entries of key groups [start, end), as Range does. It verifies the
// SHA-256 of the whole file against wantSHA256 and everything else that
// NewReader and Range verify, and checks that the index describes the
// sections it has read.
//
// ReadAll calls fn as it decodes entries, before it can verify the file: if
// it returns an error, the caller must discard everything it got from fn.
// When it finds the file corrupt, it reads the rest of r to tell damage
// (reported as a file checksum mismatch) from a file written wrong.
// key and value are only valid during fn. ReadAll returns an error of fn as
// it is. It reads r to its end, and stops early only for an error of fn or
// of r.
func ReadAll(r io.Reader, wantSHA256 [32]byte, start, end int32, fn func(kg int32, key, value []byte, tombstone bool) error) error {
	file := sha256.New()
	in := &streamInput{r: bufio.NewReaderSize(io.TeeReader(r, file), 64<<10)}
	err := readStream(in, file, wantSHA256, start, end, fn)
	var ce *corruptError
	if !errors.As(err, &ce) || ce.checksum {
		return err
	}
	// Tell damage from a bad writer: read the rest of the file and report
	// a checksum mismatch if there is one.
	n, rerr := io.Copy(io.Discard, in.r)
	if rerr != nil {
		return err
	}
	if got := [32]byte(file.Sum(nil)); got != wantSHA256 {
		return corruptf("file checksum mismatch: SHA-256 of its %d bytes is %x, want %x (first problem: %s)", in.off+n, got, wantSHA256, ce.msg)
	}
	return err
}

// readStream does the work of ReadAll. file is the SHA-256 of everything read
// from in.
func readStream(in *streamInput, file hash.Hash, wantSHA256 [32]byte, start, end int32, fn func(kg int32, key, value []byte, tombstone bool) error) error {
	streamErr := func(what string, err error) error {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, errTruncated) {
			return corruptf("truncated in the %s at offset %d", what, in.off)
		}
		return fmt.Errorf("statefile: reading %s: %w", what, err)
	}

	header, err := in.next(headerLen, 0)
	if err != nil {
		return streamErr("header", err)
	}
	if !bytes.Equal(header[:len(magic)], magic[:]) {
		return corruptf("bad magic in header (not a state file)")
	}
	kind := Kind(header[len(magic)])
	if !kind.valid() {
		return corruptf("header: unknown file kind %d", kind)
	}

	var groups []GroupInfo
	var sums [][32]byte
	sec := sha256.New()
	for {
		off := in.off
		b, err := in.next(4, 0)
		if err != nil {
			return streamErr("sections", err)
		}
		v := binary.BigEndian.Uint32(b)
		if v == endOfData {
			break
		}
		if v >= MaxKeyGroups {
			return corruptf("section at offset %d: key group %d out of range", off, v)
		}
		kg := int32(v)
		if len(groups) > 0 && kg <= groups[len(groups)-1].KeyGroup {
			return corruptf("section at offset %d: key group %d not after key group %d", off, kg, groups[len(groups)-1].KeyGroup)
		}
		sec.Reset()
		sec.Write(b)
		in.sum = sec
		var secFn func(kg int32, key, value []byte, tombstone bool) error
		if start <= kg && kg < end {
			secFn = fn
		}
		n, err := decodeRecords(in, kind, kg, secFn)
		if err != nil {
			return err
		}
		in.sum = nil
		groups = append(groups, GroupInfo{KeyGroup: kg, Offset: off, Length: in.off - off, Entries: n})
		var sum [32]byte
		sums = append(sums, [32]byte(sec.Sum(sum[:0])))
	}

	// The index and the trailer are all that is left; read them, and check
	// that nothing follows.
	indexOffset := in.off
	rest, err := io.ReadAll(io.LimitReader(in.r, maxIndexLen+trailerLen+1))
	if err != nil {
		return streamErr("index", err)
	}
	if len(rest) > maxIndexLen+trailerLen {
		return corruptf("more than %d bytes after the end of the sections", maxIndexLen+trailerLen)
	}
	size := indexOffset + int64(len(rest))
	if got := [32]byte(file.Sum(nil)); got != wantSHA256 {
		err := corruptf("file checksum mismatch: SHA-256 of its %d bytes is %x, want %x", size, got, wantSHA256)
		err.(*corruptError).checksum = true
		return err
	}
	if len(rest) < trailerLen+2 {
		return corruptf("truncated after the sections")
	}
	gotOffset, _, indexSum, err := parseTrailer(rest[len(rest)-trailerLen:], size)
	if err != nil {
		return err
	}
	if gotOffset != indexOffset {
		return corruptf("trailer: index offset %d, but the sections end at %d", gotOffset, indexOffset)
	}
	index := rest[:len(rest)-trailerLen]
	if sha256.Sum256(index) != indexSum {
		return corruptf("index checksum mismatch")
	}
	ikind, igroups, isums, err := parseIndex(index, indexOffset)
	switch {
	case err != nil:
		return err
	case ikind != kind:
		return corruptf("index says the file is %s, the header says %s", ikind, kind)
	case !slices.Equal(igroups, groups):
		return corruptf("index does not describe the sections in the file")
	case !slices.Equal(isums, sums):
		return corruptf("section checksum mismatch")
	}
	return nil
}
