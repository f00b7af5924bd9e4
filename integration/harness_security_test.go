package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// clusterSecurity is the security material of a cluster started with
// clusterOpts.secure, made the way an operator makes it: with `coordd tls`
// and `coordd keygen`, and a tokens file with one token per API role.
type clusterSecurity struct {
	t         *testing.T // the test the cluster belongs to
	dir       string     // CA, certificates and keys
	gossipKey string     // base64
	tokens    map[string]string
	tokenFile string
	pool      *x509.CertPool
}

// apiRoles are the roles of the tokens a secure cluster has.
var apiRoles = []string{"read", "write", "operator"}

// newClusterSecurity creates a CA, a gossip key and a token per role under
// dir. Certificates are issued by certFlags when a process first needs one.
func newClusterSecurity(t *testing.T, dir string) *clusterSecurity {
	t.Helper()
	s := &clusterSecurity{t: t, dir: filepath.Join(dir, "tls"), tokens: make(map[string]string), tokenFile: filepath.Join(dir, "acl-tokens.json")}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	runCoordd(t, "tls", "ca", "create", "-dir", s.dir)
	s.gossipKey = strings.TrimSpace(runCoordd(t, "keygen"))
	var list []map[string]string
	for _, role := range apiRoles {
		s.tokens[role] = strings.TrimSpace(runCoordd(t, "keygen"))
		list = append(list, map[string]string{"name": "test-" + role, "token": s.tokens[role], "role": role})
	}
	data, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.tokenFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	pem, err := os.ReadFile(s.caFile())
	if err != nil {
		t.Fatal(err)
	}
	s.pool = x509.NewCertPool()
	if !s.pool.AppendCertsFromPEM(pem) {
		t.Fatalf("%s holds no certificate", s.caFile())
	}
	return s
}

func (s *clusterSecurity) caFile() string { return filepath.Join(s.dir, "ca.pem") }

// certFiles returns the certificate and key of role-id, issuing them with
// `coordd tls cert create` the first time.
func (s *clusterSecurity) certFiles(t *testing.T, role, id string) (cert, key string) {
	t.Helper()
	cert = filepath.Join(s.dir, role+"-"+id+".pem")
	key = filepath.Join(s.dir, role+"-"+id+"-key.pem")
	if _, err := os.Stat(cert); err != nil {
		runCoordd(t, "tls", "cert", "create", "-dir", s.dir, "-"+role, id)
	}
	return cert, key
}

// flags are the security flags of a coordd agent (role coordinator) or a
// workerd (role worker) with id.
func (s *clusterSecurity) flags(t *testing.T, role, id string) []string {
	cert, key := s.certFiles(t, role, id)
	f := []string{"-tls-ca", s.caFile(), "-tls-cert", cert, "-tls-key", key, "-encrypt", s.gossipKey}
	if role == "coordinator" {
		f = append(f, "-acl-tokens-file", s.tokenFile)
	}
	return f
}

// httpClient returns a client of the HTTP API that trusts the CA and
// presents no certificate: API users authenticate with tokens.
func (s *clusterSecurity) httpClient(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: s.pool, MinVersion: tls.VersionTLS12},
	}}
}

// cliEnv is the environment that points the CLI at a secure cluster.
func (s *clusterSecurity) cliEnv() []string {
	return []string{"COORD_CACERT=" + s.caFile(), "COORD_TOKEN=" + s.tokens["operator"]}
}

// scheme is the HTTP API's scheme: https on a secure cluster.
func (c *cluster) scheme() string {
	if c.sec != nil {
		return "https://"
	}
	return "http://"
}

// authorize adds the operator token to req on a secure cluster, unless it
// has an Authorization header already.
func (c *cluster) authorize(req *http.Request) {
	if c.sec != nil && req.Header.Get("Authorization") == "" {
		req.Header.Set("Authorization", "Bearer "+c.sec.tokens["operator"])
	}
}

// get is GET url with the cluster's client and the operator token.
func (c *cluster) get(client *http.Client, url string) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	c.authorize(req)
	return client.Do(req)
}

// cliEnv is the environment of a CLI run against addr.
func (c *cluster) cliEnv(addr string) []string {
	env := append(os.Environ(), "COORD_ADDR="+c.scheme()+addr)
	if c.sec != nil {
		env = append(env, c.sec.cliEnv()...)
	}
	return env
}

// runCoordd runs a local coordd command (no API) and returns its stdout.
func runCoordd(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary(t, "coordd"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("coordd %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// secFlags are the security flags of a process of role with id on a secure
// cluster, none otherwise.
func (c *cluster) secFlags(role, id string) []string {
	if c.sec == nil {
		return nil
	}
	return c.sec.flags(c.sec.t, role, id)
}
