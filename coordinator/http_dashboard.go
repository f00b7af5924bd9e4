package coordinator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// The endpoints the dashboard (/ui/) reads beside the job API: every
// coordinator's Raft status, every worker's slots and tasks, a job's live
// consumer lag and its checkpoint history. Like every read they answer from
// this node, follower or not; the two that ask other processes (the other
// coordinators, the brokers) cache their answer briefly, so that many open
// dashboards cost those processes no more than one.

const (
	// viewCacheTTL is how long GET /v1/coordinators and GET
	// /v1/jobs/{id}/lag reuse an answer: below the dashboard's refresh.
	viewCacheTTL = time.Second
	// lagTimeout bounds asking the brokers for a job's end offsets.
	lagTimeout = 3 * time.Second
	// maxLagLookups bounds the lag lookups running at once on one
	// coordinator (each holds a Kafka client); more wait for one.
	maxLagLookups = 4
)

// apiCoordinator is one server of the Raft configuration in GET
// /v1/coordinators, with the status it reports itself.
type apiCoordinator struct {
	ID           string `json:"id"`
	RaftAddr     string `json:"raft_addr"`
	HTTPAddr     string `json:"http_addr,omitempty"`
	Suffrage     string `json:"suffrage"`
	Leader       bool   `json:"leader"` // as this node sees it
	GossipStatus string `json:"gossip_status,omitempty"`
	// The fields below are the coordinator's own GET /v1/status; Error
	// says why they could not be read instead.
	State         string `json:"state,omitempty"`
	Term          uint64 `json:"term,omitempty"`
	LastIndex     uint64 `json:"last_index,omitempty"`
	AppliedIndex  uint64 `json:"applied_index,omitempty"`
	LastContactMS *int64 `json:"last_contact_ms,omitempty"`
	KnownLeader   *bool  `json:"known_leader,omitempty"`
	Version       string `json:"version,omitempty"`
	Error         string `json:"error,omitempty"`
}

