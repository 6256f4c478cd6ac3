//! [`SharedMemLog`]: one coordinator incarnation's [`TxnLog`] over a
//! [`SharedStore`], as [`super::PgLog`] is over PostgreSQL — for the
//! cluster simulation, with the hooks it needs: a pause gate (a process
//! stopped past its lease or past retention), injected force failures and
//! stalls, and lease renewal the simulation drives.
//!
//! Like PgLog, `write` only buffers (the newest version per gtid) and a
//! flush sends the buffer to the store as one batch, all or nothing: on
//! every `force`, a little after a plain write (when a tokio runtime is
//! running), and before a `scan`. A write of a gtid this incarnation never
//! had in the store is its transaction's *first* write, which only may
//! create the row; every other write is a conditional update
//! ([`SharedStore`]'s rules). A first write the store refuses forgets that
//! transaction ([`LogError::Refused`]); any other refusal latches the log
//! ([`LogError::Fenced`]).
//!
//! Calls that reach the store asynchronously (`force`, the flush after a
//! plain write, claims, the spawned renewer) wait while the incarnation is
//! paused and land when it resumes. Synchronous reads (`get`, `locate`,
//! `scan`) are answered at once, as if made just before the pause; `renew`
//! does nothing while paused.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::shared_store::{BatchOp, SharedStore};
use super::{ForceFuture, LogError, LogStats, Ownership, TakeOverFuture, TxnLog};
use crate::model::{Gtid, TxState, TxnRecord};

/// How long a plain write waits for company before it is flushed (as
/// PgLog's flusher).
const LINGER: Duration = Duration::from_millis(20);

/// How many refused gtids are remembered (the coordinator forgets each
/// at once; the set only has to outlive that).
const REFUSED_KEPT: usize = 4096;

/// One buffered change.
#[derive(Clone)]
enum Op {
    Write(TxnRecord),
    Remove,
}

#[derive(Default)]
struct Buffer {
    /// Newest change per gtid, not flushed yet.
    pending: BTreeMap<Gtid, Op>,
    /// Gtids whose row this incarnation created or claimed: a write of
    /// any other gtid is a first write. Kept after a removal, so a write
    /// after retention is never taken for a first one.
    mine: HashSet<Gtid>,
    /// First writes the store refused (another coordinator started the
    /// gtid first), the newest [`REFUSED_KEPT`].
    refused: HashSet<Gtid>,
    refused_order: VecDeque<Gtid>,
}

impl Buffer {
    fn refuse(&mut self, gtid: Gtid) {
        self.pending.remove(&gtid);
        if self.refused.insert(gtid) {
            self.refused_order.push_back(gtid);
            if self.refused_order.len() > REFUSED_KEPT
                && let Some(old) = self.refused_order.pop_front()
            {
                self.refused.remove(&old);
            }
        }
    }
}

