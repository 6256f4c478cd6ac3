//! The barrier: makes handlers safe against repeated and disordered calls.
//!
//! The coordinator calls phase 2 until it hears an acknowledgement, so a
//! participant can see the same confirm twice (the first reply was lost),
//! a cancel for a try that never arrived (the try timed out in the network),
//! or a try arriving *after* its cancel (the try was delayed). A handler
//! written naively spends money twice, or reserves funds nobody will ever
//! release. The barrier sits in front of every handler call and keeps, per
//! branch `(gtid, branch_id)`, one small record ([`Mark`]) in a
//! [`BarrierStore`]:
//!
//! | record \ call | try / prepare | confirm / commit | cancel / rollback | deliver (message) |
//! |---|---|---|---|---|
//! | none | **run**; `Tried` is stored first | refused | not run; `EmptyCancelled` stored | **run**; `Tried` is stored first, then `Confirmed` |
//! | `Tried` | refused (tries are not repeated; the first run's work stays held) | **run**; then `Confirmed` | **run**; then `Cancelled` | **run** (an earlier delivery started but did not finish); then `Confirmed` |
//! | `Refused` (try voted no) | refused | refused | not run; `Cancelled` stored | refused |
//! | `Confirmed` | refused | not run (repeat) | refused | not run (repeat) |
//! | `Cancelled`, `EmptyCancelled` | refused (anti-hanging) | refused | not run (repeat) | refused (not a delivery's record) |
//!
//! [`decide`] is that table as code, in the gate (`gate.rs`), the one place
//! every store's calls pass. Calls for one branch are serialised by the
//! store, so sixteen concurrent confirms run the handler once; a store
//! offers only that serialisation ([`BarrierStore::enter`]) and an atomic
//! write of a branch's record over the mark it read
//! ([`BarrierEntry::compare_and_set`]).
//!
//! Before the table, the epoch rule ([`stale_epoch`]): every call carries
//! the coordinator's epoch for the transaction (1, one more after every
//! takeover by another coordinator of a shared store), each record keeps
//! the highest seen, and a call from an older epoch is refused whatever it
//! asks (a no vote, or `FAILED_PRECONDITION`): a coordinator that was
//! paused past its lease cannot act behind its successor's back. Epoch 0
//! is never refused.
//!
//! # The window, and how to close it
//!
//! The record of a confirm or cancel is written *after* the handler returns.
//! If the process dies between the two, the coordinator's retry runs the
//! handler again; so a handler whose state lives elsewhere must still
//! tolerate a repeat in that window (say, by keying its change on
//! `(gtid, branch_id)`). A handler whose state lives in the same store closes
//! the window: with [`SledBarrier::transaction`] the business write and the
//! record commit in one sled transaction, so both happen or neither does.
//!
//! A try's `Tried` record is stored *before* the handler runs: a cancel that
//! follows a crashed or failed try then runs the handler's cancel, which must
//! release whatever part of the try happened (possibly nothing). A cancel is
//! skipped only when no try started, or the try voted no (a no holds nothing).
//!
//! A repeated try is refused, even when the first run voted yes and its
//! work is still held: the no aborts the transaction, and the coordinator
//! rolls back every branch that voted no (a no is not taken to mean that
//! nothing is held), so the cancel that follows runs the handler on the
//! `Tried` record and releases the first run's work. Replaying the first
//! yes instead would let a transaction commit that may already have been
//! told ABORT: a coordinator that lost an unforced `Submit` answers
//! `GetOutcome` with presumed abort, and in-doubt resolution (here or in
//! another replica) may be about to cancel the branch when the client's
//! repeat of that `Submit` arrives. (Repeats after a coordinator crash:
//! DESIGN.md, rule 3.)
//!
//! A delivery of a transactional message ([`Phase::Deliver`]) has a single
//! phase: it comes only after the message is decided, and again until it is
//! acknowledged. It stores `Tried` before the handler runs, as a try does,
//! and `Confirmed` after, as a confirm does: a repeat after `Confirmed` is
//! not run again, and a delivery that failed or crashed midway (its record
//! still `Tried`) runs again. So a handler writing its change in the
//! barrier's store ([`SledBarrier::transaction`],
//! [`PgBarrier::begin`](crate::postgres::PgBarrier::begin)), which finds
//! the `Tried` record it expects and commits `Confirmed` with the change,
//! takes a message exactly once.
//!
//! Records of finished branches are removed after a retention period by
//! [`spawn_retention`]; `Tried` records are never removed, since their branch
//! still waits for its outcome.

