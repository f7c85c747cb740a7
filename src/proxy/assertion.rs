//! The signed identity for the app (phase 6): `x-portcullis-assertion`, an
//! ES256 JWT any JWT library verifies against the JWKS the proxy publishes at
//! `/.well-known/portcullis/jwks.json`, plus the plain identity headers a
//! route's app may expect (`X-Forwarded-User`, `Remote-User`, ...).
//!
//! Signing costs tens of microseconds, so one signed assertion is reused for
//! `reuse_s` seconds by requests whose claims would be identical (same
//! subject, device, posture, route, binding, decision); it is then at least
//! `ttl_s - reuse_s` seconds from expiry. The reuse cache is keyed by a
//! seeded hash and confirmed by comparing every claim, so one caller never
//! receives another's assertion. This room never logs an assertion.

use std::borrow::Cow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair};
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::config::{ASSERTION_HEADER, ASSERTION_JWKS_PATH, AssertionConfig, Config, ConfigError};

/// The assertion header as a name built once, not parsed per request.
static ASSERTION: HeaderName = HeaderName::from_static(ASSERTION_HEADER);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub use crate::route::{IdentityField, RouteIdentity};

/// The device facts an assertion carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct DeviceFacts<'a> {
    /// Device id (a certificate's, else the token's or session's claim).
    pub id: &'a str,
    /// Whether a client certificate proved it (else it is only claimed).
    pub verified: bool,
    /// Compliance as the snapshot knows it (`unknown` for unknown devices).
    pub compliance: &'static str,
    /// Lifecycle as the snapshot knows it.
    pub lifecycle: &'static str,
}

/// Everything an assertion says, filled by the bearer, workload and browser
/// paths alike (see [`input_from_ctx`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssertionInput<'a> {
    /// `sub`: the token's or session's subject, or a workload's SPIFFE id.
    pub subject: Cow<'a, str>,
    /// `email`, when known.
    pub email: Option<&'a str>,
    /// `groups`, from the identity record.
    pub groups: &'a [String],
    /// `entitlements`, from the identity record.
    pub entitlements: &'a [String],
    /// `device`.
    pub device: Option<DeviceFacts<'a>>,
    /// `acr` of the authentication.
    pub acr: Option<&'a str>,
    /// `amr` of the authentication.
    pub amr: &'a [String],
    /// `auth`: `bearer`, `browser` or `mtls`.
    pub auth: &'static str,
    /// `binding`: `none`, `dpop`, `mtls` or `dbsc`.
    pub binding: &'static str,
    /// `decision`: the policy action that let the request through.
    pub decision: &'static str,
    /// `route`: the route's name.
    pub route: &'a str,
}

/// The owned copy of an input kept next to a reused assertion, so a hash
/// collision can never hand one caller another's assertion.
#[derive(Debug, PartialEq, Eq)]
struct OwnedInput {
    subject: String,
    email: Option<String>,
    groups: Vec<String>,
    entitlements: Vec<String>,
    device: Option<(String, bool, &'static str, &'static str)>,
    acr: Option<String>,
    amr: Vec<String>,
    auth: &'static str,
    binding: &'static str,
    decision: &'static str,
    route: String,
    audience: String,
}

impl OwnedInput {
    fn of(i: &AssertionInput<'_>, audience: &str) -> Self {
        Self {
            subject: i.subject.clone().into_owned(),
            email: i.email.map(str::to_owned),
            groups: i.groups.to_vec(),
            entitlements: i.entitlements.to_vec(),
            device: i
                .device
                .map(|d| (d.id.to_owned(), d.verified, d.compliance, d.lifecycle)),
            acr: i.acr.map(str::to_owned),
            amr: i.amr.to_vec(),
            auth: i.auth,
            binding: i.binding,
            decision: i.decision,
            route: i.route.to_owned(),
            audience: audience.to_owned(),
        }
    }

