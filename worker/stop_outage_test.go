package worker

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// TestSourceStopDoesNotWaitForKafka: a source task stops at once while its
// broker hangs, although closing its partition consumers then waits for
// sarama's metadata refresh, which runs to the client's timeouts (several
// seconds here, about 30 s with the default -kafka-timeout: more than a
// stop may take). The closes and the lease's release go on in the
// background.
func TestSourceStopDoesNotWaitForKafka(t *testing.T) {
	const parts = 8
	kafka := newControlledKafkaOf(t, parts)
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.KafkaTimeout = 2 * time.Second })
	refs := mapRefs(128, w)
	var all []int32
	for p := range int32(parts) {
		all = append(all, p)
	}
	sd := sourceDeploy("j", 1, 0, operator.WordCount, kafka.brokers, "words", all, refs)
	f.deploy(t, "w1", mapDeploy("j", 1, operator.WordCount, 1, 128, refs, 0))
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)

	kafka.hang()
	var reg prometheus.Gatherer = w.metrics.registry
	waitFor(t, "a fetch to time out", func() bool {
		return metricValue(t, reg, "coordflow_source_kafka_errors_total", map[string]string{"job": "j", "topic": "words"}) > 0
	})
	// The partition consumers now back off (500 ms) and look for their
	// leader again, in a metadata refresh that hangs: timing makes the
	// close wait likely, not the result.
	time.Sleep(time.Second)
	began := time.Now()
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: sd.Task, Reason: "test"}}})
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_CANCELLED)
	took := time.Since(began)
	t.Logf("cancelled %v after the cancel", took.Round(time.Millisecond))
	// The client's metadata timeout is 4 s (2 x -kafka-timeout): a stop
	// that waited for a refresh takes longer.
	if took >= 3*time.Second {
		t.Fatalf("the source took %v to stop: it waited for Kafka", took.Round(time.Millisecond))
	}
}
