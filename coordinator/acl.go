package coordinator

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// Access to the HTTP API (docs/operations.md, "API tokens").
//
// A request is authenticated by, in this order:
//  1. a coordinator certificate (TLS): a follower forwarding a request it
//     has authorized itself; it counts as operator;
//  2. an API token, `Authorization: Bearer TOKEN`, from -acl-tokens-file;
//  3. a client certificate (TLS), with the API role in its identity SAN.
//
// Without any of them a request is anonymous: on a coordinator with neither
// a tokens file nor TLS everything is open (as before tokens existed; coordd
// warns at start); otherwise an anonymous request may only read
// GET /v1/status, as Consul's status endpoints need no token.

// apiRole is what a token or client certificate may do; each role may do
// what the roles below it may.
type apiRole int

const (
	// roleNone marks endpoints anyone may call, and anonymous requests on a
	// coordinator that is not open.
	roleNone apiRole = iota
	// roleRead may GET every endpoint (jobs, state, members, metrics).
	roleRead
	// roleWrite may also submit and cancel jobs, take and delete
	// savepoints and abort transactions: every non-GET under /v1/jobs and
	// /v1/savepoints.
	roleWrite
	// roleOperator may also change the Raft configuration and profile the
	// process: everything.
	roleOperator
)

func (r apiRole) String() string {
	switch r {
	case roleRead:
		return "read"
	case roleWrite:
		return "write"
	case roleOperator:
		return "operator"
	}
	return "none"
}

// parseRole reads a role name of the tokens file or a client certificate.
func parseRole(s string) (apiRole, bool) {
	switch s {
	case "read":
		return roleRead, true
	case "write":
		return roleWrite, true
	case "operator":
		return roleOperator, true
	}
	return roleNone, false
}

// Limits of the tokens file.
const (
	maxTokensFileBytes = 1 << 20
	// minTokenLength keeps tokens out of reach of guessing: 16 random
	// characters or more (`openssl rand -hex 16` gives 32).
	minTokenLength = 16
	maxTokenLength = 4096
)

