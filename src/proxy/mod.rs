//! The request path. [`Proxy::handle`] runs the phases in order:
//!
//! ```text
//! 0. admit         strict framing: one `Host` (HTTP/1.1), `Host` =    (proxy/admit)
//!                  `:authority` (h2), `Transfer-Encoding` only one
//!                  `chunked`; names with `_` dropped once the route  (proxy/headers)
//!                  is known (per-route opt-in, never identity look-alikes)
//! 1. route         host + path prefix → Route                      (route/)
//! 2. authenticate  `Bearer`/`DPoP` JWT → VerifiedToken (cache      (authn/)
//!                  skips only the signature check); on `auth =
//!                  "mtls"` routes, the SPIFFE workload certificate  (binding/)
//!                  on `auth = "browser"` routes, the session cookie (session/)
//!                  → the session's principal, or a redirect to log in
//! 3. bind          token ↔ DPoP proof / client certificate /       (binding/)
//!                  device → Binding {kind, verified device}
//! 4. resolve       principal → identity, device → posture;         (posture/)
//!                  revocations always, the lifecycle baseline
//!                  only when no policy set runs
//! 5. decide        Cedar policies → allow / shorten / restrict /   (policy/)
//!                  step_up / deny / revoke, enforced here; audit
//! 6. forward       header hygiene, stream both ways, upgrades;
//!                  tunnels and still-streaming bodies are live      (live.rs)
//!                  connections: re-decided on change, cut if refused
//! 7. record        metrics and access line; the access memory      (access/)
//!                  (last decision per subject, device, route; token
//!                  seen by hash)
//! ```
//!
//! Every refusal is a [`Denial`], turned into a response in one place
//! ([`rescue::respond`]). The phases read one [`Runtime`] snapshot, loaded
//! once per request, so a reload mid-request never mixes two configs. This
//! room must never buffer a body whole or log a token.

pub mod admit;
pub mod assertion;
mod browser;
pub mod client;
pub mod headers;
pub mod live;
pub mod rescue;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::authn::{Authenticated, Authenticator, Scheme};
use crate::binding::mtls::MtlsError;
use crate::binding::{BindError, Binder, Binding, RequestView, TokenView, WorkloadError};
use crate::config::{AuthMode, BindingMode, Config};
use crate::route::{Route, RouteTable};
use crate::telemetry::{ActionLabel, Metrics, RouteLabel, RouteStatus};
use crate::tls::TlsInfo;
use crate::util::RequestIds;
pub use client::ProxyBody;
pub use rescue::Denial;

/// What the accept loop knows about a connection, shared by its requests.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// TLS facts, absent on the plain-HTTP listener.
    pub tls: Option<TlsInfo>,
    /// The client's IP address as text, for `X-Forwarded-For` (formatted
    /// once per connection, not per request).
    pub peer_ip: Option<HeaderValue>,
}

impl ConnInfo {
    /// The facts of a connection from `peer`.
    pub fn new(peer: SocketAddr, tls: Option<TlsInfo>) -> Self {
        Self {
            peer,
            tls,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
        }
    }
}

/// Everything built from one config, swapped whole on reload.
pub struct Runtime {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Routes.
    pub routes: RouteTable,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Token binding: DPoP, certificates, devices.
    pub binder: Binder,
    /// Upstream clients (a connection pool per worker thread).
    pub upstream: client::UpstreamPools,
    /// Identity headers stripped from client requests.
    pub stripped: headers::Stripped,
    /// Signs the identity assertion for apps (`[assertion]`), and serves its JWKS.
    pub assertion: Option<Arc<assertion::Signer>>,
    /// Monotonic version of this runtime, for logs.
    pub version: u64,
    /// Browser login and sessions (`[browser]`), for `auth = "browser"` routes.
    pub browser: Option<Arc<crate::session::Browser>>,
    /// Traces (`[tracing]`); `None` when off.
    pub tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("version", &self.version)
            .finish()
    }
}

/// Per-request state the phases fill in, read by the record phase.
#[derive(Debug)]
pub struct RequestCtx {
    /// Request id, echoed to client and upstream.
    pub id: crate::util::RequestId,
    /// When the request arrived: read only when the access line is written
    /// (its `elapsed_us`).
    pub started: Option<Instant>,
    /// The matched route, once phase 1 ran.
    pub route: Option<Arc<Route>>,
    /// The authenticated token, once phase 2 ran.
    pub auth: Option<Authenticated>,
    /// Identity and device posture, once phase 4 ran.
    pub resolved: Option<crate::posture::Resolved>,
    /// The verified binding (kind, device the certificate proves, workload),
    /// once phase 3 ran (or phase 2 on `auth = "mtls"` routes). Policy reads it.
    pub binding: Option<Binding>,
    /// The policy decision, once phase 5 ran (absent without `[policy]`).
    pub decision: Option<Arc<crate::policy::Decided>>,
    /// Who reads a refusal: API clients get JSON, browsers a page or a redirect.
    pub audience: rescue::Audience,
    /// The browser session, once phase 2 found one (`auth = "browser"` routes).
    pub session: Option<Arc<crate::session::LiveSession>>,
    /// The request's trace, when `[tracing]` is on.
    pub trace: Option<crate::telemetry::trace::RequestTrace>,
}

impl RequestCtx {
    /// Reads the clock the decision uses again, after the pipeline waited
    /// on the network (a cluster store).
    fn refresh_clock(&mut self) {
        if let Some(a) = &mut self.auth {
            a.now_s = crate::util::now_unix();
        }
    }

    /// A phase's start time for its span; `None` (and free) when tracing is off.
    fn clock(&self) -> Option<std::time::SystemTime> {
        self.trace.as_ref().map(|_| std::time::SystemTime::now())
    }

    /// Records a finished phase as a span.
    fn traced(&self, phase: &'static str, started: Option<std::time::SystemTime>) {
        if let (Some(t), Some(s)) = (&self.trace, started) {
            t.phase(phase, s);
        }
    }
}

