package coordinator

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/coordflow/coordflow/transport"
)

// scriptedStream is a worker's side of a control stream as the Session
// handler sees it: Recv returns what the test puts on in.
type scriptedStream struct {
	grpc.ServerStream
	ctx context.Context
	in  chan *transport.WorkerMessage
}

func (s *scriptedStream) Context() context.Context { return s.ctx }

func (s *scriptedStream) Send(*transport.CoordinatorMessage) error { return nil }

func (s *scriptedStream) Recv() (*transport.WorkerMessage, error) {
	select {
	case m := <-s.in:
		return m, nil
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	}
}

// TestHeartbeatAnsweredWhileLeaderLoopStalls: a worker's heartbeat is
// answered although the leader loop takes no events (it is stuck in a Raft
// write) and a status the worker sent first is still waiting for it.
func TestHeartbeatAnsweredWhileLeaderLoopStalls(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Nobody reads events. A heartbeat interval and lease long enough that
	// the silence watchdog (silenceLimit) does not close the session before
	// receive reads the heartbeat: with none it is 1 ms, and a loaded CI
	// run lost that race.
	l := &leader{ctx: ctx, events: make(chan leaderEvent), heartbeat: time.Second, lease: time.Minute}
	sess := newSession(ctx, &transport.Hello{WorkerId: "w1"}, nil)
	stream := &scriptedStream{ctx: ctx, in: make(chan *transport.WorkerMessage, 2)}
	r := &transport.TaskRef{JobId: "job", Attempt: 1, TaskId: "map-0"}
	stream.in <- &transport.WorkerMessage{Msg: &transport.WorkerMessage_Status{Status: &transport.TaskStatus{Task: r, Phase: transport.TaskPhase_TASK_PHASE_RUNNING}}}
	stream.in <- &transport.WorkerMessage{Msg: &transport.WorkerMessage_Heartbeat{Heartbeat: &transport.Heartbeat{}}}
	done := make(chan struct{})
	go func() { defer close(done); receive(stream, sess, l) }()

	select {
	case m := <-sess.out:
		if m.GetHeartbeat() == nil {
			t.Fatalf("first message to the worker is %T, want a heartbeat", m.GetMsg())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("heartbeat not answered while the leader loop stalls")
	}
	select {
	case ev := <-l.events:
		if wm, ok := ev.(workerMessage); !ok || wm.msg.GetStatus() == nil {
			t.Fatalf("leader loop got %#v, want the worker's status", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("status never reached the leader loop")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("receive did not return when the stream ended")
	}
}
