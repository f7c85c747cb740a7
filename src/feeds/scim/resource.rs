//! SCIM resources as JSON: case-insensitive attribute access, the
//! normalisation every incoming User and Group goes through (canonical
//! attribute names, `"True"`/`"False"` coerced, nulls dropped, read-only and
//! write-only attributes removed, required attributes checked), and the
//! values the proxy derives from a User.
//!
//! INVARIANT: a stored resource has passed `normalize_user` /
//! `normalize_group`; everything the rest of the module reads from it
//! (`userName`, `active`, `members`) has the type checked there.

use serde_json::{Map, Value};

use super::error::ScimError;
use crate::posture::event::{MAX_KEY_LEN, MAX_LIST};

/// Core User schema.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// Enterprise User extension.
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
/// Core Group schema.
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
/// Extensions known by name.
pub const EXTENSIONS: &[&str] = &[ENTERPRISE_SCHEMA];

/// Attribute names of the core and enterprise schemas, in canonical case.
/// Incoming names that match one of these case-insensitively are rewritten
/// to it, so the rest of the module can use plain lookups for them.
const CANONICAL: &[&str] = &[
    "id",
    "externalId",
    "meta",
    "schemas",
    "userName",
    "name",
    "formatted",
    "familyName",
    "givenName",
    "middleName",
    "honorificPrefix",
    "honorificSuffix",
    "displayName",
    "nickName",
    "profileUrl",
    "title",
    "userType",
    "preferredLanguage",
    "locale",
    "timezone",
    "active",
    "password",
    "emails",
    "phoneNumbers",
    "ims",
    "photos",
    "addresses",
    "streetAddress",
    "locality",
    "region",
    "postalCode",
    "country",
    "groups",
    "entitlements",
    "roles",
    "x509Certificates",
    "value",
    "display",
    "type",
    "primary",
    "$ref",
    "members",
    "employeeNumber",
    "costCenter",
    "organization",
    "division",
    "department",
    "manager",
    "resourceType",
    "created",
    "lastModified",
    "location",
    "version",
];

/// Multi-valued attributes (an `add` appends to them).
pub const MULTI_VALUED: &[&str] = &[
    "emails",
    "phoneNumbers",
    "ims",
    "photos",
    "addresses",
    "groups",
    "entitlements",
    "roles",
    "x509Certificates",
    "members",
    "schemas",
];

/// Case-insensitive attribute-name equality.
pub fn attr_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The canonical spelling of an attribute name (known names), or the name as given.
pub fn canonical(name: &str) -> String {
    CANONICAL
        .iter()
        .chain(EXTENSIONS)
        .find(|c| attr_eq(c, name))
        .map_or_else(|| name.to_owned(), |c| (*c).to_owned())
}

/// The key under which `name` is stored in `obj`, if any (case-insensitive).
pub fn key_ci(obj: &Map<String, Value>, name: &str) -> Option<String> {
    if obj.contains_key(name) {
        return Some(name.to_owned());
    }
    obj.keys().find(|k| attr_eq(k, name)).cloned()
}

/// Looks up an attribute case-insensitively.
pub fn get_ci<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| obj.iter().find(|(k, _)| attr_eq(k, name)).map(|(_, v)| v))
}

/// True for a multi-valued attribute.
pub fn is_multi(name: &str) -> bool {
    MULTI_VALUED.iter().any(|m| attr_eq(m, name))
}