/// The shared proxy state.
pub struct Proxy {
    /// Current runtime (config-derived state).
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The device-trust and identity snapshot.
    pub posture: Arc<crate::posture::Posture>,
    /// The policy engine (empty without `[policy]`), swapped on reload.
    pub policy: crate::policy::PolicyHandle,
    /// Live connections (upgrades, streaming responses), re-decided on change.
    pub live: Arc<live::Registry>,
    /// What the proxy remembers of access (phase 7 writes, reports read).
    pub access: Arc<crate::access::Access>,
    ids: RequestIds,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

/// Names of headers the proxy sets for the upstream (all in the default strip list).
pub mod set_headers {
    /// Verified subject.
    pub const SUBJECT: &str = "x-portcullis-subject";
    /// Verified issuer name.
    pub const ISSUER: &str = "x-portcullis-issuer";
    /// Device named by the token (or, when it names none, by the client certificate).
    pub const DEVICE: &str = "x-portcullis-device";
    /// Token binding: `none`, `mtls` or `dpop`.
    pub const BINDING: &str = "x-portcullis-binding";
    /// Device id proven by the client certificate.
    pub const VERIFIED_DEVICE: &str = "x-portcullis-verified-device";
    /// SPIFFE id of a workload client certificate.
    pub const WORKLOAD: &str = "x-portcullis-workload";
    /// Matched route.
    pub const ROUTE: &str = "x-portcullis-route";
    /// Request id.
    pub const REQUEST_ID: &str = "x-request-id";
    /// Device compliance as the snapshot knows it (`unknown` for unknown devices).
    pub const DEVICE_COMPLIANCE: &str = "x-portcullis-device-compliance";
    /// Device lifecycle as the snapshot knows it.
    pub const DEVICE_LIFECYCLE: &str = "x-portcullis-device-lifecycle";
    /// Snapshot version the decision was made on.
    pub const SNAPSHOT: &str = "x-portcullis-snapshot";
    /// The policy decision that let the request through (`allow`, `shorten`, `restrict`).
    pub const DECISION: &str = "x-portcullis-decision";
}

impl Proxy {
    /// Creates the proxy around a first runtime.
    pub fn new(
        runtime: Runtime,
        metrics: Arc<Metrics>,
        posture: Arc<crate::posture::Posture>,
    ) -> Self {
        let access = Arc::new(crate::access::Access::new(
            &runtime.config.access,
            Some(metrics.clone()),
        ));
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            access,
            live: Arc::new(live::Registry::new(posture.snapshot().clone(), &metrics)),
            metrics,
            posture,
            policy: crate::policy::PolicyHandle::default(),
            ids: RequestIds::default(),
        }
    }

