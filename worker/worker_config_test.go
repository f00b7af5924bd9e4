package worker

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfigRefusesWhatCoordinatorsRefuse: a worker whose id, slots or join
// addresses no coordinator would take does not start, saying which, rather
// than ask for a session (or join gossip) again and again for ever.
func TestConfigRefusesWhatCoordinatorsRefuse(t *testing.T) {
	base := Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", StateDir: t.TempDir()}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"id with a space", func(c *Config) { c.ID = "w 1" }, `ID "w 1"`},
		{"too many slots", func(c *Config) { c.Slots = 2000 }, "2000 slots: at most 1024"},
		{"join without a port", func(c *Config) { c.Join = []string{"10.0.0.1"} }, `join address "10.0.0.1"`},
		{"join with a letter in the port", func(c *Config) { c.Join = []string{"10.0.0.1:73O1"} }, `join address "10.0.0.1:73O1"`},
	} {
		cfg := base
		tc.edit(&cfg)
		if _, err := cfg.withDefaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %s", tc.name, err, tc.want)
		}
	}
	ok := base
	ok.Slots, ok.Join = 1024, []string{"coordd-0.coordd:7301", "[::1]:7301"}
	if _, err := ok.withDefaults(); err != nil {
		t.Errorf("1024 slots and host:port joins: %v", err)
	}
}

// TestStateDirMustBeAWorkers: a state directory that holds anything but a
// worker's cache/ and db/, and no worker's mark, is refused before anything
// in it is deleted; an empty one, or an older worker's, is claimed and
// marked, and its cache/ and db/ emptied.
func TestStateDirMustBeAWorkers(t *testing.T) {
	home := t.TempDir()
	for _, p := range []string{"notes.txt", "cache/keep", "db/keep"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(home, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(home, p), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg := Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", StateDir: home}
	if _, err := cfg.withDefaults(); err == nil || !strings.Contains(err.Error(), "notes.txt") {
		t.Fatalf("a directory with other files: %v, want a refusal naming one", err)
	}
	if _, err := os.Stat(filepath.Join(home, "cache", "keep")); err != nil {
		t.Fatalf("the refused directory's cache/ was touched: %v", err)
	}

	old := t.TempDir() // what an older worker left: cache/ and db/ only
	for _, sub := range []string{"cache", "db"} {
		if err := os.MkdirAll(filepath.Join(old, sub, "x"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfg.StateDir = old
	claimed, err := cfg.withDefaults()
	if err != nil {
		t.Fatalf("an older worker's state directory: %v", err)
	}
	claimed.stateLock.Close()
	if _, err := os.Stat(filepath.Join(old, stateDirMark)); err != nil {
		t.Fatalf("the claimed directory has no mark: %v", err)
	}
	if _, err := os.Stat(filepath.Join(old, "cache", "x")); !os.IsNotExist(err) {
		t.Fatalf("cache/ of the claimed directory not emptied: %v", err)
	}
	// Marked, it is a worker's whatever else it holds.
	if err := os.WriteFile(filepath.Join(old, "notes.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if marked, err := cfg.withDefaults(); err != nil {
		t.Fatalf("a marked state directory: %v", err)
	} else {
		marked.stateLock.Close()
	}
}

// TestStateDirIsOneWorkers: a second worker given a state directory in use
// is refused before it touches the first one's cache/ and db/; once the
// first lets go (or dies), the directory can be taken again.
func TestStateDirIsOneWorkers(t *testing.T) {
	cfg := Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", StateDir: t.TempDir()}
	first, err := cfg.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	inUse := filepath.Join(cfg.StateDir, "cache", "in-use")
	if err := os.MkdirAll(filepath.Dir(inUse), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inUse, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.ID = "w2"
	if _, err := cfg.withDefaults(); err == nil || !strings.Contains(err.Error(), "in use by another worker") {
		t.Fatalf("a state directory in use: %v, want a refusal saying so", err)
	}
	if _, err := os.Stat(inUse); err != nil {
		t.Fatalf("the refused worker emptied the first one's cache/: %v", err)
	}
	first.stateLock.Close()
	second, err := cfg.withDefaults()
	if err != nil {
		t.Fatalf("a state directory let go: %v", err)
	}
	second.stateLock.Close()
}
