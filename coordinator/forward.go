package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// forwardedHeader marks a request a follower forwarded to the leader, with
// the follower's id. A node that receives a marked request it cannot serve
// answers 503 instead of forwarding again, so requests never loop, even
// while nodes disagree on who leads.
const forwardedHeader = "X-Coordflow-Forwarded-By"

// indexHeader is the Raft index of the command a write applied. A follower
// that forwarded the write waits until it has applied that index before it
// relays the answer: a client then reads its own write from that follower.
const indexHeader = "X-Coordflow-Raft-Index"

// readYourWritesTimeout bounds that wait; past it the answer is relayed
// anyway (the write did commit) and the follower's reads lag behind.
const readYourWritesTimeout = 5 * time.Second

// forwardTransport carries forwarded writes; a write waits for a Raft apply
// (at most defaultApplyTimeout) on the leader, a savepoint for the job's
// checkpoint timeout (bounded by maxSavepointWait).
var forwardTransport = &http.Transport{
	Proxy:               nil,
	MaxIdleConnsPerHost: 4,
	// Below the leader's per-client bound (Config.HTTPMaxConnsPerClient's
	// default): a follower forwarding many writes at once queues them
	// rather than having the leader refuse its connections.
	MaxConnsPerHost:       64,
	IdleConnTimeout:       30 * time.Second,
	TLSHandshakeTimeout:   handshakeTimeout,
	ResponseHeaderTimeout: max(defaultApplyTimeout, maxSavepointWait) + 5*time.Second,
}

// forwardWriteTimeout is the write deadline of a forwarded request's
// answer: the leader's answer may take forwardTransport's
// ResponseHeaderTimeout, and the wait for this node to apply the write
// readYourWritesTimeout more.
var forwardWriteTimeout = forwardTransport.ResponseHeaderTimeout + readYourWritesTimeout + time.Minute

// leaderTransport returns the transport to forward requests to leader id:
// forwardTransport without TLS; with TLS one per leader id, presenting this
// node's certificate and accepting only coordinator id's.
func (s *Server) leaderTransport(id string) http.RoundTripper {
	if s.cfg.TLS == nil {
		return forwardTransport
	}
	s.api.forwardMu.Lock()
	defer s.api.forwardMu.Unlock()
	t, ok := s.api.forward[id]
	if !ok {
		t = forwardTransport.Clone()
		t.TLSClientConfig = s.cfg.TLS.ClientConfig(tlsutil.RoleCoordinator, id)
		s.api.forward[id] = t
	}
	return t
}

// leaderOnly serves h on the leader and forwards the request to the leader
// from any other node. A leader that has not yet applied every entry of
// earlier terms refuses it with 503 and Retry-After, nothing done: the
// handlers decide from the FSM (a savepoint in use, the transactions a
// checkpoint promises, a job's status), and a new leader's FSM can lack a
// completion its predecessor committed.
func (s *Server) leaderOnly(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.isLeader() {
			s.forwardToLeader(w, r)
			return
		}
		if term := s.raft.CurrentTerm(); s.barrierTerm.Load() != term {
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, fmt.Sprintf(
				"coordinator %s is catching up (it has just become the leader, in term %d, and has not yet applied every entry of earlier terms): nothing done; send it again",
				s.cfg.ID, term))
			return
		}
		h(w, r)
	})
}

// noLeaderError explains a write refused for want of a leader: this node's
// Raft state and the quorum an election needs, so that an operator can tell
// an election in progress from a lost majority.
func (s *Server) noLeaderError() string {
	voters := 0
	if f := s.raft.GetConfiguration(); f.Error() == nil {
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage == raft.Voter {
				voters++
			}
		}
	}
	if voters == 0 {
		return fmt.Sprintf("no leader: coordinator %s is not part of a raft cluster yet (not bootstrapped, or not added by a leader)", s.cfg.ID)
	}
	return fmt.Sprintf("no leader: coordinator %s is %s in term %d and knows no raft leader; electing one needs a quorum of %d of the %d voters (coordd raft peers): if they are down, writes stay refused until enough of them are back",
		s.cfg.ID, s.raft.State(), s.raft.CurrentTerm(), voters/2+1, voters)
}

// forwardFailure says how a follower answers a forward that failed: a
// connection to the leader that could not be opened carried no request,
// which is safe to send again (503, as with no leader); any other failure
// may have come after the leader had the request, and applied it (502,
// outcome unknown). A replayable request (replayable) is the exception:
// net/http sends it again on a new connection after a reused one failed,
// so a failed dial may follow a request the leader had.
func forwardFailure(err error, replayable bool) (status int, msg string) {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" && !replayable {
		return http.StatusServiceUnavailable, "no leader reachable, nothing sent: send it again"
	}
	return http.StatusBadGateway, "outcome unknown: read the state before sending it again (a job submission with an Idempotency-Key may be sent again as it is)"
}

// replayable reports whether net/http's transport may send the forward of r
// again on a new connection (Request.isReplayable): without a body, with an
// idempotent method or an idempotency key.
func replayable(r *http.Request) bool {
	if r.ContentLength != 0 {
		return false // the proxy's outgoing body cannot be rewound
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return r.Header.Get(SubmissionKeyHeader) != "" || r.Header.Get("X-Idempotency-Key") != ""
}

// forwardToLeader proxies r to the leader's HTTP API: one hop only. This
// node has authorized r already (guard); the Authorization header goes along,
// and with TLS the leader sees this node's coordinator certificate, which it
// takes as operator: it trusts the follower's check.
func (s *Server) forwardToLeader(w http.ResponseWriter, r *http.Request) {
	if by := r.Header.Get(forwardedHeader); by != "" {
		writeError(w, http.StatusServiceUnavailable,
			fmt.Sprintf("no leader: %s forwarded this request here, but %s is not the leader", by, s.cfg.ID))
		return
	}
	id, _, httpAddr := s.leaderInfo()
	if id == "" {
		writeError(w, http.StatusServiceUnavailable, s.noLeaderError())
		return
	}
	if httpAddr == "" {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("no leader: the http address of leader %s is not known yet", id))
		return
	}
	target := &url.URL{Scheme: s.apiScheme(), Host: httpAddr}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Header.Set(forwardedHeader, s.cfg.ID)
			// Checked here (guard's crossOrigin): the leader is another
			// host, and a page of this one's origin is not another's.
			pr.Out.Header.Del("Origin")
			pr.Out.Header.Del("Sec-Fetch-Site")
		},
		Transport: s.leaderTransport(id),
		ModifyResponse: func(resp *http.Response) error {
			index, err := strconv.ParseUint(resp.Header.Get(indexHeader), 10, 64)
			if err != nil {
				return nil // no write committed
			}
			ctx, cancel := context.WithTimeout(resp.Request.Context(), readYourWritesTimeout)
			defer cancel()
			if err := s.waitApplied(ctx, index); err != nil {
				s.logger.Warn("forwarded write committed, but this node lags behind", "err", err)
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.logger.Warn("forward to leader failed", "leader", id, "leader_http_addr", httpAddr, "method", r.Method, "path", r.URL.Path, "err", err)
			status, msg := forwardFailure(err, replayable(r))
			writeError(w, status, fmt.Sprintf("%s: forward to leader %s at %s: %v", msg, id, httpAddr, err))
		},
	}
	s.logger.Debug("forwarding write to leader", "leader", id, "method", r.Method, "path", r.URL.Path)
	extendWrite(w, forwardWriteTimeout)
	proxy.ServeHTTP(w, r)
}
