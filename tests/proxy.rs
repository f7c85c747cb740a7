//! The proxy end to end: real TLS, real tokens, a real upstream on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http::StatusCode;

struct Setup {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    token: String,
}

async fn setup(extra_routes: &str) -> Setup {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let (rsa, ec, ed) = keys();
    let issuer = "https://idp.test".to_owned();
    let jwks = serde_json::json!({ "keys": [rsa.jwk, ec.jwk, ed.jwk] }).to_string();
    std::fs::write(pki.path().join("jwks.json"), jwks).unwrap();
    let extra_routes = extra_routes.replace("UPSTREAM", &upstream.url());
    let routes = format!(
        r#"
[[routes]]
name = "app"
path_prefix = "/"
upstream = "{up}"
auth = "bearer"

[[routes]]
name = "api-v2"
path_prefix = "/api/v2"
upstream = "{up}/base"
auth = "bearer"
sensitivity = "high"

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "{up}"
auth = "public"

[[routes]]
name = "other-host"
host = "other.test"
path_prefix = "/"
upstream = "{up}/other"
auth = "public"
{extra_routes}
"#,
        up = upstream.url()
    );
    let cfg = pki.write_config(
        "p.toml",
        &base_config(&issuer, r#"jwks_file = "jwks.json""#, &routes),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    let token = ec.sign(&claims(&issuer, "alice@example.com")).unwrap();
    Setup {
        pki,
        upstream,
        server,
        token,
    }
}

fn url(s: &Setup, path: &str) -> String {
    format!("https://localhost:{}{}", s.server.proxy_addr.port(), path)
}

#[tokio::test]
async fn valid_token_reaches_upstream_with_forwarded_headers_and_spoofed_identity_stripped() {
    let s = setup("").await;
    let c = client(&s.pki.ca_pem, false);
    let spoofed = [
        ("x-portcullis-subject", "mallory"),
        ("x-forwarded-user", "mallory"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-remote-user", "mallory"),
        ("x-portcullis-device", "stolen"),
    ];
    let (status, headers, _) = get(&c, &url(&s, "/hello?x=1"), Some(&s.token), &spoofed).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-request-id").is_some());
    // A hop-by-hop header the upstream named in Connection is dropped on the way back.
    assert!(headers.get("x-upstream-hop").is_none());
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/hello");
    let h = &seen.headers;
    assert_eq!(h["x-portcullis-subject"], "alice@example.com");
    assert_eq!(h["x-portcullis-device"], "laptop-1");
    assert_eq!(h["x-portcullis-issuer"], "test");
    assert_eq!(h["x-portcullis-route"], "app");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert!(
        h["x-forwarded-host"]
            .to_str()
            .unwrap()
            .starts_with("localhost")
    );
    assert!(h.get("x-forwarded-user").is_none());
    assert!(h.get("x-remote-user").is_none());
    assert_eq!(h.get_all("x-portcullis-subject").iter().count(), 1);
}

#[tokio::test]
async fn http1_and_http2_both_work() {
    let s = setup("").await;
    for h2 in [false, true] {
        let c = client(&s.pki.ca_pem, h2);
        let resp = c
            .request(
                http::Request::get(url(&s, "/v"))
                    .header("authorization", format!("Bearer {}", s.token))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "h2={h2}");
        let want = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(resp.version(), want);
    }
    assert_eq!(s.upstream.count(), 2);
}

#[tokio::test]
async fn routes_match_host_and_longest_prefix() {
    let s = setup("").await;
    let c = client(&s.pki.ca_pem, false);
    let (st, _, _) = get(&c, &url(&s, "/api/v2/items"), Some(&s.token), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/base/api/v2/items");
    assert_eq!(seen.headers["x-portcullis-route"], "api-v2");

    // `/api/v2x` is not under `/api/v2`: it falls to the `/` route.
    let (st, _, _) = get(&c, &url(&s, "/api/v2x"), Some(&s.token), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.upstream.last().headers["x-portcullis-route"], "app");

    // Public route: no token needed, identity headers still stripped.
    let (st, _, _) = get(
        &c,
        &url(&s, "/public/x"),
        None,
        &[("x-portcullis-subject", "mallory")],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-portcullis-route"], "public");
    assert!(seen.headers.get("x-portcullis-subject").is_none());

    // Host-specific route wins over `*` (HTTP/1.1 Host header).
    let (st, _, _) = get(&c, &url(&s, "/x"), None, &[("host", "other.test")]).await;
    assert_eq!(st, StatusCode::OK);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-portcullis-route"], "other-host");
    assert_eq!(seen.path, "/other/x");
    assert_eq!(seen.headers["x-forwarded-host"], "other.test");
}

#[tokio::test]
async fn missing_token_gets_401_with_bearer_challenge_and_never_reaches_upstream() {
    let s = setup("").await;
    let c = client(&s.pki.ca_pem, false);
    let (st, h, body) = get(&c, &url(&s, "/x"), None, &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(h["www-authenticate"], "Bearer realm=\"portcullis\"");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "missing_token");
    assert!(v["request_id"].is_string());
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let ws = ws_echo_server().await;
    let s = setup(&format!(
        r#"
[[routes]]
name = "ws"
path_prefix = "/ws"
upstream = "http://{ws}"
auth = "bearer"
"#
    ))
    .await;
    // TLS to the proxy with ALPN http/1.1 (WebSocket upgrades are HTTP/1.1).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            portcullis::tls::load_certs(&s.pki.path().join("ca.pem"))
                .unwrap()
                .remove(0),
        )
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.server.proxy_addr)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!("wss://localhost:{}/ws", s.server.proxy_addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.token).parse().unwrap(),
    );
    let (mut ws, resp) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        let msg = format!("hello {i}");
        ws.send(Message::text(msg.clone())).await.unwrap();
        let back = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let back = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.into_data().as_ref(), &[1u8, 2, 3]);
    let _ = ws.close(None).await;
}

#[tokio::test]
async fn websocket_without_token_is_refused() {
    let ws = ws_echo_server().await;
    let s = setup(&format!(
        "[[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"bearer\"\n"
    ))
    .await;
    let c = client(&s.pki.ca_pem, false);
    let (st, _, _) = get(
        &c,
        &url(&s, "/ws"),
        None,
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn upstream_down_gives_502_and_slow_gives_504() {
    // A port that refuses: bind, learn the port, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let (_, ec, _) = keys();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({ "keys": [ec.jwk] }).to_string(),
    )
    .unwrap();
    let routes = format!(
        r#"
[[routes]]
name = "down"
path_prefix = "/down"
upstream = "http://{dead}"
auth = "bearer"

[[routes]]
name = "slowroute"
path_prefix = "/slow"
upstream = "{up}"
auth = "bearer"
timeout_ms = 300
"#,
        up = upstream.url()
    );
    let iss = "https://idp.test";
    let cfg = pki.write_config(
        "p.toml",
        &base_config(iss, r#"jwks_file = "jwks.json""#, &routes),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    let token = ec.sign(&claims(iss, "alice")).unwrap();
    let c = client(&pki.ca_pem, false);
    let base = format!("https://localhost:{}", server.proxy_addr.port());

    let (st, h, body) = get(&c, &format!("{base}/down"), Some(&token), &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "upstream_unavailable");
    assert_eq!(v["request_id"].as_str(), h["x-request-id"].to_str().ok());

    let (st, _, body) = get(&c, &format!("{base}/slow"), Some(&token), &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "upstream_timeout");
    assert!(v["request_id"].is_string());
    assert_eq!(upstream.last().path, "/slow");
}

#[tokio::test]
async fn body_over_route_limit_gets_413() {
    let s2 = setup(
        "[[routes]]\nname = \"small\"\npath_prefix = \"/small\"\nupstream = \"UPSTREAM\"\nauth = \"bearer\"\nmax_body_bytes = 1024\n",
    )
    .await;
    let c = client(&s2.pki.ca_pem, false);
    let send = |len: usize, chunked: bool| {
        let body = if chunked {
            // Streamed body without content-length.
            let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, BoxError>> = (0..len / 512)
                .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'x'; 512]))))
                .collect();
            http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
                futures_util::stream::iter(chunks),
            ))
        } else {
            full(vec![b'x'; len])
        };
        http::Request::post(url(&s2, "/small/upload"))
            .header("authorization", format!("Bearer {}", s2.token))
            .body(body)
            .unwrap()
    };
    let r = c.request(send(512, false)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c.request(send(4096, false)).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let before = s2.upstream.count();
    let r = c.request(send(1 << 20, true)).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The upstream may have seen the start of the streamed request, but never all of it.
    let seen = s2.upstream.seen.lock().unwrap().clone();
    assert!(seen[before..].iter().all(|x| x.body_len <= 1024));
}

