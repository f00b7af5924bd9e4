package integration

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// TestSecureClusterRefusesOutsiders runs the wordcount failover scenario on a
// cluster with mutual TLS, gossip encryption and API tokens, and attacks it
// from the test as an outsider on the same network would: every listener
// refuses plain and wrongly signed connections, a worker certificate cannot
// speak Raft, a worker cannot take another's session, an unencrypted gossip
// member is never seen, a data channel for an undeployed attempt is refused,
// the API wants a token of the right role, and oversized messages cost the
// coordinator no memory. The job keeps running through all of it, survives
// the SIGKILL of a worker and of the leader, and its final state is exact.
func TestSecureClusterRefusesOutsiders(t *testing.T) {
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}, secure: true})
	in := newWordInput(808, 40_000, 4)
	produce(t, c.brokers(), "words", in.recs[:10_000])
	job := c.submitJob(t, failoverSpec(c.brokers(), "300ms"))
	producerDone := produceInBackground(t, c.brokers(), "words", in.recs[10_000:], 5_000)
	before := c.waitCheckpointed(t, job)
	leader := c.coordinator(t, c.leader(t))

	// The CLI, pointed at the cluster with COORD_CACERT and COORD_TOKEN.
	if out := c.cli(t, leader.httpAddr, "job", "list"); !strings.Contains(out, job) {
		t.Errorf("coordd job list over TLS with a token does not list %s:\n%s", job, out)
	}

	w1Cert, w1Key := c.sec.certFiles(t, "worker", "w1")
	w1, err := tlsutil.Load(tlsutil.Files{CA: c.sec.caFile(), Cert: w1Cert, Key: w1Key}, tlsutil.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	stranger := strangerCert(t)

	t.Run("raft", func(t *testing.T) {
		for _, cp := range c.liveCoordinators() {
			forgedAppendEntries(t, cp)
			for name, cfg := range map[string]*tls.Config{
				"worker certificate":          w1.ClientConfig(tlsutil.RoleCoordinator, ""),
				"certificate of another CA":   stranger.ClientConfig(tlsutil.RoleCoordinator, ""),
				"no certificate (server-TLS)": {InsecureSkipVerify: true}, //nolint:gosec // the intruder's side
			} {
				if err := tlsExchange(cp.raftAddr, cfg); err == nil {
					t.Errorf("%s: Raft port of %s answered", name, cp.id)
				}
			}
		}
	})

	t.Run("control", func(t *testing.T) {
		for name, creds := range map[string]credentials.TransportCredentials{
			"plain":                     insecure.NewCredentials(),
			"certificate of another CA": credentials.NewTLS(stranger.ClientConfig(tlsutil.RoleCoordinator, "")),
		} {
			if err := hello(leader.rpcAddr, creds, "w1"); err == nil {
				t.Errorf("%s Hello accepted", name)
			}
		}
		if err := hello(leader.rpcAddr, credentials.NewTLS(w1.ClientConfig(tlsutil.RoleCoordinator, "")), "w2"); status.Code(err) != codes.PermissionDenied {
			t.Errorf("Hello naming w2 with w1's certificate: %v, want PermissionDenied", err)
		}
	})

	t.Run("data", func(t *testing.T) {
		j, err := c.getJob(t, job)
		if err != nil {
			t.Fatal(err)
		}
		w2 := c.worker(t, "w2")
		for name, creds := range map[string]credentials.TransportCredentials{
			"plain":                     insecure.NewCredentials(),
			"certificate of another CA": credentials.NewTLS(stranger.ClientConfig(tlsutil.RoleWorker, "")),
		} {
			if err := openDataChannel(w2.dataAddr, creds, &transport.ChannelHeader{JobId: job, Attempt: j.Attempt, MapTaskId: "map-0"}); err == nil {
				t.Errorf("%s data channel accepted", name)
			}
		}
		// A real worker's certificate, but no deployment names the attempt:
		// the next attempts' channels are refused, and do not lock out the
		// real sources when those attempts come.
		// Each is held for the worker's accept wait (5 s) before it is
		// refused, so they are opened together.
		valid := credentials.NewTLS(w1.ClientConfig(tlsutil.RoleWorker, ""))
		var wg sync.WaitGroup
		for next := j.Attempt + 1; next <= j.Attempt+3; next++ {
			for m := range 2 {
				h := &transport.ChannelHeader{JobId: job, Attempt: next, MapTaskId: fmt.Sprintf("map-%d", m), ChannelToken: "guessed"}
				wg.Go(func() {
					if err := openDataChannel(w2.dataAddr, valid, h); err == nil {
						t.Errorf("data channel for undeployed attempt %d accepted", h.Attempt)
					}
				})
			}
		}
		wg.Wait()
	})

	t.Run("gossip", func(t *testing.T) {
		for name, keys := range map[string][][]byte{"unencrypted": nil, "wrong key": {make([]byte, 32)}} {
			joinGossip(t, name, keys, leader.gossipAddr)
			var members []struct {
				ID string `json:"id"`
			}
			if err := c.call("GET", leader.httpAddr, "/v1/members", nil, &members); err != nil {
				t.Fatal(err)
			}
			for _, m := range members {
				if strings.HasPrefix(m.ID, "intruder") {
					t.Errorf("%s gossip member %s is listed", name, m.ID)
				}
			}
		}
	})

	t.Run("http", func(t *testing.T) {
		url := "https://" + leader.httpAddr
		spec := []byte(`{"name": "x"}`)
		for _, tc := range []struct {
			name, method, path, token string
			body                      []byte
			want                      int
		}{
			{"no token", "GET", "/v1/jobs", "", nil, http.StatusUnauthorized},
			{"unknown token", "GET", "/v1/jobs", "not-a-token", nil, http.StatusUnauthorized},
			{"read token on POST", "POST", "/v1/jobs", c.sec.tokens["read"], spec, http.StatusForbidden},
			{"write token on raft peers", "DELETE", "/v1/raft/peers/c9", c.sec.tokens["write"], nil, http.StatusForbidden},
			{"read token on GET", "GET", "/v1/jobs", c.sec.tokens["read"], nil, http.StatusOK},
		} {
			req, err := http.NewRequest(tc.method, url+tc.path, strings.NewReader(string(tc.body)))
			if err != nil {
				t.Fatal(err)
			}
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			resp, err := c.client.Do(req)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("%s: %s %s answered %d, want %d", tc.name, tc.method, tc.path, resp.StatusCode, tc.want)
			}
		}
		// A client certificate of another CA is refused at the handshake,
		// with the operator token or without.
		strangerCert, err := tls.LoadX509KeyPair(stranger.Files().Cert, stranger.Files().Key)
		if err != nil {
			t.Fatal(err)
		}
		wrong := &http.Client{Timeout: httpTimeout, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: c.sec.pool, Certificates: []tls.Certificate{strangerCert}, MinVersion: tls.VersionTLS12,
		}}}
		req, err := http.NewRequest("GET", url+"/v1/jobs", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+c.sec.tokens["operator"])
		if resp, err := wrong.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("a client certificate of another CA got %d", resp.StatusCode)
		}
		resp, err := http.Get("http://" + leader.httpAddr + "/v1/jobs")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				t.Errorf("plain HTTP answered %d", resp.StatusCode)
			}
		}
	})

	t.Run("oversized", func(t *testing.T) {
		// 3 x 200 MiB at the control and HTTP ports of a follower: refused at
		// the TLS handshake, before anything is allocated for them.
		follower := c.followerOf(t, leader)
		before := rssOf(t, follower)
		for range 3 {
			for _, addr := range []string{follower.rpcAddr, follower.httpAddr, follower.raftAddr} {
				sendGarbage(addr, 200<<20)
			}
		}
		// Past the handshake, with a real worker's certificate: a Hello of
		// 200 MiB is refused from its length prefix, by the leader too
		// (which would otherwise hand w1's session to it).
		creds := credentials.NewTLS(w1.ClientConfig(tlsutil.RoleCoordinator, ""))
		for _, cp := range []*coordProc{follower, leader} {
			if err := helloPadded(cp.rpcAddr, creds, "w1", 200<<20); status.Code(err) != codes.ResourceExhausted {
				t.Errorf("a Hello of 200 MiB to %s: %v, want ResourceExhausted", cp.id, err)
			}
		}
		if after := rssOf(t, follower); after > before+64<<20 {
			t.Errorf("follower %s grew from %d MiB to %d MiB after oversized messages", follower.id, before>>20, after>>20)
		}
	})

	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	if j.Attempt != before.Attempt {
		t.Errorf("the attacks restarted the job: attempt %d, was %d (%s)", j.Attempt, before.Attempt, j.Reason)
	}

	// The failover scenario: a worker and then the leader are killed.
	c.killWorker(t, j.Tasks[0].Worker)
	c.waitJob(t, time.Minute, job, "a new attempt after the worker kill", func(j jobView) error {
		if j.Attempt == before.Attempt || j.Status != "running" {
			return fmt.Errorf("attempt %d %s", j.Attempt, j.Status)
		}
		return nil
	})
	c.killCoordinator(t, c.leader(t))
	c.leader(t)
	producerDone()
	c.checkExact(t, job, in.want)
}

