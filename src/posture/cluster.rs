//! The distributed store: NATS JetStream. Every replica publishes the feed
//! events it accepts to one stream and acknowledges a feed only after
//! JetStream acknowledged the publish; every replica consumes the stream in
//! order and applies each message through the one apply path (the posture
//! writer), which commits the records and the stream position to the
//! replica's own SQLite database in one transaction. Duplicates are dropped
//! twice: by JetStream (`Nats-Msg-Id` = event id, within the duplicate
//! window) and by the apply path (event id already in the log, stream
//! sequence at or below the position).
//!
//! A new full replica (nothing applied yet) does not replay the whole
//! stream: it loads the records bucket (see [`records`]) and consumes from
//! the bucket's marker + 1.
//!
//! The DPoP replay cache is shared through a KV bucket whose entries age out
//! with the proof window: `create` fails when another replica has already
//! spent the `(jkt, jti)`.
//!
//! This room never decides access; bad input on the stream is counted,
//! logged without its body, and skipped.

pub mod records;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use crate::config::{NatsCacheMode, NatsConfig};
use crate::posture::event::PostureEvent;
use crate::posture::{IngestError, Posture, Snapshot, StreamItem};
use crate::telemetry::{Metrics, ReasonLabel};
use records::{LazyDevices, RecordsUpdate};

/// The stream format this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// Largest stream message a replica accepts (and the stream's own limit).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Most stream messages handed to the writer in one batch.
const MAX_STREAM_BATCH: usize = 1024;
/// How often the connection state is sampled for the snapshot age.
const HEALTH_TICK: Duration = Duration::from_millis(200);
/// Longest wait between two attempts to re-create the consumer.
const MAX_RETRY: Duration = Duration::from_secs(2);
/// Most records merged into one round of bucket writes.
const RECORDS_MERGE: usize = 65_536;
/// Bucket writes in flight at once from one replica.
const RECORDS_CONCURRENCY: usize = 64;
/// Event publishes awaiting JetStream's acknowledgement at once, well under
/// the context's in-flight permits.
const ACKS_IN_FLIGHT: usize = 1024;
/// Bound on each JetStream request while a new replica loads the records
/// bucket (a consumer over every key).
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);
/// The key of the format marker in the meta bucket.
const FORMAT_KEY: &str = "format";

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// NATS did not answer or refused a setup request.
    #[error("nats: {0}")]
    Nats(String),
    /// The stream was written by a newer portcullis.
    #[error(
        "stream `{stream}` was written by format version {found}; this portcullis reads up to version {FORMAT_VERSION}: upgrade this replica"
    )]
    NewerFormat {
        /// Stream name.
        stream: String,
        /// The version found.
        found: u64,
    },
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Nats(format!("{what}: {e}"))
}

/// One stream message: an event and where and when it was accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version ([`FORMAT_VERSION`]).
    pub v: u64,
    /// The accepting replica's name.
    pub replica: String,
    /// When the accepting replica accepted it, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// The event.
    pub event: PostureEvent,
}

/// Why a stream message was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadMessage {
    /// Not `<prefix>.<feed>` for the event's feed.
    WrongSubject,
    /// Larger than [`MAX_MESSAGE_BYTES`].
    Oversized,
    /// Not JSON, or not an envelope.
    BadJson,
    /// Written by a newer (or unknown) format version.
    UnknownVersion,
    /// An envelope whose event fails validation.
    InvalidEvent,
}

impl BadMessage {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongSubject => "wrong_subject",
            Self::Oversized => "oversized",
            Self::BadJson => "bad_json",
            Self::UnknownVersion => "unknown_version",
            Self::InvalidEvent => "invalid_event",
        }
    }
}

/// Decodes one stream message; never panics on its input.
pub fn decode(prefix: &str, subject: &str, payload: &[u8]) -> Result<Envelope, BadMessage> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(BadMessage::Oversized);
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|_| BadMessage::BadJson)?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        Some(_) => return Err(BadMessage::UnknownVersion),
        None => return Err(BadMessage::BadJson),
    }
    let env: Envelope = serde_json::from_value(value).map_err(|_| BadMessage::BadJson)?;
    let feed = subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('.'));
    if feed != Some(env.event.feed.as_str()) {
        return Err(BadMessage::WrongSubject);
    }
    env.event.validate().map_err(|_| BadMessage::InvalidEvent)?;
    Ok(env)
}

