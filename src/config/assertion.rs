//! `[assertion]` (the signed identity the upstream receives) and the
//! per-route keys that go with it: `assertion_audience`, `identity_headers`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{AuthMode, Config, ConfigError};

/// Default lifetime of an assertion, seconds.
pub const DEFAULT_ASSERTION_TTL_S: u64 = 60;
/// Ceiling on an assertion's lifetime, seconds.
pub const MAX_ASSERTION_TTL_S: u64 = 60;
/// Default time one signed assertion is reused for identical requests, seconds.
pub const DEFAULT_ASSERTION_REUSE_S: u64 = 10;
/// Default number of signed assertions kept for reuse.
pub const DEFAULT_ASSERTION_CACHE_CAPACITY: u64 = 50_000;
/// The request header the upstream receives the assertion in.
pub const ASSERTION_HEADER: &str = "x-portcullis-assertion";
/// The path, on the proxy listener, of the assertion's JWKS.
pub const ASSERTION_JWKS_PATH: &str = "/.well-known/portcullis/jwks.json";

fn d_assertion_ttl_s() -> u64 {
    DEFAULT_ASSERTION_TTL_S
}
fn d_assertion_reuse_s() -> u64 {
    DEFAULT_ASSERTION_REUSE_S
}
fn d_assertion_cache_capacity() -> u64 {
    DEFAULT_ASSERTION_CACHE_CAPACITY
}

/// The signed identity assertion (`x-portcullis-assertion`, ES256).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssertionConfig {
    /// The assertion's `iss`: this proxy's name (usually its public URL).
    pub issuer: String,
    /// Lifetime (`exp - iat`), seconds; at most 60.
    #[serde(default = "d_assertion_ttl_s")]
    pub ttl_s: u64,
    /// How long one signed assertion is reused for requests with identical
    /// claims (same subject, device, posture, route, decision), seconds;
    /// 0 signs every request. Must be below `ttl_s`.
    #[serde(default = "d_assertion_reuse_s")]
    pub reuse_s: u64,
    /// Signed assertions kept for reuse.
    #[serde(default = "d_assertion_cache_capacity")]
    pub cache_capacity: u64,
    /// The `kid` that signs; defaults to the first key. The JWKS publishes all keys.
    #[serde(default)]
    pub active_kid: Option<String>,
    /// Signing keys: the active one and the ones still published while
    /// apps' caches roll over (rotation).
    pub keys: Vec<AssertionKeyConfig>,
}

/// One ES256 signing key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssertionKeyConfig {
    /// Key id, in the JWT header and the JWKS.
    pub kid: String,
    /// P-256 private key, PKCS#8 PEM (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`).
    pub private_key_file: PathBuf,
}

/// Plain identity headers a route's app expects (the conventions of other
/// proxies). Every name set here is also stripped from client requests.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeadersConfig {
    /// The subject (`X-Forwarded-User`, `Remote-User`, ...).
    #[serde(default)]
    pub user: Option<String>,
    /// The email address, when known (`X-Auth-Request-Email`, ...).
    #[serde(default)]
    pub email: Option<String>,
    /// Group names, comma-separated (`X-Forwarded-Groups`, ...).
    #[serde(default)]
    pub groups: Option<String>,
    /// The device id.
    #[serde(default)]
    pub device: Option<String>,
}

impl IdentityHeadersConfig {
    /// `(field, header name)` for every configured header.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("user", &self.user),
            ("email", &self.email),
            ("groups", &self.groups),
            ("device", &self.device),
        ]
        .into_iter()
        .filter_map(|(f, n)| n.as_deref().map(|n| (f, n)))
    }
}

impl Config {
    pub(super) fn resolve_assertion_paths(&mut self, base: &std::path::Path) {
        if let Some(a) = self.assertion.as_mut() {
            for k in &mut a.keys {
                if k.private_key_file.is_relative() {
                    k.private_key_file = base.join(&k.private_key_file);
                }
            }
        }
    }

    pub(super) fn validate_assertion(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.assertion {
            if a.issuer.is_empty() {
                return Err(self.invalid("assertion.issuer", "must not be empty"));
            }
            if a.ttl_s == 0 || a.ttl_s > MAX_ASSERTION_TTL_S {
                return Err(self.invalid(
                    "assertion.ttl_s",
                    format!("{} is outside 1..={MAX_ASSERTION_TTL_S}", a.ttl_s),
                ));
            }
            if a.reuse_s >= a.ttl_s {
                return Err(self.invalid(
                    "assertion.reuse_s",
                    format!("{} must be below ttl_s ({})", a.reuse_s, a.ttl_s),
                ));
            }
            if a.keys.is_empty() {
                return Err(self.invalid("assertion.keys", "at least one key"));
            }
            let mut kids = std::collections::HashSet::new();
            for (i, k) in a.keys.iter().enumerate() {
                if k.kid.is_empty() || !kids.insert(k.kid.as_str()) {
                    return Err(self.invalid(
                        format!("assertion.keys[{i}].kid"),
                        format!("`{}` is empty or used twice", k.kid),
                    ));
                }
            }
            if let Some(active) = &a.active_kid
                && !kids.contains(active.as_str())
            {
                return Err(self.invalid(
                    "assertion.active_kid",
                    format!("no key with kid `{active}`"),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.assertion_audience.as_deref() == Some("") {
                return Err(self.invalid(
                    format!("routes[{i}].assertion_audience"),
                    "must not be empty",
                ));
            }
            for (field, name) in r.identity_headers.named() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(self.invalid(
                        format!("routes[{i}].identity_headers.{field}"),
                        format!("`{name}` is not a header name"),
                    ));
                }
                if r.auth == AuthMode::Public {
                    return Err(self.invalid(
                        format!("routes[{i}].identity_headers.{field}"),
                        "a public route has no identity to send",
                    ));
                }
            }
        }
        Ok(())
    }
}
