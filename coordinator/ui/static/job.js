// The page of one job: summary, tasks, lag per partition, checkpoint
// history with charts and the details of the retained checkpoints,
// attempts, savepoints and a key lookup in the last completed checkpoint.

import {ApiError, get, list, settle} from './api.js';
import {lineChart} from './chart.js';
import {DASH, age, badge, bytes, clock, h, int, millis, parseTime, rate, section, statusKind, table} from './dom.js';
import {lastCheckpoint, uptime} from './jobs.js';

export function jobPage(id) {
  const base = `/v1/jobs/${encodeURIComponent(id)}`;
  const summary = section('Summary', {testid: 'job-summary', wide: true});
  const tasks = section('Tasks', {testid: 'tasks'});
  const lag = section('Consumer lag', {testid: 'lag'});
  const charts = section('Checkpoints over time', {testid: 'checkpoint-charts', wide: true});
  const history = section('Checkpoint history', {testid: 'checkpoint-history', wide: true});
  const details = section('Checkpoint details', {testid: 'checkpoint-details', wide: true});
  const attempts = section('Attempts', {testid: 'attempts'});
  const recoveries = section('Recoveries', {testid: 'recoveries'});
  const savepoints = section('Savepoints', {testid: 'savepoints'});
  const lookup = stateLookup(base);

  // The last answers, kept to re-render the details when a history row
  // is clicked, without waiting for the next refresh.
  const last = {checkpoints: [], history: [], now: Date.now()};
  // selected is the checkpoint whose details show: null, the newest
  // completed one.
  let selected = null;
  const select = cpID => {
    selected = cpID;
    renderHistory(history, last.history, last.checkpoints, selected, select);
    renderDetails(details, last.checkpoints, selected, last.now);
  };

  return {
    nav: 'jobs',
    title: () => `Job ${id}`,
    el: h('div', {class: 'page grid'},
      h('p', {class: 'crumbs'}, h('a', {href: '#/jobs'}, 'Jobs'), ' / ', id),
      summary.el, tasks.el, lag.el, charts.el, history.el, details.el, attempts.el, recoveries.el, savepoints.el, lookup.el),
    async refresh({now}) {
      const [job, cps, hist, lg, sps] = await settle([
        get(base), list(`${base}/checkpoints`), list(`${base}/checkpoints/history`), get(`${base}/lag`), list('/v1/savepoints'),
      ]);
      last.now = now;
      if (job.error) {
        const e = job.error;
        const err = e instanceof ApiError && e.status === 404 ? new Error(`No job ${id}: ${e.message}`) : e;
        for (const s of [summary, tasks, attempts, recoveries]) s.fail(err);
      } else {
        renderSummary(summary, job.value, lg.value, now);
        renderTasks(tasks, job.value);
        renderAttempts(attempts, job.value);
        renderRecoveries(recoveries, job.value);
      }
      if (lg.error) lag.fail(lg.error);
      else renderLag(lag, lg.value);
      if (cps.error) details.fail(cps.error);
      else last.checkpoints = cps.value;
      if (hist.error) {
        history.fail(hist.error);
        charts.fail(hist.error);
      } else {
        last.history = hist.value;
        renderCharts(charts, hist.value);
      }
      if (!hist.error) renderHistory(history, last.history, last.checkpoints, selected, select);
      if (!cps.error) renderDetails(details, last.checkpoints, selected, now);
      if (sps.error) savepoints.fail(sps.error);
      else renderSavepoints(savepoints, sps.value.filter(sp => sp.job_id === id));
    },
  };
}

// field is one term of the summary's description list.
function field(term, ...value) {
  return [h('dt', {}, term), h('dd', {}, value)];
}

