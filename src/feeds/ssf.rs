//! OpenID Shared Signals receiver: SET push (RFC 8935) and poll (RFC 8936),
//! CAEP and RISC events mapped into posture events.
//!
//! Verification follows standards.md §1.8: the caller is authenticated; the
//! SET is a compact JWS with `typ` `secevent+jwt` and an asymmetric `alg` from
//! the allow-list; the key comes only from the configured transmitter's JWKS
//! (never `jku`/`x5u`/`jwk`); `iss` exact; `aud` ours; `sub` and `exp` absent;
//! `sub_id` present; exactly one event; `jti` deduplicated per issuer. A push
//! is answered 202 only after the durable write; errors are 400 with
//! `{"err", "description"}` and the RFC's codes.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jsonwebtoken::Validation;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{AdminResponse, BodyError, FeedContext, json, read_body};
use crate::authn::jwks::{Fetcher, Issuer, JwksError};
use crate::config::{IssuerConfig, SsfConfig};
use crate::posture::Posture;
use crate::posture::event::{Change, DevicePatch, Feed, IdentityPatch, PostureEvent};
use crate::posture::model::{Compliance, IdentityStatus, RevocationTarget, Threat};
use crate::store::Outcome;

/// CAEP event-type URI prefix.
pub const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
/// RISC event-type URI prefix.
pub const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";
/// SSF event-type URI prefix.
pub const SSF: &str = "https://schemas.openid.net/secevent/ssf/event-type/";

/// A refusal, with the RFC 8935 error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{err}: {description}")]
pub struct SetError {
    /// `invalid_request`, `invalid_key`, `invalid_issuer`, `invalid_audience`,
    /// `authentication_failed`, `access_denied`.
    pub err: &'static str,
    /// One line for the transmitter's logs.
    pub description: String,
}

fn set_err(err: &'static str, d: impl Into<String>) -> SetError {
    SetError {
        err,
        description: d.into(),
    }
}

/// The claims of a SET this receiver reads.
#[derive(Debug, Deserialize)]
struct SetClaims {
    iss: String,
    #[serde(default)]
    iat: Option<u64>,
    jti: String,
    #[serde(default)]
    sub_id: Option<Value>,
    events: Map<String, Value>,
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
}

#[derive(Deserialize)]
struct SetHeader {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// A SET that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedSet {
    /// `iss`.
    pub iss: String,
    /// `jti`.
    pub jti: String,
    /// `iat` (seconds).
    pub iat: Option<u64>,
    /// `sub_id`.
    pub sub_id: Value,
    /// The one event type URI.
    pub event_type: String,
    /// Its event object.
    pub event: Value,
}

/// The receiver for the configured transmitter.
pub struct Receiver {
    /// Its config.
    pub cfg: SsfConfig,
    keys: Arc<Issuer>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("issuer", &self.cfg.issuer)
            .finish()
    }
}

