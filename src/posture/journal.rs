//! The storage port of the posture service: an append-only event log plus
//! the materialised records, written together in one transaction. The
//! posture service owns this contract; `store/` holds its implementations
//! (SQLite, the embedded default; a NATS JetStream store can implement the
//! same trait).
//!
//! Implementations never decide access and never read the clock: they store
//! what the ingest path hands them.

use serde::{Deserialize, Serialize};

use super::event::PostureEvent;
use super::model::{Device, Group, Identity, Revocation};
use super::session::SessionRecord;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("store: {0}")]
    Db(String),
    /// A stored record did not decode.
    #[error("store: corrupt record: {0}")]
    Corrupt(String),
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; every change it carried was set.
    Applied,
    /// Applied in part: some fields were set, others were older than what a
    /// newer event had set (stale) or kept by a sticky state (held).
    Partial,
    /// Nothing set: every field it would clear is kept by a sticky state
    /// (lost, wiped, compromised need a re-enrolment or an operator restore).
    Held,
    /// Every change was older than the record it targets; logged, not applied.
    Stale,
    /// The same event id was seen before; nothing written.
    Duplicate,
}

impl Outcome {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Partial => "partial",
            Self::Held => "held",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
        }
    }
}

/// One logged event with its bookkeeping, as history shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// Snapshot version assigned to it.
    pub seq: u64,
    /// The event.
    pub event: PostureEvent,
    /// When it was accepted, ms since epoch.
    pub accepted_ms: u64,
    /// What happened.
    pub outcome: Outcome,
    /// The fields it did not set, when `partial`, `held` or `stale`.
    #[serde(flatten)]
    pub skipped: Skipped,
}

/// The fields an event did not set, and why (deduplicated, in order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Fields a newer event had already set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_fields: Vec<String>,
    /// Fields a sticky state kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_fields: Vec<String>,
}

impl Skipped {
    /// True when every field was set.
    pub fn is_empty(&self) -> bool {
        self.stale_fields.is_empty() && self.held_fields.is_empty()
    }
}

/// What one ingested event did: its outcome and the fields it did not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventReport {
    /// The outcome.
    pub outcome: Outcome,
    /// The fields it did not set.
    pub skipped: Skipped,
}

impl EventReport {
    /// The outcome and skipped fields as a feed's JSON result fields.
    pub fn json_fields(&self, into: &mut serde_json::Map<String, serde_json::Value>) {
        into.insert("outcome".into(), self.outcome.as_str().into());
        if !self.skipped.stale_fields.is_empty() {
            into.insert(
                "stale_fields".into(),
                self.skipped.stale_fields.clone().into(),
            );
        }
        if !self.skipped.held_fields.is_empty() {
            into.insert(
                "held_fields".into(),
                self.skipped.held_fields.clone().into(),
            );
        }
    }
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// Events to append (duplicates already filtered out).
    pub events: Vec<LoggedEvent>,
    /// Device records in their new state.
    pub devices: Vec<Device>,
    /// Identity records in their new state.
    pub identities: Vec<Identity>,
    /// Revocations in their new state.
    pub revocations: Vec<Revocation>,
    /// Groups in their new state (`None` = deleted), by id.
    pub groups: Vec<(String, Option<Group>)>,
    /// Browser sessions in their new state (`None` = deleted), by id hash.
    pub sessions: Vec<(String, Option<SessionRecord>)>,
    /// Meta values written in the same transaction (the cluster stream position).
    pub meta: Vec<(String, String)>,
}

/// One record read back on a cold start.
#[derive(Debug)]
pub enum Loaded {
    /// How many devices and identities follow (sent first, for pre-sizing).
    SizeHint {
        /// Devices.
        devices: u64,
        /// Identities.
        identities: u64,
    },
    /// A device.
    Device(Device),
    /// An identity.
    Identity(Identity),
    /// A revocation.
    Revocation(Revocation),
    /// A SCIM group.
    Group(Group),
    /// A browser session.
    Session(SessionRecord),
}

/// The storage contract. Implementations must make `commit` atomic and
/// durable before returning: an event acknowledged to a feed is never lost.
pub trait EventStore: Send + 'static {
    /// True when an event with this id is already in the log.
    fn contains(&mut self, event_id: &str) -> Result<bool, StoreError>;
    /// Appends the events and writes the records, in one transaction.
    fn commit(&mut self, batch: &CommitBatch) -> Result<(), StoreError>;
    /// Streams every record into `sink` (cold start) and returns the highest
    /// event sequence number. Streaming keeps the peak memory at one copy; an
    /// implementation may call `sink` from several threads at once.
    fn load(&mut self, sink: &(dyn Fn(Loaded) + Sync)) -> Result<u64, StoreError>;
    /// Events that touched a record key (`device:…`, `subject:…`), oldest first.
    fn history(&mut self, record_key: &str, limit: usize) -> Result<Vec<LoggedEvent>, StoreError>;
    /// A small key/value area for feed cursors (poll positions, watermarks).
    fn get_meta(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets a meta value (its own transaction).
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
}
