//! Every refusal, and the one function that turns it into a response.
//!
//! Read this file to know every status code the proxy answers on its own and
//! why. Bodies are small JSON objects with a stable `error` code, a one-line
//! `error_description`, and the request id; they never echo tokens.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::admit::FramingError;
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
    /// The request's framing is ambiguous or unsupported (phase 0): `Host`
    /// missing or repeated, `Host` ≠ `:authority`, a transfer coding other
    /// than `chunked`, a malformed body.
    #[error("{0}")]
    Framing(FramingError),
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
    /// A browser without a usable session: off to the IdP (or, on a step-up,
    /// back to it with the stronger requirement).
    #[error("login required")]
    LoginRequired(Box<crate::session::Redirect>),
    /// An API client on a browser route without a usable session.
    #[error("this route needs a browser session; log in first")]
    SessionRequired,
    /// The session cookie is malformed or duplicated.
    #[error("{0}")]
    SessionCookie(crate::session::CookieError),
    /// The session is bound to a client certificate this connection does not present.
    #[error("this session belongs to another device")]
    SessionBindingMismatch,
    /// A login callback, logout or back-channel logout was refused.
    #[error("{0}")]
    Login(crate::session::LoginError),
    /// A DBSC-bound session without a valid bound cookie: the browser must
    /// refresh with a proof of its key first. `reproof`: for a browser, the
    /// 307 to the same URL that expires the bound cookie (the draft's
    /// forced re-proof); API clients get 401.
    #[error("{error}")]
    BoundCookie {
        /// What is wrong with the bound cookie.
        error: crate::session::dbsc::DbscError,
        /// The re-proof redirect, for browsers.
        reproof: Option<Box<crate::session::Redirect>>,
    },
    /// A DBSC registration or refresh proof was refused.
    #[error("{0}")]
    DbscProof(crate::session::dbsc::DbscError),
}

impl Denial {
    /// Status code.
    pub fn status(&self) -> StatusCode {
        match self {
            // RFC 9112 §6.1: a transfer coding the server does not implement.
            Denial::Framing(FramingError::TransferCoding) => StatusCode::NOT_IMPLEMENTED,
            Denial::Framing(_) => StatusCode::BAD_REQUEST,
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
            Denial::LoginRequired(r) => r.status,
            Denial::SessionRequired => StatusCode::UNAUTHORIZED,
            Denial::SessionCookie(_) => StatusCode::BAD_REQUEST,
            Denial::SessionBindingMismatch => StatusCode::FORBIDDEN,
            Denial::Login(e) => e.status(),
            Denial::BoundCookie {
                reproof: Some(r), ..
            } => r.status,
            // Any 4xx but 403 ends the attempt in the browser (DBSC §1.7);
            // 403 is reserved for "sign this new challenge".
            Denial::BoundCookie { .. } | Denial::DbscProof(_) => StatusCode::UNAUTHORIZED,
        }
    }

    /// Stable machine-readable code (also the metrics `reason` label).
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Framing(f) => f.code(),
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
            Denial::LoginRequired(_) | Denial::SessionRequired => "login_required",
            Denial::SessionCookie(_) => "invalid_session_cookie",
            Denial::SessionBindingMismatch => "session_binding_mismatch",
            Denial::Login(e) => e.code(),
            Denial::BoundCookie { error, .. } | Denial::DbscProof(error) => error.code(),
        }
    }

    /// Where it came from.
    pub fn origin(&self) -> Origin {
        match self {
            Denial::UpstreamUnavailable | Denial::UpstreamTimeout => Origin::Upstream,
            Denial::Internal
            | Denial::Login(crate::session::LoginError::Store)
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
            | Denial::Framing(_)
            | Denial::SessionRequired
            | Denial::SessionCookie(_)
            | Denial::SessionBindingMismatch
            | Denial::Login(_)
            | Denial::BoundCookie { .. }
            | Denial::DbscProof(_)
            | Denial::NoRoute => "deny",
            Denial::LoginRequired(_) => "login",
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

/// How the client of a refused request reads answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// API clients (and every bearer route): JSON bodies, challenges.
    Api,
    /// A person in a browser on a browser route: redirects to log in, and a
    /// small HTML page for refusals.
    Browser {
        /// The request rode on a session that has now ended: clear its cookie.
        clear_session: bool,
    },
}

/// Escapes text for HTML element content and attribute values.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A one-line title for the refusal page.
fn page_title(d: &Denial) -> &'static str {
    match d.status() {
        StatusCode::UNAUTHORIZED => "Please sign in again",
        StatusCode::FORBIDDEN => "Access refused",
        StatusCode::BAD_REQUEST => "Sign-in could not be completed",
        s if s.is_server_error() => "Service unavailable",
        _ => "Request refused",
    }
}

