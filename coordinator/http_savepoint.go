package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
)

// maxSavepointWait bounds how long a savepoint request waits for the
// savepoint; the job's checkpoint timeout bounds it first.
const maxSavepointWait = 10 * time.Minute

// apiSavepoint is one savepoint as the API shows it.
type apiSavepoint struct {
	ID           string `json:"id"`
	JobID        string `json:"job_id"`
	JobName      string `json:"job_name"`
	CheckpointID uint64 `json:"checkpoint_id"`
	CreatedAt    string `json:"created_at"`
	// Location is the URL of the savepoint's directory, which
	// `coordd job run -from-savepoint` takes as well as the id.
	Location       string `json:"location,omitempty"`
	Topic          string `json:"topic"`
	Operator       string `json:"operator"`
	MaxParallelism int    `json:"max_parallelism"`
	Tasks          int    `json:"tasks"`
	StateBytes     int64  `json:"state_bytes"`
	Keys           int64  `json:"keys"`
}

func newAPISavepoint(sp fsm.Savepoint) apiSavepoint {
	v := apiSavepoint{
		ID: sp.ID, JobID: sp.JobID, JobName: sp.JobName, CheckpointID: sp.CheckpointID, CreatedAt: formatTime(sp.CreatedAt),
		Location: sp.Location, Topic: sp.Topic, Operator: sp.Operator, MaxParallelism: sp.MaxParallelism, Tasks: len(sp.Tasks),
	}
	for _, st := range sp.Tasks {
		v.StateBytes += st.StateBytes
		v.Keys += st.Keys
	}
	return v
}

// takeSavepoint asks this node's leader loop for a savepoint of job and
// waits for it: for the checkpoint in flight to end and the savepoint to
// complete, each within the job's checkpoint timeout, plus a margin, and
// at most maxSavepointWait.
func (s *Server) takeSavepoint(ctx context.Context, job fsm.Job, stop bool) (fsm.Savepoint, int, error) {
	l := s.currentLeader()
	if l == nil {
		return fsm.Savepoint{}, http.StatusServiceUnavailable, ErrNotLeader
	}
	wait := min(2*time.Duration(job.Spec.Checkpoint.Timeout)+10*time.Second, maxSavepointWait)
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	req := savepointRequest{jobID: job.ID, stop: stop, reply: make(chan savepointReply, 1), ctx: ctx}
	if !l.post(ctx, req) {
		return fsm.Savepoint{}, http.StatusServiceUnavailable, fmt.Errorf("savepoint of job %s: the leader loop did not take the request", job.ID)
	}
	select {
	case rep := <-req.reply:
		switch {
		case errors.Is(rep.err, errSavepointState):
			return rep.sp, http.StatusConflict, rep.err
		case errors.Is(rep.err, errSavepointUnknown):
			return rep.sp, http.StatusGatewayTimeout, rep.err
		case rep.err != nil:
			return rep.sp, http.StatusInternalServerError, rep.err
		}
		// Written here, not by the leader loop (which must not wait for
		// storage), and before the answer: a client may start a job from
		// the savepoint's URL as soon as it has it.
		if err := s.writeMetadata(ctx, rep.sp); err != nil {
			return rep.sp, http.StatusInternalServerError, fmt.Errorf("savepoint %s taken, but its %s could not be written, so it can be started from by id only: %w",
				rep.sp.ID, transport.SavepointMetadata, err)
		}
		return rep.sp, http.StatusOK, nil
	case <-l.ctx.Done():
		// The request reached the leader loop: its savepoint (a stop) may
		// have been triggered, and may yet complete.
		return fsm.Savepoint{}, http.StatusGatewayTimeout, fmt.Errorf("outcome unknown: savepoint of job %s: leadership lost while it was asked for; see GET /v1/savepoints and the job's status before asking again", job.ID)
	case <-ctx.Done():
		return fsm.Savepoint{}, http.StatusGatewayTimeout, fmt.Errorf("savepoint of job %s: not completed within %v; one not started yet is dropped, one started goes on (and, to stop the job, stops it once it completes): see GET /v1/savepoints and the job's status", job.ID, wait)
	}
}

func (s *Server) handleTakeSavepoint(w http.ResponseWriter, r *http.Request) {
	job, ok := s.lookupJob(w, r)
	if !ok {
		return
	}
	sp, status, err := s.takeSavepoint(r.Context(), job, false)
	s.setAppliedIndexHeader(w)
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	writeJSON(w, http.StatusCreated, newAPISavepoint(sp))
}

// stopWithSavepoint answers DELETE /v1/jobs/{id}?savepoint=true: the job
// stops with a final savepoint, and nothing is processed after it.
func (s *Server) stopWithSavepoint(w http.ResponseWriter, r *http.Request, job fsm.Job) {
	sp, status, err := s.takeSavepoint(r.Context(), job, true)
	s.setAppliedIndexHeader(w)
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	s.logger.Info("job stopped with savepoint", "job", job.ID, "savepoint", sp.ID)
	writeJSON(w, http.StatusOK, map[string]any{"id": job.ID, "status": fsm.JobCancelled, "savepoint": newAPISavepoint(sp)})
}