impl Receiver {
    /// Builds the receiver and loads the transmitter's keys.
    pub async fn new(cfg: SsfConfig, fetcher: &Fetcher) -> Result<Arc<Self>, JwksError> {
        let ic = IssuerConfig {
            name: "ssf-transmitter".into(),
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            algorithms: cfg.algorithms.clone(),
            jwks_url: cfg.jwks_url.clone(),
            discovery_url: cfg.discovery_url.clone(),
            jwks_file: cfg.jwks_file.clone(),
            fetch_ca: None,
            refresh_interval_s: crate::config::DEFAULT_JWKS_REFRESH_S,
            min_refresh_interval_s: 5,
            leeway_s: 0,
            device_claim: "device_id".into(),
        };
        let keys = Issuer::new(ic, fetcher)?;
        match keys.refresh().await {
            Ok(_) => {}
            Err(e) if cfg.jwks_file.is_some() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "ssf transmitter keys not loaded yet"),
        }
        keys.spawn_refresh_task();
        Ok(Arc::new(Self { cfg, keys }))
    }

    /// Verifies a compact SET (standards.md §1.8, steps 2–9).
    pub async fn verify(&self, set: &str) -> Result<VerifiedSet, SetError> {
        let set = set.trim();
        let mut parts = set.split('.');
        let (Some(h64), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(set_err(
                "invalid_request",
                "not a compact JWS (a JWE or junk?)",
            ));
        };
        let header: SetHeader = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| set_err("invalid_request", "header is not base64url JSON"))?;
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            let t = t.to_ascii_lowercase();
            t == "secevent+jwt" || t == "application/secevent+jwt"
        });
        if !typ_ok {
            return Err(set_err("invalid_request", "typ must be secevent+jwt"));
        }
        if header.crit.is_some() {
            return Err(set_err(
                "invalid_request",
                "crit header parameters are not supported",
            ));
        }
        let alg = match header.alg.as_str() {
            a if self.cfg.algorithms.iter().any(|x| x == a) => a,
            _ => {
                return Err(set_err(
                    "invalid_request",
                    format!(
                        "alg `{}` is not accepted",
                        header.alg.chars().take(16).collect::<String>()
                    ),
                ));
            }
        };
        let alg: jsonwebtoken::Algorithm = alg
            .parse()
            .map_err(|_| set_err("invalid_request", "unsupported alg"))?;
        let key = self
            .keys
            .key_for(header.kid.as_deref(), alg)
            .await
            .map_err(|e| set_err("invalid_key", format!("signing key: {e}")))?;
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["iss", "aud"]);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&self.cfg.audiences);
        let data = jsonwebtoken::decode::<SetClaims>(set, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => set_err(
                    "invalid_key",
                    "signature does not verify with the transmitter's key",
                ),
                K::InvalidIssuer => {
                    set_err("invalid_issuer", "iss is not the configured transmitter")
                }
                K::InvalidAudience => {
                    set_err("invalid_audience", "aud does not name this receiver")
                }
                K::MissingRequiredClaim(c) if c == "aud" => {
                    set_err("invalid_audience", "aud is missing")
                }
                K::MissingRequiredClaim(c) => {
                    set_err("invalid_request", format!("claim `{c}` is missing"))
                }
                K::Json(j) => set_err("invalid_request", format!("claims: {j}")),
                _ => set_err("invalid_request", "SET does not verify"),
            }
        })?;
        let c = data.claims;
        if c.sub.is_some() {
            return Err(set_err(
                "invalid_request",
                "an SSF SET must not carry `sub`",
            ));
        }
        if c.exp.is_some() {
            return Err(set_err(
                "invalid_request",
                "an SSF SET must not carry `exp`",
            ));
        }
        let sub_id = c
            .sub_id
            .filter(Value::is_object)
            .ok_or_else(|| set_err("invalid_request", "`sub_id` is required"))?;
        if c.jti.is_empty() || c.jti.len() > 256 {
            return Err(set_err("invalid_request", "`jti` must be 1..=256 bytes"));
        }
        if c.events.len() != 1 {
            return Err(set_err(
                "invalid_request",
                "`events` must hold exactly one event",
            ));
        }
        let Some((event_type, event)) = c.events.into_iter().next() else {
            return Err(set_err("invalid_request", "`events` is empty"));
        };
        if !event.is_object() {
            return Err(set_err("invalid_request", "the event must be an object"));
        }
        Ok(VerifiedSet {
            iss: c.iss,
            jti: c.jti,
            iat: c.iat,
            sub_id,
            event_type,
            event,
        })
    }
}

/// The principals a subject identifier names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// The user (canonical subject when known to the snapshot).
    pub user: Option<String>,
    /// The device.
    pub device: Option<String>,
    /// The session (or token id).
    pub session: Option<String>,
}

