//! [`SharedMemLog`]: one coordinator incarnation's [`TxnLog`] over a
//! [`SharedStore`], as [`super::PgLog`] is over PostgreSQL — for the
//! cluster simulation, with the hooks it needs: a pause gate (a process
//! stopped past its lease or past retention), injected force failures and
//! stalls, and lease renewal the simulation drives.
//!
//! Like PgLog, `write` only buffers (the newest version per gtid) and a
//! flush sends the buffer to the store as one batch, all or nothing: on
//! every `force`, a little after a plain write (when a tokio runtime is
//! running), and before a `scan`. Which write is a transaction's *first*
//! (the only one that may create its row) is decided as PgLog decides it:
//! a write at epoch 1 of a gtid this incarnation has not created (or has
//! finished or removed since); every other write is a conditional update
//! ([`SharedStore`]'s rules). A first write the store refuses forgets that
//! transaction ([`LogError::Refused`]); any other refusal latches the log
//! ([`LogError::Fenced`]).
//!
//! Calls that reach the store asynchronously (`force`, the flush after a
//! plain write, claims, the spawned renewer) wait while the incarnation is
//! paused and land when it resumes. Synchronous reads (`get`, `locate`,
//! `scan`) are answered at once, as if made just before the pause; `renew`
//! does nothing while paused.

mod flush;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use self::flush::{Inner, LINGER, Op};
use super::shared_store::SharedStore;
use super::{
    ForceFuture, Horizon, LogError, LogStats, Ownership, Presumed, Purge, TakeOverFuture,
    Tombstone, TxnLog,
};
use crate::model::{Gtid, TxState, TxnRecord};

/// One coordinator incarnation on a [`SharedStore`]. See the module docs.
pub struct SharedMemLog {
    inner: Arc<Inner>,
}

impl SharedMemLog {
    /// A new incarnation of instance `name` (reached at `address`): it
    /// registers and claims its name's earlier incarnations' unfinished
    /// rows at once (a restart). Plain writes are flushed in the
    /// background when called inside a tokio runtime.
    pub fn open(store: Arc<SharedStore>, name: &str, address: &str) -> Arc<SharedMemLog> {
        let me = store.next_incarnation();
        store.register(me, name, address);
        let inner = Arc::new(Inner::new(store, me, name));
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(linger_flusher(Arc::downgrade(&inner), inner.wake.clone()));
        }
        Arc::new(SharedMemLog { inner })
    }

    /// This incarnation (the `owner` of its rows).
    pub fn incarnation(&self) -> Uuid {
        self.inner.me
    }

    /// The instance name it registered under.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The store it is on.
    pub fn store(&self) -> &Arc<SharedStore> {
        &self.inner.store
    }

    /// Pauses (`true`) or resumes this incarnation's calls into the store:
    /// while paused they wait, and its buffered writes land when it
    /// resumes — a process stopped (GC, SIGSTOP, a VM migration) past its
    /// lease or past retention.
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.store(paused);
    }

    /// Whether it is paused.
    pub fn paused(&self) -> bool {
        self.inner.paused.is_set()
    }

    /// Every later flush first waits `stall` (a slow store).
    pub fn set_force_stall(&self, stall: Duration) {
        *self.inner.stall.lock().unwrap_or_else(|p| p.into_inner()) = stall;
    }

    /// The next flush fails as a store whose write failed (the log
    /// latches, as a real one does).
    pub fn fail_next_force(&self) {
        self.inner.fail_next.store(true, Ordering::SeqCst);
    }

    /// Pauses the incarnation when its next flush starts, its writes
    /// still unsent (`true`), or calls that off (`false`): a process
    /// stopped between deciding and forcing, whose decision lands when
    /// it resumes.
    pub fn pause_at_next_flush(&self, armed: bool) {
        self.inner.pause_at_flush.store(armed, Ordering::SeqCst);
    }

    /// The process dies: nothing unflushed or in flight reaches the store
    /// any more, and every call fails. Dropping the log does the same.
    pub fn crash(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner
            .latch(LogError::Halted("the process crashed".into()));
    }

    /// Why the log latched, if it did.
    pub fn halted(&self) -> Option<String> {
        self.inner.halted.get().map(|e| e.to_string())
    }

    /// Renews this incarnation's heartbeat and leases on the store's
    /// clock (PgLog does so every third of the lease from its own
    /// thread). Nothing while paused, closed or latched. When a later
    /// incarnation of its name has registered, the log latches
    /// ([`LogError::Fenced`]). True when renewed.
    pub fn renew(&self) -> bool {
        self.inner.renew()
    }

    /// Renews every `period` on the current tokio runtime (waiting while
    /// paused) until the log is dropped, crashes or latches.
    pub fn spawn_renewer(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                let gate = inner.paused.clone();
                drop(inner);
                gate.cleared().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.halted.get().is_some() {
                    return;
                }
                inner.renew();
            }
        })
    }
}

impl Drop for SharedMemLog {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

/// Flushes plain writes [`LINGER`] after they were made.
async fn linger_flusher(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        tokio::time::sleep(LINGER).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) || inner.halted.get().is_some() {
            return;
        }
        // A failure latched the log; the next caller hears of it.
        let _ = inner.flush().await;
    }
}

