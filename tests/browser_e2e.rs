//! The headless-Chromium walk: a real browser (Debian's chromium, driven by
//! puppeteer-core in tests/js/walk.mjs, no browser download), a real IdP
//! (oidc-provider, tests/js/idp.mjs), the proxy with two browser routes and
//! a recording upstream. Login → the protected page (the app receives the
//! signed assertion: the person's `sub`, password `acr`) → a page whose
//! policy demands step-up → back to the IdP with `acr_values`, `max_age`
//! and `prompt=login` → back on the page with the higher `acr` (in the
//! app's view) → logout (POST; cookie cleared) → the next request goes to
//! log in again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::idp::{
    ACR_MFA, ACR_PWD, Idp, IdpClient, IdpConfig, assert_logs_clean, capture_logs, js_dir,
    query_param,
};
use common::{Seen, TestPki, Upstream};
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};

/// The whole walk (every wait inside it is bounded by 20 s).
const WALK_DEADLINE: Duration = Duration::from_secs(150);
const PROXY_ISS: &str = "https://portcullis.test";
const APP_AUD: &str = "https://app.test";
const PAYROLL_AUD: &str = "https://payroll.test";
const SECRET: &str = "s3cret-for-the-browser-walk";

/// `app`: any signed-in person. `payroll`: multi-factor within 5 minutes.
const POLICIES: &str = r#"
@id("app-signed-in")
@reason("any signed-in person")
permit (principal is User, action, resource == App::"app");

@id("payroll-mfa")
@action("step_up")
@acr("urn:pc:mfa")
@max_age("300")
@reason("payroll needs a recent multi-factor sign-in")
permit (principal is User, action, resource == App::"payroll");
"#;

/// Runs `node walk.mjs PLAN` off the runtime (which keeps serving the
/// proxy), bounded by [`WALK_DEADLINE`]; returns (exit ok, stdout, stderr).
async fn run_walk(plan: &Value, dir: &std::path::Path) -> (bool, String, String) {
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec_pretty(plan).unwrap()).unwrap();
    let (out_path, err_path) = (dir.join("walk.stdout"), dir.join("walk.stderr"));
    let mut child = Command::new("node")
        .arg(js_dir().join("walk.mjs"))
        .arg(&plan_path)
        .current_dir(js_dir())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn node (nodejs is installed by scripts/test.sh)");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > WALK_DEADLINE {
            // Off the runtime: ending it can take seconds.
            let _ = tokio::task::spawn_blocking(move || {
                common::end_browser_script(&mut child, Duration::ZERO);
            })
            .await;
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut err = read(&err_path);
    if status.is_none() {
        err.push_str(&format!("\n(walk killed after {WALK_DEADLINE:?})"));
    }
    (status.is_some_and(|s| s.success()), read(&out_path), err)
}

