// Package devbroker runs an embedded Kafka-protocol broker (franz-go's kfake)
// for development and tests: devkafka runs one in its own process, and
// `coordd dev` runs one beside its coordinators and workers. It is not a Kafka
// replacement: one broker, no replication, no quotas.
//
// Durability: with a data directory every produced batch and every group
// offset commit is written to the directory's files as it is accepted, so a
// broker killed with SIGKILL keeps its records and committed offsets on
// restart. Without SyncWrites those writes are not fsynced: a machine crash
// (not a process crash) can lose the newest of them.
package devbroker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"

	"github.com/twmb/franz-go/pkg/kfake"
)

// ErrConfig marks errors in Config (bad address, bad topic), as opposed to
// failures to start (port taken, unreadable data directory).
var ErrConfig = errors.New("bad broker configuration")

// Config says where the broker listens, which topics it must have and where
// it keeps its data.
type Config struct {
	// Addr is the host:port to listen on; port 0 picks a free port (see
	// Broker.Addr). Clients are told exactly this host, so use an address
	// they can reach, never 0.0.0.0.
	Addr string
	// Topics maps each topic that must exist to its partition count. Missing
	// topics are created at start; a topic that already exists (from DataDir)
	// keeps its partitions, with a warning if the count differs.
	Topics map[string]int32
	// DataDir, when set, keeps records, topics and committed offsets on disk
	// across restarts. Empty keeps everything in memory. A broker holds an
	// exclusive lock on DataDir/LOCK while it runs: a second one on the same
	// directory fails with ErrDataDirInUse.
	DataDir string
	// SyncWrites fsyncs every write to DataDir: durable across machine
	// crashes, slower. Process kills are survived without it.
	SyncWrites bool
	// Logger receives the broker's logs; nil discards them.
	Logger *slog.Logger
}

// Broker is one running embedded broker.
type Broker struct {
	cluster *kfake.Cluster
	addr    string
	lock    *dirLock // of Config.DataDir; nil without one
}

