package coordinator

import (
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// testPKI is a CA in a temp dir that issues the certificates of a test.
type testPKI struct {
	t   testing.TB
	dir string
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := t.TempDir()
	if _, _, err := tlsutil.CreateCA(dir, time.Hour); err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, dir: dir}
}

// issue creates and loads a certificate for role and id.
func (p *testPKI) issue(role tlsutil.Role, id string) *tlsutil.Config {
	p.t.Helper()
	return p.config(tlsutil.Identity{Role: role, ID: id})
}

// config creates and loads a certificate for ident.
func (p *testPKI) config(ident tlsutil.Identity) *tlsutil.Config {
	p.t.Helper()
	cert, key, err := tlsutil.CreateCert(tlsutil.CertRequest{Dir: p.dir, Identity: ident, Validity: time.Hour})
	if err != nil {
		p.t.Fatal(err)
	}
	c, err := tlsutil.Load(tlsutil.Files{CA: filepath.Join(p.dir, tlsutil.CAFile), Cert: cert, Key: key}, ident.Role)
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

// client returns an HTTPS client that checks the coordinators against the
// CA and presents a certificate for ident, or none if ident is empty.
func (p *testPKI) client(ident tlsutil.Identity) *http.Client {
	p.t.Helper()
	var tc *tls.Config
	if ident.Role == "" {
		// No certificate of its own: verify the server by the CA only.
		cfg := p.config(tlsutil.Identity{Role: tlsutil.RoleClient, ID: fmt.Sprintf("anon%d", time.Now().UnixNano()), APIRole: "read"})
		tc = cfg.ClientConfig(tlsutil.RoleCoordinator, "")
		tc.GetClientCertificate = nil
	} else {
		tc = p.config(ident).ClientConfig(tlsutil.RoleCoordinator, "")
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 20 * time.Second}
}

// apiClient returns an HTTPS client of the API holding an operator client
// certificate.
func (p *testPKI) apiClient() *http.Client {
	return p.client(tlsutil.Identity{Role: tlsutil.RoleClient, ID: "operator", APIRole: "operator"})
}

// startTLSCluster is startCluster with mutual TLS on: each coordinator has a
// certificate of pki.
func startTLSCluster(t testing.TB, pki *testPKI, n int) []*Server {
	t.Helper()
	logger := testLogger(t)
	servers := make([]*Server, 0, n)
	for i := 1; i <= n; i++ {
		id := fmt.Sprintf("c%d", i)
		cfg := testConfig(t, logger, id)
		cfg.TLS = pki.issue(tlsutil.RoleCoordinator, id)
		cfg.BootstrapExpect = n
		if i > 1 {
			cfg.Join = []string{servers[0].GossipAddr()}
		}
		servers = append(servers, startServer(t, cfg))
	}
	waitForLeader(t, servers...)
	return servers
}

// TestRaftRefusesAllButCoordinators: with TLS, a forged AppendEntries with the
// highest term, sent in the clear or with a worker's certificate, neither
// deposes the leader nor raises any term; the cluster goes on.
func TestRaftRefusesAllButCoordinators(t *testing.T) {
	pki := newTestPKI(t)
	servers := startTLSCluster(t, pki, 3)
	leader := waitForLeader(t, servers...)
	term := leader.raft.CurrentTerm()

	forged := &raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ID: []byte("intruder"), Addr: []byte("127.0.0.1:1")},
		Term:      math.MaxUint64, PrevLogEntry: 0, LeaderCommitIndex: math.MaxUint64,
	}
	plain, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	worker := pki.issue(tlsutil.RoleWorker, "w1")
	workerTrans, err := newRaftTransport("127.0.0.1:0", worker, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer workerTrans.Close()
	stranger := newTestPKI(t).issue(tlsutil.RoleCoordinator, "c9")
	strangerTrans, err := newRaftTransport("127.0.0.1:0", stranger, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer strangerTrans.Close()

	for _, s := range servers {
		for name, tr := range map[string]*raft.NetworkTransport{"plain": plain, "worker certificate": workerTrans, "other CA": strangerTrans} {
			var resp raft.AppendEntriesResponse
			err := tr.AppendEntries(raft.ServerID(s.ID()), raft.ServerAddress(s.RaftAddr()), forged, &resp)
			if err == nil {
				t.Errorf("%s AppendEntries to %s accepted (term %d)", name, s.ID(), resp.Term)
			}
		}
	}
	if got := waitForLeader(t, servers...); got != leader || got.raft.CurrentTerm() != term {
		t.Fatalf("leader %s term %d after the forged RPCs, want %s term %d", got.ID(), got.raft.CurrentTerm(), leader.ID(), term)
	}
	for _, s := range servers {
		if got := s.raft.CurrentTerm(); got != term {
			t.Errorf("%s at term %d, want %d", s.ID(), got, term)
		}
	}
}

// TestControlSessionBoundToCertificate: with TLS, a Hello must name the
// worker of the client's certificate; a plain client never gets a stream.
func TestControlSessionBoundToCertificate(t *testing.T) {
	pki := newTestPKI(t)
	servers := startTLSCluster(t, pki, 3)
	leader := waitForLeader(t, servers...)
	w1 := pki.issue(tlsutil.RoleWorker, "w1")

	hello := func(creds credentials.TransportCredentials, worker string) error {
		conn, err := grpc.NewClient(leader.RPCAddr(), grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := transport.NewControlClient(conn).Session(ctx)
		if err != nil {
			return err
		}
		h := &transport.Hello{WorkerId: worker, DataAddr: "127.0.0.1:1", Slots: 2}
		if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: h}}); err != nil {
			return err
		}
		m, err := stream.Recv()
		if err != nil {
			return err
		}
		if m.GetWelcome() == nil {
			return fmt.Errorf("got %T, want Welcome", m.GetMsg())
		}
		return nil
	}

	if err := hello(credentials.NewTLS(w1.ClientConfig(tlsutil.RoleCoordinator, "")), "w2"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Hello naming w2 with w1's certificate: %v, want PermissionDenied", err)
	}
	if err := hello(insecure.NewCredentials(), "w1"); status.Code(err) != codes.Unavailable {
		t.Errorf("plain Hello: %v, want Unavailable (no TLS handshake)", err)
	}
	anon := credentials.NewTLS(&tls.Config{InsecureSkipVerify: true}) //nolint:gosec // the intruder's side
	if err := hello(anon, "w1"); err == nil {
		t.Error("Hello without a client certificate accepted")
	}
	if err := hello(credentials.NewTLS(w1.ClientConfig(tlsutil.RoleCoordinator, "")), "w1"); err != nil {
		t.Fatalf("Hello of w1 with its own certificate: %v", err)
	}
}

