package storage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport/statefile"
)

// TestS3Contract runs the store contract against the S3 store named by
// $COORDFLOW_TEST_S3_URL, such as
// s3://bucket?endpoint=http://127.0.0.1:7070&region=us-east-1&use_path_style=true
// (with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set). The bucket must
// exist; the test works under a prefix of its own and deletes what it
// creates.
func TestS3Contract(t *testing.T) {
	u := os.Getenv("COORDFLOW_TEST_S3_URL")
	if u == "" {
		t.Skip("COORDFLOW_TEST_S3_URL is not set")
	}
	ctx := context.Background()
	s, err := Open(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Check(ctx); err != nil {
		t.Fatal(err)
	}
	testContract(t, s)
}

// testContract checks what every Store must do. It works under a prefix of
// its own, and deletes what it creates.
func testContract(t *testing.T, s *Store) {
	ctx := context.Background()
	root := fmt.Sprintf("contract-%d-%d/", time.Now().UnixNano(), rand.Uint32())
	t.Cleanup(func() {
		s.List(ctx, root, func(path string, _ int64, _ time.Time) error {
			return s.Delete(ctx, path)
		})
	})
	create := func(t *testing.T, path string, data []byte) Handle {
		t.Helper()
		h, err := s.Create(ctx, path, func(w io.Writer) error {
			_, err := w.Write(data)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		if want := (Handle{Path: path, Size: int64(len(data)), SHA256: hex.EncodeToString(sum[:])}); h != want {
			t.Fatalf("Create returned %+v, want %+v", h, want)
		}
		return h
	}
	notExist := func(t *testing.T, what string, err error, path string) {
		t.Helper()
		if !errors.Is(err, ErrNotExist) {
			t.Fatalf("%s: error %v, want ErrNotExist", what, err)
		}
		if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, s.URL()) {
			t.Errorf("%s: error %q does not name %q and %s", what, msg, path, s.URL())
		}
	}

	t.Run("CreateRead", func(t *testing.T) {
		// Over the 5 MiB part size of S3 uploads, and not a multiple of it.
		data := make([]byte, 6<<20+12345)
		rand.NewChaCha8([32]byte{1}).Read(data)
		path := root + "read/big"
		h := create(t, path, data)

		r, err := s.Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Open read %d bytes, %v; want %d bytes", len(got), err, len(data))
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}

		got, err = s.ReadVerified(ctx, h)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("ReadVerified: %d bytes, %v", len(got), err)
		}
		for _, bad := range []Handle{
			{Path: h.Path, Size: h.Size - 1, SHA256: h.SHA256},
			{Path: h.Path, Size: h.Size + 1, SHA256: h.SHA256},
			{Path: h.Path, Size: h.Size, SHA256: strings.Repeat("0", 64)},
		} {
			if _, err := s.ReadVerified(ctx, bad); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), path) {
				t.Errorf("ReadVerified(%+v): %v, want ErrCorrupt", bad, err)
			}
		}

		for _, size := range []int64{h.Size, -1} {
			ra, err := s.ReaderAt(ctx, path, size)
			if err != nil {
				t.Fatal(err)
			}
			if ra.Size() != h.Size {
				t.Errorf("ReaderAt(%d).Size() = %d, want %d", size, ra.Size(), h.Size)
			}
			for _, c := range []struct {
				off     int64
				n       int
				wantN   int
				wantEOF bool
			}{
				{0, 10, 10, false},
				{5 << 20, 1 << 20, 1 << 20, false},
				{h.Size - 10, 10, 10, false},
				{h.Size - 10, 20, 10, true},
				{h.Size, 1, 0, true},
				{h.Size + 5, 1, 0, true},
			} {
				p := make([]byte, c.n)
				n, err := ra.ReadAt(p, c.off)
				if n != c.wantN || (err == io.EOF) != c.wantEOF || (err != nil && err != io.EOF) {
					t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d, EOF %v", c.n, c.off, n, err, c.wantN, c.wantEOF)
				}
				if n > 0 && !bytes.Equal(p[:n], data[c.off:c.off+int64(n)]) {
					t.Errorf("ReadAt(%d bytes at %d) read the wrong bytes", c.n, c.off)
				}
			}
			if err := ra.Close(); err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("Empty", func(t *testing.T) {
		h := create(t, root+"empty", nil)
		if got, err := s.ReadVerified(ctx, h); err != nil || len(got) != 0 {
			t.Errorf("ReadVerified: %q, %v", got, err)
		}
	})

	t.Run("StateFile", func(t *testing.T) {
		path := root + "state/1"
		var sum statefile.Summary
		h, err := s.Create(ctx, path, func(w io.Writer) error {
			sw, err := statefile.NewWriter(w, statefile.Delta)
			if err != nil {
				return err
			}
			for kg := range int32(10) {
				sw.Add(kg, []byte("k"), bytes.Repeat([]byte{byte(kg)}, 1000))
				sw.Delete(kg, []byte("z"))
			}
			sum, err = sw.Close()
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if h.Size != sum.Size || h.SHA256 != hex.EncodeToString(sum.SHA256[:]) {
			t.Fatalf("handle %+v, state file summary size %d, SHA-256 %x", h, sum.Size, sum.SHA256)
		}
		ra, err := s.ReaderAt(ctx, path, h.Size)
		if err != nil {
			t.Fatal(err)
		}
		defer ra.Close()
		sr, err := statefile.NewReader(ra, ra.Size())
		if err != nil {
			t.Fatal(err)
		}
		var n int
		err = sr.Range(3, 5, func(kg int32, key, value []byte, tombstone bool) error {
			n++
			return nil
		})
		if err != nil || n != 4 {
			t.Errorf("Range: %d entries, %v; want 4", n, err)
		}
		r, err := s.Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		n = 0
		err = statefile.ReadAll(r, sum.SHA256, 0, statefile.MaxKeyGroups, func(int32, []byte, []byte, bool) error {
			n++
			return nil
		})
		if err != nil || n != 20 {
			t.Errorf("ReadAll: %d entries, %v; want 20", n, err)
		}
	})

	t.Run("NotExist", func(t *testing.T) {
		path := root + "missing/object"
		_, err := s.Open(ctx, path)
		notExist(t, "Open", err, path)
		_, err = s.ReaderAt(ctx, path, -1)
		notExist(t, "ReaderAt", err, path)
		ra, err := s.ReaderAt(ctx, path, 100)
		if err != nil {
			t.Fatal(err)
		}
		_, err = ra.ReadAt(make([]byte, 10), 0)
		notExist(t, "ReadAt", err, path)
		_, err = s.ReadVerified(ctx, Handle{Path: path})
		notExist(t, "ReadVerified", err, path)
		if err := s.Delete(ctx, path); err != nil {
			t.Errorf("Delete of a missing object: %v", err)
		}
	})

	t.Run("Aborted", func(t *testing.T) {
		boom := errors.New("boom")
		for _, size := range []int{0, 100, 6 << 20} {
			path := fmt.Sprintf("%saborted/%d", root, size)
			_, err := s.Create(ctx, path, func(w io.Writer) error {
				if _, err := w.Write(make([]byte, size)); err != nil {
					return err
				}
				return boom
			})
			if !errors.Is(err, boom) || !strings.Contains(err.Error(), path) {
				t.Errorf("Create: error %v, want boom naming the path", err)
			}
			_, err = s.Open(ctx, path)
			notExist(t, "Open after an aborted Create", err, path)
		}

		path := root + "aborted/cancelled"
		cctx, cancel := context.WithCancel(ctx)
		_, err := s.Create(cctx, path, func(w io.Writer) error {
			w.Write([]byte("partial"))
			cancel()
			return nil
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Create with ctx cancelled: %v, want context.Canceled", err)
		}
		_, err = s.Open(ctx, path)
		notExist(t, "Open after a cancelled Create", err, path)

		s.List(ctx, root+"aborted/", func(path string, _ int64, _ time.Time) error {
			t.Errorf("aborted object %s listed", path)
			return nil
		})
	})

	t.Run("ListDelete", func(t *testing.T) {
		dir := root + "list/"
		want := []string{dir + "a", dir + "b/c", dir + "b/d", dir + "bb"}
		for i, p := range slices.Backward(want) {
			create(t, p, bytes.Repeat([]byte("x"), i))
		}
		create(t, root+"listx", []byte("outside the prefix"))
		type obj struct {
			path string
			size int64
		}
		list := func(prefix string) []obj {
			t.Helper()
			var got []obj
			err := s.List(ctx, prefix, func(path string, size int64, modTime time.Time) error {
				if modTime.IsZero() {
					t.Errorf("%s: zero modification time", path)
				}
				got = append(got, obj{path, size})
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			slices.SortFunc(got, func(a, b obj) int { return strings.Compare(a.path, b.path) })
			return got
		}
		if got := list(dir); !slices.Equal(got, []obj{{want[0], 0}, {want[1], 1}, {want[2], 2}, {want[3], 3}}) {
			t.Errorf("List(%q) = %v", dir, got)
		}
		if got := list(dir + "b"); len(got) != 3 {
			t.Errorf("List(%q) = %v, want 3 objects", dir+"b", got)
		}
		if got := list(dir + "b/"); len(got) != 2 {
			t.Errorf("List(%q) = %v, want 2 objects", dir+"b/", got)
		}
		if got := list(dir + "nothing"); len(got) != 0 {
			t.Errorf("List(%q) = %v, want none", dir+"nothing", got)
		}
		stop := errors.New("stop")
		n := 0
		if err := s.List(ctx, dir, func(string, int64, time.Time) error { n++; return stop }); err != stop || n != 1 {
			t.Errorf("List with fn failing: %v after %d calls", err, n)
		}

		if err := s.Delete(ctx, want[1]); err != nil {
			t.Fatal(err)
		}
		_, err := s.Open(ctx, want[1])
		notExist(t, "Open after Delete", err, want[1])
		if got := list(dir); len(got) != 3 {
			t.Errorf("List after Delete = %v", got)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		dir := root + "concurrent/"
		const n = 16
		var wg sync.WaitGroup
		handles := make([]Handle, n)
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				data := bytes.Repeat([]byte{byte(i)}, 1000*i+7)
				handles[i], errs[i] = s.Create(ctx, fmt.Sprintf("%s%02d", dir, i), func(w io.Writer) error {
					for len(data) > 0 {
						k := min(len(data), 100)
						if _, err := w.Write(data[:k]); err != nil {
							return err
						}
						data = data[k:]
					}
					return nil
				})
			})
		}
		listErr := make(chan error, 1)
		go func() {
			// List while objects appear.
			var err error
			for range 20 {
				if err = s.List(ctx, dir, func(string, int64, time.Time) error { return nil }); err != nil {
					break
				}
			}
			listErr <- err
		}()
		wg.Wait()
		if err := <-listErr; err != nil {
			t.Errorf("List during Creates: %v", err)
		}
		for i := range n {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			if got, err := s.ReadVerified(ctx, handles[i]); err != nil || len(got) != 1000*i+7 {
				t.Errorf("object %d: %d bytes, %v", i, len(got), err)
			}
		}
		count := 0
		s.List(ctx, dir, func(string, int64, time.Time) error { count++; return nil })
		if count != n {
			t.Errorf("listed %d objects, want %d", count, n)
		}
	})
}
