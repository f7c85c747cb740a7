//! Phase 3 (bind) as a request pays for it: `Binder::bind_token` with an
//! already-verified access token.
//!
//! - `dpop/<alg>`: a fresh proof per iteration (signed outside the timed
//!   part): header lookup, htu build and normalisation, every RFC 9449 §4.3
//!   check including the signature, the RFC 7638 thumbprint and the replay
//!   cache insert. Target: median ≤ 60 µs for ES256 and EdDSA.
//! - `mtls/x5t`: a certificate-bound token on a connection with its client
//!   certificate: `cnf` lookup, constant-time thumbprint compare, device id
//!   by `san-uri` rule, device-claim consistency. Target: ≤ 1 µs.
//!
//! Run: `cargo bench --bench binding -- --warm-up-time 1 --measurement-time 3`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use portcullis::authn::{Authenticator, Issuer, Scheme, VerifiedToken, jwks::Fetcher};
use portcullis::binding::{Binder, BindingKind, RequestView, TokenView};
use portcullis::config::{Config, IssuerConfig};
use portcullis::demo::pki::{DevCa, SigningKey};
use portcullis::tls::PeerCertificate;

const ISS: &str = "https://idp.bench";
const AUD: &str = "https://api.bench";
const HOST: &str = "app.bench";

fn binder() -> Binder {
    let toml = r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"
[binding]
device_id_rule = "san-uri:device://{id}"
dpop_replay_capacity = 10000000
"#;
    let cfg = Config::from_toml(toml, Path::new("/bench/p.toml")).unwrap();
    Binder::new(&cfg, None)
}

fn verify_tokens(
    rt: &tokio::runtime::Runtime,
    issuer_key: &SigningKey,
    claims: &[serde_json::Value],
) -> (Vec<(String, Arc<VerifiedToken>)>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": [issuer_key.jwk] }).to_string(),
    )
    .unwrap();
    let cfg = IssuerConfig {
        name: "bench".into(),
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        algorithms: vec!["ES256".into()],
        jwks_url: None,
        discovery_url: None,
        jwks_file: Some(jwks),
        fetch_ca: None,
        refresh_interval_s: 300,
        min_refresh_interval_s: 30,
        leeway_s: 30,
        device_claim: "device_id".into(),
    };
    let auth = rt.block_on(async {
        let i = Issuer::new(cfg, &Fetcher::default()).unwrap();
        i.refresh().await.unwrap();
        Authenticator::new(vec![i], 1000, 16 * 1024)
    });
    let now = portcullis::util::now_unix();
    let out = claims
        .iter()
        .map(|c| {
            let token = issuer_key.sign(c).unwrap();
            let v = rt.block_on(auth.verify_uncached(&token, now)).unwrap();
            (token, v)
        })
        .collect();
    (out, dir)
}

fn claims(cnf: serde_json::Value) -> serde_json::Value {
    let now = portcullis::util::now_unix();
    serde_json::json!({
        "iss": ISS, "aud": AUD, "sub": "alice@example.com", "device_id": "laptop-001",
        "iat": now, "exp": now + 3600, "cnf": cnf,
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let binder = binder();
    let issuer_key = SigningKey::es256("idp").unwrap();
    let proof_keys = [
        SigningKey::es256("client-ec").unwrap(),
        SigningKey::eddsa("client-ed").unwrap(),
    ];
    let ca = DevCa::new("bench device CA").unwrap();
    let leaf = ca
        .client_cert("laptop-001", &["device://laptop-001"])
        .unwrap();
    let peer = PeerCertificate::new(leaf.cert_der.clone().into());
    let x5t = portcullis::binding::mtls::encode_x5t(&peer.sha256);

    let mut all_claims: Vec<serde_json::Value> = proof_keys
        .iter()
        .map(|k| claims(serde_json::json!({ "jkt": k.thumbprint().unwrap() })))
        .collect();
    all_claims.push(claims(serde_json::json!({ "x5t#S256": x5t })));
    let (tokens, _dir) = verify_tokens(&rt, &issuer_key, &all_claims);
    let htu = format!("https://{HOST}/api/orders");

    let mut g = c.benchmark_group("binding");
    for (key, (token, verified)) in proof_keys.iter().zip(&tokens) {
        let tok = TokenView {
            scheme: Scheme::Dpop,
            token,
            verified,
        };
        g.bench_function(format!("dpop/{}", key.alg), |b| {
            b.iter_batched(
                || {
                    let proof = key.dpop_proof("GET", &htu, Some(token), None).unwrap();
                    let mut h = http::HeaderMap::new();
                    h.insert("dpop", http::HeaderValue::from_str(&proof).unwrap());
                    h
                },
                |headers| {
                    let req = RequestView {
                        method: "GET",
                        scheme: "https",
                        authority: Some(HOST),
                        path: "/api/orders",
                        headers: &headers,
                        peer: None,
                        now: portcullis::util::now_unix(),
                    };
                    let b = binder.bind_token(&req, black_box(&tok), false).unwrap();
                    assert_eq!(b.kind, BindingKind::Dpop);
                    headers
                },
                BatchSize::SmallInput,
            )
        });
    }

    let (token, verified) = &tokens[2];
    let tok = TokenView {
        scheme: Scheme::Bearer,
        token,
        verified,
    };
    let headers = http::HeaderMap::new();
    g.bench_function("mtls/x5t", |b| {
        b.iter(|| {
            let req = RequestView {
                method: "GET",
                scheme: "https",
                authority: Some(HOST),
                path: "/api/orders",
                headers: &headers,
                peer: Some(black_box(&peer)),
                now: portcullis::util::now_unix(),
            };
            let b = binder.bind_token(&req, black_box(&tok), true).unwrap();
            assert_eq!(b.kind, BindingKind::Mtls);
            b
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
