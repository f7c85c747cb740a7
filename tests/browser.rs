//! Browser access end to end against a real OpenID provider: the npm
//! `oidc-provider` (tests/js/idp.mjs, behind tests/common/idp.rs) on
//! loopback, the proxy over real TLS, and a client with a cookie jar that
//! follows the login redirects as a browser would. Both client
//! authentication methods (`client_secret_basic`, `private_key_jwt`) run
//! against it. The headless-Chromium walk is tests/browser_e2e.rs.
//!
//! Every proxy log line of this binary is captured (`capture_logs`):
//! the bad-input tests check that no code, cookie or token ever reaches it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::idp::{
    CookieClient, Idp, IdpClient, IdpConfig, assert_logs_clean, capture_logs, query_param,
};
use common::{ClientIdentity, TestPki, TlsConn, Upstream};
use http::StatusCode;
// The acr names the default policies step up to.
use portcullis::demo::oidc::{ACR_MFA, ACR_PWD};
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, DevicePatch, Feed, IdentityPatch, PostureEvent};
use portcullis::posture::model::{Compliance, IdentityKind, IdentityStatus, Lifecycle, Ownership};
use portcullis::session::cookie::{LOGIN_COOKIE, LoginSigner, LoginState, SESSION_COOKIE};
use serde_json::{Value, json};

/// The proxy's client id at the IdP.
const CLIENT_ID: &str = "portcullis";
const SECRET: &str = "s3cret-for-the-browser-tests";
const CALLBACK: &str = "/.portcullis/callback";
/// Bearer token of the SCIM feed on the admin listener.
const SCIM_TOKEN: &str = "scim-token-for-the-browser-tests";

// ------------------------------------------------------------ the browser

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `url` with query parameter `name` set to `value` (added when absent).
fn with_param(url: &str, name: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut found = false;
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == name {
            found = true;
            s.append_pair(&k, value);
        } else {
            s.append_pair(&k, &v);
        }
    }
    if !found {
        s.append_pair(name, value);
    }
    format!("{base}?{}", s.finish())
}

/// `url` without query parameter `name`.
fn without_param(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != name) {
        s.append_pair(&k, &v);
    }
    format!("{base}?{}", s.finish())
}

/// A browser: one TLS connection to the proxy (with an optional client
/// certificate) and its cookie jar, plus the IdP's side (its own jar, so
/// the IdP session is remembered as a browser's would be).
struct Browser {
    conn: TlsConn,
    jar: HashMap<String, String>,
    idp: CookieClient,
}

impl Browser {
    async fn open(
        addr: std::net::SocketAddr,
        sni: &str,
        pki: &TestPki,
        id: Option<&ClientIdentity>,
    ) -> Self {
        Self {
            conn: TlsConn::connect(addr, sni, &pki.ca_pem, id).await.unwrap(),
            jar: HashMap::new(),
            idp: CookieClient::new(None),
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let cookies = self.cookie_header();
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if !cookies.is_empty() && !extra.iter().any(|(k, _)| *k == "cookie") {
            headers.push(("cookie", &cookies));
        }
        let (s, h, b) = self.conn.send(method, path, &headers).await.unwrap();
        for v in h.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            assert!(
                attrs.contains("Secure") && attrs.contains("Path=/") && attrs.contains("HttpOnly"),
                "{v}"
            );
            if attrs.contains("Max-Age=0") {
                self.jar.remove(k);
            } else {
                self.jar.insert(k.to_owned(), val.to_owned());
            }
        }
        (s, h, b)
    }

    async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
        self.send("GET", path, &[("accept", "text/html")]).await
    }

    /// Opens `path` without a session: the proxy's redirect to the IdP.
    async fn start(&mut self, idp: &Idp, path: &str) -> String {
        let (s, h, body) = self.get(path).await;
        assert_eq!(
            s,
            StatusCode::FOUND,
            "a browser without a session goes to log in: {}",
            text(&body)
        );
        let authorize = header(&h, "location");
        assert!(authorize.starts_with(&idp.issuer), "{authorize}");
        assert_eq!(
            query_param(&authorize, "code_challenge_method").as_deref(),
            Some("S256")
        );
        assert!(self.jar.contains_key(LOGIN_COOKIE));
        authorize
    }

    /// The IdP's part of a login (its form, for `sub` at `acr`): the path
    /// and query of the callback the IdP sends the browser back to.
    async fn at_idp(&self, authorize: &str, sub: &str, acr: &str) -> String {
        let back = self.idp.idp_login(authorize, sub, acr).await;
        let origin = format!("https://{}", self.conn.host);
        let path = back.strip_prefix(&origin).unwrap_or("");
        assert!(path.starts_with(CALLBACK), "{back}");
        path.to_owned()
    }

    /// Opens `path`, logs in at the IdP as `sub`, follows the callback;
    /// returns where the proxy sent the browser back to.
    async fn login(&mut self, idp: &Idp, path: &str, sub: &str, acr: &str) -> String {
        let authorize = self.start(idp, path).await;
        self.complete(&authorize, sub, acr).await
    }

    /// Completes a login from the IdP's authorize URL on.
    async fn complete(&mut self, authorize: &str, sub: &str, acr: &str) -> String {
        let callback = self.at_idp(authorize, sub, acr).await;
        let (s, h, body) = self.get(&callback).await;
        assert_eq!(s, StatusCode::SEE_OTHER, "callback: {}", text(&body));
        assert!(self.jar.contains_key(SESSION_COOKIE));
        assert!(!self.jar.contains_key(LOGIN_COOKIE));
        header(&h, "location")
    }
}

// ------------------------------------------------------------ environment

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    SecretBasic,
    PrivateKeyJwt,
}

struct Env {
    pki: TestPki,
    idp: Idp,
    app: Upstream,
    cfg: PathBuf,
    device_ca: portcullis::demo::pki::DevCa,
    auth: Auth,
    client_key: SigningKey,
    cookie_key: Vec<u8>,
}

fn policies_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/policies")
        .display()
        .to_string()
}

