//! Listeners and lifecycle: accept loops (TLS, optional plain HTTP, admin),
//! the connection limit, handshake and header-read timeouts, graceful drain,
//! and config reload that keeps the running config when the new one fails.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::authn::{Authenticator, Issuer, jwks::Fetcher};
use crate::config::{Config, ConfigError};
use crate::proxy::{ConnInfo, Proxy, Runtime};
use crate::route::RouteTable;
use crate::telemetry::{ConnectionGuard, Metrics, ResultLabel};
use crate::tls::{PeerCertificate, TlsConfigs, TlsInfo};

mod balance;
mod conn;
use balance::{Balance, Handoff, Seat};

/// Why the server could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Config file problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificate or key problem.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// JWKS source problem.
    #[error(transparent)]
    Jwks(#[from] crate::authn::jwks::JwksError),
    /// The store could not open.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The cluster (`[store] kind = "nats"`) could not start.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::posture::cluster::ClusterError),
    /// The policy set (or shadow set, or audit log) could not load.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::LoadError),
    /// The OTLP trace exporter could not start.
    #[error("tracing: {0}")]
    Tracing(#[from] crate::telemetry::trace::TraceError),
    /// The Shared Signals transmitter could not start.
    #[error("transmitter: {0}")]
    Transmit(#[from] crate::transmit::TransmitError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A proxy worker thread (or its runtime) could not start.
    #[error("cannot start proxy worker: {0}")]
    Worker(std::io::Error),
}

/// Builds a runtime from config, carrying over issuers (and their fetched
/// keys) whose config is unchanged.
pub fn build_runtime(
    cfg: Config,
    prev: Option<&Runtime>,
    fetcher: &Fetcher,
    version: u64,
    metrics: &crate::telemetry::Metrics,
) -> Result<(Runtime, Vec<Arc<Issuer>>), StartError> {
    let mut fresh = Vec::new();
    let mut issuers = Vec::new();
    for ic in &cfg.issuers {
        let reused = prev.and_then(|p| p.auth.issuers().find(|i| i.cfg == *ic).cloned());
        match reused {
            Some(i) => issuers.push(i),
            None => {
                let i = Issuer::new(ic.clone(), fetcher)?;
                fresh.push(i.clone());
                issuers.push(i);
            }
        }
    }
    let auth = Arc::new(Authenticator::new(
        issuers,
        crate::config::DEFAULT_TOKEN_CACHE_CAPACITY,
        crate::config::DEFAULT_MAX_TOKEN_BYTES,
    ));
    // As many pools as workers started with the server (a reload keeps them).
    let workers = prev.map_or_else(|| proxy_workers(&cfg), |p| p.upstream.workers());
    let upstream = crate::proxy::client::UpstreamPools::new(
        &cfg.upstream,
        workers,
        Some(&metrics.upstream_connections_opened),
    )?;
    // The DPoP replay cache and nonce key outlive the config.
    let binder = crate::binding::Binder::new(&cfg, prev.map(|p| &p.binder));
    let browser = crate::session::Browser::new(&cfg, prev.and_then(|p| p.browser.as_deref()))
        .map_err(|e| {
            StartError::Config(ConfigError::Invalid {
                file: cfg.source.clone(),
                key: "browser".into(),
                message: e.to_string(),
            })
        })?
        .map(Arc::new);
    let assertion = crate::proxy::assertion::Signer::from_config(&cfg)?;
    // The tracer (its export thread) carries over when `[tracing]` is unchanged.
    let tracing = match (&cfg.tracing, prev.and_then(|p| p.tracing.clone())) {
        (None, _) => None,
        (Some(tc), Some(t)) if t.config == *tc => Some(t),
        (Some(tc), _) => Some(crate::telemetry::trace::Tracing::new(tc)?),
    };
    let rt = Runtime {
        browser,
        tracing,
        routes: RouteTable::new(&cfg),
        assertion,
        binder,
        stripped: crate::proxy::headers::Stripped::new(cfg.stripped_headers()),
        auth,
        upstream,
        config: Arc::new(cfg),
        version,
    };
    Ok((rt, fresh))
}

/// Loads a fresh issuer's keys; a static JWKS file that does not parse is a
/// config error, a URL that is unreachable is not (the issuer fails closed
/// and retries on schedule and on unknown `kid`).
async fn load_issuer(i: &Arc<Issuer>) -> Result<(), StartError> {
    match i.refresh().await {
        Ok(_) => {}
        Err(e @ crate::authn::jwks::JwksError::File { .. }) => return Err(e.into()),
        Err(e) if i.cfg.jwks_file.is_some() => return Err(e.into()),
        Err(e) => {
            tracing::warn!(issuer = %i.cfg.name, error = %e, "jwks not loaded yet; tokens from this issuer fail until it is")
        }
    }
    i.spawn_refresh_task();
    Ok(())
}

/// Everything that lives across reloads.
pub struct Shared {
    /// The proxy (runtime + metrics).
    pub proxy: Arc<Proxy>,
    /// The posture service (snapshot + ingest).
    pub posture: Arc<crate::posture::Posture>,
    /// Feed receivers built from the running config (shared with the admin
    /// listener and the pollers).
    pub feeds: Arc<ArcSwap<crate::feeds::FeedContext>>,
    /// Current TLS configs (public, and client-certificate names).
    pub tls: ArcSwap<TlsConfigs>,
    fetcher: Fetcher,
    version: AtomicU64,
    config_path: PathBuf,
    reload_lock: tokio::sync::Mutex<()>,
    /// Set on SIGTERM: HTTP/1 responses carry `Connection: close`.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config_path)
            .finish()
    }
}

impl Shared {
    /// Re-reads the config file and swaps in a new runtime and TLS config.
    /// On any error the running config stays and the error is returned.
    pub async fn reload(&self) -> Result<u64, StartError> {
        let _g = self.reload_lock.lock().await;
        let result = self.reload_inner().await;
        let label = ResultLabel {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.proxy
            .metrics
            .config_reloads
            .get_or_create(&label)
            .inc();
        result
    }

    async fn reload_inner(&self) -> Result<u64, StartError> {
        let cfg = Config::load(&self.config_path)?;
        let old = self.proxy.runtime.load_full();
        if cfg.proxy.listen != old.config.proxy.listen
            || cfg.admin.listen != old.config.admin.listen
            || cfg.proxy.plain_http_listen != old.config.proxy.plain_http_listen
        {
            tracing::warn!(
                "listener addresses changed in the config; they take effect only after a restart"
            );
        }
        // Re-reads certificates, keys and CA bundles (device and SPIFFE).
        let tls = Arc::new(crate::tls::build_tls(&cfg.tls)?);
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let (rt, fresh) =
            build_runtime(cfg, Some(&old), &self.fetcher, version, &self.proxy.metrics)?;
        for i in &fresh {
            load_issuer(i).await?;
        }
        let feeds = build_feeds(
            &rt.config,
            Some(&self.feeds.load()),
            &self.posture,
            &self.proxy.metrics,
            &self.fetcher,
        )
        .await?;
        let prev = self.proxy.policy.load();
        let engine = crate::policy::Engine::from_config(
            &rt.config,
            prev.as_deref(),
            Some(&self.proxy.metrics),
        )
        .inspect_err(|_| self.policy_reloaded(false))?;
        self.tls.store(tls);
        self.feeds.store(feeds);
        self.proxy
            .access
            .memory
            .set_bounds(rt.config.access.max_entries, rt.config.access.max_tokens);
        self.proxy.runtime.store(Arc::new(rt));
        if let Some(e) = &engine {
            self.policy_reloaded(true);
            tracing::info!(policy_version = %e.set.version, "policy set loaded");
        }
        self.proxy.policy.store(engine.map(Arc::new));
        // Live connections follow the new config and policy set.
        self.proxy.live.redecide_all_soon();
        tracing::info!(version, "config reloaded");
        Ok(version)
    }

    /// The config file this server reads.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    fn policy_reloaded(&self, ok: bool) {
        self.proxy
            .metrics
            .policy_reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Reloads the policy set from its directories (a file changed). An
    /// invalid set keeps the running one; the error is logged and returned.
    pub async fn reload_policies(&self) -> Result<Option<String>, crate::policy::LoadError> {
        let _g = self.reload_lock.lock().await;
        let Some(cur) = self.proxy.policy.load() else {
            return Ok(None);
        };
        match cur.reloaded() {
            Ok(e) => {
                let v = e.set.version.clone();
                self.proxy.policy.store(Some(Arc::new(e)));
                self.proxy.live.redecide_all_soon();
                self.policy_reloaded(true);
                tracing::info!(policy_version = %v, "policy set reloaded");
                Ok(Some(v))
            }
            Err(e) => {
                self.policy_reloaded(false);
                tracing::error!(error = %e, policy_version = %cur.set.version, "policy set rejected; still enforcing the previous one");
                Err(e)
            }
        }
    }
}

/// A fingerprint of every `*.cedar` file under the policy directories: names
/// and contents, so a rewrite within the same second is still seen.
fn policy_fingerprint(cfg: &Config) -> Option<[u8; 32]> {
    let p = cfg.policy.as_ref()?;
    let mut buf = Vec::new();
    for dir in std::iter::once(&p.dir).chain(p.shadow_dir.as_ref()) {
        buf.extend_from_slice(dir.as_os_str().as_encoded_bytes());
        buf.push(0);
        for f in crate::policy::load::policy_files(dir).unwrap_or_default() {
            buf.extend_from_slice(f.as_os_str().as_encoded_bytes());
            buf.push(0);
            buf.extend_from_slice(&std::fs::read(&f).unwrap_or_default());
            buf.push(0);
        }
    }
    Some(crate::util::sha256(&buf))
}

/// Watches the policy directories and reloads the set when a file changes
/// (every `policy.watch_interval_ms`; SIGHUP also reloads).
async fn policy_watch_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut last = policy_fingerprint(&shared.proxy.runtime.load().config);
    loop {
        let cfg = shared.proxy.runtime.load().config.clone();
        let interval = cfg.policy.as_ref().map_or(0, |p| p.watch_interval_ms);
        let wait = Duration::from_millis(if interval == 0 { 1000 } else { interval });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if interval == 0 {
            last = None;
            continue;
        }
        let now = tokio::task::spawn_blocking(move || policy_fingerprint(&cfg))
            .await
            .ok()
            .flatten();
        if now.is_some() && now != last {
            if last.is_some() {
                let _ = shared.reload_policies().await;
            }
            last = now;
        }
    }
}

/// A started server: its bound addresses and a handle to stop it.
pub struct RunningServer {
    /// TLS listener address.
    pub proxy_addr: SocketAddr,
    /// Plain-HTTP listener address, when configured.
    pub plain_addr: Option<SocketAddr>,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// Shared state (reload, metrics).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("proxy_addr", &self.proxy_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl RunningServer {
    /// Stops accepting, drains in-flight requests (up to the configured
    /// drain timeout), then returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// On SIGTERM, how long connections keep being served (HTTP/1 responses
/// saying `Connection: close`) before idle ones are closed.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Listen backlog with `[listener] reuse_port` (the std default).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listener; with `reuse_port`, `SO_REUSEPORT` lets a second process
/// bind the same address and take over while this one drains.
async fn bind(
    addr: SocketAddr,
    opts: &crate::config::ListenerConfig,
) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    if !opts.reuse_port {
        return TcpListener::bind(addr).await.map_err(err);
    }
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    #[cfg(unix)]
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Starts every listener for a config file.
pub async fn start(config_path: PathBuf) -> Result<RunningServer, StartError> {
    let cfg = Config::load(&config_path)?;
    start_with(cfg, Arc::new(Metrics::new())).await
}

/// Builds the feed receivers for a config, reusing the SSF receiver (and
/// its fetched keys) when its config is unchanged.
async fn build_feeds(
    cfg: &Arc<Config>,
    prev: Option<&crate::feeds::FeedContext>,
    posture: &Arc<crate::posture::Posture>,
    metrics: &Arc<Metrics>,
    fetcher: &Fetcher,
) -> Result<Arc<crate::feeds::FeedContext>, StartError> {
    let ssf = match &cfg.feeds.ssf {
        None => None,
        Some(sc) => match prev.and_then(|p| p.ssf.clone()).filter(|r| r.cfg == *sc) {
            Some(r) => Some(r),
            None => Some(crate::feeds::ssf::Receiver::new(sc.clone(), fetcher).await?),
        },
    };
    let jamf_api = match cfg.feeds.jamf.as_ref().and_then(|j| j.api.as_ref()) {
        None => None,
        Some(ac) => match prev
            .and_then(|p| p.jamf_api.clone())
            .filter(|a| a.cfg == *ac)
        {
            Some(a) => Some(a),
            None => Some(Arc::new(crate::feeds::jamf_api::JamfApi::new(ac.clone())?)),
        },
    };
    posture.set_max_future_skew(std::time::Duration::from_secs(cfg.feeds.max_future_skew_s));
    Ok(Arc::new(crate::feeds::FeedContext {
        posture: posture.clone(),
        metrics: metrics.clone(),
        config: cfg.clone(),
        ssf,
        jamf_api,
    }))
}

/// Starts every listener for an already-loaded config, with the given metrics.
pub async fn start_with(cfg: Config, metrics: Arc<Metrics>) -> Result<RunningServer, StartError> {
    let fetcher = Fetcher::default();
    let tls = Arc::new(crate::tls::build_tls(&cfg.tls)?);
    let config_path = cfg.source.clone();
    let store = crate::store::sqlite::SqliteStore::open(
        &cfg.store.path,
        cfg.store.sync == crate::config::SyncMode::Full,
    )?;
    let posture = crate::posture::Posture::start(Box::new(store), metrics.clone())?;
    if let (crate::config::StoreKind::Nats, Some(n)) = (cfg.store.kind, &cfg.store.nats) {
        // A spent proof stays spent as long as any replica could accept it.
        let window = cfg
            .binding
            .dpop_max_age_s
            .saturating_add(cfg.binding.dpop_future_skew_s)
            .saturating_add(1);
        let cluster =
            crate::posture::cluster::Cluster::start(n, window, &posture, metrics.clone()).await?;
        posture.attach_cluster(cluster);
    }
    let (rt, fresh) = build_runtime(cfg, None, &fetcher, 1, &metrics)?;
    for i in &fresh {
        load_issuer(i).await?;
    }
    let cfg = rt.config.clone();
    let feeds = build_feeds(&cfg, None, &posture, &metrics, &fetcher).await?;
    let engine = crate::policy::Engine::from_config(&cfg, None, Some(&metrics))?;
    let proxy = Arc::new(Proxy::new(rt, metrics, posture.clone()));
    if let Some(e) = &engine {
        tracing::info!(policy_version = %e.set.version, policies = e.set.len(), "policy set loaded");
    }
    proxy.policy.store(engine.map(Arc::new));
    let shared = Arc::new(Shared {
        posture,
        feeds: Arc::new(ArcSwap::new(feeds.clone())),
        proxy,
        tls: ArcSwap::new(tls),
        fetcher,
        version: AtomicU64::new(1),
        config_path,
        reload_lock: tokio::sync::Mutex::new(()),
        draining: std::sync::atomic::AtomicBool::new(false),
    });

    let tls_listener = bind(cfg.proxy.listen, &cfg.listener).await?;
    let plain_listener = match cfg.proxy.plain_http_listen {
        Some(a) => Some(bind(a, &cfg.listener).await?),
        None => None,
    };
    let admin_listener = bind(cfg.admin.listen, &cfg.listener).await?;
    let proxy_addr = local_addr(&tls_listener, cfg.proxy.listen);
    let plain_addr = plain_listener
        .as_ref()
        .map(|l| local_addr(l, cfg.proxy.listen));
    let admin_addr = local_addr(&admin_listener, cfg.admin.listen);

    let (tx, rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(cfg.proxy.max_connections));
    let mut tasks = JoinSet::new();
    let mut proxy_listeners = vec![(proxy_addr, tls_listener, true)];
    if let (Some(l), Some(a)) = (plain_listener, plain_addr) {
        proxy_listeners.push((a, l, false));
    }
    let workers = shared.proxy.runtime.load().upstream.workers();
    let ctx = WorkerContext {
        shared: shared.clone(),
        limit,
        shutdown: rx.clone(),
        cfg: cfg.clone(),
    };
    spawn_workers(&ctx, proxy_listeners, workers, &mut tasks)?;
    if let Some(rx_ssf) = feeds.ssf.clone().filter(|r| r.cfg.poll_url.is_some()) {
        tasks.spawn(crate::feeds::ssf::poll_loop(
            feeds.clone(),
            rx_ssf,
            rx.clone(),
        ));
    }
    if cfg.feeds.intune.is_some() {
        tasks.spawn(crate::feeds::intune::poll_loop(
            shared.feeds.clone(),
            rx.clone(),
        ));
    }
    tasks.spawn(policy_watch_loop(shared.clone(), rx.clone()));
    // Phase 7 only queues what it saw; this applies it to the access rows.
    tasks.spawn(crate::access::memory::drain_loop(
        shared.proxy.access.memory.clone(),
        rx.clone(),
    ));
    // The access memory's tables live in the store's database; without them
    // the picture still works, from memory only.
    match shared.proxy.access.attach_store(&cfg.store.path) {
        Ok(store) => {
            let proxy = shared.proxy.clone();
            tasks.spawn(crate::access::store::flush_loop(
                store,
                shared.proxy.access.memory.clone(),
                move || Duration::from_millis(proxy.runtime.load().config.access.flush_interval_ms),
                rx.clone(),
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "access memory is not durable: its tables did not open")
        }
    }
    tasks.spawn(crate::proxy::live::redecide_loop(
        shared.proxy.clone(),
        rx.clone(),
    ));
    // The transmitter opens its tables after the posture store (the event
    // log exists) and before any listener accepts a feed event, so its cursor
    // starts at the end of the log and misses nothing accepted from now on.
    let transmitter = crate::transmit::Transmitter::from_config(&cfg)?;
    if let Some(t) = &transmitter {
        tasks.spawn(t.clone().run(shared.posture.clone(), rx.clone()));
    }
    let admin = Arc::new(crate::admin::AdminState {
        proxy: shared.proxy.clone(),
        posture: shared.posture.clone(),
        feeds: shared.feeds.clone(),
        transmitter,
    });
    tasks.spawn(crate::admin::serve(admin, admin_listener, rx));
    tracing::info!(%proxy_addr, ?plain_addr, %admin_addr, "portcullis listening");
    Ok(RunningServer {
        proxy_addr,
        plain_addr,
        admin_addr,
        shared,
        shutdown: tx,
        tasks,
    })
}

/// Proxy worker threads for `[listener] workers` (0: one per available core).
fn proxy_workers(cfg: &Config) -> usize {
    match cfg.listener.workers {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    }
}

/// What every proxy worker's accept loops share.
struct WorkerContext {
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    cfg: Arc<Config>,
}

/// Starts the proxy workers, thread per core: each an OS thread running a
/// single-threaded runtime that accepts from every proxy listener (one
/// shared socket, a duplicate fd per worker) and serves what it accepted to
/// the end, with its own upstream pool. A request never changes thread, so
/// there is no cross-thread wakeup per request, which on a multi-thread
/// runtime cost about a quarter of the CPU. One task per worker on the
/// caller's runtime finishes when the worker has drained.
fn spawn_workers(
    ctx: &WorkerContext,
    listeners: Vec<(SocketAddr, TcpListener, bool)>,
    workers: usize,
    tasks: &mut JoinSet<()>,
) -> Result<(), StartError> {
    let mut std_listeners = Vec::with_capacity(listeners.len());
    for (addr, l, tls) in listeners {
        let l = l
            .into_std()
            .map_err(|source| StartError::Bind { addr, source })?;
        std_listeners.push((addr, l, tls));
    }
    // With more than one worker, each new connection goes to the least
    // loaded (see `balance`); `inboxes` are the workers' ends.
    let (balance, mut inboxes) = if workers > 1 {
        let (b, rx) = Balance::new(workers, &ctx.shared.proxy.metrics);
        (Some(b), rx.into_iter().map(Some).collect())
    } else {
        (None, vec![None])
    };
    let drain = Duration::from_millis(ctx.cfg.proxy.drain_timeout_ms);
    let pins = if ctx.cfg.listener.pin_workers {
        match crate::util::worker::pin_plan(workers) {
            Ok(cpus) => {
                tracing::info!(?cpus, "proxy workers pinned, one per CPU");
                cpus
            }
            Err(why) => {
                tracing::warn!(reason = %why, "[listener] pin_workers: workers left unpinned");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    for w in 0..workers {
        let pin = pins.get(w).copied();
        let inbox = inboxes.get_mut(w).and_then(Option::take);
        let balance = balance.clone().map(|b| (b, w));
        let mut mine = Vec::with_capacity(std_listeners.len());
        for (addr, l, tls) in &std_listeners {
            let l = l.try_clone().map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
            mine.push((l, *tls));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Worker)?;
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (shared, limit) = (ctx.shared.clone(), ctx.limit.clone());
        let (shutdown, cfg) = (ctx.shutdown.clone(), ctx.cfg.clone());
        std::thread::Builder::new()
            .name(format!("portcullis-w{w}"))
            .spawn(move || {
                crate::util::worker::enter(w);
                if let Some(cpu) = pin
                    && let Err(e) = crate::util::worker::pin_current(cpu)
                {
                    tracing::warn!(worker = w, cpu, error = %e, "cannot pin proxy worker");
                }
                runtime.block_on(async move {
                    let mut loops = JoinSet::new();
                    // Keeps a near timer armed; see WORKER_TICK.
                    // Each tick also closes this worker's expired idle
                    // upstream connections.
                    let proxy = shared.proxy.clone();
                    let ticker = tokio::spawn(async move {
                        let mut tick = tokio::time::interval(WORKER_TICK);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                            proxy.runtime.load().upstream.here().prune();
                        }
                    });
                    if let Some(inbox) = inbox {
                        loops.spawn(inbox_loop(shared.clone(), inbox, shutdown.clone(), drain));
                    }
                    for (l, tls) in mine {
                        match TcpListener::from_std(l) {
                            Ok(l) => {
                                let (shared, limit) = (shared.clone(), limit.clone());
                                let (shutdown, cfg) = (shutdown.clone(), cfg.clone());
                                loops.spawn(accept_loop(
                                    shared,
                                    l,
                                    tls,
                                    limit,
                                    shutdown,
                                    cfg,
                                    balance.clone(),
                                ));
                            }
                            Err(e) => tracing::error!(error = %e, "worker cannot watch listener"),
                        }
                    }
                    while loops.join_next().await.is_some() {}
                    ticker.abort();
                });
                // Dropping the runtime ends what outlived the drain timeout.
                drop(runtime);
                drop(done);
            })
            .map_err(StartError::Worker)?;
        tasks.spawn(async move {
            let _ = finished.await;
        });
    }
    Ok(())
}

/// Period of each worker's idle ticker. Every request arms a timer (the
/// route's upstream timeout; a connection's header-read timer is re-armed
/// only when it fires, see `conn::HeadClock`); arming one that falls
/// due before the time driver's next planned wake-up makes tokio wake the
/// driver through its eventfd (a `write`, then an extra `epoll_wait`
/// return), which at load was half a wake-up per request. With a tick always
/// pending, no request timer of a second or more is ever the earliest, and
/// the cost is one wake-up per second per worker.
const WORKER_TICK: Duration = Duration::from_secs(1);

fn local_addr(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// The HTTP engines one listener serves with, all with the same limits:
/// `auto` sniffs the preface (plain HTTP: h2c prior knowledge or HTTP/1.1);
/// `h1` and `h2` serve exactly the protocol TLS ALPN agreed on.
struct Engines {
    auto: auto::Builder<TokioExecutor>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Time to send a request's head on `h1` (see `conn::HeadClock`) and
    /// the h2 connection preface: the header-read timeout.
    head_timeout: Duration,
}

fn http_builder(cfg: &Config) -> Engines {
    let mut auto = auto::Builder::new(TokioExecutor::new());
    h1_limits(cfg, &mut auto.http1());
    h2_limits(cfg, &mut auto.http2());
    let mut h1 = http1::Builder::new();
    // The header-read timeout of TLS HTTP/1.1 connections is kept by
    // `conn::HeadClock`, one timer per connection instead of one per request.
    h1.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(cfg.proxy.max_header_bytes.max(8192))
        .max_headers(cfg.proxy.max_headers)
        .keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.proxy.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL));
    Engines {
        auto,
        h1,
        h2,
        head_timeout: cfg.header_read_timeout(),
    }
}

/// Streams one h2 connection may open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// How often an idle h2 connection is pinged.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

fn h1_limits(cfg: &Config, b: &mut auto::Http1Builder<'_, TokioExecutor>) {
    b.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout())
        .max_buf_size(cfg.proxy.max_header_bytes.max(8192))
        .max_headers(cfg.proxy.max_headers)
        .keep_alive(true);
}

fn h2_limits(cfg: &Config, b: &mut auto::Http2Builder<'_, TokioExecutor>) {
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.proxy.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL));
}

/// What serving a connection accepted on one listener needs.
struct ListenerCtx {
    tls: bool,
    /// `https` or `http` (metrics).
    name: &'static str,
    builder: Arc<Engines>,
    handshake_timeout: Duration,
}

/// Accepts on one listener for one worker. `balance`: the workers' balance
/// and this worker's index (absent with a single worker).
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: bool,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    cfg: Arc<Config>,
    balance: Option<(Arc<Balance>, usize)>,
) {
    // Drain signal: every connection holds a receiver until it has ended,
    // so `closed()` is the moment the last one finished. (hyper-util's
    // GracefulShutdown cannot watch an HTTP/1.1-only connection with upgrades.)
    // A connection handed to another worker holds one too.
    let (drain_tx, _) = watch::channel(());
    let handshake_timeout = Duration::from_millis(cfg.proxy.tls_handshake_timeout_ms);
    let listener_name: &'static str = if tls { "https" } else { "http" };
    let ctx = Arc::new(ListenerCtx {
        tls,
        name: listener_name,
        builder: Arc::new(http_builder(&cfg)),
        handshake_timeout,
    });
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let watcher = drain_tx.subscribe();
        let seat = match &balance {
            None => None,
            Some((b, here)) => {
                let seat = b.seat(*here);
                if seat.worker() == *here {
                    Some(seat)
                } else {
                    hand_off(&shared, b, *here, tcp, peer, &ctx, permit, watcher, seat);
                    continue;
                }
            }
        };
        tokio::spawn(serve_conn(
            shared.clone(),
            ctx.clone(),
            tcp,
            peer,
            permit,
            watcher,
            seat,
        ));
    }
    // Connections the kernel already queued for this listener would be reset
    // when it closes: serve them too, one request each (HTTP/1 keep-alive
    // off), outside the graceful watcher, which would close a connection
    // whose first request it has not read yet. With `[listener] reuse_port`
    // a second process takes the new ones.
    let mut last = http_builder(&cfg);
    last.h1.keep_alive(false);
    last.auto.http1().keep_alive(false);
    let last = Arc::new(last);
    // Their drain sender is never signalled (it lives until they end).
    let (unsignalled, _) = watch::channel(());
    let mut backlog = JoinSet::new();
    for (tcp, peer) in take_backlog(listener) {
        let (shared, last, watcher) = (shared.clone(), last.clone(), unsignalled.subscribe());
        backlog.spawn(async move {
            let _guard = ConnectionGuard::new(&shared.proxy.metrics, listener_name);
            if tls {
                serve_tls(shared, last, watcher, tcp, peer, handshake_timeout).await;
            } else {
                let info = Arc::new(ConnInfo::new(peer, None));
                serve_http(shared, &last, Wire::Sniff, watcher, TokioIo::new(tcp), info).await;
            }
        });
    }
    let drain = Duration::from_millis(cfg.proxy.drain_timeout_ms);
    // Closing an idle keep-alive connection races with a request the client
    // is sending on it (which then fails). So first keep serving for a grace
    // period with `Connection: close` on every HTTP/1 response, which moves
    // busy clients off cleanly; only then ask what is left to finish (HTTP/2
    // gets GOAWAY, which clients retry safely) and wait for the last one.
    shared.draining.store(true, Ordering::Relaxed);
    let grace = DRAIN_CLOSE_GRACE.min(drain / 2);
    let all = async {
        tokio::time::sleep(grace).await;
        drain_tx.send_replace(());
        drain_tx.closed().await;
        while backlog.join_next().await.is_some() {}
    };
    if tokio::time::timeout(drain, all).await.is_err() {
        tracing::warn!("drain timed out; closing remaining connections");
    }
}

