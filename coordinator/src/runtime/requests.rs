//! The request API of [`Coordinator`]: what the gRPC services call.
//!
//! Each request validates, feeds one event to the engine, and hands the
//! commands to a tracked task ([`Inner::spawn_round`]); it then waits for
//! that task, or for the state it needs. Dropping a request's future drops
//! only that wait.

use std::time::Duration;

use bytes::Bytes;

use super::presumed;
use super::starts::{Start, same_branches, same_mode};
use super::validate::check_reason;
use super::{Coordinator, Inner};
use crate::engine::{Command, EngineError, Event, NewBranch, Txn};
use crate::error::CoordError;
use crate::labels::Label;
use crate::log::Presumed;
use crate::model::{AbortInfo, BranchId, Decision, Gtid, Mode, TraceContext, TxState, TxnRecord};

/// The outcome of a one-shot transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// Transaction id.
    pub gtid: Gtid,
    /// COMMITTED / COMMITTING or ABORTED / ABORTING.
    pub state: TxState,
    /// Why it aborted; empty when committed.
    pub reason: String,
    /// Phase-1 reply of each branch, in request order (empty unless yes).
    pub replies: Vec<Bytes>,
    /// Why it aborted, as fields; `None` when committed.
    pub abort: Option<AbortInfo>,
}

/// The outcome of a rollback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackOutcome {
    /// ABORTED, or ABORTING while some branch is being retried.
    pub state: TxState,
    /// Why it aborted: the client's rollback, or the earlier cause.
    pub abort: Option<AbortInfo>,
}

