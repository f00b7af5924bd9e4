package worker

import (
	"bytes"
	"testing"

	"github.com/coordflow/coordflow/worker/operator"
)

// TestOutSlabRecord: a record copies its output's bytes, so the output's
// memory may be reused at once; a missing key stays missing (null, and a
// random partition), while an empty value is an empty value, never null,
// which a compacted topic would take for a tombstone.
func TestOutSlabRecord(t *testing.T) {
	var sl outSlab
	key, value := []byte("k"), []byte("v")
	r := sl.record(&operator.Output{Key: key, Value: value})
	key[0], value[0] = 'x', 'x'
	if string(r.key) != "k" || string(r.value) != "v" {
		t.Fatalf("record holds %q=%q after the output's bytes changed, want k=v", r.key, r.value)
	}
	for _, c := range []struct {
		name     string
		out      operator.Output
		nilKey   bool
		keyBytes []byte
	}{
		{"no key, no value", operator.Output{}, true, nil},
		{"an empty key, an empty value", operator.Output{Key: []byte{}, Value: []byte{}}, false, []byte{}},
	} {
		var fresh outSlab // the first record of a slab too
		for _, s := range []*outSlab{&fresh, &sl} {
			r := s.record(&c.out)
			if (r.key == nil) != c.nilKey || !bytes.Equal(r.key, c.keyBytes) {
				t.Errorf("%s: key %q (nil %v), want nil %v", c.name, r.key, r.key == nil, c.nilKey)
			}
			if r.value == nil || len(r.value) != 0 {
				t.Errorf("%s: value %q (nil %v), want empty, not nil", c.name, r.value, r.value == nil)
			}
		}
	}
}

// TestOutSlabReuse: once written, the slabs serve the next records, but a
// slab made for one output larger than a slab is let go, lest one large
// output pin its memory for the sink's life.
func TestOutSlabReuse(t *testing.T) {
	var sl outSlab
	small := make([]byte, slabBytes/2)
	sl.record(&operator.Output{Value: small})
	sl.record(&operator.Output{Value: small})
	sl.record(&operator.Output{Value: small}) // a second slab
	sl.record(&operator.Output{Value: make([]byte, 2*slabBytes)})
	sl.reuse()
	if len(sl.spare) != 2 {
		t.Fatalf("%d spare slabs after a reuse, want the 2 of slabBytes", len(sl.spare))
	}
	for _, b := range sl.spare {
		if cap(b) != slabBytes || len(b) != 0 {
			t.Fatalf("a spare slab of %d bytes holding %d, want %d, empty", cap(b), len(b), slabBytes)
		}
	}
	r := sl.record(&operator.Output{Value: []byte("v")})
	if string(r.value) != "v" || len(sl.spare) != 1 {
		t.Fatalf("the next record %q, %d spare slabs; want v from a spare slab, 1 left", r.value, len(sl.spare))
	}
}
