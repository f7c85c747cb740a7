//! The access picture: what the proxy remembers of access, the stale-access
//! findings computed over it and the posture snapshot, and the operator's
//! views of both (`portcullis access-report`, `GET /admin/v1/access`,
//! `/admin/ui`).
//!
//! The request path only calls [`AccessMemory::record`]: a lock-free map
//! lookup and a few atomic stores (a first sighting allocates one row). A
//! background task writes changed rows to the store's database in batches,
//! evicts the oldest rows past the bounds, and tails the event log for feed
//! health. This room never decides access and never stores a token: tokens
//! are known by the SHA-256 the token cache already keys them by.

pub mod findings;
pub mod memory;
pub mod report;
pub mod store;
pub mod ui;

pub use findings::{Finding, FindingKind, Severity};
pub use memory::{AccessMemory, Memo, Observed, TokenSeen};
pub use report::{AccessReport, Filter};

use std::sync::{Arc, Mutex, OnceLock};

/// The access service the proxy, the admin listener and the server share:
/// the memory and, once the server opened it, its durable tables.
#[derive(Debug)]
pub struct Access {
    /// The in-memory rows (the request path writes here).
    pub memory: Arc<AccessMemory>,
    store: OnceLock<Arc<Mutex<store::AccessStore>>>,
}

impl Access {
    /// A memory with the bounds of `cfg`, not yet durable.
    pub fn new(
        cfg: &crate::config::AccessConfig,
        metrics: Option<Arc<crate::telemetry::Metrics>>,
    ) -> Self {
        Self {
            memory: Arc::new(AccessMemory::new(cfg.max_entries, cfg.max_tokens, metrics)),
            store: OnceLock::new(),
        }
    }

    /// Opens the access tables in the store's database and loads them.
    pub fn attach_store(
        &self,
        path: &std::path::Path,
    ) -> Result<Arc<Mutex<store::AccessStore>>, String> {
        let s = store::open_and_load(path, &self.memory)?;
        let _ = self.store.set(s.clone());
        Ok(s)
    }

    /// Writes pending rows and reads new feed events now, so a report is current.
    pub async fn refresh(&self) {
        if let Some(s) = self.store.get() {
            store::flush_now(s, &self.memory).await;
        }
    }
}
