//! The durable transaction log: the [`TxnLog`] trait and its contract, a
//! sled-backed log ([`SledLog`], the default), an in-memory log for tests
//! ([`MemLog`]), the conformance suite every implementation must pass, the
//! store several coordinators share on PostgreSQL ([`PgLog`]) and in memory
//! for the cluster simulation ([`SharedStore`], [`SharedMemLog`]), and the
//! suite that checks both follow the same rules ([`shared_conformance`]).
//!
//! The crate (`tandem-log`) is the layer under the coordinator's runtime:
//! it knows the engine's record ([`tandem_engine::model`]) and nothing
//! above it. `PgLog` is behind the cargo feature `postgres`. [`wake`] holds
//! the wake-ups in replayable order that the in-memory shared log and the
//! runtime both wait on.

mod check;
mod codec;
pub mod conformance;
pub mod mark;
mod mem;
#[cfg(feature = "postgres")]
mod pg;
pub mod shared_conformance;
mod shared_mem;
mod shared_store;
mod sled_log;
mod tombstone;
mod unfinished;
pub mod wake;

use std::future::Future;
use std::pin::Pin;

pub use check::{LogReport, check_dir};
pub use mem::MemLog;
#[cfg(feature = "postgres")]
pub use pg::{ClusterStatus, InstanceStatus, PgLog, PgOptions, cluster_status};
pub use shared_mem::SharedMemLog;
pub use shared_store::{InstanceView, RowView, SharedStore, StoreClock};
pub use sled_log::SledLog;
pub use tombstone::{Horizon, Lookup, Purge, Tombstone, gtid_ms};

// The record the log stores, and its caller labels: the engine's.
use tandem_engine::{labels, model};

use crate::model::{Gtid, TxState, TxnRecord};

/// A failed log operation. Any of these latches the coordinator: it stops
/// deciding rather than trust a disk that failed once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The underlying store reported an error.
    #[error("log storage failed: {0}")]
    Storage(String),
    /// A stored record could not be decoded.
    #[error("log record for {gtid} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        gtid: String,
        /// What was wrong.
        detail: String,
    },
    /// The log on disk is damaged (records lost or unreadable); the message
    /// says what and what to do. Found at open: nothing was served.
    #[error("{0}")]
    Damaged(String),
    /// A shared store refused a write: another coordinator took the
    /// transaction over (this one was paused or cut off past its lease).
    #[error("{0}")]
    Fenced(String),
    /// A shared store refused the first write of a new transaction:
    /// another coordinator started one with the same (client-chosen) gtid
    /// first. Only this transaction is affected; the log does not latch.
    #[error(
        "transaction {0} is run by another coordinator (it started it first); ask that one, \
         or repeat the request here to get its outcome"
    )]
    Refused(Gtid),
    /// An earlier failure latched the log; it refuses all further work.
    #[error("log halted after an earlier failure: {0}")]
    Halted(String),
}

/// A future returned by [`TxnLog::force`].
pub type ForceFuture = Pin<Box<dyn Future<Output = Result<(), LogError>> + Send + 'static>>;

/// A future returned by [`TxnLog::take_over_expired`].
pub type TakeOverFuture =
    Pin<Box<dyn Future<Output = Result<Vec<Gtid>, LogError>> + Send + 'static>>;

