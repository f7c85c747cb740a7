//! Device Bound Session Credentials (W3C DBSC, draft of 2026-02; see
//! shared/reference/sessions-and-signals.md §1): the browser registers a
//! per-session key, and a short-lived bound cookie is issued and refreshed
//! only against a proof JWT signed with that key over a fresh challenge.
//!
//! This file is the protocol, with no I/O: the `Secure-Session-Registration`
//! offer, challenges, proof verification (registration and refresh), the
//! session instructions JSON and the bound cookie. The session layer stores
//! the [`DbscBinding`] in the session record and runs the endpoints.
//!
//! - Challenges and bound cookies are HMAC-SHA256-signed, stateless, and
//!   tied to one proxy session (by the hash of its id, never the id itself).
//! - A challenge is accepted once (a bounded replay cache until it expires).
//! - Proofs: `typ` = `dbsc+jwt`, `alg` ES256 or RS256 only (never `none`),
//!   the key from the registration proof's `jwk` header (or, for the older
//!   draft, a payload `jwk`/`key`), then pinned: a refresh proof must verify
//!   with the registered key and algorithm.
//! - A bound cookie carries when it was issued (milliseconds), so the
//!   session layer can demand a fresh proof at once after a posture change
//!   (`not_before`), even one in the same second as the last refresh.
//!
//! This room never logs a proof, a challenge, a cookie or a session id.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Response header offering registration (after a completed login).
pub const REGISTRATION_HEADER: &str = "secure-session-registration";
/// Response header carrying a challenge for the next proof.
pub const CHALLENGE_HEADER: &str = "secure-session-challenge";
/// Request header carrying the proof JWT (an sf-string).
pub const RESPONSE_HEADER: &str = "secure-session-response";
/// Request header naming the DBSC session on refresh (an sf-string).
pub const SESSION_ID_HEADER: &str = "sec-secure-session-id";
/// Request header a browser adds when it deliberately skipped a refresh.
pub const SKIPPED_HEADER: &str = "secure-session-skipped";
/// The registration endpoint (same origin as the app; out of the app's scope).
pub const REGISTER_PATH: &str = "/.portcullis/dbsc/register";
/// The refresh endpoint.
pub const REFRESH_PATH: &str = "/.portcullis/dbsc/refresh";
/// The bound cookie: origin-scoped, so no `.well-known` on the apex is needed.
pub const BOUND_COOKIE: &str = "__Host-portcullis-bound";
/// Its attributes, as the session instructions and `Set-Cookie` both state them.
pub const BOUND_COOKIE_ATTRIBUTES: &str = "Path=/; Secure; HttpOnly; SameSite=Lax";
/// Default lifetime of a bound cookie, seconds.
pub const DEFAULT_BOUND_COOKIE_TTL_S: u64 = crate::config::DEFAULT_DBSC_COOKIE_TTL_S;
/// Default lifetime of a challenge, seconds (longer than the cookie, so a
/// challenge cached at one refresh still works at the next).
pub const DEFAULT_CHALLENGE_TTL_S: u64 = crate::config::DEFAULT_DBSC_CHALLENGE_TTL_S;
/// Largest proof accepted, bytes.
pub const MAX_PROOF_BYTES: usize = 8 * 1024;
/// Challenges remembered against replay.
const REPLAY_CAPACITY: u64 = 200_000;
/// The `typ` of a DBSC proof.
const PROOF_TYP: &str = "dbsc+jwt";

