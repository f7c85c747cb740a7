//! The two cookies of a browser login: the session cookie (an opaque random
//! id, nothing else) and the short-lived pre-login cookie that carries
//! `state`, `nonce` and the return path through the IdP round trip, signed
//! with HMAC-SHA256 so the browser cannot change them.
//!
//! Both are `__Host-` cookies: Secure, Path=/, no Domain, so a sibling host
//! cannot set or read them. Neither value is ever logged.

use aws_lc_rs::{hmac, rand::SecureRandom};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "__Host-portcullis-session";
/// Name of the pre-login cookie.
pub const LOGIN_COOKIE: &str = "__Host-portcullis-login";
/// Random bytes in a session id (256 bits).
pub const SESSION_ID_BYTES: usize = 32;
/// Length of a session id as the cookie carries it (unpadded base64url).
pub const SESSION_ID_LEN: usize = 43;
/// Longest pre-login cookie value accepted.
pub const MAX_LOGIN_COOKIE: usize = 3072;
/// Longest return path kept.
pub const MAX_RETURN_PATH: usize = 2048;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a cookie was refused. Messages are safe to show: no cookie values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// The request carries the cookie more than once.
    #[error("the session cookie is present more than once")]
    Duplicate,
    /// Wrong length or alphabet.
    #[error("the session cookie is malformed")]
    Malformed,
    /// The pre-login cookie is missing.
    #[error("no login in progress (the login cookie is missing)")]
    NoLogin,
    /// Signature check failed or the content is not ours.
    #[error("the login cookie is invalid")]
    BadSignature,
    /// The login took too long.
    #[error("the login has expired; start again")]
    LoginExpired,
}

/// Fresh random bytes, base64url.
pub fn random_token(bytes: usize) -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut b)?;
    Ok(B64.encode(b))
}

/// A new session id (256 random bits).
pub fn new_session_id() -> Result<String, aws_lc_rs::error::Unspecified> {
    random_token(SESSION_ID_BYTES)
}

/// The key the store uses for a session: hex SHA-256 of its id.
pub fn id_hash(id: &str) -> String {
    hex::encode(crate::util::sha256(id.as_bytes()))
}

/// Every value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_values<'a>(headers: &'a http::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .collect()
}

/// The session id from the request, if it carries one. Oversized, malformed
/// or duplicated cookies are refused rather than guessed at.
pub fn session_id(headers: &http::HeaderMap) -> Result<Option<&str>, CookieError> {
    let values = cookie_values(headers, SESSION_COOKIE);
    match values.as_slice() {
        [] => Ok(None),
        [v] if v.len() == SESSION_ID_LEN
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok(Some(v))
        }
        [_] => Err(CookieError::Malformed),
        _ => Err(CookieError::Duplicate),
    }
}

/// `Set-Cookie` for a session id; a session cookie (no `Max-Age`) whose
/// server record holds the real expiry.
pub fn set_session(id: &str) -> String {
    format!("{SESSION_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Lax")
}

/// `Set-Cookie` that removes cookie `name`.
pub fn clear(name: &str) -> String {
    format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0")
}

/// What the pre-login cookie carries through the IdP round trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginState {
    /// OAuth `state` (random, 128 bits).
    pub state: String,
    /// OIDC `nonce` (random, 128 bits).
    pub nonce: String,
    /// Same-origin path to return to.
    pub return_to: String,
    /// Host the login started on (the callback must come back to it).
    pub host: String,
    /// Expiry, s since epoch.
    pub exp: u64,
    /// Step-up: the `acr_values` asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr_values: Option<String>,
    /// Step-up: the `max_age` asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u64>,
}

/// Signs and opens pre-login cookies; derives the PKCE verifier from
/// `state`, so the verifier never travels in a cookie.
pub struct LoginSigner {
    key: hmac::Key,
}

impl std::fmt::Debug for LoginSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginSigner")
    }
}

