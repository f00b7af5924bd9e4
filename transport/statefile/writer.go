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
	"sync"
)

// Summary describes a state file that a Writer has written.
type Summary struct {
	Kind       Kind
	Size       int64    // of the whole file in bytes
	SHA256     [32]byte // of the whole file
	Entries    int64    // values and tombstones
	Tombstones int64
	Groups     []GroupInfo // the sections, in key-group order
}

// A Writer writes a state file in one streaming pass: NewWriter writes the
// header, Add and Delete append entries in (key group, key) order, Close
// writes the index and the trailer. It buffers its output; Close flushes it.
//
// Add and Delete reject entries out of order, and Delete in a Full file,
// with an error that leaves the Writer usable and the file unchanged. After
// the underlying writer has failed, every method returns its error. A
// Writer is not safe for concurrent use.
type Writer struct {
	out     *bufio.Writer // writes through to the underlying writer and file
	file    hash.Hash     // SHA-256 of everything written
	sec     hash.Hash     // SHA-256 of the current section
	kind    Kind
	off     int64 // bytes written so far
	groups  []GroupInfo
	sums    [][32]byte
	inSec   bool   // a section is open; it is groups[len(groups)-1]
	lastKey []byte // the last key of the open section
	entries int64
	tombs   int64
	err     error // sticky error of the underlying writer
	closed  bool
	scratch [1 + binary.MaxVarintLen64]byte
}

// errClosed is returned by a Writer used after Close.
var errClosed = errors.New("statefile: writer is closed")

// bufferSize is the size of a Writer's output buffer.
const bufferSize = 64 << 10

// buffers holds the output buffers of closed Writers. A worker writes a
// state file per map task per checkpoint, most of them a few hundred bytes
// (inline state): a new 64 KiB buffer for each was most of what a worker
// of a thousand small jobs allocated, and the garbage collector's work.
var buffers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, bufferSize) }}

// NewWriter returns a Writer of a file of the given kind to w, and writes
// the file's header. The caller must call Close to complete the file.
func NewWriter(w io.Writer, kind Kind) (*Writer, error) {
	if !kind.valid() {
		return nil, fmt.Errorf("statefile: invalid file kind %d", kind)
	}
	fw := &Writer{
		file: sha256.New(),
		sec:  sha256.New(),
		kind: kind,
	}
	fw.out = buffers.Get().(*bufio.Writer)
	fw.out.Reset(io.MultiWriter(w, fw.file))
	fw.write(magic[:])
	fw.write([]byte{byte(kind)})
	if err := fw.out.Flush(); err != nil {
		return nil, fmt.Errorf("statefile: writing header: %w", err)
	}
	return fw, nil
}

// Add appends an entry with a value. Key groups must be non-decreasing, and
// keys strictly increasing bytewise within a key group. The Writer does not
// retain key or value.
func (w *Writer) Add(kg int32, key, value []byte) error {
	return w.add(kg, key, value, false)
}

// Delete appends a tombstone: key is deleted in key group kg. It is only
// allowed in a Delta file, and orders like Add.
func (w *Writer) Delete(kg int32, key []byte) error {
	if w.kind != Delta {
		return fmt.Errorf("statefile: tombstone for key %s in key group %d: tombstones are only allowed in a delta file", quoteKey(key), kg)
	}
	return w.add(kg, key, nil, true)
}

func (w *Writer) add(kg int32, key, value []byte, tombstone bool) error {
	if err := w.usable(); err != nil {
		return err
	}
	if kg < 0 || kg >= MaxKeyGroups {
		return fmt.Errorf("statefile: key group %d out of range [0, %d)", kg, MaxKeyGroups)
	}
	if w.inSec {
		cur := &w.groups[len(w.groups)-1]
		if kg < cur.KeyGroup {
			return fmt.Errorf("statefile: key group %d after key group %d", kg, cur.KeyGroup)
		}
		if kg == cur.KeyGroup && bytes.Compare(key, w.lastKey) <= 0 {
			return fmt.Errorf("statefile: key group %d: key %s not after key %s", kg, quoteKey(key), quoteKey(w.lastKey))
		}
		if kg > cur.KeyGroup {
			w.endSection()
		}
	}
	if !w.inSec {
		w.beginSection(kg)
	}
	rec := w.scratch[:0]
	if tombstone {
		rec = append(rec, recTombstone)
	} else {
		rec = append(rec, recValue)
	}
	rec = binary.AppendUvarint(rec, uint64(len(key)))
	w.writeSec(rec)
	w.writeSec(key)
	if !tombstone {
		w.writeSec(binary.AppendUvarint(w.scratch[:0], uint64(len(value))))
		w.writeSec(value)
	}
	w.lastKey = append(w.lastKey[:0], key...)
	w.groups[len(w.groups)-1].Entries++
	w.entries++
	if tombstone {
		w.tombs++
	}
	return w.err
}

// Close ends the last section, writes the index and the trailer, and flushes
// the Writer's buffer. It does not close the underlying writer. It returns
// an error if called twice.
func (w *Writer) Close() (Summary, error) {
	if err := w.usable(); err != nil {
		return Summary{}, err
	}
	w.closed = true
	if w.inSec {
		w.endSection()
	}
	w.write(binary.BigEndian.AppendUint32(w.scratch[:0], endOfData))
	indexOffset := w.off
	index := appendIndex(nil, w.kind, w.groups, w.sums)
	indexSum := sha256.Sum256(index)
	w.write(index)
	w.write(appendTrailer(nil, indexOffset, index, indexSum))
	if w.err == nil {
		if err := w.out.Flush(); err != nil {
			w.err = fmt.Errorf("statefile: writing: %w", err)
		}
	}
	// Every later call fails on closed before it could write: the buffer
	// can serve another Writer.
	w.out.Reset(nil)
	buffers.Put(w.out)
	w.out = nil
	if w.err != nil {
		return Summary{}, w.err
	}
	s := Summary{
		Kind:       w.kind,
		Size:       w.off,
		Entries:    w.entries,
		Tombstones: w.tombs,
		Groups:     w.groups,
	}
	w.file.Sum(s.SHA256[:0])
	return s, nil
}

func (w *Writer) usable() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errClosed
	}
	return nil
}

func (w *Writer) beginSection(kg int32) {
	w.groups = append(w.groups, GroupInfo{KeyGroup: kg, Offset: w.off})
	w.sec.Reset()
	w.inSec = true
	w.writeSec(binary.BigEndian.AppendUint32(w.scratch[:0], uint32(kg)))
}

func (w *Writer) endSection() {
	w.writeSec([]byte{recEndSection})
	g := &w.groups[len(w.groups)-1]
	g.Length = w.off - g.Offset
	var sum [32]byte
	w.sec.Sum(sum[:0])
	w.sums = append(w.sums, sum)
	w.inSec = false
}

// writeSec writes p as part of the open section.
func (w *Writer) writeSec(p []byte) {
	w.sec.Write(p)
	w.write(p)
}

func (w *Writer) write(p []byte) {
	if w.err != nil {
		return
	}
	if _, err := w.out.Write(p); err != nil {
		w.err = fmt.Errorf("statefile: writing: %w", err)
		return
	}
	w.off += int64(len(p))
}
