// Package storage stores checkpoint files in a directory or an S3 bucket,
// through gocloud.dev/blob.
//
// A Store is named by a URL:
//
//	file:///var/lib/coordflow/checkpoints
//	s3://bucket?region=us-east-1&prefix=checkpoints/
//	s3://bucket?endpoint=http://127.0.0.1:7070&region=us-east-1&use_path_style=true&prefix=dir/
//
// Objects are named by slash-separated paths relative to the store. An
// object is written once, by Create, and becomes visible complete or not at
// all. Errors name the operation, the path and the store's URL (without
// credentials); errors.Is(err, ErrNotExist) reports a missing object and
// errors.Is(err, ErrNoSpace) a full disk or bucket.
package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"gocloud.dev/blob"
	_ "gocloud.dev/blob/fileblob" // registers file://
	_ "gocloud.dev/blob/s3blob"   // registers s3://
	"gocloud.dev/gcerrors"
)

// A Store is checkpoint storage: a directory or an S3 bucket (or a prefix
// in one). It is safe for concurrent use.
type Store struct {
	bucket *blob.Bucket
	url    string // as given, credentials redacted
	scheme string
	// root and prefix, of a file:// store, are its directory and the
	// prefix option its paths are put under: Delete removes the
	// directories it leaves empty below root.
	root, prefix string
}

// A Handle names a complete object and what it must contain.
type Handle struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // lowercase hex
}

// Open opens the store named by rawURL. It does no network I/O (see Check).
//
// For file:// URLs, the URL names a directory, which Open creates if it is
// missing. Unless the URL's query says otherwise, Open sets fileblob's
// create_dir, no_tmp_dir (so a file being written is a temporary file in
// its final directory, renamed into place by Create, which works when the
// directory is on another file system than os.TempDir) and metadata=skip
// (no ".attrs" sidecar files).
//
// For s3:// URLs, the host is the bucket. The query may hold region,
// endpoint, use_path_style, disable_https, profile, anonymous and the other
// options of gocloud.dev/blob/s3blob and gocloud.dev/aws; credentials come
// from the usual AWS environment variables and files. An unknown query
// parameter is an error. Unless the query says otherwise, Open sets
// response_checksum_validation=when_required: the AWS SDK cannot validate
// ranged reads and would log a message for each; callers verify SHA-256
// checksums of their own.
//
// For both, prefix=dir/ confines the store to the objects under dir/.
func Open(ctx context.Context, rawURL string) (*Store, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // ue repeats the URL, credentials and all
		}
		return nil, fmt.Errorf("storage: invalid store URL: %w", err)
	}
	s := &Store{url: redact(rawURL, u), scheme: u.Scheme}
	switch u.Scheme {
	case "file":
		if u.Path == "" {
			return nil, fmt.Errorf("storage: store URL %s names no directory (want file:///path/to/dir)", s.url)
		}
		q := u.Query()
		for _, p := range []struct{ name, value string }{{"create_dir", "true"}, {"no_tmp_dir", "true"}, {"metadata", "skip"}} {
			if !q.Has(p.name) {
				q.Set(p.name, p.value)
			}
		}
		u.RawQuery = q.Encode()
		s.root, s.prefix = filepath.Clean(filepath.FromSlash(u.Path)), q.Get("prefix")
	case "s3":
		if u.Host == "" {
			return nil, fmt.Errorf("storage: store URL %s names no bucket (want s3://bucket)", s.url)
		}
		q := u.Query()
		if !q.Has("response_checksum_validation") {
			q.Set("response_checksum_validation", "when_required")
		}
		u.RawQuery = q.Encode()
	case "":
		return nil, fmt.Errorf("storage: store URL %s has no scheme (want file:// or s3://)", s.url)
	default:
		return nil, fmt.Errorf("storage: store URL %s: unsupported scheme %q (want file or s3)", s.url, u.Scheme)
	}
	s.bucket, err = blob.DefaultURLMux().OpenBucketURL(ctx, u)
	if err != nil {
		// The opener's message repeats the URL, with the query we set and
		// any password: show the URL as given instead.
		msg := strings.ReplaceAll(err.Error(), u.String(), s.url)
		return nil, &messageError{msg: "storage: opening store " + s.url + ": " + msg, err: err}
	}
	return s, nil
}

// messageError replaces the message of err.
type messageError struct {
	msg string
	err error
}

func (e *messageError) Error() string { return e.msg }
func (e *messageError) Unwrap() error { return e.err }

// redact returns rawURL with any password replaced.
func redact(rawURL string, u *url.URL) string {
	if _, ok := u.User.Password(); ok {
		return u.Redacted()
	}
	return rawURL
}

// URL returns the URL the store was opened with, any password redacted.
func (s *Store) URL() string { return s.url }

// Check verifies that the store can be reached and listed, without writing
// anything. For S3 this is the first request to the server.
func (s *Store) Check(ctx context.Context) error {
	if _, _, err := s.bucket.ListPage(ctx, blob.FirstPageToken, 1, nil); err != nil {
		return s.wrap("check", "", err)
	}
	return nil
}

