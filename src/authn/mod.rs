//! Authentication: bearer JWTs verified against each issuer's JWKS.
//!
//! The verification cache only ever skips the *signature*: a cached token is
//! re-checked for expiry and for its key still being published on every
//! request, and everything after authentication (revocation, posture, policy)
//! runs every time. Tokens are never logged. The shared cache is keyed by
//! the token's SHA-256; a cached token keeps its own text (up to 2 KiB), so
//! each worker's front ([`crate::util::front`]) finds it by comparing the
//! text whole, without hashing it (as Envoy's JWT cache keys on the token).
//!
//! Defences (standards.md §8): the algorithm is pinned per key and must be in
//! the issuer's allow-list (the header's `alg` never chooses alone; `none` and
//! HMAC are refused outright); keys come only from the configured JWKS, never
//! from `jku`/`x5u`/`jwk`/`x5c`; `crit` is refused; `typ`, when present, must
//! name an access token; `iss` is compared exactly; `aud` is required; `exp`
//! is required; `nbf`/`iat` are honoured with a leeway of at most 60 s;
//! duplicate claims are refused; the token length is bounded.

pub mod jwks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use moka::sync::Cache;
use serde::Deserialize;

use crate::config::Config;
pub use jwks::{Issuer, VerifyKey};

/// Why a token was refused. Messages are safe to show the client: they never
/// contain the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no bearer token")]
    Missing,
    /// `Authorization` is not `Bearer <token>`.
    #[error("authorization header is not a bearer token")]
    NotBearer,
    /// Over the configured length.
    #[error("token is longer than {0} bytes")]
    TooLarge(usize),
    /// Not three base64url parts, or the JSON is bad.
    #[error("token is malformed")]
    Malformed,
    /// The header's `alg` is unknown, `none`, or not accepted.
    #[error("token algorithm is not accepted")]
    AlgorithmNotAccepted,
    /// The header names a `crit` extension.
    #[error("token header has a critical extension this verifier does not implement")]
    CriticalHeader,
    /// `typ` names something other than an access token.
    #[error("token type `{0}` is not an access token")]
    WrongType(String),
    /// `iss` is missing or names no configured issuer.
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    /// The issuer is not accepted on this route.
    #[error("token issuer is not accepted on this route")]
    IssuerNotAllowed,
    /// No published key matches the `kid`, even after a refresh.
    #[error("token signing key is unknown")]
    UnknownKey,
    /// The key's type or pinned algorithm does not fit the header's `alg`.
    #[error("token algorithm does not match its key")]
    KeyAlgorithmMismatch,
    /// Signature check failed.
    #[error("token signature is invalid")]
    BadSignature,
    /// Past `exp` (plus leeway).
    #[error("token has expired")]
    Expired,
    /// Before `nbf` (minus leeway).
    #[error("token is not yet valid")]
    NotYetValid,
    /// `iat` in the future beyond the leeway.
    #[error("token was issued in the future")]
    IssuedInFuture,
    /// `aud` missing or not one of ours.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A required claim is missing or has the wrong shape.
    #[error("token claim `{0}` is missing or malformed")]
    BadClaim(String),
}

/// The `Authorization` scheme a token came under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `Bearer` (RFC 6750).
    Bearer,
    /// `DPoP` (RFC 9449 §7.1): the token must be DPoP-bound and come with a proof.
    Dpop,
}

pub use crate::claims::Claims;

/// A token that passed signature and claim checks.
#[derive(Debug)]
pub struct VerifiedToken {
    /// Issuer that vouched for it.
    pub issuer: Arc<Issuer>,
    /// The key that verified the signature; the cache entry dies with it.
    pub key: Arc<VerifyKey>,
    /// Claims.
    pub claims: Claims,
    /// The device named by the issuer's device claim, if any, with the
    /// memo of its record as last resolved for phase 4
    /// ([`crate::posture::Snapshot::device_via`]: used only while the
    /// snapshot still holds that very record).
    pub device: Option<crate::posture::DeviceClaim>,
    /// SHA-256 of the token (the cache key), for the access memory; `None`
    /// for a browser session's principal.
    pub hash: Option<[u8; 32]>,
    /// The identity headers for the upstream, built once per verified token
    /// (a cached token's requests clone them: a reference count, no copy).
    pub headers: TokenHeaders,
    /// The token itself, for the per-thread front's exact comparison;
    /// `None` when longer than 2 KiB or for a browser session's principal.
    pub raw: Option<Box<str>>,
    /// The last policy decision a request of this token got
    /// ([`crate::policy::Engine::decide_with`]: used only for the same
    /// engine, the same whole key and before its expiry).
    pub decision_memo: arc_swap::ArcSwapOption<crate::policy::Decided>,
    /// The token's access-memory rows, once found
    /// ([`crate::access::Memo`]: phase 7 updates them in place).
    pub access: crate::access::Memo,
}

