//! Takeover: on a store several coordinators share, the unfinished
//! transactions of an instance that stopped renewing its leases (killed,
//! paused, cut off) are claimed by a live one and finished as recovery
//! finishes them: decided → phase 2 again, undecided → abort. The claim
//! (`epoch + 1`, on the store) fences the former owner: none of its later
//! writes lands, so it can neither decide nor record anything about them.
//! On a log only one coordinator uses there is never anything to take.

use std::time::Duration;

use tokio::task::JoinHandle;

use std::sync::Arc;

use super::recovery::RecoveryReport;
use super::{Coordinator, Inner};
use crate::log::LogError;
use crate::model::TxState;

/// Transactions claimed per sweep; a sweep that fills it goes on at once.
const BATCH: usize = 256;

impl Inner {
    /// Recovers the unfinished transactions this instance owns in a shared
    /// store that nothing here drives: a claim whose answer was lost (the
    /// store committed it, the reply did not arrive). One whose read failed
    /// is in the recovering set and retried by `reclaim_later` until it
    /// reads. STUCK ones wait for an operator, as always.
    async fn adopt_orphans(self: &Arc<Self>) {
        const DRIVEN: [TxState; 4] = [
            TxState::Active,
            TxState::Preparing,
            TxState::Committing,
            TxState::Aborting,
        ];
        if !self.log.shared() || self.check_halted().is_err() {
            return;
        }
        let mut orphans = Vec::new();
        let mut after = None;
        loop {
            let page = match self.log.scan_own(after.as_ref(), &DRIVEN, 1000) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for transactions nothing drives");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            let live = self.live_table();
            let mut recovering = self.recovering_set();
            for rec in page {
                if !live.contains_key(&rec.gtid) && recovering.insert(rec.gtid) {
                    orphans.push(rec.gtid);
                }
            }
        }
        // The scan read the store; a transaction that finished since left
        // the live table with its last write perhaps still buffered. Look
        // again through the log (buffer first) before calling it an orphan.
        let mut settled = Vec::new();
        orphans.retain(|gtid| {
            let live = || self.live_table().contains_key(gtid);
            let driven = || match self.log.get(gtid) {
                Ok(Some(rec)) => DRIVEN.contains(&rec.state),
                Ok(None) => false,
                Err(_) => true, // recovery reads it again, and retries
            };
            // Live again needs no read; one read live meanwhile is no orphan.
            let orphan = !live() && driven() && !live();
            if !orphan {
                settled.push(*gtid);
            }
            orphan
        });
        {
            let mut recovering = self.recovering_set();
            for gtid in &settled {
                recovering.remove(gtid);
            }
        }
        // A log that latched meanwhile answered no read: nothing to say.
        if orphans.is_empty() || self.check_halted().is_err() {
            return;
        }
        tracing::warn!(
            count = orphans.len(),
            "recovering transactions owned here that nothing drove"
        );
        if let Err(e) = self.recover_all(RecoveryReport::default(), orphans).await {
            tracing::warn!(error = %e, "recovering them stopped");
        }
    }
}

impl Coordinator {
    /// Starts sweeping for expired leases every `every`, taking over what
    /// it finds. Abort the task to stop it.
    pub fn start_takeover(&self, every: Duration) -> JoinHandle<()> {
        let inner = self.inner.clone();
        inner.tasks.clone().spawn(async move {
            let mut rounds = 0u64;
            loop {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep(every) => {}
                    () = inner.timers_stop.cancelled() => return,
                }
                // The clock against the store's, every 24 rounds (a minute
                // at the default lease).
                rounds += 1;
                if rounds.is_multiple_of(24) {
                    inner.watch_clock();
                }
                inner.adopt_orphans().await;
                loop {
                    if inner.check_halted().is_err() {
                        return;
                    }
                    let gtids = match inner.log.take_over_expired(BATCH).await {
                        Ok(gtids) => {
                            if let Some(m) = &inner.metrics {
                                m.took_over(gtids.len());
                            }
                            gtids
                        }
                        // The log latched (a failed write, or fenced)
                        // while nothing else of this coordinator touched
                        // it: it stops deciding now, and says so in its
                        // readiness, instead of sweeping a dead log as
                        // if ready while what it owns waits.
                        Err(e @ (LogError::Halted(_) | LogError::Fenced(_))) => {
                            let _ = inner.halt(e);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot sweep for expired leases");
                            break;
                        }
                    };
                    if gtids.is_empty() {
                        break;
                    }
                    let full = gtids.len() >= BATCH;
                    tracing::info!(
                        count = gtids.len(),
                        "taking over transactions of a coordinator whose leases expired"
                    );
                    inner.recovering_set().extend(gtids.iter().copied());
                    match inner.recover_all(RecoveryReport::default(), gtids).await {
                        Ok(r) => tracing::info!(
                            failed = r.failed,
                            elapsed_ms = r.elapsed.as_millis() as u64,
                            "takeover finished its first round"
                        ),
                        Err(e) => tracing::warn!(error = %e, "takeover stopped"),
                    }
                    if !full {
                        break;
                    }
                }
            }
        })
    }
}
