//! DBSC (Device Bound Session Credentials) end to end: a real OpenID
//! provider on loopback (the demo's provider, as tests/browser.rs uses), the
//! proxy over real TLS, a client with a cookie jar, and real ES256 / RS256
//! keys generated here that sign the registration and refresh proofs the
//! way a browser does. The last test drives Debian's headless Chromium
//! (software keys) through registration and a forced refresh.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use common::demo_idp::DemoIdp as Idp;
use common::{DEADLINE, TestPki, TlsConn, Upstream};
use http::StatusCode;
use portcullis::demo::oidc::DEMO_CLIENT_ID;
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, Feed, IdentityPatch, PostureEvent};
use portcullis::posture::model::{IdentityKind, IdentityStatus};
use portcullis::session::cookie::{SESSION_COOKIE, id_hash};
use portcullis::session::dbsc::BOUND_COOKIE;
use serde_json::json;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const REGISTER: &str = "/.portcullis/dbsc/register";
const REFRESH: &str = "/.portcullis/dbsc/refresh";

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The `challenge="…"` of a `Secure-Session-Registration` offer, or the
/// leading sf-string of a `Secure-Session-Challenge`.
fn challenge_of(v: &str) -> String {
    if let Some(i) = v.find("challenge=\"") {
        return v[i + 11..].split('"').next().unwrap().to_owned();
    }
    v.trim_start_matches('"')
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// A proof JWT as a browser signs it (`jwk` in the header at registration).
fn proof(key: &SigningKey, jti: &str, with_jwk: bool) -> String {
    let mut h = json!({"typ": "dbsc+jwt", "alg": key.alg});
    if with_jwk {
        h["jwk"] = key.public_jwk();
    }
    key.sign_jws(&h, &json!({"jti": jti})).unwrap()
}

/// An unsigned (`none`) or HMAC-signed (`HS256`) proof: never accepted.
fn forged(alg: &str, key: &SigningKey, jti: &str) -> String {
    let h = B64.encode(json!({"typ": "dbsc+jwt", "alg": alg, "jwk": key.public_jwk()}).to_string());
    let c = B64.encode(json!({"jti": jti}).to_string());
    match alg {
        "HS256" => {
            let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"guessable");
            let s = aws_lc_rs::hmac::sign(&k, format!("{h}.{c}").as_bytes());
            format!("{h}.{c}.{}", B64.encode(s.as_ref()))
        }
        _ => format!("{h}.{c}."),
    }
}

