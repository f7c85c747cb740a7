//! The one normalised event type every feed maps into, and the pure merge
//! rules that turn (current record, event) into the next record.
//!
//! INVARIANT: merging never consults the clock or any I/O, so the same event
//! log replays to the same snapshot.

use serde::{Deserialize, Serialize};

pub use super::model::Feed;
use super::model::{
    Compliance, Device, FieldTimes, Group, Identity, IdentityKind, IdentityStatus, Lifecycle,
    Ownership, RevocationTarget, Threat,
};

/// Changes to a device; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// Platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// OS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Ownership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<Ownership>,
    /// Managing MDM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_source: Option<String>,
    /// Lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Compliance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<Compliance>,
    /// Compromised flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised: Option<bool>,
    /// Patch-behind flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_behind: Option<bool>,
    /// Threat level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threat: Option<Threat>,
    /// Last check-in (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_in_ms: Option<u64>,
    /// Replace the assigned subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<String>>,
    /// Replace the certificate thumbprints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_thumbprints: Option<Vec<String>>,
    /// Add external ids (`source:value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_external_ids: Vec<String>,
    /// When the device was (re-)enrolled or restored by an operator (ms).
    /// Only this lets a sticky state (lost, wipe pending, wiped,
    /// compromised) set before it be cleared; it counts up to the event's
    /// own origin time, never later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reenrolled_ms: Option<u64>,
}

/// Changes to an identity; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityPatch {
    /// Kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<IdentityKind>,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<IdentityStatus>,
    /// Department (`Some(None)` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<Option<String>>,
    /// Role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Option<String>>,
    /// Replace groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// Replace entitlements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entitlements: Option<Vec<String>>,
    /// Contract end (ms); `Some(None)` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_end_ms: Option<Option<u64>>,
    /// Owner (workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Option<String>>,
    /// Replace devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Risk level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<Threat>,
    /// Assurance level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assurance: Option<String>,
    /// Add aliases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_aliases: Vec<String>,
    /// Remove aliases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_aliases: Vec<String>,
    /// Replace the stored SCIM resource (`Some(None)` removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scim: Option<Option<serde_json::Value>>,
}

/// One change an event makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Create or update a device.
    Device {
        /// Device id.
        id: String,
        /// What changes.
        patch: DevicePatch,
    },
    /// Create or update an identity.
    Identity {
        /// Subject.
        subject: String,
        /// What changes.
        patch: IdentityPatch,
    },
    /// Create, replace (`Some`) or delete (`None`) a SCIM group.
    Group {
        /// SCIM group id.
        id: String,
        /// The new state; `None` deletes it.
        record: Option<Group>,
    },
    /// Create, replace (`Some`) or delete (`None`) a browser session record.
    Session {
        /// Hex SHA-256 of the session id.
        id_hash: String,
        /// The new state; `None` deletes it.
        record: Option<Box<crate::posture::session::SessionRecord>>,
    },
    /// Register a DBSC key on an existing browser session. Its own change,
    /// applied to the record as stored when the batch is applied, so a
    /// concurrent rewrite of the session (a `shorten` cap) and the
    /// registration never undo each other (last writer wins on whole records).
    SessionDbsc {
        /// Hex SHA-256 of the session id.
        id_hash: String,
        /// The binding as `session::dbsc::DbscBinding` serialises it.
        dbsc: Box<serde_json::Value>,
    },
    /// Revoke every credential of a subject, device or session issued before
    /// the event was accepted.
    Revoke {
        /// What.
        target: RevocationTarget,
        /// Which.
        key: String,
    },
}

impl Change {
    /// The record key this change touches (`device:…`, `subject:…`, `session:…`).
    pub fn record_key(&self) -> String {
        match self {
            Change::Device { id, .. } => format!("device:{id}"),
            Change::Identity { subject, .. } => format!("subject:{subject}"),
            Change::Group { id, .. } => format!("group:{id}"),
            Change::Session { id_hash, .. } | Change::SessionDbsc { id_hash, .. } => {
                format!("browser-session:{id_hash}")
            }
            Change::Revoke { target, key } => format!("{}:{key}", target.as_str()),
        }
    }
}