impl Coordinator {
    /// Starts an interactive transaction. With `gtid` (client-chosen, a
    /// UUID v7), a repeat returns the same transaction instead of a second
    /// one, for as long as its record is retained. `trace` (the client's
    /// trace context) is kept for every participant call to carry.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a timeout above the maximum or an unusable
    /// gtid; `AlreadyExists` when `gtid` names a transaction of another
    /// mode; `Unavailable` when halted or draining.
    pub async fn begin(
        &self,
        mode: Mode,
        timeout: Option<Duration>,
        gtid: Option<Gtid>,
        labels: Vec<Label>,
        trace: Option<TraceContext>,
    ) -> Result<Gtid, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.check_draining()?;
        if mode == Mode::Msg {
            return Err(message_only());
        }
        let deadline = inner.deadline(timeout)?;
        let chosen = gtid.is_some();
        let gtid = gtid.unwrap_or_else(|| inner.clock.new_gtid());
        let now = inner.now();
        match inner
            .start(gtid, chosen, || {
                let (mut txn, cmds) = Txn::begin(gtid, mode, now, deadline);
                txn.label(labels.clone());
                (txn.with_trace(trace), cmds)
            })
            .await?
        {
            Start::New(entry, _) => {
                if let Some(m) = &inner.metrics {
                    m.started(mode);
                }
                if let Err(e) = inner.log.write(entry.lock().record()) {
                    inner.forget(&gtid);
                    return Err(inner.halt(e));
                }
                inner.start_deadline_timer(&entry, deadline);
                inner.publish_then(gtid, async { Ok(()) }).await?;
            }
            Start::Live(entry) => {
                same_mode(&entry.lock().visible_record(), mode)?;
                // A repeat is answered once the first one's record is in a
                // shared store too.
                inner.published(gtid).await?;
            }
            Start::Stored(rec) => {
                same_mode(&rec, mode)?;
                if !rec.state.is_terminal() {
                    // Run by another instance: the client goes there.
                    inner.route(gtid).await?;
                }
            }
        }
        Ok(gtid)
    }

    /// Adds a branch and runs its phase 1; returns its id and reply bytes.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` (bad branch), `NotFound`, `WrongState` (not ACTIVE),
    /// `Aborted` (the participant voted no or failed; the transaction aborted).
    pub async fn enlist(
        &self,
        gtid: Gtid,
        branch: NewBranch,
    ) -> Result<(BranchId, Bytes), CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.validate_branch(&branch)?;
        super::validate::printable_resources(std::slice::from_ref(&branch))?;
        if branch.mode == Some(Mode::Msg) {
            return Err(message_only());
        }
        if !branch.after.is_empty() {
            return Err(CoordError::InvalidArgument(
                "an enlisted branch names no steps to run after (an interactive saga's steps \
                 run in the order they are enlisted; give the order in one Submit)"
                    .into(),
            ));
        }
        let Some(entry) = inner.find_for_request(&gtid).await? else {
            return Err(match inner.log.get(&gtid)? {
                Some(rec) => EngineError::WrongState {
                    gtid,
                    state: rec.state,
                    action: "enlist a branch",
                    detail: "; branches can only be added to an ACTIVE transaction".into(),
                }
                .into(),
                None => CoordError::NotFound(gtid),
            });
        };
        if entry.lock().record().branches.len() >= inner.config.max_branches {
            return Err(CoordError::InvalidArgument(format!(
                "transaction {gtid} already has the maximum of {} branches",
                inner.config.max_branches
            )));
        }
        let cmds = inner.step(&entry, Event::Enlist(branch))?;
        let id = cmds.iter().find_map(|c| match c {
            Command::PhaseOne { branch } => Some(*branch),
            _ => None,
        });
        inner.spawn_round(&entry, cmds).await?;
        let txn = entry.lock();
        let rec = txn.visible_record();
        match id.and_then(|id| rec.branch(id)) {
            Some(b) if rec.state == TxState::Active => Ok((b.id, b.reply.clone())),
            _ => Err(CoordError::Aborted {
                gtid,
                reason: rec.reason.clone(),
                abort: rec.abort.clone(),
            }),
        }
    }

    /// Decides commit, forces it, runs phase 2; returns COMMITTED, or
    /// COMMITTING when some branch is being retried in the background. A
    /// repeat while the decision is being forced waits for that force.
    ///
    /// # Errors
    ///
    /// `NotFound`, `WrongState` (aborted, rolled back, one-shot, branch in
    /// flight), `Aborted` (deadline passed), `Unavailable`.
    pub async fn commit(&self, gtid: Gtid) -> Result<TxState, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        let Some(entry) = inner.find_for_request(&gtid).await? else {
            return inner.settled_state(gtid, Event::Commit);
        };
        let cmds = inner.step_request(&entry, Event::Commit).await?;
        inner.spawn_round(&entry, cmds).await?;
        inner
            .wait_for(&entry, |t| t.durable_decision().is_some())
            .await?;
        let txn = entry.lock();
        let rec = txn.visible_record();
        match reported_state(&rec) {
            TxState::Aborting | TxState::Aborted => Err(CoordError::Aborted {
                gtid,
                reason: rec.reason.clone(),
                abort: rec.abort.clone(),
            }),
            state => Ok(state),
        }
    }

    /// Decides abort and runs rollback / cancel; returns ABORTED, or
    /// ABORTING while some branch is being retried.
    ///
    /// # Errors
    ///
    /// `NotFound`, `WrongState` (already decided commit), `Unavailable`.
    pub async fn rollback(
        &self,
        gtid: Gtid,
        reason: String,
    ) -> Result<RollbackOutcome, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        check_reason(&reason)?;
        let entry = match inner.find_for_request(&gtid).await? {
            Some(entry) => entry,
            // A message checked back in vain (STUCK, undecided): its
            // business service's word drops it now.
            None if inner.log.get(&gtid)?.is_some_and(|r| {
                r.mode == Mode::Msg && r.state == TxState::Stuck && r.decision.is_none()
            }) =>
            {
                match inner.adopt_stuck(gtid)? {
                    Some(entry) => entry,
                    None => return rolled_back_already(inner, gtid),
                }
            }
            None => return rolled_back_already(inner, gtid),
        };
        // A decision being forced is answered once it is durable (then a
        // refusal, or the abort's state), never before.
        let stepped = inner.step_request(&entry, Event::Rollback { reason }).await;
        // A STUCK one left STUCK (decided already) is not driven from here.
        inner.forget_if_stuck(&gtid, &entry);
        let cmds = stepped?;
        inner.spawn_round(&entry, cmds).await?;
        let txn = entry.lock();
        let rec = txn.visible_record();
        Ok(RollbackOutcome {
            state: reported_state(&rec),
            abort: rec.abort.clone(),
        })
    }

    /// Runs a whole transaction: records all branches, phase 1 in parallel,
    /// decision, phase 2. With `gtid` (client-chosen, a UUID v7), a repeat
    /// with the same branches waits for and returns the same transaction's
    /// outcome instead of starting a second one, for as long as its record
    /// is retained. `trace` (the client's trace context) is kept for every
    /// participant call to carry.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a bad request (nothing recorded),
    /// `AlreadyExists` when `gtid` names a transaction with other branches,
    /// `Unavailable`. An aborted transaction is an `Ok` outcome with state
    /// ABORTED.
    pub async fn submit(
        &self,
        mode: Mode,
        timeout: Option<Duration>,
        branches: Vec<NewBranch>,
        gtid: Option<Gtid>,
        labels: Vec<Label>,
        trace: Option<TraceContext>,
    ) -> Result<SubmitOutcome, CoordError> {
        let inner = &self.inner;
        inner.check_halted()?;
        inner.check_draining()?;
        if branches.is_empty() {
            return Err(CoordError::InvalidArgument(
                "a transaction needs at least one branch".into(),
            ));
        }
        if branches.len() > inner.config.max_branches {
            return Err(CoordError::InvalidArgument(format!(
                "{} branches; at most {}",
                branches.len(),
                inner.config.max_branches
            )));
        }
        if mode == Mode::Msg || branches.iter().any(|b| b.mode == Some(Mode::Msg)) {
            return Err(message_only());
        }
        for (i, b) in branches.iter().enumerate() {
            inner.validate_branch(b)?;
            if mode != Mode::Saga && !b.after.is_empty() {
                return Err(CoordError::InvalidArgument(
                    "only a saga's steps name steps to run after".into(),
                ));
            }
            if let Some(d) = b.after.iter().find(|d| !(1..=i as u32).contains(d)) {
                return Err(CoordError::InvalidArgument(format!(
                    "step {} runs after {d}, which is not an earlier step (steps are 1 to {})",
                    i + 1,
                    branches.len()
                )));
            }
            if (b.mode.unwrap_or(mode) == Mode::Saga) != (mode == Mode::Saga) {
                return Err(CoordError::InvalidArgument(
                    "a saga holds saga steps only, and a saga step belongs to a saga (MODE_SAGA on the transaction, and no other mode on its branches)"
                        .into(),
                ));
            }
        }
        let deadline = inner.deadline(timeout)?;
        let chosen = gtid.is_some();
        let gtid = gtid.unwrap_or_else(|| inner.clock.new_gtid());
        let now = inner.now();
        let entry = match inner
            .start(gtid, chosen, || {
                let (mut txn, cmds) = Txn::submit(gtid, mode, now, deadline, branches.clone());
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
                    m.started(mode);
                }
                if let Err(e) = inner.log.write(entry.lock().record()) {
                    inner.forget(&gtid);
                    return Err(inner.halt(e));
                }
                inner.start_deadline_timer(&entry, deadline);
                let round = {
                    let (inner, entry) = (inner.clone(), entry.clone());
                    async move { inner.spawn_round(&entry, cmds).await }
                };
                if inner.defers_start(&gtid, deadline) {
                    // Phase 1 goes out at once, on a shared store too: the
                    // first record is written with the decision, one forced
                    // write per transaction (DESIGN.md, "One forced write
                    // per transaction"); a refusal then (another coordinator
                    // began the gtid first, or wrote its presumed abort)
                    // fails the round and drops this copy.
                    round.await?;
                } else {
                    inner.publish_then(gtid, round).await?;
                }
                entry
            }
            Start::Live(entry) => {
                same_branches(&entry.lock().visible_record(), mode, &branches)?;
                entry
            }
            Start::Stored(rec) => {
                same_branches(&rec, mode, &branches)?;
                // Unfinished and run by another instance: the client goes
                // there, or (its owner gone) this instance finishes it.
                if rec.state.is_terminal() {
                    return Ok(submit_outcome(&rec));
                }
                match inner.route(gtid).await? {
                    Some(entry) => entry,
                    // Decided (STUCK here): the outcome stands.
                    None if rec.decision.is_some() => return Ok(submit_outcome(&rec)),
                    // Undecided and not live here yet (being taken over):
                    // a stale copy must not be reported as an outcome.
                    None => {
                        return Err(CoordError::Unavailable(format!(
                            "transaction {gtid} is being taken over; ask again shortly"
                        )));
                    }
                }
            }
        };
        inner.wait_for(&entry, Txn::answerable).await?;
        let outcome = submit_outcome(&entry.lock().visible_record());
        Ok(outcome)
    }

    /// What a participant holding a branch of `gtid` should do: `None`
    /// while undecided (or while a commit decision is being forced), else
    /// the durable decision. A gtid with no record is its decision
    /// tombstone's decision if retention kept one, else `Abort` (presumed
    /// abort: the coordinator never recorded it, so it never committed, or
    /// it finished with every branch acknowledged, so nobody is in doubt).
    ///
    /// # Errors
    ///
    /// `Unavailable` once the log has failed, for everything but a durable
    /// commit; `Forgotten` for a gtid with no record and no tombstone at
    /// or before the horizon of expired tombstones; a log failure.
    pub fn outcome(&self, gtid: Gtid) -> Result<Option<Decision>, CoordError> {
        let inner = &self.inner;
        if inner.check_halted().is_err() {
            // Only what is on disk may be told; after a failed write that
            // is a durable commit, and nothing else is certain.
            if let Some(entry) = inner.find_live(&gtid)
                && entry.lock().durable_decision() == Some(Decision::Commit)
            {
                return Ok(Some(Decision::Commit));
            }
            inner.check_halted()?;
        }
        if let Some(entry) = inner.live_or_claim(&gtid)? {
            return Ok(entry.lock().durable_decision());
        }
        match inner.log.get(&gtid)? {
            Some(rec) => Ok(rec.decision),
            None => inner.outcome_removed(gtid),
        }
    }

    /// The current record of a transaction: the live state for a live one
    /// (a commit decision once durable), else the log's.
    ///
    /// # Errors
    ///
    /// `NotFound`, or a log failure.
    pub fn get(&self, gtid: Gtid) -> Result<TxnRecord, CoordError> {
        if let Some(entry) = self.inner.find_live(&gtid) {
            return Ok(entry.lock().visible_record().into_owned());
        }
        if let Some(rec) = self.inner.log.get(&gtid)? {
            return Ok(rec);
        }
        // Compacted by retention: its decision, marked as such.
        match self.inner.log.tombstone(&gtid)? {
            Some(t) => Ok(t.to_record()),
            None => Err(CoordError::NotFound(gtid)),
        }
    }

    /// Who drives `gtid` on a shared store (`None` on a log only this
    /// coordinator uses).
    ///
    /// # Errors
    ///
    /// A log failure.
    pub fn owner(&self, gtid: Gtid) -> Result<Option<crate::log::Ownership>, CoordError> {
        Ok(self.inner.log.locate(&gtid)?)
    }
}

