// A small SVG line chart: enough for a checkpoint's duration and size over
// its id, with no library.

import {h, svg} from './dom.js';

// Geometry of the chart, in viewBox units (the SVG scales to its box).
const W = 520;
const H = 190;
const PAD = {left: 70, right: 14, top: 12, bottom: 30};

// niceCeil rounds v up to 1, 2 or 5 times a power of ten, times a power of
// base (1000 for plain numbers, 1024 for bytes), so that the top gridline
// and the middle one have round labels: 20 ms and 10 ms, 20 KiB and 10 KiB.
function niceCeil(v, base) {
  if (!(v > 0)) return 1;
  const unit = base ** Math.max(0, Math.floor(Math.log(v) / Math.log(base)));
  const p = 10 ** Math.floor(Math.log10(v / unit));
  for (const m of [1, 2, 5, 10]) if (m * p * unit >= v) return m * p * unit;
  return 10 * p * unit;
}

// lineChart draws points ({x, y, title, mark}, ascending x) as a line with
// dots; y is formatted with format on the axis (in units of base: 1000, or
// 1024 for bytes), title is a dot's tooltip and mark a class for it. With
// fewer than two points it returns the sentence empty.
export function lineChart({points, format, base = 1000, label, testid, empty}) {
  if (points.length < 2) return h('p', {class: 'empty', 'data-testid': testid}, empty);
  const x0 = points[0].x;
  const x1 = points[points.length - 1].x === x0 ? x0 + 1 : points[points.length - 1].x;
  const ymax = niceCeil(Math.max(...points.map(p => p.y)), base);
  const px = x => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = y => PAD.top + (1 - y / ymax) * (H - PAD.top - PAD.bottom);

  const grid = [0, ymax / 2, ymax].map(v => [
    svg('line', {class: 'grid', x1: PAD.left, x2: W - PAD.right, y1: py(v), y2: py(v)}),
    svg('text', {class: 'axis', x: PAD.left - 6, y: py(v) + 4, 'text-anchor': 'end'}, format(v)),
  ]);
  const ticks = [...new Set([x0, Math.round((x0 + x1) / 2), points[points.length - 1].x])].map(x =>
    svg('text', {class: 'axis', x: px(x), y: H - 10, 'text-anchor': 'middle'}, `#${x}`));
  const line = svg('polyline', {class: 'line', points: points.map(p => `${px(p.x)},${py(p.y)}`).join(' ')});
  const dots = points.map(p =>
    svg('circle', {class: p.mark ? `dot ${p.mark}` : 'dot', cx: px(p.x), cy: py(p.y), r: 3}, svg('title', {}, p.title)));
  return svg('svg', {class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, 'data-testid': testid},
    svg('title', {}, label), grid, ticks, line, dots);
}
