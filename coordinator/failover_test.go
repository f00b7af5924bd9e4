package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/coordflow/coordflow/transport"
)

// TestLeaderlessCoordinatorHoldsWorkerStreams: a coordinator that knows no
// leader (two of three are down) answers a worker's Hello and every heartbeat
// with NotLeader naming no leader, which renews the worker's lease, and keeps
// the stream open; once quorum is back and a leader is elected, it names the
// leader on the held stream and ends it.
func TestLeaderlessCoordinatorHoldsWorkerStreams(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	rest := followers(leader, servers)
	survivor, down := rest[0], []*Server{leader, rest[1]}
	for _, s := range down {
		stopServer(t, s)
	}
	waitFor(t, 10*time.Second, func() error {
		if id, _, _ := survivor.leaderInfo(); id != "" {
			return fmt.Errorf("%s still names leader %s", survivor.ID(), id)
		}
		return nil
	})

	var out struct{ Error string }
	if code := apiCall(t, survivor, http.MethodPost, "/v1/jobs", wordcountSpec, &out); code != http.StatusServiceUnavailable ||
		!strings.Contains(out.Error, "no leader") || !strings.Contains(out.Error, "quorum of 2 of the 3 voters") {
		t.Errorf("POST /v1/jobs without quorum = %d %q, want 503 naming the quorum", code, out.Error)
	}

	conn, err := grpc.NewClient(survivor.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(m *transport.WorkerMessage) {
		t.Helper()
		if err := stream.Send(m); err != nil {
			t.Fatalf("send %T: %v", m.GetMsg(), err)
		}
	}
	notLeader := func() *transport.NotLeader {
		t.Helper()
		m, err := stream.Recv()
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		nl := m.GetNotLeader()
		if nl == nil {
			t.Fatalf("got %T, want NotLeader", m.GetMsg())
		}
		return nl
	}
	heartbeat := &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}
	send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: &transport.Hello{WorkerId: "w1", DataAddr: "127.0.0.1:1", Slots: 4}}})
	for i := range 4 {
		if nl := notLeader(); nl.GetLeaderId() != "" || nl.GetLeaderRpcAddr() != "" {
			t.Fatalf("answer %d names leader %q at %q, want none", i, nl.GetLeaderId(), nl.GetLeaderRpcAddr())
		}
		send(heartbeat)
	}
	var held dto.Metric
	if err := survivor.metrics.leaderlessStreams.Write(&held); err != nil || held.GetGauge().GetValue() != 1 {
		t.Errorf("leaderless streams = %v (%v), want 1", held.GetGauge().GetValue(), err)
	}

	before := make(map[string]string) // each restarted node's RPC address before its restart
	for i, s := range down {
		before[s.ID()] = s.RPCAddr()
		down[i] = startServer(t, restartConfig(s, survivor.GossipAddr()))
	}
	newLeader := waitForLeader(t, survivor, down[0], down[1])
	for {
		nl := notLeader()
		if nl.GetLeaderId() == "" {
			continue // an answer to a heartbeat sent before the election
		}
		// The restarted leader's RPC port is new; the survivor's gossip
		// may not have its new one yet.
		if addr := nl.GetLeaderRpcAddr(); nl.GetLeaderId() != newLeader.ID() || (addr != newLeader.RPCAddr() && addr != before[newLeader.ID()]) {
			t.Fatalf("NotLeader names %s at %s, want %s at %s", nl.GetLeaderId(), addr, newLeader.ID(), newLeader.RPCAddr())
		}
		break
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after naming the leader the stream should end, got %v", err)
	}
}

// TestCoordinatorOutsideTheClusterRenewsNoLease: a coordinator that is in no
// Raft configuration (never bootstrapped, not yet added) knows nothing about
// the cluster's leader: it refuses a worker's stream instead of answering
// NotLeader naming none, which would renew the worker's lease.
func TestCoordinatorOutsideTheClusterRenewsNoLease(t *testing.T) {
	s := startServer(t, testConfig(t, testLogger(t), "c1"))
	conn, err := grpc.NewClient(s.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := transport.NewControlClient(conn).Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&transport.WorkerMessage{Msg: &transport.WorkerMessage_Hello{Hello: &transport.Hello{WorkerId: "w1", DataAddr: "127.0.0.1:1", Slots: 1}}}); err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "not in the raft configuration") {
		t.Fatalf("answer to hello: %v, %v; want Unavailable, not in the raft configuration", m, err)
	}
}

// TestRemovePeer: DELETE /v1/raft/peers/{id} through a follower removes a
// coordinator that is gone (added with POST /v1/raft/peers: without TLS the
// leader adds none from gossip), and refuses to remove the leader, a
// coordinator that is alive, or one that is not a peer.
func TestRemovePeer(t *testing.T) {
	servers := startCluster(t, 3)
	leader := waitForLeader(t, servers...)
	cfg := testConfig(t, leader.cfg.Logger, "c4")
	cfg.BootstrapExpect = 3
	cfg.Join = []string{leader.GossipAddr()}
	fourth := startServer(t, cfg)
	follower := followers(leader, servers)[0]
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(leader, "c4", StatusAlive) })
	if code := apiCall(t, follower, http.MethodPost, "/v1/raft/peers", map[string]any{"id": "c4", "address": fourth.RaftAddr()}, nil); code != http.StatusOK {
		t.Fatalf("POST /v1/raft/peers c4 = %d", code)
	}
	waitFor(t, 15*time.Second, func() error { return hasPeer(leader, "c4", true) })

	for _, tc := range []struct {
		id   string
		code int
		want string
	}{
		{leader.ID(), http.StatusConflict, "cannot remove itself"},
		{"c4", http.StatusConflict, "is alive in gossip"},
		{"c9", http.StatusNotFound, `no raft peer "c9"`},
	} {
		var out struct{ Error string }
		if code := apiCall(t, follower, http.MethodDelete, "/v1/raft/peers/"+tc.id, nil, &out); code != tc.code || !strings.Contains(out.Error, tc.want) {
			t.Errorf("DELETE /v1/raft/peers/%s = %d %q, want %d and %q", tc.id, code, out.Error, tc.code, tc.want)
		}
	}

	stopServer(t, fourth)
	waitFor(t, 10*time.Second, func() error { return memberStatusIs(leader, "c4", StatusLeft) })
	if code := apiCall(t, follower, http.MethodDelete, "/v1/raft/peers/c4", nil, nil); code != http.StatusOK {
		t.Fatalf("DELETE /v1/raft/peers/c4 = %d, want 200", code)
	}
	waitFor(t, 10*time.Second, func() error {
		var errs []error
		for _, s := range servers {
			errs = append(errs, hasPeer(s, "c4", false))
		}
		return errors.Join(errs...)
	})
	submitJob(t, follower, wordcountSpec)
	waitForEqualDigests(t, servers...)
}

// hasPeer reports whether s's Raft configuration holds id (want) or not.
func hasPeer(s *Server, id string, want bool) error {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	for _, srv := range f.Configuration().Servers {
		if string(srv.ID) == id {
			if !want {
				return fmt.Errorf("%s still has %s in its raft configuration", s.ID(), id)
			}
			return nil
		}
	}
	if want {
		return fmt.Errorf("%s has no %s in its raft configuration", s.ID(), id)
	}
	return nil
}
