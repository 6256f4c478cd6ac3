//! [`MemBarrier`]: barrier records in memory.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::locks::{KeyGuard, KeyLocks};
use bytes::Bytes;

use super::{
    BarrierEntry, BarrierError, BarrierRecord, BarrierStore, BoxFuture, BranchKey, InDoubt, Mark,
    PurgePage, changed,
};

/// Barrier records in memory: they protect against repeats and disorder
/// while the process runs, and are gone after a restart.
///
/// This is the default of [`ParticipantServer`](crate::ParticipantServer),
/// right for handlers whose own state is in memory too (tests, demos). A
/// handler with durable state needs a durable barrier, such as
/// [`SledBarrier`](super::SledBarrier).
#[derive(Clone, Default)]
pub struct MemBarrier {
    records: Arc<Mutex<BTreeMap<BranchKey, BarrierRecord>>>,
    /// Resource and payload of branches still `Tried`.
    tried: Arc<Mutex<BTreeMap<BranchKey, (String, Bytes)>>>,
    locks: KeyLocks,
}

impl MemBarrier {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<BranchKey, BarrierRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tried(&self) -> std::sync::MutexGuard<'_, BTreeMap<BranchKey, (String, Bytes)>> {
        self.tried.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct MemEntry {
    store: MemBarrier,
    key: BranchKey,
    record: Option<BarrierRecord>,
    _guard: KeyGuard,
}

impl BarrierEntry for MemEntry {
    fn record(&self) -> Option<BarrierRecord> {
        self.record
    }

    fn compare_and_set<'a>(
        &'a mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&'a str, &'a [u8])>,
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        let mut map = self.store.map();
        let found = map.get(&self.key).map(|r| r.mark);
        if found != from {
            return Box::pin(std::future::ready(Err(changed(self.key, from))));
        }
        map.insert(self.key, to);
        let mut kept = self.store.tried();
        match tried {
            _ if to.mark != Mark::Tried => drop(kept.remove(&self.key)),
            Some((resource, payload)) => drop(kept.insert(
                self.key,
                (resource.to_string(), Bytes::copy_from_slice(payload)),
            )),
            None => {}
        }
        self.record = Some(to);
        Box::pin(std::future::ready(Ok(())))
    }

    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

impl BarrierStore for MemBarrier {
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>> {
        Box::pin(async move {
            let guard = self.locks.lock(key).await;
            let record = self.map().get(&key).copied();
            Ok(Box::new(MemEntry {
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
        use std::ops::Bound;
        let records = self.map();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let found = self
            .tried()
            .range((lower, Bound::Unbounded))
            .filter_map(|(key, (resource, payload))| {
                let r = records.get(key)?;
                (r.mark == Mark::Tried && r.updated_ms < before_ms).then(|| InDoubt {
                    key: *key,
                    resource: resource.clone(),
                    payload: payload.clone(),
                    tried_ms: r.updated_ms,
                })
            })
            .take(limit)
            .collect();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn stored(&self) -> BoxFuture<'_, Result<usize, BarrierError>> {
        let n = self.map().len() + self.tried().len();
        Box::pin(std::future::ready(Ok(n)))
    }

    fn purge(
        &self,
        from: Option<BranchKey>,
        before_ms: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<PurgePage, BarrierError>> {
        let mut map = self.map();
        let lower = from.map_or(Bound::Unbounded, Bound::Excluded);
        let page: Vec<(BranchKey, BarrierRecord)> = map
            .range((lower, Bound::Unbounded))
            .take(limit.max(1))
            .map(|(k, r)| (*k, *r))
            .collect();
        let mut out = PurgePage {
            scanned: page.len(),
            removed: 0,
            next: None,
        };
        for (key, record) in &page {
            if record.mark.is_finished() && record.updated_ms < before_ms {
                map.remove(key);
                out.removed += 1;
            }
        }
        if page.len() >= limit.max(1) {
            out.next = page.last().map(|(k, _)| *k);
        }
        Box::pin(std::future::ready(Ok(out)))
    }
}
