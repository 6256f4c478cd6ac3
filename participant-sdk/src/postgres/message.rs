//! [`PgMessages`]: transactional messages sent by a business service whose
//! state is in PostgreSQL: its local transaction records the message, and
//! its back-check reads that record.

use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::IsolationLevel;

use super::{PgError, migrate};
use crate::barrier::{BoxFuture, now_ms};
use crate::client::{Branch, TransactionClient};
use crate::handler::{BranchContext, HandlerError, MessageCheck};
use crate::{Error, Gtid};

/// How long a back-check waits for a local transaction still running,
/// unless set with [`PgMessages::check_timeout`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows deleted per statement by [`PgMessages::purge_older_than`].
const PURGE_BATCH: i64 = 1000;

/// The local transaction's record: its first statement.
const RECORD: &str =
    "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, true, $2)";
/// The back-check's: nothing if the local transaction's record is there,
/// else a `false` row that a late local transaction's `RECORD` fails on.
const CLOSE: &str =
    "INSERT INTO tandem_messages (gtid, committed, updated_ms) VALUES ($1, false, $2)
    ON CONFLICT (gtid) DO NOTHING";
const COMMITTED: &str = "SELECT committed FROM tandem_messages WHERE gtid = $1";
/// Raised, and committed, before a purge deletes anything.
const RAISE_HORIZON: &str = "INSERT INTO tandem_messages_horizon (id, purged_before_ms)
    VALUES (0, $1) ON CONFLICT (id) DO UPDATE SET purged_before_ms =
    GREATEST(tandem_messages_horizon.purged_before_ms, EXCLUDED.purged_before_ms)";
const HORIZON: &str = "SELECT purged_before_ms FROM tandem_messages_horizon WHERE id = 0";
/// How much older than its gtid's time a message's row may be stamped (the
/// clocks of the business service's replicas): a gtid this close above
/// the purge horizon may still have had its row purged.
const CLOCK_MARGIN_MS: u64 = 60_000;
const PURGE: &str = "DELETE FROM tandem_messages WHERE gtid IN (
    SELECT gtid FROM tandem_messages WHERE updated_ms < $1 LIMIT $2)";

/// Transactional messages for a business service whose state is in
/// PostgreSQL: "make these deliveries once my local transaction commits,
/// and never otherwise".
///
/// [`send`](PgMessages::send) prepares the message with the coordinator,
/// runs the local transaction with a row for the message in
/// `tandem_messages` (`committed = true`), commits it, and submits the
/// message. As a [`MessageCheck`] (register it with
/// [`ParticipantServer::check`](crate::ParticipantServer::check)), it
/// answers the coordinator's back-check for a message that was prepared
/// but not submitted in time (the service died between its commit and
/// the submit) from that row.
///
/// # Why the check's answer is final
///
/// The check inserts `(gtid, committed = false)` with `ON CONFLICT DO
/// NOTHING`, commits, and reads the row back. The primary key decides:
///
/// - the local transaction committed its row: the insert does nothing,
///   and the check reads `true` (deliver);
/// - the local transaction is still running: its row is not yet visible,
///   but its key is taken, so the insert waits for it to end, and then
///   either finds it committed (`true`) or inserts `false`;
/// - no local transaction wrote the row (it failed, or has not started):
///   the check's `false` row is committed before it answers no, so a
///   local transaction that runs later fails on the primary key and can
///   never commit. The message is dropped, and nothing it stood for
///   happened.
///
/// The check waits at most [`check_timeout`](PgMessages::check_timeout)
/// (5 s unless set; `lock_timeout` and `statement_timeout` of its
/// transaction) for a running local transaction: past that it fails, the
/// coordinator counts the answer as unknown and asks again later.
///
/// # Retention
///
/// Rows stay until [`purge_older_than`](PgMessages::purge_older_than)
/// removes them. A row must outlive every question about its message:
/// keep rows longer than the coordinator's longest message timeout
/// (`--max-timeout`) plus the time it keeps retrying a check (its retry
/// policy), and longer than any local transaction can run. A `true` row
/// purged before the check comes would make the check answer no for a
/// transaction that committed, and the message would be lost. Days are a
/// safe choice. A message checked back later than that all the same (one
/// STUCK, undecided, for longer than the rows are kept) is not answered
/// no: the purge records how far it removed rows, and a check that finds
/// no row for a message older than that (by its gtid's time, with a
/// minute's margin for clocks) fails, so the message stays STUCK for an
/// operator to settle from the business data.
///
/// The connections must be real sessions (no pooler in transaction mode
/// between the service and PostgreSQL), and the server should run with
/// `synchronous_commit = on` (its default): a check's `false` row must be
/// durable before the message is dropped on its word.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tandem_sdk::postgres::{self, PgMessages};
/// use tandem_sdk::{Branch, ParticipantServer, TransactionClient};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let messages = PgMessages::open(postgres::pool("postgres://app@127.0.0.1/orders", 16)?).await?;
///
/// // The back-check, served where the coordinator can reach it.
/// let _checks = ParticipantServer::new()
///     .check("orders-check", messages.clone())
///     .spawn("0.0.0.0:9000".parse()?)
///     .await?;
///
/// // An order, and loyalty points credited once (and only if) it commits.
/// let client = TransactionClient::connect("http://127.0.0.1:7070").await?;
/// let check = Branch::new("http://orders:9000", "orders-check", "");
/// let points = Branch::new("http://loyalty:9001", "points", "customer-7:+80");
/// let (gtid, order) = messages
///     .send(&client, check, vec![points], Some(Duration::from_secs(30)), |tx| {
///         Box::pin(async move {
///             let row = tx
///                 .query_one(
///                     "INSERT INTO orders (customer, total) VALUES ($1, $2) RETURNING id",
///                     &[&7_i64, &80_i64],
///                 )
///                 .await?;
///             Ok(row.get::<_, i64>(0))
///         })
///     })
///     .await?;
/// println!("order {order} committed; message {gtid} will be delivered");
///
/// // Now and then (here: rows older than a week).
/// messages.purge_older_than(Duration::from_secs(7 * 24 * 3600)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgMessages {
    pool: Pool,
    check_timeout: Duration,
}