/// Serves one accepted connection to its end on the current worker.
async fn serve_conn(
    shared: Arc<Shared>,
    ctx: Arc<ListenerCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    watcher: watch::Receiver<()>,
    seat: Option<Seat>,
) {
    let _permit = permit;
    let _seat = seat;
    let _guard = ConnectionGuard::new(&shared.proxy.metrics, ctx.name);
    if ctx.tls {
        serve_tls(
            shared,
            ctx.builder.clone(),
            watcher,
            tcp,
            peer,
            ctx.handshake_timeout,
        )
        .await;
    } else {
        let info = Arc::new(ConnInfo::new(peer, None));
        serve_http(
            shared,
            &ctx.builder,
            Wire::Sniff,
            watcher,
            TokioIo::new(tcp),
            info,
        )
        .await;
    }
}

/// Sends a connection worker `here` accepted to the worker its seat is on,
/// or serves it here when that worker takes no more (it is shutting down).
#[allow(clippy::too_many_arguments)]
fn hand_off(
    shared: &Arc<Shared>,
    balance: &Arc<Balance>,
    here: usize,
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &Arc<ListenerCtx>,
    permit: OwnedSemaphorePermit,
    watcher: watch::Receiver<()>,
    seat: Seat,
) {
    let tcp = match tcp.into_std() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot move a connection to another worker; closed");
            return;
        }
    };
    let h = Handoff {
        tcp,
        peer,
        listener: ctx.clone(),
        permit,
        watcher,
        seat,
    };
    if let Err(mut back) = balance.hand_off(h) {
        back.seat = balance.take(here);
        tokio::spawn(serve_handoff(shared.clone(), *back));
    }
}

