//! The runtime around the engine: it turns client requests into engine
//! events, writes and forces the log, calls participants with deadlines,
//! runs retry and deadline timers, and keeps the table of live transactions.
//!
//! Each transaction's [`Txn`] sits behind its own mutex, held only while the
//! engine handles an event and the resulting record is written to the log.
//! Writing under that lock keeps the log's versions of a record in the same
//! order as the engine's states. Calls and timers run outside it.
//!
//! - `mod.rs`: the request API ([`Coordinator`]) and the live-transaction table;
//! - `driver`: carries out engine commands and feeds results back as events;
//! - `recovery`: taking over unfinished transactions after a restart;
//! - `retention`: removing finished records after the retention period;
//! - `participants`: per-endpoint gRPC clients and deadline-bounded calls.

mod driver;
mod participants;
mod recovery;
mod retention;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::AbortHandle;

use participants::ParticipantPool;
pub(crate) use participants::validate_endpoint;
pub use recovery::{RECOVERY_CONCURRENCY, RecoveryReport};

use crate::config::CoordinatorConfig;
use crate::engine::{Command, Event, NewBranch, Txn};
use crate::error::CoordError;
use crate::log::{LogError, LogStats, TxnLog};
use crate::model::{BranchId, Decision, Gtid, Mode, TxState, TxnRecord, now_ms};

/// Longest resource name accepted.
const MAX_RESOURCE_LEN: usize = 256;
/// Longest endpoint accepted.
const MAX_ENDPOINT_LEN: usize = 1024;
/// Longest client rollback reason kept.
const MAX_REASON_LEN: usize = 1024;

/// The outcome of a one-shot transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// Transaction id.
    pub gtid: Gtid,
    /// COMMITTED / COMMITTING or ABORTED / ABORTING.
    pub state: TxState,
    /// Why it aborted; empty when committed.
    pub reason: String,
    /// Phase-1 reply of each branch, in request order (empty unless yes).
    pub replies: Vec<Bytes>,
}

/// A handle to the coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<dyn TxnLog>,
    config: CoordinatorConfig,
    /// Set on shutdown: no new transactions.
    draining: std::sync::atomic::AtomicBool,
    /// Records removed by retention.
    purged: std::sync::atomic::AtomicU64,
    live: Mutex<HashMap<Gtid, Arc<Entry>>>,
    pool: ParticipantPool,
    /// Set once a log write or force failed: from then on nothing is decided.
    halted: OnceLock<String>,
}

/// One live transaction.
struct Entry {
    txn: Mutex<Txn>,
    deadline_timer: Mutex<Option<AbortHandle>>,
}

