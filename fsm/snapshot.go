package fsm

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/hashicorp/raft"
	"github.com/klauspost/compress/zstd"
)

// Snapshot file header. The version is bumped on any change an older reader
// would misread; Restore refuses versions it does not know.
const (
	snapshotFormat  = "coordflow-fsm"
	snapshotVersion = 1
)

// snapshotFile is the JSON document a snapshot holds.
type snapshotFile struct {
	Format  string `json:"format"`
	Version int    `json:"version"`
	State   *State `json:"state"`
}

// fsmSnapshot is a point-in-time copy of the state, encoded by Persist while
// Apply goes on.
type fsmSnapshot struct {
	state *State
}

// Snapshot takes a view of the state under the read lock that shares every
// job: Apply replaces a job it changes with a changed copy and never changes
// a stored one (copy on write), so the view stays as it was while Persist
// encodes it without a lock. Its cost is one map copy, whatever the jobs
// hold, so Raft's snapshots do not stall Apply.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &fsmSnapshot{state: f.state.share()}, nil
}

// Persist writes the snapshot as one JSON document with a format and version
// header, and cancels the sink if anything fails. Once the log holds a
// compressed entry (State.CompressedEntries), the document is written as a
// zstd stream: every coordinator then reads CommandCompressed, and with it
// such snapshots (feature level 6), and the JSON, whose keys repeat in
// every job, shrinks several times (the Raft entries, the same JSON, eight
// times) on disk and on its way to a follower that needs it.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	fail := func(err error) error {
		return errors.Join(fmt.Errorf("persist fsm snapshot %s: %w", sink.ID(), err), sink.Cancel())
	}
	file := snapshotFile{Format: snapshotFormat, Version: snapshotVersion, State: s.state}
	if !s.state.CompressedEntries {
		if err := json.NewEncoder(sink).Encode(file); err != nil {
			return fail(err)
		}
	} else {
		// One goroutine: a snapshot is background work on a node whose
		// cores serve the leader loop.
		z, err := zstd.NewWriter(sink, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(true))
		if err != nil {
			return fail(err)
		}
		if err := json.NewEncoder(z).Encode(file); err != nil {
			z.Close()
			return fail(err)
		}
		if err := z.Close(); err != nil {
			return fail(err)
		}
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("persist fsm snapshot %s: close sink: %w", sink.ID(), err)
	}
	return nil
}

// zstdMagic begins every zstd frame; a plain snapshot begins with '{'.
var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

// Release is a no-op: the snapshot holds only memory.
func (s *fsmSnapshot) Release() {}

// Restore replaces the whole state with the snapshot read from rc. It decodes
// into a fresh State and swaps it in under the write lock only if the snapshot
// is complete and consistent; otherwise it returns an error wrapping
// ErrCorruptSnapshot that names the problem, and the old state stays. The
// caller (raft) closes rc.
func (f *FSM) Restore(rc io.ReadCloser) error {
	state, err := readSnapshot(rc)
	if err != nil {
		return fmt.Errorf("restore fsm snapshot: %w", err)
	}
	f.mu.Lock()
	var gone []string
	for id := range f.state.Jobs {
		if _, ok := state.Jobs[id]; !ok {
			gone = append(gone, id)
		}
	}
	f.state = state
	f.mu.Unlock()
	// A snapshot of a later state may lack jobs purged since: tell the
	// watchers, as Apply of the purges would have.
	if len(gone) > 0 && f.onChange != nil {
		slices.Sort(gone)
		f.onChange(gone)
	}
	return nil
}

// readSnapshot decodes a snapshot Persist wrote, compressed or not.
func readSnapshot(r io.Reader) (*State, error) {
	br := bufio.NewReader(r)
	if head, _ := br.Peek(len(zstdMagic)); bytes.Equal(head, zstdMagic) {
		// Persist's encoder uses a window of a few MB; a larger one is a
		// damaged stream, refused before it is allocated.
		z, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(MaxCompressedPayload))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %v", ErrCorruptSnapshot, err)
		}
		defer z.Close()
		// The document is read to the stream's end, which checks the
		// frames' checksums.
		return readSnapshotDocument(z)
	}
	return readSnapshotDocument(br)
}

// readSnapshotDocument decodes the JSON document of a snapshot and checks it.
func readSnapshotDocument(r io.Reader) (*State, error) {
	dec := json.NewDecoder(r)
	var file snapshotFile
	if err := dec.Decode(&file); err != nil {
		return nil, fmt.Errorf("%w: decode: %v", ErrCorruptSnapshot, err)
	}
	switch _, err := dec.Token(); {
	case err == io.EOF:
	case err != nil:
		return nil, fmt.Errorf("%w: after the snapshot document: %v", ErrCorruptSnapshot, err)
	default:
		return nil, fmt.Errorf("%w: data after the snapshot document", ErrCorruptSnapshot)
	}
	if file.Format != snapshotFormat {
		return nil, fmt.Errorf("%w: format %q, want %q", ErrCorruptSnapshot, file.Format, snapshotFormat)
	}
	if file.Version != snapshotVersion {
		return nil, fmt.Errorf("%w: unsupported version %d (this build reads %d)", ErrCorruptSnapshot, file.Version, snapshotVersion)
	}
	if file.State == nil {
		return nil, fmt.Errorf("%w: no state", ErrCorruptSnapshot)
	}
	if err := file.State.check(); err != nil {
		return nil, err
	}
	return file.State, nil
}