/// Serves a connection that left its accepting worker's reactor, on the
/// current worker.
async fn serve_handoff(shared: Arc<Shared>, h: Handoff) {
    match TcpStream::from_std(h.tcp) {
        Ok(tcp) => {
            serve_conn(
                shared,
                h.listener,
                tcp,
                h.peer,
                h.permit,
                h.watcher,
                Some(h.seat),
            )
            .await
        }
        Err(e) => {
            tracing::warn!(error = %e, "a connection handed to this worker could not be registered")
        }
    }
}

/// Serves the connections other workers accepted for this one, until
/// shutdown; then those already sent, and waits (up to `drain`) for all of
/// them to end: each ends with its accepting listener's drain signal.
async fn inbox_loop(
    shared: Arc<Shared>,
    mut inbox: mpsc::UnboundedReceiver<Handoff>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            h = inbox.recv() => match h {
                Some(h) => {
                    conns.spawn(serve_handoff(shared.clone(), h));
                }
                None => break,
            },
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    inbox.close();
    while let Ok(h) = inbox.try_recv() {
        conns.spawn(serve_handoff(shared.clone(), h));
    }
    let all = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, all).await.is_err() {
        tracing::debug!("connections handed to this worker outlived the drain timeout");
    }
}

/// Accepts, without waiting, every connection already queued on a listener
/// that is about to close (a direct non-blocking `accept` until it would block).
fn take_backlog(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let mut out = Vec::new();
    let Ok(std) = listener.into_std() else {
        return out;
    };
    if std.set_nonblocking(true).is_err() {
        return out;
    }
    while let Ok((tcp, peer)) = std.accept() {
        if let Ok(tcp) = tcp
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(tcp))
        {
            out.push((tcp, peer));
        }
    }
    out
}

