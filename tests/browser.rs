//! Browser access end to end: a real OpenID provider on loopback (the demo's
//! minimal provider, behind [`Idp`]; the npm `oidc-provider` harness slots
//! in behind the same methods), the proxy over real TLS, and a client with
//! a cookie jar that follows the login redirects as a browser would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::{ClientIdentity, DEADLINE, TestPki, TlsConn, Upstream};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::oidc::{ACR_MFA, DEMO_CLIENT_ID, DemoProvider};
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, DevicePatch, Feed, IdentityPatch, PostureEvent};
use portcullis::posture::model::{Compliance, IdentityKind, IdentityStatus, Lifecycle, Ownership};
use portcullis::session::cookie::{LOGIN_COOKIE, SESSION_COOKIE};
use tokio::net::TcpListener;

/// The OpenID provider the proxy logs browsers in with.
struct Idp {
    url: String,
    key: Arc<SigningKey>,
    secret: String,
}

impl Idp {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let key = Arc::new(SigningKey::es256("idp-1").unwrap());
        let secret = "s3cret-for-tests".to_owned();
        let provider = Arc::new(DemoProvider::new(url.clone(), key.clone(), secret.clone()));
        let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let provider = provider.clone();
                let jwks = jwks.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let provider = provider.clone();
                        let jwks = jwks.clone();
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
        Self { url, key, secret }
    }

    /// Completes the IdP's login form for `sub` (with MFA or not) from its
    /// authorize URL; returns the redirect back to the proxy's callback.
    async fn login(&self, authorize_url: &str, sub: &str, mfa: bool) -> String {
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
            .append_pair("mfa", if mfa { "1" } else { "0" })
            .finish();
        let (status, h, _) = plain_get(&format!("{}/login?{q}", self.url)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "login click");
        header(&h, "location")
    }

    /// A logout token signed by the IdP.
    fn logout_token(&self, claims: serde_json::Value, typ: Option<&str>) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.key.kid.clone());
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &self.key.encoding_key().unwrap()).unwrap()
    }
}

