//! The flusher of [`super::PgLog`]: group commit of buffered writes, each
//! conditional on this incarnation still owning the row at the epoch it
//! read (so an owner that lost a row and claimed it back cannot write from
//! its stale copy) and on the decision never changing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Op;
use tandem_common::postgres::tokio_postgres;

use super::io::{Fail, Store};
use super::schema::code;
use crate::model::Gtid;
use crate::{LogError, codec};

/// How long a plain write may wait for company before it is flushed.
const LINGER: Duration = Duration::from_millis(20);

/// Writes of a batch the store refused.
#[derive(Default)]
pub(super) struct Refusals {
    /// Rows another incarnation owns now, or decisions that would change.
    taken_over: Vec<Gtid>,
    /// New transactions another coordinator started first.
    started_elsewhere: HashSet<Gtid>,
}

impl Store {
    /// Writes `ops`; a new transaction another coordinator started first is
    /// refused on its own (remembered, so its coordinator forgets it) and
    /// the rest written again. Returns the rows taken over, if any (then
    /// nothing was written).
    async fn write_all(&self, ops: &BTreeMap<Gtid, Op>) -> Result<Vec<Gtid>, LogError> {
        let mut ops = std::borrow::Cow::Borrowed(ops);
        loop {
            let refusals = self
                .retry("write the log", || self.write_batch(&ops))
                .await?;
            if !refusals.taken_over.is_empty() || refusals.started_elsewhere.is_empty() {
                return Ok(refusals.taken_over);
            }
            let mut buf = self.shared.buffer();
            for gtid in &refusals.started_elsewhere {
                tracing::warn!(%gtid, "another coordinator started this transaction first; it is theirs");
                buf.refuse(*gtid);
            }
            drop(buf);
            let rest: BTreeMap<Gtid, Op> = ops
                .iter()
                .filter(|(g, _)| !refusals.started_elsewhere.contains(g))
                .map(|(g, op)| (*g, op.clone()))
                .collect();
            if rest.is_empty() {
                return Ok(Vec::new());
            }
            ops = std::borrow::Cow::Owned(rest);
        }
    }

