package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"gocloud.dev/blob"
	_ "gocloud.dev/blob/s3blob" // registers s3://
)

// A real S3 server for checkpoint storage: versitygw, Versity's S3 gateway,
// serving a directory of the test's temp dir on a loopback port. CI installs
// it (.ci/run); elsewhere a test that needs it is skipped when it is not on
// PATH. Its posix backend keeps object metadata in extended attributes, so
// the temp dir must be on a file system that has them (ext4, xfs, btrfs).

const (
	versitygwInstall = "github.com/versity/versitygw/cmd/versitygw@v1.8.0"
	s3Bucket         = "coordflow-it"
	s3Region         = "us-east-1"
	s3AccessKey      = "coordflow-it-access"
	s3SecretKey      = "coordflow-it-secret"
	s3HealthPath     = "/health" // versitygw --health: answers 200 once it serves
)

// s3Server is one versitygw process and the directory it serves. Its methods
// are called from the goroutine of the test that started it: they fail that
// test on error.
type s3Server struct {
	t       *testing.T
	bin     string
	addr    string // 127.0.0.1:port, the same over restarts
	root    string // the gateway's directory; the bucket is its subdirectory s3Bucket
	logPath string
	client  *http.Client
	p       *proc   // current run
	runs    []*proc // every run started, killed when the test ends
}

// startS3 starts versitygw on a free loopback port, serving a fresh
// directory that holds one empty bucket, s3Bucket, and waits until it
// answers. It is killed when the test ends; if the test failed, the tail of
// its log is printed. Without versitygw the test is skipped, or fails when
// CI=true.
func startS3(t *testing.T) *s3Server {
	t.Helper()
	dir := t.TempDir()
	s := &s3Server{
		t:       t,
		bin:     versitygwBinary(t),
		root:    filepath.Join(dir, "root"),
		logPath: filepath.Join(dir, "versitygw.log"),
		client:  &http.Client{Timeout: httpTimeout},
	}
	// The posix backend serves every directory under root as a bucket; one
	// made here has no ACL attribute, which leaves it to the root account.
	if err := os.MkdirAll(filepath.Join(s.root, s3Bucket), 0o755); err != nil {
		t.Fatalf("versitygw: create bucket directory: %v", err)
	}
	// Cleanups run last-registered first: kill, then print the log.
	t.Cleanup(s.printLogIfFailed)
	t.Cleanup(func() {
		for _, p := range s.runs {
			_ = p.signal(syscall.SIGKILL, stopTimeout)
		}
	})
	pick := func() { s.addr = freeAddrs(t, 1)[0] }
	pick()
	s.launch(pick)
	t.Logf("versitygw serving %s on %s", s.root, s.addr)
	return s
}

// versitygwBinary returns the path of versitygw, or skips the test (fails it
// in CI) if it is not installed.
func versitygwBinary(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("versitygw")
	if err == nil {
		return bin
	}
	msg := fmt.Sprintf("versitygw is not on PATH (go install %s): tests against a real S3 server need it", versitygwInstall)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// launch starts versitygw on s.addr and waits until its health endpoint
// answers. repick nil means the port is fixed (a restart).
func (s *s3Server) launch(repick func()) {
	s.t.Helper()
	s.p = launchProc(s.t, launchSpec{
		name:    "versitygw",
		bin:     s.bin,
		logPath: s.logPath,
		// The root account's keys go in the environment, not on the
		// command line the harness logs.
		env: []string{"ROOT_ACCESS_KEY=" + s3AccessKey, "ROOT_SECRET_KEY=" + s3SecretKey},
		args: func() []string {
			return []string{"--port", s.addr, "--health", s3HealthPath, "posix", s.root}
		},
		ready:   s.healthy,
		repick:  repick,
		started: func(p *proc) { s.runs = append(s.runs, p) },
	})
}

// healthy reports whether versitygw answers its health endpoint.
func (s *s3Server) healthy(*proc) (bool, error) {
	resp, err := s.client.Get("http://" + s.addr + s3HealthPath)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("GET %s: %s", s3HealthPath, resp.Status)
	}
	return true, nil
}

