package coordinator

import (
	"net"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport"
)

// portsRefused finds a worker gone only when every port it has refuses
// connections: a live (or stopped) process still accepts them.
func TestPortsRefused(t *testing.T) {
	listen := func() net.Listener {
		t.Helper()
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	closedAddr := func() string {
		l := listen()
		addr := l.Addr().String()
		l.Close()
		return addr
	}
	// A listener that never accepts stands for a stopped process: the
	// kernel completes the handshake all the same.
	live, stopped := listen(), listen()
	s := &Server{ctx: t.Context(), logger: testLogger(t), memberState: map[string]*memberRecord{
		"dead":    {Member: Member{ID: "dead", Role: transport.RoleWorker, GossipAddr: closedAddr(), DataAddr: closedAddr()}},
		"live":    {Member: Member{ID: "live", Role: transport.RoleWorker, GossipAddr: live.Addr().String(), DataAddr: live.Addr().String()}},
		"stopped": {Member: Member{ID: "stopped", Role: transport.RoleWorker, GossipAddr: stopped.Addr().String(), DataAddr: stopped.Addr().String()}},
		"half":    {Member: Member{ID: "half", Role: transport.RoleWorker, GossipAddr: closedAddr(), DataAddr: live.Addr().String()}},
	}}
	go func() {
		for {
			c, err := live.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	// A process being killed: its ports still accept for a moment after
	// its session broke, then refuse.
	dying := listen()
	s.memberState["dying"] = &memberRecord{Member: Member{ID: "dying", Role: transport.RoleWorker, GossipAddr: dying.Addr().String(), DataAddr: closedAddr()}}
	time.AfterFunc(refusedPause/2, func() { dying.Close() })
	if !s.portsRefused("dying") {
		t.Error("portsRefused(dying) = false: a process whose ports close just after its session broke is gone")
	}
	// An exiting process descheduled on a loaded machine may take a few
	// hundred milliseconds to close its listeners.
	slow := listen()
	s.memberState["slow"] = &memberRecord{Member: Member{ID: "slow", Role: transport.RoleWorker, GossipAddr: slow.Addr().String(), DataAddr: closedAddr()}}
	time.AfterFunc(5*refusedPause, func() { slow.Close() })
	if !s.portsRefused("slow") {
		t.Error("portsRefused(slow) = false: a process whose ports close 500 ms after its session broke is gone")
	}
	for id, want := range map[string]bool{"dead": true, "live": false, "stopped": false, "half": false, "unknown": false} {
		if got := s.portsRefused(id); got != want {
			t.Errorf("portsRefused(%s) = %v, want %v", id, got, want)
		}
	}
}
