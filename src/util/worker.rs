//! Which proxy worker thread the current thread is, if any: the one fact
//! the per-worker upstream pools ([`crate::proxy::client::UpstreamPools`])
//! and metric shards ([`crate::telemetry::sharded`]) pick their slot by.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// The worker number and the thread's metric slot.
    static WORKER: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Metric slots handed out so far in this process.
static SLOTS_TAKEN: AtomicUsize = AtomicUsize::new(0);

/// Marks the current thread as proxy worker `worker` (0-based); set once,
/// where the worker thread starts. The thread also takes a metric slot
/// number of its own: 1, 2, … in the order threads enter, never handed to
/// another thread.
pub fn enter(worker: usize) {
    let slot = SLOTS_TAKEN
        .fetch_add(1, Ordering::Relaxed)
        .saturating_add(1);
    WORKER.with(|w| w.set(Some((worker, slot))));
}

/// The current thread's worker number; `None` off the proxy workers.
pub fn current() -> Option<usize> {
    WORKER.with(|w| w.get().map(|(n, _)| n))
}

/// The current thread's own metric slot number (1 and up; no other thread
/// ever had it), or 0 off the proxy workers.
pub fn slot() -> usize {
    WORKER.with(|w| w.get().map_or(0, |(_, s)| s))
}
