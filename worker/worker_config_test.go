package worker

import (
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
