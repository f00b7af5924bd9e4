package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/coordflow/coordflow/fsm"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
)

// Savepoints, as in Flink: a checkpoint taken on request whose map tasks
// write full, self-contained snapshots into the savepoint's own directory,
// kept until deleted. The leader loop triggers it like a checkpoint (the
// next one, without waiting for the interval) and answers the request once
// it is completed or aborted. Stop-with-savepoint also stops the sources at
// the barrier and cancels the job with the same Raft command that records
// the savepoint; if it fails, the job restarts from its last checkpoint.

// savepointRequest asks the leader loop for a savepoint of a job.
type savepointRequest struct {
	jobID string
	stop  bool
	reply chan savepointReply // buffered 1
	// ctx is the request's: once it has ended (the client gave up or went
	// away), a request still waiting for its job's checkpoint slot is
	// dropped rather than triggered. nil: it never ends.
	ctx context.Context
}

// abandoned reports whether r's client no longer waits for it.
func (r savepointRequest) abandoned() bool { return r.ctx != nil && r.ctx.Err() != nil }

// savepointReply is the outcome of a savepoint request.
type savepointReply struct {
	sp  fsm.Savepoint
	err error
}

func (savepointRequest) leaderEvent() {}

// errSavepointState is a savepoint request the job's state refuses.
var errSavepointState = errors.New("job cannot take a savepoint")

// errSavepointUnknown answers a savepoint whose outcome this leader cannot
// tell: the job moved on while it was pending, or its abort did not
// commit (a stop's completion may yet commit behind a leader change).
var errSavepointUnknown = errors.New("outcome unknown")

// dropPending forgets js's pending checkpoint, which this loop no longer
// tracks (the job restarted or was cancelled, a recovery aborts it), and
// answers a savepoint's requests with why:
// they would otherwise wait out their timeout for an answer that never
// comes.
func (l *leader) dropPending(js *jobState, why string) {
	p := js.ckpt.pending
	js.ckpt.pending = nil
	if p != nil && p.savepoint {
		answerSavepoint(p, savepointReply{err: fmt.Errorf("%w: savepoint %d of job %s: %s; see GET /v1/savepoints and the job's status", errSavepointUnknown, p.id, js.id, why)})
	}
}

// onSavepointRequest queues a request until the job's next checkpoint slot.
func (l *leader) onSavepointRequest(r savepointRequest) {
	js := l.jobs[r.jobID]
	if js == nil || js.status != fsm.JobRunning {
		status := "unknown"
		if js != nil {
			status = string(js.status)
		}
		r.reply <- savepointReply{err: fmt.Errorf("%w: job %s is %s, not running", errSavepointState, r.jobID, status)}
		return
	}
	js.savepoints = append(js.savepoints, r)
	l.touchCheckpoint(js)
}

// wantsSavepoint reports whether js has savepoint requests waiting, and
// whether one of them stops the job. Requests whose clients have given up
// are dropped first: a client told that its stop-with-savepoint did not
// complete must not find its job stopped later.
func (js *jobState) wantsSavepoint() (want, stop bool) {
	js.savepoints = slices.DeleteFunc(js.savepoints, savepointRequest.abandoned)
	for _, r := range js.savepoints {
		stop = stop || r.stop
	}
	return len(js.savepoints) > 0, stop
}

// answerSavepoint answers every request the pending checkpoint p carries.
func answerSavepoint(p *pendingCheckpoint, rep savepointReply) {
	for _, r := range p.savepointWaiters {
		r.reply <- rep
	}
	p.savepointWaiters = nil
}

// savepointLocation is the URL of the directory of savepoint id of job in
// storage, or "" without storage (the savepoint's state is then inline).
func savepointLocation(storageURL, job string, id uint64) (string, error) {
	if storageURL == "" {
		return "", nil
	}
	return storage.SubURL(storageURL, transport.SavepointDir(job, id))
}

// relativeStates returns states with every file path made relative to the
// savepoint's directory, so that the savepoint can be read from its URL.
func relativeStates(states map[string]fsm.TaskState, dir string) (map[string]fsm.TaskState, error) {
	out := make(map[string]fsm.TaskState, len(states))
	for id, st := range states {
		st.Files = append([]fsm.StateFile(nil), st.Files...)
		for i, f := range st.Files {
			rel, ok := strings.CutPrefix(f.Path, dir)
			if !ok || rel == "" {
				return nil, fmt.Errorf("task %s wrote savepoint file %s outside %s", id, f.Path, dir)
			}
			st.Files[i].Path = rel
		}
		out[id] = st
	}
	return out, nil
}

