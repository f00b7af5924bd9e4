package coordinator

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/fsm"
)

// TestRecoverClusterFromOneSurvivor loses the quorum of a 3-node cluster for
// good: all three stop, and only c1's data is used again. RecoverCluster
// gives c1 a configuration of itself alone; started again, it leads with all
// its state and takes writes.
func TestRecoverClusterFromOneSurvivor(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	job := submitJob(t, leader, wordcountSpec)
	waitForEqualDigests(t, servers...)
	for _, s := range servers {
		stopServer(t, s)
	}
	c1 := servers[0]
	cfg := restartConfig(c1)
	got, err := RecoverCluster(cfg.DataDir, []raft.Server{{ID: "c1", Address: raft.ServerAddress(c1.RaftAddr()), Suffrage: raft.Voter}}, cfg.Logger)
	if err != nil {
		t.Fatalf("RecoverCluster: %v", err)
	}
	var prev []string
	for _, srv := range got.Previous {
		prev = append(prev, string(srv.ID))
	}
	if !slices.Equal(prev, []string{"c1", "c2", "c3"}) || got.Jobs != 1 || got.Index == 0 {
		t.Errorf("RecoverCluster = %+v, want the previous configuration c1, c2, c3 and 1 job", got)
	}

	s := startServer(t, cfg)
	if waitForLeader(t, s) != s {
		t.Fatal("recovered c1 does not lead")
	}
	if _, ok := s.fsm.Job(job); !ok {
		t.Errorf("job %s missing after the recovery", job)
	}
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	if srvs := f.Configuration().Servers; len(srvs) != 1 || srvs[0].ID != "c1" {
		t.Errorf("raft configuration after the recovery = %+v, want c1 alone", srvs)
	}
	var jobs []apiJob
	second := submitJob(t, s, wordcountSpec)
	if code := apiCall(t, s, http.MethodGet, "/v1/jobs", nil, &jobs); code != http.StatusOK || len(jobs) != 2 {
		t.Errorf("GET /v1/jobs after the recovery and a new job %s = %d %+v, want 2 jobs", second, code, jobs)
	}
}

// TestRecoverClusterRefuses: RecoverCluster leaves alone a data dir a running
// coordinator holds, one with no Raft state, one with corrupt Raft data, and
// one whose log holds commands a newer coordd wrote.
func TestRecoverClusterRefuses(t *testing.T) {
	peers := []raft.Server{{ID: "c1", Address: "127.0.0.1:7001", Suffrage: raft.Voter}}
	logger := testLogger(t)

	t.Run("running coordinator", func(t *testing.T) {
		cfg := testConfig(t, logger, "c1")
		cfg.BootstrapExpect = 1
		s := startServer(t, cfg)
		waitForLeader(t, s)
		_, err := RecoverCluster(cfg.DataDir, peers, logger)
		if err == nil || !strings.Contains(err.Error(), "locked by another process") {
			t.Errorf("RecoverCluster on a running coordinator's data dir: %v, want locked by another process", err)
		}
	})
	t.Run("no raft state", func(t *testing.T) {
		_, err := RecoverCluster(t.TempDir(), peers, logger)
		if err == nil || !strings.Contains(err.Error(), "holds no raft state") {
			t.Errorf("RecoverCluster on an empty dir: %v, want holds no raft state", err)
		}
	})
	t.Run("no voter", func(t *testing.T) {
		cfg, _ := snapshottedNode(t, 1)
		_, err := RecoverCluster(cfg.DataDir, []raft.Server{{ID: "c1", Address: "127.0.0.1:7001", Suffrage: raft.Nonvoter}}, logger)
		if err == nil || !strings.Contains(err.Error(), "voter") {
			t.Errorf("RecoverCluster with no voter: %v, want an error naming the missing voter", err)
		}
	})
	t.Run("a newer coordd's log", func(t *testing.T) {
		cfg, _ := snapshottedNode(t, 1)
		// A batch of a known command and one of a type from the future,
		// compressed, as a newer leader would write it.
		known, err := fsm.Encode(fsm.CommandJobStatus, fsm.JobStatusCmd{JobID: "nope", Status: fsm.JobRunning, Time: 1})
		if err != nil {
			t.Fatal(err)
		}
		batch, err := fsm.EncodeFramedBatch([][]byte{known, append([]byte{200}, known[1:]...)})
		if err != nil {
			t.Fatal(err)
		}
		entry, err := fsm.EncodeCompressed(batch)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(cfg.DataDir, raftDBFile)
		store, err := openCheckedBoltStore(path)
		if err != nil {
			t.Fatal(err)
		}
		last, err := store.LastIndex()
		if err != nil {
			t.Fatal(err)
		}
		var prev raft.Log
		if err := store.GetLog(last, &prev); err != nil {
			t.Fatal(err)
		}
		if err := store.StoreLog(&raft.Log{Index: last + 1, Term: prev.Term, Type: raft.LogCommand, Data: entry}); err != nil {
			t.Fatal(err)
		}
		store.Close()
		_, err = RecoverCluster(cfg.DataDir, peers, logger)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("raft log entry %d holds commands of types [CommandType(200)]", last+1)) {
			t.Fatalf("RecoverCluster on a newer coordd's log: %v, want a refusal naming the entry and its type", err)
		}
		store, err = openCheckedBoltStore(path)
		if err != nil {
			t.Fatal(err)
		}
		defer store.Close()
		if err := store.GetLog(last+1, &prev); err != nil {
			t.Fatalf("the refused recovery compacted the log: %v", err)
		}
	})
	t.Run("corrupt snapshot", func(t *testing.T) {
		cfg, _ := snapshottedNode(t, 1)
		p := filepath.Join(snapshotDirs(t, cfg.DataDir)[0], "state.bin")
		if err := os.Truncate(p, 10); err != nil {
			t.Fatal(err)
		}
		_, err := RecoverCluster(cfg.DataDir, peers, logger)
		if !errors.Is(err, ErrCorruptRaftData) || !strings.Contains(err.Error(), p) {
			t.Errorf("RecoverCluster on a corrupt snapshot: %v, want ErrCorruptRaftData naming %s", err, p)
		}
	})
}
