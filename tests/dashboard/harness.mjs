// Test harness: a real `tally serve` (SQLite file in a temp dir, free port)
// and Debian's Chromium driven by playwright-core. Nothing is mocked.

import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const CHROMIUM = process.env.TALLY_CHROMIUM || '/usr/bin/chromium';

/** The `tally` binary the Rust tests built (or TALLY_BIN). */
export function tallyBin() {
  const bin = process.env.TALLY_BIN || join(ROOT, 'target/debug/tally');
  if (!existsSync(bin)) {
    throw new Error(`tally binary not found at ${bin}: run \`cargo build -p tally-cli\` first (or set TALLY_BIN)`);
  }
  return bin;
}

/** Launches headless Chromium; fails with the install hint when it is missing. */
export async function launchBrowser(extraArgs = []) {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install it with \`apt-get install chromium\` (scripts/test.sh does), or set TALLY_CHROMIUM`);
  }
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    throw new Error(`playwright-core is not installed: run \`npm ci --prefix tests/dashboard\` (scripts/test.sh does): ${e.message}`);
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    // The machine's network is closed: background services would only fail.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', ...extraArgs],
  });
}

export async function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A running `tally serve` on its own SQLite file. */
export class Tally {
  static async start({ env = {}, beforeStart } = {}) {
    const dir = mkdtempSync(join(tmpdir(), 'tally-dashboard-'));
    const port = await freePort();
    const t = new Tally(dir, port);
    if (beforeStart) await beforeStart(t);
    t.proc = spawn(tallyBin(), ['serve'], {
      env: { ...process.env, ...t.env(), TALLY_ALERTS_TICK: '1s', TALLY_DASHBOARD_REFRESH: '2s', ...env },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    t.proc.on('exit', (code, sig) => {
      t.exited = { code, sig };
    });
    for (let i = 0; i < 300; i++) {
      if (t.exited) throw new Error(`tally serve exited early: ${JSON.stringify(t.exited)}`);
      try {
        const r = await fetch(`${t.base}/readyz`);
        if (r.ok) return t;
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error('tally serve did not become ready within 30 s');
  }

  constructor(dir, port) {
    this.dir = dir;
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
  }

  env() {
    return {
      TALLY_DATABASE_URL: `sqlite://${join(this.dir, 'tally.db')}`,
      TALLY_HTTP_ADDR: `127.0.0.1:${this.port}`,
      TALLY_PROJECTIONS_DIR: join(ROOT, 'projections'),
      TALLY_LOG: process.env.TALLY_TEST_LOG || 'warn',
    };
  }

  /** Runs a `tally` subcommand against this server's database; its stdout. */
  cli(...args) {
    return execFileSync(tallyBin(), args, { env: { ...process.env, ...this.env() }, encoding: 'utf8' });
  }

  async request(method, path, body, token) {
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await fetch(`${this.base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await r.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      json = text;
    }
    return { status: r.status, body: json };
  }

  /** Ingests events over HTTP and checks that every one was accepted. */
  async ingest(events, token) {
    const r = await this.request('POST', '/v1/events', events, token);
    if (r.status !== 200 || r.body.accepted !== events.length) {
      throw new Error(`ingest failed: ${r.status} ${JSON.stringify(r.body)}`);
    }
  }

  /** Waits until every projection has folded every event. */
  async caughtUp(token) {
    for (let i = 0; i < 600; i++) {
      const r = await this.request('GET', '/v1/projections', undefined, token);
      if (r.status === 200 && r.body.projections.every((p) => p.lag_events === 0 && p.status === 'ok')) return;
      await sleep(50);
    }
    throw new Error('projections did not catch up within 30 s');
  }

  async stop() {
    if (this.proc && !this.exited) {
      this.proc.kill('SIGTERM');
      for (let i = 0; i < 100 && !this.exited; i++) await sleep(100);
      if (!this.exited) this.proc.kill('SIGKILL');
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
