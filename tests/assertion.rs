//! The signed identity for the app: what the upstream receives in
//! `x-portcullis-assertion`, verified by an independent JWT library (`jose`,
//! in node) against the JWKS the proxy publishes over HTTPS; the plain
//! identity headers a route configures; rotation; reuse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use http::StatusCode;
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, Feed, IdentityPatch, PostureEvent};
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const PROXY_ISS: &str = "https://portcullis.test";

struct Env {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    key: SigningKey,
}

/// A proxy with `[assertion]` (keys `old` and `new`, `active` signing) and
/// two bearer routes: `payroll` (audience + identity headers) and `plain`.
async fn env(active: &str, reuse_s: u64) -> Env {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = SigningKey::es256("user-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        json!({"keys": [key.jwk]}).to_string(),
    )
    .unwrap();
    for kid in ["old", "new"] {
        let k = SigningKey::es256(kid).unwrap();
        std::fs::write(pki.path().join(format!("assert-{kid}.pem")), k.private_pem).unwrap();
    }
    let u = upstream.url();
    let routes = format!(
        r#"
[[routes]]
name = "payroll"
path_prefix = "/payroll"
upstream = "{u}"
auth = "bearer"
assertion_audience = "https://payroll.test"

[routes.identity_headers]
user = "X-Forwarded-User"
email = "X-Auth-Request-Email"
groups = "X-App-Groups"
device = "X-App-Device"

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "{u}"
auth = "bearer"

[[routes]]
name = "renamed"
path_prefix = "/renamed"
upstream = "{u}"
auth = "bearer"

[routes.identity_headers]
groups = "X-Portcullis-Device"

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "{u}"
auth = "public"

[assertion]
issuer = "{PROXY_ISS}"
ttl_s = 30
reuse_s = {reuse_s}
active_kid = "{active}"

[[assertion.keys]]
kid = "old"
private_key_file = "assert-old.pem"

[[assertion.keys]]
kid = "new"
private_key_file = "assert-new.pem"
"#
    );
    let cfg = pki.write_config(
        "p.toml",
        &base_config(ISS, r#"jwks_file = "jwks.json""#, &routes),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        upstream,
        server,
        key,
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.server.proxy_addr.port())
    }

    fn token(&self, sub: &str, extra: Value) -> String {
        let mut c = claims(ISS, sub);
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.key.sign(&c).unwrap()
    }

    async fn identity(&self, subject: &str, patch: IdentityPatch) {
        let ev = PostureEvent {
            id: format!("test:{subject}:{}", portcullis::util::now_unix_ms()),
            feed: Feed::Scim,
            kind: "scim.user".into(),
            origin_ms: portcullis::util::now_unix_ms(),
            changes: vec![Change::Identity {
                subject: subject.into(),
                patch,
            }],
        };
        self.server.shared.posture.ingest(vec![ev]).await.unwrap();
    }

    /// GETs `path` with `token` and extra headers; returns the upstream's view.
    async fn through(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> Seen {
        let before = self.upstream.count();
        let c = client(&self.pki.ca_pem, false);
        let (st, _, body) = get(&c, &self.url(path), Some(token), extra).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(self.upstream.count(), before + 1);
        self.upstream.last()
    }

    /// Verifies `jwt` with `jose` against the proxy's published JWKS over
    /// HTTPS (node runs off the runtime, which keeps serving the proxy).
    async fn jose_verify(&self, jwt: &str, audience: &str) -> Result<Value, String> {
        let (jwt, audience) = (jwt.to_owned(), audience.to_owned());
        let (url, ca) = (
            self.url("/.well-known/portcullis/jwks.json"),
            self.pki.path().join("ca.pem"),
        );
        tokio::task::spawn_blocking(move || jose_verify_blocking(&url, &ca, &jwt, &audience))
            .await
            .unwrap()
    }
}

fn jose_verify_blocking(
    url: &str,
    ca: &std::path::Path,
    jwt: &str,
    audience: &str,
) -> Result<Value, String> {
    {
        let dir = common::idp::js_dir();
        let mut child = Command::new("node")
            .arg(dir.join("verify-assertion.mjs"))
            .arg(url)
            .arg(PROXY_ISS)
            .arg(audience)
            .current_dir(&dir)
            .env("NODE_EXTRA_CA_CERTS", ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(jwt.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn header<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn upstream_receives_an_assertion_that_jose_verifies_with_the_published_jwks() {
    let e = env("new", 10).await;
    e.identity(
        "alice",
        IdentityPatch {
            groups: Some(vec!["eng".into(), "payroll-admins".into()]),
            entitlements: Some(vec!["payroll:write".into()]),
            add_aliases: vec!["alice@corp.test".into()],
            ..Default::default()
        },
    )
    .await;
    let token = e.token("alice", json!({"acr": "urn:pc:mfa", "amr": ["pwd", "otp"]}));
    let spoofed = [
        ("x-portcullis-assertion", "forged.forged.forged"),
        ("x-forwarded-user", "mallory"),
        ("x-auth-request-email", "mallory@evil.test"),
        ("x-app-groups", "root"),
        ("x-app-device", "stolen"),
    ];
    let seen = e.through("/payroll/slip", &token, &spoofed).await;

    // Plain identity headers: the configured names, the proxy's values.
    assert_eq!(header(&seen, "x-forwarded-user"), Some("alice"));
    assert_eq!(
        header(&seen, "x-auth-request-email"),
        Some("alice@corp.test")
    );
    assert_eq!(header(&seen, "x-app-groups"), Some("eng,payroll-admins"));
    assert_eq!(header(&seen, "x-app-device"), Some("laptop-1"));

    // The assertion: one, not the client's, verified by jose over the JWKS URL.
    assert_eq!(
        seen.headers
            .get_all("x-portcullis-assertion")
            .iter()
            .count(),
        1
    );
    let jwt = header(&seen, "x-portcullis-assertion").unwrap();
    let v = e.jose_verify(jwt, "https://payroll.test").await.unwrap();
    assert_eq!(v["header"]["alg"], "ES256");
    assert_eq!(v["header"]["kid"], "new");
    let p = &v["payload"];
    assert_eq!(p["iss"], PROXY_ISS);
    assert_eq!(p["aud"], "https://payroll.test");
    assert_eq!(p["sub"], "alice");
    assert_eq!(p["email"], "alice@corp.test");
    assert_eq!(p["groups"], json!(["eng", "payroll-admins"]));
    assert_eq!(p["entitlements"], json!(["payroll:write"]));
    assert_eq!(
        p["device"],
        json!({"id": "laptop-1", "verified": false, "compliance": "unknown", "lifecycle": "unknown"})
    );
    assert_eq!(p["acr"], "urn:pc:mfa");
    assert_eq!(p["amr"], json!(["pwd", "otp"]));
    assert_eq!(p["auth"], "bearer");
    assert_eq!(p["binding"], "none");
    assert_eq!(p["decision"], "allow");
    assert_eq!(p["route"], "payroll");
    let (iat, exp) = (p["iat"].as_u64().unwrap(), p["exp"].as_u64().unwrap());
    assert_eq!(exp - iat, 30);
    assert!(exp <= portcullis::util::now_unix() + 60);
    assert!(p["jti"].as_str().unwrap().len() >= 16);

    // Another audience does not accept it; a tampered one fails.
    assert!(e.jose_verify(jwt, "https://other.test").await.is_err());
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].replace('A', "B");
    assert!(
        e.jose_verify(&parts.join("."), "https://payroll.test")
            .await
            .is_err()
    );

    // A route without an audience uses its name; no plain headers there, yet
    // client-sent ones configured on any route are still stripped.
    let seen = e.through("/plain/x", &token, &spoofed).await;
    assert_eq!(header(&seen, "x-forwarded-user"), None);
    assert_eq!(header(&seen, "x-app-groups"), None);
    assert_eq!(header(&seen, "x-app-device"), None);
    let v = e
        .jose_verify(header(&seen, "x-portcullis-assertion").unwrap(), "plain")
        .await
        .unwrap();
    assert_eq!(v["payload"]["route"], "plain");

    // Public routes: no identity, and a client's assertion never passes.
    let c = client(&e.pki.ca_pem, false);
    let (st, _, _) = get(&c, &e.url("/public/x"), None, &spoofed).await;
    assert_eq!(st, StatusCode::OK);
    let seen = e.upstream.last();
    assert_eq!(header(&seen, "x-portcullis-assertion"), None);
    assert_eq!(header(&seen, "x-app-groups"), None);
}

#[tokio::test]
async fn jwks_publishes_every_key_and_the_active_one_signs() {
    let e = env("old", 0).await;
    let c = client(&e.pki.ca_pem, false);
    let (st, h, body) = get(&c, &e.url("/.well-known/portcullis/jwks.json"), None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "application/jwk-set+json");
    let jwks: Value = serde_json::from_slice(&body).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["old", "new"]);
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("d").is_none())
    );

    let token = e.token("bob", json!({}));
    let a = e.through("/plain/1", &token, &[]).await;
    let b = e.through("/plain/1", &token, &[]).await;
    let (a, b) = (
        header(&a, "x-portcullis-assertion").unwrap(),
        header(&b, "x-portcullis-assertion").unwrap(),
    );
    // reuse_s = 0: every request gets its own assertion.
    assert_ne!(a, b);
    let v = e.jose_verify(a, "plain").await.unwrap();
    assert_eq!(v["header"]["kid"], "old");
}

#[tokio::test]
async fn identical_requests_reuse_one_assertion_and_a_posture_change_gets_a_new_one() {
    let e = env("new", 20).await;
    let token = e.token("carol", json!({}));
    let first = e.through("/plain/a", &token, &[]).await;
    let again = e.through("/plain/b", &token, &[]).await;
    let first = header(&first, "x-portcullis-assertion").unwrap().to_owned();
    assert_eq!(header(&again, "x-portcullis-assertion").unwrap(), first);

    // Another subject, another route: never the same assertion.
    let dave = e
        .through("/plain/a", &e.token("dave", json!({})), &[])
        .await;
    assert_ne!(header(&dave, "x-portcullis-assertion").unwrap(), first);
    let other = e.through("/payroll/a", &token, &[]).await;
    assert_ne!(header(&other, "x-portcullis-assertion").unwrap(), first);

    // The identity record changes: the next assertion says so.
    e.identity(
        "carol",
        IdentityPatch {
            groups: Some(vec!["finance".into()]),
            ..Default::default()
        },
    )
    .await;
    let after = e.through("/plain/a", &token, &[]).await;
    let jwt = header(&after, "x-portcullis-assertion").unwrap();
    assert_ne!(jwt, first);
    let v = e.jose_verify(jwt, "plain").await.unwrap();
    assert_eq!(v["payload"]["groups"], json!(["finance"]));
}

/// A route's identity header may bear a name the proxy sets itself: the
/// app gets one line, the route's (as when both went into one map, the
/// route's last), whichever leg of the pool carries the request.
#[tokio::test]
async fn a_route_header_named_like_a_proxy_header_replaces_it_in_one_line() {
    let e = env("new", 10).await;
    e.identity(
        "alice",
        IdentityPatch {
            groups: Some(vec!["eng".into(), "ops".into()]),
            ..Default::default()
        },
    )
    .await;
    let token = e.token("alice", json!({}));
    // A GET goes through the pool's own leg.
    for extra in [&[][..], &[("x-portcullis-device", "stolen")][..]] {
        let seen = e.through("/renamed/x", &token, extra).await;
        let lines: Vec<_> = seen.headers.get_all("x-portcullis-device").iter().collect();
        assert_eq!(lines, ["eng,ops"], "{extra:?}");
        // The other lines the proxy sets are there, once each.
        for name in ["x-portcullis-subject", "x-request-id", "x-forwarded-proto"] {
            assert_eq!(seen.headers.get_all(name).iter().count(), 1, "{name}");
        }
        assert_eq!(header(&seen, "x-portcullis-subject"), Some("alice"));
    }
    // A request with a body goes through hyper's leg: the same one line.
    let c = client(&e.pki.ca_pem, false);
    let req = http::Request::post(e.url("/renamed/x"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-portcullis-device", "stolen")
        .body(full("body"))
        .unwrap();
    let before = e.upstream.count();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(e.upstream.count(), before + 1);
    let seen = e.upstream.last();
    assert_eq!(seen.method, "POST");
    let lines: Vec<_> = seen.headers.get_all("x-portcullis-device").iter().collect();
    assert_eq!(lines, ["eng,ops"]);
    assert_eq!(header(&seen, "x-portcullis-subject"), Some("alice"));
    assert_eq!(seen.headers.get_all("x-request-id").iter().count(), 1);
}
