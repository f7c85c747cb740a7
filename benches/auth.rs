//! The per-request authentication path: `Authorization` header → verified
//! token, with the verification cache warm (signature skipped) and cold
//! (full signature check), for RS256, ES256 and EdDSA.
//!
//! Run: `cargo bench --bench auth`. Target: ≤ 2 µs median with a cached token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::authn::{Authenticator, Issuer, jwks::Fetcher};
use portcullis::config::IssuerConfig;
use portcullis::demo::pki::SigningKey;

const ISS: &str = "https://idp.bench";
const AUD: &str = "https://api.bench";

fn setup(
    rt: &tokio::runtime::Runtime,
) -> (
    Authenticator,
    Vec<(&'static str, String)>,
    tempfile::TempDir,
) {
    let keys = [
        SigningKey::rs256("rsa").unwrap(),
        SigningKey::es256("ec").unwrap(),
        SigningKey::eddsa("ed").unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
            .to_string(),
    )
    .unwrap();
    let cfg = IssuerConfig {
        name: "bench".into(),
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
        jwks_url: None,
        discovery_url: None,
        jwks_file: Some(jwks),
        fetch_ca: None,
        refresh_interval_s: 300,
        min_refresh_interval_s: 30,
        leeway_s: 30,
        device_claim: "device_id".into(),
    };
    let issuer = rt.block_on(async {
        let i = Issuer::new(cfg, &Fetcher::default()).unwrap();
        i.refresh().await.unwrap();
        i
    });
    let auth = Authenticator::new(vec![issuer], 100_000, 16 * 1024);
    let now = portcullis::util::now_unix();
    let tokens = keys
        .iter()
        .map(|k| {
            let claims = serde_json::json!({
                "iss": ISS, "aud": AUD, "sub": "alice@example.com", "device_id": "laptop-001",
                "iat": now, "nbf": now, "exp": now + 3600, "jti": "bench-1",
                "acr": "urn:example:mfa", "amr": ["pwd", "otp"],
            });
            (k.alg, format!("Bearer {}", k.sign(&claims).unwrap()))
        })
        .collect();
    (auth, tokens, dir)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (auth, tokens, _dir) = setup(&rt);
    let mut g = c.benchmark_group("auth");
    for (alg, header) in &tokens {
        let hv = http::HeaderValue::from_str(header).unwrap();
        // Warm the cache once.
        let t = Authenticator::bearer_token(Some(&hv)).unwrap();
        rt.block_on(auth.authenticate(t, &[])).unwrap();
        g.bench_function(format!("cached/{alg}"), |b| {
            b.iter(|| {
                let now = portcullis::util::now_unix();
                let t = Authenticator::bearer_token(Some(black_box(&hv))).unwrap();
                black_box(auth.check_cached(t, now).unwrap().unwrap());
            })
        });
        g.bench_function(format!("uncached/{alg}"), |b| {
            b.iter(|| {
                let now = portcullis::util::now_unix();
                let t = Authenticator::bearer_token(Some(black_box(&hv))).unwrap();
                black_box(rt.block_on(auth.verify_uncached(t, now)).unwrap());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
