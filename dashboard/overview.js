// The overview: totals, charts, tables by api and model, top keys, alerts.

import { get } from './api.js';
import { Chart } from './charts.js';
import { cost, group, instant, int, ms, pct, ratio } from './format.js';
import { h, Section, SortTable } from './ui.js';

const ERROR_TYPES = ['rate_limit', 'timeout', 'server_error', 'client_error', 'other'];
const KEYS_SHOWN = 25;
/** Rows of the ranked "by API" and "by model" sections (the most requests first). */
const RANKED_SHOWN = 100;
/** Exact cost as an integer of nano-units, for sorting. */
const nanos = (m) => BigInt(m.cost.replace('.', ''));

/** Columns shared by the api and model tables; the name filters the overview by it. */
function measureColumns(name, label, onFilter) {
  return [
    {
      id: name, label, header: true, value: (r) => r[name], text: (r) => (r[name] === '' ? '(none)' : r[name]),
      cell: (r) => h('button', { type: 'button', class: 'linkish', title: `Show only ${name} ${r[name] || '(none)'}`, onclick: () => onFilter(name, r[name]) }, r[name] === '' ? '(none)' : r[name]),
    },
    { id: 'requests', label: 'Requests', num: true, value: (r) => r.requests, text: (r) => int(r.requests) },
    { id: 'errors', label: 'Errors', num: true, value: (r) => r.errors, text: (r) => int(r.errors) },
    { id: 'error_rate', label: 'Error rate', num: true, value: (r) => ratio(r.errors, r.requests), text: (r) => pct(ratio(r.errors, r.requests)) },
    { id: 'cache_rate', label: 'Cache hits', num: true, value: (r) => ratio(r.cached, r.requests), text: (r) => pct(ratio(r.cached, r.requests)) },
    { id: 'p50', label: 'p50', num: true, value: (r) => r.latency_ms.p50, text: (r) => ms(r.latency_ms.p50) },
    { id: 'p95', label: 'p95', num: true, value: (r) => r.latency_ms.p95, text: (r) => ms(r.latency_ms.p95) },
    { id: 'p99', label: 'p99', num: true, value: (r) => r.latency_ms.p99, text: (r) => ms(r.latency_ms.p99) },
    { id: 'tokens_in', label: 'Tokens in', num: true, value: (r) => r.tokens_in, text: (r) => int(r.tokens_in) },
    { id: 'tokens_out', label: 'Tokens out', num: true, value: (r) => r.tokens_out, text: (r) => int(r.tokens_out) },
    { id: 'cost', label: 'Cost', num: true, value: nanos, raw: (r) => r.cost, text: (r) => cost(r.cost) },
  ];
}

function parseSort(text, fallback) {
  const [id, dir] = (text || '').split(':');
  return id ? { id, desc: dir !== 'asc' } : fallback;
}

function sortText(s) {
  return `${s.id}:${s.desc ? 'desc' : 'asc'}`;
}

/** A figure: label, value (with `data-metric` and the raw `data-value`), note. */
function figure(metric, label, text, raw, note) {
  return h('div', { class: 'figure', 'data-metric': metric, 'data-value': raw },
    h('span', { class: 'figure-label' }, label),
    h('span', { class: 'figure-value' }, text),
    note ? h('span', { class: 'figure-note' }, note) : null);
}

/** The totals of one measures object as figures. */
export function totalsFigures(t) {
  const byType = ERROR_TYPES.map((e) => `${e.replace('_', ' ')} ${int(t.errors_by_type[e])}`).join(' · ');
  return [
    figure('requests', 'Requests', int(t.requests), t.requests),
    figure('error_rate', 'Error rate', pct(ratio(t.errors, t.requests)), t.errors, `${int(t.errors)} errors: ${byType}`),
    figure('cache_rate', 'Cache hit rate', pct(ratio(t.cached, t.requests)), t.cached, `${int(t.cached)} cached`),
    figure('latency', 'Latency p50 / p95 / p99', `${ms(t.latency_ms.p50)} / ${ms(t.latency_ms.p95)} / ${ms(t.latency_ms.p99)}`, t.latency_ms.p95 ?? ''),
    figure('tokens', 'Tokens in / out', `${int(t.tokens_in)} / ${int(t.tokens_out)}`, `${t.tokens_in}/${t.tokens_out}`),
    figure('cost', 'Cost', cost(t.cost), t.cost),
  ];
}

