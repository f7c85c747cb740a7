//! A real OpenID Provider for the browser tests (`oidc-provider`, run by
//! `tests/js/idp.mjs` under node), and a cookie-jar HTTP client that walks
//! its login form like a person would — without a browser.
//!
//! ```ignore
//! let idp = Idp::start(IdpConfig::new().client(IdpClient::secret_basic(
//!     "proxy", "s3cret", "https://127.0.0.1:PORT/.portcullis/callback"))
//!     .account("alice", json!({"email": "alice@corp.test", "groups": ["eng"], "deviceid": "laptop-1"})))
//!     .await;
//! let browser = CookieClient::new(Some(&ca_pem));
//! let back_to_proxy = browser.idp_login(&authorize_url, "alice", ACR_MFA).await;
//! ```
//!
//! The IdP's issuer is `http://127.0.0.1:PORT` (plain http, loopback only).
//! `npm ci` in tests/js (scripts/test.sh does it) must have run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use super::{DEADLINE, TestBody, empty, full};

/// Password-only authentication context (the IdP's default acr).
pub const ACR_PWD: &str = "urn:pc:pwd";
/// Multi-factor authentication context (what step-up asks for).
pub const ACR_MFA: &str = "urn:pc:mfa";

/// One relying party registered at the test IdP.
#[derive(Debug, Clone)]
pub struct IdpClient(pub Value);

impl IdpClient {
    /// A confidential client authenticating with `client_secret_basic`.
    pub fn secret_basic(client_id: &str, secret: &str, redirect_uri: &str) -> Self {
        Self(json!({
            "client_id": client_id,
            "client_secret": secret,
            "token_endpoint_auth_method": "client_secret_basic",
            "redirect_uris": [redirect_uri],
        }))
    }

    /// A client authenticating with `private_key_jwt`; `jwks` holds its public keys.
    pub fn private_key_jwt(client_id: &str, jwks: Value, redirect_uri: &str) -> Self {
        Self(json!({
            "client_id": client_id,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": jwks,
            "redirect_uris": [redirect_uri],
        }))
    }

    /// Sets any client metadata member (`post_logout_redirect_uris`,
    /// `backchannel_logout_uri`, `id_token_signed_response_alg`, ...).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0[key] = value.into();
        self
    }
}

/// The IdP's JSON configuration (see tests/js/idp.mjs for every member).
#[derive(Debug, Clone)]
pub struct IdpConfig(pub Value);

impl Default for IdpConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl IdpConfig {
    pub fn new() -> Self {
        Self(json!({
            "clients": [],
            "accounts": {},
            "acr_values": [ACR_PWD, ACR_MFA],
        }))
    }

    pub fn client(mut self, c: IdpClient) -> Self {
        self.0["clients"].as_array_mut().unwrap().push(c.0);
        self
    }

    /// An account: `sub` and its claims (`email`, `name`, `groups`, `deviceid`, ...).
    pub fn account(mut self, sub: &str, claims: Value) -> Self {
        self.0["accounts"][sub] = claims;
        self
    }

    /// The CA (PEM file) the IdP trusts when it calls a back-channel logout URI.
    pub fn trust_ca(mut self, ca_file: &std::path::Path) -> Self {
        self.0["ca_file"] = ca_file.display().to_string().into();
        self
    }

    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0[key] = value.into();
        self
    }
}

/// A running test IdP; the node process is killed on drop.
pub struct Idp {
    pub issuer: String,
    pub port: u16,
    child: Child,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
    http: Client<HttpConnector, TestBody>,
}

/// The directory of the test JavaScript (package.json, idp.mjs, walk.mjs).
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