function renderSummary(sec, job, lag, now) {
  const spec = job.spec || {};
  const src = spec.source || {};
  const op = spec.operator || {};
  const ck = spec.checkpoint || {};
  const tp = job.throughput;
  sec.note.replaceChildren(badge(job.status, statusKind(job.status), {'data-testid': 'job-status'}));
  sec.show(h('h1', {class: 'job-title'}, job.name || job.id, ' ', h('span', {class: 'muted small'}, job.id)),
    job.reason ? h('p', {class: 'reason', 'data-testid': 'job-reason'}, job.reason) : null,
    h('dl', {class: 'facts'},
      field('Attempt', int(job.attempt), h('span', {class: 'muted'}, ` (${int(job.restarts)} ${job.restarts === 1 ? 'restart' : 'restarts'})`)),
      field('Uptime', uptime(job, now)),
      field('Submitted', clock(job.submitted_at)),
      field('Last checkpoint', lastCheckpoint(job, now, 'last-checkpoint')),
      field('Records in', rate(tp?.records_in_per_second)),
      field('Records out', rate(tp?.records_out_per_second),
        tp ? h('div', {class: 'muted small'}, `checkpoints ${tp.from_checkpoint} to ${tp.to_checkpoint}`) : null),
      field('Lag', lag ? h('span', {'data-testid': 'lag-total'}, int(lag.total)) : DASH),
      field('Source', `${src.topic || DASH} × ${src.parallelism ?? DASH}`, h('div', {class: 'muted small'}, (src.brokers || []).join(', '))),
      field('Operator', `${op.name || DASH} × ${op.parallelism ?? DASH}`, h('div', {class: 'muted small'}, `max parallelism ${op.max_parallelism ?? DASH}`)),
      field('Checkpoints', `every ${ck.interval || DASH}`, h('div', {class: 'muted small'}, `timeout ${ck.timeout || DASH}, ${ck.retained ?? DASH} retained`)),
      spec.sink ? field('Sink', spec.sink.topic || DASH, h('div', {class: 'muted small'}, spec.sink.delivery || 'exactly_once')) : null,
    ));
}

function renderTasks(sec, job) {
  const placed = job.tasks || [];
  sec.note.textContent = `job attempt ${job.attempt}`;
  // Each task has its own attempt and start: a task-scoped recovery
  // restarts only the tasks of a lost worker.
  const columns = [{label: 'Task'}, {label: 'Kind'}, {label: 'Worker'}, {label: 'Partitions / key groups'},
    {label: 'Attempt', num: true}, {label: 'Started'}];
  sec.show(table(columns, placed, t => ({
    attrs: {'data-testid': 'task-row', 'data-id': t.id, 'data-attempt': String(t.attempt ?? '')},
    cells: [
      h('span', {class: 'strong'}, t.id), t.kind, t.worker || h('span', {class: 'muted'}, 'unplaced'),
      t.partitions ? `partitions ${t.partitions.join(', ')}`
        : t.key_groups ? `key groups ${t.key_groups.start} to ${t.key_groups.end - 1}` : DASH,
      t.attempt ? String(t.attempt) : DASH, clock(t.started_at),
    ],
  }), 'The job has no tasks placed.'));
}

function renderLag(sec, lag) {
  const topic = lag.topic ? `${lag.topic}, ` : '';
  sec.note.textContent = topic + (lag.checkpoint_id ? `from checkpoint ${lag.checkpoint_id}` : 'no completed checkpoint yet');
  const columns = [{label: 'Partition', num: true}, {label: 'End offset', num: true},
    {label: 'Checkpoint offset', num: true}, {label: 'Lag', num: true}];
  sec.show(table(columns, lag.partitions || [], p => ({
    attrs: {'data-testid': 'lag-row'},
    // A partition the checkpoint does not cover (none yet, or added to the
    // topic since) has no checkpoint offset and no lag.
    cells: [String(p.partition), int(p.end_offset), int(p.checkpoint_offset), int(p.lag)],
  }), 'No partitions.'), h('p', {class: 'muted small'}, `Total ${int(lag.total)}: the brokers' end offsets minus the offsets of the last completed checkpoint.`));
}

function renderCharts(sec, history) {
  const done = history.filter(c => c.status === 'completed').sort((a, b) => a.id - b.id);
  const points = f => done.map(c => ({x: c.id, y: f(c), mark: c.savepoint ? 'savepoint' : null, title: ''}));
  const duration = points(c => c.duration_ms || 0);
  duration.forEach((p, i) => { p.title = `checkpoint ${done[i].id}: ${millis(done[i].duration_ms)}`; });
  const size = points(c => c.state_size || 0);
  size.forEach((p, i) => { p.title = `checkpoint ${done[i].id}: ${bytes(done[i].state_size)}`; });
  sec.note.textContent = `${done.length} completed checkpoints`;
  const empty = 'Two completed checkpoints are needed for a chart.';
  sec.show(h('div', {class: 'charts'},
    h('figure', {}, h('figcaption', {}, 'Duration'),
      lineChart({points: duration, format: millis, label: 'checkpoint duration by checkpoint id', testid: 'chart-duration', empty})),
    h('figure', {}, h('figcaption', {}, 'State size'),
      lineChart({points: size, format: bytes, base: 1024, label: 'checkpoint state size by checkpoint id', testid: 'chart-size', empty}))));
}

