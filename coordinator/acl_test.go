package coordinator

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// The tokens of the tests' tokens file, one per role.
const (
	readToken     = "read-token-0123456789"
	writeToken    = "write-token-0123456789"
	operatorToken = "operator-token-0123456789"
)

// writeTokensFile writes a tokens file with readToken, writeToken and
// operatorToken into dir and returns its path.
func writeTokensFile(t testing.TB, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "tokens.json")
	data := fmt.Sprintf(`[{"name": "reader", "token": %q, "role": "read"},
		{"name": "ci", "token": %q, "role": "write"},
		{"name": "ops", "token": %q, "role": "operator"}]`, readToken, writeToken, operatorToken)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startClusterWith is startCluster with each config changed by mutate.
func startClusterWith(t testing.TB, n int, mutate func(*Config)) []*Server {
	t.Helper()
	logger := testLogger(t)
	servers := make([]*Server, 0, n)
	for i := 1; i <= n; i++ {
		cfg := testConfig(t, logger, fmt.Sprintf("c%d", i))
		cfg.BootstrapExpect = n
		if i > 1 {
			cfg.Join = []string{servers[0].GossipAddr()}
		}
		mutate(&cfg)
		servers = append(servers, startServer(t, cfg))
	}
	waitForLeader(t, servers...)
	return servers
}

// httpAnswer is one HTTP answer of the API.
type httpAnswer struct {
	code   int
	header http.Header
	body   []byte
}

// errorText is the "error" of a JSON error answer.
func (a httpAnswer) errorText() string {
	var e struct{ Error string }
	_ = json.Unmarshal(a.body, &e)
	return e.Error
}

// request sends method path to base (scheme://host:port) with client, the
// token as a bearer token if not empty, and body if not empty.
func request(t testing.TB, client *http.Client, base, method, path, token, body string) httpAnswer {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, base+path, r)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s%s: %v", method, base, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s%s: read answer: %v", method, base, path, err)
	}
	return httpAnswer{code: resp.StatusCode, header: resp.Header, body: data}
}

