//! Sync out: portcullis as an OpenID Shared Signals transmitter (SETs pushed
//! per RFC 8935 to receivers that created a stream through the SSF §8
//! management API) and a signed generic webhook, both fed from one durable
//! outbox.
//!
//! Flow: the posture writer commits an event to the log → this room's
//! worker (woken by the change notice, or by its sweep) turns every event
//! after its durable cursor into signals (`signals`), signs one SET per
//! stream that asked for that type (deterministic `jti` from stream, source
//! event and type), and writes them with the new cursor in one transaction
//! (`outbox`) → per-target delivery tasks push the oldest pending row of
//! each stream or webhook, retrying with exponential backoff and jitter.
//!
//! This room never runs on the request path and never decides access: a
//! receiver that is down or slow delays only its own queue.

pub mod api;
pub mod deliver;
pub mod keys;
pub mod outbox;
pub mod signals;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rusqlite::Connection;
use serde_json::json;

use crate::config::{Config, ConfigError, TransmitterConfig};
use keys::SetSigner;
use outbox::{DbError, NewRow, Stream};
use signals::Naming;

/// Push delivery (RFC 8935).
pub const PUSH_METHOD: &str = "urn:ietf:rfc:8935";
/// Events read from the log per transaction.
pub const DERIVE_BATCH: usize = 256;
/// Path of the management API and keys on the admin listener.
pub const SSF_BASE_PATH: &str = "/ssf";
/// The metadata path (SSF §6.1); the issuer's path, if any, follows it.
pub const WELL_KNOWN: &str = "/.well-known/ssf-configuration";

/// Why the transmitter did not start.
#[derive(Debug, thiserror::Error)]
pub enum TransmitError {
    /// Its config or keys.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Its store.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A target kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `stream` or `webhook`.
    pub kind: &'static str,
}

/// The transmitter's metrics (appended to `/metrics`).
#[derive(Debug)]
pub struct TxMetrics {
    registry: Registry,
    /// SETs and webhook events written to the outbox.
    pub emitted: Family<KindLabel, Counter>,
    /// Delivered (2xx).
    pub delivered: Family<KindLabel, Counter>,
    /// Dead-lettered: rejected (400) or out of attempts.
    pub failed: Family<KindLabel, Counter>,
    /// Attempts that will be retried.
    pub retries: Family<KindLabel, Counter>,
    /// Undelivered rows dropped (outbox bound, stream disabled or deleted).
    pub dropped: Counter,
    /// Undelivered rows now.
    pub outbox_depth: Gauge,
}

impl TxMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis_transmit");
        let m = Self {
            emitted: Family::default(),
            delivered: Family::default(),
            failed: Family::default(),
            retries: Family::default(),
            dropped: Counter::default(),
            outbox_depth: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "emitted",
            "SETs and webhook events written to the outbox",
            m.emitted.clone(),
        );
        registry.register(
            "delivered",
            "SETs and webhook events delivered (2xx)",
            m.delivered.clone(),
        );
        registry.register(
            "failed",
            "SETs and webhook events dead-lettered (rejected or out of attempts)",
            m.failed.clone(),
        );
        registry.register(
            "retries",
            "Delivery attempts that will be retried",
            m.retries.clone(),
        );
        registry.register(
            "dropped",
            "Undelivered rows dropped (outbox bound, stream disabled or deleted)",
            m.dropped.clone(),
        );
        registry.register(
            "outbox_depth",
            "Undelivered rows in the outbox",
            m.outbox_depth.clone(),
        );
        Self { registry, ..m }
    }

    /// OpenMetrics text (with its own `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The transmitter.
pub struct Transmitter {
    /// Its config.
    pub cfg: TransmitterConfig,
    signer: SetSigner,
    naming: Naming,
    base: String,
    conn: Mutex<Connection>,
    client: HttpClient,
    wake: tokio::sync::Notify,
    inflight: Mutex<HashSet<String>>,
    /// Metrics.
    pub metrics: TxMetrics,
}

impl std::fmt::Debug for Transmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transmitter")
            .field("issuer", &self.cfg.issuer)
            .finish_non_exhaustive()
    }
}

/// `hex(sha256(parts joined by NUL))`, first 32 hex digits.
fn digest(parts: &[&str]) -> String {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    let mut h = hex::encode(crate::util::sha256(&v));
    h.truncate(32);
    h
}

