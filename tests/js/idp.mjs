// A real OpenID Provider for the tests: `oidc-provider` (not written here) on
// 127.0.0.1, port 0. Usage: `node idp.mjs CONFIG.json`.
//
// When it listens it prints ONE JSON line on stdout:
//   {"issuer":"http://127.0.0.1:PORT","port":PORT,"login_path":"/interaction/{uid}/login",...}
// and logs everything else on stderr. It exits when stdin closes or on SIGTERM,
// so a test that dies never leaves it behind.
//
// CONFIG.json:
//   {
//     "clients": [{ "client_id", "client_secret"?, "token_endpoint_auth_method":
//                   "client_secret_basic" | "private_key_jwt", "jwks"?: {"keys": [...]},
//                   "redirect_uris": [...], "post_logout_redirect_uris"?: [...],
//                   "backchannel_logout_uri"?, "id_token_signed_response_alg"?: "ES256" | "RS256" }],
//     "accounts": { "<sub>": { "email", "name", "groups": [...], "deviceid", ... } },
//     "acr_values"?: ["urn:pc:pwd", "urn:pc:mfa"],   // the first is the default
//     "ca_file"?: "/path/ca.pem",   // trusted for back-channel logout calls (https)
//     "id_token_ttl_s"?: 300
//   }
//
// The login interaction is a plain HTML form (no JavaScript) the test fills in:
//   GET  /interaction/{uid}        form: select `account` (a sub), select `acr`
//                                  (the request's `acr_values` preselected)
//   POST /interaction/{uid}/login  account=<sub>&acr=<acr>  → back to the provider;
//        without `acr`, the first supported value of the request's
//        `acr_values`, else the default: the IdP honours what the RP asked for.
// Consent is implied for every configured client (first-party apps).
//
// Test-only endpoints (loopback only, no authentication; never ship this):
//   GET  /test/sessions?sub=S                → [{"client_id","sid","acr"}] logins seen
//   POST /test/backchannel-logout {"client_id","sub","sid"?}
//        → the provider's own Back-Channel Logout call to the client; 200 {"ok":true}
//          or 502 {"error": "..."} when the client did not answer 200/204.
//   POST /test/clients {client metadata}  → registers (or replaces) a client
//        at run time, for relying parties whose redirect and back-channel
//        URIs name a port known only after the IdP started; 200 {"ok":true}
//   POST /test/sign {"alg":"ES256"|"RS256","typ"?,"payload":{...}}
//        → {"jwt"}: a JWT signed with the provider's own key (for tests that
//          need well-signed but otherwise bad tokens: a logout_token with the
//          wrong aud, no events, a nonce, ...).

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import process from 'node:process';

import * as jose from 'jose';
import Provider from 'oidc-provider';

const STANDARD_SCOPE_CLAIMS = {
  email: ['email', 'email_verified'],
  profile: ['name', 'family_name', 'given_name', 'preferred_username', 'locale', 'updated_at'],
};

function fail(msg) {
  process.stderr.write(`idp.mjs: ${msg}\n`);
  process.exit(2);
}

const configPath = process.argv[2];
if (!configPath) fail('usage: node idp.mjs CONFIG.json');
let cfg;
try {
  cfg = JSON.parse(readFileSync(configPath, 'utf8'));
} catch (e) {
  fail(`cannot read ${configPath}: ${e.message}`);
}
const accounts = cfg.accounts ?? {};
const acrValues = cfg.acr_values ?? ['urn:pc:pwd', 'urn:pc:mfa'];
const trustedCa = cfg.ca_file ? readFileSync(cfg.ca_file) : undefined;

// Every claim an account has is released: standard ones under their scope,
// the rest (groups, deviceid, ...) under `openid` so any RP gets them.
const customClaims = new Set();
for (const claims of Object.values(accounts)) {
  for (const name of Object.keys(claims)) {
    if (!Object.values(STANDARD_SCOPE_CLAIMS).flat().includes(name) && name !== 'sub') {
      customClaims.add(name);
    }
  }
}

// Signing keys made fresh at every start: one per algorithm a client may ask for.
async function signingKeys() {
  const keys = [];
  const privates = {};
  for (const [alg, opts] of [['ES256', {}], ['RS256', { modulusLength: 2048 }]]) {
    const { privateKey } = await jose.generateKeyPair(alg, { ...opts, extractable: true });
    const jwk = await jose.exportJWK(privateKey);
    jwk.kid = `idp-${alg.toLowerCase()}`;
    jwk.alg = alg;
    jwk.use = 'sig';
    keys.push(jwk);
    privates[alg] = { key: privateKey, kid: jwk.kid };
  }
  return { keys, privates };
}