// completeSavepoint commits the pending savepoint p of js and answers its
// requests; a refused commit aborts it.
func (l *leader) completeSavepoint(js *jobState, p *pendingCheckpoint) {
	log := l.jobLogger(js).With("checkpoint", p.id)
	location, err := savepointLocation(js.spec.Checkpoint.Storage, js.id, p.id)
	states := p.acks
	if err == nil && location != "" {
		states, err = relativeStates(p.acks, transport.SavepointDir(js.id, p.id))
	}
	if err != nil {
		log.Error("commit savepoint", "err", err)
		l.abortCheckpoint(js, "savepoint commit failed: "+err.Error(), "commit_failed", false)
		return
	}
	l.write(js, fsm.CommandCheckpointCompleted, fsm.CheckpointCompletedCmd{
		JobID: js.id, Attempt: p.attempt, CheckpointID: p.id, States: states, Time: l.env.now().UnixNano(), Location: location,
	}, func(_ any, err error) {
		if js.ckpt.pending != p {
			answerSavepoint(p, savepointReply{err: fmt.Errorf("savepoint %d: the job moved on while it was committed", p.id)})
			return
		}
		if err != nil {
			log.Error("commit savepoint", "err", err)
			l.abortCheckpoint(js, "savepoint commit failed: "+err.Error(), "commit_failed", errors.Is(err, fsm.ErrIncompleteStates))
			return
		}
		js.ckpt.pending = nil
		js.ckpt.lastCompletion = l.env.now()
		js.ckpt.afterSavepoint = !p.stop
		sp, ok := l.env.savepoint(fsm.SavepointID(js.id, p.id))
		if !ok {
			answerSavepoint(p, savepointReply{err: fmt.Errorf("savepoint %d committed but not found", p.id)})
			return
		}
		// A stop's map tasks commit the sink transactions it covers before
		// the job stops (the stream to each worker is ordered); another
		// savepoint's wait for the next checkpoint (notifyCompleted).
		l.notifyCompleted(js, p)
		log.Info("savepoint completed", "savepoint", sp.ID, "stop", p.stop, "location", sp.Location)
		answerSavepoint(p, savepointReply{sp: sp})
	})
}

// abortedSavepoint answers the requests of an aborted savepoint; a failed
// stop-with-savepoint restarts the job, whose sources stopped at the barrier.
// err is the abort's write: one that did not commit leaves the savepoint's
// outcome to the log (a stop's completion may commit behind a leader
// change), and a failed stop's restart to whoever aborts it (stopAborted).
func (l *leader) abortedSavepoint(js *jobState, p *pendingCheckpoint, reason string, err error) {
	if err != nil {
		answerSavepoint(p, savepointReply{err: fmt.Errorf("%w: savepoint %d of job %s: %s, and its abort did not commit: %v; see GET /v1/savepoints and the job's status",
			errSavepointUnknown, p.id, js.id, reason, err)})
		return
	}
	answerSavepoint(p, savepointReply{err: fmt.Errorf("savepoint %d aborted: %s", p.id, reason)})
	if p.stop {
		l.beginRestart(js, "stop with savepoint failed, restarting from the last checkpoint: "+reason, "checkpoint", p.id)
	}
}

// stopAborted returns the aborted stop-with-savepoint of running job whose
// barrier may have stopped sources that still run, or nil. A source stops
// reading at a stop's barrier and waits for the job's end; when the stop is
// aborted instead, only a restart of the whole job (every task in a later
// attempt than the stop's) moves its sources again. The leader that aborts
// it restarts the job at once (abortedSavepoint); this catches what a
// leader change left behind: a stop its predecessor started (aborted as
// untracked), or aborted without writing the restart.
func stopAborted(job fsm.Job) *fsm.Checkpoint {
	for i := len(job.Aborted) - 1; i >= 0; i-- {
		cp := &job.Aborted[i]
		if !cp.Stop {
			continue
		}
		for _, t := range job.Tasks {
			if t.Kind == fsm.TaskSource && job.TaskAttempt(t) <= cp.Attempt {
				return cp
			}
		}
		return nil // every source started after the newest aborted stop
	}
	return nil
}

