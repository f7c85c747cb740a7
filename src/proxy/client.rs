//! The upstream client: hyper-util's pooled client over rustls, with connect
//! and idle limits from config. Each proxy worker thread has its own pool
//! (see `server.rs`), so a request and its upstream connection stay on the
//! thread that accepted the client: no cross-thread wakeup per request.

use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type flowing through the proxy in both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The pooled upstream client.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

thread_local! {
    /// Which pool this thread uses: 0 off the proxy workers, `n + 1` on worker `n`.
    static POOL_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as proxy worker `worker` (0-based), so it uses
/// its own upstream pool.
pub fn enter_worker(worker: usize) {
    POOL_INDEX.with(|i| i.set(worker.saturating_add(1)));
}

/// One upstream pool per proxy worker thread, plus one for every other thread.
#[derive(Debug, Clone)]
pub struct UpstreamPools {
    shared: UpstreamClient,
    workers: Box<[UpstreamClient]>,
}

impl UpstreamPools {
    /// Pools for `workers` worker threads (and one shared by the rest).
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Result<Self, crate::tls::TlsError> {
        let conn = connector(cfg)?;
        Ok(Self {
            shared: client(cfg, conn.clone()),
            workers: (0..workers).map(|_| client(cfg, conn.clone())).collect(),
        })
    }

    /// How many worker pools there are.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The pool of the calling thread. Its connections' tasks run on the
    /// runtime that opened them, which for a worker is its own.
    pub fn here(&self) -> &UpstreamClient {
        POOL_INDEX
            .with(Cell::get)
            .checked_sub(1)
            .and_then(|w| self.workers.get(w))
            .unwrap_or(&self.shared)
    }
}

/// Builds one upstream client from config.
pub fn upstream_client(cfg: &UpstreamConfig) -> Result<UpstreamClient, crate::tls::TlsError> {
    Ok(client(cfg, connector(cfg)?))
}

fn connector(
    cfg: &UpstreamConfig,
) -> Result<hyper_rustls::HttpsConnector<HttpConnector>, crate::tls::TlsError> {
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

fn client(
    cfg: &UpstreamConfig,
    conn: hyper_rustls::HttpsConnector<HttpConnector>,
) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cfg.pool_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(conn)
}
