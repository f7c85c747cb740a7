//! Header hygiene: hop-by-hop headers out, client-sent identity headers out,
//! forwarding headers in. Runs on every forwarded request and response.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

// The headers the proxy sets for the upstream: stripped whatever the strip
// list says, and an underscored look-alike of one never passes either.
use crate::config::PROXY_SET_HEADERS as PROXY_SET;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies drop.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including every header the `Connection`
/// header names, and `Keep-Alive` / `Proxy-Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // What `Connection` names goes first, while it is still there to read.
    // Its tokens are read once; a name is built only for a token that names
    // a header present (usually none: `keep-alive` or `close`).
    let mut named: Vec<HeaderName> = Vec::new();
    for t in connection_tokens(headers) {
        if !t.is_empty()
            && !is_hop_by_hop_token(t)
            && headers.contains_key(t)
            && let Ok(n) = HeaderName::from_bytes(t.as_bytes())
        {
            named.push(n);
        }
    }
    for n in named {
        headers.remove(n);
    }
    // A message carries a handful of names: scan them for the few that go
    // instead of hashing nine names for `remove`s that usually find nothing.
    while let Some(n) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
        headers.remove(n);
    }
}

/// A `Connection` token that names a header removed below anyway
/// (`keep-alive` and `upgrade` are the usual ones): no lookup needed, which
/// spares parsing the token into a header name on nearly every message.
/// (`close` is looked up: a header of that name goes too.)
fn is_hop_by_hop_token(t: &str) -> bool {
    t.eq_ignore_ascii_case("keep-alive")
        || HOP_BY_HOP
            .iter()
            .any(|h| t.eq_ignore_ascii_case(h.as_str()))
        || t.eq_ignore_ascii_case("proxy-connection")
}

/// The lengths of the hop-by-hop names (`HOP_BY_HOP`, `keep-alive`,
/// `proxy-connection`) as bits: 2, 7, 10, 16, 17, 18, 19.
const HOP_BY_HOP_LENGTHS: u64 =
    (1 << 2) | (1 << 7) | (1 << 10) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19);

fn is_hop_by_hop(k: &HeaderName) -> bool {
    // A message's names are scanned on every request and response, and most
    // (`server`, `date`, `content-type`, `content-length`…) have a length no
    // hop-by-hop name has: one test instead of nine comparisons each.
    HOP_BY_HOP_LENGTHS & length_bit(k) != 0
        && (HOP_BY_HOP.contains(k) || *k == KEEP_ALIVE || *k == PROXY_CONNECTION)
}

/// The tokens of every `Connection` line, trimmed (any case, as sent).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a `Connection` line lists `token` (any case).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

/// The identity header names stripped from client requests, with a mask
/// of their lengths: a request header whose length no stripped name has
/// (most of them: `host`, `accept`, `user-agent`, `authorization`) is
/// passed over without comparing it against every name.
#[derive(Debug, Clone, Default)]
pub struct Stripped {
    names: Vec<HeaderName>,
    lengths: u64,
}

impl Stripped {
    /// The set of these names.
    pub fn new(names: Vec<HeaderName>) -> Self {
        let lengths = names.iter().fold(0, |m, n| m | length_bit(n));
        Self { names, lengths }
    }

    /// The names, in configured order.
    pub fn names(&self) -> &[HeaderName] {
        &self.names
    }

    /// Whether `name` is one of them.
    pub fn contains(&self, name: &HeaderName) -> bool {
        self.lengths & length_bit(name) != 0 && self.names.contains(name)
    }
}

/// A name's bit in a length mask (every name of 63 bytes or more shares the top bit).
fn length_bit(n: &HeaderName) -> u64 {
    1 << n.as_str().len().min(63)
}

/// Removes the configured identity headers the client must not set.
pub fn strip_identity(headers: &mut HeaderMap, names: &Stripped) {
    // A request carries a handful of headers and the list is about twenty
    // names: look for the few present instead of hashing every name for a
    // `remove` that usually finds nothing.
    while let Some(n) = headers.keys().find(|k| names.contains(k)).cloned() {
        headers.remove(n);
    }
}

