//! MDM feeds end to end: Jamf Pro webhooks on the admin listener and the
//! Intune Graph poller against a local token + Graph server, each proven by
//! the next proxied request through real TLS to a real upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ISSUER: &str = "https://idp.test";
const API_TOKEN: &str = "admin-api-token-0123456789";
const JAMF_AUTH: &str = "Basic amFtZjpqYW1mLXdlYmhvb2stc2VjcmV0";
const MAX_BODY: usize = 64 * 1024;

/// A laptop (computer) and a phone (mobile device), shaped like standards.md §6.5.
const MAC_UDID: &str = "6A1C2E3F-9B8D-4C7A-8E6F-0D1C2B3A4F5E";
const MAC_JSS: u64 = 1843;
const PHONE_UDID: &str = "00008110-001A2B3C4D5E6F70";
const PHONE_JSS: u64 = 902;

/// Smart groups: 57 lost mode, 60 non-compliant, 61 patch, 62 compromised.
const LOST_GROUP: u64 = 57;
const NONCOMPLIANT_GROUP: u64 = 60;

struct Setup {
    pki: TestPki,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    key: SigningKey,
}

fn feeds_toml(extra: &str) -> String {
    format!(
        r#"
[feeds]
max_body_bytes = {MAX_BODY}

[feeds.jamf]
authorization = "{JAMF_AUTH}"
lost_groups = [{LOST_GROUP}]
noncompliant_groups = [{NONCOMPLIANT_GROUP}]
patch_groups = [61]
compromised_groups = [62]
{extra}
"#
    )
}

async fn setup(feeds: &str) -> Setup {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = SigningKey::es256("ec-1").unwrap();
    let jwks = json!({ "keys": [key.jwk] }).to_string();
    std::fs::write(pki.path().join("jwks.json"), jwks).unwrap();
    let routes = format!(
        r#"
[[routes]]
name = "app"
path_prefix = "/"
upstream = "{}"
auth = "bearer"
{feeds}
"#,
        upstream.url()
    );
    let cfg = base_config(ISSUER, r#"jwks_file = "jwks.json""#, &routes).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{API_TOKEN}\"\n"),
    );
    assert!(
        cfg.contains(API_TOKEN),
        "base_config's [admin] table changed"
    );
    let path = pki.write_config("mdm.toml", &cfg);
    let server = portcullis::server::start(path).await.unwrap();
    Setup {
        pki,
        upstream,
        server,
        key,
    }
}

impl Setup {
    fn token(&self, sub: &str, device: &str) -> String {
        let mut c = claims(ISSUER, sub);
        c["device_id"] = json!(device);
        self.key.sign(&c).unwrap()
    }

