//! DPoP proof verification (RFC 9449 §4.3, §7, §8, §11).
//!
//! Checks, cheapest first: one proof of bounded length; three base64url
//! parts; header `typ` = `dpop+jwt`, `alg` on the allow-list (asymmetric only),
//! no `crit`; `jwk` present, public-only and of the algorithm's key type
//! and size; signature (jsonwebtoken's `crypto::verify` with
//! `DecodingKey::from_jwk` over the proof's own `jwk`); claims `jti`, `htm`, `htu`, `iat` (and `ath`, `nonce`); `htm` and
//! `htu` against the request; `iat` inside the window; the server nonce
//! when required; `ath` against the access token; the RFC 7638 thumbprint
//! against the token's `cnf.jkt`; and last, the replay cache, so a proof
//! that fails any check never burns its `jti`.
//!
//! This is the only place in portcullis where a key is taken from a JWS
//! header, and it is used only to check possession: which key may sign is
//! decided by the access token's `cnf.jkt`. Proofs are never logged; error
//! messages never echo them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, OctetKeyPairParameters, OctetKeyPairType, RSAKeyParameters,
    RSAKeyType, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use moka::sync::Cache;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::htu::{self, HtuError};
use crate::config::BindingConfig;

/// Longest `jti` accepted.
pub const MAX_JTI_LEN: usize = 256;
/// Longest `nonce` accepted.
pub const MAX_NONCE_LEN: usize = 256;
/// Smallest RSA modulus accepted in a proof key, in base64url characters (2048 bits).
const MIN_RSA_N_CHARS: usize = 342;
/// Base64url length of a 32-byte coordinate (P-256, Ed25519).
const B64_32: usize = 43;
/// Base64url length of a 48-byte coordinate (P-384).
const B64_48: usize = 64;

/// Why a DPoP proof was refused. Messages are safe to show the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    /// No `DPoP` header.
    #[error("no DPoP proof")]
    Missing,
    /// More than one `DPoP` header.
    #[error("more than one DPoP header")]
    Multiple,
    /// Over the configured length.
    #[error("DPoP proof is longer than {0} bytes")]
    TooLarge(usize),
    /// Not one compact JWS with JSON header and claims.
    #[error("DPoP proof is not a well-formed JWT")]
    Malformed,
    /// `typ` is not `dpop+jwt`.
    #[error("DPoP proof `typ` is not `dpop+jwt`")]
    WrongType,
    /// `alg` is not an accepted asymmetric algorithm.
    #[error("DPoP proof algorithm is not accepted")]
    AlgorithmNotAccepted,
    /// The header names a `crit` extension.
    #[error("DPoP proof header has a critical extension this verifier does not implement")]
    CriticalHeader,
    /// `jwk` missing, or not a public key of the algorithm's type.
    #[error("DPoP proof `jwk` is missing or not a public key for its algorithm")]
    BadKey,
    /// `jwk` carries private or symmetric key members.
    #[error("DPoP proof `jwk` holds private key material")]
    PrivateKey,
    /// The signature does not verify with `jwk`.
    #[error("DPoP proof signature is invalid")]
    BadSignature,
    /// A required claim is missing or malformed.
    #[error("DPoP proof claim `{0}` is missing or malformed")]
    BadClaim(&'static str),
    /// `htm` is not the request method.
    #[error("DPoP proof `htm` does not match the request method")]
    MethodMismatch,
    /// `htu` carries a query or fragment.
    #[error("DPoP proof `htu` must not carry a query or fragment")]
    UriHasQuery,
    /// `htu` is not the request URI.
    #[error("DPoP proof `htu` does not match the request URI")]
    UriMismatch,
    /// `iat` is older than the window.
    #[error("DPoP proof is too old")]
    Stale,
    /// `iat` is too far in the future.
    #[error("DPoP proof was issued in the future")]
    FromFuture,
    /// `ath` is not the hash of the access token.
    #[error("DPoP proof `ath` does not match the access token")]
    AthMismatch,
    /// The proof key is not the one the token is bound to.
    #[error("DPoP proof key does not match the token's `cnf.jkt`")]
    KeyMismatch,
    /// The `jti` was seen before within the window.
    #[error("DPoP proof `jti` was already used")]
    Replayed,
    /// Nonces are required and the proof has none.
    #[error("DPoP proof must carry the server's nonce")]
    NonceRequired,
    /// The nonce is not one this server issued, or has expired.
    #[error("DPoP proof nonce is invalid or expired")]
    NonceInvalid,
    /// The replay cache is full; new proofs are refused rather than risk replays.
    #[error("DPoP replay cache is full")]
    ReplayCacheFull,
    /// The cluster-wide replay check could not answer (NATS unreachable);
    /// the proof is refused rather than risk a replay at another replica.
    #[error("DPoP replay check is unavailable")]
    ReplayCheckUnavailable,
}

