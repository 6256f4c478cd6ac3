//! [`PgTwoPhase`]: a 2PC participant on PostgreSQL's own two-phase commit.

use std::future::Future;

use tokio_postgres::error::SqlState;

use super::{BranchTx, PgBarrier, PgError, gid};
use crate::barrier::BranchKey;
use crate::handler::{BranchContext, HandlerError, TwoPhase, Vote};

/// The SQL of a 2PC branch, run by [`PgTwoPhase`].
pub trait PgPrepare: Send + Sync + 'static {
    /// Runs the branch's SQL in `tx` and votes. On a yes, [`PgTwoPhase`]
    /// ends the transaction with `PREPARE TRANSACTION`: PostgreSQL then holds
    /// its changes and row locks, across crashes, until the coordinator's
    /// decision commits or rolls them back. On a no or an error it is rolled
    /// back and nothing stays held.
    fn prepare(
        &self,
        ctx: &BranchContext,
        payload: &[u8],
        tx: &BranchTx,
    ) -> impl Future<Output = Result<Vote, HandlerError>> + Send;
}

/// A [`TwoPhase`] handler whose prepare is a PostgreSQL prepared
/// transaction named [`gid`]`(gtid, branch)`.
///
/// - **prepare**: `BEGIN`, the handler's SQL, then `PREPARE TRANSACTION`
///   (on a yes) or `ROLLBACK` (on a no or an error).
/// - **commit / rollback**: `COMMIT PREPARED` / `ROLLBACK PREPARED`. A
///   repeat finds the id gone; it is then answered by the commit marker the
///   prepared transaction wrote: gone and committed is success for a commit,
///   gone and not committed is success for a rollback (which also covers a
///   prepare that never got as far), anything else is an error the
///   coordinator keeps retrying and an operator sees.
///
/// Serve it with its [`PgBarrier`] as the server's barrier, and run
/// [`spawn_prepared_resolver`](super::spawn_prepared_resolver) so that
/// prepared transactions of a crashed process are finished.
///
/// # Examples
///
/// ```no_run
/// use tandem_sdk::postgres::{self, BranchTx, PgBarrier, PgPrepare, PgTwoPhase};
/// use tandem_sdk::{BranchContext, HandlerError, ParticipantServer, Vote};
///
/// struct Debit;
///
/// impl PgPrepare for Debit {
///     async fn prepare(&self, _: &BranchContext, payload: &[u8], tx: &BranchTx)
///         -> Result<Vote, HandlerError>
///     {
///         let amount: i64 = std::str::from_utf8(payload).ok().and_then(|s| s.parse().ok())
///             .ok_or_else(|| HandlerError::new("payload is not an amount"))?;
///         let n = tx
///             .execute("UPDATE accounts SET balance = balance - $1 WHERE id = 1 AND balance >= $1",
///                      &[&amount])
///             .await?;
///         Ok(if n == 1 { Vote::yes() } else { Vote::no("insufficient funds") })
///     }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let barrier = PgBarrier::open(postgres::pool("postgres://app@127.0.0.1/bank", 16)?).await?;
/// ParticipantServer::new()
///     .barrier(barrier.clone())
///     .two_phase("accounts", PgTwoPhase::new(barrier, Debit).await?)
///     .serve("127.0.0.1:9001".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
pub struct PgTwoPhase<H> {
    barrier: PgBarrier,
    handler: H,
}

impl<H: PgPrepare> PgTwoPhase<H> {
    /// Runs `handler`'s branches on `barrier`'s database.
    ///
    /// # Errors
    ///
    /// The database cannot be reached, or its `max_prepared_transactions`
    /// is 0 (prepared transactions are disabled).
    pub async fn new(barrier: PgBarrier, handler: H) -> Result<Self, PgError> {
        let conn = barrier.pool().get().await?;
        let row = conn
            .query_one("SHOW max_prepared_transactions", &[])
            .await?;
        let max: String = row.get(0);
        if max.trim() == "0" {
            return Err(PgError(
                "max_prepared_transactions is 0 on this server, so PREPARE TRANSACTION \
                 is disabled; set it (to at least the number of concurrent transactions, \
                 e.g. max_connections) in postgresql.conf and restart the server"
                    .into(),
            ));
        }
        Ok(PgTwoPhase { barrier, handler })
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: PgPrepare> TwoPhase for PgTwoPhase<H> {
    async fn prepare(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        // On the connection holding the branch's lock, which stays held
        // through PREPARE TRANSACTION until the vote is answered: a
        // rollback or a second prepare at another replica waits, then
        // finds the prepared transaction and its `Tried`. The barrier row
        // is read, not locked: a prepared transaction keeps its row locks
        // until phase 2, and phase 2 rewrites that row.
        let tx = self.barrier.open_tx(ctx, false).await?;
        let vote = match self.handler.prepare(ctx, payload, &tx).await {
            Ok(vote) => vote,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        match &vote {
            Vote::Yes { .. } => tx.prepare().await?,
            // A failed rollback leaves nothing either: the server rolls back
            // when the connection goes.
            Vote::No { .. } => {
                let _ = tx.rollback().await;
            }
        }
        Ok(vote)
    }

    async fn commit(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(finish_prepared(&self.barrier, ctx.key(), true).await?)
    }

    async fn rollback(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        Ok(finish_prepared(&self.barrier, ctx.key(), false).await?)
    }
}

/// `COMMIT PREPARED` (`commit`) or `ROLLBACK PREPARED` the branch's
/// prepared transaction, idempotently (see [`PgTwoPhase`]), on the
/// connection holding the branch's lock when there is one. The prepared
/// transaction holds no lock this waits for: the branch lock is a session
/// lock, which `PREPARE TRANSACTION` does not hand over.
pub(super) async fn finish_prepared(
    barrier: &PgBarrier,
    key: BranchKey,
    commit: bool,
) -> Result<(), PgError> {
    let conn = barrier.lease(key).await?;
    let gid = gid(key);
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let err = match conn
        .batch_execute(&format!("{verb} PREPARED '{gid}'"))
        .await
    {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if err.code() != Some(&SqlState::UNDEFINED_OBJECT) {
        return Err(err.into());
    }
    // Gone: committed exactly when the marker written inside it is visible.
    let committed = conn
        .query_opt(
            "SELECT 1 FROM tandem_prepared_commits WHERE gtid = $1 AND branch_id = $2",
            &[&key.gtid, &(key.branch_id as i64)],
        )
        .await?
        .is_some();
    match (commit, committed) {
        (true, true) | (false, false) => Ok(()),
        (true, false) => Err(PgError(format!(
            "cannot commit: prepared transaction {gid} is gone and was not committed \
             (rolled back by someone else, or never prepared)"
        ))),
        (false, true) => Err(PgError(format!(
            "cannot roll back: prepared transaction {gid} was already committed"
        ))),
    }
}
