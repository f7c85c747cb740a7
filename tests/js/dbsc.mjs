// DBSC in a real browser: headless Debian Chromium with software keys
// (shared reference §1.9), driven by puppeteer-core, against the proxy on
// https://127.0.0.1 (its test CA trusted through an NSS db in plan.home).
// Usage: `node dbsc.mjs PLAN.json`, run by tests/dbsc.rs.
//
// PLAN.json: {"app_url": "https://127.0.0.1:P/app/", "chromium": "/usr/bin/chromium",
//             "home": "/tmp/...", "timeout_ms": 20000}
//
// Talks in JSON lines on stdout:
//   {"phase": "registered", "sub": "...", "events": [...]}   after login and a
//       successful DBSC registration; then it waits for one line on stdin
//       (the test changes the subject's posture meanwhile);
//   {"phase": "done", "status": 200, "text": "...", "events": [...]}  after
//       loading the page again (the proxy forces a re-proof; Chromium refreshes);
//   {"phase": "error", "error": "...", "events": [...]} on a failure (exit 1).
// Every wait is bounded; the browser is always closed.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';
import readline from 'node:readline';

import puppeteer from 'puppeteer-core';

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const TIMEOUT = plan.timeout_ms ?? 20_000;
const events = [];
const say = (o) => process.stdout.write(`${JSON.stringify({ ...o, events })}\n`);

const lines = readline.createInterface({ input: process.stdin });
let stdinClosed = false;
lines.once('close', () => { stdinClosed = true; });
const nextLine = () => new Promise((resolve, reject) => {
  // The test closes stdin when it ends early: stop (closing the browser).
  if (stdinClosed) { reject(new Error('the test closed stdin')); return; }
  const t = setTimeout(() => reject(new Error('no go-ahead from the test')), TIMEOUT);
  lines.once('close', () => { clearTimeout(t); reject(new Error('the test closed stdin')); });
  lines.once('line', (l) => { clearTimeout(t); resolve(l); });
});

// Resolves when an event matching `pred` has arrived (or arrives), bounded.
const waiters = [];
function waitEvent(what, pred) {
  const found = events.find(pred);
  if (found) return Promise.resolve(found);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no DBSC ${what} event`)), TIMEOUT);
    waiters.push({ pred, resolve: (e) => { clearTimeout(t); resolve(e); } });
  });
}

const userDataDir = mkdtempSync(join(tmpdir(), 'dbsc-profile-'));
let browser;
let code = 0;
try {
  browser = await puppeteer.launch({
    executablePath: plan.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      `--user-data-dir=${userDataDir}`,
      '--enable-features=DeviceBoundSessions,EnableBoundSessionCredentialsSoftwareKeysForManualTesting,DeviceBoundSessionsDevTools',
      '--disable-features=DeviceBoundSessionsRefreshQuota',
    ],
    env: { ...process.env, HOME: plan.home },
    protocolTimeout: TIMEOUT,
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const cdp = await page.createCDPSession();
  cdp.on('Network.deviceBoundSessionEventOccurred', (e) => {
    events.push(e);
    for (const w of waiters.splice(0)) {
      if (w.pred(e)) w.resolve(e); else waiters.push(w);
    }
  });
  await cdp.send('Network.enable');
  await cdp.send('Network.enableDeviceBoundSessions', { enable: true });

  // Login: the demo IdP's one-click page (password, no MFA), then back.
  await page.goto(plan.app_url, { waitUntil: 'load' });
  const href = await page.$eval('a[href*="mfa=0"]', (a) => a.href);
  const sub = new URL(href).searchParams.get('sub');
  await page.goto(href, { waitUntil: 'load' });
  await page.waitForFunction((u) => location.href === u, { timeout: TIMEOUT }, plan.app_url);
  await waitEvent('creation', (e) => e.creationEventDetails && e.succeeded);
  say({ phase: 'registered', sub, url: page.url() });

  // The test changes the subject's posture: the next load must re-prove.
  await nextLine();
  const refreshes = events.filter((e) => e.refreshEventDetails).length;
  const r = await page.goto(plan.app_url, { waitUntil: 'load' });
  await waitEvent('refresh', (e) => e.refreshEventDetails && e.succeeded
    && events.filter((x) => x.refreshEventDetails).length > refreshes);
  const text = await page.evaluate(() => document.body?.innerText ?? '').catch(() => '');
  say({ phase: 'done', status: r?.status() ?? null, url: page.url(), text: text.slice(0, 2000) });
} catch (e) {
  say({ phase: 'error', error: e.message });
  code = 1;
} finally {
  lines.close();
  await browser?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
