package coordinator

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// logCapture keeps every line a test's servers log, for tests that check
// what was logged, and copies them to the test's output.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *logCapture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

// lines returns the logged lines that contain every one of subs.
func (c *logCapture) lines(subs ...string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
next:
	for line := range strings.Lines(c.buf.String()) {
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		out = append(out, line)
	}
	return out
}

// captureLogger returns testLogger's logger that also writes into a
// logCapture. Call it before starting servers (see testLogger).
func captureLogger(t *testing.T) (*slog.Logger, *logCapture) {
	out := &testLogWriter{w: t.Output()}
	t.Cleanup(func() {
		out.mu.Lock()
		out.done = true
		out.mu.Unlock()
	})
	c := &logCapture{}
	return slog.New(slog.NewTextHandler(io.MultiWriter(out, c), &slog.HandlerOptions{Level: slog.LevelInfo})), c
}

// newGossipKey returns a random 32-byte gossip key.
func newGossipKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// gossipMember is a bare memberlist member standing in for a worker or a
// coordinator, or for an outsider pretending to be one.
type gossipMember struct {
	ml      *memberlist.Memberlist
	joinErr error
}

// startGossipMember starts a member named name on loopback advertising meta
// (raw bytes: tests send invalid meta too), encrypting with keys (none:
// plain gossip), and joins it to join. A failed join is kept in joinErr:
// refused members are the point of some tests.
func startGossipMember(t *testing.T, name string, meta []byte, keys [][]byte, join string) *gossipMember {
	t.Helper()
	mc := memberlist.DefaultLANConfig()
	mc.Name = name
	mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
	mc.ProbeInterval, mc.ProbeTimeout, mc.SuspicionMult, mc.GossipInterval = 200*time.Millisecond, 100*time.Millisecond, 3, 50*time.Millisecond
	mc.TCPTimeout = time.Second
	mc.Delegate = metaDelegate(meta)
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
		t.Fatalf("create gossip member %s: %v", name, err)
	}
	t.Cleanup(func() { _ = ml.Shutdown() })
	_, joinErr := ml.Join([]string{join})
	return &gossipMember{ml: ml, joinErr: joinErr}
}

// workerMeta is valid worker meta with slots.
func workerMeta(t *testing.T, slots int) []byte {
	t.Helper()
	b, err := json.Marshal(transport.NodeMeta{Role: transport.RoleWorker, DataAddr: "127.0.0.1:7401", Slots: slots})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// coordinatorMeta is the meta of a voting coordinator whose Raft address is
// raftAddr.
func coordinatorMeta(t *testing.T, raftAddr string) []byte {
	t.Helper()
	return coordinatorMetaAt(t, raftAddr, 0)
}

// coordinatorMetaAt is coordinatorMeta of a build at feature level level.
func coordinatorMetaAt(t *testing.T, raftAddr string, level int) []byte {
	t.Helper()
	b, err := transport.NodeMeta{Role: transport.RoleCoordinator, RaftAddr: raftAddr, RPCAddr: "127.0.0.1:7101", HTTPAddr: "127.0.0.1:7201", Voter: true, FeatureLevel: level}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// memberKnown reports whether s knows gossip member id, in any status.
func memberKnown(s *Server, id string) bool {
	for _, m := range s.Members() {
		if m.ID == id {
			return true
		}
	}
	return false
}

// startSingle starts one coordinator that bootstraps alone, with tune
// applied to its config, and waits until it leads.
func startSingle(t *testing.T, logger *slog.Logger, id string, tune func(*Config)) *Server {
	t.Helper()
	cfg := testConfig(t, logger, id)
	cfg.BootstrapExpect = 1
	if tune != nil {
		tune(&cfg)
	}
	s := startServer(t, cfg)
	waitForLeader(t, s)
	return s
}

// TestGossipEncryption: a coordinator with a gossip key sees members with the
// key and never one that gossips in plain text or with another key.
func TestGossipEncryption(t *testing.T) {
	key, other := newGossipKey(t), newGossipKey(t)
	s := startSingle(t, testLogger(t), "c1", func(c *Config) { c.GossipKeys = [][]byte{key} })

	plain := startGossipMember(t, "w-plain", workerMeta(t, 4), nil, s.GossipAddr())
	wrong := startGossipMember(t, "w-wrong", workerMeta(t, 4), [][]byte{other}, s.GossipAddr())
	good := startGossipMember(t, "w-good", workerMeta(t, 4), [][]byte{key}, s.GossipAddr())
	if plain.joinErr == nil || wrong.joinErr == nil {
		t.Errorf("joins of an unencrypted member (%v) and of one with another key (%v) succeeded", plain.joinErr, wrong.joinErr)
	}
	if good.joinErr != nil {
		t.Fatalf("join with the key: %v", good.joinErr)
	}
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, "w-good", StatusAlive) })
	// The refused members keep probing and gossiping meanwhile (to the
	// address they joined, and to what they hear): give them time.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		for _, id := range []string{"w-plain", "w-wrong"} {
			if memberKnown(s, id) {
				t.Fatalf("%s is a member of the encrypted pool: %+v", id, s.Members())
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := s.aliveWorkers(); len(got) != 1 || got[0].ID != "w-good" {
		t.Errorf("alive workers %+v, want only w-good", got)
	}
}

