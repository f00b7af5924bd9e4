package transport

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseGossipKeys(t *testing.T) {
	k16 := base64.StdEncoding.EncodeToString(make([]byte, 16))
	k24 := base64.StdEncoding.EncodeToString(make([]byte, 24))
	k32, err := NewGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ParseGossipKeys(k32 + "," + k16 + "\n" + k24 + "\n")
	if err != nil || len(keys) != 3 || len(keys[0]) != 32 || len(keys[1]) != 16 || len(keys[2]) != 24 {
		t.Fatalf("ParseGossipKeys = %d keys, %v; want 32, 16 and 24 bytes in order", len(keys), err)
	}
	for _, bad := range []string{"", " , ", "!!!", base64.StdEncoding.EncodeToString(make([]byte, 20)), strings.Repeat(k16+",", maxGossipKeys+1)} {
		if _, err := ParseGossipKeys(bad); err == nil {
			t.Errorf("ParseGossipKeys(%q) succeeded", bad)
		} else if len(bad) > 4 && strings.Contains(err.Error(), bad[:4]) {
			t.Errorf("ParseGossipKeys error %q shows the key", err)
		}
	}
}

func TestLoadGossipKeys(t *testing.T) {
	a, _ := NewGossipKey()
	b, _ := NewGossipKey()
	file := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(file, []byte(b+"\n"+a+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(GossipKeyEnv, "")
	if keys, err := LoadGossipKeys("", ""); keys != nil || err != nil {
		t.Errorf("nothing set: %v %v, want encryption off", keys, err)
	}
	t.Setenv(GossipKeyEnv, a)
	first := func(keys [][]byte) string { return base64.StdEncoding.EncodeToString(keys[0]) }
	if keys, err := LoadGossipKeys("", ""); err != nil || len(keys) != 1 || first(keys) != a {
		t.Errorf("from the environment: %d keys, %v", len(keys), err)
	}
	if keys, err := LoadGossipKeys(b, ""); err != nil || len(keys) != 1 || first(keys) != b {
		t.Errorf("-encrypt over the environment: %d keys, %v", len(keys), err)
	}
	if keys, err := LoadGossipKeys("", file); err != nil || len(keys) != 2 || first(keys) != b {
		t.Errorf("-encrypt-file: %d keys, %v; want 2, the file's first primary", len(keys), err)
	}
	if _, err := LoadGossipKeys(a, file); err == nil {
		t.Error("-encrypt and -encrypt-file together accepted")
	}
}
