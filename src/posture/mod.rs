//! Posture: the device-trust and identity snapshot, the one apply path every
//! feed goes through, and the request-path lookups over it.
//!
//! Apply = validate (bounds, and no origin time beyond the allowed clock
//! skew) → append to the event log and write the records in one transaction
//! (group commit on a dedicated writer thread) → publish the new records to
//! the in-memory snapshot → acknowledge. The request path only reads the
//! snapshot: lock-free map lookups, no I/O.
//!
//! Feed time is untrusted input: an origin time is clamped to the acceptance
//! time, ordering is per field (a late event still sets the fields no newer
//! event has set), and lost / wiped / compromised are sticky (see
//! `event::merge_device`).

pub mod cluster;
pub mod event;
pub mod journal;
pub mod model;
pub mod notify;
pub mod session;
pub mod snapshot;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tokio::sync::{mpsc, oneshot};

use crate::telemetry::{FeedKindLabel, FeedOutcomeLabel, Metrics};
use event::{Change, EventError, PostureEvent, merge_device, merge_identity};
use journal::{CommitBatch, EventReport, EventStore, LoggedEvent, Outcome, Skipped, StoreError};
use model::{Device, Group, Identity, IdentityStatus, Revocation, RevocationTarget};
use session::SessionRecord;
pub use snapshot::{DeviceClaim, Snapshot};

/// Most events folded into one transaction.
pub const MAX_BATCH_EVENTS: usize = 4096;
/// How long an accepted change waits for a request to measure its control window.
pub const CONTROL_WINDOW_HORIZON: Duration = Duration::from_secs(3600);

/// Why an ingest failed; nothing was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The event is malformed.
    #[error(transparent)]
    Invalid(#[from] EventError),
    /// The store failed; the event was not stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer is gone (shutting down).
    #[error("ingest is shutting down")]
    Closed,
    /// The distributed store cannot make the event durable now (NATS is
    /// unreachable or did not acknowledge); nothing was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The meta key of this replica's position in the cluster stream (the last
/// stream sequence applied), committed with the records it produced.
pub const STREAM_POSITION_KEY: &str = "nats.stream_seq";

/// The meta key of a replica's start from the records bucket
/// ([`BootstrapMeta`]), committed with the loaded records.
pub const BOOTSTRAP_KEY: &str = "nats.bootstrap";

/// What a start from the records bucket leaves behind, so a restart keeps
/// local sequence numbers above the loaded records' and keeps skipping what
/// the loaded records already hold.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BootstrapMeta {
    /// The stream position the records were loaded at (the marker).
    pub pos: u64,
    /// The local sequence number the loaded records carry.
    pub seq: u64,
    /// Floors still in force (KV key → stream position); emptied once the
    /// position passes the highest.
    #[serde(default)]
    pub floors: HashMap<String, u64>,
}

/// One message of the cluster stream, as the consumer hands it to the writer.
#[derive(Debug, Clone)]
pub struct StreamItem {
    /// Its stream sequence.
    pub seq: u64,
    /// The event and its accepting replica's accept time (ms since epoch);
    /// `None` for a message that was counted and skipped (bad input), which
    /// still moves the position past it.
    pub event: Option<(u64, PostureEvent)>,
}