/// The `jti` of the SET a target gets for one signal of one source event:
/// the same inputs always give the same `jti`, so a redelivery is recognisable.
pub fn jti_for(target: &str, event_id: &str, event_type: &str, key: &str) -> String {
    digest(&[target, event_id, event_type, key])
}

/// What one SET says.
#[derive(Debug, Clone, Copy)]
pub struct SetInput<'a> {
    /// `iss`.
    pub iss: &'a str,
    /// `aud`.
    pub aud: &'a str,
    /// `jti`.
    pub jti: &'a str,
    /// `iat`.
    pub iat: u64,
    /// `txn`, shared by the SETs of one cause.
    pub txn: Option<&'a str>,
    /// `sub_id`.
    pub sub_id: &'a serde_json::Value,
    /// The one event type.
    pub event_type: &'a str,
    /// Its event object.
    pub event: &'a serde_json::Value,
}

/// The claims of a SET (SSF §4): no `sub`, no `exp`, exactly one event.
pub fn set_claims(i: &SetInput<'_>) -> serde_json::Value {
    let mut c = json!({
        "iss": i.iss,
        "aud": i.aud,
        "jti": i.jti,
        "iat": i.iat,
        "sub_id": i.sub_id,
        "events": { i.event_type: i.event },
    });
    if let (Some(t), Some(o)) = (i.txn, c.as_object_mut()) {
        o.insert("txn".into(), json!(t));
    }
    c
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

impl Transmitter {
    /// Loads keys, opens the outbox tables in the store database.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Self>>, TransmitError> {
        let Some(t) = &cfg.transmitter else {
            return Ok(None);
        };
        let signer = SetSigner::from_config(cfg, t)?;
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &t.ca_file {
            let bad = |m: String| ConfigError::Invalid {
                file: cfg.source.clone(),
                key: "transmitter.ca_file".into(),
                message: m,
            };
            let pem = std::fs::read(ca).map_err(|e| bad(format!("`{}`: {e}", ca.display())))?;
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| bad(format!("`{}`: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| bad(format!("`{}`: {e}", ca.display())))?;
            }
        }
        let connector = crate::tls::outbound::https_connector(
            roots,
            Duration::from_millis(t.delivery_timeout_ms),
        );
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let conn = outbox::open(
            &cfg.store.path,
            cfg.store.sync == crate::config::SyncMode::Full,
        )?;
        let base = t
            .base_url
            .clone()
            .unwrap_or_else(|| {
                t.issuer
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
                    .unwrap_or_default()
            })
            .trim_end_matches('/')
            .to_owned();
        Ok(Some(Arc::new(Self {
            naming: Naming {
                subject_issuer: t.subject_issuer.clone(),
            },
            cfg: t.clone(),
            signer,
            base,
            conn: Mutex::new(conn),
            client,
            wake: tokio::sync::Notify::new(),
            inflight: Mutex::new(HashSet::new()),
            metrics: TxMetrics::new(),
        })))
    }

    /// The signer (JWKS, benchmarks).
    pub fn signer(&self) -> &SetSigner {
        &self.signer
    }

    fn with_db<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| DbError("connection lock poisoned".into()))?;
        f(&mut c)
    }

    /// Runs `f` on the connection off the async runtime.
    async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self, &mut Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = me
                .conn
                .lock()
                .map_err(|_| DbError("connection lock poisoned".into()))?;
            f(&me, &mut c)
        })
        .await
        .map_err(|e| DbError(e.to_string()))?
    }

    /// Signs the SET for one signal: what the outbox stores and a benchmark measures.
    pub fn sign_signal(
        &self,
        stream: &Stream,
        event_id: &str,
        sig: &signals::Signal,
        iat: u64,
    ) -> Result<(String, String), keys::KeyError> {
        let target = format!("stream:{}", stream.stream_id);
        let jti = jti_for(&target, event_id, &sig.event_type, &sig.key);
        let txn = digest(&[event_id]);
        let claims = set_claims(&SetInput {
            iss: &self.cfg.issuer,
            aud: &stream.aud,
            jti: &jti,
            iat,
            txn: Some(&txn),
            sub_id: &sig.sub_id,
            event_type: &sig.event_type,
            event: &sig.event,
        });
        Ok((jti, self.signer.sign(&claims)?))
    }

    fn stream_wants(
        &self,
        s: &Stream,
        subjects: &[(serde_json::Value, bool)],
        src_issuer: Option<&str>,
        sig: &signals::Signal,
    ) -> bool {
        if s.status == "disabled" || !s.events_delivered.contains(&sig.event_type) {
            return false;
        }
        // Never echo an event back to the transmitter it came from.
        let receiver_iss = self
            .cfg
            .receivers
            .iter()
            .find(|r| r.name == s.receiver)
            .and_then(|r| r.issuer.as_deref());
        if src_issuer.is_some() && receiver_iss == src_issuer {
            return false;
        }
        // default_subjects = ALL: a removed subject is excluded unless added again.
        let removed = subjects
            .iter()
            .any(|(f, inc)| !inc && signals::subject_matches(f, &sig.sub_id));
        let added = subjects
            .iter()
            .any(|(f, inc)| *inc && signals::subject_matches(f, &sig.sub_id));
        !removed || added
    }

    /// Turns every committed event after the cursor into outbox rows, one
    /// transaction per batch. Returns rows written.
    fn derive(&self, conn: &mut Connection) -> Result<usize, DbError> {
        let mut total = 0;
        loop {
            let cur = outbox::cursor(conn)?;
            let rows = outbox::events_after(conn, cur, DERIVE_BATCH)?;
            let Some(last) = rows.last().map(|r| r.seq) else {
                return Ok(total);
            };
            let streams = outbox::streams(conn, None)?;
            let mut subjects = Vec::with_capacity(streams.len());
            for s in &streams {
                subjects.push(outbox::subjects(conn, &s.stream_id)?);
            }
            let iat = crate::util::now_unix();
            let mut new = Vec::new();
            let mut hooks = 0;
            for ev in rows.iter().filter_map(|r| r.event.as_ref()) {
                let src = signals::source_issuer(ev);
                for sig in signals::signals(ev, &self.naming) {
                    for (s, subs) in streams.iter().zip(&subjects) {
                        if !self.stream_wants(s, subs, src, &sig) {
                            continue;
                        }
                        let (jti, body) = self
                            .sign_signal(s, &ev.id, &sig, iat)
                            .map_err(|e| DbError(e.to_string()))?;
                        new.push(NewRow {
                            target: format!("stream:{}", s.stream_id),
                            jti,
                            event_type: sig.event_type.clone(),
                            body,
                            control: false,
                        });
                    }
                    for w in &self.cfg.webhooks {
                        if !w.events.is_empty() && !w.events.contains(&sig.event_type) {
                            continue;
                        }
                        let target = format!("webhook:{}", w.name);
                        let jti = jti_for(&target, &ev.id, &sig.event_type, &sig.key);
                        let body = json!({
                            "id": jti,
                            "type": sig.event_type,
                            "iss": self.cfg.issuer,
                            "iat": iat,
                            "txn": digest(&[&ev.id]),
                            "subject": sig.sub_id,
                            "event": sig.event,
                            "source": {"feed": ev.feed.as_str(), "kind": ev.kind},
                        });
                        hooks += 1;
                        new.push(NewRow {
                            target,
                            jti,
                            event_type: sig.event_type.clone(),
                            body: body.to_string(),
                            control: false,
                        });
                    }
                }
            }
            let (inserted, dropped) = outbox::insert(
                conn,
                &new,
                Some(last),
                crate::util::now_unix_ms(),
                self.cfg.outbox_max_per_target,
            )?;
            let sets = new.len() - hooks;
            self.metrics
                .emitted
                .get_or_create(&KindLabel { kind: "stream" })
                .inc_by(sets.min(inserted) as u64);
            self.metrics
                .emitted
                .get_or_create(&KindLabel { kind: "webhook" })
                .inc_by(inserted.saturating_sub(sets) as u64);
            self.metrics.dropped.inc_by(dropped as u64);
            total += inserted;
        }
    }

    /// Writes a control SET (verification, stream-updated) for a stream.
    fn enqueue_control(
        &self,
        conn: &mut Connection,
        s: &Stream,
        event_type: &str,
        event: serde_json::Value,
    ) -> Result<(), DbError> {
        let jti = random_id();
        let claims = set_claims(&SetInput {
            iss: &self.cfg.issuer,
            aud: &s.aud,
            jti: &jti,
            iat: crate::util::now_unix(),
            txn: None,
            sub_id: &json!({"format": "opaque", "id": s.stream_id}),
            event_type,
            event: &event,
        });
        let body = self
            .signer
            .sign(&claims)
            .map_err(|e| DbError(e.to_string()))?;
        outbox::insert(
            conn,
            &[NewRow {
                target: format!("stream:{}", s.stream_id),
                jti,
                event_type: event_type.to_owned(),
                body,
                control: true,
            }],
            None,
            crate::util::now_unix_ms(),
            self.cfg.outbox_max_per_target,
        )?;
        self.metrics
            .emitted
            .get_or_create(&KindLabel { kind: "stream" })
            .inc();
        self.wake.notify_one();
        Ok(())
    }

    /// The delivery worker: derive, dispatch, sleep until a change notice,
    /// a finished delivery or the sweep interval. Never on the request path.
    pub async fn run(
        self: Arc<Self>,
        posture: Arc<crate::posture::Posture>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut changes = Some(posture.changes());
        let sweep = Duration::from_millis(self.cfg.sweep_interval_ms);
        loop {
            match self.db(|me, c| me.derive(c)).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "transmitter: deriving SETs failed; retrying")
                }
            }
            self.dispatch().await;
            tokio::select! {
                r = async {
                    match changes.as_mut() {
                        Some(rx) => rx.recv().await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                } => {
                    if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        changes = None;
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sweep) => {}
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Starts one delivery task per target with a due row and none in flight.
    async fn dispatch(self: &Arc<Self>) {
        let now = crate::util::now_unix_ms();
        let picked = self
            .db(move |_, c| {
                let mut out = Vec::new();
                for row in outbox::due(c, now)? {
                    let Some(id) = row.target.strip_prefix("stream:") else {
                        out.push((row, None));
                        continue;
                    };
                    let Some(s) = outbox::get_stream(c, id)? else {
                        continue;
                    };
                    if s.status == "enabled" || row.control {
                        out.push((row, Some(s)));
                    } else if let Some(ctl) = outbox::due_control(c, &row.target, now)? {
                        out.push((ctl, Some(s)));
                    }
                }
                Ok(out)
            })
            .await;
        let picked = match picked {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "transmitter: reading the outbox failed");
                return;
            }
        };
        if let Ok(d) = self.with_db(|c| outbox::depth(c)) {
            self.metrics.outbox_depth.set(d);
        }
        for (row, stream) in picked {
            {
                let Ok(mut f) = self.inflight.lock() else {
                    return;
                };
                if !f.insert(row.target.clone()) {
                    continue;
                }
            }
            let me = self.clone();
            tokio::spawn(async move {
                let target = row.target.clone();
                let id = row.id;
                // INVARIANT: a finished attempt is recorded before its target
                // leaves `inflight`, so this read sees it.
                if let Ok(true) = me.db(move |_, c| outbox::is_pending(c, id)).await {
                    me.deliver(row, stream).await;
                }
                if let Ok(mut f) = me.inflight.lock() {
                    f.remove(&target);
                }
                me.wake.notify_one();
            });
        }
    }

    /// The metadata document (SSF §6.2).
    pub fn metadata(&self) -> serde_json::Value {
        let b = &self.base;
        json!({
            "spec_version": "1_0",
            "issuer": self.cfg.issuer,
            "jwks_uri": format!("{b}{SSF_BASE_PATH}/jwks.json"),
            "delivery_methods_supported": [PUSH_METHOD],
            "configuration_endpoint": format!("{b}{SSF_BASE_PATH}/streams"),
            "status_endpoint": format!("{b}{SSF_BASE_PATH}/status"),
            "add_subject_endpoint": format!("{b}{SSF_BASE_PATH}/subjects:add"),
            "remove_subject_endpoint": format!("{b}{SSF_BASE_PATH}/subjects:remove"),
            "verification_endpoint": format!("{b}{SSF_BASE_PATH}/verify"),
            "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
            "default_subjects": "ALL",
        })
    }
}
