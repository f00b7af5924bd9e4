// Package reload rereads a daemon's files (certificates, API tokens) on
// SIGHUP, the way to rotate them without a restart.
package reload

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// Func is one thing a daemon rereads; What names it in logs.
type Func struct {
	What   string
	Reload func() error
}

// Hold keeps SIGHUP from ending the process for the rest of its life: its
// default action would, without the graceful stop. Daemons call it first
// thing, so that a SIGHUP during start-up or during the drain after
// SIGTERM, when OnSIGHUP does not listen, is dropped.
func Hold() {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP)
}

// OnSIGHUP calls every f on each SIGHUP until ctx ends, logging each result.
// A failed reload keeps what was loaded before: the callee must only swap
// in new material once it has all of it. With nothing to reload it still
// takes the signal, and says so: SIGHUP's default action ends the process,
// without its graceful stop, and `systemctl reload` sends one.
func OnSIGHUP(ctx context.Context, logger *slog.Logger, fs ...Func) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if len(fs) == 0 {
				logger.Info("SIGHUP: nothing to reload (no TLS files, no API tokens file)")
			}
			for _, f := range fs {
				if err := f.Reload(); err != nil {
					logger.Error("reload failed; keeping the old "+f.What, "err", err)
				} else {
					logger.Info("reloaded " + f.What)
				}
			}
		}
	}
}
