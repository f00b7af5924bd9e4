// Package worker is workerd: it joins the gossip pool, keeps a control session
// with the coordd leader, and runs the tasks the leader deploys: Kafka source
// tasks that split records into keyed items, and map tasks that hold keyed
// state, align checkpoint barriers, snapshot and write to an optional sink.
//
// The package imports transport only; the wire contract is docs/protocol.md.
// Layout: worker.go (config, lifecycle), gossip.go (memberlist), session.go
// (control session, lease), tasks.go (task manager, fencing, slots),
// source.go, maptask.go and align.go (the two task kinds), dataplane.go (data
// channels), sink.go and offsets.go (Kafka writes), metrics.go.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/transport/storage"
	"github.com/coordflow/coordflow/transport/tlsutil"
	"github.com/coordflow/coordflow/worker/operator"
)

// Config configures one workerd. DefaultConfig gives LAN-tuned defaults; New
// replaces zero tunables with them, so tests set only what they tighten.
type Config struct {
	// ID is the worker's gossip name and the worker id tasks are placed on.
	// With TLS it must be the id in the worker's certificate.
	ID string
	// TLS, if set, turns on mutual TLS: the control session presents this
	// worker certificate and accepts only coordinators, and the data server
	// accepts only workers (docs/security.md). Its certificate must be a
	// worker certificate.
	TLS *tlsutil.Config
	// DataAddr is where the Data service listens; it is advertised to other
	// workers as is, so it must be dialable (not 0.0.0.0). Port 0 picks a free
	// port; DataAddr() then returns the bound address.
	DataAddr string
	// GossipAddr is memberlist's bind and advertise address; port 0 picks one.
	GossipAddr string
	// Join lists gossip addresses of existing members.
	Join []string
	// Slots is how many tasks the worker runs at once; a deploy beyond them
	// fails. Zero means DefaultConfig's.
	Slots int
	// MetricsAddr, if set, serves Prometheus metrics on /metrics.
	MetricsAddr string
	// EnableDebug also serves Go's profiler under /debug/pprof/ on
	// MetricsAddr, as coordd's -enable-debug does on its HTTP address: the
	// way to see where a worker's CPU and allocations go under load.
	EnableDebug bool
	// StateDir is where map tasks keep local state: the databases of the
	// disk backend (db/) and copies of the state files they wrote (cache/),
	// for local recovery. Both are emptied when the worker starts; a
	// directory that holds anything else and no mark of a worker's
	// (stateDirMark) is refused. Empty: a
	// new directory under the system's temporary directory, removed when
	// the worker stops.
	StateDir string

	// Gossip failure detection; see docs/operations.md "Timing settings".
	ProbeInterval  time.Duration
	ProbeTimeout   time.Duration
	SuspicionMult  int
	GossipInterval time.Duration
	// GossipKeys, if set, encrypt gossip (memberlist's keyring: 16, 24 or
	// 32 bytes each): the first encrypts, all decrypt, and members without
	// a matching key are refused. transport.LoadGossipKeys reads them.
	GossipKeys [][]byte

	// Operators resolves the operator names of deployed tasks.
	Operators *operator.Registry
	Logger    *slog.Logger
	// Failpoint, if set, is called at named points of the protocol so that
	// tests can crash the process exactly there (cmd/internal/failpoint).
	// Points: "worker-before-sink-commit", "worker-mid-upload".
	Failpoint func(name string)

	// ChannelOpenTimeout bounds how long a source task keeps retrying to open
	// a data channel while the map task it feeds deploys.
	ChannelOpenTimeout time.Duration
	// OutputLostTimeout bounds how long a source task goes on without one
	// of its data channels (its stream broke, or its map task was lost)
	// while it tries to reopen it, before it fails: long enough for the
	// leader to detect a lost worker and restore its tasks elsewhere.
	OutputLostTimeout time.Duration
	// ReplayTimeout bounds one replay of a source's records to a reopened
	// channel (task-scoped recovery): a replay that cannot finish in it
	// fails the source, and the leader restarts the whole job instead.
	ReplayTimeout time.Duration
	// ChannelAcceptWait is how long the data server holds a channel whose map
	// task is not (yet) running here before rejecting it.
	ChannelAcceptWait time.Duration
	// ChannelFirstMessageWait bounds the data server's wait for a channel's
	// first message, which a source sends as soon as the channel opens: a
	// peer that opens channels and sends nothing holds each no longer.
	ChannelFirstMessageWait time.Duration
	// KafkaTimeout bounds each dial, request and metadata refresh to a broker,
	// so a missing broker fails a task instead of hanging it.
	KafkaTimeout time.Duration
	// StopTimeout bounds how long a stopping task may take to release its
	// resources (fencing, lease expiry, shutdown).
	StopTimeout time.Duration
	// BatchSize and FlushInterval shape the item batches a source sends on
	// each data channel: a batch goes out when full or when it is that old.
	BatchSize     int
	FlushInterval time.Duration
	// OffsetCommitInterval is how often the offsets of completed
	// checkpoints are committed to Kafka (for monitoring only), in one
	// request per consumer group.
	OffsetCommitInterval time.Duration
	// SessionBackoffMin and SessionBackoffMax bound the wait between attempts
	// to open a control session.
	SessionBackoffMin time.Duration
	SessionBackoffMax time.Duration
	// MetricsLinger is how long the worker keeps exporting a job's metric
	// series after the job's last task here ended: long enough for every
	// scrape to see the final values and for a restart that brings the job
	// back to carry on its counters, short enough that a worker which ran
	// thousands of jobs does not export them all. The job's attempt fences
	// go with its series: far longer than any stale deploy can be on its
	// way, and a worker does not keep one for every job it ever ran.
	MetricsLinger time.Duration

	// stateLock holds StateDir's lock (lockStateDir) from withDefaults on:
	// closed by Run at its end, by New if it fails; nil where the file
	// system takes no locks.
	stateLock *os.File
}

