package transport

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// RecvFirst reads the first message of a stream, which a server reads
// before it knows who the peer is: it returns what recv (the stream's Recv)
// returns, or a status error once d has passed (DeadlineExceeded, saying
// "no <what> within d") or ctx (the stream's) has ended. The handler then
// returns, which ends the stream and the Recv still waiting on it.
func RecvFirst[M any](ctx context.Context, d time.Duration, what string, recv func() (M, error)) (M, error) {
	type result struct {
		msg M
		err error
	}
	got := make(chan result, 1)
	go func() {
		m, err := recv()
		got <- result{m, err}
	}()
	timer := time.NewTimer(d)
	defer timer.Stop()
	var zero M
	select {
	case r := <-got:
		return r.msg, r.err
	case <-timer.C:
		return zero, status.Errorf(codes.DeadlineExceeded, "no %s within %v", what, d)
	case <-ctx.Done():
		return zero, status.FromContextError(ctx.Err()).Err()
	}
}
