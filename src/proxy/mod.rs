//! The request path. [`Proxy::handle`] runs the phases in order:
//!
//! ```text
//! 1. route         host + path prefix → Route                      (route/)
//! 2. authenticate  `Bearer`/`DPoP` JWT → VerifiedToken (cache      (authn/)
//!                  skips only the signature check); on `auth =
//!                  "mtls"` routes, the SPIFFE workload certificate  (binding/)
//! 3. bind          token ↔ DPoP proof / client certificate /       (binding/)
//!                  device → Binding {kind, verified device}
//! 4. resolve       principal → identity, device → posture;         (posture/)
//!                  revocations always, the lifecycle baseline
//!                  only when no policy set runs
//! 5. decide        Cedar policies → allow / shorten / restrict /   (policy/)
//!                  step_up / deny / revoke, enforced here; audit
//! 6. forward       header hygiene, stream both ways, upgrades
//! 7. record        metrics and access line
//! ```
//!
//! Every refusal is a [`Denial`], turned into a response in one place
//! ([`rescue::respond`]). The phases read one [`Runtime`] snapshot, loaded
//! once per request, so a reload mid-request never mixes two configs. This
//! room must never buffer a body whole or log a token.

pub mod client;
pub mod headers;
pub mod rescue;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

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
    /// Upstream client (connection pool).
    pub upstream: client::UpstreamClient,
    /// Identity headers stripped from client requests.
    pub stripped: Vec<HeaderName>,
    /// Monotonic version of this runtime, for logs.
    pub version: u64,
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
    pub id: String,
    /// When the request arrived.
    pub started: Instant,
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
    pub decision: Option<Arc<crate::policy::Decision>>,
    /// The request's trace, when `[tracing]` is on.
    pub trace: Option<crate::telemetry::trace::RequestTrace>,
}

