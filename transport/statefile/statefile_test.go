package statefile

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
)

var update = flag.Bool("update", false, "rewrite testdata/golden-v1.state")

// ent is one entry of a state file, as tests write and read them.
type ent struct {
	kg        int32
	key       string
	value     string
	tombstone bool
}

func (e ent) String() string {
	if e.tombstone {
		return fmt.Sprintf("%d/%q:tombstone", e.kg, e.key)
	}
	v := e.value
	if len(v) > 20 {
		v = fmt.Sprintf("%q...(%d bytes)", v[:20], len(v))
	} else {
		v = fmt.Sprintf("%q", v)
	}
	return fmt.Sprintf("%d/%q=%s", e.kg, e.key, v)
}

// write writes ents, which must be in order, to a new file of the given kind.
func write(t testing.TB, kind Kind, ents []ent) ([]byte, Summary) {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, kind)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.tombstone {
			err = w.Delete(e.kg, []byte(e.key))
		} else {
			err = w.Add(e.kg, []byte(e.key), []byte(e.value))
		}
		if err != nil {
			t.Fatalf("writing %v: %v", e, err)
		}
	}
	sum, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), sum
}

// collect returns a callback that appends the entries it gets to *out.
func collect(out *[]ent) func(kg int32, key, value []byte, tombstone bool) error {
	return func(kg int32, key, value []byte, tombstone bool) error {
		*out = append(*out, ent{kg, string(key), string(value), tombstone})
		return nil
	}
}

func readRange(data []byte, start, end int32) ([]ent, error) {
	r, err := NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, err
	}
	var got []ent
	err = r.Range(start, end, collect(&got))
	return got, err
}

func readAll(data []byte, start, end int32) ([]ent, error) {
	var got []ent
	err := ReadAll(bytes.NewReader(data), sha256.Sum256(data), start, end, collect(&got))
	return got, err
}

func inRange(ents []ent, start, end int32) []ent {
	var out []ent
	for _, e := range ents {
		if start <= e.kg && e.kg < end {
			out = append(out, e)
		}
	}
	return out
}

// checkRoundTrip writes ents and checks that every way of reading them back
// gives them back.
func checkRoundTrip(t *testing.T, kind Kind, ents []ent) []byte {
	t.Helper()
	data, sum := write(t, kind, ents)
	if sum.Size != int64(len(data)) || sum.SHA256 != sha256.Sum256(data) || sum.Kind != kind {
		t.Errorf("summary: size %d, kind %v, SHA-256 %x; want %d, %v, %x", sum.Size, sum.Kind, sum.SHA256, len(data), kind, sha256.Sum256(data))
	}
	var tombs int64
	for _, e := range ents {
		if e.tombstone {
			tombs++
		}
	}
	if sum.Entries != int64(len(ents)) || sum.Tombstones != tombs {
		t.Errorf("summary: %d entries, %d tombstones; want %d, %d", sum.Entries, sum.Tombstones, len(ents), tombs)
	}
	r, err := NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if r.Kind() != kind || r.Entries() != int64(len(ents)) {
		t.Errorf("reader: kind %v, %d entries; want %v, %d", r.Kind(), r.Entries(), kind, len(ents))
	}
	if !slices.Equal(r.Groups(), sum.Groups) {
		t.Errorf("reader groups %v, summary groups %v", r.Groups(), sum.Groups)
	}
	got, err := readRange(data, 0, MaxKeyGroups)
	if err != nil {
		t.Fatalf("Range: %v", err)
	}
	if !slices.Equal(got, ents) {
		t.Errorf("Range got %v, want %v", got, ents)
	}
	got, err = readAll(data, 0, MaxKeyGroups)
	if err != nil {
		t.Fatalf("ReadAll: %v", err)
	}
	if !slices.Equal(got, ents) {
		t.Errorf("ReadAll got %v, want %v", got, ents)
	}
	// Byte-at-a-time reads must not change anything.
	got = nil
	if err := ReadAll(iotest.OneByteReader(bytes.NewReader(data)), sum.SHA256, 0, MaxKeyGroups, collect(&got)); err != nil || !slices.Equal(got, ents) {
		t.Errorf("ReadAll one byte at a time: %v, %v; want %v", got, err, ents)
	}
	return data
}

