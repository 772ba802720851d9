// Time-series charts on the vendored uPlot: stacked areas (requests by
// outcome) and lines (cost, latency), redrawn in place on refresh.

import uPlot from './uPlot.esm.js';
import { h } from './ui.js';

const PALETTE = ['#2f6fb0', '#c0392b', '#d68910', '#8e44ad', '#16a085', '#7f8c8d', '#2c3e50'];

/** A chart in `parent`; `series`: `[{label, color}]`; `stacked` sums them upwards. */
export class Chart {
  constructor(parent, { title, series, stacked = false, format = (v) => String(v) }) {
    this.spec = { series, stacked, format };
    this.box = h('figure', { class: 'chart' }, h('figcaption', {}, title));
    this.plotEl = h('div', { class: 'plot', role: 'img', 'aria-label': title });
    this.box.append(this.plotEl);
    parent.append(this.box);
    this.u = null;
    this.tz = null;
    new ResizeObserver(() => this.resize()).observe(this.box);
  }

  width() {
    return Math.max(280, this.box.clientWidth - 8);
  }

  resize() {
    if (this.u) this.u.setSize({ width: this.width(), height: 220 });
  }

  /** `xs`: bucket starts (Unix seconds); `ys`: one array per series (null: no value). */
  setData(xs, ys, tz) {
    const { series, stacked, format } = this.spec;
    const raw = ys;
    let data = ys;
    if (stacked) {
      // Cumulative from the bottom; the top band is drawn first so each lower
      // band paints over it.
      const sums = [];
      let acc = xs.map(() => 0);
      for (const y of ys) {
        acc = acc.map((a, i) => a + (y[i] || 0));
        sums.push(acc);
      }
      data = sums.reverse();
    }
    const order = stacked ? [...series].reverse() : series;
    const rawOrdered = stacked ? [...raw].reverse() : raw;
    if (!this.u || this.tz !== tz) {
      if (this.u) this.u.destroy();
      this.tz = tz;
      const opts = {
        width: this.width(),
        height: 220,
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), tz),
        scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] } },
        axes: [
          {},
          { size: 70, values: (u, vals) => vals.map((v) => format(v)) },
        ],
        series: [
          {},
          ...order.map((s, i) => ({
            label: s.label,
            stroke: s.color || PALETTE[i % PALETTE.length],
            fill: stacked ? (s.color || PALETTE[i % PALETTE.length]) + 'cc' : undefined,
            width: stacked ? 1 : 2,
            spanGaps: false,
            points: { show: false },
            value: (u, v, si, idx) => {
              if (idx === null || idx === undefined) return '–';
              const r = this.raw[si - 1] && this.raw[si - 1][idx];
              return r === null || r === undefined ? '–' : format(r);
            },
          })),
        ],
      };
      this.raw = rawOrdered;
      this.u = new uPlot(opts, [xs, ...data], this.plotEl);
    } else {
      this.raw = rawOrdered;
      this.u.setData([xs, ...data]);
    }
  }
}