impl Idp {
    /// Starts `node tests/js/idp.mjs` and waits (up to `DEADLINE`) for its ready line.
    pub async fn start(cfg: IdpConfig) -> Self {
        let dir = js_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "tests/js/node_modules is missing: run scripts/test.sh (it runs `npm ci` in tests/js)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let cfg_path = tmp.path().join("idp.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg.0).unwrap()).unwrap();
        let stderr_path = tmp.path().join("idp.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new("node")
            .arg(dir.join("idp.mjs"))
            .arg(&cfg_path)
            .current_dir(&dir)
            // The IdP exits when its stdin closes: a test that dies takes it along.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn node (nodejs is installed by scripts/test.sh)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(DEADLINE))
            .await
            .unwrap();
        let stderr_text = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let line = match line {
            Ok(l) if !l.trim().is_empty() => l,
            other => {
                let _ = child.kill();
                panic!(
                    "idp.mjs did not start ({other:?}); stderr:\n{}",
                    stderr_text()
                );
            }
        };
        let ready: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("idp.mjs ready line {line:?}: {e}"));
        let issuer = ready["issuer"].as_str().unwrap().to_owned();
        let port = ready["port"].as_u64().unwrap() as u16;
        Self {
            issuer,
            port,
            child,
            stderr_path,
            _dir: tmp,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `{issuer}/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    /// What the IdP logged (warnings, server errors, failed back-channel calls).
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    async fn call(&self, req: Request<TestBody>) -> (StatusCode, Value) {
        let resp = tokio::time::timeout(DEADLINE, self.http.request(req))
            .await
            .expect("idp request timed out")
            .expect("idp request failed");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v)
    }

    async fn get_json(&self, url: &str) -> Value {
        let (status, v) = self.call(Request::get(url).body(empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "GET {url}: {v}");
        v
    }

    async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::post(format!("{}{path}", self.issuer))
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap();
        self.call(req).await
    }

    /// The discovery document.
    pub async fn discovery(&self) -> Value {
        self.get_json(&self.discovery_url()).await
    }

    /// The IdP's public signing keys.
    pub async fn jwks(&self) -> Value {
        self.get_json(&format!("{}/jwks", self.issuer)).await
    }

    /// The logins the IdP has seen for `sub`: `[{"client_id","sid","acr"}]`.
    pub async fn sessions(&self, sub: &str) -> Vec<Value> {
        let v = self
            .get_json(&format!(
                "{}/test/sessions?sub={}",
                self.issuer,
                form_encode_component(sub)
            ))
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Makes the IdP send its own Back-Channel Logout request to `client_id`'s
    /// `backchannel_logout_uri` for `sub` (and `sid`). Ok when the client
    /// answered 200/204, Err with the IdP's message otherwise.
    pub async fn backchannel_logout(
        &self,
        client_id: &str,
        sub: &str,
        sid: Option<&str>,
    ) -> Result<(), String> {
        let (status, v) = self
            .post_json(
                "/test/backchannel-logout",
                json!({"client_id": client_id, "sub": sub, "sid": sid}),
            )
            .await;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{status}: {v}"))
        }
    }

    /// Registers (or replaces) a client at run time: a proxy's redirect and
    /// back-channel logout URIs name a port known only once it listens,
    /// after the IdP's issuer URL went into its config.
    pub async fn register(&self, client: IdpClient) {
        let (status, v) = self.post_json("/test/clients", client.0).await;
        assert_eq!(status, StatusCode::OK, "register client: {v}");
    }

    /// A JWT over `payload` signed with the IdP's own `alg` key (ES256/RS256),
    /// e.g. a logout token that is well signed but wrong in another way.
    pub async fn sign(&self, alg: &str, typ: Option<&str>, payload: Value) -> String {
        let (status, v) = self
            .post_json(
                "/test/sign",
                json!({"alg": alg, "typ": typ, "payload": payload}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "sign: {v}");
        v["jwt"].as_str().unwrap().to_owned()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------ log capture

// In-process proxies log through the first global subscriber installed;
// a test binary that calls `capture_logs` before starting any keeps every
// line (`portcullis=trace`) to check that nothing secret is logged.

/// Everything the proxies of this test binary log (`portcullis=trace`).
pub static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

/// Installs the capturing subscriber before any in-process proxy starts
/// (the proxy's own `init` then finds one and leaves it).
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("portcullis=trace"))
            .with_writer(LogBuf(buf.clone()))
            .with_ansi(false)
            .try_init();
        buf
    });
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

/// No secret of `secrets` (codes, cookie values, tokens) is in the log, and
/// nothing that looks like a JWT or a sealed login cookie (base64 JSON).
pub fn assert_logs_clean(secrets: &[String]) {
    let text = logs();
    assert!(!text.is_empty(), "the capture saw the proxy's logs");
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(!text.contains(s.as_str()), "a secret reached the log: {s}");
    }
    assert!(
        !text.contains("eyJ"),
        "a JWT or login cookie reached the log"
    );
}

// ---------------------------------------------------------------- cookie jar

#[derive(Debug, Clone)]
struct StoredCookie {
    name: String,
    value: String,
    path: String,
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The absolute URL that was requested.
    pub url: String,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: not JSON ({e}): {}",
                self.status,
                self.url,
                self.text()
            )
        })
    }

    /// `Location`, made absolute against the requested URL.
    pub fn location(&self) -> Option<String> {
        let loc = self.headers.get(http::header::LOCATION)?.to_str().ok()?;
        Some(absolutize(&self.url, loc))
    }

    /// Every `Set-Cookie` value.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }
}

/// An HTTP(S) client with a cookie jar, like a browser without JavaScript.
/// Cookies are kept per `host:port` (stricter than a browser, which shares
/// them across ports) and sent by path prefix; `Max-Age<=0` or an `Expires`
/// in 1970 deletes one. Redirects are not followed: the caller decides.
#[derive(Clone)]
pub struct CookieClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, TestBody>,
    jar: Arc<Mutex<HashMap<String, Vec<StoredCookie>>>>,
}

impl CookieClient {
    /// `ca_pem`: the CA to trust for https (the proxy's test CA); http always works.
    pub fn new(ca_pem: Option<&str>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = ca_pem {
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            client: Client::builder(TokioExecutor::new()).build(conn),
            jar: Arc::default(),
        }
    }

    /// Sends `req` with the jar's cookies for its URL and stores what it sets.
    pub async fn send(&self, mut req: Request<TestBody>) -> Resp {
        let url = req.uri().to_string();
        let (authority, path) = authority_and_path(&url);
        if !req.headers().contains_key(http::header::COOKIE)
            && let Some(c) = self.cookie_header(&authority, &path)
        {
            req.headers_mut()
                .insert(http::header::COOKIE, c.parse().unwrap());
        }
        let resp = tokio::time::timeout(DEADLINE, self.client.request(req))
            .await
            .unwrap_or_else(|_| panic!("request to {url} timed out"))
            .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let out = Resp {
            status: parts.status,
            headers: parts.headers,
            body,
            url,
        };
        for sc in out.set_cookies() {
            self.store(&authority, &sc);
        }
        out
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).unwrap()).await
    }

    /// POST `application/x-www-form-urlencoded`.
    pub async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut b = Request::post(url).header("content-type", "application/x-www-form-urlencoded");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(full(form_encode(form))).unwrap()).await
    }

    /// GETs `url` and follows redirects while they stay on `url`'s origin;
    /// returns the last response (a 200 page, an error, or a redirect elsewhere).
    pub async fn follow_within_origin(&self, url: &str) -> Resp {
        let origin = origin_of(url);
        let mut resp = self.get(url, &[]).await;
        for _ in 0..10 {
            match resp.location() {
                Some(next) if resp.status.is_redirection() && origin_of(&next) == origin => {
                    resp = self.get(&next, &[]).await;
                }
                _ => return resp,
            }
        }
        panic!("too many redirects from {url}");
    }

    /// Completes the test IdP's login for `account` at `acr`, starting at an
    /// authorization URL (`{issuer}/auth?...`, or the proxy's redirect to it),
    /// and returns the URL the IdP sends the browser back to (the proxy's
    /// callback with `code` and `state`, or an `error`).
    pub async fn idp_login(&self, authorize_url: &str, account: &str, acr: &str) -> String {
        let origin = origin_of(authorize_url);
        let mut resp = self.follow_within_origin(authorize_url).await;
        for _ in 0..4 {
            if resp.status.is_redirection() {
                return resp.location().unwrap();
            }
            let page = resp.text();
            assert_eq!(resp.status, StatusCode::OK, "IdP at {}: {page}", resp.url);
            let action = form_action(&page, "login")
                .unwrap_or_else(|| panic!("no login form at {}: {page}", resp.url));
            let action = absolutize(&resp.url, &action);
            resp = self
                .post_form(&action, &[("account", account), ("acr", acr)], &[])
                .await;
            while resp.status.is_redirection() {
                let next = resp.location().unwrap();
                if origin_of(&next) != origin {
                    return next;
                }
                resp = self.get(&next, &[]).await;
            }
        }
        panic!("IdP login did not finish: {} {}", resp.status, resp.text());
    }

    /// Walks the IdP's RP-initiated logout: GETs `end_session_url` (following
    /// redirects on the IdP), confirms the sign-out form, and returns where the
    /// IdP sends the browser (the `post_logout_redirect_uri`, or None when it
    /// shows its own "signed out" page).
    pub async fn idp_logout(&self, end_session_url: &str) -> Option<String> {
        let origin = origin_of(end_session_url);
        let resp = self.follow_within_origin(end_session_url).await;
        if resp.status.is_redirection() {
            return resp.location();
        }
        let page = resp.text();
        assert_eq!(resp.status, StatusCode::OK, "end_session: {page}");
        // A signed-in IdP session shows a confirmation form; without one the
        // IdP sends an auto-submitting form: the same fields either way.
        let action = form_action(&page, "op.logoutForm")
            .or_else(|| html_first_form_action(&page))
            .unwrap_or_else(|| panic!("no logout form: {page}"));
        let action = absolutize(&resp.url, &action);
        let mut form = hidden_inputs(&page);
        form.push(("logout".into(), "yes".into()));
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut resp = self.post_form(&action, &pairs, &[]).await;
        while resp.status.is_redirection() {
            let next = resp.location().unwrap();
            if origin_of(&next) != origin {
                return Some(next);
            }
            resp = self.get(&next, &[]).await;
        }
        None
    }

    /// The value of cookie `name` held for `host:port`.
    pub fn cookie(&self, authority: &str, name: &str) -> Option<String> {
        let jar = self.jar.lock().unwrap();
        jar.get(authority)?
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value.clone())
    }

    /// Puts a cookie into the jar (path `/`), e.g. to replay a stolen one.
    pub fn set_cookie(&self, authority: &str, name: &str, value: &str) {
        self.store(authority, &format!("{name}={value}; Path=/"));
    }

    /// Removes cookie `name` for `host:port`.
    pub fn remove_cookie(&self, authority: &str, name: &str) {
        if let Some(list) = self.jar.lock().unwrap().get_mut(authority) {
            list.retain(|c| c.name != name);
        }
    }

    fn cookie_header(&self, authority: &str, path: &str) -> Option<String> {
        let jar = self.jar.lock().unwrap();
        let list = jar.get(authority)?;
        let parts: Vec<String> = list
            .iter()
            .filter(|c| path_matches(&c.path, path))
            .map(|c| format!("{}={}", c.name, c.value))
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn store(&self, authority: &str, set_cookie: &str) {
        let mut attrs = set_cookie.split(';');
        let Some((name, value)) = attrs.next().and_then(|nv| nv.split_once('=')) else {
            return;
        };
        let (name, value) = (name.trim().to_owned(), value.trim().to_owned());
        let mut path = "/".to_owned();
        let mut delete = false;
        for a in attrs {
            let (k, v) = a.split_once('=').unwrap_or((a, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "path" => path = v.trim().to_owned(),
                "max-age" => delete |= v.trim().parse::<i64>().is_ok_and(|n| n <= 0),
                "expires" => delete |= v.contains("1970"),
                _ => {}
            }
        }
        let mut jar = self.jar.lock().unwrap();
        let list = jar.entry(authority.to_owned()).or_default();
        list.retain(|c| !(c.name == name && c.path == path));
        if !delete {
            list.push(StoredCookie { name, value, path });
        }
    }
}

fn path_matches(cookie_path: &str, req_path: &str) -> bool {
    req_path == cookie_path
        || (req_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || req_path[cookie_path.len()..].starts_with('/')))
}

// ------------------------------------------------------------- URL helpers

/// `scheme://host:port` of an absolute URL.
pub fn origin_of(url: &str) -> String {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("url {url:?}: {e}"));
    let scheme = uri.scheme_str().unwrap_or("http");
    let auth = uri.authority().map(|a| a.as_str()).unwrap_or("");
    format!("{scheme}://{auth}")
}

