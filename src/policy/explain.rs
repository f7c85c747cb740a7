//! Explain: why a principal / device / route would be decided the way it is
//! now — the inputs built from the live snapshot, every matching policy, and
//! the decision. Served at `GET /admin/v1/explain` (admin token) and printed
//! by `portcullis explain`. Never enforces, never caches, never audits.

use std::collections::HashMap;
use std::net::IpAddr;

use super::facts::{Inputs, RequestFacts};
use super::{Engine, MethodClass};
use crate::config::Config;
use crate::posture::Posture;

/// Parses `a=b&c=d` (percent-decoded values).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| {
            let v = v.replace('+', " ");
            Some((k.to_owned(), crate::util::percent_decode(&v)?))
        })
        .collect()
}

/// Explains the decision for the facts in `q`: `subject` and `route`
/// (required), `device`, `method` (GET), `ip` (127.0.0.1), and token facts
/// `acr`, `amr` (comma-separated), `auth_age_s`, `token_age_s`, `binding`,
/// `client_id`, `issuer`.
pub fn explain(
    engine: &Engine,
    posture: &Posture,
    cfg: &Config,
    q: &HashMap<String, String>,
) -> Result<serde_json::Value, String> {
    let subject = q
        .get("subject")
        .filter(|s| !s.is_empty())
        .ok_or("`subject` is required")?;
    let route_name = q.get("route").ok_or("`route` is required")?;
    let route = cfg
        .routes
        .iter()
        .find(|r| &r.name == route_name)
        .ok_or_else(|| format!("no route named `{route_name}`"))?;
    let method = q.get("method").map_or("GET", String::as_str);
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("`{method}` is not a method"))?;
    let ip: IpAddr = q
        .get("ip")
        .map_or("127.0.0.1", String::as_str)
        .parse()
        .map_err(|_| "`ip` is not an address")?;
    let num = |k: &str, d: u64| -> Result<u64, String> {
        q.get(k).map_or(Ok(d), |v| {
            v.parse().map_err(|_| format!("`{k}` must be a number"))
        })
    };
    let now = crate::util::now_unix();
    let auth_age = num("auth_age_s", 0)?;
    let token_age = num("token_age_s", 0)?;
    let mut claims = serde_json::json!({
        "sub": subject, "iss": "", "exp": now + 60,
        "iat": now.saturating_sub(token_age), "auth_time": now.saturating_sub(auth_age),
    });
    for k in ["acr", "client_id"] {
        if let Some(v) = q.get(k) {
            claims[k] = v.clone().into();
        }
    }
    if let Some(a) = q.get("amr") {
        claims["amr"] = a
            .split(',')
            .filter(|x| !x.is_empty())
            .collect::<Vec<_>>()
            .into();
    }
    let claims: crate::claims::Claims =
        serde_json::from_value(claims).map_err(|e| e.to_string())?;
    let issuer = q
        .get("issuer")
        .cloned()
        .or_else(|| cfg.issuers.first().map(|i| i.name.clone()))
        .unwrap_or_default();
    let resolved = posture.resolve(
        subject,
        q.get("device")
            .map(String::as_str)
            .filter(|d| !d.is_empty()),
    );
    let owner = resolved
        .identity
        .as_ref()
        .and_then(|i| i.owner.as_deref())
        .and_then(|o| posture.snapshot().identity(o));
    let binding = q.get("binding").map_or("none", String::as_str);
    if !["none", "mtls", "dpop"].contains(&binding) {
        return Err("`binding` is one of none, mtls, dpop".into());
    }
    let facts = RequestFacts {
        claims: &claims,
        issuer: &issuer,
        resolved: &resolved,
        owner,
        route: &route.name,
        sensitivity: route.sensitivity,
        workloads: &route.workloads,
        method: MethodClass::of(&method),
        peer: ip,
        zone: engine.zone(ip),
        binding,
        spiffe_id: None,
        session_binding: None,
    };
    let inputs = Inputs::from_request(&facts, &engine.settings.limits, now);
    let (decision, matched) = engine.set.evaluate_detailed(&inputs);
    let shadow = engine
        .shadow
        .as_ref()
        .map(|s| serde_json::json!({"policy_version": s.version, "decision": s.evaluate(&inputs)}));
    Ok(serde_json::json!({
        "decision": decision,
        "summary": decision.summary(),
        "matched": matched.iter().map(|m| serde_json::json!({
            "id": m.id, "action": m.action, "reason": m.reason, "file": m.file, "line": m.line,
        })).collect::<Vec<_>>(),
        "policy_version": engine.set.version,
        "snapshot_version": resolved.snapshot_version,
        "shadow": shadow,
        "inputs": inputs,
    }))
}
