// Package ui is coordd's web dashboard: static HTML, CSS and JavaScript
// embedded in the binary, so that building coordflow needs no JavaScript
// toolchain and every coordd serves the dashboard of its own version.
//
// The pages run in the browser and read the HTTP API of the coordinator that
// served them (same origin); this package serves files only. docs/dashboard.md
// describes the pages.
package ui

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"strings"
)

// Prefix is the path the dashboard is served under. Handler expects request
// paths that begin with it.
const Prefix = "/ui/"

//go:embed static
var static embed.FS

// contentSecurityPolicy allows the page's own files and nothing else: no
// inline script or style, no other origin, no framing. The pages build
// their DOM with textContent, so API data is never parsed as HTML either.
const contentSecurityPolicy = "default-src 'self'; img-src 'self' data:; style-src 'self'; " +
	"script-src 'self'; connect-src 'self'; frame-ancestors 'none'"

// Handler returns the handler of GET and HEAD requests for Prefix and the
// paths under it: Prefix itself serves index.html, Prefix+"app.js" the
// file app.js, and a path with no file is 404. The caller routes requests to
// it (and decides on authentication: the files hold no data, so the API's
// guard may let them through with no token).
func Handler() http.Handler {
	files, err := fs.Sub(static, "static")
	if err != nil {
		panic("ui: embedded files: " + err.Error()) // the embed directive guarantees "static"
	}
	etags := fileETags(files)
	fileServer := http.StripPrefix(strings.TrimSuffix(Prefix, "/"), http.FileServerFS(files))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		if !strings.HasPrefix(r.URL.Path, Prefix) {
			http.NotFound(w, r)
			return
		}
		h := w.Header()
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		// no-cache: the browser revalidates every load, so a page never
		// mixes files of two coordd versions after an upgrade; the ETag
		// makes the revalidation a 304.
		h.Set("Cache-Control", "no-cache")
		name := strings.TrimPrefix(r.URL.Path, Prefix)
		if name == "" {
			name = "index.html"
		}
		if tag, ok := etags[name]; ok {
			h.Set("ETag", tag)
		}
		fileServer.ServeHTTP(w, r)
	})
}

// fileETags returns a strong ETag for every regular file of files, by its
// path: the embedded files have no modification time for
// If-Modified-Since, so a content hash lets browsers revalidate instead.
func fileETags(files fs.FS) map[string]string {
	tags := make(map[string]string)
	err := fs.WalkDir(files, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(files, path)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(b)
		tags[path] = `"` + hex.EncodeToString(sum[:12]) + `"`
		return nil
	})
	if err != nil {
		panic("ui: embedded files: " + err.Error()) // reading embedded files cannot fail
	}
	return tags
}
