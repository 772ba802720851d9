// Browser tests of the dashboard: headless Debian Chromium (playwright-core)
// against a real `tally serve` with seeded events whose totals are known.
// Run by scripts/test.sh after the Rust tests built target/debug/tally.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { launchBrowser, ROOT, Tally, tallyBin } from './harness.mjs';

const MIN = 60e3;
const NOW = Date.now();
const at = (msAgo) => new Date(NOW - msAgo).toISOString();
// Screenshots go to docs/ with TALLY_UPDATE_SCREENSHOTS=1, else to the temp dir.
const SHOTS = process.env.TALLY_UPDATE_SCREENSHOTS === '1' ? join(ROOT, 'docs') : null;
if (SHOTS) mkdirSync(SHOTS, { recursive: true });

/**
 * The seed: 10 events ten minutes ago and one six hours ago. Totals the
 * tests expect are written next to it.
 */
function seed() {
  const ev = [];
  for (let i = 0; i < 6; i++) {
    ev.push({
      id: `alpha-${i}`, ts: at(10 * MIN + i * 1000), api: 'openai', key: 'k_alpha', model: 'gpt-4o',
      status: i === 5 ? 429 : 200, error_type: i === 5 ? 'rate_limit' : undefined, latency_ms: 100 + i,
      tokens_in: 100, tokens_out: 50, cost: '0.125', cached: i < 2,
    });
  }
  for (let i = 0; i < 3; i++) {
    ev.push({
      id: `beta-${i}`, ts: at(10 * MIN + i * 1000), api: 'anthropic', key: 'k_beta', model: 'claude',
      status: 200, latency_ms: 300, tokens_in: 1000, tokens_out: 200, cost: '1.5',
    });
  }
  ev.push({ id: 'gamma-0', ts: at(10 * MIN), api: 'serp', key: 'k_gamma', status: 503, error_type: 'server_error', latency_ms: 50, cost: '0.000000001' });
  ev.push({ id: 'old-0', ts: at(6 * 60 * MIN), api: 'serp', key: 'k_old', status: 200, latency_ms: 10, cost: '0.01' });
  return ev;
}

/** Playwright: the raw value of a totals figure. */
const metric = (page, name) => page.locator(`#totals [data-metric="${name}"]`).getAttribute('data-value');
/** The number of completed refreshes. */
const refreshes = async (page) => Number(await page.locator('body').getAttribute('data-refreshed'));

/** Waits until the page's first refresh completed (every section loaded). */
async function loaded(page) {
  await page.waitForFunction(() => Number(document.body.dataset.refreshed) >= 1, null, { timeout: 30e3 });
}

/** Waits until `rows(page)` (a selector's `data-row`s) equals `want`. */
async function rowsAre(page, selector, want) {
  await page.waitForFunction(([sel, w]) => JSON.stringify([...document.querySelectorAll(sel)].map((tr) => tr.dataset.row)) === JSON.stringify(w), [selector, want], { timeout: 20e3 })
    .catch(async () => {
      const got = await page.locator(selector).evaluateAll((trs) => trs.map((tr) => tr.dataset.row));
      assert.deepEqual(got, want, selector);
    });
}

/** Waits until `n` more refreshes completed than `since`. */
async function afterRefreshes(page, since, n = 2) {
  await page.waitForFunction(([s, k]) => Number(document.body.dataset.refreshed) >= s + k, [since, n], { timeout: 30e3 });
}