/// A normalised posture or identity event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureEvent {
    /// Dedupe key, unique per feed and source (e.g. `ssf:<iss>:<jti>`).
    pub id: String,
    /// Producing feed.
    pub feed: Feed,
    /// Event type label, e.g. `caep.device-compliance-change` (bounded set).
    pub kind: String,
    /// When the event happened at its origin, ms since epoch.
    pub origin_ms: u64,
    /// What it changes.
    pub changes: Vec<Change>,
}

/// Limits on what an event may carry (bad input changes nothing).
pub const MAX_ID_LEN: usize = 512;
/// Longest key (device id, subject) accepted.
pub const MAX_KEY_LEN: usize = 256;
/// Most list items (groups, entitlements…) in one patch.
pub const MAX_LIST: usize = 1024;
/// Most changes in one event: a SCIM group change carries the group and the
/// update of every member it touches (old and new members, up to
/// `MAX_LIST` each) in the same event.
pub const MAX_CHANGES: usize = 2 * MAX_LIST + 64;

/// Why an event was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A field is out of bounds or empty.
    #[error("invalid event: {0}")]
    Invalid(String),
    /// The event is dated further ahead than the allowed clock skew.
    #[error(
        "event `{id}` is dated {ahead_ms} ms in the future; at most {skew_ms} ms of clock skew is accepted (feeds.max_future_skew_s)"
    )]
    Future {
        /// The event id.
        id: String,
        /// How far ahead of the acceptance time its origin time is.
        ahead_ms: u64,
        /// The allowed skew.
        skew_ms: u64,
    },
}

impl EventError {
    /// True for an event refused because it is dated in the future.
    pub fn is_future(&self) -> bool {
        matches!(self, Self::Future { .. })
    }
}

fn check_key(what: &str, k: &str) -> Result<(), EventError> {
    if k.is_empty() || k.len() > MAX_KEY_LEN || k.chars().any(char::is_control) {
        return Err(EventError::Invalid(format!(
            "{what} must be 1..={MAX_KEY_LEN} printable characters"
        )));
    }
    Ok(())
}

fn check_list(what: &str, l: &[String]) -> Result<(), EventError> {
    if l.len() > MAX_LIST {
        return Err(EventError::Invalid(format!(
            "{what} has more than {MAX_LIST} items"
        )));
    }
    for item in l {
        check_key(what, item)?;
    }
    Ok(())
}

