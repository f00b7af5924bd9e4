package coordinator

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// Every API request passes guard before its handler: deadlines and a body
// cap, authentication and the role the endpoint needs (acl.go), and for
// reads of the FSM the stale-read rule.

// Bounds of one HTTP request.
const (
	// headerTimeout bounds reading a request's headers (and the TLS
	// handshake before them).
	headerTimeout = 5 * time.Second
	// bodyTimeout bounds reading a request's body: a client that announces
	// a body and never sends it holds its connection this long at most.
	bodyTimeout = 5 * time.Second
	// maxHeaderBytes bounds a request's headers.
	maxHeaderBytes = 64 << 10
	// maxSmallBody bounds the body of every endpoint but POST /v1/jobs
	// (maxSpecBytes): none of them reads one.
	maxSmallBody = 64 << 10
	// defaultWriteTimeout bounds writing an answer: a client that stops
	// reading loses its connection. Endpoints that wait longer before they
	// answer, or stream, extend it (routeOpts.writeFor, extendWrite).
	defaultWriteTimeout = time.Minute
	// stateWriteTimeout is the write deadline of GET /v1/jobs/{id}/state,
	// which reads every state file of a checkpoint before it answers.
	stateWriteTimeout = 5 * time.Minute
	// debugWriteTimeout is the write deadline of /debug/pprof/ (a CPU
	// profile or a trace runs for ?seconds= before it answers).
	debugWriteTimeout = 10 * time.Minute
	// maxStateReads bounds the full-state reads (GET .../state without
	// ?key, and .../state/export) running at once on one coordinator; more
	// are answered 429 with Retry-After.
	maxStateReads = 2
	// stateReadRetryAfter is the Retry-After of that 429, in seconds.
	stateReadRetryAfter = 2
)

// Headers of every read answer, as Consul's X-Consul-LastContact and
// X-Consul-KnownLeader: how stale this node's FSM may be.
const (
	// lastContactHeader is the milliseconds since this node last heard
	// from the Raft leader: 0 on the leader, -1 when it never has.
	lastContactHeader = "X-Coordflow-Last-Contact"
	// knownLeaderHeader is "true" when this node knows a Raft leader.
	knownLeaderHeader = "X-Coordflow-Known-Leader"
)

// httpAPI is what the HTTP API keeps beside the Server.
type httpAPI struct {
	// acl is the parsed -acl-tokens-file; nil without one.
	acl atomic.Pointer[aclTokens]
	// logs watches writes to the Raft log (nil in handler tests without
	// Raft).
	logs *logStoreHealth
	// digest caches GET /v1/fsm/digest per applied index.
	digest digestCache
	// stateReads admits maxStateReads full-state reads at a time.
	stateReads chan struct{}
	// forward holds the transports that forward writes to a leader over
	// TLS, by leader id (forward.go).
	forwardMu sync.Mutex
	forward   map[string]*http.Transport
	// savepoints tracks the savepoint writes in flight on this leader
	// (http_savepoint.go).
	savepoints savepointUses
	// coordinators and lag cache the dashboard's views that ask other
	// processes; lagLookups admits maxLagLookups lag lookups at a time
	// (http_dashboard.go).
	coordinators viewCache[[]apiCoordinator]
	lag          viewCache[apiLag]
	lagLookups   chan struct{}
	// conns bounds the connections per client address.
	conns connLimiter
}

func newHTTPAPI() *httpAPI {
	return &httpAPI{
		stateReads: make(chan struct{}, maxStateReads),
		forward:    make(map[string]*http.Transport),
		lagLookups: make(chan struct{}, maxLagLookups),
	}
}

// crossOrigin refuses writes a browser sends from a page of another origin
// (cross-site request forgery); requests of other clients, which send no
// Origin or Sec-Fetch-Site, and reads pass.
var crossOrigin = http.NewCrossOriginProtection()

