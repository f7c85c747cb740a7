//! Jamf Pro webhooks (`POST /mdm/jamf`), mapped into device events.
//!
//! Jamf signs nothing: the only proof of origin is the exact `Authorization`
//! header value configured on the webhook (`feeds.jamf.authorization`),
//! compared in constant time. Every webhook carries
//! `{"webhook": {"id", "webhookEvent", "eventTimestamp", …}, "event": {…}}`;
//! `eventTimestamp` (ms or s, by magnitude) is the origin time, so an older
//! webhook never overwrites newer state. Each device a webhook touches becomes
//! one event with the stable id
//! `jamf:<webhook.id>:<eventTimestamp ms>:<event name>[:<group>:<added|removed>]:<device>`,
//! so a replayed webhook is applied once. The answer (202 with one outcome per
//! device) comes only after the durable write. The mapping to the canonical
//! model is documented in `docs/mdm.md`.
//!
//! A webhook dated beyond `feeds.max_future_skew_s` is refused whole. With
//! `[feeds.jamf.api]` set, a webhook that raises trust (back to compliant, no
//! longer compromised, out of lost mode, enrolled) is confirmed by reading
//! the device from the Jamf Pro API first (`jamf_api`); when the API
//! disagrees or cannot be reached the trust-raising fields are dropped (fail
//! closed) and the rest still applies. `ComputerAdded` and
//! `MobileDeviceEnrolled` are re-enrolments, and so is a `DisableLostMode`
//! the API confirms: the only Jamf events that clear a sticky lost or wiped.
//!
//! This room never changes state on bad input: authentication, size, JSON
//! shape and every event's bounds are checked before the first write.

use http::{Request, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use super::{AdminResponse, BodyError, FeedContext, error, json, read_body};
use crate::config::JamfConfig;
use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};
use crate::posture::model::{Compliance, Device, Lifecycle, RevocationTarget};

/// Most devices one webhook may name (a smart-group change lists every
/// member that moved); a larger one is refused whole.
pub const MAX_DEVICES_PER_WEBHOOK: usize = 10_000;
/// Events handed to one `Posture::ingest` call.
const INGEST_CHUNK: usize = 1000;
/// Most devices one webhook gets confirmed through the Jamf Pro API; trust
/// raised for more is not applied (fail closed).
pub const MAX_CONFIRMATIONS: usize = 100;

/// The 22 documented event names (lowercase), for bounded metric labels.
const KNOWN_EVENTS: &[&str] = &[
    "computeradded",
    "computercheckin",
    "computerinventorycompleted",
    "computerpatchpolicycompleted",
    "computerpolicyfinished",
    "computerpushcapabilitychanged",
    "mobiledevicecheckin",
    "mobiledevicecommandcompleted",
    "mobiledeviceenrolled",
    "mobiledeviceinventorycompleted",
    "mobiledevicepushsent",
    "mobiledeviceunenrolled",
    "deviceaddedtodep",
    "smartgroupcomputermembershipchange",
    "smartgroupmobiledevicemembershipchange",
    "smartgroupusermembershipchange",
    "jssstartup",
    "jssshutdown",
    "patchsoftwaretitleupdated",
    "pushsent",
    "restapioperation",
    "scepchallenge",
];

/// A Jamf id: a number, or a string in some payloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Id {
    Num(u64),
    Text(String),
}

