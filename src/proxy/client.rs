//! The upstream client: HTTP/1.1 connections over rustls (or plain TCP),
//! pooled per proxy worker thread, with connect and idle limits from config.
//!
//! Each worker has its own pool (see `server.rs`), so a request and its
//! upstream connection stay on the thread that accepted the client: no
//! cross-thread wakeup per request. The pool is hyper's connection-level
//! client (`client::conn::http1`) under a small idle list of our own rather
//! than hyper-util's general client, for three reasons measured under load:
//! - a connection goes back to the idle list the moment its response body
//!   ends, in the request's own task; hyper-util's pool returns it from a
//!   task spawned per request, and a request arriving in between opened a
//!   new upstream connection (about 80 per 10 s at 50 client connections);
//! - it never races a connect against an idle connection being returned, so
//!   the steady state opens no upstream connection;
//! - per request there is no hash map, no spawned task and no boxed future.
//!
//! The common request, a `GET` or `HEAD` with no body, does not go through
//! hyper's client at all: the pool writes its head and reads the answer in
//! the request's own task ([`super::wire`]), on connections of its own
//! queue; hyper's connection task was a quarter of a request's
//! instructions. Both queues of an upstream share one idle bound.
//!
//! A connection is taken most-recently-used first (warm, and the stale ones
//! age out at the front). One whose request could not be written (the
//! upstream closed it while idle) is retried once on a new connection, as
//! hyper-util does; so is a bodiless GET or HEAD on a reused connection
//! that closed before any byte of an answer (idempotent, RFC 9110 §9.2.2).
//! Any other request that reached the upstream is never retried.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use super::headers::SetHeaders;
use super::wire::{self, WireError};
use crate::config::UpstreamConfig;
use crate::telemetry::ReasonLabel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type flowing through the proxy in both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty [`ProxyBody`]: a zero-sized type, so boxing it allocates nothing.
pub fn empty_body() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|n| match n {})
        .boxed_unsync()
}

/// The connector every upstream connection is opened with.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The stream of a connection the pool drives itself ([`wire`]): the
/// connector's (TCP, or TLS over it) behind tokio's I/O traits, boxed once
/// per connection so that moving it in and out of the pool and into a
/// response body moves a pointer, not a TLS session.
type WireIo = Box<hyper_util::rt::TokioIo<<Connector as Service<Uri>>::Response>>;
type WireConn = wire::Conn<WireIo>;

/// How long an idle upstream connection is kept. Counted from the pool's
/// last prune before it went idle and enforced by the next prune (each
/// worker's 1 s tick): it closes after 89 to 91 s idle, with no clock read
/// per request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream pool per proxy worker thread, plus one for every other thread
/// (requests are served on the workers; the shared pool, never pruned by a
/// tick, drops only connections the upstream closed).
#[derive(Debug, Clone)]
pub struct UpstreamPools {
    shared: Pool,
    workers: Box<[Pool]>,
}

impl UpstreamPools {
    /// Pools for `workers` worker threads (and one shared by the rest).
    /// New connections are counted in `opened` (by reason), when given.
    pub fn new(
        cfg: &UpstreamConfig,
        workers: usize,
        opened: Option<&Family<ReasonLabel, Counter>>,
    ) -> Result<Self, crate::tls::TlsError> {
        let conn = connector(cfg)?;
        let counters = opened.map(|f| {
            let c = |reason| f.get_or_create(&ReasonLabel { reason }).clone();
            Opened {
                none_idle: c("none_idle"),
                all_busy: c("all_busy"),
                closed: c("closed"),
            }
        });
        Ok(Self {
            shared: Pool::new(cfg, conn.clone(), counters.clone()),
            workers: (0..workers)
                .map(|_| Pool::new(cfg, conn.clone(), counters.clone()))
                .collect(),
        })
    }

    /// How many worker pools there are.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The pool of the calling thread. Its connections' tasks run on the
    /// runtime that opened them, which for a worker is its own.
    pub fn here(&self) -> &Pool {
        crate::util::worker::current()
            .and_then(|w| self.workers.get(w))
            .unwrap_or(&self.shared)
    }
}

/// Checks what the pools would be built from (the `[upstream] ca` bundle),
/// for `portcullis check`.
pub fn check(cfg: &UpstreamConfig) -> Result<(), crate::tls::TlsError> {
    connector(cfg).map(drop)
}

