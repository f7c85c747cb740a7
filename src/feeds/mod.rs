//! Feeds: every outside source of posture and identity state, each mapped
//! into [`PostureEvent`](crate::posture::event::PostureEvent)s and handed to
//! the one apply path. Every endpoint lives on the admin listener with its own
//! authentication; a feed acknowledges only after the durable write.
//!
//! This room must never change state on bad input: authentication, size,
//! parsing and validation all happen before `Posture::ingest`.

pub mod admin;
pub mod intune;
pub mod jamf;
pub mod jamf_api;
pub mod mdm;
pub mod scim;
pub mod ssf;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::config::Config;
use crate::posture::Posture;
use crate::telemetry::{FeedOutcomeLabel, Metrics};

/// The admin listener's response type.
pub type AdminResponse = Response<Full<Bytes>>;

/// What the feed handlers share: the posture service, metrics and the
/// config-derived receivers (rebuilt on reload).
pub struct FeedContext {
    /// Posture service.
    pub posture: Arc<Posture>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The running config.
    pub config: Arc<Config>,
    /// The SSF receiver, when configured.
    pub ssf: Option<Arc<ssf::Receiver>>,
    /// The Jamf Pro API client (`[feeds.jamf.api]`), when configured.
    pub jamf_api: Option<Arc<jamf_api::JamfApi>>,
}

impl std::fmt::Debug for FeedContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedContext").finish_non_exhaustive()
    }
}

/// Why a feed request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the configured limit.
    TooLarge,
    /// The connection failed mid-body.
    Broken,
}

/// Reads a request body up to `limit` bytes (checked against `Content-Length`
/// first, then while streaming).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, BodyError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// True when the request carries `Authorization: Bearer <secret>` (constant time).
pub fn bearer_is(req: &Request<Incoming>, secret: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
        })
        .is_some_and(|got| crate::util::constant_time_eq(got.as_bytes(), secret.as_bytes()))
}

/// A JSON response with `Cache-Control: no-store`.
pub fn json(status: StatusCode, v: &serde_json::Value) -> AdminResponse {
    json_typed(status, v, "application/json")
}

/// A JSON response with an explicit media type.
pub fn json_typed(status: StatusCode, v: &serde_json::Value, media: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The plain error body used by the admin API and the MDM feeds.
pub fn error(status: StatusCode, code: &str, description: impl Into<String>) -> AdminResponse {
    json(
        status,
        &serde_json::json!({"error": code, "error_description": description.into()}),
    )
}

/// Counts an input refused before ingest (`rejected`) or accepted but not
/// acted on (`ignored`).
pub fn count(metrics: &Metrics, feed: &'static str, kind: &str, outcome: &'static str) {
    metrics
        .feed_events
        .get_or_create(&FeedOutcomeLabel {
            feed,
            kind: kind.to_owned(),
            outcome,
        })
        .inc();
}

/// Parses a millisecond-or-second epoch timestamp by magnitude (Jamf sends
/// either); values before 2001 or after 2286 are refused.
pub fn epoch_ms(v: u64) -> Option<u64> {
    let ms = if v < 10_000_000_000 {
        v.checked_mul(1000)?
    } else {
        v
    };
    (978_307_200_000..=9_999_999_999_999)
        .contains(&ms)
        .then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::epoch_ms;

    #[test]
    fn timestamps() {
        assert_eq!(epoch_ms(1_767_225_600), Some(1_767_225_600_000));
        assert_eq!(epoch_ms(1_767_225_600_123), Some(1_767_225_600_123));
        assert_eq!(epoch_ms(5), None);
    }
}
