//! The OIDC relying party: provider discovery, the authorization request
//! (code flow, PKCE S256), and the code exchange with `client_secret_basic`
//! or `private_key_jwt` client authentication.
//!
//! This room never logs a code, a token or the client's credentials.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::config::{BrowserConfig, IssuerConfig};

/// Largest discovery or token response read.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Time allowed for a call to the IdP.
pub const IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of a `private_key_jwt` client assertion.
pub const CLIENT_ASSERTION_TTL_S: u64 = 60;

/// A failure talking to the IdP. Messages never carry codes or secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OidcError {
    /// The IdP could not be reached or answered badly.
    #[error("identity provider: {0}")]
    Provider(String),
    /// The IdP refused the code (bad, used twice, or not ours).
    #[error("the identity provider refused the authorization code ({0})")]
    CodeRefused(String),
    /// The client credentials could not be loaded or used.
    #[error("client credentials: {0}")]
    Client(String),
}

/// The provider metadata portcullis uses (OpenID Connect Discovery 1.0).
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderMetadata {
    /// Issuer; must equal the configured `iss` exactly.
    pub issuer: String,
    /// Where browsers are sent to log in.
    pub authorization_endpoint: String,
    /// Where codes are exchanged.
    pub token_endpoint: String,
    /// RP-initiated logout, when offered.
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

/// How portcullis authenticates to the token endpoint.
pub enum ClientAuth {
    /// `client_secret_basic`.
    Secret(String),
    /// `private_key_jwt` (RFC 7523): a short JWT signed with this key.
    PrivateKey {
        /// The key.
        key: jsonwebtoken::EncodingKey,
        /// Its algorithm.
        alg: jsonwebtoken::Algorithm,
        /// `kid` for the header.
        kid: Option<String>,
    },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Secret(_) => "ClientAuth::Secret",
            Self::PrivateKey { .. } => "ClientAuth::PrivateKey",
        })
    }
}

impl ClientAuth {
    /// Loads the configured credential.
    pub fn from_config(b: &BrowserConfig) -> Result<Self, OidcError> {
        if let Some(p) = &b.client_secret_file {
            let s = std::fs::read_to_string(p)
                .map_err(|e| OidcError::Client(format!("{}: {e}", p.display())))?;
            let s = s.trim().to_owned();
            if s.is_empty() {
                return Err(OidcError::Client(format!("{}: empty secret", p.display())));
            }
            return Ok(Self::Secret(s));
        }
        let Some(p) = &b.client_key_file else {
            return Err(OidcError::Client("no client credential configured".into()));
        };
        let pem =
            std::fs::read(p).map_err(|e| OidcError::Client(format!("{}: {e}", p.display())))?;
        let alg = crate::authn::jwks::parse_alg(&b.client_key_alg)
            .ok_or_else(|| OidcError::Client("unknown client_key_alg".into()))?;
        let key = match b.client_key_alg.get(..2) {
            Some("ES") => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
        }
        .map_err(|e| OidcError::Client(format!("{}: {e}", p.display())))?;
        Ok(Self::PrivateKey {
            key,
            alg,
            kid: b.client_key_id.clone(),
        })
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The relying party: one per config, shared by every browser route.
pub struct RelyingParty {
    /// Client id.
    pub client_id: String,
    discovery_url: String,
    expected_issuer: String,
    scopes: String,
    auth: ClientAuth,
    client: HttpsClient,
    metadata: tokio::sync::OnceCell<ProviderMetadata>,
}

impl std::fmt::Debug for RelyingParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelyingParty")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// What the token endpoint answers (only the ID token is used).
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct TokenError {
    #[serde(default)]
    error: Option<String>,
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Appends `pairs` to `url` as a query.
pub fn with_query(url: &str, pairs: &[(&str, &str)]) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{}", form(pairs))
}

impl RelyingParty {
    /// Builds the relying party from `[browser]` and its issuer.
    pub fn new(b: &BrowserConfig, issuer: &IssuerConfig) -> Result<Self, OidcError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &issuer.fetch_ca {
            let extra = crate::tls::load_roots(&[ca])
                .map_err(|e| OidcError::Client(format!("{}: {e}", ca.display())))?;
            roots.extend(extra.roots);
        }
        let conn = crate::tls::outbound::https_connector(roots, Duration::from_secs(5));
        let discovery_url = b
            .discovery_url
            .clone()
            .or_else(|| issuer.discovery_url.clone())
            .unwrap_or_else(|| {
                format!(
                    "{}/.well-known/openid-configuration",
                    issuer.issuer.trim_end_matches('/')
                )
            });
        Ok(Self {
            client_id: b.client_id.clone(),
            discovery_url,
            expected_issuer: issuer.issuer.clone(),
            scopes: b.scopes.join(" "),
            auth: ClientAuth::from_config(b)?,
            client: Client::builder(TokioExecutor::new()).build(conn),
            metadata: tokio::sync::OnceCell::new(),
        })
    }

    async fn call(&self, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), OidcError> {
        let resp = tokio::time::timeout(IDP_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| OidcError::Provider("timed out".into()))?
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(
            IDP_TIMEOUT,
            Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect(),
        )
        .await
        .map_err(|_| OidcError::Provider("body timed out".into()))?
        .map_err(|e| OidcError::Provider(format!("body: {e}")))?;
        Ok((status, body.to_bytes()))
    }

    /// The provider metadata, fetched once (retried on the next login after
    /// a failure).
    pub async fn metadata(&self) -> Result<&ProviderMetadata, OidcError> {
        self.metadata
            .get_or_try_init(|| async {
                let req = http::Request::get(self.discovery_url.as_str())
                    .header(http::header::ACCEPT, "application/json")
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| OidcError::Provider(e.to_string()))?;
                let (status, body) = self.call(req).await?;
                if status != 200 {
                    return Err(OidcError::Provider(format!("discovery answered {status}")));
                }
                let m: ProviderMetadata = serde_json::from_slice(&body)
                    .map_err(|e| OidcError::Provider(format!("discovery document: {e}")))?;
                if m.issuer != self.expected_issuer {
                    return Err(OidcError::Provider(format!(
                        "discovery names issuer `{}`, expected `{}`",
                        m.issuer, self.expected_issuer
                    )));
                }
                Ok(m)
            })
            .await
    }

