//! Policy: Cedar decides allow / restrict / step-up / shorten / deny / revoke.
//!
//! Semantics (also in `config/policies/README.md`): every `permit` asks for
//! the enforcement its `@action` annotation names (none = allow); `forbid`
//! means deny. The decision is the strongest action among the policies that
//! match — revoke > deny > step_up > restrict > shorten > allow — and carries
//! those policies' ids and `@reason`s. No match denies; an evaluation error
//! denies. A `step_up` policy whose `@acr` / `@max_age` the token already
//! meets counts as allow (RFC 9470: the client stepped up).
//!
//! This room decides; it never answers a client (the proxy's `rescue` does)
//! and never writes state except through `Posture::ingest` (revoke).

pub mod audit;
pub mod engine;
pub mod explain;
pub mod facts;
pub mod load;
pub mod replay;
pub mod testing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cedar_policy::{Authorizer, Decision as CedarDecision, Entities, PolicyId, PolicySet, Schema};
use serde::{Deserialize, Serialize};

pub use engine::{Engine, Outcome, PolicyHandle, Settings};
pub use facts::{Inputs, MethodClass};
pub use load::{LoadError, PolicyError, load_dir};

/// What a decision asks the proxy to do, weakest first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Forward.
    #[default]
    Allow,
    /// Forward, but only tokens younger than the session cap.
    Shorten,
    /// Forward reads only; writes get 403.
    Restrict,
    /// 401 with an RFC 9470 challenge.
    StepUp,
    /// 403.
    Deny,
    /// Deny, and revoke every earlier credential of the subject and/or device.
    Revoke,
}

impl Action {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Shorten => "shorten",
            Self::Restrict => "restrict",
            Self::StepUp => "step_up",
            Self::Deny => "deny",
            Self::Revoke => "revoke",
        }
    }

    /// Parses an `@action` value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Self::Allow,
            "shorten" => Self::Shorten,
            "restrict" => Self::Restrict,
            "step_up" => Self::StepUp,
            "deny" => Self::Deny,
            "revoke" => Self::Revoke,
            _ => return None,
        })
    }
}

/// A policy's annotations, read once at load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyMeta {
    /// `@id`, else `<file>:<line>`.
    pub id: String,
    /// `@action` (`forbid` = deny).
    pub action: Action,
    /// `@acr` values (space-separated in the annotation).
    pub acr: Vec<String>,
    /// `@max_age` in seconds.
    pub max_age_s: Option<u64>,
    /// `@session_ttl` in seconds.
    pub session_ttl_s: Option<u64>,
    /// `@reason`, else `policy \`<id>\``.
    pub reason: String,
    /// `@revoke` names the subject.
    pub revoke_subject: bool,
    /// `@revoke` names the device.
    pub revoke_device: bool,
    /// File name.
    pub file: String,
    /// Line where the policy starts.
    pub line: usize,
}

/// The outcome of evaluating a policy set on some inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The enforcement.
    pub action: Action,
    /// Ids of the policies that made the decision (those at its level).
    pub policy_ids: Vec<String>,
    /// Their reasons, in the same order.
    pub reasons: Vec<String>,
    /// Step-up: acceptable `acr` values, in preference order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acr_values: Vec<String>,
    /// Step-up: the smallest `max_age`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
    /// Shorten: the smallest session cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ttl_s: Option<u64>,
    /// Revoke: what to revoke (`subject`, `device`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoke: Vec<String>,
}

impl Decision {
    fn deny(reason: impl Into<String>, ids: Vec<String>) -> Self {
        Self {
            action: Action::Deny,
            policy_ids: ids,
            reasons: vec![reason.into()],
            ..Self::default()
        }
    }

    /// One line for humans: `restrict (noncompliant-restrict: device is …)`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .policy_ids
            .iter()
            .zip(&self.reasons)
            .map(|(i, r)| format!("{i}: {r}"))
            .collect();
        if parts.is_empty() {
            format!("{} ({})", self.action.as_str(), self.reasons.join("; "))
        } else {
            format!("{} ({})", self.action.as_str(), parts.join("; "))
        }
    }
}

/// The reason given when no policy matches.
pub const NO_MATCH: &str = "no policy permits this request";