pub(crate) mod locks;
mod mem;
mod retention;
#[cfg(feature = "sled")]
mod sled;

pub mod conformance;
pub(crate) mod gate;

use std::future::Future;
use std::pin::Pin;

pub use gate::{Step, decide, stale_epoch};
pub use mem::MemBarrier;
pub use retention::{Retention, spawn_retention};
#[cfg(feature = "sled")]
pub use sled::SledBarrier;

use crate::Gtid;

/// A boxed, sendable future, as the store methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which call of a branch is being made. 2PC calls map onto the TCC names:
/// prepare is [`Phase::Try`], commit is [`Phase::Confirm`], rollback is
/// [`Phase::Cancel`]; a saga's action is a try, its compensation a cancel.
/// A transactional message's delivery is [`Phase::Deliver`] (its
/// back-check does not pass the barrier, and its handler sees
/// [`Phase::Try`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Try (TCC) or prepare (2PC): reserve the resource and vote.
    Try,
    /// Confirm (TCC) or commit (2PC): use what the try reserved.
    Confirm,
    /// Cancel (TCC) or rollback (2PC): release what the try reserved.
    Cancel,
    /// The delivery of a transactional message (`Participant.Deliver`),
    /// sent once the message is decided and repeated until acknowledged.
    Deliver,
}

impl Phase {
    /// The record a successful handler call leaves, if it leaves one.
    pub fn done_mark(self) -> Option<Mark> {
        match self {
            Phase::Try => None,
            Phase::Confirm => Some(Mark::Confirmed),
            Phase::Cancel => Some(Mark::Cancelled),
            Phase::Deliver => Some(Mark::Confirmed),
        }
    }
}

/// What the barrier knows about one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mark {
    /// A try started (it may have failed or not finished). Waiting for
    /// confirm or cancel. For a delivery: it started and did not finish.
    Tried,
    /// The try voted no: it holds nothing.
    Refused,
    /// The confirm (or the delivery) ran to completion.
    Confirmed,
    /// The cancel ran to completion (or was not needed after a no).
    Cancelled,
    /// A cancel arrived before any try: nothing was done, and a try arriving
    /// later is refused.
    EmptyCancelled,
}

impl Mark {
    /// Whether the branch needs nothing more; only such records are removed
    /// by retention.
    pub fn is_finished(self) -> bool {
        self != Mark::Tried
    }

    /// One byte, for stores.
    pub fn code(self) -> u8 {
        match self {
            Mark::Tried => 1,
            Mark::Refused => 2,
            Mark::Confirmed => 3,
            Mark::Cancelled => 4,
            Mark::EmptyCancelled => 5,
        }
    }

    /// The inverse of [`Mark::code`].
    pub fn from_code(code: u8) -> Option<Mark> {
        Some(match code {
            1 => Mark::Tried,
            2 => Mark::Refused,
            3 => Mark::Confirmed,
            4 => Mark::Cancelled,
            5 => Mark::EmptyCancelled,
            _ => return None,
        })
    }
}

/// Identifies a branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    /// The global transaction.
    pub gtid: Gtid,
    /// The branch within it.
    pub branch_id: u32,
}

impl BranchKey {
    /// 20 bytes that sort like the key: gtid, then branch id big-endian.
    pub fn to_bytes(self) -> [u8; 20] {
        let mut key = [0u8; 20];
        key[..16].copy_from_slice(self.gtid.as_bytes());
        key[16..].copy_from_slice(&self.branch_id.to_be_bytes());
        key
    }

    /// The inverse of [`BranchKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<BranchKey> {
        let gtid = Gtid::from_slice(bytes.get(..16)?).ok()?;
        let branch: [u8; 4] = bytes.get(16..20)?.try_into().ok()?;
        (bytes.len() == 20).then_some(BranchKey {
            gtid,
            branch_id: u32::from_be_bytes(branch),
        })
    }
}

