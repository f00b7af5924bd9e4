// Command workerd runs a coordflow worker: it joins the gossip pool, keeps a
// control session with the coordd leader, and runs the source and map tasks
// the leader deploys.
//
//	workerd -id w1 -data-addr 127.0.0.1:7401 -gossip-addr 127.0.0.1:7501 -join 127.0.0.1:7301 -slots 4
//
// SIGINT or SIGTERM stops it gracefully: its tasks are cancelled and reported,
// and it leaves the gossip pool before it exits.
//
// # Custom operators
//
// workerd knows the built-in operators (wordcount, count, sum, passthrough).
// To run your own, build your own workerd: a main package that registers the
// operator and starts the worker, with this file as a template:
//
//	type upper struct{}
//
//	func (upper) Split(r operator.Record, emit func(operator.Item)) error {
//		emit(operator.Item{Key: string(r.Key), Raw: bytes.ToUpper(r.Value)})
//		return nil
//	}
//
//	func (upper) Update(_ int64, it operator.Item) (int64, bool, *operator.Output) {
//		return 0, false, &operator.Output{Key: []byte(it.Key), Value: it.Raw}
//	}
//
//	func main() {
//		ops := operator.Builtins()
//		if err := ops.Register("upper", upper{}); err != nil {
//			log.Fatal(err)
//		}
//		cfg := worker.DefaultConfig()
//		cfg.ID, cfg.DataAddr, cfg.GossipAddr = "w1", "127.0.0.1:7401", "127.0.0.1:7501"
//		cfg.Join = []string{"127.0.0.1:7301"}
//		cfg.Operators = ops
//		w, err := worker.New(cfg)
//		if err != nil {
//			log.Fatal(err)
//		}
//		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
//		defer stop()
//		if err := w.Run(ctx); err != nil {
//			log.Fatal(err)
//		}
//	}
//
// Every worker that may run the job's tasks must know the operator, and the
// coordinators must accept its name in job specs.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/coordflow/coordflow/worker"
)

func main() {
	if err := run(os.Args[1:]); errors.Is(err, flag.ErrHelp) {
		os.Exit(2) // the usage is printed already
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "workerd:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	def := worker.DefaultConfig()
	fs := flag.NewFlagSet("workerd", flag.ContinueOnError)
	id := fs.String("id", "", "worker id: gossip name and placement target (required)")
	dataAddr := fs.String("data-addr", "127.0.0.1:7401", "address of the data server that other workers dial")
	gossipAddr := fs.String("gossip-addr", "127.0.0.1:7501", "gossip bind and advertise address")
	join := fs.String("join", "", "comma-separated gossip addresses of existing members")
	slots := fs.Int("slots", def.Slots, "number of tasks this worker runs at once")
	metricsAddr := fs.String("metrics-addr", "", "serve Prometheus metrics on this address at /metrics (off when empty)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	probeInterval := fs.Duration("probe-interval", def.ProbeInterval, "gossip failure-detector probe interval")
	probeTimeout := fs.Duration("probe-timeout", def.ProbeTimeout, "gossip probe timeout")
	suspicionMult := fs.Int("suspicion-mult", def.SuspicionMult, "gossip suspicion multiplier")
	gossipInterval := fs.Duration("gossip-interval", def.GossipInterval, "gossip interval")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *id == "" {
		return fmt.Errorf("-id is required")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg := def
	cfg.ID = *id
	cfg.DataAddr = *dataAddr
	cfg.GossipAddr = *gossipAddr
	cfg.Join = splitList(*join)
	cfg.Slots = *slots
	cfg.MetricsAddr = *metricsAddr
	cfg.ProbeInterval = *probeInterval
	cfg.ProbeTimeout = *probeTimeout
	cfg.SuspicionMult = *suspicionMult
	cfg.GossipInterval = *gossipInterval
	cfg.Logger = logger

	w, err := worker.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return w.Run(ctx)
}

// splitList splits a comma-separated flag value, dropping empty entries.
func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}
