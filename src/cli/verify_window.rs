//! `portcullis verify-window`: the practical test of the control window
//! against a live deployment. It probes a protected URL with a given token
//! (and optional client certificate) until it is allowed, sends a state
//! change for a test device or subject through a feed, probes until access
//! changes, prints the window, restores the state, and fails past `--bound`.
//!
//! Feeds, picked by the `--feed` URL:
//! - `…/mdm/v1/{source}/events` (generic MDM, `--device`): `lifecycle: lost`,
//!   restored by a re-enrolment report;
//! - `…/scim/v2` (`--subject` = the SCIM user id): `active: false`, restored
//!   by `active: true`;
//! - `…/admin/v1` (`--device`): mark lost, restored by the restore endpoint.
//!
//! A restore brings the state back, not the credentials: a leaver or lost
//! device also revokes what was issued before, so the probe token stays
//! refused afterwards (by design); use a throw-away test token.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The options of `verify-window`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyWindowArgs {
    /// The protected URL to probe through the proxy.
    #[arg(long)]
    pub proxy: String,
    /// The feed endpoint: `…/mdm/v1/{source}/events`, `…/scim/v2` or `…/admin/v1`.
    #[arg(long)]
    pub feed: String,
    /// The feed's bearer secret (else `PORTCULLIS_FEED_TOKEN`).
    #[arg(long)]
    pub feed_token: Option<String>,
    /// The SCIM user id to deactivate (SCIM feed).
    #[arg(long)]
    pub subject: Option<String>,
    /// The device id to mark lost (MDM or admin feed).
    #[arg(long)]
    pub device: Option<String>,
    /// The bearer token the probe sends (else `PORTCULLIS_PROBE_TOKEN`).
    #[arg(long)]
    pub token: Option<String>,
    /// Extra CA (PEM) to trust for the proxy and the feed.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate chain (PEM) for the probe.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for the probe.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The window the deployment promises, milliseconds; exit 1 past it.
    #[arg(long)]
    pub bound: u64,
    /// Give up waiting for the change after this long, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Pause between probes, milliseconds.
    #[arg(long, default_value_t = 5)]
    pub interval_ms: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn client(a: &VerifyWindowArgs) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(ca) = &a.cacert {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let tls = match (&a.cert, &a.key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?;
            b.with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        _ => b.with_no_client_auth(),
    };
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(conn))
}

async fn send(
    c: &HttpClient,
    method: Method,
    url: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok((status, body))
}

enum Feed {
    Mdm { url: String, device: String },
    Scim { url: String, user: String },
    Admin { url: String, device: String },
}

fn feed(a: &VerifyWindowArgs) -> Result<Feed, String> {
    let url = a.feed.trim_end_matches('/').to_owned();
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| format!("--feed `{url}` needs {flag}"))
    };
    if url.contains("/mdm/v1/") && url.ends_with("/events") {
        Ok(Feed::Mdm {
            device: need(&a.device, "--device")?,
            url,
        })
    } else if url.ends_with("/scim/v2") {
        Ok(Feed::Scim {
            user: need(&a.subject, "--subject")?,
            url,
        })
    } else if url.ends_with("/admin/v1") {
        Ok(Feed::Admin {
            device: need(&a.device, "--device")?,
            url,
        })
    } else {
        Err(format!(
            "--feed `{url}` is none of …/mdm/v1/{{source}}/events, …/scim/v2, …/admin/v1"
        ))
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Sends the change (`restore = false`) or its undoing.
async fn change(c: &HttpClient, f: &Feed, token: &str, restore: bool) -> Result<(), String> {
    let nonce = {
        let mut b = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut b);
        hex::encode(b)
    };
    let now = crate::util::now_unix_ms();
    let (status, body) = match f {
        Feed::Mdm { url, device } => {
            let ev = if restore {
                serde_json::json!({"event_id": format!("verify-window-{nonce}-restore"),
                    "device_id": device, "occurred_at": now, "lifecycle": "enrolled", "reenrolled": true})
            } else {
                serde_json::json!({"event_id": format!("verify-window-{nonce}-lost"),
                    "device_id": device, "occurred_at": now, "lifecycle": "lost"})
            };
            send(
                c,
                Method::POST,
                url,
                Some(token),
                Some("application/json"),
                Some(ev.to_string()),
            )
            .await?
        }
        Feed::Scim { url, user } => {
            let body = serde_json::json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "value": {"active": restore}}],
            });
            send(
                c,
                Method::PATCH,
                &format!("{url}/Users/{}", enc(user)),
                Some(token),
                Some("application/scim+json"),
                Some(body.to_string()),
            )
            .await?
        }
        Feed::Admin { url, device } => {
            let what = if restore { "restore" } else { "lost" };
            send(
                c,
                Method::POST,
                &format!("{url}/devices/{}/{what}", enc(device)),
                Some(token),
                Some("application/json"),
                Some("{}".into()),
            )
            .await?
        }
    };
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "the feed answered {status}: {}",
            body.chars().take(300).collect::<String>()
        ))
    }
}

/// Runs the measurement; `Ok(false)` when the window exceeded the bound.
pub async fn run(a: VerifyWindowArgs) -> Result<bool, String> {
    let env = |v: &Option<String>, name: &str| v.clone().or_else(|| std::env::var(name).ok());
    let feed_token = env(&a.feed_token, "PORTCULLIS_FEED_TOKEN")
        .ok_or("--feed-token or PORTCULLIS_FEED_TOKEN is required")?;
    let token = env(&a.token, "PORTCULLIS_PROBE_TOKEN");
    let f = feed(&a)?;
    let c = client(&a)?;
    let probe = || send(&c, Method::GET, &a.proxy, token.as_deref(), None, None);
    let allowed = |s: u16| (200..400).contains(&s);
    let (base, body) = probe().await?;
    if !allowed(base) {
        return Err(format!(
            "the probe is refused before any change ({base}: {}); give a token that is allowed now",
            body.chars().take(200).collect::<String>()
        ));
    }
    let start = Instant::now();
    change(&c, &f, &feed_token, false).await?;
    let acked = start.elapsed();
    let deadline = Duration::from_millis(a.timeout_ms);
    let mut probes = 0u64;
    let outcome = loop {
        let (s, _) = probe().await?;
        probes += 1;
        if !allowed(s) {
            break Some((start.elapsed(), s));
        }
        if start.elapsed() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
    };
    let restored = change(&c, &f, &feed_token, true).await;
    let Some((window, status)) = outcome else {
        return Err(format!(
            "access did not change within {} ms ({probes} probes){}",
            a.timeout_ms,
            restored
                .err()
                .map(|e| format!("; restore failed: {e}"))
                .unwrap_or_default()
        ));
    };
    let ms = window.as_secs_f64() * 1000.0;
    let within = ms <= a.bound as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "window_ms": ms, "feed_ack_ms": acked.as_secs_f64() * 1000.0,
                "probes": probes, "status": status, "bound_ms": a.bound,
                "within_bound": within, "restored": restored.is_ok(),
            })
        );
    } else {
        println!(
            "control window: {ms:.1} ms (feed acknowledged after {:.1} ms; {probes} probes; now {status}); bound {} ms: {}",
            acked.as_secs_f64() * 1000.0,
            a.bound,
            if within { "within" } else { "EXCEEDED" }
        );
    }
    restored.map_err(|e| format!("state not restored: {e}"))?;
    Ok(within)
}
