//! Sync out: portcullis as a Shared Signals transmitter and a signed
//! webhook. A TLS receiver written here (loopback, the test CA) records what
//! the proxy pushes; SETs are verified with `jose` (node, a JWT library
//! nobody here wrote) against the JWKS the proxy publishes; the management
//! API is checked against SSF §8's status codes; the outbox survives SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const ISS: &str = "https://idp.test";
const TX_ISS: &str = "https://portcullis.test/ssf";
const FEED_TX: &str = "https://ssf.upstream-tx.test";
const RX_AUD: &str = "https://rx.test/ssf";
const ECHO_AUD: &str = "https://echo.test/ssf";
const RX_TOKEN: &str = "rx-token-0123456789abcdef";
const RO_TOKEN: &str = "ro-token-0123456789abcdef";
const ECHO_TOKEN: &str = "echo-token-0123456789abcdef";
const PUSH_TOKEN: &str = "push-secret-0123456789";
const PUSH_AUTH: &str = "Bearer rx-push-secret-42";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";
const MDM_SECRET: &str = "mdm-secret-0123456789";
const SCIM_TOKEN: &str = "scim-secret-0123456789";
const HOOK_SECRET: &str = "hook-secret-0123456789";
const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";
const SSF: &str = "https://schemas.openid.net/secevent/ssf/event-type/";

/// One request the receiver saw, with the status it answered.
#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: http::HeaderMap,
    body: String,
    answered: u16,
}

/// A TLS receiver on loopback: answers `status` and records every request.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start(pki: &TestPki) -> Self {
        let acceptor = pki.tls_acceptor(&[b"http/1.1"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(202));
        let (s2, st2) = (seen.clone(), status.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, status) = (acceptor.clone(), s2.clone(), st2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, status) = (seen.clone(), status.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let answered = status.load(Ordering::SeqCst);
                            seen.lock().unwrap().push(Got {
                                path,
                                headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                                answered,
                            });
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::from_u16(answered).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, status }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    fn seen(&self, path: &str) -> Vec<Got> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect()
    }
}

/// The decoded payload of a compact JWS (no verification: `jose` does that).
fn payload(set: &str) -> Value {
    let p = set.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap()
}

fn event_type(set: &str) -> String {
    payload(set)["events"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone()
}

fn config(pki: &TestPki, upstream: &Upstream, rx: &Receiver, extra: &str) -> String {
    let rsa = SigningKey::rs256("tx-2026").unwrap();
    std::fs::write(pki.path().join("tx-key.pem"), &rsa.private_pem).unwrap();
    let feed_tx = SigningKey::es256("feed-tx").unwrap();
    std::fs::write(
        pki.path().join("feed-tx-jwks.json"),
        json!({"keys": [feed_tx.jwk]}).to_string(),
    )
    .unwrap();
    std::fs::write(pki.path().join("feed-tx.pem"), &feed_tx.private_pem).unwrap();
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
        )
        .replace(
            "[log]",
            &format!(
                r#"
[feeds.ssf]
push_token = "{PUSH_TOKEN}"
issuer = "{FEED_TX}"
audiences = ["https://portcullis.test/rx"]
algorithms = ["ES256"]
jwks_file = "feed-tx-jwks.json"

[feeds.scim]
token = "{SCIM_TOKEN}"

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"

[transmitter]
issuer = "{TX_ISS}"
ca_file = "ca.pem"
retry_initial_ms = 50
retry_max_ms = 200
max_attempts = 1000
min_verification_interval_s = 3600
sweep_interval_ms = 50

[[transmitter.keys]]
kid = "tx-2026"
private_key_file = "tx-key.pem"

[[transmitter.receivers]]
name = "siem"
token = "{RX_TOKEN}"
audience = "{RX_AUD}"
max_streams = 2

[[transmitter.receivers]]
name = "auditor"
token = "{RO_TOKEN}"
audience = "https://auditor.test"
scopes = ["ssf.read"]

[[transmitter.receivers]]
name = "upstream-idp"
token = "{ECHO_TOKEN}"
audience = "{ECHO_AUD}"
issuer = "{FEED_TX}"

{extra}
[log]"#,
                extra = extra.replace("RXURL", &rx.url("/hook"))
            ),
        )
}

async fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(a) = auth {
        b = b.header("authorization", format!("Bearer {a}"));
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(
        DEADLINE,
        c.request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let st = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn create_stream(admin: SocketAddr, token: &str, rx: &Receiver, path: &str) -> String {
    let all: Vec<String> = [
        "session-revoked",
        "credential-change",
        "device-compliance-change",
        "assurance-level-change",
    ]
    .iter()
    .map(|e| format!("{CAEP}{e}"))
    .chain(
        ["account-disabled", "account-purged"]
            .iter()
            .map(|e| format!("{RISC}{e}")),
    )
    .chain([format!("{SSF}verification"), format!("{SSF}stream-updated")])
    .collect();
    let (st, v) = send(
        admin,
        "POST",
        "/ssf/streams",
        Some(token),
        &json!({
            "delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": rx.url(path),
                         "authorization_header": PUSH_AUTH},
            "events_requested": all,
            "description": "test stream",
        })
        .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v["stream_id"].as_str().unwrap().to_owned()
}

async fn mdm_lost(admin: SocketAddr, id: &str, device: &str) {
    let (st, v) = send(
        admin,
        "POST",
        "/mdm/v1/acme/events",
        Some(MDM_SECRET),
        &json!({"event_id": id, "device_id": device,
                "occurred_at": portcullis::util::now_unix_ms(), "lifecycle": "lost"})
        .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
}

fn jose_verify_blocking(jwks_url: &str, set: &str, audience: &str) -> Result<Value, String> {
    let dir = common::idp::js_dir();
    let mut child = Command::new("node")
        .arg(dir.join("verify-set.mjs"))
        .arg(jwks_url)
        .arg(TX_ISS)
        .arg(audience)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(set.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn jose_verify(admin: SocketAddr, set: &str, audience: &str) -> Result<Value, String> {
    let (url, set, aud) = (
        format!("http://{admin}/ssf/jwks.json"),
        set.to_owned(),
        audience.to_owned(),
    );
    tokio::task::spawn_blocking(move || jose_verify_blocking(&url, &set, &aud))
        .await
        .unwrap()
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut out = None;
    wait_until(what, || {
        out = f();
        out.is_some()
    })
    .await;
    out.unwrap()
}

/// A feed event becomes SETs at the receiver: pushed per RFC 8935 (media
/// type, the receiver's `authorization_header`), verified by `jose` with the
/// published JWKS, with the CAEP / RISC types of the mapping table; a SCIM
/// leaver gives `account-disabled`, a delete `account-purged`; verification
/// echoes `state`; the metadata names every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_events_reach_the_receiver_as_sets_that_jose_verifies() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let rx = Receiver::start(&pki).await;
    pki.issuer_key("user-1");
    let cfg = pki.write_config("tx.toml", &config(&pki, &upstream, &rx, ""));
    let server = portcullis::server::start(cfg).await.unwrap();
    let admin = server.admin_addr;

    let (st, meta) = send(admin, "GET", "/.well-known/ssf-configuration/ssf", None, "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(meta["issuer"], TX_ISS);
    assert_eq!(meta["spec_version"], "1_0");
    assert_eq!(
        meta["delivery_methods_supported"],
        json!(["urn:ietf:rfc:8935"])
    );
    for k in [
        "jwks_uri",
        "configuration_endpoint",
        "status_endpoint",
        "add_subject_endpoint",
        "remove_subject_endpoint",
        "verification_endpoint",
    ] {
        assert!(
            meta[k]
                .as_str()
                .unwrap()
                .starts_with("https://portcullis.test/ssf/"),
            "{k}: {meta}"
        );
    }
    assert_eq!(
        meta["authorization_schemes"][0]["spec_urn"],
        "urn:ietf:rfc:6749"
    );

    let sid = create_stream(admin, RX_TOKEN, &rx, "/events").await;
    mdm_lost(admin, "evt-lost-1", "mac-7").await;
    let sets = wait_for("two SETs for the lost device", || {
        let s = rx.seen("/events");
        let t: Vec<String> = s.iter().map(|g| event_type(&g.body)).collect();
        (t.contains(&format!("{CAEP}device-compliance-change"))
            && t.contains(&format!("{CAEP}session-revoked")))
        .then_some(s)
    })
    .await;
    let types: Vec<String> = sets.iter().map(|g| event_type(&g.body)).collect();
    assert!(
        types.contains(&format!("{CAEP}device-compliance-change")),
        "{types:?}"
    );
    assert!(
        types.contains(&format!("{CAEP}session-revoked")),
        "{types:?}"
    );
    for g in &sets {
        assert_eq!(g.headers["content-type"], "application/secevent+jwt");
        assert_eq!(g.headers["authorization"], PUSH_AUTH);
        let v = jose_verify(admin, &g.body, RX_AUD).await.unwrap();
        assert_eq!(v["header"]["typ"], "secevent+jwt");
        assert_eq!(v["header"]["kid"], "tx-2026");
        assert_eq!(v["payload"]["iss"], TX_ISS);
        assert!(v["payload"]["txn"].is_string());
    }
    let dcc = sets
        .iter()
        .map(|g| payload(&g.body))
        .find(|p| p["events"][format!("{CAEP}device-compliance-change")].is_object())
        .unwrap();
    let ev = &dcc["events"][format!("{CAEP}device-compliance-change")];
    assert_eq!(ev["current_status"], "not-compliant");
    assert_eq!(ev["previous_status"], "compliant");
    assert_eq!(dcc["sub_id"]["device"]["id"], "mac-7");
    // Another receiver's token gets a 401 from jose's point of view: a
    // different audience does not verify.
    assert!(
        jose_verify(admin, &sets[0].body, "https://other.test")
            .await
            .is_err()
    );

    // SCIM joiner → leaver → delete.
    let (st, user) = send(
        admin,
        "POST",
        "/scim/v2/Users",
        Some(SCIM_TOKEN),
        &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "bob@corp.test", "active": true})
        .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{user}");
    let uid = user["id"].as_str().unwrap();
    let (st, _) = send(
        admin,
        "PATCH",
        &format!("/scim/v2/Users/{uid}"),
        Some(SCIM_TOKEN),
        &json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "value": {"active": false}}]})
        .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = send(
        admin,
        "DELETE",
        &format!("/scim/v2/Users/{uid}"),
        Some(SCIM_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let disabled = wait_for("account-disabled and account-purged", || {
        let s = rx.seen("/events");
        let d = s
            .iter()
            .find(|g| event_type(&g.body) == format!("{RISC}account-disabled"))?;
        s.iter()
            .any(|g| event_type(&g.body) == format!("{RISC}account-purged"))
            .then(|| d.clone())
    })
    .await;
    let p = jose_verify(admin, &disabled.body, RX_AUD).await.unwrap()["payload"].clone();
    assert_eq!(
        p["sub_id"],
        json!({"format": "email", "email": "bob@corp.test"})
    );

    // Verification: 204, then a verification SET echoing state.
    let (st, _) = send(
        admin,
        "POST",
        "/ssf/verify",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "state": "s-42"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let ver = wait_for("the verification SET", || {
        rx.seen("/events")
            .into_iter()
            .find(|g| event_type(&g.body) == format!("{SSF}verification"))
    })
    .await;
    let p = jose_verify(admin, &ver.body, RX_AUD).await.unwrap()["payload"].clone();
    assert_eq!(p["events"][format!("{SSF}verification")]["state"], "s-42");
    assert_eq!(p["sub_id"], json!({"format": "opaque", "id": sid}));

    let (st, m) = {
        let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        let r = c
            .get(format!("http://{admin}/metrics").parse().unwrap())
            .await
            .unwrap();
        (
            r.status(),
            String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes())
                .into_owned(),
        )
    };
    assert_eq!(st, StatusCode::OK);
    assert!(
        m.contains("portcullis_transmit_delivered_total{kind=\"stream\"}"),
        "{m}"
    );
    assert_eq!(m.matches("# EOF").count(), 1);
    server.shutdown().await;
}

/// Events learned from a transmitter are not echoed back to it: the stream
/// of the receiver whose `issuer` is that transmitter gets nothing, another
/// receiver's stream gets the session-revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_a_transmitter_are_not_echoed_back_to_it() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let rx = Receiver::start(&pki).await;
    pki.issuer_key("user-1");
    let cfg = pki.write_config("tx.toml", &config(&pki, &upstream, &rx, ""));
    let server = portcullis::server::start(cfg).await.unwrap();
    let admin = server.admin_addr;
    create_stream(admin, RX_TOKEN, &rx, "/siem").await;
    create_stream(admin, ECHO_TOKEN, &rx, "/echo").await;

    let key = SigningKey {
        kid: "feed-tx".into(),
        alg: "ES256",
        private_pem: std::fs::read_to_string(pki.path().join("feed-tx.pem")).unwrap(),
        public_pem: String::new(),
        jwk: Value::Null,
    };
    let now = portcullis::util::now_unix();
    let set = key
        .sign_jws(
            &json!({"typ": "secevent+jwt", "alg": "ES256", "kid": "feed-tx"}),
            &json!({"iss": FEED_TX, "aud": "https://portcullis.test/rx", "iat": now,
                    "jti": "in-1", "sub_id": {"format": "opaque", "id": "carol"},
                    "events": {format!("{CAEP}session-revoked"): {"event_timestamp": now}}}),
        )
        .unwrap();
    let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let r = c
        .request(
            Request::post(format!("http://{admin}/ssf/push"))
                .header("authorization", format!("Bearer {PUSH_TOKEN}"))
                .header("content-type", "application/secevent+jwt")
                .body(Full::new(Bytes::from(set)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let got = wait_for("the session-revoked at the SIEM", || {
        rx.seen("/siem").into_iter().next()
    })
    .await;
    assert_eq!(event_type(&got.body), format!("{CAEP}session-revoked"));
    // A later event for the echo receiver proves its queue runs: whatever
    // it has by then excludes the echoed one.
    mdm_lost(admin, "evt-after-echo", "mac-e").await;
    wait_until("the later event at the echo receiver", || {
        rx.seen("/echo").len() >= 2
    })
    .await;
    for g in rx.seen("/echo") {
        let p = payload(&g.body);
        assert_ne!(p["sub_id"]["user"]["id"], "carol", "echoed: {p}");
        assert_eq!(p["aud"], ECHO_AUD);
    }
    server.shutdown().await;
}

/// SSF §8 status codes, one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_management_answers_with_the_ssf_status_codes() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let rx = Receiver::start(&pki).await;
    pki.issuer_key("user-1");
    let cfg = pki.write_config("tx.toml", &config(&pki, &upstream, &rx, ""));
    let server = portcullis::server::start(cfg).await.unwrap();
    let a = server.admin_addr;
    let push = |url: String| json!({"method": "urn:ietf:rfc:8935", "endpoint_url": url});

    // 401: no token, a wrong token.
    let (st, _) = send(a, "GET", "/ssf/streams", None, "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = send(a, "GET", "/ssf/streams", Some("nope-nope-nope-nope"), "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Empty list is an array.
    let (st, v) = send(a, "GET", "/ssf/streams", Some(RX_TOKEN), "").await;
    assert_eq!((st, v), (StatusCode::OK, json!([])));
    // 403: a read-only receiver may not create.
    let body = json!({"delivery": push(rx.url("/x"))}).to_string();
    let (st, _) = send(a, "POST", "/ssf/streams", Some(RO_TOKEN), &body).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // 400: malformed JSON, poll (unsupported), no delivery, plain http off loopback.
    for bad in [
        "{not json".to_owned(),
        json!({"delivery": {"method": "urn:ietf:rfc:8936"}}).to_string(),
        json!({"events_requested": []}).to_string(),
        json!({"delivery": push("http://rx.example/ssf".into())}).to_string(),
        json!({"delivery": push(rx.url("/x")), "events_requested": "all"}).to_string(),
    ] {
        let (st, v) = send(a, "POST", "/ssf/streams", Some(RX_TOKEN), &bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    // 201 with the full config.
    let req = json!({"delivery": push(rx.url("/x")),
                     "events_requested": [format!("{CAEP}session-revoked"), "urn:unknown"]});
    let (st, s) = send(a, "POST", "/ssf/streams", Some(RX_TOKEN), &req.to_string()).await;
    assert_eq!(st, StatusCode::CREATED, "{s}");
    let sid = s["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(s["iss"], TX_ISS);
    assert_eq!(s["aud"], RX_AUD);
    assert_eq!(
        s["events_delivered"],
        json!([format!("{CAEP}session-revoked")])
    );
    assert!(s["events_supported"].as_array().unwrap().len() >= 6);
    assert_eq!(s["delivery"]["method"], "urn:ietf:rfc:8935");
    // 404: unknown id; another receiver's stream is not revealed.
    let (st, _) = send(a, "GET", "/ssf/streams?stream_id=nope", Some(RX_TOKEN), "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(
        a,
        "GET",
        &format!("/ssf/streams?stream_id={sid}"),
        Some(RO_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = send(
        a,
        "GET",
        &format!("/ssf/streams?stream_id={sid}"),
        Some(RX_TOKEN),
        "",
    )
    .await;
    assert_eq!((st, v["stream_id"].clone()), (StatusCode::OK, json!(sid)));
    let (st, v) = send(a, "GET", "/ssf/streams", Some(RX_TOKEN), "").await;
    assert_eq!((st, v.as_array().unwrap().len()), (StatusCode::OK, 1));
    // PATCH: stream_id required; transmitter fields must match; a change is 200.
    let (st, _) = send(
        a,
        "PATCH",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"description": "x"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "PATCH",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "iss": "https://evil.test"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "PATCH",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"stream_id": "nope", "description": "x"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = send(a, "PATCH", "/ssf/streams", Some(RX_TOKEN),
        &json!({"stream_id": sid, "description": "renamed", "events_requested": [format!("{CAEP}session-revoked"), format!("{SSF}stream-updated")]}).to_string()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["description"], "renamed");
    assert_eq!(v["delivery"]["endpoint_url"], rx.url("/x"));
    // PUT replaces: missing delivery is a 400 (poll is not offered), then a full one is 200.
    let (st, _) = send(
        a,
        "PUT",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"stream_id": sid}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, v) = send(
        a,
        "PUT",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "delivery": push(rx.url("/y")),
                "events_requested": [format!("{SSF}stream-updated")]})
        .to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("description").is_none(), "{v}");
    assert_eq!(
        v["events_delivered"],
        json!([format!("{SSF}stream-updated")])
    );
    // Status: get, bad value, pause (a stream-updated SET goes out first).
    let (st, v) = send(
        a,
        "GET",
        &format!("/ssf/status?stream_id={sid}"),
        Some(RX_TOKEN),
        "",
    )
    .await;
    assert_eq!(
        (st, v["status"].clone()),
        (StatusCode::OK, json!("enabled"))
    );
    let (st, _) = send(a, "GET", "/ssf/status", Some(RX_TOKEN), "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/status",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "status": "sleepy"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/status",
        Some(RO_TOKEN),
        &json!({"stream_id": sid, "status": "paused"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = send(
        a,
        "POST",
        "/ssf/status",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "status": "paused", "reason": "maintenance"}).to_string(),
    )
    .await;
    assert_eq!((st, v["status"].clone()), (StatusCode::OK, json!("paused")));
    let upd = wait_for("stream-updated", || rx.seen("/y").into_iter().next()).await;
    let p = payload(&upd.body);
    assert_eq!(
        p["events"][format!("{SSF}stream-updated")],
        json!({"status": "paused", "reason": "maintenance"})
    );
    assert_eq!(p["sub_id"], json!({"format": "opaque", "id": sid}));
    // Subjects: 200 add, 204 remove, 400 malformed, 404 unknown stream.
    let subj = json!({"format": "email", "email": "a@corp.test"});
    let (st, _) = send(
        a,
        "POST",
        "/ssf/subjects:add",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "subject": subj}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/subjects:remove",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "subject": subj}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/subjects:add",
        Some(RX_TOKEN),
        &json!({"stream_id": sid, "subject": "a@corp.test"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/subjects:add",
        Some(RX_TOKEN),
        &json!({"stream_id": "nope", "subject": subj}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Verification: 404, 400, 204, then 429 within min_verification_interval.
    let (st, _) = send(
        a,
        "POST",
        "/ssf/verify",
        Some(RX_TOKEN),
        &json!({"stream_id": "nope"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/verify",
        Some(RX_TOKEN),
        &json!({"state": "x"}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/verify",
        Some(RX_TOKEN),
        &json!({"stream_id": sid}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/verify",
        Some(RX_TOKEN),
        &json!({"stream_id": sid}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    // 409 beyond max_streams (2).
    let (st, _) = send(
        a,
        "POST",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"delivery": push(rx.url("/z"))}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = send(
        a,
        "POST",
        "/ssf/streams",
        Some(RX_TOKEN),
        &json!({"delivery": push(rx.url("/z"))}).to_string(),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    // 405, 404 path; DELETE: 400 without id, 204, then 404.
    let (st, _) = send(a, "PUT", "/ssf/verify", Some(RX_TOKEN), "{}").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    let (st, _) = send(a, "GET", "/ssf/nothing", Some(RX_TOKEN), "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(a, "DELETE", "/ssf/streams", Some(RX_TOKEN), "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        a,
        "DELETE",
        &format!("/ssf/streams?stream_id={sid}"),
        Some(RO_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = send(
        a,
        "DELETE",
        &format!("/ssf/streams?stream_id={sid}"),
        Some(RX_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = send(
        a,
        "DELETE",
        &format!("/ssf/streams?stream_id={sid}"),
        Some(RX_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(
        a,
        "GET",
        &format!("/ssf/status?stream_id={sid}"),
        Some(RX_TOKEN),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

/// The webhook: same events, HMAC-SHA256 over `timestamp + "." + body`
/// with the configured secret, checked here independently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_is_signed_with_hmac_over_timestamp_and_body() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let rx = Receiver::start(&pki).await;
    pki.issuer_key("user-1");
    let hook = format!(
        "[[transmitter.webhooks]]\nname = \"jamf-bridge\"\nurl = \"RXURL\"\nsecret = \"{HOOK_SECRET}\"\n"
    );
    let cfg = pki.write_config("tx.toml", &config(&pki, &upstream, &rx, &hook));
    let server = portcullis::server::start(cfg).await.unwrap();
    mdm_lost(server.admin_addr, "evt-hook-1", "ipad-9").await;
    let got = wait_for("two webhook calls", || {
        let s = rx.seen("/hook");
        (s.len() >= 2).then_some(s)
    })
    .await;
    for g in &got {
        let ts: u64 = g.headers["x-portcullis-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ts.abs_diff(portcullis::util::now_unix()) < 300);
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, HOOK_SECRET.as_bytes());
        let mac = aws_lc_rs::hmac::sign(&key, format!("{ts}.{}", g.body).as_bytes());
        assert_eq!(
            g.headers["x-portcullis-signature"].to_str().unwrap(),
            format!("v1={}", hex::encode(mac.as_ref()))
        );
        let v: Value = serde_json::from_str(&g.body).unwrap();
        assert_eq!(
            g.headers["x-portcullis-event-id"].to_str().unwrap(),
            v["id"]
        );
        assert_eq!(v["iss"], TX_ISS);
        assert_eq!(v["source"]["feed"], "mdm");
    }
    let types: Vec<Value> = got
        .iter()
        .map(|g| serde_json::from_str::<Value>(&g.body).unwrap()["type"].clone())
        .collect();
    assert!(
        types.contains(&json!(format!("{CAEP}device-compliance-change"))),
        "{types:?}"
    );
    assert!(
        types.contains(&json!(format!("{CAEP}session-revoked"))),
        "{types:?}"
    );
    server.shutdown().await;
}

/// A receiver answering 503 gets the SET again (backoff), the SET waits in
/// the outbox through a SIGKILL of the proxy, and after the restart the
/// receiver, now up, gets it with the same `jti`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decided_set_survives_sigkill_and_is_delivered_with_the_same_jti() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let rx = Receiver::start(&pki).await;
    pki.issuer_key("user-1");
    let cfg = pki.write_config("tx.toml", &config(&pki, &upstream, &rx, ""));
    let p = ServeProcess::spawn(&cfg).await;
    create_stream(p.admin, RX_TOKEN, &rx, "/events").await;
    rx.status.store(503, Ordering::SeqCst);
    mdm_lost(p.admin, "evt-kill-1", "mac-k").await;
    let jtis = |ok: bool| -> std::collections::BTreeSet<String> {
        rx.seen("/events")
            .iter()
            .filter(|g| (g.answered == 202) == ok)
            .map(|g| payload(&g.body)["jti"].as_str().unwrap().to_owned())
            .collect()
    };
    // The head of the stream's queue is retried (in order: the second SET
    // waits behind it).
    wait_until("retries after 503", || rx.seen("/events").len() >= 3).await;
    let before = jtis(false);
    assert_eq!(before.len(), 1, "one SET at a time per stream");
    p.signal("KILL");
    drop(p);
    rx.status.store(202, Ordering::SeqCst);
    let p = ServeProcess::spawn(&cfg).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while jtis(true).len() != 2 {
        if std::time::Instant::now() > deadline {
            let mut p = p;
            let _ = p.child.kill();
            let mut err = String::new();
            use std::io::Read;
            p.child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!(
                "not delivered after the restart: {:?}\n{err}",
                rx.seen("/events")
                    .iter()
                    .map(|g| (g.answered, payload(&g.body)["jti"].clone()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = jtis(true);
    assert!(after.is_superset(&before), "{after:?} vs {before:?}");
    // At least once: nothing delivered twice with a new jti.
    assert_eq!(
        rx.seen("/events")
            .iter()
            .filter(|g| g.answered == 202)
            .count(),
        2
    );
    drop(p);
}

/// `check` refuses a webhook secret under 16 bytes and a webhook URL that
/// is not https (off loopback), naming the key.
#[test]
fn check_refuses_a_short_webhook_secret_and_a_plain_http_url() {
    let pki = TestPki::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (upstream, rx) =
        rt.block_on(async { (Upstream::start().await, Receiver::start(&pki).await) });
    pki.issuer_key("user-1");
    let run = |name: &str, extra: &str| {
        let cfg = pki.write_config(name, &config(&pki, &upstream, &rx, extra));
        let out = Command::new(binary())
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(
        "good.toml",
        &format!(
            "[[transmitter.webhooks]]\nname = \"h\"\nurl = \"RXURL\"\nsecret = \"{HOOK_SECRET}\"\n"
        ),
    );
    assert!(ok, "{err}");
    let (ok, err) = run(
        "short.toml",
        "[[transmitter.webhooks]]\nname = \"h\"\nurl = \"RXURL\"\nsecret = \"0123456789abcde\"\n",
    );
    assert!(!ok);
    assert!(err.contains("transmitter.webhooks[0].secret"), "{err}");
    let (ok, err) = run(
        "plain.toml",
        &format!(
            "[[transmitter.webhooks]]\nname = \"h\"\nurl = \"http://mdm.example/hook\"\nsecret = \"{HOOK_SECRET}\"\n"
        ),
    );
    assert!(!ok);
    assert!(err.contains("transmitter.webhooks[0].url"), "{err}");
    drop(rt);
}