impl VerifiedToken {
    /// Starts reading, side by side, the memory a request on this cached
    /// token goes on to read: the token text (the front's comparison), the
    /// token's own lines, its subject and device strings, the identity
    /// header bytes and its device's record. Under many distinct tokens
    /// each of these is a cache miss; read where they are used, one after
    /// another (and behind the locked reference-count writes between them),
    /// the misses wait in turn. Read here, none depending on another, they
    /// are fetched together. Plain reads only: it changes nothing.
    fn warm(&self) {
        // Both memos first: taking each is a locked write (arc-swap's debt
        // slot), which waits for every read before it. Taken back to back,
        // before anything else is read, the device's record and the
        // decision are then fetched together with the reads below, not one
        // behind the other.
        let device = self.device.as_ref().map(|c| c.held());
        let decided = self.decision_memo.load();
        // The record's `superseded` flag (phase 4 reads it) and its version;
        // not its id's bytes, which nothing compares any more.
        let mut word = device
            .as_ref()
            .and_then(|g| g.as_ref())
            .map_or(0, |d| d.version ^ u64::from(d.superseded.get()))
            ^ decided.as_ref().map_or(0, |d| d.touch());
        let mut byte = 0u8;
        let mut lines = |b: &[u8]| {
            for x in b.iter().step_by(64).chain(b.last()) {
                byte ^= *x;
            }
        };
        if let Some(raw) = &self.raw {
            lines(raw.as_bytes());
        }
        lines(self.claims.sub.as_bytes());
        if let Some(d) = &self.device {
            lines(d.as_bytes());
        }
        let h = &self.headers;
        for v in [&h.subject, &h.issuer, &h.device].into_iter().flatten() {
            lines(v.as_bytes());
        }
        // The token's own lines past the first: the fields phases 3 to 7
        // read.
        let c = &self.claims;
        word ^= c.exp
            ^ c.iat.unwrap_or(0)
            ^ c.nbf.unwrap_or(0)
            ^ u64::from(c.jti.is_some())
            ^ u64::from(c.sid.is_some())
            ^ u64::from(c.cnf.is_some())
            ^ c.fingerprint.get().map_or(0, |f| *f as u64)
            ^ u64::from(self.hash.map_or(0, |h| h[0]));
        std::hint::black_box((word, byte));
    }
}

impl VerifiedToken {
    /// The second, shorter early read, once the upstream has answered: while
    /// a request waits on it, the worker serves others and the token's lines
    /// leave the cache again. Reads side by side what the rest of the
    /// request reads (the live-connection seed, phase 7): the issuer, the
    /// expiry, the subject's and device's first bytes. Only lines no request
    /// writes: reading a line another core writes (the reference count, the
    /// access rows) before writing it costs a second transfer when all
    /// requests share one token. Plain reads only.
    pub fn warm_late(&self) -> u64 {
        let first = |s: &str| u64::from(s.as_bytes().first().copied().unwrap_or(0));
        (Arc::as_ptr(&self.issuer) as usize as u64)
            ^ self.claims.exp
            ^ u64::from(self.claims.client_id.is_some())
            ^ first(&self.claims.sub)
            ^ self.device.as_deref().map_or(0, first)
            ^ u64::from(self.hash.map_or(0, |h| h[0]))
    }
}

/// An `Authorization` value as text: what `HeaderValue::to_str` accepts
/// (visible ASCII, space, tab), checked a word at a time. A header value
/// never holds another control byte or DEL (its constructors refuse them,
/// for HTTP/1.1 and h2 alike), so for one that is exactly "all ASCII";
/// `to_str`'s byte-by-byte loop over a ~500-byte token was about 1% of a
/// request's instructions.
fn header_text(v: &http::HeaderValue) -> Result<&str, AuthError> {
    let b = v.as_bytes();
    if !b.is_ascii() {
        return Err(AuthError::Malformed);
    }
    std::str::from_utf8(b).map_err(|_| AuthError::Malformed)
}

/// Bytes of a token's header values kept inline ([`TokenHeaders::of`]).
const INLINE_VALUES: usize = 118;

/// Header value bytes inline: `Bytes::from_owner` puts its reference count
/// right before them in the same allocation (128 bytes in all).
struct InlineValues {
    len: u8,
    buf: [u8; INLINE_VALUES],
}

impl InlineValues {
    fn new(b: &[u8]) -> Option<Self> {
        let mut buf = [0u8; INLINE_VALUES];
        buf.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self {
            len: u8::try_from(b.len()).ok()?,
            buf,
        })
    }
}

