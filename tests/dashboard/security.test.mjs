// A real browser against an open API (authentication off, as on loopback and
// in docker/compose.yaml): a page on another origin must not change anything,
// a rebound host name must not read anything, and the dashboard's ranked
// sections stay readable whatever an emitter sends.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, describe, test } from 'node:test';
import { freePort, launchBrowser, Tally } from './harness.mjs';

const rule = (name) => ({ name, measure: 'requests', window: '1h', threshold: 1 });

/** A page on another origin that tries every way a page can send a change. */
function attackerPage(target) {
  return `<!doctype html><meta charset="utf-8"><title>elsewhere</title>
<form id="f" method="POST" action="${target}/v1/alert-rules" enctype="text/plain" target="sink">
<input name='{"name":"csrf-form","measure":"requests","window":"1h","threshold":1,"x":"' value='"}'>
</form><iframe name="sink"></iframe>
<script>
window.attempts = (async () => {
  const out = {};
  const send = async (name, init) => {
    try { const r = await fetch('${target}' + init.path, { method: 'POST', ...init }); out[name] = r.type === 'opaque' ? 'opaque' : r.status; }
    catch (e) { out[name] = 'failed'; }
  };
  await send('text', { path: '/v1/alert-rules', mode: 'no-cors', headers: { 'content-type': 'text/plain' }, body: JSON.stringify(${JSON.stringify(rule('csrf-text'))}) });
  await send('form', { path: '/v1/alert-rules', mode: 'no-cors', body: new URLSearchParams({ a: '1' }) });
  await send('correction', { path: '/v1/corrections', mode: 'no-cors', headers: { 'content-type': 'text/plain' }, body: JSON.stringify({ ids: ['victim-0'], reason: 'csrf' }) });
  await send('reprice', { path: '/v1/prices/reprice', mode: 'no-cors', headers: { 'content-type': 'text/plain' }, body: '{}' });
  document.getElementById('f').submit();
  return out;
})();
</script>`;
}

describe('an open API and a browser', () => {
  let tally;
  let browser;
  let other;
  let otherBase;

  before(async () => {
    tally = await Tally.start();
    await tally.ingest([{ id: 'victim-0', ts: new Date().toISOString(), api: 'openai', key: 'k1' }]);
    await tally.caughtUp();
    const port = await freePort();
    other = createServer((req, res) => {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(attackerPage(tally.base));
    });
    await new Promise((ok) => other.listen(port, '127.0.0.1', ok));
    // Another origin: a host name of its own (mapped to loopback, as an
    // attacker's DNS would), so the browser sees a cross-site page.
    otherBase = `http://attacker.example:${port}`;
    browser = await launchBrowser(['--host-resolver-rules=MAP attacker.example 127.0.0.1, MAP rebound.example 127.0.0.1']);
  });

  after(async () => {
    await browser?.close();
    other?.close();
    await tally?.stop();
  });

  test('a page on another site cannot create rules, void events or reprice', async () => {
    const page = await browser.newPage();
    await page.goto(`${otherBase}/`);
    const attempts = await page.evaluate(() => window.attempts);
    assert.ok(Object.keys(attempts).length === 4, JSON.stringify(attempts));
    await page.waitForTimeout(500); // the form's navigation
    const rules = await tally.request('GET', '/v1/alert-rules');
    assert.equal(rules.status, 200);
    assert.deepEqual(rules.body.rules.map((r) => r.name), [], 'a cross-site request created a rule');
    const corrections = await tally.request('GET', '/v1/corrections');
    assert.equal(corrections.status, 200);
    assert.deepEqual(corrections.body.corrections, [], 'a cross-site request voided an event');
    const stats = await tally.request('GET', '/v1/stats?group_by=api');
    assert.equal(stats.body.totals[0].requests, 1);
    await page.close();
  });

  test('the dashboard itself (same origin) still makes changes', async () => {
    const page = await browser.newPage();
    await page.goto(`${tally.base}/`);
    const status = await page.evaluate(async (body) => {
      const r = await fetch('/v1/alert-rules', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      return r.status;
    }, JSON.stringify(rule('same-origin')));
    assert.equal(status, 201);
    assert.equal((await tally.request('DELETE', '/v1/alert-rules/same-origin')).status, 204);
    await page.close();
  });

  test('a rebound host name gets the page but no data (DNS rebinding)', async () => {
    const page = await browser.newPage();
    const rebound = tally.base.replace('127.0.0.1', 'rebound.example');
    const resp = await page.goto(`${rebound}/`);
    assert.equal(resp.status(), 200); // static files are exempt
    const got = await page.evaluate(async () => {
      const r = await fetch('/v1/stats');
      return { status: r.status, body: await r.json() };
    });
    assert.equal(got.status, 403);
    assert.equal(got.body.code, 'host_not_allowed');
    assert.match(got.body.error, /TALLY_ALLOWED_HOSTS/);
    await page.close();
  });
});

describe('ranked sections with many distinct values', () => {
  let tally;
  let browser;

  before(async () => {
    tally = await Tally.start();
    const ts = new Date(Date.now() - 60e3).toISOString();
    const events = Array.from({ length: 10_001 }, (_, i) => ({ id: `m-${i}`, ts, api: 'openai', key: 'k1', model: `model-${i}` }));
    await tally.ingest(events.slice(0, 10_000));
    await tally.ingest(events.slice(10_000));
    await tally.caughtUp();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await tally?.stop();
  });

  test('10,001 distinct models show the top rows, not an error', async () => {
    const page = await browser.newPage();
    await page.goto(`${tally.base}/?tz=UTC`);
    await page.waitForFunction(() => Number(document.body.dataset.refreshed) >= 1, null, { timeout: 60e3 });
    for (const section of ['#by-model', '#by-api']) {
      const errors = await page.locator(`${section} [data-state="error"]`).count();
      assert.equal(errors, 0, `${section}: ${await page.locator(section).textContent()}`);
    }
    const models = await page.locator('#by-model tbody tr').count();
    assert.equal(models, 100);
    await page.close();
  });
});
