//! The upstream connection pool, seen from a hand-written HTTP/1.1 upstream
//! on loopback that counts the connections it accepts and answers each path
//! in its own way (keep-alive, `Connection: close`, a silent close, a big
//! body, no body). Clients are real TLS connections to the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
///
/// And the framing cases of the HTTP/1.1 client leg (see [`reply_to`]):
/// - `/chunked`: `hello world!` in chunks with extensions, then trailers;
/// - `/eof`: a close-delimited `200` (no length, no chunks), then closes;
/// - `/hints`: `103 Early Hints` (with `Link`), then `200 hints`;
/// - `/five`: `200 five!` (`Content-Length: 5`; a HEAD gets the head only);
/// - `/not-modified`: `304` with `ETag` and `Content-Length: 5`, no body;
/// - `/no-content`: `204` with `Content-Length: 0`;
/// - `/bad-status`: `HTTP/1.1 2x0 OK`, then keeps the connection open;
/// - `/two-lengths`: `Content-Length: 5` and `Content-Length: 6`;
/// - `/short`: `Content-Length: 10` and 5 body bytes, then closes;
/// - `/junk`: `200 ok` followed, in the same write, by a whole second
///   response (`JUNK`) nobody asked for; `/junk-late` the same in a
///   separate write, counted in `late_junk` once written;
/// - `/once`: reads the request body first; answers `200 once` when it is
///   the connection's first request, else closes without a word;
/// - `/many-headers`: 101 header lines; `/huge-head`: a 1 MiB head;
/// - `/te-cl`: `Transfer-Encoding: chunked` and `Content-Length: 5` on an
///   11-byte chunked body (`hello world`).
///
/// Every other path (`/wire?q=1` too) gets `/keep`'s answer.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// The bytes each connection received, in the order they were accepted.
    wire: Arc<Mutex<Vec<Log>>>,
    /// `/junk-late` answers whose unasked-for second response is written.
    late_junk: Arc<AtomicUsize>,
}

const BIG: usize = 1 << 20;