    /// Handles one request through every phase; never fails (refusals become
    /// responses).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps each argument once; an async fn, twice (see below)"
    )]
    pub fn handle(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> impl Future<Output = Response<ProxyBody>> {
        // An `async` block, not an `async fn`: an async fn's future keeps
        // each argument twice (the argument and the body's local copy),
        // and this future is boxed, and so copied whole, once a request.
        async move {
            let rt = self.runtime.load_full();
            rt.auth.warm(req.headers().get(header::AUTHORIZATION));
            let access_line = tracing::enabled!(target: "portcullis::access", tracing::Level::INFO);
            let mut ctx = RequestCtx {
                id: self.ids.next_request_id(),
                started: access_line.then(Instant::now),
                route: None,
                auth: None,
                resolved: None,
                binding: None,
                decision: None,
                audience: rescue::Audience::Api,
                session: None,
                trace: rt
                    .tracing
                    .as_ref()
                    .map(|t| t.start(&req, conn.peer, conn.tls.is_some())),
            };
            let method = req.method().clone();
            // The path is kept only for the access line, when it is written.
            let path = access_line.then(|| req.uri().path().to_owned());
            // The assertion's JWKS is the proxy's own document: answered before routing.
            let mut refused: Option<&'static str> = None;
            // Matched on the call itself: a named local would keep its
            // storage in this future across the pipeline's await.
            let resp = match assertion::serve_jwks(rt.assertion.as_deref(), &req) {
                Some(r) => r,
                None => match self.pipeline(&rt, &mut ctx, req, conn).await {
                    Ok(r) => r,
                    Err(d) => {
                        refused = Some(match d.action() {
                            // A refusal that is not a decision (upstream failure, bad framing).
                            "allow" => "error",
                            a => a,
                        });
                        self.metrics
                            .decisions
                            .get_or_create(&ActionLabel {
                                action: d.action(),
                                reason: d.code(),
                            })
                            .inc();
                        if d.origin() != rescue::Origin::Downstream {
                            tracing::warn!(request_id = %ctx.id, origin = ?d.origin(), error = %d, "request failed");
                        }
                        let algs = if rt.binder.dpop.enabled() {
                            rt.binder.dpop.algs()
                        } else {
                            ""
                        };
                        rescue::respond_to(&d, &ctx.id, algs, ctx.audience)
                    }
                },
            };
            self.record(&ctx, &method, path.as_deref(), conn, resp.status());
            self.remember(&ctx, refused);
            if let Some(t) = ctx.trace.take() {
                let decision = ctx.decision.as_ref().map(|d| d.action.as_str());
                t.finish(
                    resp.status(),
                    ctx.route.as_deref().map(|r| r.name.as_str()),
                    decision,
                );
            }
            resp
        }
    }

    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps each argument once; an async fn, twice (see `Proxy::handle`)"
    )]
    fn pipeline(
        &self,
        rt: &Runtime,
        ctx: &mut RequestCtx,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Denial>> {
        async move {
            // 0. admit
            let admitted = admit::admit(&req)?;
            // Proxy-owned paths of browser login (callback, logout, back-channel logout).
            if let Some(b) = &rt.browser
                && req.uri().path().starts_with(crate::session::paths::PREFIX)
            {
                return Box::pin(self.browser_endpoint(rt, ctx, b, req, conn)).await;
            }
            // 1. route
            let t = ctx.clock();
            let route = phase_route(rt, &req)?;
            ctx.route = Some(route.clone());
            if admitted.underscored {
                headers::drop_underscored(
                    req.headers_mut(),
                    route.allow_underscore_headers,
                    rt.stripped.names(),
                    &ctx.id,
                );
            }
            ctx.traced("route", t);
            let mut dpop_used = false;
            match route.auth {
                AuthMode::Bearer => {
                    // 2. authenticate
                    let t = ctx.clock();
                    let (scheme, token, auth) = self.phase_authenticate(rt, &route, &req).await?;
                    ctx.traced("authenticate", t);
                    let t = ctx.clock();
                    // 3. bind (the subject stays in the context, and so in the
                    // access line, even when its binding is refused)
                    let binding = phase_bind(rt, &route, &req, conn, scheme, token, &auth);
                    ctx.auth = Some(auth);
                    let binding = binding?;
                    ctx.traced("bind", t);
                    dpop_used = scheme == Scheme::Dpop;
                    if let (Some(key), Some(cluster)) =
                        (&binding.dpop_replay_key, self.posture.cluster())
                    {
                        Box::pin(phase_bind_cluster(cluster, key)).await?;
                        ctx.refresh_clock();
                    }
                    // 4. resolve on the device the binding proved (a certificate)
                    // or else the one the token names; the lifecycle baseline runs
                    // here only when no policy set owns it.
                    let engine = self.policy.load();
                    if let (Some(c), Some(a)) = (self.posture.cluster(), &ctx.auth)
                        && c.is_lazy()
                        && let Some(d) = binding.device.as_deref().or(a.token.device.as_deref())
                    {
                        Box::pin(c.fill_device(d)).await;
                        ctx.refresh_clock();
                    }
                    let t = ctx.clock();
                    let resolved = match &ctx.auth {
                        Some(a) => {
                            self.phase_resolve(a, binding.device.as_deref(), engine.is_none())
                        }
                        None => Err(Denial::Internal),
                    };
                    ctx.binding = Some(binding);
                    ctx.resolved = Some(resolved?);
                    ctx.traced("resolve", t);
                    // 5. decide
                    if let Some(engine) = engine {
                        let t = ctx.clock();
                        self.phase_decide(&engine, ctx, &route, &req, conn).await?;
                        ctx.traced("decide", t);
                    }
                }
                // 2–3. a workload certificate authenticates and binds at once
                // (allow-listed per route by SPIFFE id).
                AuthMode::Mtls => ctx.binding = Some(phase_workload(rt, &route, &req, conn)?),
                // 2–5. a browser session (OIDC login), then resolve and decide
                // exactly as for a bearer token.
                AuthMode::Browser => {
                    Box::pin(self.browser_phases(rt, ctx, &route, &req, conn)).await?
                }
                AuthMode::Public => {}
            }
            self.metrics
                .count_forwarded(ctx.decision.as_ref().map_or("allow", |d| d.action.as_str()));
            // 6. forward
            let (upgrade, set) = prepare_upstream_request(rt, ctx, &route, &mut req, conn)?;
            let mut resp = self
                .phase_forward(rt, ctx, &route, req, (upgrade, set), conn)
                .await?;
            if dpop_used && rt.binder.dpop.nonce_required() {
                // RFC 9449 §8.2: a fresh nonce for the client's next proof.
                let nonce = rt.binder.dpop.fresh_nonce(crate::util::now_unix());
                if let Ok(v) = HeaderValue::from_str(&nonce) {
                    resp.headers_mut().insert("dpop-nonce", v);
                }
            }
            Ok(resp)
        }
    }

    /// Phase 2: reads the one `Authorization` header (`Bearer`, or `DPoP`
    /// when DPoP is on), adds the verified token to the context.
    async fn phase_authenticate<'r>(
        &self,
        rt: &Runtime,
        route: &Route,
        req: &'r Request<Incoming>,
    ) -> Result<(Scheme, &'r str, Authenticated), Denial> {
        let mut all = req.headers().get_all(header::AUTHORIZATION).iter();
        let first = all.next();
        if all.next().is_some() {
            return Err(Denial::BadRequest("more than one Authorization header"));
        }
        let (scheme, token) = Authenticator::authorization(first, rt.binder.dpop.enabled())
            .map_err(Denial::Unauthenticated)?;
        let auth = rt
            .auth
            .authenticate(token, &route.issuers)
            .await
            .map_err(|e| match scheme {
                Scheme::Bearer => Denial::Unauthenticated(e),
                Scheme::Dpop => Denial::DpopTokenInvalid(e),
            })?;
        if auth.cache_hit {
            self.metrics.token_cache_hits.inc();
        } else {
            self.metrics.token_cache_misses.inc();
        }
        Ok((scheme, token, auth))
    }

    /// Phase 4: looks up the subject's identity and the token's device in the
    /// snapshot, records the control window if this request is the first on
    /// a changed state, and applies the baseline (disabled subjects, revoked
    /// credentials, lost / wiped / compromised devices are refused).
    fn phase_resolve(
        &self,
        auth: &Authenticated,
        verified_device: Option<&str>,
        lifecycle_baseline: bool,
    ) -> Result<crate::posture::Resolved, Denial> {
        let t = &auth.token;
        let sub = t.claims.sub.as_str();
        // The token's own device claim goes through the token's memo of its
        // record; a device from the client certificate is looked up.
        let resolved = match verified_device {
            Some(d) => self.posture.resolve(sub, Some(d)),
            None => self.posture.resolve_claim(sub, t.device.as_ref()),
        };
        self.posture.observe_control_window(sub, &resolved);
        match self.posture_verdict(t, &resolved, lifecycle_baseline) {
            Ok(()) => Ok(resolved),
            Err(p) => {
                self.metrics
                    .posture_denials
                    .get_or_create(&crate::telemetry::ResultLabel { result: p.code() })
                    .inc();
                Err(Denial::Posture(p))
            }
        }
    }

    /// Phase 4's checks on the records it resolved: revocations of the
    /// token's subject, device or session (`jti`, `sid`, subject-on-device)
    /// always; disabled subjects and dead devices with `lifecycle_baseline`.
    /// Live connections are re-checked with the same function.
    fn posture_verdict(
        &self,
        t: &crate::authn::VerifiedToken,
        resolved: &crate::posture::Resolved,
        lifecycle_baseline: bool,
    ) -> Result<(), crate::posture::PostureDenial> {
        let sub = t.claims.sub.as_str();
        let canonical = resolved
            .identity
            .as_ref()
            .map_or(sub, |i| i.subject.as_str());
        // The subject-on-device key is only needed when session revocations exist.
        let pair = resolved
            .device_id
            .as_deref()
            .filter(|_| self.posture.snapshot().has_session_revocations())
            .map(|d| format!("{canonical}|{d}"));
        // At most three session keys: on the stack, not a heap `Vec` per request.
        let mut keys = [""; 3];
        let mut n = 0;
        for k in [
            t.claims.jti.as_deref(),
            t.claims.sid.as_deref(),
            pair.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(slot) = keys.get_mut(n) {
                *slot = k;
                n += 1;
            }
        }
        let sessions = keys.get(..n).unwrap_or_default();
        if lifecycle_baseline {
            self.posture.baseline(sub, resolved, t.claims.iat, sessions)
        } else {
            self.posture
                .revocations(sub, resolved, t.claims.iat, sessions)
        }
    }

    /// Phase 5: builds the decision's inputs from the token, the snapshot
    /// records (phase 4), the route and the connection; asks the engine
    /// (decision cache, else Cedar); enforces the decision; writes the
    /// audit line. Adds the decision to the context.
    async fn phase_decide(
        &self,
        engine: &crate::policy::Engine,
        ctx: &mut RequestCtx,
        route: &Route,
        req: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(), Denial> {
        use crate::policy::{Action, MethodClass, PolicyRefusal};
        let method = req.method();
        let (Some(auth), Some(resolved)) = (&ctx.auth, &ctx.resolved) else {
            return Err(Denial::Internal);
        };
        let t = &auth.token;
        let now = auth.now_s;
        let class = MethodClass::of(method);
        let out = self.evaluate(
            engine,
            t,
            resolved,
            route,
            class,
            conn.peer.ip(),
            ctx.binding.as_ref(),
            ctx.session.as_ref().map(|s| s.record.binding.as_str()),
            now,
        );
        let d = &out.decided.decision;
        let reason = || d.reasons.join("; ");
        let verdict: Result<(), PolicyRefusal> = match d.action {
            Action::Allow => Ok(()),
            Action::Shorten => {
                let ttl_s = d.session_ttl_s.unwrap_or(0);
                let issued = t.claims.iat.or(t.claims.auth_time);
                if issued.is_some_and(|i| now.saturating_sub(i) <= ttl_s) {
                    Ok(())
                } else {
                    Err(PolicyRefusal::SessionCapped {
                        ttl_s,
                        reason: reason(),
                    })
                }
            }
            Action::Restrict if class == MethodClass::Read => Ok(()),
            Action::Restrict => Err(PolicyRefusal::Restricted { reason: reason() }),
            Action::StepUp => Err(PolicyRefusal::StepUp {
                reason: reason(),
                acr_values: d.acr_values.clone(),
                max_age_s: d.max_age_s,
            }),
            Action::Deny => Err(PolicyRefusal::Denied { reason: reason() }),
            Action::Revoke => {
                Box::pin(self.record_revocation(d, &t.claims, resolved)).await;
                Err(PolicyRefusal::Revoked { reason: reason() })
            }
        };
        let diverged = out.decided.shadow.as_ref().filter(|s| s.action != d.action);
        if let Some(s) = diverged {
            self.metrics
                .policy_shadow_divergences
                .get_or_create(&crate::telemetry::ShadowLabel {
                    enforced: d.action.as_str(),
                    shadow: s.action.as_str(),
                })
                .inc();
        }
        let enforced = if verdict.is_ok() {
            "forwarded"
        } else {
            "refused"
        };
        self.audit(
            engine,
            &out,
            diverged,
            &ctx.id,
            route,
            method,
            enforced,
            resolved.snapshot_version,
            || RequestPlace {
                host: request_host(req).unwrap_or(""),
                path: req.uri().path(),
                trace_id: ctx.trace.as_ref().map(|t| t.trace_id()),
            },
        );
        ctx.decision = Some(out.decided);
        verdict.map_err(Denial::Policy)
    }

    /// Phase 5's question to the engine: the decision's inputs built from the
    /// token, the records phase 4 resolved, the route and the connection,
    /// answered from the decision cache or by Cedar. Live connections are
    /// re-decided with the same function and the facts of their request.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        engine: &crate::policy::Engine,
        t: &crate::authn::VerifiedToken,
        resolved: &crate::posture::Resolved,
        route: &Route,
        class: crate::policy::MethodClass,
        peer: std::net::IpAddr,
        binding: Option<&Binding>,
        session_binding: Option<&str>,
        now: u64,
    ) -> crate::policy::Outcome {
        let owner = resolved
            .identity
            .as_ref()
            .filter(|i| i.kind == crate::posture::model::IdentityKind::Workload)
            .and_then(|i| i.owner.as_deref())
            .and_then(|o| self.posture.snapshot().identity(o));
        let spiffe = binding
            .and_then(|b| b.workload.as_ref())
            .map(|w| w.to_string());
        let facts = crate::policy::facts::RequestFacts {
            claims: &t.claims,
            issuer: &t.issuer.cfg.name,
            resolved,
            owner,
            route: &route.name,
            sensitivity: route.sensitivity,
            workloads: &route.workloads,
            method: class,
            peer,
            zone: engine.zone(peer),
            binding: binding.map_or("none", |b| b.kind.as_str()),
            spiffe_id: spiffe.as_deref(),
            session_binding,
        };
        let out = engine.decide_with(&facts, now, Some(&t.decision_memo));
        if out.cache_hit {
            self.metrics.policy_cache_hits.inc();
        } else {
            self.metrics.policy_cache_misses.inc();
        }
        out
    }

    /// Writes the audit line of a decision, when the audit sink wants it
    /// (`place` is read only then).
    #[allow(clippy::too_many_arguments)]
    fn audit<'p>(
        &self,
        engine: &crate::policy::Engine,
        out: &crate::policy::Outcome,
        diverged: Option<&crate::policy::Decision>,
        request_id: &str,
        route: &Route,
        method: &http::Method,
        enforced: &'static str,
        snapshot_version: u64,
        place: impl FnOnce() -> RequestPlace<'p>,
    ) {
        let d = &out.decided.decision;
        let Some(sink) = engine
            .audit
            .as_ref()
            .filter(|s| s.wants(d.action, diverged.is_some()))
        else {
            return;
        };
        let now_ms = crate::util::now_unix_ms();
        let place = place();
        sink.log(crate::policy::audit::AuditRecord {
            time: crate::util::rfc3339(now_ms, true),
            time_ms: now_ms,
            host: place.host.to_owned(),
            path: place.path.to_owned(),
            trace_id: place.trace_id,
            request_id: request_id.to_owned(),
            principal: format!(
                "{}:{}",
                match out.decided.inputs.principal.kind {
                    crate::policy::facts::PrincipalKind::User => "user",
                    crate::policy::facts::PrincipalKind::Workload => "workload",
                },
                out.decided.inputs.principal.id
            ),
            device: out.decided.inputs.device.id.clone(),
            route: route.name.clone(),
            method: method.to_string(),
            action: d.action,
            enforced,
            policy_ids: d.policy_ids.clone(),
            reasons: d.reasons.clone(),
            decision: Arc::new(d.clone()),
            snapshot_version,
            policy_version: engine.set.version.clone(),
            cache_hit: out.cache_hit,
            shadow: diverged.map(|s| crate::policy::audit::ShadowRecord {
                policy_version: engine
                    .shadow
                    .as_ref()
                    .map_or_else(String::new, |x| x.version.clone()),
                decision: Arc::new(s.clone()),
            }),
            inputs: out.decided.inputs.clone(),
        });
    }

    /// Records a `revoke` decision through the one apply path, so it is
    /// durable and seen on every route: credentials of the subject and/or
    /// device issued before now stop working. Retries of the same token
    /// produce the same event id and apply once.
    async fn record_revocation(
        &self,
        d: &crate::policy::Decision,
        claims: &crate::authn::Claims,
        r: &crate::posture::Resolved,
    ) {
        use crate::posture::event::{Change, Feed, PostureEvent};
        use crate::posture::model::RevocationTarget;
        let subject = r
            .identity
            .as_ref()
            .map_or(claims.sub.as_str(), |i| i.subject.as_str());
        let mut changes = Vec::new();
        if d.revoke.iter().any(|x| x == "subject") {
            changes.push(Change::Revoke {
                target: RevocationTarget::Subject,
                key: subject.to_owned(),
            });
        }
        if d.revoke.iter().any(|x| x == "device")
            && let Some(dev) = &r.device_id
        {
            changes.push(Change::Revoke {
                target: RevocationTarget::Device,
                key: dev.clone(),
            });
        }
        if changes.is_empty() {
            return;
        }
        let id = format!(
            "policy:{}:{}:{}:{}",
            d.policy_ids.join(","),
            subject,
            r.device_id.as_deref().unwrap_or(""),
            claims.iat.unwrap_or(0)
        );
        let ev = PostureEvent {
            id: id.chars().take(crate::posture::event::MAX_ID_LEN).collect(),
            feed: Feed::Policy,
            kind: "policy.revoke".into(),
            origin_ms: crate::util::now_unix_ms(),
            changes,
        };
        if let Err(e) = self.posture.ingest(vec![ev]).await {
            // The request is refused regardless; the next one decides again.
            tracing::error!(error = %e, "policy revocation was not recorded");
        }
    }

    /// Phase 6: sends the request upstream and streams the answer back;
    /// hands `Upgrade` connections (WebSocket) over to a tunnel. Tunnels and
    /// responses that keep streaming are live connections: registered with
    /// the facts of this request, re-decided on change, cut when refused
    /// ([`live`]).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps each argument once; an async fn, twice (see `Proxy::handle`)"
    )]
    fn phase_forward(
        &self,
        _rt: &Runtime,
        ctx: &RequestCtx,
        route: &Route,
        mut req: Request<Incoming>,
        (upgrade, set): (Option<HeaderValue>, headers::SetHeaders),
        conn: &ConnInfo,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Denial>> {
        async move {
            let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
            let limit = route.max_body_bytes;
            if let Some(limit) = limit
                && let Some(len) = content_length(&req)
                && len > limit
            {
                return Err(Denial::BodyTooLarge { limit });
            }
            // Built in a block: the parts, the client's body and the span's
            // bytes end before the await instead of taking room in this
            // future for its whole life (the span is boxed: tracing is
            // usually off, and then it is `None`).
            let (up_req, method, span) = {
                let (mut parts, body) = req.into_parts();
                let method = parts.method.clone();
                if let Some(proto) = &upgrade {
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(header::UPGRADE, proto.clone());
                }
                // Body errors are tagged: a malformed chunk is the client's fault (400).
                let body: ProxyBody = if hyper::body::Body::is_end_stream(&body) {
                    // No body (a GET, most requests): nothing to box.
                    drop(body);
                    client::empty_body()
                } else {
                    let body = body.map_err(admit::ClientBodyError);
                    match limit {
                        Some(l) => Limited::new(Linger(Some(body)), l as usize).boxed_unsync(),
                        None => body
                            .map_err(|e| Box::new(e) as client::BoxError)
                            .boxed_unsync(),
                    }
                };
                let span = ctx
                    .trace
                    .as_ref()
                    .map(|t| Box::new(t.upstream(&parts.method, &parts.uri, &mut parts.headers)));
                (Request::from_parts(parts, body), method, span)
            };
            let started = Instant::now();
            // `timeout_at` from the clock read just taken (`timeout` reads it again).
            let result = tokio::time::timeout_at(
                (started + route.timeout).into(),
                rt_upstream(_rt).request(up_req, set),
            )
            .await;
            if let Some(s) = span {
                s.end(match &result {
                    Ok(Ok(r)) => Ok(r.status()),
                    Ok(Err(_)) => Err("upstream_error"),
                    Err(_) => Err("timeout"),
                });
            }
            route
                .metric_handles
                .upstream
                .get_or_init(|| {
                    self.metrics
                        .upstream_seconds
                        .get_or_create_owned(&RouteLabel {
                            route: route.name.clone(),
                        })
                })
                .observe(started.elapsed().as_secs_f64());
            warm_late(ctx);
            let mut resp = match result {
                Err(_) => return Err(Denial::UpstreamTimeout),
                Ok(Err(e)) => {
                    if is_body_limit(&e) {
                        return Err(Denial::BodyTooLarge {
                            limit: limit.unwrap_or(0),
                        });
                    }
                    if admit::is_client_body(&e) {
                        return Err(Denial::Framing(admit::FramingError::Body));
                    }
                    tracing::debug!(request_id = %ctx.id, error = %e, "upstream request failed");
                    return Err(Denial::UpstreamUnavailable);
                }
                Ok(Ok(r)) => r,
            };
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_upgrade) = client_upgrade else {
                    return Err(Denial::UpstreamUnavailable);
                };
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let websocket = upgrade
                    .as_ref()
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
                let registration = live::Seed::new(ctx, &method, conn)
                    .map(|seed| self.live.register(seed, live::Kind::Upgrade));
                tokio::spawn(live::tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    websocket,
                    registration,
                    ctx.id.clone(),
                ));
                let (parts, _) = resp.into_parts();
                let mut out = Response::from_parts(parts, client::empty_body());
                set_request_id(out.headers_mut(), &ctx.id);
                return Ok(out);
            }
            let (mut parts, body) = resp.into_parts();
            headers::remove_hop_by_hop(&mut parts.headers);
            set_request_id(&mut parts.headers, &ctx.id);
            // A body already complete never streams; the others register only
            // once they have nothing ready (see `live::LiveBody`).
            let seed = (!hyper::body::Body::is_end_stream(&body))
                .then(|| live::Seed::new(ctx, &method, conn))
                .flatten();
            let body = match seed {
                Some(seed) => live::LiveBody::new(body, seed, self.live.clone()).boxed_unsync(),
                None => body.boxed_unsync(),
            };
            Ok(Response::from_parts(parts, body))
        }
    }

    /// Phase 7: remembers the decision for the access picture: the subject
    /// (or workload), the device the request resolved to, the route, and the
    /// token by its hash. Lock-free; no I/O (a background task persists it).
    fn remember(&self, ctx: &RequestCtx, refused: Option<&'static str>) {
        let Some(route) = ctx.route.as_deref() else {
            return;
        };
        let decision =
            refused.unwrap_or_else(|| ctx.decision.as_ref().map_or("allow", |d| d.action.as_str()));
        let workload_id;
        let (subject, token) = match (
            &ctx.auth,
            ctx.binding.as_ref().and_then(|b| b.workload.as_ref()),
        ) {
            (Some(a), _) => (a.token.claims.sub.as_str(), Some(&a.token)),
            (None, Some(w)) => {
                workload_id = w.to_string();
                (workload_id.as_str(), None)
            }
            (None, None) => return,
        };
        let device = ctx
            .resolved
            .as_ref()
            .and_then(|r| r.device_id.as_deref())
            .or_else(|| ctx.binding.as_ref().and_then(|b| b.device.as_deref()))
            .or_else(|| token.and_then(|t| t.device.as_deref()));
        let workload = token.is_none()
            || ctx.binding.as_ref().is_some_and(|b| b.workload.is_some())
            || token.is_some_and(|t| t.claims.client_id.as_deref() == Some(subject));
        self.access.memory.record(
            &crate::access::Observed {
                subject,
                device,
                route: &route.name,
                decision,
                request_id: &ctx.id,
                workload,
                token: token.and_then(|t| {
                    t.hash.map(|hash| crate::access::TokenSeen {
                        hash,
                        iat: t.claims.iat,
                        exp: t.claims.exp,
                    })
                }),
            },
            token.map(|t| &t.access),
        );
    }

    /// Phase 7: metrics and the access line.
    fn record(
        &self,
        ctx: &RequestCtx,
        method: &http::Method,
        path: Option<&str>,
        conn: &ConnInfo,
        status: StatusCode,
    ) {
        let route = ctx.route.as_ref().map_or("none", |r| r.name.as_str());
        let code = status.as_u16();
        let label = || RouteStatus {
            route: route.to_owned(),
            status: code,
        };
        match ctx.route.as_ref().zip(
            crate::route::COMMON_STATUSES
                .iter()
                .position(|s| *s == code),
        ) {
            Some((r, i)) => {
                r.metric_handles.by_status[i]
                    .get_or_init(|| self.metrics.requests.get_or_create_owned(&label()))
                    .inc();
            }
            None => {
                self.metrics.requests.get_or_create(&label()).inc();
            }
        }
        let subject = ctx.auth.as_ref().map(|a| a.token.claims.sub.as_str());
        let binding = ctx.binding.as_ref().map(|b| b.kind.as_str());
        let device = ctx.binding.as_ref().and_then(|b| b.device.as_deref());
        tracing::info!(
            target: "portcullis::access",
            request_id = %ctx.id,
            peer = %conn.peer,
            route,
            method = %method,
            path,
            status = status.as_u16(),
            subject,
            binding,
            device,
            elapsed_us = ctx.started.map(|s| s.elapsed().as_micros() as u64),
            "request"
        );
    }
}

