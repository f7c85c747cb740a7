//! SCIM 2.0 end to end: requests shaped like Okta's and Microsoft Entra's,
//! sent to the real admin listener, and the very next proxied request
//! decided on the new state (real TLS, real tokens, a real upstream).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISS: &str = "https://idp.test";
const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const GROUP: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const ERROR: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
/// Small, so a 10 MB body is far over it.
const MAX_BODY: usize = 64 * 1024;

struct Env {
    pki: TestPki,
    upstream: Upstream,
    ec: portcullis::demo::pki::SigningKey,
    cfg: std::path::PathBuf,
    server: Option<portcullis::server::RunningServer>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Env {
    async fn start() -> Self {
        Self::start_with("userName").await
    }

    async fn start_with(subject_attribute: &str) -> Self {
        let pki = TestPki::new();
        let upstream = Upstream::start().await;
        let (_, ec, _) = keys();
        std::fs::write(
            pki.path().join("jwks.json"),
            json!({ "keys": [ec.jwk] }).to_string(),
        )
        .unwrap();
        let routes = format!(
            "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"{}\"\nauth = \"bearer\"\n",
            upstream.url()
        );
        let body = base_config(ISS, r#"jwks_file = "jwks.json""#, &routes).replace(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{ADMIN_TOKEN}\"\n"),
        ) + &format!(
            r#"
[feeds]
max_body_bytes = {MAX_BODY}

[feeds.scim]
token = "{SCIM_TOKEN}"
subject_attribute = "{subject_attribute}"

[feeds.scim.group_entitlements]
"Sales" = ["crm:read", "crm:write"]
"Engineering" = ["git:push"]
"All Staff" = ["intranet"]
"#
        );
        let cfg = pki.write_config("scim.toml", &body);
        let server = portcullis::server::start(cfg.clone()).await.unwrap();
        Self {
            pki,
            upstream,
            ec,
            cfg,
            server: Some(server),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn server(&self) -> &portcullis::server::RunningServer {
        self.server.as_ref().unwrap()
    }

    /// Shuts the server down and starts a new one on the same config and database.
    async fn restart(&mut self) {
        self.http = Client::builder(TokioExecutor::new()).build_http();
        self.server.take().unwrap().shutdown().await;
        self.server = Some(portcullis::server::start(self.cfg.clone()).await.unwrap());
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        token: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server().admin_addr))
            .header("content-type", "application/scim+json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let resp = tokio::time::timeout(
            DEADLINE,
            self.http.request(b.body(Full::new(body)).unwrap()),
        )
        .await
        .expect("admin request timed out")
        .expect("admin request failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
        };
        (parts.status, parts.headers, v)
    }

    /// A SCIM request with the right token; checks the media type.
    async fn scim(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let (st, h, v) = self
            .send(method, &format!("/scim/v2{path}"), bytes, Some(SCIM_TOKEN))
            .await;
        assert_eq!(
            h.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/scim+json"),
            "{path}: {st}"
        );
        (st, v)
    }

    /// The admin API's view of a subject: record, revocation, history.
    async fn subject(&self, sub: &str) -> Value {
        let (st, _, v) = self
            .send(
                Method::GET,
                &format!("/admin/v1/subjects/{sub}"),
                Bytes::new(),
                Some(ADMIN_TOKEN),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        v
    }

    /// A token for `sub` issued at `iat`.
    fn token_at(&self, sub: &str, iat: u64) -> String {
        let mut c = claims(ISS, sub);
        c["iat"] = iat.into();
        c["nbf"] = iat.into();
        self.ec.sign(&c).unwrap()
    }

    /// One proxied request; returns the status and whether the upstream saw it.
    async fn proxy(&self, token: &str) -> (StatusCode, bool) {
        let before = self.upstream.count();
        let c = client(&self.pki.ca_pem, false);
        let url = format!("https://localhost:{}/app", self.server().proxy_addr.port());
        let (st, _, _) = get(&c, &url, Some(token), &[]).await;
        (st, self.upstream.count() > before)
    }

    /// Asserts the token is refused (terminated or revoked) and never forwarded.
    async fn refused(&self, token: &str, why: &str) {
        let (st, forwarded) = self.proxy(token).await;
        assert!(
            st == StatusCode::FORBIDDEN || st == StatusCode::UNAUTHORIZED,
            "{why}: got {st}"
        );
        assert!(!forwarded, "{why}: the upstream saw the request");
    }

    async fn allowed(&self, token: &str, why: &str) {
        let (st, forwarded) = self.proxy(token).await;
        assert_eq!(st, StatusCode::OK, "{why}");
        assert!(forwarded, "{why}: the upstream did not see the request");
    }
}

/// Okta's joiner POST (standards §5.7).
fn okta_user(user_name: &str, external_id: &str) -> Value {
    json!({ "schemas": [USER],
        "userName": user_name,
        "name": { "givenName": "Mei", "familyName": "Ito" },
        "emails": [{ "primary": true, "value": user_name, "type": "work" }],
        "displayName": "Mei Ito", "externalId": external_id,
        "password": "never-stored-1!",
        "groups": [], "active": true })
}

/// Entra's joiner POST: core + enterprise schemas, `roles: []`.
fn entra_user(user_name: &str, nickname: &str) -> Value {
    json!({ "schemas": [USER, ENTERPRISE],
        "externalId": nickname,
        "userName": user_name,
        "active": true,
        "displayName": "Ana Silva",
        "emails": [{ "primary": true, "type": "work", "value": user_name }],
        "name": { "formatted": "Ana Silva", "familyName": "Silva", "givenName": "Ana" },
        ENTERPRISE: { "department": "Sales", "employeeNumber": "1001" },
        "roles": [] })
}

fn patch_op(ops: Value) -> Value {
    json!({ "schemas": [PATCH_OP], "Operations": ops })
}

async fn create_user(env: &Env, body: Value) -> String {
    let (st, v) = env.scim(Method::POST, "/Users", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

async fn create_group(env: &Env, name: &str, members: &[&str]) -> String {
    let members: Vec<Value> = members.iter().map(|m| json!({ "value": m })).collect();
    let (st, v) = env
        .scim(
            Method::POST,
            "/Groups",
            Some(json!({ "schemas": [GROUP], "displayName": name, "members": members })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

/// The revocation's `not_before_s` for a subject (0 if none).
async fn not_before(env: &Env, sub: &str) -> u64 {
    env.subject(sub).await["revocation"]["not_before_s"]
        .as_u64()
        .unwrap_or(0)
}

fn assert_scim_error(v: &Value, status: &str, scim_type: Option<&str>) {
    assert_eq!(v["schemas"], json!([ERROR]), "{v}");
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["scimType"].as_str(), scim_type, "{v}");
    assert!(v["detail"].is_string(), "{v}");
}

#[tokio::test]
async fn discovery_endpoints_and_bearer_auth() {
    let env = Env::start().await;
    let (st, v) = env.scim(Method::GET, "/ServiceProviderConfig", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["patch"]["supported"], true);
    assert_eq!(v["filter"]["supported"], true);
    assert_eq!(v["authenticationSchemes"][0]["type"], "oauthbearertoken");
    let (st, v) = env.scim(Method::GET, "/ResourceTypes", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["totalResults"], 2);
    let (st, v) = env.scim(Method::GET, "/Schemas", None).await;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<&str> = v["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [USER, ENTERPRISE, GROUP]);
    let (st, v) = env
        .scim(Method::GET, &format!("/Schemas/{USER}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["attributes"][0]["name"], "userName");

    // No token, a wrong token, another scheme: 401 with the SCIM error.
    for auth in [
        None,
        Some("wrong-token-0123456789abcdef"),
        Some(ADMIN_TOKEN),
    ] {
        let (st, h, v) = env
            .send(Method::GET, "/scim/v2/Users", Bytes::new(), auth)
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(h["content-type"], "application/scim+json");
        assert!(h.contains_key("www-authenticate"));
        assert_scim_error(&v, "401", None);
    }
    let (st, v) = env.scim(Method::GET, "/Nope", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_scim_error(&v, "404", None);
    let (st, v) = env.scim(Method::POST, "/Bulk", Some(json!({}))).await;
    assert_eq!(st, StatusCode::NOT_IMPLEMENTED);
    assert_scim_error(&v, "501", None);
}

#[tokio::test]
async fn okta_joiner_then_patch_deactivate_blocks_the_next_request_and_reactivation_allows_only_new_tokens()
 {
    let env = Env::start().await;
    let sub = "m.ito@acme.example";
    // Okta looks the user up first; an empty result is a ListResponse.
    let (st, v) = env
        .scim(
            Method::GET,
            "/Users?filter=userName%20eq%20%22m.ito%40acme.example%22&startIndex=1&count=100",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["totalResults"], 0);
    let (st, v) = env
        .scim(
            Method::POST,
            "/Users",
            Some(okta_user(sub, "00uab12cd34EF56gh7i8")),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["userName"], sub);
    assert_eq!(v["active"], true);
    assert!(v.get("password").is_none(), "password is never returned");
    assert_eq!(v["meta"]["resourceType"], "User");

    // The identity resolves by subject and every alias.
    let rec = env.subject(sub).await;
    assert_eq!(rec["subject"]["status"], "active");
    for alias in [format!("scim:{id}"), "00uab12cd34EF56gh7i8".to_owned()] {
        assert_eq!(env.subject(&alias).await["subject"]["subject"], sub);
    }
    assert!(!rec["subject"]["scim"].to_string().contains("never-stored"));

    let old = env.token_at(sub, portcullis::util::now_unix());
    env.allowed(&old, "joiner").await;

    // Leaver, Okta shape: path-less replace with an object value.
    let (st, v) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "replace", "value": { "active": false } }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["active"], false);
    env.refused(&old, "after Okta deactivate").await;
    let rec = env.subject(sub).await;
    assert_eq!(rec["subject"]["status"], "terminated");
    let kinds: Vec<&str> = rec["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["scim.joiner", "scim.leaver"]);

    // Re-enable: the old token stays revoked, a token issued after works.
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "replace", "value": { "active": true } }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(env.subject(sub).await["subject"]["status"], "active");
    env.refused(&old, "old token after re-enable").await;
    let nb = not_before(&env, sub).await;
    assert!(nb > 0);
    let fresh = env.token_at(sub, nb + 1);
    env.allowed(&fresh, "new token after re-enable").await;
}

#[tokio::test]
async fn entra_patch_with_string_false_is_a_leaver() {
    let env = Env::start().await;
    let sub = "ana.silva@acme.example";
    // Entra matches on userName first.
    let (st, v) = env
        .scim(
            Method::GET,
            "/Users?filter=userName+eq+%22Ana.Silva%40ACME.example%22",
            None,
        )
        .await;
    assert_eq!((st, v["totalResults"].as_u64()), (StatusCode::OK, Some(0)));
    let id = create_user(&env, entra_user(sub, "anasilva")).await;
    let rec = env.subject(sub).await;
    assert_eq!(rec["subject"]["department"], "Sales");
    let token = env.token_at(sub, portcullis::util::now_unix());
    env.allowed(&token, "joiner").await;

    // Mover: Entra's attribute PATCH (Replace, emails filter, dotted name).
    let (st, v) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(json!([
                { "op": "Replace", "path": "emails[type eq \"work\"].value", "value": "ana@acme.example" },
                { "op": "Replace", "path": "name.familyName", "value": "Silva-Costa" },
                { "op": "Replace", "path": format!("{ENTERPRISE}:department"), "value": "Engineering" },
            ]))),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["emails"][0]["value"], "ana@acme.example");
    assert_eq!(v["name"]["familyName"], "Silva-Costa");
    let rec = env.subject("ana@acme.example").await;
    assert_eq!(rec["subject"]["subject"], sub);
    assert_eq!(rec["subject"]["department"], "Engineering");
    env.allowed(&token, "mover").await;

    // Leaver, Entra legacy shape: the string "False".
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "Replace", "path": "active", "value": "False" }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    env.refused(&token, "after Entra deactivate").await;
    // Entra: a disabled user is still returned.
    let (st, v) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["active"], false);

    // Entra's current shape re-enables with a boolean.
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "Replace", "path": "active", "value": true }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    env.refused(&token, "old token after Entra re-enable").await;
    let nb = not_before(&env, sub).await;
    env.allowed(&env.token_at(sub, nb + 1), "new token").await;

    // And the current documented leaver shape (boolean false).
    let fresh = env.token_at(sub, nb + 1);
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "Replace", "path": "active", "value": false }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    env.refused(&fresh, "after Entra boolean deactivate").await;
}

#[tokio::test]
async fn put_without_active_true_is_a_leaver() {
    let env = Env::start().await;
    let sub = "k.tanaka@acme.example";
    let id = create_user(&env, okta_user(sub, "00uktanaka")).await;
    let token = env.token_at(sub, portcullis::util::now_unix());
    env.allowed(&token, "joiner").await;

    // Okta OIN mover: GET, then PUT the whole object (active kept).
    let (_, mut full) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    full["displayName"] = "Kenji Tanaka".into();
    let (st, v) = env
        .scim(Method::PUT, &format!("/Users/{id}"), Some(full.clone()))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["displayName"], "Kenji Tanaka");
    env.allowed(&token, "PUT mover").await;

    // A PUT that lost `active` deactivates.
    let mut lost = full.clone();
    lost.as_object_mut().unwrap().remove("active");
    let (st, v) = env
        .scim(Method::PUT, &format!("/Users/{id}"), Some(lost))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["active"], false);
    env.refused(&token, "PUT without active").await;