/// Where the coordinator keeps transaction records.
///
/// # Durability contract
///
/// - [`write`](TxnLog::write) replaces the whole record for `record.gtid`. It
///   is visible to [`get`](TxnLog::get) and [`scan`](TxnLog::scan) as soon as
///   it returns, but it is **not durable** yet: a crash may lose it.
/// - [`force`](TxnLog::force) resolves `Ok` only once every `write` that
///   returned before `force` was called is on stable storage (survives a
///   process crash and a power loss). Concurrent `force` calls may be served
///   by one physical flush (group commit).
/// - Writes are never reordered: after a crash the log holds, for each
///   record, either the last write covered by a successful `force` or a later
///   write.
/// - An `Err` from any method means the store can no longer be trusted; the
///   implementation must keep failing (latch) and the caller stops deciding.
///
/// The coordinator relies on this as follows (DESIGN.md, presumed abort): a
/// commit decision is `write` + `force` before any phase-2 call; everything
/// else (new branches, votes, aborts, phase-2 progress) is a plain `write`,
/// because losing it can only turn into an abort or a repeated phase-2 call.
pub trait TxnLog: Send + Sync + 'static {
    /// Stores `record`, replacing any earlier version. Not durable until a
    /// later [`force`](TxnLog::force) resolves.
    fn write(&self, record: &TxnRecord) -> Result<(), LogError>;

    /// Makes every earlier `write` durable; see the contract above.
    fn force(&self) -> ForceFuture;

    /// As [`force`](TxnLog::force), and then fails with
    /// [`LogError::Refused`] if the store refused `gtid`'s record (a shared
    /// store where another coordinator started the same gtid first): what
    /// the caller was about to announce is not durable *as its own*.
    fn force_txn(&self, gtid: &Gtid) -> ForceFuture {
        let _ = gtid;
        self.force()
    }

    /// Whether several coordinators share this store: then a new
    /// transaction is made visible to the others before its gtid is given
    /// out, and requests may belong to another instance.
    fn shared(&self) -> bool {
        false
    }

    /// Whether this log was opened over an earlier incarnation's data and a
    /// crash of that incarnation may have dropped writes it never forced
    /// (a start is not forced on a local log): then a client-chosen gtid
    /// with no record may still have had phase 1 sent (DESIGN.md rule 3a's
    /// exception). A log that never loses a write, or a fresh one, says no.
    fn may_have_lost_starts(&self) -> bool {
        !self.shared()
    }

    /// The store's own clock (ms since the Unix epoch) on a store several
    /// coordinators share; `None` for a log only this one uses. Every
    /// instance's clock must stay within
    /// the coordinator's `MAX_CLOCK_OFFSET` of it.
    fn store_now_ms(&self) -> Result<Option<u64>, LogError> {
        Ok(None)
    }

    /// Whether the store refused `gtid`'s record (see
    /// [`LogError::Refused`]); the coordinator then forgets it.
    fn refused(&self, gtid: &Gtid) -> bool {
        let _ = gtid;
        false
    }

    /// The latest record for `gtid`, or `None`.
    fn get(&self, gtid: &Gtid) -> Result<Option<TxnRecord>, LogError>;

    /// Records in gtid order (creation order), starting strictly after
    /// `after` when given, keeping only those whose state is in `states`
    /// (all when empty), at most `limit`.
    fn scan(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError>;

    /// As [`scan`](TxnLog::scan), newest first: records in reverse gtid
    /// order, strictly before `before` when given (operators' "what
    /// happened last"). The default reads forward and keeps the last
    /// `limit`; stores override it with a reverse read.
    fn scan_back(
        &self,
        before: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        let mut kept = std::collections::VecDeque::with_capacity(limit.min(1024));
        let mut after = None;
        loop {
            let page = self.scan(after.as_ref(), states, 1024)?;
            let Some(last) = page.last() else { break };
            after = Some(last.gtid);
            let full = page.len() == 1024;
            for rec in page {
                if before.is_some_and(|b| rec.gtid >= *b) {
                    return Ok(kept.into_iter().rev().collect());
                }
                if kept.len() == limit {
                    kept.pop_front();
                }
                if limit > 0 {
                    kept.push_back(rec);
                }
            }
            if !full {
                break;
            }
        }
        Ok(kept.into_iter().rev().collect())
    }

    /// As [`scan`](TxnLog::scan), but only the records this coordinator
    /// owns: what it recovers at start. A log only one coordinator uses
    /// owns everything in it.
    fn scan_own(
        &self,
        after: Option<&Gtid>,
        states: &[TxState],
        limit: usize,
    ) -> Result<Vec<TxnRecord>, LogError> {
        self.scan(after, states, limit)
    }

    /// Takes over up to `limit` unfinished transactions of other
    /// coordinators whose lease has expired, and returns their gtids for
    /// recovery. A log only one coordinator uses has none.
    fn take_over_expired(&self, limit: usize) -> TakeOverFuture {
        let _ = limit;
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Takes over `gtid` alone if it is unfinished and its owner's lease
    /// expired (a request for it came here); returns it if claimed.
    fn take_over(&self, gtid: &Gtid) -> TakeOverFuture {
        let _ = gtid;
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// Makes "no record, so abort" durable for `marker.gtid` on a shared
    /// store before anyone is told abort: writes `marker` (an aborted
    /// record owned by nobody, at epoch 1) unless a record of the gtid is
    /// there, straight to the store. A coordinator that began the gtid
    /// writes it first at its decision (DESIGN.md, "One forced write per
    /// transaction"); that first write then finds this row and is refused,
    /// so what was presumed aborted never commits. Not written when the
    /// retention horizon covers the gtid ([`Presumed::Forgotten`]).
    ///
    /// The default, for a log only this coordinator uses: nothing to write
    /// (its own starts are in its own memory), [`Presumed::Aborted`].
    fn presume_abort(&self, marker: &TxnRecord) -> Result<Presumed, LogError> {
        let _ = marker;
        Ok(Presumed::Aborted)
    }

    /// The coordinator that began `gtid`, refused because its gtid was
    /// presumed aborted (a [`TxnLog::presume_abort`] row), aborts it
    /// itself: the refusal is lifted, and its next write, deciding abort,
    /// replaces the presumed row (a first write deciding commit never
    /// does). No-op on a log only this coordinator uses.
    fn accept_presumed_abort(&self, gtid: &Gtid) {
        let _ = gtid;
    }

    /// Who drives `gtid` on a shared store; `None` on a log only one
    /// coordinator uses, or when there is no record.
    fn locate(&self, gtid: &Gtid) -> Result<Option<Ownership>, LogError> {
        let _ = gtid;
        Ok(None)
    }

    /// Removes the record of `gtid` and its payloads. Removing an unknown
    /// gtid is not an error. A shared store removes a row only if it is
    /// finished when the removal lands (one another coordinator still
    /// drives stays). Retention does not use it (it uses
    /// [`purge`](TxnLog::purge), which keeps what must not be forgotten). Not durable
    /// until a later `force` (or never, harmlessly: a removal that is lost
    /// only brings back a finished record).
    fn remove(&self, gtid: &Gtid) -> Result<(), LogError>;

    /// Whether this log keeps [`Tombstone`]s and the [`Horizon`]
    /// ([`purge`](TxnLog::purge) and the methods below). Retention removes
    /// nothing from a log that does not: what it would forget could then
    /// be answered the wrong way (DESIGN.md, "What retention may forget").
    fn compacts(&self) -> bool {
        false
    }

    /// Retention's removal: for each of `purges`, its tombstone (if any)
    /// is stored, the horizon's `purged_ms` raised to cover its gtid, and
    /// its record and payloads removed, but only while the record is
    /// finished (COMMITTED / ABORTED); a record in any other state is left
    /// as it is (the tombstone and horizon are still kept, harmlessly).
    /// All of it at once to every reader, here and (on a shared store) at
    /// every other coordinator, and across a crash: a reader or a restart
    /// never finds a record gone while its tombstone or the horizon that
    /// covers it is missing. Durable no later than the next
    /// [`force`](TxnLog::force) resolves.
    ///
    /// The default (a log that does not compact) refuses.
    fn purge(&self, purges: &[Purge]) -> Result<(), LogError> {
        let _ = purges;
        Err(LogError::Storage(
            "this log keeps no decision tombstones; retention must not remove from it".into(),
        ))
    }

    /// The tombstone of `gtid`, if retention compacted its record into
    /// one and it has not expired. Seen by every coordinator of a shared
    /// store as soon as [`purge`](TxnLog::purge) returned.
    fn tombstone(&self, gtid: &Gtid) -> Result<Option<Tombstone>, LogError> {
        let _ = gtid;
        Ok(None)
    }

    /// How far retention has forgotten (both bounds only ever rise).
    fn horizon(&self) -> Result<Horizon, LogError> {
        Ok(Horizon::default())
    }

    /// Removes up to `limit` tombstones whose transaction finished before
    /// `finished_before_ms`, oldest gtid first, raising the horizon's
    /// `forgotten_ms` to cover each, at once to every reader and across a
    /// crash (as [`purge`](TxnLog::purge)); returns how many it removed.
    fn expire_tombstones(&self, finished_before_ms: u64, limit: usize) -> Result<usize, LogError> {
        let _ = (finished_before_ms, limit);
        Ok(0)
    }

    /// What a start with the client-chosen `gtid` finds: its record, or
    /// whether retention may have removed one. The record is read first
    /// and the horizon after it, so a record removed in between is seen
    /// as [`Lookup::Purged`] (a store may read both at once instead).
    fn lookup(&self, gtid: &Gtid) -> Result<Lookup, LogError> {
        if let Some(rec) = self.get(gtid)? {
            return Ok(Lookup::Record(Box::new(rec)));
        }
        Ok(if self.horizon()?.may_have_purged(gtid) {
            Lookup::Purged
        } else {
            Lookup::Unknown
        })
    }

    /// Counters for operators and the benchmark.
    fn stats(&self) -> LogStats {
        LogStats::default()
    }
}

/// What [`TxnLog::presume_abort`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presumed {
    /// There was no record: the aborted one is now durable in its place.
    Aborted,
    /// A record is there (written first): the answer comes from it.
    Found(Box<TxnRecord>),
    /// No record, and the retention horizon covers the gtid: nothing may
    /// be written for it.
    Forgotten,
}

/// Who drives a transaction on a store several coordinators share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// This coordinator (this incarnation of it).
    pub here: bool,
    /// The owner still holds its lease (or the transaction is finished).
    pub live: bool,
    /// The owner's instance name (empty once it left the cluster).
    pub name: String,
    /// Where the owner serves (its advertised address).
    pub address: String,
    /// The transaction's epoch.
    pub epoch: u64,
}

/// What a log has done since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `force` calls served.
    pub forces: u64,
    /// Physical flushes (fsyncs) made to serve them; `forces / flushes` is the
    /// average group-commit batch.
    pub flushes: u64,
    /// Lease renewals that reached a shared store (0 for a local log).
    pub lease_renewals: u64,
    /// Lease renewals that failed (the store unreachable or refusing).
    pub lease_renewal_failures: u64,
}
