// A key's page: today, this month and the last 24 h (as on
// GET /v1/keys/{key}/stats), its quota, by model and by api, its alerts.

import { get } from './api.js';
import { cost, instant, int, ms, pct, ratio } from './format.js';
import { alertTable, totalsFigures } from './overview.js';
import { h, Section, SortTable } from './ui.js';

const nanos = (m) => BigInt(m.cost.replace('.', ''));

function columns(name, label) {
  return [
    { id: name, label, header: true, value: (r) => r[name], text: (r) => (r[name] === '' ? '(none)' : r[name]) },
    { id: 'requests', label: 'Requests', num: true, value: (r) => r.requests, text: (r) => int(r.requests) },
    { id: 'error_rate', label: 'Error rate', num: true, value: (r) => ratio(r.errors, r.requests), text: (r) => pct(ratio(r.errors, r.requests)) },
    { id: 'p95', label: 'p95', num: true, value: (r) => r.latency_ms.p95, text: (r) => ms(r.latency_ms.p95) },
    { id: 'tokens_in', label: 'Tokens in', num: true, value: (r) => r.tokens_in, text: (r) => int(r.tokens_in) },
    { id: 'tokens_out', label: 'Tokens out', num: true, value: (r) => r.tokens_out, text: (r) => int(r.tokens_out) },
    { id: 'cost', label: 'Cost', num: true, value: nanos, raw: (r) => r.cost, text: (r) => cost(r.cost) },
  ];
}

/** The quota as a bar: used of limit, remaining, when it resets. */
function quotaBar(q, tz) {
  const used = q.used;
  const share = q.limit > 0 ? Math.min(1, used / q.limit) : 1;
  const fmt = q.measure === 'cost' ? (v) => cost(String(v)) : (v) => int(v);
  return h('div', { class: `quota${q.exceeded ? ' exceeded' : ''}`, id: 'quota', 'data-used': used, 'data-limit': q.limit },
    h('p', {}, `${q.measure} over a rolling ${q.window}: ${fmt(used)} of ${fmt(q.limit)} used, ${fmt(q.remaining)} remaining`,
      q.exceeded ? h('strong', {}, ' — exceeded') : null),
    h('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': q.limit, 'aria-valuenow': used, 'aria-label': `${q.measure} quota used` },
      h('div', { class: 'fill', style: `width: ${(share * 100).toFixed(2)}%` })),
    h('p', { class: 'note' }, q.resets_at ? `Usage next drops at ${instant(q.resets_at, tz)} (window from ${instant(q.window_start, tz)}).` : 'No usage in the window.'));
}

/** Mounts a key's page in `main`; returns `{refresh, errors}`. */
export function mount(main, state, ctx) {
  const back = h('a', { href: `/dashboard${location.search}`, 'data-nav': true, class: 'back' }, '← Overview');
  main.append(back, h('h1', { class: 'key-title' }, 'Key ', h('code', {}, state.key)));
  const periods = new Section(main, 'Usage', 'key-periods');
  const grid = h('div', { class: 'periods' });
  periods.body.append(grid);
  const quota = new Section(main, 'Quota', 'key-quota');
  const models = new Section(main, 'By model, this month', 'key-models');
  const modelTable = new SortTable(models.body, { caption: 'This key by model', columns: columns('model', 'Model'), sort: { id: 'cost', desc: true }, rowKey: (r) => r.model });
  const apis = new Section(main, 'By API, this month', 'key-apis');
  const apiTable = new SortTable(apis.body, { caption: 'This key by API', columns: columns('api', 'API'), sort: { id: 'cost', desc: true }, rowKey: (r) => r.api });
  const alerts = new Section(main, 'Alerts for this key', 'key-alerts');
  const failures = new Map();

  async function load(sections, promise, render) {
    try {
      const data = await promise;
      for (const s of sections) failures.delete(s);
      render(data);
    } catch (e) {
      for (const s of sections) {
        failures.set(s, e);
        s.error(e);
      }
    }
  }

  async function refresh(st) {
    await Promise.all([
      load([periods, quota, models, apis], get(`/v1/keys/${encodeURIComponent(st.key)}/stats`, { tz: st.tz }), (k) => {
        periods.show({ t: k.today, m: k.this_month, d: k.last_24h, tz: st.tz }, () => {
          grid.replaceChildren(...[['today', 'Today', k.today], ['this_month', 'This month', k.this_month], ['last_24h', 'Last 24 hours', k.last_24h]]
            .map(([id, label, m]) => h('div', { class: 'period', 'data-period': id },
              h('h3', {}, label, h('span', { class: 'covered' }, ` ${instant(m.covered.from, st.tz)} → ${instant(m.covered.to, st.tz)}`)),
              h('div', { class: 'figures' }, ...totalsFigures(m)))));
        });
        if (k.quota) quota.show({ q: k.quota, tz: st.tz }, () => quota.body.replaceChildren(quotaBar(k.quota, st.tz)));
        else quota.empty('No quota is set for this key (PUT /v1/keys/{key}/quota sets one).');
        const byModel = k.by_model;
        if (byModel.length) models.show(byModel, () => modelTable.update(byModel));
        else models.empty('No usage this month.');
        const byApi = k.by_api;
        if (byApi.length) apis.show(byApi, () => apiTable.update(byApi));
        else apis.empty('No usage this month.');
      }),
      load([alerts], get('/v1/alerts', { group: `key:${st.key}`, limit: 20 }), (a) => {
        if (!a.active.length) alerts.empty(a.history.length ? `No active alerts (${a.history.length} past notifications).` : 'No alerts for this key.');
        else alerts.show(a.active, () => alerts.body.replaceChildren(alertTable(a.active, st.tz)));
      }),
    ]);
  }

  return { refresh, errors: () => [...failures.values()] };
}