impl DpopError {
    /// True for the errors answered with `use_dpop_nonce` and a fresh nonce.
    pub fn wants_nonce(self) -> bool {
        matches!(self, Self::NonceRequired | Self::NonceInvalid)
    }
}

/// The request a proof must match.
#[derive(Debug, Clone, Copy)]
pub struct ProofRequest<'a> {
    /// HTTP method, as received.
    pub method: &'a str,
    /// The request's external URI, normalised ([`htu::request_uri`]).
    pub htu: &'a str,
    /// The access token presented with the proof (its hash must be `ath`).
    pub access_token: Option<&'a str>,
    /// The `cnf.jkt` the proof key must have.
    pub jkt: Option<&'a str>,
    /// Seconds since the epoch.
    pub now: u64,
}

/// A proof that passed every check and whose `jti` is now spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// RFC 7638 SHA-256 thumbprint of the proof key.
    pub jkt: String,
    /// SHA-256 of `jkt` and `jti`: the key a cluster-wide replay check spends.
    pub replay_key: [u8; 32],
}

#[derive(Deserialize)]
struct ProofHeader {
    #[serde(default)]
    typ: Option<String>,
    alg: String,
    #[serde(default)]
    jwk: Option<ProofJwk>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// The `jwk` members read; any private or symmetric member refuses the proof.
#[derive(Deserialize)]
struct ProofJwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    d: Option<IgnoredAny>,
    #[serde(default)]
    p: Option<IgnoredAny>,
    #[serde(default)]
    q: Option<IgnoredAny>,
    #[serde(default)]
    dp: Option<IgnoredAny>,
    #[serde(default)]
    dq: Option<IgnoredAny>,
    #[serde(default)]
    qi: Option<IgnoredAny>,
    #[serde(default)]
    oth: Option<IgnoredAny>,
    #[serde(default)]
    k: Option<IgnoredAny>,
}

impl ProofJwk {
    fn has_private_members(&self) -> bool {
        self.d.is_some()
            || self.p.is_some()
            || self.q.is_some()
            || self.dp.is_some()
            || self.dq.is_some()
            || self.qi.is_some()
            || self.oth.is_some()
            || self.k.is_some()
    }

    /// The public key as a jsonwebtoken JWK, if its type fits `alg`.
    fn into_public(self, alg: Algorithm) -> Option<Jwk> {
        let crv = self.crv.as_deref();
        let algorithm = match (alg, self.kty.as_str()) {
            (Algorithm::ES256 | Algorithm::ES384, "EC") => {
                let (curve, len) = match (alg, crv) {
                    (Algorithm::ES256, Some("P-256")) => (EllipticCurve::P256, B64_32),
                    (Algorithm::ES384, Some("P-384")) => (EllipticCurve::P384, B64_48),
                    _ => return None,
                };
                let (x, y) = (self.x?, self.y?);
                // Coordinates are fixed-size (RFC 7518 §6.2.1.2): the key
                // verified is exactly the key thumbprinted.
                if x.len() != len || y.len() != len {
                    return None;
                }
                AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve,
                    x,
                    y,
                })
            }
            (Algorithm::EdDSA, "OKP") if crv == Some("Ed25519") => {
                let x = self.x.filter(|x| x.len() == B64_32)?;
                AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x,
                })
            }
            (
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512,
                "RSA",
            ) => {
                let n = self.n?;
                if n.len() < MIN_RSA_N_CHARS {
                    return None;
                }
                AlgorithmParameters::RSA(RSAKeyParameters {
                    key_type: RSAKeyType::RSA,
                    n,
                    e: self.e?,
                })
            }
            _ => return None,
        };
        Some(Jwk {
            common: CommonParameters::default(),
            algorithm,
        })
    }
}

#[derive(Deserialize)]
struct ProofClaims {
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    htm: Option<String>,
    #[serde(default)]
    htu: Option<String>,
    #[serde(default)]
    iat: Option<serde_json::Number>,
    #[serde(default)]
    ath: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
}

