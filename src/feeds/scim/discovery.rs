//! Discovery: `/ServiceProviderConfig`, `/ResourceTypes`, `/Schemas`
//! (RFC 7643 §5–7). Static documents describing what this provider does.

use serde_json::{Value, json};

use super::resource::{ENTERPRISE_SCHEMA, GROUP_SCHEMA, USER_SCHEMA};
use super::{BASE, LIST_SCHEMA, MAX_RESULTS, ScimError};

/// `GET /ServiceProviderConfig`.
pub fn service_provider_config() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_RESULTS},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "The static bearer token configured as feeds.scim.token",
            "specUri": "https://www.rfc-editor.org/rfc/rfc6750",
            "primary": true,
        }],
        "meta": {"resourceType": "ServiceProviderConfig", "location": format!("{BASE}/ServiceProviderConfig")},
    })
}

fn user_type() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
        "id": "User", "name": "User", "endpoint": "/Users",
        "description": "User Account",
        "schema": USER_SCHEMA,
        "schemaExtensions": [{"schema": ENTERPRISE_SCHEMA, "required": false}],
        "meta": {"resourceType": "ResourceType", "location": format!("{BASE}/ResourceTypes/User")},
    })
}

fn group_type() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
        "id": "Group", "name": "Group", "endpoint": "/Groups",
        "description": "Group",
        "schema": GROUP_SCHEMA,
        "meta": {"resourceType": "ResourceType", "location": format!("{BASE}/ResourceTypes/Group")},
    })
}

fn list(items: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": items.len(),
        "startIndex": 1,
        "itemsPerPage": items.len(),
        "Resources": items,
    })
}

/// `GET /ResourceTypes`.
pub fn resource_types() -> Value {
    list(vec![user_type(), group_type()])
}

/// `GET /ResourceTypes/{name}`.
pub fn resource_type(name: &str) -> Result<Value, ScimError> {
    match name {
        "User" => Ok(user_type()),
        "Group" => Ok(group_type()),
        _ => Err(ScimError::not_found(format!("no resource type `{name}`"))),
    }
}

/// One attribute definition; `flags` is a compact spec:
/// `m` multi-valued, `r` required, `x` caseExact, `R` readOnly, `W` writeOnly
/// (returned never), `U` uniqueness server.
fn attr(name: &str, ty: &str, flags: &str, subs: Vec<Value>) -> Value {
    let has = |c: char| flags.contains(c);
    let mut a = json!({
        "name": name,
        "type": ty,
        "multiValued": has('m'),
        "description": name,
        "required": has('r'),
        "caseExact": has('x'),
        "mutability": if has('R') { "readOnly" } else if has('W') { "writeOnly" } else { "readWrite" },
        "returned": if has('W') { "never" } else { "default" },
        "uniqueness": if has('U') { "server" } else { "none" },
    });
    if !subs.is_empty() {
        a["subAttributes"] = Value::Array(subs);
    }
    if ty == "reference" {
        a["referenceTypes"] = json!(["User", "Group", "external"]);
    }
    a
}

fn s(name: &str) -> Value {
    attr(name, "string", "", vec![])
}

fn multi(name: &str) -> Value {
    attr(
        name,
        "complex",
        "m",
        vec![
            s("value"),
            s("display"),
            s("type"),
            attr("primary", "boolean", "", vec![]),
        ],
    )
}

fn schema_doc(id: &str, name: &str, attributes: Vec<Value>) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
        "id": id, "name": name, "description": name,
        "attributes": attributes,
        "meta": {"resourceType": "Schema", "location": format!("{BASE}/Schemas/{id}")},
    })
}

fn user_schema() -> Value {
    schema_doc(
        USER_SCHEMA,
        "User",
        vec![
            attr("userName", "string", "rU", vec![]),
            attr(
                "name",
                "complex",
                "",
                vec![
                    s("formatted"),
                    s("familyName"),
                    s("givenName"),
                    s("middleName"),
                    s("honorificPrefix"),
                    s("honorificSuffix"),
                ],
            ),
            s("displayName"),
            s("nickName"),
            attr("profileUrl", "reference", "", vec![]),
            s("title"),
            s("userType"),
            s("preferredLanguage"),
            s("locale"),
            s("timezone"),
            attr("active", "boolean", "", vec![]),
            attr("password", "string", "W", vec![]),
            multi("emails"),
            multi("phoneNumbers"),
            attr(
                "groups",
                "complex",
                "mR",
                vec![
                    attr("value", "string", "R", vec![]),
                    attr("$ref", "reference", "R", vec![]),
                    attr("display", "string", "R", vec![]),
                    attr("type", "string", "R", vec![]),
                ],
            ),
            multi("entitlements"),
            multi("roles"),
        ],
    )
}

fn enterprise_schema() -> Value {
    schema_doc(
        ENTERPRISE_SCHEMA,
        "EnterpriseUser",
        vec![
            s("employeeNumber"),
            s("costCenter"),
            s("organization"),
            s("division"),
            s("department"),
            attr(
                "manager",
                "complex",
                "",
                vec![
                    s("value"),
                    attr("$ref", "reference", "", vec![]),
                    attr("displayName", "string", "R", vec![]),
                ],
            ),
        ],
    )
}

fn group_schema() -> Value {
    schema_doc(
        GROUP_SCHEMA,
        "Group",
        vec![
            attr("displayName", "string", "rU", vec![]),
            attr(
                "members",
                "complex",
                "m",
                vec![
                    attr("value", "string", "x", vec![]),
                    attr("$ref", "reference", "", vec![]),
                    s("display"),
                    s("type"),
                ],
            ),
        ],
    )
}

/// `GET /Schemas`.
pub fn schemas() -> Value {
    list(vec![user_schema(), enterprise_schema(), group_schema()])
}

/// `GET /Schemas/{urn}`.
pub fn schema(id: &str) -> Result<Value, ScimError> {
    [user_schema(), enterprise_schema(), group_schema()]
        .into_iter()
        .find(|s| s["id"].as_str().is_some_and(|i| i.eq_ignore_ascii_case(id)))
        .ok_or_else(|| ScimError::not_found(format!("no schema `{id}`")))
}
