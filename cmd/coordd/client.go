package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// defaultAddr is the coordinator the CLI talks to without -addr or COORD_ADDR.
const defaultAddr = "http://127.0.0.1:" + defaultAPIPort

// defaultAPIPort is the port of coordd's default -http-addr, which a bare
// -addr host goes to.
const defaultAPIPort = "7201"

// requestTimeout bounds one CLI request; a write waits for a Raft apply.
const requestTimeout = 30 * time.Second

// longRequestTimeout bounds the requests that wait for a savepoint or
// stream a whole state.
const longRequestTimeout = 15 * time.Minute

// apiClient calls the HTTP API of one coordinator.
type apiClient struct {
	base  string // scheme://host:port, no trailing slash
	hc    *http.Client
	token string // API token, sent as Authorization: Bearer
	// stale adds ?stale=true to reads: a coordinator that lost touch with
	// the leader answers anyway.
	stale bool
	// clientCert says a client certificate is configured (for hints).
	clientCert bool
	// jsonOut is -format json: commands print the API's JSON, for scripts,
	// instead of tables and sentences.
	jsonOut bool
}

// clientOptions are the connection flags every API command takes.
type clientOptions struct {
	addr                  string // a URL or a bare host:port
	token                 string
	caFile                string // CA of the cluster: verify the server against it, over https
	clientCert, clientKey string // a client certificate (coordd tls cert create -client NAME)
	stale                 bool
	format                string // table or json
}

// newAPIClient returns a client for o.addr. With a CA or a client
// certificate it speaks https, whatever scheme the address names.
func newAPIClient(o clientOptions) (*apiClient, error) {
	addr := o.addr
	bare := !strings.Contains(addr, "://")
	if bare {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("-addr %q: want http://host:port or https://host:port", o.addr)
	}
	if bare && u.Port() == "" {
		// A bare host (-addr c1) names a coordinator, whose API listens on
		// coordd's -http-addr port, not HTTP's 80; a URL's scheme says
		// otherwise (https://coordflow.example behind a proxy).
		u.Host = net.JoinHostPort(u.Hostname(), defaultAPIPort)
	}
	if (o.clientCert == "") != (o.clientKey == "") {
		return nil, errors.New("-client-cert and -client-key (COORD_CLIENT_CERT, COORD_CLIENT_KEY) go together")
	}
	// No client-wide timeout: each command's context bounds its requests.
	c := &apiClient{hc: &http.Client{}, token: o.token, stale: o.stale, clientCert: o.clientCert != "", jsonOut: o.format == "json"}
	if o.caFile != "" || o.clientCert != "" || u.Scheme == "https" {
		u.Scheme = "https"
		tc, err := cliTLSConfig(o.caFile, o.clientCert, o.clientKey)
		if err != nil {
			return nil, err
		}
		c.hc.Transport = &http.Transport{Proxy: http.ProxyFromEnvironment, TLSClientConfig: tc, TLSHandshakeTimeout: 10 * time.Second}
	}
	c.base = strings.TrimRight(u.String(), "/")
	return c, nil
}