impl Coordinator {
    /// A coordinator over `log`. Call [`Coordinator::recover`] before serving.
    ///
    /// # Errors
    ///
    /// [`CoordError::InvalidArgument`] when `config` does not validate.
    pub fn new(config: CoordinatorConfig, log: Arc<dyn TxnLog>) -> Result<Self, CoordError> {
        config
            .validate()
            .map_err(|e| CoordError::InvalidArgument(e.to_string()))?;
        Ok(Coordinator {
            inner: Arc::new(Inner {
                log,
                config,
                live: Mutex::new(HashMap::new()),
                pool: ParticipantPool::default(),
                halted: OnceLock::new(),
                draining: std::sync::atomic::AtomicBool::new(false),
                purged: std::sync::atomic::AtomicU64::new(0),
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

    /// Stops taking new transactions (`begin` and `submit` answer
    /// UNAVAILABLE); work in flight continues. Used on shutdown.
    pub fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts an interactive transaction.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a timeout above the maximum; `Unavailable` when
    /// halted.
    pub async fn begin(&self, mode: Mode, timeout: Option<Duration>) -> Result<Gtid, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.check_draining()?;
        let deadline = inner.deadline(timeout)?;
        let gtid = Gtid::now_v7();
        let (txn, _persist) = Txn::begin(gtid, mode, now_ms(), deadline);
        let entry = inner.insert_live(gtid, txn);
        if let Err(e) = inner.log.write(entry.lock().record()) {
            inner.forget(&gtid);
            return Err(inner.halt(e));
        }
        inner.start_deadline_timer(&entry, deadline);
        Ok(gtid)
    }

    /// Adds a branch and runs its phase 1; returns its id and reply bytes.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` (bad branch), `NotFound`, `WrongState` (not ACTIVE),
    /// `Aborted` (the participant voted no or failed; the transaction aborted).
    pub async fn enlist(
        &self,
        gtid: Gtid,
        branch: NewBranch,
    ) -> Result<(BranchId, Bytes), CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.validate_branch(&branch)?;
        let entry = inner.live_entry(&gtid)?;
        if entry.lock().record().branches.len() >= inner.config.max_branches {
            return Err(CoordError::InvalidArgument(format!(
                "transaction {gtid} already has the maximum of {} branches",
                inner.config.max_branches
            )));
        }
        let cmds = inner.step(&entry, Event::Enlist(branch))?;
        let id = cmds.iter().find_map(|c| match c {
            Command::PhaseOne { branch } => Some(*branch),
            _ => None,
        });
        let mut replies = inner.run(&entry, cmds).await?;
        let rec = entry.lock().record().clone();
        match id {
            Some(id) if rec.state == TxState::Active => {
                Ok((id, replies.remove(&id).unwrap_or_default()))
            }
            _ => Err(CoordError::Aborted {
                gtid,
                reason: rec.reason,
            }),
        }
    }

    /// Decides commit, forces it, runs phase 2; returns COMMITTED, or
    /// COMMITTING when some branch is being retried in the background.
    ///
    /// # Errors
    ///
    /// `NotFound`, `WrongState` (aborted, rolled back, one-shot, branch in
    /// flight), `Aborted` (deadline passed), `Unavailable`.
    pub async fn commit(&self, gtid: Gtid) -> Result<TxState, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        let Some(entry) = inner.find_live(&gtid) else {
            return inner.settled_state(gtid, Event::Commit);
        };
        let cmds = inner.step(&entry, Event::Commit)?;
        inner.run(&entry, cmds).await?;
        let txn = entry.lock();
        match reported_state(txn.record()) {
            TxState::Aborting | TxState::Aborted => Err(CoordError::Aborted {
                gtid,
                reason: txn.record().reason.clone(),
            }),
            state => Ok(state),
        }
    }

    /// Decides abort and runs rollback / cancel; returns ABORTED, or
    /// ABORTING while some branch is being retried.
    ///
    /// # Errors
    ///
    /// `NotFound`, `WrongState` (already decided commit), `Unavailable`.
    pub async fn rollback(&self, gtid: Gtid, reason: String) -> Result<TxState, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        if reason.len() > MAX_REASON_LEN {
            return Err(CoordError::InvalidArgument(format!(
                "reason is {} bytes; at most {MAX_REASON_LEN}",
                reason.len()
            )));
        }
        let Some(entry) = inner.find_live(&gtid) else {
            return inner.settled_state(
                gtid,
                Event::Rollback {
                    reason: String::new(),
                },
            );
        };
        let cmds = inner.step(&entry, Event::Rollback { reason })?;
        inner.run(&entry, cmds).await?;
        let state = reported_state(entry.lock().record());
        Ok(state)
    }

    /// Runs a whole transaction: records all branches, phase 1 in parallel,
    /// decision, phase 2.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a bad request (nothing recorded), `Unavailable`.
    /// An aborted transaction is an `Ok` outcome with state ABORTED.
    pub async fn submit(
        &self,
        mode: Mode,
        timeout: Option<Duration>,
        branches: Vec<NewBranch>,
    ) -> Result<SubmitOutcome, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.check_draining()?;
        if branches.is_empty() {
            return Err(CoordError::InvalidArgument(
                "a transaction needs at least one branch".into(),
            ));
        }
        if branches.len() > inner.config.max_branches {
            return Err(CoordError::InvalidArgument(format!(
                "{} branches; at most {}",
                branches.len(),
                inner.config.max_branches
            )));
        }
        for b in &branches {
            inner.validate_branch(b)?;
        }
        let deadline = inner.deadline(timeout)?;
        let gtid = Gtid::now_v7();
        let n = branches.len();
        let (txn, cmds) = Txn::submit(gtid, mode, now_ms(), deadline, branches);
        let entry = inner.insert_live(gtid, txn);
        if let Err(e) = inner.log.write(entry.lock().record()) {
            inner.forget(&gtid);
            return Err(inner.halt(e));
        }
        let mut replies = inner.run(&entry, cmds).await?;
        let (state, reason) = {
            let txn = entry.lock();
            let rec = txn.record();
            (reported_state(rec), rec.reason.clone())
        };
        Ok(SubmitOutcome {
            gtid,
            state,
            reason,
            replies: (1..=n as BranchId)
                .map(|id| replies.remove(&id).unwrap_or_default())
                .collect(),
        })
    }

