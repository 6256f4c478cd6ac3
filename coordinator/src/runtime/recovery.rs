//! Recovery after a restart: every unfinished transaction in the log is
//! taken over and finished, in the background and with bounded
//! concurrency, while new transactions are served.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::{Coordinator, Inner};
use crate::engine::Txn;
use crate::error::CoordError;
use crate::model::{TxState, now_ms};

/// Unfinished transactions recovery drives at once.
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
    /// Starts recovery in the background: every unfinished transaction in
    /// the log is taken over and finished (undecided → abort; decided →
    /// phase 2 again), at most [`RECOVERY_CONCURRENCY`] at a time, while new
    /// transactions are served. STUCK ones are left for an operator. The
    /// task's result says how many of each were found.
    pub fn start_recovery(&self) -> tokio::task::JoinHandle<Result<RecoveryReport, CoordError>> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let report = inner.recover_all().await;
            match &report {
                Ok(r) if r.total() > 0 => info!(
                    aborted_undecided = r.undecided,
                    commits_resumed = r.committing,
                    aborts_resumed = r.aborting,
                    stuck_left = r.stuck,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "recovery finished"
                ),
                Ok(r) => info!(stuck_left = r.stuck, "recovery: nothing in flight"),
                Err(e) => tracing::error!(error = %e, "recovery failed"),
            }
            report
        })
    }
}

impl Inner {
    /// Takes over every unfinished transaction in the log; see
    /// [`Coordinator::start_recovery`].
    async fn recover_all(self: &Arc<Self>) -> Result<RecoveryReport, CoordError> {
        const UNFINISHED: [TxState; 5] = [
            TxState::Active,
            TxState::Preparing,
            TxState::Committing,
            TxState::Aborting,
            TxState::Stuck,
        ];
        let started = std::time::Instant::now();
        let permits = Arc::new(tokio::sync::Semaphore::new(RECOVERY_CONCURRENCY));
        let mut report = RecoveryReport::default();
        let mut after = None;
        loop {
            let page = self.log.scan(after.as_ref(), &UNFINISHED, 1000)?;
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            for rec in page {
                let (gtid, state) = (rec.gtid, rec.state);
                match state {
                    TxState::Active | TxState::Preparing => report.undecided += 1,
                    TxState::Committing => report.committing += 1,
                    TxState::Aborting => report.aborting += 1,
                    _ => {
                        report.stuck += 1;
                        continue;
                    }
                }
                if self.find_live(&gtid).is_some() {
                    continue; // an operator got to it first
                }
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| CoordError::Unavailable("recovery stopped".into()))?;
                let (txn, cmds) = Txn::recover(rec, now_ms());
                let entry = self.insert_live(gtid, txn);
                self.log
                    .write(entry.lock().record())
                    .map_err(|e| self.halt(e))?;
                tracing::debug!(%gtid, %state, "recovering transaction");
                let inner = self.clone();
                tokio::spawn(async move {
                    let _ = inner.run(&entry, cmds).await;
                    drop(permit);
                });
            }
        }
        // Wait for the last first rounds, so the report's time means "done".
        let _ = permits
            .acquire_many(RECOVERY_CONCURRENCY as u32)
            .await
            .map_err(|_| CoordError::Unavailable("recovery stopped".into()))?;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}