/// A validated policy set, ready to evaluate.
pub struct CompiledSet {
    set: PolicySet,
    meta: HashMap<PolicyId, Arc<PolicyMeta>>,
    schema: Arc<Schema>,
    names: facts::CedarNames,
    authorizer: Authorizer,
    /// Content hash of the files (12 hex digits): the policy version.
    pub version: String,
    /// The files it came from.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for CompiledSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledSet")
            .field("version", &self.version)
            .field("policies", &self.meta.len())
            .finish()
    }
}

impl CompiledSet {
    fn new(
        set: PolicySet,
        meta: HashMap<PolicyId, Arc<PolicyMeta>>,
        schema: Arc<Schema>,
        version: String,
        files: Vec<PathBuf>,
    ) -> Result<Self, String> {
        Ok(Self {
            set,
            meta,
            schema,
            names: facts::CedarNames::new()?,
            authorizer: Authorizer::new(),
            version,
            files,
        })
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// True when the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Every policy's annotations, sorted by file and line.
    pub fn policies(&self) -> Vec<Arc<PolicyMeta>> {
        let mut v: Vec<_> = self.meta.values().cloned().collect();
        v.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        v
    }

    /// Evaluates the set on `inputs`. Never fails: anything unexpected denies.
    pub fn evaluate(&self, inputs: &Inputs) -> Decision {
        self.evaluate_detailed(inputs).0
    }

    /// Evaluates and also returns every matching policy (for `explain`).
    pub fn evaluate_detailed(&self, inputs: &Inputs) -> (Decision, Vec<Arc<PolicyMeta>>) {
        let (principal, action, resource) = inputs.uids(&self.names);
        let context = match inputs.context() {
            Ok(c) => c,
            Err(e) => {
                return (
                    Decision::deny(format!("policy inputs: {e}"), vec![]),
                    vec![],
                );
            }
        };
        let request = match cedar_policy::Request::new(
            principal.clone(),
            action,
            resource,
            context,
            Some(&self.schema),
        ) {
            Ok(r) => r,
            Err(e) => {
                return (
                    Decision::deny(format!("policy inputs do not fit the schema: {e}"), vec![]),
                    vec![],
                );
            }
        };
        let entities = if inputs.principal.kind == facts::PrincipalKind::User
            && !inputs.identity.groups.is_empty()
        {
            let parents = inputs
                .identity
                .groups
                .iter()
                .map(|g| {
                    cedar_policy::EntityUid::from_type_name_and_id(
                        self.names.group.clone(),
                        cedar_policy::EntityId::new(g),
                    )
                })
                .collect();
            let user = cedar_policy::Entity::new_no_attrs(principal, parents);
            Entities::from_entities([user], None).unwrap_or_else(|_| Entities::empty())
        } else {
            Entities::empty()
        };
        let resp = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        let errored: Vec<String> = resp
            .diagnostics()
            .errors()
            .map(|e| match e {
                cedar_policy::AuthorizationError::PolicyEvaluationError(p) => {
                    p.policy_id().to_string()
                }
            })
            .collect();
        if !errored.is_empty() {
            // Fail closed: a policy that could not be evaluated might have denied.
            return (
                Decision::deny(
                    format!("policy evaluation failed in {}", errored.join(", ")),
                    errored,
                ),
                vec![],
            );
        }
        let matched: Vec<Arc<PolicyMeta>> = resp
            .diagnostics()
            .reason()
            .filter_map(|id| self.meta.get(id).cloned())
            .collect();
        if resp.decision() == CedarDecision::Deny {
            if matched.is_empty() {
                return (Decision::deny(NO_MATCH, vec![]), matched);
            }
            let mut d = Decision {
                action: Action::Deny,
                ..Decision::default()
            };
            let mut forbids: Vec<&Arc<PolicyMeta>> = matched.iter().collect();
            forbids.sort_by(|a, b| a.id.cmp(&b.id));
            for m in forbids {
                d.policy_ids.push(m.id.clone());
                d.reasons.push(m.reason.clone());
            }
            return (d, matched);
        }
        (combine(&matched, inputs), matched)
    }
}

/// The effective action of a matching policy: a step-up the token already
/// meets counts as allow.
fn effective(m: &PolicyMeta, inputs: &Inputs) -> Action {
    if m.action == Action::StepUp {
        let acr_ok = m.acr.is_empty() || m.acr.iter().any(|a| *a == inputs.auth.acr);
        let age_ok = m.max_age_s.is_none_or(|max| {
            inputs.auth.auth_age_s >= 0 && (inputs.auth.auth_age_s as u64) <= max
        });
        if acr_ok && age_ok {
            return Action::Allow;
        }
    }
    m.action
}

/// Combines matching permits: the strongest action wins and carries the ids
/// and reasons of the policies at its level.
fn combine(matched: &[Arc<PolicyMeta>], inputs: &Inputs) -> Decision {
    let Some(top) = matched.iter().map(|m| effective(m, inputs)).max() else {
        return Decision::deny(NO_MATCH, vec![]);
    };
    let mut at_top: Vec<&Arc<PolicyMeta>> = matched
        .iter()
        .filter(|m| effective(m, inputs) == top)
        .collect();
    at_top.sort_by(|a, b| a.id.cmp(&b.id));
    let mut d = Decision {
        action: top,
        ..Decision::default()
    };
    let (mut subject, mut device) = (false, false);
    for m in at_top {
        d.policy_ids.push(m.id.clone());
        d.reasons.push(m.reason.clone());
        match top {
            Action::StepUp => {
                for a in &m.acr {
                    if !d.acr_values.contains(a) {
                        d.acr_values.push(a.clone());
                    }
                }
                if let Some(x) = m.max_age_s {
                    d.max_age_s = Some(d.max_age_s.map_or(x, |y| y.min(x)));
                }
            }
            Action::Shorten => {
                if let Some(x) = m.session_ttl_s {
                    d.session_ttl_s = Some(d.session_ttl_s.map_or(x, |y| y.min(x)));
                }
            }
            Action::Revoke => {
                subject |= m.revoke_subject;
                device |= m.revoke_device;
            }
            _ => {}
        }
    }
    if subject {
        d.revoke.push("subject".into());
    }
    if device {
        d.revoke.push("device".into());
    }
    d
}

/// Why a policy decision refused a request (mapped to a response in
/// `proxy::rescue`). Messages are the policies' reasons: safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// `deny` (403).
    #[error("{reason}")]
    Denied {
        /// The policies' reasons.
        reason: String,
    },
    /// `restrict` and the request writes (403).
    #[error("read-only access: {reason}")]
    Restricted {
        /// The policies' reasons.
        reason: String,
    },
    /// `step_up` (401, RFC 9470 challenge).
    #[error("{reason}")]
    StepUp {
        /// The policies' reasons.
        reason: String,
        /// Acceptable `acr` values.
        acr_values: Vec<String>,
        /// Largest acceptable time since authentication.
        max_age_s: Option<u64>,
    },
    /// `shorten` and the token is older than the cap (401).
    #[error("token is older than the {ttl_s} s session limit here; refresh it ({reason})")]
    SessionCapped {
        /// The cap.
        ttl_s: u64,
        /// The policies' reasons.
        reason: String,
    },
    /// `revoke` (401): earlier credentials of the subject / device are revoked.
    #[error("credential revoked: {reason}")]
    Revoked {
        /// The policies' reasons.
        reason: String,
    },
}

