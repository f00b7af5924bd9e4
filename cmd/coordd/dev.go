package main

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/IBM/sarama"

	"github.com/coordflow/coordflow/cmd/internal/devbroker"
	"github.com/coordflow/coordflow/cmd/internal/version"
	"github.com/coordflow/coordflow/coordinator"
	"github.com/coordflow/coordflow/transport/tlsutil"
	"github.com/coordflow/coordflow/worker"
	"github.com/coordflow/coordflow/worker/operator"
)

// devPorts are the addresses of one `coordd dev` cluster. The defaults are the
// user contract's, so that the CLI's default -addr reaches coordinator c1.
type devPorts struct {
	broker                   string
	raft, rpc, http, gossip  [3]string
	workerData, workerGossip [2]string
}

func contractPorts() devPorts {
	p := devPorts{broker: "127.0.0.1:9092"}
	for i := range 3 {
		p.raft[i] = fmt.Sprintf("127.0.0.1:%d", 7001+i)
		p.rpc[i] = fmt.Sprintf("127.0.0.1:%d", 7101+i)
		p.http[i] = fmt.Sprintf("127.0.0.1:%d", 7201+i)
		p.gossip[i] = fmt.Sprintf("127.0.0.1:%d", 7301+i)
	}
	for i := range 2 {
		p.workerData[i] = fmt.Sprintf("127.0.0.1:%d", 7401+i)
		p.workerGossip[i] = fmt.Sprintf("127.0.0.1:%d", 7501+i)
	}
	return p
}

// devPortsFile is where a data dir keeps the addresses -free-ports chose
// for it: Raft remembers its peers by address, so a later run on the same
// data dir must bind the same ones.
const devPortsFile = "dev-ports.json"

// devPortsJSON is devPorts as devPortsFile holds it.
type devPortsJSON struct {
	Broker       string    `json:"broker"`
	Raft         [3]string `json:"raft"`
	RPC          [3]string `json:"rpc"`
	HTTP         [3]string `json:"http"`
	Gossip       [3]string `json:"gossip"`
	WorkerData   [2]string `json:"worker_data"`
	WorkerGossip [2]string `json:"worker_gossip"`
}

// freePorts returns the addresses -free-ports uses in data dir dir: those
// an earlier run chose, or free ports on 127.0.0.1 picked now. save writes
// them to the data dir; call it once the cluster has bound them.
func freePorts(dir string) (p devPorts, save func() error, err error) {
	path := filepath.Join(dir, devPortsFile)
	if b, err := os.ReadFile(path); err == nil {
		var j devPortsJSON
		if err := json.Unmarshal(b, &j); err != nil {
			return p, nil, fmt.Errorf("read the ports of an earlier -free-ports run from %s: %w", path, err)
		}
		p = devPorts{broker: j.Broker, raft: j.Raft, rpc: j.RPC, http: j.HTTP, gossip: j.Gossip, workerData: j.WorkerData, workerGossip: j.WorkerGossip}
		return p, func() error { return nil }, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return p, nil, fmt.Errorf("read %s: %w", path, err)
	}
	// Every listener open until all are picked, so that no two are alike.
	var open []net.Listener
	defer func() {
		for _, l := range open {
			l.Close()
		}
	}()
	pick := func(dst *string) {
		if err != nil {
			return
		}
		var l net.Listener
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			err = fmt.Errorf("pick a free port: %w", err)
			return
		}
		open = append(open, l)
		*dst = l.Addr().String()
	}
	pick(&p.broker)
	for i := range 3 {
		pick(&p.raft[i])
		pick(&p.rpc[i])
		pick(&p.http[i])
		pick(&p.gossip[i])
	}
	for i := range 2 {
		pick(&p.workerData[i])
		pick(&p.workerGossip[i])
	}
	if err != nil {
		return p, nil, err
	}
	save = func() error {
		j := devPortsJSON{Broker: p.broker, Raft: p.raft, RPC: p.rpc, HTTP: p.http, Gossip: p.gossip, WorkerData: p.workerData, WorkerGossip: p.workerGossip}
		b, err := json.MarshalIndent(j, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("keep the ports of this -free-ports run: %w", err)
		}
		return nil
	}
	return p, save, nil
}

