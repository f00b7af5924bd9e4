package coordinator

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// Raft membership never follows gossip alone. Gossip says who claims to be a
// coordinator and where; anyone who reaches the gossip port can claim that
// (without -encrypt), and a coordinator in the Raft configuration receives
// the whole log and counts toward the quorum. So:
//
//   - with TLS, the leader adds a coordinator seen in gossip (or moves it to
//     a new address, or promotes it) only after a TLS handshake with its
//     advertised Raft address has shown a coordinator certificate of the
//     cluster's CA for exactly that id (authenticateCoordinator); bootstrap
//     counts only the coordinators authenticated the same way;
//   - without TLS, the leader never changes the configuration from gossip:
//     an operator adds a coordinator with `coordd raft add-peer` (POST
//     /v1/raft/peers, handleAddPeer), and the leader logs, once per
//     coordinator, that one waits. Bootstrap still counts the coordinators
//     gossip shows: the first formation trusts the network.
//
// Nothing ever removes a server because of gossip: a member that dies or
// leaves keeps its seat until an operator removes it (DELETE
// /v1/raft/peers/{id}), so no gossip message can shrink the configuration.

const (
	// peerAuthTimeout bounds one authentication of a coordinator: the TCP
	// connection and the TLS handshake with its Raft address.
	peerAuthTimeout = 3 * time.Second
	// peerAuthRetry is how long a failed authentication of one id at one
	// address is remembered before it is tried again: member events come
	// often, and each attempt costs the target a handshake.
	peerAuthRetry = 5 * time.Second
	// maxAddPeerBody bounds the body of POST /v1/raft/peers.
	maxAddPeerBody = 4 << 10
	// maxPeerMemory bounds what peerAuth and raftReconciler remember per
	// member: gossip names are anyone's to make up without -encrypt. Past
	// it the memory is cleared, which costs only repeated log lines.
	maxPeerMemory = 1024
)

// authenticateCoordinator proves that whoever listens on addr holds a
// coordinator certificate for id signed by the CA of tc: a TLS handshake with
// tc.ClientConfig(RoleCoordinator, id), then a clean close. The peer's Raft
// transport reads the close as the end of an idle connection. It blocks for
// at most peerAuthTimeout, or until ctx ends.
func authenticateCoordinator(ctx context.Context, tc *tlsutil.Config, id, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, peerAuthTimeout)
	defer cancel()
	d := &tls.Dialer{NetDialer: &net.Dialer{}, Config: tc.ClientConfig(tlsutil.RoleCoordinator, id)}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("authenticate coordinator %s at %s: %w", id, addr, err)
	}
	return c.Close()
}

// peerAuth remembers the authentications of one leadership term's
// reconciliation or of one bootstrap, so that a coordinator is not dialled on
// every member event. It is used by one goroutine at a time.
type peerAuth struct {
	s *Server
	// authenticated holds id@addr that passed; failed, when one last failed.
	authenticated map[string]bool
	failed        map[string]time.Time
	// warned holds id@addr whose failure was logged at warn level.
	warned map[string]bool
}

func newPeerAuth(s *Server) *peerAuth {
	return &peerAuth{s: s, authenticated: make(map[string]bool), failed: make(map[string]time.Time), warned: make(map[string]bool)}
}

// check authenticates coordinator id at addr (authenticateCoordinator),
// answering from memory when it passed before or failed less than
// peerAuthRetry ago. The first failure of each id and address is logged as a
// warning, later ones at debug level. Needs cfg.TLS.
func (p *peerAuth) check(ctx context.Context, id, addr string) error {
	key := id + "@" + addr
	if p.authenticated[key] {
		return nil
	}
	if at, ok := p.failed[key]; ok && time.Since(at) < peerAuthRetry {
		return fmt.Errorf("coordinator %s at %s failed authentication %v ago", id, addr, time.Since(at).Round(time.Millisecond))
	}
	err := authenticateCoordinator(ctx, p.s.cfg.TLS, id, addr)
	if err == nil {
		delete(p.failed, key)
		p.authenticated[key] = true
		p.s.logger.Info("authenticated coordinator by its certificate", "member", id, "raft_addr", addr)
		return nil
	}
	if ctx.Err() != nil {
		return err
	}
	if len(p.failed) >= maxPeerMemory {
		clear(p.failed)
		clear(p.warned)
	}
	p.failed[key] = time.Now()
	if !p.warned[key] {
		p.warned[key] = true
		p.s.logger.Warn("coordinator in gossip failed authentication: it does not count for bootstrap and is not added to raft", "member", id, "raft_addr", addr, "err", err)
	} else {
		p.s.logger.Debug("coordinator in gossip failed authentication again", "member", id, "raft_addr", addr, "err", err)
	}
	return err
}