/// Replay cache entries live as long as the proof could still be accepted;
/// the value is that time to live, in seconds.
struct UntilStale;

impl moka::Expiry<[u8; 32], u64> for UntilStale {
    fn expire_after_create(&self, _key: &[u8; 32], ttl_s: &u64, _at: Instant) -> Option<Duration> {
        Some(Duration::from_secs(*ttl_s))
    }
}

/// State that outlives a config reload: the replay cache and the nonce key.
pub struct DpopState {
    replay: Cache<[u8; 32], u64>,
    capacity: u64,
    nonce_key: aws_lc_rs::hmac::Key,
}

impl std::fmt::Debug for DpopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopState")
            .field("capacity", &self.capacity)
            .field("entries", &self.replay.entry_count())
            .finish()
    }
}

impl DpopState {
    /// A fresh replay cache of `capacity` entries and a random nonce key.
    /// `previous` entries are carried over, so a reload never opens a replay window.
    pub fn new(capacity: u64, previous: Option<&DpopState>) -> Self {
        // LRU, not TinyLFU: a new jti must always be admitted, or a replay
        // of it would go unnoticed.
        let replay = Cache::builder()
            .max_capacity(capacity)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(UntilStale)
            .build();
        let nonce_key = match previous {
            Some(p) => {
                for (k, v) in p.replay.iter() {
                    replay.insert(*k, v);
                }
                p.nonce_key.clone()
            }
            None => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng).unwrap_or_else(
                    |_| {
                        // Without randomness nonces cannot be trusted; a key
                        // nobody knows is still one nobody can forge for, and
                        // with no RNG the process has bigger problems.
                        aws_lc_rs::hmac::Key::new(
                            aws_lc_rs::hmac::HMAC_SHA256,
                            &crate::util::sha256(&crate::util::now_unix().to_be_bytes()),
                        )
                    },
                )
            }
        };
        Self {
            replay,
            capacity,
            nonce_key,
        }
    }

    /// Entries in the replay cache (approximate).
    pub fn replay_entries(&self) -> u64 {
        self.replay.entry_count()
    }
}

/// Verifies DPoP proofs under one config; shares [`DpopState`] across reloads.
pub struct DpopVerifier {
    algorithms: Vec<Algorithm>,
    algs: String,
    max_age_s: u64,
    future_skew_s: u64,
    nonce: bool,
    nonce_lifetime_s: u64,
    max_proof_bytes: usize,
    state: Arc<DpopState>,
}

impl std::fmt::Debug for DpopVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopVerifier")
            .field("algs", &self.algs)
            .field("nonce", &self.nonce)
            .field("state", &self.state)
            .finish()
    }
}