// DefaultConfig returns the defaults for every tunable; identity and
// addresses are left for the caller.
func DefaultConfig() Config {
	return Config{
		Slots:                   4,
		ProbeInterval:           200 * time.Millisecond,
		ProbeTimeout:            100 * time.Millisecond,
		SuspicionMult:           3,
		GossipInterval:          50 * time.Millisecond,
		Operators:               operator.Builtins(),
		Logger:                  slog.Default(),
		ChannelOpenTimeout:      15 * time.Second,
		ChannelAcceptWait:       5 * time.Second,
		ChannelFirstMessageWait: 10 * time.Second,
		OutputLostTimeout:       15 * time.Second,
		ReplayTimeout:           30 * time.Second,
		KafkaTimeout:            5 * time.Second,
		StopTimeout:             10 * time.Second,
		BatchSize:               500,
		FlushInterval:           10 * time.Millisecond,
		OffsetCommitInterval:    time.Second,
		SessionBackoffMin:       50 * time.Millisecond,
		SessionBackoffMax:       time.Second,
		MetricsLinger:           10 * time.Minute,
	}
}

// stateDirMark is the file that marks a directory as a worker's state
// directory, whose cache/ and db/ a worker may delete.
const stateDirMark = ".coordflow-worker-state"

// claimStateDir makes sure dir is a worker's state directory before the
// worker empties its cache/ and db/: one that holds the mark, or nothing
// but what a worker keeps there (older builds wrote no mark) and a file
// system's lost+found, and marks it.
// A -state-dir given by mistake (a home directory, say) is refused rather
// than have its cache/ and db/ deleted.
func claimStateDir(dir string) error {
	mark := stateDirMarkPath(dir)
	if _, err := os.Stat(mark); err == nil {
		return nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		// lost+found: the root of a file system made for the worker.
		if n := e.Name(); n != "cache" && n != "db" && n != "lost+found" {
			return fmt.Errorf("%s holds %s and no %s: it is not a worker's state directory (a worker deletes cache/ and db/ in it at start); give an empty or new directory", dir, n, stateDirMark)
		}
	}
	return os.WriteFile(mark, []byte("coordflow workerd: cache/ and db/ here are emptied at every start\n"), 0o644)
}

