//! Browser access: OIDC login, server-side sessions, logout and OIDC
//! Back-Channel Logout, for routes with `auth = "browser"`.
//!
//! A session is an opaque 256-bit id in a `__Host-` cookie; the server keeps
//! the record (subject, device, acr, expiry, binding) through the one apply
//! path of the posture store, keyed by a hash of the id only, so sessions
//! survive restarts and can be revoked like any other record. Every request
//! on a session then runs phases 4–5 exactly like a bearer request: this
//! room only turns a cookie into a principal, never decides access.
//!
//! This room must never log a session id, a code, a token or a secret.

pub mod cookie;
pub mod dbsc;
pub mod oidc;
/// Session records live with the other records of the apply path.
pub use crate::posture::session as record;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, Method, Request, StatusCode, header};
use moka::sync::Cache;

use crate::authn::{AuthError, Authenticated, Authenticator, Claims, OidcToken, VerifiedToken};
use crate::config::BrowserConfig;
use crate::posture::Posture;
use crate::posture::event::{Change, Feed, PostureEvent};
pub use cookie::CookieError;

/// The proxy's own cookies; stripped from every request before it goes upstream.
pub const OWN_COOKIES: &[&str] = &[
    cookie::SESSION_COOKIE,
    cookie::LOGIN_COOKIE,
    dbsc::BOUND_COOKIE,
];
pub use oidc::{OidcError, RelyingParty};
pub use record::{SessionBinding, SessionRecord};

/// Paths the proxy answers itself on hosts with browser routes.
pub mod paths {
    /// Prefix of every proxy-owned path.
    pub const PREFIX: &str = "/.portcullis/";
    /// The OIDC redirect URI.
    pub const CALLBACK: &str = "/.portcullis/callback";
    /// RP-initiated logout (POST; GET shows a button).
    pub const LOGOUT: &str = "/.portcullis/logout";
    /// OIDC Back-Channel Logout 1.0 receiver.
    pub const BACKCHANNEL_LOGOUT: &str = "/.portcullis/backchannel-logout";
    /// DBSC registration and refresh (owned by `session::dbsc`).
    pub const DBSC_PREFIX: &str = "/.portcullis/dbsc/";
}

/// The `events` member a logout token must carry.
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// Largest back-channel logout body read.
pub const MAX_LOGOUT_BODY: usize = 64 * 1024;
/// Logout-token `jti`s remembered against replay.
const LOGOUT_JTI_CAPACITY: u64 = 100_000;
/// Logout tokens older than this are refused (seconds).
const LOGOUT_TOKEN_MAX_AGE_S: u64 = 600;

/// Why a login callback, logout or back-channel logout was refused. Messages
/// are safe to show: no codes, tokens or cookie values.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoginError {
    /// The callback lacks `code` or `state`.
    #[error("the login callback is missing `{0}`")]
    Missing(&'static str),
    /// The pre-login cookie is missing, forged or expired.
    #[error("{0}")]
    Cookie(CookieError),
    /// `state` does not match the pre-login cookie.
    #[error("the login `state` does not match this browser's login")]
    StateMismatch,
    /// The same `state` came back twice.
    #[error("this login was already completed")]
    StateReplayed,
    /// The callback came back on another host than the login started on.
    #[error("the login came back on another host")]
    WrongHost,
    /// The IdP answered the authorization request with an error.
    #[error("the identity provider refused the login (`{0}`)")]
    Provider(String),
    /// `iss` in the authorization response (RFC 9207) is not our IdP.
    #[error("the authorization response comes from another issuer")]
    WrongIssuer,
    /// Talking to the IdP failed, or it refused the code.
    #[error("{0}")]
    Oidc(OidcError),
    /// The ID token failed verification.
    #[error("the ID token is not valid: {0}")]
    IdToken(AuthError),
    /// The ID token's `nonce` is not this login's.
    #[error("the ID token `nonce` does not match this login")]
    NonceMismatch,
    /// Step-up: the IdP did not authenticate as strongly or recently as asked.
    #[error("the identity provider did not meet the authentication requirement")]
    StepUpNotMet,
    /// Logout without a same-origin proof (CSRF).
    #[error("logout must come from this site")]
    CrossSite,
    /// A logout token failed a check.
    #[error("the logout token is not valid: {0}")]
    LogoutToken(String),
    /// The session store did not take the change.
    #[error("the session could not be stored")]
    Store,
}