impl Id {
    fn text(&self) -> Option<String> {
        match self {
            Id::Num(n) => Some(n.to_string()),
            Id::Text(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
        }
    }

    fn num(&self) -> Option<u64> {
        match self {
            Id::Num(n) => Some(*n),
            Id::Text(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    webhook: Meta,
    #[serde(default)]
    event: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    id: Option<Id>,
    #[serde(default)]
    webhook_event: Option<String>,
    #[serde(default)]
    event_timestamp: Option<u64>,
}

/// The device fields portcullis reads from a computer or mobile-device object.
/// Unknown fields are ignored: Jamf adds fields between versions.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JamfDevice {
    #[serde(rename = "jssID", default)]
    jss_id: Option<Id>,
    #[serde(default)]
    udid: Option<String>,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    os_version: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    email_address: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    model_display: Option<String>,
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    mdm_command: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupChange {
    jssid: Id,
    #[serde(default)]
    group_added_devices: Option<Vec<JamfDevice>>,
    #[serde(default)]
    group_added_devices_ids: Option<Vec<Id>>,
    #[serde(default)]
    group_removed_devices: Option<Vec<JamfDevice>>,
    #[serde(default)]
    group_removed_devices_ids: Option<Vec<Id>>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Computer (macOS) or mobile device (iOS, iPadOS, tvOS): Jamf keeps the two
/// id spaces apart, so external ids name the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Computer,
    Mobile,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Computer => "computer",
            Kind::Mobile => "mobile",
        }
    }
}

impl JamfDevice {
    fn jss(&self) -> Option<String> {
        self.jss_id.as_ref().and_then(Id::text)
    }

    /// The canonical id under the configured `device_id_field`.
    fn canonical(&self, field: &str) -> Option<String> {
        match field {
            "serialNumber" => nonempty(&self.serial_number).map(str::to_owned),
            "jssID" => self.jss(),
            _ => nonempty(&self.udid).map(str::to_owned),
        }
    }

    /// Every other id, as `jamf:…` external ids.
    fn external_ids(&self, kind: Kind, field: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(j) = self.jss() {
            out.push(jss_external(kind, &j));
        }
        if field != "serialNumber"
            && let Some(s) = nonempty(&self.serial_number)
        {
            out.push(format!("jamf:serial:{s}"));
        }
        if field != "udid"
            && let Some(u) = nonempty(&self.udid)
        {
            out.push(format!("jamf:udid:{u}"));
        }
        out
    }

    /// `macos` for computers; for mobile devices the model decides between
    /// `ios`, `ipados` and `tvos`, and no model leaves the platform as it is.
    fn platform(&self, kind: Kind) -> Option<&'static str> {
        if kind == Kind::Computer {
            return Some("macos");
        }
        let hint = [&self.model_display, &self.model, &self.product]
            .into_iter()
            .filter_map(|s| nonempty(s))
            .collect::<Vec<_>>()
            .join(" ")
            .to_ascii_lowercase();
        if hint.is_empty() {
            None
        } else if hint.contains("ipad") {
            Some("ipados")
        } else if hint.contains("apple tv") || hint.contains("appletv") {
            Some("tvos")
        } else {
            Some("ios")
        }
    }

    fn subjects(&self) -> Option<Vec<String>> {
        let mut v: Vec<String> = Vec::new();
        for s in [nonempty(&self.email_address), nonempty(&self.username)]
            .into_iter()
            .flatten()
        {
            if !v.iter().any(|x| x.eq_ignore_ascii_case(s)) {
                v.push(s.to_owned());
            }
        }
        (!v.is_empty()).then_some(v)
    }
}

fn jss_external(kind: Kind, jss: &str) -> String {
    format!("jamf:jss:{}:{jss}", kind.as_str())
}

/// A refusal before anything was written.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    kind: &'static str,
    message: String,
}

fn bad(kind: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        kind,
        message: message.into(),
    }
}

/// One device-level effect of a webhook, before it becomes an event.
struct Effect {
    device: String,
    /// Distinguishes the effects of one webhook (group + direction).
    part: Option<String>,
    kind: &'static str,
    patch: DevicePatch,
    revoke: bool,
}

/// What a webhook maps to.
enum Mapped {
    /// Valid, but nothing to change; the reason goes back to Jamf.
    Ignored(&'static str),
    /// Device effects, and the group members that could not be resolved.
    Effects(Vec<Effect>, Vec<String>),
}

/// Everything a mapping needs from the envelope.
struct Webhook<'a> {
    cfg: &'a JamfConfig,
    name: String,
    origin_ms: u64,
    id: String,
}