// Start starts a broker and returns once it accepts connections and every
// topic in cfg.Topics exists. ctx bounds the start only (loading a large data
// directory can take a while); the broker then runs until Close.
func Start(ctx context.Context, cfg Config) (*Broker, error) {
	host, portStr, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("devbroker: listen address %q: %w: %w", cfg.Addr, ErrConfig, err)
	}
	if host == "" || net.ParseIP(host).IsUnspecified() {
		return nil, fmt.Errorf("devbroker: listen address %q: %w: the broker advertises its listen address to clients, so name a reachable host such as 127.0.0.1", cfg.Addr, ErrConfig)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("devbroker: listen address %q: %w: bad port", cfg.Addr, ErrConfig)
	}
	for name, n := range cfg.Topics {
		if err := validTopicName(name); err != nil {
			return nil, fmt.Errorf("devbroker: %w: %w", ErrConfig, err)
		}
		if n < 1 {
			return nil, fmt.Errorf("devbroker: topic %q: %w: partition count %d, want at least 1", name, ErrConfig, n)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("devbroker: start on %s: %w", cfg.Addr, err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	opts := []kfake.Opt{
		// One broker on exactly cfg.Addr: kfake listens on 127.0.0.1 unless
		// given a listen function, and advertises whatever it listens on.
		kfake.Ports(port),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) { return net.Listen(network, cfg.Addr) }),
		kfake.WithLogger(kfakeLogger{logger}),
	}
	var lock *dirLock
	if cfg.DataDir != "" {
		// Before kfake reads the directory: another broker may be writing it.
		if lock, err = lockDataDir(cfg.DataDir); err != nil {
			return nil, err
		}
		opts = append(opts, kfake.DataDir(cfg.DataDir))
		if cfg.SyncWrites {
			opts = append(opts, kfake.SyncWrites())
		}
	}

	type started struct {
		c   *kfake.Cluster
		err error
	}
	ch := make(chan started, 1)
	go func() {
		c, err := kfake.NewCluster(opts...)
		ch <- started{c, err}
	}()
	var c *kfake.Cluster
	select {
	case s := <-ch:
		if s.err != nil {
			lock.unlock()
			return nil, fmt.Errorf("devbroker: start on %s: %w", cfg.Addr, s.err)
		}
		c = s.c
	case <-ctx.Done():
		// The start goroutine owns the cluster from here: close it once it
		// exists so that its listener and files are released, and the
		// data dir's lock after that.
		go func() {
			if s := <-ch; s.err == nil {
				s.c.Close()
			}
			lock.unlock()
		}()
		return nil, fmt.Errorf("devbroker: start on %s: %w", cfg.Addr, ctx.Err())
	}

	b := &Broker{cluster: c, addr: c.ListenAddrs()[0], lock: lock}
	if err := b.ensureTopics(cfg.Topics, logger); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// ensureTopics creates the topics that do not exist yet, in name order so
// that logs and errors are stable. Start has validated names and counts.
func (b *Broker) ensureTopics(topics map[string]int32, logger *slog.Logger) error {
	names := make([]string, 0, len(topics))
	for name := range topics {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		want := topics[name]
		if have := len(b.cluster.PartitionInfos(name)); have > 0 {
			if int32(have) != want {
				logger.Warn("topic exists with another partition count; keeping it", "topic", name, "partitions", have, "requested", want)
			}
			continue
		}
		if err := b.cluster.CreateTopic(name, want, nil); err != nil {
			return fmt.Errorf("devbroker: create topic %q with %d partitions: %w", name, want, err)
		}
		logger.Info("created topic", "topic", name, "partitions", want)
	}
	return nil
}

// Addr returns the host:port the broker listens on and advertises, with the
// port it picked if Config.Addr asked for port 0.
func (b *Broker) Addr() string { return b.addr }

// Close stops the broker. With a data directory it first writes what it keeps
// only in memory (partition snapshots, session state) so the next start is
// fast; records and committed offsets are on disk already; then it releases
// the directory's lock. Close is safe to call more than once.
func (b *Broker) Close() {
	b.cluster.Close()
	b.lock.unlock()
}

// kfakeLogger adapts kfake's printf logger to slog. kfake logs every request
// at its info level, so its info and debug go to slog's debug levels.
type kfakeLogger struct{ l *slog.Logger }

func (k kfakeLogger) Logf(level kfake.LogLevel, format string, args ...any) {
	var lv slog.Level
	switch level {
	case kfake.LogLevelError:
		lv = slog.LevelError
	case kfake.LogLevelWarn:
		lv = slog.LevelWarn
	case kfake.LogLevelInfo:
		lv = slog.LevelDebug
	case kfake.LogLevelDebug:
		lv = slog.LevelDebug - 4
	default:
		return
	}
	ctx := context.Background()
	if !k.l.Enabled(ctx, lv) {
		return
	}
	k.l.Log(ctx, lv, fmt.Sprintf(format, args...), "component", "kfake")
}

// ParseTopic parses a topic flag of the form NAME:PARTITIONS ("words:4"), as
// devkafka's -topic takes it. NAME must be a legal Kafka topic name.
func ParseTopic(s string) (name string, partitions int32, err error) {
	name, count, ok := strings.Cut(s, ":")
	if !ok {
		return "", 0, fmt.Errorf("topic %q: want NAME:PARTITIONS, e.g. words:4", s)
	}
	if err := validTopicName(name); err != nil {
		return "", 0, fmt.Errorf("topic %q: %w", s, err)
	}
	n, err := strconv.ParseInt(count, 10, 32)
	if err != nil || n < 1 {
		return "", 0, fmt.Errorf("topic %q: partition count %q is not a positive integer", s, count)
	}
	return name, int32(n), nil
}

// validTopicName applies Kafka's rules: 1 to 249 characters of [a-zA-Z0-9._-],
// and neither "." nor "..".
func validTopicName(name string) error {
	switch {
	case name == "":
		return errors.New("empty topic name")
	case name == "." || name == "..":
		return fmt.Errorf("topic name %q is not allowed", name)
	case len(name) > 249:
		return fmt.Errorf("topic name is %d characters long, at most 249 are allowed", len(name))
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("topic name %q has %q: only letters, digits, '.', '_' and '-' are allowed", name, r)
		}
	}
	return nil
}
