//! The upstream client: hyper-util's pooled client over rustls, shared by
//! every route, with connect and idle limits from config.

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

/// Builds the upstream client from config.
pub fn upstream_client(cfg: &UpstreamConfig) -> Result<UpstreamClient, crate::tls::TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = &cfg.ca {
        roots.extend(crate::tls::load_roots(&[ca])?.roots);
    }
    let conn =
        crate::tls::outbound::https_connector(roots, Duration::from_millis(cfg.connect_timeout_ms));
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cfg.pool_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(conn))
}
