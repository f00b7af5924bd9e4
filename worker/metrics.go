package worker

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Task kinds as metric labels.
const (
	kindSource = "source"
	kindMap    = "map"
)

// metrics are one worker's Prometheus metrics, in a registry of its own so that
// several workers can run in one process (coordd dev, tests).
type metrics struct {
	registry *prometheus.Registry

	recordsIn        *prometheus.CounterVec   // job, kind: Kafka records read (source), items applied (map)
	recordsOut       *prometheus.CounterVec   // job, kind: items sent to map tasks (source), records written to the sink (map)
	recordsSkipped   *prometheus.CounterVec   // job, operator: records whose Split failed
	duplicates       *prometheus.CounterVec   // job: items of records a map task had applied already, dropped
	checkpointsAcked *prometheus.CounterVec   // job, kind
	checkpointsDecl  *prometheus.CounterVec   // job, kind
	taskFailures     *prometheus.CounterVec   // job, kind
	alignment        *prometheus.HistogramVec // job
	tasks            prometheus.Gauge
	sessionOpen      prometheus.Gauge
	leaderless       prometheus.Gauge
	leaseExpiries    prometheus.Counter
	outboxDropped    prometheus.Counter
	snapshotBytes    *prometheus.CounterVec   // job, mode: inline, full, delta, savepoint
	snapshotDuration *prometheus.HistogramVec // job: barrier to ack of a map task's snapshot
	restoredFiles    *prometheus.CounterVec   // job, from: local, storage
	offsetCommits    *prometheus.CounterVec   // result: ok, failed
	sinkTxns         *prometheus.CounterVec   // job, outcome: committed, recovered, ended_before, aborted_stale
	sinkFenced       *prometheus.CounterVec   // job
	lag              *prometheus.GaugeVec     // job, topic, partition
	kafkaErrors      *prometheus.CounterVec   // job, topic
	stateKeys        *prometheus.GaugeVec     // job, task
	stateSize        *prometheus.GaugeVec     // job, task
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		offsetCommits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_kafka_offset_commits_total", Help: "OffsetCommit requests sent for completed checkpoints (one per consumer group and interval), by result.",
		}, []string{"result"}),
		sinkTxns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_sink_transactions_total",
			Help: "Kafka transactions of exactly-once sinks by outcome: committed (after their checkpoint completed), recovered (committed by a restored task), ended_before (a restored task found it already ended), aborted_stale (an older attempt's, aborted at restore).",
		}, []string{"job", "outcome"}),
		sinkFenced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_sink_fenced_total", Help: "Exactly-once sink producers of this worker that Kafka fenced because a newer attempt took their transactional id: a zombie stopped.",
		}, []string{"job"}),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "coordflow_source_lag_records",
			Help: "Per source partition, the records the job has yet to make exactly-once state: the partition's end offset (as the source last fetched it) minus the offset of the last completed checkpoint. Set at each completed checkpoint.",
		}, []string{"job", "topic", "partition"}),
		kafkaErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_source_kafka_errors_total",
			Help: "Errors source tasks' partition consumers got from Kafka (fetches, leader lookups). A steady rate means a broker or the topic cannot be read; a partition that gets nothing else for -kafka-timeout fails its task.",
		}, []string{"job", "topic"}),
		stateKeys: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "coordflow_state_keys", Help: "Keys in a map task's state at its last checkpoint.",
		}, []string{"job", "task"}),
		stateSize: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "coordflow_state_size_bytes",
			Help: "Size of a map task's state at its last checkpoint: the inline state, or every file (full and deltas) the checkpoint references.",
		}, []string{"job", "task"}),
		recordsIn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_records_in_total", Help: "Records read from Kafka by source tasks (kind=source) and items applied by map tasks (kind=map), per task.",
		}, []string{"job", "kind", "task"}),
		recordsOut: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_records_out_total", Help: "Items sent to map tasks by source tasks (kind=source) and records written to the sink by map tasks (kind=map), per task.",
		}, []string{"job", "kind", "task"}),
		recordsSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_records_skipped_total", Help: "Malformed records the operator's split step rejected; they are skipped.",
		}, []string{"job", "operator"}),
		duplicates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_duplicate_items_dropped_total",
			Help: "Items map tasks dropped because their record was at or below the last record the task had applied from its partition: sent again by a surviving source's replay or a restored source re-reading from the checkpoint after a task-scoped recovery. Not counted in records in.",
		}, []string{"job"}),
		checkpointsAcked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_checkpoints_acked_total", Help: "Checkpoint acks sent by this worker's tasks.",
		}, []string{"job", "kind"}),
		checkpointsDecl: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_checkpoints_declined_total", Help: "Checkpoint declines sent by this worker's tasks.",
		}, []string{"job", "kind"}),
		taskFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_task_failures_total", Help: "Tasks of this worker that ended FAILED.",
		}, []string{"job", "kind"}),
		alignment: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coordflow_barrier_alignment_seconds", Help: "Time from the first to the last Barrier(N) of a map task's inputs.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"job"}),
		tasks: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_worker_tasks", Help: "Tasks deploying or running on this worker.",
		}),
		sessionOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_worker_session_open", Help: "1 while the worker has a control session with a leader.",
		}),
		leaderless: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_worker_leaderless", Help: "1 while a coordinator that knows no leader (lost quorum, election) renews the worker's lease: tasks run on, checkpoints wait.",
		}),
		leaseExpiries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coordflow_worker_lease_expiries_total", Help: "Times the worker stopped all its tasks because no leader was heard within the lease.",
		}),
		outboxDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coordflow_worker_outbox_dropped_total", Help: "Messages to the leader dropped because the send queue was full.",
		}),
		snapshotBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_state_snapshot_bytes_total", Help: "Bytes of keyed state map tasks wrote for checkpoints, by mode: inline, full, delta, savepoint.",
		}, []string{"job", "mode"}),
		snapshotDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coordflow_state_snapshot_duration_seconds", Help: "From a map task's aligned barrier to its ack: writing its state out.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"job"}),
		restoredFiles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_state_restored_files_total", Help: "State files restored map tasks read, from their local copies (from=local) or checkpoint storage (from=storage).",
		}, []string{"job", "from"}),
	}
	m.registry.MustRegister(m.lag, m.kafkaErrors, m.stateKeys, m.stateSize, m.offsetCommits, m.sinkTxns, m.sinkFenced, m.snapshotBytes, m.snapshotDuration, m.restoredFiles, m.recordsIn, m.recordsOut, m.recordsSkipped, m.duplicates, m.checkpointsAcked, m.checkpointsDecl,
		m.taskFailures, m.alignment, m.tasks, m.sessionOpen, m.leaderless, m.leaseExpiries, m.outboxDropped,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// forgetJob deletes every metric series of a job, once none of its tasks has
// run on this worker for Config.MetricsLinger.
func (m *metrics) forgetJob(job string) {
	labels := prometheus.Labels{"job": job}
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{
		m.recordsIn, m.recordsOut, m.recordsSkipped, m.duplicates, m.checkpointsAcked, m.checkpointsDecl,
		m.taskFailures, m.alignment, m.snapshotBytes, m.snapshotDuration, m.restoredFiles, m.sinkTxns,
		m.sinkFenced, m.lag, m.kafkaErrors, m.stateKeys, m.stateSize,
	} {
		v.DeletePartialMatch(labels)
	}
}
