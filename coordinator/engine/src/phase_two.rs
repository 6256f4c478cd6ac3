//! Phase 2: calling every branch that needs it under the decision,
//! retrying failures with backoff, parking branches past the retry policy
//! (STUCK), and an operator's retry.

use std::time::Duration;

use super::{Command, EngineError, Txn};
use crate::model::{
    AbortCause, AbortInfo, BranchId, BranchState, Decision, Gtid, MAX_STORED_TEXT, Resolution,
    TxState, cap_text,
};

impl Txn {
    /// Never called while a decision is being forced (`handle` answers
    /// [`EngineError::DecisionPending`]): phase 2 starts when it is on
    /// disk, never before.
    pub(super) fn on_operator_retry(&mut self, now: u64) -> Result<Vec<Command>, EngineError> {
        if self.is_message() && self.rec.decision.is_none() {
            match self.rec.state {
                TxState::Stuck => return Ok(self.retry_check(now)),
                TxState::Preparing if now >= self.rec.deadline_ms => {
                    return Ok(self.retry_check(now));
                }
                TxState::Preparing => {
                    // Checking back early would drop a message whose local
                    // transaction is still running (the check closes it).
                    return Err(self.wrong_state(
                        "retry",
                        "; the message waits for its Submit until its deadline, and is checked \
                         back then",
                    ));
                }
                _ => {}
            }
        }
        let mut cmds = vec![Command::Persist];
        match self.rec.state {
            TxState::Active | TxState::Preparing => {
                if now < self.rec.deadline_ms {
                    return Err(self.wrong_state(
                        "retry",
                        "; it is undecided and within its deadline (abort it to end it now)",
                    ));
                }
                return Ok(self.abort(
                    AbortInfo::new(AbortCause::OperatorAbort, "retried past its deadline"),
                    now,
                ));
            }
            TxState::Committed | TxState::Aborted => return Ok(Vec::new()),
            TxState::Stuck => {
                self.rec.state = match self.rec.decision {
                    Some(Decision::Commit) => TxState::Committing,
                    Some(Decision::Abort) => TxState::Aborting,
                    None => {
                        return Err(self.wrong_state("retry", "; its record has no decision"));
                    }
                };
                self.durable = true;
            }
            TxState::Committing | TxState::Aborting => {
                // Retries due later run now.
                for id in std::mem::take(&mut self.waiting) {
                    self.phase_two.remove(&id);
                    self.call_phase_two(id, &mut cmds);
                }
            }
        }
        self.budget_start = now;
        self.failures.clear();
        self.parked.clear();
        self.rec.updated_ms = now;
        self.start_phase_two(&mut cmds, now);
        Ok(cmds)
    }

    pub(super) fn on_phase_two(
        &mut self,
        id: BranchId,
        result: Result<(), String>,
        now: u64,
    ) -> Vec<Command> {
        if !self.phase_two.remove(&id) {
            return Vec::new();
        }
        let commit = self.rec.state == TxState::Committing;
        let gtid = self.rec.gtid;
        self.rec.updated_ms = now;
        let Some(b) = self.rec.branch_mut(id) else {
            return Vec::new();
        };
        b.updated_ms = now;
        b.next_attempt_ms = 0;
        match result {
            Ok(()) => {
                b.state = if commit {
                    BranchState::Committed
                } else {
                    BranchState::RolledBack
                };
                // What a transaction shows is what is still failing.
                b.last_error.clear();
                self.failures.remove(&id);
                // Written with the final state, not on its own: a lost ack
                // only means the call is repeated after a restart, which
                // the participant's barrier absorbs.
                let mut cmds = Vec::new();
                if self.is_saga() && !commit {
                    // The next older step's compensation, or the end.
                    self.start_phase_two(&mut cmds, now);
                } else {
                    self.maybe_finish(&mut cmds, now);
                }
                cmds
            }
            Err(error) => {
                b.last_error = cap_text(&error, MAX_STORED_TEXT);
                let failures = self.failures.entry(id).or_default();
                *failures += 1;
                let since = self
                    .turn_start
                    .get(&id)
                    .map_or(self.budget_start, |t| (*t).max(self.budget_start));
                let elapsed = Duration::from_millis(now.saturating_sub(since));
                if self.policy.exhausted(*failures, elapsed) {
                    self.parked.insert(id);
                    let mut cmds = vec![Command::Persist];
                    self.maybe_finish(&mut cmds, now);
                    return cmds;
                }
                let delay = self.policy.delay(*failures, jitter(&gtid, id, b.attempts));
                b.next_attempt_ms = now + delay.as_millis() as u64;
                self.phase_two.insert(id);
                self.waiting.insert(id);
                vec![Command::Persist, Command::RetryLater { branch: id, delay }]
            }
        }
    }

