//! Participant handlers: the code that owns a branch's resource.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::Gtid;

/// Which call this is, passed to every handler method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchContext {
    /// The global transaction.
    pub gtid: Gtid,
    /// The branch within it; `(gtid, branch_id)` identifies the branch, so it
    /// is the key for idempotency records.
    pub branch_id: u32,
    /// The resource name the branch was enlisted with.
    pub resource: String,
    /// 1 for the first call of this phase, 2 for the first retry, and so on.
    pub attempt: u32,
}

/// A participant's phase-1 answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// Prepared: the work is held durably and can be committed or rolled
    /// back later. `reply` goes back to the business service.
    Yes {
        /// Bytes returned by `enlist` (e.g. a reservation id); may be empty.
        reply: Bytes,
    },
    /// Refused: nothing is held; the whole transaction aborts with `reason`.
    No {
        /// Shown to the business service and kept in the coordinator's record.
        reason: String,
    },
}

impl Vote {
    /// Yes, with no reply bytes.
    pub fn yes() -> Vote {
        Vote::Yes {
            reply: Bytes::new(),
        }
    }

    /// Yes, returning `reply` to the business service.
    pub fn yes_with(reply: impl Into<Bytes>) -> Vote {
        Vote::Yes {
            reply: reply.into(),
        }
    }

    /// No, because of `reason`.
    pub fn no(reason: impl Into<String>) -> Vote {
        Vote::No {
            reason: reason.into(),
        }
    }
}

/// A handler could not do its work right now (database down, bug, ...).
///
/// In phase 1 this aborts the transaction like a no vote, but the
/// coordinator still calls rollback, since the work may have been done. In
/// phase 2 the coordinator retries the call later.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError(message.into())
    }
}

/// A resource taking part in 2PC transactions.
///
/// The coordinator calls `prepare` once per branch, then exactly one of
/// `commit` or `rollback` — possibly more than once (after a lost reply or a
/// coordinator restart), so both must be idempotent: a second commit of the
/// same `(gtid, branch_id)` does nothing. `rollback` can also arrive for a
/// branch whose `prepare` never ran or failed; it must then succeed and do
/// nothing.
///
/// Implement the methods as `async fn`; the futures must be `Send`.
///
/// # Examples
///
/// ```
/// use tandem_sdk::{BranchContext, HandlerError, TwoPhase, Vote};
///
/// struct AlwaysYes;
///
/// impl TwoPhase for AlwaysYes {
///     async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
///         Ok(Vote::yes())
///     }
///     async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         Ok(())
///     }
///     async fn rollback(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
/// ```
pub trait TwoPhase: Send + Sync + 'static {
    /// Phase 1: do the work, hold it durably, vote.
    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send;

    /// Phase 2 after a commit decision: make the prepared work permanent.
    fn commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Phase 2 after an abort decision: undo the prepared work, if any.
    fn rollback(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe form of [`TwoPhase`], so handlers of different types can be
/// stored by resource name.
pub(crate) trait DynTwoPhase: Send + Sync + 'static {
    fn prepare<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>>;
    fn commit<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
    fn rollback<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<T: TwoPhase> DynTwoPhase for T {
    fn prepare<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        Box::pin(TwoPhase::prepare(self, ctx, payload))
    }
    fn commit<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(TwoPhase::commit(self, ctx, payload))
    }
    fn rollback<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(TwoPhase::rollback(self, ctx, payload))
    }
}

/// A shared handler is a handler: register an `Arc<T>` and keep a clone to
/// inspect its state.
impl<T: TwoPhase> TwoPhase for std::sync::Arc<T> {
    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send {
        T::prepare(self, ctx, payload)
    }
    fn commit(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::commit(self, ctx, payload)
    }
    fn rollback(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::rollback(self, ctx, payload)
    }
}