/// The claims of the identity assertion the upstream received.
fn assertion_claims(seen: &common::Seen) -> serde_json::Value {
    let jwt = header(&seen.headers, "x-portcullis-assertion");
    let payload = jwt.split('.').nth(1).expect("an assertion");
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

/// A browser: one TLS connection and a cookie jar.
struct Browser {
    conn: TlsConn,
    jar: HashMap<String, String>,
    /// The last `Secure-Session-Registration` offer seen.
    offer: Option<String>,
}

type Answer = (StatusCode, http::HeaderMap, Bytes);

impl Browser {
    async fn open(addr: std::net::SocketAddr, pki: &TestPki) -> Self {
        Self {
            conn: TlsConn::connect(addr, "localhost", &pki.ca_pem, None)
                .await
                .unwrap(),
            jar: HashMap::new(),
            offer: None,
        }
    }

    async fn send(&mut self, method: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
        let cookies = self
            .jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if !cookies.is_empty() {
            headers.push(("cookie", &cookies));
        }
        let (s, h, b) = self.conn.send(method, path, &headers).await.unwrap();
        for v in h.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            assert!(attrs.contains("Secure") && attrs.contains("Path=/"), "{v}");
            if attrs.contains("Max-Age=0") {
                self.jar.remove(k);
            } else {
                self.jar.insert(k.to_owned(), val.to_owned());
            }
        }
        if let Some(o) = h.get("secure-session-registration") {
            self.offer = Some(o.to_str().unwrap().to_owned());
        }
        (s, h, b)
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[("accept", "text/html")]).await
    }

    async fn api_get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[("accept", "application/json")])
            .await
    }

    /// Logs in as `sub` from `/app/`; the callback's answer is returned.
    async fn login(&mut self, idp: &Idp, sub: &str) -> Answer {
        let (s, h, _) = self.get("/app/").await;
        assert_eq!(s, StatusCode::FOUND);
        let back = idp.login(&header(&h, "location"), sub).await;
        let callback = back
            .split_once("/.portcullis/")
            .map(|(_, r)| format!("/.portcullis/{r}"))
            .unwrap();
        let a = self.get(&callback).await;
        assert_eq!(a.0, StatusCode::SEE_OTHER, "callback");
        assert!(self.jar.contains_key(SESSION_COOKIE));
        a
    }

    fn session_hash(&self) -> String {
        id_hash(&self.jar[SESSION_COOKIE])
    }

    async fn register_with(&mut self, proof: &str) -> Answer {
        let v = format!("\"{proof}\"");
        self.send("POST", REGISTER, &[("secure-session-response", &v)])
            .await
    }

    /// Registers `key` over the login's offer; returns the DBSC session id.
    async fn register(&mut self, key: &SigningKey) -> String {
        let c = challenge_of(self.offer.as_deref().expect("a registration offer"));
        let (s, h, body) = self.register_with(&proof(key, &c, true)).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(
            h.get("secure-session-challenge").is_none(),
            "no challenge on the registration answer (practitioner note)"
        );
        assert!(self.jar.contains_key(BOUND_COOKIE));
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["refresh_url"], REFRESH);
        assert_eq!(j["scope"]["include_site"], false);
        assert_eq!(j["credentials"][0]["name"], BOUND_COOKIE);
        j["session_identifier"].as_str().unwrap().to_owned()
    }

    async fn refresh_with(&mut self, id: &str, proof: Option<&str>) -> Answer {
        let id = format!("\"{id}\"");
        let p = proof.map(|p| format!("\"{p}\""));
        let mut h = vec![("sec-secure-session-id", id.as_str())];
        if let Some(p) = &p {
            h.push(("secure-session-response", p));
        }
        self.send("POST", REFRESH, &h).await
    }

    /// The two-phase refresh a browser runs: 403 + challenge, then a proof.
    async fn refresh(&mut self, id: &str, key: &SigningKey) -> String {
        let (s, h, _) = self.refresh_with(id, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "no proof: a challenge");
        let ch = header(&h, "secure-session-challenge");
        assert!(ch.ends_with(&format!(";id=\"{id}\"")), "{ch}");
        let before = self.jar.get(BOUND_COOKIE).cloned();
        let (s, h, body) = self
            .refresh_with(id, Some(&proof(key, &challenge_of(&ch), false)))
            .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert!(body.is_empty(), "an empty body keeps the instructions");
        let next = header(&h, "secure-session-challenge");
        assert!(!next.is_empty(), "a challenge for the next refresh");
        assert_ne!(self.jar.get(BOUND_COOKIE), before.as_ref(), "rotated");
        next
    }
}

struct Env {
    pki: TestPki,
    idp: Idp,
    app: Upstream,
    cfg: std::path::PathBuf,
}

async fn env() -> Env {
    env_with("").await
}

/// The environment with more `[[routes]]` ahead of the catch-all `web`.
async fn env_with(routes: &str) -> Env {
    let pki = TestPki::new();
    let idp = Idp::start().await;
    let app = Upstream::start().await;
    std::fs::write(pki.path().join("client-secret"), &idp.secret).unwrap();
    let assert_key = SigningKey::es256("assert-1").unwrap();
    std::fs::write(pki.path().join("assert.pem"), &assert_key.private_pem).unwrap();
    let idp_url = &idp.url;
    let app_url = app.url();
    let db = pki.path().join("p.db").display().to_string();
    let cfg = pki.write_config(
        "p.toml",
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[store]
path = "{db}"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[issuers]]
name = "idp"
issuer = "{idp_url}"
audiences = ["https://api.test"]
algorithms = ["ES256"]
discovery_url = "{idp_url}/.well-known/openid-configuration"
min_refresh_interval_s = 0

[browser]
issuer = "idp"
client_id = "{DEMO_CLIENT_ID}"
client_secret_file = "client-secret"

[assertion]
issuer = "https://proxy.test"
active_kid = "assert-1"

[[assertion.keys]]
kid = "assert-1"
private_key_file = "assert.pem"

{routes}
[[routes]]
name = "web"
path_prefix = "/"
upstream = "{app_url}"
sensitivity = "medium"
auth = "browser"
assertion_audience = "https://app.test"
"#
        ),
    );
    Env { pki, idp, app, cfg }
}