/// Where a decided request was going, for its audit line.
#[derive(Debug, Clone, Default)]
struct RequestPlace<'a> {
    host: &'a str,
    path: &'a str,
    trace_id: Option<String>,
}

fn rt_upstream(rt: &Runtime) -> &client::Pool {
    rt.upstream.here()
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// Most of a refused request body read and thrown away after the refusal.
const LINGER_MAX_BYTES: usize = 8 << 20;
/// Longest a refused request body is read after the refusal.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A request body that, dropped before its end (the size limit tripped, the
/// upstream failed), keeps being read and discarded for a bounded time and
/// size, so the client can finish sending and then read the refusal: closing
/// a connection with unread data resets it, and the client loses the 413
/// (nginx's lingering close). On a multi-threaded server this race is real.
struct Linger<B: hyper::body::Body + Send + Unpin + 'static>(Option<B>);

impl<B: hyper::body::Body + Send + Unpin + 'static> hyper::body::Body for Linger<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.get_mut().0.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), B::size_hint)
    }
}

impl<B: hyper::body::Body + Send + Unpin + 'static> Drop for Linger<B> {
    fn drop(&mut self) {
        let Some(mut body) = self.0.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(tokio::time::timeout(LINGER_TIME, async move {
            let mut read = 0usize;
            while read < LINGER_MAX_BYTES {
                match body.frame().await {
                    Some(Ok(f)) => {
                        read += f.data_ref().map_or(0, bytes::Buf::remaining);
                    }
                    _ => break,
                }
            }
        }));
    }
}

