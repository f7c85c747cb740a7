//! Durable storage: implementations of the posture service's storage port
//! ([`EventStore`], defined in `posture::journal`). SQLite (WAL) is the
//! embedded default. (The NATS JetStream replication of the apply path lives
//! with the posture service, in `posture::cluster`.)
//!
//! This room never decides access and never reads the clock: it stores what
//! the ingest path hands it.

pub mod sqlite;

pub use crate::posture::journal::{
    CommitBatch, EventReport, EventStore, Loaded, LoggedEvent, Outcome, Skipped, StoreError,
};
