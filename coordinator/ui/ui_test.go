package ui

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()

	for _, tc := range []struct {
		path        string
		status      int
		contentType string // prefix
		body        string // substring
	}{
		{"/ui/", http.StatusOK, "text/html", `<script type="module" src="app.js">`},
		{"/ui/app.js", http.StatusOK, "text/javascript", "REFRESH_MS"},
		{"/ui/style.css", http.StatusOK, "text/css", ".banner"},
		{"/ui/no-such-file.js", http.StatusNotFound, "", ""},
		{"/other", http.StatusNotFound, "", ""},
	} {
		resp, err := http.Get(srv.URL + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != tc.status {
			t.Errorf("GET %s: status %d, want %d", tc.path, resp.StatusCode, tc.status)
			continue
		}
		if tc.status != http.StatusOK {
			continue
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, tc.contentType) {
			t.Errorf("GET %s: Content-Type %q, want %s", tc.path, ct, tc.contentType)
		}
		if !strings.Contains(string(b), tc.body) {
			t.Errorf("GET %s: body does not contain %q", tc.path, tc.body)
		}
		for name, want := range map[string]string{
			"Content-Security-Policy": contentSecurityPolicy,
			"X-Content-Type-Options":  "nosniff",
			"Cache-Control":           "no-cache",
			"Referrer-Policy":         "no-referrer",
		} {
			if got := resp.Header.Get(name); got != want {
				t.Errorf("GET %s: %s %q, want %q", tc.path, name, got, want)
			}
		}
	}
}

// TestHandlerRevalidates checks that a browser revalidating a file it has
// gets a 304: the embedded files have no modification time, so the ETag is
// what makes Cache-Control: no-cache cheap.
func TestHandlerRevalidates(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/ui/app.js")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	tag := resp.Header.Get("ETag")
	if tag == "" {
		t.Fatal("GET /ui/app.js: no ETag")
	}
	req, err := http.NewRequest(http.MethodGet, srv.URL+"/ui/app.js", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("If-None-Match", tag)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("GET /ui/app.js with If-None-Match %s: status %d, want 304", tag, resp.StatusCode)
	}
}

func TestHandlerMethods(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/ui/", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /ui/: status %d, want 405", resp.StatusCode)
	}
}

// TestNoInlineCode checks index.html against the Content-Security-Policy:
// an inline script, handler or style attribute would be refused by the
// browser, silently.
func TestNoInlineCode(t *testing.T) {
	b, err := static.ReadFile("static/index.html")
	if err != nil {
		t.Fatal(err)
	}
	html := string(b)
	for _, bad := range []string{"<script>", " style=", " onclick=", " onload=", "<style"} {
		if strings.Contains(html, bad) {
			t.Errorf("index.html contains %q, which the Content-Security-Policy forbids", bad)
		}
	}
}