impl AsRef<[u8]> for InlineValues {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// `x-portcullis-subject` / `-issuer` / `-device` values of a verified token;
/// `None` where the value is not a valid header value.
#[derive(Debug, Clone, Default)]
pub struct TokenHeaders {
    /// The `sub` claim.
    pub subject: Option<http::HeaderValue>,
    /// The issuer's configured name.
    pub issuer: Option<http::HeaderValue>,
    /// The device claim.
    pub device: Option<http::HeaderValue>,
}

impl TokenHeaders {
    /// The header values of a verified principal (token or browser session).
    ///
    /// The three values are slices of one buffer: a request's clones of
    /// them touch one reference count, not three (under many distinct
    /// tokens each is a cache miss). Up to [`INLINE_VALUES`] bytes in all,
    /// the buffer sits right after that count in one allocation
    /// ([`InlineValues`]), so the count shares its first cache line with
    /// the subject's first bytes, which the early warm-up reads.
    pub fn of(claims: &Claims, issuer: &str, device: Option<&str>) -> Self {
        let parts = [Some(claims.sub.as_str()), Some(issuer), device];
        let mut buf = Vec::with_capacity(parts.iter().flatten().map(|p| p.len()).sum());
        let ranges = parts.map(|p| {
            // `from_str`'s check (visible ASCII and tab), so a value is
            // refused exactly as before.
            let p = p.filter(|p| http::HeaderValue::from_str(p).is_ok())?;
            let start = buf.len();
            buf.extend_from_slice(p.as_bytes());
            Some(start..buf.len())
        });
        let buf = match InlineValues::new(&buf) {
            Some(inline) => bytes::Bytes::from_owner(inline),
            None => bytes::Bytes::from(buf),
        };
        let [subject, issuer, device] =
            ranges.map(|r| r.and_then(|r| http::HeaderValue::from_maybe_shared(buf.slice(r)).ok()));
        Self {
            subject,
            issuer,
            device,
        }
    }
}

/// Result of [`Authenticator::authenticate`]: the token and whether the
/// signature check was skipped thanks to the cache.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The verified token.
    pub token: Arc<VerifiedToken>,
    /// True when served from the verification cache.
    pub cache_hit: bool,
    /// The clock (Unix seconds) the token was checked against: the phases
    /// after this one decide on the same second instead of each reading
    /// the clock again (a pipeline that waits on I/O refreshes it).
    pub now_s: u64,
}

#[derive(Deserialize)]
struct IssPeek {
    #[serde(default)]
    iss: Option<String>,
}

struct TokenExpiry;

impl moka::Expiry<[u8; 32], Arc<VerifiedToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<VerifiedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let deadline = value.claims.exp + value.issuer.cfg.leeway_s;
        Some(Duration::from_secs(
            deadline.saturating_sub(crate::util::now_unix()),
        ))
    }
}

/// Verifies bearer tokens for every configured issuer, with a cache of
/// verified tokens keyed by the token's SHA-256.
pub struct Authenticator {
    issuers: HashMap<String, Arc<Issuer>>,
    /// Keyed by the token's SHA-256, already uniform: moka's own hashing of
    /// the key is the cheap foldhash, not SipHash.
    cache: Cache<[u8; 32], Arc<VerifiedToken>, foldhash::fast::RandomState>,
    /// This authenticator's id in each thread's front of `cache`
    /// ([`crate::util::front`]); 0 when the cache has no capacity. A front
    /// slot is found by a seeded hash of the token and holds only if the
    /// cached token's own text equals it, so a hit there costs no SHA-256.
    front: u64,
    /// Picks a token's slot in the front (random seed per authenticator).
    front_hasher: foldhash::fast::RandomState,
    max_token_bytes: usize,
}

/// Longest token a cached token keeps the text of (and so can be found in
/// a front); longer ones are looked up in the shared cache only.
const FRONT_MAX_TOKEN_BYTES: usize = 2048;

thread_local! {
    /// This thread's front of the verified-token cache.
    static TOKENS: std::cell::RefCell<
        crate::util::front::Front<u64, Arc<VerifiedToken>>,
    > =
        const { std::cell::RefCell::new(crate::util::front::Front::new()) };
    /// The front bits [`Authenticator::warm`] computed for this thread's
    /// current request: (the token's address, its length, the owner, the
    /// bits). Phase 2 takes them instead of hashing the same bytes again;
    /// only for the very same bytes (address and length) of the same owner,
    /// and at most once. A wrong guess could only cost a front miss: an
    /// entry is used only if its token text equals the request's.
    static WARMED: std::cell::Cell<Option<(usize, usize, u64, u64)>> =
        const { std::cell::Cell::new(None) };
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .field("cached_tokens", &self.cache.entry_count())
            .finish()
    }
}

