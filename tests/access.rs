//! The access picture end to end: real feed events (SCIM, the generic MDM
//! event, the admin API) sent to a running proxy, real requests through it,
//! and the findings read back from `GET /admin/v1/access` — one test per
//! finding, plus filters, the JSON/CSV/table shapes, the CLI, and the
//! memory surviving a restart.
//!
//! The policy set here permits everything: the findings are about access
//! the policies let through (or credentials still presented after an
//! event), so the proxy must not hide the stale state behind its baseline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

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
const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const MDM_SECRET: &str = "mdm-secret-0123456789abcdef";
const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

struct Env {
    pki: TestPki,
    _upstream: Upstream,
    key: SigningKey,
    cfg: std::path::PathBuf,
    server: Option<portcullis::server::RunningServer>,
    http: Client<HttpConnector, Full<Bytes>>,
}

fn config_text(pki: &TestPki, upstream: &Upstream, access: &str) -> String {
    let u = upstream.url();
    let mut routes = String::new();
    for (name, sens) in [("app", "medium"), ("payroll", "critical")] {
        routes.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{u}\"\nsensitivity = \"{sens}\"\nauth = \"bearer\"\n\n"
        ));
    }
    let pol = pki.policy_dir(
        "open.cedar",
        "@id(\"open\")\npermit (principal, action, resource);\n",
    );
    base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replace(
            "[log]",
            &format!(
                r#"[policy]
dir = "{pol}"

[feeds.scim]
token = "{SCIM_TOKEN}"
subject_attribute = "userName"

[feeds.scim.group_entitlements]
"Payroll" = ["payroll:read"]

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"

[access]
flush_interval_ms = 100
{access}

[log]"#,
                pol = pol.display()
            ),
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
        )
}

