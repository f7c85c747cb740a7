//! SCIM 2.0 service provider (RFC 7643 / 7644) under `/scim/v2`: identity
//! governance's joiner / mover / leaver feed.
//!
//! Every write is one `PostureEvent` (feed `scim`) that carries the whole
//! consequence of the request — the User or Group record, the recomputed
//! groups and entitlements of every affected identity, and for a leaver the
//! subject revocation — so the next proxied request is decided on the new
//! state. A write is answered only after `Posture::ingest` returns, that is
//! after the durable commit.
//!
//! This room must never change state on bad input: authentication, size,
//! JSON, PATCH application and schema checks all run before the event is
//! built. See `docs/scim.md` for the contract.

mod discovery;
mod error;
pub mod filter;
mod groups;
pub mod patch;
pub mod resource;
mod users;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Map, Value};

use super::{AdminResponse, BodyError, FeedContext, read_body};
use crate::config::ScimConfig;
use crate::posture::event::{Change, Feed, PostureEvent};
use crate::posture::model::Identity;
use crate::posture::{IngestError, Snapshot};
use crate::store::Outcome;
pub use error::ScimError;

/// The SCIM media type, on every response.
pub const SCIM_JSON: &str = "application/scim+json";
/// The list message schema.
pub const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// Most resources in one page (advertised as `filter.maxResults`).
pub const MAX_RESULTS: usize = 1000;
/// Where the service lives.
pub const BASE: &str = "/scim/v2";

/// SCIM writes are read-modify-write over the snapshot (uniqueness, group
/// membership, alias ownership), so they run one at a time. Reads never
/// take it, and the proxy's request path never sees it.
static WRITES: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// Handles `/scim/v2/…`.
pub async fn handle(ctx: &FeedContext, req: Request<Incoming>) -> AdminResponse {
    let base = public_base(ctx.config.feeds.scim.as_ref(), &req);
    match route(ctx, req).await {
        Ok(r) => match base {
            Some(b) => absolutize(r, &b).await,
            None => r,
        },
        Err(e) => {
            super::count(
                &ctx.metrics,
                "scim",
                &format!("scim.{}", e.reason),
                "rejected",
            );
            if e.status.is_server_error() {
                tracing::warn!(status = %e.status, detail = %e.detail, "scim request failed");
            }
            e.response()
        }
    }
}

/// What a request handler gets.
struct Call<'a> {
    ctx: &'a FeedContext,
    cfg: &'a ScimConfig,
    snap: &'a Arc<Snapshot>,
}

