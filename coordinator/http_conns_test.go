package coordinator

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// One client address holds at most HTTPMaxConnsPerClient connections: the
// next is answered 429 and closed before any request is read, and a
// connection closed makes room for a new one.
func TestHTTPMaxConnsPerClient(t *testing.T) {
	cfg := testConfig(t, testLogger(t), "c1")
	cfg.BootstrapExpect = 1
	cfg.HTTPMaxConnsPerClient = 3
	s := startServer(t, cfg)
	waitForLeader(t, s)

	// get sends one keep-alive request on c and returns the answer's status
	// line; the connection stays open.
	get := func(c net.Conn, r *bufio.Reader) (string, error) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return "", err
		}
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Status, nil
	}
	dial := func() (net.Conn, *bufio.Reader) {
		t.Helper()
		c, err := net.Dial("tcp", s.HTTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, bufio.NewReader(c)
	}
	var held []net.Conn
	for i := range 3 {
		c, r := dial()
		if st, err := get(c, r); err != nil || st != "200 OK" {
			t.Fatalf("connection %d: %q %v, want 200 OK", i+1, st, err)
		}
		held = append(held, c)
	}
	c, r := dial()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(r, nil) // answered before it asks
	if err != nil {
		t.Fatalf("fourth connection: %v, want a 429 answer", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(body), "too many connections") {
		t.Fatalf("fourth connection: %s %q, want 429 naming too many connections", resp.Status, body)
	}
	if _, err := r.ReadByte(); err == nil {
		t.Fatal("the refused connection stayed open")
	}
	if n := testutil.ToFloat64(s.metrics.httpConnsRefused); n != 1 {
		t.Fatalf("coordflow_http_connections_refused_total = %v, want 1", n)
	}

	held[0].Close()
	waitFor(t, 10*time.Second, func() error {
		c, r := dial()
		defer c.Close()
		st, err := get(c, r)
		if err != nil || st != "200 OK" {
			return fmt.Errorf("after one connection closed: %q %v", st, err)
		}
		return nil
	})
}