// URL returns the checkpoint storage URL of the objects under prefix in the
// bucket ("" for the whole bucket), as coordd and workerd take it. Clients
// need the credentials of Env.
func (s *s3Server) URL(prefix string) string {
	u := "s3://" + s3Bucket + "?endpoint=http://" + s.addr + "&region=" + s3Region + "&use_path_style=true"
	if prefix != "" {
		// Slashes are valid in a query value; left unescaped, the URL reads
		// as the storage docs write it.
		u += "&prefix=" + strings.ReplaceAll(url.QueryEscape(prefix), "%2F", "/")
	}
	return u
}

// Env returns the environment ("KEY=value") an AWS SDK client needs to use
// the server as its root account: add it to clusterOpts.env, or to the test
// binary's own with t.Setenv. It also blanks the variables a developer's
// shell may hold that the SDK would mix in (a session token, a profile that
// does not exist here); the SDK treats an empty variable as unset.
func (s *s3Server) Env() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + s3AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + s3SecretKey,
		"AWS_REGION=" + s3Region,
		"AWS_SESSION_TOKEN=",
		"AWS_PROFILE=",
		"AWS_DEFAULT_PROFILE=",
	}
}

// Stop SIGKILLs versitygw: storage is down until Restart. Requests fail with
// a refused connection.
func (s *s3Server) Stop() {
	s.t.Helper()
	if err := s.p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		s.t.Fatal(err)
	}
	s.t.Logf("killed versitygw (SIGKILL)")
}

// Restart starts a stopped versitygw again on the same port and directory,
// and waits until it answers. Objects written before Stop are there.
func (s *s3Server) Restart() {
	s.t.Helper()
	if !s.p.hasExited() {
		s.t.Fatal("restart versitygw: it is still running")
	}
	s.launch(nil)
	s.t.Logf("restarted versitygw on %s", s.addr)
}

// printLogIfFailed prints the tail of versitygw's log if the test failed.
func (s *s3Server) printLogIfFailed() {
	if !s.t.Failed() {
		return
	}
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		s.t.Logf("log %s: %v", s.logPath, err)
		return
	}
	s.t.Logf("---- last %d lines of %s ----\n%s", logTailLines, filepath.Base(s.logPath), tail(string(b), logTailLines))
}

// TestS3ServerHarness: an object written through gocloud.dev/blob is
// readable, a read fails while versitygw is down, and the object is there
// again after a restart.
func TestS3ServerHarness(t *testing.T) {
	s := startS3(t)
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	ctx := context.Background()
	b, err := blob.OpenBucket(ctx, s.URL("it/"))
	if err != nil {
		t.Fatalf("open %s: %v", s.URL("it/"), err)
	}
	defer b.Close()

	const key = "job-1/chk-1/state"
	want := []byte("checkpoint state")
	if err := b.WriteAll(ctx, key, want, nil); err != nil {
		t.Fatalf("write %s: %v", key, err)
	}
	read := func(timeout time.Duration) ([]byte, error) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return b.ReadAll(ctx, key)
	}
	if got, err := read(httpTimeout); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %s: %q, %v; want %q", key, got, err, want)
	}
	// The prefix is a directory of the bucket's.
	if _, err := os.Stat(filepath.Join(s.root, s3Bucket, "it", key)); err != nil {
		t.Errorf("object not in the bucket directory under the prefix: %v", err)
	}

	s.Stop()
	// The SDK retries a refused connection a few times, with backoff.
	got, err := read(10 * time.Second)
	if err == nil {
		t.Fatalf("read %s while versitygw is down: %q, no error", key, got)
	}
	t.Logf("read while versitygw is down: %v", err)

	s.Restart()
	if got, err := read(httpTimeout); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %s after restart: %q, %v; want %q", key, got, err, want)
	}
}