/// The people the IdP knows; bob's ID token names his phone (`deviceid`).
fn idp_config(pki: &TestPki) -> IdpConfig {
    IdpConfig::new()
        .set("acr_values", json!([ACR_PWD, ACR_MFA]))
        .trust_ca(&pki.path().join("ca.pem"))
        .account(
            "alice@example.com",
            json!({"email": "alice@example.com", "name": "Alice"}),
        )
        .account(
            "bob@example.com",
            json!({"email": "bob@example.com", "name": "Bob", "deviceid": "phone-002"}),
        )
        .account(
            "carol@partner.example",
            json!({"email": "carol@partner.example", "name": "Carol"}),
        )
}

async fn env(policy: bool, mtls: bool, auth: Auth) -> Env {
    capture_logs();
    let pki = TestPki::new();
    let idp = Idp::start(idp_config(&pki)).await;
    let app = Upstream::start().await;
    let client_key = SigningKey::es256("rp-key-1").unwrap();
    let credential = match auth {
        Auth::SecretBasic => {
            std::fs::write(pki.path().join("client-secret"), SECRET).unwrap();
            "client_secret_file = \"client-secret\"".to_owned()
        }
        Auth::PrivateKeyJwt => {
            std::fs::write(pki.path().join("client-key.pem"), &client_key.private_pem).unwrap();
            "client_key_file = \"client-key.pem\"\nclient_key_alg = \"ES256\"\nclient_key_id = \"rp-key-1\"".to_owned()
        }
    };
    let mut cookie_key = vec![0u8; 32];
    aws_lc_rs::rand::fill(&mut cookie_key).unwrap();
    std::fs::write(pki.path().join("cookie-key"), &cookie_key).unwrap();
    let device_ca = portcullis::demo::pki::DevCa::new("device CA").unwrap();
    std::fs::write(pki.path().join("device-ca.pem"), device_ca.cert_pem()).unwrap();
    let policy = if policy {
        format!(
            "[policy]\ndir = \"{}\"\ndecision_cache_ttl_ms = 0\n",
            policies_dir()
        )
    } else {
        String::new()
    };
    let tls = if mtls {
        "client_ca = [\"device-ca.pem\"]\nclient_auth_hosts = [\"app.test\"]\n"
    } else {
        ""
    };
    let binding = if mtls {
        "[binding]\ndevice_id_rule = \"san-uri:device://{id}\"\n"
    } else {
        ""
    };
    let issuer = &idp.issuer;
    let discovery = idp.discovery_url();
    let app_url = app.url();
    let db = pki.path().join("p.db").display().to_string();
    let cfg = pki.write_config(
        "p.toml",
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[store]
path = "{db}"

[tls]
{tls}
[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

{binding}
{policy}
[[issuers]]
name = "idp"
issuer = "{issuer}"
audiences = ["https://api.test"]
algorithms = ["ES256", "RS256"]
discovery_url = "{discovery}"
min_refresh_interval_s = 0

[browser]
issuer = "idp"
client_id = "{CLIENT_ID}"
{credential}
device_claim = "deviceid"
cookie_key_file = "cookie-key"

[feeds.scim]
token = "{SCIM_TOKEN}"
subject_attribute = "userName"

[[routes]]
name = "web"
path_prefix = "/"
upstream = "{app_url}"
sensitivity = "medium"
auth = "browser"
"#
        ),
    );
    Env {
        pki,
        idp,
        app,
        cfg,
        device_ca,
        auth,
        client_key,
        cookie_key,
    }
}

impl Env {
    /// The proxy's client at the IdP, for a proxy listening on `port`:
    /// redirect URIs for both test hosts, back-channel logout over https
    /// (the IdP trusts the test CA). `private_key_jwt` clients get RS256 ID
    /// tokens, so both algorithms run.
    fn client(&self, client_id: &str, port: u16) -> IdpClient {
        let redirects: Vec<String> = ["localhost", "app.test"]
            .iter()
            .map(|h| format!("https://{h}:{port}{CALLBACK}"))
            .collect();
        let c = match self.auth {
            Auth::SecretBasic => IdpClient::secret_basic(client_id, SECRET, &redirects[0]),
            Auth::PrivateKeyJwt => IdpClient::private_key_jwt(
                client_id,
                json!({"keys": [self.client_key.jwk]}),
                &redirects[0],
            )
            .with("id_token_signed_response_alg", "RS256"),
        };
        c.with("redirect_uris", json!(redirects))
            .with(
                "backchannel_logout_uri",
                format!("https://127.0.0.1:{port}/.portcullis/backchannel-logout"),
            )
            .with(
                "post_logout_redirect_uris",
                json!([format!("https://localhost:{port}/")]),
            )
    }

    /// Registers the proxy (listening on `port`) at the IdP.
    async fn register(&self, port: u16) {
        self.idp.register(self.client(CLIENT_ID, port)).await;
    }
}

fn seed_event(id: &str, changes: Vec<Change>) -> PostureEvent {
    PostureEvent {
        id: id.to_owned(),
        feed: Feed::Admin,
        kind: "test".into(),
        origin_ms: portcullis::util::now_unix_ms(),
        changes,
    }
}

fn person(sub: &str, status: IdentityStatus) -> Change {
    Change::Identity {
        subject: sub.to_owned(),
        patch: IdentityPatch {
            kind: Some(IdentityKind::Human),
            status: Some(status),
            ..IdentityPatch::default()
        },
    }
}

fn laptop(id: &str, owner: &str, lifecycle: Lifecycle) -> Change {
    Change::Device {
        id: id.to_owned(),
        patch: DevicePatch {
            ownership: Some(Ownership::Corporate),
            lifecycle: Some(lifecycle),
            compliance: Some(Compliance::Compliant),
            compromised: Some(false),
            patch_behind: Some(false),
            management_source: Some("test".into()),
            last_check_in_ms: Some(portcullis::util::now_unix_ms()),
            subjects: Some(vec![owner.to_owned()]),
            ..DevicePatch::default()
        },
    }
}

// ------------------------------------------------------------ the tests

