//! The `[browser]` section: OIDC login and sessions.

use super::*;

/// Browser sessions idle longer than this end (seconds).
pub const DEFAULT_SESSION_IDLE_S: u64 = 3600;
/// Browser sessions end this long after login at the latest (seconds).
pub const DEFAULT_SESSION_MAX_S: u64 = 8 * 3600;
/// A login started must come back to the callback within this (seconds).
pub const DEFAULT_LOGIN_TIMEOUT_S: u64 = 600;
/// Scopes asked for at login.
pub const DEFAULT_BROWSER_SCOPES: &[&str] = &["openid"];
/// Offer DBSC registration after a login (browsers without DBSC ignore it).
pub const DEFAULT_DBSC: bool = true;
/// Lifetime of a DBSC bound cookie (seconds).
pub const DEFAULT_DBSC_COOKIE_TTL_S: u64 = 300;
/// Lifetime of a DBSC challenge (seconds): longer than the cookie, so a
/// challenge cached at one refresh still works at the next.
pub const DEFAULT_DBSC_CHALLENGE_TTL_S: u64 = 600;
/// Algorithm of the `private_key_jwt` client assertion.
pub const DEFAULT_CLIENT_KEY_ALG: &str = "ES256";

/// Browser login: the OIDC client portcullis is, and its sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserConfig {
    /// Name of the `[[issuers]]` entry that is the OpenID provider; its keys,
    /// algorithms and leeway verify ID tokens.
    pub issuer: String,
    /// OIDC client id (the ID token's `aud`).
    pub client_id: String,
    /// File holding the client secret (`client_secret_basic`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// PEM private key (PKCS#8) for `private_key_jwt` client authentication.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Algorithm of the client assertion (`ES256`, `RS256`, `PS256`…).
    #[serde(default = "d_client_key_alg")]
    pub client_key_alg: String,
    /// `kid` put in the client assertion's header.
    #[serde(default)]
    pub client_key_id: Option<String>,
    /// OIDC discovery URL; default: the issuer's `discovery_url`, else
    /// `<iss>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Scopes asked for (must include `openid`).
    #[serde(default = "d_browser_scopes")]
    pub scopes: Vec<String>,
    /// ID-token claim naming the browser's device (e.g. Entra `deviceid`);
    /// unverified. Default: the issuer's `device_claim`.
    #[serde(default)]
    pub device_claim: Option<String>,
    /// A session idle this long ends (seconds).
    #[serde(default = "d_session_idle_s")]
    pub session_idle_s: u64,
    /// A session ends this long after login at the latest (seconds).
    #[serde(default = "d_session_max_s")]
    pub session_max_s: u64,
    /// A login must complete within this (seconds).
    #[serde(default = "d_login_timeout_s")]
    pub login_timeout_s: u64,
    /// File with at least 32 random bytes keying the pre-login cookie's
    /// HMAC, shared by replicas; default: a fresh key per process.
    #[serde(default)]
    pub cookie_key_file: Option<PathBuf>,
    /// Offer DBSC (Device Bound Session Credentials) after a login on
    /// sessions no client certificate binds.
    #[serde(default = "d_dbsc")]
    pub dbsc: bool,
    /// Lifetime of a DBSC bound cookie (seconds); a refresh with a proof
    /// renews it.
    #[serde(default = "d_dbsc_cookie_ttl_s")]
    pub dbsc_cookie_ttl_s: u64,
    /// How long a DBSC challenge can be answered (seconds); longer than the
    /// cookie, so the challenge cached at one refresh serves the next.
    #[serde(default = "d_dbsc_challenge_ttl_s")]
    pub dbsc_challenge_ttl_s: u64,
}
