// The coordflow dashboard: routes #/cluster, #/jobs and #/jobs/<id> to a
// page, and refreshes the page, the header and the banner every
// REFRESH_MS from the HTTP API of the coordinator that served it.

import {get, session, token, setToken} from './api.js';
import {badge, statusKind, h} from './dom.js';
import {clusterPage} from './cluster.js';
import {jobsPage} from './jobs.js';
import {jobPage} from './job.js';

// REFRESH_MS is the pause between the end of one refresh and the start of
// the next: refreshes never overlap, and a slow coordinator slows them.
const REFRESH_MS = 2000;

const routes = [
  [/^#\/cluster$/, () => clusterPage()],
  [/^#\/jobs$/, () => jobsPage()],
  [/^#\/jobs\/([^/]+)$/, m => {
    const id = jobID(m[1]);
    return id === null ? null : jobPage(id);
  }],
];

// jobID decodes the job id of a #/jobs/<id> route, or returns null for one
// that is no job id: a malformed escape (decodeURIComponent throws), or
// "." and "..", which the browser would resolve in the API's paths
// (/v1/jobs/.. is /v1/), as a crafted link could ask.
function jobID(raw) {
  let id;
  try {
    id = decodeURIComponent(raw);
  } catch {
    return null;
  }
  return /^[A-Za-z0-9._-]{1,128}$/.test(id) && id !== '.' && id !== '..' ? id : null;
}

const el = id => document.getElementById(id);

// page is the page on screen: {nav, title, el, refresh(ctx)}, where
// refresh reports its own errors in the page and never throws.
let page = null;

function showRoute() {
  const hash = location.hash || '#/cluster';
  for (const [re, make] of routes) {
    const m = hash.match(re);
    const made = m && make(m);
    if (made) {
      page = made;
      el('main').replaceChildren(page.el);
      for (const a of document.querySelectorAll('[data-nav]')) {
        a.classList.toggle('active', a.dataset.nav === page.nav);
      }
      refreshSoon();
      return;
    }
  }
  location.replace('#/cluster'); // fires hashchange, which shows it
}

// The refresh loop: one refresh at a time, the next REFRESH_MS after the
// end of the last. refreshSoon (a route change, a new token) asks for one
// now, or right after the one running.
const loop = {timer: 0, busy: false, again: false};

function refreshSoon() {
  if (loop.busy) {
    loop.again = true;
    return;
  }
  clearTimeout(loop.timer);
  run();
}

async function run() {
  loop.busy = true;
  try {
    if (!document.hidden) await refresh();
  } catch (e) {
    console.error('coordflow dashboard: refresh failed', e);
  } finally {
    loop.busy = false;
    loop.timer = setTimeout(run, loop.again ? 0 : REFRESH_MS);
    loop.again = false;
  }
}

async function refresh() {
  session.authProblem = null;
  const current = page;
  let status = null;
  let statusError = null;
  try {
    status = await get('/v1/status', {fresh: true});
  } catch (e) {
    statusError = e;
  }
  renderNode(status);
  renderBanner(status, statusError);
  if (!status) {
    // The coordinator does not answer: keep the last data, under the
    // banner that says so.
    el('updated').textContent = `Cannot reach the coordinator since ${timeOfDay(new Date())}; retrying every ${REFRESH_MS / 1000} s.`;
    return;
  }
  session.stale = !status.serves_reads;
  if (current) {
    await current.refresh({status, now: Date.now()});
    document.title = `${current.title()} · ${status.id} · coordflow`;
  }
  renderToken();
  el('updated').textContent = `Updated ${timeOfDay(new Date())} from ${status.id}; refreshes every ${REFRESH_MS / 1000} s.`;
}

function timeOfDay(d) {
  return d.toLocaleTimeString('en-GB', {hour12: false});
}

// renderNode shows the serving coordinator in the header: id, Raft state,
// term and version.
function renderNode(status) {
  if (!status) {
    el('node').replaceChildren(badge('unreachable', 'bad'));
    return;
  }
  el('node').replaceChildren(
    h('span', {class: 'node-id', 'data-testid': 'node-id', title: 'the coordinator serving this page'}, status.id),
    badge(status.state, statusKind(status.state), {'data-testid': 'node-state'}),
    h('span', {class: 'muted'}, `term ${status.term}`),
    status.version ? h('span', {class: 'muted', 'data-testid': 'node-version'}, status.version) : null,
  );
}

// renderBanner says, above every page, what is wrong with the cluster as
// the serving coordinator sees it; it is hidden when nothing is.
function renderBanner(status, statusError) {
  const banner = el('banner');
  let kind = '';
  let text = '';
  if (!status) {
    kind = 'bad';
    text = `Cannot reach coordinator ${location.host}: ${statusError.message}. The data below is from its last answer.`;
  } else if (!status.known_leader) {
    kind = 'bad';
    text = 'No leader: the cluster has no quorum or is electing one. Writes are refused; ' +
      `the data below is ${status.id}'s last known state.`;
  } else if (!status.can_apply) {
    kind = 'bad';
    text = `${status.id} cannot apply the Raft log${status.apply_error ? `: ${status.apply_error}` : ''}. Its data below may be old.`;
  } else if (!status.serves_reads) {
    kind = 'warn';
    text = `${status.id} may be behind the leader${status.stale_reason ? ` (${status.stale_reason})` : ''}; the data below is its local state.`;
  }
  banner.hidden = text === '';
  banner.className = `banner banner-${kind}`;
  banner.textContent = text;
}

// renderToken shows the token form after a 401 or 403, and the "Forget
// token" button while a token is stored.
function renderToken() {
  const problem = session.authProblem;
  const form = el('token-form');
  form.hidden = !problem;
  if (problem) {
    let reason = `The token has too little permission for this page (the read role is needed): ${problem.message}.`;
    if (problem.status === 401) {
      reason = token() ? `The API refused the token: ${problem.message}.` : `The API needs a token: ${problem.message}.`;
    }
    el('token-reason').textContent = reason;
  }
  el('forget-token').hidden = !token();
}

el('token-form').addEventListener('submit', ev => {
  ev.preventDefault();
  setToken(el('token-input').value.trim());
  el('token-input').value = '';
  refreshSoon();
});
el('forget-token').addEventListener('click', () => {
  setToken('');
  refreshSoon();
});
window.addEventListener('hashchange', showRoute);
document.addEventListener('visibilitychange', () => {
  if (!document.hidden) refreshSoon();
});
showRoute();
