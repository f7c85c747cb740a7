//! Every refusal, and the one function that turns it into a response.
//!
//! Read this file to know every status code the proxy answers on its own and
//! why. Bodies are small JSON objects with a stable `error` code, a one-line
//! `error_description`, and the request id; they never echo tokens.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::client::ProxyBody;
use crate::authn::AuthError;
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
    /// The request carries no valid token.
    #[error("{0}")]
    Unauthenticated(AuthError),
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
            Denial::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            // A revoked credential is an invalid token: the client must re-authenticate.
            Denial::Posture(crate::posture::PostureDenial::Revoked(_)) => StatusCode::UNAUTHORIZED,
            Denial::Posture(_) => StatusCode::FORBIDDEN,
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
            Denial::Unauthenticated(_) => "invalid_token",
            Denial::Posture(p) => p.code(),
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
            Denial::Internal => Origin::Internal,
            _ => Origin::Downstream,
        }
    }

    /// The access decision this refusal stands for, for metrics.
    pub fn action(&self) -> &'static str {
        match self {
            Denial::Unauthenticated(_) | Denial::NoRoute | Denial::Posture(_) => "deny",
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

/// Turns a refusal into the response the client sees.
pub fn respond(d: &Denial, request_id: &str) -> Response<ProxyBody> {
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
    if let Denial::Posture(p @ crate::posture::PostureDenial::Revoked(_)) = d {
        let challenge = format!(
            "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
            quoted(&p.to_string())
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if let Denial::Policy(p) = d
        && let Some(challenge) = p.challenge()
        && let Ok(v) = HeaderValue::from_str(&challenge)
    {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Denial::Unauthenticated(e) = d {
        let challenge = match e {
            // RFC 6750 §3.1: no error code when the request had no credentials.
            AuthError::Missing | AuthError::NotBearer => "Bearer realm=\"portcullis\"".to_owned(),
            e => format!(
                "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                quoted(&e.to_string())
            ),
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}
