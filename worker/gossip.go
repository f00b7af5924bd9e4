package worker

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/coordflow/coordflow/transport"
)

// newMemberlist creates the worker's gossip member, named cfg.ID and
// advertising what meta holds. It binds cfg.GossipAddr (port 0 picks a free
// port) but joins nobody yet: joinLoop does.
func newMemberlist(cfg Config, meta *metaDelegate, events memberlist.EventDelegate, logger *slog.Logger) (*memberlist.Memberlist, error) {
	host, portStr, err := net.SplitHostPort(cfg.GossipAddr)
	if err != nil {
		return nil, fmt.Errorf("worker config: gossip addr %q: %w", cfg.GossipAddr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("worker config: gossip addr %q: bad port: %w", cfg.GossipAddr, err)
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.ID
	mc.BindAddr = host
	mc.BindPort = port
	mc.AdvertisePort = port
	mc.ProbeInterval = cfg.ProbeInterval
	mc.ProbeTimeout = cfg.ProbeTimeout
	mc.SuspicionMult = cfg.SuspicionMult
	mc.GossipInterval = cfg.GossipInterval
	mc.Delegate = meta
	mc.Events = &validatingEvents{next: events, logger: logger, bad: make(map[string]string)}
	mc.Logger = log.New(memberlistLogWriter{logger: logger.With("component", "memberlist")}, "", 0)
	if len(cfg.GossipKeys) > 0 {
		kr, err := memberlist.NewKeyring(cfg.GossipKeys, cfg.GossipKeys[0])
		if err != nil {
			return nil, fmt.Errorf("worker config: gossip encryption keys: %w", err)
		}
		// Members without one of the keys are refused, in both directions.
		mc.Keyring = kr
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	} else {
		logger.Info("gossip is not encrypted: anyone who reaches the gossip port can join the pool (workerd -encrypt; docs/operations.md)")
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start gossip on %s: %w", cfg.GossipAddr, err)
	}
	return ml, nil
}

// validatingEvents passes memberlist's events on to next for members whose
// name and meta are valid (transport.DecodeMember). A member with an invalid
// one is passed on as having left, so that nothing it advertised is used,
// and logged once per member and problem. memberlist calls it one event at a
// time, holding its node lock.
type validatingEvents struct {
	next   memberlist.EventDelegate
	logger *slog.Logger
	bad    map[string]string // member name -> the problem last logged
}

func (v *validatingEvents) NotifyJoin(n *memberlist.Node) {
	if v.valid(n) {
		v.next.NotifyJoin(n)
	}
}

func (v *validatingEvents) NotifyUpdate(n *memberlist.Node) {
	if v.valid(n) {
		v.next.NotifyUpdate(n)
	}
}

func (v *validatingEvents) NotifyLeave(n *memberlist.Node) {
	delete(v.bad, n.Name)
	v.next.NotifyLeave(n)
}

// valid reports whether n's name and meta are valid; if not, it forgets n
// downstream and logs why, once.
func (v *validatingEvents) valid(n *memberlist.Node) bool {
	_, err := transport.DecodeMember(n.Name, n.Meta)
	if err == nil {
		delete(v.bad, n.Name)
		return true
	}
	if v.bad[n.Name] != err.Error() {
		if len(v.bad) < maxBadMembers {
			v.bad[n.Name] = err.Error()
		}
		field := "meta"
		if me := (*transport.MetaError)(nil); errors.As(err, &me) {
			field = me.Field
		}
		v.logger.Warn("ignoring gossip member with invalid meta", "member", n.Name, "addr", n.Address(), "field", field, "err", err)
	}
	v.next.NotifyLeave(n)
	return false
}

// maxBadMembers bounds the members with invalid meta remembered (to log each
// once); beyond it, each event of another one is logged.
const maxBadMembers = 1024

// metaDelegate advertises the worker's node meta; workers gossip nothing
// else. The meta changes once, when the worker marks itself leaving;
// memberlist reads it from its own goroutines.
type metaDelegate struct{ meta atomic.Pointer[[]byte] }

// newMetaDelegate returns a delegate advertising meta.
func newMetaDelegate(meta transport.NodeMeta) (*metaDelegate, error) {
	d := &metaDelegate{}
	if err := d.set(meta); err != nil {
		return nil, err
	}
	return d, nil
}

// set replaces the advertised meta; memberlist gossips it on the next
// UpdateNode.
func (d *metaDelegate) set(meta transport.NodeMeta) error {
	b, err := meta.Encode()
	if err != nil {
		return err
	}
	d.meta.Store(&b)
	return nil
}

func (d *metaDelegate) NodeMeta(limit int) []byte {
	b := *d.meta.Load()
	if len(b) > limit {
		return nil // Encode already enforces memberlist's limit
	}
	return b
}
func (*metaDelegate) NotifyMsg([]byte)                           {}
func (*metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (*metaDelegate) LocalState(join bool) []byte                { return nil }
func (*metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

var memberlistLevels = []struct {
	prefix string
	level  slog.Level
}{
	{"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo}, {"[WARN]", slog.LevelWarn},
	{"[ERR]", slog.LevelError}, {"[ERROR]", slog.LevelError},
}

// memberlistLogWriter turns memberlist's "[LEVEL] memberlist: msg" lines into
// slog records at the matching level.
type memberlistLogWriter struct{ logger *slog.Logger }

func (w memberlistLogWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	level := slog.LevelInfo
	for _, l := range memberlistLevels {
		if rest, ok := strings.CutPrefix(line, l.prefix); ok {
			level, line = l.level, strings.TrimSpace(rest)
			break
		}
	}
	line = strings.TrimPrefix(line, "memberlist: ")
	w.logger.Log(context.Background(), level, line)
	return len(p), nil
}

// joinLoop joins cfg.Join, retrying with backoff until it succeeds, and joins
// again whenever no coordinator has been visible for a while: after a long
// partition both sides may have declared each other dead, and memberlist does
// not reconnect dead members by itself. It returns when ctx ends.
func (w *Worker) joinLoop(ctx context.Context) {
	if len(w.cfg.Join) == 0 {
		return
	}
	const checkEvery = 2 * time.Second
	bo := newBackoff(100*time.Millisecond, 5*time.Second)
	joined := false
	for {
		if !joined || len(w.coordinators()) == 0 {
			n, err := w.members.Join(w.cfg.Join)
			switch {
			case err != nil && n == 0:
				w.logger.Warn("join gossip pool failed; retrying", "join", w.cfg.Join, "err", err)
			case !joined:
				joined = true
				bo.reset()
				w.logger.Info("joined gossip pool", "contacted", n)
			}
		}
		wait := checkEvery
		if !joined {
			wait = bo.next()
		}
		if !sleepCtx(ctx, wait) {
			return
		}
	}
}

// coordinators returns the RPC addresses of the coordinators gossip knows
// alive (or suspect) and not leaving, sorted.
func (w *Worker) coordinators() []string { return w.coords.addrs() }

// coordDirectory keeps the RPC address of every coordinator gossip knows
// alive and not leaving, from memberlist's event delegate. Reading the Meta of
// the nodes memberlist.Members returns would race with gossip: they point
// into memberlist's own state, which it rewrites on every meta update.
type coordDirectory struct {
	mu     sync.Mutex
	rpc    map[string]string // gossip name -> RPC address
	gossip map[string]string // gossip name -> gossip address
}

func newCoordDirectory() *coordDirectory {
	return &coordDirectory{rpc: make(map[string]string), gossip: make(map[string]string)}
}

// NotifyJoin, NotifyUpdate and NotifyLeave are called by memberlist one at a
// time, holding its node lock: they copy what they need and never call back.
func (d *coordDirectory) NotifyJoin(n *memberlist.Node)   { d.observe(n, true) }
func (d *coordDirectory) NotifyUpdate(n *memberlist.Node) { d.observe(n, true) }
func (d *coordDirectory) NotifyLeave(n *memberlist.Node)  { d.observe(n, false) }

func (d *coordDirectory) observe(n *memberlist.Node, alive bool) {
	meta, err := transport.DecodeNodeMeta(n.Meta)
	d.mu.Lock()
	defer d.mu.Unlock()
	if !alive || err != nil || meta.Role != transport.RoleCoordinator || meta.RPCAddr == "" || meta.Leaving {
		delete(d.rpc, n.Name)
		delete(d.gossip, n.Name)
		return
	}
	d.rpc[n.Name] = meta.RPCAddr
	d.gossip[n.Name] = n.Address()
}

// gossipAddrs returns the gossip address of every coordinator, by name.
func (d *coordDirectory) gossipAddrs() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.gossip)
}

// addrs returns the RPC addresses, sorted.
func (d *coordDirectory) addrs() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	addrs := make([]string, 0, len(d.rpc))
	for _, a := range d.rpc {
		addrs = append(addrs, a)
	}
	sort.Strings(addrs)
	return addrs
}

// backoff is a capped exponential backoff; it is not safe for concurrent use.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(lo, hi time.Duration) *backoff { return &backoff{min: lo, max: hi} }

// next returns the wait before the next attempt, drawn at random from the
// upper half of the current step so that workers that lost the same leader do
// not retry in lockstep, and doubles the step, up to max.
func (b *backoff) next() time.Duration {
	if b.cur < b.min {
		b.cur = b.min
	}
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	return jitter(d)
}

// first returns the shortest wait, jittered, without growing the backoff.
func (b *backoff) first() time.Duration { return jitter(b.min) }

// jitter returns a random duration in the upper half of d.
func jitter(d time.Duration) time.Duration {
	if half := d / 2; half > 0 {
		return half + rand.N(d-half)
	}
	return d
}

func (b *backoff) reset() { b.cur = 0 }

// sleepCtx waits for d or until ctx ends; it reports whether the full wait
// elapsed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
