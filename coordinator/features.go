package coordinator

import (
	"fmt"
	"slices"
	"strings"

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

// coordinatorsSupport returns an error naming the coordinators of the Raft
// configuration below the feature level spec needs, or never seen in
// gossip (whose level is unknown), and nil when there are none.
func (s *Server) coordinatorsSupport(spec fsm.JobSpec) error {
	level, what := specFeatureLevel(spec)
	if level == 0 {
		return nil
	}
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("%s: read the Raft configuration to check the coordinators' versions: %w", what, err)
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
	if len(old) == 0 {
		return nil
	}
	slices.Sort(old)
	return fmt.Errorf("%s needs every coordinator at feature level %d or newer (this build: %d); older: %s; upgrade them first (docs/operations.md, Feature levels)",
		what, level, transport.FeatureLevel, named(old))
}

// neededFeatureLevel returns the highest feature level a job that is not
// cancelled needs, what needs it and that job's id; level 0 when none needs
// any. A coordinator joins the Raft configuration only at that level: it
// would drop the field from its copy of those jobs.
func (s *Server) neededFeatureLevel() (level int, what, job string) {
	s.fsm.LiveSpecs(func(id string, spec fsm.JobSpec) bool {
		if l, w := specFeatureLevel(spec); l > level {
			level, what, job = l, w, id
		}
		return true
	})
	return level, what, job
}

// peerSupports returns an error unless coordinator m, about to join the Raft
// configuration, is at the feature level the jobs need.
func (s *Server) peerSupports(m Member, known bool) error {
	level, what, job := s.neededFeatureLevel()
	switch {
	case level == 0:
		return nil
	case !known:
		return fmt.Errorf("coordinator %s is not seen in gossip, so its feature level is unknown, and job %s needs level %d of every coordinator (%s)", m.ID, job, level, what)
	case m.FeatureLevel < level:
		return fmt.Errorf("coordinator %s runs a build at feature level %d, and job %s needs level %d of every coordinator (%s): an older coordinator would drop the field from its state; upgrade it first (docs/operations.md, Feature levels)",
			m.ID, m.FeatureLevel, job, level, what)
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
