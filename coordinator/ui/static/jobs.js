// The Jobs page: every job with its status, attempt, uptime, throughput,
// consumer lag and last checkpoint.

import {eachLimited, get, list} from './api.js';
import {DASH, age, badge, h, int, jobLink, parseTime, rate, section, span, statusKind, table} from './dom.js';

// LAG_JOBS bounds the running jobs whose lag the page asks for on every
// refresh (each answer asks the brokers); LAG_PARALLEL, how many at once.
const LAG_JOBS = 50;
const LAG_PARALLEL = 4;

export function jobsPage() {
  const jobs = section('Jobs', {testid: 'jobs'});
  return {
    nav: 'jobs',
    title: () => 'Jobs',
    el: h('div', {class: 'page'}, jobs.el),
    async refresh({now}) {
      let all;
      try {
        all = await list('/v1/jobs');
      } catch (e) {
        jobs.fail(e);
        return;
      }
      all.sort((a, b) => String(a.id).localeCompare(String(b.id)));
      const running = all.filter(j => j.status === 'running');
      const lagged = running.slice(0, LAG_JOBS);
      const lags = await eachLimited(lagged, LAG_PARALLEL, j => get(`/v1/jobs/${encodeURIComponent(j.id)}/lag`));
      const lagByJob = new Map(lagged.map((j, i) => [j.id, lags[i]]));
      renderJobs(jobs, all, lagByJob, now);
    },
  };
}

function renderJobs(sec, jobs, lagByJob, now) {
  const counts = {};
  for (const j of jobs) counts[j.status] = (counts[j.status] || 0) + 1;
  sec.note.textContent = jobs.length === 0 ? '' :
    `${jobs.length} ${jobs.length === 1 ? 'job' : 'jobs'}: ` + Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(', ');
  const columns = [
    {label: 'Job'}, {label: 'Status'}, {label: 'Attempt', num: true}, {label: 'Uptime', num: true, title: 'of the current attempt'},
    {label: 'In', num: true, title: 'records read per second, between the last two checkpoints'},
    {label: 'Out', num: true, title: 'records written per second, between the last two checkpoints'},
    {label: 'Lag', num: true, title: 'broker end offsets minus the last completed checkpoint\'s offsets, summed over partitions'},
    {label: 'Last checkpoint', num: true},
  ];
  sec.show(table(columns, jobs, j => ({
    attrs: {'data-testid': 'job-row', 'data-id': j.id},
    cells: [
      [jobLink(j.id), j.name && j.name !== j.id ? h('div', {class: 'muted small'}, j.name) : null],
      [badge(j.status, statusKind(j.status), {'data-testid': `job-status-${j.id}`}),
        j.reason ? h('div', {class: 'reason'}, j.reason) : null],
      int(j.attempt),
      uptime(j, now),
      h('span', {'data-testid': `job-in-${j.id}`}, rate(j.throughput?.records_in_per_second)),
      rate(j.throughput?.records_out_per_second),
      lagCell(lagByJob.get(j.id), `job-lag-${j.id}`),
      lastCheckpoint(j, now, `job-last-checkpoint-${j.id}`),
    ],
  }), 'No job has been submitted.'));
}

// uptime is the time since the current attempt started, while it runs.
export function uptime(job, now) {
  const t = parseTime(job.attempt_started_at);
  if (job.status !== 'running' || Number.isNaN(t)) return DASH;
  return h('span', {title: `attempt ${job.attempt} started ${job.attempt_started_at}`}, span(now - t));
}

// lastCheckpoint is a job's last completed checkpoint id, with its age.
export function lastCheckpoint(job, now, testid) {
  const cp = job.last_checkpoint;
  if (!cp) return h('span', {class: 'muted', 'data-testid': testid, 'data-id': '0'}, 'none yet');
  return [
    h('span', {class: 'strong', 'data-testid': testid, 'data-id': String(cp.id)}, String(cp.id)),
    h('div', {class: 'muted small'}, age(cp.completed_at, now)),
  ];
}

// lagCell shows a job's total lag, its partitions in the tooltip, or why
// it is unknown.
function lagCell(result, testid) {
  if (!result) return DASH; // not running, or beyond LAG_JOBS
  if (result.error) return h('span', {class: 'error-text', title: result.error.message, 'data-testid': testid}, 'unknown');
  const lag = result.value;
  const parts = (lag.partitions || []).map(p => `partition ${p.partition}: ${int(p.lag)}`).join('\n');
  return h('span', {title: parts || 'no partitions', 'data-testid': testid}, int(lag.total));
}