fn parse_alg(s: &str) -> Option<Algorithm> {
    crate::authn::jwks::parse_alg(s)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `ath`: base64url(SHA-256(ASCII access token)).
pub fn ath(access_token: &str) -> String {
    b64(&crate::util::sha256(access_token.as_bytes()))
}

impl DpopVerifier {
    /// Builds the verifier from `[binding]`, reusing `previous` state (replay
    /// cache, nonce key) when there is one.
    pub fn new(cfg: &BindingConfig, previous: Option<&DpopVerifier>) -> Self {
        let algorithms = cfg
            .dpop_algorithms
            .iter()
            .filter_map(|a| parse_alg(a))
            .collect();
        let state = match previous {
            Some(p) if p.state.capacity == cfg.dpop_replay_capacity => p.state.clone(),
            p => Arc::new(DpopState::new(
                cfg.dpop_replay_capacity,
                p.map(|p| p.state.as_ref()),
            )),
        };
        Self {
            algs: cfg.dpop_algorithms.join(" "),
            algorithms,
            max_age_s: cfg.dpop_max_age_s,
            future_skew_s: cfg.dpop_future_skew_s,
            nonce: cfg.dpop_nonce,
            nonce_lifetime_s: cfg.dpop_nonce_lifetime_s,
            max_proof_bytes: cfg.dpop_max_proof_bytes,
            state,
        }
    }

    /// Whether DPoP is accepted at all (some algorithm is allowed).
    pub fn enabled(&self) -> bool {
        !self.algorithms.is_empty()
    }

    /// The accepted algorithms, space-separated, for `WWW-Authenticate: DPoP algs="…"`.
    pub fn algs(&self) -> &str {
        &self.algs
    }

    /// Whether proofs must carry a server nonce.
    pub fn nonce_required(&self) -> bool {
        self.nonce
    }

    /// The shared state (replay cache, nonce key).
    pub fn state(&self) -> &Arc<DpopState> {
        &self.state
    }

    /// Reads the single `DPoP` header.
    pub fn proof_header(headers: &http::HeaderMap) -> Result<&str, DpopError> {
        let mut all = headers.get_all("dpop").iter();
        let v = all.next().ok_or(DpopError::Missing)?;
        if all.next().is_some() {
            return Err(DpopError::Multiple);
        }
        v.to_str().map_err(|_| DpopError::Malformed)
    }

    /// Runs every check of RFC 9449 §4.3 on `proof` for `req`, then spends its `jti`.
    pub fn verify(&self, proof: &str, req: &ProofRequest<'_>) -> Result<VerifiedProof, DpopError> {
        if proof.len() > self.max_proof_bytes {
            return Err(DpopError::TooLarge(self.max_proof_bytes));
        }
        let mut parts = proof.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DpopError::Malformed);
        };
        let header: ProofHeader = decode_part(h64)?;
        if !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("dpop+jwt"))
        {
            return Err(DpopError::WrongType);
        }
        let alg = parse_alg(&header.alg)
            .filter(|a| self.algorithms.contains(a))
            .ok_or(DpopError::AlgorithmNotAccepted)?;
        if header.crit.is_some() {
            return Err(DpopError::CriticalHeader);
        }
        let jwk = header.jwk.ok_or(DpopError::BadKey)?;
        if jwk.has_private_members() {
            return Err(DpopError::PrivateKey);
        }
        let jwk = jwk.into_public(alg).ok_or(DpopError::BadKey)?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| DpopError::BadKey)?;
        // INVARIANT: h64 and p64 are the first two parts of `proof`, so this
        // is exactly the signing input `h64.p64`.
        let signing_input = &proof[..h64.len() + 1 + p64.len()];
        match jsonwebtoken::crypto::verify(s64, signing_input.as_bytes(), &key, alg) {
            Ok(true) => {}
            Ok(false) => return Err(DpopError::BadSignature),
            Err(e) => return Err(map_jwt_error(e)),
        }
        let claims: ProofClaims = decode_part(p64)?;

        let jti = claims
            .jti
            .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_LEN)
            .ok_or(DpopError::BadClaim("jti"))?;
        let htm = claims.htm.ok_or(DpopError::BadClaim("htm"))?;
        let htu = claims.htu.ok_or(DpopError::BadClaim("htu"))?;
        let iat = claims
            .iat
            .and_then(|n| {
                n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| f as u64)
                })
            })
            .ok_or(DpopError::BadClaim("iat"))?;
        if htm != req.method {
            return Err(DpopError::MethodMismatch);
        }
        match htu::normalize(&htu) {
            Ok(h) if h == req.htu => {}
            Ok(_) => return Err(DpopError::UriMismatch),
            Err(HtuError::QueryOrFragment) => return Err(DpopError::UriHasQuery),
            Err(HtuError::Malformed) => return Err(DpopError::BadClaim("htu")),
        }
        if iat.saturating_add(self.max_age_s) < req.now {
            return Err(DpopError::Stale);
        }
        if iat > req.now.saturating_add(self.future_skew_s) {
            return Err(DpopError::FromFuture);
        }
        if self.nonce {
            let n = claims.nonce.ok_or(DpopError::NonceRequired)?;
            if !self.nonce_valid(&n, req.now) {
                return Err(DpopError::NonceInvalid);
            }
        }
        if let Some(token) = req.access_token {
            let got = claims.ath.ok_or(DpopError::BadClaim("ath"))?;
            if got != ath(token) {
                return Err(DpopError::AthMismatch);
            }
        }
        let jkt = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|_| DpopError::BadKey)?;
        if let Some(want) = req.jkt
            && want != jkt
        {
            return Err(DpopError::KeyMismatch);
        }
        let replay_key = self.spend(&jkt, &jti, iat, req.now)?;
        Ok(VerifiedProof { jkt, replay_key })
    }

    /// Records `(jkt, jti)` until the proof would be stale; refuses a repeat.
    fn spend(&self, jkt: &str, jti: &str, iat: u64, now: u64) -> Result<[u8; 32], DpopError> {
        let cache = &self.state.replay;
        if cache.entry_count() >= self.state.capacity {
            return Err(DpopError::ReplayCacheFull);
        }
        let mut material = Vec::with_capacity(jkt.len() + 1 + jti.len());
        material.extend_from_slice(jkt.as_bytes());
        material.push(0);
        material.extend_from_slice(jti.as_bytes());
        let key = crate::util::sha256(&material);
        // Carried-over entries restart their TTL: later, never sooner.
        let ttl = iat
            .saturating_add(self.max_age_s)
            .saturating_add(1)
            .saturating_sub(now);
        let entry = cache.entry(key).or_insert(ttl);
        if entry.is_fresh() {
            Ok(key)
        } else {
            Err(DpopError::Replayed)
        }
    }

    /// A server nonce valid from now for `dpop_nonce_lifetime_s`: the issue
    /// time (rounded, so responses share one) and an HMAC tag, base64url.
    pub fn fresh_nonce(&self, now: u64) -> String {
        let step = (self.nonce_lifetime_s / 4).max(1);
        let issued = now - now % step;
        let tag = aws_lc_rs::hmac::sign(&self.state.nonce_key, &issued.to_be_bytes());
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&issued.to_be_bytes());
        raw[8..].copy_from_slice(&tag.as_ref()[..16]);
        b64(&raw)
    }

    fn nonce_valid(&self, nonce: &str, now: u64) -> bool {
        if nonce.len() > MAX_NONCE_LEN {
            return false;
        }
        let mut raw = [0u8; 24];
        if base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(nonce, &mut raw) != Ok(24)
        {
            return false;
        }
        let (ts, tag) = raw.split_at(8);
        let mut issued = [0u8; 8];
        issued.copy_from_slice(ts);
        let issued = u64::from_be_bytes(issued);
        let want = aws_lc_rs::hmac::sign(&self.state.nonce_key, &issued.to_be_bytes());
        aws_lc_rs::constant_time::verify_slices_are_equal(&want.as_ref()[..16], tag).is_ok()
            && issued <= now
            && now - issued <= self.nonce_lifetime_s
    }
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, DpopError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| DpopError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| DpopError::Malformed)
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> DpopError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => DpopError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => DpopError::AlgorithmNotAccepted,
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::UnsupportedAlgorithm => DpopError::BadKey,
        _ => DpopError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// RFC 9449 §4.1, Figure 2 (the example proof), and Figure 9's `jkt`.
    const RFC9449_PROOF: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
    const RFC9449_JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

    fn verifier() -> DpopVerifier {
        DpopVerifier::new(&BindingConfig::default(), None)
    }

    #[test]
    fn rfc_7638_thumbprint_vectors() {
        // RFC 7638 §3.1.
        let rsa = Jwk {
            common: CommonParameters::default(),
            algorithm: AlgorithmParameters::RSA(RSAKeyParameters {
                key_type: RSAKeyType::RSA,
                n: "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into(),
                e: "AQAB".into(),
            }),
        };
        assert_eq!(
            rsa.thumbprint(ThumbprintHash::SHA256).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        // RFC 9449 §5, Figure 9 (EC P-256).
        let ec = Jwk {
            common: CommonParameters::default(),
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs".into(),
                y: "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA".into(),
            }),
        };
        assert_eq!(ec.thumbprint(ThumbprintHash::SHA256).unwrap(), RFC9449_JKT);
    }

    #[test]
    fn rfc_9449_ath_vector() {
        assert_eq!(
            ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }

    #[test]
    fn rfc_9449_example_proof_verifies_once() {
        let v = verifier();
        let req = ProofRequest {
            method: "POST",
            htu: "https://server.example.com/token",
            access_token: None,
            jkt: Some(RFC9449_JKT),
            now: 1_562_262_616,
        };
        assert_eq!(v.verify(RFC9449_PROOF, &req).unwrap().jkt, RFC9449_JKT);
        assert_eq!(v.verify(RFC9449_PROOF, &req), Err(DpopError::Replayed));
    }

    #[test]
    fn a_failed_check_does_not_spend_the_jti() {
        let v = verifier();
        let mut req = ProofRequest {
            method: "GET",
            htu: "https://server.example.com/token",
            access_token: None,
            jkt: None,
            now: 1_562_262_616,
        };
        assert_eq!(
            v.verify(RFC9449_PROOF, &req),
            Err(DpopError::MethodMismatch)
        );
        req.method = "POST";
        req.jkt = Some("another-key");
        assert_eq!(v.verify(RFC9449_PROOF, &req), Err(DpopError::KeyMismatch));
        req.jkt = None;
        req.now += 61;
        assert_eq!(v.verify(RFC9449_PROOF, &req), Err(DpopError::Stale));
        req.now = 1_562_262_616 - 6;
        assert_eq!(v.verify(RFC9449_PROOF, &req), Err(DpopError::FromFuture));
        req.now = 1_562_262_616;
        req.access_token = Some("a token");
        assert_eq!(
            v.verify(RFC9449_PROOF, &req),
            Err(DpopError::BadClaim("ath"))
        );
        req.access_token = None;
        assert!(v.verify(RFC9449_PROOF, &req).is_ok());
    }

    #[test]
    fn nonces_round_trip_and_expire() {
        let cfg = BindingConfig {
            dpop_nonce: true,
            dpop_nonce_lifetime_s: 100,
            ..BindingConfig::default()
        };
        let v = DpopVerifier::new(&cfg, None);
        let n = v.fresh_nonce(1000);
        assert!(v.nonce_valid(&n, 1000));
        assert!(v.nonce_valid(&n, 1100));
        assert!(!v.nonce_valid(&n, 1101));
        assert!(!v.nonce_valid(&n, 900));
        assert!(!v.nonce_valid("garbage", 1000));
        // Another process's key.
        let other = DpopVerifier::new(&cfg, None);
        assert!(!other.nonce_valid(&n, 1000));
        // The state (and so the key) survives a reload.
        let reloaded = DpopVerifier::new(&cfg, Some(&v));
        assert!(reloaded.nonce_valid(&n, 1000));
    }

    #[test]
    fn replay_state_survives_a_capacity_change() {
        let v = verifier();
        v.spend("k", "j", 1000, 1000).unwrap();
        assert_eq!(v.spend("k", "j", 1000, 1001), Err(DpopError::Replayed));
        let cfg = BindingConfig {
            dpop_replay_capacity: 2000,
            ..BindingConfig::default()
        };
        let bigger = DpopVerifier::new(&cfg, Some(&v));
        assert_eq!(bigger.spend("k", "j", 1000, 1002), Err(DpopError::Replayed));
        assert!(bigger.spend("k", "other", 1000, 1002).is_ok());
    }

    /// Network input never panics the verifier, and no mutation of a valid
    /// proof is accepted (property test over 5 000 mutated proofs).
    #[test]
    fn mutated_proofs_never_panic_and_never_pass() {
        let alphabet: &[u8] = b"ABCxyz019-_.=+/ {}\"";
        let req = ProofRequest {
            method: "POST",
            htu: "https://server.example.com/token",
            access_token: None,
            jkt: Some(RFC9449_JKT),
            now: 1_562_262_616,
        };
        // Base64url has slack bits in its last character: a change there
        // can decode to the same bytes, which is the same proof.
        let same = |a: &str, b: &str| {
            let parts = |x: &str| -> Option<Vec<Vec<u8>>> {
                x.split('.')
                    .map(|s| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(s)
                            .ok()
                    })
                    .collect()
            };
            parts(a).is_some() && parts(a) == parts(b)
        };
        // Up to five edits: (kind, where, which byte).
        let edits = crate::util::edits::edits(alphabet, 1..=5);
        proptest::proptest!(
            proptest::test_runner::Config::with_cases(5_000),
            |(edits in edits)| {
                let v = verifier();
                let mut p = RFC9449_PROOF.as_bytes().to_vec();
                crate::util::edits::apply(&mut p, &edits);
                if let Ok(text) = std::str::from_utf8(&p)
                    && text != RFC9449_PROOF
                    && let Ok(ok) = v.verify(text, &req)
                {
                    proptest::prop_assert!(
                        same(text, RFC9449_PROOF),
                        "mutated proof accepted ({:?}): {}", ok, text
                    );
                }
            }
        );
    }

    #[test]
    fn header_shape_is_checked() {
        let mut h = http::HeaderMap::new();
        assert_eq!(DpopVerifier::proof_header(&h), Err(DpopError::Missing));
        h.append("dpop", http::HeaderValue::from_static("a"));
        assert_eq!(DpopVerifier::proof_header(&h), Ok("a"));
        h.append("dpop", http::HeaderValue::from_static("b"));
        assert_eq!(DpopVerifier::proof_header(&h), Err(DpopError::Multiple));
    }
}
