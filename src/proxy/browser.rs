//! Phases 2–5 for `auth = "browser"` routes, and the proxy-owned paths
//! under `/.portcullis/`: the glue between the pipeline and `session/`.
//! A session becomes the same principal a bearer token would, so phases 4
//! and 5 are the very functions the bearer path runs.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::rescue::Audience;
use super::{ConnInfo, Denial, Proxy, ProxyBody, RequestCtx, Runtime, fresh_peer};
use crate::binding::{Binding, BindingKind};
use crate::policy::PolicyRefusal;
use crate::route::Route;
use crate::session::dbsc::{self, DbscError};
use crate::session::{self, Browser, DbscFailure, DbscOutcome, LiveSession, LoginError};
use crate::session::{SessionBinding, paths};

impl Proxy {
    /// Phases 2–5 on a session: cookie → session → principal; the session's
    /// certificate binding; resolve and decide as for a bearer token. A
    /// browser without a session is sent to log in (API clients get 401); a
    /// step-up goes back to the IdP; a subject or device that must not go on
    /// ends the session.
    pub(super) async fn browser_phases(
        &self,
        rt: &Runtime,
        ctx: &mut RequestCtx,
        route: &Route,
        req: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(), Denial> {
        let b = rt.browser.as_deref().ok_or(Denial::Internal)?;
        let api = session::is_api_request(req);
        if !api {
            ctx.audience = Audience::Browser {
                clear_session: false,
            };
        }
        let now = crate::util::now_unix();
        // 2. authenticate: the session cookie
        let live = b
            .authenticate(req.headers(), &rt.auth, self.posture.snapshot(), now)
            .map_err(Denial::SessionCookie)?;
        let Some(live) = live else {
            return Err(login_or_401(b, req, None, api, now).await);
        };
        ctx.auth = Some(session::authenticated(&live));
        ctx.session = Some(live.clone());
        // 3. bind: a certificate-bound session only on its certificate; a
        // DBSC-bound one only with its bound cookie (checked below, once
        // phase 4 has the subject's and device's records: a change of
        // either demands a fresh proof).
        let binding = session_binding(&live, conn, now)?;
        // 4. resolve, with the lifecycle baseline always on for sessions: a
        // leaver or a lost device ends the session, whatever policies say.
        let engine = self.policy.load();
        let resolved = match &ctx.auth {
            Some(a) => self.phase_resolve(a, binding.device.as_deref(), engine.is_none()),
            None => Err(Denial::Internal),
        }
        .and_then(|r| {
            crate::posture::Posture::lifecycle(&r)
                .map(|()| r)
                .map_err(Denial::Posture)
        });
        ctx.binding = Some(binding);
        let resolved = match resolved {
            Ok(r) => r,
            Err(d) => return Err(self.end_session(b, ctx, &live, d).await),
        };
        // 3 (DBSC). The bound cookie must postdate the last change of the
        // session's subject and device.
        let not_before_ms = resolved
            .identity
            .as_ref()
            .map_or(0, |i| i.updated_ms)
            .max(resolved.device.as_ref().map_or(0, |d| d.updated_ms));
        let now_ms = crate::util::now_unix_ms();
        if let Err(e) = b.check_bound(&live, req.headers(), not_before_ms, now_ms) {
            return Err(bound_cookie_refusal(req, e, api, &ctx.id));
        }
        ctx.resolved = Some(resolved);
        // 5. decide
        let Some(engine) = engine else {
            return Ok(());
        };
        match self.phase_decide(&engine, ctx, route, req, conn).await {
            Ok(()) => {
                // `shorten` caps the session's absolute expiry, durably (once).
                let cap = ctx
                    .decision
                    .as_ref()
                    .filter(|d| d.action == crate::policy::Action::Shorten)
                    .and_then(|d| d.session_ttl_s);
                if let Some(ttl) = cap
                    && let Err(e) = b.cap_expiry(&self.posture, &live.record, ttl).await
                {
                    tracing::warn!(request_id = %ctx.id, error = %e, "session cap was not recorded");
                }
                Ok(())
            }
            Err(Denial::Policy(PolicyRefusal::StepUp {
                acr_values,
                max_age_s,
                ..
            })) if !api => {
                let acr = Some(acr_values.join(" ")).filter(|a| !a.is_empty());
                Err(login_or_401(b, req, Some((acr, max_age_s)), api, now).await)
            }
            Err(Denial::Policy(PolicyRefusal::SessionCapped { .. })) => {
                let _ = self.end_session(b, ctx, &live, Denial::Internal).await;
                Err(login_or_401(b, req, None, api, now).await)
            }
            Err(d @ Denial::Policy(PolicyRefusal::Revoked { .. })) => {
                Err(self.end_session(b, ctx, &live, d).await)
            }
            Err(d) => Err(d),
        }
    }

    /// Ends a session whose subject or device must not go on, then returns
    /// the refusal (the browser's cookie is cleared with it).
    async fn end_session(
        &self,
        b: &Browser,
        ctx: &mut RequestCtx,
        live: &LiveSession,
        d: Denial,
    ) -> Denial {
        let hash = live.record.id_hash.clone();
        if let Err(e) = b
            .end_sessions(&self.posture, &[hash], "session.ended")
            .await
        {
            // The refusal stands; the next request decides again.
            tracing::error!(request_id = %ctx.id, error = %e, "session end was not recorded");
        }
        if let Audience::Browser { .. } = ctx.audience {
            ctx.audience = Audience::Browser {
                clear_session: true,
            };
        }
        d
    }

    /// The proxy-owned paths under `/.portcullis/`: the login callback,
    /// logout, back-channel logout.
    pub(super) async fn browser_endpoint(
        &self,
        rt: &Runtime,
        ctx: &mut RequestCtx,
        b: &Browser,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Denial> {
        ctx.audience = Audience::Browser {
            clear_session: false,
        };
        let path = req.uri().path();
        match (req.method().clone(), path) {
            (Method::GET, paths::CALLBACK) => {
                let now = crate::util::now_unix();
                let peer = fresh_peer(conn, now)?;
                let cert = peer.map(|p| (p, rt.binder.certificate_device(Some(p)).ok().flatten()));
                let mut r = b
                    .callback(&req, cert, &rt.auth, &self.posture)
                    .await
                    .map_err(Denial::Login)?;
                // DBSC is offered over https only (a plain-HTTP listener may
                // exist; browsers refuse DBSC there anyway).
                if conn.tls.is_none() {
                    r.dbsc_offer = None;
                }
                Ok(redirect_response(&r, &ctx.id))
            }
            (Method::GET, paths::LOGOUT) => Ok(logout_page(
                &ctx.id,
                b.end_session_origin().await.as_deref(),
            )),
            (Method::POST, paths::LOGOUT) => {
                let r = b.logout(&req, &self.posture).await.map_err(Denial::Login)?;
                Ok(redirect_response(&r, &ctx.id))
            }
            (Method::POST, paths::BACKCHANNEL_LOGOUT) => {
                ctx.audience = Audience::Api;
                let body = read_body(req.into_body()).await?;
                b.backchannel_logout(&body, &rt.auth, &self.posture)
                    .await
                    .map_err(Denial::Login)?;
                let mut resp = Response::new(http_body_util::BodyExt::boxed_unsync(
                    http_body_util::BodyExt::map_err(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                        |never| match never {},
                    ),
                ));
                *resp.status_mut() = StatusCode::OK;
                resp.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                Ok(resp)
            }
            (Method::POST, dbsc::REGISTER_PATH) => {
                ctx.audience = Audience::Api;
                let out = b
                    .dbsc_register(req.headers(), &rt.auth, &self.posture)
                    .await
                    .map_err(dbsc_denial)?;
                Ok(dbsc_response(&out, &ctx.id))
            }
            (Method::POST, dbsc::REFRESH_PATH) => {
                ctx.audience = Audience::Api;
                let out = b
                    .dbsc_refresh(req.headers(), &rt.auth, &self.posture)
                    .map_err(dbsc_denial)?;
                Ok(dbsc_response(&out, &ctx.id))
            }
            _ => Err(Denial::NoRoute),
        }
    }
}

/// Where a browser without a usable session goes: to the IdP (with the
/// step-up requirement, if any); an API client gets 401 instead.
async fn login_or_401(
    b: &Browser,
    req: &Request<Incoming>,
    step_up: Option<(Option<String>, Option<u64>)>,
    api: bool,
    now: u64,
) -> Denial {
    if api {
        return Denial::SessionRequired;
    }
    match b.start_login(req, step_up, now).await {
        Ok(r) => Denial::LoginRequired(Box::new(r)),
        Err(e) => Denial::Login(LoginError::Oidc(e)),
    }
}

/// Phase 3 for sessions: a certificate-bound session is only honoured on
/// a connection presenting the same certificate.
fn session_binding(live: &Arc<LiveSession>, conn: &ConnInfo, now: u64) -> Result<Binding, Denial> {
    let r = &live.record;
    match r.binding {
        SessionBinding::Mtls => {
            let peer = fresh_peer(conn, now)?.ok_or(Denial::SessionBindingMismatch)?;
            let thumb = hex::encode(peer.sha256);
            if r.cert_thumbprint.as_deref() != Some(thumb.as_str()) {
                return Err(Denial::SessionBindingMismatch);
            }
            Ok(Binding {
                kind: BindingKind::Mtls,
                device: r.device.clone().filter(|_| r.device_verified),
                workload: None,
                dpop_replay_key: None,
            })
        }
        // The bound cookie itself is checked after phase 4 (see above).
        SessionBinding::Dbsc if r.dbsc.is_some() => Ok(Binding {
            kind: BindingKind::Dbsc,
            device: None,
            workload: None,
            dpop_replay_key: None,
        }),
        SessionBinding::None | SessionBinding::Dbsc => Ok(Binding {
            kind: BindingKind::None,
            device: None,
            workload: None,
            dpop_replay_key: None,
        }),
    }
}

/// A DBSC-bound session's request without a valid bound cookie. A browser
/// gets the draft's forced re-proof: 307 to the same URL with the bound
/// cookie expired, so a DBSC browser refreshes with a proof before it
/// follows (unless it says it skipped the refresh: then, and for API
/// clients, 401). The upstream sees nothing either way.
fn bound_cookie_refusal(
    req: &Request<Incoming>,
    error: DbscError,
    api: bool,
    request_id: &str,
) -> Denial {
    let skipped = req.headers().get(dbsc::SKIPPED_HEADER);
    tracing::info!(
        request_id,
        error = %error,
        skipped = skipped
            .and_then(|v| v.to_str().ok())
            .map(|v| v.get(..64).unwrap_or(v)),
        "dbsc bound cookie refused"
    );
    let location = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .and_then(crate::session::cookie::safe_return_path);
    let reproof = match (api, skipped, location) {
        (false, None, Some(l)) => Some(Box::new(crate::session::Redirect {
            status: StatusCode::TEMPORARY_REDIRECT,
            location: l.to_owned(),
            cookies: vec![dbsc::Dbsc::expire_bound_cookie()],
            dbsc_offer: None,
        })),
        _ => None,
    };
    Denial::BoundCookie { error, reproof }
}

/// A refused DBSC registration or refresh.
fn dbsc_denial(f: DbscFailure) -> Denial {
    match f {
        DbscFailure::NoSession => Denial::SessionRequired,
        DbscFailure::Proof(e) => Denial::DbscProof(e),
        DbscFailure::Store => Denial::Login(LoginError::Store),
    }
}

/// The answer of the DBSC endpoints (no-store, never framed, never shared
/// cross-origin: no CORS headers at all).
fn dbsc_response(out: &DbscOutcome, request_id: &str) -> Response<ProxyBody> {
    let (status, body, cookie, challenge) = match out {
        DbscOutcome::Registered {
            instructions,
            set_cookie,
        } => (
            StatusCode::OK,
            instructions.to_string(),
            Some(set_cookie),
            None,
        ),
        DbscOutcome::Challenge(c) => (StatusCode::FORBIDDEN, String::new(), None, Some(c)),
        DbscOutcome::Refreshed {
            set_cookie,
            challenge,
        } => (
            StatusCode::OK,
            String::new(),
            Some(set_cookie),
            Some(challenge),
        ),
        DbscOutcome::Terminate => (
            StatusCode::OK,
            dbsc::terminate_instructions().to_string(),
            None,
            None,
        ),
    };
    let json = !body.is_empty();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    if json {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    if let Some(c) = cookie
        && let Ok(v) = HeaderValue::from_str(c)
    {
        h.append(header::SET_COOKIE, v);
    }
    if let Some(c) = challenge
        && let Ok(v) = HeaderValue::from_str(c)
    {
        h.insert(dbsc::CHALLENGE_HEADER, v);
    }
    resp
}

/// Reads a bounded request body (back-channel logout).
pub(crate) async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, Denial> {
    Limited::new(body, crate::session::MAX_LOGOUT_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| Denial::BodyTooLarge {
            limit: crate::session::MAX_LOGOUT_BODY as u64,
        })
}

/// A redirect response with its cookies.
pub fn redirect_response(r: &crate::session::Redirect, request_id: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&r.location) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    for c in &r.cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    if let Some(o) = &r.dbsc_offer
        && let Ok(v) = HeaderValue::from_str(o)
    {
        h.insert(dbsc::REGISTRATION_HEADER, v);
    }
    resp
}

/// The page at `GET /.portcullis/logout`: one button that POSTs.
/// `idp_origin` is the IdP's end-session origin: the POST answers with a
/// redirect there, and `form-action` governs that redirect too.
pub(crate) fn logout_page(request_id: &str, idp_origin: Option<&str>) -> Response<ProxyBody> {
    let body = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\"><title>Sign out</title></head>\
<body><main><h1>Sign out</h1><form method=\"post\" action=\"/.portcullis/logout\">\
<button type=\"submit\">Sign out</button></form></main></body></html>\n";
    let csp = match idp_origin {
        Some(o) => format!("default-src 'none'; form-action 'self' {o}"),
        None => "default-src 'none'; form-action 'self'".to_owned(),
    };
    super::rescue::html_page(Bytes::from_static(body.as_bytes()), &csp, request_id)
}
