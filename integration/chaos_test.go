package integration

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// The chaos test: a wordcount job on a steady stream while a seeded random
// schedule SIGKILLs and restarts coordinators and workers, SIGSTOPs and
// SIGCONTs one process at a time, and (where network namespaces can be
// made) cuts a worker off from the coordinators for a few seconds. Every checkpoint seen during the chaos, and
// the final one, must hold exactly the counts of the records below its
// offsets (exactly once in state; docs/protocol.md, Checkpoints), and the job's exactly-once sink, read
// with kcat in read_committed mode, must show every word's counts 1, 2, ...,
// n once and in order.
//
// A failing run logs "chaos seed: N"; the same schedule of decisions runs
// again with
//
//	COORDFLOW_CHAOS_SEED=N go test ./integration -run TestChaos
//
// The decisions (which action, which process, how long) come from the seed;
// when an action is not allowed at its time (say, a coordinator kill while no
// leader is agreed), it is put off, so timing can still shift a replay.

const (
	chaosSeedEnv = "COORDFLOW_CHAOS_SEED"
	// chaosDuration is how long the schedule disturbs the cluster. With
	// start-up and the final catch-up the test takes about 100 s.
	chaosDuration = 90 * time.Second
	// chaosRate is the steady input, in records a second (about 6.5 words each).
	chaosRate = 1000
	// chaosCheckEvery is how often the newest completed checkpoint is checked
	// against the input below its offsets while the schedule runs.
	chaosCheckEvery = 1500 * time.Millisecond
)

// TestChaos is the chaos test of issue 3: see the top of this file.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test: about 100 s of real processes being killed; skipped with -short")
	}
	seed := chaosSeed(t)
	t.Logf("chaos seed: %d (replay: %s=%d go test ./integration -run TestChaos)", seed, chaosSeedEnv, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))

	const partitions = 4
	// With network namespaces the schedule also cuts a worker off from
	// the coordinators (a real partition: blackhole routes); without them
	// it kills and freezes only.
	var nw *testNet
	if why := netnsUnavailable(); why == "" {
		nw = newTestNet(t, "devkafka", "c1", "c2", "c3", "w1", "w2")
	} else {
		t.Logf("no network partitions in this run: %s", why)
	}
	c := startCluster(t, clusterOpts{coordinators: 3, workers: 2, topics: map[string]int32{"words": partitions, "counts": partitions}, net: nw})
	stream := chaosStartStream(t, c.brokers(), "words", partitions, seed, chaosRate)

	spec := chaosJobSpec{jobSpec: wordcountSpec(c.brokers(), "words")}
	// An exactly-once sink: its read_committed output is checked at the end.
	spec.Sink = &sinkSpec{Brokers: c.brokers(), Topic: "counts"}
	spec.Checkpoint.Interval = "300ms"
	// A short backoff cap and reset: the schedule fails the job every few
	// seconds, and with the default cap (30 s) the job would spend the
	// test waiting rather than running into the next failure.
	spec.Restart = &chaosRestartSpec{Initial: "100ms", Max: "2s", ResetAfter: "10s"}
	job := c.submitJob(t, spec)
	c.waitFor(t, 2*time.Minute, "a first completed checkpoint", func() (bool, error) {
		j, err := c.getJob(t, job)
		if err != nil {
			return false, err
		}
		return j.lastCheckpointID() > 0, fmt.Errorf("job is %s (attempt %d) %s", j.Status, j.Attempt, j.Reason)
	})

	ch := newChaos(t, c, seed, rng, job, stream)
	ch.net = nw
	ch.run(chaosDuration)
	stream.stop(t)
	ch.restoreAll()
	t.Logf("chaos over: %s", ch.summary())

	// Every process is back: one leader, both workers alive.
	c.leader(t)
	for _, w := range c.workers {
		c.waitFor(t, time.Minute, "coordinators to see worker "+w.id+" alive", func() (bool, error) {
			return c.memberStatusIs(w.id, "alive")
		})
	}

	end := topicEndOffsets(t, c.brokers(), "words")
	if n, want := sumOffsets(end), stream.produced(); n != want {
		t.Fatalf("words holds %d records, the producer had %d acknowledged", n, want)
	}
	stream.checkTopic(t, c.brokers())
	final := c.waitCaughtUp(t, 2*time.Minute, job, "words", end)
	for p, off := range end {
		if got := final.Offsets[fmt.Sprintf("words/%d", p)]; got != off {
			t.Errorf("checkpoint %d: offset of words/%d is %d, the partition ends at %d", final.CheckpointID, p, got, off)
		}
	}
	if diff := diffCounts(final.Keyed, stream.wantAll()); diff != "" {
		t.Fatalf("chaos seed %d: final checkpoint %d differs from the counts of the input:\n%s", seed, final.CheckpointID, diff)
	}
	j, err := c.getJob(t, job)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("final checkpoint %d holds the exact counts of %d records; job %s attempt %d; %d checkpoints checked during the chaos",
		final.CheckpointID, stream.produced(), j.Status, j.Attempt, ch.checked)
	scopes := map[string]int{}
	for _, r := range j.Recoveries {
		scopes[r.Scope]++
	}
	t.Logf("the job's last %d recoveries: %d task-scoped, %d job-scoped", len(j.Recoveries), scopes["tasks"], scopes["job"])

	got := c.waitOutput(t, "counts", true, stream.wantAll())
	if problems := exactlyOnceProblems(got, stream.wantAll()); len(problems) > 0 {
		t.Fatalf("chaos seed %d: the read_committed output is not exactly once (%d problems):\n%s", seed, len(problems), strings.Join(problems[:min(20, len(problems))], "\n"))
	}
	t.Logf("kcat read_committed shows every word's counts once and in order")

	c.waitFor(t, time.Minute, "every coordinator to hold the same FSM", c.sameFSM)
}