// stateDirMarkPath is the path of dir's mark.
func stateDirMarkPath(dir string) string { return filepath.Join(dir, stateDirMark) }

// withDefaults validates cfg and fills zero tunables from DefaultConfig. It
// claims and locks the state directory and empties its cache/ and db/; the
// lock stays with the returned Config (stateLock).
func (cfg Config) withDefaults() (Config, error) {
	if cfg.ID == "" {
		return cfg, errors.New("worker config: ID is required")
	}
	// What every coordinator's Hello check refuses: a worker with such a
	// config would ask for a session again and again, and never get one.
	if !tlsutil.ValidID(cfg.ID) {
		return cfg, fmt.Errorf("worker config: ID %.64q: use 1 to 128 letters, digits, '.', '_' or '-'", cfg.ID)
	}
	if cfg.Slots > transport.MaxSlots {
		return cfg, fmt.Errorf("worker config: %d slots: at most %d", cfg.Slots, transport.MaxSlots)
	}
	for _, addr := range cfg.Join {
		if _, port, err := net.SplitHostPort(addr); err != nil || !transport.ValidPort(port) {
			return cfg, fmt.Errorf("worker config: join address %q is not host:port (a coordinator's gossip address, as 10.0.0.1:7301)", addr)
		}
	}
	if cfg.DataAddr == "" || cfg.GossipAddr == "" {
		return cfg, errors.New("worker config: DataAddr and GossipAddr are required")
	}
	if cfg.Slots < 0 {
		return cfg, fmt.Errorf("worker config: Slots must not be negative, got %d", cfg.Slots)
	}
	if cfg.EnableDebug && cfg.MetricsAddr == "" {
		return cfg, errors.New("worker config: EnableDebug serves the profiler on the metrics address; set MetricsAddr too")
	}
	d := DefaultConfig()
	setDur := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	setDur(&cfg.ProbeInterval, d.ProbeInterval)
	setDur(&cfg.ProbeTimeout, d.ProbeTimeout)
	setDur(&cfg.GossipInterval, d.GossipInterval)
	setDur(&cfg.ChannelOpenTimeout, d.ChannelOpenTimeout)
	setDur(&cfg.ChannelAcceptWait, d.ChannelAcceptWait)
	setDur(&cfg.ChannelFirstMessageWait, d.ChannelFirstMessageWait)
	setDur(&cfg.OutputLostTimeout, d.OutputLostTimeout)
	setDur(&cfg.ReplayTimeout, d.ReplayTimeout)
	setDur(&cfg.KafkaTimeout, d.KafkaTimeout)
	setDur(&cfg.StopTimeout, d.StopTimeout)
	setDur(&cfg.FlushInterval, d.FlushInterval)
	setDur(&cfg.OffsetCommitInterval, d.OffsetCommitInterval)
	setDur(&cfg.SessionBackoffMin, d.SessionBackoffMin)
	setDur(&cfg.SessionBackoffMax, d.SessionBackoffMax)
	setDur(&cfg.MetricsLinger, d.MetricsLinger)
	if cfg.Slots == 0 {
		cfg.Slots = d.Slots
	}
	if cfg.SuspicionMult <= 0 {
		cfg.SuspicionMult = d.SuspicionMult
	}
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = d.BatchSize
	}
	if cfg.StateDir == "" {
		// A directory of this process's own: two workers on one machine
		// must never share one.
		dir, err := os.MkdirTemp("", "coordflow-worker-"+cfg.ID+"-")
		if err != nil {
			return cfg, fmt.Errorf("worker config: state dir: %w", err)
		}
		cfg.StateDir = filepath.Join(dir, "state")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return cfg, fmt.Errorf("worker config: state dir: %w", err)
	}
	if err := claimStateDir(cfg.StateDir); err != nil {
		return cfg, fmt.Errorf("worker config: state dir: %w", err)
	}
	lock, err := lockStateDir(cfg.StateDir)
	if err != nil {
		return cfg, fmt.Errorf("worker config: state dir: %w", err)
	}
	cfg.stateLock = lock
	// Local copies of state files serve the recovery of tasks this process
	// ran; what an earlier process left is no use and would only grow.
	for _, sub := range []string{"cache", "db"} {
		if err := os.RemoveAll(filepath.Join(cfg.StateDir, sub)); err != nil {
			lock.Close() // nil-safe
			return cfg, fmt.Errorf("worker config: clean state dir: %w", err)
		}
	}
	if cfg.Operators == nil {
		cfg.Operators = d.Operators
	}
	if cfg.Logger == nil {
		cfg.Logger = d.Logger
	}
	return cfg, nil
}