    fn matches(&self, i: &AssertionInput<'_>, audience: &str) -> bool {
        self.subject == i.subject
            && self.email.as_deref() == i.email
            && self.groups == i.groups
            && self.entitlements == i.entitlements
            && self.device.as_ref().map(|d| (d.0.as_str(), d.1, d.2, d.3))
                == i.device
                    .map(|d| (d.id, d.verified, d.compliance, d.lifecycle))
            && self.acr.as_deref() == i.acr
            && self.amr == i.amr
            && self.auth == i.auth
            && self.binding == i.binding
            && self.decision == i.decision
            && self.route == i.route
            && self.audience == audience
    }
}

#[derive(Serialize)]
struct Payload<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    groups: &'a [String],
    entitlements: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<DeviceFacts<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acr: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    amr: &'a [String],
    auth: &'a str,
    binding: &'a str,
    decision: &'a str,
    route: &'a str,
}

/// Why an assertion key did not load or an assertion was not signed.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// A key file is unreadable or not a P-256 PKCS#8 key.
    #[error("key `{kid}`: {message}")]
    Key {
        /// The key's id.
        kid: String,
        /// What is wrong.
        message: String,
    },
    /// The system random source or the signer failed.
    #[error("signing failed")]
    Sign,
}

struct SigningKeyEntry {
    pair: EcdsaKeyPair,
    /// base64url of the JOSE header, fixed per key.
    header_b64: String,
}

struct Reused {
    input: OwnedInput,
    value: HeaderValue,
    iat: u64,
}

/// Signs assertions with the active key; publishes every key.
pub struct Signer {
    issuer: String,
    ttl_s: u64,
    reuse_s: u64,
    active: SigningKeyEntry,
    jwks: Bytes,
    reuse: Option<moka::sync::Cache<u64, Arc<Reused>>>,
    hasher: foldhash::quality::RandomState,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The signer of a config with `[assertion]`; `None` without it.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Self>>, ConfigError> {
        let Some(a) = &cfg.assertion else {
            return Ok(None);
        };
        let keys = crate::util::read_key_files(
            cfg,
            "assertion",
            a.keys
                .iter()
                .map(|k| (k.kid.as_str(), k.private_key_file.as_path())),
        )?;
        Self::new(a, &keys)
            .map(|s| Some(Arc::new(s)))
            .map_err(|e| ConfigError::Invalid {
                file: cfg.source.clone(),
                key: "assertion.keys".into(),
                message: e.to_string(),
            })
    }

