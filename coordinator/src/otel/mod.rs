//! OpenTelemetry export (`tandem serve --otlp-endpoint URL`): the
//! coordinator's spans (requests, and each participant call as the child of
//! the transaction's trace) are sent by OTLP/gRPC to a collector (an
//! OpenTelemetry Collector, Jaeger, Tempo). Off unless the endpoint is
//! given: then no layer is installed and nothing is exported.
//!
//! Export is batched in the background; a full queue drops spans rather
//! than slow the protocol, and a failing collector is reported at most once
//! a minute, its endpoint's password hidden (in the endpoint and in the
//! exporter's error, which may quote it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};

use crate::redact::{SecretKind, Secrets, redact};

pub mod sampling;

/// Where and as what to export.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The share of traces exported (by trace id), 0 to 1.
    pub sample_ratio: f64,
}

/// Keeps the exporter running; dropping it flushes what is queued (within
/// the SDK's shutdown timeout) and stops it.
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// The exporter and the tracer provider for `config`. Call inside the
/// Tokio runtime (the gRPC client runs on it).
///
/// # Errors
///
/// The endpoint is not usable.
pub fn provider(config: &OtlpConfig) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| {
            let mut secrets = Secrets::default();
            secrets.add(SecretKind::Connection, &config.endpoint);
            let text = format!("OTLP exporter for {}: {e}", redact(&config.endpoint));
            secrets.scrub(&text).into_owned()
        })?;
    // The layer's filter has sampled already, before building the span
    // (`sampling`): every span that reaches the SDK is kept.
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOn)
        .with_batch_exporter(Quiet::new(exporter, &config.endpoint))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

/// The `tracing` layer exporting spans through `provider`, and the guard
/// that keeps the exporter running. Context activation is off: a span's
/// parent is set from the request's `traceparent` after `#[instrument]`
/// entered it, which an already started OpenTelemetry span would refuse.
pub fn layer<S>(
    provider: SdkTracerProvider,
) -> (
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
    OtelGuard,
)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let tracer = provider.tracer("tandem");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false);
    (layer, OtelGuard(provider))
}

/// An exporter that reports its failures at most once a minute (the SDK
/// itself, built without internal logs, would say nothing).
#[derive(Debug)]
struct Quiet<E> {
    inner: E,
    /// The endpoint, its password hidden.
    endpoint: String,
    /// The endpoint's secrets, hidden in the errors reported.
    secrets: Secrets,
    last_report: Mutex<Option<Instant>>,
}

const REPORT_EVERY: Duration = Duration::from_secs(60);

impl<E> Quiet<E> {
    fn new(inner: E, endpoint: &str) -> Self {
        let mut secrets = Secrets::default();
        secrets.add(SecretKind::Connection, endpoint);
        Quiet {
            inner,
            endpoint: redact(endpoint),
            secrets,
            last_report: Mutex::new(None),
        }
    }

    fn report(&self, error: &dyn std::fmt::Display) {
        let mut last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            *last = Some(Instant::now());
            let error = self.secrets.scrub(&error.to_string()).into_owned();
            tracing::warn!(endpoint = %self.endpoint, %error,
                "OTLP export failed; spans are dropped (reported at most once a minute)");
        }
    }
}

impl<E: SpanExporter> SpanExporter for Quiet<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.report(e);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
