package coordinator

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/pprof"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/coordflow/coordflow/coordinator/ui"
	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// maxSpecBytes bounds a submitted job spec.
const maxSpecBytes = 1 << 20

// newHTTPServer builds the HTTP API of docs/design ("User contract"). Reads
// answer from the local FSM on any node (the stale-read rule of
// http_guard.go permitting); writes run on the leader, and a follower
// forwards them there (forward.go). Every endpoint names the role it needs
// (acl.go) and its bounds (routeOpts).
func (s *Server) newHTTPServer() *http.Server {
	if s.api == nil {
		s.api = newHTTPAPI() // handler tests build a bare Server
	}
	mux := http.NewServeMux()
	read := routeOpts{fsmRead: true}
	write := routeOpts{write: true}
	long := routeOpts{writeFor: maxSavepointWait + time.Minute, write: true}
	if s.cfg.EnableDebug {
		debug := routeOpts{writeFor: debugWriteTimeout}
		s.handle(mux, "/debug/pprof/", roleOperator, debug, http.HandlerFunc(pprof.Index))
		s.handle(mux, "/debug/pprof/profile", roleOperator, debug, http.HandlerFunc(pprof.Profile))
		s.handle(mux, "/debug/pprof/trace", roleOperator, debug, http.HandlerFunc(pprof.Trace))
	}
	s.handle(mux, "GET /v1/status", roleNone, routeOpts{}, http.HandlerFunc(s.handleStatus))
	s.handle(mux, "GET /v1/members", roleRead, routeOpts{}, http.HandlerFunc(s.handleMembers))
	s.handle(mux, "GET /v1/coordinators", roleRead, routeOpts{}, http.HandlerFunc(s.handleCoordinators))
	s.handle(mux, "GET /v1/workers", roleRead, routeOpts{}, http.HandlerFunc(s.handleWorkers))
	s.handle(mux, "POST /v1/jobs", roleWrite, routeOpts{maxBody: maxSpecBytes, write: true, params: []string{"from_savepoint"}}, s.leaderOnly(s.handleSubmitJob))
	s.handle(mux, "GET /v1/jobs", roleRead, read, http.HandlerFunc(s.handleListJobs))
	s.handle(mux, "GET /v1/jobs/{id}", roleRead, read, http.HandlerFunc(s.handleGetJob))
	s.handle(mux, "DELETE /v1/jobs/{id}", roleWrite, long.with("purge", "force", "savepoint", "wait"), s.leaderOnly(s.handleCancelJob))
	s.handle(mux, "GET /v1/jobs/{id}/checkpoints", roleRead, read, http.HandlerFunc(s.handleCheckpoints))
	s.handle(mux, "GET /v1/jobs/{id}/checkpoints/history", roleRead, read, http.HandlerFunc(s.handleCheckpointHistory))
	s.handle(mux, "GET /v1/jobs/{id}/lag", roleRead, read, http.HandlerFunc(s.handleLag))
	s.handle(mux, "GET /v1/jobs/{id}/state", roleRead, routeOpts{fsmRead: true, writeFor: stateWriteTimeout}, http.HandlerFunc(s.handleState))
	s.handle(mux, "GET /v1/jobs/{id}/state/export", roleRead, read, http.HandlerFunc(s.handleStateExport))
	s.handle(mux, "POST /v1/jobs/{id}/savepoints", roleWrite, long, s.leaderOnly(s.handleTakeSavepoint))
	s.handle(mux, "GET /v1/jobs/{id}/transactions", roleRead, read, http.HandlerFunc(s.handleTransactions))
	s.handle(mux, "POST /v1/jobs/{id}/transactions/abort", roleWrite, write, s.leaderOnly(s.handleTransactions))
	s.handle(mux, "GET /v1/savepoints", roleRead, read, http.HandlerFunc(s.handleListSavepoints))
	s.handle(mux, "GET /v1/savepoints/{id}", roleRead, read, http.HandlerFunc(s.handleGetSavepoint))
	s.handle(mux, "DELETE /v1/savepoints/{id}", roleWrite, write, s.leaderOnly(s.handleDeleteSavepoint))
	s.handle(mux, "GET /v1/raft/peers", roleRead, routeOpts{}, http.HandlerFunc(s.handleRaftPeers))
	s.handle(mux, "POST /v1/raft/peers", roleOperator, routeOpts{maxBody: maxAddPeerBody, write: true}, s.leaderOnly(s.handleAddPeer))
	s.handle(mux, "DELETE /v1/raft/peers/{id}", roleOperator, write, s.leaderOnly(s.handleRemovePeer))
	s.handle(mux, "GET /v1/fsm/digest", roleRead, read, http.HandlerFunc(s.handleDigest))
	s.handle(mux, "GET /metrics", roleRead, routeOpts{}, promhttp.HandlerFor(s.metrics.registry, promhttp.HandlerOpts{}))
	// The dashboard's files are public, as /v1/status is: the page asks for
	// a token when the API needs one.
	s.handle(mux, "GET /ui/", roleNone, routeOpts{}, ui.Handler())
	s.handle(mux, "GET /{$}", roleNone, routeOpts{}, http.RedirectHandler("/ui/", http.StatusFound))
	s.handle(mux, "/", roleRead, routeOpts{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path))
	}))
	s.api.conns.max = s.cfg.HTTPMaxConnsPerClient
	return &http.Server{
		ConnState:         s.api.conns.track(s.metrics),
		Handler:           mux,
		ReadHeaderTimeout: headerTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		IdleTimeout:       time.Minute,
		ErrorLog:          log.New(&levelWriter{logger: s.logger.With("component", "http"), def: slog.LevelDebug, max: slog.LevelWarn}, "", 0),
	}
}

