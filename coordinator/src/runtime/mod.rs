//! The runtime around the engine: it turns client requests into engine
//! events, writes and forces the log, calls participants with deadlines,
//! runs retry and deadline timers, and keeps the table of live transactions.
//!
//! **Transactions are driven by the coordinator, never by a request.** Every
//! piece of protocol work (a phase-1 call and what follows it, the force of
//! a decision, a round of phase-2 calls, a retry, a deadline) runs in a task
//! the coordinator spawns and tracks. A request handler feeds its event to
//! the engine, starts that task and awaits its result; a client that cancels
//! (deadline, disconnect) drops only the wait.
//!
//! Each transaction's [`Txn`] sits behind its own mutex, held only while the
//! engine handles an event and the resulting record is written to the log.
//! Writing under that lock keeps the log's versions of a record in the same
//! order as the engine's states. Calls and timers run outside it. Readers
//! (`GetTransaction`, `GetOutcome`, Admin, repeated requests) see
//! [`Txn::visible_record`]: a forced decision only once it is durable.
//!
//! - `mod.rs`: [`Coordinator`], the live-transaction table and its entries;
//! - `requests`: the request API (begin, enlist, commit, submit, …);
//! - `starts`: idempotent starts (a client-chosen gtid repeats safely);
//! - `validate`: limits checked at the edge;
//! - `driver`: carries out engine commands in tracked tasks and feeds
//!   results back as events;
//! - `recovery`: taking over the transactions found in the log at start;
//! - `readiness`: whether new work should come here (health checks);
//! - `retention`: removing finished records after the retention period;
//! - `transport` / `participants`: how participants are called;
//! - `clock`: time and new gtids (the wall clock, or tokio's for simulation).

mod census;
mod clock;
mod clock_offset;
mod driver;
mod listing;
mod messages;
mod operator;
mod participants;
mod presumed;
mod readiness;
mod recovery;
mod requests;
mod retention;
mod routing;
mod starts;
mod takeover;
mod transport;
mod validate;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use census::{CENSUS_TTL, Census, Oldest, STUCK_COUNT_MAX};
pub use clock::Clock;
pub use listing::{ListPage, ListQuery, SCAN_BUDGET};
use participants::ParticipantPool;
pub(crate) use participants::{endpoint_parts, validate_endpoint};
pub use readiness::Readiness;
pub use recovery::{RECOVERY_CONCURRENCY, RecoveryReport};
pub use requests::{RollbackOutcome, SubmitOutcome};
pub use transport::{CallError, CallFuture, Failure, Transport};

use crate::config::CoordinatorConfig;
use crate::engine::{Command, EngineError, Event, Txn};
use crate::error::CoordError;
use crate::log::{LogError, LogStats, TxnLog};
use crate::model::Gtid;