// strangerCert is a coordinator certificate signed by a CA the cluster does
// not trust.
func strangerCert(t *testing.T) *tlsutil.Config {
	t.Helper()
	dir := t.TempDir()
	if _, _, err := tlsutil.CreateCA(dir, time.Hour); err != nil {
		t.Fatal(err)
	}
	ident := tlsutil.Identity{Role: tlsutil.RoleCoordinator, ID: "c1"}
	cert, key, err := tlsutil.CreateCert(tlsutil.CertRequest{Dir: dir, Identity: ident, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	c, err := tlsutil.Load(tlsutil.Files{CA: dir + "/" + tlsutil.CAFile, Cert: cert, Key: key}, tlsutil.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// forgedAppendEntries sends, in the clear, the AppendEntries with the
// highest term that deposes a leader of an open cluster.
func forgedAppendEntries(t *testing.T, cp *coordProc) {
	t.Helper()
	tr, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 2*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	req := &raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ID: []byte("intruder"), Addr: []byte("127.0.0.1:1")},
		Term:      math.MaxUint64, LeaderCommitIndex: math.MaxUint64,
	}
	var resp raft.AppendEntriesResponse
	if err := tr.AppendEntries(raft.ServerID(cp.id), raft.ServerAddress(cp.raftAddr), req, &resp); err == nil {
		t.Errorf("plain AppendEntries to %s answered (term %d)", cp.id, resp.Term)
	}
}

// tlsExchange completes a TLS handshake with cfg and exchanges a byte: the
// server refuses a client certificate after the client's side of a TLS 1.3
// handshake is done, so only a read shows it.
func tlsExchange(addr string, cfg *tls.Config) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte{0}); err != nil {
		return err
	}
	_, err = conn.Read(make([]byte, 1))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The server kept the connection and waits for a whole RPC: it
		// accepted the client.
		return nil
	}
	return err
}