/// Why a DBSC step was refused. Messages are safe to show and log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbscError {
    /// No `Secure-Session-Response` header.
    #[error("no DBSC proof")]
    MissingProof,
    /// The proof is not a compact JWS, or over the size limit.
    #[error("the DBSC proof is malformed")]
    Malformed,
    /// `typ` is not `dbsc+jwt`.
    #[error("the DBSC proof's typ is not dbsc+jwt")]
    WrongType,
    /// `alg` is not ES256/RS256, or not the registered algorithm.
    #[error("the DBSC proof's algorithm `{0}` is not accepted")]
    WrongAlgorithm(String),
    /// The registration proof carries no usable public key.
    #[error("the DBSC registration carries no usable public key")]
    BadKey,
    /// A refresh proof carries a key other than the registered one.
    #[error("the DBSC proof names another key than the registered one")]
    WrongKey,
    /// The signature does not verify.
    #[error("the DBSC proof's signature does not verify")]
    BadSignature,
    /// `jti` is not a challenge this proxy issued for this session and step.
    #[error("the DBSC proof answers no challenge of this session")]
    WrongChallenge,
    /// The challenge expired.
    #[error("the DBSC challenge expired")]
    StaleChallenge,
    /// The challenge was already used.
    #[error("the DBSC challenge was already used")]
    ReplayedChallenge,
    /// The bound cookie is missing.
    #[error("the session's bound cookie is missing")]
    MissingCookie,
    /// The bound cookie is forged, for another session, or unreadable.
    #[error("the session's bound cookie is invalid")]
    BadCookie,
    /// The bound cookie expired, or predates a required fresh proof.
    #[error("the session's bound cookie expired")]
    ExpiredCookie,
    /// The session already has a registered key (one key per session).
    #[error("this session already has a registered DBSC key")]
    AlreadyBound,
    /// The session has no registered key, or another DBSC session id.
    #[error("no DBSC session of this browser session")]
    UnknownSession,
}

impl DbscError {
    /// Stable code for bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCookie | Self::BadCookie | Self::ExpiredCookie => "dbsc_refresh_required",
            Self::AlreadyBound => "dbsc_already_registered",
            Self::UnknownSession => "dbsc_unknown_session",
            _ => "invalid_dbsc_proof",
        }
    }

    /// True when a fresh challenge lets the browser try again (the draft's
    /// 403 + `Secure-Session-Challenge`); other refusals end the attempt.
    pub fn wants_challenge(&self) -> bool {
        matches!(
            self,
            Self::MissingProof
                | Self::WrongChallenge
                | Self::StaleChallenge
                | Self::ReplayedChallenge
        )
    }
}

/// What a session record keeps about its DBSC binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbscBinding {
    /// The DBSC `session_identifier` the browser names on refresh (random,
    /// not the proxy's session id).
    pub session_identifier: String,
    /// `ES256` or `RS256`: the registered algorithm.
    pub alg: String,
    /// The registered public key (its RFC 7638 members only).
    pub jwk: serde_json::Value,
    /// RFC 7638 SHA-256 thumbprint of the key (per session, not a device id).
    pub thumbprint: String,
    /// When the key was registered, seconds.
    pub registered_s: u64,
    /// When a proof last verified, seconds.
    pub last_proof_s: u64,
}

/// What a challenge is for: a challenge for one step never answers the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Key registration after login.
    Register,
    /// Bound-cookie refresh.
    Refresh,
}

impl Step {
    fn tag(self) -> u8 {
        match self {
            Self::Register => b'g',
            Self::Refresh => b'r',
        }
    }
}

/// The DBSC protocol state of a proxy: signing key and replay cache.
pub struct Dbsc {
    mac: hmac::Key,
    challenge_ttl_s: u64,
    cookie_ttl_s: u64,
    used: moka::sync::Cache<String, ()>,
}

impl std::fmt::Debug for Dbsc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dbsc")
            .field("cookie_ttl_s", &self.cookie_ttl_s)
            .finish_non_exhaustive()
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // A failing system RNG leaves zeros; the MAC still binds the value, and
    // the session id hash keeps it per session. aws-lc-rs does not fail here.
    let _ = aws_lc_rs::rand::fill(&mut b);
    b
}

/// A 16-byte tag of the proxy session, from the hash of its id.
fn session_tag(session_hash: &str) -> [u8; 16] {
    let d = crate::util::sha256(session_hash.as_bytes());
    let mut t = [0u8; 16];
    t.copy_from_slice(&d[..16]);
    t
}

