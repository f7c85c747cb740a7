//! Every refusal, and the one function that turns it into a response.
//!
//! Read this file to know every status code the proxy answers on its own and
//! why. Bodies are small JSON objects with a stable `error` code, a one-line
//! `error_description`, and the request id; they never echo tokens.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::client::ProxyBody;
use crate::authn::{AuthError, Scheme};
use crate::binding::dpop::DpopError;
use crate::binding::{BindError, WorkloadError};
use crate::policy::PolicyRefusal;

/// Where a refusal came from, in Pingora's sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's request.
    Downstream,
    /// The upstream app.
    Upstream,
    /// The proxy itself.
    Internal,
}

/// Why the proxy answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    /// No route for this host and path.
    #[error("no route for this host and path")]
    NoRoute,
    /// The request carries no valid token (or none under the `Bearer` scheme).
    #[error("{0}")]
    Unauthenticated(AuthError),
    /// The token under the `DPoP` scheme is not valid.
    #[error("{0}")]
    DpopTokenInvalid(AuthError),
    /// The DPoP proof failed a check; `nonce` is a fresh server nonce for
    /// the `use_dpop_nonce` answer.
    #[error("{error}")]
    DpopInvalid {
        /// Which check.
        error: DpopError,
        /// A fresh nonce, when the error asks for one.
        nonce: Option<String>,
    },
    /// The token's binding (DPoP key, certificate, device) does not hold here.
    #[error("{error}")]
    BindingMismatch {
        /// The scheme the token came under (picks the challenge).
        scheme: Scheme,
        /// What does not hold.
        error: BindError,
    },
    /// A client certificate is needed and none was presented.
    #[error("{0}")]
    ClientCertRequired(WorkloadError),
    /// The connection's client certificate has expired since the handshake.
    #[error("client certificate has expired")]
    ClientCertExpired,
    /// The workload's SPIFFE id is not allowed on this route.
    #[error("{0}")]
    WorkloadNotAllowed(WorkloadError),
    /// The host needs a client certificate but this connection's handshake
    /// (another SNI) never asked for one: reconnect with the right name.
    #[error("this host requires a connection made for its own name")]
    Misdirected,
    /// The request body is over the route's limit.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The posture baseline refused: subject disabled, credential revoked,
    /// device lost / wiped / compromised.
    #[error("{0}")]
    Posture(crate::posture::PostureDenial),
    /// A policy decision refused: deny, restrict (writes), step-up, a
    /// session past its cap, or revoke.
    #[error("{0}")]
    Policy(crate::policy::PolicyRefusal),
    /// The request is malformed in a way hyper let through.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The upstream refused the connection or failed mid-request.
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// Something in the proxy failed; fail closed.
    #[error("internal error")]
    Internal,
}

