//! Configuration: strict TOML, validated before anything runs.
//!
//! Every table denies unknown fields, because in a security proxy a typo must
//! fail loudly. Defaults are named constants. Errors name the file and the key
//! path. Relative paths in the file are resolved against the file's directory.
//! This room never opens a socket; it only reads files.

pub mod parsed;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod assertion;
pub use assertion::*;

/// Default limit on the bytes of one request's header block.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 128 * 1024;
/// Default limit on the number of request headers.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default time a client has to send a complete header block (slowloris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default time a client has to complete the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default limit on open client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time to wait for an upstream's response headers.
pub const DEFAULT_UPSTREAM_TIMEOUT_MS: u64 = 30_000;
/// Default time to connect to an upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default idle keep-alive connections kept per upstream host: above the
/// concurrency one proxy sees (100 h2 streams, hundreds of h1 clients), so
/// the steady state opens no upstream connection; idle ones close after 90 s.
pub const DEFAULT_UPSTREAM_POOL_IDLE_PER_HOST: usize = 1024;
/// Default time graceful shutdown waits for in-flight requests.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;
/// Default clock-skew leeway for `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// Default interval at which live connections (upgrades, streamed
/// responses) are re-decided even when nothing about them changed.
pub const DEFAULT_LIVE_REDECIDE_INTERVAL_S: u64 = 60;
/// Hard ceiling on the configurable leeway.
pub const MAX_LEEWAY_S: u64 = 60;
/// Default scheduled JWKS refresh period.
pub const DEFAULT_JWKS_REFRESH_S: u64 = 300;
/// Default minimum time between refreshes triggered by an unknown `kid`.
pub const DEFAULT_JWKS_MIN_REFRESH_S: u64 = 30;
/// Default longest token accepted, in bytes.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Default number of verified tokens kept in the signature cache.
pub const DEFAULT_TOKEN_CACHE_CAPACITY: u64 = 100_000;
/// The claim that names the device, unless an issuer says otherwise.
pub const DEFAULT_DEVICE_CLAIM: &str = "device_id";
/// DPoP proof algorithms accepted unless `binding.dpop_algorithms` says otherwise.
pub const DEFAULT_DPOP_ALGORITHMS: &[&str] = &["ES256", "ES384", "EdDSA", "PS256", "RS256"];
/// Default age a DPoP proof may have (`iat` in the past), seconds.
pub const DEFAULT_DPOP_MAX_AGE_S: u64 = 60;
/// Ceiling on `binding.dpop_max_age_s`.
pub const MAX_DPOP_MAX_AGE_S: u64 = 300;
/// Default tolerance for a DPoP proof's `iat` in the future, seconds.
pub const DEFAULT_DPOP_FUTURE_SKEW_S: u64 = 5;
/// Ceiling on `binding.dpop_future_skew_s`.
pub const MAX_DPOP_FUTURE_SKEW_S: u64 = 60;
/// Default lifetime of a server-issued DPoP nonce, seconds.
pub const DEFAULT_DPOP_NONCE_LIFETIME_S: u64 = 300;
/// Default longest DPoP proof accepted, bytes.
pub const DEFAULT_DPOP_MAX_PROOF_BYTES: usize = 8 * 1024;
/// Default number of (jkt, jti) pairs the DPoP replay cache holds.
pub const DEFAULT_DPOP_REPLAY_CAPACITY: u64 = 500_000;
/// Default age after which device posture counts as unknown (the MDM went quiet).
pub const DEFAULT_POSTURE_MAX_AGE_S: u64 = 86_400;
/// Default `[policy] snapshot_max_age_s`: a replica out of sync with the
/// cluster for longer closes high and critical routes.
pub const DEFAULT_SNAPSHOT_MAX_AGE_S: u64 = 30;
/// Default oldest workload credential (token `iat`) accepted by the default policies.
pub const DEFAULT_WORKLOAD_MAX_CREDENTIAL_AGE_S: u64 = 3600;
/// Default longest a cached policy decision is reused. Record changes reach
/// the next request regardless (the cache key carries record versions); this
/// only bounds how old the clock-driven facts (ages, time of day) can be.
pub const DEFAULT_DECISION_CACHE_TTL_MS: u64 = 60_000;
/// Default number of cached policy decisions.
pub const DEFAULT_DECISION_CACHE_CAPACITY: u64 = 100_000;
/// Default interval at which the policy directory is checked for changes.
pub const DEFAULT_POLICY_WATCH_INTERVAL_MS: u64 = 2000;
/// Default share of `allow` decisions written to the audit log.
pub const DEFAULT_AUDIT_SAMPLE_ALLOW: f64 = 0.1;

/// Identity headers stripped from every client request by default: every
/// header the proxy itself sets, and the usual names apps trust from proxies.
pub const DEFAULT_STRIPPED_HEADERS: &[&str] = &[
    "x-portcullis-subject",
    "x-portcullis-issuer",
    "x-portcullis-device",
    "x-portcullis-route",
    "x-portcullis-binding",
    "x-portcullis-verified-device",
    "x-portcullis-workload",
    "x-portcullis-decision",
    "x-portcullis-device-compliance",
    "x-portcullis-device-lifecycle",
    "x-portcullis-snapshot",
    "x-portcullis-assertion",
    "x-portcullis-binding",
    "x-portcullis-request-id",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "forwarded",
    "x-real-ip",
    "x-remote-user",
    "remote-user",
    "x-user",
    "x-email",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-verify",
    "x-ssl-client-s-dn",
    "client-cert",
    "client-cert-chain",
];

/// A configuration error, naming the file and the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the schema.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Dotted key path, such as `routes[1].upstream`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The proxy listener.
    pub proxy: ProxyConfig,
    /// Server certificates and client-certificate trust.
    pub tls: TlsConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Token issuers.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Routes, matched by host and longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Upstream client settings.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// The embedded store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Posture and identity feeds.
    #[serde(default)]
    pub feeds: FeedsConfig,
    /// Token binding: device ids from certificates, DPoP.
    #[serde(default)]
    pub binding: BindingConfig,
    /// The signed identity assertion for apps; without it none is sent.
    #[serde(default)]
    pub assertion: Option<AssertionConfig>,
    /// Cedar policies; without this table no policy runs (baseline only).
    #[serde(default)]
    pub policy: Option<PolicyConfig>,
    /// Named networks, read by policies as `context.network.zone`.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Browser login (OIDC) and sessions, for `auth = "browser"` routes.
    #[serde(default)]
    pub browser: Option<BrowserConfig>,
    /// Socket options shared by every listener.
    #[serde(default)]
    pub listener: ListenerConfig,
    /// OpenTelemetry traces over OTLP/HTTP; off when absent.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Where this config was read from (not part of the file).
    #[serde(skip)]
    pub source: PathBuf,
}

/// Default `[tracing] sample_ratio`: every request (lower it under load).
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 1.0;
/// Default `[tracing] service_name`.
pub const DEFAULT_TRACE_SERVICE_NAME: &str = "portcullis";
/// Default `[tracing] export_interval_ms`.
pub const DEFAULT_TRACE_EXPORT_INTERVAL_MS: u64 = 5000;
/// Default `[tracing] export_timeout_ms`.
pub const DEFAULT_TRACE_EXPORT_TIMEOUT_MS: u64 = 10_000;