impl Dbsc {
    /// `secret`: the proxy's session secret (the same on every replica);
    /// a key for DBSC is derived from it, so the two never mix.
    pub fn new(secret: &[u8], cookie_ttl_s: u64, challenge_ttl_s: u64) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&root, b"portcullis dbsc v1");
        Self {
            mac: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
            challenge_ttl_s,
            cookie_ttl_s,
            used: moka::sync::Cache::builder()
                .max_capacity(REPLAY_CAPACITY)
                .time_to_live(Duration::from_secs(challenge_ttl_s.max(1)))
                .build(),
        }
    }

    /// Lifetime of a bound cookie, seconds.
    pub fn cookie_ttl_s(&self) -> u64 {
        self.cookie_ttl_s
    }

    /// Lifetime of a challenge, seconds.
    pub fn challenge_ttl_s(&self) -> u64 {
        self.challenge_ttl_s
    }

    /// `kind | session tag (16) | issued (8) | random (16)` + MAC, base64url.
    fn seal(&self, kind: u8, session_hash: &str, issued: u64) -> String {
        let mut body = Vec::with_capacity(41);
        body.push(kind);
        body.extend_from_slice(&session_tag(session_hash));
        body.extend_from_slice(&issued.to_be_bytes());
        body.extend_from_slice(&random::<16>());
        let tag = hmac::sign(&self.mac, &body);
        format!("{}.{}", B64.encode(&body), B64.encode(tag.as_ref()))
    }

    /// Opens a sealed value of `kind` for this session; returns when it was issued.
    fn open(&self, value: &str, kind: u8, session_hash: &str) -> Option<u64> {
        if value.len() > 200 {
            return None;
        }
        let (body, tag) = value.split_once('.')?;
        let body = B64.decode(body).ok()?;
        let tag = B64.decode(tag).ok()?;
        hmac::verify(&self.mac, &body, &tag).ok()?;
        if body.len() != 41 || body[0] != kind || body[1..17] != session_tag(session_hash) {
            return None;
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&body[17..25]);
        Some(u64::from_be_bytes(issued))
    }

    /// A fresh challenge for `step` of the proxy session `session_hash`.
    pub fn challenge(&self, step: Step, session_hash: &str, now: u64) -> String {
        self.seal(step.tag(), session_hash, now)
    }

    /// Checks a challenge came from here for this session and step, is fresh,
    /// and was not used before; marks it used.
    fn redeem(
        &self,
        challenge: &str,
        step: Step,
        session_hash: &str,
        now: u64,
    ) -> Result<(), DbscError> {
        let issued = self
            .open(challenge, step.tag(), session_hash)
            .ok_or(DbscError::WrongChallenge)?;
        if issued > now + 5 || now.saturating_sub(issued) > self.challenge_ttl_s {
            return Err(DbscError::StaleChallenge);
        }
        let entry = self.used.entry(challenge.to_owned()).or_insert(());
        if !entry.is_fresh() {
            return Err(DbscError::ReplayedChallenge);
        }
        Ok(())
    }

    /// The `Secure-Session-Registration` value offered after a login.
    pub fn registration_header(&self, session_hash: &str, now: u64) -> String {
        format!(
            "(ES256 RS256);path=\"{REGISTER_PATH}\";challenge=\"{}\"",
            self.challenge(Step::Register, session_hash, now)
        )
    }

    /// The `Secure-Session-Challenge` value for a refresh of DBSC session `id`.
    pub fn challenge_header(&self, id: &str, session_hash: &str, now: u64) -> String {
        format!(
            "{};id={}",
            sf_string(&self.challenge(Step::Refresh, session_hash, now)),
            sf_string(id)
        )
    }

    /// Verifies a registration proof (the `Secure-Session-Response` value,
    /// already unquoted): `typ`, `alg`, the header's `jwk`, the signature
    /// with that key, `jti` = a registration challenge of this session.
    /// Returns the binding to store (with a new `session_identifier`).
    pub fn verify_registration(
        &self,
        proof: &str,
        session_hash: &str,
        now: u64,
    ) -> Result<DbscBinding, DbscError> {
        let p = Proof::parse(proof)?;
        let jwk_value = p
            .header
            .get("jwk")
            .or_else(|| p.payload.get("jwk"))
            .or_else(|| p.payload.get("key"))
            .ok_or(DbscError::BadKey)?;
        let (jwk, public) = public_jwk(jwk_value, p.alg)?;
        p.verify(&jwk)?;
        self.redeem(p.jti()?, Step::Register, session_hash, now)?;
        let thumbprint = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|_| DbscError::BadKey)?;
        Ok(DbscBinding {
            session_identifier: B64.encode(random::<16>()),
            alg: alg_name(p.alg).to_owned(),
            jwk: public,
            thumbprint,
            registered_s: now,
            last_proof_s: now,
        })
    }

    /// Verifies a refresh proof against the registered key and algorithm;
    /// `jti` must be a refresh challenge of this session, used once.
    pub fn verify_refresh(
        &self,
        proof: &str,
        binding: &DbscBinding,
        session_hash: &str,
        now: u64,
    ) -> Result<(), DbscError> {
        let p = Proof::parse(proof)?;
        if alg_name(p.alg) != binding.alg {
            return Err(DbscError::WrongAlgorithm(alg_name(p.alg).to_owned()));
        }
        // The draft forbids `jwk` on refresh; a client that sends one anyway
        // must at least name the registered key.
        if let Some(j) = p.header.get("jwk") {
            let (_, public) = public_jwk(j, p.alg).map_err(|_| DbscError::WrongKey)?;
            if public != binding.jwk {
                return Err(DbscError::WrongKey);
            }
        }
        let (jwk, _) = public_jwk(&binding.jwk, p.alg).map_err(|_| DbscError::WrongKey)?;
        p.verify(&jwk)?;
        self.redeem(p.jti()?, Step::Refresh, session_hash, now)
    }

    /// A fresh bound-cookie value issued at `now_ms` (a new value every
    /// time: browsers treat an unchanged value as a failed refresh).
    pub fn bound_cookie(&self, session_hash: &str, now_ms: u64) -> String {
        self.seal(b'c', session_hash, now_ms)
    }

    /// The `Set-Cookie` value for a fresh bound cookie.
    pub fn set_bound_cookie(&self, session_hash: &str, now_ms: u64) -> String {
        format!(
            "{BOUND_COOKIE}={}; {BOUND_COOKIE_ATTRIBUTES}; Max-Age={}",
            self.bound_cookie(session_hash, now_ms),
            self.cookie_ttl_s
        )
    }

    /// The `Set-Cookie` value that expires the bound cookie (forces a refresh).
    pub fn expire_bound_cookie() -> String {
        format!("{BOUND_COOKIE}=; {BOUND_COOKIE_ATTRIBUTES}; Max-Age=0")
    }

    /// Checks the bound cookie of a request on a DBSC-bound session: made
    /// here, for this session, not expired, and issued after `not_before_ms`
    /// (the last change that demands a fresh proof, such as a posture change
    /// of the session's subject or device). Times in milliseconds.
    pub fn check_bound_cookie(
        &self,
        value: Option<&str>,
        session_hash: &str,
        not_before_ms: u64,
        now_ms: u64,
    ) -> Result<(), DbscError> {
        let value = value.ok_or(DbscError::MissingCookie)?;
        let issued = self
            .open(value, b'c', session_hash)
            .ok_or(DbscError::BadCookie)?;
        if issued > now_ms + 5_000 {
            return Err(DbscError::BadCookie);
        }
        // INVARIANT: a cookie minted in the same millisecond as a change is
        // refused too (`<=`): the change may have been applied after it.
        if now_ms >= issued.saturating_add(self.cookie_ttl_s.saturating_mul(1000))
            || (not_before_ms > 0 && issued <= not_before_ms)
        {
            return Err(DbscError::ExpiredCookie);
        }
        Ok(())
    }
}

