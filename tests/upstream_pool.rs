//! The upstream connection pool, seen from a hand-written HTTP/1.1 upstream
//! on loopback that counts the connections it accepts and answers each path
//! in its own way (keep-alive, `Connection: close`, a silent close, a big
//! body, no body). Clients are real TLS connections to the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw HTTP/1.1 upstream. Paths:
/// - `/keep`: `200 ok`, keep-alive;
/// - `/close`: `200 ok` with `Connection: close`, then closes;
/// - `/drop`: `200 ok` that looks keep-alive, then closes without saying so;
/// - `/big`: 1 MiB body, keep-alive;
/// - `/empty`: `204`, keep-alive;
/// - `/early`: `200 ok` at once, then reads the request body
///   (`Content-Length`), keep-alive.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

const BIG: usize = 1 << 20;

impl RawUpstream {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Over TLS with `pki`'s server certificate.
    async fn start_tls(pki: &TestPki) -> Self {
        Self::start_with(Some(pki.tls_acceptor(&[]))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_raw(tcp, r).await,
                        Some(t) => {
                            if let Ok(s) = t.accept(tcp).await {
                                serve_raw(s, r).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            requests,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Answers requests on one connection as `RawUpstream` describes.
async fn serve_raw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tcp: S,
    r: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head (the proxy sends GET/HEAD without a body here).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        r.fetch_add(1, Ordering::SeqCst);
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("").to_owned();
        let path = words.next().unwrap_or("").to_owned();
        let reply: Vec<u8> = match path.as_str() {
            "/close" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec()
            }
            "/big" => {
                let mut v =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
                if method != "HEAD" {
                    v.resize(v.len() + BIG, b'x');
                }
                v
            }
            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            _ if method == "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        };
        if tcp.write_all(&reply).await.is_err() {
            return;
        }
        // The request body, if any, after the answer (`/early` answers first).
        let mut body_left = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            })
            .unwrap_or(0);
        while body_left > 0 {
            if buf.is_empty() {
                match tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let take = body_left.min(buf.len());
            buf.drain(..take);
            body_left -= take;
        }
        if path == "/close" || path == "/drop" {
            let _ = tcp.shutdown().await;
            return;
        }
    }
}

struct Setup {
    pki: TestPki,
    upstream: RawUpstream,
    server: portcullis::server::RunningServer,
}

async fn setup() -> Setup {
    let pki = TestPki::new();
    let upstream = RawUpstream::start().await;
    let url = format!("http://{}", upstream.addr);
    setup_with(pki, upstream, &url, "").await
}

async fn setup_with(pki: TestPki, upstream: RawUpstream, url: &str, extra: &str) -> Setup {
    let (rsa, _, _) = keys();
    let jwks = serde_json::json!({ "keys": [rsa.jwk] }).to_string();
    std::fs::write(pki.path().join("jwks.json"), jwks).unwrap();
    let routes = format!(
        r#"
[[routes]]
name = "app"
path_prefix = "/"
upstream = "{url}"
auth = "public"
{extra}
"#
    );
    let cfg = pki.write_config(
        "p.toml",
        &base_config("https://idp.test", r#"jwks_file = "jwks.json""#, &routes),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    Setup {
        pki,
        upstream,
        server,
    }
}

/// The admin listener's `/metrics` text.
async fn scrape(s: &Setup) -> String {
    let mut t = tokio::net::TcpStream::connect(s.server.admin_addr)
        .await
        .unwrap();
    t.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(DEADLINE, t.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text
}

/// The value of the sample `name` (with its labels) in a scrape; 0 when absent.
fn sample(text: &str, name: &str) -> u64 {
    let name = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// `portcullis_upstream_connections_opened_total` by reason, from the admin
/// listener's `/metrics`: (none_idle, all_busy, closed).
async fn opened(s: &Setup) -> (u64, u64, u64) {
    let text = scrape(s).await;
    let count = |reason: &str| {
        sample(
            &text,
            &format!("portcullis_upstream_connections_opened_total{{reason=\"{reason}\"}}"),
        )
    };
    (count("none_idle"), count("all_busy"), count("closed"))
}

async fn conn(s: &Setup) -> TlsConn {
    TlsConn::connect(s.server.proxy_addr, "localhost", &s.pki.ca_pem, None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_upstream_connection() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for i in 0..100 {
        let (status, _, body) = c.get("/keep", &[]).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(
        s.upstream.accepted(),
        1,
        "one client, one upstream connection"
    );
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 100);
    // The metric says the same, and why: the pool was empty once.
    assert_eq!(opened(&s).await, (1, 0, 0));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_open_no_more_connections_than_they_use() {
    let s = setup().await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(conn(&s).await);
    }
    for round in 0..3 {
        let mut tasks = tokio::task::JoinSet::new();
        for mut c in clients.drain(..) {
            tasks.spawn(async move {
                for _ in 0..20 {
                    let (status, _, body) = c.get("/keep", &[]).await;
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(&body[..], b"ok");
                }
                c
            });
        }
        while let Some(c) = tasks.join_next().await {
            clients.push(c.unwrap());
        }
        assert!(
            s.upstream.accepted() <= 10,
            "round {round}: {} upstream connections for 10 clients",
            s.upstream.accepted()
        );
    }
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 600);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closes_are_not_reused() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for i in 0..20 {
        let path = if i % 2 == 0 { "/close" } else { "/drop" };
        let (status, _, body) = c.get(path, &[]).await;
        assert_eq!(status, StatusCode::OK, "request {i} to {path}");
        assert_eq!(&body[..], b"ok");
    }
    // Each answer ended its connection, announced or not.
    assert_eq!(s.upstream.accepted(), 20);
    // And a keep-alive one after them is reused again.
    for _ in 0..5 {
        assert_eq!(c.get("/keep", &[]).await.0, StatusCode::OK);
    }
    assert_eq!(s.upstream.accepted(), 21);
    // Every new connection is counted once, with a reason: an announced
    // close is never pooled (none idle next time); a silent one is either
    // seen closed at checkout (none idle) or found closed on use.
    let (none_idle, all_busy, closed) = opened(&s).await;
    assert_eq!(none_idle + closed, 21, "{none_idle} + {closed}");
    assert_eq!(all_busy, 0);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_abandoned_midway_never_leaks_into_the_next_one() {
    let s = setup().await;
    {
        // Reads the head and a little of a 1 MiB body, then goes away.
        let mut tls = raw_tls(&s).await;
        tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0u8; 16 * 1024];
        let mut n = 0;
        while n < 8 * 1024 {
            let k = tokio::time::timeout(DEADLINE, tls.read(&mut got[n..]))
                .await
                .unwrap()
                .unwrap();
            assert!(k > 0, "proxy closed early");
            n += k;
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
    }
    // Whatever worker takes the next clients, each answer is whole and its own.
    for _ in 0..4 {
        let mut c = conn(&s).await;
        for _ in 0..5 {
            let (status, _, body) = c.get("/keep", &[]).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"ok");
        }
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_responses_give_their_connection_back() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for _ in 0..10 {
        let (status, _, body) = c.get("/empty", &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        let (status, h, body) = c.send("HEAD", "/big", &[]).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["content-length"], BIG.to_string().as_str());
        assert!(body.is_empty());
        assert_eq!(c.get("/keep", &[]).await.2.as_ref(), b"ok");
    }
    assert_eq!(s.upstream.accepted(), 1);
    s.server.shutdown().await;
}

/// A bare TLS stream (ALPN http/1.1) to the proxy, for exact bytes.
async fn raw_tls(s: &Setup) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_stream(s.server.proxy_addr, &s.pki.ca_pem, &[b"http/1.1"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_verified_and_its_connection_reused() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start_tls(&pki).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let s = setup_with(pki, upstream, &url, "\n[upstream]\nca = \"ca.pem\"\n").await;
    let mut c = conn(&s).await;
    for _ in 0..20 {
        let (status, _, body) = c.get("/keep", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(s.upstream.accepted(), 1, "one TLS connection, reused");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_untrusted_certificate_gets_nothing() {
    let pki = TestPki::new();
    // The upstream's certificate comes from another CA than `[upstream] ca`.
    let stranger = TestPki::new();
    let upstream = RawUpstream::start_tls(&stranger).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let s = setup_with(pki, upstream, &url, "\n[upstream]\nca = \"ca.pem\"\n").await;
    let mut c = conn(&s).await;
    let (status, _, _) = c.get("/keep", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 0);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_sending_a_body_is_not_waited_on_by_the_next_request() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start().await;
    let url = format!("http://{}", upstream.addr);
    // One worker: both clients share one upstream pool.
    let s = setup_with(pki, upstream, &url, "\n[listener]\nworkers = 1\n").await;
    // A: a POST whose upstream answers before the body is all sent.
    let mut a = raw_tls(&s).await;
    a.write_all(b"POST /early HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"ok") {
        let n = tokio::time::timeout(DEADLINE, a.read(&mut chunk))
            .await
            .expect("A's early answer")
            .unwrap();
        assert!(n > 0, "proxy closed A");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // B, while A's body is still open: answered, not queued behind A's
    // connection (it would wait until A finishes, which it does not here).
    let mut b = conn(&s).await;
    let (status, _, body) = tokio::time::timeout(DEADLINE, b.send("GET", "/keep", &[]))
        .await
        .expect("B waited on A's busy connection")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"ok");
    assert_eq!(s.upstream.accepted(), 2, "B got a connection of its own");
    // Counted as such: A's on an empty pool, B's past A's busy one.
    assert_eq!(opened(&s).await, (1, 1, 0));
    // A finishes its body; B goes on without a new connection.
    a.write_all(b"67890").await.unwrap();
    for _ in 0..5 {
        assert_eq!(b.get("/keep", &[]).await.0, StatusCode::OK);
    }
    assert_eq!(s.upstream.accepted(), 2);
    s.server.shutdown().await;
}

/// `portcullis_worker_connections` per worker, from the admin `/metrics`.
async fn worker_connections(s: &Setup, workers: u64) -> Vec<u64> {
    let text = scrape(s).await;
    (0..workers)
        .map(|w| {
            sample(
                &text,
                &format!("portcullis_worker_connections{{worker=\"{w}\"}}"),
            )
        })
        .collect()
}

/// New connections go to the worker with the fewest, whichever worker
/// accepted them, and each is served there to its end: nine connections
/// opened one after another sit three on each of three workers, every one
/// keeps working, and the upstream sees one pooled connection per worker
/// (each worker has its own pool), so they really run on three threads.
/// Shutdown still drains them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_evenly_over_the_workers() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start().await;
    let url = format!("http://{}", upstream.addr);
    let s = setup_with(pki, upstream, &url, "\n[listener]\nworkers = 3\n").await;
    let mut conns = Vec::new();
    for _ in 0..9 {
        let mut c = conn(&s).await;
        assert_eq!(c.get("/keep", &[]).await.0, StatusCode::OK);
        conns.push(c);
    }
    assert_eq!(worker_connections(&s, 3).await, [3, 3, 3]);
    for c in &mut conns {
        let (status, _, body) = c.get("/keep", &[]).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 18);
    assert_eq!(
        s.upstream.accepted(),
        3,
        "one upstream connection per worker"
    );
    // Closed connections give their seats back.
    conns.truncate(3);
    let since = std::time::Instant::now();
    let mut left = worker_connections(&s, 3).await;
    while left.iter().sum::<u64>() != 3 && since.elapsed() < DEADLINE {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        left = worker_connections(&s, 3).await;
    }
    assert_eq!(left.iter().sum::<u64>(), 3, "{left:?}");
    tokio::time::timeout(DEADLINE, s.server.shutdown())
        .await
        .expect("shutdown drains connections on every worker");
    drop(conns);
}