func TestRoundTripFull(t *testing.T) {
	var all256 []byte
	for b := range 256 {
		all256 = append(all256, byte(b))
	}
	ents := []ent{
		{0, "", "value of the empty key", false},
		{0, "a", "", false},
		{0, "b", "2", false},
		{1, "\x00", "\x00\x00", false},
		{1, "\x00\x00", "x", false},
		{1, "\x00\x01", string(all256), false},
		{1, "\xff", "ff", false},
	}
	for b := range 256 {
		ents = append(ents, ent{7, string([]byte{byte(b)}), string([]byte{byte(255 - b)}), false})
	}
	ents = append(ents,
		ent{8, string(all256), string(all256), false},
		ent{100, "huge", strings.Repeat("0123456789abcdef", 1<<16), false}, // 1 MiB
		ent{100, "next", "after huge", false},
		ent{MaxKeyGroups - 1, "last", "group", false},
	)
	checkRoundTrip(t, Full, ents)
}

func TestRoundTripDelta(t *testing.T) {
	checkRoundTrip(t, Delta, []ent{
		{3, "", "", true},
		{3, "a", "1", false},
		{3, "b", "", true},
		{4, "b", "", true},
		{5, "c", "3", false},
		{5, "d", strings.Repeat("v", 1<<20+1), false},
		{5, "e", "", true},
	})
}

func TestEmptyFile(t *testing.T) {
	for _, kind := range []Kind{Full, Delta} {
		data := checkRoundTrip(t, kind, nil)
		if len(data) != minFileLen {
			t.Errorf("empty %v file has %d bytes, want %d", kind, len(data), minFileLen)
		}
		r, err := NewReader(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Groups()) != 0 {
			t.Errorf("empty file has groups %v", r.Groups())
		}
	}
}

// TestGolden pins the format: the writer must produce the bytes of a file
// written by an earlier version, and the readers must read it.
func TestGolden(t *testing.T) {
	data, _ := write(t, Delta, goldenEntries)
	path := filepath.Join("testdata", "golden-v1.state")
	if *update {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, want) {
		t.Fatalf("writer output differs from %s (the format changed?):\n got %x\nwant %x", path, data, want)
	}
	for name, read := range map[string]func([]byte, int32, int32) ([]ent, error){"Range": readRange, "ReadAll": readAll} {
		got, err := read(want, 0, MaxKeyGroups)
		if err != nil || !slices.Equal(got, goldenEntries) {
			t.Errorf("%s of %s: %v, %v; want %v", name, path, got, err, goldenEntries)
		}
	}
}

var goldenEntries = []ent{
	{0, "", "empty key", false},
	{0, "k", "", false},
	{2, "gone", "", true},
	{2, "here", "v", false},
	{300, "\x00\xff", "\xff\x00", false},
}

// countingReaderAt records the ranges read through it.
type countingReaderAt struct {
	r     io.ReaderAt
	mu    sync.Mutex
	reads [][2]int64 // offset, length
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.reads = append(c.reads, [2]int64{off, int64(len(p))})
	c.mu.Unlock()
	return c.r.ReadAt(p, off)
}