impl std::fmt::Debug for PgMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMessages")
            .field("check_timeout", &self.check_timeout)
            .finish_non_exhaustive()
    }
}

/// Why [`PgMessages::send`] did not send its message. Each variant says
/// what became of the local transaction and of the message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// `PrepareMessage` failed: the local transaction did not run. If the
    /// coordinator recorded the message all the same (no answer came), its
    /// check drops it.
    #[error("message {gtid}: not prepared, the local transaction did not run: {source}")]
    Prepare {
        /// The message's id.
        gtid: Gtid,
        /// The coordinator's (or the connection's) error.
        #[source]
        source: Error,
    },
    /// The local transaction returned an error: it was rolled back, and
    /// the message dropped.
    #[error("message {gtid}: the local transaction failed and was rolled back: {source}")]
    Local {
        /// The message's id.
        gtid: Gtid,
        /// The local transaction's error.
        #[source]
        source: HandlerError,
    },
    /// The database refused the local transaction (its commit too, or the
    /// message's row: a check already answered no for it): it did not
    /// commit, and the message is dropped.
    #[error("message {gtid}: the local transaction did not commit: {source}")]
    Database {
        /// The message's id.
        gtid: Gtid,
        /// The database's error.
        #[source]
        source: PgError,
    },
    /// The local transaction committed, but the coordinator had dropped
    /// the message already (an operator aborted it while its check could
    /// not reach this service): nothing is delivered. Deliver by hand, or
    /// undo the local transaction.
    #[error(
        "message {gtid}: the local transaction committed but the coordinator had dropped the \
         message; nothing is delivered: {source}"
    )]
    Dropped {
        /// The message's id.
        gtid: Gtid,
        /// The coordinator's answer.
        #[source]
        source: Error,
    },
    /// The connection failed during `COMMIT`: the local transaction may
    /// or may not have committed. The message follows it: the
    /// coordinator's check delivers it if it committed, drops it if not.
    #[error(
        "message {gtid}: the connection failed during COMMIT; the local transaction may have \
         committed, and the message is delivered if it did: {source}"
    )]
    CommitUnknown {
        /// The message's id: look for its row in `tandem_messages`.
        gtid: Gtid,
        /// The connection's error.
        #[source]
        source: PgError,
    },
}

impl MessageError {
    /// The message's id.
    pub fn gtid(&self) -> Gtid {
        match self {
            MessageError::Prepare { gtid, .. }
            | MessageError::Local { gtid, .. }
            | MessageError::Database { gtid, .. }
            | MessageError::Dropped { gtid, .. }
            | MessageError::CommitUnknown { gtid, .. } => *gtid,
        }
    }
}

/// How the local transaction failed.
enum Failed {
    /// It did not commit, and never will.
    No(MessageError),
    /// It may have committed.
    Unknown(MessageError),
}

impl PgMessages {
    /// Uses `pool`'s database, creating Tandem's tables
    /// (`tandem_messages` among them) if missing.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or the tables cannot be created.
    pub async fn open(pool: Pool) -> Result<PgMessages, PgError> {
        migrate(&pool).await?;
        Ok(PgMessages {
            pool,
            check_timeout: CHECK_TIMEOUT,
        })
    }

