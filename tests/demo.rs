//! `portcullis demo` as a newcomer runs it: one command, and the printed curl
//! commands work as printed; `demo.env` is enough for an outside tool.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{DEADLINE, binary};

struct Demo {
    child: std::process::Child,
    lines: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .args([
            "demo",
            "--proxy-port",
            "0",
            "--admin-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let start = std::time::Instant::now();
    loop {
        let left = DEADLINE
            .checked_sub(start.elapsed())
            .expect("demo did not print its walkthrough");
        let line = rx.recv_timeout(left).expect("demo stopped printing");
        let done = line.starts_with("demo.env: ");
        lines.push(line);
        if done {
            break;
        }
    }
    Demo { child, lines, dir }
}

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("bash")
        .args(["-c", &format!("timeout 20 {cmd}")])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_printed_curl_commands_work_as_printed() {
    let demo = start_demo();
    let curls: Vec<&String> = demo
        .lines
        .iter()
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 15, "walkthrough:\n{}", demo.lines.join("\n"));
    let json = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"))
    };

    let (ok, out) = sh(curls[0]);
    assert!(ok, "{out}");
    let v = json(&out);
    assert_eq!(v["subject"], "alice@example.com");
    assert_eq!(v["device"], "laptop-001");
    assert_eq!(v["binding"], "none");

    let (_, out) = sh(curls[1]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("missing_token"), "{out}");

    let (_, out) = sh(curls[2]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("invalid_token"), "{out}");

    let (ok, out) = sh(curls[3]);
    assert!(ok && out.contains("demo-public"), "{out}");

    // DPoP-bound, with a fresh proof each time: it works twice.
    for _ in 0..2 {
        let (ok, out) = sh(curls[4]);
        assert!(ok, "{out}");
        assert_eq!(json(&out)["binding"], "dpop", "{out}");
    }

    let (_, out) = sh(curls[5]);
    assert!(out.contains(" 401"), "{out}");
    assert!(
        out.contains("DPoP-bound token presented as a bearer token"),
        "{out}"
    );

    // mTLS-bound, with the seeded device's certificate.
    let (ok, out) = sh(curls[6]);
    assert!(ok, "{out}");
    let v = json(&out);
    assert_eq!(v["binding"], "mtls", "{out}");
    assert_eq!(v["verified_device"], "laptop-001", "{out}");

    let (_, out) = sh(curls[7]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("none was presented"), "{out}");

    // The seeded device record.
    let (ok, out) = sh(curls[8]);
    assert!(ok, "{out}");
    let v = json(&out);
    assert_eq!(v["device"]["compliance"], "compliant");
    assert_eq!(v["device"]["lifecycle"], "enrolled");

    // 10. The noncompliant MDM event is accepted and applied.
    let (ok, out) = sh(curls[9]);
    assert!(ok, "{out}");
    assert_eq!(json(&out)["results"][0]["outcome"], "applied", "{out}");
    // 11. A read still passes, restricted.
    let (ok, out) = sh(curls[10]);
    assert!(ok, "{out}");
    assert_eq!(json(&out)["decision"], "restrict", "{out}");
    // 12. A write is refused with the reason.
    let (_, out) = sh(curls[11]);
    assert!(out.contains(" 403"), "{out}");
    assert!(out.contains("\"restricted\""), "{out}");
    assert!(out.contains("not compliant"), "{out}");
    // 13. Lost: accepted after the durable write…
    let (ok, out) = sh(curls[12]);
    assert!(ok && out.contains("\"outcome\":\"applied\""), "{out}");
    // 14. …and the next request with the same token is refused.
    let (_, out) = sh(curls[13]);
    assert!(
        out.starts_with("HTTP/2 401") || out.starts_with("HTTP/2 403"),
        "{out}"
    );
    assert!(out.contains("revoked") || out.contains("lost"), "{out}");

    let (ok, out) = sh(curls[14]);
    assert!(
        ok && out.contains("portcullis_requests_total{route=\"demo-app\",status=\"200\"} 5"),
        "{out}"
    );
    assert!(
        out.contains("portcullis_control_window_seconds_count{feed=\"mdm\""),
        "{out}"
    );
    let _ = &demo.dir;
}

