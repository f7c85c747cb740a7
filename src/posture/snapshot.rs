//! The in-memory snapshot the request path reads: every device, identity and
//! revocation, held in concurrent maps (moka, unbounded) and replaced record
//! by record after each durable commit. Lookups take no global lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::sync::Cache;

use super::model::{Device, Group, Identity, Revocation, RevocationTarget};

/// Current state of every record, plus the snapshot version.
pub struct Snapshot {
    devices: Cache<String, Arc<Device>>,
    identities: Cache<String, Arc<Identity>>,
    /// alias (email, userName, `iss|sub`) → subject.
    aliases: Cache<String, String>,
    /// certificate thumbprint (hex) → device id.
    thumbprints: Cache<String, String>,
    /// `subject:…` / `device:…` / `session:…` → revocation.
    revocations: Cache<String, Arc<Revocation>>,
    groups: Cache<String, Arc<Group>>,
    version: AtomicU64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version())
            .field("devices", &self.devices.entry_count())
            .field("identities", &self.identities.entry_count())
            .finish()
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

fn revocation_key(target: RevocationTarget, key: &str) -> String {
    format!("{}:{key}", target.as_str())
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self {
            devices: Cache::builder().build(),
            identities: Cache::builder().build(),
            aliases: Cache::builder().build(),
            thumbprints: Cache::builder().build(),
            revocations: Cache::builder().build(),
            groups: Cache::builder().build(),
            version: AtomicU64::new(0),
        }
    }

    /// Version of the last applied event.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A device by id.
    pub fn device(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.get(id)
    }

    /// An identity by subject, or by one of its aliases.
    pub fn identity(&self, subject: &str) -> Option<Arc<Identity>> {
        self.identities.get(subject).or_else(|| {
            self.aliases
                .get(subject)
                .and_then(|s| self.identities.get(&s))
        })
    }

    /// The subject an alias (or subject) names.
    pub fn resolve_subject(&self, name: &str) -> Option<String> {
        if self.identities.contains_key(name) {
            return Some(name.to_owned());
        }
        self.aliases.get(name)
    }

    /// The device a certificate thumbprint (lowercase hex) is registered to.
    pub fn device_by_thumbprint(&self, hex: &str) -> Option<String> {
        self.thumbprints.get(hex)
    }

    /// The revocation for a subject, device or session, if any.
    pub fn revocation(&self, target: RevocationTarget, key: &str) -> Option<Arc<Revocation>> {
        self.revocations.get(&revocation_key(target, key))
    }

    /// Number of devices and identities (approximate while writes run).
    pub fn counts(&self) -> (u64, u64) {
        self.devices.run_pending_tasks();
        self.identities.run_pending_tasks();
        (self.devices.entry_count(), self.identities.entry_count())
    }

    /// Installs a device record (after it was made durable).
    pub fn put_device(&self, d: Arc<Device>) {
        if let Some(old) = self.devices.get(&d.id) {
            for t in &old.cert_thumbprints {
                if !d.cert_thumbprints.contains(t) {
                    self.thumbprints.invalidate(t);
                }
            }
        }
        for t in &d.cert_thumbprints {
            self.thumbprints
                .insert(t.to_ascii_lowercase(), d.id.clone());
        }
        self.devices.insert(d.id.clone(), d);
    }

    /// Installs an identity record (after it was made durable).
    pub fn put_identity(&self, i: Arc<Identity>) {
        if let Some(old) = self.identities.get(&i.subject) {
            for a in &old.aliases {
                if !i.aliases.contains(a) {
                    self.aliases.invalidate(a);
                }
            }
        }
        for a in &i.aliases {
            self.aliases.insert(a.clone(), i.subject.clone());
        }
        self.identities.insert(i.subject.clone(), i);
    }

    /// Installs a revocation (after it was made durable).
    pub fn put_revocation(&self, r: Arc<Revocation>) {
        self.revocations.insert(revocation_key(r.target, &r.key), r);
    }

    /// A SCIM group by id.
    pub fn group(&self, id: &str) -> Option<Arc<Group>> {
        self.groups.get(id)
    }

    /// Every SCIM group (unordered).
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.iter().map(|(_, g)| g).collect()
    }

    /// Every identity (unordered; for SCIM listing and reports).
    pub fn identities(&self) -> Vec<Arc<Identity>> {
        self.identities.iter().map(|(_, i)| i).collect()
    }

    /// Installs (`Some`) or removes (`None`) a group (after it was made durable).
    pub fn put_group(&self, id: &str, g: Option<Arc<Group>>) {
        match g {
            Some(g) => self.groups.insert(id.to_owned(), g),
            None => self.groups.invalidate(id),
        }
    }

    /// Advances the version (after a commit).
    pub fn set_version(&self, v: u64) {
        self.version.fetch_max(v, Ordering::AcqRel);
    }
}
