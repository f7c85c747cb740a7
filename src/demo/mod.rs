//! `portcullis demo`: the embedded default, needing no other service.
//!
//! Generates a dev CA and server certificate, starts a built-in demo app
//! (the upstream) and a local dev token issuer (OIDC discovery + JWKS +
//! a `/token` endpoint), starts the proxy in front of the app on 127.0.0.1
//! with the default policy set, seeds `laptop-001` as a managed, compliant
//! laptop, writes `demo.env`, and prints `curl` commands that work as
//! printed — including a device going noncompliant (restrict) and then
//! lost (revoke), live.

pub mod pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use self::pki::{DevCa, PkiError, SigningKey, write_file};

/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = ".portcullis-demo";
/// The demo's audience.
pub const DEMO_AUDIENCE: &str = "portcullis-demo";
/// The claim naming the device in demo tokens.
pub const DEMO_DEVICE_CLAIM: &str = "device_id";
/// The demo's signing key id.
pub const DEMO_KID: &str = "demo-es256-1";

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where certificates, keys, config and `demo.env` go.
    pub data_dir: PathBuf,
    /// Proxy (TLS) port on 127.0.0.1; 0 picks a free one.
    pub proxy_port: u16,
    /// Admin port on 127.0.0.1; 0 picks a free one.
    pub admin_port: u16,
}

/// A demo failure.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// PKI or file problem.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A helper server could not bind.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    /// The proxy could not start.
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    /// The seed device could not be recorded.
    #[error("seeding the demo device: {0}")]
    Seed(#[from] crate::posture::IngestError),
}

/// The default policy set, written into the demo's data directory.
const DEMO_POLICIES: &[(&str, &str)] = &[
    (
        "default.cedar",
        include_str!("../../config/policies/default.cedar"),
    ),
    (
        "workloads.cedar",
        include_str!("../../config/policies/workloads.cedar"),
    ),
    (
        "portcullis.cedarschema",
        include_str!("../../config/policies/portcullis.cedarschema"),
    ),
];

/// A random secret for the demo's admin API and MDM source.
fn secret() -> String {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        b.copy_from_slice(
            &crate::util::sha256(crate::util::now_unix_ms().to_string().as_bytes())[..16],
        );
    }
    crate::util::hex(&b)
}

/// What a running demo exposes, for tests and the printed walkthrough.
#[derive(Debug)]
pub struct RunningDemo {
    /// The proxy.
    pub server: crate::server::RunningServer,
    /// Public proxy URL.
    pub proxy_url: String,
    /// Admin URL.
    pub admin_url: String,
    /// Path of `demo.env`.
    pub env_file: PathBuf,
    /// A ready-to-use token.
    pub token: String,
    /// The walkthrough text.
    pub walkthrough: String,
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn serve_plain<F>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// The built-in demo app: answers every request with what it was told about
/// the caller, so a reader sees exactly what the proxy forwarded.
fn demo_app(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "app": "portcullis demo app",
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "subject": h("x-portcullis-subject"),
            "issuer": h("x-portcullis-issuer"),
            "device": h("x-portcullis-device"),
            "route": h("x-portcullis-route"),
            "decision": h("x-portcullis-decision"),
            "request_id": h("x-request-id"),
            "forwarded_for": h("x-forwarded-for"),
        }),
    )
}

/// Claims of a demo token for `sub` on `device`, valid for `ttl_s`.
pub fn demo_claims(issuer: &str, sub: &str, device: Option<&str>, ttl_s: u64) -> serde_json::Value {
    let now = crate::util::now_unix();
    let mut c = serde_json::json!({
        "iss": issuer, "sub": sub, "aud": DEMO_AUDIENCE,
        "iat": now, "nbf": now, "exp": now + ttl_s,
        "jti": format!("demo-{}", crate::util::RequestIds::default().next_id()),
        "acr": "urn:portcullis:acr:pwd", "amr": ["pwd"], "auth_time": now,
    });
    if let (Some(d), Some(obj)) = (device, c.as_object_mut()) {
        obj.insert(DEMO_DEVICE_CLAIM.into(), d.into());
    }
    c
}

/// The dev token issuer: OIDC discovery, JWKS, and `GET /token?sub=…&device_id=…`.
fn dev_issuer(
    key: Arc<SigningKey>,
    issuer: String,
) -> impl Fn(Request<Incoming>) -> Response<Full<Bytes>> {
    move |req| match req.uri().path() {
        "/.well-known/openid-configuration" => json(
            StatusCode::OK,
            &serde_json::json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/jwks.json"),
                "token_endpoint": format!("{issuer}/token"),
                "id_token_signing_alg_values_supported": [key.alg],
            }),
        ),
        "/jwks.json" => json(StatusCode::OK, &serde_json::json!({ "keys": [key.jwk] })),
        "/token" => {
            let mut sub = "alice@example.com".to_owned();
            let mut device = Some("laptop-001".to_owned());
            for (k, v) in req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
            {
                match k {
                    "sub" if !v.is_empty() && v.len() <= 128 => sub = v.to_owned(),
                    "device_id" if v.is_empty() => device = None,
                    "device_id" if v.len() <= 128 => device = Some(v.to_owned()),
                    _ => {}
                }
            }
            match key.sign(&demo_claims(&issuer, &sub, device.as_deref(), 3600)) {
                Ok(t) => json(
                    StatusCode::OK,
                    &serde_json::json!({"access_token": t, "token_type": "Bearer", "expires_in": 3600}),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found"}),
        ),
    }
}

