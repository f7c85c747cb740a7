//! Live connections: a WebSocket (or other upgrade) tunnel, or a response
//! still streaming (SSE, a long download, a long h2 stream), outlives the
//! request that was decided when it arrived. Each one is registered here with
//! the facts of that request, re-decided whenever its subject, device or
//! session changes (posture change notices), at `proxy.live_redecide_interval_s`,
//! and when its token, client certificate or session cap runs out — and cut
//! when the answer is no longer "forward":
//!
//! - a streamed response's body ends with an error: hyper resets the h2
//!   stream (`RST_STREAM`) or closes the h1 connection; dropping the upstream
//!   body drops the upstream connection too;
//! - a WebSocket tunnel finishes the frame in flight in each direction, sends
//!   close 1008 (policy violation) to both sides (masked toward the upstream,
//!   RFC 6455 §5.3), waits briefly for their close replies, then closes both;
//!   other upgraded protocols are closed both ways.
//!
//! Costs: a response registers only when its body first has nothing ready
//! (it really is streaming); a fully buffered response never touches the
//! registry. Registration locks one of [`SHARDS`] small maps; everything else
//! (matching changes, re-deciding) runs on one background task.
//!
//! This room never decides by itself: a re-decision is phases 4 and 5 of
//! `proxy/mod.rs` run again ([`Proxy::posture_verdict`], [`Proxy::evaluate`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, broadcast, watch};

use super::client::BoxError;
use super::{ConnInfo, Proxy, RequestCtx};
use crate::authn::VerifiedToken;
use crate::binding::Binding;
use crate::policy::{Action, MethodClass};
use crate::posture::notify::Changed;
use crate::posture::{Resolved, Snapshot};
use crate::route::Route;
use crate::telemetry::{CutLabel, LiveKindLabel, Metrics};

/// Shards of the registry; a registration locks one of them, briefly.
pub const SHARDS: usize = 32;
/// How long a cut tunnel gets to finish the frame in flight, send its close
/// frames and hear the peers' replies before both sides are dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// WebSocket close code 1008, policy violation (RFC 6455 §7.4.1).
pub const WS_POLICY_VIOLATION: u16 = 1008;
/// Bytes read at once by each direction of a tunnel.
const PUMP_BUF: usize = 8 * 1024;

/// What kind of live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An upgraded connection (WebSocket or another protocol): its direction
    /// of data is unknown, so `restrict` ends it.
    Upgrade,
    /// A response whose body is still streaming.
    Stream,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Upgrade => "upgrade",
            Self::Stream => "stream",
        }
    }
}

/// The facts of the request that opened a live connection: what phases 4
/// and 5 need to decide it again.
#[derive(Debug)]
pub struct Seed {
    token: Arc<VerifiedToken>,
    route: Arc<Route>,
    binding: Option<Binding>,
    /// `context.session.binding` of a browser session (`None` for bearer tokens).
    session_binding: Option<&'static str>,
    /// The browser session's id hash: the connection ends with the session.
    session_hash: Option<String>,
    method: http::Method,
    peer: IpAddr,
    request_id: crate::util::RequestId,
    /// Snapshot version the request was decided on.
    decided_version: u64,
    /// First second at which the token or the client certificate no longer
    /// counts (`exp` + leeway, the certificate's `notAfter`).
    expires_s: u64,
    /// First second past the session cap of a `shorten` decision.
    capped_s: Option<u64>,
}

