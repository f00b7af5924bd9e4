package coordinator

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc64"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.etcd.io/bbolt"
)

// snapshottedNode runs a single coordinator that submits jobs and takes two
// Raft snapshots, four jobs before each and one after the last, keeping
// trailing log entries behind each snapshot; with few trailing entries the
// log no longer holds what the older snapshot lacks. It returns the config to
// start the stopped node again and the job ids.
func snapshottedNode(t *testing.T, trailing uint64) (Config, []string) {
	t.Helper()
	cfg := testConfig(t, testLogger(t), "c1")
	cfg.BootstrapExpect = 1
	cfg.TrailingLogs = trailing
	cfg.SnapshotThreshold = 1 << 20 // only the snapshots the test takes
	cfg.SnapshotInterval = time.Hour
	s := startServer(t, cfg)
	waitForLeader(t, s)
	var jobs []string
	for i := range 9 {
		jobs = append(jobs, submitJob(t, s, wordcountSpec))
		if i%4 == 3 {
			if err := s.raft.Snapshot().Error(); err != nil {
				t.Fatalf("snapshot: %v", err)
			}
		}
	}
	// Both snapshots were timed, and the last one sized as the file the
	// snapshot store holds.
	var persisted uint64
	if mfs, err := s.metrics.registry.Gather(); err == nil {
		for _, mf := range mfs {
			if mf.GetName() == "coordflow_raft_snapshot_persist_duration_seconds" {
				persisted = mf.GetMetric()[0].GetHistogram().GetSampleCount()
			}
		}
	}
	if persisted != 2 {
		t.Errorf("coordflow_raft_snapshot_persist_duration_seconds counts %d snapshots, want 2", persisted)
	}
	if fi, err := os.Stat(filepath.Join(snapshotDirs(t, cfg.DataDir)[0], "state.bin")); err != nil {
		t.Error(err)
	} else if got := testutil.ToFloat64(s.metrics.raftSnapshotBytes); got != float64(fi.Size()) {
		t.Errorf("coordflow_raft_snapshot_bytes = %v, want the last snapshot's %d bytes", got, fi.Size())
	}
	stopServer(t, s)
	return restartConfig(s), jobs
}

// snapshotDirs returns the snapshot directories under dataDir, newest first.
func snapshotDirs(t *testing.T, dataDir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dataDir, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	type dir struct {
		path        string
		term, index uint64
	}
	var dirs []dir
	for _, e := range entries {
		d := dir{path: filepath.Join(dataDir, "snapshots", e.Name())}
		if _, err := fmt.Sscanf(e.Name(), "%d-%d-", &d.term, &d.index); err != nil {
			t.Fatalf("snapshot dir %s: %v", e.Name(), err)
		}
		dirs = append(dirs, d)
	}
	slices.SortFunc(dirs, func(a, b dir) int { // newest first
		return cmp.Or(cmp.Compare(b.term, a.term), cmp.Compare(b.index, a.index))
	})
	if len(dirs) != 2 {
		t.Fatalf("want 2 snapshots, have %+v", dirs)
	}
	out := make([]string, len(dirs))
	for i, d := range dirs {
		out[i] = d.path
	}
	return out
}

// writeSnapshotState replaces a snapshot's state.bin with data and fixes its
// meta.json (CRC and size) so that the snapshot store accepts it.
func writeSnapshotState(t *testing.T, dir string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "state.bin"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	metaPath := filepath.Join(dir, "meta.json")
	raw, err := os.ReadFile(metaPath)
	if err != nil {
		t.Fatal(err)
	}
	var meta map[string]any
	if err := json.Unmarshal(raw, &meta); err != nil {
		t.Fatal(err)
	}
	h := crc64.New(crc64.MakeTable(crc64.ECMA))
	h.Write(data)
	meta["CRC"], meta["Size"] = h.Sum(nil), len(data)
	if raw, err = json.Marshal(meta); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(metaPath, raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

// boltHighWater returns how far the pages of the bbolt file at path reach.
func boltHighWater(t *testing.T, path string) int64 {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var size int64
	if err := db.View(func(tx *bbolt.Tx) error { size = tx.Size(); return nil }); err != nil {
		t.Fatal(err)
	}
	return size
}

// boltRoot returns the root page of the bbolt file at path's root bucket,
// and its page size.
func boltRoot(t *testing.T, path string) (root, pageSize int64) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bbolt.Tx) error { root = int64(tx.Cursor().Bucket().Root()); return nil }); err != nil {
		t.Fatal(err)
	}
	return root, int64(db.Info().PageSize)
}

