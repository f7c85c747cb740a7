//! Who a client certificate names: the device id (by a configured
//! [`DeviceIdRule`]) or, for a SPIFFE SVID, the workload.
//!
//! The certificate's names were read once per connection
//! ([`PeerCertificate`]); applying a rule is string matching, no parsing.

use std::collections::HashMap;
use std::fmt;

pub use crate::config::parsed::{DeviceIdRule, MAX_DEVICE_ID_LEN};
use crate::tls::PeerCertificate;

/// The certificate names more than one device under the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("client certificate names more than one device")]
pub struct AmbiguousDevice;

impl DeviceIdRule {
    /// The device the certificate names, if any.
    pub fn device_id(
        &self,
        cert: &PeerCertificate,
        directory: &dyn DeviceDirectory,
    ) -> Result<Option<String>, AmbiguousDevice> {
        match self {
            Self::SanUri { prefix, suffix } => unique(cert.uris.iter().filter_map(|u| {
                match_template(u, prefix, suffix, false).filter(|id| valid_id(id, false))
            })),
            Self::SanDns { prefix, suffix } => unique(cert.dns_names.iter().filter_map(|d| {
                match_template(d, prefix, suffix, true).filter(|id| valid_id(id, true))
            })),
            Self::CommonName => Ok(cert
                .common_name
                .as_deref()
                .map(str::trim)
                .filter(|cn| valid_id(cn, false))
                .map(str::to_owned)),
            Self::Thumbprint => Ok(directory.device_for_thumbprint(&cert.sha256)),
        }
    }
}

fn match_template<'a>(
    name: &'a str,
    prefix: &str,
    suffix: &str,
    ignore_case: bool,
) -> Option<&'a str> {
    if name.len() < prefix.len() + suffix.len() {
        return None;
    }
    let (head, rest) = name.split_at_checked(prefix.len())?;
    let (id, tail) = rest.split_at_checked(rest.len() - suffix.len())?;
    let eq = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    (eq(head, prefix) && eq(tail, suffix)).then_some(id)
}

/// A device id is 1–256 bytes of visible ASCII without `/ ? # \` or spaces;
/// from a DNS name it is one label.
fn valid_id(id: &str, dns_label: bool) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"/?#\\\"".contains(&b))
        && !(dns_label && id.contains('.'))
}

fn unique<'a>(mut ids: impl Iterator<Item = &'a str>) -> Result<Option<String>, AmbiguousDevice> {
    let Some(first) = ids.next() else {
        return Ok(None);
    };
    if ids.any(|other| other != first) {
        return Err(AmbiguousDevice);
    }
    Ok(Some(first.to_owned()))
}

/// Maps a certificate's SHA-256 thumbprint to a device id, for the
/// `thumbprint` rule. MDM feeds will register thumbprints at enrolment;
/// [`StaticDirectory`] (from `binding.device_thumbprints`) is the first
/// implementation. Lookups are on the hot path: in memory, no I/O.
pub trait DeviceDirectory: Send + Sync + fmt::Debug {
    /// The device enrolled with this certificate, if any.
    fn device_for_thumbprint(&self, sha256: &[u8; 32]) -> Option<String>;
}

/// A fixed thumbprint → device map from config.
#[derive(Debug, Default, Clone)]
pub struct StaticDirectory {
    by_thumbprint: HashMap<[u8; 32], String>,
}

impl StaticDirectory {
    /// Builds the map from `x5t#S256`-form keys; malformed keys are skipped
    /// (config validation refuses them first).
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a String, &'a String)>) -> Self {
        let by_thumbprint = entries
            .into_iter()
            .filter_map(|(k, v)| super::mtls::decode_x5t(k).map(|h| (h, v.clone())))
            .collect();
        Self { by_thumbprint }
    }
}

impl DeviceDirectory for StaticDirectory {
    fn device_for_thumbprint(&self, sha256: &[u8; 32]) -> Option<String> {
        self.by_thumbprint.get(sha256).cloned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(cn: Option<&str>, uris: &[&str], dns: &[&str]) -> PeerCertificate {
        PeerCertificate {
            der: rustls_pki_types::CertificateDer::from(vec![1u8, 2, 3]),
            sha256: [7; 32],
            not_after: i64::MAX,
            common_name: cn.map(str::to_owned),
            uris: uris.iter().map(|s| (*s).to_owned()).collect(),
            dns_names: dns.iter().map(|s| (*s).to_owned()).collect(),
            spiffe_id: None,
        }
    }

    #[test]
    fn rules_parse_and_print() {
        for r in [
            "san-uri:device://{id}",
            "san-dns:{id}.devices.example",
            "cn",
            "thumbprint",
        ] {
            assert_eq!(DeviceIdRule::parse(r).unwrap().to_string(), r);
        }
        for bad in [
            "san-uri:device://",
            "san-uri:{id}",
            "san-uri:{id}{id}x",
            "serial",
            "",
        ] {
            assert!(DeviceIdRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_rule_reads_its_name() {
        let dir = StaticDirectory::default();
        let c = cert(
            Some("laptop-cn"),
            &["https://x.example/", "device://laptop-001"],
            &["laptop-7.devices.example", "other.example"],
        );
        let rule = |r: &str| DeviceIdRule::parse(r).unwrap().device_id(&c, &dir);
        assert_eq!(
            rule("san-uri:device://{id}").unwrap().as_deref(),
            Some("laptop-001")
        );
        assert_eq!(
            rule("san-dns:{id}.Devices.Example").unwrap().as_deref(),
            Some("laptop-7")
        );
        assert_eq!(rule("cn").unwrap().as_deref(), Some("laptop-cn"));
        assert_eq!(rule("san-uri:urn:dev:{id}").unwrap(), None);
        assert_eq!(rule("thumbprint").unwrap(), None);
    }

    #[test]
    fn bad_or_ambiguous_names_are_not_devices() {
        let dir = StaticDirectory::default();
        let r = DeviceIdRule::parse("san-uri:device://{id}").unwrap();
        let two = cert(None, &["device://a", "device://b"], &[]);
        assert_eq!(r.device_id(&two, &dir), Err(AmbiguousDevice));
        let same = cert(None, &["device://a", "device://a"], &[]);
        assert_eq!(r.device_id(&same, &dir).unwrap().as_deref(), Some("a"));
        let nested = cert(None, &["device://a/b", "device://"], &[]);
        assert_eq!(r.device_id(&nested, &dir).unwrap(), None);
        let dns = DeviceIdRule::parse("san-dns:{id}.devices.example").unwrap();
        let deep = cert(None, &[], &["a.b.devices.example"]);
        assert_eq!(dns.device_id(&deep, &dir).unwrap(), None);
    }

    #[test]
    fn thumbprint_rule_uses_the_directory() {
        let key = crate::binding::mtls::encode_x5t(&[7; 32]);
        let map = [(key, "enrolled-1".to_owned())];
        let dir = StaticDirectory::new(map.iter().map(|(k, v)| (k, v)));
        let c = cert(None, &[], &[]);
        let r = DeviceIdRule::Thumbprint;
        assert_eq!(
            r.device_id(&c, &dir).unwrap().as_deref(),
            Some("enrolled-1")
        );
    }
}
