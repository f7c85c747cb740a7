//! What-if: `portcullis policy replay --audit FILE --policies DIR` decides
//! every logged request again, with its recorded inputs, under a proposed
//! set, and reports what would change, by action and by subject.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Action, CompiledSet, Inputs};

/// The audit-line fields replay reads (others are ignored).
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    principal: String,
    #[serde(default)]
    route: String,
    #[serde(default)]
    method: String,
    action: Action,
    #[serde(default)]
    policy_ids: Vec<String>,
    #[serde(default)]
    policy_version: String,
    inputs: Inputs,
}

/// One decision that would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Request id.
    pub request_id: String,
    /// `user:<id>` / `workload:<id>`.
    pub principal: String,
    /// Route.
    pub route: String,
    /// Method.
    pub method: String,
    /// Recorded action.
    pub from: Action,
    /// Action under the proposed set.
    pub to: Action,
    /// Recorded policy ids.
    pub from_policies: Vec<String>,
    /// Policy ids under the proposed set.
    pub to_policies: Vec<String>,
    /// Reasons under the proposed set.
    pub reasons: Vec<String>,
}

/// The replay report.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Decisions replayed.
    pub total: usize,
    /// Decisions whose action would change.
    pub changed: usize,
    /// Lines that could not be read (1-based line numbers).
    pub unreadable: Vec<usize>,
    /// Policy versions the log was recorded under.
    pub recorded_versions: Vec<String>,
    /// The proposed set's version.
    pub proposed_version: String,
    /// `"allow → deny"` → count.
    pub by_action: BTreeMap<String, usize>,
    /// principal → `"allow → deny"` → count.
    pub by_subject: BTreeMap<String, BTreeMap<String, usize>>,
    /// Every change, in log order.
    pub changes: Vec<Change>,
}

impl ReplayReport {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = format!(
            "replayed {} decisions (recorded under {}) with policy version {}: {} would change\n",
            self.total,
            if self.recorded_versions.is_empty() {
                "-".to_owned()
            } else {
                self.recorded_versions.join(", ")
            },
            self.proposed_version,
            self.changed
        );
        if !self.unreadable.is_empty() {
            s.push_str(&format!(
                "unreadable lines (skipped): {:?}\n",
                self.unreadable
            ));
        }
        if self.changed > 0 {
            s.push_str("by action:\n");
            for (k, n) in &self.by_action {
                s.push_str(&format!("  {k:<24} {n}\n"));
            }
            s.push_str("by subject:\n");
            for (p, m) in &self.by_subject {
                let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                s.push_str(&format!("  {p}: {}\n", parts.join(", ")));
            }
            s.push_str("changes:\n");
            for c in &self.changes {
                s.push_str(&format!(
                    "  {} {} {} {}: {} → {} ({})\n",
                    c.request_id,
                    c.principal,
                    c.method,
                    c.route,
                    c.from.as_str(),
                    c.to.as_str(),
                    c.reasons.join("; ")
                ));
            }
        }
        s
    }
}

/// Replays an audit log (JSON lines) under `set`.
pub fn replay(log: &Path, set: &CompiledSet) -> std::io::Result<ReplayReport> {
    let f = std::fs::File::open(log)?;
    let mut r = ReplayReport {
        proposed_version: set.version.clone(),
        ..ReplayReport::default()
    };
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(rec) = serde_json::from_str::<Line>(&line) else {
            r.unreadable.push(i + 1);
            continue;
        };
        r.total += 1;
        if !rec.policy_version.is_empty() && !r.recorded_versions.contains(&rec.policy_version) {
            r.recorded_versions.push(rec.policy_version.clone());
        }
        let d = set.evaluate(&rec.inputs);
        if d.action == rec.action {
            continue;
        }
        r.changed += 1;
        let key = format!("{} → {}", rec.action.as_str(), d.action.as_str());
        *r.by_action.entry(key.clone()).or_default() += 1;
        *r.by_subject
            .entry(rec.principal.clone())
            .or_default()
            .entry(key)
            .or_default() += 1;
        r.changes.push(Change {
            request_id: rec.request_id,
            principal: rec.principal,
            route: rec.route,
            method: rec.method,
            from: rec.action,
            to: d.action,
            from_policies: rec.policy_ids,
            to_policies: d.policy_ids,
            reasons: d.reasons,
        });
    }
    Ok(r)
}