// chaosSeed returns the seed from COORDFLOW_CHAOS_SEED, or a new one.
func chaosSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv(chaosSeedEnv); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", chaosSeedEnv, s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

// chaosJobSpec adds the restart policy to the harness's job spec.
type chaosJobSpec struct {
	jobSpec
	Restart *chaosRestartSpec `json:"restart,omitempty"`
}

// chaosRestartSpec is the job spec's restart backoff (restart.* in docs/operations.md, Job spec).
type chaosRestartSpec struct {
	Initial    string `json:"initial"`
	Max        string `json:"max"`
	ResetAfter string `json:"reset_after"`
}

// ---- the schedule ----

// chaosState is what the schedule has done to a process.
type chaosState int

const (
	chaosUp     chaosState = iota
	chaosKilled            // SIGKILLed; restarted at until
	chaosFrozen            // SIGSTOPped; SIGCONT at until
	chaosCut               // cut off from the coordinators; healed at until
)

// chaosTarget is one coordd or workerd the schedule disturbs.
type chaosTarget struct {
	coordinator bool
	id          string
	state       chaosState
	until       time.Time
}

func (tg *chaosTarget) String() string {
	if tg.coordinator {
		return "coordd " + tg.id
	}
	return "workerd " + tg.id
}

// chaos runs the schedule against one cluster. All of it runs on the test's
// goroutine: there is no concurrent access to its fields or the cluster.
type chaos struct {
	t       *testing.T
	c       *cluster
	seed    uint64 // named in the schedule's failures
	rng     *rand.Rand
	job     string
	stream  *chaosStream
	start   time.Time
	targets []*chaosTarget
	net     *testNet // nil: no partitions
	cuts    int      // workers cut off from the coordinators

	kills, freezes map[string]int // by "coordd"/"workerd"
	checked        int            // checkpoints checked against the input
	lastChecked    uint64
	mismatches     int
}

func newChaos(t *testing.T, c *cluster, seed uint64, rng *rand.Rand, job string, stream *chaosStream) *chaos {
	ch := &chaos{t: t, c: c, seed: seed, rng: rng, job: job, stream: stream, kills: map[string]int{}, freezes: map[string]int{}}
	for _, cp := range c.coords {
		ch.targets = append(ch.targets, &chaosTarget{coordinator: true, id: cp.id})
	}
	for _, w := range c.workers {
		ch.targets = append(ch.targets, &chaosTarget{id: w.id})
	}
	return ch
}

