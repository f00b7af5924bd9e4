package state

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// TestDiskFullManifest fills the disk under a Disk where Pebble cannot take
// it as an error: its MANIFEST, which a background flush appends to, and
// Pebble then calls Logger.Fatalf on its own goroutine. The process must
// survive: the backend fails, its methods return the failure naming the
// directory and the full disk, and Close returns.
func TestDiskFullManifest(t *testing.T) {
	dir := t.TempDir()
	var full atomic.Bool
	fs := errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if !full.Load() || !strings.Contains(op.Path, "MANIFEST") {
			return nil
		}
		switch op.Kind {
		case errorfs.OpCreate, errorfs.OpFileWrite, errorfs.OpFileWriteAt, errorfs.OpFileSync:
			return syscall.ENOSPC
		}
		return nil
	}))
	var logs syncWriter
	d, err := openDisk(dir, DiskOptions{
		MemTableSize: 256 << 10,
		Logger:       slog.New(slog.NewTextHandler(&logs, nil)),
	}, fs)
	if err != nil {
		t.Fatal(err)
	}
	mustPut(t, d, 0, "before", "v")

	full.Store(true)
	value := make([]byte, 4<<10)
	deadline := time.Now().Add(10 * time.Second)
	var putErr error
	for i := 0; putErr == nil; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("Put still succeeds after %d writes with the MANIFEST on a full disk", i)
		}
		putErr = d.Put(0, fmt.Appendf(nil, "key%d", i), value)
	}
	if !errors.Is(putErr, syscall.ENOSPC) || !strings.Contains(putErr.Error(), dir) {
		t.Errorf("Put after a fatal MANIFEST write = %v; want ENOSPC naming %s", putErr, dir)
	}
	if _, _, err := d.Get(0, []byte("before")); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Get after the failure = %v; want ENOSPC", err)
	}
	closed := make(chan error, 1)
	go func() { closed <- d.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close of a backend Pebble failed fatally did not return")
	}
	if !strings.Contains(logs.String(), "no space left on device") {
		t.Errorf("failure not logged; log:\n%s", logs.String())
	}
}

// TestLoadFullManifest: a bulk load whose ingestion cannot write Pebble's
// MANIFEST (a full disk, a Fatalf on the writer's goroutine) fails with the
// full disk as its error, naming the directory, instead of panicking.
func TestLoadFullManifest(t *testing.T) {
	dir := t.TempDir()
	var full atomic.Bool
	fs := errorfs.Wrap(vfs.Default, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if full.Load() && strings.Contains(op.Path, "MANIFEST") {
			switch op.Kind {
			case errorfs.OpCreate, errorfs.OpFileWrite, errorfs.OpFileWriteAt, errorfs.OpFileSync:
				return syscall.ENOSPC
			}
		}
		return nil
	}))
	d, err := openDisk(dir, DiskOptions{}, fs)
	if err != nil {
		t.Fatal(err)
	}
	l, err := d.Load(0, 4)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := l.Add(1, fmt.Appendf(nil, "k%03d", i), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	full.Store(true)
	err = l.Finish()
	if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("Finish with the MANIFEST on a full disk = %v; want ENOSPC naming %s", err, dir)
	}
	if err := d.Put(0, []byte("k"), []byte("v")); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Put after the fatal failure = %v; want ENOSPC", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}