func TestPartialRange(t *testing.T) {
	var ents []ent
	for kg := int32(0); kg < 64; kg += 2 {
		for i := range 50 {
			ents = append(ents, ent{kg, fmt.Sprintf("key-%04d", i), strings.Repeat("x", 100+i), false})
		}
	}
	data, sum := write(t, Full, ents)
	cr := &countingReaderAt{r: bytes.NewReader(data)}
	r, err := NewReader(cr, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if len(cr.reads) != 1 || cr.reads[0][0]+cr.reads[0][1] != int64(len(data)) || cr.reads[0][1] > tailLen {
		t.Errorf("NewReader read %v, want one read of the tail", cr.reads)
	}
	for _, tc := range []struct{ start, end int32 }{{10, 14}, {11, 12}, {63, 64}, {0, 1}, {-5, 3}, {60, MaxKeyGroups + 10}, {5, 5}, {9, 3}} {
		cr.reads = nil
		var got []ent
		if err := r.Range(tc.start, tc.end, collect(&got)); err != nil {
			t.Fatal(err)
		}
		if want := inRange(ents, tc.start, tc.end); !slices.Equal(got, want) {
			t.Errorf("Range(%d, %d) got %d entries, want %d", tc.start, tc.end, len(got), len(want))
		}
		var want [][2]int64
		for _, g := range sum.Groups {
			if tc.start <= g.KeyGroup && g.KeyGroup < tc.end {
				want = append(want, [2]int64{g.Offset, g.Length})
			}
		}
		if !slices.Equal(cr.reads, want) {
			t.Errorf("Range(%d, %d) read %v, want the sections %v", tc.start, tc.end, cr.reads, want)
		}
	}
}

func TestLargeIndex(t *testing.T) {
	// More sections than fit in the tail NewReader reads first.
	var ents []ent
	for kg := range int32(MaxKeyGroups) {
		ents = append(ents, ent{kg, "k", "v", false})
	}
	data, _ := write(t, Full, ents)
	cr := &countingReaderAt{r: bytes.NewReader(data)}
	r, err := NewReader(cr, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if len(cr.reads) != 2 || len(r.Groups()) != MaxKeyGroups {
		t.Errorf("NewReader made reads %v and found %d groups, want 2 reads and %d", cr.reads, len(r.Groups()), MaxKeyGroups)
	}
	got, err := readAll(data, 1000, 1003)
	if err != nil || !slices.Equal(got, inRange(ents, 1000, 1003)) {
		t.Errorf("ReadAll: %v, %v", got, err)
	}
}

// fixIndex recomputes the index checksum in the trailer after a test has
// changed the index, so that other checks are reached.
func fixIndex(data []byte) {
	t := data[len(data)-trailerLen:]
	off := binary.BigEndian.Uint64(t[0:8])
	n := binary.BigEndian.Uint64(t[8:16])
	sum := sha256.Sum256(data[off : off+n])
	copy(t[16:48], sum[:])
}

func TestCorruption(t *testing.T) {
	ents := []ent{
		{1, "a", "1", false},
		{1, "b", "2", true},
		{2, "c", "3", false},
		{5, "d", strings.Repeat("4", 1000), false},
	}
	good, sum := write(t, Delta, ents)
	sec2 := sum.Groups[1] // key group 2
	indexOff := int64(binary.BigEndian.Uint64(good[len(good)-trailerLen:]))
	trailer := int64(len(good) - trailerLen)

	flip := func(off int64) []byte {
		d := bytes.Clone(good)
		d[off] ^= 0x10
		return d
	}
	tests := []struct {
		name string
		data []byte
		// A substring of the error of NewReader, or of Range over key
		// group 2 when NewReader succeeds; "" if both must succeed.
		rangeErr string
		allErr   string // a substring of the error of ReadAll
	}{
		{"section", flip(sec2.Offset + sec2.Length/2), "key group 2: section checksum mismatch", "file checksum mismatch"},
		{"section key group", flip(sec2.Offset + 3), "key group 2: section checksum mismatch", "file checksum mismatch"},
		{"index", flip(indexOff + 3), "index checksum mismatch", "file checksum mismatch"},
		{"index kind", flip(indexOff), "index checksum mismatch", "file checksum mismatch"},
		{"trailer index offset", flip(trailer + 7), "trailer: index offset", "file checksum mismatch"},
		{"trailer index length", flip(trailer + 15), "trailer: index offset", "file checksum mismatch"},
		{"trailer index checksum", flip(trailer + 20), "index checksum mismatch", "file checksum mismatch"},
		{"trailer magic", flip(int64(len(good) - 3)), "bad magic in trailer", "file checksum mismatch"},
		{"trailer version", flip(int64(len(good) - 1)), "unsupported format version", "file checksum mismatch"},
		// The header is not read by NewReader or Range.
		{"header magic", flip(2), "", "file checksum mismatch"},
		{"header kind", flip(headerLen - 1), "", "(first problem: header: unknown file kind 18)"},
		{"end of data", flip(indexOff - 2), "", "(first problem: section at offset"},
		{"truncated by 1", good[:len(good)-1], "bad magic in trailer", "file checksum mismatch"},
		{"truncated to the sections", good[:indexOff], "bad magic in trailer", "file checksum mismatch"},
		{"truncated in a section", good[:sec2.Offset+3], "file too short", "(first problem: truncated in the sections"},
		{"truncated to nothing", nil, "file too short", "(first problem: truncated in the header"},
		{"trailing garbage", append(bytes.Clone(good), 0), "bad magic in trailer", "file checksum mismatch"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewReader(bytes.NewReader(tc.data), int64(len(tc.data)))
			if err == nil {
				err = r.Range(2, 3, func(int32, []byte, []byte, bool) error { return nil })
				if err == nil {
					// Sections other than the damaged one remain readable.
					var got []ent
					if err := r.Range(5, 6, collect(&got)); err != nil || len(got) != 1 {
						t.Errorf("Range over the intact section: %v, %v", got, err)
					}
				}
			}
			checkErr(t, "NewReader+Range", err, tc.rangeErr)
			// ReadAll with the checksum of the intact file.
			err = ReadAll(bytes.NewReader(tc.data), sum.SHA256, 0, MaxKeyGroups, func(int32, []byte, []byte, bool) error { return nil })
			checkErr(t, "ReadAll", err, tc.allErr)
		})
	}
}

func checkErr(t *testing.T, what string, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("%s: %v", what, err)
	case want != "" && err == nil:
		t.Errorf("%s: no error, want %q", what, want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Errorf("%s: error %q, want %q", what, err, want)
	case want != "" && !errors.Is(err, ErrCorrupt):
		t.Errorf("%s: error %q does not match ErrCorrupt", what, err)
	}
}

func TestReadAllChecksum(t *testing.T) {
	data, sum := write(t, Full, []ent{{1, "a", "b", false}})
	want := sum.SHA256
	want[0] ^= 1
	err := ReadAll(bytes.NewReader(data), want, 0, MaxKeyGroups, func(int32, []byte, []byte, bool) error { return nil })
	checkErr(t, "ReadAll", err, "file checksum mismatch")
}

// TestCorruptButHashed checks damage that checksums cannot catch, made by
// a buggy writer: the checksums are recomputed after the damage.
func TestCorruptButHashed(t *testing.T) {
	delta, sum := write(t, Delta, []ent{{1, "a", "1", false}, {1, "b", "", true}})

	// A tombstone in a full file.
	full := bytes.Clone(delta)
	full[headerLen-1] = byte(Full)
	indexOff := binary.BigEndian.Uint64(full[len(full)-trailerLen:])
	full[indexOff] = byte(Full)
	fixIndex(full)
	_, err := readRange(full, 0, MaxKeyGroups)
	checkErr(t, "Range", err, "key group 1: tombstone in a full state file")
	_, err = readAll(full, 0, MaxKeyGroups)
	checkErr(t, "ReadAll", err, "key group 1: tombstone in a full state file")

	// Keys out of order: swap "a" and "b", and fix the section checksum.
	swapped := bytes.Clone(delta)
	g := sum.Groups[0]
	sec := swapped[g.Offset : g.Offset+g.Length]
	i, j := bytes.IndexByte(sec, 'a'), bytes.IndexByte(sec, 'b')
	sec[i], sec[j] = 'b', 'a'
	s := sha256.Sum256(sec)
	copy(swapped[indexOff+1+1+4:], s[:]) // kind, count, 4 one-byte uvarints
	fixIndex(swapped)
	_, err = readRange(swapped, 0, MaxKeyGroups)
	checkErr(t, "Range", err, `key group 1: key "a" not after key "b"`)
	_, err = readAll(swapped, 0, MaxKeyGroups)
	checkErr(t, "ReadAll", err, `key group 1: key "a" not after key "b"`)
}

func TestWriterRejects(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Full)
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	mustFail := func(err error, want string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v, want %q", err, want)
		}
	}
	must(w.Add(5, []byte("b"), []byte("1")))
	mustFail(w.Add(5, []byte("b"), []byte("2")), `key group 5: key "b" not after key "b"`)
	mustFail(w.Add(5, []byte("a"), []byte("2")), `key group 5: key "a" not after key "b"`)
	mustFail(w.Add(4, []byte("z"), []byte("2")), "key group 4 after key group 5")
	mustFail(w.Add(-1, []byte("z"), nil), "key group -1 out of range")
	mustFail(w.Add(MaxKeyGroups, []byte("z"), nil), "key group 32768 out of range")
	mustFail(w.Delete(5, []byte("c")), "tombstones are only allowed in a delta file")
	// The rejected calls changed nothing.
	must(w.Add(5, []byte("c"), []byte("3")))
	must(w.Add(6, []byte("a"), []byte("4")))
	sum, err := w.Close()
	must(err)
	if _, err := w.Close(); err == nil {
		t.Error("second Close succeeded")
	}
	mustFail(w.Add(7, nil, nil), "writer is closed")
	got, err := readAll(buf.Bytes(), 0, MaxKeyGroups)
	want := []ent{{5, "b", "1", false}, {5, "c", "3", false}, {6, "a", "4", false}}
	if err != nil || !slices.Equal(got, want) || sum.Entries != 3 {
		t.Errorf("got %v, %v, want %v", got, err, want)
	}

	if _, err := NewWriter(&buf, 3); err == nil {
		t.Error("NewWriter accepted kind 3")
	}
}