/** Mounts the overview in `main`; returns `{refresh, errors}`. */
export function mount(main, state, ctx) {
  main.append(h('h1', { class: 'sr-only' }, 'Overview'));
  const totals = new Section(main, 'Totals', 'totals');
  const range = h('p', { class: 'covered', id: 'covered' });
  totals.head.append(range);
  const figures = h('div', { class: 'figures' });
  const filterBar = h('p', { class: 'filters', id: 'filters' });
  totals.body.append(filterBar, figures);
  const toggleFilter = (dim, value) => {
    const cur = state.filters[dim] || [];
    const next = cur.includes(value) ? cur.filter((v) => v !== value) : [...cur, value];
    ctx.setState({ filters: { ...state.filters, [dim]: next } });
  };
  const renderFilters = (filters) => {
    const chips = Object.entries(filters).flatMap(([dim, values]) => values.map((v) => h('button', {
      type: 'button', class: 'chip', 'data-filter': `${dim}=${v}`, title: 'Remove this filter', onclick: () => toggleFilter(dim, v),
    }, `${dim} = ${v === '' ? '(none)' : v} ✕`)));
    filterBar.hidden = !chips.length;
    filterBar.replaceChildren(...(chips.length ? ['Only ', ...chips] : []));
  };
  renderFilters(state.filters);

  const charts = new Section(main, 'Over time', 'charts');
  const grid = h('div', { class: 'charts' });
  charts.body.append(grid);
  const reqChart = new Chart(grid, {
    title: 'Requests by outcome',
    stacked: true,
    series: [{ label: 'success', color: '#2f6fb0' }, ...ERROR_TYPES.map((e, i) => ({
      label: e, color: ['#c0392b', '#d68910', '#8e44ad', '#e67e22', '#7f8c8d'][i],
    }))],
    format: (v) => int(Math.round(v)),
  });
  const costChart = new Chart(grid, { title: 'Cost', series: [{ label: 'cost', color: '#16a085' }], format: (v) => v.toLocaleString(undefined, { maximumFractionDigits: 4 }) });
  const latChart = new Chart(grid, { title: 'Latency p95 (ms)', series: [{ label: 'p95', color: '#8e44ad' }], format: (v) => int(Math.round(v)) });
  // The charts' numbers as a table: for screen readers, and to copy from.
  const seriesBody = h('tbody');
  charts.body.append(h('details', { class: 'series-data' },
    h('summary', {}, 'Chart data as a table'),
    h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'series-table' },
      h('thead', {}, h('tr', {}, ...['Bucket', 'Requests', 'Errors', 'Cost', 'p95'].map((c, i) => h('th', { scope: 'col', class: i ? 'num' : null }, c)))),
      seriesBody))));

  const apis = new Section(main, 'By API', 'by-api');
  const apiTable = new SortTable(apis.body, {
    caption: 'Measures by API',
    columns: measureColumns('api', 'API', toggleFilter),
    sort: parseSort(state.sortApi, { id: 'requests', desc: true }),
    onSort: (s) => ctx.setState({ sortApi: sortText(s) }, { reload: false }),
    rowKey: (r) => r.api,
  });
  const models = new Section(main, 'By model', 'by-model');
  const modelTable = new SortTable(models.body, {
    caption: 'Measures by model',
    columns: measureColumns('model', 'Model', toggleFilter),
    sort: parseSort(state.sortModel, { id: 'cost', desc: true }),
    onSort: (s) => ctx.setState({ sortModel: sortText(s) }, { reload: false }),
    rowKey: (r) => r.model,
  });

  const keys = new Section(main, 'Top keys', 'top-keys');
  const search = h('input', { type: 'search', name: 'q', value: state.q, placeholder: 'Search keys; Enter opens an exact key', 'aria-label': 'Search keys' });
  const order = h('select', { name: 'keys_by', 'aria-label': 'Rank keys by' },
    ...[['cost', 'by cost'], ['requests', 'by requests'], ['tokens', 'by tokens'], ['errors', 'by errors']]
      .map(([v, l]) => h('option', { value: v, selected: v === state.keysBy }, l)));
  const keyTools = h('div', { class: 'tools' }, order, search);
  keys.head.append(keyTools);
  const keyNote = h('p', { class: 'note' });
  keys.body.append(keyNote);
  const keyTable = new SortTable(keys.body, {
    caption: 'Top keys',
    columns: [
      { id: 'key', label: 'Key', header: true, value: (r) => r.key, cell: (r) => h('a', { href: `/dashboard/keys/${encodeURIComponent(r.key)}${location.search}`, 'data-nav': true }, r.key), text: (r) => r.key },
      { id: 'requests', label: 'Requests', num: true, value: (r) => r.requests, text: (r) => int(r.requests) },
      { id: 'errors', label: 'Errors', num: true, value: (r) => r.errors, text: (r) => int(r.errors) },
      { id: 'tokens', label: 'Tokens', num: true, value: (r) => r.tokens_in + r.tokens_out, text: (r) => int(r.tokens_in + r.tokens_out) },
      { id: 'cost', label: 'Cost', num: true, value: nanos, raw: (r) => r.cost, text: (r) => cost(r.cost) },
    ],
    sort: { id: state.keysBy === 'requests' ? 'requests' : state.keysBy === 'tokens' ? 'tokens' : state.keysBy === 'errors' ? 'errors' : 'cost', desc: true },
    rowKey: (r) => r.key,
  });
  let lastKeys = null;
  const renderKeys = () => {
    if (!lastKeys) return;
    const q = search.value.trim().toLowerCase();
    const list = q ? lastKeys.keys.filter((k) => k.key.toLowerCase().includes(q)) : lastKeys.keys;
    keyTable.update(list.slice(0, KEYS_SHOWN));
    keyNote.textContent = q
      ? `${int(list.length)} of the top ${int(lastKeys.keys.length)} keys match “${search.value.trim()}”; press Enter to open a key by its exact name.`
      : `${int(Math.min(KEYS_SHOWN, lastKeys.keys.length))} of ${int(lastKeys.total_keys)} keys with usage in the range.`;
  };
  let searchTimer = null;
  search.addEventListener('input', () => {
    clearTimeout(searchTimer);
    renderKeys();
    searchTimer = setTimeout(() => ctx.setState({ q: search.value.trim() }, { reload: Boolean(search.value.trim()) !== Boolean(state.q) }), 300);
  });
  search.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && search.value.trim()) {
      ev.preventDefault();
      ctx.navigate(`/dashboard/keys/${encodeURIComponent(search.value.trim())}`);
    }
  });
  order.addEventListener('change', () => {
    keyTable.sort = { id: order.value, desc: true };
    ctx.setState({ keysBy: order.value });
  });

  const alerts = new Section(main, 'Alerts', 'alerts');
  const activeHead = h('h3', {}, 'Active (pending and firing)');
  const activeBox = h('div');
  const historyHead = h('h3', {}, 'Latest notifications');
  const historyBox = h('div');
  alerts.body.append(activeHead, activeBox, historyHead, historyBox);

  const sections = [totals, charts, apis, models, keys, alerts];
  const failures = new Map();

  async function load(section, promise, render) {
    try {
      const data = await promise;
      failures.delete(section);
      render(data);
    } catch (e) {
      failures.set(section, e);
      section.error(e);
    }
  }

  async function refresh(st, r) {
    state = st;
    if (r.error) {
      for (const s of sections) s.error({ message: r.error });
      return;
    }
    renderFilters(st.filters);
    const common = { from: r.from.toISOString(), to: r.to.toISOString(), tz: st.tz, ...st.filters };
    const g = r.granularity;
    const q = search.value.trim();
    await Promise.all([
      load(totals, get('/v1/stats', { ...common, granularity: g, fill: 'zero' }), (s) => {
        const t = s.totals[0];
        range.textContent = `${r.label}: ${instant(s.covered.from, st.tz)} → ${instant(s.covered.to, st.tz)} (${st.tz}), by ${g}`;
        totals.show(t, () => figures.replaceChildren(...totalsFigures(t)));
        if (!t.requests) charts.empty('No events in this range.');
        else charts.show({ series: s.series, tz: st.tz }, () => {
          const xs = s.series.map((p) => Date.parse(p.bucket) / 1000);
          reqChart.setData(xs, [s.series.map((p) => p.successes), ...ERROR_TYPES.map((e) => s.series.map((p) => p.errors_by_type[e]))], st.tz);
          costChart.setData(xs, [s.series.map((p) => p.cost_nanos / 1e9)], st.tz);
          latChart.setData(xs, [s.series.map((p) => p.latency_ms.p95)], st.tz);
          seriesBody.replaceChildren(...s.series.map((p) => h('tr', { 'data-bucket': p.bucket },
            h('th', { scope: 'row' }, instant(p.bucket, st.tz)),
            h('td', { class: 'num', 'data-col': 'requests', 'data-value': p.requests }, int(p.requests)),
            h('td', { class: 'num', 'data-col': 'errors', 'data-value': p.errors }, int(p.errors)),
            h('td', { class: 'num', 'data-col': 'cost', 'data-value': p.cost }, cost(p.cost)),
            h('td', { class: 'num', 'data-col': 'p95' }, ms(p.latency_ms.p95)))));
        });
      }),
      load(apis, get('/v1/stats', { ...common, granularity: g, group_by: 'api', series: 'false', order_by: 'requests', limit: RANKED_SHOWN }), (s) => {
        const rows = s.totals.map((t) => ({ ...t, api: t.group.api }));
        if (!rows.length) apis.empty('No events in this range.');
        else apis.show(rows, () => apiTable.update(rows));
      }),
      load(models, get('/v1/stats', { ...common, granularity: g, group_by: 'model', series: 'false', order_by: 'requests', limit: RANKED_SHOWN }), (s) => {
        const rows = s.totals.map((t) => ({ ...t, model: t.group.model }));
        if (!rows.length) models.empty('No events in this range.');
        else models.show(rows, () => modelTable.update(rows));
      }),
      load(keys, get('/v1/keys', { ...common, order_by: st.keysBy, limit: q ? 1000 : KEYS_SHOWN }), (k) => {
        lastKeys = k;
        if (!k.keys.length) keys.empty('No key has usage in this range.');
        else keys.show(k, renderKeys);
      }),
      load(alerts, get('/v1/alerts', { limit: 20 }), (a) => {
        alerts.show(a, () => {
          activeBox.replaceChildren(a.active.length ? alertTable(a.active, st.tz) : h('p', { class: 'state', 'data-state': 'empty' }, 'No active alerts.'));
          historyBox.replaceChildren(a.history.length ? historyTable(a.history, st.tz) : h('p', { class: 'state', 'data-state': 'empty' }, 'No notifications yet.'));
        });
      }),
    ]);
  }

  return { refresh, errors: () => [...failures.values()] };
}

