//! `/Users`: joiner (POST), mover (PUT / PATCH), leaver (`active=false` in any
//! shape, or DELETE), and re-enable (`active=true`).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::resource::{self, ENTERPRISE_SCHEMA, str_attr};
use super::{
    Call, GroupsView, Query, ScimError, WRITES, commit, created, derive, find_user, location,
    no_content, ok, patch,
};
use crate::posture::event::{Change, IdentityPatch};
use crate::posture::model::{Group, Identity, IdentityStatus, RevocationTarget};

/// Read-only User attributes a PATCH may not touch.
const READ_ONLY: &[&str] = &["id", "meta", "groups"];

/// The resource as served: the stored User plus its (read-only) `groups`.
fn render(stored: &Map<String, Value>, memberships: &[(String, String)]) -> Map<String, Value> {
    let mut r = stored.clone();
    if !memberships.is_empty() {
        r.insert(
            "groups".into(),
            Value::Array(
                memberships
                    .iter()
                    .map(|(id, name)| {
                        serde_json::json!({
                            "value": id, "display": name,
                            "$ref": location("Groups", id), "type": "direct"})
                    })
                    .collect(),
            ),
        );
    }
    r
}

/// `GET /Users`: every live user, oldest first (stable across pages).
pub(super) fn list(call: &Call<'_>, q: &Query) -> super::AdminResponse {
    let idx = GroupsView::load(call.snap).index();
    let mut users: Vec<Map<String, Value>> = call
        .snap
        .identities()
        .into_iter()
        .filter_map(|i| match &i.scim {
            Some(Value::Object(o)) => Some(o.clone()),
            _ => None,
        })
        .collect();
    users.sort_by_key(resource::created_then_id);
    let none = Vec::new();
    let rendered = users
        .iter()
        .map(|u| {
            let id = str_attr(u, "id").unwrap_or_default();
            render(u, idx.get(id).unwrap_or(&none))
        })
        .collect();
    q.list(rendered)
}

/// `GET /Users/{id}`.
pub(super) fn get(call: &Call<'_>, id: &str, q: &Query) -> Result<super::AdminResponse, ScimError> {
    let (_, res) = find_user(call.snap, id).ok_or_else(|| not_found(id))?;
    let m = GroupsView::load(call.snap).memberships(id);
    Ok(ok(&Value::Object(q.project(render(&res, &m)))))
}

fn not_found(id: &str) -> ScimError {
    ScimError::not_found(format!("no user `{id}`"))
}

/// Refuses a `userName` another live user has (case-insensitive, RFC 7643).
fn check_unique(call: &Call<'_>, user_name: &str, except: Option<&str>) -> Result<(), ScimError> {
    let want = user_name.to_lowercase();
    let taken = call.snap.identities().into_iter().any(|i| match &i.scim {
        Some(Value::Object(o)) => {
            str_attr(o, "id") != except
                && str_attr(o, "userName").is_some_and(|u| u.to_lowercase() == want)
        }
        _ => false,
    });
    if taken {
        return Err(ScimError::uniqueness(format!(
            "userName `{user_name}` already exists"
        )));
    }
    Ok(())
}

fn meta(id: &str, created: &str, now: &str) -> Value {
    resource::meta("User", "Users", id, created, now)
}

