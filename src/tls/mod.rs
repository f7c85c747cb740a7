//! TLS termination: server certificates chosen by SNI, optional client
//! certificates verified against configured CA bundles, ALPN h2/http1.1.
//!
//! This room loads PEM and builds rustls configs; it never decides access.
//! Client certificates are *requested but optional*, and only on the SNI
//! names in `tls.client_auth_hosts` ([`TlsConfigs::for_server_name`]), so a
//! browser on a public name is never prompted for one. A verified certificate
//! is handed to later stages in [`PeerCertificate`]; an untrusted or expired
//! one fails the handshake (see [`client_auth`]).

pub mod client_auth;
pub mod outbound;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
pub use client_auth::{ClientAuthVerifier, HostSet, SpiffeId};

/// A TLS setup error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the assembled configuration.
    #[error("tls: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// The process-wide crypto provider: aws-lc-rs, the only one in the tree.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a PEM certificate chain (leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no CERTIFICATE blocks"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

/// Reads CA bundles into a root store.
pub fn load_roots(paths: &[impl AsRef<Path>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for p in paths {
        let p = p.as_ref();
        for cert in load_certs(p)? {
            roots
                .add(cert)
                .map_err(|e| file_err(p, format!("not a usable CA certificate: {e}")))?;
        }
    }
    Ok(roots)
}

/// Chooses the server certificate by SNI; the first configured one is the
/// default for clients that send no SNI or an unknown name.
#[derive(Debug)]
pub struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Looks a name up: exact first, then a `*.` wildcard one label up.
    pub fn lookup(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.by_name.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return k.clone();
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

/// DNS names in a certificate's subjectAltName.
fn dns_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Builds the SNI resolver from config.
pub fn build_resolver(cfg: &TlsConfig, provider: &CryptoProvider) -> Result<SniResolver, TlsError> {
    let mut by_name = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in &cfg.certificates {
        let chain = load_certs(&c.cert)?;
        let key = load_key(&c.key)?;
        let ck = CertifiedKey::from_der(chain.clone(), key, provider).map_err(|e| {
            file_err(
                &c.key,
                format!("key does not fit certificate {}: {e}", c.cert.display()),
            )
        })?;
        let ck = Arc::new(ck);
        let names = if c.server_names.is_empty() {
            dns_sans(&chain[0])
        } else {
            c.server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect()
        };
        for n in names {
            if let Some(parent) = n.strip_prefix("*.") {
                wildcard
                    .entry(parent.to_owned())
                    .or_insert_with(|| ck.clone());
            } else {
                by_name.entry(n).or_insert_with(|| ck.clone());
            }
        }
        default.get_or_insert(ck);
    }
    let default = default.ok_or_else(|| TlsError::Rustls("no server certificate".into()))?;
    Ok(SniResolver {
        by_name,
        wildcard,
        default,
    })
}

/// The server configs of one TLS setup: one that never asks for a client
/// certificate, and (when client CAs are configured) one that asks, used only
/// for the SNI names in `client_auth_hosts`. Swapped whole on reload.
#[derive(Debug)]
pub struct TlsConfigs {
    /// For every name that does not request a client certificate.
    pub public: Arc<ServerConfig>,
    /// For the names that do; `None` when no client CA is configured.
    pub client_auth: Option<Arc<ServerConfig>>,
    /// The names that request a client certificate.
    pub client_auth_hosts: HostSet,
}

impl TlsConfigs {
    /// Picks the config for a ClientHello's SNI; the flag says whether it
    /// requests a client certificate.
    pub fn for_server_name(&self, sni: Option<&str>) -> (Arc<ServerConfig>, bool) {
        match &self.client_auth {
            Some(c) if self.client_auth_hosts.contains_sni(sni) => (c.clone(), true),
            _ => (self.public.clone(), false),
        }
    }
}

/// Builds the rustls server configs: TLS 1.2 and 1.3, ALPN h2 then
/// http/1.1; client certificates requested (optional) only on
/// `client_auth_hosts`, verified against the device CA bundles or, for
/// SPIFFE SVIDs, their trust domain's bundle. Reads every file now, so a
/// reload picks up changed bundles and certificates.
pub fn build_tls(cfg: &TlsConfig) -> Result<TlsConfigs, TlsError> {
    let provider = provider();
    let resolver = Arc::new(build_resolver(cfg, &provider)?);
    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))
    };
    let finish = |mut sc: ServerConfig| {
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(sc)
    };
    let public = finish(
        builder()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone()),
    );
    let client_auth = if cfg.client_ca.is_empty() && cfg.spiffe.is_empty() {
        None
    } else {
        let spiffe: Vec<(String, std::path::PathBuf)> = cfg
            .spiffe
            .iter()
            .map(|s| (s.trust_domain.clone(), s.bundle.clone()))
            .collect();
        let verifier = ClientAuthVerifier::new(&cfg.client_ca, &spiffe, &provider)?;
        Some(finish(
            builder()?
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(resolver),
        ))
    };
    Ok(TlsConfigs {
        public,
        client_auth,
        client_auth_hosts: HostSet::new(&cfg.client_auth_hosts),
    })
}

/// What the TLS handshake established about the client, handed to later stages.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// SNI the client sent.
    pub server_name: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// Whether this handshake asked for a client certificate.
    pub client_cert_requested: bool,
    /// The verified client certificate, when one was presented.
    pub peer: Option<Arc<PeerCertificate>>,
}

/// A client certificate that chained to a configured CA, with the facts
/// later stages read, parsed once per connection.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    /// The leaf certificate, DER.
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER leaf (the RFC 8705 `x5t#S256` input).
    pub sha256: [u8; 32],
    /// End of validity, seconds since the epoch (0 when unreadable: treated as expired).
    pub not_after: i64,
    /// Subject common name.
    pub common_name: Option<String>,
    /// URI subjectAltNames.
    pub uris: Vec<String>,
    /// DNS subjectAltNames, lowercase.
    pub dns_names: Vec<String>,
    /// The SPIFFE id when the certificate is an X.509-SVID (verified against
    /// its trust domain's bundle in the handshake).
    pub spiffe_id: Option<SpiffeId>,
}

impl PeerCertificate {
    /// Wraps a leaf certificate, computes its thumbprint and reads its names once.
    pub fn new(der: CertificateDer<'static>) -> Self {
        let sha256 = crate::util::sha256(der.as_ref());
        let mut me = Self {
            der,
            sha256,
            not_after: 0,
            common_name: None,
            uris: Vec::new(),
            dns_names: Vec::new(),
            spiffe_id: None,
        };
        let Ok((_, x509)) = x509_parser::parse_x509_certificate(me.der.as_ref()) else {
            return me;
        };
        me.not_after = x509.validity().not_after.timestamp();
        me.common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::URI(u) => me.uris.push((*u).to_owned()),
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        me.dns_names.push(d.to_ascii_lowercase())
                    }
                    _ => {}
                }
            }
        }
        me.spiffe_id = client_auth::leaf_spiffe_id(me.der.as_ref()).ok().flatten();
        me
    }

    /// Whether the certificate has expired at `now` (seconds since the epoch).
    pub fn expired(&self, now: u64) -> bool {
        i64::try_from(now).map_or(true, |n| n > self.not_after)
    }
}
