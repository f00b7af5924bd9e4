// The Cluster page: the coordinators of the Raft configuration with their
// own view of Raft, and the workers with their slots and tasks.

import {list, settle} from './api.js';
import {DASH, badge, h, int, jobLink, section, statusKind, table} from './dom.js';

export function clusterPage() {
  const coords = section('Coordinators', {testid: 'coordinators'});
  const workers = section('Workers', {testid: 'workers'});
  return {
    nav: 'cluster',
    title: () => 'Cluster',
    el: h('div', {class: 'page'}, coords.el, workers.el),
    async refresh({status}) {
      const [c, w] = await settle([list('/v1/coordinators'), list('/v1/workers')]);
      if (c.error) coords.fail(c.error);
      else renderCoordinators(coords, c.value, status);
      if (w.error) workers.fail(w.error);
      else renderWorkers(workers, w.value);
    },
  };
}

function renderCoordinators(sec, coords, status) {
  const voters = coords.filter(c => (c.suffrage || 'voter') === 'voter').length;
  const quorum = Math.floor(voters / 2) + 1;
  sec.note.textContent = `${coords.length} in the Raft configuration, ${voters} voting: a quorum is ${quorum}`;
  const columns = [
    {label: 'Coordinator'}, {label: 'Raft state'}, {label: 'Term', num: true},
    {label: 'Applied index', num: true}, {label: 'Last index', num: true},
    {label: 'Last contact', num: true, title: 'since it last heard from the leader'},
    {label: 'Gossip'}, {label: 'Suffrage'}, {label: 'Version'}, {label: 'Addresses'}, {label: 'Problem'},
  ];
  sec.show(table(columns, coords, c => ({
    attrs: {'data-testid': 'coordinator-row', 'data-id': c.id, class: c.error ? 'row-problem' : null},
    cells: [
      h('span', {class: 'nowrap'},
        h('span', {class: 'strong id'}, c.id),
        c.leader ? badge('leader', 'ok', {'data-testid': `coordinator-leader-${c.id}`}) : null,
        c.id === status.id ? badge('this page', 'plain', {title: 'the coordinator serving this page'}) : null),
      c.state ? badge(c.state, statusKind(c.state), {'data-testid': `coordinator-state-${c.id}`}) : DASH,
      int(c.term),
      int(c.applied_index),
      int(c.last_index),
      lastContact(c),
      c.gossip_status ? badge(c.gossip_status, statusKind(c.gossip_status)) : DASH,
      c.suffrage || DASH,
      c.version || DASH,
      h('span', {class: 'small nowrap'}, `raft ${c.raft_addr || DASH}`, h('br'), `http ${c.http_addr || DASH}`),
      c.error ? h('span', {class: 'error-text'}, c.error) : '',
    ],
  }), 'The Raft configuration lists no coordinator.'));
}

// lastContact formats last_contact_ms: 0 on the leader, -1 before any.
function lastContact(c) {
  if (typeof c.last_contact_ms !== 'number') return DASH;
  if (c.last_contact_ms < 0) return 'never';
  if (c.state === 'Leader') return DASH;
  return `${int(c.last_contact_ms)} ms`;
}

function renderWorkers(sec, workers) {
  const slots = workers.reduce((n, w) => n + (w.slots || 0), 0);
  const used = workers.reduce((n, w) => n + (w.slots_used || 0), 0);
  sec.note.textContent = `${workers.length} workers, ${used} of ${slots} slots used`;
  const columns = [
    {label: 'Worker'}, {label: 'Gossip'}, {label: 'Slots used'}, {label: 'Free', num: true},
    {label: 'Tasks', num: true}, {label: 'Running'}, {label: 'Data address'},
  ];
  sec.show(table(columns, workers, w => {
    const tasks = w.tasks || [];
    return {
      attrs: {'data-testid': 'worker-row', 'data-id': w.id},
      cells: [
        h('span', {class: 'strong'}, w.id),
        [w.status ? badge(w.status, statusKind(w.status)) : DASH,
          w.problem ? h('div', {class: 'error-text small'}, w.problem) : null],
        [
          h('meter', {min: 0, max: w.slots || 0, value: w.slots_used || 0, title: `${w.slots_used} of ${w.slots} slots`}),
          ` ${int(w.slots_used)} / ${int(w.slots)}`,
        ],
        int(w.slots_free),
        h('span', {'data-testid': `worker-tasks-${w.id}`}, String(tasks.length)),
        tasks.length === 0 ? h('span', {class: 'muted'}, 'idle') : h('ul', {class: 'tasks'},
          tasks.map(t => h('li', {}, jobLink(t.job), ' ', h('span', {class: 'muted'}, t.task)))),
        h('span', {class: 'small'}, w.data_addr || DASH),
      ],
    };
  }, 'No worker has joined.'));
}
