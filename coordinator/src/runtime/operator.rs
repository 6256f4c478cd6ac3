//! An operator's actions on one transaction (`tandem tx retry`, `abort`,
//! `resolve`, and the console's buttons): the same engine events as any
//! request, applied to a live transaction or to a STUCK one read back from
//! the log.

use std::sync::Arc;

use super::validate::check_reason;
use super::{Coordinator, Entry, Inner};
use crate::engine::{Event, Txn};
use crate::error::CoordError;
use crate::model::{BranchId, Gtid, Resolution, TxState};

impl Coordinator {
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
        check_reason(&reason)?;
        self.operator(gtid, Event::OperatorAbort { reason }).await
    }

    /// An operator settles branch `branch` of a STUCK transaction by hand
    /// (`tandem tx resolve`), as committed or rolled back (which must be
    /// its decision); kept in the record with who and why, durably before
    /// this returns. Returns the state after it.
    ///
    /// # Errors
    ///
    /// `NotFound`; `WrongState` unless STUCK with that branch owing its
    /// phase 2 (or a message's branch 1, undecided past its deadline), or
    /// when `commit` contradicts the decision;
    /// `InvalidArgument` for a missing or over-long reason; `Unavailable`.
    pub async fn resolve(
        &self,
        gtid: Gtid,
        branch: BranchId,
        commit: bool,
        by: String,
        reason: String,
    ) -> Result<TxState, CoordError> {
        check_reason(&reason)?;
        if reason.trim().is_empty() {
            return Err(CoordError::InvalidArgument(
                "a reason is required to settle a branch by hand".into(),
            ));
        }
        let resolution = Resolution {
            by,
            reason,
            at_ms: self.inner.now(),
        };
        let event = Event::OperatorResolve {
            branch,
            commit,
            resolution,
        };
        let (state, entry) = self.operator_on(gtid, event).await?;
        if state == TxState::Stuck
            && let Some(entry) = entry
        {
            // Still waiting for the operator on another branch: nothing
            // runs for it until then.
            self.inner.forget_if_stuck(&gtid, &entry);
        }
        Ok(state)
    }

    async fn operator(&self, gtid: Gtid, event: Event) -> Result<TxState, CoordError> {
        Ok(self.operator_on(gtid, event).await?.0)
    }

    /// An operator's `event` on `gtid`; the state after its first round,
    /// and the live entry it acted on (none for a finished transaction).
    async fn operator_on(
        &self,
        gtid: Gtid,
        event: Event,
    ) -> Result<(TxState, Option<Arc<Entry>>), CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        let entry = match inner.find_for_request(&gtid).await? {
            Some(entry) => entry,
            None => match inner.adopt_stuck(gtid)? {
                Some(entry) => entry,
                // Finished: the engine's answer on the stored record.
                None => return Ok((inner.settled_state(gtid, event)?, None)),
            },
        };
        let cmds = match inner.step_request(&entry, event).await {
            Ok(cmds) => cmds,
            Err(e) => {
                inner.forget_if_stuck(&gtid, &entry);
                return Err(e);
            }
        };
        inner.spawn_round(&entry, cmds).await?;
        let state = entry.lock().visible_record().state;
        Ok((state, Some(entry)))
    }
}

impl Inner {
    /// Makes a STUCK record from the log live again (an operator acts on
    /// it), reading it under the live-table lock.
    pub(super) fn adopt_stuck(&self, gtid: Gtid) -> Result<Option<Arc<Entry>>, CoordError> {
        let mut live = self.live_table();
        if let Some(entry) = live.get(&gtid) {
            return Ok(Some(entry.clone()));
        }
        let rec = self.log.get(&gtid)?.ok_or(CoordError::NotFound(gtid))?;
        if rec.state != TxState::Stuck {
            return Ok(None);
        }
        let (txn, _) = Txn::recover(rec, self.now());
        let entry = self.new_entry(txn);
        live.insert(gtid, entry.clone());
        Ok(Some(entry))
    }
}