// setAppliedIndexHeader names the index this leader has applied, which
// covers the savepoint's commands (the leader loop commits them before it
// answers): a forwarding follower waits for it, so the client reads its own
// savepoint there.
func (s *Server) setAppliedIndexHeader(w http.ResponseWriter) {
	setIndexHeader(w, s.applied.applied.Load())
}

func (s *Server) handleListSavepoints(w http.ResponseWriter, _ *http.Request) {
	sps := s.fsm.Savepoints()
	out := make([]apiSavepoint, 0, len(sps))
	for _, sp := range sps {
		out = append(out, newAPISavepoint(sp))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleGetSavepoint(w http.ResponseWriter, r *http.Request) {
	sp, ok := s.fsm.Savepoint(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no savepoint %q", r.PathValue("id")))
		return
	}
	writeJSON(w, http.StatusOK, newAPISavepoint(sp))
}

// savepointInUse says which of jobs still needs savepoint id, or nil: a live
// job started from it restores it, at every restart, until it has a
// completed checkpoint of its own.
func savepointInUse(jobs []fsm.Job, id string) error {
	for _, j := range jobs {
		if j.Status != fsm.JobCancelled && j.FromSavepoint != nil && j.FromSavepoint.ID == id && len(j.Completed) == 0 {
			return fmt.Errorf("savepoint %s is the state job %s restores until it has completed a checkpoint of its own: delete it after that, or cancel the job", id, j.ID)
		}
	}
	return nil
}

// handleDeleteSavepoint forgets a savepoint through Raft, then deletes its
// files in the background.
func (s *Server) handleDeleteSavepoint(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	sp, ok := s.fsm.Savepoint(id)
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no savepoint %q", id))
		return
	}
	end, err := s.api.savepoints.beginDelete(id, func() error { return savepointInUse(s.fsm.SharedJobs(), id) })
	if err != nil {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	// The files go once the deletion has committed, also if this client
	// gave up before: the FSM no longer lists them, and nothing else would.
	_, index, err := s.raftApplySettled(r.Context(), fsm.CommandSavepointDeleted, fsm.SavepointDeletedCmd{ID: id, Time: time.Now().UnixNano()}, func(err error) {
		if err != nil {
			end()
			return
		}
		s.deleteSavepointFiles(sp, end)
	})
	setIndexHeader(w, index)
	if err != nil {
		s.writeApplyError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"id": id, "status": "deleted"})
}

// savepointUses tracks the savepoint writes in flight on this leader, which
// the FSM does not show yet: registrations of jobs started from a
// savepoint, and deletions until their files are gone. A deletion checks
// from the FSM that no job needs the savepoint, and a registration resolves
// its savepoint before its command commits; a command in flight (one whose
// client gave up stays in the committer, and may commit) escapes the
// other's check, and a job would restore files that are being deleted.
// A new leader starts empty: its predecessor's commands are in its FSM once
// its Barrier has passed, before it takes a write (leaderOnly). Not so the
// predecessor's deletion of files, which may go on for a while: a job
// started then from the savepoint's URL (by id, the FSM no longer has it)
// is not refused, and would find files missing.
type savepointUses struct {
	mu       sync.Mutex
	restores map[string]int      // registrations in flight, by savepoint id
	deletes  map[string]struct{} // deletions in flight, by savepoint id
}

// beginRestore records a registration from savepoint id in flight until
// end is called, unless the savepoint is being deleted or, when it was
// named by its id (exists not nil; nil: by its URL), exists no more.
func (u *savepointUses) beginRestore(id string, exists func() bool) (end func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if _, ok := u.deletes[id]; ok {
		return nil, fmt.Errorf("savepoint %s is being deleted", id)
	}
	if exists != nil && !exists() {
		return nil, fmt.Errorf("savepoint %s was deleted", id)
	}
	if u.restores == nil {
		u.restores = make(map[string]int)
	}
	u.restores[id]++
	return func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		if u.restores[id]--; u.restores[id] <= 0 {
			delete(u.restores, id)
		}
	}, nil
}

// beginDelete records the deletion of savepoint id in flight until end is
// called, unless a job needs it: a registration in flight, or one of the
// FSM's jobs (inUse, read under the same lock as the registrations).
func (u *savepointUses) beginDelete(id string, inUse func() error) (end func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if n := u.restores[id]; n > 0 {
		return nil, fmt.Errorf("savepoint %s is the state of %d job registrations in flight: delete it once the jobs have completed checkpoints of their own", id, n)
	}
	if _, ok := u.deletes[id]; ok {
		return nil, fmt.Errorf("savepoint %s is being deleted already", id)
	}
	if err := inUse(); err != nil {
		return nil, err
	}
	if u.deletes == nil {
		u.deletes = make(map[string]struct{})
	}
	u.deletes[id] = struct{}{}
	return func() {
		u.mu.Lock()
		defer u.mu.Unlock()
		delete(u.deletes, id)
	}, nil
}
