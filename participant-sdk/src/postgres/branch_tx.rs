//! [`BranchTx`]: a handler's transaction, on the connection that holds its
//! branch's lock, committing the call's barrier record with the change.

use std::ops::{Deref, DerefMut};

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;

use super::PgError;
use super::branch_lock::Lease;
use crate::barrier::{BranchKey, Mark, now_ms};

/// A handler's transaction on one connection, from
/// [`PgBarrier::begin`](super::PgBarrier::begin). Run queries through it
/// as through a `tokio_postgres::Client` (it derefs to one), then
/// [`commit`](BranchTx::commit) or [`rollback`](BranchTx::rollback).
/// Dropping it rolls back.
pub struct BranchTx {
    lease: Option<Lease>,
    key: BranchKey,
    /// Stored at commit, when this call leaves a record.
    mark: Option<Mark>,
    /// The call's coordinator epoch, stored with the mark.
    epoch: u64,
}

/// Writes the done mark of a call; only over `Tried` (checked at begin,
/// under the branch's locks), raising the epoch seen.
const DONE_MARK: &str = "UPDATE tandem_barrier SET mark = $3, updated_ms = $4,
    epoch = GREATEST(epoch, $5), resource = NULL, payload = NULL
    WHERE gtid = $1 AND branch_id = $2 AND mark = 1
    RETURNING epoch";

impl BranchTx {
    pub(super) fn new(lease: Lease, key: BranchKey, mark: Option<Mark>, epoch: u64) -> BranchTx {
        BranchTx {
            lease: Some(lease),
            key,
            mark,
            epoch,
        }
    }

    /// Stores the call's barrier record and commits.
    ///
    /// # Errors
    ///
    /// The database failed; nothing of the transaction is applied, unless
    /// the connection broke during the commit itself (then the barrier
    /// record tells the next call which it was).
    pub async fn commit(mut self) -> Result<(), PgError> {
        let mut written = None;
        if let Some(mark) = self.mark {
            let stmt = self.prepare_cached(DONE_MARK).await?;
            let epoch = self.epoch.min(i64::MAX as u64) as i64;
            let params: [&(dyn ToSql + Sync); 5] = [
                &self.key.gtid,
                &(self.key.branch_id as i64),
                &(mark.code() as i16),
                &(now_ms() as i64),
                &epoch,
            ];
            let row = self.query_opt(&stmt, &params).await?;
            let Some(row) = row else {
                return Err(PgError(format!(
                    "barrier: branch {} of {} is no longer Tried; not committing",
                    self.key.branch_id, self.key.gtid
                )));
            };
            written = Some((mark, row.get::<_, i64>(0).max(0) as u64));
        }
        let home = self.lease.as_ref().and_then(|l| l.home().cloned());
        self.finish("COMMIT").await?;
        // The entry learns the record is written: nothing left to store.
        if let (Some(home), Some((mark, epoch))) = (home, written) {
            home.set_written(mark, epoch);
        }
        Ok(())
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
        // rolls back); the connection goes back where it came from.
        self.lease.take();
        Ok(result?)
    }
}

impl Deref for BranchTx {
    type Target = ClientWrapper;

    #[allow(clippy::expect_used)]
    fn deref(&self) -> &ClientWrapper {
        // `lease` is only taken by `finish`, which consumes the transaction.
        self.lease.as_ref().expect("transaction in progress")
    }
}

impl DerefMut for BranchTx {
    #[allow(clippy::expect_used)]
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        self.lease.as_mut().expect("transaction in progress")
    }
}

impl Drop for BranchTx {
    fn drop(&mut self) {
        // Dropped mid-transaction (an early `?`): the connection is rolled
        // back before anyone uses it again.
        if let Some(lease) = self.lease.take() {
            lease.abandon();
        }
    }
}
