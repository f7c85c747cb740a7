//! Issuers and their published keys: JWKS from a URL, via OIDC discovery, or
//! from a static file; refreshed on a schedule and on an unknown `kid`
//! (rate-limited). The key set is swapped atomically; a key that disappears
//! takes its cached tokens with it (the token cache checks
//! [`Issuer::still_publishes`] on every hit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::AuthError;
use crate::config::IssuerConfig;

/// Largest JWKS or discovery document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Time allowed for one JWKS or discovery fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A key-loading error.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Fetch failed.
    #[error("fetch `{url}`: {message}")]
    Fetch {
        /// URL.
        url: String,
        /// Why.
        message: String,
    },
    /// File could not be read.
    #[error("{path}: {message}")]
    File {
        /// Path.
        path: String,
        /// Why.
        message: String,
    },
    /// The document is not a JWKS / discovery document.
    #[error("{0}")]
    Invalid(String),
}

/// A shared HTTPS client for JWKS and discovery fetches (web PKI roots plus
/// optional per-issuer CA bundles).
#[derive(Clone)]
pub struct Fetcher {
    default: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Default for Fetcher {
    fn default() -> Self {
        Self {
            default: client_with_ca(None).unwrap_or_else(|_| client_with_roots(webpki_store())),
        }
    }
}

fn webpki_store() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

fn client_with_roots(
    roots: rustls::RootCertStore,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>> {
    let conn = crate::tls::outbound::https_connector(roots, Duration::from_secs(5));
    Client::builder(TokioExecutor::new()).build(conn)
}

fn client_with_ca(
    ca: Option<&Path>,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>, JwksError> {
    let mut roots = webpki_store();
    if let Some(p) = ca {
        let extra = crate::tls::load_roots(&[p]).map_err(|e| JwksError::File {
            path: p.display().to_string(),
            message: e.to_string(),
        })?;
        roots.extend(extra.roots);
    }
    Ok(client_with_roots(roots))
}

impl Fetcher {
    async fn get(
        client: &Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
        url: &str,
    ) -> Result<Bytes, JwksError> {
        let err = |m: String| JwksError::Fetch {
            url: url.to_owned(),
            message: m,
        };
        let uri: http::Uri = url.parse().map_err(|e| err(format!("{e}")))?;
        let req = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = tokio::time::timeout(FETCH_TIMEOUT, client.request(req))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("status {}", resp.status())));
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| err("body timed out".into()))?
        .map_err(|e| err(format!("body: {e}")))?;
        Ok(body.to_bytes())
    }
}

/// One published verification key, pinned to exactly one algorithm.
pub struct VerifyKey {
    /// `kid`, when the JWK has one.
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: Algorithm,
    /// The key.
    pub key: DecodingKey,
    /// Validation rules for tokens signed by this key.
    pub validation: Validation,
    /// The JWK as published, to tell an unchanged key across refreshes.
    fingerprint: String,
    /// Set once a refresh no longer publishes this key (see
    /// [`Issuer::still_publishes`]); never cleared.
    withdrawn: AtomicBool,
}

impl VerifyKey {
    /// The stand-in key of a browser session's principal: the session was
    /// authenticated at login (its ID token verified then), so no signature
    /// is checked per request.
    // INVARIANT: never handed to a signature check nor put in the token
    // cache; its algorithm list is empty, so any check would fail.
    pub fn session_marker() -> Arc<Self> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = Vec::new();
        Arc::new(Self {
            kid: None,
            alg: Algorithm::ES256,
            key: DecodingKey::from_secret(&[]),
            validation,
            fingerprint: String::new(),
            withdrawn: AtomicBool::new(false),
        })
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    by_kid: HashMap<String, Arc<VerifyKey>>,
}

enum Source {
    Url(String),
    Discovery(String),
    File(std::path::PathBuf),
}

/// A configured issuer with its current key set.
pub struct Issuer {
    /// Its configuration.
    pub cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<KeySet>,
    source: Source,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    refresh_lock: tokio::sync::Mutex<()>,
    started: Instant,
    /// Milliseconds since `started` of the last refresh attempt, plus one (0 = never).
    last_refresh_ms: AtomicU64,
    refreshes: AtomicU64,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("name", &self.cfg.name)
            .field("keys", &self.key_count())
            .finish()
    }
}