impl Seed {
    /// The facts of an authenticated request (`None` on public and
    /// workload-certificate routes: they have no subject to follow).
    pub fn new(ctx: &RequestCtx, method: &http::Method, conn: &ConnInfo) -> Option<Self> {
        let auth = ctx.auth.as_ref()?;
        let route = ctx.route.clone()?;
        let t = &auth.token;
        let cert = conn
            .tls
            .as_ref()
            .and_then(|t| t.peer.as_ref())
            .map(|p| u64::try_from(p.not_after).unwrap_or(0).saturating_add(1));
        let expires_s = t
            .claims
            .exp
            .saturating_add(t.issuer.cfg.leeway_s)
            .saturating_add(1)
            .min(cert.unwrap_or(u64::MAX));
        let capped_s = ctx
            .decision
            .as_ref()
            .filter(|d| d.action == Action::Shorten)
            .map(|d| cap_end(t, d.session_ttl_s));
        Some(Self {
            token: t.clone(),
            route,
            binding: ctx.binding.clone(),
            session_binding: ctx.session.as_ref().map(|s| s.record.binding.as_str()),
            session_hash: ctx.session.as_ref().map(|s| s.record.id_hash.clone()),
            method: method.clone(),
            peer: conn.peer.ip(),
            request_id: ctx.id.clone(),
            decided_version: ctx.resolved.as_ref().map_or(0, |r| r.snapshot_version),
            expires_s,
            capped_s,
        })
    }

    fn device(&self) -> Option<&str> {
        self.binding
            .as_ref()
            .and_then(|b| b.device.as_deref())
            .or(self.token.device.as_deref())
    }

    fn deadline(&self) -> u64 {
        self.capped_s
            .map_or(self.expires_s, |c| c.min(self.expires_s))
    }
}

/// First second past a `shorten` cap: issued (`iat`, else `auth_time`) + ttl.
/// A token that says neither when it was issued is past any cap.
fn cap_end(t: &VerifiedToken, ttl_s: Option<u64>) -> u64 {
    t.claims.iat.or(t.claims.auth_time).map_or(0, |i| {
        i.saturating_add(ttl_s.unwrap_or(0)).saturating_add(1)
    })
}

/// One registered live connection and its cut signal.
#[derive(Debug)]
pub struct Live {
    id: u64,
    kind: Kind,
    seed: Seed,
    /// The earliest second at which it must be decided again (expiry, cap).
    deadline_s: AtomicU64,
    reason: OnceLock<&'static str>,
    notify: Notify,
    waker: AtomicWaker,
}

