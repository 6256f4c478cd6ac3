//! [`PgLog`]: the transaction log on PostgreSQL, which several coordinators
//! can share.
//!
//! # Writes and group commit
//!
//! [`TxnLog::write`] is called with a transaction locked, so it must not
//! wait for the network: it puts the record in a buffer (the newest
//! version per gtid) and returns. A flusher on the log's own I/O thread
//! writes the buffer to PostgreSQL in one transaction (one multi-row
//! upsert), whenever a [`TxnLog::force`] waits or a few milliseconds after
//! a plain write. Every `force` that arrives while a flush runs is served
//! by the next one, so concurrent decisions share one PostgreSQL commit.
//! A commit decision is durable when that commit returns: the database must
//! run with `synchronous_commit = on` (the default; with a synchronous
//! standby, see docs/book/src/cluster.md, on both).
//!
//! Reads see the buffer first, then the database. `scan` flushes the
//! buffer before it reads, so it never misses a write.
//!
//! # Ownership and fencing
//!
//! Each coordinator process is an *incarnation* (a fresh UUID) of an
//! *instance name*. A transaction row carries `owner` (the incarnation
//! driving it) and `epoch` (bumped by every takeover); its lease is its
//! owner's (`tandem_instances.lease_until`, on the database's clock,
//! renewed by a one-row statement per period, whatever the owner holds).
//! Only a transaction's first write may create its row; every later write
//! is an update conditional on `owner = this incarnation` at the epoch the
//! record carries, and a row's `decision` is written once: a write that
//! would change it is refused. A later write refused (the row is another
//! owner's, at another epoch, or gone: retention removed it after another
//! coordinator finished it) means another coordinator took the
//! transaction over while this one was paused or cut off: the log latches
//! ([`LogError::Fenced`]) and this coordinator stops deciding, so nothing
//! it still holds in memory can reach the store or, after a decision, a
//! participant. At start an incarnation takes over the unfinished rows of
//! earlier incarnations of its name at once (a restart); rows of other
//! instances are taken over when their owner's lease has expired
//! ([`PgLog::take_over_expired`]).

mod cluster;
mod flush;
mod io;
mod lease;
mod presume;
mod read;
mod schema;
mod tombstone;

pub use cluster::{ClusterStatus, InstanceStatus, cluster_status};

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    ForceFuture, Horizon, LogError, LogStats, Lookup, Ownership, Presumed, Purge, TakeOverFuture,
    Tombstone, TxnLog, codec,
};
use crate::model::{Gtid, TxState, TxnRecord};

/// How to reach the store and who this coordinator is in it.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user@host:port/db?sslmode=…` or `host=… dbname=…`;
    /// several hosts with `target_session_attrs=read-write` follow a
    /// promoted standby.
    pub url: String,
    /// This instance's name (unique in the cluster; a restart under the
    /// same name takes over the previous process's transactions at once).
    pub name: String,
    /// The address clients reach this instance at (shown to operators and
    /// in redirects).
    pub address: String,
    /// How long a transaction stays this instance's without a renewal;
    /// renewed every third of it.
    pub lease: Duration,
    /// How long a flush or read retries a store that does not answer
    /// (connection lost, failover in progress) before the log latches.
    pub store_timeout: Duration,
    /// Connections to the store.
    pub pool_size: usize,
}

impl PgOptions {
    /// Options with the defaults: a 10 s lease, 30 s store timeout, 8
    /// connections.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            name: name.into(),
            address: String::new(),
            lease: Duration::from_secs(10),
            store_timeout: Duration::from_secs(30),
            pool_size: 8,
        }
    }
}

/// One buffered change of a record.
#[derive(Clone)]
enum Op {
    Write(Arc<Pending>),
    Remove,
}

/// A record waiting to be flushed, with the payloads that go with it.
struct Pending {
    record: TxnRecord,
    /// Payloads stored apart that the store does not have yet.
    payloads: Vec<(u32, Bytes)>,
    /// The transaction's first write: the only one that may create its
    /// row. Every later write updates the row this incarnation created or
    /// claimed, and is fenced when that row is gone or is not its own.
    first: bool,
}

