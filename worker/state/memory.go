package state

import (
	"maps"
	"slices"
	"sync/atomic"
)

// Memory is a Backend that keeps the state in Go maps, one map per key group.
//
// Snapshots are copy-on-write per key group. Snapshot copies only the index
// of key groups (one pointer per non-empty key group, at most MaxKeyGroups),
// and the View shares every key group's map with the backend. The first write
// to a key group after a Snapshot clones that key group's map, so while a view
// is open, memory grows by the size of each key group written to. Once every
// view is released, writes stop cloning. Stored values are never modified in
// place, so clones and views share them.
//
// The zero Memory is not usable; call NewMemory.
type Memory struct {
	// groups maps each non-empty key group to its keys. Only the writer
	// goroutine reads or writes groups and the memGroups in it.
	groups map[int32]*memGroup
	// gen is the number of snapshots taken. A key group whose gen differs
	// may share its map with a view.
	gen uint64
	// views counts the views not yet released. Views are released from
	// other goroutines.
	views  atomic.Int64
	closed bool
}

// memGroup is the state of one key group of a Memory.
type memGroup struct {
	// keys maps each key to its value. Values are never modified in place.
	keys map[string][]byte
	// gen is the Memory.gen at which keys was created or cloned. If it is
	// less than the Memory's gen, a view may hold keys, and keys must be
	// cloned before it is written to.
	gen uint64
}

// NewMemory returns an empty in-memory backend.
func NewMemory() *Memory {
	return &Memory{groups: make(map[int32]*memGroup)}
}

var _ Backend = (*Memory)(nil)

// Get returns the value of key in key group kg. The returned slice must not
// be modified.
func (m *Memory) Get(kg int32, key []byte) ([]byte, bool, error) {
	if err := m.check(kg); err != nil {
		return nil, false, err
	}
	g := m.groups[kg]
	if g == nil {
		return nil, false, nil
	}
	v, ok := g.keys[string(key)]
	return v, ok, nil
}

// Put sets the value of key in key group kg to a copy of value.
func (m *Memory) Put(kg int32, key, value []byte) error {
	if err := m.check(kg); err != nil {
		return err
	}
	g := m.groups[kg]
	if g == nil {
		g = &memGroup{keys: make(map[string][]byte), gen: m.gen}
		m.groups[kg] = g
	} else {
		m.own(g)
	}
	// v has no spare capacity, so a caller appending to a value returned by
	// Get gets a new array and never writes into memory a view may share.
	v := make([]byte, len(value))
	copy(v, value)
	g.keys[string(key)] = v
	return nil
}

// Delete removes key from key group kg.
func (m *Memory) Delete(kg int32, key []byte) error {
	if err := m.check(kg); err != nil {
		return err
	}
	g := m.groups[kg]
	if g == nil {
		return nil
	}
	if _, ok := g.keys[string(key)]; !ok {
		return nil
	}
	if len(g.keys) == 1 {
		// The view, if any, keeps the map; the backend forgets it.
		delete(m.groups, kg)
		return nil
	}
	m.own(g)
	delete(g.keys, string(key))
	return nil
}

// DropRange removes every key of the key groups [start, end).
func (m *Memory) DropRange(start, end int32) error {
	if m.closed {
		return ErrClosed
	}
	if err := checkRange(start, end); err != nil {
		return err
	}
	// Views hold their own index of key groups, so dropping a key group from
	// the backend's index never changes a view.
	for kg := range m.groups {
		if kg >= start && kg < end {
			delete(m.groups, kg)
		}
	}
	return nil
}

// Snapshot returns a view of the state as of the call. It copies the index of
// key groups, not the keys.
func (m *Memory) Snapshot() (View, error) {
	if m.closed {
		return nil, ErrClosed
	}
	groups := make(map[int32]map[string][]byte, len(m.groups))
	for kg, g := range m.groups {
		groups[kg] = g.keys
	}
	// Every existing key group now shares its map with the view.
	m.gen++
	m.views.Add(1)
	return &memView{m: m, groups: groups}, nil
}

// Close drops the state. Views still open keep their key groups until they
// are released.
func (m *Memory) Close() error {
	m.closed = true
	m.groups = nil
	return nil
}

// check returns an error if the backend is closed or kg is not a valid key
// group.
func (m *Memory) check(kg int32) error {
	if m.closed {
		return ErrClosed
	}
	return checkKeyGroup(kg)
}

// own makes g's map private to the backend before a write: if a view may
// share it, own clones it.
func (m *Memory) own(g *memGroup) {
	if g.gen == m.gen {
		return
	}
	// With no view open, nothing shares the map. The atomic load orders this
	// after the last Release, which drops the view's references first.
	if m.views.Load() > 0 {
		g.keys = maps.Clone(g.keys)
	}
	g.gen = m.gen
}

// memView is the View of a Memory. It holds the index of key groups as of the
// snapshot; the maps in it are never written again.
type memView struct {
	m        *Memory
	groups   map[int32]map[string][]byte // nil after Release
	released atomic.Bool
	keyBuf   []byte // the key passed to Range's fn
}

// Get returns the value of key in key group kg as of the snapshot.
func (v *memView) Get(kg int32, key []byte) ([]byte, bool, error) {
	if v.released.Load() {
		return nil, false, ErrReleased
	}
	if err := checkKeyGroup(kg); err != nil {
		return nil, false, err
	}
	val, ok := v.groups[kg][string(key)]
	return val, ok, nil
}

// Range calls fn for every key of the key groups [start, end) in key-group
// and then bytewise key order. It sorts the keys of each key group as it
// reaches it.
func (v *memView) Range(start, end int32, fn func(kg int32, key, value []byte) error) error {
	if v.released.Load() {
		return ErrReleased
	}
	if err := checkRange(start, end); err != nil {
		return err
	}
	kgs := make([]int32, 0, min(len(v.groups), int(end-start)))
	for kg := range v.groups {
		if kg >= start && kg < end {
			kgs = append(kgs, kg)
		}
	}
	slices.Sort(kgs)
	for _, kg := range kgs {
		group := v.groups[kg]
		// Go compares strings bytewise, which is the order Range promises.
		for _, k := range slices.Sorted(maps.Keys(group)) {
			v.keyBuf = append(v.keyBuf[:0], k...)
			if err := fn(kg, v.keyBuf, group[k]); err != nil {
				return err
			}
		}
	}
	return nil
}

// Release drops the view's references to the backend's maps.
func (v *memView) Release() {
	if !v.released.CompareAndSwap(false, true) {
		return
	}
	v.groups = nil
	v.keyBuf = nil
	v.m.views.Add(-1)
}
