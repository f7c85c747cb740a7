//! The canonical model: devices (lifecycle kept apart from posture flags),
//! identities, revocations. Every record keeps the origin time and source of
//! the event that last changed it, the snapshot version it was written at,
//! and per field the origin time of the event that last set that field (so
//! a late event still sets the fields no newer event has set).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// Field name → origin time (ms) of the event that last set it.
pub type FieldTimes = BTreeMap<String, u64>;

/// How a device is owned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ownership {
    /// Company-owned.
    Corporate,
    /// Personal (bring your own device).
    Byod,
    /// A partner's device.
    Partner,
    /// Shared / kiosk.
    Shared,
    /// Not known.
    #[default]
    Unknown,
}

/// Where a device is in its management lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// No MDM knows it.
    #[default]
    Unknown,
    /// Enrolled in an MDM.
    Enrolled,
    /// Was enrolled, no longer is.
    Unenrolled,
    /// A wipe was ordered.
    WipePending,
    /// Wiped.
    Wiped,
    /// Reported lost or stolen (lost mode).
    Lost,
    /// Removed from the MDM.
    Deleted,
}

impl Lifecycle {
    /// Lifecycles only an explicit re-enrolment or an operator restore
    /// may leave for a live one (a routine report never does).
    pub fn is_sticky(self) -> bool {
        matches!(self, Self::Lost | Self::WipePending | Self::Wiped)
    }

    /// Lifecycles in which a device must never get access.
    pub fn is_dead(self) -> bool {
        matches!(
            self,
            Self::Lost | Self::WipePending | Self::Wiped | Self::Deleted
        )
    }
}

/// The compliance verdict of the device's MDM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compliance {
    /// Compliant.
    Compliant,
    /// Not compliant.
    NonCompliant,
    /// Non-compliant but inside a grace period.
    Grace,
    /// No verdict.
    #[default]
    Unknown,
}

/// Threat level reported for a device or identity.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Threat {
    /// None reported.
    #[default]
    None,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

/// A device as the snapshot knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Canonical device id (the value of the token's device claim).
    pub id: String,
    /// `macos`, `ios`, `windows`, `android`, …
    #[serde(default)]
    pub platform: Option<String>,
    /// OS version as reported.
    #[serde(default)]
    pub os_version: Option<String>,
    /// Ownership.
    #[serde(default)]
    pub ownership: Ownership,
    /// Which MDM manages it (`jamf`, `intune`, a generic source name).
    #[serde(default)]
    pub management_source: Option<String>,
    /// Lifecycle.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Compliance verdict.
    #[serde(default)]
    pub compliance: Compliance,
    /// Jailbroken / rooted / compromised.
    #[serde(default)]
    pub compromised: bool,
    /// Missing patches or below the OS baseline.
    #[serde(default)]
    pub patch_behind: bool,
    /// Threat level.
    #[serde(default)]
    pub threat: Threat,
    /// Last MDM check-in, ms since epoch.
    #[serde(default)]
    pub last_check_in_ms: Option<u64>,
    /// Subjects assigned to this device.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// SHA-256 thumbprints (hex) of the device's certificates.
    #[serde(default)]
    pub cert_thumbprints: Vec<String>,
    /// Per-source identifiers (Jamf `jssID`, Intune id, serial…), `source:value`.
    #[serde(default)]
    pub external_ids: Vec<String>,
    /// Origin time (ms) of the newest event that changed this record.
    #[serde(default)]
    pub updated_ms: u64,
    /// Per field, the origin time (ms) of the event that last set it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_ms: FieldTimes,
    /// Feed that last changed it.
    #[serde(default)]
    pub source: Option<Feed>,
    /// Snapshot version at which it last changed.
    #[serde(default)]
    pub version: u64,
    /// Set when the snapshot replaced or dropped this record (see
    /// [`Superseded`]).
    #[serde(skip)]
    pub superseded: Superseded,
}

/// Set once the in-memory snapshot replaced or dropped a record, so a
/// holder of the record (a cached token's device memo) knows to look it up
/// again. Not part of the record's value: never serialized, equal in every
/// comparison, and unset in a clone (a clone is a new record).
#[derive(Debug, Default)]
pub struct Superseded(std::sync::atomic::AtomicBool);