    /// A signer over `(kid, PKCS#8 PEM)` keys; the config's `active_kid`
    /// (else the first key) signs.
    pub fn new(cfg: &AssertionConfig, keys: &[(String, Vec<u8>)]) -> Result<Self, AssertionError> {
        let mut jwks = Vec::with_capacity(keys.len());
        let mut active = None;
        let active_kid = cfg
            .active_kid
            .as_deref()
            .or_else(|| keys.first().map(|(k, _)| k.as_str()));
        for (kid, pem) in keys {
            let bad = |message: String| AssertionError::Key {
                kid: kid.clone(),
                message,
            };
            let der = crate::util::pkcs8_der(pem).map_err(bad)?;
            let pair = EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                der.secret_pkcs8_der(),
            )
            .map_err(|e| bad(format!("not a P-256 key: {e}")))?;
            jwks.push(crate::util::p256_jwk(kid, &pair).map_err(bad)?);
            if Some(kid.as_str()) == active_kid {
                let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
                active = Some(SigningKeyEntry {
                    pair,
                    header_b64: B64.encode(header.to_string()),
                });
            }
        }
        let active = active.ok_or_else(|| AssertionError::Key {
            kid: active_kid.unwrap_or_default().to_owned(),
            message: "no such key".into(),
        })?;
        let reuse = (cfg.reuse_s > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(Duration::from_secs(cfg.reuse_s))
                .build()
        });
        Ok(Self {
            issuer: cfg.issuer.clone(),
            ttl_s: cfg.ttl_s,
            reuse_s: cfg.reuse_s,
            active,
            jwks: Bytes::from(serde_json::json!({ "keys": jwks }).to_string()),
            reuse,
            hasher: foldhash::quality::RandomState::default(),
            rng: SystemRandom::new(),
        })
    }

    /// The JWKS document (every configured key, public parts only).
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// Signs a fresh assertion for `input`, valid from `now` for `ttl_s`.
    pub fn sign(
        &self,
        input: &AssertionInput<'_>,
        audience: &str,
        now: u64,
    ) -> Result<String, AssertionError> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| AssertionError::Sign)?;
        let jti = B64.encode(jti);
        let payload = Payload {
            iss: &self.issuer,
            aud: audience,
            sub: &input.subject,
            iat: now,
            exp: now + self.ttl_s,
            jti: &jti,
            email: input.email,
            groups: input.groups,
            entitlements: input.entitlements,
            device: input.device,
            acr: input.acr,
            amr: input.amr,
            auth: input.auth,
            binding: input.binding,
            decision: input.decision,
            route: input.route,
        };
        let json = serde_json::to_vec(&payload).map_err(|_| AssertionError::Sign)?;
        let mut out =
            String::with_capacity(self.active.header_b64.len() + json.len() * 4 / 3 + 100);
        out.push_str(&self.active.header_b64);
        out.push('.');
        B64.encode_string(&json, &mut out);
        let sig = self
            .active
            .pair
            .sign(&self.rng, out.as_bytes())
            .map_err(|_| AssertionError::Sign)?;
        out.push('.');
        B64.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }

    /// The assertion header value for `input`: a reused one when an identical
    /// input was signed less than `reuse_s` ago, else a fresh one.
    pub fn assertion(
        &self,
        input: &AssertionInput<'_>,
        audience: &str,
        now: u64,
    ) -> Result<HeaderValue, AssertionError> {
        let Some(cache) = &self.reuse else {
            return self.fresh(input, audience, now);
        };
        let key = self.hasher.hash_one((input, audience));
        if let Some(hit) = cache.get(&key)
            && now < hit.iat + self.reuse_s
            && hit.input.matches(input, audience)
        {
            return Ok(hit.value.clone());
        }
        let value = self.fresh(input, audience, now)?;
        cache.insert(
            key,
            Arc::new(Reused {
                input: OwnedInput::of(input, audience),
                value: value.clone(),
                iat: now,
            }),
        );
        Ok(value)
    }

    fn fresh(
        &self,
        input: &AssertionInput<'_>,
        audience: &str,
        now: u64,
    ) -> Result<HeaderValue, AssertionError> {
        let jwt = self.sign(input, audience, now)?;
        HeaderValue::from_maybe_shared(Bytes::from(jwt)).map_err(|_| AssertionError::Sign)
    }
}

/// The assertion's input from what phases 2–5 put in the context: the
/// token (bearer), or the workload certificate (mtls), plus the snapshot's
/// identity and device records, the binding and the decision. `None` when
/// the request is not authenticated (public routes).
// On a browser session: auth = "browser", binding = the session's binding
// (`none` | `dbsc` | `mtls`).
pub fn input_from_ctx<'a>(
    ctx: &'a super::RequestCtx,
    route: &'a crate::route::Route,
) -> Option<AssertionInput<'a>> {
    let binding = ctx.binding.as_ref();
    let (subject, acr, amr, auth): (Cow<'a, str>, _, &'a [String], _) = match (&ctx.auth, binding) {
        (Some(a), _) => {
            let c = &a.token.claims;
            (
                Cow::Borrowed(c.sub.as_str()),
                c.acr.as_deref(),
                c.amr.as_deref().unwrap_or(&[]),
                "bearer",
            )
        }
        (None, Some(b)) => (
            Cow::Owned(b.workload.as_ref()?.to_string()),
            None,
            &[],
            "mtls",
        ),
        (None, None) => return None,
    };
    let auth = if ctx.session.is_some() {
        "browser"
    } else {
        auth
    };
    let identity = ctx.resolved.as_ref().and_then(|r| r.identity.as_deref());
    let device = ctx.resolved.as_ref().and_then(|r| {
        let id = r.device_id.as_deref()?;
        let (compliance, lifecycle) = r.device.as_ref().map_or(("unknown", "unknown"), |d| {
            (
                crate::posture::model::compliance_name(d.compliance),
                crate::posture::model::lifecycle_name(d.lifecycle),
            )
        });
        Some(DeviceFacts {
            id,
            verified: binding.and_then(|b| b.device.as_deref()) == Some(id),
            compliance,
            lifecycle,
        })
    });
    let email = identity
        .and_then(|i| i.aliases.iter().find(|a| a.contains('@')))
        .map(String::as_str)
        .or(match &subject {
            Cow::Borrowed(s) if s.contains('@') => Some(*s),
            _ => None,
        });
    Some(AssertionInput {
        subject,
        email,
        groups: identity.map_or(&[], |i| i.groups.as_slice()),
        entitlements: identity.map_or(&[], |i| i.entitlements.as_slice()),
        device,
        acr,
        amr,
        auth,
        binding: match &ctx.session {
            Some(s) => s.record.binding.as_str(),
            None => binding.map_or("none", |b| b.kind.as_str()),
        },
        decision: ctx.decision.as_ref().map_or("allow", |d| d.action.as_str()),
        route: &route.name,
    })
}