#[test]
fn demo_env_is_enough_to_mint_a_token_and_call_the_proxy() {
    let demo = start_demo();
    let env_path = demo
        .lines
        .last()
        .unwrap()
        .strip_prefix("demo.env: ")
        .unwrap()
        .to_owned();
    // Source it in a shell, as a script would, and read the values back.
    let keys = [
        "PORTCULLIS_PROXY_URL",
        "PORTCULLIS_ADMIN_URL",
        "PORTCULLIS_CA_CERT",
        "PORTCULLIS_ISSUER",
        "PORTCULLIS_AUDIENCE",
        "PORTCULLIS_ISSUER_ALG",
        "PORTCULLIS_ISSUER_KID",
        "PORTCULLIS_ISSUER_KEY",
        "PORTCULLIS_ISSUER_JWKS",
        "PORTCULLIS_ASSERTION_JWKS",
        "PORTCULLIS_DEVICE_CLAIM",
        "PORTCULLIS_TOKEN",
        "PORTCULLIS_SCIM_URL",
        "PORTCULLIS_SCIM_TOKEN",
        "PORTCULLIS_SSF_PUSH_URL",
        "PORTCULLIS_SSF_PUSH_TOKEN",
        "PORTCULLIS_SSF_ISSUER",
        "PORTCULLIS_SSF_AUDIENCE",
        "PORTCULLIS_SSF_ALG",
        "PORTCULLIS_SSF_KID",
        "PORTCULLIS_SSF_KEY",
        "PORTCULLIS_MDM_URL",
        "PORTCULLIS_MDM_SECRET",
        "PORTCULLIS_ADMIN_TOKEN",
    ];
    let script = format!(
        ". '{env_path}' && {}",
        keys.iter()
            .map(|k| format!("printf '%s\\n' \"${k}\""))
            .collect::<Vec<_>>()
            .join(" && ")
    );
    let (ok, out) = sh(&format!("bash -c {}", shell_quote(&script)));
    assert!(ok, "{out}");
    let vals: Vec<&str> = out.lines().collect();
    assert_eq!(vals.len(), keys.len(), "{out}");
    let env: std::collections::HashMap<&str, &str> = keys.iter().copied().zip(vals).collect();
    for k in keys {
        assert!(!env[k].is_empty(), "{k} is empty");
    }
    assert!(std::path::Path::new(env["PORTCULLIS_CA_CERT"]).exists());

    // Mint a token from the files alone, for a subject the demo never saw.
    let pem = std::fs::read(env["PORTCULLIS_ISSUER_KEY"]).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    assert_eq!(env["PORTCULLIS_ISSUER_ALG"], "ES256");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(env["PORTCULLIS_ISSUER_KID"].to_owned());
    let now = portcullis::util::now_unix();
    // An unmanaged device: the default policies want multi-factor
    // authentication (acr) and give it a short session.
    let mut claims = serde_json::json!({
        "iss": env["PORTCULLIS_ISSUER"], "aud": env["PORTCULLIS_AUDIENCE"],
        "sub": "outside-tool@example.com", "iat": now, "exp": now + 300,
        "acr": "urn:portcullis:acr:mfa", "auth_time": now,
    });
    claims[env["PORTCULLIS_DEVICE_CLAIM"]] = "tool-device".into();
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env["PORTCULLIS_ISSUER_JWKS"]).unwrap()).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], env["PORTCULLIS_ISSUER_KID"]);

    let (ok, out) = sh(&format!(
        "curl -sS --cacert {} -H 'Authorization: Bearer {token}' {}/whoami",
        shell_quote(env["PORTCULLIS_CA_CERT"]),
        env["PORTCULLIS_PROXY_URL"]
    ));
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    assert_eq!(v["subject"], "outside-tool@example.com");
    assert_eq!(v["device"], "tool-device");
    assert_eq!(v["decision"], "shorten");
    let (ok, out) = sh(&format!("curl -sS {}/readyz", env["PORTCULLIS_ADMIN_URL"]));
    assert!(ok && out.contains("ready"), "{out}");
    // The assertion's keys, where demo.env says they are.
    let (ok, out) = sh(&format!(
        "curl -sS --cacert {} {}",
        shell_quote(env["PORTCULLIS_CA_CERT"]),
        env["PORTCULLIS_ASSERTION_JWKS"]
    ));
    assert!(ok && out.contains("\"demo-assertion-1\""), "{out}");

    // An outside SET signer: account-disabled for the tool's subject, signed
    // with the demo transmitter's key from demo.env, pushed with its token.
    let ssf_pem = std::fs::read(env["PORTCULLIS_SSF_KEY"]).unwrap();
    let ssf_key = jsonwebtoken::EncodingKey::from_ec_pem(&ssf_pem).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(env["PORTCULLIS_SSF_KID"].to_owned());
    h.typ = Some("secevent+jwt".into());
    let set = jsonwebtoken::encode(
        &h,
        &serde_json::json!({
            "iss": env["PORTCULLIS_SSF_ISSUER"], "aud": env["PORTCULLIS_SSF_AUDIENCE"],
            "iat": portcullis::util::now_unix(), "jti": "outside-1",
            "sub_id": {"format": "email", "email": "outside-tool@example.com"},
            "events": {"https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}},
        }),
        &ssf_key,
    )
    .unwrap();
    let (ok, out) = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' -X POST -H 'Authorization: Bearer {}' -H 'Content-Type: application/secevent+jwt' --data-binary '{set}' {}",
        env["PORTCULLIS_SSF_PUSH_TOKEN"], env["PORTCULLIS_SSF_PUSH_URL"]
    ));
    assert!(ok && out.trim() == "202", "{out}");
    let (ok, out) = sh(&format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' --cacert {} -H 'Authorization: Bearer {token}' {}/whoami",
        shell_quote(env["PORTCULLIS_CA_CERT"]),
        env["PORTCULLIS_PROXY_URL"]
    ));
    // Suspended by the SET: the default policies revoke (401).
    assert!(ok && (out.trim() == "401" || out.trim() == "403"), "{out}");
}

