//! A verified token's claims: what authentication hands the later phases.
//!
//! Its own room, below both `authn` (which verifies tokens into it) and
//! `policy` (which decides on it), so the policy room does not import the
//! authentication room and `authn` may hold the policy's per-token memo.

use serde::Deserialize;

/// A verified token's claims, as later stages read them.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Subject.
    pub sub: String,
    /// Issuer (already matched exactly).
    pub iss: String,
    /// Expiry, seconds since epoch.
    pub exp: u64,
    /// Not-before.
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued-at.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Token id.
    #[serde(default)]
    pub jti: Option<String>,
    /// Session id (OIDC `sid`).
    #[serde(default)]
    pub sid: Option<String>,
    /// Authentication context class.
    #[serde(default)]
    pub acr: Option<String>,
    /// Authentication methods.
    #[serde(default)]
    pub amr: Option<Vec<String>>,
    /// Time of the user's authentication.
    #[serde(default)]
    pub auth_time: Option<u64>,
    /// OAuth client id (RFC 9068).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Confirmation (RFC 7800): `x5t#S256`, `jkt`.
    #[serde(default)]
    pub cnf: Option<serde_json::Map<String, serde_json::Value>>,
    /// [`Claims::decision_fingerprint`], computed on first use.
    #[serde(skip)]
    pub(crate) fingerprint: std::sync::OnceLock<u128>,
}

impl Claims {
    /// A keyed 128-bit hash (SipHash-1-3, key random per process) of every
    /// claim a policy decision can depend on: `sub`, `iss`, `exp`, `iat`,
    /// `auth_time`, `acr`, `amr`, `client_id`, `jti`. The decision cache key
    /// takes it instead of re-reading those strings on every request (for a
    /// cached token they are cold in the CPU cache); computed once per
    /// verified token.
    pub fn decision_fingerprint(&self) -> u128 {
        *self.fingerprint.get_or_init(|| {
            static KEY: std::sync::OnceLock<crate::util::HashKey> = std::sync::OnceLock::new();
            KEY.get_or_init(crate::util::HashKey::random).hash128(&(
                &self.sub,
                &self.iss,
                self.exp,
                self.iat,
                self.auth_time,
                &self.acr,
                &self.amr,
                &self.client_id,
                &self.jti,
            ))
        })
    }
}