// Worker is one running workerd. New binds its listeners; Run serves until
// its context ends and then releases everything.
type Worker struct {
	cfg     Config
	logger  *slog.Logger
	metrics *metrics

	dataLis    net.Listener
	dataSrv    *grpc.Server
	data       *dataService
	metricsLis net.Listener
	tempDir    string // made by New for StateDir, removed by Run; "" if given
	members    *memberlist.Memberlist
	meta       *metaDelegate
	coords     *coordDirectory
	nodeMeta   transport.NodeMeta // as advertised while running
	gossipAddr string

	conns   *connPool
	stores  *storage.Pool
	outbox  *outbox
	tasks   *taskManager
	session *session

	runOnce sync.Once
}

// New validates cfg, binds the data, metrics and gossip listeners and returns
// a worker ready to Run. On error nothing is left open. A worker that is never
// Run must still be released by calling Run with a cancelled context.
func New(cfg Config) (_ *Worker, err error) {
	ownDir := cfg.StateDir == ""
	cfg, err = cfg.withDefaults()
	var tempDir string
	if ownDir && cfg.StateDir != "" {
		// The directory withDefaults made is this process's alone and
		// useless to any later one (a start empties it), so it goes when
		// the worker does, or now if New fails.
		tempDir = filepath.Dir(cfg.StateDir)
		defer func() {
			if err != nil {
				os.RemoveAll(tempDir)
			}
		}()
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			cfg.stateLock.Close()
		}
	}()
	logger := cfg.Logger.With("worker", cfg.ID)
	if cfg.stateLock == nil {
		logger.Warn("state dir not locked: its file system takes no locks; make sure no other worker uses it", "dir", cfg.StateDir)
	}
	w := &Worker{cfg: cfg, logger: logger, metrics: newMetrics(), tempDir: tempDir}

	if host, _, err := net.SplitHostPort(cfg.DataAddr); err != nil {
		return nil, fmt.Errorf("worker config: data addr %q: %w", cfg.DataAddr, err)
	} else if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return nil, fmt.Errorf("worker config: data addr %q: other workers dial it, so it must name a host", cfg.DataAddr)
	}
	w.dataLis, err = net.Listen("tcp", cfg.DataAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on data addr: %w", err)
	}
	if cfg.MetricsAddr != "" {
		w.metricsLis, err = net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			w.dataLis.Close()
			return nil, fmt.Errorf("listen on metrics addr: %w", err)
		}
	}

	w.outbox = newOutbox(w.metrics.outboxDropped)
	w.conns = newConnPool(cfg.TLS)
	w.stores = storage.NewPool()
	w.tasks = newTaskManager(&taskEnv{
		stores:    w.stores,
		workerID:  cfg.ID,
		cfg:       &w.cfg,
		logger:    logger,
		metrics:   w.metrics,
		operators: cfg.Operators,
		send:      w.outbox.push,
		conns:     w.conns,
		kafka:     newKafkaPool(&w.cfg, cfg.ID, logger, w.metrics),
		cache:     newLocalCache(filepath.Join(w.cfg.StateDir, "cache")),
	})
	w.tasks.env.maps = w.tasks
	w.dataSrv = grpc.NewServer(
		grpc.Creds(serverCredentials(cfg.TLS)),
		grpc.ConnectionTimeout(handshakeTimeout),
		grpc.MaxRecvMsgSize(maxDataMessage),
		grpc.MaxHeaderListSize(maxChannelHeader),
		// Sources ping their data connections (dataKeepalive); a server
		// that refused pings this often would close them.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: dataKeepalive.Time / 2}),
	)
	w.data = &dataService{
		tasks: w.tasks, acceptWait: cfg.ChannelAcceptWait, logger: logger,
		waiting:   make(chan struct{}, maxOpeningChannels),
		legacy:    make(chan struct{}, maxLegacyOpening),
		firstWait: cfg.ChannelFirstMessageWait,
	}
	transport.RegisterDataServer(w.dataSrv, w.data)

	w.nodeMeta = transport.NodeMeta{Role: transport.RoleWorker, DataAddr: w.dataLis.Addr().String(), Slots: cfg.Slots, FeatureLevel: transport.FeatureLevel}
	w.coords = newCoordDirectory()
	w.meta, err = newMetaDelegate(w.nodeMeta)
	if err == nil {
		w.members, err = newMemberlist(cfg, w.meta, w.coords, logger)
	}
	if err != nil {
		w.closeListeners()
		return nil, err
	}
	node := w.members.LocalNode()
	w.gossipAddr = net.JoinHostPort(node.Addr.String(), fmt.Sprint(node.Port))

	w.session = newSession(w)
	return w, nil
}

