//! Recovery after a restart: every unfinished transaction in the log is
//! taken over and finished, in the background and with bounded
//! concurrency, while new transactions are served.
//!
//! Recovery acts only on what it owns: the transactions in the log when
//! the process took stock, before serving. Each is claimed atomically
//! against the live table, with its record read at that moment, so a
//! transaction that a request took over (or finished) meanwhile is never
//! overwritten from an older copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tracing::info;

use super::{Coordinator, Entry, Inner};
use crate::engine::Txn;
use crate::error::CoordError;
use crate::model::{Gtid, TxState};

/// Unfinished transactions recovery drives at once, by default
/// (`CoordinatorConfig::recovery_concurrency`).
pub const RECOVERY_CONCURRENCY: usize = 256;

/// What recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Undecided (ACTIVE / PREPARING): aborted.
    pub undecided: usize,
    /// COMMITTING: phase 2 resumed.
    pub committing: usize,
    /// ABORTING: phase 2 resumed.
    pub aborting: usize,
    /// STUCK: left for an operator.
    pub stuck: usize,
    /// Could not be taken over at once (their record did not read back);
    /// each is logged with its gtid and retried until it reads, and the
    /// rest were recovered all the same.
    pub failed: usize,
    /// Until every recovered transaction finished its first round of calls.
    pub elapsed: Duration,
}

impl RecoveryReport {
    /// Transactions taken over (STUCK ones are not).
    pub fn total(&self) -> usize {
        self.undecided + self.committing + self.aborting
    }
}

impl Coordinator {
    /// Takes stock of the unfinished transactions in the log (before
    /// serving: these, and only these, are recovery's), forces the log,
    /// and starts taking them over in the background: undecided → abort;
    /// decided → phase 2 again, at most `recovery_concurrency` at a time,
    /// while new transactions are served. STUCK ones are left for an
    /// operator. A request for one of them takes it over at once. The
    /// task's result says how many of each were found.
    ///
    /// The force comes first because what a crashed process wrote may
    /// read back without being on disk (sled writes reach the OS before
    /// they are synced): a COMMITTING record read back unforced must not
    /// be acted on or told, since a power cut could still undo it.
    ///
    /// # Errors
    ///
    /// The log cannot be read, or the force fails: then the coordinator
    /// halts (it decides nothing on records that may not be durable).
    pub async fn start_recovery(
        &self,
    ) -> Result<tokio::task::JoinHandle<Result<RecoveryReport, CoordError>>, CoordError> {
        self.inner.check_clock()?;
        let (report, pending) = self.inner.take_stock()?;
        // Everything read back is made durable before anyone acts on it.
        self.inner
            .log
            .force()
            .await
            .map_err(|e| self.inner.halt(e))?;
        let inner = self.inner.clone();
        Ok(self.inner.tasks.spawn(async move {
            let report = inner.recover_all(report, pending).await;
            // Done, or given up (halted, shutting down: each keeps the
            // coordinator from serving on its own).
            inner.set_readiness(|r| r.recovering = false);
            match &report {
                Ok(r) if r.total() > 0 => info!(
                    aborted_undecided = r.undecided,
                    commits_resumed = r.committing,
                    aborts_resumed = r.aborting,
                    stuck_left = r.stuck,
                    failed = r.failed,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "recovery finished"
                ),
                Ok(r) => info!(stuck_left = r.stuck, "recovery: nothing in flight"),
                Err(e) => tracing::error!(error = %e, "recovery failed"),
            }
            report
        }))
    }
}