    /// A participant answered that this branch's phase 2 will never
    /// succeed: no retry; the branch waits for an operator (the
    /// transaction ends STUCK once nothing else is pending).
    pub(super) fn on_phase_two_refused(
        &mut self,
        id: BranchId,
        error: String,
        now: u64,
    ) -> Vec<Command> {
        if !self.phase_two.remove(&id) {
            return Vec::new();
        }
        let Some(b) = self.rec.branch_mut(id) else {
            return Vec::new();
        };
        b.updated_ms = now;
        b.next_attempt_ms = 0;
        b.last_error = cap_text(
            &format!("will not succeed (not retried): {error}"),
            MAX_STORED_TEXT,
        );
        self.rec.updated_ms = now;
        self.parked.insert(id);
        let mut cmds = vec![Command::Persist];
        self.maybe_finish(&mut cmds, now);
        cmds
    }

    /// An operator settles branch `id` of a STUCK transaction by hand, as
    /// its decision says; the transaction finishes once no branch is left.
    pub(super) fn on_operator_resolve(
        &mut self,
        id: BranchId,
        commit: bool,
        resolution: Resolution,
        now: u64,
    ) -> Result<Vec<Command>, EngineError> {
        // A message undecided past its deadline (its check asked, in vain
        // so far, or given up on: STUCK): the operator may settle its local
        // transaction from the business data, without waiting for STUCK.
        if self.is_message()
            && self.rec.decision.is_none()
            && (self.rec.state == TxState::Stuck
                || (self.rec.state == TxState::Preparing && now >= self.rec.deadline_ms))
        {
            return self.resolve_local(id, commit, resolution, now);
        }
        if self.rec.state != TxState::Stuck {
            return Err(self.wrong_state(
                "settle a branch by hand",
                "; only a STUCK transaction's branches can be (tandem tx retry drives the others)",
            ));
        }
        let decided_commit = self.rec.decision == Some(Decision::Commit);
        if commit != decided_commit {
            let (decision, what) = if decided_commit {
                ("COMMIT", "committed")
            } else {
                ("ABORT", "rolled back")
            };
            return Err(self.wrong_state(
                "settle a branch against its decision",
                &format!(
                    "; the decision is {decision}, so a branch can only be settled as {what} (a decision is never reversed)"
                ),
            ));
        }
        let open = self.open_in_phase_two();
        let Some(state) = self.rec.branch(id).map(|b| b.state.name(b.mode)) else {
            let n = self.rec.branches.len();
            return Err(self.wrong_state(
                "settle a branch by hand",
                &format!("; it has no branch {id} (its branches are 1 to {n})"),
            ));
        };
        if !open.contains(&id) {
            return Err(self.wrong_state(
                "settle a branch by hand",
                &format!("; branch {id} is {state}, it needs no phase 2"),
            ));
        }
        if self.is_saga()
            && !decided_commit
            && let Some(later) = self.blocking_dependent(id)
        {
            // Undoing a step under a later one that still stands would
            // break the saga's order.
            return Err(self.wrong_state(
                "settle a saga step by hand",
                &format!(
                    "; a saga's steps are compensated newest first: step {later}, which runs \
                     after it, is not compensated yet"
                ),
            ));
        }
        let Some(b) = self.rec.branch_mut(id) else {
            return Ok(Vec::new());
        };
        b.state = if commit {
            BranchState::Committed
        } else {
            BranchState::RolledBack
        };
        b.last_error.clear();
        b.next_attempt_ms = 0;
        b.updated_ms = now;
        b.resolution = Some(resolution);
        self.parked.remove(&id);
        self.failures.remove(&id);
        self.rec.updated_ms = now;
        // Durable before the operator hears it.
        let mut cmds = vec![Command::Force];
        if open.len() == 1 {
            self.rec.state = if commit {
                TxState::Committed
            } else {
                TxState::Aborted
            };
            cmds.push(Command::Finished);
        }
        Ok(cmds)
    }

