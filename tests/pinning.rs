//! `[listener] pin_workers`, seen from the operating system: each proxy
//! worker thread's CPU affinity, unpinned and pinned. Its own test binary,
//! with one test: `cargo test` runs a binary's tests on parallel threads of
//! one process, and another test's workers would be counted here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http::StatusCode;

/// This process's proxy worker threads named `portcullis-w<n>` that are not
/// in `before`, with the CPUs each may run on.
fn worker_threads(before: &[u32]) -> Vec<(u32, Vec<usize>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let entry = entry.unwrap();
        let tid: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if before.contains(&tid) || !comm.starts_with("portcullis-w") {
            continue;
        }
        let cpus = portcullis::util::worker::allowed_cpus_of(Some(tid as i32)).unwrap();
        out.push((tid, cpus));
    }
    out
}

fn all_threads() -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_pinned_one_per_cpu_only_when_asked() {
    let allowed = portcullis::util::worker::allowed_cpus().unwrap();
    let workers = allowed.len().min(2);
    for pin in [false, true] {
        let before = all_threads();
        let pki = TestPki::new();
        let (rsa, _, _) = keys();
        let jwks = serde_json::json!({ "keys": [rsa.jwk] }).to_string();
        std::fs::write(pki.path().join("jwks.json"), jwks).unwrap();
        let upstream = Upstream::start().await;
        let routes = format!(
            "\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\n\
             auth = \"public\"\n\n[listener]\nworkers = {workers}\npin_workers = {pin}\n",
            upstream.url()
        );
        let cfg = pki.write_config(
            "p.toml",
            &base_config("https://idp.test", r#"jwks_file = "jwks.json""#, &routes),
        );
        let server = portcullis::server::start(cfg).await.unwrap();
        // Each worker pins itself as it starts: looked at until it has.
        let want: Vec<Vec<usize>> = if pin {
            // Each on one CPU of its own: the first allowed ones.
            allowed[..workers].iter().map(|&c| vec![c]).collect()
        } else {
            vec![allowed.clone(); workers]
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        let cpus = loop {
            let mut cpus: Vec<Vec<usize>> = worker_threads(&before)
                .into_iter()
                .map(|(_, c)| c)
                .collect();
            cpus.sort_unstable();
            if cpus == want || std::time::Instant::now() > deadline {
                break cpus;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(cpus, want, "pin {pin}");
        // And the proxy serves as before.
        let mut c = TlsConn::connect(server.proxy_addr, "localhost", &pki.ca_pem, None)
            .await
            .unwrap();
        let (status, _, body) = c.get("/pinned", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["path"], "/pinned", "the app's own answer");
        assert!(
            upstream
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.path == "/pinned"),
            "the app got the request"
        );
        server.shutdown().await;
    }
}
