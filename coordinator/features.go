package coordinator

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// A job that uses a newer part of the spec needs every coordinator and
// the workers of its tasks to implement it (transport.FeatureLevel): an
// older coordinator decodes the job without the field and keeps it so in
// its state and snapshots, and an older worker ignores it in a deployment.
// This file holds the leader's checks, as Nomad and Consul gate features
// on the versions of their servers.

// specFeatureLevel returns the feature level a job of spec needs, and what
// in the spec needs it ("" for level 0).
func specFeatureLevel(spec fsm.JobSpec) (level int, what string) {
	if spec.Source.ReadCommitted() {
		return 1, "source.isolation_level " + fsm.IsolationReadCommitted
	}
	return 0, ""
}

// discoveryLevel is the feature level every coordinator needs before the
// leader turns partition discovery on in the sources it deploys: a build
// older than discovery rejects, in its FSM, a completion whose source states
// name partitions beyond the assignment, while the others accept it, and
// the replicas would then differ. Every build at level 1 has discovery; one
// at level 0 may not.
const discoveryLevel = 1

// framedBatchLevel is the feature level every coordinator needs before the
// leader writes group commits in the framed envelope
// (fsm.CommandFramedBatch): an older build cannot apply such an entry, and
// would keep a state without the commands in it.
const framedBatchLevel = 3

// chosenIDLevel is the feature level every coordinator needs before the
// leader chooses checkpoint ids itself (fsm.CheckpointTriggeredCmd.ID),
// which lets it send a trigger before the command commits: an older build
// ignores the id, takes the next one itself, and would keep another state.
const chosenIDLevel = 4

// SubmissionKeyLevel is the feature level every coordinator needs before
// the leader registers a job with a submission key (Idempotency-Key): an
// older build ignores the key and would register a second job of it where
// the others refuse it. Clients check it too (coordd job run), since an
// older leader would ignore the key and register every copy sent again.
const SubmissionKeyLevel = 5

// compressedLevel is the feature level every coordinator needs before the
// leader compresses Raft entries (fsm.CommandCompressed): an older build
// cannot apply such an entry, and would keep a state without the commands
// in it.
const compressedLevel = 6

// gateRecheck is how often a writeGate looks again whether every
// coordinator is at its level.
const gateRecheck = time.Second

// writeGate decides whether the leader's writes may use a feature that
// every coordinator must know to apply them (the framed envelope of group
// commits, chosen checkpoint ids), and keeps that decision and the
// admission of coordinators to the Raft configuration apart: a coordinator
// below the gate's level that joined between the gate's look at the
// configuration and the entry would fail to apply it, or apply it
// otherwise. Joins hold mu from their feature level check to their
// configuration change (admitPeer); the gate looks again only when it gets
// mu, and the check refuses such a coordinator while the gate is open.
type writeGate struct {
	mu   sync.Mutex
	open atomic.Bool
	// opened is set, under mu, when the gate first opens, and stays set:
	// an entry the gate allowed may wait in the write path after it
	// closes again, where the Barrier of a join does not see it.
	opened  atomic.Bool
	checked time.Time // under mu
	// below lists the coordinators of the Raft configuration below the
	// gate's level (coordinatorsBelow).
	below func() ([]string, error)
	// now is the clock of the rechecks; nil: time.Now.
	now func() time.Time
}

// allow reports whether the next write may use the gate's feature.
func (g *writeGate) allow() bool {
	if !g.mu.TryLock() {
		return g.open.Load() // a join is being decided: keep the last answer
	}
	defer g.mu.Unlock()
	now := time.Now
	if g.now != nil {
		now = g.now
	}
	if now := now(); now.Sub(g.checked) >= gateRecheck {
		old, err := g.below()
		g.open.Store(err == nil && len(old) == 0)
		if g.open.Load() {
			g.opened.Store(true)
		}
		g.checked = now
	}
	return g.open.Load()
}

// coordinatorsSupport returns an error naming the coordinators of the Raft
// configuration below the feature level spec needs, or never seen in
// gossip (whose level is unknown), and nil when there are none.
func (s *Server) coordinatorsSupport(spec fsm.JobSpec) error {
	level, what := specFeatureLevel(spec)
	if level == 0 {
		return nil
	}
	old, err := s.coordinatorsBelow(level)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if len(old) == 0 {
		return nil
	}
	return fmt.Errorf("%s needs every coordinator at feature level %d or newer (this build: %d); older: %s; upgrade them first (docs/operations.md, Feature levels)",
		what, level, transport.FeatureLevel, named(old))
}

// coordinatorsBelow returns, sorted, the coordinators of the Raft
// configuration below feature level level or never seen in gossip, each
// with why.
func (s *Server) coordinatorsBelow(level int) ([]string, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("read the Raft configuration to check the coordinators' versions: %w", err)
	}
	seen := make(map[string]Member)
	for _, m := range s.Members() {
		seen[m.ID] = m
	}
	var old []string
	for _, srv := range f.Configuration().Servers {
		id := string(srv.ID)
		m, ok := seen[id]
		switch {
		case !ok:
			old = append(old, id+" (not seen in gossip)")
		case m.Problem != "":
			old = append(old, id+" (its gossip meta is invalid)")
		case m.FeatureLevel < level:
			old = append(old, fmt.Sprintf("%s (feature level %d)", id, m.FeatureLevel))
		}
	}
	slices.Sort(old)
	return old, nil
}

