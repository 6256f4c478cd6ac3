//! Participant handlers: the code that owns a branch's resource.
//!
//! - this file: [`TwoPhase`], [`Tcc`], [`Saga`], what every handler gets
//!   ([`BranchContext`]) and answers ([`Vote`], [`HandlerError`]);
//! - [`message`]: transactional messages, [`Message`] (a delivery) and
//!   [`MessageCheck`] (the business service's back-check).

pub mod message;

pub(crate) use message::{CheckHandler, MessageHandler};
pub use message::{Message, MessageCheck};

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::Gtid;
use crate::barrier::{BranchKey, Phase};

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
    /// Which call of this phase it is, as the coordinator counts: always 1
    /// for try / prepare (phase 1 is never repeated by the coordinator);
    /// for confirm / cancel (commit / rollback) 1 for the first call, 2 for
    /// the first retry, and so on. The count is not durable: after a
    /// coordinator restart a call may come again with a number already
    /// seen. 0 when the SDK itself finishes a branch found in doubt
    /// ([`ParticipantServer::resolve_in_doubt`](crate::ParticipantServer::resolve_in_doubt)).
    /// A hint for logs; never key idempotency on it.
    pub attempt: u32,
    /// Which call: try / prepare, confirm / commit, cancel / rollback, or
    /// a message's delivery (a message's back-check sees
    /// [`Phase::Try`]).
    pub phase: Phase,
    /// The transaction's epoch as the calling coordinator knows it: 1 for
    /// the coordinator that started it, one more after every takeover by
    /// another coordinator of a shared store; 0 from a coordinator that
    /// does not number owners, and when the SDK itself finishes a branch
    /// in doubt. The barrier refuses a call from an older epoch than it has
    /// seen for the branch.
    pub epoch: u64,
    /// The W3C trace context the coordinator sent: the trace of the
    /// business call that started the transaction (the same in every phase,
    /// after a coordinator restart too), with the coordinator's span as the
    /// parent. `None` when the transaction was started without one, when
    /// the header was invalid, and when the SDK itself finishes a branch in
    /// doubt. The handler's span (`tandem.branch`, fields `trace_id`,
    /// `gtid`, `branch_id`, `resource`, `phase`) is already its child; use
    /// this to pass the trace on, e.g. to a downstream call.
    pub traceparent: Option<crate::TraceParent>,
}

impl BranchContext {
    /// The trace context the coordinator sent, if any (see
    /// [`BranchContext::traceparent`](field@BranchContext::traceparent)).
    pub fn traceparent(&self) -> Option<&crate::TraceParent> {
        self.traceparent.as_ref()
    }

    /// The branch's key in the barrier.
    pub fn key(&self) -> BranchKey {
        BranchKey {
            gtid: self.gtid,
            branch_id: self.branch_id,
        }
    }
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

/// A handler could not do its work (database down, bug, ...).
///
/// In phase 1 this aborts the transaction like a no vote, but the
/// coordinator still calls rollback, since the work may have been done. In
/// phase 2 the coordinator retries the call later, unless the error is
/// [`permanent`](HandlerError::permanent).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// What went wrong; sent to the coordinator (capped) and kept in its
    /// record.
    pub message: String,
    /// The call will never succeed, however often it is repeated.
    pub permanent: bool,
}

impl HandlerError {
    /// An error with this message: a phase-2 call is retried.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: false,
        }
    }

    /// A phase-2 call that will never succeed (the account is gone, the
    /// data it needs was deleted): the coordinator stops retrying, marks the
    /// transaction STUCK with this message, and an operator settles the
    /// branch (`tandem tx resolve`). Sent as `FAILED_PRECONDITION` with the
    /// `PERMANENT` ErrorInfo (docs/participant-protocol.md §5). In phase 1
    /// it is like [`HandlerError::new`].
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            permanent: true,
        }
    }
}