// checkRebinding refuses a request to an open API (no tokens, no TLS) that
// came over loopback naming a host other than a loopback one: a page of
// another site, whose name its DNS then points at 127.0.0.1 (DNS
// rebinding), is the API's own origin to the browser, so neither
// crossOrigin nor the browser's same-origin rule keep it from reading the
// jobs' state or submitting jobs from the machine of whoever opened the
// page. Clients on the machine name it by an IP address, localhost, or its
// host name (or send no Host: HTTP/1.0 health checks; browsers always send
// one). An API with tokens or TLS needs what the page lacks. An open API
// reached over the network is open to whoever reaches it, a page rebound to
// its address too: that takes tokens (docs/security.md).
func (s *Server) checkRebinding(r *http.Request) error {
	if !s.openAPI() {
		return nil
	}
	local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		return nil // no connection: a handler test
	}
	if ap, err := netip.ParseAddrPort(local.String()); err != nil || !ap.Addr().Unmap().IsLoopback() {
		return nil
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if _, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil || host == "" {
		return nil
	}
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return nil
	}
	// Debian and others map the machine's name to 127.0.1.1.
	if name, err := os.Hostname(); err == nil && name != "" && host == strings.ToLower(name) {
		return nil
	}
	s.logger.Warn("refused a request over loopback naming another host (DNS rebinding?)", "host", r.Host, "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
	return fmt.Errorf("host %q: refused on an API without tokens or TLS reached over loopback, as a page of another site would reach it by DNS rebinding; name it by 127.0.0.1, localhost or this machine's host name, or give it API tokens (-acl-tokens-file) or TLS", r.Host)
}

// routeOpts are an endpoint's bounds and rules.
type routeOpts struct {
	// maxBody caps the request body (0: maxSmallBody).
	maxBody int64
	// fsmRead marks a read of the FSM: the stale-read rule applies.
	fsmRead bool
	// writeFor is the write deadline (0: defaultWriteTimeout).
	writeFor time.Duration
	// write marks a write: it takes only the query parameters in params,
	// and a parameter given empty is refused. A misspelled or empty one
	// would otherwise be ignored, and the write done without what it asked
	// for: a cancel without the savepoint, a job started afresh instead of
	// from a savepoint.
	write  bool
	params []string
}

// handle registers h for pattern behind guard.
func (s *Server) handle(mux *http.ServeMux, pattern string, need apiRole, o routeOpts, h http.Handler) {
	mux.Handle(pattern, s.guard(need, o, h))
}

