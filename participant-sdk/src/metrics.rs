//! Prometheus metrics of a participant: how long handlers take, how their
//! calls end, and what the barrier answered in their place (duplicates,
//! empty rollbacks, refused hanging tries).
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client,
//! as the coordinator's metrics are: typed families, OpenMetrics text, no
//! global registry. Labels are low-cardinality only: never a gtid; a
//! resource name is a label for the first [`MAX_RESOURCES`] names seen,
//! `other` after that.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `tandem_participant_handler_seconds` | `resource`, `phase` | time a handler took, for calls that ran it |
//! | `tandem_participant_handler_calls_total` | `resource`, `phase`, `result` | calls by how they ended |
//! | `tandem_participant_barrier_outcomes_total` | `resource`, `outcome` | calls the barrier answered itself |
//!
//! `phase` is the call's name: `prepare`, `commit`, `rollback` (2PC),
//! `try`, `confirm`, `cancel` (TCC and saga steps), `deliver` (a
//! transactional message's delivery) or `check` (its back-check, which
//! does not pass the barrier: `ok` is "committed", `no` "did not
//! commit"). `result` is `ok`, `no` (the handler
//! voted no), `failed` (it returned an error or panicked) when the handler
//! ran; `skipped` (the barrier answered success: a repeat, an empty
//! rollback, a rollback after a no vote), `refused` (the barrier refused:
//! a hanging or repeated try, a stale coordinator, a confirm with no try)
//! or `unavailable` (the barrier store failed) when it did not. `outcome`
//! is `duplicate` (a repeated call answered from the barrier record: a
//! repeated commit / confirm / rollback / cancel / deliver answered success, a
//! repeated prepare / try answered no), `empty_rollback` (a rollback /
//! cancel with no prepare / try recorded: nothing to compensate) or
//! `hanging_try_refused` (a prepare / try arriving after its branch was
//! rolled back / cancelled, refused).
//!
//! Calls that in-doubt resolution makes (a branch finishing itself on the
//! coordinator's answer) are counted like the coordinator's. Calls for a
//! resource with no handler are not counted (they never reach a handler or
//! the barrier).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::barrier::gate::Passage;
use crate::handler::{BoxFuture, HandlerError, Vote};

/// Distinct resource names used as label values; later ones are `other`.
pub const MAX_RESOURCES: usize = 64;

/// The prefix of every metric name.
const PREFIX: &str = "tandem_participant";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    resource: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    resource: String,
    phase: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    resource: String,
    outcome: &'static str,
}

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s, as the coordinator's call latency.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A participant's metrics: give a clone to each
/// [`ParticipantServer::with_metrics`](crate::ParticipantServer::with_metrics),
/// and serve [`encode`](ParticipantMetrics::encode) on your HTTP server, or
/// put the families into your own registry with
/// [`register_into`](ParticipantMetrics::register_into). Cheap to clone:
/// clones share the counters.
///
/// The metric names, labels and values are listed in the [module
/// docs](crate::metrics).
///
/// # Examples
///
/// ```no_run
/// # use tandem_sdk::{BranchContext, HandlerError, ParticipantServer, TwoPhase, Vote};
/// use tandem_sdk::metrics::ParticipantMetrics;
/// # struct Ledger;
/// # impl TwoPhase for Ledger {
/// #   async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> { Ok(Vote::yes()) }
/// #   async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> { Ok(()) }
/// #   async fn rollback(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> { Ok(()) }
/// # }
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let metrics = ParticipantMetrics::new();
/// let participant = ParticipantServer::new()
///     .two_phase("ledger", Ledger)
///     .with_metrics(metrics.clone())
///     .spawn("0.0.0.0:9001".parse()?)
///     .await?;
///
/// // On your HTTP server's `GET /metrics` (axum, hyper, ...): answer
/// // `metrics.encode()` with this content type. The bank-participant
/// // example does it with axum (`--metrics-listen`).
/// let (content_type, body) = (ParticipantMetrics::CONTENT_TYPE, metrics.encode());
///
/// // Or, with a registry of your own, register once and encode that:
/// let mut registry = tandem_sdk::prometheus_client::registry::Registry::default();
/// metrics.register_into(&mut registry);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ParticipantMetrics(Arc<Inner>);