/// The session instructions JSON (registration response body; §1.5):
/// origin-scoped, one bound cookie, refresh on [`REFRESH_PATH`].
pub fn session_instructions(session_identifier: &str) -> serde_json::Value {
    serde_json::json!({
        "session_identifier": session_identifier,
        "refresh_url": REFRESH_PATH,
        "scope": {
            "include_site": false,
            // The DBSC endpoints themselves never need the bound cookie.
            "scope_specification": [
                {"type": "exclude", "path": "/.portcullis/"}
            ]
        },
        "credentials": [
            {"type": "cookie", "name": BOUND_COOKIE, "attributes": BOUND_COOKIE_ATTRIBUTES}
        ],
        "allowed_refresh_initiators": []
    })
}

/// The instructions that end the browser's DBSC session (a revoked session).
pub fn terminate_instructions() -> serde_json::Value {
    serde_json::json!({"continue": false})
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RS256 => "RS256",
        _ => "ES256",
    }
}

/// The key of a JWK for `alg`, and its RFC 7638 members as stored: EC P-256
/// for ES256, RSA of at least 2048 bits for RS256; private members refused.
fn public_jwk(
    v: &serde_json::Value,
    alg: Algorithm,
) -> Result<(Jwk, serde_json::Value), DbscError> {
    if v.get("d").is_some() || v.get("p").is_some() {
        return Err(DbscError::BadKey);
    }
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|_| DbscError::BadKey)?;
    let public = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256)
            if p.curve == EllipticCurve::P256 =>
        {
            serde_json::json!({"kty": "EC", "crv": "P-256", "x": p.x, "y": p.y})
        }
        (AlgorithmParameters::RSA(p), Algorithm::RS256) => {
            let n = B64.decode(&p.n).map_err(|_| DbscError::BadKey)?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < 2048 {
                return Err(DbscError::BadKey);
            }
            serde_json::json!({"kty": "RSA", "n": p.n, "e": p.e})
        }
        _ => return Err(DbscError::BadKey),
    };
    Ok((jwk, public))
}

