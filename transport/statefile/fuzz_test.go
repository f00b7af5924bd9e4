package statefile

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// FuzzReader feeds arbitrary bytes to NewReader, Range, Merge and ReadAll,
// and to the index and section decoders directly:
// none may panic, every error must match ErrCorrupt, and a file ReadAll
// accepts must read the same through Range.
func FuzzReader(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "golden-v1.state"))
	if err != nil {
		f.Fatal(err)
	}
	full, _ := write(f, Full, []ent{{1, "a", "1", false}, {1, "b", "", false}, {9, "", "x", false}})
	empty, _ := write(f, Delta, nil)
	f.Add(golden)
	f.Add(full)
	f.Add(empty)
	f.Add(golden[:len(golden)-1])
	f.Add(full[:40])
	f.Add([]byte("CFSTATE\x01\x01"))

	noop := func(int32, []byte, []byte, bool) error { return nil }
	f.Fuzz(func(t *testing.T, data []byte) {
		var ranged []ent
		r, rangeErr := NewReader(bytes.NewReader(data), int64(len(data)))
		if rangeErr == nil {
			_ = r.Kind()
			_ = r.Entries()
			for _, g := range r.Groups() {
				if g.Offset < headerLen || g.Length <= 0 || g.Offset+g.Length > int64(len(data)) {
					t.Fatalf("section %+v outside a file of %d bytes", g, len(data))
				}
			}
			rangeErr = r.Range(0, MaxKeyGroups, collect(&ranged))
			_ = r.Range(5, 300, noop)
			_ = Merge([]Source{r, r}, 0, MaxKeyGroups, func(int32, []byte, []byte) error { return nil })
		}
		// Reach the index and section decoders past their checksums.
		if len(data) > 0 {
			if _, groups, _, err := parseIndex(data, 1<<20); err == nil && len(groups) > 0 && groups[0].Offset != headerLen {
				t.Fatalf("parseIndex accepted section %+v", groups[0])
			}
		}
		if len(data) >= 4 {
			g := GroupInfo{KeyGroup: int32(binary.BigEndian.Uint32(data) % MaxKeyGroups), Length: int64(len(data)), Entries: 3}
			_ = decodeSection(data, Delta, g, noop)
		}

		var all []ent
		allErr := ReadAll(bytes.NewReader(data), sha256.Sum256(data), 0, MaxKeyGroups, collect(&all))
		for _, err := range []error{rangeErr, allErr} {
			if err != nil && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %q does not match ErrCorrupt", err)
			}
		}
		if allErr == nil {
			if rangeErr != nil {
				t.Fatalf("ReadAll accepts the file, Range says: %v", rangeErr)
			}
			if !slices.Equal(all, ranged) {
				t.Fatalf("ReadAll got %v, Range got %v", all, ranged)
			}
		}
	})
}