struct Inner {
    store: Arc<SharedStore>,
    me: Uuid,
    name: String,
    buffer: Mutex<Buffer>,
    /// The failure that latched the log, if any.
    halted: OnceLock<LogError>,
    paused: watch::Sender<bool>,
    /// Crashed or dropped: nothing more of this incarnation reaches the
    /// store.
    closed: AtomicBool,
    stall: Mutex<Duration>,
    fail_next: AtomicBool,
    wake: Arc<Notify>,
    forces: AtomicU64,
    flushes: AtomicU64,
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
}

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
        let claimed = store.register(me, name, address);
        let buffer = Buffer {
            mine: claimed.into_iter().collect(),
            ..Buffer::default()
        };
        let inner = Arc::new(Inner {
            store,
            me,
            name: name.to_string(),
            buffer: Mutex::new(buffer),
            halted: OnceLock::new(),
            paused: watch::channel(false).0,
            closed: AtomicBool::new(false),
            stall: Mutex::new(Duration::ZERO),
            fail_next: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            forces: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
        });
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
        self.inner.paused.send_replace(paused);
    }

    /// Whether it is paused.
    pub fn paused(&self) -> bool {
        *self.inner.paused.borrow()
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
                let mut gate = inner.paused.subscribe();
                drop(inner);
                if gate.wait_for(|p| !*p).await.is_err() {
                    return;
                }
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

impl Inner {
    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Every mutation is a handful of map operations.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), LogError> {
        match self.halted.get() {
            Some(why) => Err(LogError::Halted(why.to_string())),
            None => Ok(()),
        }
    }

    /// Latches the log with `e` (the first failure wins).
    fn latch(&self, e: LogError) -> LogError {
        let _ = self.halted.set(e.clone());
        e
    }

    /// Waits while paused, then as long as the injected stall.
    async fn gate(&self) -> Result<(), LogError> {
        let mut gate = self.paused.subscribe();
        let _ = gate.wait_for(|p| !*p).await;
        let stall = *self.stall.lock().unwrap_or_else(|p| p.into_inner());
        if !stall.is_zero() {
            tokio::time::sleep(stall).await;
        }
        self.check()
    }

    /// A flush through the gate. A force made before the log latched
    /// hears the failure itself (its writes may have gone in the failed
    /// batch, as PgLog's waiters of a failed flush do); later ones hear
    /// that the log is halted.
    async fn flush(&self) -> Result<(), LogError> {
        let before_latch = self.halted.get().is_none();
        let passed = match self.gate().await {
            Ok(()) => self.flush_now(),
            Err(e) => Err(e),
        };
        match (passed, self.halted.get()) {
            (Err(_), Some(first)) if before_latch => Err(first.clone()),
            (result, _) => result,
        }
    }

    /// Sends the buffer to the store as batches, all or nothing each: a
    /// refused first write is forgotten and the rest sent again; a fenced
    /// write latches the log (nothing of the batch landed).
    fn flush_now(&self) -> Result<(), LogError> {
        self.check()?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.latch(LogError::Halted("the process crashed".into())));
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(self.latch(LogError::Storage(
                "write the log: injected store failure".into(),
            )));
        }
        // The buffer stays locked until the batch is in the store, so a
        // concurrent force cannot resolve before the writes it covers.
        let mut buf = self.buffer();
        if buf.pending.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut buf.pending);
        let mut batch: BTreeMap<Gtid, BatchOp> = ops
            .into_iter()
            .map(|(gtid, op)| {
                let op = match op {
                    Op::Remove => BatchOp::Remove,
                    Op::Write(record) => BatchOp::Write {
                        first: !buf.mine.contains(&gtid),
                        record,
                    },
                };
                (gtid, op)
            })
            .collect();
        loop {
            match self.store.apply(self.me, &batch) {
                Ok(()) => {
                    for (gtid, op) in &batch {
                        if matches!(op, BatchOp::Write { .. }) {
                            buf.mine.insert(*gtid);
                        }
                    }
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(r) if !r.fenced.is_empty() => {
                    return Err(self.latch(LogError::Fenced(format!(
                        "{} transaction(s) (first {}) were taken over by another coordinator, \
                         or removed, while this one was paused or cut off from the store past \
                         its lease; this coordinator stops deciding: restart it",
                        r.fenced.len(),
                        r.fenced[0]
                    ))));
                }
                Err(r) => {
                    for gtid in r.refused {
                        tracing::warn!(%gtid, "another coordinator started this transaction first; it is theirs");
                        buf.refuse(gtid);
                        batch.remove(&gtid);
                    }
                    if batch.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn renew(&self) -> bool {
        if *self.paused.borrow()
            || self.closed.load(Ordering::SeqCst)
            || self.halted.get().is_some()
        {
            return false;
        }
        if self.store.renew(self.me) {
            self.renewals.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.renewal_failures.fetch_add(1, Ordering::Relaxed);
        self.latch(LogError::Fenced(format!(
            "another process registered as instance {:?}: this one stops deciding",
            self.name
        )));
        false
    }

    async fn claim(&self, limit: usize, only: Option<Gtid>) -> Result<Vec<Gtid>, LogError> {
        self.gate().await?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(LogError::Halted("the process crashed".into()));
        }
        let claimed = self.store.claim_expired(self.me, limit, only);
        self.buffer().mine.extend(claimed.iter().copied());
        Ok(claimed)
    }

    /// A scan flushes first (as PgLog's), unless paused: then it reads
    /// the store as it is.
    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
        own: bool,
        back: bool,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.check()?;
        if !*self.paused.borrow() {
            self.flush_now()?;
        }
        let owner = own.then_some(self.me);
        Ok(self.store.scan(after, states, owner, back, limit))
    }
}

impl TxnLog for SharedMemLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.inner.check()?;
        let mut buf = self.inner.buffer();
        if buf.refused.contains(&record.gtid) {
            return Err(LogError::Refused(record.gtid));
        }
        buf.pending.insert(record.gtid, Op::Write(record.clone()));
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
        let forced = self.force();
        let (inner, gtid) = (self.inner.clone(), *gtid);
        Box::pin(async move {
            forced.await?;
            if inner.buffer().refused.contains(&gtid) {
                return Err(LogError::Refused(gtid));
            }
            Ok(())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn refused(&self, gtid: &Gtid) -> bool {
        self.inner.buffer().refused.contains(gtid)
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.inner.check()?;
        if let Some(op) = self.inner.buffer().pending.get(gtid) {
            return Ok(match op {
                Op::Write(r) => Some(r.clone()),
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
        self.inner.buffer().pending.insert(*gtid, Op::Remove);
        self.inner.wake.notify_one();
        Ok(())
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
