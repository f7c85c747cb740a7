//! The per-request metric updates with two proxy workers: one request's
//! counter increment and latency observation while another thread does the
//! same to the same series (as the second worker does under load), with
//! prometheus-client's shared `Counter` / `Histogram` and with the per-worker
//! shards of `portcullis::telemetry::sharded`.
//!
//! Run: `cargo bench --bench metrics -- --warm-up-time 1 --measurement-time 3`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::telemetry::sharded;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Times `iters` calls of `update` on this thread (worker 0) while a second
/// thread (worker 1) calls `other` in a loop.
fn contended(iters: u64, update: impl Fn(), other: impl Fn() + Send + 'static) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let t = {
        let (stop, started) = (stop.clone(), started.clone());
        std::thread::spawn(move || {
            portcullis::util::worker::enter(1);
            started.store(true, Ordering::Release);
            while !stop.load(Ordering::Relaxed) {
                other();
            }
        })
    };
    while !started.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    portcullis::util::worker::enter(0);
    let t0 = Instant::now();
    for _ in 0..iters {
        update();
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    took
}

/// One request's updates: a counter increment and a latency observation.
trait Series: Clone + Send + 'static {
    fn record(&self, v: f64);
}

impl Series for (Counter, Histogram) {
    fn record(&self, v: f64) {
        self.0.inc();
        self.1.observe(v);
    }
}

impl Series for (sharded::Counter, sharded::Histogram) {
    fn record(&self, v: f64) {
        self.0.inc();
        self.1.observe(v);
    }
}

fn bench_series<S: Series>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    new: impl Fn() -> S,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let s = new();
            let other = s.clone();
            contended(
                iters,
                || s.record(black_box(0.0012)),
                move || other.record(0.0009),
            )
        })
    });
}

fn bench(c: &mut Criterion) {
    let buckets = || exponential_buckets(0.0001, 2.0, 20);
    let mut g = c.benchmark_group("metrics_two_workers");
    bench_series(&mut g, "prometheus_client_counter_and_histogram", || {
        (Counter::<u64>::default(), Histogram::new(buckets()))
    });
    bench_series(&mut g, "sharded_counter_and_histogram", || {
        (
            sharded::Counter::default(),
            sharded::Histogram::new(buckets()),
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
