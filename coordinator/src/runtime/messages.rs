//! Transactional messages in the request API: `PrepareMessage` records a
//! message (forced) before the business service commits its local
//! transaction, `SubmitMessage` decides its delivery once it has. The
//! engine's side: `tandem_engine`'s `message` module; DESIGN.md
//! "Transactional messages".

use std::time::Duration;

use super::starts::{Start, same_branches};
use super::{Coordinator, Inner};
use crate::engine::{Event, NewBranch, Txn};
use crate::error::CoordError;
use crate::labels::Label;
use crate::model::{Gtid, Mode, TraceContext, TxState};

impl Coordinator {
    /// Records a transactional message: `check` (the business service's
    /// back-check) becomes branch 1, `deliveries` branches 2, 3, …; the
    /// record is durable when this returns. A repeat with the same gtid
    /// and branches answers the same message. Undecided past `timeout`:
    /// checked back.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a bad request (nothing recorded),
    /// `AlreadyExists` when `gtid` names another transaction, `Aborted`
    /// when it names this message dropped already, `Unavailable` when
    /// halted or draining.
    pub async fn prepare_message(
        &self,
        gtid: Gtid,
        check: NewBranch,
        deliveries: Vec<NewBranch>,
        timeout: Option<Duration>,
        labels: Vec<Label>,
        trace: Option<TraceContext>,
    ) -> Result<Gtid, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.check_draining()?;
        let mut branches = vec![check];
        branches.extend(deliveries);
        inner.validate_message(&branches)?;
        let deadline = inner.deadline(timeout)?;
        let now = inner.now();
        let (check, deliveries) = (branches[0].clone(), branches[1..].to_vec());
        match inner
            .start(gtid, true, || {
                let (mut txn, cmds) =
                    Txn::prepare_message(gtid, now, deadline, check.clone(), deliveries.clone());
                txn.label(labels.clone());
                (txn.with_trace(trace), cmds)
            })
            .await?
        {
            Start::New(entry, cmds) => {
                if let Err(e) = super::validate::printable_resources(&branches) {
                    inner.forget(&gtid);
                    return Err(e);
                }
                if let Some(m) = &inner.metrics {
                    m.started(Mode::Msg);
                }
                if let Err(e) = inner.log.write(entry.lock().record()) {
                    inner.forget(&gtid);
                    return Err(inner.halt(e));
                }
                inner.start_deadline_timer(&entry, deadline);
                // The round forces the record: the reply says it is durable.
                let round = inner.spawn_round(&entry, cmds);
                inner.publish_then(gtid, round).await?;
            }
            Start::Live(entry) => {
                not_dropped(&entry.lock().visible_record(), &branches)?;
                // A repeat is answered once the first call's record is on
                // disk too, never before: the business service commits its
                // local transaction on this answer.
                inner
                    .log
                    .force_txn(&gtid)
                    .await
                    .map_err(|e| inner.halt(e))?;
                inner.published(gtid).await?;
            }
            Start::Stored(rec) => not_dropped(&rec, &branches)?,
        }
        Ok(gtid)
    }

    /// The message's local transaction committed: decides delivery
    /// (forced), delivers, and returns COMMITTED, or COMMITTING while some
    /// delivery is being retried. A repeat answers the same.
    ///
    /// # Errors
    ///
    /// `NotFound`, `Aborted` (dropped already), `InvalidArgument` (not a
    /// message), `Unavailable`.
    pub async fn submit_message(&self, gtid: Gtid) -> Result<TxState, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        let entry = match inner.find_for_request(&gtid).await? {
            Some(entry) => entry,
            // Checked back in vain (STUCK, undecided): the client's word
            // decides it now.
            None => {
                let Some(rec) = inner.log.get(&gtid)? else {
                    return removed_message(inner, gtid);
                };
                // Presumed aborted on a shared store (asked about, or
                // submitted, before anything was prepared under it).
                if super::presumed::is_marker(&rec) {
                    dropped_already(&rec)?;
                }
                if rec.mode != Mode::Msg {
                    return Err(not_a_message(gtid));
                }
                match inner.adopt_stuck(gtid)? {
                    Some(entry) => entry,
                    None => return message_state(inner, gtid),
                }
            }
        };
        {
            let txn = entry.lock();
            if txn.record().mode != Mode::Msg {
                return Err(not_a_message(gtid));
            }
            dropped_already(&txn.visible_record())?;
        }
        let stepped = inner.step_request(&entry, Event::Commit).await;
        // A STUCK one left STUCK (decided already) is not driven from here.
        inner.forget_if_stuck(&gtid, &entry);
        let cmds = match stepped {
            // Dropped since the look above (its check's no, an operator):
            // ABORTED, as a message dropped already is answered.
            Err(e @ CoordError::WrongState(_)) => {
                dropped_already(&entry.lock().visible_record())?;
                return Err(e);
            }
            stepped => stepped?,
        };
        inner.spawn_round(&entry, cmds).await?;
        inner
            .wait_for(&entry, |t| t.durable_decision().is_some())
            .await?;
        let txn = entry.lock();
        Ok(super::requests::reported_state(&txn.visible_record()))
    }
}