// Create writes a new object at path with what write writes, and returns its
// handle (size and SHA-256 computed as it streams). If write returns an
// error, or ctx is done before the object is complete, Create aborts the
// write and the object does not appear. An existing object at path is
// replaced; callers choose unique paths.
//
// write must not retain w after it returns.
func (s *Store) Create(ctx context.Context, path string, write func(w io.Writer) error) (Handle, error) {
	if path == "" {
		return Handle{}, s.wrap("create", path, errors.New("empty path"))
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	bw, err := s.bucket.NewWriter(wctx, path, &blob.WriterOptions{ContentType: "application/octet-stream"})
	if err != nil {
		return Handle{}, s.wrap("create", path, err)
	}
	closed := false
	defer func() {
		if !closed { // write panicked
			cancel()
			_ = bw.Close()
		}
	}()
	hw := &hashWriter{w: bw, h: sha256.New()}
	werr := write(hw)
	if werr == nil {
		werr = ctx.Err() // fileblob completes the write even if ctx is done
	}
	if werr != nil {
		cancel() // aborts the write: bw.Close discards it
		closed = true
		_ = bw.Close()
		return Handle{}, s.wrap("create", path, werr)
	}
	closed = true
	if err := bw.Close(); err != nil {
		return Handle{}, s.wrap("create", path, err)
	}
	return Handle{Path: path, Size: hw.n, SHA256: hex.EncodeToString(hw.h.Sum(nil))}, nil
}

// hashWriter counts and hashes what it writes to w.
type hashWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (w *hashWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	return n, err
}

// Open opens the object at path for reading. The caller must close it.
// ctx bounds the whole read.
func (s *Store) Open(ctx context.Context, path string) (io.ReadCloser, error) {
	r, err := s.bucket.NewReader(ctx, path, nil)
	if err != nil {
		return nil, s.wrap("open", path, err)
	}
	return &objectReader{r: r, s: s, path: path}, nil
}

// objectReader wraps the errors of a blob.Reader.
type objectReader struct {
	r    *blob.Reader
	s    *Store
	path string
}

func (r *objectReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		err = r.s.wrap("read", r.path, err)
	}
	return n, err
}

func (r *objectReader) Close() error {
	if err := r.r.Close(); err != nil {
		return r.s.wrap("close", r.path, err)
	}
	return nil
}

// A ReaderAtCloser reads an object at offsets, each ReadAt call with one
// range request. It is safe for concurrent use.
type ReaderAtCloser interface {
	io.ReaderAt
	io.Closer
	// Size returns the size of the object.
	Size() int64
}

// ReaderAt returns a reader of the object at path, of size bytes, for
// partial reads (by statefile.NewReader, say). If size is negative,
// ReaderAt asks the store for it; otherwise it trusts it and makes no
// request until the first ReadAt. ctx bounds every ReadAt call.
func (s *Store) ReaderAt(ctx context.Context, path string, size int64) (ReaderAtCloser, error) {
	if size < 0 {
		a, err := s.bucket.Attributes(ctx, path)
		if err != nil {
			return nil, s.wrap("stat", path, err)
		}
		size = a.Size
	}
	return &readerAt{ctx: ctx, s: s, path: path, size: size}, nil
}

type readerAt struct {
	ctx  context.Context
	s    *Store
	path string
	size int64
}

func (r *readerAt) Size() int64  { return r.size }
func (r *readerAt) Close() error { return nil }

func (r *readerAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, r.s.wrap("read", r.path, fmt.Errorf("negative offset %d", off))
	}
	if off >= r.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.size-off))
	if n == 0 {
		return 0, nil
	}
	br, err := r.s.bucket.NewRangeReader(r.ctx, r.path, off, int64(n), nil)
	if err != nil {
		return 0, r.s.wrap("read", r.path, err)
	}
	defer br.Close()
	m, err := io.ReadFull(br, p[:n])
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return m, r.s.wrap("read", r.path, fmt.Errorf("%w: object shorter than its expected size %d: got %d bytes at offset %d", ErrCorrupt, r.size, m, off))
	}
	if err != nil {
		return m, r.s.wrap("read", r.path, err)
	}
	if m < len(p) {
		return m, io.EOF
	}
	return m, nil
}

// ErrCorrupt is matched by the errors of ReadVerified for an object whose
// size or SHA-256 is not that of its handle, and of a ReaderAt's reads of
// an object shorter than the size it was opened with.
var ErrCorrupt = errors.New("object does not match its handle")