// ID returns the worker's id.
func (w *Worker) ID() string { return w.cfg.ID }

// DataAddr returns the bound, advertised data address.
func (w *Worker) DataAddr() string { return w.dataLis.Addr().String() }

// GossipAddr returns the bound, advertised gossip address, for others to join.
func (w *Worker) GossipAddr() string { return w.gossipAddr }

// MetricsAddr returns the bound metrics address, or "" when not serving.
func (w *Worker) MetricsAddr() string {
	if w.metricsLis == nil {
		return ""
	}
	return w.metricsLis.Addr().String()
}

// Gatherer returns the worker's metrics, for embedding processes that serve
// them themselves.
func (w *Worker) Gatherer() prometheus.Gatherer { return w.metrics.registry }

// Run serves until ctx ends, then stops every task (reporting CANCELLED to the
// leader while the session lasts), leaves the gossip pool gracefully and
// closes the listeners. It returns nil after a clean stop. Run may be called
// once; later calls return an error at once.
func (w *Worker) Run(ctx context.Context) error {
	err := errors.New("worker: Run called twice")
	w.runOnce.Do(func() { err = w.run(ctx) })
	return err
}

func (w *Worker) run(ctx context.Context) error {
	w.logger.Info("worker starting", "data_addr", w.DataAddr(), "gossip_addr", w.GossipAddr(), "slots", w.cfg.Slots)

	// bg outlives ctx so that shutdown can run in order below.
	bg, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBg()
	var wg sync.WaitGroup
	goFn := func(fn func()) {
		wg.Add(1)
		go func() { defer wg.Done(); fn() }()
	}

	w.tasks.start(bg)
	goFn(func() {
		if err := w.dataSrv.Serve(w.dataLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			w.logger.Error("data server stopped", "err", err)
		}
	})
	var httpSrv *http.Server
	if w.metricsLis != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(w.metrics.registry, promhttp.HandlerOpts{Registry: w.metrics.registry}))
		if w.cfg.EnableDebug {
			// Index also serves the named profiles (heap, allocs,
			// goroutine, ...), with ?seconds=N for a delta.
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		goFn(func() {
			if err := httpSrv.Serve(w.metricsLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				w.logger.Error("metrics server stopped", "err", err)
			}
		})
	}
	sessCtx, stopSession := context.WithCancel(bg)
	defer stopSession()
	goFn(func() { w.joinLoop(sessCtx) })
	goFn(func() { w.session.run(sessCtx) })
	goFn(func() { w.session.watchLease(sessCtx) })
	goFn(func() { w.tasks.env.cache.run(sessCtx, w.logger) })

	<-ctx.Done()
	w.logger.Info("worker stopping")

	// Tasks first, so their CANCELLED statuses are queued before the session
	// stops: it sends what is queued (for a bounded time) before it closes.
	stopped := w.tasks.shutdown("worker shutting down")
	stopSession()
	// Leave first: the tasks are gone, and the wait below can last.
	w.leaveGossip()
	// The tasks' partition consumers and Kafka clients close in the
	// background, the clients after a last offset commit, and a task that
	// outlived its stop timeout may still hold its lease; give them a
	// bounded time.
	if !w.tasks.env.kafka.drain(kafkaCloseTimeout) {
		w.logger.Warn("Kafka clients still closing; their last offset commits may be lost (monitoring only)", "waited", kafkaCloseTimeout)
	}
	if err := w.members.Shutdown(); err != nil {
		w.logger.Warn("shut down gossip", "err", err)
	}
	// Stop, not GracefulStop: a channel handler may be blocked reading a
	// stream whose source never closes it; closing the connections ends it.
	w.dataSrv.Stop()
	if httpSrv != nil {
		shutCtx, cancel := context.WithTimeout(bg, 2*time.Second)
		if err := httpSrv.Shutdown(shutCtx); err != nil {
			w.logger.Warn("shut down metrics server", "err", err)
		}
		cancel()
	}
	stopBg()
	wg.Wait()
	w.conns.close()
	if err := w.stores.Close(); err != nil {
		w.logger.Warn("close checkpoint storage", "err", err)
	}
	// An abandoned task may still write its database or a local copy of a
	// state file: then the directory stays locked until the process exits,
	// and a directory of New's own stays.
	if stopped {
		w.cfg.stateLock.Close() // nil (no locks there): a no-op
	}
	switch {
	case w.tempDir != "" && !stopped:
		w.logger.Warn("state dir left: tasks did not stop in time", "dir", w.tempDir)
	case w.tempDir != "":
		if err := os.RemoveAll(w.tempDir); err != nil {
			w.logger.Warn("remove state dir", "dir", w.tempDir, "err", err)
		}
	}
	w.logger.Info("worker stopped")
	return nil
}