fn is_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn set_request_id(h: &mut http::HeaderMap, id: &crate::util::RequestId) {
    h.insert(&names::REQUEST_ID, id.header());
}

/// The request's host, without port: `Host` for HTTP/1.1, the URI authority for HTTP/2.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })?;
    Some(strip_port(raw))
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &h[1..]);
    }
    match authority.bytes().rposition(|b| b == b':') {
        Some(i) => authority.get(..i).unwrap_or(authority),
        None => authority,
    }
}

/// The request's authority as received: the URI's (HTTP/2 `:authority`,
/// absolute-form) or `Host`.
fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

/// True when the host needs a client certificate but this connection's
/// handshake (made for another SNI) never asked for one.
fn misdirected<B>(rt: &Runtime, req: &Request<B>, conn: &ConnInfo) -> bool {
    let asked = conn.tls.as_ref().is_some_and(|t| t.client_cert_requested);
    !asked && request_host(req).is_some_and(|h| rt.binder.client_auth_hosts.contains(h))
}

/// A certificate that expired since the handshake no longer counts.
fn fresh_peer(conn: &ConnInfo, now: u64) -> Result<Option<&crate::tls::PeerCertificate>, Denial> {
    match conn.tls.as_ref().and_then(|t| t.peer.as_deref()) {
        Some(p) if p.expired(now) => Err(Denial::ClientCertExpired),
        p => Ok(p),
    }
}