func (ch *chaos) logf(format string, args ...any) {
	ch.t.Helper()
	ch.t.Logf("chaos +%5.1fs: %s", time.Since(ch.start).Seconds(), fmt.Sprintf(format, args...))
}

// run disturbs the cluster for d: an action every 1 to 3.5 s, processes
// brought back when their time is up, and the newest checkpoint checked
// against the input every chaosCheckEvery.
func (ch *chaos) run(d time.Duration) {
	ch.t.Helper()
	ch.start = time.Now()
	end := ch.start.Add(d)
	nextAction := ch.start.Add(ch.between(500*time.Millisecond, 1500*time.Millisecond))
	nextCheck := ch.start.Add(chaosCheckEvery)
	for now := time.Now(); now.Before(end); now = time.Now() {
		if err := ch.c.unexpectedExits(); err != nil {
			ch.t.Fatalf("chaos seed %d, +%.1fs: a process crashed: %v", ch.seed, time.Since(ch.start).Seconds(), err)
		}
		for _, tg := range ch.targets {
			if tg.state != chaosUp && !now.Before(tg.until) {
				ch.bringBack(tg)
			}
		}
		if !now.Before(nextCheck) {
			ch.checkNewestCheckpoint()
			nextCheck = time.Now().Add(chaosCheckEvery)
		}
		if !now.Before(nextAction) {
			if ch.act() {
				nextAction = time.Now().Add(ch.between(time.Second, 3500*time.Millisecond))
			} else {
				nextAction = time.Now().Add(200 * time.Millisecond) // not allowed now: try again soon
			}
		}
		wake := min(time.Until(end), time.Until(nextAction), time.Until(nextCheck))
		for _, tg := range ch.targets {
			if tg.state != chaosUp {
				wake = min(wake, time.Until(tg.until))
			}
		}
		time.Sleep(wake) // the schedule's clock, not a synchronization
	}
}

// between returns a random duration in [lo, hi).
func (ch *chaos) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(ch.rng.Int64N(int64(hi-lo)))
}

// act draws one action and does it if the rules allow it now: at most one
// coordinator down or frozen, and the others agreeing on a leader before one
// is disturbed; at least one worker up and running. It reports whether it
// acted.
func (ch *chaos) act() bool {
	ch.t.Helper()
	var coords, workers []*chaosTarget
	for _, tg := range ch.targets {
		if tg.coordinator {
			coords = append(coords, tg)
		} else {
			workers = append(workers, tg)
		}
	}
	allUp := func(ts []*chaosTarget) bool {
		return !slices.ContainsFunc(ts, func(tg *chaosTarget) bool { return tg.state != chaosUp })
	}
	switch r := ch.rng.IntN(20); {
	case r < 7: // kill a coordinator: the leader half of the time
		if !allUp(coords) {
			return false
		}
		leader, err := ch.leader()
		if err != nil {
			return false
		}
		victim := coords[ch.rng.IntN(len(coords))]
		if i := slices.IndexFunc(coords, func(tg *chaosTarget) bool { return tg.id == leader }); ch.rng.IntN(2) == 0 && i >= 0 {
			victim = coords[i]
		}
		ch.kill(victim, ch.between(500*time.Millisecond, 4*time.Second), victim.id == leader)
	case r < 14: // kill a worker
		if !allUp(workers) {
			return false
		}
		ch.kill(workers[ch.rng.IntN(len(workers))], ch.between(300*time.Millisecond, 4*time.Second), false)
	case r >= 18 && ch.net != nil: // cut a worker off from the coordinators
		if !allUp(workers) || !allUp(coords) {
			return false
		}
		tg := workers[ch.rng.IntN(len(workers))]
		d := ch.between(time.Second, 4*time.Second)
		ch.net.cutRoutes(ch.t, []string{tg.id}, []string{"c1", "c2", "c3"})
		tg.state, tg.until = chaosCut, time.Now().Add(d)
		ch.cuts++
		ch.logf("cut %s off from the coordinators for %v", tg, d.Round(time.Millisecond))
	default: // freeze any one coordinator or worker
		tg := ch.targets[ch.rng.IntN(len(ch.targets))]
		if tg.coordinator {
			if !allUp(coords) {
				return false
			}
			if _, err := ch.leader(); err != nil {
				return false
			}
		} else if !allUp(workers) {
			return false
		}
		ch.freeze(tg, ch.between(500*time.Millisecond, 3*time.Second))
	}
	return true
}

