//! The server-side record of one browser session. Only a hash of the
//! session id is ever stored or logged; the id itself lives in the browser's
//! cookie alone.

use serde::{Deserialize, Serialize};

/// How a browser session is tied to the device it was created on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionBinding {
    /// Nothing ties the cookie to the device (unmanaged, BYOD, partner).
    #[default]
    None,
    /// DBSC: a registered device key must refresh a short-lived bound cookie.
    Dbsc,
    /// The client certificate of the login connection; the cookie is only
    /// honoured on a connection presenting the same certificate.
    Mtls,
}

impl SessionBinding {
    /// `none`, `dbsc` or `mtls`: what policies see as `context.session.binding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Dbsc => "dbsc",
            Self::Mtls => "mtls",
        }
    }
}

/// One browser session, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    /// Hex SHA-256 of the session id (the cookie value); the record's key.
    pub id_hash: String,
    /// The subject the IdP authenticated.
    pub subject: String,
    /// The `[[issuers]]` name of the IdP.
    pub issuer: String,
    /// The device: proven by the client certificate (`device_verified`), or
    /// named by the ID token's device claim (unverified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// True when a client certificate proved `device`.
    #[serde(default)]
    pub device_verified: bool,
    /// How the session is bound to its device.
    #[serde(default)]
    pub binding: SessionBinding,
    /// Hex SHA-256 of the client certificate, for `binding = mtls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_thumbprint: Option<String>,
    /// Authentication context class the IdP asserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    /// Authentication methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    /// When the person last authenticated at the IdP (s since epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<u64>,
    /// The IdP's session id (`sid`), for back-channel logout and CAEP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_sid: Option<String>,
    /// Created, s since epoch.
    pub created_s: u64,
    /// Last seen as recorded durably (coarse; the live value is in memory).
    pub last_seen_s: u64,
    /// Idle timeout, seconds.
    pub idle_timeout_s: u64,
    /// Absolute expiry, s since epoch (a `shorten` decision may lower it).
    pub expires_s: u64,
    /// DBSC state, owned by `session::dbsc` (opaque JSON here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbsc: Option<serde_json::Value>,
}

impl SessionRecord {
    /// True while neither the absolute expiry nor the idle timeout passed.
    pub fn live_at(&self, now: u64, last_seen: u64) -> bool {
        now < self.expires_s && now < last_seen.saturating_add(self.idle_timeout_s)
    }
}

/// The `jti` of the principal a session becomes (`session:` + the first 32
/// hex digits of its id hash): live connections on the session carry it,
/// and change notices name a deleted session by it.
pub fn principal_jti(id_hash: &str) -> String {
    format!("session:{}", &id_hash[..id_hash.len().min(32)])
}

impl SessionRecord {
    /// The record with a registered DBSC key: `binding` becomes `dbsc`
    /// unless a client certificate already binds the session.
    pub fn with_dbsc(&self, dbsc: serde_json::Value) -> SessionRecord {
        let mut r = self.clone();
        r.dbsc = Some(dbsc);
        if r.binding == SessionBinding::None {
            r.binding = SessionBinding::Dbsc;
        }
        r
    }
}
