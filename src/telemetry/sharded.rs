//! Per-worker shards of the metrics every request touches.
//!
//! prometheus-client's `Counter` is one atomic and its `Histogram` one
//! mutex-guarded record, shared by every thread: with two proxy workers
//! each counting every request, the cache line holding it moves between the
//! cores on every request (and the histogram's lock with it). Here each
//! proxy worker ([`crate::util::worker`]) counts into its own cache-line-aligned
//! slot, every other thread into a slot of its own kind, and a scrape adds
//! the slots up. What a scrape shows is the same text as before: a counter
//! or a classic histogram with the same buckets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Slots per metric: slot 0 for threads that are not proxy workers (and
/// workers past the first 15), the others one per worker, written by it
/// alone without a locked instruction (2 KiB per counter).
const SLOTS: usize = 16;

/// The current thread's slot, and true when this thread is its one
/// writer: a worker's own slot ([`crate::util::worker::slot`], never
/// handed to two threads), or slot 0, shared by every other thread and by
/// workers past the first `SLOTS - 1` this process started.
fn slot() -> (usize, bool) {
    match crate::util::worker::slot() {
        s if s > 0 && s < SLOTS => (s, true),
        _ => (0, false),
    }
}

/// Adds `n` to a slot: its one writer needs no locked instruction (a plain
/// load and store; readers still see whole values), any other writer does.
fn add(cell: &AtomicU64, n: u64, sole: bool) {
    if sole {
        cell.store(
            cell.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    } else {
        cell.fetch_add(n, Ordering::Relaxed);
    }
}

/// One slot on a cache line (two: the adjacent-line prefetcher pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A monotonic counter, encoded as prometheus-client's `Counter` is.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<[Padded<AtomicU64>; SLOTS]>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        let (slot, sole) = slot();
        if let Some(s) = self.0.get(slot) {
            add(&s.0, n, sole);
        }
    }

    /// The total over every slot.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |t, s| t.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Bucket counts per cache-line pair.
const LANES: usize = 16;

/// A classic histogram with fixed bucket bounds, encoded as
/// prometheus-client's `Histogram` is (`_sum`, `_count`, cumulative
/// `_bucket`s ending in `+Inf`).
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds, ascending; the last is `+Inf`.
    bounds: Arc<[f64]>,
    /// Each slot's sum, as `f64` bits.
    sums: Arc<[Padded<AtomicU64>; SLOTS]>,
    /// Each slot's bucket counts, in whole aligned chunks of `LANES` (a
    /// slot never shares a cache line with another): slot `s` owns chunks
    /// `s * per_slot ..`.
    counts: Arc<[Padded<[AtomicU64; LANES]>]>,
    per_slot: usize,
}

