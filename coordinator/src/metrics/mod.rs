//! Prometheus metrics of a coordinator (`prometheus-client`, the
//! Prometheus project's own Rust client: typed families, OpenMetrics text,
//! no global registry), served at `/metrics` on the admin listener.
//!
//! Labels are low-cardinality only: never a gtid; a participant's resource
//! name is a label for the first [`MAX_RESOURCES`] names seen, `other`
//! after that (a client may name any resource). Counters and histograms
//! are recorded only when metrics are on (`--admin-listen`); gauges are
//! read at scrape time from the runtime's head count
//! ([`Coordinator::census`]) and the log's counters.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{Mode, TxState};
use crate::runtime::Coordinator;

/// Distinct resource names used as label values; later ones are `other`.
pub const MAX_RESOURCES: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    mode: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    resource: String,
    phase: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

type Gauge64 = Gauge<f64, std::sync::atomic::AtomicU64>;

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    started: Family<ModeLabel, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    retries: Counter,
    decision_force: Histogram,
    force: Histogram,
    resources: Mutex<HashSet<String>>,
    // Read at scrape time.
    live: Gauge,
    in_doubt: Gauge,
    stuck: Gauge,
    oldest_live: Gauge64,
    oldest_in_doubt: Gauge64,
    oldest_stuck: Gauge64,
    forces: Counter,
    flushes: Counter,
    purged: Counter,
    recovery_backlog: Gauge,
    halted: Gauge,
    draining: Gauge,
    alerts_dropped: Counter,
    takeovers: Counter,
    lease_renewals: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Phase names as participants know them.
pub fn phase_name(mode: Mode, phase_one: bool, commit: bool) -> &'static str {
    match (mode, phase_one, commit) {
        (Mode::TwoPhase, true, _) => "prepare",
        (Mode::Tcc | Mode::Saga, true, _) => "try",
        (Mode::TwoPhase, false, true) => "commit",
        (Mode::TwoPhase, false, false) => "rollback",
        (Mode::Tcc | Mode::Saga, false, true) => "confirm",
        (Mode::Tcc | Mode::Saga, false, false) => "cancel",
        (Mode::Msg, true, _) => "check",
        (Mode::Msg, false, true) => "deliver",
        (Mode::Msg, false, false) => "drop",
    }
}

impl Metrics {
    /// Every family registered, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem");
        let m = Metrics {
            started: Family::default(),
            finished: Family::default(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(latency),
            retries: Counter::default(),
            decision_force: latency(),
            force: latency(),
            resources: Mutex::new(HashSet::new()),
            live: Gauge::default(),
            in_doubt: Gauge::default(),
            stuck: Gauge::default(),
            oldest_live: Gauge64::default(),
            oldest_in_doubt: Gauge64::default(),
            oldest_stuck: Gauge64::default(),
            forces: Counter::default(),
            flushes: Counter::default(),
            purged: Counter::default(),
            recovery_backlog: Gauge::default(),
            halted: Gauge::default(),
            draining: Gauge::default(),
            alerts_dropped: Counter::default(),
            takeovers: Counter::default(),
            lease_renewals: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "transactions_started",
            "Transactions started, by mode",
            m.started.clone(),
        );
        r.register(
            "transactions_finished",
            "Transactions that reached an outcome here: committed, aborted, or stuck (retry policy exhausted)",
            m.finished.clone(),
        );
        r.register(
            "participant_calls",
            "Calls to participants by resource, phase (prepare, try, commit, confirm, rollback, cancel) and result",
            m.calls.clone(),
        );
        r.register(
            "participant_call_seconds",
            "Latency of participant calls by phase (phase 1: prepare / try; phase 2: the rest)",
            m.call_seconds.clone(),
        );
        r.register(
            "phase_two_retries",
            "Phase-2 calls scheduled again after a failure",
            m.retries.clone(),
        );
        r.register(
            "decision_force_seconds",
            "Time to make a decision durable (group-committed force)",
            m.decision_force.clone(),
        );
        r.register(
            "log_force_seconds",
            "Time of forces other than decisions (an enlisted branch)",
            m.force.clone(),
        );
        r.register(
            "transactions_live",
            "Transactions held in memory by this instance (not terminal, not STUCK)",
            m.live.clone(),
        );
        r.register(
            "transactions_in_doubt",
            "Live transactions decided but not finished (COMMITTING / ABORTING): participants hold their work",
            m.in_doubt.clone(),
        );
        r.register(
            "transactions_stuck",
            "STUCK transactions in the log: an operator must act (tandem tx retry / resolve)",
            m.stuck.clone(),
        );
        r.register(
            "oldest_live_age_seconds",
            "Age of the oldest live transaction (0 when none)",
            m.oldest_live.clone(),
        );
        r.register(
            "oldest_in_doubt_age_seconds",
            "Age of the oldest transaction in doubt (0 when none)",
            m.oldest_in_doubt.clone(),
        );
        r.register(
            "oldest_stuck_age_seconds",
            "Age of the oldest STUCK transaction (0 when none)",
            m.oldest_stuck.clone(),
        );
        r.register(
            "log_forces",
            "Forced log writes requested; forces / flushes is the group-commit batch",
            m.forces.clone(),
        );
        r.register(
            "log_flushes",
            "Physical flushes (fdatasync, or store commits) that served the forces",
            m.flushes.clone(),
        );
        r.register(
            "log_purged",
            "Finished records removed by retention",
            m.purged.clone(),
        );
        r.register(
            "recovery_backlog",
            "Unfinished transactions found at start (or claimed) not yet driven",
            m.recovery_backlog.clone(),
        );
        r.register(
            "halted",
            "1 once a log failure stopped this instance deciding",
            m.halted.clone(),
        );
        r.register("draining", "1 while shutting down", m.draining.clone());
        r.register(
            "alerts_dropped",
            "Alerts dropped because the webhook queue was full",
            m.alerts_dropped.clone(),
        );
        r.register(
            "takeovers",
            "Transactions of other instances taken over on a shared store (expired leases)",
            m.takeovers.clone(),
        );
        r.register(
            "lease_renewals",
            "Lease renewals of this instance on a shared store, by result (ok, failed)",
            m.lease_renewals.clone(),
        );
        // Known series at zero from the start, so that rate() and alert
        // rules see them before the first transaction.
        for mode in [Mode::TwoPhase, Mode::Tcc, Mode::Saga, Mode::Msg] {
            let _ = m.started.get_or_create(&ModeLabel { mode: mode.label() });
            for outcome in ["committed", "aborted", "stuck"] {
                let _ = m.finished.get_or_create(&OutcomeLabels {
                    mode: mode.label(),
                    outcome,
                });
            }
        }
        for phase in ["phase_one", "phase_two"] {
            let _ = m.call_seconds.get_or_create(&PhaseLabel { phase });
        }
        Metrics { registry, ..m }
    }