/// A replica's link to the cluster: publisher, consumer and shared DPoP cache.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    dpop: kv::Store,
    /// The records bucket (the materialised picture, for lazy sidecars).
    records: kv::Store,
    /// Full replicas: the queue of record writes to the bucket.
    records_tx: Option<tokio::sync::mpsc::Sender<RecordsUpdate>>,
    /// Lazy replicas: which devices are held.
    lazy: Option<Arc<LazyDevices>>,
    /// Full replicas: the stream position this replica started at; it wrote
    /// every record changed after it, so it may move the bucket's marker
    /// from there on.
    records_from: u64,
    /// Set once a records write was dropped or failed: this replica no
    /// longer vouches for the marker.
    records_gap: AtomicBool,
    snapshot: Arc<Snapshot>,
    /// When this replica last knew it was connected and consuming (ms).
    last_sync_ms: AtomicU64,
    consuming: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.cfg.replica)
            .field("stream", &self.cfg.stream)
            .finish()
    }
}

impl Cluster {
    /// Connects, creates (or checks) the stream and buckets, refuses a stream
    /// of a newer format, and starts consuming from this replica's position.
    /// `dpop_window_s` is how long a spent DPoP proof stays spent.
    pub async fn start(
        cfg: &NatsConfig,
        dpop_window_s: u64,
        posture: &Arc<Posture>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("portcullis-{}", cfg.replica))
            .connection_timeout(Duration::from_millis(cfg.ack_timeout_ms))
            .request_timeout(Some(Duration::from_millis(cfg.ack_timeout_ms)))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| nats_err("connect", e))?;
        // retry_on_initial_connect returns at once; wait (bounded) for the link.
        let deadline = Instant::now() + Duration::from_millis(cfg.ack_timeout_ms.max(1000) * 2);
        while client.connection_state() != async_nats::connection::State::Connected {
            if Instant::now() > deadline {
                return Err(ClusterError::Nats(format!("cannot reach `{}`", cfg.url)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(cfg.ack_timeout_ms))
            .build(client.clone());
        let meta = bucket(&js, &format!("{}_META", cfg.stream), Duration::ZERO, 1).await?;
        check_format(&meta, &cfg.stream).await?;
        js.get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![format!("{}.>", cfg.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
            max_message_size: i32::try_from(MAX_MESSAGE_BYTES).unwrap_or(i32::MAX),
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("stream", e))?;
        let dpop = bucket(
            &js,
            &format!("{}_DPOP", cfg.stream),
            Duration::from_secs(dpop_window_s.max(1)),
            1,
        )
        .await?;
        let records = bucket(&js, &format!("{}_RECORDS", cfg.stream), Duration::ZERO, 1).await?;
        let lazy = cfg.cache == NatsCacheMode::Lazy;
        let (records_tx, records_rx) = if lazy {
            (None, None)
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel(records::QUEUE);
            (Some(tx), Some(rx))
        };
        if !lazy && posture.stream_position() == 0 && posture.snapshot().version() == 0 {
            // Creating a last-per-subject consumer over a large bucket takes
            // the server seconds, far beyond the ack timeout that bounds a
            // feed's wait (and JetStream API requests take the connection's
            // request timeout): a connection of its own, for the start only.
            let boot = async_nats::ConnectOptions::new()
                .name(format!("portcullis-{}-bootstrap", cfg.replica))
                .connection_timeout(Duration::from_millis(cfg.ack_timeout_ms))
                .request_timeout(Some(BOOTSTRAP_TIMEOUT))
                .connect(cfg.url.as_str())
                .await
                .map_err(|e| nats_err("connect", e))?;
            let js = jetstream::ContextBuilder::new()
                .timeout(BOOTSTRAP_TIMEOUT)
                .build(boot);
            let records = js
                .get_key_value(format!("{}_RECORDS", cfg.stream))
                .await
                .map_err(|e| nats_err("records bucket", e))?;
            bootstrap(&js, &records, cfg, posture).await?;
        }
        let snapshot = posture.snapshot().clone();
        let me = Arc::new(Self {
            client,
            js,
            cfg: cfg.clone(),
            dpop,
            records,
            records_tx,
            lazy: lazy.then(|| Arc::new(LazyDevices::new(cfg.cache_capacity, snapshot.clone()))),
            records_from: posture.stream_position(),
            records_gap: AtomicBool::new(false),
            snapshot,
            last_sync_ms: AtomicU64::new(crate::util::now_unix_ms()),
            consuming: AtomicBool::new(false),
            metrics,
        });
        if let Some(rx) = records_rx {
            tokio::spawn(publish_records(Arc::downgrade(&me), rx));
            tokio::spawn(consume(me.clone(), Arc::downgrade(posture)));
        } else {
            tokio::spawn(follow(Arc::downgrade(&me)));
        }
        tokio::spawn(health(Arc::downgrade(&me)));
        tracing::info!(replica = %cfg.replica, stream = %cfg.stream, position = posture.stream_position(), "joined the cluster");
        Ok(me)
    }

    /// True for a sidecar (`cache = "lazy"`): it reads records on demand and
    /// does not apply the stream itself.
    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }

    /// Full replicas: whether applied batches should be written to the records bucket.
    pub fn wants_records(&self) -> bool {
        self.records_tx.is_some()
    }

    /// Queues the records a committed batch changed for the records bucket
    /// (never blocks the writer: a full queue drops and counts, and this
    /// replica stops moving the bucket's marker).
    pub fn records_changed(&self, update: RecordsUpdate) {
        if let Some(tx) = &self.records_tx
            && tx.try_send(update).is_err()
        {
            self.records_gap.store(true, Ordering::Release);
            self.metrics
                .cluster_bad_messages
                .get_or_create(&ReasonLabel {
                    reason: "records_queue_full",
                })
                .inc();
        }
    }

    /// Lazy replicas: makes sure the device (or its absence) is held,
    /// fetching it from the records bucket on a miss.
    pub async fn fill_device(&self, id: &str) {
        let Some(lazy) = &self.lazy else { return };
        if lazy.contains(id) {
            return;
        }
        match tokio::time::timeout(
            self.ack_timeout(),
            self.records.get(records::device_key(id)),
        )
        .await
        {
            Ok(Ok(v)) => lazy.offer(&self.snapshot, id, v.as_deref(), false),
            // Not cached: the request sees an unknown device (fail closed),
            // the next one asks again.
            Ok(Err(e)) => tracing::warn!(error = %e, "records bucket read failed"),
            Err(_) => tracing::warn!("records bucket read timed out"),
        }
    }

    /// Lazy replicas: devices held.
    pub fn lazy_entries(&self) -> u64 {
        self.lazy.as_ref().map_or(0, |l| l.len())
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.cfg.replica
    }

    /// How long a feed waits for JetStream.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.ack_timeout_ms)
    }

    /// The `/readyz` limit.
    pub fn max_staleness_s(&self) -> u64 {
        self.cfg.max_staleness_s
    }

    /// The newest sequence in the event stream (one JetStream API request).
    pub async fn stream_last_sequence(&self) -> Result<u64, String> {
        let mut stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| format!("stream: {e}"))?;
        let info = stream.info().await.map_err(|e| format!("stream: {e}"))?;
        Ok(info.state.last_sequence)
    }

    /// True while connected to NATS.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Seconds since this replica last knew it was connected and consuming
    /// (sampled every 200 ms, so the request path reads one atomic).
    pub fn snapshot_age_s(&self) -> u64 {
        crate::util::now_unix_ms().saturating_sub(self.last_sync_ms.load(Ordering::Acquire)) / 1000
    }

    /// Publishes events and waits for JetStream's acknowledgements; returns
    /// each event's stream sequence and whether JetStream saw it before.
    /// Fails fast (for a 503) while NATS is unreachable.
    pub async fn publish(&self, events: &[PostureEvent]) -> Result<Vec<(u64, bool)>, IngestError> {
        if !self.connected() {
            return Err(IngestError::Unavailable("nats is unreachable".into()));
        }
        let accepted_ms = crate::util::now_unix_ms();
        let work = async {
            let mut out = Vec::with_capacity(events.len());
            let mut acks =
                std::collections::VecDeque::with_capacity(events.len().min(ACKS_IN_FLIGHT));
            for ev in events {
                // An unresolved acknowledgement holds one of the JetStream
                // context's in-flight permits (5,000 by default): waiting
                // for a new permit while holding them all would never end.
                if acks.len() >= ACKS_IN_FLIGHT
                    && let Some(a) = acks.pop_front()
                {
                    out.push(ack_of(a.await)?);
                }
                let env = Envelope {
                    v: FORMAT_VERSION,
                    replica: self.cfg.replica.clone(),
                    accepted_ms,
                    event: ev.clone(),
                };
                let body = serde_json::to_vec(&env)
                    .map_err(|e| IngestError::Unavailable(format!("encode: {e}")))?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, ev.id.as_str());
                let subject = format!("{}.{}", self.cfg.subject_prefix, ev.feed.as_str());
                acks.push_back(
                    self.js
                        .publish_with_headers(subject, headers, Bytes::from(body))
                        .await
                        .map_err(|e| IngestError::Unavailable(format!("publish: {e}")))?,
                );
            }
            for a in acks {
                out.push(ack_of(a.await)?);
            }
            Ok(out)
        };
        tokio::time::timeout(self.ack_timeout(), work)
            .await
            .map_err(|_| IngestError::Unavailable("nats did not acknowledge in time".into()))?
    }

    /// Spends a DPoP proof cluster-wide: `Ok(true)` the first time any
    /// replica sees `key`, `Ok(false)` after; `Err` when NATS cannot say.
    pub async fn spend_dpop(&self, key: &[u8; 32]) -> Result<bool, String> {
        let started = Instant::now();
        let mut hex = String::with_capacity(64);
        for b in key {
            hex.push_str(&format!("{b:02x}"));
        }
        let r = match tokio::time::timeout(self.ack_timeout(), self.dpop.create(&hex, Bytes::new()))
            .await
        {
            Err(_) => Err("nats did not answer in time".to_owned()),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Ok(Err(e)) => Err(e.to_string()),
        };
        self.metrics
            .cluster_dpop_check_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    fn count_bad(&self, seq: u64, why: BadMessage) {
        self.metrics
            .cluster_bad_messages
            .get_or_create(&ReasonLabel {
                reason: why.as_str(),
            })
            .inc();
        tracing::warn!(
            stream = %self.cfg.stream,
            stream_seq = seq,
            reason = why.as_str(),
            "skipped a stream message"
        );
    }
}

