//! The in-memory snapshot the request path reads: every device, identity,
//! group and revocation, held in lock-free concurrent maps (papaya) and
//! replaced record by record after each durable commit. Lookups never block on
//! writers and allocate nothing.
//!
//! This is the whole snapshot, not a cache: a miss means "unknown", never
//! "go and read the store".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

use super::model::{Device, Group, Identity, Revocation, RevocationTarget};
use crate::posture::session::SessionRecord;

type Map<V> = papaya::HashMap<String, V, foldhash::fast::RandomState>;

/// A device id a principal claims (a verified token's device claim, a
/// browser session's device), with its memo of that device's record for
/// [`Snapshot::device_via`]. The id is fixed when the claim is made and the
/// memo is written only with the lookup of that id, so the memo never holds
/// another device's record. Reads as the id (`Deref<Target = str>`).
#[derive(Debug)]
pub struct DeviceClaim {
    id: String,
    memo: ArcSwapOption<Device>,
}

impl DeviceClaim {
    /// A claim of device `id`, its memo empty.
    pub fn new(id: String) -> Self {
        Self {
            id,
            memo: ArcSwapOption::empty(),
        }
    }

    /// The claimed id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The memo's record as last resolved, for an early read of its lines
    /// (it may be superseded: [`Snapshot::device_via`] decides).
    pub fn held(&self) -> arc_swap::Guard<Option<Arc<Device>>> {
        self.memo.load()
    }
}

impl std::ops::Deref for DeviceClaim {
    type Target = str;

    fn deref(&self) -> &str {
        &self.id
    }
}

