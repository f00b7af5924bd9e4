// Package tlsutil creates and loads coordflow's certificates and builds the
// TLS configurations of every listener and dialer: mutual TLS where each side
// proves its role (coordinator, worker, client) and id with a certificate
// signed by the cluster's CA.
//
// The identity is the certificate's URI SAN, coordflow://ROLE/ID (client
// certificates add the API role: coordflow://client/NAME/ROLE). A peer is
// identified by its certificate, not by its address: addresses come from
// gossip and configuration, and a name check would only repeat, weaker, what
// the CA signature and the role already say. So dialers verify the chain and
// the role (and the id when they know it) instead of the host name, as
// Consul's verify_server_hostname checks a role name rather than an address.
//
// Certificates and keys are read again on Reload (coordd and workerd call it
// on SIGHUP), so they can be rotated without a restart: new handshakes use the
// new pair, established connections keep theirs.
package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
)

// Role is what a certificate's holder is allowed to be.
type Role string

// The roles of coordflow certificates.
const (
	// RoleCoordinator is a coordd: Raft peer, Control server, API server.
	RoleCoordinator Role = "coordinator"
	// RoleWorker is a workerd: Control client, data server and client.
	RoleWorker Role = "worker"
	// RoleClient is a user of the HTTP API (the CLI, scripts).
	RoleClient Role = "client"
)

// uriScheme is the scheme of the identity SAN.
const uriScheme = "coordflow"

// Identity is who a certificate says its holder is.
type Identity struct {
	Role Role
	ID   string
	// APIRole is a client certificate's role in the HTTP API (read, write
	// or operator); empty for coordinators and workers.
	APIRole string
}

func (i Identity) String() string {
	if i.APIRole != "" {
		return fmt.Sprintf("%s %s (%s)", i.Role, i.ID, i.APIRole)
	}
	return fmt.Sprintf("%s %s", i.Role, i.ID)
}

// URI returns the identity SAN of i.
func (i Identity) URI() *url.URL {
	path := "/" + url.PathEscape(i.ID)
	if i.APIRole != "" {
		path += "/" + url.PathEscape(i.APIRole)
	}
	return &url.URL{Scheme: uriScheme, Host: string(i.Role), Path: path}
}

// ErrNoIdentity says a certificate carries no coordflow identity.
var ErrNoIdentity = errors.New("certificate has no coordflow identity (URI SAN coordflow://ROLE/ID)")

// IdentityOf returns the coordflow identity in cert's URI SANs.
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	for _, u := range cert.URIs {
		if u.Scheme != uriScheme {
			continue
		}
		parts := strings.Split(strings.TrimPrefix(u.EscapedPath(), "/"), "/")
		id, err := url.PathUnescape(parts[0])
		if err != nil || id == "" {
			return Identity{}, fmt.Errorf("identity SAN %q: bad id", u)
		}
		ident := Identity{Role: Role(u.Host), ID: id}
		switch ident.Role {
		case RoleCoordinator, RoleWorker:
			if len(parts) != 1 {
				return Identity{}, fmt.Errorf("identity SAN %q: want coordflow://%s/ID", u, ident.Role)
			}
		case RoleClient:
			if len(parts) != 2 {
				return Identity{}, fmt.Errorf("identity SAN %q: want coordflow://client/NAME/ROLE", u)
			}
			if ident.APIRole, err = url.PathUnescape(parts[1]); err != nil {
				return Identity{}, fmt.Errorf("identity SAN %q: bad role", u)
			}
		default:
			return Identity{}, fmt.Errorf("identity SAN %q: unknown role %q", u, u.Host)
		}
		return ident, nil
	}
	return Identity{}, ErrNoIdentity
}

// PeerIdentity returns the identity of the peer of an established TLS
// connection; it fails when the peer sent no certificate.
func PeerIdentity(cs tls.ConnectionState) (Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}, errors.New("peer sent no certificate")
	}
	return IdentityOf(cs.PeerCertificates[0])
}

// Files names a node's CA, certificate and key files (PEM).
type Files struct {
	CA, Cert, Key string
}

// Enabled reports whether any file is set: TLS is on.
func (f Files) Enabled() bool { return f.CA != "" || f.Cert != "" || f.Key != "" }

// Config is a node's loaded TLS material: the CA pool it trusts and its own
// certificate, which Reload replaces.
type Config struct {
	files Files

	mu    sync.RWMutex
	pool  *x509.CertPool
	cert  *tls.Certificate
	ident Identity
}