// Back-channel logout calls go to the proxy's https listener, which the tests
// serve with a throw-away CA: trust exactly that CA. oidc-provider's own
// dispatcher refuses loopback targets (SSRF protection); a test IdP on
// loopback must reach a proxy on loopback, so it gets a dispatcher of its own.
function makeFetch() {
  // eslint-disable-next-line no-unused-expressions
  Response; // loads node's built-in undici, which registers its global Agent
  const Agent = globalThis[Symbol.for('undici.globalDispatcher.1')]?.constructor;
  const dispatcher = Agent ? new Agent({ connect: trustedCa ? { ca: trustedCa } : {} }) : undefined;
  return (url, options) => {
    const opts = { ...options };
    delete opts.dispatcher;
    if (dispatcher) opts.dispatcher = dispatcher;
    return globalThis.fetch(url, opts);
  };
}

const htmlEscape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, details) {
  const options = Object.entries(accounts)
    .map(([sub, c]) => `<option value="${htmlEscape(sub)}">${htmlEscape(c.name ?? sub)} (${htmlEscape(sub)})</option>`)
    .join('');
  const asked = details.params.acr_values ? String(details.params.acr_values).split(' ') : [];
  const acrs = acrValues
    .map((a) => `<option value="${htmlEscape(a)}"${asked.includes(a) ? ' selected' : ''}>${htmlEscape(a)}</option>`)
    .join('');
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Test IdP sign-in</title></head>
<body><main>
<h1>Test IdP sign-in</h1>
<p>Client: <code>${htmlEscape(details.params.client_id)}</code>; prompt: <code>${htmlEscape(details.prompt.name)}</code></p>
<form id="login" method="post" action="/interaction/${htmlEscape(uid)}/login">
<label>Account <select name="account" id="account">${options}</select></label>
<label>Authentication <select name="acr" id="acr">${acrs}</select></label>
<button type="submit" id="submit">Sign in</button>
</form>
</main></body></html>`;
}

function logoutSource(ctx, form) {
  ctx.body = `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Test IdP sign-out</title></head>
<body><main><h1>Sign out of the test IdP?</h1>
${form}
<button type="submit" id="logout" form="op.logoutForm" name="logout" value="yes">Sign out</button>
</main></body></html>`;
}

function postLogoutSuccessSource(ctx) {
  ctx.body = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Signed out</title></head><body><h1>Signed out</h1></body></html>';
}

async function readBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function send(res, status, body, type = 'application/json') {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(text);
}

async function main() {
  const { keys, privates } = await signingKeys();
  const sessions = new Map(); // sub -> [{client_id, sid, acr}]

  // Listen first: the issuer URL needs the port the kernel picked.
  let handler = (req, res) => send(res, 503, { error: 'starting' });
  const server = createServer((req, res) => handler(req, res));
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const withDefaults = (c) => {
    const client = {
      grant_types: ['authorization_code'],
      response_types: ['code'],
      id_token_signed_response_alg: 'ES256',
      require_auth_time: true,
      ...c,
    };
    if (client.backchannel_logout_uri && client.backchannel_logout_session_required === undefined) {
      client.backchannel_logout_session_required = true;
    }
    return client;
  };
  const clients = (cfg.clients ?? []).map(withDefaults);

  const provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    acrValues,
    // `acr` and `amr` in every ID token (as Entra and Okta do), not only
    // when the RP asks for them; the standalone members keep the defaults.
    claims: {
      acr: null,
      sid: null,
      auth_time: null,
      iss: null,
      openid: ['sub', 'acr', 'amr', ...customClaims],
      ...STANDARD_SCOPE_CLAIMS,
    },
    // Release the scope's claims in the ID token too (the proxy reads only the ID token).
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: true, logoutSource, postLogoutSuccessSource },
      claimsParameter: { enabled: true },
    },
    enabledJWA: {
      idTokenSigningAlgValues: ['ES256', 'RS256'],
      clientAuthSigningAlgValues: ['ES256', 'RS256'],
    },
    ttl: {
      IdToken: cfg.id_token_ttl_s ?? 300,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    cookies: { keys: [jose.base64url.encode(crypto.getRandomValues(new Uint8Array(32)))] },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    fetch: makeFetch(),
    async findAccount(ctx, sub) {
      const claims = accounts[sub];
      if (!claims) return undefined;
      return { accountId: sub, claims: async () => ({ sub, ...claims }) };
    },
    // Every configured client is first-party: consent is implied.
    async loadExistingGrant(ctx) {
      const clientId = ctx.oidc.client.clientId;
      const accountId = ctx.oidc.session.accountId;
      const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(clientId);
      let grant = grantId ? await ctx.oidc.provider.Grant.find(grantId) : undefined;
      if (!grant || grant.accountId !== accountId) {
        grant = new ctx.oidc.provider.Grant({ clientId, accountId });
      }
      grant.addOIDCScope(String(ctx.oidc.params.scope ?? 'openid'));
      grant.addOIDCClaims(['sub', 'acr', 'amr', ...customClaims, ...Object.values(STANDARD_SCOPE_CLAIMS).flat()]);
      await grant.save();
      return grant;
    },
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  provider.on('server_error', (ctx, err) => process.stderr.write(`idp.mjs: server_error ${err.stack}\n`));
  provider.on('backchannel.error', (client, err, accountId, sid) =>
    process.stderr.write(`idp.mjs: backchannel logout to ${client.clientId} for ${accountId}/${sid} failed: ${err.message}\n`));
  provider.on('authorization.success', (ctx) => {
    const { session, client } = ctx.oidc;
    if (!session?.accountId || !client) return;
    const list = sessions.get(session.accountId) ?? [];
    const sid = session.sidFor(client.clientId);
    if (!list.some((s) => s.sid === sid && s.client_id === client.clientId)) {
      list.push({ client_id: client.clientId, sid, acr: session.acr });
    }
    sessions.set(session.accountId, list);
  });

  const callback = provider.callback();

  async function testRoutes(req, res, url) {
    if (req.method === 'GET' && url.pathname === '/test/sessions') {
      return send(res, 200, sessions.get(url.searchParams.get('sub')) ?? []);
    }
    if (req.method === 'POST' && url.pathname === '/test/backchannel-logout') {
      const body = JSON.parse(await readBody(req));
      const client = await provider.Client.find(String(body.client_id));
      if (!client) return send(res, 404, { error: 'unknown client_id' });
      try {
        await client.backchannelLogout(String(body.sub), body.sid);
        return send(res, 200, { ok: true });
      } catch (e) {
        return send(res, 502, { error: e.message });
      }
    }
    if (req.method === 'POST' && url.pathname === '/test/clients') {
      // Not a static client: stored through the provider's adapter, the way
      // dynamically registered clients are, so Client.find sees every update.
      const metadata = withDefaults(JSON.parse(await readBody(req)));
      if (!metadata.client_id) return send(res, 400, { error: 'client_id is required' });
      await provider.Client.validate(metadata);
      await provider.Client.adapter.upsert(String(metadata.client_id), metadata);
      return send(res, 200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/test/sign') {
      const body = JSON.parse(await readBody(req));
      const alg = body.alg ?? 'ES256';
      const signer = privates[alg];
      if (!signer) return send(res, 400, { error: `no key for ${alg}` });
      const header = { alg, kid: signer.kid, ...(body.typ ? { typ: body.typ } : {}) };
      const jwt = await new jose.CompactSign(new TextEncoder().encode(JSON.stringify(body.payload ?? {})))
        .setProtectedHeader(header)
        .sign(signer.key);
      return send(res, 200, { jwt });
    }
    return send(res, 404, { error: 'not found' });
  }

  async function interaction(req, res, url) {
    const m = url.pathname.match(/^\/interaction\/([^/]+)(\/login)?$/);
    if (!m) return send(res, 404, { error: 'not found' });
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== m[1]) return send(res, 400, { error: 'interaction mismatch' });
    if (req.method === 'GET' && !m[2]) {
      return send(res, 200, loginPage(details.uid, details), 'text/html; charset=utf-8');
    }
    if (req.method === 'POST' && m[2]) {
      const form = new URLSearchParams(await readBody(req));
      const accountId = form.get('account');
      const asked = details.params.acr_values ? String(details.params.acr_values).split(' ') : [];
      const acr = form.get('acr') || asked.find((a) => acrValues.includes(a)) || acrValues[0];
      if (!accounts[accountId]) return send(res, 400, { error: `unknown account ${accountId}` });
      if (!acrValues.includes(acr)) return send(res, 400, { error: `unsupported acr ${acr}` });
      const amr = acr === acrValues[0] ? ['pwd'] : ['pwd', 'otp'];
      return provider.interactionFinished(req, res, { login: { accountId, acr, amr } }, { mergeWithLastSubmission: false });
    }
    return send(res, 405, { error: 'method not allowed' });
  }

  handler = (req, res) => {
    const url = new URL(req.url, issuer);
    const route = url.pathname.startsWith('/test/')
      ? testRoutes
      : url.pathname.startsWith('/interaction/')
        ? interaction
        : null;
    if (!route) return callback(req, res);
    return route(req, res, url).catch((e) => {
      process.stderr.write(`idp.mjs: ${url.pathname}: ${e.stack}\n`);
      if (!res.headersSent) send(res, 400, { error: e.message });
    });
  };

  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    discovery: `${issuer}/.well-known/openid-configuration`,
    login_path: '/interaction/{uid}/login',
    acr_values: acrValues,
  })}\n`);

  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdin.on('end', stop);
  process.stdin.resume();
}

main().catch((e) => fail(e.stack));