/// The `[tracing]` table: OpenTelemetry spans exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// Share of new traces sampled, 0.0 – 1.0 (a trusted parent's choice wins).
    #[serde(default = "d_trace_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the resource.
    #[serde(default = "d_trace_service_name")]
    pub service_name: String,
    /// Parent spans under an inbound `traceparent` (default: a new trace).
    #[serde(default)]
    pub trust_inbound: bool,
    /// How often finished spans are exported, in milliseconds.
    #[serde(default = "d_trace_export_interval_ms")]
    pub export_interval_ms: u64,
    /// Time allowed for one export, in milliseconds.
    #[serde(default = "d_trace_export_timeout_ms")]
    pub export_timeout_ms: u64,
}

fn d_trace_sample_ratio() -> f64 {
    DEFAULT_TRACE_SAMPLE_RATIO
}
fn d_trace_service_name() -> String {
    DEFAULT_TRACE_SERVICE_NAME.into()
}
fn d_trace_export_interval_ms() -> u64 {
    DEFAULT_TRACE_EXPORT_INTERVAL_MS
}
fn d_trace_export_timeout_ms() -> u64 {
    DEFAULT_TRACE_EXPORT_TIMEOUT_MS
}

/// The `[listener]` table: socket options of every listener (proxy TLS,
/// plain HTTP, admin).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Bind with `SO_REUSEPORT`, so a second process can bind the same
    /// addresses and take over while this one drains (zero-downtime upgrade).
    #[serde(default)]
    pub reuse_port: bool,
}

/// The proxy listener and its limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// TLS listener address.
    pub listen: SocketAddr,
    /// Optional plain-HTTP listener; only when set explicitly.
    #[serde(default)]
    pub plain_http_listen: Option<SocketAddr>,
    /// Limit on open client connections.
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Limit on the bytes of a request's header block.
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Limit on the number of request headers.
    #[serde(default = "d_max_headers")]
    pub max_headers: usize,
    /// Time to receive a complete header block, in milliseconds.
    #[serde(default = "d_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time to complete the TLS handshake, in milliseconds.
    #[serde(default = "d_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// Time graceful shutdown waits for in-flight requests, in milliseconds.
    #[serde(default = "d_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Extra identity headers to strip, besides the defaults.
    #[serde(default)]
    pub strip_headers: Vec<String>,
    /// Replace the default strip list instead of extending it.
    #[serde(default)]
    pub strip_headers_replace_defaults: bool,
    /// Forward the client's `Authorization` header to the upstream.
    #[serde(default = "d_true")]
    pub forward_authorization: bool,
    /// Seconds between re-decisions of every live connection (besides the
    /// re-decision on each state change of its subject or device).
    #[serde(default = "d_live_redecide_interval_s")]
    pub live_redecide_interval_s: u64,
}

/// Server certificates (chosen by SNI) and client-certificate trust.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificates; the first is the default when SNI matches none.
    pub certificates: Vec<CertificateConfig>,
    /// Device CA bundles (PEM) that client certificates other than SPIFFE
    /// SVIDs are verified against.
    #[serde(default)]
    pub client_ca: Vec<PathBuf>,
    /// SNI names whose handshakes request a client certificate (exact,
    /// `*.parent`, or `*` for every name). Every other name never asks.
    #[serde(default)]
    pub client_auth_hosts: Vec<String>,
    /// SPIFFE trust domains whose X.509-SVIDs identify workloads.
    #[serde(default)]
    pub spiffe: Vec<SpiffeTrustConfig>,
}

/// One SPIFFE trust domain and its X.509 bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeTrustConfig {
    /// The trust domain, such as `prod.example.org`.
    pub trust_domain: String,
    /// PEM bundle of the trust domain's X.509 authorities.
    pub bundle: PathBuf,
}

/// Token binding: how a device id is read from a client certificate, and
/// how DPoP proofs are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// How the device id is read from a client certificate:
    /// `san-uri:<template>`, `san-dns:<template>` (templates hold one `{id}`),
    /// `cn`, or `thumbprint`. None: certificates name no device.
    #[serde(default)]
    pub device_id_rule: Option<String>,
    /// For the `thumbprint` rule: certificate SHA-256 (base64url, the
    /// `x5t#S256` form) → device id. Feeds register more at run time.
    #[serde(default)]
    pub device_thumbprints: std::collections::BTreeMap<String, String>,
    /// Algorithms accepted for DPoP proofs (asymmetric only); empty turns DPoP off.
    #[serde(default = "d_dpop_algorithms")]
    pub dpop_algorithms: Vec<String>,
    /// How old a proof's `iat` may be, seconds.
    #[serde(default = "d_dpop_max_age_s")]
    pub dpop_max_age_s: u64,
    /// How far in the future a proof's `iat` may be, seconds.
    #[serde(default = "d_dpop_future_skew_s")]
    pub dpop_future_skew_s: u64,
    /// Require server-issued nonces in proofs (`DPoP-Nonce`).
    #[serde(default)]
    pub dpop_nonce: bool,
    /// How long a server nonce stays valid, seconds.
    #[serde(default = "d_dpop_nonce_lifetime_s")]
    pub dpop_nonce_lifetime_s: u64,
    /// Longest proof accepted, bytes.
    #[serde(default = "d_dpop_max_proof_bytes")]
    pub dpop_max_proof_bytes: usize,
    /// Entries in the replay cache; when full, new proofs are refused (fail closed).
    #[serde(default = "d_dpop_replay_capacity")]
    pub dpop_replay_capacity: u64,
}

impl Default for BindingConfig {
    fn default() -> Self {
        Self {
            device_id_rule: None,
            device_thumbprints: Default::default(),
            dpop_algorithms: d_dpop_algorithms(),
            dpop_max_age_s: DEFAULT_DPOP_MAX_AGE_S,
            dpop_future_skew_s: DEFAULT_DPOP_FUTURE_SKEW_S,
            dpop_nonce: false,
            dpop_nonce_lifetime_s: DEFAULT_DPOP_NONCE_LIFETIME_S,
            dpop_max_proof_bytes: DEFAULT_DPOP_MAX_PROOF_BYTES,
            dpop_replay_capacity: DEFAULT_DPOP_REPLAY_CAPACITY,
        }
    }
}

/// One server certificate chain and key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// SNI names this certificate answers for; empty means "take them from
    /// the certificate's DNS SANs".
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Plain-HTTP admin address; keep it on loopback or a private interface.
    pub listen: SocketAddr,
    /// Bearer secret required for `/metrics`, when set.
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// Bearer secret for the operator API (`/admin/v1/…`); the API is off without it.
    #[serde(default)]
    pub api_token: Option<String>,
}

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

fn d_nats_replica() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".to_owned())
}

fn d_nats_stream() -> String {
    DEFAULT_NATS_STREAM.to_owned()
}
fn d_nats_subject_prefix() -> String {
    DEFAULT_NATS_SUBJECT_PREFIX.to_owned()
}
fn d_nats_max_staleness_s() -> u64 {
    DEFAULT_NATS_MAX_STALENESS_S
}
fn d_nats_ack_timeout_ms() -> u64 {
    DEFAULT_NATS_ACK_TIMEOUT_MS
}
fn d_nats_duplicate_window_s() -> u64 {
    DEFAULT_NATS_DUPLICATE_WINDOW_S
}
fn d_nats_cache_capacity() -> u64 {
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

fn d_store_path() -> PathBuf {
    PathBuf::from("portcullis.db")
}

/// Default largest feed request body.
pub const DEFAULT_FEED_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Default seconds between full Intune sweeps.
pub const DEFAULT_INTUNE_FULL_SYNC_S: u64 = 24 * 3600;

/// Default seconds an event's origin time may be ahead of its acceptance.
pub const DEFAULT_MAX_FUTURE_SKEW_S: u64 = 300;

/// All feeds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedsConfig {
    /// Largest request body any feed endpoint accepts.
    #[serde(default = "d_feed_max_body")]
    pub max_body_bytes: usize,
    /// How far (seconds) an event's origin time may be ahead of its
    /// acceptance; events dated further ahead are refused.
    #[serde(default = "d_max_future_skew")]
    pub max_future_skew_s: u64,
    /// OpenID Shared Signals receiver.
    #[serde(default)]
    pub ssf: Option<SsfConfig>,
    /// SCIM 2.0 service provider.
    #[serde(default)]
    pub scim: Option<ScimConfig>,
    /// Jamf Pro webhooks.
    #[serde(default)]
    pub jamf: Option<JamfConfig>,
    /// Microsoft Intune poller.
    #[serde(default)]
    pub intune: Option<IntuneConfig>,
    /// Generic JSON device-event sources.
    #[serde(default)]
    pub mdm: Vec<GenericMdmConfig>,
}

