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
pub use snapshot::Snapshot;

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
}

#[derive(Debug, Clone)]
struct Pending {
    accepted: Instant,
    version: u64,
    feed: &'static str,
    kind: String,
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
    metrics: Arc<Metrics>,
    /// How far ahead of the acceptance time an origin time may be (ms).
    max_future_skew_ms: std::sync::atomic::AtomicU64,
    /// Change notices after each committed batch (live connections listen).
    notify: notify::Notifier,
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
            crate::store::Loaded::Session(s) => {
                let id = s.id_hash.clone();
                snapshot.put_session(&id, Some(Arc::new(s)));
            }
        })?;
        snapshot.set_version(last_seq);
        let (tx, rx) = mpsc::channel(4096);
        let pending_upper_bound = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let counter = pending_upper_bound.clone();
        let me = Arc::new(Self {
            snapshot: snapshot.clone(),
            jobs: tx,
            pending: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(CONTROL_WINDOW_HORIZON)
                .eviction_listener(move |_k, _v, _cause| {
                    counter.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                })
                .build(),
            pending_upper_bound,
            metrics,
            max_future_skew_ms: std::sync::atomic::AtomicU64::new(
                crate::config::DEFAULT_MAX_FUTURE_SKEW_S.saturating_mul(1000),
            ),
            notify: notify::Notifier::default(),
        });
        let writer = Writer {
            store,
            snapshot,
            next_seq: last_seq + 1,
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
        // INVARIANT: read the version before the records, so every record
        // written at or below it is visible to the lookups below.
        let snapshot_version = self.snapshot.version();
        let identity = self.snapshot.identity(subject);
        let device = device_id.and_then(|d| self.snapshot.device(d));
        Resolved {
            snapshot_version,
            identity,
            device_id: device_id.map(str::to_owned),
            device,
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
        let mut keys = vec![format!("subject:{subj}")];
        if let Some(d) = &r.device_id {
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
    posture: std::sync::Weak<Posture>,
}

struct Applying {
    events: Vec<PostureEvent>,
    accepted: Instant,
    reply: oneshot::Sender<Result<Vec<EventReport>, IngestError>>,
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
                            reply,
                        });
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

        'jobs: for job in &jobs {
            let mut outs = Vec::with_capacity(job.events.len());
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
                    outs.push(EventReport {
                        outcome: Outcome::Duplicate,
                        skipped: Skipped::default(),
                    });
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
                            sessions.insert(id_hash.clone(), record.as_deref().cloned());
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
                outs.push(EventReport { outcome, skipped });
            }
            outcomes.push(outs);
        }

        if failed.is_none() && !batch.events.is_empty() {
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
                let _ = job
                    .reply
                    .send(Err(IngestError::Store(StoreError::Db(e.to_string()))));
            }
            return;
        }
        // Durable now. Publish: pending control windows first, then records,
        // then the version (see `Posture::resolve`).
        if let Some(p) = &posture {
            for (k, pend) in pendings {
                p.pending_upper_bound
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                p.pending.insert(k, pend);
            }
        }
        let changed = posture.as_ref().and_then(|p| {
            p.notify
                .collect(devices.keys(), identities.keys(), revocations.keys())
        });
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
            let _ = job.reply.send(Ok(outs));
        }
    }
}
