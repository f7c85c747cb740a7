//! Microsoft Intune: a poller of Graph `managedDevices`, mapped into device
//! events.
//!
//! Graph change notifications do not cover `managedDevice`, so this feed
//! polls `GET {graph_url}/deviceManagement/managedDevices?$select=…` with
//! `$filter=lastSyncDateTime ge <watermark − lookback>` and follows
//! `@odata.nextLink` (same origin only, so the token never leaves Graph). The
//! app token comes from the OAuth 2.0 client-credentials grant at
//! `token_url` and is cached until shortly before `expires_in`. The first
//! poll, and one every `full_sync_interval_s`, sweeps without the filter,
//! catching state that changed without a device sync (a wipe issued by an
//! admin, a compliance re-evaluation).
//!
//! Each device becomes one event with the id
//! `intune:<id>:<lastSyncDateTime>:<digest of the posture fields>`: a re-poll
//! of an unchanged device is a duplicate, a changed one is not even when the
//! device did not sync. The origin time is `lastSyncDateTime` (or a later
//! `deviceActionResults` update that decided the lifecycle), so an older
//! read never overwrites newer state. The watermark is stored with
//! `Posture::set_meta` only after every page of the round was ingested.
//! The mapping is documented in `docs/mdm.md`.
//!
//! This room never logs the client secret or a token; bodies are bounded
//! and every request has a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::Value;

use super::FeedContext;
use crate::config::IntuneConfig;
use crate::posture::IngestError;
use crate::posture::event::{Change, DevicePatch, Feed, PostureEvent};
use crate::posture::model::{Compliance, Lifecycle, Ownership, RevocationTarget, Threat};
use crate::posture::snapshot::Snapshot;
use crate::store::Outcome;

/// Time for one HTTP exchange (connect, headers and body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest token response accepted.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Largest Graph page accepted.
pub const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;
/// Most pages in one round (a nextLink loop ends here).
pub const MAX_PAGES: usize = 10_000;
/// A cached token is replaced this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The delta filter reaches this far behind the watermark, for devices that
/// become visible in Graph a little after their sync time.
pub const WATERMARK_LOOKBACK_MS: u64 = 10 * 60 * 1000;

/// Fields read on every Graph version.
const SELECT: &[&str] = &[
    "id",
    "azureADDeviceId",
    "userPrincipalName",
    "operatingSystem",
    "osVersion",
    "complianceState",
    "jailBroken",
    "managedDeviceOwnerType",
    "partnerReportedThreatState",
    "lastSyncDateTime",
    "deviceActionResults",
    "serialNumber",
    "enrolledDateTime",
];