// apiStatus is GET /v1/status.
type apiStatus struct {
	ID             string `json:"id"`
	Version        string `json:"version"`
	State          string `json:"state"` // Leader, Follower, Candidate (Shutdown while stopping)
	Term           uint64 `json:"term"`
	LastIndex      uint64 `json:"last_index"`
	AppliedIndex   uint64 `json:"applied_index"`
	LeaderID       string `json:"leader_id"`
	LeaderHTTPAddr string `json:"leader_http_addr"`
	// LastContactMS is the milliseconds since this node last heard from
	// the leader: 0 on the leader, -1 if never (X-Coordflow-Last-Contact).
	LastContactMS int64 `json:"last_contact_ms"`
	KnownLeader   bool  `json:"known_leader"`
	// CanApply is false when this node cannot apply the Raft log, for
	// ApplyError's reason (its log store failed: a full disk; or the log
	// holds commands it does not know).
	CanApply   bool   `json:"can_apply"`
	ApplyError string `json:"apply_error,omitempty"`
	// ServesReads is false when reads of the FSM need ?stale=true here,
	// for StaleReason's reason (http_guard.go).
	ServesReads bool   `json:"serves_reads"`
	StaleReason string `json:"stale_reason,omitempty"`
}

func (s *Server) handleStatus(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.status())
}

// status is this node's GET /v1/status.
func (s *Server) status() apiStatus {
	id, _, httpAddr := s.leaderInfo()
	c := s.contact()
	stale := s.staleReason(c)
	return apiStatus{
		ID:             s.cfg.ID,
		Version:        s.cfg.Version,
		State:          s.raft.State().String(),
		Term:           s.raft.CurrentTerm(),
		LastIndex:      s.raft.LastIndex(),
		AppliedIndex:   s.raft.AppliedIndex(),
		LeaderID:       id,
		LeaderHTTPAddr: httpAddr,
		LastContactMS:  c.lastContactMS(),
		KnownLeader:    c.knownLeader,
		CanApply:       c.applyProblem == "",
		ApplyError:     c.applyProblem,
		ServesReads:    stale == "",
		StaleReason:    stale,
	}
}

func (s *Server) handleMembers(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.Members())
}

// handleSubmitJob registers a job: the spec is parsed and validated here,
// with this node's operator list, and the id and time are chosen here, so
// the FSM stays deterministic.
//
// A submission with an Idempotency-Key header (as IETF's draft of that name,
// and Stripe's API) may be sent again after an unknown outcome (504, 502, a
// broken connection): the FSM registers one job per key while that job is
// kept, and a submission whose key is a job's is answered 200 with that job
// if it has the same spec and savepoint, 409 if not. The job's id stays the
// coordinator's choice, so no id is ever used twice.
func (s *Server) handleSubmitJob(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxSpecBytes))
	if err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("job spec exceeds %d bytes", tooBig.Limit))
		case isTimeout(err):
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusRequestTimeout, fmt.Sprintf("job spec not received within %v", bodyTimeout))
		default:
			writeError(w, http.StatusBadRequest, fmt.Sprintf("read job spec: %v", err))
		}
		return
	}
	spec, err := fsm.ParseJobSpec(body, s.knownOperator())
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	submitted := spec
	ref := r.URL.Query().Get("from_savepoint")
	key, err := submissionKey(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	// A submission sent again is answered before the checks of a new one:
	// what they look at (the coordinators' levels, the savepoint) may have
	// changed since its job was registered.
	if key != "" {
		if j, ok := s.fsm.JobBySubmissionKey(key); ok {
			setIndexHeader(w, s.raft.AppliedIndex()) // a follower's answer waits for it
			s.answerResubmission(w, j, submitted, ref)
			return
		}
	}
	if err := s.coordinatorsSupport(spec); err != nil {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	if spec.Checkpoint.Storage == "" {
		// The cluster default, fixed into the spec now so that every later
		// leader uses the storage the job started with.
		spec.Checkpoint.Storage = s.cfg.CheckpointStorage
		if err := fsm.StoragePrefixProblem(spec.Checkpoint.Storage); err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("checkpoint.storage is left out, and the cluster default (coordd's -checkpoint-storage) will not do for a new job: %v; name a storage in the spec", err))
			return
		}
	}
	if key != "" {
		// Once the log holds a key, no coordinator below the level joins
		// (neededFeatureLevel): the mark alone opens the way, also while
		// the gate is closed for a coordinator gossip does not show.
		if !s.fsm.SubmissionKeys() && !s.keys.allow() {
			old, _ := s.coordinatorsBelow(SubmissionKeyLevel)
			writeError(w, http.StatusConflict, fmt.Sprintf("%s needs every coordinator at feature level %d or newer (this build: %d); older: %s; upgrade them first, or submit without the header (docs/operations.md, Feature levels)",
				SubmissionKeyHeader, SubmissionKeyLevel, transport.FeatureLevel, named(old)))
			return
		}
	}
	var from *fsm.Savepoint
	var settled func(error)
	if ref != "" {
		if from, err = s.resolveSavepoint(r.Context(), ref); err != nil {
			writeError(w, http.StatusBadRequest, "from_savepoint: "+err.Error())
			return
		}
		var exists func() bool
		if from.ID == ref {
			exists = func() bool {
				_, ok := s.fsm.Savepoint(from.ID)
				return ok
			}
		}
		end, err := s.api.savepoints.beginRestore(from.ID, exists)
		if err != nil {
			writeError(w, http.StatusConflict, "from_savepoint: "+err.Error())
			return
		}
		if exists == nil {
			// By its URL: a deletion may have run whole between the first
			// read and beginRestore; none can start now, so a second read
			// that finds the savepoint finds it kept.
			if _, err := s.resolveSavepoint(r.Context(), ref); err != nil {
				end()
				writeError(w, http.StatusBadRequest, "from_savepoint: "+err.Error())
				return
			}
		}
		settled = func(error) { end() }
	}
	id := fmt.Sprintf("%s-%08x", spec.Name, rand.Uint32())
	cmd := fsm.RegisterJobCmd{ID: id, Spec: spec, Time: time.Now().UnixNano(), FromSavepoint: from, SubmissionKey: key}
	_, index, err := s.raftApplySettled(r.Context(), fsm.CommandRegisterJob, cmd, settled)
	setIndexHeader(w, index)
	if err != nil {
		// The same submission sent twice at once, or again to a leader
		// that had not applied the first yet: the log registered the
		// first, and the FSM refused this one.
		if key != "" && errors.Is(err, fsm.ErrDuplicateSubmission) {
			if j, ok := s.fsm.JobBySubmissionKey(key); ok {
				s.answerResubmission(w, j, submitted, ref)
				return
			}
		}
		s.writeApplyError(w, err)
		return
	}
	if s.cfg.Failpoint != nil {
		s.cfg.Failpoint("leader-after-register-job") // registered, not answered
	}
	s.logger.Info("job submitted", "job", id, "operator", spec.Operator.Name, "topic", spec.Source.Topic)
	writeJSON(w, http.StatusCreated, map[string]string{"id": id})
}

