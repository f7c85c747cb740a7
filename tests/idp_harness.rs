//! The browser tests' IdP harness, proven on its own (no proxy): the real
//! `oidc-provider` behind tests/js/idp.mjs answers discovery, runs a full
//! authorization-code flow with PKCE for both client authentication methods,
//! refuses a reused code and a missing PKCE challenge, and sends real
//! Back-Channel Logout requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use common::full;
use common::idp::{
    ACR_MFA, ACR_PWD, CookieClient, Idp, IdpClient, IdpConfig, form_encode, pkce_pair, query_param,
    random_token,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::demo::pki::SigningKey;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const REDIRECT: &str = "https://127.0.0.1:9/.portcullis/callback";
const SECRET: &str = "a-test-client-secret-of-some-length";

/// A receiver of back-channel logout POSTs (https with `tls`, else plain
/// http); keeps each body.
async fn logout_receiver(tls: Option<&common::TestPki>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let acceptor = tls.map(|pki| pki.tls_acceptor(&[]));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = s2.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&body).into_owned());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn authorize_url(
    disc: &Value,
    client_id: &str,
    state: &str,
    nonce: &str,
    challenge: Option<&str>,
    acr: &str,
) -> String {
    let mut q = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("scope", "openid email profile"),
        ("state", state),
        ("nonce", nonce),
        ("acr_values", acr),
    ];
    if let Some(c) = challenge {
        q.push(("code_challenge", c));
        q.push(("code_challenge_method", "S256"));
    }
    format!(
        "{}?{}",
        disc["authorization_endpoint"].as_str().unwrap(),
        form_encode(&q)
    )
}

/// Verifies an IdP-signed JWT against its JWKS with jsonwebtoken; returns the claims.
fn verify(jwks: &Value, jwt: &str, aud: &str, iss: &str) -> Value {
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let kid = header.kid.clone().unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("kid {kid} not in the IdP's JWKS"));
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&[aud]);
    v.set_issuer(&[iss]);
    // Logout tokens need not carry `exp`; ID tokens are checked for it below.
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(jwt, &key, &v).unwrap().claims
}

async fn token_request(
    c: &CookieClient,
    disc: &Value,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let mut b = Request::post(disc["token_endpoint"].as_str().unwrap())
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let raw = format!("{id}:{secret}");
        b = b.header(
            "authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            ),
        );
    }
    let resp = c.send(b.body(full(form_encode(form))).unwrap()).await;
    (resp.status, resp.json())
}

