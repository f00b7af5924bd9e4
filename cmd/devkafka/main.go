// Command devkafka runs an embedded Kafka-protocol broker (franz-go's kfake) in
// its own process, for development and the integration tests: no real Kafka
// can be installed where coordflow is built.
//
//	devkafka -addr 127.0.0.1:9092 -topic words:4 -topic counts:4 [-data-dir DIR] [-sync]
//
// A -data-dir another devkafka (or `coordd dev`) is using is refused: "devkafka:
// data dir DIR is in use by another devkafka (pid N)", status 1.
//
// Once it accepts connections it prints exactly one line to stdout,
// "devkafka listening on ADDR"; scripts and tests wait for it. Logs go to
// stderr. SIGINT or SIGTERM stops it cleanly. Bad flags exit with status 2.
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
	"strings"
	"syscall"
	"time"

	"github.com/coordflow/coordflow/cmd/internal/devbroker"
	"github.com/coordflow/coordflow/cmd/internal/version"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// topicsFlag collects repeated -topic NAME:PARTITIONS flags.
type topicsFlag map[string]int32

func (f topicsFlag) String() string {
	parts := make([]string, 0, len(f))
	for name, n := range f {
		parts = append(parts, fmt.Sprintf("%s:%d", name, n))
	}
	return strings.Join(parts, ",")
}

func (f topicsFlag) Set(s string) error {
	name, n, err := devbroker.ParseTopic(s)
	if err != nil {
		return err
	}
	if _, dup := f[name]; dup {
		return fmt.Errorf("topic %q given twice", name)
	}
	f[name] = n
	return nil
}

// run is main without the exit, so that its exit codes read in one place:
// 0 after a clean stop, 1 when the broker fails, 2 on bad flags.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "version" || args[0] == "-version") {
		return version.Command("devkafka", args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("devkafka", flag.ContinueOnError)
	fs.SetOutput(stderr)
	topics := topicsFlag{}
	addr := fs.String("addr", "127.0.0.1:9092", "`host:port` to listen on and advertise to clients (port 0 picks one)")
	fs.Var(topics, "topic", "topic to create if missing, as `NAME:PARTITIONS`; repeatable")
	dataDir := fs.String("data-dir", "", "keep records, topics and committed offsets in `DIR` across restarts (default: in memory)")
	syncWrites := fs.Bool("sync", false, "fsync every write to -data-dir (survives machine crashes; process kills are survived without it)")
	logLevel := fs.String("log-level", "info", "`LEVEL` of logs: debug, info, warn or error (debug shows every request)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: devkafka -addr 127.0.0.1:9092 -topic words:4 -topic counts:4 [-data-dir DIR]\n\nRuns an embedded Kafka-protocol broker (kfake).\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2 // the flag package has printed the error and the usage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "devkafka: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(stderr, "devkafka: -log-level %q: want debug, info, warn or error\n", *logLevel)
		return 2
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	b, err := devbroker.Start(ctx, devbroker.Config{
		Addr:       *addr,
		Topics:     topics,
		DataDir:    *dataDir,
		SyncWrites: *syncWrites,
		Logger:     logger,
	})
	if errors.Is(err, devbroker.ErrConfig) {
		fmt.Fprintf(stderr, "devkafka: %v\n", err)
		return 2
	}
	if errors.Is(err, devbroker.ErrDataDirInUse) {
		fmt.Fprintf(stderr, "devkafka: %v\n", err)
		return 1
	}
	if err != nil {
		logger.Error("broker did not start", "err", err)
		return 1
	}
	logger.Info("broker started", "addr", b.Addr(), "topics", topics.String(), "data_dir", *dataDir, "sync", *syncWrites)
	fmt.Fprintf(stdout, "devkafka listening on %s\n", b.Addr())

	<-ctx.Done()
	stop() // a second signal now kills the process the default way
	logger.Info("stopping broker")
	start := time.Now()
	b.Close()
	logger.Info("broker stopped", "took", time.Since(start).Round(time.Millisecond))
	return 0
}
