//! Feed time is untrusted input: far-future events are refused whole, events
//! within the skew are clamped to their acceptance, ordering is per field (a
//! late check-in still lands), outcomes say what was not applied, lost /
//! compromised are sticky against routine reports from every feed, and a
//! Jamf webhook that raises trust is confirmed against a local fake of the
//! Jamf Pro API. Each proven by the next proxied request (GET and POST)
//! through real TLS to a real upstream, and by the admin API's read-back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use tokio::net::TcpListener;

const ISSUER: &str = "https://idp.test";
const API_TOKEN: &str = "admin-api-token-0123456789";
const MDM_SECRET: &str = "mdm-source-secret-0123456789";
const JAMF_AUTH: &str = "Basic amFtZjpqYW1mLXdlYmhvb2stc2VjcmV0";
const MAC_UDID: &str = "6A1C2E3F-9B8D-4C7A-8E6F-0D1C2B3A4F5E";
const MAC_JSS: u64 = 1843;
const PHONE_UDID: &str = "00008110-001A2B3C4D5E6F70";
const PHONE_JSS: u64 = 902;
const LOST_GROUP: u64 = 57;
const NONCOMPLIANT_GROUP: u64 = 60;
const JAMF_CLIENT_ID: &str = "portcullis-readback";
const JAMF_CLIENT_SECRET: &str = "jamf-api-secret-0123456789";
const JAMF_TOKEN: &str = "jamf-api-token-1";

fn now_ms() -> u64 {
    portcullis::util::now_unix_ms()
}

struct Setup {
    pki: TestPki,
    upstream: Upstream,
    cfg: std::path::PathBuf,
    server: Option<portcullis::server::RunningServer>,
    key: SigningKey,
}

