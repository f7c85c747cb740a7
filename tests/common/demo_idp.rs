//! The demo's minimal OpenID provider (`portcullis::demo::oidc`) served on
//! loopback, for tests that need a login without the npm one: discovery,
//! JWKS, authorize, the login click, token and end-session.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::oidc::DemoProvider;
use portcullis::demo::pki::SigningKey;
use serde_json::json;
use tokio::net::TcpListener;

use super::DEADLINE;

/// A running demo provider: its issuer URL and the client secret it expects.
pub struct DemoIdp {
    pub url: String,
    pub secret: String,
}

impl DemoIdp {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let key = Arc::new(SigningKey::es256("idp-1").unwrap());
        let secret = "s3cret-for-tests".to_owned();
        let provider = Arc::new(DemoProvider::new(url.clone(), key.clone(), secret.clone()));
        let jwks = json!({ "keys": [key.jwk] }).to_string();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (provider, jwks) = (provider.clone(), jwks.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (provider, jwks) = (provider.clone(), jwks.clone());
                        async move {
                            let r = match (req.method().as_str(), req.uri().path()) {
                                ("GET", "/.well-known/openid-configuration") => {
                                    http::Response::new(Full::new(Bytes::from(
                                        provider.discovery().to_string(),
                                    )))
                                }
                                ("GET", "/jwks.json") => {
                                    http::Response::new(Full::new(Bytes::from(jwks)))
                                }
                                ("GET", "/authorize") => provider.authorize(&req),
                                ("GET", "/login") => provider.login(&req),
                                ("POST", "/token") => provider.token(req).await,
                                _ => provider.end_session(),
                            };
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { url, secret }
    }

    /// Clicks through the login page for `sub` (no MFA); returns the
    /// redirect back to the proxy's callback.
    pub async fn login(&self, authorize_url: &str, sub: &str) -> String {
        let (status, _, body) = plain_get(authorize_url).await;
        assert_eq!(status, StatusCode::OK, "authorize page");
        let body = String::from_utf8_lossy(&body).into_owned();
        let rid = body
            .split("rid=")
            .nth(1)
            .and_then(|r| r.split(['&', '"']).next())
            .expect("login page names the request")
            .to_owned();
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("rid", &rid)
            .append_pair("sub", sub)
            .append_pair("mfa", "0")
            .finish();
        let (status, h, _) = plain_get(&format!("{}/login?{q}", self.url)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "login click");
        h["location"].to_str().unwrap().to_owned()
    }
}

/// A plain-HTTP GET: status, headers, body.
pub async fn plain_get(url: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let c = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(
        DEADLINE,
        c.request(Request::get(url).body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("request timed out")
    .expect("request failed");
    let (p, b) = resp.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}
