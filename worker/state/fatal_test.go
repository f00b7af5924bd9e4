package state

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDiskFullManifest fills the disk under a Disk where Pebble cannot take
// it as an error: its MANIFEST, which a background flush appends to, and
// Pebble then calls Logger.Fatalf on its own goroutine. The process must
// survive: the backend fails, its methods return the failure naming the
// directory and the full disk, and Close returns.
func TestDiskFullManifest(t *testing.T) {
	d, dir, full, logs := openFilling(t, "MANIFEST")
	full.Store(true)
	putErr := putUntilFail(t, d)
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
	fs, full := fullDisk("MANIFEST")
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