impl Denial {
    /// Status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::NoRoute => StatusCode::NOT_FOUND,
            Denial::Unauthenticated(_)
            | Denial::DpopTokenInvalid(_)
            | Denial::BindingMismatch { .. } => StatusCode::UNAUTHORIZED,
            // A revoked credential is an invalid token: the client must re-authenticate.
            Denial::Posture(crate::posture::PostureDenial::Revoked(_)) => StatusCode::UNAUTHORIZED,
            Denial::Posture(_) => StatusCode::FORBIDDEN,
            Denial::DpopInvalid {
                error: DpopError::ReplayCacheFull | DpopError::ReplayCheckUnavailable,
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            Denial::DpopInvalid { .. } => StatusCode::UNAUTHORIZED,
            Denial::ClientCertRequired(_)
            | Denial::ClientCertExpired
            | Denial::WorkloadNotAllowed(_) => StatusCode::FORBIDDEN,
            Denial::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            // Step-up, an expired session and revocation: the client must
            // authenticate again; deny and restrict: it cannot fix this by
            // re-authenticating (standards.md §4.4).
            Denial::Policy(
                PolicyRefusal::StepUp { .. }
                | PolicyRefusal::SessionCapped { .. }
                | PolicyRefusal::Revoked { .. },
            ) => StatusCode::UNAUTHORIZED,
            Denial::Policy(PolicyRefusal::Denied { .. } | PolicyRefusal::Restricted { .. }) => {
                StatusCode::FORBIDDEN
            }
            Denial::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Denial::BadRequest(_) => StatusCode::BAD_REQUEST,
            Denial::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Denial::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Denial::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code (also the metrics `reason` label).
    pub fn code(&self) -> &'static str {
        match self {
            Denial::NoRoute => "no_route",
            Denial::Unauthenticated(AuthError::Missing) => "missing_token",
            Denial::Unauthenticated(_) | Denial::DpopTokenInvalid(_) => "invalid_token",
            Denial::Posture(p) => p.code(),
            Denial::DpopInvalid { error, .. } => match error {
                e if e.wants_nonce() => "use_dpop_nonce",
                DpopError::KeyMismatch => "binding_mismatch",
                DpopError::ReplayCacheFull => "dpop_replay_cache_full",
                DpopError::ReplayCheckUnavailable => "dpop_replay_check_unavailable",
                _ => "invalid_dpop_proof",
            },
            Denial::BindingMismatch {
                error: BindError::Required,
                ..
            } => "binding_required",
            Denial::BindingMismatch { .. } => "binding_mismatch",
            Denial::ClientCertRequired(_) => "client_certificate_required",
            Denial::ClientCertExpired => "client_certificate_expired",
            Denial::WorkloadNotAllowed(_) => "workload_not_allowed",
            Denial::Misdirected => "misdirected_request",
            Denial::Policy(p) => p.code(),
            Denial::BodyTooLarge { .. } => "body_too_large",
            Denial::BadRequest(_) => "bad_request",
            Denial::UpstreamUnavailable => "upstream_unavailable",
            Denial::UpstreamTimeout => "upstream_timeout",
            Denial::Internal => "internal_error",
        }
    }

    /// Where it came from.
    pub fn origin(&self) -> Origin {
        match self {
            Denial::UpstreamUnavailable | Denial::UpstreamTimeout => Origin::Upstream,
            Denial::Internal
            | Denial::DpopInvalid {
                error: DpopError::ReplayCacheFull | DpopError::ReplayCheckUnavailable,
                ..
            } => Origin::Internal,
            _ => Origin::Downstream,
        }
    }

    /// The access decision this refusal stands for, for metrics.
    pub fn action(&self) -> &'static str {
        match self {
            Denial::Unauthenticated(_)
            | Denial::DpopTokenInvalid(_)
            | Denial::DpopInvalid { .. }
            | Denial::BindingMismatch { .. }
            | Denial::ClientCertRequired(_)
            | Denial::ClientCertExpired
            | Denial::WorkloadNotAllowed(_)
            | Denial::Misdirected
            | Denial::Posture(_)
            | Denial::NoRoute => "deny",
            Denial::Policy(p) => p.action(),
            _ => "allow",
        }
    }
}

/// Quotes a value for an auth-param (RFC 9110 §11.2): no `"` or `\` inside.
fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

/// `Bearer` challenge with `error="invalid_token"` (RFC 6750 §3).
fn bearer_invalid(description: &str) -> String {
    format!(
        "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
        quoted(description)
    )
}

/// `DPoP` challenge (RFC 9449 §7.1), with `algs` when DPoP is on.
fn dpop_challenge(error: Option<&str>, description: &str, algs: &str) -> String {
    let mut c = "DPoP".to_owned();
    let mut sep = " ";
    if let Some(e) = error {
        c.push_str(&format!(
            " error=\"{e}\", error_description=\"{}\"",
            quoted(description)
        ));
        sep = ", ";
    }
    if !algs.is_empty() {
        c.push_str(&format!("{sep}algs=\"{}\"", quoted(algs)));
    }
    c
}

