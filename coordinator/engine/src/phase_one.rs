//! Phase 1 and the decision: branches enlisted, votes taken, commit decided
//! once every branch said yes, abort on any no, failure, deadline or
//! rollback.

use bytes::Bytes;

use crate::model::{
    AbortCause, AbortInfo, BranchId, BranchRecord, BranchState, Decision, MAX_STORED_TEXT, Mode,
    TxState, cap_text,
};
use crate::{Command, EngineError, NewBranch, Txn, Vote};

impl Txn {
    pub(crate) fn add_branch(&mut self, b: NewBranch, now: u64) -> BranchId {
        let id = self.rec.branches.len() as BranchId + 1;
        self.rec.branches.push(BranchRecord {
            id,
            mode: b.mode.unwrap_or(self.rec.mode),
            endpoint: b.endpoint,
            resource: b.resource,
            payload: b.payload,
            reply: Bytes::new(),
            state: BranchState::Registered,
            attempts: 0,
            last_error: String::new(),
            next_attempt_ms: 0,
            updated_ms: now,
            resolution: None,
            after: b.after,
        });
        self.phase_one.insert(id);
        self.rec.updated_ms = now;
        id
    }

    pub(crate) fn on_enlist(
        &mut self,
        branch: NewBranch,
        now: u64,
    ) -> Result<Vec<Command>, EngineError> {
        if self.rec.state != TxState::Active {
            let detail = match self.rec.state {
                TxState::Preparing => "; a one-shot (Submit) transaction takes no more branches",
                _ => "; branches can only be added to an ACTIVE transaction",
            };
            return Err(self.wrong_state("enlist a branch", detail));
        }
        if (branch.mode.unwrap_or(self.rec.mode) == Mode::Saga) != self.is_saga() {
            return Err(self.wrong_state(
                "enlist a branch",
                "; a saga holds saga steps only, and a saga step belongs to a saga",
            ));
        }
        if self.is_saga()
            && let Some(&branch) = self.phase_one.first()
        {
            // One step at a time: the order of the steps is the order
            // their actions completed, which compensation reverses.
            return Err(EngineError::BranchInFlight {
                gtid: self.rec.gtid,
                branch,
            });
        }
        if now >= self.rec.deadline_ms {
            return Ok(self.abort(AbortInfo::new(AbortCause::Deadline, ""), now));
        }
        let mut branch = branch;
        // An interactive saga's steps run in the order they are enlisted.
        branch.after = match self.rec.branches.len() {
            n if self.is_saga() && n > 0 => vec![n as BranchId],
            _ => Vec::new(),
        };
        let id = self.add_branch(branch, now);
        // Durable before the participant hears of it: if the coordinator
        // dies after the call, recovery still knows to cancel the branch.
        Ok(vec![Command::Force, Command::PhaseOne { branch: id }])
    }