func (ch *chaos) kill(tg *chaosTarget, down time.Duration, leader bool) {
	ch.t.Helper()
	p := ch.proc(tg)
	if err := p.signal(syscall.SIGKILL, stopTimeout); err != nil {
		ch.t.Fatal(err)
	}
	tg.state, tg.until = chaosKilled, time.Now().Add(down)
	role := ""
	if leader {
		role = " (the leader)"
	}
	ch.kills[strings.Fields(tg.String())[0]]++
	ch.logf("SIGKILL %s%s; restart in %v", tg, role, down.Round(time.Millisecond))
}

func (ch *chaos) freeze(tg *chaosTarget, d time.Duration) {
	ch.t.Helper()
	if err := chaosSignalGroup(ch.proc(tg), syscall.SIGSTOP); err != nil {
		ch.t.Fatal(err)
	}
	tg.state, tg.until = chaosFrozen, time.Now().Add(d)
	ch.freezes[strings.Fields(tg.String())[0]]++
	ch.logf("SIGSTOP %s for %v", tg, d.Round(time.Millisecond))
}

// bringBack restarts a killed process or resumes a frozen one.
func (ch *chaos) bringBack(tg *chaosTarget) {
	ch.t.Helper()
	switch tg.state {
	case chaosKilled:
		if tg.coordinator {
			ch.c.restartCoordinator(ch.t, tg.id)
		} else {
			ch.c.chaosRestartWorker(ch.t, tg.id)
		}
		ch.logf("restarted %s", tg)
	case chaosFrozen:
		if err := chaosSignalGroup(ch.proc(tg), syscall.SIGCONT); err != nil {
			ch.t.Fatal(err)
		}
		ch.logf("SIGCONT %s", tg)
	case chaosCut:
		ch.net.healRoutes(ch.t) // at most one cut at a time
		ch.logf("healed the network of %s", tg)
	}
	tg.state = chaosUp
}

// restoreAll brings back every disturbed process at once.
func (ch *chaos) restoreAll() {
	ch.t.Helper()
	for _, tg := range ch.targets {
		if tg.state != chaosUp {
			ch.bringBack(tg)
		}
	}
}

func (ch *chaos) proc(tg *chaosTarget) *proc {
	ch.t.Helper()
	if tg.coordinator {
		return ch.c.coordinator(ch.t, tg.id).p
	}
	return ch.c.worker(ch.t, tg.id).p
}

// responsive returns the coordinators that are neither killed nor frozen.
func (ch *chaos) responsive() []*coordProc {
	var out []*coordProc
	for _, tg := range ch.targets {
		if tg.coordinator && tg.state == chaosUp {
			out = append(out, ch.c.coordinator(ch.t, tg.id))
		}
	}
	return out
}

// leader returns the leader every responsive coordinator names, or why
// there is none they agree on. Unlike cluster.leader it never asks a
// frozen process, and never waits.
func (ch *chaos) leader() (string, error) {
	var id string
	for _, cp := range ch.responsive() {
		st, err := ch.c.status(cp)
		if err != nil {
			return "", err
		}
		if st.LeaderID == "" || (id != "" && st.LeaderID != id) {
			return "", fmt.Errorf("%s names leader %q, another %q", cp.id, st.LeaderID, id)
		}
		id = st.LeaderID
		if st.ID == id && st.State != "Leader" {
			return "", fmt.Errorf("%s is named leader but is %s", cp.id, st.State)
		}
	}
	if id == "" {
		return "", errors.New("no responsive coordinator")
	}
	return id, nil
}

