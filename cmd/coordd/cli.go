package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/coordflow/coordflow/coordinator"
)

// The CLI commands: each parses its flags (-addr) and arguments, makes one
// or two requests to the HTTP API and prints the answer: job ids and tables
// for scripts and people, indented JSON where the structure matters.

const jobUsage = `Usage: coordd job <command> [-addr URL] [flags] [arguments]

  job run FILE [-idempotency-key KEY] [-from-savepoint ID_OR_URL] [-wait [-wait-timeout 5m]]
                        submit the job spec in FILE ("-" for stdin); prints the job id;
                        sent again, with the same key, while the outcome is unknown;
                        -wait: until its first checkpoint completes (exit 0) or it fails (exit 1)
  job list              list jobs
  job status ID         show a job
  job cancel ID [-savepoint | -purge [-force] [-purge-wait 30s]]
                        cancel a job (sent again while the outcome is unknown);
                        with -savepoint, stop it with a final savepoint;
                        with -purge (also of a cancelled job), remove it and its checkpoint
                        files once its tasks have stopped, without waiting for -job-gc-threshold;
                        -force: even if its files cannot be deleted; -purge-wait: how long
                        to wait for the purge before saying it is pending (at most 5m)
  job checkpoints ID    list a job's checkpoints, newest first
  job lag ID            consumer lag per partition: the broker's end offset minus the
                        last completed checkpoint's offset
  job state ID [-key K | -key-base64 B | -export FILE]
                        show the state of a job's last completed checkpoint
  job savepoint ID      take a savepoint of a running job
  job transactions ID [-abort] [-json]
                        list the open Kafka transactions of a job's exactly-once
                        sink with their age and who needs them; -abort ends the
                        ones nobody needs
`

