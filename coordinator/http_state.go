package coordinator

import (
	"bufio"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/coordflow/coordflow/fsm"
)

// maxStateKeys is the most keys GET /v1/jobs/{id}/state puts in one
// document; past it the answer says how many there are and where to look.
const maxStateKeys = 100_000

// errStopRead stops a state read early.
var errStopRead = errors.New("stop")

// apiState is GET /v1/jobs/{id}/state: the job's state as of its last
// completed checkpoint.
type apiState struct {
	CheckpointID uint64 `json:"checkpoint_id"`
	Attempt      uint64 `json:"attempt"`
	CompletedAt  string `json:"completed_at"`
	// Offsets are the next offsets to read, keyed "topic/partition".
	Offsets map[string]int64 `json:"offsets"`
	// Keys is the number of keys in the state.
	Keys int64 `json:"keys"`
	// Keyed is every key's value (see renderValue), merged over the map
	// tasks; keys that are not valid UTF-8 are in KeyedBase64 instead, by
	// their base64. Both are left out when the state has more than
	// maxStateKeys keys, and KeyedOmitted says where to look instead; an
	// empty state has "keyed": {} (the contract shows it always).
	Keyed        map[string]any `json:"keyed,omitzero"`
	KeyedBase64  map[string]any `json:"keyed_base64,omitempty"`
	KeyedOmitted string         `json:"keyed_omitted,omitempty"`
}

// apiKeyState is GET /v1/jobs/{id}/state?key=K: one key's value.
type apiKeyState struct {
	CheckpointID uint64 `json:"checkpoint_id"`
	Found        bool   `json:"found"`
	exportLine
}

// exportLine is one key of GET /v1/jobs/{id}/state/export: the key as a
// string when it is valid UTF-8, else key_base64; the value likewise, or a
// number for int64 state and the JSON value itself for JSON state.
type exportLine struct {
	Key         *string `json:"key,omitempty"`
	KeyBase64   string  `json:"key_base64,omitempty"`
	Value       any     `json:"value,omitempty"`
	ValueBase64 string  `json:"value_base64,omitempty"`
}

func newExportLine(key, value []byte, encoding string) exportLine {
	var l exportLine
	if utf8.Valid(key) {
		k := string(key)
		l.Key = &k
	} else {
		l.KeyBase64 = base64.StdEncoding.EncodeToString(key)
	}
	l.Value, l.ValueBase64 = renderValue(value, encoding)
	return l
}

// renderValue shows a state value by its encoding: int64 as a number, JSON
// as itself, bytes as a string when valid UTF-8. Anything else, or a value
// that does not match its encoding, comes back as base64.
func renderValue(v []byte, encoding string) (any, string) {
	switch encoding {
	case "int64":
		if len(v) == 8 {
			return int64(uint64(v[0])<<56 | uint64(v[1])<<48 | uint64(v[2])<<40 | uint64(v[3])<<32 |
				uint64(v[4])<<24 | uint64(v[5])<<16 | uint64(v[6])<<8 | uint64(v[7])), ""
		}
	case "json":
		if json.Valid(v) {
			return json.RawMessage(v), ""
		}
	default:
		if utf8.Valid(v) {
			return string(v), ""
		}
	}
	return nil, base64.StdEncoding.EncodeToString(v)
}

// mapStates returns the map task states of cp in key-group order.
func mapStates(cp fsm.Checkpoint) []fsm.TaskState {
	var out []fsm.TaskState
	for _, id := range slices.Sorted(maps.Keys(cp.Tasks)) {
		if st := cp.Tasks[id]; st.Kind == fsm.TaskMap {
			out = append(out, st)
		}
	}
	slices.SortStableFunc(out, func(a, b fsm.TaskState) int {
		return cmp.Compare(kgStart(a), kgStart(b))
	})
	return out
}

func kgStart(st fsm.TaskState) int {
	if st.KeyGroups == nil {
		return 0
	}
	return st.KeyGroups.Start
}

// lastCheckpoint finds the job of the request and its last completed
// checkpoint, answering the request itself when either is missing.
func (s *Server) lastCheckpoint(w http.ResponseWriter, r *http.Request) (fsm.Job, fsm.Checkpoint, bool) {
	j, ok := s.lookupJob(w, r)
	if !ok {
		return j, fsm.Checkpoint{}, false
	}
	cp, ok := s.fsm.LastCompleted(j.ID)
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Sprintf("job %s has no completed checkpoint yet", j.ID))
		return j, cp, false
	}
	return j, cp, true
}