// guard runs the checks every request passes before h; see the comment at
// the top of this file.
func (s *Server) guard(need apiRole, o routeOpts, h http.Handler) http.Handler {
	limit := cmp.Or(o.maxBody, maxSmallBody)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Answers carry what producers wrote (keys and values of the
		// state API, job names): a browser must read them as the type
		// they declare, never guess markup in them.
		w.Header().Set("X-Content-Type-Options", "nosniff")
		rc := http.NewResponseController(w)
		// Errors are ignored: only a ResponseWriter without a connection
		// (handler tests) cannot set deadlines.
		_ = rc.SetWriteDeadline(time.Now().Add(cmp.Or(o.writeFor, defaultWriteTimeout)))
		if r.Body != nil && r.Body != http.NoBody {
			// Without a read deadline a request whose body never comes
			// holds the connection for ever: net/http's ReadTimeout
			// would do, but it also cancels the request's context of a
			// handler that runs past it (a savepoint, a forwarded
			// write), so the deadline covers the body only.
			_ = rc.SetReadDeadline(time.Now().Add(bodyTimeout))
			r.Body = &deadlineBody{ReadCloser: http.MaxBytesReader(w, r.Body, limit), rc: rc}
		}
		if err := s.checkRebinding(r); err != nil {
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
		if err := crossOrigin.Check(r); err != nil {
			// A page of another site in the browser of someone who can
			// reach the API (open, or with a client certificate the
			// browser presents) must not write through it.
			writeError(w, http.StatusForbidden, fmt.Sprintf("%s %s from a page of another origin (%s): refused; the API takes writes from clients and its own dashboard",
				r.Method, r.URL.Path, cmp.Or(r.Header.Get("Origin"), r.Header.Get("Sec-Fetch-Site"))))
			return
		}
		p, aerr := s.authorize(r, need)
		if aerr != nil {
			s.refuse(w, r, p, aerr)
			return
		}
		if r.ContentLength > limit {
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body of %d bytes: %s %s takes at most %d", r.ContentLength, r.Method, r.URL.Path, limit))
			return
		}
		if o.write {
			// Parsed strictly: r.URL.Query drops what it cannot parse (a
			// bad escape, a ';'), and the write would go on without it.
			q, err := url.ParseQuery(r.URL.RawQuery)
			if err == nil {
				err = checkParams(q, o.params)
			}
			if err != nil {
				writeError(w, http.StatusBadRequest, fmt.Sprintf("%s %s: %v", r.Method, r.URL.Path, err))
				return
			}
		}
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			c := s.contact()
			c.setHeaders(w)
			if o.fsmRead && !s.readAllowed(w, r, c) {
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// with returns o, a write's options, taking the query parameters params.
func (o routeOpts) with(params ...string) routeOpts {
	o.params = params
	return o
}

// checkParams refuses query parameters not in params, and any given empty
// or more than once.
func checkParams(q url.Values, params []string) error {
	for _, name := range slices.Sorted(maps.Keys(q)) {
		switch {
		case !slices.Contains(params, name) && len(params) == 0:
			return fmt.Errorf("query parameter %s=%q: unknown; this endpoint takes none", name, q.Get(name))
		case !slices.Contains(params, name):
			return fmt.Errorf("query parameter %s=%q: unknown; this endpoint takes %s", name, q.Get(name), strings.Join(params, ", "))
		case len(q[name]) != 1:
			return fmt.Errorf("query parameter %s= given %d times", name, len(q[name]))
		case q.Get(name) == "":
			return fmt.Errorf("query parameter %s=%q: empty", name, q.Get(name))
		}
	}
	return nil
}

// deadlineBody is a request body read under bodyTimeout; the deadline is
// lifted at its end, so that it cannot cancel the handler's context (net/http
// reads on in the background once the body is consumed).
type deadlineBody struct {
	io.ReadCloser
	rc *http.ResponseController
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if errors.Is(err, io.EOF) {
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// isTimeout reports whether err is a read deadline passing: the client did
// not send its body in time.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// extendWrite moves w's write deadline to d from now: for answers that are
// written long after the request (a savepoint) or streamed.
func extendWrite(w http.ResponseWriter, d time.Duration) {
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
}

// readAllowed reports whether a read of this node's FSM may be answered,
// having written the refusal if not: 400 for a malformed ?stale, 503 with
// the reason if this node may be stale and the request does not accept it.
func (s *Server) readAllowed(w http.ResponseWriter, r *http.Request, c contactInfo) bool {
	stale, err := staleAllowed(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return false
	}
	if stale {
		return true
	}
	if reason := s.staleReason(c); reason != "" {
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, reason+": read another coordinator, or add ?stale=true to read this one anyway")
		return false
	}
	return true
}

// staleAllowed reports whether the request asks for a read whatever this
// node's staleness: ?stale (Consul's convention) or ?stale=true. Any value
// queryBool refuses is an error, not a quiet "no".
func staleAllowed(r *http.Request) (bool, error) {
	q := r.URL.Query()
	if q.Has("stale") && q.Get("stale") == "" {
		return true, nil
	}
	return queryBool(q, "stale")
}

// contactInfo is how current this node's FSM is.
type contactInfo struct {
	leader      bool
	knownLeader bool
	// lastContact is the time since this node last heard from the leader:
	// 0 on the leader, -1 if never.
	lastContact time.Duration
	// applyProblem says why this node cannot apply the log, if it cannot.
	applyProblem string
	// catchingUp says how far a follower that has heard from the leader
	// since it started is from having applied what the leader committed:
	// a restarted node replays the log after its first contact.
	catchingUp string
	// applyBehind is how long an entry this node knows committed has
	// waited to be applied (0: none waits): a follower in contact with the
	// leader whose FSM falls behind (a slow disk or CPU).
	applyBehind time.Duration
}

// contact reads this node's contactInfo from Raft.
func (s *Server) contact() contactInfo {
	c := contactInfo{applyProblem: s.applyProblem()}
	if s.raft == nil {
		// Handler tests on a bare FSM: serve it as it is.
		c.leader, c.knownLeader = true, true
		return c
	}
	_, id := s.raft.LeaderWithID()
	c.knownLeader = id != ""
	c.leader = s.raft.State() == raft.Leader
	switch last := s.raft.LastContact(); {
	case c.leader:
	case last.IsZero():
		c.lastContact = -1
	default:
		c.lastContact = time.Since(last)
	}
	switch {
	case c.leader && s.barrierTerm.Load() != s.raft.CurrentTerm():
		c.catchingUp = "it has just become the leader and has not yet applied every entry of earlier terms"
	case !c.leader && !s.caughtUp.Load():
		c.catchingUp = "it has not yet applied what the leader had when it asked"
	}
	if since := s.applyBehindSince.Load(); since != 0 {
		c.applyBehind = time.Since(time.Unix(0, since))
	}
	return c
}

// applyPoll is how often watchApply compares the commit and applied indexes.
const applyPoll = 100 * time.Millisecond

// watchApply keeps applyBehindSince: a follower hears from the leader (its
// last contact stays fresh) even while its FSM falls behind the entries it
// has committed, and its reads must say so. It runs until the server stops.
func (s *Server) watchApply() {
	tick := time.NewTicker(applyPoll)
	defer tick.Stop()
	var lag applyLag
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-tick.C:
			since := lag.observe(s.raft.CommitIndex(), s.raft.AppliedIndex(), now)
			var ns int64
			if !since.IsZero() {
				ns = since.UnixNano()
			}
			s.applyBehindSince.Store(ns)
		}
	}
}

// applyLag follows one committed entry at a time: the commit index seen
// while the applied index was below it, and when. Once applied reaches it,
// the next look starts over, so under a steady load the time it reports
// stays the apply latency, not the age of the load.
type applyLag struct {
	target uint64
	since  time.Time
}

// observe records a look at the indexes at now and returns since when an
// entry committed then has waited to be applied (zero: none waits).
func (a *applyLag) observe(commit, applied uint64, now time.Time) time.Time {
	if a.target != 0 && applied >= a.target {
		a.target, a.since = 0, time.Time{}
	}
	if a.target == 0 && applied < commit {
		a.target, a.since = commit, now
	}
	return a.since
}

// catchUpPoll is how often a starting node looks at the leader's applied
// index and its own until it has caught up once.
const catchUpPoll = 50 * time.Millisecond

// watchCatchUp marks this node caught up once its FSM reflects what the
// leader had applied when this node first asked it, after its start: until
// then its FSM may be the old state its own log replays, older than any
// last contact says (a follower's commit index is bounded by its own log,
// so it cannot tell from Raft alone). A node that leads is caught up. It
// runs from NewServer until it is done or the server stops.
func (s *Server) watchCatchUp() {
	tick := time.NewTicker(catchUpPoll)
	defer tick.Stop()
	var target uint64 // the leader's applied index; 0 until known
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-tick.C:
		}
		if s.isLeader() {
			s.caughtUp.Store(true)
			return
		}
		if target == 0 {
			id, _, httpAddr := s.leaderInfo()
			if httpAddr == "" {
				continue
			}
			st, err := fetchStatus(s.ctx, s.peerClient(id, peerStatusTimeout), s.apiScheme()+"://"+httpAddr)
			if err != nil || st.AppliedIndex == 0 {
				continue
			}
			target = st.AppliedIndex
		}
		if s.fsmReflects(target) {
			s.logger.Info("caught up with the leader since the start; serving reads", "index", target)
			s.caughtUp.Store(true)
			return
		}
	}
}

// lastContactMS is lastContact in milliseconds, -1 for never.
func (c contactInfo) lastContactMS() int64 {
	if c.lastContact < 0 {
		return -1
	}
	return c.lastContact.Milliseconds()
}

func (c contactInfo) setHeaders(w http.ResponseWriter) {
	w.Header().Set(lastContactHeader, strconv.FormatInt(c.lastContactMS(), 10))
	w.Header().Set(knownLeaderHeader, strconv.FormatBool(c.knownLeader))
}

// staleReason says why this node must not answer a read of its FSM without
// ?stale=true, or "" if it may: it cannot apply the log, or it has not heard
// from a leader for longer than Config.MaxStale. A node that lost its leader
// a moment ago (an election) still answers: its state is at most MaxStale
// old.
func (s *Server) staleReason(c contactInfo) string {
	switch {
	case c.applyProblem != "":
		return fmt.Sprintf("coordinator %s cannot apply the raft log (%s), so its state may be stale", s.cfg.ID, c.applyProblem)
	case c.catchingUp != "":
		return fmt.Sprintf("coordinator %s is catching up (%s), so its state may be stale", s.cfg.ID, c.catchingUp)
	case c.applyBehind > s.cfg.MaxStale:
		return fmt.Sprintf("coordinator %s has not applied raft entries committed %v ago (more than -max-stale %v), so its state is behind",
			s.cfg.ID, c.applyBehind.Round(time.Millisecond), s.cfg.MaxStale)
	case c.leader:
		return "" // it has heard from itself
	case c.lastContact < 0:
		return fmt.Sprintf("coordinator %s has not heard from a raft leader since it started, so its state may be stale", s.cfg.ID)
	case c.lastContact > s.cfg.MaxStale:
		return fmt.Sprintf("coordinator %s last heard from the raft leader %v ago (more than -max-stale %v), so its state may be stale",
			s.cfg.ID, c.lastContact.Round(time.Millisecond), s.cfg.MaxStale)
	}
	return ""
}

// applyProblem says why this node cannot apply the Raft log, or "": the
// last write to its Raft log failed (a full disk), or it has rejected
// entries of command types it does not know (a newer coordd leads).
func (s *Server) applyProblem() string {
	if s.api != nil {
		if at, err := s.api.logs.lastError(); err != nil {
			return fmt.Sprintf("writing its raft log failed %v ago: %v", time.Since(at).Round(time.Millisecond), err)
		}
	}
	if n := s.fsm.UnknownCommands(); n > 0 {
		return fmt.Sprintf("it rejected %d raft log entries of command types it does not know: a newer coordd leads, upgrade this one", n)
	}
	return ""
}

// logStoreHealth is the Raft log store as Raft sees it: the bolt store,
// plus the error of the last write if it failed. Raft only logs a follower's
// failed append and goes on answering heartbeats, so without this a
// follower whose disk is full would look current while it falls behind.
// It also times every write: an append holds up every commit behind it, and
// a compaction after a snapshot holds the store's only write transaction.
// (It forwards only raft.LogStore: the bolt store implements none of Raft's
// optional log store interfaces.)
type logStoreHealth struct {
	raft.LogStore
	appendDuration, deleteDuration prometheus.Observer
	// logger, if not nil, is told of appends slower than slowAfter, at
	// most once per slowAppendLogEvery. now is the clock appends are timed
	// and warnings spaced with (nil: time.Now).
	logger    *slog.Logger
	slowAfter time.Duration
	now       func() time.Time

	mu  sync.Mutex
	err error // of the last write; nil once one succeeds
	at  time.Time
	// slow counts the appends over slowAfter not yet reported; slowest is
	// the longest of them, of slowestEntries entries. slowLogged is when
	// they were last reported.
	slow           int
	slowest        time.Duration
	slowestEntries int
	slowLogged     time.Time
}

// slowAppend is how long a Raft log append may take before coordd warns:
// hashicorp/raft writes the leader's log from its main loop, so every
// commit of every job waits for a stalled append, and a checkpoint that
// waits a quarter of a second for its trigger or completion is late.
// slowAppendLogEvery keeps a disk that stalls all the time from filling
// the log.
const (
	slowAppend         = 250 * time.Millisecond
	slowAppendLogEvery = time.Minute
)

// newLogStoreHealth wraps store, timing its writes into m and warning in
// logger (may be nil) of slow appends.
func newLogStoreHealth(store raft.LogStore, m *metrics, logger *slog.Logger) *logStoreHealth {
	return &logStoreHealth{
		LogStore:       store,
		appendDuration: m.raftLogStoreDuration.WithLabelValues("append"),
		deleteDuration: m.raftLogStoreDuration.WithLabelValues("delete"),
		logger:         logger,
		slowAfter:      slowAppend,
	}
}

// watchLogStore wraps store into the logStoreHealth the API reports.
func (s *Server) watchLogStore(store raft.LogStore) raft.LogStore {
	l := newLogStoreHealth(store, s.metrics, s.logger.With("component", "raft-log"))
	s.api.logs = l
	return l
}

// clock returns the time of l's clock.
func (l *logStoreHealth) clock() time.Time {
	if l.now != nil {
		return l.now()
	}
	return time.Now()
}

// timeAppend observes an append of entries log entries that began at start,
// counts it if it was slow, and reports the slow ones not yet reported once
// slowAppendLogEvery has passed since the last report: at the next append,
// fast or slow, so that a burst is reported even if the disk then recovers.
func (l *logStoreHealth) timeAppend(start time.Time, entries int) {
	now := l.clock()
	took := now.Sub(start)
	l.appendDuration.Observe(took.Seconds())
	if l.logger == nil {
		return
	}
	l.mu.Lock()
	if took >= l.slowAfter {
		l.slow++
		if took > l.slowest {
			l.slowest, l.slowestEntries = took, entries
		}
	}
	if l.slow == 0 || !l.slowLogged.IsZero() && now.Sub(l.slowLogged) < slowAppendLogEvery {
		l.mu.Unlock()
		return
	}
	attrs := []any{"slow_appends", l.slow, "slowest", l.slowest.Round(time.Millisecond), "slowest_entries", l.slowestEntries, "threshold", l.slowAfter}
	if !l.slowLogged.IsZero() {
		attrs = append(attrs, "since", l.slowLogged.UTC().Format(time.RFC3339))
	}
	l.slow, l.slowest, l.slowestEntries, l.slowLogged = 0, 0, 0, now
	l.mu.Unlock()
	l.logger.Warn("raft log appends are slow: the disk of -data-dir stalls; on the leader every commit waits for it", attrs...)
}

func (l *logStoreHealth) record(err error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil && l.err == nil {
		l.at = time.Now()
	}
	l.err = err
	return err
}

// lastError returns the error of the last write, nil if it succeeded, and
// since when writes fail.
func (l *logStoreHealth) lastError() (since time.Time, err error) {
	if l == nil {
		return time.Time{}, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.at, l.err
}

func (l *logStoreHealth) StoreLog(log *raft.Log) error {
	defer l.timeAppend(l.clock(), 1)
	return l.record(l.LogStore.StoreLog(log))
}

func (l *logStoreHealth) StoreLogs(logs []*raft.Log) error {
	defer l.timeAppend(l.clock(), len(logs))
	return l.record(l.LogStore.StoreLogs(logs))
}

func (l *logStoreHealth) DeleteRange(lo, hi uint64) error {
	defer prometheus.NewTimer(l.deleteDuration).ObserveDuration()
	return l.record(l.LogStore.DeleteRange(lo, hi))
}

// digestCache computes the FSM digest at most once per applied index, and
// never twice at once: concurrent callers wait for the one computation
// running (encoding the whole state costs memory and CPU, so a burst of
// digest calls must not multiply it).
type digestCache struct {
	mu       sync.Mutex
	valid    bool
	index    uint64
	digest   string
	inflight *digestCall
	// compute is the computation, fsm.Digest unless a test sets it.
	compute func() (string, error)
	// computed counts computations, for tests.
	computed atomic.Uint64
}

type digestCall struct {
	done   chan struct{}
	digest string
	index  uint64
	err    error
}

// appliedIndex is the index of the last entry this node's FSM applied (0 in
// handler tests without Raft).
func (s *Server) appliedIndex() uint64 {
	if s.applied == nil {
		return 0
	}
	return s.applied.applied.Load()
}

// digest returns the FSM digest and the applied index it was taken at.
func (s *Server) digest(ctx context.Context) (string, uint64, error) {
	c := &s.api.digest
	c.mu.Lock()
	index := s.appliedIndex()
	if c.valid && c.index == index && s.applied != nil {
		d := c.digest
		c.mu.Unlock()
		return d, index, nil
	}
	call := c.inflight
	if call == nil {
		call = &digestCall{done: make(chan struct{})}
		c.inflight = call
		c.mu.Unlock()
		compute := s.fsm.Digest
		if c.compute != nil {
			compute = c.compute
		}
		call.digest, call.err = compute()
		c.computed.Add(1)
		after := s.appliedIndex()
		call.index = after
		c.mu.Lock()
		c.inflight = nil
		if call.err == nil && after == index {
			c.valid, c.index, c.digest = true, index, call.digest
		}
		c.mu.Unlock()
		close(call.done)
	} else {
		c.mu.Unlock()
	}
	select {
	case <-call.done:
		return call.digest, call.index, call.err
	case <-ctx.Done():
		return "", 0, ctx.Err()
	}
}

// admitStateRead takes one of the maxStateReads slots for a full-state
// read, or answers 429 and returns false. The caller calls the returned
// release when done.
func (s *Server) admitStateRead(w http.ResponseWriter) (release func(), ok bool) {
	select {
	case s.api.stateReads <- struct{}{}:
		return func() { <-s.api.stateReads }, true
	default:
		w.Header().Set("Retry-After", strconv.Itoa(stateReadRetryAfter))
		writeError(w, http.StatusTooManyRequests, fmt.Sprintf("%d full-state reads are running on coordinator %s; retry later, or read one key with ?key=K", maxStateReads, s.cfg.ID))
		return nil, false
	}
}

// startHTTP loads the API tokens, binds the HTTP listener (over TLS when
// Config.TLS is set) and serves the API.
func (s *Server) startHTTP() error {
	if s.cfg.ACLTokensFile != "" {
		if err := s.ReloadACL(); err != nil {
			return err
		}
	}
	lis, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("listen http %s: %w", s.cfg.HTTPAddr, err)
	}
	s.httpAddr = s.advertised(lis.Addr().String())
	s.warnOpenAPI(lis.Addr().String())
	s.http = s.newHTTPServer()
	if s.cfg.TLS != nil {
		// A client certificate is optional (tokens also authenticate);
		// one that is sent must be a client's or a coordinator's (a
		// follower forwarding a write). HTTP/1.1 only: no HTTP/2 streams
		// to bound.
		tc := s.cfg.TLS.OptionalClientCertConfig(tlsutil.RoleClient, tlsutil.RoleCoordinator)
		tc.NextProtos = []string{"http/1.1"}
		lis = tls.NewListener(lis, tc)
	}
	s.serveWG.Go(func() {
		if err := s.http.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.logger.Error("http server stopped", "err", err)
		}
	})
	return nil
}