async fn route(ctx: &FeedContext, req: Request<Incoming>) -> Result<AdminResponse, ScimError> {
    let Some(cfg) = ctx.config.feeds.scim.as_ref() else {
        return Err(ScimError::not_found("SCIM is not enabled (feeds.scim)"));
    };
    if !super::bearer_is(&req, &cfg.token) {
        return Err(ScimError::unauthorized());
    }
    let path = req.uri().path().to_owned();
    let rest = match path.strip_prefix(BASE) {
        Some(r) if r.starts_with('/') => r.trim_matches('/'),
        _ => return Err(ScimError::not_found("no such SCIM endpoint")),
    };
    let segs: Vec<String> = rest
        .split('/')
        .map(crate::util::percent_decode)
        .collect::<Option<_>>()
        .ok_or_else(|| ScimError::not_found("bad escape in the path"))?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = Query::parse(req.uri().query())?;
    // A resource another replica just created or changed must be found
    // here too (a provisioning client behind a load balancer creates a
    // user on one replica and patches it on the next).
    ctx.posture.catch_up().await;
    let snap = ctx.posture.snapshot();
    let call = Call { ctx, cfg, snap };
    let method = req.method().clone();
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    match (segs.as_slice(), &method) {
        ([r], &Method::GET) if is(r, "ServiceProviderConfig") => {
            Ok(ok(&discovery::service_provider_config()))
        }
        ([r], &Method::GET) if is(r, "ResourceTypes") => Ok(ok(&discovery::resource_types())),
        ([r, id], &Method::GET) if is(r, "ResourceTypes") => {
            discovery::resource_type(id).map(|v| ok(&v))
        }
        ([r], &Method::GET) if is(r, "Schemas") => Ok(ok(&discovery::schemas())),
        ([r, id], &Method::GET) if is(r, "Schemas") => discovery::schema(id).map(|v| ok(&v)),
        ([r], _)
            if is(r, "ServiceProviderConfig") || is(r, "ResourceTypes") || is(r, "Schemas") =>
        {
            Err(ScimError::method_not_allowed(
                "discovery endpoints are read-only",
            ))
        }
        ([r], &Method::GET) if is(r, "Users") => Ok(users::list(&call, &query)),
        ([r], &Method::POST) if is(r, "Users") => {
            let body = body_json(ctx, req).await?;
            users::create(&call, body).await
        }
        ([r, id], &Method::GET) if is(r, "Users") => users::get(&call, id, &query),
        ([r, id], &Method::PUT) if is(r, "Users") => {
            let body = body_json(ctx, req).await?;
            users::replace(&call, id, body).await
        }
        ([r, id], &Method::PATCH) if is(r, "Users") => {
            let body = body_json(ctx, req).await?;
            users::patch(&call, id, body).await
        }
        ([r, id], &Method::DELETE) if is(r, "Users") => users::delete(&call, id).await,
        ([r], &Method::GET) if is(r, "Groups") => Ok(groups::list(&call, &query)),
        ([r], &Method::POST) if is(r, "Groups") => {
            let body = body_json(ctx, req).await?;
            groups::create(&call, body).await
        }
        ([r, id], &Method::GET) if is(r, "Groups") => groups::get(&call, id, &query),
        ([r, id], &Method::PUT) if is(r, "Groups") => {
            let body = body_json(ctx, req).await?;
            groups::replace(&call, id, body).await
        }
        ([r, id], &Method::PATCH) if is(r, "Groups") => {
            let body = body_json(ctx, req).await?;
            groups::patch(&call, id, body).await
        }
        ([r, id], &Method::DELETE) if is(r, "Groups") => groups::delete(&call, id).await,
        ([r, ..], _) if is(r, "Bulk") || is(r, "Me") || is(r, ".search") => Err(
            ScimError::not_implemented(format!("`/{r}` is not supported")),
        ),
        ([_, s], &Method::POST) if is(s, ".search") => Err(ScimError::not_implemented(
            "`.search` is not supported; use GET with `filter`",
        )),
        ([r] | [r, _], _) if is(r, "Users") || is(r, "Groups") => Err(
            ScimError::method_not_allowed(format!("`{method}` is not supported here")),
        ),
        _ => Err(ScimError::not_found("no such SCIM endpoint")),
    }
}

/// Reads and parses a JSON body (bounded by `feeds.max_body_bytes`).
async fn body_json(ctx: &FeedContext, req: Request<Incoming>) -> Result<Value, ScimError> {
    let body = match read_body(req, ctx.config.feeds.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return Err(ScimError::too_large()),
        Err(BodyError::Broken) => return Err(ScimError::invalid_syntax("body not read")),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ScimError::invalid_syntax("the request body is empty"));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ScimError::invalid_syntax(format!("body is not JSON: {e}")))
}

/// A SCIM JSON response.
fn respond(status: StatusCode, v: &Value) -> AdminResponse {
    super::json_typed(status, v, SCIM_JSON)
}

fn ok(v: &Value) -> AdminResponse {
    respond(StatusCode::OK, v)
}

/// 201 with `Location`.
fn created(v: &Value, location: &str) -> AdminResponse {
    let mut r = respond(StatusCode::CREATED, v);
    if let Ok(h) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, h);
    }
    r
}

/// 204, still typed (Entra wants the SCIM media type on every response).
fn no_content() -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SCIM_JSON));
    r
}

/// `meta.location` of a resource as stored: relative to the admin listener,
/// made absolute for each response ([`absolutize`]), so a stored resource
/// does not depend on the name a client used.
fn location(endpoint: &str, id: &str) -> String {
    format!("{BASE}/{endpoint}/{id}")
}