/// Why a poll failed. Nothing after the failure point was acknowledged, and
/// the watermark did not move.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The HTTP client could not be built (the `ca` bundle, the URL).
    #[error("intune: cannot build the client: {0}")]
    Client(String),
    /// The token endpoint refused (wrong client id or secret, scope…).
    #[error("intune: token endpoint answered {status} ({error})")]
    Token {
        /// HTTP status.
        status: u16,
        /// The OAuth `error` code, or `-`.
        error: String,
    },
    /// The token response did not parse.
    #[error("intune: token response: {0}")]
    TokenResponse(String),
    /// Graph refused a page.
    #[error("intune: graph answered {status} for page {page} ({code})")]
    Graph {
        /// HTTP status.
        status: u16,
        /// 1-based page number.
        page: usize,
        /// Graph's `error.code`, or `-`.
        code: String,
    },
    /// A request ran past its deadline.
    #[error("intune: {0} timed out")]
    Timeout(&'static str),
    /// A connection or body failed.
    #[error("intune: {what}: {detail}")]
    Http {
        /// Which request.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A page did not parse.
    #[error("intune: graph page {page}: {detail}")]
    Page {
        /// 1-based page number.
        page: usize,
        /// Why.
        detail: String,
    },
    /// `@odata.nextLink` points away from `graph_url`'s origin.
    #[error("intune: nextLink leaves the graph_url origin: `{0}`")]
    ForeignNextLink(String),
    /// Too many pages in one round.
    #[error("intune: more than {MAX_PAGES} pages in one round")]
    TooManyPages,
    /// The store failed or is shutting down.
    #[error("intune: {0}")]
    Store(#[from] IngestError),
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// A full sweep (no `lastSyncDateTime` filter).
    pub full: bool,
    /// Pages fetched.
    pub pages: usize,
    /// Device objects read.
    pub devices: usize,
    /// Events applied.
    pub applied: usize,
    /// Events older than the record they target.
    pub stale: usize,
    /// Events applied in part (some fields stale or held by a sticky state).
    pub partial: usize,
    /// Events whose only changes a sticky state kept.
    pub held: usize,
    /// Events seen before.
    pub duplicate: usize,
    /// Devices skipped (no usable id or sync time, malformed).
    pub skipped: usize,
    /// The stored watermark after the round, ms since epoch.
    pub watermark_ms: Option<u64>,
}

type GraphClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// The Intune poller for one `feeds.intune` config: HTTP client, token
/// cache and the store keys of its cursors.
pub struct Poller {
    /// The config it was built from.
    pub cfg: IntuneConfig,
    client: GraphClient,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    origin: (String, String),
    meta_prefix: String,
    select: String,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("graph_url", &self.cfg.graph_url)
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

fn origin_of(url: &str) -> Option<(String, String)> {
    let u: http::Uri = url.parse().ok()?;
    Some((
        u.scheme_str()?.to_ascii_lowercase(),
        u.authority()?.as_str().to_ascii_lowercase(),
    ))
}

fn short_code(bytes: &[u8], pick: impl Fn(&Value) -> Option<&str>) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .as_ref()
        .and_then(|v| pick(v).map(|s| s.chars().take(64).collect::<String>()))
        .filter(|s| s.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "-".into())
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    value: Vec<Value>,
    #[serde(rename = "@odata.nextLink", default)]
    next_link: Option<String>,
}

impl Poller {
    /// Builds the poller: web PKI roots plus the optional `ca` bundle.
    pub fn new(cfg: IntuneConfig) -> Result<Self, PollError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &cfg.ca {
            roots.extend(
                crate::tls::load_roots(&[ca])
                    .map_err(|e| PollError::Client(e.to_string()))?
                    .roots,
            );
        }
        let origin = origin_of(&cfg.graph_url)
            .ok_or_else(|| PollError::Client(format!("`{}` is not a URL", cfg.graph_url)))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(crate::tls::outbound::https_connector(
                roots,
                CONNECT_TIMEOUT,
            ));
        let tag = crate::util::sha256(
            format!("{}\n{}\n{}", cfg.graph_url, cfg.token_url, cfg.client_id).as_bytes(),
        );
        let mut select: Vec<&str> = SELECT.to_vec();
        // `managementState` exists only in the beta API; v1.0 refuses to select it.
        if cfg.graph_url.trim_end_matches('/').ends_with("/beta") {
            select.push("managementState");
        }
        Ok(Self {
            meta_prefix: format!("intune:{}:", hex::encode(&tag[..8])),
            select: select.join(","),
            origin,
            client,
            token: tokio::sync::Mutex::new(None),
            cfg,
        })
    }

    /// Store key of a cursor, tied to this tenant and client.
    fn meta_key(&self, what: &str) -> String {
        format!("{}{what}", self.meta_prefix)
    }

    /// The first page's URL; `since_ms` adds the `lastSyncDateTime` filter.
    fn first_url(&self, since_ms: Option<u64>) -> String {
        let mut u = format!(
            "{}/deviceManagement/managedDevices?$select={}",
            self.cfg.graph_url.trim_end_matches('/'),
            self.select
        );
        if let Some(ms) = since_ms {
            u.push_str("&$filter=lastSyncDateTime%20ge%20");
            u.push_str(&crate::util::rfc3339(ms, false));
        }
        u
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        limit: usize,
        what: &'static str,
    ) -> Result<(StatusCode, Bytes), PollError> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| PollError::Http {
                    what,
                    detail: error_chain(&e),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| PollError::Http {
                    what,
                    detail: if e.is::<http_body_util::LengthLimitError>() {
                        format!("response is over {limit} bytes")
                    } else {
                        e.to_string()
                    },
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| PollError::Timeout(what))?
    }

    /// A Graph app token, from the cache or the token endpoint.
    async fn token(&self) -> Result<String, PollError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("client_secret", &self.cfg.client_secret)
            .append_pair("scope", &self.cfg.scope)
            .finish();
        let req = Request::post(&self.cfg.token_url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PollError::Client(e.to_string()))?;
        let (status, bytes) = self.send(req, MAX_TOKEN_BYTES, "token request").await?;
        if !status.is_success() {
            return Err(PollError::Token {
                status: status.as_u16(),
                error: short_code(&bytes, |v| v.get("error")?.as_str()),
            });
        }
        let t: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| PollError::TokenResponse(format!("not a token response: {e}")))?;
        if t.token_type
            .as_deref()
            .is_some_and(|tt| !tt.eq_ignore_ascii_case("bearer"))
        {
            return Err(PollError::TokenResponse("token_type is not Bearer".into()));
        }
        if t.access_token.is_empty() || http::HeaderValue::from_str(&t.access_token).is_err() {
            return Err(PollError::TokenResponse(
                "access_token is not a header value".into(),
            ));
        }
        // `expires_in` is a number (v2 endpoint) or a string (v1); absent → 5 min.
        let expires_in = match &t.expires_in {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(300);
        let life = Duration::from_secs(expires_in);
        let keep = if life > TOKEN_REFRESH_MARGIN * 2 {
            life - TOKEN_REFRESH_MARGIN
        } else {
            life / 2
        };
        *cached = Some(CachedToken {
            value: t.access_token.clone(),
            refresh_at: Instant::now() + keep,
        });
        Ok(t.access_token)
    }

    /// Fetches one page; a 401 drops the cached token and retries once.
    async fn page(&self, url: &str, n: usize) -> Result<Page, PollError> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let req = Request::get(url)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::ACCEPT, "application/json")
                .body(Full::new(Bytes::new()))
                .map_err(|e| PollError::Page {
                    page: n,
                    detail: format!("bad URL: {e}"),
                })?;
            let (status, bytes) = self.send(req, MAX_PAGE_BYTES, "graph request").await?;
            if status == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                *self.token.lock().await = None;
                continue;
            }
            if !status.is_success() {
                return Err(PollError::Graph {
                    status: status.as_u16(),
                    page: n,
                    code: short_code(&bytes, |v| v.get("error")?.get("code")?.as_str()),
                });
            }
            return serde_json::from_slice(&bytes).map_err(|e| PollError::Page {
                page: n,
                detail: e.to_string(),
            });
        }
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActionResult {
    #[serde(default)]
    action_name: Option<String>,
    #[serde(default)]
    action_state: Option<String>,
    #[serde(default)]
    start_date_time: Option<String>,
    #[serde(default)]
    last_updated_date_time: Option<String>,
}