impl Webhook<'_> {
    fn event_id(&self, e: &Effect) -> String {
        match &e.part {
            Some(p) => format!(
                "jamf:{}:{}:{}:{p}:{}",
                self.id, self.origin_ms, self.name, e.device
            ),
            None => format!(
                "jamf:{}:{}:{}:{}",
                self.id, self.origin_ms, self.name, e.device
            ),
        }
    }

    fn to_event(&self, e: Effect) -> PostureEvent {
        let id = self.event_id(&e);
        let mut changes = Vec::with_capacity(2);
        let device = e.device;
        changes.push(Change::Device {
            id: device.clone(),
            patch: e.patch,
        });
        if e.revoke {
            changes.push(Change::Revoke {
                target: RevocationTarget::Device,
                key: device,
            });
        }
        PostureEvent {
            id,
            feed: Feed::Jamf,
            kind: e.kind.into(),
            origin_ms: self.origin_ms,
            changes,
        }
    }
}

/// The base patch every Jamf device event carries.
fn base_patch(d: &JamfDevice, kind: Kind, field: &str) -> DevicePatch {
    DevicePatch {
        platform: d.platform(kind).map(str::to_owned),
        management_source: Some("jamf".into()),
        add_external_ids: d.external_ids(kind, field),
        ..DevicePatch::default()
    }
}

/// Parses the device object of a single-device event (`event`, or
/// `event.computer` for computer check-ins and policy events).
fn single_device(event: Option<&Value>) -> Result<JamfDevice, Refusal> {
    let Some(ev) = event.filter(|v| v.is_object()) else {
        return Err(bad("jamf.invalid", "`event` must be an object"));
    };
    let obj = match ev.get("computer") {
        Some(c) if c.is_object() => c,
        _ => ev,
    };
    let mut d: JamfDevice = serde_json::from_value(obj.clone())
        .map_err(|e| bad("jamf.invalid", format!("`event`: {e}")))?;
    // 11.14+ puts mdmCommand beside the device fields; keep it either way.
    if d.mdm_command.is_none()
        && let Some(c) = ev.get("mdmCommand").and_then(Value::as_str)
    {
        d.mdm_command = Some(c.to_owned());
    }
    Ok(d)
}

