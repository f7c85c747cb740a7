//! The demo's minimal OpenID provider, so `portcullis demo` logs a browser
//! in offline: `/authorize` (a one-click login page listing the seeded
//! people, with and without multi-factor), `/token` (POST: the code
//! exchange, `client_secret_basic`, PKCE S256 checked; GET: the
//! walkthrough's ready-made access tokens), `/end_session`.
//!
//! Nothing here is for production use: codes live in memory, every seeded
//! person logs in with one click.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::pki::SigningKey;

/// The demo's browser client id.
pub const DEMO_CLIENT_ID: &str = "portcullis-demo-browser";
/// The `acr` of a password login.
pub const ACR_PWD: &str = "urn:portcullis:acr:pwd";
/// The `acr` of a multi-factor login (what the default policies step up to).
pub const ACR_MFA: &str = "urn:portcullis:acr:mfa";
/// People offered on the login page (seeded by the demo), with the device
/// their ID token names (the demo's `device_id` claim; unverified).
pub const PEOPLE: &[(&str, Option<&str>)] = &[
    ("alice@example.com", Some("laptop-001")),
    ("bob@example.com", Some("phone-002")),
    ("carol@partner.example", None),
];
const CODE_TTL_S: u64 = 120;
const MAX_PENDING: usize = 10_000;

struct Pending {
    redirect_uri: String,
    state: String,
    nonce: Option<String>,
    code_challenge: String,
    created_s: u64,
}

struct Issued {
    sub: String,
    mfa: bool,
    auth_time: u64,
    request: Pending,
}