impl Histogram {
    /// A histogram with these upper bounds, ascending; a last bucket for
    /// everything above them is added (as prometheus-client does).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let b: Vec<f64> = bounds
            .into_iter()
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let per_slot = b.len().div_ceil(LANES);
        Self {
            bounds: b.into(),
            sums: Arc::default(),
            counts: (0..per_slot * SLOTS).map(|_| Padded::default()).collect(),
            per_slot,
        }
    }

    fn count_cell(&self, slot: usize, bucket: usize) -> Option<&AtomicU64> {
        self.counts
            .get(slot * self.per_slot + bucket / LANES)
            .and_then(|c| c.0.get(bucket % LANES))
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let (slot, sole) = slot();
        // The last bound is `+Inf`, so every value but NaN lands before it.
        let bucket = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.count_cell(slot, bucket) {
            add(c, 1, sole);
        }
        if let Some(Padded(sum)) = self.sums.get(slot) {
            let next = |bits: u64| (f64::from_bits(bits) + v).to_bits();
            if sole {
                sum.store(next(sum.load(Ordering::Relaxed)), Ordering::Relaxed);
            } else {
                let _ = sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(next(b)));
            }
        }
    }

    /// Sum, count and per-bucket counts (not cumulative) over every slot.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = self.bounds.iter().map(|b| (*b, 0)).collect();
        let mut sum = 0.0;
        for slot in 0..SLOTS {
            if let Some(Padded(s)) = self.sums.get(slot) {
                sum += f64::from_bits(s.load(Ordering::Relaxed));
            }
            for (i, acc) in buckets.iter_mut().enumerate() {
                if let Some(c) = self.count_cell(slot, i) {
                    acc.1 = acc.1.wrapping_add(c.load(Ordering::Relaxed));
                }
            }
        }
        // The count is the buckets' total, so `_count` always equals the
        // `+Inf` bucket even while workers are recording.
        let count = buckets.iter().fold(0u64, |t, b| t.wrapping_add(b.1));
        (sum, count, buckets)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn counts_from_every_thread_add_up() {
        let c = Counter::default();
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let c = c.clone();
                std::thread::spawn(move || {
                    if w > 0 {
                        crate::util::worker::enter(w - 1);
                    }
                    for _ in 0..1000 {
                        c.inc();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.inc_by(5);
        assert_eq!(c.get(), 4005);
        let mut r = Registry::default();
        r.register("hits", "Hits", c);
        assert!(text(&r).contains("hits_total 4005\n"), "{}", text(&r));
    }

    /// A worker's slot is written without a locked instruction, so no two
    /// threads may ever share one: not threads entered as the same worker
    /// (tests, a second server in the process), not workers past the slots.
    #[test]
    fn threads_entered_as_one_worker_or_past_the_slots_lose_no_count() {
        let c = Counter::default();
        let h = Histogram::new([1.0]);
        let start = Arc::new(std::sync::Barrier::new(2 * SLOTS));
        let threads: Vec<_> = (0..2 * SLOTS)
            .map(|_| {
                let (c, h, start) = (c.clone(), h.clone(), start.clone());
                std::thread::spawn(move || {
                    crate::util::worker::enter(0);
                    start.wait();
                    for _ in 0..20_000 {
                        c.inc();
                        h.observe(0.5);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = 2 * SLOTS as u64 * 20_000;
        assert_eq!(c.get(), n);
        let (sum, count, _) = h.totals();
        assert_eq!(count, n);
        assert!((sum - n as f64 * 0.5).abs() < 1e-6, "{sum}");
    }

    /// The same observations give the same text as prometheus-client's own
    /// histogram, so dashboards and alerts read it unchanged.
    #[test]
    fn histogram_encodes_as_prometheus_clients_own() {
        let bounds = || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 20);
        let ours = Histogram::new(bounds());
        let theirs = prometheus_client::metrics::histogram::Histogram::new(bounds());
        let values = [0.00005, 0.0001, 0.00013, 0.002, 0.5, 3.0, 1e6, 0.0];
        let handles: Vec<_> = (0..2)
            .map(|w| {
                let h = ours.clone();
                std::thread::spawn(move || {
                    crate::util::worker::enter(w);
                    for v in values {
                        h.observe(v);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for v in values.iter().chain(values.iter()) {
            theirs.observe(*v);
        }
        let (mut a, mut b) = (Registry::default(), Registry::default());
        a.register("latency_seconds", "Latency", ours);
        b.register("latency_seconds", "Latency", theirs);
        // Every line but the sum alike; the sum only up to the order in
        // which the slots' floats are added.
        let split = |t: String| {
            let (sum, rest): (Vec<_>, Vec<_>) = t
                .lines()
                .map(str::to_owned)
                .partition(|l| l.starts_with("latency_seconds_sum "));
            let sum: f64 = sum[0]["latency_seconds_sum ".len()..].parse().unwrap();
            (sum, rest)
        };
        let ((sa, ra), (sb, rb)) = (split(text(&a)), split(text(&b)));
        assert_eq!(ra, rb);
        assert!((sa - sb).abs() < 1e-6, "{sa} vs {sb}");
        assert!(ra.contains(&"latency_seconds_count 16".to_owned()));
        assert!(ra.contains(&"latency_seconds_bucket{le=\"+Inf\"} 16".to_owned()));
    }
}