    /// One proxied request through TLS; status and JSON body.
    async fn request(&self, token: &str) -> (StatusCode, Value) {
        let c = client(&self.pki.ca_pem, false);
        let url = format!("https://localhost:{}/data", self.server.proxy_addr.port());
        let (st, _, body) = get(&c, &url, Some(token), &[]).await;
        (st, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn admin(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        let c: Client<_, TestBody> = Client::builder(TokioExecutor::new()).build_http();
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server.admin_addr));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = tokio::time::timeout(DEADLINE, c.request(b.body(full(body)).unwrap()))
            .await
            .expect("admin request timed out")
            .expect("admin request failed");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Posts a Jamf webhook with the configured Authorization header.
    async fn jamf(&self, body: &Value) -> (StatusCode, Value) {
        self.admin(
            "POST",
            "/mdm/jamf",
            &[
                ("authorization", JAMF_AUTH),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

    /// `GET /admin/v1/devices/{id}`: the record, its revocation and history.
    async fn device(&self, id: &str) -> (StatusCode, Value) {
        let auth = format!("Bearer {API_TOKEN}");
        self.admin(
            "GET",
            &format!("/admin/v1/devices/{id}"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await
    }
}

fn envelope(event_name: &str, ts: u64, webhook_id: u64, event: Value) -> Value {
    json!({
        "webhook": { "id": webhook_id, "name": "posture", "webhookEvent": event_name, "eventTimestamp": ts },
        "event": event,
    })
}

fn mac() -> Value {
    json!({ "jssID": MAC_JSS, "udid": MAC_UDID, "serialNumber": "C02ZX1YZMD6M",
            "deviceName": "acme-mbp-1843", "model": "MacBookPro18,3", "osVersion": "15.3.2", "osBuild": "24D81",
            "username": "m.ito", "emailAddress": "m.ito@acme.example", "userDirectoryID": "-1",
            "macAddress": "3C:22:FB:10:AA:01", "alternateMacAddress": "", "ipAddress": "203.0.113.24",
            "reportedIpAddress": "10.4.22.17", "department": "Finance", "building": "", "room": "",
            "position": "", "phone": "", "realName": "Mei Ito", "managementId": "f3a1" })
}

fn phone() -> Value {
    json!({ "jssID": PHONE_JSS, "udid": PHONE_UDID, "serialNumber": "F2LXK0ABCD12",
            "deviceName": "Mei's iPhone", "model": "iPhone 15", "modelDisplay": "iPhone 15",
            "osVersion": "18.3", "osBuild": "22D63", "username": "m.ito", "product": "iPhone15,4",
            "bluetoothMacAddress": "", "wifiMacAddress": "", "imei": "", "icciID": "", "ipAddress": "",
            "userDirectoryID": "-1", "room": "", "version": "18.3", "managementId": "aa11" })
}

fn group_change(
    group: u64,
    computer: bool,
    added: Value,
    added_ids: Value,
    removed_ids: Value,
) -> Value {
    json!({ "jssid": group, "name": "POSTURE", "smartGroup": true, "computer": computer,
            "groupAddedDevices": added, "groupAddedDevicesIds": added_ids,
            "groupRemovedDevices": [], "groupRemovedDevicesIds": removed_ids })
}

fn now_ms() -> u64 {
    portcullis::util::now_unix_ms()
}

fn outcomes(v: &Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results in {v}"))
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn jamf_lost_mode_smart_group_refuses_the_next_request() {
    let s = setup(&feeds_toml("")).await;
    // In the past: events dated ahead of their acceptance are clamped to it.
    let t0 = now_ms() - 60_000;
    let (st, v) = s
        .jamf(&envelope("MobileDeviceEnrolled", t0, 3, phone()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["applied"]);
    let token = s.token("m.ito@acme.example", PHONE_UDID);
    let (st, _) = s.request(&token).await;
    assert_eq!(st, StatusCode::OK);
    let before = s.upstream.count();

    // The device joins the "Lost Mode enabled" smart group (§6.5 payload).
    let lost = envelope(
        "SmartGroupMobileDeviceMembershipChange",
        t0 + 1000,
        14,
        group_change(
            LOST_GROUP,
            false,
            json!([phone()]),
            json!([PHONE_JSS]),
            json!([]),
        ),
    );
    let (st, v) = s.jamf(&lost).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["applied"], "one change per device: {v}");

    // The very next request with the same token is refused.
    let (st, body) = s.request(&token).await;
    assert!(
        st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN,
        "{st} {body}"
    );
    assert!(
        ["revoked", "device_untrusted"].contains(&body["error"].as_str().unwrap()),
        "{body}"
    );
    assert_eq!(s.upstream.count(), before, "the upstream saw nothing");

    let (st, rec) = s.device(PHONE_UDID).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["device"]["lifecycle"], "lost", "{rec}");
    assert_eq!(rec["device"]["platform"], "ios");
    assert_eq!(rec["device"]["management_source"], "jamf");
    assert_eq!(rec["device"]["source"], "jamf");
    assert_eq!(rec["revocation"]["target"], "device");
    let ext: Vec<&str> = rec["device"]["external_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(ext.contains(&"jamf:jss:mobile:902"), "{ext:?}");
    assert!(ext.contains(&"jamf:serial:F2LXK0ABCD12"), "{ext:?}");
    assert_eq!(rec["history"].as_array().unwrap().len(), 2);

    // Leaving the group is a routine report: lost is sticky, so the
    // lifecycle is held (the rest applies) and the device stays refused.
    let found = envelope(
        "SmartGroupMobileDeviceMembershipChange",
        t0 + 2000,
        14,
        group_change(LOST_GROUP, false, json!([]), json!([]), json!([PHONE_JSS])),
    );
    let (st, v) = s.jamf(&found).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["partial"]);
    assert_eq!(v["results"][0]["held_fields"], json!(["lifecycle"]), "{v}");
    let (_, rec) = s.device(PHONE_UDID).await;
    assert_eq!(rec["device"]["lifecycle"], "lost");
    let (st, _) = s.request(&token).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // A re-enrolment clears it; the token issued before the revocation
    // stays dead, one issued after the revocation second is honoured again.
    let (st, v) = s
        .jamf(&envelope("MobileDeviceEnrolled", t0 + 2500, 15, phone()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["applied"]);
    let (_, rec) = s.device(PHONE_UDID).await;
    assert_eq!(rec["device"]["lifecycle"], "enrolled");
    let (st, _) = s.request(&token).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let issued = portcullis::util::now_unix();
    wait_until("the next second", || portcullis::util::now_unix() > issued).await;
    let fresh = s.token("m.ito@acme.example", PHONE_UDID);
    let (st, body) = s.request(&fresh).await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn jamf_enable_lost_mode_and_erase_commands_revoke() {
    let s = setup(&feeds_toml("")).await;
    // In the past: events dated ahead of their acceptance are clamped to it.
    let t0 = now_ms() - 60_000;
    let token = s.token("m.ito@acme.example", PHONE_UDID);
    let (st, _) = s.request(&token).await;
    assert_eq!(st, StatusCode::OK);

    let mut cmd = phone();
    cmd["mdmCommand"] = json!("EnableLostMode");
    cmd["mdmCommandUUID"] = json!("1D8B7C1E-0000-4000-8000-000000000001");
    // Event names are matched case-insensitively.
    let (st, v) = s
        .jamf(&envelope("mobiledevicecommandcompleted", t0, 21, cmd))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["applied"]);
    let (st, body) = s.request(&token).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "revoked");
    let (_, rec) = s.device(PHONE_UDID).await;
    assert_eq!(rec["device"]["lifecycle"], "lost");

    // EraseDevice on a computer-less mobile: wipe pending, revoked again.
    let mut erase = phone();
    erase["mdmCommand"] = json!("EraseDevice");
    let (st, v) = s
        .jamf(&envelope(
            "MobileDeviceCommandCompleted",
            t0 + 500,
            21,
            erase,
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (_, rec) = s.device(PHONE_UDID).await;
    assert_eq!(rec["device"]["lifecycle"], "wipe_pending");

    // Other commands are acknowledged and ignored.
    let mut other = phone();
    other["mdmCommand"] = json!("DeviceInformation");
    let (st, v) = s
        .jamf(&envelope(
            "MobileDeviceCommandCompleted",
            t0 + 600,
            21,
            other,
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(v["outcome"], "ignored");

    // Unenrolment (Jamf's own capitalisation) after an erase: wipe pending
    // is sticky, so the lifecycle is held.
    let (st, v) = s
        .jamf(&envelope("MobileDeviceUnEnrolled", t0 + 700, 22, phone()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["held_fields"], json!(["lifecycle"]), "{v}");
    let (_, rec) = s.device(PHONE_UDID).await;
    assert_eq!(rec["device"]["lifecycle"], "wipe_pending");
}

#[tokio::test]
async fn jamf_noncompliant_group_by_jss_id_updates_the_device_record() {
    let s = setup(&feeds_toml("")).await;
    // In the past: events dated ahead of their acceptance are clamped to it.
    let t0 = now_ms() - 60_000;
    // Inventory first: os, platform, subjects, external ids.
    let (st, v) = s
        .jamf(&envelope("ComputerInventoryCompleted", t0, 12, mac()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (_, rec) = s.device(MAC_UDID).await;
    let d = &rec["device"];
    assert_eq!(d["os_version"], "15.3.2");
    assert_eq!(d["platform"], "macos");
    assert_eq!(d["subjects"], json!(["m.ito@acme.example", "m.ito"]));
    assert_eq!(d["last_check_in_ms"], json!(t0));
    assert_eq!(d["compliance"], "unknown");

    // Computer smart-group changes may list only jssIDs; 999 is unknown.
    let ev = envelope(
        "SmartGroupComputerMembershipChange",
        t0 + 1000,
        15,
        group_change(
            NONCOMPLIANT_GROUP,
            true,
            json!([]),
            json!([MAC_JSS, 999]),
            json!([]),
        ),
    );
    let (st, v) = s.jamf(&ev).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["applied"]);
    assert_eq!(v["results"][0]["device"], MAC_UDID);
    assert_eq!(v["unresolved"], json!(["jss:computer:999"]));
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["device"]["compliance"], "non_compliant", "{rec}");
    let history = rec["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["event"]["feed"], "jamf");
    assert_eq!(history[1]["event"]["kind"], "jamf.smart-group");
    assert_eq!(
        history[1]["event"]["id"],
        format!(
            "jamf:15:{}:smartgroupcomputermembershipchange:{NONCOMPLIANT_GROUP}:added:{MAC_UDID}",
            t0 + 1000
        )
    );
    // Non-compliance alone is for policies to weigh; the baseline allows.
    let token = s.token("m.ito@acme.example", MAC_UDID);
    assert_eq!(s.request(&token).await.0, StatusCode::OK);

    // A check-in refreshes freshness; leaving the group → compliant.
    let checkin = json!({ "computer": mac(), "trigger": "CHECKIN", "username": "m.ito" });
    let (st, _) = s
        .jamf(&envelope("ComputerCheckIn", t0 + 2000, 16, checkin))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let ev = envelope(
        "SmartGroupComputerMembershipChange",
        t0 + 3000,
        15,
        group_change(
            NONCOMPLIANT_GROUP,
            true,
            json!([]),
            json!([]),
            json!([MAC_JSS]),
        ),
    );
    let (st, v) = s.jamf(&ev).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["device"]["compliance"], "compliant");
    assert_eq!(rec["device"]["last_check_in_ms"], json!(t0 + 2000));

    // A group that is not configured, and an event type portcullis does not
    // use, are acknowledged and ignored.
    let ev = envelope(
        "SmartGroupComputerMembershipChange",
        t0 + 4000,
        15,
        group_change(4242, true, json!([]), json!([MAC_JSS]), json!([])),
    );
    let (st, v) = s.jamf(&ev).await;
    assert_eq!(
        (st, v["outcome"].as_str()),
        (StatusCode::ACCEPTED, Some("ignored"))
    );
    let (st, v) = s
        .jamf(&envelope(
            "ComputerPushCapabilityChanged",
            t0 + 4000,
            17,
            mac(),
        ))
        .await;
    assert_eq!(
        (st, v["outcome"].as_str()),
        (StatusCode::ACCEPTED, Some("ignored"))
    );
    let (st, v) = s
        .jamf(&envelope(
            "JSSStartup",
            t0,
            18,
            json!({"institution": "Acme"}),
        ))
        .await;
    assert_eq!(
        (st, v["outcome"].as_str()),
        (StatusCode::ACCEPTED, Some("ignored"))
    );
    let (_, after) = s.device(MAC_UDID).await;
    assert_eq!(after["history"].as_array().unwrap().len(), 4);

    let text = s.server.shared.proxy.metrics.encode();
    assert!(
        text.contains(r#"feed="jamf",kind="jamf.computerpushcapabilitychanged",outcome="ignored""#),
        "{text}"
    );
}

/// Sends a request over raw TCP so a body the server refuses early cannot
/// turn into a client-side write error; returns the status.
async fn raw_post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = rd.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no response");
    writer.abort();
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test]
async fn jamf_bad_input_is_refused_and_changes_nothing() {
    let s = setup(&feeds_toml("")).await;
    // In the past: events dated ahead of their acceptance are clamped to it.
    let t0 = now_ms() - 60_000;
    let (st, _) = s
        .jamf(&envelope("MobileDeviceEnrolled", t0, 3, phone()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (_, before) = s.device(PHONE_UDID).await;
    let version = s.server.shared.posture.snapshot().version();

    let lost = envelope(
        "SmartGroupMobileDeviceMembershipChange",
        t0 + 1000,
        14,
        group_change(
            LOST_GROUP,
            false,
            json!([phone()]),
            json!([PHONE_JSS]),
            json!([]),
        ),
    )
    .to_string();
    let ct = ("content-type", "application/json");
    // Wrong, missing, and differently-cased-scheme Authorization values.
    for auth in [
        Some("Basic amFtZjp3cm9uZw=="),
        None,
        Some("basic amFtZjpqYW1mLXdlYmhvb2stc2VjcmV0"),
        Some("Bearer amFtZjpqYW1mLXdlYmhvb2stc2VjcmV0"),
    ] {
        let mut h = vec![ct];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        let (st, v) = s.admin("POST", "/mdm/jamf", &h, lost.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{auth:?}: {v}");
        assert_eq!(v["error"], "unauthorized");
    }
    // GET is not a webhook.
    let (st, _) = s
        .admin(
            "GET",
            "/mdm/jamf",
            &[("authorization", JAMF_AUTH)],
            Bytes::new(),
        )
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);

    let auth = ("authorization", JAMF_AUTH);
    let bad_bodies: Vec<(&str, String)> = vec![
        ("malformed JSON", r#"{"webhook": {"id": 14, "webhookEvent": "#.into()),
        ("not an object", "[1,2,3]".into()),
        ("no webhook", json!({"event": phone()}).to_string()),
        (
            "missing eventTimestamp",
            json!({"webhook": {"id": 14, "webhookEvent": "SmartGroupMobileDeviceMembershipChange"},
                   "event": group_change(LOST_GROUP, false, json!([phone()]), json!([]), json!([]))})
            .to_string(),
        ),
        (
            "eventTimestamp as text",
            lost.replace(&format!("{}", t0 + 1000), &format!("\"{}\"", t0 + 1000)),
        ),
        (
            "implausible eventTimestamp",
            lost.replace(&format!("{}", t0 + 1000), "12"),
        ),
        (
            "missing webhook id",
            json!({"webhook": {"webhookEvent": "MobileDeviceEnrolled", "eventTimestamp": t0},
                   "event": phone()}).to_string(),
        ),
        (
            "missing udid",
            envelope("MobileDeviceCommandCompleted", t0 + 1000, 21,
                     json!({"jssID": PHONE_JSS, "mdmCommand": "EnableLostMode"})).to_string(),
        ),
        (
            "event not an object",
            envelope("MobileDeviceUnEnrolled", t0 + 1000, 22, json!("gone")).to_string(),
        ),
        (
            "udid of the wrong type",
            envelope("MobileDeviceUnEnrolled", t0 + 1000, 22, json!({"udid": 5})).to_string(),
        ),
        (
            "device id too long",
            envelope("MobileDeviceUnEnrolled", t0 + 1000, 22, json!({"udid": "x".repeat(300)})).to_string(),
        ),
        (
            "one bad member spoils the batch",
            envelope(
                "SmartGroupMobileDeviceMembershipChange", t0 + 1000, 14,
                group_change(LOST_GROUP, false, json!([phone(), {"udid": "\u{7}bell"}]), json!([]), json!([])),
            ).to_string(),
        ),
    ];
    for (what, body) in bad_bodies {
        let (st, v) = s.admin("POST", "/mdm/jamf", &[auth, ct], body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert_eq!(v["error"], "invalid_request", "{what}: {v}");
        assert!(
            !v["error_description"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    let (st, v) = s
        .admin(
            "POST",
            "/mdm/jamf",
            &[auth, ct],
            lost.replace("\"eventTimestamp\"", "\"eventtimestamp\""),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("eventTimestamp")
    );

    // A 10 MB body against a 64 KiB limit: 413 before it is read.
    let huge = format!(
        r#"{{"webhook": {{"id": 1, "webhookEvent": "ComputerAdded", "eventTimestamp": {t0}}}, "event": {{"udid": "{}"}}}}"#,
        "A".repeat(10 * 1024 * 1024)
    );
    let code = raw_post(
        s.server.admin_addr,
        "/mdm/jamf",
        &[auth, ct],
        huge.into_bytes(),
    )
    .await;
    assert_eq!(code, 413);

    // Nothing changed: same record, same history, same snapshot version.
    assert_eq!(s.server.shared.posture.snapshot().version(), version);
    let (_, after) = s.device(PHONE_UDID).await;
    assert_eq!(after, before);
    let token = s.token("m.ito@acme.example", PHONE_UDID);
    assert_eq!(s.request(&token).await.0, StatusCode::OK);
    let text = s.server.shared.proxy.metrics.encode();
    for kind in [
        "jamf.unauthenticated",
        "jamf.malformed",
        "jamf.invalid",
        "jamf.too-large",
    ] {
        assert!(
            text.contains(&format!(r#"feed="jamf",kind="{kind}",outcome="rejected""#)),
            "{kind}: {text}"
        );
    }
}

#[tokio::test]
async fn jamf_duplicates_apply_once_and_older_events_do_not_overwrite() {
    let s = setup(&feeds_toml("")).await;
    // In the past: events dated ahead of their acceptance are clamped to it.
    let t0 = now_ms() - 60_000;
    let (st, _) = s
        .jamf(&envelope("ComputerInventoryCompleted", t0, 12, mac()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let add = envelope(
        "SmartGroupComputerMembershipChange",
        t0 + 2000,
        15,
        group_change(
            NONCOMPLIANT_GROUP,
            true,
            json!([mac()]),
            json!([MAC_JSS]),
            json!([]),
        ),
    );
    let (_, v) = s.jamf(&add).await;
    assert_eq!(outcomes(&v), ["applied"]);
    // The same webhook again (Jamf retries, a proxy replays): applied once.
    let (st, v) = s.jamf(&add).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(outcomes(&v), ["duplicate"]);
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["history"].as_array().unwrap().len(), 2);

    // An older removal arriving late is logged as stale, not applied.
    let older = envelope(
        "SmartGroupComputerMembershipChange",
        t0 + 1000,
        15,
        group_change(
            NONCOMPLIANT_GROUP,
            true,
            json!([]),
            json!([]),
            json!([MAC_JSS]),
        ),
    );
    let (st, v) = s.jamf(&older).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(outcomes(&v), ["stale"]);
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["device"]["compliance"], "non_compliant");
    assert_eq!(rec["device"]["updated_ms"], json!(t0 + 2000));
    // An older inventory does not roll the OS version back either.
    let mut old_mac = mac();
    old_mac["osVersion"] = json!("14.0");
    let (_, v) = s
        .jamf(&envelope(
            "ComputerInventoryCompleted",
            t0 - 60_000,
            12,
            old_mac,
        ))
        .await;
    assert_eq!(outcomes(&v), ["stale"]);
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["device"]["os_version"], "15.3.2");
    // Epoch seconds are accepted too (by magnitude).
    let mut new_mac = mac();
    new_mac["osVersion"] = json!("15.4");
    let secs = t0 / 1000 + 60;
    let (st, v) = s
        .jamf(&envelope("ComputerInventoryCompleted", secs, 12, new_mac))
        .await;
    assert_eq!(
        (st, outcomes(&v)),
        (StatusCode::ACCEPTED, vec!["applied".to_owned()])
    );
    let (_, rec) = s.device(MAC_UDID).await;
    assert_eq!(rec["device"]["os_version"], "15.4");
    assert_eq!(rec["device"]["updated_ms"], json!(secs * 1000));
}

#[tokio::test]
async fn jamf_device_id_field_serial_number() {
    let s = setup(&feeds_toml("device_id_field = \"serialNumber\"")).await;
    let (st, v) = s.jamf(&envelope("ComputerAdded", now_ms(), 1, mac())).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, rec) = s.device("C02ZX1YZMD6M").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(rec["device"]["lifecycle"], "enrolled");
    let ext = rec["device"]["external_ids"].as_array().unwrap();
    assert!(
        ext.contains(&json!(format!("jamf:udid:{MAC_UDID}"))),
        "{ext:?}"
    );
    assert_eq!(s.device(MAC_UDID).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn jamf_and_intune_config_errors_name_the_key() {
    let pki = TestPki::new();
    let base = base_config(ISSUER, r#"jwks_file = "jwks.json""#, "");
    let cases = [
        (
            format!("{base}\n[feeds.jamf]\nauthorization = \"short\"\n"),
            "feeds.jamf.authorization",
        ),
        (
            format!(
                "{base}\n[feeds.jamf]\nauthorization = \"{JAMF_AUTH}\"\nlost_groups = [5, 5]\n"
            ),
            "feeds.jamf.lost_groups[1]",
        ),
        (
            format!("{base}\n[feeds.jamf]\nauthorization = \"{JAMF_AUTH}\"\nlost_group = [5]\n"),
            "lost_group",
        ),
        (
            format!(
                "{base}\n[feeds.intune]\ngraph_url = \"https://graph.microsoft.com/v1.0\"\ntoken_url = \"https://login.example/token\"\nclient_id = \"c\"\nclient_secret = \"\"\n"
            ),
            "feeds.intune.client_secret",
        ),
        (
            format!(
                "{base}\n[feeds.intune]\ngraph_url = \"https://graph.microsoft.com/v1.0\"\ntoken_url = \"https://login.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\ninterval_s = 600\nfull_sync_interval_s = 60\n"
            ),
            "feeds.intune.full_sync_interval_s",
        ),
        (
            format!(
                "{base}\n[feeds.intune]\ngraph_url = \"ftp://graph\"\ntoken_url = \"https://login.example/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n"
            ),
            "feeds.intune.graph_url",
        ),
    ];
    for (text, key) in cases {
        let path = pki.write_config("bad.toml", &text);
        let err = portcullis::config::Config::load(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains(key), "want `{key}` in: {err}");
    }
}

// ---------------------------------------------------------------- Intune

const TENANT_PATH: &str = "/tenant-1/oauth2/v2.0/token";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "s3cr3t~with/odd+chars=";
const DEVICES_PATH: &str = "/v1.0/deviceManagement/managedDevices";

/// A local Entra token endpoint and Graph `managedDevices`, two pages.
struct Graph {
    addr: SocketAddr,
    pages: Arc<Mutex<Vec<Vec<Value>>>>,
    token_hits: Arc<AtomicUsize>,
    graph_queries: Arc<Mutex<Vec<String>>>,
}

fn form_decode(s: &str) -> BTreeMap<String, String> {
    let dec = |v: &str| {
        let v = v.replace('+', " ");
        let b = v.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (dec(k), dec(v)))
        .collect()
}

impl Graph {
    async fn start(pages: Vec<Vec<Value>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pages = Arc::new(Mutex::new(pages));
        let token_hits = Arc::new(AtomicUsize::new(0));
        let graph_queries: Arc<Mutex<Vec<String>>> = Arc::default();
        let (p, t, q) = (pages.clone(), token_hits.clone(), graph_queries.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (p, t, q) = (p.clone(), t.clone(), q.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (p, t, q) = (p.clone(), t.clone(), q.clone());
                        async move { Ok::<_, Infallible>(graph_handle(req, addr, p, t, q).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            pages,
            token_hits,
            graph_queries,
        }
    }

    fn config(&self, secret: &str) -> portcullis::config::IntuneConfig {
        portcullis::config::IntuneConfig {
            graph_url: format!("http://{}/v1.0", self.addr),
            token_url: format!("http://{}{TENANT_PATH}", self.addr),
            client_id: CLIENT_ID.into(),
            client_secret: secret.into(),
            scope: "https://graph.microsoft.com/.default".into(),
            interval_s: 3600,
            device_id_field: "azureADDeviceId".into(),
            ca: None,
            full_sync_interval_s: 0,
        }
    }

    fn toml(&self) -> String {
        format!(
            "\n[feeds.intune]\ngraph_url = \"http://{a}/v1.0\"\ntoken_url = \"http://{a}{TENANT_PATH}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ninterval_s = 3600\n",
            a = self.addr
        )
    }
}

fn reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn graph_handle(
    req: Request<Incoming>,
    addr: SocketAddr,
    pages: Arc<Mutex<Vec<Vec<Value>>>>,
    token_hits: Arc<AtomicUsize>,
    queries: Arc<Mutex<Vec<String>>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path == TENANT_PATH {
        token_hits.fetch_add(1, Ordering::SeqCst);
        let ct = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let form = form_decode(std::str::from_utf8(&body).unwrap());
        let ok = is_form(&ct)
            && form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("scope").map(String::as_str)
                == Some("https://graph.microsoft.com/.default");
        if !ok {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"error": "invalid_request"}),
            );
        }
        if form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET) {
            return reply(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
            );
        }
        return reply(
            StatusCode::OK,
            &json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": "graph-token-1"}),
        );
    }
    if path == DEVICES_PATH {
        let authed = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer graph-token-1");
        if !authed {
            return reply(
                StatusCode::UNAUTHORIZED,
                &json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token is empty."}}),
            );
        }
        queries.lock().unwrap().push(query.clone());
        let pages = pages.lock().unwrap().clone();
        let n: usize = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("$skiptoken=page"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut body = json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#deviceManagement/managedDevices",
            "value": pages.get(n).cloned().unwrap_or_default(),
        });
        if n + 1 < pages.len() {
            body["@odata.nextLink"] = json!(format!(
                "http://{addr}{DEVICES_PATH}?$select=id&$skiptoken=page{}",
                n + 1
            ));
        }
        return reply(StatusCode::OK, &body);
    }
    reply(
        StatusCode::NOT_FOUND,
        &json!({"error": {"code": "NotFound"}}),
    )
}

fn is_form(content_type: &str) -> bool {
    content_type.starts_with("application/x-www-form-urlencoded")
}

const DEV_A: &str = "b7d9e1f3-2a4c-4e6f-8091-a2b3c4d5e6f7";
const DEV_B: &str = "c8e0f2a4-3b5d-4f70-9102-b3c4d5e6f7a8";

fn managed_device(intune_id: &str, aad: &str, sync: &str, extra: Value) -> Value {
    let mut d = json!({
        "id": intune_id, "azureADDeviceId": aad,
        "userPrincipalName": "m.ito@acme.example", "operatingSystem": "Windows", "osVersion": "10.0.26100.3194",
        "complianceState": "compliant", "complianceGracePeriodExpirationDateTime": "9999-12-31T23:59:59Z",
        "jailBroken": "Unknown", "isEncrypted": true, "managementAgent": "mdm",
        "partnerReportedThreatState": "unknown", "lastSyncDateTime": sync,
        "managedDeviceOwnerType": "company", "deviceActionResults": [], "serialNumber": "SN-1"
    });
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn rfc3339(ms: u64) -> String {
    portcullis::util::rfc3339(ms, false)
}

#[tokio::test]
async fn intune_poll_once_reflects_compliance_and_jailbreak_on_the_next_request() {
    let s = setup(&feeds_toml("")).await;
    let sync_a = rfc3339(now_ms() - 120_000);
    let sync_b = rfc3339(now_ms() - 60_000);
    let graph = Graph::start(vec![
        vec![managed_device("intune-a", DEV_A, &sync_a, json!({}))],
        vec![
            managed_device(
                "intune-b",
                DEV_B,
                &sync_b,
                json!({"jailBroken": "True", "complianceState": "noncompliant", "operatingSystem": "iOS",
                       "managedDeviceOwnerType": "personal"}),
            ),
            // Not Entra-registered: no usable device id, skipped.
            managed_device("intune-c", "00000000-0000-0000-0000-000000000000", &sync_b, json!({})),
        ],
    ])
    .await;
    let token_a = s.token("m.ito@acme.example", DEV_A);
    let token_b = s.token("m.ito@acme.example", DEV_B);
    assert_eq!(s.request(&token_b).await.0, StatusCode::OK);

    let poller = portcullis::feeds::intune::Poller::new(graph.config(CLIENT_SECRET)).unwrap();
    let ctx = s.server.shared.feeds.load_full();
    let r = portcullis::feeds::intune::poll_once(&ctx, &poller)
        .await
        .unwrap();
    assert!(r.full);
    assert_eq!(
        (r.pages, r.devices, r.applied, r.skipped),
        (2, 3, 2, 1),
        "{r:?}"
    );

    // The next request on the jailbroken device is refused; the other passes.
    let (st, body) = s.request(&token_b).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "device_compromised");
    assert_eq!(s.request(&token_a).await.0, StatusCode::OK);

    let (_, rec) = s.device(DEV_B).await;
    let d = &rec["device"];
    assert_eq!(d["compliance"], "non_compliant", "{rec}");
    assert_eq!(d["compromised"], true);
    assert_eq!(d["platform"], "ios");
    assert_eq!(d["ownership"], "byod");
    assert_eq!(d["management_source"], "intune");
    assert_eq!(d["lifecycle"], "enrolled");
    assert_eq!(d["subjects"], json!(["m.ito@acme.example"]));
    assert!(
        d["external_ids"]
            .as_array()
            .unwrap()
            .contains(&json!("intune:intune-b"))
    );
    let (_, rec) = s.device(DEV_A).await;
    assert_eq!(rec["device"]["compliance"], "compliant");
    assert_eq!(rec["device"]["ownership"], "corporate");

    // The watermark is durable; the next round filters on it, reuses the
    // cached token, and every unchanged device is a duplicate.
    let wm = r.watermark_ms.unwrap();
    assert_eq!(rfc3339(wm), sync_b);
    let r2 = portcullis::feeds::intune::poll_once(&ctx, &poller)
        .await
        .unwrap();
    assert!(!r2.full);
    assert_eq!((r2.applied, r2.duplicate), (0, 2), "{r2:?}");
    assert_eq!(graph.token_hits.load(Ordering::SeqCst), 1);
    let queries = graph.graph_queries.lock().unwrap().clone();
    assert_eq!(queries.len(), 4, "{queries:?}");
    assert!(!queries[0].contains("$filter"), "{}", queries[0]);
    assert!(
        queries[0].contains("$select=id,azureADDeviceId"),
        "{}",
        queries[0]
    );
    let since = rfc3339(wm - portcullis::feeds::intune::WATERMARK_LOOKBACK_MS);
    assert!(
        queries[2].ends_with(&format!("$filter=lastSyncDateTime%20ge%20{since}")),
        "{}",
        queries[2]
    );

    // Intune issues a wipe without a new sync: a changed record, a new event.
    graph.pages.lock().unwrap()[0][0]["deviceActionResults"] = json!([
        {"actionName": "wipe", "actionState": "pending",
         "startDateTime": rfc3339(now_ms()), "lastUpdatedDateTime": rfc3339(now_ms())}
    ]);
    let r3 = portcullis::feeds::intune::poll_once(&ctx, &poller)
        .await
        .unwrap();
    assert_eq!(r3.applied, 1, "{r3:?}");
    let (st, body) = s.request(&token_a).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    let (_, rec) = s.device(DEV_A).await;
    assert_eq!(rec["device"]["lifecycle"], "wipe_pending");
}

#[tokio::test]
async fn intune_wrong_client_secret_errors_and_changes_nothing() {
    let s = setup(&feeds_toml("")).await;
    let graph = Graph::start(vec![vec![managed_device(
        "intune-b",
        DEV_B,
        &rfc3339(now_ms()),
        json!({"jailBroken": "True"}),
    )]])
    .await;
    let poller = portcullis::feeds::intune::Poller::new(graph.config("not-the-secret")).unwrap();
    let ctx = s.server.shared.feeds.load_full();
    let version = s.server.shared.posture.snapshot().version();
    let err = portcullis::feeds::intune::poll_once(&ctx, &poller)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            portcullis::feeds::intune::PollError::Token { status: 401, .. }
        ),
        "{msg}"
    );
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(!msg.contains("not-the-secret"), "the secret leaked: {msg}");
    assert!(graph.graph_queries.lock().unwrap().is_empty());
    assert_eq!(s.device(DEV_B).await.0, StatusCode::NOT_FOUND);
    assert_eq!(s.server.shared.posture.snapshot().version(), version);
    let token_b = s.token("m.ito@acme.example", DEV_B);
    assert_eq!(s.request(&token_b).await.0, StatusCode::OK);
}

#[tokio::test]
async fn intune_foreign_next_link_is_refused_before_the_token_leaves() {
    let s = setup(&feeds_toml("")).await;
    let graph = Graph::start(vec![vec![], vec![]]).await;
    // Serve a nextLink on another origin by pointing graph_url at a
    // different spelling of the same server: the origin check is exact.
    let mut cfg = graph.config(CLIENT_SECRET);
    cfg.graph_url = format!("http://localhost:{}/v1.0", graph.addr.port());
    let poller = portcullis::feeds::intune::Poller::new(cfg).unwrap();
    let ctx = s.server.shared.feeds.load_full();
    let err = portcullis::feeds::intune::poll_once(&ctx, &poller)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            portcullis::feeds::intune::PollError::ForeignNextLink(_)
        ),
        "{err}"
    );
    assert_eq!(graph.graph_queries.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn intune_poller_runs_from_the_server_config() {
    let graph = Graph::start(vec![vec![managed_device(
        "intune-b",
        DEV_B,
        &rfc3339(now_ms()),
        json!({"jailBroken": "True"}),
    )]])
    .await;
    let s = setup(&feeds_toml(&graph.toml())).await;
    let snapshot = s.server.shared.posture.snapshot().clone();
    wait_until("the background Intune poll", || {
        snapshot.device(DEV_B).is_some_and(|d| d.compromised)
    })
    .await;
    let token_b = s.token("m.ito@acme.example", DEV_B);
    let (st, body) = s.request(&token_b).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    s.server.shutdown().await;
}