#[tokio::test]
async fn code_flow_with_pkce_against_the_real_idp() {
    let (bcl_addr, bcl_seen) = logout_receiver(None).await;
    let client_key = SigningKey::es256("rp-key-1").unwrap();
    let idp = Idp::start(
        IdpConfig::new()
            .client(
                IdpClient::secret_basic("proxy", SECRET, REDIRECT)
                    .with("post_logout_redirect_uris", json!(["https://127.0.0.1:9/"]))
                    .with("backchannel_logout_uri", format!("http://{bcl_addr}/bcl")),
            )
            .client(
                IdpClient::private_key_jwt("proxy-pkjwt", json!({"keys": [client_key.jwk]}), REDIRECT)
                    .with("id_token_signed_response_alg", "RS256"),
            )
            .account(
                "alice",
                json!({"email": "alice@corp.test", "name": "Alice", "groups": ["eng", "payroll"], "deviceid": "laptop-1"}),
            ),
    )
    .await;

    // Discovery.
    let disc = idp.discovery().await;
    assert_eq!(disc["issuer"], idp.issuer.as_str());
    assert!(idp.issuer.starts_with("http://127.0.0.1:"));
    assert_eq!(disc["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(disc["acr_values_supported"], json!([ACR_PWD, ACR_MFA]));
    assert_eq!(disc["backchannel_logout_supported"], true);
    assert!(disc["end_session_endpoint"].is_string());
    let jwks = idp.jwks().await;

    // Full code flow, client_secret_basic, ES256 ID token, MFA.
    let browser = CookieClient::new(None);
    let (verifier, challenge) = pkce_pair();
    let (state, nonce) = (random_token(), random_token());
    let url = authorize_url(&disc, "proxy", &state, &nonce, Some(&challenge), ACR_MFA);
    let back = browser.idp_login(&url, "alice", ACR_MFA).await;
    assert!(back.starts_with(REDIRECT), "{back}");
    assert_eq!(query_param(&back, "state").as_deref(), Some(state.as_str()));
    assert_eq!(
        query_param(&back, "iss").as_deref(),
        Some(idp.issuer.as_str())
    );
    let code = query_param(&back, "code").expect("code");

    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    let (status, tokens) = token_request(&browser, &disc, &form, Some(("proxy", SECRET))).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let id_token = tokens["id_token"].as_str().unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(id_token).unwrap().alg,
        jsonwebtoken::Algorithm::ES256
    );
    let claims = verify(&jwks, id_token, "proxy", &idp.issuer);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["nonce"], nonce.as_str());
    assert_eq!(claims["acr"], ACR_MFA);
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(claims["email"], "alice@corp.test");
    assert_eq!(claims["groups"], json!(["eng", "payroll"]));
    assert_eq!(claims["deviceid"], "laptop-1");
    let sid = claims["sid"]
        .as_str()
        .expect("sid (back-channel logout client)")
        .to_owned();
    assert!(claims["auth_time"].is_u64());
    assert!(claims["exp"].as_u64().unwrap() > portcullis::util::now_unix());

    // The same code twice: refused.
    let (status, err) = token_request(&browser, &disc, &form, Some(("proxy", SECRET))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"], "invalid_grant");

    // A wrong verifier: refused.
    let (_, c2) = pkce_pair();
    let url = authorize_url(&disc, "proxy", &state, &nonce, Some(&c2), ACR_PWD);
    let back = browser.idp_login(&url, "alice", ACR_PWD).await;
    let code2 = query_param(&back, "code").unwrap();
    let (status, err) = token_request(
        &browser,
        &disc,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code2),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
        Some(("proxy", SECRET)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"], "invalid_grant");

    // No PKCE challenge: the IdP refuses the authorization request.
    let url = authorize_url(&disc, "proxy", &state, &nonce, None, ACR_PWD);
    let resp = browser.follow_within_origin(&url).await;
    let loc = resp.location().expect("error redirect to the RP");
    assert_eq!(
        query_param(&loc, "error").as_deref(),
        Some("invalid_request"),
        "{loc}"
    );

    // private_key_jwt, RS256 ID token, password only. The IdP's session from
    // the first login is reused unless the RP forces a login.
    let (verifier, challenge) = pkce_pair();
    let url = format!(
        "{}&prompt=login",
        authorize_url(
            &disc,
            "proxy-pkjwt",
            &state,
            &nonce,
            Some(&challenge),
            ACR_PWD
        )
    );
    let back = browser.idp_login(&url, "alice", ACR_PWD).await;
    let code = query_param(&back, "code").unwrap();
    let now = portcullis::util::now_unix();
    let assertion = client_key
        .sign_jws(
            &json!({"alg": "ES256", "kid": "rp-key-1", "typ": "JWT"}),
            &json!({"iss": "proxy-pkjwt", "sub": "proxy-pkjwt", "aud": idp.issuer, "jti": random_token(), "iat": now, "exp": now + 60}),
        )
        .unwrap();
    let (status, tokens) = token_request(
        &browser,
        &disc,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
            ("client_id", "proxy-pkjwt"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let id_token = tokens["id_token"].as_str().unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(id_token).unwrap().alg,
        jsonwebtoken::Algorithm::RS256
    );
    let claims = verify(&jwks, id_token, "proxy-pkjwt", &idp.issuer);
    assert_eq!(claims["acr"], ACR_PWD);
    assert_eq!(claims["sub"], "alice");

    // The IdP remembers the login's sid; its back-channel logout reaches the RP.
    let sessions = idp.sessions("alice").await;
    assert!(
        sessions
            .iter()
            .any(|s| s["client_id"] == "proxy" && s["sid"] == sid.as_str()),
        "{sessions:?}"
    );
    idp.backchannel_logout("proxy", "alice", Some(&sid))
        .await
        .unwrap();
    let body = bcl_seen
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a back-channel logout request");
    let logout_token = query_param(&format!("?{body}"), "logout_token").unwrap();
    let lt = verify(&jwks, &logout_token, "proxy", &idp.issuer);
    assert_eq!(lt["sub"], "alice");
    assert_eq!(lt["sid"], sid.as_str());
    assert!(lt["events"]["http://schemas.openid.net/event/backchannel-logout"].is_object());
    assert!(lt.get("nonce").is_none());

    // A well-signed token of the test's own making (for bad-input tests).
    let forged = idp
        .sign(
            "RS256",
            Some("logout+jwt"),
            json!({"iss": idp.issuer, "aud": "proxy", "sub": "alice"}),
        )
        .await;
    let c = verify(&jwks, &forged, "proxy", &idp.issuer);
    assert_eq!(c["sub"], "alice");

    // RP-initiated logout: the confirmation form, then back-channel + redirect.
    let before = bcl_seen.lock().unwrap().len();
    let end = format!(
        "{}?{}",
        disc["end_session_endpoint"].as_str().unwrap(),
        form_encode(&[
            ("client_id", "proxy"),
            ("post_logout_redirect_uri", "https://127.0.0.1:9/"),
            ("state", "bye")
        ])
    );
    let after_logout = browser.idp_logout(&end).await;
    assert_eq!(
        after_logout.as_deref(),
        Some("https://127.0.0.1:9/?state=bye")
    );
    common::wait_until("back-channel logout on end_session", || {
        bcl_seen.lock().unwrap().len() > before
    })
    .await;
    assert!(idp.stderr().contains("Unsupported runtime") || !idp.stderr().contains("server_error"));

    // With the IdP session gone, the next authorization asks for a login again.
    let (_, challenge) = pkce_pair();
    let url = authorize_url(&disc, "proxy", &state, &nonce, Some(&challenge), ACR_PWD);
    let resp = browser.follow_within_origin(&url).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.text().contains("id=\"login\""));
}

/// Back-channel logout over https to a receiver whose certificate comes from
/// a test CA: the IdP trusts exactly the CA it is given (as the proxy's tests
/// need), and a receiver it does not trust gets no logout token.
#[tokio::test]
async fn backchannel_logout_over_https_trusts_the_given_ca() {
    let pki = common::TestPki::new();
    let (addr, seen) = logout_receiver(Some(&pki)).await;
    let cfg = IdpConfig::new()
        .client(IdpClient::secret_basic("proxy", SECRET, REDIRECT).with(
            "backchannel_logout_uri",
            format!("https://127.0.0.1:{}/bcl", addr.port()),
        ))
        .account("bob", json!({"email": "bob@corp.test"}));
    let idp = Idp::start(cfg.clone().trust_ca(&pki.path().join("ca.pem"))).await;
    idp.backchannel_logout("proxy", "bob", Some("sid-1"))
        .await
        .unwrap();
    let body = seen.lock().unwrap().last().cloned().unwrap();
    let lt = query_param(&format!("?{body}"), "logout_token").unwrap();
    let claims = verify(&idp.jwks().await, &lt, "proxy", &idp.issuer);
    assert_eq!(
        (claims["sub"].as_str(), claims["sid"].as_str()),
        (Some("bob"), Some("sid-1"))
    );

    let untrusting = Idp::start(cfg).await;
    let err = untrusting
        .backchannel_logout("proxy", "bob", Some("sid-2"))
        .await
        .unwrap_err();
    assert!(err.starts_with("502"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Walks the IdP's login for alice submitting no `acr` field (the form
/// left as the IdP filled it in); returns the form page and where the IdP
/// sent the browser back to.
async fn login_leaving_acr_to_the_idp(browser: &CookieClient, url: &str) -> (String, String) {
    let page = browser.follow_within_origin(url).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let action = format!("{}/login", page.url.split('?').next().unwrap());
    let mut resp = browser
        .post_form(&action, &[("account", "alice")], &[])
        .await;
    loop {
        let next = resp.location().expect("a redirect");
        if next.starts_with(REDIRECT) {
            return (page.text(), next);
        }
        resp = browser.get(&next, &[]).await;
    }
}

async fn id_token_claims(
    browser: &CookieClient,
    idp: &Idp,
    code: &str,
    verifier: &str,
    secret: &str,
) -> Result<Value, (StatusCode, Value)> {
    let disc = idp.discovery().await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier),
    ];
    let (status, tokens) = token_request(browser, &disc, &form, Some(("late", secret))).await;
    if status != StatusCode::OK {
        return Err((status, tokens));
    }
    let jwks = idp.jwks().await;
    Ok(verify(
        &jwks,
        tokens["id_token"].as_str().unwrap(),
        "late",
        &idp.issuer,
    ))
}

/// A client registered once the IdP runs (`POST /test/clients`, as the
/// proxy tests do once the proxy's port is known) works like a static one
/// and can be replaced; the IdP honours `acr_values` when the login form is
/// left as it is, and releases `acr` even when none was asked for.
#[tokio::test]
async fn run_time_clients_and_requested_acr() {
    let idp =
        Idp::start(IdpConfig::new().account("alice", json!({"email": "alice@corp.test"}))).await;
    idp.register(IdpClient::secret_basic("late", SECRET, REDIRECT))
        .await;
    let disc = idp.discovery().await;
    let browser = CookieClient::new(None);
    let (state, nonce) = (random_token(), random_token());

    let (verifier, challenge) = pkce_pair();
    let url = authorize_url(&disc, "late", &state, &nonce, Some(&challenge), ACR_MFA);
    let (page, back) = login_leaving_acr_to_the_idp(&browser, &url).await;
    assert!(
        page.contains(&format!("value=\"{ACR_MFA}\" selected")),
        "{page}"
    );
    let code = query_param(&back, "code").expect("code");
    let claims = id_token_claims(&browser, &idp, &code, &verifier, SECRET)
        .await
        .unwrap();
    assert_eq!(claims["acr"], ACR_MFA);
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));

    // Replaced with another secret: the old one no longer authenticates.
    // No acr_values this time: the default acr, released all the same.
    let other = "another-secret-entirely";
    idp.register(IdpClient::secret_basic("late", other, REDIRECT))
        .await;
    let (verifier, challenge) = pkce_pair();
    let url = authorize_url(&disc, "late", &state, &nonce, Some(&challenge), ACR_PWD)
        .split('&')
        .filter(|p| !p.starts_with("acr_values="))
        .collect::<Vec<_>>()
        .join("&");
    let (_, back) = login_leaving_acr_to_the_idp(&browser, &format!("{url}&prompt=login")).await;
    let code = query_param(&back, "code").expect("code");
    let (status, err) = id_token_claims(&browser, &idp, &code, &verifier, SECRET)
        .await
        .unwrap_err();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    assert_eq!(err["error"], "invalid_client");
    let claims = id_token_claims(&browser, &idp, &code, &verifier, other)
        .await
        .unwrap();
    assert_eq!(claims["acr"], ACR_PWD);
    assert_eq!(claims["amr"], json!(["pwd"]));
}