/// A stored barrier record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarrierRecord {
    /// What is known.
    pub mark: Mark,
    /// When it was stored (Unix ms); retention counts from here.
    pub updated_ms: u64,
    /// The highest coordinator epoch seen for the branch (0: none).
    pub epoch: u64,
}

impl BarrierRecord {
    /// 17 bytes: the mark's code, `updated_ms` and `epoch`, big-endian.
    pub fn encode(self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[0] = self.mark.code();
        out[1..9].copy_from_slice(&self.updated_ms.to_be_bytes());
        out[9..].copy_from_slice(&self.epoch.to_be_bytes());
        out
    }

    /// The inverse of [`BarrierRecord::encode`]; `None` if malformed. The
    /// 9-byte records of earlier versions read with epoch 0.
    pub fn decode(bytes: &[u8]) -> Option<BarrierRecord> {
        let mark = Mark::from_code(*bytes.first()?)?;
        let ms: [u8; 8] = bytes.get(1..9)?.try_into().ok()?;
        let epoch = match bytes.len() {
            9 => 0,
            17 => u64::from_be_bytes(bytes.get(9..17)?.try_into().ok()?),
            _ => return None,
        };
        Some(BarrierRecord {
            mark,
            updated_ms: u64::from_be_bytes(ms),
            epoch,
        })
    }
}

/// A barrier store failed; the call is answered UNAVAILABLE and retried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("barrier store: {0}")]
pub struct BarrierError(pub String);

/// The error of a [`BarrierEntry::compare_and_set`] that found another mark
/// than `from` (`None`: no record).
pub(crate) fn changed(key: BranchKey, from: Option<Mark>) -> BarrierError {
    BarrierError(format!(
        "barrier: the record of branch {} of {} changed under its lock \
         (expected {from:?}); not overwriting it",
        key.branch_id, key.gtid
    ))
}

/// One call's hold on a branch, from [`BarrierStore::enter`]. Other calls for
/// the same branch wait until it is dropped.
///
/// A store implements only the atomic steps; what to write, and when, is
/// decided once for every store by the gate: [`decide`], and `put` /
/// `put_tried` on a `dyn BarrierEntry`, which turn a mark into the
/// `compare_and_set` over the mark the entry read.
pub trait BarrierEntry: Send {
    /// The branch's record as read on entry (and as this entry wrote it
    /// since, or [`reread`](BarrierEntry::reread) learned).
    fn record(&self) -> Option<BarrierRecord>;

    /// Stores `to` if the branch's stored mark is `from` (`None`: it has no
    /// record), atomically, and fails otherwise (nothing written: a record
    /// is never overwritten blindly). Durable on return. With `to.mark`
    /// [`Tried`](Mark::Tried), `tried` (resource and payload, which
    /// in-doubt resolution needs to finish the branch without the
    /// coordinator) is stored with it, or what was stored is kept when
    /// `None`; any other mark drops the resource and payload with the same
    /// write. On success [`record`](BarrierEntry::record) returns `to`.
    fn compare_and_set<'a>(
        &'a mut self,
        from: Option<Mark>,
        to: BarrierRecord,
        tried: Option<(&'a str, &'a [u8])>,
    ) -> BoxFuture<'a, Result<(), BarrierError>>;

    /// Learns the record the handler's own transaction in this store wrote
    /// during the call ([`SledBarrier::transaction`],
    /// [`PgBarrier::begin`](crate::postgres::PgBarrier::begin)), so that
    /// [`record`](BarrierEntry::record) shows it. Stores without such
    /// transactions have nothing to learn.
    fn reread(&mut self) -> BoxFuture<'_, Result<(), BarrierError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Returns once everything written to the store so far is durable,
    /// including a handler's own writes in the same store (see
    /// [`SledBarrier::transaction`]). Called before a yes vote is sent: a
    /// participant must never promise a reservation it could lose.
    fn sync(&mut self) -> BoxFuture<'_, Result<(), BarrierError>>;
}