impl Authenticator {
    /// Builds the authenticator from issuers already constructed (and
    /// possibly carried over from the previous config on reload).
    pub fn new(issuers: Vec<Arc<Issuer>>, cache_capacity: u64, max_token_bytes: usize) -> Self {
        let cache = Cache::builder()
            .max_capacity(cache_capacity)
            .expire_after(TokenExpiry)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            issuers: issuers
                .into_iter()
                .map(|i| (i.cfg.issuer.clone(), i))
                .collect(),
            cache,
            front: if cache_capacity > 0 {
                crate::util::front::new_owner()
            } else {
                0
            },
            front_hasher: foldhash::fast::RandomState::default(),
            max_token_bytes,
        }
    }

    /// Builds issuers fresh from config (no keys fetched yet; call
    /// [`Issuer::refresh`] or [`Authenticator::refresh_all`]).
    pub fn from_config(cfg: &Config, fetcher: &jwks::Fetcher) -> Result<Self, jwks::JwksError> {
        let issuers = cfg
            .issuers
            .iter()
            .map(|ic| Issuer::new(ic.clone(), fetcher))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(
            issuers,
            crate::config::DEFAULT_TOKEN_CACHE_CAPACITY,
            crate::config::DEFAULT_MAX_TOKEN_BYTES,
        ))
    }

    /// All issuers.
    pub fn issuers(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.issuers.values()
    }

    /// Fetches every issuer's keys once; errors are logged and leave the
    /// issuer without keys (so it fails closed).
    pub async fn refresh_all(&self) {
        for i in self.issuers.values() {
            if let Err(e) = i.refresh().await {
                tracing::warn!(issuer = %i.cfg.name, error = %e, "jwks load failed");
            }
        }
    }

    /// True when every issuer has at least one usable key.
    pub fn ready(&self) -> bool {
        self.issuers.values().all(|i| i.key_count() > 0)
    }

    /// Number of cached verified tokens (approximate).
    pub fn cached_tokens(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Extracts the token from an `Authorization` header value.
    pub fn bearer_token(header: Option<&http::HeaderValue>) -> Result<&str, AuthError> {
        let s = header_text(header.ok_or(AuthError::Missing)?)?;
        let (scheme, rest) = s.split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        let t = rest.trim_matches(' ');
        if t.is_empty() {
            return Err(AuthError::Missing);
        }
        Ok(t)
    }

    /// Extracts the scheme and token from an `Authorization` header value:
    /// `Bearer <token>`, or `DPoP <token>` when `dpop` is accepted.
    pub fn authorization(
        header: Option<&http::HeaderValue>,
        dpop: bool,
    ) -> Result<(Scheme, &str), AuthError> {
        let s = header_text(header.ok_or(AuthError::Missing)?)?;
        let (scheme, rest) = s.split_once(' ').ok_or(AuthError::NotBearer)?;
        let scheme = if scheme.eq_ignore_ascii_case("bearer") {
            Scheme::Bearer
        } else if dpop && scheme.eq_ignore_ascii_case("dpop") {
            Scheme::Dpop
        } else {
            return Err(AuthError::NotBearer);
        };
        let t = rest.trim_matches(' ');
        if t.is_empty() {
            return Err(AuthError::Missing);
        }
        Ok((scheme, t))
    }

    /// The fast path: a token verified before, still within its lifetime and
    /// whose key is still published. `None` means "verify it".
    pub fn check_cached(
        &self,
        token: &str,
        now: u64,
    ) -> Option<Result<Arc<VerifiedToken>, AuthError>> {
        if token.len() > self.max_token_bytes {
            return Some(Err(AuthError::TooLarge(self.max_token_bytes)));
        }
        let (bits, warmed) = self.front_bits_warmed(token);
        let hit = match self.front_get(bits, token, warmed) {
            Some(hit) => hit,
            None => {
                let hit = self.cache.get(&crate::util::sha256(token.as_bytes()))?;
                self.front_put(bits, token, &hit);
                hit
            }
        };
        if !hit.issuer.still_publishes(&hit.key) {
            if let Some(hash) = hit.hash {
                self.cache.invalidate(&hash);
            }
            if self.front != 0 {
                TOKENS.with_borrow_mut(|f| f.remove(self.front, bits, &bits));
            }
            return None;
        }
        Some(check_times(&hit, now).map(|()| hit))
    }

    /// Starts fetching, before the phases ahead of phase 2 run, what a
    /// request on a cached token goes on to read: the front's set, the
    /// token and, through [`VerifiedToken::warm`], the rest. Under many
    /// distinct tokens these are cache misses in a chain (each address read
    /// from the one before); begun here, they overlap with admission and
    /// routing instead of waiting in phase 2. Reads only: what the header
    /// holds is checked, as ever, by [`Authenticator::authorization`] and
    /// [`Authenticator::check_cached`] (an entry is used only if its token
    /// text equals the request's).
    pub fn warm(&self, header: Option<&http::HeaderValue>) {
        WARMED.set(None);
        if self.front == 0 {
            return;
        }
        let Some(v) = header.map(http::HeaderValue::as_bytes) else {
            return;
        };
        let Some(token) = header_token(v).filter(|t| t.len() <= self.max_token_bytes) else {
            return;
        };
        let bits = std::hash::BuildHasher::hash_one(&self.front_hasher, token);
        WARMED.set(Some((token.as_ptr().addr(), token.len(), self.front, bits)));
        TOKENS.with_borrow(|f| {
            if let Some(t) = f.find(self.front, bits, &bits) {
                t.warm();
            }
        });
    }

    fn front_bits(&self, token: &str) -> u64 {
        self.front_bits_warmed(token).0
    }

    /// The front bits of `token`, and whether [`Authenticator::warm`] took
    /// them (and so already read the cached token's lines, if any).
    fn front_bits_warmed(&self, token: &str) -> (u64, bool) {
        if self.front == 0 {
            return (0, false);
        }
        if let Some((at, len, owner, bits)) = WARMED.take()
            && at == token.as_ptr().addr()
            && len == token.len()
            && owner == self.front
        {
            return (bits, true);
        }
        let bits = std::hash::BuildHasher::hash_one(&self.front_hasher, token.as_bytes());
        (bits, false)
    }

    /// The front's entry for `token`. `warmed`: the early read already
    /// ran for these bytes this request, so the entry's lines are not read
    /// a second time (about 700 instructions a request, for nothing: they
    /// were fetched then and are still in cache).
    fn front_get(&self, bits: u64, token: &str, warmed: bool) -> Option<Arc<VerifiedToken>> {
        if self.front == 0 {
            return None;
        }
        TOKENS.with_borrow(|f| {
            let t = f.find(self.front, bits, &bits)?;
            if !warmed {
                t.warm();
            }
            (t.raw.as_deref() == Some(token)).then(|| t.clone())
        })
    }

    fn front_put(&self, bits: u64, token: &str, hit: &Arc<VerifiedToken>) {
        if self.front != 0 && hit.raw.as_deref() == Some(token) {
            TOKENS.with_borrow_mut(|f| f.put(self.front, bits, bits, hit.clone()));
        }
    }

    /// Verifies a token, using the cache when it can. `allowed` limits the
    /// issuers (by name); empty means any configured issuer.
    pub async fn authenticate(
        &self,
        token: &str,
        allowed: &[String],
    ) -> Result<Authenticated, AuthError> {
        let now = crate::util::now_unix();
        let (token, cache_hit, now_s) = match self.check_cached(token, now) {
            Some(r) => (r?, true, now),
            // The cold path (signature, perhaps a JWKS fetch) is boxed:
            // its state does not bloat every request's future. A fetch
            // takes time: the clock is read again after it.
            None => (
                Box::pin(self.verify_uncached(token, now)).await?,
                false,
                crate::util::now_unix(),
            ),
        };
        if !allowed.is_empty() && !allowed.iter().any(|n| *n == token.issuer.cfg.name) {
            return Err(AuthError::IssuerNotAllowed);
        }
        Ok(Authenticated {
            token,
            cache_hit,
            now_s,
        })
    }

    /// Full verification: header, issuer, key (refreshing the JWKS once,
    /// rate-limited, on an unknown `kid`), signature, claims. Caches success.
    pub async fn verify_uncached(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Arc<VerifiedToken>, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge(self.max_token_bytes));
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(_s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header = parse_header(h64)?;
        let peek: IssPeek = decode_part(p64)?;
        let iss = peek.iss.ok_or(AuthError::UnknownIssuer)?;
        let issuer = self
            .issuers
            .get(&iss)
            .ok_or(AuthError::UnknownIssuer)?
            .clone();
        if !issuer.algorithms().contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAccepted);
        }
        let key = issuer.key_for(header.kid.as_deref(), header.alg).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(map_jwt_error)?;
        let claims = data.claims;
        if let Some(iat) = claims.iat
            && iat > now + issuer.cfg.leeway_s
        {
            return Err(AuthError::IssuedInFuture);
        }
        // The device claim is configurable, so read it from the raw payload.
        let device = if issuer.cfg.device_claim.is_empty() {
            None
        } else {
            let raw: serde_json::Map<String, serde_json::Value> = decode_part(p64)?;
            match raw.get(&issuer.cfg.device_claim) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 256 => {
                    Some(s.clone())
                }
                Some(_) => return Err(AuthError::BadClaim(issuer.cfg.device_claim.clone())),
            }
        };
        let headers = TokenHeaders::of(&claims, &issuer.cfg.name, device.as_deref());
        let hash = crate::util::sha256(token.as_bytes());
        let verified = Arc::new(VerifiedToken {
            issuer,
            key,
            claims,
            device: device.map(crate::posture::DeviceClaim::new),
            hash: Some(hash),
            headers,
            raw: (token.len() <= FRONT_MAX_TOKEN_BYTES).then(|| Box::from(token)),
            decision_memo: arc_swap::ArcSwapOption::empty(),
            access: crate::access::Memo::default(),
        });
        check_times(&verified, now)?;
        self.cache.insert(hash, verified.clone());
        self.front_put(self.front_bits(token), token, &verified);
        Ok(verified)
    }
}

