//! The control plane end to end: real signed SETs pushed and polled, the
//! operator API and the generic MDM event, through the real admin listener,
//! and the NEXT proxied request decided on the new state. Bad input changes
//! nothing; duplicates and out-of-order events are handled; an acknowledged
//! event survives SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use portcullis::demo::pki::SigningKey;

const ISS: &str = "https://idp.test";
const TX: &str = "https://ssf.tx.test";
const RX_AUD: &str = "https://proxy.test/ssf";
const PUSH_TOKEN: &str = "push-secret-0123456789";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";
const MDM_SECRET: &str = "mdm-secret-0123456789";
const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

struct Env {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    user_key: SigningKey,
    tx_key: SigningKey,
}

fn config_text(pki: &TestPki, upstream: &Upstream, extra: &str) -> String {
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    let _ = pki;
    base_config(ISS, r#"jwks_file = "jwks.json""#, &routes)
        .replace(
            "[log]",
            &format!(
                r#"
[feeds]
max_body_bytes = 65536

[feeds.ssf]
push_token = "{PUSH_TOKEN}"
issuer = "{TX}"
audiences = ["{RX_AUD}"]
algorithms = ["ES256", "RS256"]
jwks_file = "tx-jwks.json"
{extra}

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"

[log]"#
            ),
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\""),
        )
}

async fn env_with(extra: &str) -> Env {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let user_key = SigningKey::es256("user-1").unwrap();
    let tx_key = SigningKey::es256("tx-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({"keys": [user_key.jwk]}).to_string(),
    )
    .unwrap();
    std::fs::write(
        pki.path().join("tx-jwks.json"),
        serde_json::json!({"keys": [tx_key.jwk]}).to_string(),
    )
    .unwrap();
    let cfg = pki.write_config("p.toml", &config_text(&pki, &upstream, extra));
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        upstream,
        server,
        user_key,
        tx_key,
    }
}

async fn env() -> Env {
    env_with("").await
}

/// A SET signed with `key` under an arbitrary header.
fn sign_raw(key: &SigningKey, header: serde_json::Value, claims: &serde_json::Value) -> String {
    let msg = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        msg.as_bytes(),
        &key.encoding_key().unwrap(),
        key.algorithm(),
    )
    .unwrap();
    format!("{msg}.{sig}")
}

fn set_claims(
    event: &str,
    sub_id: serde_json::Value,
    body: serde_json::Value,
) -> serde_json::Value {
    let now = portcullis::util::now_unix();
    serde_json::json!({
        "iss": TX, "aud": RX_AUD, "iat": now,
        "jti": format!("jti-{}", portcullis::util::RequestIds::default().next_id()),
        "sub_id": sub_id,
        "events": { event: body },
    })
}

fn sign_set(e: &Env, claims: &serde_json::Value) -> String {
    sign_raw(
        &e.tx_key,
        serde_json::json!({"typ": "secevent+jwt", "alg": "ES256", "kid": "tx-1"}),
        claims,
    )
}

fn user(sub: &str) -> serde_json::Value {
    serde_json::json!({"format": "iss_sub", "iss": ISS, "sub": sub})
}

fn device(id: &str) -> serde_json::Value {
    serde_json::json!({"format": "opaque", "id": id})
}