    /// An operator's retry (`tandem tx retry`): drives phase 2 of a STUCK or
    /// retrying transaction now, with a fresh retry budget, and aborts an
    /// undecided one past its deadline. Returns the state after the first
    /// round of calls.
    ///
    /// # Errors
    ///
    /// `NotFound`; `WrongState` for an undecided transaction within its
    /// deadline; `Unavailable`.
    pub async fn retry(&self, gtid: Gtid) -> Result<TxState, CoordError> {
        self.operator(gtid, Event::OperatorRetry).await
    }

    /// An operator's abort (`tandem tx abort`) of an undecided transaction.
    /// Returns the state after the first round of rollback / cancel calls.
    ///
    /// # Errors
    ///
    /// `NotFound`; `WrongState` for a commit decision (never reversed);
    /// `InvalidArgument` for an over-long reason; `Unavailable`.
    pub async fn abort(&self, gtid: Gtid, reason: String) -> Result<TxState, CoordError> {
        if reason.len() > MAX_REASON_LEN {
            return Err(CoordError::InvalidArgument(format!(
                "reason is {} bytes; at most {MAX_REASON_LEN}",
                reason.len()
            )));
        }
        self.operator(gtid, Event::OperatorAbort { reason }).await
    }

    async fn operator(&self, gtid: Gtid, event: Event) -> Result<TxState, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        let entry = match inner.find_live(&gtid) {
            Some(entry) => entry,
            None => {
                let rec = inner.log.get(&gtid)?.ok_or(CoordError::NotFound(gtid))?;
                if rec.state != TxState::Stuck {
                    // Finished, or not yet taken over by recovery: the
                    // engine's answer on the stored record, nothing written.
                    return inner.settled_state(gtid, event);
                }
                let (txn, _) = Txn::recover(rec, now_ms());
                inner.adopt(gtid, txn)
            }
        };
        let cmds = match inner.step(&entry, event) {
            Ok(cmds) => cmds,
            Err(e) => {
                if entry.lock().record().state == TxState::Stuck {
                    inner.forget(&gtid);
                }
                return Err(e);
            }
        };
        inner.run(&entry, cmds).await?;
        let state = entry.lock().record().state;
        Ok(state)
    }

    /// What a participant holding a branch of `gtid` should do: `None`
    /// while undecided, else the decision. An unknown gtid is `Abort`
    /// (presumed abort: the coordinator never recorded it, so it never
    /// committed).
    ///
    /// # Errors
    ///
    /// A log failure.
    pub fn outcome(&self, gtid: Gtid) -> Result<Option<Decision>, CoordError> {
        let decision = |rec: &TxnRecord| rec.decision;
        if let Some(entry) = self.inner.find_live(&gtid) {
            return Ok(decision(entry.lock().record()));
        }
        match self.inner.log.get(&gtid)? {
            Some(rec) => Ok(decision(&rec)),
            None => Ok(Some(Decision::Abort)),
        }
    }

    /// The latest record of a transaction.
    ///
    /// # Errors
    ///
    /// `NotFound`, or a log failure.
    pub fn get(&self, gtid: Gtid) -> Result<TxnRecord, CoordError> {
        self.inner.log.get(&gtid)?.ok_or(CoordError::NotFound(gtid))
    }

    /// Records in creation order after `after`, filtered by state and
    /// created before `created_before_ms` when given.
    ///
    /// # Errors
    ///
    /// A log failure.
    pub fn list(
        &self,
        after: Option<Gtid>,
        states: &[TxState],
        created_before_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<TxnRecord>, CoordError> {
        let mut records = self.inner.log.scan(after.as_ref(), states, limit)?;
        if let Some(before) = created_before_ms {
            // Gtids are UUID v7: creation order, so the rest is newer too.
            if let Some(cut) = records.iter().position(|r| r.created_ms >= before) {
                records.truncate(cut);
            }
        }
        Ok(records)
    }
}

/// The state a client is told after its request: a STUCK transaction is
/// reported by its decision, as still finishing (COMMITTING / ABORTING),
/// because to the client the outcome is decided and phase 2 is not done.
fn reported_state(rec: &TxnRecord) -> TxState {
    match (rec.state, rec.decision) {
        (TxState::Stuck, Some(Decision::Commit)) => TxState::Committing,
        (TxState::Stuck, _) => TxState::Aborting,
        (state, _) => state,
    }
}

