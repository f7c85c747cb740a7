//! The `htu` comparison of RFC 9449 §4.3: both the proof's `htu` and the
//! request's own URI are normalised (RFC 3986 §6.2.2 syntax-based and
//! §6.2.3 scheme-based) and compared as strings.
//!
//! The request's URI is the proxy's external one: `https://` + the `Host`
//! (HTTP/1.1) or `:authority` (HTTP/2) as received + the raw path, never the
//! rewritten upstream URL and never `X-Forwarded-*`.

/// Longest `htu` accepted.
pub const MAX_HTU_LEN: usize = 4096;

/// Why a URI cannot be used as an `htu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HtuError {
    /// It carries a query or fragment (RFC 9449 §4.2: `htu` is sent without them).
    QueryOrFragment,
    /// Not an absolute http(s) URI, or malformed.
    Malformed,
}

/// Normalises an absolute `http`/`https` URI: lowercase scheme and host,
/// default port removed, percent-encoding normalised (unreserved characters
/// decoded, hex digits uppercase), dot-segments removed, empty path → `/`.
/// User info, queries and fragments are refused.
pub fn normalize(uri: &str) -> Result<String, HtuError> {
    if uri.len() > MAX_HTU_LEN {
        return Err(HtuError::Malformed);
    }
    if uri.contains(['?', '#']) {
        return Err(HtuError::QueryOrFragment);
    }
    if uri.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(HtuError::Malformed);
    }
    let (scheme, rest) = uri.split_once("://").ok_or(HtuError::Malformed)?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return Err(HtuError::Malformed),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains(['@', '%']) {
        return Err(HtuError::Malformed);
    }
    let (host, port) = split_host_port(authority)?;
    if host.is_empty() {
        return Err(HtuError::Malformed);
    }
    let mut out = String::with_capacity(uri.len());
    out.push_str(&scheme);
    out.push_str("://");
    for c in host.chars() {
        out.push(c.to_ascii_lowercase());
    }
    match port {
        Some(p) if p != default_port => {
            out.push(':');
            out.push_str(&p.to_string());
        }
        _ => {}
    }
    let path = normalize_percent(path)?;
    let path = remove_dot_segments(&path);
    if path.is_empty() {
        out.push('/');
    } else {
        out.push_str(&path);
    }
    Ok(out)
}

/// The request's external URI, normalised: `scheme://authority/path`.
pub fn request_uri(scheme: &str, authority: &str, path: &str) -> Result<String, HtuError> {
    let mut s = String::with_capacity(scheme.len() + 3 + authority.len() + path.len());
    s.push_str(scheme);
    s.push_str("://");
    s.push_str(authority);
    s.push_str(path);
    normalize(&s)
}

fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), HtuError> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (inner, after) = v6.split_once(']').ok_or(HtuError::Malformed)?;
        let host = &authority[..inner.len() + 2];
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or(HtuError::Malformed)?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        // RFC 3986 §6.2.3: an empty port is the default port.
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| HtuError::Malformed)?)
        }
        Some(_) => return Err(HtuError::Malformed),
    };
    Ok((host, port))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Decodes percent-encoded unreserved characters and uppercases the hex
/// digits of the others (RFC 3986 §6.2.2.1–2).
fn normalize_percent(path: &str) -> Result<String, HtuError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(HtuError::Malformed)?;
            let s = std::str::from_utf8(hex).map_err(|_| HtuError::Malformed)?;
            let v = u8::from_str_radix(s, 16).map_err(|_| HtuError::Malformed)?;
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push_str(&s.to_ascii_uppercase());
            }
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path;
    let mut out = String::with_capacity(path.len());
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest;
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") {
            input = &input[3..];
            pop_segment(&mut out);
        } else if input == "/.." {
            input = "/";
            pop_segment(&mut out);
        } else if input == "." || input == ".." {
            input = "";
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            out.push_str(&input[..end]);
            input = &input[end..];
        }
    }
    out
}

