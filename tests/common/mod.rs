//! Test harness: real certificates (rcgen), real keys, real servers on
//! 127.0.0.1:0, a real TLS client. No mocks, no fixed ports, no sleeps in
//! the tests themselves (waits poll against a deadline).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::pki::{DevCa, SigningKey};
use tokio::net::TcpListener;

pub mod live;
pub mod nats;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for any single wait in a test.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub const AUDIENCE: &str = "https://api.test";

/// What the upstream saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body_len: u64,
    /// No error while reading the body (`/slow` and `/delay` do not read it).
    pub body_ok: bool,
}

/// A real upstream app on loopback that records every request.
///
/// Paths: `/slow` waits 5 s before answering; `/count` streams the body
/// and answers with its length; anything else echoes method, path and headers.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let seen = s2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(upstream_handle(req, seen).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw no request")
    }
}

async fn upstream_handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let mut body_len = 0u64;
    if path == "/slow" || path == "/delay" {
        let wait = if path == "/slow" { 5000 } else { 1000 };
        seen.lock().unwrap().push(Seen {
            method,
            path,
            headers,
            body_len,
            body_ok: true,
        });
        tokio::time::sleep(Duration::from_millis(wait)).await;
        return Response::new(Full::new(Bytes::from_static(b"late")));
    }
    let mut body = req.into_body();
    let mut body_ok = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_len += d.len() as u64;
                }
            }
            Err(_) => {
                body_ok = false;
                break;
            }
        }
    }
    let echo = serde_json::json!({
        "method": method,
        "path": path,
        "body_len": body_len,
        "headers": headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    seen.lock().unwrap().push(Seen {
        method,
        path,
        headers,
        body_len,
        body_ok,
    });
    let mut r = Response::new(Full::new(Bytes::from(echo.to_string())));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    // A hop-by-hop header the proxy must drop on the way back.
    r.headers_mut()
        .insert("x-upstream-hop", http::HeaderValue::from_static("1"));
    r.headers_mut().insert(
        "connection",
        http::HeaderValue::from_static("x-upstream-hop"),
    );
    r
}

/// A WebSocket echo server on loopback.
pub async fn ws_echo_server() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A JWKS (and OIDC discovery) server whose key set a test can change.
pub struct JwksServer {
    pub addr: SocketAddr,
    pub keys: Arc<Mutex<Vec<serde_json::Value>>>,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl JwksServer {
    pub async fn start(issuer: &str, keys: Vec<serde_json::Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let keys = Arc::new(Mutex::new(keys));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (k2, h2, iss) = (keys.clone(), hits.clone(), issuer.to_owned());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (keys, hits, iss) = (k2.clone(), h2.clone(), iss.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (keys, hits, iss) = (keys.clone(), hits.clone(), iss.clone());
                        async move {
                            let body = match req.uri().path() {
                                "/.well-known/openid-configuration" => serde_json::json!({
                                    "issuer": iss,
                                    "jwks_uri": format!("http://{addr}/jwks.json"),
                                }),
                                _ => {
                                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    serde_json::json!({ "keys": *keys.lock().unwrap() })
                                }
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                body.to_string(),
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, keys, hits }
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    pub fn discovery_url(&self) -> String {
        format!("http://{}/.well-known/openid-configuration", self.addr)
    }

    pub fn set_keys(&self, keys: Vec<serde_json::Value>) {
        *self.keys.lock().unwrap() = keys;
    }
}

/// Certificates for a test: a CA and a server certificate for localhost.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub ca_pem: String,
}

impl TestPki {
    pub fn new() -> Self {
        Self::with_names(&["localhost", "127.0.0.1", "app.test", "other.test"])
    }

    /// A CA and a server certificate for these names.
    pub fn with_names(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let server = ca.server_cert(names).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), &server.key_pem).unwrap();
        let ca_pem = ca.cert_pem();
        Self { dir, ca, ca_pem }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a config file into the temp dir and returns its path.
    /// A fresh ES256 issuer key whose public JWKS is written to `jwks.json`.
    pub fn issuer_key(&self, kid: &str) -> SigningKey {
        let key = SigningKey::es256(kid).unwrap();
        std::fs::write(
            self.path().join("jwks.json"),
            serde_json::json!({"keys": [key.jwk]}).to_string(),
        )
        .unwrap();
        key
    }

    /// A `policies/` directory holding the shipped schema and one policy file.
    pub fn policy_dir(&self, file: &str, policies: &str) -> PathBuf {
        let pol = self.path().join("policies");
        std::fs::create_dir_all(&pol).unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/policies/portcullis.cedarschema"
            ),
            pol.join("portcullis.cedarschema"),
        )
        .unwrap();
        std::fs::write(pol.join(file), policies).unwrap();
        pol
    }

    /// A TLS acceptor presenting this PKI's server certificate, offering
    /// exactly `alpn` (none: no ALPN).
    pub fn tls_acceptor(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(self.path().join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_file(self.path().join("server-key.pem"))
                .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    pub fn write_config(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }
}

/// A standard config: TLS on 127.0.0.1:0, one issuer, routes given by the caller.
pub fn base_config(issuer: &str, issuer_keys: &str, routes: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[issuers]]
name = "test"
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256", "ES256", "EdDSA"]
{issuer_keys}
min_refresh_interval_s = 0
leeway_s = 5

{routes}
"#
    )
}

/// A bare TLS stream to `addr` (SNI `localhost`) trusting `ca_pem` and
/// offering exactly `alpn`, for exact bytes; the handshake is bounded by
/// [`DEADLINE`].
pub async fn tls_stream(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap()
}

/// A TLS client trusting the test CA; `h2` picks ALPN h2 only, else http/1.1 only.
pub fn client(
    ca_pem: &str,
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    TestBody,
> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let conn = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    let mut cb = Client::builder(TokioExecutor::new());
    if h2 {
        cb.http2_only(true);
    }
    cb.build(conn)
}

use rustls_pki_types::pem::PemObject;

pub fn empty() -> TestBody {
    Full::new(Bytes::new())
        .map_err(|n| match n {})
        .boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed_unsync()
}

/// Sends a GET with an optional bearer token; returns status, headers, body.
pub async fn get(
    c: &Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TestBody,
    >,
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut b = Request::get(url);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(DEADLINE, c.request(b.body(empty()).unwrap()))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

/// Claims for a valid token from `iss`.
pub fn claims(iss: &str, sub: &str) -> serde_json::Value {
    let now = portcullis::util::now_unix();
    serde_json::json!({
        "iss": iss, "sub": sub, "aud": AUDIENCE,
        "iat": now, "nbf": now, "exp": now + 600,
        "device_id": "laptop-1",
    })
}

/// Generates a key of each kind the tests use.
pub fn keys() -> (SigningKey, SigningKey, SigningKey) {
    (
        SigningKey::rs256("rsa-1").unwrap(),
        SigningKey::es256("ec-1").unwrap(),
        SigningKey::eddsa("ed-1").unwrap(),
    )
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ends a node script that may hold a browser: waits up to `first` for it
/// to exit on its own (it closes its browser first), then SIGTERM, which
/// puppeteer also answers by closing the browser, then SIGKILL after 5 s.
/// Killed at once it would leave Chromium running with no parent. Its
/// stdin is closed first (a script waiting on it stops). Blocking.
pub fn end_browser_script(child: &mut std::process::Child, first: Duration) {
    drop(child.stdin.take());
    let exited = |c: &mut std::process::Child, within: Duration| {
        let start = Instant::now();
        loop {
            if !matches!(c.try_wait(), Ok(None)) {
                return true;
            }
            if start.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    if exited(child, first) {
        return;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    if !exited(child, Duration::from_secs(5)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The portcullis binary built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portcullis"))
}

/// A `portcullis serve` child process.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl ServeProcess {
    pub async fn spawn(config: &Path) -> Self {
        let addr_file = config.with_extension("addrs.json");
        let _ = std::fs::remove_file(&addr_file);
        let child = std::process::Command::new(binary())
            .args(["serve", "--config"])
            .arg(config)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut me = Self {
            child,
            proxy: "127.0.0.1:1".parse().unwrap(),
            admin: "127.0.0.1:1".parse().unwrap(),
        };
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                me.proxy = v["proxy"].as_str().unwrap().parse().unwrap();
                me.admin = v["admin"].as_str().unwrap().parse().unwrap();
                return me;
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                me.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("portcullis exited early ({status}): {err}");
            }
            assert!(start.elapsed() < DEADLINE, "portcullis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client certificate's chain and key, for [`TlsConn`].
pub struct ClientIdentity {
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

impl From<&portcullis::demo::pki::Leaf> for ClientIdentity {
    fn from(l: &portcullis::demo::pki::Leaf) -> Self {
        Self {
            cert_der: l.cert_der.clone(),
            key_pem: l.key_pem.clone(),
        }
    }
}

/// Records whether the server asked for a client certificate, and answers
/// with one when the test gave it.
#[derive(Debug)]
struct CertRecorder {
    key: Option<Arc<rustls::sign::CertifiedKey>>,
    asked: Arc<std::sync::atomic::AtomicBool>,
}

impl rustls::client::ResolvesClientCert for CertRecorder {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// One real TLS connection (HTTP/1.1) to the proxy with a chosen SNI and an
/// optional client certificate, so tests control exactly what the
/// handshake presented and can reuse the connection.
pub struct TlsConn {
    sender: hyper::client::conn::http1::SendRequest<TestBody>,
    /// Whether the server's handshake asked for a client certificate.
    pub asked_for_cert: bool,
    /// Host header default (the SNI, or the address).
    pub host: String,
}

impl TlsConn {
    /// Connects to `addr` with SNI `sni` (an IP address sends none). Fails
    /// when the handshake or the first read fails (TLS 1.3 reports a refused
    /// client certificate only after the client finished).
    pub async fn connect(
        addr: SocketAddr,
        sni: &str,
        ca_pem: &str,
        identity: Option<&ClientIdentity>,
    ) -> Result<Self, BoxError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let key = match identity {
            Some(id) => {
                let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())?;
                let chain = vec![rustls_pki_types::CertificateDer::from(id.cert_der.clone())];
                Some(Arc::new(rustls::sign::CertifiedKey::from_der(
                    chain, key, &provider,
                )?))
            }
            None => None,
        };
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(CertRecorder {
                key,
                asked: asked.clone(),
            }));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = rustls_pki_types::ServerName::try_from(sni.to_owned())?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio::time::timeout(
            DEADLINE,
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp),
        )
        .await??;
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = if sni.parse::<std::net::IpAddr>().is_ok() {
            addr.to_string()
        } else {
            format!("{sni}:{}", addr.port())
        };
        Ok(Self {
            sender,
            asked_for_cert: asked.load(std::sync::atomic::Ordering::SeqCst),
            host,
        })
    }

    /// Sends one request on this connection; `Host` defaults to the SNI.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), BoxError> {
        let mut b = Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            b = b.header("host", &self.host);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(empty())?;
        tokio::time::timeout(DEADLINE, self.sender.ready()).await??;
        let resp = tokio::time::timeout(DEADLINE, self.sender.send_request(req)).await??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// Sends one request with a body on this connection.
    pub async fn send_body(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), BoxError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(full(body))?;
        tokio::time::timeout(DEADLINE, self.sender.ready()).await??;
        let resp = tokio::time::timeout(DEADLINE, self.sender.send_request(req)).await??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// Like [`TlsConn::send`] for a GET, panicking on transport errors.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        self.send("GET", path, headers).await.unwrap()
    }
}
pub mod demo_idp;
pub mod idp;