struct Inner {
    /// The families under [`PREFIX`], for [`ParticipantMetrics::encode`].
    registry: Registry,
    handler_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    handler_calls: Family<CallLabels, Counter>,
    barrier_outcomes: Family<OutcomeLabels, Counter>,
    resources: Mutex<HashSet<String>>,
}

impl Default for ParticipantMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ParticipantMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantMetrics").finish_non_exhaustive()
    }
}

impl ParticipantMetrics {
    /// The content type of [`encode`](Self::encode)'s text (OpenMetrics,
    /// which Prometheus asks for by default), for the HTTP answer.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Every family, empty until calls come in.
    pub fn new() -> Self {
        let mut inner = Inner {
            registry: Registry::default(),
            handler_seconds: Family::new_with_constructor(latency),
            handler_calls: Family::default(),
            barrier_outcomes: Family::default(),
            resources: Mutex::new(HashSet::new()),
        };
        let mut registry = Registry::with_prefix(PREFIX);
        inner.register(&mut registry);
        inner.registry = registry;
        ParticipantMetrics(Arc::new(inner))
    }

    /// Everything in the OpenMetrics text format (serve it with
    /// [`CONTENT_TYPE`](Self::CONTENT_TYPE)).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            return format!("# metrics could not be encoded: {e}\n");
        }
        out
    }

    /// Adds these families to `registry` (under the `tandem_participant`
    /// prefix, after the registry's own), for a service that exposes one
    /// registry of its own. They stay shared: calls counted from now on
    /// show in both `registry` and [`encode`](Self::encode). Register once
    /// per registry; a second time would list every family twice.
    pub fn register_into(&self, registry: &mut Registry) {
        self.0.register(registry.sub_registry_with_prefix(PREFIX));
    }

    /// Times `call` (a handler's), then counts it by `result(&outcome)`.
    pub(crate) fn time_handler<'a, T: Send + 'a>(
        &'a self,
        resource: &'a str,
        phase: &'static str,
        call: BoxFuture<'a, Result<T, HandlerError>>,
        result: fn(&Result<T, HandlerError>) -> &'static str,
    ) -> BoxFuture<'a, Result<T, HandlerError>> {
        Box::pin(async move {
            let start = Instant::now();
            let out = call.await;
            self.handled(resource, phase, result(&out), start.elapsed());
            out
        })
    }

    /// A handler call that ended with `result` after `took`.
    fn handled(&self, resource: &str, phase: &'static str, result: &'static str, took: Duration) {
        let resource = self.0.resource_label(resource);
        self.0
            .handler_seconds
            .get_or_create(&PhaseLabels {
                resource: resource.clone(),
                phase,
            })
            .observe(took.as_secs_f64());
        self.0.count_call(resource, phase, result);
    }

    /// How a call went through the barrier. A call that ran its handler is
    /// counted by [`time_handler`](Self::time_handler); any other is
    /// counted here, with the barrier's outcome when it is one of those
    /// watched.
    pub(crate) fn passed(&self, resource: &str, phase: &'static str, passage: Passage) {
        let (result, outcome) = match passage {
            Passage::Ran => return,
            Passage::Duplicate => ("skipped", Some("duplicate")),
            Passage::RepeatedTry => ("refused", Some("duplicate")),
            Passage::EmptyCancel => ("skipped", Some("empty_rollback")),
            Passage::AfterNo => ("skipped", None),
            Passage::HangingTry => ("refused", Some("hanging_try_refused")),
            Passage::Refused => ("refused", None),
            Passage::Unavailable => ("unavailable", None),
        };
        let resource = self.0.resource_label(resource);
        if let Some(outcome) = outcome {
            self.0
                .barrier_outcomes
                .get_or_create(&OutcomeLabels {
                    resource: resource.clone(),
                    outcome,
                })
                .inc();
        }
        self.0.count_call(resource, phase, result);
    }

    /// A call whose task panicked (the handler, most likely).
    pub(crate) fn panicked(&self, resource: &str, phase: &'static str) {
        let resource = self.0.resource_label(resource);
        self.0.count_call(resource, phase, "failed");
    }
}

/// The `result` of a try / prepare handler call.
pub(crate) fn vote_result(out: &Result<Vote, HandlerError>) -> &'static str {
    match out {
        Ok(Vote::Yes { .. }) => "ok",
        Ok(Vote::No { .. }) => "no",
        Err(_) => "failed",
    }
}