// Load reads the files of f; all three are required. want, if not empty, is
// the role the certificate must carry (a worker started with a coordinator's
// certificate fails at start, not at its first handshake).
func Load(f Files, want Role) (*Config, error) {
	if f.CA == "" || f.Cert == "" || f.Key == "" {
		return nil, errors.New("tls: -tls-ca, -tls-cert and -tls-key go together: set all three or none")
	}
	c := &Config{files: f}
	if err := c.load(want); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again; on error the old material stays in use.
func (c *Config) Reload() error {
	c.mu.RLock()
	want := c.ident.Role
	c.mu.RUnlock()
	return c.load(want)
}

func (c *Config) load(want Role) error {
	caPEM, err := os.ReadFile(c.files.CA)
	if err != nil {
		return fmt.Errorf("tls: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("tls: CA file %s holds no PEM certificate", c.files.CA)
	}
	cert, err := tls.LoadX509KeyPair(c.files.Cert, c.files.Key)
	if err != nil {
		return fmt.Errorf("tls: load certificate %s and key %s: %w", c.files.Cert, c.files.Key, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("tls: parse certificate %s: %w", c.files.Cert, err)
		}
	}
	ident, err := IdentityOf(leaf)
	if err != nil {
		return fmt.Errorf("tls: certificate %s: %w", c.files.Cert, err)
	}
	if want != "" && ident.Role != want {
		return fmt.Errorf("tls: certificate %s is a %s certificate; this process needs a %s certificate", c.files.Cert, ident.Role, want)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("tls: certificate %s is not signed by the CA in %s: %w", c.files.Cert, c.files.CA, err)
	}
	c.mu.Lock()
	c.pool, c.cert, c.ident = pool, &cert, ident
	c.mu.Unlock()
	return nil
}

// Files returns the files c was loaded from.
func (c *Config) Files() Files { return c.files }

// Identity returns the identity in this node's own certificate.
func (c *Config) Identity() Identity {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.ident
}

func (c *Config) current() (*x509.CertPool, *tls.Certificate) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.pool, c.cert
}

// ServerConfig is the configuration of a listener that requires a client
// certificate of one of the roles accept.
func (c *Config) ServerConfig(accept ...Role) *tls.Config {
	return c.serverConfig(tls.RequireAnyClientCert, accept)
}

// OptionalClientCertConfig is the configuration of a listener where a client
// certificate is optional (the HTTP API, which also takes tokens); one that
// is sent must be valid and of a role in accept.
func (c *Config) OptionalClientCertConfig(accept ...Role) *tls.Config {
	return c.serverConfig(tls.RequestClientCert, accept)
}

func (c *Config) serverConfig(auth tls.ClientAuthType, accept []Role) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The chain is verified by verifyPeer (with the pool of the moment),
		// so that Reload also changes the trusted CA.
		ClientAuth: auth,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			_, cert := c.current()
			return cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 && auth == tls.RequestClientCert {
				return nil
			}
			_, err := c.verifyPeer(cs, x509.ExtKeyUsageClientAuth, accept, "")
			return err
		},
	}
}

// ClientConfig is the configuration of a dialer to a server of role want
// (and id wantID, if not empty); it presents this node's certificate.
func (c *Config) ClientConfig(want Role, wantID string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Host names are not checked: verifyPeer checks the chain and the
		// identity instead (see the package comment).
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			_, cert := c.current()
			return cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := c.verifyPeer(cs, x509.ExtKeyUsageServerAuth, []Role{want}, wantID)
			return err
		},
	}
}

// verifyPeer verifies the peer's chain against the CA of the moment; see
// VerifyPeer.
func (c *Config) verifyPeer(cs tls.ConnectionState, usage x509.ExtKeyUsage, accept []Role, wantID string) (Identity, error) {
	pool, _ := c.current()
	ident, err := VerifyPeer(pool, cs, usage, wantID, accept...)
	if err != nil {
		return Identity{}, fmt.Errorf("tls: %w", err)
	}
	return ident, nil
}

// ErrNotFromCA says a peer's certificate does not chain to the trusted CA.
var ErrNotFromCA = errors.New("peer certificate is not from the CA")

// VerifyPeer checks the peer of an established connection against pool:
// its chain (with usage), and that its identity has one of the roles accept
// and, if wantID is set, that id. Dialers that skip host-name checks (see
// the package comment) call it from tls.Config.VerifyConnection.
func VerifyPeer(pool *x509.CertPool, cs tls.ConnectionState, usage x509.ExtKeyUsage, wantID string, accept ...Role) (Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}, errors.New("peer sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, ic := range cs.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrNotFromCA, err)
	}
	ident, err := IdentityOf(leaf)
	if err != nil {
		return Identity{}, fmt.Errorf("peer certificate: %w", err)
	}
	if !slices.Contains(accept, ident.Role) {
		return Identity{}, fmt.Errorf("peer is %s; only %v may connect here", ident, accept)
	}
	if wantID != "" && ident.ID != wantID {
		return Identity{}, fmt.Errorf("peer is %s, not %s %s", ident, ident.Role, wantID)
	}
	return ident, nil
}