enum Job {
    Apply {
        events: Vec<PostureEvent>,
        accepted: Instant,
        reply: oneshot::Sender<Result<Vec<EventReport>, IngestError>>,
    },
    History {
        key: String,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<LoggedEvent>, StoreError>>,
    },
    GetMeta {
        key: String,
        reply: oneshot::Sender<Result<Option<String>, StoreError>>,
    },
    SetMeta {
        key: String,
        value: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Stream {
        items: Vec<StreamItem>,
        reply: oneshot::Sender<Result<(), IngestError>>,
    },
    Bootstrap {
        picture: Box<cluster::records::Picture>,
        reply: oneshot::Sender<Result<(), IngestError>>,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    accepted: Instant,
    version: u64,
    feed: &'static str,
    kind: String,
}

/// Which records may have a control window pending: a counting filter over
/// the pending map's keys, so the request path asks the map (two key
/// strings, two cache lookups) only for records that may be in it. A
/// counting Bloom filter with two slots per key: a slot counts the pending
/// entries hashing to it, incremented before an entry is inserted and
/// decremented by the map's removal listener, so a pending record always
/// finds both its slots non-zero; both may also be non-zero for other
/// records (then the lookup finds nothing).
struct PendingFilter {
    slots: Box<[std::sync::atomic::AtomicU32]>,
    hasher: foldhash::fast::RandomState,
}

impl PendingFilter {
    /// 2^18 slots (1 MiB). At 20k pending keys a lookup passes needlessly
    /// with about 2% chance (one slot per key: 7%). A record that does is
    /// looked up on every request until the pending entries expire, so the
    /// rate matters.
    const SLOTS: usize = 1 << 18;

    fn new() -> Self {
        Self {
            slots: (0..Self::SLOTS)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// The two slots of `kind:name` (from the low and the high half of one
    /// 64-bit hash).
    fn slots(&self, kind: &str, name: &str) -> [&std::sync::atomic::AtomicU32; 2] {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((kind, name));
        let mask = Self::SLOTS - 1;
        [
            &self.slots[(h as usize) & mask],
            &self.slots[((h >> 32) as usize) & mask],
        ]
    }

    /// The slots of a pending map key (`subject:…`, `device:…`).
    fn slots_of_key(&self, key: &str) -> [&std::sync::atomic::AtomicU32; 2] {
        let (kind, name) = key.split_once(':').unwrap_or(("", key));
        self.slots(kind, name)
    }

    /// Counts a pending key in (before it is inserted).
    fn add(&self, key: &str) {
        for s in self.slots_of_key(key) {
            s.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Counts a pending key out (after it left the map).
    fn remove(&self, key: &str) {
        for s in self.slots_of_key(key) {
            s.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    fn may_hold(&self, kind: &str, name: &str) -> bool {
        self.slots(kind, name)
            .iter()
            .all(|s| s.load(std::sync::atomic::Ordering::Acquire) != 0)
    }
}

/// The posture service: snapshot + ingest. Shared by the proxy and the feeds.
pub struct Posture {
    snapshot: Arc<Snapshot>,
    jobs: mpsc::Sender<Job>,
    pending: Cache<String, Pending>,
    /// At least the number of entries in `pending` (incremented before each
    /// insert, decremented by the removal listener), so the request path can
    /// skip the lookups when nothing is pending.
    pending_upper_bound: Arc<std::sync::atomic::AtomicI64>,
    pending_filter: Arc<PendingFilter>,
    metrics: Arc<Metrics>,
    /// How far ahead of the acceptance time an origin time may be (ms).
    max_future_skew_ms: std::sync::atomic::AtomicU64,
    /// Change notices after each committed batch (live connections listen).
    notify: notify::Notifier,
    /// The distributed store, when `[store] kind = "nats"`: ingest publishes
    /// there and the stream consumer applies.
    cluster: std::sync::OnceLock<Arc<cluster::Cluster>>,
    /// The last stream sequence applied (0 without a cluster).
    stream_applied: tokio::sync::watch::Sender<u64>,
    /// Outcomes of recently applied stream messages, for the ingesting replica.
    stream_outcomes: Cache<u64, EventReport>,
}

impl std::fmt::Debug for Posture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posture")
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

/// What the request path learned about a principal and device.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Snapshot version the lookups saw (at least).
    pub snapshot_version: u64,
    /// The identity record, when the snapshot knows the subject.
    pub identity: Option<Arc<Identity>>,
    /// The device id the request claims (token claim or certificate).
    pub device_id: Option<String>,
    /// The device record, when known. `None` with a `device_id` = unknown device.
    pub device: Option<Arc<Device>>,
    /// Seconds since the snapshot was last known in sync with the cluster
    /// (always 0 for the embedded store): `context.snapshot.age_s`.
    pub snapshot_age_s: u64,
}

/// Why the baseline (applied before any policy) refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostureDenial {
    /// The subject is suspended or terminated.
    #[error("subject is {0}")]
    SubjectDisabled(&'static str),
    /// The credential was issued before a revocation of its subject, device or session.
    #[error("credential was revoked ({0})")]
    Revoked(&'static str),
    /// The device is lost, wiped or being wiped, or deleted.
    #[error("device is {0}")]
    DeviceUntrusted(&'static str),
    /// The device is compromised (jailbroken, rooted, threat).
    #[error("device is compromised")]
    DeviceCompromised,
}

impl PostureDenial {
    /// Short reason code for metrics and bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::SubjectDisabled(_) => "subject_disabled",
            Self::Revoked(_) => "revoked",
            Self::DeviceUntrusted(_) => "device_untrusted",
            Self::DeviceCompromised => "device_compromised",
        }
    }
}

impl Posture {
    /// Opens the posture service over a store: loads every record into the
    /// snapshot, then starts the writer thread.
    pub fn start(
        mut store: Box<dyn EventStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let snapshot = Arc::new(Snapshot::new());
        let last_seq = store.load(&|rec| match rec {
            journal::Loaded::SizeHint {
                devices,
                identities,
            } => snapshot.reserve(devices, identities),
            journal::Loaded::Device(d) => snapshot.put_device(Arc::new(d)),
            journal::Loaded::Identity(i) => snapshot.put_identity(Arc::new(i)),
            journal::Loaded::Revocation(r) => snapshot.put_revocation(Arc::new(r)),
            journal::Loaded::Group(g) => {
                let id = g.id.clone();
                snapshot.put_group(&id, Some(Arc::new(g)));
            }
            journal::Loaded::Session(s) => {
                let id = s.id_hash.clone();
                snapshot.put_session(&id, Some(Arc::new(s)));
            }
        })?;
        let boot: BootstrapMeta = store
            .get_meta(BOOTSTRAP_KEY)?
            .map(|v| {
                serde_json::from_str(&v)
                    .map_err(|_| StoreError::Corrupt(format!("{BOOTSTRAP_KEY}: `{v}`")))
            })
            .transpose()?
            .unwrap_or_default();
        // Loaded records carry the bootstrap's sequence number; the log may
        // not have reached it yet.
        let last_seq = last_seq.max(boot.seq);
        snapshot.set_version(last_seq);
        let stream_pos = store
            .get_meta(STREAM_POSITION_KEY)?
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| StoreError::Corrupt(format!("{STREAM_POSITION_KEY}: `{v}`")))
            })
            .transpose()?
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel(4096);
        let pending_upper_bound = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let counter = pending_upper_bound.clone();
        let pending_filter = Arc::new(PendingFilter::new());
        let filter = pending_filter.clone();
        let me = Arc::new(Self {
            snapshot: snapshot.clone(),
            jobs: tx,
            pending: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(CONTROL_WINDOW_HORIZON)
                .eviction_listener(move |k: Arc<String>, _v, _cause| {
                    filter.remove(&k);
                    counter.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                })
                .build(),
            pending_upper_bound,
            pending_filter,
            metrics,
            max_future_skew_ms: std::sync::atomic::AtomicU64::new(
                crate::config::DEFAULT_MAX_FUTURE_SKEW_S.saturating_mul(1000),
            ),
            notify: notify::Notifier::default(),
            cluster: std::sync::OnceLock::new(),
            stream_applied: tokio::sync::watch::Sender::new(stream_pos),
            stream_outcomes: Cache::new(65_536),
        });
        let writer = Writer {
            store,
            snapshot,
            next_seq: last_seq + 1,
            stream_pos,
            floors_until: boot.floors.values().copied().max().unwrap_or(0),
            boot,
            posture: Arc::downgrade(&me),
        };
        std::thread::Builder::new()
            .name("portcullis-ingest".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Db(format!("cannot start the ingest thread: {e}")))?;
        Ok(me)
    }

    /// The snapshot.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Sets how far ahead of the acceptance time an event may be dated
    /// (`feeds.max_future_skew_s`); takes effect for the next ingest.
    pub fn set_max_future_skew(&self, skew: Duration) {
        let ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
        self.max_future_skew_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses events dated further ahead of now than the allowed skew
    /// (counted as outcome `future`); nothing of the request is written.
    pub fn check_times(&self, events: &[PostureEvent]) -> Result<(), EventError> {
        let skew_ms = self
            .max_future_skew_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = crate::util::now_unix_ms();
        let limit = now.saturating_add(skew_ms);
        let Some(e) = events.iter().find(|e| e.origin_ms > limit) else {
            return Ok(());
        };
        for e in events.iter().filter(|e| e.origin_ms > limit) {
            self.metrics
                .feed_events
                .get_or_create(&FeedOutcomeLabel {
                    feed: e.feed.as_str(),
                    kind: e.kind.clone(),
                    outcome: "future",
                })
                .inc();
        }
        let ahead_ms = e.origin_ms - now;
        tracing::warn!(
            event_id = %e.id,
            feed = e.feed.as_str(),
            ahead_ms,
            skew_ms,
            "event dated in the future refused; nothing of its request was applied"
        );
        Err(EventError::Future {
            id: e.id.clone(),
            ahead_ms,
            skew_ms,
        })
    }

    /// Listens for what each committed batch changed (sent after publish).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<notify::Changed>> {
        self.notify.subscribe()
    }

    /// Validates, makes durable and applies events; returns once they are
    /// committed (so a caller may acknowledge), with one outcome per event.
    /// With a cluster, durable means acknowledged by JetStream; the call then
    /// waits (bounded) for this replica to apply them from the stream.
    pub async fn ingest(&self, events: Vec<PostureEvent>) -> Result<Vec<Outcome>, IngestError> {
        Ok(self
            .ingest_reports(events)
            .await?
            .into_iter()
            .map(|r| r.outcome)
            .collect())
    }

    /// Like [`Posture::ingest`], with the fields each event did not set.
    pub async fn ingest_reports(
        &self,
        events: Vec<PostureEvent>,
    ) -> Result<Vec<EventReport>, IngestError> {
        for e in &events {
            e.validate()?;
        }
        self.check_times(&events)?;
        if let Some(c) = self.cluster.get() {
            let acks = c.publish(&events).await?;
            if c.is_lazy() {
                // A sidecar does not apply the stream: durable is all it can say.
                return Ok(acks
                    .into_iter()
                    .map(|(_, dup)| EventReport {
                        outcome: if dup {
                            Outcome::Duplicate
                        } else {
                            Outcome::Applied
                        },
                        skipped: Skipped::default(),
                    })
                    .collect());
            }
            let last = acks.iter().map(|a| a.0).max().unwrap_or(0);
            if !self.applied(last, c.ack_timeout()).await {
                tracing::warn!(
                    stream_seq = last,
                    "events are durable in the stream but not applied here yet"
                );
            }
            return Ok(acks
                .into_iter()
                .map(|(seq, duplicate)| {
                    if duplicate {
                        EventReport {
                            outcome: Outcome::Duplicate,
                            skipped: Skipped::default(),
                        }
                    } else {
                        self.stream_outcomes.get(&seq).unwrap_or(EventReport {
                            outcome: Outcome::Applied,
                            skipped: Skipped::default(),
                        })
                    }
                })
                .collect());
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Apply {
                events,
                accepted: Instant::now(),
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)?
    }

    /// Read-your-writes across replicas: waits (up to the cluster's ack
    /// timeout) until this replica has applied every event the stream held
    /// when called, so a change accepted by another replica is visible here.
    /// A no-op without a cluster and on a lazy sidecar (it does not apply
    /// the stream). When NATS cannot say or the wait runs out, the caller
    /// goes on with what this replica has (logged).
    pub async fn catch_up(&self) {
        let Some(c) = self.cluster.get().filter(|c| !c.is_lazy()) else {
            return;
        };
        let (within, started) = (c.ack_timeout(), std::time::Instant::now());
        match tokio::time::timeout(within, c.stream_last_sequence()).await {
            Ok(Ok(last)) => {
                if !self
                    .applied(last, within.saturating_sub(started.elapsed()))
                    .await
                {
                    tracing::warn!(
                        stream_seq = last,
                        "this replica has not applied the stream's tail in time; answering from its picture"
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot tell how far the stream goes; answering from this replica's picture")
            }
            Err(_) => tracing::warn!(
                "cannot tell in time how far the stream goes; answering from this replica's picture"
            ),
        }
    }

    /// Waits up to `within` until this replica applied stream sequence
    /// `seq`; false when it has not by then.
    async fn applied(&self, seq: u64, within: std::time::Duration) -> bool {
        let mut rx = self.stream_applied.subscribe();
        matches!(
            tokio::time::timeout(within, rx.wait_for(|p| *p >= seq)).await,
            Ok(Ok(_))
        )
    }

    /// Joins a cluster: from now on ingest publishes to its stream.
    pub fn attach_cluster(&self, cluster: Arc<cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The cluster, when `[store] kind = "nats"`.
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.cluster.get()
    }

    /// The last stream sequence this replica applied (0 without a cluster).
    pub fn stream_position(&self) -> u64 {
        *self.stream_applied.borrow()
    }

    /// Seconds since this replica last knew it was in sync with the cluster
    /// (0 for the embedded store): `context.snapshot.age_s`.
    pub fn snapshot_age_s(&self) -> u64 {
        self.cluster.get().map_or(0, |c| c.snapshot_age_s())
    }

    /// Applies messages of the cluster stream, in order, through the one
    /// apply path; returns once they (and the new position) are committed.
    pub async fn apply_stream(&self, items: Vec<StreamItem>) -> Result<(), IngestError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Stream { items, reply })
            .await
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)?
    }

    /// Starts an empty replica from the records bucket: commits the
    /// picture's records and its position in one transaction (refused unless
    /// this replica has applied nothing yet).
    pub async fn bootstrap(&self, picture: cluster::records::Picture) -> Result<(), IngestError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Bootstrap {
                picture: Box::new(picture),
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)?
    }

    /// The events that touched a record (`device:…` / `subject:…`), oldest first.
    pub async fn history(&self, key: &str, limit: usize) -> Result<Vec<LoggedEvent>, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::History {
                key: key.to_owned(),
                limit,
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(rx.await.map_err(|_| IngestError::Closed)??)
    }

    /// Reads a feed cursor.
    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::GetMeta {
                key: key.to_owned(),
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(rx.await.map_err(|_| IngestError::Closed)??)
    }

    /// Stores a feed cursor durably.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), IngestError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::SetMeta {
                key: key.to_owned(),
                value: value.to_owned(),
                reply,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(rx.await.map_err(|_| IngestError::Closed)??)
    }

    /// Phase 4 (resolve): looks up the identity and device for a request.
    pub fn resolve(&self, subject: &str, device_id: Option<&str>) -> Resolved {
        self.resolve_with(subject, device_id, || {
            device_id.and_then(|d| self.snapshot.device(d))
        })
    }

    /// [`Posture::resolve`] for a principal's own device claim: the record
    /// found through the claim's memo (see
    /// [`snapshot::Snapshot::device_via`]).
    pub fn resolve_claim(&self, subject: &str, claim: Option<&DeviceClaim>) -> Resolved {
        self.resolve_with(subject, claim.map(DeviceClaim::id), || {
            claim.and_then(|c| self.snapshot.device_via(c))
        })
    }

    /// Phase 4's answer, the device record from `device` (a lookup of
    /// `device_id`).
    fn resolve_with(
        &self,
        subject: &str,
        device_id: Option<&str>,
        device: impl FnOnce() -> Option<Arc<Device>>,
    ) -> Resolved {
        // INVARIANT: read the version before the records, so every record
        // written at or below it is visible to the lookups below.
        let snapshot_version = self.snapshot.version();
        let identity = self.snapshot.identity(subject);
        let device = device();
        Resolved {
            snapshot_version,
            identity,
            device_id: device_id.map(str::to_owned),
            device,
            snapshot_age_s: self.snapshot_age_s(),
        }
    }

    /// The baseline every request gets, before any policy: terminated or
    /// suspended subjects, revoked credentials, and lost / wiped /
    /// compromised devices are refused (fail closed).
    pub fn baseline(
        &self,
        subject: &str,
        r: &Resolved,
        issued_at_s: Option<u64>,
        session_ids: &[&str],
    ) -> Result<(), PostureDenial> {
        Self::subject_lifecycle(r)?;
        self.revocations(subject, r, issued_at_s, session_ids)?;
        Self::device_lifecycle(r)
    }

    /// The lifecycle half of the baseline: suspended or terminated subjects,
    /// lost / wiped / deleted / compromised devices. When a policy set runs,
    /// it decides these instead (and can revoke).
    pub fn lifecycle(r: &Resolved) -> Result<(), PostureDenial> {
        Self::subject_lifecycle(r)?;
        Self::device_lifecycle(r)
    }

    fn subject_lifecycle(r: &Resolved) -> Result<(), PostureDenial> {
        if let Some(i) = &r.identity {
            match i.status {
                IdentityStatus::Active => {}
                IdentityStatus::Suspended => {
                    return Err(PostureDenial::SubjectDisabled("suspended"));
                }
                IdentityStatus::Terminated => {
                    return Err(PostureDenial::SubjectDisabled("terminated"));
                }
            }
        }
        Ok(())
    }

    fn device_lifecycle(r: &Resolved) -> Result<(), PostureDenial> {
        if let Some(d) = &r.device {
            if d.lifecycle.is_dead() {
                return Err(PostureDenial::DeviceUntrusted(model::lifecycle_name(
                    d.lifecycle,
                )));
            }
            if d.compromised {
                return Err(PostureDenial::DeviceCompromised);
            }
        }
        Ok(())
    }

    /// The revocation half of the baseline, always applied: a credential
    /// issued at or before a revocation of its subject, session or device.
    pub fn revocations(
        &self,
        subject: &str,
        r: &Resolved,
        issued_at_s: Option<u64>,
        session_ids: &[&str],
    ) -> Result<(), PostureDenial> {
        let revoked = |target: RevocationTarget, key: &str| -> bool {
            self.snapshot
                .revocation(target, key)
                .is_some_and(|rv| issued_at_s.is_none_or(|iat| iat <= rv.not_before_s))
        };
        let canonical = r.identity.as_ref().map_or(subject, |i| i.subject.as_str());
        if revoked(RevocationTarget::Subject, canonical)
            || (canonical != subject && revoked(RevocationTarget::Subject, subject))
        {
            return Err(PostureDenial::Revoked("subject"));
        }
        if session_ids
            .iter()
            .any(|s| revoked(RevocationTarget::Session, s))
        {
            return Err(PostureDenial::Revoked("session"));
        }
        if let Some(d) = &r.device_id
            && revoked(RevocationTarget::Device, d)
        {
            return Err(PostureDenial::Revoked("device"));
        }
        Ok(())
    }

    /// Phase 7 helper: if this request is the first decided on a state some
    /// feed changed, records the control window (accept → decision).
    pub fn observe_control_window(&self, subject: &str, r: &Resolved) {
        if self
            .pending_upper_bound
            .load(std::sync::atomic::Ordering::Acquire)
            <= 0
        {
            return;
        }
        let subj = r.identity.as_ref().map_or(subject, |i| i.subject.as_str());
        let f = &self.pending_filter;
        let mut keys = Vec::new();
        if f.may_hold("subject", subj) {
            keys.push(format!("subject:{subj}"));
        }
        if let Some(d) = &r.device_id
            && f.may_hold("device", d)
        {
            keys.push(format!("device:{d}"));
        }
        for k in keys {
            if let Some(p) = self.pending.get(&k)
                && p.version <= r.snapshot_version
            {
                self.pending.invalidate(&k);
                self.metrics
                    .control_window_seconds
                    .get_or_create(&FeedKindLabel {
                        feed: p.feed,
                        kind: p.kind.clone(),
                    })
                    .observe(p.accepted.elapsed().as_secs_f64());
            }
        }
    }
}

struct Writer {
    store: Box<dyn EventStore>,
    snapshot: Arc<Snapshot>,
    next_seq: u64,
    /// The last cluster stream sequence committed (0 without a cluster).
    stream_pos: u64,
    /// The start from the records bucket, if any (with its floors).
    boot: BootstrapMeta,
    /// The highest floor (0: none in force).
    floors_until: u64,
    posture: std::sync::Weak<Posture>,
}

enum Reply {
    Local(oneshot::Sender<Result<Vec<EventReport>, IngestError>>),
    /// A stream batch: answered once for all its items, by the last one.
    Stream(Option<oneshot::Sender<Result<(), IngestError>>>),
}

struct Applying {
    events: Vec<PostureEvent>,
    accepted: Instant,
    /// When the accepting replica accepted it (ms); `None` = now, here.
    accepted_ms: Option<u64>,
    /// Its cluster stream sequence, for stream messages.
    stream_seq: Option<u64>,
    reply: Reply,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut applies = Vec::new();
            let mut n_events = 0;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Apply {
                        events,
                        accepted,
                        reply,
                    } => {
                        n_events += events.len();
                        applies.push(Applying {
                            events,
                            accepted,
                            accepted_ms: None,
                            stream_seq: None,
                            reply: Reply::Local(reply),
                        });
                    }
                    Job::Stream { items, reply } => {
                        n_events += items.len();
                        let now_ms = crate::util::now_unix_ms();
                        let now = Instant::now();
                        let last = items.len().saturating_sub(1);
                        let mut reply = Some(reply);
                        for (i, item) in items.into_iter().enumerate() {
                            let (accepted_ms, events) = match item.event {
                                Some((ms, ev)) => (ms, vec![ev]),
                                None => (now_ms, Vec::new()),
                            };
                            // The control window runs from the accepting
                            // replica's accept time, carried in the event.
                            let accepted = now
                                .checked_sub(Duration::from_millis(
                                    now_ms.saturating_sub(accepted_ms),
                                ))
                                .unwrap_or(now);
                            applies.push(Applying {
                                events,
                                accepted,
                                accepted_ms: Some(accepted_ms),
                                stream_seq: Some(item.seq),
                                reply: Reply::Stream(if i == last { reply.take() } else { None }),
                            });
                        }
                    }
                    Job::History { key, limit, reply } => {
                        let _ = reply.send(self.store.history(&key, limit));
                    }
                    Job::GetMeta { key, reply } => {
                        let _ = reply.send(self.store.get_meta(&key));
                    }
                    Job::SetMeta { key, value, reply } => {
                        let _ = reply.send(self.store.set_meta(&key, &value));
                    }
                    Job::Bootstrap { picture, reply } => {
                        if !applies.is_empty() {
                            self.apply(std::mem::take(&mut applies));
                        }
                        let _ = reply.send(self.bootstrap(*picture));
                    }
                }
                if n_events < MAX_BATCH_EVENTS {
                    next = rx.try_recv().ok();
                }
            }
            if !applies.is_empty() {
                self.apply(applies);
            }
        }
    }

    fn bootstrap(&mut self, mut p: cluster::records::Picture) -> Result<(), IngestError> {
        if self.stream_pos != 0 || self.next_seq != 1 {
            return Err(IngestError::Store(StoreError::Db(
                "this replica already holds state; it does not start from the records bucket"
                    .into(),
            )));
        }
        // One local sequence number for the whole picture: later changes
        // get higher ones, so versions stay monotonic per record.
        let seq = self.next_seq;
        for d in &mut p.devices {
            d.version = seq;
        }
        for i in &mut p.identities {
            i.version = seq;
        }
        for r in &mut p.revocations {
            r.version = seq;
        }
        for g in &mut p.groups {
            g.version = seq;
        }
        let meta = BootstrapMeta {
            pos: p.pos,
            seq,
            floors: std::mem::take(&mut p.floors),
        };
        let encoded = serde_json::to_string(&meta)
            .map_err(|e| IngestError::Store(StoreError::Db(e.to_string())))?;
        let batch = CommitBatch {
            events: Vec::new(),
            devices: p.devices,
            identities: p.identities,
            revocations: p.revocations,
            groups: p
                .groups
                .into_iter()
                .map(|g| (g.id.clone(), Some(g)))
                .collect(),
            sessions: p
                .sessions
                .into_iter()
                .map(|s| (s.id_hash.clone(), Some(s)))
                .collect(),
            meta: vec![
                (STREAM_POSITION_KEY.to_owned(), p.pos.to_string()),
                (BOOTSTRAP_KEY.to_owned(), encoded),
            ],
        };
        self.store.commit(&batch)?;
        self.snapshot
            .reserve(batch.devices.len() as u64, batch.identities.len() as u64);
        for d in batch.devices {
            self.snapshot.put_device(Arc::new(d));
        }
        for i in batch.identities {
            self.snapshot.put_identity(Arc::new(i));
        }
        for r in batch.revocations {
            self.snapshot.put_revocation(Arc::new(r));
        }
        for (id, g) in batch.groups {
            self.snapshot.put_group(&id, g.map(Arc::new));
        }
        for (id, s) in batch.sessions {
            self.snapshot.put_session(&id, s.map(Arc::new));
        }
        self.next_seq = seq + 1;
        self.snapshot.set_version(seq);
        self.stream_pos = meta.pos;
        self.floors_until = meta.floors.values().copied().max().unwrap_or(0);
        self.boot = meta;
        if let Some(p) = self.posture.upgrade() {
            p.stream_applied.send_replace(self.stream_pos);
        }
        Ok(())
    }

    /// True when the record a change touches already holds stream message
    /// `seq` (loaded from the records bucket at a later label).
    fn below_floor(&self, seq: Option<u64>, change: &Change) -> bool {
        match seq {
            Some(s) if s <= self.floors_until => self
                .boot
                .floors
                .get(&cluster::records::change_key(change))
                .is_some_and(|f| s <= *f),
            _ => false,
        }
    }

    fn apply(&mut self, jobs: Vec<Applying>) {
        let started = Instant::now();
        let accepted_ms = crate::util::now_unix_ms();
        let mut batch = CommitBatch::default();
        let mut devices: HashMap<String, Device> = HashMap::new();
        let mut identities: HashMap<String, Identity> = HashMap::new();
        let mut revocations: HashMap<(RevocationTarget, String), Revocation> = HashMap::new();
        let mut groups: HashMap<String, Option<Group>> = HashMap::new();
        let mut sessions: HashMap<String, Option<SessionRecord>> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut outcomes: Vec<Vec<EventReport>> = Vec::with_capacity(jobs.len());
        let mut pendings: Vec<(String, Pending)> = Vec::new();
        let first_seq = self.next_seq;
        let mut failed: Option<StoreError> = None;
        let mut stream_pos = self.stream_pos;
        let mut stream_outcomes: Vec<(u64, EventReport)> = Vec::new();
        let mut lag_ms: Option<u64> = None;

        'jobs: for job in &jobs {
            let mut outs = Vec::with_capacity(job.events.len());
            let accepted_ms = job.accepted_ms.unwrap_or(accepted_ms);
            if let Some(seq) = job.stream_seq {
                // INVARIANT: the position only moves forward, so a message
                // redelivered after a reconnect is never applied twice.
                if seq <= stream_pos {
                    outs.extend(job.events.iter().map(|_| EventReport {
                        outcome: Outcome::Duplicate,
                        skipped: Skipped::default(),
                    }));
                    outcomes.push(outs);
                    continue;
                }
                stream_pos = seq;
                lag_ms = Some(crate::util::now_unix_ms().saturating_sub(accepted_ms));
            }
            for ev in &job.events {
                let dup = seen.contains(&ev.id)
                    || match self.store.contains(&ev.id) {
                        Ok(b) => b,
                        Err(e) => {
                            failed = Some(e);
                            break 'jobs;
                        }
                    };
                if dup {
                    let report = EventReport {
                        outcome: Outcome::Duplicate,
                        skipped: Skipped::default(),
                    };
                    if let Some(s) = job.stream_seq {
                        stream_outcomes.push((s, report.clone()));
                    }
                    outs.push(report);
                    continue;
                }
                seen.insert(ev.id.clone());
                let seq = self.next_seq;
                self.next_seq += 1;
                // INVARIANT: no origin time is later than its acceptance
                // (`Posture::check_times` refused anything beyond the skew;
                // within it, the event counts as happening now), so no feed
                // clock can date a field past the next honest event.
                let origin_ms = ev.origin_ms.min(accepted_ms);
                let mut applied = false;
                let mut skipped = Skipped::default();
                let note = |list: &mut Vec<String>, names: &[&'static str]| {
                    for n in names {
                        if !list.iter().any(|x| x == n) {
                            list.push((*n).to_owned());
                        }
                    }
                };
                for change in &ev.changes {
                    if self.below_floor(job.stream_seq, change) {
                        // Already in the record loaded from the bucket.
                        applied = true;
                        continue;
                    }
                    match change {
                        Change::Device { id, patch } => {
                            let cur = devices
                                .get(id)
                                .cloned()
                                .or_else(|| self.snapshot.device(id).map(|d| (*d).clone()));
                            let (mut d, r) = merge_device(cur.as_ref(), id, patch, origin_ms);
                            note(&mut skipped.stale_fields, &r.stale);
                            note(&mut skipped.held_fields, &r.held);
                            if !r.applied {
                                continue;
                            }
                            d.source = Some(ev.feed);
                            d.version = seq;
                            devices.insert(id.clone(), d);
                            applied = true;
                        }
                        Change::Identity { subject, patch } => {
                            let cur = identities
                                .get(subject)
                                .cloned()
                                .or_else(|| self.snapshot.identity(subject).map(|i| (*i).clone()))
                                .filter(|i| i.subject == *subject);
                            let (mut i, r) =
                                merge_identity(cur.as_ref(), subject, patch, origin_ms);
                            note(&mut skipped.stale_fields, &r.stale);
                            note(&mut skipped.held_fields, &r.held);
                            if !r.applied {
                                continue;
                            }
                            i.source = Some(ev.feed);
                            i.version = seq;
                            identities.insert(subject.clone(), i);
                            applied = true;
                        }
                        Change::Group { id, record } => {
                            let cur_ms = match groups.get(id) {
                                Some(g) => g.as_ref().map(|g| g.updated_ms),
                                None => self.snapshot.group(id).map(|g| g.updated_ms),
                            };
                            if cur_ms.is_some_and(|u| u > origin_ms) {
                                note(&mut skipped.stale_fields, &["group"]);
                                continue;
                            }
                            let rec = record.clone().map(|mut g| {
                                g.id = id.clone();
                                g.updated_ms = origin_ms;
                                g.source = Some(ev.feed);
                                g.version = seq;
                                g
                            });
                            groups.insert(id.clone(), rec);
                            applied = true;
                        }
                        Change::Session { id_hash, record } => {
                            // Sessions have one writer (the proxy that owns
                            // the cookie exchange): last write wins, and a
                            // delete is final within the batch.
                            let mut rec = record.as_deref().cloned();
                            // DBSC state has its own writer (`SessionDbsc`): a
                            // whole-record rewrite from a copy read before the
                            // key was registered (a `shorten` cap) keeps it.
                            // Only a delete (or a new session) drops it.
                            if let Some(r) = rec.as_mut().filter(|r| r.dbsc.is_none()) {
                                let dbsc = match sessions.get(id_hash) {
                                    Some(cur) => cur.as_ref().and_then(|c| c.dbsc.clone()),
                                    None => {
                                        self.snapshot.session(id_hash).and_then(|c| c.dbsc.clone())
                                    }
                                };
                                if let Some(d) = dbsc {
                                    *r = r.with_dbsc(d);
                                }
                            }
                            sessions.insert(id_hash.clone(), rec);
                            applied = true;
                        }
                        Change::SessionDbsc { id_hash, dbsc } => {
                            // Applied to the record as it stands now (this
                            // batch first), never to a copy a writer read earlier.
                            let current = match sessions.get(id_hash) {
                                Some(r) => r.clone(),
                                None => self.snapshot.session(id_hash).map(|r| (*r).clone()),
                            };
                            let Some(current) = current else {
                                // The session ended first: nothing to bind.
                                continue;
                            };
                            sessions
                                .insert(id_hash.clone(), Some(current.with_dbsc((**dbsc).clone())));
                            applied = true;
                        }
                        Change::Revoke { target, key } => {
                            // Credentials issued up to acceptance are revoked; a
                            // late (out-of-order) revocation only reaches back to
                            // its own origin time, so it cannot kill credentials
                            // issued after a newer re-enable.
                            let newer_state = match target {
                                RevocationTarget::Subject => identities
                                    .get(key)
                                    .map(|i| i.updated_ms)
                                    .or_else(|| self.snapshot.identity(key).map(|i| i.updated_ms)),
                                RevocationTarget::Device => devices
                                    .get(key)
                                    .map(|d| d.updated_ms)
                                    .or_else(|| self.snapshot.device(key).map(|d| d.updated_ms)),
                                RevocationTarget::Session => None,
                            }
                            .is_some_and(|u| u > origin_ms);
                            let nb = if newer_state {
                                origin_ms / 1000
                            } else {
                                accepted_ms / 1000
                            };
                            let rk = (*target, key.clone());
                            let prev = revocations
                                .get(&rk)
                                .map(|r| r.not_before_s)
                                .or_else(|| {
                                    self.snapshot
                                        .revocation(*target, key)
                                        .map(|r| r.not_before_s)
                                })
                                .unwrap_or(0);
                            if nb <= prev {
                                continue;
                            }
                            revocations.insert(
                                rk,
                                Revocation {
                                    target: *target,
                                    key: key.clone(),
                                    not_before_s: nb,
                                    source: Some(ev.feed),
                                    version: seq,
                                },
                            );
                            applied = true;
                        }
                    }
                }
                let outcome = match (applied, skipped.is_empty()) {
                    (true, true) => Outcome::Applied,
                    (true, false) => Outcome::Partial,
                    (false, _) if !skipped.held_fields.is_empty() => Outcome::Held,
                    (false, _) => Outcome::Stale,
                };
                if matches!(outcome, Outcome::Partial | Outcome::Held | Outcome::Stale) {
                    tracing::info!(
                        event_id = %ev.id,
                        feed = ev.feed.as_str(),
                        kind = %ev.kind,
                        outcome = outcome.as_str(),
                        stale_fields = ?skipped.stale_fields,
                        held_fields = ?skipped.held_fields,
                        "event not applied in full"
                    );
                }
                if applied {
                    for k in ev.touched() {
                        pendings.push((
                            k,
                            Pending {
                                accepted: job.accepted,
                                version: seq,
                                feed: ev.feed.as_str(),
                                kind: ev.kind.clone(),
                            },
                        ));
                    }
                }
                let mut logged = ev.clone();
                logged.origin_ms = origin_ms;
                batch.events.push(LoggedEvent {
                    seq,
                    event: logged,
                    accepted_ms,
                    outcome,
                    skipped: skipped.clone(),
                });
                let report = EventReport { outcome, skipped };
                if let Some(s) = job.stream_seq {
                    stream_outcomes.push((s, report.clone()));
                }
                outs.push(report);
            }
            outcomes.push(outs);
        }

        if stream_pos != self.stream_pos {
            batch
                .meta
                .push((STREAM_POSITION_KEY.to_owned(), stream_pos.to_string()));
        }
        let floors_done = self.floors_until > 0 && stream_pos >= self.floors_until;
        if floors_done {
            let done = BootstrapMeta {
                pos: self.boot.pos,
                seq: self.boot.seq,
                floors: HashMap::new(),
            };
            if let Ok(v) = serde_json::to_string(&done) {
                batch.meta.push((BOOTSTRAP_KEY.to_owned(), v));
            }
        }
        if failed.is_none() && (!batch.events.is_empty() || !batch.meta.is_empty()) {
            batch.devices = devices.values().cloned().collect();
            batch.identities = identities.values().cloned().collect();
            batch.revocations = revocations.values().cloned().collect();
            batch.groups = groups.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            batch.sessions = sessions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Err(e) = self.store.commit(&batch) {
                failed = Some(e);
            }
        }
        let posture = self.posture.upgrade();
        if let Some(e) = failed {
            self.next_seq = first_seq;
            tracing::error!(error = %e, "event batch not stored; feeds get an error and will retry");
            for job in jobs {
                let err = IngestError::Store(StoreError::Db(e.to_string()));
                match job.reply {
                    Reply::Local(r) => {
                        let _ = r.send(Err(err));
                    }
                    Reply::Stream(Some(r)) => {
                        let _ = r.send(Err(err));
                    }
                    Reply::Stream(None) => {}
                }
            }
            return;
        }
        // Durable now. Full cluster replicas also write the records to the
        // shared records bucket (queued, off this thread).
        if let Some(c) = posture.as_ref().and_then(|p| p.cluster.get())
            && c.wants_records()
            && stream_pos != self.stream_pos
        {
            c.records_changed(cluster::records::RecordsUpdate::new(
                stream_pos,
                devices.values(),
                identities.values(),
                revocations.values(),
                groups.iter().map(|(k, v)| (k, v.as_ref())),
                sessions.iter().map(|(k, v)| (k, v.as_ref())),
            ));
        }
        // Publish: pending control windows first, then records,
        // then the version (see `Posture::resolve`).
        if let Some(p) = &posture {
            for (k, pend) in pendings {
                p.pending_filter.add(&k);
                p.pending_upper_bound
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                p.pending.insert(k, pend);
            }
        }
        let mut changed = posture.as_ref().and_then(|p| {
            p.notify
                .collect(devices.keys(), identities.keys(), revocations.keys())
        });
        // An ended browser session is named by its principal's `jti`, so
        // live connections riding on it are decided again (and cut) at once.
        if let Some(c) = changed.as_mut() {
            c.sessions.extend(
                sessions
                    .iter()
                    .filter(|(_, r)| r.is_none())
                    .map(|(h, _)| session::principal_jti(h)),
            );
        }
        for (_, d) in devices {
            self.snapshot.put_device(Arc::new(d));
        }
        for (_, i) in identities {
            self.snapshot.put_identity(Arc::new(i));
        }
        for (_, r) in revocations {
            self.snapshot.put_revocation(Arc::new(r));
        }
        for (id, g) in groups {
            self.snapshot.put_group(&id, g.map(Arc::new));
        }
        for (id, s) in sessions {
            self.snapshot.put_session(&id, s.map(Arc::new));
        }
        self.snapshot.set_version(self.next_seq - 1);
        if let (Some(p), Some(c)) = (&posture, changed) {
            p.notify.publish(c, self.next_seq - 1);
        }
        let moved = stream_pos != self.stream_pos;
        self.stream_pos = stream_pos;
        if floors_done {
            self.floors_until = 0;
            self.boot.floors.clear();
        }
        if let Some(p) = &posture
            && moved
        {
            for (s, o) in stream_outcomes {
                p.stream_outcomes.insert(s, o);
            }
            p.stream_applied.send_replace(stream_pos);
            if let Some(ms) = lag_ms {
                p.metrics.cluster_stream_lag_seconds.set(ms as f64 / 1000.0);
            }
        }
        if let Some(p) = &posture {
            p.metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            // Count per label set first: one metrics lookup per distinct
            // (feed, kind, outcome) in the batch, not one per event.
            let mut counts: HashMap<(&'static str, &str, &'static str), u64> = HashMap::new();
            for (job, outs) in jobs.iter().zip(&outcomes) {
                for (ev, o) in job.events.iter().zip(outs) {
                    *counts
                        .entry((ev.feed.as_str(), ev.kind.as_str(), o.outcome.as_str()))
                        .or_default() += 1;
                }
            }
            for ((feed, kind, outcome), n) in counts {
                p.metrics
                    .feed_events
                    .get_or_create(&FeedOutcomeLabel {
                        feed,
                        kind: kind.to_owned(),
                        outcome,
                    })
                    .inc_by(n);
            }
        }
        for (job, outs) in jobs.into_iter().zip(outcomes) {
            match job.reply {
                Reply::Local(r) => {
                    let _ = r.send(Ok(outs));
                }
                Reply::Stream(Some(r)) => {
                    let _ = r.send(Ok(()));
                }
                Reply::Stream(None) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PendingFilter;

    #[test]
    fn a_pending_key_is_always_seen_and_a_removed_one_goes_away() {
        let f = PendingFilter::new();
        assert!(!f.may_hold("device", "d1"));
        f.add("device:d1");
        f.add("device:d1");
        assert!(f.may_hold("device", "d1"));
        f.remove("device:d1");
        assert!(f.may_hold("device", "d1"), "one entry still pending");
        f.remove("device:d1");
        assert!(!f.may_hold("device", "d1"));
    }

    #[test]
    fn few_lookups_pass_needlessly_at_twenty_thousand_pending() {
        let f = PendingFilter::new();
        for i in 0..20_000 {
            f.add(&format!("device:pending-{i}"));
        }
        for i in 0..20_000 {
            assert!(f.may_hold("device", &format!("pending-{i}")));
        }
        let needless = (0..20_000)
            .filter(|i| f.may_hold("device", &format!("other-{i}")))
            .count();
        // Two slots per key: about 2% expected (one slot: about 7%).
        assert!(needless < 20_000 * 4 / 100, "{needless} of 20000");
    }
}