/// Turns a refusal into the response for `audience`: the JSON of
/// [`respond`] for API clients; for browsers a redirect (login, step-up) or
/// a small accessible HTML page with the reason and the request id (no
/// external assets, everything escaped).
pub fn respond_to(
    d: &Denial,
    request_id: &str,
    dpop_algs: &str,
    audience: Audience,
) -> Response<ProxyBody> {
    let Audience::Browser { clear_session } = audience else {
        return respond(d, request_id, dpop_algs);
    };
    if let Denial::LoginRequired(r)
    | Denial::BoundCookie {
        reproof: Some(r), ..
    } = d
    {
        return super::browser::redirect_response(r, request_id);
    }
    let title = page_title(d);
    let reason = html_escape(&d.to_string());
    let id = html_escape(request_id);
    let code = d.code();
    let again = if clear_session || d.status() == StatusCode::UNAUTHORIZED {
        "<p><a href=\"/\">Sign in again</a></p>"
    } else {
        ""
    };
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head>\
<body><main><h1>{title}</h1><p role=\"alert\">{reason}</p>{again}\
<p><small>Code: <code>{code}</code>. Request id: <code>{id}</code>. \
Quote the request id when you ask for help.</small></p></main></body></html>\n"
    );
    let mut resp = html_page(Bytes::from(body), "default-src 'none'", request_id);
    *resp.status_mut() = d.status();
    let h = resp.headers_mut();
    if (clear_session || matches!(d, Denial::SessionCookie(_)))
        && let Ok(v) = HeaderValue::from_str(&crate::session::cookie::clear(
            crate::session::cookie::SESSION_COOKIE,
        ))
    {
        h.append(header::SET_COOKIE, v);
    }
    resp
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
    if matches!(d, Denial::Misdirected) || matches!(d, Denial::Framing(f) if f.closes()) {
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

/// A small HTML page the proxy itself serves: no caching, a strict CSP, the
/// request id.
pub(crate) fn html_page(body: Bytes, csp: &str, request_id: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A CSP that is not a valid header value (it never is: callers build it
    // from constants and a checked origin) falls back to the strictest one.
    let csp = HeaderValue::from_str(csp).unwrap_or(HeaderValue::from_static("default-src 'none'"));
    h.insert("content-security-policy", csp);
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
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
    fn browser_pages_escape_and_clear_ended_sessions() {
        let d = Denial::Policy(PolicyRefusal::Denied {
            reason: "<script>alert(1)</script> & \"x\"".into(),
        });
        let r = respond_to(
            &d,
            "id<1>",
            "",
            Audience::Browser {
                clear_session: true,
            },
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap_or("")
                .starts_with("text/html")
        );
        assert!(
            r.headers()[header::SET_COOKIE]
                .to_str()
                .unwrap_or("")
                .contains("Max-Age=0")
        );
        let api = respond_to(&d, "id", "", Audience::Api);
        assert_eq!(
            api.headers()[header::CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
        assert_eq!(
            html_escape("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
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
