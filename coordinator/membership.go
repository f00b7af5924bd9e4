package coordinator

import (
	"cmp"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/coordflow/coordflow/transport"
)

const (
	// joinBackoffMin and joinBackoffMax bound the retry delay of -join:
	// nodes start at the same time, so the first attempts often fail.
	joinBackoffMin = 100 * time.Millisecond
	joinBackoffMax = 5 * time.Second
	// gossipLeaveTimeout bounds each of the two broadcasts of a graceful
	// leave (the leaving mark, then the leave itself).
	gossipLeaveTimeout = time.Second
	// roleUnknown is shown for a member whose meta cannot be decoded.
	roleUnknown = "unknown"
)

// memberRecord is what this node remembers of one gossip member. leaving is
// the member's transport.NodeMeta.Leaving as last gossiped: a member that
// goes away with it set has left; without it, it died. A member whose name or
// meta is invalid has Problem set and role unknown, and no addresses: the
// scheduler and the Raft reconciliation, which select members by role, never
// use it.
type memberRecord struct {
	Member
	leaving bool
	// goneAt is when the member died or left (zero while alive): dead and
	// left records are pruned after goneRetention, and beyond maxGone.
	goneAt time.Time
}

// goneRetention is how long a dead or left member stays listed, as Consul's
// reconnect_timeout; maxGone bounds how many are listed at once, so that
// members that come and go under ever new names cannot grow the map.
const (
	goneRetention = 72 * time.Hour
	maxGone       = 1024
)

// pruneGone forgets dead and left members past goneRetention, and the
// oldest beyond maxGone. The caller holds memberMu.
func (s *Server) pruneGone(now time.Time) {
	var gone []*memberRecord
	for id, r := range s.memberState {
		switch {
		case r.goneAt.IsZero():
		case now.Sub(r.goneAt) > goneRetention:
			delete(s.memberState, id)
		default:
			gone = append(gone, r)
		}
	}
	if len(gone) <= maxGone {
		return
	}
	slices.SortFunc(gone, func(a, b *memberRecord) int { return a.goneAt.Compare(b.goneAt) })
	for _, r := range gone[:len(gone)-maxGone] {
		delete(s.memberState, r.ID)
	}
}

// setupMemberlist creates the memberlist on GossipAddr, tuned by Config. Its
// delegates update memberState from then on; joining happens in joinLoop.
func (s *Server) setupMemberlist() error {
	host, portStr, err := net.SplitHostPort(s.cfg.GossipAddr)
	if err != nil {
		return fmt.Errorf("gossip addr %q: %w", s.cfg.GossipAddr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return fmt.Errorf("gossip addr %q: bad port", s.cfg.GossipAddr)
	}
	ip := net.ParseIP(host)
	if host != "" && ip == nil {
		return fmt.Errorf("gossip addr %q: host must be an IP address", s.cfg.GossipAddr)
	}

	mc := memberlist.DefaultLANConfig()
	mc.Name = s.cfg.ID
	mc.BindAddr, mc.BindPort = "0.0.0.0", port
	if ip != nil {
		mc.BindAddr = ip.String()
	}
	if ip != nil && !ip.IsUnspecified() {
		// Otherwise memberlist picks a private address to advertise.
		mc.AdvertiseAddr, mc.AdvertisePort = ip.String(), port
	}
	mc.ProbeInterval = s.cfg.ProbeInterval
	mc.ProbeTimeout = s.cfg.ProbeTimeout
	mc.SuspicionMult = s.cfg.SuspicionMult
	mc.GossipInterval = s.cfg.GossipInterval
	mc.Delegate = gossipDelegate{s}
	mc.Events = eventDelegate{s}
	if len(s.cfg.GossipKeys) > 0 {
		kr, err := gossipKeyring(s.cfg.GossipKeys)
		if err != nil {
			return err
		}
		mc.Keyring = kr
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	} else {
		s.logger.Info("gossip is not encrypted: anyone who reaches the gossip port can join the pool (coordd agent -encrypt; docs/operations.md)")
	}
	// memberlist's own lines go to debug; membership changes are logged at
	// info by the event delegate.
	mc.Logger = log.New(&levelWriter{logger: s.logger.With("component", "memberlist"), def: slog.LevelDebug, max: slog.LevelDebug}, "", 0)

	ml, err := memberlist.Create(mc)
	if err != nil {
		return fmt.Errorf("start gossip on %s: %w", s.cfg.GossipAddr, err)
	}
	s.members = ml
	return nil
}

// gossipKeyring returns memberlist's keyring of keys: keys[0] encrypts
// (the primary), every key decrypts.
func gossipKeyring(keys [][]byte) (*memberlist.Keyring, error) {
	kr, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return nil, fmt.Errorf("gossip encryption keys: %w", err)
	}
	return kr, nil
}

