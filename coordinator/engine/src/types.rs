//! The engine's vocabulary: the events it takes, the commands it gives, and
//! its refusal.

use std::time::Duration;

use bytes::Bytes;

use crate::model::{BranchId, Gtid, Mode, Resolution, TxState};

/// Something that happened to a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The client adds a branch to an ACTIVE transaction.
    Enlist(NewBranch),
    /// A phase-1 (prepare / try) call returned.
    PhaseOne {
        /// Which branch.
        branch: BranchId,
        /// What it said.
        vote: Vote,
    },
    /// The client asks to commit an interactive transaction.
    Commit,
    /// The client asks to roll back.
    Rollback {
        /// Why, from the client; may be empty.
        reason: String,
    },
    /// The global deadline passed.
    DeadlinePassed,
    /// The decision whose record [`Command::ForceDecision`] forced is on
    /// disk.
    DecisionDurable,
    /// The decision's record was refused by a shared store: another
    /// coordinator, asked about the transaction before this one had
    /// written it, wrote its presumed abort first. Nothing of the pending
    /// decision was told or sent, so the transaction aborts, forced (its
    /// record then replaces the presumed one) before rollback / cancel.
    PresumedAborted,
    /// A phase-2 call returned.
    PhaseTwo {
        /// Which branch.
        branch: BranchId,
        /// `Err` carries the error text; the call will be retried.
        result: Result<(), String>,
    },
    /// A phase-2 call was answered "this will never succeed" (the
    /// participant does not implement the call, or says the failure is
    /// permanent): the branch is not retried; the transaction ends STUCK
    /// with the reason, for an operator.
    PhaseTwoRefused {
        /// Which branch.
        branch: BranchId,
        /// The participant's answer.
        error: String,
    },
    /// A saga step's action retry scheduled by [`Command::ActionLater`]
    /// is due.
    ActionDue {
        /// Which step.
        branch: BranchId,
    },
    /// A retry scheduled by [`Command::RetryLater`] is due.
    RetryDue {
        /// Which branch.
        branch: BranchId,
    },
    /// An operator asks to drive the transaction now (`tandem tx retry`):
    /// phase 2 of a STUCK or retrying transaction runs at once with a fresh
    /// retry budget; an undecided one past its deadline aborts.
    OperatorRetry,
    /// An operator asks to abort an undecided transaction (`tandem tx abort`).
    OperatorAbort {
        /// Why, from the operator; may be empty.
        reason: String,
    },
    /// An operator settles one branch of a STUCK transaction by hand
    /// (`tandem tx resolve`): its phase 2 is taken as done, as the
    /// decision says, on the operator's word.
    OperatorResolve {
        /// Which branch.
        branch: BranchId,
        /// Settled as committed (`true`) or rolled back; must match the
        /// decision.
        commit: bool,
        /// Who and why, kept in the record.
        resolution: Resolution,
    },
}

/// A branch as the client describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBranch {
    /// Participant endpoint (already validated).
    pub endpoint: String,
    /// Handler name.
    pub resource: String,
    /// Payload.
    pub payload: Bytes,
    /// The branch's protocol; `None`: the transaction's.
    pub mode: Option<Mode>,
    /// A saga step's: the ids of the steps that must be done before its
    /// action goes out. When no step of a one-shot saga names any, each
    /// runs after the one before it. Empty outside sagas.
    pub after: Vec<BranchId>,
}

/// The result of a phase-1 call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Prepared / tried, with the participant's reply bytes.
    Yes(Bytes),
    /// The participant refused; it holds nothing.
    No(String),
    /// The call failed or timed out; the participant may hold work.
    Failed(String),
    /// The call failed and the participant says it never will succeed
    /// (its `PERMANENT` answer); it may have run part of it. As `Failed`,
    /// except that a saga does not retry the step's action.
    Permanent(String),
    /// The call provably never ran at the participant (the policy stopped
    /// it before dialling, or the participant does not implement the
    /// call): it holds nothing and needs no rollback / cancel, and calling
    /// again would not help.
    NotRun(String),
    /// As `NotRun`, because the participant could not be reached (its
    /// connection was refused): it may be back later (a saga retries the
    /// step's action).
    Unreachable(String),
}

/// Something the runtime must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Write the record to the log (not forced).
    Persist,
    /// Write the record and wait until it is durable before carrying out the
    /// commands after this one (a new branch before its phase-1 call).
    Force,
    /// Write the record and force it; then send [`Event::DecisionDurable`]
    /// (a commit decision, or an abort that must be forced).
    ForceDecision,
    /// Send the phase-1 call (prepare / try) of this branch.
    PhaseOne {
        /// Which branch.
        branch: BranchId,
    },
    /// Send a phase-2 call of this branch.
    PhaseTwo {
        /// Which branch.
        branch: BranchId,
        /// Commit / confirm when true, rollback / cancel when false.
        commit: bool,
        /// 1 for the first call, 2 for the first retry, ...
        attempt: u32,
    },
    /// Wait `delay` (chosen by the retry policy), then send
    /// [`Event::ActionDue`]: a saga step's action goes out again.
    ActionLater {
        /// Which step.
        branch: BranchId,
        /// How long to wait.
        delay: Duration,
    },
    /// Wait `delay` (chosen by the retry policy), then send
    /// [`Event::RetryDue`].
    RetryLater {
        /// Which branch.
        branch: BranchId,
        /// How long to wait.
        delay: Duration,
    },
    /// The transaction reached a terminal state, or STUCK: forget it.
    Finished,
}

/// A request that does not fit the transaction's state. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The transaction is in the wrong state for the request.
    #[error("transaction {gtid} is {state}: cannot {action}{detail}")]
    WrongState {
        /// Which transaction.
        gtid: Gtid,
        /// Its state.
        state: TxState,
        /// What was asked.
        action: &'static str,
        /// More words, starting with "; " or empty.
        detail: String,
    },
    /// A commit, rollback or operator request came while a decision is
    /// being forced. Its answer depends on that decision, which may not be
    /// told yet: ask again once it is durable. Nothing changed.
    #[error("transaction {gtid} is being decided; ask again")]
    DecisionPending {
        /// Which transaction.
        gtid: Gtid,
    },
    /// Commit was asked while a branch's phase 1 had not returned.
    #[error("transaction {gtid}: branch {branch} has not answered its phase-1 call yet")]
    BranchInFlight {
        /// Which transaction.
        gtid: Gtid,
        /// Which branch.
        branch: BranchId,
    },
}
