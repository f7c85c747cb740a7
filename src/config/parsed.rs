//! Parsed forms of config values that the phases use at run time: SPIFFE ids,
//! client-auth host patterns, device-id rules, CIDR blocks, certificate
//! thumbprints. They live here so config validates them without importing a
//! phase; `tls`, `binding` and `policy` re-export them where they are used.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;

/// Longest SPIFFE id accepted (the SPIFFE spec's limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A SPIFFE id, `spiffe://<trust domain><path>`, checked against the SPIFFE
/// ID spec: lowercase trust domain of `[a-z0-9.-_]`, path segments of
/// `[A-Za-z0-9.-_]`, no empty, `.` or `..` segment, no trailing slash, no
/// query, fragment, port or user info.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain, such as `prod.example.org`.
    pub trust_domain: String,
    /// Path, empty or starting with `/`.
    pub path: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl SpiffeId {
    /// Parses a SPIFFE id; the message says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(format!("longer than {MAX_SPIFFE_ID_LEN} bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or("must start with `spiffe://`")?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Self::check_trust_domain(td)?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err("path segments must not be empty, `.` or `..`".into());
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err("path may hold only letters, digits, `-`, `.`, `_` and `/`".into());
                }
            }
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Checks a trust domain name: lowercase letters, digits, `-`, `.`, `_`.
    pub fn check_trust_domain(td: &str) -> Result<(), String> {
        if td.is_empty() {
            return Err("trust domain is empty".into());
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(format!(
                "trust domain `{td}` may hold only lowercase letters, digits, `-`, `.` and `_`"
            ));
        }
        Ok(())
    }
}

/// SNI names that request a client certificate: exact names, `*.parent`
/// (one label), or `*` for every name including none.
#[derive(Debug, Clone, Default)]
pub struct HostSet {
    exact: Vec<String>,
    parents: Vec<String>,
    any: bool,
}

impl HostSet {
    /// Builds the set from validated patterns.
    pub fn new(patterns: &[String]) -> Self {
        let mut set = HostSet::default();
        for p in patterns {
            let p = p.trim_end_matches('.').to_ascii_lowercase();
            if p == "*" {
                set.any = true;
            } else if let Some(parent) = p.strip_prefix("*.") {
                set.parents.push(parent.to_owned());
            } else {
                set.exact.push(p);
            }
        }
        set
    }

    /// Checks one pattern's shape.
    pub fn check_pattern(p: &str) -> Result<(), String> {
        if p == "*" {
            return Ok(());
        }
        let name = p.strip_prefix("*.").unwrap_or(p);
        let ok = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if ok {
            Ok(())
        } else {
            Err(format!(
                "`{p}` is not a host name, `*.parent` or `*` (no ports, no other wildcards)"
            ))
        }
    }

    /// True when nothing is listed.
    pub fn is_empty(&self) -> bool {
        !self.any && self.exact.is_empty() && self.parents.is_empty()
    }

    /// Whether handshakes for this name (SNI or request host, without port) ask for a certificate.
    pub fn contains(&self, name: &str) -> bool {
        if self.any {
            return true;
        }
        let name = name.trim_end_matches('.');
        if self.exact.iter().any(|e| e.eq_ignore_ascii_case(name)) {
            return true;
        }
        name.split_once('.')
            .is_some_and(|(_, parent)| self.parents.iter().any(|p| p.eq_ignore_ascii_case(parent)))
    }

    /// Whether a handshake with this SNI (none for IP-address clients) asks.
    pub fn contains_sni(&self, sni: Option<&str>) -> bool {
        match sni {
            Some(n) => self.contains(n),
            None => self.any,
        }
    }
}

/// Longest device id accepted from a certificate or a thumbprint map.
pub const MAX_DEVICE_ID_LEN: usize = 256;

/// How the device id is read from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIdRule {
    /// A URI SAN matching `prefix{id}suffix`, e.g. `san-uri:device://{id}`.
    SanUri {
        /// Text before `{id}`.
        prefix: String,
        /// Text after `{id}`.
        suffix: String,
    },
    /// A DNS SAN matching `prefix{id}suffix` (case-insensitive; the id is one
    /// label), e.g. `san-dns:{id}.devices.example`.
    SanDns {
        /// Text before `{id}`, lowercase.
        prefix: String,
        /// Text after `{id}`, lowercase.
        suffix: String,
    },
    /// The subject common name.
    CommonName,
    /// The certificate's SHA-256 thumbprint, looked up in a [`DeviceDirectory`].
    Thumbprint,
}

impl DeviceIdRule {
    /// Parses `san-uri:<template>`, `san-dns:<template>`, `cn` or `thumbprint`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let template = |t: &str| -> Result<(String, String), String> {
            let (prefix, suffix) = t
                .split_once("{id}")
                .ok_or_else(|| format!("`{t}` must contain `{{id}}` once"))?;
            if suffix.contains("{id}") {
                return Err(format!("`{t}` must contain `{{id}}` once"));
            }
            if prefix.is_empty() && suffix.is_empty() {
                return Err("a template of only `{id}` would take any name as a device".into());
            }
            Ok((prefix.to_owned(), suffix.to_owned()))
        };
        if let Some(t) = s.strip_prefix("san-uri:") {
            let (prefix, suffix) = template(t)?;
            return Ok(Self::SanUri { prefix, suffix });
        }
        if let Some(t) = s.strip_prefix("san-dns:") {
            let (prefix, suffix) = template(&t.to_ascii_lowercase())?;
            return Ok(Self::SanDns { prefix, suffix });
        }
        match s {
            "cn" => Ok(Self::CommonName),
            "thumbprint" => Ok(Self::Thumbprint),
            _ => Err(format!(
                "`{s}` is not a rule; use `san-uri:<template>`, `san-dns:<template>`, `cn` or `thumbprint`"
            )),
        }
    }
}

impl fmt::Display for DeviceIdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SanUri { prefix, suffix } => write!(f, "san-uri:{prefix}{{id}}{suffix}"),
            Self::SanDns { prefix, suffix } => write!(f, "san-dns:{prefix}{{id}}{suffix}"),
            Self::CommonName => f.write_str("cn"),
            Self::Thumbprint => f.write_str("thumbprint"),
        }
    }
}

/// The zone of an address that no `[[network.zones]]` entry contains.
pub const OTHER_ZONE: &str = "other";

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max)?,
        None => max,
    };
    Some((ip, len))
}

/// Decodes an `x5t#S256` value: base64url without padding of 32 bytes.
pub fn decode_x5t(s: &str) -> Option<[u8; 32]> {
    if s.len() != 43 {
        return None;
    }
    let mut out = [0u8; 32];
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(s, &mut out) {
        Ok(32) => Some(out),
        _ => None,
    }
}