impl LoginError {
    /// Stable code for bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::CrossSite => "cross_site_logout",
            Self::LogoutToken(_) => "invalid_logout_token",
            Self::Store => "session_store_unavailable",
            Self::Oidc(OidcError::Provider(_) | OidcError::Client(_)) => "identity_provider_error",
            Self::StepUpNotMet => "step_up_not_met",
            _ => "login_failed",
        }
    }

    /// Status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::CrossSite | Self::StepUpNotMet => StatusCode::FORBIDDEN,
            Self::Store => StatusCode::SERVICE_UNAVAILABLE,
            Self::Oidc(OidcError::Provider(_) | OidcError::Client(_)) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A redirect the proxy answers with (to the IdP, or back to the app),
/// with the cookies it sets.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Status (302 or 303).
    pub status: StatusCode,
    /// `Location`.
    pub location: String,
    /// `Set-Cookie` values.
    pub cookies: Vec<String>,
    /// A `Secure-Session-Registration` offer (after a completed login).
    pub dbsc_offer: Option<String>,
}

/// A live session: the durable record, the principal built from it once,
/// and the last-seen time kept in memory only.
#[derive(Debug)]
pub struct LiveSession {
    /// The record as the snapshot holds it.
    pub record: Arc<SessionRecord>,
    /// The session's principal, in the shape phases 4–5 read.
    pub token: Arc<VerifiedToken>,
    /// Last request, s since epoch (in memory; not written on each request).
    pub last_seen: AtomicU64,
    /// The registered DBSC key, parsed once from the record (`None` when
    /// none is registered, or the stored one is unreadable: then every
    /// refresh fails and the session cannot be used, fail closed).
    pub dbsc: Option<dbsc::DbscBinding>,
    /// Last verified DBSC proof, s since epoch (in memory).
    pub last_proof: AtomicU64,
}

impl LiveSession {
    /// `context.session.dbsc_state`: `none` (no key registered) or `bound`.
    pub fn dbsc_state(&self) -> &'static str {
        if self.record.dbsc.is_some() {
            "bound"
        } else {
            "none"
        }
    }
}

/// What a DBSC registration or refresh comes to (the proxy writes the
/// response; the statuses follow the draft, shared reference §1.6–1.8).
#[derive(Debug)]
pub enum DbscOutcome {
    /// 200: the session instructions JSON and the first bound cookie.
    Registered {
        /// Session instructions.
        instructions: serde_json::Value,
        /// `Set-Cookie` of the bound cookie.
        set_cookie: String,
    },
    /// 403 + `Secure-Session-Challenge`: sign this challenge and retry.
    Challenge(String),
    /// 200: a rotated bound cookie and the challenge for the next refresh.
    Refreshed {
        /// `Set-Cookie` of the bound cookie.
        set_cookie: String,
        /// `Secure-Session-Challenge` for the next refresh.
        challenge: String,
    },
    /// 200 `{"continue": false}`: the browser's DBSC session ends (the
    /// proxy session ended, or the browser names a DBSC session it has not).
    Terminate,
}

/// Why a DBSC registration or refresh was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbscFailure {
    /// No usable session cookie (registration needs a logged-in session).
    #[error("no browser session")]
    NoSession,
    /// The proof or the request failed a check.
    #[error("{0}")]
    Proof(dbsc::DbscError),
    /// The store did not take the registration.
    #[error("the session could not be stored")]
    Store,
}

/// Browser login state shared by every browser route of one runtime.
pub struct Browser {
    /// `[browser]` as configured.
    pub cfg: BrowserConfig,
    /// The OIDC client.
    pub rp: RelyingParty,
    signer: Arc<cookie::LoginSigner>,
    used_states: Cache<String, ()>,
    used_logout_jtis: Cache<String, ()>,
    live: papaya::HashMap<String, Arc<LiveSession>, foldhash::fast::RandomState>,
    /// DBSC: challenges, proofs and bound cookies (always present, so
    /// sessions bound earlier keep working when the offer is turned off).
    pub dbsc: Arc<dbsc::Dbsc>,
    device_claim: String,
    started_s: u64,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

/// True for requests that are clearly API calls: they get 401, never a
/// redirect to a login page.
pub fn is_api_request<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    if h.contains_key(header::AUTHORIZATION) {
        return true;
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return true;
    }
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            let a = a.to_ascii_lowercase();
            a.contains("application/json") && !a.contains("text/html")
        })
}

/// The `Host` (or `:authority`) as received, for redirect URIs.
fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

fn query_pairs<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn one<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut it = pairs.iter().filter(|(k, _)| k == name);
    match (it.next(), it.next()) {
        (Some((_, v)), None) => Some(v.as_str()),
        _ => None,
    }
}

