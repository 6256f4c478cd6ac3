//! Retention: finished (COMMITTED / ABORTED) records are removed from the
//! log once they are older than `CoordinatorConfig::retention`, by a
//! background sweep in small pages, so the data directory and the log's
//! memory stay bounded however long the coordinator runs. STUCK and
//! unfinished records are never removed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Coordinator, Inner};
use crate::error::CoordError;
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
}

impl Inner {
    /// One pass from the oldest record; returns how many it removed.
    pub(super) async fn sweep(self: &Arc<Self>) -> Result<u64, CoordError> {
        let cutoff = self
            .now()
            .saturating_sub(self.config.retention.as_millis() as u64);
        let mut after: Option<Gtid> = None;
        let mut removed = 0;
        loop {
            self.check_halted()?;
            let page = self.log.scan(after.as_ref(), &[], PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            let mut reached_young = false;
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
                    self.log.remove(&rec.gtid).map_err(|e| self.halt(e))?;
                    removed += 1;
                }
            }
            if reached_young || page.len() < PAGE {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.purged.fetch_add(removed, Ordering::Relaxed);
        Ok(removed)
    }
}
