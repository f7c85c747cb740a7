//! The transmitter's HTTP surface on the admin listener: metadata at
//! `/.well-known/ssf-configuration` and the JWKS (public), and the SSF §8
//! stream management API under `/ssf/` (a receiver's bearer token).
//!
//! Status codes follow SSF §8.1: 201 create, 200 read / update / status /
//! add subject, 204 delete / remove subject / verification; 400 malformed
//! (bad JSON, a missing `stream_id`, transmitter-supplied fields that do not
//! match, an unsupported delivery method, a non-https endpoint), 401 no or
//! unknown token, 403 a token without `ssf.manage` for a change, 404 an
//! unknown stream id (or one of another receiver: existence is not
//! revealed), 405 another method, 409 more streams than allowed, 429
//! verification faster than `min_verification_interval`.

use std::sync::Arc;

use http::{Method, Request, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::outbox::{self, Delivery, Stream};
use super::{PUSH_METHOD, SSF_BASE_PATH, Transmitter, WELL_KNOWN, signals};
use crate::config::{ReceiverConfig, https_or_loopback};
use crate::feeds::{AdminResponse, error, json as json_resp, read_body};

/// Largest management request body.
const MAX_BODY: usize = 64 * 1024;

/// True when the admin listener should hand `path` to the transmitter.
pub fn owns(path: &str) -> bool {
    path == WELL_KNOWN
        || path.starts_with("/.well-known/ssf-configuration/")
        || (path.starts_with("/ssf/") && path != "/ssf/push")
}

fn unauthorized() -> AdminResponse {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "invalid_token",
        "a receiver bearer token is required",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"portcullis-ssf\""),
    );
    r
}

fn bad(m: impl Into<String>) -> AdminResponse {
    error(StatusCode::BAD_REQUEST, "invalid_request", m)
}

fn not_found() -> AdminResponse {
    error(StatusCode::NOT_FOUND, "not_found", "no such stream")
}

fn empty(status: StatusCode) -> AdminResponse {
    let mut r = AdminResponse::new(http_body_util::Full::new(bytes::Bytes::new()));
    *r.status_mut() = status;
    r
}

fn internal(e: impl std::fmt::Display) -> AdminResponse {
    tracing::error!(error = %e, "transmitter: management request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the transmitter store failed",
    )
}

fn query_stream_id(req: &Request<Incoming>) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "stream_id")
        .map(|(_, v)| v.into_owned())
}

impl Transmitter {
    fn receiver(&self, req: &Request<Incoming>) -> Option<&ReceiverConfig> {
        self.cfg
            .receivers
            .iter()
            .find(|r| crate::feeds::bearer_is(req, &r.token))
    }

    /// The stream config as the receiver sees it.
    fn view(&self, s: &Stream) -> Value {
        let mut v = json!({
            "stream_id": s.stream_id,
            "iss": self.cfg.issuer,
            "aud": s.aud,
            "events_supported": signals::supported(),
            "events_requested": s.events_requested,
            "events_delivered": s.events_delivered,
            "delivery": {"method": s.delivery.method, "endpoint_url": s.delivery.endpoint_url},
            "min_verification_interval": self.cfg.min_verification_interval_s,
        });
        if let (Some(d), Some(o)) = (&s.description, v.as_object_mut()) {
            o.insert("description".into(), json!(d));
        }
        v
    }

