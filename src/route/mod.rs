//! Routing: host + longest path prefix → [`Route`].
//!
//! Built once per config and swapped whole on reload; lookups take no lock and
//! allocate nothing.

use std::collections::HashMap;
use std::sync::Arc;

use http::Uri;

use crate::config::{AuthMode, BindingMode, Config, RouteConfig, Sensitivity};

/// A route as the request path sees it.
#[derive(Debug)]
pub struct Route {
    /// Name for metrics and logs.
    pub name: String,
    /// The name as the `X-Portcullis-Route` value, built once with the route
    /// (`None` when the name is not a valid header value: not sent).
    pub name_header: Option<http::HeaderValue>,
    /// This route's metric handles, resolved on first use so the request
    /// path skips the label-set lookups (allocation + lock) every time.
    pub metric_handles: RouteMetricHandles,
    /// Matched path prefix.
    pub path_prefix: String,
    /// Upstream scheme + authority + base path.
    pub upstream: Uri,
    /// Upstream base path without a trailing slash (`""` for `/`).
    pub upstream_base_path: String,
    /// Sensitivity, for policies.
    pub sensitivity: Sensitivity,
    /// How requests authenticate.
    pub auth: AuthMode,
    /// Issuer names accepted here; empty means all.
    pub issuers: Vec<String>,
    /// Whether tokens must be sender-constrained.
    pub binding: BindingMode,
    /// SPIFFE ids (exact or `…/*`) accepted on an `auth = "mtls"` route.
    pub spiffe_ids: Vec<String>,
    /// Largest request body accepted.
    pub max_body_bytes: Option<u64>,
    /// Time to wait for response headers.
    pub timeout: std::time::Duration,
    /// Workload ids (SPIFFE ids, client ids) allowed here, for policies.
    pub workloads: Vec<String>,
    /// Header names with `_` pass (identity look-alikes never do).
    pub allow_underscore_headers: bool,
    /// The client's `Authorization` and `DPoP` reach the upstream (the
    /// route's `forward_authorization`, else `[proxy]`'s).
    pub forward_authorization: bool,
    /// What the upstream receives about the caller: the assertion's
    /// audience and the plain identity headers.
    pub identity: RouteIdentity,
}

/// All routes, indexed by host.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_host: HashMap<String, Vec<Arc<Route>>>,
    any_host: Vec<Arc<Route>>,
}

fn path_matches(path: &str, prefix: &str) -> bool {
    // `/api` matches `/api`, `/api/x` and `/api?…`, never `/apix`.
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

impl RouteTable {
    /// Builds the table from validated config.
    pub fn new(cfg: &Config) -> Self {
        let mut t = RouteTable::default();
        for rc in &cfg.routes {
            let route = Arc::new(build_route(rc, cfg));
            let host = rc.host.to_ascii_lowercase();
            if host == "*" {
                t.any_host.push(route);
            } else {
                t.by_host.entry(host).or_default().push(route);
            }
        }
        // INVARIANT: each list is sorted longest prefix first, so the first match wins.
        for v in t
            .by_host
            .values_mut()
            .chain(std::iter::once(&mut t.any_host))
        {
            v.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        }
        t
    }

    /// Finds the route for a host (without port) and path; host-specific
    /// routes win over `*` routes. The host is asked for only when some
    /// route is bound to one (reading it costs a header lookup per request).
    pub fn lookup<'h>(&self, host: impl FnOnce() -> &'h str, path: &str) -> Option<&Arc<Route>> {
        let find = |v: &'_ [Arc<Route>]| -> Option<usize> {
            v.iter().position(|r| path_matches(path, &r.path_prefix))
        };
        if !self.by_host.is_empty() {
            let host = host();
            let lower;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = host.to_ascii_lowercase();
                lower.as_str()
            } else {
                host
            };
            if let Some(v) = self.by_host.get(host)
                && let Some(i) = find(v)
            {
                return v.get(i);
            }
        }
        find(&self.any_host).and_then(|i| self.any_host.get(i))
    }
}

