package transport

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
)

// GossipKeyEnv is the environment variable coordd agent and workerd read the
// gossip encryption keys from when neither -encrypt nor -encrypt-file is set.
const GossipKeyEnv = "COORD_GOSSIP_KEY"

// GossipKeySize is the size of the keys NewGossipKey makes (AES-256).
const GossipKeySize = 32

// maxGossipKeys bounds the list: rotation needs two, three at most.
const maxGossipKeys = 8

// NewGossipKey returns a new random gossip encryption key of GossipKeySize
// bytes, base64-encoded as -encrypt takes it.
func NewGossipKey() (string, error) {
	key := make([]byte, GossipKeySize)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("gossip key: %w", err)
	}
	return base64.StdEncoding.EncodeToString(key), nil
}

// ParseGossipKeys parses a list of base64 gossip keys separated by commas or
// white space (a key file may hold one per line). The first is the primary
// key, which encrypts; all of them decrypt, which is how keys are rotated
// (docs/operations.md). Each key must decode to 16, 24 or 32 bytes
// (AES-128, -192, -256). An empty list is an error: the caller decides
// whether encryption is on.
func ParseGossipKeys(s string) ([][]byte, error) {
	fields := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' || r == '\r' })
	if len(fields) == 0 {
		return nil, errors.New("gossip keys: none given")
	}
	if len(fields) > maxGossipKeys {
		return nil, fmt.Errorf("gossip keys: %d given, at most %d", len(fields), maxGossipKeys)
	}
	keys := make([][]byte, 0, len(fields))
	for i, f := range fields {
		key, err := base64.StdEncoding.DecodeString(f)
		if err != nil {
			// The key itself is never part of the error: it is a secret.
			return nil, fmt.Errorf("gossip key %d of %d: not base64 (make one with coordd keygen)", i+1, len(fields))
		}
		if n := len(key); n != 16 && n != 24 && n != 32 {
			return nil, fmt.Errorf("gossip key %d of %d: %d bytes, want 16, 24 or 32 (make one with coordd keygen)", i+1, len(fields), n)
		}
		keys = append(keys, key)
	}
	return keys, nil
}

// LoadGossipKeys returns the gossip keys a daemon is started with: value
// (the -encrypt flag), else the contents of file (-encrypt-file), else the
// environment variable GossipKeyEnv; nil when none is set (encryption off).
// Setting both value and file is an error. A key file should be readable by
// the daemon's user only; on the command line a key is visible in ps.
func LoadGossipKeys(value, file string) ([][]byte, error) {
	switch {
	case value != "" && file != "":
		return nil, errors.New("-encrypt and -encrypt-file: set one, not both")
	case value != "":
		keys, err := ParseGossipKeys(value)
		if err != nil {
			return nil, fmt.Errorf("-encrypt: %w", err)
		}
		return keys, nil
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("-encrypt-file: %w", err)
		}
		keys, err := ParseGossipKeys(string(b))
		if err != nil {
			return nil, fmt.Errorf("-encrypt-file %s: %w", file, err)
		}
		return keys, nil
	}
	env := os.Getenv(GossipKeyEnv)
	if env == "" {
		return nil, nil
	}
	keys, err := ParseGossipKeys(env)
	if err != nil {
		return nil, fmt.Errorf("$%s: %w", GossipKeyEnv, err)
	}
	return keys, nil
}