/// Which OIDC token [`Authenticator::verify_oidc`] expects; each has its own
/// `typ` (standards.md §8: explicit types keep JWT kinds apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OidcToken {
    /// An ID token (`typ` absent or `JWT`).
    Id,
    /// A back-channel logout token (`typ` absent or `logout+jwt`).
    Logout,
}

impl Authenticator {
    /// Verifies an OIDC ID token or logout token from issuer `issuer_name`
    /// with the access-token rules (pinned algorithms, keys only from the
    /// issuer's JWKS, exact `iss`, `exp`/`nbf`/`iat` with the issuer's
    /// leeway, no `crit`) except that `aud` must be `client_id`. Never
    /// cached. Returns the claims and the raw payload (for `nonce`,
    /// `events`, the device claim).
    pub async fn verify_oidc(
        &self,
        token: &str,
        issuer_name: &str,
        client_id: &str,
        kind: OidcToken,
        now: u64,
    ) -> Result<(Claims, serde_json::Map<String, serde_json::Value>), AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge(self.max_token_bytes));
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(_p64), Some(_s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let typs: &[&str] = match kind {
            OidcToken::Id => &["jwt"],
            OidcToken::Logout => &["logout+jwt"],
        };
        let header = parse_header_typed(h64, typs)?;
        let issuer = self
            .issuers
            .values()
            .find(|i| i.cfg.name == issuer_name)
            .ok_or(AuthError::UnknownIssuer)?
            .clone();
        if !issuer.algorithms().contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAccepted);
        }
        let key = issuer.key_for(header.kid.as_deref(), header.alg).await?;
        let mut validation = key.validation.clone();
        validation.set_audience(&[client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(map_jwt_error)?;
        let raw = data.claims;
        let iat = raw
            .get("iat")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| AuthError::BadClaim("iat".into()))?;
        if iat > now + issuer.cfg.leeway_s {
            return Err(AuthError::IssuedInFuture);
        }
        let mut for_claims = raw.clone();
        if kind == OidcToken::Logout {
            // A logout token may carry only `sid`; `Claims` wants a subject.
            for_claims
                .entry("sub")
                .or_insert_with(|| serde_json::Value::String(String::new()));
        }
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(for_claims))
            .map_err(|e| {
                let msg = e.to_string();
                match msg
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split_once('`'))
                {
                    Some((field, _)) => AuthError::BadClaim(field.chars().take(32).collect()),
                    None => AuthError::Malformed,
                }
            })?;
        Ok((claims, raw))
    }
}