    /// The authorization request URL (code flow, PKCE S256, `nonce`; on
    /// step-up `acr_values`, `max_age` and `prompt=login`).
    pub async fn authorize_url(
        &self,
        redirect_uri: &str,
        state: &str,
        nonce: &str,
        code_challenge: &str,
        acr_values: Option<&str>,
        max_age: Option<u64>,
    ) -> Result<String, OidcError> {
        let m = self.metadata().await?;
        let max_age = max_age.map(|m| m.to_string());
        let mut pairs = vec![
            ("response_type", "code"),
            ("client_id", self.client_id.as_str()),
            ("redirect_uri", redirect_uri),
            ("scope", self.scopes.as_str()),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", code_challenge),
            ("code_challenge_method", "S256"),
        ];
        if let Some(a) = acr_values {
            pairs.push(("acr_values", a));
        }
        if let Some(m) = &max_age {
            pairs.push(("max_age", m));
        }
        if acr_values.is_some() || max_age.is_some() {
            pairs.push(("prompt", "login"));
        }
        Ok(with_query(&m.authorization_endpoint, &pairs))
    }

    /// Exchanges a code for the ID token (compact JWS, not yet verified).
    pub async fn exchange(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Result<String, OidcError> {
        let m = self.metadata().await?;
        let mut pairs = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ];
        let mut req = http::Request::post(m.token_endpoint.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        let assertion;
        match &self.auth {
            ClientAuth::Secret(secret) => {
                // RFC 6749 §2.3.1: both parts form-encoded before Basic.
                let user =
                    form_urlencoded::byte_serialize(self.client_id.as_bytes()).collect::<String>();
                let pass = form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>();
                let basic =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                req = req.header(http::header::AUTHORIZATION, format!("Basic {basic}"));
            }
            ClientAuth::PrivateKey { key, alg, kid } => {
                let now = crate::util::now_unix();
                let jti = super::cookie::random_token(16)
                    .map_err(|_| OidcError::Client("no randomness".into()))?;
                let claims = serde_json::json!({
                    "iss": self.client_id, "sub": self.client_id,
                    "aud": m.token_endpoint, "jti": jti,
                    "iat": now, "exp": now + CLIENT_ASSERTION_TTL_S,
                });
                let mut header = jsonwebtoken::Header::new(*alg);
                header.kid = kid.clone();
                assertion = jsonwebtoken::encode(&header, &claims, key)
                    .map_err(|e| OidcError::Client(e.to_string()))?;
                pairs.push(("client_id", self.client_id.as_str()));
                pairs.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                pairs.push(("client_assertion", assertion.as_str()));
            }
        }
        let req = req
            .body(Full::new(Bytes::from(form(&pairs))))
            .map_err(|e| OidcError::Provider(e.to_string()))?;
        let (status, body) = self.call(req).await?;
        if status != 200 {
            let code = serde_json::from_slice::<TokenError>(&body)
                .ok()
                .and_then(|e| e.error)
                .unwrap_or_else(|| format!("status {status}"));
            let code: String = code
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            return Err(OidcError::CodeRefused(code));
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| OidcError::Provider("token response is not JSON".into()))?;
        t.id_token
            .ok_or_else(|| OidcError::Provider("token response has no id_token".into()))
    }
}