/// The absolute URL of the SCIM base for this request (RFC 7643 §3.1 wants
/// `meta.location` absolute): `feeds.scim.base_url`, else the request's
/// scheme (`http` on the plain admin listener) and `Host`. `None` when
/// neither is usable.
pub fn public_base(cfg: Option<&ScimConfig>, req: &Request<Incoming>) -> Option<String> {
    if let Some(b) = cfg.and_then(|c| c.base_url.as_deref()) {
        return Some(b.trim_end_matches('/').to_owned());
    }
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req
            .headers()
            .get(header::HOST)?
            .to_str()
            .ok()?
            .parse::<http::uri::Authority>()
            .ok()?,
    };
    // A Host with userinfo is not a host name; refuse to echo it.
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return None;
    }
    let scheme = req.uri().scheme_str().unwrap_or("http");
    Some(format!("{scheme}://{authority}{BASE}"))
}

/// Rewrites every `meta.location`, `$ref` and `Location` that names this
/// service to the absolute `base`.
async fn absolutize(r: AdminResponse, base: &str) -> AdminResponse {
    fn walk(v: &mut Value, base: &str) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if (k == "location" || k == "$ref")
                        && let Value::String(s) = x
                        && let Some(rest) = s.strip_prefix(BASE)
                    {
                        *s = format!("{base}{rest}");
                    } else {
                        walk(x, base);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, base)),
            _ => {}
        }
    }
    let (mut parts, body) = r.into_parts();
    if let Some(rest) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix(BASE))
        && let Ok(h) = HeaderValue::from_str(&format!("{base}{rest}"))
    {
        parts.headers.insert(header::LOCATION, h);
    }
    let bytes = match http_body_util::BodyExt::collect(body).await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v) if !bytes.is_empty() => {
            walk(&mut v, base);
            Bytes::from(v.to_string())
        }
        _ => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(body))
}

/// List parameters: `filter`, `startIndex`, `count`, `attributes`,
/// `excludedAttributes` (names compared case-insensitively).
#[derive(Debug, Default)]
struct Query {
    filter: Option<filter::Filter>,
    start_index: usize,
    count: Option<usize>,
    attributes: Vec<String>,
    excluded: Vec<String>,
}

fn form_decode(s: &str) -> Option<String> {
    crate::util::percent_decode(&s.replace('+', " "))
}

impl Query {
    fn parse(q: Option<&str>) -> Result<Self, ScimError> {
        let mut out = Query {
            start_index: 1,
            ..Query::default()
        };
        let int = |k: &str, v: &str| -> Result<i64, ScimError> {
            v.trim()
                .parse::<i64>()
                .map_err(|_| ScimError::invalid_value(format!("`{k}` must be an integer")))
        };
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
                return Err(ScimError::invalid_value("bad escape in the query"));
            };
            match k.to_ascii_lowercase().as_str() {
                "filter" => {
                    out.filter = Some(
                        filter::parse(&v, resource::EXTENSIONS)
                            .map_err(|e| ScimError::invalid_filter(e.0))?,
                    );
                }
                "startindex" => out.start_index = int(&k, &v)?.max(1) as usize,
                "count" => out.count = Some(int(&k, &v)?.clamp(0, MAX_RESULTS as i64) as usize),
                "attributes" => out.attributes = list(&v),
                "excludedattributes" => out.excluded = list(&v),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Applies `attributes` / `excludedAttributes` (top-level names; `id` and
    /// `schemas` are always returned).
    fn project(&self, mut r: Map<String, Value>) -> Map<String, Value> {
        let top = |a: &str| -> String {
            filter::parse_attr_path(a, resource::EXTENSIONS)
                .map(|p| p.urn.unwrap_or(p.attr))
                .unwrap_or_else(|_| a.to_owned())
        };
        let always = |k: &str| k == "id" || k == "schemas";
        if !self.attributes.is_empty() {
            let keep: Vec<String> = self.attributes.iter().map(|a| top(a)).collect();
            r.retain(|k, _| always(k) || keep.iter().any(|a| a.eq_ignore_ascii_case(k)));
        }
        for a in &self.excluded {
            let a = top(a);
            r.retain(|k, _| always(k) || !a.eq_ignore_ascii_case(k));
        }
        r
    }

    /// Filters, pages and wraps resources (already in a stable order).
    fn list(&self, all: Vec<Map<String, Value>>) -> AdminResponse {
        let matching: Vec<Map<String, Value>> = match &self.filter {
            Some(f) => all.into_iter().filter(|r| filter::matches(f, r)).collect(),
            None => all,
        };
        let total = matching.len();
        let count = self.count.unwrap_or(MAX_RESULTS);
        let page: Vec<Value> = matching
            .into_iter()
            .skip(self.start_index - 1)
            .take(count)
            .map(|r| Value::Object(self.project(r)))
            .collect();
        ok(&serde_json::json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": total,
            "startIndex": self.start_index,
            "itemsPerPage": page.len(),
            "Resources": page,
        }))
    }
}