    /// How long a back-check waits for a local transaction still running
    /// (5 s by default); past it the check fails and the coordinator asks
    /// again later.
    #[must_use]
    pub fn check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The pool, for the service's own queries.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sends a transactional message: `deliveries` are made once `local`
    /// commits, and never if it does not.
    ///
    /// Makes the message's gtid (a UUID v7), prepares the message with the
    /// coordinator through `client` (`check` names this service's
    /// back-check: see [`ParticipantServer::check`](crate::ParticipantServer::check);
    /// `timeout` is how long the coordinator waits for the submit before
    /// checking back, `None` its default), then opens a transaction,
    /// records the message in it, runs `local` in it and commits, then
    /// submits the message. Returns the gtid and what `local` returned.
    ///
    /// If `local` fails, or the database refuses the transaction, it is
    /// rolled back and the message dropped (a best-effort `Rollback`; the
    /// check drops it anyway). Once the transaction committed, the message
    /// is delivered: a failed submit is only logged (at debug), since the
    /// coordinator's check finds the commit at the timeout; a submit
    /// answered ABORTED (dropped already) is [`MessageError::Dropped`].
    ///
    /// # Errors
    ///
    /// See [`MessageError`]: each variant says what became of the local
    /// transaction and of the message.
    pub async fn send<T, F>(
        &self,
        client: &TransactionClient,
        check: Branch,
        deliveries: Vec<Branch>,
        timeout: Option<Duration>,
        local: F,
    ) -> Result<(Gtid, T), MessageError>
    where
        T: Send,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> BoxFuture<'a, Result<T, HandlerError>> + Send,
    {
        let gtid = Gtid::now_v7();
        client
            .prepare_message(gtid, check, deliveries, timeout)
            .await
            .map_err(|source| MessageError::Prepare { gtid, source })?;
        let value = match self.run_local(gtid, local).await {
            Ok(value) => value,
            Err(Failed::No(e)) => {
                // Dropped now rather than at the timeout; if this fails,
                // the check answers no.
                if let Err(r) = client
                    .rollback(gtid, "the local transaction did not commit")
                    .await
                {
                    tracing::debug!(%gtid, error = %r, "message not dropped now; its check drops it");
                }
                return Err(e);
            }
            Err(Failed::Unknown(e)) => return Err(e),
        };
        match client.submit_message(gtid).await {
            Ok(_) => {}
            // Dropped already (an operator's abort of a message whose check
            // gave up): the local transaction committed in vain.
            Err(source @ Error::Aborted { .. }) => {
                tracing::error!(%gtid, error = %source,
                    "the local transaction committed but the message was dropped");
                return Err(MessageError::Dropped { gtid, source });
            }
            Err(e) => {
                tracing::debug!(%gtid, error = %e,
                    "message not submitted; the coordinator's check delivers it");
            }
        }
        Ok((gtid, value))
    }

