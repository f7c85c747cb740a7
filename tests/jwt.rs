//! Bearer-token verification through the real proxy: every token a verifier
//! must resist is refused with 401 and never reaches the upstream; keys
//! rotate at the JWKS URL without a restart, and a removed key takes its
//! cached tokens with it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use common::*;
use http::StatusCode;
use portcullis::demo::pki::SigningKey;

const ISS: &str = "https://idp.test";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Builds a compact JWS with an arbitrary header, signed by `key` under `alg`.
fn raw_token(
    header: serde_json::Value,
    claims: &serde_json::Value,
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
) -> String {
    let msg = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

struct Env {
    pki: TestPki,
    upstream: Upstream,
    jwks: JwksServer,
    server: portcullis::server::RunningServer,
    rsa: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
}

async fn env(discovery: bool) -> Env {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let (rsa, ec, ed) = keys();
    let jwks = JwksServer::start(ISS, vec![rsa.jwk.clone(), ec.jwk.clone(), ed.jwk.clone()]).await;
    let source = if discovery {
        format!("discovery_url = \"{}\"", jwks.discovery_url())
    } else {
        format!("jwks_url = \"{}\"", jwks.url())
    };
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    let cfg = pki.write_config("p.toml", &base_config(ISS, &source, &routes));
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        upstream,
        jwks,
        server,
        rsa,
        ec,
        ed,
    }
}

impl Env {
    fn url(&self) -> String {
        format!(
            "https://localhost:{}/resource",
            self.server.proxy_addr.port()
        )
    }

    async fn status(&self, token: &str) -> (StatusCode, http::HeaderMap) {
        let c = client(&self.pki.ca_pem, false);
        let (st, h, _) = get(&c, &self.url(), Some(token), &[]).await;
        (st, h)
    }

    async fn assert_refused(&self, name: &str, token: &str) {
        self.assert_refused_because(name, token, "").await
    }

    async fn assert_refused_because(&self, name: &str, token: &str, why: &str) {
        let before = self.upstream.count();
        let (st, h) = self.status(token).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{name}: expected 401");
        let challenge = h["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{name}: challenge was `{challenge}`"
        );
        assert!(
            challenge.contains("error_description=\""),
            "{name}: no description"
        );
        assert!(
            challenge.contains(why),
            "{name}: expected `{why}` in `{challenge}`"
        );
        assert_eq!(
            self.upstream.count(),
            before,
            "{name}: the upstream saw the request"
        );
    }

    /// The issuer rotates ec-1 out; a refresh (triggered by a token with an
    /// unknown kid) swaps the key set, and `cached`, a token ec-1 signed and
    /// the proxy verified before, is refused from then on.
    async fn rotate_out_ec(&self, cached: &str) {
        self.jwks
            .set_keys(vec![self.rsa.jwk.clone(), self.ed.jwk.clone()]);
        let stranger = SigningKey::es256("unknown").unwrap();
        self.assert_refused("unknown kid", &stranger.sign(&claims(ISS, "x")).unwrap())
            .await;
        self.assert_refused_because("cached token of a removed key", cached, "key is unknown")
            .await;
    }
}

#[tokio::test]
async fn every_algorithm_the_issuer_allows_is_accepted() {
    let e = env(false).await;
    for key in [&e.rsa, &e.ec, &e.ed] {
        let t = key.sign(&claims(ISS, "alice")).unwrap();
        assert_eq!(e.status(&t).await.0, StatusCode::OK, "{}", key.alg);
    }
    assert_eq!(e.upstream.count(), 3);
}

