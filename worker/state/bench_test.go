package state

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"syscall"
	"testing"
	"time"
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
// disk backend with the defaults: with a Prefetch of every 500 keys before
// their Gets, as a map task makes for a batch of items (the default batch
// size), and without; with every Get through Pebble's Get instead of the
// fast read path (flushedReads); and as it was before the fast path: 64 MiB
// memtables and a 32 MiB cache (BenchmarkThroughput found Gets to dominate
// with those, docs/benchmarks.md), then 8 MiB memtables and a 32 MiB cache.
// Run with -benchtime 4000000x to reach the steady state.
func BenchmarkGetOrPut(b *testing.B) {
	const batch = 500
	for _, c := range []struct {
		name     string
		opts     DiskOptions
		slow     bool
		prefetch bool
	}{
		{"defaults,prefetch", DiskOptions{}, false, true},
		{"defaults", DiskOptions{}, false, false},
		{"defaults,pebble-get", DiskOptions{}, true, false},
		{"memtable=8MiB,cache=32MiB,pebble-get", DiskOptions{CacheSize: 32 << 20}, true, false},
		{"memtable=64MiB,cache=32MiB,pebble-get", DiskOptions{MemTableSize: 64 << 20, CacheSize: 32 << 20}, true, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			d, err := OpenDisk(b.TempDir(), c.opts)
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			d.reads.off = c.slow
			r := rand.New(rand.NewPCG(1, 2))
			keys := make([]GroupKey, batch)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if i%batch == 0 {
					// The next batch's keys, in buffers reused.
					for j := range keys {
						keys[j].Key, keys[j].Group = benchKey(keys[j].Key, r.IntN(1_000_000))
					}
					if c.prefetch {
						if err := d.Prefetch(keys); err != nil {
							b.Fatal(err)
						}
					}
				}
				k := keys[i%batch]
				_, ok, err := d.Get(k.Group, k.Key)
				if err != nil {
					b.Fatal(err)
				}
				if !ok {
					if err := d.Put(k.Group, k.Key, []byte{1}); err != nil {
						b.Fatal(err)
					}
				}
			}
			m := d.db.Metrics()
			b.ReportMetric(float64(m.Flush.Count), "flushes")
			b.ReportMetric(float64(m.Levels[0].Sublevels), "l0-sublevels")
		})
	}
}

// BenchmarkRestoreDisk is a restore's load of 1M keys with 100-byte values
// into a fresh disk backend, in the (key group, key) order a restore reads
// them: one Put per key, as a restore did before, against a Loader (one
// ingested table per 64 MiB). Each iteration loads into a new Disk with the
// default options.
//
// ns/key is the time from the first entry to the last Put or Finish, what a
// restoring task waits for. cpu-ns/key is the CPU time of the process (every
// goroutine, Pebble's included) from the first entry until the backend is
// idle: the flushes and compactions that Puts leave behind take CPU after the
// last Put returns, which other tasks on the machine then wait for.
func BenchmarkRestoreDisk(b *testing.B) {
	const keys = 1_000_000
	const groups = 128
	value := make([]byte, 100)
	// each calls fn for the entries in order: 16-byte keys (a counter, then
	// a hash of it), in groups key groups of keys/groups keys each.
	each := func(fn func(kg int32, key, value []byte) error) error {
		key := make([]byte, 0, 16)
		for i := range keys {
			kg := int32(i * groups / keys)
			key = binary.BigEndian.AppendUint64(key[:0], uint64(i))
			key = binary.BigEndian.AppendUint64(key, uint64(i)*0x9e3779b97f4a7c15)
			binary.BigEndian.PutUint64(value, uint64(i))
			if err := fn(kg, key, value); err != nil {
				return err
			}
		}
		return nil
	}
	for _, mode := range []string{"put", "load"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(keys * (16 + 100))
			var cpu time.Duration
			for range b.N {
				b.StopTimer()
				d, err := OpenDisk(b.TempDir(), DiskOptions{})
				if err != nil {
					b.Fatal(err)
				}
				cpu0 := processCPU(b)
				b.StartTimer()
				if mode == "put" {
					err = each(d.Put)
				} else {
					var l *Loader
					if l, err = d.Load(0, groups); err == nil {
						if err = each(l.Add); err == nil {
							err = l.Finish()
						}
					}
				}
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				waitIdle(b, d)
				cpu += processCPU(b) - cpu0
				if err := d.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/keys, "ns/key")
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N)/keys, "cpu-ns/key")
		})
	}
}

// processCPU returns the user and system CPU time the process has used.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// waitIdle flushes d's memtables and waits until no flush or compaction has
// run for a few polls.
func waitIdle(tb testing.TB, d *Disk) {
	if err := d.db.Flush(); err != nil {
		tb.Fatal(err)
	}
	for idle := 0; idle < 5; {
		m := d.db.Metrics()
		if m.Compact.NumInProgress > 0 || m.Flush.NumInProgress > 0 {
			idle = 0
		} else {
			idle++
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// BenchmarkViewGetSorted is a delta's read of its changed keys: Gets of a
// view, in key order, of one key in eight of a million on the disk backend
// (writeDelta in package worker reads a key group's changed keys so when
// they are few of its keys).
func BenchmarkViewGetSorted(b *testing.B) {
	const keys = 1_000_000
	d, err := OpenDisk(b.TempDir(), DiskOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	value := []byte{1}
	type gk struct {
		kg  int32
		key []byte
	}
	var changed []gk
	for i := range keys {
		key, kg := benchKey(nil, i)
		if err := d.Put(kg, key, value); err != nil {
			b.Fatal(err)
		}
		if i%8 == 0 {
			changed = append(changed, gk{kg, key})
		}
	}
	slices.SortFunc(changed, func(x, y gk) int {
		return cmp.Or(cmp.Compare(x.kg, y.kg), bytes.Compare(x.key, y.key))
	})
	waitIdle(b, d)
	b.ResetTimer()
	for i := 0; i < b.N; {
		v, err := d.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		for _, k := range changed {
			if i == b.N {
				break
			}
			i++
			if _, ok, err := v.Get(k.kg, k.key); err != nil || !ok {
				b.Fatalf("Get: %t, %v", ok, err)
			}
		}
		v.Release()
	}
}
