package worker

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/coordflow/coordflow/transport"
	"github.com/coordflow/coordflow/worker/operator"
)

// jobSeries counts the metric series of job in g.
func jobSeries(t *testing.T, g prometheus.Gatherer, job string) int {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	n := 0
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "job" && l.GetValue() == job {
					n++
				}
			}
		}
	}
	return n
}

// A job's metric series stay while any of its tasks runs on the worker, and
// go MetricsLinger after its last task here ended, with the job's attempt
// fences, so that a worker that ran many jobs does not export every one of
// them, nor keep their fences, for ever.
func TestJobMetricsGoAfterLastTask(t *testing.T) {
	const linger = 300 * time.Millisecond
	brokers := newKafka(t, map[string]int32{"words": 1})
	produce(t, brokers, "words", []record{{0, "k", "a b c"}, {0, "k", "a"}})
	f := newFakeCoord(t, true, "")
	w := startWorker(t, "w1", f, func(c *Config) { c.KafkaTimeout = time.Second; c.MetricsLinger = linger })
	refs := mapRefs(128, w)
	md := mapDeploy("j", 1, operator.WordCount, 1, 128, refs, 0)
	sd := sourceDeploy("j", 1, 0, operator.WordCount, brokers, "words", []int32{0}, refs)
	f.deploy(t, "w1", md)
	f.deploy(t, "w1", sd)
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_RUNNING)
	waitFor(t, "the source to count its records", func() bool {
		return metricValue(t, w.metrics.registry, "coordflow_records_in_total", map[string]string{"job": "j", "kind": kindSource}) == 2
	})

	// The map task ends; the source still runs: nothing is to go.
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: md.Task, Reason: "test"}}})
	f.awaitStatus(t, md.Task, transport.TaskPhase_TASK_PHASE_CANCELLED)
	w.tasks.mu.Lock()
	timer := w.tasks.idle["j"]
	w.tasks.mu.Unlock()
	if timer != nil {
		t.Fatal("job j's series are to go while its source runs")
	}

	// The last task ends: the job's series go after the linger, and the
	// worker's own series stay.
	cancelled := time.Now() // the linger starts later, when the task has ended
	f.send(t, "w1", &transport.CoordinatorMessage{Msg: &transport.CoordinatorMessage_Cancel{Cancel: &transport.CancelTask{Task: sd.Task, Reason: "test"}}})
	f.awaitStatus(t, sd.Task, transport.TaskPhase_TASK_PHASE_CANCELLED)
	if n := jobSeries(t, w.metrics.registry, "j"); n == 0 {
		t.Fatal("job j's series went at once: a scrape would miss their last values")
	}
	if n := jobFences(w, "j"); n != 3 { // the job fence and one per task
		t.Fatalf("job j has %d fences right after its last task ended, want 3", n)
	}
	waitFor(t, "job j's metric series to go", func() bool { return jobSeries(t, w.metrics.registry, "j") == 0 })
	// Its fences went with them: a worker that runs job after job keeps
	// none of the ended ones.
	if n := jobFences(w, "j"); n != 0 {
		t.Errorf("job j still has %d fences after the linger", n)
	}
	if took := time.Since(cancelled); took < linger {
		t.Errorf("job j's series went %v after its last task was cancelled, before the %v linger", took, linger)
	}
	if got := metricValue(t, w.metrics.registry, "coordflow_worker_session_open", nil); got != 1 {
		t.Errorf("coordflow_worker_session_open is %v after job j's series went, want 1", got)
	}
}

// jobFences counts the job fence and the task fences w's task manager holds
// for job.
func jobFences(w *Worker, job string) int {
	w.tasks.mu.Lock()
	defer w.tasks.mu.Unlock()
	n := 0
	if _, ok := w.tasks.attempts[job]; ok {
		n++
	}
	for k := range w.tasks.fences {
		if k.job == job {
			n++
		}
	}
	return n
}