    pub(crate) fn on_phase_one(&mut self, id: BranchId, vote: Vote, now: u64) -> Vec<Command> {
        if !self.phase_one.remove(&id) {
            return Vec::new(); // not ours or already answered
        }
        if self.is_saga()
            && self.rec.state == TxState::Preparing
            && now < self.rec.deadline_ms
            && let Vote::Failed(error) | Vote::Unreachable(error) = &vote
        {
            // A retriable failure of a saga's action: forward again.
            let may_have_run = matches!(vote, Vote::Failed(_));
            return self.retry_action(id, error.clone(), may_have_run, now);
        }
        // A saga's action still failing (retriably) at its deadline: the
        // deadline aborted it, not the step.
        let failed_cause = if self.is_saga()
            && self.rec.state == TxState::Preparing
            && matches!(vote, Vote::Failed(_) | Vote::Unreachable(_))
        {
            AbortCause::Deadline
        } else {
            AbortCause::PhaseOneFailed
        };
        let saga = self.is_saga();
        let Some(b) = self.rec.branch_mut(id) else {
            return Vec::new();
        };
        b.updated_ms = now;
        let failure = match vote {
            Vote::Yes(reply) => {
                b.state = BranchState::Prepared;
                b.reply = reply;
                // A saga's action that went through after retries: its
                // error is over, and its phase 2 gets a budget of its own.
                b.last_error.clear();
                b.next_attempt_ms = 0;
                if saga {
                    // Its phase-2 calls are numbered from 1 (`attempts`
                    // counts phase-2 calls).
                    b.attempts = 0;
                }
                self.failures.remove(&id);
                None
            }
            Vote::No(reason) => {
                let reason = cap_text(&reason, MAX_STORED_TEXT);
                b.state = BranchState::Refused;
                b.last_error = reason.clone();
                Some(AbortInfo::by_branch(
                    AbortCause::VotedNo,
                    id,
                    &b.resource,
                    &reason,
                ))
            }
            Vote::NotRun(error) | Vote::Unreachable(error) => {
                // Nothing ran there and phase 1 is never sent twice, so
                // there is nothing to roll back: settled now (DESIGN.md
                // rule 3a). Only a failure decides this; a yes never comes.
                // A saga's action is sent again after a failure, though:
                // one that failed before may have run, and stays FAILED.
                if b.state != BranchState::Failed {
                    b.state = BranchState::RolledBack;
                }
                Some(AbortInfo::by_branch(failed_cause, id, &b.resource, &error))
            }
            Vote::Failed(error) | Vote::Permanent(error) => {
                let error = cap_text(&error, MAX_STORED_TEXT);
                b.state = BranchState::Failed;
                b.last_error = error.clone();
                Some(AbortInfo::by_branch(failed_cause, id, &b.resource, &error))
            }
        };
        self.rec.updated_ms = now;
        match (self.rec.state, failure) {
            (TxState::Active | TxState::Preparing, Some(why)) => self.abort(why, now),
            (TxState::Preparing, None) if self.all_prepared() => self.decide_commit(now),
            (TxState::Preparing, None) if self.is_saga() => self.next_step(now),
            // A yes is not written on its own: losing it changes nothing
            // (undecided means abort, and every recorded branch gets its
            // rollback), and the decision's write carries it.
            (TxState::Active | TxState::Preparing, None) => Vec::new(),
            // Decided while this call was out (rollback, deadline, another
            // branch's no): give the branch its abort call now if it needs one.
            // A saga's compensations waited for this answer: it may have
            // made this step the newest to undo.
            _ if self.is_saga() => {
                let mut cmds = vec![Command::Persist];
                self.start_phase_two(&mut cmds, now);
                cmds
            }
            _ => {
                let mut cmds = vec![Command::Persist];
                if self.needs_phase_two(id) {
                    self.call_phase_two(id, &mut cmds);
                }
                self.maybe_finish(&mut cmds, now);
                cmds
            }
        }
    }

    pub(crate) fn on_commit(&mut self, now: u64) -> Result<Vec<Command>, EngineError> {
        match self.rec.state {
            TxState::Active => {}
            TxState::Committing | TxState::Committed => return Ok(Vec::new()),
            TxState::Preparing => {
                return Err(self.wrong_state(
                    "commit",
                    "; a one-shot (Submit) transaction is decided by the coordinator",
                ));
            }
            TxState::Stuck if self.rec.decision == Some(Decision::Commit) => {
                return Ok(Vec::new());
            }
            TxState::Aborting | TxState::Aborted | TxState::Stuck => {
                return Err(self.wrong_state("commit", "; its outcome is abort"));
            }
        }
        if let Some(&branch) = self.phase_one.first() {
            return Err(EngineError::BranchInFlight {
                gtid: self.rec.gtid,
                branch,
            });
        }
        if now >= self.rec.deadline_ms {
            return Ok(self.abort(AbortInfo::new(AbortCause::Deadline, ""), now));
        }
        Ok(self.decide_commit(now))
    }

