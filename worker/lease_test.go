package worker

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// fakeLeaseClock is a leaseClock that moves only when the test says.
type fakeLeaseClock struct{ t atomic.Int64 }

func newFakeLeaseClock() *fakeLeaseClock {
	c := &fakeLeaseClock{}
	c.t.Store(int64(time.Second))
	return c
}

func (c *fakeLeaseClock) now() time.Duration      { return time.Duration(c.t.Load()) }
func (c *fakeLeaseClock) advance(d time.Duration) { c.t.Add(int64(d)) }

// leaseSession is a session on clock c with a 5 s lease, whose worker runs
// one task; stopped reports whether the task was stopped, and why.
func leaseSession(t *testing.T, c *fakeLeaseClock) (s *session, stopped func() string) {
	k := taskKey{job: "j", attempt: 1, id: "map-0"}
	m := &taskManager{tasks: map[taskKey]*taskHandle{k: {key: k, cancel: func() {}}}}
	s = &session{now: c.now, w: &Worker{tasks: m, metrics: newMetrics()}, logger: testLogger(t)}
	s.lease.Store(int64(5 * time.Second))
	return s, func() string {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.tasks[k].stopReason
	}
}

// TestLeaseExpiresOnTheLeaseClock: the lease is silence measured on the
// session's lease clock alone, from the last renewal.
func TestLeaseExpiresOnTheLeaseClock(t *testing.T) {
	c := newFakeLeaseClock()
	s, _ := leaseSession(t, c)
	if _, _, expired := s.leaseExpired(); expired {
		t.Fatal("lease expired before any leader was heard")
	}
	s.renew()
	c.advance(5 * time.Second)
	if silent, _, expired := s.leaseExpired(); expired || silent != 5*time.Second {
		t.Fatalf("after exactly the lease: silent %v, expired %t; want 5s, false", silent, expired)
	}
	c.advance(time.Millisecond)
	if silent, _, expired := s.leaseExpired(); !expired || silent != 5*time.Second+time.Millisecond {
		t.Fatalf("after the lease: silent %v, expired %t; want 5.001s, true", silent, expired)
	}
	s.renew()
	if _, _, expired := s.leaseExpired(); expired {
		t.Fatal("lease expired right after a renewal")
	}
}

// TestLeaseEndsBeforeALateRenewal: a renewal that comes after the lease has
// run out (a message read once the process resumed from a freeze longer
// than the lease, sent by the leader before it) stops the tasks first, as
// watchLease's next tick would have: the leader has restarted them
// elsewhere. One within the lease stops nothing.
func TestLeaseEndsBeforeALateRenewal(t *testing.T) {
	for _, renew := range []struct {
		name string
		do   func(s *session, c *fakeLeaseClock)
	}{
		{"a message", func(s *session, _ *fakeLeaseClock) { s.renew() }},
		{"a leaderless hold", func(s *session, c *fakeLeaseClock) { s.renewTo(c.now()) }},
	} {
		t.Run(renew.name, func(t *testing.T) {
			c := newFakeLeaseClock()
			s, stopped := leaseSession(t, c)
			s.renew()
			c.advance(4 * time.Second)
			renew.do(s, c)
			if why := stopped(); why != "" {
				t.Fatalf("a renewal within the lease stopped the task: %s", why)
			}
			c.advance(6 * time.Second) // frozen past the lease
			renew.do(s, c)
			if why := stopped(); !strings.Contains(why, "lease expired") {
				t.Fatalf("a renewal past the lease left the task running (stop reason %q)", why)
			}
			if _, _, expired := s.leaseExpired(); expired {
				t.Fatal("the late renewal did not renew the lease")
			}
		})
	}
}

// TestMonotonicClock: the process's lease clock is positive and never goes
// back. It reads time.Since of a time.Now() value, which Go measures on the
// monotonic clock, so a step of the wall clock moves it neither way.
func TestMonotonicClock(t *testing.T) {
	now := monotonicClock()
	prev := now()
	if prev <= 0 {
		t.Fatalf("first reading %v, want > 0", prev)
	}
	for range 1000 {
		r := now()
		if r < prev {
			t.Fatalf("lease clock went back from %v to %v", prev, r)
		}
		prev = r
	}
	time.Sleep(10 * time.Millisecond)
	if r := now(); r-prev < 10*time.Millisecond {
		t.Fatalf("lease clock moved %v over a 10 ms sleep", r-prev)
	}
}

// TestLeaseIgnoresOtherClocks runs a worker whose lease clock the test
// drives: with its leader silent for three leases of real time but not on
// the lease clock, its task runs on; one step of the lease clock past the
// lease stops it. Every lease deadline of the session (the lease watcher's
// and the session's own silence check) reads the lease clock and nothing
// else, so the wall clock cannot stop or prolong tasks.
func TestLeaseIgnoresOtherClocks(t *testing.T) {
	f := newFakeCoord(t, true, "")
	f.leaseMs, f.hbMs = 300, 30
	c := newFakeLeaseClock()
	w := startWorkerWithLeaseClock(t, "w1", f, c.now)
	d := mapDeploy("job", 1, operator.Count, 1, 128, mapRefs(128, w), 0)
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	f.silent.Store(true)
	time.Sleep(900 * time.Millisecond) // three leases, on every clock but the lease clock
	for _, r := range f.messages() {
		if st := r.msg.GetStatus(); st != nil && isTerminal(st.GetPhase()) {
			t.Fatalf("task ended while the lease clock stood still: %v", st)
		}
	}
	if n := metricValue(t, w.Gatherer(), "coordflow_worker_lease_expiries_total", nil); n != 0 {
		t.Fatalf("lease expiries = %v, want 0", n)
	}

	c.advance(301 * time.Millisecond)
	if reason := f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_CANCELLED); !strings.Contains(reason, "lease expired") {
		t.Fatalf("cancel reason %q does not mention the lease", reason)
	}
}

// startWorkerWithLeaseClock is startWorker with the session's lease clock
// replaced before the worker runs.
func startWorkerWithLeaseClock(t *testing.T, id string, f *fakeCoord, now leaseClock) *Worker {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ID = id
	cfg.DataAddr = "127.0.0.1:0"
	cfg.StateDir = t.TempDir()
	cfg.GossipAddr = "127.0.0.1:0"
	cfg.Join = []string{f.gossipAddr}
	cfg.Logger = testLogger(t)
	w, err := New(cfg)
	if err != nil {
		t.Fatalf("new worker: %v", err)
	}
	w.session.now = now
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("worker %s: Run: %v", id, err)
			}
		case <-time.After(waitTimeout):
			t.Errorf("worker %s did not stop within %s", id, waitTimeout)
		}
	})
	return w
}
