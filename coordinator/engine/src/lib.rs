//! The protocol engine: one state machine per global transaction.
//!
//! Pure: events in, commands out. No tokio, no sled, no tonic. The runtime
//! feeds it [`Event`]s (client requests, participant replies, timers, the
//! log's "forced" signal) and carries out the [`Command`]s it returns, in
//! order. Unit tests and simulations drive it directly.
//!
//! The rules it enforces (DESIGN.md "The rules that make it correct"):
//! - commit needs a yes from every branch; any no, failure, deadline or
//!   rollback decides abort;
//! - a commit decision is forced ([`Command::ForceDecision`]) and no
//!   commit / confirm call is emitted until [`Event::DecisionDurable`];
//! - an abort needs no force (presumed abort: a lost abort record reads as
//!   undecided, and undecided means abort), except for a transaction whose
//!   gtid the client chose: that abort is forced like a commit, and
//!   nothing of it (phase 2, the outcome) shows before it is durable;
//! - an enlisted branch is forced ([`Command::Force`]) before its phase-1
//!   call, so that recovery knows every branch that may hold a reservation;
//! - a decision never changes;
//! - phase 2 goes to every branch that may hold work and is repeated until
//!   each acknowledges; a branch whose phase-1 call is still in flight gets its
//!   abort call only once that call has returned, so the two do not race;
//! - a branch that exhausts the retry policy is left alone; once nothing else
//!   is in flight the transaction becomes STUCK, its decision kept, and only
//!   an operator's retry ([`Event::OperatorRetry`]) drives it again.
//!
//! The crate (`tandem-engine`) also holds what the state machine works on:
//! [`model`], the transaction record (plain data); [`labels`], the caller
//! labels kept with a record; and [`RetryPolicy`], phase-2 backoff and when
//! to give up. It depends on plain-data crates only (bytes, uuid, the trace
//! context without its transport), so the compiler keeps tokio, tonic,
//! sled and PostgreSQL out of it.

use std::collections::{BTreeMap, BTreeSet};

pub mod labels;
mod message;
pub mod model;
mod phase_one;
mod phase_two;
mod retry;
mod saga;
mod types;

pub use message::LOCAL_BRANCH;
pub use retry::RetryPolicy;
pub use types::{Command, EngineError, Event, NewBranch, Vote};

use crate::model::{AbortCause, AbortInfo, BranchId, Decision, Gtid, Mode, TxState, TxnRecord};

/// One transaction's state machine.
#[derive(Clone, Debug)]
pub struct Txn {
    rec: TxnRecord,
    /// The decision may be acted on and told: a forced one (a commit, or
    /// an abort of a client-chosen gtid) is on disk; an unforced abort is
    /// durable as soon as it is made.
    durable: bool,
    /// The state before a forced decision, shown to readers until that
    /// decision is durable (see [`Txn::visible_record`]).
    undecided: TxState,
    /// Branches whose phase-1 call has not returned.
    phase_one: BTreeSet<BranchId>,
    /// Saga steps whose failed action waits for its forward retry.
    forward: BTreeSet<BranchId>,
    /// Branches with a phase-2 call in flight or a retry scheduled.
    phase_two: BTreeSet<BranchId>,
    /// The subset of `phase_two` waiting for a scheduled retry.
    waiting: BTreeSet<BranchId>,
    /// Branches given up on under the retry policy.
    parked: BTreeSet<BranchId>,
    /// Failed phase-2 calls in a row per branch, since `budget_start`.
    failures: BTreeMap<BranchId, u32>,
    /// When the current retry budget started (decision, restart, or
    /// operator retry), ms.
    budget_start: u64,
    /// When each saga compensation's turn came, ms: its budget starts
    /// then (or at `budget_start`, if later), not when another chain's
    /// compensation started.
    turn_start: BTreeMap<BranchId, u64>,
    policy: RetryPolicy,
    /// An abort decision is forced like a commit (client-chosen gtid whose
    /// record is not known to be durable yet).
    force_abort: bool,
    /// Phase 1 may have gone out for this gtid before (an earlier
    /// incarnation, its start lost in a crash): a refused connection does
    /// not prove the branch holds nothing (DESIGN.md rule 3a).
    sent_before: bool,
    /// This process started the transaction, so it knows which phase-1
    /// calls went out (a saga's steps never started are then not
    /// compensated). False for a record read back from the log.
    sends_known: bool,
}

impl Txn {
    /// Starts an interactive transaction (ACTIVE, no branches).
    pub fn begin(gtid: Gtid, mode: Mode, now: u64, deadline: u64) -> (Txn, Vec<Command>) {
        let rec = TxnRecord::new(gtid, mode, TxState::Active, now, deadline);
        let mut txn = Txn::from_record(rec);
        txn.sends_known = true;
        (txn, vec![Command::Persist])
    }

