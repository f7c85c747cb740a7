//! The decision's inputs: every fact a policy can read, as one plain,
//! serialisable value ([`Inputs`]). The proxy builds it from the request and
//! the snapshot ([`Inputs::from_request`]); `policy test` files and audit
//! lines carry it as data, so a decision can be tested and replayed exactly.
//!
//! INVARIANT: [`Inputs::context`] produces exactly the `RequestContext`
//! record of `config/policies/portcullis.cedarschema` (checked by a test
//! against the schema).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Context, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use serde::{Deserialize, Serialize};

use crate::claims::Claims;
use crate::posture::Resolved;
use crate::posture::model::{
    Identity, IdentityKind, IdentityStatus, Ownership, Threat, compliance_name, lifecycle_name,
};

pub use crate::config::parsed::{OTHER_ZONE, parse_cidr};

/// Ages and day counts that are unknown: larger than any limit, so a policy
/// comparing them with a maximum fails closed.
pub const UNKNOWN: i64 = i64::MAX;

/// The HTTP method class, which is the Cedar action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodClass {
    /// GET, HEAD, OPTIONS.
    #[default]
    Read,
    /// Everything else.
    Write,
}

impl MethodClass {
    /// The class of an HTTP method.
    pub fn of(m: &http::Method) -> Self {
        if m == http::Method::GET || m == http::Method::HEAD || m == http::Method::OPTIONS {
            Self::Read
        } else {
            Self::Write
        }
    }

    /// `read` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// Person or non-human identity: the Cedar principal type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// `User`.
    #[default]
    User,
    /// `Workload`.
    Workload,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Principal {
    /// `user` or `workload`.
    pub kind: PrincipalKind,
    /// The canonical subject (or workload id).
    pub id: String,
}

impl Default for Principal {
    fn default() -> Self {
        Self {
            kind: PrincipalKind::User,
            id: "alice@example.com".into(),
        }
    }
}

/// `context.route`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteFacts {
    /// Route name (also the resource id: `App::"<name>"`).
    pub name: String,
    /// `low` / `medium` / `high` / `critical`.
    pub sensitivity: String,
}

impl Default for RouteFacts {
    fn default() -> Self {
        Self {
            name: "app".into(),
            sensitivity: "medium".into(),
        }
    }
}

/// `context.device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct DeviceFacts {
    pub id: String,
    pub known: bool,
    pub managed: bool,
    pub ownership: String,
    pub state: String,
    pub compliant: bool,
    pub compliance: String,
    pub patch_behind: bool,
    pub compromised: bool,
    pub threat: String,
    pub os_version: String,
    pub last_seen_age_s: i64,
    pub source: String,
    pub posture_age_s: i64,
    /// `posture_age_s > limits.posture_max_age_s` (standards §6.4 `stale`).
    pub stale: bool,
}

impl Default for DeviceFacts {
    /// A managed, compliant corporate laptop heard from a minute ago.
    fn default() -> Self {
        Self {
            id: "laptop-1".into(),
            known: true,
            managed: true,
            ownership: "corporate".into(),
            state: "enrolled".into(),
            compliant: true,
            compliance: "compliant".into(),
            patch_behind: false,
            compromised: false,
            threat: "none".into(),
            os_version: String::new(),
            last_seen_age_s: 60,
            source: "mdm".into(),
            posture_age_s: 60,
            stale: false,
        }
    }
}

/// `context.identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct IdentityFacts {
    pub known: bool,
    pub status: String,
    pub kind: String,
    pub groups: Vec<String>,
    pub entitlements: Vec<String>,
    pub contract_days_left: i64,
    pub risk: String,
}

impl Default for IdentityFacts {
    /// An active employee.
    fn default() -> Self {
        Self {
            known: true,
            status: "active".into(),
            kind: "human".into(),
            groups: Vec::new(),
            entitlements: Vec::new(),
            contract_days_left: UNKNOWN,
            risk: "none".into(),
        }
    }
}

/// `context.auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct AuthFacts {
    pub issuer: String,
    pub acr: String,
    pub amr: Vec<String>,
    pub auth_age_s: i64,
    pub token_age_s: i64,
    pub binding: String,
    pub client_id: String,
}

