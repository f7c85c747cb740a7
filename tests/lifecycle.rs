//! The binary as an operator runs it: `check`, `serve` with SIGHUP reload and
//! SIGTERM drain, memory while streaming, and the robustness limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;

const ISS: &str = "https://idp.test";

struct Files {
    pki: TestPki,
    upstream: Upstream,
    ec: portcullis::demo::pki::SigningKey,
}

async fn files() -> Files {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let (_, ec, _) = keys();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({ "keys": [ec.jwk] }).to_string(),
    )
    .unwrap();
    Files { pki, upstream, ec }
}

fn routes(up: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{up}\"\nauth = \"bearer\"\n{extra}"
    )
}

fn config(f: &Files, extra_routes: &str, proxy_extra: &str) -> String {
    base_config(
        ISS,
        r#"jwks_file = "jwks.json""#,
        &routes(&f.upstream.url(), extra_routes),
    )
    .replace(
        "listen = \"127.0.0.1:0\"\n\n[admin]",
        &format!("listen = \"127.0.0.1:0\"\n{proxy_extra}\n\n[admin]"),
    )
}

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn check_accepts_a_good_config_and_names_file_and_field_on_errors() {
    let f = files().await;
    let good = config(&f, "", "");
    let p = f.pki.write_config("good.toml", &good);
    let (ok, out) = check(&p);
    assert!(ok, "{out}");
    assert!(out.contains("ok (1 routes, 1 issuers"), "{out}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "typo.toml",
            good.replace("path_prefix", "path_prefx"),
            "path_prefx",
        ),
        (
            "leeway.toml",
            good.replace("leeway_s = 5", "leeway_s = 600"),
            "issuers[0].leeway_s",
        ),
        (
            "url.toml",
            good.replace(&f.upstream.url(), "ftp://example"),
            "routes[0].upstream",
        ),
        (
            "alg.toml",
            good.replace(
                "algorithms = [\"RS256\", \"ES256\", \"EdDSA\"]",
                "algorithms = [\"HS256\"]",
            ),
            "issuers[0].algorithms[0]",
        ),
        (
            "issuer-ref.toml",
            good.replace(
                "auth = \"bearer\"",
                "auth = \"bearer\"\nissuers = [\"nobody\"]",
            ),
            "routes[0].issuers[0]",
        ),
        (
            "cert.toml",
            good.replace("server.pem", "missing.pem"),
            "missing.pem",
        ),
        (
            "jwks.toml",
            good.replace("jwks.json", "nope.json"),
            "issuers[0].jwks_file",
        ),
        (
            "auth.toml",
            good.replace("auth = \"bearer\"", "auth = \"magic\""),
            "magic",
        ),
        ("syntax.toml", format!("{good}\n[[routes]\n"), "syntax.toml"),
    ];
    for (name, body, needle) in cases {
        let p = f.pki.write_config(name, &body);
        let (ok, out) = check(&p);
        assert!(!ok, "{name}: check passed:\n{out}");
        assert!(
            out.contains(name),
            "{name}: message does not name the file:\n{out}"
        );
        assert!(
            out.contains(needle),
            "{name}: message does not name `{needle}`:\n{out}"
        );
    }

    // A key that does not belong to the certificate.
    let other = f.pki.ca.server_cert(&["localhost"]).unwrap();
    std::fs::write(f.pki.path().join("other-key.pem"), other.key_pem).unwrap();
    let p = f.pki.write_config(
        "mismatch.toml",
        &good.replace("server-key.pem", "other-key.pem"),
    );
    let (ok, out) = check(&p);
    assert!(!ok && out.contains("other-key.pem"), "{out}");
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let r = plain
        .get(format!("http://{admin}{path}").parse().unwrap())
        .await
        .unwrap();
    let st = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (st, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_the_old_one_when_the_new_is_broken() {
    let f = files().await;
    let cfg_path = f.pki.write_config("serve.toml", &config(&f, "", ""));
    let p = ServeProcess::spawn(&cfg_path).await;
    let token = f.ec.sign(&claims(ISS, "alice")).unwrap();
    let c = client(&f.pki.ca_pem, false);
    let url = |path: &str| format!("https://localhost:{}{path}", p.proxy.port());
    assert_eq!(
        get(&c, &url("/x"), Some(&token), &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &url("/open/x"), None, &[]).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A good new config: adds a public route.
    let up = f.upstream.url();
    let good = config(
        &f,
        &format!(
            "[[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"{up}\"\nauth = \"public\"\n"
        ),
        "",
    );
    std::fs::write(&cfg_path, &good).unwrap();
    p.signal("HUP");
    wait_until_async("reload ok", || async {
        admin_get(p.admin, "/metrics")
            .await
            .1
            .contains("portcullis_config_reloads_total{result=\"ok\"} 1")
    })
    .await;
    assert_eq!(get(&c, &url("/open/x"), None, &[]).await.0, StatusCode::OK);

    // A broken config: the proxy keeps serving the previous one.
    std::fs::write(&cfg_path, good.replace("path_prefix", "path_prefx")).unwrap();
    p.signal("HUP");
    wait_until_async("reload error", || async {
        admin_get(p.admin, "/metrics")
            .await
            .1
            .contains("portcullis_config_reloads_total{result=\"error\"} 1")
    })
    .await;
    assert_eq!(get(&c, &url("/open/x"), None, &[]).await.0, StatusCode::OK);
    assert_eq!(
        get(&c, &url("/x"), Some(&token), &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &url("/x"), None, &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
}

async fn wait_until_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let f = files().await;
    let cfg_path = f.pki.write_config("serve.toml", &config(&f, "", ""));
    let mut p = ServeProcess::spawn(&cfg_path).await;
    let token = f.ec.sign(&claims(ISS, "alice")).unwrap();
    let c = client(&f.pki.ca_pem, false);
    let url = format!("https://localhost:{}/delay", p.proxy.port());
    let inflight = tokio::spawn(async move { get(&c, &url, Some(&token), &[]).await });
    wait_until("the upstream to see the request", || {
        f.upstream.count() == 1
    })
    .await;
    p.signal("TERM");
    let (st, _, body) = tokio::time::timeout(DEADLINE, inflight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&body[..], b"late");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    // New connections are refused once it is gone.
    assert!(std::net::TcpStream::connect(p.proxy).is_err());
}

#[tokio::test]
async fn a_100_mb_streamed_body_passes_with_bounded_proxy_memory() {
    let f = files().await;
    let cfg_path = f.pki.write_config("serve.toml", &config(&f, "", ""));
    let p = ServeProcess::spawn(&cfg_path).await;
    let token = f.ec.sign(&claims(ISS, "alice")).unwrap();
    let c = client(&f.pki.ca_pem, false);
    let url = format!("https://localhost:{}/count", p.proxy.port());
    // Warm up: TLS, pools, caches.
    assert_eq!(get(&c, &url, Some(&token), &[]).await.0, StatusCode::OK);
    let before = p.rss_kib();

    const TOTAL: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let chunks = futures_util::stream::iter(
        (0..TOTAL / CHUNK)
            .map(|_| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![7u8; CHUNK])))),
    );
    let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
    let req = http::Request::post(&url)
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .unwrap();
    let pid = p.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        loop {
            let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return peak;
            };
            if let Some(v) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(v);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(120), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echo: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["body_len"], TOTAL as u64);
    let after = p.rss_kib();
    sampler.abort();
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    assert!(
        growth_mib < 20.0,
        "RSS grew by {growth_mib:.1} MiB ({before} → {after} KiB)"
    );
}