// hello opens a control session with creds and sends a Hello naming worker;
// it returns nil when the coordinator answers.
func hello(addr string, creds credentials.TransportCredentials, worker string) error {
	return helloPadded(addr, creds, worker, 0)
}

// helloPadded is hello with a Hello padded to more than pad bytes.
func helloPadded(addr string, creds credentials.TransportCredentials, worker string, pad int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds), grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(pad+1<<20)))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		return err
	}
	h := &transport.Hello{WorkerId: worker, DataAddr: "127.0.0.1:1", Slots: 1}
	if pad > 0 {
		h.Running = []*transport.TaskStatus{{Reason: strings.Repeat("x", pad)}}
	}
	// io.EOF: the server ended the stream; Recv says why.
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: h}}); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	_, err = stream.Recv()
	return err
}

// openDataChannel opens a data channel with h and returns nil when the data
// server accepts it.
func openDataChannel(addr string, creds credentials.TransportCredentials, h *transport.ChannelHeader) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := transport.NewDataClient(conn).Channel(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&transport.DataMessage{Header: h}); err != nil {
		return err
	}
	if _, err := stream.Header(); err != nil {
		return err
	}
	_, err = stream.CloseAndRecv()
	return err
}

// joinGossip starts a memberlist named intruder-* with keys (nil: no
// encryption), tries to join addr, and leaves.
func joinGossip(t *testing.T, name string, keys [][]byte, addr string) {
	t.Helper()
	mc := memberlist.DefaultLANConfig()
	mc.Name = "intruder-" + strings.ReplaceAll(name, " ", "-")
	mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
	mc.Logger = log.New(io.Discard, "", 0)
	if len(keys) > 0 {
		kr, err := memberlist.NewKeyring(keys, keys[0])
		if err != nil {
			t.Fatal(err)
		}
		mc.Keyring = kr
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ml.Shutdown() }()
	if _, err := ml.Join([]string{addr}); err == nil {
		t.Errorf("%s gossip member joined", name)
	}
}

// followerOf returns a live coordinator other than leader.
func (c *cluster) followerOf(t *testing.T, leader *coordProc) *coordProc {
	t.Helper()
	for _, cp := range c.liveCoordinators() {
		if cp != leader {
			return cp
		}
	}
	t.Fatal("no follower")
	return nil
}

// rssOf returns the resident set size of cp's process.
func rssOf(t *testing.T, cp *coordProc) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cp.p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// sendGarbage writes up to n bytes that announce a huge message (an HTTP/2
// preface and a frame header of the largest length) to addr, until the
// server closes the connection.
func sendGarbage(addr string, n int) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x01")); err != nil {
		return
	}
	chunk := make([]byte, 1<<20)
	for sent := 0; sent < n; sent += len(chunk) {
		if _, err := conn.Write(chunk); err != nil {
			return
		}
	}
}
