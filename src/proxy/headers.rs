//! Header hygiene: hop-by-hop headers out, client-sent identity headers out,
//! forwarding headers in. Runs on every forwarded request and response.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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

/// Removes hop-by-hop headers, including every header the `Connection`
/// header names, and `Keep-Alive` / `Proxy-Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        remove_connection_named(headers);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// Removes the configured identity headers the client must not set.
pub fn strip_identity(headers: &mut HeaderMap, names: &[HeaderName]) {
    for n in names {
        headers.remove(n);
    }
}

/// The protocol an `Upgrade` request asks for, when it is a real HTTP/1.1
/// upgrade (`Connection: upgrade` plus `Upgrade: …`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/-Proto/-Host`, replacing anything the client sent.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: std::net::IpAddr,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    // An address is at most 45 bytes as text: format it on the stack.
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    if std::io::Write::write_fmt(&mut w, format_args!("{client_ip}")).is_ok() {
        let n = 64 - w.len();
        if let Ok(v) = HeaderValue::from_bytes(&buf[..n]) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(v) => {
            headers.insert(&X_FORWARDED_HOST, v);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}