/// A Submit of a message the log no longer has (retention removed it, or
/// it was never prepared): its tombstone's decision (a dropped message
/// keeps one), "no longer known" past the horizon, else presumed dropped
/// (ABORTED: a gtid never prepared), never NOT_FOUND, which a business
/// service could take for "the check will deliver it".
fn removed_message(inner: &Inner, gtid: Gtid) -> Result<TxState, CoordError> {
    let decided = match inner.log.tombstone(&gtid)? {
        Some(t) if t.mode != Mode::Msg => return Err(not_a_message(gtid)),
        Some(t) => Some(t.decision),
        None => inner.outcome_unrecorded(gtid)?,
    };
    match decided {
        Some(crate::model::Decision::Commit) => Ok(TxState::Committed),
        Some(crate::model::Decision::Abort) => Err(CoordError::Aborted {
            gtid,
            reason: "the message was dropped (or never prepared)".into(),
            abort: None,
        }),
        None => Err(CoordError::Unavailable(format!(
            "message {gtid}: its outcome is not known here yet; ask again shortly"
        ))),
    }
}

/// A repeated `PrepareMessage` names the same message, not dropped: its
/// business service commits its local transaction on the answer, so a
/// message dropped already (its client's rollback, its check, an
/// operator; a gtid presumed aborted on a shared store) is answered
/// ABORTED.
fn not_dropped(rec: &crate::model::TxnRecord, branches: &[NewBranch]) -> Result<(), CoordError> {
    if rec.compacted && rec.mode == Mode::Msg {
        // A tombstone keeps the decision, not the branches.
        dropped_already(rec)?;
    }
    same_branches(rec, Mode::Msg, branches)?;
    dropped_already(rec)
}

/// ABORTED for a message dropped already (to a repeated prepare, to a
/// submit: its local transaction must not commit, or committed in vain).
fn dropped_already(rec: &crate::model::TxnRecord) -> Result<(), CoordError> {
    if rec.decision == Some(crate::model::Decision::Abort) {
        return Err(CoordError::Aborted {
            gtid: rec.gtid,
            reason: rec.reason.clone(),
            abort: rec.abort.clone(),
        });
    }
    Ok(())
}

/// A finished message's answer to a repeated Submit.
fn message_state(inner: &Inner, gtid: Gtid) -> Result<TxState, CoordError> {
    let Some(rec) = inner.log.get(&gtid)? else {
        return removed_message(inner, gtid);
    };
    if super::presumed::is_marker(&rec) {
        dropped_already(&rec)?;
    }
    if rec.mode != Mode::Msg {
        return Err(not_a_message(gtid));
    }
    dropped_already(&rec)?;
    let rec = inner.settled(gtid, Event::Commit)?;
    Ok(super::requests::reported_state(&rec))
}

fn not_a_message(gtid: Gtid) -> CoordError {
    CoordError::InvalidArgument(format!(
        "transaction {gtid} is not a message (SubmitMessage submits what PrepareMessage prepared)"
    ))
}

impl Inner {
    /// A message's branches: the check and at least one delivery, each a
    /// valid branch of no other mode and no order.
    fn validate_message(&self, branches: &[NewBranch]) -> Result<(), CoordError> {
        let invalid = |m: String| Err(CoordError::InvalidArgument(m));
        if branches.len() < 2 {
            return invalid("a message needs at least one delivery".into());
        }
        if branches.len() > self.config.max_branches {
            return invalid(format!(
                "{} branches with the check; at most {}",
                branches.len(),
                self.config.max_branches
            ));
        }
        for b in branches {
            self.validate_branch(b)?;
            if b.mode.is_some_and(|m| m != Mode::Msg) {
                return invalid(
                    "a message's branches are message branches (mode unset or MODE_MSG)".into(),
                );
            }
            if !b.after.is_empty() {
                return invalid("only a saga's steps name steps to run after".into());
            }
        }
        Ok(())
    }
}
