//! The generic JSON device event, for any MDM without its own adapter.
//!
//! `POST /mdm/v1/{source}/events` with `Authorization: Bearer <secret>` (per
//! source) and a body that is one event object or an array of up to 1000:
//!
//! ```json
//! { "event_id": "evt-42", "device_id": "laptop-001", "occurred_at": "2026-01-01T08:41:12Z",
//!   "lifecycle": "lost", "compliance": "non_compliant", "compromised": false,
//!   "patch_behind": true, "threat": "low", "platform": "macos", "os_version": "15.3.2",
//!   "ownership": "corporate", "last_check_in": 1767256872000,
//!   "subjects": ["alice@example.com"], "cert_thumbprints": ["ab12…"] }
//! ```
//!
//! Only `event_id`, `device_id` and `occurred_at` (RFC 3339, or epoch seconds
//! or milliseconds) are required; unknown fields are refused. `lost`,
//! `wipe_pending`, `wiped` and `deleted` also revoke the device's credentials.
//! `"reenrolled": true` (or `enrolled_at`, a time) marks a re-enrolment: the
//! only report that clears lost, wipe pending, wiped or compromised set
//! before it. An `occurred_at` beyond `feeds.max_future_skew_s` refuses the
//! whole request. Answers 202 with one outcome per event (`applied`,
//! `partial` with `stale_fields` / `held_fields`, `held`, `stale`,
//! `duplicate`), after the durable write.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::{AdminResponse, BodyError, FeedContext, error, json, read_body};
use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};
use crate::posture::model::{Compliance, Lifecycle, Ownership, RevocationTarget, Threat};

/// Most events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// A timestamp: RFC 3339 text or an epoch number (seconds or ms).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stamp {
    Text(String),
    Epoch(u64),
}

impl Stamp {
    fn ms(&self) -> Option<u64> {
        match self {
            Stamp::Text(s) => crate::util::parse_rfc3339_ms(s),
            Stamp::Epoch(n) => super::epoch_ms(*n),
        }
    }
}

/// The documented generic device event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericDeviceEvent {
    event_id: String,
    device_id: String,
    occurred_at: Stamp,
    #[serde(default)]
    lifecycle: Option<Lifecycle>,
    #[serde(default)]
    compliance: Option<Compliance>,
    #[serde(default)]
    compromised: Option<bool>,
    #[serde(default)]
    patch_behind: Option<bool>,
    #[serde(default)]
    threat: Option<Threat>,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default)]
    os_version: Option<String>,
    #[serde(default)]
    ownership: Option<Ownership>,
    #[serde(default)]
    last_check_in: Option<Stamp>,
    #[serde(default)]
    subjects: Option<Vec<String>>,
    #[serde(default)]
    cert_thumbprints: Option<Vec<String>>,
    #[serde(default)]
    reenrolled: Option<bool>,
    #[serde(default)]
    enrolled_at: Option<Stamp>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Box<GenericDeviceEvent>),
    Many(Vec<GenericDeviceEvent>),
}