/// A raw TLS connection to the proxy, for byte-level tests.
async fn raw_tls(
    ca_pem: &str,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_oversized_headers_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = files().await;
    let cfg = config(
        &f,
        "",
        "header_read_timeout_ms = 300\nmax_headers = 50\nmax_header_bytes = 16384",
    );
    let server = portcullis::server::start(f.pki.write_config("p.toml", &cfg))
        .await
        .unwrap();

    // Slowloris: half a header block, then silence. The proxy closes the connection.
    let mut s = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("connection stayed open");
    // A reset (Err) also means closed.
    if let Ok(n) = n {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "got `{text}`");
    }

    // Too many headers.
    let mut s = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    let mut req = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..80 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "too many headers: `{text}`"
    );

    // A header block over the byte limit.
    let mut s = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let _ = s.write_all(req.as_bytes()).await;
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        n == 0 || text.starts_with("HTTP/1.1 431"),
        "big header: `{text}`"
    );
    assert_eq!(f.upstream.count(), 0);
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `s`.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed mid-response: `{text}`");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn the_header_read_timeout_spares_requests_in_flight_and_closes_idle_keep_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = files().await;
    // 300 ms to send a head; the upstream's `/delay` takes 1 s to answer.
    let cfg = config(&f, "", "header_read_timeout_ms = 300");
    let server = portcullis::server::start(f.pki.write_config("p.toml", &cfg))
        .await
        .unwrap();
    let token = f.ec.sign(&claims(ISS, "alice")).unwrap();
    let mut s = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    // A request that waits on its upstream longer than the header-read
    // timeout is not cut: the clock stops while a request is in flight.
    let req =
        format!("GET /delay HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.ends_with("late"), "{first}");
    // The clock starts again with the response: a next request in time is
    // served on the same connection.
    s.write_all(req.as_bytes()).await.unwrap();
    let second = read_response(&mut s).await;
    assert!(second.ends_with("late"), "{second}");
    assert_eq!(f.upstream.count(), 2);
    // Then silence: the idle keep-alive connection is closed (EOF or reset).
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("the idle connection stayed open");
    if let Ok(n) = n {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "got `{text}`");
    }
    assert_eq!(f.upstream.count(), 2);
}

