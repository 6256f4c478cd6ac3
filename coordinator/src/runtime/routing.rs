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

use super::{Entry, Inner};
use crate::error::CoordError;
use crate::log::LogError;
use crate::model::Gtid;

impl Inner {
    /// On a shared store, makes a new transaction's first record durable
    /// before `then` runs (its phase-1 calls) and before the caller hears
    /// of it — otherwise another instance, asked by a participant about a
    /// gtid it cannot find, would answer "presumed abort" for a
    /// transaction that may still commit here. Both run in a tracked task,
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