impl Default for AuthFacts {
    /// A plain bearer token issued and authenticated a minute ago.
    fn default() -> Self {
        Self {
            issuer: "idp".into(),
            acr: String::new(),
            amr: Vec::new(),
            auth_age_s: 60,
            token_age_s: 60,
            binding: "none".into(),
            client_id: String::new(),
        }
    }
}

/// `context.network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct NetworkFacts {
    pub ip: String,
    pub zone: String,
}

impl Default for NetworkFacts {
    fn default() -> Self {
        Self {
            ip: "127.0.0.1".into(),
            zone: OTHER_ZONE.into(),
        }
    }
}

/// `context.workload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct WorkloadFacts {
    pub id: String,
    pub allowed: bool,
    pub owner: String,
    pub owner_active: bool,
}

/// `context.time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct TimeFacts {
    pub now_s: i64,
    pub hour_utc: i64,
    pub weekday_utc: i64,
}

impl TimeFacts {
    /// The facts for a Unix time.
    pub fn at(now_s: u64) -> Self {
        let days = now_s / 86_400;
        Self {
            now_s: i64::try_from(now_s).unwrap_or(UNKNOWN),
            hour_utc: ((now_s % 86_400) / 3600) as i64,
            // 1970-01-01 was a Thursday (3 with Monday = 0).
            weekday_utc: ((days + 3) % 7) as i64,
        }
    }
}

impl Default for TimeFacts {
    /// 2026-01-01T00:00:00Z.
    fn default() -> Self {
        Self::at(1_767_225_600)
    }
}

/// `context.limits`, from the `[policy]` config table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct Limits {
    pub posture_max_age_s: i64,
    pub workload_max_credential_age_s: i64,
    /// `[policy] snapshot_max_age_s`: past it, high and critical routes close.
    pub snapshot_max_age_s: i64,
}

/// `context.snapshot`: how fresh this replica's picture is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct SnapshotFacts {
    /// Seconds since the replica was last in sync with the cluster (0 when
    /// in sync, and always 0 with the embedded store).
    pub age_s: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            posture_max_age_s: crate::config::DEFAULT_POSTURE_MAX_AGE_S as i64,
            workload_max_credential_age_s: crate::config::DEFAULT_WORKLOAD_MAX_CREDENTIAL_AGE_S
                as i64,
            snapshot_max_age_s: crate::config::DEFAULT_SNAPSHOT_MAX_AGE_S as i64,
        }
    }
}

/// Everything one decision reads. The default is a healthy request: an
/// active employee on a managed, compliant laptop reading a medium route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct Inputs {
    pub principal: Principal,
    /// The Cedar action: `read` or `write`.
    pub action: MethodClass,
    pub route: RouteFacts,
    pub device: DeviceFacts,
    pub identity: IdentityFacts,
    pub auth: AuthFacts,
    pub network: NetworkFacts,
    pub workload: WorkloadFacts,
    pub time: TimeFacts,
    pub limits: Limits,
    pub session: SessionFacts,
    pub snapshot: SnapshotFacts,
}

/// `context.session`: the browser session the request rides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct SessionFacts {
    pub present: bool,
    pub binding: String,
}

impl Default for SessionFacts {
    /// No browser session (a bearer or workload request).
    fn default() -> Self {
        Self {
            present: false,
            binding: "none".into(),
        }
    }
}

/// A named set of CIDR blocks (`[[network.zones]]`).
#[derive(Debug, Clone)]
pub struct Zone {
    /// Zone name.
    pub name: String,
    /// Blocks: network address and prefix length.
    pub blocks: Vec<(IpAddr, u8)>,
}

fn in_block(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The first zone containing `ip`, else [`OTHER_ZONE`].
pub fn zone_of(zones: &[Zone], ip: IpAddr) -> &str {
    zones
        .iter()
        .find(|z| z.blocks.iter().any(|b| in_block(ip, *b)))
        .map_or(OTHER_ZONE, |z| z.name.as_str())
}

fn age_s(now_s: u64, then_s: Option<u64>) -> i64 {
    then_s.map_or(UNKNOWN, |t| {
        i64::try_from(now_s.saturating_sub(t)).unwrap_or(UNKNOWN)
    })
}

fn threat_name(t: Threat) -> &'static str {
    match t {
        Threat::None => "none",
        Threat::Low => "low",
        Threat::Medium => "medium",
        Threat::High => "high",
    }
}