// failWriter fails after n bytes.
type failWriter struct{ n int }

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		n := w.n
		w.n = 0
		return n, errors.New("disk on fire")
	}
	w.n -= len(p)
	return len(p), nil
}

func TestWriterError(t *testing.T) {
	if _, err := NewWriter(&failWriter{n: 3}, Full); err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Errorf("NewWriter: %v", err)
	}
	w, err := NewWriter(&failWriter{n: 100 << 10}, Full)
	if err != nil {
		t.Fatal(err)
	}
	value := make([]byte, 1000)
	for i := 0; err == nil && i < 1000; i++ {
		err = w.Add(1, fmt.Appendf(nil, "%04d", i), value)
	}
	if err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("Add: %v", err)
	}
	if _, err := w.Close(); err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Errorf("Close: %v", err)
	}
}

func TestCallbackError(t *testing.T) {
	data, sum := write(t, Full, []ent{{1, "a", "1", false}, {2, "b", "2", false}})
	stop := errors.New("stop")
	calls := 0
	fn := func(int32, []byte, []byte, bool) error { calls++; return stop }
	r, err := NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Range(0, MaxKeyGroups, fn); err != stop || calls != 1 {
		t.Errorf("Range: %v after %d calls", err, calls)
	}
	calls = 0
	if err := ReadAll(bytes.NewReader(data), sum.SHA256, 0, MaxKeyGroups, fn); err != stop || calls != 1 {
		t.Errorf("ReadAll: %v after %d calls", err, calls)
	}
	calls = 0
	mfn := func(int32, []byte, []byte) error { calls++; return stop }
	if err := Merge([]Source{r, r}, 0, MaxKeyGroups, mfn); err != stop || calls != 1 {
		t.Errorf("Merge: %v after %d calls", err, calls)
	}
}