#[tokio::test]
async fn metrics_and_health_on_the_admin_listener() {
    let s = setup("").await;
    let c = client(&s.pki.ca_pem, false);
    let _ = get(&c, &url(&s, "/a"), Some(&s.token), &[]).await;
    let _ = get(&c, &url(&s, "/a"), Some(&s.token), &[]).await;
    let _ = get(&c, &url(&s, "/a"), None, &[]).await;
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let admin = s.server.admin_addr;
    for (path, want) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let r = plain
            .get(format!("http://{admin}{path}").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    let r = plain
        .get(format!("http://{admin}/metrics").parse().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for needle in [
        "portcullis_requests_total{route=\"app\",status=\"200\"} 2",
        "portcullis_requests_total{route=\"app\",status=\"401\"} 1",
        "portcullis_decisions_total{action=\"allow\",reason=\"ok\"} 2",
        "portcullis_decisions_total{action=\"deny\",reason=\"missing_token\"} 1",
        "portcullis_token_cache_hits_total 1",
        "portcullis_token_cache_misses_total 1",
        "portcullis_upstream_response_seconds_count{route=\"app\"} 2",
        "portcullis_open_connections{listener=\"https\"}",
    ] {
        assert!(text.contains(needle), "metrics lack `{needle}`:\n{text}");
    }
}
