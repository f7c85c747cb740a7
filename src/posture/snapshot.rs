//! The in-memory snapshot the request path reads: every device, identity and
//! revocation, held in concurrent maps (moka, unbounded) and replaced record
//! by record after each durable commit. Lookups take no global lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::sync::Cache;

use super::model::{Device, Identity, Revocation, RevocationTarget};

/// Current state of every record, plus the snapshot version.
pub struct Snapshot {
    devices: Cache<String, Arc<Device>>,
    identities: Cache<String, Arc<Identity>>,
    /// alias (email, userName, `iss|sub`) → subject.
    aliases: Cache<String, String>,
    /// certificate thumbprint (hex) → device id.
    thumbprints: Cache<String, String>,
    /// per-source external id (`jamf:jss:computer:42`, …) → device id.
    external_ids: Cache<String, String>,
    /// `subject:…` / `device:…` / `session:…` → revocation.
    revocations: Cache<String, Arc<Revocation>>,
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
            external_ids: Cache::builder().build(),
            revocations: Cache::builder().build(),
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

    /// The device that carries a per-source external id (`source:value`).
    pub fn device_by_external_id(&self, external_id: &str) -> Option<String> {
        self.external_ids.get(external_id)
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
            for x in &old.external_ids {
                if !d.external_ids.contains(x) {
                    self.external_ids.invalidate(x);
                }
            }
        }
        for x in &d.external_ids {
            self.external_ids.insert(x.clone(), d.id.clone());
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

    /// Advances the version (after a commit).
    pub fn set_version(&self, v: u64) {
        self.version.fetch_max(v, Ordering::AcqRel);
    }
}
