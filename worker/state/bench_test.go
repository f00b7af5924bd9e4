package state

import (
	"encoding/binary"
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