/// Coerces a SCIM boolean: `true`/`false`, or Entra's `"True"`/`"False"`.
pub fn coerce_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Canonicalises keys, coerces `primary`, drops nulls, recursively.
fn clean(v: Value, depth: usize) -> Result<Value, ScimError> {
    if depth > 16 {
        return Err(ScimError::invalid_value("resource is nested too deeply"));
    }
    Ok(match v {
        Value::Object(o) => {
            let mut out = Map::with_capacity(o.len());
            for (k, v) in o {
                if v.is_null() {
                    continue;
                }
                let k = canonical(&k);
                let mut v = clean(v, depth + 1)?;
                if k == "primary" {
                    v =
                        Value::Bool(coerce_bool(&v).ok_or_else(|| {
                            ScimError::invalid_value("`primary` must be a boolean")
                        })?);
                }
                if out.insert(k.clone(), v).is_some() {
                    return Err(ScimError::invalid_value(format!(
                        "attribute `{k}` is given more than once"
                    )));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(
            a.into_iter()
                .filter(|v| !v.is_null())
                .map(|v| clean(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

/// A value the proxy uses as a subject or alias: 1..=256 printable characters.
fn key_like(attr: &str, v: &str) -> Result<(), ScimError> {
    if v.trim().is_empty() || v.len() > MAX_KEY_LEN || v.chars().any(char::is_control) {
        return Err(ScimError::invalid_value(format!(
            "`{attr}` must be 1..={MAX_KEY_LEN} printable characters"
        )));
    }
    Ok(())
}

/// A User value that becomes an alias: also kept clear of the `scim:` prefix
/// the provider reserves for its own `scim:<id>` alias.
fn alias_like(attr: &str, v: &str) -> Result<(), ScimError> {
    key_like(attr, v)?;
    if v.starts_with("scim:") {
        return Err(ScimError::invalid_value(format!(
            "`{attr}` may not start with `scim:`"
        )));
    }
    Ok(())
}

fn optional_string(o: &Map<String, Value>, attr: &str) -> Result<(), ScimError> {
    match o.get(attr) {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(ScimError::invalid_value(format!(
            "`{attr}` must be a string"
        ))),
    }
}

fn check_schemas(o: &mut Map<String, Value>, core: &str) -> Result<(), ScimError> {
    let mut list: Vec<String> = match o.remove("schemas") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ScimError::invalid_value("`schemas` must list URNs")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ScimError::invalid_value("`schemas` must be an array")),
    };
    if !list.is_empty() && !list.iter().any(|s| attr_eq(s, core)) {
        return Err(ScimError::invalid_value(format!(
            "`schemas` must include `{core}`"
        )));
    }
    list.retain(|s| !attr_eq(s, core));
    list.insert(0, core.to_owned());
    // Every extension object present is named in `schemas`.
    for k in o.keys() {
        if k.get(..4).is_some_and(|p| attr_eq(p, "urn:")) && !list.iter().any(|s| attr_eq(s, k)) {
            list.push(k.clone());
        }
    }
    o.insert(
        "schemas".into(),
        Value::Array(list.into_iter().map(Value::String).collect()),
    );
    Ok(())
}

/// Normalises a User as sent (POST / PUT body, or the result of a PATCH):
/// drops `id`, `meta`, `groups` (read-only) and `password` (write-only, never
/// stored), and fixes `active` (`active_default` when absent).
pub fn normalize_user(v: Value, active_default: bool) -> Result<Map<String, Value>, ScimError> {
    let Value::Object(_) = v else {
        return Err(ScimError::invalid_syntax("a User must be a JSON object"));
    };
    let Value::Object(mut o) = clean(v, 0)? else {
        return Err(ScimError::invalid_syntax("a User must be a JSON object"));
    };
    for ro in ["id", "meta", "groups", "password"] {
        o.remove(ro);
    }
    check_schemas(&mut o, USER_SCHEMA)?;
    match o.get("userName") {
        Some(Value::String(u)) => alias_like("userName", u)?,
        Some(_) => return Err(ScimError::invalid_value("`userName` must be a string")),
        None => return Err(ScimError::invalid_value("`userName` is required")),
    }
    let active = match o.get("active") {
        None => active_default,
        Some(v) => coerce_bool(v).ok_or_else(|| {
            ScimError::invalid_value("`active` must be a boolean (or \"True\" / \"False\")")
        })?,
    };
    o.insert("active".into(), Value::Bool(active));
    if let Some(x) = o.get("externalId") {
        match x {
            Value::String(x) => alias_like("externalId", x)?,
            _ => return Err(ScimError::invalid_value("`externalId` must be a string")),
        }
    }
    for attr in ["displayName", "nickName", "title", "userType", "locale"] {
        optional_string(&o, attr)?;
    }
    if let Some(n) = o.get("name")
        && !n.is_object()
    {
        return Err(ScimError::invalid_value("`name` must be an object"));
    }
    match o.get("emails") {
        None => {}
        Some(Value::Array(items)) => {
            if items.len() > 64 {
                return Err(ScimError::invalid_value("more than 64 `emails`"));
            }
            for e in items {
                match e.as_object().map(|e| e.get("value")) {
                    Some(Some(Value::String(v))) => alias_like("emails.value", v)?,
                    Some(None) => {}
                    _ => {
                        return Err(ScimError::invalid_value(
                            "`emails` must be objects with a string `value`",
                        ));
                    }
                }
            }
        }
        Some(_) => return Err(ScimError::invalid_value("`emails` must be an array")),
    }
    if let Some(ext) = o.get(ENTERPRISE_SCHEMA) {
        let Value::Object(ext) = ext else {
            return Err(ScimError::invalid_value(format!(
                "`{ENTERPRISE_SCHEMA}` must be an object"
            )));
        };
        for attr in [
            "employeeNumber",
            "costCenter",
            "organization",
            "division",
            "department",
        ] {
            optional_string(ext, attr)?;
        }
    }
    Ok(o)
}

/// Normalises a Group as sent: drops `id` and `meta`, requires
/// `displayName`, and dedupes `members` by `value`.
pub fn normalize_group(v: Value) -> Result<Map<String, Value>, ScimError> {
    let Value::Object(_) = v else {
        return Err(ScimError::invalid_syntax("a Group must be a JSON object"));
    };
    let Value::Object(mut o) = clean(v, 0)? else {
        return Err(ScimError::invalid_syntax("a Group must be a JSON object"));
    };
    o.remove("id");
    o.remove("meta");
    check_schemas(&mut o, GROUP_SCHEMA)?;
    match o.get("displayName") {
        Some(Value::String(d)) => key_like("displayName", d)?,
        Some(_) => return Err(ScimError::invalid_value("`displayName` must be a string")),
        None => return Err(ScimError::invalid_value("`displayName` is required")),
    }
    optional_string(&o, "externalId")?;
    let members = match o.remove("members") {
        None => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ScimError::invalid_value("`members` must be an array")),
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let Some(id) = m.get("value").and_then(Value::as_str) else {
            return Err(ScimError::invalid_value(
                "`members` must be objects with a string `value`",
            ));
        };
        key_like("members.value", id)?;
        if seen.insert(id.to_owned()) {
            out.push(m);
        }
    }
    if out.len() > MAX_LIST {
        return Err(ScimError::invalid_value(format!(
            "a group holds at most {MAX_LIST} members"
        )));
    }
    o.insert("members".into(), Value::Array(out));
    Ok(o)
}

/// A string attribute of a normalised resource.
pub fn str_attr<'a>(o: &'a Map<String, Value>, attr: &str) -> Option<&'a str> {
    o.get(attr).and_then(Value::as_str)
}

/// `active` of a normalised User.
pub fn active(o: &Map<String, Value>) -> bool {
    o.get("active").and_then(Value::as_bool).unwrap_or(false)
}

/// Member ids of a normalised Group.
pub fn member_ids(o: &Map<String, Value>) -> Vec<String> {
    o.get("members")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("value").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The names a User is known by besides its subject: `userName`,
/// `externalId`, every email, and `scim:<id>`.
pub fn aliases(o: &Map<String, Value>, id: &str) -> Vec<String> {
    let mut out = vec![format!("scim:{id}")];
    let mut push = |s: &str| {
        if !out.iter().any(|a| a == s) {
            out.push(s.to_owned());
        }
    };
    if let Some(u) = str_attr(o, "userName") {
        push(u);
    }
    if let Some(x) = str_attr(o, "externalId") {
        push(x);
    }
    for e in o
        .get("emails")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(v) = e.get("value").and_then(Value::as_str) {
            push(v);
        }
    }
    out
}

/// A random version-4 UUID (lowercase, hyphenated).
pub fn new_id() -> Result<String, ScimError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| ScimError::internal("no randomness for a new id"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Stable listing order for SCIM resources: `meta.created`, then `id`.
pub(super) fn created_then_id(r: &Map<String, Value>) -> (String, String) {
    let created = r
        .get("meta")
        .and_then(|m| m.get("created"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    (
        created.to_owned(),
        str_attr(r, "id").unwrap_or_default().to_owned(),
    )
}

/// The `meta` object of a User or Group resource.
pub(super) fn meta(
    resource_type: &str,
    endpoint: &str,
    id: &str,
    created: &str,
    now: &str,
) -> Value {
    serde_json::json!({
        "resourceType": resource_type,
        "created": created,
        "lastModified": now,
        "location": super::location(endpoint, id),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn users_are_normalised() {
        let u = normalize_user(
            json!({"USERNAME": "a@x", "Active": "False", "password": "hunter2", "groups": [],
                   "id": "mine", "emails": [{"Value": "a@x", "primary": "True"}], "title": null}),
            true,
        )
        .unwrap();
        assert_eq!(u["userName"], "a@x");
        assert_eq!(u["active"], false);
        assert_eq!(u["emails"][0]["value"], "a@x");
        assert_eq!(u["emails"][0]["primary"], true);
        assert_eq!(u["schemas"], json!([USER_SCHEMA]));
        for gone in ["password", "groups", "id", "title"] {
            assert!(!u.contains_key(gone), "{gone}");
        }
        assert_eq!(
            normalize_user(json!({"userName": "a"}), true).unwrap()["active"],
            true
        );
        for bad in [
            json!({"active": true}),
            json!({"userName": ""}),
            json!({"userName": 5}),
            json!({"userName": "a", "active": "yes"}),
            json!({"userName": "a", "active": 1}),
            json!({"userName": "scim:0000"}),
            json!({"userName": "a", "emails": "a@x"}),
            json!({"userName": "a", "userName ": "b", "USERNAME": "c"}),
            json!({"userName": "a", "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"]}),
            json!([1]),
        ] {
            assert!(normalize_user(bad.clone(), true).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids_look_like_uuids() {
        let a = new_id().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_id().unwrap());
    }
}
