//! Development PKI and signing keys for the demo (and for tests): a CA, leaf
//! certificates it signs, and JWT signing keys with their public JWKs.
//! Nothing here is for production use.

use std::path::Path;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A PKI error.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key could not be used.
    #[error("key: {0}")]
    Key(String),
}

/// A development certificate authority.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa")
    }
}

/// A leaf certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
    /// Certificate DER.
    pub cert_der: Vec<u8>,
}

impl DevCa {
    /// Generates a CA with the given common name (ECDSA P-256).
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "portcullis dev");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key)?,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a server certificate for DNS names and IP addresses.
    pub fn server_cert(&self, names: &[&str]) -> Result<Leaf, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName((*n).try_into()?),
                });
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.leaf(params)
    }

    /// Issues a client certificate with a common name and optional URI SANs
    /// (such as `device://…` or `spiffe://…`).
    pub fn client_cert(&self, common_name: &str, uris: &[&str]) -> Result<Leaf, PkiError> {
        self.client_cert_with(&ClientCertSpec {
            common_name,
            uris,
            ..ClientCertSpec::default()
        })
    }

    /// Issues a client certificate as `spec` describes.
    pub fn client_cert_with(&self, spec: &ClientCertSpec<'_>) -> Result<Leaf, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for u in spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI((*u).try_into()?));
        }
        for d in spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*d).try_into()?));
        }
        let mut dn = DistinguishedName::new();
        if !spec.common_name.is_empty() {
            dn.push(DnType::CommonName, spec.common_name);
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.leaf(params)
    }

    fn leaf(&self, params: CertificateParams) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

/// What goes into a client certificate.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCertSpec<'a> {
    /// Subject CN (empty: none).
    pub common_name: &'a str,
    /// URI SANs (`device://…`, `spiffe://…`).
    pub uris: &'a [&'a str],
    /// DNS SANs.
    pub dns: &'a [&'a str],
    /// Valid only in 2020: expired.
    pub expired: bool,
}

/// A JWT signing key with its public JWK.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// `kid`.
    pub kid: String,
    /// JOSE algorithm name.
    pub alg: &'static str,
    /// Private key PEM (PKCS#8).
    pub private_pem: String,
    /// Public key PEM (SPKI).
    pub public_pem: String,
    /// Public JWK (JSON object).
    pub jwk: serde_json::Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// Generates an ES256 (P-256) key.
    pub fn es256(kid: &str) -> Result<Self, PkiError> {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = kp.public_key_raw();
        // INVARIANT: an uncompressed P-256 point is 0x04 || x(32) || y(32).
        if raw.len() != 65 || raw[0] != 4 {
            return Err(PkiError::Key("unexpected P-256 public key encoding".into()));
        }
        Ok(Self {
            kid: kid.to_owned(),
            alg: "ES256",
            private_pem: kp.serialize_pem(),
            public_pem: kp.public_key_pem(),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
        })
    }

    /// Generates an Ed25519 key.
    pub fn eddsa(kid: &str) -> Result<Self, PkiError> {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Ok(Self {
            kid: kid.to_owned(),
            alg: "EdDSA",
            private_pem: kp.serialize_pem(),
            public_pem: kp.public_key_pem(),
            jwk: serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                "x": b64(kp.public_key_raw()),
            }),
        })
    }

    /// Generates an RSA-2048 key for RS256.
    pub fn rs256(kid: &str) -> Result<Self, PkiError> {
        let kp = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;
        let der = kp.public_key_raw();
        let (n, e) = crate::util::rsa_components(der)
            .ok_or_else(|| PkiError::Key("unexpected RSA public key encoding".into()))?;
        Ok(Self {
            kid: kid.to_owned(),
            alg: "RS256",
            private_pem: kp.serialize_pem(),
            public_pem: kp.public_key_pem(),
            jwk: serde_json::json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": b64(n), "e": b64(e),
            }),
        })
    }

    /// The jsonwebtoken encoding key.
    pub fn encoding_key(&self) -> Result<jsonwebtoken::EncodingKey, PkiError> {
        let pem = self.private_pem.as_bytes();
        match self.alg {
            "ES256" => jsonwebtoken::EncodingKey::from_ec_pem(pem),
            "EdDSA" => jsonwebtoken::EncodingKey::from_ed_pem(pem),
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(pem),
        }
        .map_err(|e| PkiError::Key(e.to_string()))
    }

    /// The jsonwebtoken algorithm.
    pub fn algorithm(&self) -> jsonwebtoken::Algorithm {
        match self.alg {
            "ES256" => jsonwebtoken::Algorithm::ES256,
            "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
            _ => jsonwebtoken::Algorithm::RS256,
        }
    }

    /// The public JWK with only its RFC 7638 required members, as a DPoP
    /// proof's `jwk` header carries it.
    pub fn public_jwk(&self) -> serde_json::Value {
        let keep: &[&str] = match self.alg {
            "ES256" => &["kty", "crv", "x", "y"],
            "EdDSA" => &["kty", "crv", "x"],
            _ => &["kty", "n", "e"],
        };
        let mut out = serde_json::Map::new();
        for k in keep {
            if let Some(v) = self.jwk.get(*k) {
                out.insert((*k).to_owned(), v.clone());
            }
        }
        serde_json::Value::Object(out)
    }

    /// RFC 7638 SHA-256 thumbprint of the public key: a token's `cnf.jkt`.
    pub fn thumbprint(&self) -> Result<String, PkiError> {
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(self.public_jwk()).map_err(|e| PkiError::Key(e.to_string()))?;
        jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .map_err(|e| PkiError::Key(e.to_string()))
    }

    /// Signs any header and claims as a compact JWS with this key (the
    /// header's `alg` is taken as given, so tests can lie in it).
    pub fn sign_jws(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, PkiError> {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig =
            jsonwebtoken::crypto::sign(input.as_bytes(), &self.encoding_key()?, self.algorithm())
                .map_err(|e| PkiError::Key(e.to_string()))?;
        Ok(format!("{input}.{sig}"))
    }

    /// The header of a DPoP proof made with this key.
    pub fn dpop_header(&self) -> serde_json::Value {
        serde_json::json!({ "typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk() })
    }

    /// The claims of a fresh DPoP proof (RFC 9449 §4.2): a random `jti`,
    /// `iat` now, `ath` when a token is given, `nonce` when one is given.
    pub fn dpop_claims(
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> serde_json::Value {
        let mut jti = [0u8; 16];
        if aws_lc_rs::rand::fill(&mut jti).is_err() {
            jti[..8].copy_from_slice(&crate::util::now_unix().to_be_bytes());
        }
        let mut c = serde_json::json!({
            "jti": b64(&jti), "htm": htm, "htu": htu, "iat": crate::util::now_unix(),
        });
        if let Some(t) = access_token {
            c["ath"] = crate::binding::dpop::ath(t).into();
        }
        if let Some(n) = nonce {
            c["nonce"] = n.into();
        }
        c
    }

    /// A fresh DPoP proof for one request.
    pub fn dpop_proof(
        &self,
        htm: &str,
        htu: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String, PkiError> {
        self.sign_jws(
            &self.dpop_header(),
            &Self::dpop_claims(htm, htu, access_token, nonce),
        )
    }

    /// Signs claims into a compact JWT with this key's `kid` and `alg`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, PkiError> {
        let mut header = jsonwebtoken::Header::new(self.algorithm());
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, &self.encoding_key()?)
            .map_err(|e| PkiError::Key(e.to_string()))
    }
}

/// Writes a file, creating parent directories; private keys get mode 0600.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, contents).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}
