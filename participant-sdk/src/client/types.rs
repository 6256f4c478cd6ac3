//! What a business service names and gets back: the [`Mode`], a
//! [`Branch`], and the results of enlist, commit, submit and
//! submit_message.

use bytes::Bytes;
use tandem_proto::v1 as pb;

use crate::Gtid;

/// The protocol of a transaction, and the default of its branches (a
/// [`Branch`] may name its own with [`Branch::mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Two-phase commit: participants implement [`crate::TwoPhase`].
    TwoPhase,
    /// Try / confirm / cancel.
    Tcc,
    /// Saga: steps run one at a time in branch order, each committing at
    /// once; a failure compensates the steps that ran, newest first.
    /// Participants implement [`crate::Saga`]. Every branch of a saga is a
    /// saga step.
    Saga,
    /// Transactional message: deliveries made once the business service's
    /// local transaction commits, and never otherwise. A message is not
    /// begun or submitted with a mode: it is started by
    /// [`TransactionClient::prepare_message`](crate::TransactionClient::prepare_message);
    /// its deliveries' participants implement [`crate::Message`]. On a
    /// [`Branch`], only a message's delivery may name it.
    Msg,
}

impl Mode {
    pub(super) fn wire(self) -> i32 {
        match self {
            Mode::TwoPhase => pb::Mode::TwoPhase as i32,
            Mode::Tcc => pb::Mode::Tcc as i32,
            Mode::Saga => pb::Mode::Saga as i32,
            Mode::Msg => pb::Mode::Msg as i32,
        }
    }
}

/// One branch: a participant endpoint, the resource (handler name) there,
/// the payload its handler receives, and optionally its own protocol.
///
/// One transaction may hold 2PC and TCC branches: give a branch its mode
/// and it is called with that protocol whatever the transaction's (a TCC
/// inventory reservation and a 2PC payment in one order):
///
/// ```
/// use tandem_sdk::{Branch, Mode};
///
/// let order = vec![
///     Branch::new("http://inventory:9001", "stock", "sku-7:1").mode(Mode::Tcc),
///     Branch::new("http://payments:9002", "payments", "card-7:80").mode(Mode::TwoPhase),
/// ];
/// # let _ = order;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    /// e.g. `http://127.0.0.1:9001`.
    pub endpoint: String,
    /// Handler name registered in the participant.
    pub resource: String,
    /// Bytes passed to every call of the branch.
    pub payload: Bytes,
    /// The branch's protocol; `None` (the default): the transaction's.
    pub mode: Option<Mode>,
    /// A one-shot saga's step: the steps (1-based positions in the
    /// request) whose actions must be done before this one's. None named
    /// by any step: each runs after the one before.
    pub after: Vec<u32>,
}

impl Branch {
    /// A branch calling `resource` at `endpoint` with `payload`.
    pub fn new(
        endpoint: impl Into<String>,
        resource: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Branch {
            endpoint: endpoint.into(),
            resource: resource.into(),
            payload: payload.into(),
            mode: None,
            after: Vec::new(),
        }
    }

    /// This branch runs `mode` (prepare / commit / rollback for
    /// [`Mode::TwoPhase`], try / confirm / cancel for [`Mode::Tcc`]),
    /// whatever the transaction's mode.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// A saga step that runs after `steps` (1-based positions in the
    /// request); a step of a saga where some step names its order but
    /// this one names none runs at the start.
    ///
    /// ```
    /// use tandem_sdk::Branch;
    ///
    /// // Reserve stock, then charge the card and book the courier in
    /// // parallel; the receipt goes out after both.
    /// let order = vec![
    ///     Branch::new("http://inventory:9001", "stock", "sku-7:1"),
    ///     Branch::new("http://payments:9002", "payments", "card-7:80").after(&[1]),
    ///     Branch::new("http://courier:9003", "pickups", "order-7").after(&[1]),
    ///     Branch::new("http://mail:9004", "receipts", "order-7").after(&[2, 3]),
    /// ];
    /// # let _ = order;
    /// ```
    #[must_use]
    pub fn after(mut self, steps: &[u32]) -> Self {
        self.after = steps.to_vec();
        self
    }

    pub(super) fn wire(self) -> pb::BranchSpec {
        pb::BranchSpec {
            endpoint: self.endpoint,
            resource: self.resource,
            payload: self.payload,
            mode: self.mode.map_or(pb::Mode::Unspecified as i32, Mode::wire),
            after: self.after,
        }
    }
}

/// A branch added by [`TransactionClient::enlist`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enlisted {
    /// Its id within the transaction.
    pub branch_id: u32,
    /// What the participant's prepare returned ([`crate::Vote::yes_with`]).
    pub reply: Bytes,
}

/// A committed transaction, or a submitted (decided) message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// True when every branch acknowledged commit; false when some branch is
    /// still being retried by the coordinator. The outcome is commit either
    /// way: the decision is on the coordinator's disk.
    pub complete: bool,
}

/// A committed one-shot transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// Its id.
    pub gtid: Gtid,
    /// Each branch's prepare reply, in the order the branches were given.
    pub replies: Vec<Bytes>,
    /// As [`CommitOutcome::complete`].
    pub complete: bool,
}