fn device_effect(
    w: &Webhook<'_>,
    event: Option<&Value>,
    kind: Kind,
    build: impl FnOnce(&JamfDevice, DevicePatch) -> Option<(&'static str, DevicePatch, bool)>,
) -> Result<Mapped, Refusal> {
    let d = single_device(event)?;
    let field = w.cfg.device_id_field.as_str();
    let device = d.canonical(field).ok_or_else(|| {
        bad(
            "jamf.invalid",
            format!("`event.{field}` is required (feeds.jamf.device_id_field)"),
        )
    })?;
    let base = base_patch(&d, kind, field);
    Ok(match build(&d, base) {
        Some((label, patch, revoke)) => Mapped::Effects(
            vec![Effect {
                device,
                part: None,
                kind: label,
                patch,
                revoke,
            }],
            Vec::new(),
        ),
        None => Mapped::Ignored("no posture change for this command"),
    })
}

/// What a configured smart group means for a device entering (`added`) or
/// leaving it. `None` when the group is not configured.
fn group_patch(cfg: &JamfConfig, group: u64, added: bool) -> Option<(DevicePatch, bool)> {
    let mut p = DevicePatch::default();
    let mut revoke = false;
    let mut hit = false;
    if cfg.noncompliant_groups.contains(&group) {
        hit = true;
        p.compliance = Some(if added {
            Compliance::NonCompliant
        } else {
            Compliance::Compliant
        });
    }
    if cfg.patch_groups.contains(&group) {
        hit = true;
        p.patch_behind = Some(added);
    }
    if cfg.compromised_groups.contains(&group) {
        hit = true;
        p.compromised = Some(added);
    }
    if cfg.lost_groups.contains(&group) {
        hit = true;
        p.lifecycle = Some(if added {
            Lifecycle::Lost
        } else {
            Lifecycle::Enrolled
        });
        revoke = added;
    }
    hit.then_some((p, revoke))
}

fn smart_group(
    w: &Webhook<'_>,
    event: Option<&Value>,
    kind: Kind,
    posture: &crate::posture::Posture,
) -> Result<Mapped, Refusal> {
    let Some(ev) = event.filter(|v| v.is_object()) else {
        return Err(bad("jamf.invalid", "`event` must be an object"));
    };
    let g: GroupChange = serde_json::from_value(ev.clone())
        .map_err(|e| bad("jamf.invalid", format!("`event`: {e}")))?;
    let group = g
        .jssid
        .num()
        .ok_or_else(|| bad("jamf.invalid", "`event.jssid` must be a group id"))?;
    let field = w.cfg.device_id_field.as_str();
    let mut effects = Vec::new();
    let mut unresolved = Vec::new();
    let sides = [
        (true, g.group_added_devices, g.group_added_devices_ids),
        (false, g.group_removed_devices, g.group_removed_devices_ids),
    ];
    let total: usize = sides
        .iter()
        .map(|(_, d, i)| d.as_ref().map_or(0, Vec::len) + i.as_ref().map_or(0, Vec::len))
        .sum();
    if total > MAX_DEVICES_PER_WEBHOOK {
        return Err(bad(
            "jamf.too-many-devices",
            format!("a webhook may name at most {MAX_DEVICES_PER_WEBHOOK} devices"),
        ));
    }
    if group_patch(w.cfg, group, true).is_none() {
        return Ok(Mapped::Ignored("smart group is not configured"));
    }
    for (added, devices, ids) in sides {
        let Some((patch, revoke)) = group_patch(w.cfg, group, added) else {
            continue;
        };
        let part = format!("{group}:{}", if added { "added" } else { "removed" });
        let mut done: Vec<String> = Vec::new();
        let mut push = |device: String, base: DevicePatch| {
            if effects
                .iter()
                .any(|e: &Effect| e.device == device && e.part.as_deref() == Some(part.as_str()))
            {
                return;
            }
            let mut p = patch.clone();
            p.platform = base.platform;
            p.management_source = base.management_source;
            p.add_external_ids = base.add_external_ids;
            effects.push(Effect {
                device,
                part: Some(part.clone()),
                kind: "jamf.smart-group",
                patch: p,
                revoke,
            });
        };
        for d in devices.unwrap_or_default() {
            let jss = d.jss();
            let id = d.canonical(field).or_else(|| {
                jss.as_ref().and_then(|j| {
                    posture
                        .snapshot()
                        .device_by_external_id(&jss_external(kind, j))
                })
            });
            match id {
                Some(id) => push(id, base_patch(&d, kind, field)),
                None => unresolved.push(jss.map_or_else(
                    || "(device without ids)".to_owned(),
                    |j| format!("jss:{}:{j}", kind.as_str()),
                )),
            }
            if let Some(j) = d.jss() {
                done.push(j);
            }
        }
        for id in ids.unwrap_or_default() {
            let Some(j) = id.text() else { continue };
            if done.contains(&j) {
                continue;
            }
            done.push(j.clone());
            let device = if field == "jssID" {
                Some(j.clone())
            } else {
                posture
                    .snapshot()
                    .device_by_external_id(&jss_external(kind, &j))
            };
            match device {
                Some(dev) => push(
                    dev,
                    DevicePatch {
                        platform: (kind == Kind::Computer).then(|| "macos".to_owned()),
                        management_source: Some("jamf".into()),
                        add_external_ids: vec![jss_external(kind, &j)],
                        ..DevicePatch::default()
                    },
                ),
                None => unresolved.push(format!("jss:{}:{j}", kind.as_str())),
            }
        }
    }
    Ok(Mapped::Effects(effects, unresolved))
}

fn map(
    w: &Webhook<'_>,
    event: Option<&Value>,
    posture: &crate::posture::Posture,
) -> Result<Mapped, Refusal> {
    let origin = w.origin_ms;
    match w.name.as_str() {
        "computeradded" | "mobiledeviceenrolled" => {
            let kind = if w.name == "computeradded" {
                Kind::Computer
            } else {
                Kind::Mobile
            };
            device_effect(w, event, kind, |d, mut p| {
                p.lifecycle = Some(Lifecycle::Enrolled);
                // A (re-)enrolment: clears lost / wiped set before it.
                p.reenrolled_ms = Some(origin);
                p.os_version = nonempty(&d.os_version).map(str::to_owned);
                p.subjects = d.subjects();
                if kind == Kind::Mobile {
                    // The device itself just talked to Jamf.
                    p.last_check_in_ms = Some(origin);
                }
                Some(("jamf.enrolled", p, false))
            })
        }
        "mobiledeviceunenrolled" => device_effect(w, event, Kind::Mobile, |_, mut p| {
            p.lifecycle = Some(Lifecycle::Unenrolled);
            Some(("jamf.unenrolled", p, true))
        }),
        "computercheckin" | "mobiledevicecheckin" => {
            let kind = if w.name == "computercheckin" {
                Kind::Computer
            } else {
                Kind::Mobile
            };
            device_effect(w, event, kind, |_, mut p| {
                p.last_check_in_ms = Some(origin);
                Some(("jamf.check-in", p, false))
            })
        }
        "computerinventorycompleted" | "mobiledeviceinventorycompleted" => {
            let kind = if w.name == "computerinventorycompleted" {
                Kind::Computer
            } else {
                Kind::Mobile
            };
            device_effect(w, event, kind, |d, mut p| {
                p.os_version = nonempty(&d.os_version).map(str::to_owned);
                p.subjects = d.subjects();
                p.last_check_in_ms = Some(origin);
                Some(("jamf.inventory", p, false))
            })
        }
        "smartgroupcomputermembershipchange" => smart_group(w, event, Kind::Computer, posture),
        "smartgroupmobiledevicemembershipchange" => smart_group(w, event, Kind::Mobile, posture),
        "mobiledevicecommandcompleted" => device_effect(w, event, Kind::Mobile, |d, mut p| {
            let cmd = nonempty(&d.mdm_command)?.to_ascii_lowercase();
            p.last_check_in_ms = Some(origin);
            match cmd.as_str() {
                "enablelostmode" => {
                    p.lifecycle = Some(Lifecycle::Lost);
                    Some(("jamf.lost-mode", p, true))
                }
                "erasedevice" => {
                    p.lifecycle = Some(Lifecycle::WipePending);
                    Some(("jamf.erase", p, true))
                }
                "disablelostmode" => {
                    p.lifecycle = Some(Lifecycle::Enrolled);
                    Some(("jamf.lost-mode-disabled", p, false))
                }
                _ => None,
            }
        }),
        // The payload does not say whether push became possible or
        // impossible, and the model has no "MDM channel degraded" flag:
        // lowering trust on a change that may be a recovery would be wrong.
        // Put devices without a push channel in a smart group listed in
        // `noncompliant_groups` instead (docs/mdm.md).
        "computerpushcapabilitychanged" => Ok(Mapped::Ignored(
            "push capability changes carry no direction; use a smart group",
        )),
        _ => Ok(Mapped::Ignored("event type not used for posture")),
    }
}

fn kind_label(name: &str) -> String {
    if KNOWN_EVENTS.contains(&name) {
        format!("jamf.{name}")
    } else {
        "jamf.unknown".into()
    }
}

/// True when the request carries exactly the configured `Authorization`
/// value. Digests are compared, so neither content nor length leaks.
fn authorized(req: &Request<Incoming>, expected: &str) -> bool {
    let Some(got) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    crate::util::constant_time_eq(
        &crate::util::sha256(got.as_bytes()),
        &crate::util::sha256(expected.as_bytes()),
    )
}

/// Handles `POST /mdm/jamf`.
pub async fn webhook(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let Some(cfg) = ctx.config.feeds.jamf.as_ref() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the Jamf webhook is not configured (feeds.jamf)",
        );
    };
    if req.method() != http::Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST only",
        );
    }
    if !authorized(&req, &cfg.authorization) {
        super::count(&ctx.metrics, "jamf", "jamf.unauthenticated", "rejected");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the configured Authorization header is required",
        );
    }
    let body = match read_body(req, ctx.config.feeds.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            super::count(&ctx.metrics, "jamf", "jamf.too-large", "rejected");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body is over the limit of {} bytes (feeds.max_body_bytes)",
                    ctx.config.feeds.max_body_bytes
                ),
            );
        }
        Err(BodyError::Broken) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "body not read");
        }
    };
    match handle_body(ctx, cfg, &body).await {
        Ok(r) => r,
        Err(r) => {
            // An empty kind: already counted (future-dated, by the apply path).
            if r.status != StatusCode::SERVICE_UNAVAILABLE && !r.kind.is_empty() {
                super::count(&ctx.metrics, "jamf", r.kind, "rejected");
            }
            error(r.status, r.code, r.message)
        }
    }
}