impl ActionResult {
    fn name(&self) -> String {
        self.action_name
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase()
    }
    fn state(&self) -> String {
        self.action_state
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase()
    }
    fn at_ms(&self) -> u64 {
        self.last_updated_date_time
            .as_deref()
            .or(self.start_date_time.as_deref())
            .and_then(crate::util::parse_rfc3339_ms)
            .unwrap_or(0)
    }
}

/// The posture slice of a Graph `managedDevice`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManagedDevice {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "azureADDeviceId", default)]
    azure_ad_device_id: Option<String>,
    #[serde(default)]
    user_principal_name: Option<String>,
    #[serde(default)]
    operating_system: Option<String>,
    #[serde(default)]
    os_version: Option<String>,
    #[serde(default)]
    compliance_state: Option<String>,
    #[serde(default)]
    jail_broken: Option<String>,
    #[serde(default)]
    management_state: Option<String>,
    #[serde(default)]
    managed_device_owner_type: Option<String>,
    #[serde(default)]
    partner_reported_threat_state: Option<String>,
    #[serde(default)]
    last_sync_date_time: Option<String>,
    #[serde(default)]
    device_action_results: Option<Vec<ActionResult>>,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    enrolled_date_time: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A usable Entra device id: present and not the all-zero GUID Graph
/// reports for devices that are not Entra-registered.
fn aad_id(d: &ManagedDevice) -> Option<&str> {
    nonempty(&d.azure_ad_device_id).filter(|s| s.chars().any(|c| c != '0' && c != '-'))
}

fn platform(os: &str) -> String {
    let l = os.to_ascii_lowercase();
    let p = if l.starts_with("windows") {
        "windows"
    } else if l == "ipados" {
        "ipados"
    } else if l == "ios" {
        "ios"
    } else if l.starts_with("mac") {
        "macos"
    } else if l.starts_with("android") {
        "android"
    } else if l.starts_with("linux") {
        "linux"
    } else {
        return l.chars().take(32).collect();
    };
    p.to_owned()
}

fn compliance(s: &str) -> Option<Compliance> {
    match s.to_ascii_lowercase().as_str() {
        "compliant" => Some(Compliance::Compliant),
        "noncompliant" => Some(Compliance::NonCompliant),
        "ingraceperiod" => Some(Compliance::Grace),
        "unknown" | "error" | "conflict" | "configmanager" => Some(Compliance::Unknown),
        _ => None,
    }
}

