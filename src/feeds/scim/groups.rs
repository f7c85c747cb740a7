//! `/Groups`: group records, and through `group_entitlements` the groups and
//! entitlements of every member a change touches — in the same event.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::resource::{self, str_attr};
use super::{
    Call, GroupsView, Query, ScimError, WRITES, commit, created, derive, find_user, location,
    no_content, ok, patch,
};
use crate::posture::event::{Change, IdentityPatch};
use crate::posture::model::Group;

/// Read-only Group attributes a PATCH may not touch.
const READ_ONLY: &[&str] = &["id", "meta"];

fn not_found(id: &str) -> ScimError {
    ScimError::not_found(format!("no group `{id}`"))
}

fn stored(g: &Group) -> Map<String, Value> {
    match &g.resource {
        Value::Object(o) => o.clone(),
        _ => Map::new(),
    }
}

/// `GET /Groups`, oldest first.
pub(super) fn list(call: &Call<'_>, q: &Query) -> super::AdminResponse {
    let mut groups: Vec<Map<String, Value>> =
        call.snap.groups().iter().map(|g| stored(g)).collect();
    groups.sort_by_key(resource::created_then_id);
    q.list(groups)
}

/// `GET /Groups/{id}`.
pub(super) fn get(call: &Call<'_>, id: &str, q: &Query) -> Result<super::AdminResponse, ScimError> {
    let g = call.snap.group(id).ok_or_else(|| not_found(id))?;
    Ok(ok(&Value::Object(q.project(stored(&g)))))
}

/// Checks `displayName` uniqueness (Entra requires it) and that every member
/// is a provisioned user.
fn check(call: &Call<'_>, new: &Map<String, Value>, except: Option<&str>) -> Result<(), ScimError> {
    let name = str_attr(new, "displayName").unwrap_or_default();
    let want = name.to_lowercase();
    if call
        .snap
        .groups()
        .iter()
        .any(|g| Some(g.id.as_str()) != except && g.display_name.to_lowercase() == want)
    {
        return Err(ScimError::uniqueness(format!(
            "displayName `{name}` already exists"
        )));
    }
    for m in resource::member_ids(new) {
        if find_user(call.snap, &m).is_none() {
            return Err(ScimError::invalid_value(format!(
                "member `{m}` is not a provisioned user"
            )));
        }
    }
    Ok(())
}

fn meta(id: &str, created: &str, now: &str) -> Value {
    resource::meta("Group", "Groups", id, created, now)
}

/// `POST /Groups`.
pub(super) async fn create(
    call: &Call<'_>,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let mut new = resource::normalize_group(body)?;
    let _w = WRITES.lock().await;
    check(call, &new, None)?;
    let id = resource::new_id()?;
    let now = crate::util::rfc3339(crate::util::now_unix_ms(), true);
    new.insert("id".into(), id.clone().into());
    new.insert("meta".into(), meta(&id, &now, &now));
    write(call, &id, Some(&new)).await?;
    Ok(created(&Value::Object(new), &location("Groups", &id)))
}

/// `PUT /Groups/{id}`: full replace (absent `members` empties the group).
pub(super) async fn replace(
    call: &Call<'_>,
    id: &str,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let new = resource::normalize_group(body)?;
    let _w = WRITES.lock().await;
    let old = call.snap.group(id).ok_or_else(|| not_found(id))?;
    let new = finish(call, id, &stored(&old), new)?;
    write(call, id, Some(&new)).await?;
    Ok(ok(&Value::Object(new)))
}

/// `PATCH /Groups/{id}`: membership deltas, replace-all, renames. Answers 204
/// (what Entra expects; Okta accepts it).
pub(super) async fn patch(
    call: &Call<'_>,
    id: &str,
    body: Value,
) -> Result<super::AdminResponse, ScimError> {
    let ops = patch::parse_message(body)?;
    let _w = WRITES.lock().await;
    let old = call.snap.group(id).ok_or_else(|| not_found(id))?;
    let old = stored(&old);
    let mut work = old.clone();
    patch::apply(
        &mut work,
        &ops,
        patch::Rules {
            id,
            read_only: READ_ONLY,
        },
    )?;
    let new = resource::normalize_group(Value::Object(work))?;
    let new = finish(call, id, &old, new)?;
    write(call, id, Some(&new)).await?;
    Ok(no_content())
}

/// Checks an updated group and stamps `id` and `meta`.
fn finish(
    call: &Call<'_>,
    id: &str,
    old: &Map<String, Value>,
    mut new: Map<String, Value>,
) -> Result<Map<String, Value>, ScimError> {
    check(call, &new, Some(id))?;
    let created_at = old
        .get("meta")
        .and_then(|m| m.get("created"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let now = crate::util::rfc3339(crate::util::now_unix_ms(), true);
    new.insert("id".into(), id.into());
    new.insert("meta".into(), meta(id, &created_at, &now));
    Ok(new)
}

/// `DELETE /Groups/{id}`.
pub(super) async fn delete(call: &Call<'_>, id: &str) -> Result<super::AdminResponse, ScimError> {
    let _w = WRITES.lock().await;
    call.snap.group(id).ok_or_else(|| not_found(id))?;
    write(call, id, None).await?;
    Ok(no_content())
}

/// One event: the group record (or its deletion) and, for every member
/// whose groups or entitlements change, the identity update.
async fn write(
    call: &Call<'_>,
    id: &str,
    new: Option<&Map<String, Value>>,
) -> Result<(), ScimError> {
    let mut view = GroupsView::load(call.snap);
    let mut floor = call.snap.group(id).map_or(0, |g| g.updated_ms);
    let old_members = view
        .groups
        .get(id)
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    let record = new.map(|res| Group {
        id: id.to_owned(),
        display_name: str_attr(res, "displayName").unwrap_or_default().to_owned(),
        members: resource::member_ids(res),
        resource: Value::Object(res.clone()),
        ..Group::default()
    });
    match &record {
        Some(g) => {
            view.groups
                .insert(id.to_owned(), (g.display_name.clone(), g.members.clone()));
        }
        None => {
            view.groups.remove(id);
        }
    }
    let affected: BTreeSet<String> = old_members
        .into_iter()
        .chain(record.iter().flat_map(|g| g.members.iter().cloned()))
        .collect();
    let mut changes = vec![Change::Group {
        id: id.to_owned(),
        record,
    }];
    // One pass over every membership, not one per affected member.
    let index = view.index();
    for uid in affected {
        let Some((ident, _)) = find_user(call.snap, &uid) else {
            continue;
        };
        let memberships = index.get(&uid).map_or(&[][..], Vec::as_slice);
        let (groups, entitlements) = derive(call.cfg, memberships);
        if groups == ident.groups && entitlements == ident.entitlements {
            continue;
        }
        floor = floor.max(ident.updated_ms);
        changes.push(Change::Identity {
            subject: ident.subject.clone(),
            patch: IdentityPatch {
                groups: Some(groups),
                entitlements: Some(entitlements),
                ..IdentityPatch::default()
            },
        });
    }
    commit(call.ctx, "scim.group", changes, floor).await
}
