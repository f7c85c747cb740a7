//! Policy as code through the real proxy: real TLS, real signed tokens, the
//! real upstream, the shipped default policy set, and state set through the
//! generic MDM event, the admin API and the one apply path (identity records
//! that SCIM will provision). Every row of the default mapping, the exact
//! RFC 9470 challenge, restrict, a session cut at its cap, revocation across
//! routes, the decision cache, audit + replay, shadow mode, hot reload,
//! explain, and the CLI (`policy test`, `check` on a broken policy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use portcullis::demo::pki::SigningKey;
use portcullis::posture::event::{Change, Feed, IdentityPatch, PostureEvent};
use portcullis::posture::model::{IdentityKind, IdentityStatus};

const ISS: &str = "https://idp.test";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";
const MDM_SECRET: &str = "mdm-secret-0123456789";
const MFA: &str = "urn:portcullis:acr:mfa";

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies")
}

fn uniq() -> String {
    portcullis::util::RequestIds::default().next_id()
}

struct Env {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    key: SigningKey,
}

/// `policy` is the body of the `[policy]` table (without `dir`, given separately).
async fn env_with(dir: &Path, policy: &str) -> Env {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = SigningKey::es256("user-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({"keys": [key.jwk]}).to_string(),
    )
    .unwrap();
    let u = upstream.url();
    let mut routes = String::new();
    for (name, sens) in [
        ("low", "low"),
        ("app", "medium"),
        ("high", "high"),
        ("crit", "critical"),
    ] {
        routes.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{u}\"\nsensitivity = \"{sens}\"\nauth = \"bearer\"\n\n"
        ));
    }
    routes.push_str(&format!(
        "[[routes]]\nname = \"svc\"\npath_prefix = \"/svc\"\nupstream = \"{u}\"\nauth = \"bearer\"\nworkloads = [\"reporting-client\"]\n"
    ));
    let text = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replace(
            "[log]",
            &format!(
                "[policy]\ndir = \"{}\"\n{policy}\n\n[[network.zones]]\nname = \"loopback\"\ncidrs = [\"127.0.0.0/8\", \"::1\"]\n\n[[feeds.mdm]]\nname = \"acme\"\nsecret = \"{MDM_SECRET}\"\n\n[log]",
                dir.display()
            ),
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
        );
    let cfg = pki.write_config("p.toml", &text);
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        upstream,
        server,
        key,
    }
}

async fn env() -> Env {
    env_with(&policies_dir(), "").await
}

fn plain() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn admin_send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: String,
) -> (StatusCode, serde_json::Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {auth}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, plain().request(req))
        .await
        .unwrap()
        .unwrap();
    let st = resp.status();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&b).unwrap_or_default())
}

struct Resp {
    status: StatusCode,
    headers: http::HeaderMap,
    body: serde_json::Value,
}

impl Env {
    /// A token for `sub` on `device`, with extra claims.
    fn token_with(&self, sub: &str, device: Option<&str>, extra: serde_json::Value) -> String {
        let mut c = claims(ISS, sub);
        c["jti"] = format!("tok-{}", uniq()).into();
        match device {
            Some(d) => c["device_id"] = d.into(),
            None => {
                c.as_object_mut().unwrap().remove("device_id");
            }
        }
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        self.key.sign(&c).unwrap()
    }

    fn token(&self, sub: &str, device: &str) -> String {
        self.token_with(sub, Some(device), serde_json::json!({}))
    }

    /// A token whose user just did multi-factor authentication.
    fn mfa_token(&self, sub: &str, device: &str) -> String {
        let now = portcullis::util::now_unix();
        self.token_with(
            sub,
            Some(device),
            serde_json::json!({"acr": MFA, "auth_time": now}),
        )
    }