/// The token of an `Authorization` value as [`Authenticator::authorization`]
/// finds it (after the first space, spaces trimmed), without its checks:
/// for [`Authenticator::warm`], whose guess only picks what to read early.
fn header_token(v: &[u8]) -> Option<&[u8]> {
    let sp = v.iter().position(|c| *c == b' ')?;
    let mut t = v.get(sp + 1..)?;
    while let [b' ', rest @ ..] = t {
        t = rest;
    }
    while let [rest @ .., b' '] = t {
        t = rest;
    }
    (!t.is_empty()).then_some(t)
}

fn check_times(t: &VerifiedToken, now: u64) -> Result<(), AuthError> {
    let leeway = t.issuer.cfg.leeway_s;
    if now > t.claims.exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = t.claims.nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

/// The header members this verifier reads; anything else is ignored, and
/// `jku`/`x5u`/`jwk`/`x5c` are never used to find a key.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

/// Longest `kid` accepted; it is an opaque map key, never a path or query.
const MAX_KID_LEN: usize = 256;

fn parse_header(h64: &str) -> Result<Header, AuthError> {
    parse_header_typed(h64, &["jwt", "at+jwt"])
}

/// Parses a JWS header whose `typ`, when present, must be one of `typs`
/// (lowercase, without `application/`).
fn parse_header_typed(h64: &str, typs: &[&str]) -> Result<Header, AuthError> {
    let raw: RawHeader = decode_part(h64)?;
    if raw.crit.is_some() {
        return Err(AuthError::CriticalHeader);
    }
    if let Some(typ) = &raw.typ {
        let t = typ.to_ascii_lowercase();
        let t = t.strip_prefix("application/").unwrap_or(&t);
        if !typs.contains(&t) {
            return Err(AuthError::WrongType(typ.chars().take(32).collect()));
        }
    }
    if raw.kid.as_ref().is_some_and(|k| k.len() > MAX_KID_LEN) {
        return Err(AuthError::Malformed);
    }
    let alg = jwks::parse_alg(&raw.alg).ok_or(AuthError::AlgorithmNotAccepted)?;
    Ok(Header { alg, kid: raw.kid })
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, AuthError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::AlgorithmNotAccepted,
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::UnsupportedAlgorithm => AuthError::KeyAlgorithmMismatch,
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
            if c == "aud" {
                AuthError::WrongAudience
            } else {
                AuthError::BadClaim(c.chars().take(32).collect())
            }
        }
        ErrorKind::Json(j) => {
            // serde names the missing field: "missing field `exp` at line …".
            let msg = j.to_string();
            match msg
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
            {
                Some((field, _)) => AuthError::BadClaim(field.chars().take(32).collect()),
                None => AuthError::Malformed,
            }
        }
        _ => AuthError::Malformed,
    }
}

