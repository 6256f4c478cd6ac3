//! The `tandem` binary's log output, on stderr: text for people (colours
//! only when stderr is a terminal, so a file or a pipe gets plain lines) or
//! one JSON object per line for log collectors. The level comes from
//! `RUST_LOG` (default `info`). Every line is written through
//! [`ScrubbedStderr`]: the process's secrets never reach it, at any level,
//! whichever library wrote the line.

use std::io::IsTerminal;

use std::sync::Arc;

use tracing_subscriber::EnvFilter;

use crate::redact::{ScrubbedStderr, Secrets};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-24T19:14:43.879Z  INFO tandem: message key=value`.
    #[default]
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":…,…},"target":…}`.
    Json,
}

/// Installs the global subscriber. Call once, first thing (inside the
/// Tokio runtime when `otlp` is given). With `otlp`, the coordinator's
/// spans are exported too (see [`crate::otel`]); keep the returned guard
/// until the end of `main` so that queued spans are flushed. `secrets`
/// are scrubbed from every line.
///
/// # Errors
///
/// The OTLP endpoint is not usable.
pub fn init(
    format: LogFormat,
    otlp: Option<&crate::otel::OtlpConfig>,
    secrets: Arc<Secrets>,
) -> Result<Option<crate::otel::OtelGuard>, String> {
    let stderr = ScrubbedStderr(secrets);
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,sled=warn"));
    let Some(otlp) = otlp else {
        init_logs(format, filter, stderr);
        return Ok(None);
    };
    use tracing_subscriber::prelude::*;
    let provider = crate::otel::provider(otlp)?;
    let (otel, guard) = crate::otel::layer(provider);
    // Tandem's own spans, at every level, whatever the log filter says,
    // sampled before they are built.
    let spans = crate::otel::sampling::filter(otlp.sample_ratio);
    // Only the log lines read `log` records (the span layer takes spans
    // alone), so the `log` crate's level is theirs, not the span layer's
    // "every level": else every debug and trace record of sled and
    // hyper would be built and then dropped (measured: ~1 % of the
    // coordinator's CPU under load).
    let log_max =
        tracing_subscriber::Layer::<tracing_subscriber::Registry>::max_level_hint(&filter);
    let logs = tracing_subscriber::fmt::layer().with_writer(stderr);
    let logs = match format {
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => logs.json().with_ansi(false).with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(otel.with_filter(spans))
        .init();
    if let Some(max) = log_max {
        log::set_max_level(log_level(max));
    }
    Ok(Some(guard))
}

fn log_level(max: tracing::level_filters::LevelFilter) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match max {
        LevelFilter::OFF => log::LevelFilter::Off,
        LevelFilter::ERROR => log::LevelFilter::Error,
        LevelFilter::WARN => log::LevelFilter::Warn,
        LevelFilter::INFO => log::LevelFilter::Info,
        LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

fn init_logs(format: LogFormat, filter: EnvFilter, stderr: ScrubbedStderr) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
