package statefile

import (
	"bytes"
	"container/heap"
	"slices"
)

// A Source is a state file that Merge reads: a *Reader, or anything else
// with the same methods and semantics.
type Source interface {
	// Groups returns the key groups of the source, in increasing order.
	Groups() []GroupInfo
	// Range calls fn for the entries of key groups [start, end) in (key
	// group, key) order; key and value are only valid during fn.
	Range(start, end int32, fn func(kg int32, key, value []byte, tombstone bool) error) error
}

// Merge reads sources in order, oldest first (typically a Full file, then
// the Deltas that follow it), for key groups [start, end), and calls fn with
// the resulting live entries in (key group, key) order: for each key, the
// entry of the latest source that has it, unless that is a tombstone.
// Tombstones never come out, so merging Deltas without the Full file they
// follow loses their deletions. key and value are only valid during fn.
// Merge returns an error of fn as it is.
//
// Merge works one key group at a time: it holds in memory the entries of
// one key group from all sources that have it, and streams key groups
// found in only one source without holding them.
func Merge(sources []Source, start, end int32, fn func(kg int32, key, value []byte) error) error {
	// has[i] lists the key groups of sources[i] in [start, end).
	has := make([][]int32, len(sources))
	var all []int32
	for i, s := range sources {
		for _, g := range s.Groups() {
			if start <= g.KeyGroup && g.KeyGroup < end {
				has[i] = append(has[i], g.KeyGroup)
			}
		}
		slices.Sort(has[i])
		all = append(all, has[i]...)
	}
	slices.Sort(all)
	all = slices.Compact(all)

	runs := make([]run, len(sources))
	var with []int // sources that have the current key group
	for _, kg := range all {
		with = with[:0]
		for i := range has {
			if len(has[i]) > 0 && has[i][0] == kg {
				with = append(with, i)
				has[i] = has[i][1:]
			}
		}
		if len(with) == 1 {
			err := sources[with[0]].Range(kg, kg+1, func(kg int32, key, value []byte, tombstone bool) error {
				if tombstone {
					return nil
				}
				return fn(kg, key, value)
			})
			if err != nil {
				return err
			}
			continue
		}
		var h mergeHeap
		for _, i := range with {
			r := &runs[i]
			r.reset(i)
			if err := sources[i].Range(kg, kg+1, r.add); err != nil {
				return err
			}
			if len(r.ents) > 0 {
				h.order = append(h.order, r)
			}
		}
		heap.Init(&h)
		for len(h.order) > 0 {
			top := h.order[0] // the latest source with the smallest key
			key, value, tombstone := top.cur()
			if !tombstone {
				if err := fn(kg, key, value); err != nil {
					return err
				}
			}
			// Skip the same key in older sources, then move past it.
			for len(h.order) > 1 {
				other := h.order[1]
				if len(h.order) > 2 && h.less(2, 1) {
					other = h.order[2]
				}
				k, _, _ := other.cur()
				if !bytes.Equal(k, key) {
					break
				}
				h.advance(other)
			}
			h.advance(top)
		}
	}
	return nil
}

// run holds the entries of one key group of one source.
type run struct {
	src   int // index of the source; later sources win
	arena []byte
	ents  []entry
	pos   int
}

// entry locates a key and a value in a run's arena.
type entry struct {
	keyEnd, valueEnd int // the key is arena[start:keyEnd], the value arena[keyEnd:valueEnd]
	start            int
	tombstone        bool
}

func (r *run) reset(src int) {
	r.src, r.arena, r.ents, r.pos = src, r.arena[:0], r.ents[:0], 0
}

func (r *run) add(_ int32, key, value []byte, tombstone bool) error {
	start := len(r.arena)
	r.arena = append(r.arena, key...)
	r.arena = append(r.arena, value...)
	r.ents = append(r.ents, entry{start: start, keyEnd: start + len(key), valueEnd: len(r.arena), tombstone: tombstone})
	return nil
}

func (r *run) cur() (key, value []byte, tombstone bool) {
	e := r.ents[r.pos]
	return r.arena[e.start:e.keyEnd], r.arena[e.keyEnd:e.valueEnd], e.tombstone
}

// mergeHeap orders runs by their current key, the latest source first
// among equal keys.
type mergeHeap struct {
	order []*run
}

func (h *mergeHeap) Len() int { return len(h.order) }

func (h *mergeHeap) Less(i, j int) bool { return h.less(i, j) }

func (h *mergeHeap) less(i, j int) bool {
	ki, _, _ := h.order[i].cur()
	kj, _, _ := h.order[j].cur()
	if c := bytes.Compare(ki, kj); c != 0 {
		return c < 0
	}
	return h.order[i].src > h.order[j].src
}

func (h *mergeHeap) Swap(i, j int) { h.order[i], h.order[j] = h.order[j], h.order[i] }

func (h *mergeHeap) Push(x any) { h.order = append(h.order, x.(*run)) }

func (h *mergeHeap) Pop() any {
	r := h.order[len(h.order)-1]
	h.order = h.order[:len(h.order)-1]
	return r
}

// advance moves r, which is in the heap, to its next entry, or drops it
// from the heap when it has none.
func (h *mergeHeap) advance(r *run) {
	i := slices.Index(h.order, r)
	r.pos++
	if r.pos == len(r.ents) {
		heap.Remove(h, i)
		return
	}
	heap.Fix(h, i)
}