// joinLoop joins the pool through cfg.Join, retrying with backoff until one
// peer answers or the server shuts down. The node's own address is skipped,
// since contacting only oneself would count as success.
func (s *Server) joinLoop() {
	peers := s.joinPeers()
	if len(peers) == 0 {
		return
	}
	backoff := joinBackoffMin
	for {
		n, err := s.members.Join(peers)
		if n > 0 {
			s.logger.Info("joined gossip pool", "contacted", n, "of", peers)
			return
		}
		s.logger.Info("join gossip pool failed; retrying", "peers", peers, "err", err, "backoff", backoff)
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, joinBackoffMax)
	}
}

// joinPeers returns cfg.Join without this node's own gossip address.
func (s *Server) joinPeers() []string {
	self := s.members.LocalNode()
	var peers []string
	for _, p := range s.cfg.Join {
		if a, err := net.ResolveTCPAddr("tcp", p); err == nil && a.IP.Equal(self.Addr) && a.Port == int(self.Port) {
			continue
		}
		peers = append(peers, p)
	}
	return peers
}

// leaveGossip marks this node leaving, gossips that and tells the other
// coordinators directly (see transport.LeavingNotice), leaves the pool
// gracefully and shuts memberlist down. Called once, from Shutdown.
func (s *Server) leaveGossip() error {
	var errs []error
	s.leaving.Store(true)
	if err := s.members.UpdateNode(gossipLeaveTimeout); err != nil {
		// Peers will report this node dead rather than left; not fatal.
		s.logger.Info("gossip leaving mark not confirmed", "err", err)
	}
	if notice, err := (transport.LeavingNotice{Leaving: s.cfg.ID}).Encode(); err == nil {
		for _, m := range s.Members() {
			if m.Role != transport.RoleCoordinator || m.ID == s.cfg.ID || m.Status != StatusAlive {
				continue
			}
			if err := s.members.SendToAddress(memberlist.Address{Addr: m.GossipAddr, Name: m.ID}, notice); err != nil {
				s.logger.Info("leaving notice not sent", "coordinator", m.ID, "err", err)
			}
		}
	}
	if err := s.members.Leave(gossipLeaveTimeout); err != nil {
		errs = append(errs, fmt.Errorf("leave gossip pool: %w", err))
	}
	if err := s.members.Shutdown(); err != nil {
		errs = append(errs, fmt.Errorf("shutdown gossip: %w", err))
	}
	return errors.Join(errs...)
}

// probeMember pings gossip member id once, directly, the way memberlist's
// failure detector does, and returns the round trip. It blocks for at most
// the gossip probe timeout. A failed probe is only a hint: memberlist's
// indirect probes and suspicion decide whether a member is dead. [C2]
func (s *Server) probeMember(id string) (time.Duration, error) {
	s.memberMu.Lock()
	var addr string
	if rec, ok := s.memberState[id]; ok {
		addr = rec.GossipAddr
	}
	s.memberMu.Unlock()
	if addr == "" {
		return 0, fmt.Errorf("probe %s: not a known gossip member", id)
	}
	udp, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return 0, fmt.Errorf("probe %s: gossip address %q: %w", id, addr, err)
	}
	rtt, err := s.members.Ping(id, udp)
	if err != nil {
		return 0, fmt.Errorf("probe %s at %s: %w", id, addr, err)
	}
	return rtt, nil
}

// refusedTimeout bounds each connection attempt of portsRefused: a refusal
// comes back in one round trip.
const refusedTimeout = time.Second