/// The provider's state: requests waiting on the login page, codes issued.
pub struct DemoProvider {
    issuer: String,
    key: Arc<SigningKey>,
    client_secret: String,
    pending: Mutex<HashMap<String, Pending>>,
    codes: Mutex<HashMap<String, Issued>>,
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn oauth_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    text(
        status,
        "application/json",
        serde_json::json!({ "error": error }).to_string(),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn random() -> String {
    crate::session::cookie::random_token(16).unwrap_or_default()
}

fn params(q: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(q).into_owned().collect()
}

impl DemoProvider {
    /// A provider for `issuer`, signing with `key`, with one client.
    pub fn new(issuer: String, key: Arc<SigningKey>, client_secret: String) -> Self {
        Self {
            issuer,
            key,
            client_secret,
            pending: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
        }
    }

    /// Discovery document members for the browser flow.
    pub fn discovery(&self) -> serde_json::Value {
        let i = &self.issuer;
        serde_json::json!({
            "issuer": i,
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": format!("{i}/token"),
            "end_session_endpoint": format!("{i}/end_session"),
            "jwks_uri": format!("{i}/jwks.json"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.key.alg],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "acr_values_supported": [ACR_PWD, ACR_MFA],
        })
    }

    /// `GET /authorize`: checks the request, shows the login page.
    pub fn authorize(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let p = params(req.uri().query().unwrap_or("").as_bytes());
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
        let redirect_uri = get("redirect_uri");
        let ok_redirect = redirect_uri.starts_with("https://")
            && redirect_uri.ends_with(crate::session::paths::CALLBACK);
        if get("client_id") != DEMO_CLIENT_ID || !ok_redirect {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                "unknown client or redirect_uri\n".into(),
            );
        }
        if get("response_type") != "code"
            || get("code_challenge_method") != "S256"
            || get("code_challenge").is_empty()
            || get("state").is_empty()
        {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                "code flow with PKCE S256 and state required\n".into(),
            );
        }
        let now = crate::util::now_unix();
        let rid = random();
        {
            let Ok(mut pending) = self.pending.lock() else {
                return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error");
            };
            pending.retain(|_, v| v.created_s + CODE_TTL_S * 5 > now);
            if pending.len() >= MAX_PENDING {
                return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
            }
            pending.insert(
                rid.clone(),
                Pending {
                    redirect_uri: redirect_uri.to_owned(),
                    state: get("state").to_owned(),
                    nonce: p.get("nonce").cloned(),
                    code_challenge: get("code_challenge").to_owned(),
                    created_s: now,
                },
            );
        }
        let wants_mfa = get("acr_values").split(' ').any(|a| a == ACR_MFA);
        let mut rows = String::new();
        for (person, device) in PEOPLE {
            let link = |mfa: bool| {
                format!(
                    "/login?{}",
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair("rid", &rid)
                        .append_pair("sub", person)
                        .append_pair("mfa", if mfa { "1" } else { "0" })
                        .finish()
                )
            };
            let pwd = if wants_mfa {
                String::new()
            } else {
                format!(" <a href=\"{}\">password</a> ·", escape(&link(false)))
            };
            let on =
                device.map_or_else(|| " (no managed device)".to_owned(), |d| format!(" on {d}"));
            rows.push_str(&format!(
                "<li>{}{}:{pwd} <a href=\"{}\">password + security key (MFA)</a></li>",
                escape(person),
                escape(&on),
                escape(&link(true)),
            ));
        }
        let note = if wants_mfa {
            "<p role=\"status\">This app asks for multi-factor authentication.</p>"
        } else {
            ""
        };
        text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>Demo sign-in</title></head><body><main><h1>portcullis demo sign-in</h1>{note}\
<p>Sign in as one of the seeded people:</p><ul>{rows}</ul></main></body></html>\n"
            ),
        )
    }

    /// `GET /login?rid=…&sub=…&mfa=0|1`: the one click; back to the client
    /// with a code.
    pub fn login(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let p = params(req.uri().query().unwrap_or("").as_bytes());
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
        let sub = get("sub");
        if !PEOPLE.iter().any(|(p, _)| *p == sub) {
            return oauth_error(StatusCode::BAD_REQUEST, "unknown_person");
        }
        let Some(request) = self
            .pending
            .lock()
            .ok()
            .and_then(|mut m| m.remove(get("rid")))
        else {
            return oauth_error(StatusCode::BAD_REQUEST, "unknown_request");
        };
        let code = random();
        let location = format!(
            "{}?{}",
            request.redirect_uri,
            form_urlencoded::Serializer::new(String::new())
                .append_pair("code", &code)
                .append_pair("state", &request.state)
                .append_pair("iss", &self.issuer)
                .finish()
        );
        if let Ok(mut codes) = self.codes.lock() {
            let now = crate::util::now_unix();
            codes.retain(|_, v| v.request.created_s + CODE_TTL_S * 5 > now);
            codes.insert(
                code,
                Issued {
                    sub: sub.to_owned(),
                    mfa: get("mfa") == "1",
                    auth_time: now,
                    request,
                },
            );
        }
        let mut r = text(StatusCode::SEE_OTHER, "text/plain", String::new());
        if let Ok(v) = header::HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    /// `POST /token`: the authorization-code grant.
    pub async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let basic_ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|s| s == format!("{DEMO_CLIENT_ID}:{}", self.client_secret));
        if !basic_ok {
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
        }
        let Ok(body) = Limited::new(req.into_body(), 64 * 1024).collect().await else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
        };
        let p = params(&body.to_bytes());
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or("");
        if get("grant_type") != "authorization_code" {
            return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
        }
        // A code works once: it is gone from the map whatever happens next.
        let Some(issued) = self
            .codes
            .lock()
            .ok()
            .and_then(|mut c| c.remove(get("code")))
        else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        };
        let now = crate::util::now_unix();
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(crate::util::sha256(get("code_verifier").as_bytes()));
        if issued.request.created_s + CODE_TTL_S < now
            || issued.request.redirect_uri != get("redirect_uri")
            || issued.request.code_challenge != challenge
        {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        }
        let mut claims = serde_json::json!({
            "iss": self.issuer, "sub": issued.sub, "aud": DEMO_CLIENT_ID,
            "iat": now, "exp": now + 300, "auth_time": issued.auth_time,
            "acr": if issued.mfa { ACR_MFA } else { ACR_PWD },
            "amr": if issued.mfa { vec!["pwd", "hwk", "mfa"] } else { vec!["pwd"] },
            "sid": format!("demo-sid-{}", &random()[..12]),
        });
        if let (Some(n), Some(o)) = (&issued.request.nonce, claims.as_object_mut()) {
            o.insert("nonce".into(), n.clone().into());
        }
        let device = PEOPLE
            .iter()
            .find(|(p, _)| *p == issued.sub)
            .and_then(|(_, d)| *d);
        if let (Some(d), Some(o)) = (device, claims.as_object_mut()) {
            o.insert(super::DEMO_DEVICE_CLAIM.into(), d.into());
        }
        let header = serde_json::json!({ "alg": self.key.alg, "kid": self.key.kid, "typ": "JWT" });
        match self.key.sign_jws(&header, &claims) {
            Ok(t) => text(
                StatusCode::OK,
                "application/json",
                serde_json::json!({"id_token": t, "token_type": "Bearer", "expires_in": 300})
                    .to_string(),
            ),
            Err(_) => oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        }
    }

    /// `GET /end_session`: the RP-initiated logout landing page.
    pub fn end_session(&self) -> Response<Full<Bytes>> {
        text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Signed out</title></head>\
<body><main><h1>Signed out</h1><p>You are signed out of the portcullis demo.</p></main></body></html>\n"
                .into(),
        )
    }
}
