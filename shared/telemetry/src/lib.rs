//! Logging, and the process's metrics ([`metrics`]).
//!
//! Logging: `tracing` with an env filter (`RUST_LOG`, default `info`), human
//! text on a terminal, JSON lines when `PRODSYS_LOG_FORMAT=json`.

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("PRODSYS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
