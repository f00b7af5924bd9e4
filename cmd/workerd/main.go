// Command workerd runs a coordflow worker: it joins the gossip pool, keeps a
// control session with the coordd leader, and runs the source and map tasks
// the leader deploys.
//
//	workerd -id w1 -data-addr 127.0.0.1:7401 -gossip-addr 127.0.0.1:7501 -join 127.0.0.1:7301 -slots 4
//
// Every timing flag and its default is in docs/operations.md.
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
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/coordflow/coordflow/cmd/internal/config"
	"github.com/coordflow/coordflow/cmd/internal/failpoint"
	"github.com/coordflow/coordflow/cmd/internal/reload"
	"github.com/coordflow/coordflow/cmd/internal/version"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
	"github.com/coordflow/coordflow/worker"
)

func main() {
	if args := os.Args[1:]; len(args) > 0 && (args[0] == "version" || args[0] == "-version") {
		os.Exit(version.Command("workerd", args[1:], os.Stdout, os.Stderr))
	}
	if err := run(os.Args[1:], os.Stderr); errors.Is(err, flag.ErrHelp) {
		os.Exit(2) // the usage is printed already
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "workerd:", err)
		os.Exit(1)
	}
}

// run is main without the exit: flags, usage and logs go to stderr.
func run(args []string, stderr io.Writer) error {
	reload.Hold()
	cfg := worker.DefaultConfig()
	fs := flag.NewFlagSet("workerd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.ID, "id", "", "worker `ID`: gossip name and placement target (required)")
	fs.StringVar(&cfg.DataAddr, "data-addr", "127.0.0.1:7401", "`host:port` of the data server that other workers dial")
	fs.StringVar(&cfg.GossipAddr, "gossip-addr", "127.0.0.1:7501", "`ip:port` for gossip (memberlist, TCP and UDP)")
	join := fs.String("join", "", "comma-separated gossip `addresses` of existing members, retried until one answers")
	fs.IntVar(&cfg.Slots, "slots", cfg.Slots, "number of tasks this worker runs at once")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "`DIR` for local state: disk-backend databases and local copies of checkpoint files (default: <data-dir>/state)")
	dataDir := fs.String("data-dir", "", "`DIR` of the worker's own files (default: a new coordflow-worker-<id>-* directory under the system's temporary directory, removed on exit)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "serve Prometheus metrics on this `host:port` at /metrics (off when empty)")
	fs.BoolVar(&cfg.EnableDebug, "enable-debug", false, "serve Go's profiler under /debug/pprof/ on the metrics address (needs -metrics-addr)")
	var tlsFiles tlsutil.Files
	fs.StringVar(&tlsFiles.CA, "tls-ca", "", "CA certificate `FILE` (PEM): with -tls-cert and -tls-key, the control session and data channels use mutual TLS (docs/security.md)")
	fs.StringVar(&tlsFiles.Cert, "tls-cert", "", "this worker's certificate `FILE` (coordd tls cert create -worker ID); reread on SIGHUP")
	fs.StringVar(&tlsFiles.Key, "tls-key", "", "the certificate's key `FILE`")
	encrypt := fs.String("encrypt", "", "gossip encryption `KEYS`: base64 keys of 16, 24 or 32 bytes (coordd keygen), comma-separated, the first encrypts; the same as the coordinators' (default $"+transport.GossipKeyEnv+")")
	encryptFile := fs.String("encrypt-file", "", "`FILE` holding the -encrypt keys (comma- or line-separated): keeps them out of ps")
	logLevel := fs.String("log-level", "info", "`LEVEL` of logs: debug, info, warn or error")

	// Failure detection: the same flags, with the same defaults, as coordd's.
	durationFlag(fs, &cfg.ProbeInterval, "gossip-probe-interval", "probe-interval", "memberlist probe interval: how often each member probes another")
	durationFlag(fs, &cfg.ProbeTimeout, "gossip-probe-timeout", "probe-timeout", "memberlist probe timeout: how long a probe waits for its ack before indirect probes")
	fs.IntVar(&cfg.SuspicionMult, "gossip-suspicion-mult", cfg.SuspicionMult, "memberlist suspicion multiplier: a suspect is declared dead after about mult x log10(members) x probe interval")
	fs.IntVar(&cfg.SuspicionMult, "suspicion-mult", cfg.SuspicionMult, "alias of -gossip-suspicion-mult")
	durationFlag(fs, &cfg.GossipInterval, "gossip-interval", "", "memberlist gossip interval: how often state changes are pushed to peers")

	// Task runtime.
	fs.DurationVar(&cfg.KafkaTimeout, "kafka-timeout", cfg.KafkaTimeout, "bound of each Kafka dial, request and metadata refresh; a source whose partitions see only errors for this long fails")
	fs.DurationVar(&cfg.StopTimeout, "stop-timeout", cfg.StopTimeout, "how long a stopping task may take to release its resources")
	fs.DurationVar(&cfg.ChannelOpenTimeout, "channel-open-timeout", cfg.ChannelOpenTimeout, "how long a source keeps retrying to open a data channel to a deploying map task")
	fs.DurationVar(&cfg.ChannelAcceptWait, "channel-accept-wait", cfg.ChannelAcceptWait, "how long the data server holds a channel whose map task is not running yet")
	fs.IntVar(&cfg.BatchSize, "batch-size", cfg.BatchSize, "items per data-channel batch")
	fs.DurationVar(&cfg.FlushInterval, "flush-interval", cfg.FlushInterval, "how long a partial batch waits before it is sent")
	fs.DurationVar(&cfg.OffsetCommitInterval, "offset-commit-interval", cfg.OffsetCommitInterval, "how often the offsets of completed checkpoints are committed to Kafka, one request per consumer group (monitoring only)")
	fs.DurationVar(&cfg.SessionBackoffMin, "session-backoff-min", cfg.SessionBackoffMin, "first wait between attempts to open a control session")
	fs.DurationVar(&cfg.SessionBackoffMax, "session-backoff-max", cfg.SessionBackoffMax, "longest wait between attempts to open a control session")
	configFile := config.Flag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := config.Apply(fs, *configFile); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if cfg.ID == "" {
		return fmt.Errorf("-id is required")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	cfg.Join = config.SplitList(*join)
	if len(cfg.Join) == 0 {
		cfg.Logger.Warn("no -join: this worker finds no coordinator until one joins its gossip address", "gossip_addr", cfg.GossipAddr)
	}
	cfg.Failpoint = failpoint.FromEnv()
	if cfg.StateDir == "" && *dataDir != "" {
		cfg.StateDir = filepath.Join(*dataDir, "state")
	}

	if tlsFiles.Enabled() {
		tc, err := tlsutil.Load(tlsFiles, tlsutil.RoleWorker)
		if err != nil {
			return err
		}
		if got := tc.Identity().ID; got != cfg.ID {
			return fmt.Errorf("tls: certificate %s is for worker %s, not -id %s", tlsFiles.Cert, got, cfg.ID)
		}
		cfg.TLS = tc
	}
	gossipKeys, err := transport.LoadGossipKeys(*encrypt, *encryptFile)
	if err != nil {
		return err
	}
	cfg.GossipKeys = gossipKeys

	w, err := worker.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var reloads []reload.Func
	if cfg.TLS != nil {
		reloads = append(reloads, reload.Func{What: "tls certificates", Reload: cfg.TLS.Reload})
	}
	go reload.OnSIGHUP(ctx, cfg.Logger, reloads...)
	return w.Run(ctx)
}

// durationFlag defines a duration flag name, and alias (if not empty) as a
// second name for it: workerd's first gossip flags lacked coordd's prefix.
func durationFlag(fs *flag.FlagSet, v *time.Duration, name, alias, usage string) {
	fs.DurationVar(v, name, *v, usage)
	if alias != "" {
		fs.DurationVar(v, alias, *v, "alias of -"+name)
	}
}
