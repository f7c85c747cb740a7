//! The audit log: one JSON line per decision, written by a dedicated thread
//! so the request path never waits on disk. Every decision other than
//! `allow` is logged; allows are sampled (`sample_allow`, deterministic: a
//! rate of 0.1 logs exactly every tenth allow). A line holds everything
//! needed to explain and replay the decision: its inputs, the policy ids and
//! reasons, and the snapshot and policy versions.
//!
//! `format = "ocsf"` writes each record as an OCSF event instead
//! ([`super::ocsf`]), converted on the writer thread.
//!
//! If the writer falls behind by more than [`QUEUE`] lines, further lines
//! are dropped and counted (`portcullis_policy_audit_dropped_total`) rather
//! than slowing requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::{Action, Decision, Inputs};
use crate::config::{AuditConfig, AuditFormat};

/// Lines the writer may fall behind by before lines are dropped.
pub const QUEUE: usize = 65_536;

/// One logged decision.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    /// The same instant in Unix milliseconds (OCSF `time`).
    #[serde(skip)]
    pub time_ms: u64,
    /// Request id.
    pub request_id: String,
    /// `user:<id>` or `workload:<id>`.
    pub principal: String,
    /// Device id (empty when none).
    pub device: String,
    /// Route name.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Request host (`Host` or `:authority`, without the port).
    pub host: String,
    /// Request path (never the query).
    pub path: String,
    /// The request's trace id when tracing is on (`[tracing]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Decided action.
    pub action: Action,
    /// `forwarded` or `refused` (restrict lets reads through).
    pub enforced: &'static str,
    /// Policies that made the decision.
    pub policy_ids: Vec<String>,
    /// Their reasons.
    pub reasons: Vec<String>,
    /// The full decision (step-up parameters, session cap, revocations).
    pub decision: Arc<Decision>,
    /// Snapshot version the inputs were read at.
    pub snapshot_version: u64,
    /// Policy set version.
    pub policy_version: String,
    /// Served from the decision cache.
    pub cache_hit: bool,
    /// The shadow set's decision, when it differs from the enforced one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowRecord>,
    /// The decision's inputs.
    pub inputs: Arc<Inputs>,
}

/// A shadow decision that diverged.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowRecord {
    /// Shadow set version.
    pub policy_version: String,
    /// What the shadow set decided.
    pub decision: Arc<Decision>,
}

/// The audit writer.
pub struct AuditSink {
    tx: SyncSender<AuditRecord>,
    config: AuditConfig,
    seen_allows: AtomicU64,
    dropped: Option<Counter>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("path", &self.config.path)
            .finish()
    }
}

impl AuditSink {
    /// Opens the log (`-` = stdout) and starts the writer thread.
    pub fn open(
        cfg: &AuditConfig,
        metrics: Option<&crate::telemetry::Metrics>,
    ) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if cfg.path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            if let Some(parent) = cfg.path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&cfg.path)?,
            )
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn({
                let format = cfg.format;
                move || write_loop(rx, out, format)
            })?;
        Ok(Self {
            tx,
            config: cfg.clone(),
            seen_allows: AtomicU64::new(0),
            dropped: metrics.map(|m| m.policy_audit_dropped.clone()),
        })
    }

    /// True when this sink was opened for the same settings.
    pub fn same_config(&self, cfg: &AuditConfig) -> bool {
        self.config == *cfg
    }

    /// The log path.
    pub fn path(&self) -> &PathBuf {
        &self.config.path
    }

    /// Whether a decision with this action is logged (allows are sampled).
    pub fn wants(&self, action: Action, diverged: bool) -> bool {
        if action != Action::Allow || diverged {
            return true;
        }
        let p = self.config.sample_allow;
        if p >= 1.0 {
            return true;
        }
        if p <= 0.0 {
            return false;
        }
        let n = self.seen_allows.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * p).floor() > (n * p).floor()
    }

    /// Queues a line; never blocks.
    pub fn log(&self, rec: AuditRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(rec)
            && let Some(c) = &self.dropped
        {
            c.inc();
        }
    }
}

fn write_loop(rx: Receiver<AuditRecord>, mut out: Box<dyn Write + Send>, format: AuditFormat) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(rec) = next.take() {
            let written = match format {
                AuditFormat::Json => serde_json::to_writer(&mut buf, &rec),
                AuditFormat::Ocsf => serde_json::to_writer(&mut buf, &super::ocsf::event(&rec)),
            };
            if written.is_ok() {
                buf.push(b'\n');
            }
            if buf.len() < 1024 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "audit log write failed");
        }
        buf.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn allow_sampling_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            path: dir.path().join("a.jsonl"),
            sample_allow: 0.1,
            format: AuditFormat::Json,
        };
        let s = AuditSink::open(&cfg, None).unwrap();
        let logged = (0..100).filter(|_| s.wants(Action::Allow, false)).count();
        assert_eq!(logged, 10);
        assert!((0..10).all(|_| s.wants(Action::Deny, false)));
        assert!(s.wants(Action::Allow, true));
    }
}
