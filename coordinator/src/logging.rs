//! The `tandem` binary's log output, on stderr: text for people (colours
//! only when stderr is a terminal, so a file or a pipe gets plain lines) or
//! one JSON object per line for log collectors. The level comes from
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-24T19:14:43.879Z  INFO tandem: message key=value`.
    #[default]
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":…,…},"target":…}`.
    Json,
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,sled=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