fn pop_segment(out: &mut String) {
    match out.rfind('/') {
        Some(i) => out.truncate(i),
        None => out.clear(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalises_as_rfc_3986_says() {
        let n = |s: &str| normalize(s).unwrap();
        assert_eq!(
            n("https://server.example.com/token"),
            "https://server.example.com/token"
        );
        assert_eq!(
            n("HTTPS://Server.EXAMPLE.com:443/token"),
            "https://server.example.com/token"
        );
        assert_eq!(n("http://a.example:80"), "http://a.example/");
        assert_eq!(n("https://a.example:"), "https://a.example/");
        assert_eq!(n("https://a.example:8443/x"), "https://a.example:8443/x");
        assert_eq!(n("https://a.example:08443/x"), "https://a.example:8443/x");
        assert_eq!(n("https://a.example/a/./b/../c"), "https://a.example/a/c");
        assert_eq!(
            n("https://a.example/%7euser/%2fx%2Fy"),
            "https://a.example/~user/%2Fx%2Fy"
        );
        assert_eq!(n("https://a.example/%2E%2E/x"), "https://a.example/x");
        assert_eq!(n("https://[::1]:443/x"), "https://[::1]/x");
        assert_eq!(n("https://[::1]:8443/x"), "https://[::1]:8443/x");
        // Case of the path is significant.
        assert_ne!(n("https://a.example/X"), n("https://a.example/x"));
    }

    #[test]
    fn refuses_what_an_htu_must_not_be() {
        assert_eq!(
            normalize("https://a.example/x?q=1"),
            Err(HtuError::QueryOrFragment)
        );
        assert_eq!(
            normalize("https://a.example/x#f"),
            Err(HtuError::QueryOrFragment)
        );
        assert_eq!(
            normalize("https://a.example/?"),
            Err(HtuError::QueryOrFragment)
        );
        for bad in [
            "ftp://a.example/x",
            "https:/a.example/x",
            "/x",
            "https://user@a.example/x",
            "https://a.example:99999/x",
            "https://a.example:x/x",
            "https:///x",
            "https://a.example/%zz",
            "https://a.example/%4",
            "https://a.example/a b",
            "https://[::1/x",
        ] {
            assert_eq!(normalize(bad), Err(HtuError::Malformed), "{bad}");
        }
    }

    #[test]
    fn request_uri_is_built_from_authority_and_path() {
        assert_eq!(
            request_uri("https", "App.Example:443", "/a/../b").unwrap(),
            "https://app.example/b"
        );
    }

    /// Arbitrary input never panics; a normalised URI normalises to itself.
    #[test]
    fn normalisation_is_total_and_idempotent() {
        let pieces = [
            "https://",
            "http://",
            "HTTPS://",
            "a.example",
            "A.EXAMPLE",
            ":443",
            ":80",
            ":8443",
            ":",
            "[::1]",
            "[",
            "]",
            "/",
            "/.",
            "/..",
            "./",
            "../",
            "%2e",
            "%2F",
            "%7E",
            "%",
            "%4",
            "x",
            "?",
            "#",
            "@",
            " ",
            "\u{e9}",
            "//",
        ];
        let strategy = proptest::collection::vec(proptest::sample::select(pieces.to_vec()), 1..=8);
        proptest::proptest!(
            proptest::test_runner::Config::with_cases(20_000),
            |(parts in strategy)| {
                let s: String = parts.concat();
                if let Ok(n) = normalize(&s) {
                    let again = normalize(&n);
                    proptest::prop_assert_eq!(again.as_deref(), Ok(n.as_str()), "from {:?}", s);
                    proptest::prop_assert!(!n.contains(['?', '#']));
                }
            }
        );
    }

    #[test]
    fn dot_segments_follow_the_rfc_examples() {
        assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
        assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
        assert_eq!(remove_dot_segments("/../x"), "/x");
        assert_eq!(remove_dot_segments("/a/.."), "/");
    }
}