// SubmissionKeyHeader carries a job submission's idempotency key.
const SubmissionKeyHeader = "Idempotency-Key"

// submissionKey returns the request's Idempotency-Key ("" if none), or an
// error naming what is wrong with it.
func submissionKey(r *http.Request) (string, error) {
	vals := r.Header.Values(SubmissionKeyHeader)
	switch {
	case len(vals) == 0:
		return "", nil
	case len(vals) > 1:
		return "", fmt.Errorf("%s given %d times: want one", SubmissionKeyHeader, len(vals))
	}
	if err := fsm.ValidSubmissionKey(vals[0]); err != nil {
		return "", fmt.Errorf("%s: %w", SubmissionKeyHeader, err)
	}
	return vals[0], nil
}

// answerResubmission answers a submission whose key job j was registered
// with: 200 with the job's id and status if j was submitted with the same
// spec and savepoint (the same submission, sent again), 409 otherwise.
func (s *Server) answerResubmission(w http.ResponseWriter, j fsm.Job, spec fsm.JobSpec, ref string) {
	if err := sameSubmission(j, spec, ref); err != nil {
		writeError(w, http.StatusConflict, fmt.Sprintf("%s %q is job %s's, which was submitted with %v: a key names one submission; send this one with a new key", SubmissionKeyHeader, j.SubmissionKey, j.ID, err))
		return
	}
	s.logger.Info("job submission sent again: answered with its job", "job", j.ID, "status", j.Status)
	writeJSON(w, http.StatusOK, map[string]string{"id": j.ID, "status": string(j.Status)})
}

// sameSubmission returns nil if job j was submitted with spec, as the
// client sent it, and the savepoint ref names (an id or a URL, "" for
// none), and otherwise what differs. A spec without a storage takes the
// job's: it was given the default of the leader that registered it, which
// may not be this one's.
func sameSubmission(j fsm.Job, spec fsm.JobSpec, ref string) error {
	if spec.Checkpoint.Storage == "" {
		spec.Checkpoint.Storage = j.Spec.Checkpoint.Storage
	}
	was, err := json.Marshal(j.Spec)
	if err != nil {
		return fmt.Errorf("a spec that cannot be compared: %w", err)
	}
	now, err := json.Marshal(spec)
	if err != nil {
		return fmt.Errorf("a spec that cannot be compared: %w", err)
	}
	if !bytes.Equal(was, now) {
		return errors.New("another spec")
	}
	switch sp := j.FromSavepoint; {
	case sp == nil && ref != "":
		return errors.New("no savepoint")
	case sp != nil && ref == "":
		return fmt.Errorf("savepoint %s", sp.ID)
	case sp != nil && ref != sp.ID && (sp.Location == "" || ref != sp.Location):
		return fmt.Errorf("savepoint %s", sp.ID)
	}
	return nil
}

