//! The records bucket (`<stream>_RECORDS`): the materialised picture, one KV
//! key per record, for sidecars (`store.nats.cache = "lazy"`) that keep only
//! a bounded cache. Full replicas write the records each applied batch
//! changed, labelled with the stream position they reflect; a write never
//! replaces a record labelled with a later position (compare-and-set on the
//! KV revision), so replicas that apply at different speeds converge on the
//! newest state. Lazy replicas read devices on demand and follow every other
//! record (identities, revocations, groups, browser sessions) with KV
//! watchers.
//!
//! The key `meta.pos` ([`MARKER_KEY`]) says how far the bucket is complete:
//! every record changed at a stream position at or below it is in the bucket,
//! at that label or a later one. A full replica that starts with an empty
//! local store loads the bucket ([`Picture`]) and consumes the stream from
//! the marker + 1 instead of replaying the whole stream; records the bucket
//! already holds at a later label than the marker become *floors*: a stream
//! message at or below a record's floor is already in that record and is not
//! applied to it again.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use crate::posture::Snapshot;
use crate::posture::event::Change;
use crate::posture::model::{Device, Group, Identity, Revocation, RevocationTarget};
use crate::posture::session::SessionRecord;

/// The key of the completeness marker (`{"pos": <stream position>}`).
pub const MARKER_KEY: &str = "meta.pos";

/// Most record batches waiting to be written before new ones are dropped
/// (and counted); another full replica writes the same records.
pub const QUEUE: usize = 4096;
/// Attempts of one compare-and-set before giving up on a record.
const CAS_ATTEMPTS: usize = 5;

/// One stored record: the stream position it reflects and the record
/// (`None`: deleted).
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored<T> {
    /// Stream position.
    pub pos: u64,
    /// The record.
    pub record: Option<T>,
}

#[derive(Deserialize)]
struct PosOnly {
    pos: u64,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s.as_bytes())
}

/// KV key of a device (ids are arbitrary text: base64url keeps keys valid).
pub fn device_key(id: &str) -> String {
    format!("dev.{}", b64(id))
}
/// KV key of an identity.
pub fn identity_key(subject: &str) -> String {
    format!("sub.{}", b64(subject))
}
/// KV key of a revocation.
pub fn revocation_key(target: RevocationTarget, key: &str) -> String {
    format!("rev.{}.{}", target.as_str(), b64(key))
}
/// KV key of a SCIM group.
pub fn group_key(id: &str) -> String {
    format!("grp.{}", b64(id))
}
/// KV key of a browser session (by the hash of its id).
pub fn session_key(id_hash: &str) -> String {
    format!("ses.{}", b64(id_hash))
}

/// The KV key of the record a change touches (the key of its floor).
pub fn change_key(c: &Change) -> String {
    match c {
        Change::Device { id, .. } => device_key(id),
        Change::Identity { subject, .. } => identity_key(subject),
        Change::Group { id, .. } => group_key(id),
        Change::Session { id_hash, .. } | Change::SessionDbsc { id_hash, .. } => {
            session_key(id_hash)
        }
        Change::Revoke { target, key } => revocation_key(*target, key),
    }
}

fn unb64(s: &str) -> Option<String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
}

/// The records one committed batch changed, encoded for the bucket.
#[derive(Debug, Default)]
pub struct RecordsUpdate {
    /// Stream position after the batch.
    pub pos: u64,
    /// Key and encoded [`Stored`] value.
    pub items: Vec<(String, Bytes)>,
}

fn enc<T: Serialize>(pos: u64, record: Option<&T>) -> Option<Bytes> {
    serde_json::to_vec(&Stored { pos, record })
        .ok()
        .map(Bytes::from)
}