#[tokio::test]
async fn the_connection_limit_holds_new_connections_until_one_closes() {
    let f = files().await;
    let cfg = config(
        &f,
        "",
        "max_connections = 2\ntls_handshake_timeout_ms = 20000",
    );
    let server = portcullis::server::start(f.pki.write_config("p.toml", &cfg))
        .await
        .unwrap();
    let a = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    let _b = raw_tls(&f.pki.ca_pem, server.proxy_addr).await;
    // The third handshake cannot complete while two connections are open.
    let third = tokio::spawn({
        let ca = f.pki.ca_pem.clone();
        let addr = server.proxy_addr;
        async move { raw_tls(&ca, addr).await }
    });
    // Asserting a negative needs a bounded wait; a slow machine can only make
    // this pass more easily, never fail spuriously.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past the limit"
    );
    drop(a);
    let _c = tokio::time::timeout(DEADLINE, third)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn check_rejects_files_that_are_not_toml() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.toml");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&[0xff, 0xfe, 0x00, 0x01])
        .unwrap();
    let (ok, out) = check(&p);
    assert!(!ok && out.contains("bin.toml"), "{out}");
    let (ok, out) = check(&dir.path().join("absent.toml"));
    assert!(
        !ok && out.contains("absent.toml") && out.contains("cannot read"),
        "{out}"
    );
}

#[test]
fn the_shipped_example_config_passes_check_once_its_certificates_exist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/portcullis.example.toml"
    );
    let cfg = dir.path().join("config/portcullis.example.toml");
    std::fs::copy(example, &cfg).unwrap();
    // Its [policy] dir is the shipped default set, beside it.
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policies");
    std::fs::create_dir_all(dir.path().join("config/policies")).unwrap();
    for f in std::fs::read_dir(policies).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(
                &f,
                dir.path()
                    .join("config/policies")
                    .join(f.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    let ca = portcullis::demo::pki::DevCa::new("example CA").unwrap();
    let leaf = ca
        .server_cert(&["wiki.example.com", "apps.example.com", "mtls.example.com"])
        .unwrap();
    std::fs::write(dir.path().join("certs/server.pem"), leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("certs/server-key.pem"), leaf.key_pem).unwrap();
    let device_ca = portcullis::demo::pki::DevCa::new("example device CA").unwrap();
    std::fs::write(dir.path().join("certs/device-ca.pem"), device_ca.cert_pem()).unwrap();
    let spire = portcullis::demo::pki::DevCa::new("example SPIRE CA").unwrap();
    std::fs::write(dir.path().join("certs/spire-bundle.pem"), spire.cert_pem()).unwrap();
    std::fs::write(
        dir.path().join("certs/oidc-client-secret"),
        "example-secret",
    )
    .unwrap();
    let assertion_key = portcullis::demo::pki::SigningKey::es256("2026-12").unwrap();
    std::fs::write(
        dir.path().join("certs/assertion-2026-12.pem"),
        assertion_key.private_pem,
    )
    .unwrap();
    let (ok, out) = check(&cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok (6 routes, 1 issuers, 1 certificates, policy set valid)"),
        "{out}"
    );
}