// randomEntries returns n random entries in order. Keys are drawn from a
// small set so that files of a chain overlap.
func randomEntries(rng *rand.Rand, n int, tombstones bool) []ent {
	seen := map[[2]string]bool{}
	var ents []ent
	for range n {
		e := ent{
			kg:  rng.Int32N(20),
			key: string(rune('a' + rng.IntN(26))),
		}
		if rng.IntN(3) == 0 {
			e.key += string([]byte{byte(rng.IntN(256))})
		}
		k := [2]string{fmt.Sprint(e.kg), e.key}
		if seen[k] {
			continue
		}
		seen[k] = true
		if tombstones && rng.IntN(3) == 0 {
			e.tombstone = true
		} else {
			e.value = strings.Repeat(string(rune('A'+rng.IntN(26))), rng.IntN(5))
		}
		ents = append(ents, e)
	}
	slices.SortFunc(ents, func(a, b ent) int {
		if a.kg != b.kg {
			return int(a.kg - b.kg)
		}
		return strings.Compare(a.key, b.key)
	})
	return ents
}

func TestMerge(t *testing.T) {
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 0))
		type mkey struct {
			kg  int32
			key string
		}
		model := map[mkey]string{}
		var sources []Source
		for i := range 4 {
			kind := Delta
			if i == 0 {
				kind = Full
			}
			ents := randomEntries(rng, 300, kind == Delta)
			data, _ := write(t, kind, ents)
			r, err := NewReader(bytes.NewReader(data), int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			sources = append(sources, r)
			for _, e := range ents {
				k := mkey{e.kg, e.key}
				if e.tombstone {
					delete(model, k)
				} else {
					model[k] = e.value
				}
			}
		}
		for _, rg := range [][2]int32{{0, MaxKeyGroups}, {3, 9}, {19, 20}, {20, 30}} {
			var want []ent
			for k, v := range model {
				if rg[0] <= k.kg && k.kg < rg[1] {
					want = append(want, ent{kg: k.kg, key: k.key, value: v})
				}
			}
			slices.SortFunc(want, func(a, b ent) int {
				if a.kg != b.kg {
					return int(a.kg - b.kg)
				}
				return strings.Compare(a.key, b.key)
			})
			var got []ent
			err := Merge(sources, rg[0], rg[1], func(kg int32, key, value []byte) error {
				got = append(got, ent{kg: kg, key: string(key), value: string(value)})
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("seed %d, range %v: Merge got %v\nwant %v", seed, rg, got, want)
			}
		}
	}
}

