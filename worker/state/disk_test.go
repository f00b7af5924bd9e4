package state

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

func TestOpenDiskStartsEmpty(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "task")
	d, err := OpenDisk(dir, DiskOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mustPut(t, d, 1, "k", "v")
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stray"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "sub", "dir"), 0o755); err != nil {
		t.Fatal(err)
	}

	d, err = OpenDisk(dir, DiskOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	checkBackend(t, d, model{})
	for _, name := range []string{"stray", "sub"} {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind by OpenDisk: stat: %v", name, err)
		}
	}
}

func TestOpenDiskInUse(t *testing.T) {
	dir := t.TempDir()
	d, err := OpenDisk(dir, DiskOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	mustPut(t, d, 0, "k", "v")

	if d2, err := OpenDisk(dir, DiskOptions{}); err == nil {
		d2.Close()
		t.Fatal("second OpenDisk of an open directory succeeded")
	} else if !strings.Contains(err.Error(), dir) {
		t.Errorf("OpenDisk error %q does not name the directory", err)
	}
	// The open backend lost nothing.
	checkBackend(t, d, model{0: {"k": "v"}})
}

func TestOpenDiskEmptyName(t *testing.T) {
	if d, err := OpenDisk("", DiskOptions{}); err == nil {
		d.Close()
		t.Fatal(`OpenDisk("") succeeded`)
	}
}

// fullDisk returns a file system that, once full is set, fails with
// ENOSPC every create, write and sync of the files whose name contains part.
func fullDisk(part string) (fs vfs.FS, full *atomic.Bool) {
	full = new(atomic.Bool)
	fs = errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if !full.Load() || !strings.Contains(filepath.Base(op.Path), part) {
			return nil
		}
		switch op.Kind {
		case errorfs.OpCreate, errorfs.OpFileWrite, errorfs.OpFileWriteAt, errorfs.OpFileSync:
			return syscall.ENOSPC
		}
		return nil
	}))
	return fs, full
}

// putUntilFail puts 4 KiB values into d until a Put fails, and returns
// that error; it fails the test if Puts still succeed after 10 s.
func putUntilFail(t *testing.T, d *Disk) error {
	t.Helper()
	value := make([]byte, 4<<10)
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("Put still succeeds after %d writes to a full disk", i)
		}
		if err := d.Put(0, fmt.Appendf(nil, "key%d", i), value); err != nil {
			return err
		}
	}
}

// openFilling opens a Disk with small memtables in a new directory whose
// files named with part fail with ENOSPC once full is set (fullDisk), holding
// the key "before" in key group 0. logs is what the Disk logged.
func openFilling(t *testing.T, part string) (d *Disk, dir string, full *atomic.Bool, logs *syncWriter) {
	t.Helper()
	dir = t.TempDir()
	fs, full := fullDisk(part)
	logs = new(syncWriter)
	d, err := openDisk(dir, DiskOptions{
		MemTableSize: 256 << 10,
		Logger:       slog.New(slog.NewTextHandler(logs, nil)),
	}, fs)
	if err != nil {
		t.Fatal(err)
	}
	mustPut(t, d, 0, "before", "v")
	return d, dir, full, logs
}

// TestDiskFullDisk fills the disk under a Disk and checks that writes then
// fail with the file system's error and the directory.
func TestDiskFullDisk(t *testing.T) {
	d, dir, full, logs := openFilling(t, ".sst")
	full.Store(true)
	putErr := putUntilFail(t, d)
	if !errors.Is(putErr, syscall.ENOSPC) || !strings.Contains(putErr.Error(), dir) {
		t.Errorf("Put on a full disk = %v; want ENOSPC naming %s", putErr, dir)
	}
	// The failure is sticky, for every method that touches the database.
	if err := d.Delete(0, []byte("before")); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Delete after the failure = %v; want ENOSPC", err)
	}
	if _, err := d.Snapshot(); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Snapshot after the failure = %v; want ENOSPC", err)
	}
	if _, _, err := d.Get(0, []byte("before")); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Get after the failure = %v; want ENOSPC", err)
	}

	full.Store(false)
	if err := d.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if !strings.Contains(logs.String(), "no space left on device") {
		t.Errorf("failure not logged; log:\n%s", logs.String())
	}
}

