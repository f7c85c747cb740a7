//! Zero-downtime operations, proven under load: while clients keep sending
//! requests (pooled keep-alive connections and a fresh connection per
//! request), the running `portcullis serve` process
//!   1. swaps its certificate (SIGHUP),
//!   2. reloads its config (SIGHUP: a new route),
//!   3. reloads its policies (file change, no signal),
//!   4. hands its socket to a second process (`[listener] reuse_port`) and
//!      drains on SIGTERM.
//!
//! Not one request fails, and every step is observed to take effect.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const ISS: &str = "https://idp.test";

const POLICY_V1: &str = r#"
@id("low-open")
permit (principal is User, action, resource)
when { context.route.sensitivity == "low" };
"#;

const POLICY_V2: &str = r#"
@id("low-open")
permit (principal is User, action, resource)
when { context.route.sensitivity == "low" };

@id("high-open-now")
permit (principal is User, action, resource)
when { context.route.sensitivity == "high" };
"#;

/// Writes a file atomically (a reader sees the old or the new one, whole).
fn put(path: &std::path::Path, body: &str) {
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(listen: &str, upstream: &str, extra_route: bool) -> String {
    let mut routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/app\"\nupstream = \"{upstream}\"\nsensitivity = \"low\"\nauth = \"bearer\"\n\n\
         [[routes]]\nname = \"gated\"\npath_prefix = \"/gated\"\nupstream = \"{upstream}\"\nsensitivity = \"high\"\nauth = \"bearer\"\n\n"
    );
    if extra_route {
        routes.push_str(&format!(
            "[[routes]]\nname = \"v2\"\npath_prefix = \"/v2\"\nupstream = \"{upstream}\"\nsensitivity = \"low\"\nauth = \"bearer\"\n"
        ));
    }
    base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{listen}\"\ndrain_timeout_ms = 10000"), 1)
        .replace(
            "[log]",
            "[listener]\nreuse_port = true\n\n[policy]\ndir = \"policies\"\nwatch_interval_ms = 100\n\n[log]",
        )
}