// checkNewestCheckpoint reads the job's newest completed checkpoint from a
// responsive coordinator and, if it is one not yet checked, compares its
// keyed state with the counts of the input below its offsets. A mismatch
// fails the test but the schedule goes on, so that the log shows whether
// later checkpoints repeat it.
func (ch *chaos) checkNewestCheckpoint() {
	ch.t.Helper()
	live := ch.responsive()
	if len(live) == 0 {
		return
	}
	var st stateView
	if err := ch.c.call("GET", live[ch.rng.IntN(len(live))].httpAddr, "/v1/jobs/"+ch.job+"/state", nil, &st); err != nil {
		ch.logf("newest checkpoint not read: %v", err)
		return
	}
	if st.CheckpointID <= ch.lastChecked {
		return
	}
	want, err := ch.stream.wantAt(st.Offsets)
	if err != nil {
		ch.logf("checkpoint %d not checked: %v", st.CheckpointID, err)
		return
	}
	ch.lastChecked = st.CheckpointID
	ch.checked++
	if diff := diffCounts(st.Keyed, want); diff != "" {
		ch.mismatches++
		ch.t.Errorf("chaos seed %d, +%.1fs: checkpoint %d (offsets %v) differs from the counts of the input below its offsets:\n%s",
			ch.seed, time.Since(ch.start).Seconds(), st.CheckpointID, st.Offsets, diff)
	}
}

func (ch *chaos) summary() string {
	return fmt.Sprintf("coordd killed %d, frozen %d; workerd killed %d, frozen %d, cut off %d; %d checkpoints checked, %d wrong",
		ch.kills["coordd"], ch.freezes["coordd"], ch.kills["workerd"], ch.freezes["workerd"], ch.cuts, ch.checked, ch.mismatches)
}

// chaosSignalGroup sends sig to p's process group without marking p as
// stopped by the harness (a frozen process is still expected to live).
func chaosSignalGroup(p *proc, sig syscall.Signal) error {
	if p.hasExited() {
		return fmt.Errorf("%s: send %v: it has exited", p.name, sig)
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("%s: send %v: %w", p.name, sig, err)
	}
	return nil
}

// chaosRestartWorker starts a killed worker again with its id, addresses and
// flags of its previous run, and waits until it serves its metrics. It does
// not wait for the coordinators to see it: one of them may be frozen.
func (c *cluster) chaosRestartWorker(t *testing.T, id string) {
	t.Helper()
	w := c.worker(t, id)
	if !w.p.hasExited() {
		t.Fatalf("restart workerd %s: it is still running", id)
	}
	// The same addresses and data dir; launch puts the command under the
	// worker's network namespace when the cluster has a network.
	w.p = c.launch(t, "workerd "+id, "workerd-"+id+".log", nil,
		func() []string { return c.workerArgs(w) },
		func(*proc) (bool, error) {
			_, err := c.workerMetrics(w)
			return err == nil, err
		})
}

// ---- the input ----

// chaosStream produces wordcount lines to a topic at a steady rate until it
// is stopped, and remembers every record the broker acknowledged, by
// partition in offset order, so that the expected counts below any
// checkpoint's offsets can be computed. Record i goes to partition i mod P.
type chaosStream struct {
	topic      string
	partitions int32
	corpus     *corpus // used by the producing goroutine only

	mu    sync.Mutex
	lines [][]string // by partition, in offset order

	cancel context.CancelFunc
	done   chan struct{}
	err    error // set before done is closed
}

