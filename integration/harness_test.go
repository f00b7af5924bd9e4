package integration

// The harness: builds the binaries once (TestMain), starts clusters of real
// processes, kills and restarts them, talks to them over the HTTP API, the
// CLI and Kafka, and waits for conditions with deadlines. A test reads like
// its scenario:
//
//	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": 4}})
//	c.killWorker(t, "w1")
//	c.waitFor(t, time.Minute, "a new attempt", func() (bool, error) { ... })
//
// Every process writes stdout and stderr to a file in the test's temp dir. If
// the test fails, the tail of every log is printed. Every process is killed
// (by process group) when the test ends. Any process that exits without the
// harness stopping it fails the test at the next wait, with its log tail.
//
// The harness is split by concern:
//
//	harness_test.go          this overview, timeouts, TestMain and building the binaries
//	harness_proc_test.go     one process: start, signal, pause, its log
//	harness_ports_test.go    free loopback ports
//	harness_cluster_test.go  a cluster: start, launch with port retries, waitFor, cleanup, logs
//	harness_kafka_test.go    the devkafka process and the Kafka clients (produce, read, groups)
//	harness_coordd_test.go   coordd agents: start, kill, pause, add, the leader
//	harness_workerd_test.go  workerd processes and their metrics
//	harness_api_test.go      the HTTP API: views, job specs, calls, waits on jobs and digests
//	harness_cli_test.go      the coordd CLI
//	harness_s3_test.go       an S3 server (versitygw) for checkpoint storage
//	harness_state_test.go    keyed state through the API (export, single keys),
//	                         savepoints, file:// storage and its files

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Timeouts of the harness's own steps. Scenario deadlines are in the tests.
const (
	startTimeout   = 30 * time.Second // a process is ready (listening, answering)
	stopTimeout    = 15 * time.Second // a process exits after SIGTERM
	leaderTimeout  = 60 * time.Second // the coordinators agree on a leader
	httpTimeout    = 5 * time.Second  // one HTTP request
	cliTimeout     = 90 * time.Second // one CLI command, which may send a write again for 30 s
	pollInterval   = 100 * time.Millisecond
	progressPeriod = 15 * time.Second // how often a long wait logs why it still waits
	logTailLines   = 60
	portRetries    = 3 // starts retried when a picked free port was taken meanwhile
)

// binaries are built once per test binary run by TestMain. A binary that
// does not build fails only the tests that need it.
var binaries struct {
	dir  string
	errs map[string]error // by command name; nil error: built
}

var commands = []string{"devkafka", "coordd", "workerd"}

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "coordflow-it-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: temp dir for binaries:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	binaries.dir = dir
	binaries.errs = buildCommands(dir)
	return m.Run()
}

// daemonsRace reports whether the daemons are built with the race detector
// (COORDFLOW_IT_RACE=1), under which they run many times slower.
func daemonsRace() bool { return os.Getenv("COORDFLOW_IT_RACE") == "1" }

// buildCommands builds every command into dir, concurrently, and returns
// each one's build error.
func buildCommands(dir string) map[string]error {
	args := []string{"build"}
	if daemonsRace() {
		args = append(args, "-race")
	}
	errs := make(map[string]error, len(commands))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range commands {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			cmdArgs := append(slices.Clone(args), "-o", filepath.Join(dir, name), "github.com/coordflow/coordflow/cmd/"+name)
			out, err := exec.CommandContext(ctx, "go", cmdArgs...).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("go %s: %w\n%s", strings.Join(cmdArgs, " "), err, out)
			}
			mu.Lock()
			errs[name] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	return errs
}

// binary returns the path of a built command, or fails the test with the
// build's output.
func binary(t *testing.T, name string) string {
	t.Helper()
	if err := binaries.errs[name]; err != nil {
		t.Fatalf("%s did not build:\n%v", name, err)
	}
	return filepath.Join(binaries.dir, name)
}
