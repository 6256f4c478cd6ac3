//! One coordinator instance: its incarnation's log, its coordinator, its
//! own skewed clock, its link to the participants, and the background work
//! `tandem serve` starts (recovery, retention, the takeover sweep, lease
//! renewal). An instance is killed and restarted under the same name (a
//! new incarnation), and paused: its store calls and participant calls
//! wait, and requests to it are not answered, until it resumes.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tandem_coordinator::Coordinator;
use tandem_coordinator::config::{CoordinatorConfig, RetryPolicy};
use tandem_coordinator::runtime::{Clock, Environment};
use tandem_coordinator::wake::Flag;
use tokio::task::JoinHandle;

use crate::net::{Link, SimNet};
use crate::store::{InstanceLog, Store};

/// How long a lease lasts on the shared store.
pub const LEASE: Duration = Duration::from_secs(3);
/// Finished records are removed this long after they finished (the
/// shortest the coordinator accepts).
pub const RETENTION: Duration = tandem_coordinator::config::MIN_RETENTION;

/// What an instance is made of, fixed for the seed.
#[derive(Clone)]
pub struct Setup {
    pub name: String,
    pub address: String,
    /// Its clock's lead (or lag) over true time, ms.
    pub skew_ms: i64,
    /// Recovery slots: few make recovery overlap new traffic for long.
    pub recovery_concurrency: usize,
    /// Phase-2 retries give up (STUCK) after this long, if set.
    pub retry_budget: Option<Duration>,
    /// How long decision tombstones are kept (as short as retention in
    /// some seeds: they expire during the run).
    pub decision_retention: Duration,
}

/// A running incarnation.
pub struct Instance {
    pub setup: Setup,
    pub coord: Coordinator,
    pub log: InstanceLog,
    pub clock: Clock,
    /// Set while the process is paused.
    pub paused: Arc<Flag>,
    tasks: Vec<JoinHandle<()>>,
}

/// The true time every clock is skewed from: ms since the Unix epoch.
pub const EPOCH_MS: u64 = 1_800_000_000_000;

fn config(setup: &Setup) -> CoordinatorConfig {
    CoordinatorConfig {
        recovery_concurrency: setup.recovery_concurrency,
        call_timeout: Duration::from_secs(1),
        default_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            max_attempts: None,
            max_duration: setup.retry_budget,
        },
        retention: RETENTION,
        decision_retention: Some(setup.decision_retention),
        takeover_every: LEASE / 4,
        ..CoordinatorConfig::default()
    }
}

impl Instance {
    /// Starts a new incarnation of `setup` as `tandem serve` does: opens
    /// its log (on a shared store this claims its name's earlier
    /// incarnations' rows), recovers, and starts retention, the takeover
    /// sweep and lease renewal. `issued` numbers the gtids of the whole
    /// seed, so instances never make the same one.
    pub async fn start(
        setup: Setup,
        store: &Store,
        net: &Arc<SimNet>,
        issued: &Arc<AtomicU64>,
    ) -> Instance {
        let log = store.open(&setup.name, &setup.address);
        let clock = Clock::Tokio {
            base_ms: EPOCH_MS.saturating_add_signed(setup.skew_ms),
            start: start_instant(),
            issued: issued.clone(),
        };
        let paused = Arc::new(Flag::default());
        let env = Environment {
            transport: Some(Arc::new(Link {
                net: net.clone(),
                paused: paused.clone(),
            })),
            clock: clock.clone(),
            ..Environment::default()
        };
        let coord =
            Coordinator::with_environment(config(&setup), log.txn_log(), env).expect("config");
        let mut tasks = Vec::new();
        if let Some(renewer) = log.spawn_renewer(LEASE) {
            tasks.push(renewer);
        }
        // Recovery takes stock of the log and forces it before the
        // coordinator is served, then works beside new traffic. (A failed
        // force halts it; the supervisor restarts it.)
        let _ = coord.start_recovery().await;
        tasks.push(coord.start_retention());
        if store.shared() {
            tasks.push(coord.start_takeover(LEASE / 4));
        }
        Instance {
            setup,
            coord,
            log,
            clock,
            paused,
            tasks,
        }
    }

    /// The process dies: only what its store holds survives.
    pub fn kill(&self) {
        self.coord.kill();
        self.log.crash();
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Pauses (or resumes) the process.
    pub fn set_paused(&self, paused: bool) {
        self.log.set_paused(paused);
        self.paused.store(paused);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.is_set()
    }
}

thread_local! {
    static START: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// The tokio instant true time counts from, for this seed (each seed runs
/// on its own thread's runtime; `reset_start` is called first).
pub fn start_instant() -> tokio::time::Instant {
    START.with(|s| s.get()).expect("seed started")
}

/// Marks the start of a seed.
pub fn reset_start() {
    START.with(|s| s.set(Some(tokio::time::Instant::now())));
}

/// True time, ms since the Unix epoch (the store's clock).
pub fn true_ms() -> u64 {
    EPOCH_MS + start_instant().elapsed().as_millis() as u64
}
