//! The policy decision on the request path: warm decision cache (key hash +
//! lookup) and an uncached decision of the default set (building the inputs
//! from the token and snapshot records + Cedar evaluation).
//!
//! Run: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`.
//! Targets: warm ≤ 1 µs median; uncached ≤ 20 µs median.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::config::Sensitivity;
use portcullis::policy::facts::{Inputs, Limits, RequestFacts};
use portcullis::policy::{Engine, MethodClass, Settings, load_dir};
use portcullis::posture::Resolved;
use portcullis::posture::model::{Compliance, Device, Identity, Lifecycle, Ownership};

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let set = Arc::new(load_dir(&dir).unwrap());
    let engine = Engine::new(
        set.clone(),
        None,
        Settings {
            limits: Limits::default(),
            zones: Vec::new(),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 100_000,
            shadow_routes: Vec::new(),
            dir,
            shadow_dir: None,
        },
        None,
    );
    let now = portcullis::util::now_unix();
    let claims: portcullis::authn::Claims = serde_json::from_value(serde_json::json!({
        "sub": "alice@example.com", "iss": "https://idp.bench", "exp": now + 3600,
        "iat": now - 60, "auth_time": now - 60, "jti": "bench-1",
        "acr": "urn:portcullis:acr:pwd", "amr": ["pwd"],
    }))
    .unwrap();
    let device = Device {
        id: "laptop-001".into(),
        ownership: Ownership::Corporate,
        lifecycle: Lifecycle::Enrolled,
        compliance: Compliance::Compliant,
        last_check_in_ms: Some(now * 1000 - 30_000),
        updated_ms: now * 1000 - 30_000,
        version: 7,
        ..Device::default()
    };
    let identity = Identity {
        subject: "alice@example.com".into(),
        groups: vec!["eng".into(), "staff".into()],
        entitlements: vec!["wiki".into()],
        version: 3,
        ..Identity::default()
    };
    let resolved = Resolved {
        snapshot_version: 10,
        identity: Some(Arc::new(identity)),
        device_id: Some("laptop-001".into()),
        device: Some(Arc::new(device)),
        snapshot_age_s: 0,
    };
    let facts = |method| RequestFacts {
        claims: &claims,
        issuer: "bench",
        resolved: &resolved,
        owner: None,
        route: "wiki",
        sensitivity: Sensitivity::Medium,
        workloads: &[],
        method,
        peer: "10.1.2.3".parse().unwrap(),
        zone: "other",
        binding: "none",
        spiffe_id: None,
        session_binding: None,
    };
    let read = facts(MethodClass::Read);
    assert_eq!(
        engine.decide(&read, now).decided.action,
        portcullis::policy::Action::Allow
    );
    let mut g = c.benchmark_group("policy");
    g.bench_function("decide_warm_cache", |b| {
        b.iter(|| black_box(engine.decide(black_box(&read), now)))
    });
    g.bench_function("uncached_default_set", |b| {
        b.iter(|| {
            let inputs = Inputs::from_request(black_box(&read), &Limits::default(), now);
            black_box(set.evaluate(&inputs))
        })
    });
    let inputs = Inputs::from_request(&read, &Limits::default(), now);
    g.bench_function("cedar_evaluate_only", |b| {
        b.iter(|| black_box(set.evaluate(black_box(&inputs))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
