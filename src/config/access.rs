//! The `[access]` section: what the proxy remembers of access (bounds, how
//! often it is written to the store) and the thresholds the stale-access
//! findings use.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, ConfigError};

/// Default most (subject, device, route) rows remembered.
pub const DEFAULT_ACCESS_MAX_ENTRIES: usize = 100_000;
/// Default most tokens remembered (by hash).
pub const DEFAULT_ACCESS_MAX_TOKENS: usize = 100_000;
/// Ceiling on either bound.
pub const MAX_ACCESS_ENTRIES: usize = 10_000_000;
/// Default interval between writes of changed rows to the store, ms.
pub const DEFAULT_ACCESS_FLUSH_INTERVAL_MS: u64 = 2_000;
/// Shortest flush interval accepted, ms.
pub const MIN_ACCESS_FLUSH_INTERVAL_MS: u64 = 50;
/// Default window in which a row counts as recent activity, seconds (a day).
pub const DEFAULT_ACCESS_ACTIVE_WINDOW_S: u64 = 86_400;
/// Default number of distinct active users that makes a device "shared".
pub const DEFAULT_SHARED_DEVICE_THRESHOLD: usize = 3;
/// Default age past which a workload credential is flagged, days.
pub const DEFAULT_CREDENTIAL_MAX_AGE_DAYS: u64 = 90;
/// Default SCIM attribute that tells a person from a contractor or a workload.
pub const DEFAULT_KIND_ATTRIBUTE: &str = "userType";
/// Default SCIM attribute holding a contractor's end date.
pub const DEFAULT_END_DATE_ATTRIBUTE: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:endDate";
/// Default SCIM attribute naming a workload's accountable owner.
pub const DEFAULT_OWNER_ATTRIBUTE: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager";

fn d_max_entries() -> usize {
    DEFAULT_ACCESS_MAX_ENTRIES
}
fn d_max_tokens() -> usize {
    DEFAULT_ACCESS_MAX_TOKENS
}
fn d_flush_interval_ms() -> u64 {
    DEFAULT_ACCESS_FLUSH_INTERVAL_MS
}
fn d_active_window_s() -> u64 {
    DEFAULT_ACCESS_ACTIVE_WINDOW_S
}
fn d_shared_threshold() -> usize {
    DEFAULT_SHARED_DEVICE_THRESHOLD
}
fn d_credential_max_age_days() -> u64 {
    DEFAULT_CREDENTIAL_MAX_AGE_DAYS
}
fn d_kind_attribute() -> String {
    DEFAULT_KIND_ATTRIBUTE.into()
}
fn d_contractor_values() -> Vec<String> {
    vec!["Contractor".into()]
}
fn d_workload_values() -> Vec<String> {
    vec!["Workload".into(), "Service".into()]
}
fn d_end_date_attribute() -> String {
    DEFAULT_END_DATE_ATTRIBUTE.into()
}
fn d_owner_attribute() -> String {
    DEFAULT_OWNER_ATTRIBUTE.into()
}

