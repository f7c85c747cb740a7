//! Posture benches: the request-path lookup (identity + device from the
//! snapshot) and durable ingest throughput with group commit.
//!
//! Run: `cargo bench --bench posture`. Targets: lookup ≤ 200 ns median;
//! ingest ≥ 20,000 events/s (SQLite WAL, synchronous=FULL, batched commits).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::posture::Posture;
use portcullis::posture::event::{Change, DevicePatch, Feed, IdentityPatch, PostureEvent};
use portcullis::posture::model::{Compliance, IdentityStatus, Lifecycle};
use portcullis::store::sqlite::SqliteStore;
use portcullis::telemetry::Metrics;

fn device_event(seq: u64, i: u64) -> PostureEvent {
    PostureEvent {
        id: format!("bench:{seq}:{i}"),
        feed: Feed::Mdm,
        kind: "bench.device".into(),
        origin_ms: 1_700_000_000_000 + seq,
        changes: vec![Change::Device {
            id: format!("device-{i}"),
            patch: DevicePatch {
                lifecycle: Some(Lifecycle::Enrolled),
                compliance: Some(if seq.is_multiple_of(2) {
                    Compliance::Compliant
                } else {
                    Compliance::NonCompliant
                }),
                os_version: Some("15.3.2".into()),
                subjects: Some(vec![format!("user-{i}@example.com")]),
                ..DevicePatch::default()
            },
        }],
    }
}

fn identity_event(i: u64) -> PostureEvent {
    PostureEvent {
        id: format!("bench:id:{i}"),
        feed: Feed::Scim,
        kind: "bench.identity".into(),
        origin_ms: 1_700_000_000_000,
        changes: vec![Change::Identity {
            subject: format!("user-{i}@example.com"),
            patch: IdentityPatch {
                status: Some(IdentityStatus::Active),
                groups: Some(vec!["engineering".into(), "vpn".into()]),
                devices: Some(vec![format!("device-{i}")]),
                ..IdentityPatch::default()
            },
        }],
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("bench.db"), true).unwrap();
    let posture = Posture::start(Box::new(store), Arc::new(Metrics::new())).unwrap();

    // Populate 100k devices and identities for the lookup bench.
    const N: u64 = 100_000;
    rt.block_on(async {
        for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
            let evs: Vec<_> = chunk
                .iter()
                .flat_map(|i| [device_event(0, *i), identity_event(*i)])
                .collect();
            posture.ingest(evs).await.unwrap();
        }
    });

    let mut g = c.benchmark_group("posture");
    let mut i = 0u64;
    let subjects: Vec<(String, String)> = (0..1024)
        .map(|k| {
            (
                format!("user-{}@example.com", k * 97 % N),
                format!("device-{}", k * 97 % N),
            )
        })
        .collect();
    g.bench_function("resolve (identity + device lookup)", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (s, d) = &subjects[i as usize];
            black_box(posture.resolve(black_box(s), Some(black_box(d))));
        })
    });
    g.bench_function("resolve+baseline (cache hit)", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (s, d) = &subjects[i as usize];
            let r = posture.resolve(black_box(s), Some(black_box(d)));
            assert!(r.identity.is_some() && r.device.is_some());
            black_box(posture.baseline(s, &r, Some(1_800_000_000), &[]).is_ok());
        })
    });

    // Durable ingest: 64 concurrent feeds × 100 events per call = 6,400
    // events per iteration, folded into group commits by the writer.
    const CALLS: u64 = 64;
    const PER_CALL: u64 = 100;
    g.throughput(Throughput::Elements(CALLS * PER_CALL));
    g.sample_size(10);
    let mut seq = 1u64;
    g.bench_function("durable ingest (group commit, synchronous=FULL)", |b| {
        b.iter(|| {
            seq += 1;
            let s = seq;
            rt.block_on(async {
                let mut tasks = Vec::new();
                for call in 0..CALLS {
                    let p = posture.clone();
                    tasks.push(tokio::spawn(async move {
                        let evs = (0..PER_CALL)
                            .map(|k| device_event(s, call * PER_CALL + k))
                            .collect();
                        p.ingest(evs).await.unwrap()
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