fn connector(cfg: &UpstreamConfig) -> Result<Connector, crate::tls::TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = &cfg.ca {
        roots.extend(crate::tls::load_roots(&[ca])?.roots);
    }
    Ok(crate::tls::outbound::https_connector(
        roots,
        Duration::from_millis(cfg.connect_timeout_ms),
    ))
}

/// Why an upstream request failed. Its source chain carries the body's own
/// error when the request body failed (size limit, malformed chunk).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The request URI has no scheme or authority.
    #[error("upstream request URI is not absolute")]
    NotAbsolute,
    /// Connecting (TCP, TLS) failed.
    #[error("upstream connect: {0}")]
    Connect(#[source] BoxError),
    /// The HTTP exchange failed.
    #[error("upstream: {0}")]
    Http(#[source] hyper::Error),
    /// The HTTP exchange of a bodiless GET or HEAD failed.
    #[error("upstream: {0}")]
    Wire(#[source] WireError),
}

/// One worker's upstream connections: idle HTTP/1.1 connections per
/// upstream (scheme and authority), most recently used at the back.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("max_idle", &self.inner.max_idle)
            .finish_non_exhaustive()
    }
}

struct PoolInner {
    connector: Connector,
    max_idle: usize,
    state: Mutex<State>,
    opened: Option<Opened>,
}

/// Counters of new connections, by why no pooled one was used: the pool had
/// none idle; every idle one was still busy (a response ended before its
/// request body did); the one taken had been closed by the upstream.
#[derive(Clone)]
struct Opened {
    none_idle: Counter,
    all_busy: Counter,
    closed: Counter,
}

struct State {
    /// A handful of upstreams at most: a linear scan beats hashing.
    hosts: Vec<Host>,
    /// When [`Pool::prune`] last ran (creation, before the first): the
    /// idle time of a connection checked in since counts from here.
    pruned: Instant,
}

struct Host {
    scheme: Scheme,
    authority: Authority,
    /// `Host` header for this upstream (port only when not the default).
    host_header: HeaderValue,
    idle: VecDeque<Idle>,
    /// Idle connections for bodiless GET and HEAD requests ([`wire`]).
    wired: VecDeque<WireIdle>,
}

impl Host {
    /// Closes the least recently used idle connections, of either kind,
    /// until one more fits under `max_idle` (the bound is for the upstream,
    /// not per queue); false when none may be kept at all.
    fn make_room(&mut self, max_idle: usize) -> bool {
        while self.idle.len() + self.wired.len() >= max_idle.max(1) {
            let oldest_wired = self.wired.front().map(|w| w.since);
            let oldest_idle = self.idle.front().map(|i| i.since);
            match (oldest_idle, oldest_wired) {
                (Some(i), Some(w)) if i <= w => drop(self.idle.pop_front()),
                (_, Some(_)) => drop(self.wired.pop_front()),
                (Some(_), None) => drop(self.idle.pop_front()),
                (None, None) => break,
            }
        }
        max_idle > 0
    }
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    /// The pool's last prune before this connection went idle.
    since: Instant,
}

struct WireIdle {
    conn: WireConn,
    /// As [`Idle::since`].
    since: Instant,
}

/// Identifies one upstream within a pool: index into `hosts` (never removed).
#[derive(Clone, Copy)]
struct HostId(usize);

