//! Stale-access findings: a pure function of the posture snapshot, the
//! access memory, the event history of the records involved, the clock and
//! `[access]`. Each finding carries its severity, its evidence (event ids,
//! request ids, times) and a hint at the fix.
//!
//! INVARIANT: nothing here reads the clock, the store or the network; the
//! caller hands everything in, so the same inputs give the same findings.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::memory::{FeedSeen, RouteRow, TokenRow};
use crate::config::{AccessConfig, Sensitivity};
use crate::posture::journal::LoggedEvent;
use crate::posture::model::{
    Compliance, Device, Identity, IdentityKind, IdentityStatus, Ownership, lifecycle_name,
};
use crate::posture::session::SessionRecord;

/// How urgent a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Fix soon.
    Medium,
    /// Fix today.
    High,
    /// Access is open now.
    Critical,
}

impl Severity {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// What kind of stale access a finding reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A leaver with a live session, or a token used after termination.
    LeaverAccess,
    /// A lost, wiped or compromised device used after the event.
    DeadDeviceAccess,
    /// Posture changed but permissions did not: a noncompliant or lost
    /// device whose user keeps entitlements to high or critical routes.
    PostureWithoutPermissionChange,
    /// A mover whose old entitlements are still carried by live tokens.
    MoverStaleTokens,
    /// A workload whose accountable owner left.
    WorkloadOwnerLeft,
    /// A workload credential older than `credential_max_age_days`.
    WorkloadCredentialOld,
    /// A workload tied to a lost, wiped or compromised device.
    WorkloadOnDeadDevice,
    /// A contractor past the end date.
    ContractorPastEnd,
    /// A device with several active users.
    SharedDevice,
    /// A feed silent beyond its expected interval.
    FeedSilent,
}

/// Every finding kind, in report order.
pub const FINDING_KINDS: [FindingKind; 10] = [
    FindingKind::LeaverAccess,
    FindingKind::DeadDeviceAccess,
    FindingKind::PostureWithoutPermissionChange,
    FindingKind::MoverStaleTokens,
    FindingKind::WorkloadOwnerLeft,
    FindingKind::WorkloadCredentialOld,
    FindingKind::WorkloadOnDeadDevice,
    FindingKind::ContractorPastEnd,
    FindingKind::SharedDevice,
    FindingKind::FeedSilent,
];

impl FindingKind {
    /// The snake_case name (as in JSON and the `finding` filter).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeaverAccess => "leaver_access",
            Self::DeadDeviceAccess => "dead_device_access",
            Self::PostureWithoutPermissionChange => "posture_without_permission_change",
            Self::MoverStaleTokens => "mover_stale_tokens",
            Self::WorkloadOwnerLeft => "workload_owner_left",
            Self::WorkloadCredentialOld => "workload_credential_old",
            Self::WorkloadOnDeadDevice => "workload_on_dead_device",
            Self::ContractorPastEnd => "contractor_past_end",
            Self::SharedDevice => "shared_device",
            Self::FeedSilent => "feed_silent",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        FINDING_KINDS.into_iter().find(|k| k.as_str() == s)
    }
}

/// What backs a finding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Ids of the feed events that changed the state.
    pub event_ids: Vec<String>,
    /// Ids of the requests seen after it.
    pub request_ids: Vec<String>,
    /// The times that matter, RFC 3339 (`what: time`).
    pub times: Vec<String>,
    /// Token hashes (first 16 hex digits) and session hashes involved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
}

/// One stale-access finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Kind.
    pub kind: FindingKind,
    /// Severity.
    pub severity: Severity,
    /// The subject concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The device concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Routes involved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// The feed concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<String>,
    /// One line for a person.
    pub summary: String,
    /// What backs it.
    pub evidence: Evidence,
    /// What to do about it.
    pub fix: String,
}

/// A subject's kind, as the picture shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    /// A person.
    Person,
    /// A contractor (SCIM `kind_attribute`).
    Contractor,
    /// A workload (the identity's kind, or the SCIM `kind_attribute`).
    Workload,
}

impl SubjectKind {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Person => "person",
            Self::Contractor => "contractor",
            Self::Workload => "workload",
        }
    }
}

/// Everything the findings read.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Every identity.
    pub identities: &'a [Arc<Identity>],
    /// Every device.
    pub devices: &'a [Arc<Device>],
    /// Every browser session.
    pub sessions: &'a [Arc<SessionRecord>],
    /// The access memory's route rows.
    pub routes: &'a [RouteRow],
    /// The access memory's token rows.
    pub tokens: &'a [TokenRow],
    /// Each feed's newest event.
    pub feeds: &'a BTreeMap<String, FeedSeen>,
    /// Record key (`subject:…`, `device:…`) → its events, as history gives them.
    pub history: &'a HashMap<String, Vec<LoggedEvent>>,
    /// Route name → sensitivity.
    pub sensitivity: &'a HashMap<String, Sensitivity>,
    /// When the memory began (feeds never heard from count from here), ms.
    pub started_ms: u64,
    /// Now, ms.
    pub now_ms: u64,
    /// `[access]`.
    pub config: &'a AccessConfig,
}