/// `[access]`: the access memory and the stale-access findings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Most (subject, device, route) rows kept; the oldest are evicted.
    #[serde(default = "d_max_entries")]
    pub max_entries: usize,
    /// Most tokens kept (by hash); the least recently used are evicted.
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
    /// How often changed rows are written to the store, ms.
    #[serde(default = "d_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// A row newer than this counts as recent activity, seconds.
    #[serde(default = "d_active_window_s")]
    pub active_window_s: u64,
    /// Distinct users active on one device that make it a shared-device finding.
    #[serde(default = "d_shared_threshold")]
    pub shared_device_threshold: usize,
    /// A workload credential issued longer ago than this is flagged, days.
    #[serde(default = "d_credential_max_age_days")]
    pub credential_max_age_days: u64,
    /// SCIM attribute telling persons, contractors and workloads apart
    /// (`attr`, or `urn:…:attr` inside an extension).
    #[serde(default = "d_kind_attribute")]
    pub kind_attribute: String,
    /// Values of `kind_attribute` that mean contractor (case-insensitive).
    #[serde(default = "d_contractor_values")]
    pub contractor_values: Vec<String>,
    /// Values of `kind_attribute` that mean workload (case-insensitive).
    #[serde(default = "d_workload_values")]
    pub workload_values: Vec<String>,
    /// SCIM attribute holding a contractor's end date (RFC 3339 date or date-time).
    #[serde(default = "d_end_date_attribute")]
    pub contractor_end_date_attribute: String,
    /// SCIM attribute naming a workload's owner (a string, or `{value}` as
    /// the enterprise `manager` is).
    #[serde(default = "d_owner_attribute")]
    pub owner_attribute: String,
    /// Feed name → the longest silence expected from it, seconds (only the
    /// feeds named here are checked).
    #[serde(default)]
    pub feed_intervals: BTreeMap<String, u64>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_ACCESS_MAX_ENTRIES,
            max_tokens: DEFAULT_ACCESS_MAX_TOKENS,
            flush_interval_ms: DEFAULT_ACCESS_FLUSH_INTERVAL_MS,
            active_window_s: DEFAULT_ACCESS_ACTIVE_WINDOW_S,
            shared_device_threshold: DEFAULT_SHARED_DEVICE_THRESHOLD,
            credential_max_age_days: DEFAULT_CREDENTIAL_MAX_AGE_DAYS,
            kind_attribute: d_kind_attribute(),
            contractor_values: d_contractor_values(),
            workload_values: d_workload_values(),
            contractor_end_date_attribute: d_end_date_attribute(),
            owner_attribute: d_owner_attribute(),
            feed_intervals: BTreeMap::new(),
        }
    }
}

/// Feeds whose silence can be checked.
pub const ACCESS_FEED_NAMES: [&str; 6] = ["ssf", "scim", "jamf", "intune", "mdm", "admin"];

impl Config {
    pub(super) fn validate_access(&self) -> Result<(), ConfigError> {
        let a = &self.access;
        for (k, v) in [("max_entries", a.max_entries), ("max_tokens", a.max_tokens)] {
            if v == 0 || v > MAX_ACCESS_ENTRIES {
                return Err(self.invalid(
                    format!("access.{k}"),
                    format!("{v} is outside 1..={MAX_ACCESS_ENTRIES}"),
                ));
            }
        }
        if a.flush_interval_ms < MIN_ACCESS_FLUSH_INTERVAL_MS {
            return Err(self.invalid(
                "access.flush_interval_ms",
                format!("must be at least {MIN_ACCESS_FLUSH_INTERVAL_MS}"),
            ));
        }
        if a.active_window_s == 0 {
            return Err(self.invalid("access.active_window_s", "must be at least 1"));
        }
        if a.shared_device_threshold < 2 {
            return Err(self.invalid("access.shared_device_threshold", "must be at least 2"));
        }
        if a.credential_max_age_days == 0 {
            return Err(self.invalid("access.credential_max_age_days", "must be at least 1"));
        }
        for (k, v) in [
            ("kind_attribute", &a.kind_attribute),
            (
                "contractor_end_date_attribute",
                &a.contractor_end_date_attribute,
            ),
            ("owner_attribute", &a.owner_attribute),
        ] {
            if v.is_empty() {
                return Err(self.invalid(format!("access.{k}"), "must not be empty"));
            }
        }
        for (feed, s) in &a.feed_intervals {
            if !ACCESS_FEED_NAMES.contains(&feed.as_str()) {
                return Err(self.invalid(
                    format!("access.feed_intervals.{feed}"),
                    format!(
                        "unknown feed `{feed}`; one of {}",
                        ACCESS_FEED_NAMES.join(", ")
                    ),
                ));
            }
            if *s == 0 {
                return Err(self.invalid(
                    format!("access.feed_intervals.{feed}"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}
