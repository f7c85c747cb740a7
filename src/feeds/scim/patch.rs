//! SCIM PATCH (RFC 7644 §3.5.2) over a resource held as JSON, accepting the
//! shapes Okta and Microsoft Entra really send: `op` in any case, path-less
//! values whose keys are dotted or URN-prefixed paths, value filters in paths
//! (`members[value eq "…"]`, `emails[type eq "work"].value`), and Entra's
//! non-standard remove with a value array.
//!
//! Applying never validates the result: the caller normalises the patched
//! resource exactly like a PUT body, so a PATCH can produce nothing a PUT
//! could not.

use serde_json::{Map, Value};

use super::error::ScimError;
use super::filter::{self, AttrPath, Filter};
use super::resource::{EXTENSIONS, attr_eq, canonical, get_ci, is_multi, key_ci};

/// The PATCH message schema.
pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
/// Most operations in one PATCH.
pub const MAX_OPERATIONS: usize = 1024;

/// A PATCH operation kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `add`.
    Add,
    /// `replace`.
    Replace,
    /// `remove`.
    Remove,
}

/// One operation as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    /// What to do.
    pub op: OpKind,
    /// Where (`None`: the value object names the attributes).
    pub path: Option<String>,
    /// With what.
    pub value: Option<Value>,
}

/// Reads a `PatchOp` message.
pub fn parse_message(body: Value) -> Result<Vec<Operation>, ScimError> {
    let Value::Object(o) = body else {
        return Err(ScimError::invalid_syntax("a PatchOp must be a JSON object"));
    };
    if let Some(s) = get_ci(&o, "schemas") {
        let ok = s.as_array().is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str().is_some_and(|v| attr_eq(v, PATCH_SCHEMA)))
        });
        if !ok {
            return Err(ScimError::invalid_syntax(format!(
                "`schemas` must be [\"{PATCH_SCHEMA}\"]"
            )));
        }
    }
    let Some(Value::Array(ops)) = get_ci(&o, "Operations") else {
        return Err(ScimError::invalid_syntax("`Operations` must be an array"));
    };
    if ops.is_empty() {
        return Err(ScimError::invalid_syntax("`Operations` is empty"));
    }
    if ops.len() > MAX_OPERATIONS {
        return Err(ScimError::invalid_value(format!(
            "more than {MAX_OPERATIONS} operations"
        )));
    }
    ops.iter()
        .map(|op| {
            let Value::Object(op) = op else {
                return Err(ScimError::invalid_syntax("an operation must be an object"));
            };
            let kind = match get_ci(op, "op").and_then(Value::as_str) {
                Some(s) if s.eq_ignore_ascii_case("add") => OpKind::Add,
                Some(s) if s.eq_ignore_ascii_case("replace") => OpKind::Replace,
                Some(s) if s.eq_ignore_ascii_case("remove") => OpKind::Remove,
                Some(s) => {
                    return Err(ScimError::invalid_syntax(format!(
                        "unknown op `{}`",
                        s.chars().take(32).collect::<String>()
                    )));
                }
                None => return Err(ScimError::invalid_syntax("an operation needs `op`")),
            };
            let path = match get_ci(op, "path") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if p.trim().is_empty() => None,
                Some(Value::String(p)) => Some(p.trim().to_owned()),
                Some(_) => return Err(ScimError::invalid_path("`path` must be a string")),
            };
            let value = get_ci(op, "value").filter(|v| !v.is_null()).cloned();
            if kind != OpKind::Remove && value.is_none() {
                return Err(ScimError::invalid_value(
                    "`add` and `replace` need a `value`",
                ));
            }
            Ok(Operation {
                op: kind,
                path,
                value,
            })
        })
        .collect()
}

/// What a resource type protects.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The resource's `id` (a path-less value may repeat it, Okta does).
    pub id: &'a str,
    /// Attributes no operation may touch.
    pub read_only: &'a [&'a str],
}

/// A parsed PATCH path.
#[derive(Debug)]
struct PatchPath {
    attr: AttrPath,
    filter: Option<Filter>,
}