impl RecordsUpdate {
    /// Encodes a batch's records.
    pub fn new<'a>(
        pos: u64,
        devices: impl Iterator<Item = &'a Device>,
        identities: impl Iterator<Item = &'a Identity>,
        revocations: impl Iterator<Item = &'a Revocation>,
        groups: impl Iterator<Item = (&'a String, Option<&'a Group>)>,
        sessions: impl Iterator<Item = (&'a String, Option<&'a SessionRecord>)>,
    ) -> Self {
        let mut items = Vec::new();
        items.extend(devices.filter_map(|d| Some((device_key(&d.id), enc(pos, Some(d))?))));
        items.extend(
            identities.filter_map(|i| Some((identity_key(&i.subject), enc(pos, Some(i))?))),
        );
        items.extend(
            revocations
                .filter_map(|r| Some((revocation_key(r.target, &r.key), enc(pos, Some(r))?))),
        );
        items.extend(groups.filter_map(|(id, g)| Some((group_key(id), enc(pos, g)?))));
        items.extend(sessions.filter_map(|(id, s)| Some((session_key(id), enc(pos, s)?))));
        Self { pos, items }
    }
}

/// Writes one record unless the bucket already holds it at `pos` or later.
pub async fn cas_put(kv: &kv::Store, key: &str, pos: u64, value: Bytes) -> Result<(), String> {
    for _ in 0..CAS_ATTEMPTS {
        match kv.entry(key).await.map_err(|e| e.to_string())? {
            Some(e) if e.operation == kv::Operation::Put => {
                let cur = serde_json::from_slice::<PosOnly>(&e.value).map_or(0, |p| p.pos);
                if cur >= pos {
                    return Ok(());
                }
                if kv.update(key, value.clone(), e.revision).await.is_ok() {
                    return Ok(());
                }
            }
            _ => match kv.create(key, value.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.to_string()),
            },
        }
    }
    Err(format!("`{key}`: too many concurrent writers"))
}

/// Applies one watched (or fetched) entry of a fully-followed record kind
/// to the snapshot.
pub fn apply_watched(snapshot: &Snapshot, key: &str, value: &[u8]) {
    if key.starts_with("sub.") {
        if let Ok(Stored {
            record: Some(mut i),
            pos,
        }) = serde_json::from_slice::<Stored<Identity>>(value)
        {
            // Versions key the decision cache: the stream position is
            // monotonic per record across writers, local sequences are not.
            i.version = pos;
            snapshot.put_identity(Arc::new(i));
        }
    } else if key.starts_with("rev.") {
        if let Ok(Stored {
            record: Some(r), ..
        }) = serde_json::from_slice::<Stored<Revocation>>(value)
        {
            snapshot.put_revocation(Arc::new(r));
        }
    } else if let Some(enc_id) = key.strip_prefix("grp.")
        && let Ok(s) = serde_json::from_slice::<Stored<Group>>(value)
        && let Some(id) = unb64(enc_id)
    {
        snapshot.put_group(&id, s.record.map(Arc::new));
    } else if let Some(enc_id) = key.strip_prefix("ses.")
        && let Ok(s) = serde_json::from_slice::<Stored<SessionRecord>>(value)
        && let Some(id) = unb64(enc_id)
    {
        snapshot.put_session(&id, s.record.map(Arc::new));
    }
}

/// The bucket's picture, loaded by a new full replica: the records, the
/// marker position it starts from, and the floors of records labelled later.
#[derive(Debug, Default)]
pub struct Picture {
    /// The marker: the stream position the replica continues after.
    pub pos: u64,
    /// Devices.
    pub devices: Vec<Device>,
    /// Identities.
    pub identities: Vec<Identity>,
    /// Revocations.
    pub revocations: Vec<Revocation>,
    /// Groups (deleted ones are only floors).
    pub groups: Vec<Group>,
    /// Browser sessions (ended ones are only floors).
    pub sessions: Vec<SessionRecord>,
    /// KV key → label, for records labelled after `pos`.
    pub floors: HashMap<String, u64>,
    /// Entries that did not decode (counted, skipped).
    pub bad: u64,
}

