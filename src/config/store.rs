//! The `[store]` section: the embedded SQLite store or NATS JetStream.

use super::*;

/// Where the embedded store keeps its database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database path (WAL mode).
    #[serde(default = "d_store_path")]
    pub path: PathBuf,
    /// `full` (survives power loss) or `normal` (survives a process kill).
    #[serde(default)]
    pub sync: SyncMode,
    /// `sqlite` (embedded, the default) or `nats` (JetStream, shared by replicas).
    #[serde(default)]
    pub kind: StoreKind,
    /// `[store.nats]`: required when `kind = "nats"`.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: d_store_path(),
            sync: SyncMode::Full,
            kind: StoreKind::Sqlite,
            nats: None,
        }
    }
}

/// Which store holds the event log.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One process, SQLite only.
    #[default]
    Sqlite,
    /// NATS JetStream: every replica publishes to and consumes one stream; the
    /// local SQLite database keeps this replica's picture and stream position.
    Nats,
}

/// Default JetStream stream name.
pub const DEFAULT_NATS_STREAM: &str = "PORTCULLIS_EVENTS";
/// Default subject prefix (events go to `<prefix>.<feed>`).
pub const DEFAULT_NATS_SUBJECT_PREFIX: &str = "portcullis.events";
/// Default staleness after which `/readyz` says not ready.
pub const DEFAULT_NATS_MAX_STALENESS_S: u64 = 30;
/// Default wait for a JetStream acknowledgement before a feed gets 503.
pub const DEFAULT_NATS_ACK_TIMEOUT_MS: u64 = 5_000;
/// Default JetStream de-duplication window (`Nats-Msg-Id`).
pub const DEFAULT_NATS_DUPLICATE_WINDOW_S: u64 = 600;
/// Default capacity of the lazy (sidecar) record cache.
pub const DEFAULT_NATS_CACHE_CAPACITY: u64 = 100_000;

/// `[store.nats]`: the JetStream connection and names.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// This replica's name: unique per replica (metrics, logs, the accepting
    /// replica in events). Default: the host name (`HOSTNAME`, else
    /// `/etc/hostname`), which is the pod name in Kubernetes.
    #[serde(default = "d_nats_replica")]
    pub replica: String,
    /// Stream name.
    #[serde(default = "d_nats_stream")]
    pub stream: String,
    /// Subject prefix.
    #[serde(default = "d_nats_subject_prefix")]
    pub subject_prefix: String,
    /// Past this many seconds without NATS, `/readyz` reports not ready.
    #[serde(default = "d_nats_max_staleness_s")]
    pub max_staleness_s: u64,
    /// How long a feed waits for JetStream's acknowledgement before answering 503.
    #[serde(default = "d_nats_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// JetStream de-duplication window for event ids, in seconds.
    #[serde(default = "d_nats_duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// `full` (every replica holds every record) or `lazy` (sidecar: a bounded
    /// cache filled from the records bucket on demand).
    #[serde(default)]
    pub cache: NatsCacheMode,
    /// Entries of the lazy cache.
    #[serde(default = "d_nats_cache_capacity")]
    pub cache_capacity: u64,
}

/// How much of the picture a replica holds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NatsCacheMode {
    /// Every record, in memory (front proxies).
    #[default]
    Full,
    /// A bounded cache filled on demand (sidecars).
    Lazy,
}

pub(super) fn d_nats_replica() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".to_owned())
}

pub(super) fn d_nats_stream() -> String {
    DEFAULT_NATS_STREAM.to_owned()
}
pub(super) fn d_nats_subject_prefix() -> String {
    DEFAULT_NATS_SUBJECT_PREFIX.to_owned()
}
pub(super) fn d_nats_max_staleness_s() -> u64 {
    DEFAULT_NATS_MAX_STALENESS_S
}
pub(super) fn d_nats_ack_timeout_ms() -> u64 {
    DEFAULT_NATS_ACK_TIMEOUT_MS
}
pub(super) fn d_nats_duplicate_window_s() -> u64 {
    DEFAULT_NATS_DUPLICATE_WINDOW_S
}
pub(super) fn d_nats_cache_capacity() -> u64 {
    DEFAULT_NATS_CACHE_CAPACITY
}

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit.
    #[default]
    Full,
    /// fsync at checkpoints; a process kill loses nothing, a power cut may.
    Normal,
}

pub(super) fn d_store_path() -> PathBuf {
    PathBuf::from("portcullis.db")
}