/// What the flusher has not written yet.
#[derive(Default)]
pub(super) struct Buffer {
    /// Newest change per gtid, not yet taken by a flush.
    pending: BTreeMap<Gtid, Op>,
    /// Taken by the flush in progress (read until it commits).
    inflight: BTreeMap<Gtid, Op>,
    /// Per unfinished record: how many branches' payloads were queued.
    payloads_queued: HashMap<Gtid, u32>,
    /// Forces waiting for the next flush.
    waiters: Vec<oneshot::Sender<Result<(), LogError>>>,
    /// New transactions whose first write the store refused (another
    /// coordinator started the same gtid first), the newest
    /// [`REFUSED_KEPT`] of them.
    refused: HashSet<Gtid>,
    refused_order: VecDeque<Gtid>,
    /// Gtids a `force_txn` waits on (a count each): their refusal is kept
    /// past [`REFUSED_KEPT`] until it has been read, or it could be
    /// evicted before and the force taken for a success.
    pub(super) pinned: HashMap<Gtid, usize>,
    /// Unfinished transactions this incarnation created (its first write
    /// is buffered, in flight or in the store): their later writes are
    /// updates. A record at a later epoch was claimed, so it is never a
    /// first write and is not kept here.
    created: HashSet<Gtid>,
}

/// How many refused gtids are remembered (each is forgotten by the
/// coordinator at once; the set only has to outlive that).
const REFUSED_KEPT: usize = 4096;

impl Buffer {
    /// A `force_txn` of `gtid` starts waiting.
    fn pin(&mut self, gtid: Gtid) {
        *self.pinned.entry(gtid).or_default() += 1;
    }

    /// That `force_txn` read its answer: whether `gtid` was refused.
    fn unpin(&mut self, gtid: &Gtid) -> bool {
        if let Some(n) = self.pinned.get_mut(gtid) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(gtid);
            }
        }
        self.refused.contains(gtid)
    }

    pub(super) fn refuse(&mut self, gtid: Gtid) {
        self.payloads_queued.remove(&gtid);
        self.created.remove(&gtid);
        self.pending.remove(&gtid);
        // Never durable as ours: reads must go to the store's record.
        self.inflight.remove(&gtid);
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

/// State shared by the handle and the I/O thread.
struct Shared {
    options: PgOptions,
    incarnation: Uuid,
    buffer: Mutex<Buffer>,
    wake: tokio::sync::Notify,
    halted: OnceLock<String>,
    forces: AtomicU64,
    flushes: AtomicU64,
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
    /// Set by [`PgLog::pause_renewals`]: the renewer skips its turns.
    renewals_paused: std::sync::atomic::AtomicBool,
    /// The newest retention horizon's `purged_ms` any read saw (reads of
    /// records read it in the same statement; it only ever rises).
    purged_seen: AtomicU64,
    /// No claims of others' leases before this: set a lease ahead on every
    /// failed renewal, so after a store outage (when every lease has run
    /// out) the live instances renew theirs before anyone claims.
    claims_paused_until: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // Every mutation is a handful of map operations: a panic cannot
        // leave it half done.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), LogError> {
        match self.halted.get() {
            Some(why) => Err(LogError::Halted(why.clone())),
            None => Ok(()),
        }
    }

    /// Latches the log with `e` (the first failure wins) and fails every
    /// waiting force.
    fn latch(&self, e: LogError) -> LogError {
        let why = self.halted.get_or_init(|| e.to_string()).clone();
        let waiters = std::mem::take(&mut self.buffer().waiters);
        for w in waiters {
            let _ = w.send(Err(LogError::Halted(why.clone())));
        }
        e
    }
}

/// The PostgreSQL-backed log. See the module docs.
pub struct PgLog {
    shared: Arc<Shared>,
    io: io::IoHandle,
}