impl Picture {
    /// The highest floor (the stream position up to which floors matter).
    pub fn floors_until(&self) -> u64 {
        self.floors.values().copied().max().unwrap_or(0)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.devices.len()
            + self.identities.len()
            + self.revocations.len()
            + self.groups.len()
            + self.sessions.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one bucket entry (the marker and unknown keys are ignored).
    pub fn add(&mut self, key: &str, value: &[u8]) {
        fn take<T: serde::de::DeserializeOwned>(
            pic: &mut Picture,
            key: &str,
            value: &[u8],
        ) -> Option<T> {
            match serde_json::from_slice::<Stored<T>>(value) {
                Ok(s) => {
                    if s.pos > pic.pos {
                        pic.floors.insert(key.to_owned(), s.pos);
                    }
                    s.record
                }
                Err(_) => {
                    pic.bad += 1;
                    None
                }
            }
        }
        let Some((kind, rest)) = key.split_once('.') else {
            return;
        };
        match kind {
            "dev" => {
                if let Some(d) = take::<Device>(self, key, value) {
                    self.devices.push(d);
                }
            }
            "sub" => {
                if let Some(i) = take::<Identity>(self, key, value) {
                    self.identities.push(i);
                }
            }
            "rev" => {
                if let Some(r) = take::<Revocation>(self, key, value) {
                    self.revocations.push(r);
                }
            }
            "grp" => {
                let g = take::<Group>(self, key, value);
                if let (Some(mut g), Some(id)) = (g, unb64(rest)) {
                    g.id = id;
                    self.groups.push(g);
                }
            }
            "ses" => {
                if let Some(s) = take::<SessionRecord>(self, key, value) {
                    self.sessions.push(s);
                }
            }
            _ => {}
        }
    }
}

/// Reads the marker (0: none yet).
pub async fn read_marker(kv: &kv::Store) -> Result<u64, String> {
    Ok(kv
        .get(MARKER_KEY)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|v| serde_json::from_slice::<PosOnly>(&v).ok())
        .map_or(0, |p| p.pos))
}

/// Why the marker was not moved.
#[derive(Debug)]
pub enum MarkerError {
    /// The marker is below `from`: changes between them may be missing
    /// from the bucket, and this replica cannot vouch for them.
    Behind(u64),
    /// NATS failed.
    Nats(String),
}

/// Moves the marker to `pos` when it is at or above `from` (this replica
/// wrote every record changed after `from`), never backwards.
pub async fn advance_marker(kv: &kv::Store, from: u64, pos: u64) -> Result<(), MarkerError> {
    let value = Bytes::from(format!("{{\"pos\":{pos}}}"));
    for _ in 0..CAS_ATTEMPTS {
        let cur = kv
            .entry(MARKER_KEY)
            .await
            .map_err(|e| MarkerError::Nats(e.to_string()))?;
        match cur {
            Some(e) if e.operation == kv::Operation::Put => {
                let m = serde_json::from_slice::<PosOnly>(&e.value).map_or(0, |p| p.pos);
                if m >= pos {
                    return Ok(());
                }
                if m < from {
                    return Err(MarkerError::Behind(m));
                }
                if kv
                    .update(MARKER_KEY, value.clone(), e.revision)
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            _ => {
                if from > 0 {
                    return Err(MarkerError::Behind(0));
                }
                match kv.create(MARKER_KEY, value.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(MarkerError::Nats(e.to_string())),
                }
            }
        }
    }
    Err(MarkerError::Nats("too many concurrent writers".into()))
}

/// Follows every identity, revocation and group (history first, then
/// updates) until the watch ends or fails.
pub async fn follow(kv: &kv::Store, snapshot: &Snapshot, filter: &str) -> Result<(), String> {
    let mut w = kv
        .watch_with_history(filter)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(e) = w.next().await {
        let e = e.map_err(|e| e.to_string())?;
        if e.operation == kv::Operation::Put {
            apply_watched(snapshot, &e.key, &e.value);
        }
    }
    Ok(())
}

/// The lazy device cache: which devices this replica holds, and at which
/// stream position. An evicted device leaves the snapshot.
pub struct LazyDevices {
    resident: moka::sync::Cache<String, u64>,
}

impl std::fmt::Debug for LazyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyDevices")
            .field("entries", &self.resident.entry_count())
            .finish()
    }
}