func TestMergeSingleSources(t *testing.T) {
	// Key groups found in one source only are streamed; tombstones still
	// never come out.
	full, _ := write(t, Full, []ent{{1, "a", "1", false}, {2, "b", "2", false}})
	delta, _ := write(t, Delta, []ent{{2, "b", "", true}, {3, "c", "", true}, {3, "d", "4", false}})
	var sources []Source
	for _, d := range [][]byte{full, delta} {
		r, err := NewReader(bytes.NewReader(d), int64(len(d)))
		if err != nil {
			t.Fatal(err)
		}
		sources = append(sources, r)
	}
	var got []ent
	err := Merge(sources, 0, MaxKeyGroups, func(kg int32, key, value []byte) error {
		got = append(got, ent{kg: kg, key: string(key), value: string(value)})
		return nil
	})
	want := []ent{{1, "a", "1", false}, {3, "d", "4", false}}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("Merge: %v, %v; want %v", got, err, want)
	}
	if err := Merge(nil, 0, MaxKeyGroups, nil); err != nil {
		t.Errorf("Merge of nothing: %v", err)
	}
}

// Writers share output buffers once closed: files written at the same time
// and one after the other, reusing the buffers of closed Writers, each hold
// exactly their own entries.
func TestWritersReuseBuffers(t *testing.T) {
	write := func(w *Writer, tag string) {
		t.Helper()
		for i := range 50 {
			if err := w.Add(int32(i), []byte(tag), []byte(tag+fmt.Sprint(i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	check := func(b []byte, tag string) {
		t.Helper()
		got, err := readAll(b, 0, MaxKeyGroups)
		if err != nil || len(got) != 50 {
			t.Fatalf("file %s: %d entries, %v; want 50", tag, len(got), err)
		}
		for i, e := range got {
			if e.key != tag || e.value != tag+fmt.Sprint(i) {
				t.Fatalf("file %s holds entry %+v", tag, e)
			}
		}
	}
	for round := range 20 {
		var a, b bytes.Buffer
		wa, err := NewWriter(&a, Full)
		if err != nil {
			t.Fatal(err)
		}
		wb, err := NewWriter(&b, Full)
		if err != nil {
			t.Fatal(err)
		}
		write(wa, "a")
		write(wb, "b")
		first, second := wa, wb
		if round%2 == 1 {
			first, second = wb, wa
		}
		if _, err := first.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := second.Close(); err != nil {
			t.Fatal(err)
		}
		check(a.Bytes(), "a")
		check(b.Bytes(), "b")
	}
}

// BenchmarkSmallFile writes the state file of a map task with ten keys, as
// a worker does per task and checkpoint for jobs with inline state.
func BenchmarkSmallFile(b *testing.B) {
	b.ReportAllocs()
	var out bytes.Buffer
	for b.Loop() {
		out.Reset()
		w, err := NewWriter(&out, Full)
		if err != nil {
			b.Fatal(err)
		}
		for i := range 10 {
			if err := w.Add(int32(i), []byte("k"), []byte("12345678")); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