    /// Aborts an undecided transaction with `reason` (client rollback or
    /// operator abort); a repeat on an aborted one is a no-op.
    pub(crate) fn on_rollback(
        &mut self,
        why: AbortInfo,
        now: u64,
    ) -> Result<Vec<Command>, EngineError> {
        match (self.rec.state, self.rec.decision) {
            // A message's local transaction may still commit: only its
            // business service (which knows it did not) or the back-check
            // (which closes it) drops it; an operator once the check gave
            // up (STUCK). Dropped on a guess, a committed order would never
            // be delivered.
            (TxState::Preparing, None)
                if self.is_message() && why.cause == AbortCause::OperatorAbort =>
            {
                Err(self.wrong_state(
                    "abort",
                    "; a message is dropped by its back-check (or its business service's \
                     rollback) while its local transaction may still commit: wait for the \
                     check, or, past its deadline, settle its local transaction from the \
                     business data (tandem tx resolve --branch 1 --as committed | rolled-back)",
                ))
            }
            (TxState::Active | TxState::Preparing, _) => Ok(self.abort(why, now)),
            (TxState::Aborting | TxState::Aborted, _) => Ok(Vec::new()),
            (TxState::Stuck, Some(Decision::Abort)) => Ok(Vec::new()),
            // A message checked back in vain: dropped on the word of the
            // client or an operator.
            (TxState::Stuck, None) if self.is_message() => Ok(self.abort(why, now)),
            _ => Err(self.wrong_state("abort", "; a commit decision is never reversed")),
        }
    }

    /// [`crate::Event::PresumedAborted`]: an undecided transaction, or a
    /// commit decision still being forced (nothing of it told or sent),
    /// becomes a forced abort. A durable decision, or an abort already
    /// being forced (its write was refused for another reason: the caller
    /// must not loop), is unchanged: no command.
    pub(crate) fn on_presumed_aborted(&mut self, now: u64) -> Vec<Command> {
        match (self.rec.decision, self.durable) {
            (Some(_), true) | (Some(Decision::Abort), false) => return Vec::new(),
            (Some(Decision::Commit), false) => self.rec.state = self.undecided,
            (None, _) => {}
        }
        self.force_abort = true;
        self.abort(
            AbortInfo::new(
                AbortCause::CoordinatorRestart,
                "presumed aborted: another coordinator was asked about it before its decision \
                 was written",
            ),
            now,
        )
    }

    pub(crate) fn all_prepared(&self) -> bool {
        self.rec
            .branches
            .iter()
            .all(|b| b.state == BranchState::Prepared)
    }

    pub(crate) fn decide_commit(&mut self, now: u64) -> Vec<Command> {
        self.undecided = self.rec.state;
        self.durable = false;
        self.rec.state = TxState::Committing;
        self.rec.decision = Some(Decision::Commit);
        self.rec.updated_ms = now;
        self.budget_start = now;
        vec![Command::ForceDecision]
    }

    /// Decides abort and starts rollback / cancel where needed; a forced
    /// abort starts them once it is durable.
    pub(crate) fn abort(&mut self, why: AbortInfo, now: u64) -> Vec<Command> {
        self.undecided = self.rec.state;
        self.rec.state = TxState::Aborting;
        self.rec.decision = Some(Decision::Abort);
        self.rec.reason = why.text();
        self.rec.abort = Some(why);
        self.rec.updated_ms = now;
        self.budget_start = now;
        // Phase 2's retry budgets start here (a saga action's forward
        // retries, a message's checks counted failures before).
        self.forward.clear();
        self.failures.clear();
        if self.is_saga() {
            // A step's compensation calls are numbered from 1, whatever its
            // action took (`attempts` counts phase-2 calls from here on,
            // across restarts and operator retries).
            for b in &mut self.rec.branches {
                b.attempts = 0;
            }
        }
        self.settle_unstarted_steps(now);
        self.drop_message(now);
        if std::mem::take(&mut self.force_abort) {
            // The gtid was the client's: it must not vanish in a crash
            // while its rollbacks are on the wire or once the client was
            // told, or a repeat would start it again (and could commit it,
            // or meet those rollbacks). Like a commit: nothing goes out or
            // shows before the force.
            self.durable = false;
            return vec![Command::ForceDecision];
        }
        self.durable = true;
        let mut cmds = vec![Command::Persist];
        self.start_phase_two(&mut cmds, now);
        cmds
    }
}
