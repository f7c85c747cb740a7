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
        .is_some_and(|got| crate::admin::constant_time_eq(got.as_bytes(), secret.as_bytes()))
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

/// Parses an RFC 3339 timestamp (`2026-01-01T08:41:12Z`, offsets and
/// fractions allowed) to ms since epoch.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac_ms = 0i64;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return None;
        }
        let mut ms = digits.chars().take(3).collect::<String>();
        while ms.len() < 3 {
            ms.push('0');
        }
        frac_ms = ms.parse().ok()?;
        rest = &r[digits.len()..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6
            && (o.starts_with('+') || o.starts_with('-'))
            && o.as_bytes()[3] == b':' =>
        {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o.get(1..3)?.parse::<i64>().ok()? * 3600
                + o.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

#[cfg(test)]
mod tests {
    use super::{epoch_ms, rfc3339_ms};

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2026-01-01T08:41:12Z"), Some(1_767_256_872_000));
        assert_eq!(
            rfc3339_ms("2026-01-01T09:41:12.5+01:00"),
            Some(1_767_256_872_500)
        );
        assert_eq!(rfc3339_ms("2026-13-01T08:41:12Z"), None);
        assert_eq!(rfc3339_ms("yesterday"), None);
        assert_eq!(epoch_ms(1_767_225_600), Some(1_767_225_600_000));
        assert_eq!(epoch_ms(1_767_225_600_123), Some(1_767_225_600_123));
        assert_eq!(epoch_ms(5), None);
    }
}