// knownOperator returns the check ParseJobSpec applies to operator names:
// nil (any name) when the config lists none.
func (s *Server) knownOperator() func(string) bool {
	if len(s.cfg.Operators) == 0 {
		return nil
	}
	return func(name string) bool { return slices.Contains(s.cfg.Operators, name) }
}

func (s *Server) handleCancelJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	job, ok := s.fsm.Job(id)
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no job %q", id))
		return
	}
	q := r.URL.Query()
	var purge, force, savepoint bool
	for _, p := range []struct {
		name string
		v    *bool
	}{{"purge", &purge}, {"force", &force}, {"savepoint", &savepoint}} {
		var err error
		if *p.v, err = queryBool(q, p.name); err != nil {
			// A cancel that ignored savepoint=yes would stop the job
			// without the savepoint its user asked for.
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
	}
	wait, err := purgeWaitParam(q)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	switch {
	case force && !purge:
		writeError(w, http.StatusBadRequest, "force=true goes with purge=true only")
		return
	case q.Has("wait") && !purge:
		writeError(w, http.StatusBadRequest, "wait goes with purge=true only")
		return
	case job.Status == fsm.JobCancelled && !purge:
		writeError(w, http.StatusConflict, fmt.Sprintf("job %s is already cancelled", id))
		return
	case savepoint && purge:
		writeError(w, http.StatusBadRequest, "savepoint=true and purge=true together: stop the job with a savepoint first, then purge it (its savepoints stay)")
		return
	case savepoint:
		s.stopWithSavepoint(w, r, job)
		return
	}
	if job.Status != fsm.JobCancelled {
		cmd := fsm.JobCancelledCmd{JobID: id, Reason: "cancelled by user", Time: time.Now().UnixNano()}
		_, index, err := s.raftApplyAt(r.Context(), fsm.CommandJobCancelled, cmd)
		setIndexHeader(w, index)
		switch {
		case purge && errors.Is(err, fsm.ErrJobCancelled):
			// Cancelled meanwhile (another cancel, a final savepoint):
			// what this request asks for is still to purge it.
		case err != nil:
			s.writeApplyError(w, err)
			return
		default:
			s.logger.Info("job cancelled", "job", id, "attempt", job.Attempt)
		}
	}
	if purge {
		s.purgeJob(w, r, id, force, wait)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"id": id, "status": string(fsm.JobCancelled)})
}

// purgeWait bounds how long DELETE /v1/jobs/{id}?purge=true waits for the
// purge before it answers that the purge is pending: the job's tasks may
// take their stop timeout, or a lost worker its lease, to stop. ?wait=D
// (Consul's blocking-query parameter) sets another bound, up to
// maxPurgeWait: with the cancel's Raft write before it, that stays under
// how long a follower forwarding the request waits for the leader's answer
// (forwardTransport), and under the route's write deadline.
const (
	purgeWait    = 30 * time.Second
	maxPurgeWait = 5 * time.Minute
)

// purgeWaitParam returns the purge's wait bound: purgeWait, or the wait
// query parameter, a Go duration from 1ms to maxPurgeWait.
func purgeWaitParam(q url.Values) (time.Duration, error) {
	if !q.Has("wait") {
		return purgeWait, nil
	}
	v := q.Get("wait")
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Millisecond || d > maxPurgeWait {
		return 0, fmt.Errorf("query parameter wait=%q: want a duration from 1ms to %v, such as 30s or 2m", v, maxPurgeWait)
	}
	return d, nil
}

// purgeJob asks the leader loop to purge cancelled job id now and answers
// with the outcome: 200 once purged; 202 while it waits (for the job's
// tasks to stop, its files to be deleted, a coordinator that cannot apply
// the purge, or longer than wait), the leader going on with it; 404 for a
// job gone already; 409 for a job that cannot be purged; 503 when
// leadership was lost, which ends the request. With force, files that
// cannot be deleted do not hold the purge up.
func (s *Server) purgeJob(w http.ResponseWriter, r *http.Request, id string, force bool, wait time.Duration) {
	l := s.currentLeader()
	if l == nil {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("purge job %s: %v", id, ErrNotLeader))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	req := purgeRequest{jobID: id, force: force, reply: make(chan purgeReply, 1)}
	if !l.post(ctx, req) {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("purge job %s: the leader loop did not take the request within the wait of %v", id, wait))
		return
	}
	answer := func(rep purgeReply) {
		code, body := purgeAnswer(id, rep)
		if code == http.StatusOK {
			s.setAppliedIndexHeader(w) // covers JobPurged: a forwarding follower waits for it
		}
		writeJSON(w, code, body)
	}
	select {
	case rep := <-req.reply:
		answer(rep)
		return
	case <-l.ctx.Done():
	case <-ctx.Done():
	}
	// An answer that came with the term's end or the deadline wins.
	select {
	case rep := <-req.reply:
		answer(rep)
	default:
		switch {
		case l.ctx.Err() != nil:
			answer(purgeReply{err: raft.ErrLeadershipLost})
		case r.Context().Err() != nil:
			// The client went away; the purge goes on.
		default:
			code, body := purgePending(id, fmt.Sprintf("not purged within %v: waiting for its tasks to stop or its files to be deleted", wait))
			writeJSON(w, code, body)
		}
	}
}

