//! Routing on a store several coordinators share: a request for a
//! transaction this instance does not run is redirected to the instance
//! that does (its address goes back to the client), and a transaction
//! whose owner's lease expired is taken over here first, then served.
//!
//! Why redirect rather than forward: the owner checks the caller's own
//! credentials (a forwarding instance would have to act for any caller,
//! admin included, and could not pass on a client certificate), there is
//! no extra hop for the rest of the transaction, and a redirect loop is
//! impossible (the answer names one address, it does not call it). The
//! SDK's `TransactionClient` follows a redirect by itself; any other
//! client reads the address from the status (ErrorInfo reason `MOVED`).
//!
//! On a log only one coordinator uses, there is nobody to route to.

use std::future::Future;
use std::sync::Arc;

use super::starts::MAX_GTID_AHEAD;
use super::{Entry, Inner};
use crate::config::MAX_CLOCK_OFFSET;
use crate::error::CoordError;
use crate::log::LogError;
use crate::model::Gtid;

impl Inner {
    /// On a shared store, makes a new interactive transaction's first
    /// record durable before `then` runs and before the caller hears of
    /// its gtid, so that its `Enlist` and `Commit` can reach any instance
    /// (a one-shot `Submit` forces only its decision: DESIGN.md, "One
    /// forced write per transaction"). Both run in a tracked task,
    /// so a request dropped meanwhile cuts neither short. When another
    /// instance started the same gtid first, this copy is forgotten and
    /// the caller is sent there. (A local log forces no start: a crash
    /// that loses one leaves its participants to presumed abort, and a
    /// client's repeat is covered by rule 3a's exception, `starts.rs`.)
    pub(super) async fn publish_then(
        self: &Arc<Self>,
        gtid: Gtid,
        then: impl Future<Output = Result<(), CoordError>> + Send + 'static,
    ) -> Result<(), CoordError> {
        if !self.log.shared() {
            return then.await;
        }
        let inner = self.clone();
        let task = self.tasks.spawn(async move {
            inner.force_start(gtid).await?;
            then.await
        });
        task.await
            .unwrap_or_else(|e| Err(CoordError::Unavailable(format!("start ended: {e}"))))
    }

    /// Whether a new one-shot transaction's first record may wait for its
    /// decision (one forced write) rather than be forced before phase 1:
    /// always on a log only this coordinator uses; on a shared store when
    /// its deadline (after which it aborts, never commits) comes before
    /// retention could reach its gtid. Retention removes only records
    /// created more than `retention` ago, whose gtids are at most
    /// [`MAX_GTID_AHEAD`] later than their creation, on clocks each at
    /// most [`MAX_CLOCK_OFFSET`] from the store's; a first write whose gtid
    /// the horizon covers is refused and stops this coordinator (safe: no
    /// commit; what the bound buys is not stopping).
    pub(super) fn defers_start(&self, gtid: &Gtid, deadline_ms: u64) -> bool {
        if !self.log.shared() {
            return true;
        }
        let Some(gtid_ms) = crate::log::gtid_ms(gtid) else {
            return true; // the horizon never covers it
        };
        // Two clocks may be an offset apart each way.
        let room = (MAX_GTID_AHEAD + 2 * MAX_CLOCK_OFFSET).as_millis() as u64;
        deadline_ms.saturating_add(room)
            <= gtid_ms.saturating_add(self.config.retention.as_millis() as u64)
    }

    /// Waits until `gtid`'s record is in a shared store (nothing to wait
    /// for otherwise); forgets a copy the store refused.
    pub(super) async fn published(self: &Arc<Self>, gtid: Gtid) -> Result<(), CoordError> {
        if !self.log.shared() {
            return Ok(());
        }
        self.force_start(gtid).await
    }

    /// Forces `gtid`'s start; forgets a copy the store refused.
    async fn force_start(self: &Arc<Self>, gtid: Gtid) -> Result<(), CoordError> {
        match self.log.force_txn(&gtid).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.forget(&gtid);
                if matches!(e, LogError::Refused(_)) {
                    // Another instance began it first: go there.
                    self.route(gtid).await?;
                }
                Err(self.halt(e))
            }
        }
    }

    /// The live entry for a request about `gtid`: live here, waiting for
    /// recovery here, or taken over now from an owner whose lease expired.
    /// `None` when it is not to be run here (finished, STUCK here, or
    /// unknown: the caller answers from the log).
    ///
    /// # Errors
    ///
    /// `Moved` when another live instance runs it; a log failure.
    pub(super) async fn find_for_request(
        self: &Arc<Self>,
        gtid: &Gtid,
    ) -> Result<Option<Arc<Entry>>, CoordError> {
        if let Some(entry) = self.live_or_claim(gtid)? {
            return Ok(Some(entry));
        }
        match self.log.get(gtid)? {
            Some(rec) if !rec.state.is_terminal() => self.route(*gtid).await,
            _ => Ok(None),
        }
    }

    /// For an unfinished `gtid` not live here: `Moved` to its live owner,
    /// or taken over (and returned live) when its owner's lease expired.
    /// `None` when this instance owns it (or the log has no owners).
    pub(super) async fn route(
        self: &Arc<Self>,
        gtid: Gtid,
    ) -> Result<Option<Arc<Entry>>, CoordError> {
        // Twice: when another instance claims it between our look and our
        // claim, the second look names that one.
        for _ in 0..2 {
            let Some(owner) = self.log.locate(&gtid)? else {
                return Ok(None);
            };
            if owner.here {
                return Ok(None);
            }
            if owner.live {
                return Err(CoordError::Moved {
                    gtid,
                    owner: owner.name,
                    address: owner.address,
                });
            }
            // The claim and its handing to recovery run in a tracked task:
            // a request dropped meanwhile must not leave a row claimed here
            // that nothing drives.
            let inner = self.clone();
            let claimed = self
                .tasks
                .spawn(async move {
                    let claimed = inner.log.take_over(&gtid).await?.contains(&gtid);
                    if claimed {
                        inner.recovering_set().insert(gtid);
                    }
                    Ok::<bool, CoordError>(claimed)
                })
                .await
                .unwrap_or_else(|e| Err(CoordError::Unavailable(format!("takeover ended: {e}"))))?;
            if claimed {
                tracing::info!(%gtid, former_owner = %owner.name, epoch = owner.epoch + 1,
                    "took over a transaction whose owner's lease expired, for a request");
                return self.live_or_claim(&gtid);
            }
        }
        Ok(None)
    }
}