// raftReconciler is the state of the leader's Raft membership reconciliation
// for one term of leadership.
type raftReconciler struct {
	s    *Server
	auth *peerAuth
	// told is, per coordinator id, the change last logged as waiting for
	// an operator (without TLS), so that each is logged once.
	told map[string]string
}

func newRaftReconciler(s *Server) *raftReconciler {
	return &raftReconciler{s: s, auth: newPeerAuth(s), told: make(map[string]string)}
}

// once compares every alive coordinator in gossip with the Raft
// configuration. One missing, at another address, or a nonvoter that asks to
// vote needs a change: with TLS it is made once the coordinator has been
// authenticated (as a voter or nonvoter, as its meta asks); without TLS it is
// logged for the operator. It never removes or demotes a server.
func (r *raftReconciler) once(ctx context.Context) error {
	s := r.s
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("get raft configuration: %w", err)
	}
	index := f.Index()
	current := make(map[raft.ServerID]raft.Server)
	for _, srv := range f.Configuration().Servers {
		current[srv.ID] = srv
	}
	for _, m := range s.Members() {
		if ctx.Err() != nil {
			return nil
		}
		if m.Role != transport.RoleCoordinator || m.Status != StatusAlive || m.RaftAddr == "" || m.ID == s.cfg.ID {
			continue
		}
		id, addr := raft.ServerID(m.ID), raft.ServerAddress(m.RaftAddr)
		srv, known := current[id]
		var change string
		switch {
		case !known:
			change = "add"
		case srv.Address != addr:
			change = "address"
		case m.Voter && srv.Suffrage != raft.Voter:
			change = "promote"
		default:
			delete(r.told, m.ID)
			continue
		}
		if s.cfg.TLS == nil {
			r.tellOperator(m, change, srv)
			continue
		}
		if err := r.auth.check(ctx, m.ID, m.RaftAddr); err != nil {
			continue // logged by check; tried again after peerAuthRetry
		}
		// A coordinator at a new address may be a new install of an
		// older build: only a promotion keeps the node that is already
		// replicating the log.
		fut, refused := s.admitPeer(m, change != "promote", true, func() raft.IndexFuture {
			if m.Voter {
				return s.raft.AddVoter(id, addr, index, membershipChangeTimeout)
			}
			return s.raft.AddNonvoter(id, addr, index, membershipChangeTimeout)
		})
		if refused != nil {
			r.refuse(m, refused)
			continue
		}
		if err := fut.Error(); err != nil {
			return fmt.Errorf("add coordinator %s (%s, voter %t) to raft configuration: %w", m.ID, m.RaftAddr, m.Voter, err)
		}
		index = fut.Index()
		s.logger.Info("added authenticated coordinator to raft configuration", "member", m.ID, "raft_addr", m.RaftAddr,
			"voter", m.Voter, "change", change, "index", index)
	}
	return nil
}