// purgeAnswer is the HTTP status and body that answer a purge request with
// the leader's reply.
func purgeAnswer(id string, rep purgeReply) (int, any) {
	fail := func(code int, msg string) (int, any) { return code, map[string]string{"error": msg} }
	switch {
	case errors.Is(rep.err, fsm.ErrNoSuchJob):
		return fail(http.StatusNotFound, fmt.Sprintf("no job %q", id))
	case errors.Is(rep.err, errPurgeState):
		return fail(http.StatusConflict, rep.err.Error())
	case errors.Is(rep.err, ErrNotLeader), errors.Is(rep.err, raft.ErrLeadershipLost), errors.Is(rep.err, raft.ErrRaftShutdown):
		// The request ended with the term: nobody goes on with it.
		return fail(http.StatusServiceUnavailable, fmt.Sprintf("job %s is cancelled, but leadership was lost before its purge; ask again: %v", id, rep.err))
	case rep.err != nil:
		return purgePending(id, rep.err.Error()+"; the leader tries again")
	}
	out := map[string]any{"id": id, "status": "purged", "files_deleted": rep.filesDeleted}
	if rep.filesLeft != nil {
		out["files_left"] = "some of the job's checkpoint files could not be deleted and stay in its storage: " + rep.filesLeft.Error()
	}
	return http.StatusOK, out
}

// purgePending is the answer to a purge request the leader goes on with:
// 202, and why the job is not purged yet.
func purgePending(id, why string) (int, any) {
	return http.StatusAccepted, map[string]string{"id": id, "status": string(fsm.JobCancelled), "purge": "pending", "reason": why}
}

// setIndexHeader tells a forwarding follower which Raft index to wait for
// before it answers, so that a client reads its own write on that follower.
func setIndexHeader(w http.ResponseWriter, index uint64) {
	if index > 0 {
		w.Header().Set(indexHeader, strconv.FormatUint(index, 10))
	}
}

// writeApplyError answers a failed raftApplyAt with the status its cause
// calls for. A write that was not appended (no leader, a full queue, a
// shutdown) is 503: sending it again is safe. One whose outcome is unknown
// (leadership lost after it was appended, no result within the wait) is
// 504, saying so: it may still commit, and a client that sends it again
// may, say, register the job twice.
func (s *Server) writeApplyError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	msg := err.Error()
	switch {
	case errors.Is(err, fsm.ErrNoSuchJob), errors.Is(err, fsm.ErrNoSuchSavepoint):
		status = http.StatusNotFound
	case errors.Is(err, fsm.ErrJobCancelled), errors.Is(err, fsm.ErrJobExists), errors.Is(err, fsm.ErrDuplicateSubmission):
		status = http.StatusConflict
	case errors.Is(err, fsm.ErrInvalidSpec), errors.Is(err, fsm.ErrMalformedCommand):
		status = http.StatusBadRequest
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, context.DeadlineExceeded):
		status = http.StatusGatewayTimeout
		msg = "outcome unknown: the write may still be applied; read the state (GET /v1/jobs) before sending it again: " + msg
	case errors.Is(err, ErrNotLeader), errors.Is(err, raft.ErrEnqueueTimeout), errors.Is(err, raft.ErrRaftShutdown),
		errors.Is(err, errCommitterStopped):
		status = http.StatusServiceUnavailable
	case errors.Is(err, context.Canceled):
		return // the client went away
	}
	if status >= http.StatusInternalServerError {
		s.logger.Warn("write request failed", "err", err)
	}
	writeError(w, status, msg)
}

// apiJob is one job as GET /v1/jobs and /v1/jobs/{id} show it.
type apiJob struct {
	ID             string            `json:"id"`
	Name           string            `json:"name"`
	Status         fsm.JobStatus     `json:"status"`
	Reason         string            `json:"reason,omitempty"`
	Attempt        uint64            `json:"attempt"`
	Restarts       int               `json:"restarts"`
	Tasks          []apiTask         `json:"tasks"`
	LastCheckpoint *apiCheckpointRef `json:"last_checkpoint"`
	SubmittedAt    string            `json:"submitted_at"`
	UpdatedAt      string            `json:"updated_at"`
	Spec           fsm.JobSpec       `json:"spec"`
	// AttemptStartedAt is when the current attempt was deployed ("" before
	// the first deploy): the job's uptime starts there.
	AttemptStartedAt string `json:"attempt_started_at"`
	// Attempts are the most recent attempts, newest first, with the reason
	// each was started (fsm.MaxAttemptHistory).
	Attempts []apiAttempt `json:"attempts"`
	// Throughput is the rate between the current attempt's last two
	// completed checkpoints; null until it has two.
	Throughput *apiThroughput `json:"throughput"`
	// Recoveries are the most recent recoveries from failures, newest
	// first (fsm.MaxRecoveryHistory).
	Recoveries []apiRecovery `json:"recoveries"`
}