/// A parsed (not yet verified) proof.
struct Proof<'a> {
    header: serde_json::Value,
    payload: serde_json::Value,
    alg: Algorithm,
    signing_input: &'a str,
    signature: &'a str,
}

impl<'a> Proof<'a> {
    fn parse(proof: &'a str) -> Result<Self, DbscError> {
        if proof.is_empty() {
            return Err(DbscError::MissingProof);
        }
        if proof.len() > MAX_PROOF_BYTES {
            return Err(DbscError::Malformed);
        }
        let mut it = proof.split('.');
        let (Some(h), Some(c), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(DbscError::Malformed);
        };
        let json = |part: &str| -> Result<serde_json::Value, DbscError> {
            let raw = B64.decode(part).map_err(|_| DbscError::Malformed)?;
            let v: serde_json::Value =
                serde_json::from_slice(&raw).map_err(|_| DbscError::Malformed)?;
            v.is_object().then_some(v).ok_or(DbscError::Malformed)
        };
        let header = json(h)?;
        let payload = json(c)?;
        if header.get("typ").and_then(|t| t.as_str()) != Some(PROOF_TYP) {
            return Err(DbscError::WrongType);
        }
        if header.get("crit").is_some() {
            return Err(DbscError::Malformed);
        }
        let alg = match header.get("alg").and_then(|a| a.as_str()) {
            Some("ES256") => Algorithm::ES256,
            Some("RS256") => Algorithm::RS256,
            other => {
                return Err(DbscError::WrongAlgorithm(
                    other.unwrap_or("").chars().take(16).collect(),
                ));
            }
        };
        Ok(Self {
            header,
            payload,
            alg,
            signing_input: &proof[..h.len() + 1 + c.len()],
            signature: s,
        })
    }

    fn verify(&self, jwk: &Jwk) -> Result<(), DbscError> {
        let key = DecodingKey::from_jwk(jwk).map_err(|_| DbscError::BadKey)?;
        match jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            &key,
            self.alg,
        ) {
            Ok(true) => Ok(()),
            _ => Err(DbscError::BadSignature),
        }
    }

    fn jti(&self) -> Result<&str, DbscError> {
        self.payload
            .get("jti")
            .and_then(|j| j.as_str())
            .ok_or(DbscError::WrongChallenge)
    }
}

