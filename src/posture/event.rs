//! The one normalised event type every feed maps into, and the pure merge
//! rules that turn (current record, event) into the next record.
//!
//! INVARIANT: merging never consults the clock or any I/O, so the same event
//! log replays to the same snapshot.

use serde::{Deserialize, Serialize};

use super::model::{
    Compliance, Device, Group, Identity, IdentityKind, IdentityStatus, Lifecycle, Ownership,
    RevocationTarget, Threat,
};

/// Which feed produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feed {
    /// OpenID Shared Signals (CAEP / RISC).
    Ssf,
    /// SCIM 2.0 (identity governance: joiner / mover / leaver).
    Scim,
    /// Jamf Pro webhooks.
    Jamf,
    /// Microsoft Intune (Graph managedDevices poller).
    Intune,
    /// The generic JSON device event.
    Mdm,
    /// The operator admin API.
    Admin,
    /// A policy decision (`@action("revoke")`).
    Policy,
    /// Browser sessions: login, logout, expiry, step-up.
    Session,
}

impl Feed {
    /// Lowercase name, used in event ids and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ssf => "ssf",
            Self::Scim => "scim",
            Self::Jamf => "jamf",
            Self::Intune => "intune",
            Self::Mdm => "mdm",
            Self::Admin => "admin",
            Self::Policy => "policy",
            Self::Session => "session",
        }
    }
}

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
        record: Option<Box<crate::session::record::SessionRecord>>,
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
            Change::Session { id_hash, .. } => format!("browser-session:{id_hash}"),
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

/// Applies a device patch to (a copy of) the current record.
pub fn merge_device(current: Option<&Device>, id: &str, p: &DevicePatch) -> Device {
    let mut d = current.cloned().unwrap_or_else(|| Device {
        id: id.to_owned(),
        ..Device::default()
    });
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &p.$f { d.$f = v.clone(); } )* };
    }
    set!(
        ownership,
        lifecycle,
        compliance,
        compromised,
        patch_behind,
        threat,
        subjects,
        cert_thumbprints
    );
    if let Some(v) = &p.platform {
        d.platform = Some(v.clone());
    }
    if let Some(v) = &p.os_version {
        d.os_version = Some(v.clone());
    }
    if let Some(v) = &p.management_source {
        d.management_source = Some(v.clone());
    }
    if let Some(v) = p.last_check_in_ms {
        d.last_check_in_ms = Some(d.last_check_in_ms.map_or(v, |old| old.max(v)));
    }
    for x in &p.add_external_ids {
        if !d.external_ids.contains(x) {
            d.external_ids.push(x.clone());
        }
    }
    d
}

/// Applies an identity patch to (a copy of) the current record.
pub fn merge_identity(current: Option<&Identity>, subject: &str, p: &IdentityPatch) -> Identity {
    let mut i = current.cloned().unwrap_or_else(|| Identity {
        subject: subject.to_owned(),
        ..Identity::default()
    });
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = &p.$f { i.$f = v.clone(); } )* };
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
        risk
    );
    if let Some(a) = &p.assurance {
        i.assurance = Some(a.clone());
    }
    if let Some(s) = &p.scim {
        i.scim = s.clone();
    }
    i.aliases.retain(|a| !p.remove_aliases.contains(a));
    for a in &p.add_aliases {
        if !i.aliases.contains(a) && a != subject {
            i.aliases.push(a.clone());
        }
    }
    i
}
