package reload

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"
)

// TestOnSIGHUP: every SIGHUP calls every reload, a failing one included,
// until the context ends.
func TestOnSIGHUP(t *testing.T) {
	// Hold SIGHUP here too, so that a signal sent before OnSIGHUP listens
	// does not end the test binary.
	guard := make(chan os.Signal, 16)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	ok, bad := make(chan struct{}, 16), make(chan struct{}, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		OnSIGHUP(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)),
			Func{What: "certificates", Reload: func() error { ok <- struct{}{}; return nil }},
			Func{What: "tokens", Reload: func() error { bad <- struct{}{}; return errors.New("bad file") }})
	}()
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for got := false; !got; {
		select {
		case <-ok:
			got = true
		case <-tick.C:
			if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		case <-deadline:
			t.Fatal("no reload within 10s of SIGHUPs")
		}
	}
	select {
	case <-bad:
	case <-time.After(10 * time.Second):
		t.Fatal("the second reload was not called after the first")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("OnSIGHUP did not return when its context ended")
	}
}