impl PgLog {
    /// Largest branch payload the store takes (as [`super::SledLog`]).
    pub const MAX_PAYLOAD_BYTES: usize = super::SledLog::MAX_PAYLOAD_BYTES;

    /// Connects, brings the schema up to date, registers this incarnation
    /// and takes over the unfinished transactions of earlier incarnations
    /// of its name. Blocks until done (it runs before serving).
    ///
    /// # Errors
    ///
    /// [`LogError::Storage`] when the store cannot be reached within the
    /// store timeout or the schema cannot be brought up to date.
    pub fn open(options: PgOptions) -> Result<Self, LogError> {
        let shared = Arc::new(Shared {
            options,
            incarnation: Uuid::now_v7(),
            buffer: Mutex::new(Buffer::default()),
            wake: tokio::sync::Notify::new(),
            halted: OnceLock::new(),
            forces: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            renewals_paused: std::sync::atomic::AtomicBool::new(false),
            purged_seen: AtomicU64::new(0),
            claims_paused_until: Mutex::new(None),
        });
        let io = io::IoHandle::start(shared.clone())?;
        Ok(PgLog { shared, io })
    }

    /// This process's incarnation (the `owner` of its rows).
    pub fn incarnation(&self) -> Uuid {
        self.shared.incarnation
    }

    /// Stops (or resumes) renewing this incarnation's heartbeat and
    /// leases while everything else goes on: for tests, a process that
    /// stalled past its lease without knowing it
    /// ([`super::shared_conformance`]).
    pub fn pause_renewals(&self, paused: bool) {
        self.shared.renewals_paused.store(paused, Ordering::SeqCst);
    }

    /// The cluster as the store sees it: every registered instance, what
    /// it owns and how many leases wait to be taken over.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn cluster(&self) -> Result<ClusterStatus, LogError> {
        self.io.cluster().await
    }
}

/// Waits for `rx` from synchronous code, letting the runtime move other
/// tasks off this thread while it blocks when that is possible.
fn wait<T>(rx: std::sync::mpsc::Receiver<Result<T, LogError>>) -> Result<T, LogError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let answer = match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| rx.recv().ok())
        }
        _ => rx.recv().ok(),
    };
    answer.unwrap_or_else(|| Err(LogError::Halted("the log was closed".into())))
}

impl PgLog {
    /// `scan`, of every record or (`own`) only of this incarnation's.
    fn scan_by(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
        own: bool,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.shared.check()?;
        wait(
            self.io
                .scan(after.copied(), states.to_vec(), limit, own, false),
        )
    }
}