fn plain() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (StatusCode, serde_json::Value) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(a) = auth {
        b = b.header("authorization", format!("Bearer {a}"));
    }
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    let resp = tokio::time::timeout(
        DEADLINE,
        plain().request(b.body(Full::new(body.into())).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let st = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (st, v)
}

impl Env {
    fn token(&self, sub: &str, device: &str) -> String {
        let mut c = claims(ISS, sub);
        c["device_id"] = device.into();
        c["jti"] = format!("tok-{}", portcullis::util::RequestIds::default().next_id()).into();
        self.user_key.sign(&c).unwrap()
    }

    async fn request(&self, token: &str) -> (StatusCode, Bytes) {
        let c = client(&self.pki.ca_pem, false);
        let url = format!("https://localhost:{}/app", self.server.proxy_addr.port());
        let (st, _, body) = get(&c, &url, Some(token), &[]).await;
        (st, body)
    }

    async fn push(&self, set: &str) -> (StatusCode, serde_json::Value) {
        send(
            self.server.admin_addr,
            "POST",
            "/ssf/push",
            Some(PUSH_TOKEN),
            Some("application/secevent+jwt"),
            set.to_owned(),
        )
        .await
    }

    async fn admin(&self, method: &str, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
        send(
            self.server.admin_addr,
            method,
            path,
            Some(ADMIN_TOKEN),
            Some("application/json"),
            body.to_owned(),
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

    fn version(&self) -> u64 {
        self.server.shared.posture.snapshot().version()
    }
}

#[tokio::test]
async fn device_compliance_change_is_seen_by_the_next_request_and_the_control_window_is_measured() {
    let e = env().await;
    let t = e.token("alice", "mac-1");
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    assert_eq!(
        e.upstream.last().headers["x-portcullis-device-compliance"],
        "unknown"
    );

    // A CAEP device-compliance-change for alice on mac-1, pushed.
    let change = |previous: &str, current: &str| {
        let set = sign_set(
            &e,
            &set_claims(
                &format!("{CAEP}device-compliance-change"),
                serde_json::json!({"format": "complex", "user": user("alice"), "device": device("mac-1")}),
                serde_json::json!({"previous_status": previous, "current_status": current, "initiating_entity": "policy"}),
            ),
        );
        let e = &e;
        async move { e.push(&set).await.0 }
    };
    assert_eq!(
        change("compliant", "not-compliant").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    let h = e.upstream.last().headers;
    assert_eq!(h["x-portcullis-device-compliance"], "non_compliant");
    let m = e.metrics().await;
    assert!(
        m.contains("portcullis_control_window_seconds_count{feed=\"ssf\",kind=\"caep.device-compliance-change\"} 1"),
        "{m}"
    );
    assert!(m.contains("portcullis_feed_events_total{feed=\"ssf\",kind=\"caep.device-compliance-change\",outcome=\"applied\"} 1"));

    // The same cached token again, its device record replaced once more:
    // the token's memo of the record it last saw is not used any more.
    assert_eq!(
        change("not-compliant", "compliant").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    assert_eq!(
        e.upstream.last().headers["x-portcullis-device-compliance"],
        "compliant"
    );
}

#[tokio::test]
async fn account_disabled_stops_a_live_token_at_once() {
    let e = env().await;
    let t = e.token("bob", "mac-2");
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    let set = sign_set(
        &e,
        &set_claims(
            &format!("{RISC}account-disabled"),
            user("bob"),
            serde_json::json!({"reason": "hijacking"}),
        ),
    );
    assert_eq!(e.push(&set).await.0, StatusCode::ACCEPTED);
    let before = e.upstream.count();
    let (st, body) = e.request(&t).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("suspended"));
    assert_eq!(e.upstream.count(), before);

    // account-enabled: new sessions only. The old token stays revoked.
    let set = sign_set(
        &e,
        &set_claims(
            &format!("{RISC}account-enabled"),
            user("bob"),
            serde_json::json!({}),
        ),
    );
    assert_eq!(e.push(&set).await.0, StatusCode::ACCEPTED);
    let (st, _) = e.request(&t).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let mut c = claims(ISS, "bob");
    c["iat"] = (portcullis::util::now_unix() + 1).into();
    c["device_id"] = "mac-2".into();
    let fresh = e.user_key.sign(&c).unwrap();
    assert_eq!(e.request(&fresh).await.0, StatusCode::OK);
}

#[tokio::test]
async fn session_revoked_for_a_complex_user_and_device_subject() {
    let e = env().await;
    let on_laptop = e.token("carol", "laptop-9");
    let on_phone = e.token("carol", "phone-9");
    assert_eq!(e.request(&on_laptop).await.0, StatusCode::OK);
    let set = sign_set(
        &e,
        &set_claims(
            &format!("{CAEP}session-revoked"),
            serde_json::json!({"format": "complex", "user": user("carol"), "device": device("laptop-9")}),
            serde_json::json!({"initiating_entity": "admin", "reason_admin": {"en": "stolen laptop"}}),
        ),
    );
    assert_eq!(e.push(&set).await.0, StatusCode::ACCEPTED);
    let (st, body) = e.request(&on_laptop).await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("revoked"));
    // The same user on another device is untouched.
    assert_eq!(e.request(&on_phone).await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_sets_get_rfc8935_errors_and_change_nothing() {
    let e = env().await;
    let good = set_claims(
        &format!("{RISC}account-disabled"),
        user("dave"),
        serde_json::json!({}),
    );
    let hdr = serde_json::json!({"typ": "secevent+jwt", "alg": "ES256", "kid": "tx-1"});
    let v0 = e.version();

    let other = SigningKey::es256("tx-1").unwrap();
    let mut with_sub = good.clone();
    with_sub["sub"] = "dave".into();
    let mut with_exp = good.clone();
    with_exp["exp"] = (portcullis::util::now_unix() + 60).into();
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "https://someone-else".into();
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.test".into();
    let mut no_sub_id = good.clone();
    no_sub_id.as_object_mut().unwrap().remove("sub_id");
    let mut two_events = good.clone();
    two_events["events"][format!("{RISC}account-purged")] = serde_json::json!({});
    let attacker = SigningKey::es256("attacker").unwrap();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong signature",
            sign_raw(&other, hdr.clone(), &good),
            "invalid_key",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"typ":"secevent+jwt","alg":"none"}"#),
                b64(good.to_string().as_bytes())
            ),
            "invalid_request",
        ),
        (
            "wrong aud",
            sign_raw(&e.tx_key, hdr.clone(), &wrong_aud),
            "invalid_audience",
        ),
        (
            "wrong iss",
            sign_raw(&e.tx_key, hdr.clone(), &wrong_iss),
            "invalid_issuer",
        ),
        (
            "sub present",
            sign_raw(&e.tx_key, hdr.clone(), &with_sub),
            "invalid_request",
        ),
        (
            "exp present",
            sign_raw(&e.tx_key, hdr.clone(), &with_exp),
            "invalid_request",
        ),
        (
            "no sub_id",
            sign_raw(&e.tx_key, hdr.clone(), &no_sub_id),
            "invalid_request",
        ),
        (
            "two events",
            sign_raw(&e.tx_key, hdr.clone(), &two_events),
            "invalid_request",
        ),
        (
            "key from jku",
            sign_raw(
                &attacker,
                serde_json::json!({"typ": "secevent+jwt", "alg": "ES256", "kid": "attacker", "jku": "http://127.0.0.1:1/jwks", "jwk": attacker.jwk}),
                &good,
            ),
            "invalid_key",
        ),
        (
            "wrong typ",
            sign_raw(
                &e.tx_key,
                serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": "tx-1"}),
                &good,
            ),
            "invalid_request",
        ),
        ("malformed", "not-a-jwt".to_owned(), "invalid_request"),
        (
            "malformed json",
            format!("{}.{}.c2ln", b64(b"{"), b64(b"[")),
            "invalid_request",
        ),
    ];
    for (name, set, err) in cases {
        let (st, body) = e.push(&set).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert_eq!(body["err"], err, "{name}: {body}");
        assert!(body["description"].is_string(), "{name}");
    }

    // Unauthenticated caller, wrong content type, oversized body.
    let valid = sign_set(&e, &good);
    let (st, body) = send(
        e.server.admin_addr,
        "POST",
        "/ssf/push",
        None,
        Some("application/secevent+jwt"),
        valid.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(body["err"], "authentication_failed");
    let (st, _) = send(
        e.server.admin_addr,
        "POST",
        "/ssf/push",
        Some("wrong-token-0123456789"),
        Some("application/secevent+jwt"),
        valid.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = send(
        e.server.admin_addr,
        "POST",
        "/ssf/push",
        Some(PUSH_TOKEN),
        Some("application/json"),
        valid.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let huge = "a".repeat(10 * 1024 * 1024);
    let (st, _) = send(
        e.server.admin_addr,
        "POST",
        "/ssf/push",
        Some(PUSH_TOKEN),
        Some("application/secevent+jwt"),
        huge,
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing changed: no version bump, no record for dave.
    assert_eq!(e.version(), v0);
    let (st, _) = e.admin("GET", "/admin/v1/subjects/dave", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let t = e.token("dave", "d");
    assert_eq!(e.request(&t).await.0, StatusCode::OK);

    // The valid one, for contrast, is applied.
    assert_eq!(e.push(&valid).await.0, StatusCode::ACCEPTED);
    assert_eq!(e.request(&t).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn duplicates_apply_once_and_older_events_never_overwrite_newer_state() {
    let e = env().await;
    let now = portcullis::util::now_unix();
    let compliance = |status: &str, ts: u64| {
        let mut c = set_claims(
            &format!("{CAEP}device-compliance-change"),
            serde_json::json!({"format": "complex", "device": device("ipad-7")}),
            serde_json::json!({"previous_status": "compliant", "current_status": status, "event_timestamp": ts}),
        );
        c["iat"] = ts.into();
        c
    };
    let newer = sign_set(&e, &compliance("compliant", now));
    let older = sign_set(&e, &compliance("not-compliant", now - 60));
    assert_eq!(e.push(&newer).await.0, StatusCode::ACCEPTED);
    let v1 = e.version();
    // Duplicate: 202 again, nothing applied.
    assert_eq!(e.push(&newer).await.0, StatusCode::ACCEPTED);
    assert_eq!(e.version(), v1);
    // Older: logged as stale, state unchanged.
    assert_eq!(e.push(&older).await.0, StatusCode::ACCEPTED);
    let (st, rec) = e.admin("GET", "/admin/v1/devices/ipad-7", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["device"]["compliance"], "compliant", "{rec}");
    let hist = rec["history"].as_array().unwrap();
    assert_eq!(hist.len(), 2, "{rec}");
    assert_eq!(hist[0]["outcome"], "applied");
    assert_eq!(hist[1]["outcome"], "stale");
    let m = e.metrics().await;
    assert!(m.contains("outcome=\"duplicate\"} 1"), "{m}");
}

#[tokio::test]
async fn unknown_event_types_are_accepted_ignored_and_counted() {
    let e = env().await;
    let v0 = e.version();
    for ty in [
        "https://example.com/custom/event-type/thing".to_owned(),
        format!("{CAEP}session-established"),
        "https://schemas.openid.net/secevent/ssf/event-type/verification".to_owned(),
    ] {
        let set = sign_set(
            &e,
            &set_claims(&ty, user("erin"), serde_json::json!({"state": "x"})),
        );
        assert_eq!(e.push(&set).await.0, StatusCode::ACCEPTED, "{ty}");
    }
    assert_eq!(e.version(), v0);
    let m = e.metrics().await;
    assert!(
        m.contains(
            "portcullis_feed_events_total{feed=\"ssf\",kind=\"unknown\",outcome=\"ignored\"} 1"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn admin_api_revokes_marks_lost_and_explains_records() {
    let e = env().await;
    let t = e.token("frank", "mac-f");
    let t2 = e.token("gina", "mac-g");
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    assert_eq!(e.request(&t2).await.0, StatusCode::OK);

    // Unauthenticated → 401, nothing changes.
    let (st, _) = send(
        e.server.admin_addr,
        "POST",
        "/admin/v1/revoke",
        None,
        Some("application/json"),
        r#"{"subject":"frank"}"#,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = e
        .admin(
            "POST",
            "/admin/v1/revoke",
            r#"{"subject": "frank", "bogus": 1}"#,
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(e.request(&t).await.0, StatusCode::OK);

    let (st, body) = e
        .admin(
            "POST",
            "/admin/v1/revoke",
            r#"{"subject": "frank", "reason": "offboarding"}"#,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(e.request(&t).await.0, StatusCode::UNAUTHORIZED);

    let (st, _) = e.admin("POST", "/admin/v1/devices/mac-g/lost", "").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, body) = e.request(&t2).await;
    assert!(
        st == StatusCode::FORBIDDEN || st == StatusCode::UNAUTHORIZED,
        "{st}"
    );
    assert!(
        String::from_utf8_lossy(&body).contains("revoked")
            || String::from_utf8_lossy(&body).contains("lost")
    );

    let (st, rec) = e.admin("GET", "/admin/v1/devices/mac-g", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["device"]["lifecycle"], "lost");
    assert!(rec["revocation"]["not_before_s"].as_u64().is_some());
    assert_eq!(rec["history"][0]["event"]["kind"], "admin.device-lost");
    let (st, rec) = e.admin("GET", "/admin/v1/subjects/frank", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["revocation"]["target"], "subject");
    assert_eq!(rec["history"][0]["event"]["kind"], "admin.revoke");
}

#[tokio::test]
async fn generic_mdm_event_lost_device_and_bad_input() {
    let e = env().await;
    let t = e.token("hank", "win-h");
    assert_eq!(e.request(&t).await.0, StatusCode::OK);
    let path = "/mdm/v1/acme/events";
    let mdm = |auth: Option<&'static str>, body: String| {
        send(
            e.server.admin_addr,
            "POST",
            path,
            auth,
            Some("application/json"),
            body,
        )
    };
    let v0 = e.version();
    for (name, auth, body, want) in [
        ("no auth", None, r#"{"event_id":"1","device_id":"win-h","occurred_at":"2026-01-01T00:00:00Z","lifecycle":"lost"}"#.to_owned(), StatusCode::UNAUTHORIZED),
        ("wrong auth", Some("nope-nope-nope-nope"), r#"{}"#.to_owned(), StatusCode::UNAUTHORIZED),
        ("malformed", Some(MDM_SECRET), "{not json".to_owned(), StatusCode::BAD_REQUEST),
        ("unknown field", Some(MDM_SECRET), r#"{"event_id":"1","device_id":"win-h","occurred_at":"2026-01-01T00:00:00Z","lifecycel":"lost"}"#.to_owned(), StatusCode::BAD_REQUEST),
        ("bad lifecycle", Some(MDM_SECRET), r#"{"event_id":"1","device_id":"win-h","occurred_at":"2026-01-01T00:00:00Z","lifecycle":"vaporised"}"#.to_owned(), StatusCode::BAD_REQUEST),
        ("bad time", Some(MDM_SECRET), r#"{"event_id":"1","device_id":"win-h","occurred_at":"yesterday"}"#.to_owned(), StatusCode::BAD_REQUEST),
        ("empty id", Some(MDM_SECRET), r#"{"event_id":"1","device_id":"","occurred_at":1767225600}"#.to_owned(), StatusCode::BAD_REQUEST),
        ("too large", Some(MDM_SECRET), format!("[{}]", "1,".repeat(40_000)), StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let (st, body) = mdm(auth, body).await;
        assert_eq!(st, want, "{name}: {body}");
    }
    assert_eq!(e.version(), v0);
    assert_eq!(e.request(&t).await.0, StatusCode::OK);

    let now = portcullis::util::now_unix_ms();
    let (st, body) = mdm(
        Some(MDM_SECRET),
        format!(r#"{{"event_id":"lost-1","device_id":"win-h","occurred_at":{now},"lifecycle":"lost","platform":"windows"}}"#),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["results"][0]["outcome"], "applied");
    let (st, _) = e.request(&t).await;
    assert!(
        st == StatusCode::FORBIDDEN || st == StatusCode::UNAUTHORIZED,
        "{st}"
    );
}

#[tokio::test]
async fn ssf_poll_client_acknowledges_only_what_it_stored() {
    use std::sync::{Arc, Mutex};
    // A transmitter's poll endpoint on loopback: serves SETs until acked,
    // and records every request body it gets.
    let good_jti = "good-1";
    let pending: Arc<Mutex<serde_json::Map<String, serde_json::Value>>> =
        Arc::new(Mutex::new(serde_json::Map::from_iter([(
            "bad-1".to_owned(),
            serde_json::Value::String("junk.junk.junk".to_owned()),
        )])));
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (p2, s2) = (pending.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (p, s) = (p2.clone(), s2.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (p, s) = (p.clone(), s.clone());
                        async move {
                            assert_eq!(
                                req.headers()["authorization"],
                                "Bearer poll-token-0123456789"
                            );
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let mut pend = p.lock().unwrap();
                            for a in v["ack"].as_array().unwrap() {
                                pend.remove(a.as_str().unwrap());
                            }
                            for k in v["setErrs"].as_object().unwrap().keys() {
                                pend.remove(k);
                            }
                            s.lock().unwrap().push(v);
                            let out = serde_json::json!({"sets": *pend, "moreAvailable": false});
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(out.to_string()),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    let e = env_with(&format!(
        "poll_url = \"http://{addr}/poll\"\npoll_token = \"poll-token-0123456789\"\npoll_interval_ms = 100"
    ))
    .await;
    let good = sign_set(
        &e,
        &set_claims(
            &format!("{RISC}account-disabled"),
            user("ivan"),
            serde_json::json!({}),
        ),
    );
    pending
        .lock()
        .unwrap()
        .insert(good_jti.to_owned(), serde_json::Value::String(good));
    wait_until(
        "the poll loop to ack the good SET and report the bad one",
        || {
            let s = seen.lock().unwrap();
            s.iter()
                .any(|v| v["ack"].as_array().unwrap().iter().any(|a| a == good_jti))
                && s.iter().any(|v| v["setErrs"].get("bad-1").is_some())
        },
    )
    .await;
    let s = seen.lock().unwrap().clone();
    let acked: Vec<&serde_json::Value> = s
        .iter()
        .flat_map(|v| v["ack"].as_array().unwrap())
        .collect();
    assert!(
        acked.iter().all(|a| *a == good_jti),
        "acked something it did not store: {acked:?}"
    );
    let err = s
        .iter()
        .find_map(|v| v["setErrs"].get("bad-1").cloned())
        .unwrap();
    assert_eq!(err["err"], "invalid_request");
    let t = e.token("ivan", "x");
    assert_eq!(e.request(&t).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_acknowledged_event_survives_sigkill() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let user_key = SigningKey::es256("user-1").unwrap();
    let tx_key = SigningKey::es256("tx-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({"keys": [user_key.jwk]}).to_string(),
    )
    .unwrap();
    std::fs::write(
        pki.path().join("tx-jwks.json"),
        serde_json::json!({"keys": [tx_key.jwk]}).to_string(),
    )
    .unwrap();
    let cfg = pki.write_config("serve.toml", &config_text(&pki, &upstream, ""));
    let p = ServeProcess::spawn(&cfg).await;
    let mut c = claims(ISS, "judy");
    c["device_id"] = "mac-j".into();
    let token = user_key.sign(&c).unwrap();
    let hc = client(&pki.ca_pem, false);
    let url = |port: u16| format!("https://localhost:{port}/app");
    assert_eq!(
        get(&hc, &url(p.proxy.port()), Some(&token), &[]).await.0,
        StatusCode::OK
    );

    let set = sign_raw(
        &tx_key,
        serde_json::json!({"typ": "secevent+jwt", "alg": "ES256", "kid": "tx-1"}),
        &set_claims(
            &format!("{RISC}account-purged"),
            user("judy"),
            serde_json::json!({}),
        ),
    );
    let (st, _) = send(
        p.admin,
        "POST",
        "/ssf/push",
        Some(PUSH_TOKEN),
        Some("application/secevent+jwt"),
        set,
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    p.signal("KILL");
    drop(p);

    let p = ServeProcess::spawn(&cfg).await;
    let (st, _, body) = get(&hc, &url(p.proxy.port()), Some(&token), &[]).await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("terminated"));
}

/// Feed time is untrusted: a SET whose event is dated beyond the clock skew
/// (here 2099) is refused with RFC 8935's 400 `invalid_request`, counted as
/// `outcome="future"`, and changes nothing.
#[tokio::test]
async fn a_far_future_set_is_refused_and_changes_nothing() {
    let e = env().await;
    let v0 = e.version();
    let set = sign_set(
        &e,
        &set_claims(
            &format!("{CAEP}device-compliance-change"),
            serde_json::json!({"format": "complex", "device": device("ipad-2099")}),
            serde_json::json!({"previous_status": "not-compliant", "current_status": "compliant",
                               "event_timestamp": 4_102_444_800u64}),
        ),
    );
    let (st, body) = e.push(&set).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["err"], "invalid_request", "{body}");
    assert!(
        body["description"].as_str().unwrap().contains("future"),
        "{body}"
    );
    assert_eq!(e.version(), v0);
    let (st, _) = e.admin("GET", "/admin/v1/devices/ipad-2099", "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let m = e.metrics().await;
    assert!(
        m.contains("feed=\"ssf\",kind=\"caep.device-compliance-change\",outcome=\"future\"} 1"),
        "{m}"
    );
}