// devOptions are the flags of `coordd dev`.
type devOptions struct {
	dataDir   string
	logLevel  slog.Level
	rate      int // sample records produced per second
	freePorts bool
	// secure runs the cluster with TLS, gossip encryption and an API token.
	secure bool
	out    io.Writer
	// ready, if set, is called once the sample job runs, with a client of
	// c1's HTTP API and the job id (tests).
	ready func(api *devAPI, jobID string)
	// slowGossip gives every node memberlist's LAN timings (1 s probes,
	// 500 ms probe timeout) instead of coordflow's fast ones: tests built
	// with the race detector run the whole cluster in one process, slowly
	// enough that 100 ms probes declare live workers dead.
	slowGossip bool
}

// applyGossipTimings sets memberlist's LAN timings if o asks for them.
func (o devOptions) applyGossipTimings(interval, timeout *time.Duration) {
	if o.slowGossip {
		*interval, *timeout = time.Second, 500*time.Millisecond
	}
}

func runDev(args []string) error {
	fs := flag.NewFlagSet("coordd dev", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "directory for Raft and broker data (default: a new temporary directory, removed on exit); with -free-ports it keeps the ports chosen, which later runs on it reuse")
	logLevel := fs.String("log-level", "warn", "log level of the embedded nodes: debug, info, warn or error")
	rate := fs.Int("rate", 200, "sample records produced per second")
	free := fs.Bool("free-ports", false, "bind every listener to a free port instead of the default 7001-7503 and 9092")
	secure := fs.Bool("secure", false, "generate a CA, certificates, a gossip key and an operator token in the data dir and run everything with them (docs/security.md)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	if *rate < 1 {
		return errors.New("-rate must be at least 1")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return dev(ctx, devOptions{dataDir: *dataDir, logLevel: level, rate: *rate, freePorts: *free, secure: *secure, out: os.Stdout})
}

// dev runs the whole system in one process until ctx ends: an embedded broker,
// three coordinators, two workers, a sample wordcount job and a producer of
// sample text. It prints where to look and the progress of checkpoints.
func dev(ctx context.Context, o devOptions) (err error) {
	dir := o.dataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "coordflow-dev-"); err != nil {
			return fmt.Errorf("create data dir: %w", err)
		}
		defer os.RemoveAll(dir)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	ports, savePorts := contractPorts(), func() error { return nil }
	if o.freePorts {
		if ports, savePorts, err = freePorts(dir); err != nil {
			return err
		}
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: o.logLevel}))
	var sec *devSecurity
	if o.secure {
		if sec, err = newDevSecurity(dir); err != nil {
			return err
		}
	}

	broker, err := devbroker.Start(ctx, devbroker.Config{
		Addr:    ports.broker,
		Topics:  map[string]int32{"words": 4, "counts": 4},
		DataDir: filepath.Join(dir, "kafka"),
		Logger:  logger.With("component", "devkafka"),
	})
	if err != nil {
		return fmt.Errorf("start embedded broker (use -free-ports if %s is taken): %w", ports.broker, err)
	}
	defer broker.Close()

	var coords []*coordinator.Server
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		for _, c := range coords {
			if serr := c.Shutdown(sctx); serr != nil {
				logger.Warn("coordinator shutdown", "node", c.ID(), "err", serr)
			}
		}
	}()
	var join []string
	for i := range 3 {
		cfg := coordinator.DefaultConfig()
		cfg.Version = version.String()
		cfg.ID = fmt.Sprintf("c%d", i+1)
		cfg.DataDir = filepath.Join(dir, cfg.ID)
		cfg.RaftAddr, cfg.RPCAddr, cfg.HTTPAddr, cfg.GossipAddr = ports.raft[i], ports.rpc[i], ports.http[i], ports.gossip[i]
		cfg.BootstrapExpect = 3
		cfg.Join = join
		o.applyGossipTimings(&cfg.ProbeInterval, &cfg.ProbeTimeout)
		// Checkpoint files go to a directory every node of this process sees,
		// as a shared file system or an object store would in production.
		cfg.CheckpointStorage = "file://" + filepath.Join(dir, "checkpoints")
		cfg.Operators = operator.Builtins().Names()
		cfg.Logger = logger.With("component", "coordd")
		if sec != nil {
			if cfg.TLS, err = sec.issue(tlsutil.RoleCoordinator, cfg.ID); err != nil {
				return err
			}
			cfg.GossipKeys = [][]byte{sec.gossipKey}
			cfg.ACLTokensFile = sec.tokensFile
		}
		c, err := coordinator.NewServer(cfg)
		if err != nil {
			return fmt.Errorf("start coordinator %s: %w", cfg.ID, err)
		}
		coords = append(coords, c)
		join = append(join, c.GossipAddr())
	}

	// Workers run until workerCtx ends; they stop before the coordinators.
	workerCtx, stopWorkers := context.WithCancel(context.Background())
	workersDone := make(chan error, 2)
	defer func() {
		stopWorkers()
		for range 2 {
			<-workersDone
		}
	}()
	for i := range 2 {
		cfg := worker.DefaultConfig()
		cfg.ID = fmt.Sprintf("w%d", i+1)
		cfg.DataAddr, cfg.GossipAddr = ports.workerData[i], ports.workerGossip[i]
		cfg.Join = join
		cfg.Slots = 4
		o.applyGossipTimings(&cfg.ProbeInterval, &cfg.ProbeTimeout)
		cfg.StateDir = filepath.Join(dir, cfg.ID, "state")
		cfg.Logger = logger.With("component", "workerd")
		if sec != nil {
			if cfg.TLS, err = sec.issue(tlsutil.RoleWorker, cfg.ID); err != nil {
				workersDone <- nil
				if i == 0 {
					workersDone <- nil
				}
				return err
			}
			cfg.GossipKeys = [][]byte{sec.gossipKey}
		}
		w, err := worker.New(cfg)
		if err != nil {
			workersDone <- nil
			if i == 0 {
				workersDone <- nil
			}
			return fmt.Errorf("start worker %s: %w", cfg.ID, err)
		}
		go func() { workersDone <- w.Run(workerCtx) }()
	}

	// Every listener is bound: a later run on this data dir may reuse them.
	if err := savePorts(); err != nil {
		return err
	}
	api := &devAPI{base: "http://" + coords[0].HTTPAddr(), client: http.DefaultClient}
	if sec != nil {
		if api.client, err = sec.httpClient(); err != nil {
			return err
		}
		api.base, api.token = "https://"+coords[0].HTTPAddr(), sec.token
	}
	fmt.Fprintf(o.out, "coordflow dev cluster\n  HTTP API:   %s (also %s, %s)\n  dashboard:  %s/ui/\n  broker:     %s (topics words, counts)\n  data:       %s\n",
		api.base, coords[1].HTTPAddr(), coords[2].HTTPAddr(), api.base, broker.Addr(), dir)
	if sec != nil {
		fmt.Fprintf(o.out, "  secure:     mutual TLS (CA %s), encrypted gossip, API token %q\n  CLI:        export COORD_ADDR=%s COORD_CACERT=%s COORD_TOKEN=%s\n",
			sec.caFile(), devTokenName, api.base, sec.caFile(), sec.token)
	}
	if !o.freePorts {
		fmt.Fprintf(o.out, "  try:        go run ./cmd/coordd job list; go run ./cmd/coordd raft peers\n")
	}

	jobID, err := submitSampleJob(ctx, api, broker.Addr())
	if err != nil {
		return err
	}
	fmt.Fprintf(o.out, "  sample job: %s (wordcount over topic words, exactly-once sink counts)\n", jobID)
	fmt.Fprintf(o.out, "  output:     kcat -b %s -C -t counts -X isolation.level=read_committed -f '%%k %%s\\n'\n  press Ctrl-C to stop\n\n", broker.Addr())
	if o.ready != nil {
		o.ready(api, jobID)
	}

	prodDone := make(chan error, 1)
	go func() { prodDone <- produceSample(ctx, broker.Addr(), o.rate) }()
	reportProgress(ctx, o.out, api, jobID)
	if perr := <-prodDone; perr != nil && !errors.Is(perr, context.Canceled) {
		fmt.Fprintf(o.out, "sample producer stopped: %v\n", perr)
	}
	fmt.Fprintln(o.out, "stopping")
	return nil
}