/// `partnerReportedThreatState` → (threat, compromised).
fn threat(s: &str) -> (Option<Threat>, Option<bool>) {
    match s.to_ascii_lowercase().as_str() {
        "highseverity" | "compromised" => (Some(Threat::High), Some(true)),
        "mediumseverity" => (Some(Threat::Medium), Some(false)),
        "lowseverity" => (Some(Threat::Low), Some(false)),
        "secured" => (Some(Threat::None), Some(false)),
        _ => (None, None),
    }
}

fn severity(l: Lifecycle) -> u8 {
    match l {
        Lifecycle::WipePending | Lifecycle::Wiped => 4,
        Lifecycle::Lost => 3,
        Lifecycle::Unenrolled => 2,
        Lifecycle::Enrolled => 1,
        _ => 0,
    }
}

/// The lifecycle the device's action history implies, and when.
fn action_lifecycle(actions: &[ActionResult]) -> Option<(Lifecycle, u64)> {
    let live = |s: &str| matches!(s, "pending" | "active" | "done");
    let mut best: Option<(Lifecycle, u64)> = None;
    let mut consider = |l: Lifecycle, at: u64| {
        if best.is_none_or(|(b, bat)| severity(l) > severity(b) || (l == b && at > bat)) {
            best = Some((l, at));
        }
    };
    for a in actions.iter().filter(|a| a.name() == "wipe") {
        match a.state().as_str() {
            "pending" | "active" => consider(Lifecycle::WipePending, a.at_ms()),
            "done" => consider(Lifecycle::Wiped, a.at_ms()),
            _ => {}
        }
    }
    // Lost mode: the latest enable / disable wins; a tie fails closed.
    let last_enable = actions
        .iter()
        .filter(|a| a.name() == "enablelostmode" && live(&a.state()))
        .map(ActionResult::at_ms)
        .max();
    let last_disable = actions
        .iter()
        .filter(|a| a.name() == "disablelostmode" && a.state() == "done")
        .map(ActionResult::at_ms)
        .max();
    if let Some(en) = last_enable
        && last_disable.is_none_or(|dis| en >= dis)
    {
        consider(Lifecycle::Lost, en);
    }
    for a in actions.iter().filter(|a| a.name() == "retire") {
        if live(&a.state()) {
            consider(Lifecycle::Unenrolled, a.at_ms());
        }
    }
    best
}

/// `managementState` (beta) → lifecycle.
fn management_lifecycle(s: &str) -> Option<Lifecycle> {
    match s.to_ascii_lowercase().as_str() {
        "managed" | "retirecanceled" | "wipecanceled" => Some(Lifecycle::Enrolled),
        "retirepending" | "retireissued" => Some(Lifecycle::Unenrolled),
        "wipepending" | "wipeissued" => Some(Lifecycle::WipePending),
        _ => None,
    }
}

/// Why a device was skipped (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    NoId,
    NoSync,
}

impl Skip {
    fn label(self) -> &'static str {
        match self {
            Skip::NoId => "intune.no-device-id",
            Skip::NoSync => "intune.no-sync-time",
        }
    }
}