impl PostureEvent {
    /// Validates bounds; called before anything is written.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return Err(EventError::Invalid(format!(
                "event id must be 1..={MAX_ID_LEN} bytes"
            )));
        }
        if self.kind.is_empty() || self.kind.len() > 128 {
            return Err(EventError::Invalid(
                "event kind must be 1..=128 bytes".into(),
            ));
        }
        if self.changes.is_empty() || self.changes.len() > MAX_CHANGES {
            return Err(EventError::Invalid(format!(
                "an event carries 1..={MAX_CHANGES} changes"
            )));
        }
        for c in &self.changes {
            match c {
                Change::Device { id, patch } => {
                    check_key("device id", id)?;
                    if let Some(s) = &patch.subjects {
                        check_list("subjects", s)?;
                    }
                    if let Some(t) = &patch.cert_thumbprints {
                        check_list("cert_thumbprints", t)?;
                    }
                    check_list("external ids", &patch.add_external_ids)?;
                }
                Change::Identity { subject, patch } => {
                    check_key("subject", subject)?;
                    for l in [&patch.groups, &patch.entitlements, &patch.devices]
                        .into_iter()
                        .flatten()
                    {
                        check_list("list", l)?;
                    }
                    check_list("aliases", &patch.add_aliases)?;
                    check_list("aliases", &patch.remove_aliases)?;
                }
                Change::Revoke { key, .. } => check_key("revocation key", key)?,
                Change::SessionDbsc { id_hash, dbsc } => {
                    check_key("session id hash", id_hash)?;
                    if !dbsc.is_object() {
                        return Err(EventError::Invalid(
                            "session DBSC state is not an object".into(),
                        ));
                    }
                }
                Change::Session { id_hash, record } => {
                    check_key("session id hash", id_hash)?;
                    if let Some(r) = record {
                        check_key("session subject", &r.subject)?;
                        if r.id_hash != *id_hash {
                            return Err(EventError::Invalid(
                                "session record names another id hash".into(),
                            ));
                        }
                    }
                }
                Change::Group { id, record } => {
                    check_key("group id", id)?;
                    if let Some(g) = record {
                        check_key("group displayName", &g.display_name)?;
                        check_list("members", &g.members)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Subjects and devices this event touches, for cache invalidation and
    /// the control-window metric.
    pub fn touched(&self) -> Vec<String> {
        self.changes.iter().map(Change::record_key).collect()
    }
}

/// What merging one change did, field by field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// At least one field was set.
    pub applied: bool,
    /// Fields a newer event had already set; left as they are.
    pub stale: Vec<&'static str>,
    /// Fields a sticky state kept: lost, wipe pending, wiped and compromised
    /// are cleared only by a re-enrolment or an operator restore.
    pub held: Vec<&'static str>,
}

/// Device fields with their own origin time (names as in the record).
pub const DEVICE_FIELDS: &[&str] = &[
    "platform",
    "os_version",
    "ownership",
    "management_source",
    "lifecycle",
    "compliance",
    "compromised",
    "patch_behind",
    "threat",
    "last_check_in_ms",
    "subjects",
    "cert_thumbprints",
    "external_ids",
];

/// Identity fields with their own origin time.
pub const IDENTITY_FIELDS: &[&str] = &[
    "kind",
    "status",
    "department",
    "role",
    "groups",
    "entitlements",
    "contract_end_ms",
    "owner",
    "devices",
    "risk",
    "assurance",
    "aliases",
    "scim",
];

/// Per-field ordering over a record's field times.
struct Fields {
    times: FieldTimes,
    origin: u64,
    report: MergeReport,
}

impl Fields {
    /// A record written before per-field times: every field is as old as
    /// the record, so nothing older than it overwrites it.
    fn new(mut times: FieldTimes, updated_ms: u64, names: &[&str], origin: u64) -> Self {
        if times.is_empty() && updated_ms > 0 {
            for n in names {
                times.insert((*n).to_owned(), updated_ms);
            }
        }
        Self {
            times,
            origin,
            report: MergeReport::default(),
        }
    }

    /// When `name` was last set (0 = never).
    fn since(&self, name: &str) -> u64 {
        self.times.get(name).copied().unwrap_or(0)
    }

    /// True when no newer event has set `name`; otherwise notes it stale.
    fn fresh(&mut self, name: &'static str) -> bool {
        if self.since(name) > self.origin {
            self.report.stale.push(name);
            return false;
        }
        true
    }

    /// Records that this event set `name`.
    fn mark(&mut self, name: &'static str) {
        let t = self.since(name).max(self.origin);
        self.times.insert(name.to_owned(), t);
        self.report.applied = true;
    }
}

/// Applies a device patch dated `origin_ms` to (a copy of) the current
/// record, field by field: a field a newer event has set stays; a sticky
/// state stays unless the patch re-enrols the device after it was set.
pub fn merge_device(
    current: Option<&Device>,
    id: &str,
    p: &DevicePatch,
    origin_ms: u64,
) -> (Device, MergeReport) {
    let mut d = current.cloned().unwrap_or_else(|| Device {
        id: id.to_owned(),
        ..Device::default()
    });
    let mut f = Fields::new(
        std::mem::take(&mut d.field_ms),
        d.updated_ms,
        DEVICE_FIELDS,
        origin_ms,
    );
    // A re-enrolment counts from its own time, never after the event.
    let restored_after = |since: u64| p.reenrolled_ms.is_some_and(|e| e.min(origin_ms) >= since);
    macro_rules! set {
        ($($f:ident),*) => { $(
            if let Some(v) = &p.$f && f.fresh(stringify!($f)) {
                d.$f = v.clone();
                f.mark(stringify!($f));
            }
        )* };
    }
    macro_rules! set_some {
        ($($f:ident),*) => { $(
            if let Some(v) = &p.$f && f.fresh(stringify!($f)) {
                d.$f = Some(v.clone());
                f.mark(stringify!($f));
            }
        )* };
    }
    set!(
        ownership,
        compliance,
        patch_behind,
        threat,
        subjects,
        cert_thumbprints
    );
    set_some!(platform, os_version, management_source);
    if let Some(v) = p.lifecycle
        && f.fresh("lifecycle")
    {
        // INVARIANT: a sticky lifecycle moves only to another dead one,
        // unless a re-enrolment or restore newer than it says otherwise.
        if d.lifecycle.is_sticky() && !v.is_dead() && !restored_after(f.since("lifecycle")) {
            f.report.held.push("lifecycle");
        } else {
            d.lifecycle = v;
            f.mark("lifecycle");
        }
    }
    if let Some(v) = p.compromised
        && f.fresh("compromised")
    {
        if d.compromised && !v && !restored_after(f.since("compromised")) {
            f.report.held.push("compromised");
        } else {
            d.compromised = v;
            f.mark("compromised");
        }
    }
    if let Some(v) = p.last_check_in_ms
        && f.fresh("last_check_in_ms")
    {
        // A check-in cannot be later than the event reporting it.
        let v = v.min(origin_ms);
        d.last_check_in_ms = Some(d.last_check_in_ms.map_or(v, |old| old.max(v)));
        f.mark("last_check_in_ms");
    }
    // External ids only accumulate (order-free), so a late event adds too.
    let mut added = false;
    for x in &p.add_external_ids {
        if !d.external_ids.contains(x) {
            d.external_ids.push(x.clone());
            added = true;
        }
    }
    if added {
        f.mark("external_ids");
    }
    // A new record comes into being even when the patch sets nothing.
    f.report.applied |= current.is_none();
    d.field_ms = f.times;
    if f.report.applied {
        d.updated_ms = d.updated_ms.max(origin_ms);
    }
    (d, f.report)
}

/// Applies an identity patch dated `origin_ms` to (a copy of) the current
/// record, field by field (a field a newer event has set stays).
pub fn merge_identity(
    current: Option<&Identity>,
    subject: &str,
    p: &IdentityPatch,
    origin_ms: u64,
) -> (Identity, MergeReport) {
    let mut i = current.cloned().unwrap_or_else(|| Identity {
        subject: subject.to_owned(),
        ..Identity::default()
    });
    let mut f = Fields::new(
        std::mem::take(&mut i.field_ms),
        i.updated_ms,
        IDENTITY_FIELDS,
        origin_ms,
    );
    macro_rules! set {
        ($($f:ident),*) => { $(
            if let Some(v) = &p.$f && f.fresh(stringify!($f)) {
                i.$f = v.clone();
                f.mark(stringify!($f));
            }
        )* };
    }
    set!(
        kind,
        status,
        department,
        role,
        groups,
        entitlements,
        contract_end_ms,
        owner,
        devices,
        risk,
        scim
    );
    if let Some(a) = &p.assurance
        && f.fresh("assurance")
    {
        i.assurance = Some(a.clone());
        f.mark("assurance");
    }
    if (!p.add_aliases.is_empty() || !p.remove_aliases.is_empty()) && f.fresh("aliases") {
        i.aliases.retain(|a| !p.remove_aliases.contains(a));
        for a in &p.add_aliases {
            if !i.aliases.contains(a) && a != subject {
                i.aliases.push(a.clone());
            }
        }
        f.mark("aliases");
    }
    // A new record comes into being even when the patch sets nothing.
    f.report.applied |= current.is_none();
    i.field_ms = f.times;
    if f.report.applied {
        i.updated_ms = i.updated_ms.max(origin_ms);
    }
    (i, f.report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn patch(f: impl FnOnce(&mut DevicePatch)) -> DevicePatch {
        let mut p = DevicePatch::default();
        f(&mut p);
        p
    }

    #[test]
    fn ordering_is_per_field() {
        let (d, _) = merge_device(
            None,
            "d",
            &patch(|p| p.compliance = Some(Compliance::NonCompliant)),
            200,
        );
        let (d, r) = merge_device(
            Some(&d),
            "d",
            &patch(|p| {
                p.compliance = Some(Compliance::Compliant);
                p.last_check_in_ms = Some(150);
            }),
            100,
        );
        assert_eq!(d.compliance, Compliance::NonCompliant);
        assert_eq!(d.last_check_in_ms, Some(100), "never later than its event");
        assert_eq!(r.stale, vec!["compliance"]);
        assert!(r.applied);
        assert_eq!(d.updated_ms, 200);
        assert_eq!(d.field_ms.get("last_check_in_ms"), Some(&100));
    }

    #[test]
    fn a_record_without_field_times_is_as_old_as_itself() {
        let legacy = Device {
            id: "d".into(),
            compliance: Compliance::NonCompliant,
            updated_ms: 500,
            ..Device::default()
        };
        let (d, r) = merge_device(
            Some(&legacy),
            "d",
            &patch(|p| p.compliance = Some(Compliance::Compliant)),
            400,
        );
        assert_eq!(d.compliance, Compliance::NonCompliant);
        assert!(!r.applied);
    }

    #[test]
    fn sticky_states_need_a_reenrolment_not_older_than_them() {
        let (lost, _) = merge_device(
            None,
            "d",
            &patch(|p| {
                p.lifecycle = Some(Lifecycle::Lost);
                p.compromised = Some(true);
            }),
            100,
        );
        let routine = patch(|p| {
            p.lifecycle = Some(Lifecycle::Enrolled);
            p.compromised = Some(false);
            p.compliance = Some(Compliance::Compliant);
        });
        let (d, r) = merge_device(Some(&lost), "d", &routine, 200);
        assert_eq!((d.lifecycle, d.compromised), (Lifecycle::Lost, true));
        assert_eq!(r.held, vec!["lifecycle", "compromised"]);
        assert_eq!(d.compliance, Compliance::Compliant);
        // Dead to dead is no clearing.
        let (d, r) = merge_device(
            Some(&lost),
            "d",
            &patch(|p| p.lifecycle = Some(Lifecycle::WipePending)),
            200,
        );
        assert_eq!((d.lifecycle, r.held.len()), (Lifecycle::WipePending, 0));
        // An old enrolment time clears nothing; a newer one clears both.
        let mut old = routine.clone();
        old.reenrolled_ms = Some(50);
        assert_eq!(
            merge_device(Some(&lost), "d", &old, 200).0.lifecycle,
            Lifecycle::Lost
        );
        let mut fresh = routine;
        fresh.reenrolled_ms = Some(150);
        let (d, r) = merge_device(Some(&lost), "d", &fresh, 200);
        assert_eq!((d.lifecycle, d.compromised), (Lifecycle::Enrolled, false));
        assert!(r.held.is_empty());
        // A re-enrolment time past its own event counts only up to it.
        let mut ahead = fresh_patch();
        ahead.reenrolled_ms = Some(10_000);
        assert_eq!(
            merge_device(Some(&lost), "d", &ahead, 90).0.lifecycle,
            Lifecycle::Lost
        );
    }

    fn fresh_patch() -> DevicePatch {
        patch(|p| p.lifecycle = Some(Lifecycle::Enrolled))
    }
}