// submitSampleJob posts the sample wordcount job, sending it again until the
// cluster has elected a leader. Every attempt carries the same idempotency
// key: one whose outcome was unknown (504, 502) and is sent again registers
// no second job.
func submitSampleJob(ctx context.Context, api *devAPI, broker string) (string, error) {
	spec := fmt.Sprintf(`{
  "name": "wordcount",
  "source": {"brokers": [%q], "topic": "words", "start": "earliest", "parallelism": 2},
  "operator": {"name": "wordcount", "parallelism": 2, "max_parallelism": 128},
  "sink": {"brokers": [%q], "topic": "counts"},
  "checkpoint": {"interval": "1s", "timeout": "30s", "min_pause": "0s", "retained": 3, "tolerable_failures": 3}
}`, broker, broker)
	key := crand.Text()
	deadline := time.Now().Add(30 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, api.base+"/v1/jobs", strings.NewReader(spec))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set(coordinator.SubmissionKeyHeader, key)
		resp, err := api.do(req)
		if err == nil {
			var body struct {
				ID    string `json:"id"`
				Error string `json:"error"`
			}
			derr := json.NewDecoder(resp.Body).Decode(&body)
			resp.Body.Close()
			switch {
			case (resp.StatusCode == http.StatusCreated || resp.StatusCode == http.StatusOK) && derr == nil && body.ID != "":
				return body.ID, nil
			case resp.StatusCode < 500:
				return "", fmt.Errorf("submit sample job: %s: %s", resp.Status, body.Error)
			}
			err = fmt.Errorf("%s: %s", resp.Status, body.Error)
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return "", fmt.Errorf("submit sample job: no leader after 30s: %w", lastErr)
}

// sampleText is the text the dev producer sends, one line per record.
var sampleText = strings.Split(`the quick brown fox jumps over the lazy dog
a stream of records flows from kafka through the source into the map
every checkpoint is a barrier that travels with the records
the leader commits the checkpoint when every task has acked
kill a worker and the job restarts from the last checkpoint
kill the leader and a new leader carries on with higher ids
nothing is lost and nothing is counted twice`, "\n")

// produceSample writes sample lines to the words topic at about rate records
// per second until ctx ends.
func produceSample(ctx context.Context, broker string, rate int) error {
	cfg := sarama.NewConfig()
	cfg.Producer.Return.Successes = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Net.DialTimeout = 5 * time.Second
	p, err := sarama.NewSyncProducer([]string{broker}, cfg)
	if err != nil {
		return fmt.Errorf("sample producer: %w", err)
	}
	defer p.Close()
	const batchesPerSecond = 10
	perBatch := max(1, rate/batchesPerSecond)
	tick := time.NewTicker(time.Second / batchesPerSecond)
	defer tick.Stop()
	rng := rand.New(rand.NewPCG(1, 2))
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		msgs := make([]*sarama.ProducerMessage, perBatch)
		for i := range msgs {
			line := sampleText[rng.IntN(len(sampleText))]
			msgs[i] = &sarama.ProducerMessage{Topic: "words", Key: sarama.StringEncoder(fmt.Sprint(rng.IntN(1000))), Value: sarama.StringEncoder(line)}
		}
		if err := p.SendMessages(msgs); err != nil {
			return fmt.Errorf("sample producer: %w", err)
		}
	}
}