/// The `result` of a confirm / cancel (commit / rollback) handler call.
pub(crate) fn ack_result(out: &Result<(), HandlerError>) -> &'static str {
    match out {
        Ok(()) => "ok",
        Err(_) => "failed",
    }
}

impl Inner {
    fn register(&self, r: &mut Registry) {
        r.register(
            "handler_seconds",
            "Time handlers took, by resource and phase (prepare, commit, rollback, try, confirm, cancel, deliver, check); only calls that ran the handler",
            self.handler_seconds.clone(),
        );
        r.register(
            "handler_calls",
            "Calls by resource, phase and result: ok, no, failed (the handler ran); skipped, refused, unavailable (the barrier answered)",
            self.handler_calls.clone(),
        );
        r.register(
            "barrier_outcomes",
            "Calls the barrier answered without the handler, by resource and outcome: duplicate, empty_rollback, hanging_try_refused",
            self.barrier_outcomes.clone(),
        );
    }

    fn count_call(&self, resource: String, phase: &'static str, result: &'static str) {
        self.handler_calls
            .get_or_create(&CallLabels {
                resource,
                phase,
                result,
            })
            .inc();
    }

    fn resource_label(&self, resource: &str) -> String {
        let mut known = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(resource) {
            return resource.to_string();
        }
        if known.len() < MAX_RESOURCES {
            known.insert(resource.to_string());
            return resource.to_string();
        }
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Resource names past the cap share one label value.
    #[test]
    fn resources_past_the_cap_are_other() {
        let m = ParticipantMetrics::new();
        for i in 0..MAX_RESOURCES + 3 {
            m.passed(&format!("r{i}"), "cancel", Passage::EmptyCancel);
        }
        m.passed("r0", "cancel", Passage::EmptyCancel);
        let text = m.encode();
        assert!(text.contains(
            "tandem_participant_barrier_outcomes_total{resource=\"other\",outcome=\"empty_rollback\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "tandem_participant_barrier_outcomes_total{resource=\"r0\",outcome=\"empty_rollback\"} 2\n"
        ), "{text}");
        let r63 = format!("resource=\"r{}\"", MAX_RESOURCES - 1);
        let r64 = format!("resource=\"r{MAX_RESOURCES}\"");
        assert!(text.contains(&r63) && !text.contains(&r64), "{text}");
    }

    // A registry of the user's own lists the same, shared families under
    // its prefix.
    #[test]
    fn families_go_into_a_registry_of_ones_own() {
        let m = ParticipantMetrics::new();
        let mut registry = Registry::with_prefix("shop");
        m.register_into(&mut registry);
        m.passed("ledger", "commit", Passage::Duplicate);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains(
            "shop_tandem_participant_barrier_outcomes_total{resource=\"ledger\",outcome=\"duplicate\"} 1\n"
        ), "{text}");
        assert!(text.contains(
            "shop_tandem_participant_handler_calls_total{resource=\"ledger\",phase=\"commit\",result=\"skipped\"} 1\n"
        ), "{text}");
        assert!(m.encode().contains(
            "tandem_participant_handler_calls_total{resource=\"ledger\",phase=\"commit\",result=\"skipped\"} 1\n"
        ));
    }

    // A timed handler call is observed once and counted by its result.
    #[tokio::test]
    async fn handler_calls_are_timed_and_counted() {
        let m = ParticipantMetrics::new();
        let yes: BoxFuture<'_, Result<Vote, HandlerError>> = Box::pin(async { Ok(Vote::yes()) });
        let no: BoxFuture<'_, Result<Vote, HandlerError>> =
            Box::pin(async { Ok(Vote::no("short")) });
        assert!(matches!(
            m.time_handler("ledger", "prepare", yes, vote_result).await,
            Ok(Vote::Yes { .. })
        ));
        let _ = m.time_handler("ledger", "prepare", no, vote_result).await;
        let text = m.encode();
        assert!(text.contains(
            "tandem_participant_handler_seconds_count{resource=\"ledger\",phase=\"prepare\"} 2\n"
        ), "{text}");
        for result in ["ok", "no"] {
            let line = format!(
                "tandem_participant_handler_calls_total{{resource=\"ledger\",phase=\"prepare\",result=\"{result}\"}} 1\n"
            );
            assert!(text.contains(&line), "{text}");
        }
    }
}
