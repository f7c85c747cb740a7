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
pub mod ocsf;
pub mod replay;
pub mod testing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cedar_policy::{Authorizer, Decision as CedarDecision, Entities, PolicyId, PolicySet, Schema};
use serde::{Deserialize, Serialize};

pub use engine::{Decided, Engine, Outcome, PolicyHandle, Settings};
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
    /// The policies that can match a `User` / a `Workload` principal.
    by_kind: [PolicySet; 2],
    /// The context attributes those policies read.
    usage: [facts::Usage; 2],
    /// Some policy names a `Group` (so the principal's groups become parents).
    uses_groups: bool,
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
        let names = facts::CedarNames::new()?;
        let mut by_kind = [PolicySet::new(), PolicySet::new()];
        let mut usage = [facts::Usage::default(), facts::Usage::default()];
        let mut uses_groups = false;
        for p in set.policies() {
            let json = p.to_json().map_err(|e| e.to_string())?;
            uses_groups |= json.to_string().contains("\"Group\"");
            let only = match p.principal_constraint() {
                cedar_policy::PrincipalConstraint::Is(t)
                | cedar_policy::PrincipalConstraint::IsIn(t, _) => Some(t),
                cedar_policy::PrincipalConstraint::Eq(u) => Some(u.type_name().clone()),
                _ => None,
            };
            for (k, ty) in [(0, &names.user), (1, &names.workload)] {
                if only.as_ref().is_none_or(|t| t == ty) {
                    by_kind[k].add(p.clone()).map_err(|e| e.to_string())?;
                    usage[k].add_policy_json(&json);
                }
            }
        }
        Ok(Self {
            by_kind,
            usage,
            uses_groups,
            meta,
            schema,
            names,
            authorizer: Authorizer::new(),
            version,
            files,
        })
    }

    /// The schema the set was validated against.
    pub fn schema(&self) -> &Schema {
        &self.schema
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
        let k = match inputs.principal.kind {
            facts::PrincipalKind::User => 0,
            facts::PrincipalKind::Workload => 1,
        };
        let context = match inputs.context_for(&self.usage[k]) {
            Ok(c) => c,
            Err(e) => {
                return (
                    Decision::deny(format!("policy inputs: {e}"), vec![]),
                    vec![],
                );
            }
        };
        // INVARIANT: `Inputs::context` builds exactly the schema's
        // `RequestContext` (a unit test checks it against the schema), so the
        // per-request schema check — a quarter of an uncached decision — is
        // skipped.
        let request =
            match cedar_policy::Request::new(principal.clone(), action, resource, context, None) {
                Ok(r) => r,
                Err(e) => {
                    return (
                        Decision::deny(format!("policy inputs do not fit the schema: {e}"), vec![]),
                        vec![],
                    );
                }
            };
        let entities = if self.uses_groups
            && inputs.principal.kind == facts::PrincipalKind::User
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
            .is_authorized(&request, &self.by_kind[k], &entities);
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
/// meets counts as allow (as shorten when it carries `@session_ttl`).
fn effective(m: &PolicyMeta, inputs: &Inputs) -> Action {
    if m.action == Action::StepUp {
        let acr_ok = m.acr.is_empty() || m.acr.contains(&inputs.auth.acr);
        let age_ok = m.max_age_s.is_none_or(|max| {
            inputs.auth.auth_age_s >= 0 && (inputs.auth.auth_age_s as u64) <= max
        });
        if acr_ok && age_ok {
            // Met; with `@session_ttl` the session that follows is capped.
            return if m.session_ttl_s.is_some() {
                Action::Shorten
            } else {
                Action::Allow
            };
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::path::Path;

    fn default_set() -> CompiledSet {
        load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies")).unwrap()
    }

    fn set_of(text: &str) -> Result<CompiledSet, LoadError> {
        load::load_sources(&[(PathBuf::from("t.cedar"), text.to_owned())])
    }

    #[test]
    fn the_context_fits_the_schema_for_both_actions_and_principals() {
        // INVARIANT check: Inputs::context builds exactly RequestContext.
        let schema = load::schema().unwrap();
        let names = facts::CedarNames::new().unwrap();
        for kind in [facts::PrincipalKind::User, facts::PrincipalKind::Workload] {
            for action in [MethodClass::Read, MethodClass::Write] {
                let mut i = Inputs::default();
                i.principal.kind = kind;
                i.action = action;
                i.identity.groups = vec!["eng".into()];
                let (p, a, r) = i.uids(&names);
                cedar_policy::Request::new(p, a, r, i.context().unwrap(), Some(&schema)).unwrap();
            }
        }
    }

    #[test]
    fn precedence_is_revoke_deny_step_up_restrict_shorten_allow() {
        let mut order = vec![
            Action::Revoke,
            Action::Allow,
            Action::StepUp,
            Action::Shorten,
            Action::Deny,
            Action::Restrict,
        ];
        order.sort();
        assert_eq!(
            order,
            vec![
                Action::Allow,
                Action::Shorten,
                Action::Restrict,
                Action::StepUp,
                Action::Deny,
                Action::Revoke
            ]
        );
        let set = set_of(
            r#"
            @id("a") permit(principal, action, resource);
            @id("s1") @action("shorten") @session_ttl("600") @reason("s1") permit(principal, action, resource);
            @id("s2") @action("shorten") @session_ttl("300") @reason("s2") permit(principal, action, resource);
            @id("r") @action("restrict") permit(principal, action, resource) when { context.route.sensitivity == "high" };
            "#,
        )
        .unwrap();
        let mut i = Inputs::default();
        let d = set.evaluate(&i);
        assert_eq!(d.action, Action::Shorten);
        assert_eq!(d.policy_ids, vec!["s1", "s2"]);
        assert_eq!(d.reasons, vec!["s1", "s2"]);
        assert_eq!(d.session_ttl_s, Some(300), "the smallest cap wins");
        i.route.sensitivity = "high".into();
        let d = set.evaluate(&i);
        assert_eq!(
            (d.action, d.policy_ids.clone()),
            (Action::Restrict, vec!["r".into()])
        );
        assert_eq!(
            d.reasons,
            vec!["policy `r`"],
            "default reason names the policy"
        );
    }

    #[test]
    fn no_match_denies_and_forbid_beats_every_permit() {
        let set = set_of(r#"@id("only-high") permit(principal, action, resource) when { context.route.sensitivity == "high" };"#).unwrap();
        let d = set.evaluate(&Inputs::default());
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.reasons, vec![NO_MATCH]);
        assert!(d.policy_ids.is_empty());
        let set = set_of(
            r#"@id("p") @action("revoke") @revoke("device") permit(principal, action, resource);
               @id("f") @reason("no") forbid(principal, action, resource);"#,
        )
        .unwrap();
        let d = set.evaluate(&Inputs::default());
        assert_eq!(
            (d.action, d.policy_ids, d.reasons),
            (Action::Deny, vec!["f".into()], vec!["no".into()])
        );
    }

    #[test]
    fn step_up_combines_acr_values_and_the_smallest_max_age_and_is_met_by_the_token() {
        let set = set_of(
            r#"@id("x") @action("step_up") @acr("urn:a urn:b") @max_age("600") permit(principal, action, resource);
               @id("y") @action("step_up") @acr("urn:b urn:c") @max_age("300") permit(principal, action, resource);"#,
        )
        .unwrap();
        let mut i = Inputs::default();
        let d = set.evaluate(&i);
        assert_eq!(d.action, Action::StepUp);
        assert_eq!(d.acr_values, vec!["urn:a", "urn:b", "urn:c"]);
        assert_eq!(d.max_age_s, Some(300));
        i.auth.acr = "urn:b".into();
        i.auth.auth_age_s = 299;
        assert_eq!(set.evaluate(&i).action, Action::Allow);
        i.auth.auth_age_s = 301;
        let d = set.evaluate(&i);
        assert_eq!(
            (d.action, d.policy_ids.clone()),
            (Action::StepUp, vec!["y".into()])
        );
        i.auth.auth_age_s = facts::UNKNOWN;
        assert_eq!(set.evaluate(&i).action, Action::StepUp);
    }

    #[test]
    fn the_step_up_challenge_has_the_rfc_9470_syntax() {
        let r = PolicyRefusal::StepUp {
            reason: "needs \"mfa\"".into(),
            acr_values: vec!["urn:a".into(), "urn:b".into()],
            max_age_s: Some(300),
        };
        assert_eq!(
            r.challenge().unwrap(),
            r#"Bearer error="insufficient_user_authentication", error_description="needs mfa", acr_values="urn:a urn:b", max_age=300"#
        );
        let r = PolicyRefusal::StepUp {
            reason: "x".into(),
            acr_values: vec![],
            max_age_s: Some(60),
        };
        assert_eq!(
            r.challenge().unwrap(),
            r#"Bearer error="insufficient_user_authentication", error_description="x", max_age=60"#
        );
        assert!(
            PolicyRefusal::Denied { reason: "x".into() }
                .challenge()
                .is_none()
        );
    }

    #[test]
    fn annotations_are_checked_at_load() {
        let bad = [
            (
                r#"@action("maybe") permit(principal, action, resource);"#,
                "is not one of",
            ),
            (
                r#"@action("step_up") permit(principal, action, resource);"#,
                "needs `@acr",
            ),
            (
                r#"@action("shorten") permit(principal, action, resource);"#,
                "needs `@session_ttl",
            ),
            (
                r#"@action("shorten") @session_ttl("soon") permit(principal, action, resource);"#,
                "whole number",
            ),
            (
                r#"@action("revoke") permit(principal, action, resource);"#,
                "needs `@revoke",
            ),
            (
                r#"@action("revoke") @revoke("laptop") permit(principal, action, resource);"#,
                "`laptop`",
            ),
            (
                r#"@acr("urn:x") permit(principal, action, resource);"#,
                "only applies",
            ),
            (
                r#"@action("allow") forbid(principal, action, resource);"#,
                "always denies",
            ),
            (
                r#"@reasn("x") permit(principal, action, resource);"#,
                "unknown annotation `@reasn`",
            ),
            (
                r#"@id("d") permit(principal, action, resource); @id("d") permit(principal, action, resource);"#,
                "duplicate policy id `d`",
            ),
            (
                r#"permit(principal == ?principal, action, resource);"#,
                "templates",
            ),
        ];
        for (text, want) in bad {
            let err = set_of(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.starts_with("t.cedar"), "{err}");
        }
        let ok = set_of(r#"permit(principal, action, resource);"#).unwrap();
        assert_eq!(ok.policies()[0].id, "t.cedar:1");
    }

    #[test]
    fn an_evaluation_error_fails_closed() {
        // Validation rejects most errors; overflow is a run-time one.
        let set = set_of(
            r#"@id("allow") permit(principal, action, resource);
               @id("overflow") @action("restrict") permit(principal, action, resource)
               when { context.auth.token_age_s + 1 > 0 };"#,
        )
        .unwrap();
        let mut i = Inputs::default();
        assert_eq!(set.evaluate(&i).action, Action::Restrict);
        i.auth.token_age_s = facts::UNKNOWN; // i64::MAX + 1 overflows
        let d = set.evaluate(&i);
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.policy_ids, vec!["overflow"]);
    }

    #[test]
    fn the_default_set_loads_with_stable_ids() {
        let set = default_set();
        let ids: Vec<String> = set.policies().iter().map(|m| m.id.clone()).collect();
        for want in [
            "managed-compliant",
            "noncompliant-restrict",
            "noncompliant-step-up",
            "noncompliant-deny-critical",
            "device-compromised-revoke",
            "unmanaged-step-up",
            "unmanaged-deny-sensitive",
            "leaver-revoke",
            "contract-ended",
            "workload-allowed",
        ] {
            assert!(ids.iter().any(|i| i == want), "{want} missing: {ids:?}");
        }
        assert_eq!(set.version.len(), 12);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod probe {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing probe for optimisation work; run with --release --nocapture"]
    fn probe() {
        let set =
            load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies"))
                .unwrap();
        let mut i = Inputs::default();
        i.identity.groups = vec!["eng".into(), "staff".into()];
        let n = 20_000;
        let t = |name: &str, f: &mut dyn FnMut()| {
            for _ in 0..1000 {
                f();
            }
            let s = Instant::now();
            for _ in 0..n {
                f();
            }
            println!(
                "{name}: {:.2} µs",
                s.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        };
        t("context pairs (all)", &mut || {
            std::hint::black_box(i.context_pairs(&facts::Usage::everything()).unwrap());
        });
        t("context (used)", &mut || {
            std::hint::black_box(i.context_for(&set.usage[0]).unwrap());
        });
        println!("usage: {:?}", set.usage[0].paths);
        t("context", &mut || {
            std::hint::black_box(i.context().unwrap());
        });
        let (p, a, r) = i.uids(&set.names);
        t("request+schema", &mut || {
            std::hint::black_box(
                cedar_policy::Request::new(
                    p.clone(),
                    a.clone(),
                    r.clone(),
                    i.context().unwrap(),
                    Some(&set.schema),
                )
                .unwrap(),
            );
        });
        t("request no schema", &mut || {
            std::hint::black_box(
                cedar_policy::Request::new(
                    p.clone(),
                    a.clone(),
                    r.clone(),
                    i.context().unwrap(),
                    None,
                )
                .unwrap(),
            );
        });
        let req =
            cedar_policy::Request::new(p.clone(), a.clone(), r.clone(), i.context().unwrap(), None)
                .unwrap();
        let ents = Entities::empty();
        t("authorize (user set)", &mut || {
            std::hint::black_box(set.authorizer.is_authorized(&req, &set.by_kind[0], &ents));
        });
        t("entities", &mut || {
            let user = cedar_policy::Entity::new_no_attrs(
                p.clone(),
                [cedar_policy::EntityUid::from_type_name_and_id(
                    set.names.group.clone(),
                    cedar_policy::EntityId::new("eng"),
                )]
                .into_iter()
                .collect(),
            );
            std::hint::black_box(Entities::from_entities([user], None).unwrap());
        });
        for pol in set.by_kind[0].policies() {
            let mut one = PolicySet::new();
            one.add(pol.clone()).unwrap();
            t(&format!("  {}", pol.id()), &mut || {
                std::hint::black_box(set.authorizer.is_authorized(&req, &one, &ents));
            });
        }
        t("full evaluate", &mut || {
            std::hint::black_box(set.evaluate(&i));
        });
    }
}
