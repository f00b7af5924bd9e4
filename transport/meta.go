package transport

import (
	"encoding/json"
	"fmt"
)

// Roles a gossip member can have.
const (
	RoleCoordinator = "coordinator"
	RoleWorker      = "worker"
)

// NodeMeta is the metadata every member of the shared memberlist pool
// advertises: its role and the addresses others need to reach it. It travels
// in memberlist's node meta, which is limited to 512 bytes.
type NodeMeta struct {
	Role string `json:"role"`
	// Coordinators.
	RaftAddr string `json:"raft_addr,omitempty"`
	RPCAddr  string `json:"rpc_addr,omitempty"`
	HTTPAddr string `json:"http_addr,omitempty"`
	Voter    bool   `json:"voter,omitempty"`
	// Workers.
	DataAddr string `json:"data_addr,omitempty"`
	Slots    int    `json:"slots,omitempty"`
	// Leaving is set and gossiped by a member just before it leaves the pool
	// gracefully. memberlist v0.7.0 reports a graceful leave and a failure
	// alike to event delegates (memberlist.Node.State is never set), so this
	// mark is how peers tell "left" from "dead".
	Leaving bool `json:"leaving,omitempty"`
}

// Encode returns the metadata as memberlist node meta.
func (m NodeMeta) Encode() ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode node meta: %w", err)
	}
	if len(b) > 512 {
		return nil, fmt.Errorf("encode node meta: %d bytes exceeds memberlist's 512-byte limit", len(b))
	}
	return b, nil
}

// DecodeNodeMeta parses memberlist node meta written by NodeMeta.Encode.
func DecodeNodeMeta(b []byte) (NodeMeta, error) {
	var m NodeMeta
	if len(b) == 0 {
		return m, fmt.Errorf("decode node meta: empty")
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("decode node meta: %w", err)
	}
	return m, nil
}

// LeavingNotice is the memberlist user message a member sends straight to
// every coordinator just before it leaves the pool gracefully, besides
// gossiping NodeMeta.Leaving: gossip can deliver the leave itself to a
// coordinator before the mark, which would then show a clean stop as a
// failure.
type LeavingNotice struct {
	// Leaving is the gossip name of the member that leaves.
	Leaving string `json:"leaving"`
}

// Encode returns the notice as a memberlist user message.
func (n LeavingNotice) Encode() ([]byte, error) {
	b, err := json.Marshal(n)
	if err != nil {
		return nil, fmt.Errorf("encode leaving notice: %w", err)
	}
	return b, nil
}

// DecodeLeavingNotice parses a user message written by LeavingNotice.Encode.
func DecodeLeavingNotice(b []byte) (LeavingNotice, error) {
	var n LeavingNotice
	if err := json.Unmarshal(b, &n); err != nil {
		return n, fmt.Errorf("decode leaving notice: %w", err)
	}
	if n.Leaving == "" {
		return n, fmt.Errorf("decode leaving notice: no member named")
	}
	return n, nil
}