/// Phase 3: checks the token's binding — the DPoP proof for `cnf.jkt`,
/// the client certificate for `cnf.x5t#S256`, the certificate's device
/// against the token's — and the route's `binding = "required"`.
fn phase_bind<B>(
    rt: &Runtime,
    route: &Route,
    req: &Request<B>,
    conn: &ConnInfo,
    scheme: Scheme,
    token: &str,
    auth: &Authenticated,
) -> Result<Binding, Denial> {
    let now = auth.now_s;
    let peer = fresh_peer(conn, now)?;
    let view = RequestView {
        method: req.method().as_str(),
        scheme: if conn.tls.is_some() { "https" } else { "http" },
        authority: request_authority(req),
        path: req.uri().path(),
        headers: req.headers(),
        peer,
        now,
    };
    let tok = TokenView {
        scheme,
        token,
        verified: &auth.token,
    };
    let required = route.binding == BindingMode::Required;
    rt.binder
        .bind_token(&view, &tok, required)
        .map_err(|error| match error {
            BindError::Mtls(MtlsError::NoCertificate) if misdirected(rt, req, conn) => {
                Denial::Misdirected
            }
            BindError::Dpop(error) => Denial::DpopInvalid {
                error,
                nonce: error.wants_nonce().then(|| rt.binder.dpop.fresh_nonce(now)),
            },
            error => Denial::BindingMismatch { scheme, error },
        })
}

