package storage

import (
	"errors"
	"strings"
	"syscall"

	"gocloud.dev/gcerrors"
)

var (
	// ErrNotExist is matched by errors about an object (or a bucket) that
	// does not exist.
	ErrNotExist = errors.New("object does not exist")
	// ErrNoSpace is matched by errors about a full disk or bucket.
	ErrNoSpace = errors.New("no space left in the store")
)

// An Error is the error of a Store operation. It matches ErrNotExist and
// ErrNoSpace when its cause does, and unwraps to its cause.
type Error struct {
	Op   string // "create", "open", "read", "stat", "delete", "list", "check"
	Path string // of the object, or the prefix of a listing
	URL  string // of the store, credentials redacted
	Err  error
}

func (s *Store) wrap(op, path string, err error) error {
	return &Error{Op: op, Path: path, URL: s.url, Err: err}
}

// Error returns a message such as
// `storage: create "cp/7/map-0" in file:///data: no space left on device`.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("storage: ")
	b.WriteString(e.Op)
	if e.Path != "" || e.Op == "list" {
		b.WriteString(` "`)
		b.WriteString(e.Path)
		b.WriteByte('"')
	}
	b.WriteString(" in ")
	b.WriteString(e.URL)
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	return b.String()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether the error is ErrNotExist or ErrNoSpace.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrNotExist:
		return gcerrors.Code(e.Err) == gcerrors.NotFound
	case ErrNoSpace:
		return isNoSpace(e.Err)
	}
	return false
}

// isNoSpace reports whether err says that the disk or the bucket is full:
// ENOSPC or EDQUOT from a file system, HTTP 507 or a storage-full error code
// from an S3 server, or a message saying so.
func isNoSpace(err error) bool {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return true
	}
	var status interface{ HTTPStatusCode() int }
	if errors.As(err, &status) && status.HTTPStatusCode() == 507 {
		return true
	}
	var api interface{ ErrorCode() string }
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "XMinioStorageFull", "InsufficientStorage", "StorageFull", "QuotaExceeded":
			return true
		}
	}
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "no space left on device") || strings.Contains(msg, "disk quota exceeded")
}
