//! Phase 7's access memory, across 10k remembered subjects, on a row and
//! token seen before (the steady state):
//! - `record/known`: what a request pays — two hashes of subject/device/
//!   route, a bitmap test and a bounded-queue send (a drainer thread applies
//!   the queue meanwhile, as the proxy's 10 ms ticker does);
//! - `record+apply/known`: the whole CPU of one observation, the drain's map
//!   lookups and atomic stores included (off the request path in the proxy);
//! - `record/known, memo`: what a request of a cached token pays once its
//!   rows are kept with the token (`access::Memo`): the two hashes and the
//!   stores into its rows, no queue and no drain.
//!
//! A first sighting adds one allocation; the flush to SQLite is not measured.
//!
//! Target: ≤ 0.3 µs per request for a known row.
//!
//! Run: `cargo bench --bench access -- --quick`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::access::{AccessMemory, Memo, Observed, TokenSeen};

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

/// The n-th subject's token hash.
fn hash_of(n: usize) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&(n as u64).to_le_bytes());
    h
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("access");
    // A memory already holding 10k subjects, as a busy proxy would.
    let mem = AccessMemory::new(100_000, 100_000, None);
    let subjects: Vec<String> = (0..10_000)
        .map(|i| format!("user{i}@example.com"))
        .collect();
    for (i, s) in subjects.iter().enumerate() {
        mem.record(
            &observed(s, "3f9a0c11e2b4-0000000000000001", hash_of(i)),
            None,
        );
    }
    mem.drain();
    let mut n = 0usize;
    g.bench_function("record+apply/known", |b| {
        b.iter(|| {
            n = (n + 1) % subjects.len();
            mem.record(
                black_box(&observed(
                    &subjects[n],
                    "3f9a0c11e2b4-000000000000002a",
                    hash_of(n),
                )),
                None,
            );
            mem.drain();
        })
    });
    let mem = std::sync::Arc::new(mem);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drainer = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mem.drain();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    g.bench_function("record/known", |b| {
        b.iter(|| {
            n = (n + 1) % subjects.len();
            mem.record(
                black_box(&observed(
                    &subjects[n],
                    "3f9a0c11e2b4-000000000000002a",
                    hash_of(n),
                )),
                None,
            );
        })
    });
    let memos: Vec<Memo> = subjects.iter().map(|_| Memo::default()).collect();
    g.bench_function("record/known, memo", |b| {
        b.iter(|| {
            n = (n + 1) % subjects.len();
            mem.record(
                black_box(&observed(
                    &subjects[n],
                    "3f9a0c11e2b4-000000000000002a",
                    hash_of(n),
                )),
                memos.get(n),
            );
        })
    });
    g.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drainer.join().unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