// chaosStartStream starts producing perSecond records a second. The
// producer stops when the test ends, if stop was not called before.
func chaosStartStream(t *testing.T, brokers []string, topic string, partitions int32, seed uint64, perSecond int) *chaosStream {
	t.Helper()
	cfg := saramaConfig()
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Idempotent = true
	cfg.Net.MaxOpenRequests = 1
	cfg.Producer.Return.Successes = true
	cfg.Producer.Flush.Frequency = 5 * time.Millisecond
	cfg.Producer.Partitioner = func(string) sarama.Partitioner {
		return recordPartitioner{hash: sarama.NewHashPartitioner("")}
	}
	p, err := sarama.NewSyncProducer(brokers, cfg)
	if err != nil {
		t.Fatalf("stream to %s: new producer: %v", topic, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &chaosStream{
		topic: topic, partitions: partitions, corpus: newCorpus(seed),
		lines: make([][]string, partitions), cancel: cancel, done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		s.err = s.run(ctx, p, perSecond)
		if err := p.Close(); err != nil && s.err == nil {
			s.err = fmt.Errorf("stream to %s: close producer: %w", topic, err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-s.done
	})
	return s
}

// run sends a chunk of records every 50 ms. A failed send ends it: the
// broker is never disturbed, so an error is a test failure, and a partly
// written chunk would leave the expected counts unknown.
func (s *chaosStream) run(ctx context.Context, p sarama.SyncProducer, perSecond int) error {
	const tick = 50 * time.Millisecond
	chunk := max(1, perSecond*int(tick/time.Millisecond)/1000)
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	msgs := make([]*sarama.ProducerMessage, chunk)
	lines := make([]string, chunk)
	for n := 0; ; {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
		for i := range chunk {
			lines[i] = s.corpus.line()
			msgs[i] = &sarama.ProducerMessage{Topic: s.topic, Partition: int32(n % int(s.partitions)), Value: sarama.StringEncoder(lines[i])}
			n++
		}
		if err := p.SendMessages(msgs); err != nil {
			return fmt.Errorf("stream to %s: after %d records: %w", s.topic, s.produced(), err)
		}
		s.mu.Lock()
		for i, m := range msgs {
			s.lines[m.Partition] = append(s.lines[m.Partition], lines[i])
		}
		s.mu.Unlock()
	}
}

// stop ends the stream after the chunk in flight and fails the test if
// producing failed.
func (s *chaosStream) stop(t *testing.T) {
	t.Helper()
	s.cancel()
	select {
	case <-s.done:
	case <-time.After(stopTimeout):
		t.Fatalf("stream to %s: producer did not stop within %v", s.topic, stopTimeout)
	}
	if s.err != nil {
		t.Fatal(s.err)
	}
}

// produced is the number of records the broker has acknowledged.
func (s *chaosStream) produced() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, l := range s.lines {
		n += int64(len(l))
	}
	return n
}

// wantAt returns the word counts of the records below offsets (keyed
// "topic/partition", as GET /v1/jobs/{id}/state shows them; a partition
// without an offset has had nothing read). It fails for an offset beyond
// what the broker has acknowledged so far.
func (s *chaosStream) wantAt(offsets map[string]int64) (map[string]int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	want := map[string]int64{}
	for p := range s.partitions {
		off := offsets[fmt.Sprintf("%s/%d", s.topic, p)]
		if off < 0 || off > int64(len(s.lines[p])) {
			return nil, fmt.Errorf("offset %d of %s/%d: %d records acknowledged there", off, s.topic, p, len(s.lines[p]))
		}
		for _, line := range s.lines[p][:off] {
			for _, w := range strings.Fields(line) {
				want[w]++
			}
		}
	}
	return want, nil
}

// wantAll returns the word counts of every acknowledged record.
func (s *chaosStream) wantAll() map[string]int64 {
	s.mu.Lock()
	ends := make(map[string]int64, s.partitions)
	for p, l := range s.lines {
		ends[fmt.Sprintf("%s/%d", s.topic, p)] = int64(len(l))
	}
	s.mu.Unlock()
	want, _ := s.wantAt(ends) // cannot fail: the offsets are the acknowledged ends
	return want
}

// checkTopic fails the test unless the topic holds exactly the acknowledged
// records, partition by partition in order: what wantAt relies on.
func (s *chaosStream) checkTopic(t *testing.T, brokers []string) {
	t.Helper()
	got := readTopic(t, brokers, s.topic)
	s.mu.Lock()
	defer s.mu.Unlock()
	for p := range s.partitions {
		if !slices.Equal(got[p], s.lines[p]) {
			t.Fatalf("%s/%d holds %d records, not the %d acknowledged ones in order", s.topic, p, len(got[p]), len(s.lines[p]))
		}
	}
	if extra := slices.DeleteFunc(slices.Collect(maps.Keys(got)), func(p int32) bool { return p < s.partitions }); len(extra) > 0 {
		t.Fatalf("%s has partitions %v beyond the %d produced to", s.topic, extra, s.partitions)
	}
}