/// A SCIM attribute by path: `attr`, or `urn:…:attr` inside an extension
/// (names compared case-insensitively, as SCIM does).
pub fn scim_attr<'v>(scim: &'v serde_json::Value, path: &str) -> Option<&'v serde_json::Value> {
    let get = |v: &'v serde_json::Value, k: &str| -> Option<&'v serde_json::Value> {
        v.as_object()?
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v)
    };
    if let Some(v) = get(scim, path) {
        return Some(v);
    }
    let (urn, attr) = path.rsplit_once(':')?;
    get(get(scim, urn)?, attr)
}

fn scim_str<'v>(i: &'v Identity, path: &str) -> Option<&'v str> {
    let v = scim_attr(i.scim.as_ref()?, path)?;
    match v {
        serde_json::Value::String(s) => Some(s.as_str()),
        serde_json::Value::Object(_) => v.get("value").and_then(|v| v.as_str()),
        _ => None,
    }
}

/// The subject's kind: the identity's own kind first, then the SCIM attribute.
pub fn kind_of(i: &Identity, cfg: &AccessConfig) -> SubjectKind {
    if i.kind == IdentityKind::Workload {
        return SubjectKind::Workload;
    }
    let Some(v) = scim_str(i, &cfg.kind_attribute) else {
        return SubjectKind::Person;
    };
    if cfg
        .workload_values
        .iter()
        .any(|w| w.eq_ignore_ascii_case(v))
    {
        SubjectKind::Workload
    } else if cfg
        .contractor_values
        .iter()
        .any(|c| c.eq_ignore_ascii_case(v))
    {
        SubjectKind::Contractor
    } else {
        SubjectKind::Person
    }
}

/// The end date: the identity's `contract_end_ms`, else the SCIM attribute
/// (RFC 3339 date-time, or a date meaning its end in UTC).
pub fn end_date_ms(i: &Identity, cfg: &AccessConfig) -> Option<u64> {
    if let Some(ms) = i.contract_end_ms {
        return Some(ms);
    }
    let s = scim_str(i, &cfg.contractor_end_date_attribute)?;
    if let Some(ms) = crate::util::parse_rfc3339_ms(s) {
        return Some(ms);
    }
    let date =
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    let end = date.with_hms(23, 59, 59).ok()?.assume_utc();
    u64::try_from(end.unix_timestamp()).ok().map(|s| s * 1000)
}

/// The accountable owner: the identity's `owner`, else the SCIM attribute.
pub fn owner_of(i: &Identity, cfg: &AccessConfig) -> Option<String> {
    i.owner
        .clone()
        .or_else(|| scim_str(i, &cfg.owner_attribute).map(str::to_owned))
}

fn at(ms: u64) -> String {
    crate::util::rfc3339(ms, true)
}

fn short(hash: &str) -> String {
    hash.chars().take(16).collect()
}

/// Resolves names (subject, alias, `scim:<id>`) to canonical subjects.
struct Names<'a> {
    by_subject: HashMap<&'a str, &'a Arc<Identity>>,
    alias: HashMap<&'a str, &'a str>,
}

impl<'a> Names<'a> {
    fn new(ids: &'a [Arc<Identity>]) -> Self {
        let mut by_subject = HashMap::new();
        let mut alias = HashMap::new();
        for i in ids {
            by_subject.insert(i.subject.as_str(), i);
            for a in &i.aliases {
                alias.insert(a.as_str(), i.subject.as_str());
            }
        }
        Self { by_subject, alias }
    }

    fn canonical<'s>(&self, name: &'s str) -> &'s str
    where
        'a: 's,
    {
        if self.by_subject.contains_key(name) {
            return name;
        }
        match self.alias.get(name) {
            Some(s) => s,
            None => name,
        }
    }

    fn identity(&self, name: &str) -> Option<&'a Arc<Identity>> {
        let c = self.canonical(name);
        self.by_subject.get(c).copied().or_else(|| {
            // A SCIM `manager.value` is the manager's SCIM id.
            let key = format!("scim:{name}");
            self.alias
                .get(key.as_str())
                .and_then(|s| self.by_subject.get(s).copied())
        })
    }
}

/// The events of `key` that set a field at `t` (its origin time), or the
/// newest one when none matches exactly.
fn events_at(inp: &Inputs<'_>, key: &str, t: u64) -> Vec<String> {
    let Some(h) = inp.history.get(key) else {
        return Vec::new();
    };
    let exact: Vec<String> = h
        .iter()
        .filter(|e| e.event.origin_ms == t)
        .map(|e| e.event.id.clone())
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    h.last()
        .map(|e| vec![e.event.id.clone()])
        .unwrap_or_default()
}

