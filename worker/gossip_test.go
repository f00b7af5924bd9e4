package worker

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"io"
	"log"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/coordflow/coordflow/transport"
)

// rawMeta is a memberlist delegate advertising fixed meta bytes.
type rawMeta []byte

func (m rawMeta) NodeMeta(int) []byte                  { return m }
func (rawMeta) NotifyMsg([]byte)                       {}
func (rawMeta) GetBroadcasts(int, int) [][]byte        { return nil }
func (rawMeta) LocalState(bool) []byte                 { return nil }
func (rawMeta) MergeRemoteState(buf []byte, join bool) {}

// gossipCoordinator starts a bare memberlist member that advertises meta as
// a coordinator would, encrypted with keys (none: plain), joined to join. It
// returns the member and the join's error.
func gossipCoordinator(t *testing.T, name string, meta []byte, keys [][]byte, join string) (*memberlist.Memberlist, error) {
	t.Helper()
	mc := memberlist.DefaultLANConfig()
	mc.Name = name
	mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
	mc.ProbeInterval, mc.ProbeTimeout, mc.GossipInterval = 200*time.Millisecond, 100*time.Millisecond, 50*time.Millisecond
	mc.TCPTimeout = time.Second
	mc.Delegate = rawMeta(meta)
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
	t.Cleanup(func() { _ = ml.Shutdown() })
	_, err = ml.Join([]string{join})
	return ml, err
}

func coordMeta(t *testing.T, rpcAddr string) []byte {
	t.Helper()
	b, err := json.Marshal(transport.NodeMeta{Role: transport.RoleCoordinator, RPCAddr: rpcAddr, RaftAddr: "127.0.0.1:7001", HTTPAddr: "127.0.0.1:7201", Voter: true})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gossipKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestGossipEncryption: a worker with a gossip key opens its session with a
// coordinator that has the key, and never takes a coordinator that gossips
// in plain text or with another key for one; it keeps working across a key
// rotation step (two keys, either first).
func TestGossipEncryption(t *testing.T) {
	key, other := gossipKey(t), gossipKey(t)
	real := newFakeCoord(t, false, "")
	w := startWorker(t, "w1", real, func(c *Config) {
		c.Join = nil
		c.GossipKeys = [][]byte{other, key} // rotating: other encrypts, key is still accepted
	})
	// Outsiders advertising their own control servers: the worker must
	// never dial them.
	if _, err := gossipCoordinator(t, "c-plain", coordMeta(t, "127.0.0.1:1"), nil, w.GossipAddr()); err == nil {
		t.Error("an unencrypted member joined the encrypted worker")
	}
	if _, err := gossipCoordinator(t, "c-wrong", coordMeta(t, "127.0.0.1:2"), [][]byte{gossipKey(t)}, w.GossipAddr()); err == nil {
		t.Error("a member with another key joined the encrypted worker")
	}
	if _, err := gossipCoordinator(t, "c-real", coordMeta(t, real.rpcAddr), [][]byte{key, other}, w.GossipAddr()); err != nil {
		t.Fatalf("join with the keys: %v", err)
	}
	waitFor(t, "a session with the coordinator that has the key", func() bool {
		real.mu.Lock()
		defer real.mu.Unlock()
		return real.sessions["w1"] != nil
	})
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if got := w.coordinators(); !slices.Equal(got, []string{real.rpcAddr}) {
			t.Fatalf("coordinators %v, want only %s", got, real.rpcAddr)
		}
		for _, m := range w.members.Members() {
			if m.Name == "c-plain" || m.Name == "c-wrong" {
				t.Fatalf("%s is a member of the encrypted pool", m.Name)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestGossipIgnoresInvalidCoordinatorMeta: a "coordinator" whose meta is
// invalid is never dialled, and is logged once; one whose meta turns invalid
// is dropped.
func TestGossipIgnoresInvalidCoordinatorMeta(t *testing.T) {
	var logs syncBuffer
	dir := newCoordDirectory()
	v := &validatingEvents{next: dir, logger: slog.New(slog.NewTextHandler(&logs, nil)), bad: make(map[string]string)}
	node := func(name string, meta []byte) *memberlist.Node {
		return &memberlist.Node{Name: name, Addr: []byte{127, 0, 0, 1}, Port: 7301, Meta: meta}
	}
	bad := coordMeta(t, "127.0.0.1:70000")
	v.NotifyJoin(node("c1", coordMeta(t, "127.0.0.1:7101")))
	v.NotifyJoin(node("c2", bad))
	v.NotifyUpdate(node("c2", bad))
	v.NotifyJoin(node("c 3", coordMeta(t, "127.0.0.1:7103")))
	v.NotifyJoin(node("c4", []byte(`{"role":"coordinator","rpc_addr":"127.0.0.1:7104","slots":4}`)))
	if got := dir.addrs(); !slices.Equal(got, []string{"127.0.0.1:7101"}) {
		t.Errorf("coordinators %v, want only c1's", got)
	}
	for _, want := range []string{"member=c2 ", "field=rpc_addr", `member="c 3"`, "field=id", "member=c4 ", "field=slots"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	if n := strings.Count(logs.String(), "member=c2 "); n != 1 {
		t.Errorf("c2 logged %d times, want once:\n%s", n, logs.String())
	}
	v.NotifyUpdate(node("c1", bad))
	if got := dir.addrs(); len(got) != 0 {
		t.Errorf("coordinators %v after c1's meta turned invalid, want none", got)
	}
}

// TestGossipRefusesTooManySlots: a worker does not start with more slots
// than any coordinator would accept.
func TestGossipRefusesTooManySlots(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ID, cfg.DataAddr, cfg.GossipAddr, cfg.StateDir = "w1", "127.0.0.1:0", "127.0.0.1:0", t.TempDir()
	cfg.Slots = transport.MaxSlots + 1
	cfg.Logger = testLogger(t)
	if w, err := New(cfg); err == nil || !strings.Contains(err.Error(), "slots") {
		if w != nil {
			w.closeListeners()
			_ = w.members.Shutdown()
		}
		t.Fatalf("New with %d slots: %v, want an error naming slots", cfg.Slots, err)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
