//! The command line: `serve`, `check`, `demo`, `policy test`, `policy
//! replay`, `explain`, `access-report`, `verify-window`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

pub mod verify_window;

/// portcullis: an identity-aware reverse proxy.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and admin listeners from a config file.
    Serve {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound addresses here as JSON once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Validate a config file: syntax, fields, certificates, keys, JWKS files.
    Check {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the embedded demo: proxy, demo app and dev token issuer on 127.0.0.1.
    Demo {
        /// Where certificates, keys, the generated config and demo.env go.
        #[arg(long, default_value = crate::demo::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Proxy (TLS) port on 127.0.0.1 (0 picks a free port).
        #[arg(long, default_value_t = 8443)]
        proxy_port: u16,
        /// Admin port on 127.0.0.1 (0 picks a free port).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
    /// Policy tooling: test a policy directory, replay an audit log.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Ask a running proxy (admin API) how it would decide a request now, and why.
    Explain {
        /// The running proxy's config file (for the admin address and token).
        #[arg(long, short)]
        config: PathBuf,
        /// Subject (token `sub`, or an alias).
        #[arg(long)]
        subject: String,
        /// Route name.
        #[arg(long)]
        route: String,
        /// Device id.
        #[arg(long)]
        device: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// More token facts: `acr=…`, `amr=mfa,hwk`, `auth_age_s=…`, `token_age_s=…`,
        /// `binding=dpop`, `client_id=…`, `ip=…`.
        #[arg(long = "fact", value_name = "KEY=VALUE")]
        facts: Vec<String>,
    },
    /// Print the current access picture and its stale-access findings, read
    /// from a running proxy's admin API (`GET /admin/v1/access`).
    AccessReport {
        /// The running proxy's config file (for the admin address and token).
        #[arg(long, short)]
        config: PathBuf,
        /// Admin listener address, when the config's is port 0 or not reachable as written.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// `table`, `json` or `csv`.
        #[arg(long, default_value = "table")]
        format: String,
        /// Only this subject (or alias).
        #[arg(long)]
        subject: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Only this finding kind (`leaver_access`, `feed_silent`, …).
        #[arg(long)]
        finding: Option<String>,
    },
    /// Measure the control window of a live deployment: change a test
    /// device's or subject's state through a feed, probe a protected route
    /// until access changes, print the window, restore the state.
    VerifyWindow(verify_window::VerifyWindowArgs),
}

/// `portcullis policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate DIR's policies and run the test cases in DIR/tests/*.toml.
    Test {
        /// Policy directory.
        dir: PathBuf,
    },
    /// Re-decide logged requests under a proposed set and report what would change.
    Replay {
        /// Audit log (JSON lines).
        #[arg(long)]
        audit: PathBuf,
        /// Proposed policy directory.
        #[arg(long)]
        policies: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config, addr_file } => run_async(serve(config, addr_file)),
        Command::Demo {
            data_dir,
            proxy_port,
            admin_port,
        } => run_async(demo(crate::demo::DemoOptions {
            data_dir,
            proxy_port,
            admin_port,
        })),
        Command::Policy {
            command: PolicyCommand::Test { dir },
        } => policy_test(&dir),
        Command::Policy {
            command:
                PolicyCommand::Replay {
                    audit,
                    policies,
                    json,
                },
        } => policy_replay(&audit, &policies, json),
        Command::VerifyWindow(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(verify_window::run(args)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Explain {
            config,
            subject,
            route,
            device,
            method,
            facts,
        } => {
            let mut q = vec![
                ("subject".to_owned(), subject),
                ("route".to_owned(), route),
                ("method".to_owned(), method),
            ];
            q.extend(device.map(|d| ("device".to_owned(), d)));
            for f in facts {
                match f.split_once('=') {
                    Some((k, v)) => q.push((k.to_owned(), v.to_owned())),
                    None => {
                        eprintln!("error: --fact `{f}` is not KEY=VALUE");
                        return ExitCode::FAILURE;
                    }
                }
            }
            run_async(explain(config, q))
        }
        Command::AccessReport {
            config,
            admin,
            format,
            subject,
            device,
            route,
            finding,
        } => {
            if crate::access::report::Format::parse(&format).is_none() {
                eprintln!("error: --format `{format}` is not table, json or csv");
                return ExitCode::FAILURE;
            }
            let filter = crate::access::Filter {
                subject,
                device,
                route,
                finding,
            };
            run_async(access_report(config, admin, filter.to_query(&format)))
        }
    }
}

/// `portcullis access-report`: reads the picture through the admin API
/// with the config's `admin.api_token`, and prints it as the proxy renders it.
async fn access_report(
    config: PathBuf,
    admin: Option<std::net::SocketAddr>,
    query: String,
) -> Result<(), String> {
    let body = admin_get(
        &config,
        admin,
        "access-report",
        &format!("/admin/v1/access?{query}"),
    )
    .await?;
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}

/// GET on the admin API (at `admin`, else the config's `admin.listen`, an
/// unspecified address meaning loopback) with the config's
/// `admin.api_token`; the body of a 2xx, else the error's description.
async fn admin_get(
    config: &std::path::Path,
    admin: Option<std::net::SocketAddr>,
    command: &str,
    path_and_query: &str,
) -> Result<bytes::Bytes, String> {
    use http_body_util::BodyExt;
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let token = cfg
        .admin
        .api_token
        .as_deref()
        .ok_or_else(|| format!("{command} needs admin.api_token in the config"))?;
    let mut addr = admin.unwrap_or(cfg.admin.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let req = http::Request::get(format!("http://{addr}{path_and_query}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(format!(
            "{status}: {}",
            v["error_description"].as_str().unwrap_or("")
        ));
    }
    Ok(body)
}

fn policy_test(dir: &std::path::Path) -> ExitCode {
    match crate::policy::testing::run_dir(dir) {
        Ok(r) => {
            for l in &r.lines {
                println!("{l}");
            }
            println!("{} passed, {} failed", r.passed, r.failed.len());
            if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn policy_replay(audit: &std::path::Path, policies: &std::path::Path, json: bool) -> ExitCode {
    let set = match crate::policy::load_dir(policies) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match crate::policy::replay::replay(audit, &set) {
        Ok(r) if json => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}", r.text());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", audit.display());
            ExitCode::FAILURE
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn explain(config: PathBuf, q: Vec<(String, String)>) -> Result<(), String> {
    let query: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
        .collect();
    let body = admin_get(
        &config,
        None,
        "explain",
        &format!("/admin/v1/explain?{}", query.join("&")),
    )
    .await?;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

fn run_async(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Validates everything `serve` would load, without opening a socket.
pub fn check_config(path: &std::path::Path) -> Result<Config, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    crate::tls::build_tls(&cfg.tls).map_err(|e| format!("{}: tls: {e}", path.display()))?;
    crate::proxy::client::check(&cfg.upstream)
        .map_err(|e| format!("{}: upstream.ca: {e}", path.display()))?;
    crate::proxy::assertion::Signer::from_config(&cfg).map_err(|e| e.to_string())?;
    if let Some(t) = &cfg.transmitter {
        crate::transmit::keys::SetSigner::from_config(&cfg, t).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &cfg.policy {
        crate::policy::load_dir(&p.dir)
            .map_err(|e| format!("{}: policy.dir: {e}", path.display()))?;
        if let Some(d) = &p.shadow_dir {
            crate::policy::load_dir(d)
                .map_err(|e| format!("{}: policy.shadow_dir: {e}", path.display()))?;
        }
    }
    let fetcher = crate::authn::jwks::Fetcher::default();
    for (i, ic) in cfg.issuers.iter().enumerate() {
        let issuer = crate::authn::Issuer::new(ic.clone(), &fetcher)
            .map_err(|e| format!("{}: issuers[{i}]: {e}", path.display()))?;
        if let Some(file) = &ic.jwks_file {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let n = rt
                .block_on(issuer.refresh())
                .map_err(|e| format!("{}: issuers[{i}].jwks_file: {e}", path.display()))?;
            if n == 0 {
                return Err(format!(
                    "{}: issuers[{i}].jwks_file: {} holds no key usable with {:?}",
                    path.display(),
                    file.display(),
                    ic.algorithms
                ));
            }
        }
    }
    Ok(cfg)
}

fn check(path: &std::path::Path) -> ExitCode {
    match check_config(path) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} routes, {} issuers, {} certificates{})",
                path.display(),
                cfg.routes.len(),
                cfg.issuers.len(),
                cfg.tls.certificates.len(),
                if cfg.policy.is_some() {
                    ", policy set valid"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: PathBuf, addr_file: Option<PathBuf>) -> Result<(), String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    crate::telemetry::logging::init(&cfg.log);
    let server =
        crate::server::start_with(cfg, std::sync::Arc::new(crate::telemetry::Metrics::new()))
            .await
            .map_err(|e| e.to_string())?;
    if let Some(path) = addr_file {
        let doc = serde_json::json!({
            "proxy": server.proxy_addr.to_string(),
            "plain_http": server.plain_addr.map(|a| a.to_string()),
            "admin": server.admin_addr.to_string(),
            "pid": std::process::id(),
        });
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    wait_for_signals(&server).await?;
    tracing::info!("shutting down: draining in-flight requests");
    server.shutdown().await;
    Ok(())
}

/// Waits for SIGTERM / Ctrl-C (returns) and handles SIGHUP (reload) meanwhile.
async fn wait_for_signals(server: &crate::server::RunningServer) -> Result<(), String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    match server.shared.reload().await {
                        Ok(v) => tracing::info!(version = v, "SIGHUP: config reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: new config rejected; still serving the previous one"),
                    }
                }
                _ = term.recv() => return Ok(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = server;
        tokio::signal::ctrl_c().await.map_err(|e| e.to_string())
    }
}

async fn demo(opts: crate::demo::DemoOptions) -> Result<(), String> {
    crate::telemetry::logging::init(&crate::config::LogConfig {
        format: crate::config::LogFormat::Text,
        level: "warn".into(),
    });
    let demo = crate::demo::start(&opts).await.map_err(|e| e.to_string())?;
    println!("{}", demo.walkthrough);
    println!("demo.env: {}", demo.env_file.display());
    wait_for_signals(&demo.server).await?;
    demo.server.shutdown().await;
    Ok(())
}
