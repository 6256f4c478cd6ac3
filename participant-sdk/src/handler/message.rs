//! Transactional messages: the [`Message`] handler a delivery's participant
//! implements, and the [`MessageCheck`] a business service serves so that
//! the coordinator can ask whether its local transaction committed.
//!
//! A business service prepares a message with the coordinator
//! ([`TransactionClient::prepare_message`](crate::TransactionClient::prepare_message)),
//! commits its own database transaction, then submits the message
//! ([`submit_message`](crate::TransactionClient::submit_message)); the
//! coordinator then delivers it to every delivery branch. A message never
//! submitted is checked back when its timeout passes: the business
//! service's [`MessageCheck`] says whether the local transaction committed.
//! [`PgMessages`](crate::postgres::PgMessages) (feature `postgres`) is
//! the whole business side for a service whose state is in PostgreSQL.

use std::future::Future;

use super::{BoxFuture, BranchContext, DynHandler, HandlerError, Vote};

/// A participant receiving transactional messages: `deliver` is called for
/// its branch once the message is decided (its business service's local
/// transaction committed), and called again until it succeeds: at least
/// once, however long that takes.
///
/// Behind the barrier, a repeat of a delivery that succeeded is answered
/// without calling the handler, and concurrent repeats run it once. The
/// barrier's record of a success is written after the handler returns, so
/// a process dying in between would deliver again; a handler that writes
/// its change in the barrier's store, in the same transaction as the
/// record ([`PgBarrier::begin`](crate::postgres::PgBarrier::begin),
/// [`SledBarrier::transaction`](crate::SledBarrier::transaction)), takes
/// each message exactly once.
///
/// An error is retried by the coordinator (with backoff), unless it is
/// [`permanent`](HandlerError::permanent): the message then waits for an
/// operator. A message is never withdrawn once decided: there is no undo.
///
/// Implement the method as an `async fn`; the future must be `Send`. Each
/// call runs to completion in a task of its own, as the other handlers'
/// (see [`Tcc`](crate::Tcc), "Cancellation").
///
/// # Examples
///
/// ```
/// use tandem_sdk::{BranchContext, HandlerError, Message};
///
/// struct Points;
///
/// impl Message for Points {
///     async fn deliver(&self, _: &BranchContext, payload: &[u8]) -> Result<(), HandlerError> {
///         // Credit the loyalty points the order earned.
///         let _ = payload;
///         Ok(())
///     }
/// }
/// ```
pub trait Message: Send + Sync + 'static {
    /// Takes the message: do what it asks. Called until it returns `Ok`.
    fn deliver(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A business service's back-check: did the local transaction of the
/// message `ctx.gtid` commit? The coordinator asks when the message was
/// prepared but not submitted before its timeout (the business service
/// crashed, or lost the coordinator, between its commit and
/// `SubmitMessage`).
///
/// - `Ok(true)`: it committed; the message is delivered.
/// - `Ok(false)`: it did not, **and never will**; the message is dropped.
///   This answer must be final: a transaction still running (or one that
///   could still start, on a retried request) must be prevented from
///   committing before answering no, or a message could be dropped for a
///   change that later commits.
///   [`PgMessages`](crate::postgres::PgMessages) does this by taking the
///   gtid's row itself.
/// - `Err(_)`: not known (the database is unreachable, the transaction is
///   still running): the coordinator asks again with backoff.
///
/// `payload` is the check payload given to `prepare_message`; `ctx.phase`
/// is [`Phase::Try`](crate::Phase::Try) (a check is a vote), and
/// `ctx.branch_id` is 1. The check does not pass the barrier: it reads the
/// business service's own record.
///
/// # Examples
///
/// ```
/// use tandem_sdk::{BranchContext, HandlerError, MessageCheck};
///
/// struct Orders;
///
/// impl MessageCheck for Orders {
///     async fn check(&self, ctx: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
///         // Look up the row the local transaction wrote under `ctx.gtid`,
///         // and make sure it can no longer appear before answering false.
///         let _ = ctx.gtid;
///         Err(HandlerError::new("not implemented"))
///     }
/// }
/// ```
pub trait MessageCheck: Send + Sync + 'static {
    /// Whether the local transaction of message `ctx.gtid` committed.
    fn check(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send;
}

/// A shared handler is a handler: register an `Arc<T>` and keep a clone to
/// inspect its state.
impl<T: Message> Message for std::sync::Arc<T> {
    fn deliver(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        T::deliver(self, ctx, payload)
    }
}

/// A shared check is a check.
impl<T: MessageCheck> MessageCheck for std::sync::Arc<T> {
    fn check(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<bool, HandlerError>> + Send {
        T::check(self, ctx, payload)
    }
}

/// A [`Message`] handler behind [`DynHandler`]: a delivery is its phase 2
/// after a commit decision.
pub(crate) struct MessageHandler<T>(pub(crate) T);

impl<T: Message> DynHandler for MessageHandler<T> {
    fn phase_one<'a>(
        &'a self,
        _: &'a BranchContext,
        _: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        // Never called: dispatch routes only deliveries to this resource.
        Box::pin(std::future::ready(Err(HandlerError::permanent(
            "a message delivery has no phase 1",
        ))))
    }

    fn phase_two<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
        commit: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        if commit {
            Box::pin(self.0.deliver(ctx, payload))
        } else {
            // A message is never undone once decided, and a delivery never
            // ran before the decision: nothing to drop.
            Box::pin(std::future::ready(Ok(())))
        }
    }

    fn is_message(&self) -> bool {
        true
    }
}

/// A [`MessageCheck`] behind [`DynHandler`]: the check is a vote, asked
/// outside the barrier.
pub(crate) struct CheckHandler<T>(pub(crate) T);

impl<T: MessageCheck> DynHandler for CheckHandler<T> {
    fn phase_one<'a>(
        &'a self,
        ctx: &'a BranchContext,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vote, HandlerError>> {
        Box::pin(async move {
            Ok(if self.0.check(ctx, payload).await? {
                Vote::yes()
            } else {
                Vote::no("the local transaction did not commit")
            })
        })
    }

    fn phase_two<'a>(
        &'a self,
        _: &'a BranchContext,
        _: &'a [u8],
        _: bool,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        // Never called: dispatch routes only checks to this resource.
        Box::pin(std::future::ready(Err(HandlerError::permanent(
            "a message's back-check has no phase 2",
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::barrier::Phase;

    struct Committed(bool);

    impl MessageCheck for Committed {
        async fn check(&self, _: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
            Ok(self.0)
        }
    }

    fn ctx() -> BranchContext {
        BranchContext {
            gtid: crate::Gtid::now_v7(),
            branch_id: 1,
            resource: "orders".into(),
            attempt: 1,
            phase: Phase::Try,
            epoch: 1,
            traceparent: None,
        }
    }

    // A check's answer is a vote: committed is yes, not committed is no.
    #[tokio::test]
    async fn a_check_votes_yes_only_for_a_committed_transaction() {
        let c = ctx();
        let yes = CheckHandler(Committed(true)).phase_one(&c, b"").await;
        assert_eq!(yes, Ok(Vote::yes()));
        let no = CheckHandler(Committed(false)).phase_one(&c, b"").await;
        assert!(matches!(no, Ok(Vote::No { .. })), "{no:?}");
    }
}