fn field_time(field_ms: &BTreeMap<String, u64>, fields: &[&str], fallback: u64) -> u64 {
    fields
        .iter()
        .filter_map(|f| field_ms.get(*f).copied())
        .max()
        .unwrap_or(fallback)
}

/// 7. A device with several distinct users active on it.
fn shared_device(
    out: &mut Vec<Finding>,
    id: &str,
    ownership: Option<Ownership>,
    rows: &[&RouteRow],
    names: &Names<'_>,
    active_since: u64,
    cfg: &AccessConfig,
) {
    let mut active: BTreeSet<&str> = BTreeSet::new();
    let mut reqs = Vec::new();
    for r in rows
        .iter()
        .filter(|r| r.last_forwarded_ms >= active_since && r.last_forwarded_ms > 0)
    {
        if active.insert(names.canonical(&r.subject)) {
            reqs.push(r.last_forwarded_request.clone());
        }
    }
    if active.len() >= cfg.shared_device_threshold {
        let declared = ownership == Some(Ownership::Shared);
        out.push(Finding {
            kind: FindingKind::SharedDevice,
            severity: if declared { Severity::Low } else { Severity::Medium },
            subject: None,
            device: Some(id.to_owned()),
            routes: Vec::new(),
            feed: None,
            summary: format!(
                "device `{id}` has {} active users ({}){}",
                active.len(),
                active.iter().copied().collect::<Vec<_>>().join(", "),
                if declared { ", and is declared shared" } else { "" }
            ),
            evidence: Evidence {
                event_ids: Vec::new(),
                request_ids: reqs,
                times: vec![format!("window: since {}", at(active_since))],
                credentials: Vec::new(),
            },
            fix: if declared {
                "a declared shared device: require step-up and short sessions per user".into()
            } else {
                "find out why several people use one device; mark it shared in the MDM (and require per-user step-up) or reassign it".into()
            },
        });
    }
}

