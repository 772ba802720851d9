// The dashboard shell: URL state, the range/time-zone/refresh controls, the
// router between the overview and a key's page, the freshness line and the
// refresh loop. Views only fetch and render; state lives in the URL, so any
// view can be shared as a link.

import { get } from './api.js';
import { ago, instant, int } from './format.js';
import { browserZone, formatLocal, resolveRange, validZone } from './time.js';
import * as overview from './overview.js';
import * as keyPage from './key.js';

const DEFAULT_REFRESH = Number(document.querySelector('meta[name="tally-refresh"]')?.content) || 10;
const RANGES = ['1h', '24h', '7d', '30d', 'month', 'custom'];

/** The view and its parameters, read from the URL. */
function readState() {
  const url = new URL(location.href);
  const q = url.searchParams;
  const m = /^\/dashboard\/keys\/(.+)$/.exec(url.pathname);
  const tz = q.get('tz') || browserZone();
  const refresh = q.has('refresh') ? Number(q.get('refresh')) : DEFAULT_REFRESH;
  return {
    view: m ? 'key' : 'overview',
    key: m ? decodeURIComponent(m[1]) : null,
    range: RANGES.includes(q.get('range')) ? q.get('range') : '24h',
    from: q.get('from') || '',
    to: q.get('to') || '',
    tz: validZone(tz) ? tz : 'UTC',
    refresh: Number.isFinite(refresh) && refresh >= 0 ? refresh : DEFAULT_REFRESH,
    keysBy: q.get('keys_by') || 'cost',
    q: q.get('q') || '',
    sortApi: q.get('sort_api') || '',
    sortModel: q.get('sort_model') || '',
    // Overview filters (repeatable: "any of"), passed to every query as is.
    filters: { api: q.getAll('api'), model: q.getAll('model') },
  };
}

function writeUrl(state, push) {
  const path = state.view === 'key' ? `/dashboard/keys/${encodeURIComponent(state.key)}` : '/dashboard';
  const q = new URLSearchParams();
  if (state.range !== '24h') q.set('range', state.range);
  if (state.range === 'custom') {
    q.set('from', state.from);
    q.set('to', state.to);
  }
  if (state.tz !== browserZone()) q.set('tz', state.tz);
  if (state.refresh !== DEFAULT_REFRESH) q.set('refresh', String(state.refresh));
  if (state.view === 'overview') {
    if (state.keysBy !== 'cost') q.set('keys_by', state.keysBy);
    if (state.q) q.set('q', state.q);
    if (state.sortApi) q.set('sort_api', state.sortApi);
    if (state.sortModel) q.set('sort_model', state.sortModel);
  }
  for (const [dim, values] of Object.entries(state.filters)) {
    for (const v of values) q.append(dim, v);
  }
  const url = `${path}${q.toString() ? `?${q}` : ''}`;
  if (url === location.pathname + location.search) return;
  if (push) history.pushState(null, '', url);
  else history.replaceState(null, '', url);
}

let state = readState();
let view = null;
let timer = null;
let generation = 0;

const main = document.getElementById('view');
const banner = document.getElementById('banner');
const freshness = document.getElementById('freshness');
const controls = document.getElementById('controls');

/** Shows the first error of a refresh above the page (cleared by a clean one). */
function showBanner(err) {
  if (!err) {
    banner.hidden = true;
    banner.textContent = '';
    return;
  }
  banner.hidden = false;
  const status = err.status ? `HTTP ${err.status} ${err.code}: ` : '';
  banner.textContent = `${status}${err.message}`;
}

function renderFreshness(projections, now = Date.now()) {
  const list = projections.projections || [];
  if (!list.length) {
    freshness.textContent = 'No projections loaded.';
    freshness.className = 'freshness warn';
    return;
  }
  const asOf = list.map((p) => p.as_of).filter(Boolean).sort()[0] || null;
  const lagging = list.filter((p) => p.status !== 'ok' || p.rebuilding || (p.lag_events > 0
    && (!p.as_of || now - new Date(p.as_of).getTime() > 30e3)));
  const base = `Data as of ${instant(asOf, state.tz)} (${ago(asOf, now)})`;
  if (lagging.length) {
    const what = lagging.map((p) => `${p.name}${p.rebuilding ? ' rebuilding' : p.status !== 'ok' ? ` ${p.status}` : ''}, ${int(p.lag_events)} events behind`).join('; ');
    freshness.textContent = `${base}. Projections lag: ${what}. Figures may be incomplete.`;
    freshness.className = 'freshness warn';
  } else {
    freshness.textContent = `${base}; projections are up to date.`;
    freshness.className = 'freshness';
  }
}