// TestGossipKeyRotation: with two keys the first encrypts and both decrypt,
// so during a rolling rotation members one step apart understand each
// other. A member that skipped the step that installs the new key everywhere
// cannot read the pool: its join fails, and the coordinator, which could read
// it, sees it die. A member with an unrelated key is never seen.
func TestGossipKeyRotation(t *testing.T) {
	oldKey, newKey := newGossipKey(t), newGossipKey(t)
	// Step 1 done on the coordinator: still encrypting with the old key,
	// already accepting the new one.
	s := startSingle(t, testLogger(t), "c1", func(c *Config) { c.GossipKeys = [][]byte{oldKey, newKey} })

	for _, tc := range []struct {
		name string
		keys [][]byte
		ok   bool
	}{
		{"w-not-restarted", [][]byte{oldKey}, true},  // before step 1
		{"w-step2", [][]byte{newKey, oldKey}, true},  // step 2: the new key encrypts
		{"w-skipped-step1", [][]byte{newKey}, false}, // cannot read what c1 encrypts
		{"w-unrelated-key", [][]byte{newGossipKey(t)}, false},
	} {
		m := startGossipMember(t, tc.name, workerMeta(t, 2), tc.keys, s.GossipAddr())
		if tc.ok {
			if m.joinErr != nil {
				t.Errorf("%s: join: %v", tc.name, m.joinErr)
				continue
			}
			waitFor(t, 10*time.Second, func() error { return memberStatusIs(s, tc.name, StatusAlive) })
		} else if m.joinErr == nil {
			t.Errorf("%s: join succeeded", tc.name)
		}
		// One at a time: members of different steps need not understand
		// each other, only the coordinator.
		if err := m.ml.Leave(time.Second); err != nil && tc.ok {
			t.Errorf("%s: leave: %v", tc.name, err)
		}
		_ = m.ml.Shutdown()
	}
	// c1 may have read w-skipped-step1's join, but that member cannot read
	// c1's probes: it ends dead.
	waitFor(t, 10*time.Second, func() error {
		if got := s.aliveWorkers(); len(got) != 0 {
			return fmt.Errorf("alive workers %+v, want none", got)
		}
		return nil
	})
	if memberKnown(s, "w-unrelated-key") {
		t.Errorf("a member with an unrelated key joined: %+v", s.Members())
	}
}