impl Live {
    /// Why it was cut, once it was.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason.get().copied()
    }

    /// Cuts it (the first reason wins); true when this call cut it.
    fn cut(&self, reason: &'static str, metrics: &Metrics) -> bool {
        if self.reason.set(reason).is_err() {
            return false;
        }
        metrics
            .live_connections_cut
            .get_or_create(&CutLabel { reason })
            .inc();
        tracing::info!(
            request_id = %self.seed.request_id,
            route = %self.seed.route.name,
            kind = self.kind.as_str(),
            reason,
            "live connection cut"
        );
        self.notify.notify_waiters();
        self.waker.wake();
        true
    }

    /// Waits until it is cut; returns why.
    pub async fn cut_wait(&self) -> &'static str {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.reason() {
                return r;
            }
            notified.await;
        }
    }

    fn poll_cut(&self, cx: &mut Context<'_>) -> Poll<&'static str> {
        if let Some(r) = self.reason() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        match self.reason() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// True when a change notice may concern it (over-matching only costs a
    /// re-decision).
    fn touched_by(&self, c: &Changed) -> bool {
        let claims = &self.seed.token.claims;
        c.subjects.contains(&claims.sub)
            || self.seed.device().is_some_and(|d| c.devices.contains(d))
            || claims.jti.as_ref().is_some_and(|j| c.sessions.contains(j))
            || claims.sid.as_ref().is_some_and(|s| c.sessions.contains(s))
    }
}

/// One shard: live connections by registration id.
type Shard = Mutex<HashMap<u64, Arc<Live>>>;

/// Every live connection, by registration id, in [`SHARDS`] maps.
pub struct Registry {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    /// The smallest deadline of any entry (`u64::MAX`: none).
    earliest_s: AtomicU64,
    /// Entries registered after their state changed: the worker re-decides them.
    recheck: Mutex<Vec<Arc<Live>>>,
    /// Set when everything must be re-decided (policy reload).
    full: AtomicBool,
    wake: Notify,
    snapshot: Arc<Snapshot>,
    gauges: [Gauge; 2],
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry over the posture snapshot.
    pub fn new(snapshot: Arc<Snapshot>, metrics: &Metrics) -> Self {
        let gauge = |kind: Kind| {
            metrics
                .live_connections
                .get_or_create(&LiveKindLabel {
                    kind: kind.as_str(),
                })
                .clone()
        };
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            earliest_s: AtomicU64::new(u64::MAX),
            recheck: Mutex::default(),
            full: AtomicBool::new(false),
            wake: Notify::new(),
            gauges: [gauge(Kind::Upgrade), gauge(Kind::Stream)],
            snapshot,
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id as usize) % self.shards.len()]
    }

    fn gauge(&self, kind: Kind) -> &Gauge {
        &self.gauges[usize::from(kind == Kind::Stream)]
    }

    /// Registers a live connection; it stays registered while the returned
    /// guard lives.
    pub fn register(self: &Arc<Self>, seed: Seed, kind: Kind) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline = seed.deadline();
        let decided = seed.decided_version;
        let live = Arc::new(Live {
            id,
            kind,
            seed,
            deadline_s: AtomicU64::new(deadline),
            reason: OnceLock::new(),
            notify: Notify::new(),
            waker: AtomicWaker::new(),
        });
        if let Ok(mut m) = self.shard(id).lock() {
            m.insert(id, live.clone());
        }
        self.gauge(kind).inc();
        let mut wake = self.earliest_s.fetch_min(deadline, Ordering::AcqRel) > deadline;
        // INVARIANT: checked after the insert. A change published before it
        // raised the version (the writer publishes the version before the
        // notice), so either the worker's scan finds this entry or this
        // check sees the newer version; no change falls between the two.
        if self.snapshot.version() > decided {
            if let Ok(mut r) = self.recheck.lock() {
                r.push(live.clone());
            }
            wake = true;
        }
        if wake {
            self.wake.notify_one();
        }
        Registration {
            live,
            registry: self.clone(),
        }
    }

    /// Asks the worker to re-decide every live connection (policy reload).
    pub fn redecide_all_soon(&self) {
        self.full.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Live connections registered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    /// True when no live connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries `keep` selects, copied out shard by shard (no lock is held
    /// while they are re-decided).
    fn select(&self, keep: impl Fn(&Live) -> bool) -> Vec<Arc<Live>> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            if let Ok(m) = s.lock() {
                out.extend(m.values().filter(|l| keep(l)).cloned());
            }
        }
        out
    }
}

/// Keeps a live connection registered; unregisters it on drop.
#[derive(Debug)]
pub struct Registration {
    live: Arc<Live>,
    registry: Arc<Registry>,
}

impl Registration {
    /// The registered connection.
    pub fn live(&self) -> &Live {
        &self.live
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.shard(self.live.id).lock() {
            m.remove(&self.live.id);
        }
        self.registry.gauge(self.live.kind).dec();
    }
}

