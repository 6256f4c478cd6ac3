//! Retention: finished (COMMITTED / ABORTED) records are removed from the
//! log once they are older than `CoordinatorConfig::retention`, by a
//! background sweep in small pages, so the data directory and the log's
//! memory stay bounded however long the coordinator runs. STUCK and
//! unfinished records are never removed.
//!
//! What is removed is not all forgotten (DESIGN.md, "What retention may
//! forget"): a commit some participant never acknowledged (a branch an
//! operator settled by hand) leaves a decision tombstone, kept
//! `CoordinatorConfig::decision_retention`, so `GetOutcome` still answers
//! COMMIT; and the log's horizon covers every removed gtid, so a repeat of
//! one is never started again and an expired tombstone is never read as
//! ABORT. A log that keeps neither ([`crate::log::TxnLog::compacts`]) has
//! nothing removed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Coordinator, Inner};
use crate::error::CoordError;
use crate::log::{Purge, Tombstone};
use crate::model::Gtid;

/// Records looked at per page; the sweep yields between pages.
const PAGE: usize = 256;

impl Coordinator {
    /// Starts the retention sweep: every `retention / 10` (between 1 s and
    /// 1 min), finished records last changed more than `retention` ago are
    /// removed. Abort the task to stop it.
    pub fn start_retention(&self) -> JoinHandle<()> {
        let inner = self.inner.clone();
        let every =
            (inner.config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        inner.tasks.clone().spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep(every) => {}
                    () = inner.timers_stop.cancelled() => return,
                }
                match inner.sweep().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(removed = n, "retention removed finished transactions")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed");
                        if inner.check_halted().is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }

    /// Finished transactions removed by retention since start.
    pub fn purged(&self) -> u64 {
        self.inner.purged.load(Ordering::Relaxed)
    }

    /// Runs one retention sweep now (what the background task does every
    /// period); returns how many records it removed.
    ///
    /// # Errors
    ///
    /// A log failure (the coordinator halts).
    pub async fn sweep_now(&self) -> Result<u64, CoordError> {
        self.inner.sweep().await
    }
}

impl Inner {
    /// One pass from the oldest record; returns how many it removed.
    pub(super) async fn sweep(self: &Arc<Self>) -> Result<u64, CoordError> {
        if !self.log.compacts() {
            return Ok(0);
        }
        let now = self.now();
        let cutoff = now.saturating_sub(self.config.retention.as_millis() as u64);
        let mut after: Option<Gtid> = None;
        let mut removed = 0;
        loop {
            self.check_halted()?;
            let page = self.log.scan(after.as_ref(), &[], PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            let mut reached_young = false;
            let mut purges = Vec::new();
            for rec in &page {
                // Gtids are in creation order: from here on, all are younger.
                if rec.created_ms >= cutoff {
                    reached_young = true;
                    break;
                }
                if rec.state.is_terminal()
                    && rec.updated_ms < cutoff
                    && self.find_live(&rec.gtid).is_none()
                {
                    purges.push(Purge {
                        gtid: rec.gtid,
                        tombstone: Tombstone::needed_for(rec),
                    });
                }
            }
            if !purges.is_empty() {
                self.log.purge(&purges).map_err(|e| self.halt(e))?;
                let kept = purges.iter().filter(|p| p.tombstone.is_some()).count();
                if kept > 0 {
                    tracing::info!(
                        kept,
                        "retention kept the commit decision of transactions a participant never \
                         acknowledged (settled by hand) as tombstones"
                    );
                }
                removed += purges.len() as u64;
            }
            if reached_young || page.len() < PAGE {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.purged.fetch_add(removed, Ordering::Relaxed);
        self.expire_tombstones(now).await?;
        Ok(removed)
    }

    /// Removes the tombstones of transactions that finished more than
    /// `decision_retention` ago, in pages.
    async fn expire_tombstones(self: &Arc<Self>, now: u64) -> Result<(), CoordError> {
        let Some(keep) = self.config.decision_retention else {
            return Ok(());
        };
        let before = now.saturating_sub(keep.as_millis() as u64);
        loop {
            self.check_halted()?;
            let n = self
                .log
                .expire_tombstones(before, PAGE)
                .map_err(|e| self.halt(e))?;
            if n > 0 {
                tracing::warn!(
                    expired = n,
                    "decision tombstones expired (--decision-retention): a participant that \
                     asks about one of those transactions now is told its outcome is unknown"
                );
            }
            if n < PAGE {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
    }
}
