package worker

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// rawChannel opens a data channel stream on conn with h in its metadata
// (none if h is nil), sending nothing on it.
func rawChannel(ctx context.Context, conn *grpc.ClientConn, h *transport.ChannelHeader) (grpc.ClientStreamingClient[transport.DataMessage, transport.ChannelClosed], error) {
	if h != nil {
		encoded, err := proto.Marshal(h)
		if err != nil {
			return nil, err
		}
		ctx = metadata.AppendToOutgoingContext(ctx, channelHeaderKey, string(encoded))
	}
	return transport.NewDataClient(conn).Channel(ctx)
}

// tokenMapTask starts worker w1 (cfg changes its config) running map task
// map-0 of job "job" attempt 1, fed by sources, whose channels need the
// credential "the-token", and returns the worker and a connection to its
// data server, closed when the test ends.
func tokenMapTask(t *testing.T, sources int32, cfg func(*Config)) (*Worker, *grpc.ClientConn) {
	t.Helper()
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, cfg)
	d := mapDeploy("job", 1, operator.Count, sources, 128, mapRefs(128, w), 0)
	d.ChannelToken = "the-token"
	f.deploy(t, "w1", d)
	f.awaitStatus(t, d.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	conn, err := grpc.NewClient(w.DataAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return w, conn
}

// TestChannelCheckedBeforeItsFirstMessage: a channel whose header, in its
// metadata, lacks the attempt's credential is refused before the data
// server reads a message of it (it sends none); one whose first message
// names another header than its metadata is refused; channels of older
// sources, with the header in their first message only, open only
// maxLegacyOpening at a time, while current ones still get in; and more of
// them than that run at once.
func TestChannelCheckedBeforeItsFirstMessage(t *testing.T) {
	const sources = 2*maxLegacyOpening + 1
	w, conn := tokenMapTask(t, sources, func(c *Config) { c.ChannelAcceptWait = 2 * time.Second })
	hdr := func(source int32, token string) *transport.ChannelHeader {
		return &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: source, MapTaskId: "map-0", ChannelToken: token}
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	open := func(ctx context.Context, h *transport.ChannelHeader) grpc.ClientStreamingClient[transport.DataMessage, transport.ChannelClosed] {
		t.Helper()
		stream, err := rawChannel(ctx, conn, h)
		if err != nil {
			t.Fatal(err)
		}
		return stream
	}

	// Refused with nothing sent: the server did not wait for a message.
	var closed transport.ChannelClosed
	if err := open(ctx, hdr(0, "forged")).RecvMsg(&closed); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a channel with a forged credential in its metadata: %v, want PermissionDenied before any message", err)
	}

	// The first message must not name another header.
	stream := open(ctx, hdr(0, "the-token"))
	if err := stream.Send(&transport.DataMessage{Header: hdr(3, "the-token")}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a first message whose header differs from the metadata's: %v, want InvalidArgument", err)
	}

	// Older sources' channels wait for their first message in at most
	// maxLegacyOpening slots: with those taken, one more is refused.
	for range maxLegacyOpening {
		w.data.legacy <- struct{}{}
	}
	legacy, err := rawChannel(ctx, conn, nil)
	if err == nil {
		err = legacy.RecvMsg(&closed)
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a legacy channel with every legacy slot taken: %v, want ResourceExhausted", err)
	}
	if c := openChannel(t, w.DataAddr(), hdr(0, "the-token")); c != codes.OK {
		t.Fatalf("a current source's channel while the legacy slots are taken: %v, want accepted", c)
	}
	if c := openChannel(t, w.DataAddr(), hdr(0, "")); c != codes.PermissionDenied {
		t.Fatalf("a channel without the credential: %v, want PermissionDenied", c)
	}
	for range maxLegacyOpening {
		<-w.data.legacy
	}
	// Older sources' channels, their header in their first message only,
	// still get in with the credential, more of them than the slots: a
	// slot is held while a channel opens, not while it runs.
	for i := range int32(sources) {
		legacy, err := rawChannel(ctx, conn, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := legacy.Send(&transport.DataMessage{Header: hdr(i, "the-token")}); err != nil {
			t.Fatal(err)
		}
		if md, err := legacy.Header(); err != nil || len(md.Get(channelAcceptedKey)) == 0 {
			t.Fatalf("the channel of older source %d, with %d open: header %v, %v; want accepted", i, i, md, err)
		}
	}
}

// TestChannelThatSendsNothingIsClosed: a channel that opens and sends no
// first message, a current one with the attempt's credential in its
// metadata or an older source's without a header, is closed after
// ChannelFirstMessageWait, and the legacy slot it held is free again; an
// older source's header over maxChannelHeader is refused.
func TestChannelThatSendsNothingIsClosed(t *testing.T) {
	const wait = 300 * time.Millisecond
	w, conn := tokenMapTask(t, 1, func(c *Config) { c.ChannelFirstMessageWait = wait })
	hdr := &transport.ChannelHeader{JobId: "job", Attempt: 1, SourceIndex: 0, MapTaskId: "map-0", ChannelToken: "the-token"}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	for _, tc := range []struct {
		name string
		h    *transport.ChannelHeader
	}{{"a channel with its credential in its metadata", hdr}, {"an older source's channel", nil}} {
		// The worker's wait starts once it has the stream, which may be
		// before rawChannel returns here: start is taken before.
		start := time.Now()
		stream, err := rawChannel(ctx, conn, tc.h)
		if err != nil {
			t.Fatal(err)
		}
		var closed transport.ChannelClosed
		err = stream.RecvMsg(&closed)
		if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "no first data message within") {
			t.Fatalf("%s that sends nothing: %v, want DeadlineExceeded naming the first message", tc.name, err)
		}
		if took := time.Since(start); took < wait {
			t.Fatalf("%s that sends nothing was closed after %v, before the %v wait", tc.name, took, wait)
		}
	}
	if n := len(w.data.legacy); n != 0 {
		t.Fatalf("%d legacy slots still held after the channel was closed", n)
	}

	big := proto.Clone(hdr).(*transport.ChannelHeader)
	big.JobId = strings.Repeat("j", maxChannelHeader)
	legacy, err := rawChannel(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := legacy.Send(&transport.DataMessage{Header: big}); err != nil {
		t.Fatal(err)
	}
	if _, err := legacy.CloseAndRecv(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "channel header of") {
		t.Fatalf("an older source's header of %d bytes: %v, want InvalidArgument naming its size", proto.Size(big), err)
	}
	// The data server still takes the real source's channel.
	if c := openChannel(t, w.DataAddr(), hdr); c != codes.OK {
		t.Fatalf("the source's channel after those: %v, want accepted", c)
	}
}

// TestMapRestoringReadsBothChannels: a map task still restoring says so in
// process (errMapDeploying) and over gRPC (Aborted), each wrapped by the
// open that failed; nothing else reads as restoring.
func TestMapRestoringReadsBothChannels(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("open in-process channel to map-1: %w", errMapDeploying), true},
		{fmt.Errorf("open data channel to map-1 at 127.0.0.1:1: %w", status.Error(codes.Aborted, errMapDeploying.Error())), true},
		{fmt.Errorf("open data channel to map-1 at 127.0.0.1:1: %w", status.Error(codes.NotFound, "map task not running here")), false},
		{fmt.Errorf("open in-process channel to map-1: %w", errMapNotFound), false},
	} {
		if got := mapRestoring(tc.err); got != tc.want {
			t.Errorf("mapRestoring(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
