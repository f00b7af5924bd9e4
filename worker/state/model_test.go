package state

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// TestRandomOpsAgainstModel applies random operations to a backend and to a
// model, taking snapshots at random points, and checks that the backend and
// every open view always agree with the model as it was when they were
// taken.
func TestRandomOpsAgainstModel(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			forEachBackend(t, func(t *testing.T, b Backend) {
				runModel(t, b, rand.New(rand.NewPCG(seed, seed)), 2000, nil)
			})
		})
	}
}

// TestRandomOpsAgainstModelWithPrefetch is TestRandomOpsAgainstModel on the
// disk backend with a Prefetch of a few keys before one operation in four,
// half of whose operations then use a key of the last Prefetch: they hit
// kept writes, values read ahead, values left for the Get, and keys the
// Prefetch was not given.
func TestRandomOpsAgainstModelWithPrefetch(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4, 5} {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			d := openTestDisk(t, vfs.Default, 0)
			runModel(t, d, rand.New(rand.NewPCG(seed, seed)), 4000, d.Prefetch)
			if d.ahead.hits == 0 || d.ahead.committed == 0 {
				t.Errorf("%d Gets answered from a Prefetch's keys and %d kept writes made: the test did not exercise them",
					d.ahead.hits, d.ahead.committed)
			}
		})
	}
}

// snapshotCase is a view under test and the model it must match.
type snapshotCase struct {
	view View
	want model
}

// runModel applies ops random operations to b and checks b against a model.
// If prefetch is not nil, it is called with a few random keys (and, at
// times, an invalid key group) before one operation in four, and half of the
// operations' keys are drawn from the last call's. The keys given to
// prefetch are overwritten once it returns: it must have copied them.
func runModel(t *testing.T, b Backend, rng *rand.Rand, ops int, prefetch func([]GroupKey) error) {
	kgs := []int32{0, 1, 2, 3, 100, MaxKeyGroups - 2, MaxKeyGroups - 1}
	randKG := func() int32 { return kgs[rng.IntN(len(kgs))] }
	// Keys of up to 3 bytes over a 3-letter binary alphabet: 40 keys per key
	// group, so puts, deletes and gets hit each other often.
	alphabet := []byte{0x00, 'a', 0xff}
	randKey := func() string {
		k := make([]byte, rng.IntN(4))
		for i := range k {
			k[i] = alphabet[rng.IntN(len(alphabet))]
		}
		return string(k)
	}
	// Mostly short values; a few large ones make the disk backend flush its
	// small memtable to tables.
	randValue := func() string {
		n := rng.IntN(16)
		if rng.IntN(10) == 0 {
			n = 16 << 10
		}
		v := make([]byte, n)
		for i := range v {
			v[i] = byte(rng.Uint32())
		}
		return string(v)
	}

	var prefetched []GroupKey // copies of the last keys given to prefetch
	randGK := func() (int32, string) {
		if prefetch != nil && len(prefetched) > 0 && rng.IntN(2) == 0 {
			k := prefetched[rng.IntN(len(prefetched))]
			if k.Group < MaxKeyGroups {
				return k.Group, string(k.Key)
			}
		}
		return randKG(), randKey()
	}

	m := model{}
	var snaps []snapshotCase
	defer func() {
		for _, s := range snaps {
			s.view.Release()
		}
	}()
	release := func(i int) {
		checkView(t, snaps[i].view, snaps[i].want)
		snaps[i].view.Release()
		snaps = slices.Delete(snaps, i, i+1)
	}

	for op := range ops {
		if prefetch != nil && rng.IntN(4) == 0 {
			keys := make([]GroupKey, rng.IntN(12))
			for i := range keys {
				keys[i] = GroupKey{randKG(), []byte(randKey())}
				if rng.IntN(20) == 0 {
					keys[i].Group = MaxKeyGroups
				}
			}
			if err := prefetch(keys); err != nil {
				t.Fatalf("op %d: Prefetch(%v): %v", op, keys, err)
			}
			prefetched = prefetched[:0]
			for _, k := range keys {
				prefetched = append(prefetched, GroupKey{k.Group, slices.Clone(k.Key)})
				for i := range k.Key {
					k.Key[i] = 0xee
				}
			}
		}
		switch r := rng.IntN(100); {
		case r < 45:
			kg, k := randGK()
			v := randValue()
			if prefetch != nil && rng.IntN(4) == 0 {
				// The value Get returned for a key (this one or
				// another), whole or in part: Put must copy it
				// before it changes anything it may share memory
				// with.
				kg2, k2 := randGK()
				got, ok, err := b.Get(kg2, []byte(k2))
				if err != nil {
					t.Fatalf("op %d: Get(%d, %q): %v", op, kg2, k2, err)
				}
				if ok {
					if len(got) > 1 && rng.IntN(2) == 0 {
						got = got[1:]
					}
					m.put(kg, k, string(got))
					if err := b.Put(kg, []byte(k), got); err != nil {
						t.Fatalf("op %d: Put(%d, %q) of a value Get returned: %v", op, kg, k, err)
					}
					break
				}
			}
			mustPut(t, b, kg, k, v)
			m.put(kg, k, v)
		case r < 63:
			kg, k := randGK()
			mustDelete(t, b, kg, k)
			m.delete(kg, k)
		case r < 78:
			kg, k := randGK()
			want, ok := m[kg][k]
			checkGet(t, b, kg, k, want, ok)
		case r < 80:
			start, end := randKG(), randKG()
			if start > end {
				start, end = end, start
			}
			if err := b.DropRange(start, end); err != nil {
				t.Fatalf("op %d: DropRange(%d, %d): %v", op, start, end, err)
			}
			m.dropRange(start, end)
		case r < 86:
			if len(snaps) == 8 {
				release(rng.IntN(len(snaps)))
			}
			snaps = append(snaps, snapshotCase{mustSnapshot(t, b), m.clone()})
		case r < 90:
			if len(snaps) > 0 {
				release(rng.IntN(len(snaps)))
			}
		default:
			if len(snaps) == 0 {
				continue
			}
			s := snaps[rng.IntN(len(snaps))]
			kg, k := randKG(), randKey()
			want, ok := s.want[kg][k]
			checkGet(t, s.view, kg, k, want, ok)
			start := randKG()
			end := start + int32(rng.IntN(int(MaxKeyGroups-start)+1))
			if got, want := collect(t, s.view, start, end), s.want.entries(start, end); !slices.Equal(got, want) {
				t.Fatalf("op %d: view Range(%d, %d) =\n%v\nwant\n%v", op, start, end, got, want)
			}
		}
	}
	for len(snaps) > 0 {
		release(len(snaps) - 1)
	}
	checkBackend(t, b, m)
}
