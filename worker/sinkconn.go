package worker

import (
	"context"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/IBM/sarama"
)

// sinkConns dials a sink's Kafka connections and can close those to given
// brokers: sarama holds a broker's lock while it waits for an answer, up to
// its read timeout (2 x -kafka-timeout), and neither Broker.Close nor
// Client.Close can cut that wait short. A map task stopping in the middle
// of a Produce to a broker that does not answer would wait that long, and
// so would whatever waits for the task (a restart on this worker, the
// worker's shutdown). sinkWriter.produce closes the connections its
// requests use when the task stops (cutDuring); a closed connection ends the
// read at once, and the sink's retries then see the task stopping.
//
// A running task's requests to its transaction coordinator
// (AddPartitionsToTxn, InitProducerID, DescribeTransactions) are cut the
// same way (txnPool.cutAtCoordinator). A commit is not: the commit of a
// stop-with-savepoint comes right before the stop and is made after it
// (mapTask.lastCompletions), and new connections are dialled for it then.
type sinkConns struct {
	dialer net.Dialer
	mu     sync.Mutex
	conns  map[*sinkConn]struct{}
}

// newSinkConns returns the dialer of a sink's client (sarama's
// Net.Proxy.Dialer); timeout bounds each dial.
func newSinkConns(timeout time.Duration) *sinkConns {
	return &sinkConns{dialer: net.Dialer{Timeout: timeout}, conns: make(map[*sinkConn]struct{})}
}

// Dial connects to addr.
func (d *sinkConns) Dial(network, addr string) (net.Conn, error) {
	conn, err := d.dialer.Dial(network, addr)
	if err != nil {
		return nil, err
	}
	c := &sinkConn{Conn: conn, d: d, addr: addr}
	d.mu.Lock()
	d.conns[c] = struct{}{}
	d.mu.Unlock()
	return c, nil
}

// cutDuring runs do, requests to brokers, and closes the brokers'
// connections as soon as ctx ends meanwhile. A cut that has started when do
// returns is waited for: it lists the connections only when it runs, and
// must not close one dialled afterwards for the next request (the commit
// that follows a stop). If the cut ran, the brokers are closed as well:
// sarama does not know that a connection idle at the cut (a broker that had
// answered) was closed under it, and would fail its next request on it,
// such as that commit.
func (d *sinkConns) cutDuring(ctx context.Context, brokers []*sarama.Broker, do func()) {
	addrs := make([]string, len(brokers))
	for i, b := range brokers {
		addrs[i] = b.Addr()
	}
	done := make(chan struct{})
	stopCut := context.AfterFunc(ctx, func() {
		defer close(done)
		d.mu.Lock()
		var cut []*sinkConn
		for c := range d.conns {
			if slices.Contains(addrs, c.addr) {
				cut = append(cut, c)
			}
		}
		d.mu.Unlock()
		for _, c := range cut {
			c.Close()
		}
	})
	do()
	if stopCut() {
		return // ctx did not end during do
	}
	<-done
	for _, b := range brokers {
		_ = b.Close()
	}
}

// sinkConn is a connection of a sinkConns; closing it forgets it.
type sinkConn struct {
	net.Conn
	d    *sinkConns
	addr string // as dialled: the broker's address in sarama
}

// Close closes the connection and forgets it.
func (c *sinkConn) Close() error {
	c.d.mu.Lock()
	delete(c.d.conns, c)
	c.d.mu.Unlock()
	return c.Conn.Close()
}