async fn plain_get(url: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(
        DEADLINE,
        c.request(Request::get(url).body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let (p, b) = resp.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A browser: one TLS connection (with an optional client certificate) and
/// a cookie jar.
struct Browser {
    conn: TlsConn,
    jar: HashMap<String, String>,
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
        if !cookies.is_empty() {
            headers.push(("cookie", &cookies));
        }
        let (s, h, b) = self.conn.send(method, path, &headers).await.unwrap();
        for v in h.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            assert!(attrs.contains("Secure") && attrs.contains("Path=/"), "{v}");
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

    /// Opens `path`, logs in at the IdP as `sub`, follows the callback;
    /// returns where the proxy sent the browser back to.
    async fn login(&mut self, idp: &Idp, path: &str, sub: &str, mfa: bool) -> String {
        let (s, h, _) = self.get(path).await;
        assert_eq!(
            s,
            StatusCode::FOUND,
            "a browser without a session goes to log in"
        );
        let authorize = header(&h, "location");
        assert!(authorize.starts_with(&idp.url), "{authorize}");
        assert!(authorize.contains("code_challenge_method=S256"));
        self.complete(idp, &authorize, sub, mfa).await
    }

    /// Completes a login from the IdP's authorize URL on.
    async fn complete(&mut self, idp: &Idp, authorize: &str, sub: &str, mfa: bool) -> String {
        let back = idp.login(authorize, sub, mfa).await;
        let callback = back
            .split_once("/.portcullis/")
            .map(|(_, r)| format!("/.portcullis/{r}"))
            .unwrap();
        let (s, h, body) = self.get(&callback).await;
        assert_eq!(
            s,
            StatusCode::SEE_OTHER,
            "callback: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(self.jar.contains_key(SESSION_COOKIE));
        assert!(!self.jar.contains_key(LOGIN_COOKIE));
        header(&h, "location")
    }
}

struct Env {
    pki: TestPki,
    idp: Idp,
    app: Upstream,
    cfg: std::path::PathBuf,
    device_ca: portcullis::demo::pki::DevCa,
}

fn policies_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/policies")
        .display()
        .to_string()
}

async fn env(policy: bool, mtls: bool) -> Env {
    let pki = TestPki::new();
    let idp = Idp::start().await;
    let app = Upstream::start().await;
    std::fs::write(pki.path().join("client-secret"), &idp.secret).unwrap();
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
    let idp_url = &idp.url;
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
issuer = "{idp_url}"
audiences = ["https://api.test"]
algorithms = ["ES256"]
discovery_url = "{idp_url}/.well-known/openid-configuration"
min_refresh_interval_s = 0

[browser]
issuer = "idp"
client_id = "{DEMO_CLIENT_ID}"
client_secret_file = "client-secret"

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

#[tokio::test]
async fn login_then_session_reuse_and_api_clients_get_401() {
    let e = env(false, false).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let back = b
        .login(&e.idp, "/app/page?x=1", "alice@example.com", false)
        .await;
    assert_eq!(back, "/app/page?x=1", "back to the page it asked for");
    let (s, _, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::OK);
    let seen = e.app.last();
    assert_eq!(
        header(&seen.headers, "x-portcullis-subject"),
        "alice@example.com"
    );
    assert!(
        seen.headers
            .get("cookie")
            .is_none_or(|c| !c.to_str().unwrap().contains("login"))
    );
    // Reuse: no second login.
    let n = server.shared.posture.snapshot().session_count();
    assert_eq!(b.get("/app/other").await.0, StatusCode::OK);
    assert_eq!(server.shared.posture.snapshot().session_count(), n);

    // API calls on a browser route: 401 JSON, never a redirect.
    let mut api = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    for (method, headers) in [
        ("GET", vec![("accept", "application/json")]),
        ("POST", vec![("accept", "text/html")]),
        ("GET", vec![("authorization", "Bearer abc")]),
    ] {
        let (s, h, body) = api.send(method, "/app/x", &headers).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {headers:?}");
        assert!(header(&h, "content-type").starts_with("application/json"));
        assert!(String::from_utf8_lossy(&body).contains("login_required"));
    }

    // Logout: cross-site refused, same-origin deletes the record.
    let origin = format!("https://{}", b.conn.host);
    let (s, _, body) = b
        .send(
            "POST",
            "/.portcullis/logout",
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(server.shared.posture.snapshot().session_count(), n);
    let (s, h, _) = b
        .send("POST", "/.portcullis/logout", &[("origin", &origin)])
        .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(header(&h, "location").starts_with(&format!("{}/end_session", e.idp.url)));
    assert!(!b.jar.contains_key(SESSION_COOKIE));
    assert_eq!(server.shared.posture.snapshot().session_count(), n - 1);
}

#[tokio::test]
async fn bad_cookies_states_and_return_paths_are_refused() {
    let e = env(false, false).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let sessions = || server.shared.posture.snapshot().session_count();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;

    // Forged, tampered, oversized session cookies: never a session.
    for bad in [
        "A".repeat(43),
        "A".repeat(44),
        "A".repeat(5000),
        "not base64!".to_owned(),
    ] {
        b.jar.clear();
        b.jar.insert(SESSION_COOKIE.into(), bad.clone());
        let (s, _, _) = b.get("/app/").await;
        assert!(
            s == StatusCode::FOUND || s == StatusCode::BAD_REQUEST,
            "{s} for a {}-byte cookie",
            bad.len()
        );
    }
    assert_eq!(e.app.count(), 0);

    // Open redirects: the return path falls back to `/`.
    for evil in ["//evil.example/", "/%2F%2Fevil.example", "/%5cevil"] {
        b.jar.clear();
        let (s, h, _) = b.get(evil).await;
        assert_eq!(s, StatusCode::FOUND, "{evil}");
        let authorize = header(&h, "location");
        let back = b
            .complete(&e.idp, &authorize, "alice@example.com", false)
            .await;
        assert_eq!(back, "/", "{evil}: never followed");
    }
    let before_all = sessions();
    b.jar.clear();
    assert!(before_all >= 1);

    // The callback without a login cookie, with another state, replayed.
    b.jar.clear();
    let (_, h, _) = b.get("/app/").await;
    let authorize = header(&h, "location");
    let back = e.idp.login(&authorize, "alice@example.com", false).await;
    let callback = format!(
        "/.portcullis/{}",
        back.split_once("/.portcullis/").unwrap().1
    );
    let login_cookie = b.jar.clone();
    let before = sessions();
    b.jar.clear();
    let (s, _, body) = b.get(&callback).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no login cookie");
    assert!(String::from_utf8_lossy(&body).contains("<html lang=\"en\""));
    b.jar = login_cookie.clone();
    let wrong_state = callback.replace("state=", "state=x");
    assert_eq!(b.get(&wrong_state).await.0, StatusCode::BAD_REQUEST);
    let no_state: String = callback.split("&state=").next().unwrap().to_owned();
    b.jar = login_cookie.clone();
    assert_eq!(b.get(&no_state).await.0, StatusCode::BAD_REQUEST);
    // A tampered login cookie.
    let mut tampered = login_cookie.clone();
    let v = tampered.get_mut(LOGIN_COOKIE).unwrap();
    v.replace_range(0..2, "ey");
    v.insert(3, 'x');
    b.jar = tampered;
    assert_eq!(b.get(&callback).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(sessions(), before, "no session from any of these");
    // Code injection: a code for another login (state ok, code of another
    // browser's flow) is refused by the IdP's PKCE check.
    let mut other = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let (_, h, _) = other.get("/app/").await;
    let other_back = e
        .idp
        .login(&header(&h, "location"), "bob@example.com", false)
        .await;
    let other_code = other_back
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    let own_code = callback
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    b.jar = login_cookie.clone();
    let injected = callback.replace(&own_code, &other_code);
    let (s, _, _) = b.get(&injected).await;
    assert!(s.is_client_error() || s.is_server_error(), "{s}");
    // The state is spent now: the genuine callback is refused as a replay.
    b.jar = login_cookie;
    assert_eq!(b.get(&callback).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(sessions(), before);
}

#[tokio::test]
async fn leaver_and_lost_device_end_live_sessions() {
    let e = env(false, false).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();
    posture
        .ingest(vec![seed_event(
            "seed-1",
            vec![
                person("alice@example.com", IdentityStatus::Active),
                person("bob@example.com", IdentityStatus::Active),
                laptop("phone-002", "bob@example.com", Lifecycle::Enrolled),
            ],
        )])
        .await
        .unwrap();
    let mut alice = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    alice
        .login(&e.idp, "/app/", "alice@example.com", false)
        .await;
    let mut bob = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    bob.login(&e.idp, "/app/", "bob@example.com", false).await;
    assert_eq!(alice.get("/app/").await.0, StatusCode::OK);
    assert_eq!(bob.get("/app/").await.0, StatusCode::OK);
    assert_eq!(
        header(&e.app.last().headers, "x-portcullis-device"),
        "phone-002"
    );
    assert_eq!(posture.snapshot().session_count(), 2);

    // Alice leaves: her live session is refused at its next request and ended.
    posture
        .ingest(vec![seed_event(
            "leaver-1",
            vec![person("alice@example.com", IdentityStatus::Terminated)],
        )])
        .await
        .unwrap();
    let seen = e.app.count();
    let (s, _, body) = alice.get("/app/").await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        !alice.jar.contains_key(SESSION_COOKIE),
        "the cookie is cleared"
    );
    assert_eq!(e.app.count(), seen);
    assert_eq!(posture.snapshot().session_count(), 1);

    // Bob's phone is reported lost: his session ends too.
    posture
        .ingest(vec![seed_event(
            "lost-1",
            vec![laptop("phone-002", "bob@example.com", Lifecycle::Lost)],
        )])
        .await
        .unwrap();
    let (s, _, body) = bob.get("/app/").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let page = String::from_utf8_lossy(&body);
    assert!(
        page.contains("device is lost") && page.contains("Request id"),
        "{page}"
    );
    assert_eq!(e.app.count(), seen);
    assert_eq!(posture.snapshot().session_count(), 0);
}

#[tokio::test]
async fn back_channel_logout_ends_the_sid_and_refuses_bad_tokens() {
    let e = env(false, false).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let posture = server.shared.posture.clone();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    b.login(&e.idp, "/app/", "alice@example.com", false).await;
    let sid = posture.snapshot().sessions_where(|_| true)[0]
        .idp_sid
        .clone()
        .unwrap();
    let now = portcullis::util::now_unix();
    let claims = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = serde_json::json!({
            "iss": e.idp.url, "aud": DEMO_CLIENT_ID, "iat": now, "exp": now + 120,
            "jti": format!("j-{}", portcullis::session::cookie::random_token(6).unwrap()),
            "sid": sid, "sub": "alice@example.com",
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
            c.send_body(
                "POST",
                "/.portcullis/backchannel-logout",
                &[("content-type", "application/x-www-form-urlencoded")],
                body,
            )
            .await
            .unwrap()
            .0
        }
    };
    let bad = [
        e.idp.logout_token(
            claims(&|c| {
                c.insert("iss".into(), "https://other".into());
            }),
            None,
        ),
        e.idp.logout_token(
            claims(&|c| {
                c.insert("aud".into(), "someone-else".into());
            }),
            None,
        ),
        e.idp.logout_token(
            claims(&|c| {
                c.remove("events");
            }),
            None,
        ),
        e.idp.logout_token(
            claims(&|c| {
                c.insert("nonce".into(), "n".into());
            }),
            None,
        ),
        e.idp.logout_token(
            claims(&|c| {
                c.remove("sid");
                c.remove("sub");
            }),
            None,
        ),
        e.idp.logout_token(claims(&|_| {}), Some("JWT+wrong")),
        // Forged: the IdP's kid, another key.
        SigningKey::es256("idp-1")
            .unwrap()
            .sign_jws(
                &serde_json::json!({"alg": "ES256", "kid": "idp-1", "typ": "logout+jwt"}),
                &claims(&|_| {}),
            )
            .unwrap(),
    ];
    for t in bad {
        assert_eq!(post(t).await, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        posture.snapshot().session_count(),
        1,
        "no bad token ended anything"
    );
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    let good = e.idp.logout_token(claims(&|_| {}), Some("logout+jwt"));
    assert_eq!(post(good.clone()).await, StatusCode::OK);
    assert_eq!(posture.snapshot().session_count(), 0);
    assert_eq!(
        post(good).await,
        StatusCode::BAD_REQUEST,
        "a replayed logout token"
    );
    assert_eq!(b.get("/app/").await.0, StatusCode::FOUND, "back to log in");
}

#[tokio::test]
async fn unmanaged_browsers_step_up_then_carry_the_higher_acr() {
    let e = env(true, false).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    server
        .shared
        .posture
        .ingest(vec![seed_event(
            "seed",
            vec![person("carol@partner.example", IdentityStatus::Active)],
        )])
        .await
        .unwrap();
    let mut b = Browser::open(server.proxy_addr, "localhost", &e.pki, None).await;
    let back = b
        .login(&e.idp, "/app/doc", "carol@partner.example", false)
        .await;
    // No managed device: the default policies step up, by redirect.
    let (s, h, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::FOUND);
    let authorize = header(&h, "location");
    assert!(
        authorize.contains("acr_values=urn%3Aportcullis%3Aacr%3Amfa"),
        "{authorize}"
    );
    assert!(authorize.contains("prompt=login") && authorize.contains("max_age=3600"));
    let back = b
        .complete(&e.idp, &authorize, "carol@partner.example", true)
        .await;
    assert_eq!(back, "/app/doc");
    let (s, _, _) = b.get(&back).await;
    assert_eq!(s, StatusCode::OK);
    let sessions = server.shared.posture.snapshot().sessions_where(|_| true);
    assert_eq!(sessions.len(), 1, "the weaker session was replaced");
    assert_eq!(sessions[0].acr.as_deref(), Some(ACR_MFA));
    // `shorten` (the default policies' 15 minutes for unmanaged devices)
    // capped the session's absolute expiry, durably.
    assert_eq!(sessions[0].expires_s, sessions[0].created_s + 900);
    assert_eq!(
        header(&e.app.last().headers, "x-portcullis-decision"),
        "shorten"
    );
}

#[tokio::test]
async fn certificate_bound_sessions_refuse_their_cookie_elsewhere() {
    let e = env(false, true).await;
    let server = portcullis::server::start(e.cfg.clone()).await.unwrap();
    let ca = &e.device_ca;
    let mine = ClientIdentity::from(&ca.client_cert("laptop-1", &["device://laptop-1"]).unwrap());
    let other = ClientIdentity::from(&ca.client_cert("laptop-2", &["device://laptop-2"]).unwrap());
    let mut b = Browser::open(server.proxy_addr, "app.test", &e.pki, Some(&mine)).await;
    b.login(&e.idp, "/app/", "alice@example.com", false).await;
    assert_eq!(b.get("/app/").await.0, StatusCode::OK);
    let seen = e.app.last();
    assert_eq!(
        header(&seen.headers, "x-portcullis-verified-device"),
        "laptop-1"
    );
    let rec = &server.shared.posture.snapshot().sessions_where(|_| true)[0];
    assert_eq!(rec.binding.as_str(), "mtls");

    for id in [Some(&other), None] {
        let mut thief = Browser::open(server.proxy_addr, "app.test", &e.pki, id).await;
        thief.jar = b.jar.clone();
        let (s, _, body) = thief.get("/app/").await;
        assert_eq!(
            s,
            StatusCode::FORBIDDEN,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(String::from_utf8_lossy(&body).contains("another device"));
    }
    assert_eq!(b.get("/app/").await.0, StatusCode::OK, "the owner goes on");
}

#[tokio::test]
async fn sessions_survive_a_restart() {
    let e = env(false, false).await;
    let proc1 = common::ServeProcess::spawn(&e.cfg).await;
    let mut b = Browser::open(proc1.proxy, "localhost", &e.pki, None).await;
    b.login(&e.idp, "/app/", "alice@example.com", false).await;
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
}
