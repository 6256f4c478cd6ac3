//! Head sampling before any span is built. With `--otlp-sample-ratio R < 1`
//! the OpenTelemetry layer's filter decides each span's fate when the span
//! is created, from the trace it belongs to, so a trace that is not kept
//! costs no OpenTelemetry work at all (no span builder, no attributes, no
//! timestamps, no sampler at the end): the span is disabled for that layer,
//! and unless the log filter wants it too, disabled altogether.
//!
//! Which trace a span belongs to is known before the span exists:
//!
//! - a request's spans: the request's `traceparent` (a [`TraceScopeLayer`]
//!   in front of the services scopes every poll of the request to it), or,
//!   without one, a fresh random trace id, so that all of one request's
//!   spans share one decision;
//! - a participant call's span: the transaction's trace, given by
//!   [`in_trace`] around the span's creation.
//!
//! The decision is the OpenTelemetry SDK's `TraceIdRatioBased` (the lower
//! 64 bits of the trace id against the ratio), so services sampling by the
//! same ratio keep the same traces whole, and the exporter's own sampler is
//! then `AlwaysOn`: one decision, made once. A span created outside any
//! scope (a timer's call without a trace) follows its enabled parent, or is
//! a root decided by a fresh random draw at the same ratio.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tandem_trace::{TraceContext, TraceParent};
use tower::{Layer, Service};
use tracing::subscriber::Interest;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::registry::LookupSpan;

