package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/coordflow/coordflow/fsm"
)

// Checks of the Raft data under a data dir before Raft reads it (setupRaft,
// and RecoverCluster in recover.go).
//
// Why check first: hashicorp/raft and bbolt do not fail cleanly on damaged
// data. A corrupt newest snapshot whose log entries were compacted makes
// raft.NewRaft fall back to an older snapshot and then panic on the missing
// entries ("log not found"); with every snapshot corrupt it fails with "failed
// to load any existing snapshots", naming none; a garbled raft.db panics in
// bbolt's Open, and a truncated one dies of SIGBUS, which no recover catches.
// So setupRaft validates raft.db with bbolt's own check (in a goroutine where
// a fault becomes a panic), then finds the snapshot Raft will restore, decodes
// it into a scratch FSM and reads every log entry Raft will read at start.
// Damage that Raft would ride over (a corrupt newest snapshot whose entries
// are still in the log) is logged and the start goes on.

// ErrCorruptRaftData marks a start or recovery refused because the Raft data
// under the data dir is damaged. The error names the file and the way out.
var ErrCorruptRaftData = errors.New("corrupt raft data")

// corruptWayOut is what an operator can do about corrupt Raft data.
const corruptWayOut = `remove the data dir and rejoin the cluster (docs/operations.md "Recovering a node"), ` +
	`or, if the quorum is lost, run coordd raft recover on a coordinator whose data is intact`

// raftDataError says which file of the Raft data is damaged, how, and what
// that costs; it matches ErrCorruptRaftData.
type raftDataError struct {
	what    string // "raft snapshot", "raft store"
	file    string
	problem string
	cost    string // what the damage means for this node
}

func (e *raftDataError) Error() string {
	return fmt.Sprintf("%s %s is corrupt (%s): %s; %s", e.what, e.file, e.problem, e.cost, corruptWayOut)
}

func (e *raftDataError) Is(target error) bool { return target == ErrCorruptRaftData }

// Names of the FileSnapshotStore's files (unexported in hashicorp/raft).
const (
	snapshotsDir      = "snapshots"
	snapshotMetaFile  = "meta.json"
	snapshotStateFile = "state.bin"
	snapshotTmpSuffix = ".tmp"
)

// hasSnapshotDirs reports whether dataDir holds any Raft snapshot directory,
// readable or not (in-progress ".tmp" ones excluded).
func hasSnapshotDirs(dataDir string) bool {
	entries, err := os.ReadDir(filepath.Join(dataDir, snapshotsDir))
	if err != nil {
		return false
	}
	for _, e := range entries {
		if e.IsDir() && !strings.HasSuffix(e.Name(), snapshotTmpSuffix) {
			return true
		}
	}
	return false
}

// openCheckedBoltStore opens the Raft log and stable store at path (raft.db
// in a data dir) like openBoltStore, after checking the file with
// checkBoltFile. A raft.db that is missing or empty while the data dir holds
// snapshots is refused: the node's term and vote would be lost, and with them
// Raft's guarantee that a node votes once per term.
func openCheckedBoltStore(path string) (*raftboltdb.BoltStore, error) {
	dataDir := filepath.Dir(path)
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist) || err == nil && fi.Size() == 0:
		if hasSnapshotDirs(dataDir) {
			state := "missing"
			if err == nil {
				state = "empty"
			}
			return nil, &raftDataError{what: "raft store", file: path, problem: state + " while the data dir holds raft snapshots",
				cost: "this node's log, term and vote are lost"}
		}
	case err != nil:
		return nil, fmt.Errorf("open raft store %s: %w", path, err)
	default:
		if err := checkBoltFile(path, fi.Size()); err != nil {
			return nil, err
		}
	}
	var store *raftboltdb.BoltStore
	err = catchPanic(func() error {
		var err error
		store, err = openBoltStore(path)
		return err
	})
	var p *panicError
	if errors.As(err, &p) {
		return nil, &raftDataError{what: "raft store", file: path, problem: p.Error(), cost: "this node cannot read its raft log"}
	}
	return store, err
}

// panicError is a panic, or a memory fault, caught by catchPanic.
type panicError struct{ value any }

func (p *panicError) Error() string { return fmt.Sprintf("bbolt panicked: %v", p.value) }

// catchPanic runs f and returns its error, or a *panicError if it panics or
// faults: for f's goroutine, a fault on a bad address (bbolt reads its file
// through mmap) becomes a panic instead of killing the process.
func catchPanic(f func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if v := recover(); v != nil {
			err = &panicError{value: v}
		}
	}()
	return f()
}

