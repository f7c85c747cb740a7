//! The access picture: per subject its status and kind, devices with their
//! posture, groups and entitlements, live sessions, tokens seen and the last
//! decision per route; the findings; feed health with the control-window
//! distribution. Rendered as JSON, CSV or a text table. Filters narrow it;
//! a filter that matches nothing gives an empty picture, never an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Access;
use super::findings::{self, Finding, FindingKind, Inputs, SubjectKind};
use super::memory::{RouteRow, TokenRow};
use crate::config::Config;
use crate::posture::Posture;
use crate::posture::journal::LoggedEvent;
use crate::posture::model::{Identity, IdentityStatus, compliance_name, lifecycle_name};

/// Most records whose history is read for evidence in one report.
pub const MAX_EVIDENCE_RECORDS: usize = 1024;
/// Events read per record for evidence.
pub const EVIDENCE_EVENTS: usize = 20;

/// What to narrow the picture to; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// A subject (or one of its aliases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// A device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// A route name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A finding kind (`leaver_access`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// JSON (the default).
    #[default]
    Json,
    /// CSV, one line per subject and route.
    Csv,
    /// A text table for a terminal.
    Table,
}

impl Format {
    /// The format named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "csv" => Some(Self::Csv),
            "table" => Some(Self::Table),
            _ => None,
        }
    }
}

impl Filter {
    /// Parses `subject=…&device=…&route=…&finding=…[&format=…]`; unknown
    /// parameters are refused (a typo must not widen the picture).
    pub fn parse_query(q: &str) -> Result<(Self, Format), String> {
        let mut f = Self::default();
        let mut format = Format::Json;
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            let v = v.into_owned();
            match &*k {
                "subject" => f.subject = Some(v),
                "device" => f.device = Some(v),
                "route" => f.route = Some(v),
                "finding" => f.finding = Some(v),
                "format" => {
                    format = Format::parse(&v)
                        .ok_or_else(|| format!("format `{v}` is not json, csv or table"))?;
                }
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        Ok((f, format))
    }

    /// The query string for this filter (the CLI sends it).
    pub fn to_query(&self, format: &str) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("subject", &self.subject),
            ("device", &self.device),
            ("route", &self.route),
            ("finding", &self.finding),
        ] {
            if let Some(v) = v {
                s.append_pair(k, v);
            }
        }
        s.append_pair("format", format);
        s.finish()
    }
}

/// A device as the picture shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// `known` false when the snapshot has no record of it.
    pub known: bool,
    /// Lifecycle.
    pub lifecycle: String,
    /// Compliance.
    pub compliance: String,
    /// Compromised.
    pub compromised: bool,
    /// Ownership.
    pub ownership: String,
    /// Managing MDM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_source: Option<String>,
    /// Last MDM check-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_in: Option<String>,
}

/// A live browser session (by a short hash of its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// First 16 hex digits of the session id hash.
    pub id: String,
    /// Device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Binding.
    pub binding: String,
    /// Created.
    pub created: String,
    /// Last seen (as stored).
    pub last_seen: String,
    /// Absolute expiry.
    pub expires: String,
}

/// One subject in the picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectView {
    /// Subject.
    pub subject: String,
    /// `person`, `contractor` or `workload`.
    pub kind: String,
    /// `active`, `suspended`, `terminated`, or `unknown` (seen only in requests).
    pub status: String,
    /// Department.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Entitlements.
    pub entitlements: Vec<String>,
    /// Accountable owner (workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// End date (contractors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<String>,
    /// Devices (assigned, or seen in its requests) with their posture.
    pub devices: Vec<DeviceView>,
    /// Live browser sessions.
    pub sessions: Vec<SessionView>,
    /// Tokens seen.
    pub tokens: Vec<TokenRow>,
    /// Last decision per route (and device).
    pub routes: Vec<RouteRow>,
    /// Kinds of the findings about it.
    pub findings: Vec<String>,
}