// refusedRounds and refusedPause: a process being killed closes its
// connections and its listeners one by one, and on a loaded machine the
// exiting process can be descheduled in between, so the session may break
// while its ports still accept for a while; portsRefused looks again, for
// about as long as gossip would take to declare the worker dead, before it
// gives up.
const (
	refusedRounds = 10
	refusedPause  = 100 * time.Millisecond
)

// portsRefused reports whether member id's process is gone while its host
// is up: TCP connections to its gossip port and, for a worker, its data
// port are refused (the host answers with a reset). A stopped process
// (SIGSTOP) still accepts connections, and a lost or cut-off host answers
// nothing: for those it reports false, and gossip decides.
func (s *Server) portsRefused(id string) bool {
	s.memberMu.Lock()
	var addrs []string
	if rec, ok := s.memberState[id]; ok {
		for _, a := range []string{rec.GossipAddr, rec.DataAddr} {
			if a != "" {
				addrs = append(addrs, a)
			}
		}
	}
	s.memberMu.Unlock()
	if len(addrs) == 0 {
		return false
	}
	// last is what the latest round saw of each address, for the log when
	// the ports do not all refuse.
	last := make([]string, len(addrs))
	for round := range refusedRounds {
		if round > 0 {
			select {
			case <-time.After(refusedPause):
			case <-s.ctx.Done():
				return false
			}
		}
		refused := 0
		for i, addr := range addrs {
			d := net.Dialer{Timeout: refusedTimeout}
			c, err := d.DialContext(s.ctx, "tcp", addr)
			switch {
			case err == nil:
				c.Close()
				last[i] = addr + " accepted"
			case errors.Is(err, syscall.ECONNREFUSED):
				refused++
				last[i] = addr + " refused"
			case s.ctx.Err() != nil:
				return false
			default:
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					// No answer: the host, not the process, is the
					// question, and gossip answers it.
					s.logger.Info("ports of a member whose session broke do not answer", "member", id, "round", round+1, "err", err)
					return false
				}
				last[i] = fmt.Sprintf("%s: %v", addr, err) // a reset of a closing listener, say: look again
			}
		}
		if refused == len(addrs) {
			return true
		}
	}
	s.logger.Info("ports of a member whose session broke do not all refuse connections", "member", id,
		"rounds", refusedRounds, "last", strings.Join(last, "; "))
	return false
}