// neededFeatureLevel returns the highest feature level a job that is not
// cancelled needs of a coordinator joining the Raft configuration, what
// needs it and that job's id; level 0 when none needs any. Below its spec's
// level, the joining coordinator would drop the field from its copy of the
// job; below discoveryLevel, it would reject the checkpoints of a source
// reading a partition it discovered, which any live job may have. Once a job
// has been purged, the log it replays may hold a JobPurged, which a
// coordinator below jobGCLevel would reject, and while a cancelled job may
// be purged (by job garbage collection or on request) one may be committed:
// then it needs that level whatever the jobs (job is then "").
//
// Framed batches need framedBatchLevel once the log may hold one: once one
// was applied, or while this leader's write path frames them (the caller
// holds framed.mu, so that the gate does not open before the join is done);
// chosen checkpoint ids likewise need chosenIDLevel, once the gate has
// opened in this process at all: the leader loop decides on a chosen id
// before the entry reaches Raft, so one may wait in the write path after
// the gate closed. Submission keys need SubmissionKeyLevel on the same
// terms, and compressed entries compressedLevel on the terms of framed
// batches.
func (s *Server) neededFeatureLevel() (level int, what, job string) {
	switch {
	case s.fsm.CompressedEntries() || s.compressed.open.Load():
		level, what = compressedLevel, "compressed entries in the Raft log"
	case s.fsm.SubmissionKeys() || s.keys.opened.Load():
		level, what = SubmissionKeyLevel, "submission keys in the Raft log"
	case s.fsm.ChosenCheckpointIDs() || s.chosenIDs.opened.Load():
		level, what = chosenIDLevel, "checkpoint ids chosen by the leader in the Raft log"
	case s.fsm.FramedBatches() || s.framed.open.Load():
		level, what = framedBatchLevel, "framed batches in the Raft log"
	case s.fsm.Purged() > 0:
		level, what = jobGCLevel, "purged jobs in the Raft log"
	case s.fsm.HasCancelledJob():
		// Purged by -job-gc-threshold or on request (DELETE ...?purge=true),
		// whose JobPurged may wait in the write path while the peer joins.
		level, what = jobGCLevel, "cancelled jobs, which may be purged"
	}
	s.fsm.LiveSpecs(func(id string, spec fsm.JobSpec) bool {
		l, w := specFeatureLevel(spec)
		if l < discoveryLevel {
			l, w = discoveryLevel, "partition discovery"
		}
		if l > level {
			level, what, job = l, w, id
		}
		return true
	})
	return level, what, job
}

// peerSupports returns an error unless coordinator m, about to join the Raft
// configuration, is at the feature level the jobs and the log need. Only a
// check under the write gates' mus, held until the configuration change is
// done (admitPeer), is binding; one without it is an early answer.
func (s *Server) peerSupports(m Member, known bool) error {
	level, what, job := s.neededFeatureLevel()
	if level == 0 {
		return nil
	}
	needs := "the cluster needs"
	if job != "" {
		needs = "job " + job + " needs"
	}
	switch {
	case !known:
		return fmt.Errorf("coordinator %s is not seen in gossip, so its feature level is unknown, and %s level %d of every coordinator (%s)", m.ID, needs, level, what)
	case m.FeatureLevel < level:
		return fmt.Errorf("coordinator %s runs a build at feature level %d, and %s level %d of every coordinator (%s): an older coordinator's state would differ from the others'; upgrade it first (docs/operations.md, Feature levels)",
			m.ID, m.FeatureLevel, needs, level, what)
	}
	return nil
}

// member returns the gossip record of member id.
func (s *Server) member(id string) (Member, bool) {
	for _, m := range s.Members() {
		if m.ID == id {
			return m, true
		}
	}
	return Member{}, false
}

// maxNamed is how many members a reason names before "and N more": a
// pending job's reason is replicated.
const maxNamed = 5

// named lists ids, the first maxNamed of them and how many more.
func named(ids []string) string {
	if len(ids) <= maxNamed {
		return strings.Join(ids, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ids[:maxNamed], ", "), len(ids)-maxNamed)
}

// capableWorkers returns the workers at the feature level spec needs, and
// the ids of those left out.
func capableWorkers(spec fsm.JobSpec, workers []Member) (capable []Member, old []string) {
	level, _ := specFeatureLevel(spec)
	if level == 0 {
		return workers, nil
	}
	for _, w := range workers {
		if w.FeatureLevel >= level {
			capable = append(capable, w)
		} else {
			old = append(old, w.ID)
		}
	}
	return capable, old
}
