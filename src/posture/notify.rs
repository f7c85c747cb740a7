//! Change notices: after each committed batch, the writer tells whoever
//! listens which subjects, devices and sessions it changed, so state that
//! outlives a request (live connections) can be decided again at once.
//!
//! A notice is sent only after the records and the version are published, so
//! a listener that reads the snapshot on receipt sees the new state. A
//! listener that falls behind gets `Lagged` from the channel and must treat
//! it as "anything may have changed" (fail closed).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::model::RevocationTarget;

/// Notices buffered per listener before it lags.
pub const CHANGE_CHANNEL_CAPACITY: usize = 1024;

/// What one committed batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    /// Snapshot version after the batch.
    pub version: u64,
    /// Subjects whose identity record changed or that were revoked.
    pub subjects: HashSet<String>,
    /// Devices whose record changed or that were revoked.
    pub devices: HashSet<String>,
    /// Revoked sessions (`jti`, `sid`, or `subject|device`).
    pub sessions: HashSet<String>,
}

impl Changed {
    /// Folds another notice into this one (a listener draining a backlog).
    pub fn merge(&mut self, other: &Changed) {
        self.version = self.version.max(other.version);
        self.subjects.extend(other.subjects.iter().cloned());
        self.devices.extend(other.devices.iter().cloned());
        self.sessions.extend(other.sessions.iter().cloned());
    }

    /// True when the batch touched nothing a listener could match.
    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty() && self.devices.is_empty() && self.sessions.is_empty()
    }
}

/// The sending side, owned by the posture service.
#[derive(Debug)]
pub struct Notifier {
    tx: broadcast::Sender<Arc<Changed>>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CHANGE_CHANNEL_CAPACITY).0,
        }
    }
}

impl Notifier {
    /// A new listener; it sees every notice sent after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Changed>> {
        self.tx.subscribe()
    }

    /// Collects the keys of a batch about to be published; `None` (and no
    /// copying) when nobody listens.
    pub fn collect<'a>(
        &self,
        devices: impl Iterator<Item = &'a String>,
        subjects: impl Iterator<Item = &'a String>,
        revocations: impl Iterator<Item = &'a (RevocationTarget, String)>,
    ) -> Option<Changed> {
        if self.tx.receiver_count() == 0 {
            return None;
        }
        let mut c = Changed {
            devices: devices.cloned().collect(),
            subjects: subjects.cloned().collect(),
            ..Changed::default()
        };
        for (target, key) in revocations {
            let set = match target {
                RevocationTarget::Subject => &mut c.subjects,
                RevocationTarget::Device => &mut c.devices,
                RevocationTarget::Session => &mut c.sessions,
            };
            set.insert(key.clone());
        }
        Some(c)
    }

    /// Sends a collected notice (after the snapshot was published).
    pub fn publish(&self, mut c: Changed, version: u64) {
        if c.is_empty() {
            return;
        }
        c.version = version;
        // An error only means every listener is gone.
        let _ = self.tx.send(Arc::new(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_nothing_without_listeners_and_routes_revocations() {
        let n = Notifier::default();
        let d = ["d1".to_owned()];
        let s = ["alice".to_owned()];
        let r = [(RevocationTarget::Session, "jti-1".to_owned())];
        assert!(n.collect(d.iter(), s.iter(), r.iter()).is_none());
        let mut rx = n.subscribe();
        let c = n.collect(d.iter(), s.iter(), r.iter()).unwrap_or_default();
        assert!(c.devices.contains("d1") && c.subjects.contains("alice"));
        assert!(c.sessions.contains("jti-1"));
        n.publish(c, 7);
        let got = rx.try_recv().map(|c| c.version).unwrap_or(0);
        assert_eq!(got, 7);
    }
}