/// A branch whose try started and which has heard nothing since: what
/// [`BarrierStore::in_doubt`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InDoubt {
    /// The branch.
    pub key: BranchKey,
    /// The resource it was tried on.
    pub resource: String,
    /// Its payload.
    pub payload: bytes::Bytes,
    /// When the try started (Unix ms).
    pub tried_ms: u64,
}

/// Encodes a tried branch's resource and payload: resource length (u16
/// big-endian), resource, payload.
#[cfg_attr(not(feature = "sled"), allow(dead_code))]
pub(crate) fn encode_tried(resource: &str, payload: &[u8]) -> Vec<u8> {
    let len = resource.len().min(u16::MAX as usize);
    let mut out = Vec::with_capacity(2 + len + payload.len());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&resource.as_bytes()[..len]);
    out.extend_from_slice(payload);
    out
}

/// The inverse of [`encode_tried`].
#[cfg_attr(not(feature = "sled"), allow(dead_code))]
pub(crate) fn decode_tried(bytes: &[u8]) -> Option<(String, bytes::Bytes)> {
    let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
    let resource = std::str::from_utf8(bytes.get(2..2 + len)?)
        .ok()?
        .to_string();
    Some((resource, bytes::Bytes::copy_from_slice(&bytes[2 + len..])))
}

/// One page of a retention sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgePage {
    /// Records looked at.
    pub scanned: usize,
    /// Records removed.
    pub removed: usize,
    /// Where the next page starts (exclusive); `None` at the end.
    pub next: Option<BranchKey>,
}

/// Where barrier records live.
///
/// # Contract
///
/// A store only persists, atomically; the rules (the table, the epoch,
/// what each call writes) are the gate's, the same for every store.
/// Every implementation passes [`conformance::run_all`], and
/// [`conformance::run_shared`] with two handles on one store as two
/// replicas of a participant would have them:
///
/// - [`enter`](BarrierStore::enter) gives the caller exclusive use of the
///   branch until the returned entry is dropped: a second `enter` for the
///   same key waits, through this handle or any other on the same records
///   (a store shared by several participant processes locks across them,
///   as `PgBarrier`'s advisory lock does). Entries for different keys do
///   not wait for each other.
/// - [`BarrierEntry::compare_and_set`] writes only over the mark it is
///   given, never blindly, and returns only once the record is durable:
///   after a crash and reopen, `enter` reads it back.
/// - [`in_doubt`](BarrierStore::in_doubt) returns exactly the branches
///   whose record is still `Tried` and older than the cut-off, with the
///   resource and payload stored with `Tried`, in key order after a
///   cursor, so a resolver can walk all of them page by page.
/// - Once a branch leaves `Tried`, nothing but its record remains of it,
///   and once [`purge`](BarrierStore::purge) removed that, nothing at all
///   ([`stored`](BarrierStore::stored) counts what is kept).
/// - [`purge`](BarrierStore::purge) removes only records that are
///   [finished](Mark::is_finished) and were stored before `before_ms`; it
///   visits at most `limit` records per call, in key order after `from`, so
///   a sweep is cheap and never holds up calls for long.
pub trait BarrierStore: Send + Sync + 'static {
    /// Waits for exclusive use of `key` and reads its record.
    fn enter(&self, key: BranchKey) -> BoxFuture<'_, Result<Box<dyn BarrierEntry>, BarrierError>>;

    /// Up to `limit` branches still `Tried` whose try started before
    /// `before_ms`, with the resource and payload stored with their
    /// `Tried` record, in key order, strictly after `after`
    /// when given.
    fn in_doubt(
        &self,
        before_ms: u64,
        after: Option<BranchKey>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<InDoubt>, BarrierError>>;

    /// How many entries the store keeps, of any kind (records, and the
    /// resource and payload of tried branches): what a purge must bring to
    /// zero once every branch is finished.
    fn stored(&self) -> BoxFuture<'_, Result<usize, BarrierError>>;

    /// Removes finished records stored before `before_ms` among the next
    /// `limit` records after `from`.
    fn purge(
        &self,
        from: Option<BranchKey>,
        before_ms: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<PurgePage, BarrierError>>;
}

/// Current wall-clock time in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
