//! Certificate-bound access tokens (RFC 8705 §3): a token carrying
//! `cnf.x5t#S256` is honoured only on a connection whose client certificate
//! has that SHA-256 thumbprint.
//!
//! The thumbprint was computed once per connection ([`PeerCertificate`]);
//! the check is a base64url decode and a constant-time compare.

use base64::Engine as _;

pub use crate::config::parsed::decode_x5t;
use crate::tls::PeerCertificate;

/// Why a certificate binding does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MtlsError {
    /// The connection presented no client certificate.
    #[error("token is bound to a client certificate and none was presented")]
    NoCertificate,
    /// `cnf.x5t#S256` is not a base64url SHA-256.
    #[error("token `cnf.x5t#S256` is malformed")]
    Malformed,
    /// The presented certificate has another thumbprint.
    #[error("token is bound to another client certificate")]
    Mismatch,
}

/// Encodes a SHA-256 as `x5t#S256`.
pub fn encode_x5t(sha256: &[u8; 32]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha256)
}

/// Checks a token's `cnf.x5t#S256` against the certificate presented on
/// this connection, in constant time.
pub fn check_x5t(x5t: &str, peer: Option<&PeerCertificate>) -> Result<(), MtlsError> {
    let peer = peer.ok_or(MtlsError::NoCertificate)?;
    let want = decode_x5t(x5t).ok_or(MtlsError::Malformed)?;
    aws_lc_rs::constant_time::verify_slices_are_equal(&want, &peer.sha256)
        .map_err(|_| MtlsError::Mismatch)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(sha256: [u8; 32]) -> PeerCertificate {
        PeerCertificate {
            der: rustls_pki_types::CertificateDer::from(vec![0u8]),
            sha256,
            not_after: i64::MAX,
            common_name: None,
            uris: Vec::new(),
            dns_names: Vec::new(),
            spiffe_id: None,
        }
    }

    #[test]
    fn thumbprint_must_match_the_presented_certificate() {
        let p = peer([9; 32]);
        let good = encode_x5t(&[9; 32]);
        assert_eq!(check_x5t(&good, Some(&p)), Ok(()));
        assert_eq!(
            check_x5t(&encode_x5t(&[8; 32]), Some(&p)),
            Err(MtlsError::Mismatch)
        );
        assert_eq!(check_x5t(&good, None), Err(MtlsError::NoCertificate));
        assert_eq!(check_x5t("abc", Some(&p)), Err(MtlsError::Malformed));
        assert_eq!(
            check_x5t(&format!("{good}="), Some(&p)),
            Err(MtlsError::Malformed)
        );
    }

    #[test]
    fn x5t_round_trips() {
        let h = crate::util::sha256(b"certificate");
        assert_eq!(decode_x5t(&encode_x5t(&h)), Some(h));
    }
}