// TestDiskThrottlesWrites slows flushes down and checks that writes wait for
// them instead of piling up memtables, and lose nothing.
func TestDiskThrottlesWrites(t *testing.T) {
	fs := errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if strings.HasSuffix(op.Path, ".sst") && op.Kind == errorfs.OpFileWrite {
			time.Sleep(time.Millisecond)
		}
		return nil
	}))
	d, err := openDisk(t.TempDir(), DiskOptions{MemTableSize: 256 << 10}, fs)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	m := model{}
	value := strings.Repeat("v", 4<<10)
	var maxSeen uint64
	for i := range 1000 {
		k := fmt.Sprint(i)
		mustPut(t, d, int32(i%16), k, value)
		m.put(int32(i%16), k, value)
		maxSeen = max(maxSeen, d.db.Metrics().MemTable.Size)
	}
	if limit := maxMemTables * d.memTableSize; maxSeen > limit {
		t.Errorf("memtables of %d bytes at once; want at most %d", maxSeen, limit)
	}
	if flushes := d.db.Metrics().Flush.Count; flushes < 5 {
		t.Errorf("%d flushes; the test wants writes to outrun several", flushes)
	}
	checkBackend(t, d, m)
}

// TestPebbleLoggerFatalf: Pebble's Fatalf fails the backend with the
// message and the directory, then ends the goroutine: with a panic on the
// writer's goroutine (the task's recover makes it a task failure), with
// runtime.Goexit on any other, which has no recover, so that the process
// lives on.
func TestPebbleLoggerFatalf(t *testing.T) {
	var logs syncWriter
	d := &Disk{dir: "/x", log: slog.New(slog.NewTextHandler(&logs, nil)), progress: make(chan struct{}, 1), owner: goid()}
	l := pebbleLogger{d: d}
	func() {
		defer func() {
			r := recover()
			err, _ := r.(error)
			if err == nil || !strings.Contains(err.Error(), "MANIFEST sync failed: boom") || !strings.Contains(err.Error(), "/x") {
				t.Errorf("Fatalf on the writer's goroutine panicked with %v; want an error with the message and the directory", r)
			}
		}()
		l.Fatalf("MANIFEST sync failed: %v", errors.New("boom"))
		t.Error("Fatalf returned")
	}()
	if err := d.usable(); err == nil || !strings.Contains(err.Error(), "MANIFEST sync failed: boom") {
		t.Errorf("backend after Fatalf: %v; want it failed with the message", err)
	}
	if !d.fatal.Load() {
		t.Error("backend not marked as failed fatally")
	}

	returned := make(chan bool, 1)
	go func() {
		defer func() { returned <- false }()
		l.Fatalf("flush failed: %v", syscall.ENOSPC)
		returned <- true
	}()
	if <-returned {
		t.Error("Fatalf returned on another goroutine")
	}
	if !strings.Contains(logs.String(), "MANIFEST sync failed: boom") {
		t.Errorf("Fatalf did not log the message; log:\n%s", logs.String())
	}
}

// syncWriter is a log destination safe for Pebble's goroutines to write to.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// TestViewGetLetsGoOfFlushedMemtables checks that a view read while the
// task writes on does not keep the memtables its Get read in memory once
// they are flushed: its Get makes its iterator anew after a flush. (Pebble
// itself may hold a flushed memtable a while: the count to reach is the
// one once the view is released.)
func TestViewGetLetsGoOfFlushedMemtables(t *testing.T) {
	d := openTestDisk(t, vfs.Default, 0)
	mustPut(t, d, 0, "k", "v")
	v := mustSnapshot(t, d)
	defer v.Release()
	checkGet(t, v, 0, "k", "v", true)
	for i := range 2000 { // 256 KB memtables: a few flushes
		mustPut(t, d, 1, fmt.Sprintf("key-%05d", i), fmt.Sprintf("%0200d", i))
	}
	if err := d.db.Flush(); err != nil {
		t.Fatal(err)
	}
	zombies := func() int64 { return d.db.Metrics().MemTable.ZombieCount }
	held := zombies()
	checkGet(t, v, 0, "k", "v", true)
	checkGet(t, v, 1, "key-00001", "", false)
	afterGet := zombies()
	v.Release()
	if released := zombies(); held <= released {
		t.Fatalf("%d flushed memtables held with the view's first Get, %d once released: the test shows nothing", held, released)
	} else if afterGet != released {
		t.Fatalf("%d flushed memtables held after the view's next Get, %d once it is released", afterGet, released)
	}
}