#[tokio::test]
async fn hostile_and_broken_tokens_are_refused_and_never_reach_the_upstream() {
    let e = env(false).await;
    let now = portcullis::util::now_unix();
    let good = claims(ISS, "alice");
    let ec_key = e.ec.encoding_key().unwrap();

    // alg: none, unsigned.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"ec-1"}"#),
        b64(good.to_string().as_bytes())
    );
    e.assert_refused_because("alg none", &none, "algorithm is not accepted")
        .await;

    // HS256 signed with the RSA public key (PEM) as the HMAC secret.
    let hs = raw_token(
        serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(e.rsa.public_pem.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    );
    e.assert_refused_because(
        "HS256 with RSA public key",
        &hs,
        "algorithm is not accepted",
    )
    .await;

    // A bad signature: a valid token whose signature is from another key with the same kid.
    let other = SigningKey::es256("ec-1").unwrap();
    e.assert_refused_because(
        "bad signature",
        &other.sign(&good).unwrap(),
        "signature is invalid",
    )
    .await;

    // Expired (leeway is 5 s).
    let mut c = good.clone();
    c["exp"] = (now - 120).into();
    c["iat"] = (now - 600).into();
    c["nbf"] = (now - 600).into();
    e.assert_refused_because("expired", &e.ec.sign(&c).unwrap(), "expired")
        .await;

    // Not yet valid.
    let mut c = good.clone();
    c["nbf"] = (now + 120).into();
    e.assert_refused_because("not yet valid", &e.ec.sign(&c).unwrap(), "not yet valid")
        .await;

    // Issued in the future.
    let mut c = good.clone();
    c["iat"] = (now + 300).into();
    e.assert_refused_because(
        "iat in the future",
        &e.ec.sign(&c).unwrap(),
        "issued in the future",
    )
    .await;

    // Missing exp.
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("exp");
    e.assert_refused_because("no exp", &e.ec.sign(&c).unwrap(), "`exp`")
        .await;

    // Wrong iss.
    let mut c = good.clone();
    c["iss"] = "https://evil.test".into();
    e.assert_refused_because(
        "wrong iss",
        &e.ec.sign(&c).unwrap(),
        "issuer is not trusted",
    )
    .await;

    // iss that differs only by a trailing slash (exact comparison).
    let mut c = good.clone();
    c["iss"] = format!("{ISS}/").into();
    e.assert_refused_because(
        "iss with trailing slash",
        &e.ec.sign(&c).unwrap(),
        "issuer is not trusted",
    )
    .await;

    // Wrong aud, and no aud.
    let mut c = good.clone();
    c["aud"] = "https://other.api".into();
    e.assert_refused_because("wrong aud", &e.ec.sign(&c).unwrap(), "audience")
        .await;
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("aud");
    e.assert_refused_because("no aud", &e.ec.sign(&c).unwrap(), "audience")
        .await;

    // Unknown kid: the refresh runs (the JWKS server is hit) and finds none.
    let hits = e.jwks.hits.load(std::sync::atomic::Ordering::SeqCst);
    let stranger = SigningKey::es256("unknown-kid").unwrap();
    e.assert_refused_because(
        "unknown kid",
        &stranger.sign(&good).unwrap(),
        "key is unknown",
    )
    .await;
    assert!(
        e.jwks.hits.load(std::sync::atomic::Ordering::SeqCst) > hits,
        "an unknown kid must trigger a JWKS refresh"
    );

    // A JWKS key of the wrong type for the alg: ES256 header naming the RSA key.
    let wrong_type = raw_token(
        serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "rsa-1"}),
        &good,
        &ec_key,
        jsonwebtoken::Algorithm::ES256,
    );
    e.assert_refused_because(
        "key of wrong type for alg",
        &wrong_type,
        "does not match its key",
    )
    .await;
    // …and EdDSA naming the EC key.
    let wrong_type = raw_token(
        serde_json::json!({"alg": "EdDSA", "kid": "ec-1"}),
        &good,
        &e.ed.encoding_key().unwrap(),
        jsonwebtoken::Algorithm::EdDSA,
    );
    e.assert_refused_because(
        "EdDSA header on EC key",
        &wrong_type,
        "does not match its key",
    )
    .await;

    // A 64 KB token, validly signed.
    let mut c = good.clone();
    c["pad"] = "x".repeat(64 * 1024).into();
    let big = e.ec.sign(&c).unwrap();
    assert!(big.len() > 64 * 1024);
    e.assert_refused_because("64 KB token", &big, "longer than")
        .await;

    // Garbage base64 and shapes.
    for junk in [
        "!!!.@@@.###",
        "a.b",
        "a.b.c.d",
        "eyJhbGciOiJFUzI1NiJ9.%%%.abc",
        "....",
        "e30.e30.e30",
    ] {
        e.assert_refused(junk, junk).await;
    }

    // Another token type replayed as an access token.
    let set_like = raw_token(
        serde_json::json!({"alg": "ES256", "typ": "secevent+jwt", "kid": "ec-1"}),
        &good,
        &ec_key,
        jsonwebtoken::Algorithm::ES256,
    );
    e.assert_refused_because("typ secevent+jwt", &set_like, "not an access token")
        .await;

    // A critical header extension.
    let crit = raw_token(
        serde_json::json!({"alg": "ES256", "kid": "ec-1", "crit": ["b64"], "b64": false}),
        &good,
        &ec_key,
        jsonwebtoken::Algorithm::ES256,
    );
    e.assert_refused_because("crit header", &crit, "critical extension")
        .await;

    // A key offered in the header (jwk / jku) is never used.
    let jku = raw_token(
        serde_json::json!({"alg": "ES256", "kid": "attacker", "jku": "http://127.0.0.1:1/jwks", "jwk": other.jwk}),
        &good,
        &other.encoding_key().unwrap(),
        jsonwebtoken::Algorithm::ES256,
    );
    e.assert_refused_because("jku/jwk header key", &jku, "key is unknown")
        .await;

    // Duplicate claim names.
    let dup = format!(
        "{{\"iss\":\"{ISS}\",\"sub\":\"alice\",\"sub\":\"admin\",\"aud\":\"{AUDIENCE}\",\"exp\":{}}}",
        now + 600
    );
    let msg = format!(
        "{}.{}",
        b64(br#"{"alg":"ES256","kid":"ec-1"}"#),
        b64(dup.as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &ec_key, jsonwebtoken::Algorithm::ES256)
        .unwrap();
    e.assert_refused_because("duplicate claims", &format!("{msg}.{sig}"), "malformed")
        .await;

    // The good token still works, and the upstream saw only it.
    assert_eq!(e.status(&e.ec.sign(&good).unwrap()).await.0, StatusCode::OK);
    assert_eq!(e.upstream.count(), 1);
}

#[tokio::test]
async fn a_new_key_published_at_the_jwks_url_is_picked_up_without_restart() {
    let e = env(true).await;
    let newkey = SigningKey::es256("rotated-2").unwrap();
    let token = newkey.sign(&claims(ISS, "bob")).unwrap();
    e.assert_refused("not yet published", &token).await;
    e.jwks.set_keys(vec![
        e.rsa.jwk.clone(),
        e.ec.jwk.clone(),
        e.ed.jwk.clone(),
        newkey.jwk.clone(),
    ]);
    assert_eq!(e.status(&token).await.0, StatusCode::OK);
    assert_eq!(e.upstream.last().headers["x-portcullis-subject"], "bob");
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_evicts_the_tokens_it_verified() {
    let e = env(false).await;
    let token = e.ec.sign(&claims(ISS, "carol")).unwrap();
    assert_eq!(e.status(&token).await.0, StatusCode::OK);
    assert_eq!(e.status(&token).await.0, StatusCode::OK); // now served from the cache
    e.rotate_out_ec(&token).await;
}

#[tokio::test]
async fn a_key_published_again_after_its_removal_verifies_again() {
    let e = env(false).await;
    let token = e.ec.sign(&claims(ISS, "dave")).unwrap();
    assert_eq!(e.status(&token).await.0, StatusCode::OK);
    e.rotate_out_ec(&token).await;
    // The issuer publishes ec-1 again: the next token of that key triggers a
    // refresh, and both it and the earlier one pass, twice (the second time
    // from the cache).
    e.jwks
        .set_keys(vec![e.rsa.jwk.clone(), e.ec.jwk.clone(), e.ed.jwk.clone()]);
    let fresh = e.ec.sign(&claims(ISS, "erin")).unwrap();
    for t in [&fresh, &token, &fresh, &token] {
        assert_eq!(e.status(t).await.0, StatusCode::OK);
    }
    assert_eq!(e.upstream.last().headers["x-portcullis-subject"], "dave");
}

#[tokio::test]
async fn unreachable_jwks_fails_closed_and_readyz_says_so() {
    let pki = TestPki::new();
    let upstream = Upstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = format!(
        "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
        upstream.url()
    );
    let cfg = pki.write_config(
        "p.toml",
        &base_config(
            ISS,
            &format!("jwks_url = \"http://{dead}/jwks.json\""),
            &routes,
        ),
    );
    let server = portcullis::server::start(cfg).await.unwrap();
    let (_, ec, _) = keys();
    let c = client(&pki.ca_pem, false);
    let url = format!("https://localhost:{}/", server.proxy_addr.port());
    let (st, _, _) = get(&c, &url, Some(&ec.sign(&claims(ISS, "a")).unwrap()), &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(upstream.count(), 0);
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let r = plain
        .get(
            format!("http://{}/readyz", server.admin_addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}
