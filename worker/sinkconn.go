package worker

import (
	"context"
	"net"
	"sync"
	"time"
)

// taskDialer dials a task's Kafka connections and closes them all as soon as
// the task's context ends. sarama holds a broker's lock while it waits for
// an answer, up to its read timeout (2 x -kafka-timeout), and neither
// Broker.Close nor Client.Close can cut that wait short: a map task stopping
// in the middle of a Produce to a broker that does not answer would wait that
// long, and so would whatever waits for the task (a restart on this worker,
// the worker's shutdown). A closed connection ends the read at once; the
// sink's retries then see the task stopping and give up.
type taskDialer struct {
	ctx    context.Context
	dialer net.Dialer
	mu     sync.Mutex
	conns  map[*taskConn]struct{}
}

// newTaskDialer returns a dialer for sarama's Net.Proxy.Dialer whose
// connections end with ctx; timeout bounds each dial.
func newTaskDialer(ctx context.Context, timeout time.Duration) *taskDialer {
	d := &taskDialer{ctx: ctx, dialer: net.Dialer{Timeout: timeout}, conns: make(map[*taskConn]struct{})}
	context.AfterFunc(ctx, d.closeAll)
	return d
}

// Dial connects to addr, unless the task has stopped.
func (d *taskDialer) Dial(network, addr string) (net.Conn, error) {
	conn, err := d.dialer.DialContext(d.ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c := &taskConn{Conn: conn, d: d}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.ctx.Err(); err != nil {
		conn.Close()
		return nil, err // closeAll ran between the dial and now
	}
	d.conns[c] = struct{}{}
	return c, nil
}

// closeAll closes every open connection; the task has stopped.
func (d *taskDialer) closeAll() {
	d.mu.Lock()
	conns := d.conns
	d.conns = make(map[*taskConn]struct{})
	d.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

// taskConn is a connection of a taskDialer; closing it forgets it.
type taskConn struct {
	net.Conn
	d *taskDialer
}

// Close closes the connection and forgets it.
func (c *taskConn) Close() error {
	c.d.mu.Lock()
	delete(c.d.conns, c)
	c.d.mu.Unlock()
	return c.Conn.Close()
}