// reportProgress prints one line per newly completed checkpoint until ctx ends.
func reportProgress(ctx context.Context, out io.Writer, api *devAPI, jobID string) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var last uint64
	lastStatus := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var job struct {
			Status         string `json:"status"`
			Reason         string `json:"reason"`
			Attempt        uint64 `json:"attempt"`
			LastCheckpoint *struct {
				ID uint64 `json:"id"`
			} `json:"last_checkpoint"`
		}
		if err := api.getJSON(ctx, "/v1/jobs/"+jobID, &job); err != nil {
			continue
		}
		if s := job.Status + job.Reason; s != lastStatus {
			lastStatus = s
			fmt.Fprintf(out, "job %s: %s (attempt %d) %s\n", jobID, job.Status, job.Attempt, job.Reason)
		}
		if job.LastCheckpoint == nil || job.LastCheckpoint.ID == last {
			continue
		}
		last = job.LastCheckpoint.ID
		var state struct {
			Offsets map[string]int64 `json:"offsets"`
			Keyed   map[string]int64 `json:"keyed"`
		}
		if err := api.getJSON(ctx, "/v1/jobs/"+jobID+"/state", &state); err != nil {
			continue
		}
		var records int64
		for _, o := range state.Offsets {
			records += o
		}
		fmt.Fprintf(out, "checkpoint %d completed: %d records read, %d distinct words, \"the\"=%d\n",
			last, records, len(state.Keyed), state.Keyed["the"])
	}
}

// getJSON decodes the answer to GET path into v.
func (a *devAPI) getJSON(ctx context.Context, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	url := a.base + path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := a.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return &devHTTPError{status: resp.StatusCode, msg: fmt.Sprintf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body))}
	}
	return json.Unmarshal(body, v)
}

// devHTTPError is an answer other than 200 OK.
type devHTTPError struct {
	status int
	msg    string
}

func (e *devHTTPError) Error() string { return e.msg }
