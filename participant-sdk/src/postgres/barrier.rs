//! [`PgBarrier`]: barrier records in the participant's PostgreSQL database,
//! and [`BranchTx`], a handler's transaction that commits its barrier record
//! with the business change.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use deadpool_postgres::{ClientWrapper, Object, Pool};
use tokio_postgres::types::ToSql;

use super::{PgError, migrate};
use crate::barrier::locks::{KeyGuard, KeyLocks};
use crate::barrier::{
    BarrierEntry, BarrierError, BarrierRecord, BarrierStore, BoxFuture, BranchKey, InDoubt, Mark,
    PurgePage, now_ms,
};
use crate::handler::{BranchContext, HandlerError};

/// Barrier records in a PostgreSQL table (`tandem_barrier`), next to the
/// handler's own tables, so that a handler can commit its change and the
/// record in one transaction with [`PgBarrier::begin`].
///
/// Every record write is a committed transaction, durable when the server
/// runs with `synchronous_commit = on` (its default). Calls for one branch
/// are serialised within the process; across processes sharing the
/// database, [`begin`](PgBarrier::begin) locks the branch's row, so a
/// second process finishing the same branch waits and then fails instead of
/// running the handler twice.
///
/// # Examples
///
/// A TCC handler whose hold and barrier record commit together:
///
/// ```no_run
/// use tandem_sdk::postgres::{self, PgBarrier};
/// use tandem_sdk::{BranchContext, HandlerError, ParticipantServer, Tcc, Vote};
///
/// struct Seats { barrier: PgBarrier }
///
/// impl Tcc for Seats {
///     async fn try_(&self, ctx: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
///         let tx = self.barrier.begin(ctx).await?;
///         let held = tx
///             .execute(
///                 "UPDATE seats SET held_by = $1 WHERE seat = '12C' AND held_by IS NULL",
///                 &[&ctx.gtid],
///             )
///             .await?;
///         if held == 0 {
///             tx.rollback().await?;
///             return Ok(Vote::no("seat taken"));
///         }
///         tx.commit().await?;
///         Ok(Vote::yes())
///     }
///     async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         // The sale and the barrier's `Confirmed` commit together: after a
///         // crash the coordinator's repeat finds `Confirmed` and sells nothing.
///         let tx = self.barrier.begin(ctx).await?;
///         tx.execute("UPDATE seats SET sold = true WHERE held_by = $1", &[&ctx.gtid]).await?;
///         Ok(tx.commit().await?)
///     }
///     async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         let tx = self.barrier.begin(ctx).await?;
///         tx.execute("UPDATE seats SET held_by = NULL WHERE held_by = $1", &[&ctx.gtid]).await?;
///         Ok(tx.commit().await?)
///     }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let barrier = PgBarrier::open(postgres::pool("postgres://app@127.0.0.1/seats", 16)?).await?;
/// ParticipantServer::new()
///     .barrier(barrier.clone())
///     .tcc("seats", Seats { barrier })
///     .serve("127.0.0.1:9001".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgBarrier {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    locks: KeyLocks,
}

impl PgBarrier {
    /// Uses `pool`'s database, creating Tandem's tables if missing.
    ///
    /// # Errors
    ///
    /// The database cannot be reached or the tables cannot be created.
    pub async fn open(pool: Pool) -> Result<PgBarrier, PgError> {
        migrate(&pool).await?;
        Ok(PgBarrier {
            inner: Arc::new(Inner {
                pool,
                locks: KeyLocks::default(),
            }),
        })
    }

    /// The pool, for the handler's own queries.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Opens a transaction for this call's business SQL. Its
    /// [`commit`](BranchTx::commit) also stores the call's barrier record
    /// (`Confirmed` for a confirm / commit, `Cancelled` for a cancel /
    /// rollback), so both happen or neither does.
    ///
    /// Use it in a handler served with this store as the server's
    /// [`barrier`](crate::ParticipantServer::barrier). It locks the branch's
    /// barrier row until the transaction ends.
    ///
    /// # Errors
    ///
    /// The database cannot be reached, or the branch's record is not the
    /// `Tried` the server stored before calling the handler (another
    /// process finished the branch, or the server uses another store).
    pub async fn begin(&self, ctx: &BranchContext) -> Result<BranchTx, HandlerError> {
        Ok(self.open_tx(ctx, true).await?)
    }