/// Gets or creates a KV bucket.
/// A publish acknowledgement as (stream sequence, seen before).
fn ack_of(
    a: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<(u64, bool), IngestError> {
    let ack = a.map_err(|e| IngestError::Unavailable(format!("no acknowledgement: {e}")))?;
    Ok((ack.sequence, ack.duplicate))
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    history: i64,
) -> Result<kv::Store, ClusterError> {
    if let Ok(s) = js.get_key_value(name).await {
        return Ok(s);
    }
    // The KV stream layout, created directly: the client's create_key_value
    // first asks for account info in a shape nats-server 2.9 does not send.
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_err(name, e))?;
    js.get_key_value(name).await.map_err(|e| nats_err(name, e))
}

/// Writes the format marker on first use; refuses a newer one.
async fn check_format(meta: &kv::Store, stream: &str) -> Result<(), ClusterError> {
    match meta
        .create(FORMAT_KEY, Bytes::from(FORMAT_VERSION.to_string()))
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(nats_err("format marker", e)),
    }
    let found = meta
        .get(FORMAT_KEY)
        .await
        .map_err(|e| nats_err("format marker", e))?
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if found > FORMAT_VERSION {
        return Err(ClusterError::NewerFormat {
            stream: stream.to_owned(),
            found,
        });
    }
    Ok(())
}