function renderHistory(sec, history, retained, selected, select) {
  const kept = new Set(retained.map(c => c.id));
  const shown = selected ?? newestCompleted(retained)?.id;
  sec.note.textContent = `${history.length} most recent, newest first; click a retained one for its tasks`;
  const columns = [{label: 'Checkpoint', num: true}, {label: 'Status'}, {label: 'Attempt', num: true},
    {label: 'Triggered'}, {label: 'Duration', num: true}, {label: 'State size', num: true}, {label: 'Reason'}];
  sec.show(scroller(table(columns, history, c => ({
    attrs: {
      'data-testid': 'history-row',
      'data-id': String(c.id),
      class: [kept.has(c.id) ? 'selectable' : null, c.id === shown ? 'selected' : null].filter(Boolean).join(' ') || null,
      onclick: kept.has(c.id) ? () => select(c.id) : null,
      title: kept.has(c.id) ? 'show its tasks' : 'no longer retained: only its summary is kept',
    },
    cells: [
      h('span', {class: 'strong'}, String(c.id)),
      [badge(c.status, statusKind(c.status)), c.savepoint ? badge('savepoint', 'plain') : null],
      int(c.attempt), clock(c.trigger_time), millis(c.duration_ms), bytes(c.state_size),
      c.reason ? h('span', {class: 'reason'}, c.reason) : '',
    ],
  }), 'No checkpoint has completed or been aborted yet.')));
}

// scroller keeps a long table to a box of its own height, so that a
// hundred checkpoints do not push the rest of the page away; its header
// row stays in view (style.css).
function scroller(node) {
  return h('div', {class: 'scroller'}, node);
}

function newestCompleted(checkpoints) {
  return checkpoints.find(c => c.status === 'completed');
}

function renderDetails(sec, checkpoints, selected, now) {
  const cp = selected === null ? newestCompleted(checkpoints) || checkpoints[0] : checkpoints.find(c => c.id === selected);
  sec.note.textContent = `retained: ${checkpoints.map(c => `${c.id} (${c.status})`).join(', ') || 'none'}`;
  if (!cp) {
    sec.show(h('p', {class: 'empty'}, selected === null ? 'No checkpoint yet.' : `Checkpoint ${selected} is no longer retained.`));
    return;
  }
  const trigger = parseTime(cp.trigger_time);
  const after = t => {
    const ms = parseTime(t) - trigger;
    return Number.isNaN(ms) ? DASH : `+${millis(ms)}`;
  };
  const columns = [{label: 'Task'}, {label: 'Kind'}, {label: 'Worker'},
    {label: 'Acked', num: true, title: 'after the trigger'}, {label: 'Alignment', num: true, title: 'barrier alignment of a map task'},
    {label: 'State size', num: true}, {label: 'Keys', num: true}, {label: 'Files', num: true},
    {label: 'Records in', num: true}, {label: 'Records out', num: true}, {label: 'Offsets'}];
  const tasks = [...(cp.tasks || [])].sort((a, b) => a.id.localeCompare(b.id, 'en', {numeric: true}));
  sec.show(
    h('p', {class: 'checkpoint-head', 'data-testid': 'details-head', 'data-id': String(cp.id)},
      h('span', {class: 'strong'}, `Checkpoint ${cp.id}`), ' ', badge(cp.status, statusKind(cp.status)),
      ` attempt ${cp.attempt}, triggered `, clock(cp.trigger_time), ` (${age(cp.trigger_time, now)})`,
      cp.duration_ms !== undefined ? `, took ${millis(cp.duration_ms)}` : '',
      `, ${tasks.length} tasks acknowledged`),
    cp.reason ? h('p', {class: 'reason'}, cp.reason) : null,
    table(columns, tasks, t => ({
      attrs: {'data-testid': 'details-task-row'},
      cells: [
        h('span', {class: 'strong'}, t.id), t.kind, t.worker || DASH, after(t.ack_time), millis(t.alignment_ms),
        bytes(t.state_size), int(t.keys), int(t.files), int(t.records_in), int(t.records_out),
        h('span', {class: 'small'}, Object.entries(t.offsets || {}).sort().map(([k, v]) => `${k}: ${int(v)}`).join(', ') || DASH),
      ],
    }), 'No task has acknowledged it yet.'));
}