/// Phase 6 (part): removes any client-sent assertion, then, on an
/// authenticated request, sets the route's plain identity headers and the
/// signed assertion. A signing failure refuses the request (fail closed):
/// an app that trusts the assertion must never see a request without it.
pub fn apply(
    signer: Option<&Signer>,
    ctx: &super::RequestCtx,
    route: &crate::route::Route,
    h: &mut HeaderMap,
) -> Result<(), super::Denial> {
    h.remove(&ASSERTION);
    if signer.is_none() && route.identity.headers.is_empty() {
        return Ok(());
    }
    let Some(input) = input_from_ctx(ctx, route) else {
        return Ok(());
    };
    for (field, name) in &route.identity.headers {
        let value: Option<Cow<'_, str>> = match field {
            IdentityField::User => Some(Cow::Borrowed(input.subject.as_ref())),
            IdentityField::Email => input.email.map(Cow::Borrowed),
            IdentityField::Groups => {
                Some(Cow::<str>::Owned(input.groups.join(","))).filter(|g| !g.is_empty())
            }
            IdentityField::Device => input.device.map(|d| Cow::Borrowed(d.id)),
        };
        if let Some(Ok(v)) = value.map(|v| HeaderValue::from_str(v.as_ref())) {
            h.insert(name.clone(), v);
        }
    }
    if let Some(s) = signer {
        let v = s
            .assertion(&input, &route.identity.audience, crate::util::now_unix())
            .map_err(|_| super::Denial::Internal)?;
        h.insert(&ASSERTION, v);
    }
    Ok(())
}