/// Maps one managed device to an event. The snapshot is read only to mark
/// a first-seen device enrolled when Graph v1.0 gives no `managementState`.
fn map_device(
    d: &ManagedDevice,
    cfg: &IntuneConfig,
    snapshot: &Snapshot,
) -> Result<(PostureEvent, u64), Skip> {
    let intune_id = nonempty(&d.id).ok_or(Skip::NoId)?;
    let device = match cfg.device_id_field.as_str() {
        "id" => intune_id,
        _ => aad_id(d).ok_or(Skip::NoId)?,
    }
    .to_owned();
    let sync_raw = nonempty(&d.last_sync_date_time).ok_or(Skip::NoSync)?;
    // Never-synced devices report 0001-01-01, which does not parse: skipped.
    let sync_ms = crate::util::parse_rfc3339_ms(sync_raw)
        .filter(|ms| *ms > 0)
        .ok_or(Skip::NoSync)?;

    let actions = d.device_action_results.as_deref().unwrap_or_default();
    let from_actions = action_lifecycle(actions);
    let from_state = nonempty(&d.management_state).and_then(management_lifecycle);
    let mut origin_ms = sync_ms;
    let mut lifecycle = from_state;
    if let Some((l, at)) = from_actions
        && lifecycle.is_none_or(|s| severity(l) > severity(s))
    {
        lifecycle = Some(l);
        origin_ms = origin_ms.max(at);
    }
    if lifecycle.is_none()
        && d.management_state.is_none()
        && snapshot
            .device(&device)
            .is_none_or(|r| r.lifecycle == Lifecycle::Unknown)
    {
        lifecycle = Some(Lifecycle::Enrolled);
    }
    let revoke = lifecycle.is_some_and(|l| l.is_dead() || l == Lifecycle::Unenrolled);

    let jail = nonempty(&d.jail_broken).and_then(|j| match j.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    });
    let (threat_level, threat_compromised) = nonempty(&d.partner_reported_threat_state)
        .map(threat)
        .unwrap_or((None, None));
    let compromised = match (jail, threat_compromised) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), _) | (_, Some(false)) => Some(false),
        _ => None,
    };
    let mut external = Vec::new();
    if cfg.device_id_field != "id" {
        external.push(format!("intune:{intune_id}"));
    }
    if cfg.device_id_field == "id"
        && let Some(a) = aad_id(d)
    {
        external.push(format!("intune:aad:{a}"));
    }
    if let Some(s) = nonempty(&d.serial_number) {
        external.push(format!("intune:serial:{s}"));
    }
    let patch = DevicePatch {
        platform: nonempty(&d.operating_system).map(platform),
        os_version: nonempty(&d.os_version).map(str::to_owned),
        ownership: nonempty(&d.managed_device_owner_type).and_then(|o| {
            match o.to_ascii_lowercase().as_str() {
                "company" => Some(Ownership::Corporate),
                "personal" => Some(Ownership::Byod),
                _ => None,
            }
        }),
        management_source: Some("intune".into()),
        lifecycle,
        compliance: nonempty(&d.compliance_state).and_then(compliance),
        compromised,
        patch_behind: None,
        threat: threat_level,
        last_check_in_ms: Some(sync_ms),
        subjects: nonempty(&d.user_principal_name).map(|u| vec![u.to_owned()]),
        cert_thumbprints: None,
        add_external_ids: external,
        // A re-enrolment shows as an `enrolledDateTime` newer than the
        // lost / wipe / compromise it follows; an old one clears nothing.
        reenrolled_ms: nonempty(&d.enrolled_date_time).and_then(crate::util::parse_rfc3339_ms),
    };
    let kind = match lifecycle {
        Some(Lifecycle::WipePending | Lifecycle::Wiped) => "intune.device-wipe",
        Some(Lifecycle::Lost) => "intune.device-lost",
        Some(Lifecycle::Unenrolled) => "intune.device-retire",
        _ => "intune.device-state",
    };
    let mut changes = vec![Change::Device {
        id: device.clone(),
        patch,
    }];
    if revoke {
        changes.push(Change::Revoke {
            target: RevocationTarget::Device,
            key: device,
        });
    }
    Ok((
        PostureEvent {
            id: format!("intune:{intune_id}:{sync_raw}:{}", digest(d)),
            feed: Feed::Intune,
            kind: kind.into(),
            origin_ms,
            changes,
        },
        sync_ms,
    ))
}

/// A short digest of the source fields the mapping reads, so an unchanged
/// device re-polled is a duplicate and a changed one is not.
fn digest(d: &ManagedDevice) -> String {
    let actions: Vec<Value> = d
        .device_action_results
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            serde_json::json!([
                a.action_name,
                a.action_state,
                a.start_date_time,
                a.last_updated_date_time
            ])
        })
        .collect();
    let v = serde_json::json!([
        d.azure_ad_device_id,
        d.user_principal_name,
        d.operating_system,
        d.os_version,
        d.compliance_state,
        d.jail_broken,
        d.management_state,
        d.managed_device_owner_type,
        d.partner_reported_threat_state,
        d.serial_number,
        d.enrolled_date_time,
        actions,
    ]);
    hex::encode(&crate::util::sha256(v.to_string().as_bytes())[..8])
}