/// `X-Portcullis-Route`'s value for a route `name` (`None` when the name is
/// not a valid header value).
fn name_header(name: &str) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(name).ok()
}

fn build_route(rc: &RouteConfig, cfg: &Config) -> Route {
    // INVARIANT: Config::validate checked that the upstream parses as an http(s) URL.
    let upstream: Uri = rc.upstream.parse().unwrap_or_default();
    let base = upstream.path().trim_end_matches('/').to_owned();
    Route {
        name: rc.name.clone(),
        name_header: name_header(&rc.name),
        metric_handles: RouteMetricHandles::default(),
        path_prefix: rc.path_prefix.clone(),
        upstream,
        upstream_base_path: base,
        sensitivity: rc.sensitivity,
        auth: rc.auth,
        issuers: rc.issuers.clone(),
        binding: rc.binding,
        spiffe_ids: rc.spiffe_ids.clone(),
        max_body_bytes: rc.max_body_bytes,
        timeout: std::time::Duration::from_millis(rc.timeout_ms.unwrap_or(cfg.upstream.timeout_ms)),
        workloads: rc.workloads.clone(),
        allow_underscore_headers: rc.allow_underscore_headers,
        forward_authorization: rc
            .forward_authorization
            .unwrap_or(cfg.proxy.forward_authorization),
        identity: RouteIdentity::new(rc),
    }
}

/// What a route's upstream receives about the caller.
#[derive(Debug, Clone)]
pub struct RouteIdentity {
    /// The assertion's `aud` (the route's `assertion_audience`, else its name).
    pub audience: String,
    /// The plain identity headers, with the field each one carries.
    pub headers: Vec<(IdentityField, http::HeaderName)>,
}

/// A field of the caller's identity a plain header can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityField {
    /// The subject.
    User,
    /// The email address, when known.
    Email,
    /// Group names, comma-separated.
    Groups,
    /// The device id.
    Device,
}

impl RouteIdentity {
    /// From a validated route config.
    pub fn new(rc: &crate::config::RouteConfig) -> Self {
        let headers = rc
            .identity_headers
            .named()
            .filter_map(|(field, name)| {
                let f = match field {
                    "user" => IdentityField::User,
                    "email" => IdentityField::Email,
                    "groups" => IdentityField::Groups,
                    _ => IdentityField::Device,
                };
                // INVARIANT: Config::validate checked every name parses.
                http::HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .map(|n| (f, n))
            })
            .collect();
        Self {
            audience: rc
                .assertion_audience
                .clone()
                .unwrap_or_else(|| rc.name.clone()),
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{name_header, path_matches};

    #[test]
    fn route_header_follows_the_name() {
        let text = |n: &str| name_header(n).map(|h| h.as_bytes().to_vec());
        assert_eq!(text("app").as_deref(), Some(&b"app"[..]));
        assert_eq!(text("app").as_deref(), Some(&b"app"[..]));
        assert_eq!(text("api").as_deref(), Some(&b"api"[..]));
        assert_eq!(text("bad\nname"), None);
        assert_eq!(text("api").as_deref(), Some(&b"api"[..]));
    }

    #[test]
    fn prefix_respects_segments() {
        assert!(path_matches("/api", "/api"));
        assert!(path_matches("/api/x", "/api"));
        assert!(!path_matches("/apix", "/api"));
        assert!(path_matches("/anything", "/"));
        assert!(path_matches("/api/x", "/api/"));
    }
}

/// Per-route metric handles (prometheus-client metrics are shared `Arc`s, so a
/// handle counts into the same series as the family lookup would).
#[derive(Debug, Default)]
pub struct RouteMetricHandles {
    /// Upstream latency histogram.
    pub upstream: std::sync::OnceLock<crate::telemetry::sharded::Histogram>,
    /// Request counters for the statuses a route answers most.
    pub by_status: [std::sync::OnceLock<crate::telemetry::sharded::Counter>; COMMON_STATUSES.len()],
}

/// Statuses with a cached counter per route; others go through the family.
pub const COMMON_STATUSES: [u16; 8] = [200, 204, 304, 401, 403, 404, 502, 504];