impl PolicyRefusal {
    /// Stable code for bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "policy_denied",
            Self::Restricted { .. } => "restricted",
            Self::StepUp { .. } => "insufficient_user_authentication",
            Self::SessionCapped { .. } => "session_expired",
            Self::Revoked { .. } => "revoked",
        }
    }

    /// The decision's action name, for metrics.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Denied { .. } => "deny",
            Self::Restricted { .. } => "restrict",
            Self::StepUp { .. } => "step_up",
            Self::SessionCapped { .. } => "shorten",
            Self::Revoked { .. } => "revoke",
        }
    }

    /// The `WWW-Authenticate` challenge, for the 401s.
    pub fn challenge(&self) -> Option<String> {
        let q = |s: &str| -> String {
            s.chars()
                .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                .collect()
        };
        match self {
            // RFC 9470 §3; max_age is a token (non-negative integer).
            Self::StepUp {
                reason,
                acr_values,
                max_age_s,
            } => {
                let mut c = format!(
                    "Bearer error=\"insufficient_user_authentication\", error_description=\"{}\"",
                    q(reason)
                );
                if !acr_values.is_empty() {
                    c.push_str(&format!(", acr_values=\"{}\"", q(&acr_values.join(" "))));
                }
                if let Some(m) = max_age_s {
                    c.push_str(&format!(", max_age={m}"));
                }
                Some(c)
            }
            Self::SessionCapped { .. } | Self::Revoked { .. } => Some(format!(
                "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"{}\"",
                q(&self.to_string())
            )),
            Self::Denied { .. } | Self::Restricted { .. } => None,
        }
    }
}