struct Load {
    phase: Arc<std::sync::Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `pooled` tasks share a keep-alive client; `fresh` tasks open a new
    /// connection per request (the accept path under handover).
    fn start(url: String, ca_pem: String, token: String, pooled: usize, fresh: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let phase = Arc::new(std::sync::Mutex::new("warm-up"));
        let shared_client = client(&ca_pem, false);
        let mut tasks = Vec::new();
        for i in 0..pooled + fresh {
            let (stop, ok, failed, phase) =
                (stop.clone(), ok.clone(), failed.clone(), phase.clone());
            let fail = move |why: String| {
                let p = *phase.lock().unwrap();
                failed.lock().unwrap().push(format!("{p}: {why}"));
            };
            let (url, ca_pem, token) = (url.clone(), ca_pem.clone(), token.clone());
            let pooled_client = shared_client.clone();
            tasks.push(tokio::spawn(async move {
                // Bounded: at most this many requests per task.
                for _ in 0..50_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let c = if i < pooled {
                        pooled_client.clone()
                    } else {
                        client(&ca_pem, false)
                    };
                    let req = http::Request::get(&url)
                        .header("authorization", format!("Bearer {token}"))
                        .body(empty())
                        .unwrap();
                    match tokio::time::timeout(DEADLINE, c.request(req)).await {
                        Ok(Ok(r)) if r.status() == StatusCode::OK => {
                            use http_body_util::BodyExt;
                            match r.into_body().collect().await {
                                Ok(_) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => fail(format!("body: {e}")),
                            }
                        }
                        Ok(Ok(r)) => fail(format!("status {}", r.status())),
                        Ok(Err(e)) => fail(format!("error: {e:?}")),
                        Err(_) => fail("timeout".into()),
                    }
                }
            }));
        }
        Self {
            phase,
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn phase(&self, p: &'static str) {
        *self.phase.lock().unwrap() = p;
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded (the load is flowing).
    async fn advance(&self, n: u64) {
        let target = self.ok() + n;
        wait_until("load to advance", || {
            self.ok() >= target || !self.failures().is_empty()
        })
        .await;
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.lock().unwrap().clone();
        (ok, failed)
    }
}

/// One request on a fresh connection trusting only `ca_pem`.
async fn status_with(ca_pem: &str, url: &str, token: &str) -> Option<StatusCode> {
    let c = client(ca_pem, false);
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .unwrap();
    match tokio::time::timeout(DEADLINE, c.request(req)).await {
        Ok(Ok(r)) => Some(r.status()),
        _ => None,
    }
}

/// Polls an async probe until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_and_handover_under_load_fail_no_request() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = pki.issuer_key("user-1");
    let pol = pki.policy_dir("p.cedar", POLICY_V1);
    let cfg_a = pki.write_config("a.toml", &config("127.0.0.1:0", &upstream.url(), false));
    let a = ServeProcess::spawn(&cfg_a).await;
    let port = a.proxy.port();
    let base = format!("https://localhost:{port}");
    let token = key.sign(&claims(ISS, "alice")).unwrap();

    // A second CA for the swapped certificate; the load trusts both.
    let ca2 = portcullis::demo::pki::DevCa::new("second CA").unwrap();
    let both = format!("{}{}", pki.ca_pem, ca2.cert_pem());
    let load = Load::start(format!("{base}/app/x"), both.clone(), token.clone(), 3, 1);
    load.advance(50).await;

    // 1. Certificate swap.
    load.phase("certificate swap");
    assert_eq!(
        status_with(&ca2.cert_pem(), &format!("{base}/app/x"), &token).await,
        None
    );
    let leaf = ca2.server_cert(&["localhost", "127.0.0.1"]).unwrap();
    put(&pki.path().join("server-key.pem"), &leaf.key_pem);
    put(&pki.path().join("server.pem"), &leaf.cert_pem);
    a.signal("HUP");
    eventually("the new certificate", || async {
        status_with(&ca2.cert_pem(), &format!("{base}/app/x"), &token).await == Some(StatusCode::OK)
    })
    .await;
    load.advance(50).await;

    // 2. Config reload: a new route appears.
    load.phase("config reload");
    assert_eq!(
        status_with(&both, &format!("{base}/v2/x"), &token).await,
        Some(StatusCode::NOT_FOUND)
    );
    put(&cfg_a, &config("127.0.0.1:0", &upstream.url(), true));
    a.signal("HUP");
    eventually("the new route", || async {
        status_with(&both, &format!("{base}/v2/x"), &token).await == Some(StatusCode::OK)
    })
    .await;
    load.advance(50).await;

    // 3. Policy reload: the watcher picks up a changed file, no signal.
    load.phase("policy reload");
    assert_eq!(
        status_with(&both, &format!("{base}/gated/x"), &token).await,
        Some(StatusCode::FORBIDDEN)
    );
    put(&pol.join("p.cedar"), POLICY_V2);
    eventually("the new policy", || async {
        status_with(&both, &format!("{base}/gated/x"), &token).await == Some(StatusCode::OK)
    })
    .await;
    load.advance(50).await;

    // 4. Handover: B binds the same port (SO_REUSEPORT), A drains on SIGTERM.
    load.phase("handover");
    let cfg_b = pki.write_config(
        "b.toml",
        &config(&format!("127.0.0.1:{port}"), &upstream.url(), true),
    );
    let b = ServeProcess::spawn(&cfg_b).await;
    assert_eq!(b.proxy.port(), port);
    load.advance(50).await;
    let mut a = a;
    a.signal("TERM");
    let start = Instant::now();
    loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            assert!(status.success(), "A exited with {status}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "A did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only B serves now.
    load.phase("after handover");
    load.advance(200).await;
    assert_eq!(
        status_with(&both, &format!("{base}/gated/x"), &token).await,
        Some(StatusCode::OK)
    );

    let (ok, mut failed) = load.finish().await;
    // With SO_REUSEPORT, a connection the kernel queued on A's socket after
    // A's last accept is reset when A closes it, unless the kernel migrates
    // it to B (`net.ipv4.tcp_migrate_req=1`, Linux >= 5.14; scripts/test.sh
    // sets it where it can, docs/operations.md asks operators to). Without
    // it, only such resets — on connect, during the handover — are tolerated.
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    if !migrate {
        let before = failed.len();
        failed.retain(|f| {
            !(f.starts_with("handover:")
                && f.contains("tcp connect error")
                && f.contains("ConnectionReset"))
        });
        if failed.len() != before {
            eprintln!(
                "net.ipv4.tcp_migrate_req is off: {} connect(s) reset at A's close tolerated",
                before - failed.len()
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 500, "load too small to mean anything: {ok}");
    assert!(upstream.count() as u64 >= ok, "the app saw every request");
    eprintln!("reload under load: {ok} requests, 0 failed");
    drop(b);
}
