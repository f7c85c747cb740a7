//! Log setup: tracing with a text or JSON format. Tokens and secrets are
//! never passed to a log macro anywhere in the crate.

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber once; later calls are no-ops (tests and
/// reloads may call it again).
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("PORTCULLIS_LOG")
        .ok()
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"))
        // Clients that send an IP address as SNI (wrk, curl to an IP) make
        // rustls warn once per connection; any client could flood the log.
        .add_directive("rustls=error".parse().unwrap_or_default());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