    /// Starts a one-shot transaction: all branches recorded, phase 1 on all
    /// (a saga: its start forced, then the first step's action only).
    pub fn submit(
        gtid: Gtid,
        mode: Mode,
        now: u64,
        deadline: u64,
        branches: Vec<NewBranch>,
    ) -> (Txn, Vec<Command>) {
        let rec = TxnRecord::new(gtid, mode, TxState::Preparing, now, deadline);
        let mut txn = Txn::from_record(rec);
        txn.sends_known = true;
        let mut branches = branches;
        if txn.is_saga() {
            Txn::saga_order(&mut branches);
        } else {
            for b in &mut branches {
                b.after.clear();
            }
        }
        let mut cmds = vec![Command::Persist];
        for b in branches {
            let id = txn.add_branch(b, now);
            cmds.push(Command::PhaseOne { branch: id });
        }
        if txn.is_saga() {
            txn.phase_one.clear();
            cmds = vec![Command::Force];
            cmds.extend(txn.next_step(now));
        }
        (txn, cmds)
    }

    /// Takes over a transaction read back from the log after a restart:
    /// undecided → abort; decided → phase 2 again; STUCK stays as it is.
    pub fn recover(rec: TxnRecord, now: u64) -> (Txn, Vec<Command>) {
        let mut txn = Txn::from_record(rec);
        txn.budget_start = now;
        let cmds = match txn.rec.state {
            // A message's local transaction may have committed: it is
            // checked back, never presumed aborted.
            TxState::Preparing if txn.is_message() => txn.recover_message(now),
            TxState::Active | TxState::Preparing => {
                txn.abort(AbortInfo::new(AbortCause::CoordinatorRestart, ""), now)
            }
            TxState::Committing | TxState::Aborting => {
                txn.durable = true;
                let mut cmds = vec![Command::Persist];
                txn.start_phase_two(&mut cmds, now);
                cmds
            }
            TxState::Committed | TxState::Aborted | TxState::Stuck => {
                txn.durable = true;
                Vec::new()
            }
        };
        (txn, cmds)
    }

    /// Uses `policy` for phase-2 retries (the default is
    /// [`RetryPolicy::default`]).
    pub fn with_policy(mut self, policy: RetryPolicy) -> Txn {
        self.policy = policy;
        self
    }

    /// Keeps `trace` (the starting call's trace context) in the record,
    /// for every participant call to carry.
    pub fn with_trace(mut self, trace: Option<crate::model::TraceContext>) -> Txn {
        self.rec.traceparent = trace;
        self
    }

    /// Forces an abort decision like a commit one: no rollback / cancel
    /// call and no outcome before it is durable (for a transaction whose
    /// gtid the client chose; see DESIGN.md rule 1).
    pub fn with_forced_abort(mut self) -> Txn {
        self.force_abort = true;
        self
    }

    /// Marks that phase 1 may already have gone out for this gtid (a
    /// client-chosen gtid older than this incarnation, on a log that does
    /// not force a start): a phase-1 call refused at the connection is
    /// then a failure to roll back, not a branch settled at once.
    pub fn with_phase_one_maybe_sent_before(mut self) -> Txn {
        self.sent_before = true;
        self
    }

    /// Whether phase 1 may have gone out for this gtid before this run.
    pub fn phase_one_maybe_sent_before(&self) -> bool {
        self.sent_before
    }

    fn from_record(mut rec: TxnRecord) -> Txn {
        // A saga written before steps named their order is a sequence.
        if rec.mode == Mode::Saga && rec.branches.iter().all(|b| b.after.is_empty()) {
            for (i, b) in rec.branches.iter_mut().enumerate().skip(1) {
                b.after = vec![i as BranchId];
            }
        }
        Txn {
            budget_start: rec.updated_ms,
            undecided: rec.state,
            rec,
            durable: false,
            phase_one: BTreeSet::new(),
            forward: BTreeSet::new(),
            phase_two: BTreeSet::new(),
            waiting: BTreeSet::new(),
            parked: BTreeSet::new(),
            failures: BTreeMap::new(),
            turn_start: BTreeMap::new(),
            policy: RetryPolicy::default(),
            force_abort: false,
            sent_before: false,
            sends_known: false,
        }
    }

    /// Attaches the caller's labels (before the first write).
    pub fn label(&mut self, labels: Vec<crate::labels::Label>) {
        self.rec.labels = labels;
    }

    /// The record as it stands (what [`Command::Persist`] writes). It may
    /// carry a decision that is not durable yet: only the runtime's log
    /// writes use it; readers get [`Txn::visible_record`].
    pub fn record(&self) -> &TxnRecord {
        &self.rec
    }

