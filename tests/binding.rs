//! Token binding end to end: real TLS with real client certificates (rcgen),
//! real DPoP proofs, a real upstream that records what reached it. Every
//! refusal is checked for its status, challenge and body, and for the
//! upstream having seen nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use portcullis::binding::mtls::encode_x5t;
use portcullis::demo::pki::{ClientCertSpec, DevCa, Leaf, SigningKey};

const ISS: &str = "https://idp.test";
/// The one SNI name that requests client certificates.
const MTLS: &str = "mtls.test";
const DEFAULT_ALGS: &str = "ES256 ES384 EdDSA PS256 RS256";

struct Env {
    pki: TestPki,
    device_ca: DevCa,
    spiffe_ca: DevCa,
    upstream: Upstream,
    server: portcullis::server::RunningServer,
    issuer: SigningKey,
}

fn config(up: &str, binding_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[log]
level = "warn"

[tls]
client_ca = ["device-ca.pem"]
client_auth_hosts = ["{MTLS}"]

[[tls.certificates]]
cert = "server.pem"
key = "server-key.pem"

[[tls.spiffe]]
trust_domain = "prod.test"
bundle = "spiffe-ca.pem"

[binding]
device_id_rule = "san-uri:device://{{id}}"
{binding_extra}

[[issuers]]
name = "test"
issuer = "{ISS}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
jwks_file = "jwks.json"
leeway_s = 5

[[routes]]
name = "app"
path_prefix = "/"
upstream = "{up}"
auth = "bearer"

[[routes]]
name = "strict"
path_prefix = "/strict"
upstream = "{up}"
auth = "bearer"
binding = "required"

[[routes]]
name = "internal"
path_prefix = "/internal"
upstream = "{up}"
auth = "mtls"
spiffe_ids = ["spiffe://prod.test/billing", "spiffe://prod.test/jobs/*"]

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "{up}"
auth = "public"
"#
    )
}

async fn env(binding_extra: &str) -> Env {
    let pki = TestPki::with_names(&["localhost", "127.0.0.1", "app.test", MTLS]);
    let device_ca = DevCa::new("device CA").unwrap();
    let spiffe_ca = DevCa::new("SPIFFE prod.test").unwrap();
    std::fs::write(pki.path().join("device-ca.pem"), device_ca.cert_pem()).unwrap();
    std::fs::write(pki.path().join("spiffe-ca.pem"), spiffe_ca.cert_pem()).unwrap();
    let upstream = Upstream::start().await;
    let issuer = SigningKey::es256("idp-1").unwrap();
    std::fs::write(
        pki.path().join("jwks.json"),
        serde_json::json!({ "keys": [issuer.jwk] }).to_string(),
    )
    .unwrap();
    let cfg = pki.write_config("p.toml", &config(&upstream.url(), binding_extra));
    let server = portcullis::server::start(cfg).await.unwrap();
    Env {
        pki,
        device_ca,
        spiffe_ca,
        upstream,
        server,
        issuer,
    }
}

impl Env {
    fn addr(&self) -> SocketAddr {
        self.server.proxy_addr
    }

    /// A token for `sub`, naming `device`, with `cnf` when given.
    fn token(&self, device: Option<&str>, cnf: Option<serde_json::Value>) -> String {
        let mut c = claims(ISS, "alice@example.com");
        match device {
            Some(d) => c["device_id"] = d.into(),
            None => {
                c.as_object_mut().unwrap().remove("device_id");
            }
        }
        if let Some(cnf) = cnf {
            c["cnf"] = cnf;
        }
        self.issuer.sign(&c).unwrap()
    }

    fn dpop_token(&self, key: &SigningKey) -> String {
        self.token(
            Some("laptop-1"),
            Some(serde_json::json!({ "jkt": key.thumbprint().unwrap() })),
        )
    }

