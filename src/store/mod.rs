//! Durable storage behind one narrow trait: an append-only event log plus the
//! materialised records, written together in one transaction. SQLite (WAL) is
//! the embedded default; a NATS JetStream store can implement the same trait.
//!
//! This room never decides access and never reads the clock: it stores what
//! the ingest path hands it.

pub mod nats;
pub mod sqlite;

use serde::{Deserialize, Serialize};

use crate::posture::event::PostureEvent;
use crate::posture::model::{Device, Group, Identity, Revocation};

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
    /// Applied; at least one record changed.
    Applied,
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