/// Everything one upstream connection has received.
type Log = Arc<Mutex<Vec<u8>>>;

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
        let wire: Arc<Mutex<Vec<Log>>> = Arc::default();
        let late_junk = Arc::new(AtomicUsize::new(0));
        let (a, r, w, j) = (
            accepted.clone(),
            requests.clone(),
            wire.clone(),
            late_junk.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                // Each write leaves at once (`/junk-late`'s second one too).
                let _ = tcp.set_nodelay(true);
                let log: Log = Arc::default();
                w.lock().unwrap().push(log.clone());
                a.fetch_add(1, Ordering::SeqCst);
                let conn = Conn {
                    requests: r.clone(),
                    log,
                    late_junk: j.clone(),
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_raw(tcp, conn).await,
                        Some(t) => {
                            if let Ok(s) = t.accept(tcp).await {
                                serve_raw(s, conn).await;
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
            wire,
            late_junk,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The bytes the `i`-th accepted connection has received so far.
    fn received(&self, i: usize) -> Vec<u8> {
        self.wire.lock().unwrap()[i].lock().unwrap().clone()
    }

    /// How many connections received `needle` somewhere in their bytes.
    fn connections_that_received(&self, needle: &[u8]) -> usize {
        self.wire
            .lock()
            .unwrap()
            .iter()
            .filter(|log| {
                log.lock()
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle)
            })
            .count()
    }
}

/// What one upstream connection shares with the test.
struct Conn {
    requests: Arc<AtomicUsize>,
    log: Log,
    late_junk: Arc<AtomicUsize>,
}

/// Reads more of the connection into `buf`, and into its log; false at its end.
async fn read_more<S: tokio::io::AsyncRead + Unpin>(
    tcp: &mut S,
    buf: &mut Vec<u8>,
    log: &Mutex<Vec<u8>>,
) -> bool {
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            log.lock().unwrap().extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Reads and drops `left` request body bytes (some may be in `buf` already);
/// false when the connection ended first.
async fn skip_body<S: tokio::io::AsyncRead + Unpin>(
    tcp: &mut S,
    buf: &mut Vec<u8>,
    log: &Mutex<Vec<u8>>,
    left: &mut usize,
) -> bool {
    while *left > 0 {
        if buf.is_empty() && !read_more(tcp, buf, log).await {
            return false;
        }
        let take = (*left).min(buf.len());
        buf.drain(..take);
        *left -= take;
    }
    true
}

/// The answer to `method path` for the paths `RawUpstream` describes.
fn reply_to(method: &str, path: &str) -> Vec<u8> {
    let head = method == "HEAD";
    match path {
        "/close" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_vec(),
        "/big" => {
            let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
            if !head {
                v.resize(v.len() + BIG, b'x');
            }
            v
        }
        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
5;ext=1\r\nhello\r\n\
1;a=b;quoted=\"x;y\"\r\n \r\n\
6 ; spaced=ext\r\nworld!\r\n\
0;last\r\nX-Sum: 12\r\nX-Other: t\r\n\r\n"
            .to_vec(),
        "/eof" => {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the upstream closes"
                .to_vec()
        }
        "/hints" => {
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints"
                .to_vec()
        }
        "/five" if head => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
        "/five" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfive!".to_vec(),
        "/not-modified" => {
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\n".to_vec()
        }
        "/no-content" => b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_vec(),
        "/bad-status" => b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        "/two-lengths" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()
        }
        "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello".to_vec(),
        "/junk" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nJUNK"
            .to_vec(),
        "/once" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce".to_vec(),
        "/many-headers" => {
            let mut v = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
            for i in 0..101 {
                v.extend_from_slice(format!("X-Header-{i}: {i}\r\n").as_bytes());
            }
            v.extend_from_slice(b"\r\nok");
            v
        }
        "/huge-head" => {
            let mut v = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
            for i in 0..16 {
                v.extend_from_slice(format!("X-Big-{i}: ").as_bytes());
                v.resize(v.len() + (64 << 10), b'a');
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"\r\nok");
            v
        }
        "/te-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
b\r\nhello world\r\n0\r\n\r\n"
            .to_vec(),
        _ if head => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n".to_vec(),
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
    }
}

/// Answers requests on one connection as `RawUpstream` describes.
async fn serve_raw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tcp: S,
    conn: Conn,
) {
    let log = &*conn.log;
    let mut buf = Vec::new();
    // Requests read on this connection.
    let mut served = 0usize;
    loop {
        // One request head (a body, if any, is read by `Content-Length`).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut tcp, &mut buf, log).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        conn.requests.fetch_add(1, Ordering::SeqCst);
        served += 1;
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("").to_owned();
        let path = words.next().unwrap_or("").to_owned();
        let mut body_left = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            })
            .unwrap_or(0);
        if path == "/once" {
            // The whole request first; a connection's later one is dropped.
            if !skip_body(&mut tcp, &mut buf, log, &mut body_left).await || served > 1 {
                let _ = tcp.shutdown().await;
                return;
            }
        }
        if tcp.write_all(&reply_to(&method, &path)).await.is_err() {
            return;
        }
        if path == "/junk-late" {
            let junk = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nJUNK";
            if tcp.flush().await.is_err() || tcp.write_all(junk).await.is_err() {
                return;
            }
            let _ = tcp.flush().await;
            conn.late_junk.fetch_add(1, Ordering::SeqCst);
        }
        // The request body, if any, after the answer (`/early` answers first).
        if !skip_body(&mut tcp, &mut buf, log, &mut body_left).await {
            return;
        }
        if matches!(path.as_str(), "/close" | "/drop" | "/eof" | "/short") {
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
    // A POST, as A's: a bodiless GET takes the pool's other queue (its own
    // connections, never busy when idle), which this is not about.
    let mut b = conn(&s).await;
    let (status, _, body) = tokio::time::timeout(DEADLINE, b.send_body("POST", "/keep", &[], "b"))
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
        let (status, _, _) = b.send_body("POST", "/keep", &[], "b").await.unwrap();
        assert_eq!(status, StatusCode::OK);
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

// The HTTP/1.1 client leg, end to end: how each framing of an upstream
// answer reaches the client, whether its connection is reused, and what
// the upstream is sent. Whatever parses the upstream's answers must keep
// every one of these.

/// One worker: every client connection shares one upstream pool.
async fn setup_one_worker() -> Setup {
    let pki = TestPki::new();
    let upstream = RawUpstream::start().await;
    let url = format!("http://{}", upstream.addr);
    setup_with(pki, upstream, &url, "\n[listener]\nworkers = 1\n").await
}

/// `f`, or a failed test once [`DEADLINE`] has passed.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}

/// One bodiless request on `c`, its body read too, bounded by [`DEADLINE`].
async fn fetch(
    c: &mut TlsConn,
    method: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, bytes::Bytes), BoxError> {
    within(&format!("{method} {path}"), c.send(method, path, &[])).await
}

/// `GET path` on `c` is answered `200` with exactly `body`.
async fn assert_get(c: &mut TlsConn, path: &str, body: &[u8]) {
    let (status, _, got) = fetch(c, "GET", path).await.unwrap();
    assert_eq!(status, StatusCode::OK, "GET {path}");
    assert_eq!(
        &got[..],
        body,
        "GET {path}: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// The data of a chunked body (extensions and trailers dropped).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let line = std::str::from_utf8(&b[..eol]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n", "chunk data ends its line");
        b = &b[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_extensions_and_trailers_arrives_exact_and_keeps_its_connection() {
    let s = setup_one_worker().await;
    for round in 0..2 {
        // A new client connection each round: the upstream one is the pool's.
        let mut c = conn(&s).await;
        let (status, h, body) = fetch(&mut c, "GET", "/chunked").await.unwrap();
        assert_eq!(status, StatusCode::OK, "round {round}");
        assert_eq!(&body[..], b"hello world!", "round {round}");
        if let Some(len) = h.get("content-length") {
            assert_eq!(len, "12", "round {round}");
        }
    }
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 2);
    assert_eq!(
        s.upstream.accepted(),
        1,
        "the chunked answer's end was found"
    );
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_response_arrives_whole_and_its_connection_is_not_reused() {
    let s = setup().await;
    let mut c = conn(&s).await;
    assert_get(&mut c, "/eof", b"read until the upstream closes").await;
    assert_get(&mut c, "/keep", b"ok").await;
    assert_eq!(
        s.upstream.accepted(),
        2,
        "a closed connection is not reused"
    );
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_hints_response_is_passed_over_for_the_final_one() {
    let s = setup().await;
    let mut c = conn(&s).await;
    assert_get(&mut c, "/hints", b"hints").await;
    // Nothing of either answer is left over for the next one.
    assert_get(&mut c, "/keep", b"ok").await;
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_with_a_content_length_has_no_body_and_no_desync() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for i in 0..3 {
        let (status, h, body) = fetch(&mut c, "HEAD", "/five").await.unwrap();
        assert_eq!(status, StatusCode::OK, "round {i}");
        assert_eq!(h["content-length"], "5", "round {i}");
        assert!(body.is_empty(), "round {i}: {body:?}");
        assert_get(&mut c, "/five", b"five!").await;
    }
    assert_eq!(s.upstream.requests.load(Ordering::SeqCst), 6);
    assert_eq!(s.upstream.accepted(), 1);
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_modified_response_has_no_body_and_keeps_its_connection() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for i in 0..3 {
        // With the `Content-Length` of the representation it stands for.
        let (status, h, body) = fetch(&mut c, "GET", "/not-modified").await.unwrap();
        assert_eq!(status, StatusCode::NOT_MODIFIED, "round {i}");
        assert_eq!(h["etag"], "\"v1\"", "round {i}");
        assert!(body.is_empty(), "round {i}: {body:?}");
        assert_get(&mut c, "/five", b"five!").await;
    }
    assert_eq!(s.upstream.accepted(), 1);
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_content_response_with_a_zero_length_keeps_its_connection() {
    let s = setup().await;
    let mut c = conn(&s).await;
    for i in 0..3 {
        let (status, _, body) = fetch(&mut c, "GET", "/no-content").await.unwrap();
        assert_eq!(status, StatusCode::NO_CONTENT, "round {i}");
        assert!(body.is_empty(), "round {i}: {body:?}");
        assert_get(&mut c, "/five", b"five!").await;
    }
    assert_eq!(s.upstream.accepted(), 1);
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_status_line_is_a_bad_gateway_and_its_connection_is_dropped() {
    let s = setup().await;
    let mut c = conn(&s).await;
    let (status, _, _) = fetch(&mut c, "GET", "/bad-status").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_get(&mut c, "/keep", b"ok").await;
    assert_eq!(
        s.upstream.accepted(),
        2,
        "the garbled connection is not reused"
    );
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_a_bad_gateway() {
    let s = setup().await;
    let mut c = conn(&s).await;
    let (status, _, body) = fetch(&mut c, "GET", "/two-lengths").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
    assert_get(&mut c, "/keep", b"ok").await;
    assert_eq!(
        s.upstream.accepted(),
        2,
        "a connection out of step is not reused"
    );
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_content_length_never_looks_complete() {
    let s = setup().await;
    let mut c = conn(&s).await;
    // Either an error status, or the body read fails (the answer is cut).
    if let Ok((status, h, body)) = fetch(&mut c, "GET", "/short").await {
        assert!(
            status.is_server_error(),
            "a complete-looking {status} with {h:?} and {body:?}"
        );
    }
    drop(c);
    let mut c = conn(&s).await;
    assert_get(&mut c, "/keep", b"ok").await;
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_past_the_content_length_never_answer_the_next_request() {
    let s = setup().await;
    let mut c = conn(&s).await;
    // A whole unasked-for response right behind the body, in the same write.
    for _ in 0..5 {
        assert_get(&mut c, "/junk", b"ok").await;
        assert_get(&mut c, "/five", b"five!").await;
    }
    // The same in a write of its own, there before the next request is sent.
    for i in 0..5 {
        assert_get(&mut c, "/junk-late", b"ok").await;
        wait_until("the late junk", || {
            s.upstream.late_junk.load(Ordering::SeqCst) > i
        })
        .await;
        assert_get(&mut c, "/five", b"five!").await;
    }
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_the_upstream_dropped_unanswered_on_a_reused_connection_is_retried() {
    let s = setup().await;
    let mut c = conn(&s).await;
    assert_get(&mut c, "/keep", b"ok").await;
    // Its pooled connection reads this one and closes: sent again on a new one.
    assert_get(&mut c, "/once", b"once").await;
    assert_eq!(s.upstream.accepted(), 2);
    assert_eq!(s.upstream.connections_that_received(b"GET /once "), 2);
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_upstream_dropped_unanswered_is_never_sent_twice() {
    let s = setup().await;
    let mut c = conn(&s).await;
    assert_get(&mut c, "/keep", b"ok").await;
    // Its pooled connection reads all of it and closes.
    let marker: &'static [u8] = b"post-body-5d1e07c3";
    let (status, _, body) = within("POST /once", c.send_body("POST", "/once", &[], marker))
        .await
        .expect("a clean answer");
    assert!(
        (status, &body[..]) == (StatusCode::OK, &b"once"[..]) || status == StatusCode::BAD_GATEWAY,
        "{status} {body:?}"
    );
    // The upstream reads a body whole before closing: a body it got on the
    // reused connection was written there, and is not sent again elsewhere.
    let copies = s.upstream.connections_that_received(marker);
    assert!(copies <= 1, "the POST body reached {copies} connections");
    assert_get(&mut c, "/keep", b"ok").await;
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_response_headers_are_a_bad_gateway() {
    let s = setup().await;
    let mut c = conn(&s).await;
    let (status, _, _) = fetch(&mut c, "GET", "/many-headers").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_get(&mut c, "/keep", b"ok").await;
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_of_response_head_is_a_bad_gateway() {
    let s = setup().await;
    let mut c = conn(&s).await;
    // Bounded: `fetch` fails the test past the deadline.
    let (status, _, _) = fetch(&mut c, "GET", "/huge-head").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_get(&mut c, "/keep", b"ok").await;
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_framing_wins_over_a_content_length_and_only_it_reaches_the_client() {
    let s = setup().await;
    let mut c = conn(&s).await;
    let (status, h, body) = fetch(&mut c, "GET", "/te-cl").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"hello world");
    if let Some(len) = h.get("content-length") {
        assert_eq!(len, "11");
    }
    // The exact bytes: one framing, and the right one.
    let mut tls = raw_tls(&s).await;
    tls.write_all(b"GET /te-cl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // Read until the proxy closes (without close_notify, an error: the end too).
    let _ = within("the answer to /te-cl", tls.read_to_end(&mut got)).await;
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    let field = |name: &str| -> Vec<String> {
        head.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    };
    let lengths = field("content-length");
    let chunked = field("transfer-encoding")
        .iter()
        .any(|v| v.contains("chunked"));
    assert!(!chunked || lengths.is_empty(), "two framings: {head}");
    let body = if chunked {
        dechunk(&got[end..])
    } else {
        assert!(lengths.iter().all(|l| l == "11"), "{head}");
        got[end..].to_vec()
    };
    assert_eq!(
        body,
        b"hello world",
        "{head}{}",
        String::from_utf8_lossy(&got[end..])
    );
    within("shutdown", s.server.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reaches_the_upstream_as_one_head_without_body_framing() {
    let s = setup().await;
    let mut c = conn(&s).await;
    assert_get(&mut c, "/wire?q=1", b"ok").await;
    // The next request on the same connection is the next thing it gets.
    assert_get(&mut c, "/keep", b"ok").await;
    assert_eq!(s.upstream.accepted(), 1);
    let wire = s.upstream.received(0);
    let end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let head = std::str::from_utf8(&wire[..end]).unwrap();
    let mut lines = head.strip_suffix("\r\n\r\n").unwrap().split("\r\n");
    assert_eq!(lines.next(), Some("GET /wire?q=1 HTTP/1.1"), "{head}");
    let fields: Vec<(String, &str)> = lines
        .map(|l| {
            assert!(!l.contains(['\r', '\n']), "a bare CR or LF: {head:?}");
            let (k, v) = l.split_once(':').expect("a header line");
            (k.to_ascii_lowercase(), v.trim())
        })
        .collect();
    let host: Vec<_> = fields.iter().filter(|(k, _)| k == "host").collect();
    assert_eq!(host.len(), 1, "{head}");
    assert_eq!(host[0].1, s.upstream.addr.to_string(), "{head}");
    for framing in ["content-length", "transfer-encoding"] {
        assert!(!fields.iter().any(|(k, _)| k == framing), "{head}");
    }
    assert!(
        wire[end..].starts_with(b"GET /keep HTTP/1.1\r\n"),
        "bytes after the head: {:?}",
        String::from_utf8_lossy(&wire[end..])
    );
    within("shutdown", s.server.shutdown()).await;
}

/// `pool_idle_per_host` bounds an upstream's idle connections whichever
/// way they were used: a bodiless GET (the pool's own exchange) and a POST
/// (through hyper) keep their connections apart, but under one bound. With
/// a bound of one, each request of the other kind finds the one idle
/// connection of its own kind gone (closed to make room), while requests of
/// one kind keep reusing theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_kinds_of_idle_connection_share_one_bound() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start().await;
    let url = format!("http://{}", upstream.addr);
    let extra = "\n[listener]\nworkers = 1\n\n[upstream]\npool_idle_per_host = 1\n";
    let s = setup_with(pki, upstream, &url, extra).await;
    let mut c = conn(&s).await;
    for _ in 0..3 {
        assert_eq!(c.get("/keep", &[]).await.0, StatusCode::OK);
    }
    assert_eq!(s.upstream.accepted(), 1, "GETs reuse their connection");
    let (status, _, _) = c.send_body("POST", "/keep", &[], "p").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.upstream.accepted(), 2, "a POST does not take the GET's");
    // The POST's connection went back and the GET's was closed for it.
    assert_eq!(c.get("/keep", &[]).await.0, StatusCode::OK);
    assert_eq!(s.upstream.accepted(), 3);
    let (status, _, _) = c.send_body("POST", "/keep", &[], "p").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.upstream.accepted(), 4);
    // None of them waited or failed: every opening was on an empty queue.
    assert_eq!(opened(&s).await, (4, 0, 0));
    s.server.shutdown().await;
}