/// Removes the proxy's own cookies (`names`) from every `Cookie` line, so the
/// app never holds the browser's session or bound cookie: a leaked app log or
/// a compromised app must not yield a credential for the proxy. Lines left
/// empty go; other cookies pass unchanged, in order.
pub fn strip_own_cookies(headers: &mut HeaderMap, names: &[&str]) {
    let own = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
        names.contains(&name)
    };
    let lines = headers.get_all(header::COOKIE);
    if !lines
        .iter()
        .any(|v| v.to_str().map_or(true, |s| s.split(';').any(own)))
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| {
            // A line that is not visible ASCII cannot be parsed into cookies
            // safely; it goes whole rather than pass a cookie unexamined.
            let s = v.to_str().ok()?;
            let rest: Vec<&str> = s
                .split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !own(p))
                .collect();
            if rest.is_empty() {
                return None;
            }
            HeaderValue::from_str(&rest.join("; ")).ok()
        })
        .collect();
    headers.remove(header::COOKIE);
    for v in kept {
        headers.append(header::COOKIE, v);
    }
}

/// The protocol an `Upgrade` request asks for, when it is a real HTTP/1.1
/// upgrade (`Connection: upgrade` plus `Upgrade: …`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    if connection_has(headers, "upgrade") {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The header lines the proxy sets on one upstream request, kept beside
/// the request's map instead of inserted into it: each insert hashed its
/// (long, custom) name and probed the map, about 300 instructions a line
/// for 13 lines a request, for a map the pool's own leg only walks once to
/// write it. Every name pushed here is one the client's headers were
/// stripped of ([`PROXY_SET`]), so a name is never both in the map and
/// here.
#[derive(Debug)]
pub struct SetHeaders(Vec<(&'static HeaderName, HeaderValue)>);

impl SetHeaders {
    /// Room for `n` lines.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Adds the line `name: value`. The caller sets each name once.
    pub fn push(&mut self, name: &'static HeaderName, value: HeaderValue) {
        self.0.push((name, value));
    }

    /// Drops the lines whose names `map` holds: a route's own identity
    /// header of the same name replaces the proxy's line, as an insert
    /// after it did.
    pub fn yield_to(&mut self, map: &HeaderMap) {
        self.0.retain(|(n, _)| !map.contains_key(*n));
    }

    /// The lines, in the order set.
    pub fn lines(&self) -> &[(&'static HeaderName, HeaderValue)] {
        &self.0
    }

    /// Moves the lines into `map` (hyper's leg writes the map).
    pub fn into_map(self, map: &mut HeaderMap) {
        for (n, v) in self.0 {
            map.insert(n, v);
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/-Proto/-Host` (the client's were stripped).
pub fn set_forwarded(
    set: &mut SetHeaders,
    client_ip: Option<HeaderValue>,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    // Without a value the header is absent: the strip list took the
    // client's.
    if let Some(v) = client_ip {
        set.push(&X_FORWARDED_FOR, v);
    }
    set.push(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(v) = host {
        set.push(&X_FORWARDED_HOST, v);
    }
}

/// True when `name` (lowercase, as `HeaderMap` keeps it) becomes `target`
/// once every `_` is read as `-`, the way CGI, WSGI and PHP-FPM fold names.
fn folds_to(name: &[u8], target: &[u8]) -> bool {
    name.len() == target.len()
        && name
            .iter()
            .zip(target)
            .all(|(n, t)| n == t || (*n == b'_' && *t == b'-'))
}

/// Drops header names that contain `_`: all of them by default; on a route
/// with `allow_underscore_headers`, only those that fold onto a stripped
/// identity header or one the proxy sets. Returns how many lines went.
/// Names only are logged (debug), never values.
pub fn drop_underscored(
    headers: &mut HeaderMap,
    allow: bool,
    stripped: &[HeaderName],
    request_id: &str,
) -> usize {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let b = n.as_str().as_bytes();
            b.contains(&b'_')
                && (!allow
                    || stripped.iter().any(|s| folds_to(b, s.as_str().as_bytes()))
                    || PROXY_SET.iter().any(|s| folds_to(b, s.as_bytes())))
        })
        .cloned()
        .collect();
    let mut lines = 0;
    for n in &doomed {
        lines += headers.get_all(n).iter().count();
        headers.remove(n);
    }
    if lines > 0 {
        tracing::debug!(request_id, dropped = lines, names = ?doomed, "dropped header names with `_`");
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_header_the_proxy_sets_is_always_stripped() {
        use crate::proxy::set_headers as s;
        for n in [
            s::SUBJECT,
            s::ISSUER,
            s::DEVICE,
            s::BINDING,
            s::VERIFIED_DEVICE,
            s::WORKLOAD,
            s::ROUTE,
            s::REQUEST_ID,
            s::DEVICE_COMPLIANCE,
            s::DEVICE_LIFECYCLE,
            s::SNAPSHOT,
            s::DECISION,
            crate::config::ASSERTION_HEADER,
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
        ] {
            assert!(PROXY_SET.contains(&n), "{n}");
        }
    }

    #[test]
    fn hop_by_hop_lengths_are_the_names_lengths() {
        let all: Vec<&HeaderName> = HOP_BY_HOP
            .iter()
            .chain([&KEEP_ALIVE, &PROXY_CONNECTION])
            .collect();
        assert_eq!(
            all.iter().fold(0, |m, n| m | length_bit(n)),
            HOP_BY_HOP_LENGTHS
        );
        for n in all {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in [
            "server",
            "date",
            "content-length",
            "x-connection",
            "connections",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
        }
    }

    fn map(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
                h.append(n, HeaderValue::from_static("v"));
            }
        }
        h
    }

    #[test]
    fn identity_headers_go_every_line() {
        let stripped = Stripped::new(vec![
            HeaderName::from_static("x-portcullis-subject"),
            HeaderName::from_static("x-forwarded-user"),
            HeaderName::from_static("from"),
        ]);
        let mut h = map(&[
            "x-portcullis-subject",
            "accept",
            "x-forwarded-user",
            "x-portcullis-subject",
            // Same length as a stripped name, another name: kept.
            "x-forwarded-host",
            // A standard header on the list goes too.
            "from",
        ]);
        strip_identity(&mut h, &stripped);
        // (`remove` may reorder the rest.)
        let mut kept = h.keys().map(|k| k.as_str()).collect::<Vec<_>>();
        kept.sort_unstable();
        assert_eq!(kept, ["accept", "x-forwarded-host"]);
        // Names of 63 bytes and longer share one bit, and still compare whole.
        let long = "x-".repeat(40);
        let stripped = Stripped::new(vec![HeaderName::from_bytes(long.as_bytes()).unwrap()]);
        let mut h = map(&[&long, &"y-".repeat(40)]);
        strip_identity(&mut h, &stripped);
        assert_eq!(h.len(), 1);
        assert!(!h.contains_key(long.as_str()));
    }

    #[test]
    fn own_cookies_never_reach_the_app() {
        let own = ["__Host-portcullis-session", "__Host-portcullis-bound"];
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-portcullis-session=s3cr3t; b=2"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("__Host-portcullis-bound=x"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        strip_own_cookies(&mut h, &own);
        let lines: Vec<_> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(lines, ["a=1; b=2", "c=3"]);
        // A look-alike name is another cookie, kept; no Cookie line: nothing changes.
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("__Host-portcullis-sessionx=1"),
        );
        strip_own_cookies(&mut h, &own);
        assert_eq!(
            h.get(header::COOKIE).unwrap(),
            "__Host-portcullis-sessionx=1"
        );
        let mut h = HeaderMap::new();
        strip_own_cookies(&mut h, &own);
        assert!(h.is_empty());
    }

    #[test]
    fn hop_by_hop_go() {
        let mut h = map(&["keep-alive", "proxy-connection", "te", "accept"]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }

    #[test]
    fn hop_by_hop_tokens_and_close_still_remove_their_headers() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "Keep-Alive, CLOSE, Upgrade, x-secret"),
            ("keep-alive", "timeout=5"),
            ("close", "a header named close"),
            ("upgrade", "h2c"),
            ("x-secret", "1"),
            ("x-kept", "2"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn connection_close_is_a_token() {
        let one = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(v));
            h
        };
        assert!(connection_has(&one("Close"), "close"));
        assert!(connection_has(&one("keep-alive, close"), "close"));
        assert!(!connection_has(&one("closed"), "close"));
    }

    #[test]
    fn names_the_connection_header_lists_go_in_any_case() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "X-Secret ,close"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
            ("upgrade", "websocket"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn underscored_names_go_by_default() {
        let mut h = map(&["x_portcullis_subject", "X_Custom", "x-ok"]);
        assert_eq!(drop_underscored(&mut h, false, &[], "id"), 2);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-ok"]);
    }

    #[test]
    fn allowed_routes_keep_all_but_identity_look_alikes() {
        let stripped = [HeaderName::from_static("x-forwarded-user")];
        let mut h = map(&[
            "X_Forwarded_User",
            "x_portcullis_decision",
            "x_forwarded_for",
            "x_app_tenant",
            "x_forwarded-user",
        ]);
        assert_eq!(drop_underscored(&mut h, true, &stripped, "id"), 4);
        assert_eq!(
            h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x_app_tenant"]
        );
    }
}