// cliTLSConfig is the TLS configuration of the CLI. With a CA file the
// server must hold a coordinator certificate of that CA: like coordinators
// among themselves (transport/tlsutil), the CLI checks the certificate's
// chain and role rather than the host name, so any coordinator's address
// works, also one that gossip advertises. Without a CA file, the system's
// roots and the host name are checked, as for any https site.
func cliTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pemData, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			return nil, fmt.Errorf("-ca-file %s holds no PEM certificate", caFile)
		}
		tc.RootCAs = pool
		tc.InsecureSkipVerify = true //nolint:gosec // verified in VerifyConnection, by chain and role
		tc.VerifyConnection = func(cs tls.ConnectionState) error {
			_, err := tlsutil.VerifyPeer(pool, cs, x509.ExtKeyUsageServerAuth, "", tlsutil.RoleCoordinator)
			if errors.Is(err, tlsutil.ErrNotFromCA) {
				return fmt.Errorf("server certificate is not from the CA in %s: %w", caFile, err)
			}
			return err
		}
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("-client-cert %s and -client-key %s: %w", certFile, keyFile, err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// apiError is an error answer of the API: its status and {"error"} text.
type apiError struct {
	Status  int
	Message string
	// Hint says what to change, for 401 answers.
	Hint string
	// RetryAfter is the answer's Retry-After, in whole seconds; 0 if none.
	RetryAfter time.Duration
}

func (e *apiError) Error() string {
	switch e.Status {
	case http.StatusUnauthorized, http.StatusForbidden:
		msg := fmt.Sprintf("%d %s: %s", e.Status, http.StatusText(e.Status), e.Message)
		if e.Hint != "" {
			msg += " (" + e.Hint + ")"
		}
		return msg
	}
	return fmt.Sprintf("%s (HTTP %d %s)", e.Message, e.Status, http.StatusText(e.Status))
}

// newRequest builds a request to path with the client's credentials; reads
// (GET) ask for ?stale=true when the client is stale.
func (c *apiClient) newRequest(ctx context.Context, method, path string, body io.Reader) (*http.Request, error) {
	if c.stale && method == http.MethodGet {
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		path += sep + "stale=true"
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	return req, nil
}

// sendError explains a failed request, with a hint when the server's
// certificate could not be verified.
func (c *apiClient) sendError(method, path string, err error) error {
	var verr *tls.CertificateVerificationError
	if errors.As(err, &verr) {
		return fmt.Errorf("%s %s: %w (set -ca-file or COORD_CACERT to the cluster's ca.pem)", method, c.base+path, err)
	}
	return fmt.Errorf("%s %s: %w", method, c.base+path, err)
}

// answerError reads an error answer of status with body.
func (c *apiClient) answerError(status int, body []byte) *apiError {
	e := newAPIError(status, body)
	if status == http.StatusUnauthorized {
		switch {
		case c.token != "":
			e.Hint = "the token of -token or COORD_TOKEN was refused"
		case c.clientCert:
			e.Hint = "set -token or COORD_TOKEN"
		default:
			e.Hint = "set -token or COORD_TOKEN, or -client-cert and -client-key"
		}
	}
	return e
}

// do sends one request and returns the body of a 2xx answer, or an
// *apiError for any other.
func (c *apiClient) do(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	// A coordinator catching up (restarted, or just elected) refuses reads,
	// and a just elected leader writes, for a moment with 503 and
	// Retry-After, having done nothing: the request is sent again, for a
	// while.
	deadline := time.Now().Add(catchUpWait)
	for {
		data, err := c.doOnce(ctx, method, path, body, nil)
		var ae *apiError
		if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || !strings.Contains(ae.Message, "catching up") ||
			(method != http.MethodGet && !strings.Contains(ae.Message, "nothing done")) || time.Now().After(deadline) {
			return data, err
		}
		select {
		case <-ctx.Done():
			return data, err
		case <-time.After(catchUpRetry):
		}
	}
}

// catchUpWait bounds how long a read waits for a coordinator that is
// catching up, asking again every catchUpRetry.
const (
	catchUpWait  = 10 * time.Second
	catchUpRetry = 100 * time.Millisecond
)

// doOnce is one request of do, with the headers in hdr (may be nil).
func (c *apiClient) doOnce(ctx context.Context, method, path string, body []byte, hdr http.Header) ([]byte, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := c.newRequest(ctx, method, path, r)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for name, vals := range hdr {
		req.Header[name] = vals
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.sendError(method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", method, c.base+path, err)
	}
	if resp.StatusCode/100 != 2 {
		ae := c.answerError(resp.StatusCode, data)
		if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
			ae.RetryAfter = time.Duration(secs) * time.Second
		}
		return nil, ae
	}
	return data, nil
}

// Sending a write again: the window from the first attempt, the bound of
// each attempt, and the pause between attempts when the answer names none
// (Retry-After), and the most a Retry-After is followed.
const (
	resendWindow  = 30 * time.Second
	resendAttempt = requestTimeout
	resendPause   = 500 * time.Millisecond
	resendMaxWait = 5 * time.Second
)

// doAgain sends a write that is safe to send more than once (a submission
// with an Idempotency-Key, in hdr) until an answer settles it: it sends again, for up
// to resendWindow, after an answer that says the write was not done (503:
// no leader, an election, a coordinator catching up), one that says its
// outcome is unknown (502, 504) and a request that got no answer at all (a
// coordinator restarting, a broken connection), saying so on warn. The
// other answers, and a certificate the client does not trust, end it.
//
// uncertain reports whether an attempt before the last may have been done:
// one whose outcome was unknown, or that got no answer.
func (c *apiClient) doAgain(ctx context.Context, method, path string, body []byte, hdr http.Header, warn io.Writer) (data []byte, uncertain bool, err error) {
	deadline := time.Now().Add(resendWindow)
	for {
		actx, cancel := context.WithTimeout(ctx, resendAttempt)
		data, err = c.doOnce(actx, method, path, body, hdr)
		cancel()
		pause, again := resendPauseFor(err)
		if !again || ctx.Err() != nil || time.Now().Add(pause).After(deadline) {
			return data, uncertain, err
		}
		var ae *apiError
		var op *net.OpError
		switch {
		case errors.As(err, &ae) && ae.Status == http.StatusServiceUnavailable:
			// a write refused before the log
		case !errors.As(err, &ae) && errors.As(err, &op) && op.Op == "dial":
			// no connection: nothing sent
		default:
			uncertain = true
		}
		fmt.Fprintf(warn, "coordd: %v; sending it again in %v\n", err, pause)
		select {
		case <-ctx.Done():
			return data, uncertain, err
		case <-time.After(pause):
		}
	}
}

// resendPauseFor says whether doAgain sends again after err, and after how
// long.
func resendPauseFor(err error) (time.Duration, bool) {
	var ae *apiError
	var verr *tls.CertificateVerificationError
	switch {
	case err == nil, errors.As(err, &verr):
		return 0, false
	case errors.As(err, &ae):
		switch ae.Status {
		case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
			if ae.RetryAfter > 0 {
				return min(ae.RetryAfter, resendMaxWait), true
			}
			return resendPause, true
		}
		return 0, false
	}
	return resendPause, true // no answer
}

// newAPIError reads an error answer: its {"error"} text, else the body.
func newAPIError(status int, body []byte) *apiError {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &e) != nil || e.Error == "" {
		e.Error = strings.TrimSpace(string(body))
	}
	return &apiError{Status: status, Message: e.Error}
}

// getJSON GETs path and decodes the answer into out.
func (c *apiClient) getJSON(ctx context.Context, path string, out any) error {
	data, err := c.do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("GET %s: decode answer: %w", path, err)
	}
	return nil
}

// stream GETs path and copies a 2xx answer's body to w as it arrives.
func (c *apiClient) stream(ctx context.Context, path string, w io.Writer) (int64, error) {
	req, err := c.newRequest(ctx, http.MethodGet, path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, c.sendError(http.MethodGet, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return 0, c.answerError(resp.StatusCode, data)
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("GET %s: %w", c.base+path, err)
	}
	return n, nil
}