impl TxnLog for PgLog {
    fn write(&self, record: &TxnRecord) -> Result<(), LogError> {
        self.shared.check()?;
        let mut guard = self.shared.buffer();
        let buf = &mut *guard;
        if buf.refused.contains(&record.gtid) {
            return Err(LogError::Refused(record.gtid));
        }
        let queued = buf.payloads_queued.entry(record.gtid).or_insert(0);
        let mut payloads: Vec<(u32, Bytes)> = record
            .branches
            .iter()
            .filter(|b| b.id > *queued && codec::stored_apart(&b.payload))
            .map(|b| (b.id, b.payload.clone()))
            .collect();
        *queued = (*queued).max(record.branches.len() as u32);
        if record.state.is_terminal() {
            buf.payloads_queued.remove(&record.gtid);
        }
        // A newer version replaces an unflushed older one; the payloads
        // that one carried still have to go, and if it was the first
        // write, so is this (the row is not there yet).
        let first = match buf.pending.get(&record.gtid) {
            Some(Op::Write(older)) => {
                for p in &older.payloads {
                    if !payloads.iter().any(|q| q.0 == p.0) {
                        payloads.push(p.clone());
                    }
                }
                older.first
            }
            // Written or in flight before (the flush that carries it creates
            // the row or latches), claimed (a later epoch), or new.
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
            Op::Write(Arc::new(Pending {
                record: record.clone(),
                payloads,
                first,
            })),
        );
        drop(guard);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn force(&self) -> ForceFuture {
        self.shared.forces.fetch_add(1, Ordering::Relaxed);
        let rx = match self.shared.check() {
            Err(e) => return Box::pin(std::future::ready(Err(e))),
            Ok(()) => {
                let (tx, rx) = oneshot::channel();
                self.shared.buffer().waiters.push(tx);
                rx
            }
        };
        // A latch between the check and the push would leave the waiter
        // unanswered: look again.
        if let Err(e) = self.shared.check() {
            self.shared.latch(e);
        }
        self.shared.wake.notify_one();
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(LogError::Halted("the log was closed".into())))
        })
    }

    fn force_txn(&self, gtid: &Gtid) -> ForceFuture {
        self.shared.buffer().pin(*gtid);
        let forced = self.force();
        let (shared, gtid) = (self.shared.clone(), *gtid);
        Box::pin(async move {
            let forced = forced.await;
            // Read (and unpinned) whatever the force's outcome.
            let refused = shared.buffer().unpin(&gtid);
            forced?;
            if refused {
                return Err(LogError::Refused(gtid));
            }
            Ok(())
        })
    }

    fn refused(&self, gtid: &Gtid) -> bool {
        self.shared.buffer().refused.contains(gtid)
    }

    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError> {
        self.shared.check()?;
        {
            let buf = self.shared.buffer();
            if let Some(op) = buf.pending.get(gtid).or_else(|| buf.inflight.get(gtid)) {
                return Ok(match op {
                    Op::Write(p) => Some(p.record.clone()),
                    Op::Remove => None,
                });
            }
        }
        wait(self.io.get(*gtid))
    }

    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.scan_by(after, states, limit, false)
    }

    fn scan_back(
        &self,
        before: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.shared.check()?;
        wait(
            self.io
                .scan(before.copied(), states.to_vec(), limit, false, true),
        )
    }

    fn scan_own(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.scan_by(after, states, limit, true)
    }

    fn remove(&self, gtid: &Gtid) -> Result<(), LogError> {
        self.shared.check()?;
        let mut buf = self.shared.buffer();
        buf.payloads_queued.remove(gtid);
        buf.created.remove(gtid);
        buf.pending.insert(*gtid, Op::Remove);
        drop(buf);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn store_now_ms(&self) -> Result<Option<u64>, LogError> {
        self.read_store_clock().map(Some)
    }

    fn compacts(&self) -> bool {
        true
    }

    fn purge(&self, purges: &[Purge]) -> Result<(), LogError> {
        self.purge_rows(purges)
    }

    fn tombstone(&self, gtid: &Gtid) -> Result<Option<Tombstone>, LogError> {
        self.read_tombstone(*gtid)
    }

    fn horizon(&self) -> Result<Horizon, LogError> {
        self.read_horizon()
    }

    fn expire_tombstones(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        self.expire(finished_before_ms, limit)
    }

    fn lookup(&self, gtid: &Gtid) -> Result<Lookup, LogError> {
        self.lookup_one(gtid)
    }

    fn take_over_expired(&self, limit: usize) -> TakeOverFuture {
        self.io.take_over(limit, None)
    }

    fn take_over(&self, gtid: &Gtid) -> TakeOverFuture {
        self.io.take_over(1, Some(*gtid))
    }

    fn locate(&self, gtid: &Gtid) -> Result<Option<Ownership>, LogError> {
        self.shared.check()?;
        wait(self.io.locate(*gtid))
    }

    fn presume_abort(&self, marker: &TxnRecord) -> Result<Presumed, LogError> {
        self.presume(marker)
    }

    fn accept_presumed_abort(&self, gtid: &Gtid) {
        let mut buf = self.shared.buffer();
        buf.refused.remove(gtid);
        buf.refused_order.retain(|g| g != gtid);
    }

    fn stats(&self) -> LogStats {
        LogStats {
            forces: self.shared.forces.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            lease_renewals: self.shared.renewals.load(Ordering::Relaxed),
            lease_renewal_failures: self.shared.renewal_failures.load(Ordering::Relaxed),
        }
    }
}
