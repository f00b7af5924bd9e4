// Package statefile reads and writes checkpoint state files: the keyed state
// of a map task, grouped by key group, written once in one streaming pass and
// read back either whole or one key group range at a time.
//
// A state file holds entries (a byte-string key and a byte-string value, or a
// tombstone meaning "deleted") for some key groups in [0, MaxKeyGroups). It is
// either a Full snapshot of its key groups or a Delta holding the changes since
// an earlier file; only a Delta may hold tombstones. Merge combines a Full file
// and the Deltas that follow it.
//
// # Reading
//
// NewReader opens a file through an io.ReaderAt: it reads the trailer and the
// index from the end of the file (one read for most files) and verifies the
// index checksum. Reader.Range then reads only the sections of the key groups
// it is asked for, one read each, and verifies each section's checksum before
// passing any of its entries on. Every byte a Range call uses is thus covered
// by a checksum it has verified; the header is not read at all.
//
// ReadAll reads a whole file from an io.Reader in one pass (a download, say)
// and verifies the SHA-256 of the whole file against the value the caller
// expects, as well as the index and every section checksum. It passes entries
// on as it decodes them, so when it returns an error the caller must discard
// whatever it built from them.
//
// All errors caused by the content of a file, rather than by reading it,
// match ErrCorrupt under errors.Is. No length read from a file is used to
// allocate memory before it has been checked against the size of the file
// (NewReader, Range) or against the bytes actually received (ReadAll), so a
// corrupt or hostile file gives an error, never a panic or a huge allocation.
// Errors do not name the file, which this package never knows; callers wrap
// them with its path.
//
// # Format (version 1)
//
// All fixed-width integers are big-endian. A uvarint is an unsigned integer in
// the encoding of encoding/binary.PutUvarint (at most 10 bytes).
//
//	file    = header section* end-of-data index trailer
//	header  = magic kind                       9 bytes
//	magic   = "CFSTATE" 0x01                   8 bytes; 0x01 is the format version
//	kind    = 0x01 (Full) | 0x02 (Delta)       1 byte
//
// Sections follow the header back to back, one per key group present in the
// file, in strictly increasing key-group order; a file has no empty sections.
//
//	section   = keygroup record* end-of-section
//	keygroup  = uint32                         4 bytes, < MaxKeyGroups
//	record    = 0x00 uvarint(len(key)) key uvarint(len(value)) value
//	          | 0x01 uvarint(len(key)) key     a tombstone, only in Delta files
//	end-of-section = 0x02                      1 byte
//
// Within a section, keys are strictly increasing in bytewise order (so no key
// appears twice); the empty key is allowed, as is an empty value.
//
//	end-of-data = 0xFFFFFFFF                   4 bytes, where the next section's
//	                                           key group would be
//
// The index lists the sections, in file order:
//
//	index       = kind uvarint(n) index-entry{n}
//	index-entry = uvarint(keygroup) uvarint(offset) uvarint(length)
//	              uvarint(records) sha256
//
// kind repeats the header's, so that a partial reader need not read the
// header. offset and length delimit the section's bytes, from its key group
// to its end-of-section byte inclusive; the first section starts at offset 9
// and each next one where the previous one ends; the last one ends where
// end-of-data starts, 4 bytes before the index. records counts the section's
// records (values and tombstones, at least 1) and sha256 is the 32-byte
// SHA-256 of the section's bytes.
//
//	trailer = uint64(index offset) uint64(index length) sha256(index) magic
//	                                           56 bytes
//
// The index ends where the trailer starts, which is 56 bytes before the end
// of the file. The SHA-256 of the whole file is not stored in it: the writer
// reports it (Summary.SHA256) and whoever records where the file is keeps it
// to give to ReadAll.
//
// Any change to this layout must change the version byte of magic.
package statefile