    /// Flushes the buffer whenever a force waits, or [`LINGER`] after a
    /// plain write, until the log stops or latches.
    pub(super) async fn flush_loop(self: Arc<Self>) {
        loop {
            if !self.work().await {
                return;
            }
            let (ops, waiters) = {
                let mut buf = self.shared.buffer();
                let ops = std::mem::take(&mut buf.pending);
                buf.inflight = ops.clone();
                (ops, std::mem::take(&mut buf.waiters))
            };
            if self.shared.halted.get().is_some() {
                return; // the latch answered every waiter
            }
            let result = if ops.is_empty() {
                Ok(())
            } else {
                match self.write_all(&ops).await {
                    Ok(fenced) if fenced.is_empty() => Ok(()),
                    Ok(fenced) => Err(LogError::Fenced(format!(
                        "{} transaction(s) (first {}) were taken over by another coordinator \
                         while this one was paused or cut off from the store past its lease; \
                         this coordinator stops deciding: restart it",
                        fenced.len(),
                        fenced.first().map(|g| g.to_string()).unwrap_or_default()
                    ))),
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok(()) => {
                    if !ops.is_empty() {
                        self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.shared.buffer().inflight.clear();
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "transaction log on PostgreSQL failed");
                    let e = self.shared.latch(e);
                    for w in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
    }

    /// Waits until there is something to flush: a force waiting, or a
    /// plain write that has lingered. False when the log is closing with
    /// nothing left, or latched.
    pub(super) async fn work(&self) -> bool {
        loop {
            if self.shared.halted.get().is_some() {
                return false;
            }
            let (waiting, pending) = {
                let buf = self.shared.buffer();
                (!buf.waiters.is_empty(), !buf.pending.is_empty())
            };
            if waiting {
                return true;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return pending;
            }
            if !pending {
                self.shared.wake.notified().await;
                continue;
            }
            // A plain write waits for company, unless a force comes.
            let until = tokio::time::Instant::now() + LINGER;
            loop {
                if tokio::time::timeout_at(until, self.shared.wake.notified())
                    .await
                    .is_err()
                    || !self.shared.buffer().waiters.is_empty()
                    || self.stopping.load(Ordering::SeqCst)
                {
                    return true;
                }
            }
        }
    }

    /// Writes `ops` all or nothing; says which writes were refused (then
    /// nothing was written).
    ///
    /// A transaction's first write inserts its row; every later write
    /// updates the row only while this incarnation owns it at the epoch
    /// the record carries, and only if the decision stays. A later write
    /// that finds no row (retention removed it after another coordinator
    /// took the transaction over and finished it) is refused like one
    /// that finds another owner: it never creates the row again.
    ///
    /// The common case, nothing refused, is two round trips: `BEGIN` with
    /// one statement ([`BATCH_SQL`]), then `COMMIT`. When any write is
    /// refused that statement fails as a whole (division by zero, on
    /// purpose), is rolled back, and the batch is written again statement
    /// by statement in a transaction that finds out which writes were
    /// refused, and rolls back.
    pub(super) async fn write_batch(&self, ops: &BTreeMap<Gtid, Op>) -> Result<Refusals, Fail> {
        let batch = Batch::of(ops);
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(BATCH_SQL).await?;
        let me = self.shared.incarnation;
        let (first, later) = (&batch.first, &batch.later);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 17] = [
            &batch.removed,
            &finished_codes(),
            &batch.pay_g,
            &batch.pay_b,
            &batch.pay_p,
            &me,
            &first.gtids,
            &first.states,
            &first.decisions,
            &first.records,
            &first.epochs,
            &first.gtid_ms,
            &later.gtids,
            &later.states,
            &later.decisions,
            &later.records,
            &later.epochs,
        ];
        // BEGIN and the statement go out together (tokio-postgres sends
        // requests in the order they are first polled, and pipelines
        // them), COMMIT once the statement's answer is in: a connection
        // lost before that answer leaves an open transaction the server
        // rolls back, so a statement still running when its batch is
        // retried can never commit after the retry (as a statement in its
        // own implicit transaction could: it commits when it ends, whoever
        // still listens). A future dropped in between (the store timeout)
        // leaves the connection in its transaction: the guard takes it out
        // of the pool.
        let open = OpenTransaction(Some(client));
        let c = open.client();
        let (begun, ran) = futures::join!(c.batch_execute("BEGIN"), c.execute(&statement, &params));
        begun?;
        match ran {
            Ok(_) => {
                c.batch_execute("COMMIT").await?;
                open.close();
                Ok(Refusals::default())
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO) => {
                c.batch_execute("ROLLBACK").await?;
                open.close();
                self.write_explaining(&batch).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`Store::write_batch`] in an explicit transaction, statement by
    /// statement: which writes are refused, and nothing written then.
    async fn write_explaining(&self, batch: &Batch) -> Result<Refusals, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let Batch {
            first,
            later,
            pay_g,
            pay_b,
            pay_p,
            removed,
        } = batch;
        if !removed.is_empty() {
            // Only finished rows: whatever retention read, a row someone
            // still drives (or a gtid started again) is never removed.
            tx.execute(
                "WITH gone AS (
                     DELETE FROM tandem_txns WHERE gtid = ANY($1) AND state = ANY($2)
                     RETURNING gtid)
                 DELETE FROM tandem_payloads WHERE gtid IN (SELECT gtid FROM gone)",
                &[removed, &finished_codes()],
            )
            .await?;
        }
        if !pay_g.is_empty() {
            tx.execute(
                "INSERT INTO tandem_payloads (gtid, branch, payload)
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::bytea[])
                 ON CONFLICT (gtid, branch) DO UPDATE SET payload = excluded.payload",
                &[pay_g, pay_b, pay_p],
            )
            .await?;
        }
        let me = self.shared.incarnation;
        // The insert of first writes; a row already there is written only
        // when it is this incarnation's own at the same epoch (this batch
        // again, after a commit whose answer was lost), or a presumed abort
        // (owner nil: `presume.rs`) that this write's abort replaces. A gtid the
        // retention horizon covers is never written by a first write: its
        // row may be one retention removed, and this write one a process
        // paused past retention still held (DESIGN.md, "What retention may
        // forget"). The horizon is read `FOR SHARE`: a purge under way (its
        // horizon raised and the row deleted, not yet committed) is waited
        // for and its horizon read, where the statement's snapshot would
        // read the old one and insert the row again.
        let insert = tx.prepare_cached(INSERT_SQL);
        // Later writes: an update conditioned on owner, epoch and the
        // decision; it never creates a row.
        let update = tx.prepare_cached(UPDATE_SQL);
        let (insert, update) = futures::try_join!(insert, update)?;
        let first_params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &first.gtids,
            &first.states,
            &first.decisions,
            &first.records,
            &me,
            &first.epochs,
            &first.gtid_ms,
        ];
        let later_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &later.gtids,
            &later.states,
            &later.decisions,
            &later.records,
            &me,
            &later.epochs,
        ];
        // Both statements go out at once (tokio-postgres pipelines
        // concurrent queries on one connection): one round trip when a
        // batch holds both kinds, as a flush at low load does (a new
        // transaction's start beside the last write of the one before).
        let insert_first = async {
            if first.gtids.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&insert, &first_params).await
        };
        let update_later = async {
            if later.gtids.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&update, &later_params).await
        };
        let (written_first, written_later) = futures::try_join!(insert_first, update_later)?;
        let refused_first = first.refused(written_first);
        let mut taken_over = later.refused(written_later);
        if refused_first.is_empty() && taken_over.is_empty() {
            // Refused a moment ago, written now (the row changed between
            // the two): as good as the one statement.
            tx.commit().await?;
            return Ok(Refusals::default());
        }
        // A first write that found a row at epoch 1 owned by another
        // incarnation: another coordinator started the same gtid first.
        // Any other refusal is a row taken over (or gone since), or a
        // decision that would change.
        let started_elsewhere: HashSet<Gtid> = if refused_first.is_empty() {
            HashSet::new()
        } else {
            tx.query(
                "SELECT gtid FROM tandem_txns WHERE gtid = ANY($1) AND epoch = 1 AND owner <> $2",
                &[&refused_first, &me],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect()
        };
        taken_over.extend(
            refused_first
                .into_iter()
                .filter(|g| !started_elsewhere.contains(g)),
        );
        // Nothing of this batch lands (the transaction is dropped
        // uncommitted); the caller writes it again without the refused.
        Ok(Refusals {
            taken_over,
            started_elsewhere,
        })
    }
}

