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
    assert_eq!(curls.len(), 10, "walkthrough:\n{}", demo.lines.join("\n"));

    let (ok, out) = sh(curls[0]);
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    assert_eq!(v["subject"], "alice@example.com");
    assert_eq!(v["device"], "laptop-001");

    let (_, out) = sh(curls[1]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("missing_token"), "{out}");

    let (_, out) = sh(curls[2]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("invalid_token"), "{out}");

    let (ok, out) = sh(curls[3]);
    assert!(ok && out.contains("demo-public"), "{out}");

    let (ok, out) = sh(curls[4]);
    assert!(
        ok && out.contains("portcullis_requests_total{route=\"demo-app\",status=\"200\"} 1"),
        "{out}"
    );
    // 1 was allowed on the seeded managed, compliant laptop.
    assert_eq!(v["decision"], "allow");

    // 6. The MDM event is accepted and applied.
    let (ok, out) = sh(curls[5]);
    assert!(ok, "{out}");
    let ev: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    assert_eq!(ev["results"][0]["outcome"], "applied", "{out}");
    // 7. A read still passes, restricted.
    let (ok, out) = sh(curls[6]);
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    assert_eq!(v["decision"], "restrict", "{out}");
    // 8. A write is refused with the reason.
    let (_, out) = sh(curls[7]);
    assert!(out.contains(" 403"), "{out}");
    assert!(out.contains("\"restricted\""), "{out}");
    assert!(out.contains("not compliant"), "{out}");
    // 9. Lost.
    let (ok, out) = sh(curls[8]);
    assert!(ok && out.contains("\"applied\""), "{out}");
    // 10. Revoked.
    let (_, out) = sh(curls[9]);
    assert!(out.contains(" 401"), "{out}");
    assert!(out.contains("revoked"), "{out}");
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
        "PORTCULLIS_DEVICE_CLAIM",
        "PORTCULLIS_TOKEN",
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
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