fn simple_value(id: &Value) -> Option<String> {
    let o = id.as_object()?;
    let format = o
        .get("format")
        .or_else(|| o.get("subject_type"))
        .and_then(Value::as_str)?;
    let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    match format {
        "email" => s("email"),
        "iss_sub" => s("sub"),
        "opaque" => s("id"),
        "phone_number" | "phone" => s("phone_number"),
        "account" | "uri" => s("uri"),
        "did" => s("url"),
        "jwt_id" => s("jti"),
        "saml_assertion_id" => s("assertion_id"),
        "aliases" => o
            .get("identifiers")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find_map(simple_value)),
        _ => None,
    }
}

/// Reads `sub_id` (RFC 9493 / SSF `complex`), resolving users through the
/// snapshot's aliases.
pub fn subjects(sub_id: &Value, posture: &Posture) -> Subjects {
    let resolve = |u: String| posture.snapshot().resolve_subject(&u).unwrap_or(u);
    let format = sub_id
        .get("format")
        .or_else(|| sub_id.get("subject_type"))
        .and_then(Value::as_str);
    if format == Some("complex") {
        return Subjects {
            user: sub_id.get("user").and_then(simple_value).map(resolve),
            device: sub_id.get("device").and_then(simple_value),
            session: sub_id.get("session").and_then(simple_value),
        };
    }
    match format {
        Some("jwt_id") | Some("saml_assertion_id") => Subjects {
            session: simple_value(sub_id),
            ..Subjects::default()
        },
        _ => Subjects {
            user: simple_value(sub_id).map(resolve),
            ..Subjects::default()
        },
    }
}

fn level(v: Option<&Value>) -> Option<Threat> {
    match v?.as_str()?.to_ascii_uppercase().as_str() {
        "LOW" => Some(Threat::Low),
        "MEDIUM" => Some(Threat::Medium),
        "HIGH" => Some(Threat::High),
        "NONE" => Some(Threat::None),
        _ => None,
    }
}

fn str_list(v: Option<&Value>) -> Option<Vec<String>> {
    Some(
        v?.as_array()?
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
    )
}