/// Login, session reuse, the upstream's view, logout (CSRF-safe POST, the
/// IdP's end_session, the IdP's back-channel call), login needed again.
async fn login_reuse_and_logout(auth: Auth) {
    let e = env(false, false, auth).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let sessions = || server.shared.posture.snapshot().session_count();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let back = b
        .login(&e.idp, "/app/page?x=1", "alice@example.com", ACR_PWD)
        .await;
    assert_eq!(back, "/app/page?x=1", "back to the page it asked for");
    assert_eq!(sessions(), 1);
    let rec = &server.shared.posture.snapshot().sessions_where(|_| true)[0];
    assert_eq!(rec.subject, "alice@example.com");
    assert_eq!(rec.acr.as_deref(), Some(ACR_PWD));
    assert_eq!(rec.amr, vec!["pwd".to_owned()]);
    assert!(rec.auth_time.is_some());
    // The IdP's sid for this login (its back-channel logout names it).
    let idp_sessions = e.idp.sessions("alice@example.com").await;
    assert!(
        idp_sessions
            .iter()
            .any(|s| s["client_id"] == CLIENT_ID && s["sid"] == rec.idp_sid.as_deref().unwrap()),
        "{idp_sessions:?} vs {:?}",
        rec.idp_sid
    );

    let (s, _, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::OK);
    let seen = e.app.last();
    assert_eq!(seen.path, "/app/page");
    assert_eq!(
        header(&seen.headers, "x-portcullis-subject"),
        "alice@example.com"
    );
    let cookies = header(&seen.headers, "cookie");
    assert!(
        !cookies.contains("portcullis-login"),
        "no login cookie upstream: {cookies}"
    );
    // Reuse: no second login.
    assert_eq!(b.get("/app/other").await.0, StatusCode::OK);
    assert_eq!(sessions(), 1);
    assert_eq!(e.app.last().path, "/app/other");

    // Logout: cross-site refused (nothing changes), same-origin ends it.
    let origin = format!("https://{}", b.conn.host);
    let (s, _, body) = b
        .send(
            "POST",
            "/.portcullis/logout",
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", text(&body));
    let (s, _, _) = b
        .send(
            "POST",
            "/.portcullis/logout",
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(sessions(), 1);
    assert!(b.jar.contains_key(SESSION_COOKIE));
    let (s, h, _) = b
        .send("POST", "/.portcullis/logout", &[("origin", &origin)])
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let end_session = header(&h, "location");
    let disc = e.idp.discovery().await;
    assert!(
        end_session.starts_with(disc["end_session_endpoint"].as_str().unwrap()),
        "{end_session}"
    );
    assert_eq!(
        query_param(&end_session, "client_id").as_deref(),
        Some(CLIENT_ID)
    );
    assert!(!b.jar.contains_key(SESSION_COOKIE), "the cookie is cleared");
    assert_eq!(sessions(), 0);
    // The IdP signs the person out too (and calls the proxy's back-channel
    // logout, which finds nothing left to end).
    b.idp.idp_logout(&end_session).await;

    // The next request goes to log in, and the IdP asks again.
    let seen = e.app.count();
    let authorize = b.start(&e.idp, "/app/page").await;
    let page = b.idp.follow_within_origin(&authorize).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("id=\"login\""), "{}", page.text());
    assert_eq!(e.app.count(), seen);
    assert!(
        !e.idp.stderr().contains("server_error"),
        "{}",
        e.idp.stderr()
    );
}

#[tokio::test]
async fn login_reuse_and_logout_with_client_secret_basic() {
    login_reuse_and_logout(Auth::SecretBasic).await;
}

#[tokio::test]
async fn login_reuse_and_logout_with_private_key_jwt() {
    login_reuse_and_logout(Auth::PrivateKeyJwt).await;
}

#[tokio::test]
async fn api_clients_on_a_browser_route_get_401_not_a_redirect() {
    let e = env(false, false, Auth::SecretBasic).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let mut api = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    for (method, headers) in [
        ("GET", vec![("accept", "application/json")]),
        ("POST", vec![("accept", "text/html")]),
        ("PUT", vec![]),
        ("DELETE", vec![("accept", "*/*")]),
        ("GET", vec![("authorization", "Bearer abc")]),
        (
            "GET",
            vec![("authorization", "Basic YTpi"), ("accept", "text/html")],
        ),
    ] {
        let (s, h, body) = api.send(method, "/app/x", &headers).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {headers:?}");
        assert!(header(&h, "location").is_empty());
        assert!(header(&h, "content-type").starts_with("application/json"));
        assert!(text(&body).contains("login_required"), "{}", text(&body));
        assert!(!api.jar.contains_key(LOGIN_COOKIE), "no login started");
    }
    // A person's browser on the same route is sent to the IdP.
    api.start(&e.idp, "/app/x").await;
    assert_eq!(e.app.count(), 0);
    assert_eq!(server.shared.posture.snapshot().session_count(), 0);
}

/// Tampered, forged, expired, oversized, malformed and duplicated session
/// cookies: never a session, never the upstream.
#[tokio::test]
async fn bad_session_cookies_are_refused() {
    let e = env(false, false, Auth::PrivateKeyJwt).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let posture = server.shared.posture.clone();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    b.login(&e.idp, "/app/", "alice@example.com", ACR_PWD).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    let good = b.jar[SESSION_COOKIE].clone();
    let seen = e.app.count();
    let sessions = posture.snapshot().session_count();

    let mut tampered = good.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let forged = portcullis::session::cookie::new_session_id().unwrap();
    let cases: Vec<(&str, String, StatusCode)> = vec![
        ("tampered", tampered, StatusCode::FOUND),
        ("forged", forged.clone(), StatusCode::FOUND),
        ("truncated", good[..42].to_owned(), StatusCode::BAD_REQUEST),
        ("oversized", "A".repeat(5000), StatusCode::BAD_REQUEST),
        ("one byte over", format!("{good}A"), StatusCode::BAD_REQUEST),
        (
            "not base64url",
            format!("{}!", &good[..42]),
            StatusCode::BAD_REQUEST,
        ),
        ("empty", String::new(), StatusCode::BAD_REQUEST),
    ];
    for (what, value, want) in &cases {
        let mut other = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
        other.jar.insert(SESSION_COOKIE.into(), value.clone());
        let (s, h, body) = other.get("/app/").await;
        assert_eq!(s, *want, "{what}: {}", text(&body));
        if s == StatusCode::FOUND {
            assert!(header(&h, "location").starts_with(&e.idp.issuer), "{what}");
        } else {
            assert!(text(&body).contains("invalid_session_cookie"), "{what}");
        }
        // An API client with the same cookie: 401 or 400, never through.
        let (s, _, _) = other
            .send(
                "GET",
                "/app/",
                &[
                    ("accept", "application/json"),
                    ("cookie", &format!("{SESSION_COOKIE}={value}")),
                ],
            )
            .await;
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST,
            "{what}: {s}"
        );
    }
    // The real cookie twice, or next to a forged one: refused, not guessed.
    for dup in [
        format!("{SESSION_COOKIE}={good}; {SESSION_COOKIE}={good}"),
        format!("{SESSION_COOKIE}={forged}; {SESSION_COOKIE}={good}"),
    ] {
        let (s, _, body) = b
            .send("GET", "/app/", &[("accept", "text/html"), ("cookie", &dup)])
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{}", text(&body));
    }
    assert_eq!(e.app.count(), seen, "the upstream received nothing");
    assert_eq!(posture.snapshot().session_count(), sessions, "no session");

    // Expired: the record's absolute expiry has passed.
    let rec = posture.snapshot().sessions_where(|_| true)[0]
        .as_ref()
        .clone();
    let mut expired = rec.clone();
    expired.expires_s = portcullis::util::now_unix() - 1;
    posture
        .ingest(vec![PostureEvent {
            id: "expire-1".into(),
            feed: Feed::Session,
            kind: "test.expire".into(),
            origin_ms: portcullis::util::now_unix_ms(),
            changes: vec![Change::Session {
                id_hash: rec.id_hash.clone(),
                record: Some(Box::new(expired)),
            }],
        }])
        .await
        .unwrap();
    let (s, h, _) = b.get("/app/").await;
    assert_eq!(s, StatusCode::FOUND, "an expired session logs in again");
    assert!(header(&h, "location").starts_with(&e.idp.issuer));
    assert_eq!(e.app.count(), seen);
    assert_logs_clean(&[good, forged]);
}