    fn mtls_token(&self, cert: &Leaf, device: Option<&str>) -> String {
        let x5t = encode_x5t(&portcullis::util::sha256(&cert.cert_der));
        self.token(device, Some(serde_json::json!({ "x5t#S256": x5t })))
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.addr().port())
    }

    async fn conn(&self, sni: &str, cert: Option<&Leaf>) -> TlsConn {
        let id = cert.map(ClientIdentity::from);
        TlsConn::connect(self.addr(), sni, &self.pki.ca_pem, id.as_ref())
            .await
            .unwrap()
    }

    /// True when a connection presenting `cert` is refused in the handshake.
    async fn handshake_refused(&self, cert: &Leaf) -> bool {
        let id = ClientIdentity::from(cert);
        match TlsConn::connect(self.addr(), MTLS, &self.pki.ca_pem, Some(&id)).await {
            Err(_) => true,
            Ok(mut c) => c.send("GET", "/public/x", &[]).await.is_err(),
        }
    }

    fn device(&self, id: &str) -> Leaf {
        self.device_ca
            .client_cert(id, &[&format!("device://{id}")])
            .unwrap()
    }

    fn svid(&self, ca: &DevCa, id: &str) -> Leaf {
        ca.client_cert("", &[id]).unwrap()
    }
}

