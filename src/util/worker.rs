//! Which proxy worker thread the current thread is, if any: the one fact
//! the per-worker upstream pools ([`crate::proxy::client::UpstreamPools`])
//! and metric shards ([`crate::telemetry::sharded`]) pick their slot by.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the current thread as proxy worker `worker` (0-based); set once,
/// where the worker thread starts.
pub fn enter(worker: usize) {
    WORKER.with(|w| w.set(Some(worker)));
}

/// The current thread's worker number; `None` off the proxy workers.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}
