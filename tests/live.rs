//! Live connections follow the decision: a WebSocket and a streamed response
//! opened through the real proxy over TLS are cut within the control window
//! after a lost report (generic MDM event, operator `mark lost`) and after a
//! SCIM leaver — and both ends see it — while an unrelated subject's
//! connection stays open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::live::{EventStreams, RecordingWs, ws_connect};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ISS: &str = "https://idp.test";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const MDM_SECRET: &str = "mdm-secret-0123456789abcdef";
const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

struct Env {
    pki: TestPki,
    ws: RecordingWs,
    streams: EventStreams,
    server: portcullis::server::RunningServer,
    key: portcullis::demo::pki::SigningKey,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// What a test adds to the standard setup.
#[derive(Default)]
struct Opts {
    /// Run the shipped default policy set (`config/policies`).
    policy: bool,
    /// Token `exp` with no leeway.
    no_leeway: bool,
}

impl Env {
    async fn start() -> Self {
        Self::start_with(Opts::default()).await
    }

    async fn start_with(opts: Opts) -> Self {
        let pki = TestPki::new();
        let ws = RecordingWs::start().await;
        let streams = EventStreams::start().await;
        let (_, key, _) = keys();
        std::fs::write(
            pki.path().join("jwks.json"),
            json!({ "keys": [key.jwk] }).to_string(),
        )
        .unwrap();
        let routes = format!(
            r#"
[[routes]]
name = "ws"
path_prefix = "/ws"
upstream = "http://{ws}"
auth = "bearer"

[[routes]]
name = "events"
path_prefix = "/stream"
upstream = "http://{streams}"
auth = "bearer"
"#,
            ws = ws.addr,
            streams = streams.addr
        );
        let body = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes).replace(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\"\n"),
        ) + &format!(
            r#"
[feeds.scim]
token = "{SCIM_TOKEN}"
subject_attribute = "userName"

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"
"#
        );
        assert!(body.contains(ADMIN_TOKEN), "base_config's [admin] changed");
        let mut body = body;
        if opts.policy {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
            body = body.replace(
                "[log]",
                &format!(
                    "[policy]\ndir = \"{}\"\n\n[[network.zones]]\nname = \"loopback\"\ncidrs = [\"127.0.0.0/8\", \"::1\"]\n\n[log]",
                    dir.display()
                ),
            );
        }
        if opts.no_leeway {
            assert!(
                body.contains("leeway_s = 5"),
                "base_config's leeway changed"
            );
            body = body.replace("leeway_s = 5", "leeway_s = 0");
        }
        let cfg = pki.write_config("live.toml", &body);
        let server = portcullis::server::start(cfg).await.unwrap();
        Self {
            pki,
            ws,
            streams,
            server,
            key,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn token(&self, sub: &str, device: &str) -> String {
        let mut c = claims(ISS, sub);
        c["device_id"] = json!(device);
        self.key.sign(&c).unwrap()
    }

    async fn admin(&self, method: Method, path: &str, auth: &str, body: Value) -> StatusCode {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server.admin_addr))
            .header("authorization", format!("Bearer {auth}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, self.http.request(req))
            .await
            .unwrap()
            .unwrap();
        let st = resp.status();
        let _ = resp.into_body().collect().await;
        st
    }

    /// A lost report from the generic MDM feed (it also revokes the device).
    async fn mdm_lost(&self, device: &str) {
        self.mdm(device, json!({ "lifecycle": "lost" })).await;
    }

    /// A generic MDM event for `device` with these fields.
    async fn mdm(&self, device: &str, fields: Value) {
        let now = portcullis::util::now_unix_ms();
        let mut ev = json!({ "event_id": format!("{device}-{}", portcullis::util::RequestIds::default().next_id()),
            "device_id": device, "occurred_at": now, "last_check_in": now });
        for (k, v) in fields.as_object().unwrap() {
            ev[k] = v.clone();
        }
        let st = self
            .admin(Method::POST, "/mdm/v1/acme/events", MDM_SECRET, ev)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
    }

    /// The operator marks a device lost.
    async fn operator_lost(&self, device: &str) {
        let st = self
            .admin(
                Method::POST,
                &format!("/admin/v1/devices/{device}/lost"),
                ADMIN_TOKEN,
                json!({}),
            )
            .await;
        assert!(st.is_success(), "mark lost: {st}");
    }

    /// A SCIM joiner for `user`; returns the resource id.
    async fn scim_joiner(&self, user: &str) -> String {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/scim/v2/Users", self.server.admin_addr))
            .header("authorization", format!("Bearer {SCIM_TOKEN}"))
            .header("content-type", "application/scim+json")
            .body(Full::new(Bytes::from(
                json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": user, "active": true })
                .to_string(),
            )))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// A SCIM leaver: `PATCH active=false`.
    async fn scim_leaver(&self, id: &str) {
        let req = Request::builder()
            .method(Method::PATCH)
            .uri(format!(
                "http://{}/scim/v2/Users/{id}",
                self.server.admin_addr
            ))
            .header("authorization", format!("Bearer {SCIM_TOKEN}"))
            .header("content-type", "application/scim+json")
            .body(Full::new(Bytes::from(
                json!({ "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                    "Operations": [{ "op": "replace", "value": { "active": false } }] })
                .to_string(),
            )))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    async fn metrics(&self) -> String {
        let req = Request::get(format!("http://{}/metrics", self.server.admin_addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    /// Waits until the cut counter for `reason` reaches `n`.
    async fn wait_cut_metric(&self, reason: &str, n: u64) {
        self.wait_metric(&format!(
            "portcullis_live_connections_cut_total{{reason=\"{reason}\"}} {n}"
        ))
        .await;
    }

    /// Waits until `/metrics` has this exact line.
    async fn wait_metric(&self, line: &str) {
        let start = Instant::now();
        loop {
            let m = self.metrics().await;
            if m.lines().any(|l| l == line) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no `{line}` in:\n{}",
                m.lines()
                    .filter(|l| l.contains("live_"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn proxy_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.server.proxy_addr.port())
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let back = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("no echo in time")
        .unwrap()
        .unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), text);
}

/// Reads until the close frame; returns its code and when it arrived.
async fn close_code(ws: &mut Ws) -> (Option<CloseCode>, Instant) {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("the connection was not cut in time")
        {
            Some(Ok(Message::Close(f))) => return (f.map(|f| f.code), Instant::now()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn ws_cut(trigger: &str) {
    let env = Env::start().await;
    let alice = env.token(ALICE, "laptop-1");
    let bob = env.token(BOB, "laptop-2");
    let scim_id = env.scim_joiner(ALICE).await;
    let mut a = ws_connect(env.server.proxy_addr, &env.pki.ca_pem, "/ws/alice", &alice).await;
    let mut b = ws_connect(env.server.proxy_addr, &env.pki.ca_pem, "/ws/bob", &bob).await;
    echo(&mut a, "alice before").await;
    echo(&mut b, "bob before").await;

    let sent = Instant::now();
    match trigger {
        "mdm" => env.mdm_lost("laptop-1").await,
        "scim" => env.scim_leaver(&scim_id).await,
        _ => unreachable!(),
    }
    let (code, at) = close_code(&mut a).await;
    eprintln!(
        "websocket cut after {trigger}: {:?} from sending the event to the client's close frame",
        at - sent
    );
    assert_eq!(code, Some(CloseCode::Policy), "the client gets close 1008");
    wait_until("the upstream to receive close 1008", || {
        env.ws.close_for("/ws/alice") == Some(Some(1008))
    })
    .await;
    // The client end is closed after the close handshake.
    let rest = tokio::time::timeout(DEADLINE, a.next()).await.unwrap();
    assert!(
        !matches!(rest, Some(Ok(Message::Text(_)))),
        "nothing flows after the cut"
    );

    // Bob's connection is untouched.
    echo(&mut b, "bob after").await;
    assert_eq!(env.ws.close_for("/ws/bob"), None);
    let reason = if trigger == "mdm" {
        "revoked"
    } else {
        "subject_disabled"
    };
    env.wait_cut_metric(reason, 1).await;
    // Alice's tunnel leaves the registry once closed; Bob's remains.
    env.wait_metric("portcullis_live_connections{kind=\"upgrade\"} 1")
        .await;
}

#[tokio::test]
async fn websocket_is_cut_with_1008_on_both_sides_after_an_mdm_lost_report() {
    ws_cut("mdm").await;
}

#[tokio::test]
async fn websocket_is_cut_with_1008_on_both_sides_after_a_scim_leaver() {
    ws_cut("scim").await;
}

/// Opens `/stream/<name>` and returns the body after its first event.
async fn open_stream(
    c: &Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        TestBody,
    >,
    url: &str,
    token: &str,
) -> hyper::body::Incoming {
    let req = Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = next_data(&mut body).await.expect("first event");
    assert!(first.starts_with(b"data: hello"), "{first:?}");
    body
}

/// The next data frame, or the error that ended the body.
async fn next_data(body: &mut hyper::body::Incoming) -> Result<Bytes, String> {
    loop {
        match tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("no frame in time")
        {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    return Ok(d);
                }
            }
            Some(Err(e)) => return Err(format!("{e:?}")),
            None => return Err("end of body".into()),
        }
    }
}

async fn stream_cut(trigger: &str, h2: bool) {
    let env = Env::start().await;
    let scim_id = env.scim_joiner(ALICE).await;
    // One client: on h2, both streams share one connection.
    let c = client(&env.pki.ca_pem, h2);
    let mut a = open_stream(
        &c,
        &env.proxy_url("/stream/alice"),
        &env.token(ALICE, "laptop-1"),
    )
    .await;
    let mut b = open_stream(
        &c,
        &env.proxy_url("/stream/bob"),
        &env.token(BOB, "laptop-2"),
    )
    .await;
    env.streams.tick();
    assert!(
        next_data(&mut a)
            .await
            .unwrap()
            .starts_with(b"data: tick 1")
    );
    assert!(
        next_data(&mut b)
            .await
            .unwrap()
            .starts_with(b"data: tick 1")
    );

    let sent = Instant::now();
    match trigger {
        "operator" => env.operator_lost("laptop-1").await,
        "scim" => env.scim_leaver(&scim_id).await,
        _ => unreachable!(),
    }
    let ended = next_data(&mut a).await;
    eprintln!(
        "{} stream cut after {trigger}: {:?} from sending the event to the client's error",
        if h2 { "h2" } else { "h1" },
        sent.elapsed()
    );
    let err = ended.expect_err("the streamed body ends with an error, not more data");
    assert_ne!(err, "end of body", "a cut is not a clean end");
    wait_until("the upstream to see its connection dropped", || {
        env.streams.was_dropped("alice")
    })
    .await;

    // Bob's stream goes on (on h2: on the same connection, so only
    // Alice's stream was reset).
    env.streams.tick();
    assert!(
        next_data(&mut b)
            .await
            .unwrap()
            .starts_with(b"data: tick 2")
    );
    assert!(!env.streams.was_dropped("bob"));
    let reason = if trigger == "operator" {
        "revoked"
    } else {
        "subject_disabled"
    };
    env.wait_cut_metric(reason, 1).await;
}

#[tokio::test]
async fn h1_stream_is_cut_after_an_operator_lost_report() {
    stream_cut("operator", false).await;
}

#[tokio::test]
async fn h1_stream_is_cut_after_a_scim_leaver() {
    stream_cut("scim", false).await;
}

#[tokio::test]
async fn h2_stream_is_reset_after_an_operator_lost_report_and_its_neighbour_goes_on() {
    stream_cut("operator", true).await;
}

#[tokio::test]
async fn h2_stream_is_reset_after_a_scim_leaver() {
    stream_cut("scim", true).await;
}

#[tokio::test]
async fn restrict_cuts_a_websocket_but_lets_a_read_stream_go_on() {
    let env = Env::start_with(Opts {
        policy: true,
        ..Opts::default()
    })
    .await;
    env.mdm(
        "mac-1",
        json!({"lifecycle": "enrolled", "compliance": "compliant", "ownership": "corporate",
            "patch_behind": false, "compromised": false}),
    )
    .await;
    let t = env.token(ALICE, "mac-1");
    let mut ws = ws_connect(env.server.proxy_addr, &env.pki.ca_pem, "/ws/alice", &t).await;
    echo(&mut ws, "before").await;
    let c = client(&env.pki.ca_pem, false);
    let mut stream = open_stream(&c, &env.proxy_url("/stream/alice"), &t).await;

    // Non-compliant on a medium route: the default set says restrict.
    let sent = Instant::now();
    env.mdm("mac-1", json!({"compliance": "non_compliant"}))
        .await;
    let (code, at) = close_code(&mut ws).await;
    eprintln!("websocket cut after restrict: {:?}", at - sent);
    assert_eq!(code, Some(CloseCode::Policy));
    wait_until("the upstream to receive close 1008", || {
        env.ws.close_for("/ws/alice") == Some(Some(1008))
    })
    .await;
    env.wait_cut_metric("restrict_upgrade", 1).await;

    // The GET stream is a read: restrict lets it go on.
    env.streams.tick();
    assert!(
        next_data(&mut stream)
            .await
            .unwrap()
            .starts_with(b"data: tick 1")
    );
    assert!(!env.streams.was_dropped("alice"));
}

#[tokio::test]
async fn a_token_that_expires_ends_its_websocket() {
    let env = Env::start_with(Opts {
        no_leeway: true,
        ..Opts::default()
    })
    .await;
    let mut c = claims(ISS, ALICE);
    let exp = portcullis::util::now_unix() + 3;
    c["exp"] = json!(exp);
    let t = env.key.sign(&c).unwrap();
    let mut ws = ws_connect(env.server.proxy_addr, &env.pki.ca_pem, "/ws/alice", &t).await;
    echo(&mut ws, "before").await;
    let (code, _) = close_code(&mut ws).await;
    let now = portcullis::util::now_unix();
    eprintln!("websocket cut at exp + {} s", now.saturating_sub(exp));
    assert!(now > exp, "cut before the token expired");
    assert_eq!(code, Some(CloseCode::Policy));
    env.wait_cut_metric("expired", 1).await;
}
