//! Phase 7's access memory as a request pays for it: `AccessMemory::record`
//! with a bearer token, on a row and token seen before (the steady state:
//! a hash of subject/device/route, two lock-free map lookups and a few
//! atomic stores), across 10k remembered subjects. A first sighting adds one
//! allocation per row; the background flush is off the request path and is
//! not measured here.
//!
//! Target: ≤ 0.3 µs per request for a known row.
//!
//! Run: `cargo bench --bench access -- --quick`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::access::{AccessMemory, Observed, TokenSeen};

fn observed<'a>(subject: &'a str, id: &'a str, hash: [u8; 32]) -> Observed<'a> {
    Observed {
        subject,
        device: Some("laptop-0042"),
        route: "payroll",
        decision: "allow",
        request_id: id,
        workload: false,
        token: Some(TokenSeen {
            hash,
            iat: Some(1_800_000_000),
            exp: 1_800_000_600,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("access");
    // A memory already holding 10k subjects, as a busy proxy would.
    let mem = AccessMemory::new(100_000, 100_000, None);
    let subjects: Vec<String> = (0..10_000)
        .map(|i| format!("user{i}@example.com"))
        .collect();
    for (i, s) in subjects.iter().enumerate() {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        mem.record(&observed(s, "3f9a0c11e2b4-0000000000000001", h));
    }
    let mut n = 0usize;
    g.bench_function("record/known", |b| {
        b.iter(|| {
            n = (n + 1) % subjects.len();
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(n as u64).to_le_bytes());
            mem.record(black_box(&observed(
                &subjects[n],
                "3f9a0c11e2b4-000000000000002a",
                h,
            )));
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