    /// Handles a request under `/.well-known/ssf-configuration` or `/ssf/`.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> AdminResponse {
        let path = req.uri().path().to_owned();
        if path == WELL_KNOWN || path.starts_with("/.well-known/ssf-configuration/") {
            if req.method() != Method::GET {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "GET only",
                );
            }
            return json_resp(StatusCode::OK, &self.metadata());
        }
        if path == format!("{SSF_BASE_PATH}/jwks.json") {
            if req.method() != Method::GET {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "GET only",
                );
            }
            let mut r = AdminResponse::new(http_body_util::Full::new(self.signer.jwks()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/jwk-set+json"),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("public, max-age=300"),
            );
            return r;
        }
        let Some(rx) = self.receiver(&req).cloned() else {
            return unauthorized();
        };
        let manage = rx.scopes.iter().any(|s| s.starts_with("ssf.manage"));
        let read = manage || rx.scopes.iter().any(|s| s.starts_with("ssf.read"));
        let method = req.method().clone();
        let writes = method != Method::GET;
        if (writes && !manage) || !read {
            return error(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                if writes {
                    "ssf.manage is required"
                } else {
                    "ssf.read is required"
                },
            );
        }
        let sub = path.strip_prefix(SSF_BASE_PATH).unwrap_or("");
        match (sub, &method) {
            ("/streams", &Method::GET) => self.read_streams(&rx, query_stream_id(&req)).await,
            ("/streams", &Method::DELETE) => match query_stream_id(&req) {
                None => bad("stream_id is required"),
                Some(id) => self.delete(&rx, id).await,
            },
            ("/status", &Method::GET) => match query_stream_id(&req) {
                None => bad("stream_id is required"),
                Some(id) => self.status_get(&rx, id).await,
            },
            ("/streams", &Method::POST)
            | ("/streams", &Method::PATCH)
            | ("/streams", &Method::PUT)
            | ("/status", &Method::POST)
            | ("/subjects:add", &Method::POST)
            | ("/subjects:remove", &Method::POST)
            | ("/verify", &Method::POST) => {
                let body = match read_body(req, MAX_BODY).await {
                    Ok(b) => b,
                    Err(crate::feeds::BodyError::TooLarge) => {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "invalid_request",
                            "body too large",
                        );
                    }
                    Err(crate::feeds::BodyError::Broken) => return bad("body could not be read"),
                };
                let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
                    return bad("the body must be a JSON object");
                };
                match (sub, &method) {
                    ("/streams", &Method::POST) => self.create(&rx, body).await,
                    ("/streams", &Method::PATCH) => self.update(&rx, body, false).await,
                    ("/streams", &Method::PUT) => self.update(&rx, body, true).await,
                    ("/status", _) => self.status_set(&rx, body).await,
                    ("/subjects:add", _) => self.subject(&rx, body, true).await,
                    ("/subjects:remove", _) => self.subject(&rx, body, false).await,
                    _ => self.verify(&rx, body).await,
                }
            }
            ("/streams" | "/status" | "/subjects:add" | "/subjects:remove" | "/verify", _) => {
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "method not allowed here",
                )
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        }
    }

    /// A stream of this receiver, or 404.
    async fn owned(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        id: String,
    ) -> Result<Stream, AdminResponse> {
        let name = rx.name.clone();
        match self.db(move |_, c| outbox::get_stream(c, &id)).await {
            Ok(Some(s)) if s.receiver == name => Ok(s),
            Ok(_) => Err(not_found()),
            Err(e) => Err(internal(e)),
        }
    }

    async fn read_streams(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        id: Option<String>,
    ) -> AdminResponse {
        if let Some(id) = id {
            return match self.owned(rx, id).await {
                Ok(s) => json_resp(StatusCode::OK, &self.view(&s)),
                Err(r) => r,
            };
        }
        let name = rx.name.clone();
        match self.db(move |_, c| outbox::streams(c, Some(&name))).await {
            Ok(list) => json_resp(
                StatusCode::OK,
                &Value::Array(list.iter().map(|s| self.view(s)).collect()),
            ),
            Err(e) => internal(e),
        }
    }

    fn parse_delivery(v: Option<&Value>) -> Result<Delivery, String> {
        let Some(d) = v else {
            return Err(format!(
                "`delivery` is required: only push ({PUSH_METHOD}) is supported"
            ));
        };
        let method = d.get("method").and_then(Value::as_str).unwrap_or("");
        if method != PUSH_METHOD {
            return Err(format!(
                "delivery method `{}` is not supported (only {PUSH_METHOD})",
                method.chars().take(64).collect::<String>()
            ));
        }
        let url = d.get("endpoint_url").and_then(Value::as_str).unwrap_or("");
        if !https_or_loopback(url) {
            return Err(String::from(
                "`delivery.endpoint_url` must be an https URL (http only on loopback)",
            ));
        }
        let auth = match d.get("authorization_header") {
            None | Some(Value::Null) => None,
            Some(Value::String(a)) if http::HeaderValue::from_str(a).is_ok() => Some(a.clone()),
            Some(_) => {
                return Err(String::from(
                    "`delivery.authorization_header` must be a header value",
                ));
            }
        };
        Ok(Delivery {
            method: PUSH_METHOD.into(),
            endpoint_url: url.into(),
            authorization_header: auth,
        })
    }

    fn parse_requested(v: Option<&Value>) -> Result<Vec<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) if a.len() <= 64 => a
                .iter()
                .map(|e| e.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| "`events_requested` must be an array of strings".to_owned()),
            Some(_) => Err(String::from(
                "`events_requested` must be an array of at most 64 strings",
            )),
        }
    }

    fn parse_description(v: Option<&Value>) -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 1024 => Ok(Some(s.clone())),
            Some(_) => Err(String::from(
                "`description` must be a string of at most 1024 bytes",
            )),
        }
    }

    fn delivered(requested: &[String]) -> Vec<String> {
        signals::supported()
            .into_iter()
            .filter(|t| requested.contains(t))
            .collect()
    }

    async fn create(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        body: serde_json::Map<String, Value>,
    ) -> AdminResponse {
        let delivery = match Self::parse_delivery(body.get("delivery")) {
            Ok(d) => d,
            Err(m) => return bad(m),
        };
        let requested = match Self::parse_requested(body.get("events_requested")) {
            Ok(r) => r,
            Err(m) => return bad(m),
        };
        let description = match Self::parse_description(body.get("description")) {
            Ok(d) => d,
            Err(m) => return bad(m),
        };
        let s = Stream {
            stream_id: super::random_id(),
            receiver: rx.name.clone(),
            aud: rx.audience.clone(),
            events_delivered: Self::delivered(&requested),
            events_requested: requested,
            delivery,
            description,
            status: "enabled".into(),
            reason: None,
            alarm: None,
            last_verification_ms: 0,
        };
        let (name, max, s2) = (rx.name.clone(), rx.max_streams, s.clone());
        let r = self
            .db(move |_, c| {
                if outbox::streams(c, Some(&name))?.len() >= max {
                    return Ok(false);
                }
                outbox::put_stream(c, &s2)?;
                Ok(true)
            })
            .await;
        match r {
            Ok(true) => {
                tracing::info!(receiver = %rx.name, stream = %s.stream_id, "transmitter: stream created");
                json_resp(StatusCode::CREATED, &self.view(&s))
            }
            Ok(false) => error(
                StatusCode::CONFLICT,
                "conflict",
                format!("this receiver may hold {} stream(s)", rx.max_streams),
            ),
            Err(e) => internal(e),
        }
    }

    async fn update(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        body: serde_json::Map<String, Value>,
        replace: bool,
    ) -> AdminResponse {
        let Some(id) = stream_id(&body) else {
            return bad("`stream_id` is required");
        };
        let mut s = match self.owned(rx, id).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        // Transmitter-supplied fields may be absent; present, they must match.
        let current = self.view(&s);
        for f in [
            "iss",
            "aud",
            "events_supported",
            "events_delivered",
            "min_verification_interval",
        ] {
            if let Some(v) = body.get(f)
                && current.get(f) != Some(v)
            {
                return bad(format!("`{f}` does not match the stream's current value"));
            }
        }
        if replace || body.contains_key("delivery") {
            s.delivery = match Self::parse_delivery(body.get("delivery")) {
                Ok(d) => d,
                Err(m) => return bad(m),
            };
        }
        if replace || body.contains_key("events_requested") {
            s.events_requested = match Self::parse_requested(body.get("events_requested")) {
                Ok(r) => r,
                Err(m) => return bad(m),
            };
            s.events_delivered = Self::delivered(&s.events_requested);
        }
        if replace || body.contains_key("description") {
            s.description = match Self::parse_description(body.get("description")) {
                Ok(d) => d,
                Err(m) => return bad(m),
            };
        }
        let s2 = s.clone();
        match self.db(move |_, c| outbox::put_stream(c, &s2)).await {
            Ok(()) => json_resp(StatusCode::OK, &self.view(&s)),
            Err(e) => internal(e),
        }
    }

    async fn delete(self: &Arc<Self>, rx: &ReceiverConfig, id: String) -> AdminResponse {
        let s = match self.owned(rx, id).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let id = s.stream_id.clone();
        match self.db(move |_, c| outbox::delete_stream(c, &id)).await {
            Ok(()) => {
                tracing::info!(receiver = %rx.name, stream = %s.stream_id, "transmitter: stream deleted");
                empty(StatusCode::NO_CONTENT)
            }
            Err(e) => internal(e),
        }
    }

    fn status_view(s: &Stream) -> Value {
        let mut v = json!({"stream_id": s.stream_id, "status": s.status});
        if let (Some(r), Some(o)) = (&s.reason, v.as_object_mut()) {
            o.insert("reason".into(), json!(r));
        }
        v
    }

    async fn status_get(self: &Arc<Self>, rx: &ReceiverConfig, id: String) -> AdminResponse {
        match self.owned(rx, id).await {
            Ok(s) => json_resp(StatusCode::OK, &Self::status_view(&s)),
            Err(r) => r,
        }
    }

    async fn status_set(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        body: serde_json::Map<String, Value>,
    ) -> AdminResponse {
        let Some(id) = stream_id(&body) else {
            return bad("`stream_id` is required");
        };
        let status = body.get("status").and_then(Value::as_str).unwrap_or("");
        if !["enabled", "paused", "disabled"].contains(&status) {
            return bad("`status` must be enabled, paused or disabled");
        }
        let reason = match Self::parse_description(body.get("reason")) {
            Ok(r) => r,
            Err(_) => return bad("`reason` must be a short string"),
        };
        let mut s = match self.owned(rx, id).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let status = status.to_owned();
        let changed = s.status != status;
        s.reason = reason.clone();
        let mut event = json!({"status": status});
        if let (Some(r), Some(o)) = (&reason, event.as_object_mut()) {
            o.insert("reason".into(), json!(r));
        }
        let s2 = {
            let mut n = s.clone();
            n.status = status.clone();
            n
        };
        let r = self
            .db(move |me, c| {
                // Stream Updated goes out before a pause or disable, and on re-enable.
                if changed && status != "enabled" {
                    me.enqueue_control(c, &s, &signals::stream_updated(), event.clone())?;
                }
                outbox::put_stream(c, &s2)?;
                if changed && status == "disabled" {
                    let n = outbox::drop_pending(c, &format!("stream:{}", s2.stream_id))?;
                    me.metrics.dropped.inc_by(n as u64);
                }
                if changed && status == "enabled" {
                    me.enqueue_control(c, &s2, &signals::stream_updated(), event)?;
                }
                Ok(s2)
            })
            .await;
        match r {
            Ok(s) => json_resp(StatusCode::OK, &Self::status_view(&s)),
            Err(e) => internal(e),
        }
    }

    async fn subject(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        body: serde_json::Map<String, Value>,
        add: bool,
    ) -> AdminResponse {
        let Some(id) = stream_id(&body) else {
            return bad("`stream_id` is required");
        };
        let subject = match body.get("subject") {
            Some(Value::Object(o))
                if o.get("format").is_some_and(Value::is_string) && o.len() <= 16 =>
            {
                Value::Object(o.clone())
            }
            _ => return bad("`subject` must be a subject identifier (an object with `format`)"),
        };
        if subject.to_string().len() > 4096 {
            return bad("`subject` is too large");
        }
        let s = match self.owned(rx, id).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let sid = s.stream_id;
        match self
            .db(move |_, c| outbox::set_subject(c, &sid, &subject, add))
            .await
        {
            // The answer never reveals whether the subject is known.
            Ok(()) if add => empty(StatusCode::OK),
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(e) => internal(e),
        }
    }

    async fn verify(
        self: &Arc<Self>,
        rx: &ReceiverConfig,
        body: serde_json::Map<String, Value>,
    ) -> AdminResponse {
        let Some(id) = stream_id(&body) else {
            return bad("`stream_id` is required");
        };
        let state = match body.get("state") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= 1024 => Some(s.clone()),
            Some(_) => return bad("`state` must be a string of at most 1024 bytes"),
        };
        let mut s = match self.owned(rx, id).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let now = crate::util::now_unix_ms();
        let min = self.cfg.min_verification_interval_s.saturating_mul(1000);
        if s.last_verification_ms > 0 && now.saturating_sub(s.last_verification_ms) < min {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "at most one verification per {} s",
                    self.cfg.min_verification_interval_s
                ),
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(self.cfg.min_verification_interval_s),
            );
            return r;
        }
        s.last_verification_ms = now;
        let event = match state {
            Some(st) => json!({"state": st}),
            None => json!({}),
        };
        let r = self
            .db(move |me, c| {
                outbox::put_stream(c, &s)?;
                me.enqueue_control(c, &s, &signals::verification(), event)
            })
            .await;
        match r {
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(e) => internal(e),
        }
    }
}

/// The request body's `stream_id`.
fn stream_id(body: &serde_json::Map<String, Value>) -> Option<String> {
    body.get("stream_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}
