//! Audit records as OCSF events (`[policy] audit.format = "ocsf"`), for a SIEM.
//!
//! The class is **HTTP Activity (4002)**, Network Activity category, OCSF
//! 1.8.0, with the `security_control`, `host` and `trace` profiles. Why that
//! class: each record is one HTTP request the proxy decided on, and 4002 is
//! the current class for an HTTP request seen by a proxy (method, URL, client
//! and server endpoints); the `security_control` profile carries the verdict
//! (`action_id`, `disposition_id`, `policy`, `authorizations`). Web Resource
//! Access Activity (6004) names the verdicts directly but is deprecated since
//! OCSF 1.1.0; Authentication (3002) and Authorize Session (3003) describe
//! logins and session entitlements, not per-request decisions; and 3006 is
//! Group Management since 1.0.0 (sessions-and-signals.md §3).
//!
//! The conversion runs on the audit writer thread, never on the request path.
//! The project's own record rides along under `unmapped.portcullis`, so an
//! OCSF line still explains (and can replay) its decision.

use serde_json::{Value, json};

use super::Action;
use super::audit::AuditRecord;
use super::facts::PrincipalKind;

/// The OCSF schema version events declare in `metadata.version`.
pub const OCSF_VERSION: &str = "1.8.0";
/// HTTP Activity.
pub const CLASS_UID: u32 = 4002;
/// Network Activity.
pub const CATEGORY_UID: u32 = 4;

/// HTTP Activity's `activity_id` for a method (99 Other for the rest).
pub fn activity_id(method: &str) -> (u32, &'static str) {
    match method {
        "CONNECT" => (1, "Connect"),
        "DELETE" => (2, "Delete"),
        "GET" => (3, "Get"),
        "HEAD" => (4, "Head"),
        "OPTIONS" => (5, "Options"),
        "POST" => (6, "Post"),
        "PUT" => (7, "Put"),
        "TRACE" => (8, "Trace"),
        "PATCH" => (9, "Patch"),
        _ => (99, "Other"),
    }
}

/// `security_control` verdict: (`action_id`, `disposition_id`, disposition caption).
fn verdict(action: Action, forwarded: bool) -> (u32, u32, &'static str) {
    match (action, forwarded) {
        (Action::Allow | Action::Shorten, true) => (1, 1, "Allowed"),
        // Restrict let a read through: allowed, with a limit.
        (Action::Restrict, true) => (1, 99, "Other"),
        (Action::StepUp, _) => (2, 23, "Challenge"),
        // A session past its cap must authenticate again.
        (Action::Shorten, false) => (2, 23, "Challenge"),
        (Action::Revoke, _) => (2, 24, "Access Revoked"),
        _ => (2, 2, "Blocked"),
    }
}

/// `severity_id`: decisions that refuse or revoke are worth a look.
fn severity(action: Action) -> (u32, &'static str) {
    match action {
        Action::Allow | Action::Shorten | Action::Restrict => (1, "Informational"),
        Action::StepUp => (2, "Low"),
        Action::Deny => (3, "Medium"),
        Action::Revoke => (4, "High"),
    }
}

/// The OCSF HTTP Activity event for one audit record.
pub fn event(rec: &AuditRecord) -> Value {
    let (activity, activity_name) = activity_id(&rec.method);
    let forwarded = rec.enforced == "forwarded";
    let (action_id, disposition_id, disposition) = verdict(rec.action, forwarded);
    let (severity_id, severity_name) = severity(rec.action);
    let inputs = &rec.inputs;
    let policy_uid = rec
        .policy_ids
        .first()
        .cloned()
        .unwrap_or_else(|| "portcullis-default".into());
    let authorizations: Vec<Value> = rec
        .policy_ids
        .iter()
        .map(|id| json!({ "decision": rec.action.as_str(), "policy": { "uid": id, "version": rec.policy_version } }))
        .collect();
    let user = match inputs.principal.kind {
        PrincipalKind::User => json!({ "uid": inputs.principal.id, "type_id": 1, "type": "User" }),
        PrincipalKind::Workload => {
            json!({ "uid": inputs.principal.id, "type_id": 4, "type": "Service" })
        }
    };
    let mut actor = json!({ "user": user });
    if !inputs.auth.issuer.is_empty() {
        actor["idp"] = json!({ "name": inputs.auth.issuer });
    }
    let mut ev = json!({
        "class_uid": CLASS_UID,
        "class_name": "HTTP Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Network Activity",
        "activity_id": activity,
        "activity_name": activity_name,
        "type_uid": CLASS_UID * 100 + activity,
        "type_name": format!("HTTP Activity: {activity_name}"),
        "time": rec.time_ms,
        "severity_id": severity_id,
        "severity": severity_name,
        "status_id": if forwarded { 1 } else { 2 },
        "status": if forwarded { "Success" } else { "Failure" },
        "status_code": rec.action.as_str(),
        "status_detail": rec.reasons.join("; "),
        "message": format!("{} {} {}: {}", rec.method, rec.route, rec.action.as_str(), rec.enforced),
        "action_id": action_id,
        "action": if action_id == 1 { "Allowed" } else { "Denied" },
        "disposition_id": disposition_id,
        "disposition": disposition,
        "policy": { "uid": policy_uid, "version": rec.policy_version, "is_applied": true },
        "authorizations": authorizations,
        "actor": actor,
        "src_endpoint": { "ip": inputs.network.ip },
        "dst_endpoint": { "hostname": rec.host, "svc_name": rec.route },
        "http_request": {
            "http_method": rec.method,
            "uid": rec.request_id,
            "url": { "scheme": "https", "hostname": rec.host, "path": rec.path },
        },
        "metadata": {
            "version": OCSF_VERSION,
            "uid": rec.request_id,
            "log_name": "audit",
            "profiles": ["security_control", "host", "trace"],
            "product": {
                "name": "portcullis",
                "vendor_name": "portcullis",
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
        "unmapped": { "portcullis": rec },
    });
    if !rec.device.is_empty() {
        ev["device"] = json!({
            "uid": rec.device,
            "type_id": 0,
            "is_managed": inputs.device.managed,
            "is_compliant": inputs.device.compliant,
        });
    }
    if let Some(t) = &rec.trace_id {
        ev["trace"] = json!({ "uid": t });
    }
    ev
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_reference_table() {
        assert_eq!(verdict(Action::Allow, true), (1, 1, "Allowed"));
        assert_eq!(verdict(Action::Restrict, true).1, 99);
        assert_eq!(verdict(Action::Restrict, false), (2, 2, "Blocked"));
        assert_eq!(verdict(Action::StepUp, false).1, 23);
        assert_eq!(verdict(Action::Deny, false).1, 2);
        assert_eq!(verdict(Action::Revoke, false).1, 24);
        assert_eq!(activity_id("PATCH").0, 9);
        assert_eq!(activity_id("PROPFIND").0, 99);
    }
}
