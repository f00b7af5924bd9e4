package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Default validity periods of generated certificates, as consul tls uses.
const (
	DefaultCAValidity   = 5 * 365 * 24 * time.Hour
	DefaultCertValidity = 365 * 24 * time.Hour
)

// The file names under a certificate dir.
const (
	CAFile    = "ca.pem"
	CAKeyFile = "ca-key.pem"
)

// validID is what an id in a certificate may look like: the same characters
// coordd and workerd accept as node ids.
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// CreateCA writes a new CA certificate and key to dir/ca.pem and
// dir/ca-key.pem; it refuses to overwrite an existing CA.
func CreateCA(dir string, validity time.Duration) (certPath, keyPath string, err error) {
	certPath, keyPath = filepath.Join(dir, CAFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Stat(p); err == nil {
			return "", "", fmt.Errorf("create CA: %s exists; remove it to create a new CA (every certificate must then be reissued)", p)
		}
	}
	key, serial, err := newKey()
	if err != nil {
		return "", "", fmt.Errorf("create CA: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "coordflow CA " + serial.Text(16)[:8], Organization: []string{"coordflow"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", fmt.Errorf("create CA: %w", err)
	}
	if err := writePair(certPath, keyPath, der, key); err != nil {
		return "", "", fmt.Errorf("create CA: %w", err)
	}
	return certPath, keyPath, nil
}

// CertRequest is what CreateCert issues.
type CertRequest struct {
	// Dir holds ca.pem and ca-key.pem; the new files are written there.
	Dir      string
	Identity Identity
	// Hosts are the DNS names and IP addresses the certificate is valid
	// for (TLS clients that check host names, like curl, need them);
	// empty means localhost and 127.0.0.1.
	Hosts    []string
	Validity time.Duration
}

// CreateCert issues a certificate for r.Identity signed by the CA in r.Dir
// and writes it to Dir/ROLE-ID.pem and Dir/ROLE-ID-key.pem.
func CreateCert(r CertRequest) (certPath, keyPath string, err error) {
	ident := r.Identity
	switch ident.Role {
	case RoleCoordinator, RoleWorker:
		ident.APIRole = ""
	case RoleClient:
		switch ident.APIRole {
		case "read", "write", "operator":
		case "":
			ident.APIRole = "operator"
		default:
			return "", "", fmt.Errorf("create certificate: API role %q: want read, write or operator", ident.APIRole)
		}
	default:
		return "", "", fmt.Errorf("create certificate: unknown role %q", ident.Role)
	}
	if !validID.MatchString(ident.ID) {
		return "", "", fmt.Errorf("create certificate: id %q: use 1 to 128 letters, digits, '.', '_' or '-'", ident.ID)
	}
	ca, caKey, err := loadCA(r.Dir)
	if err != nil {
		return "", "", err
	}
	hosts := r.Hosts
	if len(hosts) == 0 {
		hosts = []string{"localhost", "127.0.0.1"}
	}
	key, serial, err := newKey()
	if err != nil {
		return "", "", fmt.Errorf("create certificate: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: string(ident.Role) + "." + ident.ID, Organization: []string{"coordflow"}},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(r.Validity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		// Every node is both a server and a client of its peers.
		ExtKeyUsage:    []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:           []*url.URL{ident.URI()},
		SubjectKeyId:   keyID(&key.PublicKey),
		AuthorityKeyId: ca.SubjectKeyId,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	if tmpl.NotAfter.After(ca.NotAfter) {
		tmpl.NotAfter = ca.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return "", "", fmt.Errorf("create certificate: %w", err)
	}
	base := filepath.Join(r.Dir, string(ident.Role)+"-"+ident.ID)
	certPath, keyPath = base+".pem", base+"-key.pem"
	if err := writePair(certPath, keyPath, der, key); err != nil {
		return "", "", fmt.Errorf("create certificate: %w", err)
	}
	return certPath, keyPath, nil
}

// ValidID reports whether id may name a coordinator, worker or client: 1 to
// 128 letters, digits, '.', '_' or '-', starting with a letter or digit.
func ValidID(id string) bool { return validID.MatchString(id) }

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA (create one with coordd tls ca create -dir %s): %w", dir, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA key: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, fmt.Errorf("CA in %s: not PEM", dir)
	}
	ca, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, CAFile), err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse %s: %w", filepath.Join(dir, CAKeyFile), err)
	}
	return ca, key, nil
}

// writePair writes a certificate (0644) and its key (0600), never replacing
// a file: an existing key may be in use.
func writePair(certPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeNew(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := writeNew(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		_ = os.Remove(keyPath)
		return err
	}
	return nil
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s exists; remove it first to issue a new one", path)
	}
	if err != nil {
		return err
	}
	// A file cut short (a full disk) would be refused as existing by the
	// next attempt, and read as a broken key or certificate: remove it.
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// newKey returns a new P-256 key and a random serial for its certificate.
func newKey() (*ecdsa.PrivateKey, *big.Int, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("certificate serial: %w", err)
	}
	return key, serial, nil
}

func keyID(pub *ecdsa.PublicKey) []byte {
	b, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil
	}
	sum := sha256.Sum256(b)
	return sum[:20]
}
