package reload

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
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

// TestOnSIGHUPWithNothingToReload: a daemon with nothing to reload still
// takes SIGHUP, which would otherwise end it without its graceful stop.
func TestOnSIGHUPWithNothingToReload(t *testing.T) {
	// As in TestOnSIGHUP: the test binary must outlive a signal sent
	// before OnSIGHUP listens. The log line says OnSIGHUP took one.
	guard := make(chan os.Signal, 16)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	ctx, cancel := context.WithCancel(context.Background())
	var logged syncBuffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		OnSIGHUP(ctx, slog.New(slog.NewTextHandler(&logged, nil)))
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logged.String(), "nothing to reload") {
		if time.Now().After(deadline) {
			t.Fatal("SIGHUP not taken within 10s")
		}
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
}

// syncBuffer is a bytes.Buffer safe for a logger and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