/// One login's parts: the proxy's authorize URL, the browser's pre-login
/// cookie, and the callback the IdP sent back.
struct Flow {
    authorize: String,
    login_cookie: String,
    callback: String,
}

impl Browser {
    /// Starts a login on a clean jar and walks the IdP (after `tamper`
    /// rewrote the authorize URL); does not call the callback.
    async fn flow(&mut self, idp: &Idp, sub: &str, tamper: impl FnOnce(&str) -> String) -> Flow {
        self.jar.clear();
        let authorize = self.start(idp, "/app/flow").await;
        let login_cookie = self.jar[LOGIN_COOKIE].clone();
        let callback = self.at_idp(&tamper(&authorize), sub, ACR_PWD).await;
        Flow {
            authorize,
            login_cookie,
            callback,
        }
    }

    /// Calls `callback` with exactly `login_cookie` (None: no cookie).
    async fn call_back(
        &mut self,
        callback: &str,
        login_cookie: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        self.jar.clear();
        if let Some(c) = login_cookie {
            self.jar.insert(LOGIN_COOKIE.into(), c.to_owned());
        }
        self.get(callback).await
    }
}

/// A refused callback: 400 (or `status`), the accessible HTML page with its
/// code, no session cookie.
fn refused(r: &(StatusCode, http::HeaderMap, Bytes), b: &Browser, what: &str, code: &str) {
    let page = text(&r.2);
    assert_eq!(r.0, StatusCode::BAD_REQUEST, "{what}: {page}");
    assert!(
        page.contains("<html lang=\"en\"") && page.contains(code),
        "{what}: {page}"
    );
    assert!(!b.jar.contains_key(SESSION_COOKIE), "{what}: no session");
}