/// Answers `GET`/`HEAD /.well-known/portcullis/jwks.json` on the proxy
/// listener, before routing, when an assertion signer is configured.
pub fn serve_jwks<B>(
    signer: Option<&Signer>,
    req: &http::Request<B>,
) -> Option<http::Response<super::ProxyBody>> {
    use http_body_util::BodyExt;
    let signer = signer?;
    if req.uri().path() != ASSERTION_JWKS_PATH
        || !(req.method() == http::Method::GET || req.method() == http::Method::HEAD)
    {
        return None;
    }
    let body = if req.method() == http::Method::HEAD {
        Bytes::new()
    } else {
        signer.jwks()
    };
    let mut resp = http::Response::new(
        http_body_util::Full::new(body)
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    // Apps cache the keys; a rotation keeps the old key published meanwhile.
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn cfg(reuse_s: u64, active: Option<&str>) -> AssertionConfig {
        AssertionConfig {
            issuer: "https://proxy.test".into(),
            ttl_s: 60,
            reuse_s,
            cache_capacity: 100,
            active_kid: active.map(str::to_owned),
            keys: vec![],
        }
    }

    fn key(kid: &str) -> (String, Vec<u8>, serde_json::Value) {
        let k = crate::demo::pki::SigningKey::es256(kid).unwrap();
        (kid.to_owned(), k.private_pem.into_bytes(), k.jwk)
    }

    fn input(sub: &str) -> AssertionInput<'_> {
        AssertionInput {
            subject: Cow::Borrowed(sub),
            email: None,
            groups: &[],
            entitlements: &[],
            device: Some(DeviceFacts {
                id: "laptop-1",
                verified: true,
                compliance: "compliant",
                lifecycle: "active",
            }),
            acr: Some("urn:pc:mfa"),
            amr: &[],
            auth: "bearer",
            binding: "mtls",
            decision: "allow",
            route: "app",
        }
    }

    fn verify(jwt: &str, jwk: &serde_json::Value, aud: &str) -> serde_json::Value {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[aud]);
        v.set_issuer(&["https://proxy.test"]);
        jsonwebtoken::decode::<serde_json::Value>(
            jwt,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &v,
        )
        .unwrap()
        .claims
    }

    #[test]
    fn signs_with_the_active_key_and_publishes_all() {
        let (k1, p1, j1) = key("k1");
        let (k2, p2, j2) = key("k2");
        let s = Signer::new(&cfg(0, Some("k2")), &[(k1, p1), (k2, p2)]).unwrap();
        let jwks: serde_json::Value = serde_json::from_slice(&s.jwks()).unwrap();
        let kids: Vec<_> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].clone())
            .collect();
        assert_eq!(kids, vec!["k1", "k2"]);
        assert_eq!(jwks["keys"][1]["x"], j2["x"]);
        assert!(jwks["keys"][0].get("d").is_none());
        let now = crate::util::now_unix();
        let jwt = s.sign(&input("alice"), "payroll", now).unwrap();
        let h = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(h.kid.as_deref(), Some("k2"));
        let c = verify(&jwt, &j2, "payroll");
        assert_eq!(c["sub"], "alice");
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 60);
        assert_eq!(c["device"]["id"], "laptop-1");
        assert_eq!(c["device"]["verified"], true);
        assert_eq!(c["binding"], "mtls");
        assert_eq!(c["acr"], "urn:pc:mfa");
        assert!(c.get("email").is_none());
        // The other published key does not verify it.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(j1).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["payroll"]);
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                &jwt,
                &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
                &v
            )
            .is_err()
        );
    }

    #[test]
    fn reuses_only_identical_inputs_within_the_window() {
        let (k1, p1, _) = key("k1");
        let s = Signer::new(&cfg(10, None), &[(k1, p1)]).unwrap();
        let now = 1_000_000;
        let a = s.assertion(&input("alice"), "app", now).unwrap();
        assert_eq!(s.assertion(&input("alice"), "app", now + 9).unwrap(), a);
        assert_ne!(s.assertion(&input("bob"), "app", now).unwrap(), a);
        assert_ne!(s.assertion(&input("alice"), "other", now).unwrap(), a);
        let mut noncompliant = input("alice");
        noncompliant.device = noncompliant.device.map(|d| DeviceFacts {
            compliance: "noncompliant",
            ..d
        });
        assert_ne!(s.assertion(&noncompliant, "app", now).unwrap(), a);
        let mut restricted = input("alice");
        restricted.decision = "restrict";
        assert_ne!(s.assertion(&restricted, "app", now).unwrap(), a);
        // Past the window: a fresh one.
        assert_ne!(s.assertion(&input("alice"), "app", now + 10).unwrap(), a);
    }

    #[test]
    fn refuses_keys_that_are_not_p256_pkcs8() {
        let rsa = crate::demo::pki::SigningKey::rs256("r").unwrap();
        let err =
            Signer::new(&cfg(0, None), &[("r".into(), rsa.private_pem.into_bytes())]).unwrap_err();
        assert!(err.to_string().contains("not a P-256 key"), "{err}");
        let err = Signer::new(&cfg(0, None), &[("x".into(), b"garbage".to_vec())]).unwrap_err();
        assert!(err.to_string().starts_with("key `x`"), "{err}");
        let (k1, p1, _) = key("k1");
        assert!(Signer::new(&cfg(0, Some("nope")), &[(k1, p1)]).is_err());
    }
}
