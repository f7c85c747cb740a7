//! Strict HTTP at the edge: exact bytes over real TLS, and what the upstream
//! app receives (or that it received nothing) for each malformed request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    token: String,
}

async fn setup(extra: &str) -> Setup {
    setup_with("", extra).await
}

/// `proxy_extra` goes into the `[proxy]` table, `extra` after the routes
/// (`@UP@` in it: the capturing upstream's URL).
async fn setup_with(proxy_extra: &str, extra: &str) -> Setup {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let (rsa, ec, ed) = keys();
    let issuer = "https://idp.test".to_owned();
    let jwks = serde_json::json!({ "keys": [rsa.jwk, ec.jwk, ed.jwk] }).to_string();
    std::fs::write(pki.path().join("jwks.json"), jwks).unwrap();
    let routes = format!(
        r#"
[[routes]]
name = "app"
path_prefix = "/"
upstream = "{up}"
auth = "bearer"

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "{up}"
auth = "public"

[[routes]]
name = "legacy"
path_prefix = "/legacy"
upstream = "{up}"
auth = "public"
allow_underscore_headers = true
{extra}
"#,
        up = upstream.url(),
        extra = extra.replace("@UP@", &upstream.url()),
    );
    let cfg = pki.write_config(
        "p.toml",
        &base_config(&issuer, r#"jwks_file = "jwks.json""#, &routes).replacen(
            "[proxy]\n",
            &format!("[proxy]\n{proxy_extra}\n"),
            1,
        ),
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

/// A TLS connection to the proxy offering exactly `alpn`.
async fn tls(s: &Setup, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_stream(s.server.proxy_addr, &s.pki.ca_pem, alpn).await
}

/// Reads until the server closes (or the TLS stream ends uncleanly).
async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("server kept the connection open: {out:?}"),
        }
    }
}

/// Sends exact HTTP/1.1 bytes (ALPN http/1.1); returns the status and the
/// whole response text. Requests carry `Connection: close` or are refused
/// with it, so the server ends the exchange.
async fn raw(s: &Setup, bytes: &str) -> (u16, String) {
    raw_alpn(s, &[b"http/1.1"], bytes).await
}

async fn raw_alpn(s: &Setup, alpn: &[&[u8]], bytes: &str) -> (u16, String) {
    let mut t = tls(s, alpn).await;
    t.write_all(bytes.as_bytes()).await.unwrap();
    t.flush().await.unwrap();
    let text = String::from_utf8_lossy(&read_all(&mut t).await).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn host(s: &Setup) -> String {
    format!("localhost:{}", s.server.proxy_addr.port())
}

fn underscored(h: &http::HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.contains('_'))
        .collect()
}

#[tokio::test]
async fn underscored_header_names_are_dropped_by_default() {
    let s = setup("").await;
    let req = format!(
        "GET /public/x HTTP/1.1\r\nHost: {}\r\nx_portcullis_subject: mallory@example.com\r\n\
         x_portcullis_decision: allow\r\nX_Forwarded_User: mallory\r\nx_app_tenant: t1\r\n\
         x-app-ok: 1\r\nConnection: close\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/public/x");
    assert_eq!(underscored(&seen.headers), Vec::<String>::new());
    assert_eq!(seen.headers["x-app-ok"], "1");
    assert!(seen.headers.get("x-portcullis-subject").is_none());

    // On a bearer route the proxy's own identity header is the only one.
    let c = client(&s.pki.ca_pem, false);
    let url = format!("https://{}/me", host(&s));
    let spoof = [
        ("x_portcullis_subject", "mallory@example.com"),
        ("X_Forwarded_User", "mallory"),
    ];
    let (status, _, _) = get(&c, &url, Some(&s.token), &spoof).await;
    assert_eq!(status, StatusCode::OK);
    let seen = s.upstream.last();
    assert_eq!(underscored(&seen.headers), Vec::<String>::new());
    assert_eq!(seen.headers["x-portcullis-subject"], "alice@example.com");
}