async fn setup(extra: &str) -> Setup {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = SigningKey::es256("ec-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        json!({ "keys": [key.jwk] }).to_string(),
    )
    .unwrap();
    let routes = format!(
        r#"
[[routes]]
name = "app"
path_prefix = "/"
upstream = "{}"
auth = "bearer"

[feeds]

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"

[feeds.jamf]
authorization = "{JAMF_AUTH}"
lost_groups = [{LOST_GROUP}]
noncompliant_groups = [{NONCOMPLIANT_GROUP}]
compromised_groups = [62]
{extra}
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
    let cfg = pki.write_config("feed-time.toml", &cfg);
    let server = portcullis::server::start(cfg.clone()).await.unwrap();
    Setup {
        pki,
        upstream,
        cfg,
        server: Some(server),
        key,
    }
}

impl Setup {
    fn server(&self) -> &portcullis::server::RunningServer {
        self.server.as_ref().unwrap()
    }

    async fn restart(&mut self) {
        self.server.take().unwrap().shutdown().await;
        self.server = Some(portcullis::server::start(self.cfg.clone()).await.unwrap());
    }

    /// A token for `device`, issued a few seconds from now: later than any
    /// revocation recorded so far, so only the device's state decides it.
    fn fresh_token(&self, device: &str) -> String {
        let mut c = claims(ISSUER, "m.ito@acme.example");
        let now = portcullis::util::now_unix();
        c["iat"] = json!(now + 2);
        c["device_id"] = json!(device);
        self.key.sign(&c).unwrap()
    }

    /// One proxied GET and one POST; both statuses, and whether the upstream saw either.
    async fn access(&self, token: &str) -> (StatusCode, StatusCode, bool) {
        let before = self.upstream.count();
        let c = client(&self.pki.ca_pem, false);
        let base = format!("https://localhost:{}", self.server().proxy_addr.port());
        let (get_st, _, _) = get(&c, &format!("{base}/data"), Some(token), &[]).await;
        let req = Request::post(format!("{base}/data"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(full(r#"{"write":true}"#))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, c.request(req))
            .await
            .expect("request timed out")
            .expect("request failed");
        let post_st = resp.status();
        let _ = resp.into_body().collect().await;
        (get_st, post_st, self.upstream.count() > before)
    }

    async fn assert_allowed(&self, device: &str, why: &str) {
        let (g, p, seen) = self.access(&self.fresh_token(device)).await;
        assert_eq!((g, p), (StatusCode::OK, StatusCode::OK), "{why}");
        assert!(seen, "{why}: the upstream saw nothing");
    }

    async fn assert_refused(&self, device: &str, why: &str) {
        let (g, p, seen) = self.access(&self.fresh_token(device)).await;
        assert_eq!(
            (g, p),
            (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN),
            "{why}"
        );
        assert!(!seen, "{why}: a refused request reached the upstream");
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
            .uri(format!("http://{}{path}", self.server().admin_addr));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = tokio::time::timeout(DEADLINE, c.request(b.body(full(body)).unwrap()))
            .await
            .expect("admin request timed out")
            .expect("admin request failed");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v)
    }

    /// Posts generic MDM events (one object or an array).
    async fn mdm(&self, body: &Value) -> (StatusCode, Value) {
        let auth = format!("Bearer {MDM_SECRET}");
        self.admin(
            "POST",
            "/mdm/v1/acme/events",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

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

    async fn operator(&self, path: &str, idem: &str) -> (StatusCode, Value) {
        let auth = format!("Bearer {API_TOKEN}");
        self.admin(
            "POST",
            path,
            &[("authorization", &auth), ("idempotency-key", idem)],
            Bytes::new(),
        )
        .await
    }

    /// `GET /admin/v1/devices/{id}`.
    async fn device(&self, id: &str) -> Value {
        let auth = format!("Bearer {API_TOKEN}");
        let (st, v) = self
            .admin(
                "GET",
                &format!("/admin/v1/devices/{id}"),
                &[("authorization", &auth)],
                Bytes::new(),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v
    }

    async fn metrics(&self) -> String {
        let (_, v) = self.admin("GET", "/metrics", &[], Bytes::new()).await;
        v.as_str().unwrap_or_default().to_owned()
    }
}

fn event(id: &str, device: &str, at_ms: u64, fields: Value) -> Value {
    // Epoch milliseconds: RFC 3339 text here would round to the second.
    let mut e = json!({ "event_id": id, "device_id": device, "occurred_at": at_ms });
    for (k, v) in fields.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn envelope(event_name: &str, ts: u64, webhook_id: u64, event: Value) -> Value {
    json!({
        "webhook": { "id": webhook_id, "name": "posture", "webhookEvent": event_name, "eventTimestamp": ts },
        "event": event,
    })
}

fn mac() -> Value {
    json!({ "jssID": MAC_JSS, "udid": MAC_UDID, "serialNumber": "C02ZX1YZMD6M",
            "deviceName": "acme-mbp-1843", "model": "MacBookPro18,3", "osVersion": "15.3.2",
            "username": "m.ito", "emailAddress": "m.ito@acme.example" })
}

fn phone() -> Value {
    json!({ "jssID": PHONE_JSS, "udid": PHONE_UDID, "serialNumber": "F2LXK0ABCD12",
            "deviceName": "Mei's iPhone", "model": "iPhone 15", "modelDisplay": "iPhone 15",
            "osVersion": "18.3", "username": "m.ito" })
}

fn group_change(group: u64, added: &[u64], removed: &[u64]) -> Value {
    json!({ "jssid": group, "name": "POSTURE", "smartGroup": true, "computer": true,
            "groupAddedDevices": [], "groupAddedDevicesIds": added,
            "groupRemovedDevices": [], "groupRemovedDevicesIds": removed })
}

#[tokio::test]
async fn a_far_future_compliant_event_is_refused_and_a_later_lost_report_holds_for_new_tokens() {
    let s = setup("").await;
    let dev = "laptop-2099";
    let t0 = now_ms();
    let (st, v) = s
        .mdm(&event(
            "enrol-1",
            dev,
            t0 - 60_000,
            json!({"lifecycle": "enrolled", "compliance": "non_compliant"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let before = s.device(dev).await;

    // Dated 2099 and saying "compliant": refused, in the feed's own error
    // format, and nothing of the request is applied (the valid event beside
    // it included).
    let future = event(
        "future-1",
        dev,
        4_102_444_800_000,
        json!({"lifecycle": "enrolled", "compliance": "compliant"}),
    );
    let honest = event("honest-1", dev, t0 - 1_000, json!({"patch_behind": true}));
    let (st, v) = s.mdm(&json!([honest, future])).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "invalid_request");
    let why = v["error_description"].as_str().unwrap();
    assert!(
        why.contains("future") && why.contains("mdm:acme:future-1"),
        "{why}"
    );
    let after = s.device(dev).await;
    assert_eq!(
        after["device"], before["device"],
        "a refused request changed the record"
    );
    assert_eq!(after["history"], before["history"]);
    assert!(
        s.metrics()
            .await
            .lines()
            .any(|l| l.contains("outcome=\"future\"")
                && l.contains("feed=\"mdm\"")
                && !l.ends_with(" 0")),
        "the refusal is counted as outcome=\"future\""
    );

    // The same far-future time from Jamf: refused whole too (400 JSON).
    let (st, v) = s
        .jamf(&envelope(
            "ComputerCheckIn",
            4_102_444_800_000,
            7,
            json!({"computer": mac()}),
        ))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error_description"].as_str().unwrap().contains("future"),
        "{v}"
    );

    // A later lost report is applied, and holds for a token issued after it.
    let (st, v) = s
        .mdm(&event(
            "lost-1",
            dev,
            now_ms(),
            json!({"lifecycle": "lost"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert_eq!(s.device(dev).await["device"]["lifecycle"], "lost");
    s.assert_refused(dev, "a token issued after the lost report, GET and POST")
        .await;
}

#[tokio::test]
async fn an_event_within_the_skew_is_clamped_to_its_acceptance() {
    let s = setup("").await;
    let dev = "laptop-skew";
    // Two minutes ahead: inside the default five-minute skew, so accepted,
    // but recorded as happening when it was accepted.
    let ahead = now_ms() + 120_000;
    let (st, v) = s
        .mdm(&event(
            "ahead-1",
            dev,
            ahead,
            json!({"lifecycle": "enrolled", "compliance": "compliant"}),
        ))
        .await;
    let answered = now_ms();
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied");
    let rec = s.device(dev).await;
    let updated = rec["device"]["updated_ms"].as_u64().unwrap();
    assert!(
        updated <= answered,
        "origin not clamped: {updated} > {answered}"
    );
    let logged = &rec["history"][0];
    assert!(
        logged["event"]["origin_ms"].as_u64().unwrap() <= logged["accepted_ms"].as_u64().unwrap()
    );
    s.assert_allowed(dev, "enrolled and compliant").await;

    // An honest report sent after it, dated before the (claimed) future
    // time, is not stale: the clamped time cannot freeze the field.
    let (st, v) = s
        .mdm(&event(
            "honest-2",
            dev,
            now_ms() + 1,
            json!({"compliance": "non_compliant"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert_eq!(s.device(dev).await["device"]["compliance"], "non_compliant");
}

#[tokio::test]
async fn a_late_check_in_is_applied_while_newer_compliance_stays() {
    let mut s = setup("").await;
    let dev = "laptop-late";
    let t0 = now_ms();
    let (st, _) = s
        .mdm(&event(
            "new-1",
            dev,
            t0 - 10_000,
            json!({"lifecycle": "enrolled", "compliance": "non_compliant"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);

    // Older than the compliance verdict, but the only news on check-in.
    let late = t0 - 60_000;
    let (st, v) = s
        .mdm(&event(
            "late-1",
            dev,
            late,
            json!({"compliance": "compliant", "last_check_in": late}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let r = &v["results"][0];
    assert_eq!(r["outcome"], "partial", "{v}");
    // Every generic event names its source too, and that is newer as well.
    assert_eq!(
        r["stale_fields"],
        json!(["compliance", "management_source"]),
        "{v}"
    );
    let rec = s.device(dev).await;
    let d = &rec["device"];
    assert_eq!(d["compliance"], "non_compliant", "{rec}");
    assert_eq!(d["last_check_in_ms"], json!(late), "{rec}");
    assert_eq!(d["field_ms"]["compliance"], json!(t0 - 10_000));
    assert_eq!(d["field_ms"]["last_check_in_ms"], json!(late));
    let logged = rec["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(logged["outcome"], "partial");
    assert_eq!(
        logged["stale_fields"],
        json!(["compliance", "management_source"])
    );
    assert!(
        s.metrics()
            .await
            .lines()
            .any(|l| l.contains("outcome=\"partial\"") && !l.ends_with(" 0"))
    );

    // Per-field times survive a restart: the same late verdict is still
    // stale afterwards, and a late patch flag still lands.
    s.restart().await;
    let rec = s.device(dev).await;
    assert_eq!(rec["device"]["field_ms"]["compliance"], json!(t0 - 10_000));
    assert_eq!(
        rec["history"].as_array().unwrap().last().unwrap()["stale_fields"],
        json!(["compliance", "management_source"])
    );
    let (st, v) = s
        .mdm(&event(
            "late-2",
            dev,
            t0 - 30_000,
            json!({"compliance": "compliant", "patch_behind": true}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "partial", "{v}");
    let d = s.device(dev).await["device"].clone();
    assert_eq!(
        (d["compliance"].clone(), d["patch_behind"].clone()),
        (json!("non_compliant"), json!(true))
    );
}

#[tokio::test]
async fn lost_is_sticky_against_routine_reports_from_two_feeds_until_reenrolment_or_restore() {
    let s = setup("").await;
    let dev = MAC_UDID;
    let t0 = now_ms();
    // Known to Jamf (so smart groups resolve it), enrolled and compliant.
    let (st, v) = s
        .jamf(&envelope("ComputerAdded", t0 - 120_000, 1, mac()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let (st, _) = s
        .mdm(&event(
            "ok-1",
            dev,
            t0 - 110_000,
            json!({"compliance": "compliant"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    s.assert_allowed(dev, "enrolled and compliant").await;

    // Reported lost (generic MDM).
    let (st, _) = s
        .mdm(&event(
            "lost-1",
            dev,
            now_ms(),
            json!({"lifecycle": "lost"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    s.assert_refused(dev, "lost").await;

    // A routine compliance report from the same feed, newer than the lost
    // report, saying enrolled and compliant: the lifecycle is held.
    let (st, v) = s
        .mdm(&event(
            "routine-1",
            dev,
            now_ms() + 1,
            json!({"lifecycle": "enrolled", "compliance": "compliant", "last_check_in": now_ms()}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "partial", "{v}");
    assert_eq!(v["results"][0]["held_fields"], json!(["lifecycle"]), "{v}");
    assert_eq!(s.device(dev).await["device"]["lifecycle"], "lost");
    s.assert_refused(dev, "a routine generic report does not clear lost")
        .await;

    // Jamf: leaving the lost-mode smart group is routine too (no API
    // configured here): the lifecycle is held, the rest (platform, source)
    // applies.
    let (st, v) = s
        .jamf(&envelope(
            "SmartGroupComputerMembershipChange",
            now_ms() + 2,
            2,
            group_change(LOST_GROUP, &[], &[MAC_JSS]),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "partial", "{v}");
    assert_eq!(v["results"][0]["held_fields"], json!(["lifecycle"]), "{v}");
    s.assert_refused(dev, "a routine Jamf report does not clear lost")
        .await;
    let rec = s.device(dev).await;
    let last = rec["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["outcome"].clone(), last["held_fields"].clone()),
        (json!("partial"), json!(["lifecycle"])),
        "{rec}"
    );

    // A Jamf re-enrolment (ComputerAdded after the lost report) clears it.
    let (st, v) = s
        .jamf(&envelope("ComputerAdded", now_ms() + 3, 3, mac()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert_eq!(s.device(dev).await["device"]["lifecycle"], "enrolled");
    s.assert_allowed(dev, "re-enrolled in Jamf").await;

    // Lost again; a generic event that says it re-enrols clears it.
    let (st, _) = s
        .mdm(&event(
            "lost-2",
            dev,
            now_ms() + 4,
            json!({"lifecycle": "lost"}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    s.assert_refused(dev, "lost again").await;
    let (st, v) = s
        .mdm(&event(
            "reenrol-1",
            dev,
            now_ms() + 5,
            json!({"lifecycle": "enrolled", "reenrolled": true}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    s.assert_allowed(dev, "re-enrolled (generic)").await;

    // Compromised is sticky too, and the operator's restore clears it.
    let (st, _) = s
        .mdm(&event(
            "jb-1",
            dev,
            now_ms() + 6,
            json!({"compromised": true}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    s.assert_refused(dev, "compromised").await;
    let (st, v) = s
        .mdm(&event(
            "jb-2",
            dev,
            now_ms() + 7,
            json!({"compromised": false}),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(
        v["results"][0]["held_fields"],
        json!(["compromised"]),
        "{v}"
    );
    s.assert_refused(dev, "a routine report does not clear compromised")
        .await;

    let (st, v) = s
        .operator(&format!("/admin/v1/devices/{dev}/restore"), "restore-1")
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["outcome"], "applied", "{v}");
    s.assert_allowed(dev, "restored by the operator").await;
    // Same idempotency key: a duplicate, nothing new.
    let (st, v) = s
        .operator(&format!("/admin/v1/devices/{dev}/restore"), "restore-1")
        .await;
    assert_eq!(
        (st, v["outcome"].clone()),
        (StatusCode::ACCEPTED, json!("duplicate"))
    );
    // Unknown device: nothing to restore.
    let (st, _) = s
        .operator("/admin/v1/devices/no-such-device/restore", "restore-2")
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// A local fake of the Jamf Pro API: OAuth client credentials and the
/// computer / mobile-device reads, with a switchable answer.
struct JamfApi {
    addr: SocketAddr,
    /// Group ids the API reports for every device.
    groups: Arc<Mutex<Vec<u64>>>,
    /// Lost mode the API reports for mobile devices.
    lost_mode: Arc<AtomicBool>,
    /// When set, new connections are closed unanswered and requests on
    /// open ones get 503.
    down: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
}

impl JamfApi {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = Self {
            addr,
            groups: Arc::default(),
            lost_mode: Arc::default(),
            down: Arc::default(),
            reads: Arc::default(),
        };
        let (g, l, d, r) = (
            api.groups.clone(),
            api.lost_mode.clone(),
            api.down.clone(),
            api.reads.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let (g, l, d, r) = (g.clone(), l.clone(), d.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (g, l, d, r) = (g.clone(), l.clone(), d.clone(), r.clone());
                        async move { Ok::<_, Infallible>(jamf_api_handle(req, g, l, d, r).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        api
    }

    fn toml(&self) -> String {
        format!(
            "[feeds.jamf.api]\nurl = \"http://{}\"\nclient_id = \"{JAMF_CLIENT_ID}\"\nclient_secret = \"{JAMF_CLIENT_SECRET}\"\ntimeout_s = 5\n",
            self.addr
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

async fn jamf_api_handle(
    req: Request<Incoming>,
    groups: Arc<Mutex<Vec<u64>>>,
    lost_mode: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path == "/api/oauth/token" && req.method() == http::Method::POST {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        let ok = body.contains("grant_type=client_credentials")
            && body.contains(&format!("client_id={JAMF_CLIENT_ID}"))
            && body.contains(&format!("client_secret={JAMF_CLIENT_SECRET}"));
        if !ok {
            return reply(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_client"}),
            );
        }
        return reply(
            StatusCode::OK,
            &json!({"access_token": JAMF_TOKEN, "token_type": "Bearer", "expires_in": 1199, "scope": "api-role:1"}),
        );
    }
    if down.load(Ordering::SeqCst) {
        return reply(StatusCode::SERVICE_UNAVAILABLE, &json!({"httpStatus": 503}));
    }
    let authed = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v == &format!("Bearer {JAMF_TOKEN}")[..]);
    if !authed {
        return reply(StatusCode::UNAUTHORIZED, &json!({"httpStatus": 401}));
    }
    let memberships: Vec<Value> = groups
        .lock()
        .unwrap()
        .iter()
        .map(
            |g| json!({"groupId": g.to_string(), "groupName": format!("g{g}"), "smartGroup": true}),
        )
        .collect();
    if path == format!("/api/v1/computers-inventory/{MAC_JSS}") {
        assert_eq!(query, "section=GROUP_MEMBERSHIPS");
        reads.fetch_add(1, Ordering::SeqCst);
        return reply(
            StatusCode::OK,
            &json!({"id": MAC_JSS.to_string(), "udid": MAC_UDID, "groupMemberships": memberships}),
        );
    }
    if path == format!("/api/v2/mobile-devices/{PHONE_JSS}/detail") {
        reads.fetch_add(1, Ordering::SeqCst);
        let groups: Vec<Value> = memberships
            .iter()
            .map(|m| json!({"groupId": m["groupId"], "groupName": m["groupName"], "smart": true}))
            .collect();
        return reply(
            StatusCode::OK,
            &json!({"id": PHONE_JSS.to_string(), "udid": PHONE_UDID, "type": "ios", "groups": groups,
                    "ios": {"security": {"lostModeEnabled": lost_mode.load(Ordering::SeqCst)}}}),
        );
    }
    reply(StatusCode::NOT_FOUND, &json!({"httpStatus": 404}))
}

#[tokio::test]
async fn a_jamf_webhook_raises_trust_only_when_the_jamf_api_confirms_it() {
    let api = JamfApi::start().await;
    let s = setup(&api.toml()).await;
    let dev = MAC_UDID;
    let t0 = now_ms();
    // Known and enrolled; the API agrees with the enrolment (no lost group).
    let (st, v) = s
        .jamf(&envelope("ComputerAdded", t0 - 120_000, 1, mac()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert_eq!(
        api.reads.load(Ordering::SeqCst),
        1,
        "the enrolment was read back"
    );
    // Into the non-compliant smart group: lowering trust needs no confirmation.
    *api.groups.lock().unwrap() = vec![NONCOMPLIANT_GROUP];
    let (st, v) = s
        .jamf(&envelope(
            "SmartGroupComputerMembershipChange",
            t0 - 60_000,
            2,
            group_change(NONCOMPLIANT_GROUP, &[MAC_JSS], &[]),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(api.reads.load(Ordering::SeqCst), 1);
    assert_eq!(s.device(dev).await["device"]["compliance"], "non_compliant");

    // Leaves the group, but the API still lists it: trust is not raised.
    let (st, v) = s
        .jamf(&envelope(
            "SmartGroupComputerMembershipChange",
            t0 - 50_000,
            3,
            group_change(NONCOMPLIANT_GROUP, &[], &[MAC_JSS]),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let r = &v["results"][0];
    assert_eq!(r["unconfirmed_fields"], json!(["compliance"]), "{v}");
    assert!(
        r["confirmation"].as_str().unwrap().contains("disagrees"),
        "{v}"
    );
    assert_eq!(s.device(dev).await["device"]["compliance"], "non_compliant");
    assert_eq!(api.reads.load(Ordering::SeqCst), 2);

    // The API is down: not raised either (fail closed).
    api.groups.lock().unwrap().clear();
    api.down.store(true, Ordering::SeqCst);
    let (st, v) = s
        .jamf(&envelope(
            "SmartGroupComputerMembershipChange",
            t0 - 40_000,
            4,
            group_change(NONCOMPLIANT_GROUP, &[], &[MAC_JSS]),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let r = &v["results"][0];
    assert_eq!(r["unconfirmed_fields"], json!(["compliance"]), "{v}");
    assert!(
        r["confirmation"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{v}"
    );
    assert_eq!(s.device(dev).await["device"]["compliance"], "non_compliant");
    assert!(
        s.metrics()
            .await
            .lines()
            .any(|l| l.contains("outcome=\"unconfirmed\"") && !l.ends_with(" 0"))
    );

    // Back up and confirming: applied; the next request goes through.
    api.down.store(false, Ordering::SeqCst);
    let (st, v) = s
        .jamf(&envelope(
            "SmartGroupComputerMembershipChange",
            t0 - 30_000,
            5,
            group_change(NONCOMPLIANT_GROUP, &[], &[MAC_JSS]),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert!(v["results"][0].get("unconfirmed_fields").is_none(), "{v}");
    assert_eq!(s.device(dev).await["device"]["compliance"], "compliant");

    // Mobile: lost mode on, then DisableLostMode. While the API still
    // reports lost mode the device stays lost; once it confirms, the
    // operator's command in Jamf clears the sticky lost.
    let (st, v) = s
        .jamf(&envelope("MobileDeviceEnrolled", t0 - 20_000, 6, phone()))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let mut cmd = phone();
    cmd["mdmCommand"] = json!("EnableLostMode");
    let (st, _) = s
        .jamf(&envelope(
            "MobileDeviceCommandCompleted",
            t0 - 10_000,
            7,
            cmd.clone(),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(s.device(PHONE_UDID).await["device"]["lifecycle"], "lost");
    api.lost_mode.store(true, Ordering::SeqCst);
    cmd["mdmCommand"] = json!("DisableLostMode");
    let (st, v) = s
        .jamf(&envelope(
            "MobileDeviceCommandCompleted",
            now_ms(),
            8,
            cmd.clone(),
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(
        v["results"][0]["unconfirmed_fields"],
        json!(["lifecycle"]),
        "{v}"
    );
    assert_eq!(s.device(PHONE_UDID).await["device"]["lifecycle"], "lost");
    s.assert_refused(PHONE_UDID, "lost mode not confirmed off")
        .await;
    api.lost_mode.store(false, Ordering::SeqCst);
    let (st, v) = s
        .jamf(&envelope(
            "MobileDeviceCommandCompleted",
            now_ms() + 1,
            9,
            cmd,
        ))
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["results"][0]["outcome"], "applied", "{v}");
    assert_eq!(
        s.device(PHONE_UDID).await["device"]["lifecycle"],
        "enrolled"
    );
    s.assert_allowed(PHONE_UDID, "lost mode off, confirmed by the Jamf Pro API")
        .await;
}