impl Superseded {
    /// True once the snapshot no longer holds this record.
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks the record replaced or dropped. The snapshot does this before
    /// its version moves past the change, so a reader that saw that version
    /// sees the mark.
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Clone for Superseded {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Superseded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Human or non-human.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A person.
    #[default]
    Human,
    /// A service account, workload or API client.
    Workload,
}

/// Lifecycle status of an identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStatus {
    /// May get access.
    #[default]
    Active,
    /// Temporarily disabled.
    Suspended,
    /// Left (leaver) or purged.
    Terminated,
}

/// An identity as the snapshot knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The subject: the token's `sub`.
    pub subject: String,
    /// Human or workload.
    #[serde(default)]
    pub kind: IdentityKind,
    /// Status.
    #[serde(default)]
    pub status: IdentityStatus,
    /// Department.
    #[serde(default)]
    pub department: Option<String>,
    /// Role / title.
    #[serde(default)]
    pub role: Option<String>,
    /// Group names.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Entitlements (computed from groups by config, plus direct grants).
    #[serde(default)]
    pub entitlements: Vec<String>,
    /// Contract end, ms since epoch.
    #[serde(default)]
    pub contract_end_ms: Option<u64>,
    /// Accountable owner (workloads).
    #[serde(default)]
    pub owner: Option<String>,
    /// Devices assigned.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Risk level reported by a shared-signals transmitter.
    #[serde(default)]
    pub risk: Threat,
    /// Last assurance level reported (CAEP assurance-level-change).
    #[serde(default)]
    pub assurance: Option<String>,
    /// Other names this subject is known by (email, SCIM userName, `iss|sub`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The SCIM User resource as last provisioned (served back to SCIM clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scim: Option<serde_json::Value>,
    /// Origin time (ms) of the newest event that changed this record.
    #[serde(default)]
    pub updated_ms: u64,
    /// Per field, the origin time (ms) of the event that last set it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_ms: FieldTimes,
    /// Feed that last changed it.
    #[serde(default)]
    pub source: Option<Feed>,
    /// Snapshot version at which it last changed.
    #[serde(default)]
    pub version: u64,
}

/// What a revocation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationTarget {
    /// Every token and session of a subject.
    Subject,
    /// Every token and session on a device.
    Device,
    /// One session (`sid`) or token (`jti`).
    Session,
}

impl RevocationTarget {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subject => "subject",
            Self::Device => "device",
            Self::Session => "session",
        }
    }
}

/// Tokens and sessions of `key` issued at or before `not_before_s` stop working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What it applies to.
    pub target: RevocationTarget,
    /// Subject, device id or session id.
    pub key: String,
    /// Seconds since epoch; credentials issued at or before it are revoked.
    pub not_before_s: u64,
    /// Feed that recorded it.
    pub source: Option<Feed>,
    /// Snapshot version at which it was recorded.
    pub version: u64,
}

/// A group provisioned over SCIM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// SCIM `id`.
    pub id: String,
    /// `displayName` (unique).
    pub display_name: String,
    /// Member SCIM user ids.
    #[serde(default)]
    pub members: Vec<String>,
    /// The SCIM Group resource as last provisioned.
    #[serde(default)]
    pub resource: serde_json::Value,
    /// Origin time (ms) of the event that last changed it.
    #[serde(default)]
    pub updated_ms: u64,
    /// Feed that last changed it.
    #[serde(default)]
    pub source: Option<Feed>,
    /// Snapshot version at which it last changed.
    #[serde(default)]
    pub version: u64,
}

/// Lowercase name of a lifecycle.
pub fn lifecycle_name(l: Lifecycle) -> &'static str {
    match l {
        Lifecycle::Lost => "lost",
        Lifecycle::WipePending => "wipe_pending",
        Lifecycle::Wiped => "wiped",
        Lifecycle::Deleted => "deleted",
        Lifecycle::Unenrolled => "unenrolled",
        Lifecycle::Enrolled => "enrolled",
        Lifecycle::Unknown => "unknown",
    }
}

/// Lowercase name of a compliance verdict.
pub fn compliance_name(c: Compliance) -> &'static str {
    match c {
        Compliance::Compliant => "compliant",
        Compliance::NonCompliant => "non_compliant",
        Compliance::Grace => "grace",
        Compliance::Unknown => "unknown",
    }
}
