//! Token binding (phase 3): a stolen token must be useless from another device.
//!
//! Reads the verified token's `cnf` and the connection's client certificate,
//! and adds a [`Binding`] to the request context: the kind (`none`, `mtls`,
//! `dpop`), the device id the certificate proves, and the SPIFFE workload.
//!
//! - `cnf.jkt` (RFC 9449): the request must use the `DPoP` scheme with a
//!   proof signed by that key ([`dpop`]); such a token under `Bearer` is refused.
//! - `cnf.x5t#S256` (RFC 8705): the connection's client certificate must have
//!   that thumbprint ([`mtls`]). Both claims present: both must hold.
//! - A token naming a device (the issuer's device claim) on a connection
//!   whose certificate names another device is refused: a token replayed
//!   from another device.
//! - `binding = "required"` routes refuse unbound tokens; `auth = "mtls"`
//!   routes take a SPIFFE workload's certificate instead of a token.
//!
//! This room must never treat a device a token merely *claims* as verified,
//! never use a key from a token header, and never log a token or proof.

pub mod certid;
pub mod dpop;
pub mod htu;
pub mod mtls;

use std::sync::Arc;

use crate::authn::{Scheme, VerifiedToken};
use crate::config::Config;
use crate::tls::{PeerCertificate, SpiffeId};
use certid::{AmbiguousDevice, DeviceDirectory, DeviceIdRule, StaticDirectory};
use dpop::{DpopError, DpopVerifier, ProofRequest};
use mtls::MtlsError;

/// How the token (or workload) is tied to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindingKind {
    /// A plain bearer token.
    None,
    /// Bound to the connection's client certificate (or a workload certificate).
    Mtls,
    /// Bound to a DPoP key.
    Dpop,
    /// A browser session whose DBSC key refreshed its bound cookie.
    Dbsc,
}

impl BindingKind {
    /// `none`, `mtls`, `dpop` or `dbsc`: the `x-portcullis-binding` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Mtls => "mtls",
            Self::Dpop => "dpop",
            Self::Dbsc => "dbsc",
        }
    }
}

/// What phase 3 established, for the policy context and the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The binding that was verified. With both `jkt` and `x5t#S256`, both
    /// were checked and this says `mtls`, the binding that ties to a device.
    pub kind: BindingKind,
    /// The device id the client certificate proves (by `binding.device_id_rule`).
    pub device: Option<String>,
    /// The SPIFFE id, when the client certificate is a workload SVID.
    pub workload: Option<SpiffeId>,
    /// The spent DPoP proof's replay key, for the cluster-wide check.
    pub dpop_replay_key: Option<[u8; 32]>,
}

/// Why a token's binding does not hold. Messages are safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// A DPoP proof check failed.
    #[error(transparent)]
    Dpop(DpopError),
    /// The certificate binding failed.
    #[error(transparent)]
    Mtls(MtlsError),
    /// The token names a device other than the one the certificate proves.
    #[error("token belongs to another device than the client certificate")]
    DeviceMismatch,
    /// The certificate names more than one device.
    #[error(transparent)]
    AmbiguousDevice(AmbiguousDevice),
    /// A `cnf.jkt` token under the `Bearer` scheme (RFC 9449 §7.2).
    #[error("DPoP-bound token presented as a bearer token")]
    DpopTokenAsBearer,
    /// The `DPoP` scheme with a token that has no `cnf.jkt`.
    #[error("token is not bound to a DPoP key")]
    NotDpopBound,
    /// `cnf` members of the wrong shape.
    #[error("token `cnf` is malformed")]
    BadConfirmation,
    /// The route requires a bound token and this one is not.
    #[error("this route requires a DPoP- or certificate-bound token")]
    Required,
}

/// Why a workload was refused on an `auth = "mtls"` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// No client certificate on this connection.
    #[error("a workload client certificate is required")]
    NoCertificate,
    /// The certificate is not a SPIFFE SVID.
    #[error("client certificate is not a SPIFFE workload certificate")]
    NotAWorkload,
    /// The SPIFFE id is not listed for this route.
    #[error("workload is not allowed on this route")]
    NotAllowed,
}

/// The request as phase 3 sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method, as received.
    pub method: &'a str,
    /// `https` on the TLS listener, `http` on the plain one.
    pub scheme: &'a str,
    /// `Host` / `:authority` as received (with port), if any.
    pub authority: Option<&'a str>,
    /// The raw path (no query).
    pub path: &'a str,
    /// Request headers (for `DPoP`).
    pub headers: &'a http::HeaderMap,
    /// The connection's verified client certificate.
    pub peer: Option<&'a PeerCertificate>,
    /// Seconds since the epoch.
    pub now: u64,
}

/// The token as phase 3 sees it.
#[derive(Debug, Clone, Copy)]
pub struct TokenView<'a> {
    /// The scheme it came under.
    pub scheme: Scheme,
    /// The compact token (for `ath`).
    pub token: &'a str,
    /// Its verified claims.
    pub verified: &'a VerifiedToken,
}

/// Phase 3's config-derived state; rebuilt on reload, the DPoP replay
/// cache and nonce key carried over.
#[derive(Debug)]
pub struct Binder {
    /// DPoP proof verification.
    pub dpop: DpopVerifier,
    /// How a certificate names its device.
    pub device_rule: Option<DeviceIdRule>,
    /// Thumbprint → device, for the `thumbprint` rule.
    pub directory: Arc<dyn DeviceDirectory>,
    /// SNI names that request client certificates (for 421 answers).
    pub client_auth_hosts: crate::tls::HostSet,
}