    /// The record as others may see it: a forced decision appears only
    /// once it is durable ([`Event::DecisionDurable`]). Until then the
    /// transaction reads as it was before the decision, undecided, since a
    /// crash in that window may read back as undecided (or, for a new
    /// client-chosen gtid, as nothing at all).
    pub fn visible_record(&self) -> std::borrow::Cow<'_, TxnRecord> {
        if self.decision_pending() {
            let mut rec = self.rec.clone();
            rec.state = self.undecided;
            rec.decision = None;
            rec.reason = String::new();
            rec.abort = None;
            std::borrow::Cow::Owned(rec)
        } else {
            std::borrow::Cow::Borrowed(&self.rec)
        }
    }

    /// The decision as others may learn it: `None` while undecided or while
    /// the decision is still being forced.
    pub fn durable_decision(&self) -> Option<Decision> {
        if self.decision_pending() {
            None
        } else {
            self.rec.decision
        }
    }

    /// Whether a decision is made but being forced: not durable yet.
    pub fn decision_pending(&self) -> bool {
        self.rec.decision.is_some() && !self.durable
    }

    /// Whether phase 1 is over: decided durably, and no phase-1 call is in
    /// flight.
    pub fn settled(&self) -> bool {
        self.durable_decision().is_some() && self.phase_one.is_empty()
    }

    /// Settled, and no phase-2 call out (every branch finished, or waiting
    /// for a scheduled retry): what a Submit answers at, so that COMMITTING
    /// means "a branch is being retried", whichever round decided.
    pub fn answerable(&self) -> bool {
        self.settled() && self.phase_two.iter().all(|id| self.waiting.contains(id))
    }

    /// Whether a phase-1 call of this branch is still out.
    pub fn in_phase_one(&self, branch: BranchId) -> bool {
        self.phase_one.contains(&branch)
    }

    /// Applies one event at wall-clock time `now` (ms).
    ///
    /// # Errors
    ///
    /// [`EngineError`] when a client request does not fit the state; the
    /// transaction is unchanged then. [`EngineError::DecisionPending`] for
    /// a commit, rollback or operator request while a decision is being
    /// forced: its answer depends on that decision, so the caller asks
    /// again once it is durable. Participant replies and timers never
    /// fail: late or repeated ones are absorbed.
    pub fn handle(&mut self, event: Event, now: u64) -> Result<Vec<Command>, EngineError> {
        let answers_on_decision = matches!(
            event,
            Event::Commit
                | Event::Rollback { .. }
                | Event::OperatorRetry
                | Event::OperatorAbort { .. }
        );
        if answers_on_decision && self.decision_pending() {
            return Err(EngineError::DecisionPending {
                gtid: self.rec.gtid,
            });
        }
        match event {
            Event::Enlist(branch) => self.on_enlist(branch, now),
            Event::PhaseOne { branch, vote } if self.is_message() && branch == LOCAL_BRANCH => {
                Ok(self.on_checked(vote, now))
            }
            Event::PhaseOne { branch, vote } => Ok(self.on_phase_one(branch, vote, now)),
            Event::Commit if self.is_message() => self.submit_message(now),
            Event::Commit => self.on_commit(now),
            Event::Rollback { reason } => {
                self.on_rollback(AbortInfo::new(AbortCause::ClientRollback, reason), now)
            }
            Event::DeadlinePassed if self.is_message() => Ok(self.check_back(now)),
            Event::DeadlinePassed => Ok(if self.rec.state.is_decided() {
                Vec::new()
            } else {
                self.abort(AbortInfo::new(AbortCause::Deadline, ""), now)
            }),
            Event::DecisionDurable => {
                let mut cmds = Vec::new();
                if self.decision_pending() {
                    self.durable = true;
                    self.start_phase_two(&mut cmds, now);
                }
                Ok(cmds)
            }
            Event::PresumedAborted => Ok(self.on_presumed_aborted(now)),
            Event::PhaseTwo { branch, result } => Ok(self.on_phase_two(branch, result, now)),
            Event::PhaseTwoRefused { branch, error } => {
                Ok(self.on_phase_two_refused(branch, error, now))
            }
            Event::OperatorResolve {
                branch,
                commit,
                resolution,
            } => self.on_operator_resolve(branch, commit, resolution, now),
            Event::RetryDue { branch }
                if self.is_message() && branch == LOCAL_BRANCH && !self.rec.state.is_decided() =>
            {
                Ok(self.check_due(now))
            }
            Event::ActionDue { branch } => Ok(self.action_due(branch, now)),
            Event::RetryDue { branch } => {
                let mut cmds = Vec::new();
                if self.waiting.remove(&branch) {
                    self.phase_two.remove(&branch);
                    self.call_phase_two(branch, &mut cmds);
                }
                Ok(cmds)
            }
            Event::OperatorRetry => self.on_operator_retry(now),
            Event::OperatorAbort { reason } => {
                self.on_rollback(AbortInfo::new(AbortCause::OperatorAbort, reason), now)
            }
        }
    }

    /// A refusal, told from what others may see: a decision still being
    /// forced is neither named nor hinted at by its reason.
    fn wrong_state(&self, action: &'static str, detail: &str) -> EngineError {
        let seen = self.visible_record();
        let detail = if self.decision_pending() {
            "; it is being decided".to_string()
        } else if seen.reason.is_empty() {
            detail.to_string()
        } else {
            format!("{detail}; reason: {}", seen.reason)
        };
        EngineError::WrongState {
            gtid: seen.gtid,
            state: seen.state,
            action,
            detail,
        }
    }
}

#[cfg(test)]
mod abort_tests;

#[cfg(test)]
mod message_tests;

#[cfg(test)]
mod mixed_tests;

#[cfg(test)]
mod no_vote_tests;

#[cfg(test)]
mod permanent_tests;

#[cfg(test)]
mod saga_tests;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod visibility_tests;