// handleCoordinators answers GET /v1/coordinators.
func (s *Server) handleCoordinators(w http.ResponseWriter, r *http.Request) {
	v, err := s.api.coordinators.get(r.Context(), "", func() ([]apiCoordinator, error) {
		return s.coordinators(s.ctx)
	})
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// coordinators reads the Raft configuration and each server's status, the
// others' over HTTP at once, each within peerStatusTimeout.
func (s *Server) coordinators(ctx context.Context) ([]apiCoordinator, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("raft configuration: %w", err)
	}
	members := make(map[string]Member)
	for _, m := range s.Members() {
		members[m.ID] = m
	}
	_, leader := s.raft.LeaderWithID()
	servers := f.Configuration().Servers
	out := make([]apiCoordinator, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		id := string(srv.ID)
		c := &out[i]
		*c = apiCoordinator{ID: id, RaftAddr: string(srv.Address), Suffrage: suffrageName(srv.Suffrage), Leader: srv.ID == leader}
		m, known := members[id]
		if known {
			c.GossipStatus, c.HTTPAddr = m.Status, m.HTTPAddr
		}
		switch {
		case id == s.cfg.ID:
			c.HTTPAddr = s.httpAddr
			c.setStatus(s.status())
		case !known || m.HTTPAddr == "":
			c.Error = "its HTTP address is unknown: gossip has not seen it"
		default:
			wg.Go(func() {
				st, err := fetchStatus(ctx, s.peerClient(id, peerStatusTimeout), s.apiScheme()+"://"+m.HTTPAddr)
				if err != nil {
					c.Error = err.Error()
					return
				}
				c.setStatus(st)
			})
		}
	}
	wg.Wait()
	slices.SortFunc(out, func(a, b apiCoordinator) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

func (c *apiCoordinator) setStatus(st apiStatus) {
	c.State, c.Term, c.LastIndex, c.AppliedIndex, c.Version = st.State, st.Term, st.LastIndex, st.AppliedIndex, st.Version
	c.LastContactMS, c.KnownLeader = &st.LastContactMS, &st.KnownLeader
}

// apiWorker is one worker in GET /v1/workers.
type apiWorker struct {
	ID        string          `json:"id"`
	Status    string          `json:"status"` // gossip: alive, suspect, dead, left
	DataAddr  string          `json:"data_addr,omitempty"`
	Slots     int             `json:"slots"`
	SlotsUsed int             `json:"slots_used"`
	SlotsFree int             `json:"slots_free"`
	Tasks     []apiWorkerTask `json:"tasks"`
	Problem   string          `json:"problem,omitempty"`
}

// apiWorkerTask names a task placed on a worker.
type apiWorkerTask struct {
	Job  string `json:"job"`
	Task string `json:"task"`
}

// handleWorkers answers GET /v1/workers: the workers gossip knows, with the
// tasks of running jobs on each. A running job holds one slot per task on
// its task's worker, as the scheduler counts them.
func (s *Server) handleWorkers(w http.ResponseWriter, _ *http.Request) {
	byID := make(map[string]*apiWorker)
	var out []*apiWorker
	for _, m := range s.Members() {
		if m.Role != transport.RoleWorker {
			continue
		}
		aw := &apiWorker{ID: m.ID, Status: m.Status, DataAddr: m.DataAddr, Slots: m.Slots, Tasks: []apiWorkerTask{}, Problem: m.Problem}
		byID[m.ID] = aw
		out = append(out, aw)
	}
	for _, j := range s.fsm.Jobs() {
		if j.Status != fsm.JobRunning {
			continue
		}
		for _, t := range j.Tasks {
			aw, ok := byID[t.Worker]
			if !ok {
				// Gone from gossip while its job still lists it.
				aw = &apiWorker{ID: t.Worker, Status: "unknown", Tasks: []apiWorkerTask{}}
				byID[t.Worker] = aw
				out = append(out, aw)
			}
			aw.Tasks = append(aw.Tasks, apiWorkerTask{Job: j.ID, Task: t.ID})
		}
	}
	views := make([]apiWorker, 0, len(out))
	for _, aw := range out {
		aw.SlotsUsed = len(aw.Tasks)
		aw.SlotsFree = max(0, aw.Slots-aw.SlotsUsed)
		views = append(views, *aw)
	}
	slices.SortFunc(views, func(a, b apiWorker) int { return cmp.Compare(a.ID, b.ID) })
	writeJSON(w, http.StatusOK, views)
}

// apiLag is GET /v1/jobs/{id}/lag: how far the job's last completed
// checkpoint is behind the end of each partition of its topic.
type apiLag struct {
	Topic        string `json:"topic"`
	CheckpointID uint64 `json:"checkpoint_id"`
	// Total sums Lag over the partitions that have one.
	Total      int64             `json:"total"`
	Partitions []apiPartitionLag `json:"partitions"`
	// AsOf is when the brokers were asked.
	AsOf string `json:"as_of"`
}

// apiPartitionLag is one partition's lag. CheckpointOffset and Lag are
// absent for a partition the last completed checkpoint does not cover (none
// yet, or one added to the topic since).
type apiPartitionLag struct {
	Partition        int32  `json:"partition"`
	EndOffset        int64  `json:"end_offset"`
	CheckpointOffset *int64 `json:"checkpoint_offset,omitempty"`
	Lag              *int64 `json:"lag,omitempty"`
}

// handleLag answers GET /v1/jobs/{id}/lag from the brokers' end offsets now
// and the offsets of the job's last completed checkpoint: the records the
// job has not yet made part of its state. 502 when the brokers cannot say.
func (s *Server) handleLag(w http.ResponseWriter, r *http.Request) {
	j, ok := s.lookupJob(w, r)
	if !ok {
		return
	}
	v, err := s.api.lag.get(r.Context(), j.ID, func() (apiLag, error) {
		// Waiting for a turn counts toward the lookup's time, so that a
		// pile of requests cannot hold handlers longer than lagTimeout.
		ctx, cancel := context.WithTimeout(s.ctx, lagTimeout)
		defer cancel()
		select {
		case s.api.lagLookups <- struct{}{}:
			defer func() { <-s.api.lagLookups }()
		case <-ctx.Done():
			return apiLag{}, fmt.Errorf("lag of job %s: %d lookups of other jobs' brokers took the whole %v: %w", j.ID, maxLagLookups, lagTimeout, ctx.Err())
		}
		return jobLag(ctx, j)
	})
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return // the client went away
		}
		writeError(w, http.StatusBadGateway, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// jobLag asks j's brokers for the end offset of every partition of its
// topic, one ListOffsets request per partition leader.
func jobLag(ctx context.Context, j fsm.Job) (apiLag, error) {
	topic, brokers := j.Spec.Source.Topic, j.Spec.Source.Brokers
	addrs := strings.Join(brokers, ",")
	v := apiLag{Topic: topic, Partitions: []apiPartitionLag{}, AsOf: time.Now().UTC().Format(time.RFC3339Nano)}
	done := map[int32]int64{}
	if n := len(j.Completed); n > 0 {
		cp := j.Completed[n-1]
		v.CheckpointID = cp.ID
		for _, st := range cp.Tasks {
			for p, off := range st.Offsets {
				done[p] = off
			}
		}
	}
	client, err := sourceClient(ctx, brokers)
	if err != nil {
		return v, err
	}
	defer client.Close()
	parts, err := sourcePartitions(client, brokers, topic)
	if err != nil {
		return v, err
	}
	byLeader := make(map[*sarama.Broker][]int32)
	for _, p := range parts {
		b, err := client.Leader(topic, p)
		if err != nil {
			return v, fmt.Errorf("leader of %s/%d on %s: %w", topic, p, addrs, err)
		}
		byLeader[b] = append(byLeader[b], p)
	}
	end := make(map[int32]int64, len(parts))
	for b, ps := range byLeader {
		if err := ctx.Err(); err != nil {
			return v, err
		}
		req := &sarama.OffsetRequest{Version: 1}
		for _, p := range ps {
			req.AddBlock(topic, p, sarama.OffsetNewest, 1)
		}
		resp, err := b.GetAvailableOffsets(req)
		if err != nil {
			return v, fmt.Errorf("end offsets of %s from broker %s: %w", topic, b.Addr(), err)
		}
		for _, p := range ps {
			block := resp.GetBlock(topic, p)
			switch {
			case block == nil:
				return v, fmt.Errorf("end offsets of %s from broker %s: no answer for partition %d", topic, b.Addr(), p)
			case !errors.Is(block.Err, sarama.ErrNoError):
				return v, fmt.Errorf("end offset of %s/%d from broker %s: %w", topic, p, b.Addr(), block.Err)
			}
			end[p] = block.Offset
		}
	}
	slices.Sort(parts)
	for _, p := range parts {
		pl := apiPartitionLag{Partition: p, EndOffset: end[p]}
		if off, ok := done[p]; ok {
			lag := max(0, end[p]-off)
			pl.CheckpointOffset, pl.Lag = &off, &lag
			v.Total += lag
		}
		v.Partitions = append(v.Partitions, pl)
	}
	return v, nil
}

// apiCheckpointSummary is one entry of GET /v1/jobs/{id}/checkpoints/history.
type apiCheckpointSummary struct {
	ID          uint64               `json:"id"`
	Attempt     uint64               `json:"attempt"`
	Status      fsm.CheckpointStatus `json:"status"`
	Savepoint   bool                 `json:"savepoint,omitempty"`
	TriggerTime string               `json:"trigger_time"`
	EndTime     string               `json:"end_time"`
	DurationMS  float64              `json:"duration_ms"`
	StateSize   int64                `json:"state_size"`
	Reason      string               `json:"reason,omitempty"`
}

// handleCheckpointHistory answers GET /v1/jobs/{id}/checkpoints/history:
// the job's finished checkpoints and savepoints as the FSM summarizes them,
// newest first, further back than the retained ones.
func (s *Server) handleCheckpointHistory(w http.ResponseWriter, r *http.Request) {
	j, ok := s.lookupJob(w, r)
	if !ok {
		return
	}
	views := make([]apiCheckpointSummary, 0, len(j.History))
	for _, h := range slices.Backward(j.History) {
		views = append(views, apiCheckpointSummary{
			ID: h.ID, Attempt: h.Attempt, Status: h.Status, Savepoint: h.Savepoint,
			TriggerTime: formatTime(h.TriggeredAt), EndTime: formatTime(h.EndedAt),
			DurationMS: float64(h.EndedAt-h.TriggeredAt) / float64(time.Millisecond),
			StateSize:  h.StateBytes, Reason: h.Reason,
		})
	}
	writeJSON(w, http.StatusOK, views)
}

// viewCache keeps each key's last answer for viewCacheTTL; callers of the
// same key that arrive while it is computed wait for that answer instead of
// computing their own.
type viewCache[V any] struct {
	mu      sync.Mutex
	entries map[string]*viewEntry[V]
}

type viewEntry[V any] struct {
	done chan struct{} // closed when v and err are set
	at   time.Time
	v    V
	err  error
}

// stale reports whether e holds an answer older than viewCacheTTL (one
// still being computed is not stale).
func (e *viewEntry[V]) stale() bool {
	select {
	case <-e.done:
		return time.Since(e.at) >= viewCacheTTL
	default:
		return false
	}
}

// get returns key's answer, computing it with compute when there is none
// younger than viewCacheTTL. An error is cached like an answer, so that an
// unreachable broker is not asked again by every refresh. compute's answer
// goes to every caller that waits, so it must not depend on the first
// caller's context: a caller that leaves does not fail the others.
func (c *viewCache[V]) get(ctx context.Context, key string, compute func() (V, error)) (V, error) {
	c.mu.Lock()
	if c.entries == nil {
		c.entries = make(map[string]*viewEntry[V])
	}
	e, ok := c.entries[key]
	if !ok || e.stale() {
		for k, old := range c.entries { // forget stale keys: jobs come and go
			if old.stale() {
				delete(c.entries, k)
			}
		}
		e = &viewEntry[V]{done: make(chan struct{})}
		c.entries[key] = e
		c.mu.Unlock()
		e.v, e.err = compute()
		e.at = time.Now()
		close(e.done)
		return e.v, e.err
	}
	c.mu.Unlock()
	select {
	case <-e.done:
		return e.v, e.err
	case <-ctx.Done():
		var zero V
		return zero, ctx.Err()
	}
}