// runJob dispatches `coordd job <command>`.
func runJob(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, jobUsage)
		return errUsage
	}
	sub, rest := args[0], args[1:]
	type command struct {
		args string // the positional argument, if any
		run  func(ctx context.Context, c *apiClient, arg string) error
	}
	var (
		fromSavepoint, key, keyB64, export string
		submitKey                          string
		withSavepoint, abortTxns, asJSON   bool
		purge, force                       bool
		wait                               bool
		waitTimeout, purgeWait             time.Duration
	)
	flags := map[string]func(fs *flag.FlagSet){
		"transactions": func(fs *flag.FlagSet) {
			fs.BoolVar(&abortTxns, "abort", false, "abort the open transactions no checkpoint and no task of the job needs")
			fs.BoolVar(&asJSON, "json", false, "print the API's JSON instead of a table")
		},
		"run": func(fs *flag.FlagSet) {
			fs.StringVar(&fromSavepoint, "from-savepoint", "", "start the job from the savepoint with this `ID` or directory URL")
			fs.StringVar(&submitKey, "idempotency-key", "", "the submission's idempotency `KEY` (default: a random one): while a job submitted with it is kept, the same submission is answered with that job")
			fs.BoolVar(&wait, "wait", false, "after submitting, wait until the job's first checkpoint completes (exit 0), or the job fails or is cancelled (exit 1, with the reason)")
			fs.DurationVar(&waitTimeout, "wait-timeout", 5*time.Minute, "give up waiting (exit 1) after this long")
		},
		"cancel": func(fs *flag.FlagSet) {
			fs.BoolVar(&withSavepoint, "savepoint", false, "stop the job with a final savepoint: nothing is processed after it")
			fs.BoolVar(&purge, "purge", false, "also purge the job (a cancelled one too): remove it, its checkpoints and their files once its tasks have stopped, without waiting for -job-gc-threshold; its savepoints stay")
			fs.BoolVar(&force, "force", false, "with -purge: purge the job even if its checkpoint files cannot be deleted (its storage is gone for good); what is left stays in the storage")
			fs.DurationVar(&purgeWait, "purge-wait", 0, "with -purge: how long to wait for the purge (at most 5m) before saying it is pending, the leader going on with it (default: the API's, 30s)")
		},
		"state": func(fs *flag.FlagSet) {
			fs.StringVar(&key, "key", "", "show only this `key`")
			fs.StringVar(&keyB64, "key-base64", "", "show only the key with these `base64` bytes (a key that is not UTF-8)")
			fs.StringVar(&export, "export", "", "write every key as NDJSON to `FILE` (\"-\" for stdout)")
		},
	}
	commands := map[string]command{
		"run": {"FILE", func(ctx context.Context, c *apiClient, file string) error {
			id, err := jobRun(ctx, c, file, fromSavepoint, submitKey, stdout, stderr)
			if err != nil || !wait {
				return err
			}
			return jobWait(ctx, c, id, waitTimeout, stderr)
		}},
		"list": {"", func(ctx context.Context, c *apiClient, _ string) error { return jobList(ctx, c, stdout) }},
		"status": {"ID", func(ctx context.Context, c *apiClient, id string) error {
			return printJSON(ctx, c, "/v1/jobs/"+url.PathEscape(id), stdout)
		}},
		"cancel": {"ID", func(ctx context.Context, c *apiClient, id string) error {
			switch {
			case withSavepoint && purge:
				return fmt.Errorf("-savepoint and -purge together: stop the job with a savepoint first, then purge it (its savepoints stay)")
			case force && !purge:
				return fmt.Errorf("-force goes with -purge only")
			case purgeWait != 0 && !purge:
				return fmt.Errorf("-purge-wait goes with -purge only")
			case withSavepoint:
				return jobStopWithSavepoint(ctx, c, id, stdout)
			case purge:
				return jobPurge(ctx, c, id, force, purgeWait, stdout)
			}
			// Sent again after an unknown outcome, a cancel refused (409)
			// because the job is cancelled, before the request or in the
			// log behind the first attempt, may be refused for that
			// attempt's doing: the job's status says whether it is done.
			data, uncertain, err := c.doAgain(ctx, http.MethodDelete, "/v1/jobs/"+url.PathEscape(id), nil, nil, stderr)
			var ae *apiError
			if uncertain && errors.As(err, &ae) && ae.Status == http.StatusConflict {
				var job struct {
					Status string `json:"status"`
				}
				if c.getJSON(ctx, "/v1/jobs/"+url.PathEscape(id), &job) == nil && job.Status == "cancelled" {
					data, err = []byte(fmt.Sprintf(`{"id": %q, "status": "cancelled"}`, id)), nil
				}
			}
			if err != nil {
				return err
			}
			if c.jsonOut {
				return writeJSON(stdout, data)
			}
			fmt.Fprintf(stdout, "job %s cancelled\n", id)
			return nil
		}},
		"checkpoints": {"ID", func(ctx context.Context, c *apiClient, id string) error { return jobCheckpoints(ctx, c, id, stdout) }},
		"lag":         {"ID", func(ctx context.Context, c *apiClient, id string) error { return jobLag(ctx, c, id, stdout) }},
		"state": {"ID", func(ctx context.Context, c *apiClient, id string) error {
			path := "/v1/jobs/" + url.PathEscape(id) + "/state"
			switch {
			case export != "":
				return jobExport(ctx, c, path+"/export", export, stdout)
			case key != "":
				path += "?key=" + url.QueryEscape(key)
			case keyB64 != "":
				path += "?key_base64=" + url.QueryEscape(keyB64)
			}
			return printJSON(ctx, c, path, stdout)
		}},
		"savepoint": {"ID", func(ctx context.Context, c *apiClient, id string) error { return jobSavepoint(ctx, c, id, stdout) }},
		"transactions": {"ID", func(ctx context.Context, c *apiClient, id string) error {
			return jobTransactions(ctx, c, id, abortTxns, asJSON || c.jsonOut, stdout)
		}},
	}
	cmd, ok := commands[sub]
	if !ok {
		fmt.Fprintf(stderr, "coordd job: unknown command %q\n\n%s", sub, jobUsage)
		return errUsage
	}
	c, arg, err := parseCLI("job "+sub, cmd.args, rest, stderr, flags[sub])
	if err != nil {
		return err
	}
	timeout := requestTimeout
	if sub == "savepoint" || withSavepoint || purge || export != "" {
		timeout = longRequestTimeout
	}
	if sub == "run" || (sub == "cancel" && timeout == requestTimeout) {
		timeout = resendWindow + requestTimeout // sent again after an unknown outcome
	}
	if wait {
		timeout += waitTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return cmd.run(ctx, c, arg)
}