impl Default for FeedsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_FEED_MAX_BODY_BYTES,
            max_future_skew_s: DEFAULT_MAX_FUTURE_SKEW_S,
            ssf: None,
            scim: None,
            jamf: None,
            intune: None,
            mdm: Vec::new(),
        }
    }
}

fn d_feed_max_body() -> usize {
    DEFAULT_FEED_MAX_BODY_BYTES
}

fn d_max_future_skew() -> u64 {
    DEFAULT_MAX_FUTURE_SKEW_S
}

/// The Shared Signals receiver: one transmitter.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SsfConfig {
    /// Bearer secret the transmitter sends on push (`Authorization: Bearer …`).
    #[serde(default)]
    pub push_token: Option<String>,
    /// The transmitter's exact `iss`.
    pub issuer: String,
    /// Audiences this receiver accepts in `aud`.
    pub audiences: Vec<String>,
    /// Algorithms accepted for SETs (asymmetric only).
    #[serde(default = "d_ssf_algs")]
    pub algorithms: Vec<String>,
    /// Transmitter JWKS URL.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Transmitter metadata URL (`…/.well-known/ssf-configuration`).
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Static JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Poll endpoint (RFC 8936), for transmitters that only offer polling.
    #[serde(default)]
    pub poll_url: Option<String>,
    /// Bearer token for the poll endpoint.
    #[serde(default)]
    pub poll_token: Option<String>,
    /// Time between polls, milliseconds.
    #[serde(default = "d_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

fn d_ssf_algs() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "PS256".into()]
}

fn d_poll_interval_ms() -> u64 {
    5_000
}

/// The SCIM service provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScimConfig {
    /// Bearer token the IdP sends.
    pub token: String,
    /// Which SCIM attribute is the token `sub`: `userName`, `externalId` or `id`.
    #[serde(default = "d_subject_attribute")]
    pub subject_attribute: String,
    /// Group display name → entitlements granted to its members.
    #[serde(default)]
    pub group_entitlements: std::collections::BTreeMap<String, Vec<String>>,
    /// The public absolute URL of the SCIM base (`…/scim/v2`), for
    /// `meta.location`; unset = the request's scheme and `Host`.
    #[serde(default)]
    pub base_url: Option<String>,
}

fn d_subject_attribute() -> String {
    "userName".into()
}

/// Jamf Pro webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JamfConfig {
    /// The exact `Authorization` header value Jamf is configured to send.
    pub authorization: String,
    /// Smart-group ids whose members are non-compliant.
    #[serde(default)]
    pub noncompliant_groups: Vec<u64>,
    /// Smart-group ids whose members are behind on patches.
    #[serde(default)]
    pub patch_groups: Vec<u64>,
    /// Smart-group ids whose members are compromised.
    #[serde(default)]
    pub compromised_groups: Vec<u64>,
    /// Smart-group ids whose members are in lost mode.
    #[serde(default)]
    pub lost_groups: Vec<u64>,
    /// Which device field is the canonical device id: `udid`, `serialNumber` or `jssID`.
    #[serde(default = "d_jamf_id")]
    pub device_id_field: String,
    /// The Jamf Pro API, read to confirm a webhook that raises trust.
    #[serde(default)]
    pub api: Option<JamfApiConfig>,
}

/// Default seconds one Jamf Pro API confirmation may take.
pub const DEFAULT_JAMF_API_TIMEOUT_S: u64 = 10;

/// The Jamf Pro API (OAuth client credentials), for read-back.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JamfApiConfig {
    /// Jamf Pro base URL, e.g. `https://example.jamfcloud.com`.
    pub url: String,
    /// API client id.
    pub client_id: String,
    /// API client secret.
    pub client_secret: String,
    /// Extra CA bundle for the Jamf Pro server.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Seconds one confirmation (token + device read) may take.
    #[serde(default = "d_jamf_api_timeout")]
    pub timeout_s: u64,
}

fn d_jamf_api_timeout() -> u64 {
    DEFAULT_JAMF_API_TIMEOUT_S
}

fn d_jamf_id() -> String {
    "udid".into()
}

/// Microsoft Intune through Graph `managedDevices`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntuneConfig {
    /// Graph base URL, e.g. `https://graph.microsoft.com/v1.0`.
    pub graph_url: String,
    /// OAuth token endpoint (client credentials).
    pub token_url: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: String,
    /// OAuth scope.
    #[serde(default = "d_graph_scope")]
    pub scope: String,
    /// Poll interval, seconds.
    #[serde(default = "d_intune_interval")]
    pub interval_s: u64,
    /// Which field is the canonical device id: `azureADDeviceId` or `id`.
    #[serde(default = "d_intune_id")]
    pub device_id_field: String,
    /// Extra CA bundle for Graph / token endpoints.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Seconds between full sweeps (no `lastSyncDateTime` filter), which
    /// catch state that changed without a device sync; 0 = only the first poll.
    #[serde(default = "d_intune_full_sync")]
    pub full_sync_interval_s: u64,
}

fn d_graph_scope() -> String {
    "https://graph.microsoft.com/.default".into()
}
fn d_intune_interval() -> u64 {
    300
}
fn d_intune_full_sync() -> u64 {
    DEFAULT_INTUNE_FULL_SYNC_S
}
fn d_intune_id() -> String {
    "azureADDeviceId".into()
}

/// A generic MDM source posting the documented JSON device event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericMdmConfig {
    /// Source name; the endpoint is `/mdm/v1/{name}/events`.
    pub name: String,
    /// Bearer secret the source sends.
    pub secret: String,
}

/// The `[policy]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files.
    pub dir: PathBuf,
    /// Posture older than this counts as unknown (`context.limits.posture_max_age_s`).
    #[serde(default = "d_posture_max_age_s")]
    pub posture_max_age_s: u64,
    /// Oldest workload credential (`context.limits.workload_max_credential_age_s`).
    #[serde(default = "d_workload_max_credential_age_s")]
    pub workload_max_credential_age_s: u64,
    /// Past this many seconds out of sync with the cluster, the default
    /// policies close high and critical routes (`context.limits.snapshot_max_age_s`).
    #[serde(default = "d_snapshot_max_age_s")]
    pub snapshot_max_age_s: u64,
    /// Longest a cached decision is reused, in milliseconds (0 disables the cache).
    #[serde(default = "d_decision_cache_ttl_ms")]
    pub decision_cache_ttl_ms: u64,
    /// Most cached decisions.
    #[serde(default = "d_decision_cache_capacity")]
    pub decision_cache_capacity: u64,
    /// How often the directories are checked for changes, in milliseconds (0: only on SIGHUP).
    #[serde(default = "d_policy_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// The decision log.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// A second set evaluated in shadow mode: divergences are logged, never enforced.
    #[serde(default)]
    pub shadow_dir: Option<PathBuf>,
    /// Routes the shadow set runs on (empty: every route).
    #[serde(default)]
    pub shadow_routes: Vec<String>,
}