/// One control-window histogram bucket (cumulative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowBucket {
    /// Upper bound, seconds (`inf` as `f64::MAX`).
    pub le: f64,
    /// Observations at or below it.
    pub count: u64,
}

/// One feed's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedHealth {
    /// Feed name.
    pub feed: String,
    /// When its newest event was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at: Option<String>,
    /// That event's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<String>,
    /// Events in the log.
    pub events: u64,
    /// `[access.feed_intervals]` for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_interval_s: Option<u64>,
    /// Silent beyond its expected interval.
    pub silent: bool,
    /// Control-window distribution (accept → first decision), cumulative buckets.
    pub control_window: Vec<WindowBucket>,
    /// Control windows observed.
    pub control_window_count: u64,
    /// Sum of the observed windows, seconds.
    pub control_window_sum_s: f64,
}

/// Size of the access memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Route rows held.
    pub route_rows: usize,
    /// Tokens held.
    pub tokens: usize,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessReport {
    /// When it was computed.
    pub generated_at: String,
    /// Snapshot version it was computed on.
    pub snapshot_version: u64,
    /// The filter applied.
    pub filter: Filter,
    /// Subjects.
    pub subjects: Vec<SubjectView>,
    /// Findings, most severe first.
    pub findings: Vec<Finding>,
    /// Feed health.
    pub feeds: Vec<FeedHealth>,
    /// Access-memory size.
    pub memory: MemoryStats,
}

fn status_name(s: IdentityStatus) -> &'static str {
    match s {
        IdentityStatus::Active => "active",
        IdentityStatus::Suspended => "suspended",
        IdentityStatus::Terminated => "terminated",
    }
}