// TestGossipBadMetaIgnored: members whose meta is out of bounds (slots of
// MaxInt64, a bad port, an unknown role, a bad name) are listed with role
// unknown and the problem, never offered to placement, and logged once each;
// a member whose valid meta turns invalid drops out of placement.
func TestGossipBadMetaIgnored(t *testing.T) {
	logger, logs := captureLogger(t)
	s := &Server{cfg: Config{ID: "c1"}, logger: logger, memberState: make(map[string]*memberRecord), memberEvents: make(chan struct{}, 1)}
	ev := eventDelegate{s}
	node := func(name string, meta any) *memberlist.Node {
		b, ok := meta.([]byte)
		if !ok {
			var err error
			if b, err = json.Marshal(meta); err != nil {
				t.Fatal(err)
			}
		}
		return &memberlist.Node{Name: name, Addr: []byte{127, 0, 0, 1}, Port: 7501, Meta: b}
	}
	worker := transport.NodeMeta{Role: transport.RoleWorker, DataAddr: "127.0.0.1:7401", Slots: 4}
	huge, badPort, noData := worker, worker, worker
	huge.Slots = math.MaxInt64
	badPort.DataAddr = "127.0.0.1:99999"
	noData.DataAddr = ""
	cases := []struct {
		name  string
		meta  any
		field string
	}{
		{"w-huge", huge, "slots"},
		{"w-port", badPort, "data_addr"},
		{"w-nodata", noData, "data_addr"},
		{"w-role", transport.NodeMeta{Role: "admin", DataAddr: "127.0.0.1:1", Slots: 1}, "role"},
		{"c-raft", transport.NodeMeta{Role: transport.RoleCoordinator, RaftAddr: "nohostport", Voter: true}, "raft_addr"},
		{"w-big", bytes.Repeat([]byte(" "), 600), "meta"},
		{"bad name!", worker, "id"},
	}
	ev.NotifyJoin(node("w-ok", worker))
	for _, tc := range cases {
		ev.NotifyJoin(node(tc.name, tc.meta))
		ev.NotifyUpdate(node(tc.name, tc.meta)) // memberlist repeats events: one warning each
	}
	if got := s.aliveWorkers(); len(got) != 1 || got[0].ID != "w-ok" {
		t.Errorf("alive workers %+v, want only w-ok", got)
	}
	for _, tc := range cases {
		var m Member
		for _, x := range s.Members() {
			if x.ID == tc.name {
				m = x
			}
		}
		if m.Role != roleUnknown || m.Slots != 0 || m.DataAddr != "" || !strings.Contains(m.Problem, tc.field) {
			t.Errorf("%s listed as %+v, want role %q, no addresses, a problem naming %s", tc.name, m, roleUnknown, tc.field)
		}
		if n := len(logs.lines("ignoring gossip member with invalid meta", fmt.Sprintf("field=%s", tc.field), fmt.Sprintf("%q", tc.name))) +
			len(logs.lines("ignoring gossip member with invalid meta", fmt.Sprintf("field=%s", tc.field), "member="+tc.name+" ")); n != 1 {
			t.Errorf("%s: %d warnings naming it and field %s, want 1:\n%s", tc.name, n, tc.field, strings.Join(logs.lines("ignoring"), ""))
		}
	}

	// A worker that starts advertising out-of-range slots loses its place.
	bad := worker
	bad.Slots = transport.MaxSlots + 1
	ev.NotifyUpdate(node("w-ok", bad))
	if got := s.aliveWorkers(); len(got) != 0 {
		t.Errorf("alive workers %+v after w-ok advertised %d slots, want none", got, bad.Slots)
	}
	ev.NotifyUpdate(node("w-ok", worker))
	if got := s.aliveWorkers(); len(got) != 1 || got[0].Problem != "" {
		t.Errorf("alive workers %+v after w-ok advertised valid meta again, want w-ok", got)
	}
}