fn parse_path(s: &str, exts: &[&str]) -> Result<PatchPath, ScimError> {
    let bad = |m: &str| ScimError::invalid_path(format!("path `{}`: {m}", clip(s)));
    match s.find('[') {
        None => {
            let attr = filter::parse_attr_path(s, exts).map_err(|e| bad(&e.0))?;
            Ok(PatchPath { attr, filter: None })
        }
        Some(i) => {
            let j = s
                .rfind(']')
                .filter(|j| *j > i)
                .ok_or_else(|| bad("missing `]`"))?;
            let mut attr = filter::parse_attr_path(&s[..i], exts).map_err(|e| bad(&e.0))?;
            if attr.sub.is_some() {
                return Err(bad("a filter follows an attribute, not a sub-attribute"));
            }
            let f = filter::parse(&s[i + 1..j], exts).map_err(|e| bad(&e.0))?;
            match &s[j + 1..] {
                "" => {}
                tail => {
                    let sub = tail
                        .strip_prefix('.')
                        .filter(|t| {
                            filter::parse_attr_path(t, &[])
                                .is_ok_and(|p| p.sub.is_none() && p.urn.is_none())
                        })
                        .ok_or_else(|| bad("expected `.subAttribute` after `]`"))?;
                    attr.sub = Some(sub.to_owned());
                }
            }
            Ok(PatchPath {
                attr,
                filter: Some(f),
            })
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Applies the operations in order to `res`.
pub fn apply(
    res: &mut Map<String, Value>,
    ops: &[Operation],
    rules: Rules<'_>,
) -> Result<(), ScimError> {
    for op in ops {
        let exts = extensions(res);
        let exts: Vec<&str> = exts.iter().map(String::as_str).collect();
        match (&op.path, op.op) {
            (None, OpKind::Remove) => {
                return Err(ScimError::no_target("`remove` needs a `path`"));
            }
            (None, kind) => {
                let Some(Value::Object(v)) = &op.value else {
                    return Err(ScimError::invalid_value(
                        "an operation without `path` needs an object `value`",
                    ));
                };
                for (k, v) in v {
                    if attr_eq(k, "id") {
                        if v.as_str() != Some(rules.id) {
                            return Err(ScimError::mutability("`id` is read-only"));
                        }
                        continue;
                    }
                    if attr_eq(k, "schemas") || attr_eq(k, "meta") {
                        continue;
                    }
                    // `{"urn:…:enterprise:2.0:User": {"department": "…"}}`
                    // names the extension's attributes one by one.
                    if let (Some(ext), Value::Object(inner)) =
                        (exts.iter().find(|e| attr_eq(e, k)), v)
                    {
                        for (ik, iv) in inner {
                            let p = parse_path(&format!("{ext}:{ik}"), &exts)?;
                            apply_one(res, kind, &p, Some(iv), rules)?;
                        }
                        continue;
                    }
                    let p = parse_path(k, &exts)?;
                    apply_one(res, kind, &p, Some(v), rules)?;
                }
            }
            (Some(path), kind) => {
                let p = parse_path(path, &exts)?;
                apply_one(res, kind, &p, op.value.as_ref(), rules)?;
            }
        }
    }
    Ok(())
}

/// Extension schemas known by name or listed in the resource's `schemas`.
fn extensions(res: &Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = EXTENSIONS.iter().map(|s| (*s).to_owned()).collect();
    for s in res
        .get("schemas")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !filter::CORE_SCHEMAS.iter().any(|c| attr_eq(c, s)) && !out.iter().any(|o| attr_eq(o, s))
        {
            out.push(s.to_owned());
        }
    }
    out
}

fn apply_one(
    res: &mut Map<String, Value>,
    kind: OpKind,
    p: &PatchPath,
    value: Option<&Value>,
    rules: Rules<'_>,
) -> Result<(), ScimError> {
    if p.attr.urn.is_none() && rules.read_only.iter().any(|r| attr_eq(r, &p.attr.attr)) {
        return Err(ScimError::mutability(format!(
            "`{}` is read-only",
            p.attr.attr
        )));
    }
    // The object holding the attribute: the resource, or an extension object.
    let container: &mut Map<String, Value> = match &p.attr.urn {
        None => res,
        Some(urn) => {
            let key = key_ci(res, urn).unwrap_or_else(|| canonical(urn));
            if kind == OpKind::Remove && !res.contains_key(&key) {
                return Ok(());
            }
            let slot = res.entry(key).or_insert_with(|| Value::Object(Map::new()));
            match slot {
                Value::Object(o) => o,
                _ => return Err(ScimError::invalid_path(format!("`{urn}` is not an object"))),
            }
        }
    };
    let key = key_ci(container, &p.attr.attr).unwrap_or_else(|| canonical(&p.attr.attr));
    match (&p.filter, &p.attr.sub) {
        (None, None) => whole(container, &key, kind, value),
        (None, Some(sub)) => sub_attr(container, &key, sub, kind, value),
        (Some(f), sub) => filtered(container, &key, f, sub.as_deref(), kind, value),
    }
}

/// Two multi-valued elements are the same when their `value`s are (or, without
/// `value`, when they are equal).
fn same_element(a: &Value, b: &Value) -> bool {
    match (a.get("value"), b.get("value")) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        let key = key_ci(into, k).unwrap_or_else(|| canonical(k));
        into.insert(key, v.clone());
    }
}

fn whole(
    c: &mut Map<String, Value>,
    key: &str,
    kind: OpKind,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    let multi = is_multi(key) || c.get(key).is_some_and(Value::is_array);
    match kind {
        OpKind::Remove => {
            // Entra (legacy): remove named elements given as a value array.
            if let (Some(v), Some(Value::Array(items))) = (value, c.get_mut(key)) {
                let drop: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                items.retain(|e| !drop.iter().any(|d| same_element(e, d)));
            } else {
                c.remove(key);
            }
            Ok(())
        }
        OpKind::Add | OpKind::Replace => {
            let Some(v) = value else {
                return Err(ScimError::invalid_value("missing `value`"));
            };
            if multi {
                let new: Vec<Value> = match v {
                    Value::Array(a) => a.clone(),
                    other => vec![other.clone()],
                };
                if kind == OpKind::Replace {
                    c.insert(key.to_owned(), Value::Array(new));
                    return Ok(());
                }
                let slot = c
                    .entry(key.to_owned())
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Value::Array(items) = slot else {
                    return Err(ScimError::invalid_path(format!(
                        "`{key}` is not multi-valued"
                    )));
                };
                let mut seen: std::collections::HashSet<String> = items
                    .iter()
                    .filter_map(|e| e.get("value").map(Value::to_string))
                    .collect();
                for e in new {
                    let dup = match e.get("value") {
                        Some(v) => !seen.insert(v.to_string()),
                        None => items.contains(&e),
                    };
                    if !dup {
                        items.push(e);
                    }
                }
                return Ok(());
            }
            match (c.get_mut(key), v) {
                (Some(Value::Object(cur)), Value::Object(new)) => merge(cur, new),
                _ => {
                    c.insert(key.to_owned(), v.clone());
                }
            }
            Ok(())
        }
    }
}

fn sub_attr(
    c: &mut Map<String, Value>,
    key: &str,
    sub: &str,
    kind: OpKind,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    let set = |o: &mut Map<String, Value>| {
        let k = key_ci(o, sub).unwrap_or_else(|| canonical(sub));
        match value {
            Some(v) if kind != OpKind::Remove => {
                o.insert(k, v.clone());
            }
            _ => {
                o.remove(&k);
            }
        }
    };
    match c.get_mut(key) {
        None if kind == OpKind::Remove => Ok(()),
        None => {
            let mut o = Map::new();
            set(&mut o);
            let v = if is_multi(key) {
                Value::Array(vec![Value::Object(o)])
            } else {
                Value::Object(o)
            };
            c.insert(key.to_owned(), v);
            Ok(())
        }
        Some(Value::Object(o)) => {
            set(o);
            Ok(())
        }
        Some(Value::Array(items)) => {
            if items.is_empty() && kind != OpKind::Remove {
                let mut o = Map::new();
                set(&mut o);
                items.push(Value::Object(o));
            }
            for e in items.iter_mut() {
                if let Value::Object(o) = e {
                    set(o);
                }
            }
            Ok(())
        }
        Some(_) => Err(ScimError::invalid_path(format!(
            "`{key}` has no sub-attributes"
        ))),
    }
}

fn filtered(
    c: &mut Map<String, Value>,
    key: &str,
    f: &Filter,
    sub: Option<&str>,
    kind: OpKind,
    value: Option<&Value>,
) -> Result<(), ScimError> {
    let is_match = |e: &Value| matches!(e, Value::Object(o) if filter::matches(f, o));
    if kind == OpKind::Remove {
        match c.get_mut(key) {
            None => {}
            Some(Value::Array(items)) => match sub {
                None => items.retain(|e| !is_match(e)),
                Some(sub) => {
                    for e in items.iter_mut().filter(|e| is_match(e)) {
                        if let Value::Object(o) = e
                            && let Some(k) = key_ci(o, sub)
                        {
                            o.remove(&k);
                        }
                    }
                }
            },
            Some(_) => {
                return Err(ScimError::invalid_path(format!(
                    "`{key}` is not multi-valued"
                )));
            }
        }
        return Ok(());
    }
    let Some(v) = value else {
        return Err(ScimError::invalid_value("missing `value`"));
    };
    let slot = c
        .entry(key.to_owned())
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(items) = slot else {
        return Err(ScimError::invalid_path(format!(
            "`{key}` is not multi-valued"
        )));
    };
    let mut hit = false;
    for e in items.iter_mut() {
        if !is_match(e) {
            continue;
        }
        let Value::Object(o) = e else { continue };
        hit = true;
        match (sub, v) {
            (Some(sub), v) => {
                let k = key_ci(o, sub).unwrap_or_else(|| canonical(sub));
                o.insert(k, v.clone());
            }
            (None, Value::Object(new)) => merge(o, new),
            (None, _) => {
                return Err(ScimError::invalid_value(
                    "a filtered path without a sub-attribute needs an object `value`",
                ));
            }
        }
    }
    if hit {
        return Ok(());
    }
    // Nothing matched: `emails[type eq "work"].value` (Entra) creates the
    // element the filter describes; anything else has no target.
    match (sub, filter::equalities(f)) {
        (Some(sub), Some(eqs)) => {
            let mut o = Map::new();
            for (k, val) in eqs {
                o.insert(canonical(&k), val);
            }
            o.insert(canonical(sub), v.clone());
            items.push(Value::Object(o));
            Ok(())
        }
        _ => Err(ScimError::no_target(format!(
            "no `{key}` value matches the filter"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    const RULES: Rules<'static> = Rules {
        id: "u1",
        read_only: &["id", "meta", "groups"],
    };

    fn run(res: Value, msg: Value) -> Result<Value, ScimError> {
        let Value::Object(mut o) = res else { panic!() };
        let ops = parse_message(msg)?;
        apply(&mut o, &ops, RULES)?;
        Ok(Value::Object(o))
    }

    fn msg(ops: Value) -> Value {
        json!({"schemas": [PATCH_SCHEMA], "Operations": ops})
    }

    #[test]
    fn deactivate_shapes() {
        let u = json!({"userName": "a", "active": true});
        for ops in [
            json!([{"op": "replace", "value": {"active": false}}]),
            json!([{"op": "Replace", "path": "active", "value": false}]),
            json!([{"op": "Replace", "path": "active", "value": "False"}]),
            json!([{"op": "REPLACE", "path": "ACTIVE", "value": "False"}]),
        ] {
            let out = run(u.clone(), msg(ops.clone())).unwrap();
            let a = out["active"].clone();
            assert!(a == json!(false) || a == json!("False"), "{ops}: {out}");
        }
    }

    #[test]
    fn dotted_and_urn_keys_in_pathless_values() {
        let out = run(
            json!({"userName": "a", "name": {"givenName": "A", "familyName": "B"}}),
            msg(json!([{"op": "replace", "value": {
                "name.givenName": "Mei",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "42",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "Sales"},
                "id": "u1"}}])),
        )
        .unwrap();
        assert_eq!(out["name"], json!({"givenName": "Mei", "familyName": "B"}));
        let ext = &out["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"];
        assert_eq!(ext["employeeNumber"], "42");
        assert_eq!(ext["department"], "Sales");
    }

    #[test]
    fn emails_value_filter_replaces_or_creates() {
        let u = json!({"userName": "a", "emails": [{"type": "home", "value": "h@x"}]});
        let out = run(
            u.clone(),
            msg(json!([{"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "w@x"}])),
        )
        .unwrap();
        assert_eq!(
            out["emails"],
            json!([{"type": "home", "value": "h@x"}, {"type": "work", "value": "w@x"}])
        );
        let out = run(
            out,
            msg(json!([{"op": "replace", "path": "emails[type eq \"work\"].value", "value": "w2@x"}])),
        )
        .unwrap();
        assert_eq!(out["emails"][1]["value"], "w2@x");
        assert_eq!(out["emails"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn member_shapes() {
        let g = json!({"displayName": "g", "members": [{"value": "a"}, {"value": "b"}]});
        // Okta: remove by filter and add in one request.
        let out = run(
            g.clone(),
            msg(json!([
                {"op": "remove", "path": "members[value eq \"a\"]"},
                {"op": "add", "path": "members", "value": [{"value": "c", "display": "C"}, {"value": "b"}]}])),
        )
        .unwrap();
        assert_eq!(
            out["members"],
            json!([{"value": "b"}, {"value": "c", "display": "C"}])
        );
        // Entra (legacy): remove with a value array.
        let out = run(
            g.clone(),
            msg(json!([{"op": "Remove", "path": "members", "value": [{"value": "b"}]}])),
        )
        .unwrap();
        assert_eq!(out["members"], json!([{"value": "a"}]));
        // Okta: replace all members; rename riding along.
        let out = run(
            g.clone(),
            msg(json!([
                {"op": "replace", "path": "members", "value": [{"value": "z"}]},
                {"op": "replace", "value": {"id": "u1", "displayName": "renamed"}}])),
        )
        .unwrap();
        assert_eq!(out["members"], json!([{"value": "z"}]));
        assert_eq!(out["displayName"], "renamed");
        // Removing someone who is not a member is not an error.
        run(
            g.clone(),
            msg(json!([{"op": "remove", "path": "members[value eq \"nobody\"]"}])),
        )
        .unwrap();
        // Remove all.
        let out = run(g, msg(json!([{"op": "remove", "path": "members"}]))).unwrap();
        assert!(out.get("members").is_none());
    }

    #[test]
    fn refusals() {
        let u = json!({"userName": "a"});
        let cases = [
            (
                json!([{"op": "frobnicate", "path": "active", "value": true}]),
                "invalidSyntax",
            ),
            (json!([{"op": "remove"}]), "noTarget"),
            (
                json!([{"op": "replace", "path": "name..x", "value": 1}]),
                "invalidPath",
            ),
            (
                json!([{"op": "replace", "path": "emails[type eq", "value": 1}]),
                "invalidPath",
            ),
            (
                json!([{"op": "replace", "path": "id", "value": "x"}]),
                "mutability",
            ),
            (
                json!([{"op": "replace", "value": {"id": "other"}}]),
                "mutability",
            ),
            (
                json!([{"op": "add", "path": "groups", "value": [{"value": "g"}]}]),
                "mutability",
            ),
            (json!([{"op": "replace", "path": "active"}]), "invalidValue"),
            (json!([{"op": "replace", "value": true}]), "invalidValue"),
            (
                json!([{"op": "replace", "path": "members[value eq \"q\"]", "value": {"display": "x"}}]),
                "noTarget",
            ),
            (json!([]), "invalidSyntax"),
        ];
        for (ops, want) in cases {
            let e = run(u.clone(), msg(ops.clone())).unwrap_err();
            assert_eq!(e.scim_type, Some(want), "{ops}: {e}");
        }
        let e = run(u.clone(), json!({"Operations": "x"})).unwrap_err();
        assert_eq!(e.scim_type, Some("invalidSyntax"));
        let e = run(
            u,
            json!({"schemas": ["urn:x"], "Operations": [{"op": "add", "path": "a", "value": 1}]}),
        )
        .unwrap_err();
        assert_eq!(e.scim_type, Some("invalidSyntax"));
    }

    /// A cheap property test: arbitrary paths never panic the path parser or apply.
    #[test]
    fn arbitrary_paths_never_panic() {
        let atoms = [
            "members",
            "[",
            "]",
            "value",
            " eq ",
            "\"a\"",
            ".",
            "urn:x:2.0:User",
            ":",
            "emails",
            "type",
            "display",
            "é",
            "$ref",
            " and ",
            "(",
            ")",
        ];
        let strategy = proptest::collection::vec(proptest::sample::select(atoms.to_vec()), 0..8);
        proptest::proptest!(
            proptest::test_runner::Config::with_cases(5_000),
            |(parts in strategy)| {
                let p = parts.concat();
                for op in ["add", "replace", "remove"] {
                    let _ = run(
                        json!({"userName": "a", "members": [{"value": "a"}], "emails": [{"type": "work"}]}),
                        msg(json!([{"op": op, "path": p, "value": {"value": "b"}}])),
                    );
                }
            }
        );
    }
}