/// Phase 3, cluster half: a DPoP proof spent here is spent at every
/// replica (one JetStream KV create); refused when another replica spent it
/// first, and (fail closed) when the cluster cannot answer.
async fn phase_bind_cluster(
    cluster: &crate::posture::cluster::Cluster,
    key: &[u8; 32],
) -> Result<(), Denial> {
    match cluster.spend_dpop(key).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Denial::DpopInvalid {
            error: crate::binding::dpop::DpopError::Replayed,
            nonce: None,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cluster DPoP replay check failed; proof refused");
            Err(Denial::DpopInvalid {
                error: crate::binding::dpop::DpopError::ReplayCheckUnavailable,
                nonce: None,
            })
        }
    }
}

/// Phases 2–3 on `auth = "mtls"` routes: the connection's SPIFFE workload
/// certificate, matched against the route's `spiffe_ids`.
fn phase_workload<B>(
    rt: &Runtime,
    route: &Route,
    req: &Request<B>,
    conn: &ConnInfo,
) -> Result<Binding, Denial> {
    let peer = fresh_peer(conn, crate::util::now_unix())?;
    rt.binder
        .bind_workload(peer, &route.spiffe_ids)
        .map_err(|e| match e {
            WorkloadError::NoCertificate if misdirected(rt, req, conn) => Denial::Misdirected,
            WorkloadError::NoCertificate => Denial::ClientCertRequired(e),
            e => Denial::WorkloadNotAllowed(e),
        })
}

/// Phase 1: finds the route; adds it to the context.
fn phase_route<B>(rt: &Runtime, req: &Request<B>) -> Result<Arc<Route>, Denial> {
    rt.routes
        .lookup(|| request_host(req).unwrap_or(""), req.uri().path())
        .cloned()
        .ok_or(Denial::NoRoute)
}

/// The names of [`set_headers`], built at compile time (the request path
/// inserts them on every request; statics, as `Bytes` is not `Freeze`).
mod names {
    use http::header::HeaderName;

    use super::set_headers as s;

    pub static SUBJECT: HeaderName = HeaderName::from_static(s::SUBJECT);
    pub static ISSUER: HeaderName = HeaderName::from_static(s::ISSUER);
    pub static DEVICE: HeaderName = HeaderName::from_static(s::DEVICE);
    pub static BINDING: HeaderName = HeaderName::from_static(s::BINDING);
    pub static VERIFIED_DEVICE: HeaderName = HeaderName::from_static(s::VERIFIED_DEVICE);
    pub static WORKLOAD: HeaderName = HeaderName::from_static(s::WORKLOAD);
    pub static ROUTE: HeaderName = HeaderName::from_static(s::ROUTE);
    pub static REQUEST_ID: HeaderName = HeaderName::from_static(s::REQUEST_ID);
    pub static DEVICE_COMPLIANCE: HeaderName = HeaderName::from_static(s::DEVICE_COMPLIANCE);
    pub static DEVICE_LIFECYCLE: HeaderName = HeaderName::from_static(s::DEVICE_LIFECYCLE);
    pub static SNAPSHOT: HeaderName = HeaderName::from_static(s::SNAPSHOT);
    pub static DECISION: HeaderName = HeaderName::from_static(s::DECISION);
    pub static DPOP: HeaderName = HeaderName::from_static("dpop");
}

/// Once the upstream has answered, reads side by side the request's own
/// lines the rest of it reads (its token's, its decision's), which waiting
/// on the upstream likely let go from the cache: their misses then overlap
/// instead of coming one after another in the seed and phase 7. Plain
/// reads of lines no request writes.
fn warm_late(ctx: &RequestCtx) {
    let w = ctx.auth.as_ref().map_or(0, |a| a.token.warm_late())
        ^ ctx.decision.as_ref().map_or(0, |d| d.touch());
    std::hint::black_box(w);
}

