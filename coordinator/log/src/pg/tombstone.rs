//! Retention on the shared store: [`TxnLog::purge`], decision tombstones
//! and the horizon of [`super::PgLog`] (tables `tandem_decisions` and
//! `tandem_horizon`, migration 3).
//!
//! A purge is one PostgreSQL transaction: tombstones in, the horizon
//! raised, the finished rows deleted. Every instance reads the same
//! tables, so a tombstone one instance keeps answers `GetOutcome` at every
//! other, and the horizon one raises refuses a repeated gtid at all of
//! them; the horizon is in gtid times, so no instance's clock enters it.
//! These calls go straight to the store (not through the write buffer):
//! each is durable when it returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tandem_common::postgres::tokio_postgres;

use super::io::{Fail, Store};
use super::schema::code;
use super::{Op, PgLog, wait};
use crate::model::{Gtid, TxState};
use crate::tombstone::{self, decision_code, mode_code, purged_horizon};
use crate::{Horizon, LogError, Lookup, Purge, Tombstone, TxnLog};

impl PgLog {
    /// Runs `op` on the I/O thread, retried like every store call, and
    /// waits for its answer.
    pub(super) fn on_store<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: Fn(Arc<Store>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T, Fail>> + Send + 'static,
    {
        self.shared.check()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io.call(Box::new(move |store: Arc<Store>| {
            Box::pin(async move {
                let r = store.retry(what, || op(store.clone())).await;
                let _ = tx.send(r);
            })
        }));
        wait(rx)
    }

    pub(super) fn purge_rows(&self, purges: &[Purge]) -> Result<(), LogError> {
        self.shared.check()?;
        let purges = purges.to_vec();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.io.call(Box::new(move |store: Arc<Store>| {
            Box::pin(async move {
                // What was written before is in the store first, so the
                // purge sees (and removes) the records as they are.
                let r = match store.flushed().await {
                    Ok(()) => {
                        store
                            .retry("remove finished transactions", || store.purge(&purges))
                            .await
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send(r);
            })
        }));
        // A failed write latches, as every failed write of the log does.
        wait(rx).map_err(|e| self.shared.latch(e))
    }

    pub(super) fn read_tombstone(&self, gtid: Gtid) -> Result<Option<Tombstone>, LogError> {
        self.on_store("read a decision tombstone", move |store| async move {
            store.tombstone(gtid).await
        })?
    }

    pub(super) fn read_horizon(&self) -> Result<Horizon, LogError> {
        let h = self.on_store("read the retention horizon", |store| async move {
            store.horizon().await
        })?;
        self.shared
            .purged_seen
            .fetch_max(h.purged_ms, Ordering::SeqCst);
        Ok(h)
    }

    pub(super) fn read_store_clock(&self) -> Result<u64, LogError> {
        self.on_store("read the store's clock", |store| async move {
            store.now_ms().await
        })
    }

    pub(super) fn expire(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        let r = self.on_store("expire decision tombstones", move |store| async move {
            store.expire(finished_before_ms, limit).await
        });
        r.map_err(|e| self.shared.latch(e))
    }

    /// [`TxnLog::lookup`] in one read: the batched record read also reads
    /// the horizon, in the same statement (`read.rs`), so a record
    /// removed before it was read is always covered by what it saw.
    pub(super) fn lookup_one(&self, gtid: &Gtid) -> Result<Lookup, LogError> {
        self.shared.check()?;
        let buffered = {
            let buf = self.shared.buffer();
            buf.pending
                .get(gtid)
                .or_else(|| buf.inflight.get(gtid))
                .cloned()
        };
        match buffered {
            Some(Op::Write(p)) => return Ok(Lookup::Record(Box::new(p.record.clone()))),
            // Being removed: read the horizon from the store itself.
            Some(Op::Remove) => {
                return Ok(if self.read_horizon()?.may_have_purged(gtid) {
                    Lookup::Purged
                } else {
                    Lookup::Unknown
                });
            }
            None => {}
        }
        if let Some(rec) = self.get(gtid)? {
            return Ok(Lookup::Record(Box::new(rec)));
        }
        let seen = Horizon {
            purged_ms: self.shared.purged_seen.load(Ordering::SeqCst),
            forgotten_ms: 0,
        };
        Ok(if seen.may_have_purged(gtid) {
            Lookup::Purged
        } else {
            Lookup::Unknown
        })
    }
}

impl Store {
    /// One purge, in one transaction (see the module docs). Repeating it
    /// is harmless: a retry after a lost commit finds it done.
    async fn purge(&self, purges: &[Purge]) -> Result<(), Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let kept: Vec<&Tombstone> = purges.iter().filter_map(|p| p.tombstone.as_ref()).collect();
        if !kept.is_empty() {
            let col = |f: fn(&Tombstone) -> i64| kept.iter().map(|t| f(t)).collect::<Vec<i64>>();
            let gtids: Vec<Gtid> = kept.iter().map(|t| t.gtid).collect();
            let decisions: Vec<i16> = kept.iter().map(|t| decision_code(t.decision)).collect();
            let modes: Vec<i16> = kept.iter().map(|t| mode_code(t.mode)).collect();
            let created = col(|t| t.created_ms.min(i64::MAX as u64) as i64);
            let finished = col(|t| t.finished_ms.min(i64::MAX as u64) as i64);
            let branches: Vec<i32> = kept.iter().map(|t| t.branches as i32).collect();
            let resolved: Vec<i32> = kept.iter().map(|t| t.resolved as i32).collect();
            tx.execute(
                "INSERT INTO tandem_decisions
                     (gtid, decision, mode, created_ms, finished_ms, branches, resolved)
                 SELECT * FROM unnest($1::uuid[], $2::int2[], $3::int2[], $4::int8[],
                                      $5::int8[], $6::int4[], $7::int4[])
                 ON CONFLICT (gtid) DO NOTHING",
                &[
                    &gtids, &decisions, &modes, &created, &finished, &branches, &resolved,
                ],
            )
            .await?;
        }
        let raise = purged_horizon(purges).purged_ms.min(i64::MAX as u64) as i64;
        tx.execute(
            "UPDATE tandem_horizon SET purged_ms = GREATEST(purged_ms, $1)",
            &[&raise],
        )
        .await?;
        let gtids: Vec<Gtid> = purges.iter().map(|p| p.gtid).collect();
        let finished = vec![code(TxState::Committed), code(TxState::Aborted)];
        let removed: Vec<Gtid> = tx
            .query(
                "DELETE FROM tandem_txns WHERE gtid = ANY($1) AND state = ANY($2) RETURNING gtid",
                &[&gtids, &finished],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        if !removed.is_empty() {
            tx.execute(
                "DELETE FROM tandem_payloads WHERE gtid = ANY($1)",
                &[&removed],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn tombstone(&self, gtid: Gtid) -> Result<Result<Option<Tombstone>, LogError>, Fail> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT decision, mode, created_ms, finished_ms, branches, resolved
                 FROM tandem_decisions WHERE gtid = $1",
                &[&gtid],
            )
            .await?;
        Ok(row.map(|r| tombstone_of(gtid, &r)).transpose())
    }

    async fn horizon(&self) -> Result<Horizon, Fail> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT purged_ms, forgotten_ms FROM tandem_horizon", &[])
            .await?;
        let (p, f): (i64, i64) = (row.get(0), row.get(1));
        Ok(Horizon {
            purged_ms: p.max(0) as u64,
            forgotten_ms: f.max(0) as u64,
        })
    }

    async fn now_ms(&self) -> Result<u64, Fail> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    async fn expire(&self, finished_before_ms: u64, limit: usize) -> Result<usize, Fail> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let before = finished_before_ms.min(i64::MAX as u64) as i64;
        let limit = limit.min(i64::MAX as usize) as i64;
        let gone: Vec<Gtid> = tx
            .query(
                "DELETE FROM tandem_decisions WHERE gtid IN (
                     SELECT gtid FROM tandem_decisions WHERE finished_ms < $1
                     ORDER BY gtid LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING gtid",
                &[&before, &limit],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let forgotten = gone.iter().filter_map(tombstone::gtid_ms).max();
        if let Some(ms) = forgotten {
            tx.execute(
                "UPDATE tandem_horizon SET forgotten_ms = GREATEST(forgotten_ms, $1)",
                &[&(ms.min(i64::MAX as u64) as i64)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(gone.len())
    }
}

fn tombstone_of(gtid: Gtid, r: &tokio_postgres::Row) -> Result<Tombstone, LogError> {
    let corrupt = |what: &str| LogError::Corrupt {
        gtid: gtid.to_string(),
        detail: format!("decision tombstone: {what}"),
    };
    let (created, finished): (i64, i64) = (r.get(2), r.get(3));
    let (branches, resolved): (i32, i32) = (r.get(4), r.get(5));
    Ok(Tombstone {
        gtid,
        decision: tombstone::decision_from(r.get(0)).ok_or_else(|| corrupt("decision"))?,
        mode: tombstone::mode_from(r.get(1)).ok_or_else(|| corrupt("mode"))?,
        created_ms: created.max(0) as u64,
        finished_ms: finished.max(0) as u64,
        branches: branches.max(0) as u32,
        resolved: resolved.max(0) as u32,
    })
}
