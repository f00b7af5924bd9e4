// DOM building and number formatting shared by the pages.
//
// Text from the API reaches the page only as text nodes (h's string
// children, textContent), never through HTML parsing: a job name or an error
// message cannot become markup, and the Content-Security-Policy can forbid
// inline script and style altogether.

const SVG_NS = 'http://www.w3.org/2000/svg';

// build creates an element with attributes and children. An attribute whose
// value is null, undefined or false is left out, true sets it empty, and a
// function under an "on..." name is an event listener. Children may be
// nodes, strings, numbers or (nested) arrays of them; null, undefined and
// false are skipped.
function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  el.append(...flatten(children));
  return el;
}

function flatten(children) {
  const out = [];
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) out.push(...flatten(c));
    else out.push(c instanceof Node ? c : String(c));
  }
  return out;
}

// h creates an HTML element: h('a', {href: '#/jobs'}, 'Jobs').
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

// svg creates an SVG element, as h does an HTML one.
export function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

// section is a card of a page: a title, a line for the error of its last
// refresh, and a body. A failed refresh keeps the last body (marked by the
// error line above it) rather than blanking data the reader may be using.
export function section(title, {testid, wide} = {}) {
  const note = h('span', {class: 'note'});
  const error = h('p', {class: 'section-error', role: 'status', hidden: true});
  const body = h('div', {class: 'section-body'});
  const el = h('section', {class: wide ? 'card wide' : 'card', 'data-testid': testid},
    h('header', {class: 'card-head'}, h('h2', {}, title), note), error, body);
  return {
    el,
    note,
    show(...nodes) {
      error.hidden = true;
      error.textContent = '';
      body.replaceChildren(...flatten(nodes));
    },
    fail(err) {
      error.hidden = false;
      error.textContent = err instanceof Error ? err.message : String(err);
    },
  };
}

// table renders items as a table: columns are {label, num, title} (num
// right-aligns the column), row(item) returns {cells, attrs} for one row.
// With no items it is a short sentence, empty.
export function table(columns, items, row, empty) {
  if (!items || items.length === 0) return h('p', {class: 'empty'}, empty);
  const head = h('tr', {}, columns.map(c => h('th', {class: c.num ? 'num' : null, title: c.title}, c.label)));
  const rows = items.map(item => {
    const {cells, attrs} = row(item);
    return h('tr', attrs, cells.map((cell, i) => h('td', {class: columns[i].num ? 'num' : null}, cell)));
  });
  return h('div', {class: 'table-wrap'}, h('table', {}, h('thead', {}, head), h('tbody', {}, rows)));
}

// badge is a small coloured label; kind picks the colour (style.css).
export function badge(text, kind, attrs) {
  return h('span', {...attrs, class: `badge badge-${kind || 'plain'}`}, text);
}

// statusKind maps a status of the API (job, checkpoint, Raft, gossip) to a
// badge colour.
export function statusKind(status) {
  switch (String(status || '').toLowerCase()) {
    case 'running': case 'completed': case 'alive': case 'leader': return 'ok';
    case 'pending': case 'restarting': case 'suspect': case 'candidate': case 'staging': return 'warn';
    case 'failing': case 'failed': case 'aborted': case 'dead': case 'shutdown': return 'bad';
    default: return 'plain';
  }
}

// DASH stands for a value the API did not give.
export const DASH = '–';

const intFormat = new Intl.NumberFormat('en-US');

// int formats a count with thousands separators.
export function int(n) {
  return typeof n === 'number' && Number.isFinite(n) ? intFormat.format(n) : DASH;
}

// rate formats records per second.
export function rate(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return DASH;
  return (n < 10 ? n.toFixed(1) : intFormat.format(Math.round(n))) + '/s';
}

// bytes formats a size in bytes with binary units.
export function bytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return DASH;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

// millis formats a duration given in milliseconds, as a checkpoint's.
export function millis(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return DASH;
  if (ms === 0) return '0 ms';
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  return span(ms);
}

// span formats a long duration coarsely: 45s, 3m 20s, 2h 05m, 3d 4h.
export function span(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return DASH;
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor(s / 60) % 60).padStart(2, '0')}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor(s / 3600) % 24}h`;
}

// parseTime returns the milliseconds since the epoch of an RFC 3339 time of
// the API, or NaN for an empty or zero (year 1) time.
export function parseTime(s) {
  if (typeof s !== 'string' || s === '') return NaN;
  // Go writes up to nine fractional digits; Date.parse is only specified
  // for three.
  const t = Date.parse(s.replace(/(\.\d{3})\d+/, '$1'));
  return t > 0 ? t : NaN;
}

// age formats how long ago an RFC 3339 time was, as "12s ago".
export function age(s, now) {
  const t = parseTime(s);
  return Number.isNaN(t) ? DASH : `${span(now - t)} ago`;
}

// clock formats a time of day, with the date when it is not today; the
// element's title holds the time as the API gave it.
export function clock(s) {
  const t = parseTime(s);
  if (Number.isNaN(t)) return h('span', {}, DASH);
  const d = new Date(t);
  const pad = n => String(n).padStart(2, '0');
  let text = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (d.toDateString() !== new Date().toDateString()) {
    text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${text}`;
  }
  return h('time', {datetime: s, title: s}, text);
}

// jobLink links to a job's page.
export function jobLink(id, text) {
  return h('a', {href: `#/jobs/${encodeURIComponent(id)}`}, text || id);
}
