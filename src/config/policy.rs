//! The `[policy]` and `[network]` sections: the Cedar set, audit, zones, limits.

use super::*;

/// The `[policy]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files.
    pub dir: PathBuf,
    /// Posture older than this counts as unknown (`context.limits.posture_max_age_s`).
    #[serde(default = "d_posture_max_age_s")]
    pub posture_max_age_s: u64,
    /// Oldest workload credential (`context.limits.workload_max_credential_age_s`).
    #[serde(default = "d_workload_max_credential_age_s")]
    pub workload_max_credential_age_s: u64,
    /// Past this many seconds out of sync with the cluster, the default
    /// policies close high and critical routes (`context.limits.snapshot_max_age_s`).
    #[serde(default = "d_snapshot_max_age_s")]
    pub snapshot_max_age_s: u64,
    /// Longest a cached decision is reused, in milliseconds (0 disables the cache).
    #[serde(default = "d_decision_cache_ttl_ms")]
    pub decision_cache_ttl_ms: u64,
    /// Most cached decisions.
    #[serde(default = "d_decision_cache_capacity")]
    pub decision_cache_capacity: u64,
    /// How often the directories are checked for changes, in milliseconds (0: only on SIGHUP).
    #[serde(default = "d_policy_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// The decision log.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// A second set evaluated in shadow mode: divergences are logged, never enforced.
    #[serde(default)]
    pub shadow_dir: Option<PathBuf>,
    /// Routes the shadow set runs on (empty: every route).
    #[serde(default)]
    pub shadow_routes: Vec<String>,
}

/// The audit log settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File (appended to), or `-` for stdout.
    pub path: PathBuf,
    /// Share of `allow` decisions logged, 0.0 – 1.0; every other decision is logged.
    #[serde(default = "d_audit_sample_allow")]
    pub sample_allow: f64,
    /// Line format: the project's own JSON (default) or OCSF events.
    #[serde(default)]
    pub format: AuditFormat,
}

/// The audit line format (`[policy] audit.format`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// One JSON record per decision, replayable by `portcullis policy replay`.
    #[default]
    Json,
    /// One OCSF 1.8.0 HTTP Activity (4002) event per decision, for a SIEM.
    Ocsf,
}

/// The `[network]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Named CIDR sets; the first containing the client address is its zone.
    #[serde(default)]
    pub zones: Vec<ZoneConfig>,
}

/// One `[[network.zones]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Zone name (`context.network.zone`).
    pub name: String,
    /// CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
    pub cidrs: Vec<String>,
}

pub(super) fn d_posture_max_age_s() -> u64 {
    DEFAULT_POSTURE_MAX_AGE_S
}
pub(super) fn d_snapshot_max_age_s() -> u64 {
    DEFAULT_SNAPSHOT_MAX_AGE_S
}
pub(super) fn d_workload_max_credential_age_s() -> u64 {
    DEFAULT_WORKLOAD_MAX_CREDENTIAL_AGE_S
}
pub(super) fn d_decision_cache_ttl_ms() -> u64 {
    DEFAULT_DECISION_CACHE_TTL_MS
}
pub(super) fn d_decision_cache_capacity() -> u64 {
    DEFAULT_DECISION_CACHE_CAPACITY
}
pub(super) fn d_policy_watch_interval_ms() -> u64 {
    DEFAULT_POLICY_WATCH_INTERVAL_MS
}
pub(super) fn d_audit_sample_allow() -> f64 {
    DEFAULT_AUDIT_SAMPLE_ALLOW
}