/// A pooled connection inside a transaction [`Store::write_batch`] began
/// by hand: unless [`OpenTransaction::close`]d (committed or rolled back),
/// dropping it takes the connection out of the pool and closes it, which
/// rolls the transaction back, rather than hand the next user a
/// connection in the middle of one.
struct OpenTransaction(Option<tandem_common::postgres::deadpool_postgres::Object>);

impl OpenTransaction {
    fn client(&self) -> &tokio_postgres::Client {
        self.0.as_ref().expect("open until closed")
    }

    /// The transaction ended: the connection goes back to the pool.
    fn close(mut self) {
        drop(self.0.take());
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(tandem_common::postgres::deadpool_postgres::Object::take(
                object,
            ));
        }
    }
}

/// One flush's writes, by kind.
#[derive(Default)]
struct Batch {
    /// First writes (inserts).
    first: Rows,
    /// Later writes (conditional updates).
    later: Rows,
    /// Payloads: gtid, branch, bytes.
    pay_g: Vec<Gtid>,
    pay_b: Vec<i32>,
    pay_p: Vec<Vec<u8>>,
    /// Finished transactions retention removes.
    removed: Vec<Gtid>,
}

impl Batch {
    fn of(ops: &BTreeMap<Gtid, Op>) -> Batch {
        let mut b = Batch::default();
        for (gtid, op) in ops {
            match op {
                Op::Remove => b.removed.push(*gtid),
                Op::Write(p) => {
                    if p.first { &mut b.first } else { &mut b.later }.push(&p.record);
                    for (branch, payload) in &p.payloads {
                        b.pay_g.push(*gtid);
                        b.pay_b.push(*branch as i32);
                        b.pay_p.push(payload.to_vec());
                    }
                }
            }
        }
        b
    }
}

/// The columns of the records one statement writes.
#[derive(Default)]
struct Rows {
    gtids: Vec<Gtid>,
    states: Vec<i16>,
    decisions: Vec<Option<i16>>,
    records: Vec<Vec<u8>>,
    epochs: Vec<i64>,
    /// Each gtid's time (`i64::MAX` for one that is not a UUID v7: the
    /// horizon never covers it).
    gtid_ms: Vec<i64>,
}

impl Rows {
    fn push(&mut self, record: &crate::model::TxnRecord) {
        self.gtids.push(record.gtid);
        self.states.push(code(record.state));
        self.decisions.push(record.decision.map(|d| match d {
            crate::model::Decision::Commit => 1i16,
            crate::model::Decision::Abort => 2i16,
        }));
        self.records.push(codec::encode(record));
        self.epochs.push(record.epoch.min(i64::MAX as u64) as i64);
        self.gtid_ms.push(
            crate::gtid_ms(&record.gtid).map_or(i64::MAX, |ms| ms.min(i64::MAX as u64) as i64),
        );
    }

    /// The gtids of these rows the statement did not write.
    fn refused(&self, written: Vec<tokio_postgres::Row>) -> Vec<Gtid> {
        let written: HashSet<Gtid> = written.into_iter().map(|r| r.get(0)).collect();
        self.gtids
            .iter()
            .filter(|g| !written.contains(g))
            .copied()
            .collect()
    }
}