/// Why a streamed response ended early.
#[derive(Debug, thiserror::Error)]
#[error("live connection cut: {0}")]
pub struct CutError(pub &'static str);

// Inline on purpose: the body is boxed once already; boxing the seed would
// add an allocation per authenticated response.
#[allow(clippy::large_enum_variant)]
enum BodyState {
    /// Not registered yet: everything so far was ready at once. (Inline, not
    /// boxed: the body is boxed once already, so this costs no allocation.)
    Idle(Seed, Arc<Registry>),
    Live(Registration),
    Done,
}

pin_project_lite::pin_project! {
    /// A response body that registers as a live connection the first time it
    /// has nothing ready, and ends with [`CutError`] when a re-decision cuts it.
    pub struct LiveBody<B> {
        #[pin]
        inner: B,
        state: BodyState,
    }
}

impl<B> LiveBody<B> {
    /// Wraps a response body with the facts of its request.
    pub fn new(inner: B, seed: Seed, registry: Arc<Registry>) -> Self {
        Self {
            inner,
            state: BodyState::Idle(seed, registry),
        }
    }
}

impl<B> Body for LiveBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let BodyState::Live(reg) = this.state
            && let Poll::Ready(reason) = reg.live.poll_cut(cx)
        {
            *this.state = BodyState::Done;
            return Poll::Ready(Some(Err(Box::new(CutError(reason)))));
        }
        if matches!(this.state, BodyState::Done) {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Pending => {
                if matches!(this.state, BodyState::Idle(..))
                    && let BodyState::Idle(seed, registry) =
                        std::mem::replace(this.state, BodyState::Done)
                {
                    let reg = registry.register(seed, Kind::Stream);
                    let cut = reg.live.poll_cut(cx);
                    *this.state = BodyState::Live(reg);
                    if let Poll::Ready(reason) = cut {
                        *this.state = BodyState::Done;
                        return Poll::Ready(Some(Err(Box::new(CutError(reason)))));
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => *this.state = BodyState::Done,
            Poll::Ready(Some(Ok(_))) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Which way a tunnel direction writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    Client,
    Upstream,
}

/// Tracks WebSocket frame boundaries (RFC 6455 §5.2) in the bytes one
/// direction forwards, reading only frame headers: payloads, masking and
/// extension bits pass through untouched (so permessage-deflate and
/// fragmented messages keep working), and nothing is buffered.
#[derive(Debug, Default, Clone)]
pub struct FrameCursor {
    head: [u8; 14],
    have: usize,
    remaining: u64,
    close_seen: bool,
}

impl FrameCursor {
    /// True between frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// True once a close frame went by.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }

    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    /// Moves over `buf`; with `stop_at_boundary`, stops at the end of the
    /// frame in progress. Returns the bytes consumed.
    pub fn advance(&mut self, buf: &[u8], stop_at_boundary: bool) -> usize {
        let mut i = 0;
        while i < buf.len() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - i);
                self.remaining -= n as u64;
                i += n;
            } else {
                if self.have >= self.head.len() {
                    // INVARIANT: `have` never reaches the largest header's
                    // length without the header completing below.
                    self.have = 0;
                }
                self.head[self.have] = buf[i];
                self.have += 1;
                i += 1;
                if self.header_len() != Some(self.have) {
                    continue;
                }
                self.remaining = self.payload_len();
                self.have = 0;
                if self.head[0] & 0x0f == 0x8 {
                    self.close_seen = true;
                }
            }
            if stop_at_boundary && self.at_boundary() {
                break;
            }
        }
        i
    }
}

/// A close frame with code 1008 and `reason`, masked toward the upstream
/// (clients mask every frame, RFC 6455 §5.3). `None` when no masking key
/// could be drawn: the tunnel then closes without a frame.
fn close_frame(toward: Toward, reason: &str) -> Option<Vec<u8>> {
    let mut payload = WS_POLICY_VIOLATION.to_be_bytes().to_vec();
    // Control frames carry at most 125 bytes (RFC 6455 §5.5).
    payload.extend(reason.bytes().take(123));
    let len = u8::try_from(payload.len()).ok()?;
    match toward {
        Toward::Client => {
            let mut f = vec![0x88, len];
            f.extend_from_slice(&payload);
            Some(f)
        }
        Toward::Upstream => {
            let mut key = [0u8; 4];
            aws_lc_rs::rand::fill(&mut key).ok()?;
            let mut f = vec![0x88, 0x80 | len];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            Some(f)
        }
    }
}

/// Runs an upgraded connection between the client and the upstream: plain
/// byte copying when it is not registered, else two pumps that stop at a
/// cut (see the module docs).
pub async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    websocket: bool,
    registration: Option<Registration>,
    request_id: crate::util::RequestId,
) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(request_id = %request_id, error = %e, "upgrade failed");
            return;
        }
    };
    let mut c = TokioIo::new(c);
    let mut u = TokioIo::new(u);
    let Some(reg) = registration else {
        if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
            tracing::debug!(request_id = %request_id, error = %e, "upgraded connection closed");
        }
        return;
    };
    let live = reg.live();
    let (cr, cw) = tokio::io::split(c);
    let (ur, uw) = tokio::io::split(u);
    // Like `copy_bidirectional`: an EOF one way lets the other way go on
    // (half-close); an error either way ends both.
    let both = async {
        let up = pump(cr, uw, websocket, Toward::Upstream, live);
        let down = pump(ur, cw, websocket, Toward::Client, live);
        tokio::pin!(up, down);
        tokio::select! {
            r = &mut up => match r {
                Ok(()) => down.await,
                Err(e) => Err(e),
            },
            r = &mut down => match r {
                Ok(()) => up.await,
                Err(e) => Err(e),
            },
        }
    };
    let hard_stop = async {
        live.cut_wait().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        r = both => {
            if let Err(e) = r {
                tracing::debug!(request_id = %request_id, error = %e, "upgraded connection closed");
            }
        }
        () = hard_stop => {
            tracing::debug!(request_id = %request_id, "peers did not close in time after a cut");
        }
    }
}

