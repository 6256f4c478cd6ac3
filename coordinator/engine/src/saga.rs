//! Saga: the engine's sequencing of a saga's steps (DESIGN.md "Saga").
//!
//! A saga is driven by the same states as 2PC and TCC; only the order of
//! its calls differs:
//!
//! - **Forward, one at a time.** A step's action (its phase-1 call, a
//!   try) goes out once the step before it said yes; a one-shot saga's
//!   start is forced before the first action, so a crash never forgets a
//!   step that may have run. All said yes: the commit decision, then a
//!   confirm per step (a no-op for the handler that closes its barrier
//!   row).
//! - **Backward, one at a time, newest first.** Under an abort, only the
//!   newest step that ran or may have run is compensated (cancelled) at a
//!   time, and none while an action is still out (it may yet complete: it
//!   is then the newest); each acknowledged compensation starts the next.
//!   A compensation given up on (retry policy, or a participant saying it
//!   will never succeed) stops the walk: the saga is STUCK with the older
//!   steps not compensated, for an operator (`tandem tx resolve` the step,
//!   then `tandem tx retry` goes on with the older ones).
//! - **Steps never started are not called.** While this process started
//!   the saga ([`Txn::sends_known`]), a step whose action never went out is
//!   settled as compensated at the abort. After a restart or a takeover
//!   that is not known, and every step not yet compensated gets its
//!   compensation (the barrier records one that finds no action, and
//!   refuses the action if it ever arrives late).

use crate::model::{AbortCause, AbortInfo, BranchId, BranchState, Mode, TxState};
use crate::{Command, Txn};

impl Txn {
    pub(crate) fn is_saga(&self) -> bool {
        self.rec.mode == Mode::Saga
    }

    /// After a step's yes while undecided: the next step's action, or
    /// nothing when none is left to start (the caller decides then).
    pub(crate) fn next_step(&mut self, now: u64) -> Vec<Command> {
        let next = self
            .rec
            .branches
            .iter()
            .find(|b| b.state == BranchState::Registered && !self.phase_one.contains(&b.id))
            .map(|b| b.id);
        let Some(id) = next else {
            return Vec::new();
        };
        if now >= self.rec.deadline_ms {
            // Past the deadline no action starts (the deadline's timer may
            // not have fired yet).
            return self.abort(AbortInfo::new(AbortCause::Deadline, ""), now);
        }
        self.phase_one.insert(id);
        self.rec.updated_ms = now;
        // The step before is written as done (not forced: losing it only
        // means that step is compensated after a restart, as it would be).
        vec![Command::Persist, Command::PhaseOne { branch: id }]
    }

    /// At an abort: steps whose action never went out are settled, when
    /// this process knows which went out.
    pub(crate) fn settle_unstarted_steps(&mut self, now: u64) {
        if !self.is_saga() || !self.sends_known {
            return;
        }
        for b in &mut self.rec.branches {
            if b.state == BranchState::Registered && !self.phase_one.contains(&b.id) {
                b.state = BranchState::RolledBack;
                b.updated_ms = now;
            }
        }
    }

    /// The one compensation to start now under an abort: the newest step
    /// that needs one, when no action or compensation is out and none was
    /// given up on. Each compensation has the retry policy's whole budget
    /// (it starts when the step's turn comes, not at the decision).
    pub(crate) fn next_compensation(&mut self, now: u64) -> Option<BranchId> {
        let id = self.newest_owed()?;
        self.budget_start = now;
        self.failures.remove(&id);
        Some(id)
    }

    /// The step [`Txn::next_compensation`] would start, if any.
    fn newest_owed(&self) -> Option<BranchId> {
        if self.rec.state != TxState::Aborting
            || !self.phase_one.is_empty()
            || !self.phase_two.is_empty()
            || !self.parked.is_empty()
        {
            return None;
        }
        self.rec
            .branches
            .iter()
            .rev()
            .map(|b| b.id)
            .find(|id| self.needs_phase_two(*id))
    }
}
