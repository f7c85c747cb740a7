//! Every SCIM refusal, and the one place it becomes a response (RFC 7644
//! §3.12: `status` as a string, `scimType` for 400s and 409s).

use http::StatusCode;

use super::super::AdminResponse;
use super::SCIM_JSON;

/// The SCIM error message schema.
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// A SCIM error: status, optional `scimType`, and a one-line detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimError {
    /// HTTP status.
    pub status: StatusCode,
    /// RFC 7644 `scimType`.
    pub scim_type: Option<&'static str>,
    /// Human-readable detail (lowercase, user input in backticks).
    pub detail: String,
    /// Metric kind suffix (`scim.<reason>`).
    pub reason: &'static str,
}

impl std::fmt::Display for ScimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl ScimError {
    fn new(
        status: StatusCode,
        scim_type: Option<&'static str>,
        reason: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            scim_type,
            detail: detail.into(),
            reason,
        }
    }

    /// 400 `invalidValue`: a required attribute is missing or a value has the wrong type.
    pub fn invalid_value(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some("invalidValue"), "invalid", d)
    }

    /// 400 `invalidSyntax`: the body is not JSON or not the expected message.
    pub fn invalid_syntax(d: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "malformed",
            d,
        )
    }

    /// 400 `invalidPath`: a PATCH path does not parse or names nothing valid.
    pub fn invalid_path(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some("invalidPath"), "invalid", d)
    }

    /// 400 `noTarget`: a PATCH operation has no target.
    pub fn no_target(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some("noTarget"), "invalid", d)
    }

    /// 400 `mutability`: an attempt to change a read-only attribute.
    pub fn mutability(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some("mutability"), "invalid", d)
    }

    /// 400 `invalidFilter`.
    pub fn invalid_filter(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some("invalidFilter"), "invalid", d)
    }

    /// 409 `uniqueness`.
    pub fn uniqueness(d: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, Some("uniqueness"), "conflict", d)
    }

    /// 404.
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, None, "not-found", d)
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            None,
            "unauthenticated",
            "a valid SCIM bearer token is required",
        )
    }

    /// 413.
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            "too-large",
            "request body is over the limit (feeds.max_body_bytes)",
        )
    }

    /// 405.
    pub fn method_not_allowed(d: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, None, "method", d)
    }

    /// 501.
    pub fn not_implemented(d: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, None, "unsupported", d)
    }

    /// 503: the store did not take the write; the client should retry.
    pub fn unavailable(d: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, None, "unavailable", d)
    }

    /// 500.
    pub fn internal(d: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, None, "internal", d)
    }

    /// The SCIM error response.
    pub fn response(&self) -> AdminResponse {
        let mut body = serde_json::json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.as_u16().to_string(),
            "detail": self.detail,
        });
        if let Some(t) = self.scim_type {
            body["scimType"] = t.into();
        }
        let mut r = super::super::json_typed(self.status, &body, SCIM_JSON);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"portcullis-scim\""),
            );
        }
        r
    }
}