// apiScheme is the scheme of every coordinator's HTTP API: all of a
// cluster's coordinators run with TLS or all without.
func (s *Server) apiScheme() string {
	if s.cfg.TLS != nil {
		return "https"
	}
	return "http"
}

// peerClient returns a client for the HTTP API of coordinator id: over TLS,
// presenting this node's certificate and checking that the peer holds
// coordinator id's, when TLS is on.
func (s *Server) peerClient(id string, timeout time.Duration) *http.Client {
	c := &http.Client{Timeout: timeout}
	if s.cfg.TLS != nil {
		// One-off calls (the peers' status before bootstrap): no idle
		// connections to keep.
		c.Transport = &http.Transport{Proxy: nil, DisableKeepAlives: true, TLSClientConfig: s.cfg.TLS.ClientConfig(tlsutil.RoleCoordinator, id)}
	}
	return c
}

// connLimiter bounds the HTTP connections each client IP address holds
// open, through http.Server.ConnState: a connection past the bound is
// answered 429 (over plain HTTP; a TLS one is closed) and closed before its
// first request is read.
type connLimiter struct {
	max    int // 0: no bound
	mu     sync.Mutex
	byIP   map[string]int
	counts map[net.Conn]string // the counted connections, by their client address
}

// tooManyConnsBody is the error a connection past the bound is answered.
const tooManyConnsBody = `{"error": "too many connections from your address; retry later"}`