// savepointMetadata is the document at a savepoint's SavepointMetadata.
type savepointMetadata struct {
	Format    string        `json:"format"`
	Savepoint fsm.Savepoint `json:"savepoint"`
}

const savepointMetadataFormat = "coordflow-savepoint-1"

// writeMetadata writes sp's _metadata into its directory, so that a job can
// be started from the savepoint's URL alone (on another cluster too). A
// savepoint without storage (inline state) has none.
func (s *Server) writeMetadata(ctx context.Context, sp fsm.Savepoint) error {
	if sp.Location == "" {
		return nil
	}
	// Opened for this write alone: the pool keeps stores by URL, and every
	// savepoint has a URL of its own.
	store, err := storage.Open(ctx, sp.Location)
	if err != nil {
		return err
	}
	defer store.Close()
	sp.Location = "" // the reader knows where it read it
	body, err := json.MarshalIndent(savepointMetadata{Format: savepointMetadataFormat, Savepoint: sp}, "", "  ")
	if err != nil {
		return err
	}
	_, err = store.Create(ctx, transport.SavepointMetadata, func(w io.Writer) error {
		_, err := w.Write(body)
		return err
	})
	return err
}

// resolveSavepoint finds the savepoint a job is to start from: the id of a
// savepoint this cluster keeps, or the URL of a savepoint's directory.
func (s *Server) resolveSavepoint(ctx context.Context, ref string) (*fsm.Savepoint, error) {
	if sp, ok := s.fsm.Savepoint(ref); ok {
		return &sp, nil
	}
	if !strings.Contains(ref, "://") {
		return nil, fmt.Errorf("no savepoint %q: give the id of a savepoint in /v1/savepoints or the URL of a savepoint's directory", ref)
	}
	if err := fsm.ValidateStorageURL(ref); err != nil {
		return nil, fmt.Errorf("savepoint URL: %w", err)
	}
	if err := fsm.StoragePrefixProblem(ref); err != nil {
		return nil, fmt.Errorf("savepoint URL: %w", err)
	}
	store, err := storage.Open(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("open savepoint %s: %w", ref, err)
	}
	defer store.Close()
	rc, err := store.Open(ctx, transport.SavepointMetadata)
	if err != nil {
		return nil, fmt.Errorf("read savepoint %s: %w", ref, err)
	}
	defer rc.Close()
	var md savepointMetadata
	if err := json.NewDecoder(io.LimitReader(rc, 64<<20)).Decode(&md); err != nil {
		return nil, fmt.Errorf("savepoint %s: %s: %w", ref, transport.SavepointMetadata, err)
	}
	if md.Format != savepointMetadataFormat || md.Savepoint.ID == "" {
		return nil, fmt.Errorf("savepoint %s: %s is not a coordflow savepoint (format %q)", ref, transport.SavepointMetadata, md.Format)
	}
	sp := md.Savepoint
	sp.Location = ref
	return &sp, nil
}

// deleteSavepointFiles deletes the files of a deleted savepoint, in the
// background, and then calls done.
func (s *Server) deleteSavepointFiles(sp fsm.Savepoint, done func()) {
	if sp.Location == "" {
		done()
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer done()
		ctx, cancel := context.WithTimeout(s.ctx, time.Minute)
		defer cancel()
		store, err := storage.Open(ctx, sp.Location)
		if err == nil {
			defer store.Close()
			var paths []string
			err = store.List(ctx, "", func(p string, _ int64, _ time.Time) error {
				paths = append(paths, p)
				return nil
			})
			if err == nil {
				// Partial files of an upload a killed worker never
				// finished: the savepoint completed without them, and
				// nothing else deletes them.
				err = store.ListPartial(ctx, "", func(p, _ string, _ int64, _ time.Time) error {
					paths = append(paths, p)
					return nil
				})
			}
			for _, p := range paths {
				err = errors.Join(err, store.Delete(ctx, p))
			}
		}
		if err != nil {
			s.logger.Warn("delete savepoint files", "savepoint", sp.ID, "location", sp.Location, "err", err)
		}
	}()
}

// savepointRestore returns the checkpoint a job's first attempts restore
// from when it started from a savepoint and has no checkpoint of its own.
func savepointRestore(sp *fsm.Savepoint) *fsm.Checkpoint {
	return &fsm.Checkpoint{ID: sp.CheckpointID, Status: fsm.CheckpointCompleted, Tasks: maps.Clone(sp.Tasks)}
}
