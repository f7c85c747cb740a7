//! The Jamf Pro API, read to confirm a webhook that raises trust.
//!
//! Jamf webhooks are authenticated only by a static header, so a webhook
//! that would make a device more trusted (back to compliant, no longer
//! compromised, out of lost mode, re-enrolled) is confirmed by reading the
//! device back before it is applied: an API client (OAuth 2.0 client
//! credentials at `POST {url}/api/oauth/token`) reads
//! `GET {url}/api/v1/computers-inventory/{id}?section=GROUP_MEMBERSHIPS` for a
//! computer, or `GET {url}/api/v2/mobile-devices/{id}/detail` for a mobile
//! device (its `groups` and `ios.security.lostModeEnabled`). The token is
//! cached until shortly before `expires_in`.
//!
//! This room never logs the client secret or a token; bodies are bounded and
//! every exchange has a deadline (`timeout_s`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::Value;

use crate::config::JamfApiConfig;

/// Largest API response accepted.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// A cached token is replaced this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(30);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why the API could not answer; a confirmation that fails raises no trust.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client could not be built or a request not formed.
    #[error("jamf api: {0}")]
    Client(String),
    /// Transport failure.
    #[error("jamf api {what}: {detail}")]
    Http {
        /// Which exchange.
        what: &'static str,
        /// Error chain.
        detail: String,
    },
    /// No answer in time.
    #[error("jamf api {0}: timed out")]
    Timeout(&'static str),
    /// A non-success status.
    #[error("jamf api {what}: HTTP {status}")]
    Status {
        /// Which exchange.
        what: &'static str,
        /// Status code.
        status: u16,
    },
    /// The body was not what the API documents.
    #[error("jamf api {what}: {detail}")]
    Body {
        /// Which exchange.
        what: &'static str,
        /// Parse error.
        detail: String,
    },
}

/// What the Jamf Pro API says about a device now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Ids of the groups (smart and static) the device is a member of.
    pub groups: Vec<u64>,
    /// Lost mode, when the API reports it (mobile devices).
    pub lost_mode: Option<bool>,
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// A Jamf Pro API client (one per configuration; rebuilt on reload when the
/// `[feeds.jamf.api]` table changes).
pub struct JamfApi {
    /// The configuration it was built from.
    pub cfg: JamfApiConfig,
    client: HttpClient,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for JamfApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JamfApi")
            .field("url", &self.cfg.url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A group id: Jamf sends it as a string in some schemas, a number in others.
fn group_ids(list: Option<&Value>) -> Vec<u64> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|g| match g.get("groupId")? {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

impl JamfApi {
    /// Builds the client: web PKI roots plus the optional `ca` bundle.
    pub fn new(cfg: JamfApiConfig) -> Result<Self, crate::tls::TlsError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = &cfg.ca {
            roots.extend(crate::tls::load_roots(&[ca])?.roots);
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(crate::tls::outbound::https_connector(
                roots,
                super::intune::CONNECT_TIMEOUT,
            ));
        Ok(Self {
            cfg,
            client,
            token: tokio::sync::Mutex::new(None),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.url.trim_end_matches('/'))
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
        what: &'static str,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let resp = self.client.request(req).await.map_err(|e| ApiError::Http {
            what,
            detail: super::intune::error_chain(&e),
        })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ApiError::Http {
                what,
                detail: e.to_string(),
            })?
            .to_bytes();
        Ok((status, body))
    }

    /// An API token, from the cache or the token endpoint.
    async fn token(&self) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("client_secret", &self.cfg.client_secret)
            .finish();
        let req = Request::post(self.url("/api/oauth/token"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ApiError::Client(e.to_string()))?;
        let what = "token request";
        let (status, bytes) = self.send(req, what).await?;
        if !status.is_success() {
            return Err(ApiError::Status {
                what,
                status: status.as_u16(),
            });
        }
        let t: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| ApiError::Body {
            what,
            detail: format!("not a token response: {e}"),
        })?;
        if t.token_type
            .as_deref()
            .is_some_and(|tt| !tt.eq_ignore_ascii_case("bearer"))
            || t.access_token.is_empty()
            || http::HeaderValue::from_str(&t.access_token).is_err()
        {
            return Err(ApiError::Body {
                what,
                detail: "not a usable bearer token".into(),
            });
        }
        let life = Duration::from_secs(t.expires_in.unwrap_or(60));
        let keep = if life > TOKEN_REFRESH_MARGIN * 2 {
            life - TOKEN_REFRESH_MARGIN
        } else {
            life / 2
        };
        *cached = Some(CachedToken {
            value: t.access_token.clone(),
            refresh_at: Instant::now() + keep,
        });
        Ok(t.access_token)
    }

    async fn read(&self, mobile: bool, jss: &str) -> Result<DeviceState, ApiError> {
        if jss.is_empty() || !jss.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::Client(format!("`{jss}` is not a Jamf id")));
        }
        let (path, what) = if mobile {
            (
                format!("/api/v2/mobile-devices/{jss}/detail"),
                "mobile device read",
            )
        } else {
            (
                format!("/api/v1/computers-inventory/{jss}?section=GROUP_MEMBERSHIPS"),
                "computer read",
            )
        };
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let req = Request::get(self.url(&path))
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::ACCEPT, "application/json")
                .body(Full::new(Bytes::new()))
                .map_err(|e| ApiError::Client(e.to_string()))?;
            let (status, bytes) = self.send(req, what).await?;
            if status == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                *self.token.lock().await = None;
                continue;
            }
            if !status.is_success() {
                return Err(ApiError::Status {
                    what,
                    status: status.as_u16(),
                });
            }
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::Body {
                what,
                detail: e.to_string(),
            })?;
            return Ok(if mobile {
                DeviceState {
                    groups: group_ids(v.get("groups")),
                    lost_mode: v
                        .get("ios")
                        .and_then(|i| i.get("security"))
                        .and_then(|s| s.get("lostModeEnabled"))
                        .and_then(Value::as_bool),
                }
            } else {
                // A missing section is an answer we cannot trust: refuse.
                let Some(groups) = v.get("groupMemberships").filter(|g| g.is_array()) else {
                    return Err(ApiError::Body {
                        what,
                        detail: "no groupMemberships".into(),
                    });
                };
                DeviceState {
                    groups: group_ids(Some(groups)),
                    lost_mode: None,
                }
            });
        }
    }

    /// Reads a device's current state (`mobile` picks the mobile-device API),
    /// within `timeout_s`.
    pub async fn device(&self, mobile: bool, jss: &str) -> Result<DeviceState, ApiError> {
        let what = if mobile {
            "mobile device read"
        } else {
            "computer read"
        };
        tokio::time::timeout(
            Duration::from_secs(self.cfg.timeout_s),
            self.read(mobile, jss),
        )
        .await
        .map_err(|_| ApiError::Timeout(what))?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn group_ids_accept_strings_and_numbers() {
        let v = serde_json::json!([{"groupId": "10"}, {"groupId": 12}, {"groupId": "x"}, {}]);
        assert_eq!(group_ids(Some(&v)), vec![10, 12]);
        assert!(group_ids(None).is_empty());
    }
}