async fn handle_body(
    ctx: &FeedContext,
    cfg: &JamfConfig,
    body: &[u8],
) -> Result<AdminResponse, Refusal> {
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| bad("jamf.malformed", format!("not a Jamf webhook: {e}")))?;
    let shown = env
        .webhook
        .webhook_event
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("jamf.invalid", "`webhook.webhookEvent` is required"))?;
    let name = shown.to_ascii_lowercase();
    let id = env
        .webhook
        .id
        .as_ref()
        .and_then(Id::text)
        .filter(|s| s.len() <= 64 && !s.contains(':'))
        .ok_or_else(|| bad("jamf.invalid", "`webhook.id` is required"))?;
    let raw_ts = env.webhook.event_timestamp.ok_or_else(|| {
        bad(
            "jamf.invalid",
            "`webhook.eventTimestamp` is required (epoch ms or s)",
        )
    })?;
    let origin_ms = super::epoch_ms(raw_ts).ok_or_else(|| {
        bad(
            "jamf.invalid",
            format!("`webhook.eventTimestamp` `{raw_ts}` is not a plausible time"),
        )
    })?;
    let label = kind_label(&name);
    let shown_event = if KNOWN_EVENTS.contains(&name.as_str()) {
        shown.clone()
    } else {
        shown.chars().take(64).collect()
    };
    let w = Webhook {
        cfg,
        name,
        origin_ms,
        id,
    };
    let (effects, unresolved) = match map(&w, env.event.as_ref(), &ctx.posture)? {
        Mapped::Ignored(why) => {
            super::count(&ctx.metrics, "jamf", &label, "ignored");
            return Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "webhook_event": shown_event,
                    "outcome": "ignored",
                    "reason": why,
                }),
            ));
        }
        Mapped::Effects(e, u) => (e, u),
    };
    if !unresolved.is_empty() {
        super::count(&ctx.metrics, "jamf", "jamf.unresolved-device", "ignored");
        tracing::warn!(
            webhook_event = %shown_event,
            devices = ?unresolved,
            "jamf: group members not known to portcullis by jssID; send their inventory first"
        );
    }
    let mut events: Vec<PostureEvent> = effects.into_iter().map(|e| w.to_event(e)).collect();
    // INVARIANT: every event is valid and none is dated beyond the clock
    // skew before the first chunk is written, so bad input changes nothing
    // even when it spans several transactions.
    for e in &events {
        e.validate()
            .map_err(|err| bad("jamf.invalid", err.to_string()))?;
    }
    ctx.posture.check_times(&events).map_err(|err| Refusal {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        kind: "",
        message: err.to_string(),
    })?;
    let unconfirmed = match ctx.jamf_api.as_deref() {
        Some(api) => confirm(ctx, cfg, api, &mut events, origin_ms).await,
        None => vec![None; events.len()],
    };
    let mut results = Vec::with_capacity(events.len());
    let mut notes = unconfirmed.into_iter();
    for chunk in events.chunks(INGEST_CHUNK) {
        let got = ctx
            .posture
            .ingest_reports(chunk.to_vec())
            .await
            .map_err(|e| match e {
                crate::posture::IngestError::Invalid(e) => bad("jamf.invalid", e.to_string()),
                e => Refusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "unavailable",
                    kind: "jamf.unavailable",
                    message: e.to_string(),
                },
            })?;
        for (ev, r) in chunk.iter().zip(&got) {
            let device = ev.changes.first().map(|c| match c {
                Change::Device { id, .. } => id.as_str(),
                _ => "",
            });
            let mut m = serde_json::Map::new();
            m.insert("event_id".into(), ev.id.clone().into());
            m.insert("device".into(), device.into());
            r.json_fields(&mut m);
            if let Some(Some(u)) = notes.next() {
                m.insert("unconfirmed_fields".into(), u.fields.into());
                m.insert("confirmation".into(), u.reason.into());
            }
            results.push(serde_json::Value::Object(m));
        }
    }
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({
            "webhook_event": shown_event,
            "results": results,
            "unresolved": unresolved,
            "snapshot_version": ctx.posture.snapshot().version(),
        }),
    ))
}

