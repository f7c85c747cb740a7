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

mod access;
mod assertion;
mod browser;
mod feeds;
mod load;
mod policy;
mod store;
pub use access::*;
mod transmit;
pub use assertion::*;
pub use browser::*;
pub use feeds::*;
pub use policy::*;
pub use store::*;
pub use transmit::*;

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

/// The headers the proxy itself sets on forwarded requests (when it has a
/// value for them): stripped from every client request whatever
/// `strip_headers` and `strip_headers_replace_defaults` say, so that an app
/// trusting them only ever reads the proxy's, and an underscored look-alike
/// of one never passes either.
pub const PROXY_SET_HEADERS: &[&str] = &[
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
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Identity headers stripped from every client request by default, besides
/// [`PROXY_SET_HEADERS`]: the rest of `X-Forwarded-*`, and the usual names
/// apps trust from proxies.
pub const DEFAULT_STRIPPED_HEADERS: &[&str] = &[
    "x-portcullis-request-id",
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
    /// The access memory and the stale-access findings (`[access]`).
    #[serde(default)]
    pub access: AccessConfig,
    /// Shared Signals transmitter and signed webhooks; off when absent.
    #[serde(default)]
    pub transmitter: Option<TransmitterConfig>,
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
    /// Proxy worker threads, each accepting and serving its own connections
    /// with its own upstream pool; 0 = one per available core.
    #[serde(default)]
    pub workers: usize,
    /// Pin worker `i` to the `i`-th CPU this process may run on (when there
    /// are at least as many such CPUs as workers), as nginx's
    /// `worker_cpu_affinity auto` does. Off by default: right for a host
    /// whose cores the proxy owns, wrong for a pod sharing them.
    #[serde(default)]
    pub pin_workers: bool,
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
    /// Forward the client's `Authorization` and `DPoP` headers to the
    /// upstream. Off by default: every app behind the proxy would otherwise
    /// hold live tokens for the proxy's audience, which a compromised or
    /// logging app could replay through the proxy to every other route (as
    /// the proxy's own cookies never reach an app). A route that needs the
    /// token itself (token relay, its own verification) sets its own
    /// `forward_authorization`.
    #[serde(default)]
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
    /// Forward the client's `Authorization` and `DPoP` headers to this app;
    /// unset: `[proxy] forward_authorization` (off by default).
    #[serde(default)]
    pub forward_authorization: Option<bool>,
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
fn d_dbsc() -> bool {
    DEFAULT_DBSC
}
fn d_dbsc_cookie_ttl_s() -> u64 {
    DEFAULT_DBSC_COOKIE_TTL_S
}
fn d_dbsc_challenge_ttl_s() -> u64 {
    DEFAULT_DBSC_CHALLENGE_TTL_S
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