/// Constant-time string equality (for `state` and `nonce`).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Browser {
    /// Builds browser login from config; `previous` hands over the pre-login
    /// cookie key so logins in flight survive a reload.
    pub fn new(
        cfg: &crate::config::Config,
        previous: Option<&Browser>,
    ) -> Result<Option<Self>, OidcError> {
        let Some(b) = &cfg.browser else {
            return Ok(None);
        };
        let issuer = cfg
            .issuers
            .iter()
            .find(|i| i.name == b.issuer)
            .ok_or_else(|| OidcError::Client(format!("no issuer named `{}`", b.issuer)))?;
        let signer = match (&b.cookie_key_file, previous) {
            (Some(p), _) => {
                let k = std::fs::read(p)
                    .map_err(|e| OidcError::Client(format!("{}: {e}", p.display())))?;
                if k.len() < 32 {
                    return Err(OidcError::Client(format!(
                        "{}: the cookie key needs at least 32 bytes",
                        p.display()
                    )));
                }
                Arc::new(cookie::LoginSigner::new(&k))
            }
            (None, Some(prev)) => prev.signer.clone(),
            (None, None) => Arc::new(
                cookie::LoginSigner::random()
                    .map_err(|_| OidcError::Client("no randomness for the cookie key".into()))?,
            ),
        };
        let dbsc = match previous {
            Some(p)
                if Arc::ptr_eq(&p.signer, &signer)
                    && p.dbsc.cookie_ttl_s() == b.dbsc_cookie_ttl_s
                    && p.dbsc.challenge_ttl_s() == b.dbsc_challenge_ttl_s =>
            {
                // Same key and lifetimes: keep the replay cache too.
                p.dbsc.clone()
            }
            _ => Arc::new(dbsc::Dbsc::new(
                &signer.derive("dbsc"),
                b.dbsc_cookie_ttl_s,
                b.dbsc_challenge_ttl_s,
            )),
        };
        Ok(Some(Self {
            dbsc,
            rp: RelyingParty::new(b, issuer)?,
            device_claim: b
                .device_claim
                .clone()
                .unwrap_or_else(|| issuer.device_claim.clone()),
            cfg: b.clone(),
            signer,
            used_states: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(std::time::Duration::from_secs(b.login_timeout_s))
                .build(),
            used_logout_jtis: Cache::builder()
                .max_capacity(LOGOUT_JTI_CAPACITY)
                .time_to_live(std::time::Duration::from_secs(2 * LOGOUT_TOKEN_MAX_AGE_S))
                .build(),
            live: papaya::HashMap::default(),
            started_s: crate::util::now_unix(),
        }))
    }

    /// The redirect URI on the host the request came to.
    fn redirect_uri(host: &str) -> String {
        format!("https://{host}{}", paths::CALLBACK)
    }

    /// Phase 2 for browsers: the session cookie → the session's principal.
    /// `Ok(None)` means "no usable session": the caller starts a login.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        auth: &Authenticator,
        snapshot: &crate::posture::snapshot::Snapshot,
        now: u64,
    ) -> Result<Option<Arc<LiveSession>>, CookieError> {
        let Some(id) = cookie::session_id(headers)? else {
            return Ok(None);
        };
        let hash = cookie::id_hash(id);
        let Some(record) = snapshot.session(&hash) else {
            self.live.pin().remove(&hash);
            return Ok(None);
        };
        let live = self.live.pin();
        let session = match live.get(&hash) {
            Some(s) if Arc::ptr_eq(&s.record, &record) => s.clone(),
            previous => {
                let Some(token) = principal(&record, auth) else {
                    return Ok(None);
                };
                // A replaced record (step-up, cap) keeps the live idle clock.
                let seen = previous.map_or(0, |p| p.last_seen.load(Ordering::Relaxed));
                let dbsc = record
                    .dbsc
                    .as_ref()
                    .and_then(|v| serde_json::from_value(v.clone()).ok());
                let proof = previous.map_or(0, |p| p.last_proof.load(Ordering::Relaxed));
                let s = Arc::new(LiveSession {
                    last_seen: AtomicU64::new(record.last_seen_s.max(self.started_s).max(seen)),
                    last_proof: AtomicU64::new(proof),
                    dbsc,
                    record,
                    token,
                });
                live.insert(hash, s.clone());
                s
            }
        };
        if !session
            .record
            .live_at(now, session.last_seen.load(Ordering::Relaxed))
        {
            return Ok(None);
        }
        session.last_seen.fetch_max(now, Ordering::Relaxed);
        Ok(Some(session))
    }

    /// Starts a login: the redirect to the IdP with a fresh pre-login
    /// cookie. `step_up` carries `acr_values` / `max_age` for a step-up.
    pub async fn start_login<B>(
        &self,
        req: &Request<B>,
        step_up: Option<(Option<String>, Option<u64>)>,
        now: u64,
    ) -> Result<Redirect, OidcError> {
        let host = authority(req).unwrap_or("").to_owned();
        let return_to = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .and_then(cookie::safe_return_path)
            .unwrap_or("/")
            .to_owned();
        let rnd =
            || cookie::random_token(16).map_err(|_| OidcError::Client("no randomness".into()));
        let (acr_values, max_age) = step_up.unwrap_or((None, None));
        let st = cookie::LoginState {
            state: rnd()?,
            nonce: rnd()?,
            return_to,
            host: host.clone(),
            exp: now + self.cfg.login_timeout_s,
            acr_values,
            max_age,
        };
        let verifier = self.signer.pkce_verifier(&st.state);
        let location = self
            .rp
            .authorize_url(
                &Self::redirect_uri(&host),
                &st.state,
                &st.nonce,
                &cookie::LoginSigner::pkce_challenge(&verifier),
                st.acr_values.as_deref(),
                st.max_age,
            )
            .await?;
        let sealed = self
            .signer
            .seal(&st)
            .map_err(|e| OidcError::Client(e.to_string()))?;
        Ok(Redirect {
            status: StatusCode::FOUND,
            location,
            cookies: vec![cookie::set_login(&sealed, self.cfg.login_timeout_s)],
            dbsc_offer: None,
        })
    }

    /// The callback: checks the pre-login cookie and `state`, exchanges the
    /// code, verifies the ID token and its `nonce`, creates the session
    /// (replacing the browser's previous one), and sends the browser back.
    pub async fn callback<B>(
        &self,
        req: &Request<B>,
        peer: Option<(&crate::tls::PeerCertificate, Option<String>)>,
        auth: &Authenticator,
        posture: &Posture,
    ) -> Result<Redirect, LoginError> {
        let now = crate::util::now_unix();
        let q = query_pairs(req);
        let sealed = cookie::cookie_values(req.headers(), cookie::LOGIN_COOKIE);
        let [sealed] = sealed.as_slice() else {
            return Err(LoginError::Cookie(CookieError::NoLogin));
        };
        let st = self.signer.open(sealed, now).map_err(LoginError::Cookie)?;
        let state = one(&q, "state").ok_or(LoginError::Missing("state"))?;
        if !same(state, &st.state) {
            return Err(LoginError::StateMismatch);
        }
        if authority(req) != Some(st.host.as_str()) {
            return Err(LoginError::WrongHost);
        }
        // One use per state, whatever the outcome.
        if self.used_states.contains_key(&st.state) {
            return Err(LoginError::StateReplayed);
        }
        self.used_states.insert(st.state.clone(), ());
        if let Some(e) = one(&q, "error") {
            return Err(LoginError::Provider(
                e.chars().filter(char::is_ascii_graphic).take(64).collect(),
            ));
        }
        let meta = self.rp.metadata().await.map_err(LoginError::Oidc)?;
        if let Some(iss) = one(&q, "iss")
            && iss != meta.issuer
        {
            return Err(LoginError::WrongIssuer);
        }
        let code = one(&q, "code").ok_or(LoginError::Missing("code"))?;
        let verifier = self.signer.pkce_verifier(&st.state);
        let id_token = self
            .rp
            .exchange(code, &Self::redirect_uri(&st.host), &verifier)
            .await
            .map_err(LoginError::Oidc)?;
        let (claims, raw) = auth
            .verify_oidc(
                &id_token,
                &self.cfg.issuer,
                &self.cfg.client_id,
                OidcToken::Id,
                now,
            )
            .await
            .map_err(LoginError::IdToken)?;
        let nonce = raw.get("nonce").and_then(|v| v.as_str()).unwrap_or("");
        if !same(nonce, &st.nonce) {
            return Err(LoginError::NonceMismatch);
        }
        if claims.sub.is_empty() {
            return Err(LoginError::IdToken(AuthError::BadClaim("sub".into())));
        }
        if let Some(want) = &st.acr_values
            && !want.split(' ').any(|a| claims.acr.as_deref() == Some(a))
        {
            return Err(LoginError::StepUpNotMet);
        }
        if let Some(max_age) = st.max_age {
            let leeway = 60;
            if claims
                .auth_time
                .is_none_or(|t| t.saturating_add(max_age + leeway) < now)
            {
                return Err(LoginError::StepUpNotMet);
            }
        }
        // Which device is this browser? A client certificate proves one;
        // else the ID token may name one (unverified); else unmanaged.
        let (device, device_verified, binding, thumb) = match peer {
            Some((p, dev)) => (dev, true, SessionBinding::Mtls, Some(hex::encode(p.sha256))),
            None => (
                raw.get(&self.device_claim)
                    .and_then(|v| v.as_str())
                    .filter(|s| !s.is_empty() && s.len() <= 256)
                    .map(str::to_owned),
                false,
                SessionBinding::None,
                None,
            ),
        };
        let id = cookie::new_session_id().map_err(|_| LoginError::Store)?;
        let hash = cookie::id_hash(&id);
        let record = SessionRecord {
            id_hash: hash.clone(),
            subject: claims.sub.clone(),
            issuer: self.cfg.issuer.clone(),
            device,
            device_verified,
            binding,
            cert_thumbprint: thumb,
            acr: claims.acr.clone(),
            amr: claims.amr.clone().unwrap_or_default(),
            auth_time: claims.auth_time,
            idp_sid: claims.sid.clone(),
            created_s: now,
            last_seen_s: now,
            idle_timeout_s: self.cfg.session_idle_s,
            expires_s: now + self.cfg.session_max_s,
            dbsc: None,
        };
        let mut changes = vec![Change::Session {
            id_hash: hash.clone(),
            record: Some(Box::new(record)),
        }];
        // A login replaces the browser's previous session (no fixation, and
        // a step-up leaves no weaker session behind).
        if let Ok(Some(old)) = cookie::session_id(req.headers()) {
            let old = cookie::id_hash(old);
            if posture.snapshot().session(&old).is_some() {
                changes.push(Change::Session {
                    id_hash: old,
                    record: None,
                });
            }
        }
        session_event(posture, "session.create", &hash, changes)
            .await
            .map_err(|_| LoginError::Store)?;
        tracing::info!(
            subject = %claims.sub,
            session = %&hash[..16],
            binding = binding.as_str(),
            "browser session created"
        );
        // DBSC is offered where nothing stronger binds the session (a
        // client certificate does); browsers without DBSC ignore the header.
        let dbsc_offer = (self.cfg.dbsc && binding == SessionBinding::None)
            .then(|| self.dbsc.registration_header(&hash, now));
        Ok(Redirect {
            status: StatusCode::SEE_OTHER,
            location: st.return_to,
            cookies: vec![
                cookie::set_session(&id),
                cookie::clear(cookie::LOGIN_COOKIE),
                // A bound cookie of a previous session is of no use now.
                dbsc::Dbsc::expire_bound_cookie(),
            ],
            dbsc_offer,
        })
    }

    /// Ends sessions (by id hash) through the store; the live copies go too.
    pub async fn end_sessions(
        &self,
        posture: &Posture,
        hashes: &[String],
        why: &str,
    ) -> Result<(), LoginError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let changes = hashes
            .iter()
            .map(|h| Change::Session {
                id_hash: h.clone(),
                record: None,
            })
            .collect();
        session_event(posture, why, &hashes[0], changes)
            .await
            .map_err(|_| LoginError::Store)?;
        let live = self.live.pin();
        for h in hashes {
            live.remove(h);
        }
        Ok(())
    }

    /// Lowers a session's absolute expiry to `created + ttl_s` (a `shorten`
    /// decision); a no-op when it is already that short.
    pub async fn cap_expiry(
        &self,
        posture: &Posture,
        record: &SessionRecord,
        ttl_s: u64,
    ) -> Result<(), LoginError> {
        let cap = record.created_s.saturating_add(ttl_s);
        if record.expires_s <= cap {
            return Ok(());
        }
        let mut r = record.clone();
        r.expires_s = cap;
        self.update_session(posture, r, "session.shorten").await
    }

    /// Replaces a session record through the store (for DBSC state and
    /// caps); the live copy is rebuilt from it on the next request.
    pub async fn update_session(
        &self,
        posture: &Posture,
        record: SessionRecord,
        kind: &str,
    ) -> Result<(), LoginError> {
        let hash = record.id_hash.clone();
        session_event(
            posture,
            kind,
            &hash,
            vec![Change::Session {
                id_hash: hash.clone(),
                record: Some(Box::new(record)),
            }],
        )
        .await
        .map_err(|_| LoginError::Store)
    }

    /// The live session for an id hash, if a request used it since start.
    pub fn live(&self, id_hash: &str) -> Option<Arc<LiveSession>> {
        self.live.pin().get(id_hash).cloned()
    }

    /// The origin (`scheme://host[:port]`) of the IdP's `end_session_endpoint`,
    /// for the sign-out page's `form-action`: browsers apply it to the redirect
    /// that follows the form's POST, so `'self'` alone blocks the IdP's sign-out.
    pub async fn end_session_origin(&self) -> Option<String> {
        let m = self.rp.metadata().await.ok()?;
        let uri: http::Uri = m.end_session_endpoint.as_deref()?.parse().ok()?;
        let scheme = uri.scheme_str()?;
        let authority = uri.authority()?.as_str();
        // Only a plain origin goes into a CSP header: no userinfo, nothing a
        // header value or a CSP source list would read as a separator.
        let clean = |x: &str| {
            !x.is_empty()
                && x.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        };
        (matches!(scheme, "https" | "http") && clean(authority))
            .then(|| format!("{scheme}://{authority}"))
    }

    /// RP-initiated logout: a same-origin POST deletes the session, clears
    /// the cookie and goes on to the IdP's `end_session_endpoint`.
    pub async fn logout<B>(
        &self,
        req: &Request<B>,
        posture: &Posture,
    ) -> Result<Redirect, LoginError> {
        let host = authority(req).unwrap_or("");
        let h = req.headers();
        let origin_ok = h
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| o == format!("https://{host}"));
        let fetch_ok = h
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|s| s == "same-origin");
        let cross = h
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|s| s != "same-origin");
        if !(origin_ok || fetch_ok) || cross {
            return Err(LoginError::CrossSite);
        }
        if let Ok(Some(id)) = cookie::session_id(h) {
            let hash = cookie::id_hash(id);
            if posture.snapshot().session(&hash).is_some() {
                self.end_sessions(posture, &[hash], "session.logout")
                    .await?;
            }
        }
        let location = match self.rp.metadata().await {
            Ok(m) => match &m.end_session_endpoint {
                Some(e) => oidc::with_query(e, &[("client_id", self.cfg.client_id.as_str())]),
                None => "/".to_owned(),
            },
            Err(_) => "/".to_owned(),
        };
        Ok(Redirect {
            status: StatusCode::SEE_OTHER,
            location,
            cookies: vec![
                cookie::clear(cookie::SESSION_COOKIE),
                dbsc::Dbsc::expire_bound_cookie(),
            ],
            dbsc_offer: None,
        })
    }

    /// OIDC Back-Channel Logout 1.0: verifies the `logout_token` and ends
    /// the sessions of its `sid` (or, without one, of its `sub`). Returns how
    /// many sessions ended.
    pub async fn backchannel_logout(
        &self,
        body: &[u8],
        auth: &Authenticator,
        posture: &Posture,
    ) -> Result<usize, LoginError> {
        let bad = |m: &str| LoginError::LogoutToken(m.to_owned());
        let mut tokens = form_urlencoded::parse(body)
            .filter(|(k, _)| k == "logout_token")
            .map(|(_, v)| v.into_owned());
        let (Some(token), None) = (tokens.next(), tokens.next()) else {
            return Err(bad("exactly one `logout_token` is required"));
        };
        let now = crate::util::now_unix();
        let (claims, raw) = auth
            .verify_oidc(
                &token,
                &self.cfg.issuer,
                &self.cfg.client_id,
                OidcToken::Logout,
                now,
            )
            .await
            .map_err(|e| LoginError::LogoutToken(e.to_string()))?;
        if raw.contains_key("nonce") {
            return Err(bad("a logout token must not carry `nonce`"));
        }
        let event_ok = raw
            .get("events")
            .and_then(|e| e.as_object())
            .and_then(|e| e.get(BACKCHANNEL_EVENT))
            .is_some_and(|v| v.is_object());
        if !event_ok {
            return Err(bad("`events` lacks the back-channel logout event"));
        }
        if claims
            .iat
            .is_none_or(|iat| iat + LOGOUT_TOKEN_MAX_AGE_S < now)
        {
            return Err(bad("the logout token is too old"));
        }
        let jti = claims
            .jti
            .clone()
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| bad("`jti` is required"))?;
        let sid = claims.sid.clone().filter(|s| !s.is_empty());
        let sub = Some(claims.sub.clone()).filter(|s| !s.is_empty());
        if sid.is_none() && sub.is_none() {
            return Err(bad("`sub` or `sid` is required"));
        }
        if self.used_logout_jtis.contains_key(&jti) {
            return Err(bad("the logout token was already used"));
        }
        self.used_logout_jtis.insert(jti, ());
        let issuer = self.cfg.issuer.as_str();
        let ended: Vec<String> = posture
            .snapshot()
            .sessions_where(|s| {
                s.issuer == issuer
                    && match (&sid, &sub) {
                        (Some(sid), sub) => {
                            s.idp_sid.as_deref() == Some(sid.as_str())
                                && sub.as_ref().is_none_or(|u| *u == s.subject)
                        }
                        (None, Some(sub)) => s.subject == *sub,
                        (None, None) => false,
                    }
            })
            .into_iter()
            .map(|s| s.id_hash.clone())
            .collect();
        self.end_sessions(posture, &ended, "session.backchannel-logout")
            .await?;
        tracing::info!(sessions = ended.len(), "back-channel logout");
        Ok(ended.len())
    }
}

