// Verifies an `x-portcullis-assertion` with `jose`, a JWT library nobody here
// wrote, against the JWKS the proxy publishes (fetched over HTTPS).
//
//   node verify-assertion.mjs JWKS_URL ISSUER AUDIENCE   (the JWT on stdin)
//
// The proxy's test CA is trusted through NODE_EXTRA_CA_CERTS. Prints
// {"header": {...}, "payload": {...}} on success; exits 1 with the reason otherwise.

import process from 'node:process';

import * as jose from 'jose';

const [jwksUrl, issuer, audience] = process.argv.slice(2);
if (!jwksUrl || !issuer || !audience) {
  process.stderr.write('usage: node verify-assertion.mjs JWKS_URL ISSUER AUDIENCE < jwt\n');
  process.exit(2);
}

let jwt = '';
for await (const chunk of process.stdin) jwt += chunk;
jwt = jwt.trim();

try {
  const jwks = jose.createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 10_000 });
  const { payload, protectedHeader } = await jose.jwtVerify(jwt, jwks, {
    issuer,
    audience,
    algorithms: ['ES256'],
    requiredClaims: ['iss', 'aud', 'sub', 'exp', 'iat', 'jti'],
    maxTokenAge: '60s',
  });
  process.stdout.write(`${JSON.stringify({ header: protectedHeader, payload })}\n`);
} catch (e) {
  process.stderr.write(`verify-assertion.mjs: ${e.code ?? ''} ${e.message}\n`);
  process.exit(1);
}
