//! Transactional messages: the engine's side of "deliver these calls once
//! my local transaction commits, and never otherwise" (DESIGN.md
//! "Transactional messages").
//!
//! A message is driven by the same states as the other modes:
//!
//! - **Prepared** ([`Txn::prepare_message`]): PREPARING, forced before the
//!   business service hears it. Branch 1 stands for the business
//!   service's own local transaction; its endpoint and resource name the
//!   back-check. Branches 2, 3, … are the deliveries, READY from the start
//!   (nothing is asked of them before the decision).
//! - **Submitted** ([`crate::Event::Commit`]): the local transaction
//!   committed, the client says; branch 1 is marked so and commit is
//!   decided (forced), then every delivery is called until it
//!   acknowledges, like a confirm.
//! - **Checked back** ([`crate::Event::DeadlinePassed`], and after a restart
//!   past the deadline): an undecided message is never aborted for its
//!   deadline, since its local transaction may have committed. Branch 1's
//!   phase-1 call is the back-check: yes decides commit as a Submit does;
//!   no decides abort, and nothing is called (nothing was delivered); no
//!   answer (an error, unreachable, a timeout) is asked again under the
//!   retry policy, and past it the message is STUCK, undecided, for an
//!   operator: `tandem tx retry` checks back again, `tandem tx resolve
//!   --branch 1 --as …` settles it by hand (committed: delivered; rolled back:
//!   dropped), `tandem tx abort` drops it.
//! - **Dropped** (a client's Rollback, a back-check's no, an operator's
//!   abort): every branch is settled at once, nothing delivered.

use crate::model::{
    AbortCause, AbortInfo, BranchId, BranchState, Decision, MAX_STORED_TEXT, Mode, Resolution,
    TxState, TxnRecord, cap_text,
};
use crate::{Command, EngineError, NewBranch, Txn, Vote};

/// Branch 1 of a message: the business service's local transaction, whose
/// phase-1 call is the back-check.
pub const LOCAL_BRANCH: BranchId = 1;

impl Txn {
    pub(crate) fn is_message(&self) -> bool {
        self.rec.mode == Mode::Msg
    }

    /// Prepares a transactional message: `check` becomes branch 1 (the
    /// local transaction and its back-check), `deliveries` branches 2, 3,
    /// …; the record is forced before anything else
    /// ([`Command::Force`]), so that the business service may commit its
    /// local transaction once it hears back.
    pub fn prepare_message(
        gtid: crate::model::Gtid,
        now: u64,
        deadline: u64,
        check: NewBranch,
        deliveries: Vec<NewBranch>,
    ) -> (Txn, Vec<Command>) {
        let rec = TxnRecord::new(gtid, Mode::Msg, TxState::Preparing, now, deadline);
        let mut txn = Txn::from_record(rec);
        txn.sends_known = true;
        for mut b in std::iter::once(check).chain(deliveries) {
            b.mode = None;
            b.after.clear();
            let id = txn.add_branch(b, now);
            if id != LOCAL_BRANCH
                && let Some(b) = txn.rec.branch_mut(id)
            {
                b.state = BranchState::Prepared;
            }
        }
        txn.phase_one.clear();
        (txn, vec![Command::Force])
    }

    /// A message read back undecided (restart, takeover): checked back at
    /// once if its deadline passed, else when it passes (the runtime arms
    /// the timer).
    pub(crate) fn recover_message(&mut self, now: u64) -> Vec<Command> {
        if self.rec.state == TxState::Preparing && now >= self.rec.deadline_ms {
            self.check_back(now)
        } else {
            Vec::new()
        }
    }

    /// Submit: the local transaction committed. Decides commit (forced),
    /// whatever a back-check in flight will say (a yes: the same; it
    /// cannot say no once the local transaction committed).
    pub(crate) fn submit_message(&mut self, now: u64) -> Result<Vec<Command>, EngineError> {
        match (self.rec.state, self.rec.decision) {
            (TxState::Preparing, _) | (TxState::Stuck, None) => Ok(self.local_committed(now)),
            (TxState::Committing | TxState::Committed, _)
            | (TxState::Stuck, Some(Decision::Commit)) => Ok(Vec::new()),
            _ => Err(self.wrong_state(
                "submit the message",
                "; it was dropped (its local transaction did not commit)",
            )),
        }
    }