    /// A transaction for `ctx`; `lock` takes the barrier row for update
    /// (not for 2PC prepare, whose locks outlive the call).
    pub(super) async fn open_tx(
        &self,
        ctx: &BranchContext,
        lock: bool,
    ) -> Result<BranchTx, PgError> {
        let key = ctx.key();
        let conn = self.inner.pool.get().await?;
        let tx = BranchTx {
            conn: Some(conn),
            key,
            mark: ctx.phase.done_mark(),
        };
        tx.batch_execute("BEGIN").await?;
        let sql = if lock { SELECT_FOR_UPDATE } else { SELECT_MARK };
        let stmt = tx.prepare_cached(sql).await?;
        let row = tx
            .query_opt(&stmt, &[&key.gtid, &(key.branch_id as i64)])
            .await?;
        let mark = row.map(|r| r.get::<_, i16>(0));
        if mark != Some(Mark::Tried.code() as i16) {
            let found = match mark {
                None => "no record".to_string(),
                Some(code) => format!("{:?}", Mark::from_code(code as u8)),
            };
            return Err(PgError(format!(
                "barrier: branch {} of {} has {found} in tandem_barrier, not Tried: \
                 another process finished it, or the server's barrier is not this PgBarrier",
                key.branch_id, key.gtid
            )));
        }
        Ok(tx)
    }

    fn locks(&self) -> &KeyLocks {
        &self.inner.locks
    }
}

const SELECT_MARK: &str = "SELECT mark FROM tandem_barrier WHERE gtid = $1 AND branch_id = $2";
const SELECT_FOR_UPDATE: &str =
    "SELECT mark FROM tandem_barrier WHERE gtid = $1 AND branch_id = $2 FOR UPDATE";
const SELECT_RECORD: &str =
    "SELECT mark, updated_ms, epoch FROM tandem_barrier WHERE gtid = $1 AND branch_id = $2";
/// Writes a mark; a repeat of the same mark at no newer epoch changes
/// nothing (and so costs no WAL flush).
const PUT: &str = "INSERT INTO tandem_barrier (gtid, branch_id, mark, updated_ms, epoch)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (gtid, branch_id) DO UPDATE SET mark = EXCLUDED.mark,
        updated_ms = EXCLUDED.updated_ms,
        epoch = GREATEST(tandem_barrier.epoch, EXCLUDED.epoch),
        resource = CASE WHEN EXCLUDED.mark = 1 THEN tandem_barrier.resource END,
        payload = CASE WHEN EXCLUDED.mark = 1 THEN tandem_barrier.payload END
    WHERE tandem_barrier.mark <> EXCLUDED.mark OR tandem_barrier.epoch < EXCLUDED.epoch";
const PUT_TRIED: &str =
    "INSERT INTO tandem_barrier (gtid, branch_id, mark, updated_ms, resource, payload, epoch)
    VALUES ($1, $2, 1, $3, $4, $5, $6)
    ON CONFLICT (gtid, branch_id) DO UPDATE SET mark = 1, updated_ms = EXCLUDED.updated_ms,
        resource = EXCLUDED.resource, payload = EXCLUDED.payload,
        epoch = GREATEST(tandem_barrier.epoch, EXCLUDED.epoch)";
const UPDATE_MARK: &str = "UPDATE tandem_barrier SET mark = $3, updated_ms = $4,
    resource = NULL, payload = NULL WHERE gtid = $1 AND branch_id = $2";
const IN_DOUBT: &str = "SELECT gtid, branch_id, resource, payload, updated_ms FROM tandem_barrier
    WHERE mark = 1 AND resource IS NOT NULL AND updated_ms < $1
      AND (gtid, branch_id) > ($3, $4)
    ORDER BY gtid, branch_id LIMIT $2";
/// One retention page: the next `limit` keys after `from`, of which the
/// finished and old are deleted (with their commit markers). The delete
/// re-checks each row as it stands, so a record rewritten meanwhile stays.
const PURGE: &str = "WITH page AS (
        SELECT gtid, branch_id FROM tandem_barrier
        WHERE (gtid, branch_id) > ($1, $2) ORDER BY gtid, branch_id LIMIT $3),
    gone AS (
        DELETE FROM tandem_barrier b USING page p
        WHERE b.gtid = p.gtid AND b.branch_id = p.branch_id AND b.mark <> 1 AND b.updated_ms < $4
        RETURNING b.gtid, b.branch_id),
    markers AS (
        DELETE FROM tandem_prepared_commits c USING gone g
        WHERE c.gtid = g.gtid AND c.branch_id = g.branch_id)
    SELECT (SELECT count(*) FROM page), (SELECT count(*) FROM gone), last.gtid, last.branch_id
    FROM (SELECT 1) one LEFT JOIN (
        SELECT gtid, branch_id FROM page ORDER BY gtid DESC, branch_id DESC LIMIT 1) last ON true";

