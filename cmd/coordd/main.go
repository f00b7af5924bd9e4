// Command coordd is coordflow's coordinator: `coordd agent` runs one node of
// the Raft group (job and checkpoint metadata, the leader's scheduler and
// checkpoint coordinator, the HTTP API); the other commands are a CLI for
// that HTTP API, except `coordd raft recover`, which works offline on the
// data dir of a stopped coordinator.
//
// Exit status: 0 on success, 1 when the command fails (the error goes to
// stderr), 2 on bad usage.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/coordflow/coordflow/cmd/internal/version"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage reports bad arguments after the usage was printed; it exits 2.
var errUsage = errors.New("bad usage")

const usageText = `Usage: coordd <command> [flags] [arguments]

Server:
  agent                 run a coordinator: Raft node, gossip member, gRPC and HTTP API
  dev                   run a broker, 3 coordinators, 2 workers and a sample job in one process
                        (-secure: with TLS, gossip encryption and an API token)

Security:
  tls ca create         create a CA for the cluster's certificates (-dir DIR)
  tls cert create       issue a certificate: -coordinator ID, -worker ID or -client NAME
  keygen                print a new gossip encryption key for -encrypt (base64, 32 bytes)

Jobs:
  job run FILE          submit the job spec in FILE ("-" for stdin); prints the job id
                        (-from-savepoint ID_OR_URL starts it from a savepoint; -wait waits for
                        its first checkpoint, exit 1 if it fails or is cancelled first)
  job list              list jobs
  job status ID         show a job, its tasks and its last checkpoint
  job cancel ID         cancel a job (-savepoint: stop it with a final savepoint)
  job checkpoints ID    list a job's checkpoints, newest first
  job lag ID            consumer lag per partition: broker end offset minus the last checkpoint's
  job state ID          show the offsets and keyed state of a job's last completed checkpoint
                        (-key K: one key; -export FILE: every key as NDJSON)
  job savepoint ID      take a savepoint of a running job; prints its id and location

Savepoints:
  savepoint list        list savepoints
  savepoint delete ID   delete a savepoint and its files

Cluster:
  members               list coordinators and workers with their state
  raft peers            list the Raft servers, marking the leader
  raft add-peer -id ID -raft-addr ADDR [-non-voter]
                        add a running coordinator to the Raft configuration (without TLS the
                        only way; docs/operations.md "Coordinator membership")
  raft remove-peer ID   remove a coordinator that is gone for good from the Raft configuration
  raft recover -data-dir DIR -peers FILE
                        offline, on a stopped coordinator: replace the Raft configuration
                        after a quorum loss (docs/operations.md "Recovering a node / a lost quorum")

  version               print the version of this build (workerd version, devkafka version too)

The job, members and raft commands (all but raft recover, which works offline)
talk to the HTTP API of any coordinator, named by -addr (default $COORD_ADDR,
else http://127.0.0.1:7201). Every command but agent and dev takes -format
json: the API's JSON (or, for tls, keygen, raft recover and version, an
object of what they did) instead of tables. Exit status: 0 done, 1 failed (the reason on stderr),
2 bad usage.
Run 'coordd <command> -h' for the flags of a command.
`

// run is main without the exit: it dispatches to one command.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return 2
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "agent":
		err = runAgent(rest, stderr)
	case "dev":
		err = runDev(rest)
	case "job":
		err = runJob(rest, stdout, stderr)
	case "members":
		err = runMembers(rest, stdout, stderr)
	case "raft":
		err = runRaft(rest, stdout, stderr)
	case "savepoint":
		err = runSavepoint(rest, stdout, stderr)
	case "tls":
		err = runTLS(rest, stdout, stderr)
	case "keygen":
		err = runKeygen(rest, stdout, stderr)
	case "version":
		return version.Command("coordd", rest, stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return 0
	default:
		fmt.Fprintf(stderr, "coordd: unknown command %q\n\n%s", cmd, usageText)
		return 2
	}
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	name := args[0]
	if (name == "job" || name == "raft" || name == "tls") && len(args) > 1 {
		name += " " + args[1]
	}
	fmt.Fprintf(stderr, "coordd %s: %v\n", name, err)
	return 1
}
