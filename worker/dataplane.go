package worker

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
)

// channelAcceptedKey is the gRPC response-header key the data server sets
// once it has accepted a channel's header. A client-streaming RPC has no other
// way to say "accepted" before it ends, and the source must know, before it
// sends items, that the map task will read them: a channel rejected because
// its map task is still deploying is retried, with nothing lost.
const channelAcceptedKey = "coordflow-channel"

// maxDataMessage is the largest data message a worker accepts: a batch is cut
// at maxBatchBytes, but one item may carry a whole Kafka record.
const maxDataMessage = 64 << 20

// dataService is the Data service of a worker: it connects each incoming
// channel to the local map task its header names.
type dataService struct {
	transport.UnimplementedDataServer
	tasks      *taskManager
	acceptWait time.Duration
	logger     *slog.Logger
	// waiting bounds the channels between their header and being accepted
	// or refused: each holds a goroutine and its first message. legacy
	// bounds the channels whose first message is read to find their
	// header, which is not in their metadata, while it is read.
	waiting chan struct{}
	legacy  chan struct{}
	// firstWait bounds the wait for a channel's first message
	// (Config.ChannelFirstMessageWait).
	firstWait time.Duration
}

// maxOpeningChannels bounds the data channels a worker holds while they wait
// for their map task; real attempts need sources x map tasks of them.
const maxOpeningChannels = 1024

// channelHeaderKey is the gRPC metadata key of a channel's header (binary:
// the ChannelHeader encoded). With it, the data server checks a channel's
// credential before it decodes the channel's first message, which may be as
// large as maxDataMessage: a peer without the credential costs it the
// header and what gRPC buffers of the stream (its flow-control window).
// Sources send the header in the first message too, for the data servers
// of older workers.
const channelHeaderKey = "coordflow-channel-header-bin"

// maxChannelHeader bounds the metadata of a data channel, the header
// included, which gRPC reads before the handler runs.
const maxChannelHeader = 64 << 10

// maxLegacyOpening bounds the channels without the header in their
// metadata (sources of older workers, during a rolling upgrade) whose first
// message, of up to maxDataMessage, is being read before the credential in
// it can be checked.
const maxLegacyOpening = 8

// peerAddr is the remote address of a stream, for logs.
func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}