// apiRecovery is one recovery of a job: task-scoped (only the lost
// workers' tasks restored) or job-scoped (every task restarted).
type apiRecovery struct {
	Attempt      uint64   `json:"attempt"`
	Scope        string   `json:"scope"`
	Tasks        []string `json:"tasks"`
	Reason       string   `json:"reason"`
	DetectedAt   string   `json:"detected_at,omitempty"`
	StartedAt    string   `json:"started_at"`
	RestoredFrom uint64   `json:"restored_from,omitempty"`
	// CheckpointID and CheckpointedAt are the first checkpoint completed
	// after the recovery (absent until then); ToCheckpointMS is the time
	// from the failure's detection (or the recovery's start) to it.
	CheckpointID   uint64   `json:"checkpoint_id,omitempty"`
	CheckpointedAt string   `json:"checkpointed_at,omitempty"`
	ToCheckpointMS *float64 `json:"to_checkpoint_ms,omitempty"`
}

func newAPIRecovery(r fsm.RecoveryRecord) apiRecovery {
	v := apiRecovery{
		Attempt: r.Attempt, Scope: r.Scope, Tasks: slices.Clone(r.Tasks), Reason: r.Reason,
		DetectedAt: formatTime(r.DetectedAt), StartedAt: formatTime(r.StartedAt), RestoredFrom: r.RestoredFrom,
		CheckpointID: r.CheckpointID, CheckpointedAt: formatTime(r.CheckpointedAt),
	}
	if r.CheckpointedAt != 0 {
		ms := float64(r.CheckpointedAt-cmp.Or(r.DetectedAt, r.StartedAt)) / float64(time.Millisecond)
		v.ToCheckpointMS = &ms
	}
	return v
}

// apiAttempt is one attempt of a job.
type apiAttempt struct {
	Attempt      uint64 `json:"attempt"`
	StartedAt    string `json:"started_at"`
	Reason       string `json:"reason"`
	RestoredFrom uint64 `json:"restored_from,omitempty"`
}

// apiThroughput is a job's records per second between two checkpoints: in
// is what its sources read from Kafka, out what its map tasks emitted.
type apiThroughput struct {
	RecordsInPerSecond  float64 `json:"records_in_per_second"`
	RecordsOutPerSecond float64 `json:"records_out_per_second"`
	FromCheckpoint      uint64  `json:"from_checkpoint"`
	ToCheckpoint        uint64  `json:"to_checkpoint"`
}

// throughput computes the rate between the last two completed checkpoints
// of j's current attempt from the record counts in their task states, which
// count from each task's start in the attempt.
func throughput(j fsm.Job) *apiThroughput {
	n := len(j.Completed)
	if n < 2 {
		return nil
	}
	a, b := j.Completed[n-2], j.Completed[n-1]
	secs := float64(b.TriggeredAt-a.TriggeredAt) / float64(time.Second)
	if a.Attempt != j.Attempt || b.Attempt != j.Attempt || secs <= 0 {
		return nil
	}
	count := func(cp fsm.Checkpoint) (in, out int64) {
		for _, st := range cp.Tasks {
			switch st.Kind {
			case fsm.TaskSource:
				in += st.RecordsIn
			case fsm.TaskMap:
				out += st.RecordsOut
			}
		}
		return in, out
	}
	inA, outA := count(a)
	inB, outB := count(b)
	return &apiThroughput{
		RecordsInPerSecond:  float64(max(0, inB-inA)) / secs,
		RecordsOutPerSecond: float64(max(0, outB-outA)) / secs,
		FromCheckpoint:      a.ID,
		ToCheckpoint:        b.ID,
	}
}

// apiTask is one task of a job's current attempt. Attempt and StartedAt
// are the task's own: a task-scoped recovery changes them only for the
// tasks it restored.
type apiTask struct {
	ID         string             `json:"id"`
	Kind       fsm.TaskKind       `json:"kind"`
	Worker     string             `json:"worker"`
	Partitions []int32            `json:"partitions,omitempty"`
	KeyGroups  *fsm.KeyGroupRange `json:"key_groups,omitempty"`
	Attempt    uint64             `json:"attempt"`
	StartedAt  string             `json:"started_at,omitempty"`
}

// apiCheckpointRef names a job's newest completed checkpoint.
type apiCheckpointRef struct {
	ID          uint64 `json:"id"`
	CompletedAt string `json:"completed_at"`
}

func newAPIJob(j fsm.Job) apiJob {
	v := apiJob{
		ID:          j.ID,
		Name:        j.Spec.Name,
		Status:      j.Status,
		Reason:      j.Reason,
		Attempt:     j.Attempt,
		Restarts:    j.Restarts,
		Tasks:       make([]apiTask, 0, len(j.Tasks)),
		SubmittedAt: formatTime(j.SubmittedAt),
		UpdatedAt:   formatTime(j.UpdatedAt),
		Spec:        j.Spec,
		Attempts:    make([]apiAttempt, 0, len(j.Attempts)),
		Throughput:  throughput(j),
	}
	for _, a := range slices.Backward(j.Attempts) {
		v.Attempts = append(v.Attempts, apiAttempt{Attempt: a.Attempt, StartedAt: formatTime(a.StartedAt), Reason: a.Reason, RestoredFrom: a.RestoredFrom})
		if a.Attempt == j.Attempt {
			v.AttemptStartedAt = formatTime(a.StartedAt)
		}
	}
	for _, t := range j.Tasks {
		v.Tasks = append(v.Tasks, apiTask{ID: t.ID, Kind: t.Kind, Worker: t.Worker, Partitions: t.Partitions, KeyGroups: t.KeyGroups,
			Attempt: j.TaskAttempt(t), StartedAt: formatTime(t.StartedAt)})
	}
	v.Recoveries = make([]apiRecovery, 0, len(j.Recoveries))
	for _, r := range slices.Backward(j.Recoveries) {
		v.Recoveries = append(v.Recoveries, newAPIRecovery(r))
	}
	if n := len(j.Completed); n > 0 {
		cp := j.Completed[n-1]
		v.LastCheckpoint = &apiCheckpointRef{ID: cp.ID, CompletedAt: formatTime(cp.EndedAt)}
	}
	return v
}

