//! [`PgBarrier`]: barrier records in the participant's PostgreSQL database,
//! locked per branch across every process sharing it, and
//! [`PgBarrier::begin`], a handler's transaction that commits its barrier
//! record with the business change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;

use super::branch_lock::{Held, Lease, lock_and_read};
use super::{BranchTx, PgError, migrate};
use crate::barrier::locks::{KeyGuard, KeyLocks};
use crate::barrier::{
    BarrierEntry, BarrierError, BarrierRecord, BarrierStore, BoxFuture, BranchKey, InDoubt, Mark,
    PurgePage, changed,
};
use crate::handler::{BranchContext, HandlerError};

/// Barrier records in a PostgreSQL table (`tandem_barrier`), next to the
/// handler's own tables, so that a handler can commit its change and the
/// record in one transaction with [`PgBarrier::begin`].
///
/// Every record write is a committed transaction, durable when the server
/// runs with `synchronous_commit = on` (its default). Calls for one branch
/// are serialised across every process sharing the database (replicas of
/// one participant service behind a load balancer): entering a branch
/// takes a session-level advisory lock keyed on it, on the connection the
/// call then uses for everything (its records, the handler's
/// [`BranchTx`], the 2PC finish), held until the call is over. A record is
/// written only over the mark the call read under that lock (the barrier's
/// table decides the next one), never blindly: a write that finds another
/// mark fails instead of overwriting another call's outcome.
///
/// The connections must be real sessions (no pooler in transaction mode
/// between the participant and PostgreSQL).
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
    /// In-process first: one call per branch asks PostgreSQL for its lock.
    locks: KeyLocks,
    /// The connection each entered branch holds its lock on, for the
    /// handler's transaction to run on.
    held: Mutex<HashMap<BranchKey, Arc<Held>>>,
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
                held: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The pool, for the handler's own queries.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Opens a transaction for this call's business SQL. Its
    /// [`commit`](BranchTx::commit) also stores the call's barrier record
    /// (`Confirmed` for a confirm / commit or a message's delivery,
    /// `Cancelled` for a cancel / rollback), so both happen or neither
    /// does: a delivery written so takes its message exactly once.
    ///
    /// Use it in a handler served with this store as the server's
    /// [`barrier`](crate::ParticipantServer::barrier): the transaction then
    /// runs on the connection holding the branch's lock, so no other
    /// replica acts on the branch until the call is over. It also locks
    /// the branch's barrier row until the transaction ends. One at a time
    /// per call: a second `begin` before the first ended is an error.
    ///
    /// # Errors
    ///
    /// The database cannot be reached, or the branch's record is not the
    /// `Tried` the server stored before calling the handler (another
    /// process finished the branch, or the server uses another store).
    pub async fn begin(&self, ctx: &BranchContext) -> Result<BranchTx, HandlerError> {
        Ok(self.open_tx(ctx, true).await?)
    }

    /// A connection for `key`'s statements: the one holding its lock when
    /// this process has entered the branch, else a pooled one.
    pub(super) async fn lease(&self, key: BranchKey) -> Result<Lease, PgError> {
        let held = self.held().get(&key).cloned();
        match held {
            Some(held) => Lease::held(&held).await,
            None => Ok(Lease::pooled(self.inner.pool.get().await?)),
        }
    }

    /// A transaction for `ctx`; `lock` takes the barrier row for update
    /// (not for 2PC prepare: `PREPARE TRANSACTION` would hand the row lock
    /// to the prepared transaction, and phase 2 rewrites that row).
    pub(super) async fn open_tx(
        &self,
        ctx: &BranchContext,
        lock: bool,
    ) -> Result<BranchTx, PgError> {
        let key = ctx.key();
        let lease = self.lease(key).await?;
        let tx = BranchTx::new(lease, key, ctx.phase.done_mark(), ctx.epoch);
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

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<BranchKey, Arc<Held>>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const SELECT_MARK: &str = "SELECT mark FROM tandem_barrier WHERE gtid = $1 AND branch_id = $2";
const SELECT_FOR_UPDATE: &str =
    "SELECT mark FROM tandem_barrier WHERE gtid = $1 AND branch_id = $2 FOR UPDATE";
/// A branch's first record; nothing if it has one already.
const INSERT: &str =
    "INSERT INTO tandem_barrier (gtid, branch_id, mark, updated_ms, epoch, resource, payload)
    VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (gtid, branch_id) DO NOTHING";
/// A record's next mark, only over the mark it was decided on (`$8`).
/// Resource and payload are kept while `Tried` (given anew by `$6`, `$7`
/// when not null), dropped after.
const ADVANCE: &str = "UPDATE tandem_barrier SET mark = $3::smallint, updated_ms = $4,
        epoch = GREATEST(epoch, $5),
        resource = CASE WHEN $3::smallint = 1 THEN COALESCE($6, resource) END,
        payload = CASE WHEN $3::smallint = 1 THEN COALESCE($7, payload) END
    WHERE gtid = $1 AND branch_id = $2 AND mark = $8";
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

struct PgEntry {
    store: PgBarrier,
    key: BranchKey,
    record: Option<BarrierRecord>,
    held: Arc<Held>,
    _guard: KeyGuard,
}

impl PgEntry {
    /// One statement on the connection holding the branch's lock: the
    /// first record (`INSERT … ON CONFLICT DO NOTHING`) or the next one
    /// over `from` (`UPDATE … WHERE mark = from`); anything but one row
    /// written is a record that changed meanwhile, not overwritten.
    async fn write(
        &mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&str, &[u8])>,
    ) -> Result<(), BarrierError> {
        let (resource, payload) = match tried {
            Some((r, p)) => (Some(r), Some(p)),
            None => (None, None),
        };
        let lease = self.store.lease(self.key).await?;
        let (gtid, branch, code, at, e) = (
            self.key.gtid,
            self.key.branch_id as i64,
            to.mark.code() as i16,
            to.updated_ms.min(i64::MAX as u64) as i64,
            to.epoch.min(i64::MAX as u64) as i64,
        );
        let written = match from {
            None => {
                let stmt = lease.prepare_cached(INSERT).await.map_err(PgError::from)?;
                let params: [&(dyn ToSql + Sync); 7] =
                    [&gtid, &branch, &code, &at, &e, &resource, &payload];
                lease.execute(&stmt, &params).await
            }
            Some(old) => {
                let stmt = lease.prepare_cached(ADVANCE).await.map_err(PgError::from)?;
                let was = old.code() as i16;
                let params: [&(dyn ToSql + Sync); 8] =
                    [&gtid, &branch, &code, &at, &e, &resource, &payload, &was];
                lease.execute(&stmt, &params).await
            }
        }
        .map_err(PgError::from)?;
        if written != 1 {
            return Err(changed(self.key, from));
        }
        self.record = Some(to);
        Ok(())
    }
}