/// One round: every page since the watermark (or everything, on a full
/// sweep), each page ingested before the next is fetched; the watermark is
/// stored after the last page.
pub async fn poll_once(ctx: &FeedContext, poller: &Poller) -> Result<PollReport, PollError> {
    let posture = &ctx.posture;
    let now = crate::util::now_unix_ms();
    let wm_key = poller.meta_key("watermark_ms");
    let full_key = poller.meta_key("last_full_ms");
    let watermark: Option<u64> = posture
        .get_meta(&wm_key)
        .await?
        .and_then(|s| s.parse().ok());
    let last_full: Option<u64> = posture
        .get_meta(&full_key)
        .await?
        .and_then(|s| s.parse().ok());
    let every_ms = poller.cfg.full_sync_interval_s.saturating_mul(1000);
    let full = watermark.is_none()
        || last_full.is_none()
        || (every_ms > 0 && last_full.is_some_and(|t| now.saturating_sub(t) >= every_ms));
    let mut report = PollReport {
        full,
        ..PollReport::default()
    };
    let mut url = poller.first_url(if full {
        None
    } else {
        watermark.map(|w| w.saturating_sub(WATERMARK_LOOKBACK_MS))
    });
    let mut newest = watermark.unwrap_or(0);
    loop {
        report.pages += 1;
        if report.pages > MAX_PAGES {
            return Err(PollError::TooManyPages);
        }
        let page = poller.page(&url, report.pages).await?;
        let mut events = Vec::with_capacity(page.value.len());
        for raw in page.value {
            report.devices += 1;
            let mapped = serde_json::from_value::<ManagedDevice>(raw)
                .map_err(|e| {
                    tracing::debug!(error = %e, "intune: managed device skipped");
                    "intune.malformed-device"
                })
                .and_then(|d| map_device(&d, &poller.cfg, posture.snapshot()).map_err(Skip::label))
                .and_then(|(ev, sync)| match ev.validate() {
                    Ok(()) => Ok((ev, sync)),
                    Err(_) => Err("intune.invalid-device"),
                })
                // A device dated beyond the clock skew is skipped (and
                // counted `future`), not the round: one bad clock must not
                // stall every other device.
                .and_then(
                    |(ev, sync)| match posture.check_times(std::slice::from_ref(&ev)) {
                        Ok(()) => Ok((ev, sync)),
                        Err(_) => Err(""),
                    },
                );
            match mapped {
                Ok((ev, sync)) => {
                    newest = newest.max(sync);
                    events.push(ev);
                }
                Err(label) => {
                    report.skipped += 1;
                    if !label.is_empty() {
                        super::count(&ctx.metrics, "intune", label, "ignored");
                    }
                }
            }
        }
        if !events.is_empty() {
            for o in posture.ingest(events).await? {
                match o {
                    Outcome::Applied => report.applied += 1,
                    Outcome::Partial => report.partial += 1,
                    Outcome::Held => report.held += 1,
                    Outcome::Stale => report.stale += 1,
                    Outcome::Duplicate => report.duplicate += 1,
                }
            }
        }
        match page.next_link {
            None => break,
            Some(next) => {
                if origin_of(&next).as_ref() != Some(&poller.origin) {
                    return Err(PollError::ForeignNextLink(next.chars().take(200).collect()));
                }
                url = next;
            }
        }
    }
    // INVARIANT: the cursor moves only after every page of this round was
    // durably ingested (Graph does not order pages by lastSyncDateTime, so a
    // per-page cursor could skip devices of a later page). A sync time in
    // the future never pushes it past now.
    let newest = newest.min(now);
    if newest > 0 && Some(newest) != watermark {
        posture.set_meta(&wm_key, &newest.to_string()).await?;
    }
    if full {
        posture.set_meta(&full_key, &now.to_string()).await?;
    }
    report.watermark_ms = (newest > 0).then_some(newest);
    Ok(report)
}