/// A `cnf` member that must be a string when present.
fn cnf_str<'a>(v: &'a VerifiedToken, name: &str) -> Result<Option<&'a str>, BindError> {
    match v.claims.cnf.as_ref().and_then(|c| c.get(name)) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(BindError::BadConfirmation),
    }
}

impl Binder {
    /// Builds phase 3 from config, carrying over `previous` DPoP state.
    pub fn new(cfg: &Config, previous: Option<&Binder>) -> Self {
        let b = &cfg.binding;
        Self {
            dpop: DpopVerifier::new(b, previous.map(|p| &p.dpop)),
            // INVARIANT: Config::validate parsed the rule.
            device_rule: b
                .device_id_rule
                .as_deref()
                .and_then(|r| DeviceIdRule::parse(r).ok()),
            directory: Arc::new(StaticDirectory::new(&b.device_thumbprints)),
            client_auth_hosts: crate::tls::HostSet::new(&cfg.tls.client_auth_hosts),
        }
    }

    /// Replaces the thumbprint directory (for feeds that register devices).
    pub fn with_directory(mut self, directory: Arc<dyn DeviceDirectory>) -> Self {
        self.directory = directory;
        self
    }

    /// The device the client certificate proves, if any.
    pub fn certificate_device(
        &self,
        peer: Option<&PeerCertificate>,
    ) -> Result<Option<String>, AmbiguousDevice> {
        match (peer, &self.device_rule) {
            (Some(p), Some(rule)) => rule.device_id(p, self.directory.as_ref()),
            _ => Ok(None),
        }
    }

    /// Checks a verified token's binding against this request and connection.
    pub fn bind_token(
        &self,
        req: &RequestView<'_>,
        tok: &TokenView<'_>,
        required: bool,
    ) -> Result<Binding, BindError> {
        let jkt = cnf_str(tok.verified, "jkt")?;
        let x5t = cnf_str(tok.verified, "x5t#S256")?;
        let mut kind = BindingKind::None;
        let mut dpop_replay_key = None;
        match (tok.scheme, jkt) {
            (Scheme::Bearer, Some(_)) => return Err(BindError::DpopTokenAsBearer),
            (Scheme::Dpop, None) => return Err(BindError::NotDpopBound),
            (Scheme::Bearer, None) => {}
            (Scheme::Dpop, Some(jkt)) => {
                let proof = DpopVerifier::proof_header(req.headers).map_err(BindError::Dpop)?;
                let htu = req
                    .authority
                    .and_then(|a| htu::request_uri(req.scheme, a, req.path).ok())
                    .ok_or(BindError::Dpop(DpopError::UriMismatch))?;
                let proof = self
                    .dpop
                    .verify(
                        proof,
                        &ProofRequest {
                            method: req.method,
                            htu: &htu,
                            access_token: Some(tok.token),
                            jkt: Some(jkt),
                            now: req.now,
                        },
                    )
                    .map_err(BindError::Dpop)?;
                dpop_replay_key = Some(proof.replay_key);
                kind = BindingKind::Dpop;
            }
        }
        if let Some(x5t) = x5t {
            mtls::check_x5t(x5t, req.peer).map_err(BindError::Mtls)?;
            kind = BindingKind::Mtls;
        }
        let device = self
            .certificate_device(req.peer)
            .map_err(BindError::AmbiguousDevice)?;
        if let (Some(cert), Some(claimed)) = (&device, &tok.verified.device)
            && cert.as_str() != claimed.id()
        {
            return Err(BindError::DeviceMismatch);
        }
        if required && kind == BindingKind::None {
            return Err(BindError::Required);
        }
        Ok(Binding {
            kind,
            device,
            workload: req.peer.and_then(|p| p.spiffe_id.clone()),
            dpop_replay_key,
        })
    }

    /// Accepts a SPIFFE workload by its certificate on an `auth = "mtls"` route.
    pub fn bind_workload(
        &self,
        peer: Option<&PeerCertificate>,
        allowed: &[String],
    ) -> Result<Binding, WorkloadError> {
        let peer = peer.ok_or(WorkloadError::NoCertificate)?;
        let id = peer.spiffe_id.as_ref().ok_or(WorkloadError::NotAWorkload)?;
        if !spiffe_allowed(allowed, id) {
            return Err(WorkloadError::NotAllowed);
        }
        Ok(Binding {
            kind: BindingKind::Mtls,
            device: None,
            workload: Some(id.clone()),
            dpop_replay_key: None,
        })
    }
}

/// Whether `id` matches one of `patterns`: exact, or `…/*` for any id below that path.
pub fn spiffe_allowed(patterns: &[String], id: &SpiffeId) -> bool {
    let id = id.to_string();
    patterns.iter().any(|p| match p.strip_suffix("/*") {
        Some(prefix) => id
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
        None => *p == id,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spiffe_patterns_match_exact_and_below() {
        let id = SpiffeId::parse("spiffe://prod.test/ns/billing/api").unwrap();
        let p = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert!(spiffe_allowed(
            &p(&["spiffe://prod.test/ns/billing/api"]),
            &id
        ));
        assert!(spiffe_allowed(
            &p(&["spiffe://prod.test/ns/billing/*"]),
            &id
        ));
        assert!(spiffe_allowed(&p(&["spiffe://prod.test/*"]), &id));
        assert!(!spiffe_allowed(&p(&["spiffe://prod.test/ns/bill/*"]), &id));
        assert!(!spiffe_allowed(&p(&["spiffe://prod.test/ns/billing"]), &id));
        assert!(!spiffe_allowed(&p(&["spiffe://other.test/*"]), &id));
    }
}
