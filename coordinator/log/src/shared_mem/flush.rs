//! The state of one [`super::SharedMemLog`] incarnation and how it
//! reaches the store: the write buffer, the flush (one batch, all or
//! nothing, through the pause gate), renewal and claims.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use crate::LogError;
use crate::model::{Gtid, TxState, TxnRecord};
use crate::shared_store::{BatchOp, SharedStore};

/// How long a plain write waits for company before it is flushed (as
/// PgLog's flusher).
pub(super) const LINGER: Duration = Duration::from_millis(20);

/// How many refused gtids are remembered (the coordinator forgets each
/// at once; the set only has to outlive that).
const REFUSED_KEPT: usize = 4096;

/// One buffered change.
#[derive(Clone)]
pub(super) enum Op {
    /// A record; `first` for its transaction's first write.
    Write {
        record: Box<TxnRecord>,
        first: bool,
    },
    Remove,
}

#[derive(Default)]
pub(super) struct Buffer {
    /// Newest change per gtid, not flushed yet.
    pub(super) pending: BTreeMap<Gtid, Op>,
    /// Unfinished transactions this incarnation created (their first
    /// write is buffered or in the store): their later writes are
    /// updates. A record at a later epoch was claimed: never a first
    /// write, never kept here. (PgLog's `Buffer::created`.)
    pub(super) created: HashSet<Gtid>,
    /// First writes the store refused (another coordinator started the
    /// gtid first), the newest [`REFUSED_KEPT`].
    pub(super) refused: HashSet<Gtid>,
    pub(super) refused_order: VecDeque<Gtid>,
    /// Gtids a `force_txn` waits on (a count each): their refusal is kept
    /// past [`REFUSED_KEPT`] until it has been read.
    pub(super) pinned: HashMap<Gtid, usize>,
}

impl Buffer {
    /// A `force_txn` of `gtid` starts waiting.
    pub(super) fn pin(&mut self, gtid: Gtid) {
        *self.pinned.entry(gtid).or_default() += 1;
    }

    /// That `force_txn` read its answer: whether `gtid` was refused.
    pub(super) fn unpin(&mut self, gtid: &Gtid) -> bool {
        if let Some(n) = self.pinned.get_mut(gtid) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(gtid);
            }
        }
        self.refused.contains(gtid)
    }

    pub(super) fn refuse(&mut self, gtid: Gtid) {
        self.created.remove(&gtid);
        self.pending.remove(&gtid);
        if self.refused.insert(gtid) {
            self.refused_order.push_back(gtid);
            if self.refused_order.len() > REFUSED_KEPT
                && let Some(old) = self.refused_order.pop_front()
            {
                if self.pinned.contains_key(&old) {
                    // A force still has to read it: kept, evicted later.
                    self.refused_order.push_back(old);
                } else {
                    self.refused.remove(&old);
                }
            }
        }
    }
}

pub(super) struct Inner {
    pub(super) store: Arc<SharedStore>,
    pub(super) me: Uuid,
    pub(super) name: String,
    pub(super) buffer: Mutex<Buffer>,
    /// The failure that latched the log, if any.
    pub(super) halted: OnceLock<LogError>,
    pub(super) paused: Arc<crate::wake::Flag>,
    /// Crashed or dropped: nothing more of this incarnation reaches the
    /// store.
    pub(super) closed: AtomicBool,
    pub(super) stall: Mutex<Duration>,
    pub(super) fail_next: AtomicBool,
    /// The next flush pauses the incarnation first (with its batch still
    /// to send).
    pub(super) pause_at_flush: AtomicBool,
    pub(super) wake: Arc<Notify>,
    pub(super) forces: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) renewals: AtomicU64,
    pub(super) renewal_failures: AtomicU64,
}

impl Inner {
    pub(super) fn new(store: Arc<SharedStore>, me: Uuid, name: &str) -> Inner {
        Inner {
            store,
            me,
            name: name.to_string(),
            buffer: Mutex::new(Buffer::default()),
            halted: OnceLock::new(),
            paused: Arc::default(),
            closed: AtomicBool::new(false),
            stall: Mutex::new(Duration::ZERO),
            fail_next: AtomicBool::new(false),
            pause_at_flush: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            forces: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
        }
    }

    pub(super) fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Every mutation is a handful of map operations.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn check(&self) -> Result<(), LogError> {
        match self.halted.get() {
            Some(why) => Err(LogError::Halted(why.to_string())),
            None => Ok(()),
        }
    }

    /// Latches the log with `e` (the first failure wins).
    pub(super) fn latch(&self, e: LogError) -> LogError {
        let _ = self.halted.set(e.clone());
        e
    }

    /// Waits while paused, then as long as the injected stall.
    async fn gate(&self) -> Result<(), LogError> {
        self.paused.cleared().await;
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
    pub(super) async fn flush(&self) -> Result<(), LogError> {
        let before_latch = self.halted.get().is_none();
        if self.pause_at_flush.swap(false, Ordering::SeqCst) {
            self.paused.store(true);
        }
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
    pub(super) fn flush_now(&self) -> Result<(), LogError> {
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
                    Op::Write { record, first } => BatchOp::Write { record, first },
                };
                (gtid, op)
            })
            .collect();
        loop {
            match self.store.apply(self.me, &batch) {
                Ok(()) => {
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

    pub(super) fn renew(&self) -> bool {
        if self.paused.is_set() || self.closed.load(Ordering::SeqCst) || self.halted.get().is_some()
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

    pub(super) async fn claim(
        &self,
        limit: usize,
        only: Option<Gtid>,
    ) -> Result<Vec<Gtid>, LogError> {
        self.gate().await?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(LogError::Halted("the process crashed".into()));
        }
        Ok(self.store.claim_expired(self.me, limit, only))
    }

    /// A scan flushes first (as PgLog's), unless paused: then it reads
    /// the store as it is.
    pub(super) fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
        own: bool,
        back: bool,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.check()?;
        if !self.paused.is_set() {
            self.flush_now()?;
        }
        let owner = own.then_some(self.me);
        Ok(self.store.scan(after, states, owner, back, limit))
    }
}