// ReadVerified reads the whole object of h into memory, and checks its size
// and SHA-256. It is meant for small objects, such as metadata.
func (s *Store) ReadVerified(ctx context.Context, h Handle) ([]byte, error) {
	if h.Size < 0 {
		return nil, s.wrap("read", h.Path, fmt.Errorf("invalid handle size %d", h.Size))
	}
	r, err := s.bucket.NewReader(ctx, h.Path, nil)
	if err != nil {
		return nil, s.wrap("read", h.Path, err)
	}
	defer r.Close()
	// Let the buffer grow with what arrives, not with what the handle says.
	b, err := io.ReadAll(io.LimitReader(r, h.Size+1))
	if err != nil {
		return nil, s.wrap("read", h.Path, err)
	}
	if int64(len(b)) != h.Size {
		return nil, s.wrap("read", h.Path, fmt.Errorf("%w: size %d, want %d", ErrCorrupt, r.Size(), h.Size))
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != strings.ToLower(h.SHA256) {
		return nil, s.wrap("read", h.Path, fmt.Errorf("%w: SHA-256 %s, want %s", ErrCorrupt, got, h.SHA256))
	}
	return b, nil
}

// Delete deletes the object at path. A missing object is not an error. In
// a file:// store it also removes the directories the deletion left empty,
// up to the store's own: every checkpoint writes a directory of its own,
// and a file tree of empty ones would grow without end, and be walked by
// every listing.
func (s *Store) Delete(ctx context.Context, path string) error {
	if err := s.bucket.Delete(ctx, path); err != nil && gcerrors.Code(err) != gcerrors.NotFound {
		return s.wrap("delete", path, err)
	}
	if s.scheme == "file" {
		s.removeEmptyDirs(path)
	}
	return nil
}

// removeEmptyDirs removes the directories of the file of object path from
// the deepest up, stopping at the first that is not empty (os.Remove fails
// on it) or at the store's directory. A writer that made such a directory
// for a file of its own a moment before can lose it, and fail that write;
// writers write only into the directory of the checkpoint in flight, which
// holds no file Delete is asked to delete.
func (s *Store) removeEmptyDirs(path string) {
	dir := filepath.Dir(filepath.Join(s.root, filepath.FromSlash(s.prefix+path)))
	for strings.HasPrefix(dir, s.root+string(filepath.Separator)) {
		if os.Remove(dir) != nil {
			return
		}
		dir = filepath.Dir(dir)
	}
}

// List calls fn for every object whose path starts with prefix, and stops at
// fn's first error, which it returns as it is. S3 lists in path order;
// fileblob in the order of a directory walk, where "a/b" comes before "a-b". An object
// created or deleted during List may or may not be listed. In a file://
// store, List skips fileblob's temporary files (path.<hex>.tmp) of writes in
// progress, or left behind by a process killed while writing: ListPartial
// lists those.
func (s *Store) List(ctx context.Context, prefix string, fn func(path string, size int64, modTime time.Time) error) error {
	return s.list(ctx, prefix, func(o *blob.ListObject) error {
		if s.scheme == "file" && tempFile.MatchString(o.Key) {
			return nil
		}
		return fn(o.Key, o.Size, o.ModTime)
	})
}

// ListPartial calls fn for every partial object under prefix: one being
// written, or one a process killed in the middle of a write left behind,
// which would otherwise stay forever. fn gets the partial object's own path
// (for Delete) and the path it was to be written to. Only a file:// store
// has partial objects (fileblob's temporary files, renamed into place when
// a write completes); an S3 object appears whole or not at all, and the
// parts of a multipart upload a killed process never completed are not
// objects: a bucket lifecycle rule (AbortIncompleteMultipartUpload) ends
// them.
func (s *Store) ListPartial(ctx context.Context, prefix string, fn func(path, final string, size int64, modTime time.Time) error) error {
	if s.scheme != "file" {
		return nil
	}
	return s.list(ctx, prefix, func(o *blob.ListObject) error {
		loc := tempFile.FindStringIndex(o.Key)
		if loc == nil {
			return nil
		}
		return fn(o.Key, o.Key[:loc[0]], o.Size, o.ModTime)
	})
}

// list calls fn for every object under prefix, directories excluded.
func (s *Store) list(ctx context.Context, prefix string, fn func(*blob.ListObject) error) error {
	const pageSize = 1000
	token := blob.FirstPageToken
	for {
		objs, next, err := s.listPage(ctx, prefix, token, pageSize)
		if err != nil {
			return s.wrap("list", prefix, err)
		}
		for _, o := range objs {
			if o.IsDir {
				continue
			}
			if err := fn(o); err != nil {
				return err
			}
		}
		if len(next) == 0 {
			return nil
		}
		token = next
	}
}

// tempFile matches the names of fileblob's temporary files.
var tempFile = regexp.MustCompile(`\.[0-9a-f]+\.tmp$`)

// listPage lists a page. fileblob fails a listing when a file vanishes
// (is renamed into place or deleted) while it lists; listPage retries that.
func (s *Store) listPage(ctx context.Context, prefix string, token []byte, n int) ([]*blob.ListObject, []byte, error) {
	for try := 1; ; try++ {
		objs, next, err := s.bucket.ListPage(ctx, token, n, &blob.ListOptions{Prefix: prefix})
		if err == nil || s.scheme != "file" || gcerrors.Code(err) != gcerrors.NotFound || try == 10 || ctx.Err() != nil {
			return objs, next, err
		}
	}
}

// Close releases the store's resources.
func (s *Store) Close() error {
	if err := s.bucket.Close(); err != nil {
		return fmt.Errorf("storage: closing store %s: %w", s.url, err)
	}
	return nil
}
