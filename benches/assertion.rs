//! Phase 6's signed identity (`x-portcullis-assertion`) as a request pays for it.
//!
//! - `assertion/sign`: a fresh ES256 assertion (random `jti`, claims JSON,
//!   base64url, ECDSA P-256 signature) — what a request costs when nothing
//!   can be reused (`reuse_s = 0`, or the first request of a caller).
//! - `assertion/reused`: `Signer::assertion` for a caller whose identical
//!   assertion was signed less than `reuse_s` ago: seeded hash of the
//!   inputs, cache lookup, field-by-field confirmation, header clone.
//!
//! Run: `cargo bench --bench assertion -- --warm-up-time 1 --measurement-time 3`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::config::AssertionConfig;
use portcullis::demo::pki::SigningKey;
use portcullis::proxy::assertion::{AssertionInput, DeviceFacts, Signer};

fn signer(reuse_s: u64) -> Signer {
    let key = SigningKey::es256("bench").unwrap();
    let cfg = AssertionConfig {
        issuer: "https://portcullis.bench".into(),
        ttl_s: 60,
        reuse_s,
        cache_capacity: 10_000,
        active_kid: None,
        keys: vec![],
    };
    Signer::new(&cfg, &[("bench".into(), key.private_pem.into_bytes())]).unwrap()
}

fn bench(c: &mut Criterion) {
    let groups = vec![
        "eng".to_owned(),
        "payroll-admins".to_owned(),
        "all-staff".to_owned(),
    ];
    let entitlements = vec!["payroll:read".to_owned(), "payroll:write".to_owned()];
    let amr = vec!["pwd".to_owned(), "otp".to_owned()];
    let input = AssertionInput {
        subject: Cow::Borrowed("alice@corp.example"),
        email: Some("alice@corp.example"),
        groups: &groups,
        entitlements: &entitlements,
        device: Some(DeviceFacts {
            id: "laptop-7f3a",
            verified: true,
            compliance: "compliant",
            lifecycle: "active",
        }),
        acr: Some("urn:pc:mfa"),
        amr: &amr,
        auth: "browser",
        binding: "dbsc",
        decision: "allow",
        route: "payroll",
    };
    let now = portcullis::util::now_unix();

    let fresh = signer(0);
    c.bench_function("assertion/sign", |b| {
        b.iter(|| {
            black_box(
                fresh
                    .sign(black_box(&input), "https://payroll.example", now)
                    .unwrap(),
            )
        })
    });

    let reused = signer(50);
    reused
        .assertion(&input, "https://payroll.example", now)
        .unwrap();
    c.bench_function("assertion/reused", |b| {
        b.iter(|| {
            black_box(
                reused
                    .assertion(black_box(&input), "https://payroll.example", now)
                    .unwrap(),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