fn read_env(demo: &Demo, keys: &[&str]) -> std::collections::HashMap<String, String> {
    let env_path = demo
        .lines
        .last()
        .unwrap()
        .strip_prefix("demo.env: ")
        .unwrap()
        .to_owned();
    let script = format!(
        ". '{env_path}' && {}",
        keys.iter()
            .map(|k| format!("printf '%s\\n' \"${k}\""))
            .collect::<Vec<_>>()
            .join(" && ")
    );
    let (ok, out) = sh(&format!("bash -c {}", shell_quote(&script)));
    assert!(ok, "{out}");
    let vals: Vec<&str> = out.lines().collect();
    assert_eq!(vals.len(), keys.len(), "{out}");
    let env: std::collections::HashMap<String, String> = keys
        .iter()
        .map(|k| (*k).to_owned())
        .zip(vals.into_iter().map(str::to_owned))
        .collect();
    for k in keys {
        assert!(!env[*k].is_empty(), "{k} is empty");
    }
    env
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// An outside client's token, minted from the files in demo.env alone.
fn mint_token(
    env: &std::collections::HashMap<String, String>,
    sub: &str,
    device: &str,
    cnf: serde_json::Value,
) -> String {
    let pem = std::fs::read(&env["PORTCULLIS_ISSUER_KEY"]).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(env["PORTCULLIS_ISSUER_KID"].clone());
    let now = portcullis::util::now_unix();
    let mut claims = serde_json::json!({
        "iss": env["PORTCULLIS_ISSUER"], "aud": env["PORTCULLIS_AUDIENCE"],
        "sub": sub, "iat": now, "exp": now + 300, "cnf": cnf,
        // An unknown device steps up under the default policies: this outside
        // client authenticated with MFA just now.
        "acr": "urn:portcullis:acr:mfa", "auth_time": now,
    });
    claims[env["PORTCULLIS_DEVICE_CLAIM"].as_str()] = device.into();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[test]
fn demo_env_is_enough_to_mint_a_device_certificate_and_a_dpop_proof() {
    let demo = start_demo();
    let env = read_env(
        &demo,
        &[
            "PORTCULLIS_PROXY_URL",
            "PORTCULLIS_MTLS_URL",
            "PORTCULLIS_CA_CERT",
            "PORTCULLIS_ISSUER",
            "PORTCULLIS_AUDIENCE",
            "PORTCULLIS_ISSUER_KID",
            "PORTCULLIS_ISSUER_KEY",
            "PORTCULLIS_DEVICE_CLAIM",
            "PORTCULLIS_DEVICE_CA_CERT",
            "PORTCULLIS_DEVICE_CA_KEY",
            "PORTCULLIS_DEVICE_ID_RULE",
        ],
    );
    let work = tempfile::tempdir().unwrap();

    // 1. A device certificate for a device the demo never saw, signed by the
    //    demo's device CA, naming the device as the rule says.
    let rule = &env["PORTCULLIS_DEVICE_ID_RULE"];
    let template = rule.strip_prefix("san-uri:").expect("a san-uri rule");
    let device_uri = template.replace("{id}", "tool-device");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(&env["PORTCULLIS_DEVICE_CA_KEY"]).unwrap(),
    )
    .unwrap();
    let ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(&env["PORTCULLIS_DEVICE_CA_CERT"]).unwrap(),
        ca_key,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(device_uri.as_str().try_into().unwrap()));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = params.signed_by(&leaf_key, &ca).unwrap();
    let cert_path = work.path().join("tool.pem");
    let key_path = work.path().join("tool-key.pem");
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();

    // 2. A token bound to that certificate, sent with it over the mTLS URL.
    let x5t = b64(&sha256(leaf.der()));
    let token = mint_token(
        &env,
        "tool@example.com",
        "tool-device",
        serde_json::json!({ "x5t#S256": x5t }),
    );
    let (ok, out) = sh(&format!(
        "curl -sS --cacert {} --cert {} --key {} -H 'Authorization: Bearer {token}' {}/whoami",
        shell_quote(&env["PORTCULLIS_CA_CERT"]),
        shell_quote(&cert_path.display().to_string()),
        shell_quote(&key_path.display().to_string()),
        env["PORTCULLIS_MTLS_URL"]
    ));
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    assert_eq!(v["subject"], "tool@example.com");
    assert_eq!(v["binding"], "mtls");
    assert_eq!(v["verified_device"], "tool-device");
    // Without the certificate the same token is refused.
    let (_, out) = sh(&format!(
        "curl -sS -i --cacert {} -H 'Authorization: Bearer {token}' {}/whoami",
        shell_quote(&env["PORTCULLIS_CA_CERT"]),
        env["PORTCULLIS_PROXY_URL"]
    ));
    assert!(out.contains(" 401"), "{out}");

    // 3. Its own DPoP key, a token bound to it, and a proof built with
    //    jsonwebtoken alone (not portcullis' helpers).
    let dpop_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = dpop_key.public_key_raw();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(serde_json::json!({
        "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }))
    .unwrap();
    let jkt = jwk
        .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        .unwrap();
    let token = mint_token(
        &env,
        "tool@example.com",
        "tool-device",
        serde_json::json!({ "jkt": jkt }),
    );
    let url = format!("{}/orders", env["PORTCULLIS_PROXY_URL"]);
    let proof = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.typ = Some("dpop+jwt".into());
        h.jwk = Some(jwk);
        let claims = serde_json::json!({
            "jti": format!("tool-{}", portcullis::util::now_unix()),
            "htm": "POST", "htu": url, "iat": portcullis::util::now_unix(),
            "ath": b64(&sha256(token.as_bytes())),
        });
        let key =
            jsonwebtoken::EncodingKey::from_ec_pem(dpop_key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    let dpop_curl = format!(
        "curl -sS -i --cacert {} -X POST -H 'Authorization: DPoP {token}' -H 'DPoP: {proof}' '{url}?page=2'",
        shell_quote(&env["PORTCULLIS_CA_CERT"])
    );
    let (ok, out) = sh(&dpop_curl);
    assert!(ok && out.contains(" 200"), "{out}");
    assert!(out.contains("\"binding\":\"dpop\""), "{out}");
    // The same proof again is a replay.
    let (_, out) = sh(&dpop_curl);
    assert!(
        out.contains(" 401") && out.contains("invalid_dpop_proof"),
        "{out}"
    );
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn a_browser_logs_in_at_the_demo_idp_and_a_lost_report_ends_its_session() {
    let demo = start_demo();
    assert!(
        demo.lines
            .iter()
            .any(|l| l.contains("Browser access: open https://localhost:")),
        "walkthrough:\n{}",
        demo.lines.join("\n")
    );
    let env = read_env(
        &demo,
        &[
            "PORTCULLIS_BROWSER_URL",
            "PORTCULLIS_CA_CERT",
            "PORTCULLIS_ISSUER",
            "PORTCULLIS_MDM_URL",
            "PORTCULLIS_MDM_SECRET",
        ],
    );
    let url = &env["PORTCULLIS_BROWSER_URL"];
    let ca = shell_quote(&env["PORTCULLIS_CA_CERT"]);
    let jar = demo.dir.path().join("cookies.txt");
    let jar = shell_quote(&jar.display().to_string());
    let curl = format!("curl -sS --cacert {ca} -c {jar} -b {jar} -H 'Accept: text/html'");
    // No session: off to the demo IdP.
    let (ok, authorize) = sh(&format!(
        "{curl} -o /dev/null -w '%{{redirect_url}}' {}",
        shell_quote(url)
    ));
    assert!(
        ok && authorize.starts_with(&env["PORTCULLIS_ISSUER"]),
        "{authorize}"
    );
    // The one-click login page; alice with a password, on her laptop.
    let (ok, page) = sh(&format!("curl -sS {}", shell_quote(&authorize)));
    assert!(ok && page.contains("alice@example.com"), "{page}");
    let login = page
        .split("href=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(|h| h.replace("&amp;", "&"))
        .find(|h| h.contains("alice%40example.com") && h.contains("mfa=0"))
        .expect("a password login link for alice");
    let (ok, callback) = sh(&format!(
        "curl -sS -o /dev/null -w '%{{redirect_url}}' {}",
        shell_quote(&format!("{}{login}", env["PORTCULLIS_ISSUER"]))
    ));
    assert!(
        ok && callback.contains("/.portcullis/callback?"),
        "{callback}"
    );
    let (ok, back) = sh(&format!(
        "{curl} -o /dev/null -w '%{{http_code}} %{{redirect_url}}' {}",
        shell_quote(&callback)
    ));
    assert!(
        ok && back.starts_with("303 ") && back.ends_with("/app/"),
        "{back}"
    );
    let (ok, out) = sh(&format!("{curl} {}", shell_quote(url)));
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("the app's JSON");
    assert_eq!(v["subject"], "alice@example.com", "{out}");
    assert_eq!(v["device"], "laptop-001", "{out}");
    assert_eq!(v["route"], "demo-browser", "{out}");

    // laptop-001 is reported lost: the next page load is refused, the
    // session ended and its cookie cleared.
    let lost_ms = portcullis::util::now_unix_ms();
    let (ok, out) = sh(&format!(
        "curl -sS -X POST -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"event_id\":\"browser-lost-1\",\"device_id\":\"laptop-001\",\"occurred_at\":{lost_ms},\"lifecycle\":\"lost\"}}' {}",
        env["PORTCULLIS_MDM_SECRET"],
        shell_quote(&env["PORTCULLIS_MDM_URL"])
    ));
    assert!(ok && out.contains("applied"), "{out}");
    let (_, out) = sh(&format!("{curl} -i {}", shell_quote(url)));
    assert!(
        out.starts_with("HTTP/2 401") || out.starts_with("HTTP/2 403"),
        "{out}"
    );
    assert!(
        out.contains("<html lang=\"en\"") && (out.contains("lost") || out.contains("revoked")),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase()
            .contains("set-cookie: __host-portcullis-session=;"),
        "{out}"
    );
    let (_, out) = sh(&format!(
        "{curl} -o /dev/null -w '%{{http_code}}' {}",
        shell_quote(url)
    ));
    assert_eq!(out, "302", "a fresh login is needed");
}