// TestHelloValidated: what a worker claims about itself is checked before it
// reaches placement.
func TestHelloValidated(t *testing.T) {
	for _, h := range []*transport.Hello{
		{WorkerId: "", DataAddr: "127.0.0.1:1", Slots: 1},
		{WorkerId: "../w", DataAddr: "127.0.0.1:1", Slots: 1},
		{WorkerId: "w1", DataAddr: "nowhere", Slots: 1},
		{WorkerId: "w1", DataAddr: "127.0.0.1:1", Slots: 0},
		{WorkerId: "w1", DataAddr: "127.0.0.1:1", Slots: math.MaxInt32},
	} {
		if err := validateHello(h); err == nil {
			t.Errorf("Hello %v accepted", h)
		}
	}
	if err := validateHello(&transport.Hello{WorkerId: "w1", DataAddr: "127.0.0.1:7401", Slots: 8}); err != nil {
		t.Errorf("valid Hello refused: %v", err)
	}
}

// TestSilentSessionClosed: the leader closes a control session whose worker
// sends nothing for four heartbeats (a partition sends no FIN), and keeps one
// that heartbeats.
func TestSilentSessionClosed(t *testing.T) {
	logger := testLogger(t)
	cfg := testConfig(t, logger, "c1")
	cfg.BootstrapExpect = 1
	cfg.WorkerHeartbeat, cfg.WorkerLease = 100*time.Millisecond, 2*time.Second
	s := startServer(t, cfg)
	waitForLeader(t, s)

	conn, err := grpc.NewClient(s.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// open retries until the leader loop, which starts just after the
	// election, welcomes the worker.
	open := func(worker string) (stream transport.Control_SessionClient) {
		waitFor(t, 10*time.Second, func() error {
			var err error
			if stream, err = transport.NewControlClient(conn).Session(t.Context()); err != nil {
				return err
			}
			h := &transport.Hello{WorkerId: worker, DataAddr: "127.0.0.1:1", Slots: 1}
			if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: h}}); err != nil {
				return err
			}
			if m, err := stream.Recv(); err != nil || m.GetWelcome() == nil {
				return fmt.Errorf("%s: want Welcome, got %v, %v", worker, m, err)
			}
			return nil
		})
		return stream
	}
	silent, alive := open("w-silent"), open("w-alive")
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(cfg.WorkerHeartbeat)
		defer tick.Stop()
		hb := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if alive.Send(hb) != nil {
					return
				}
			}
		}
	}()
	aliveErr := make(chan error, 1)
	go func() {
		for {
			if _, err := alive.Recv(); err != nil {
				aliveErr <- err
				return
			}
		}
	}()

	start := time.Now()
	for {
		if _, err := silent.Recv(); err != nil {
			t.Logf("silent session ended after %v: %v", time.Since(start).Round(time.Millisecond), err)
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("a session silent for 10s is still open")
		}
	}
	select {
	case err := <-aliveErr:
		t.Fatalf("the heartbeating session ended too: %v", err)
	default:
	}
}
