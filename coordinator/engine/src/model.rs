//! The transaction record: what the coordinator knows about one global
//! transaction and its branches. Plain data shared by the engine, the log and
//! the services; no behaviour beyond small queries.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
pub use tandem_trace::TraceContext;
use uuid::Uuid;

/// Global transaction id: a UUID v7, so ids sort by creation time.
pub type Gtid = Uuid;

/// Branch id within a transaction, starting at 1.
pub type BranchId = u32;

/// The protocol a transaction runs. The engine is shared; the mode only
/// decides which participant calls are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Two-phase commit: prepare, then commit or rollback.
    TwoPhase,
    /// Try / confirm / cancel.
    Tcc,
    /// Saga: each step's action (a try) commits at once and runs after the
    /// one before it said yes; a failure compensates (cancels) the steps
    /// that ran or may have run, newest first, one at a time; success
    /// closes each step with a confirm (a no-op for the handler). A saga
    /// holds saga steps only. See DESIGN.md "Saga".
    Saga,
    /// Transactional message: branch 1 is the business service's local
    /// transaction (its phase-1 call is the back-check), the others are
    /// deliveries, called once the message is decided (phase 2, a
    /// `Deliver`). Undecided past its deadline: checked back, never
    /// aborted for it. See DESIGN.md "Transactional messages".
    Msg,
}

impl Mode {
    /// Its short name, as metrics labels, alerts and filters spell it:
    /// `2pc`, `tcc`, `saga`, `msg`.
    pub fn label(self) -> &'static str {
        match self {
            Mode::TwoPhase => "2pc",
            Mode::Tcc => "tcc",
            Mode::Saga => "saga",
            Mode::Msg => "msg",
        }
    }

    /// The name of a branch's phase-1 call in this mode.
    pub fn phase_one_verb(self) -> &'static str {
        match self {
            Mode::TwoPhase => "prepare",
            Mode::Tcc | Mode::Saga => "try",
            Mode::Msg => "check",
        }
    }

    /// The name of a branch's phase-2 call in this mode.
    pub fn phase_two_verb(self, commit: bool) -> &'static str {
        match (self, commit) {
            (Mode::TwoPhase, true) => "commit",
            (Mode::TwoPhase, false) => "rollback",
            (Mode::Tcc | Mode::Saga, true) => "confirm",
            (Mode::Tcc | Mode::Saga, false) => "cancel",
            (Mode::Msg, true) => "deliver",
            (Mode::Msg, false) => "drop",
        }
    }
}

/// Transaction states; see DESIGN.md "States".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxState {
    /// Interactive transaction accepting branches; nothing decided.
    Active,
    /// One-shot transaction running phase 1; nothing decided.
    Preparing,
    /// Commit decided (forced to disk); phase 2 running.
    Committing,
    /// Every branch acknowledged commit. Terminal.
    Committed,
    /// Abort decided; phase 2 running.
    Aborting,
    /// Every branch acknowledged abort. Terminal.
    Aborted,
    /// Phase 2 gave up under the retry policy; decision kept, operator drives it.
    Stuck,
}

impl TxState {
    /// Every state, in lifecycle order.
    pub const ALL: [TxState; 7] = [
        TxState::Active,
        TxState::Preparing,
        TxState::Committing,
        TxState::Committed,
        TxState::Aborting,
        TxState::Aborted,
        TxState::Stuck,
    ];

    /// True once nothing is left to do.
    pub fn is_terminal(self) -> bool {
        matches!(self, TxState::Committed | TxState::Aborted)
    }

    /// True once a decision (commit or abort) exists.
    pub fn is_decided(self) -> bool {
        !matches!(self, TxState::Active | TxState::Preparing)
    }

    /// Upper-case name used in logs, errors and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            TxState::Active => "ACTIVE",
            TxState::Preparing => "PREPARING",
            TxState::Committing => "COMMITTING",
            TxState::Committed => "COMMITTED",
            TxState::Aborting => "ABORTING",
            TxState::Aborted => "ABORTED",
            TxState::Stuck => "STUCK",
        }
    }
}

impl fmt::Display for TxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A transaction's decision, once made. Kept in the record so that a STUCK
/// transaction still says which way it must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Commit / confirm every branch.
    Commit,
    /// Roll back / cancel every branch that may hold work.
    Abort,
}

impl Decision {
    /// Upper-case name used in logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Commit => "COMMIT",
            Decision::Abort => "ABORT",
        }
    }
}

