// Package state holds the keyed state of a map task.
//
// A map task owns a contiguous range of key groups and keeps one value per key
// within each key group. Keys and values are arbitrary byte strings: the empty
// key, binary keys and invalid UTF-8 are all valid. A Backend stores that state
// and takes cheap, consistent snapshots of it: a View returned by
// Backend.Snapshot sees the state exactly as of the call, while the task keeps
// writing. Checkpoints encode a View from another goroutine, so a checkpoint
// never stops the task loop for longer than Snapshot takes.
//
// There are two backends:
//
//   - Memory keeps everything in Go maps, one map per key group, and makes
//     snapshots copy-on-write per key group. It suits small state.
//   - Disk keeps the state in a private Pebble database on local disk, so the
//     state may be much larger than memory. Snapshots are Pebble snapshots.
//
// Neither backend is durable on its own. Durability comes from checkpoints:
// after a restart a task restores its state from its last checkpoint into a
// fresh backend, which is why OpenDisk always starts from an empty database.
//
// # Concurrency
//
// A Backend has one writer: the map task loop. Only that goroutine may call
// Get, Put, Delete, DropRange, Snapshot and Close, and a Disk's Prefetch and
// Load. A View may be handed to one other goroutine, which may call its
// methods concurrently with writes to the Backend. Release may be called from
// any goroutine.
//
// # Key groups
//
// Key groups are numbered 0 to MaxKeyGroups-1. Methods given a key group
// outside that range, or a range [start, end) with start > end, return an
// error wrapping ErrKeyGroupRange; they never panic.
package state

import (
	"errors"
	"fmt"
)

// MaxKeyGroups is the number of key groups a Backend can address: valid key
// groups are 0 to MaxKeyGroups-1. It is the largest max_parallelism a job may
// have.
const MaxKeyGroups = 32768

var (
	// ErrClosed is returned by the methods of a Backend after Close.
	ErrClosed = errors.New("state: backend closed")
	// ErrReleased is returned by the methods of a View after Release.
	ErrReleased = errors.New("state: view released")
	// ErrKeyGroupRange is wrapped by the errors returned for a key group
	// outside [0, MaxKeyGroups) or a key-group range with start > end.
	ErrKeyGroupRange = errors.New("state: key group out of range")
)

// Backend is the keyed state of one map task: a value per key, per key group.
//
// One goroutine, the map task loop, calls every method of a Backend. A View
// returned by Snapshot may be read from another goroutine concurrently with
// writes to the Backend.
type Backend interface {
	// Get returns the value of key in key group kg, and whether key is set.
	// The returned slice must not be modified, and is valid only until the
	// next call of a method of the Backend; a caller that keeps it must copy
	// it.
	Get(kg int32, key []byte) (value []byte, ok bool, err error)

	// Put sets the value of key in key group kg. The backend copies key and
	// value, so the caller may reuse both buffers as soon as Put returns.
	Put(kg int32, key, value []byte) error

	// Delete removes key from key group kg. Deleting a key that is not set
	// is not an error.
	Delete(kg int32, key []byte) error

	// DropRange removes every key of the key groups [start, end). It is how a
	// task gives up key groups it no longer owns.
	DropRange(start, end int32) error

	// Snapshot returns a consistent, read-only view of the state as of the
	// call; writes made after Snapshot returns are not visible in it. It does
	// not copy the state, and the backend keeps taking writes while views
	// are open. Every View must be released.
	Snapshot() (View, error)

	// Close releases the backend's resources. Later calls of its methods
	// return ErrClosed, and calling Close again returns nil. Views should be
	// released before Close; a view that is still open stays readable, and
	// the resources it pins are freed when it is released.
	Close() error
}

// View is a consistent, read-only, point-in-time view of a Backend.
//
// One goroutine, which may be other than the Backend's writer, uses a View,
// concurrently with writes to the Backend. Methods other than Release return
// ErrReleased after Release.
type View interface {
	// Get returns the value of key in key group kg as of the snapshot, and
	// whether key was set. The returned slice must not be modified, and is
	// valid only until the next call of a method of the View.
	Get(kg int32, key []byte) (value []byte, ok bool, err error)

	// Range calls fn for every key of the key groups [start, end): in
	// ascending key-group order and, within a key group, in ascending
	// bytewise key order. key and value are valid only during the call of fn
	// and must not be modified. fn must not call methods of the View. An
	// error returned by fn stops the iteration, and Range returns it
	// unchanged.
	Range(start, end int32, fn func(kg int32, key, value []byte) error) error

	// Release frees the resources the view pins. It may be called from any
	// goroutine, but not concurrently with another method of the View;
	// calling it again has no effect.
	Release()
}

// checkKeyGroup returns an error wrapping ErrKeyGroupRange unless kg is a
// valid key group.
func checkKeyGroup(kg int32) error {
	if kg < 0 || kg >= MaxKeyGroups {
		return fmt.Errorf("%w: %d not in [0, %d)", ErrKeyGroupRange, kg, MaxKeyGroups)
	}
	return nil
}

// checkRange returns an error wrapping ErrKeyGroupRange unless
// 0 <= start <= end <= MaxKeyGroups.
func checkRange(start, end int32) error {
	if start < 0 || end > MaxKeyGroups || start > end {
		return fmt.Errorf("%w: [%d, %d) not within [0, %d)", ErrKeyGroupRange, start, end, MaxKeyGroups)
	}
	return nil
}