/** Active alert instances. */
export function alertTable(active, tz) {
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'active-alerts' },
    h('thead', {}, h('tr', {}, ...['Rule', 'Severity', 'State', 'Level', 'Group', 'Value', 'Threshold', 'Since'].map((c, i) => h('th', { scope: 'col', class: i >= 5 && i <= 6 ? 'num' : null }, c)))),
    h('tbody', {}, ...active.map((a) => h('tr', { 'data-alert': a.alert_id, 'data-rule': a.rule, 'data-state': a.state },
      h('th', { scope: 'row' }, a.rule),
      h('td', {}, h('span', { class: `sev sev-${a.severity}` }, a.severity)),
      h('td', {}, a.state),
      h('td', {}, a.level ?? '–'),
      h('td', {}, group(a.group)),
      h('td', { class: 'num' }, a.value === null ? '–' : a.value.toLocaleString()),
      h('td', { class: 'num' }, a.threshold === null ? '–' : a.threshold.toLocaleString()),
      h('td', {}, instant(a.firing_since || a.started_at, tz)))))));
}

function historyTable(history, tz) {
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data', id: 'notifications' },
    h('thead', {}, h('tr', {}, ...['Time', 'Rule', 'Severity', 'State', 'Group', 'Value'].map((c, i) => h('th', { scope: 'col', class: i === 5 ? 'num' : null }, c)))),
    h('tbody', {}, ...history.map((n) => h('tr', { 'data-rule': n.rule, 'data-state': n.state },
      h('td', {}, instant(n.created_at, tz)),
      h('th', { scope: 'row' }, n.rule),
      h('td', {}, h('span', { class: `sev sev-${n.severity}` }, n.severity)),
      h('td', {}, n.state),
      h('td', {}, group(n.group)),
      h('td', { class: 'num' }, n.value === null ? '–' : n.value.toLocaleString()))))));
}