/// Maps a verified SET to a posture event. `Ok(None)` means "valid, but
/// nothing to do" (unknown types, verification, stream updates); the kind
/// label for metrics comes back either way.
pub fn to_event(
    set: &VerifiedSet,
    posture: &Posture,
) -> Result<(String, Option<PostureEvent>), SetError> {
    let (family, name) = if let Some(n) = set.event_type.strip_prefix(CAEP) {
        ("caep", n)
    } else if let Some(n) = set.event_type.strip_prefix(RISC) {
        ("risc", n)
    } else if let Some(n) = set.event_type.strip_prefix(SSF) {
        ("ssf", n)
    } else {
        return Ok(("unknown".into(), None));
    };
    let kind = format!("{family}.{name}");
    let ev = &set.event;
    let origin_ms = ev
        .get("event_timestamp")
        .and_then(Value::as_u64)
        .or(set.iat)
        .and_then(super::epoch_ms)
        .unwrap_or_else(crate::util::now_unix_ms);
    let who = subjects(&set.sub_id, posture);
    let need_user = || {
        who.user
            .clone()
            .ok_or_else(|| set_err("invalid_request", format!("{kind} needs a user subject")))
    };
    let revoke = |target, key: String| Change::Revoke { target, key };
    let identity = |subject: String, patch: IdentityPatch| Change::Identity { subject, patch };
    let changes: Vec<Change> = match (family, name) {
        ("caep", "session-revoked") | ("risc", "sessions-revoked") => {
            match (&who.user, &who.device, &who.session) {
                (_, _, Some(s)) => vec![revoke(RevocationTarget::Session, s.clone())],
                (Some(u), Some(d), None) => {
                    vec![revoke(RevocationTarget::Session, format!("{u}|{d}"))]
                }
                (Some(u), None, None) => vec![revoke(RevocationTarget::Subject, u.clone())],
                (None, Some(d), None) => vec![revoke(RevocationTarget::Device, d.clone())],
                (None, None, None) => {
                    return Err(set_err(
                        "invalid_request",
                        "session-revoked names no subject",
                    ));
                }
            }
        }
        ("caep", "credential-change") => {
            let change = ev.get("change_type").and_then(Value::as_str).unwrap_or("");
            if !["create", "revoke", "update", "delete"].contains(&change) {
                return Err(set_err(
                    "invalid_request",
                    "credential-change needs change_type",
                ));
            }
            if ev.get("credential_type").and_then(Value::as_str).is_none() {
                return Err(set_err(
                    "invalid_request",
                    "credential-change needs credential_type",
                ));
            }
            if change == "create" {
                return Ok((kind, None));
            }
            vec![revoke(RevocationTarget::Subject, need_user()?)]
        }
        ("caep", "assurance-level-change") => {
            let cur = ev
                .get("current_level")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    set_err(
                        "invalid_request",
                        "assurance-level-change needs current_level",
                    )
                })?;
            vec![identity(
                need_user()?,
                IdentityPatch {
                    assurance: Some(cur.to_owned()),
                    ..IdentityPatch::default()
                },
            )]
        }
        ("caep", "token-claims-change") => {
            let claims = ev
                .get("claims")
                .and_then(Value::as_object)
                .ok_or_else(|| set_err("invalid_request", "token-claims-change needs claims"))?;
            let user = need_user()?;
            let patch = IdentityPatch {
                groups: str_list(claims.get("groups")),
                entitlements: str_list(claims.get("entitlements")),
                department: claims
                    .get("department")
                    .map(|v| v.as_str().map(str::to_owned)),
                role: claims.get("role").map(|v| v.as_str().map(str::to_owned)),
                ..IdentityPatch::default()
            };
            // Tokens issued before carry the old claims: retire them.
            vec![
                identity(user.clone(), patch),
                revoke(RevocationTarget::Subject, user),
            ]
        }
        ("caep", "device-compliance-change") => {
            let device = who.device.clone().ok_or_else(|| {
                set_err(
                    "invalid_request",
                    "device-compliance-change needs a device subject",
                )
            })?;
            let compliance = match ev.get("current_status").and_then(Value::as_str) {
                Some("compliant") => Compliance::Compliant,
                Some("not-compliant") => Compliance::NonCompliant,
                _ => {
                    return Err(set_err(
                        "invalid_request",
                        "current_status must be compliant or not-compliant",
                    ));
                }
            };
            vec![Change::Device {
                id: device,
                patch: DevicePatch {
                    compliance: Some(compliance),
                    ..DevicePatch::default()
                },
            }]
        }
        ("caep", "risk-level-change") => {
            let lvl = level(ev.get("current_level")).ok_or_else(|| {
                set_err(
                    "invalid_request",
                    "risk-level-change needs current_level LOW|MEDIUM|HIGH",
                )
            })?;
            match ev
                .get("principal")
                .and_then(Value::as_str)
                .map(str::to_ascii_uppercase)
                .as_deref()
            {
                Some("DEVICE") => vec![Change::Device {
                    id: who.device.clone().or(who.user.clone()).ok_or_else(|| {
                        set_err("invalid_request", "risk-level-change names no device")
                    })?,
                    patch: DevicePatch {
                        threat: Some(lvl),
                        ..DevicePatch::default()
                    },
                }],
                Some("USER") => vec![identity(
                    need_user()?,
                    IdentityPatch {
                        risk: Some(lvl),
                        ..IdentityPatch::default()
                    },
                )],
                Some(_) => return Ok((kind, None)),
                None => {
                    return Err(set_err(
                        "invalid_request",
                        "risk-level-change needs principal",
                    ));
                }
            }
        }
        ("risc", "account-disabled") => {
            let u = need_user()?;
            vec![
                identity(
                    u.clone(),
                    IdentityPatch {
                        status: Some(IdentityStatus::Suspended),
                        ..IdentityPatch::default()
                    },
                ),
                revoke(RevocationTarget::Subject, u),
            ]
        }
        ("risc", "account-enabled") => vec![identity(
            need_user()?,
            IdentityPatch {
                status: Some(IdentityStatus::Active),
                ..IdentityPatch::default()
            },
        )],
        ("risc", "account-purged") => {
            let u = need_user()?;
            vec![
                identity(
                    u.clone(),
                    IdentityPatch {
                        status: Some(IdentityStatus::Terminated),
                        ..IdentityPatch::default()
                    },
                ),
                revoke(RevocationTarget::Subject, u),
            ]
        }
        ("risc", "credential-compromise") => {
            let u = need_user()?;
            vec![
                identity(
                    u.clone(),
                    IdentityPatch {
                        risk: Some(Threat::High),
                        ..IdentityPatch::default()
                    },
                ),
                revoke(RevocationTarget::Subject, u),
            ]
        }
        ("risc", "identifier-changed") => {
            let old = simple_value(&set.sub_id).ok_or_else(|| {
                set_err(
                    "invalid_request",
                    "identifier-changed needs an email or phone subject",
                )
            })?;
            let u = need_user()?;
            let mut patch = IdentityPatch {
                remove_aliases: vec![old],
                ..IdentityPatch::default()
            };
            if let Some(n) = ev.get("new-value").and_then(Value::as_str) {
                patch.add_aliases.push(n.to_owned());
            }
            vec![identity(u, patch)]
        }
        _ => return Ok((kind, None)),
    };
    Ok((
        kind.clone(),
        Some(PostureEvent {
            id: format!("ssf:{}:{}", set.iss, set.jti),
            feed: Feed::Ssf,
            kind,
            origin_ms,
            changes,
        }),
    ))
}