var validTokenName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$`)

// aclToken is one entry of the tokens file. Only the SHA-256 of the token is
// kept: lookups compare digests in constant time, so neither the time of a
// comparison nor a memory dump gives a token away.
type aclToken struct {
	name string
	role apiRole
	sum  [sha256.Size]byte
}

// aclTokens is the parsed tokens file; replaced whole on reload.
type aclTokens struct {
	file   string
	tokens []aclToken
}

// tokenFileEntry is the JSON of one token: {"name", "token", "role"}.
type tokenFileEntry struct {
	Name  string `json:"name"`
	Token string `json:"token"`
	Role  string `json:"role"`
}

// loadACLTokens reads and checks the tokens file: a JSON array of
// {"name", "token", "role"}, unknown fields refused, names and tokens
// unique, roles read, write or operator.
func loadACLTokens(path string) (*aclTokens, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("acl tokens file: %w", err)
	}
	defer f.Close()
	var warnings []string
	if fi, err := f.Stat(); err == nil && fi.Mode().Perm()&0o077 != 0 {
		warnings = append(warnings, fmt.Sprintf("acl tokens file %s is readable by other users (mode %v): chmod 600 it", path, fi.Mode().Perm()))
	}
	data, err := io.ReadAll(io.LimitReader(f, maxTokensFileBytes+1))
	if err != nil {
		return nil, nil, fmt.Errorf("acl tokens file %s: %w", path, err)
	}
	if len(data) > maxTokensFileBytes {
		return nil, nil, fmt.Errorf("acl tokens file %s: larger than %d bytes", path, maxTokensFileBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var entries []tokenFileEntry
	if err := dec.Decode(&entries); err != nil {
		return nil, nil, fmt.Errorf(`acl tokens file %s: want a JSON array of {"name", "token", "role"}: %w`, path, err)
	}
	if dec.More() {
		return nil, nil, fmt.Errorf("acl tokens file %s: data after the JSON array", path)
	}
	if len(entries) == 0 {
		return nil, nil, fmt.Errorf("acl tokens file %s holds no tokens: add one, or drop -acl-tokens-file", path)
	}
	t := &aclTokens{file: path}
	names := make(map[string]bool)
	sums := make(map[[sha256.Size]byte]string)
	for i, e := range entries {
		where := fmt.Sprintf("acl tokens file %s: token %d", path, i)
		if e.Name != "" {
			where += fmt.Sprintf(" (%q)", e.Name)
		}
		role, ok := parseRole(e.Role)
		switch {
		case !validTokenName.MatchString(e.Name):
			return nil, nil, fmt.Errorf("%s: name: want 1 to 128 letters, digits, '.', '_', '@' or '-'", where)
		case names[e.Name]:
			return nil, nil, fmt.Errorf("%s: name: used twice", where)
		case len(e.Token) < minTokenLength || len(e.Token) > maxTokenLength:
			return nil, nil, fmt.Errorf("%s: token: want %d to %d characters (e.g. openssl rand -hex 16)", where, minTokenLength, maxTokenLength)
		case strings.IndexFunc(e.Token, func(r rune) bool { return r <= ' ' || r >= 0x7f }) >= 0:
			return nil, nil, fmt.Errorf("%s: token: only printable ASCII without spaces goes in an Authorization header", where)
		case !ok:
			return nil, nil, fmt.Errorf("%s: role %q: want read, write or operator", where, e.Role)
		}
		sum := sha256.Sum256([]byte(e.Token))
		if other, dup := sums[sum]; dup {
			return nil, nil, fmt.Errorf("%s: token: same as token %q's", where, other)
		}
		names[e.Name], sums[sum] = true, e.Name
		t.tokens = append(t.tokens, aclToken{name: e.Name, role: role, sum: sum})
	}
	return t, warnings, nil
}

// lookup finds the entry of token. It compares token's digest with every
// entry's, never stopping early, in constant time per entry.
func (t *aclTokens) lookup(token string) (aclToken, bool) {
	sum := sha256.Sum256([]byte(token))
	var found aclToken
	ok := 0
	for _, e := range t.tokens {
		if subtle.ConstantTimeCompare(sum[:], e.sum[:]) == 1 {
			found, ok = e, 1
		}
	}
	return found, ok == 1
}

// ReloadACL reads the -acl-tokens-file again (coordd agent calls it on
// SIGHUP). On error the tokens in use stay. Without a tokens file at start
// there is nothing to reload: turning tokens on takes a restart.
func (s *Server) ReloadACL() error {
	if s.cfg.ACLTokensFile == "" {
		return errors.New("no -acl-tokens-file to reload: this coordinator started without API tokens")
	}
	t, warnings, err := loadACLTokens(s.cfg.ACLTokensFile)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		s.logger.Warn(w)
	}
	s.api.acl.Store(t)
	s.logger.Info("api tokens loaded", "file", s.cfg.ACLTokensFile, "tokens", len(t.tokens))
	return nil
}

// warnOpenAPI says at start how open the API is, bound at bound (the
// listener's address: on every interface, every one reaches it).
func (s *Server) warnOpenAPI(bound string) {
	switch {
	case s.cfg.ACLTokensFile == "" && s.cfg.TLS == nil:
		s.logger.Warn("the HTTP API is open: no -acl-tokens-file and no TLS, so anyone who reaches " + bound +
			" can submit and cancel jobs, remove raft peers and read all job state (docs/operations.md, API tokens)")
	case s.cfg.TLS == nil:
		s.logger.Warn("API tokens travel in clear text: the HTTP API has no TLS (-tls-ca, -tls-cert, -tls-key)")
	case s.cfg.ACLTokensFile == "":
		s.logger.Info("HTTP API over TLS without API tokens: requests need a client certificate (GET /v1/status excepted)")
	}
}

// principal is who made a request, as the API knows it.
type principal struct {
	// name is for logs and errors: "token ci", "client certificate alice",
	// "coordinator c2", "anonymous".
	name string
	role apiRole
	// credentials says the request carried a token or certificate: a
	// request without is answered 401, one with too small a role 403.
	credentials bool
}

// authError is a refused request: 401 or 403 and why.
type authError struct {
	status int
	msg    string
}

func (e *authError) Error() string { return e.msg }

// open reports whether the API takes every request as operator: no tokens
// file and no TLS.
func (s *Server) openAPI() bool {
	return s.cfg.ACLTokensFile == "" && s.cfg.TLS == nil
}

// authenticate finds who sent r (see the comment at the top of this file).
func (s *Server) authenticate(r *http.Request) (principal, *authError) {
	var cert *tlsutil.Identity
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		// The handshake verified the chain and the role
		// (OptionalClientCertConfig); this only reads the identity.
		if id, err := tlsutil.PeerIdentity(*r.TLS); err == nil {
			cert = &id
		}
	}
	if cert != nil && cert.Role == tlsutil.RoleCoordinator {
		return principal{name: "coordinator " + cert.ID, role: roleOperator, credentials: true}, nil
	}
	if s.openAPI() {
		// Nothing to check a token against; the API is open anyway.
		return principal{name: "anonymous", role: roleOperator}, nil
	}
	tokens := s.api.acl.Load()
	if h := r.Header.Get("Authorization"); h != "" && (tokens != nil || cert == nil) {
		// Without a tokens file the header is ignored when a client
		// certificate comes along (a CLI with COORD_TOKEN set).
		scheme, token, _ := strings.Cut(h, " ")
		token = strings.TrimSpace(token)
		if !strings.EqualFold(scheme, "Bearer") || token == "" {
			return principal{name: "anonymous"}, &authError{http.StatusUnauthorized, "Authorization header: want Bearer TOKEN"}
		}
		if tokens == nil {
			return principal{name: "anonymous"}, &authError{http.StatusUnauthorized,
				"this coordinator has no API tokens (-acl-tokens-file): authenticate with a client certificate"}
		}
		e, ok := tokens.lookup(token)
		if !ok {
			return principal{name: "unknown token"}, &authError{http.StatusUnauthorized, "unknown API token"}
		}
		return principal{name: fmt.Sprintf("token %q", e.name), role: e.role, credentials: true}, nil
	}
	if cert != nil && cert.Role == tlsutil.RoleClient {
		p := principal{name: fmt.Sprintf("client certificate %q", cert.ID), credentials: true}
		role, ok := parseRole(cert.APIRole)
		if !ok {
			return p, &authError{http.StatusForbidden, fmt.Sprintf("%s has API role %q: want read, write or operator", p.name, cert.APIRole)}
		}
		p.role = role
		return p, nil
	}
	return principal{name: "anonymous"}, nil
}

// authorize authenticates r and checks that it may call an endpoint that
// needs role need.
func (s *Server) authorize(r *http.Request, need apiRole) (principal, *authError) {
	p, aerr := s.authenticate(r)
	if aerr != nil || p.role >= need {
		return p, aerr
	}
	if !p.credentials {
		msg := "missing API token: send Authorization: Bearer TOKEN"
		switch {
		case s.cfg.ACLTokensFile == "":
			msg = "missing client certificate: this coordinator takes API requests with a client certificate only"
		case s.cfg.TLS != nil:
			msg += ", or a client certificate"
		}
		return p, &authError{http.StatusUnauthorized, msg}
	}
	return p, &authError{http.StatusForbidden, fmt.Sprintf("%s has role %s; %s %s needs role %s", p.name, p.role, r.Method, r.URL.Path, need)}
}

// refuse answers a refused request, logs it at debug level and counts it.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, p principal, e *authError) {
	if e.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="coordflow"`)
	}
	s.metrics.httpUnauthorized.WithLabelValues(fmt.Sprint(e.status)).Inc()
	s.logger.Debug("http request refused", "status", e.status, "method", r.Method, "path", r.URL.Path,
		"remote", r.RemoteAddr, "principal", p.name, "reason", e.msg)
	writeError(w, e.status, e.msg)
}