impl RequestCtx {
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
        Self {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            posture,
            policy: crate::policy::PolicyHandle::default(),
            ids: RequestIds::default(),
        }
    }

    /// Handles one request through every phase; never fails (refusals become
    /// responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<ProxyBody> {
        let rt = self.runtime.load_full();
        let mut ctx = RequestCtx {
            id: self.ids.next_id(),
            started: Instant::now(),
            route: None,
            auth: None,
            resolved: None,
            binding: None,
            decision: None,
            trace: rt
                .tracing
                .as_ref()
                .map(|t| t.start(&req, conn.peer, conn.tls.is_some())),
        };
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let resp = match self.pipeline(&rt, &mut ctx, req, &conn).await {
            Ok(r) => r,
            Err(d) => {
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
                rescue::respond(&d, &ctx.id, algs)
            }
        };
        self.record(&ctx, &method, &path, &conn, resp.status());
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

    async fn pipeline(
        &self,
        rt: &Runtime,
        ctx: &mut RequestCtx,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Denial> {
        // 1. route
        let t = ctx.clock();
        let route = phase_route(rt, &req)?;
        ctx.route = Some(route.clone());
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
                // 4. resolve on the device the binding proved (a certificate)
                // or else the one the token names; the lifecycle baseline runs
                // here only when no policy set owns it.
                let engine = self.policy.load();
                let t = ctx.clock();
                let resolved = match &ctx.auth {
                    Some(a) => self.phase_resolve(a, binding.device.as_deref(), engine.is_none()),
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
            AuthMode::Public => {}
        }
        self.metrics
            .decisions
            .get_or_create(&ActionLabel {
                action: ctx.decision.as_ref().map_or("allow", |d| d.action.as_str()),
                reason: "ok",
            })
            .inc();
        // 6. forward
        prepare_upstream_request(rt, ctx, &route, &mut req, conn)?;
        let mut resp = self.phase_forward(rt, ctx, &route, req).await?;
        if dpop_used && rt.binder.dpop.nonce_required() {
            // RFC 9449 §8.2: a fresh nonce for the client's next proof.
            let nonce = rt.binder.dpop.fresh_nonce(crate::util::now_unix());
            if let Ok(v) = HeaderValue::from_str(&nonce) {
                resp.headers_mut().insert("dpop-nonce", v);
            }
        }
        Ok(resp)
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
        let device = verified_device.or(t.device.as_deref());
        let resolved = self.posture.resolve(sub, device);
        self.posture.observe_control_window(sub, &resolved);
        let canonical = resolved
            .identity
            .as_ref()
            .map_or(sub, |i| i.subject.as_str());
        // The subject-on-device key is only needed when session revocations exist.
        let pair = device
            .filter(|_| self.posture.snapshot().has_session_revocations())
            .map(|d| format!("{canonical}|{d}"));
        let mut sessions: Vec<&str> = Vec::with_capacity(3);
        sessions.extend(t.claims.jti.as_deref());
        sessions.extend(t.claims.sid.as_deref());
        sessions.extend(pair.as_deref());
        let verdict = if lifecycle_baseline {
            self.posture
                .baseline(sub, &resolved, t.claims.iat, &sessions)
        } else {
            self.posture
                .revocations(sub, &resolved, t.claims.iat, &sessions)
        };
        match verdict {
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
        use crate::policy::{Action, MethodClass, PolicyRefusal, facts::RequestFacts};
        let method = req.method();
        let (Some(auth), Some(resolved)) = (&ctx.auth, &ctx.resolved) else {
            return Err(Denial::Internal);
        };
        let t = &auth.token;
        let now = crate::util::now_unix();
        let owner = resolved
            .identity
            .as_ref()
            .filter(|i| i.kind == crate::posture::model::IdentityKind::Workload)
            .and_then(|i| i.owner.as_deref())
            .and_then(|o| self.posture.snapshot().identity(o));
        let class = MethodClass::of(method);
        let peer = conn.peer.ip();
        let spiffe = ctx
            .binding
            .as_ref()
            .and_then(|b| b.workload.as_ref())
            .map(|w| w.to_string());
        let facts = RequestFacts {
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
            binding: binding_kind(ctx),
            spiffe_id: spiffe.as_deref(),
        };
        let out = engine.decide(&facts, now);
        if out.cache_hit {
            self.metrics.policy_cache_hits.inc();
        } else {
            self.metrics.policy_cache_misses.inc();
        }
        let d = &out.decision;
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
                self.record_revocation(d, &t.claims, resolved).await;
                Err(PolicyRefusal::Revoked { reason: reason() })
            }
        };
        let diverged = out.shadow.as_ref().filter(|s| s.action != d.action);
        if let Some(s) = diverged {
            self.metrics
                .policy_shadow_divergences
                .get_or_create(&crate::telemetry::ShadowLabel {
                    enforced: d.action.as_str(),
                    shadow: s.action.as_str(),
                })
                .inc();
        }
        if let Some(sink) = &engine.audit
            && sink.wants(d.action, diverged.is_some())
        {
            let now_ms = crate::util::now_unix_ms();
            sink.log(crate::policy::audit::AuditRecord {
                time: crate::policy::audit::rfc3339(now_ms),
                time_ms: now_ms,
                host: request_host(req).unwrap_or("").to_owned(),
                path: req.uri().path().to_owned(),
                trace_id: ctx.trace.as_ref().map(|t| t.trace_id()),
                request_id: ctx.id.clone(),
                principal: format!(
                    "{}:{}",
                    match out.inputs.principal.kind {
                        crate::policy::facts::PrincipalKind::User => "user",
                        crate::policy::facts::PrincipalKind::Workload => "workload",
                    },
                    out.inputs.principal.id
                ),
                device: out.inputs.device.id.clone(),
                route: route.name.clone(),
                method: method.to_string(),
                action: d.action,
                enforced: if verdict.is_ok() {
                    "forwarded"
                } else {
                    "refused"
                },
                policy_ids: d.policy_ids.clone(),
                reasons: d.reasons.clone(),
                decision: d.clone(),
                snapshot_version: resolved.snapshot_version,
                policy_version: engine.set.version.clone(),
                cache_hit: out.cache_hit,
                shadow: diverged.map(|s| crate::policy::audit::ShadowRecord {
                    policy_version: engine
                        .shadow
                        .as_ref()
                        .map_or_else(String::new, |x| x.version.clone()),
                    decision: s.clone(),
                }),
                inputs: out.inputs.clone(),
            });
        }
        ctx.decision = Some(out.decision.clone());
        verdict.map_err(Denial::Policy)
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
    /// hands `Upgrade` connections (WebSocket) over to a byte pump.
    async fn phase_forward(
        &self,
        _rt: &Runtime,
        ctx: &RequestCtx,
        route: &Route,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Denial> {
        let upgrade =
            headers::upgrade_protocol(req.headers()).filter(|_| req.version() == Version::HTTP_11);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let limit = route.max_body_bytes;
        if let (Some(limit), Some(len)) = (limit, content_length(&req))
            && len > limit
        {
            return Err(Denial::BodyTooLarge { limit });
        }
        let (mut parts, body) = req.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(proto) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto.clone());
        }
        let body: ProxyBody = match limit {
            Some(l) => Limited::new(body, l as usize).boxed_unsync(),
            None => body
                .map_err(|e| Box::new(e) as client::BoxError)
                .boxed_unsync(),
        };
        let span = ctx
            .trace
            .as_ref()
            .map(|t| t.upstream(&parts.method, &parts.uri, &mut parts.headers));
        let up_req = Request::from_parts(parts, body);
        let started = Instant::now();
        let result = tokio::time::timeout(route.timeout, rt_upstream(_rt).request(up_req)).await;
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
        let mut resp = match result {
            Err(_) => return Err(Denial::UpstreamTimeout),
            Ok(Err(e)) => {
                if is_body_limit(&e) {
                    return Err(Denial::BodyTooLarge {
                        limit: limit.unwrap_or(0),
                    });
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
            let id = ctx.id.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            tracing::debug!(request_id = %id, error = %e, "upgraded connection closed");
                        }
                    }
                    Err(e) => tracing::debug!(request_id = %id, error = %e, "upgrade failed"),
                }
            });
            let (parts, _) = resp.into_parts();
            let mut out = Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            );
            set_request_id(out.headers_mut(), &ctx.id);
            return Ok(out);
        }
        let (mut parts, body) = resp.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        set_request_id(&mut parts.headers, &ctx.id);
        let body = body
            .map_err(|e| Box::new(e) as client::BoxError)
            .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }

    /// Phase 7: metrics and the access line.
    fn record(
        &self,
        ctx: &RequestCtx,
        method: &http::Method,
        path: &str,
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
            elapsed_us = ctx.started.elapsed().as_micros() as u64,
            "request"
        );
    }
}

