//! The deployment artefacts, checked with the real tools CI uses: every
//! kustomize overlay renders (`kubectl kustomize`) and validates against the
//! Kubernetes schemas offline (`kubernetes-validate`), the Dockerfile passes
//! `hadolint`, the systemd unit passes `systemd-analyze verify`, and the
//! Grafana dashboard parses and queries only metrics a running server exports.
//!
//! A missing tool fails the test (scripts/test.sh installs them all).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool; a tool that is not installed is a failure, with the hint.
fn run(tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("`{tool}` could not run ({e}); scripts/test.sh installs it"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const OVERLAYS: [&str; 3] = ["front-proxy", "sidecar", "nats"];

fn render(overlay: &str) -> String {
    let dir = format!("deploy/kubernetes/overlays/{overlay}");
    let out = run("kubectl", &["kustomize", &dir], None);
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn every_overlay_renders_and_validates_offline() {
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        // --strict: unknown fields are errors, as a typo in a manifest should be.
        let out = run(
            "kubernetes-validate",
            &["--strict", "--quiet", "-"],
            Some(yaml.as_bytes()),
        );
        assert!(
            out.status.success(),
            "kubernetes-validate rejected overlay {overlay}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn overlays_have_the_pieces_operators_expect() {
    let front = render("front-proxy");
    for kind in [
        "kind: Deployment",
        "kind: Service",
        "kind: PodDisruptionBudget",
        "kind: ConfigMap",
        "secretName: portcullis-tls",
        "path: /healthz",
        "path: /readyz",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
    ] {
        assert!(front.contains(kind), "front-proxy lacks `{kind}`");
    }
    // The policies ConfigMap keeps a fixed name: its volume then updates in
    // place and the proxy's watcher reloads it with no restart.
    assert!(front.contains("name: portcullis-policies\n"));
    assert!(front.contains("watch_interval_ms = 2000"));

    let sidecar = render("sidecar");
    assert!(
        sidecar.contains("name: app\n"),
        "sidecar has no app container"
    );
    assert!(sidecar.contains("127.0.0.1:3000"));
    assert!(sidecar.contains("upstream = \"http://127.0.0.1:3000\""));

    let nats = render("nats");
    assert!(nats.contains("kind: StatefulSet"));
    assert!(nats.contains("kind = \"nats\""));
    assert!(nats.contains("url = \"nats://nats:4222\""));
    let replicas: Vec<&str> = nats.matches("replicas: 3").collect();
    assert_eq!(
        replicas.len(),
        2,
        "three proxies and three NATS nodes:\n{nats}"
    );
}

/// The base's policies are a copy of config/policies (kustomize cannot read
/// outside its directory); they must not drift.
#[test]
fn kubernetes_policies_match_config_policies() {
    let base = root().join("deploy/kubernetes/base/policies");
    let mut names = BTreeSet::new();
    for e in std::fs::read_dir(root().join("config/policies")).unwrap() {
        let p = e.unwrap().path();
        let keep = p
            .extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema");
        if keep {
            let name = p.file_name().unwrap().to_owned();
            let copy = std::fs::read_to_string(base.join(&name))
                .unwrap_or_else(|_| panic!("{} missing in {}", p.display(), base.display()));
            assert!(
                copy == std::fs::read_to_string(&p).unwrap(),
                "{} drifted from {}: copy it again",
                base.join(&name).display(),
                p.display()
            );
            names.insert(name);
        }
    }
    assert!(!names.is_empty());
}

/// The rendered configs are real portcullis configs (`portcullis check`
/// semantics up to files that only exist in the pod).
#[test]
fn rendered_configs_parse_as_portcullis_config() {
    for overlay in ["front-proxy", "sidecar"] {
        let toml_text = std::fs::read_to_string(root().join(format!(
            "deploy/kubernetes/overlays/{overlay}/portcullis.toml"
        )))
        .unwrap();
        // As the pod sees it: the config in /etc/portcullis/config.
        let parsed = portcullis::config::Config::from_toml(
            &toml_text,
            std::path::Path::new("/etc/portcullis/config/portcullis.toml"),
        );
        assert!(parsed.is_ok(), "{overlay}: {}", parsed.err().unwrap());
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = run("hadolint", &["Dockerfile"], None);
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        docker.contains("USER 65532"),
        "the runtime runs as non-root"
    );
    assert!(docker.contains("ENTRYPOINT [\"/usr/local/bin/portcullis\"]"));
    assert!(
        docker.contains("scripts/release-build.sh"),
        "the image is the release build, with its optimisation profile"
    );
}

/// The release build's optimisation profile (`build/pgo`, read by
/// `scripts/release-build.sh`) is one this toolchain reads. rustc only warns
/// on a profile it cannot read (bad data, a newer LLVM's format) and builds
/// without it, so a broken profile would silently cost the release build its
/// optimisation: here a crate built with it must compile without a word.
#[test]
fn release_profile_is_read_by_this_toolchain() {
    let want: u32 = std::fs::read_to_string(root().join("build/pgo/llvm-major"))
        .unwrap()
        .trim()
        .parse()
        .expect("build/pgo/llvm-major holds LLVM's major version");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = run(&rustc, &["-vV"], None);
    assert!(version.status.success(), "{rustc} -vV failed");
    let have: u32 = text(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .expect("rustc -vV names its LLVM version");
    assert!(
        have >= want,
        "the profile is LLVM {want}'s format; this rustc has LLVM {have}"
    );
    let dir = tempfile::tempdir().unwrap();
    let unpacked = run("gzip", &["-dc", "build/pgo/portcullis.profdata.gz"], None);
    assert!(
        unpacked.status.success() && !unpacked.stdout.is_empty(),
        "gzip -dc build/pgo/portcullis.profdata.gz: {}",
        text(&unpacked.stderr)
    );
    let profile = dir.path().join("portcullis.profdata");
    std::fs::write(&profile, &unpacked.stdout).unwrap();
    let src = dir.path().join("probe.rs");
    std::fs::write(&src, "pub fn probe(x: u32) -> u32 { x.wrapping_mul(3) }\n").unwrap();
    let out = run(
        &rustc,
        &[
            "--crate-type=lib",
            "-Copt-level=2",
            &format!("-Cprofile-use={}", profile.display()),
            "-Cllvm-args=-no-pgo-warn-mismatch",
            "--out-dir",
            &dir.path().display().to_string(),
            &src.display().to_string(),
        ],
        None,
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "rustc with the profile: {}",
        text(&out.stderr)
    );
}

/// `systemd-analyze verify` on a copy whose ExecStart points at a binary
/// that exists here (the unit's own path is where operators install it).
/// Warnings print to stderr but do not change the exit code, so stderr must
/// be empty too.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/portcullis.service")).unwrap();
    for needed in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n",
        "StateDirectory=portcullis",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(needed), "unit lacks `{needed}`");
    }
    let bin = common::binary();
    let copy = unit.replace(
        "ExecStart=/usr/local/bin/portcullis ",
        &format!("ExecStart={} ", bin.display()),
    );
    assert_ne!(copy, unit);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.service");
    std::fs::write(&path, copy).unwrap();
    let out = run("systemd-analyze", &["verify", path.to_str().unwrap()], None);
    let err = text(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

/// Metric names the scrape declares, with the sample names each type adds.
fn exported_metric_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("#") || parts.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// Identifiers in a PromQL expression that name portcullis metrics.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("portcullis_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn panels(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().expect("panels is an array") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_exported_metrics() {
    let raw = std::fs::read_to_string(root().join("deploy/grafana/portcullis.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&raw).expect("dashboard is valid JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().is_some());

    // A real server's scrape.
    let pki = common::TestPki::new();
    let jwks = common::JwksServer::start("https://idp.test", vec![]).await;
    let routes = "[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"public\"\n";
    let cfg = common::base_config(
        "https://idp.test",
        &format!("jwks_url = \"{}\"", jwks.url()),
        routes,
    );
    let path = pki.write_config("portcullis.toml", &cfg);
    let metrics = std::sync::Arc::new(portcullis::telemetry::Metrics::new());
    let cfg = portcullis::config::Config::load(&path).unwrap();
    let server = portcullis::server::start_with(cfg, metrics.clone())
        .await
        .unwrap();
    touch_every_family(&metrics);
    let scrape = reqwest_metrics(server.admin_addr).await;
    server.shutdown().await;
    let exported = exported_metric_names(&scrape);
    assert!(exported.contains("portcullis_requests_total"), "{scrape}");

    let mut titles = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for p in panels(&dash) {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("every panel has a title");
        titles.insert(title.to_owned());
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: expr"));
            let names = metrics_in(expr);
            assert!(
                !names.is_empty(),
                "{title}: `{expr}` names no portcullis metric"
            );
            for n in names {
                assert!(
                    exported.contains(&n),
                    "{title}: `{n}` is not exported by the proxy (exported: {exported:?})"
                );
                seen.insert(n);
            }
        }
    }
    // The four subjects the issue names.
    for needed in [
        "portcullis_control_window_seconds_bucket",
        "portcullis_decisions_total",
        "portcullis_feed_events_total",
        "portcullis_upstream_response_seconds_bucket",
    ] {
        assert!(seen.contains(needed), "no panel queries {needed}");
    }
}

/// A labelled family appears in the scrape only once it has a child; give
/// each one a child, as traffic would, so its name is in the scrape.
fn touch_every_family(m: &portcullis::telemetry::Metrics) {
    use portcullis::telemetry::*;
    let route = RouteLabel { route: "r".into() };
    let ok = ResultLabel { result: "ok" };
    m.requests
        .get_or_create(&RouteStatus {
            route: "r".into(),
            status: 200,
        })
        .inc();
    m.decisions
        .get_or_create(&ActionLabel {
            action: "allow",
            reason: "ok",
        })
        .inc();
    m.upstream_seconds.get_or_create(&route).observe(0.001);
    m.open_connections
        .get_or_create(&ListenerLabel { listener: "https" })
        .set(0);
    m.connections_refused
        .get_or_create(&ResultLabel {
            result: "tls_error",
        })
        .inc();
    m.config_reloads.get_or_create(&ok).inc();
    m.feed_events
        .get_or_create(&FeedOutcomeLabel {
            feed: "mdm",
            kind: "device".into(),
            outcome: "applied",
        })
        .inc();
    m.control_window_seconds
        .get_or_create(&FeedKindLabel {
            feed: "mdm",
            kind: "device".into(),
        })
        .observe(0.001);
    m.posture_denials
        .get_or_create(&ResultLabel {
            result: "device_lost",
        })
        .inc();
    m.policy_reloads.get_or_create(&ok).inc();
    m.policy_shadow_divergences
        .get_or_create(&ShadowLabel {
            enforced: "allow",
            shadow: "deny",
        })
        .inc();
}

/// GET /metrics over plain HTTP/1.1 on loopback.
async fn reqwest_metrics(admin: std::net::SocketAddr) -> String {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "localhost")
        .body(common::empty())
        .unwrap();
    let resp = tokio::time::timeout(common::DEADLINE, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    text(&resp.into_body().collect().await.unwrap().to_bytes())
}

#[test]
fn metric_name_extraction() {
    assert_eq!(
        metrics_in("sum(rate(portcullis_a_total{x=\"y\"}[5m])) / xportcullis_c + portcullis_b"),
        vec!["portcullis_a_total", "portcullis_b"]
    );
    let names =
        exported_metric_names("# TYPE portcullis_x counter\n# TYPE portcullis_h histogram\n");
    assert!(names.contains("portcullis_x_total") && names.contains("portcullis_h_bucket"));
}
