package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// defaultAddr is the coordinator the CLI talks to without -addr or COORD_ADDR.
const defaultAddr = "http://127.0.0.1:7201"

// requestTimeout bounds one CLI request; a write waits for a Raft apply.
const requestTimeout = 30 * time.Second

// longRequestTimeout bounds the requests that wait for a savepoint or
// stream a whole state.
const longRequestTimeout = 15 * time.Minute

// apiClient calls the HTTP API of one coordinator.
type apiClient struct {
	base string // scheme://host:port, no trailing slash
	hc   *http.Client
}

// newAPIClient returns a client for addr, a URL or a bare host:port.
func newAPIClient(addr string) (*apiClient, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("-addr %q: want http://host:port", addr)
	}
	// No client-wide timeout: each command's context bounds its requests.
	return &apiClient{base: strings.TrimRight(u.String(), "/"), hc: &http.Client{}}, nil
}

// apiError is an error answer of the API: its status and {"error"} text.
type apiError struct {
	Status  int
	Message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("%s (HTTP %d %s)", e.Message, e.Status, http.StatusText(e.Status))
}

// do sends one request and returns the body of a 2xx answer, or an
// *apiError for any other.
func (c *apiClient) do(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, r)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, c.base+path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", method, c.base+path, err)
	}
	if resp.StatusCode/100 != 2 {
		return nil, newAPIError(resp.StatusCode, data)
	}
	return data, nil
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("GET %s: %w", c.base+path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return 0, newAPIError(resp.StatusCode, data)
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("GET %s: %w", c.base+path, err)
	}
	return n, nil
}