/// Builds the per-key validation: one algorithm, exact `iss`, required `aud`
/// and `exp`, `nbf` checked, the issuer's leeway.
pub(crate) fn validation_for(
    alg: Algorithm,
    iss: &str,
    audiences: &[String],
    leeway: u64,
) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.set_issuer(&[iss]);
    v.set_audience(audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    v.leeway = leeway;
    v
}

#[cfg(test)]
#[allow(clippy::panic, clippy::unwrap_used)]
mod tests {
    use super::{AuthError, Authenticator, Claims, Scheme, header_text, header_token};

    #[test]
    fn header_text_accepts_exactly_what_to_str_accepts() {
        // Every byte a header value can hold, alone and inside a token: the
        // word-at-a-time check agrees with `to_str` on each, and a refused
        // value is `Malformed` in both extractors.
        let mut seen_refused = 0;
        for b in 0..=u8::MAX {
            for bytes in [vec![b], [b"Bearer abc".as_slice(), &[b], b"def"].concat()] {
                let Ok(v) = http::HeaderValue::from_bytes(&bytes) else {
                    continue;
                };
                assert_eq!(
                    header_text(&v).ok(),
                    v.to_str().ok(),
                    "byte {b:#04x} in {bytes:?}"
                );
                if v.to_str().is_err() {
                    seen_refused += 1;
                    assert!(matches!(
                        Authenticator::authorization(Some(&v), true),
                        Err(AuthError::Malformed)
                    ));
                    assert!(matches!(
                        Authenticator::bearer_token(Some(&v)),
                        Err(AuthError::Malformed)
                    ));
                }
            }
        }
        // obs-text (0x80..=0xff) is refused, alone and inside a token.
        assert_eq!(seen_refused, 2 * 128);
        // Also when it is valid UTF-8 (which `from_utf8` alone would take).
        let v = http::HeaderValue::from_bytes("Bearer ab\u{e9}c".as_bytes()).unwrap();
        assert!(v.to_str().is_err());
        assert!(matches!(header_text(&v), Err(AuthError::Malformed)));
    }

