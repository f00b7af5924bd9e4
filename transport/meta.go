package transport

import (
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
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
	// FeatureLevel is the FeatureLevel of the member's build; 0 from a
	// build older than the field.
	FeatureLevel int `json:"feature_level,omitempty"`
}

// FeatureLevel numbers what this build implements of what the whole cluster
// must implement before a job may use it; it only grows. A leader places a
// job's tasks only on workers at the level the job needs, and accepts the
// job only if every coordinator is at it too, since an older coordinator
// would drop the spec field from its copy of the state. The levels:
//
//  1. source.isolation_level (SourceSpec.read_committed); partition discovery.
//  2. job garbage collection: the JobPurged command in the Raft log.
//  3. group commits in the framed envelope: the FramedBatch command in the
//     Raft log.
//  4. checkpoint ids chosen by the leader (CheckpointTriggered's id), which
//     lets it send a trigger before the command commits.
//  5. submission keys (RegisterJob's submission_key): a job submission
//     that may be sent again, registered once.
//  6. compressed entries: the Compressed command in the Raft log.
const FeatureLevel = 6

// maxFeatureLevel bounds what a member may advertise: levels far beyond
// any build are a forged or corrupt meta.
const maxFeatureLevel = 1 << 16

// Bounds of gossip metadata. Gossip is not authenticated without an
// encryption key, and even with one a member's meta is only what it says of
// itself: every member checks the meta of every other against these bounds
// and ignores a member whose meta is out of them.
const (
	// MaxMetaSize is memberlist's limit on node meta (memberlist.MetaMaxSize).
	MaxMetaSize = 512
	// MaxSlots bounds a worker's slots: far above what one process runs, far
	// below what could overflow the sums of placement.
	MaxSlots = 1024
	// maxHostLen bounds the host of an advertised address (a DNS name is at
	// most 253 bytes).
	maxHostLen = 253
)

// validID is what a member id (its gossip name, its Raft server id, the id
// in its certificate) may look like: the pattern of transport/tlsutil.
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidateID checks a member id: 1 to 128 letters, digits, '.', '_' or '-',
// starting with a letter or digit.
func ValidateID(id string) error {
	if !validID.MatchString(id) {
		return &MetaError{Field: "id", Reason: fmt.Sprintf("%.140q is not 1 to 128 letters, digits, '.', '_' or '-' starting with a letter or digit", id)}
	}
	return nil
}

// ValidateHostPort checks an advertised address: host:port with a non-empty
// host of printable characters and a port in 1..65535. It does not resolve
// the host.
func ValidateHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%.300q is not host:port: %w", addr, err)
	}
	if host == "" || len(host) > maxHostLen || strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
		return fmt.Errorf("%.300q: bad host", addr)
	}
	if !ValidPort(port) {
		return fmt.Errorf("%.300q: port must be 1 to 65535", addr)
	}
	return nil
}

// ValidPort reports whether port, as net.SplitHostPort returns it, is a
// port number from 1 to 65535.
func ValidPort(port string) bool {
	p, err := strconv.Atoi(port)
	return err == nil && p >= 1 && p <= 65535
}

// MetaError says which field of a member's gossip metadata is unusable.
type MetaError struct {
	Field  string // JSON name of the field; "id" for the gossip name, "meta" for the whole
	Reason string
}

func (e *MetaError) Error() string { return "node meta: " + e.Field + ": " + e.Reason }

// Validate checks m as a member advertises it: a known role, the addresses of
// that role well-formed (a worker's data address is required), a worker's
// slots within 1..MaxSlots, and no field of the other role set. The error is
// a *MetaError naming the field.
func (m NodeMeta) Validate() error {
	addr := func(field, v string, required bool) error {
		if v == "" {
			if required {
				return &MetaError{Field: field, Reason: "missing"}
			}
			return nil
		}
		if err := ValidateHostPort(v); err != nil {
			return &MetaError{Field: field, Reason: err.Error()}
		}
		return nil
	}
	unset := func(field string, set bool) error {
		if set {
			return &MetaError{Field: field, Reason: "set on a " + m.Role}
		}
		return nil
	}
	if m.FeatureLevel < 0 || m.FeatureLevel > maxFeatureLevel {
		return &MetaError{Field: "feature_level", Reason: fmt.Sprintf("%d is outside 0..%d", m.FeatureLevel, maxFeatureLevel)}
	}
	switch m.Role {
	case RoleCoordinator:
		return firstError(
			addr("raft_addr", m.RaftAddr, false),
			addr("rpc_addr", m.RPCAddr, false),
			addr("http_addr", m.HTTPAddr, false),
			unset("data_addr", m.DataAddr != ""),
			unset("slots", m.Slots != 0),
		)
	case RoleWorker:
		var slots error
		if m.Slots < 1 || m.Slots > MaxSlots {
			slots = &MetaError{Field: "slots", Reason: fmt.Sprintf("%d is outside 1..%d", m.Slots, MaxSlots)}
		}
		return firstError(
			addr("data_addr", m.DataAddr, true),
			slots,
			unset("raft_addr", m.RaftAddr != ""),
			unset("rpc_addr", m.RPCAddr != ""),
			unset("http_addr", m.HTTPAddr != ""),
			unset("voter", m.Voter),
		)
	}
	return &MetaError{Field: "role", Reason: fmt.Sprintf("unknown role %.40q (want %s or %s)", m.Role, RoleCoordinator, RoleWorker)}
}

// firstError returns the first error that is not nil.
func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// Encode validates the metadata and returns it as memberlist node meta.
func (m NodeMeta) Encode() ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("encode %w", err)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode node meta: %w", err)
	}
	if len(b) > MaxMetaSize {
		return nil, fmt.Errorf("encode node meta: %d bytes exceeds memberlist's %d-byte limit", len(b), MaxMetaSize)
	}
	return b, nil
}

// DecodeNodeMeta parses memberlist node meta written by NodeMeta.Encode and
// validates it (NodeMeta.Validate). Unknown fields are ignored, so that a
// newer version may add some. The error wraps a *MetaError naming the field.
func DecodeNodeMeta(b []byte) (NodeMeta, error) {
	var m NodeMeta
	switch {
	case len(b) == 0:
		return m, fmt.Errorf("decode %w", &MetaError{Field: "meta", Reason: "empty"})
	case len(b) > MaxMetaSize:
		return m, fmt.Errorf("decode %w", &MetaError{Field: "meta", Reason: fmt.Sprintf("%d bytes exceed %d", len(b), MaxMetaSize)})
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return NodeMeta{}, fmt.Errorf("decode %w", &MetaError{Field: "meta", Reason: err.Error()})
	}
	if err := m.Validate(); err != nil {
		return NodeMeta{}, fmt.Errorf("decode %w", err)
	}
	return m, nil
}

// DecodeMember validates a gossip member's name and decodes its meta: what
// every delegate does before it uses a member for anything.
func DecodeMember(name string, meta []byte) (NodeMeta, error) {
	if err := ValidateID(name); err != nil {
		return NodeMeta{}, err
	}
	return DecodeNodeMeta(meta)
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
