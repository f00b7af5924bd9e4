package coordinator

import (
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/coordflow/coordflow/fsm"
)

// metrics are one coordd's Prometheus metrics, in a registry of its own so
// that several coordinators can run in one process (coordd dev, tests).
type metrics struct {
	registry *prometheus.Registry

	checkpointsCompleted *prometheus.CounterVec   // job
	checkpointsAborted   *prometheus.CounterVec   // job, reason
	checkpointDuration   *prometheus.HistogramVec // job
	jobRestarts          *prometheus.CounterVec   // job
	noDiscovery          *prometheus.CounterVec   // job
	recoveries           *prometheus.CounterVec   // job, scope: tasks, job
	workerSessions       prometheus.Gauge
	leaderlessStreams    prometheus.Gauge
	workerProbes         *prometheus.CounterVec // result: answered, failed
	deadOverruled        prometheus.Counter
	fencedMessages       *prometheus.CounterVec   // job, message: ack, decline, status
	raftApplyDuration    *prometheus.HistogramVec // command
	stateFilesDeleted    *prometheus.CounterVec   // job
	raftApplyBytes       *prometheus.CounterVec   // command
	raftBatchCommands    prometheus.Histogram
	raftEntryBytes       prometheus.Counter
	raftLogStoreDuration *prometheus.HistogramVec // op: append, delete
	raftSnapshotDuration prometheus.Histogram
	raftSnapshotBytes    prometheus.Gauge
	checkpointPhase      *prometheus.HistogramVec // phase: trigger, acks, commit
	leaderWriteStage     *prometheus.HistogramVec // command, stage: queued, commit, loop
	httpUnauthorized     *prometheus.CounterVec   // code: 401, 403
	httpConnsRefused     prometheus.Counter
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
			Buckets: prometheus.ExponentialBuckets(0.005, 1.5, 24), // 5 ms to 56 s, fine enough for a p99 target
		}, []string{"job"}),
		jobRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_job_restarts_total", Help: "Job attempts started after the first by this node as leader.",
		}, []string{"job"}),
		noDiscovery: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_deploys_without_discovery_total", Help: "Job deployments by this node as leader whose sources read no partitions added to the topic: a coordinator was below feature level 1 or not seen in gossip.",
		}, []string{"job"}),
		recoveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_recoveries_total", Help: "Recoveries from failures started by this node as leader, by scope: tasks (only the lost workers' tasks restored) or job (every task restarted).",
		}, []string{"job", "scope"}),
		workerSessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_worker_sessions", Help: "Worker control sessions open on this node.",
		}),
		leaderlessStreams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_leaderless_worker_streams", Help: "Worker streams this node holds while it knows no leader (each heartbeat answered renews the worker's lease).",
		}),
		workerProbes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_worker_probes_total", Help: "Direct gossip probes of workers whose control session broke, by result.",
		}, []string{"result"}),
		deadOverruled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coordflow_worker_dead_overruled_total",
			Help: "Gossip deaths of workers whose control session was still live, so that their tasks went on (counted once until gossip or the session changes).",
		}),
		fencedMessages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_fenced_messages_total", Help: "Acks, declines and task statuses dropped by the leader because they came from another attempt than the job's current one.",
		}, []string{"job", "message"}),
		raftApplyDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coordflow_raft_apply_duration_seconds", Help: "Raft Apply to FSM result of commands applied by this node as leader.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"command"}),
		raftApplyBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_raft_apply_bytes_total", Help: "Bytes of the commands this node as leader committed through Raft, by command: what checkpoints cost the Raft log.",
		}, []string{"command"}),
		checkpointPhase: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "coordflow_checkpoint_phase_seconds",
			Help:    "Phases of completed checkpoints, all jobs: trigger (Raft commit of the trigger), acks (trigger sent to the last task's ack), commit (Raft commit of the completion).",
			Buckets: prometheus.ExponentialBuckets(0.001, 1.5, 26),
		}, []string{"phase"}),
		leaderWriteStage: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "coordflow_leader_write_stage_seconds",
			Help:    "Where the leader loop's Raft writes spend their time, by command and stage: queued (behind the same job's earlier writes), commit (submitted to the committer until its result: batching, Raft, the FSM; and, while the loop's event queue is full, handing the result over) and loop (the result waiting in that queue). Failed writes included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"command", "stage"}),
		raftEntryBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coordflow_raft_entry_bytes_total", Help: "Bytes of the Raft entries this node as leader committed, as written to the log: the commands of coordflow_raft_apply_bytes_total after batching and compression.",
		}),
		raftBatchCommands: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "coordflow_raft_batch_commands", Help: "Commands per Raft entry committed by this node as leader (group commit).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11),
		}),
		raftLogStoreDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "coordflow_raft_log_store_duration_seconds", Help: "Writes to this node's Raft log store, by op: append (entries written and synced; commits wait on it) and delete (the compaction after a snapshot).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"op"}),
		raftSnapshotDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "coordflow_raft_snapshot_persist_duration_seconds", Help: "Time to encode and write each Raft snapshot of the FSM this node completed (failed ones are in the log).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		raftSnapshotBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coordflow_raft_snapshot_bytes", Help: "Size of the last Raft snapshot of the FSM this node wrote.",
		}),
		stateFilesDeleted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_state_files_deleted_total", Help: "Checkpoint state files deleted by the garbage collector because no retained checkpoint references them, or because their cancelled job is being purged.",
		}, []string{"job"}),
		httpConnsRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coordflow_http_connections_refused_total", Help: "HTTP connections closed at once because their client IP address held -http-max-conns-per-client connections already.",
		}),
		httpUnauthorized: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coordflow_http_unauthorized_total", Help: "HTTP API requests refused: code 401 (no or unknown token or certificate), 403 (a role too small for the endpoint).",
		}, []string{"code"}),
	}
	m.registry.MustRegister(m.raftLogStoreDuration, m.raftSnapshotDuration, m.raftSnapshotBytes, m.httpUnauthorized, m.httpConnsRefused, m.raftApplyBytes, m.raftEntryBytes, m.raftBatchCommands, m.checkpointPhase, m.leaderWriteStage, m.stateFilesDeleted, m.checkpointsCompleted, m.checkpointsAborted, m.checkpointDuration, m.jobRestarts, m.noDiscovery, m.recoveries, m.workerSessions,
		m.leaderlessStreams, m.workerProbes, m.deadOverruled, m.fencedMessages, m.raftApplyDuration,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// registerRaft adds gauges read from the Raft node at scrape time.
// registerMembers exports coordflow_gossip_members, counted from members at
// each scrape: gossip health as this coordinator sees it.
func (m *metrics) registerMembers(members func() []Member) {
	m.registry.MustRegister(memberCollector{members})
}

// memberCollector counts gossip members by role and status.
type memberCollector struct{ members func() []Member }

var memberDesc = prometheus.NewDesc("coordflow_gossip_members",
	"Gossip members this coordinator knows, by role and status (alive, suspect, dead, left).",
	[]string{"role", "status"}, nil)

func (c memberCollector) Describe(ch chan<- *prometheus.Desc) { ch <- memberDesc }

func (c memberCollector) Collect(ch chan<- prometheus.Metric) {
	counts := make(map[[2]string]int)
	for _, m := range c.members() {
		counts[[2]string{m.Role, m.Status}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(memberDesc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
}

func (m *metrics) registerRaft(r *raft.Raft) {
	m.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coordflow_raft_state", Help: "Raft state of this node: 0 follower, 1 candidate, 2 leader, 3 shutdown.",
		}, func() float64 { return float64(r.State()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coordflow_raft_term", Help: "Current Raft term of this node.",
		}, func() float64 { return float64(r.CurrentTerm()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coordflow_raft_last_index", Help: "Last index in this node's Raft log.",
		}, func() float64 { return float64(r.LastIndex()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coordflow_raft_applied_index", Help: "Last Raft index applied to this node's FSM.",
		}, func() float64 { return float64(r.AppliedIndex()) }),
	)
}

// registerFSM exports what the FSM counts itself.
func (m *metrics) registerFSM(f *fsm.FSM) {
	m.registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "coordflow_fsm_unknown_commands_total",
		Help: "Raft log entries of a command type this coordd does not know, rejected: a newer coordd is leading; upgrade this one.",
	}, func() float64 { return float64(f.UnknownCommands()) }))
}

// forgetJob deletes every metric series of a purged job, so that a
// coordinator that runs jobs for months does not export each job it ever
// led.
func (m *metrics) forgetJob(jobID string) {
	labels := prometheus.Labels{"job": jobID}
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{
		m.checkpointsCompleted, m.checkpointsAborted, m.checkpointDuration, m.jobRestarts,
		m.noDiscovery, m.recoveries, m.fencedMessages, m.stateFilesDeleted,
	} {
		v.DeletePartialMatch(labels)
	}
}