/// A handle to the coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// What the runtime talks to besides the log: participants and the clock.
/// [`Environment::default`] is the production one (gRPC, wall clock).
#[derive(Clone, Default)]
pub struct Environment {
    /// How participants are called; `None` for gRPC channels.
    pub transport: Option<Arc<dyn Transport>>,
    /// Time and gtids.
    pub clock: Clock,
    /// TLS and token of gRPC calls to participants.
    pub participants: crate::security::ParticipantAccess,
    /// Where STUCK transactions and failing branches are reported; `None`:
    /// nowhere.
    pub alerts: Option<crate::alerts::AlertSettings>,
    /// Counters and histograms are recorded here; `None`: metrics off.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

struct Inner {
    log: Arc<dyn TxnLog>,
    config: CoordinatorConfig,
    /// Set on shutdown: no new transactions.
    draining: AtomicBool,
    /// Records removed by retention.
    purged: AtomicU64,
    /// The last head count and when it was made.
    census: Mutex<Option<(std::time::Instant, Census)>>,
    live: Mutex<HashMap<Gtid, Arc<Entry>>>,
    /// Unfinished transactions found in the log at start and not taken over
    /// yet; whoever takes one over removes it under the live-table lock.
    recovering: Mutex<BTreeSet<Gtid>>,
    /// Of those, the ones whose claim could not read the record: retried
    /// with backoff until they are taken over (or the log halts).
    reclaims: Mutex<recovery::Reclaims>,
    /// Starts of client-chosen gtids, serialised per gtid (by stripe), so
    /// the idempotency check can read the log without the live-table lock.
    start_locks: starts::StartLocks,
    pool: Arc<ParticipantPool>,
    transport: Arc<dyn Transport>,
    clock: Clock,
    /// When this incarnation started, on `clock` (ms).
    started_ms: u64,
    /// Set once a log write or force failed: from then on nothing is decided.
    halted: OnceLock<String>,
    /// Every task the runtime spawns (rounds of calls, timers, recovery).
    tasks: TaskTracker,
    /// Cancelled on shutdown: sleeping timers end (recovery picks up what
    /// they were waiting for at the next start); rounds of calls finish.
    timers_stop: CancellationToken,
    /// Cancelled by [`Coordinator::kill`]: every task ends at its next await.
    killed: CancellationToken,
    /// Cancelled when the log fails (`halt`): wakes every waiting request.
    halted_token: CancellationToken,
    /// Reports STUCK transactions and failing branches to the webhook.
    alerter: Option<crate::alerts::Alerter>,
    /// Where counters and histograms go (metrics on).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Stops the alert delivery task (after the rounds, on shutdown).
    alerts_stop: CancellationToken,
    alerts_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Recovering, halted, draining: published for health checks.
    readiness: watch::Sender<Readiness>,
}

/// One live transaction.
struct Entry {
    txn: Mutex<Txn>,
    deadline_timer: Mutex<Option<AbortHandle>>,
    /// Bumped after every engine step, so requests can wait for a state.
    changed: crate::wake::Changes,
    /// Set (and `changed` bumped) when this entry is dropped from the live
    /// table: a request waiting on it is answered, not left waiting.
    dropped: AtomicBool,
}

/// The participant token is sent with every call to a participant, and
/// every participant obeys it: without an allowlist a client could name an
/// endpoint of its own and collect it.
fn token_needs_allowlist(
    config: &CoordinatorConfig,
    access: &crate::security::ParticipantAccess,
) -> Result<(), String> {
    if access.token.is_set() && config.allowed_endpoints.is_empty() {
        return Err(
            "a participant token needs an allowlist of participants (--allow-participant): \
             without one it would be sent to any endpoint a client names"
                .into(),
        );
    }
    Ok(())
}

impl Coordinator {
    /// A coordinator over `log`, calling participants over gRPC. Call
    /// [`Coordinator::start_recovery`] before serving.
    ///
    /// # Errors
    ///
    /// [`CoordError::InvalidArgument`] when `config` does not validate.
    pub fn new(config: CoordinatorConfig, log: Arc<dyn TxnLog>) -> Result<Self, CoordError> {
        Self::with_environment(config, log, Environment::default())
    }