/// One direction of a registered tunnel: copies `src` to `dst` until EOF
/// or a cut; on a cut, finishes the WebSocket frame in flight, sends close
/// 1008, and reads `src` until the peer's close frame (or EOF).
async fn pump<R, W>(
    mut src: R,
    mut dst: W,
    websocket: bool,
    toward: Toward,
    live: &Live,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PUMP_BUF];
    let mut frames = FrameCursor::default();
    let cut = live.cut_wait();
    tokio::pin!(cut);
    let reason = loop {
        let n = tokio::select! {
            biased;
            r = &mut cut => break r,
            r = src.read(&mut buf) => r?,
        };
        if n == 0 {
            return dst.shutdown().await;
        }
        if websocket {
            frames.advance(&buf[..n], false);
        }
        dst.write_all(&buf[..n]).await?;
        dst.flush().await?;
    };
    if !websocket {
        return dst.shutdown().await;
    }
    // The frame in flight was partly forwarded: finish it, so the close
    // frame starts at a frame boundary.
    while !frames.at_boundary() {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            return dst.shutdown().await;
        }
        let take = frames.advance(&buf[..n], true);
        dst.write_all(&buf[..take]).await?;
    }
    let already_closing = frames.close_seen();
    let text = format!("portcullis: {reason}");
    if let Some(f) = close_frame(toward, &text).filter(|_| !already_closing) {
        dst.write_all(&f).await?;
    }
    dst.flush().await?;
    dst.shutdown().await?;
    // Hear the peer's close reply, so closing does not reset the connection
    // under our close frame.
    while !(frames.close_seen() && frames.at_boundary()) {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        frames.advance(&buf[..n], false);
    }
    Ok(())
}