    #[test]
    fn the_early_read_finds_the_token_phase_two_checks() {
        for v in [
            "Bearer abc.def.ghi",
            "bearer   abc.def.ghi  ",
            "DPoP x",
            "Bearer a b",
            "Basic dXNlcjpwdw==",
        ] {
            let h = http::HeaderValue::from_str(v).unwrap();
            let (_, token) = Authenticator::authorization(Some(&h), true).unwrap_or((
                Scheme::Bearer,
                v.split_once(' ').unwrap().1.trim_matches(' '),
            ));
            assert_eq!(header_token(v.as_bytes()), Some(token.as_bytes()), "{v:?}");
        }
        for v in ["Bearer", "Bearer ", "Bearer    "] {
            assert_eq!(header_token(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn phase_two_takes_the_early_bits_only_for_the_same_bytes_once() {
        let auth = Authenticator::new(Vec::new(), 10, 8192);
        let hash = |t: &str| std::hash::BuildHasher::hash_one(&auth.front_hasher, t.as_bytes());
        let h = http::HeaderValue::from_static("Bearer  abc.def.ghi ");
        let (_, token) = Authenticator::authorization(Some(&h), false).unwrap();
        auth.warm(Some(&h));
        assert_eq!(auth.front_bits(token), hash(token));
        // Taken once: the next call hashes (the same value, by hashing).
        assert!(super::WARMED.get().is_none());
        assert_eq!(auth.front_bits(token), hash(token));
        // Equal text at another address is hashed, not taken.
        auth.warm(Some(&h));
        let copy = String::from(token);
        assert_eq!(auth.front_bits(&copy), hash(&copy));
        // Another authenticator (a reload) never takes this one's bits.
        let other = Authenticator::new(Vec::new(), 10, 8192);
        auth.warm(Some(&h));
        assert_eq!(
            other.front_bits(token),
            std::hash::BuildHasher::hash_one(&other.front_hasher, token.as_bytes())
        );
        // A request without a token clears what an earlier one left.
        auth.warm(Some(&h));
        auth.warm(None);
        assert!(super::WARMED.get().is_none());
    }

    #[test]
    fn authorization_reads_the_scheme_and_refuses_non_ascii() {
        let read = |v: &[u8], dpop: bool| {
            let v = http::HeaderValue::from_bytes(v).unwrap_or_else(|e| panic!("{e}"));
            Authenticator::authorization(Some(&v), dpop).map(|(s, t)| (s, t.to_owned()))
        };
        assert_eq!(
            read(b"Bearer a.b.c", false),
            Ok((Scheme::Bearer, "a.b.c".into()))
        );
        assert_eq!(
            read(b"bearer  a.b\tc ", false),
            Ok((Scheme::Bearer, "a.b\tc".into()))
        );
        assert_eq!(
            read(b"DPoP a.b.c", true),
            Ok((Scheme::Dpop, "a.b.c".into()))
        );
        assert_eq!(read(b"DPoP a.b.c", false), Err(AuthError::NotBearer));
        assert_eq!(read(b"Basic abc", false), Err(AuthError::NotBearer));
        assert_eq!(read(b"Bearer ", false), Err(AuthError::Missing));
        // obs-text is a valid header value, not a token.
        assert_eq!(
            read(b"Bearer a.\xc3\xa9.c", false),
            Err(AuthError::Malformed)
        );
        assert_eq!(read(b"Bearer a.\xff.c", false), Err(AuthError::Malformed));
        assert_eq!(
            Authenticator::authorization(None, false).map(|_| ()),
            Err(AuthError::Missing)
        );
        let v = http::HeaderValue::from_bytes(b"Bearer \xfe").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Authenticator::bearer_token(Some(&v)),
            Err(AuthError::Malformed)
        );
    }

    fn claims(extra: serde_json::Value) -> Claims {
        let mut v = serde_json::json!({
            "sub": "alice", "iss": "https://idp.test", "exp": 2000, "iat": 1000,
            "auth_time": 990, "acr": "mfa", "amr": ["pwd", "otp"],
            "client_id": "app", "jti": "j1",
        });
        if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                m.insert(k.clone(), x.clone());
            }
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("claims: {e}"))
    }

    #[test]
    fn every_decision_claim_changes_the_fingerprint() {
        let base = claims(serde_json::json!({})).decision_fingerprint();
        assert_eq!(claims(serde_json::json!({})).decision_fingerprint(), base);
        // Claims no decision reads do not change it.
        assert_eq!(
            claims(serde_json::json!({ "sid": "s9", "nbf": 5 })).decision_fingerprint(),
            base
        );
        for (k, v) in [
            ("sub", serde_json::json!("mallory")),
            ("iss", serde_json::json!("https://other.test")),
            ("exp", serde_json::json!(2001)),
            ("iat", serde_json::json!(1001)),
            ("auth_time", serde_json::json!(991)),
            ("acr", serde_json::json!("pwd")),
            ("amr", serde_json::json!(["pwd"])),
            ("client_id", serde_json::json!("other")),
            ("jti", serde_json::json!("j2")),
            ("acr", serde_json::Value::Null),
        ] {
            let c = claims(serde_json::json!({ k: v }));
            assert_ne!(c.decision_fingerprint(), base, "{k} = {v}");
        }
    }

    #[test]
    fn token_headers_are_the_values_or_none() {
        let h = super::TokenHeaders::of(&claims(serde_json::json!({})), "corp", Some("dev-1"));
        let text = |v: &Option<http::HeaderValue>| v.as_ref().map(|v| v.as_bytes().to_vec());
        assert_eq!(text(&h.subject), Some(b"alice".to_vec()));
        assert_eq!(text(&h.issuer), Some(b"corp".to_vec()));
        assert_eq!(text(&h.device), Some(b"dev-1".to_vec()));
        // A value that is no header value is left out, the others stay
        // whole (the buffer they share does not shift them).
        let c = claims(serde_json::json!({ "sub": "ali\nce" }));
        let h = super::TokenHeaders::of(&c, "co\u{7f}rp", Some("d\u{e9}v-2"));
        assert_eq!(text(&h.subject), None);
        assert_eq!(text(&h.issuer), None);
        // obs-text passes, as HeaderValue::from_str lets it.
        assert_eq!(text(&h.device), Some("d\u{e9}v-2".as_bytes().to_vec()));
        let h = super::TokenHeaders::of(&claims(serde_json::json!({ "sub": "" })), "corp", None);
        assert_eq!(text(&h.subject), Some(Vec::new()));
        assert_eq!(text(&h.issuer), Some(b"corp".to_vec()));
        assert_eq!(text(&h.device), None);
        // Inline up to INLINE_VALUES bytes in all, one heap buffer beyond:
        // the same values either way.
        for total in [super::INLINE_VALUES, super::INLINE_VALUES + 1, 700] {
            let sub = "s".repeat(total - "corp".len() - 20);
            let dev = "d".repeat(20);
            let h = super::TokenHeaders::of(
                &claims(serde_json::json!({ "sub": sub.clone() })),
                "corp",
                Some(&dev),
            );
            assert_eq!(text(&h.subject), Some(sub.into_bytes()), "{total}");
            assert_eq!(text(&h.issuer), Some(b"corp".to_vec()));
            assert_eq!(text(&h.device), Some(dev.into_bytes()));
        }
    }
}