// Members returns every gossip member this node knows, including dead and left
// ones, sorted by id. [C1]
func (s *Server) Members() []Member {
	s.memberMu.Lock()
	defer s.memberMu.Unlock()
	out := make([]Member, 0, len(s.memberState))
	for _, r := range s.memberState {
		out = append(out, r.Member)
	}
	slices.SortFunc(out, func(a, b Member) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// aliveWorkers returns the workers memberlist considers alive (alive or
// suspect), sorted by id. memberlist v0.7.0 reports no suspicion to its
// delegates, so suspect members show as alive. [C1]
func (s *Server) aliveWorkers() []Member {
	var out []Member
	for _, m := range s.Members() {
		if m.Role == transport.RoleWorker && (m.Status == StatusAlive || m.Status == StatusSuspect) {
			out = append(out, m)
		}
	}
	return out
}

// observeMember records a member event. leave is true for NotifyLeave, which
// memberlist sends for a member that died or left.
func (s *Server) observeMember(n *memberlist.Node, leave bool) {
	meta, metaErr := transport.DecodeMember(n.Name, n.Meta)

	s.memberMu.Lock()
	rec, ok := s.memberState[n.Name]
	if !ok {
		rec = &memberRecord{}
		s.memberState[n.Name] = rec
	}
	prev := rec.Member
	rec.ID = n.Name
	rec.GossipAddr = n.Address()
	if metaErr == nil {
		rec.Role = meta.Role
		rec.RaftAddr, rec.RPCAddr, rec.HTTPAddr, rec.Voter = meta.RaftAddr, meta.RPCAddr, meta.HTTPAddr, meta.Voter
		rec.DataAddr, rec.Slots = meta.DataAddr, meta.Slots
		rec.FeatureLevel = meta.FeatureLevel
		rec.Problem = ""
		// A leave keeps a mark set by a LeavingNotice that gossip has
		// not yet delivered; a join or update (a comeback) resets it.
		rec.leaving = meta.Leaving || (leave && rec.leaving)
	} else {
		// Nothing of an invalid meta is kept, not even what the member
		// advertised before: it would go on being used.
		rec.Member = Member{ID: n.Name, Role: roleUnknown, GossipAddr: n.Address(), Status: rec.Status, Problem: metaErr.Error()}
	}
	switch {
	case !leave:
		rec.Status = StatusAlive
	case rec.leaving:
		rec.Status = StatusLeft
	default:
		rec.Status = StatusDead
	}
	if !leave {
		rec.goneAt = time.Time{}
	} else if rec.goneAt.IsZero() {
		rec.goneAt = time.Now()
		s.pruneGone(rec.goneAt)
	}
	cur := rec.Member
	s.memberMu.Unlock()

	if metaErr != nil && cur.Problem != prev.Problem {
		// Once per member and problem: memberlist repeats the events.
		field := "meta"
		if me := (*transport.MetaError)(nil); errors.As(metaErr, &me) {
			field = me.Field
		}
		s.logger.Warn("ignoring gossip member with invalid meta: no tasks, no raft membership", "member", n.Name,
			"addr", cur.GossipAddr, "field", field, "err", metaErr)
	}
	if prev.Status != cur.Status {
		s.logger.Info("gossip member "+cur.Status, "member", cur.ID, "role", cur.Role, "addr", cur.GossipAddr, "was", prev.Status)
	} else if prev != cur {
		s.logger.Debug("gossip member updated", "member", cur.ID, "role", cur.Role, "addr", cur.GossipAddr)
	}
	select {
	case s.memberEvents <- struct{}{}:
	default:
	}
	s.memberChanged(cur.ID)
}

// gossipDelegate gives memberlist this node's meta. memberlist calls it from
// its own goroutines; it must not call back into memberlist.
type gossipDelegate struct{ s *Server }

// NodeMeta returns this coordinator's role and addresses.
func (d gossipDelegate) NodeMeta(limit int) []byte {
	s := d.s
	b, err := transport.NodeMeta{
		Role:     transport.RoleCoordinator,
		RaftAddr: s.RaftAddr(),
		RPCAddr:  s.rpcAddr,
		HTTPAddr: s.httpAddr,
		Voter:    s.cfg.Voter,
		Leaving:  s.leaving.Load(),
		// What jobs this coordinator's state keeps whole
		// (coordinatorsSupport).
		FeatureLevel: transport.FeatureLevel,
	}.Encode()
	if err == nil && len(b) > limit {
		err = fmt.Errorf("%d bytes exceed memberlist's limit of %d", len(b), limit)
	}
	if err != nil {
		s.logger.Error("encode gossip meta", "err", err)
		return nil
	}
	return b
}

// NotifyMsg handles the user messages members send: a transport.LeavingNotice
// marks its member leaving, so that its leave shows as "left" even when
// gossip delivers the leave before the member's leaving mark.
func (d gossipDelegate) NotifyMsg(b []byte) {
	n, err := transport.DecodeLeavingNotice(b)
	if err != nil {
		d.s.logger.Debug("ignoring gossip user message", "err", err)
		return
	}
	d.s.memberMu.Lock()
	defer d.s.memberMu.Unlock()
	if rec, ok := d.s.memberState[n.Leaving]; ok {
		rec.leaving = true
	}
}

// GetBroadcasts has no user broadcasts to offer.
func (gossipDelegate) GetBroadcasts(int, int) [][]byte { return nil }

// LocalState has no state to push: the meta says everything.
func (gossipDelegate) LocalState(bool) []byte { return nil }

// MergeRemoteState ignores remote state.
func (gossipDelegate) MergeRemoteState([]byte, bool) {}

// eventDelegate keeps memberState current. memberlist calls it one event at
// a time while holding its node lock: it must neither block nor call
// memberlist.
type eventDelegate struct{ s *Server }

// NotifyJoin records a member that joined, or came back.
func (d eventDelegate) NotifyJoin(n *memberlist.Node) { d.s.observeMember(n, false) }

// NotifyUpdate records a member's new meta.
func (d eventDelegate) NotifyUpdate(n *memberlist.Node) { d.s.observeMember(n, false) }

// NotifyLeave records a member that died or left.
func (d eventDelegate) NotifyLeave(n *memberlist.Node) { d.s.observeMember(n, true) }