/// Group state as a write sees it: the snapshot's groups, overlaid with the
/// write's own changes.
struct GroupsView {
    /// id → (displayName, member ids).
    groups: HashMap<String, (String, Vec<String>)>,
}

impl GroupsView {
    fn load(snap: &Snapshot) -> Self {
        Self {
            groups: snap
                .groups()
                .into_iter()
                .map(|g| (g.id.clone(), (g.display_name.clone(), g.members.clone())))
                .collect(),
        }
    }

    /// (group id, displayName) of every group a user is in, by name.
    fn memberships(&self, user_id: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .groups
            .iter()
            .filter(|(_, (_, m))| m.iter().any(|x| x == user_id))
            .map(|(id, (name, _))| (id.clone(), name.clone()))
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// user id → memberships, for rendering many users at once.
    fn index(&self) -> HashMap<String, Vec<(String, String)>> {
        let mut idx: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (gid, (name, members)) in &self.groups {
            for m in members {
                idx.entry(m.clone())
                    .or_default()
                    .push((gid.clone(), name.clone()));
            }
        }
        for v in idx.values_mut() {
            v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        }
        idx
    }
}

/// The identity's groups (displayNames) and the entitlements they grant
/// through `group_entitlements` (exact name first, then case-insensitive).
fn derive(cfg: &ScimConfig, memberships: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let mut groups: Vec<String> = memberships.iter().map(|(_, n)| n.clone()).collect();
    groups.sort();
    groups.dedup();
    let mut ents: Vec<String> = Vec::new();
    for g in &groups {
        let granted = cfg.group_entitlements.get(g).or_else(|| {
            cfg.group_entitlements
                .iter()
                .find(|(k, _)| k.to_lowercase() == g.to_lowercase())
                .map(|(_, v)| v)
        });
        ents.extend(granted.into_iter().flatten().cloned());
    }
    ents.sort();
    ents.dedup();
    (groups, ents)
}

/// A live SCIM user by id: its identity and stored resource.
fn find_user(snap: &Snapshot, id: &str) -> Option<(Arc<Identity>, Map<String, Value>)> {
    let ident = snap.identity(&format!("scim:{id}"))?;
    let Some(Value::Object(res)) = ident.scim.clone() else {
        return None;
    };
    (res.get("id").and_then(Value::as_str) == Some(id)).then_some((ident, res))
}

/// Builds the event, ingests it and waits for the durable commit.
///
/// The origin time is now, but never older than the records it touches: a
/// SCIM write states the current truth, and must not be dropped as stale
/// because another feed stamped a record with a clock slightly ahead.
async fn commit(
    ctx: &FeedContext,
    kind: &'static str,
    changes: Vec<Change>,
    floor_ms: u64,
) -> Result<(), ScimError> {
    let id = format!("scim:{}", resource::new_id()?);
    let ev = PostureEvent {
        id: id.clone(),
        feed: Feed::Scim,
        kind: kind.into(),
        origin_ms: crate::util::now_unix_ms().max(floor_ms),
        changes,
    };
    match ctx.posture.ingest(vec![ev]).await {
        Ok(outcomes) => {
            if outcomes.first() != Some(&Outcome::Applied) {
                tracing::warn!(event_id = %id, outcome = ?outcomes.first(), "scim event not applied");
            }
            Ok(())
        }
        Err(IngestError::Invalid(e)) => Err(ScimError::invalid_value(e.to_string())),
        Err(e) => Err(ScimError::unavailable(e.to_string())),
    }
}
