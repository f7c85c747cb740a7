//! The `[feeds]` section: SSF, SCIM, Jamf (and its API), Intune, generic MDM.

use super::*;

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

pub(super) fn d_feed_max_body() -> usize {
    DEFAULT_FEED_MAX_BODY_BYTES
}

pub(super) fn d_max_future_skew() -> u64 {
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

pub(super) fn d_ssf_algs() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "PS256".into()]
}

pub(super) fn d_poll_interval_ms() -> u64 {
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

pub(super) fn d_subject_attribute() -> String {
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

pub(super) fn d_jamf_api_timeout() -> u64 {
    DEFAULT_JAMF_API_TIMEOUT_S
}

pub(super) fn d_jamf_id() -> String {
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

pub(super) fn d_graph_scope() -> String {
    "https://graph.microsoft.com/.default".into()
}
pub(super) fn d_intune_interval() -> u64 {
    300
}
pub(super) fn d_intune_full_sync() -> u64 {
    DEFAULT_INTUNE_FULL_SYNC_S
}
pub(super) fn d_intune_id() -> String {
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