/// Writes applied records to the records bucket, off the apply path: the
/// updates waiting are merged (the latest state of each record wins), the
/// merged records written concurrently, then the marker moved to the last
/// merged position (every record changed up to it is now in the bucket).
async fn publish_records(
    me: std::sync::Weak<Cluster>,
    mut rx: tokio::sync::mpsc::Receiver<RecordsUpdate>,
) {
    let mut behind_logged = false;
    while let Some(first) = rx.recv().await {
        let Some(c) = me.upgrade() else { return };
        let mut pos = first.pos;
        let mut merged: std::collections::HashMap<String, (u64, Bytes)> =
            std::collections::HashMap::new();
        let mut next = Some(first);
        while let Some(u) = next.take() {
            pos = u.pos;
            for (key, value) in u.items {
                merged.insert(key, (u.pos, value));
            }
            if merged.len() < RECORDS_MERGE {
                next = rx.try_recv().ok();
            }
        }
        let failed = futures_util::stream::iter(merged)
            .map(|(key, (p, value))| {
                let kv = &c.records;
                async move { records::cas_put(kv, &key, p, value).await }
            })
            .buffer_unordered(RECORDS_CONCURRENCY)
            .filter_map(|r| async move { r.err() })
            .collect::<Vec<_>>()
            .await;
        if let Some(e) = failed.first() {
            c.records_gap.store(true, Ordering::Release);
            tracing::warn!(error = %e, failed = failed.len(), "records bucket writes failed; this replica no longer moves the marker");
        }
        if c.records_gap.load(Ordering::Acquire) {
            continue;
        }
        match records::advance_marker(&c.records, c.records_from, pos).await {
            Ok(()) => {}
            Err(records::MarkerError::Behind(m)) => {
                if !behind_logged {
                    behind_logged = true;
                    tracing::warn!(
                        marker = m,
                        started_at = c.records_from,
                        "the records bucket's marker is behind this replica's start; another replica moves it"
                    );
                }
            }
            Err(records::MarkerError::Nats(e)) => {
                tracing::warn!(error = %e, "records marker not moved");
            }
        }
    }
}

