//! An in-memory [`TxnLog`] for tests and simulations. `force` is free and
//! nothing survives the process; it exists so that protocol tests need no
//! disk, and it passes the same conformance suite as [`super::SledLog`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::tombstone::purged_horizon;
use super::{ForceFuture, Horizon, LogError, LogStats, Purge, Tombstone, TxnLog};
use crate::model::{Gtid, TxState, TxnRecord};

/// In-memory log. Cloning records on every call is fine for its purpose.
#[derive(Default)]
pub struct MemLog {
    records: Mutex<BTreeMap<Gtid, TxnRecord>>,
    /// Tombstones and the horizon, changed together under one lock.
    kept: Mutex<(BTreeMap<Gtid, Tombstone>, Horizon)>,
    forces: AtomicU64,
}

impl MemLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<Gtid, TxnRecord>> {
        // A panic while holding the lock cannot leave a half-written map:
        // every mutation is a single insert.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, (BTreeMap<Gtid, Tombstone>, Horizon)> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TxnLog for MemLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.records().insert(record.gtid, record.clone());
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        self.forces.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Every write lands at once and nothing outlives the process.
    fn may_have_lost_starts(&self) -> bool {
        false
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        Ok(self.records().get(gtid).cloned())
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.records().remove(gtid);
        Ok(())
    }

    fn compacts(&self) -> bool {
        true
    }

    fn purge(&self, purges: &[Purge]) -> Result<(), LogError> {
        // Records lock first, then the kept one (as every reader): a
        // reader sees the removal and the tombstone together.
        let mut records = self.records();
        let mut kept = self.kept();
        for p in purges {
            if let Some(t) = &p.tombstone {
                kept.0.insert(t.gtid, t.clone());
            }
        }
        kept.1 = kept.1.max(purged_horizon(purges));
        for p in purges {
            if records.get(&p.gtid).is_some_and(|r| r.state.is_terminal()) {
                records.remove(&p.gtid);
            }
        }
        Ok(())
    }

    fn tombstone(&self, gtid: &Gtid) -> Result<Option<Tombstone>, LogError> {
        Ok(self.kept().0.get(gtid).cloned())
    }

    fn horizon(&self) -> Result<Horizon, LogError> {
        Ok(self.kept().1)
    }

    fn expire_tombstones(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        let mut kept = self.kept();
        let gone: Vec<Gtid> = kept
            .0
            .values()
            .filter(|t| t.finished_ms < finished_before_ms)
            .take(limit)
            .map(|t| t.gtid)
            .collect();
        for g in &gone {
            kept.0.remove(g);
            let ms = super::gtid_ms(g).unwrap_or(0);
            kept.1.forgotten_ms = kept.1.forgotten_ms.max(ms);
        }
        Ok(gone.len())
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, |g| Bound::Excluded(*g));
        Ok(self
            .records()
            .range((lower, Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| states.is_empty() || states.contains(&r.state))
            .take(limit)
            .cloned()
            .collect())
    }

    fn scan_back(
        &self,
        before: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        use std::ops::Bound;
        let upper = before.map_or(Bound::Unbounded, |g| Bound::Excluded(*g));
        Ok(self
            .records()
            .range((Bound::Unbounded, upper))
            .rev()
            .map(|(_, r)| r)
            .filter(|r| states.is_empty() || states.contains(&r.state))
            .take(limit)
            .cloned()
            .collect())
    }

    fn stats(&self) -> LogStats {
        let forces = self.forces.load(Ordering::Relaxed);
        LogStats {
            forces,
            flushes: forces,
            ..LogStats::default()
        }
    }
}
