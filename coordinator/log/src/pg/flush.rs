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

    /// Writes `ops` in one database transaction, all or nothing; says which
    /// writes were refused (then nothing was written).
    ///
    /// A transaction's first write inserts its row; every later write
    /// updates the row only while this incarnation owns it at the epoch
    /// the record carries, and only if the decision stays. A later write
    /// that finds no row (retention removed it after another coordinator
    /// took the transaction over and finished it) is refused like one
    /// that finds another owner: it never creates the row again.
    pub(super) async fn write_batch(&self, ops: &BTreeMap<Gtid, Op>) -> Result<Refusals, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (mut first, mut later) = (Rows::default(), Rows::default());
        let (mut pay_g, mut pay_b, mut pay_p) = (vec![], vec![], vec![]);
        let mut removed = vec![];
        for (gtid, op) in ops {
            match op {
                Op::Remove => removed.push(*gtid),
                Op::Write(p) => {
                    if p.first { &mut first } else { &mut later }.push(&p.record);
                    for (branch, payload) in &p.payloads {
                        pay_g.push(*gtid);
                        pay_b.push(*branch as i32);
                        pay_p.push(payload.to_vec());
                    }
                }
            }
        }
        if !removed.is_empty() {
            // Only finished rows: whatever retention read, a row someone
            // still drives (or a gtid started again) is never removed.
            tx.execute(
                "WITH gone AS (
                     DELETE FROM tandem_txns WHERE gtid = ANY($1) AND state = ANY($2)
                     RETURNING gtid)
                 DELETE FROM tandem_payloads WHERE gtid IN (SELECT gtid FROM gone)",
                &[&removed, &finished_codes()],
            )
            .await?;
        }
        if !pay_g.is_empty() {
            tx.execute(
                "INSERT INTO tandem_payloads (gtid, branch, payload)
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::bytea[])
                 ON CONFLICT (gtid, branch) DO UPDATE SET payload = excluded.payload",
                &[&pay_g, &pay_b, &pay_p],
            )
            .await?;
        }
        let me = self.shared.incarnation;
        // The insert of first writes; a row already there is written only
        // when it is this incarnation's own at the same epoch (this batch
        // again, after a commit whose answer was lost). A gtid the
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

const INSERT_SQL: &str =
    "INSERT INTO tandem_txns AS t (gtid, state, decision, record, owner, epoch)
                     SELECT g, s, d, r, $5, e
                     FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::bytea[], $6::int8[],
                                 $7::int8[])
                         AS b(g, s, d, r, e, ms)
                     WHERE b.ms > (SELECT purged_ms FROM tandem_horizon FOR SHARE)
                     ON CONFLICT (gtid) DO UPDATE
                     SET state = excluded.state, decision = excluded.decision,
                         record = excluded.record, updated_at = now()
                     WHERE t.owner = excluded.owner AND t.epoch = excluded.epoch
                       AND (t.decision IS NULL OR t.decision = excluded.decision)
                     RETURNING gtid";

const UPDATE_SQL: &str = "UPDATE tandem_txns AS t
                     SET state = b.s, decision = b.d, record = b.r, updated_at = now()
                     FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::bytea[], $6::int8[])
                         AS b(g, s, d, r, e)
                     WHERE t.gtid = b.g AND t.owner = $5 AND t.epoch = b.e
                       AND (t.decision IS NULL OR t.decision = b.d)
                     RETURNING t.gtid";