/// Replayed and missing `state`; missing, tampered, forged, expired and
/// oversized pre-login cookies; a wrong `nonce`; another issuer; code
/// injection (a code issued to another client, a code bound to another
/// PKCE verifier) and a code used twice — all against the real IdP. None
/// creates a session; none is logged.
#[tokio::test]
async fn bad_callbacks_are_refused() {
    let e = env(false, false, Auth::SecretBasic).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let port = server.proxy_addr.port();
    e.register(port).await;
    // Another relying party of the same IdP, allowed the same redirect URIs.
    e.idp.register(e.client("intruder", port)).await;
    let sessions = || server.shared.posture.snapshot().session_count();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let mut secrets = Vec::new();

    // Flow A: every defect that must not consume the login, then the real one.
    let a = b.flow(&e.idp, "alice@example.com", str::to_owned).await;
    let code_a = query_param(&a.callback, "code").unwrap();
    secrets.extend([code_a.clone(), a.login_cookie.clone()]);
    let r = b.call_back(&a.callback, None).await;
    refused(&r, &b, "no login cookie", "login_failed");
    let r = b
        .call_back(&without_param(&a.callback, "state"), Some(&a.login_cookie))
        .await;
    refused(&r, &b, "no state", "login_failed");
    let r = b
        .call_back(
            &with_param(&a.callback, "state", "x"),
            Some(&a.login_cookie),
        )
        .await;
    refused(&r, &b, "another state", "login_failed");
    let state = query_param(&a.callback, "state").unwrap();
    let r = b
        .call_back(
            &format!("{}&state={state}", a.callback),
            Some(&a.login_cookie),
        )
        .await;
    refused(&r, &b, "state twice", "login_failed");
    // The pre-login cookie: one flipped byte, a stranger's key, expired,
    // oversized.
    let mut t = a.login_cookie.clone().into_bytes();
    t[5] = if t[5] == b'A' { b'B' } else { b'A' };
    let r = b
        .call_back(&a.callback, Some(&String::from_utf8(t).unwrap()))
        .await;
    refused(&r, &b, "tampered login cookie", "login_failed");
    let now = portcullis::util::now_unix();
    let st = LoginState {
        state: state.clone(),
        nonce: "n".into(),
        return_to: "/".into(),
        host: b.conn.host.clone(),
        exp: now + 300,
        acr_values: None,
        max_age: None,
    };
    let forged = LoginSigner::new(&[7u8; 32]).seal(&st).unwrap();
    let r = b.call_back(&a.callback, Some(&forged)).await;
    refused(&r, &b, "forged login cookie", "login_failed");
    let ours = LoginSigner::new(&e.cookie_key);
    let expired = ours
        .seal(&LoginState {
            exp: now - 1,
            ..st.clone()
        })
        .unwrap();
    let r = b.call_back(&a.callback, Some(&expired)).await;
    refused(&r, &b, "expired login cookie", "login_failed");
    assert!(text(&r.2).contains("expired"), "{}", text(&r.2));
    let big = format!("{}{}", a.login_cookie, "A".repeat(4096));
    let r = b.call_back(&a.callback, Some(&big)).await;
    refused(&r, &b, "oversized login cookie", "login_failed");
    // The login cookie only on its own host.
    let mut elsewhere = Browser::open(server.proxy_addr, "app.test", &e.pki, None).await;
    let cb_elsewhere = a.callback.clone();
    let r = elsewhere
        .call_back(&cb_elsewhere, Some(&a.login_cookie))
        .await;
    refused(&r, &elsewhere, "another host", "login_failed");
    assert_eq!(sessions(), 0, "no session from any of these");
    // The genuine callback still works: the refusals above burnt nothing.
    let r = b.call_back(&a.callback, Some(&a.login_cookie)).await;
    assert_eq!(r.0, StatusCode::SEE_OTHER, "{}", text(&r.2));
    assert_eq!(header(&r.1, "location"), "/app/flow");
    assert_eq!(sessions(), 1);
    secrets.push(b.jar[SESSION_COOKIE].clone());
    // Replayed: the same callback (state and code) a second time.
    let r = b.call_back(&a.callback, Some(&a.login_cookie)).await;
    refused(&r, &b, "replayed callback", "already completed");
    assert_eq!(sessions(), 1);

    // Flow B: the authorization response names another issuer (RFC 9207).
    let f = b.flow(&e.idp, "alice@example.com", str::to_owned).await;
    secrets.push(query_param(&f.callback, "code").unwrap());
    let r = b
        .call_back(
            &with_param(&f.callback, "iss", "https://evil.example"),
            Some(&f.login_cookie),
        )
        .await;
    refused(&r, &b, "another issuer", "another issuer");

    // Flow C: the IdP refused (the callback carries an error, no code).
    let f = b.flow(&e.idp, "alice@example.com", str::to_owned).await;
    let denied = with_param(
        &without_param(&f.callback, "code"),
        "error",
        "access_denied",
    );
    let r = b.call_back(&denied, Some(&f.login_cookie)).await;
    refused(&r, &b, "IdP error", "access_denied");

    // Flow D: a wrong nonce. The authorize URL's nonce was changed on the
    // way (the browser controls it); the real IdP puts that nonce in the ID
    // token, the code exchange succeeds, and the nonce check refuses it.
    let f = b
        .flow(&e.idp, "alice@example.com", |u| {
            with_param(u, "nonce", "attacker-chosen-nonce")
        })
        .await;
    assert_ne!(
        query_param(&f.authorize, "nonce").as_deref(),
        Some("attacker-chosen-nonce")
    );
    secrets.push(query_param(&f.callback, "code").unwrap());
    let r = b.call_back(&f.callback, Some(&f.login_cookie)).await;
    refused(&r, &b, "wrong nonce", "nonce");

    // Flow E: code injection, a code the IdP issued to another client
    // (same redirect URI, this login's state and PKCE challenge).
    let f = b
        .flow(&e.idp, "alice@example.com", |u| {
            with_param(u, "client_id", "intruder")
        })
        .await;
    secrets.push(query_param(&f.callback, "code").unwrap());
    let r = b.call_back(&f.callback, Some(&f.login_cookie)).await;
    refused(&r, &b, "another client's code", "invalid_grant");

    // Flow F: code injection, another login's code (bound to another PKCE
    // verifier) put into this login's callback.
    let mine = b.flow(&e.idp, "alice@example.com", str::to_owned).await;
    let theirs = b.flow(&e.idp, "bob@example.com", str::to_owned).await;
    let their_code = query_param(&theirs.callback, "code").unwrap();
    secrets.push(their_code.clone());
    let r = b
        .call_back(
            &with_param(&mine.callback, "code", &their_code),
            Some(&mine.login_cookie),
        )
        .await;
    refused(&r, &b, "another verifier's code", "invalid_grant");

    // Flow G: a code used twice: flow A's code, already redeemed, in a new
    // login's callback.
    let g = b.flow(&e.idp, "alice@example.com", str::to_owned).await;
    let r = b
        .call_back(
            &with_param(&g.callback, "code", &code_a),
            Some(&g.login_cookie),
        )
        .await;
    refused(&r, &b, "a spent code", "invalid_grant");

    assert_eq!(sessions(), 1, "only flow A made a session");
    assert_eq!(e.app.count(), 0, "the upstream received nothing");
    assert!(
        !e.idp.stderr().contains("server_error"),
        "{}",
        e.idp.stderr()
    );
    assert_logs_clean(&secrets);
}