fn set_error_response(e: &SetError) -> AdminResponse {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"err": e.err, "description": e.description}),
    )
}

/// Verifies, maps and durably ingests one SET; returns the metrics kind.
pub async fn receive(
    ctx: &FeedContext,
    rx: &Receiver,
    set: &str,
) -> Result<(String, Option<Outcome>), SetError> {
    let verified = match rx.verify(set).await {
        Ok(v) => v,
        Err(e) => {
            super::count(&ctx.metrics, "ssf", &format!("ssf.{}", e.err), "rejected");
            return Err(e);
        }
    };
    let (kind, event) = match to_event(&verified, &ctx.posture) {
        Ok(x) => x,
        Err(e) => {
            super::count(&ctx.metrics, "ssf", "ssf.invalid-event", "rejected");
            return Err(e);
        }
    };
    let Some(event) = event else {
        super::count(&ctx.metrics, "ssf", &kind, "ignored");
        return Ok((kind, None));
    };
    match ctx.posture.ingest(vec![event]).await {
        Ok(o) => Ok((kind, o.first().copied())),
        Err(crate::posture::IngestError::Invalid(e)) => {
            // Future-dated events are counted by the apply path (`future`).
            if !e.is_future() {
                super::count(&ctx.metrics, "ssf", &kind, "rejected");
            }
            Err(set_err("invalid_request", e.to_string()))
        }
        Err(e) => Err(set_err("temporarily_unavailable", e.to_string())),
    }
}

/// `POST /ssf/push` (RFC 8935).
pub async fn push(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let Some(rx) = ctx.ssf.clone() else {
        return super::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the SSF receiver is not configured",
        );
    };
    if req.method() != http::Method::POST {
        return super::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST only",
        );
    }
    let authorized = rx
        .cfg
        .push_token
        .as_deref()
        .is_some_and(|t| super::bearer_is(&req, t));
    if !authorized {
        super::count(&ctx.metrics, "ssf", "ssf.authentication_failed", "rejected");
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"err": "authentication_failed", "description": "the transmitter's bearer token is missing or wrong"}),
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"portcullis-ssf\""),
        );
        return r;
    }
    let ct_ok = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/secevent+jwt"))
        });
    if !ct_ok {
        super::count(&ctx.metrics, "ssf", "ssf.invalid_request", "rejected");
        return set_error_response(&set_err(
            "invalid_request",
            "Content-Type must be application/secevent+jwt",
        ));
    }
    let body = match read_body(req, ctx.config.feeds.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            super::count(&ctx.metrics, "ssf", "ssf.too-large", "rejected");
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"err": "invalid_request", "description": "SET is over the size limit"}),
            );
        }
        Err(BodyError::Broken) => {
            return set_error_response(&set_err("invalid_request", "body not read"));
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return set_error_response(&set_err("invalid_request", "SET is not UTF-8"));
    };
    match receive(ctx, &rx, text).await {
        Ok(_) => {
            let mut resp = http::Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::ACCEPTED;
            resp
        }
        Err(e) if e.err == "temporarily_unavailable" => super::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            e.description,
        ),
        Err(e) => set_error_response(&e),
    }
}