#[tokio::test]
async fn allowed_routes_keep_underscores_but_never_identity_look_alikes() {
    let s = setup("").await;
    let req = format!(
        "GET /legacy/x HTTP/1.1\r\nHost: {}\r\nx_portcullis_subject: mallory@example.com\r\n\
         X_Portcullis_Decision: allow\r\nX_Forwarded_User: mallory\r\nx_forwarded_for: 6.6.6.6\r\n\
         x_request_id: forged\r\nx_app_tenant: t1\r\nConnection: close\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/legacy/x");
    assert_eq!(underscored(&seen.headers), ["x_app_tenant"]);
    assert_eq!(seen.headers["x_app_tenant"], "t1");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn a_replaced_strip_list_still_strips_every_header_the_proxy_sets() {
    // An operator's own list instead of the defaults: the defaults' other
    // names (here `X-Forwarded-User`) are theirs to pass, but never a
    // header the proxy sets itself, even on a route where it sets none.
    let s = setup_with(
        "strip_headers_replace_defaults = true\nstrip_headers = [\"x-app-secret\"]",
        "",
    )
    .await;
    let forged = "x-portcullis-subject: mallory@example.com\r\nX-Portcullis-Device: dev-mallory\r\n\
                  x-portcullis-verified-device: dev-mallory\r\nx-portcullis-decision: allow\r\n\
                  x-portcullis-snapshot: 1\r\nx-portcullis-workload: spiffe://x/y\r\n\
                  x-portcullis-binding: mtls\r\nx-portcullis-assertion: forged\r\n\
                  x-forwarded-user: someone\r\nx-app-secret: s\r\nx-app-kept: k\r\n";
    let req = format!(
        "GET /public/x HTTP/1.1\r\nHost: {}\r\n{forged}Connection: close\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/public/x");
    let portcullis: Vec<&str> = seen
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-portcullis-") && *k != "x-portcullis-route")
        .collect();
    assert!(portcullis.is_empty(), "{portcullis:?}");
    assert_eq!(seen.headers["x-portcullis-route"], "public");
    assert!(seen.headers.get("x-app-secret").is_none());
    assert_eq!(seen.headers["x-forwarded-user"], "someone");
    assert_eq!(seen.headers["x-app-kept"], "k");

    // With a token, the subject and device are the token's (`laptop-1`).
    let req = format!(
        "GET /me HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n{forged}Connection: close\r\n\r\n",
        host(&s),
        s.token
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-portcullis-subject"], "alice@example.com");
    assert_eq!(
        seen.headers.get_all("x-portcullis-subject").iter().count(),
        1
    );
    assert_eq!(seen.headers["x-portcullis-device"], "laptop-1");
    assert_eq!(
        seen.headers.get_all("x-portcullis-device").iter().count(),
        1
    );
    assert!(seen.headers.get("x-portcullis-verified-device").is_none());
    assert!(seen.headers.get("x-portcullis-assertion").is_none());

    // An underscored look-alike of a header the proxy sets goes even on a
    // route that keeps underscores.
    let req = format!(
        "GET /legacy/x HTTP/1.1\r\nHost: {}\r\nx_portcullis_assertion: forged\r\n\
         x_portcullis_device: dev-mallory\r\nx_app_tenant: t1\r\nConnection: close\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(underscored(&seen.headers), ["x_app_tenant"]);
}

/// A GET of `path` with `headers` (and the setup's token as `Bearer` when
/// `token`): checks the 200 and returns the `Authorization` the app
/// received, after checking that the request reached it.
async fn app_authorization(
    s: &Setup,
    path: &str,
    token: bool,
    headers: &[(&str, &str)],
) -> Option<String> {
    let c = client(&s.pki.ca_pem, false);
    let url = format!("https://{}{path}", host(s));
    let (status, _, body) = get(&c, &url, token.then_some(s.token.as_str()), headers).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body:?}");
    let seen = s.upstream.last();
    assert_eq!(seen.path, path);
    seen.headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn the_clients_token_reaches_only_routes_that_ask_for_it() {
    // By default an app gets who the caller is, never the caller's token:
    // a token for the proxy's audience in an app's hands (its logs, a
    // compromise) would open every other route behind the proxy.
    let relay = "[[routes]]\nname = \"relay\"\npath_prefix = \"/relay\"\n\
                 upstream = \"@UP@\"\nauth = \"bearer\"\nforward_authorization = true\n";
    let s = setup(relay).await;
    let bearer = format!("Bearer {}", s.token);
    assert_eq!(app_authorization(&s, "/me", true, &[]).await, None);
    assert_eq!(
        s.upstream.last().headers["x-portcullis-subject"],
        "alice@example.com"
    );
    // A public route does not pass a client's credentials on either.
    let basic = [("authorization", "Basic YWxpY2U6cHc=")];
    assert_eq!(
        app_authorization(&s, "/public/p", false, &basic).await,
        None
    );
    // A route that asks for it gets the very line the client sent.
    assert_eq!(
        app_authorization(&s, "/relay/x", true, &[]).await,
        Some(bearer)
    );
    assert_eq!(
        s.upstream.last().headers["x-portcullis-subject"],
        "alice@example.com"
    );
    assert_eq!(s.upstream.count(), 3);

    // Forwarding for the whole proxy; a route can still keep it.
    let closed = "[[routes]]\nname = \"closed\"\npath_prefix = \"/closed\"\n\
                  upstream = \"@UP@\"\nauth = \"bearer\"\nforward_authorization = false\n";
    let s = setup_with("forward_authorization = true", closed).await;
    let bearer = format!("Bearer {}", s.token);
    assert_eq!(app_authorization(&s, "/me", true, &[]).await, Some(bearer));
    assert_eq!(app_authorization(&s, "/closed/x", true, &[]).await, None);
}

#[tokio::test]
async fn connection_cannot_remove_the_proxys_own_headers() {
    // A `Connection` line names hop-by-hop headers for the proxy to drop:
    // the client's own, never the identity and forwarding headers the proxy
    // adds for the app (an app that reads a missing header as "no
    // restriction" would be open to that).
    let s = setup("").await;
    let req = format!(
        "GET /me HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Connection: close, x-portcullis-subject, X-Portcullis-Issuer, x-request-id, \
         x-forwarded-for, x-portcullis-route, x-app-hop\r\nx-app-hop: 1\r\nx-app-kept: 2\r\n\r\n",
        host(&s),
        s.token
    );
    let (status, text) = raw(&s, &req).await;
    assert_eq!(status, 200, "{text}");
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/me");
    assert_eq!(seen.headers["x-portcullis-subject"], "alice@example.com");
    assert!(seen.headers.contains_key("x-portcullis-issuer"));
    assert_eq!(seen.headers["x-portcullis-route"], "app");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    let id = seen.headers["x-request-id"].to_str().unwrap();
    assert!(
        text.to_ascii_lowercase()
            .contains(&format!("x-request-id: {id}")),
        "{text}"
    );
    // What the client named as its own hop-by-hop header does go.
    assert!(seen.headers.get("x-app-hop").is_none());
    assert_eq!(seen.headers["x-app-kept"], "2");
}

#[tokio::test]
async fn host_must_be_present_once() {
    let s = setup("").await;
    let (status, text) = raw(&s, "GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 400);
    assert!(text.contains("\"missing_host\""), "{text}");
    let req = format!(
        "GET /public/x HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\nConnection: close\r\n\r\n",
        h = host(&s)
    );
    let (status, text) = raw(&s, &req).await;
    assert_eq!(status, 400);
    assert!(text.contains("\"duplicate_host\""), "{text}");
    assert_eq!(s.upstream.count(), 0);

    // Absolute form: the target's authority wins over Host (RFC 9112 §3.2.2).
    let req = format!(
        "GET https://{h}/public/abs HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n",
        h = host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/public/abs");
    assert_eq!(seen.headers["x-forwarded-host"].to_str().unwrap(), host(&s));
    // The app gets one Host, its own address, never the client's.
    let up = s.upstream.addr.to_string();
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, [up.as_str()], "Host the upstream received");

    let req = format!(
        "GET /public/rel HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n",
        h = host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 200);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/public/rel");
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, [up.as_str()], "Host the upstream received");
    assert_eq!(seen.headers["x-forwarded-host"].to_str().unwrap(), host(&s));
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused() {
    let s = setup("").await;
    let req = format!(
        "POST /public/x HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
        host(&s)
    );
    let (status, text) = raw(&s, &req).await;
    assert_eq!(status, 501);
    assert!(text.contains("\"unsupported_transfer_coding\""), "{text}");
    let req = format!(
        "POST /public/x HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 501);
    // Not chunked last: hyper refuses before the proxy sees it.
    let req = format!(
        "POST /public/x HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw(&s, &req).await;
    assert_eq!(status, 400);
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    // hyper drops Content-Length, frames by Transfer-Encoding alone and
    // closes after answering (RFC 9112 §6.1): the bytes after the chunked
    // body are never read as a second request.
    let s = setup("").await;
    let req = format!(
        "POST /public/x HTTP/1.1\r\nHost: {h}\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\nGET /public/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n",
        h = host(&s)
    );
    let (status, text) = raw(&s, &req).await;
    assert_eq!(status, 200);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert_eq!(s.upstream.count(), 1);
    let seen = s.upstream.last();
    assert_eq!(seen.path, "/public/x");
    assert_eq!(seen.body_len, 5);
    assert!(seen.headers.get("content-length").is_none());
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let s = setup("").await;
    let req = format!(
        "POST /public/x HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\nzz\r\n",
        host(&s)
    );
    let (status, text) = raw(&s, &req).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"malformed_body\""), "{text}");
    // The upstream may have seen the head, never a complete body.
    assert!(
        s.upstream.seen.lock().unwrap().iter().all(|r| !r.body_ok),
        "upstream got a complete request"
    );
}

/// Reads h2 frames until EOF; returns (type, payload) of each.
fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        let end = (9 + len).min(b.len());
        out.push((b[3], b[9..end].to_vec()));
        b = &b[end..];
    }
    out
}

#[tokio::test]
async fn h2_by_alpn_answers_a_bad_preface_with_goaway() {
    let s = setup("").await;
    let mut t = tls(&s, &[b"h2"]).await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let req = format!("GET /public/x HTTP/1.1\r\nHost: {}\r\n\r\n", host(&s));
    t.write_all(req.as_bytes()).await.unwrap();
    t.flush().await.unwrap();
    let bytes = read_all(&mut t).await;
    assert!(!bytes.starts_with(b"HTTP/1.1"), "{bytes:?}");
    let goaway = frames(&bytes)
        .into_iter()
        .find(|(ty, _)| *ty == 0x7)
        .unwrap_or_else(|| panic!("no GOAWAY in {bytes:?}"));
    assert_eq!(&goaway.1[4..8], &[0, 0, 0, 1], "PROTOCOL_ERROR");
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn h2_and_h1_by_alpn_still_work_and_h2_checks_authority() {
    let s = setup("").await;
    for h2 in [false, true] {
        let c = client(&s.pki.ca_pem, h2);
        let url = format!("https://{}/public/v", host(&s));
        let (status, _, _) = get(&c, &url, None, &[]).await;
        assert_eq!(status, StatusCode::OK, "h2={h2}");
    }
    assert_eq!(s.upstream.count(), 2);
    // h2 with a Host other than :authority is malformed (RFC 9113 §8.3.1).
    let c = client(&s.pki.ca_pem, true);
    let url = format!("https://{}/public/v", host(&s));
    let (status, _, body) = get(&c, &url, None, &[("host", "elsewhere.test")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("authority_mismatch"));
    assert_eq!(s.upstream.count(), 2);
    // Without ALPN the connection speaks HTTP/1.1.
    let req = format!(
        "GET /public/none HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        host(&s)
    );
    let (status, _) = raw_alpn(&s, &[], &req).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn websocket_upgrade_still_works_over_alpn_http1() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let ws = ws_echo_server().await;
    let s = setup(&format!(
        "[[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nupstream = \"http://{ws}\"\nauth = \"bearer\"\n"
    ))
    .await;
    let stream = tls(&s, &[b"http/1.1"]).await;
    let mut req = format!("wss://{}/ws", host(&s))
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
    ws.send(Message::text("ping")).await.unwrap();
    let back = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "ping");
    let _ = ws.close(None).await;
}