// tellOperator logs, once per coordinator and change, that a coordinator in
// gossip waits for `coordd raft add-peer`: without TLS the leader cannot
// tell a real coordinator from anyone who joined the gossip pool.
func (r *raftReconciler) tellOperator(m Member, change string, srv raft.Server) {
	if r.told[m.ID] == change+"@"+m.RaftAddr {
		return
	}
	if len(r.told) >= maxPeerMemory {
		clear(r.told)
	}
	r.told[m.ID] = change + "@" + m.RaftAddr
	cmd := "coordd raft add-peer -id " + m.ID + " -raft-addr " + m.RaftAddr
	if !m.Voter {
		cmd += " -non-voter"
	}
	var msg string
	switch change {
	case "add":
		msg = "coordinator in gossip is not in the raft configuration; without TLS the leader adds none from gossip: if it is yours, run " + cmd
	case "address":
		msg = "coordinator in gossip advertises another raft address than the raft configuration holds; without TLS the leader changes none from gossip: if it moved, run " + cmd
	default:
		msg = "coordinator in gossip asks to vote but is a nonvoter; without TLS the leader promotes none from gossip: to promote it, run " + cmd
	}
	r.s.logger.Warn(msg, "member", m.ID, "raft_addr", m.RaftAddr, "voter", m.Voter, "configured_addr", string(srv.Address))
}

// refuse logs, once per coordinator, address and feature level, that the
// leader does not add an authenticated coordinator for err.
func (r *raftReconciler) refuse(m Member, err error) {
	key := fmt.Sprintf("refused@%s@%d", m.RaftAddr, m.FeatureLevel)
	if r.told[m.ID] == key {
		return
	}
	if len(r.told) >= maxPeerMemory {
		clear(r.told)
	}
	r.told[m.ID] = key
	r.s.logger.Warn("not adding an authenticated coordinator to the raft configuration", "member", m.ID, "raft_addr", m.RaftAddr, "err", err)
}

// apiAddPeer is the body of POST /v1/raft/peers.
type apiAddPeer struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	// Voter defaults to true.
	Voter *bool `json:"voter,omitempty"`
}

// apiAddedPeer is the answer of POST /v1/raft/peers.
type apiAddedPeer struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	Voter   bool   `json:"voter"`
	// Changed is false when the configuration held the peer already, as asked.
	Changed bool `json:"changed"`
}

// handleAddPeer adds a coordinator to the Raft configuration, or changes its
// address, or promotes a nonvoter: the operator's way to grow the cluster
// (coordd raft add-peer), and without TLS the only way. The coordinator must
// be up: with TLS it must show a coordinator certificate for the id at the
// address, without TLS the address must accept a connection, so that a typo
// never adds a voter nobody runs (which would weaken the quorum). It does not
// demote a voter. Leader only (leaderOnly forwards it).
func (s *Server) handleAddPeer(w http.ResponseWriter, r *http.Request) {
	req, err := decodeAddPeer(w, r)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("add peer: body exceeds %d bytes", tooBig.Limit))
			return
		}
		writeError(w, http.StatusBadRequest, "add peer: "+err.Error())
		return
	}
	voter := req.Voter == nil || *req.Voter
	answer := apiAddedPeer{ID: req.ID, Address: req.Address, Voter: voter}
	if req.ID == s.cfg.ID {
		writeError(w, http.StatusConflict, fmt.Sprintf("%s is the raft leader, which is in the configuration already", req.ID))
		return
	}
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("raft configuration: %v", err))
		return
	}
	for _, srv := range f.Configuration().Servers {
		switch {
		case string(srv.ID) == req.ID && string(srv.Address) == req.Address && (srv.Suffrage == raft.Voter) == voter:
			writeJSON(w, http.StatusOK, answer)
			return
		case string(srv.ID) == req.ID && srv.Suffrage == raft.Voter && !voter:
			writeError(w, http.StatusConflict, fmt.Sprintf("%s is a voter; add-peer does not demote: remove it first (coordd raft remove-peer), then add it as a nonvoter", req.ID))
			return
		case string(srv.ID) != req.ID && string(srv.Address) == req.Address:
			writeError(w, http.StatusConflict, fmt.Sprintf("raft peer %s has address %s already", srv.ID, req.Address))
			return
		}
	}
	m, known := s.member(req.ID)
	m.ID = req.ID
	known = known && m.Role == transport.RoleCoordinator
	if err := s.peerSupports(m, known); err != nil {
		writeError(w, http.StatusConflict, "add peer: "+err.Error())
		return
	}
	if err := s.checkNewPeer(r.Context(), req.ID, req.Address); err != nil {
		writeError(w, http.StatusUnprocessableEntity, err.Error())
		return
	}
	id, addr := raft.ServerID(req.ID), raft.ServerAddress(req.Address)
	// Checked again in admitPeer, with the framed gate held: the checks
	// above may take a while.
	fut, refused := s.admitPeer(m, true, known, func() raft.IndexFuture {
		if voter {
			return s.raft.AddVoter(id, addr, f.Index(), membershipChangeTimeout)
		}
		return s.raft.AddNonvoter(id, addr, f.Index(), membershipChangeTimeout)
	})
	if refused != nil {
		writeError(w, http.StatusConflict, "add peer: "+refused.Error())
		return
	}
	if err := fut.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			err = fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		s.writeApplyError(w, fmt.Errorf("add raft peer %s: %w", req.ID, err))
		return
	}
	// No index header, as for removal: a configuration entry never
	// reaches the FSM.
	s.logger.Info("operator added coordinator to the raft configuration", "member", req.ID, "raft_addr", req.Address,
		"voter", voter, "tls", s.cfg.TLS != nil, "index", fut.Index())
	answer.Changed = true
	writeJSON(w, http.StatusOK, answer)
}

