// The end-to-end walk in a real browser: headless Debian Chromium driven by
// puppeteer-core (no browser download). Usage: `node walk.mjs PLAN.json`.
//
// PLAN.json:
//   {
//     "protected_url": "https://127.0.0.1:P/app/",       // a browser route
//     "step_up_url":   "https://127.0.0.1:P/payroll/",   // a route that steps up to MFA
//     "logout_url":    "https://127.0.0.1:P/.portcullis/logout",
//     "logout_from":   "page" | "app",  // whose form POSTs there (see step 4)
//     "account": "alice", "acr": "urn:pc:pwd",
//     "step_up_acr": "urn:pc:mfa",   // optional: without it the walk leaves the
//                                    // IdP's preselection (the acr_values asked for)
//     "expect_text": "...",          // optional: text the protected page shows
//     "chromium": "/usr/bin/chromium",
//     "home": "/tmp/...",            // optional: HOME (an NSS db there trusts the test CA)
//     "ignore_certificate_errors": true,   // when no NSS db is set up
//     "dbsc": false,                 // enable DBSC (software keys) and record its events
//     "screenshot_dir": "/tmp/..."   // optional: a PNG per step
//   }
//
// Prints ONE JSON object on stdout: {"steps": [{"name","url","status","title","text"}...],
// "navigations": [every main-frame navigation request URL, in order],
// "dbsc_events": [...], "cookies": [{"name","httpOnly","secure","sameSite"}] (before
// logout), "cookies_after_logout": [...]} and exits 0;
// on a failure it prints {"error": "...", "steps": [...]} and exits 1. Every
// wait is bounded; the browser is always closed.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import process from 'node:process';

import puppeteer from 'puppeteer-core';

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const TIMEOUT = plan.timeout_ms ?? 20_000;
const steps = [];
const navigations = [];
const consoleMessages = [];
const dbscEvents = [];

const features = plan.dbsc
  ? ['--enable-features=DeviceBoundSessions,EnableBoundSessionCredentialsSoftwareKeysForManualTesting,DeviceBoundSessionsDevTools',
    '--disable-features=DeviceBoundSessionsRefreshQuota']
  : [];

const userDataDir = mkdtempSync(join(tmpdir(), 'walk-profile-'));
const args = [
  '--headless=new',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  `--user-data-dir=${userDataDir}`,
  ...(plan.ignore_certificate_errors ? ['--ignore-certificate-errors'] : []),
  ...features,
];

async function record(page, name, response) {
  const text = await page.evaluate(() => document.body?.innerText ?? '').catch(() => '');
  steps.push({
    name,
    url: page.url(),
    status: response?.status() ?? null,
    title: await page.title().catch(() => ''),
    text: text.slice(0, 4000),
  });
  if (plan.screenshot_dir) {
    await page.screenshot({ path: join(plan.screenshot_dir, `${steps.length}-${name}.png`) }).catch(() => {});
  }
}

const onIdp = (page) => page.url().includes('/interaction/');

// Fills the test IdP's login form (tests/js/idp.mjs) and waits to land back.
async function idpLogin(page, account, acr) {
  await page.waitForSelector('#login', { timeout: TIMEOUT });
  await page.select('#account', account);
  if (acr) await page.select('#acr', acr);
  const [response] = await Promise.all([
    page.waitForNavigation({ waitUntil: 'load', timeout: TIMEOUT }),
    page.click('#submit'),
  ]);
  // Redirect chains (IdP → proxy callback → the page) end in one navigation.
  await page.waitForFunction(() => !location.pathname.startsWith('/interaction/'), { timeout: TIMEOUT });
  return response;
}

async function submitFirstForm(page) {
  const [response] = await Promise.all([
    page.waitForNavigation({ waitUntil: 'load', timeout: TIMEOUT }),
    page.evaluate(() => {
      const b = document.querySelector('form button[type=submit], form input[type=submit], button[form]');
      if (b) b.click();
      else document.querySelector('form')?.submit();
    }),
  ]);
  return response;
}

