package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// issue creates a CA in dir (once) and a certificate for ident, and loads it.
func issue(t *testing.T, dir string, ident Identity) *Config {
	t.Helper()
	if _, _, err := CreateCA(dir, time.Hour); err != nil && !strings.Contains(err.Error(), "exists") {
		t.Fatal(err)
	}
	cert, key, err := CreateCert(CertRequest{Dir: dir, Identity: ident, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c, err := Load(Files{CA: filepath.Join(dir, CAFile), Cert: cert, Key: key}, ident.Role)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// serve accepts TLS connections with cfg and echoes one byte on each; it
// returns the listener's address.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err == nil {
					_, _ = c.Write(b[:])
				}
			}()
		}
	}()
	return lis.Addr().String()
}

// roundTrip dials addr with cfg and exchanges one byte.
func roundTrip(addr string, cfg *tls.Config) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte{1}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err
}

func TestMutualTLSChecksRoleAndID(t *testing.T) {
	dir, otherDir := t.TempDir(), t.TempDir()
	c1 := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c1"})
	c2 := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c2"})
	w1 := issue(t, dir, Identity{Role: RoleWorker, ID: "w1"})
	stranger := issue(t, otherDir, Identity{Role: RoleCoordinator, ID: "c2"})

	raftAddr := serve(t, c1.ServerConfig(RoleCoordinator))
	if err := roundTrip(raftAddr, c2.ClientConfig(RoleCoordinator, "c1")); err != nil {
		t.Fatalf("coordinator to coordinator: %v", err)
	}
	for name, cfg := range map[string]*tls.Config{
		"worker certificate":       w1.ClientConfig(RoleCoordinator, ""),
		"certificate of other CA":  stranger.ClientConfig(RoleCoordinator, ""),
		"no certificate":           {InsecureSkipVerify: true}, //nolint:gosec // the attacker's side
		"server is not c9":         c2.ClientConfig(RoleCoordinator, "c9"),
		"server is not a worker":   c2.ClientConfig(RoleWorker, ""),
		"client trusts another CA": stranger.ClientConfig(RoleCoordinator, "c1"),
	} {
		if err := roundTrip(raftAddr, cfg); err == nil {
			t.Errorf("%s: connection accepted", name)
		}
	}

	// A plain TCP client gets no answer.
	conn, err := net.DialTimeout("tcp", raftAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = conn.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	if b, _ := io.ReadAll(conn); strings.Contains(string(b), "\x01") {
		t.Errorf("plain connection got an answer: %q", b)
	}
}

func TestOptionalClientCertificate(t *testing.T) {
	dir := t.TempDir()
	c1 := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c1"})
	w1 := issue(t, dir, Identity{Role: RoleWorker, ID: "w1"})
	cli := issue(t, dir, Identity{Role: RoleClient, ID: "ci", APIRole: "read"})
	if got := cli.Identity(); got.APIRole != "read" || got.ID != "ci" {
		t.Fatalf("client identity %v", got)
	}
	addr := serve(t, c1.OptionalClientCertConfig(RoleClient, RoleCoordinator))
	anon := &tls.Config{RootCAs: c1.pool, ServerName: "127.0.0.1"}
	if err := roundTrip(addr, anon); err != nil {
		t.Fatalf("no client certificate: %v", err)
	}
	if err := roundTrip(addr, cli.ClientConfig(RoleCoordinator, "")); err != nil {
		t.Fatalf("client certificate: %v", err)
	}
	if err := roundTrip(addr, w1.ClientConfig(RoleCoordinator, "")); err == nil {
		t.Fatal("worker certificate accepted on the API")
	}
}

func TestReloadRotatesCertificate(t *testing.T) {
	dir := t.TempDir()
	c1 := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c1"})
	// Replace c1's files by a certificate of a new CA: after Reload the node
	// trusts and presents only the new material.
	newDir := t.TempDir()
	fresh := issue(t, newDir, Identity{Role: RoleCoordinator, ID: "c1"})
	c1.files = fresh.files
	if err := c1.Reload(); err != nil {
		t.Fatal(err)
	}
	addr := serve(t, c1.ServerConfig(RoleCoordinator))
	if err := roundTrip(addr, fresh.ClientConfig(RoleCoordinator, "c1")); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	old := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c2"})
	if err := roundTrip(addr, old.ClientConfig(RoleCoordinator, "c1")); err == nil {
		t.Fatal("certificate of the old CA accepted after rotation")
	}
}

func TestLoadRejectsWrongRoleAndMissingFiles(t *testing.T) {
	dir := t.TempDir()
	w := issue(t, dir, Identity{Role: RoleWorker, ID: "w1"})
	if _, err := Load(w.files, RoleCoordinator); err == nil || !strings.Contains(err.Error(), "worker certificate") {
		t.Fatalf("worker certificate loaded as coordinator: %v", err)
	}
	if _, err := Load(Files{CA: w.files.CA}, RoleWorker); err == nil {
		t.Fatal("CA alone accepted")
	}
	if _, _, err := CreateCA(dir, time.Hour); err == nil {
		t.Fatal("CA overwritten")
	}
	if _, _, err := CreateCert(CertRequest{Dir: dir, Identity: Identity{Role: RoleWorker, ID: "w1"}, Validity: time.Hour}); err == nil {
		t.Fatal("certificate overwritten")
	}
	if _, _, err := CreateCert(CertRequest{Dir: dir, Identity: Identity{Role: RoleWorker, ID: "../x"}, Validity: time.Hour}); err == nil {
		t.Fatal("bad id accepted")
	}
	if got, err := IdentityOf(w.cert.Leaf); err != nil || got != (Identity{Role: RoleWorker, ID: "w1"}) {
		t.Fatalf("identity of w1's certificate: %v, %v", got, err)
	}
	if _, err := IdentityOf(&x509.Certificate{}); !errors.Is(err, ErrNoIdentity) {
		t.Fatalf("certificate without SAN: %v", err)
	}
}

// A reload that finds broken files (a half-written certificate, a key that
// does not match, a certificate of another role) fails and keeps the old
// material in use: a bad SIGHUP never takes a node off the network.
func TestReloadKeepsOldMaterialOnBrokenFiles(t *testing.T) {
	dir := t.TempDir()
	c1 := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c1"})
	peer := issue(t, dir, Identity{Role: RoleCoordinator, ID: "c2"})
	worker := issue(t, dir, Identity{Role: RoleWorker, ID: "w1"})
	addr := serve(t, c1.ServerConfig(RoleCoordinator))
	good := c1.files
	for name, broken := range map[string]func() Files{
		"garbage certificate": func() Files {
			f := good
			f.Cert = filepath.Join(t.TempDir(), "cert.pem")
			if err := os.WriteFile(f.Cert, []byte("-----BEGIN CERTIFICATE-----\nnot base64\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			return f
		},
		"key of another certificate":  func() Files { f := good; f.Key = peer.files.Key; return f },
		"certificate of another role": func() Files { f := good; f.Cert, f.Key = worker.files.Cert, worker.files.Key; return f },
		"missing CA":                  func() Files { f := good; f.CA = filepath.Join(t.TempDir(), "none.pem"); return f },
	} {
		c1.files = broken()
		if err := c1.Reload(); err == nil {
			t.Errorf("%s: reload succeeded", name)
		}
		if err := roundTrip(addr, peer.ClientConfig(RoleCoordinator, "c1")); err != nil {
			t.Errorf("%s: the old material is no longer served after the failed reload: %v", name, err)
		}
	}
}
