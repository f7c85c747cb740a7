//! `[policy] audit.format = "ocsf"`: the audit log of a real proxy, fed real
//! requests (allow, deny, step-up), holds OCSF 1.8.0 HTTP Activity events
//! that carry every attribute the schema requires for that class and for
//! each object present (tests/data/ocsf/http_activity-1.8.0.json, encoded from
//! ocsf/ocsf-schema tag 1.8.0), with enum values the schema defines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use http::StatusCode;
use serde_json::Value;

const ISS: &str = "https://idp.test";

const POLICIES: &str = r#"
@id("low-open")
@reason("low routes are open")
permit (principal is User, action, resource)
when { context.route.sensitivity == "low" };

@id("high-step-up")
@action("step_up")
@acr("urn:portcullis:acr:mfa")
@max_age("300")
@reason("high routes need a fresh MFA")
permit (principal is User, action, resource)
when { context.route.sensitivity == "high" };
"#;

fn lookup<'a>(ev: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(ev, |v, k| v.get(k))
}

fn present(v: &Value, key: &str) -> bool {
    v.get(key).is_some_and(|x| !x.is_null())
}

/// Every violation of the encoded 1.8.0 rules in one event.
fn violations(ev: &Value, rules: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let check = |obj: &Value, rule: &Value, at: &str, out: &mut Vec<String>| {
        for r in rule["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !present(obj, r) {
                out.push(format!("{at}: required `{r}` missing"));
            }
        }
        for group in rule["at_least_one"].as_array().into_iter().flatten() {
            let names: Vec<&str> = group
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            if !names.iter().any(|n| present(obj, n)) {
                out.push(format!("{at}: needs at least one of {names:?}"));
            }
        }
    };
    check(ev, &rules["event"], "event", &mut out);
    for (path, rule) in rules["objects"].as_object().unwrap() {
        if let Some(obj) = lookup(ev, path) {
            assert!(obj.is_object(), "{path} is not an object");
            check(obj, rule, path, &mut out);
        }
    }
    for (path, allowed) in rules["enums"].as_object().unwrap() {
        if let Some(v) = lookup(ev, path)
            && !allowed.as_array().unwrap().contains(v)
        {
            out.push(format!("{path}: {v} is not a 1.8.0 enum value"));
        }
    }
    if ev["class_uid"] != rules["class_uid"] || ev["category_uid"] != rules["category_uid"] {
        out.push("not HTTP Activity (4002) in Network Activity (4)".into());
    }
    // Producers must compute type_uid = class_uid * 100 + activity_id.
    let (c, a, t) = (
        ev["class_uid"].as_u64(),
        ev["activity_id"].as_u64(),
        ev["type_uid"].as_u64(),
    );
    if let (Some(c), Some(a), Some(t)) = (c, a, t)
        && c * 100 + a != t
    {
        out.push(format!("type_uid {t} != {c} * 100 + {a}"));
    }
    if ev["metadata"]["version"] != rules["schema_version"] {
        out.push("metadata.version is not the schema version".into());
    }
    if !ev["time"].is_u64() {
        out.push("time is not epoch milliseconds".into());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocsf_audit_events_carry_every_required_attribute() {
    let rules: Value =
        serde_json::from_str(include_str!("data/ocsf/http_activity-1.8.0.json")).unwrap();
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let key = pki.issuer_key("user-1");
    pki.policy_dir("test.cedar", POLICIES);
    let audit = pki.path().join("audit.ocsf.jsonl");
    let u = upstream.url();
    let mut routes = String::new();
    for (name, sens) in [("low", "low"), ("high", "high"), ("crit", "critical")] {
        routes.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{u}\"\nsensitivity = \"{sens}\"\nauth = \"bearer\"\n\n"
        ));
    }
    let text = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes).replace(
        "[log]",
        &format!(
            "[policy]\ndir = \"policies\"\naudit = {{ path = \"{}\", sample_allow = 1.0, format = \"ocsf\" }}\n\n[log]",
            audit.display()
        ),
    );
    let cfg = pki.write_config("p.toml", &text);
    let server = portcullis::server::start(cfg).await.unwrap();
    let c = client(&pki.ca_pem, false);
    let token = key.sign(&claims(ISS, "alice")).unwrap();
    let base = format!("https://localhost:{}", server.proxy_addr.port());

    let (st, _, _) = get(&c, &format!("{base}/low/page?x=1"), Some(&token), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = get(&c, &format!("{base}/high/report"), Some(&token), &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = get(&c, &format!("{base}/crit/ledger"), Some(&token), &[]).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(
        upstream.count(),
        1,
        "only the allowed request reached the app"
    );

    let mut lines = Vec::new();
    wait_until("three OCSF events", || {
        lines = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() >= 3
    })
    .await;
    server.shutdown().await;

    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON event"))
        .collect();
    for ev in &events {
        let v = violations(ev, &rules);
        assert!(v.is_empty(), "{v:#?}\n{ev:#}");
    }
    let by_route = |r: &str| {
        events
            .iter()
            .find(|e| e["dst_endpoint"]["svc_name"] == r)
            .unwrap_or_else(|| panic!("no event for {r}"))
    };
    let allow = by_route("low");
    assert_eq!(allow["activity_id"], 3, "GET");
    assert_eq!(allow["type_uid"], 400_203);
    assert_eq!(allow["action_id"], 1);
    assert_eq!(allow["disposition_id"], 1);
    assert_eq!(allow["status_id"], 1);
    assert_eq!(allow["policy"]["uid"], "low-open");
    assert_eq!(allow["actor"]["user"]["uid"], "alice");
    assert_eq!(
        allow["http_request"]["url"]["path"], "/low/page",
        "path without the query"
    );
    assert_eq!(allow["http_request"]["url"]["hostname"], "localhost");
    assert_eq!(allow["src_endpoint"]["ip"], "127.0.0.1");
    assert_eq!(allow["unmapped"]["portcullis"]["action"], "allow");

    let step = by_route("high");
    assert_eq!(
        (step["action_id"].as_u64(), step["disposition_id"].as_u64()),
        (Some(2), Some(23))
    );
    assert_eq!(step["authorizations"][0]["policy"]["uid"], "high-step-up");

    let deny = by_route("crit");
    assert_eq!(
        (deny["action_id"].as_u64(), deny["disposition_id"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(deny["status_id"], 2);
    assert_eq!(deny["severity_id"], 3);
}

/// The validator itself catches what it should.
#[test]
fn the_validator_rejects_incomplete_events() {
    let rules: Value =
        serde_json::from_str(include_str!("data/ocsf/http_activity-1.8.0.json")).unwrap();
    let ev = serde_json::json!({
        "class_uid": 4002, "category_uid": 4, "activity_id": 3, "type_uid": 400204,
        "time": 1, "severity_id": 1,
        "metadata": { "version": "1.8.0", "product": {} },
        "device": { "uid": "d" },
        "http_request": { "url": {} },
    });
    let v = violations(&ev, &rules);
    for needle in [
        "type_uid",
        "metadata.product",
        "device: required `type_id`",
        "http_request.url",
        "dst_endpoint",
    ] {
        assert!(
            v.iter().any(|m| m.contains(needle)),
            "{needle} not reported: {v:#?}"
        );
    }
}
