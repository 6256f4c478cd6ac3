//! [`SledBarrier`]: barrier records in sled, durable across restarts.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use super::locks::{KeyGuard, KeyLocks};
use super::{
    BarrierEntry, BarrierError, BarrierRecord, BarrierStore, BoxFuture, BranchKey, InDoubt, Mark,
    PurgePage, changed, now_ms,
};
use crate::handler::{BranchContext, HandlerError};
use crate::sled_sync::{SledSync, SyncError};

/// The sled tree holding barrier records.
const TREE: &str = "tandem_barrier";
/// The sled tree holding resource and payload of branches still `Tried`.
const TRIED_TREE: &str = "tandem_barrier_tried";

/// Barrier records in a sled database, made durable by [`SledSync`] (group
/// commit: concurrent calls share one `fdatasync`).
///
/// Locks are per process: one participant process owns a sled directory
/// (sled itself refuses a second opener).
///
/// # Examples
///
/// Business state in the same database, written atomically with the
/// barrier record:
///
/// ```no_run
/// use tandem_sdk::barrier::SledBarrier;
/// use tandem_sdk::{BranchContext, HandlerError, Tcc, Vote};
///
/// struct Stock { barrier: SledBarrier, items: sled::Tree }
///
/// impl Tcc for Stock {
///     async fn try_(&self, ctx: &BranchContext, _: &[u8]) -> Result<Vote, HandlerError> {
///         self.barrier.transaction(ctx, &self.items, |items| {
///             items.insert(b"reserved", b"1".as_slice())?;
///             Ok(Vote::yes())
///         })
///     }
///     async fn confirm(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         // The move and the barrier's `Confirmed` commit together: a crash
///         // cannot leave one without the other.
///         self.barrier.transaction(ctx, &self.items, |items| {
///             items.remove(b"reserved".as_slice())?;
///             items.insert(b"sold", b"1".as_slice())?;
///             Ok(())
///         })
///     }
///     async fn cancel(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
///         self.barrier.transaction(ctx, &self.items, |items| {
///             items.remove(b"reserved".as_slice())?;
///             Ok(())
///         })
///     }
/// }
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let barrier = SledBarrier::open("./stock-data")?;
/// let items = barrier.db().open_tree("items")?;
/// let server = tandem_sdk::ParticipantServer::new()
///     .barrier(barrier.clone())
///     .tcc("stock", Stock { barrier, items });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SledBarrier {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    tried: sled::Tree,
    sync: SledSync,
    locks: KeyLocks,
}

