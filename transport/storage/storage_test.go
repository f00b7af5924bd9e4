package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "new", "store")
	s, err := Open(context.Background(), "file://"+dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

func TestFileContract(t *testing.T) {
	s, dir := openTemp(t)
	if err := s.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Nothing is left behind: no temporary files, no sidecar files. (This
	// cleanup runs after those of testContract.)
	t.Cleanup(func() {
		filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				t.Errorf("file %s left behind", path)
			}
			return nil
		})
	})
	testContract(t, s)
}

func TestFileLayout(t *testing.T) {
	ctx := context.Background()
	s, dir := openTemp(t)
	h, err := s.Create(ctx, "cp/7/map-0", func(w io.Writer) error {
		_, err := io.WriteString(w, "state")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(filepath.Join(dir, "cp", "7"))
	if err != nil || len(entries) != 1 || entries[0].Name() != "map-0" {
		t.Fatalf("directory holds %v, %v; want just map-0 (no sidecar)", entries, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cp", "7", "map-0")); err != nil || string(b) != "state" || h.Size != 5 {
		t.Errorf("file holds %q, %v", b, err)
	}

	// prefix= confines a store to a subdirectory.
	sub, err := Open(ctx, "file://"+dir+"?prefix=cp/")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if got, err := sub.ReadVerified(ctx, Handle{Path: "7/map-0", Size: h.Size, SHA256: h.SHA256}); err != nil || string(got) != "state" {
		t.Errorf("through prefix: %q, %v", got, err)
	}

	// A stranded temporary file of an interrupted write is not listed.
	tmp := filepath.Join(dir, "cp", "7", "map-1.18f3a2b4c5d6e7f8.tmp")
	if err := os.WriteFile(tmp, []byte("partial"), 0o644); err != nil {
		t.Fatal(err)
	}
	var listed []string
	s.List(ctx, "", func(path string, _ int64, _ time.Time) error {
		listed = append(listed, path)
		return nil
	})
	if fmt.Sprint(listed) != "[cp/7/map-0]" {
		t.Errorf("List = %v, want [cp/7/map-0]", listed)
	}
	// ListPartial lists it, with the path it was to be written to, and
	// Delete removes it.
	var partial []string
	if err := s.ListPartial(ctx, "cp/", func(path, final string, size int64, _ time.Time) error {
		partial = append(partial, fmt.Sprintf("%s->%s:%d", path, final, size))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if want := "[cp/7/map-1.18f3a2b4c5d6e7f8.tmp->cp/7/map-1:7]"; fmt.Sprint(partial) != want {
		t.Errorf("ListPartial = %v, want %s", partial, want)
	}
	if err := s.Delete(ctx, "cp/7/map-1.18f3a2b4c5d6e7f8.tmp"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("partial file still there after Delete: %v", err)
	}
	partial = nil
	s.ListPartial(ctx, "", func(path, _ string, _ int64, _ time.Time) error {
		partial = append(partial, path)
		return nil
	})
	if len(partial) != 0 {
		t.Errorf("ListPartial after Delete = %v", partial)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ url, want string }{
		{"", "has no scheme"},
		{"/some/dir", "has no scheme"},
		{"gs://bucket", `unsupported scheme "gs"`},
		{"file://", "names no directory"},
		{"file:///x/y?bogus=1", `opening store file:///x/y?bogus=1: open bucket file:///x/y?bogus=1: invalid query parameter "bogus"`},
		{"file://" + file, "is not a directory"},
		{"s3://", "names no bucket"},
		{"s3://bucket?bogus=1", `unknown query parameter "bogus"`},
		{"s3://bucket?use_path_style=maybe", `invalid value for "use_path_style"`},
		{"file://user:hunter2@host/%zz", "invalid store URL"},
	} {
		s, err := Open(ctx, tc.url)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", tc.url)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q): error %q, want %q", tc.url, err, tc.want)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("Open(%q): error %q shows the password", tc.url, err)
		}
	}
}

func TestS3OpenNoNetwork(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	ctx := context.Background()
	// Nothing listens on port 1: Open succeeds, Check fails.
	u := "s3://bucket?endpoint=http://127.0.0.1:1&region=us-east-1&use_path_style=true&disable_https=true&prefix=dir/"
	s, err := Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.URL() != u {
		t.Errorf("URL() = %q, want %q", s.URL(), u)
	}
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err = s.Check(cctx)
	if err == nil || !strings.Contains(err.Error(), "storage: check in "+u+": ") {
		t.Errorf("Check: %v", err)
	}
}

func TestRedactedURL(t *testing.T) {
	s, err := Open(context.Background(), "s3://user:hunter2@bucket?region=us-east-1")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if strings.Contains(s.URL(), "hunter2") {
		t.Errorf("URL() = %q shows the password", s.URL())
	}
}

// apiError mimics an S3 error of the AWS SDK.
type apiError struct {
	code   string
	status int
}

func (e apiError) Error() string       { return "api error " + e.code }
func (e apiError) ErrorCode() string   { return e.code }
func (e apiError) HTTPStatusCode() int { return e.status }

func TestErrorKinds(t *testing.T) {
	s := &Store{url: "file:///data"}
	for _, tc := range []struct {
		cause   error
		noSpace bool
	}{
		{&fs.PathError{Op: "write", Path: "/data/x.1.tmp", Err: syscall.ENOSPC}, true},
		{fmt.Errorf("upload: %w", &fs.PathError{Op: "write", Path: "/x", Err: syscall.EDQUOT}), true},
		{apiError{"XMinioStorageFull", 500}, true},
		{apiError{"InternalError", 507}, true},
		{errors.New("We encountered an internal error: write /gw/bucket/x: no space left on device"), true},
		{apiError{"InternalError", 500}, false},
		{syscall.EIO, false},
	} {
		err := s.wrap("create", "cp/1/x", tc.cause)
		if errors.Is(err, ErrNoSpace) != tc.noSpace {
			t.Errorf("%v: errors.Is(ErrNoSpace) = %v, want %v", err, !tc.noSpace, tc.noSpace)
		}
		if !errors.Is(err, tc.cause) || !strings.Contains(err.Error(), tc.cause.Error()) {
			t.Errorf("%v does not wrap %v", err, tc.cause)
		}
		if want := `storage: create "cp/1/x" in file:///data: `; !strings.HasPrefix(err.Error(), want) {
			t.Errorf("error %q, want prefix %q", err, want)
		}
		if errors.Is(err, ErrNotExist) {
			t.Errorf("%v matches ErrNotExist", err)
		}
	}
}

func TestSubURL(t *testing.T) {
	for _, c := range []struct{ base, dir, want string }{
		{"file:///ck", "savepoints/j/sp-3/", "file:///ck?prefix=savepoints%2Fj%2Fsp-3%2F"},
		{"s3://b?endpoint=http://127.0.0.1:9000&prefix=p", "savepoints/j/sp-3/", "s3://b?endpoint=http%3A%2F%2F127.0.0.1%3A9000&prefix=p%2Fsavepoints%2Fj%2Fsp-3%2F"},
		{"s3://b?prefix=p/", "/x/", "s3://b?prefix=p%2Fx%2F"},
	} {
		got, err := SubURL(c.base, c.dir)
		if err != nil || got != c.want {
			t.Errorf("SubURL(%q, %q) = %q, %v; want %q", c.base, c.dir, got, err, c.want)
		}
	}
	if _, err := SubURL("no-scheme", "x/"); err == nil {
		t.Error("SubURL of a URL without scheme succeeded")
	}
	// A store opened on the sub-URL sees the directory's objects by their
	// names relative to it.
	ctx := context.Background()
	base := "file://" + t.TempDir()
	s, err := Open(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Create(ctx, "savepoints/j/sp-3/map-0.cfs", func(w io.Writer) error { _, err := w.Write([]byte("x")); return err }); err != nil {
		t.Fatal(err)
	}
	sub, _ := SubURL(base, "savepoints/j/sp-3/")
	ss, err := Open(ctx, sub)
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Close()
	rc, err := ss.Open(ctx, "map-0.cfs")
	if err != nil {
		t.Fatalf("open through the sub-URL: %v", err)
	}
	rc.Close()
}

// TestFileDeleteRemovesEmptyDirectories: in a file:// store, a Delete removes
// the directories it left empty, up to the store's own directory (and its
// prefix's), and no directory that still holds anything.
func TestFileDeleteRemovesEmptyDirectories(t *testing.T) {
	ctx := context.Background()
	s, dir := openTemp(t)
	write := func(s *Store, path string) {
		t.Helper()
		if _, err := s.Create(ctx, path, func(w io.Writer) error {
			_, err := io.WriteString(w, "x")
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	exists := func(rel string) bool {
		_, err := os.Stat(filepath.Join(dir, filepath.FromSlash(rel)))
		return err == nil
	}
	write(s, "checkpoints/j1/chk-1/map-0")
	write(s, "checkpoints/j1/chk-2/map-0")
	if err := s.Delete(ctx, "checkpoints/j1/chk-1/map-0"); err != nil {
		t.Fatal(err)
	}
	if exists("checkpoints/j1/chk-1") || !exists("checkpoints/j1/chk-2/map-0") {
		t.Fatalf("after deleting chk-1's file: chk-1 there %v, chk-2's file there %v; want the empty chk-1 gone, chk-2 kept", exists("checkpoints/j1/chk-1"), exists("checkpoints/j1/chk-2/map-0"))
	}
	if err := s.Delete(ctx, "checkpoints/j1/chk-2/map-0"); err != nil {
		t.Fatal(err)
	}
	if exists("checkpoints") || !exists("") {
		t.Fatalf("after deleting the last file: checkpoints/ there %v, the store's directory there %v; want it gone, the store kept", exists("checkpoints"), exists(""))
	}

	sub, err := Open(ctx, "file://"+dir+"?prefix=team-a/")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	write(sub, "savepoints/j2/sp-3/_metadata")
	write(s, "team-a/keep")
	if err := sub.Delete(ctx, "savepoints/j2/sp-3/_metadata"); err != nil {
		t.Fatal(err)
	}
	if exists("team-a/savepoints") || !exists("team-a/keep") {
		t.Fatalf("through prefix=team-a/: savepoints/ there %v, team-a/keep there %v; want it gone and the sibling kept", exists("team-a/savepoints"), exists("team-a/keep"))
	}
}
