// Renders the operator page (/admin/ui) in headless Debian Chromium, driven
// by puppeteer-core, and reports what a person would see.
// Usage: `node admin-ui.mjs URL TOKEN [CHROMIUM]`.
//
// Prints ONE JSON object on stdout and exits 0:
//   {"status", "title", "charts": [{"feed", "bars", "counts"}],
//    "findings": ["leaver_access", ...], "tables": ["findings", "feeds", "picture"],
//    "other_requests": [urls the page tried to load besides itself],
//    "console": [console messages, e.g. CSP violations], "text": "..."}
// On a failure it prints {"error": "..."} and exits 1. Every wait is bounded;
// the browser is always closed.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';

import puppeteer from 'puppeteer-core';

const [url, token, chromium = '/usr/bin/chromium'] = process.argv.slice(2);
const TIMEOUT = 20_000;
const userDataDir = mkdtempSync(join(tmpdir(), 'admin-ui-profile-'));
let browser;
let exitCode = 0;
let out;
try {
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--user-data-dir=${userDataDir}`,
    ],
    protocolTimeout: TIMEOUT,
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.setExtraHTTPHeaders({ authorization: `Bearer ${token}` });
  const other = [];
  const consoleMessages = [];
  page.on('request', (r) => { if (r.url() !== url) other.push(r.url()); });
  page.on('console', (m) => consoleMessages.push(m.text()));
  const response = await page.goto(url, { waitUntil: 'load', timeout: TIMEOUT });
  const seen = await page.evaluate(() => ({
    title: document.title,
    charts: [...document.querySelectorAll('svg.window-chart')].map((s) => ({
      feed: s.dataset.feed,
      bars: s.querySelectorAll('rect.bar').length,
      counts: [...s.querySelectorAll('rect.bar')].map((b) => Number(b.dataset.count)),
      height: s.getBoundingClientRect().height,
    })),
    findings: [...document.querySelectorAll('#findings tr.finding')].map((r) => r.dataset.kind),
    tables: [...document.querySelectorAll('table')].map((t) => t.id),
    styled: getComputedStyle(document.querySelector('th')).fontWeight,
    text: document.body.innerText.slice(0, 4000),
  }));
  out = {
    status: response?.status() ?? null,
    ...seen,
    other_requests: other.filter((u) => !u.startsWith('data:')),
    console: consoleMessages,
  };
} catch (e) {
  out = { error: String(e?.stack ?? e) };
  exitCode = 1;
} finally {
  await browser?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(exitCode);