// checkBoltFile opens the bbolt file at path, of size bytes, read-only and
// checks it: the file reaches as far as its pages do (a truncated file would
// fault on the first page beyond its end), every page of its tree is whole
// (checkBoltPages), and bbolt's consistency check (Tx.Check: every page
// reachable, none freed twice, keys in order) passes. A file another
// process holds is reported as openBoltStore reports it.
func checkBoltFile(path string, size int64) error {
	corrupt := func(problem string) error {
		return &raftDataError{what: "raft store", file: path, problem: problem, cost: "this node cannot read its raft log"}
	}
	var problems []string
	err := catchPanic(func() error {
		db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: boltOpenTimeout})
		if err != nil {
			return err
		}
		defer db.Close()
		return db.View(func(tx *bbolt.Tx) error {
			if need := tx.Size(); size < need {
				problems = append(problems, fmt.Sprintf("truncated: %d bytes, its pages reach %d", size, need))
				return nil
			}
			// Every page bbolt's checks will read, checked first where
			// a garbled one is an error, not a crash.
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			pageSize := db.Info().PageSize
			if err := checkBoltPages(f, pageSize, uint64(tx.Size())/uint64(pageSize), uint64(tx.Cursor().Bucket().Root()), uint64(tx.ID())); err != nil {
				problems = append(problems, err.Error())
				return nil
			}
			for err := range tx.Check() {
				if len(problems) < 3 {
					problems = append(problems, err.Error())
				}
			}
			return nil
		})
	})
	var pathErr *fs.PathError
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return fmt.Errorf("open raft store %s: locked by another process (is another coordd running with this data dir?): gave up after %v: %w",
			path, boltOpenTimeout, err)
	case errors.As(err, &pathErr):
		return fmt.Errorf("open raft store %s: %w", path, err) // permissions, I/O: not the file's content
	case err != nil:
		// A panic, bad meta pages (ErrInvalid, ErrChecksum), a file too
		// short for them: the content is damaged.
		return corrupt(err.Error())
	case len(problems) > 0:
		return corrupt(strings.Join(problems, "; "))
	}
	return nil
}

// snapshotDir is one directory of the snapshot store as found on disk.
type snapshotDir struct {
	id    string
	index uint64 // from meta.json, else from the directory's name
	// problem, if set, is why Raft cannot restore it, in file.
	problem, file string
}

// readSnapshotDirs lists the snapshot directories under dataDir with their
// index, marking those whose meta.json Raft cannot read (Raft skips them
// silently).
func readSnapshotDirs(dataDir string, logger *slog.Logger) ([]snapshotDir, error) {
	dir := filepath.Join(dataDir, snapshotsDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read raft snapshots in %s: %w", dir, err)
	}
	var out []snapshotDir
	for _, e := range entries {
		if !e.IsDir() || strings.HasSuffix(e.Name(), snapshotTmpSuffix) {
			continue
		}
		sd := snapshotDir{id: e.Name()}
		metaPath := filepath.Join(dir, sd.id, snapshotMetaFile)
		meta, err := readSnapshotMeta(metaPath)
		switch {
		case err != nil:
			sd.problem, sd.file = err.Error(), metaPath
			// Raft names snapshots term-index-milliseconds.
			parts := strings.Split(sd.id, "-")
			if len(parts) != 3 {
				logger.Warn("ignoring a directory in the raft snapshot store that is no snapshot", "dir", filepath.Join(dir, sd.id), "err", err)
				continue
			}
			sd.index, _ = strconv.ParseUint(parts[1], 10, 64)
		case meta.Version < raft.SnapshotVersionMin || meta.Version > raft.SnapshotVersionMax:
			sd.index = meta.Index
			sd.problem, sd.file = fmt.Sprintf("snapshot version %d, this build reads %d to %d", meta.Version, raft.SnapshotVersionMin, raft.SnapshotVersionMax), metaPath
		default:
			sd.index = meta.Index
		}
		out = append(out, sd)
	}
	return out, nil
}

// readSnapshotMeta decodes a snapshot's meta.json as FileSnapshotStore does.
func readSnapshotMeta(path string) (*raft.SnapshotMeta, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var meta raft.SnapshotMeta
	if err := json.Unmarshal(data, &meta); err != nil {
		return nil, err
	}
	return &meta, nil
}