function renderAttempts(sec, job) {
  const attempts = job.attempts || [];
  sec.note.textContent = attempts.length ? 'newest first' : '';
  const columns = [{label: 'Attempt', num: true}, {label: 'Started'}, {label: 'Reason'}, {label: 'Restored from'}];
  sec.show(table(columns, attempts, a => ({
    attrs: {'data-testid': 'attempt-row'},
    cells: [String(a.attempt), clock(a.started_at), a.reason ? h('span', {class: 'reason'}, a.reason) : DASH,
      a.restored_from ? `checkpoint ${a.restored_from}` : 'fresh start'],
  }), 'The job has not been deployed yet.'));
}

function renderRecoveries(sec, job) {
  const recs = job.recoveries || [];
  sec.note.textContent = recs.length ? 'newest first' : '';
  const columns = [{label: 'Attempt', num: true}, {label: 'Scope'}, {label: 'Tasks'}, {label: 'Detected'},
    {label: 'To checkpoint', num: true, title: 'from the failure\'s detection to the first checkpoint after the recovery'}, {label: 'Reason'}];
  sec.show(table(columns, recs, r => ({
    attrs: {'data-testid': 'recovery-row', 'data-scope': r.scope},
    cells: [String(r.attempt), r.scope, h('span', {class: 'small'}, (r.tasks || []).join(', ')), clock(r.detected_at || r.started_at),
      r.to_checkpoint_ms != null ? millis(r.to_checkpoint_ms) : h('span', {class: 'muted'}, 'pending'),
      r.reason ? h('span', {class: 'reason'}, r.reason) : DASH],
  }), 'No failure so far.'));
}

function renderSavepoints(sec, sps) {
  const columns = [{label: 'Savepoint'}, {label: 'Checkpoint', num: true}, {label: 'Created'},
    {label: 'State size', num: true}, {label: 'Keys', num: true}, {label: 'Location'}];
  sec.show(table(columns, sps, sp => ({
    attrs: {'data-testid': 'savepoint-row'},
    cells: [h('span', {class: 'strong'}, sp.id), String(sp.checkpoint_id), clock(sp.created_at), bytes(sp.state_bytes),
      int(sp.keys), h('span', {class: 'small'}, sp.location || DASH)],
  }), 'No savepoint of this job.'));
}

// stateLookup is the key-lookup form: it reads one key of the last
// completed checkpoint's state when submitted, not on every refresh.
function stateLookup(base) {
  const input = h('input', {id: 'state-key', type: 'text', placeholder: 'key', autocomplete: 'off', spellcheck: 'false', required: true});
  // data-seq counts the lookups answered and data-state says how the last
  // one ended (found, not-found, error), for a reader that must tell a new
  // answer from the last one.
  const result = h('div', {class: 'lookup-result', 'data-testid': 'state-result', 'data-seq': '0'});
  let seq = 0;
  const answered = state => {
    result.dataset.state = state;
    result.dataset.seq = String(++seq);
  };
  const form = h('form', {class: 'lookup', id: 'state-form'}, input, h('button', {type: 'submit', id: 'state-lookup'}, 'Look up'));
  form.addEventListener('submit', async ev => {
    ev.preventDefault();
    const key = input.value;
    result.dataset.state = 'loading';
    result.replaceChildren('Looking up ', h('code', {}, key), '…');
    try {
      const v = await get(`${base}/state?key=${encodeURIComponent(key)}`);
      result.replaceChildren(...(v.found
        ? [h('code', {}, key), ' = ', h('code', {class: 'strong', 'data-testid': 'state-value'}, valueText(v)),
          h('span', {class: 'muted'}, ` in checkpoint ${v.checkpoint_id}`)]
        : [h('code', {}, key), ` not found in checkpoint ${v.checkpoint_id}`]));
      answered(v.found ? 'found' : 'not-found');
    } catch (e) {
      const text = e instanceof ApiError && e.status === 404 ? `No completed checkpoint yet (${e.message})` : e.message;
      result.replaceChildren(h('span', {class: 'error-text'}, text));
      answered('error');
    }
  });
  const sec = section('State lookup', {testid: 'state-lookup'});
  sec.note.textContent = 'one key in the last completed checkpoint';
  sec.show(form, result);
  return sec;
}

// valueText shows a state value: a number or text as is, bytes that are
// not UTF-8 in base64.
function valueText(v) {
  if (v.value !== undefined && v.value !== null) return typeof v.value === 'string' ? v.value : JSON.stringify(v.value);
  if (v.value_base64) return `base64:${v.value_base64}`;
  return '';
}