fn ownership_name(o: crate::posture::model::Ownership) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Parses the control-window histogram out of the metrics text, per feed.
pub fn control_windows(metrics_text: &str) -> BTreeMap<String, (Vec<WindowBucket>, u64, f64)> {
    let mut buckets: BTreeMap<String, BTreeMap<u64, (f64, u64)>> = BTreeMap::new();
    let mut totals: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for line in metrics_text.lines() {
        let Some(rest) = line.strip_prefix("portcullis_control_window_seconds_") else {
            continue;
        };
        let Some((name_labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = name_labels.split_once('{') else {
            continue;
        };
        let label = |k: &str| -> Option<&str> {
            let start = labels.find(&format!("{k}=\""))? + k.len() + 2;
            let end = labels[start..].find('"')? + start;
            Some(&labels[start..end])
        };
        let Some(feed) = label("feed") else { continue };
        match name {
            "bucket" => {
                let (Some(le), Ok(n)) = (label("le"), value.parse::<u64>()) else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::MAX
                } else {
                    le.parse::<f64>().unwrap_or(f64::MAX)
                };
                let e = buckets
                    .entry(feed.to_owned())
                    .or_default()
                    .entry(le.to_bits())
                    .or_insert((le, 0));
                e.1 += n;
            }
            "count" => {
                totals.entry(feed.to_owned()).or_default().0 += value.parse::<u64>().unwrap_or(0);
            }
            "sum" => {
                totals.entry(feed.to_owned()).or_default().1 += value.parse::<f64>().unwrap_or(0.0);
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for (feed, b) in buckets {
        let mut v: Vec<WindowBucket> = b
            .into_values()
            .map(|(le, count)| WindowBucket { le, count })
            .collect();
        v.sort_by(|a, b| a.le.total_cmp(&b.le));
        let (n, s) = totals.get(&feed).copied().unwrap_or_default();
        out.insert(feed, (v, n, s));
    }
    out
}

/// Computes the picture now.
pub async fn build(
    access: &Access,
    posture: &Posture,
    config: &Config,
    metrics_text: &str,
    filter: &Filter,
) -> AccessReport {
    access.refresh().await;
    let snap = posture.snapshot();
    let version = snap.version();
    let identities = snap.identities();
    let devices = snap.devices();
    let sessions = snap.sessions_where(|_| true);
    let routes = access.memory.route_rows();
    let tokens = access.memory.token_rows();
    let feeds = access.memory.feeds();
    let cfg = &config.access;
    let sensitivity = config
        .routes
        .iter()
        .map(|r| (r.name.clone(), r.sensitivity))
        .collect::<HashMap<_, _>>();

    // Evidence: the history of the records in a state a finding can be about.
    let mut keys: BTreeSet<String> = BTreeSet::new();
    for i in &identities {
        let k = findings::kind_of(i, cfg);
        if i.status != IdentityStatus::Active
            || k != SubjectKind::Person
            || i.field_ms.contains_key("groups")
            || i.field_ms.contains_key("entitlements")
        {
            keys.insert(format!("subject:{}", i.subject));
        }
    }
    for d in &devices {
        if d.lifecycle.is_dead()
            || d.compromised
            || d.compliance == crate::posture::model::Compliance::NonCompliant
        {
            keys.insert(format!("device:{}", d.id));
        }
    }
    let mut history: HashMap<String, Vec<LoggedEvent>> = HashMap::new();
    for k in keys.into_iter().take(MAX_EVIDENCE_RECORDS) {
        if let Ok(h) = posture.history(&k, EVIDENCE_EVENTS).await {
            history.insert(k, h);
        }
    }
    let now_ms = crate::util::now_unix_ms();
    let all = findings::findings(&Inputs {
        identities: &identities,
        devices: &devices,
        sessions: &sessions,
        routes: &routes,
        tokens: &tokens,
        feeds: &feeds,
        history: &history,
        sensitivity: &sensitivity,
        started_ms: access.memory.started_ms,
        now_ms,
        config: cfg,
    });

    let windows = control_windows(metrics_text);
    let mut feed_names: BTreeSet<String> = feeds.keys().cloned().collect();
    feed_names.extend(cfg.feed_intervals.keys().cloned());
    feed_names.extend(windows.keys().cloned());
    let feed_health = feed_names
        .into_iter()
        .map(|name| {
            let seen = feeds.get(&name);
            let (control_window, control_window_count, control_window_sum_s) =
                windows.get(&name).cloned().unwrap_or_default();
            FeedHealth {
                silent: all
                    .iter()
                    .any(|f| f.kind == FindingKind::FeedSilent && f.feed.as_deref() == Some(&name)),
                last_event_at: seen.map(|f| crate::util::rfc3339(f.last_accepted_ms, true)),
                last_event_id: seen.map(|f| f.last_event_id.clone()),
                events: seen.map_or(0, |f| f.events),
                expected_interval_s: cfg.feed_intervals.get(&name).copied(),
                control_window,
                control_window_count,
                control_window_sum_s,
                feed: name,
            }
        })
        .collect();

    let views = subject_views(
        snap,
        &identities,
        &sessions,
        &routes,
        &tokens,
        &all,
        now_ms,
        config,
    );
    let (subjects, findings) = apply(filter, snap, views, all);
    AccessReport {
        generated_at: crate::util::rfc3339(now_ms, true),
        snapshot_version: version,
        filter: filter.clone(),
        subjects,
        findings,
        feeds: feed_health,
        memory: MemoryStats {
            route_rows: routes.len(),
            tokens: tokens.len(),
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn subject_views(
    snap: &crate::posture::Snapshot,
    identities: &[Arc<Identity>],
    sessions: &[Arc<crate::posture::session::SessionRecord>],
    routes: &[RouteRow],
    tokens: &[TokenRow],
    all: &[Finding],
    now_ms: u64,
    config: &Config,
) -> Vec<SubjectView> {
    let cfg = &config.access;
    let canonical = |s: &str| snap.resolve_subject(s).unwrap_or_else(|| s.to_owned());
    let mut rows: HashMap<String, Vec<RouteRow>> = HashMap::new();
    for r in routes {
        rows.entry(canonical(&r.subject))
            .or_default()
            .push(r.clone());
    }
    let mut toks: HashMap<String, Vec<TokenRow>> = HashMap::new();
    for t in tokens {
        toks.entry(canonical(&t.subject))
            .or_default()
            .push(t.clone());
    }
    let now_s = now_ms / 1000;
    let mut sess: HashMap<String, Vec<SessionView>> = HashMap::new();
    for s in sessions.iter().filter(|s| s.live_at(now_s, s.last_seen_s)) {
        sess.entry(canonical(&s.subject))
            .or_default()
            .push(SessionView {
                id: s.id_hash.chars().take(16).collect(),
                device: s.device.clone(),
                binding: s.binding.as_str().into(),
                created: crate::util::rfc3339(s.created_s * 1000, false),
                last_seen: crate::util::rfc3339(s.last_seen_s * 1000, false),
                expires: crate::util::rfc3339(s.expires_s * 1000, false),
            });
    }
    let device_view = |id: &str| match snap.device(id) {
        Some(d) => DeviceView {
            id: id.to_owned(),
            known: true,
            lifecycle: lifecycle_name(d.lifecycle).into(),
            compliance: compliance_name(d.compliance).into(),
            compromised: d.compromised,
            ownership: ownership_name(d.ownership),
            management_source: d.management_source.clone(),
            last_check_in: d.last_check_in_ms.map(|m| crate::util::rfc3339(m, false)),
        },
        None => DeviceView {
            id: id.to_owned(),
            known: false,
            lifecycle: "unknown".into(),
            compliance: "unknown".into(),
            compromised: false,
            ownership: "unknown".into(),
            management_source: None,
            last_check_in: None,
        },
    };
    let finding_kinds = |s: &str| -> Vec<String> {
        all.iter()
            .filter(|f| f.subject.as_deref() == Some(s))
            .map(|f| f.kind.as_str().to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut sorted: Vec<&Arc<Identity>> = identities.iter().collect();
    sorted.sort_by(|a, b| a.subject.cmp(&b.subject));
    for i in sorted {
        seen.insert(i.subject.clone());
        let r = rows.remove(&i.subject).unwrap_or_default();
        let t = toks.remove(&i.subject).unwrap_or_default();
        let mut devs: BTreeSet<String> = i.devices.iter().cloned().collect();
        devs.extend(r.iter().filter_map(|x| x.device.clone()));
        devs.extend(t.iter().filter_map(|x| x.device.clone()));
        let kind = findings::kind_of(i, cfg);
        out.push(SubjectView {
            subject: i.subject.clone(),
            kind: kind.as_str().into(),
            status: status_name(i.status).into(),
            department: i.department.clone(),
            groups: i.groups.clone(),
            entitlements: i.entitlements.clone(),
            owner: findings::owner_of(i, cfg).filter(|_| kind == SubjectKind::Workload),
            end_date: findings::end_date_ms(i, cfg).map(|m| crate::util::rfc3339(m, false)),
            devices: devs.iter().map(|d| device_view(d)).collect(),
            sessions: sess.remove(&i.subject).unwrap_or_default(),
            tokens: t,
            routes: r,
            findings: finding_kinds(&i.subject),
        });
    }
    // Subjects seen in requests that no feed ever described.
    let mut rest: BTreeSet<String> = rows.keys().cloned().collect();
    rest.extend(toks.keys().cloned());
    for s in rest.into_iter().filter(|s| !seen.contains(s)) {
        let r = rows.remove(&s).unwrap_or_default();
        let t = toks.remove(&s).unwrap_or_default();
        let mut devs: BTreeSet<String> = r.iter().filter_map(|x| x.device.clone()).collect();
        devs.extend(t.iter().filter_map(|x| x.device.clone()));
        let workload = r.iter().any(|x| x.workload) || t.iter().any(|x| x.workload);
        out.push(SubjectView {
            kind: if workload { "workload" } else { "person" }.into(),
            status: "unknown".into(),
            department: None,
            groups: Vec::new(),
            entitlements: Vec::new(),
            owner: None,
            end_date: None,
            devices: devs.iter().map(|d| device_view(d)).collect(),
            sessions: sess.remove(&s).unwrap_or_default(),
            tokens: t,
            routes: r,
            findings: finding_kinds(&s),
            subject: s,
        });
    }
    out
}

/// Narrows the views and findings to the filter.
fn apply(
    f: &Filter,
    snap: &crate::posture::Snapshot,
    mut views: Vec<SubjectView>,
    mut all: Vec<Finding>,
) -> (Vec<SubjectView>, Vec<Finding>) {
    let subject = f
        .subject
        .as_deref()
        .map(|s| snap.resolve_subject(s).unwrap_or_else(|| s.to_owned()));
    if let Some(s) = &subject {
        views.retain(|v| &v.subject == s);
        all.retain(|x| x.subject.as_ref() == Some(s));
    }
    if let Some(d) = &f.device {
        for v in &mut views {
            v.routes.retain(|r| r.device.as_ref() == Some(d));
            v.tokens.retain(|t| t.device.as_ref() == Some(d));
            v.sessions.retain(|s| s.device.as_ref() == Some(d));
        }
        views.retain(|v| v.devices.iter().any(|x| &x.id == d));
        for v in &mut views {
            v.devices.retain(|x| &x.id == d);
        }
        all.retain(|x| x.device.as_ref() == Some(d));
    }
    if let Some(r) = &f.route {
        views.retain(|v| v.routes.iter().any(|x| &x.route == r));
        for v in &mut views {
            v.routes.retain(|x| &x.route == r);
        }
        all.retain(|x| x.routes.contains(r));
    }
    if let Some(k) = &f.finding {
        views.retain(|v| v.findings.contains(k));
        all.retain(|x| x.kind.as_str() == k);
    }
    (views, all)
}

/// One CSV field (RFC 4180 quoting; a leading `=`, `+`, `-`, `@` is
/// prefixed with `'` so a spreadsheet never runs it as a formula).
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The CSV header line.
pub const CSV_HEADER: &str = "subject,kind,status,device,lifecycle,compliance,route,decision,last_seen,last_request,requests,groups,entitlements,live_sessions,tokens,findings";

impl AccessReport {
    /// CSV: one line per subject and route row (one line for a subject with none).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push_str("\r\n");
        for v in &self.subjects {
            let common_tail = [
                v.groups.join(";"),
                v.entitlements.join(";"),
                v.sessions.len().to_string(),
                v.tokens.len().to_string(),
                v.findings.join(";"),
            ];
            let mut lines: Vec<[String; 7]> = v
                .routes
                .iter()
                .map(|r| {
                    let d = r
                        .device
                        .as_ref()
                        .and_then(|d| v.devices.iter().find(|x| &x.id == d));
                    [
                        r.device.clone().unwrap_or_default(),
                        d.map_or(String::new(), |d| d.lifecycle.clone()),
                        d.map_or(String::new(), |d| d.compliance.clone()),
                        r.route.clone(),
                        r.decision.clone(),
                        crate::util::rfc3339(r.last_ms, true),
                        r.last_request.clone(),
                    ]
                })
                .collect();
            let counts: Vec<String> = v.routes.iter().map(|r| r.count.to_string()).collect();
            if lines.is_empty() {
                lines.push(Default::default());
            }
            for (n, l) in lines.iter().enumerate() {
                let mut fields: Vec<String> =
                    vec![v.subject.clone(), v.kind.clone(), v.status.clone()];
                fields.extend(l.iter().take(6).cloned());
                fields.push(l[6].clone());
                fields.push(counts.get(n).cloned().unwrap_or_default());
                fields.extend(common_tail.iter().cloned());
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                out.push_str(&line.join(","));
                out.push_str("\r\n");
            }
        }
        out
    }

    /// A text table for a terminal: subjects, then findings, then feeds.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![vec![
            "SUBJECT".into(),
            "KIND".into(),
            "STATUS".into(),
            "DEVICE".into(),
            "POSTURE".into(),
            "ROUTE".into(),
            "LAST DECISION".into(),
            "LAST SEEN".into(),
            "SESSIONS".into(),
            "TOKENS".into(),
            "FINDINGS".into(),
        ]];
        for v in &self.subjects {
            let posture = |d: Option<&String>| {
                d.and_then(|d| v.devices.iter().find(|x| &x.id == d))
                    .map_or(String::new(), |d| {
                        format!("{}/{}", d.lifecycle, d.compliance)
                    })
            };
            let base = |dev: Option<&String>, route: &str, dec: &str, seen: String| {
                vec![
                    v.subject.clone(),
                    v.kind.clone(),
                    v.status.clone(),
                    dev.cloned().unwrap_or_else(|| "-".into()),
                    posture(dev),
                    route.to_owned(),
                    dec.to_owned(),
                    seen,
                    v.sessions.len().to_string(),
                    v.tokens.len().to_string(),
                    v.findings.join(","),
                ]
            };
            if v.routes.is_empty() {
                rows.push(base(v.devices.first().map(|d| &d.id), "-", "-", "-".into()));
            }
            for r in &v.routes {
                rows.push(base(
                    r.device.as_ref(),
                    &r.route,
                    &r.decision,
                    crate::util::rfc3339(r.last_ms, false),
                ));
            }
        }
        let mut out = table(&rows);
        let _ = writeln!(out, "\nFINDINGS ({})", self.findings.len());
        let mut frows = vec![vec![
            "SEVERITY".to_owned(),
            "KIND".into(),
            "SUMMARY".into(),
            "FIX".into(),
        ]];
        for f in &self.findings {
            frows.push(vec![
                f.severity.as_str().into(),
                f.kind.as_str().into(),
                f.summary.clone(),
                f.fix.clone(),
            ]);
        }
        out.push_str(&table(&frows));
        let _ = writeln!(out, "\nFEEDS");
        let mut hrows = vec![vec![
            "FEED".to_owned(),
            "LAST EVENT".into(),
            "EVENTS".into(),
            "EXPECTED".into(),
            "SILENT".into(),
            "WINDOWS".into(),
        ]];
        for h in &self.feeds {
            hrows.push(vec![
                h.feed.clone(),
                h.last_event_at.clone().unwrap_or_else(|| "never".into()),
                h.events.to_string(),
                h.expected_interval_s
                    .map_or("-".into(), |s| format!("{s} s")),
                if h.silent { "yes" } else { "no" }.into(),
                h.control_window_count.to_string(),
            ]);
        }
        out.push_str(&table(&hrows));
        out
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_filters_and_refuses_unknown_parameters() {
        let (f, fmt) = Filter::parse_query("subject=a%40b&route=app&format=csv").unwrap();
        assert_eq!(f.subject.as_deref(), Some("a@b"));
        assert_eq!(f.route.as_deref(), Some("app"));
        assert_eq!(fmt, Format::Csv);
        assert!(Filter::parse_query("subjct=x").is_err());
        assert!(Filter::parse_query("format=xml").is_err());
        let q = f.to_query("json");
        assert_eq!(Filter::parse_query(&q).unwrap().0, f);
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn reads_the_control_window_histogram_per_feed() {
        let text = "portcullis_control_window_seconds_bucket{feed=\"scim\",kind=\"a\",le=\"0.01\"} 2\n\
portcullis_control_window_seconds_bucket{feed=\"scim\",kind=\"b\",le=\"0.01\"} 1\n\
portcullis_control_window_seconds_bucket{feed=\"scim\",kind=\"a\",le=\"+Inf\"} 3\n\
portcullis_control_window_seconds_count{feed=\"scim\",kind=\"a\"} 3\n\
portcullis_control_window_seconds_sum{feed=\"scim\",kind=\"a\"} 0.5\n";
        let w = control_windows(text);
        let (b, n, s) = &w["scim"];
        assert_eq!(b[0].count, 3);
        assert_eq!(b[1].le, f64::MAX);
        assert_eq!(*n, 3);
        assert!((s - 0.5).abs() < 1e-9);
    }
}
