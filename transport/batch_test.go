package transport

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// entry is one visited entry of a packed batch, for comparisons.
type entry struct {
	kind     string
	p        int32
	off      int64
	kg       int32
	key, raw string
	num      int64
}

type recorder struct{ got []entry }

func (r *recorder) Record(p int32, off int64) error {
	r.got = append(r.got, entry{kind: "record", p: p, off: off})
	return nil
}

func (r *recorder) Through(p int32, off int64) error {
	r.got = append(r.got, entry{kind: "through", p: p, off: off})
	return nil
}

func (r *recorder) Item(it *BatchItem) error {
	r.got = append(r.got, entry{kind: "item", kg: it.KeyGroup, key: string(it.Key), raw: string(it.Raw), num: it.Num})
	return nil
}

func TestBatchRoundTrip(t *testing.T) {
	want := []entry{
		{kind: "record", p: 3, off: 1 << 40},
		{kind: "item", kg: 127, key: "\xff\x00binary", num: -5, raw: "raw\x00value"},
		{kind: "item", kg: 0, key: "", num: 0, raw: ""},
		{kind: "record", p: 0, off: 0},
		{kind: "item", kg: 1 << 20, key: strings.Repeat("k", 300), num: 1<<63 - 1, raw: strings.Repeat("v", 70000)},
		{kind: "through", p: 2147483647, off: 99},
	}
	var w BatchWriter
	for round := range 2 { // the second round reuses the buffer
		w.Reset()
		for _, e := range want {
			switch e.kind {
			case "record":
				w.Record(e.p, e.off)
			case "through":
				w.Through(e.p, e.off)
			case "item":
				w.Item(e.kg, []byte(e.key), e.num, []byte(e.raw))
			}
		}
		if w.Items() != 3 {
			t.Fatalf("round %d: Items = %d, want 3", round, w.Items())
		}
		var r recorder
		if err := ReadBatch(w.Bytes(), &r); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if fmt.Sprint(r.got) != fmt.Sprint(want) {
			t.Fatalf("round %d: read\n%v\nwant\n%v", round, r.got, want)
		}
	}
	// Detach hands the bytes over: the writer's next batch does not touch them.
	b := w.Detach(nil)
	kept := bytes.Clone(b)
	w.Item(1, []byte("other"), 1, nil)
	if !bytes.Equal(b, kept) || w.Items() != 1 {
		t.Fatal("the writer wrote into a detached batch")
	}
	if err := ReadBatch(nil, &recorder{}); err != nil {
		t.Fatalf("empty batch: %v", err)
	}
}

// TestBatchItemsCannotGrowIntoTheBatch: an operator appending to a key or
// raw value it was handed gets a new array, never the next item's bytes.
func TestBatchItemsCannotGrowIntoTheBatch(t *testing.T) {
	var w BatchWriter
	w.Item(0, []byte("a"), 1, []byte("x"))
	w.Item(0, []byte("b"), 1, []byte("y"))
	b := w.Bytes()
	before := bytes.Clone(b)
	err := ReadBatch(b, visitItems(func(it *BatchItem) error {
		_ = append(it.Key, "ZZZZ"...)
		_ = append(it.Raw, "ZZZZ"...)
		return nil
	}))
	if err != nil || !bytes.Equal(b, before) {
		t.Fatalf("appending to an item changed the batch (err %v)", err)
	}
}

type visitItems func(*BatchItem) error

func (visitItems) Record(int32, int64) error  { return nil }
func (visitItems) Through(int32, int64) error { return nil }
func (f visitItems) Item(it *BatchItem) error { return f(it) }

func TestReadBatchRejectsMalformed(t *testing.T) {
	var w BatchWriter
	w.Record(1, 7)
	w.Item(5, []byte("key"), 3, []byte("raw"))
	good := bytes.Clone(w.Bytes())
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"other version", append([]byte{9}, good[1:]...), "unknown format version 9"},
		{"unknown tag", append(bytes.Clone(good), 42), "unknown entry tag 42"},
		{"truncated item", good[:len(good)-2], "runs past the end"},
		{"truncated mark", good[:3], "truncated or malformed"},
		{"huge key length", []byte{batchVersion, tagItem, 0, 0xff, 0xff, 0xff, 0xff, 0x0f}, "runs past the end"},
		{"negative partition", []byte{batchVersion, tagRecord, 1, 0}, "partition -1 out of range"},
	} {
		err := ReadBatch(tc.b, &recorder{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want one containing %q", tc.name, err, tc.want)
		}
	}
	if err := ReadBatch([]byte{7}, &recorder{}); !errors.Is(err, ErrBatchVersion) {
		t.Errorf("version error %v is not ErrBatchVersion", err)
	}
}

// TestBatchNoAllocations: packing into a reused buffer and reading back cost
// no allocation per item (reading allocates the visited item, once a batch).
func TestBatchNoAllocations(t *testing.T) {
	var w BatchWriter
	key, raw := []byte("the-key"), []byte("the value")
	v := visitItems(func(*BatchItem) error { return nil })
	allocs := testing.AllocsPerRun(100, func() {
		w.Reset()
		for i := range 100 {
			w.Record(int32(i%4), int64(i))
			w.Item(int32(i), key, int64(i), raw)
		}
		if err := ReadBatch(w.Bytes(), v); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 1 {
		t.Fatalf("%.1f allocations per batch of 100 items, want at most 1", allocs)
	}
}

// FuzzReadBatch: no input makes ReadBatch panic or hand out bytes beyond the
// batch.
func FuzzReadBatch(f *testing.F) {
	var w BatchWriter
	w.Record(0, 1)
	w.Item(3, []byte("k"), 1, []byte("v"))
	w.Through(0, 1)
	f.Add(bytes.Clone(w.Bytes()))
	f.Add([]byte{batchVersion, tagItem})
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = ReadBatch(b, visitItems(func(it *BatchItem) error {
			if len(it.Key) > len(b) || len(it.Raw) > len(b) {
				t.Fatalf("item larger than the batch")
			}
			return nil
		}))
	})
}
