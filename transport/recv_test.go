package transport

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRecvFirst: the message when it comes, DeadlineExceeded naming what
// was waited for when it does not, and the context's status when the
// stream ends first.
func TestRecvFirst(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	waits := func() (string, error) { <-block; return "", nil }

	got, err := RecvFirst(context.Background(), time.Minute, "x", func() (string, error) { return "hello", nil })
	if got != "hello" || err != nil {
		t.Fatalf("a message that comes: %q, %v", got, err)
	}
	_, err = RecvFirst(context.Background(), 10*time.Millisecond, "first data message", waits)
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "no first data message within 10ms") {
		t.Fatalf("no message: %v, want DeadlineExceeded naming it", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err = RecvFirst(ctx, time.Minute, "x", waits); status.Code(err) != codes.Canceled {
		t.Fatalf("stream ended: %v, want Canceled", err)
	}
}