// checkRaftData finds out whether Raft can start from the data in dataDir
// with everything the node has stored, and returns an error wrapping
// ErrCorruptRaftData that names the damaged file if it cannot. It mirrors
// raft.NewRaft: Raft restores the newest snapshot of snaps.List it can open
// and decode, and then reads every log entry after it. So this opens the
// listed snapshots newest first (the store checks the CRC that meta.json
// keeps), decodes each into a scratch FSM until one succeeds, and reads the
// log from the entry after it to the last. It fails when
//   - an entry Raft will read is missing (compacted behind a corrupt snapshot)
//     or does not decode, or
//   - a snapshot that is corrupt is newer than both the snapshot Raft can
//     restore and the log: its state would be lost.
//
// A corrupt snapshot whose entries are all still in the log is logged and
// passed over, as Raft will. Entries at or before the restored snapshot are
// not read: Raft needs them only to catch up lagging followers.
func checkRaftData(dataDir string, logs raft.LogStore, snaps raft.SnapshotStore, logger *slog.Logger) error {
	dirs, err := readSnapshotDirs(dataDir, logger)
	if err != nil {
		return err
	}
	byID := make(map[string]*snapshotDir, len(dirs))
	for i := range dirs {
		byID[dirs[i].id] = &dirs[i]
	}
	listed, err := snaps.List()
	if err != nil {
		return fmt.Errorf("list raft snapshots in %s: %w", dataDir, err)
	}
	var base *raft.SnapshotMeta // the snapshot Raft will restore
	for _, meta := range listed {
		problem, file := checkSnapshot(dataDir, snaps, meta.ID)
		if problem == "" {
			base = meta
			break
		}
		if sd := byID[meta.ID]; sd != nil {
			sd.problem, sd.file = problem, file
		}
	}
	var baseIndex uint64
	if base != nil {
		baseIndex = base.Index
	}

	first, err := logs.FirstIndex()
	if err != nil {
		return fmt.Errorf("read raft log first index: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return fmt.Errorf("read raft log last index: %w", err)
	}
	dbPath := filepath.Join(dataDir, raftDBFile)
	// newestBad is the newest snapshot Raft cannot restore, if it is newer
	// than the one it can: what such a snapshot holds must be in the log.
	var newestBad *snapshotDir
	for i := range dirs {
		if d := &dirs[i]; d.problem != "" && d.index > baseIndex && (newestBad == nil || d.index > newestBad.index) {
			newestBad = d
		}
	}
	restores := "no snapshot restores"
	if base != nil {
		restores = fmt.Sprintf("the newest snapshot that restores ends at %d", baseIndex)
	}
	switch {
	case last > baseIndex && first > baseIndex+1 && newestBad != nil:
		return &raftDataError{what: "raft snapshot", file: newestBad.file, problem: newestBad.problem,
			cost: fmt.Sprintf("the log entries it covers are compacted (the log holds %d to %d, %s), so this node cannot recover its state",
				first, last, restores)}
	case last > baseIndex && first > baseIndex+1:
		return &raftDataError{what: "raft store", file: dbPath, problem: fmt.Sprintf("its log starts at index %d", first),
			cost: fmt.Sprintf("no snapshot covers the entries before it (%s), so this node cannot recover its state", restores)}
	case newestBad != nil && newestBad.index > last:
		return &raftDataError{what: "raft snapshot", file: newestBad.file, problem: newestBad.problem,
			cost: fmt.Sprintf("it holds state up to index %d, which neither the log (up to %d) nor an older snapshot (%s) has, so this node cannot recover its state",
				newestBad.index, last, restores)}
	}
	for index := baseIndex + 1; index <= last; index++ {
		var entry raft.Log
		err := catchPanic(func() error { return logs.GetLog(index, &entry) })
		if err != nil {
			return &raftDataError{what: "raft store", file: dbPath, problem: fmt.Sprintf("log entry %d: %v", index, err),
				cost: "this node cannot replay its raft log"}
		}
	}
	for _, d := range dirs {
		if d.problem != "" {
			logger.Warn("raft snapshot is corrupt; the log holds what it covers, so raft starts from an older snapshot and the log",
				"file", d.file, "problem", d.problem, "snapshot_index", d.index, "restored_snapshot_index", baseIndex, "log_first", first, "log_last", last)
		}
	}
	return nil
}

// checkSnapshot opens snapshot id of snaps (which verifies its CRC) and
// decodes it into a scratch FSM; it returns why Raft could not restore it and
// in which file, or "" if it can.
func checkSnapshot(dataDir string, snaps raft.SnapshotStore, id string) (problem, file string) {
	statePath := filepath.Join(dataDir, snapshotsDir, id, snapshotStateFile)
	_, rc, err := snaps.Open(id)
	if err != nil {
		file := statePath
		if _, merr := readSnapshotMeta(filepath.Join(dataDir, snapshotsDir, id, snapshotMetaFile)); merr != nil {
			file = filepath.Join(dataDir, snapshotsDir, id, snapshotMetaFile)
		}
		problem := err.Error()
		if problem == "CRC mismatch" {
			problem = "its CRC does not match the one in meta.json"
		}
		return problem, file
	}
	defer rc.Close()
	scratch := fsm.New()
	scratch.SetLogger(slog.New(slog.DiscardHandler))
	if err := scratch.Restore(io.NopCloser(rc)); err != nil {
		return err.Error(), statePath
	}
	return "", ""
}

// newRaft is raft.NewRaft that turns a panic into an error naming the data
// dir. checkRaftData has read what NewRaft reads, so this is a last guard: the
// panics NewRaft raises ("log not found" on a gap in the log) come before it
// starts any goroutine.
func newRaft(dataDir string, rc *raft.Config, f raft.FSM, logs raft.LogStore, stable raft.StableStore,
	snaps raft.SnapshotStore, trans raft.Transport) (r *raft.Raft, err error) {
	defer func() {
		if v := recover(); v != nil {
			r, err = nil, &raftDataError{what: "raft data in", file: dataDir, problem: fmt.Sprintf("raft panicked at start: %v", v),
				cost: "this node cannot recover its state"}
		}
	}()
	return raft.NewRaft(rc, f, logs, stable, snaps, trans)
}
