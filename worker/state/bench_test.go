package state

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
)

// benchCases returns a constructor per backend with default options.
func benchCases() []backendCase {
	return []backendCase{
		{"memory", func(tb testing.TB) Backend { return NewMemory() }},
		{"disk", func(tb testing.TB) Backend {
			d, err := OpenDisk(tb.TempDir(), DiskOptions{})
			if err != nil {
				tb.Fatal(err)
			}
			return d
		}},
	}
}

// benchKey returns the 16-byte key and the key group of key number i.
func benchKey(buf []byte, i int) ([]byte, int32) {
	buf = binary.BigEndian.AppendUint64(buf[:0], uint64(i)*0x9e3779b97f4a7c15)
	buf = binary.BigEndian.AppendUint64(buf, uint64(i))
	return buf, int32(i % 128)
}

func BenchmarkPut(b *testing.B) {
	for _, bc := range benchCases() {
		b.Run(bc.name, func(b *testing.B) {
			be := bc.open(b)
			defer be.Close()
			var key []byte
			value := make([]byte, 8)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				var kg int32
				key, kg = benchKey(key, i)
				binary.BigEndian.PutUint64(value, uint64(i))
				if err := be.Put(kg, key, value); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkGet(b *testing.B) {
	const keys = 100_000
	for _, bc := range benchCases() {
		b.Run(bc.name, func(b *testing.B) {
			be := bc.open(b)
			defer be.Close()
			var key []byte
			value := make([]byte, 8)
			for i := range keys {
				var kg int32
				key, kg = benchKey(key, i)
				if err := be.Put(kg, key, value); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				var kg int32
				key, kg = benchKey(key, i%keys)
				if _, ok, err := be.Get(kg, key); err != nil || !ok {
					b.Fatalf("Get: %t, %v", ok, err)
				}
			}
		})
	}
}

// BenchmarkGetOrPut is the access of the distinct operator, and of most
// operators on new keys: Get, and Put when the key is absent, over a million
// keys drawn at random (each seen about four times in 4M operations), on the
// disk backend with the default memtable size and with 64 MiB memtables,
// the default before BenchmarkThroughput found Gets to dominate (run with
// -benchtime 4000000x to reach the steady state).
func BenchmarkGetOrPut(b *testing.B) {
	for _, mt := range []uint64{DefaultMemTableSize, 64 << 20} {
		b.Run(fmt.Sprintf("memtable=%dMiB", mt>>20), func(b *testing.B) {
			d, err := OpenDisk(b.TempDir(), DiskOptions{MemTableSize: mt})
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			r := rand.New(rand.NewPCG(1, 2))
			var key []byte
			b.ReportAllocs()
			for b.Loop() {
				var kg int32
				key, kg = benchKey(key, r.IntN(1_000_000))
				_, ok, err := d.Get(kg, key)
				if err != nil {
					b.Fatal(err)
				}
				if !ok {
					if err := d.Put(kg, key, []byte{1}); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