// runMembers prints `coordd members`.
func runMembers(args []string, stdout, stderr io.Writer) error {
	c, _, err := parseCLI("members", "", args, stderr, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if c.jsonOut {
		return printJSON(ctx, c, "/v1/members", stdout)
	}
	var members []struct {
		ID         string `json:"id"`
		Role       string `json:"role"`
		GossipAddr string `json:"gossip_addr"`
		Status     string `json:"status"`
		RaftAddr   string `json:"raft_addr"`
		RPCAddr    string `json:"rpc_addr"`
		HTTPAddr   string `json:"http_addr"`
		Voter      bool   `json:"voter"`
		DataAddr   string `json:"data_addr"`
		Slots      int    `json:"slots"`
		// FeatureLevel: which jobs the member can take part in
		// (docs/operations.md, Feature levels).
		FeatureLevel int    `json:"feature_level"`
		Problem      string `json:"problem"`
	}
	if err := c.getJSON(ctx, "/v1/members", &members); err != nil {
		return err
	}
	// Coordinators alive in gossip but not in the Raft configuration wait
	// for coordd raft add-peer (or, with TLS, for authentication); a
	// failed read only leaves the mark out.
	var peers struct {
		Servers []struct {
			ID string `json:"id"`
		} `json:"servers"`
	}
	inRaft := make(map[string]bool)
	if err := c.getJSON(ctx, "/v1/raft/peers", &peers); err == nil {
		for _, p := range peers.Servers {
			inRaft[p.ID] = true
		}
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tROLE\tSTATUS\tLEVEL\tGOSSIP\tADDRESSES")
	for _, m := range members {
		var addrs string
		switch m.Role {
		case "coordinator":
			addrs = fmt.Sprintf("raft=%s rpc=%s http=%s", m.RaftAddr, m.RPCAddr, m.HTTPAddr)
			if !m.Voter {
				addrs += " nonvoter"
			}
			if len(inRaft) > 0 && !inRaft[m.ID] && m.Status == "alive" {
				addrs += " not-in-raft (coordd raft add-peer)"
			}
		case "worker":
			addrs = fmt.Sprintf("data=%s slots=%d", m.DataAddr, m.Slots)
		default:
			addrs = "ignored: " + m.Problem
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", m.ID, m.Role, m.Status, m.FeatureLevel, m.GossipAddr, addrs)
	}
	return tw.Flush()
}

const raftUsage = `Usage: coordd raft <command> [-addr URL] [arguments]

  raft peers            list the Raft servers, marking the leader
  raft add-peer -id ID -raft-addr ADDR [-non-voter]
                        add a running coordinator to the Raft configuration
  raft remove-peer ID   remove a coordinator that is gone for good from the Raft configuration
  raft recover -data-dir DIR -peers FILE
                        offline, on a stopped coordinator: replace the Raft configuration
                        after a quorum loss (talks to no coordinator)
`

// runRaft dispatches `coordd raft peers`, `coordd raft remove-peer ID` and
// `coordd raft recover` (raft_recover.go).
func runRaft(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, raftUsage)
		return errUsage
	}
	switch args[0] {
	case "peers":
		return raftPeers(args[1:], stdout, stderr)
	case "add-peer":
		return raftAddPeer(args[1:], stdout, stderr)
	case "remove-peer":
		return raftRemovePeer(args[1:], stdout, stderr)
	case "recover":
		return raftRecover(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "coordd raft: unknown command %q\n\n%s", args[0], raftUsage)
	return errUsage
}

// raftRemovePeer removes coordinator ID from the Raft configuration through
// any coordinator (a follower forwards to the leader).
func raftRemovePeer(args []string, stdout, stderr io.Writer) error {
	c, id, err := parseCLI("raft remove-peer", "ID", args, stderr, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	data, err := c.do(ctx, http.MethodDelete, "/v1/raft/peers/"+url.PathEscape(id), nil)
	if err != nil {
		return err
	}
	if c.jsonOut {
		return writeJSON(stdout, data)
	}
	fmt.Fprintf(stdout, "removed %s from the raft configuration\n", id)
	return nil
}

// raftPeers prints `coordd raft peers`.
func raftPeers(args []string, stdout, stderr io.Writer) error {
	c, _, err := parseCLI("raft peers", "", args, stderr, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if c.jsonOut {
		return printJSON(ctx, c, "/v1/raft/peers", stdout)
	}
	var peers struct {
		Servers []struct {
			ID       string `json:"id"`
			Address  string `json:"address"`
			Suffrage string `json:"suffrage"`
			Leader   bool   `json:"leader"`
		} `json:"servers"`
	}
	if err := c.getJSON(ctx, "/v1/raft/peers", &peers); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDRESS\tSUFFRAGE\tLEADER")
	for _, p := range peers.Servers {
		leader := ""
		if p.Leader {
			leader = "*"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.ID, p.Address, p.Suffrage, leader)
	}
	return tw.Flush()
}

// parseCLI parses the connection flags (-addr, -token, -ca-file,
// -client-cert, -client-key, -stale) and the command's own flags (which
// define, if not nil, adds), anywhere among args, and the positional argument
// a command takes (argName, or none when empty), and returns the API client
// and that argument.
func parseCLI(name, argName string, args []string, stderr io.Writer, define func(*flag.FlagSet)) (*apiClient, string, error) {
	fs := flag.NewFlagSet("coordd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o clientOptions
	fs.StringVar(&o.addr, "addr", defaultAPIAddr(), "`URL` of any coordinator's HTTP API (a host without a scheme or port goes to port "+defaultAPIPort+"); defaults to $COORD_ADDR, else "+defaultAddr)
	// The defaults come from the environment after parsing, so that -h
	// never prints a token.
	fs.StringVar(&o.token, "token", "", "API `TOKEN`, sent as Authorization: Bearer (default $COORD_TOKEN)")
	fs.StringVar(&o.caFile, "ca-file", "", "CA certificate `FILE` of the cluster: speak https and check the coordinator's certificate against it (default $COORD_CACERT)")
	fs.StringVar(&o.clientCert, "client-cert", "", "client certificate `FILE` (coordd tls cert create -client NAME), over https (default $COORD_CLIENT_CERT)")
	fs.StringVar(&o.clientKey, "client-key", "", "the client certificate's key `FILE` (default $COORD_CLIENT_KEY)")
	fs.BoolVar(&o.stale, "stale", false, "read from a coordinator even if it has lost touch with the Raft leader (?stale=true): the answer may be old")
	fs.StringVar(&o.format, "format", "table", "output `FORMAT`: table (for people) or json (the API's JSON objects, stable fields, for scripts)")
	if define != nil {
		define(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: coordd %s [-addr URL] [-token TOKEN] [-ca-file FILE] %s\n\n", name, argName)
		fs.PrintDefaults()
	}
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, "", err
			}
			return nil, "", errUsage
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	want := 0
	if argName != "" {
		want = 1
	}
	if len(pos) != want {
		return nil, "", usageError(fs, "want %d argument(s), got %d", want, len(pos))
	}
	if o.format != "table" && o.format != "json" {
		return nil, "", usageError(fs, "-format %q: want table or json", o.format)
	}
	// A flag given, even empty (-token ""), overrides its variable: it is
	// how to send no token from a shell that exports one.
	given := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	fromEnv := func(v *string, flagName, name string) {
		if !given[flagName] {
			*v = os.Getenv(name)
		}
	}
	fromEnv(&o.token, "token", "COORD_TOKEN")
	fromEnv(&o.caFile, "ca-file", "COORD_CACERT")
	fromEnv(&o.clientCert, "client-cert", "COORD_CLIENT_CERT")
	fromEnv(&o.clientKey, "client-key", "COORD_CLIENT_KEY")
	c, err := newAPIClient(o)
	if err != nil {
		return nil, "", usageError(fs, "%v", err)
	}
	arg := ""
	if want == 1 {
		arg = pos[0]
	}
	return c, arg, nil
}

// defaultAPIAddr is $COORD_ADDR, else defaultAddr.
func defaultAPIAddr() string {
	if a := os.Getenv("COORD_ADDR"); a != "" {
		return a
	}
	return defaultAddr
}

// jobRun submits the spec in file ("-": stdin), from a savepoint if
// fromSavepoint is set, and prints the new job's id alone on a line, so that
// scripts can capture it.
//
// The submission carries an idempotency key (key, else a random one chosen
// here), so that one whose outcome is unknown (a leader change, a lost
// connection) can be sent again: the coordinators register one job per key,
// and answer the same submission sent again with its job. Warnings go to
// stderr.
func jobRun(ctx context.Context, c *apiClient, file, fromSavepoint, key string, stdout, stderr io.Writer) (string, error) {
	var spec []byte
	var err error
	if file == "-" {
		spec, err = io.ReadAll(os.Stdin)
	} else {
		spec, err = os.ReadFile(file)
	}
	if err != nil {
		return "", fmt.Errorf("read job spec: %w", err)
	}
	path := "/v1/jobs"
	if fromSavepoint != "" {
		path += "?from_savepoint=" + url.QueryEscape(fromSavepoint)
	}
	// A coordinator older than keys ignores the header: as the leader, it
	// would register the job again each time it is sent.
	older, err := coordinatorsBelowKeys(ctx, c, stderr)
	if err != nil {
		return "", err
	}
	chosen := key != ""
	var data []byte
	switch {
	case older != "" && chosen:
		return "", fmt.Errorf("-idempotency-key: coordinators %s are older than submission keys (feature level %d), and would ignore it; upgrade them first", older, coordinator.SubmissionKeyLevel)
	case older != "":
		fmt.Fprintf(stderr, "coordd: coordinators %s are older than submission keys (feature level %d): submitting once, without a key, and not again if the outcome is unknown\n", older, coordinator.SubmissionKeyLevel)
		data, err = c.do(ctx, http.MethodPost, path, spec)
	default:
		if !chosen {
			key = rand.Text() // 128 bits
		}
		var uncertain bool
		data, uncertain, err = c.doAgain(ctx, http.MethodPost, path, spec, http.Header{coordinator.SubmissionKeyHeader: {key}}, stderr)
		var ae *apiError
		if !chosen && !uncertain && errors.As(err, &ae) && ae.Status == http.StatusConflict && strings.Contains(ae.Message, coordinator.SubmissionKeyHeader+" needs every coordinator") {
			// The leader knows of an older coordinator that gossip did
			// not show here, and nothing was registered: once, without
			// the key.
			fmt.Fprintf(stderr, "coordd: %v; submitting once, without a key\n", err)
			data, err = c.do(ctx, http.MethodPost, path, spec)
		}
	}
	if err != nil {
		return "", err
	}
	var out struct {
		ID     string `json:"id"`
		Status string `json:"status"` // of a job the key had registered before
	}
	if err := json.Unmarshal(data, &out); err != nil || out.ID == "" {
		return "", fmt.Errorf("POST /v1/jobs: unexpected answer %q", data)
	}
	if out.Status == "cancelled" || out.Status == "failing" {
		fmt.Fprintf(stderr, "coordd: job %s was submitted before with key %s and is %s; submit with another key to run it again\n", out.ID, key, out.Status)
	}
	if c.jsonOut {
		return out.ID, writeJSON(stdout, data)
	}
	fmt.Fprintln(stdout, out.ID)
	return out.ID, nil
}

// coordinatorsBelowKeys returns the coordinators gossip shows (any not
// left) below coordinator.SubmissionKeyLevel, as a list for a message; "" if none.
func coordinatorsBelowKeys(ctx context.Context, c *apiClient, warn io.Writer) (string, error) {
	data, _, err := c.doAgain(ctx, http.MethodGet, "/v1/members", nil, nil, warn)
	if err != nil {
		return "", err
	}
	var members []struct {
		ID           string `json:"id"`
		Role         string `json:"role"`
		Status       string `json:"status"`
		FeatureLevel int    `json:"feature_level"`
	}
	if err := json.Unmarshal(data, &members); err != nil {
		return "", fmt.Errorf("GET /v1/members: %w", err)
	}
	var older []string
	for _, m := range members {
		if m.Role == "coordinator" && m.Status != "left" && m.FeatureLevel < coordinator.SubmissionKeyLevel {
			older = append(older, fmt.Sprintf("%s (feature level %d)", m.ID, m.FeatureLevel))
		}
	}
	return strings.Join(older, ", "), nil
}

// jobWaitPoll is how often `job run -wait` looks at the job.
const jobWaitPoll = 250 * time.Millisecond

// jobWait waits, for up to timeout, for job id's first completed
// checkpoint, and fails when the job cannot run (failing) or was cancelled.
// It reports on stderr, leaving stdout to the job id.
func jobWait(ctx context.Context, c *apiClient, id string, timeout time.Duration, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last struct {
		Status         string `json:"status"`
		Reason         string `json:"reason"`
		LastCheckpoint *struct {
			ID uint64 `json:"id"`
		} `json:"last_checkpoint"`
	}
	for {
		err := c.getJSON(ctx, "/v1/jobs/"+url.PathEscape(id), &last)
		switch {
		case err != nil && ctx.Err() != nil:
			return fmt.Errorf("job %s: no checkpoint completed in time (last status %q %s): %w", id, last.Status, last.Reason, ctx.Err())
		case err != nil:
			return err
		case last.LastCheckpoint != nil:
			fmt.Fprintf(stderr, "job %s: checkpoint %d completed\n", id, last.LastCheckpoint.ID)
			return nil
		case last.Status == "failing" || last.Status == "cancelled":
			if last.Status == "failing" {
				return fmt.Errorf("job %s is failing: %s (the cluster retries it with backoff; coordd job cancel %s stops it)", id, last.Reason, id)
			}
			return fmt.Errorf("job %s was cancelled: %s", id, last.Reason)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("job %s: no checkpoint completed in time (status %q %s): %w", id, last.Status, last.Reason, ctx.Err())
		case <-time.After(jobWaitPoll):
		}
	}
}

// jobList prints one line per job.
func jobList(ctx context.Context, c *apiClient, stdout io.Writer) error {
	if c.jsonOut {
		return printJSON(ctx, c, "/v1/jobs", stdout)
	}
	var jobs []struct {
		ID             string     `json:"id"`
		Name           string     `json:"name"`
		Status         string     `json:"status"`
		Reason         string     `json:"reason"`
		Attempt        uint64     `json:"attempt"`
		Tasks          []struct{} `json:"tasks"`
		LastCheckpoint *struct {
			ID          uint64 `json:"id"`
			CompletedAt string `json:"completed_at"`
		} `json:"last_checkpoint"`
	}
	if err := c.getJSON(ctx, "/v1/jobs", &jobs); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSTATUS\tATTEMPT\tTASKS\tLAST CHECKPOINT\tREASON")
	for _, j := range jobs {
		last := "-"
		if cp := j.LastCheckpoint; cp != nil {
			last = fmt.Sprintf("%d (%s ago)", cp.ID, age(cp.CompletedAt))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", j.ID, j.Name, j.Status, j.Attempt, len(j.Tasks), last, j.Reason)
	}
	return tw.Flush()
}

// jobCheckpoints prints one line per checkpoint, newest first.
// jobTransactions prints `coordd job transactions`.
func jobTransactions(ctx context.Context, c *apiClient, id string, abort, asJSON bool, stdout io.Writer) error {
	path := "/v1/jobs/" + url.PathEscape(id) + "/transactions"
	method := http.MethodGet
	if abort {
		path, method = path+"/abort", http.MethodPost
	}
	data, err := c.do(ctx, method, path, nil)
	if err != nil {
		return err
	}
	if asJSON {
		_, err := stdout.Write(data)
		return err
	}
	var txns []struct {
		TransactionalID string   `json:"transactional_id"`
		State           string   `json:"state"`
		AgeMS           int64    `json:"age_ms"`
		TimeoutMS       int64    `json:"timeout_ms"`
		Partitions      []string `json:"partitions"`
		NeededBy        string   `json:"needed_by"`
		Aborted         bool     `json:"aborted"`
	}
	if err := json.Unmarshal(data, &txns); err != nil {
		return fmt.Errorf("transactions: unexpected answer %q", data)
	}
	if len(txns) == 0 {
		fmt.Fprintf(stdout, "job %s has no open transactions\n", id)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TRANSACTIONAL ID\tSTATE\tAGE\tTIMEOUT\tPARTITIONS\tNEEDED BY")
	for _, t := range txns {
		needed := cmp.Or(t.NeededBy, "nobody")
		if t.Aborted {
			needed = "nobody: aborted now"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.TransactionalID, t.State,
			(time.Duration(t.AgeMS) * time.Millisecond).Round(time.Millisecond), time.Duration(t.TimeoutMS)*time.Millisecond,
			strings.Join(t.Partitions, ","), needed)
	}
	return tw.Flush()
}

func jobCheckpoints(ctx context.Context, c *apiClient, id string, stdout io.Writer) error {
	if c.jsonOut {
		return printJSON(ctx, c, "/v1/jobs/"+url.PathEscape(id)+"/checkpoints", stdout)
	}
	var cps []struct {
		ID          uint64   `json:"id"`
		Attempt     uint64   `json:"attempt"`
		Status      string   `json:"status"`
		TriggerTime string   `json:"trigger_time"`
		DurationMS  *float64 `json:"duration_ms"`
		Reason      string   `json:"reason"`
		Tasks       []struct {
			StateSize int `json:"state_size"`
		} `json:"tasks"`
	}
	if err := c.getJSON(ctx, "/v1/jobs/"+url.PathEscape(id)+"/checkpoints", &cps); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tATTEMPT\tSTATUS\tTRIGGERED\tDURATION\tACKS\tSTATE BYTES\tREASON")
	for _, cp := range cps {
		dur := "-"
		if cp.DurationMS != nil {
			dur = time.Duration(*cp.DurationMS * float64(time.Millisecond)).Round(time.Millisecond / 10).String()
		}
		size := 0
		for _, t := range cp.Tasks {
			size += t.StateSize
		}
		triggered := cp.TriggerTime
		if t, err := time.Parse(time.RFC3339Nano, cp.TriggerTime); err == nil {
			triggered = t.Local().Format("2006-01-02 15:04:05.000")
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%d\t%d\t%s\n", cp.ID, cp.Attempt, cp.Status, triggered, dur, len(cp.Tasks), size, cp.Reason)
	}
	return tw.Flush()
}

// jobLag prints GET /v1/jobs/{id}/lag.
func jobLag(ctx context.Context, c *apiClient, id string, stdout io.Writer) error {
	path := "/v1/jobs/" + url.PathEscape(id) + "/lag"
	if c.jsonOut {
		return printJSON(ctx, c, path, stdout)
	}
	var lag struct {
		Topic        string `json:"topic"`
		CheckpointID uint64 `json:"checkpoint_id"`
		Total        int64  `json:"total"`
		Partitions   []struct {
			Partition        int32  `json:"partition"`
			EndOffset        int64  `json:"end_offset"`
			CheckpointOffset *int64 `json:"checkpoint_offset"`
			Lag              *int64 `json:"lag"`
		} `json:"partitions"`
	}
	if err := c.getJSON(ctx, path, &lag); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PARTITION\tEND OFFSET\tCHECKPOINT OFFSET\tLAG")
	for _, p := range lag.Partitions {
		done, behind := "-", "-"
		if p.CheckpointOffset != nil && p.Lag != nil {
			done, behind = strconv.FormatInt(*p.CheckpointOffset, 10), strconv.FormatInt(*p.Lag, 10)
		}
		fmt.Fprintf(tw, "%s/%d\t%d\t%s\t%s\n", lag.Topic, p.Partition, p.EndOffset, done, behind)
	}
	fmt.Fprintf(tw, "total\t\t\t%d\n", lag.Total)
	if err := tw.Flush(); err != nil {
		return err
	}
	if lag.CheckpointID == 0 {
		fmt.Fprintln(stdout, "(no completed checkpoint yet)")
	} else {
		fmt.Fprintf(stdout, "as of checkpoint %d\n", lag.CheckpointID)
	}
	return nil
}

// printJSON GETs path and prints the answer as indented JSON.
func printJSON(ctx context.Context, c *apiClient, path string, stdout io.Writer) error {
	data, err := c.do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if err := writeJSON(stdout, data); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// writeJSON prints an API answer as indented JSON.
func writeJSON(stdout io.Writer, data []byte) error {
	var out bytes.Buffer
	if err := json.Indent(&out, data, "", "  "); err != nil {
		return fmt.Errorf("answer is not JSON: %w", err)
	}
	out.WriteByte('\n')
	_, err := out.WriteTo(stdout)
	return err
}

// age renders how long ago an RFC 3339 time was, to the second.
func age(ts string) string {
	t, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return "?"
	}
	return time.Since(t).Round(time.Second).String()
}

// savepointView is what the CLI shows of a savepoint.
type savepointView struct {
	ID           string `json:"id"`
	JobID        string `json:"job_id"`
	CheckpointID uint64 `json:"checkpoint_id"`
	CreatedAt    string `json:"created_at"`
	Location     string `json:"location"`
	StateBytes   int64  `json:"state_bytes"`
	Keys         int64  `json:"keys"`
}

// printSavepoint prints a savepoint's id alone on the first line, for
// scripts, then where it is.
func printSavepoint(stdout io.Writer, sp savepointView) {
	fmt.Fprintln(stdout, sp.ID)
	if sp.Location != "" {
		fmt.Fprintf(stdout, "location: %s\n", sp.Location)
	}
	fmt.Fprintf(stdout, "checkpoint %d, %d keys, %d bytes of state\n", sp.CheckpointID, sp.Keys, sp.StateBytes)
}

// jobSavepoint takes a savepoint of job id and waits for it.
func jobSavepoint(ctx context.Context, c *apiClient, id string, stdout io.Writer) error {
	data, err := c.do(ctx, http.MethodPost, "/v1/jobs/"+url.PathEscape(id)+"/savepoints", nil)
	if err != nil {
		return err
	}
	var sp savepointView
	if err := json.Unmarshal(data, &sp); err != nil || sp.ID == "" {
		return fmt.Errorf("POST savepoint: unexpected answer %q", data)
	}
	if c.jsonOut {
		return writeJSON(stdout, data)
	}
	printSavepoint(stdout, sp)
	return nil
}

// jobStopWithSavepoint stops job id with a final savepoint.
func jobStopWithSavepoint(ctx context.Context, c *apiClient, id string, stdout io.Writer) error {
	data, err := c.do(ctx, http.MethodDelete, "/v1/jobs/"+url.PathEscape(id)+"?savepoint=true", nil)
	if err != nil {
		return err
	}
	var out struct {
		Savepoint savepointView `json:"savepoint"`
	}
	if err := json.Unmarshal(data, &out); err != nil || out.Savepoint.ID == "" {
		return fmt.Errorf("stop with savepoint: unexpected answer %q", data)
	}
	if c.jsonOut {
		return writeJSON(stdout, data)
	}
	printSavepoint(stdout, out.Savepoint)
	fmt.Fprintf(stdout, "job %s stopped\n", id)
	return nil
}

// jobPurge cancels job id if it runs and purges it: done, or pending while
// its tasks stop (the leader goes on with it); wait, if not 0, bounds how
// long the API waits before it says so.
func jobPurge(ctx context.Context, c *apiClient, id string, force bool, wait time.Duration, stdout io.Writer) error {
	path := "/v1/jobs/" + url.PathEscape(id) + "?purge=true"
	if force {
		path += "&force=true"
	}
	if wait != 0 {
		path += "&wait=" + url.QueryEscape(wait.String())
	}
	data, err := c.do(ctx, http.MethodDelete, path, nil)
	if err != nil {
		return err
	}
	if c.jsonOut {
		return writeJSON(stdout, data)
	}
	var out struct {
		Status       string `json:"status"`
		FilesDeleted int    `json:"files_deleted"`
		FilesLeft    string `json:"files_left"`
		Reason       string `json:"reason"`
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return fmt.Errorf("purge: unexpected answer %q", data)
	}
	if out.Status == "purged" {
		fmt.Fprintf(stdout, "job %s purged (%d checkpoint files deleted)\n", id, out.FilesDeleted)
		if out.FilesLeft != "" {
			fmt.Fprintf(stdout, "warning: %s\n", out.FilesLeft)
		}
		return nil
	}
	fmt.Fprintf(stdout, "job %s cancelled; purge pending: %s\n", id, out.Reason)
	return nil
}

// jobExport streams the NDJSON export at path to file ("-": stdout). A
// file is written beside its name and renamed into place only once the
// export is complete and on disk, so an export that fails (the coordinator
// lost, the state unreadable, a full disk) leaves no partial file and an
// earlier export of that name as it was.
func jobExport(ctx context.Context, c *apiClient, path, file string, stdout io.Writer) (err error) {
	out := stdout
	var tmp *os.File
	if file != "-" {
		tmp, err = os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".*.tmp")
		if err != nil {
			return fmt.Errorf("export: %w", err)
		}
		defer func() {
			if err != nil {
				tmp.Close()
				os.Remove(tmp.Name())
			}
		}()
		out = tmp
	}
	last := &lastLine{w: out}
	n, err := c.stream(ctx, path, last)
	if err != nil {
		return err
	}
	// The server ends a stream it could not finish with an {"error"} line.
	var tail struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(last.line, &tail) == nil && tail.Error != "" {
		return fmt.Errorf("export incomplete after %d bytes: %s", n, tail.Error)
	}
	if tmp == nil {
		return nil
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("export: write %s: %w", file, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("export: write %s: %w", file, err)
	}
	// CreateTemp makes the file 0600: give it the mode of the file it
	// replaces, or what os.Create gives under the usual umask.
	mode := os.FileMode(0o644)
	if fi, err := os.Stat(file); err == nil {
		mode = fi.Mode().Perm()
	}
	if err := os.Chmod(tmp.Name(), mode); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %d bytes to %s\n", n, file)
	return nil
}

const savepointUsage = `Usage: coordd savepoint <command> [-addr URL] [arguments]

  savepoint list        list savepoints
  savepoint delete ID   delete a savepoint and its files
`

// runSavepoint dispatches `coordd savepoint list` and `coordd savepoint delete ID`.
func runSavepoint(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, savepointUsage)
		return errUsage
	}
	switch args[0] {
	case "list":
		c, _, err := parseCLI("savepoint list", "", args[1:], stderr, nil)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
		defer cancel()
		if c.jsonOut {
			return printJSON(ctx, c, "/v1/savepoints", stdout)
		}
		var sps []savepointView
		if err := c.getJSON(ctx, "/v1/savepoints", &sps); err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tJOB\tCHECKPOINT\tCREATED\tKEYS\tSTATE BYTES\tLOCATION")
		for _, sp := range sps {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%s\n", sp.ID, sp.JobID, sp.CheckpointID, sp.CreatedAt, sp.Keys, sp.StateBytes, sp.Location)
		}
		return tw.Flush()
	case "delete":
		c, id, err := parseCLI("savepoint delete", "ID", args[1:], stderr, nil)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
		defer cancel()
		data, err := c.do(ctx, http.MethodDelete, "/v1/savepoints/"+url.PathEscape(id), nil)
		if err != nil {
			return err
		}
		if c.jsonOut {
			return writeJSON(stdout, data)
		}
		fmt.Fprintf(stdout, "savepoint %s deleted\n", id)
		return nil
	}
	fmt.Fprintf(stderr, "coordd savepoint: unknown command %q\n\n%s", args[0], savepointUsage)
	return errUsage
}

// lastLine passes writes on to w and keeps the last complete line (up to
// 64 KiB), so that a stream's final line can be checked after copying it.
type lastLine struct {
	w    io.Writer
	cur  []byte
	line []byte
}

func (l *lastLine) Write(p []byte) (int, error) {
	for _, b := range p {
		if b == '\n' {
			l.line, l.cur = append(l.line[:0], l.cur...), l.cur[:0]
		} else if len(l.cur) < 64<<10 {
			l.cur = append(l.cur, b)
		}
	}
	return l.w.Write(p)
}