/// The audit log settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File (appended to), or `-` for stdout.
    pub path: PathBuf,
    /// Share of `allow` decisions logged, 0.0 – 1.0; every other decision is logged.
    #[serde(default = "d_audit_sample_allow")]
    pub sample_allow: f64,
    /// Line format: the project's own JSON (default) or OCSF events.
    #[serde(default)]
    pub format: AuditFormat,
}

/// The audit line format (`[policy] audit.format`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// One JSON record per decision, replayable by `portcullis policy replay`.
    #[default]
    Json,
    /// One OCSF 1.8.0 HTTP Activity (4002) event per decision, for a SIEM.
    Ocsf,
}

/// The `[network]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Named CIDR sets; the first containing the client address is its zone.
    #[serde(default)]
    pub zones: Vec<ZoneConfig>,
}

/// One `[[network.zones]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Zone name (`context.network.zone`).
    pub name: String,
    /// CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
    pub cidrs: Vec<String>,
}

fn d_posture_max_age_s() -> u64 {
    DEFAULT_POSTURE_MAX_AGE_S
}
fn d_snapshot_max_age_s() -> u64 {
    DEFAULT_SNAPSHOT_MAX_AGE_S
}
fn d_workload_max_credential_age_s() -> u64 {
    DEFAULT_WORKLOAD_MAX_CREDENTIAL_AGE_S
}
fn d_decision_cache_ttl_ms() -> u64 {
    DEFAULT_DECISION_CACHE_TTL_MS
}
fn d_decision_cache_capacity() -> u64 {
    DEFAULT_DECISION_CACHE_CAPACITY
}
fn d_policy_watch_interval_ms() -> u64 {
    DEFAULT_POLICY_WATCH_INTERVAL_MS
}
fn d_audit_sample_allow() -> f64 {
    DEFAULT_AUDIT_SAMPLE_ALLOW
}

/// Log format and level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `portcullis=debug`.
    #[serde(default = "d_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: d_log_level(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A token issuer: its `iss`, audiences, algorithms and key source.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Name used by routes and metrics.
    pub name: String,
    /// The exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; a token must carry at least one.
    pub audiences: Vec<String>,
    /// Algorithm allow-list; the token's `alg` header never chooses alone.
    pub algorithms: Vec<String>,
    /// JWKS URL.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// OIDC discovery URL (`…/.well-known/openid-configuration`).
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Static JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Extra CA bundle (PEM) for fetching JWKS / discovery over https.
    #[serde(default)]
    pub fetch_ca: Option<PathBuf>,
    /// Scheduled refresh period, seconds.
    #[serde(default = "d_jwks_refresh_s")]
    pub refresh_interval_s: u64,
    /// Minimum seconds between refreshes triggered by an unknown `kid`.
    #[serde(default = "d_jwks_min_refresh_s")]
    pub min_refresh_interval_s: u64,
    /// Clock-skew leeway in seconds, at most 60.
    #[serde(default = "d_leeway_s")]
    pub leeway_s: u64,
    /// The claim naming the device.
    #[serde(default = "d_device_claim")]
    pub device_claim: String,
}

/// Browser sessions idle longer than this end (seconds).
pub const DEFAULT_SESSION_IDLE_S: u64 = 3600;
/// Browser sessions end this long after login at the latest (seconds).
pub const DEFAULT_SESSION_MAX_S: u64 = 8 * 3600;
/// A login started must come back to the callback within this (seconds).
pub const DEFAULT_LOGIN_TIMEOUT_S: u64 = 600;
/// Scopes asked for at login.
pub const DEFAULT_BROWSER_SCOPES: &[&str] = &["openid"];
/// Algorithm of the `private_key_jwt` client assertion.
pub const DEFAULT_CLIENT_KEY_ALG: &str = "ES256";

/// Browser login: the OIDC client portcullis is, and its sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserConfig {
    /// Name of the `[[issuers]]` entry that is the OpenID provider; its keys,
    /// algorithms and leeway verify ID tokens.
    pub issuer: String,
    /// OIDC client id (the ID token's `aud`).
    pub client_id: String,
    /// File holding the client secret (`client_secret_basic`).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// PEM private key (PKCS#8) for `private_key_jwt` client authentication.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Algorithm of the client assertion (`ES256`, `RS256`, `PS256`…).
    #[serde(default = "d_client_key_alg")]
    pub client_key_alg: String,
    /// `kid` put in the client assertion's header.
    #[serde(default)]
    pub client_key_id: Option<String>,
    /// OIDC discovery URL; default: the issuer's `discovery_url`, else
    /// `<iss>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Scopes asked for (must include `openid`).
    #[serde(default = "d_browser_scopes")]
    pub scopes: Vec<String>,
    /// ID-token claim naming the browser's device (e.g. Entra `deviceid`);
    /// unverified. Default: the issuer's `device_claim`.
    #[serde(default)]
    pub device_claim: Option<String>,
    /// A session idle this long ends (seconds).
    #[serde(default = "d_session_idle_s")]
    pub session_idle_s: u64,
    /// A session ends this long after login at the latest (seconds).
    #[serde(default = "d_session_max_s")]
    pub session_max_s: u64,
    /// A login must complete within this (seconds).
    #[serde(default = "d_login_timeout_s")]
    pub login_timeout_s: u64,
    /// File with at least 32 random bytes keying the pre-login cookie's
    /// HMAC, shared by replicas; default: a fresh key per process.
    #[serde(default)]
    pub cookie_key_file: Option<PathBuf>,
}

/// One route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs.
    pub name: String,
    /// Host to match (`*` matches any host).
    #[serde(default = "d_any_host")]
    pub host: String,
    /// Path prefix to match; the longest matching prefix wins.
    #[serde(default = "d_root_prefix")]
    pub path_prefix: String,
    /// Upstream base URL, http or https.
    pub upstream: String,
    /// How sensitive the app is.
    #[serde(default)]
    pub sensitivity: Sensitivity,
    /// How requests authenticate.
    pub auth: AuthMode,
    /// Issuers accepted on this route (names); empty means all.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Whether tokens must be sender-constrained (bearer routes only).
    #[serde(default)]
    pub binding: BindingMode,
    /// Workloads accepted on an `auth = "mtls"` route: SPIFFE ids, exact or
    /// ending in `/*` (any id under that path).
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    /// Largest request body accepted, in bytes.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Time to wait for the upstream's response headers, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The `aud` of the identity assertion sent here (default: the route's name).
    #[serde(default)]
    pub assertion_audience: Option<String>,
    /// Plain identity headers for apps that expect them; always stripped from clients.
    #[serde(default)]
    pub identity_headers: IdentityHeadersConfig,
    /// Workloads allowed here (SPIFFE ids or client ids), read by policies
    /// as `context.workload.allowed`.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Pass header names containing `_` to this app (dropped by default;
    /// look-alikes of identity headers are dropped regardless).
    #[serde(default)]
    pub allow_underscore_headers: bool,
}

/// Route sensitivity, which policies read.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    /// Low.
    Low,
    /// Medium (the default).
    #[default]
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

impl Sensitivity {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// How a route authenticates requests.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A bearer JWT is required.
    Bearer,
    /// No authentication; identity headers are still stripped.
    Public,
    /// A SPIFFE workload certificate (X.509-SVID) is required; no token.
    Mtls,
    /// A person in a browser: an OIDC login, then a session cookie.
    Browser,
}

/// Whether a bearer route requires a sender-constrained token.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BindingMode {
    /// Bound tokens are checked; unbound tokens pass.
    #[default]
    Optional,
    /// Only tokens bound by DPoP (`cnf.jkt`) or a certificate (`cnf.x5t#S256`) pass.
    Required,
}

