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

use std::sync::Arc;

use super::{Entry, Inner};
use crate::error::CoordError;
use crate::model::Gtid;

impl Inner {
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
            let claimed = self.log.take_over(&gtid).await?;
            if claimed.contains(&gtid) {
                tracing::info!(%gtid, former_owner = %owner.name, epoch = owner.epoch + 1,
                    "took over a transaction whose owner's lease expired, for a request");
                self.recovering_set().insert(gtid);
                return self.live_or_claim(&gtid);
            }
        }
        Ok(None)
    }
}
