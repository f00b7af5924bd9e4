package statefile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
)

// OpenInline verifies a whole state file held in memory against its
// SHA-256 (hex, as handles and acks carry it) and opens it. A mismatch or a
// malformed file is an error matching ErrCorrupt.
func OpenInline(data []byte, sha256Hex string) (*Reader, error) {
	sum := sha256.Sum256(data)
	if got := hex.EncodeToString(sum[:]); !strings.EqualFold(got, sha256Hex) {
		return nil, corruptf("sha256 mismatch (computed %s, recorded %s)", got, sha256Hex)
	}
	rd, err := NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return nil, fmt.Errorf("open inline state: %w", err)
	}
	return rd, nil
}