/// Upstream client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Default time to wait for response headers, in milliseconds.
    #[serde(default = "d_upstream_timeout_ms")]
    pub timeout_ms: u64,
    /// Time to connect, in milliseconds.
    #[serde(default = "d_upstream_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per host.
    #[serde(default = "d_pool_idle_per_host")]
    pub pool_idle_per_host: usize,
    /// Extra CA bundle (PEM) for https upstreams, besides the web PKI roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            timeout_ms: DEFAULT_UPSTREAM_TIMEOUT_MS,
            connect_timeout_ms: DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
            pool_idle_per_host: DEFAULT_UPSTREAM_POOL_IDLE_PER_HOST,
            ca: None,
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn d_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn d_header_read_timeout_ms() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_MS
}
fn d_tls_handshake_timeout_ms() -> u64 {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS
}
fn d_drain_timeout_ms() -> u64 {
    DEFAULT_DRAIN_TIMEOUT_MS
}
fn d_live_redecide_interval_s() -> u64 {
    DEFAULT_LIVE_REDECIDE_INTERVAL_S
}
fn d_log_level() -> String {
    "info".to_owned()
}
fn d_jwks_refresh_s() -> u64 {
    DEFAULT_JWKS_REFRESH_S
}
fn d_jwks_min_refresh_s() -> u64 {
    DEFAULT_JWKS_MIN_REFRESH_S
}
fn d_session_idle_s() -> u64 {
    DEFAULT_SESSION_IDLE_S
}
fn d_session_max_s() -> u64 {
    DEFAULT_SESSION_MAX_S
}
fn d_login_timeout_s() -> u64 {
    DEFAULT_LOGIN_TIMEOUT_S
}
fn d_browser_scopes() -> Vec<String> {
    DEFAULT_BROWSER_SCOPES
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}
fn d_client_key_alg() -> String {
    DEFAULT_CLIENT_KEY_ALG.to_owned()
}
fn d_leeway_s() -> u64 {
    DEFAULT_LEEWAY_S
}
fn d_device_claim() -> String {
    DEFAULT_DEVICE_CLAIM.to_owned()
}
fn d_any_host() -> String {
    "*".to_owned()
}
fn d_root_prefix() -> String {
    "/".to_owned()
}
fn d_dpop_algorithms() -> Vec<String> {
    DEFAULT_DPOP_ALGORITHMS
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
}
fn d_dpop_max_age_s() -> u64 {
    DEFAULT_DPOP_MAX_AGE_S
}
fn d_dpop_future_skew_s() -> u64 {
    DEFAULT_DPOP_FUTURE_SKEW_S
}
fn d_dpop_nonce_lifetime_s() -> u64 {
    DEFAULT_DPOP_NONCE_LIFETIME_S
}
fn d_dpop_max_proof_bytes() -> usize {
    DEFAULT_DPOP_MAX_PROOF_BYTES
}
fn d_dpop_replay_capacity() -> u64 {
    DEFAULT_DPOP_REPLAY_CAPACITY
}
fn d_upstream_timeout_ms() -> u64 {
    DEFAULT_UPSTREAM_TIMEOUT_MS
}
fn d_upstream_connect_timeout_ms() -> u64 {
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS
}
fn d_pool_idle_per_host() -> usize {
    DEFAULT_UPSTREAM_POOL_IDLE_PER_HOST
}

/// Algorithms an issuer may list. `none` and the HMAC family are refused:
/// access tokens from a third-party issuer are verified with public keys only.
pub const SUPPORTED_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