/// A resource taking part in 2PC transactions.
///
/// The coordinator calls `prepare` once per branch, then one of `commit` or
/// `rollback`, repeating it until acknowledged (after a lost reply or a
/// coordinator restart). The SDK's barrier (see [`crate::barrier`]) absorbs
/// the repeats: `commit` and `rollback` run at most once to completion per
/// branch, `rollback` is not called when no `prepare` started (or it voted
/// no), and a `prepare` arriving after its rollback is refused. `rollback`
/// still runs after a prepare that failed or timed out, so it must undo
/// whatever part of the prepare took effect, possibly nothing.
///
/// Implement the methods as `async fn`; the futures must be `Send`.
///
/// # Cancellation
///
/// Each call runs to completion in a task of its own, barrier record
/// included: when the coordinator's call is cancelled (its deadline passes,
/// the connection drops), the SDK stops waiting for the answer but does not
/// cut the handler off at an `.await`. Only a crash of the process stops a
/// handler midway, which the barrier and the durable-store advice cover. A
/// handler that never returns holds its branch's barrier lock, so repeats
/// of that branch wait: bound your own waits (lock timeouts, I/O
/// timeouts).
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

/// A resource taking part in TCC transactions.
///
/// `try_` reserves the resource (funds frozen, seats held) and votes;
/// after a commit decision `confirm` uses the reservation, after an abort
/// `cancel` releases it. The SDK's barrier (on by default, see
/// [`barrier`](crate::barrier)) guarantees that:
///
/// - `confirm` and `cancel` run at most once to completion per branch, even
///   when the coordinator repeats them or sends them concurrently;
/// - `cancel` is not called when no try started for the branch ("empty
///   rollback"), nor after a try that voted no;
/// - a `try_` arriving after its branch was cancelled is refused without
///   calling the handler ("hanging").
///
/// `cancel` is called after a try that failed, timed out or crashed, so it
/// must release whatever part of the try took effect, possibly nothing.
///
/// # Cancellation
///
/// Each call runs to completion in a task of its own, barrier record
/// included: when the coordinator's call is cancelled (its deadline passes,
/// the connection drops), the SDK stops waiting for the answer but does not
/// cut the handler off at an `.await`. Only a crash of the process stops a
/// handler midway, which the barrier and the durable-store advice cover. A
/// handler that never returns holds its branch's barrier lock, so repeats
/// of that branch wait: bound your own waits (lock timeouts, I/O
/// timeouts).
///
/// # Examples
///
/// ```
/// use tandem_sdk::{BranchContext, HandlerError, Tcc, Vote};
///
/// struct Seats;
///
/// impl Tcc for Seats {
///     async fn try_(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
///         Ok(Vote::yes_with("seat 12C held")) // hold a seat
///     }
///     async fn confirm(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         Ok(()) // sell the held seat
///     }
///     async fn cancel(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         Ok(()) // release the hold, if there is one
///     }
/// }
/// ```
pub trait Tcc: Send + Sync + 'static {
    /// Reserve the resource and vote. A no must leave nothing reserved.
    fn try_(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send;

    /// Use the reservation (after a commit decision).
    fn confirm(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Release the reservation, or whatever part of it exists (after an
    /// abort decision).
    fn cancel(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A saga step's participant: an action that commits at once, and a
/// compensation that undoes it.
///
/// The coordinator calls `action` once the steps before it are done, and
/// `compensate` when the saga fails after (or while) the action ran:
/// newest step first, and only the coordinator does (in-doubt resolution
/// never compensates a saga step: it would break that order). An action
/// that failed with an error that may pass (not a no, not
/// [`HandlerError::permanent`]), or whose answer was lost, is called
/// again (forward retry, with backoff, until the saga's deadline): keep
/// what the action did in its own transaction (with the barrier's store)
/// and answer a repeat from that, doing nothing twice. Behind the
/// barrier, a repeated compensation runs once, a compensation that
/// arrives before its action is recorded without calling `compensate`
/// (nothing to undo), and the late action is then refused. On the wire an action is a `Try`, a
/// compensation a `Cancel`, and a finished saga closes each step with a
/// `Confirm` that needs no handler.
///
/// ```
/// use tandem_sdk::{BranchContext, HandlerError, Saga, Vote};
///
/// struct Charge;
///
/// impl Saga for Charge {
///     async fn action(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
///         // Charge the card now, keyed by (ctx.gtid, ctx.branch_id) and
///         // recorded, so that a retried action charges once.
///         Ok(Vote::yes())
///     }
///     async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         Ok(()) // refund it
///     }
/// }
/// ```
pub trait Saga: Send + Sync + 'static {
    /// Do the step and commit it. A no must leave nothing done; a
    /// permanent error ends the saga (compensated); any other error is
    /// retried. Called again for the same step (a retry), answer from what
    /// the first run committed, if it did.
    fn action(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send;

    /// Undo the step's action (after the saga failed). The barrier's
    /// `Tried` row is written before the action runs, so this may come
    /// for an action that never committed (it failed, or its process
    /// died): undo what the action's own record says it did (written in
    /// its transaction with the barrier's store), never the payload
    /// blindly.
    fn compensate(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The saga completed (every step done): nothing to undo any more.
    /// Optional: for a participant that keeps something per step until
    /// then. By default nothing runs.
    fn complete(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (ctx, payload);
        std::future::ready(Ok(()))
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe form of both handler traits, so handlers of different types
/// and protocols can be stored by resource name and run through one barrier.
pub(crate) trait DynHandler: Send + Sync + 'static {
    fn phase_one<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>>;

    /// Commit / confirm when `commit`, else rollback / cancel.
    fn phase_two<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
        commit: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// A saga step's: only its coordinator compensates it (newest step
    /// first), never in-doubt resolution.
    fn is_saga(&self) -> bool {
        false
    }

    /// A message delivery's: it runs only after its message is decided,
    /// so in-doubt resolution never cancels it (an abort answer for it is
    /// left to an operator).
    fn is_message(&self) -> bool {
        false
    }
}

/// A [`TwoPhase`] handler behind [`DynHandler`].
pub(crate) struct TwoPhaseHandler<T>(pub(crate) T);

/// A [`Tcc`] handler behind [`DynHandler`].
pub(crate) struct TccHandler<T>(pub(crate) T);

/// A [`Saga`] handler behind [`DynHandler`].
pub(crate) struct SagaHandler<T>(pub(crate) T);

impl<T: Saga> DynHandler for SagaHandler<T> {
    fn phase_one<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        Box::pin(self.0.action(ctx, payload))
    }

    fn phase_two<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
        commit: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        if commit {
            // The action committed already: closing the step is the
            // barrier's record (and the optional hook).
            Box::pin(self.0.complete(ctx, payload))
        } else {
            Box::pin(self.0.compensate(ctx, payload))
        }
    }

    fn is_saga(&self) -> bool {
        true
    }
}

impl<T: TwoPhase> DynHandler for TwoPhaseHandler<T> {
    fn phase_one<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        Box::pin(self.0.prepare(ctx, payload))
    }

    fn phase_two<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
        commit: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        if commit {
            Box::pin(self.0.commit(ctx, payload))
        } else {
            Box::pin(self.0.rollback(ctx, payload))
        }
    }
}

impl<T: Tcc> DynHandler for TccHandler<T> {
    fn phase_one<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        Box::pin(self.0.try_(ctx, payload))
    }

    fn phase_two<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
        commit: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        if commit {
            Box::pin(self.0.confirm(ctx, payload))
        } else {
            Box::pin(self.0.cancel(ctx, payload))
        }
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

/// A shared handler is a handler: register an `Arc<T>` and keep a clone to
/// inspect its state.
impl<T: Tcc> Tcc for std::sync::Arc<T> {
    fn try_(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send {
        T::try_(self, ctx, payload)
    }
    fn confirm(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::confirm(self, ctx, payload)
    }
    fn cancel(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::cancel(self, ctx, payload)
    }
}

impl<T: Saga> Saga for std::sync::Arc<T> {
    fn action(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send {
        T::action(self, ctx, payload)
    }
    fn compensate(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::compensate(self, ctx, payload)
    }
    fn complete(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::complete(self, ctx, payload)
    }
}