func (s *Server) handleListJobs(w http.ResponseWriter, _ *http.Request) {
	jobs := s.fsm.Jobs()
	views := make([]apiJob, 0, len(jobs))
	for _, j := range jobs {
		views = append(views, newAPIJob(j))
	}
	writeJSON(w, http.StatusOK, views)
}

// lookupJob looks up the job named in the path, answering 404 if there is none.
func (s *Server) lookupJob(w http.ResponseWriter, r *http.Request) (fsm.Job, bool) {
	id := r.PathValue("id")
	j, ok := s.fsm.Job(id)
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no job %q", id))
	}
	return j, ok
}

func (s *Server) handleGetJob(w http.ResponseWriter, r *http.Request) {
	if j, ok := s.lookupJob(w, r); ok {
		writeJSON(w, http.StatusOK, newAPIJob(j))
	}
}

// apiCheckpoint is one checkpoint in GET /v1/jobs/{id}/checkpoints.
type apiCheckpoint struct {
	ID          uint64               `json:"id"`
	Attempt     uint64               `json:"attempt"`
	Status      fsm.CheckpointStatus `json:"status"`
	TriggerTime string               `json:"trigger_time"`
	EndTime     string               `json:"end_time,omitempty"`
	// DurationMS is trigger to completion or abort; absent while pending.
	DurationMS *float64            `json:"duration_ms,omitempty"`
	Reason     string              `json:"reason,omitempty"`
	Tasks      []apiCheckpointTask `json:"tasks"`
}

// apiCheckpointTask is one task's acknowledgement of a checkpoint.
type apiCheckpointTask struct {
	ID      string       `json:"id"`
	Kind    fsm.TaskKind `json:"kind"`
	Worker  string       `json:"worker"`
	AckTime string       `json:"ack_time"`
	// StateSize is the bytes a map task's snapshot wrote: its inline state,
	// or its new files in checkpoint storage (0 for sources).
	StateSize int64 `json:"state_size"`
	// Keys is the number of keys in a map task's state; Files the number of
	// state files its snapshot references.
	Keys  int64 `json:"keys,omitempty"`
	Files int   `json:"files,omitempty"`
	// AlignmentMS is a map task's barrier alignment: from the first to the
	// last of the checkpoint's barriers at the task.
	AlignmentMS *float64 `json:"alignment_ms,omitempty"`
	// Offsets are a source task's next offsets, keyed "topic/partition".
	Offsets map[string]int64 `json:"offsets,omitempty"`
	// RecordsIn and RecordsOut are what the task took in and sent on from
	// its start in the attempt to this checkpoint.
	RecordsIn  int64 `json:"records_in"`
	RecordsOut int64 `json:"records_out"`
}

func newAPICheckpoint(topic string, cp fsm.Checkpoint) apiCheckpoint {
	v := apiCheckpoint{
		ID:          cp.ID,
		Attempt:     cp.Attempt,
		Status:      cp.Status,
		TriggerTime: formatTime(cp.TriggeredAt),
		EndTime:     formatTime(cp.EndedAt),
		Reason:      cp.Reason,
		Tasks:       make([]apiCheckpointTask, 0, len(cp.Tasks)),
	}
	if cp.EndedAt != 0 {
		ms := float64(cp.EndedAt-cp.TriggeredAt) / float64(time.Millisecond)
		v.DurationMS = &ms
	}
	for _, id := range slices.Sorted(maps.Keys(cp.Tasks)) {
		st := cp.Tasks[id]
		tv := apiCheckpointTask{ID: id, Kind: st.Kind, Worker: st.Worker, AckTime: formatTime(st.AckedAt),
			StateSize: st.StateBytes, Keys: st.Keys, Files: len(st.Files), RecordsIn: st.RecordsIn, RecordsOut: st.RecordsOut}
		if tv.StateSize == 0 {
			tv.StateSize = int64(len(st.Keyed))
		}
		if st.Kind == fsm.TaskMap {
			ms := float64(st.AlignmentMicros) / 1000
			tv.AlignmentMS = &ms
		}
		if len(st.Offsets) > 0 {
			tv.Offsets = make(map[string]int64, len(st.Offsets))
			for p, off := range st.Offsets {
				tv.Offsets[partitionKey(topic, p)] = off
			}
		}
		v.Tasks = append(v.Tasks, tv)
	}
	return v
}