/// Trust a webhook would raise and the Jamf Pro API did not confirm.
#[derive(Debug, Clone)]
struct Unconfirmed {
    fields: Vec<&'static str>,
    reason: String,
}

/// The fields of `p` that would make the device more trusted than `cur`.
fn raises(p: &DevicePatch, cur: Option<&Device>) -> Vec<&'static str> {
    let mut out = Vec::new();
    if p.compliance == Some(Compliance::Compliant)
        && cur.is_none_or(|d| d.compliance != Compliance::Compliant)
    {
        out.push("compliance");
    }
    if p.compromised == Some(false) && cur.is_some_and(|d| d.compromised) {
        out.push("compromised");
    }
    if p.lifecycle == Some(Lifecycle::Enrolled)
        && cur.is_none_or(|d| d.lifecycle != Lifecycle::Enrolled)
    {
        out.push("lifecycle");
    }
    out
}

/// The device's Jamf id and whether it is a mobile device, from the
/// external ids the webhook carries.
fn jss_of(p: &DevicePatch) -> Option<(bool, String)> {
    p.add_external_ids.iter().find_map(|x| {
        if let Some(j) = x.strip_prefix("jamf:jss:mobile:") {
            Some((true, j.to_owned()))
        } else {
            x.strip_prefix("jamf:jss:computer:")
                .map(|j| (false, j.to_owned()))
        }
    })
}

