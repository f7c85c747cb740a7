// Verifies a Security Event Token that portcullis pushed, with `jose` (a JWT
// library nobody here wrote), against the JWKS the transmitter publishes.
//
//   node verify-set.mjs JWKS_URL ISSUER AUDIENCE   (the compact SET on stdin)
//
// Checks what a receiver must (SSF 1.0 §4, RFC 8417): typ secevent+jwt,
// RS256, iss and aud, jti and iat present, no sub and no exp, sub_id present,
// exactly one event. Prints {"header": {...}, "payload": {...}} on success;
// exits 1 with the reason otherwise.

import process from 'node:process';

import * as jose from 'jose';

const [jwksUrl, issuer, audience] = process.argv.slice(2);
if (!jwksUrl || !issuer || !audience) {
  process.stderr.write('usage: node verify-set.mjs JWKS_URL ISSUER AUDIENCE < set\n');
  process.exit(2);
}

let set = '';
for await (const chunk of process.stdin) set += chunk;
set = set.trim();

try {
  const jwks = jose.createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 10_000 });
  const { payload, protectedHeader } = await jose.jwtVerify(set, jwks, {
    issuer,
    audience,
    algorithms: ['RS256'],
    typ: 'secevent+jwt',
    requiredClaims: ['iss', 'aud', 'jti', 'iat'],
  });
  if ('sub' in payload) throw new Error('an SSF SET must not carry sub');
  if ('exp' in payload) throw new Error('an SSF SET must not carry exp');
  if (typeof payload.sub_id !== 'object' || payload.sub_id === null) throw new Error('sub_id is missing');
  if (Object.keys(payload.events ?? {}).length !== 1) throw new Error('events must hold exactly one event');
  process.stdout.write(`${JSON.stringify({ header: protectedHeader, payload })}\n`);
} catch (e) {
  process.stderr.write(`verify-set.mjs: ${e.code ?? ''} ${e.message}\n`);
  process.exit(1);
}