/// Every finding, most severe first.
pub fn findings(inp: &Inputs<'_>) -> Vec<Finding> {
    let names = Names::new(inp.identities);
    let cfg = inp.config;
    let now = inp.now_ms;
    let now_s = now / 1000;
    let active_since = now.saturating_sub(cfg.active_window_s.saturating_mul(1000));
    let devices: HashMap<&str, &Arc<Device>> =
        inp.devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut rows_by_subject: HashMap<&str, Vec<&RouteRow>> = HashMap::new();
    let mut rows_by_device: HashMap<&str, Vec<&RouteRow>> = HashMap::new();
    for r in inp.routes {
        rows_by_subject
            .entry(names.canonical(&r.subject))
            .or_default()
            .push(r);
        if let Some(d) = &r.device {
            rows_by_device.entry(d.as_str()).or_default().push(r);
        }
    }
    let mut tokens_by_subject: HashMap<&str, Vec<&TokenRow>> = HashMap::new();
    for t in inp.tokens {
        tokens_by_subject
            .entry(names.canonical(&t.subject))
            .or_default()
            .push(t);
    }
    let live_sessions: Vec<&Arc<SessionRecord>> = inp
        .sessions
        .iter()
        .filter(|s| s.live_at(now_s, s.last_seen_s))
        .collect();
    let high = |route: &str| {
        matches!(
            inp.sensitivity.get(route),
            Some(Sensitivity::High | Sensitivity::Critical)
        )
    };
    let mut out = Vec::new();

    for i in inp.identities {
        let subject = i.subject.as_str();
        let key = format!("subject:{subject}");
        let rows = rows_by_subject.get(subject).map_or(&[][..], |v| v);
        let tokens = tokens_by_subject.get(subject).map_or(&[][..], |v| v);
        let kind = kind_of(i, cfg);

        // 1. leaver
        if i.status == IdentityStatus::Terminated {
            let t = field_time(&i.field_ms, &["status"], i.updated_ms);
            let mut ev = Evidence {
                event_ids: events_at(inp, &key, t),
                times: vec![format!("terminated: {}", at(t))],
                ..Evidence::default()
            };
            let mut sev = None::<Severity>;
            let mut routes = BTreeSet::new();
            for s in live_sessions
                .iter()
                .filter(|s| names.canonical(&s.subject) == subject)
            {
                sev = sev.max(Some(Severity::Critical));
                ev.credentials
                    .push(format!("session {}", short(&s.id_hash)));
            }
            for tk in tokens.iter().filter(|tk| tk.last_ms > t) {
                let fwd = tk.last_forwarded_ms > t;
                sev = sev.max(Some(if fwd {
                    Severity::Critical
                } else {
                    Severity::Medium
                }));
                ev.credentials.push(format!("token {}", short(&tk.hash)));
                ev.request_ids.push(tk.last_request.clone());
                if fwd && tk.last_forwarded_request != tk.last_request {
                    ev.request_ids.push(tk.last_forwarded_request.clone());
                }
                ev.times.push(format!("token used: {}", at(tk.last_ms)));
            }
            for r in rows.iter().filter(|r| r.last_ms > t) {
                routes.insert(r.route.clone());
                if r.last_forwarded_ms > t {
                    sev = sev.max(Some(Severity::Critical));
                    if !ev.request_ids.contains(&r.last_forwarded_request) {
                        ev.request_ids.push(r.last_forwarded_request.clone());
                    }
                } else {
                    sev = sev.max(Some(Severity::Medium));
                    if !ev.request_ids.contains(&r.last_request) {
                        ev.request_ids.push(r.last_request.clone());
                    }
                }
            }
            if let Some(severity) = sev {
                let open = severity == Severity::Critical;
                out.push(Finding {
                    kind: FindingKind::LeaverAccess,
                    severity,
                    subject: Some(subject.to_owned()),
                    device: None,
                    routes: routes.into_iter().collect(),
                    feed: None,
                    summary: if open {
                        format!("`{subject}` left at {} but still has access", at(t))
                    } else {
                        format!(
                            "`{subject}` left at {} and a credential of theirs is still presented (refused)",
                            at(t)
                        )
                    },
                    evidence: ev,
                    fix: if open {
                        "revoke the subject (POST /admin/v1/revoke) and end its sessions at the IdP; check why the policy set still allows a terminated subject".into()
                    } else {
                        "ask the IdP to revoke the refresh tokens and sessions still in circulation; find who is presenting them".into()
                    },
                });
            }
        }

        // 4. mover
        if i.status == IdentityStatus::Active {
            let tm = field_time(&i.field_ms, &["groups", "entitlements"], 0);
            // The joiner's own event sets groups too: only a later change is a move.
            let joined = inp
                .history
                .get(&key)
                .filter(|h| h.len() < super::report::EVIDENCE_EVENTS)
                .and_then(|h| h.iter().map(|e| e.event.origin_ms).min());
            if tm > 0 && joined.is_none_or(|j| j < tm) {
                let stale: Vec<&&TokenRow> = tokens
                    .iter()
                    .filter(|tk| {
                        tk.iat_s.is_some_and(|iat| iat.saturating_mul(1000) < tm)
                            && tk.exp_s.saturating_mul(1000) > now
                            && tk.last_ms >= tm
                    })
                    .collect();
                if !stale.is_empty() {
                    let mut ev = Evidence {
                        event_ids: events_at(inp, &key, tm),
                        times: vec![format!("groups changed: {}", at(tm))],
                        ..Evidence::default()
                    };
                    for tk in &stale {
                        ev.credentials.push(format!("token {}", short(&tk.hash)));
                        ev.request_ids.push(tk.last_request.clone());
                        ev.times.push(format!(
                            "token issued: {}, expires: {}, used: {}",
                            at(tk.iat_s.unwrap_or(0) * 1000),
                            at(tk.exp_s * 1000),
                            at(tk.last_ms)
                        ));
                    }
                    out.push(Finding {
                        kind: FindingKind::MoverStaleTokens,
                        severity: Severity::High,
                        subject: Some(subject.to_owned()),
                        device: None,
                        routes: rows
                            .iter()
                            .filter(|r| r.last_ms >= tm)
                            .map(|r| r.route.clone())
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                        feed: None,
                        summary: format!(
                            "`{subject}` changed groups at {} but {} token(s) issued before still work",
                            at(tm),
                            stale.len()
                        ),
                        evidence: ev,
                        fix: "revoke tokens issued before the move (POST /admin/v1/revoke with the subject) or shorten token lifetimes at the IdP".into(),
                    });
                }
            }
        }

        // 5. workloads
        if kind == SubjectKind::Workload {
            if let Some(owner) = owner_of(i, cfg)
                && let Some(o) = names.identity(&owner)
                && o.status == IdentityStatus::Terminated
            {
                let t = field_time(&o.field_ms, &["status"], o.updated_ms);
                out.push(Finding {
                    kind: FindingKind::WorkloadOwnerLeft,
                    severity: Severity::High,
                    subject: Some(subject.to_owned()),
                    device: None,
                    routes: rows.iter().map(|r| r.route.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
                    feed: None,
                    summary: format!("workload `{subject}`'s owner `{}` left at {}", o.subject, at(t)),
                    evidence: Evidence {
                        event_ids: events_at(inp, &format!("subject:{}", o.subject), t),
                        request_ids: rows.iter().filter(|r| r.last_ms > t).map(|r| r.last_request.clone()).collect(),
                        times: vec![format!("owner terminated: {}", at(t))],
                        credentials: Vec::new(),
                    },
                    fix: "assign a new accountable owner, or disable the workload and rotate its credentials".into(),
                });
            }
            let max_age_ms = cfg.credential_max_age_days.saturating_mul(86_400_000);
            let old: Vec<&&TokenRow> = tokens
                .iter()
                .filter(|tk| {
                    tk.iat_s.is_some_and(|iat| {
                        now.saturating_sub(iat.saturating_mul(1000)) > max_age_ms
                    }) && tk.last_ms >= active_since
                })
                .collect();
            if !old.is_empty() {
                let mut ev = Evidence::default();
                for tk in &old {
                    ev.credentials.push(format!("token {}", short(&tk.hash)));
                    ev.request_ids.push(tk.last_request.clone());
                    ev.times.push(format!(
                        "issued: {}, used: {}",
                        at(tk.iat_s.unwrap_or(0) * 1000),
                        at(tk.last_ms)
                    ));
                }
                out.push(Finding {
                    kind: FindingKind::WorkloadCredentialOld,
                    severity: Severity::Medium,
                    subject: Some(subject.to_owned()),
                    device: None,
                    routes: Vec::new(),
                    feed: None,
                    summary: format!(
                        "workload `{subject}` uses a credential older than {} days",
                        cfg.credential_max_age_days
                    ),
                    evidence: ev,
                    fix: "rotate the workload's credential and shorten its lifetime".into(),
                });
            }
            let mut dead: BTreeSet<&str> = i.devices.iter().map(String::as_str).collect();
            dead.extend(rows.iter().filter_map(|r| r.device.as_deref()));
            dead.extend(tokens.iter().filter_map(|t| t.device.as_deref()));
            for d in dead {
                let Some(dev) = devices.get(d) else { continue };
                if !(dev.lifecycle.is_dead() || dev.compromised) {
                    continue;
                }
                let t = field_time(&dev.field_ms, &["lifecycle", "compromised"], dev.updated_ms);
                out.push(Finding {
                    kind: FindingKind::WorkloadOnDeadDevice,
                    severity: Severity::High,
                    subject: Some(subject.to_owned()),
                    device: Some(d.to_owned()),
                    routes: Vec::new(),
                    feed: None,
                    summary: format!(
                        "workload `{subject}` is tied to device `{d}`, which is {}",
                        if dev.compromised { "compromised" } else { lifecycle_name(dev.lifecycle) }
                    ),
                    evidence: Evidence {
                        event_ids: events_at(inp, &format!("device:{d}"), t),
                        request_ids: rows.iter().filter(|r| r.device.as_deref() == Some(d)).map(|r| r.last_request.clone()).collect(),
                        times: vec![format!("device changed: {}", at(t))],
                        credentials: Vec::new(),
                    },
                    fix: "rotate the workload's credentials (they may be on the lost device) and rebind it to a trusted host".into(),
                });
            }
        }

        // 6. contractor
        if kind == SubjectKind::Contractor
            && let Some(end) = end_date_ms(i, cfg)
            && end < now
        {
            let used: Vec<&&RouteRow> = rows.iter().filter(|r| r.last_forwarded_ms > end).collect();
            if i.status == IdentityStatus::Active || !used.is_empty() {
                let mut ev = Evidence {
                    event_ids: events_at(
                        inp,
                        &key,
                        field_time(&i.field_ms, &["scim", "contract_end_ms"], i.updated_ms),
                    ),
                    times: vec![format!("end date: {}", at(end))],
                    ..Evidence::default()
                };
                for r in &used {
                    ev.request_ids.push(r.last_forwarded_request.clone());
                    ev.times
                        .push(format!("{}: {}", r.route, at(r.last_forwarded_ms)));
                }
                out.push(Finding {
                    kind: FindingKind::ContractorPastEnd,
                    severity: if used.is_empty() { Severity::Medium } else { Severity::High },
                    subject: Some(subject.to_owned()),
                    device: None,
                    routes: used.iter().map(|r| r.route.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
                    feed: None,
                    summary: format!("contractor `{subject}` is past the end date {} and still {}", at(end), if used.is_empty() { "active" } else { "gets access" }),
                    evidence: ev,
                    fix: "deactivate the contractor in the identity provider (SCIM active=false), or extend the end date if the contract was renewed".into(),
                });
            }
        }
    }

    for d in inp.devices {
        let id = d.id.as_str();
        let key = format!("device:{id}");
        let rows = rows_by_device.get(id).map_or(&[][..], |v| v);
        let dead = d.lifecycle.is_dead() || d.compromised;
        let state = if d.compromised {
            "compromised"
        } else {
            lifecycle_name(d.lifecycle)
        };

        // 2. lost / wiped device with access after the event
        if dead {
            let t = field_time(&d.field_ms, &["lifecycle", "compromised"], d.updated_ms);
            let mut sev = None::<Severity>;
            let mut ev = Evidence {
                event_ids: events_at(inp, &key, t),
                times: vec![format!("{state}: {}", at(t))],
                ..Evidence::default()
            };
            let mut routes = BTreeSet::new();
            for r in rows.iter().filter(|r| r.last_ms > t) {
                routes.insert(r.route.clone());
                if r.last_forwarded_ms > t {
                    sev = sev.max(Some(Severity::Critical));
                    ev.request_ids.push(r.last_forwarded_request.clone());
                    ev.times.push(format!(
                        "{} reached {}: {}",
                        r.subject,
                        r.route,
                        at(r.last_forwarded_ms)
                    ));
                } else {
                    sev = sev.max(Some(Severity::Low));
                    ev.request_ids.push(r.last_request.clone());
                    ev.times.push(format!(
                        "{} refused on {}: {}",
                        r.subject,
                        r.route,
                        at(r.last_ms)
                    ));
                }
            }
            for s in live_sessions
                .iter()
                .filter(|s| s.device.as_deref() == Some(id))
            {
                sev = sev.max(Some(Severity::High));
                ev.credentials
                    .push(format!("session {}", short(&s.id_hash)));
            }
            if let Some(severity) = sev {
                let open = severity >= Severity::High;
                out.push(Finding {
                    kind: FindingKind::DeadDeviceAccess,
                    severity,
                    subject: None,
                    device: Some(id.to_owned()),
                    routes: routes.into_iter().collect(),
                    feed: None,
                    summary: if open {
                        format!("device `{id}` is {state} since {} and still has access", at(t))
                    } else {
                        format!("device `{id}` is {state} since {} and is still used (refused)", at(t))
                    },
                    evidence: ev,
                    fix: if open {
                        "revoke the device (POST /admin/v1/revoke target=device) and make the policy set deny dead devices".into()
                    } else {
                        "the proxy refuses it; make sure the MDM wiped it and the IdP revoked its tokens".into()
                    },
                });
            }
        }

        // 3. posture changed, permissions did not
        if dead || d.compliance == Compliance::NonCompliant {
            let t = field_time(
                &d.field_ms,
                &["compliance", "lifecycle", "compromised"],
                d.updated_ms,
            );
            let mut users: BTreeSet<&str> = d.subjects.iter().map(|s| names.canonical(s)).collect();
            users.extend(rows.iter().map(|r| names.canonical(&r.subject)));
            for u in users {
                let Some(ident) = names.identity(u) else {
                    continue;
                };
                if ident.status != IdentityStatus::Active || ident.entitlements.is_empty() {
                    continue;
                }
                let urows = rows_by_subject
                    .get(ident.subject.as_str())
                    .map_or(&[][..], |v| v);
                let sensitive: Vec<&&RouteRow> = urows.iter().filter(|r| high(&r.route)).collect();
                if sensitive.is_empty() {
                    continue;
                }
                let after: Vec<&&&RouteRow> = sensitive
                    .iter()
                    .filter(|r| r.last_forwarded_ms > t)
                    .collect();
                let mut ev = Evidence {
                    event_ids: events_at(inp, &key, t),
                    times: vec![format!(
                        "device {}: {}",
                        if dead { state } else { "non_compliant" },
                        at(t)
                    )],
                    ..Evidence::default()
                };
                for r in &after {
                    ev.request_ids.push(r.last_forwarded_request.clone());
                    ev.times
                        .push(format!("{} reached: {}", r.route, at(r.last_forwarded_ms)));
                }
                out.push(Finding {
                    kind: FindingKind::PostureWithoutPermissionChange,
                    severity: if after.is_empty() { Severity::Medium } else { Severity::High },
                    subject: Some(ident.subject.clone()),
                    device: Some(id.to_owned()),
                    routes: sensitive.iter().map(|r| r.route.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
                    feed: None,
                    summary: format!(
                        "device `{id}` is {} but `{}` keeps entitlements ({}) to high/critical routes",
                        if dead { state } else { "non_compliant" },
                        ident.subject,
                        ident.entitlements.join(", ")
                    ),
                    evidence: ev,
                    fix: "have identity governance remove the entitlements (or move the user to a restricted group) until the device is compliant, and let policy deny non-compliant devices on high routes".into(),
                });
            }
        }

        shared_device(
            &mut out,
            id,
            Some(d.ownership),
            rows,
            &names,
            active_since,
            cfg,
        );
    }
    // 7. devices no feed describes can be shared too.
    for (id, rows) in &rows_by_device {
        if !devices.contains_key(id) {
            shared_device(&mut out, id, None, rows, &names, active_since, cfg);
        }
    }

    // 8. feeds
    for (feed, interval_s) in &cfg.feed_intervals {
        let seen = inp.feeds.get(feed);
        let since = seen.map_or(inp.started_ms, |f| f.last_accepted_ms);
        let silent_ms = now.saturating_sub(since);
        if silent_ms > interval_s.saturating_mul(1000) {
            out.push(Finding {
                kind: FindingKind::FeedSilent,
                severity: Severity::High,
                subject: None,
                device: None,
                routes: Vec::new(),
                feed: Some(feed.clone()),
                summary: match seen {
                    Some(_) => format!(
                        "feed `{feed}` silent for {} s (expected every {interval_s} s)",
                        silent_ms / 1000
                    ),
                    None => format!(
                        "feed `{feed}` never delivered an event (expected every {interval_s} s)"
                    ),
                },
                evidence: Evidence {
                    event_ids: seen.map(|f| vec![f.last_event_id.clone()]).unwrap_or_default(),
                    request_ids: Vec::new(),
                    times: vec![format!("last event: {}", seen.map_or("never".into(), |f| at(f.last_accepted_ms)))],
                    credentials: Vec::new(),
                },
                fix: "check the feed's sender, its credentials and its network path; until it speaks again, posture from it is stale".into(),
            });
        }
    }

    out.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.kind.cmp(&b.kind))
            .then(a.subject.cmp(&b.subject))
            .then(a.device.cmp(&b.device))
    });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::posture::model::Lifecycle;

    const NOW: u64 = 1_800_000_000_000;
    const T: u64 = NOW - 3_600_000;

    fn ident(sub: &str, f: impl FnOnce(&mut Identity)) -> Arc<Identity> {
        let mut i = Identity {
            subject: sub.into(),
            ..Identity::default()
        };
        f(&mut i);
        Arc::new(i)
    }

    fn row(sub: &str, dev: &str, route: &str, last: u64, fwd: u64) -> RouteRow {
        RouteRow {
            subject: sub.into(),
            device: Some(dev.into()),
            route: route.into(),
            decision: if fwd == last { "allow" } else { "deny" }.into(),
            first_ms: T - 10_000,
            last_ms: last,
            last_request: format!("req-{last}"),
            last_forwarded_ms: fwd,
            last_forwarded_request: format!("req-{fwd}"),
            count: 1,
            workload: false,
        }
    }

    fn token(sub: &str, iat_s: u64, exp_s: u64, last: u64) -> TokenRow {
        TokenRow {
            hash: "ab".repeat(32),
            subject: sub.into(),
            device: None,
            iat_s: Some(iat_s),
            exp_s,
            first_ms: last,
            last_ms: last,
            last_request: "req-tok".into(),
            last_forwarded_ms: last,
            last_forwarded_request: "req-tok".into(),
            workload: false,
        }
    }

    struct World {
        ids: Vec<Arc<Identity>>,
        devs: Vec<Arc<Device>>,
        routes: Vec<RouteRow>,
        tokens: Vec<TokenRow>,
        feeds: BTreeMap<String, FeedSeen>,
        cfg: AccessConfig,
    }

    impl World {
        fn new() -> Self {
            Self {
                ids: vec![],
                devs: vec![],
                routes: vec![],
                tokens: vec![],
                feeds: BTreeMap::new(),
                cfg: AccessConfig::default(),
            }
        }

        fn run(&self) -> Vec<Finding> {
            let sens: HashMap<String, Sensitivity> = [
                ("payroll".to_owned(), Sensitivity::Critical),
                ("wiki".to_owned(), Sensitivity::Low),
            ]
            .into();
            findings(&Inputs {
                identities: &self.ids,
                devices: &self.devs,
                sessions: &[],
                routes: &self.routes,
                tokens: &self.tokens,
                feeds: &self.feeds,
                history: &HashMap::new(),
                sensitivity: &sens,
                started_ms: NOW - 10_000_000,
                now_ms: NOW,
                config: &self.cfg,
            })
        }

        fn kinds(&self) -> Vec<FindingKind> {
            self.run().into_iter().map(|f| f.kind).collect()
        }
    }

    #[test]
    fn leaver_with_access_after_termination_is_critical_and_refused_use_is_medium() {
        let mut w = World::new();
        w.ids.push(ident("ann", |i| {
            i.status = IdentityStatus::Terminated;
            i.field_ms.insert("status".into(), T);
        }));
        w.routes.push(row("ann", "d1", "wiki", T + 5, T + 5));
        let f = w.run();
        assert_eq!(f[0].kind, FindingKind::LeaverAccess);
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(
            f[0].evidence
                .request_ids
                .contains(&format!("req-{}", T + 5))
        );
        w.routes[0] = row("ann", "d1", "wiki", T + 5, T - 5);
        assert_eq!(w.run()[0].severity, Severity::Medium);
        w.routes[0] = row("ann", "d1", "wiki", T - 5, T - 5);
        assert!(w.run().is_empty());
    }

    #[test]
    fn lost_device_noncompliant_posture_and_shared_device() {
        let mut w = World::new();
        w.devs.push(Arc::new(Device {
            id: "d1".into(),
            lifecycle: Lifecycle::Lost,
            field_ms: [("lifecycle".to_owned(), T)].into(),
            ..Device::default()
        }));
        w.ids
            .push(ident("bo", |i| i.entitlements = vec!["pay".into()]));
        w.routes.push(row("bo", "d1", "payroll", T + 9, T + 9));
        let k = w.kinds();
        assert!(k.contains(&FindingKind::DeadDeviceAccess), "{k:?}");
        assert!(
            k.contains(&FindingKind::PostureWithoutPermissionChange),
            "{k:?}"
        );
        // Only low routes: no posture finding.
        w.routes[0].route = "wiki".into();
        assert!(
            !w.kinds()
                .contains(&FindingKind::PostureWithoutPermissionChange)
        );

        let mut w = World::new();
        w.devs.push(Arc::new(Device {
            id: "kiosk".into(),
            ..Device::default()
        }));
        for u in ["a", "b", "c"] {
            w.routes.push(row(u, "kiosk", "wiki", NOW - 5, NOW - 5));
        }
        assert_eq!(w.kinds(), vec![FindingKind::SharedDevice]);
        w.routes.pop();
        assert!(w.kinds().is_empty());
    }

    #[test]
    fn mover_tokens_issued_before_the_group_change_still_used() {
        let mut w = World::new();
        w.ids.push(ident("cy", |i| {
            i.groups = vec!["Eng".into()];
            i.field_ms.insert("groups".into(), T);
        }));
        w.tokens
            .push(token("cy", T / 1000 - 60, NOW / 1000 + 600, T + 1000));
        assert_eq!(w.kinds(), vec![FindingKind::MoverStaleTokens]);
        // A token issued after the move is fine.
        w.tokens[0].iat_s = Some(T / 1000 + 1);
        assert!(w.kinds().is_empty());
    }

    #[test]
    fn workload_owner_left_old_credential_and_lost_device() {
        let mut w = World::new();
        w.ids.push(ident("owner", |i| {
            i.status = IdentityStatus::Terminated;
            i.aliases = vec!["scim:42".into()];
        }));
        w.ids.push(ident("svc", |i| {
            i.scim = Some(serde_json::json!({
                "userType": "Service",
                crate::config::DEFAULT_OWNER_ATTRIBUTE.rsplit_once(':').unwrap().0: {"manager": {"value": "42"}}
            }));
            i.devices = vec!["d9".into()];
        }));
        w.devs.push(Arc::new(Device {
            id: "d9".into(),
            lifecycle: Lifecycle::Wiped,
            ..Device::default()
        }));
        w.tokens.push(token(
            "svc",
            NOW / 1000 - 100 * 86_400,
            NOW / 1000 + 60,
            NOW - 10,
        ));
        let k = w.kinds();
        for want in [
            FindingKind::WorkloadOwnerLeft,
            FindingKind::WorkloadCredentialOld,
            FindingKind::WorkloadOnDeadDevice,
        ] {
            assert!(k.contains(&want), "{want:?} missing from {k:?}");
        }
    }

    #[test]
    fn contractor_past_end_date_from_the_scim_attribute() {
        let mut w = World::new();
        w.ids.push(ident("dee", |i| {
            i.scim = Some(serde_json::json!({
                "userType": "contractor",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"endDate": "2020-01-31"}
            }));
        }));
        let f = w.run();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::ContractorPastEnd);
        assert!(f[0].evidence.times[0].contains("2020-01-31T23:59:59"));
        w.ids[0] = ident("dee", |i| {
            i.scim = Some(
                serde_json::json!({"userType": "contractor", "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"endDate": "2999-01-01"}}),
            );
        });
        assert!(w.run().is_empty());
    }

    #[test]
    fn silent_feed_only_when_configured_and_past_its_interval() {
        let mut w = World::new();
        w.feeds.insert(
            "intune".into(),
            FeedSeen {
                last_accepted_ms: NOW - 7_200_000,
                last_event_id: "intune:1".into(),
                events: 1,
            },
        );
        assert!(w.run().is_empty());
        w.cfg.feed_intervals.insert("intune".into(), 3600);
        let f = w.run();
        assert_eq!(f[0].kind, FindingKind::FeedSilent);
        assert_eq!(f[0].evidence.event_ids, vec!["intune:1".to_owned()]);
        w.cfg.feed_intervals.insert("intune".into(), 10_000);
        assert!(w.run().is_empty());
    }
}