async fn serve_tls(
    shared: Arc<Shared>,
    builder: Arc<Engines>,
    watcher: watch::Receiver<()>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake_timeout: Duration,
) {
    let refused = |why: &'static str| {
        shared
            .proxy
            .metrics
            .connections_refused
            .get_or_create(&ResultLabel { result: why })
            .inc();
    };
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    // The ClientHello's SNI picks the config: only client-auth names ask
    // for a certificate.
    let handshake = async {
        let start = acceptor.await?;
        let configs = shared.tls.load_full();
        let (config, asked) = configs.for_server_name(start.client_hello().server_name());
        start.into_stream(config).await.map(|s| (s, asked))
    };
    let (stream, client_cert_requested) =
        match tokio::time::timeout(handshake_timeout, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                refused("tls_error");
                tracing::debug!(%peer, error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                refused("tls_timeout");
                return;
            }
        };
    let (_, conn) = stream.get_ref();
    let info = TlsInfo {
        server_name: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        client_cert_requested,
        peer: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::new(PeerCertificate::new(c.clone().into_owned()))),
    };
    // ALPN decides the protocol, never the first bytes: after `h2` was agreed
    // a bad preface is a connection error (GOAWAY), not an HTTP/1.1 request.
    let h2 = info.alpn.as_deref() == Some(b"h2");
    let info = Arc::new(ConnInfo::new(peer, Some(info)));
    if !h2 {
        serve_http(
            shared,
            &builder,
            Wire::H1,
            watcher,
            TokioIo::new(stream),
            info,
        )
        .await;
        return;
    }
    let mut stream = stream;
    match tokio::time::timeout(builder.head_timeout, read_preface(&mut stream)).await {
        Ok(Ok(Some(preface))) => {
            let io = TokioIo::new(Prefixed::new(preface, stream));
            serve_http(shared, &builder, Wire::H2, watcher, io, info).await;
        }
        Ok(Ok(None)) => {
            // RFC 9113 §3.4: an invalid preface is a connection error of
            // type PROTOCOL_ERROR; say so before closing (h2 itself just closes).
            refused("h2_preface");
            let _ = stream.write_all(&GOAWAY_PROTOCOL_ERROR).await;
            let _ = stream.shutdown().await;
        }
        Ok(Err(_)) | Err(_) => refused("h2_preface"),
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame (the server preface) followed by
/// GOAWAY(last stream 0, PROTOCOL_ERROR), RFC 9113 §6.5 and §6.8.
const GOAWAY_PROTOCOL_ERROR: [u8; 26] = [
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, length 0, stream 0
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, length 8, stream 0
    0, 0, 0, 0, // last stream id 0
    0, 0, 0, 0x1, // PROTOCOL_ERROR
];

/// Reads the h2 client preface; `None` as soon as a byte differs from it.
async fn read_preface<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[filled..filled + n] != H2_PREFACE[filled..filled + n] {
            return Ok(None);
        }
        filled += n;
    }
    Ok(Some(buf))
}