impl Drop for PgEntry {
    fn drop(&mut self) {
        // The call is over: the handler's transaction can no longer find
        // the held connection, and once the last lease of it is back the
        // branch is unlocked.
        let mut held = self.store.held();
        if held
            .get(&self.key)
            .is_some_and(|h| Arc::ptr_eq(h, &self.held))
        {
            held.remove(&self.key);
        }
    }
}

impl BarrierEntry for PgEntry {
    fn record(&self) -> Option<BarrierRecord> {
        self.record
    }

    fn compare_and_set<'a>(
        &'a mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&'a str, &'a [u8])>,
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        Box::pin(self.write(from, to, tried))
    }

    fn reread(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        // The handler's `BranchTx` told the held connection what it
        // committed: no round trip.
        if let Some((mark, epoch)) = self.held.take_written() {
            let updated_ms = self.record.map_or(0, |r| r.updated_ms);
            self.record = Some(BarrierRecord {
                mark,
                updated_ms,
                epoch,
            });
        }
        Box::pin(async { Ok(()) })
    }

    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        // Every write here (and the handler's, in `BranchTx`) is a
        // committed transaction: durable once it returned.
        Box::pin(async { Ok(()) })
    }
}

impl BarrierStore for PgBarrier {
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>> {
        Box::pin(async move {
            let guard = self.locks().lock(key).await;
            let conn = self.pool().get().await.map_err(PgError::from)?;
            let (held, record) = lock_and_read(conn, key).await?;
            let held = Arc::new(held);
            self.held().insert(key, held.clone());
            Ok(Box::new(PgEntry {
                store: self.clone(),
                key,
                record,
                held,
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