fn ownership_name(o: Ownership) -> &'static str {
    match o {
        Ownership::Corporate => "corporate",
        Ownership::Byod => "byod",
        Ownership::Partner => "partner",
        Ownership::Shared => "shared",
        Ownership::Unknown => "unknown",
    }
}

/// Everything the proxy knows about one request, before it becomes [`Inputs`].
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// The verified token's claims.
    pub claims: &'a Claims,
    /// The name of the issuer that vouched for them.
    pub issuer: &'a str,
    /// Phase 4's lookups.
    pub resolved: &'a Resolved,
    /// The workload's owner record, for workloads with an owner.
    pub owner: Option<Arc<Identity>>,
    /// Route name.
    pub route: &'a str,
    /// Route sensitivity.
    pub sensitivity: crate::config::Sensitivity,
    /// The route's workload allow-list.
    pub workloads: &'a [String],
    /// Method class.
    pub method: MethodClass,
    /// Client address.
    pub peer: IpAddr,
    /// Network zone of the client address.
    pub zone: &'a str,
    /// Token binding (`none`, `mtls`, `dpop`), see [`auth_facts`].
    pub binding: &'a str,
    /// The SPIFFE id of a workload certificate, when phase 3 verified one.
    pub spiffe_id: Option<&'a str>,
    /// The browser session's binding (`none`, `dbsc`, `mtls`), on browser routes.
    pub session_binding: Option<&'a str>,
}

/// Is this principal a workload? The snapshot says so, or the token is a
/// client-credentials token (`sub` = `client_id`, RFC 9068 §2.2), or a
/// workload certificate authenticated it.
pub fn principal_kind(f: &RequestFacts<'_>) -> PrincipalKind {
    let c = f.claims;
    let by_record = f
        .resolved
        .identity
        .as_ref()
        .is_some_and(|i| i.kind == IdentityKind::Workload);
    if by_record || f.spiffe_id.is_some() || c.client_id.as_deref() == Some(c.sub.as_str()) {
        PrincipalKind::Workload
    } else {
        PrincipalKind::User
    }
}

/// The one place the auth context is built. `binding` comes from phase 3
/// (`none` until token binding runs before this phase).
pub fn auth_facts(c: &Claims, issuer: &str, binding: &str, now_s: u64) -> AuthFacts {
    AuthFacts {
        issuer: issuer.to_owned(),
        acr: c.acr.clone().unwrap_or_default(),
        amr: c.amr.clone().unwrap_or_default(),
        auth_age_s: age_s(now_s, c.auth_time),
        token_age_s: age_s(now_s, c.iat),
        binding: binding.to_owned(),
        client_id: c.client_id.clone().unwrap_or_default(),
    }
}

