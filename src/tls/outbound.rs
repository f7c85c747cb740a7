//! Outbound TLS: the https connector every client of the proxy shares — the
//! upstream pool, JWKS and discovery fetches, the SSF poller, the Intune
//! poller — on the one crypto provider (aws-lc-rs).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;

/// A connector for http and https with the given roots (aws-lc-rs provider).
pub fn https_connector(
    roots: rustls::RootCertStore,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(roots.clone())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(super::provider())
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