    /// A coordinator over `log` in `env` (the simulation's participants and
    /// clock, for instance).
    ///
    /// # Errors
    ///
    /// [`CoordError::InvalidArgument`] when `config` does not validate, or
    /// a participant token is given without an allowlist of participants.
    pub fn with_environment(
        config: CoordinatorConfig,
        log: Arc<dyn TxnLog>,
        env: Environment,
    ) -> Result<Self, CoordError> {
        config
            .validate()
            .map_err(|e| CoordError::InvalidArgument(e.to_string()))?;
        token_needs_allowlist(&config, &env.participants).map_err(CoordError::InvalidArgument)?;
        let pool =
            Arc::new(ParticipantPool::new(&env.participants).map_err(CoordError::InvalidArgument)?);
        let transport = env.transport.unwrap_or_else(|| pool.clone());
        let alerts_stop = CancellationToken::new();
        let (alerter, alerts_task) = match env.alerts {
            Some(settings) => {
                let (a, t) = crate::alerts::Alerter::start(settings, alerts_stop.clone())
                    .map_err(|e| CoordError::InvalidArgument(e.to_string()))?;
                (Some(a), Some(t))
            }
            None => (None, None),
        };
        Ok(Coordinator {
            inner: Arc::new(Inner {
                log,
                config,
                live: Mutex::new(HashMap::new()),
                recovering: Mutex::new(BTreeSet::new()),
                reclaims: Mutex::new(recovery::Reclaims::default()),
                start_locks: starts::StartLocks::default(),
                pool,
                transport,
                started_ms: env.clock.now_ms(),
                clock: env.clock,
                halted: OnceLock::new(),
                draining: AtomicBool::new(false),
                purged: AtomicU64::new(0),
                census: Mutex::new(None),
                tasks: TaskTracker::new(),
                timers_stop: CancellationToken::new(),
                killed: CancellationToken::new(),
                halted_token: CancellationToken::new(),
                alerter,
                metrics: env.metrics,
                alerts_stop,
                alerts_task: Mutex::new(alerts_task),
                readiness: watch::Sender::new(Readiness::STARTING),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// Log counters (forces, flushes).
    pub fn log_stats(&self) -> LogStats {
        self.inner.log.stats()
    }

    /// Transactions currently held in memory (not yet terminal).
    pub fn live_count(&self) -> usize {
        self.inner.live_table().len()
    }

    /// Tasks of this coordinator still running (rounds of calls, timers,
    /// recovery). Zero once every transaction is finished and nothing is
    /// scheduled: nothing leaks.
    pub fn task_count(&self) -> usize {
        self.inner.tasks.len()
    }

    /// gRPC channels to participants held now (bounded; idle ones are
    /// closed).
    pub fn participant_channels(&self) -> usize {
        self.inner.pool.len()
    }

    /// Unfinished transactions found at start and not taken over yet.
    pub fn recovery_backlog(&self) -> usize {
        self.inner.recovering_set().len()
    }

    /// Its metrics, when on.
    pub fn metrics(&self) -> Option<&crate::metrics::Metrics> {
        self.inner.metrics.as_deref()
    }

    /// Alerts dropped because the webhook's queue was full.
    pub fn alerts_dropped(&self) -> u64 {
        self.inner.alerter.as_ref().map_or(0, |a| a.dropped())
    }

    /// Whether the coordinator stopped deciding after a log failure.
    pub fn is_halted(&self) -> bool {
        self.inner.halted.get().is_some()
    }

    /// Whether it stopped taking new transactions (shutting down).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Calls participants as `access` says from now on (certificates and
    /// token re-read after a change); calls in flight keep their channels.
    ///
    /// # Errors
    ///
    /// The TLS files cannot be used, or a token is given without an
    /// allowlist of participants; nothing changes then.
    pub fn set_participant_access(
        &self,
        access: &crate::security::ParticipantAccess,
    ) -> Result<(), String> {
        token_needs_allowlist(&self.inner.config, access)?;
        self.inner.pool.set_access(access)
    }

    /// Stops taking new transactions (`begin` and `submit` answer
    /// UNAVAILABLE); work in flight continues. Used on shutdown.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.set_readiness(|r| r.draining = true);
    }

    /// Graceful stop after [`Coordinator::drain`]: sleeping timers end (the
    /// next start recovers what they waited for) and rounds of calls in
    /// flight get up to `grace` to finish, so their decisions reach the log.
    pub async fn finish(&self, grace: Duration) {
        self.inner.timers_stop.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.inner.tasks.len(),
                "shutdown: rounds still in flight after the grace period; recovery finishes them"
            );
        }
        self.stop_alerts().await;
    }

    /// Ends the alert delivery task (alerts still queued are not sent).
    async fn stop_alerts(&self) {
        self.inner.alerts_stop.cancel();
        let task = self
            .inner
            .alerts_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Stops this coordinator at once, as a crash would: every task ends at
    /// its next await and every request answers UNAVAILABLE. What the log
    /// made durable is all a successor sees. For simulations and tests.
    pub fn kill(&self) {
        let _ = self.inner.halted.set("the coordinator was stopped".into());
        self.inner.halted_token.cancel();
        self.inner.set_readiness(|r| r.halted = true);
        self.inner.killed.cancel();
        self.inner.timers_stop.cancel();
        self.inner.alerts_stop.cancel();
    }
}

impl Entry {
    /// Its transaction's id.
    fn gtid(&self) -> Gtid {
        self.lock().record().gtid
    }

    fn new(txn: Txn) -> Arc<Entry> {
        Arc::new(Entry {
            txn: Mutex::new(txn),
            deadline_timer: Mutex::new(None),
            changed: crate::wake::Changes::default(),
            dropped: AtomicBool::new(false),
        })
    }

    /// Marks the entry dropped from the live table and wakes its waiters.
    fn drop_here(&self) {
        self.dropped.store(true, Ordering::SeqCst);
        self.changed.bump();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Txn> {
        // The engine never panics mid-update on input; if a bug did, the
        // record written last is still the one on disk.
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn live_table(&self) -> std::sync::MutexGuard<'_, HashMap<Gtid, Arc<Entry>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recovering_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<Gtid>> {
        self.recovering.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_entry(&self, txn: Txn) -> Arc<Entry> {
        Entry::new(txn.with_policy(self.config.retry))
    }

    fn find_live(&self, gtid: &Gtid) -> Option<Arc<Entry>> {
        self.live_table().get(gtid).cloned()
    }

    /// The live entry of `gtid`, taking it over first if it is one of the
    /// transactions found at start and not yet recovered.
    fn live_or_claim(self: &Arc<Self>, gtid: &Gtid) -> Result<Option<Arc<Entry>>, CoordError> {
        let mut live = self.live_table();
        if let Some(e) = live.get(gtid) {
            return Ok(Some(e.clone()));
        }
        self.claim_locked(&mut live, *gtid, None)
    }

    fn forget(&self, gtid: &Gtid) {
        let removed = self.live_table().remove(gtid);
        if let Some(entry) = removed {
            entry.drop_here();
            let timer = entry
                .deadline_timer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(t) = timer {
                t.abort();
            }
        }
    }

    /// Forgets `entry` if it is still the live one for `gtid` and still
    /// STUCK: nothing runs for it until an operator acts again. A request
    /// that took it further (or a newer entry) is left alone.
    fn forget_if_stuck(&self, gtid: &Gtid, entry: &Arc<Entry>) {
        let mut live = self.live_table();
        let same = live.get(gtid).is_some_and(|e| Arc::ptr_eq(e, entry));
        if same && entry.lock().record().state == crate::model::TxState::Stuck {
            live.remove(gtid);
            entry.drop_here();
        }
    }

    fn check_draining(&self) -> Result<(), CoordError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(CoordError::Unavailable(
                "coordinator is shutting down; not taking new transactions".into(),
            ));
        }
        Ok(())
    }

    fn check_halted(&self) -> Result<(), CoordError> {
        match self.halted.get() {
            Some(why) => Err(CoordError::Unavailable(format!(
                "coordinator stopped deciding after a log failure ({why}); restart it once the disk is healthy"
            ))),
            None => Ok(()),
        }
    }

    fn halt(&self, e: LogError) -> CoordError {
        if let LogError::Refused(_) = e {
            // One transaction, not the log: nothing latches.
            return CoordError::Unavailable(e.to_string());
        }
        let why = self.halted.get_or_init(|| e.to_string());
        tracing::error!(error = %why, "log failure: the coordinator stops deciding");
        // Wake every waiting request: none of them gets an answer now. (No
        // lock here: halt is called with the live table or a transaction
        // locked.)
        self.halted_token.cancel();
        self.set_readiness(|r| r.halted = true);
        CoordError::Unavailable(format!(
            "coordinator stopped deciding after a log failure ({why})"
        ))
    }

    /// Feeds a request's event. While a decision is being forced the
    /// engine refuses it ([`EngineError::DecisionPending`]) and it is fed
    /// again once that changes: the check and the step are one engine call
    /// under one lock, so nothing can decide in between, and no answer is
    /// built from a decision before it is durable.
    async fn step_request(&self, entry: &Entry, event: Event) -> Result<Vec<Command>, CoordError> {
        let mut seen = entry.changed.seen();
        loop {
            match self.step(entry, event.clone()) {
                Err(CoordError::WrongState(EngineError::DecisionPending { .. })) => {}
                result => return result,
            }
            self.wait_change(entry, &mut seen).await?;
        }
    }

    /// Waits for the next engine step of a transaction. Fails when the
    /// coordinator halts or is stopped first.
    async fn wait_change(&self, entry: &Entry, seen: &mut u64) -> Result<(), CoordError> {
        self.check_halted()?;
        // Dropped from the live table: no step will come (the caller looks
        // at the state once more after the wake-up that told it so).
        if entry.dropped.load(Ordering::SeqCst) {
            return Err(CoordError::Unavailable(format!(
                "transaction {} is no longer run here (another coordinator runs it, or it \
                 was dropped); ask again",
                entry.gtid()
            )));
        }
        tokio::select! {
            biased;
            () = entry.changed.after(seen) => {}
            () = self.halted_token.cancelled() => self.check_halted()?,
        }
        Ok(())
    }

    /// Waits until `ready` holds for the transaction. Fails when the
    /// coordinator halts or is stopped first.
    async fn wait_for(
        &self,
        entry: &Entry,
        ready: impl Fn(&Txn) -> bool,
    ) -> Result<(), CoordError> {
        let mut seen = entry.changed.seen();
        loop {
            if ready(&entry.lock()) {
                return Ok(());
            }
            self.wait_change(entry, &mut seen).await?;
        }
    }
}