impl Inputs {
    /// Builds the inputs for a live request at `now_s`.
    pub fn from_request(f: &RequestFacts<'_>, limits: &Limits, now_s: u64) -> Self {
        let r = f.resolved;
        let kind = principal_kind(f);
        let subject = r
            .identity
            .as_ref()
            .map_or(f.claims.sub.as_str(), |i| i.subject.as_str());
        let device = match &r.device {
            Some(d) => {
                let heard_ms = d.updated_ms.max(d.last_check_in_ms.unwrap_or(0));
                DeviceFacts {
                    id: d.id.clone(),
                    known: true,
                    managed: d.lifecycle == crate::posture::model::Lifecycle::Enrolled,
                    ownership: ownership_name(d.ownership).into(),
                    state: lifecycle_name(d.lifecycle).into(),
                    compliant: d.compliance == crate::posture::model::Compliance::Compliant,
                    compliance: compliance_name(d.compliance).into(),
                    patch_behind: d.patch_behind,
                    compromised: d.compromised,
                    threat: threat_name(d.threat).into(),
                    os_version: d.os_version.clone().unwrap_or_default(),
                    last_seen_age_s: age_s(now_s, d.last_check_in_ms.map(|m| m / 1000)),
                    source: d.management_source.clone().unwrap_or_default(),
                    posture_age_s: if heard_ms == 0 {
                        UNKNOWN
                    } else {
                        age_s(now_s, Some(heard_ms / 1000))
                    },
                    stale: false, // set below
                }
            }
            None => DeviceFacts {
                id: r.device_id.clone().unwrap_or_default(),
                known: false,
                managed: false,
                ownership: "unknown".into(),
                state: "unknown".into(),
                compliant: false,
                compliance: "unknown".into(),
                patch_behind: false,
                compromised: false,
                threat: "none".into(),
                os_version: String::new(),
                last_seen_age_s: UNKNOWN,
                source: String::new(),
                posture_age_s: UNKNOWN,
                stale: true,
            },
        };
        let mut device = device;
        device.stale = device.posture_age_s > limits.posture_max_age_s;
        let identity = match &r.identity {
            Some(i) => IdentityFacts {
                known: true,
                status: status_name(i.status).into(),
                kind: match i.kind {
                    IdentityKind::Human => "human",
                    IdentityKind::Workload => "workload",
                }
                .into(),
                groups: i.groups.clone(),
                entitlements: i.entitlements.clone(),
                contract_days_left: i.contract_end_ms.map_or(UNKNOWN, |end| {
                    let diff = i128::from(end / 1000) - i128::from(now_s);
                    i64::try_from(diff.div_euclid(86_400)).unwrap_or(UNKNOWN)
                }),
                risk: threat_name(i.risk).into(),
            },
            None => IdentityFacts {
                known: false,
                status: "unknown".into(),
                kind: match kind {
                    PrincipalKind::User => "human",
                    PrincipalKind::Workload => "workload",
                }
                .into(),
                groups: Vec::new(),
                entitlements: Vec::new(),
                contract_days_left: UNKNOWN,
                risk: "none".into(),
            },
        };
        let workload = if kind == PrincipalKind::Workload {
            let c = f.claims;
            let id = f
                .spiffe_id
                .map(str::to_owned)
                .or_else(|| c.client_id.clone())
                .unwrap_or_else(|| c.sub.clone());
            let candidates = [Some(id.as_str()), c.client_id.as_deref(), Some(&c.sub)];
            let owner = r
                .identity
                .as_ref()
                .and_then(|i| i.owner.clone())
                .unwrap_or_default();
            WorkloadFacts {
                allowed: f
                    .workloads
                    .iter()
                    .any(|w| candidates.iter().flatten().any(|c| *c == w)),
                owner_active: f
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.status == IdentityStatus::Active),
                owner,
                id,
            }
        } else {
            WorkloadFacts::default()
        };
        Inputs {
            principal: Principal {
                kind,
                id: subject.to_owned(),
            },
            action: f.method,
            route: RouteFacts {
                name: f.route.to_owned(),
                sensitivity: f.sensitivity.as_str().into(),
            },
            device,
            identity,
            auth: auth_facts(f.claims, f.issuer, f.binding, now_s),
            network: NetworkFacts {
                ip: f.peer.to_string(),
                zone: f.zone.to_owned(),
            },
            workload,
            time: TimeFacts::at(now_s),
            limits: limits.clone(),
            session: f
                .session_binding
                .map_or_else(SessionFacts::default, |b| SessionFacts {
                    present: true,
                    binding: b.to_owned(),
                }),
            snapshot: SnapshotFacts {
                age_s: i64::try_from(r.snapshot_age_s).unwrap_or(i64::MAX),
            },
        }
    }

    /// The Cedar principal, action and resource.
    pub fn uids(&self, names: &CedarNames) -> (EntityUid, EntityUid, EntityUid) {
        let ty = match self.principal.kind {
            PrincipalKind::User => names.user.clone(),
            PrincipalKind::Workload => names.workload.clone(),
        };
        let principal = EntityUid::from_type_name_and_id(ty, EntityId::new(&self.principal.id));
        let action = match self.action {
            MethodClass::Read => names.read.clone(),
            MethodClass::Write => names.write.clone(),
        };
        let resource =
            EntityUid::from_type_name_and_id(names.app.clone(), EntityId::new(&self.route.name));
        (principal, action, resource)
    }

    /// The whole Cedar context record.
    pub fn context(&self) -> Result<Context, String> {
        self.context_for(&Usage::everything())
    }

    /// The Cedar context, with only the attributes `usage` names.
    pub fn context_for(&self, usage: &Usage) -> Result<Context, String> {
        Context::from_pairs(self.context_pairs(usage)?).map_err(|e| e.to_string())
    }

    /// The context's top-level records, as Cedar expressions.
    pub fn context_pairs(
        &self,
        usage: &Usage,
    ) -> Result<Vec<(String, RestrictedExpression)>, String> {
        fn s(v: &str) -> RestrictedExpression {
            RestrictedExpression::new_string(v.to_owned())
        }
        fn b(v: bool) -> RestrictedExpression {
            RestrictedExpression::new_bool(v)
        }
        fn l(v: i64) -> RestrictedExpression {
            RestrictedExpression::new_long(v)
        }
        fn set(v: &[String]) -> RestrictedExpression {
            RestrictedExpression::new_set(v.iter().map(|x| s(x)))
        }
        // Values are built lazily: only the fields the policies read.
        // INVARIANT: fields come in FIELDS order (`next` walks its bits).
        type Field<'a> = (&'a str, &'a dyn Fn() -> RestrictedExpression);
        let next = std::cell::Cell::new(0usize);
        let rec = |_name: &str, fields: &[Field<'_>]| -> Result<RestrictedExpression, String> {
            let first = next.get();
            next.set(first + fields.len());
            let bits = (usage.mask >> first) & ((1u64 << fields.len()) - 1);
            if bits == 0 {
                return Ok(RestrictedExpression::new_bool(false)); // dropped below
            }
            RestrictedExpression::new_record(
                fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, (k, v))| ((*k).to_owned(), v())),
            )
            .map_err(|e| e.to_string())
        };
        let mut used = [false; 10];
        let d = &self.device;
        let i = &self.identity;
        let a = &self.auth;
        let w = &self.workload;
        let pairs = [
            (
                "device",
                rec(
                    "device",
                    &[
                        ("id", &|| s(&d.id)),
                        ("known", &|| b(d.known)),
                        ("managed", &|| b(d.managed)),
                        ("ownership", &|| s(&d.ownership)),
                        ("state", &|| s(&d.state)),
                        ("compliant", &|| b(d.compliant)),
                        ("compliance", &|| s(&d.compliance)),
                        ("patch_behind", &|| b(d.patch_behind)),
                        ("compromised", &|| b(d.compromised)),
                        ("threat", &|| s(&d.threat)),
                        ("os_version", &|| s(&d.os_version)),
                        ("last_seen_age_s", &|| l(d.last_seen_age_s)),
                        ("source", &|| s(&d.source)),
                        ("posture_age_s", &|| l(d.posture_age_s)),
                        ("stale", &|| b(d.stale)),
                    ],
                )?,
            ),
            (
                "identity",
                rec(
                    "identity",
                    &[
                        ("known", &|| b(i.known)),
                        ("status", &|| s(&i.status)),
                        ("kind", &|| s(&i.kind)),
                        ("groups", &|| set(&i.groups)),
                        ("entitlements", &|| set(&i.entitlements)),
                        ("contract_days_left", &|| l(i.contract_days_left)),
                        ("risk", &|| s(&i.risk)),
                    ],
                )?,
            ),
            (
                "auth",
                rec(
                    "auth",
                    &[
                        ("issuer", &|| s(&a.issuer)),
                        ("acr", &|| s(&a.acr)),
                        ("amr", &|| set(&a.amr)),
                        ("auth_age_s", &|| l(a.auth_age_s)),
                        ("token_age_s", &|| l(a.token_age_s)),
                        ("binding", &|| s(&a.binding)),
                        ("client_id", &|| s(&a.client_id)),
                    ],
                )?,
            ),
            (
                "network",
                rec(
                    "network",
                    &[
                        ("ip", &|| s(&self.network.ip)),
                        ("zone", &|| s(&self.network.zone)),
                    ],
                )?,
            ),
            (
                "route",
                rec(
                    "route",
                    &[
                        ("name", &|| s(&self.route.name)),
                        ("sensitivity", &|| s(&self.route.sensitivity)),
                    ],
                )?,
            ),
            (
                "workload",
                rec(
                    "workload",
                    &[
                        ("id", &|| s(&w.id)),
                        ("allowed", &|| b(w.allowed)),
                        ("owner", &|| s(&w.owner)),
                        ("owner_active", &|| b(w.owner_active)),
                    ],
                )?,
            ),
            (
                "time",
                rec(
                    "time",
                    &[
                        ("now_s", &|| l(self.time.now_s)),
                        ("hour_utc", &|| l(self.time.hour_utc)),
                        ("weekday_utc", &|| l(self.time.weekday_utc)),
                    ],
                )?,
            ),
            (
                "limits",
                rec(
                    "limits",
                    &[
                        ("posture_max_age_s", &|| l(self.limits.posture_max_age_s)),
                        ("workload_max_credential_age_s", &|| {
                            l(self.limits.workload_max_credential_age_s)
                        }),
                        ("snapshot_max_age_s", &|| l(self.limits.snapshot_max_age_s)),
                    ],
                )?,
            ),
            (
                "session",
                rec(
                    "session",
                    &[
                        ("present", &|| b(self.session.present)),
                        ("binding", &|| s(&self.session.binding)),
                    ],
                )?,
            ),
            (
                "snapshot",
                rec("snapshot", &[("age_s", &|| l(self.snapshot.age_s))])?,
            ),
        ];
        let mut first = 0;
        for (i, (name, _)) in pairs.iter().enumerate() {
            let n = FIELDS.iter().filter(|(r, _)| r == name).count();
            used[i] = (usage.mask >> first) & ((1u64 << n) - 1) != 0;
            first += n;
        }
        Ok(pairs
            .into_iter()
            .zip(used)
            .filter(|(_, u)| *u)
            .map(|((k, v), _)| (k.to_owned(), v))
            .collect())
    }
}

