//! `portcullis verify-window` against a running proxy: the binary marks a
//! test device lost through the generic MDM feed (and, in the second case,
//! deactivates a SCIM user), probes a protected route over TLS until it is
//! refused, prints the window, restores the state, and exits 1 past `--bound`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";
const MDM_SECRET: &str = "mdm-secret-0123456789";
const SCIM_TOKEN: &str = "scim-secret-0123456789";

async fn admin(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, Value) {
    let c = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let r = c.request(req).await.unwrap();
    let st = r.status().as_u16();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

struct Env {
    pki: TestPki,
    _upstream: Upstream,
    server: portcullis::server::RunningServer,
    key: portcullis::demo::pki::SigningKey,
}

async fn env() -> Env {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = pki.issuer_key("user-1");
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    let body = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
        )
        .replace(
            "[log]",
            &format!(
                "[feeds.scim]\ntoken = \"{SCIM_TOKEN}\"\n\n[[feeds.mdm]]\nname = \"acme\"\nsecret = \"{MDM_SECRET}\"\n\n[log]"
            ),
        );
    let cfg = pki.write_config("vw.toml", &body);
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        _upstream: upstream,
        server,
        key,
    }
}

/// Runs the binary off the runtime (the proxy keeps serving meanwhile).
async fn verify_window(
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(binary())
            .arg("verify-window")
            .args(&args)
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_window_measures_a_lost_device_and_restores_it() {
    let e = env().await;
    let mut c = claims(ISS, "dana");
    c["device_id"] = "test-laptop".into();
    let token = e.key.sign(&c).unwrap();
    let args = vec![
        "--proxy".into(),
        format!("https://localhost:{}/app", e.server.proxy_addr.port()),
        "--feed".into(),
        format!("http://{}/mdm/v1/acme/events", e.server.admin_addr),
        "--device".into(),
        "test-laptop".into(),
        "--cacert".into(),
        e.pki.path().join("ca.pem").display().to_string(),
        "--bound".into(),
        "10000".into(),
        "--json".into(),
    ];
    // Secrets through the environment, as documented.
    let (code, out, err) = verify_window(
        args,
        vec![
            ("PORTCULLIS_FEED_TOKEN", MDM_SECRET.to_owned()),
            ("PORTCULLIS_PROBE_TOKEN", token),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["window_ms"].as_f64().unwrap() > 0.0, "{v}");
    // The device's credentials are revoked with it: 401 (or 403 by policy).
    assert!([401, 403].contains(&v["status"].as_u64().unwrap()), "{v}");
    assert_eq!(v["within_bound"], true);
    assert_eq!(v["restored"], true);
    // The device is back (re-enrolled), not lost.
    let (st, d) = admin(
        e.server.admin_addr,
        "GET",
        "/admin/v1/devices/test-laptop",
        ADMIN_TOKEN,
        "",
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["device"]["lifecycle"], "enrolled", "{d}");
    e.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_window_exits_non_zero_past_the_bound_and_restores_a_scim_leaver() {
    let e = env().await;
    let (st, user) = admin(
        e.server.admin_addr,
        "POST",
        "/scim/v2/Users",
        SCIM_TOKEN,
        &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "erin", "active": true})
        .to_string(),
    )
    .await;
    assert_eq!(st, 201, "{user}");
    let uid = user["id"].as_str().unwrap().to_owned();
    let token = e.key.sign(&claims(ISS, "erin")).unwrap();
    let args = vec![
        "--proxy".into(),
        format!("https://localhost:{}/app", e.server.proxy_addr.port()),
        "--feed".into(),
        format!("http://{}/scim/v2", e.server.admin_addr),
        "--feed-token".into(),
        SCIM_TOKEN.into(),
        "--subject".into(),
        uid.clone(),
        "--token".into(),
        token,
        "--cacert".into(),
        e.pki.path().join("ca.pem").display().to_string(),
        // No window is zero: this bound is always exceeded.
        "--bound".into(),
        "0".into(),
    ];
    let (code, out, err) = verify_window(args, vec![]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("control window:") && out.contains("EXCEEDED"),
        "{out}"
    );
    let (st, u) = admin(
        e.server.admin_addr,
        "GET",
        &format!("/scim/v2/Users/{uid}"),
        SCIM_TOKEN,
        "",
    )
    .await;
    assert_eq!(st, 200, "{u}");
    assert_eq!(u["active"], true, "restored: {u}");
    e.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_window_refuses_a_probe_that_is_not_allowed_to_begin_with() {
    let e = env().await;
    let args = vec![
        "--proxy".into(),
        format!("https://localhost:{}/app", e.server.proxy_addr.port()),
        "--feed".into(),
        format!("http://{}/mdm/v1/acme/events", e.server.admin_addr),
        "--feed-token".into(),
        MDM_SECRET.into(),
        "--device".into(),
        "x".into(),
        "--cacert".into(),
        e.pki.path().join("ca.pem").display().to_string(),
        "--bound".into(),
        "100".into(),
    ];
    let (code, _, err) = verify_window(args, vec![]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused before any change"), "{err}");
    e.server.shutdown().await;
}