impl Env {
    async fn start(access: &str) -> Self {
        let pki = TestPki::new();
        let upstream = Upstream::start().await;
        let key = SigningKey::es256("user-1").unwrap();
        std::fs::write(
            pki.path().join("jwks.json"),
            json!({"keys": [key.jwk]}).to_string(),
        )
        .unwrap();
        let cfg = pki.write_config("p.toml", &config_text(&pki, &upstream, access));
        let server = portcullis::server::start(cfg.clone()).await.unwrap();
        Self {
            pki,
            _upstream: upstream,
            key,
            cfg,
            server: Some(server),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn server(&self) -> &portcullis::server::RunningServer {
        self.server.as_ref().unwrap()
    }

    async fn restart(&mut self) {
        self.http = Client::builder(TokioExecutor::new()).build_http();
        self.server.take().unwrap().shutdown().await;
        self.server = Some(portcullis::server::start(self.cfg.clone()).await.unwrap());
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        ct: &str,
        body: String,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server().admin_addr))
            .header("content-type", ct);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let resp = tokio::time::timeout(
            DEADLINE,
            self.http
                .request(b.body(Full::new(Bytes::from(body))).unwrap()),
        )
        .await
        .expect("admin request timed out")
        .expect("admin request failed");
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    async fn scim(&self, method: Method, path: &str, body: Value) -> Value {
        let (st, _, b) = self
            .send(
                method,
                &format!("/scim/v2{path}"),
                Some(SCIM_TOKEN),
                "application/scim+json",
                body.to_string(),
            )
            .await;
        assert!(
            st.is_success(),
            "{path}: {st} {}",
            String::from_utf8_lossy(&b)
        );
        serde_json::from_slice(&b).unwrap_or(Value::Null)
    }

    async fn user(&self, user_name: &str, extra: Value) -> String {
        let mut u = json!({ "schemas": [USER, ENTERPRISE], "userName": user_name, "active": true });
        for (k, v) in extra.as_object().unwrap() {
            u[k] = v.clone();
        }
        self.scim(Method::POST, "/Users", u).await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn deactivate(&self, id: &str) {
        self.scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            json!({ "schemas": [PATCH_OP], "Operations": [{ "op": "replace", "path": "active", "value": false }] }),
        )
        .await;
    }

    /// Sends one generic MDM event; returns its event id.
    async fn mdm(&self, id: &str, device: &str, fields: Value) -> String {
        let mut ev = json!({
            "event_id": id, "device_id": device,
            "occurred_at": portcullis::util::now_unix_ms(),
        });
        for (k, v) in fields.as_object().unwrap() {
            ev[k] = v.clone();
        }
        let (st, _, b) = self
            .send(
                Method::POST,
                "/mdm/v1/acme/events",
                Some(MDM_SECRET),
                "application/json",
                ev.to_string(),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
        id.to_owned()
    }

    /// A token for `sub` on `device`, issued `iat_offset_s` from now.
    fn token(&self, sub: &str, device: &str, iat_offset_s: i64, client_id: Option<&str>) -> String {
        let mut c = claims(ISS, sub);
        let iat = (portcullis::util::now_unix() as i64 + iat_offset_s) as u64;
        c["iat"] = iat.into();
        c["nbf"] = iat.min(portcullis::util::now_unix()).into();
        c["device_id"] = device.into();
        if let Some(id) = client_id {
            c["client_id"] = id.into();
        }
        self.key.sign(&c).unwrap()
    }

    /// One proxied GET; returns the status and the request id.
    async fn request(&self, path: &str, token: &str) -> (StatusCode, String) {
        let c = client(&self.pki.ca_pem, false);
        let url = format!(
            "https://localhost:{}{path}",
            self.server().proxy_addr.port()
        );
        let (st, h, _) = get(&c, &url, Some(token), &[]).await;
        let id = h
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (st, id)
    }

    async fn report_raw(&self, query: &str) -> (StatusCode, http::HeaderMap, Bytes) {
        self.send(
            Method::GET,
            &format!("/admin/v1/access?{query}"),
            Some(ADMIN_TOKEN),
            "application/json",
            String::new(),
        )
        .await
    }

    async fn report(&self, query: &str) -> Value {
        let (st, _, b) = self.report_raw(query).await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        serde_json::from_slice(&b).unwrap()
    }

    /// The findings of one kind.
    async fn findings(&self, kind: &str) -> Vec<Value> {
        self.report(&format!("finding={kind}")).await["findings"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The event ids the admin API lists for a record, newest first.
    async fn event_ids(&self, kind: &str, key: &str) -> Vec<String> {
        let (st, _, b) = self
            .send(
                Method::GET,
                &format!("/admin/v1/{kind}/{key}"),
                Some(ADMIN_TOKEN),
                "application/json",
                String::new(),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"]["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn leaver_whose_token_is_still_presented_after_termination() {
    let e = Env::start("").await;
    let id = e.user("lea@example.com", json!({})).await;
    let t = e.token("lea@example.com", "lea-mac", -30, None);
    let (st, _) = e.request("/app/x", &t).await;
    assert_eq!(st, StatusCode::OK);
    assert!(e.findings("leaver_access").await.is_empty());

    e.deactivate(&id).await;
    let (st, after) = e.request("/app/x", &t).await;
    assert!(
        st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN,
        "{st}"
    );
    let f = e.findings("leaver_access").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["subject"], "lea@example.com");
    // Refused by the revocation: still worth a look, not an open door.
    assert_eq!(f[0]["severity"], "medium");
    assert!(
        strs(&f[0]["evidence"]["request_ids"]).contains(&after),
        "{f:?}"
    );
    let events = e.event_ids("subjects", "lea@example.com").await;
    let cited = strs(&f[0]["evidence"]["event_ids"]);
    assert!(
        !cited.is_empty() && cited.iter().all(|c| events.contains(c)),
        "{cited:?} vs {events:?}"
    );
    assert!(f[0]["fix"].as_str().unwrap().len() > 10);
    assert!(
        f[0]["evidence"]["times"][0]
            .as_str()
            .unwrap()
            .starts_with("terminated: ")
    );
}

#[tokio::test]
async fn lost_device_with_access_after_the_event() {
    let e = Env::start("").await;
    let (st, _, _) = e
        .send(
            Method::POST,
            "/admin/v1/devices/dev-lost/lost",
            Some(ADMIN_TOKEN),
            "application/json",
            String::new(),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    // A token the IdP issued after the loss (the revocation only covers older ones),
    // and a policy set that lets it through.
    let t = e.token("dan", "dev-lost", 2, None);
    let (st, rid) = e.request("/app/x", &t).await;
    assert_eq!(st, StatusCode::OK);
    let f = e.findings("dead_device_access").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["device"], "dev-lost");
    assert_eq!(f[0]["severity"], "critical");
    assert_eq!(strs(&f[0]["routes"]), vec!["app"]);
    assert!(strs(&f[0]["evidence"]["request_ids"]).contains(&rid));
    let events = e.event_ids("devices", "dev-lost").await;
    assert!(
        events.contains(&strs(&f[0]["evidence"]["event_ids"])[0]),
        "{f:?}"
    );
}

#[tokio::test]
async fn noncompliant_device_whose_user_keeps_critical_entitlements() {
    let e = Env::start("").await;
    let uid = e.user("pat@example.com", json!({})).await;
    e.scim(
        Method::POST,
        "/Groups",
        json!({ "schemas": [GROUP], "displayName": "Payroll", "members": [{ "value": uid }] }),
    )
    .await;
    let ev = e
        .mdm(
            "nc-1",
            "pat-laptop",
            json!({ "compliance": "non_compliant", "lifecycle": "enrolled", "subjects": ["pat@example.com"] }),
        )
        .await;
    let t = e.token("pat@example.com", "pat-laptop", -10, None);
    let (st, rid) = e.request("/payroll/run", &t).await;
    assert_eq!(st, StatusCode::OK);
    let f = e.findings("posture_without_permission_change").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["subject"], "pat@example.com");
    assert_eq!(f[0]["device"], "pat-laptop");
    assert_eq!(f[0]["severity"], "high");
    assert!(strs(&f[0]["evidence"]["request_ids"]).contains(&rid));
    assert!(
        strs(&f[0]["evidence"]["event_ids"])
            .iter()
            .any(|x| x.contains(&ev)),
        "{f:?}"
    );
    assert!(f[0]["summary"].as_str().unwrap().contains("payroll:read"));
}

#[tokio::test]
async fn mover_whose_old_token_still_works() {
    let e = Env::start("").await;
    let uid = e.user("mo@example.com", json!({})).await;
    let old = e.token("mo@example.com", "mo-mac", -30, None);
    assert_eq!(e.request("/app/a", &old).await.0, StatusCode::OK);
    assert!(e.findings("mover_stale_tokens").await.is_empty());
    e.scim(
        Method::POST,
        "/Groups",
        json!({ "schemas": [GROUP], "displayName": "Payroll", "members": [{ "value": uid }] }),
    )
    .await;
    let (st, rid) = e.request("/app/b", &old).await;
    assert_eq!(st, StatusCode::OK);
    let f = e.findings("mover_stale_tokens").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["subject"], "mo@example.com");
    assert!(strs(&f[0]["evidence"]["request_ids"]).contains(&rid));
    assert!(!strs(&f[0]["evidence"]["credentials"]).is_empty());
    let events = e.event_ids("subjects", "mo@example.com").await;
    assert!(events.contains(&strs(&f[0]["evidence"]["event_ids"])[0]));
    // A token issued after the move is not stale.
    let fresh = e.token("mo@example.com", "mo-mac", 1, None);
    assert_eq!(e.request("/app/c", &fresh).await.0, StatusCode::OK);
    assert_eq!(
        e.findings("mover_stale_tokens").await[0]["evidence"]["credentials"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn workload_whose_owner_left_with_an_old_credential_on_a_lost_device() {
    let e = Env::start("credential_max_age_days = 30").await;
    let owner = e.user("olga@example.com", json!({})).await;
    e.user(
        "svc-report",
        json!({ "userType": "Workload", ENTERPRISE: { "manager": { "value": owner } } }),
    )
    .await;
    // A client-credentials token (sub = client_id) issued 100 days ago.
    let t = e.token(
        "svc-report",
        "build-host",
        -100 * 86_400,
        Some("svc-report"),
    );
    let (st, rid) = e.request("/app/report", &t).await;
    assert_eq!(st, StatusCode::OK);
    let r = e.report("subject=svc-report").await;
    assert_eq!(r["subjects"][0]["kind"], "workload");
    assert_eq!(r["subjects"][0]["owner"], owner);
    let old = e.findings("workload_credential_old").await;
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(strs(&old[0]["evidence"]["request_ids"]).contains(&rid));
    assert!(e.findings("workload_owner_left").await.is_empty());

    e.deactivate(&owner).await;
    let f = e.findings("workload_owner_left").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["subject"], "svc-report");
    let events = e.event_ids("subjects", "olga@example.com").await;
    assert!(events.contains(&strs(&f[0]["evidence"]["event_ids"])[0]));

    e.mdm("lost-bh", "build-host", json!({ "lifecycle": "lost" }))
        .await;
    let f = e.findings("workload_on_dead_device").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["device"], "build-host");
    assert!(
        strs(&f[0]["evidence"]["event_ids"])
            .iter()
            .any(|x| x.contains("lost-bh"))
    );
}

#[tokio::test]
async fn contractor_past_the_end_date() {
    let e = Env::start("").await;
    e.user(
        "cora@example.com",
        json!({ "userType": "Contractor", ENTERPRISE: { "endDate": "2024-01-31" } }),
    )
    .await;
    e.user(
        "carl@example.com",
        json!({ "userType": "Contractor", ENTERPRISE: { "endDate": "2999-01-31" } }),
    )
    .await;
    let (st, rid) = e
        .request("/app/x", &e.token("cora@example.com", "c1", -5, None))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        e.request("/app/x", &e.token("carl@example.com", "c2", -5, None))
            .await
            .0,
        StatusCode::OK
    );
    let f = e.findings("contractor_past_end").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["subject"], "cora@example.com");
    assert_eq!(f[0]["severity"], "high");
    assert!(strs(&f[0]["evidence"]["request_ids"]).contains(&rid));
    assert!(
        f[0]["evidence"]["times"][0]
            .as_str()
            .unwrap()
            .contains("2024-01-31")
    );
    let r = e.report("subject=cora@example.com").await;
    assert_eq!(r["subjects"][0]["kind"], "contractor");
}

#[tokio::test]
async fn shared_device_with_several_active_users() {
    let e = Env::start("shared_device_threshold = 3").await;
    e.mdm(
        "kiosk-enrol",
        "kiosk-7",
        json!({ "lifecycle": "enrolled", "compliance": "compliant" }),
    )
    .await;
    let mut ids = Vec::new();
    for u in ["ana", "ben"] {
        ids.push(e.request("/app/", &e.token(u, "kiosk-7", -1, None)).await.1);
    }
    assert!(e.findings("shared_device").await.is_empty());
    ids.push(
        e.request("/app/", &e.token("cat", "kiosk-7", -1, None))
            .await
            .1,
    );
    let f = e.findings("shared_device").await;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["device"], "kiosk-7");
    let mut cited = strs(&f[0]["evidence"]["request_ids"]);
    cited.sort();
    ids.sort();
    assert_eq!(cited, ids);
}

#[tokio::test]
async fn feed_silent_beyond_its_expected_interval() {
    let e = Env::start("[access.feed_intervals]\nmdm = 1\nscim = 86400").await;
    let ev = e
        .mdm("hb-1", "hb-dev", json!({ "compliance": "compliant" }))
        .await;
    let deadline = std::time::Instant::now() + DEADLINE;
    let f = loop {
        let f = e.findings("feed_silent").await;
        if !f.is_empty() {
            break f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no feed_silent finding"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // Only mdm: scim's interval is a day.
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["feed"], "mdm");
    assert!(strs(&f[0]["evidence"]["event_ids"])[0].contains(&ev));
    let r = e.report("").await;
    let mdm = r["feeds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["feed"] == "mdm")
        .unwrap()
        .clone();
    assert_eq!(mdm["silent"], true);
    assert_eq!(mdm["events"], 1);
    assert_eq!(mdm["expected_interval_s"], 1);
}

// The CLI child talks to this process's admin listener: more than one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_shapes_cli_and_restart() {
    let mut e = Env::start("").await;
    e.user("fay@example.com", json!({ "department": "Ops" }))
        .await;
    let (_, r1) = e
        .request("/app/x", &e.token("fay@example.com", "fay-mac", -5, None))
        .await;
    e.request("/payroll/x", &e.token("gus", "gus-pc", -5, None))
        .await;

    let all = e.report("").await;
    for k in [
        "generated_at",
        "snapshot_version",
        "subjects",
        "findings",
        "feeds",
        "memory",
    ] {
        assert!(all.get(k).is_some(), "missing {k}: {all}");
    }
    let fay = all["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == "fay@example.com")
        .unwrap();
    assert_eq!(fay["kind"], "person");
    assert_eq!(fay["status"], "active");
    assert_eq!(fay["routes"][0]["route"], "app");
    assert_eq!(fay["routes"][0]["decision"], "allow");
    assert_eq!(fay["routes"][0]["last_request"], r1.as_str());
    assert_eq!(fay["devices"][0]["id"], "fay-mac");
    let tok = &fay["tokens"][0];
    assert_eq!(tok["hash"].as_str().unwrap().len(), 64);
    assert!(tok["iat_s"].as_u64().is_some() && tok["exp_s"].as_u64().is_some());
    // The token itself is nowhere in the picture.
    assert!(!all.to_string().contains("eyJ"));
    let gus = all["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == "gus")
        .unwrap();
    assert_eq!(gus["status"], "unknown");

    let by = |q: &'static str| {
        let e = &e;
        async move {
            let r = e.report(q).await;
            r["subjects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["subject"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by("subject=fay%40example.com").await,
        vec!["fay@example.com"]
    );
    assert_eq!(by("device=gus-pc").await, vec!["gus"]);
    assert_eq!(by("route=payroll").await, vec!["gus"]);
    // Filters that match nothing: an empty picture, not an error.
    for q in [
        "subject=nobody",
        "device=none",
        "route=nowhere",
        "finding=leaver_access",
        "finding=not_a_kind",
    ] {
        let r = e.report(q).await;
        assert_eq!(r["subjects"], json!([]), "{q}");
        assert_eq!(r["findings"], json!([]), "{q}");
    }
    // A typo is refused rather than silently widening the picture.
    assert_eq!(e.report_raw("subjet=fay").await.0, StatusCode::BAD_REQUEST);
    // Operator token required.
    let (st, _, _) = e
        .send(
            Method::GET,
            "/admin/v1/access",
            None,
            "application/json",
            String::new(),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    let (st, h, csv) = e.report_raw("format=csv&route=app").await;
    assert_eq!(st, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = String::from_utf8(csv.to_vec()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], portcullis::access::report::CSV_HEADER);
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(
        lines[1].starts_with("fay@example.com,person,active,fay-mac,"),
        "{csv}"
    );
    assert!(lines[1].contains(&r1));

    // The CLI reads the same picture through the admin API.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(binary())
            .arg("access-report")
            .arg("--config")
            .arg(&e.cfg)
            .arg("--admin")
            .arg(e.server().admin_addr.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&[]);
    assert!(table.starts_with("SUBJECT"), "{table}");
    assert!(
        table.contains("fay@example.com") && table.contains("gus"),
        "{table}"
    );
    assert!(
        table.contains("FINDINGS") && table.contains("FEEDS"),
        "{table}"
    );
    let json_out: Value =
        serde_json::from_str(&run(&["--format", "json", "--subject", "gus"])).unwrap();
    assert_eq!(json_out["subjects"].as_array().unwrap().len(), 1);
    assert_eq!(
        run(&["--format", "csv", "--device", "nothing"])
            .lines()
            .count(),
        1
    );

    // The memory is durable: a restart brings the rows back from the store.
    e.restart().await;
    let r = e.report("subject=fay%40example.com").await;
    assert_eq!(r["subjects"][0]["routes"][0]["last_request"], r1.as_str());
    assert_eq!(r["subjects"][0]["tokens"].as_array().unwrap().len(), 1);
}

#[test]
fn check_names_the_access_key_that_is_wrong() {
    let pki = TestPki::new();
    pki.issuer_key("k1");
    let routes =
        "[[routes]]\nname = \"app\"\nupstream = \"http://127.0.0.1:9\"\nauth = \"bearer\"\n";
    let base = base_config(ISS, r#"jwks_file = "jwks.json""#, routes);
    for (name, access, needle) in [
        (
            "threshold.toml",
            "shared_device_threshold = 1",
            "access.shared_device_threshold",
        ),
        (
            "feed.toml",
            "[access.feed_intervals]\nkandji = 60",
            "access.feed_intervals.kandji",
        ),
        ("bound.toml", "max_entries = 0", "access.max_entries"),
        ("typo.toml", "max_entrys = 5", "max_entrys"),
    ] {
        let body = base.replace("[log]", &format!("[access]\n{access}\n\n[log]"));
        let p = pki.write_config(name, &body);
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{name}: check passed: {text}");
        assert!(
            text.contains(needle),
            "{name}: `{needle}` not named: {text}"
        );
    }
}