let browser;
let exitCode = 0;
const out = {
  steps, navigations, console: consoleMessages, dbsc_events: dbscEvents,
};
try {
  browser = await puppeteer.launch({
    executablePath: plan.chromium ?? '/usr/bin/chromium',
    headless: true,
    args,
    env: { ...process.env, ...(plan.home ? { HOME: plan.home } : {}) },
    acceptInsecureCerts: !!plan.ignore_certificate_errors,
    protocolTimeout: TIMEOUT,
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  // Console messages (CSP violations and the like), for failure reports.
  page.on('console', (m) => consoleMessages.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
  page.on('request', (req) => {
    if (req.isNavigationRequest() && req.frame() === page.mainFrame()) navigations.push(req.url());
  });
  if (plan.dbsc) {
    const cdp = await page.createCDPSession();
    cdp.on('Network.deviceBoundSessionEventOccurred', (e) => dbscEvents.push(e));
    await cdp.send('Network.enable');
    await cdp.send('Network.enableDeviceBoundSessions', { enable: true }).catch((e) => dbscEvents.push({ error: e.message }));
  }

  // 1. A protected page without a session: the IdP's login, then the page.
  let r = await page.goto(plan.protected_url, { waitUntil: 'load' });
  await record(page, 'redirected-to-idp', r);
  if (!onIdp(page)) throw new Error(`expected the IdP login page, got ${page.url()}`);
  r = await idpLogin(page, plan.account, plan.acr ?? 'urn:pc:pwd');
  await record(page, 'protected-page', r);
  if (plan.expect_text && !steps.at(-1).text.includes(plan.expect_text)) {
    throw new Error(`protected page lacks ${JSON.stringify(plan.expect_text)}`);
  }

  // 2. Session reuse: the same page again, no IdP on the way.
  r = await page.goto(plan.protected_url, { waitUntil: 'load' });
  await record(page, 'session-reused', r);
  if (onIdp(page)) throw new Error('the session was not reused');

  // 3. Step-up: the stricter route sends the browser to the IdP for MFA, then back.
  if (plan.step_up_url) {
    r = await page.goto(plan.step_up_url, { waitUntil: 'load' });
    await record(page, 'step-up-at-idp', r);
    if (!onIdp(page)) throw new Error(`expected a step-up at the IdP, got ${page.url()} (${r?.status()})`);
    r = await idpLogin(page, plan.account, plan.step_up_acr);
    await record(page, 'stepped-up-page', r);
  }

  // The proxy's cookies, wherever the page is.
  const cookieView = async () => (await page.cookies(plan.protected_url)).map((c) => ({
    name: c.name, httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite, path: c.path,
  }));
  out.cookies = await cookieView();

  // 4. Logout: a POST form, then whatever the IdP asks. `logout_from`:
  //    "page" (default): the proxy's own sign-out page (GET logout_url);
  //    "app": a sign-out button in the app's page (the protected page, same
  //    origin) posting to logout_url, as apps embed one.
  if (plan.logout_url) {
    r = await page.goto(plan.logout_url, { waitUntil: 'load' });
    await record(page, 'logout-page', r);
    if (plan.logout_from === 'app') {
      r = await page.goto(plan.protected_url, { waitUntil: 'load' });
      await record(page, 'app-before-logout', r);
      await page.evaluate((action) => {
        const f = document.createElement('form');
        f.method = 'post';
        f.action = action;
        const b = document.createElement('button');
        b.type = 'submit';
        b.textContent = 'Sign out';
        f.appendChild(b);
        document.body.appendChild(f);
      }, plan.logout_url);
    }
    r = await submitFirstForm(page);
    await record(page, 'logged-out', r);
    out.cookies_after_logout = await cookieView();
    // The IdP's sign-out confirmation (a form), then its "signed out" page.
    for (let i = 0; i < 2 && page.url().includes('/session/end') && await page.$('form'); i += 1) {
      r = await submitFirstForm(page);
      await record(page, 'idp-logout', r);
    }
    // 5. The protected page again: login is needed again.
    r = await page.goto(plan.protected_url, { waitUntil: 'load' });
    await record(page, 'after-logout', r);
    if (!onIdp(page)) throw new Error(`still signed in after logout: ${page.url()}`);
  }
} catch (e) {
  out.error = e.message;
  exitCode = 1;
} finally {
  await browser?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(`${JSON.stringify(out)}\n`);
process.exit(exitCode);