/// Follows posture changes, policy reloads, deadlines and the interval, and
/// re-decides the live connections they concern. Runs until shutdown.
pub async fn redecide_loop(proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let registry = proxy.live.clone();
    let mut changes = proxy.posture.changes();
    let interval = |p: &Proxy| {
        Duration::from_secs(
            p.runtime
                .load()
                .config
                .proxy
                .live_redecide_interval_s
                .max(1),
        )
    };
    let mut next_full = tokio::time::Instant::now() + interval(&proxy);
    loop {
        let earliest = registry.earliest_s.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + until_unix_s(earliest);
        tokio::select! {
            _ = shutdown.changed() => return,
            msg = changes.recv() => match msg {
                Ok(c) => {
                    let mut c = (*c).clone();
                    let mut lagged = false;
                    loop {
                        match changes.try_recv() {
                            Ok(more) => c.merge(&more),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                            Err(_) => break,
                        }
                    }
                    if lagged {
                        proxy.redecide(registry.select(|_| true)).await;
                    } else {
                        let c = expand(&proxy, c);
                        proxy.redecide(registry.select(|l| l.touched_by(&c))).await;
                    }
                }
                // Fail closed: a missed notice may have concerned anyone.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    proxy.redecide(registry.select(|_| true)).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = registry.wake.notified() => {
                if registry.full.swap(false, Ordering::AcqRel) {
                    proxy.redecide(registry.select(|_| true)).await;
                }
                let list = registry
                    .recheck
                    .lock()
                    .map(|mut r| std::mem::take(&mut *r))
                    .unwrap_or_default();
                proxy.redecide(list).await;
            }
            () = tokio::time::sleep_until(next_full.min(deadline)) => {
                if tokio::time::Instant::now() >= next_full {
                    next_full = tokio::time::Instant::now() + interval(&proxy);
                    registry.earliest_s.store(u64::MAX, Ordering::Release);
                    proxy.redecide(registry.select(|_| true)).await;
                } else {
                    let now = crate::util::now_unix();
                    // Recompute the earliest deadline over the entries not
                    // due now (and not already cut); those due get a new
                    // one from their re-decision.
                    registry.earliest_s.store(u64::MAX, Ordering::Release);
                    let due = registry.select(|l| {
                        if l.reason().is_some() {
                            return false;
                        }
                        let d = l.deadline_s.load(Ordering::Acquire);
                        if d <= now {
                            return true;
                        }
                        registry.earliest_s.fetch_min(d, Ordering::AcqRel);
                        false
                    });
                    proxy.redecide(due).await;
                }
            }
        }
    }
}

/// Time until a unix second (a day when there is none, or it passed long ago
/// the loop wakes at once).
fn until_unix_s(s: u64) -> Duration {
    if s == u64::MAX {
        return Duration::from_secs(86_400);
    }
    let now_ms = crate::util::now_unix_ms();
    Duration::from_millis(s.saturating_mul(1000).saturating_sub(now_ms))
}

/// Widens a change notice so matching on the token's own names is enough:
/// a changed subject also stands for its aliases; a subject-on-device
/// session (`subject|device`) for its subject and device.
fn expand(proxy: &Proxy, mut c: Changed) -> Changed {
    let snapshot = proxy.posture.snapshot();
    let mut aliases = HashSet::new();
    for s in &c.subjects {
        if let Some(i) = snapshot.identity(s) {
            aliases.insert(i.subject.clone());
            aliases.extend(i.aliases.iter().cloned());
        }
    }
    c.subjects.extend(aliases);
    let pairs: Vec<(String, String)> = c
        .sessions
        .iter()
        .filter_map(|s| s.split_once('|'))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    for (s, d) in pairs {
        c.subjects.insert(s);
        c.devices.insert(d);
    }
    c
}

impl Proxy {
    /// Re-decides live connections one by one and cuts those refused now.
    async fn redecide(&self, lives: Vec<Arc<Live>>) {
        for live in lives {
            if live.reason().is_some() {
                continue;
            }
            if let Some(reason) = self.redecide_one(&live).await {
                live.cut(reason, &self.metrics);
            }
        }
    }