fn status_name(s: IdentityStatus) -> &'static str {
    match s {
        IdentityStatus::Active => "active",
        IdentityStatus::Suspended => "suspended",
        IdentityStatus::Terminated => "terminated",
    }
}

/// Every context attribute, in the order [`Inputs::context_pairs`] builds
/// them (a test checks the two agree).
pub const FIELDS: &[(&str, &str)] = &[
    ("device", "id"),
    ("device", "known"),
    ("device", "managed"),
    ("device", "ownership"),
    ("device", "state"),
    ("device", "compliant"),
    ("device", "compliance"),
    ("device", "patch_behind"),
    ("device", "compromised"),
    ("device", "threat"),
    ("device", "os_version"),
    ("device", "last_seen_age_s"),
    ("device", "source"),
    ("device", "posture_age_s"),
    ("device", "stale"),
    ("identity", "known"),
    ("identity", "status"),
    ("identity", "kind"),
    ("identity", "groups"),
    ("identity", "entitlements"),
    ("identity", "contract_days_left"),
    ("identity", "risk"),
    ("auth", "issuer"),
    ("auth", "acr"),
    ("auth", "amr"),
    ("auth", "auth_age_s"),
    ("auth", "token_age_s"),
    ("auth", "binding"),
    ("auth", "client_id"),
    ("network", "ip"),
    ("network", "zone"),
    ("route", "name"),
    ("route", "sensitivity"),
    ("workload", "id"),
    ("workload", "allowed"),
    ("workload", "owner"),
    ("workload", "owner_active"),
    ("time", "now_s"),
    ("time", "hour_utc"),
    ("time", "weekday_utc"),
    ("limits", "posture_max_age_s"),
    ("limits", "workload_max_credential_age_s"),
    ("limits", "snapshot_max_age_s"),
    ("session", "present"),
    ("session", "binding"),
    ("snapshot", "age_s"),
];