fn demo_config(
    proxy: SocketAddr,
    admin: SocketAddr,
    issuer: &str,
    app: SocketAddr,
    admin_token: &str,
    mdm_secret: &str,
) -> String {
    format!(
        r#"# Generated by `portcullis demo`. The upstream and issuer ports are the demo's own.
[proxy]
listen = "{proxy}"

[admin]
listen = "{admin}"
api_token = "{admin_token}"

[policy]
dir = "policies"
audit = {{ path = "audit.jsonl", sample_allow = 1.0 }}

[[feeds.mdm]]
name = "demo"
secret = "{mdm_secret}"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[issuers]]
name = "demo"
issuer = "{issuer}"
audiences = ["{DEMO_AUDIENCE}"]
algorithms = ["ES256"]
discovery_url = "{issuer}/.well-known/openid-configuration"
device_claim = "{DEMO_DEVICE_CLAIM}"
min_refresh_interval_s = 5

[[routes]]
name = "demo-app"
path_prefix = "/"
upstream = "http://{app}"
sensitivity = "medium"
auth = "bearer"

[[routes]]
name = "demo-public"
path_prefix = "/public"
upstream = "http://{app}"
sensitivity = "low"
auth = "public"
"#
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Starts everything and returns once the proxy is listening.
pub async fn start(opts: &DemoOptions) -> Result<RunningDemo, DemoError> {
    let dir = std::path::absolute(&opts.data_dir).unwrap_or_else(|_| opts.data_dir.clone());
    std::fs::create_dir_all(&dir)?;

    // PKI: a dev CA and a server certificate for 127.0.0.1 / localhost.
    let ca = DevCa::new("portcullis demo CA")?;
    let server = ca.server_cert(&["localhost", "127.0.0.1", "::1"])?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem(), false)?;
    write_file(&dir.join("server.pem"), &server.cert_pem, false)?;
    write_file(&dir.join("server-key.pem"), &server.key_pem, true)?;

    // The dev token issuer.
    let key = Arc::new(SigningKey::es256(DEMO_KID)?);
    write_file(&dir.join("issuer-key.pem"), &key.private_pem, true)?;
    let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
    write_file(&dir.join("issuer-jwks.json"), &jwks, false)?;
    let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
    let issuer_url = format!("http://{}", issuer_listener.local_addr()?);
    tokio::spawn(serve_plain(
        issuer_listener,
        dev_issuer(key.clone(), issuer_url.clone()),
    ));

    // The demo app.
    let app_listener = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    tokio::spawn(serve_plain(app_listener, demo_app));

    // The proxy.
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], opts.proxy_port).into();
    let admin_addr: SocketAddr = ([127, 0, 0, 1], opts.admin_port).into();
    let cfg_path = dir.join("portcullis.toml");
    let admin_token = secret();
    let mdm_secret = secret();
    for (name, text) in DEMO_POLICIES {
        write_file(&dir.join("policies").join(name), text, false)?;
    }
    write_file(
        &cfg_path,
        &demo_config(
            proxy_addr,
            admin_addr,
            &issuer_url,
            app_addr,
            &admin_token,
            &mdm_secret,
        ),
        true,
    )?;
    let server = crate::server::start(cfg_path.clone()).await?;
    seed(&server).await?;

    let token = key.sign(&demo_claims(
        &issuer_url,
        "alice@example.com",
        Some("laptop-001"),
        12 * 3600,
    ))?;
    let proxy_url = format!("https://{}", server.proxy_addr);
    let admin_url = format!("http://{}", server.admin_addr);
    let ca_path = dir.join("ca.pem");
    let env_file = dir.join("demo.env");
    let env = [
        ("PORTCULLIS_PROXY_URL", proxy_url.clone()),
        ("PORTCULLIS_ADMIN_URL", admin_url.clone()),
        ("PORTCULLIS_CA_CERT", ca_path.display().to_string()),
        ("PORTCULLIS_ISSUER", issuer_url.clone()),
        ("PORTCULLIS_AUDIENCE", DEMO_AUDIENCE.to_owned()),
        ("PORTCULLIS_ISSUER_ALG", key.alg.to_owned()),
        ("PORTCULLIS_ISSUER_KID", key.kid.clone()),
        (
            "PORTCULLIS_ISSUER_KEY",
            dir.join("issuer-key.pem").display().to_string(),
        ),
        (
            "PORTCULLIS_ISSUER_JWKS",
            dir.join("issuer-jwks.json").display().to_string(),
        ),
        ("PORTCULLIS_DEVICE_CLAIM", DEMO_DEVICE_CLAIM.to_owned()),
        ("PORTCULLIS_TOKEN", token.clone()),
        ("PORTCULLIS_CONFIG", cfg_path.display().to_string()),
        (
            "PORTCULLIS_MDM_URL",
            format!("{admin_url}/mdm/v1/demo/events"),
        ),
        ("PORTCULLIS_MDM_SECRET", mdm_secret.clone()),
        ("PORTCULLIS_ADMIN_TOKEN", admin_token.clone()),
    ];
    let env_text: String = env
        .iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect();
    write_file(&env_file, &env_text, true)?;

    let ca_arg = shell_quote(&ca_path.display().to_string());
    let mdm_url = format!("{admin_url}/mdm/v1/demo/events");
    // Event ids unique per run (the store outlives a run); times after the seed.
    let run = crate::util::RequestIds::default().next_id();
    let at = crate::util::now_unix_ms();
    let noncompliant = format!(
        r#"{{"event_id":"noncompliant-{run}","device_id":"laptop-001","occurred_at":{at},"compliance":"non_compliant"}}"#
    );
    let walkthrough = format!(
        "portcullis demo is running.\n\
         \n  proxy  {proxy_url}  (TLS, dev CA at {ca})\
         \n  admin  {admin_url}  (/metrics, /healthz, /readyz)\
         \n  issuer {issuer_url}  (dev token issuer: /token?sub=…&device_id=…)\
         \n  env    {env}  (source it: . {env})\n\
         \n# 1. An allowed request: a valid token for alice on laptop-001 reaches the demo app.\n\
         curl -sS --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 2. A rejected request: no token, so the proxy answers 401 and the app never sees it.\n\
         curl -sS -i --cacert {ca_arg} {proxy_url}/hello\n\
         \n# 3. A rejected request: a tampered token (last signature characters changed) gets 401 invalid_token.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {tampered}' {proxy_url}/hello\n\
         \n# 4. A public route needs no token.\n\
         curl -sS --cacert {ca_arg} {proxy_url}/public/info\n\
         \n# 5. Metrics.\n\
         curl -s {admin_url}/metrics | grep portcullis_requests\n\
         \n# Policy, live: laptop-001 was seeded as a managed, compliant laptop, so\n\
         # alice can read and write. 6. Its MDM reports it noncompliant...\n\
         curl -sS -X POST {mdm_url} -H 'Authorization: Bearer {mdm_secret}' -H 'Content-Type: application/json' -d '{noncompliant}'\n\
         \n# 7. ...reads still pass (the app sees \"decision\": \"restrict\")...\n\
         curl -sS --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 8. ...but writes get 403 with the reason.\n\
         curl -sS -i --cacert {ca_arg} -X POST -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 9. The laptop is reported lost (operator admin API)...\n\
         curl -sS -X POST {admin_url}/admin/v1/devices/laptop-001/lost -H 'Authorization: Bearer {admin_token}'\n\
         \n# 10. ...and the same token is revoked, on every route: 401.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# Why? Every decision is in {audit} (one JSON line each), and\n\
         # portcullis explain --config {cfg} --subject alice@example.com --device laptop-001 --route demo-app\n\
         \nPress Ctrl-C to stop.\n",
        ca = ca_path.display(),
        env = env_file.display(),
        tampered = tamper(&token),
        mdm_url = mdm_url,
        audit = dir.join("audit.jsonl").display(),
        cfg = cfg_path.display(),
    );
    Ok(RunningDemo {
        server,
        proxy_url,
        admin_url,
        env_file,
        token,
        walkthrough,
    })
}