// TestGossipBadMetaIgnoredOverMemberlist: the same through real gossip: a
// member advertising MaxInt64 slots is seen, listed as unknown, and offered
// no slots.
func TestGossipBadMetaIgnoredOverMemberlist(t *testing.T) {
	s := startSingle(t, testLogger(t), "c1", nil)
	startGossipMember(t, "w-ok", workerMeta(t, 4), nil, s.GossipAddr())
	startGossipMember(t, "w-huge", workerMeta(t, math.MaxInt64), nil, s.GossipAddr())
	waitFor(t, 10*time.Second, func() error {
		return errors.Join(memberStatusIs(s, "w-ok", StatusAlive), memberStatusIs(s, "w-huge", StatusAlive))
	})
	for _, m := range s.Members() {
		if m.ID == "w-huge" && (m.Role != roleUnknown || !strings.Contains(m.Problem, "slots")) {
			t.Errorf("w-huge listed as %+v", m)
		}
	}
	if got := s.aliveWorkers(); len(got) != 1 || got[0].ID != "w-ok" {
		t.Errorf("alive workers %+v, want only w-ok", got)
	}
}

// TestTotalFreeSaturates: summing free slots never wraps around.
func TestTotalFreeSaturates(t *testing.T) {
	got := totalFree([]workerSlots{{id: "a", free: math.MaxInt}, {id: "b", free: 4}, {id: "c", free: math.MaxInt}})
	if got != math.MaxInt {
		t.Errorf("totalFree = %d, want math.MaxInt", got)
	}
	if got := totalFree([]workerSlots{{free: 3}, {free: 4}}); got != 7 {
		t.Errorf("totalFree = %d, want 7", got)
	}
}

// inRaft reports whether id is in s's Raft configuration, and as what.
func inRaft(s *Server, id string) (raft.Server, bool) {
	f := s.raft.GetConfiguration()
	if f.Error() != nil {
		return raft.Server{}, false
	}
	for _, srv := range f.Configuration().Servers {
		if string(srv.ID) == id {
			return srv, true
		}
	}
	return raft.Server{}, false
}

// TestPeerNotAddedFromGossipWithoutTLS: without TLS a coordinator seen in
// gossip, real or fake, is never added by the leader, which logs once that
// it waits for coordd raft add-peer; POST /v1/raft/peers adds a real one;
// nothing that leaves gossip is ever removed.
func TestPeerNotAddedFromGossipWithoutTLS(t *testing.T) {
	logger, logs := captureLogger(t)
	leader := startSingle(t, logger, "c1", nil)

	// An outsider claiming to be a coordinator whose "Raft address" accepts
	// connections, as a real one would.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	fake := startGossipMember(t, "c9", coordinatorMeta(t, lis.Addr().String()), nil, leader.GossipAddr())
	if fake.joinErr != nil {
		t.Fatal(fake.joinErr)
	}
	// And a real coordinator started to be added.
	cfg := testConfig(t, logger, "c2")
	cfg.Join = []string{leader.GossipAddr()}
	c2 := startServer(t, cfg)

	waitFor(t, 10*time.Second, func() error {
		for _, id := range []string{"c2", "c9"} {
			if n := len(logs.lines("run coordd raft add-peer -id " + id + " -raft-addr")); n != 1 {
				return fmt.Errorf("%d lines telling the operator to add %s", n, id)
			}
		}
		return nil
	})
	// Several reconciliations later (every 500 ms, and on every gossip
	// event), neither is in the configuration, and each was logged once.
	time.Sleep(4 * leader.cfg.RaftReconcileInterval)
	for _, id := range []string{"c2", "c9"} {
		if srv, ok := inRaft(leader, id); ok {
			t.Errorf("%s was added from gossip: %+v", id, srv)
		}
		if n := len(logs.lines("run coordd raft add-peer -id " + id + " -raft-addr")); n != 1 {
			t.Errorf("%d lines telling the operator to add %s, want 1", n, id)
		}
	}

	// The operator adds c2.
	var added apiAddedPeer
	if code := apiCall(t, leader, http.MethodPost, "/v1/raft/peers", map[string]any{"id": "c2", "address": c2.RaftAddr()}, &added); code != http.StatusOK ||
		added != (apiAddedPeer{ID: "c2", Address: c2.RaftAddr(), Voter: true, Changed: true}) {
		t.Fatalf("POST /v1/raft/peers c2 = %d %+v", code, added)
	}
	if code := apiCall(t, leader, http.MethodPost, "/v1/raft/peers", map[string]any{"id": "c2", "address": c2.RaftAddr(), "voter": true}, &added); code != http.StatusOK || added.Changed {
		t.Errorf("POST /v1/raft/peers c2 again = %d %+v, want 200 unchanged", code, added)
	}
	servers := []*Server{leader, c2}
	waitForLeader(t, servers...)
	submitJob(t, c2, wordcountSpec) // forwarded to the leader: c2 follows it
	waitForEqualDigests(t, servers...)

	// The fake leaves gossip: nothing is removed.
	if err := fake.ml.Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	_ = fake.ml.Shutdown()
	waitFor(t, 10*time.Second, func() error {
		if memberStatusIs(leader, "c9", StatusAlive) == nil {
			return errors.New("c9 still alive")
		}
		return nil
	})
	time.Sleep(2 * leader.cfg.RaftReconcileInterval)
	if _, ok := inRaft(leader, "c2"); !ok {
		t.Error("c2 left the raft configuration after a gossip member left")
	}
}