/// A handler's transaction on one pooled connection, from
/// [`PgBarrier::begin`]. Run queries through it as through a
/// `tokio_postgres::Client` (it derefs to one), then
/// [`commit`](BranchTx::commit) or [`rollback`](BranchTx::rollback).
/// Dropping it rolls back.
pub struct BranchTx {
    conn: Option<Object>,
    key: BranchKey,
    /// Stored at commit, when this call leaves a record.
    mark: Option<Mark>,
}

impl BranchTx {
    /// Stores the call's barrier record and commits.
    ///
    /// # Errors
    ///
    /// The database failed; nothing of the transaction is applied, unless
    /// the connection broke during the commit itself (then the barrier
    /// record tells the next call which it was).
    pub async fn commit(mut self) -> Result<(), PgError> {
        if let Some(mark) = self.mark {
            let stmt = self.prepare_cached(UPDATE_MARK).await?;
            let params: [&(dyn ToSql + Sync); 4] = [
                &self.key.gtid,
                &(self.key.branch_id as i64),
                &(mark.code() as i16),
                &(now_ms() as i64),
            ];
            self.execute(&stmt, &params).await?;
        }
        self.finish("COMMIT").await
    }

    /// Rolls back everything done in the transaction.
    ///
    /// # Errors
    ///
    /// The connection failed (the server rolls back on its own then).
    pub async fn rollback(mut self) -> Result<(), PgError> {
        self.finish("ROLLBACK").await
    }

    /// Inserts the commit marker and ends with `PREPARE TRANSACTION`.
    pub(super) async fn prepare(mut self) -> Result<(), PgError> {
        let stmt = self
            .prepare_cached("INSERT INTO tandem_prepared_commits (gtid, branch_id) VALUES ($1, $2)")
            .await?;
        self.execute(&stmt, &[&self.key.gtid, &(self.key.branch_id as i64)])
            .await?;
        let gid = super::gid(self.key);
        self.finish(&format!("PREPARE TRANSACTION '{gid}'")).await
    }

    async fn finish(&mut self, sql: &str) -> Result<(), PgError> {
        let result = self.batch_execute(sql).await;
        // The transaction is over whatever the answer (a failed COMMIT
        // rolls back); the connection can go back to the pool.
        self.conn.take();
        Ok(result?)
    }
}

impl Deref for BranchTx {
    type Target = ClientWrapper;

    #[allow(clippy::expect_used)]
    fn deref(&self) -> &ClientWrapper {
        // `conn` is only taken by `finish`, which consumes the transaction.
        self.conn.as_ref().expect("transaction in progress")
    }
}

impl DerefMut for BranchTx {
    #[allow(clippy::expect_used)]
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        self.conn.as_mut().expect("transaction in progress")
    }
}

impl Drop for BranchTx {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Dropped mid-transaction (an early `?`). The connection leaves the
        // pool for good: should the rollback below never run (runtime
        // shutting down), closing it is what rolls back, and a pooled
        // connection can never carry a stale transaction into the next
        // call. The pool opens a new one when needed.
        let client = Object::take(conn);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.batch_execute("ROLLBACK").await;
            });
        }
    }
}

struct PgEntry {
    store: PgBarrier,
    key: BranchKey,
    record: Option<BarrierRecord>,
    _guard: KeyGuard,
}

impl PgEntry {
    async fn write(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), PgError> {
        let conn = self.store.pool().get().await?;
        let stmt = conn.prepare_cached(sql).await?;
        conn.execute(&stmt, params).await?;
        Ok(())
    }
}

impl BarrierEntry for PgEntry {
    fn record(&self) -> Option<BarrierRecord> {
        self.record
    }

    fn put(&mut self, mark: Mark, epoch: u64) -> BoxFuture<'_, Result<(), BarrierError>> {
        Box::pin(async move {
            let record = BarrierRecord {
                mark,
                updated_ms: now_ms(),
                epoch,
            };
            let (branch, code, ms, e) = (
                self.key.branch_id as i64,
                mark.code() as i16,
                record.updated_ms as i64,
                epoch.min(i64::MAX as u64) as i64,
            );
            self.write(PUT, &[&self.key.gtid, &branch, &code, &ms, &e])
                .await?;
            self.record = Some(record);
            Ok(())
        })
    }

    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        // Every write here (and the handler's, in `BranchTx`) is a
        // committed transaction: durable once it returned.
        Box::pin(async { Ok(()) })
    }

    fn put_tried<'a>(
        &'a mut self,
        resource: &'a str,
        payload: &'a [u8],
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        Box::pin(async move {
            let ms = now_ms();
            let branch = self.key.branch_id as i64;
            let e = epoch.min(i64::MAX as u64) as i64;
            self.write(
                PUT_TRIED,
                &[
                    &self.key.gtid,
                    &branch,
                    &(ms as i64),
                    &resource,
                    &payload,
                    &e,
                ],
            )
            .await?;
            self.record = Some(BarrierRecord {
                mark: Mark::Tried,
                updated_ms: ms,
                epoch,
            });
            Ok(())
        })
    }
}