    async fn call(&self, method: &str, path: &str, token: &str) -> Resp {
        let c = client(&self.pki.ca_pem, false);
        let req = http::Request::builder()
            .method(method)
            .uri(format!(
                "https://localhost:{}{path}",
                self.server.proxy_addr.port()
            ))
            .header("authorization", format!("Bearer {token}"))
            .body(full(if method == "GET" { "" } else { "{}" }))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, c.request(req))
            .await
            .unwrap()
            .unwrap();
        let (parts, body) = resp.into_parts();
        let b = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&b).unwrap_or_default(),
        }
    }

    async fn get(&self, path: &str, token: &str) -> Resp {
        self.call("GET", path, token).await
    }

    /// Posts a generic MDM device event; `fields` are merged into it.
    async fn mdm(&self, device: &str, fields: serde_json::Value) {
        let now = portcullis::util::now_unix_ms();
        let mut ev = serde_json::json!({
            "event_id": uniq(), "device_id": device, "occurred_at": now,
            "last_check_in": now,
        });
        for (k, v) in fields.as_object().unwrap() {
            ev[k] = v.clone();
        }
        let (st, body) = admin_send(
            self.server.admin_addr,
            "POST",
            "/mdm/v1/acme/events",
            MDM_SECRET,
            ev.to_string(),
        )
        .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    }

    /// A managed, compliant corporate laptop.
    async fn healthy(&self, device: &str) {
        self.mdm(
            device,
            serde_json::json!({"lifecycle": "enrolled", "compliance": "compliant", "ownership": "corporate", "patch_behind": false, "compromised": false}),
        )
        .await;
    }

    /// Writes an identity record through the one apply path (what SCIM
    /// provisioning does).
    async fn identity(&self, subject: &str, patch: IdentityPatch) {
        let ev = PostureEvent {
            id: format!("test:{}", uniq()),
            feed: Feed::Scim,
            kind: "scim.user".into(),
            origin_ms: portcullis::util::now_unix_ms(),
            changes: vec![Change::Identity {
                subject: subject.into(),
                patch,
            }],
        };
        self.server.shared.posture.ingest(vec![ev]).await.unwrap();
    }

    async fn admin(&self, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
        admin_send(
            self.server.admin_addr,
            method,
            path,
            ADMIN_TOKEN,
            String::new(),
        )
        .await
    }

    async fn metrics(&self) -> String {
        let r = plain()
            .get(
                format!("http://{}/metrics", self.server.admin_addr)
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }
}