/// A message is prepared and submitted by its own calls.
fn message_only() -> CoordError {
    CoordError::InvalidArgument(
        "a transactional message (MODE_MSG) is started by PrepareMessage and submitted by \
         SubmitMessage; its branches belong to no other transaction"
            .into(),
    )
}

/// The state a client is told after its request: a STUCK transaction is
/// reported by its decision, as still finishing (COMMITTING / ABORTING),
/// because to the client the outcome is decided and phase 2 is not done.
pub(super) fn reported_state(rec: &TxnRecord) -> TxState {
    match (rec.state, rec.decision) {
        (TxState::Stuck, Some(Decision::Commit)) => TxState::Committing,
        (TxState::Stuck, _) => TxState::Aborting,
        (state, _) => state,
    }
}

/// A Rollback of a transaction no longer live here: the engine's answer
/// on its record (nothing written).
fn rolled_back_already(inner: &Inner, gtid: Gtid) -> Result<RollbackOutcome, CoordError> {
    let rec = inner.settled(
        gtid,
        Event::Rollback {
            reason: String::new(),
        },
    )?;
    Ok(RollbackOutcome {
        state: rec.state,
        abort: rec.abort,
    })
}

fn submit_outcome(rec: &TxnRecord) -> SubmitOutcome {
    SubmitOutcome {
        gtid: rec.gtid,
        state: reported_state(rec),
        reason: rec.reason.clone(),
        replies: rec.branches.iter().map(|b| b.reply.clone()).collect(),
        abort: rec.abort.clone(),
    }
}