fn person(id: &str, sub: &str, groups: &[&str]) -> PostureEvent {
    PostureEvent {
        id: id.to_owned(),
        feed: Feed::Admin,
        kind: "test".into(),
        origin_ms: portcullis::util::now_unix_ms(),
        changes: vec![Change::Identity {
            subject: sub.to_owned(),
            patch: IdentityPatch {
                kind: Some(IdentityKind::Human),
                status: Some(IdentityStatus::Active),
                groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
                ..IdentityPatch::default()
            },
        }],
    }
}

#[tokio::test]
async fn registration_refresh_and_refusal_without_proof() {
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let mut b = Browser::open(server.proxy_addr, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    let offer = b.offer.clone().expect("the login offers DBSC");
    assert!(
        offer.starts_with("(ES256 RS256);path=\"/.portcullis/dbsc/register\";challenge=\""),
        "{offer}"
    );
    // Before registration the session is an ordinary one.
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    assert_eq!(assertion_claims(&e.app.last())["binding"], "none");

    let key = SigningKey::es256("browser").unwrap();
    let id = b.register(&key).await;
    let rec = server
        .shared
        .posture
        .snapshot()
        .session(&b.session_hash())
        .unwrap();
    assert_eq!(rec.binding.as_str(), "dbsc");
    let stored = rec.dbsc.clone().unwrap();
    assert_eq!(stored["thumbprint"], key.thumbprint().unwrap());
    assert_eq!(stored["alg"], "ES256");
    assert_eq!(stored["session_identifier"], id.as_str());

    // With the bound cookie: through, and the app is told the session is bound.
    let (s, _, _) = b.get("/app/page").await;
    assert_eq!(s, StatusCode::OK);
    let seen = e.app.last();
    assert_eq!(seen.path, "/app/page");
    assert_eq!(assertion_claims(&seen)["binding"], "dbsc");
    assert_eq!(header(&seen.headers, "x-portcullis-binding"), "dbsc");

    // Without it (a stolen main cookie on another machine): a browser gets
    // the forced re-proof (307 to the same URL, bound cookie expired), an
    // API client 401; the app sees nothing.
    let count = e.app.count();
    let mut thief = Browser::open(server.proxy_addr, &e.pki).await;
    thief
        .jar
        .insert(SESSION_COOKIE.to_owned(), b.jar[SESSION_COOKIE].clone());
    let (s, h, _) = thief.get("/app/page?x=1").await;
    assert_eq!(s, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(header(&h, "location"), "/app/page?x=1");
    let (s, _, body) = thief.api_get("/app/page").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&body).contains("dbsc_refresh_required"));
    // A browser that says it skipped the refresh gets a refusal, not a loop.
    let (s, _, _) = thief
        .send(
            "GET",
            "/app/",
            &[
                ("accept", "text/html"),
                (
                    "secure-session-skipped",
                    "unreachable;session_identifier=\"x\"",
                ),
            ],
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The thief cannot refresh either: no proof of the key.
    let (s, h, _) = thief.refresh_with(&id, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let other = SigningKey::es256("thief").unwrap();
    let ch = challenge_of(&header(&h, "secure-session-challenge"));
    let (s, _, _) = thief
        .refresh_with(&id, Some(&proof(&other, &ch, false)))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(!thief.jar.contains_key(BOUND_COOKIE));
    assert_eq!(thief.get("/app/").await.0, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(e.app.count(), count, "no refused request reached the app");

    // The owner: the bound cookie is gone (expired) → refresh with a proof.
    b.jar.remove(BOUND_COOKIE);
    assert_eq!(b.get("/app/").await.0, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(e.app.count(), count);
    let next = b.refresh(&id, &key).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    assert_eq!(e.app.count(), count + 1);
    // The challenge cached from the last refresh serves the next one at once.
    let (s, _, _) = b
        .refresh_with(&id, Some(&proof(&key, &challenge_of(&next), false)))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_proofs_are_refused_and_change_nothing() {
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();
    let mut b = Browser::open(server.proxy_addr, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    let hash = b.session_hash();
    let offer = b.offer.clone().unwrap();
    let c = challenge_of(&offer);
    let rs = SigningKey::rs256("browser-rs").unwrap();
    let es = SigningKey::es256("other").unwrap();
    let ed = SigningKey::eddsa("ed").unwrap();
    let unchanged = |what: &str| {
        let r = posture.snapshot().session(&hash).unwrap();
        assert!(r.dbsc.is_none(), "{what}: nothing registered");
        assert_eq!(r.binding.as_str(), "none", "{what}");
    };

    // Registration: wrong challenge, wrong key, wrong algorithms, no proof.
    let mut wrong_key_header = json!({"typ": "dbsc+jwt", "alg": "RS256", "jwk": es.public_jwk()});
    let cases: Vec<(&str, String)> = vec![
        ("made-up challenge", proof(&rs, "made-up", true)),
        ("jwk of another key", {
            wrong_key_header["alg"] = json!("ES256");
            rs.sign_jws(&wrong_key_header, &json!({"jti": c}))
                .unwrap_or_default()
        }),
        ("alg none", forged("none", &rs, &c)),
        ("alg HS256", forged("HS256", &rs, &c)),
        ("alg EdDSA", proof(&ed, &c, true)),
        ("typ missing", {
            rs.sign_jws(
                &json!({"alg": "RS256", "jwk": rs.public_jwk()}),
                &json!({"jti": c}),
            )
            .unwrap()
        }),
    ];
    for (what, p) in &cases {
        let (s, h, body) = b.register_with(p).await;
        assert_eq!(
            s,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(h.get("set-cookie").is_none(), "{what}");
        assert!(
            String::from_utf8_lossy(&body).contains("invalid_dbsc_proof"),
            "{what}"
        );
        unchanged(what);
    }
    let (s, _, _) = b.send("POST", REGISTER, &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "no proof");
    unchanged("no proof");
    // No session: nothing to register.
    let mut stranger = Browser::open(server.proxy_addr, &e.pki).await;
    let (s, _, _) = stranger.register_with(&proof(&rs, &c, true)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    unchanged("no session");

    // The genuine RS256 registration still works (the failures spent
    // nothing), and its challenge cannot be used twice.
    let id = b.register(&rs).await;
    let stored = posture
        .snapshot()
        .session(&hash)
        .unwrap()
        .dbsc
        .clone()
        .unwrap();
    assert_eq!(stored["alg"], "RS256");
    let (s, _, body) = b.register_with(&proof(&es, &c, true)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&body).contains("dbsc_already_registered"));
    assert_eq!(
        posture.snapshot().session(&hash).unwrap().dbsc.as_ref(),
        Some(&stored),
        "a second registration replaces nothing"
    );

    // Refresh: wrong key, wrong alg, none, HS256 → 401; a wrong, replayed
    // or registration challenge → 403 with a new one. No cookie either way.
    let (_, h, _) = b.refresh_with(&id, None).await;
    let ch = challenge_of(&header(&h, "secure-session-challenge"));
    let bound = b.jar[BOUND_COOKIE].clone();
    let other_rs = SigningKey::rs256("thief-rs").unwrap();
    for (what, p, status) in [
        (
            "another key",
            proof(&other_rs, &ch, false),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another alg",
            proof(&es, &ch, false),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "alg none",
            forged("none", &rs, &ch),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "alg HS256",
            forged("HS256", &rs, &ch),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "made-up challenge",
            proof(&rs, "made-up", false),
            StatusCode::FORBIDDEN,
        ),
        (
            "registration challenge",
            proof(&rs, &c, false),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (s, h, _) = b.refresh_with(&id, Some(&p)).await;
        assert_eq!(s, status, "{what}");
        assert!(h.get("set-cookie").is_none(), "{what}");
        assert_eq!(b.jar[BOUND_COOKIE], bound, "{what}");
    }
    // The owner's proof over that same challenge still works once, not twice.
    let good = proof(&rs, &ch, false);
    assert_eq!(b.refresh_with(&id, Some(&good)).await.0, StatusCode::OK);
    let bound = b.jar[BOUND_COOKIE].clone();
    let (s, h, _) = b.refresh_with(&id, Some(&good)).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a replayed proof gets a new challenge"
    );
    assert!(h.get("set-cookie").is_none());
    assert_eq!(b.jar[BOUND_COOKIE], bound);
    assert_eq!(
        posture.snapshot().session(&hash).unwrap().dbsc.as_ref(),
        Some(&stored)
    );
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_bound_cookie_is_refused_on_another_session() {
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let mut alice = Browser::open(server.proxy_addr, &e.pki).await;
    alice.login(&e.idp, "alice@example.com").await;
    alice.register(&SigningKey::es256("a").unwrap()).await;
    let mut bob = Browser::open(server.proxy_addr, &e.pki).await;
    bob.login(&e.idp, "bob@example.com").await;
    let bob_key = SigningKey::es256("b").unwrap();
    let bob_id = bob.register(&bob_key).await;
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);
    let count = e.app.count();
    // Alice's (valid, fresh) bound cookie in Bob's jar.
    bob.jar
        .insert(BOUND_COOKIE.to_owned(), alice.jar[BOUND_COOKIE].clone());
    assert_eq!(bob.get("/app/").await.0, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(bob.api_get("/app/").await.0, StatusCode::UNAUTHORIZED);
    // A tampered one.
    let mut t = alice.jar[BOUND_COOKIE].clone().into_bytes();
    t[2] ^= 1;
    bob.jar
        .insert(BOUND_COOKIE.to_owned(), String::from_utf8(t).unwrap());
    assert_eq!(bob.api_get("/app/").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(e.app.count(), count);
    // Alice's DBSC session id on Bob's session: the browser is told to drop it.
    let alice_id = {
        let r = server
            .shared
            .posture
            .snapshot()
            .session(&alice.session_hash())
            .unwrap();
        r.dbsc.as_ref().unwrap()["session_identifier"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (s, _, body) = bob.refresh_with(&alice_id, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({"continue": false})
    );
    // Bob's own refresh puts things right.
    bob.refresh(&bob_id, &bob_key).await;
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);
    assert_eq!(e.app.count(), count + 1);
}

#[tokio::test]
async fn a_posture_change_forces_a_fresh_proof_and_an_ended_session_ends_dbsc() {
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();
    posture
        .ingest(vec![person("p1", "alice@example.com", &["staff"])])
        .await
        .unwrap();
    let mut b = Browser::open(server.proxy_addr, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    let key = SigningKey::es256("browser").unwrap();
    let id = b.register(&key).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    let count = e.app.count();

    // Alice's record changes: the cookie minted before it no longer counts.
    posture
        .ingest(vec![person(
            "p2",
            "alice@example.com",
            &["staff", "finance"],
        )])
        .await
        .unwrap();
    assert!(b.jar.contains_key(BOUND_COOKIE));
    let (s, h, _) = b.get("/app/").await;
    assert_eq!(s, StatusCode::TEMPORARY_REDIRECT);
    assert!(
        h.get_all("set-cookie").iter().any(|v| v
            .to_str()
            .unwrap()
            .starts_with(&format!("{BOUND_COOKIE}=;"))),
        "the bound cookie is expired, so the browser refreshes"
    );
    assert_eq!(e.app.count(), count);
    b.refresh(&id, &key).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    assert_eq!(e.app.count(), count + 1);

    // Logout ends the session; the next refresh ends the browser's DBSC session.
    let origin = format!("https://{}", b.conn.host);
    let sid = b.jar[SESSION_COOKIE].clone();
    let (s, _, _) = b
        .send("POST", "/.portcullis/logout", &[("origin", &origin)])
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(
        !b.jar.contains_key(BOUND_COOKIE),
        "logout expires the bound cookie"
    );
    b.jar.insert(SESSION_COOKIE.to_owned(), sid);
    let (s, h, body) = b
        .refresh_with(&id, Some(&proof(&key, "whatever", false)))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("set-cookie").is_none());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        json!({"continue": false})
    );
}

#[tokio::test]
async fn a_bound_session_survives_a_restart_with_its_key() {
    let e = env().await;
    let proc1 = common::ServeProcess::spawn(&e.cfg).await;
    let mut b = Browser::open(proc1.proxy, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    let key = SigningKey::rs256("browser").unwrap();
    let id = b.register(&key).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    drop(proc1);
    let proc2 = common::ServeProcess::spawn(&e.cfg).await;
    let mut again = Browser::open(proc2.proxy, &e.pki).await;
    again.jar = b.jar.clone();
    // Still bound: without a bound cookie it must refresh; the key registered
    // before the restart signs the proof.
    again.jar.remove(BOUND_COOKIE);
    let count = e.app.count();
    assert_eq!(again.get("/app/").await.0, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(e.app.count(), count);
    again.refresh(&id, &key).await;
    let (s, _, _) = again.get("/app/").await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the session and its key outlived the process"
    );
    let seen = e.app.last();
    assert_eq!(assertion_claims(&seen)["binding"], "dbsc");
    assert_eq!(assertion_claims(&seen)["sub"], "alice@example.com");
}

/// The script's process, ended when the test ends: given the time to
/// close its browser ([`common::end_browser_script`]).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        common::end_browser_script(&mut self.0, std::time::Duration::from_secs(15));
    }
}

/// Reads the next JSON line of the script, bounded by `DEADLINE`.
async fn next_json(
    lines: &Arc<std::sync::Mutex<std::io::Lines<std::io::BufReader<std::process::ChildStdout>>>>,
    stderr: &std::path::Path,
) -> serde_json::Value {
    let l = lines.clone();
    let line = tokio::time::timeout(
        DEADLINE * 2,
        tokio::task::spawn_blocking(move || l.lock().unwrap().next()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "dbsc.mjs said nothing in time; stderr: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        )
    })
    .unwrap();
    let line = line.and_then(Result::ok).unwrap_or_else(|| {
        panic!(
            "dbsc.mjs ended early; stderr: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        )
    });
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// Headless Debian Chromium with software DBSC keys: it registers on the
/// login's offer, and after a posture change the proxy's forced re-proof
/// makes it refresh with a proof the proxy verifies. The test CA is trusted
/// through a throw-away NSS db in a temporary HOME (Chromium registers only
/// over https it trusts).
#[tokio::test]
async fn headless_chromium_registers_and_refreshes_its_session() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};

    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/puppeteer-core").is_dir(),
        "tests/js/node_modules is missing: run scripts/test.sh (it runs `npm ci` in tests/js)"
    );
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();

    // A throw-away NSS db that trusts the test CA.
    let home = tempfile::tempdir().unwrap();
    let nssdb = home.path().join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    let ok = Command::new("certutil")
        .args(["-N", "-d", &db, "--empty-password"])
        .status()
        .unwrap();
    assert!(ok.success(), "certutil -N");
    let ok = Command::new("certutil")
        .args([
            "-A",
            "-d",
            &db,
            "-t",
            "C,,",
            "-n",
            "portcullis-test-ca",
            "-i",
        ])
        .arg(e.pki.path().join("ca.pem"))
        .status()
        .unwrap();
    assert!(ok.success(), "certutil -A");

    let app_url = format!("https://127.0.0.1:{}/app/", server.proxy_addr.port());
    let plan = home.path().join("plan.json");
    std::fs::write(
        &plan,
        json!({
            "app_url": app_url,
            "chromium": "/usr/bin/chromium",
            "home": home.path(),
            "timeout_ms": 20_000,
        })
        .to_string(),
    )
    .unwrap();
    let stderr = home.path().join("dbsc.stderr");
    let mut child = Child(
        Command::new("node")
            .arg(js.join("dbsc.mjs"))
            .arg(&plan)
            .current_dir(&js)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let lines = Arc::new(std::sync::Mutex::new(
        std::io::BufReader::new(child.0.stdout.take().unwrap()).lines(),
    ));

    // 1. Login and registration.
    let out = next_json(&lines, &stderr).await;
    assert_eq!(out["phase"], "registered", "{out:#}");
    let sub = out["sub"].as_str().unwrap().to_owned();
    let sessions = posture.snapshot().sessions_where(|s| s.subject == sub);
    let [session] = sessions.as_slice() else {
        panic!("one session for {sub}: {sessions:?}")
    };
    let stored = session.dbsc.clone().expect("Chromium registered a key");
    assert_eq!(session.binding.as_str(), "dbsc");
    assert!(
        matches!(stored["alg"].as_str(), Some("ES256" | "RS256")),
        "{stored}"
    );
    let created = out["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e.get("creationEventDetails").is_some())
        .cloned()
        .unwrap();
    assert_eq!(created["succeeded"], true, "{created:#}");

    // 2. A posture change of the subject: the proxy demands a fresh proof,
    // Chromium refreshes with its key, the page loads.
    posture
        .ingest(vec![person("chromium-1", &sub, &["changed"])])
        .await
        .unwrap();
    let count = e.app.count();
    writeln!(child.0.stdin.as_mut().unwrap(), "go").unwrap();
    let out = next_json(&lines, &stderr).await;
    assert_eq!(out["phase"], "done", "{out:#}");
    assert_eq!(out["status"], 200, "{out:#}");
    let refreshed = out["events"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e.get("refreshEventDetails").is_some())
        .cloned()
        .unwrap();
    assert_eq!(refreshed["succeeded"], true, "{refreshed:#}");
    // The proxy verified a proof by the registered key (in memory), and the
    // app got the page once, bound.
    let rt = server.shared.proxy.runtime.load();
    let live = rt.browser.as_ref().unwrap().live(&session.id_hash).unwrap();
    assert!(
        live.last_proof.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "a refresh proof verified"
    );
    // (Chromium also asks for /favicon.ico; that is bound too.)
    let pages: Vec<common::Seen> = e.app.seen.lock().unwrap()[count..]
        .iter()
        .filter(|s| s.path == "/app/")
        .cloned()
        .collect();
    assert_eq!(
        pages.len(),
        1,
        "the page reached the app once, after the refresh"
    );
    assert_eq!(assertion_claims(&pages[0])["binding"], "dbsc");
    assert_eq!(
        posture.snapshot().session(&session.id_hash).unwrap().dbsc,
        Some(stored),
        "the refresh kept the registered key"
    );
}

/// Logout (and any other end of a session) reaches live connections at once:
/// the change notice names the session, and its WebSocket is cut.
#[tokio::test]
async fn logout_cuts_the_sessions_live_connections() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let ws = common::live::RecordingWs::start().await;
    let e = env_with(&format!(
        "[[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"http://{}\"\nauth = \"browser\"\n",
        ws.addr
    ))
    .await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let mut b = Browser::open(server.proxy_addr, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    b.register(&SigningKey::es256("browser").unwrap()).await;
    let cookies = b
        .jar
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");

    // A WebSocket on the session (with its bound cookie).
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(e.pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.proxy_addr)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!("wss://localhost:{}/ws/alice", server.proxy_addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookies.parse().unwrap());
    let (mut sock, resp) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    sock.send(Message::text("hello")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, sock.next()).await.unwrap();
    assert!(matches!(echoed, Some(Ok(Message::Text(t))) if t.as_str() == "hello"));

    // Logout on another connection: the socket is cut at once.
    let origin = format!("https://{}", b.conn.host);
    let (s, _, _) = b
        .send("POST", "/.portcullis/logout", &[("origin", &origin)])
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    common::wait_until("the upstream side to be closed", || {
        ws.close_for("/ws/alice").is_some()
    })
    .await;
    loop {
        match tokio::time::timeout(DEADLINE, sock.next()).await.unwrap() {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(Message::Text(t))) => panic!("data after the cut: {t}"),
            Some(Ok(_)) => continue,
        }
    }
}

/// The registration and a rewrite of the whole session record from a copy
/// read before it (a `shorten` cap racing the registration) never undo each
/// other: DBSC state has its own change in the store.
#[tokio::test]
async fn a_stale_session_rewrite_keeps_the_dbsc_key() {
    let e = env().await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();
    let mut b = Browser::open(server.proxy_addr, &e.pki).await;
    b.login(&e.idp, "alice@example.com").await;
    let hash = b.session_hash();
    let before = posture.snapshot().session(&hash).unwrap();
    let key = SigningKey::es256("browser").unwrap();
    b.register(&key).await;
    // The cap, computed from the copy read before the registration.
    let mut capped = (*before).clone();
    capped.expires_s = capped.created_s + 900;
    posture
        .ingest(vec![PostureEvent {
            id: "stale-cap".into(),
            feed: Feed::Session,
            kind: "session.shorten".into(),
            origin_ms: portcullis::util::now_unix_ms(),
            changes: vec![Change::Session {
                id_hash: hash.clone(),
                record: Some(Box::new(capped)),
            }],
        }])
        .await
        .unwrap();
    let now = posture.snapshot().session(&hash).unwrap();
    assert_eq!(now.expires_s, now.created_s + 900, "the cap is kept");
    assert_eq!(now.binding.as_str(), "dbsc", "and so is the key");
    assert_eq!(
        now.dbsc.as_ref().unwrap()["thumbprint"],
        key.thumbprint().unwrap()
    );
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    assert_eq!(assertion_claims(&e.app.last())["binding"], "dbsc");
}