// tooManyConns is the whole answer to a connection past the bound.
var tooManyConns = fmt.Sprintf("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
	len(tooManyConnsBody), tooManyConnsBody)

// track returns the ConnState hook.
func (l *connLimiter) track(m *metrics) func(net.Conn, http.ConnState) {
	return func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			if l.admit(c) {
				return
			}
			if m != nil {
				m.httpConnsRefused.Inc()
			}
			if _, isTLS := c.(*tls.Conn); !isTLS {
				_ = c.SetWriteDeadline(time.Now().Add(time.Second))
				_, _ = io.WriteString(c, tooManyConns)
			}
			_ = c.Close()
		case http.StateClosed, http.StateHijacked:
			l.release(c)
		}
	}
}

// admit counts c against its client's bound, reporting false (and not
// counting it) when the client is at the bound.
func (l *connLimiter) admit(c net.Conn) bool {
	if l.max <= 0 {
		return true
	}
	ip := c.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(ip); err == nil {
		ip = host
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byIP[ip] >= l.max {
		return false
	}
	if l.byIP == nil {
		l.byIP, l.counts = make(map[string]int), make(map[net.Conn]string)
	}
	l.byIP[ip]++
	l.counts[c] = ip
	return true
}

// release uncounts c, if it was counted.
func (l *connLimiter) release(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ip, ok := l.counts[c]
	if !ok {
		return
	}
	delete(l.counts, c)
	if l.byIP[ip]--; l.byIP[ip] <= 0 {
		delete(l.byIP, ip)
	}
}
