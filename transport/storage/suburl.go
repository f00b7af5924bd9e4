package storage

import (
	"fmt"
	"net/url"
	"strings"
)

// SubURL returns the URL of directory dir inside the storage that base names:
// base with dir appended to its prefix option (which every scheme takes), so
// that a Store opened on it sees dir's objects at their names relative to
// dir. It is how a savepoint's own directory gets a URL of its own.
func SubURL(base, dir string) (string, error) {
	u, err := url.Parse(base)
	if err != nil {
		return "", fmt.Errorf("storage URL: %w", err)
	}
	if u.Scheme == "" {
		return "", fmt.Errorf("storage URL %q has no scheme", redact(base, u))
	}
	q := u.Query()
	prefix := q.Get("prefix")
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	q.Set("prefix", prefix+strings.TrimPrefix(dir, "/"))
	u.RawQuery = q.Encode()
	return u.String(), nil
}