    /// The deadline passed, or a scheduled back-check is due: branch 1's
    /// phase-1 call (the back-check), unless one is out or the message is
    /// decided.
    pub(crate) fn check_back(&mut self, now: u64) -> Vec<Command> {
        if self.rec.state != TxState::Preparing
            || self.phase_one.contains(&LOCAL_BRANCH)
            || self.waiting.contains(&LOCAL_BRANCH)
        {
            return Vec::new();
        }
        if !self.failures.contains_key(&LOCAL_BRANCH) {
            // The checks' retry budget starts with the first of them, not
            // at the prepare (a message may wait hours for its Submit).
            self.budget_start = now;
        }
        self.phase_one.insert(LOCAL_BRANCH);
        if let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) {
            b.attempts += 1;
            b.updated_ms = now;
        }
        vec![Command::PhaseOne {
            branch: LOCAL_BRANCH,
        }]
    }

    /// The back-check answered (or failed).
    pub(crate) fn on_checked(&mut self, vote: Vote, now: u64) -> Vec<Command> {
        if !self.phase_one.remove(&LOCAL_BRANCH) || self.rec.state != TxState::Preparing {
            return Vec::new();
        }
        match vote {
            Vote::Yes(_) => self.local_committed(now),
            Vote::No(reason) => {
                let reason = cap_text(&reason, MAX_STORED_TEXT);
                let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) else {
                    return Vec::new();
                };
                b.state = BranchState::Refused;
                b.last_error = reason.clone();
                b.updated_ms = now;
                let why =
                    AbortInfo::by_branch(AbortCause::VotedNo, LOCAL_BRANCH, &b.resource, &reason);
                self.abort(why, now)
            }
            // Not known: the local transaction may still commit, or may
            // have; only an answer decides.
            Vote::Failed(error)
            | Vote::Permanent(error)
            | Vote::NotRun(error)
            | Vote::Unreachable(error) => self.check_failed(error, now),
        }
    }

    fn check_failed(&mut self, error: String, now: u64) -> Vec<Command> {
        let gtid = self.rec.gtid;
        self.rec.updated_ms = now;
        let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) else {
            return Vec::new();
        };
        b.last_error = cap_text(&format!("back-check: {error}"), MAX_STORED_TEXT);
        b.updated_ms = now;
        let attempts = b.attempts;
        let failures = self.failures.entry(LOCAL_BRANCH).or_default();
        *failures += 1;
        let elapsed = std::time::Duration::from_millis(now.saturating_sub(self.budget_start));
        if self.policy.exhausted(*failures, elapsed) {
            // STUCK and undecided: an operator checks back again, or
            // settles branch 1 by hand.
            self.rec.state = TxState::Stuck;
            return vec![Command::Persist, Command::Finished];
        }
        let delay = self.policy.delay(
            *failures,
            super::phase_two::jitter(&gtid, LOCAL_BRANCH, attempts),
        );
        if let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) {
            b.next_attempt_ms = now + delay.as_millis() as u64;
        }
        self.waiting.insert(LOCAL_BRANCH);
        vec![
            Command::Persist,
            Command::RetryLater {
                branch: LOCAL_BRANCH,
                delay,
            },
        ]
    }

    /// A scheduled back-check is due.
    pub(crate) fn check_due(&mut self, now: u64) -> Vec<Command> {
        if self.waiting.remove(&LOCAL_BRANCH) {
            self.check_back(now)
        } else {
            Vec::new()
        }
    }

    /// The local transaction committed (Submit, a back-check's yes, an
    /// operator's word): branch 1 is done, commit is decided.
    fn local_committed(&mut self, now: u64) -> Vec<Command> {
        self.phase_one.remove(&LOCAL_BRANCH);
        self.waiting.remove(&LOCAL_BRANCH);
        self.failures.remove(&LOCAL_BRANCH);
        if let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) {
            b.state = BranchState::Committed;
            b.last_error.clear();
            b.next_attempt_ms = 0;
            b.updated_ms = now;
        }
        self.rec.state = TxState::Preparing;
        self.decide_commit(now)
    }

    /// Under an abort nothing was delivered: every branch is settled at
    /// once (branch 1's local transaction did not commit).
    pub(crate) fn drop_message(&mut self, now: u64) {
        if !self.is_message() {
            return;
        }
        self.phase_one.clear();
        self.waiting.clear();
        for b in &mut self.rec.branches {
            if b.state != BranchState::RolledBack {
                b.state = BranchState::RolledBack;
                b.next_attempt_ms = 0;
                b.updated_ms = now;
            }
        }
    }

    /// An operator's retry of a STUCK undecided message: check back again,
    /// with a fresh retry budget.
    pub(crate) fn retry_check(&mut self, now: u64) -> Vec<Command> {
        self.rec.state = TxState::Preparing;
        self.budget_start = now;
        self.failures.clear();
        self.rec.updated_ms = now;
        // A check scheduled for later goes now (its timer is absorbed).
        self.waiting.remove(&LOCAL_BRANCH);
        let mut cmds = vec![Command::Persist];
        cmds.extend(self.check_back(now));
        cmds
    }

    /// An operator settles branch 1 of a STUCK undecided message: the
    /// local transaction committed (deliver) or did not (drop).
    pub(crate) fn resolve_local(
        &mut self,
        id: BranchId,
        commit: bool,
        resolution: Resolution,
        now: u64,
    ) -> Result<Vec<Command>, EngineError> {
        if id != LOCAL_BRANCH {
            return Err(self.wrong_state(
                "settle a branch by hand",
                "; the message is undecided: settle branch 1 (its local transaction) as \
                 committed or rolled back, and its deliveries follow",
            ));
        }
        if let Some(b) = self.rec.branch_mut(LOCAL_BRANCH) {
            b.resolution = Some(resolution);
        }
        if commit {
            return Ok(self.local_committed(now));
        }
        self.force_abort = true;
        Ok(self.abort(
            AbortInfo::new(
                AbortCause::OperatorAbort,
                "an operator settled the local transaction as rolled back",
            ),
            now,
        ))
    }
}
