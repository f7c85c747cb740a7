//! The operator API (`/admin/v1/…`, bearer `admin.api_token`): revoke a
//! subject or device, mark a device lost, restore a device (the operator's
//! way out of lost / wiped / compromised, which no routine report clears),
//! and read the current record of a subject or device with the event history
//! that produced it.

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::{AdminResponse, FeedContext, error, json, read_body};
use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};
use crate::posture::model::{Lifecycle, RevocationTarget};

/// Most history entries returned with a record.
const HISTORY_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn event_id(req: &Request<Incoming>) -> String {
    match req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 128)
    {
        Some(k) => format!("admin:idem:{k}"),
        None => format!("admin:{}", crate::util::RequestIds::default().next_id()),
    }
}

/// The operator API's authentication, shared by every `/admin/v1/…`
/// endpoint: off (404) without `admin.api_token`, 401 without the token.
/// Returns the refusal, or `None` when the caller may go on.
pub fn api_token_refusal(
    config: &crate::config::Config,
    metrics: &crate::telemetry::Metrics,
    req: &Request<Incoming>,
) -> Option<AdminResponse> {
    let Some(token) = config.admin.api_token.as_deref() else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin API is not enabled (admin.api_token)",
        ));
    };
    if !super::bearer_is(req, token) {
        super::count(metrics, "admin", "admin.unauthenticated", "rejected");
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid admin bearer token is required",
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
        );
        return Some(r);
    }
    None
}

/// Handles `/admin/v1/…`.
pub async fn handle(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    if let Some(refusal) = api_token_refusal(&ctx.config, &ctx.metrics, &req) {
        return refusal;
    }
    let path = req.uri().path().trim_start_matches("/admin/v1/").to_owned();
    let segs: Vec<&str> = path.split('/').collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::POST, ["revoke"]) => revoke(ctx, req).await,
        (Method::POST, ["devices", id, "lost"]) => match crate::util::percent_decode(id) {
            Some(id) => device_lost(ctx, &req, id).await,
            None => error(StatusCode::BAD_REQUEST, "invalid_request", "bad device id"),
        },
        (Method::POST, ["devices", id, "restore"]) => match crate::util::percent_decode(id) {
            Some(id) => device_restore(ctx, &req, id).await,
            None => error(StatusCode::BAD_REQUEST, "invalid_request", "bad device id"),
        },
        (Method::GET, ["devices", id]) => match crate::util::percent_decode(id) {
            Some(id) => read_record(ctx, "device", &id).await,
            None => error(StatusCode::BAD_REQUEST, "invalid_request", "bad device id"),
        },
        (Method::GET, ["subjects", sub]) => match crate::util::percent_decode(sub) {
            Some(sub) => read_record(ctx, "subject", &sub).await,
            None => error(StatusCode::BAD_REQUEST, "invalid_request", "bad subject"),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

async fn ingest(ctx: &FeedContext, ev: PostureEvent) -> AdminResponse {
    let id = ev.id.clone();
    match ctx.posture.ingest_reports(vec![ev]).await {
        Ok(reports) => {
            let mut m = serde_json::Map::new();
            m.insert("event_id".into(), id.into());
            if let Some(r) = reports.first() {
                r.json_fields(&mut m);
            }
            m.insert(
                "snapshot_version".into(),
                ctx.posture.snapshot().version().into(),
            );
            json(StatusCode::ACCEPTED, &serde_json::Value::Object(m))
        }
        Err(crate::posture::IngestError::Invalid(e)) => {
            error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

async fn revoke(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let id = event_id(&req);
    let body = match read_body(req, ctx.config.feeds.max_body_bytes).await {
        Ok(b) => b,
        Err(super::BodyError::TooLarge) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is over the limit",
            );
        }
        Err(super::BodyError::Broken) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "body not read");
        }
    };
    let b: RevokeBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("body: {e}"),
            );
        }
    };
    let mut changes = Vec::new();
    for (target, key) in [
        (RevocationTarget::Subject, b.subject),
        (RevocationTarget::Device, b.device),
        (RevocationTarget::Session, b.session),
    ] {
        if let Some(key) = key {
            changes.push(Change::Revoke { target, key });
        }
    }
    if changes.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name a subject, device or session",
        );
    }
    if let Some(r) = &b.reason {
        tracing::info!(event_id = %id, reason = %r.chars().take(200).collect::<String>(), "operator revocation");
    }
    ingest(
        ctx,
        PostureEvent {
            id,
            feed: Feed::Admin,
            kind: "admin.revoke".into(),
            origin_ms: crate::util::now_unix_ms(),
            changes,
        },
    )
    .await
}

async fn device_lost(ctx: &FeedContext, req: &Request<Incoming>, device: String) -> AdminResponse {
    ingest(
        ctx,
        PostureEvent {
            id: event_id(req),
            feed: Feed::Admin,
            kind: "admin.device-lost".into(),
            origin_ms: crate::util::now_unix_ms(),
            changes: vec![
                Change::Device {
                    id: device.clone(),
                    patch: DevicePatch {
                        lifecycle: Some(Lifecycle::Lost),
                        ..DevicePatch::default()
                    },
                },
                Change::Revoke {
                    target: RevocationTarget::Device,
                    key: device,
                },
            ],
        },
    )
    .await
}

/// `POST /admin/v1/devices/{id}/restore`: the operator vouches for the
/// device again: enrolled, not compromised, whatever lost / wipe / compromise
/// any feed reported before now. Credentials revoked before stay revoked.
async fn device_restore(
    ctx: &FeedContext,
    req: &Request<Incoming>,
    device: String,
) -> AdminResponse {
    if ctx.posture.snapshot().device(&device).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device `{device}`"),
        );
    }
    let now = crate::util::now_unix_ms();
    tracing::info!(device = %device, "operator restore of a device");
    ingest(
        ctx,
        PostureEvent {
            id: event_id(req),
            feed: Feed::Admin,
            kind: "admin.device-restore".into(),
            origin_ms: now,
            changes: vec![Change::Device {
                id: device,
                patch: DevicePatch {
                    lifecycle: Some(Lifecycle::Enrolled),
                    compromised: Some(false),
                    reenrolled_ms: Some(now),
                    ..DevicePatch::default()
                },
            }],
        },
    )
    .await
}

async fn read_record(ctx: &FeedContext, kind: &str, key: &str) -> AdminResponse {
    let snap = ctx.posture.snapshot();
    let (record, revocation, canonical) = if kind == "device" {
        (
            snap.device(key)
                .map(|d| serde_json::to_value(&*d).unwrap_or_default()),
            snap.revocation(RevocationTarget::Device, key),
            key.to_owned(),
        )
    } else {
        let ident = snap.identity(key);
        let canonical = ident.as_ref().map_or(key.to_owned(), |i| i.subject.clone());
        (
            ident.map(|i| serde_json::to_value(&*i).unwrap_or_default()),
            snap.revocation(RevocationTarget::Subject, &canonical),
            canonical,
        )
    };
    let history = match ctx
        .posture
        .history(&format!("{kind}:{canonical}"), HISTORY_LIMIT)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            );
        }
    };
    if record.is_none() && revocation.is_none() && history.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {kind} `{key}`"),
        );
    }
    json(
        StatusCode::OK,
        &serde_json::json!({
            kind: record,
            "revocation": revocation.map(|r| serde_json::to_value(&*r).unwrap_or_default()),
            "snapshot_version": snap.version(),
            "history": history,
        }),
    )
}
