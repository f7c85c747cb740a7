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

/// A connector for http and https with the given roots (aws-lc-rs provider).
pub fn https_connector(
    roots: rustls::RootCertStore,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(roots.clone())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .unwrap_or_else(|_| {
                    // INVARIANT: the aws-lc-rs provider supports TLS 1.3; this branch is unreachable.
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                })
        });
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

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
    let conn = https_connector(roots, Duration::from_millis(cfg.connect_timeout_ms));
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cfg.pool_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(conn))
}
