package transport

import (
	"strconv"
	"strings"
)

// CheckpointPrefix is where checkpoint state files live in checkpoint
// storage: CheckpointPrefix + "<job>/chk-<id>/<file>". Workers write there;
// the leader's garbage collector lists it and reads the checkpoint id back
// with ParseCheckpointPath.
const CheckpointPrefix = "checkpoints/"

// SavepointPrefix is where savepoints live: SavepointPrefix + "<job>/sp-<id>/".
// Nothing under it is ever collected; a savepoint is deleted on request.
const SavepointPrefix = "savepoints/"

// CheckpointDir is the storage prefix of the files of one checkpoint of job.
func CheckpointDir(job string, id uint64) string {
	return CheckpointPrefix + job + "/chk-" + strconv.FormatUint(id, 10) + "/"
}

// SavepointDir is the storage prefix of the files of the savepoint taken as
// checkpoint id of job.
func SavepointDir(job string, id uint64) string {
	return SavepointPrefix + job + "/sp-" + strconv.FormatUint(id, 10) + "/"
}

// SavepointMetadata is the name of the document in a savepoint's directory
// that describes it (an fsm.Savepoint as JSON, file paths relative to the
// directory), so that a savepoint can be restored from its URL alone.
const SavepointMetadata = "_metadata"

// ParseCheckpointPath returns the job and checkpoint id of a state file path
// under CheckpointPrefix; ok is false for any other path.
func ParseCheckpointPath(path string) (job string, id uint64, ok bool) {
	return parseStatePath(path, CheckpointPrefix, "chk-")
}

// ParseSavepointPath returns the job and checkpoint id of a file path under
// SavepointPrefix; ok is false for any other path.
func ParseSavepointPath(path string) (job string, id uint64, ok bool) {
	return parseStatePath(path, SavepointPrefix, "sp-")
}

// parseStatePath parses prefix + "<job>/<dir><id>/<file>".
func parseStatePath(path, prefix, dir string) (job string, id uint64, ok bool) {
	rest, ok := strings.CutPrefix(path, prefix)
	if !ok {
		return "", 0, false
	}
	parts := strings.SplitN(rest, "/", 3)
	if len(parts) != 3 || parts[0] == "" || parts[2] == "" {
		return "", 0, false
	}
	n, ok := strings.CutPrefix(parts[1], dir)
	if !ok {
		return "", 0, false
	}
	id, err := strconv.ParseUint(n, 10, 64)
	if err != nil || id == 0 {
		return "", 0, false
	}
	return parts[0], id, true
}