/// Branch states, mode-neutral. [`BranchState::name`] gives the mode's word
/// (PREPARED in 2PC is TRIED in TCC, and so on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BranchState {
    /// Recorded; phase 1 not answered yet.
    Registered,
    /// Voted yes (prepared / tried).
    Prepared,
    /// The participant explicitly voted no: it holds nothing for this branch.
    Refused,
    /// Phase 1 failed (error, unreachable, deadline): it may have run, so an
    /// abort still calls rollback / cancel on it.
    Failed,
    /// Acknowledged commit / confirm. Terminal.
    Committed,
    /// Acknowledged rollback / cancel. Terminal.
    RolledBack,
}

impl BranchState {
    /// The state's name in the given mode. A saga step's are TCC's (its
    /// action is a try, its compensation a cancel): TRIED is its action
    /// done, CANCELLED its compensation acknowledged.
    pub fn name(self, mode: Mode) -> &'static str {
        match (self, mode) {
            (BranchState::Registered, _) => "REGISTERED",
            (BranchState::Prepared, Mode::Msg) => "READY",
            (BranchState::Refused | BranchState::Failed, Mode::Msg) => "NOT_COMMITTED",
            (BranchState::Committed, Mode::Msg) => "DELIVERED",
            (BranchState::RolledBack, Mode::Msg) => "DROPPED",
            (BranchState::Prepared, Mode::TwoPhase) => "PREPARED",
            (BranchState::Prepared, Mode::Tcc | Mode::Saga) => "TRIED",
            (BranchState::Refused | BranchState::Failed, Mode::TwoPhase) => "VOTED_NO",
            (BranchState::Refused | BranchState::Failed, Mode::Tcc | Mode::Saga) => "TRY_FAILED",
            (BranchState::Committed, Mode::TwoPhase) => "COMMITTED",
            (BranchState::Committed, Mode::Tcc | Mode::Saga) => "CONFIRMED",
            (BranchState::RolledBack, Mode::TwoPhase) => "ROLLED_BACK",
            (BranchState::RolledBack, Mode::Tcc | Mode::Saga) => "CANCELLED",
        }
    }
}

/// What made a transaction abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortCause {
    /// A branch's participant voted no (refused its prepare / try).
    VotedNo,
    /// A branch's phase-1 call failed: an error, unreachable, its deadline.
    PhaseOneFailed,
    /// The transaction's deadline passed before a decision.
    Deadline,
    /// The client rolled it back.
    ClientRollback,
    /// An operator aborted it (Admin), or retried it past its deadline.
    OperatorAbort,
    /// The coordinator restarted before deciding it.
    CoordinatorRestart,
}

/// Why a transaction aborted, as fields; [`TxnRecord::reason`] says the
/// same for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortInfo {
    /// What made it abort.
    pub cause: AbortCause,
    /// The branch whose phase 1 aborted it; 0 when no branch did.
    pub branch: BranchId,
    /// That branch's resource; empty when no branch did.
    pub resource: String,
    /// The participant's own reason (a no vote's text, possibly empty), the
    /// phase-1 error, or the client's / operator's reason; at most
    /// [`MAX_STORED_TEXT`] bytes.
    pub detail: String,
}

impl AbortInfo {
    /// An abort no branch caused.
    pub fn new(cause: AbortCause, detail: impl Into<String>) -> Self {
        AbortInfo {
            cause,
            branch: 0,
            resource: String::new(),
            detail: cap_text(&detail.into(), MAX_STORED_TEXT),
        }
    }

    /// An abort caused by branch `branch` (of `resource`) in phase 1.
    pub fn by_branch(cause: AbortCause, branch: BranchId, resource: &str, detail: &str) -> Self {
        AbortInfo {
            cause,
            branch,
            resource: resource.to_string(),
            detail: cap_text(detail, MAX_STORED_TEXT),
        }
    }

    /// The text kept in [`TxnRecord::reason`].
    pub fn text(&self) -> String {
        let (b, r, d) = (self.branch, &self.resource, &self.detail);
        let with = |what: &str| {
            if d.is_empty() {
                what.to_string()
            } else {
                format!("{what}: {d}")
            }
        };
        match self.cause {
            AbortCause::VotedNo if d.is_empty() => format!("branch {b} ({r}) voted no"),
            AbortCause::VotedNo => format!("branch {b} ({r}) voted no: {d}"),
            AbortCause::PhaseOneFailed => format!("branch {b} ({r}) failed in phase 1: {d}"),
            AbortCause::Deadline => with("deadline passed before a decision"),
            AbortCause::ClientRollback => with("rolled back by the client"),
            AbortCause::OperatorAbort => with("aborted by an operator"),
            AbortCause::CoordinatorRestart => with("coordinator restarted before a decision"),
        }
    }
}