impl GenericDeviceEvent {
    /// Maps to the canonical event; `source` namespaces the event id.
    pub fn into_event(self, source: &str) -> Result<PostureEvent, String> {
        let origin_ms = self
            .occurred_at
            .ms()
            .ok_or_else(|| format!("event `{}`: occurred_at is not a valid time", self.event_id))?;
        let last_check_in_ms = match &self.last_check_in {
            Some(s) => Some(s.ms().ok_or("last_check_in is not a valid time")?),
            None => None,
        };
        let reenrolled_ms = match (&self.enrolled_at, self.reenrolled) {
            (Some(s), _) => Some(s.ms().ok_or("enrolled_at is not a valid time")?),
            (None, Some(true)) => Some(origin_ms),
            (None, _) => None,
        };
        let dead = self.lifecycle.is_some_and(Lifecycle::is_dead);
        let kind = match self.lifecycle {
            Some(l) if l.is_dead() => "mdm.device-lost-or-wiped",
            Some(_) => "mdm.device-lifecycle",
            None if self.compliance.is_some() => "mdm.device-compliance",
            None => "mdm.device-update",
        };
        let thumbprints = self.cert_thumbprints.map(|v| {
            v.into_iter()
                .map(|t| t.to_ascii_lowercase().replace(':', ""))
                .collect()
        });
        let mut changes = vec![Change::Device {
            id: self.device_id.clone(),
            patch: DevicePatch {
                platform: self.platform,
                os_version: self.os_version,
                ownership: self.ownership,
                management_source: Some(source.to_owned()),
                lifecycle: self.lifecycle,
                compliance: self.compliance,
                compromised: self.compromised,
                patch_behind: self.patch_behind,
                threat: self.threat,
                last_check_in_ms,
                subjects: self.subjects,
                cert_thumbprints: thumbprints,
                add_external_ids: Vec::new(),
                reenrolled_ms,
            },
        }];
        if dead {
            changes.push(Change::Revoke {
                target: RevocationTarget::Device,
                key: self.device_id,
            });
        }
        Ok(PostureEvent {
            id: format!("mdm:{source}:{}", self.event_id),
            feed: Feed::Mdm,
            kind: kind.into(),
            origin_ms,
            changes,
        })
    }
}

/// Handles `POST /mdm/v1/{source}/events`.
pub async fn handle(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().to_owned();
    let Some(source) = path
        .strip_prefix("/mdm/v1/")
        .and_then(|p| p.strip_suffix("/events"))
        .filter(|s| !s.contains('/'))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "use /mdm/v1/{source}/events",
        );
    };
    let Some(src) = ctx.config.feeds.mdm.iter().find(|m| m.name == source) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such MDM source");
    };
    if req.method() != http::Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST only",
        );
    }
    if !super::bearer_is(&req, &src.secret) {
        super::count(&ctx.metrics, "mdm", "mdm.unauthenticated", "rejected");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid source bearer secret is required",
        );
    }
    let body = match read_body(req, ctx.config.feeds.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            super::count(&ctx.metrics, "mdm", "mdm.too-large", "rejected");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is over the limit",
            );
        }
        Err(BodyError::Broken) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "body not read");
        }
    };
    let parsed: OneOrMany = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            super::count(&ctx.metrics, "mdm", "mdm.malformed", "rejected");
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("not a device event: {e}"),
            );
        }
    };
    let raw = match parsed {
        OneOrMany::One(e) => vec![*e],
        OneOrMany::Many(v) => v,
    };
    if raw.is_empty() || raw.len() > MAX_EVENTS_PER_REQUEST {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("send 1..={MAX_EVENTS_PER_REQUEST} events"),
        );
    }
    let mut events = Vec::with_capacity(raw.len());
    for r in raw {
        match r.into_event(source) {
            Ok(e) => events.push(e),
            Err(m) => {
                super::count(&ctx.metrics, "mdm", "mdm.invalid", "rejected");
                return error(StatusCode::BAD_REQUEST, "invalid_request", m);
            }
        }
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    match ctx.posture.ingest_reports(events).await {
        Ok(reports) => {
            let results: Vec<serde_json::Value> = ids
                .iter()
                .zip(&reports)
                .map(|(id, r)| {
                    let mut m = serde_json::Map::new();
                    m.insert("event_id".into(), id.clone().into());
                    r.json_fields(&mut m);
                    serde_json::Value::Object(m)
                })
                .collect();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "results": results,
                    "snapshot_version": ctx.posture.snapshot().version(),
                }),
            )
        }
        Err(crate::posture::IngestError::Invalid(e)) => {
            // Future-dated events are counted by the apply path (`future`).
            if !e.is_future() {
                super::count(&ctx.metrics, "mdm", "mdm.invalid", "rejected");
            }
            error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}