impl TxnLog for SharedMemLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.inner.check()?;
        let mut buf = self.inner.buffer();
        if buf.refused.contains(&record.gtid) {
            return Err(LogError::Refused(record.gtid));
        }
        let first = match buf.pending.get(&record.gtid) {
            // Not in the store yet: still the first write.
            Some(Op::Write { first, .. }) => *first,
            // Written before (the flush that carried it created the row or
            // latched), claimed (a later epoch), or new.
            _ => record.epoch <= 1 && !buf.created.contains(&record.gtid),
        };
        if record.state.is_terminal() {
            // Nothing writes a finished transaction again.
            buf.created.remove(&record.gtid);
        } else if record.epoch <= 1 {
            buf.created.insert(record.gtid);
        }
        buf.pending.insert(
            record.gtid,
            Op::Write {
                record: Box::new(record.clone()),
                first,
            },
        );
        drop(buf);
        self.inner.wake.notify_one();
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        self.inner.forces.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        Box::pin(async move { inner.flush().await })
    }

    fn force_txn(&self, gtid: &Gtid) -> ForceFuture {
        self.inner.buffer().pin(*gtid);
        let forced = self.force();
        let (inner, gtid) = (self.inner.clone(), *gtid);
        Box::pin(async move {
            let forced = forced.await;
            // Read (and unpinned) whatever the force's outcome.
            let refused = inner.buffer().unpin(&gtid);
            forced?;
            if refused {
                return Err(LogError::Refused(gtid));
            }
            Ok(())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn store_now_ms(&self) -> Result<Option<u64>, LogError> {
        self.inner.check()?;
        Ok(Some(self.inner.store.now_ms()))
    }

    fn refused(&self, gtid: &Gtid) -> bool {
        self.inner.buffer().refused.contains(gtid)
    }

    fn presume_abort(&self, marker: &TxnRecord) -> Result<Presumed, LogError> {
        self.inner.check()?;
        // Cut off from the store: the statement would wait and time out.
        if self.paused() {
            return Err(LogError::Storage(
                "the shared store cannot be reached (paused)".into(),
            ));
        }
        Ok(self.inner.store.presume_abort(marker))
    }

    fn accept_presumed_abort(&self, gtid: &Gtid) {
        let mut buf = self.inner.buffer();
        buf.refused.remove(gtid);
        buf.refused_order.retain(|g| g != gtid);
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.inner.check()?;
        if let Some(op) = self.inner.buffer().pending.get(gtid) {
            return Ok(match op {
                Op::Write { record, .. } => Some(TxnRecord::clone(record)),
                Op::Remove => None,
            });
        }
        Ok(self.inner.store.get(gtid))
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(after, states, limit, false, false)
    }

    fn scan_back(
        &self,
        before: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(before, states, limit, false, true)
    }

    fn scan_own(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(after, states, limit, true, false)
    }

    fn take_over_expired(&self, limit: usize) -> TakeOverFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.claim(limit, None).await })
    }

    fn take_over(&self, gtid: &Gtid) -> TakeOverFuture {
        let (inner, gtid) = (self.inner.clone(), *gtid);
        Box::pin(async move { inner.claim(1, Some(gtid)).await })
    }

    fn locate(&self, gtid: &Gtid) -> Result<Option<Ownership>, LogError> {
        self.inner.check()?;
        Ok(self.inner.store.locate(self.inner.me, gtid))
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.inner.check()?;
        let mut buf = self.inner.buffer();
        buf.created.remove(gtid);
        buf.pending.insert(*gtid, Op::Remove);
        drop(buf);
        self.inner.wake.notify_one();
        Ok(())
    }

    fn compacts(&self) -> bool {
        true
    }

    /// The buffered writes land first (as PgLog's purge waits for its
    /// flushes). A paused incarnation's purge does nothing (its calls
    /// would wait; retention's next pass finds the rows again).
    fn purge(&self, purges: &[Purge]) -> Result<(), LogError> {
        self.inner.check()?;
        if self.inner.paused.is_set() {
            return Ok(());
        }
        self.inner.flush_now()?;
        self.inner.store.purge(purges);
        Ok(())
    }

    fn tombstone(&self, gtid: &Gtid) -> Result<Option<Tombstone>, LogError> {
        self.inner.check()?;
        Ok(self.inner.store.tombstone(gtid))
    }

    fn horizon(&self) -> Result<Horizon, LogError> {
        self.inner.check()?;
        Ok(self.inner.store.horizon())
    }

    fn expire_tombstones(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        self.inner.check()?;
        if self.inner.paused.is_set() {
            return Ok(0);
        }
        Ok(self.inner.store.expire(finished_before_ms, limit))
    }

    fn stats(&self) -> LogStats {
        LogStats {
            forces: self.inner.forces.load(Ordering::Relaxed),
            flushes: self.inner.flushes.load(Ordering::Relaxed),
            lease_renewals: self.inner.renewals.load(Ordering::Relaxed),
            lease_renewal_failures: self.inner.renewal_failures.load(Ordering::Relaxed),
        }
    }
}
