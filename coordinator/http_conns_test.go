package coordinator

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/coordflow/coordflow/transport/tlsutil"
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
		if _, err := io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
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

// With TLS, the bound holds too: a connection past it is closed before its
// handshake (there is no plain-text way to answer 429 on it), and a
// connection closed makes room for a new one.
func TestHTTPMaxConnsPerClientTLS(t *testing.T) {
	pki := newTestPKI(t)
	cfg := testConfig(t, testLogger(t), "c1")
	cfg.BootstrapExpect = 1
	cfg.HTTPMaxConnsPerClient = 2
	cfg.TLS = pki.issue(tlsutil.RoleCoordinator, "c1")
	s := startServer(t, cfg)
	waitForLeader(t, s)
	client := pki.config(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "ops", APIRole: "operator"}).ClientConfig(tlsutil.RoleCoordinator, "")

	// open makes a TLS connection and asks for the status on it; the
	// connection stays open.
	open := func() (*tls.Conn, error) {
		d := &net.Dialer{Timeout: 10 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", s.HTTPAddr(), client)
		if err != nil {
			return nil, err
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
			c.Close()
			return nil, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			c.Close()
			return nil, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			c.Close()
			return nil, fmt.Errorf("status %s", resp.Status)
		}
		return c, nil
	}
	var held []*tls.Conn
	for i := range 2 {
		c, err := open()
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		t.Cleanup(func() { c.Close() })
		held = append(held, c)
	}
	if c, err := open(); err == nil {
		c.Close()
		t.Fatal("a third TLS connection from one address was served; the bound is 2")
	}
	if n := testutil.ToFloat64(s.metrics.httpConnsRefused); n < 1 {
		t.Fatalf("coordflow_http_connections_refused_total = %v, want at least 1", n)
	}
	held[0].Close()
	waitFor(t, 10*time.Second, func() error {
		c, err := open()
		if err != nil {
			return fmt.Errorf("after one connection closed: %v", err)
		}
		return c.Close()
	})
}