/// The asymmetric JOSE algorithms portcullis verifies; `none` and HMAC are
/// never accepted for tokens, proofs or SETs.
pub fn parse_alg(s: &str) -> Option<Algorithm> {
    Some(match s {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn key_alg_to_alg(k: KeyAlgorithm) -> Option<Algorithm> {
    parse_alg(&k.to_string())
}

fn is_rsa(a: Algorithm) -> bool {
    matches!(
        a,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    )
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Issuer {
    /// Builds an issuer with an empty key set; `refresh` loads keys, and a
    /// background task keeps them fresh while the issuer lives.
    pub fn new(cfg: IssuerConfig, fetcher: &Fetcher) -> Result<Arc<Self>, JwksError> {
        let algorithms = cfg.algorithms.iter().filter_map(|a| parse_alg(a)).collect();
        let source = match (&cfg.jwks_url, &cfg.discovery_url, &cfg.jwks_file) {
            (Some(u), _, _) => Source::Url(u.clone()),
            (_, Some(u), _) => Source::Discovery(u.clone()),
            (_, _, Some(p)) => Source::File(p.clone()),
            _ => {
                return Err(JwksError::Invalid(format!(
                    "issuer `{}` has no key source",
                    cfg.name
                )));
            }
        };
        let client = match &cfg.fetch_ca {
            Some(p) => client_with_ca(Some(p))?,
            None => fetcher.default.clone(),
        };
        Ok(Arc::new(Self {
            cfg,
            algorithms,
            keys: ArcSwap::from_pointee(KeySet::default()),
            source,
            client,
            refresh_lock: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            last_refresh_ms: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
        }))
    }

    /// Starts the scheduled refresh; it stops when the issuer is dropped.
    pub fn spawn_refresh_task(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = Duration::from_secs(self.cfg.refresh_interval_s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(issuer) = weak.upgrade() else { return };
                if let Err(e) = issuer.refresh().await {
                    tracing::warn!(issuer = %issuer.cfg.name, error = %e, "scheduled jwks refresh failed; keeping current keys");
                }
            }
        });
    }

    /// The algorithms this issuer accepts.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// Number of usable keys now published.
    pub fn key_count(&self) -> usize {
        self.keys.load().keys.len()
    }

    /// Completed refreshes so far.
    pub fn refresh_count(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// True while `key` is still in the current key set. Every cached token
    /// asks on every request, so the answer is kept on the key: a refresh
    /// marks what it stopped publishing right after it swaps the set in (a
    /// request that read the old set a moment earlier would have said yes
    /// too). One atomic load instead of a key-set load and a `kid` lookup.
    pub fn still_publishes(&self, key: &Arc<VerifyKey>) -> bool {
        !key.withdrawn.load(Ordering::Acquire)
    }

    /// Whether `set` publishes `key`: under its `kid` when it has one (the
    /// last key listed with a `kid` wins it), else anywhere in the set.
    fn publishes(set: &KeySet, key: &Arc<VerifyKey>) -> bool {
        match &key.kid {
            Some(kid) => set.by_kid.get(kid).is_some_and(|k| Arc::ptr_eq(k, key)),
            None => set.keys.iter().any(|k| Arc::ptr_eq(k, key)),
        }
    }

    /// Swaps in a new key set, then marks every key of the old and the new
    /// set that the new one does not publish.
    fn install(&self, set: KeySet) {
        let set = Arc::new(set);
        let old = self.keys.swap(set.clone());
        for k in old.keys.iter().chain(set.keys.iter()) {
            if !Self::publishes(&set, k) {
                k.withdrawn.store(true, Ordering::Release);
            }
        }
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<Option<Arc<VerifyKey>>, AuthError> {
        let set = self.keys.load();
        match kid {
            Some(kid) => match set.by_kid.get(kid) {
                Some(k) if k.alg == alg => Ok(Some(k.clone())),
                Some(_) => Err(AuthError::KeyAlgorithmMismatch),
                None => Ok(None),
            },
            None => {
                let mut it = set.keys.iter().filter(|k| k.alg == alg);
                match (it.next(), it.next()) {
                    (Some(k), None) => Ok(Some(k.clone())),
                    // Several candidates: a token must name its key.
                    (Some(_), Some(_)) => Err(AuthError::UnknownKey),
                    _ => Ok(None),
                }
            }
        }
    }

    /// The key for a token header, refreshing the JWKS once (rate-limited)
    /// when it is unknown.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyKey>, AuthError> {
        if let Some(k) = self.find(kid, alg)? {
            return Ok(k);
        }
        if matches!(self.source, Source::File(_)) {
            return Err(AuthError::UnknownKey);
        }
        let _guard = self.refresh_lock.lock().await;
        // Another request may have refreshed while we waited.
        if let Some(k) = self.find(kid, alg)? {
            return Ok(k);
        }
        let min = self.cfg.min_refresh_interval_s * 1000;
        let last = self.last_refresh_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        if last != 0 && now.saturating_sub(last) < min {
            return Err(AuthError::UnknownKey);
        }
        if let Err(e) = self.refresh_locked().await {
            tracing::warn!(issuer = %self.cfg.name, error = %e, "jwks refresh on unknown kid failed");
        }
        self.find(kid, alg)?.ok_or(AuthError::UnknownKey)
    }

    /// Loads the key set from its source and swaps it in. On error the
    /// current keys stay.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _guard = self.refresh_lock.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<usize, JwksError> {
        self.last_refresh_ms.store(
            self.started.elapsed().as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        let doc = match &self.source {
            Source::File(p) => std::fs::read(p)
                .map(Bytes::from)
                .map_err(|e| JwksError::File {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?,
            Source::Url(u) => Fetcher::get(&self.client, u).await?,
            Source::Discovery(u) => {
                let d = Fetcher::get(&self.client, u).await?;
                let d: Discovery = serde_json::from_slice(&d)
                    .map_err(|e| JwksError::Invalid(format!("discovery document `{u}`: {e}")))?;
                if d.issuer != self.cfg.issuer {
                    return Err(JwksError::Invalid(format!(
                        "discovery document `{u}` names issuer `{}`, expected `{}`",
                        d.issuer, self.cfg.issuer
                    )));
                }
                Fetcher::get(&self.client, &d.jwks_uri).await?
            }
        };
        let set = self.parse_jwks(&doc)?;
        let n = set.keys.len();
        self.install(set);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(issuer = %self.cfg.name, keys = n, "jwks loaded");
        Ok(n)
    }

    /// Parses a JWKS document into keys pinned to one algorithm each,
    /// reusing the current `Arc` for every unchanged key so cached tokens
    /// stay valid. Keys that are private, symmetric, not for signing, or of
    /// no accepted algorithm are skipped.
    fn parse_jwks(&self, doc: &[u8]) -> Result<KeySet, JwksError> {
        let raw: RawJwks = serde_json::from_slice(doc).map_err(|e| {
            JwksError::Invalid(format!("issuer `{}`: not a JWKS: {e}", self.cfg.name))
        })?;
        let current = self.keys.load();
        let mut set = KeySet::default();
        for v in raw.keys {
            let fingerprint = v.to_string();
            if v.get("d").is_some() || v.get("k").is_some() {
                tracing::warn!(issuer = %self.cfg.name, "jwks holds private or symmetric key material; key skipped");
                continue;
            }
            // A key once withdrawn stays so: it is parsed afresh if it returns.
            if let Some(old) = current
                .keys
                .iter()
                .find(|k| k.fingerprint == fingerprint && !k.withdrawn.load(Ordering::Acquire))
            {
                if let Some(kid) = &old.kid {
                    set.by_kid.insert(kid.clone(), old.clone());
                }
                set.keys.push(old.clone());
                continue;
            }
            let jwk: Jwk = match serde_json::from_value(v) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.name, error = %e, "unusable jwk skipped");
                    continue;
                }
            };
            if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let Some(alg) = self.pin_algorithm(&jwk) else {
                tracing::warn!(issuer = %self.cfg.name, kid = ?jwk.common.key_id, "jwk fits no accepted algorithm; skipped");
                continue;
            };
            let key = match DecodingKey::from_jwk(&jwk) {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.name, error = %e, "jwk not a usable key; skipped");
                    continue;
                }
            };
            let vk = Arc::new(VerifyKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
                validation: super::validation_for(
                    alg,
                    &self.cfg.issuer,
                    &self.cfg.audiences,
                    self.cfg.leeway_s,
                ),
                fingerprint,
                withdrawn: AtomicBool::new(false),
            });
            if let Some(kid) = &vk.kid {
                if set.by_kid.contains_key(kid) {
                    tracing::warn!(issuer = %self.cfg.name, kid = %kid, "duplicate kid in jwks; later key skipped");
                    continue;
                }
                set.by_kid.insert(kid.clone(), vk.clone());
            }
            set.keys.push(vk);
        }
        Ok(set)
    }

    /// One algorithm per key: the JWK's own `alg` if it is accepted, else
    /// the first accepted algorithm of the key's type.
    fn pin_algorithm(&self, jwk: &Jwk) -> Option<Algorithm> {
        let fits = |a: Algorithm| match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => is_rsa(a),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => a == Algorithm::ES256,
                EllipticCurve::P384 => a == Algorithm::ES384,
                _ => false,
            },
            AlgorithmParameters::OctetKeyPair(okp) => {
                okp.curve == EllipticCurve::Ed25519 && a == Algorithm::EdDSA
            }
            _ => false,
        };
        match jwk.common.key_algorithm {
            Some(ka) => key_alg_to_alg(ka).filter(|a| fits(*a) && self.algorithms.contains(a)),
            None => self.algorithms.iter().copied().find(|a| fits(*a)),
        }
    }
}
