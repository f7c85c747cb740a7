//! `portcullis demo`: the embedded default, needing no other service.
//!
//! Generates a dev CA and server certificate, a device CA and a device
//! certificate for the seeded device, and a DPoP client key; starts a
//! built-in demo app (the upstream) and a local dev token issuer (OIDC
//! discovery + JWKS + `/token`, which can bind tokens with `cnf`, and a
//! `/dpop-proof` helper that signs proofs with the demo client's key);
//! starts the proxy in front of the app on 127.0.0.1, writes `demo.env`, and
//! prints `curl` commands that work as printed — bearer, DPoP-bound and
//! mTLS-bound. Nothing here is for production use.

pub mod oidc;
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
/// The seeded device.
pub const DEMO_DEVICE_ID: &str = "laptop-001";
/// How the demo reads the device id from a client certificate.
pub const DEMO_DEVICE_ID_RULE: &str = "san-uri:device://{id}";
/// The one name whose handshakes request a client certificate (`*.localhost`
/// resolves to loopback, RFC 6761; curl does so itself).
pub const DEMO_MTLS_HOST: &str = "mtls.localhost";

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

/// Serves the dev issuer: the OpenID provider's browser endpoints (which
/// read bodies, so they are async) in front of the token helpers.
async fn serve_issuer<F>(listener: TcpListener, provider: Arc<oidc::DemoProvider>, helpers: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let helpers = Arc::new(helpers);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let helpers = helpers.clone();
        let provider = provider.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let helpers = helpers.clone();
                let provider = provider.clone();
                async move {
                    let resp = match (req.method().as_str(), req.uri().path()) {
                        ("GET", "/.well-known/openid-configuration") => {
                            json(StatusCode::OK, &provider.discovery())
                        }
                        ("GET", "/authorize") => provider.authorize(&req),
                        ("GET", "/login") => provider.login(&req),
                        ("POST", "/token") => provider.token(req).await,
                        ("GET", "/end_session") => provider.end_session(),
                        _ => helpers(req),
                    };
                    Ok::<_, Infallible>(resp)
                }
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
            "binding": h("x-portcullis-binding"),
            "verified_device": h("x-portcullis-verified-device"),
            "workload": h("x-portcullis-workload"),
            "route": h("x-portcullis-route"),
            "decision": h("x-portcullis-decision"),
            "device_compliance": h("x-portcullis-device-compliance"),
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

/// The demo's DPoP client: its key and the token bound to it. The dev
/// issuer's `/dpop-proof` signs fresh proofs with it so the printed curl
/// command works every time; a real client signs its own.
struct DpopWallet {
    key: SigningKey,
    token: String,
}

/// A query parameter, percent-decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// The dev token issuer: OIDC discovery, JWKS,
/// `GET /token?sub=…&device_id=…&jkt=…&x5t=…` (a token, bound by `cnf` when
/// `jkt` / `x5t` are given), and `GET /dpop-proof?htm=…&htu=…` (a fresh
/// proof by the demo client's key for its DPoP-bound token, as text).
fn dev_issuer(
    key: Arc<SigningKey>,
    issuer: String,
    wallet: Arc<DpopWallet>,
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
            let mut claims = demo_claims(&issuer, &sub, device.as_deref(), 3600);
            let mut cnf = serde_json::Map::new();
            if let Some(jkt) = query_param(&req, "jkt").filter(|v| !v.is_empty()) {
                cnf.insert("jkt".into(), jkt.into());
            }
            if let Some(x5t) = query_param(&req, "x5t").filter(|v| !v.is_empty()) {
                cnf.insert("x5t#S256".into(), x5t.into());
            }
            if !cnf.is_empty() {
                claims["cnf"] = cnf.into();
            }
            match key.sign(&claims) {
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
        "/dpop-proof" => {
            let htm = query_param(&req, "htm").unwrap_or_else(|| "GET".to_owned());
            let Some(htu) = query_param(&req, "htu") else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "htu is required"}),
                );
            };
            let nonce = query_param(&req, "nonce");
            match wallet
                .key
                .dpop_proof(&htm, &htu, Some(&wallet.token), nonce.as_deref())
            {
                Ok(p) => Response::new(Full::new(Bytes::from(p))),
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

/// The secrets and names the demo's feeds use (random per run).
struct FeedSecrets {
    admin: String,
    scim: String,
    ssf_push: String,
    mdm: String,
}

fn random_secret() -> String {
    let mut b = [0u8; 24];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // INVARIANT: the system RNG does not fail on supported platforms; a
        // clock-derived value still keeps the demo working if it somehow does.
        b[..8].copy_from_slice(&crate::util::now_unix_ms().to_be_bytes());
    }
    hex::encode(b)
}