    /// A transaction started.
    pub fn started(&self, mode: Mode) {
        self.started
            .get_or_create(&ModeLabel { mode: mode.label() })
            .inc();
    }

    /// A transaction reached `state` (COMMITTED, ABORTED or STUCK).
    pub fn finished(&self, mode: Mode, state: TxState) {
        let outcome = match state {
            TxState::Committed => "committed",
            TxState::Aborted => "aborted",
            TxState::Stuck => "stuck",
            _ => return,
        };
        self.finished
            .get_or_create(&OutcomeLabels {
                mode: mode.label(),
                outcome,
            })
            .inc();
    }

    /// One participant call and how it went (`yes`, `no`, `ok`, `failed`,
    /// `not_run`, `refused`).
    pub fn call(&self, resource: &str, phase: &'static str, result: &'static str, took: Duration) {
        let resource = self.resource_label(resource);
        self.calls
            .get_or_create(&CallLabels {
                resource,
                phase,
                result,
            })
            .inc();
        let group = if matches!(phase, "prepare" | "try" | "check") {
            "phase_one"
        } else {
            "phase_two"
        };
        self.call_seconds
            .get_or_create(&PhaseLabel { phase: group })
            .observe(took.as_secs_f64());
    }

    /// A phase-2 call scheduled again.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// A decision made durable in `took`.
    pub fn decision_forced(&self, took: Duration) {
        self.decision_force.observe(took.as_secs_f64());
    }

    /// Another force made in `took`.
    pub fn forced(&self, took: Duration) {
        self.force.observe(took.as_secs_f64());
    }

    /// Transactions taken over from other instances.
    pub fn took_over(&self, n: usize) {
        self.takeovers.inc_by(n as u64);
    }

    fn resource_label(&self, resource: &str) -> String {
        // prometheus-client writes label values as given: a client-chosen
        // name must be escaped here, or a quote or newline in it breaks the
        // exposition (and lets a client write samples of its own).
        let resource = escape_label_value(resource);
        let mut known = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(&resource) {
            return resource;
        }
        if known.len() < MAX_RESOURCES {
            known.insert(resource.clone());
            return resource;
        }
        "other".to_string()
    }

    /// Everything in the Prometheus text format, gauges read now.
    pub fn render(&self, coord: &Coordinator) -> String {
        let now = crate::model::now_ms();
        let age = |o: Option<crate::runtime::Oldest>| {
            o.map_or(0.0, |o| now.saturating_sub(o.created_ms) as f64 / 1000.0)
        };
        if let Ok(c) = coord.census() {
            self.live.set(c.live as i64);
            self.in_doubt.set(c.in_doubt as i64);
            self.stuck.set(c.stuck as i64);
            self.oldest_live.set(age(c.oldest_live));
            self.oldest_in_doubt.set(age(c.oldest_in_doubt));
            self.oldest_stuck.set(age(c.oldest_stuck));
        }
        let stats = coord.log_stats();
        catch_up(&self.forces, stats.forces);
        catch_up(&self.flushes, stats.flushes);
        catch_up(&self.purged, coord.purged());
        catch_up(&self.alerts_dropped, coord.alerts_dropped());
        for (result, total) in [
            ("ok", stats.lease_renewals),
            ("failed", stats.lease_renewal_failures),
        ] {
            if total > 0 {
                catch_up(
                    &self.lease_renewals.get_or_create(&ResultLabel { result }),
                    total,
                );
            }
        }
        self.recovery_backlog.set(coord.recovery_backlog() as i64);
        self.halted.set(i64::from(coord.is_halted()));
        self.draining.set(i64::from(coord.is_draining()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            return format!("# metrics could not be encoded: {e}\n");
        }
        out
    }
}

/// A label value as the text format needs it: `\\`, `\"` and `\n`
/// escaped; other control characters (which no escape covers) replaced.
fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Moves a counter mirrored from elsewhere up to `total`.
fn catch_up(counter: &Counter, total: u64) {
    let have = counter.get();
    if total > have {
        counter.inc_by(total - have);
    }
}

/// The coordinator's metrics in the Prometheus text format; a comment
/// saying so when metrics are off.
pub fn render(coord: &Coordinator) -> String {
    match coord.metrics() {
        Some(m) => m.render(coord),
        None => "# metrics are off\n".to_string(),
    }
}