    // Re-enable with PUT active:true, then an AIW-style PUT with active:false.
    full["active"] = true.into();
    let (st, _) = env
        .scim(Method::PUT, &format!("/Users/{id}"), Some(full.clone()))
        .await;
    assert_eq!(st, StatusCode::OK);
    let nb = not_before(&env, sub).await;
    let fresh = env.token_at(sub, nb + 1);
    env.allowed(&fresh, "after PUT re-enable").await;
    full["active"] = false.into();
    let (st, _) = env
        .scim(Method::PUT, &format!("/Users/{id}"), Some(full))
        .await;
    assert_eq!(st, StatusCode::OK);
    env.refused(&fresh, "PUT active false").await;
}

#[tokio::test]
async fn delete_keeps_a_terminated_tombstone_and_leaves_groups() {
    let env = Env::start().await;
    let sub = "leaver@acme.example";
    let id = create_user(&env, entra_user(sub, "leaver")).await;
    let gid = create_group(&env, "Sales", &[&id]).await;
    let token = env.token_at(sub, portcullis::util::now_unix());
    env.allowed(&token, "joiner").await;

    let (st, v) = env
        .scim(Method::DELETE, &format!("/Users/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(v, Value::Null);
    env.refused(&token, "after DELETE").await;
    let (st, v) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_scim_error(&v, "404", None);
    let (_, v) = env
        .scim(
            Method::GET,
            "/Users?filter=userName%20eq%20%22leaver@acme.example%22",
            None,
        )
        .await;
    assert_eq!(v["totalResults"], 0);
    let (st, _) = env
        .scim(Method::DELETE, &format!("/Users/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // The tombstone: terminated, no entitlements, still found by alias.
    let rec = env.subject("leaver").await;
    assert_eq!(rec["subject"]["subject"], sub);
    assert_eq!(rec["subject"]["status"], "terminated");
    assert_eq!(rec["subject"]["entitlements"], json!([]));
    assert!(rec["subject"].get("scim").is_none());
    assert!(rec["revocation"]["not_before_s"].as_u64().unwrap() > 0);
    // And the group no longer lists the user.
    let (_, g) = env.scim(Method::GET, &format!("/Groups/{gid}"), None).await;
    assert_eq!(g["members"], json!([]));
}

#[tokio::test]
async fn group_membership_changes_move_entitlements() {
    let env = Env::start().await;
    let (a_sub, b_sub) = ("a@acme.example", "b@acme.example");
    let a = create_user(&env, okta_user(a_sub, "00ua")).await;
    let b = create_user(&env, entra_user(b_sub, "bee")).await;
    let ents = |v: &Value| v["subject"]["entitlements"].clone();
    let groups = |v: &Value| v["subject"]["groups"].clone();

    // Okta Group Push creates the group with A.
    let sales = create_group(&env, "Sales", &[&a]).await;
    let ra = env.subject(a_sub).await;
    assert_eq!(ents(&ra), json!(["crm:read", "crm:write"]));
    assert_eq!(groups(&ra), json!(["Sales"]));
    assert_eq!(ents(&env.subject(b_sub).await), json!([]));
    // The group event itself names the member's identity change.
    let last = ra["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"]["kind"], "scim.group");
    // User reads show the (read-only) groups.
    let (_, u) = env.scim(Method::GET, &format!("/Users/{a}"), None).await;
    assert_eq!(u["groups"][0]["value"], sales.as_str());
    assert_eq!(u["groups"][0]["display"], "Sales");

    // Okta mover: remove A, add B, in one PATCH (standards §5.7). 204.
    let (st, v) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{sales}"),
            Some(patch_op(json!([
                { "op": "remove", "path": format!("members[value eq \"{a}\"]") },
                { "op": "add", "path": "members", "value": [{ "value": b, "display": b_sub }] },
            ]))),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(ents(&env.subject(a_sub).await), json!([]));
    assert_eq!(
        ents(&env.subject(b_sub).await),
        json!(["crm:read", "crm:write"])
    );

    // Entra adds A (with `$ref: null`), then removes B with a value array (legacy).
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{sales}"),
            Some(patch_op(json!([{ "op": "Add", "path": "members",
                "value": [{ "$ref": null, "value": a }] }]))),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{sales}"),
            Some(patch_op(
                json!([{ "op": "Remove", "path": "members", "value": [{ "value": b }] }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        ents(&env.subject(a_sub).await),
        json!(["crm:read", "crm:write"])
    );
    assert_eq!(ents(&env.subject(b_sub).await), json!([]));

    // A second group; Okta replaces all its members.
    let staff = create_group(&env, "All Staff", &[]).await;
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{staff}"),
            Some(patch_op(json!([{ "op": "replace", "path": "members",
                "value": [{ "value": a }, { "value": b }] }]))),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        ents(&env.subject(a_sub).await),
        json!(["crm:read", "crm:write", "intranet"])
    );
    assert_eq!(
        groups(&env.subject(a_sub).await),
        json!(["All Staff", "Sales"])
    );
    assert_eq!(ents(&env.subject(b_sub).await), json!(["intranet"]));

    // Okta's rename rides with a path-less replace: members' entitlements follow.
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{sales}"),
            Some(patch_op(json!([{ "op": "replace",
                "value": { "id": sales, "displayName": "Engineering" } }]))),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(
        ents(&env.subject(a_sub).await),
        json!(["git:push", "intranet"])
    );

    // PUT replaces the group (AIW); Entra's `excludedAttributes=members` lookup.
    let (st, v) = env
        .scim(
            Method::PUT,
            &format!("/Groups/{sales}"),
            Some(json!({ "schemas": [GROUP], "displayName": "Engineering", "members": [{ "value": b }] })),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(ents(&env.subject(a_sub).await), json!(["intranet"]));
    assert_eq!(
        ents(&env.subject(b_sub).await),
        json!(["git:push", "intranet"])
    );
    let (_, v) = env
        .scim(
            Method::GET,
            "/Groups?excludedAttributes=members&filter=displayName%20eq%20%22engineering%22",
            None,
        )
        .await;
    assert_eq!(v["totalResults"], 1);
    assert_eq!(v["Resources"][0]["id"], sales.as_str());
    assert!(v["Resources"][0].get("members").is_none());

    // Group delete drops what it granted.
    let (st, _) = env
        .scim(Method::DELETE, &format!("/Groups/{sales}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(ents(&env.subject(b_sub).await), json!(["intranet"]));
    let (st, _) = env
        .scim(Method::GET, &format!("/Groups/{sales}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // A member that is not a provisioned user is refused; nothing changes.
    let (st, v) = env
        .scim(
            Method::PATCH,
            &format!("/Groups/{staff}"),
            Some(patch_op(
                json!([{ "op": "add", "path": "members", "value": [{ "value": "nobody" }] }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_scim_error(&v, "400", Some("invalidValue"));
}

#[tokio::test]
async fn filters_paging_uniqueness_and_unknown_ids() {
    let env = Env::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create_user(
                &env,
                okta_user(&format!("user{i}@acme.example"), &format!("00u{i}")),
            )
            .await,
        );
    }
    // Okta's connection test.
    let (st, v) = env
        .scim(Method::GET, "/Users?startIndex=1&count=2", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["totalResults"], 5);
    assert_eq!(v["itemsPerPage"], 2);
    assert_eq!(v["startIndex"], 1);
    // Pages are stable and cover everyone once, in creation order.
    let mut paged = Vec::new();
    for start in [1, 3, 5] {
        let (_, v) = env
            .scim(
                Method::GET,
                &format!("/Users?startIndex={start}&count=2"),
                None,
            )
            .await;
        assert!(v["totalResults"].is_u64() && v["itemsPerPage"].is_u64());
        for r in v["Resources"].as_array().unwrap() {
            paged.push(r["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(paged, ids);
    let (_, v) = env.scim(Method::GET, "/Users?count=0", None).await;
    assert_eq!(
        (
            v["totalResults"].as_u64(),
            v["Resources"].as_array().map(Vec::len)
        ),
        (Some(5), Some(0))
    );

    // Filters: case-insensitive userName, exact externalId, `and`, Entra's emails form.
    let q = |f: &str| {
        format!(
            "/Users?filter={}",
            f.replace(' ', "%20").replace('"', "%22")
        )
    };
    for (f, want) in [
        (r#"userName eq "USER3@acme.example""#, Some(3)),
        (r#"externalId eq "00u2""#, Some(2)),
        (r#"externalId eq "00U2""#, None),
        (
            r#"userName eq "user1@acme.example" and externalId eq "00u1""#,
            Some(1),
        ),
        (
            r#"userName eq "user1@acme.example" and externalId eq "00u2""#,
            None,
        ),
        (
            r#"emails[type eq "work"].value eq "user4@acme.example""#,
            Some(4),
        ),
    ] {
        let (st, v) = env.scim(Method::GET, &q(f), None).await;
        assert_eq!(st, StatusCode::OK, "{f}");
        match want {
            Some(i) => {
                assert_eq!(v["totalResults"], 1, "{f}");
                assert_eq!(v["Resources"][0]["id"], ids[i].as_str(), "{f}");
            }
            None => assert_eq!(v["totalResults"], 0, "{f}"),
        }
    }
    let (st, v) = env.scim(Method::GET, &q(r#"userName eq"#), None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_scim_error(&v, "400", Some("invalidFilter"));

    // Duplicates: userName (any case) and group displayName.
    let (st, v) = env
        .scim(
            Method::POST,
            "/Users",
            Some(okta_user("User2@ACME.example", "00uother")),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_scim_error(&v, "409", Some("uniqueness"));
    let (st, v) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{}", ids[0]),
            Some(patch_op(
                json!([{ "op": "replace", "path": "userName", "value": "user1@acme.example" }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_scim_error(&v, "409", Some("uniqueness"));
    create_group(&env, "Sales", &[]).await;
    let (st, v) = env
        .scim(
            Method::POST,
            "/Groups",
            Some(json!({ "schemas": [GROUP], "displayName": "sales" })),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_scim_error(&v, "409", Some("uniqueness"));

    // Unknown ids.
    for (m, p) in [
        (Method::GET, "/Users/00000000-0000-4000-8000-000000000000"),
        (Method::DELETE, "/Users/nope"),
        (Method::GET, "/Groups/nope"),
        (Method::DELETE, "/Groups/nope"),
    ] {
        let (st, v) = env.scim(m, p, None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{p}");
        assert_scim_error(&v, "404", None);
    }
    let (st, _) = env
        .scim(
            Method::PATCH,
            "/Users/nope",
            Some(patch_op(
                json!([{ "op": "replace", "value": { "active": false } }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Sends a request with a `Content-Length` of `len` over raw TCP, writing the
/// body in the background, and returns the status and body of the answer.
async fn oversized(addr: std::net::SocketAddr, path: &str, len: usize) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SCIM_TOKEN}\r\ncontent-type: application/scim+json\r\ncontent-length: {len}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let text = tokio::time::timeout(DEADLINE, async {
        loop {
            let n = rd.read(&mut tmp).await.unwrap_or(0);
            buf.extend_from_slice(&tmp[..n]);
            let s = String::from_utf8_lossy(&buf).into_owned();
            if let Some((h, b)) = s.split_once("\r\n\r\n") {
                let cl = h
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if b.len() >= cl || n == 0 {
                    return s;
                }
            }
            if n == 0 {
                return s;
            }
        }
    })
    .await
    .expect("no answer to the oversized request");
    writer.abort();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let env = Env::start().await;
    let sub = "steady@acme.example";
    let id = create_user(&env, okta_user(sub, "00usteady")).await;
    let token = env.token_at(sub, portcullis::util::now_unix());
    env.allowed(&token, "joiner").await;
    let (_, before) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    let history = |v: &Value| v["history"].as_array().unwrap().len();
    let events_before = history(&env.subject(sub).await);
    let path = format!("/Users/{id}");

    let cases: Vec<(Method, &str, Bytes, &str)> = vec![
        // Schema violations.
        (
            Method::POST,
            "/Users",
            Bytes::from(json!({ "schemas": [USER], "active": true }).to_string()),
            "invalidValue",
        ),
        (
            Method::PUT,
            &path,
            Bytes::from(json!({ "schemas": [USER], "active": false }).to_string()),
            "invalidValue",
        ),
        (
            Method::PUT,
            &path,
            Bytes::from(json!({ "userName": sub, "active": "maybe" }).to_string()),
            "invalidValue",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(
                patch_op(json!([{ "op": "replace", "path": "active", "value": "nope" }]))
                    .to_string(),
            ),
            "invalidValue",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(
                patch_op(json!([{ "op": "replace", "value": { "active": 0 } }])).to_string(),
            ),
            "invalidValue",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(patch_op(json!([{ "op": "remove", "path": "userName" }])).to_string()),
            "invalidValue",
        ),
        // Malformed JSON, empty body, not a PatchOp.
        (
            Method::POST,
            "/Users",
            Bytes::from_static(b"{\"userName\": \"x\","),
            "invalidSyntax",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from_static(b"not json"),
            "invalidSyntax",
        ),
        (Method::POST, "/Users", Bytes::new(), "invalidSyntax"),
        (
            Method::PATCH,
            &path,
            Bytes::from(json!({ "schemas": [PATCH_OP] }).to_string()),
            "invalidSyntax",
        ),
        // Unknown op, bad path, no target, read-only.
        (
            Method::PATCH,
            &path,
            Bytes::from(
                patch_op(json!([
            { "op": "replace", "path": "active", "value": false },
            { "op": "merge", "path": "active", "value": false }]))
                .to_string(),
            ),
            "invalidSyntax",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(
                patch_op(json!([
            { "op": "replace", "path": "active", "value": false },
            { "op": "replace", "path": "emails[type eq \"work\"", "value": "x" }]))
                .to_string(),
            ),
            "invalidPath",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(patch_op(json!([{ "op": "remove" }])).to_string()),
            "noTarget",
        ),
        (
            Method::PATCH,
            &path,
            Bytes::from(
                patch_op(json!([{ "op": "replace", "path": "id", "value": "mine" }])).to_string(),
            ),
            "mutability",
        ),
    ];
    for (m, p, body, scim_type) in cases {
        let (st, h, v) = env
            .send(
                m.clone(),
                &format!("/scim/v2{p}"),
                body.clone(),
                Some(SCIM_TOKEN),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{m} {p} {body:?}: {v}");
        assert_eq!(h["content-type"], "application/scim+json");
        assert_scim_error(&v, "400", Some(scim_type));
    }

    // Unauthenticated deactivation.
    let body = Bytes::from(
        patch_op(json!([{ "op": "replace", "value": { "active": false } }])).to_string(),
    );
    let (st, _, v) = env
        .send(Method::PATCH, &format!("/scim/v2{path}"), body, None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_scim_error(&v, "401", None);

    // 10 MB against a 64 KiB limit.
    let (st, v) = oversized(env.server().admin_addr, "/scim/v2/Users", 10 << 20).await;
    assert_eq!(st, 413, "{v}");
    assert_scim_error(&v, "413", None);

    // Nothing changed: same resource, same history, the token still works.
    let (_, after) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(after, before);
    assert_eq!(history(&env.subject(sub).await), events_before);
    let (_, v) = env.scim(Method::GET, "/Users", None).await;
    assert_eq!(v["totalResults"], 1);
    env.allowed(&token, "after bad input").await;
}

#[tokio::test]
async fn restart_restores_scim_state() {
    let mut env = Env::start().await;
    let (a_sub, b_sub) = ("stay@acme.example", "gone@acme.example");
    let a = create_user(&env, okta_user(a_sub, "00ustay")).await;
    let b = create_user(&env, entra_user(b_sub, "gone")).await;
    let g = create_group(&env, "Engineering", &[&a]).await;
    let dropped = create_group(&env, "Sales", &[&a]).await;
    let (st, _) = env
        .scim(Method::DELETE, &format!("/Groups/{dropped}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let old_b = env.token_at(b_sub, portcullis::util::now_unix());
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{b}"),
            Some(patch_op(
                json!([{ "op": "Replace", "path": "active", "value": "False" }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    // Locations are absolute, built from the listener's address, which a
    // restart changes: compare them relative to it.
    let relative = |v: Value, env: &Env| -> Value {
        let origin = format!("http://{}", env.server().admin_addr);
        serde_json::from_str(&v.to_string().replace(&origin, "")).unwrap()
    };
    let (_, users_before) = env.scim(Method::GET, "/Users", None).await;
    let (_, groups_before) = env.scim(Method::GET, "/Groups", None).await;
    let (users_before, groups_before) =
        (relative(users_before, &env), relative(groups_before, &env));

    env.restart().await;

    let (_, users_after) = env.scim(Method::GET, "/Users", None).await;
    let (_, groups_after) = env.scim(Method::GET, "/Groups", None).await;
    let (users_after, groups_after) = (relative(users_after, &env), relative(groups_after, &env));
    assert_eq!(users_after, users_before);
    assert_eq!(groups_after, groups_before);
    assert_eq!(groups_after["totalResults"], 1);
    assert_eq!(groups_after["Resources"][0]["id"], g.as_str());
    let (st, _) = env
        .scim(Method::GET, &format!("/Groups/{dropped}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let ra = env.subject(a_sub).await;
    assert_eq!(ra["subject"]["entitlements"], json!(["git:push"]));
    assert_eq!(
        env.subject(&format!("scim:{b}")).await["subject"]["status"],
        "terminated"
    );
    env.refused(&old_b, "leaver after restart").await;
    env.allowed(
        &env.token_at(a_sub, portcullis::util::now_unix()),
        "active user after restart",
    )
    .await;
    // Uniqueness survives the restart too.
    let (st, _) = env
        .scim(Method::POST, "/Users", Some(okta_user(a_sub, "00uagain")))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
}

#[tokio::test]
async fn subject_attribute_external_id_names_the_token_subject() {
    let env = Env::start_with("externalId").await;
    let id = create_user(&env, okta_user("r.okafor@acme.example", "00urokafor")).await;
    // The subject is the externalId; userName, email and scim:<id> are aliases.
    let rec = env.subject("r.okafor@acme.example").await;
    assert_eq!(rec["subject"]["subject"], "00urokafor");
    assert_eq!(
        env.subject(&format!("scim:{id}")).await["subject"]["subject"],
        "00urokafor"
    );
    let token = env.token_at("00urokafor", portcullis::util::now_unix());
    env.allowed(&token, "joiner").await;

    // Without externalId there is no subject; a second user with the same one is a duplicate.
    let mut no_ext = okta_user("x@acme.example", "unused");
    no_ext.as_object_mut().unwrap().remove("externalId");
    let (st, v) = env.scim(Method::POST, "/Users", Some(no_ext)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_scim_error(&v, "400", Some("invalidValue"));
    let (st, v) = env
        .scim(
            Method::POST,
            "/Users",
            Some(okta_user("y@acme.example", "00urokafor")),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_scim_error(&v, "409", Some("uniqueness"));

    // A userName change keeps the subject and moves the alias.
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(json!([{ "op": "Replace", "path": "userName", "value": "rita.okafor@acme.example" }]))),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let rec = env.subject("rita.okafor@acme.example").await;
    assert_eq!(rec["subject"]["subject"], "00urokafor");
    // The old name is still the work email, so it still resolves.
    let aliases = rec["subject"]["aliases"].clone();
    assert!(
        aliases
            .as_array()
            .unwrap()
            .contains(&json!("r.okafor@acme.example")),
        "{aliases}"
    );
    assert!(
        aliases
            .as_array()
            .unwrap()
            .contains(&json!("rita.okafor@acme.example")),
        "{aliases}"
    );

    // Leaver by externalId subject.
    let (st, _) = env
        .scim(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch_op(
                json!([{ "op": "replace", "value": { "active": false } }]),
            )),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    env.refused(&token, "externalId leaver").await;
}

/// RFC 7643 §3.1: `meta.location` is an absolute URI. Without
/// `feeds.scim.base_url` it is built from the request's scheme and `Host`
/// (the admin listener is plain HTTP); the `Location` of a 201, group
/// member `$ref`s and the discovery resources follow the same base.
#[tokio::test]
async fn meta_location_is_an_absolute_uri() {
    let env = Env::start().await;
    let base = format!("http://{}/scim/v2", env.server().admin_addr);
    let body = Bytes::from(okta_user("abs@acme.example", "00uabs").to_string());
    let (st, h, v) = env
        .send(Method::POST, "/scim/v2/Users", body, Some(SCIM_TOKEN))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap();
    let loc = format!("{base}/Users/{id}");
    assert_eq!(v["meta"]["location"], json!(loc), "{v}");
    assert_eq!(h.get("location").unwrap().to_str().unwrap(), loc);
    let (_, got) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(got["meta"]["location"], json!(loc));
    let gid = create_group(&env, "Sales", &[id]).await;
    let gloc = format!("{base}/Groups/{gid}");
    let (_, g) = env.scim(Method::GET, &format!("/Groups/{gid}"), None).await;
    assert_eq!(g["meta"]["location"], json!(gloc));
    let (_, u) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(u["groups"][0]["$ref"], json!(gloc), "{u}");
    let (_, list) = env.scim(Method::GET, "/Users", None).await;
    for r in list["Resources"].as_array().unwrap() {
        let l = r["meta"]["location"].as_str().unwrap();
        assert!(l.starts_with(&format!("{base}/Users/")), "{l}");
    }
    let (_, spc) = env.scim(Method::GET, "/ServiceProviderConfig", None).await;
    assert_eq!(
        spc["meta"]["location"],
        json!(format!("{base}/ServiceProviderConfig"))
    );

    // With `feeds.scim.base_url` (behind a TLS terminator), that base wins.
    let mut env = env;
    let public = "https://portcullis.example.com/scim/v2";
    let cfg = std::fs::read_to_string(&env.cfg).unwrap().replacen(
        "[feeds.scim]\n",
        &format!("[feeds.scim]\nbase_url = \"{public}/\"\n"),
        1,
    );
    assert!(cfg.contains(public));
    std::fs::write(&env.cfg, cfg).unwrap();
    env.restart().await;
    let (_, got) = env.scim(Method::GET, &format!("/Users/{id}"), None).await;
    assert_eq!(
        got["meta"]["location"],
        json!(format!("{public}/Users/{id}"))
    );
}