fn challenges(h: &http::HeaderMap) -> Vec<String> {
    h.get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

fn error_code(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["error"].as_str().unwrap().to_owned()
}

fn dpop_auth(token: &str) -> String {
    format!("DPoP {token}")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn dpop_bound_tokens_with_valid_proofs_reach_the_upstream() {
    let e = env("").await;
    let mut c = e.conn("localhost", None).await;
    for key in [
        SigningKey::es256("c-ec").unwrap(),
        SigningKey::eddsa("c-ed").unwrap(),
        SigningKey::rs256("c-rsa").unwrap(),
    ] {
        let token = e.dpop_token(&key);
        // The request carries a query; the proof's htu does not (RFC 9449 §4.2).
        let proof = key
            .dpop_proof("GET", &e.url("localhost", "/hello"), Some(&token), None)
            .unwrap();
        let auth = dpop_auth(&token);
        let (status, _, body) = c
            .get(
                "/hello?x=1",
                &[
                    ("authorization", &auth),
                    ("dpop", &proof),
                    ("x-portcullis-binding", "mtls"),
                    ("x-portcullis-verified-device", "spoofed"),
                    ("x-portcullis-workload", "spiffe://prod.test/billing"),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}: {body:?}", key.alg);
        let seen = e.upstream.last();
        assert_eq!(seen.headers["x-portcullis-binding"], "dpop");
        assert_eq!(seen.headers["x-portcullis-device"], "laptop-1");
        assert!(seen.headers.get("x-portcullis-verified-device").is_none());
        assert!(seen.headers.get("x-portcullis-workload").is_none());
        // The token and its proof stay at the proxy (no route here asks
        // for them): the app learns the binding, not the credential.
        assert!(seen.headers.get("authorization").is_none());
        assert!(seen.headers.get("dpop").is_none());
    }
    assert_eq!(e.upstream.count(), 3);

    // HTTP/2: the htu is built from `:authority`.
    let key = SigningKey::es256("c-h2").unwrap();
    let token = e.dpop_token(&key);
    let url = e.url("localhost", "/h2/path");
    let proof = key.dpop_proof("GET", &url, Some(&token), None).unwrap();
    let h2 = client(&e.pki.ca_pem, true);
    let (status, _, body) = get(
        &h2,
        &format!("{url}?q=1"),
        None,
        &[("authorization", &dpop_auth(&token)), ("dpop", &proof)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let seen = e.upstream.last();
    assert_eq!(seen.headers["x-portcullis-binding"], "dpop");
    assert!(seen.headers.get("authorization").is_none());
    assert!(seen.headers.get("dpop").is_none());
}

#[tokio::test]
async fn every_dpop_proof_check_refuses_and_the_upstream_sees_nothing() {
    let e = env("").await;
    let key = SigningKey::es256("client").unwrap();
    let other = SigningKey::es256("other").unwrap();
    let token = e.dpop_token(&key);
    let htu = e.url("localhost", "/hello");
    let now = portcullis::util::now_unix();
    let good = || SigningKey::dpop_claims("GET", &htu, Some(&token), None);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = good();
        f(&mut c);
        key.sign_jws(&key.dpop_header(), &c).unwrap()
    };
    let header_with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut h = key.dpop_header();
        f(&mut h);
        key.sign_jws(&h, &good()).unwrap()
    };
    let hs256 = {
        let h = serde_json::json!({
            "typ": "dpop+jwt", "alg": "HS256",
            "jwk": { "kty": "oct", "k": b64(b"shared secret") },
        });
        let input = format!(
            "{}.{}",
            b64(h.to_string().as_bytes()),
            b64(good().to_string().as_bytes())
        );
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(b"shared secret"),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        format!("{input}.{sig}")
    };
    let alg_none = {
        let mut h = key.dpop_header();
        h["alg"] = "none".into();
        format!(
            "{}.{}.",
            b64(h.to_string().as_bytes()),
            b64(good().to_string().as_bytes())
        )
    };
    let tampered = {
        let p = key.dpop_proof("GET", &htu, Some(&token), None).unwrap();
        let (input, sig) = p.rsplit_once('.').unwrap();
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        raw[0] ^= 0xff;
        format!("{input}.{}", b64(&raw))
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("missing proof", vec![], "no DPoP proof"),
        (
            "two proofs",
            vec![
                key.dpop_proof("GET", &htu, Some(&token), None).unwrap(),
                key.dpop_proof("GET", &htu, Some(&token), None).unwrap(),
            ],
            "more than one",
        ),
        (
            "wrong htm",
            vec![with(&|c| c["htm"] = "POST".into())],
            "`htm`",
        ),
        (
            "wrong htu path",
            vec![with(&|c| c["htu"] = e.url("localhost", "/other").into())],
            "`htu` does not match",
        ),
        (
            "wrong htu host",
            vec![with(&|c| c["htu"] = e.url("app.test", "/hello").into())],
            "`htu` does not match",
        ),
        (
            "htu with query",
            vec![with(&|c| c["htu"] = format!("{htu}?x=1").into())],
            "query or fragment",
        ),
        (
            "htu with fragment",
            vec![with(&|c| c["htu"] = format!("{htu}#top").into())],
            "query or fragment",
        ),
        (
            "stale iat",
            vec![with(&|c| c["iat"] = (now - 120).into())],
            "too old",
        ),
        (
            "future iat",
            vec![with(&|c| c["iat"] = (now + 60).into())],
            "in the future",
        ),
        (
            "wrong ath",
            vec![with(&|c| {
                c["ath"] = portcullis::binding::dpop::ath("another token").into()
            })],
            "`ath`",
        ),
        (
            "missing ath",
            vec![with(&|c| {
                c.as_object_mut().unwrap().remove("ath");
            })],
            "`ath`",
        ),
        (
            "missing jti",
            vec![with(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            })],
            "`jti`",
        ),
        ("HS256 proof", vec![hs256], "algorithm"),
        ("alg none", vec![alg_none], "algorithm"),
        (
            "jwk with a private key",
            vec![header_with(&|h| h["jwk"]["d"] = b64(&[7u8; 32]).into())],
            "private key",
        ),
        (
            "jwk of the wrong type",
            vec![header_with(&|h| {
                h["jwk"] = SigningKey::eddsa("x").unwrap().public_jwk()
            })],
            "`jwk`",
        ),
        (
            "no jwk",
            vec![header_with(&|h| {
                h.as_object_mut().unwrap().remove("jwk");
            })],
            "`jwk`",
        ),
        (
            "jwk of another key",
            vec![header_with(&|h| h["jwk"] = other.public_jwk())],
            "signature",
        ),
        ("tampered signature", vec![tampered], "signature"),
        (
            "wrong typ",
            vec![header_with(&|h| h["typ"] = "JWT".into())],
            "`typ`",
        ),
        (
            "critical header",
            vec![header_with(&|h| h["crit"] = serde_json::json!(["exp"]))],
            "critical",
        ),
        (
            "oversize proof",
            vec![with(&|c| c["pad"] = "x".repeat(9000).into())],
            "longer than",
        ),
        ("not a JWT", vec!["a.b".to_owned()], "well-formed"),
    ];
    let mut c = e.conn("localhost", None).await;
    let auth = dpop_auth(&token);
    for (name, proofs, says) in &cases {
        let mut headers = vec![("authorization", auth.as_str())];
        for p in proofs {
            headers.push(("dpop", p.as_str()));
        }
        let (status, h, body) = c.get("/hello", &headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body:?}");
        assert_eq!(error_code(&body), "invalid_dpop_proof", "{name}");
        let www = challenges(&h);
        assert_eq!(www.len(), 1, "{name}: {www:?}");
        assert!(
            www[0].starts_with("DPoP error=\"invalid_dpop_proof\""),
            "{name}: {www:?}"
        );
        assert!(
            www[0].ends_with(&format!("algs=\"{DEFAULT_ALGS}\"")),
            "{name}: {www:?}"
        );
        assert!(
            www[0].contains(says),
            "{name}: expected `{says}` in {www:?}"
        );
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains(&token), "{name}: body echoes the token");
        for p in proofs {
            assert!(!text.contains(p.as_str()), "{name}: body echoes the proof");
        }
    }
    assert_eq!(
        e.upstream.count(),
        0,
        "a refused request reached the upstream"
    );

    // The same checks pass with a well-formed proof on the same connection.
    let p = key.dpop_proof("GET", &htu, Some(&token), None).unwrap();
    let (status, _, _) = c
        .get("/hello", &[("authorization", &auth), ("dpop", &p)])
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let e = env("").await;
    let key = SigningKey::es256("client").unwrap();
    let token = e.dpop_token(&key);
    let proof = key
        .dpop_proof("GET", &e.url("localhost", "/hello"), Some(&token), None)
        .unwrap();
    let auth = dpop_auth(&token);
    let mut c = e.conn("localhost", None).await;
    let (status, _, _) = c
        .get("/hello", &[("authorization", &auth), ("dpop", &proof)])
        .await;
    assert_eq!(status, StatusCode::OK);
    // Replayed on the same connection and on a fresh one.
    for mut conn in [c, e.conn("localhost", None).await] {
        let (status, h, body) = conn
            .get("/hello", &[("authorization", &auth), ("dpop", &proof)])
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(&body), "invalid_dpop_proof");
        assert!(challenges(&h)[0].contains("already used"));
    }
    assert_eq!(e.upstream.count(), 1);
}