/// Lazy replicas: follow identities, revocations and groups whole, and
/// updates of the devices held; re-subscribe after any failure.
async fn follow(me: std::sync::Weak<Cluster>) {
    loop {
        let Some(c) = me.upgrade() else { return };
        c.consuming.store(true, Ordering::Release);
        let snap = &c.snapshot;
        let r = tokio::select! {
            r = records::follow(&c.records, snap, "sub.>") => r,
            r = records::follow(&c.records, snap, "rev.>") => r,
            r = records::follow(&c.records, snap, "grp.>") => r,
            r = records::follow(&c.records, snap, "ses.>") => r,
            r = async {
                match &c.lazy {
                    Some(l) => records::follow_devices(&c.records, snap, l).await,
                    None => Ok(()),
                }
            } => r,
        };
        c.consuming.store(false, Ordering::Release);
        if let Err(e) = r {
            tracing::warn!(error = %e, "records watch restarts");
        }
        drop(c);
        tokio::time::sleep(MAX_RETRY).await;
    }
}

/// Starts an empty full replica from the records bucket: reads the marker,
/// then every record (the latest value of each key), and commits them with
/// the marker as its position, so the consumer goes on from the marker + 1.
/// Without a marker the replica replays the stream from the start.
async fn bootstrap(
    js: &jetstream::Context,
    bucket: &kv::Store,
    cfg: &NatsConfig,
    posture: &Posture,
) -> Result<(), ClusterError> {
    let started = Instant::now();
    // INVARIANT: the marker is read before the records, so every record
    // changed at or below it is seen at that label or a later one.
    let marker = records::read_marker(bucket)
        .await
        .map_err(|e| nats_err("records marker", e))?;
    if marker == 0 {
        return Ok(());
    }
    let mut stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| nats_err("stream", e))?;
    let first = stream
        .info()
        .await
        .map_err(|e| nats_err("stream", e))?
        .state
        .first_sequence;
    if first > marker + 1 {
        return Err(ClusterError::Nats(format!(
            "the records bucket is complete up to stream sequence {marker}, but stream `{}` starts at {first}: messages in between are gone, so this replica cannot build the picture",
            cfg.stream
        )));
    }
    let mut picture = records::Picture {
        pos: marker,
        ..Default::default()
    };
    let mut watch = bucket
        .watch_with_history(">")
        .await
        .map_err(|e| nats_err("records bucket: watch", e))?;
    let wait = Duration::from_millis(cfg.ack_timeout_ms.max(1000));
    loop {
        let e = match tokio::time::timeout(wait, watch.next()).await {
            Ok(Some(Ok(e))) => e,
            Ok(Some(Err(e))) => {
                return Err(nats_err(
                    &format!("records bucket: after {} records", picture.len()),
                    e,
                ));
            }
            Ok(None) => break,
            Err(_) => return Err(ClusterError::Nats("records bucket: read timed out".into())),
        };
        if e.operation == kv::Operation::Put {
            picture.add(&e.key, &e.value);
        }
        if e.delta == 0 {
            break;
        }
    }
    let (n, floors, bad) = (picture.len(), picture.floors.len(), picture.bad);
    posture
        .bootstrap(picture)
        .await
        .map_err(|e| nats_err("records bucket", e))?;
    tracing::info!(
        replica = %cfg.replica,
        position = marker,
        records = n,
        floors,
        skipped = bad,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "started from the records bucket; the stream is consumed from the position + 1"
    );
    Ok(())
}