/// Sends raw bytes on a fresh TLS connection (for request targets no HTTP
/// library will build, such as a backslash); returns the response head.
async fn raw_request(addr: std::net::SocketAddr, pki: &TestPki, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(common::DEADLINE, tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

use rustls_pki_types::pem::PemObject;

/// Open-redirect attempts in the return path: after a real login the
/// browser lands on `/`, never elsewhere.
#[tokio::test]
async fn return_paths_never_leave_the_origin() {
    let e = env(false, false, Auth::SecretBasic).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let signer = LoginSigner::new(&e.cookie_key);
    for (asked, lands) in [
        ("/app/ok?x=1&y=%2F", "/app/ok?x=1&y=%2F"),
        ("//evil.example/", "/"),
        ("//evil.example/%2F..", "/"),
        ("/%2F%2Fevil.example", "/"),
        ("/%2f/evil.example", "/"),
        ("/%5cevil.example", "/"),
        ("/%5C%5Cevil.example", "/"),
        ("/%09/evil.example", "/"),
        ("/app/%0d%0aLocation:%20https://evil.example", "/"),
        ("///evil.example", "/"),
    ] {
        b.jar.clear();
        let authorize = b.start(&e.idp, asked).await;
        let sealed = b.jar[LOGIN_COOKIE].clone();
        let st = signer.open(&sealed, portcullis::util::now_unix()).unwrap();
        assert_eq!(st.return_to, lands, "{asked}: sealed return path");
        let back = b.complete(&authorize, "alice@example.com", ACR_PWD).await;
        assert_eq!(back, lands, "{asked}: never followed");
    }
    // Forms no HTTP library sends: an absolute URL (absolute-form) and a
    // backslash in the request target. Neither returns anywhere but `/`;
    // an absolute-form request makes the proxy name that URL's host in
    // `redirect_uri`, which the IdP refuses (it is not registered), so
    // nothing goes there either.
    let port = server.proxy_addr.port();
    for target in [
        "https://evil.example/",
        "https://evil.example//evil.example/",
        "/\\evil.example",
        "/\\\\evil.example",
    ] {
        let head = raw_request(
            server.proxy_addr,
            &e.pki,
            &format!(
                "GET {target} HTTP/1.1\r\nhost: localhost:{port}\r\naccept: text/html\r\nconnection: close\r\n\r\n"
            ),
        )
        .await;
        let status = head.split(' ').nth(1).unwrap_or("");
        let find = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        let location = find("location: ");
        if status != "302" {
            assert!(status.starts_with('4'), "{target}: {head}");
            assert!(location.is_empty(), "{target}: {head}");
            continue;
        }
        assert!(location.starts_with(&e.idp.issuer), "{target}: {head}");
        let sealed = find("set-cookie: __Host-portcullis-login=");
        let sealed = sealed.split(';').next().unwrap();
        let st = signer.open(sealed, portcullis::util::now_unix()).unwrap();
        assert_eq!(st.return_to, "/", "{target}");
        let redirect = query_param(&location, "redirect_uri").unwrap();
        if redirect != format!("https://localhost:{port}{CALLBACK}") {
            let idp = CookieClient::new(None)
                .follow_within_origin(&location)
                .await;
            assert_eq!(
                idp.status,
                StatusCode::BAD_REQUEST,
                "{target}: {}",
                idp.text()
            );
            assert!(idp.text().contains("redirect_uri"), "{}", idp.text());
        }
    }
    assert_eq!(e.app.count(), 0);
}

#[tokio::test]
async fn leaver_and_lost_device_end_live_sessions() {
    let e = env(false, false, Auth::PrivateKeyJwt).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let posture = server.shared.posture.clone();
    // Alice joins through the SCIM feed (as an IdP's provisioning would).
    let scim = CookieClient::new(None);
    let scim_base = format!("http://{}/scim/v2", server.admin_addr);
    let scim_call = |method: http::Method, path: String, body: Value| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{scim_base}{path}"))
            .header("authorization", format!("Bearer {SCIM_TOKEN}"))
            .header("content-type", "application/scim+json")
            .body(common::full(body.to_string()))
            .unwrap();
        scim.send(req)
    };
    let joined = scim_call(
        http::Method::POST,
        "/Users".into(),
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": "alice@example.com", "externalId": "alice-1", "active": true,
            "emails": [{"primary": true, "value": "alice@example.com", "type": "work"}],
        }),
    )
    .await;
    assert_eq!(joined.status, StatusCode::CREATED, "{}", joined.text());
    let alice_id = joined.json()["id"].as_str().unwrap().to_owned();
    posture
        .ingest(vec![seed_event(
            "seed-1",
            vec![
                person("bob@example.com", IdentityStatus::Active),
                laptop("phone-002", "bob@example.com", Lifecycle::Enrolled),
            ],
        )])
        .await
        .unwrap();
    let mut alice = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    alice
        .login(&e.idp, "/app/", "alice@example.com", ACR_PWD)
        .await;
    let mut bob = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    bob.login(&e.idp, "/app/", "bob@example.com", ACR_PWD).await;
    assert_eq!(alice.get("/app/").await.0, StatusCode::OK);
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);
    // The device named by the ID token's `deviceid` (unverified).
    assert_eq!(
        header(&e.app.last().headers, "x-portcullis-device"),
        "phone-002"
    );
    assert_eq!(posture.snapshot().session_count(), 2);

    // Alice leaves (SCIM `active: false`): her live session is refused at
    // its next request.
    let left = scim_call(
        http::Method::PATCH,
        format!("/Users/{alice_id}"),
        json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "value": {"active": false}}],
        }),
    )
    .await;
    assert_eq!(left.status, StatusCode::OK, "{}", left.text());
    let seen = e.app.count();
    let (s, _, body) = alice.get("/app/").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", text(&body));
    assert!(text(&body).contains("Request id"), "{}", text(&body));
    assert!(
        !alice.jar.contains_key(SESSION_COOKIE),
        "the cookie is cleared"
    );
    assert_eq!(e.app.count(), seen);
    assert_eq!(posture.snapshot().session_count(), 1);
    // Logging in again does not bring her back: the new session ends at
    // its first request.
    alice
        .login(&e.idp, "/app/", "alice@example.com", ACR_PWD)
        .await;
    assert_eq!(alice.get("/app/").await.0, StatusCode::FORBIDDEN);
    assert!(!alice.jar.contains_key(SESSION_COOKIE));
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK, "bob goes on");

    // Bob signs in on a second browser of the same phone.
    let mut bob2 = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    bob2.login(&e.idp, "/app/", "bob@example.com", ACR_PWD)
        .await;
    assert_eq!(bob2.get("/app/").await.0, StatusCode::OK);
    assert_eq!(posture.snapshot().session_count(), 2);
    let seen = e.app.count();

    // Bob's phone is reported lost: each of its sessions ends at its next
    // request.
    posture
        .ingest(vec![seed_event(
            "lost-1",
            vec![laptop("phone-002", "bob@example.com", Lifecycle::Lost)],
        )])
        .await
        .unwrap();
    let (s, _, body) = bob.get("/app/").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let page = text(&body);
    assert!(
        page.contains("device is lost") && page.contains("Request id"),
        "{page}"
    );
    assert!(!bob.jar.contains_key(SESSION_COOKIE));
    assert_eq!(posture.snapshot().session_count(), 1);
    let (s, _, body) = bob2.get("/app/").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", text(&body));
    assert!(!bob2.jar.contains_key(SESSION_COOKIE));
    assert_eq!(e.app.count(), seen);
    assert_eq!(posture.snapshot().session_count(), 0);
}