    /// The local transaction: the message's row first (so that a check
    /// waits for the whole transaction), then `local`, then the commit.
    async fn run_local<T, F>(&self, gtid: Gtid, local: F) -> Result<T, Failed>
    where
        F: for<'a> FnOnce(&'a Transaction<'a>) -> BoxFuture<'a, Result<T, HandlerError>>,
    {
        let database = |e: PgError| Failed::No(MessageError::Database { gtid, source: e });
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| database(PgError::from(e)))?;
        let tx = conn.transaction().await.map_err(|e| database(e.into()))?;
        let recorded = async {
            let stmt = tx.prepare_cached(RECORD).await?;
            tx.execute(&stmt, &[&gtid, &(now_ms() as i64)]).await
        };
        if let Err(e) = recorded.await {
            let _ = tx.rollback().await;
            return Err(database(e.into()));
        }
        let value = match local(&tx).await {
            Ok(value) => value,
            Err(source) => {
                let _ = tx.rollback().await;
                return Err(Failed::No(MessageError::Local { gtid, source }));
            }
        };
        // The transaction must still be good and still hold the message's
        // row: after a statement of `local` failed (its error ignored),
        // PostgreSQL answers COMMIT with a rollback that tokio-postgres
        // reports as success; this read fails instead.
        let kept = async {
            let stmt = tx.prepare_cached(COMMITTED).await?;
            tx.query_opt(&stmt, &[&gtid]).await
        };
        match kept.await {
            Ok(Some(row)) if row.get::<_, bool>(0) => {}
            Ok(_) => {
                let _ = tx.rollback().await;
                let source = HandlerError::new(
                    "the local transaction removed or changed the message's row in \
                     tandem_messages",
                );
                return Err(Failed::No(MessageError::Local { gtid, source }));
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(database(e.into()));
            }
        }
        match tx.commit().await {
            Ok(()) => Ok(value),
            // The server answered: the transaction is rolled back.
            Err(e) if e.as_db_error().is_some() => Err(database(e.into())),
            // No answer: it may have committed.
            Err(e) => Err(Failed::Unknown(MessageError::CommitUnknown {
                gtid,
                source: e.into(),
            })),
        }
    }

    /// Whether message `gtid`'s local transaction committed, made final
    /// (see the type's docs): a `false` row is committed before `false` is
    /// returned.
    async fn committed(&self, gtid: Gtid) -> Result<bool, Unknown> {
        let mut conn = self.pool.get().await?;
        // Read committed whatever the database's default: the insert must
        // wait for a running local transaction and then see its outcome.
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await?;
        let ms = self.check_timeout.as_millis().min(i32::MAX as u128);
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {ms}; SET LOCAL statement_timeout = {ms}"
        ))
        .await?;
        let close = tx.prepare_cached(CLOSE).await?;
        let closed = tx.execute(&close, &[&gtid, &(now_ms() as i64)]).await? == 1;
        if closed {
            // No row: "not committed", unless a purge may have removed a
            // committed one (a message checked back long after, e.g. STUCK
            // for days): then nothing is written and the answer is unknown.
            let horizon = tx.prepare_cached(HORIZON).await?;
            let purged_before = tx
                .query_opt(&horizon, &[])
                .await?
                .map_or(0, |row| row.get::<_, i64>(0).max(0) as u64);
            if may_have_been_purged(gtid, purged_before) {
                let _ = tx.rollback().await;
                return Err(Unknown::Purged {
                    gtid,
                    purged_before,
                });
            }
        }
        let read = tx.prepare_cached(COMMITTED).await?;
        let committed: bool = tx.query_one(&read, &[&gtid]).await?.get(0);
        tx.commit().await?;
        Ok(committed)
    }

    /// Deletes the rows of messages recorded more than `age` ago, in
    /// batches; returns how many. See the type's docs, "Retention", for
    /// how long rows must be kept.
    ///
    /// # Errors
    ///
    /// The database failed (the batches deleted before stay deleted).
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64, PgError> {
        let before = now_ms().saturating_sub(age.as_millis() as u64) as i64;
        let conn = self.pool.get().await?;
        // The horizon first (its own statement, committed): a check that
        // then misses a row this purge removed sees it.
        let raise = conn.prepare_cached(RAISE_HORIZON).await?;
        conn.execute(&raise, &[&before]).await?;
        let stmt = conn.prepare_cached(PURGE).await?;
        let mut removed = 0;
        loop {
            let n = conn.execute(&stmt, &[&before, &PURGE_BATCH]).await?;
            removed += n;
            if n < PURGE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }
}

/// Whether message `gtid`'s row may be among those a purge up to
/// `purged_before` removed: its gtid's time (a UUID v7's) is not clearly
/// after the horizon; a gtid without a time, once anything was purged.
fn may_have_been_purged(gtid: Gtid, purged_before: u64) -> bool {
    if purged_before == 0 {
        return false;
    }
    let ms = gtid
        .get_timestamp()
        .filter(|_| gtid.get_version_num() == 7)
        .map(|ts| {
            let (secs, nanos) = ts.to_unix();
            secs.saturating_mul(1000) + u64::from(nanos / 1_000_000)
        });
    ms.is_none_or(|ms| ms < purged_before.saturating_add(CLOCK_MARGIN_MS))
}

/// Why a back-check has no answer.
#[derive(Debug, thiserror::Error)]
enum Unknown {
    #[error(transparent)]
    Database(#[from] PgError),
    #[error(
        "message {gtid}: no row, but rows of messages as old as it were purged (before {purged_before} ms \
         since the epoch): whether its local transaction committed is no longer known here; \
         settle it by hand (tandem tx resolve {gtid} --branch 1 --as committed | rolled-back)"
    )]
    Purged { gtid: Gtid, purged_before: u64 },
}

impl From<tokio_postgres::Error> for Unknown {
    fn from(e: tokio_postgres::Error) -> Self {
        Unknown::Database(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for Unknown {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Unknown::Database(e.into())
    }
}

/// The back-check of the messages [`PgMessages::send`] sends; see the
/// type's docs for why its answer is final. The payload is not used.
impl MessageCheck for PgMessages {
    async fn check(&self, ctx: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        match self.committed(ctx.gtid).await {
            Ok(committed) => Ok(committed),
            Err(Unknown::Database(e)) => Err(e.into()),
            Err(e @ Unknown::Purged { .. }) => Err(HandlerError::new(e.to_string())),
        }
    }
}