/// Phase 6's rewrite of the client's request for the upstream: its URI and
/// version for the pool, hop-by-hop and identity headers out. Returns the
/// protocol of an HTTP/1.1 `Upgrade` (WebSocket), read before the
/// hop-by-hop headers go, and the proxy's forwarding and identity lines,
/// which the pool writes beside the map ([`headers::SetHeaders`]).
fn prepare_upstream_request<B>(
    rt: &Runtime,
    ctx: &RequestCtx,
    route: &Route,
    req: &mut Request<B>,
    conn: &ConnInfo,
) -> Result<(Option<HeaderValue>, headers::SetHeaders), Denial> {
    let upgrade =
        headers::upgrade_protocol(req.headers()).filter(|_| req.version() == Version::HTTP_11);
    // The host the client asked for, as a header value before the URI and
    // `Host` are rewritten (a shared buffer when it came as `Host`).
    let original_host = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req
            .headers()
            .get(header::HOST)
            .filter(|v| v.to_str().is_ok())
            .cloned(),
    };
    let mut parts = route.upstream.clone().into_parts();
    parts.path_and_query = Some(if route.upstream_base_path.is_empty() {
        // The usual case: the client's path and query as they are, no re-parse.
        match req.uri().path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        }
    } else {
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut pq = String::with_capacity(route.upstream_base_path.len() + path_and_query.len());
        pq.push_str(&route.upstream_base_path);
        pq.push_str(path_and_query);
        pq.parse()
            .map_err(|_| Denial::BadRequest("request target is not a valid path"))?
    });
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Denial::Internal)?;
    *req.version_mut() = Version::HTTP_11;

    let h = req.headers_mut();
    // Hop-by-hop headers go first: the names a client lists in `Connection`
    // are its own headers, never the ones the proxy adds below. (Also the
    // cheaper order: the scan runs over the client's few names.)
    headers::remove_hop_by_hop(h);
    // Room for what may still go into the map: the upstream's `Host` (an
    // HTTP/2 request has none), a trace context, a route's assertion.
    h.reserve(2);
    headers::strip_identity(h, &rt.stripped);
    headers::strip_own_cookies(h, crate::session::OWN_COOKIES);
    // `Host` stays for now: the pool replaces it with the upstream's.
    // The client's credentials stay here unless the route asks for them.
    if !route.forward_authorization {
        h.remove(header::AUTHORIZATION);
        h.remove(&names::DPOP);
    }
    // The lines set below go beside the map (see `headers::SetHeaders`):
    // the strip list always holds every one of these names, so the
    // client's are gone and none is there twice.
    let mut set = headers::SetHeaders::with_capacity(16);
    let proto = if conn.tls.is_some() { "https" } else { "http" };
    headers::set_forwarded(&mut set, conn.peer_ip.clone(), proto, original_host);
    set.push(&names::REQUEST_ID, ctx.id.header());
    if let Some(v) = &route.name_header {
        set.push(&names::ROUTE, v.clone());
    }
    // The token's device, when it names one, is the device; else the one
    // the client certificate proves.
    let mut device_set = false;
    if let Some(a) = &ctx.auth {
        let t = &a.token.headers;
        if let Some(v) = &t.subject {
            set.push(&names::SUBJECT, v.clone());
        }
        if let Some(v) = &t.issuer {
            set.push(&names::ISSUER, v.clone());
        }
        if let Some(v) = &t.device {
            set.push(&names::DEVICE, v.clone());
            device_set = true;
        }
    }
    if let Some(b) = &ctx.binding {
        set.push(&names::BINDING, HeaderValue::from_static(b.kind.as_str()));
        if let Some(Ok(v)) = b.device.as_deref().map(HeaderValue::from_str) {
            if !device_set {
                set.push(&names::DEVICE, v.clone());
            }
            set.push(&names::VERIFIED_DEVICE, v);
        }
        if let Some(Ok(v)) = b
            .workload
            .as_ref()
            .map(|w| HeaderValue::from_str(&w.to_string()))
        {
            set.push(&names::WORKLOAD, v);
        }
    }
    if let Some(r) = &ctx.resolved {
        if r.device_id.is_some() {
            let (compliance, lifecycle) = r.device.as_ref().map_or(("unknown", "unknown"), |d| {
                (
                    crate::posture::model::compliance_name(d.compliance),
                    crate::posture::model::lifecycle_name(d.lifecycle),
                )
            });
            set.push(
                &names::DEVICE_COMPLIANCE,
                HeaderValue::from_static(compliance),
            );
            set.push(
                &names::DEVICE_LIFECYCLE,
                HeaderValue::from_static(lifecycle),
            );
        }
        set.push(&names::SNAPSHOT, snapshot_header(r.snapshot_version));
    }
    if let Some(d) = &ctx.decision {
        set.push(
            &names::DECISION,
            HeaderValue::from_static(d.action.as_str()),
        );
    }
    assertion::apply(rt.assertion.as_deref(), ctx, route, h)?;
    if !route.identity.headers.is_empty() {
        // A route's own identity header may bear a name set above: its
        // line replaces the proxy's.
        set.yield_to(h);
    }
    Ok((upgrade, set))
}

thread_local! {
    /// The last snapshot version's header value on this thread: the version
    /// moves with feed events, not requests, so most requests clone it (a
    /// reference count) instead of formatting and allocating a new one.
    static SNAPSHOT_HEADER: std::cell::RefCell<Option<(u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `X-Portcullis-Snapshot`'s value for `version`.
fn snapshot_header(version: u64) -> HeaderValue {
    SNAPSHOT_HEADER.with_borrow_mut(|memo| match memo {
        Some((v, h)) if *v == version => h.clone(),
        _ => {
            let h = HeaderValue::from(version);
            *memo = Some((version, h.clone()));
            h
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{snapshot_header, strip_port};

    #[test]
    fn snapshot_header_follows_the_version() {
        assert_eq!(snapshot_header(7), "7");
        assert_eq!(snapshot_header(7), "7");
        assert_eq!(snapshot_header(8), "8");
        assert_eq!(snapshot_header(7), "7");
        assert_eq!(snapshot_header(u64::MAX), "18446744073709551615");
    }

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("app.example:8443"), "app.example");
        assert_eq!(strip_port("app.example"), "app.example");
        assert_eq!(strip_port("[::1]:8443"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }
}