// handleCheckpoints lists a job's pending, retained completed and recent
// aborted checkpoints, newest first.
func (s *Server) handleCheckpoints(w http.ResponseWriter, r *http.Request) {
	j, ok := s.lookupJob(w, r)
	if !ok {
		return
	}
	all := slices.Concat(j.Completed, j.Aborted)
	if j.Pending != nil {
		all = append(all, *j.Pending)
	}
	slices.SortFunc(all, func(a, b fsm.Checkpoint) int { return cmp.Compare(b.ID, a.ID) })
	views := make([]apiCheckpoint, 0, len(all))
	for _, cp := range all {
		views = append(views, newAPICheckpoint(j.Spec.Source.Topic, cp))
	}
	writeJSON(w, http.StatusOK, views)
}

// apiPeer is one server of the Raft configuration.
type apiPeer struct {
	ID       string `json:"id"`
	Address  string `json:"address"`
	Suffrage string `json:"suffrage"` // voter, nonvoter, staging
	Leader   bool   `json:"leader"`
}

func (s *Server) handleRaftPeers(w http.ResponseWriter, _ *http.Request) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("raft configuration: %v", err))
		return
	}
	_, leader := s.raft.LeaderWithID()
	servers := make([]apiPeer, 0, len(f.Configuration().Servers))
	for _, srv := range f.Configuration().Servers {
		servers = append(servers, apiPeer{
			ID:       string(srv.ID),
			Address:  string(srv.Address),
			Suffrage: suffrageName(srv.Suffrage),
			Leader:   srv.ID == leader,
		})
	}
	slices.SortFunc(servers, func(a, b apiPeer) int { return cmp.Compare(a.ID, b.ID) })
	writeJSON(w, http.StatusOK, map[string]any{"servers": servers})
}

// handleRemovePeer removes a coordinator from the Raft configuration: the
// way to retire a coordinator that is gone for good, so that it no longer
// counts toward the quorum. It refuses to remove the leader itself (stop it
// first: a stopping leader hands leadership over) and a coordinator that
// gossip shows alive (the leader would add it back at once).
func (s *Server) handleRemovePeer(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("raft configuration: %v", err))
		return
	}
	var ids []string
	found := false
	for _, srv := range f.Configuration().Servers {
		ids = append(ids, string(srv.ID))
		found = found || string(srv.ID) == id
	}
	slices.Sort(ids)
	switch {
	case !found:
		writeError(w, http.StatusNotFound, fmt.Sprintf("no raft peer %q (peers: %s)", id, strings.Join(ids, ", ")))
		return
	case id == s.cfg.ID:
		writeError(w, http.StatusConflict, fmt.Sprintf("%s is the raft leader and cannot remove itself: stop it first "+
			"(a stopping coordinator hands leadership to another voter), then remove it through any other coordinator", id))
		return
	}
	for _, m := range s.Members() {
		if m.ID == id && m.Role == transport.RoleCoordinator && m.Status == StatusAlive {
			writeError(w, http.StatusConflict, fmt.Sprintf("coordinator %s is alive in gossip: stop it first, then remove it "+
				"(with TLS the leader would add it back as soon as it proves its certificate)", id))
			return
		}
	}
	future := s.raft.RemoveServer(raft.ServerID(id), f.Index(), membershipChangeTimeout)
	if err := future.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			err = fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		s.writeApplyError(w, fmt.Errorf("remove raft peer %s: %w", id, err))
		return
	}
	// No index header: a configuration entry never reaches the FSM, so a
	// forwarding follower has nothing to wait for (its configuration view
	// already holds the change once the entry is in its log).
	s.logger.Info("removed coordinator from the raft configuration", "member", id, "index", future.Index())
	writeJSON(w, http.StatusOK, map[string]any{"id": id, "removed": true})
}

func suffrageName(sf raft.ServerSuffrage) string {
	switch sf {
	case raft.Voter:
		return "voter"
	case raft.Nonvoter:
		return "nonvoter"
	case raft.Staging:
		return "staging"
	}
	return sf.String()
}

// handleDigest answers the digest of this replica's FSM, for tests and
// operators comparing replicas. It is computed once per applied index, by
// one caller at a time (digestCache).
func (s *Server) handleDigest(w http.ResponseWriter, r *http.Request) {
	d, applied, err := s.digest(r.Context())
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return // the client went away
		}
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": s.cfg.ID, "digest": d, "applied_index": applied})
}

func partitionKey(topic string, p int32) string {
	return topic + "/" + strconv.Itoa(int(p))
}

// formatTime renders unix nanoseconds as RFC 3339 in UTC; 0 is "".
func formatTime(ns int64) string {
	if ns == 0 {
		return ""
	}
	return time.Unix(0, ns).UTC().Format(time.RFC3339Nano)
}

// writeJSON answers v as JSON with the given status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client may have gone; nothing to do
}

// writeError answers {"error": msg} with the given status.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// queryBool reads the boolean query parameter name: absent is false, and a
// value must be one strconv.ParseBool takes. An empty one is refused rather
// than read as true (Consul's bare ?stale): these parameters purge and
// force, and a script's ?purge=$X with X unset must not purge.
func queryBool(q url.Values, name string) (bool, error) {
	if !q.Has(name) {
		return false, nil
	}
	v := q.Get(name)
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("query parameter %s=%q: want true or false", name, v)
	}
	return b, nil
}