/// An RFC 9651 sf-string: quoted, `\` and `"` escaped. Callers pass only
/// printable ASCII (base64url challenges and ids).
pub fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The value of an sf-string header (`Secure-Session-Response`,
/// `Sec-Secure-Session-Id`), parameters ignored. A bare token is accepted
/// too, as some drafts' examples show it. `None` when malformed.
pub fn parse_sf_string(v: &str) -> Option<String> {
    let v = v.trim_matches(' ');
    let Some(rest) = v.strip_prefix('"') else {
        let token = v.split(';').next()?.trim();
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
        return ok.then(|| token.to_owned());
    };
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return None,
            },
            '"' => {
                let tail = chars.as_str();
                return (tail.is_empty() || tail.starts_with(';')).then_some(out);
            }
            c if (' '..='~').contains(&c) => out.push(c),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::demo::pki::SigningKey;
    use serde_json::json;

    const SESSION: &str = "hash-of-session-a";
    const OTHER: &str = "hash-of-session-b";
    const NOW: u64 = 1_800_000_000;
    const NOW_MS: u64 = NOW * 1000;

    fn dbsc() -> Dbsc {
        Dbsc::new(b"a test secret of enough length!!", 300, 600)
    }

    fn proof(key: &SigningKey, jti: &str, with_jwk: bool) -> String {
        let mut h = json!({"typ": "dbsc+jwt", "alg": key.alg});
        if with_jwk {
            h["jwk"] = key.public_jwk();
        }
        key.sign_jws(&h, &json!({"jti": jti})).unwrap()
    }

    fn challenge_of(header: &str) -> String {
        let i = header.find("challenge=\"").unwrap() + 11;
        header[i..].split('"').next().unwrap().to_owned()
    }

    fn registered(d: &Dbsc, key: &SigningKey) -> DbscBinding {
        let c = challenge_of(&d.registration_header(SESSION, NOW));
        d.verify_registration(&proof(key, &c, true), SESSION, NOW)
            .unwrap()
    }

    #[test]
    fn registration_header_offers_es256_and_rs256_with_path_and_challenge() {
        let h = dbsc().registration_header(SESSION, NOW);
        assert!(
            h.starts_with("(ES256 RS256);path=\"/.portcullis/dbsc/register\";challenge=\""),
            "{h}"
        );
        assert!(!h.contains("none"));
    }

    #[test]
    fn registration_with_es256_and_rs256_pins_the_key() {
        let d = dbsc();
        for key in [
            SigningKey::es256("k").unwrap(),
            SigningKey::rs256("k").unwrap(),
        ] {
            let b = registered(&d, &key);
            assert_eq!(b.alg, key.alg);
            assert_eq!(b.jwk, key.public_jwk());
            assert_eq!(b.thumbprint, key.thumbprint().unwrap());
            assert!(b.session_identifier.len() >= 22);
            // A refresh over a fresh challenge, without jwk, verifies.
            let c = d.challenge(Step::Refresh, SESSION, NOW + 10);
            d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW + 11)
                .unwrap();
        }
    }

    #[test]
    fn older_draft_payload_key_is_accepted_at_registration() {
        let d = dbsc();
        let key = SigningKey::es256("k").unwrap();
        let c = d.challenge(Step::Register, SESSION, NOW);
        let p = key
            .sign_jws(
                &json!({"typ": "dbsc+jwt", "alg": "ES256"}),
                &json!({"jti": c, "jwk": key.public_jwk(), "aud": "x"}),
            )
            .unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW).unwrap().jwk,
            key.public_jwk()
        );
    }

    #[test]
    fn wrong_challenge_is_refused() {
        let d = dbsc();
        let key = SigningKey::es256("k").unwrap();
        // Not ours at all.
        assert_eq!(
            d.verify_registration(&proof(&key, "made-up", true), SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
        // Another session's challenge.
        let c = d.challenge(Step::Register, OTHER, NOW);
        assert_eq!(
            d.verify_registration(&proof(&key, &c, true), SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
        // A refresh challenge at registration, and the reverse.
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.verify_registration(&proof(&key, &c, true), SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
        let b = registered(&d, &key);
        let c = d.challenge(Step::Register, SESSION, NOW);
        assert_eq!(
            d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
        // Another proxy's (another secret's) challenge.
        let other = Dbsc::new(b"another secret, another proxy!!!", 300, 600);
        let c = other.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
        // No jti.
        let p = key
            .sign_jws(&json!({"typ": "dbsc+jwt", "alg": "ES256"}), &json!({}))
            .unwrap();
        assert_eq!(
            d.verify_refresh(&p, &b, SESSION, NOW),
            Err(DbscError::WrongChallenge)
        );
    }

    #[test]
    fn stale_and_replayed_challenges_are_refused() {
        let d = dbsc();
        let key = SigningKey::es256("k").unwrap();
        let b = registered(&d, &key);
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW + 601),
            Err(DbscError::StaleChallenge)
        );
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        let p = proof(&key, &c, false);
        d.verify_refresh(&p, &b, SESSION, NOW + 1).unwrap();
        assert_eq!(
            d.verify_refresh(&p, &b, SESSION, NOW + 2),
            Err(DbscError::ReplayedChallenge)
        );
        // A second proof over the same challenge (same key): still a replay.
        assert_eq!(
            d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW + 2),
            Err(DbscError::ReplayedChallenge)
        );
        // Registration challenges are single-use too.
        let c = d.challenge(Step::Register, SESSION, NOW);
        d.verify_registration(&proof(&key, &c, true), SESSION, NOW)
            .unwrap();
        assert_eq!(
            d.verify_registration(&proof(&key, &c, true), SESSION, NOW),
            Err(DbscError::ReplayedChallenge)
        );
    }

    #[test]
    fn wrong_key_is_refused() {
        let d = dbsc();
        let key = SigningKey::es256("k").unwrap();
        let thief = SigningKey::es256("t").unwrap();
        let b = registered(&d, &key);
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.verify_refresh(&proof(&thief, &c, false), &b, SESSION, NOW),
            Err(DbscError::BadSignature)
        );
        // Naming its own key in the header does not help.
        assert_eq!(
            d.verify_refresh(&proof(&thief, &c, true), &b, SESSION, NOW),
            Err(DbscError::WrongKey)
        );
        // The challenge was not spent by the failures: the owner still refreshes.
        d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW)
            .unwrap();
        // Registration: a jwk that did not sign the proof.
        let c = d.challenge(Step::Register, SESSION, NOW);
        let mut h = json!({"typ": "dbsc+jwt", "alg": "ES256", "jwk": key.public_jwk()});
        let p = thief.sign_jws(&h, &json!({"jti": c})).unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::BadSignature)
        );
        // No key at all, or a private key.
        h.as_object_mut().unwrap().remove("jwk");
        let p = key.sign_jws(&h, &json!({"jti": c})).unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::BadKey)
        );
        let mut private = key.public_jwk();
        private["d"] = json!("AAAA");
        let p = key
            .sign_jws(
                &json!({"typ": "dbsc+jwt", "alg": "ES256", "jwk": private}),
                &json!({"jti": c}),
            )
            .unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::BadKey)
        );
    }

    #[test]
    fn wrong_alg_and_typ_are_refused() {
        let d = dbsc();
        let es = SigningKey::es256("k").unwrap();
        let rs = SigningKey::rs256("r").unwrap();
        let ed = SigningKey::eddsa("e").unwrap();
        let c = d.challenge(Step::Register, SESSION, NOW);
        // EdDSA, none, HS256: never.
        let p = proof(&ed, &c, true);
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::WrongAlgorithm("EdDSA".into()))
        );
        let h = B64
            .encode(json!({"typ": "dbsc+jwt", "alg": "none", "jwk": es.public_jwk()}).to_string());
        let c64 = B64.encode(json!({"jti": c}).to_string());
        assert_eq!(
            d.verify_registration(&format!("{h}.{c64}."), SESSION, NOW),
            Err(DbscError::WrongAlgorithm("none".into()))
        );
        // alg ES256 with an RSA jwk (and the reverse).
        let p = es
            .sign_jws(
                &json!({"typ": "dbsc+jwt", "alg": "ES256", "jwk": rs.public_jwk()}),
                &json!({"jti": c}),
            )
            .unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::BadKey)
        );
        // typ missing or another.
        let p = es
            .sign_jws(
                &json!({"alg": "ES256", "jwk": es.public_jwk()}),
                &json!({"jti": c}),
            )
            .unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::WrongType)
        );
        let p = es
            .sign_jws(
                &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": es.public_jwk()}),
                &json!({"jti": c}),
            )
            .unwrap();
        assert_eq!(
            d.verify_registration(&p, SESSION, NOW),
            Err(DbscError::WrongType)
        );
        // A refresh must use the registered algorithm.
        let b = registered(&d, &es);
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.verify_refresh(&proof(&rs, &c, false), &b, SESSION, NOW),
            Err(DbscError::WrongAlgorithm("RS256".into()))
        );
    }

    #[test]
    fn malformed_proofs_are_refused() {
        let d = dbsc();
        for p in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"a".repeat(MAX_PROOF_BYTES + 1),
        ] {
            assert!(d.verify_registration(p, SESSION, NOW).is_err(), "{p:.20}");
        }
        assert_eq!(
            d.verify_registration("", SESSION, NOW),
            Err(DbscError::MissingProof)
        );
        let h = B64.encode(b"[1,2]");
        assert_eq!(
            d.verify_registration(&format!("{h}.{h}.AA"), SESSION, NOW),
            Err(DbscError::Malformed)
        );
    }

    #[test]
    fn bound_cookie_is_per_session_expires_and_honours_not_before() {
        let d = dbsc();
        let set = d.set_bound_cookie(SESSION, NOW_MS);
        assert!(set.starts_with("__Host-portcullis-bound="));
        assert!(set.ends_with("; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=300"));
        let v = d.bound_cookie(SESSION, NOW_MS);
        assert_ne!(v, d.bound_cookie(SESSION, NOW_MS), "a new value every time");
        d.check_bound_cookie(Some(&v), SESSION, 0, (NOW + 299) * 1000)
            .unwrap();
        assert_eq!(
            d.check_bound_cookie(Some(&v), SESSION, 0, (NOW + 300) * 1000),
            Err(DbscError::ExpiredCookie)
        );
        assert_eq!(
            d.check_bound_cookie(None, SESSION, 0, NOW_MS),
            Err(DbscError::MissingCookie)
        );
        assert_eq!(
            d.check_bound_cookie(Some(&v), OTHER, 0, NOW_MS),
            Err(DbscError::BadCookie)
        );
        // A posture change at NOW + 10 demands a cookie issued since, even
        // in the same second (and the same millisecond) as the change.
        assert_eq!(
            d.check_bound_cookie(Some(&v), SESSION, (NOW + 10) * 1000, (NOW + 11) * 1000),
            Err(DbscError::ExpiredCookie)
        );
        assert_eq!(
            d.check_bound_cookie(Some(&v), SESSION, NOW_MS + 500, NOW_MS + 600),
            Err(DbscError::ExpiredCookie)
        );
        let fresh = d.bound_cookie(SESSION, NOW_MS + 501);
        d.check_bound_cookie(Some(&fresh), SESSION, NOW_MS + 500, NOW_MS + 600)
            .unwrap();
        assert_eq!(
            d.check_bound_cookie(Some(&v), SESSION, NOW_MS, NOW_MS + 1),
            Err(DbscError::ExpiredCookie)
        );
        // Tampered, forged, a challenge passed off as a cookie, oversized.
        let mut t = v.clone().into_bytes();
        t[3] ^= 1;
        let t = String::from_utf8(t).unwrap();
        assert_eq!(
            d.check_bound_cookie(Some(&t), SESSION, 0, NOW_MS),
            Err(DbscError::BadCookie)
        );
        let c = d.challenge(Step::Refresh, SESSION, NOW);
        assert_eq!(
            d.check_bound_cookie(Some(&c), SESSION, 0, NOW_MS),
            Err(DbscError::BadCookie)
        );
        let other = Dbsc::new(b"another secret, another proxy!!!", 300, 600);
        let f = other.bound_cookie(SESSION, NOW_MS);
        assert_eq!(
            d.check_bound_cookie(Some(&f), SESSION, 0, NOW_MS),
            Err(DbscError::BadCookie)
        );
        assert_eq!(
            d.check_bound_cookie(Some(&"x".repeat(500)), SESSION, 0, NOW_MS),
            Err(DbscError::BadCookie)
        );
        assert!(Dbsc::expire_bound_cookie().contains("Max-Age=0"));
    }

    #[test]
    fn session_instructions_follow_the_draft() {
        let j = session_instructions("s-1");
        assert_eq!(j["session_identifier"], "s-1");
        assert_eq!(j["refresh_url"], REFRESH_PATH);
        assert_eq!(j["scope"]["include_site"], false);
        assert_eq!(j["credentials"][0]["type"], "cookie");
        assert_eq!(j["credentials"][0]["name"], BOUND_COOKIE);
        assert!(
            !j["credentials"][0]["attributes"]
                .as_str()
                .unwrap()
                .contains("Partitioned")
        );
        assert_eq!(terminate_instructions(), json!({"continue": false}));
    }

    #[test]
    fn challenge_header_and_sf_strings() {
        let d = dbsc();
        let h = d.challenge_header("s-1", SESSION, NOW);
        assert!(h.starts_with('"') && h.ends_with(";id=\"s-1\""), "{h}");
        let c = parse_sf_string(&h).unwrap();
        let key = SigningKey::es256("k").unwrap();
        let b = registered(&d, &key);
        d.verify_refresh(&proof(&key, &c, false), &b, SESSION, NOW)
            .unwrap();
        assert_eq!(parse_sf_string("\"a.b.c\"").as_deref(), Some("a.b.c"));
        assert_eq!(parse_sf_string("\"s-1\";x=1").as_deref(), Some("s-1"));
        assert_eq!(parse_sf_string("s-1").as_deref(), Some("s-1"));
        assert_eq!(parse_sf_string(r#""a\"b\\c""#).as_deref(), Some("a\"b\\c"));
        assert_eq!(parse_sf_string(r#""a\nb""#), None);
        assert_eq!(parse_sf_string("\"open"), None);
        assert_eq!(parse_sf_string("\"a\"junk"), None);
        assert_eq!(parse_sf_string("a b"), None);
        assert_eq!(sf_string("a\"b"), r#""a\"b""#);
    }
}
