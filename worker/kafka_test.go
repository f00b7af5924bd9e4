package worker

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/IBM/sarama"
)

// TestKafkaPoolSharesClients: source tasks of one worker share one client per
// broker set; two tasks may read the same partition (on two consumers of that
// client) and both see every record; completed checkpoints' offsets go out
// in one commit per group; the last release closes the client.
func TestKafkaPoolSharesClients(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 2})
	var recs []record
	for i := range 10 {
		recs = append(recs, record{partition: int32(i % 2), value: fmt.Sprint(i)})
	}
	produce(t, brokers, "words", recs)
	cfg := defaultedConfig(t, Config{ID: "w1", DataAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", KafkaTimeout: 2 * time.Second, OffsetCommitInterval: time.Hour, StateDir: t.TempDir()})
	m := newMetrics()
	pool := newKafkaPool(&cfg, "w1", testLogger(t), m)

	a, parts, err := pool.acquire(brokers, sarama.ReadUncommitted, "words", "source")
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 2 {
		t.Fatalf("partitions %v, want 2", parts)
	}
	b, _, err := pool.acquire([]string{brokers[0], brokers[0]}, sarama.ReadUncommitted, "words", "source") // same set, written otherwise
	if err != nil {
		t.Fatal(err)
	}
	if a.client != b.client || len(pool.clients) != 1 {
		t.Fatalf("two leases of one broker set got %d clients", len(pool.clients))
	}
	if _, _, err := pool.acquire(brokers, sarama.ReadUncommitted, "nope", "source"); err == nil || !strings.Contains(err.Error(), `source topic "nope" does not exist`) {
		t.Fatalf("missing topic: %v", err)
	}
	if refs := pool.clients[clientKey(brokers, sarama.ReadUncommitted)].refs; refs != 2 {
		t.Fatalf("refs %d after a failed acquire, want 2", refs)
	}
	// A source reading committed gets a client of its own: sarama's
	// consumers read at their client's isolation level.
	rc, _, err := pool.acquire(brokers, sarama.ReadCommitted, "words", "source")
	if err != nil {
		t.Fatal(err)
	}
	if rc.client == a.client || len(pool.clients) != 2 {
		t.Fatalf("a lease reading committed shares the client reading uncommitted (%d clients)", len(pool.clients))
	}
	if got := rc.client.Config().Consumer.IsolationLevel; got != sarama.ReadCommitted {
		t.Fatalf("the client reading committed has isolation level %d", got)
	}
	if got := a.client.Config().Consumer.IsolationLevel; got != sarama.ReadUncommitted {
		t.Fatalf("the client reading uncommitted has isolation level %d", got)
	}
	rc.release()
	if !pool.wait(waitTimeout) || len(pool.clients) != 1 {
		t.Fatalf("%d clients after the lease reading committed was released, want 1", len(pool.clients))
	}

	// Both leases read partition 0 from the start: two consumers, one client.
	for _, l := range []*kafkaLease{a, b} {
		pc, closePC, err := l.consume("words", 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		for want := 0; want < 10; want += 2 {
			select {
			case msg := <-pc.Messages():
				if string(msg.Value) != fmt.Sprint(want) {
					t.Fatalf("read %q, want %d", msg.Value, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("no record %d within 10s", want)
			}
		}
		defer closePC()
	}
	if n := len(a.kc.consumers); n != 2 {
		t.Fatalf("%d consumers for two readers of one partition, want 2", n)
	}

	// Offsets of several checkpoints and tasks: the newest per partition,
	// one request per group.
	a.commit("g1", "words", 3, map[int32]int64{0: 4, 1: 3})
	b.commit("g1", "words", 5, map[int32]int64{0: 6})
	a.commit("g1", "words", 4, map[int32]int64{0: 5}) // older than 5: ignored for partition 0
	b.commit("g2", "words", 1, map[int32]int64{0: 1, 1: 1})
	a.kc.commitAll()
	if got, want := committedOffsets(t, brokers, "g1", "words", 2), map[int32]int64{0: 6, 1: 3}; !reflect.DeepEqual(got, want) {
		t.Errorf("g1 committed %v, want %v", got, want)
	}
	if got, want := committedOffsets(t, brokers, "g2", "words", 2), map[int32]int64{0: 1, 1: 1}; !reflect.DeepEqual(got, want) {
		t.Errorf("g2 committed %v, want %v", got, want)
	}
	if n := metricValue(t, m.registry, "coordflow_kafka_offset_commits_total", map[string]string{"result": "ok"}); n != 2 {
		t.Errorf("%v offset commit requests, want 2 (one per group)", n)
	}

	a.release()
	if len(pool.clients) != 1 {
		t.Fatal("client closed while a lease holds it")
	}
	b.commit("g3", "words", 6, map[int32]int64{0: 7})
	b.release()
	if len(pool.clients) != 0 {
		t.Fatal("client kept after the last release")
	}
	// The last release's commit and close run in the background.
	if !pool.wait(time.Minute) {
		t.Fatal("the released client did not close within a minute")
	}
	if got, want := committedOffsets(t, brokers, "g3", "words", 2), map[int32]int64{0: 7}; !reflect.DeepEqual(got, want) {
		t.Errorf("g3 committed %v at the last release, want %v", got, want)
	}
}

// TestKafkaPoolReleaseDoesNotWaitForAHungBroker: the last release of a
// client whose broker takes requests but answers none returns at once; its
// last offset commit (monitoring only) waits out the client's timeouts in
// the background, where a stopping task does not wait for it.
func TestKafkaPoolReleaseDoesNotWaitForAHungBroker(t *testing.T) {
	kafka := newControlledKafka(t)
	pool, lease := testLease(t, kafka.brokers, "words", time.Second)
	lease.commit("g", "words", 1, map[int32]int64{0: 1})
	kafka.hang()
	released := make(chan struct{})
	go func() { lease.release(); close(released) }()
	// The commit alone waits for a read timeout (2 s here) at least.
	select {
	case <-released:
	case <-time.After(time.Second):
		t.Fatal("the last release waited for its offset commit to a broker that does not answer")
	}
	// The broker goes away (its connections close), so the background
	// commit fails now instead of waiting out every retry.
	kafka.stop()
	if !pool.wait(time.Minute) {
		t.Fatal("the released client did not close within a minute")
	}
}

// TestKafkaLeaseReleaseAfterClosers: a stopped source's partition consumers
// close in the background, and its lease is released only then: meanwhile
// the client stays in the pool, shared with any task that acquires it, and
// the pool's wait (a stopping worker's) waits for them.
func TestKafkaLeaseReleaseAfterClosers(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	pool, lease := testLease(t, brokers, "words", 2*time.Second)
	unblock := make(chan struct{})
	closed := 0
	returned := make(chan struct{})
	go func() {
		lease.releaseAfter([]func(){func() { <-unblock; closed++ }, func() { closed++ }})
		close(returned)
	}()
	select {
	case <-returned:
	case <-time.After(waitTimeout):
		t.Fatal("releaseAfter waited for its closers")
	}
	if pool.wait(50 * time.Millisecond) {
		t.Fatal("the pool's wait did not wait for a close in the background")
	}
	key := clientKey(brokers, sarama.ReadUncommitted)
	pool.mu.Lock()
	kc := pool.clients[key]
	pool.mu.Unlock()
	if kc == nil || kc.refs != 1 {
		t.Fatalf("client %v before the closers ended: want it in the pool with the lease's reference", kc)
	}
	again, _, err := pool.acquire(brokers, sarama.ReadUncommitted, "words", "source")
	if err != nil {
		t.Fatal(err)
	}
	if again.kc != kc {
		t.Fatal("a task acquiring meanwhile got another client, want the one still in the pool")
	}
	close(unblock)
	if !pool.wait(waitTimeout) {
		t.Fatal("the closers did not end")
	}
	if closed != 2 {
		t.Fatalf("%d closers ran, want 2", closed)
	}
	pool.mu.Lock()
	refs := kc.refs
	pool.mu.Unlock()
	if refs != 1 {
		t.Fatalf("%d references after the release, want the other task's 1", refs)
	}
	again.release()
	if !pool.wait(waitTimeout) {
		t.Fatal("the last release did not close the client")
	}
	pool.mu.Lock()
	defer pool.mu.Unlock()
	if _, ok := pool.clients[key]; ok {
		t.Fatal("the client is still in the pool after its last release")
	}
}

// TestKafkaPoolWaitSeesLateCloses: a stopping worker's wait for the
// background closes also waits for one that begins while it waits, as when a
// task that outlived its stop timeout releases its lease late.
func TestKafkaPoolWaitSeesLateCloses(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	pool, first := testLease(t, brokers, "words", 2*time.Second)
	late, _, err := pool.acquire(brokers, sarama.ReadUncommitted, "words", "source")
	if err != nil {
		t.Fatal(err)
	}
	unblockFirst, unblockLate := make(chan struct{}), make(chan struct{})
	// The late close begins just before the first one ends, after the
	// wait below has begun.
	first.releaseAfter([]func(){func() {
		<-unblockFirst
		late.releaseAfter([]func(){func() { <-unblockLate }})
	}})
	waited := make(chan bool, 1)
	go func() { waited <- pool.wait(waitTimeout) }()
	time.Sleep(50 * time.Millisecond) // lets the wait begin first; the checks below hold either way
	close(unblockFirst)
	select {
	case ok := <-waited:
		t.Fatalf("the wait returned (%v) while a close that began during it was still running", ok)
	case <-time.After(300 * time.Millisecond):
	}
	close(unblockLate)
	select {
	case ok := <-waited:
		if !ok {
			t.Fatal("the wait timed out")
		}
	case <-time.After(waitTimeout):
		t.Fatal("the wait did not return after every close ended")
	}
}

// TestKafkaPoolDrainWaitsForLeases: a stopping worker's drain also waits for
// a lease still held, as by a task that outlived its stop timeout, and for
// the client's close its release begins; wait does not.
func TestKafkaPoolDrainWaitsForLeases(t *testing.T) {
	brokers := newKafka(t, map[string]int32{"words": 1})
	pool, lease := testLease(t, brokers, "words", 2*time.Second)
	if !pool.wait(waitTimeout) {
		t.Fatal("wait, with a lease held and nothing closing: timed out")
	}
	drained := make(chan bool, 1)
	go func() { drained <- pool.drain(waitTimeout) }()
	select {
	case ok := <-drained:
		t.Fatalf("drain returned (%v) while a lease was held", ok)
	case <-time.After(300 * time.Millisecond):
	}
	lease.release()
	select {
	case ok := <-drained:
		if !ok {
			t.Fatal("drain timed out")
		}
	case <-time.After(waitTimeout):
		t.Fatal("drain did not return after the last lease was released")
	}
	pool.mu.Lock()
	defer pool.mu.Unlock()
	if len(pool.clients) != 0 || len(pool.closing) != 0 {
		t.Fatalf("after drain: %d clients, %d closes running; want none", len(pool.clients), len(pool.closing))
	}
}