#[derive(Deserialize)]
struct PollResponse {
    #[serde(default)]
    sets: Map<String, Value>,
    #[serde(rename = "moreAvailable", default)]
    more_available: bool,
}

/// Largest poll response accepted.
const MAX_POLL_BYTES: usize = 8 * 1024 * 1024;
/// Most SETs asked for per poll.
const POLL_MAX_EVENTS: usize = 100;

/// One poll exchange: sends the acks and errors from the previous round, gets
/// new SETs, stores each durably, and returns the next round's acks/errors
/// (acknowledging only what was stored) and whether more are available.
pub async fn poll_once(
    ctx: &FeedContext,
    rx: &Receiver,
    client: &hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    ack: Vec<String>,
    errs: Map<String, Value>,
) -> Result<(Vec<String>, Map<String, Value>, bool), String> {
    let url = rx.cfg.poll_url.as_deref().ok_or("no poll_url")?;
    let body = serde_json::json!({
        "maxEvents": POLL_MAX_EVENTS,
        "returnImmediately": true,
        "ack": ack,
        "setErrs": errs,
    });
    let mut b = Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json");
    if let Some(t) = &rx.cfg.poll_token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "poll timed out".to_owned())?
        .map_err(|e| format!("poll: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("poll: status {}", resp.status()));
    }
    let bytes = Limited::new(resp.into_body(), MAX_POLL_BYTES)
        .collect()
        .await
        .map_err(|e| format!("poll body: {e}"))?
        .to_bytes();
    let pr: PollResponse =
        serde_json::from_slice(&bytes).map_err(|e| format!("poll response: {e}"))?;
    let mut next_ack = Vec::new();
    let mut next_errs = Map::new();
    for (jti, set) in pr.sets {
        let Some(set) = set.as_str() else {
            next_errs.insert(
                jti,
                serde_json::json!({"err": "invalid_request", "description": "SET is not a string"}),
            );
            continue;
        };
        match receive(ctx, rx, set).await {
            Ok(_) => next_ack.push(jti),
            // Not stored: neither acknowledged nor reported, so it comes again.
            Err(e) if e.err == "temporarily_unavailable" => {}
            Err(e) => {
                next_errs.insert(
                    jti,
                    serde_json::json!({"err": e.err, "description": e.description}),
                );
            }
        }
    }
    Ok((next_ack, next_errs, pr.more_available))
}

/// Runs the poll loop until the shutdown signal.
pub async fn poll_loop(
    ctx: Arc<FeedContext>,
    rx: Arc<Receiver>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(
            crate::tls::outbound::https_connector(roots, Duration::from_secs(5)),
        );
    let interval = Duration::from_millis(rx.cfg.poll_interval_ms.max(100));
    let (mut ack, mut errs) = (Vec::new(), Map::new());
    loop {
        let more = match poll_once(
            &ctx,
            &rx,
            &client,
            std::mem::take(&mut ack),
            std::mem::take(&mut errs),
        )
        .await
        {
            Ok((a, e, more)) => {
                ack = a;
                errs = e;
                more || !ack.is_empty() || !errs.is_empty()
            }
            Err(e) => {
                tracing::warn!(error = %e, "ssf poll failed; retrying");
                false
            }
        };
        let wait = if more { Duration::ZERO } else { interval };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
