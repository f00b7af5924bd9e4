package worker

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/coordflow/coordflow/transport"
)

// newMemberlist creates the worker's gossip member, named cfg.ID and
// advertising meta. It binds cfg.GossipAddr (port 0 picks a free port) but
// joins nobody yet: joinLoop does.
func newMemberlist(cfg Config, meta transport.NodeMeta, logger *slog.Logger) (*memberlist.Memberlist, error) {
	encoded, err := meta.Encode()
	if err != nil {
		return nil, err
	}
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
	mc.Delegate = metaDelegate{meta: encoded}
	mc.Logger = log.New(memberlistLogWriter{logger: logger.With("component", "memberlist")}, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start gossip on %s: %w", cfg.GossipAddr, err)
	}
	return ml, nil
}

// metaDelegate advertises the worker's node meta; workers gossip nothing else.
type metaDelegate struct{ meta []byte }

func (d metaDelegate) NodeMeta(limit int) []byte {
	if len(d.meta) > limit {
		return nil // Encode already enforces memberlist's limit
	}
	return d.meta
}
func (metaDelegate) NotifyMsg([]byte)                           {}
func (metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (metaDelegate) LocalState(join bool) []byte                { return nil }
func (metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

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
// alive (or suspect), sorted.
func (w *Worker) coordinators() []string {
	var addrs []string
	for _, n := range w.members.Members() {
		meta, err := transport.DecodeNodeMeta(n.Meta)
		if err != nil || meta.Role != transport.RoleCoordinator || meta.RPCAddr == "" {
			continue
		}
		addrs = append(addrs, meta.RPCAddr)
	}
	sort.Strings(addrs)
	return addrs
}

// backoff is a capped exponential backoff; it is not safe for concurrent use.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(lo, hi time.Duration) *backoff { return &backoff{min: lo, max: hi} }

// next returns the wait before the next attempt and doubles it, up to max.
func (b *backoff) next() time.Duration {
	if b.cur < b.min {
		b.cur = b.min
	}
	d := b.cur
	b.cur = min(b.cur*2, b.max)
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