/// Confirms every trust-raising event through the Jamf Pro API and drops
/// the fields it does not confirm (fail closed). A `DisableLostMode` the API
/// confirms becomes a restore (clears the sticky lost). Returns, per event,
/// what was dropped.
async fn confirm(
    ctx: &FeedContext,
    cfg: &JamfConfig,
    api: &super::jamf_api::JamfApi,
    events: &mut [PostureEvent],
    origin_ms: u64,
) -> Vec<Option<Unconfirmed>> {
    let snap = ctx.posture.snapshot();
    let mut out = Vec::with_capacity(events.len());
    let mut asked = 0usize;
    for ev in events.iter_mut() {
        let lost_mode_off = ev.kind == "jamf.lost-mode-disabled";
        let Some(Change::Device { id, patch }) = ev.changes.first_mut() else {
            out.push(None);
            continue;
        };
        let raised = raises(patch, snap.device(id).as_deref());
        if raised.is_empty() {
            out.push(None);
            continue;
        }
        let verdict: Result<Vec<&'static str>, String> = match jss_of(patch) {
            None => Err("the webhook names no Jamf id to read back".into()),
            Some(_) if asked >= MAX_CONFIRMATIONS => Err(format!(
                "more than {MAX_CONFIRMATIONS} devices to confirm in one webhook"
            )),
            Some((mobile, jss)) => {
                asked += 1;
                match api.device(mobile, &jss).await {
                    Err(e) => Err(format!("the Jamf Pro API did not answer: {e}")),
                    Ok(state) => {
                        let member =
                            |groups: &[u64]| state.groups.iter().any(|g| groups.contains(g));
                        Ok(raised
                            .iter()
                            .copied()
                            .filter(|f| match *f {
                                "compliance" => member(&cfg.noncompliant_groups),
                                "compromised" => member(&cfg.compromised_groups),
                                _ => member(&cfg.lost_groups) || state.lost_mode == Some(true),
                            })
                            .collect())
                    }
                }
            }
        };
        let (dropped, reason) = match verdict {
            Ok(d) if d.is_empty() => {
                if lost_mode_off {
                    // An operator's command in Jamf, confirmed: a restore.
                    patch.reenrolled_ms = Some(origin_ms);
                }
                out.push(None);
                continue;
            }
            Ok(d) => (d, "the Jamf Pro API disagrees".to_owned()),
            Err(why) => (raised, why),
        };
        for f in &dropped {
            match *f {
                "compliance" => patch.compliance = None,
                "compromised" => patch.compromised = None,
                _ => {
                    patch.lifecycle = None;
                    patch.reenrolled_ms = None;
                }
            }
        }
        super::count(&ctx.metrics, "jamf", "jamf.read-back", "unconfirmed");
        tracing::warn!(
            event_id = %ev.id,
            fields = ?dropped,
            reason = %reason,
            "jamf: trust not raised without the Jamf Pro API's confirmation"
        );
        out.push(Some(Unconfirmed {
            fields: dropped,
            reason,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(field: &str) -> JamfConfig {
        JamfConfig {
            authorization: "Bearer jamf-secret-0123456789".into(),
            noncompliant_groups: vec![10],
            patch_groups: vec![11],
            compromised_groups: vec![12],
            lost_groups: vec![57, 10],
            device_id_field: field.into(),
            api: None,
        }
    }

    #[test]
    fn group_patches_combine_and_reverse() {
        let c = cfg("udid");
        let (p, revoke) = group_patch(&c, 10, true).unwrap();
        assert_eq!(p.compliance, Some(Compliance::NonCompliant));
        assert_eq!(p.lifecycle, Some(Lifecycle::Lost));
        assert!(revoke);
        let (p, revoke) = group_patch(&c, 10, false).unwrap();
        assert_eq!(p.compliance, Some(Compliance::Compliant));
        assert_eq!(p.lifecycle, Some(Lifecycle::Enrolled));
        assert!(!revoke);
        assert_eq!(
            group_patch(&c, 11, true).unwrap().0.patch_behind,
            Some(true)
        );
        assert_eq!(
            group_patch(&c, 12, false).unwrap().0.compromised,
            Some(false)
        );
        assert!(group_patch(&c, 99, true).is_none());
    }

    #[test]
    fn device_ids_follow_the_configured_field() {
        let d: JamfDevice = serde_json::from_value(serde_json::json!({
            "jssID": 1843, "udid": "U-1", "serialNumber": "C02", "model": "MacBookPro18,3",
            "username": "m.ito", "emailAddress": "m.ito@acme.example", "osVersion": ""
        }))
        .unwrap();
        assert_eq!(d.canonical("udid").as_deref(), Some("U-1"));
        assert_eq!(d.canonical("serialNumber").as_deref(), Some("C02"));
        assert_eq!(d.canonical("jssID").as_deref(), Some("1843"));
        assert_eq!(
            d.external_ids(Kind::Computer, "udid"),
            vec!["jamf:jss:computer:1843", "jamf:serial:C02"]
        );
        assert_eq!(
            d.external_ids(Kind::Mobile, "serialNumber"),
            vec!["jamf:jss:mobile:1843", "jamf:udid:U-1"]
        );
        assert_eq!(
            d.subjects(),
            Some(vec!["m.ito@acme.example".to_owned(), "m.ito".to_owned()])
        );
        let empty: JamfDevice = serde_json::from_value(serde_json::json!({"udid": " "})).unwrap();
        assert_eq!(empty.canonical("udid"), None);
        assert_eq!(empty.subjects(), None);
    }

    #[test]
    fn platforms() {
        let m = |v: serde_json::Value| serde_json::from_value::<JamfDevice>(v).unwrap();
        assert_eq!(
            m(serde_json::json!({})).platform(Kind::Computer),
            Some("macos")
        );
        assert_eq!(
            m(serde_json::json!({"modelDisplay": "iPad Pro"})).platform(Kind::Mobile),
            Some("ipados")
        );
        assert_eq!(
            m(serde_json::json!({"model": "iPhone 15"})).platform(Kind::Mobile),
            Some("ios")
        );
        assert_eq!(
            m(serde_json::json!({"model": ""})).platform(Kind::Mobile),
            None
        );
    }

    #[test]
    fn event_labels_are_bounded() {
        assert_eq!(
            kind_label("mobiledevicepushsent"),
            "jamf.mobiledevicepushsent"
        );
        assert_eq!(kind_label("made-up-by-an-attacker"), "jamf.unknown");
    }
}