impl Pool {
    fn new(cfg: &UpstreamConfig, connector: Connector, opened: Option<Opened>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                connector,
                max_idle: cfg.pool_idle_per_host,
                state: Mutex::new(State {
                    hosts: Vec::new(),
                    pruned: Instant::now(),
                }),
                opened,
            }),
        }
    }

    fn count_opened(&self, which: impl Fn(&Opened) -> &Counter) {
        if let Some(o) = &self.inner.opened {
            which(o).inc();
        }
    }

    /// Sends `req` (absolute URI: scheme and authority pick the upstream,
    /// whose authority replaces any `Host` it has) on an idle connection or
    /// a new one; the connection goes back to the pool
    /// when the response body has been read to its end.
    ///
    /// `set` are the lines the proxy adds: the pool's own leg writes them
    /// after the request's headers, hyper's leg gets them in the map.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps each argument once; an async fn, twice (see `Proxy::handle`)"
    )]
    pub fn request(
        &self,
        mut req: Request<ProxyBody>,
        set: SetHeaders,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
        async move {
            let (scheme, authority) = match (req.uri().scheme(), req.uri().authority()) {
                (Some(s), Some(a)) => (s.clone(), a.clone()),
                _ => return Err(UpstreamError::NotAbsolute),
            };
            if wire_eligible(&req) {
                return self.request_wire(req, &set, &scheme, &authority).await;
            }
            set.into_map(req.headers_mut());
            let (host, host_header, idle, busy) = self.checkout(&scheme, &authority);
            // The upstream's own `Host`, replacing the client's (one lookup).
            req.headers_mut().insert(header::HOST, host_header);
            // Origin form on the wire; the authority is in `Host`.
            let target = Uri::from(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            *req.uri_mut() = target;

            match idle {
                Some(mut sender) => {
                    // Ready (checked at checkout); `ready` only registers nothing.
                    if sender.ready().await.is_ok() {
                        match sender.try_send_request(req).await {
                            Ok(resp) => return Ok(self.wrap(host, sender, resp)),
                            Err(mut e) => match e.take_message() {
                                // Never written: the upstream had closed the
                                // connection. Retried once on a new one below.
                                Some(back) => req = back,
                                None => return Err(UpstreamError::Http(e.into_error())),
                            },
                        }
                    }
                    self.count_opened(|o| &o.closed);
                }
                None if busy => self.count_opened(|o| &o.all_busy),
                None => self.count_opened(|o| &o.none_idle),
            }
            // Boxed: connecting is rare, and its state would otherwise be part
            // of every request's future.
            let mut sender = Box::pin(self.connect(&scheme, &authority)).await?;
            match sender.send_request(req).await {
                Ok(resp) => Ok(self.wrap(host, sender, resp)),
                Err(e) => Err(UpstreamError::Http(e)),
            }
        }
    }

    /// A bodiless GET or HEAD ([`wire_eligible`]), exchanged by the pool
    /// itself in this task ([`wire`]). A reused connection that fails
    /// before any byte of an answer is replaced once by a new one: most
    /// often the upstream closed it while idle (one whose close had
    /// already arrived is dropped at checkout), but the upstream may also
    /// have read the request and failed without a word. The request is
    /// idempotent and has no body, so it is sent once more (RFC 9110
    /// §9.2.2), as nginx's default `proxy_next_upstream error` does;
    /// hyper's leg retries only a request it never wrote.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async block keeps each argument once; an async fn, twice (see `Proxy::handle`)"
    )]
    fn request_wire(
        &self,
        req: Request<ProxyBody>,
        set: &SetHeaders,
        scheme: &Scheme,
        authority: &Authority,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> {
        async move {
            let (host, host_header, idle, stale) = self.checkout_wire(scheme, authority);
            let (mut parts, _) = req.into_parts();
            // The upstream's own `Host`, replacing the client's (one lookup).
            parts.headers.insert(header::HOST, host_header);
            // Origin form on the wire; the authority is in `Host`.
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let reused = idle.is_some();
            let mut conn = match idle {
                Some(c) => c,
                None => {
                    self.count_opened(|o| if stale { &o.closed } else { &o.none_idle });
                    Box::pin(self.connect_wire(scheme, authority)).await?
                }
            };
            let head = match conn
                .exchange(&parts.method, target, &parts.headers, set.lines())
                .await
            {
                Ok(head) => head,
                Err(WireError::Unanswered(_)) if reused => {
                    self.count_opened(|o| &o.closed);
                    conn = Box::pin(self.connect_wire(scheme, authority)).await?;
                    conn.exchange(&parts.method, target, &parts.headers, set.lines())
                        .await
                        .map_err(UpstreamError::Wire)?
                }
                Err(e) => return Err(UpstreamError::Wire(e)),
            };
            let (body, back) = conn.body(&head);
            let body = UpstreamBody {
                inner: Inner::Wire {
                    body,
                    back: back.is_none().then(|| (Arc::downgrade(&self.inner), host)),
                },
            };
            if let Some(conn) = back {
                self.checkin_wire(host, conn);
            }
            let mut resp = Response::new(body);
            *resp.status_mut() = head.status;
            *resp.version_mut() = head.version;
            *resp.headers_mut() = head.headers;
            if let Some(reason) = head.reason {
                resp.extensions_mut().insert(reason);
            }
            Ok(resp)
        }
    }

    /// Closes idle connections unused for longer than the idle timeout,
    /// and those the upstream closed. Each worker's tick calls it.
    pub fn prune(&self) {
        let now = Instant::now();
        let mut state = self.state();
        state.pruned = now;
        for h in state.hosts.iter_mut() {
            h.idle
                .retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            h.wired
                .retain_mut(|i| now.duration_since(i.since) < IDLE_TIMEOUT && !i.conn.is_closed());
        }
    }

    /// The upstream's slot.
    fn host_slot<'a>(
        hosts: &'a mut Vec<Host>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> (usize, Option<&'a mut Host>) {
        let i = match hosts
            .iter()
            .position(|h| h.authority == *authority && h.scheme == *scheme)
        {
            Some(i) => i,
            None => {
                hosts.push(Host {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    host_header: host_header(scheme, authority),
                    idle: VecDeque::new(),
                    wired: VecDeque::new(),
                });
                hosts.len() - 1
            }
        };
        (i, hosts.get_mut(i))
    }

    /// The upstream's slot, its `Host` value, its most recently used idle
    /// connection for [`Pool::request_wire`] that is still quiet, if any,
    /// and whether one that was not (closed, or sent bytes nobody asked
    /// for) was dropped on the way. Nothing reads an idle connection: an
    /// answer the upstream sends while it is idle (hyper's connection task
    /// would see it and close) would otherwise be taken for the answer to
    /// the next request. The check is the runtime's readiness flag, a
    /// syscall only when the socket has news.
    fn checkout_wire(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> (HostId, HeaderValue, Option<WireConn>, bool) {
        let mut state = self.state();
        match Self::host_slot(&mut state.hosts, scheme, authority) {
            (i, Some(h)) => {
                let mut stale = false;
                let mut found = None;
                while let Some(mut idle) = h.wired.pop_back() {
                    if idle.conn.is_closed() {
                        stale = true;
                    } else {
                        found = Some(idle.conn);
                        break;
                    }
                }
                (HostId(i), h.host_header.clone(), found, stale)
            }
            (i, None) => (HostId(i), HeaderValue::from_static(""), None, false),
        }
    }

    fn checkin_wire(&self, host: HostId, conn: WireConn) {
        let mut state = self.state();
        let since = state.pruned;
        if let Some(h) = state.hosts.get_mut(host.0)
            && h.make_room(self.inner.max_idle)
        {
            h.wired.push_back(WireIdle { conn, since });
        }
    }

    async fn connect_wire(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<WireConn, UpstreamError> {
        let io = self.open(scheme, authority).await?;
        Ok(wire::Conn::new(Box::new(hyper_util::rt::TokioIo::new(io))))
    }

    /// A new connection to the upstream (TCP, and TLS for https), through
    /// the connector and its connect timeout.
    async fn open(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<<Connector as Service<Uri>>::Response, UpstreamError> {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        let mut connector = self.inner.connector.clone();
        connector.call(uri).await.map_err(UpstreamError::Connect)
    }

    /// The upstream's slot, its `Host` value, its most recently used idle
    /// connection that is still open and ready, if any, and whether open
    /// but busy ones were passed over.
    fn checkout(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> (HostId, HeaderValue, Option<SendRequest<ProxyBody>>, bool) {
        let mut state = self.state();
        let (i, h) = Self::host_slot(&mut state.hosts, scheme, authority);
        let Some(h) = h else {
            return (HostId(i), HeaderValue::from_static(""), None, false);
        };
        let mut found = None;
        // Open but busy connections (the upstream answered before the
        // request body was all sent, and the body is still streaming):
        // kept for later, never waited on by an unrelated request.
        let mut busy = Vec::new();
        while let Some(idle) = h.idle.pop_back() {
            if idle.sender.is_closed() {
                continue;
            }
            if !idle.sender.is_ready() {
                busy.push(idle);
                continue;
            }
            found = Some(idle.sender);
            break;
        }
        let passed_busy = !busy.is_empty();
        for b in busy {
            h.idle.push_front(b);
        }
        (HostId(i), h.host_header.clone(), found, passed_busy)
    }

    fn checkin(&self, host: HostId, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.state();
        let since = state.pruned;
        if let Some(h) = state.hosts.get_mut(host.0)
            && h.make_room(self.inner.max_idle)
        {
            h.idle.push_back(Idle { sender, since });
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn connect(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let io = self.open(scheme, authority).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Http)?;
        // Runs on the calling thread's runtime (a worker's own).
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// The response with a body that checks the connection back in at its end.
    fn wrap(
        &self,
        host: HostId,
        sender: SendRequest<ProxyBody>,
        resp: Response<Incoming>,
    ) -> Response<UpstreamBody> {
        // An upgraded connection belongs to its tunnel; one the upstream
        // closes is not reused.
        let mut reusable = resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && !super::headers::connection_has(resp.headers(), "close");
        let (mut parts, body) = resp.into_parts();
        // hyper decodes the transfer coding but keeps a `Content-Length`
        // sent beside it, which the client would then be framed by (a
        // complete-looking, cut body). The coding wins (RFC 9112 §6.3), the
        // length goes, and a connection that sent both is not reused.
        if parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.remove(header::CONTENT_LENGTH).is_some()
        {
            reusable = false;
        }
        let mut body = UpstreamBody {
            inner: Inner::Hyper {
                body,
                back: reusable.then(|| (Arc::downgrade(&self.inner), host, sender)),
            },
        };
        if body.is_end_stream() {
            body.check_in();
        }
        Response::from_parts(parts, body)
    }
}

/// `Host` for an upstream: the authority, without the scheme's default port.
fn host_header(scheme: &Scheme, authority: &Authority) -> HeaderValue {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let text = match authority.port_u16() {
        Some(p) if p != default_port => authority.as_str().to_owned(),
        _ => authority.host().to_owned(),
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether the pool exchanges `req` itself ([`wire`]): a `GET` or `HEAD`
/// with no body and no framing or upgrade header. Everything else goes
/// through hyper's client.
fn wire_eligible(req: &Request<ProxyBody>) -> bool {
    // One pass over the request's few names (standard ones compare as
    // numbers) instead of three hashed lookups.
    (req.method() == http::Method::GET || req.method() == http::Method::HEAD)
        && req.body().is_end_stream()
        && !req.headers().keys().any(|k| {
            k == header::CONTENT_LENGTH || k == header::TRANSFER_ENCODING || k == header::UPGRADE
        })
}

/// An upstream response body that returns its connection to the pool once
/// read to the end. Dropped earlier, the connection is dropped too (hyper
/// closes a connection whose response was not read through).
pub struct UpstreamBody {
    inner: Inner,
}

enum Inner {
    /// Through hyper's client.
    Hyper {
        body: Incoming,
        back: Option<(Weak<PoolInner>, HostId, SendRequest<ProxyBody>)>,
    },
    /// Read by the pool itself; `back` is where its connection goes once
    /// the body has ended cleanly (none when it went back already).
    Wire {
        body: wire::WireBody<WireIo>,
        back: Option<(Weak<PoolInner>, HostId)>,
    },
}

impl UpstreamBody {
    fn check_in(&mut self) {
        match &mut self.inner {
            Inner::Hyper { back, .. } => {
                if let Some((pool, host, sender)) = back.take()
                    && let Some(inner) = pool.upgrade()
                {
                    Pool { inner }.checkin(host, sender);
                }
            }
            Inner::Wire { body, back } => {
                if let Some(conn) = body.take_idle()
                    && let Some((pool, host)) = back.take()
                    && let Some(inner) = pool.upgrade()
                {
                    Pool { inner }.checkin_wire(host, conn);
                }
            }
        }
    }

    fn drop_connection(&mut self) {
        match &mut self.inner {
            Inner::Hyper { back, .. } => *back = None,
            Inner::Wire { back, .. } => *back = None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Hyper { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Inner::Wire { body, .. } => body.poll_frame(cx).map_err(|e| Box::new(e) as BoxError),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                // hyper's server stops polling once the body says it has
                // ended, or once it has the trailers (always last), so the
                // end is caught here, not only at `None`.
                if frame.is_trailers() || this.is_end_stream() {
                    this.check_in();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.check_in();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.drop_connection();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Wire { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Wire { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reads_the_upstream_ca() {
        let mut cfg = UpstreamConfig::default();
        assert!(check(&cfg).is_ok(), "web PKI roots only");
        cfg.ca = Some(std::path::PathBuf::from(
            "/nonexistent/portcullis-upstream-ca.pem",
        ));
        assert!(check(&cfg).is_err(), "a CA bundle that cannot be read");
    }

    #[test]
    fn host_header_omits_default_ports() {
        let h = |s: Scheme, a: &str| {
            host_header(
                &s,
                &a.parse().unwrap_or_else(|_| Authority::from_static("x")),
            )
        };
        assert_eq!(h(Scheme::HTTP, "app:80"), "app");
        assert_eq!(h(Scheme::HTTP, "app:8080"), "app:8080");
        assert_eq!(h(Scheme::HTTPS, "app:443"), "app");
        assert_eq!(h(Scheme::HTTPS, "app:80"), "app:80");
        assert_eq!(h(Scheme::HTTP, "[::1]:9000"), "[::1]:9000");
        assert_eq!(h(Scheme::HTTP, "app"), "app");
    }
}
