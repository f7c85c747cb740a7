//! The operator page `/admin/ui`: behind the operator token, a strict CSP,
//! no script and no external URL; and rendered in headless Debian Chromium
//! (puppeteer-core, tests/js/admin-ui.mjs) with the control-window chart per
//! feed and the findings table present, built from real feed events and
//! real requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const MDM_SECRET: &str = "mdm-secret-0123456789abcdef";

struct Env {
    pki: TestPki,
    _upstream: Upstream,
    key: SigningKey,
    server: portcullis::server::RunningServer,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Env {
    async fn start() -> Self {
        let pki = TestPki::new();
        let upstream = Upstream::start().await;
        let key = SigningKey::es256("user-1").unwrap();
        std::fs::write(
            pki.path().join("jwks.json"),
            json!({"keys": [key.jwk]}).to_string(),
        )
        .unwrap();
        let routes = format!(
            "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
            upstream.url()
        );
        let text = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
            .replace(
                "[log]",
                &format!(
                    "[[feeds.mdm]]\nname = \"acme\"\nsecret = \"{MDM_SECRET}\"\n\n[access]\nflush_interval_ms = 100\n\n[log]"
                ),
            )
            .replace(
                "[admin]\nlisten = \"127.0.0.1:0\"",
                &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
            );
        let cfg = pki.write_config("p.toml", &text);
        let server = portcullis::server::start(cfg).await.unwrap();
        let e = Self {
            pki,
            _upstream: upstream,
            key,
            server,
            http: Client::builder(TokioExecutor::new()).build_http(),
        };
        e.seed().await;
        e
    }

    async fn admin(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: String,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server.admin_addr))
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let resp = tokio::time::timeout(
            DEADLINE,
            self.http
                .request(b.body(Full::new(Bytes::from(body))).unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    async fn proxied(&self, sub: &str, device: &str) -> StatusCode {
        let mut c = claims(ISS, sub);
        c["device_id"] = device.into();
        let t = self.key.sign(&c).unwrap();
        let cl = client(&self.pki.ca_pem, false);
        let url = format!("https://localhost:{}/x", self.server.proxy_addr.port());
        get(&cl, &url, Some(&t), &[]).await.0
    }

    /// Real feed events, each followed by a request decided on the new
    /// state (which measures its control window), and a lost device still
    /// presented afterwards (a finding).
    async fn seed(&self) {
        assert_eq!(self.proxied("ivy", "ivy-mac").await, StatusCode::OK);
        for (id, dev, body) in [
            (
                "c-1",
                "ivy-mac",
                json!({ "compliance": "compliant", "lifecycle": "enrolled" }),
            ),
            ("l-1", "lost-pc", json!({ "lifecycle": "lost" })),
        ] {
            let mut ev = json!({ "event_id": id, "device_id": dev, "occurred_at": portcullis::util::now_unix_ms() });
            for (k, v) in body.as_object().unwrap() {
                ev[k] = v.clone();
            }
            let (st, _, b) = self
                .admin(
                    Method::POST,
                    "/mdm/v1/acme/events",
                    Some(MDM_SECRET),
                    ev.to_string(),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{b}");
        }
        assert_eq!(self.proxied("ivy", "ivy-mac").await, StatusCode::OK);
        assert_ne!(self.proxied("<b>jo</b>", "lost-pc").await, StatusCode::OK);
    }

    fn url(&self) -> String {
        format!("http://{}/admin/ui", self.server.admin_addr)
    }
}

#[tokio::test]
async fn operator_page_needs_the_token_and_sets_a_strict_csp() {
    let e = Env::start().await;
    for tok in [None, Some("wrong-token-0123456789")] {
        let (st, h, body) = e.admin(Method::GET, "/admin/ui", tok, String::new()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
        assert!(h.contains_key("www-authenticate"));
        assert!(!body.contains("ivy"), "{body}");
    }
    let (st, h, page) = e
        .admin(Method::GET, "/admin/ui", Some(ADMIN_TOKEN), String::new())
        .await;
    assert_eq!(st, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap();
    for d in [
        "default-src 'none'",
        "script-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(d), "{csp}");
    }
    // The one inline style carries the CSP's nonce; nothing else is inline.
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    assert!(page.contains(&format!("<style nonce=\"{nonce}\">")));
    assert_eq!(page.matches("<style").count(), 1);
    assert!(
        !page.contains(" style="),
        "inline style attributes would need 'unsafe-inline'"
    );
    // No script, no external asset, no URL at all.
    assert!(!page.to_lowercase().contains("<script"));
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("//"),
        "external URL in the page"
    );
    // The chart, the findings table, feed health and the picture.
    assert!(
        page.contains("<svg class=\"window-chart\" data-feed=\"mdm\""),
        "{page}"
    );
    assert!(page.contains("<table id=\"findings\">"));
    assert!(page.contains("data-kind=\"dead_device_access\""));
    assert!(page.contains("<table id=\"feeds\">") && page.contains("<table id=\"picture\">"));
    // Subjects are data: escaped, never markup.
    assert!(page.contains("&lt;b&gt;jo&lt;/b&gt;") && !page.contains("<b>jo</b>"));
    // A nonce is fresh per response.
    let (_, h2, _) = e
        .admin(Method::GET, "/admin/ui", Some(ADMIN_TOKEN), String::new())
        .await;
    assert_ne!(h2["content-security-policy"], h["content-security-policy"]);
}

#[tokio::test]
async fn operator_page_renders_in_headless_chromium_with_chart_and_findings() {
    let e = Env::start().await;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/puppeteer-core").is_dir(),
        "tests/js/node_modules is missing: run scripts/test.sh (it runs `npm ci` in tests/js)"
    );
    let url = e.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("admin-ui.mjs"))
            .arg(&url)
            .arg(ADMIN_TOKEN)
            .arg("/usr/bin/chromium")
            .current_dir(&dir)
            .output()
            .expect("spawn node (nodejs is installed by scripts/test.sh)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["title"], "portcullis · access");
    let charts = v["charts"].as_array().unwrap();
    let mdm = charts
        .iter()
        .find(|c| c["feed"] == "mdm")
        .unwrap_or_else(|| panic!("no mdm chart: {v}"));
    assert!(mdm["bars"].as_u64().unwrap() > 1, "{mdm}");
    let windows: u64 = mdm["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert!(windows >= 1, "{mdm}");
    assert!(
        mdm["height"].as_f64().unwrap() > 50.0,
        "the chart is drawn: {mdm}"
    );
    let findings: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(findings.contains(&"dead_device_access"), "{v}");
    for t in ["findings", "feeds", "picture"] {
        assert!(v["tables"].as_array().unwrap().contains(&json!(t)), "{v}");
    }
    // The inline style applied (its nonce matched the CSP).
    assert_eq!(v["styled"], "600");
    // Nothing loaded from anywhere else, and no CSP violation.
    let admin = format!("http://{}/", e.server.admin_addr);
    for r in v["other_requests"].as_array().unwrap() {
        assert!(
            r.as_str().unwrap().starts_with(&admin),
            "external request: {r}"
        );
    }
    assert!(
        !v["console"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("Content Security Policy")),
        "{v}"
    );
}