// Channel reads the header, waits (up to acceptWait) for the named map task to
// be running here, rejects stale attempts and channels without the attempt's
// credential, and then feeds the stream to the map task as one of its inputs
// until the source closes it. The header comes in the stream's metadata,
// checked before any message is read; from a source of an older worker, in
// the first message (maxLegacyOpening).
func (s *dataService) Channel(stream transport.Data_ChannelServer) error {
	h, err := metadataHeader(stream.Context())
	if err != nil {
		return err
	}
	var first *transport.DataMessage
	if h == nil {
		if first, h, err = s.legacyHeader(stream); err != nil {
			return err
		}
	}
	// The slot is the channel's until it is accepted or refused.
	select {
	case s.waiting <- struct{}{}:
	default:
		return status.Errorf(codes.ResourceExhausted, "data server: %d channels are already opening", cap(s.waiting))
	}
	release := sync.OnceFunc(func() { <-s.waiting })
	defer release()
	log := s.logger.With("job", h.GetJobId(), "attempt", h.GetAttempt(), "task", h.GetMapTaskId(), "source", h.GetSourceIndex(),
		"source_attempt", h.GetSourceAttempt())
	mt, err := s.tasks.awaitMap(stream.Context(), h.GetJobId(), h.GetAttempt(), h.GetMapTaskId(), s.acceptWait)
	switch {
	case errors.Is(err, errStaleAttempt):
		log.Info("rejecting data channel of a stale attempt", "err", err)
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, errMapNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, errMapDeploying):
		// The source retries at once and without spending its open timeout:
		// a restore takes as long as the state is large.
		return status.Error(codes.Aborted, err.Error())
	case err != nil:
		return status.FromContextError(err).Err()
	}
	if subtle.ConstantTimeCompare([]byte(h.GetChannelToken()), []byte(mt.token)) != 1 {
		// An early or forged channel must not take a source's place: it is
		// refused here, before attach, and the real source still gets in.
		log.Warn("refusing data channel without the attempt's credential", "peer", peerAddr(stream.Context()))
		return status.Error(codes.PermissionDenied, "data channel: wrong or missing channel credential for this attempt")
	}
	if first == nil {
		// The source is who it says: its first message may be read now.
		if first, err = s.recvFirst(stream); err != nil {
			return err
		}
		if fh := first.GetHeader(); fh != nil && !proto.Equal(fh, h) {
			return status.Error(codes.InvalidArgument, "the first data message's channel header differs from the stream's")
		}
	}
	in, err := mt.attach(int(h.GetSourceIndex()), h.GetSourceAttempt())
	switch {
	case errors.Is(err, errMapStopped):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, errOlderSource):
		log.Warn("refusing data channel of an older source attempt", "err", err)
		return status.Error(codes.FailedPrecondition, err.Error())
	case err != nil:
		return status.Error(codes.FailedPrecondition, err.Error())
	}
	if err := stream.SendHeader(metadata.Pairs(channelAcceptedKey, "accepted")); err != nil {
		mt.endInput(in, err)
		return err
	}
	release()
	log.Debug("data channel accepted")

	var pending *transport.DataMessage
	if first.GetPayload() != nil {
		pending = &transport.DataMessage{Payload: first.GetPayload()}
	}
	recv := func(context.Context) (*transport.DataMessage, error) {
		if m := pending; m != nil {
			pending = nil
			return m, nil
		}
		return stream.Recv()
	}
	// The handler goroutine is the input's goroutine. When the map task
	// stops, or a newer channel of the same source replaces this one, while
	// it waits in Recv, it returns at the source's next message or when the
	// source or the server closes the stream: Recv cannot be interrupted
	// otherwise, and until then it forwards nothing (forward checks gone).
	switch err := mt.readInput(in, recv); {
	case err == nil:
		return stream.SendAndClose(&transport.ChannelClosed{})
	case errors.Is(err, errMapStopped):
		return status.Error(codes.Aborted, "map task stopped")
	case errors.Is(err, errInputReplaced):
		log.Info("data channel replaced by a newer one of the same source")
		return status.Error(codes.FailedPrecondition, err.Error())
	default:
		return err
	}
}

// dataKeepalive pings a data connection that has read nothing for Time and
// closes it when the ping is not answered within Timeout. A send to a map
// task whose process is frozen (SIGSTOP, a stalled VM) or whose host is cut
// off blocks on gRPC's flow control once the socket buffers are full, and
// TCP alone would hold it for many minutes. A retarget breaks such a send
// off at once (sourceTask.interrupt); the ping bounds the rest, when no
// recovery follows. 10 s is the shortest Time gRPC allows a client.
var dataKeepalive = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second}

// connPool shares one gRPC client connection per remote data address among
// the worker's source tasks.
type connPool struct {
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
	creds credentials.TransportCredentials
}

func newConnPool(tc *tlsutil.Config) *connPool {
	return &connPool{conns: make(map[string]*grpc.ClientConn), creds: clientCredentials(tc, tlsutil.RoleWorker)}
}

// clientCredentials returns the gRPC credentials of a dialer to a server of
// role want: mutual TLS with this worker's certificate, or none without TLS.
func clientCredentials(tc *tlsutil.Config, want tlsutil.Role) credentials.TransportCredentials {
	if tc == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(tc.ClientConfig(want, ""))
}

// serverCredentials returns the gRPC credentials of the data server: mutual
// TLS that accepts only workers, or none without TLS.
func serverCredentials(tc *tlsutil.Config) credentials.TransportCredentials {
	if tc == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(tc.ServerConfig(tlsutil.RoleWorker))
}

func (p *connPool) get(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(p.creds), grpc.WithKeepaliveParams(dataKeepalive))
	if err != nil {
		return nil, fmt.Errorf("data connection to %s: %w", addr, err)
	}
	p.conns[addr] = c
	return c, nil
}

func (p *connPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, c := range p.conns {
		_ = c.Close()
		delete(p.conns, addr)
	}
}