describe('dashboard (open API)', () => {
  let tally;
  let browser;
  let page;
  const requests = [];

  before(async () => {
    tally = await Tally.start();
    await tally.ingest(seed());
    await tally.caughtUp();
    browser = await launchBrowser();
    page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
    page.on('request', (r) => requests.push(r.url()));
  });

  after(async () => {
    await browser?.close();
    await tally?.stop();
  });

  test('GET / serves the page; assets are embedded; --dashboard off answers 404', async () => {
    const r = await fetch(`${tally.base}/`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type'), /text\/html/);
    assert.match(r.headers.get('content-security-policy'), /default-src 'none'/);
    const html = await r.text();
    assert.match(html, /<meta name="tally-refresh" content="2">/);
    const js = await fetch(`${tally.base}/dashboard/assets/app.js`);
    assert.equal(js.status, 200);
    const etag = js.headers.get('etag');
    const again = await fetch(`${tally.base}/dashboard/assets/app.js`, { headers: { 'if-none-match': etag } });
    assert.equal(again.status, 304);
    assert.equal((await fetch(`${tally.base}/dashboard/assets/nope.js`)).status, 404);
    const deep = await fetch(`${tally.base}/dashboard/keys/k_alpha`);
    assert.equal(deep.status, 200);
    const off = await Tally.start({ env: { TALLY_DASHBOARD: 'off' } });
    try {
      assert.equal((await fetch(`${off.base}/`)).status, 404);
      assert.equal((await fetch(`${off.base}/dashboard/assets/app.js`)).status, 404);
    } finally {
      await off.stop();
    }
  });

  test('the overview shows the known totals, a series point, the by-api table and the top keys', async () => {
    await page.goto(`${tally.base}/?tz=UTC`);
    await loaded(page);
    // 24 h: all 11 events.
    assert.equal(await metric(page, 'requests'), '11');
    assert.equal(await metric(page, 'error_rate'), '2');
    assert.equal(await metric(page, 'cache_rate'), '2');
    assert.equal(await metric(page, 'tokens'), '3600/900');
    assert.equal(await metric(page, 'cost'), '5.260000001');
    assert.equal((await page.locator('#totals [data-metric="cost"] .figure-value').textContent()).trim(), '5.260000001');
    assert.equal((await page.locator('#totals [data-metric="requests"] .figure-value').textContent()).trim(), '11');
    // The hour bucket of the ten recent events holds all of them (or, when
    // they straddle an hour boundary, two buckets sum to ten).
    const points = await page.locator('#series-table tbody tr td[data-col="requests"]').evaluateAll((tds) => tds.map((td) => Number(td.dataset.value)));
    assert.equal(points.reduce((a, b) => a + b, 0), 11);
    const recentBucket = new Date(Math.floor((NOW - 10 * MIN) / 3600e3) * 3600e3).toISOString().replace('.000Z', 'Z');
    const recent = await page.locator(`#series-table tr[data-bucket="${recentBucket}"] td[data-col="requests"]`).getAttribute('data-value');
    assert.ok(Number(recent) >= 1 && Number(recent) <= 10, `bucket ${recentBucket}: ${recent}`);
    // By api, ranked by requests: openai 6, anthropic 3, serp 2.
    const apiRows = await page.locator('#by-api tbody tr').evaluateAll((trs) => trs.map((tr) => [tr.dataset.row, tr.querySelector('[data-col="requests"]').dataset.value, tr.querySelector('[data-col="cost"]').dataset.value]));
    assert.deepEqual(apiRows, [['openai', '6', '0.750000000'], ['anthropic', '3', '4.500000000'], ['serp', '2', '0.010000001']]);
    // Top keys by cost.
    const keys = await page.locator('#top-keys tbody tr').evaluateAll((trs) => trs.map((tr) => tr.dataset.row));
    assert.deepEqual(keys, ['k_beta', 'k_alpha', 'k_old', 'k_gamma']);
    // Sorting a table by a header is kept in the URL.
    await page.locator('#by-api th[data-col="cost"] button').click();
    await rowsAre(page, '#by-api tbody tr', ['anthropic', 'openai', 'serp']);
    assert.match(page.url(), /sort_api=cost%3Adesc|sort_api=cost:desc/);
    // A click on an API filters the whole overview by it; its chip removes it.
    await page.locator('#by-api tbody button', { hasText: 'openai' }).click();
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '6');
    assert.match(page.url(), /api=openai/);
    await rowsAre(page, '#top-keys tbody tr', ['k_alpha']);
    await page.locator('#filters [data-filter="api=openai"]').click();
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '11');
    assert.doesNotMatch(page.url(), /api=openai/);
  });

  test('changing the range and the time zone changes the request and the numbers', async () => {
    await page.goto(`${tally.base}/?tz=UTC`);
    await loaded(page);
    requests.length = 0;
    const before = await refreshes(page);
    await page.locator('.ranges label', { hasText: '1 h' }).click();
    await afterRefreshes(page, before, 1);
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '10');
    assert.ok(requests.some((u) => u.includes('/v1/stats') && u.includes('granularity=minute')), requests.join('\n'));
    assert.match(page.url(), /range=1h/);
    // A custom range is wall-clock time in the chosen zone: the same fields
    // in Asia/Kolkata (UTC+5:30) are 5.5 h earlier, where only the old event is.
    const wallUtc = (ms) => new Date(ms).toISOString().slice(0, 16);
    await page.goto(`${tally.base}/?tz=UTC&range=custom&from=${wallUtc(NOW - 120 * MIN)}&to=${wallUtc(NOW + 60 * MIN)}`);
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '10');
    requests.length = 0;
    const tz = page.locator('input[name="tz"]');
    await tz.fill('Asia/Kolkata');
    await tz.press('Enter');
    await tz.blur();
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '1', null, { timeout: 20e3 });
    assert.ok(requests.some((u) => u.includes('/v1/stats') && u.includes('tz=Asia%2FKolkata')), requests.join('\n'));
    assert.match(page.url(), /tz=Asia%2FKolkata/);
  });

  test('the key page shows the key\'s numbers and its quota bar', async () => {
    const q = await tally.request('PUT', '/v1/keys/k_alpha/quota', { measure: 'tokens', limit: 1000, window: '1h' });
    assert.ok(q.status === 200 || q.status === 201, JSON.stringify(q.body));
    await page.goto(`${tally.base}/?tz=UTC`);
    await page.locator('#top-keys a', { hasText: 'k_alpha' }).click();
    await page.waitForURL(/\/dashboard\/keys\/k_alpha/);
    await page.locator('[data-period="today"] [data-metric="requests"]').waitFor();
    await page.locator('#quota').waitFor();
    await rowsAre(page, '#key-models tbody tr', ['gpt-4o']);
    for (const period of ['today', 'this_month', 'last_24h']) {
      assert.equal(await page.locator(`[data-period="${period}"] [data-metric="requests"]`).getAttribute('data-value'), '6');
      assert.equal(await page.locator(`[data-period="${period}"] [data-metric="cost"]`).getAttribute('data-value'), '0.750000000');
    }
    const quota = page.locator('#quota');
    assert.equal(await quota.getAttribute('data-used'), '900');
    assert.equal(await quota.getAttribute('data-limit'), '1000');
    assert.equal(await quota.locator('[role="progressbar"]').getAttribute('aria-valuenow'), '900');
    const models = await page.locator('#key-models tbody tr').evaluateAll((trs) => trs.map((tr) => tr.dataset.row));
    assert.deepEqual(models, ['gpt-4o']);
    if (SHOTS) await page.screenshot({ path: join(SHOTS, 'dashboard-key.png'), fullPage: true });
  });

  test('an API error is shown, not swallowed', async () => {
    await page.goto(`${tally.base}/dashboard/keys/${'x'.repeat(300)}`);
    await page.locator('#banner:not([hidden])').waitFor();
    assert.match(await page.locator('#banner').textContent(), /400 invalid_key/);
    assert.match(await page.locator('#key-periods .state').textContent(), /256/);
  });

  test('a rule that fires appears in active alerts within one refresh; new events arrive without a reload', async () => {
    await page.goto(`${tally.base}/?tz=UTC`);
    await loaded(page);
    await page.evaluate(() => {
      window.__notReloaded = true;
    });
    const rule = { name: 'dash-busy-api', severity: 'warning', measure: 'requests', window: '1h', group_by: ['api'], threshold: 4 };
    const r = await tally.request('PUT', '/v1/alert-rules/dash-busy-api', rule);
    assert.ok(r.status === 200 || r.status === 201, JSON.stringify(r.body));
    // Once the API lists the alert, the next complete refresh shows it.
    for (;;) {
      const a = await tally.request('GET', '/v1/alerts?state=firing');
      if (a.body.active.some((x) => x.rule === 'dash-busy-api')) break;
      await new Promise((ok) => setTimeout(ok, 100));
    }
    let since = await refreshes(page);
    await afterRefreshes(page, since, 2);
    const row = page.locator('#active-alerts tr[data-rule="dash-busy-api"]');
    assert.equal(await row.count(), 1);
    assert.match(await row.textContent(), /api=openai/);
    // Five more events; once folded, the next complete refresh counts them.
    await tally.ingest([0, 1, 2, 3, 4].map((i) => ({ id: `late-${i}`, ts: at(5 * MIN), api: 'openai', key: 'k_alpha', model: 'gpt-4o', status: 200, cost: '0.1' })));
    await tally.caughtUp();
    since = await refreshes(page);
    await afterRefreshes(page, since, 2);
    assert.equal(await metric(page, 'requests'), '16');
    assert.equal(await metric(page, 'cost'), '5.760000001');
    assert.equal(await page.evaluate(() => window.__notReloaded), true);
  });
});