// decodeAddPeer reads and checks the body of POST /v1/raft/peers.
func decodeAddPeer(w http.ResponseWriter, r *http.Request) (apiAddPeer, error) {
	var req apiAddPeer
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAddPeerBody))
	if err != nil {
		return req, err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, fmt.Errorf("body: want {\"id\", \"address\", \"voter\"}: %w", err)
	}
	if dec.More() {
		return req, errors.New("body: data after the JSON object")
	}
	if err := transport.ValidateID(req.ID); err != nil {
		if me := (*transport.MetaError)(nil); errors.As(err, &me) {
			return req, errors.New("id: " + me.Reason)
		}
		return req, err
	}
	if err := transport.ValidateHostPort(req.Address); err != nil {
		return req, fmt.Errorf("address: %w", err)
	}
	return req, nil
}

// checkNewPeer checks that coordinator id is up at addr before it is added:
// with TLS it is authenticated by its certificate; without, addr must accept
// a TCP connection (which proves that something listens, not what).
func (s *Server) checkNewPeer(ctx context.Context, id, addr string) error {
	if s.cfg.TLS != nil {
		if err := authenticateCoordinator(ctx, s.cfg.TLS, id, addr); err != nil {
			return fmt.Errorf("%w (start the coordinator with its certificate first)", err)
		}
		return nil
	}
	d := &net.Dialer{Timeout: peerAuthTimeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("coordinator %s: nothing accepts connections at raft address %s (start it first): %w", id, addr, err)
	}
	return c.Close()
}

// admitPeer changes the Raft configuration with add, for coordinator m
// (known: seen in gossip as a coordinator), and returns the change's
// future. With check, it first checks that m is at the feature level the
// cluster needs (peerSupports), and returns the refusal instead if not; a
// failure to apply the log before the check (a lost leadership, a timeout)
// is the future's error, as the change's own would be. It holds the write
// gates from the check to the end of the change, so that the leader does
// not start framing batches, choosing checkpoint ids, registering keyed
// submissions or compressing entries, for a
// configuration that is about to hold an older build. Before the check it waits until every entry in the log is applied:
// a new leader, or one whose gate closed, may have framed batches (or
// purges) committed or in flight that its FSM does not show yet, and the
// joining coordinator would replay them.
func (s *Server) admitPeer(m Member, check, known bool, add func() raft.IndexFuture) (fut raft.IndexFuture, refused error) {
	s.framed.mu.Lock()
	defer s.framed.mu.Unlock()
	s.chosenIDs.mu.Lock()
	defer s.chosenIDs.mu.Unlock()
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	s.compressed.mu.Lock()
	defer s.compressed.mu.Unlock()
	if check {
		if err := s.raft.Barrier(membershipChangeTimeout).Error(); err != nil {
			return errFuture{fmt.Errorf("apply the raft log before checking coordinator %s's feature level: %w", m.ID, err)}, nil
		}
		if err := s.peerSupports(m, known); err != nil {
			return nil, err
		}
	}
	fut = add()
	_ = fut.Error() // wait: the change is done before the gate may open
	return fut, nil
}
