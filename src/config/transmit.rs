//! `[transmitter]`: portcullis as an OpenID Shared Signals transmitter
//! (SETs pushed per RFC 8935 to receivers that created a stream) and a
//! signed generic webhook for tools without SSF.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError};

/// Default seconds between two verification requests of one stream.
pub const DEFAULT_MIN_VERIFICATION_INTERVAL_S: u64 = 30;
/// Default first retry delay after a failed delivery, milliseconds.
pub const DEFAULT_RETRY_INITIAL_MS: u64 = 1_000;
/// Default ceiling on the retry delay, milliseconds.
pub const DEFAULT_RETRY_MAX_MS: u64 = 300_000;
/// Default attempts before a SET is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;
/// Default most undelivered SETs kept per stream or webhook.
pub const DEFAULT_OUTBOX_MAX_PER_TARGET: u64 = 100_000;
/// Default time one delivery attempt may take, milliseconds.
pub const DEFAULT_DELIVERY_TIMEOUT_MS: u64 = 10_000;
/// Default interval of the outbox sweep when no change notice wakes it, milliseconds.
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 500;
/// Default streams one receiver may hold (409 beyond).
pub const DEFAULT_MAX_STREAMS: usize = 4;
/// Shortest webhook secret accepted, bytes.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;
/// Shortest receiver bearer token accepted, bytes.
pub const MIN_RECEIVER_TOKEN_BYTES: usize = 16;

fn d_min_verification() -> u64 {
    DEFAULT_MIN_VERIFICATION_INTERVAL_S
}
fn d_retry_initial() -> u64 {
    DEFAULT_RETRY_INITIAL_MS
}
fn d_retry_max() -> u64 {
    DEFAULT_RETRY_MAX_MS
}
fn d_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn d_outbox_max() -> u64 {
    DEFAULT_OUTBOX_MAX_PER_TARGET
}
fn d_delivery_timeout() -> u64 {
    DEFAULT_DELIVERY_TIMEOUT_MS
}
fn d_sweep() -> u64 {
    DEFAULT_SWEEP_INTERVAL_MS
}
fn d_max_streams() -> usize {
    DEFAULT_MAX_STREAMS
}
fn d_scopes() -> Vec<String> {
    vec!["ssf.manage".into(), "ssf.read".into()]
}

/// The `[transmitter]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransmitterConfig {
    /// The SETs' `iss` and the metadata `issuer`: https, no query or fragment.
    pub issuer: String,
    /// Where receivers reach the admin listener (the endpoints in the
    /// metadata); default: the issuer's scheme and authority.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The issuer of the subjects (`iss_sub` subject identifiers); without
    /// it, subjects that look like an address go out as `email`, others as
    /// `opaque`.
    #[serde(default)]
    pub subject_issuer: Option<String>,
    /// The `kid` that signs; defaults to the first key. The JWKS publishes all keys.
    #[serde(default)]
    pub active_kid: Option<String>,
    /// Signing keys (RSA ≥ 2048 for RS256, the CAEP interoperability
    /// profile's algorithm, or P-256 for ES256): the active one and the ones
    /// still published while receivers' caches roll over.
    pub keys: Vec<TransmitterKeyConfig>,
    /// Extra CA bundle (PEM) trusted for deliveries, besides the web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Receivers allowed to manage streams.
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
    /// Signed generic webhooks (HMAC-SHA256).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Seconds between two verification requests of one stream (429 below).
    #[serde(default = "d_min_verification")]
    pub min_verification_interval_s: u64,
    /// First retry delay, milliseconds (doubled per attempt, with jitter).
    #[serde(default = "d_retry_initial")]
    pub retry_initial_ms: u64,
    /// Ceiling on the retry delay, milliseconds.
    #[serde(default = "d_retry_max")]
    pub retry_max_ms: u64,
    /// Attempts before a SET is dead-lettered (counted as failed).
    #[serde(default = "d_max_attempts")]
    pub max_attempts: u32,
    /// Most undelivered SETs kept per stream or webhook; beyond it the
    /// oldest are dropped (counted).
    #[serde(default = "d_outbox_max")]
    pub outbox_max_per_target: u64,
    /// Time one delivery attempt may take, milliseconds.
    #[serde(default = "d_delivery_timeout")]
    pub delivery_timeout_ms: u64,
    /// How often the outbox is swept when no change notice wakes it, milliseconds.
    #[serde(default = "d_sweep")]
    pub sweep_interval_ms: u64,
}

/// One SET signing key.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransmitterKeyConfig {
    /// Key id, in the SET header and the JWKS.
    pub kid: String,
    /// PKCS#8 PEM private key: RSA (≥ 2048 bits, RS256) or P-256 (ES256).
    pub private_key_file: PathBuf,
}

/// A receiver that may create and manage streams.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Name, in logs and metrics.
    pub name: String,
    /// The bearer token it sends to the management API (at least 16 bytes).
    pub token: String,
    /// The `aud` of the SETs its streams receive.
    pub audience: String,
    /// Its own transmitter `iss`, when it also sends to us: events learned
    /// from that issuer are never echoed back to it.
    #[serde(default)]
    pub issuer: Option<String>,
    /// `ssf.manage` (create, change, delete) and/or `ssf.read`.
    #[serde(default = "d_scopes")]
    pub scopes: Vec<String>,
    /// Streams it may hold (409 beyond).
    #[serde(default = "d_max_streams")]
    pub max_streams: usize,
}