/// Which context attributes a policy set reads, found at load from the
/// policies' JSON form: only those are built per request (Cedar's cost grows
/// with every value handed to it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bit `i` set: build `FIELDS[i]`.
    mask: u64,
    /// What was found, for `explain` and tests.
    pub paths: std::collections::BTreeSet<String>,
}

impl Usage {
    /// Everything (for tests and the schema check).
    pub fn everything() -> Self {
        Self {
            mask: u64::MAX,
            paths: ["context".to_owned()].into(),
        }
    }

    fn add(&mut self, record: Option<&str>, field: Option<&str>) {
        for (i, (r, f)) in FIELDS.iter().enumerate() {
            if record.is_none_or(|x| x == *r) && field.is_none_or(|x| x == *f) {
                self.mask |= 1 << i;
            }
        }
        let mut p = String::from("context");
        for part in [record, field].into_iter().flatten() {
            p.push('.');
            p.push_str(part);
        }
        self.paths.insert(p);
    }

    /// Adds what one policy (in Cedar's JSON form) reads.
    pub fn add_policy_json(&mut self, v: &serde_json::Value) {
        fn chain(v: &serde_json::Value) -> Option<Vec<String>> {
            if v.get("Var").and_then(|x| x.as_str()) == Some("context") {
                return Some(Vec::new());
            }
            let obj = v.as_object()?;
            if obj.len() != 1 {
                return None;
            }
            let (k, inner) = obj.iter().next()?;
            if k != "." && k != "has" {
                return None;
            }
            let mut p = chain(inner.get("left")?)?;
            p.push(inner.get("attr")?.as_str()?.to_owned());
            Some(p)
        }
        match chain(v) {
            Some(p) => self.add(p.first().map(String::as_str), p.get(1).map(String::as_str)),
            None => match v {
                serde_json::Value::Object(m) => m.values().for_each(|x| self.add_policy_json(x)),
                serde_json::Value::Array(a) => a.iter().for_each(|x| self.add_policy_json(x)),
                _ => {}
            },
        }
    }
}

