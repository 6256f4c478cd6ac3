//! Retention on the shared store: the rules of PgLog's
//! `log/pg/tombstone.rs` (one transaction each): a purge keeps its
//! tombstones and raises the horizon before it removes rows, and removes
//! only rows that are finished when it lands; expiring tombstones raises
//! the horizon's `forgotten_ms` over each one it removes.

use super::SharedStore;
use crate::model::Gtid;
use crate::tombstone::{gtid_ms, purged_horizon};
use crate::{Horizon, Purge, Tombstone};

impl SharedStore {
    /// Retention's removal, all at once: tombstones kept (an existing one
    /// is not replaced), `purged_ms` raised over every gtid, and each row
    /// removed only if it is finished now. PgLog: `Store::purge`.
    pub(crate) fn purge(&self, purges: &[Purge]) {
        let mut t = self.tables();
        for p in purges {
            if let Some(stone) = &p.tombstone {
                t.tombstones.entry(p.gtid).or_insert_with(|| stone.clone());
            }
        }
        t.horizon = t.horizon.max(purged_horizon(purges));
        for p in purges {
            if t.rows
                .get(&p.gtid)
                .is_some_and(|r| r.record.state.is_terminal())
            {
                t.rows.remove(&p.gtid);
            }
        }
    }

    /// The tombstone of `gtid`, if any.
    pub(crate) fn tombstone(&self, gtid: &Gtid) -> Option<Tombstone> {
        self.tables().tombstones.get(gtid).cloned()
    }

    /// How far retention has forgotten.
    pub fn horizon(&self) -> Horizon {
        self.tables().horizon
    }

    /// Removes up to `limit` tombstones that finished before
    /// `finished_before_ms`, oldest gtid first, raising `forgotten_ms`
    /// over each. PgLog: `Store::expire`.
    pub(crate) fn expire(&self, finished_before_ms: u64, limit: usize) -> usize {
        let mut t = self.tables();
        let gone: Vec<Gtid> = t
            .tombstones
            .values()
            .filter(|s| s.finished_ms < finished_before_ms)
            .map(|s| s.gtid)
            .take(limit)
            .collect();
        for gtid in &gone {
            t.tombstones.remove(gtid);
            if let Some(ms) = gtid_ms(gtid) {
                t.horizon.forgotten_ms = t.horizon.forgotten_ms.max(ms);
            }
        }
        gone.len()
    }

    /// Every tombstone (for the simulation's checks).
    pub fn tombstones(&self) -> Vec<Tombstone> {
        self.tables().tombstones.values().cloned().collect()
    }
}