/// `POST /Users` (joiner).
pub(super) async fn create(
    call: &Call<'_>,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let mut new = resource::normalize_user(body, true)?;
    let _w = WRITES.lock().await;
    let user_name = str_attr(&new, "userName").unwrap_or_default().to_owned();
    check_unique(call, &user_name, None)?;
    let id = resource::new_id()?;
    let subject = match call.cfg.subject_attribute.as_str() {
        "externalId" => str_attr(&new, "externalId")
            .ok_or_else(|| {
                ScimError::invalid_value(
                    "`externalId` is required: it is the subject (feeds.scim.subject_attribute)",
                )
            })?
            .to_owned(),
        "id" => id.clone(),
        _ => user_name,
    };
    let prior = call
        .snap
        .identity(&subject)
        .filter(|i| i.subject == subject);
    if prior.as_ref().is_some_and(|p| p.scim.is_some()) {
        return Err(ScimError::uniqueness(format!(
            "subject `{subject}` is already provisioned"
        )));
    }
    let now = crate::util::rfc3339(crate::util::now_unix_ms(), true);
    new.insert("id".into(), id.clone().into());
    new.insert("meta".into(), meta(&id, &now, &now));
    let view = GroupsView::load(call.snap);
    let (changes, kind, floor) =
        user_changes(call, &view, &id, &subject, prior.as_ref(), None, &new);
    commit(call.ctx, kind, changes, floor).await?;
    Ok(created(
        &Value::Object(render(&new, &[])),
        &location("Users", &id),
    ))
}

/// `PUT /Users/{id}` (mover; without `active: true` a leaver).
pub(super) async fn replace(
    call: &Call<'_>,
    id: &str,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let new = resource::normalize_user(body, false)?;
    let _w = WRITES.lock().await;
    let (ident, old) = find_user(call.snap, id).ok_or_else(|| not_found(id))?;
    write_update(call, id, &ident, &old, new).await
}

/// `PATCH /Users/{id}`: the operations are applied to the stored resource and
/// the result is checked like a PUT body.
pub(super) async fn patch(
    call: &Call<'_>,
    id: &str,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let ops = patch::parse_message(body)?;
    let _w = WRITES.lock().await;
    let (ident, old) = find_user(call.snap, id).ok_or_else(|| not_found(id))?;
    let mut work = old.clone();
    patch::apply(
        &mut work,
        &ops,
        patch::Rules {
            id,
            read_only: READ_ONLY,
        },
    )?;
    let new = resource::normalize_user(Value::Object(work), false)?;
    write_update(call, id, &ident, &old, new).await
}