/// Polls every `interval_s` until shutdown, reading the running config each
/// round (a reload that changes `feeds.intune` rebuilds the poller; one
/// that removes it pauses polling).
pub async fn poll_loop(
    feeds: Arc<arc_swap::ArcSwap<super::FeedContext>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut poller: Option<Poller> = None;
    loop {
        let ctx = feeds.load_full();
        let wait = match ctx.config.feeds.intune.clone() {
            None => Duration::from_secs(60),
            Some(cfg) => {
                let interval = Duration::from_secs(cfg.interval_s.max(1));
                if poller.as_ref().is_none_or(|p| p.cfg != cfg) {
                    poller = match Poller::new(cfg) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::error!(error = %e, "intune poller not started");
                            None
                        }
                    };
                }
                if let Some(p) = &poller {
                    let started = Instant::now();
                    tokio::select! {
                        r = poll_once(&ctx, p) => match r {
                            Ok(r) => tracing::info!(
                                full = r.full, pages = r.pages, devices = r.devices,
                                applied = r.applied, duplicate = r.duplicate, stale = r.stale,
                                skipped = r.skipped, ms = started.elapsed().as_millis() as u64,
                                "intune poll"
                            ),
                            Err(e) => tracing::warn!(error = %e, "intune poll failed; retrying next interval"),
                        },
                        _ = shutdown.changed() => return,
                    }
                }
                interval
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(field: &str) -> IntuneConfig {
        IntuneConfig {
            graph_url: "https://graph.example/beta".into(),
            token_url: "https://login.example/t/oauth2/v2.0/token".into(),
            client_id: "cid".into(),
            client_secret: "secret".into(),
            scope: "https://graph.microsoft.com/.default".into(),
            interval_s: 300,
            device_id_field: field.into(),
            ca: None,
            full_sync_interval_s: 86_400,
        }
    }

    fn dev(v: Value) -> ManagedDevice {
        serde_json::from_value(v).unwrap()
    }

    fn patch(ev: &PostureEvent) -> &DevicePatch {
        match &ev.changes[0] {
            Change::Device { patch, .. } => patch,
            _ => unreachable!(),
        }
    }

    #[test]
    fn form_encoding() {
        let form_value =
            |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        assert_eq!(form_value("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            form_value("https://graph.microsoft.com/.default"),
            "https%3A%2F%2Fgraph.microsoft.com%2F.default"
        );
    }

    #[test]
    fn the_documented_sample_maps() {
        let d = dev(serde_json::json!({
            "id": "8f2c1d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f", "azureADDeviceId": "b7d9e1f3-2a4c-4e6f-8091-a2b3c4d5e6f7",
            "userPrincipalName": "m.ito@acme.example", "operatingSystem": "Windows", "osVersion": "10.0.26100.3194",
            "complianceState": "inGracePeriod", "complianceGracePeriodExpirationDateTime": "2026-01-03T09:00:00Z",
            "jailBroken": "Unknown", "isEncrypted": true, "managementAgent": "mdm",
            "partnerReportedThreatState": "mediumSeverity", "lastSyncDateTime": "2026-01-01T08:41:12Z",
            "managedDeviceOwnerType": "company", "deviceActionResults": []
        }));
        let snap = Snapshot::new();
        let (ev, sync) = map_device(&d, &cfg("azureADDeviceId"), &snap).unwrap();
        assert_eq!(sync, 1_767_256_872_000);
        assert_eq!(ev.origin_ms, sync);
        assert!(
            ev.id
                .starts_with("intune:8f2c1d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f:2026-01-01T08:41:12Z:")
        );
        assert_eq!(ev.changes.len(), 1);
        assert_eq!(
            ev.changes[0].record_key(),
            "device:b7d9e1f3-2a4c-4e6f-8091-a2b3c4d5e6f7"
        );
        let p = patch(&ev);
        assert_eq!(p.compliance, Some(Compliance::Grace));
        assert_eq!(p.threat, Some(Threat::Medium));
        assert_eq!(p.compromised, Some(false));
        assert_eq!(p.platform.as_deref(), Some("windows"));
        assert_eq!(p.ownership, Some(Ownership::Corporate));
        assert_eq!(p.lifecycle, Some(Lifecycle::Enrolled));
        assert_eq!(p.subjects, Some(vec!["m.ito@acme.example".to_owned()]));
        assert_eq!(
            p.add_external_ids,
            vec!["intune:8f2c1d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f"]
        );
        // Same fields, same id; a changed field, a new id.
        let (again, _) = map_device(&d, &cfg("azureADDeviceId"), &snap).unwrap();
        assert_eq!(again.id, ev.id);
        let mut d2 = d;
        d2.compliance_state = Some("noncompliant".into());
        let (changed, _) = map_device(&d2, &cfg("azureADDeviceId"), &snap).unwrap();
        assert_ne!(changed.id, ev.id);
    }

    #[test]
    fn jailbreak_threat_and_states() {
        let snap = Snapshot::new();
        let base = serde_json::json!({"id": "i1", "azureADDeviceId": "a1", "lastSyncDateTime": "2026-01-01T08:41:12Z"});
        let with = |extra: Value| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            map_device(&dev(v), &cfg("azureADDeviceId"), &snap)
                .unwrap()
                .0
        };
        let ev = with(serde_json::json!({"jailBroken": "True", "complianceState": "noncompliant"}));
        assert_eq!(patch(&ev).compromised, Some(true));
        assert_eq!(patch(&ev).compliance, Some(Compliance::NonCompliant));
        let ev = with(
            serde_json::json!({"partnerReportedThreatState": "compromised", "jailBroken": "False"}),
        );
        assert_eq!(patch(&ev).compromised, Some(true));
        assert_eq!(patch(&ev).threat, Some(Threat::High));
        for (state, want) in [
            ("error", Compliance::Unknown),
            ("conflict", Compliance::Unknown),
            ("configManager", Compliance::Unknown),
            ("compliant", Compliance::Compliant),
        ] {
            assert_eq!(
                patch(&with(serde_json::json!({"complianceState": state}))).compliance,
                Some(want)
            );
        }
        let ev = with(serde_json::json!({"managementState": "wipeIssued"}));
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::WipePending));
        assert_eq!(ev.changes.len(), 2, "a wipe revokes the device");
        assert_eq!(ev.kind, "intune.device-wipe");
        let ev = with(serde_json::json!({"managementState": "retirePending"}));
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::Unenrolled));
        assert_eq!(ev.changes.len(), 2);
        let ev = with(
            serde_json::json!({"managementState": "managed", "managedDeviceOwnerType": "personal"}),
        );
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::Enrolled));
        assert_eq!(patch(&ev).ownership, Some(Ownership::Byod));
        assert_eq!(ev.changes.len(), 1);
        // Beta managementState present but unmapped: lifecycle untouched.
        let ev = with(serde_json::json!({"managementState": "unhealthy"}));
        assert_eq!(patch(&ev).lifecycle, None);
    }

    #[test]
    fn device_actions() {
        let snap = Snapshot::new();
        let d = |actions: Value| {
            dev(serde_json::json!({"id": "i1", "azureADDeviceId": "a1",
                "lastSyncDateTime": "2026-01-01T08:00:00Z", "managementState": "managed",
                "deviceActionResults": actions}))
        };
        let (ev, _) = map_device(
            &d(serde_json::json!([{"actionName": "enableLostMode", "actionState": "pending",
                "startDateTime": "2026-01-01T09:00:00Z", "lastUpdatedDateTime": "2026-01-01T09:00:00Z"}])),
            &cfg("azureADDeviceId"),
            &snap,
        )
        .unwrap();
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::Lost));
        assert_eq!(ev.changes.len(), 2);
        assert_eq!(
            ev.origin_ms,
            crate::util::parse_rfc3339_ms("2026-01-01T09:00:00Z").unwrap()
        );
        let (ev, _) = map_device(
            &d(serde_json::json!([
                {"actionName": "enableLostMode", "actionState": "done", "lastUpdatedDateTime": "2026-01-01T07:00:00Z"},
                {"actionName": "disableLostMode", "actionState": "done", "lastUpdatedDateTime": "2026-01-01T07:30:00Z"}])),
            &cfg("azureADDeviceId"),
            &snap,
        )
        .unwrap();
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::Enrolled));
        let (ev, _) = map_device(
            &d(serde_json::json!([
                {"actionName": "enableLostMode", "actionState": "done", "lastUpdatedDateTime": "2026-01-01T07:00:00Z"},
                {"actionName": "wipe", "actionState": "active", "lastUpdatedDateTime": "2026-01-01T06:00:00Z"}])),
            &cfg("azureADDeviceId"),
            &snap,
        )
        .unwrap();
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::WipePending));
        let (ev, _) = map_device(
            &d(serde_json::json!([{"actionName": "wipe", "actionState": "failed"}])),
            &cfg("azureADDeviceId"),
            &snap,
        )
        .unwrap();
        assert_eq!(patch(&ev).lifecycle, Some(Lifecycle::Enrolled));
    }

    #[test]
    fn ids_and_skips() {
        let snap = Snapshot::new();
        let zero = dev(
            serde_json::json!({"id": "i1", "azureADDeviceId": "00000000-0000-0000-0000-000000000000",
            "lastSyncDateTime": "2026-01-01T08:00:00Z", "serialNumber": "SN1"}),
        );
        assert_eq!(
            map_device(&zero, &cfg("azureADDeviceId"), &snap).unwrap_err(),
            Skip::NoId
        );
        let (ev, _) = map_device(&zero, &cfg("id"), &snap).unwrap();
        assert_eq!(ev.changes[0].record_key(), "device:i1");
        assert_eq!(patch(&ev).add_external_ids, vec!["intune:serial:SN1"]);
        let never = dev(serde_json::json!({"id": "i1", "azureADDeviceId": "a1",
            "lastSyncDateTime": "0001-01-01T00:00:00Z"}));
        assert_eq!(
            map_device(&never, &cfg("azureADDeviceId"), &snap).unwrap_err(),
            Skip::NoSync
        );
    }

    #[test]
    fn select_follows_the_api_version() {
        let beta = Poller::new(cfg("id")).unwrap();
        assert!(beta.first_url(None).contains("managementState"));
        let mut c = cfg("id");
        c.graph_url = "https://graph.example/v1.0/".into();
        let v1 = Poller::new(c).unwrap();
        let u = v1.first_url(Some(1_767_256_872_000));
        assert!(!u.contains("managementState"));
        assert!(
            u.starts_with("https://graph.example/v1.0/deviceManagement/managedDevices?$select=id,")
        );
        assert!(u.ends_with("&$filter=lastSyncDateTime%20ge%202026-01-01T08:41:12Z"));
        assert!(u.parse::<http::Uri>().is_ok());
    }
}