    /// Phases 4 and 5 again, on the facts of the request that opened the
    /// connection and the snapshot and policy set of now. `None`: it may go on.
    async fn redecide_one(&self, live: &Live) -> Option<&'static str> {
        let s = &live.seed;
        let now = crate::util::now_unix();
        if now >= s.expires_s {
            return Some("expired");
        }
        // Logout, back-channel logout, a leaver's or a lost device's end:
        // the session record is gone, and so is what the connection rode on.
        if let Some(h) = &s.session_hash
            && self.posture.snapshot().session(h).is_none()
        {
            return Some("session_ended");
        }
        live.deadline_s.store(s.expires_s, Ordering::Release);
        self.live
            .earliest_s
            .fetch_min(s.expires_s, Ordering::AcqRel);
        let engine = self.policy.load();
        let resolved: Resolved = self.posture.resolve(&s.token.claims.sub, s.device());
        if let Err(p) = self.posture_verdict(&s.token, &resolved, engine.is_none()) {
            return Some(p.code());
        }
        let engine = engine?;
        let class = MethodClass::of(&s.method);
        let out = self.evaluate(
            &engine,
            &s.token,
            &resolved,
            &s.route,
            class,
            s.peer,
            s.binding.as_ref(),
            s.session_binding,
            now,
        );
        let d = &out.decided.decision;
        let cut = match d.action {
            Action::Allow => None,
            Action::Shorten => {
                let end = cap_end(&s.token, d.session_ttl_s);
                if now >= end {
                    Some("policy_shorten")
                } else {
                    live.deadline_s.fetch_min(end, Ordering::AcqRel);
                    self.live.earliest_s.fetch_min(end, Ordering::AcqRel);
                    None
                }
            }
            Action::Restrict if live.kind == Kind::Upgrade => Some("restrict_upgrade"),
            Action::Restrict if class == MethodClass::Read => None,
            Action::Restrict => Some("policy_restrict"),
            Action::StepUp => Some("policy_step_up"),
            Action::Deny => Some("policy_deny"),
            Action::Revoke => {
                self.record_revocation(d, &s.token.claims, &resolved).await;
                Some("policy_revoke")
            }
        };
        if cut.is_some() {
            self.audit(
                &engine,
                &out,
                None,
                &s.request_id,
                &s.route,
                &s.method,
                "cut",
                resolved.snapshot_version,
                || super::RequestPlace {
                    path: &s.route.path_prefix,
                    ..Default::default()
                },
            );
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(fin_op: u8, masked: bool, len: usize) -> Vec<u8> {
        let mut f = vec![fin_op];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xab, len));
        f
    }

    #[test]
    fn boundaries_are_found_in_any_split() {
        let mut stream = Vec::new();
        for (i, len) in [0usize, 5, 125, 126, 300, 65535, 65536, 70000]
            .iter()
            .enumerate()
        {
            stream.extend(frame(0x82, i % 2 == 0, *len));
        }
        stream.extend(frame(0x88, true, 2));
        for chunk in [1usize, 2, 3, 7, 13, 4096, stream.len()] {
            let mut c = FrameCursor::default();
            let mut at = Vec::new();
            let mut pos = 0;
            for piece in stream.chunks(chunk) {
                let mut off = 0;
                while off < piece.len() {
                    off += c.advance(&piece[off..], true);
                    if c.at_boundary() {
                        at.push(pos + off);
                    }
                }
                pos += piece.len();
            }
            assert!(c.at_boundary());
            assert!(c.close_seen());
            at.dedup();
            assert_eq!(at.len(), 9, "chunk {chunk}: {at:?}");
            assert_eq!(at.last().copied(), Some(stream.len()));
        }
    }

    #[test]
    fn stops_mid_stream_at_the_end_of_the_frame_in_flight() {
        let mut stream = frame(0x81, true, 10);
        let first = stream.len();
        stream.extend(frame(0x81, true, 10));
        let mut c = FrameCursor::default();
        assert_eq!(c.advance(&stream[..4], false), 4);
        assert!(!c.at_boundary());
        assert_eq!(c.advance(&stream[4..], true), first - 4);
        assert!(c.at_boundary());
        assert!(!c.close_seen());
    }

    #[test]
    fn close_frames_carry_1008_and_are_masked_toward_the_upstream() {
        let to_client = close_frame(Toward::Client, "portcullis: revoked").unwrap();
        assert_eq!(&to_client[..4], &[0x88, 21, 0x03, 0xf0]);
        assert_eq!(&to_client[4..], b"portcullis: revoked");
        let to_up = close_frame(Toward::Upstream, "portcullis: revoked").unwrap();
        assert_eq!(to_up[0], 0x88);
        assert_eq!(to_up[1], 0x80 | 21);
        let key = &to_up[2..6];
        let payload: Vec<u8> = to_up[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(&payload[..2], &[0x03, 0xf0]);
        let long = "x".repeat(500);
        assert_eq!(close_frame(Toward::Client, &long).unwrap().len(), 2 + 125);
    }
}
