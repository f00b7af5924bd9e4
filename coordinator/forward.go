package coordinator

import (
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

// forwardedHeader marks a request a follower forwarded to the leader, with
// the follower's id. A node that receives a marked request it cannot serve
// answers 503 instead of forwarding again, so requests never loop, even
// while nodes disagree on who leads.
const forwardedHeader = "X-Coordflow-Forwarded-By"

// forwardTransport carries forwarded writes; a write waits for a Raft apply
// (at most defaultApplyTimeout) on the leader.
var forwardTransport = &http.Transport{
	Proxy:                 nil,
	MaxIdleConnsPerHost:   4,
	IdleConnTimeout:       30 * time.Second,
	ResponseHeaderTimeout: defaultApplyTimeout + 5*time.Second,
}

// leaderOnly serves h on the leader and forwards the request to the leader
// from any other node.
func (s *Server) leaderOnly(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.isLeader() {
			h(w, r)
			return
		}
		s.forwardToLeader(w, r)
	})
}

// forwardToLeader proxies r to the leader's HTTP API: one hop only.
func (s *Server) forwardToLeader(w http.ResponseWriter, r *http.Request) {
	if by := r.Header.Get(forwardedHeader); by != "" {
		writeError(w, http.StatusServiceUnavailable,
			fmt.Sprintf("no leader: %s forwarded this request here, but %s is not the leader", by, s.cfg.ID))
		return
	}
	id, _, httpAddr := s.leaderInfo()
	if id == "" {
		writeError(w, http.StatusServiceUnavailable, "no leader")
		return
	}
	if httpAddr == "" {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("no leader: the http address of leader %s is not known yet", id))
		return
	}
	target := &url.URL{Scheme: "http", Host: httpAddr}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
			pr.Out.Header.Set(forwardedHeader, s.cfg.ID)
		},
		Transport: forwardTransport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.logger.Warn("forward to leader failed", "leader", id, "leader_http_addr", httpAddr, "method", r.Method, "path", r.URL.Path, "err", err)
			writeError(w, http.StatusBadGateway, fmt.Sprintf("forward to leader %s at %s: %v", id, httpAddr, err))
		},
	}
	s.logger.Debug("forwarding write to leader", "leader", id, "method", r.Method, "path", r.URL.Path)
	proxy.ServeHTTP(w, r)
}