#[tokio::test]
async fn a_proof_by_a_key_other_than_cnf_jkt_is_refused() {
    let e = env("").await;
    let key = SigningKey::es256("client").unwrap();
    let thief = SigningKey::es256("thief").unwrap();
    let token = e.dpop_token(&key);
    // The thief signs a perfectly valid proof with their own key.
    let proof = thief
        .dpop_proof("GET", &e.url("localhost", "/hello"), Some(&token), None)
        .unwrap();
    let mut c = e.conn("localhost", None).await;
    let (status, h, body) = c
        .get(
            "/hello",
            &[("authorization", &dpop_auth(&token)), ("dpop", &proof)],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_mismatch");
    let www = challenges(&h);
    assert!(
        www[0].starts_with("DPoP error=\"invalid_token\""),
        "{www:?}"
    );
    assert!(www[0].contains("cnf.jkt"), "{www:?}");
    assert_eq!(e.upstream.count(), 0);
}

#[tokio::test]
async fn scheme_downgrades_are_refused() {
    let e = env("").await;
    let key = SigningKey::es256("client").unwrap();
    let bound = e.dpop_token(&key);
    let htu = e.url("localhost", "/hello");
    let mut c = e.conn("localhost", None).await;

    // A DPoP-bound token presented as Bearer, even with a valid proof.
    let proof = key.dpop_proof("GET", &htu, Some(&bound), None).unwrap();
    let (status, h, body) = c
        .get(
            "/hello",
            &[
                ("authorization", &format!("Bearer {bound}")),
                ("dpop", &proof),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_mismatch");
    let www = challenges(&h);
    assert!(
        www[0].starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\""),
        "{www:?}"
    );
    assert!(www[0].contains("presented as a bearer token"), "{www:?}");
    assert_eq!(www[1], format!("DPoP algs=\"{DEFAULT_ALGS}\""));

    // An unbound token under the DPoP scheme.
    let unbound = e.token(Some("laptop-1"), None);
    let proof = key.dpop_proof("GET", &htu, Some(&unbound), None).unwrap();
    let (status, h, _) = c
        .get(
            "/hello",
            &[("authorization", &dpop_auth(&unbound)), ("dpop", &proof)],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenges(&h)[0].starts_with("DPoP error=\"invalid_token\""));

    // A bad token under the DPoP scheme gets a DPoP challenge.
    let (status, h, body) = c
        .get(
            "/hello",
            &[("authorization", "DPoP not.a.token"), ("dpop", &proof)],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "invalid_token");
    assert!(challenges(&h)[0].starts_with("DPoP error=\"invalid_token\""));

    // No credentials: both schemes offered, without error codes.
    let (status, h, _) = c.get("/hello", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenges(&h),
        [
            "Bearer realm=\"portcullis\"".to_owned(),
            format!("DPoP algs=\"{DEFAULT_ALGS}\"")
        ]
    );

    // Two Authorization headers are ambiguous.
    let (status, _, _) = c
        .get(
            "/hello",
            &[
                ("authorization", &format!("Bearer {unbound}")),
                ("authorization", &dpop_auth(&bound)),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e.upstream.count(), 0);
}

#[tokio::test]
async fn server_nonces_when_required() {
    let e = env("dpop_nonce = true").await;
    let key = SigningKey::es256("client").unwrap();
    let token = e.dpop_token(&key);
    let htu = e.url("localhost", "/hello");
    let auth = dpop_auth(&token);
    let mut c = e.conn("localhost", None).await;

    let proof = key.dpop_proof("GET", &htu, Some(&token), None).unwrap();
    let (status, h, body) = c
        .get("/hello", &[("authorization", &auth), ("dpop", &proof)])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "use_dpop_nonce");
    assert!(challenges(&h)[0].starts_with("DPoP error=\"use_dpop_nonce\""));
    let nonce = h["dpop-nonce"].to_str().unwrap().to_owned();

    let forged = key
        .dpop_proof(
            "GET",
            &htu,
            Some(&token),
            Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        )
        .unwrap();
    let (status, h, _) = c
        .get("/hello", &[("authorization", &auth), ("dpop", &forged)])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenges(&h)[0].starts_with("DPoP error=\"use_dpop_nonce\""));
    assert!(h.contains_key("dpop-nonce"));
    assert_eq!(e.upstream.count(), 0);

    let proof = key
        .dpop_proof("GET", &htu, Some(&token), Some(&nonce))
        .unwrap();
    let (status, h, body) = c
        .get("/hello", &[("authorization", &auth), ("dpop", &proof)])
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(
        h.contains_key("dpop-nonce"),
        "a fresh nonce rides on success"
    );
    assert_eq!(e.upstream.count(), 1);
}

#[tokio::test]
async fn certificate_bound_tokens_work_only_with_their_certificate() {
    let e = env("").await;
    let laptop_a = e.device("laptop-a");
    let laptop_b = e.device("laptop-b");
    let token = e.mtls_token(&laptop_a, Some("laptop-a"));
    let bearer = format!("Bearer {token}");

    let mut a = e.conn(MTLS, Some(&laptop_a)).await;
    assert!(a.asked_for_cert);
    let (status, _, body) = a.get("/hello", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let seen = e.upstream.last();
    assert_eq!(seen.headers["x-portcullis-binding"], "mtls");
    assert_eq!(seen.headers["x-portcullis-verified-device"], "laptop-a");
    assert_eq!(seen.headers["x-portcullis-device"], "laptop-a");
    assert_eq!(e.upstream.count(), 1);

    // The same token replayed from a second device's connection.
    let mut b = e.conn(MTLS, Some(&laptop_b)).await;
    let (status, h, body) = b.get("/hello", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_mismatch");
    let www = challenges(&h);
    assert!(
        www[0].starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\""),
        "{www:?}"
    );
    assert!(www[0].contains("another client certificate"), "{www:?}");

    // No certificate on a connection that was asked for one.
    let mut none = e.conn(MTLS, None).await;
    assert!(none.asked_for_cert);
    let (status, h, _) = none.get("/hello", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenges(&h)[0].contains("none was presented"));

    // A public name never asks, so no certificate: refused as well.
    let mut public = e.conn("localhost", None).await;
    assert!(!public.asked_for_cert);
    let (status, _, _) = public.get("/hello", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.upstream.count(), 1);
}

#[tokio::test]
async fn a_token_naming_another_device_than_the_certificate_is_refused() {
    let e = env("").await;
    let laptop_a = e.device("laptop-a");
    let laptop_b = e.device("laptop-b");
    // Unbound tokens: only the device claim ties them to a device.
    let for_a = format!("Bearer {}", e.token(Some("laptop-a"), None));

    let mut b = e.conn(MTLS, Some(&laptop_b)).await;
    let (status, h, body) = b.get("/hello", &[("authorization", &for_a)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_mismatch");
    assert!(challenges(&h)[0].contains("another device"));
    assert_eq!(e.upstream.count(), 0);

    let mut a = e.conn(MTLS, Some(&laptop_a)).await;
    let (status, _, _) = a.get("/hello", &[("authorization", &for_a)]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = e.upstream.last();
    assert_eq!(seen.headers["x-portcullis-binding"], "none");
    assert_eq!(seen.headers["x-portcullis-verified-device"], "laptop-a");

    // A token naming no device takes the certificate's.
    let anonymous = format!("Bearer {}", e.token(None, None));
    let (status, _, _) = a.get("/hello", &[("authorization", &anonymous)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e.upstream.last().headers["x-portcullis-device"], "laptop-a");
}

#[tokio::test]
async fn binding_required_routes_refuse_unbound_tokens() {
    let e = env("").await;
    let unbound = format!("Bearer {}", e.token(Some("laptop-1"), None));
    let mut c = e.conn("localhost", None).await;
    let (status, h, body) = c.get("/strict/x", &[("authorization", &unbound)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_required");
    let www = challenges(&h);
    assert!(www[0].contains("error=\"invalid_token\""), "{www:?}");
    assert_eq!(www[1], format!("DPoP algs=\"{DEFAULT_ALGS}\""));
    assert_eq!(e.upstream.count(), 0);

    let key = SigningKey::eddsa("client").unwrap();
    let token = e.dpop_token(&key);
    let proof = key
        .dpop_proof("GET", &e.url("localhost", "/strict/x"), Some(&token), None)
        .unwrap();
    let (status, _, _) = c
        .get(
            "/strict/x",
            &[("authorization", &dpop_auth(&token)), ("dpop", &proof)],
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let cert = e.device("laptop-1");
    let bound = format!("Bearer {}", e.mtls_token(&cert, Some("laptop-1")));
    let mut m = e.conn(MTLS, Some(&cert)).await;
    let (status, _, _) = m.get("/strict/x", &[("authorization", &bound)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e.upstream.count(), 2);
}

#[tokio::test]
async fn mtls_routes_accept_workloads_by_spiffe_id() {
    let e = env("").await;
    for id in [
        "spiffe://prod.test/billing",
        "spiffe://prod.test/jobs/nightly",
    ] {
        let svid = e.svid(&e.spiffe_ca, id);
        let mut c = e.conn(MTLS, Some(&svid)).await;
        let (status, _, body) = c.get("/internal/ledger", &[]).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body:?}");
        let seen = e.upstream.last();
        assert_eq!(seen.headers["x-portcullis-workload"], id);
        assert_eq!(seen.headers["x-portcullis-binding"], "mtls");
    }
    let before = e.upstream.count();

    // A workload of a trusted domain whose id is not listed.
    let unknown = e.svid(&e.spiffe_ca, "spiffe://prod.test/unknown");
    let mut c = e.conn(MTLS, Some(&unknown)).await;
    let (status, _, body) = c.get("/internal/ledger", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "workload_not_allowed");

    // A device certificate is not a workload; no certificate is refused too.
    let mut d = e.conn(MTLS, Some(&e.device("laptop-1"))).await;
    let (status, _, body) = d.get("/internal/ledger", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "workload_not_allowed");
    let mut n = e.conn(MTLS, None).await;
    let (status, _, body) = n.get("/internal/ledger", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "client_certificate_required");
    assert_eq!(e.upstream.count(), before);

    // Untrusted trust domain, and authorities minting outside their lane.
    let other_domain = e.svid(&e.spiffe_ca, "spiffe://other.test/billing");
    assert!(e.handshake_refused(&other_domain).await);
    let by_device_ca = e.svid(&e.device_ca, "spiffe://prod.test/billing");
    assert!(e.handshake_refused(&by_device_ca).await);
    let device_by_spiffe_ca = e.spiffe_ca.client_cert("x", &["device://x"]).unwrap();
    assert!(e.handshake_refused(&device_by_spiffe_ca).await);
    let two_uris = e
        .spiffe_ca
        .client_cert("", &["spiffe://prod.test/billing", "device://x"])
        .unwrap();
    assert!(e.handshake_refused(&two_uris).await);
    assert_eq!(e.upstream.count(), before);
}

#[tokio::test]
async fn untrusted_and_expired_client_certificates_fail_the_handshake() {
    let e = env("").await;
    let stranger = DevCa::new("someone else's CA").unwrap();
    assert!(
        e.handshake_refused(&stranger.client_cert("x", &["device://x"]).unwrap())
            .await
    );
    let expired = e
        .device_ca
        .client_cert_with(&ClientCertSpec {
            common_name: "old",
            uris: &["device://old"],
            expired: true,
            ..ClientCertSpec::default()
        })
        .unwrap();
    assert!(e.handshake_refused(&expired).await);
    assert_eq!(e.upstream.count(), 0);
    // The trusted, valid one goes through (to the public route it probes).
    assert!(!e.handshake_refused(&e.device("laptop-1")).await);
    assert_eq!(e.upstream.count(), 1);
}

#[tokio::test]
async fn public_names_never_ask_for_a_client_certificate() {
    let e = env("").await;
    for sni in ["localhost", "app.test", "127.0.0.1"] {
        let mut c = e.conn(sni, None).await;
        assert!(!c.asked_for_cert, "{sni} asked for a certificate");
        let (status, _, _) = c.get("/public/info", &[]).await;
        assert_eq!(status, StatusCode::OK, "{sni}");
    }
    // A browser-style client with no client-certificate support at all.
    let browser = client(&e.pki.ca_pem, false);
    let (status, _, _) = get(&browser, &e.url("localhost", "/public/info"), None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Only the client-certificate name asks.
    assert!(e.conn(MTLS, None).await.asked_for_cert);
}

#[tokio::test]
async fn a_client_certificate_host_over_a_connection_for_another_name_gets_421() {
    let e = env("").await;
    let mut c = e.conn("localhost", None).await;
    let host = format!("{MTLS}:{}", e.addr().port());
    let (status, _, body) = c.get("/internal/ledger", &[("host", &host)]).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(error_code(&body), "misdirected_request");
    let cert = e.device("laptop-1");
    let bound = format!("Bearer {}", e.mtls_token(&cert, None));
    let mut c = e.conn("localhost", None).await;
    let (status, _, _) = c
        .get("/hello", &[("host", &host), ("authorization", &bound)])
        .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(e.upstream.count(), 0);
}

#[tokio::test]
async fn device_ca_bundles_reload_without_a_restart() {
    let e = env("").await;
    let new_ca = DevCa::new("next device CA").unwrap();
    let newcomer = new_ca
        .client_cert("laptop-new", &["device://laptop-new"])
        .unwrap();
    assert!(e.handshake_refused(&newcomer).await);

    std::fs::write(
        e.pki.path().join("device-ca.pem"),
        format!("{}{}", e.device_ca.cert_pem(), new_ca.cert_pem()),
    )
    .unwrap();
    e.server.shared.reload().await.unwrap();

    let token = format!("Bearer {}", e.token(Some("laptop-new"), None));
    let mut c = e.conn(MTLS, Some(&newcomer)).await;
    let (status, _, body) = c.get("/hello", &[("authorization", &token)]).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(
        e.upstream.last().headers["x-portcullis-verified-device"],
        "laptop-new"
    );
    // The old CA still works; a CA removed from the bundle stops working.
    assert!(!e.handshake_refused(&e.device("laptop-1")).await);
    std::fs::write(e.pki.path().join("device-ca.pem"), new_ca.cert_pem()).unwrap();
    e.server.shared.reload().await.unwrap();
    assert!(e.handshake_refused(&e.device("laptop-1")).await);
}

#[test]
fn binding_config_mistakes_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let good = config("http://127.0.0.1:9", "");
    portcullis::config::Config::from_toml(&good, &path).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("client_auth_hosts = [\"mtls.test\"]\n", ""),
            "tls.client_auth_hosts",
        ),
        (
            good.replace("[\"mtls.test\"]", "[\"mtls.test:443\"]"),
            "tls.client_auth_hosts[0]",
        ),
        (
            good.replace("san-uri:device://{id}", "serial"),
            "binding.device_id_rule",
        ),
        (
            good.replace("[binding]\n", "[binding]\ndpop_algorithms = [\"HS256\"]\n"),
            "binding.dpop_algorithms[0]",
        ),
        (
            good.replace("[binding]\n", "[binding]\ndpop_max_age_s = 3600\n"),
            "binding.dpop_max_age_s",
        ),
        (
            good.replace(
                "[binding]\n",
                "[binding]\ndevice_thumbprints = { abc = \"x\" }\n",
            ),
            "binding.device_thumbprints.abc",
        ),
        (
            good.replace(
                "trust_domain = \"prod.test\"",
                "trust_domain = \"Prod.Test\"",
            ),
            "tls.spiffe[0].trust_domain",
        ),
        (
            good.replace(
                "spiffe://prod.test/billing\"",
                "spiffe://other.test/billing\"",
            ),
            "routes[2].spiffe_ids[0]",
        ),
        (
            good.replace("auth = \"mtls\"", "auth = \"mtls\"\nhost = \"app.test\""),
            "routes[2].host",
        ),
        (
            good.replace(
                "auth = \"public\"",
                "auth = \"public\"\nbinding = \"required\"",
            ),
            "routes[3].binding",
        ),
        (
            good.replace(
                "auth = \"public\"",
                "auth = \"public\"\nspiffe_ids = [\"spiffe://prod.test/x\"]",
            ),
            "routes[3].spiffe_ids",
        ),
        (
            good.replace("[binding]\n", "[binding]\ndpop_nonces = true\n"),
            "dpop_nonces",
        ),
    ];
    for (text, key) in cases {
        let err = portcullis::config::Config::from_toml(&text, &path)
            .expect_err(key)
            .to_string();
        assert!(err.contains("p.toml"), "{err}");
        assert!(err.contains(key), "expected `{key}` in: {err}");
    }
}

#[tokio::test]
async fn thumbprint_rule_maps_registered_certificates_to_devices() {
    let e = env("").await;
    // Certificates that name no device at all: only their thumbprint counts.
    let enrolled = e.device_ca.client_cert("anything", &[]).unwrap();
    let stranger = e.device_ca.client_cert("anything", &[]).unwrap();
    let x5t = encode_x5t(&portcullis::util::sha256(&enrolled.cert_der));
    let cfg = config(
        &e.upstream.url(),
        &format!("device_thumbprints = {{ \"{x5t}\" = \"enrolled-7\" }}"),
    )
    .replace("san-uri:device://{id}", "thumbprint");
    std::fs::write(e.pki.path().join("p.toml"), cfg).unwrap();
    e.server.shared.reload().await.unwrap();

    let for_7 = format!("Bearer {}", e.token(Some("enrolled-7"), None));
    let mut c = e.conn(MTLS, Some(&enrolled)).await;
    let (status, _, body) = c.get("/hello", &[("authorization", &for_7)]).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(
        e.upstream.last().headers["x-portcullis-verified-device"],
        "enrolled-7"
    );
    let for_8 = format!("Bearer {}", e.token(Some("enrolled-8"), None));
    let (status, _, body) = c.get("/hello", &[("authorization", &for_8)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "binding_mismatch");

    // An unregistered certificate proves no device: the claim stays a claim.
    let mut s = e.conn(MTLS, Some(&stranger)).await;
    let (status, _, _) = s.get("/hello", &[("authorization", &for_8)]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = e.upstream.last();
    assert!(seen.headers.get("x-portcullis-verified-device").is_none());
    assert_eq!(seen.headers["x-portcullis-device"], "enrolled-8");
}
