package main

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// devSecurity is what `coordd dev -secure` generates in its data dir, and
// reuses when started again on the same dir: a CA with certificates for
// every node and for the CLI, a gossip key and an operator API token.
type devSecurity struct {
	dir        string // data dir/tls
	gossipKey  []byte
	token      string
	tokensFile string
}

// devTokenName is the name of the operator token dev creates.
const devTokenName = "dev-operator"

// newDevSecurity creates (or loads) the security material of a dev cluster
// under dataDir.
func newDevSecurity(dataDir string) (*devSecurity, error) {
	d := &devSecurity{dir: filepath.Join(dataDir, "tls"), tokensFile: filepath.Join(dataDir, "acl-tokens.json")}
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return nil, fmt.Errorf("dev -secure: %w", err)
	}
	if _, err := os.Stat(d.caFile()); errors.Is(err, os.ErrNotExist) {
		if _, _, err := tlsutil.CreateCA(d.dir, tlsutil.DefaultCAValidity); err != nil {
			return nil, fmt.Errorf("dev -secure: %w", err)
		}
	}
	keyFile := filepath.Join(dataDir, "gossip.key")
	key, err := readOrCreate(keyFile, func() ([]byte, error) {
		k := make([]byte, 32)
		_, err := rand.Read(k)
		return []byte(base64.StdEncoding.EncodeToString(k) + "\n"), err
	})
	if err != nil {
		return nil, fmt.Errorf("dev -secure: gossip key: %w", err)
	}
	if d.gossipKey, err = base64.StdEncoding.DecodeString(strings.TrimSpace(string(key))); err != nil {
		return nil, fmt.Errorf("dev -secure: gossip key %s: %w", keyFile, err)
	}
	tokens, err := readOrCreate(d.tokensFile, func() ([]byte, error) {
		return json.MarshalIndent([]map[string]string{{"name": devTokenName, "token": rand.Text(), "role": "operator"}}, "", "  ")
	})
	if err != nil {
		return nil, fmt.Errorf("dev -secure: tokens: %w", err)
	}
	var list []struct{ Name, Token string }
	if err := json.Unmarshal(tokens, &list); err != nil || len(list) == 0 || list[0].Name != devTokenName {
		return nil, fmt.Errorf("dev -secure: %s does not hold the %s token (%v)", d.tokensFile, devTokenName, err)
	}
	d.token = list[0].Token
	return d, nil
}

// readOrCreate returns the contents of path, writing make's first (0600).
func readOrCreate(path string, make func() ([]byte, error)) ([]byte, error) {
	if b, err := os.ReadFile(path); err == nil {
		return b, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	b, err := make()
	if err != nil {
		return nil, err
	}
	return b, os.WriteFile(path, b, 0o600)
}

func (d *devSecurity) caFile() string { return filepath.Join(d.dir, tlsutil.CAFile) }

// issue returns the loaded certificate of role and id, creating it first.
func (d *devSecurity) issue(role tlsutil.Role, id string) (*tlsutil.Config, error) {
	files := tlsutil.Files{
		CA:   d.caFile(),
		Cert: filepath.Join(d.dir, string(role)+"-"+id+".pem"),
		Key:  filepath.Join(d.dir, string(role)+"-"+id+"-key.pem"),
	}
	if _, err := os.Stat(files.Cert); errors.Is(err, os.ErrNotExist) {
		ident := tlsutil.Identity{Role: role, ID: id}
		if _, _, err := tlsutil.CreateCert(tlsutil.CertRequest{Dir: d.dir, Identity: ident, Validity: tlsutil.DefaultCertValidity}); err != nil {
			return nil, fmt.Errorf("dev -secure: %w", err)
		}
	}
	return tlsutil.Load(files, role)
}

// httpClient returns a client that trusts the dev CA.
func (d *devSecurity) httpClient() (*http.Client, error) {
	pem, err := os.ReadFile(d.caFile())
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("dev -secure: %s holds no certificate", d.caFile())
	}
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: 10 * time.Second,
	}}, nil
}

// devAPI calls the HTTP API of a dev cluster, over TLS and with the operator
// token when it is secure.
type devAPI struct {
	base   string // scheme://host:port
	client *http.Client
	token  string
}

// do sends req with the token, if any.
func (a *devAPI) do(req *http.Request) (*http.Response, error) {
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	return a.client.Do(req)
}