/// Finished states as stored codes: the only rows retention removes.
fn finished_codes() -> Vec<i16> {
    [
        crate::model::TxState::Committed,
        crate::model::TxState::Aborted,
    ]
    .iter()
    .map(|s| code(*s))
    .collect()
}

/// A first write meeting a row: written only over this incarnation's own
/// at the same epoch with the decision kept (the same batch again after a
/// lost answer), or over a presumed abort (owner nil) when it decides
/// abort too (`presume.rs`). One text for [`INSERT_SQL`] and [`BATCH_SQL`].
macro_rules! first_write_conflict {
    () => {
        "ON CONFLICT (gtid) DO UPDATE
         SET state = excluded.state, decision = excluded.decision,
             record = excluded.record, owner = excluded.owner, updated_at = now()
         WHERE (t.owner = excluded.owner AND t.epoch = excluded.epoch
                AND (t.decision IS NULL OR t.decision = excluded.decision))
            OR (t.owner = '00000000-0000-0000-0000-000000000000' AND t.epoch = 1
                AND excluded.decision = 2)"
    };
}

/// A later write's row condition: this incarnation's own at the record's
/// epoch, the decision kept. One text for [`UPDATE_SQL`] and [`BATCH_SQL`].
macro_rules! later_write_condition {
    () => {
        "AND t.epoch = b.e AND (t.decision IS NULL OR t.decision = b.d)"
    };
}

const INSERT_SQL: &str = concat!(
    "INSERT INTO tandem_txns AS t (gtid, state, decision, record, owner, epoch)
                     SELECT g, s, d, r, $5, e
                     FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::bytea[], $6::int8[],
                                 $7::int8[])
                         AS b(g, s, d, r, e, ms)
                     WHERE b.ms > (SELECT purged_ms FROM tandem_horizon FOR SHARE)
                     ",
    first_write_conflict!(),
    " RETURNING gtid"
);

const UPDATE_SQL: &str = concat!(
    "UPDATE tandem_txns AS t
                     SET state = b.s, decision = b.d, record = b.r, updated_at = now()
                     FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::bytea[], $6::int8[])
                         AS b(g, s, d, r, e)
                     WHERE t.gtid = b.g AND t.owner = $5 ",
    later_write_condition!(),
    " RETURNING t.gtid"
);

/// One flush in one statement, the common case: retention's removals (of
/// finished rows only), payloads, first writes ([`INSERT_SQL`]'s rules) and
/// later writes ([`UPDATE_SQL`]'s). When a first or later write is refused
/// (fewer rows written than given), the final division is by zero: the
/// statement fails, its transaction is rolled back, and the caller finds
/// out which in an explicit transaction.
/// The divisor comes from the data, so the planner cannot fold it away.
const BATCH_SQL: &str = concat!(
    "WITH gone AS (
         DELETE FROM tandem_txns WHERE gtid = ANY($1) AND state = ANY($2)
         RETURNING gtid),
     gone_payloads AS (
         DELETE FROM tandem_payloads WHERE gtid IN (SELECT gtid FROM gone)),
     payloads AS (
         INSERT INTO tandem_payloads (gtid, branch, payload)
         SELECT * FROM unnest($3::uuid[], $4::int4[], $5::bytea[])
         ON CONFLICT (gtid, branch) DO UPDATE SET payload = excluded.payload),
     created AS (
         INSERT INTO tandem_txns AS t (gtid, state, decision, record, owner, epoch)
         SELECT g, s, d, r, $6, e
         FROM unnest($7::uuid[], $8::int2[], $9::int2[], $10::bytea[], $11::int8[],
                     $12::int8[])
             AS b(g, s, d, r, e, ms)
         WHERE b.ms > (SELECT purged_ms FROM tandem_horizon FOR SHARE) ",
    first_write_conflict!(),
    " RETURNING 1),
     updated AS (
         UPDATE tandem_txns AS t
         SET state = b.s, decision = b.d, record = b.r, updated_at = now()
         FROM unnest($13::uuid[], $14::int2[], $15::int2[], $16::bytea[], $17::int8[])
             AS b(g, s, d, r, e)
         WHERE t.gtid = b.g AND t.owner = $6 ",
    later_write_condition!(),
    " RETURNING 1)
     SELECT 1 / ((SELECT count(*) FROM created) = cardinality($7::uuid[])
                 AND (SELECT count(*) FROM updated) = cardinality($13::uuid[]))::int"
);