impl Inner {
    /// Lists the unfinished transactions in the log into `recovering`.
    fn take_stock(&self) -> Result<(RecoveryReport, Vec<Gtid>), CoordError> {
        const UNFINISHED: [TxState; 5] = [
            TxState::Active,
            TxState::Preparing,
            TxState::Committing,
            TxState::Aborting,
            TxState::Stuck,
        ];
        let mut report = RecoveryReport::default();
        let mut pending = Vec::new();
        let mut after = None;
        loop {
            let page = self.log.scan_own(after.as_ref(), &UNFINISHED, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            for rec in page {
                match rec.state {
                    TxState::Active | TxState::Preparing => report.undecided += 1,
                    TxState::Committing => report.committing += 1,
                    TxState::Aborting => report.aborting += 1,
                    _ => {
                        report.stuck += 1;
                        continue;
                    }
                }
                pending.push(rec.gtid);
            }
        }
        self.recovering_set().extend(pending.iter().copied());
        Ok((report, pending))
    }

    /// Takes over every transaction of `pending` not taken over already.
    pub(super) async fn recover_all(
        self: &Arc<Self>,
        mut report: RecoveryReport,
        pending: Vec<Gtid>,
    ) -> Result<RecoveryReport, CoordError> {
        let started = tokio::time::Instant::now();
        let concurrency = self.config.recovery_concurrency;
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        for gtid in pending {
            if self.timers_stop.is_cancelled() {
                break; // shutting down: the next start recovers the rest
            }
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| CoordError::Unavailable("recovery stopped".into()))?;
            let mut live = self.live_table();
            if let Some(existing) = live.get(&gtid).cloned() {
                // A request took it over first; or this is an entry from
                // before this instance lost the row (paused past its lease)
                // and claimed it back at a newer epoch: that copy is stale
                // (every write of it would be fenced), the record is read
                // again and driven.
                let held = existing.lock().record().epoch;
                let claimed = matches!(self.log.get(&gtid), Ok(Some(rec)) if rec.epoch > held);
                if !claimed {
                    self.recovering_set().remove(&gtid);
                    continue;
                }
                drop(live);
                self.forget(&gtid);
                live = self.live_table();
            }
            if let Err(e) = self.claim_locked(&mut live, gtid, Some(permit)) {
                drop(live);
                // One record that cannot be taken over does not stop the
                // others; a halted coordinator stops everything.
                self.check_halted()?;
                tracing::warn!(%gtid, error = %e, "recovery cannot read this transaction yet; retrying until it can");
                report.failed += 1;
            }
        }
        // Wait for the last first rounds, so the report's time means "done".
        let _ = permits
            .acquire_many(concurrency as u32)
            .await
            .map_err(|_| CoordError::Unavailable("recovery stopped".into()))?;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Takes over `gtid` if it is still waiting for recovery: reads its
    /// record now (never an earlier copy), makes it live and starts its
    /// round, all under the live-table lock held by the caller, so nothing
    /// else can start or finish it in between. `permit` is held until that
    /// first round is done.
    pub(super) fn claim_locked(
        self: &Arc<Self>,
        live: &mut HashMap<Gtid, Arc<Entry>>,
        gtid: Gtid,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<Option<Arc<Entry>>, CoordError> {
        if !self.recovering_set().remove(&gtid) {
            return Ok(None);
        }
        let rec = match self.log.get(&gtid) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(None),
            Err(e) => {
                // A read that failed (a shared store's reads do not latch
                // the log) leaves it waiting for recovery, and retried
                // until it reads: it is ours, nobody else will drive it.
                self.recovering_set().insert(gtid);
                self.reclaim_later(gtid);
                return Err(e.into());
            }
        };
        if rec.state.is_terminal() || rec.state == TxState::Stuck {
            return Ok(None);
        }
        let state = rec.state;
        let deadline = rec.deadline_ms;
        let (txn, cmds) = Txn::recover(rec, self.now());
        // Only a message stays undecided: checked back at its deadline.
        let undecided = !txn.record().state.is_decided();
        let entry = self.new_entry(txn);
        live.insert(gtid, entry.clone());
        if undecided {
            self.start_deadline_timer(&entry, deadline);
        }
        self.log
            .write(entry.lock().record())
            .map_err(|e| self.halt(e))?;
        tracing::debug!(%gtid, %state, "recovering transaction");
        let round = self.spawn_round(&entry, cmds);
        self.tasks.spawn(async move {
            let _ = round.await;
            drop(permit);
        });
        Ok(Some(entry))
    }
}

/// Claims whose read failed, waiting to be tried again (see
/// [`Inner::reclaim_later`]).
#[derive(Default)]
pub(super) struct Reclaims {
    gtids: std::collections::BTreeSet<Gtid>,
    /// A task is retrying them (one at most).
    running: bool,
}

/// The first pause before a failed claim is tried again; it doubles while
/// the store keeps failing, up to [`RECLAIM_MAX_PAUSE`].
const RECLAIM_FIRST_PAUSE: Duration = Duration::from_millis(100);
const RECLAIM_MAX_PAUSE: Duration = Duration::from_secs(5);

impl Inner {
    fn reclaims(&self) -> std::sync::MutexGuard<'_, Reclaims> {
        self.reclaims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has `gtid` (waiting for recovery, its claim's read failed) tried
    /// again until it is taken over: every transaction this instance owns
    /// and has not finished is driven, always. One task retries them all,
    /// with backoff, while any is left; it ends with the log (halted) or
    /// on shutdown (the next start recovers them, or another instance
    /// once this one's lease runs out).
    pub(super) fn reclaim_later(self: &Arc<Self>, gtid: Gtid) {
        let mut r = self.reclaims();
        r.gtids.insert(gtid);
        if !r.running {
            r.running = true;
            let inner = self.clone();
            self.tasks.spawn(async move { inner.reclaim_loop().await });
        }
    }

    async fn reclaim_loop(self: Arc<Self>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(
            self.config.recovery_concurrency.max(1),
        ));
        let mut pause = RECLAIM_FIRST_PAUSE;
        loop {
            tokio::select! {
                biased;
                () = self.timers_stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
            if self.check_halted().is_err() {
                break;
            }
            let gtids = {
                let mut r = self.reclaims();
                if r.gtids.is_empty() {
                    r.running = false;
                    return;
                }
                std::mem::take(&mut r.gtids)
            };
            let mut failed = false;
            let mut left = gtids.into_iter();
            for gtid in left.by_ref() {
                // Read first without the live-table lock: while the store
                // fails, nothing waits behind this retry.
                if self.log.get(&gtid).is_err() {
                    self.reclaims().gtids.insert(gtid);
                    failed = true;
                    break;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let mut live = self.live_table();
                if live.contains_key(&gtid) {
                    continue; // a request took it over meanwhile
                }
                // A failure puts it back in the set (this task is running).
                if self.claim_locked(&mut live, gtid, Some(permit)).is_err() {
                    failed = true;
                }
            }
            // The store still fails: the rest wait for the next try too.
            self.reclaims().gtids.extend(left);
            pause = if failed {
                (pause * 2).min(RECLAIM_MAX_PAUSE)
            } else {
                RECLAIM_FIRST_PAUSE
            };
        }
        let mut r = self.reclaims();
        r.running = false;
        r.gtids.clear();
    }
}