impl Entry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Txn> {
        // The engine never panics mid-update on input; if a bug did, the
        // record written last is still the one on disk.
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn live_table(&self) -> std::sync::MutexGuard<'_, HashMap<Gtid, Arc<Entry>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert_live(&self, gtid: Gtid, txn: Txn) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            txn: Mutex::new(txn.with_policy(self.config.retry)),
            deadline_timer: Mutex::new(None),
        });
        self.live_table().insert(gtid, entry.clone());
        entry
    }

    /// Makes `txn` live unless another request already did; returns the
    /// live entry either way.
    fn adopt(&self, gtid: Gtid, txn: Txn) -> Arc<Entry> {
        let mut live = self.live_table();
        live.entry(gtid)
            .or_insert_with(|| {
                Arc::new(Entry {
                    txn: Mutex::new(txn.with_policy(self.config.retry)),
                    deadline_timer: Mutex::new(None),
                })
            })
            .clone()
    }

    fn find_live(&self, gtid: &Gtid) -> Option<Arc<Entry>> {
        self.live_table().get(gtid).cloned()
    }

    fn live_entry(&self, gtid: &Gtid) -> Result<Arc<Entry>, CoordError> {
        if let Some(e) = self.find_live(gtid) {
            return Ok(e);
        }
        match self.log.get(gtid)? {
            Some(rec) => Err(crate::engine::EngineError::WrongState {
                gtid: *gtid,
                state: rec.state,
                action: "enlist a branch",
                detail: "; branches can only be added to an ACTIVE transaction".into(),
            }
            .into()),
            None => Err(CoordError::NotFound(*gtid)),
        }
    }

    /// Answers a request for a transaction no longer live: the same engine
    /// rules, applied to the record in the log (nothing is written). One
    /// that is unfinished but not live is waiting for recovery.
    fn settled_state(&self, gtid: Gtid, event: Event) -> Result<TxState, CoordError> {
        let rec = self.log.get(&gtid)?.ok_or(CoordError::NotFound(gtid))?;
        if !rec.state.is_terminal() && rec.state != TxState::Stuck {
            return Err(CoordError::Unavailable(format!(
                "transaction {gtid} is being recovered after a restart; ask again shortly"
            )));
        }
        let mut txn = Txn::recover(rec.clone(), now_ms()).0;
        txn.handle(event, now_ms())?;
        Ok(rec.state)
    }

    fn forget(&self, gtid: &Gtid) {
        if let Some(entry) = self.live_table().remove(gtid) {
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

    fn check_draining(&self) -> Result<(), CoordError> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
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
        let why = self.halted.get_or_init(|| e.to_string());
        tracing::error!(error = %why, "log failure: the coordinator stops deciding");
        CoordError::Unavailable(format!(
            "coordinator stopped deciding after a log failure ({why})"
        ))
    }

    fn deadline(&self, timeout: Option<Duration>) -> Result<u64, CoordError> {
        let timeout = timeout.unwrap_or(self.config.default_timeout);
        if timeout > self.config.max_timeout {
            return Err(CoordError::InvalidArgument(format!(
                "timeout {} ms is above the maximum of {} ms",
                timeout.as_millis(),
                self.config.max_timeout.as_millis()
            )));
        }
        Ok(now_ms() + timeout.as_millis() as u64)
    }

    fn validate_branch(&self, b: &NewBranch) -> Result<(), CoordError> {
        let invalid = |m: String| Err(CoordError::InvalidArgument(m));
        if b.endpoint.is_empty() {
            return invalid("branch endpoint is empty".into());
        }
        if b.endpoint.len() > MAX_ENDPOINT_LEN {
            return invalid(format!(
                "branch endpoint is longer than {MAX_ENDPOINT_LEN} bytes"
            ));
        }
        validate_endpoint(&b.endpoint).map_err(CoordError::InvalidArgument)?;
        if b.resource.is_empty() {
            return invalid("branch resource is empty".into());
        }
        if b.resource.len() > MAX_RESOURCE_LEN {
            return invalid(format!(
                "branch resource is longer than {MAX_RESOURCE_LEN} bytes"
            ));
        }
        if b.payload.len() > self.config.max_payload_bytes {
            return invalid(format!(
                "branch payload is {} bytes; the limit is {} bytes",
                b.payload.len(),
                self.config.max_payload_bytes
            ));
        }
        Ok(())
    }
}