fn authority_and_path(url: &str) -> (String, String) {
    let uri: http::Uri = url.parse().unwrap();
    let auth = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    (auth, uri.path().to_owned())
}

/// Resolves `loc` (absolute, or an absolute path) against `base`.
pub fn absolutize(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_owned()
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin_of(base))
    } else {
        let b = base.split(['?', '#']).next().unwrap_or(base);
        let dir = &b[..b.rfind('/').map(|i| i + 1).unwrap_or(b.len())];
        format!("{dir}{loc}")
    }
}

/// Percent-encodes one form/query component (everything but RFC 3986 unreserved).
pub fn form_encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `k=v&k=v`, each part percent-encoded.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode_component(k), form_encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded value of query parameter `name` in `url`.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1.split('#').next()?;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// `action` of the `<form id="{id}" ...>` in `html` (HTML entities for `&` undone).
fn form_action(html: &str, id: &str) -> Option<String> {
    let start = html.find(&format!("id=\"{id}\""))?;
    let tag_start = html[..start].rfind("<form")?;
    let tag_end = start + html[start..].find('>')?;
    attr(&html[tag_start..tag_end], "action")
}

fn html_first_form_action(html: &str) -> Option<String> {
    let start = html.find("<form")?;
    let end = start + html[start..].find('>')?;
    attr(&html[start..end], "action")
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let i = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let j = i + tag[i..].find('"')?;
    Some(tag[i..j].replace("&amp;", "&").replace("&#38;", "&"))
}

/// `(name, value)` of every `<input type="hidden">` in `html`.
fn hidden_inputs(html: &str) -> Vec<(String, String)> {
    html.split("<input")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            if !tag.contains("type=\"hidden\"") {
                return None;
            }
            Some((attr(tag, "name")?, attr(tag, "value").unwrap_or_default()))
        })
        .collect()
}

/// A fresh PKCE pair (RFC 7636): `(verifier, S256 challenge)`.
pub fn pkce_pair() -> (String, String) {
    use base64::Engine;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let verifier = b64.encode(raw);
    let challenge = b64.encode(portcullis::util::sha256(verifier.as_bytes()));
    (verifier, challenge)
}

/// A random URL-safe string of 128 bits (state, nonce).
pub fn random_token() -> String {
    use base64::Engine;
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::fill(&mut raw).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
