//! Client certificates: which SNI names ask for one ([`HostSet`]), and how a
//! presented one is verified ([`ClientAuthVerifier`]).
//!
//! Two kinds of client certificate are trusted, never across each other: a
//! SPIFFE X.509-SVID (one URI SAN `spiffe://trust-domain/path`) must chain to
//! *its own* trust domain's bundle; any other certificate must chain to the
//! device CA bundles. So a device CA cannot mint workload identities and a
//! SPIFFE authority cannot mint devices. Expired or untrusted certificates
//! fail the handshake. Presenting a certificate stays optional: routes decide
//! whether they need one.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::TlsError;
pub use crate::config::parsed::{HostSet, MAX_SPIFFE_ID_LEN, SpiffeId};

/// A leaf certificate that cannot be classified: unparsable, or claiming a
/// SPIFFE id without being a well-formed SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("client certificate is malformed or not a well-formed SPIFFE SVID")]
pub struct MalformedLeaf;

/// The SPIFFE id of a leaf certificate, if it is an SVID. An SVID has
/// exactly one URI SAN; a certificate with a `spiffe:` URI among others, or
/// an unparsable one, is malformed.
pub fn leaf_spiffe_id(der: &[u8]) -> Result<Option<SpiffeId>, MalformedLeaf> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|_| MalformedLeaf)?;
    let uris: Vec<&str> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(MalformedLeaf),
    };
    let spiffe = uris
        .iter()
        .filter(|u| {
            u.get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case("spiffe://"))
        })
        .count();
    match (spiffe, uris.len()) {
        (0, _) => Ok(None),
        (1, 1) => SpiffeId::parse(uris[0])
            .map(Some)
            .map_err(|_| MalformedLeaf),
        _ => Err(MalformedLeaf),
    }
}

/// Verifies client certificates: SVIDs against their trust domain's bundle,
/// everything else against the device CA bundles. Presenting none is allowed.
pub struct ClientAuthVerifier {
    devices: Option<Arc<dyn ClientCertVerifier>>,
    domains: HashMap<String, Arc<dyn ClientCertVerifier>>,
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ClientAuthVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuthVerifier")
            .field("devices", &self.devices.is_some())
            .field("trust_domains", &self.domains.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ClientAuthVerifier {
    /// Builds the verifier from device CA bundles and SPIFFE trust bundles
    /// (trust domain → PEM file), reading every file now.
    pub fn new(
        device_cas: &[std::path::PathBuf],
        spiffe: &[(String, std::path::PathBuf)],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let mut hints = Vec::new();
        let build = |roots: rustls::RootCertStore,
                     hints: &mut Vec<DistinguishedName>|
         -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
            hints.extend(roots.subjects());
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(format!("client CA bundle: {e}")))
        };
        let devices = if device_cas.is_empty() {
            None
        } else {
            Some(build(super::load_roots(device_cas)?, &mut hints)?)
        };
        let mut domains = HashMap::new();
        for (td, bundle) in spiffe {
            let v = build(super::load_roots(std::slice::from_ref(bundle))?, &mut hints)?;
            domains.insert(td.clone(), v);
        }
        Ok(Self {
            devices,
            domains,
            hints,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for ClientAuthVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = match leaf_spiffe_id(end_entity.as_ref()) {
            Ok(Some(id)) => self.domains.get(&id.trust_domain),
            Ok(None) => self.devices.as_ref(),
            Err(MalformedLeaf) => {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                ));
            }
        };
        let Some(verifier) = verifier else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spiffe_ids_follow_the_spec() {
        let id = SpiffeId::parse("spiffe://prod.example.org/ns/billing/sa/api").unwrap();
        assert_eq!(id.trust_domain, "prod.example.org");
        assert_eq!(id.path, "/ns/billing/sa/api");
        assert_eq!(
            id.to_string(),
            "spiffe://prod.example.org/ns/billing/sa/api"
        );
        assert!(SpiffeId::parse("spiffe://td").is_ok());
        for bad in [
            "https://td/x",
            "spiffe://",
            "spiffe://TD/x",
            "spiffe://td/",
            "spiffe://td//x",
            "spiffe://td/./x",
            "spiffe://td/../x",
            "spiffe://td/x?q",
            "spiffe://td/x#f",
            "spiffe://td:443/x",
            "spiffe://user@td/x",
            "spiffe://td/x%20y",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    /// Certificate and SPIFFE parsers never panic on arbitrary or truncated input.
    #[test]
    fn parsers_are_total_on_garbage() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://prod.test/billing".try_into().unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            leaf_spiffe_id(&der).unwrap().unwrap().to_string(),
            "spiffe://prod.test/billing"
        );
        for i in 0..der.len() {
            assert!(leaf_spiffe_id(&der[..i]).is_err());
        }
        proptest::proptest!(
            proptest::test_runner::Config::with_cases(4_000),
            |(at in proptest::arbitrary::any::<proptest::sample::Index>(), mask in 1u8..=255)| {
                let mut flipped = der.clone();
                flipped[at.index(der.len())] ^= mask;
                let _ = leaf_spiffe_id(&flipped);
                let _ = super::super::PeerCertificate::new(flipped.into());
            }
        );
        for s in [
            "",
            "spiffe:",
            "spiffe:///",
            "spiffe://a//",
            "spiffe://a/\u{e9}",
            "spiffe://-/-",
        ] {
            let _ = SpiffeId::parse(s);
        }
    }

    #[test]
    fn host_sets_match_exact_wildcard_and_any() {
        let s = HostSet::new(&["mtls.example.com".into(), "*.devices.example".into()]);
        assert!(s.contains("mtls.example.com"));
        assert!(s.contains("MTLS.Example.com."));
        assert!(s.contains("a.devices.example"));
        assert!(!s.contains("devices.example"));
        assert!(!s.contains("a.b.devices.example"));
        assert!(!s.contains("www.example.com"));
        assert!(!s.contains_sni(None));
        let any = HostSet::new(&["*".into()]);
        assert!(any.contains("x") && any.contains_sni(None));
        assert!(HostSet::check_pattern("a.example:443").is_err());
        assert!(HostSet::check_pattern("a.*.example").is_err());
        assert!(HostSet::check_pattern("*.example").is_ok());
    }
}