impl Config {
    /// Reads, parses and validates a config file. Paths inside it become
    /// absolute, resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text that came from `path`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        cfg.source = path.to_owned();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.resolve_paths(&base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for c in &mut self.tls.certificates {
            abs(&mut c.cert);
            abs(&mut c.key);
        }
        self.tls.client_ca.iter_mut().for_each(abs);
        for s in &mut self.tls.spiffe {
            abs(&mut s.bundle);
        }
        for i in &mut self.issuers {
            if let Some(p) = i.jwks_file.as_mut() {
                abs(p);
            }
            if let Some(p) = i.fetch_ca.as_mut() {
                abs(p);
            }
        }
        if let Some(p) = self.upstream.ca.as_mut() {
            abs(p);
        }
        abs(&mut self.store.path);
        if let Some(b) = self.browser.as_mut() {
            for p in [
                &mut b.client_secret_file,
                &mut b.client_key_file,
                &mut b.cookie_key_file,
            ]
            .into_iter()
            .flatten()
            {
                abs(p);
            }
        }
        self.resolve_assertion_paths(base);
        if let Some(p) = self.feeds.ssf.as_mut().and_then(|s| s.jwks_file.as_mut()) {
            abs(p);
        }
        if let Some(p) = self.feeds.intune.as_mut().and_then(|s| s.ca.as_mut()) {
            abs(p);
        }
        if let Some(p) = self
            .feeds
            .jamf
            .as_mut()
            .and_then(|j| j.api.as_mut())
            .and_then(|a| a.ca.as_mut())
        {
            abs(p);
        }
        if let Some(p) = self.policy.as_mut() {
            abs(&mut p.dir);
            if let Some(d) = p.shadow_dir.as_mut() {
                abs(d);
            }
            if let Some(a) = p.audit.as_mut()
                && a.path.as_os_str() != "-"
            {
                abs(&mut a.path);
            }
        }
    }

    fn validate_tracing(&self) -> Result<(), ConfigError> {
        let Some(t) = &self.tracing else {
            return Ok(());
        };
        let uri: Option<http::Uri> = t.otlp_endpoint.parse().ok();
        if !uri
            .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
        {
            return Err(self.invalid(
                "tracing.otlp_endpoint",
                format!("`{}` is not an http(s) URL", t.otlp_endpoint),
            ));
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(self.invalid("tracing.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if t.export_interval_ms == 0 || t.export_timeout_ms == 0 {
            return Err(self.invalid(
                "tracing.export_interval_ms",
                "export_interval_ms and export_timeout_ms must be at least 1",
            ));
        }
        Ok(())
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn validate_browser(&self) -> Result<(), ConfigError> {
        let uses = self.routes.iter().position(|r| r.auth == AuthMode::Browser);
        let Some(b) = &self.browser else {
            return match uses {
                Some(i) => Err(self.invalid(
                    format!("routes[{i}].auth"),
                    "browser routes need a [browser] table",
                )),
                None => Ok(()),
            };
        };
        if !self.issuers.iter().any(|x| x.name == b.issuer) {
            return Err(self.invalid("browser.issuer", format!("no issuer named `{}`", b.issuer)));
        }
        if b.client_id.is_empty() {
            return Err(self.invalid("browser.client_id", "must not be empty"));
        }
        match (&b.client_secret_file, &b.client_key_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    "browser.client_key_file",
                    "set either client_secret_file or client_key_file, not both",
                ));
            }
            (None, None) => {
                return Err(self.invalid(
                    "browser.client_secret_file",
                    "set client_secret_file (client_secret_basic) or client_key_file (private_key_jwt)",
                ));
            }
            _ => {}
        }
        if !SUPPORTED_ALGORITHMS.contains(&b.client_key_alg.as_str()) || b.client_key_alg == "EdDSA"
        {
            return Err(self.invalid(
                "browser.client_key_alg",
                format!("`{}` is not an accepted algorithm", b.client_key_alg),
            ));
        }
        if let Some(u) = &b.discovery_url {
            check_http_url(u).map_err(|m| self.invalid("browser.discovery_url", m))?;
        }
        if !b.scopes.iter().any(|s| s == "openid") {
            return Err(self.invalid("browser.scopes", "must include `openid`"));
        }
        if b.scopes
            .iter()
            .any(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(self.invalid("browser.scopes", "scopes are non-empty words"));
        }
        if b.device_claim.as_deref() == Some("") {
            return Err(self.invalid("browser.device_claim", "must not be empty"));
        }
        for (k, v) in [
            ("session_idle_s", b.session_idle_s),
            ("session_max_s", b.session_max_s),
            ("login_timeout_s", b.login_timeout_s),
        ] {
            if v == 0 {
                return Err(self.invalid(format!("browser.{k}"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Checks everything a parse cannot: references, ranges, URL shapes.
    /// Files (certificates, keys, JWKS) are checked where they are loaded.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.certificates.is_empty() {
            return Err(self.invalid("tls.certificates", "at least one certificate is required"));
        }
        if self.proxy.max_connections == 0 {
            return Err(self.invalid("proxy.max_connections", "must be at least 1"));
        }
        self.validate_tracing()?;
        if self.proxy.max_header_bytes < 8192 {
            return Err(self.invalid("proxy.max_header_bytes", "must be at least 8192"));
        }
        if self.proxy.max_headers == 0 {
            return Err(self.invalid("proxy.max_headers", "must be at least 1"));
        }
        if self.proxy.live_redecide_interval_s == 0 {
            return Err(self.invalid("proxy.live_redecide_interval_s", "must be at least 1"));
        }
        for (i, h) in self.proxy.strip_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(self.invalid(
                    format!("proxy.strip_headers[{i}]"),
                    format!("`{h}` is not a header name"),
                ));
            }
        }
        if (self.admin.listen == self.proxy.listen
            || Some(self.admin.listen) == self.proxy.plain_http_listen)
            && self.admin.listen.port() != 0
        {
            return Err(self.invalid("admin.listen", "must differ from the proxy listeners"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| self.invalid("log.level", format!("`{}`: {e}", self.log.level)))?;

        self.validate_client_auth()?;
        self.validate_binding()?;
        self.validate_store()?;

        let mut names = HashSet::new();
        for (i, iss) in self.issuers.iter().enumerate() {
            let key = |k: &str| format!("issuers[{i}].{k}");
            if !names.insert(iss.name.as_str()) {
                return Err(self.invalid(key("name"), format!("duplicate issuer `{}`", iss.name)));
            }
            if iss.issuer.is_empty() {
                return Err(self.invalid(key("issuer"), "must not be empty"));
            }
            if iss.audiences.is_empty() || iss.audiences.iter().any(String::is_empty) {
                return Err(self.invalid(key("audiences"), "at least one non-empty audience"));
            }
            if iss.algorithms.is_empty() {
                return Err(self.invalid(key("algorithms"), "at least one algorithm"));
            }
            self.check_key_source(
                &format!("issuers[{i}]"),
                &iss.algorithms,
                [&iss.jwks_url, &iss.discovery_url],
                iss.jwks_file.is_some(),
            )?;
            if iss.leeway_s > MAX_LEEWAY_S {
                return Err(self.invalid(
                    key("leeway_s"),
                    format!("{} exceeds the ceiling of {MAX_LEEWAY_S} s", iss.leeway_s),
                ));
            }
            if iss.refresh_interval_s == 0 {
                return Err(self.invalid(key("refresh_interval_s"), "must be at least 1"));
            }
            if iss.device_claim.is_empty() {
                return Err(self.invalid(key("device_claim"), "must not be empty"));
            }
        }

        self.validate_feeds()?;
        self.validate_browser()?;
        self.validate_assertion()?;

        let mut route_names = HashSet::new();
        let mut matchers = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if !route_names.insert(r.name.as_str()) {
                return Err(self.invalid(key("name"), format!("duplicate route `{}`", r.name)));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(self.invalid(key("path_prefix"), "must start with `/`"));
            }
            if r.host.is_empty() {
                return Err(self.invalid(key("host"), "must not be empty (use `*` for any)"));
            }
            if !matchers.insert((r.host.to_ascii_lowercase(), r.path_prefix.clone())) {
                return Err(self.invalid(
                    key("path_prefix"),
                    format!(
                        "another route already matches `{}{}`",
                        r.host, r.path_prefix
                    ),
                ));
            }
            check_http_url(&r.upstream).map_err(|m| self.invalid(key("upstream"), m))?;
            for (j, name) in r.issuers.iter().enumerate() {
                if !self.issuers.iter().any(|x| &x.name == name) {
                    return Err(self.invalid(
                        format!("routes[{i}].issuers[{j}]"),
                        format!("no issuer named `{name}`"),
                    ));
                }
            }
            if r.auth == AuthMode::Bearer && self.issuers.is_empty() {
                return Err(self.invalid(key("auth"), "bearer routes need at least one issuer"));
            }
            if r.timeout_ms == Some(0) {
                return Err(self.invalid(key("timeout_ms"), "must be at least 1"));
            }
            self.validate_route_binding(i, r)?;
            for (j, w) in r.workloads.iter().enumerate() {
                if w.is_empty() {
                    return Err(
                        self.invalid(format!("routes[{i}].workloads[{j}]"), "must not be empty")
                    );
                }
            }
        }
        self.validate_policy()
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        match (self.store.kind, &self.store.nats) {
            (StoreKind::Nats, None) => {
                Err(self.invalid("store.nats", "is required when store.kind = \"nats\""))
            }
            (StoreKind::Sqlite, Some(_)) => {
                Err(self.invalid("store.nats", "is only read when store.kind = \"nats\""))
            }
            (StoreKind::Nats, Some(n)) => {
                let token = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                };
                if n.url.trim().is_empty() {
                    return Err(self.invalid("store.nats.url", "must not be empty"));
                }
                if !token(&n.replica) {
                    return Err(self.invalid(
                        "store.nats.replica",
                        format!("`{}`: use letters, digits, `-` and `_`", n.replica),
                    ));
                }
                if !token(&n.stream) {
                    return Err(self.invalid(
                        "store.nats.stream",
                        format!("`{}`: use letters, digits, `-` and `_`", n.stream),
                    ));
                }
                if n.subject_prefix.is_empty() || n.subject_prefix.split('.').any(|t| !token(t)) {
                    return Err(self.invalid(
                        "store.nats.subject_prefix",
                        format!("`{}`: dot-separated tokens, no wildcards", n.subject_prefix),
                    ));
                }
                if n.ack_timeout_ms == 0 || n.duplicate_window_s == 0 || n.cache_capacity == 0 {
                    return Err(self.invalid(
                        "store.nats",
                        "ack_timeout_ms, duplicate_window_s and cache_capacity must be at least 1",
                    ));
                }
                Ok(())
            }
            (StoreKind::Sqlite, None) => Ok(()),
        }
    }

    fn validate_policy(&self) -> Result<(), ConfigError> {
        let mut zone_names = HashSet::new();
        for (i, z) in self.network.zones.iter().enumerate() {
            if z.name.is_empty() || z.name == parsed::OTHER_ZONE {
                return Err(self.invalid(
                    format!("network.zones[{i}].name"),
                    format!("must be non-empty and not `{}`", parsed::OTHER_ZONE),
                ));
            }
            if !zone_names.insert(z.name.as_str()) {
                return Err(self.invalid(
                    format!("network.zones[{i}].name"),
                    format!("duplicate zone `{}`", z.name),
                ));
            }
            if z.cidrs.is_empty() {
                return Err(self.invalid(
                    format!("network.zones[{i}].cidrs"),
                    "at least one CIDR block",
                ));
            }
            for (j, c) in z.cidrs.iter().enumerate() {
                if parsed::parse_cidr(c).is_none() {
                    return Err(self.invalid(
                        format!("network.zones[{i}].cidrs[{j}]"),
                        format!("`{c}` is not an address or CIDR block"),
                    ));
                }
            }
        }
        let Some(p) = &self.policy else {
            return Ok(());
        };
        if p.posture_max_age_s == 0 {
            return Err(self.invalid("policy.posture_max_age_s", "must be at least 1"));
        }
        if p.workload_max_credential_age_s == 0 {
            return Err(self.invalid("policy.workload_max_credential_age_s", "must be at least 1"));
        }
        if p.decision_cache_ttl_ms > 60_000 {
            return Err(self.invalid(
                "policy.decision_cache_ttl_ms",
                "at most 60000: cached decisions must follow the clock",
            ));
        }
        if let Some(a) = &p.audit {
            if !(0.0..=1.0).contains(&a.sample_allow) {
                return Err(self.invalid(
                    "policy.audit.sample_allow",
                    format!("{} is not between 0.0 and 1.0", a.sample_allow),
                ));
            }
            if a.path.as_os_str().is_empty() {
                return Err(self.invalid("policy.audit.path", "a file path, or `-` for stdout"));
            }
        }
        for (i, r) in p.shadow_routes.iter().enumerate() {
            if !self.routes.iter().any(|x| &x.name == r) {
                return Err(self.invalid(
                    format!("policy.shadow_routes[{i}]"),
                    format!("no route named `{r}`"),
                ));
            }
        }
        if !p.shadow_routes.is_empty() && p.shadow_dir.is_none() {
            return Err(self.invalid("policy.shadow_routes", "needs policy.shadow_dir"));
        }
        Ok(())
    }

    /// `[tls]` client certificates: which names ask, and what they trust.
    fn validate_client_auth(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        let has_trust = !tls.client_ca.is_empty() || !tls.spiffe.is_empty();
        if has_trust && tls.client_auth_hosts.is_empty() {
            return Err(self.invalid(
                "tls.client_auth_hosts",
                "client certificates are requested only on the names listed here; \
                 list them (`[\"*\"]` for every name)",
            ));
        }
        if !has_trust && !tls.client_auth_hosts.is_empty() {
            return Err(self.invalid(
                "tls.client_auth_hosts",
                "set tls.client_ca or tls.spiffe: there is nothing to verify client certificates against",
            ));
        }
        for (i, h) in tls.client_auth_hosts.iter().enumerate() {
            parsed::HostSet::check_pattern(h)
                .map_err(|m| self.invalid(format!("tls.client_auth_hosts[{i}]"), m))?;
        }
        let mut domains = HashSet::new();
        for (i, s) in tls.spiffe.iter().enumerate() {
            parsed::SpiffeId::check_trust_domain(&s.trust_domain)
                .map_err(|m| self.invalid(format!("tls.spiffe[{i}].trust_domain"), m))?;
            if !domains.insert(s.trust_domain.as_str()) {
                return Err(self.invalid(
                    format!("tls.spiffe[{i}].trust_domain"),
                    format!("duplicate trust domain `{}`", s.trust_domain),
                ));
            }
        }
        Ok(())
    }

    /// `[binding]`: the device rule, the thumbprint map, DPoP limits.
    fn validate_binding(&self) -> Result<(), ConfigError> {
        let b = &self.binding;
        if let Some(rule) = &b.device_id_rule {
            parsed::DeviceIdRule::parse(rule)
                .map_err(|m| self.invalid("binding.device_id_rule", m))?;
        }
        for (k, v) in &b.device_thumbprints {
            let key = format!("binding.device_thumbprints.{k}");
            if parsed::decode_x5t(k).is_none() {
                return Err(self.invalid(
                    key,
                    "must be a base64url SHA-256 certificate thumbprint (43 characters)",
                ));
            }
            if v.is_empty() || v.len() > parsed::MAX_DEVICE_ID_LEN {
                return Err(self.invalid(key, "device id must be 1 to 256 bytes"));
            }
        }
        for (j, a) in b.dpop_algorithms.iter().enumerate() {
            if !SUPPORTED_ALGORITHMS.contains(&a.as_str()) {
                return Err(self.invalid(
                    format!("binding.dpop_algorithms[{j}]"),
                    format!(
                        "`{a}` is not accepted; use asymmetric algorithms from {}",
                        SUPPORTED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        if b.dpop_max_age_s == 0 || b.dpop_max_age_s > MAX_DPOP_MAX_AGE_S {
            return Err(self.invalid(
                "binding.dpop_max_age_s",
                format!("must be 1 to {MAX_DPOP_MAX_AGE_S} s"),
            ));
        }
        if b.dpop_future_skew_s > MAX_DPOP_FUTURE_SKEW_S {
            return Err(self.invalid(
                "binding.dpop_future_skew_s",
                format!("must be at most {MAX_DPOP_FUTURE_SKEW_S} s"),
            ));
        }
        if b.dpop_nonce_lifetime_s == 0 || b.dpop_nonce_lifetime_s > 3600 {
            return Err(self.invalid("binding.dpop_nonce_lifetime_s", "must be 1 to 3600 s"));
        }
        if !(512..=65536).contains(&b.dpop_max_proof_bytes) {
            return Err(self.invalid("binding.dpop_max_proof_bytes", "must be 512 to 65536 bytes"));
        }
        if b.dpop_replay_capacity < 1000 {
            return Err(self.invalid("binding.dpop_replay_capacity", "must be at least 1000"));
        }
        Ok(())
    }

    /// A route's `binding` and `spiffe_ids` fit its `auth` mode.
    fn validate_route_binding(&self, i: usize, r: &RouteConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("routes[{i}].{k}");
        if r.binding == BindingMode::Required && r.auth != AuthMode::Bearer {
            return Err(self.invalid(key("binding"), "applies to `auth = \"bearer\"` routes only"));
        }
        if r.auth != AuthMode::Mtls {
            if !r.spiffe_ids.is_empty() {
                return Err(self.invalid(
                    key("spiffe_ids"),
                    "applies to `auth = \"mtls\"` routes only",
                ));
            }
            return Ok(());
        }
        if r.spiffe_ids.is_empty() {
            return Err(self.invalid(
                key("spiffe_ids"),
                "an `auth = \"mtls\"` route needs at least one SPIFFE id",
            ));
        }
        for (j, id) in r.spiffe_ids.iter().enumerate() {
            let k = format!("routes[{i}].spiffe_ids[{j}]");
            let exact = id.strip_suffix("/*").unwrap_or(id);
            let parsed = parsed::SpiffeId::parse(exact)
                .map_err(|m| self.invalid(k.clone(), format!("`{id}`: {m}")))?;
            if !self
                .tls
                .spiffe
                .iter()
                .any(|s| s.trust_domain == parsed.trust_domain)
            {
                return Err(self.invalid(
                    k,
                    format!(
                        "trust domain `{}` is not in tls.spiffe",
                        parsed.trust_domain
                    ),
                ));
            }
        }
        let hosts = parsed::HostSet::new(&self.tls.client_auth_hosts);
        if r.host != "*" && !hosts.contains(&r.host) {
            return Err(self.invalid(
                key("host"),
                format!(
                    "`{}` is not in tls.client_auth_hosts, so no client certificate would be requested",
                    r.host
                ),
            ));
        }
        Ok(())
    }

    /// Where a signer's keys come from (token issuers and the SSF
    /// transmitter alike): accepted algorithms, and exactly one of
    /// `jwks_url` / `discovery_url` / `jwks_file`, URLs well-formed.
    fn check_key_source(
        &self,
        prefix: &str,
        algorithms: &[String],
        [jwks_url, discovery_url]: [&Option<String>; 2],
        has_file: bool,
    ) -> Result<(), ConfigError> {
        for (j, a) in algorithms.iter().enumerate() {
            if !SUPPORTED_ALGORITHMS.contains(&a.as_str()) {
                return Err(self.invalid(
                    format!("{prefix}.algorithms[{j}]"),
                    format!(
                        "`{a}` is not accepted; use one of {}",
                        SUPPORTED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        if [jwks_url.is_some(), discovery_url.is_some(), has_file]
            .iter()
            .filter(|b| **b)
            .count()
            != 1
        {
            return Err(self.invalid(
                format!("{prefix}.jwks_url"),
                "set exactly one of jwks_url, discovery_url, jwks_file",
            ));
        }
        for (k, url) in [("jwks_url", jwks_url), ("discovery_url", discovery_url)] {
            if let Some(u) = url {
                check_http_url(u).map_err(|m| self.invalid(format!("{prefix}.{k}"), m))?;
            }
        }
        Ok(())
    }

    fn validate_feeds(&self) -> Result<(), ConfigError> {
        let secret = |key: &str, v: &str| -> Result<(), ConfigError> {
            if v.len() < 16 {
                return Err(self.invalid(key, "secrets must be at least 16 characters"));
            }
            Ok(())
        };
        if let Some(t) = &self.admin.api_token {
            secret("admin.api_token", t)?;
        }
        if let Some(t) = &self.admin.metrics_token {
            secret("admin.metrics_token", t)?;
        }
        if self.feeds.max_body_bytes == 0 {
            return Err(self.invalid("feeds.max_body_bytes", "must be at least 1"));
        }
        if self.feeds.max_future_skew_s > 24 * 3600 {
            return Err(self.invalid("feeds.max_future_skew_s", "must be at most 86400 (one day)"));
        }
        if let Some(ssf) = &self.feeds.ssf {
            if let Some(t) = &ssf.push_token {
                secret("feeds.ssf.push_token", t)?;
            }
            if ssf.audiences.is_empty() {
                return Err(self.invalid("feeds.ssf.audiences", "at least one audience"));
            }
            self.check_key_source(
                "feeds.ssf",
                &ssf.algorithms,
                [&ssf.jwks_url, &ssf.discovery_url],
                ssf.jwks_file.is_some(),
            )?;
            if let Some(u) = &ssf.poll_url {
                check_http_url(u).map_err(|m| self.invalid("feeds.ssf.poll_url", m))?;
            }
            if ssf.push_token.is_none() && ssf.poll_url.is_none() {
                return Err(self.invalid(
                    "feeds.ssf",
                    "set push_token (push) or poll_url (poll), or both",
                ));
            }
        }
        if let Some(scim) = &self.feeds.scim {
            secret("feeds.scim.token", &scim.token)?;
            if !["userName", "externalId", "id"].contains(&scim.subject_attribute.as_str()) {
                return Err(self.invalid(
                    "feeds.scim.subject_attribute",
                    "one of userName, externalId, id",
                ));
            }
            if let Some(u) = &scim.base_url {
                check_http_url(u).map_err(|m| self.invalid("feeds.scim.base_url", m))?;
            }
        }
        if let Some(j) = &self.feeds.jamf {
            secret("feeds.jamf.authorization", &j.authorization)?;
            if !["udid", "serialNumber", "jssID"].contains(&j.device_id_field.as_str()) {
                return Err(self.invalid(
                    "feeds.jamf.device_id_field",
                    "one of udid, serialNumber, jssID",
                ));
            }
            if http::HeaderValue::from_str(&j.authorization).is_err() {
                return Err(self.invalid(
                    "feeds.jamf.authorization",
                    "must be a valid header value (visible ASCII)",
                ));
            }
            for (k, ids) in [
                ("noncompliant_groups", &j.noncompliant_groups),
                ("patch_groups", &j.patch_groups),
                ("compromised_groups", &j.compromised_groups),
                ("lost_groups", &j.lost_groups),
            ] {
                let mut seen = HashSet::new();
                for (n, id) in ids.iter().enumerate() {
                    if *id == 0 || !seen.insert(*id) {
                        return Err(self.invalid(
                            format!("feeds.jamf.{k}[{n}]"),
                            format!("`{id}` is zero or listed twice"),
                        ));
                    }
                }
            }
            if let Some(a) = &j.api {
                check_http_url(&a.url).map_err(|m| self.invalid("feeds.jamf.api.url", m))?;
                for (k, v) in [
                    ("client_id", &a.client_id),
                    ("client_secret", &a.client_secret),
                ] {
                    if v.trim().is_empty() {
                        return Err(
                            self.invalid(format!("feeds.jamf.api.{k}"), "must not be empty")
                        );
                    }
                }
                if a.timeout_s == 0 {
                    return Err(self.invalid("feeds.jamf.api.timeout_s", "must be at least 1"));
                }
            }
        }
        if let Some(i) = &self.feeds.intune {
            check_http_url(&i.graph_url).map_err(|m| self.invalid("feeds.intune.graph_url", m))?;
            check_http_url(&i.token_url).map_err(|m| self.invalid("feeds.intune.token_url", m))?;
            if i.interval_s == 0 {
                return Err(self.invalid("feeds.intune.interval_s", "must be at least 1"));
            }
            for (k, v) in [
                ("client_id", &i.client_id),
                ("client_secret", &i.client_secret),
                ("scope", &i.scope),
            ] {
                if v.trim().is_empty() {
                    return Err(self.invalid(format!("feeds.intune.{k}"), "must not be empty"));
                }
            }
            if i.full_sync_interval_s != 0 && i.full_sync_interval_s < i.interval_s {
                return Err(self.invalid(
                    "feeds.intune.full_sync_interval_s",
                    "must be 0 (off) or at least interval_s",
                ));
            }
            if !["azureADDeviceId", "id"].contains(&i.device_id_field.as_str()) {
                return Err(
                    self.invalid("feeds.intune.device_id_field", "one of azureADDeviceId, id")
                );
            }
        }
        let mut names = HashSet::new();
        for (i, m) in self.feeds.mdm.iter().enumerate() {
            if m.name.is_empty()
                || !m
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(self.invalid(
                    format!("feeds.mdm[{i}].name"),
                    "letters, digits, `-` and `_` only",
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(self.invalid(
                    format!("feeds.mdm[{i}].name"),
                    format!("duplicate source `{}`", m.name),
                ));
            }
            secret(&format!("feeds.mdm[{i}].secret"), &m.secret)?;
        }
        Ok(())
    }

    /// The header names stripped from client requests.
    pub fn stripped_headers(&self) -> Vec<http::HeaderName> {
        let mut out: Vec<http::HeaderName> = Vec::new();
        if !self.proxy.strip_headers_replace_defaults {
            out.extend(
                DEFAULT_STRIPPED_HEADERS
                    .iter()
                    .map(|h| http::HeaderName::from_static(h)),
            );
        }
        let route_headers = self
            .routes
            .iter()
            .flat_map(|r| r.identity_headers.named().map(|(_, n)| n));
        for h in self
            .proxy
            .strip_headers
            .iter()
            .map(String::as_str)
            .chain(route_headers)
        {
            if let Ok(n) = http::HeaderName::from_bytes(h.as_bytes())
                && !out.contains(&n)
            {
                out.push(n);
            }
        }
        out
    }

    /// Header-read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.proxy.header_read_timeout_ms)
    }
}

fn check_http_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("`{u}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{u}` must be an http or https URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{u}` has no host"));
    }
    Ok(())
}