/// The demo transmitter's `iss` and the receiver audience.
pub const DEMO_SSF_ISSUER: &str = "https://ssf.demo.portcullis";
/// The audience the demo's SSF receiver accepts.
pub const DEMO_SSF_AUDIENCE: &str = "https://portcullis.demo/ssf";
/// The demo transmitter's key id.
pub const DEMO_SSF_KID: &str = "demo-ssf-1";
/// The demo's generic MDM source name.
pub const DEMO_MDM_SOURCE: &str = "demo";

fn demo_config(
    proxy: SocketAddr,
    admin: SocketAddr,
    issuer: &str,
    app: SocketAddr,
    secrets: &FeedSecrets,
) -> String {
    let FeedSecrets {
        admin: admin_token,
        scim,
        ssf_push,
        mdm,
    } = secrets;
    let browser_client = oidc::DEMO_CLIENT_ID;
    format!(
        r#"# Generated by `portcullis demo`. The upstream and issuer ports are the demo's own.
[proxy]
listen = "{proxy}"

[admin]
listen = "{admin}"
api_token = "{admin_token}"

[store]
path = "portcullis.db"

[policy]
dir = "policies"
audit = {{ path = "audit.jsonl", sample_allow = 1.0 }}

[feeds.ssf]
push_token = "{ssf_push}"
issuer = "{DEMO_SSF_ISSUER}"
audiences = ["{DEMO_SSF_AUDIENCE}"]
algorithms = ["ES256"]
jwks_file = "ssf-jwks.json"

[feeds.scim]
token = "{scim}"
subject_attribute = "userName"

[feeds.scim.group_entitlements]
engineering = ["git:write", "wiki:read"]

[[feeds.mdm]]
name = "{DEMO_MDM_SOURCE}"
secret = "{mdm}"

[tls]
# Device certificates: requested only on {DEMO_MTLS_HOST}, verified against the demo device CA.
client_ca = ["device-ca.pem"]
client_auth_hosts = ["{DEMO_MTLS_HOST}"]

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[binding]
device_id_rule = "{DEMO_DEVICE_ID_RULE}"

[[issuers]]
name = "demo"
issuer = "{issuer}"
audiences = ["{DEMO_AUDIENCE}"]
algorithms = ["ES256"]
discovery_url = "{issuer}/.well-known/openid-configuration"
device_claim = "{DEMO_DEVICE_CLAIM}"
min_refresh_interval_s = 5

# The signed identity the demo app receives (x-portcullis-assertion); its
# keys are served at /.well-known/portcullis/jwks.json on the proxy listener.
[assertion]
issuer = "https://portcullis.demo"

[[assertion.keys]]
kid = "demo-assertion-1"
private_key_file = "assertion-key.pem"

[[routes]]
name = "demo-app"
path_prefix = "/"
upstream = "http://{app}"
sensitivity = "medium"
auth = "bearer"

[browser]
# The dev issuer is also a minimal OpenID provider with a one-click login page.
issuer = "demo"
client_id = "{browser_client}"
client_secret_file = "browser-client-secret"
scopes = ["openid"]
session_idle_s = 1800
session_max_s = 28800

[[routes]]
name = "demo-browser"
path_prefix = "/app"
upstream = "http://{app}"
sensitivity = "medium"
auth = "browser"

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
    let path = |name: &str| dir.join(name);
    let shown = |name: &str| dir.join(name).display().to_string();

    // PKI: a dev CA and a server certificate for 127.0.0.1 / localhost and
    // the client-certificate name.
    let ca = DevCa::new("portcullis demo CA")?;
    let server = ca.server_cert(&["localhost", "127.0.0.1", "::1", DEMO_MTLS_HOST])?;
    write_file(&path("ca.pem"), &ca.cert_pem(), false)?;
    write_file(&path("server.pem"), &server.cert_pem, false)?;
    write_file(&path("server-key.pem"), &server.key_pem, true)?;

    // Devices: a device CA and the seeded device's certificate.
    let device_ca = DevCa::new("portcullis demo device CA")?;
    let device_uri = DEMO_DEVICE_ID_RULE
        .trim_start_matches("san-uri:")
        .replace("{id}", DEMO_DEVICE_ID);
    let device = device_ca.client_cert(DEMO_DEVICE_ID, &[&device_uri])?;
    write_file(&path("device-ca.pem"), &device_ca.cert_pem(), false)?;
    write_file(&path("device-ca-key.pem"), &device_ca.key_pem(), true)?;
    write_file(&path("device.pem"), &device.cert_pem, false)?;
    write_file(&path("device-key.pem"), &device.key_pem, true)?;
    let device_x5t = crate::binding::mtls::encode_x5t(&crate::util::sha256(&device.cert_der));

    // The dev token issuer, and the tokens it mints for the walkthrough.
    let key = Arc::new(SigningKey::es256(DEMO_KID)?);
    write_file(&path("issuer-key.pem"), &key.private_pem, true)?;
    // The key that signs the identity assertion for the demo app.
    let assertion_key = SigningKey::es256("demo-assertion-1")?;
    write_file(&path("assertion-key.pem"), &assertion_key.private_pem, true)?;
    let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
    write_file(&path("issuer-jwks.json"), &jwks, false)?;
    let issuer_listener = TcpListener::bind("127.0.0.1:0").await?;
    let issuer_url = format!("http://{}", issuer_listener.local_addr()?);
    let mint = |cnf: Option<serde_json::Value>| {
        let mut c = demo_claims(
            &issuer_url,
            "alice@example.com",
            Some(DEMO_DEVICE_ID),
            12 * 3600,
        );
        if let Some(cnf) = cnf {
            c["cnf"] = cnf;
        }
        key.sign(&c)
    };
    let token = mint(None)?;
    let dpop_key = SigningKey::es256("demo-client")?;
    write_file(&path("dpop-key.pem"), &dpop_key.private_pem, true)?;
    let dpop_token = mint(Some(serde_json::json!({ "jkt": dpop_key.thumbprint()? })))?;
    let mtls_token = mint(Some(serde_json::json!({ "x5t#S256": device_x5t })))?;
    let wallet = Arc::new(DpopWallet {
        key: dpop_key,
        token: dpop_token.clone(),
    });
    let browser_secret = random_secret();
    write_file(&path("browser-client-secret"), &browser_secret, true)?;
    let provider = Arc::new(oidc::DemoProvider::new(
        issuer_url.clone(),
        key.clone(),
        browser_secret,
    ));
    tokio::spawn(serve_issuer(
        issuer_listener,
        provider,
        dev_issuer(key.clone(), issuer_url.clone(), wallet),
    ));

    // The demo app.
    let app_listener = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    tokio::spawn(serve_plain(app_listener, demo_app));

    // The demo's SSF transmitter key, for outside SET signers.
    let ssf_key = SigningKey::es256(DEMO_SSF_KID)?;
    write_file(&dir.join("ssf-key.pem"), &ssf_key.private_pem, true)?;
    write_file(
        &dir.join("ssf-jwks.json"),
        &serde_json::json!({ "keys": [ssf_key.jwk] }).to_string(),
        false,
    )?;
    let secrets = FeedSecrets {
        admin: random_secret(),
        scim: random_secret(),
        ssf_push: random_secret(),
        mdm: random_secret(),
    };
    // A fresh store each run, so the walkthrough starts from the seeded state.
    for f in ["portcullis.db", "portcullis.db-wal", "portcullis.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }

    // The proxy.
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], opts.proxy_port).into();
    let admin_addr: SocketAddr = ([127, 0, 0, 1], opts.admin_port).into();
    let cfg_path = path("portcullis.toml");
    write_file(
        &cfg_path,
        &demo_config(proxy_addr, admin_addr, &issuer_url, app_addr, &secrets),
        false,
    )?;
    for (name, text) in DEMO_POLICIES {
        write_file(&dir.join("policies").join(name), text, false)?;
    }
    let server = crate::server::start(cfg_path.clone()).await?;
    let seeded_ms = seed(&server.shared.posture).await?;

    let proxy_url = format!("https://{}", server.proxy_addr);
    let mtls_url = format!("https://{DEMO_MTLS_HOST}:{}", server.proxy_addr.port());
    let browser_url = format!("https://localhost:{}/app/", server.proxy_addr.port());
    let admin_url = format!("http://{}", server.admin_addr);
    let env_file = path("demo.env");
    let env = [
        ("PORTCULLIS_PROXY_URL", proxy_url.clone()),
        ("PORTCULLIS_ADMIN_URL", admin_url.clone()),
        ("PORTCULLIS_CA_CERT", shown("ca.pem")),
        ("PORTCULLIS_ISSUER", issuer_url.clone()),
        ("PORTCULLIS_AUDIENCE", DEMO_AUDIENCE.to_owned()),
        ("PORTCULLIS_ISSUER_ALG", key.alg.to_owned()),
        ("PORTCULLIS_ISSUER_KID", key.kid.clone()),
        ("PORTCULLIS_ISSUER_KEY", shown("issuer-key.pem")),
        ("PORTCULLIS_ISSUER_JWKS", shown("issuer-jwks.json")),
        (
            "PORTCULLIS_ASSERTION_JWKS",
            format!("{proxy_url}/.well-known/portcullis/jwks.json"),
        ),
        ("PORTCULLIS_DEVICE_CLAIM", DEMO_DEVICE_CLAIM.to_owned()),
        ("PORTCULLIS_TOKEN", token.clone()),
        ("PORTCULLIS_CONFIG", cfg_path.display().to_string()),
        ("PORTCULLIS_ADMIN_TOKEN", secrets.admin.clone()),
        ("PORTCULLIS_SCIM_URL", format!("{admin_url}/scim/v2")),
        ("PORTCULLIS_SCIM_TOKEN", secrets.scim.clone()),
        ("PORTCULLIS_SSF_PUSH_URL", format!("{admin_url}/ssf/push")),
        ("PORTCULLIS_SSF_PUSH_TOKEN", secrets.ssf_push.clone()),
        ("PORTCULLIS_SSF_ISSUER", DEMO_SSF_ISSUER.to_owned()),
        ("PORTCULLIS_SSF_AUDIENCE", DEMO_SSF_AUDIENCE.to_owned()),
        ("PORTCULLIS_SSF_ALG", ssf_key.alg.to_owned()),
        ("PORTCULLIS_SSF_KID", ssf_key.kid.clone()),
        (
            "PORTCULLIS_SSF_KEY",
            dir.join("ssf-key.pem").display().to_string(),
        ),
        (
            "PORTCULLIS_MDM_URL",
            format!("{admin_url}/mdm/v1/{DEMO_MDM_SOURCE}/events"),
        ),
        ("PORTCULLIS_MDM_SECRET", secrets.mdm.clone()),
        ("PORTCULLIS_MTLS_URL", mtls_url.clone()),
        ("PORTCULLIS_DEVICE_CA_CERT", shown("device-ca.pem")),
        ("PORTCULLIS_DEVICE_CA_KEY", shown("device-ca-key.pem")),
        ("PORTCULLIS_DEVICE_ID_RULE", DEMO_DEVICE_ID_RULE.to_owned()),
        ("PORTCULLIS_DEVICE_ID", DEMO_DEVICE_ID.to_owned()),
        ("PORTCULLIS_DEVICE_CERT", shown("device.pem")),
        ("PORTCULLIS_DEVICE_KEY", shown("device-key.pem")),
        ("PORTCULLIS_MTLS_TOKEN", mtls_token.clone()),
        ("PORTCULLIS_DPOP_KEY", shown("dpop-key.pem")),
        ("PORTCULLIS_DPOP_TOKEN", dpop_token.clone()),
        ("PORTCULLIS_BROWSER_URL", browser_url.clone()),
    ];
    let env_text: String = env
        .iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect();
    write_file(&env_file, &env_text, true)?;

    let ca_arg = shell_quote(&shown("ca.pem"));
    let walkthrough = format!(
        "portcullis demo is running.\n\
         \n  proxy  {proxy_url}  (TLS, dev CA at {ca})\
         \n  mtls   {mtls_url}  (the one name that asks for a device certificate)\
         \n  admin  {admin_url}  (/metrics, /healthz, /readyz)\
         \n  issuer {issuer_url}  (dev token issuer: /token?sub=…&device_id=…&jkt=…&x5t=…, /dpop-proof?htm=…&htu=…)\
         \n  env    {env}  (source it: . {env})\n\
         \n# 1. An allowed request: a valid token for alice on {DEMO_DEVICE_ID} reaches the demo app.\n\
         curl -sS --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 2. A rejected request: no token, so the proxy answers 401 and the app never sees it.\n\
         curl -sS -i --cacert {ca_arg} {proxy_url}/hello\n\
         \n# 3. A rejected request: a tampered token (last signature characters changed) gets 401 invalid_token.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {tampered}' {proxy_url}/hello\n\
         \n# 4. A public route needs no token.\n\
         curl -sS --cacert {ca_arg} {proxy_url}/public/info\n\
         \n# 5. A DPoP-bound request (RFC 9449): the token is bound to the demo client's key (dpop-key.pem) and\n\
         #    every request carries a fresh proof signed with it. The dev issuer's /dpop-proof signs one for\n\
         #    this demo; a real client signs its own.\n\
         curl -sS --cacert {ca_arg} -H 'Authorization: DPoP {dpop_token}' -H \"DPoP: $(curl -sS '{issuer_url}/dpop-proof?htm=GET&htu={proxy_url}/hello')\" {proxy_url}/hello\n\
         \n# 6. The same DPoP-bound token as a plain bearer token: 401, a stolen DPoP token is useless without its key.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {dpop_token}' {proxy_url}/hello\n\
         \n# 7. An mTLS-bound request (RFC 8705) with {DEMO_DEVICE_ID}'s device certificate, on {DEMO_MTLS_HOST}.\n\
         curl -sS --cacert {ca_arg} --cert {device_arg} --key {device_key_arg} -H 'Authorization: Bearer {mtls_token}' {mtls_url}/hello\n\
         \n# 8. The same certificate-bound token without the certificate: 401.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {mtls_token}' {proxy_url}/hello\n\
         \n# 9. The seeded state: laptop-001 is alice's managed, compliant laptop.\n\
         curl -sS -H 'Authorization: Bearer {admin_token}' {admin_url}/admin/v1/devices/laptop-001\n\
         \n# Policy, live (config/policies, the default set): alice's compliant laptop may read and write.\n\
         # 10. The MDM reports laptop-001 noncompliant (the generic device event)...\n\
         curl -sS -X POST -H 'Authorization: Bearer {mdm_secret}' -H 'Content-Type: application/json' -d '{{\"event_id\":\"demo-noncompliant-1\",\"device_id\":\"laptop-001\",\"occurred_at\":{noncompliant_ms},\"compliance\":\"non_compliant\"}}' {admin_url}/mdm/v1/{DEMO_MDM_SOURCE}/events\n\
         \n# 11. ...reads still pass (restrict: the app sees x-portcullis-decision: restrict)...\n\
         curl -sS --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 12. ...but writes get 403 with the reason.\n\
         curl -sS -i --cacert {ca_arg} -X POST -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# 13. Then the MDM reports laptop-001 lost...\n\
         curl -sS -X POST -H 'Authorization: Bearer {mdm_secret}' -H 'Content-Type: application/json' -d '{{\"event_id\":\"demo-lost-1\",\"device_id\":\"laptop-001\",\"occurred_at\":{lost_ms},\"lifecycle\":\"lost\"}}' {admin_url}/mdm/v1/{DEMO_MDM_SOURCE}/events\n\
         \n# 14. ...and the same token is refused on the very next request, on every route.\n\
         curl -sS -i --cacert {ca_arg} -H 'Authorization: Bearer {token}' {proxy_url}/hello\n\
         \n# Browser access: open {browser_url} in a browser (trust {ca} or accept the warning).\n\
         #    No session yet, so the proxy sends you to the demo IdP's one-click login page.\n\
         #    - bob@example.com with a password: his phone-002 is BYOD (unmanaged), so the default policies\n\
         #      step up: back to the IdP for multi-factor, then the app, on a 15-minute session.\n\
         #    - alice@example.com with a password, on her managed laptop-001: straight to the app.\n\
         #    Sign out with a POST to /.portcullis/logout (GET there shows the button).\n\
         #    After steps 13-14 below (laptop-001 reported lost), alice's browser session ends at its next\n\
         #    request: reload the page and it is refused, the session deleted and its cookie cleared.\n\
         \n# 15. Metrics: requests, decisions, feed events, and the control window (event accepted -> first request decided on it).\n\
         curl -s {admin_url}/metrics | grep -E 'portcullis_(requests|decisions|feed_events|control_window_seconds_count)'\n\
         \n# Why? Every decision is in {audit} (one JSON line each), and\n\
         # portcullis explain --config {cfg} --subject alice@example.com --device laptop-001 --route demo-app\n\
         \nPress Ctrl-C to stop.\n",
        ca = shown("ca.pem"),
        env = env_file.display(),
        tampered = tamper(&token),
        admin_token = secrets.admin,
        mdm_secret = secrets.mdm,
        noncompliant_ms = seeded_ms + 1000,
        lost_ms = seeded_ms + 2000,
        audit = dir.join("audit.jsonl").display(),
        cfg = cfg_path.display(),
        device_arg = shell_quote(&shown("device.pem")),
        device_key_arg = shell_quote(&shown("device-key.pem")),
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

/// Seeds people and devices through the one apply path; returns the origin
/// time used, so later demo events are newer.
async fn seed(posture: &crate::posture::Posture) -> Result<u64, DemoError> {
    use crate::posture::event::{Change, DevicePatch, Feed, IdentityPatch, PostureEvent};
    use crate::posture::model::{Compliance, IdentityKind, IdentityStatus, Lifecycle, Ownership};
    let now = crate::util::now_unix_ms();
    let person = |sub: &str, groups: &[&str], devices: &[&str], contract_end_ms: Option<u64>| {
        Change::Identity {
            subject: sub.to_owned(),
            patch: IdentityPatch {
                kind: Some(IdentityKind::Human),
                status: Some(IdentityStatus::Active),
                groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
                devices: Some(devices.iter().map(|d| (*d).to_owned()).collect()),
                contract_end_ms: contract_end_ms.map(Some),
                ..IdentityPatch::default()
            },
        }
    };
    let device =
        |id: &str, owner: &str, ownership: Ownership, compliance: Compliance| Change::Device {
            id: id.to_owned(),
            patch: DevicePatch {
                platform: Some("macos".into()),
                os_version: Some("15.3.2".into()),
                ownership: Some(ownership),
                management_source: Some(DEMO_MDM_SOURCE.into()),
                lifecycle: Some(Lifecycle::Enrolled),
                compliance: Some(compliance),
                compromised: Some(false),
                patch_behind: Some(false),
                last_check_in_ms: Some(now),
                subjects: Some(vec![owner.to_owned()]),
                ..DevicePatch::default()
            },
        };
    let event = PostureEvent {
        id: format!("demo:seed:{now}"),
        feed: Feed::Admin,
        kind: "demo.seed".into(),
        origin_ms: now,
        changes: vec![
            person("alice@example.com", &["engineering"], &["laptop-001"], None),
            person("bob@example.com", &["sales"], &["phone-002"], None),
            person(
                "carol@partner.example",
                &["contractors"],
                &[],
                Some(now + 30 * 86_400_000),
            ),
            device(
                "laptop-001",
                "alice@example.com",
                Ownership::Corporate,
                Compliance::Compliant,
            ),
            device(
                "phone-002",
                "bob@example.com",
                Ownership::Byod,
                Compliance::Compliant,
            ),
        ],
    };
    posture
        .ingest(vec![event])
        .await
        .map_err(|e| DemoError::Io(std::io::Error::other(e.to_string())))?;
    Ok(now)
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