    /// Branches of a STUCK transaction still owed their phase 2 (as if it
    /// were being driven).
    fn open_in_phase_two(&self) -> Vec<BranchId> {
        let mut probe = self.clone();
        probe.rec.state = match self.rec.decision {
            Some(Decision::Commit) => TxState::Committing,
            Some(Decision::Abort) => TxState::Aborting,
            None => return Vec::new(),
        };
        probe.durable = true;
        probe.parked.clear();
        probe
            .rec
            .branches
            .iter()
            .map(|b| b.id)
            .filter(|id| probe.needs_phase_two(*id))
            .collect()
    }

    /// Emits the phase-2 call of every branch that needs one and has none
    /// pending, then finishes the transaction if nothing is left.
    /// A saga's compensations go one at a time, newest first
    /// ([`Txn::next_compensation`]).
    pub(super) fn start_phase_two(&mut self, cmds: &mut Vec<Command>, now: u64) {
        let ids: Vec<BranchId> = if self.is_saga() && self.rec.state == TxState::Aborting {
            self.next_compensations(now)
        } else {
            self.rec
                .branches
                .iter()
                .map(|b| b.id)
                .filter(|id| self.needs_phase_two(*id))
                .collect()
        };
        for id in ids {
            self.call_phase_two(id, cmds);
        }
        self.maybe_finish(cmds, now);
    }

    /// Whether branch `id` still needs a phase-2 call under the decision
    /// (none before the decision is durable).
    pub(super) fn needs_phase_two(&self, id: BranchId) -> bool {
        if !self.durable
            || self.phase_one.contains(&id)
            || self.phase_two.contains(&id)
            || self.parked.contains(&id)
        {
            return false;
        }
        let Some(b) = self.rec.branch(id) else {
            return false;
        };
        match self.rec.state {
            TxState::Committing => b.state != BranchState::Committed,
            // Every branch whose phase 1 may have run is released by the
            // coordinator itself, a no-voter too, in both protocols: a no
            // does not prove that nothing is held (a participant answers
            // no to a repeated phase 1 whose first run is still held,
            // after a crash lost an unforced Submit and the client
            // repeated it), and a failed TCC try may have reserved part
            // of the resource. Only a branch settled as never run
            // (ROLLED_BACK at once, rule 3a) is left alone.
            TxState::Aborting => match b.state {
                BranchState::Registered
                | BranchState::Prepared
                | BranchState::Failed
                | BranchState::Refused => true,
                BranchState::Committed | BranchState::RolledBack => false,
            },
            _ => false,
        }
    }

    pub(super) fn call_phase_two(&mut self, id: BranchId, cmds: &mut Vec<Command>) {
        let commit = self.rec.state == TxState::Committing;
        if let Some(b) = self.rec.branch_mut(id) {
            b.attempts += 1;
            let attempt = b.attempts;
            self.phase_two.insert(id);
            cmds.push(Command::PhaseTwo {
                branch: id,
                commit,
                attempt,
            });
        }
    }

    pub(super) fn maybe_finish(&mut self, cmds: &mut Vec<Command>, now: u64) {
        let open = !self.phase_one.is_empty() || !self.phase_two.is_empty();
        if open || !self.durable {
            return;
        }
        let done = match self.rec.state {
            TxState::Committing | TxState::Aborting if !self.parked.is_empty() => TxState::Stuck,
            TxState::Committing => TxState::Committed,
            TxState::Aborting => TxState::Aborted,
            _ => return,
        };
        self.rec.state = done;
        self.rec.updated_ms = now;
        if !cmds.contains(&Command::Persist) {
            cmds.push(Command::Persist);
        }
        cmds.push(Command::Finished);
    }
}

/// A well-spread number from a branch's identity and attempt, so the retry
/// jitter of many transactions differs while the engine stays deterministic.
pub(crate) fn jitter(gtid: &Gtid, branch: BranchId, attempt: u32) -> u64 {
    let (hi, lo) = gtid.as_u64_pair();
    let mut z = hi ^ lo.rotate_left(17) ^ (u64::from(branch) << 32 | u64::from(attempt));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