/// Verifies an assertion with `jose` (tests/js/verify-assertion.mjs)
/// against the JWKS the proxy publishes; returns its payload.
async fn jose_verify(jwks_url: &str, ca: &std::path::Path, jwt: &str, aud: &str) -> Value {
    let (url, ca, jwt, aud) = (
        jwks_url.to_owned(),
        ca.to_owned(),
        jwt.to_owned(),
        aud.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        let dir = js_dir();
        let mut child = Command::new("node")
            .arg(dir.join("verify-assertion.mjs"))
            .args([&url, PROXY_ISS, &aud])
            .current_dir(&dir)
            .env("NODE_EXTRA_CA_CERTS", &ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(jwt.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "jose refused the assertion: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["payload"].clone()
    })
    .await
    .unwrap()
}

fn assertion(s: &Seen) -> String {
    s.headers
        .get("x-portcullis-assertion")
        .unwrap_or_else(|| panic!("no assertion on {}", s.path))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn headless_chromium_walks_login_step_up_and_logout() {
    capture_logs();
    let pki = TestPki::new();
    let app = Upstream::start().await;
    let idp = Idp::start(
        IdpConfig::new()
            .set("acr_values", json!([ACR_PWD, ACR_MFA]))
            .account(
                "alice",
                json!({"email": "alice@corp.test", "name": "Alice Walker"}),
            ),
    )
    .await;
    let policies = pki.policy_dir("walk.cedar", POLICIES);
    let key = SigningKey::es256("walk-1").unwrap();
    std::fs::write(pki.path().join("assert.pem"), &key.private_pem).unwrap();
    std::fs::write(pki.path().join("client-secret"), SECRET).unwrap();
    let (issuer, discovery, upstream) = (&idp.issuer, idp.discovery_url(), app.url());
    let db = pki.path().join("p.db").display().to_string();
    let policies = policies.display();
    let cfg = pki.write_config(
        "p.toml",
        &format!(
            r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"

[store]
path = "{db}"

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[policy]
dir = "{policies}"
decision_cache_ttl_ms = 0

[[issuers]]
name = "idp"
issuer = "{issuer}"
audiences = ["https://api.test"]
algorithms = ["ES256"]
discovery_url = "{discovery}"
min_refresh_interval_s = 0

[browser]
issuer = "idp"
client_id = "walk"
client_secret_file = "client-secret"

[assertion]
issuer = "{PROXY_ISS}"
active_kid = "walk-1"
reuse_s = 0

[[assertion.keys]]
kid = "walk-1"
private_key_file = "assert.pem"

[[routes]]
name = "app"
path_prefix = "/app"
upstream = "{upstream}"
auth = "browser"
assertion_audience = "{APP_AUD}"

[[routes]]
name = "payroll"
path_prefix = "/payroll"
upstream = "{upstream}"
auth = "browser"
sensitivity = "high"
assertion_audience = "{PAYROLL_AUD}"
"#
        ),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    let base = format!("https://localhost:{}", server.proxy_addr.port());
    idp.register(
        IdpClient::secret_basic("walk", SECRET, &format!("{base}/.portcullis/callback"))
            .with("post_logout_redirect_uris", json!([format!("{base}/")])),
    )
    .await;

    let plan = json!({
        "protected_url": format!("{base}/app/"),
        "step_up_url": format!("{base}/payroll/"),
        "logout_url": format!("{base}/.portcullis/logout"),
        // The proxy's own sign-out page cannot POST to the IdP-bound logout
        // under its CSP `form-action 'self'` (Chromium blocks the redirect);
        // the walk signs out from the app's page instead, as apps do.
        "logout_from": "app",
        "account": "alice",
        "acr": ACR_PWD,
        // No step_up_acr: the IdP's own choice, the acr_values the proxy asked for.
        "chromium": "/usr/bin/chromium",
        "ignore_certificate_errors": true,
        "timeout_ms": 20_000,
    });
    let (ok, stdout, stderr) = run_walk(&plan, pki.path()).await;
    let report = || {
        format!(
            "walk stdout:\n{stdout}\nwalk stderr:\n{stderr}\nIdP stderr:\n{}",
            idp.stderr()
        )
    };
    assert!(ok, "the walk failed\n{}", report());
    let out: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("walk output: {e}\n{}", report()));
    let steps = out["steps"].as_array().unwrap();
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name}\n{}", report()))
    };

    // 1. Login: the IdP's form, then the page, served by the app.
    assert!(
        step("redirected-to-idp")["url"]
            .as_str()
            .unwrap()
            .starts_with(issuer.as_str())
    );
    let page = step("protected-page");
    assert_eq!(page["url"], format!("{base}/app/"), "{}", report());
    assert_eq!(page["status"], 200, "{}", report());
    assert_eq!(step("session-reused")["status"], 200);
    let seen: Vec<Seen> = app.seen.lock().unwrap().clone();
    let on_app: Vec<&Seen> = seen.iter().filter(|s| s.path == "/app/").collect();
    assert_eq!(
        on_app.len(),
        3,
        "the page, again on the same session, and before logout"
    );
    let jwks = format!("{base}/.well-known/portcullis/jwks.json");
    let ca = pki.path().join("ca.pem");
    for s in &on_app[..2] {
        let c = jose_verify(&jwks, &ca, &assertion(s), APP_AUD).await;
        assert_eq!(c["sub"], "alice", "{c}");
        assert_eq!(c["acr"], ACR_PWD, "{c}");
        assert_eq!(c["amr"], json!(["pwd"]), "{c}");
        assert_eq!(c["auth"], "browser", "{c}");
        assert_eq!(c["binding"], "none", "{c}");
        assert_eq!(c["decision"], "allow", "{c}");
    }

    // 2. Step-up: the proxy sent the browser to the IdP asking for MFA now…
    let navs: Vec<&str> = out["navigations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let authorizations: Vec<&str> = navs
        .iter()
        .copied()
        .filter(|u| u.starts_with(&format!("{issuer}/auth?")))
        .collect();
    assert!(authorizations.len() >= 3, "{navs:?}");
    let first = authorizations[0];
    assert_eq!(query_param(first, "acr_values"), None);
    assert_eq!(query_param(first, "prompt"), None);
    let step_up = authorizations
        .iter()
        .find(|u| query_param(u, "acr_values").is_some())
        .unwrap_or_else(|| panic!("no step-up authorization: {navs:?}"));
    assert_eq!(query_param(step_up, "acr_values").as_deref(), Some(ACR_MFA));
    assert_eq!(query_param(step_up, "max_age").as_deref(), Some("300"));
    assert_eq!(query_param(step_up, "prompt").as_deref(), Some("login"));
    assert_eq!(
        query_param(step_up, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert!(
        step("step-up-at-idp")["url"]
            .as_str()
            .unwrap()
            .contains("/interaction/")
    );
    // …and the browser is back on the page with the higher acr, in the
    // app's view. The app never saw payroll before the step-up.
    let payroll = step("stepped-up-page");
    assert_eq!(payroll["url"], format!("{base}/payroll/"), "{}", report());
    assert_eq!(payroll["status"], 200);
    let seen: Vec<Seen> = app.seen.lock().unwrap().clone();
    let on_payroll: Vec<&Seen> = seen.iter().filter(|s| s.path == "/payroll/").collect();
    assert_eq!(on_payroll.len(), 1, "payroll only once stepped up");
    let c = jose_verify(&jwks, &ca, &assertion(on_payroll[0]), PAYROLL_AUD).await;
    assert_eq!(c["sub"], "alice", "{c}");
    assert_eq!(c["acr"], ACR_MFA, "{c}");
    assert_eq!(c["amr"], json!(["pwd", "otp"]), "{c}");
    assert_eq!(c["route"], "payroll", "{c}");
    assert_eq!(c["auth"], "browser", "{c}");
    // The stepped-up session serves the other route too.
    let c = jose_verify(&jwks, &ca, &assertion(on_app[2]), APP_AUD).await;
    assert_eq!(c["acr"], ACR_MFA, "{c}");
    for s in on_app.iter().chain(&on_payroll) {
        let cookies = s
            .headers
            .get("cookie")
            .map(|c| c.to_str().unwrap())
            .unwrap_or("");
        assert!(!cookies.contains("portcullis-login"), "{cookies}");
    }

    // The session cookie as the browser holds it.
    let cookies = out["cookies"].as_array().unwrap();
    let session = cookies
        .iter()
        .find(|c| c["name"] == "__Host-portcullis-session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["secure"], true);
    assert_eq!(session["sameSite"], "Lax");
    assert_eq!(session["path"], "/");
    assert!(
        !cookies
            .iter()
            .any(|c| c["name"] == "__Host-portcullis-login"),
        "the login cookie is gone after login: {cookies:?}"
    );

    // 3. Logout: a POST from the proxy's page, the cookie cleared, the
    // record gone; the next request goes to log in again.
    assert_eq!(step("logout-page")["status"], 200);
    let after = out["cookies_after_logout"].as_array().unwrap();
    assert!(
        !after
            .iter()
            .any(|c| c["name"] == "__Host-portcullis-session"),
        "{after:?}"
    );
    assert_eq!(server.shared.posture.snapshot().session_count(), 0);
    let again = step("after-logout");
    assert!(
        again["url"].as_str().unwrap().contains("/interaction/"),
        "{}",
        report()
    );
    let seen_after = app.seen.lock().unwrap().len();
    assert_eq!(seen_after, on_app.len() + on_payroll.len());
    assert!(!idp.stderr().contains("server_error"), "{}", idp.stderr());
    assert_logs_clean(&[]);
}