impl Browser {
    /// The live session of a DBSC request (the main session cookie rides
    /// along on registration and refresh: both are same-origin POSTs).
    fn dbsc_session(
        &self,
        headers: &HeaderMap,
        auth: &Authenticator,
        posture: &Posture,
        now: u64,
    ) -> Option<Arc<LiveSession>> {
        self.authenticate(headers, auth, posture.snapshot(), now)
            .ok()
            .flatten()
    }

    /// DBSC registration (`POST /.portcullis/dbsc/register`): the proof must
    /// answer a registration challenge this proxy offered to this session at
    /// login, signed by the key in its `jwk` header (ES256 or RS256). The key
    /// is stored in the session record through the store (its own change,
    /// so no concurrent rewrite of the session loses it); the answer is the
    /// session instructions and the first bound cookie.
    pub async fn dbsc_register(
        &self,
        headers: &HeaderMap,
        auth: &Authenticator,
        posture: &Posture,
    ) -> Result<DbscOutcome, DbscFailure> {
        let now_ms = crate::util::now_unix_ms();
        let now = now_ms / 1000;
        let live = self
            .dbsc_session(headers, auth, posture, now)
            .ok_or(DbscFailure::NoSession)?;
        let r = &live.record;
        if r.dbsc.is_some() || r.binding != SessionBinding::None {
            return Err(DbscFailure::Proof(dbsc::DbscError::AlreadyBound));
        }
        let proof = proof_header(headers)?;
        let binding = self
            .dbsc
            .verify_registration(&proof, &r.id_hash, now)
            .map_err(DbscFailure::Proof)?;
        let value = serde_json::to_value(&binding).map_err(|_| DbscFailure::Store)?;
        session_event(
            posture,
            "session.dbsc-register",
            &r.id_hash,
            vec![Change::SessionDbsc {
                id_hash: r.id_hash.clone(),
                dbsc: Box::new(value),
            }],
        )
        .await
        .map_err(|_| DbscFailure::Store)?;
        // The session may have ended meanwhile; then nothing was bound.
        let stored = posture.snapshot().session(&r.id_hash);
        if stored.as_ref().and_then(|s| s.dbsc.as_ref()).is_none() {
            return Err(DbscFailure::NoSession);
        }
        tracing::info!(
            session = %&r.id_hash[..16],
            alg = %binding.alg,
            "dbsc key registered"
        );
        Ok(DbscOutcome::Registered {
            instructions: dbsc::session_instructions(&binding.session_identifier),
            set_cookie: self.dbsc.set_bound_cookie(&r.id_hash, now_ms),
        })
    }