/// Records `laptop-001` as alice's managed, compliant corporate laptop,
/// through the one apply path, as an MDM would.
async fn seed(server: &crate::server::RunningServer) -> Result<(), DemoError> {
    use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};
    use crate::posture::model::{Compliance, Lifecycle, Ownership};
    let now = crate::util::now_unix_ms();
    let ev = PostureEvent {
        id: format!("demo:seed:{}", crate::util::RequestIds::default().next_id()),
        feed: Feed::Mdm,
        kind: "mdm.device-lifecycle".into(),
        origin_ms: now,
        changes: vec![Change::Device {
            id: "laptop-001".into(),
            patch: DevicePatch {
                platform: Some("macos".into()),
                ownership: Some(Ownership::Corporate),
                management_source: Some("demo".into()),
                lifecycle: Some(Lifecycle::Enrolled),
                compliance: Some(Compliance::Compliant),
                compromised: Some(false),
                patch_behind: Some(false),
                last_check_in_ms: Some(now),
                subjects: Some(vec!["alice@example.com".into()]),
                ..DevicePatch::default()
            },
        }],
    };
    server.shared.posture.ingest(vec![ev]).await?;
    Ok(())
}

/// Changes the last characters of a token's signature.
fn tamper(token: &str) -> String {
    let mut t = token.to_owned();
    let tail = if t.ends_with("AAAA") { "BBBB" } else { "AAAA" };
    t.truncate(t.len().saturating_sub(4));
    t.push_str(tail);
    t
}

/// Where the demo keeps its files by default.
pub fn default_data_dir() -> &'static Path {
    Path::new(DEFAULT_DATA_DIR)
}
