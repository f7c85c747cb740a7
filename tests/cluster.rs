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

fn replica_config(c: &Cluster, i: usize) -> PathBuf {
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
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
        for i in 0..3 {
            let cfg = replica_config(&c, i);
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
            .query_row(
                "SELECT v FROM meta WHERE k = 'nats.stream_seq'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        (n, distinct, pos)
    }
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
    let resp = tokio::time::timeout(DEADLINE, http.request(b.body(Full::new(body.into())).unwrap()))
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
    let t = c.token("dora", "mac-d", Some(json!({"jkt": key.thumbprint().unwrap()})));
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

    // Mid-stream: a first part, accepted round-robin by the three replicas.
    for (i, id) in ids(30) {
        assert_eq!(c.mdm_compliance(i, &id, &format!("dev-{id}")).await, StatusCode::ACCEPTED);
        acked.push(id);
    }

    // nats-server SIGKILLed: feeds answer 503 (never 2xx), readiness follows
    // staleness, requests keep being decided on the last state.
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
    let refused_while_down = ids(6);
    for (i, id) in &refused_while_down {
        let st = c.mdm_compliance(*i, id, &format!("dev-{id}")).await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{id} while NATS is down");
    }

    c.nats.restart().await;
    for i in 0..3 {
        eventually(&format!("r{i} to be ready again"), || async {
            c.ready(i).await == StatusCode::OK
        })
        .await;
    }
    // A sender retries what was refused until it is acknowledged.
    for (i, id) in refused_while_down
        .iter()
        .cloned()
        .chain([(1, "down-probe".to_owned())])
    {
        let device = if id == "down-probe" {
            "dev-down".to_owned()
        } else {
            format!("dev-{id}")
        };
        eventually(&format!("{id} to be acknowledged"), || async {
            c.mdm_compliance(i, &id, &device).await == StatusCode::ACCEPTED
        })
        .await;
        acked.push(id);
    }

    // Replica 3 SIGKILLed while the stream goes on, then restarted.
    c.replicas[2] = None;
    for (i, id) in ids(30) {
        let i = i % 2;
        assert_eq!(c.mdm_compliance(i, &id, &format!("dev-{id}")).await, StatusCode::ACCEPTED);
        acked.push(id);
    }
    let cfg = c.pki.path().join("r2.toml");
    c.replicas[2] = Some(ServeProcess::spawn(&cfg).await);
    for (i, id) in ids(30) {
        assert_eq!(c.mdm_compliance(i, &id, &format!("dev-{id}")).await, StatusCode::ACCEPTED);
        acked.push(id);
    }
    // A resend of acknowledged events changes nothing.
    for id in acked.clone().iter().take(5) {
        assert_eq!(c.mdm_compliance(2, id, &format!("dev-{id}")).await, StatusCode::ACCEPTED);
    }

    let want = acked.len() as u64;
    eventually("every replica to hold every acknowledged event once", || {
        let got: Vec<_> = (0..3).map(|i| c.logged(i)).collect();
        let ok = got.iter().all(|g| g.0 == want && g.1 == want && g.2 == got[0].2);
        async move { ok }
    })
    .await;
    for i in 0..3 {
        let (n, distinct, _) = c.logged(i);
        assert_eq!((n, distinct), (want, want), "r{i}");
    }
}
