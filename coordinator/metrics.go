package coordinator

import "github.com/prometheus/client_golang/prometheus"

// metrics are one coordd's Prometheus metrics, in a registry of its own so
// that several coordinators can run in one process (coordd dev, tests).
type metrics struct {
	registry *prometheus.Registry

	checkpointsCompleted *prometheus.CounterVec   // job
	checkpointsAborted   *prometheus.CounterVec   // job, reason
	checkpointDuration   *prometheus.HistogramVec // job
	jobRestarts          *prometheus.CounterVec   // job
	workerSessions       prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		checkpointsCompleted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_checkpoints_completed_total", Help: "Checkpoints committed through Raft by this node as leader.",
		}, []string{"job"}),
		checkpointsAborted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_checkpoints_aborted_total", Help: "Checkpoints aborted by this node as leader.",
		}, []string{"job", "reason"}),
		checkpointDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coordflow_checkpoint_duration_seconds", Help: "Trigger to commit of completed checkpoints.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}, []string{"job"}),
		jobRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_job_restarts_total", Help: "Job attempts started after the first by this node as leader.",
		}, []string{"job"}),
		workerSessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_worker_sessions", Help: "Worker control sessions open on this node.",
		}),
	}
	m.registry.MustRegister(m.checkpointsCompleted, m.checkpointsAborted, m.checkpointDuration, m.jobRestarts, m.workerSessions,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}
