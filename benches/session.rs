//! The per-request session path of browser routes: `Cookie` header → session
//! id → hash → snapshot record → the session's principal (built once, then
//! reused), with 100 000 sessions held. This is what a browser request costs
//! on top of phases 4–5, in place of the bearer token check.
//!
//! `session/cookie+lookup+bound` adds the DBSC bound-cookie check (one
//! HMAC) of a session with a registered key.
//!
//! Run: `cargo bench --bench session`. Target: ≤ 1 µs median.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::authn::{Authenticator, Issuer, jwks::Fetcher};
use portcullis::config::Config;
use portcullis::demo::pki::SigningKey;
use portcullis::posture::snapshot::Snapshot;
use portcullis::session::cookie::{SESSION_COOKIE, id_hash, new_session_id};
use portcullis::session::{Browser, SessionBinding, SessionRecord};

const SESSIONS: usize = 100_000;

fn record(id: &str, now: u64) -> SessionRecord {
    SessionRecord {
        id_hash: id_hash(id),
        subject: format!("user-{}@example.com", &id[..6]),
        issuer: "idp".into(),
        device: Some("laptop-001".into()),
        device_verified: false,
        binding: SessionBinding::None,
        cert_thumbprint: None,
        acr: Some("urn:example:mfa".into()),
        amr: vec!["pwd".into()],
        auth_time: Some(now),
        idp_sid: Some("sid-1".into()),
        created_s: now,
        last_seen_s: now,
        idle_timeout_s: 3600,
        expires_s: now + 3600,
        dbsc: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::es256("ec").unwrap();
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::json!({ "keys": [key.jwk] }).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    let toml = r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"
[[issuers]]
name = "idp"
issuer = "https://idp.bench"
audiences = ["https://api.bench"]
algorithms = ["ES256"]
jwks_file = "jwks.json"
[browser]
issuer = "idp"
client_id = "bench"
client_secret_file = "secret"
[[routes]]
name = "web"
upstream = "http://127.0.0.1:1"
auth = "browser"
"#;
    let cfg = Config::from_toml(toml, &dir.path().join("p.toml")).unwrap();
    let browser = Browser::new(&cfg, None).unwrap().unwrap();
    let issuer = rt.block_on(async {
        let i = Issuer::new(cfg.issuers[0].clone(), &Fetcher::default()).unwrap();
        i.refresh().await.unwrap();
        i
    });
    let auth = Authenticator::new(vec![issuer], 1000, 16 * 1024);
    let snapshot = Snapshot::new();
    let now = portcullis::util::now_unix();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let id = new_session_id().unwrap();
        let r = record(&id, now);
        snapshot.put_session(&r.id_hash.clone(), Some(Arc::new(r)));
        ids.push(id);
    }
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::COOKIE,
        format!("theme=dark; {SESSION_COOKIE}={}; lang=en", ids[4242])
            .parse()
            .unwrap(),
    );
    // Warm: the principal is built on the first request of a session.
    assert!(
        browser
            .authenticate(&headers, &auth, &snapshot, now)
            .unwrap()
            .is_some()
    );
    c.bench_function("session/cookie+lookup", |b| {
        b.iter(|| {
            black_box(
                browser
                    .authenticate(black_box(&headers), &auth, &snapshot, now)
                    .unwrap(),
            )
        })
    });

    // A DBSC-bound session: the same, plus its bound cookie.
    let id = &ids[777];
    let bound = record(id, now).with_dbsc(serde_json::json!({
        "session_identifier": "s-1", "alg": "ES256", "jwk": key.public_jwk(),
        "thumbprint": key.thumbprint().unwrap(), "registered_s": now, "last_proof_s": now,
    }));
    snapshot.put_session(&bound.id_hash.clone(), Some(Arc::new(bound)));
    let now_ms = portcullis::util::now_unix_ms();
    let cookie = browser.dbsc.bound_cookie(&id_hash(id), now_ms);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::COOKIE,
        format!(
            "theme=dark; {SESSION_COOKIE}={id}; {}={cookie}",
            portcullis::session::dbsc::BOUND_COOKIE
        )
        .parse()
        .unwrap(),
    );
    let live = browser
        .authenticate(&headers, &auth, &snapshot, now)
        .unwrap()
        .unwrap();
    browser
        .check_bound(&live, &headers, now_ms - 1000, now_ms)
        .unwrap();
    c.bench_function("session/cookie+lookup+bound", |b| {
        b.iter(|| {
            let live = browser
                .authenticate(black_box(&headers), &auth, &snapshot, now)
                .unwrap()
                .unwrap();
            black_box(browser.check_bound(&live, &headers, now_ms - 1000, now_ms))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