/// Entity type names and action uids, parsed once.
#[derive(Debug, Clone)]
pub struct CedarNames {
    /// `User`.
    pub user: EntityTypeName,
    /// `Workload`.
    pub workload: EntityTypeName,
    /// `Group`.
    pub group: EntityTypeName,
    /// `App`.
    pub app: EntityTypeName,
    /// `Action::"read"`.
    pub read: EntityUid,
    /// `Action::"write"`.
    pub write: EntityUid,
}

impl CedarNames {
    /// Parses the names (they are constants; failure is a bug caught by tests).
    pub fn new() -> Result<Self, String> {
        let ty = |s: &str| EntityTypeName::from_str(s).map_err(|e| e.to_string());
        let act = |s: &str| EntityUid::from_str(s).map_err(|e| e.to_string());
        Ok(Self {
            user: ty("User")?,
            workload: ty("Workload")?,
            group: ty("Group")?,
            app: ty("App")?,
            read: act(r#"Action::"read""#)?,
            write: act(r#"Action::"write""#)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn zones_match_v4_v6_and_mapped_addresses() {
        let zones = vec![
            Zone {
                name: "office".into(),
                blocks: vec![parse_cidr("10.1.0.0/16").unwrap()],
            },
            Zone {
                name: "v6".into(),
                blocks: vec![parse_cidr("2001:db8::/32").unwrap()],
            },
            Zone {
                name: "loopback".into(),
                blocks: vec![parse_cidr("127.0.0.1").unwrap()],
            },
        ];
        let z = |s: &str| zone_of(&zones, s.parse().unwrap()).to_owned();
        assert_eq!(z("10.1.2.3"), "office");
        assert_eq!(z("10.2.0.1"), "other");
        assert_eq!(z("2001:db8::1"), "v6");
        assert_eq!(z("::ffff:10.1.0.9"), "office");
        assert_eq!(z("127.0.0.1"), "loopback");
        assert_eq!(z("127.0.0.2"), "other");
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nope/8").is_none());
        assert_eq!(parse_cidr("0.0.0.0/0").map(|b| b.1), Some(0));
        assert_eq!(
            zone_of(
                &[Zone {
                    name: "all".into(),
                    blocks: vec![parse_cidr("0.0.0.0/0").unwrap()]
                }],
                "8.8.8.8".parse().unwrap()
            ),
            "all"
        );
    }

    #[test]
    fn fields_table_matches_the_built_context() {
        let pairs = Inputs::default()
            .context_pairs(&Usage::everything())
            .unwrap();
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        let mut want: Vec<&str> = FIELDS.iter().map(|(r, _)| *r).collect();
        want.dedup();
        assert_eq!(names, want);
        // One field only: exactly that record with exactly that field.
        assert!(FIELDS.len() <= 64);
        for (r, f) in FIELDS {
            let mut u = Usage::default();
            u.add(Some(r), Some(f));
            let ctx = Inputs::default().context_for(&u).unwrap();
            let Some(cedar_policy::EvalResult::Record(rec)) = ctx.get(r) else {
                panic!("{r} missing");
            };
            assert_eq!(rec.len(), 1, "{r}.{f}");
            assert!(rec.get(f).is_some(), "{r}.{f} built as {rec:?}");
        }
    }

    #[test]
    fn time_facts() {
        let t = TimeFacts::default();
        assert_eq!((t.hour_utc, t.weekday_utc), (0, 3)); // 2026-01-01 is a Thursday
        let t = TimeFacts::at(1_767_225_600 + 4 * 86_400 + 13 * 3600);
        assert_eq!((t.hour_utc, t.weekday_utc), (13, 0)); // Monday 13:00
    }
}