// output is one data channel of a source task to one map task. Only the
// source task loop uses it.
type output interface {
	send(ctx context.Context, msg *transport.DataMessage) error
	// sendBatch sends w's packed batch and leaves w empty, ready for the
	// next one.
	sendBatch(ctx context.Context, w *transport.BatchWriter) error
	close()
}

// batchMessage wraps a packed batch for sending.
func batchMessage(packed []byte) *transport.DataMessage {
	return &transport.DataMessage{Payload: &transport.DataMessage_Batch{Batch: &transport.ItemBatch{Packed: packed}}}
}

// remoteOutput is a Data.Channel stream to another worker.
type remoteOutput struct {
	stream grpc.ClientStreamingClient[transport.DataMessage, transport.ChannelClosed]
	cancel context.CancelFunc
}

// send writes msg; when the stream has broken it returns the server's status.
func (o *remoteOutput) send(_ context.Context, msg *transport.DataMessage) error {
	if err := o.stream.Send(msg); err != nil {
		// Send reports io.EOF for a stream the server ended; the reason is
		// in the status RecvMsg returns.
		if _, rerr := o.stream.CloseAndRecv(); rerr != nil {
			return rerr
		}
		return err
	}
	return nil
}

// sendBatch reuses w's buffer for the next batch: gRPC has encoded the
// message into its own buffers by the time Send returns.
func (o *remoteOutput) sendBatch(ctx context.Context, w *transport.BatchWriter) error {
	err := o.send(ctx, batchMessage(w.Bytes()))
	w.Reset()
	return err
}

func (o *remoteOutput) close() { o.cancel() }

// openOutput opens the channel from a source task to the map task mt: in
// process when mt runs on this worker, else a gRPC stream to its data address.
// While the map task deploys (not found yet) it retries with backoff, for up
// to ChannelOpenTimeout; a stale attempt or a malformed header fails at once.
func openOutput(ctx context.Context, env *taskEnv, header *transport.ChannelHeader, mt *transport.MapTaskRef) (output, error) {
	timeout := env.cfg.ChannelOpenTimeout
	if mt.GetWorkerId() == env.workerID {
		return openLocal(ctx, env, header, mt, timeout, true)
	}
	if mt.GetDataAddr() == "" {
		return nil, fmt.Errorf("map task %s on worker %s has no data address", mt.GetTaskId(), mt.GetWorkerId())
	}
	conn, err := env.conns.get(mt.GetDataAddr())
	if err != nil {
		return nil, err
	}
	client := transport.NewDataClient(conn)
	deadline := time.Now().Add(timeout)
	bo := newBackoff(50*time.Millisecond, time.Second)
	for attempt := 1; ; attempt++ {
		out, err := openRemote(ctx, client, header, time.Until(deadline))
		if err == nil {
			return out, nil
		}
		switch status.Code(err) {
		case codes.FailedPrecondition, codes.InvalidArgument, codes.Unimplemented:
			return nil, fmt.Errorf("data channel to %s at %s rejected: %w", mt.GetTaskId(), mt.GetDataAddr(), err)
		case codes.Aborted:
			// The map task is there but still restoring: the open timeout
			// starts over (the leader's deploy timeout bounds the wait).
			deadline = time.Now().Add(timeout)
		}
		wait := bo.next()
		if ctx.Err() != nil || time.Now().Add(wait).After(deadline) {
			return nil, fmt.Errorf("open data channel to %s at %s: gave up after %d attempts in %s: %w", mt.GetTaskId(), mt.GetDataAddr(), attempt, timeout, err)
		}
		env.logger.Debug("data channel not accepted yet; retrying", "task", mt.GetTaskId(), "addr", mt.GetDataAddr(), "err", err)
		if !sleepCtx(ctx, wait) {
			return nil, ctx.Err()
		}
	}
}