thread_local! {
    /// The trace of the spans this thread creates now (lower 64 bits of its
    /// id), set by [`in_trace`] and [`TraceScope`].
    static CURRENT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Whether a sampling filter that drops some traces is installed (the
/// scopes cost nothing when not). Only ever set: a process installs its
/// subscriber once.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The installed filter's [`bound`], when [`ACTIVE`].
static BOUND: AtomicU64 = AtomicU64::new(u64::MAX);

/// `TraceIdRatioBased`'s bound for `ratio`: a trace whose lower 64 bits,
/// shifted right once, fall below it is kept.
fn bound(ratio: f64) -> u64 {
    (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
}

fn low_bits(trace_id: &[u8; 16]) -> u64 {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    u64::from_be_bytes(low)
}

/// Whether the trace with these lower 64 bits is kept under `bound`.
fn kept(low: u64, bound: u64) -> bool {
    (low >> 1) < bound
}

/// The filter for the OpenTelemetry layer: Tandem's own spans (every
/// level, whatever the log filter says), each kept only when its trace is
/// sampled at `ratio`. Installing it turns the scopes on.
pub fn filter<S>(ratio: f64) -> impl Filter<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let keep_all = ratio >= 1.0;
    let bound = bound(ratio);
    if !keep_all {
        BOUND.store(bound, Ordering::Relaxed);
        ACTIVE.store(true, Ordering::Relaxed);
    }
    DynFilterFn::new(move |meta, cx| {
        // Checked here too, not only per callsite: a callsite whose
        // interest another layer made "sometimes" (h2's, under the log
        // filter) reaches this function for every span it makes, and was
        // exported (a `reserve_capacity` span in a trace of its own).
        if !tandem_span(meta) {
            return false;
        }
        if keep_all {
            return true;
        }
        match CURRENT.with(Cell::get) {
            Some(low) => kept(low, bound),
            // Outside any scope: follow an enabled parent, else a root.
            None => cx.lookup_current().is_some() || kept(fresh_low(), bound),
        }
    })
    .with_callsite_filter(move |meta| {
        if !tandem_span(meta) {
            Interest::never()
        } else if keep_all {
            Interest::always()
        } else {
            Interest::sometimes()
        }
    })
}

/// Whether `meta` is one of Tandem's own spans (only those are exported).
fn tandem_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("tandem")
}

fn fresh_low() -> u64 {
    low_bits(&TraceParent::new_root().trace_id)
}

/// Whether the installed filter drops the trace `trace_id` (false when no
/// filter drops anything).
pub fn dropped(trace_id: &[u8; 16]) -> bool {
    ACTIVE.load(Ordering::Relaxed) && !kept(low_bits(trace_id), BOUND.load(Ordering::Relaxed))
}

/// The context to send on a call made inside `span` for the trace
/// `trace`: [`TraceContext::child_in`], with the sampled flag cleared when
/// this coordinator dropped the trace, so that a participant sampling by
/// its parent drops its spans too instead of exporting children of a span
/// nobody exported.
pub fn outgoing(trace: &TraceContext, span: &tracing::Span) -> TraceContext {
    let mut out = trace.child_in(span);
    if dropped(&trace.parent.trace_id) {
        out.parent.flags &= !TraceParent::SAMPLED;
    }
    out
}

/// Runs `f` (which creates spans) as part of the trace `trace_id`; `None`
/// leaves the decision to the filter's fallback.
pub fn in_trace<R>(trace_id: Option<&[u8; 16]>, f: impl FnOnce() -> R) -> R {
    if !ACTIVE.load(Ordering::Relaxed) {
        return f();
    }
    let _scope = Scoped::enter(trace_id.map(low_bits));
    f()
}

/// Restores the thread's previous scope when dropped.
struct Scoped(Option<u64>);

impl Scoped {
    fn enter(low: Option<u64>) -> Scoped {
        Scoped(CURRENT.with(|c| c.replace(low)))
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Scopes every request to its trace (see the module docs); a no-op
/// unless a sampling filter is installed.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceScopeLayer;

impl<S> Layer<S> for TraceScopeLayer {
    type Service = TraceScope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceScope { inner }
    }
}

/// The service [`TraceScopeLayer`] makes.
#[derive(Clone, Debug)]
pub struct TraceScope<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for TraceScope<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Scope<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !ACTIVE.load(Ordering::Relaxed) {
            return Scope {
                low: None,
                inner: self.inner.call(req),
            };
        }
        let low = req
            .headers()
            .get(tandem_trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)
            .map_or_else(fresh_low, |p| low_bits(&p.trace_id));
        let _scope = Scoped::enter(Some(low));
        Scope {
            low: Some(low),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's future, each poll scoped to its trace.
    pub struct Scope<F> {
        low: Option<u64>,
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for Scope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _scope = this.low.map(|low| Scoped::enter(Some(low)));
        this.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision is the OpenTelemetry SDK's, so a trace kept here is
    /// kept by every service sampling at the same ratio.
    #[test]
    fn decision_matches_trace_id_ratio_based() {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{Sampler, SamplingDecision, ShouldSample as _};
        for ratio in [0.0, 0.01, 0.3, 0.5, 0.99] {
            let sdk = Sampler::TraceIdRatioBased(ratio);
            let mut kept_here = 0;
            for _ in 0..2000 {
                let id = TraceParent::new_root().trace_id;
                let theirs = sdk.should_sample(
                    None,
                    TraceId::from_bytes(id),
                    "x",
                    &SpanKind::Internal,
                    &[],
                    &[],
                );
                let ours = kept(low_bits(&id), bound(ratio));
                assert_eq!(ours, theirs.decision == SamplingDecision::RecordAndSample);
                kept_here += usize::from(ours);
            }
            let share = kept_here as f64 / 2000.0;
            assert!((share - ratio).abs() < 0.05, "ratio {ratio}: kept {share}");
        }
    }

    /// A span of a trace the ratio drops is never created for the
    /// OpenTelemetry layer (no span built and dropped later), one of a
    /// kept trace is; a request's spans share their trace's fate.
    #[test]
    fn a_dropped_trace_builds_no_span() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::{Layer as _, registry};

        struct Built(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Built {
            fn on_new_span(
                &self,
                _: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let built = Arc::new(AtomicUsize::new(0));
        let subscriber = registry().with(Built(built.clone()).with_filter(filter(0.5)));
        let mut expected = 0;
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..200 {
                let id = TraceParent::new_root().trace_id;
                in_trace(Some(&id), || {
                    let outer = tracing::debug_span!(target: "tandem::test", "request");
                    let _in = outer.enter();
                    let _call = tracing::debug_span!(target: "tandem::test", "call");
                });
                if kept(low_bits(&id), bound(0.5)) {
                    expected += 2;
                }
            }
        });
        assert!(expected > 0 && expected < 400, "{expected}");
        assert_eq!(built.load(Ordering::Relaxed), expected);

        // Another layer wanting every span (so each callsite's interest
        // is "sometimes") does not make a dependency's span exported.
        let all = Arc::new(AtomicUsize::new(0));
        let ours = Arc::new(AtomicUsize::new(0));
        let subscriber = registry()
            .with(Built(ours.clone()).with_filter(filter(1.0)))
            .with(Built(all.clone()).with_filter(DynFilterFn::new(|_, _| true)));
        tracing::subscriber::with_default(subscriber, || {
            let _h2 = tracing::trace_span!(target: "h2::proto::streams", "reserve_capacity");
            let _ours = tracing::trace_span!(target: "tandem::test", "request");
        });
        assert_eq!(all.load(Ordering::Relaxed), 2);
        assert_eq!(ours.load(Ordering::Relaxed), 1, "only Tandem's span");

        // What goes to participants says whether this trace was kept.
        for _ in 0..100 {
            let trace = TraceContext::from(TraceParent::new_root());
            let sent = outgoing(&trace, &tracing::Span::none());
            let kept_here = kept(low_bits(&trace.parent.trace_id), bound(0.5));
            assert_eq!(sent.parent.sampled(), kept_here);
            assert_eq!(sent.parent.trace_id, trace.parent.trace_id);
        }
    }
}
