//! Saga: the engine's sequencing of a saga's steps (DESIGN.md "Saga").
//!
//! A saga is driven by the same states as 2PC and TCC; only the order of
//! its calls differs:
//!
//! - **Forward, each step once the steps before it are done.** A step's
//!   action (its phase-1 call, a try) goes out once every step it runs
//!   after (`BranchRecord::after`; by default the one before) said yes;
//!   independent steps go out together. A one-shot saga's
//!   start is forced before the first action, so a crash never forgets a
//!   step that may have run. All said yes: the commit decision, then a
//!   confirm per step (a no-op for the handler that closes its barrier
//!   row).
//! - **Backward, each step once the steps after it are undone.** Under
//!   an abort, a step that ran or may have run is compensated (cancelled)
//!   once no step that runs after it still owes its compensation (in a
//!   sequence: one at a time, newest first; independent steps of a graph
//!   in parallel), and none while an action is still out (it may yet
//!   complete). A compensation given up on (retry policy, or a participant
//!   saying it will never succeed) stops the walk along its chain: the
//!   steps it runs after stay uncompensated and the saga ends STUCK, for
//!   an operator (`tandem tx resolve` the step, then `tandem tx retry`
//!   goes on).
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

    /// Fills in a one-shot saga's order: when no step names the steps it
    /// runs after, each runs after the one before it. Names that are not
    /// earlier steps are dropped (the runtime refuses them first).
    pub fn saga_order(branches: &mut [crate::NewBranch]) {
        if branches.iter().all(|b| b.after.is_empty()) {
            for (i, b) in branches.iter_mut().enumerate().skip(1) {
                b.after = vec![i as BranchId];
            }
        }
        for (i, b) in branches.iter_mut().enumerate() {
            let id = i as BranchId + 1;
            b.after.retain(|d| (1..id).contains(d));
            b.after.sort_unstable();
            b.after.dedup();
        }
    }

    /// After a step's yes while undecided (and at the start): the action
    /// of every step whose steps before are all done, or nothing when none
    /// is ready (the caller decides once every step is done).
    pub(crate) fn next_step(&mut self, now: u64) -> Vec<Command> {
        let done = |id: &BranchId, rec: &crate::model::TxnRecord| {
            rec.branch(*id)
                .is_some_and(|b| b.state == BranchState::Prepared)
        };
        let ready: Vec<BranchId> = self
            .rec
            .branches
            .iter()
            .filter(|b| b.state == BranchState::Registered && !self.phase_one.contains(&b.id))
            .filter(|b| !self.forward.contains(&b.id))
            .filter(|b| b.after.iter().all(|d| done(d, &self.rec)))
            .map(|b| b.id)
            .collect();
        if ready.is_empty() {
            return Vec::new();
        }
        if now >= self.rec.deadline_ms {
            // Past the deadline no action starts (the deadline's timer may
            // not have fired yet).
            return self.abort(AbortInfo::new(AbortCause::Deadline, ""), now);
        }
        self.rec.updated_ms = now;
        // The step before is written as done (not forced: losing it only
        // means that step is compensated after a restart, as it would be).
        let mut cmds = vec![Command::Persist];
        for id in ready {
            self.phase_one.insert(id);
            cmds.push(Command::PhaseOne { branch: id });
        }
        cmds
    }

    /// A step's action failed in a way that may pass (an error, a timeout,
    /// its participant unreachable): it is sent again after the retry
    /// policy's backoff, until it answers or the saga's deadline aborts it
    /// (then, if it may have run, it is compensated like any step that
    /// ran). The error shows on the step meanwhile.
    pub(crate) fn retry_action(
        &mut self,
        id: BranchId,
        error: String,
        may_have_run: bool,
        now: u64,
    ) -> Vec<Command> {
        let gtid = self.rec.gtid;
        self.rec.updated_ms = now;
        let Some(b) = self.rec.branch_mut(id) else {
            return Vec::new();
        };
        if may_have_run {
            b.state = BranchState::Failed;
        }
        b.last_error = crate::model::cap_text(
            &format!("action failed, retried: {error}"),
            crate::model::MAX_STORED_TEXT,
        );
        b.updated_ms = now;
        let attempts = b.attempts;
        let failures = self.failures.entry(id).or_default();
        *failures += 1;
        let delay = self
            .policy
            .delay(*failures, crate::phase_two::jitter(&gtid, id, attempts));
        if let Some(b) = self.rec.branch_mut(id) {
            b.next_attempt_ms = now + delay.as_millis() as u64;
        }
        self.forward.insert(id);
        vec![Command::Persist, Command::ActionLater { branch: id, delay }]
    }

    /// A step's forward retry is due: its action goes out again, unless
    /// the saga was decided meanwhile.
    pub(crate) fn action_due(&mut self, id: BranchId, now: u64) -> Vec<Command> {
        if !self.forward.remove(&id) || self.rec.state != TxState::Preparing {
            return Vec::new();
        }
        if now >= self.rec.deadline_ms {
            return self.abort(AbortInfo::new(AbortCause::Deadline, ""), now);
        }
        let Some(b) = self.rec.branch_mut(id) else {
            return Vec::new();
        };
        b.attempts += 1;
        b.next_attempt_ms = 0;
        b.updated_ms = now;
        self.phase_one.insert(id);
        vec![Command::PhaseOne { branch: id }]
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
                // A forward retry it waited for never comes.
                b.next_attempt_ms = 0;
                b.updated_ms = now;
            }
        }
    }

    /// The compensations to start now under an abort: every step that
    /// needs one and that no later step still owing its own depends on
    /// (newest first along each chain; independent steps in parallel),
    /// none while an action is out. Each has the retry policy's whole
    /// budget from its turn, not from the decision.
    pub(crate) fn next_compensations(&mut self, now: u64) -> Vec<BranchId> {
        if self.rec.state != TxState::Aborting || !self.phase_one.is_empty() {
            return Vec::new();
        }
        // The steps some step still owing its compensation runs after:
        // one pass over the graph (not one per step: a long saga's every
        // acknowledgement would cost its length squared).
        let blocked: std::collections::HashSet<BranchId> = self
            .rec
            .branches
            .iter()
            .filter(|b| owes_compensation(b.state))
            .flat_map(|b| b.after.iter().copied())
            .collect();
        let ids: Vec<BranchId> = self
            .rec
            .branches
            .iter()
            .rev()
            .map(|b| b.id)
            .filter(|id| !blocked.contains(id) && self.needs_phase_two(*id))
            .collect();
        for id in &ids {
            self.failures.remove(id);
            self.turn_start.insert(*id, now);
        }
        ids
    }

    /// A step that runs after `id` and still owes its compensation (or is
    /// having it), which `id`'s compensation must wait for.
    pub(crate) fn blocking_dependent(&self, id: BranchId) -> Option<BranchId> {
        self.rec
            .branches
            .iter()
            .filter(|b| b.after.contains(&id))
            .find(|b| owes_compensation(b.state))
            .map(|b| b.id)
    }
}

/// A step in this state still owes its compensation (or is having it):
/// the steps it runs after wait for it.
fn owes_compensation(state: BranchState) -> bool {
    matches!(
        state,
        BranchState::Registered
            | BranchState::Prepared
            | BranchState::Failed
            | BranchState::Refused
    )
}