describe('dashboard (authentication on)', () => {
  let tally;
  let browser;
  let token;

  before(async () => {
    tally = await Tally.start({
      beforeStart: (t) => {
        const out = t.cli('tokens', 'create', '--name', 'dash', '--scope', 'read');
        token = /tally_[A-Za-z0-9_]+/.exec(out)?.[0];
        assert.ok(token, `no token in: ${out}`);
        const admin = t.cli('tokens', 'create', '--name', 'seed', '--scope', 'admin');
        t.admin = /tally_[A-Za-z0-9_]+/.exec(admin)?.[0];
      },
    });
    await tally.ingest(seed(), tally.admin);
    await tally.caughtUp(tally.admin);
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await tally?.stop();
  });

  test('the page asks for a token, refuses a wrong one with a message, works with the right one', async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${tally.base}/?tz=UTC`);
    const dialog = page.locator('dialog#auth');
    await dialog.waitFor({ state: 'visible' });
    assert.equal(await page.locator('#auth-error').isHidden(), true);
    await page.locator('#auth-token').fill('tally_wrong_token');
    await page.locator('#auth-submit').click();
    await page.locator('#auth-error:not([hidden])').waitFor();
    assert.match(await page.locator('#auth-error').textContent(), /refused/);
    await page.locator('#auth-token').fill(token);
    await page.locator('#auth-submit').click();
    await page.waitForFunction(() => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === '11');
    assert.equal(await dialog.isVisible(), false);
    // Kept for this tab only.
    assert.equal(await page.evaluate(() => sessionStorage.getItem('tally-token')), token);
    // A revoked token brings the prompt back at the next refresh.
    tally.cli('tokens', 'revoke', 'dash');
    await dialog.waitFor({ state: 'visible', timeout: 20e3 });
    await context.close();
  });
});

describe('tally demo', () => {
  test('prints the dashboard URL, and the page shows the demo\'s traffic', async () => {
    const t = new Tally(null, 0);
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(join(tmpdir(), 'tally-demo-'));
    const port = 20000 + Math.floor(Math.random() * 20000);
    const proc = spawn(tallyBin(), ['demo', '--http-addr', `127.0.0.1:${port}`, '--database-url', `sqlite://${join(dir, 'demo.db')}`], {
      env: { ...process.env, TALLY_LOG: 'warn', TALLY_PROJECTIONS_DIR: join(ROOT, 'projections') },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    proc.stdout.on('data', (d) => {
      out += d;
    });
    const browser = await launchBrowser();
    try {
      for (let i = 0; i < 600 && !out.includes('Press Ctrl-C'); i++) await new Promise((ok) => setTimeout(ok, 100));
      assert.ok(out.includes(`Dashboard: http://127.0.0.1:${port}/`), out);
      const accepted = Number(/event log now holds (\d+) events/.exec(out)?.[1]);
      assert.ok(accepted > 0, out);
      const page = await browser.newPage({ viewport: { width: 1280, height: 1400 } });
      await page.goto(`http://127.0.0.1:${port}/?range=1h&tz=UTC`);
      await page.waitForFunction((n) => document.querySelector('#totals [data-metric="requests"]')?.dataset.value === String(n), accepted, { timeout: 20e3 });
      if (SHOTS) await page.screenshot({ path: join(SHOTS, 'dashboard-demo.png'), fullPage: true });
    } finally {
      await browser.close();
      proc.kill('SIGTERM');
      await new Promise((ok) => proc.once('exit', ok));
      rmSync(dir, { recursive: true, force: true });
      void t;
    }
  });
});
