package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/coordflow/coordflow/cmd/internal/config"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

const tlsUsage = `Usage:
  coordd tls ca create -dir DIR
  coordd tls cert create -dir DIR (-coordinator ID | -worker ID | -client NAME [-role ROLE]) [-addr HOSTS]

ca create writes DIR/ca.pem and DIR/ca-key.pem. cert create issues a
certificate signed by that CA, with the role and id in its URI SAN, and
writes DIR/ROLE-ID.pem and DIR/ROLE-ID-key.pem. Keep ca-key.pem offline:
whoever holds it can mint coordinators. See docs/security.md.
`

// runTLS is `coordd tls`: create a CA and certificates, as `consul tls` does.
func runTLS(args []string, stdout, stderr io.Writer) error {
	if len(args) < 2 || args[1] != "create" || (args[0] != "ca" && args[0] != "cert") {
		fmt.Fprint(stderr, tlsUsage)
		return errUsage
	}
	fs := flag.NewFlagSet("coordd tls "+args[0]+" create", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", ".", "`DIR` that holds (or gets) ca.pem and ca-key.pem; new files are written there")
	days := fs.Int("days", 0, "validity in `DAYS` (default: 1825 for a CA, 365 for a certificate; never beyond the CA's)")
	format := fs.String("format", "table", "output `FORMAT`: table (sentences) or json ({\"identity\", \"cert\", \"key\"}: the files written)")
	var coord, worker, client, role, addr string
	if args[0] == "cert" {
		fs.StringVar(&coord, "coordinator", "", "issue a coordinator certificate for coordd -id `ID`")
		fs.StringVar(&worker, "worker", "", "issue a worker certificate for workerd -id `ID`")
		fs.StringVar(&client, "client", "", "issue an API client certificate named `NAME`")
		fs.StringVar(&role, "role", "operator", "API `ROLE` of a client certificate: read, write or operator")
		fs.StringVar(&addr, "addr", "", "comma-separated DNS names and IPs the certificate is valid for (default: localhost,127.0.0.1)")
	}
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), tlsUsage+"\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[2:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected argument %q", fs.Arg(0))
	}
	// 100 years is far beyond any sane certificate, and far from where
	// days as a time.Duration overflow (about 106,751) into one that ended
	// before it began.
	const maxDays = 36500
	if *days < 0 || *days > maxDays {
		return usageError(fs, "-days %d: want 1 to %d (0: the default)", *days, maxDays)
	}
	if *format != "table" && *format != "json" {
		return usageError(fs, "-format %q: want table or json", *format)
	}
	printFiles := func(ident, cert, key, sentence string) error {
		if *format == "json" {
			return json.NewEncoder(stdout).Encode(map[string]string{"identity": ident, "cert": cert, "key": key})
		}
		_, err := fmt.Fprint(stdout, sentence)
		return err
	}
	validity := time.Duration(*days) * 24 * time.Hour
	if args[0] == "ca" {
		if validity == 0 {
			validity = tlsutil.DefaultCAValidity
		}
		cert, key, err := tlsutil.CreateCA(*dir, validity)
		if err != nil {
			return err
		}
		return printFiles("ca", cert, key, fmt.Sprintf("==> CA certificate %s\n==> CA key %s (keep it offline)\n", cert, key))
	}
	var ident tlsutil.Identity
	n := 0
	for _, c := range []struct {
		v    string
		role tlsutil.Role
	}{{coord, tlsutil.RoleCoordinator}, {worker, tlsutil.RoleWorker}, {client, tlsutil.RoleClient}} {
		if c.v != "" {
			ident, n = tlsutil.Identity{Role: c.role, ID: c.v}, n+1
		}
	}
	if n != 1 {
		return usageError(fs, "give exactly one of -coordinator, -worker and -client")
	}
	if ident.Role == tlsutil.RoleClient {
		ident.APIRole = role
	}
	if validity == 0 {
		validity = tlsutil.DefaultCertValidity
	}
	cert, key, err := tlsutil.CreateCert(tlsutil.CertRequest{Dir: *dir, Identity: ident, Hosts: config.SplitList(addr), Validity: validity})
	if err != nil {
		return err
	}
	return printFiles(ident.String(), cert, key, fmt.Sprintf("==> %s certificate %s\n==> key %s\n", ident, cert, key))
}