/// A signed generic webhook.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name, in logs and metrics.
    pub name: String,
    /// Where to POST: https, or http on loopback only.
    pub url: String,
    /// HMAC-SHA256 key (at least 16 bytes).
    pub secret: String,
    /// Event types (full URIs) to send; empty = every type emitted.
    #[serde(default)]
    pub events: Vec<String>,
}

/// True when `url` is https, or http to a loopback host.
pub fn https_or_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    match uri.scheme_str() {
        Some("https") => uri.host().is_some(),
        Some("http") => uri.host().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }),
        _ => false,
    }
}

impl Config {
    pub(super) fn resolve_transmitter_paths(&mut self, base: &std::path::Path) {
        if let Some(t) = self.transmitter.as_mut() {
            for k in &mut t.keys {
                if k.private_key_file.is_relative() {
                    k.private_key_file = base.join(&k.private_key_file);
                }
            }
            if let Some(p) = t.ca_file.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
    }

    pub(super) fn validate_transmitter(&self) -> Result<(), ConfigError> {
        let Some(t) = &self.transmitter else {
            return Ok(());
        };
        let issuer_ok = t
            .issuer
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some())
            && !t.issuer.contains('?')
            && !t.issuer.contains('#');
        if !issuer_ok {
            return Err(self.invalid(
                "transmitter.issuer",
                format!(
                    "`{}` must be an https URL without query or fragment",
                    t.issuer
                ),
            ));
        }
        if let Some(b) = &t.base_url
            && !https_or_loopback(b)
        {
            return Err(self.invalid(
                "transmitter.base_url",
                format!("`{b}` must be https (or http on loopback)"),
            ));
        }
        if t.keys.is_empty() {
            return Err(self.invalid("transmitter.keys", "at least one key"));
        }
        let mut kids = std::collections::HashSet::new();
        for (i, k) in t.keys.iter().enumerate() {
            if k.kid.is_empty() || !kids.insert(k.kid.as_str()) {
                return Err(self.invalid(
                    format!("transmitter.keys[{i}].kid"),
                    format!("`{}` is empty or used twice", k.kid),
                ));
            }
        }
        if let Some(active) = &t.active_kid
            && !kids.contains(active.as_str())
        {
            return Err(self.invalid(
                "transmitter.active_kid",
                format!("no key with kid `{active}`"),
            ));
        }
        if t.retry_initial_ms == 0 || t.retry_max_ms < t.retry_initial_ms {
            return Err(self.invalid(
                "transmitter.retry_max_ms",
                "retry_initial_ms must be at least 1 and at most retry_max_ms",
            ));
        }
        if t.max_attempts == 0 {
            return Err(self.invalid("transmitter.max_attempts", "must be at least 1"));
        }
        if t.outbox_max_per_target == 0 {
            return Err(self.invalid("transmitter.outbox_max_per_target", "must be at least 1"));
        }
        if t.delivery_timeout_ms == 0 || t.sweep_interval_ms == 0 {
            return Err(self.invalid(
                "transmitter.delivery_timeout_ms",
                "delivery_timeout_ms and sweep_interval_ms must be at least 1",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in t.receivers.iter().enumerate() {
            let key = |f: &str| format!("transmitter.receivers[{i}].{f}");
            if r.name.is_empty() || !names.insert(r.name.as_str()) {
                return Err(self.invalid(key("name"), "empty or used twice"));
            }
            if r.token.len() < MIN_RECEIVER_TOKEN_BYTES {
                return Err(self.invalid(
                    key("token"),
                    format!("shorter than {MIN_RECEIVER_TOKEN_BYTES} bytes"),
                ));
            }
            if r.audience.is_empty() {
                return Err(self.invalid(key("audience"), "must not be empty"));
            }
            if let Some(s) = r
                .scopes
                .iter()
                .find(|s| !s.starts_with("ssf.manage") && !s.starts_with("ssf.read"))
            {
                return Err(self.invalid(
                    key("scopes"),
                    format!("`{s}` is not ssf.manage or ssf.read"),
                ));
            }
            if r.max_streams == 0 {
                return Err(self.invalid(key("max_streams"), "must be at least 1"));
            }
        }
        let mut hooks = std::collections::HashSet::new();
        for (i, w) in t.webhooks.iter().enumerate() {
            let key = |f: &str| format!("transmitter.webhooks[{i}].{f}");
            if w.name.is_empty() || !hooks.insert(w.name.as_str()) {
                return Err(self.invalid(key("name"), "empty or used twice"));
            }
            if w.secret.len() < MIN_WEBHOOK_SECRET_BYTES {
                return Err(self.invalid(
                    key("secret"),
                    format!(
                        "{} bytes is shorter than {MIN_WEBHOOK_SECRET_BYTES}",
                        w.secret.len()
                    ),
                ));
            }
            if !https_or_loopback(&w.url) {
                return Err(self.invalid(
                    key("url"),
                    format!("`{}` is not https (http only to a loopback host)", w.url),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_or_loopback_only() {
        assert!(https_or_loopback("https://rx.example/ssf"));
        assert!(https_or_loopback("http://127.0.0.1:9/x"));
        assert!(https_or_loopback("http://[::1]:9/x"));
        assert!(https_or_loopback("http://localhost/x"));
        assert!(!https_or_loopback("http://rx.example/ssf"));
        assert!(!https_or_loopback("ftp://127.0.0.1/"));
        assert!(!https_or_loopback("not a url"));
    }
}