impl LoginSigner {
    /// A signer over `key` (at least 32 bytes of secret).
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// A signer with a fresh random key (pre-login cookies then do not
    /// survive a restart, which only restarts logins in flight).
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::SystemRandom::new().fill(&mut k)?;
        Ok(Self::new(&k))
    }

    /// The cookie value: base64url(JSON) `.` base64url(HMAC).
    pub fn seal(&self, s: &LoginState) -> Result<String, serde_json::Error> {
        let body = B64.encode(serde_json::to_vec(s)?);
        let tag = hmac::sign(&self.key, format!("login.{body}").as_bytes());
        Ok(format!("{body}.{}", B64.encode(tag.as_ref())))
    }

    /// Checks the signature (constant time) and the expiry.
    pub fn open(&self, value: &str, now: u64) -> Result<LoginState, CookieError> {
        if value.len() > MAX_LOGIN_COOKIE {
            return Err(CookieError::BadSignature);
        }
        let (body, tag) = value.split_once('.').ok_or(CookieError::BadSignature)?;
        let tag = B64.decode(tag).map_err(|_| CookieError::BadSignature)?;
        hmac::verify(&self.key, format!("login.{body}").as_bytes(), &tag)
            .map_err(|_| CookieError::BadSignature)?;
        let bytes = B64.decode(body).map_err(|_| CookieError::BadSignature)?;
        let s: LoginState =
            serde_json::from_slice(&bytes).map_err(|_| CookieError::BadSignature)?;
        if now >= s.exp {
            return Err(CookieError::LoginExpired);
        }
        Ok(s)
    }

    /// The PKCE `code_verifier` for a login (RFC 7636: 43 base64url chars).
    pub fn pkce_verifier(&self, state: &str) -> String {
        B64.encode(hmac::sign(&self.key, format!("pkce.{state}").as_bytes()).as_ref())
    }

    /// The S256 `code_challenge` for a verifier.
    pub fn pkce_challenge(verifier: &str) -> String {
        B64.encode(crate::util::sha256(verifier.as_bytes()))
    }

    /// A secret for another use, derived from this key (DBSC), so replicas
    /// sharing the cookie key share it and the two uses never mix.
    pub fn derive(&self, label: &str) -> Vec<u8> {
        hmac::sign(&self.key, format!("derive.{label}").as_bytes())
            .as_ref()
            .to_vec()
    }
}

/// The `Set-Cookie` for a sealed pre-login cookie.
pub fn set_login(value: &str, max_age_s: u64) -> String {
    format!("{LOGIN_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age_s}")
}

/// A same-origin return path, or `None`. Refuses absolute and
/// protocol-relative URLs (`//evil`, `/\evil`), control characters,
/// backslashes and their percent-encoded forms, and anything over
/// [`MAX_RETURN_PATH`].
pub fn safe_return_path(p: &str) -> Option<&str> {
    if p.is_empty() || p.len() > MAX_RETURN_PATH || !p.starts_with('/') {
        return None;
    }
    let second = p.as_bytes().get(1).copied();
    if matches!(second, Some(b'/') | Some(b'\\')) {
        return None;
    }
    if p.chars()
        .any(|c| c.is_control() || c == '\\' || c.is_whitespace())
    {
        return None;
    }
    // Encoded slashes, backslashes and control characters could be decoded
    // into one of the forms above by the app or the browser.
    let lower = p.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%0", "%1", "%7f"] {
        if lower.starts_with(&format!("/{bad}")) || (bad != "%2f" && lower.contains(bad)) {
            return None;
        }
    }
    Some(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn return_paths_stay_on_origin() {
        for good in ["/", "/app?x=1", "/a/b#c", "/a%2Fb"] {
            assert_eq!(safe_return_path(good), Some(good), "{good}");
        }
        for bad in [
            "",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example/",
            "evil",
            "/%2fevil.example",
            "/%5cevil.example",
            "/a\r\nSet-Cookie: x",
            "/a%0d%0aSet-Cookie:x",
            "/\tevil",
            "/a b",
        ] {
            assert_eq!(safe_return_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn login_cookie_is_tamper_evident() {
        let s = LoginSigner::new(&[7u8; 32]);
        let st = LoginState {
            state: "s".into(),
            nonce: "n".into(),
            return_to: "/".into(),
            host: "app.example".into(),
            exp: 100,
            acr_values: None,
            max_age: None,
        };
        let v = s.seal(&st).unwrap_or_default();
        assert_eq!(s.open(&v, 50), Ok(st.clone()));
        assert_eq!(s.open(&v, 100), Err(CookieError::LoginExpired));
        let mut t = v.clone().into_bytes();
        t[3] ^= 1;
        assert_eq!(
            s.open(&String::from_utf8_lossy(&t), 50),
            Err(CookieError::BadSignature)
        );
        let other = LoginSigner::new(&[8u8; 32]);
        assert_eq!(other.open(&v, 50), Err(CookieError::BadSignature));
        assert_eq!(s.pkce_verifier("s").len(), 43);
    }

    #[test]
    fn session_cookie_parsing_refuses_odd_shapes() {
        let mut h = http::HeaderMap::new();
        assert_eq!(session_id(&h), Ok(None));
        let id = new_session_id().unwrap_or_default();
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={id}")).unwrap(),
        );
        assert_eq!(session_id(&h), Ok(Some(id.as_str())));
        h.append(
            http::header::COOKIE,
            http::HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}")).unwrap(),
        );
        assert_eq!(session_id(&h), Err(CookieError::Duplicate));
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}x")).unwrap(),
        );
        assert_eq!(session_id(&h), Err(CookieError::Malformed));
    }
}
