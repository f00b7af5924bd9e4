package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// The packed form of ItemBatch.packed: a version byte, then entries, each a
// tag byte and its fields, varints as encoding/binary writes them:
//
//	tagRecord  varint partition, varint offset
//	tagThrough varint partition, varint offset
//	tagItem    uvarint key group, uvarint len(key), key, varint num, uvarint len(raw), raw
//
// A record mark says that the items after it, up to the next mark, come from
// the source record at (partition, offset); a through mark says that every
// item of the partition's records up to offset is in this batch or an earlier
// one on the channel (the items before it were merged by a combiner and name
// no record). New kinds of entries take new tags, and a new layout a new
// version: a reader refuses what it does not know rather than misreading it.
const (
	batchVersion byte = 1

	tagRecord  byte = 1
	tagThrough byte = 2
	tagItem    byte = 3
)

// BatchWriter packs items into an ItemBatch.packed buffer. Its buffer is
// reused from one batch to the next (Reset), so a steady stream of batches
// costs no allocation; Detach hands the buffer over when its reader must keep
// it. The zero value is ready to use.
type BatchWriter struct {
	buf   []byte
	items int
}

func (w *BatchWriter) start() {
	if len(w.buf) == 0 {
		w.buf = append(w.buf, batchVersion)
	}
}

// Record marks the items written next as coming from the record at
// (partition, offset).
func (w *BatchWriter) Record(partition int32, offset int64) {
	w.start()
	w.buf = append(w.buf, tagRecord)
	w.buf = binary.AppendVarint(w.buf, int64(partition))
	w.buf = binary.AppendVarint(w.buf, offset)
}

// Through marks that every item of partition's records up to offset has been
// written, in this batch or an earlier one.
func (w *BatchWriter) Through(partition int32, offset int64) {
	w.start()
	w.buf = append(w.buf, tagThrough)
	w.buf = binary.AppendVarint(w.buf, int64(partition))
	w.buf = binary.AppendVarint(w.buf, offset)
}

// Item appends one item; key and raw are copied.
func (w *BatchWriter) Item(keyGroup int32, key []byte, num int64, raw []byte) {
	w.start()
	w.buf = append(w.buf, tagItem)
	w.buf = binary.AppendUvarint(w.buf, uint64(keyGroup))
	w.buf = binary.AppendUvarint(w.buf, uint64(len(key)))
	w.buf = append(w.buf, key...)
	w.buf = binary.AppendVarint(w.buf, num)
	w.buf = binary.AppendUvarint(w.buf, uint64(len(raw)))
	w.buf = append(w.buf, raw...)
	w.items++
}

// Items is the number of items written since the last Reset.
func (w *BatchWriter) Items() int { return w.items }

// Len is the size of the packed batch in bytes.
func (w *BatchWriter) Len() int { return len(w.buf) }

// Bytes returns the packed batch. It stays valid until the next call that
// writes or resets.
func (w *BatchWriter) Bytes() []byte {
	w.start()
	return w.buf
}

// Reset empties the writer and keeps its buffer for the next batch.
func (w *BatchWriter) Reset() {
	w.buf, w.items = w.buf[:0], 0
}

// Detach returns the packed batch and leaves the writer empty with next as
// its buffer (reset to length 0; nil is fine): the caller owns the returned
// bytes, which the writer never touches again.
func (w *BatchWriter) Detach(next []byte) []byte {
	b := w.Bytes()
	w.buf, w.items = next[:0], 0
	return b
}

// BatchItem is one item as ReadBatch hands it to a visitor. Key and Raw point
// into the packed buffer: they are valid as long as it is, and must not be
// modified.
type BatchItem struct {
	KeyGroup int32
	Key      []byte
	Num      int64
	Raw      []byte
}

// BatchVisitor receives the entries of a packed batch in order.
type BatchVisitor interface {
	// Record is called for a record mark: the items up to the next mark
	// come from the record at (partition, offset).
	Record(partition int32, offset int64) error
	// Through is called for a through mark: every item of partition's
	// records up to offset has now been visited.
	Through(partition int32, offset int64) error
	// Item is called for each item; it must not keep it after it returns.
	Item(it *BatchItem) error
}

// ErrBatchVersion is returned by ReadBatch for a batch packed in a format it
// does not know, from a newer or an older worker.
var ErrBatchVersion = errors.New("packed batch: unknown format version")

// ReadBatch reads the packed batch b and calls v for each entry, in order,
// without allocating. It stops at the first error from v, and returns an
// error naming the byte at fault for a batch that is malformed: truncated,
// an unknown tag, a length beyond the end, a key group or partition out of
// range.
func ReadBatch(b []byte, v BatchVisitor) error {
	if len(b) == 0 {
		return nil
	}
	if b[0] != batchVersion {
		return fmt.Errorf("%w %d (this worker reads %d)", ErrBatchVersion, b[0], batchVersion)
	}
	r := batchReader{b: b, pos: 1}
	var it BatchItem
	for r.pos < len(b) {
		at := r.pos
		tag := b[r.pos]
		r.pos++
		switch tag {
		case tagRecord, tagThrough:
			p := r.varint("partition")
			off := r.varint("offset")
			if r.err != nil {
				return r.err
			}
			if p < 0 || p > math.MaxInt32 {
				return fmt.Errorf("packed batch: byte %d: partition %d out of range", at, p)
			}
			var err error
			if tag == tagRecord {
				err = v.Record(int32(p), off)
			} else {
				err = v.Through(int32(p), off)
			}
			if err != nil {
				return err
			}
		case tagItem:
			kg := r.uvarint("key group")
			it.Key = r.bytes("key", "key length")
			it.Num = r.varint("num")
			it.Raw = r.bytes("raw", "raw length")
			if r.err != nil {
				return r.err
			}
			if kg > math.MaxInt32 {
				return fmt.Errorf("packed batch: byte %d: key group %d out of range", at, kg)
			}
			it.KeyGroup = int32(kg)
			if err := v.Item(&it); err != nil {
				return err
			}
		default:
			return fmt.Errorf("packed batch: byte %d: unknown entry tag %d", at, tag)
		}
	}
	return nil
}

// batchReader decodes the fields of a packed batch; the first error sticks.
type batchReader struct {
	b   []byte
	pos int
	err error
}

func (r *batchReader) fail(what string) {
	if r.err == nil {
		r.err = fmt.Errorf("packed batch: byte %d: %s is truncated or malformed", r.pos, what)
	}
}

func (r *batchReader) uvarint(what string) uint64 {
	if r.err != nil {
		return 0
	}
	x, n := binary.Uvarint(r.b[r.pos:])
	if n <= 0 {
		r.fail(what)
		return 0
	}
	r.pos += n
	return x
}

func (r *batchReader) varint(what string) int64 {
	if r.err != nil {
		return 0
	}
	x, n := binary.Varint(r.b[r.pos:])
	if n <= 0 {
		r.fail(what)
		return 0
	}
	r.pos += n
	return x
}

// bytes returns the next length-prefixed field, with its capacity cut to its
// length so that an append to it never writes into the batch.
func (r *batchReader) bytes(what, length string) []byte {
	n := r.uvarint(length)
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)-r.pos) {
		r.err = fmt.Errorf("packed batch: byte %d: %s of %d bytes runs past the end (%d left)", r.pos, what, n, len(r.b)-r.pos)
		return nil
	}
	s := r.b[r.pos : r.pos+int(n) : r.pos+int(n)]
	r.pos += int(n)
	return s
}