// kafkaCloseTimeout bounds how long a stopping worker waits for its Kafka
// clients' last offset commits.
const kafkaCloseTimeout = 5 * time.Second

// gossipLeaveTimeout bounds each of the two broadcasts of a graceful leave.
const gossipLeaveTimeout = time.Second

// handshakeTimeout bounds the connection handshake (TLS included) of a
// client of the data server: a peer that connects and says nothing is cut.
const handshakeTimeout = 5 * time.Second

// leaveGossip marks the worker leaving in its node meta, gossips that, tells
// every coordinator directly, and then leaves the pool: coordinators report
// it "left", not "dead", and the leader restarts its jobs without waiting for
// a failure detector. A mark or notice that is lost only makes a coordinator
// report the worker dead.
func (w *Worker) leaveGossip() {
	leaving := w.nodeMeta
	leaving.Leaving = true
	if err := w.meta.set(leaving); err != nil {
		w.logger.Warn("mark leaving in gossip meta", "err", err)
	} else if err := w.members.UpdateNode(gossipLeaveTimeout); err != nil {
		w.logger.Info("gossip leaving mark not confirmed; peers may report this worker dead", "err", err)
	}
	if notice, err := (transport.LeavingNotice{Leaving: w.cfg.ID}).Encode(); err == nil {
		for name, addr := range w.coords.gossipAddrs() {
			if err := w.members.SendToAddress(memberlist.Address{Addr: addr, Name: name}, notice); err != nil {
				w.logger.Info("leaving notice not sent", "coordinator", name, "err", err)
			}
		}
	}
	if err := w.members.Leave(gossipLeaveTimeout); err != nil {
		w.logger.Warn("leave gossip pool", "err", err)
	}
}

// closeListeners releases what New bound when New fails or Run never serves.
func (w *Worker) closeListeners() {
	w.dataLis.Close()
	if w.metricsLis != nil {
		w.metricsLis.Close()
	}
}