// TestACLTokens checks the roles of API tokens on a cluster without TLS: a
// GET, a POST /v1/jobs and a DELETE /v1/raft/peers/x, on the leader and
// through a follower, which authorizes the request itself and forwards it
// with its token.
func TestACLTokens(t *testing.T) {
	tokens := writeTokensFile(t, t.TempDir())
	servers := startClusterWith(t, 3, func(c *Config) { c.ACLTokensFile = tokens })
	leader := waitForLeader(t, servers...)
	follower := followers(leader, servers)[0]
	hc := http.DefaultClient
	base := func(s *Server) string { return "http://" + s.HTTPAddr() }

	for _, tc := range []struct {
		name   string
		s      *Server
		method string
		path   string
		body   string
		token  string
		code   int
		errHas string
	}{
		{"status needs no token", follower, "GET", "/v1/status", "", "", 200, ""},
		{"read without token", leader, "GET", "/v1/jobs", "", "", 401, "missing API token"},
		{"read with unknown token", leader, "GET", "/v1/jobs", "", "not-a-token-0123456789", 401, "unknown API token"},
		{"read with read token", follower, "GET", "/v1/jobs", "", readToken, 200, ""},
		{"read with operator token", follower, "GET", "/v1/jobs", "", operatorToken, 200, ""},
		{"metrics with read token", leader, "GET", "/metrics", "", readToken, 200, ""},
		{"unknown path without token", leader, "GET", "/v1/nothing", "", "", 401, ""},
		{"submit without token", leader, "POST", "/v1/jobs", wordcountSpec, "", 401, "missing API token"},
		{"submit with read token", leader, "POST", "/v1/jobs", wordcountSpec, readToken, 403, `token "reader" has role read; POST /v1/jobs needs role write`},
		{"submit with write token", leader, "POST", "/v1/jobs", wordcountSpec, writeToken, 201, ""},
		{"submit through follower without token", follower, "POST", "/v1/jobs", wordcountSpec, "", 401, ""},
		{"submit through follower with read token", follower, "POST", "/v1/jobs", wordcountSpec, readToken, 403, "needs role write"},
		{"submit through follower with write token", follower, "POST", "/v1/jobs", wordcountSpec, writeToken, 201, ""},
		{"remove peer with write token", leader, "DELETE", "/v1/raft/peers/x", "", writeToken, 403, "needs role operator"},
		{"remove peer with operator token", leader, "DELETE", "/v1/raft/peers/x", "", operatorToken, 404, `no raft peer "x"`},
		{"remove peer through follower with write token", follower, "DELETE", "/v1/raft/peers/x", "", writeToken, 403, "needs role operator"},
		{"remove peer through follower with operator token", follower, "DELETE", "/v1/raft/peers/x", "", operatorToken, 404, `no raft peer "x"`},
	} {
		a := request(t, hc, base(tc.s), tc.method, tc.path, tc.token, tc.body)
		if a.code != tc.code || !strings.Contains(a.errorText(), tc.errHas) {
			t.Errorf("%s: %s %s on %s = %d %s, want %d and %q", tc.name, tc.method, tc.path, tc.s.ID(), a.code, a.body, tc.code, tc.errHas)
		}
		if a.code == http.StatusUnauthorized && !strings.HasPrefix(a.header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s: 401 without WWW-Authenticate: Bearer (%q)", tc.name, a.header.Get("WWW-Authenticate"))
		}
	}

	// A job submitted through the follower is there, on the follower too.
	var jobs []apiJob
	a := request(t, hc, base(follower), "GET", "/v1/jobs", readToken, "")
	if err := json.Unmarshal(a.body, &jobs); err != nil || len(jobs) != 2 {
		t.Errorf("GET /v1/jobs on %s: %s (%v), want the 2 jobs submitted", follower.ID(), a.body, err)
	}

	// Refusals are counted by code.
	a = request(t, hc, base(leader), "GET", "/metrics", readToken, "")
	for _, want := range []string{`coordflow_http_unauthorized_total{code="401"}`, `coordflow_http_unauthorized_total{code="403"}`} {
		if !strings.Contains(string(a.body), want) {
			t.Errorf("metrics of %s lack %s", leader.ID(), want)
		}
	}

	// A malformed Authorization header is refused, not ignored.
	req, _ := http.NewRequest("GET", base(leader)+"/v1/jobs", nil)
	req.Header.Set("Authorization", "Basic "+readToken)
	if resp, err := hc.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("Basic auth: %v %v, want 401", resp, err)
	} else {
		resp.Body.Close()
	}

	// Reloading the file swaps the tokens.
	if err := os.WriteFile(tokens, []byte(`[{"name": "new", "token": "new-token-0123456789", "role": "read"}]`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := leader.ReloadACL(); err != nil {
		t.Fatal(err)
	}
	if a := request(t, hc, base(leader), "GET", "/v1/jobs", readToken, ""); a.code != http.StatusUnauthorized {
		t.Errorf("old token after reload: %d, want 401", a.code)
	}
	if a := request(t, hc, base(leader), "GET", "/v1/jobs", "new-token-0123456789", ""); a.code != http.StatusOK {
		t.Errorf("new token after reload: %d %s, want 200", a.code, a.body)
	}
	// A broken file keeps the tokens in use.
	if err := os.WriteFile(tokens, []byte(`[{"name": "x", "token": "short", "role": "read"}]`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := leader.ReloadACL(); err == nil || !strings.Contains(err.Error(), "token") {
		t.Errorf("reload of a short token: %v, want an error naming the token", err)
	}
	if a := request(t, hc, base(leader), "GET", "/v1/jobs", "new-token-0123456789", ""); a.code != http.StatusOK {
		t.Errorf("token after a failed reload: %d, want 200", a.code)
	}
}

// TestACLTokensFile checks what loadACLTokens refuses.
func TestACLTokensFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ data, want string }{
		{`[{"name": "a", "token": "0123456789abcdef", "role": "read"}]`, ""},
		{`[]`, "holds no tokens"},
		{`{"name": "a"}`, "JSON array"},
		{`[{"name": "a", "token": "0123456789abcdef", "role": "read", "extra": 1}]`, "unknown field"},
		{`[{"name": "", "token": "0123456789abcdef", "role": "read"}]`, "name"},
		{`[{"name": "a", "token": "0123456789abcdef", "role": "admin"}]`, `role "admin"`},
		{`[{"name": "a", "token": "short", "role": "read"}]`, "token: want 16"},
		{`[{"name": "a", "token": "0123456789 abcdef", "role": "read"}]`, "without spaces"},
		{`[{"name": "a", "token": "0123456789abcdef", "role": "read"}, {"name": "a", "token": "0123456789abcdeg", "role": "read"}]`, "used twice"},
		{`[{"name": "a", "token": "0123456789abcdef", "role": "read"}, {"name": "b", "token": "0123456789abcdef", "role": "write"}]`, `same as token "a"`},
	} {
		path := filepath.Join(dir, "tokens.json")
		if err := os.WriteFile(path, []byte(tc.data), 0o600); err != nil {
			t.Fatal(err)
		}
		toks, _, err := loadACLTokens(path)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.data, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error with %q", tc.data, err, tc.want)
		case tc.want == "":
			if e, ok := toks.lookup("0123456789abcdef"); !ok || e.name != "a" || e.role != roleRead {
				t.Errorf("lookup: %+v %v", e, ok)
			}
			if _, ok := toks.lookup("0123456789abcdeF"); ok {
				t.Error("lookup of another token succeeded")
			}
		}
	}
	path := filepath.Join(dir, "open.json")
	if err := os.WriteFile(path, []byte(`[{"name": "a", "token": "0123456789abcdef", "role": "read"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, warnings, err := loadACLTokens(path); err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "chmod 600") {
		t.Errorf("world-readable file: warnings %q, err %v; want a chmod warning", warnings, err)
	}
}

// TestACLOverTLS runs a cluster whose HTTP API is served over TLS, with API
// tokens: client certificates authenticate with their role, tokens work over
// TLS, and a follower forwards over TLS, presenting its coordinator
// certificate. Without credentials only GET /v1/status answers.
func TestACLOverTLS(t *testing.T) {
	pki := newTestPKI(t)
	tokens := writeTokensFile(t, t.TempDir())
	servers := startClusterWith(t, 3, func(c *Config) {
		c.TLS = pki.config(tlsutil.Identity{Role: tlsutil.RoleCoordinator, ID: c.ID})
		c.ACLTokensFile = tokens
	})
	leader := waitForLeader(t, servers...)
	follower := followers(leader, servers)[0]
	base := "https://" + follower.HTTPAddr()

	anon := pki.client(tlsutil.Identity{})
	reader := pki.client(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "alice", APIRole: "read"})
	writer := pki.client(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "bob", APIRole: "write"})
	for _, tc := range []struct {
		name         string
		client       *http.Client
		method, path string
		body, token  string
		code         int
		errHas       string
	}{
		{"status anonymous", anon, "GET", "/v1/status", "", "", 200, ""},
		{"read anonymous", anon, "GET", "/v1/jobs", "", "", 401, "or a client certificate"},
		{"read with read certificate", reader, "GET", "/v1/jobs", "", "", 200, ""},
		{"read with token over TLS", anon, "GET", "/v1/jobs", "", readToken, 200, ""},
		{"submit with read certificate", reader, "POST", "/v1/jobs", wordcountSpec, "", 403, `client certificate "alice" has role read`},
		{"submit with read certificate and write token", reader, "POST", "/v1/jobs", wordcountSpec, writeToken, 201, ""},
		{"submit with write certificate through follower", writer, "POST", "/v1/jobs", wordcountSpec, "", 201, ""},
		{"submit with token through follower", anon, "POST", "/v1/jobs", wordcountSpec, writeToken, 201, ""},
		{"remove peer with write certificate", writer, "DELETE", "/v1/raft/peers/x", "", "", 403, "needs role operator"},
		{"remove peer with operator token through follower", anon, "DELETE", "/v1/raft/peers/x", "", operatorToken, 404, `no raft peer "x"`},
	} {
		a := request(t, tc.client, base, tc.method, tc.path, tc.token, tc.body)
		if a.code != tc.code || !strings.Contains(a.errorText(), tc.errHas) {
			t.Errorf("%s: %s %s on %s = %d %s, want %d and %q", tc.name, tc.method, tc.path, follower.ID(), a.code, a.body, tc.code, tc.errHas)
		}
	}

	// Plain HTTP on the TLS port gets no API answer.
	if resp, err := http.Get("http://" + follower.HTTPAddr() + "/v1/status"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP on the TLS port answered 200")
		}
	}
	// A worker certificate is refused in the handshake; so is a
	// certificate of another CA.
	worker := pki.client(tlsutil.Identity{Role: tlsutil.RoleWorker, ID: "w1"})
	if resp, err := worker.Get(base + "/v1/status"); err == nil {
		resp.Body.Close()
		t.Errorf("a worker certificate got %d, want a refused handshake", resp.StatusCode)
	}
	other := newTestPKI(t)
	otherClient := &http.Client{Transport: &http.Transport{TLSClientConfig: func() *tls.Config {
		tc := other.config(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "eve", APIRole: "operator"}).ClientConfig(tlsutil.RoleCoordinator, "")
		tc.VerifyConnection = nil // eve does not care whom she talks to
		return tc
	}()}}
	if resp, err := otherClient.Get(base + "/v1/jobs"); err == nil {
		resp.Body.Close()
		t.Errorf("a certificate of another CA got %d, want a refused handshake", resp.StatusCode)
	}
}

// TestTLSWithoutTokens runs the API over TLS without a tokens file: a
// client certificate is the only credential, and GET /v1/status stays open.
func TestTLSWithoutTokens(t *testing.T) {
	pki := newTestPKI(t)
	servers := startClusterWith(t, 1, func(c *Config) {
		c.TLS = pki.config(tlsutil.Identity{Role: tlsutil.RoleCoordinator, ID: c.ID})
	})
	base := "https://" + servers[0].HTTPAddr()
	anon := pki.client(tlsutil.Identity{})
	op := pki.client(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "root", APIRole: "operator"})
	if a := request(t, anon, base, "GET", "/v1/status", "", ""); a.code != http.StatusOK {
		t.Errorf("GET /v1/status without certificate: %d, want 200", a.code)
	}
	if a := request(t, anon, base, "GET", "/v1/jobs", "", ""); a.code != http.StatusUnauthorized || !strings.Contains(a.errorText(), "client certificate") {
		t.Errorf("GET /v1/jobs without certificate: %d %s, want 401 asking for a client certificate", a.code, a.body)
	}
	if a := request(t, anon, base, "GET", "/v1/jobs", readToken, ""); a.code != http.StatusUnauthorized || !strings.Contains(a.errorText(), "no API tokens") {
		t.Errorf("GET /v1/jobs with a token: %d %s, want 401: this coordinator has no tokens", a.code, a.body)
	}
	if a := request(t, op, base, "POST", "/v1/jobs", "", wordcountSpec); a.code != http.StatusCreated {
		t.Errorf("POST /v1/jobs with an operator certificate: %d %s, want 201", a.code, a.body)
	}
	if a := request(t, op, base, "GET", "/v1/jobs", readToken, ""); a.code != http.StatusOK {
		t.Errorf("GET /v1/jobs with a certificate and a token nobody checks: %d %s, want 200", a.code, a.body)
	}
}

// TestOpenAPI checks that a coordinator without tokens file and TLS takes
// every request, with or without a token.
func TestOpenAPI(t *testing.T) {
	s := startClusterWith(t, 1, func(*Config) {})[0]
	base := "http://" + s.HTTPAddr()
	if a := request(t, http.DefaultClient, base, "DELETE", "/v1/raft/peers/x", "", ""); a.code != http.StatusNotFound {
		t.Errorf("DELETE /v1/raft/peers/x on an open API: %d %s, want 404", a.code, a.body)
	}
	if a := request(t, http.DefaultClient, base, "GET", "/v1/jobs", "whatever-token-0123", ""); a.code != http.StatusOK {
		t.Errorf("GET /v1/jobs with a token on an open API: %d %s, want 200", a.code, a.body)
	}
	req, _ := http.NewRequest("GET", base+"/v1/jobs", nil)
	req.Header.Set("Authorization", "Basic dXNlcjpwYXNz")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("GET /v1/jobs with Basic auth on an open API: %v %v, want 200 (the header is ignored)", resp, err)
	} else {
		resp.Body.Close()
	}
}