/// Longest a lazily cached device is trusted without an update from the
/// watcher (a bound on any missed invalidation).
pub const LAZY_TTL: Duration = Duration::from_secs(300);

impl LazyDevices {
    /// A cache of at most `capacity` devices, evicting from `snapshot`.
    pub fn new(capacity: u64, snapshot: Arc<Snapshot>) -> Self {
        Self {
            resident: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(LAZY_TTL)
                .eviction_listener(move |k: Arc<String>, _v, cause| {
                    // A replaced entry stays; every other cause leaves.
                    if cause != moka::notification::RemovalCause::Replaced {
                        snapshot.evict_device(&k);
                    }
                })
                .build(),
        }
    }

    /// True when the device (or its absence) is cached.
    pub fn contains(&self, id: &str) -> bool {
        self.resident.contains_key(id)
    }

    /// Installs a fetched or watched device state if it is newer than the
    /// cached one; `only_if_resident` (watcher) ignores devices not held.
    pub fn offer(
        &self,
        snapshot: &Snapshot,
        id: &str,
        value: Option<&[u8]>,
        only_if_resident: bool,
    ) {
        let stored = value.and_then(|v| serde_json::from_slice::<Stored<Device>>(v).ok());
        let pos = stored.as_ref().map_or(0, |s| s.pos);
        let _ = self.resident.entry(id.to_owned()).and_compute_with(|cur| {
            use moka::ops::compute::Op;
            match cur {
                None if only_if_resident => Op::Nop,
                Some(c) if *c.value() >= pos && pos != 0 => Op::Nop,
                Some(c) if pos == 0 && *c.value() > 0 => Op::Nop,
                _ => {
                    if let Some(Stored {
                        record: Some(mut d),
                        pos,
                    }) = stored
                    {
                        d.version = pos;
                        snapshot.put_device(Arc::new(d));
                    }
                    Op::Put(pos)
                }
            }
        });
    }

    /// Entries held.
    pub fn len(&self) -> u64 {
        self.resident.entry_count()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Follows device updates (new ones only) for the devices held.
pub async fn follow_devices(
    kv: &kv::Store,
    snapshot: &Snapshot,
    lazy: &LazyDevices,
) -> Result<(), String> {
    let mut w = kv.watch("dev.>").await.map_err(|e| e.to_string())?;
    while let Some(e) = w.next().await {
        let e = e.map_err(|e| e.to_string())?;
        let Some(id) = e.key.strip_prefix("dev.").and_then(unb64) else {
            continue;
        };
        let value = (e.operation == kv::Operation::Put).then_some(&e.value[..]);
        lazy.offer(snapshot, &id, value, true);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stored<T: Serialize>(pos: u64, record: Option<&T>) -> Vec<u8> {
        serde_json::to_vec(&Stored { pos, record }).unwrap()
    }

    #[test]
    fn a_picture_keeps_records_and_floors_only_past_its_marker() {
        let mut p = Picture {
            pos: 10,
            ..Default::default()
        };
        let d = Device {
            id: "d1".into(),
            ..Default::default()
        };
        p.add(&device_key("d1"), &stored(7, Some(&d)));
        p.add(&device_key("d2"), &stored(12, Some(&d)));
        // An ended session later than the marker: no record, but a floor.
        p.add(&session_key("abc"), &stored::<SessionRecord>(15, None));
        p.add(MARKER_KEY, br#"{"pos":10}"#);
        p.add(&group_key("g"), b"not json");
        assert_eq!(p.devices.len(), 2);
        assert!(p.sessions.is_empty());
        assert_eq!(p.bad, 1);
        assert_eq!(p.floors.get(&device_key("d2")), Some(&12));
        assert_eq!(p.floors.get(&session_key("abc")), Some(&15));
        assert!(!p.floors.contains_key(&device_key("d1")));
        assert_eq!(p.floors_until(), 15);
        let ended = Change::Session {
            id_hash: "abc".into(),
            record: None,
        };
        assert_eq!(change_key(&ended), session_key("abc"));
    }
}
