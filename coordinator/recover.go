package coordinator

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// The offline recovery of a lost quorum: `coordd raft recover`.

// Recovered says what RecoverCluster did.
type Recovered struct {
	// Previous is the Raft configuration the data dir held.
	Previous []raft.Server
	// Index and Term are those of the snapshot written with the new
	// configuration: everything the node had.
	Index, Term uint64
	// Jobs is the number of jobs in the recovered state.
	Jobs int
}

// RecoverCluster rewrites the Raft configuration of a stopped coordinator's
// data dir to peers, as Consul's peers.json does, so that the coordinators
// left after a quorum loss can elect a leader among themselves. It restores
// the node's newest snapshot and its whole log into an FSM, writes a snapshot
// of that state with peers as its configuration and compacts the log; the
// node keeps everything it had. Run it with the same peers on every
// coordinator listed, each stopped, then start them.
//
// It refuses a data dir another process holds (a running coordd), one with no
// Raft state, corrupt Raft data (ErrCorruptRaftData), and a log that holds
// commands this build does not know (written by a newer coordd), which the
// replay would drop and the compaction lose for good.
func RecoverCluster(dataDir string, peers []raft.Server, logger *slog.Logger) (Recovered, error) {
	var out Recovered
	if logger == nil {
		logger = slog.Default()
	}
	if len(peers) == 0 {
		return out, errors.New("no peers given: name at least one voter")
	}
	if fi, err := os.Stat(dataDir); err != nil {
		return out, fmt.Errorf("data dir: %w", err)
	} else if !fi.IsDir() {
		return out, fmt.Errorf("data dir %s is not a directory", dataDir)
	}
	if _, err := os.Stat(filepath.Join(dataDir, raftDBFile)); errors.Is(err, os.ErrNotExist) && !hasSnapshotDirs(dataDir) {
		return out, fmt.Errorf("data dir %s holds no raft state (no %s, no snapshots): is it a coordd data dir?", dataDir, raftDBFile)
	}
	store, err := openCheckedBoltStore(filepath.Join(dataDir, raftDBFile))
	if err != nil {
		return out, err
	}
	defer store.Close()
	hl := newHCLogger(logger.With("component", "raft"), "raft")
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dataDir, snapshotsRetained, hl.Named("snapshots"))
	if err != nil {
		return out, fmt.Errorf("open raft snapshot store in %s: %w", dataDir, err)
	}
	if err := checkRaftData(dataDir, store, snaps, logger); err != nil {
		return out, err
	}
	if err := checkLogKnown(store); err != nil {
		return out, fmt.Errorf("recover raft cluster in %s: %w", dataDir, err)
	}

	rc := raft.DefaultConfig()
	rc.LocalID = "coordd-raft-recover" // RecoverCluster needs one; nothing stores it
	rc.Logger = hl
	_, trans := raft.NewInmemTransport("")
	defer trans.Close()

	prev, err := raft.GetConfiguration(rc, newScratchFSM(logger), store, store, snaps, trans)
	if err != nil {
		return out, fmt.Errorf("read the raft configuration in %s: %w", dataDir, err)
	}
	out.Previous = prev.Servers

	state := newScratchFSM(logger)
	rc = raft.DefaultConfig() // GetConfiguration marked the last one skip-startup
	rc.LocalID = "coordd-raft-recover"
	rc.Logger = hl
	if err := raft.RecoverCluster(rc, state, store, store, snaps, trans, raft.Configuration{Servers: peers}); err != nil {
		return out, fmt.Errorf("recover raft cluster in %s: %w", dataDir, err)
	}
	listed, err := snaps.List()
	if err != nil || len(listed) == 0 {
		return out, fmt.Errorf("list raft snapshots after recovery in %s: %v", dataDir, err)
	}
	out.Index, out.Term = listed[0].Index, listed[0].Term
	out.Jobs = len(state.Jobs())
	return out, nil
}

// checkLogKnown returns an error naming the first entry of the log that
// holds a command this build does not know.
func checkLogKnown(logs raft.LogStore) error {
	first, err := logs.FirstIndex()
	if err != nil {
		return fmt.Errorf("read the raft log: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return fmt.Errorf("read the raft log: %w", err)
	}
	for i := first; i > 0 && i <= last; i++ {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			return fmt.Errorf("read raft log entry %d: %w", i, err)
		}
		if l.Type != raft.LogCommand {
			continue
		}
		if unknown := fsm.UnknownCommands(l.Data); len(unknown) > 0 {
			return fmt.Errorf("raft log entry %d holds commands of types %v, which this coordd does not know: a newer coordd wrote them; recover with a coordd at least as new as the cluster's newest", i, unknown)
		}
	}
	return nil
}

// newScratchFSM returns an FSM that is not a node's: it only replays.
func newScratchFSM(logger *slog.Logger) *fsm.FSM {
	f := fsm.New()
	f.SetLogger(logger.With("component", "fsm"))
	return f
}