/** One refresh of the freshness line and the current view. */
async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;
  const range = resolveRange(state);
  const results = await Promise.allSettled([
    get('/v1/projections').then((p) => {
      if (mine === generation) renderFreshness(p);
    }),
    view.refresh(state, range),
  ]);
  if (mine !== generation) return;
  const errors = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
  const viewErrors = view.errors ? view.errors() : [];
  showBanner(errors[0] || viewErrors[0] || null);
  document.body.dataset.refreshed = String(mine);
  schedule();
}

function schedule() {
  clearTimeout(timer);
  if (state.refresh > 0) timer = setTimeout(() => {
    if (document.hidden) schedule();
    else refresh();
  }, state.refresh * 1000);
}

function mountView() {
  main.replaceChildren();
  const ctx = { setState, navigate };
  view = state.view === 'key' ? keyPage.mount(main, state, ctx) : overview.mount(main, state, ctx);
  document.title = state.view === 'key' ? `${state.key} · Tally` : 'Tally';
  // The key page shows fixed periods (today, this month, 24 h): no range picker.
  document.body.dataset.view = state.view;
}

/** Changes the state, writes the URL and refreshes; `remount` rebuilds the view. */
function setState(patch, { push = false, remount = false, reload = true } = {}) {
  state = { ...state, ...patch };
  writeUrl(state, push);
  syncControls();
  if (remount) mountView();
  if (reload) refresh();
  else schedule();
}

function navigate(path) {
  const url = new URL(path, location.origin);
  history.pushState(null, '', url.pathname + location.search);
  state = readState();
  writeUrl(state, false);
  mountView();
  refresh();
  main.focus();
}

function syncControls() {
  for (const r of controls.elements.range) r.checked = r.value === state.range;
  document.getElementById('custom-range').hidden = state.range !== 'custom';
  if (document.activeElement !== controls.elements.tz) controls.elements.tz.value = state.tz;
  if (state.range === 'custom' && ![controls.elements.from, controls.elements.to].includes(document.activeElement)) {
    controls.elements.from.value = state.from;
    controls.elements.to.value = state.to;
  }
  const sel = controls.elements.refresh;
  if (![...sel.options].some((o) => Number(o.value) === state.refresh)) {
    sel.append(new Option(`${state.refresh} s`, String(state.refresh)));
  }
  sel.value = String(state.refresh);
}

function setupControls() {
  const zones = typeof Intl.supportedValuesOf === 'function' ? Intl.supportedValuesOf('timeZone') : [];
  document.getElementById('tz-list').replaceChildren(...['UTC', ...zones].map((z) => new Option(z)));
  for (const r of controls.elements.range) {
    r.addEventListener('change', () => {
      if (r.value === 'custom') {
        const now = new Date();
        const cur = resolveRange({ ...state, range: state.range === 'custom' ? '24h' : state.range }, now);
        setState({
          range: 'custom',
          from: state.from || formatLocal(cur.from, state.tz),
          to: state.to || formatLocal(now, state.tz),
        });
      } else {
        setState({ range: r.value });
      }
    });
  }
  controls.addEventListener('submit', (ev) => {
    ev.preventDefault();
    setState({ from: controls.elements.from.value, to: controls.elements.to.value });
  });
  controls.elements.tz.addEventListener('change', () => {
    const tz = controls.elements.tz.value.trim();
    if (validZone(tz)) {
      controls.elements.tz.setCustomValidity('');
      setState({ tz });
    } else {
      controls.elements.tz.setCustomValidity(`"${tz}" is not an IANA time zone (for example Europe/Berlin)`);
      controls.elements.tz.reportValidity();
    }
  });
  controls.elements.refresh.addEventListener('change', () => {
    setState({ refresh: Number(controls.elements.refresh.value) }, { reload: false });
  });
  document.getElementById('refresh-now').addEventListener('click', () => refresh());
  // Internal links navigate without a reload.
  document.addEventListener('click', (ev) => {
    const a = ev.target.closest('a[data-nav]');
    if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
    ev.preventDefault();
    navigate(a.getAttribute('href'));
  });
  window.addEventListener('popstate', () => {
    state = readState();
    syncControls();
    mountView();
    refresh();
  });
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && state.refresh > 0) refresh();
  });
  if (state.range === 'custom') {
    controls.elements.from.value = state.from;
    controls.elements.to.value = state.to;
  }
}

setupControls();
syncControls();
writeUrl(state, false);
mountView();
refresh();