async fn write_update(
    call: &Call<'_>,
    id: &str,
    ident: &Arc<Identity>,
    old: &Map<String, Value>,
    mut new: Map<String, Value>,
) -> Result<super::AdminResponse, ScimError> {
    let user_name = str_attr(&new, "userName").unwrap_or_default().to_owned();
    check_unique(call, &user_name, Some(id))?;
    let created_at = old
        .get("meta")
        .and_then(|m| m.get("created"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let now = crate::util::rfc3339(crate::util::now_unix_ms(), true);
    new.insert("id".into(), id.into());
    new.insert("meta".into(), meta(id, &created_at, &now));
    let view = GroupsView::load(call.snap);
    let (changes, kind, floor) = user_changes(
        call,
        &view,
        id,
        &ident.subject,
        Some(ident),
        Some(old),
        &new,
    );
    commit(call.ctx, kind, changes, floor).await?;
    Ok(ok(&Value::Object(render(&new, &view.memberships(id)))))
}

/// What one User write changes: the identity (status, aliases, groups,
/// entitlements, department, role, the stored resource) and, for a leaver,
/// the subject revocation. Returns the changes, the event kind and the
/// origin-time floor.
fn user_changes(
    call: &Call<'_>,
    view: &GroupsView,
    id: &str,
    subject: &str,
    prior: Option<&Arc<Identity>>,
    old: Option<&Map<String, Value>>,
    new: &Map<String, Value>,
) -> (Vec<Change>, &'static str, u64) {
    let new_aliases = resource::aliases(new, id);
    let old_aliases = old.map(|o| resource::aliases(o, id)).unwrap_or_default();
    // An alias another identity already answers to stays theirs: taking it
    // would silently re-point that identity's lookups (fail closed).
    let add_aliases: Vec<String> = new_aliases
        .iter()
        .filter(|a| a.as_str() != subject)
        .filter(|a| match call.snap.resolve_subject(a) {
            Some(owner) if owner != subject => {
                tracing::warn!(alias = %a, %owner, %subject, "scim alias already belongs to another identity; not added");
                false
            }
            _ => true,
        })
        .cloned()
        .collect();
    let remove_aliases: Vec<String> = old_aliases
        .into_iter()
        .filter(|a| !new_aliases.contains(a) && a != subject)
        .collect();
    let was_active = old.map(resource::active);
    let is_active = resource::active(new);
    // SCIM only asserts its own transitions, so a suspension another feed
    // made is not undone by an unrelated profile update.
    let status = (was_active != Some(is_active)).then_some(if is_active {
        IdentityStatus::Active
    } else {
        IdentityStatus::Terminated
    });
    let (groups, entitlements) = derive(call.cfg, &view.memberships(id));
    let ext = new.get(ENTERPRISE_SCHEMA).and_then(Value::as_object);
    let department = ext
        .and_then(|e| str_attr(e, "department"))
        .map(str::to_owned);
    let role = str_attr(new, "title").map(str::to_owned);
    let mut changes = vec![Change::Identity {
        subject: subject.to_owned(),
        patch: IdentityPatch {
            status,
            department: Some(department),
            role: Some(role),
            groups: Some(groups),
            entitlements: Some(entitlements),
            add_aliases,
            remove_aliases,
            scim: Some(Some(Value::Object(new.clone()))),
            ..IdentityPatch::default()
        },
    }];
    let leaver = !is_active && was_active != Some(false);
    if leaver {
        changes.push(Change::Revoke {
            target: RevocationTarget::Subject,
            key: subject.to_owned(),
        });
    }
    let kind = match (was_active, is_active) {
        (None, _) => "scim.joiner",
        (Some(true), false) => "scim.leaver",
        (Some(false), true) => "scim.reenable",
        _ => "scim.mover",
    };
    (changes, kind, prior.map_or(0, |p| p.updated_ms))
}

/// `DELETE /Users/{id}`: the identity stays as a terminated tombstone (its
/// aliases keep denying), the subject is revoked, and the user leaves every
/// group it was in — all in one event.
pub(super) async fn delete(call: &Call<'_>, id: &str) -> Result<super::AdminResponse, ScimError> {
    let _w = WRITES.lock().await;
    let (ident, _) = find_user(call.snap, id).ok_or_else(|| not_found(id))?;
    let now = crate::util::rfc3339(crate::util::now_unix_ms(), true);
    let mut floor = ident.updated_ms;
    let mut changes = vec![
        Change::Identity {
            subject: ident.subject.clone(),
            patch: IdentityPatch {
                status: Some(IdentityStatus::Terminated),
                groups: Some(Vec::new()),
                entitlements: Some(Vec::new()),
                remove_aliases: vec![format!("scim:{id}")],
                scim: Some(None),
                ..IdentityPatch::default()
            },
        },
        Change::Revoke {
            target: RevocationTarget::Subject,
            key: ident.subject.clone(),
        },
    ];
    for g in call.snap.groups() {
        if !g.members.iter().any(|m| m == id) {
            continue;
        }
        floor = floor.max(g.updated_ms);
        let mut res = match &g.resource {
            Value::Object(o) => o.clone(),
            _ => Map::new(),
        };
        if let Some(Value::Array(ms)) = res.get_mut("members") {
            ms.retain(|m| m.get("value").and_then(Value::as_str) != Some(id));
        }
        if let Some(Value::Object(meta)) = res.get_mut("meta") {
            meta.insert("lastModified".into(), now.clone().into());
        }
        changes.push(Change::Group {
            id: g.id.clone(),
            record: Some(Group {
                id: g.id.clone(),
                display_name: g.display_name.clone(),
                members: g.members.iter().filter(|m| *m != id).cloned().collect(),
                resource: Value::Object(res),
                ..Group::default()
            }),
        });
    }
    commit(call.ctx, "scim.delete", changes, floor).await?;
    Ok(no_content())
}