/// Samples the connection: the snapshot is as fresh as the last moment the
/// replica was connected and consuming.
async fn health(me: std::sync::Weak<Cluster>) {
    loop {
        tokio::time::sleep(HEALTH_TICK).await;
        let Some(c) = me.upgrade() else { return };
        if c.connected() && c.consuming.load(Ordering::Acquire) {
            c.last_sync_ms
                .store(crate::util::now_unix_ms(), Ordering::Release);
        }
    }
}

/// The consumer: an ordered (ephemeral) consumer from this replica's
/// position + 1, re-created from the committed position after any error,
/// so a reconnect resumes exactly where the last commit ended.
async fn consume(me: Arc<Cluster>, posture: std::sync::Weak<Posture>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(p) = posture.upgrade() else { return };
        match consume_once(&me, &p).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, replica = %me.cfg.replica, "cluster consumer restarts");
            }
        }
        me.consuming.store(false, Ordering::Release);
        drop(p);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_RETRY);
    }
}

async fn consume_once(me: &Cluster, posture: &Posture) -> Result<(), String> {
    let start = posture.stream_position() + 1;
    let stream = me
        .js
        .get_stream(&me.cfg.stream)
        .await
        .map_err(|e| format!("stream: {e}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", me.cfg.subject_prefix),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("messages: {e}"))?;
    me.consuming.store(true, Ordering::Release);
    me.last_sync_ms
        .store(crate::util::now_unix_ms(), Ordering::Release);
    while let Some(first) = messages.next().await {
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            let m = m.map_err(|e| format!("delivery: {e}"))?;
            let Ok(info) = m.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            me.metrics
                .cluster_stream_pending
                .set(i64::try_from(info.pending).unwrap_or(i64::MAX));
            let event = match decode(&me.cfg.subject_prefix, m.subject.as_str(), &m.payload) {
                Ok(env) => Some((env.accepted_ms, env.event)),
                Err(why) => {
                    me.count_bad(seq, why);
                    None
                }
            };
            batch.push(StreamItem { seq, event });
            if batch.len() < MAX_STREAM_BATCH {
                next = messages.next().now_or_never().flatten();
            }
        }
        if !batch.is_empty() {
            posture
                .apply_stream(batch)
                .await
                .map_err(|e| format!("apply: {e}"))?;
            me.last_sync_ms
                .store(crate::util::now_unix_ms(), Ordering::Release);
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env_json(v: u64, feed: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "v": v,
            "replica": "r1",
            "accepted_ms": 1,
            "event": {
                "id": "e1",
                "feed": feed,
                "kind": "device.lost",
                "origin_ms": 1,
                "changes": [],
            }
        }))
        .unwrap()
    }

    #[test]
    fn bad_input_is_classified_not_panicked_on() {
        assert_eq!(
            decode("p.e", "p.e.admin", b"{not json").unwrap_err(),
            BadMessage::BadJson
        );
        assert_eq!(
            decode("p.e", "p.e.admin", &vec![b' '; MAX_MESSAGE_BYTES + 1]).unwrap_err(),
            BadMessage::Oversized
        );
        assert_eq!(
            decode("p.e", "p.e.admin", &env_json(2, "admin")).unwrap_err(),
            BadMessage::UnknownVersion
        );
        assert_eq!(
            decode("p.e", "p.e.other", &env_json(1, "admin")).unwrap_err(),
            BadMessage::WrongSubject
        );
        assert_eq!(
            decode("p.e", "p.e.admin", b"{\"v\":1}").unwrap_err(),
            BadMessage::BadJson
        );
    }
}