/// The `WWW-Authenticate` challenges for a refusal, one header field each.
/// `dpop_algs` is empty when DPoP is off (then no DPoP challenge is offered).
fn challenges(d: &Denial, dpop_algs: &str) -> Vec<String> {
    let dpop_on = !dpop_algs.is_empty();
    let offer_dpop = |mut v: Vec<String>| {
        if dpop_on {
            v.push(dpop_challenge(None, "", dpop_algs));
        }
        v
    };
    let desc = d.to_string();
    match d {
        // RFC 6750 §3.1: no error code when the request had no credentials.
        Denial::Unauthenticated(AuthError::Missing | AuthError::NotBearer) => {
            offer_dpop(vec!["Bearer realm=\"portcullis\"".to_owned()])
        }
        Denial::Unauthenticated(_) => vec![bearer_invalid(&desc)],
        Denial::Posture(crate::posture::PostureDenial::Revoked(_)) => vec![bearer_invalid(&desc)],
        Denial::DpopTokenInvalid(_) => {
            vec![dpop_challenge(Some("invalid_token"), &desc, dpop_algs)]
        }
        Denial::DpopInvalid { error, .. } => {
            let code = match error {
                e if e.wants_nonce() => "use_dpop_nonce",
                DpopError::KeyMismatch => "invalid_token",
                DpopError::ReplayCacheFull | DpopError::ReplayCheckUnavailable => {
                    return Vec::new();
                }
                _ => "invalid_dpop_proof",
            };
            vec![dpop_challenge(Some(code), &desc, dpop_algs)]
        }
        Denial::BindingMismatch {
            scheme: Scheme::Dpop,
            ..
        } => vec![dpop_challenge(Some("invalid_token"), &desc, dpop_algs)],
        Denial::BindingMismatch {
            scheme: Scheme::Bearer,
            ..
        } => offer_dpop(vec![bearer_invalid(&desc)]),
        _ => Vec::new(),
    }
}

/// Turns a refusal into the response the client sees. `dpop_algs` lists the
/// accepted DPoP algorithms (space-separated; empty when DPoP is off).
pub fn respond(d: &Denial, request_id: &str, dpop_algs: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": d.code(),
        "error_description": d.to_string(),
        "request_id": request_id,
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = d.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    for c in challenges(d, dpop_algs) {
        if let Ok(v) = HeaderValue::from_str(&c) {
            h.append(header::WWW_AUTHENTICATE, v);
        }
    }
    if let Denial::DpopInvalid { nonce: Some(n), .. } = d
        && let Ok(v) = HeaderValue::from_str(n)
    {
        h.insert("dpop-nonce", v);
    }
    if matches!(d, Denial::Misdirected) {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Denial::Policy(p) = d
        && let Some(challenge) = p.challenge()
        && let Ok(v) = HeaderValue::from_str(&challenge)
    {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn www(d: &Denial) -> Vec<String> {
        respond(d, "id", "ES256 EdDSA")
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn challenges_follow_rfc_6750_and_9449() {
        assert_eq!(
            www(&Denial::Unauthenticated(AuthError::Missing)),
            ["Bearer realm=\"portcullis\"", "DPoP algs=\"ES256 EdDSA\""]
        );
        let proof = www(&Denial::DpopInvalid {
            error: DpopError::Replayed,
            nonce: None,
        });
        assert_eq!(
            proof,
            [
                "DPoP error=\"invalid_dpop_proof\", error_description=\"DPoP proof `jti` was already used\", algs=\"ES256 EdDSA\""
            ]
        );
        let bound = www(&Denial::BindingMismatch {
            scheme: Scheme::Bearer,
            error: BindError::DpopTokenAsBearer,
        });
        assert!(bound[0].starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\""));
        assert_eq!(bound[1], "DPoP algs=\"ES256 EdDSA\"");
        let nonce = respond(
            &Denial::DpopInvalid {
                error: DpopError::NonceRequired,
                nonce: Some("n-1".into()),
            },
            "id",
            "ES256",
        );
        assert_eq!(nonce.headers()["dpop-nonce"], "n-1");
        assert!(
            nonce.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap_or("")
                .starts_with("DPoP error=\"use_dpop_nonce\"")
        );
    }
}