/// Current state of every record, plus the snapshot version.
pub struct Snapshot {
    devices: Map<Arc<Device>>,
    identities: Map<Arc<Identity>>,
    /// alias (email, userName, `iss|sub`, `scim:<id>`) → subject.
    aliases: Map<String>,
    /// certificate thumbprint (hex) → device id.
    thumbprints: Map<String>,
    /// per-source external id (`jamf:jss:computer:42`, …) → device id.
    external_ids: Map<String>,
    /// Revocations by target.
    revoked_subjects: Map<Arc<Revocation>>,
    revoked_devices: Map<Arc<Revocation>>,
    revoked_sessions: Map<Arc<Revocation>>,
    groups: Map<Arc<Group>>,
    /// Browser sessions by id hash.
    sessions: Map<Arc<SessionRecord>>,
    version: AtomicU64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version())
            .field("devices", &self.devices.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self {
            devices: Map::default(),
            identities: Map::default(),
            aliases: Map::default(),
            thumbprints: Map::default(),
            external_ids: Map::default(),
            revoked_subjects: Map::default(),
            revoked_devices: Map::default(),
            revoked_sessions: Map::default(),
            groups: Map::default(),
            sessions: Map::default(),
            version: AtomicU64::new(0),
        }
    }

    fn revocations(&self, target: RevocationTarget) -> &Map<Arc<Revocation>> {
        match target {
            RevocationTarget::Subject => &self.revoked_subjects,
            RevocationTarget::Device => &self.revoked_devices,
            RevocationTarget::Session => &self.revoked_sessions,
        }
    }

    /// Version of the last applied event.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A device by id.
    pub fn device(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.pin().get(id).cloned()
    }

    /// The device a principal claims, through the claim's memo of its
    /// record: the memo's record while the snapshot still holds it, else a
    /// lookup of the claim's id that refreshes the memo. The same answer as
    /// [`Snapshot::device`] for that id, without the map's probe, entry and
    /// key bytes (cold under many distinct devices): the snapshot marks a
    /// record superseded when it replaces or drops it, before its version
    /// moves. A claim's memo only ever holds what a lookup of the claim's
    /// own id returned (the map keys a record by its id), so a hit compares
    /// no ids: the record's id bytes are one dependent cache miss fewer.
    pub fn device_via(&self, claim: &DeviceClaim) -> Option<Arc<Device>> {
        let held = claim.memo.load();
        if let Some(d) = held.as_ref()
            && !d.superseded.get()
        {
            return Some(d.clone());
        }
        let d = self.device(&claim.id);
        // An unknown device stays a lookup without a write on every request.
        if d.is_some() || held.is_some() {
            claim.memo.store(d.clone());
        }
        d
    }

    /// An identity by subject, or by one of its aliases.
    pub fn identity(&self, subject: &str) -> Option<Arc<Identity>> {
        let ids = self.identities.pin();
        if let Some(i) = ids.get(subject) {
            return Some(i.clone());
        }
        let aliases = self.aliases.pin();
        aliases
            .get(subject)
            .and_then(|s| ids.get(s.as_str()).cloned())
    }

    /// The subject an alias (or subject) names.
    pub fn resolve_subject(&self, name: &str) -> Option<String> {
        if self.identities.pin().contains_key(name) {
            return Some(name.to_owned());
        }
        self.aliases.pin().get(name).cloned()
    }

    /// The device a certificate thumbprint (lowercase hex) is registered to.
    pub fn device_by_thumbprint(&self, hex: &str) -> Option<String> {
        self.thumbprints.pin().get(hex).cloned()
    }

    /// The device that carries a per-source external id (`source:value`).
    pub fn device_by_external_id(&self, external_id: &str) -> Option<String> {
        self.external_ids.pin().get(external_id).cloned()
    }

    /// The revocation for a subject, device or session, if any.
    pub fn revocation(&self, target: RevocationTarget, key: &str) -> Option<Arc<Revocation>> {
        let m = self.revocations(target);
        if m.is_empty() {
            return None;
        }
        m.pin().get(key).cloned()
    }

    /// True when any session (or subject-on-device) revocation exists.
    pub fn has_session_revocations(&self) -> bool {
        !self.revoked_sessions.is_empty()
    }

    /// Number of devices and identities.
    pub fn counts(&self) -> (u64, u64) {
        (self.devices.len() as u64, self.identities.len() as u64)
    }

    /// Installs a device record (after it was made durable).
    pub fn put_device(&self, d: Arc<Device>) {
        let devices = self.devices.pin();
        let thumbs = self.thumbprints.pin();
        if let Some(old) = devices.get(d.id.as_str()) {
            for t in &old.cert_thumbprints {
                if !d.cert_thumbprints.contains(t) {
                    thumbs.remove(t.as_str());
                }
            }
            let ext = self.external_ids.pin();
            for x in &old.external_ids {
                if !d.external_ids.contains(x) {
                    ext.remove(x.as_str());
                }
            }
        }
        let ext = self.external_ids.pin();
        for x in &d.external_ids {
            ext.insert(x.clone(), d.id.clone());
        }
        for t in &d.cert_thumbprints {
            thumbs.insert(t.to_ascii_lowercase(), d.id.clone());
        }
        if let Some(old) = devices.insert(d.id.clone(), d) {
            old.superseded.set();
        }
    }

    /// Drops a device held by a bounded (lazy) cache, with its indexes; the
    /// device reads as unknown until fetched again.
    pub fn evict_device(&self, id: &str) {
        if let Some(old) = self.devices.pin().remove(id) {
            old.superseded.set();
            let thumbs = self.thumbprints.pin();
            for t in &old.cert_thumbprints {
                thumbs.remove(t.to_ascii_lowercase().as_str());
            }
            let ext = self.external_ids.pin();
            for x in &old.external_ids {
                ext.remove(x.as_str());
            }
        }
    }

    /// Installs an identity record (after it was made durable).
    pub fn put_identity(&self, i: Arc<Identity>) {
        let ids = self.identities.pin();
        let aliases = self.aliases.pin();
        if let Some(old) = ids.get(i.subject.as_str()) {
            for a in &old.aliases {
                if !i.aliases.contains(a) {
                    aliases.remove(a.as_str());
                }
            }
        }
        for a in &i.aliases {
            aliases.insert(a.clone(), i.subject.clone());
        }
        ids.insert(i.subject.clone(), i);
    }

    /// Installs a revocation (after it was made durable).
    pub fn put_revocation(&self, r: Arc<Revocation>) {
        self.revocations(r.target).pin().insert(r.key.clone(), r);
    }

    /// A SCIM group by id.
    pub fn group(&self, id: &str) -> Option<Arc<Group>> {
        self.groups.pin().get(id).cloned()
    }

    /// Every SCIM group (unordered).
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.pin().values().cloned().collect()
    }

    /// Every identity (unordered; for SCIM listing and reports).
    pub fn identities(&self) -> Vec<Arc<Identity>> {
        self.identities.pin().values().cloned().collect()
    }

    /// Every device (unordered; for reports, never the request path).
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.devices.pin().values().cloned().collect()
    }

    /// Installs (`Some`) or removes (`None`) a group (after it was made durable).
    pub fn put_group(&self, id: &str, g: Option<Arc<Group>>) {
        match g {
            Some(g) => {
                self.groups.pin().insert(id.to_owned(), g);
            }
            None => {
                self.groups.pin().remove(id);
            }
        }
    }

    /// A browser session by the hash of its id.
    pub fn session(&self, id_hash: &str) -> Option<Arc<SessionRecord>> {
        self.sessions.pin().get(id_hash).cloned()
    }

    /// Browser sessions matching `pred` (a scan: logout paths only, never
    /// the request path).
    pub fn sessions_where(&self, pred: impl Fn(&SessionRecord) -> bool) -> Vec<Arc<SessionRecord>> {
        self.sessions
            .pin()
            .values()
            .filter(|s| pred(s))
            .cloned()
            .collect()
    }

    /// Number of browser sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Installs (`Some`) or removes (`None`) a session (after it was made durable).
    pub fn put_session(&self, id_hash: &str, s: Option<Arc<SessionRecord>>) {
        match s {
            Some(s) => {
                self.sessions.pin().insert(id_hash.to_owned(), s);
            }
            None => {
                self.sessions.pin().remove(id_hash);
            }
        }
    }

    /// Pre-sizes the maps before a bulk load.
    pub fn reserve(&self, devices: u64, identities: u64) {
        self.devices.pin().reserve(devices as usize);
        self.identities.pin().reserve(identities as usize);
    }

    /// Advances the version (after a commit).
    pub fn set_version(&self, v: u64) {
        self.version.fetch_max(v, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    fn device(id: &str, version: u64) -> Arc<Device> {
        Arc::new(Device {
            id: id.to_owned(),
            version,
            ..Device::default()
        })
    }

    #[test]
    fn a_memo_is_used_only_while_the_snapshot_holds_its_record() {
        let snap = Snapshot::new();
        let claim = DeviceClaim::new("d1".into());
        // Unknown: nothing, and nothing is remembered.
        assert!(snap.device_via(&claim).is_none());
        assert!(claim.held().is_none());
        snap.put_device(device("d1", 1));
        let first = snap
            .device_via(&claim)
            .unwrap_or_else(|| panic!("d1 is known"));
        assert_eq!(first.version, 1);
        // Unchanged: the memo's own record.
        let again = snap
            .device_via(&claim)
            .unwrap_or_else(|| panic!("d1 is known"));
        assert!(Arc::ptr_eq(&first, &again));
        // Replaced: the old record is marked, the new one is found.
        snap.put_device(device("d1", 2));
        assert!(first.superseded.get());
        let newer = snap
            .device_via(&claim)
            .unwrap_or_else(|| panic!("d1 is known"));
        assert_eq!(newer.version, 2);
        // Another device's records never reach this claim: its memo holds
        // only lookups of its own id.
        snap.put_device(device("d2", 7));
        let other = DeviceClaim::new("d2".into());
        assert_eq!(snap.device_via(&other).map(|d| d.version), Some(7));
        assert_eq!(snap.device_via(&claim).map(|d| d.version), Some(2));
        assert_eq!(claim.held().as_ref().map(|d| d.id.as_str()), Some("d1"));
        assert_eq!(&*claim, "d1");
        // Dropped (a bounded cache's eviction): unknown again.
        let d2 = snap.device("d2");
        snap.evict_device("d2");
        assert!(d2.is_some_and(|d| d.superseded.get()));
        assert!(snap.device_via(&other).is_none());
        assert!(other.held().is_none());
        // So is d1, through its memo.
        snap.evict_device("d1");
        assert!(snap.device_via(&claim).is_none());
        // A clone is a new record: not marked, and equal to the original.
        let c = (*newer).clone();
        assert!(!c.superseded.get());
        assert_eq!(c, *newer);
    }
}
