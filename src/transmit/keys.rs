//! The SET signing keys: the same PKCS#8 PEM loading and `kid` rotation as
//! the identity assertion (`proxy::assertion`), with RSA added because the
//! CAEP interoperability profile asks for RS256 with keys of at least 2048 bits.
//! The JWKS publishes every configured key; the active one signs.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;

use crate::config::{Config, ConfigError, TransmitterConfig};

/// Why a key did not load or a SET was not signed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file is unreadable, not PKCS#8, or of an unsupported kind.
    #[error("key `{kid}`: {message}")]
    Key {
        /// The key's id.
        kid: String,
        /// What is wrong.
        message: String,
    },
    /// The signer failed.
    #[error("signing failed")]
    Sign,
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// Signs SETs with the active key; publishes every key.
pub struct SetSigner {
    active: Pair,
    /// base64url of `{"typ":"secevent+jwt","alg":…,"kid":…}`.
    header_b64: String,
    kid: String,
    jwks: Bytes,
    rng: SystemRandom,
}

impl std::fmt::Debug for SetSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SetSigner {
    /// The signer of `[transmitter]`, reading its key files.
    pub fn from_config(cfg: &Config, t: &TransmitterConfig) -> Result<Self, ConfigError> {
        let keys = crate::util::read_key_files(
            cfg,
            "transmitter",
            t.keys
                .iter()
                .map(|k| (k.kid.as_str(), k.private_key_file.as_path())),
        )?;
        Self::new(t.active_kid.as_deref(), &keys).map_err(|e| ConfigError::Invalid {
            file: cfg.source.clone(),
            key: "transmitter.keys".into(),
            message: e.to_string(),
        })
    }

    /// A signer over `(kid, PKCS#8 PEM)` keys; `active_kid` (else the first) signs.
    pub fn new(active_kid: Option<&str>, keys: &[(String, Vec<u8>)]) -> Result<Self, KeyError> {
        let active_kid = active_kid.or_else(|| keys.first().map(|(k, _)| k.as_str()));
        let mut jwks = Vec::with_capacity(keys.len());
        let mut active = None;
        for (kid, pem) in keys {
            let bad = |message: String| KeyError::Key {
                kid: kid.clone(),
                message,
            };
            let der = crate::util::pkcs8_der(pem).map_err(bad)?;
            let (pair, jwk, alg) = if let Ok(rsa) = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()) {
                if rsa.public_modulus_len() < 256 {
                    return Err(bad("RSA keys must have at least 2048 bits".into()));
                }
                let (n, e) = crate::util::rsa_components(rsa.public_key().as_ref())
                    .ok_or_else(|| bad("unexpected RSA public key encoding".into()))?;
                let jwk = serde_json::json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                    "n": B64.encode(n), "e": B64.encode(e),
                });
                (Pair::Rsa(rsa), jwk, "RS256")
            } else {
                let ec = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der.secret_pkcs8_der(),
                )
                .map_err(|e| bad(format!("neither RSA nor P-256: {e}")))?;
                let jwk = crate::util::p256_jwk(kid, &ec).map_err(bad)?;
                (Pair::Ec(ec), jwk, "ES256")
            };
            jwks.push(jwk);
            if Some(kid.as_str()) == active_kid {
                let header = serde_json::json!({"typ": "secevent+jwt", "alg": alg, "kid": kid});
                active = Some((pair, B64.encode(header.to_string()), kid.clone()));
            }
        }
        let (active, header_b64, kid) = active.ok_or_else(|| KeyError::Key {
            kid: active_kid.unwrap_or_default().to_owned(),
            message: "no such key".into(),
        })?;
        Ok(Self {
            active,
            header_b64,
            kid,
            jwks: Bytes::from(serde_json::json!({ "keys": jwks }).to_string()),
            rng: SystemRandom::new(),
        })
    }

    /// The JWKS document (every configured key, public parts only).
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// The active key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` as a compact JWS with the SET header.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, KeyError> {
        let json = serde_json::to_vec(claims).map_err(|_| KeyError::Sign)?;
        let mut out = String::with_capacity(self.header_b64.len() + json.len() * 4 / 3 + 400);
        out.push_str(&self.header_b64);
        out.push('.');
        B64.encode_string(&json, &mut out);
        let sig = match &self.active {
            Pair::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    out.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| KeyError::Sign)?;
                sig
            }
            Pair::Ec(k) => k
                .sign(&self.rng, out.as_bytes())
                .map_err(|_| KeyError::Sign)?
                .as_ref()
                .to_vec(),
        };
        out.push('.');
        B64.encode_string(&sig, &mut out);
        Ok(out)
    }
}
