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

/// The CPUs `workers` worker threads would be pinned to, one each: the
/// first `workers` of those the calling thread may run on, ascending.
/// `Err` says why they cannot be pinned (fewer such CPUs than workers, or
/// the affinity mask could not be read).
pub fn pin_plan(workers: usize) -> Result<Vec<usize>, String> {
    let allowed =
        allowed_cpus().map_err(|e| format!("cannot read this process's CPU affinity: {e}"))?;
    if allowed.len() < workers {
        return Err(format!(
            "{workers} workers but only {} CPUs allowed",
            allowed.len()
        ));
    }
    Ok(allowed.into_iter().take(workers).collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current(cpu: usize) -> std::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(std::io::Error::from)
}

/// The CPUs the calling thread may run on, ascending.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    allowed_cpus_of(None)
}

/// The CPUs thread `tid` (the caller's when `None`) may run on, ascending.
pub fn allowed_cpus_of(tid: Option<i32>) -> std::io::Result<Vec<usize>> {
    let pid = match tid {
        None => None,
        Some(t) => Some(
            rustix::thread::Pid::from_raw(t)
                .ok_or_else(|| std::io::Error::other(format!("not a thread id: {t}")))?,
        ),
    };
    let set = rustix::thread::sched_getaffinity(pid).map_err(std::io::Error::from)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_plan_gives_each_worker_its_own_allowed_cpu_or_says_why_not() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let plan = pin_plan(allowed.len()).unwrap();
        assert_eq!(plan, allowed, "one each, ascending");
        assert_eq!(pin_plan(1).unwrap(), allowed[..1]);
        let err = pin_plan(allowed.len() + 1).unwrap_err();
        assert!(err.contains("CPUs allowed"), "{err}");
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let allowed = allowed_cpus().unwrap();
        let last = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current(last).unwrap();
            allowed_cpus().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![last]);
        // The pin was the spawned thread's alone.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }
}
