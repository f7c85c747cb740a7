//! Many replicas, one picture: three real `portcullis serve` processes on
//! `[store] kind = "nats"` and a real nats-server with JetStream on
//! loopback. A change accepted by one replica is enforced by the others; a
//! DPoP proof spent at one is refused at another; nats-server and a replica
//! are SIGKILLed and restarted mid-stream and every replica ends with the
//! same events, none lost and none applied twice; feeds answer 503 while
//! NATS is down and readiness follows staleness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::NatsServer;
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";
const MDM_SECRET: &str = "mdm-secret-0123456789";
const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

struct Cluster {
    pki: TestPki,
    nats: NatsServer,
    upstream: Upstream,
    user_key: SigningKey,
    replicas: Vec<Option<ServeProcess>>,
}

fn replica_config(c: &Cluster, i: usize, cache: &str) -> PathBuf {
    replica_config_with(c, i, cache, "")
}

/// A replica's config; `extra` goes before the bearer route (more issuers,
/// `[browser]`, more routes).
fn replica_config_with(c: &Cluster, i: usize, cache: &str, extra: &str) -> PathBuf {
    let routes = format!(
        "{extra}\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        c.upstream.url()
    );
    let body = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\"\n"),
    ) + &format!(
        r#"
[store]
path = "r{i}.db"
sync = "normal"
kind = "nats"

[store.nats]
url = "{url}"
replica = "r{i}"
max_staleness_s = 1
ack_timeout_ms = 2000
cache = "{cache}"

[feeds]
max_body_bytes = 65536

[feeds.scim]
token = "{SCIM_TOKEN}"

[[feeds.mdm]]
name = "acme"
secret = "{MDM_SECRET}"
"#,
        url = c.nats.url()
    );
    c.pki.write_config(&format!("r{i}.toml"), &body)
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(&["full", "full", "full"]).await
    }

    async fn start_with(caches: &[&str]) -> Self {
        let pki = TestPki::new();
        let nats = NatsServer::start().await;
        let upstream = Upstream::start().await;
        let user_key = SigningKey::es256("user-1").unwrap();
        std::fs::write(
            pki.path().join("jwks.json"),
            json!({"keys": [user_key.jwk]}).to_string(),
        )
        .unwrap();
        let mut c = Self {
            pki,
            nats,
            upstream,
            user_key,
            replicas: Vec::new(),
        };
        for (i, cache) in caches.iter().enumerate() {
            let cfg = replica_config(&c, i, cache);
            c.replicas.push(Some(ServeProcess::spawn(&cfg).await));
        }
        c
    }

    fn r(&self, i: usize) -> &ServeProcess {
        self.replicas[i].as_ref().unwrap()
    }

    fn token(&self, sub: &str, device: &str, cnf: Option<Value>) -> String {
        let mut c = claims(ISS, sub);
        c["device_id"] = device.into();
        if let Some(cnf) = cnf {
            c["cnf"] = cnf;
        }
        self.user_key.sign(&c).unwrap()
    }

    /// A proxied GET at replica `i`; the status and whether the upstream saw it.
    async fn request(&self, i: usize, token: &str, extra: &[(&str, &str)]) -> (StatusCode, bool) {
        self.request_as(i, &format!("Bearer {token}"), extra).await
    }

    async fn request_as(
        &self,
        i: usize,
        authorization: &str,
        extra: &[(&str, &str)],
    ) -> (StatusCode, bool) {
        let before = self.upstream.count();
        let c = client(&self.pki.ca_pem, false);
        let url = self.url(i);
        let mut headers = vec![("authorization", authorization)];
        headers.extend_from_slice(extra);
        let (st, _, _) = get(&c, &url, None, &headers).await;
        (st, self.upstream.count() > before)
    }

    fn url(&self, i: usize) -> String {
        format!("https://localhost:{}/app", self.r(i).proxy.port())
    }

    async fn mdm_lost(&self, i: usize, event_id: &str, device: &str) -> (StatusCode, Value) {
        let now = portcullis::util::now_unix_ms();
        send(
            self.r(i).admin,
            "POST",
            "/mdm/v1/acme/events",
            MDM_SECRET,
            "application/json",
            format!(
                r#"{{"event_id":"{event_id}","device_id":"{device}","occurred_at":{now},"lifecycle":"lost","platform":"windows"}}"#
            ),
        )
        .await
    }

    async fn mdm_compliance(&self, i: usize, event_id: &str, device: &str) -> StatusCode {
        let now = portcullis::util::now_unix_ms();
        send(
            self.r(i).admin,
            "POST",
            "/mdm/v1/acme/events",
            MDM_SECRET,
            "application/json",
            format!(
                r#"{{"event_id":"{event_id}","device_id":"{device}","occurred_at":{now},"compliance":"compliant","platform":"macos"}}"#
            ),
        )
        .await
        .0
    }

    async fn scim(&self, i: usize, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        send(
            self.r(i).admin,
            method,
            &format!("/scim/v2{path}"),
            SCIM_TOKEN,
            "application/scim+json",
            body.to_string(),
        )
        .await
    }

    async fn ready(&self, i: usize) -> StatusCode {
        send(self.r(i).admin, "GET", "/readyz", "", "text/plain", "")
            .await
            .0
    }

    /// Events in replica `i`'s own log (its SQLite database, read-only).
    fn logged(&self, i: usize) -> (u64, u64, u64) {
        let db = self.pki.path().join(format!("r{i}.db"));
        let conn = rusqlite::Connection::open_with_flags(
            &db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let (n, distinct): (i64, i64) = conn
            .query_row("SELECT count(*), count(DISTINCT id) FROM events", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let (n, distinct) = (n as u64, distinct as u64);
        let pos: u64 = conn
            .query_row("SELECT v FROM meta WHERE k = 'nats.stream_seq'", [], |r| {
                r.get::<_, String>(0)
            })
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        (n, distinct, pos)
    }
}

impl Cluster {
    /// Replica `i`'s records (devices, identities, revocations, groups,
    /// sessions) from its own database, without the local version numbers.
    fn records(&self, i: usize) -> std::collections::BTreeMap<String, Value> {
        let db = self.pki.path().join(format!("r{i}.db"));
        let conn = rusqlite::Connection::open_with_flags(
            &db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut out = std::collections::BTreeMap::new();
        for (table, key) in [
            ("devices", "id"),
            ("identities", "subject"),
            ("revocations", "target || ':' || key"),
            ("groups", "id"),
            ("sessions", "id_hash"),
        ] {
            let mut st = conn
                .prepare(&format!("SELECT {key}, body FROM {table}"))
                .unwrap();
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .unwrap();
            for row in rows {
                let (k, body) = row.unwrap();
                let mut v: Value = serde_json::from_str(&body).unwrap();
                if let Some(o) = v.as_object_mut() {
                    o.remove("version");
                }
                out.insert(format!("{table}/{k}"), v);
            }
        }
        out
    }

    /// A meta value from replica `i`'s database.
    fn meta(&self, i: usize, key: &str) -> Option<String> {
        let db = self.pki.path().join(format!("r{i}.db"));
        let conn = rusqlite::Connection::open_with_flags(
            &db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row("SELECT v FROM meta WHERE k = ?1", [key], |r| r.get(0))
            .ok()
    }
}

/// Pauses (SIGSTOP) or resumes (SIGCONT) a replica process.
fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// The records bucket's completeness marker.
async fn marker(js: &async_nats::jetstream::Context) -> u64 {
    let kv = js.get_key_value("PORTCULLIS_EVENTS_RECORDS").await.unwrap();
    kv.get(portcullis::posture::cluster::records::MARKER_KEY)
        .await
        .unwrap()
        .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
        .and_then(|v| v["pos"].as_u64())
        .unwrap_or(0)
}

async fn send(
    admin: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    content_type: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("content-type", content_type);
    if !auth.is_empty() {
        b = b.header("authorization", format!("Bearer {auth}"));
    }
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(
        DEADLINE,
        http.request(b.body(Full::new(body.into())).unwrap()),
    )
    .await
    .expect("admin request timed out")
    .expect("admin request failed");
    let st = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Polls an async condition until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn refused(st: StatusCode) -> bool {
    st == StatusCode::FORBIDDEN || st == StatusCode::UNAUTHORIZED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scim_user_created_at_one_replica_is_found_at_once_by_the_others() {
    // A provisioning client behind a load balancer: it creates a user on
    // one replica, then reads and patches it on the next ones, with no
    // pause in between. Every replica answers from its own picture, so it
    // must first have applied what the stream held when asked.
    let c = Cluster::start().await;
    for k in 0..15usize {
        let (st, v) = c
            .scim(
                k % 3,
                "POST",
                "/Users",
                json!({"schemas": [USER], "userName": format!("rw-{k}@acme.example"), "active": true}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let (st, v) = c
            .scim((k + 1) % 3, "GET", &format!("/Users/{id}"), Value::Null)
            .await;
        assert_eq!(st, StatusCode::OK, "read at the next replica: {v}");
        let (st, v) = c
            .scim(
                (k + 2) % 3,
                "PATCH",
                &format!("/Users/{id}"),
                json!({"schemas": [PATCH_OP], "Operations": [{"op": "replace", "value": {"active": false}}]}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "patch at the third replica: {v}");
        assert_eq!(v["active"], false, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_accepted_by_one_replica_is_enforced_by_every_other() {
    let c = Cluster::start().await;

    // A lost device, reported to replica 1, is refused at 2 and 3.
    let t = c.token("hank", "win-h", None);
    for i in 0..3 {
        assert_eq!(c.request(i, &t, &[]).await, (StatusCode::OK, true), "r{i}");
    }
    let (st, body) = c.mdm_lost(0, "lost-1", "win-h").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["results"][0]["outcome"], "applied", "{body}");
    // Acknowledged means applied at the accepting replica already.
    let (st, fwd) = c.request(0, &t, &[]).await;
    assert!(refused(st) && !fwd, "r0: {st}");
    for i in 1..3 {
        eventually(&format!("r{i} to refuse the lost device"), || async {
            let (st, fwd) = c.request(i, &t, &[]).await;
            refused(st) && !fwd
        })
        .await;
    }
    // The same event again, at another replica: a duplicate, applied once.
    let (st, body) = c.mdm_lost(2, "lost-1", "win-h").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["results"][0]["outcome"], "duplicate", "{body}");

    // A SCIM leaver at replica 2 refuses the person's tokens at 1 and 3.
    let sub = "m.ito@acme.example";
    let (st, v) = c
        .scim(
            1,
            "POST",
            "/Users",
            json!({"schemas": [USER], "userName": sub, "active": true, "externalId": "00u1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let t = c.token(sub, "mac-m", None);
    for i in 0..3 {
        eventually(&format!("r{i} to know the joiner"), || async {
            c.request(i, &t, &[]).await == (StatusCode::OK, true)
        })
        .await;
    }
    let (st, v) = c
        .scim(
            1,
            "PATCH",
            &format!("/Users/{id}"),
            json!({"schemas": [PATCH_OP], "Operations": [{"op": "replace", "value": {"active": false}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for i in [0, 2] {
        eventually(&format!("r{i} to refuse the leaver"), || async {
            let (st, fwd) = c.request(i, &t, &[]).await;
            refused(st) && !fwd
        })
        .await;
    }

    // A DPoP proof used at replica 1 is refused at replica 2. Both stand for
    // one external name (as behind a load balancer): the proof's `htu` names
    // replica 1 and the request to replica 2 carries that Host.
    let key = SigningKey::es256("dpop-1").unwrap();
    let t = c.token(
        "dora",
        "mac-d",
        Some(json!({"jkt": key.thumbprint().unwrap()})),
    );
    let url = c.url(0);
    let host = format!("localhost:{}", c.r(0).proxy.port());
    let auth = format!("DPoP {t}");
    let proof = key.dpop_proof("GET", &url, Some(&t), None).unwrap();
    assert_eq!(
        c.request_as(0, &auth, &[("dpop", &proof)]).await,
        (StatusCode::OK, true)
    );
    assert_eq!(
        c.request_as(1, &auth, &[("dpop", &proof), ("host", &host)])
            .await,
        (StatusCode::UNAUTHORIZED, false),
        "the proof spent at r0 is refused at r1"
    );
    // A fresh proof for the same name passes at replica 2: the refusal was the replay.
    let fresh = key.dpop_proof("GET", &url, Some(&t), None).unwrap();
    assert_eq!(
        c.request_as(1, &auth, &[("dpop", &fresh), ("host", &host)])
            .await,
        (StatusCode::OK, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_replica_crashes_lose_nothing_and_apply_nothing_twice() {
    let mut c = Cluster::start().await;
    let mut acked: Vec<String> = Vec::new();
    let mut next = 0usize;
    let mut ids = |n: usize| -> Vec<(usize, String)> {
        (0..n)
            .map(|_| {
                next += 1;
                (next % 3, format!("ev-{next}"))
            })
            .collect()
    };

    // Mid-stream: a sender feeds the three replicas round-robin and retries
    // each event until it is acknowledged, as a feed does.
    let admins: Vec<SocketAddr> = (0..3).map(|i| c.r(i).admin).collect();
    let batch = ids(60);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let sender = tokio::spawn(async move {
        let mut done = Vec::new();
        for (n, (i, id)) in batch.into_iter().enumerate() {
            let start = Instant::now();
            loop {
                let now = portcullis::util::now_unix_ms();
                let (st, _) = send(
                    admins[i],
                    "POST",
                    "/mdm/v1/acme/events",
                    MDM_SECRET,
                    "application/json",
                    format!(r#"{{"event_id":"{id}","device_id":"dev-{id}","occurred_at":{now},"compliance":"compliant"}}"#),
                )
                .await;
                if st == StatusCode::ACCEPTED {
                    break;
                }
                assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{id}: only 202 or 503");
                assert!(start.elapsed() < DEADLINE * 2, "{id} never acknowledged");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done.push(id);
            let _ = progress_tx.send(n + 1);
        }
        done
    });
    progress.wait_for(|n| *n >= 20).await.unwrap();

    // nats-server SIGKILLed mid-stream: feeds answer 503 (never 2xx),
    // readiness follows staleness, requests keep being decided on the last state.
    c.nats.kill();
    let t = c.token("erin", "dev-ev-1", None);
    for i in 0..3 {
        eventually(&format!("r{i} feeds to answer 503"), || async {
            c.mdm_compliance(i, "down-probe", "dev-down").await == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        eventually(&format!("r{i} to report not ready"), || async {
            c.ready(i).await == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        assert_eq!(c.request(i, &t, &[]).await, (StatusCode::OK, true));
    }
    c.nats.restart().await;
    for i in 0..3 {
        eventually(&format!("r{i} to be ready again"), || async {
            c.ready(i).await == StatusCode::OK
        })
        .await;
    }
    acked.extend(
        tokio::time::timeout(DEADLINE * 3, sender)
            .await
            .unwrap()
            .unwrap(),
    );
    // The probe refused while NATS was down is retried until acknowledged.
    eventually("the probe to be acknowledged", || async {
        c.mdm_compliance(1, "down-probe", "dev-down").await == StatusCode::ACCEPTED
    })
    .await;
    acked.push("down-probe".to_owned());

    // Replica 3 SIGKILLed while the stream goes on, then restarted.
    c.replicas[2] = None;
    for (i, id) in ids(30) {
        let i = i % 2;
        assert_eq!(
            c.mdm_compliance(i, &id, &format!("dev-{id}")).await,
            StatusCode::ACCEPTED
        );
        acked.push(id);
    }
    let cfg = c.pki.path().join("r2.toml");
    c.replicas[2] = Some(ServeProcess::spawn(&cfg).await);
    for (i, id) in ids(30) {
        assert_eq!(
            c.mdm_compliance(i, &id, &format!("dev-{id}")).await,
            StatusCode::ACCEPTED
        );
        acked.push(id);
    }
    // A resend of acknowledged events changes nothing.
    for id in acked.clone().iter().take(5) {
        assert_eq!(
            c.mdm_compliance(2, id, &format!("dev-{id}")).await,
            StatusCode::ACCEPTED
        );
    }

    let want = acked.len() as u64;
    eventually(
        "every replica to hold every acknowledged event once",
        || {
            let got: Vec<_> = (0..3).map(|i| c.logged(i)).collect();
            let ok = got
                .iter()
                .all(|g| g.0 == want && g.1 == want && g.2 == got[0].2);
            async move { ok }
        },
    )
    .await;
    for i in 0..3 {
        let (n, distinct, _) = c.logged(i);
        assert_eq!((n, distinct), (want, want), "r{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_starts_from_the_records_bucket_and_the_stream_tail() {
    let mut c = Cluster::start().await;
    let nc = async_nats::connect(c.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);

    // History: lost and compliant devices, a joiner and a leaver, spread
    // over the three replicas.
    let mut history = 0u64;
    for k in 0..12 {
        let (st, body) = if k % 3 == 0 {
            c.mdm_lost(k % 3, &format!("h-{k}"), &format!("hd-{k}"))
                .await
        } else {
            (
                c.mdm_compliance(k % 3, &format!("h-{k}"), &format!("hd-{k}"))
                    .await,
                Value::Null,
            )
        };
        assert_eq!(st, StatusCode::ACCEPTED, "{body}");
        history += 1;
    }
    let sub = "leaver@acme.example";
    let (st, v) = c
        .scim(
            1,
            "POST",
            "/Users",
            json!({"schemas": [USER], "userName": sub, "active": true, "externalId": "00u9"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (st, v) = c
        .scim(
            2,
            "PATCH",
            &format!("/Users/{id}"),
            json!({"schemas": [PATCH_OP], "Operations": [{"op": "replace", "value": {"active": false}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut stream = js.get_stream("PORTCULLIS_EVENTS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    history += 2;

    // Every replica applied it all and the bucket is complete up to it.
    eventually("every replica to apply the history", || {
        let ok = (0..3).all(|i| c.logged(i).2 == last);
        async move { ok }
    })
    .await;
    eventually("the records bucket to be complete", || async {
        marker(&js).await >= last
    })
    .await;
    // The history leaves the stream: a replica that replayed from sequence
    // 1 would see none of it.
    stream.purge().sequence(last + 1).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.first_sequence,
        last + 1,
        "history purged"
    );

    // The tail: events the bucket does not hold yet (the full replicas are
    // paused, so nobody writes them there), one of them on a known device.
    let pids: Vec<u32> = (0..3).map(|i| c.r(i).pid()).collect();
    for p in &pids {
        signal(*p, "-STOP");
    }
    let now = portcullis::util::now_unix_ms();
    let tail: Vec<String> = vec!["hd-1".into(), "tail-a".into(), "tail-b".into()];
    for (j, dev) in tail.iter().enumerate() {
        let body = json!({"v": 1, "replica": "rx", "accepted_ms": now, "event": {
            "id": format!("tail-{j}"), "feed": "admin", "kind": "admin.device-lost", "origin_ms": now,
            "changes": [{"type": "device", "id": dev, "patch": {"lifecycle": "lost"}}]}});
        js.publish("portcullis.events.admin", body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let end = last + tail.len() as u64;

    // A fourth replica with an empty store starts from the bucket and the tail.
    let cfg = replica_config(&c, 3, "full");
    c.replicas.push(Some(ServeProcess::spawn(&cfg).await));
    for p in &pids {
        signal(*p, "-CONT");
    }
    eventually("every replica to reach the end of the stream", || {
        let ok = (0..4).all(|i| c.logged(i).2 == end);
        async move { ok }
    })
    .await;
    let boot: Value = serde_json::from_str(&c.meta(3, "nats.bootstrap").unwrap()).unwrap();
    assert_eq!(
        boot["pos"].as_u64(),
        Some(last),
        "r3 started at the marker: {boot}"
    );
    // It applied the tail only (nothing from sequence 1), each event once.
    let tail_n = tail.len() as u64;
    assert_eq!(
        c.logged(3),
        (tail_n, tail_n, end),
        "r3 applied the tail only"
    );
    for i in 0..3 {
        assert_eq!(
            c.logged(i),
            (history + tail_n, history + tail_n, end),
            "r{i}"
        );
    }
    // The same picture everywhere.
    eventually("the same records at every replica", || {
        let want = c.records(0);
        let ok = (1..4).all(|i| c.records(i) == want);
        async move { ok }
    })
    .await;
    let all = c.records(3);
    assert!(all.contains_key("devices/hd-0") && all.contains_key("devices/tail-b"));
    // And the same decisions.
    for (dev, ok) in [
        ("hd-0", false),
        ("hd-1", false),
        ("hd-2", true),
        ("tail-a", false),
    ] {
        let t = c.token("someone", dev, None);
        let (st, fwd) = c.request(3, &t, &[]).await;
        assert_eq!(!refused(st) && fwd, ok, "{dev}: {st}");
    }
    let t = c.token(sub, "hd-5", None);
    let (st, fwd) = c.request(3, &t, &[]).await;
    assert!(refused(st) && !fwd, "the leaver at r3: {st}");
    // A new change reaches the new replica through the stream as usual.
    let (st, _) = c.mdm_lost(0, "after-boot", "hd-2").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let t = c.token("someone", "hd-2", None);
    eventually("r3 to refuse a device lost after it started", || async {
        refused(c.request(3, &t, &[]).await.0)
    })
    .await;
}

/// A browser at one replica: a TLS connection and a cookie jar.
struct Browser {
    conn: TlsConn,
    jar: std::collections::BTreeMap<String, String>,
}

impl Browser {
    async fn open(c: &Cluster, i: usize, jar: std::collections::BTreeMap<String, String>) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], c.r(i).proxy.port()));
        Self {
            conn: TlsConn::connect(addr, "localhost", &c.pki.ca_pem, None)
                .await
                .unwrap(),
            jar,
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
    ) -> (StatusCode, http::HeaderMap) {
        let cookies = self
            .jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers = extra.to_vec();
        if !cookies.is_empty() {
            headers.push(("cookie", &cookies));
        }
        let (st, h, _) = self.conn.send(method, path, &headers).await.unwrap();
        for v in h.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.jar.remove(k);
            } else {
                self.jar.insert(k.to_owned(), val.to_owned());
            }
        }
        (st, h)
    }

    async fn page(&mut self, path: &str) -> StatusCode {
        self.send("GET", path, &[("accept", "text/html")]).await.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_is_honoured_and_ended_at_every_replica() {
    let mut c = Cluster::start_with(&[]).await;
    let idp = common::demo_idp::DemoIdp::start().await;
    std::fs::write(c.pki.path().join("client-secret"), "s3cret-for-tests").unwrap();
    let extra = format!(
        r#"
[[issuers]]
name = "idp"
issuer = "{url}"
audiences = ["https://api.test"]
algorithms = ["ES256"]
discovery_url = "{url}/.well-known/openid-configuration"
min_refresh_interval_s = 0

[browser]
issuer = "idp"
client_id = "{client}"
client_secret_file = "client-secret"

[[routes]]
name = "web"
path_prefix = "/web"
upstream = "{app}"
auth = "browser"
"#,
        url = idp.url,
        client = portcullis::demo::oidc::DEMO_CLIENT_ID,
        app = c.upstream.url()
    );
    for i in 0..3 {
        let cfg = replica_config_with(&c, i, "full", &extra);
        c.replicas.push(Some(ServeProcess::spawn(&cfg).await));
    }

    // Log in at replica 1 (index 0), through the IdP, as a browser does.
    let mut b = Browser::open(&c, 0, Default::default()).await;
    let (st, h) = b.send("GET", "/web/page", &[("accept", "text/html")]).await;
    assert_eq!(st, StatusCode::FOUND, "no session: off to log in");
    let authorize = h["location"].to_str().unwrap().to_owned();
    assert!(authorize.starts_with(&idp.url), "{authorize}");
    let back = idp.login(&authorize, "carol@partner.example").await;
    let callback = format!(
        "/.portcullis/{}",
        back.split_once("/.portcullis/").unwrap().1
    );
    let (st, _) = b.send("GET", &callback, &[("accept", "text/html")]).await;
    assert_eq!(st, StatusCode::SEE_OTHER, "callback");
    let cookie = portcullis::session::cookie::SESSION_COOKIE;
    assert!(b.jar.contains_key(cookie));
    let before = c.upstream.count();
    assert_eq!(b.page("/web/page").await, StatusCode::OK);
    assert!(c.upstream.count() > before);

    // The same cookie is honoured at replicas 2 and 3: the session came
    // through the stream. The app sees the session's subject.
    let jar = b.jar.clone();
    for i in 1..3 {
        let mut other = Browser::open(&c, i, jar.clone()).await;
        let start = Instant::now();
        while other.page("/web/x").await != StatusCode::OK {
            assert!(start.elapsed() < DEADLINE, "r{i} to honour the session");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let seen = c.upstream.last();
        assert_eq!(
            seen.headers["x-portcullis-subject"].to_str().unwrap(),
            "carol@partner.example",
            "r{i}"
        );
    }

    // Logged out at replica 2: refused at replicas 1 and 3 (a login
    // redirect, and nothing reaches the app).
    let mut at2 = Browser::open(&c, 1, jar.clone()).await;
    let origin = format!("https://{}", at2.conn.host);
    let (st, _) = at2
        .send("POST", "/.portcullis/logout", &[("origin", &origin)])
        .await;
    assert_eq!(st, StatusCode::SEE_OTHER, "logout");
    assert!(!at2.jar.contains_key(cookie));
    for i in [0, 2] {
        let mut old = Browser::open(&c, i, jar.clone()).await;
        let start = Instant::now();
        while old.page("/web/y").await != StatusCode::FOUND {
            assert!(
                start.elapsed() < DEADLINE,
                "r{i} to refuse the ended session"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let before = c.upstream.count();
        assert_eq!(old.page("/web/z").await, StatusCode::FOUND, "r{i}");
        assert_eq!(c.upstream.count(), before, "r{i}: nothing reached the app");
    }
    // Every replica holds no session record any more, and the bucket says so.
    for i in 0..3 {
        eventually(&format!("r{i} to drop the record"), || {
            let n = c
                .records(i)
                .keys()
                .filter(|k| k.starts_with("sessions/"))
                .count();
            async move { n == 0 }
        })
        .await;
    }
    let nc = async_nats::connect(c.nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(nc)
        .get_key_value("PORTCULLIS_EVENTS_RECORDS")
        .await
        .unwrap();
    let hash = portcullis::session::cookie::id_hash(&jar[cookie]);
    let key = portcullis::posture::cluster::records::session_key(&hash);
    eventually("the bucket to hold the ended session", || async {
        kv.get(&key)
            .await
            .unwrap()
            .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
            .is_some_and(|v| v["record"].is_null() && v["pos"].as_u64() > Some(0))
    })
    .await;
}

/// One ingest bigger than the JetStream context's in-flight publish permits
/// (5,000) is made durable, acknowledged and applied, instead of waiting
/// for a permit it holds itself until the ack timeout turns it into a 503.
/// An Intune Graph page (up to 32 MiB) can carry that many devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ingest_larger_than_the_publish_window_is_acknowledged_and_applied() {
    use portcullis::posture::event::{Change, DevicePatch, PostureEvent};
    use portcullis::posture::journal::Outcome;
    use portcullis::posture::model::{Compliance, Feed};
    let c = Cluster::start_with(&[]).await;
    let cfg = replica_config(&c, 0, "full");
    // A debug build on a busy 2-core machine can take more than the shared
    // 2 s to publish and apply 6,000 events; a permit deadlock still waits
    // past any timeout, so a longer one keeps the test's point.
    let body = std::fs::read_to_string(&cfg).unwrap();
    assert!(body.contains("ack_timeout_ms = 2000"));
    std::fs::write(
        &cfg,
        body.replace("ack_timeout_ms = 2000", "ack_timeout_ms = 20000"),
    )
    .unwrap();
    let server = portcullis::server::start(cfg).await.unwrap();
    let now = portcullis::util::now_unix_ms();
    let n = 6_000;
    let events: Vec<PostureEvent> = (0..n)
        .map(|k| PostureEvent {
            id: format!("big-batch:{k}"),
            feed: Feed::Intune,
            kind: "intune.device".into(),
            origin_ms: now,
            changes: vec![Change::Device {
                id: format!("bb-{k:05}"),
                patch: DevicePatch {
                    compliance: Some(Compliance::Compliant),
                    ..Default::default()
                },
            }],
        })
        .collect();
    let posture = &server.shared.posture;
    let out = tokio::time::timeout(Duration::from_secs(60), posture.ingest(events))
        .await
        .expect("the ingest ends")
        .expect("the batch is acknowledged, not refused");
    assert_eq!(out.len(), n);
    assert!(
        out.iter().all(|o| *o == Outcome::Applied),
        "every event applied once"
    );
    // The ingest waited for the local apply (within the ack timeout).
    let snap = posture.snapshot();
    for k in [0, 4_999, 5_000, n - 1] {
        let d = snap.device(&format!("bb-{k:05}")).expect("device applied");
        assert_eq!(d.compliance, Compliance::Compliant);
    }
    // JetStream holds each event once.
    let nc = async_nats::connect(c.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut stream = js.get_stream("PORTCULLIS_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_sidecar_reads_devices_on_demand_and_follows_changes() {
    let c = Cluster::start_with(&["full", "lazy"]).await;
    // Lost before the sidecar ever saw it: read from the records bucket.
    let t = c.token("ivy", "win-i", None);
    let (st, body) = c.mdm_lost(0, "lost-i", "win-i").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    eventually("the sidecar to refuse a device it fetched", || async {
        let (st, fwd) = c.request(1, &t, &[]).await;
        refused(st) && !fwd
    })
    .await;
    // Held by the sidecar (unknown so far), then lost at the full replica:
    // the bucket's updates reach the cached entry.
    let t = c.token("jon", "win-j", None);
    assert_eq!(c.request(1, &t, &[]).await, (StatusCode::OK, true));
    let (st, body) = c.mdm_lost(1, "lost-j", "win-j").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    eventually("the sidecar to refuse a device it held", || async {
        let (st, fwd) = c.request(1, &t, &[]).await;
        refused(st) && !fwd
    })
    .await;
    let (st, fwd) = c.request(0, &t, &[]).await;
    assert!(refused(st) && !fwd);
}

async fn metrics(admin: SocketAddr) -> String {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let r = http
        .get(format!("http://{admin}/metrics").parse().unwrap())
        .await
        .unwrap();
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_input_is_skipped_and_a_newer_format_refuses_start() {
    let c = Cluster::start_with(&["full"]).await;
    let nc = async_nats::connect(c.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let good = |v: u64, feed: &str| {
        json!({"v": v, "replica": "rx", "accepted_ms": 1, "event": {
            "id": format!("raw-{v}-{feed}"), "feed": feed, "kind": "admin.device-lost", "origin_ms": 1,
            "changes": [{"type": "device", "id": "raw-dev", "patch": {"lifecycle": "lost"}}]}})
        .to_string()
    };
    for (subject, body) in [
        ("portcullis.events.admin", "{not json".to_owned()),
        (
            "portcullis.events.admin",
            json!({"v": 1, "event": 7}).to_string(),
        ),
        ("portcullis.events.admin", good(2, "admin")),
        ("portcullis.events.scim", good(1, "admin")),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A good event after them still applies.
    let t = c.token("kim", "win-k", None);
    let (st, body) = c.mdm_lost(0, "after-bad", "win-k").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    let (st, fwd) = c.request(0, &t, &[]).await;
    assert!(refused(st) && !fwd, "{st}");
    let m = metrics(c.r(0).admin).await;
    for reason in ["bad_json", "unknown_version", "wrong_subject"] {
        assert!(
            m.contains(&format!(
                "portcullis_cluster_bad_messages_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {m}"
        );
    }
    assert_eq!(c.logged(0).0, 1, "only the good event is in the log");

    // A newer portcullis marked the stream: this one refuses to start.
    let kv = js.get_key_value("PORTCULLIS_EVENTS_META").await.unwrap();
    kv.put("format", "2".into()).await.unwrap();
    let cfg = replica_config(&c, 5, "full");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary())
            .args(["serve", "--config"])
            .arg(cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(DEADLINE, out).await.unwrap().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("format version 2"), "{err}");
}

// ── Benchmarks (numbers for the README, never asserted) ──────────────────

type Https = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    TestBody,
>;

async fn status(c: &Https, url: &str, auth: &str, extra: &[(&str, &str)]) -> StatusCode {
    let mut headers = vec![("authorization", auth)];
    headers.extend_from_slice(extra);
    get(c, url, None, &headers).await.0
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// CPU µs per request for `n` requests (16 at a time) with `auth` at `url`.
async fn cpu_per_request(
    pid: u32,
    url: &str,
    make_auth: impl Fn() -> (String, Option<String>),
    n: usize,
    ca: &str,
) -> (f64, f64) {
    let c = client(ca, false);
    let before = cpu_ticks(pid);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let per = n / 16;
    for _ in 0..16 {
        let c = c.clone();
        let url = url.to_owned();
        let reqs: Vec<(String, Option<String>)> = (0..per).map(|_| make_auth()).collect();
        set.spawn(async move {
            for (auth, dpop) in reqs {
                let extra: Vec<(&str, &str)> = dpop.iter().map(|p| ("dpop", p.as_str())).collect();
                let st = status(&c, &url, &auth, &extra).await;
                assert_eq!(st, StatusCode::OK);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid) - before;
    (
        ticks as f64 * 10_000.0 / (per * 16) as f64,
        (per * 16) as f64 / secs,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: cargo test --release --test cluster bench -- --ignored --nocapture"]
async fn bench_cluster() {
    let c = Cluster::start().await;
    let clients: Vec<Https> = (0..3).map(|_| client(&c.pki.ca_pem, false)).collect();

    // 1. Control window: accept at one replica → refused at all three.
    let n = std::env::var("CW_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200usize);
    let mut windows = Vec::with_capacity(n);
    for k in 0..n {
        let dev = format!("cw-{k}");
        let auth = format!("Bearer {}", c.token("cw", &dev, None));
        for (i, cl) in clients.iter().enumerate() {
            assert_eq!(status(cl, &c.url(i), &auth, &[]).await, StatusCode::OK);
        }
        let t0 = Instant::now();
        let ev = format!("cw-lost-{k}");
        let accept = c.mdm_lost(k % 3, &ev, &dev);
        let polls = (0..3).map(|i| {
            let (cl, url, auth) = (&clients[i], c.url(i), auth.clone());
            async move {
                loop {
                    if refused(status(cl, &url, &auth, &[]).await) {
                        return t0.elapsed();
                    }
                }
            }
        });
        let (acc, seen) = tokio::join!(accept, futures_util::future::join_all(polls));
        assert_eq!(acc.0, StatusCode::ACCEPTED);
        windows.push(seen.iter().max().unwrap().as_secs_f64() * 1000.0);
    }
    println!(
        "control window, accept at one replica → refused at all 3 (n={n}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&mut windows, 0.5),
        pct(&mut windows, 0.99),
        pct(&mut windows, 1.0)
    );

    // 2. Durable events/s: batches of 100 generic MDM events, 8 senders per replica.
    let total: usize = std::env::var("TP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let (pos0, _, _) = (c.logged(0).2, 0, 0);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let senders = 6;
    for s in 0..senders {
        let admin = c.r(s % 3).admin;
        set.spawn(async move {
            let per = total / senders / 100;
            for b in 0..per {
                let now = portcullis::util::now_unix_ms();
                let batch: Vec<Value> = (0..100)
                    .map(|j| json!({"event_id": format!("tp-{s}-{b}-{j}"), "device_id": format!("tp-{s}-{j}"), "occurred_at": now, "compliance": "compliant"}))
                    .collect();
                let text = Value::Array(batch).to_string();
                // A feed retries what was not acknowledged in time.
                let (st, body) = loop {
                    let r = send(admin, "POST", "/mdm/v1/acme/events", MDM_SECRET, "application/json", text.clone()).await;
                    if r.0 != StatusCode::SERVICE_UNAVAILABLE {
                        break r;
                    }
                };
                assert_eq!(st, StatusCode::ACCEPTED, "{body}");
            }
        });
    }
    while set.join_next().await.is_some() {}
    let acked = start.elapsed().as_secs_f64();
    let sent = (total / senders / 100) * 100 * senders;
    let want = pos0 + sent as u64;
    let st = Instant::now();
    while (0..3).any(|i| c.logged(i).2 < want) {
        assert!(
            st.elapsed() < Duration::from_secs(120),
            "replicas did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = start.elapsed().as_secs_f64();
    println!(
        "throughput: {sent} events acknowledged (durable in JetStream + applied at the accepting replica) in {acked:.2} s = {:.0} events/s; applied at all 3 replicas after {all:.2} s = {:.0} events/s",
        sent as f64 / acked,
        sent as f64 / all
    );

    // 3. Hot path CPU: the same cached-token request, NATS mode (replica 0)
    // vs an embedded-SQLite process with the same config otherwise.
    let sqlite_cfg = std::fs::read_to_string(c.pki.path().join("r0.toml"))
        .unwrap()
        .split("[store]")
        .next()
        .unwrap()
        .to_owned()
        + "\n[store]\npath = \"solo.db\"\n\n[feeds]\nmax_body_bytes = 65536\n\n[[feeds.mdm]]\nname = \"acme\"\nsecret = \"mdm-secret-0123456789\"\n";
    let solo = ServeProcess::spawn(&c.pki.write_config("solo.toml", &sqlite_cfg)).await;
    let solo_url = format!("https://localhost:{}/app", solo.proxy.port());
    let bearer = format!("Bearer {}", c.token("hot", "hot-1", None));
    let m = std::env::var("HOT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000usize);
    for round in 0..2 {
        let (s_cpu, s_rps) = cpu_per_request(
            solo.pid(),
            &solo_url,
            || (bearer.clone(), None),
            m,
            &c.pki.ca_pem,
        )
        .await;
        let (n_cpu, n_rps) = cpu_per_request(
            c.r(0).pid(),
            &c.url(0),
            || (bearer.clone(), None),
            m,
            &c.pki.ca_pem,
        )
        .await;
        println!(
            "hot path round {round}: sqlite {s_cpu:.1} CPU-µs/req ({s_rps:.0} req/s), nats {n_cpu:.1} CPU-µs/req ({n_rps:.0} req/s)"
        );
    }

    // 4. DPoP: a fresh proof per request; NATS adds one KV create.
    let key = SigningKey::es256("dpop-bench").unwrap();
    let dt = c.token(
        "dp",
        "dp-1",
        Some(json!({"jkt": key.thumbprint().unwrap()})),
    );
    let dauth = format!("DPoP {dt}");
    let dn = m / 4;
    let (s_cpu, s_rps) = cpu_per_request(
        solo.pid(),
        &solo_url,
        || {
            (
                dauth.clone(),
                Some(key.dpop_proof("GET", &solo_url, Some(&dt), None).unwrap()),
            )
        },
        dn,
        &c.pki.ca_pem,
    )
    .await;
    let url0 = c.url(0);
    let (n_cpu, n_rps) = cpu_per_request(
        c.r(0).pid(),
        &url0,
        || {
            (
                dauth.clone(),
                Some(key.dpop_proof("GET", &url0, Some(&dt), None).unwrap()),
            )
        },
        dn,
        &c.pki.ca_pem,
    )
    .await;
    let (_, metrics) = send(c.r(0).admin, "GET", "/metrics", "", "text/plain", "").await;
    let _ = metrics;
    let text = {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let r = http
            .get(format!("http://{}/metrics", c.r(0).admin).parse().unwrap())
            .await
            .unwrap();
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    };
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (sum, count) = (
        metric("portcullis_cluster_dpop_check_seconds_sum"),
        metric("portcullis_cluster_dpop_check_seconds_count"),
    );
    println!(
        "DPoP: sqlite {s_cpu:.1} CPU-µs/req ({s_rps:.0} req/s), nats {n_cpu:.1} CPU-µs/req ({n_rps:.0} req/s); cluster replay check mean {:.0} µs over {count} checks",
        sum / count * 1e6
    );
    drop(solo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: cargo test --release --test cluster bench -- --ignored --nocapture"]
async fn bench_sidecar() {
    let n: usize = std::env::var("SIDECAR_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let c = Cluster::start_with(&["full"]).await;
    // Fill the records bucket with `n` devices, as full replicas write them:
    // publishes pipelined, at most 4k acknowledgements in flight. (Each
    // unresolved acknowledgement holds one of the context's 5,000 in-flight
    // permits: holding more than that waits forever for a permit, which is
    // how this bench used to hang.)
    let nc = async_nats::connect(c.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let nats_pid = c.nats.pid().unwrap();
    let nats_rss0 = rss_kib(nats_pid);
    let start = Instant::now();
    let mut acks = futures_util::stream::FuturesUnordered::new();
    for k in 0..n {
        let d = portcullis::posture::model::Device {
            id: format!("sc-{k:07}"),
            version: 1,
            ..Default::default()
        };
        let v = serde_json::to_vec(&portcullis::posture::cluster::records::Stored {
            pos: 1,
            record: Some(&d),
        })
        .unwrap();
        let subj = format!(
            "$KV.PORTCULLIS_EVENTS_RECORDS.{}",
            portcullis::posture::cluster::records::device_key(&d.id)
        );
        acks.push(std::future::IntoFuture::into_future(
            js.publish(subj, v.into()).await.unwrap(),
        ));
        while acks.len() >= 4_096 {
            acks.next().await.unwrap().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(1_200),
            "bucket fill too slow: {k} of {n} in 20 min"
        );
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
    let fill_s = start.elapsed().as_secs_f64();
    println!(
        "loaded {n} device records into the bucket in {fill_s:.1} s ({:.0}/s); nats-server RSS {} MiB before, {} MiB after",
        n as f64 / fill_s,
        nats_rss0 / 1024,
        rss_kib(nats_pid) / 1024
    );

    let lazy_cfg = replica_config(&c, 9, "lazy");
    let sc = ServeProcess::spawn(&lazy_cfg).await;
    let cl = client(&c.pki.ca_pem, false);
    let url = format!("https://localhost:{}/app", sc.proxy.port());
    let warm = format!("Bearer {}", c.token("sc", "sc-0000000", None));
    assert_eq!(status(&cl, &url, &warm, &[]).await, StatusCode::OK);
    let rss0 = sc.rss_kib();
    let touch: usize = std::env::var("SIDECAR_TOUCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut miss = Vec::with_capacity(touch);
    let mut hit = Vec::with_capacity(touch);
    for k in (0..touch).map(|i| (i * 48_611) % n) {
        let auth = format!("Bearer {}", c.token("sc", &format!("sc-{k:07}"), None));
        let t = Instant::now();
        assert_eq!(status(&cl, &url, &auth, &[]).await, StatusCode::OK);
        miss.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        assert_eq!(status(&cl, &url, &auth, &[]).await, StatusCode::OK);
        hit.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let rss1 = sc.rss_kib();
    println!(
        "sidecar with {n} devices in the bucket: RSS {} MiB at start, {} MiB after {touch} distinct devices; request with a cache miss p50 {:.0} µs p99 {:.0} µs, hit p50 {:.0} µs p99 {:.0} µs (miss - hit = one KV get); nats-server RSS {} MiB",
        rss0 / 1024,
        rss1 / 1024,
        pct(&mut miss, 0.5),
        pct(&mut miss, 0.99),
        pct(&mut hit, 0.5),
        pct(&mut hit, 0.99),
        rss_kib(nats_pid) / 1024
    );
    drop(sc);

    // A new full replica over the same bucket: it loads every record (the
    // marker says the bucket is complete at position 1) instead of
    // replaying a stream.
    if std::env::var("SIDECAR_BOOT").is_ok_and(|v| v == "1") {
        let kv = js.get_key_value("PORTCULLIS_EVENTS_RECORDS").await.unwrap();
        kv.put(
            portcullis::posture::cluster::records::MARKER_KEY,
            r#"{"pos":1}"#.into(),
        )
        .await
        .unwrap();
        let cfg = replica_config(&c, 8, "full");
        let addr_file = cfg.with_extension("addrs.json");
        let t = Instant::now();
        let mut child = std::process::Command::new(binary())
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cfg.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        while !addr_file.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "full replica exited ({st}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "full replica did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let boot_s = t.elapsed().as_secs_f64();
        println!(
            "a new full replica over {n} records in the bucket: serving after {boot_s:.1} s (loaded from the bucket, committed to its SQLite store), RSS {} MiB",
            rss_kib(child.id()) / 1024
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Resident set size of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