    /// DBSC refresh (`POST /.portcullis/dbsc/refresh`): without a proof, or
    /// with one over a stale, unknown or used challenge, a fresh challenge
    /// (403); with a proof by the registered key over a fresh challenge of
    /// this session, a rotated bound cookie and the next challenge. A
    /// session that ended answers `{"continue": false}`. Nothing is written
    /// to the store: the key does not change, the proof time is kept in memory.
    pub fn dbsc_refresh(
        &self,
        headers: &HeaderMap,
        auth: &Authenticator,
        posture: &Posture,
    ) -> Result<DbscOutcome, DbscFailure> {
        let now_ms = crate::util::now_unix_ms();
        let now = now_ms / 1000;
        let id = headers
            .get(dbsc::SESSION_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(dbsc::parse_sf_string)
            .ok_or(DbscFailure::Proof(dbsc::DbscError::UnknownSession))?;
        let Some(live) = self.dbsc_session(headers, auth, posture, now) else {
            return Ok(DbscOutcome::Terminate);
        };
        let Some(binding) = live.dbsc.as_ref().filter(|b| b.session_identifier == id) else {
            return Ok(DbscOutcome::Terminate);
        };
        let hash = &live.record.id_hash;
        let challenge = || self.dbsc.challenge_header(&id, hash, now);
        let proof = match proof_header(headers) {
            Ok(p) => p,
            Err(DbscFailure::Proof(e)) if e.wants_challenge() => {
                return Ok(DbscOutcome::Challenge(challenge()));
            }
            Err(e) => return Err(e),
        };
        match self.dbsc.verify_refresh(&proof, binding, hash, now) {
            Ok(()) => {
                live.last_proof.fetch_max(now, Ordering::Relaxed);
                Ok(DbscOutcome::Refreshed {
                    set_cookie: self.dbsc.set_bound_cookie(hash, now_ms),
                    challenge: challenge(),
                })
            }
            Err(e) if e.wants_challenge() => {
                tracing::info!(session = %&hash[..16], error = %e, "dbsc refresh: new challenge");
                Ok(DbscOutcome::Challenge(challenge()))
            }
            Err(e) => {
                tracing::warn!(session = %&hash[..16], error = %e, "dbsc refresh refused");
                Err(DbscFailure::Proof(e))
            }
        }
    }

    /// Phase 3 for a DBSC-bound session: its bound cookie must be one this
    /// proxy minted for this session after a proof, unexpired, and newer
    /// than the last change of the session's subject or device
    /// (`not_before_ms`, so a posture change demands a fresh proof at once).
    /// Sessions without a registered key pass.
    pub fn check_bound(
        &self,
        live: &LiveSession,
        headers: &HeaderMap,
        not_before_ms: u64,
        now_ms: u64,
    ) -> Result<(), dbsc::DbscError> {
        if live.record.dbsc.is_none() {
            return Ok(());
        }
        let values = cookie::cookie_values(headers, dbsc::BOUND_COOKIE);
        let value = match values.as_slice() {
            [] => None,
            [v] => Some(*v),
            _ => return Err(dbsc::DbscError::BadCookie),
        };
        self.dbsc
            .check_bound_cookie(value, &live.record.id_hash, not_before_ms, now_ms)
    }
}

/// The `Secure-Session-Response` proof, unquoted.
fn proof_header(headers: &HeaderMap) -> Result<String, DbscFailure> {
    let mut all = headers.get_all(dbsc::RESPONSE_HEADER).iter();
    let (v, None) = (all.next(), all.next()) else {
        return Err(DbscFailure::Proof(dbsc::DbscError::Malformed));
    };
    let Some(v) = v else {
        return Err(DbscFailure::Proof(dbsc::DbscError::MissingProof));
    };
    if v.len() > dbsc::MAX_PROOF_BYTES + 2 {
        return Err(DbscFailure::Proof(dbsc::DbscError::Malformed));
    }
    v.to_str()
        .ok()
        .and_then(dbsc::parse_sf_string)
        .ok_or(DbscFailure::Proof(dbsc::DbscError::Malformed))
}

/// Writes one session event through the apply path.
async fn session_event(
    posture: &Posture,
    kind: &str,
    hash: &str,
    changes: Vec<Change>,
) -> Result<(), crate::posture::IngestError> {
    let nonce = cookie::random_token(8).unwrap_or_default();
    posture
        .ingest(vec![PostureEvent {
            id: format!("session:{kind}:{}:{nonce}", &hash[..hash.len().min(16)]),
            feed: Feed::Session,
            kind: kind.to_owned(),
            origin_ms: crate::util::now_unix_ms(),
            changes,
        }])
        .await
        .map(|_| ())
}

/// The session's principal in the shape phases 4–5 read: `iat` is the
/// session's creation (so a subject or device revoked after login ends it),
/// `exp` its absolute expiry, `jti` a public handle of the session, `sid`
/// the IdP's session (so a CAEP `session-revoked` for it ends this one).
pub fn principal(r: &SessionRecord, auth: &Authenticator) -> Option<Arc<VerifiedToken>> {
    let issuer = auth.issuers().find(|i| i.cfg.name == r.issuer)?.clone();
    let claims = Claims {
        sub: r.subject.clone(),
        iss: issuer.cfg.issuer.clone(),
        exp: r.expires_s,
        nbf: None,
        iat: Some(r.created_s),
        jti: Some(record::principal_jti(&r.id_hash)),
        sid: r.idp_sid.clone(),
        acr: r.acr.clone(),
        amr: Some(r.amr.clone()).filter(|a| !a.is_empty()),
        auth_time: r.auth_time,
        client_id: None,
        cnf: None,
        fingerprint: Default::default(),
    };
    let headers = crate::authn::TokenHeaders::of(&claims, &issuer.cfg.name, r.device.as_deref());
    Some(Arc::new(VerifiedToken {
        key: crate::authn::jwks::VerifyKey::session_marker(),
        claims,
        device: r.device.clone().map(crate::posture::DeviceClaim::new),
        hash: None,
        headers,
        issuer,
        raw: None,
        decision_memo: arc_swap::ArcSwapOption::empty(),
        access: crate::access::Memo::default(),
    }))
}

/// The principal of a live session as phase 2's output.
pub fn authenticated(s: &LiveSession) -> Authenticated {
    Authenticated {
        token: s.token.clone(),
        cache_hit: true,
        now_s: crate::util::now_unix(),
    }
}