// editFile applies edit to the contents of path.
func editFile(t *testing.T, path string, edit func([]byte) []byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, edit(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptRaftDataFailsStart damages one file of a stopped coordinator's
// Raft data at a time and starts it again: NewServer returns an error that
// names the file and the way out, where before it panicked in raft.NewRaft or
// in bbolt, died of SIGBUS, or started without state.
func TestCorruptRaftDataFailsStart(t *testing.T) {
	for _, tc := range []struct {
		name string
		// corrupt damages the data of the stopped node and returns the
		// path the error must name.
		corrupt func(t *testing.T, dataDir string) string
	}{
		{"newest snapshot truncated", func(t *testing.T, dataDir string) string {
			p := filepath.Join(snapshotDirs(t, dataDir)[0], "state.bin")
			if err := os.Truncate(p, 10); err != nil {
				t.Fatal(err)
			}
			return p
		}},
		{"newest snapshot garbled", func(t *testing.T, dataDir string) string {
			p := filepath.Join(snapshotDirs(t, dataDir)[0], "state.bin")
			editFile(t, p, func(b []byte) []byte { b[len(b)/2] ^= 0xff; return b })
			return p
		}},
		{"newest snapshot meta.json garbled", func(t *testing.T, dataDir string) string {
			p := filepath.Join(snapshotDirs(t, dataDir)[0], "meta.json")
			editFile(t, p, func(b []byte) []byte { return b[:len(b)/2] })
			return p
		}},
		{"newest snapshot with a valid CRC that does not decode", func(t *testing.T, dataDir string) string {
			dir := snapshotDirs(t, dataDir)[0]
			writeSnapshotState(t, dir, []byte(`{"format": "coordflow-fsm", "version": 1, "state": {"jobs": `))
			return filepath.Join(dir, "state.bin")
		}},
		{"every snapshot truncated", func(t *testing.T, dataDir string) string {
			dirs := snapshotDirs(t, dataDir)
			for _, d := range dirs {
				if err := os.Truncate(filepath.Join(d, "state.bin"), 0); err != nil {
					t.Fatal(err)
				}
			}
			return filepath.Join(dirs[0], "state.bin")
		}},
		{"raft.db truncated", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			if err := os.Truncate(p, boltHighWater(t, p)-4096); err != nil {
				t.Fatal(err)
			}
			return p
		}},
		{"raft.db meta pages garbled", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			editFile(t, p, func(b []byte) []byte {
				for i := 16; i < 8192; i += 4096 {
					copy(b[i:i+64], bytes.Repeat([]byte{0x5a}, 64))
				}
				return b
			})
			return p
		}},
		{"raft.db pages garbled", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			editFile(t, p, func(b []byte) []byte {
				for i := 8192; i < len(b); i++ {
					b[i] ^= 0x5a
				}
				return b
			})
			return p
		}},
		{"raft.db element offsets garbled", func(t *testing.T, dataDir string) string {
			// The root bucket's page keeps its header; the key of its
			// first element is said to run far past the page. bbolt would
			// read it through its memory map, in a goroutine of its own.
			p := filepath.Join(dataDir, "raft.db")
			root, pageSize := boltRoot(t, p)
			editFile(t, p, func(b []byte) []byte {
				ksize := root*pageSize + boltPageHeader + 8 // first leaf element: flags, pos, ksize
				binary.NativeEndian.PutUint32(b[ksize:], 1<<30)
				return b
			})
			return p
		}},
		{"raft.db free list garbled", func(t *testing.T, dataDir string) string {
			// A raft.db of a coordd from before NoFreelistSync keeps its
			// free list in the file: bbolt reads as many ids as the
			// list's count says.
			p := filepath.Join(dataDir, "raft.db")
			db, err := bbolt.Open(p, 0o600, &bbolt.Options{Timeout: time.Second}) // writes the list back
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			_, pageSize := boltRoot(t, p)
			editFile(t, p, func(b []byte) []byte {
				ne := binary.NativeEndian
				meta := int64(0)
				if ne.Uint64(b[pageSize+boltMetaTxid:]) > ne.Uint64(b[boltMetaTxid:]) {
					meta = pageSize
				}
				list := int64(ne.Uint64(b[meta+boltMetaFreelist:]))
				if list == -1 {
					t.Fatal("raft.db has no free list in the file")
				}
				ne.PutUint16(b[list*pageSize+10:], 0xFFFF)            // the count is in the first id's place
				ne.PutUint64(b[list*pageSize+boltPageHeader:], 1<<40) // and it is far too large
				return b
			})
			return p
		}},
		{"raft.db log entries undecodable", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			editFile(t, p, func(b []byte) []byte {
				// Every encoded raft.Log names its fields: make the
				// string header before "Index" a byte msgpack never uses.
				n := 0
				for i := 1; i < len(b)-5; i++ {
					if string(b[i:i+5]) == "Index" && b[i-1] == 0xa5 {
						b[i-1] = 0xc1
						n++
					}
				}
				if n == 0 {
					t.Fatal("no encoded log entry found in raft.db")
				}
				return b
			})
			return p
		}},
		{"raft.db log gap", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			store, err := raftboltdb.NewBoltStore(p)
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			first, _ := store.FirstIndex()
			last, _ := store.LastIndex()
			if err := store.DeleteRange(first, last-1); err != nil {
				t.Fatal(err)
			}
			// Without snapshots nothing covers the entries before last.
			if err := os.RemoveAll(filepath.Join(dataDir, "snapshots")); err != nil {
				t.Fatal(err)
			}
			return p
		}},
		{"raft.db removed", func(t *testing.T, dataDir string) string {
			p := filepath.Join(dataDir, "raft.db")
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			return p
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := snapshottedNode(t, 1)
			file := tc.corrupt(t, cfg.DataDir)
			s, err := NewServer(cfg)
			if err == nil {
				stopServer(t, s)
				t.Fatalf("coordinator started on corrupt raft data (%s)", file)
			}
			if !errors.Is(err, ErrCorruptRaftData) {
				t.Errorf("error %q does not wrap ErrCorruptRaftData", err)
			}
			for _, want := range []string{file + " is corrupt", "remove the data dir", `"Recovering a node"`, "coordd raft recover"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			t.Logf("error: %v", err)
		})
	}
}

// TestCorruptSnapshotCoveredByLogStarts: a corrupt newest snapshot whose
// entries are all still in the log costs nothing: the node starts from the
// older snapshot and the log, with every job.
func TestCorruptSnapshotCoveredByLogStarts(t *testing.T) {
	cfg, jobs := snapshottedNode(t, 100)
	if err := os.Truncate(filepath.Join(snapshotDirs(t, cfg.DataDir)[0], "state.bin"), 10); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, cfg)
	waitForLeader(t, s)
	// The entries after the older snapshot are applied once the new term's
	// first entry commits.
	waitFor(t, 10*time.Second, func() error {
		for _, id := range jobs {
			if _, ok := s.fsm.Job(id); !ok {
				return fmt.Errorf("job %s missing after the restart", id)
			}
		}
		return nil
	})
}