/// One branch: one participant resource called in both phases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchRecord {
    /// Id within the transaction, starting at 1.
    pub id: BranchId,
    /// The branch's protocol: the transaction's unless the branch named
    /// another, so one transaction can hold 2PC and TCC branches.
    pub mode: Mode,
    /// Participant gRPC endpoint (validated URI).
    pub endpoint: String,
    /// Handler name in the participant.
    pub resource: String,
    /// Bytes passed to every call of this branch; immutable once recorded.
    pub payload: Bytes,
    /// What the participant's yes vote returned (empty otherwise); kept so
    /// that a repeated `Submit` with the same gtid can answer with it.
    pub reply: Bytes,
    /// Where the branch is.
    pub state: BranchState,
    /// Phase-2 calls made so far.
    pub attempts: u32,
    /// Last error calling this branch; empty if none.
    pub last_error: String,
    /// When the next phase-2 retry is due, ms since the Unix epoch; 0 when
    /// none is scheduled.
    pub next_attempt_ms: u64,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// Set when an operator settled this branch by hand.
    pub resolution: Option<Resolution>,
    /// A saga step's: the steps whose actions must be done before this
    /// one's (and which are compensated only after this one). Empty for a
    /// first step and outside sagas.
    pub after: Vec<BranchId>,
}

/// An operator's settling of a branch (`tandem tx resolve`): the
/// participant's state is the operator's word from then on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The operator's authenticated name ("anonymous" without auth).
    pub by: String,
    /// Why, in the operator's words.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// One global transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnRecord {
    /// Id.
    pub gtid: Gtid,
    /// Protocol.
    pub mode: Mode,
    /// State.
    pub state: TxState,
    /// The decision, once made (it survives a STUCK state).
    pub decision: Option<Decision>,
    /// Why it aborted; empty otherwise.
    pub reason: String,
    /// Why it aborted, as fields; `None` when not aborted (or written by a
    /// version that did not record it).
    pub abort: Option<AbortInfo>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// An undecided transaction past this time aborts, ms since the Unix epoch.
    pub deadline_ms: u64,
    /// Branches in enlistment order; `branches[i].id == i + 1`.
    pub branches: Vec<BranchRecord>,
    /// Which owner drives it: 1 for the coordinator that started it, one
    /// more for every takeover on a shared store (DESIGN.md, fencing).
    /// Every participant call carries it; a barrier refuses an older one.
    pub epoch: u64,
    /// Caller labels from Begin / Submit, sorted by key.
    pub labels: Vec<crate::labels::Label>,
    /// The W3C trace context (`traceparent`, `tracestate`) of the client
    /// call that started it; every participant call carries its trace id,
    /// phase 2 after a restart or a takeover too. `None` when the client
    /// sent none (or an invalid one).
    pub traceparent: Option<TraceContext>,
    /// Retention compacted this transaction into its decision
    /// (the log's `Tombstone`): only its state, decision, mode and
    /// times are left, no branches. Never stored: set on the record built
    /// from a tombstone for `tandem tx show`.
    pub compacted: bool,
}

impl TxnRecord {
    /// A new record with no branches.
    pub fn new(gtid: Gtid, mode: Mode, state: TxState, now_ms: u64, deadline_ms: u64) -> Self {
        TxnRecord {
            gtid,
            mode,
            state,
            decision: None,
            reason: String::new(),
            abort: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            deadline_ms,
            branches: Vec::new(),
            epoch: 1,
            labels: Vec::new(),
            traceparent: None,
            compacted: false,
        }
    }

    /// The branch with this id, if any.
    pub fn branch(&self, id: BranchId) -> Option<&BranchRecord> {
        self.branches.get((id as usize).checked_sub(1)?)
    }

    /// Mutable access to the branch with this id, if any.
    pub fn branch_mut(&mut self, id: BranchId) -> Option<&mut BranchRecord> {
        self.branches.get_mut((id as usize).checked_sub(1)?)
    }
}

/// Longest participant-supplied text (vote-no reason, error) kept in a
/// record; longer text is cut (see [`cap_text`]).
pub const MAX_STORED_TEXT: usize = 4096;

/// `text` cut to at most `max` bytes on a character boundary, with a marker
/// saying it was cut; unchanged when it fits.
pub fn cap_text(text: &str, max: usize) -> String {
    const MARK: &str = "… (truncated)";
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