#[tokio::test]
async fn back_channel_logout_from_the_idp_ends_the_sid_and_bad_tokens_change_nothing() {
    let e = env(false, false, Auth::SecretBasic).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let posture = server.shared.posture.clone();
    let mut alice = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    alice
        .login(&e.idp, "/app/", "alice@example.com", ACR_PWD)
        .await;
    let mut bob = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    bob.login(&e.idp, "/app/", "bob@example.com", ACR_PWD).await;
    let sid_of = |sub: &str| {
        posture
            .snapshot()
            .sessions_where(|s| s.subject == sub)
            .first()
            .and_then(|s| s.idp_sid.clone())
            .unwrap()
    };
    let (alice_sid, bob_sid) = (sid_of("alice@example.com"), sid_of("bob@example.com"));
    assert_ne!(alice_sid, bob_sid);

    let now = portcullis::util::now_unix();
    let iss = e.idp.issuer.clone();
    let claims = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut c = json!({
            "iss": iss, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
            "jti": common::idp::random_token(),
            "sid": bob_sid, "sub": "bob@example.com",
            "events": { portcullis::session::BACKCHANNEL_EVENT: {} },
        });
        f(c.as_object_mut().unwrap());
        c
    };
    let post = |token: String| {
        let addr = server.proxy_addr;
        let ca = e.pki.ca_pem.clone();
        async move {
            let mut c = TlsConn::connect(addr, "localhost", &ca, None)
                .await
                .unwrap();
            let body = form_urlencoded::Serializer::new(String::new())
                .append_pair("logout_token", &token)
                .finish();
            let (s, _, b) = c
                .send_body(
                    "POST",
                    "/.portcullis/backchannel-logout",
                    &[("content-type", "application/x-www-form-urlencoded")],
                    body,
                )
                .await
                .unwrap();
            (s, text(&b))
        }
    };
    let lt = Some("logout+jwt");
    let mut bad = Vec::new();
    for (what, c, typ) in [
        (
            "wrong iss",
            claims(&|c| {
                c.insert("iss".into(), "https://other.example".into());
            }),
            lt,
        ),
        (
            "wrong aud",
            claims(&|c| {
                c.insert("aud".into(), "someone-else".into());
            }),
            lt,
        ),
        (
            "no events",
            claims(&|c| {
                c.remove("events");
            }),
            lt,
        ),
        (
            "another event",
            claims(&|c| {
                c.insert("events".into(), json!({"urn:other:event": {}}));
            }),
            lt,
        ),
        (
            "a nonce",
            claims(&|c| {
                c.insert("nonce".into(), "n-1".into());
            }),
            lt,
        ),
        (
            "neither sid nor sub",
            claims(&|c| {
                c.remove("sid");
                c.remove("sub");
            }),
            lt,
        ),
        (
            "no jti",
            claims(&|c| {
                c.remove("jti");
            }),
            lt,
        ),
        (
            "too old",
            claims(&|c| {
                c.insert("iat".into(), (now - 3600).into());
            }),
            lt,
        ),
        (
            "expired",
            claims(&|c| {
                c.insert("iat".into(), (now - 300).into());
                c.insert("exp".into(), (now - 200).into());
            }),
            lt,
        ),
        ("wrong typ", claims(&|_| {}), Some("at+jwt")),
    ] {
        bad.push((what, e.idp.sign("ES256", typ, c).await));
    }
    // Forged: the IdP's kid, another key.
    let forged = SigningKey::es256("idp-es256")
        .unwrap()
        .sign_jws(
            &json!({"alg": "ES256", "kid": "idp-es256", "typ": "logout+jwt"}),
            &claims(&|_| {}),
        )
        .unwrap();
    bad.push(("forged", forged));
    bad.push(("not a JWT", "not-a-jwt".to_owned()));
    let good = e.idp.sign("ES256", lt, claims(&|_| {})).await;
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    bad.push(("bad signature", parts.join(".")));
    for (what, token) in bad {
        let (s, body) = post(token).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert!(body.contains("invalid_logout_token"), "{what}: {body}");
    }
    assert_eq!(
        posture.snapshot().session_count(),
        2,
        "no bad token ended anything"
    );
    assert_eq!(alice.get("/app/").await.0, StatusCode::OK);
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);

    // The IdP's own back-channel logout for alice's sid: only hers ends.
    e.idp
        .backchannel_logout(CLIENT_ID, "alice@example.com", Some(&alice_sid))
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", e.idp.stderr()));
    assert_eq!(posture.snapshot().session_count(), 1);
    let (s, h, _) = alice.get("/app/").await;
    assert_eq!(s, StatusCode::FOUND, "back to log in");
    assert!(header(&h, "location").starts_with(&e.idp.issuer));
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);

    // A well-formed token of the IdP's for bob ends his; its replay is refused.
    let (s, body) = post(good.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(posture.snapshot().session_count(), 0);
    let (s, _) = post(good.clone()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a replayed logout token");
    assert_eq!(bob.get("/app/").await.0, StatusCode::FOUND);
    assert_logs_clean(&[good]);
}

#[tokio::test]
async fn unmanaged_browsers_step_up_then_carry_the_higher_acr() {
    let e = env(true, false, Auth::PrivateKeyJwt).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    server
        .shared
        .posture
        .ingest(vec![seed_event(
            "seed",
            vec![person("carol@partner.example", IdentityStatus::Active)],
        )])
        .await
        .unwrap();
    let sessions = || server.shared.posture.snapshot().sessions_where(|_| true);
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let back = b
        .login(&e.idp, "/app/doc", "carol@partner.example", ACR_PWD)
        .await;
    let first = b.jar[SESSION_COOKIE].clone();
    // No managed device: the default policies step up, by redirect.
    let (s, h, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::FOUND);
    assert_eq!(e.app.count(), 0);
    let authorize = header(&h, "location");
    assert!(authorize.starts_with(&e.idp.issuer), "{authorize}");
    assert_eq!(
        query_param(&authorize, "acr_values").as_deref(),
        Some(ACR_MFA)
    );
    assert_eq!(query_param(&authorize, "max_age").as_deref(), Some("3600"));
    assert_eq!(query_param(&authorize, "prompt").as_deref(), Some("login"));
    // The IdP asks again although it has a session (prompt=login), with
    // MFA preselected; answering with a password only is refused and
    // leaves the weaker session as it was.
    let page = b.idp.follow_within_origin(&authorize).await;
    assert!(page.text().contains("id=\"login\""), "{}", page.text());
    assert!(
        page.text()
            .contains(&format!("value=\"{ACR_MFA}\" selected")),
        "{}",
        page.text()
    );
    let callback = b.at_idp(&authorize, "carol@partner.example", ACR_PWD).await;
    let (s, _, body) = b.get(&callback).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", text(&body));
    assert!(text(&body).contains("step_up_not_met"), "{}", text(&body));
    assert_eq!(b.jar[SESSION_COOKIE], first);
    assert_eq!(sessions().len(), 1);
    assert_eq!(sessions()[0].acr.as_deref(), Some(ACR_PWD));

    // With MFA: back on the page with the higher acr.
    let (_, h, _) = b.get(&back).await;
    let back = b
        .complete(&header(&h, "location"), "carol@partner.example", ACR_MFA)
        .await;
    assert_eq!(back, "/app/doc");
    assert_ne!(b.jar[SESSION_COOKIE], first, "a new session id");
    let (s, _, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::OK);
    let all = sessions();
    assert_eq!(all.len(), 1, "the weaker session was replaced");
    assert_eq!(all[0].acr.as_deref(), Some(ACR_MFA));
    assert_eq!(all[0].amr, vec!["pwd".to_owned(), "otp".to_owned()]);
    // `shorten` (the default policies' 15 minutes for unmanaged devices)
    // capped the session's absolute expiry, durably.
    assert_eq!(all[0].expires_s, all[0].created_s + 900);
    let seen = e.app.last();
    assert_eq!(seen.path, "/app/doc");
    assert_eq!(header(&seen.headers, "x-portcullis-decision"), "shorten");
    // The old cookie is dead.
    let mut old = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    old.jar.insert(SESSION_COOKIE.into(), first);
    assert_eq!(old.get("/app/doc").await.0, StatusCode::FOUND);
}

#[tokio::test]
async fn certificate_bound_sessions_refuse_their_cookie_elsewhere() {
    let e = env(false, true, Auth::PrivateKeyJwt).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    e.register(server.proxy_addr.port()).await;
    let ca = &e.device_ca;
    let mine = ClientIdentity::from(&ca.client_cert("laptop-1", &["device://laptop-1"]).unwrap());
    let other = ClientIdentity::from(&ca.client_cert("laptop-2", &["device://laptop-2"]).unwrap());
    let mut b = Browser::open(server.proxy_addr, "app.test", &e.pki, Some(&mine)).await;
    b.login(&e.idp, "/app/", "alice@example.com", ACR_PWD).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    let seen = e.app.last();
    assert_eq!(
        header(&seen.headers, "x-portcullis-verified-device"),
        "laptop-1"
    );
    let rec = &server.shared.posture.snapshot().sessions_where(|_| true)[0];
    assert_eq!(rec.binding.as_str(), "mtls");
    assert_eq!(rec.device.as_deref(), Some("laptop-1"));
    assert!(rec.device_verified);

    let count = e.app.count();
    for id in [Some(&other), None] {
        let mut thief = Browser::open(server.proxy_addr, "app.test", &e.pki, id).await;
        thief.jar = b.jar.clone();
        let (s, _, body) = thief.get("/app/").await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{}", text(&body));
        assert!(text(&body).contains("another device"), "{}", text(&body));
    }
    // On a host without client certificates, too.
    let mut thief = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    thief.jar = b.jar.clone();
    assert_eq!(thief.get("/app/").await.0, StatusCode::FORBIDDEN);
    assert_eq!(e.app.count(), count, "the upstream received nothing");
    assert_eq!(b.get("/app/").await.0, StatusCode::OK, "the owner goes on");
    assert_eq!(server.shared.posture.snapshot().session_count(), 1);
}

#[tokio::test]
async fn sessions_survive_a_restart() {
    let e = env(false, false, Auth::SecretBasic).await;
    let proc1 = common::ServeProcess::spawn(&e.cfg).await;
    e.register(proc1.proxy.port()).await;
    let mut b = Browser::open(proc1.proxy, "localhost", &e.pki, None).await;
    b.login(&e.idp, "/app/", "alice@example.com", ACR_PWD).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    drop(proc1);
    let proc2 = common::ServeProcess::spawn(&e.cfg).await;
    let mut again = Browser::open(proc2.proxy, "localhost", &e.pki, None).await;
    again.jar = b.jar.clone();
    let (s, _, _) = again.get("/app/").await;
    assert_eq!(s, StatusCode::OK, "the session outlived the process");
    assert_eq!(
        header(&e.app.last().headers, "x-portcullis-subject"),
        "alice@example.com"
    );
    // And a forged cookie is still nothing after a restart.
    again.jar.insert(
        SESSION_COOKIE.into(),
        portcullis::session::cookie::new_session_id().unwrap(),
    );
    assert_eq!(again.get("/app/").await.0, StatusCode::FOUND);
}