fn www(r: &Resp) -> String {
    r.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn row1_managed_compliant_device_is_allowed_everywhere() {
    let e = env().await;
    e.healthy("mac-1").await;
    let t = e.token("alice", "mac-1");
    for path in ["/low/x", "/app/x", "/high/x", "/crit/x"] {
        let r = e.get(path, &t).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert_eq!(e.upstream.last().headers["x-portcullis-decision"], "allow");
    }
    let r = e.call("POST", "/crit/pay", &t).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn row2_noncompliant_restricts_steps_up_and_denies_by_sensitivity() {
    let e = env().await;
    e.healthy("mac-2").await;
    let t = e.token("bob", "mac-2");
    assert_eq!(e.call("POST", "/app/doc", &t).await.status, StatusCode::OK);

    e.mdm("mac-2", serde_json::json!({"compliance": "non_compliant"}))
        .await;
    // Restrict on medium: GET passes, POST is refused with the reason.
    let r = e.get("/app/doc", &t).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        e.upstream.last().headers["x-portcullis-decision"],
        "restrict"
    );
    let before = e.upstream.count();
    let r = e.call("POST", "/app/doc", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body["error"], "restricted");
    assert_eq!(
        r.body["error_description"],
        "read-only access: device is not compliant or is missing patches"
    );
    assert_eq!(
        e.upstream.count(),
        before,
        "a refused write reached the app"
    );

    // Step-up on high: the exact RFC 9470 challenge.
    let r = e.get("/high/x", &t).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"], "insufficient_user_authentication");
    assert_eq!(
        www(&r),
        "Bearer error=\"insufficient_user_authentication\", \
         error_description=\"device is not compliant or is missing patches: recent multi-factor authentication required\", \
         acr_values=\"urn:portcullis:acr:mfa\", max_age=300"
    );
    // A stepped-up token (acr + recent auth_time) passes.
    let stepped = e.mfa_token("bob", "mac-2");
    assert_eq!(e.get("/high/x", &stepped).await.status, StatusCode::OK);
    // An old authentication does not.
    let now = portcullis::util::now_unix();
    let stale_mfa = e.token_with(
        "bob",
        Some("mac-2"),
        serde_json::json!({"acr": MFA, "auth_time": now - 400}),
    );
    assert_eq!(
        e.get("/high/x", &stale_mfa).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Deny on critical, even stepped up.
    let r = e.get("/crit/x", &stepped).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body["error"], "policy_denied");
    assert!(www(&r).is_empty());

    // Missing patches counts the same: restrict on low.
    e.mdm(
        "mac-2",
        serde_json::json!({"compliance": "compliant", "patch_behind": true}),
    )
    .await;
    assert_eq!(e.get("/low/x", &t).await.status, StatusCode::OK);
    assert_eq!(
        e.call("DELETE", "/low/x", &t).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn row3_jailbroken_device_is_revoked_and_an_earlier_token_dies_on_another_route() {
    let e = env().await;
    e.healthy("phone-3").await;
    let first = e.token("carol", "phone-3");
    let second = e.token("carol", "phone-3");
    assert_eq!(e.get("/app/x", &first).await.status, StatusCode::OK);
    assert_eq!(e.get("/crit/x", &second).await.status, StatusCode::OK);

    e.mdm("phone-3", serde_json::json!({"compromised": true}))
        .await;
    let r = e.get("/low/x", &first).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"], "revoked");
    assert!(www(&r).contains("error=\"invalid_token\""), "{}", www(&r));
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .contains("compromised")
    );
    let (_, rec) = e.admin("GET", "/admin/v1/devices/phone-3").await;
    assert_eq!(rec["revocation"]["source"], "policy", "{rec}");

    // The MDM re-enrols the device (compromised is sticky: a routine
    // `compromised: false` would be held); the revocation stands for every
    // earlier credential of the device, on every route.
    e.mdm(
        "phone-3",
        serde_json::json!({"compromised": false, "reenrolled": true}),
    )
    .await;
    let r = e.get("/crit/x", &second).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"], "revoked");
    // A credential issued after the revocation works.
    let fresh = e.token_with(
        "carol",
        Some("phone-3"),
        serde_json::json!({"iat": portcullis::util::now_unix() + 2}),
    );
    assert_eq!(e.get("/crit/x", &fresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn row3_lost_and_wiped_devices_are_revoked() {
    let e = env().await;
    e.healthy("mac-lost").await;
    e.healthy("mac-wiped").await;
    let lost = e.token("dave", "mac-lost");
    let wiped = e.token("erin", "mac-wiped");
    assert_eq!(e.get("/app/x", &lost).await.status, StatusCode::OK);
    assert_eq!(e.get("/app/x", &wiped).await.status, StatusCode::OK);

    let (st, _) = e.admin("POST", "/admin/v1/devices/mac-lost/lost").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    e.mdm("mac-wiped", serde_json::json!({"lifecycle": "wiped"}))
        .await;
    for (t, path) in [(&lost, "/low/x"), (&wiped, "/high/x")] {
        let r = e.get(path, t).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
        assert_eq!(r.body["error"], "revoked");
    }
    // A token minted after the loss is still refused: the policy revokes it too.
    let later = e.token_with(
        "dave",
        Some("mac-lost"),
        serde_json::json!({"iat": portcullis::util::now_unix() + 2}),
    );
    let r = e.get("/app/x", &later).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .contains("lost or wiped"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn row4_unmanaged_byod_and_partner_step_up_get_a_short_session_and_no_sensitive_apps() {
    let e = env().await;
    // An unknown device (no MDM record).
    let plain_token = e.token("frank", "home-pc");
    let r = e.get("/app/x", &plain_token).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(
        www(&r),
        "Bearer error=\"insufficient_user_authentication\", \
         error_description=\"device is not managed by the company: multi-factor authentication and 15-minute sessions\", \
         acr_values=\"urn:portcullis:acr:mfa\", max_age=3600"
    );
    // Stepped up: a 15-minute session on low/medium.
    let mfa = e.mfa_token("frank", "home-pc");
    for path in ["/low/x", "/app/x"] {
        let r = e.get(path, &mfa).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert_eq!(
            e.upstream.last().headers["x-portcullis-decision"],
            "shorten"
        );
    }
    // A token older than the cap is cut, so the client refreshes it.
    let now = portcullis::util::now_unix();
    let old = e.token_with(
        "frank",
        Some("home-pc"),
        serde_json::json!({"acr": MFA, "auth_time": now - 1000, "iat": now - 901}),
    );
    let r = e.get("/app/x", &old).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"], "session_expired");
    assert!(www(&r).contains("error=\"invalid_token\""), "{}", www(&r));
    assert!(www(&r).contains("900 s session limit"), "{}", www(&r));
    let fresh_refresh = e.token_with(
        "frank",
        Some("home-pc"),
        serde_json::json!({"acr": MFA, "auth_time": now - 1000, "iat": now}),
    );
    assert_eq!(e.get("/app/x", &fresh_refresh).await.status, StatusCode::OK);
    // High and critical: denied with a bearer token, even stepped up.
    for path in ["/high/x", "/crit/x"] {
        let r = e.get(path, &mfa).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            r.body["error_description"]
                .as_str()
                .unwrap()
                .contains("bound token")
        );
    }

    // BYOD and partner devices, enrolled and compliant, are treated the same.
    for (dev, own) in [("byod-1", "byod"), ("partner-1", "partner")] {
        e.mdm(
            dev,
            serde_json::json!({"lifecycle": "enrolled", "compliance": "compliant", "ownership": own}),
        )
        .await;
        let t = e.token("frank", dev);
        assert_eq!(
            e.get("/app/x", &t).await.status,
            StatusCode::UNAUTHORIZED,
            "{own}"
        );
        let m = e.mfa_token("frank", dev);
        assert_eq!(e.get("/app/x", &m).await.status, StatusCode::OK, "{own}");
        assert_eq!(
            e.get("/high/x", &m).await.status,
            StatusCode::FORBIDDEN,
            "{own}"
        );
    }
    // Unenrolled: the same.
    e.mdm("old-mac", serde_json::json!({"lifecycle": "unenrolled"}))
        .await;
    assert_eq!(
        e.get("/low/x", &e.token("frank", "old-mac")).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn stale_posture_is_treated_as_unknown() {
    let e = env().await;
    let two_days_ago = portcullis::util::now_unix_ms() - 2 * 86_400_000;
    e.mdm(
        "quiet-mac",
        serde_json::json!({"lifecycle": "enrolled", "compliance": "compliant", "ownership": "corporate",
            "occurred_at": two_days_ago, "last_check_in": two_days_ago}),
    )
    .await;
    let t = e.token("gina", "quiet-mac");
    let r = e.get("/app/x", &t).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"], "insufficient_user_authentication");
    assert_eq!(e.get("/high/x", &t).await.status, StatusCode::FORBIDDEN);
    // A fresh check-in restores full access.
    e.healthy("quiet-mac").await;
    assert_eq!(e.get("/high/x", &t).await.status, StatusCode::OK);
}

#[tokio::test]
async fn row5_leaver_and_suspended_are_revoked_on_every_route() {
    let e = env().await;
    e.healthy("mac-5").await;
    let first = e.token("hank", "mac-5");
    let second = e.token("hank", "mac-5");
    assert_eq!(e.get("/app/x", &first).await.status, StatusCode::OK);

    e.identity(
        "hank",
        IdentityPatch {
            status: Some(IdentityStatus::Terminated),
            ..IdentityPatch::default()
        },
    )
    .await;
    let r = e.get("/app/x", &first).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(r.body["error"], "revoked");
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .contains("suspended or has left")
    );
    let (_, rec) = e.admin("GET", "/admin/v1/subjects/hank").await;
    assert_eq!(rec["revocation"]["target"], "subject", "{rec}");

    // Rehired: the earlier token stays dead on another route; a new one works.
    e.identity(
        "hank",
        IdentityPatch {
            status: Some(IdentityStatus::Active),
            ..IdentityPatch::default()
        },
    )
    .await;
    let r = e.get("/low/x", &second).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let fresh = e.token_with(
        "hank",
        Some("mac-5"),
        serde_json::json!({"iat": portcullis::util::now_unix() + 2}),
    );
    assert_eq!(e.get("/low/x", &fresh).await.status, StatusCode::OK);

    // Suspended: the same.
    e.healthy("mac-6").await;
    let t = e.token("ivy", "mac-6");
    e.identity(
        "ivy",
        IdentityPatch {
            status: Some(IdentityStatus::Suspended),
            ..IdentityPatch::default()
        },
    )
    .await;
    assert_eq!(e.get("/crit/x", &t).await.body["error"], "revoked");
}

#[tokio::test]
async fn row5_contractor_past_contract_end_is_denied() {
    let e = env().await;
    e.healthy("mac-7").await;
    let t = e.token("jack", "mac-7");
    let now = portcullis::util::now_unix_ms();
    e.identity(
        "jack",
        IdentityPatch {
            contract_end_ms: Some(Some(now + 10 * 86_400_000)),
            ..IdentityPatch::default()
        },
    )
    .await;
    assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    e.identity(
        "jack",
        IdentityPatch {
            contract_end_ms: Some(Some(now - 2 * 86_400_000)),
            ..IdentityPatch::default()
        },
    )
    .await;
    let r = e.get("/app/x", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body["error"], "policy_denied");
    assert_eq!(r.body["error_description"], "contract has ended");
}

#[tokio::test]
async fn workloads_follow_workload_rules_not_mdm_rules() {
    let e = env().await;
    e.identity("bob-owner", IdentityPatch::default()).await;
    e.identity(
        "reporting-client",
        IdentityPatch {
            kind: Some(IdentityKind::Workload),
            owner: Some(Some("bob-owner".into())),
            ..IdentityPatch::default()
        },
    )
    .await;
    // A client-credentials token: no device at all.
    let t = e.token_with(
        "reporting-client",
        None,
        serde_json::json!({"client_id": "reporting-client"}),
    );
    assert_eq!(e.get("/svc/report", &t).await.status, StatusCode::OK);
    assert_eq!(
        e.call("POST", "/svc/report", &t).await.status,
        StatusCode::OK
    );
    // Not allow-listed on this route.
    let r = e.get("/app/x", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.body["error_description"],
        "workload is not on this route's allow-list"
    );
    // An old credential.
    let old = e.token_with(
        "reporting-client",
        None,
        serde_json::json!({"client_id": "reporting-client", "iat": portcullis::util::now_unix() - 4000}),
    );
    let r = e.get("/svc/report", &old).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.body["error_description"],
        "workload credential is older than allowed"
    );
    // The owner leaves: the workload stops.
    e.identity(
        "bob-owner",
        IdentityPatch {
            status: Some(IdentityStatus::Terminated),
            ..IdentityPatch::default()
        },
    )
    .await;
    let r = e.get("/svc/report", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.body["error_description"],
        "workload has no active accountable owner"
    );
}

#[tokio::test]
async fn decisions_are_cached_and_a_feed_event_invalidates_them() {
    let e = env_with(&policies_dir(), "decision_cache_ttl_ms = 60000").await;
    e.healthy("mac-c").await;
    let t = e.token("kate", "mac-c");
    for _ in 0..5 {
        assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    }
    let m = e.metrics().await;
    assert!(m.contains("portcullis_policy_cache_hits_total 4"), "{m}");
    assert!(m.contains("portcullis_policy_cache_misses_total 1"), "{m}");
    // The very next request after an event sees it (record version in the key).
    e.mdm("mac-c", serde_json::json!({"compliance": "non_compliant"}))
        .await;
    assert_eq!(
        e.call("POST", "/app/x", &t).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(
        e.metrics()
            .await
            .contains("portcullis_decisions_total{action=\"restrict\",reason=\"restricted\"} 1")
    );
}

/// The decision cache at its default TTL (a minute): every identity or
/// device record change reaches the very next request, because the cache
/// key carries the records' versions.
#[tokio::test]
async fn at_the_default_ttl_cached_decisions_follow_record_changes_at_once() {
    let e = env().await;
    let now = portcullis::util::now_unix_ms();
    e.identity(
        "nora",
        IdentityPatch {
            status: Some(IdentityStatus::Active),
            ..IdentityPatch::default()
        },
    )
    .await;
    e.healthy("mac-n").await;
    let t = e.token("nora", "mac-n");
    for _ in 0..3 {
        assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    }
    let m = e.metrics().await;
    assert!(m.contains("portcullis_policy_cache_hits_total 2"), "{m}");
    assert!(m.contains("portcullis_policy_cache_misses_total 1"), "{m}");
    let forwarded = e.upstream.count();

    // The identity record: the contract ended yesterday.
    e.identity(
        "nora",
        IdentityPatch {
            contract_end_ms: Some(Some(now - 86_400_000)),
            ..IdentityPatch::default()
        },
    )
    .await;
    let r = e.get("/app/x", &t).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body["error_description"], "contract has ended");
    assert_eq!(
        e.upstream.count(),
        forwarded,
        "the refused request never left"
    );
    // ...and extended again: allowed on the next request.
    e.identity(
        "nora",
        IdentityPatch {
            contract_end_ms: Some(Some(now + 30 * 86_400_000)),
            ..IdentityPatch::default()
        },
    )
    .await;
    assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    assert_eq!(e.upstream.last().headers["x-portcullis-decision"], "allow");

    // The device record: missing patches restrict writes at once...
    e.mdm("mac-n", serde_json::json!({"patch_behind": true}))
        .await;
    assert_eq!(
        e.call("POST", "/app/x", &t).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    assert_eq!(
        e.upstream.last().headers["x-portcullis-decision"],
        "restrict"
    );
    // ...and a patched device writes again on the next request.
    e.mdm("mac-n", serde_json::json!({"patch_behind": false}))
        .await;
    assert_eq!(e.call("POST", "/app/x", &t).await.status, StatusCode::OK);
    assert_eq!(e.upstream.last().headers["x-portcullis-decision"], "allow");
}

#[tokio::test]
async fn explain_shows_why_a_request_would_be_decided() {
    let e = env().await;
    e.mdm(
        "mac-x",
        serde_json::json!({"lifecycle": "enrolled", "compliance": "non_compliant", "ownership": "corporate"}),
    )
    .await;
    let (st, v) = e
        .admin(
            "GET",
            "/admin/v1/explain?subject=lena&device=mac-x&route=high&method=GET",
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["decision"]["action"], "step_up");
    assert_eq!(v["decision"]["policy_ids"][0], "noncompliant-step-up");
    assert_eq!(v["matched"][0]["file"], "default.cedar");
    assert_eq!(v["inputs"]["device"]["compliance"], "non_compliant");
    assert!(v["policy_version"].as_str().unwrap().len() == 12);
    let (_, v) = e
        .admin(
            "GET",
            &format!(
                "/admin/v1/explain?subject=lena&device=mac-x&route=high&acr={MFA}&auth_age_s=10"
            ),
        )
        .await;
    assert_eq!(v["decision"]["action"], "allow", "{v}");
    let (st, _) = e.admin("GET", "/admin/v1/explain?subject=lena").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = admin_send(
        e.server.admin_addr,
        "GET",
        "/admin/v1/explain?subject=lena&route=app",
        "wrong-token-0123456789",
        String::new(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// A stricter proposal: nothing but reads on medium routes.
const READ_ONLY_MEDIUM: &str = r#"
@id("read-only-medium")
@action("restrict")
@reason("medium routes are read-only this week")
permit (principal is User, action, resource)
when { context.route.sensitivity == "medium" };
"#;

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn audit_log_replays_under_a_stricter_set_and_shadow_mode_logs_divergences() {
    let tmp = tempfile::tempdir().unwrap();
    let strict = tmp.path().join("strict");
    copy_dir(&policies_dir(), &strict);
    std::fs::write(strict.join("strict.cedar"), READ_ONLY_MEDIUM).unwrap();
    let log = tmp.path().join("audit.jsonl");
    let e = env_with(
        &policies_dir(),
        &format!(
            "audit = {{ path = \"{}\", sample_allow = 1.0 }}\nshadow_dir = \"{}\"\nshadow_routes = [\"app\"]",
            log.display(),
            strict.display()
        ),
    )
    .await;
    e.healthy("mac-a").await;
    e.mdm(
        "mac-b",
        serde_json::json!({"lifecycle": "enrolled", "compliance": "non_compliant", "ownership": "corporate"}),
    )
    .await;
    let alice = e.token("alice", "mac-a");
    let bob = e.token("bob", "mac-b");
    // alice: 3 allows (2 on medium), bob: a restricted read and a refused write.
    let calls = [
        ("GET", "/app/1", &alice, StatusCode::OK),
        ("POST", "/app/2", &alice, StatusCode::OK),
        ("GET", "/high/3", &alice, StatusCode::OK),
        ("GET", "/app/4", &bob, StatusCode::OK),
        ("POST", "/app/5", &bob, StatusCode::FORBIDDEN),
    ];
    let mut ids = Vec::new();
    for (m, p, t, want) in calls {
        let r = e.call(m, p, t).await;
        assert_eq!(r.status, want, "{m} {p}: {}", r.body);
        ids.push(r.headers["x-request-id"].to_str().unwrap().to_owned());
    }
    wait_until("5 audit lines", || audit_lines(&log).len() == 5).await;
    let lines = audit_lines(&log);
    assert_eq!(lines[0]["request_id"], ids[0]);
    assert_eq!(lines[0]["principal"], "user:alice");
    assert_eq!(lines[0]["action"], "allow");
    assert_eq!(lines[0]["policy_ids"][0], "managed-compliant");
    assert_eq!(lines[0]["inputs"]["device"]["id"], "mac-a");
    assert!(lines[0]["snapshot_version"].as_u64().unwrap() > 0);
    assert_eq!(lines[4]["action"], "restrict");
    assert_eq!(lines[4]["enforced"], "refused");
    // Shadow mode on `app`: alice's two medium allows diverge (logged, not enforced).
    assert_eq!(lines[0]["shadow"]["decision"]["action"], "restrict");
    assert!(lines[2].get("shadow").is_none(), "high is not shadowed");
    assert!(
        lines[3].get("shadow").is_none(),
        "same decision: no divergence"
    );
    let m = e.metrics().await;
    assert!(
        m.contains(
            "portcullis_policy_shadow_divergences_total{enforced=\"allow\",shadow=\"restrict\"} 2"
        ),
        "{m}"
    );

    // Replay: exactly alice's two medium allows would change.
    let out = std::process::Command::new(binary())
        .args(["policy", "replay", "--json", "--audit"])
        .arg(&log)
        .arg("--policies")
        .arg(&strict)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["total"], 5);
    assert_eq!(rep["changed"], 2);
    let changed: Vec<&str> = rep["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(changed, vec![ids[0].as_str(), ids[1].as_str()]);
    assert_eq!(rep["by_action"]["allow → restrict"], 2);
    assert_eq!(rep["by_subject"]["user:alice"]["allow → restrict"], 2);
    assert_eq!(rep["changes"][0]["to_policies"][0], "read-only-medium");
    // The same set replays to no change.
    let out = std::process::Command::new(binary())
        .args(["policy", "replay", "--audit"])
        .arg(&log)
        .arg("--policies")
        .arg(policies_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("replayed 5 decisions"), "{text}");
    assert!(text.contains(": 0 would change"), "{text}");
}

#[tokio::test]
async fn allows_are_sampled_and_denials_always_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("audit.jsonl");
    let e = env_with(
        &policies_dir(),
        &format!(
            "audit = {{ path = \"{}\", sample_allow = 0.0 }}",
            log.display()
        ),
    )
    .await;
    e.healthy("mac-s").await;
    let t = e.token("mike", "mac-s");
    for _ in 0..3 {
        assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
    }
    let unknown = e.token("mike", "nope");
    assert_eq!(
        e.get("/crit/x", &unknown).await.status,
        StatusCode::FORBIDDEN
    );
    wait_until("the denial to be logged", || audit_lines(&log).len() == 1).await;
    assert_eq!(audit_lines(&log)[0]["action"], "deny");
}

#[tokio::test]
async fn hot_reload_swaps_the_set_and_a_broken_set_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    copy_dir(&policies_dir(), &dir);
    let e = env_with(&dir, "watch_interval_ms = 50").await;
    e.healthy("mac-h").await;
    let t = e.token("nina", "mac-h");
    assert_eq!(e.call("POST", "/app/x", &t).await.status, StatusCode::OK);
    let v1 = e
        .server
        .shared
        .proxy
        .policy
        .load()
        .unwrap()
        .set
        .version
        .clone();

    // A broken file: the running set stays, the error is counted.
    std::fs::write(
        dir.join("broken.cedar"),
        "permit(principal, action, resource) when { context.nope };",
    )
    .unwrap();
    let mut seen = false;
    for _ in 0..500 {
        if e.metrics()
            .await
            .contains("portcullis_policy_reloads_total{result=\"error\"}")
        {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(seen, "the broken set was never tried");
    assert_eq!(e.server.shared.proxy.policy.load().unwrap().set.version, v1);
    assert_eq!(e.call("POST", "/app/x", &t).await.status, StatusCode::OK);
    // SIGHUP's path too: the config reload fails and keeps everything.
    let err = e.server.shared.reload().await.unwrap_err().to_string();
    assert!(err.contains("broken.cedar:1:"), "{err}");

    // A valid change applies without a restart.
    std::fs::remove_file(dir.join("broken.cedar")).unwrap();
    std::fs::write(dir.join("strict.cedar"), READ_ONLY_MEDIUM).unwrap();
    let mut applied = false;
    for _ in 0..500 {
        if e.call("POST", "/app/x", &t).await.status == StatusCode::FORBIDDEN {
            applied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(applied, "the new set never applied");
    assert_ne!(e.server.shared.proxy.policy.load().unwrap().set.version, v1);
    assert_eq!(e.get("/app/x", &t).await.status, StatusCode::OK);
}

#[test]
fn the_shipped_policy_tests_pass() {
    let out = std::process::Command::new(binary())
        .args(["policy", "test"])
        .arg(policies_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn a_failing_policy_test_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&policies_dir(), tmp.path());
    std::fs::create_dir_all(tmp.path().join("tests")).unwrap();
    std::fs::write(
        tmp.path().join("tests/wrong.toml"),
        "[[case]]\nname = \"wrong on purpose\"\ndevice = { compromised = true }\nexpect = { action = \"allow\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["policy", "test"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("FAIL wrong.toml: wrong on purpose"), "{text}");
    assert!(text.contains("action: want allow, got revoke"), "{text}");
    assert!(text.contains(" passed, 1 failed"), "{text}");
}

#[test]
fn check_names_the_policy_file_line_and_cedar_error() {
    let pki = TestPki::new();
    let dir = pki.path().join("policies");
    copy_dir(&policies_dir(), &dir);
    std::fs::write(
        dir.join("typo.cedar"),
        "// a typo in an attribute name\n@id(\"typo\")\npermit (principal, action, resource)\nwhen { context.device.complaint };\n",
    )
    .unwrap();
    std::fs::write(pki.path().join("jwks.json"), r#"{"keys": []}"#).unwrap();
    let cfg = base_config(ISS, r#"jwks_file = "jwks.json""#, "")
        .replace("[log]", "[policy]\ndir = \"policies\"\n\n[log]")
        .replace(
            "algorithms = [\"RS256\", \"ES256\", \"EdDSA\"]",
            "algorithms = [\"ES256\"]",
        );
    let p = pki.write_config("p.toml", &cfg);
    let run = |p: &Path| {
        let out = std::process::Command::new(binary())
            .args(["check", "--config"])
            .arg(p)
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
    };
    // An empty JWKS file fails check on its own; give it a key.
    let k = SigningKey::es256("k").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({"keys": [k.jwk]}).to_string(),
    )
    .unwrap();
    let (ok, out) = run(&p);
    assert!(!ok, "{out}");
    assert!(out.contains("policy.dir"), "{out}");
    assert!(out.contains("typo.cedar:4:8:"), "{out}");
    assert!(out.contains("did you mean `compliant`?"), "{out}");
    // Parse errors too.
    std::fs::write(
        dir.join("typo.cedar"),
        "permit (principal, action, resource)\nwhen { true && };\n",
    )
    .unwrap();
    let (ok, out) = run(&p);
    assert!(!ok);
    assert!(out.contains("typo.cedar:2:"), "{out}");
    // Unknown annotations are typos as well.
    std::fs::write(
        dir.join("typo.cedar"),
        "@actoin(\"deny\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let (ok, out) = run(&p);
    assert!(!ok);
    assert!(
        out.contains("typo.cedar:1:1: unknown annotation `@actoin`"),
        "{out}"
    );
    std::fs::remove_file(dir.join("typo.cedar")).unwrap();
    let (ok, out) = run(&p);
    assert!(ok, "{out}");
    assert!(out.contains("policy set valid"), "{out}");
}