/// The token binding phase 3 verified: `none`, `mtls` or `dpop`.
fn binding_kind(ctx: &RequestCtx) -> &'static str {
    ctx.binding.as_ref().map_or("none", |b| b.kind.as_str())
}

fn rt_upstream(rt: &Runtime) -> &client::UpstreamClient {
    &rt.upstream
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
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

fn set_request_id(h: &mut http::HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(set_headers::REQUEST_ID, v);
    }
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
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
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
    let now = crate::util::now_unix();
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
    let host = request_host(req).unwrap_or("");
    rt.routes
        .lookup(host, req.uri().path())
        .cloned()
        .ok_or(Denial::NoRoute)
}

/// Rewrites the request for the upstream: URI, identity headers out,
/// forwarding and verified-identity headers in, version for the pool.
fn prepare_upstream_request<B>(
    rt: &Runtime,
    ctx: &RequestCtx,
    route: &Route,
    req: &mut Request<B>,
    conn: &ConnInfo,
) -> Result<(), Denial> {
    let original_host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut pq = String::with_capacity(route.upstream_base_path.len() + path_and_query.len());
    pq.push_str(&route.upstream_base_path);
    pq.push_str(path_and_query);
    let mut parts = route.upstream.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| Denial::BadRequest("request target is not a valid path"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Denial::Internal)?;
    *req.version_mut() = Version::HTTP_11;

    let h = req.headers_mut();
    headers::strip_identity(h, &rt.stripped);
    h.remove(header::HOST);
    if !rt.config.proxy.forward_authorization {
        h.remove(header::AUTHORIZATION);
        h.remove("dpop");
    }
    let proto = if conn.tls.is_some() { "https" } else { "http" };
    headers::set_forwarded(h, conn.peer.ip(), proto, original_host.as_deref());
    set_request_id(h, &ctx.id);
    if let Ok(v) = HeaderValue::from_str(&route.name) {
        h.insert(set_headers::ROUTE, v);
    }
    if let Some(a) = &ctx.auth {
        let t = &a.token;
        if let Ok(v) = HeaderValue::from_str(&t.claims.sub) {
            h.insert(set_headers::SUBJECT, v);
        }
        if let Ok(v) = HeaderValue::from_str(&t.issuer.cfg.name) {
            h.insert(set_headers::ISSUER, v);
        }
        if let Some(Ok(v)) = t.device.as_deref().map(HeaderValue::from_str) {
            h.insert(set_headers::DEVICE, v);
        }
    }
    if let Some(b) = &ctx.binding {
        h.insert(
            set_headers::BINDING,
            HeaderValue::from_static(b.kind.as_str()),
        );
        if let Some(Ok(v)) = b.device.as_deref().map(HeaderValue::from_str) {
            if !h.contains_key(set_headers::DEVICE) {
                h.insert(set_headers::DEVICE, v.clone());
            }
            h.insert(set_headers::VERIFIED_DEVICE, v);
        }
        if let Some(Ok(v)) = b
            .workload
            .as_ref()
            .map(|w| HeaderValue::from_str(&w.to_string()))
        {
            h.insert(set_headers::WORKLOAD, v);
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
            h.insert(
                set_headers::DEVICE_COMPLIANCE,
                HeaderValue::from_static(compliance),
            );
            h.insert(
                set_headers::DEVICE_LIFECYCLE,
                HeaderValue::from_static(lifecycle),
            );
        }
        h.insert(set_headers::SNAPSHOT, HeaderValue::from(r.snapshot_version));
    }
    if let Some(d) = &ctx.decision {
        h.insert(
            set_headers::DECISION,
            HeaderValue::from_static(d.action.as_str()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("app.example:8443"), "app.example");
        assert_eq!(strip_port("app.example"), "app.example");
        assert_eq!(strip_port("[::1]:8443"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }
}
