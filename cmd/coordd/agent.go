package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/coordflow/coordflow/cmd/internal/config"
	"github.com/coordflow/coordflow/cmd/internal/failpoint"
	"github.com/coordflow/coordflow/cmd/internal/reload"
	"github.com/coordflow/coordflow/cmd/internal/version"
	"github.com/coordflow/coordflow/coordinator"
	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/tlsutil"
	"github.com/coordflow/coordflow/worker/operator"
)

// shutdownTimeout bounds a clean stop after SIGINT or SIGTERM; a second
// signal kills the process at once.
const shutdownTimeout = 30 * time.Second

// runAgent runs one coordinator until SIGINT or SIGTERM.
func runAgent(args []string, stderr io.Writer) error {
	reload.Hold()
	cfg := coordinator.DefaultConfig()
	cfg.Version = version.String()
	fs := flag.NewFlagSet("coordd agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.ID, "id", "", "`ID` of this coordinator: its Raft server id and gossip name (required)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "`DIR` for the Raft log, stable store and snapshots (required)")
	fs.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:7001", "`host:port` for Raft traffic")
	fs.StringVar(&cfg.RPCAddr, "rpc-addr", "127.0.0.1:7101", "`host:port` for the gRPC Control service workers use (bound on every interface, it is advertised with -raft-addr's host)")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", "127.0.0.1:7201", "`host:port` for the HTTP API (bound on every interface, 0.0.0.0 or [::], it is advertised with -raft-addr's host)")
	fs.BoolVar(&cfg.EnableDebug, "enable-debug", false, "serve Go's profiler under /debug/pprof/ on the HTTP address (operator role)")
	fs.StringVar(&cfg.ACLTokensFile, "acl-tokens-file", "", "API tokens `FILE`: JSON [{\"name\": \"ci\", \"token\": \"...\", \"role\": \"read|write|operator\"}]; requests then need a token (Authorization: Bearer) or a client certificate; reread on SIGHUP (docs/operations.md)")
	fs.DurationVar(&cfg.MaxStale, "max-stale", cfg.MaxStale, "how long a follower may go without hearing from the Raft leader and still answer reads; past it reads need ?stale=true")
	fs.IntVar(&cfg.HTTPMaxConnsPerClient, "http-max-conns-per-client", cfg.HTTPMaxConnsPerClient, "HTTP connections one client IP address may hold open at once; more are answered 429 and closed (0: no bound)")
	fs.StringVar(&cfg.CheckpointStorage, "checkpoint-storage", "", "checkpoint storage `URL` for jobs whose spec names none: file:///dir or s3://bucket?endpoint=...&region=...&use_path_style=true&prefix=p/ (empty: state inline in Raft)")
	fs.StringVar(&cfg.GossipAddr, "gossip-addr", "127.0.0.1:7301", "`ip:port` for gossip (memberlist, TCP and UDP)")
	fs.IntVar(&cfg.BootstrapExpect, "bootstrap-expect", 0, "bootstrap the Raft cluster once `N` voting coordinators are in gossip (0: never, join an existing one)")
	join := fs.String("join", "", "comma-separated gossip `addresses` to join, retried until one answers")
	fs.BoolVar(&cfg.Voter, "voter", cfg.Voter, "take part in Raft votes (false: replicate and serve reads only)")
	operators := fs.String("operators", strings.Join(operator.Builtins().Names(), ","), "comma-separated operator `names` job specs may use (empty: any)")
	var tlsFiles tlsutil.Files
	fs.StringVar(&tlsFiles.CA, "tls-ca", "", "CA certificate `FILE` (PEM): with -tls-cert and -tls-key, every listener requires mutual TLS (docs/security.md)")
	fs.StringVar(&tlsFiles.Cert, "tls-cert", "", "this coordinator's certificate `FILE` (coordd tls cert create -coordinator ID); reread on SIGHUP")
	fs.StringVar(&tlsFiles.Key, "tls-key", "", "the certificate's key `FILE`")
	encrypt := fs.String("encrypt", "", "gossip encryption `KEYS`: base64 keys of 16, 24 or 32 bytes (coordd keygen), comma-separated, the first encrypts; members without one are refused (default $"+transport.GossipKeyEnv+")")
	encryptFile := fs.String("encrypt-file", "", "`FILE` holding the -encrypt keys (comma- or line-separated): keeps them out of ps")
	logLevel := fs.String("log-level", "info", "`LEVEL` of logs: debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "log `FORMAT`: text or json")

	fs.DurationVar(&cfg.RaftHeartbeatTimeout, "raft-heartbeat-timeout", cfg.RaftHeartbeatTimeout, "Raft heartbeat timeout")
	fs.DurationVar(&cfg.RaftElectionTimeout, "raft-election-timeout", cfg.RaftElectionTimeout, "Raft election timeout")
	fs.DurationVar(&cfg.RaftLeaderLeaseTimeout, "raft-leader-lease-timeout", cfg.RaftLeaderLeaseTimeout, "Raft leader lease timeout (at most the heartbeat timeout)")
	fs.Uint64Var(&cfg.SnapshotThreshold, "raft-snapshot-threshold", cfg.SnapshotThreshold, "Raft log entries between snapshots")
	fs.Uint64Var(&cfg.TrailingLogs, "raft-trailing-logs", cfg.TrailingLogs, "Raft log entries kept after a snapshot")
	fs.DurationVar(&cfg.SnapshotInterval, "raft-snapshot-interval", cfg.SnapshotInterval, "how often Raft checks -raft-snapshot-threshold")
	fs.DurationVar(&cfg.RaftReconcileInterval, "raft-reconcile-interval", cfg.RaftReconcileInterval, "how often the leader compares coordinators seen in gossip with the Raft configuration (with TLS it adds those whose certificate proves their id)")
	fs.DurationVar(&cfg.ProbeInterval, "gossip-probe-interval", cfg.ProbeInterval, "memberlist probe interval")
	fs.DurationVar(&cfg.ProbeTimeout, "gossip-probe-timeout", cfg.ProbeTimeout, "memberlist probe timeout")
	fs.IntVar(&cfg.SuspicionMult, "gossip-suspicion-mult", cfg.SuspicionMult, "memberlist suspicion multiplier")
	fs.DurationVar(&cfg.GossipInterval, "gossip-interval", cfg.GossipInterval, "memberlist gossip interval")
	fs.DurationVar(&cfg.WorkerLease, "worker-lease", cfg.WorkerLease, "how long a worker runs tasks without hearing from a leader (or from a coordinator that knows no leader); see docs/operations.md")
	fs.DurationVar(&cfg.WorkerHeartbeat, "worker-heartbeat", cfg.WorkerHeartbeat, "how often workers heartbeat to the leader")
	fs.DurationVar(&cfg.ReconcileInterval, "reconcile-interval", cfg.ReconcileInterval, "how often the leader re-reads every job as a safety net (events do the work as it comes)")
	fs.DurationVar(&cfg.DeployTimeout, "deploy-timeout", cfg.DeployTimeout, "how long a deployed task may take to report RUNNING before the leader restarts its job")
	fs.DurationVar(&cfg.JobGCThreshold, "job-gc-threshold", cfg.JobGCThreshold, "how long a cancelled job, its retained checkpoints and their files stay before the leader purges them (0: keep cancelled jobs; savepoints stay either way)")
	configFile := config.Flag(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: coordd agent -id c1 -data-dir DIR [-bootstrap-expect 3] [-join ip:port,...] [flags]\n       coordd agent -config agent.json [flags]\n\nRuns one coordinator until SIGINT or SIGTERM. What every timing flag trades: docs/operations.md.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if err := config.Apply(fs, *configFile); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError(fs, "unexpected argument %q", fs.Arg(0))
	}
	if cfg.ID == "" || cfg.DataDir == "" {
		return usageError(fs, "-id and -data-dir are required")
	}
	cfg.Join = config.SplitList(*join)
	cfg.Failpoint = failpoint.FromEnv()
	if tlsFiles.Enabled() {
		tc, err := loadTLS(tlsFiles, tlsutil.RoleCoordinator, cfg.ID)
		if err != nil {
			return usageError(fs, "%v", err)
		}
		cfg.TLS = tc
	}
	gossipKeys, err := transport.LoadGossipKeys(*encrypt, *encryptFile)
	if err != nil {
		return usageError(fs, "%v", err)
	}
	cfg.GossipKeys = gossipKeys
	cfg.Operators = config.SplitList(*operators)
	logger, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		return usageError(fs, "%v", err)
	}
	cfg.Logger = logger

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv, err := coordinator.NewServer(cfg)
	if err != nil {
		return err
	}
	var reloads []reload.Func
	if cfg.TLS != nil {
		reloads = append(reloads, reload.Func{What: "tls certificates", Reload: cfg.TLS.Reload})
	}
	if cfg.ACLTokensFile != "" {
		reloads = append(reloads, reload.Func{What: "api tokens", Reload: srv.ReloadACL})
	}
	go reload.OnSIGHUP(ctx, logger, reloads...)
	<-ctx.Done()
	stop() // a second signal now kills the process the default way
	logger.Info("signal received; shutting down", "timeout", shutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	return srv.Shutdown(sctx)
}

// usageError prints msg and the flags of fs, and returns errUsage.
func usageError(fs *flag.FlagSet, format string, args ...any) error {
	fmt.Fprintf(fs.Output(), "%s: %s\n", fs.Name(), fmt.Sprintf(format, args...))
	fs.Usage()
	return errUsage
}

// newLogger returns the slog logger of -log-level and -log-format.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("-log-format %q: want text or json", format)
}

// loadTLS loads the TLS files of a daemon whose certificate must be of role
// and name id: a node started with another node's certificate would be
// refused by every peer, so it fails at start instead.
func loadTLS(f tlsutil.Files, role tlsutil.Role, id string) (*tlsutil.Config, error) {
	tc, err := tlsutil.Load(f, role)
	if err != nil {
		return nil, err
	}
	if got := tc.Identity().ID; got != id {
		return nil, fmt.Errorf("tls: certificate %s is for %s %s, not -id %s", f.Cert, role, got, id)
	}
	return tc, nil
}