// openLocal opens the in-process channel to map task mt of this worker,
// waiting up to wait for it to show up; with untilRestored, it waits on
// while the task restores its state (the leader's deploy timeout bounds
// that), else it fails with errMapDeploying.
func openLocal(ctx context.Context, env *taskEnv, header *transport.ChannelHeader, mt *transport.MapTaskRef, wait time.Duration, untilRestored bool) (output, error) {
	t, err := env.maps.awaitMap(ctx, header.GetJobId(), header.GetAttempt(), mt.GetTaskId(), wait)
	for untilRestored && errors.Is(err, errMapDeploying) {
		t, err = env.maps.awaitMap(ctx, header.GetJobId(), header.GetAttempt(), mt.GetTaskId(), wait)
	}
	if err != nil {
		return nil, fmt.Errorf("open in-process channel to %s: %w", mt.GetTaskId(), err)
	}
	lc, err := t.attachLocal(int(header.GetSourceIndex()), header.GetSourceAttempt())
	if err != nil {
		return nil, fmt.Errorf("open in-process channel to %s: %w", mt.GetTaskId(), err)
	}
	return lc, nil
}

// mapRestoring reports whether err, a failed open of a data channel, says
// the map task is there but still restoring its state: in process
// (errMapDeploying) or over gRPC (Aborted).
func mapRestoring(err error) bool {
	return errors.Is(err, errMapDeploying) || status.Code(err) == codes.Aborted
}

// openRemote makes one attempt: open the stream, send the header, wait (up to
// limit) for the server to accept it.
func openRemote(ctx context.Context, client transport.DataClient, header *transport.ChannelHeader, limit time.Duration) (*remoteOutput, error) {
	if limit <= 0 {
		return nil, status.Error(codes.DeadlineExceeded, "channel open timeout reached")
	}
	encoded, err := proto.Marshal(header)
	if err != nil {
		return nil, fmt.Errorf("encode channel header: %w", err)
	}
	sctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, channelHeaderKey, string(encoded)))
	timer := time.AfterFunc(limit, cancel)
	stream, err := client.Channel(sctx)
	if err == nil {
		if err = stream.Send(&transport.DataMessage{Header: header}); err == nil {
			md, _ := stream.Header()
			if len(md.Get(channelAcceptedKey)) > 0 && timer.Stop() {
				return &remoteOutput{stream: stream, cancel: cancel}, nil
			}
		}
		// The reason for a rejection is the status the stream ended with.
		if _, err = stream.CloseAndRecv(); err == nil {
			err = status.Error(codes.Internal, "data server closed the channel without accepting it")
		}
	}
	timer.Stop()
	cancel()
	return nil, err
}

// legacyHeader reads the header of a channel whose metadata has none (a
// source of an older worker) from its first message, which is read before
// the credential in it can be checked: in one of maxLegacyOpening slots, held
// for that read alone, bounded by s.firstWait.
func (s *dataService) legacyHeader(stream transport.Data_ChannelServer) (*transport.DataMessage, *transport.ChannelHeader, error) {
	select {
	case s.legacy <- struct{}{}:
		defer func() { <-s.legacy }()
	default:
		return nil, nil, status.Errorf(codes.ResourceExhausted, "data server: %d channels without a header in their metadata are already opening", cap(s.legacy))
	}
	first, err := s.recvFirst(stream)
	if err != nil {
		return nil, nil, err
	}
	h := first.GetHeader()
	switch {
	case h == nil:
		return nil, nil, status.Error(codes.InvalidArgument, "first data message must carry the channel header")
	case proto.Size(h) > maxChannelHeader:
		return nil, nil, status.Errorf(codes.InvalidArgument, "channel header of %d bytes, over %d", proto.Size(h), maxChannelHeader)
	}
	return first, h, nil
}

// recvFirst reads a channel's first message, within s.firstWait.
func (s *dataService) recvFirst(stream transport.Data_ChannelServer) (*transport.DataMessage, error) {
	return transport.RecvFirst(stream.Context(), s.firstWait, "first data message", stream.Recv)
}

// metadataHeader returns the channel header of a stream's metadata, nil if
// it has none (a source of an older worker).
func metadataHeader(ctx context.Context) (*transport.ChannelHeader, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(channelHeaderKey)
	if len(vals) == 0 {
		return nil, nil
	}
	h := &transport.ChannelHeader{}
	if len(vals) > 1 || proto.Unmarshal([]byte(vals[0]), h) != nil {
		return nil, status.Error(codes.InvalidArgument, "data channel: malformed channel header in the stream's metadata")
	}
	return h, nil
}