// TestPeerAddRequests: POST /v1/raft/peers refuses malformed requests, an
// address nothing listens on, a demotion and another peer's address.
func TestPeerAddRequests(t *testing.T) {
	leader := startSingle(t, testLogger(t), "c1", nil)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	dead.Close()
	for _, tc := range []struct {
		body any
		code int
		want string
	}{
		{`{"id": "c2", "address": "127.0.0.1:1", "extra": 1}`, http.StatusBadRequest, "unknown field"},
		{`{"id": "c2"}{}`, http.StatusBadRequest, "after the JSON object"},
		{map[string]any{"id": "-c2", "address": "127.0.0.1:7001"}, http.StatusBadRequest, "id: "},
		{map[string]any{"id": strings.Repeat("c", 129), "address": "127.0.0.1:7001"}, http.StatusBadRequest, "id: "},
		{map[string]any{"id": "c2", "address": "127.0.0.1"}, http.StatusBadRequest, "address: "},
		{map[string]any{"id": "c2", "address": "127.0.0.1:0"}, http.StatusBadRequest, "port must be 1 to 65535"},
		{map[string]any{"id": "c2", "address": deadAddr}, http.StatusUnprocessableEntity, "nothing accepts connections"},
		{map[string]any{"id": "c1", "address": leader.RaftAddr()}, http.StatusConflict, "is the raft leader"},
		{map[string]any{"id": "c2", "address": leader.RaftAddr()}, http.StatusConflict, "raft peer c1 has address"},
		{strings.Repeat(" ", maxAddPeerBody+1), http.StatusRequestEntityTooLarge, ""},
	} {
		var out struct{ Error string }
		if code := apiCall(t, leader, http.MethodPost, "/v1/raft/peers", tc.body, &out); code != tc.code || !strings.Contains(out.Error, tc.want) {
			t.Errorf("POST /v1/raft/peers %v = %d %q, want %d and %q", tc.body, code, out.Error, tc.code, tc.want)
		}
	}
	if _, ok := inRaft(leader, "c2"); ok {
		t.Error("a refused request added c2")
	}
}

// httpsCall is apiCall over HTTPS with client.
func httpsCall(t *testing.T, client *http.Client, s *Server, method, path string, body, out any) int {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, "https://"+s.HTTPAddr()+path, r)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s on %s: %v", method, path, s.ID(), err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s on %s: answer %d %q: %v", method, path, s.ID(), resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