impl SledBarrier {
    /// Opens (creating if needed) a sled database at `dir` and keeps barrier
    /// records in its `tandem_barrier` tree. Open other trees of
    /// [`db`](SledBarrier::db) for the handler's own state.
    ///
    /// # Errors
    ///
    /// The directory cannot be created or opened (another process may hold
    /// it).
    pub fn open(dir: impl AsRef<Path>) -> Result<SledBarrier, BarrierError> {
        let dir = dir.as_ref();
        let fail = |e: &dyn std::fmt::Display| {
            BarrierError(format!("cannot open sled database {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let db = sled::Config::new().path(dir).open().map_err(|e| fail(&e))?;
        let tree = db.open_tree(TREE).map_err(|e| fail(&e))?;
        let tried = db.open_tree(TRIED_TREE).map_err(|e| fail(&e))?;
        let sync = SledSync::start(&db, dir).map_err(|e| fail(&e))?;
        Ok(SledBarrier {
            inner: Arc::new(Inner {
                db,
                tree,
                tried,
                sync,
                locks: KeyLocks::default(),
            }),
        })
    }

    /// The database, for the handler's own trees.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Resolves once every write made to the database so far (the handler's
    /// too) is on stable storage.
    pub fn sync(
        &self,
    ) -> impl std::future::Future<Output = Result<(), SyncError>> + Send + 'static {
        self.inner.sync.sync()
    }

    /// Runs `f` on `tree` and stores this call's barrier record in the same
    /// sled transaction, so the business change and the record commit
    /// together. Use it in a handler registered on a server whose
    /// [`barrier`](crate::ParticipantServer::barrier) is this store; the
    /// server makes both durable before it answers.
    ///
    /// `f` may run more than once (sled retries a transaction on conflict),
    /// so it must only touch `tree`.
    ///
    /// # Errors
    ///
    /// An error `f` aborted with, or a sled storage error.
    pub fn transaction<T>(
        &self,
        ctx: &BranchContext,
        tree: &sled::Tree,
        f: impl Fn(&TransactionalTree) -> ConflictableTransactionResult<T, HandlerError>,
    ) -> Result<T, HandlerError> {
        let key = ctx.key().to_bytes();
        let mark = ctx.phase.done_mark().unwrap_or(Mark::Tried);
        let updated_ms = now_ms();
        (&self.inner.tree, &self.inner.tried, tree)
            .transaction(|(barrier, tried, business)| {
                let value = f(business)?;
                // The highest epoch seen stays (the gate checked this call's).
                let seen = barrier
                    .get(&key[..])?
                    .and_then(|b| BarrierRecord::decode(&b))
                    .map_or(0, |r| r.epoch);
                let record = BarrierRecord {
                    mark,
                    updated_ms,
                    epoch: seen.max(ctx.epoch),
                }
                .encode();
                barrier.insert(&key[..], &record[..])?;
                if mark != Mark::Tried {
                    // The branch leaves Tried: its in-doubt entry goes with
                    // it, in the same transaction.
                    tried.remove(&key[..])?;
                }
                Ok(value)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => HandlerError::new(format!("sled: {e}")),
            })
    }

    /// Removes an in-doubt entry whose branch is no longer `Tried` (left
    /// by a crash between the record's write and the entry's removal), or
    /// that cannot be read; only if it is still the entry that was read.
    fn remove_orphan(&self, key: &[u8], value: &[u8]) -> Result<(), BarrierError> {
        let _ = self
            .inner
            .tried
            .compare_and_swap(key, Some(value), None as Option<&[u8]>)
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// `key`'s record as stored.
    fn read(&self, key: BranchKey) -> Result<Option<BarrierRecord>, BarrierError> {
        let stored = self
            .inner
            .tree
            .get(key.to_bytes())
            .map_err(|e| self.storage(e))?;
        stored
            .map(|bytes| BarrierRecord::decode(&bytes).ok_or_else(|| corrupt(key, &bytes)))
            .transpose()
    }

    fn storage(&self, e: sled::Error) -> BarrierError {
        BarrierError(self.inner.sync.halt(e).to_string())
    }
}

struct SledEntry {
    store: SledBarrier,
    key: BranchKey,
    record: Option<BarrierRecord>,
    _guard: KeyGuard,
}

impl BarrierEntry for SledEntry {
    fn record(&self) -> Option<BarrierRecord> {
        self.record
    }

    fn compare_and_set<'a>(
        &'a mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&'a str, &'a [u8])>,
    ) -> BoxFuture<'a, Result<(), BarrierError>> {
        Box::pin(async move {
            let inner = &self.store.inner;
            inner
                .sync
                .check()
                .map_err(|e| BarrierError(e.to_string()))?;
            let (key, branch) = (self.key.to_bytes(), self.key);
            let value = to.encode();
            let kept = tried.map(|(resource, payload)| super::encode_tried(resource, payload));
            // The record, the check of the mark it replaces, and the tried
            // entry (resource and payload) commit together.
            (&inner.tree, &inner.tried)
                .transaction(|(records, payloads)| {
                    let found = match records.get(&key[..])? {
                        None => None,
                        Some(bytes) => match BarrierRecord::decode(&bytes) {
                            Some(record) => Some(record.mark),
                            None => return abort(corrupt(branch, &bytes)),
                        },
                    };
                    if found != from {
                        return abort(changed(branch, from));
                    }
                    records.insert(&key[..], &value[..])?;
                    if to.mark != Mark::Tried {
                        payloads.remove(&key[..])?;
                    } else if let Some(kept) = &kept {
                        payloads.insert(&key[..], kept.as_slice())?;
                    }
                    Ok(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => self.store.storage(e),
                })?;
            inner
                .sync
                .sync()
                .await
                .map_err(|e| BarrierError(e.to_string()))?;
            self.record = Some(to);
            Ok(())
        })
    }

    fn reread(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        let record = self.store.read(self.key);
        Box::pin(async move {
            self.record = record?;
            Ok(())
        })
    }

    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        let synced = self.store.inner.sync.sync();
        Box::pin(async move { synced.await.map_err(|e| BarrierError(e.to_string())) })
    }
}

fn abort<T>(e: BarrierError) -> ConflictableTransactionResult<T, BarrierError> {
    Err(ConflictableTransactionError::Abort(e))
}

fn corrupt(key: BranchKey, bytes: &[u8]) -> BarrierError {
    BarrierError(format!(
        "record of {} branch {} is corrupt: {bytes:?}",
        key.gtid, key.branch_id
    ))
}

impl BarrierStore for SledBarrier {
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>> {
        Box::pin(async move {
            let guard = self.inner.locks.lock(key).await;
            self.inner
                .sync
                .check()
                .map_err(|e| BarrierError(e.to_string()))?;
            let record = self.read(key)?;
            Ok(Box::new(SledEntry {
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
            let mut found = Vec::new();
            let lower = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_bytes().to_vec()));
            // The tried tree holds only branches waiting for an outcome.
            for item in self
                .inner
                .tried
                .range::<Vec<u8>, _>((lower, Bound::Unbounded))
            {
                if found.len() >= limit {
                    break;
                }
                let (key, value) = item.map_err(|e| self.storage(e))?;
                let record = self
                    .inner
                    .tree
                    .get(&key)
                    .map_err(|e| self.storage(e))?
                    .and_then(|v| BarrierRecord::decode(&v));
                let (Some(branch), Some(record), Some((resource, payload))) = (
                    BranchKey::from_bytes(&key),
                    record,
                    super::decode_tried(&value),
                ) else {
                    // No record yet: a try is storing it right now.
                    continue;
                };
                if record.mark != Mark::Tried {
                    self.remove_orphan(&key, &value)?;
                    continue;
                }
                if record.mark == Mark::Tried && record.updated_ms < before_ms {
                    found.push(InDoubt {
                        key: branch,
                        resource,
                        payload,
                        tried_ms: record.updated_ms,
                    });
                }
            }
            Ok(found)
        })
    }

    fn stored(&self) -> BoxFuture<'_, Result<usize, BarrierError>> {
        let n = self.inner.tree.len() + self.inner.tried.len();
        Box::pin(std::future::ready(Ok(n)))
    }

    fn purge(
        &self,
        from: Option<BranchKey>,
        before_ms: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<PurgePage, BarrierError>> {
        Box::pin(async move {
            let limit = limit.max(1);
            let lower = from.map_or(Bound::Unbounded, |k| Bound::Excluded(k.to_bytes().to_vec()));
            let mut page = PurgePage::default();
            let mut last = None;
            for item in self
                .inner
                .tree
                .range::<Vec<u8>, _>((lower, Bound::Unbounded))
                .take(limit)
            {
                let (key, value) = item.map_err(|e| self.storage(e))?;
                page.scanned += 1;
                last = BranchKey::from_bytes(&key);
                let old = BarrierRecord::decode(&value)
                    .is_some_and(|r| r.mark.is_finished() && r.updated_ms < before_ms);
                // Compare-and-swap: a record rewritten since it was read stays.
                if old
                    && self
                        .inner
                        .tree
                        .compare_and_swap(&key, Some(&value), None as Option<&[u8]>)
                        .map_err(|e| self.storage(e))?
                        .is_ok()
                {
                    page.removed += 1;
                }
            }
            if page.scanned >= limit {
                page.next = last;
            }
            Ok(page)
        })
    }
}
