package coordinator

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/coordflow/coordflow/transport/tlsutil"
)

// handshakeTimeout bounds every TLS handshake a listener accepts: a peer
// that connects and sends nothing holds a connection this long at most.
const handshakeTimeout = 5 * time.Second

// newRaftTransport binds Raft's network transport on addr: plain TCP, or with
// tc mutual TLS where both ends must hold coordinator certificates. Without
// TLS anyone who reaches the port can depose the leader or append entries;
// docs/security.md.
func newRaftTransport(addr string, tc *tlsutil.Config, logger hclog.Logger) (*raft.NetworkTransport, error) {
	if tc == nil {
		return raft.NewTCPTransportWithLogger(addr, nil, raftMaxPool, raftIOTimeout, logger)
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	if tcp, ok := lis.Addr().(*net.TCPAddr); !ok || tcp.IP.IsUnspecified() {
		lis.Close()
		return nil, fmt.Errorf("raft address %s cannot be advertised to peers: bind a specific address", lis.Addr())
	}
	layer := &tlsStreamLayer{
		Listener: lis,
		server:   tc.ServerConfig(tlsutil.RoleCoordinator),
		client:   tc.ClientConfig(tlsutil.RoleCoordinator, ""),
	}
	return raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  layer,
		MaxPool: raftMaxPool,
		Timeout: raftIOTimeout,
		Logger:  logger,
	}), nil
}

// tlsStreamLayer is a raft.StreamLayer over mutual TLS. Handshakes happen on
// a connection's first read or write, in the goroutine Raft gives each
// connection, so a slow or silent peer never blocks Accept.
type tlsStreamLayer struct {
	net.Listener
	server, client *tls.Config
}

// Accept returns the next connection; its TLS handshake is still to come.
func (l *tlsStreamLayer) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &lazyHandshakeConn{Conn: tls.Server(c, l.server)}, nil
}

// Dial connects to the coordinator at address and completes the handshake,
// which checks that the peer holds a coordinator certificate of this CA.
func (l *tlsStreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: timeout}, Config: l.client}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", string(address))
	if err != nil {
		return nil, fmt.Errorf("raft tls dial %s: %w", address, err)
	}
	return c, nil
}

// lazyHandshakeConn is a server-side TLS connection whose handshake runs,
// bounded by handshakeTimeout, before its first read or write.
type lazyHandshakeConn struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (c *lazyHandshakeConn) handshake() error {
	c.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
		defer cancel()
		if err := c.Conn.HandshakeContext(ctx); err != nil {
			c.err = fmt.Errorf("tls handshake with %s: %w", c.RemoteAddr(), err)
			_ = c.Close()
		}
	})
	return c.err
}

func (c *lazyHandshakeConn) Read(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *lazyHandshakeConn) Write(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}
