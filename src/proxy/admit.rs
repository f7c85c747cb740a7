//! Phase 0, admit: strict HTTP framing before any phase reads the request.
//!
//! hyper has already parsed the message; what it lets through and RFC 9112 /
//! RFC 9113 forbid is refused here, so the route, the token checks and the
//! upstream never see an ambiguous request. One pass, no allocation for the
//! common request (one `Host`, no `Transfer-Encoding`, no `_` in a name).
//!
//! What hyper itself does before this phase (HTTP/1.1 server):
//! - a `Transfer-Encoding` whose last coding is not `chunked` → 400 (hyper);
//! - `Transfer-Encoding` together with `Content-Length` → hyper drops
//!   `Content-Length`, frames the body by `Transfer-Encoding` alone and closes
//!   the connection after the response (RFC 9112 §6.1). The header is gone
//!   before this phase runs, so the request cannot be refused here; it can
//!   no longer be smuggled either: the upstream gets chunked framing only.

use http::header::{self, HeaderMap};
use http::{Request, Version};

use super::rescue::Denial;

/// A framing fault in the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// HTTP/1.1 without `Host` (RFC 9112 §3.2).
    #[error("HTTP/1.1 request without a `Host` header")]
    MissingHost,
    /// More than one `Host` line (RFC 9112 §3.2).
    #[error("more than one `Host` header")]
    DuplicateHost,
    /// HTTP/2 with neither `:authority` nor `Host` (RFC 9113 §8.3.1).
    #[error("request names no authority (`:authority` or `Host`)")]
    MissingAuthority,
    /// HTTP/2 `Host` naming another authority than `:authority` (RFC 9113 §8.3.1).
    #[error("`Host` differs from `:authority`")]
    AuthorityMismatch,
    /// A transfer coding other than one final `chunked` (RFC 9112 §6.1).
    #[error("transfer coding other than a single `chunked` is not implemented")]
    TransferCoding,
    /// The request body broke its framing (a malformed chunk) or the client
    /// stopped sending it.
    #[error("request body is malformed or incomplete")]
    Body,
}

impl FramingError {
    /// Stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            FramingError::MissingHost => "missing_host",
            FramingError::DuplicateHost => "duplicate_host",
            FramingError::MissingAuthority => "missing_authority",
            FramingError::AuthorityMismatch => "authority_mismatch",
            FramingError::TransferCoding => "unsupported_transfer_coding",
            FramingError::Body => "malformed_body",
        }
    }

    /// Whether the connection must close after the answer: the body's
    /// framing is unknown, so the next request's start is too.
    pub fn closes(self) -> bool {
        matches!(self, FramingError::TransferCoding | FramingError::Body)
    }
}

/// What admission learnt about the request, for later phases.
#[derive(Debug, Clone, Copy, Default)]
pub struct Admitted {
    /// Some header name contains `_` (dropped once the route is known).
    pub underscored: bool,
}

/// Phase 0: checks `Host` / `:authority` and `Transfer-Encoding`, and notes
/// whether a header name holds `_`.
pub fn admit<B>(req: &Request<B>) -> Result<Admitted, Denial> {
    let h = req.headers();
    let mut hosts = h.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Denial::Framing(FramingError::DuplicateHost));
    }
    match req.version() {
        Version::HTTP_11 if host.is_none() => {
            return Err(Denial::Framing(FramingError::MissingHost));
        }
        // An absolute-form target (`GET https://a/ HTTP/1.1`) wins over
        // `Host` (RFC 9112 §3.2.2): every phase reads the URI's authority first.
        Version::HTTP_2 => match (req.uri().authority(), host) {
            (None, None) => return Err(Denial::Framing(FramingError::MissingAuthority)),
            (Some(a), Some(h)) if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) => {
                return Err(Denial::Framing(FramingError::AuthorityMismatch));
            }
            _ => {}
        },
        _ => {}
    }
    transfer_coding(h)?;
    Ok(Admitted {
        underscored: h.keys().any(|n| n.as_str().as_bytes().contains(&b'_')),
    })
}

/// Only one `Transfer-Encoding` line, and it says `chunked` alone.
fn transfer_coding(h: &HeaderMap) -> Result<(), Denial> {
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else {
        return Ok(());
    };
    let only_chunked = first
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"chunked");
    if !only_chunked || te.next().is_some() {
        return Err(Denial::Framing(FramingError::TransferCoding));
    }
    Ok(())
}

/// Marks an error that came from reading the client's request body, so a
/// failed upstream exchange can tell the client's fault from the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// True when `e`, or an error it wraps, is a [`ClientBodyError`].
pub fn is_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<ClientBodyError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap_or_default()
    }

    fn fault(r: &Request<()>) -> Option<&'static str> {
        match admit(r) {
            Ok(_) => None,
            Err(Denial::Framing(f)) => Some(f.code()),
            Err(_) => Some("other"),
        }
    }

    #[test]
    fn host_rules_follow_rfc_9112_and_9113() {
        let h11 = Version::HTTP_11;
        assert_eq!(fault(&req(h11, "/", &[("host", "a")])), None);
        assert_eq!(fault(&req(h11, "/", &[])), Some("missing_host"));
        assert_eq!(
            fault(&req(h11, "/", &[("host", "a"), ("host", "b")])),
            Some("duplicate_host")
        );
        assert_eq!(fault(&req(Version::HTTP_10, "/", &[])), None);
        let h2 = Version::HTTP_2;
        assert_eq!(fault(&req(h2, "https://a:1/", &[])), None);
        assert_eq!(fault(&req(h2, "https://a:1/", &[("host", "A:1")])), None);
        assert_eq!(
            fault(&req(h2, "https://a:1/", &[("host", "b:1")])),
            Some("authority_mismatch")
        );
        assert_eq!(fault(&req(h2, "/", &[])), Some("missing_authority"));
    }

    #[test]
    fn only_a_single_chunked_coding_passes() {
        let ok = |te: &[&str]| {
            let mut hs = vec![("host", "a")];
            hs.extend(te.iter().map(|v| ("transfer-encoding", *v)));
            fault(&req(Version::HTTP_11, "/", &hs)).is_none()
        };
        assert!(ok(&[]));
        assert!(ok(&["chunked"]));
        assert!(ok(&["Chunked "]));
        assert!(!ok(&["gzip, chunked"]));
        assert!(!ok(&["chunked, chunked"]));
        assert!(!ok(&["gzip", "chunked"]));
        assert!(!ok(&["identity"]));
    }

    #[test]
    fn notes_underscored_names() {
        let r = req(Version::HTTP_11, "/", &[("host", "a"), ("x-a", "1")]);
        assert!(admit(&r).is_ok_and(|a| !a.underscored));
        let r = req(Version::HTTP_11, "/", &[("host", "a"), ("x_a", "1")]);
        assert!(admit(&r).is_ok_and(|a| a.underscored));
    }
}