func (s *Server) handleState(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Has("key") || q.Has("key_base64") {
		s.handleStateKey(w, r)
		return
	}
	release, ok := s.admitStateRead(w)
	if !ok {
		return
	}
	defer release()
	j, cp, ok := s.lastCheckpoint(w, r)
	if !ok {
		return
	}
	v := apiState{
		CheckpointID: cp.ID,
		Attempt:      cp.Attempt,
		CompletedAt:  formatTime(cp.EndedAt),
		Offsets:      stateOffsets(j, cp),
	}
	states := mapStates(cp)
	for _, st := range states {
		v.Keys += st.Keys
	}
	if v.Keys > maxStateKeys {
		v.KeyedOmitted = fmt.Sprintf("%d keys are too many for one document: ask for one with ?key=K (or ?key_base64=B), or stream them all from /v1/jobs/%s/state/export", v.Keys, j.ID)
		writeJSON(w, http.StatusOK, v)
		return
	}
	v.Keyed = make(map[string]any)
	for _, st := range states {
		err := s.state.read(r.Context(), j.Spec.Checkpoint.Storage, st, 0, int32(j.Spec.Operator.MaxParallelism), func(_ int32, key, value []byte) error {
			l := newExportLine(key, value, st.ValueEncoding)
			val := l.Value
			if l.ValueBase64 != "" {
				val = map[string]string{"value_base64": l.ValueBase64}
			}
			if l.Key != nil {
				v.Keyed[*l.Key] = val
			} else {
				if v.KeyedBase64 == nil {
					v.KeyedBase64 = make(map[string]any)
				}
				v.KeyedBase64[l.KeyBase64] = val
			}
			return nil
		})
		if err != nil {
			s.stateError(w, j, cp, st, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, v)
}

// stateOffsets are the checkpoint's source offsets keyed "topic/partition".
func stateOffsets(j fsm.Job, cp fsm.Checkpoint) map[string]int64 {
	offsets := make(map[string]int64)
	for _, st := range cp.Tasks {
		for p, off := range st.Offsets {
			offsets[partitionKey(j.Spec.Source.Topic, p)] = off
		}
	}
	return offsets
}

func (s *Server) stateError(w http.ResponseWriter, j fsm.Job, cp fsm.Checkpoint, st fsm.TaskState, err error) {
	s.logger.Error("read keyed state of a completed checkpoint", "job", j.ID, "checkpoint", cp.ID, "task", st.TaskID, "err", err)
	writeError(w, http.StatusInternalServerError, fmt.Sprintf("checkpoint %d: keyed state of task %s: %v", cp.ID, st.TaskID, err))
}

// handleStateKey answers one key, at any state size: only the state of the
// key's key group is read.
func (s *Server) handleStateKey(w http.ResponseWriter, r *http.Request) {
	key := []byte(r.URL.Query().Get("key"))
	if b := r.URL.Query().Get("key_base64"); b != "" {
		var err error
		if key, err = base64.StdEncoding.DecodeString(b); err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("key_base64: %v", err))
			return
		}
	}
	j, cp, ok := s.lastCheckpoint(w, r)
	if !ok {
		return
	}
	kg := fsm.KeyGroup(key, j.Spec.Operator.MaxParallelism)
	v := apiKeyState{CheckpointID: cp.ID, exportLine: newExportLine(key, nil, "")}
	v.Value, v.ValueBase64 = nil, ""
	for _, st := range mapStates(cp) {
		if st.KeyGroups != nil && (int(kg) < st.KeyGroups.Start || int(kg) >= st.KeyGroups.End) {
			continue
		}
		err := s.state.read(r.Context(), j.Spec.Checkpoint.Storage, st, kg, kg+1, func(_ int32, k, value []byte) error {
			if string(k) == string(key) {
				v.Found = true
				v.exportLine = newExportLine(k, value, st.ValueEncoding)
				return errStopRead
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStopRead) {
			s.stateError(w, j, cp, st, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, v)
}

// handleStateExport streams the whole state of the last completed
// checkpoint as NDJSON: a first line with the checkpoint id and offsets,
// then one line per key, in key-group order. An error after the first line
// ends the stream with a line {"error": "..."}. The stream may last long: the
// write deadline moves on with every write, so only a client that stops
// reading is cut off.
func (s *Server) handleStateExport(w http.ResponseWriter, r *http.Request) {
	release, ok := s.admitStateRead(w)
	if !ok {
		return
	}
	defer release()
	j, cp, ok := s.lastCheckpoint(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	bw := bufio.NewWriterSize(&streamWriter{w: w}, 64<<10)
	enc := json.NewEncoder(bw)
	_ = enc.Encode(map[string]any{"checkpoint_id": cp.ID, "offsets": stateOffsets(j, cp)})
	for _, st := range mapStates(cp) {
		err := s.state.read(r.Context(), j.Spec.Checkpoint.Storage, st, 0, int32(j.Spec.Operator.MaxParallelism), func(_ int32, key, value []byte) error {
			return enc.Encode(newExportLine(key, value, st.ValueEncoding))
		})
		if err != nil {
			s.logger.Error("export keyed state", "job", j.ID, "checkpoint", cp.ID, "task", st.TaskID, "err", err)
			_ = enc.Encode(map[string]string{"error": fmt.Sprintf("checkpoint %d: keyed state of task %s: %v", cp.ID, st.TaskID, err)})
			break
		}
	}
	_ = bw.Flush()
}

// streamWriter writes a streamed answer, moving the write deadline to
// defaultWriteTimeout from now before each write (at most once a second).
type streamWriter struct {
	w        http.ResponseWriter
	extended time.Time
}

func (sw *streamWriter) Write(p []byte) (int, error) {
	if now := time.Now(); now.Sub(sw.extended) >= time.Second {
		extendWrite(sw.w, defaultWriteTimeout)
		sw.extended = now
	}
	return sw.w.Write(p)
}