fn decode_record(
    key: BranchKey,
    code: i16,
    ms: i64,
    epoch: i64,
) -> Result<BarrierRecord, BarrierError> {
    let mark = u8::try_from(code).ok().and_then(Mark::from_code);
    match mark {
        Some(mark) => Ok(BarrierRecord {
            mark,
            updated_ms: ms.max(0) as u64,
            epoch: epoch.max(0) as u64,
        }),
        None => Err(BarrierError(format!(
            "record of {} branch {} has unknown mark {code}",
            key.gtid, key.branch_id
        ))),
    }
}

impl BarrierStore for PgBarrier {
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>> {
        Box::pin(async move {
            let guard = self.locks().lock(key).await;
            let conn = self.pool().get().await.map_err(PgError::from)?;
            let stmt = conn
                .prepare_cached(SELECT_RECORD)
                .await
                .map_err(PgError::from)?;
            let row = conn
                .query_opt(&stmt, &[&key.gtid, &(key.branch_id as i64)])
                .await
                .map_err(PgError::from)?;
            let record = match row {
                None => None,
                Some(row) => Some(decode_record(key, row.get(0), row.get(1), row.get(2))?),
            };
            Ok(Box::new(PgEntry {
                store: self.clone(),
                key,
                record,
                _guard: guard,
            }) as Box<dyn BarrierEntry>)
        })
    }

    fn in_doubt(
        &self,
        before_ms: u64,
        after: Option<BranchKey>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InDoubt>, BarrierError>> {
        Box::pin(async move {
            let conn = self.pool().get().await.map_err(PgError::from)?;
            let (gtid, branch) = match after {
                Some(k) => (k.gtid, i64::from(k.branch_id)),
                None => (uuid::Uuid::nil(), -1),
            };
            let rows = conn
                .query(
                    IN_DOUBT,
                    &[
                        &(before_ms.min(i64::MAX as u64) as i64),
                        &(limit as i64),
                        &gtid,
                        &branch,
                    ],
                )
                .await
                .map_err(PgError::from)?;
            Ok(rows
                .into_iter()
                .filter_map(|row| {
                    let branch_id = u32::try_from(row.get::<_, i64>(1)).ok()?;
                    Some(InDoubt {
                        key: BranchKey {
                            gtid: row.get(0),
                            branch_id,
                        },
                        resource: row.get::<_, Option<String>>(2).unwrap_or_default(),
                        payload: row.get::<_, Option<Vec<u8>>>(3).unwrap_or_default().into(),
                        tried_ms: row.get::<_, i64>(4).max(0) as u64,
                    })
                })
                .collect())
        })
    }

    fn stored(&self) -> BoxFuture<'_, Result<usize, BarrierError>> {
        Box::pin(async move {
            let conn = self.pool().get().await.map_err(PgError::from)?;
            let row = conn
                .query_one("SELECT count(*) FROM tandem_barrier", &[])
                .await
                .map_err(PgError::from)?;
            Ok(row.get::<_, i64>(0).max(0) as usize)
        })
    }

    fn purge(
        &self,
        from: Option<BranchKey>,
        before_ms: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<PurgePage, BarrierError>> {
        Box::pin(async move {
            let limit = limit.max(1);
            let (gtid, branch) = match from {
                Some(k) => (k.gtid, k.branch_id as i64),
                None => (crate::Gtid::nil(), -1),
            };
            let conn = self.pool().get().await.map_err(PgError::from)?;
            let row = conn
                .query_one(
                    PURGE,
                    &[
                        &gtid,
                        &branch,
                        &(limit as i64),
                        &(before_ms.min(i64::MAX as u64) as i64),
                    ],
                )
                .await
                .map_err(PgError::from)?;
            let scanned = row.get::<_, i64>(0) as usize;
            let last = match (
                row.get::<_, Option<uuid::Uuid>>(2),
                row.get::<_, Option<i64>>(3),
            ) {
                (Some(gtid), Some(branch)) => u32::try_from(branch)
                    .ok()
                    .map(|branch_id| BranchKey { gtid, branch_id }),
                _ => None,
            };
            Ok(PurgePage {
                scanned,
                removed: row.get::<_, i64>(1) as usize,
                next: if scanned >= limit { last } else { None },
            })
        })
    }
}