// tlsListener accepts TLS connections presenting tc's certificate (and
// asking for a client certificate, as a Raft listener does), until the test
// ends.
func tlsListener(t *testing.T, tc *tlsutil.Config) string {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tc.ServerConfig(tlsutil.RoleCoordinator))
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
				_ = c.(*tls.Conn).Handshake()
				c.Close()
			}()
		}
	}()
	return lis.Addr().String()
}

// TestPeerAuthenticatedWithTLS: with TLS, bootstrap counts and the leader
// adds only coordinators whose certificate proves their id at their Raft
// address. Fakes in gossip (a plain listener, a worker certificate, a real
// coordinator's address under another id) never count and are never added;
// a real coordinator is added by the leader with no operator.
func TestPeerAuthenticatedWithTLS(t *testing.T) {
	logger, logs := captureLogger(t)
	certs := newTestPKI(t)
	start := func(id string, expect int, join ...string) *Server {
		cfg := testConfig(t, logger, id)
		cfg.TLS = certs.issue(tlsutil.RoleCoordinator, id)
		// Slower Raft timeouts than the default's 300 ms: TLS handshakes
		// under -race on a loaded machine made leaders step down, and
		// this test is not about failover.
		cfg.RaftHeartbeatTimeout, cfg.RaftElectionTimeout, cfg.RaftLeaderLeaseTimeout = time.Second, time.Second, time.Second
		cfg.BootstrapExpect = expect
		cfg.Join = join
		return startServer(t, cfg)
	}

	// c1 waits for a second voter; a fake one in gossip must not count.
	c1 := start("c1", 2)
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	go func() {
		for {
			c, err := plain.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	fakes := map[string]string{
		"c3": plain.Addr().String(),                                              // no TLS at all
		"c5": tlsListener(t, certs.issue(tlsutil.RoleWorker, "c5")),              // a worker's certificate
		"c6": tlsListener(t, newTestPKI(t).issue(tlsutil.RoleCoordinator, "c6")), // another CA
	}
	// The fakes claim the current build, so that only their
	// authentication keeps them out.
	for id, addr := range fakes {
		if m := startGossipMember(t, id, coordinatorMetaAt(t, addr, transport.FeatureLevel), nil, c1.GossipAddr()); m.joinErr != nil {
			t.Fatal(m.joinErr)
		}
	}
	waitFor(t, 10*time.Second, func() error {
		for id := range fakes {
			if len(logs.lines("failed authentication", "member="+id)) == 0 {
				return fmt.Errorf("no failed authentication of %s logged", id)
			}
		}
		return nil
	})
	if c1.raft.LastIndex() != 0 {
		t.Fatalf("c1 bootstrapped with fakes in gossip: %+v", c1.raft.GetConfiguration().Configuration())
	}

	c2 := start("c2", 2, c1.GossipAddr())
	leader := waitForLeader(t, c1, c2)
	f := leader.raft.GetConfiguration()
	if err := f.Error(); err != nil || len(f.Configuration().Servers) != 2 {
		t.Fatalf("bootstrapped configuration %+v (%v), want c1 and c2", f.Configuration().Servers, err)
	}

	// A fake that names the real c2's Raft address under its own id.
	if m := startGossipMember(t, "c9", coordinatorMetaAt(t, c2.RaftAddr(), transport.FeatureLevel), nil, c1.GossipAddr()); m.joinErr != nil {
		t.Fatal(m.joinErr)
	}
	fakes["c9"] = c2.RaftAddr()
	// A real coordinator: added by the leader once authenticated.
	c4 := start("c4", 0, c1.GossipAddr())
	waitFor(t, 15*time.Second, func() error {
		if srv, ok := inRaft(leader, "c4"); !ok || srv.Suffrage != raft.Voter || string(srv.Address) != c4.RaftAddr() {
			return fmt.Errorf("c4 in the raft configuration: %+v %t", srv, ok)
		}
		return nil
	})
	waitFor(t, 10*time.Second, func() error {
		if len(logs.lines("failed authentication", "member=c9")) == 0 {
			return errors.New("no failed authentication of c9 logged")
		}
		return nil
	})
	time.Sleep(2 * leader.cfg.RaftReconcileInterval)
	for id := range fakes {
		if srv, ok := inRaft(leader, id); ok {
			t.Errorf("fake %s in the raft configuration: %+v", id, srv)
		}
	}
	servers := []*Server{c1, c2, c4}
	leader = waitForLeader(t, servers...)
	api := certs.apiClient()
	if code := httpsCall(t, api, c4, http.MethodPost, "/v1/jobs", wordcountSpec, nil); code != http.StatusCreated {
		t.Fatalf("POST /v1/jobs through c4 = %d", code)
	}
	waitForEqualDigests(t, servers...)

	// With TLS, add-peer authenticates too.
	for id, addr := range map[string]string{"c3": fakes["c3"], "c5": fakes["c5"], "c6": fakes["c6"]} {
		var out struct{ Error string }
		if code := httpsCall(t, api, leader, http.MethodPost, "/v1/raft/peers", map[string]any{"id": id, "address": addr}, &out); code != http.StatusUnprocessableEntity || !strings.Contains(out.Error, "authenticate coordinator "+id) {
			t.Errorf("POST /v1/raft/peers %s at %s = %d %q, want 422", id, addr, code, out.Error)
		}
	}

	// An authenticated coordinator on a build older than a job needs is
	// not added: it would drop the job's field from its state.
	if code := httpsCall(t, api, leader, http.MethodPost, "/v1/jobs", readCommittedSpec, nil); code != http.StatusCreated {
		t.Fatalf("POST /v1/jobs reading committed = %d", code)
	}
	oldAddr := tlsListener(t, certs.issue(tlsutil.RoleCoordinator, "c7"))
	if m := startGossipMember(t, "c7", coordinatorMeta(t, oldAddr), nil, c1.GossipAddr()); m.joinErr != nil {
		t.Fatal(m.joinErr)
	}
	waitFor(t, 15*time.Second, func() error {
		if len(logs.lines("not adding an authenticated coordinator", "member=c7", "feature level 0")) == 0 {
			return errors.New("no refusal of c7 logged")
		}
		return nil
	})
	if srv, ok := inRaft(leader, "c7"); ok {
		t.Errorf("c7, at feature level 0, is in the raft configuration: %+v", srv)
	}
	if os.Getenv("COORDFLOW_TEST_LOG") == "debug" {
		t.Log(strings.Join(logs.lines("authenticat"), ""))
	}
}

// TestGoneMembersPruned: dead and left members stay listed for a while, but
// not for ever, and never more than maxGone of them.
func TestGoneMembersPruned(t *testing.T) {
	s := &Server{memberState: make(map[string]*memberRecord)}
	now := time.Now()
	s.memberState["alive"] = &memberRecord{Member: Member{ID: "alive", Status: StatusAlive}}
	s.memberState["old"] = &memberRecord{Member: Member{ID: "old", Status: StatusDead}, goneAt: now.Add(-goneRetention - time.Second)}
	for i := range maxGone + 10 {
		id := fmt.Sprintf("ghost-%04d", i)
		s.memberState[id] = &memberRecord{Member: Member{ID: id, Status: StatusLeft}, goneAt: now.Add(time.Duration(i) * time.Millisecond)}
	}
	s.pruneGone(now.Add(time.Hour))
	if _, ok := s.memberState["alive"]; !ok {
		t.Fatal("an alive member was pruned")
	}
	if _, ok := s.memberState["old"]; ok {
		t.Error("a member gone for longer than the retention is still listed")
	}
	if got := len(s.memberState) - 1; got != maxGone {
		t.Errorf("%d gone members listed, want %d", got, maxGone)
	}
	for i := range 10 {
		if _, ok := s.memberState[fmt.Sprintf("ghost-%04d", i)]; ok {
			t.Errorf("ghost-%04d, one of the oldest, is still listed", i)
		}
	}
}