impl Inner {
    /// The outcome of a gtid the log has no record of (read before this):
    /// its tombstone's decision, then the horizon of expired tombstones,
    /// read in that order, so a tombstone expiring in between is seen.
    fn outcome_removed(&self, gtid: Gtid) -> Result<Option<Decision>, CoordError> {
        match self.log.tombstone(&gtid)? {
            Some(t) => Ok(Some(t.decision)),
            None => self.outcome_unrecorded(gtid),
        }
    }

    /// The outcome of a gtid with neither record nor tombstone (both read
    /// before this): "no longer known" past the horizon, else presumed
    /// abort (written first on a shared store), `None` while it may still
    /// be written.
    pub(super) fn outcome_unrecorded(&self, gtid: Gtid) -> Result<Option<Decision>, CoordError> {
        // Removed by retention with no tombstone: every branch acknowledged
        // its phase 2, so no participant still needs the answer, and a
        // commit's must never be ABORT (a question delayed past retention).
        // Only a gtid no record ever covered is presumed abort.
        let horizon = self.log.horizon()?;
        if horizon.may_have_forgotten(&gtid) || horizon.may_have_purged(&gtid) {
            return Err(CoordError::Forgotten(gtid));
        }
        // On a shared store a coordinator that began the gtid writes it
        // first at its decision: the abort is written before it is told,
        // and that coordinator's write is refused after it (DESIGN.md,
        // "One forced write per transaction").
        match presumed::unwritten(&gtid, self.now()) {
            presumed::Unwritten::Never => return Ok(Some(Decision::Abort)),
            presumed::Unwritten::Ahead => return Ok(None),
            presumed::Unwritten::Possible => {}
        }
        match self
            .log
            .presume_abort(&presumed::marker(gtid, self.now()))?
        {
            Presumed::Aborted => Ok(Some(Decision::Abort)),
            Presumed::Found(rec) => Ok(rec.decision),
            Presumed::Forgotten => Err(CoordError::Forgotten(gtid)),
        }
    }

    /// Answers a request for a transaction no longer live: the same engine
    /// rules, applied to the record in the log (nothing is written).
    pub(super) fn settled_state(&self, gtid: Gtid, event: Event) -> Result<TxState, CoordError> {
        Ok(self.settled(gtid, event)?.state)
    }

    /// The record of a settled transaction that `event` leaves as it is;
    /// the engine's refusal otherwise.
    pub(super) fn settled(&self, gtid: Gtid, event: Event) -> Result<TxnRecord, CoordError> {
        let rec = self.log.get(&gtid)?.ok_or(CoordError::NotFound(gtid))?;
        if !rec.state.is_terminal() && rec.state != TxState::Stuck {
            return Err(CoordError::Unavailable(format!(
                "transaction {gtid} is being recovered after a restart; ask again shortly"
            )));
        }
        let now = self.now();
        let mut txn = Txn::recover(rec.clone(), now).0;
        txn.handle(event, now)?;
        Ok(rec)
    }
}