pin_project_lite::pin_project! {
    /// A stream with bytes already read from it put back in front
    /// (the h2 preface, checked before hyper sees the connection).
    struct Prefixed<S> {
        prefix: Vec<u8>,
        at: usize,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let rest = this.prefix.get(*this.at..).unwrap_or_default();
        if rest.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        *this.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy)]
enum Wire {
    /// Read the preface (plain HTTP: h2c prior knowledge or HTTP/1.1).
    Sniff,
    /// HTTP/1.1 only (ALPN `http/1.1`, or no ALPN).
    H1,
    /// HTTP/2 only (ALPN `h2`).
    H2,
}

/// A connection's shared state and facts, for its requests.
struct Served {
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
}

async fn serve_http<I>(
    shared: Arc<Shared>,
    engines: &Engines,
    wire: Wire,
    watcher: watch::Receiver<()>,
    io: I,
    info: Arc<ConnInfo>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // HTTP/1.1 over TLS: the header-read deadline is kept here (hyper's is
    // off for `h1`; `auto` keeps hyper's own, it may turn out to be h2).
    let head =
        matches!(wire, Wire::H1).then(|| Arc::new(conn::HeadClock::new(engines.head_timeout)));
    let clock = head.clone();
    // What every request of this connection reads, behind one count of the
    // connection's own: a request clones this, not the process-wide
    // `Arc<Proxy>` and `Arc<Shared>`, whose counts both workers would then
    // write on every request (one cache line passed between the cores at
    // each clone and drop).
    let served = Arc::new(Served { shared, info });
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let served = served.clone();
        let in_flight = clock.as_ref().map(conn::HeadClock::request);
        async move {
            let h1 = req.version() < hyper::Version::HTTP_2;
            let Served { shared, info } = &*served;
            // Boxed: the request's future is a few KiB, and hyper moves
            // the service future (for h2, into a task spawned per stream,
            // several copies); a box makes those moves a pointer's.
            let mut resp = Box::pin(shared.proxy.handle(req, info)).await;
            // Draining: tell HTTP/1 clients to take their next request elsewhere.
            if h1 && shared.draining.load(Ordering::Relaxed) {
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp.map(|b| conn::Tracked::new(b, in_flight)))
        }
    });
    let head = head.as_deref();
    let ended = match wire {
        Wire::Sniff => {
            let c = engines.auto.serve_connection_with_upgrades(io, svc);
            conn::run(c, watcher, head, |c| c.graceful_shutdown()).await
        }
        Wire::H1 => {
            let c = engines.h1.serve_connection(io, svc).with_upgrades();
            conn::run(c, watcher, head, |c| c.graceful_shutdown())
                .await
                .map_err(Into::into)
        }
        Wire::H2 => {
            let c = engines.h2.serve_connection(io, svc);
            conn::run(c, watcher, head, |c| c.graceful_shutdown())
                .await
                .map_err(Into::into)
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with error");
    }
}
