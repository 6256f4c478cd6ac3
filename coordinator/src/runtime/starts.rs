//! Idempotent starts: a `Begin` or `Submit` with a client-chosen gtid finds
//! the transaction a first call started instead of starting a second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Entry, Inner};
use crate::engine::{Command, NewBranch, Txn};
use crate::error::CoordError;
use crate::log::Lookup;
use crate::model::{Gtid, Mode, TxnRecord};

/// A client-chosen gtid may be at most this far ahead of the coordinator's
/// clock (clock skew between the client and the coordinator).
pub(super) const MAX_GTID_AHEAD: Duration = Duration::from_secs(60);
/// ... and a new transaction's gtid at most this old (or the retention
/// period, if shorter), less [`MAX_GTID_AHEAD`]: a repeat older than that
/// cannot be told apart from one whose record retention already removed.
/// (A record is removed no sooner than `retention` after it was created,
/// and its gtid's time may be up to `MAX_GTID_AHEAD` past that creation.)
const MAX_GTID_AGE: Duration = Duration::from_secs(3600);

/// What a start request found for its gtid.
pub(super) enum Start {
    /// A new transaction, with the commands of its first step.
    New(Arc<Entry>, Vec<Command>),
    /// A live transaction with this gtid.
    Live(Arc<Entry>),
    /// A finished one, from the log.
    Stored(Box<TxnRecord>),
}

pub(super) fn same_mode(rec: &TxnRecord, mode: Mode) -> Result<(), CoordError> {
    if rec.mode != mode && !super::presumed::is_marker(rec) {
        return Err(CoordError::AlreadyExists(format!(
            "transaction {} already exists with another mode",
            rec.gtid
        )));
    }
    Ok(())
}

/// A repeated `Submit` must describe the same transaction.
pub(super) fn same_branches(
    rec: &TxnRecord,
    mode: Mode,
    branches: &[NewBranch],
) -> Result<(), CoordError> {
    same_mode(rec, mode)?;
    // Presumed aborted before its first write: whatever it was, it aborted.
    if super::presumed::is_marker(rec) {
        return Ok(());
    }
    // A saga's order as the record keeps it (a sequence filled in); a
    // record written before steps named their order is a sequence.
    let mut asked = branches.to_vec();
    let ordered = mode == Mode::Saga && rec.branches.iter().any(|b| !b.after.is_empty());
    if ordered {
        crate::engine::Txn::saga_order(&mut asked);
    }
    let same = rec.branches.len() == asked.len()
        && rec.branches.iter().zip(&asked).all(|(r, b)| {
            r.endpoint == b.endpoint
                && r.resource == b.resource
                && r.payload == b.payload
                && r.mode == b.mode.unwrap_or(mode)
                && (!ordered || r.after == b.after)
        });
    if !same {
        return Err(CoordError::AlreadyExists(format!(
            "transaction {} already exists with other branches",
            rec.gtid
        )));
    }
    Ok(())
}

/// Stripes of [`StartLocks`]: starts of different gtids rarely wait for
/// each other.
const STRIPES: usize = 64;

/// One async lock per stripe of gtids: two starts of the same client-chosen
/// gtid run one after the other, whatever the log's latency.
pub(super) struct StartLocks([tokio::sync::Mutex<()>; STRIPES]);

impl Default for StartLocks {
    fn default() -> Self {
        StartLocks(std::array::from_fn(|_| tokio::sync::Mutex::new(())))
    }
}

impl StartLocks {
    fn of(&self, gtid: &Gtid) -> &tokio::sync::Mutex<()> {
        let b = gtid.as_bytes();
        // The low bytes of a UUID v7 are random.
        &self.0[(b[15] as usize ^ (b[14] as usize) << 3) % STRIPES]
    }
}

impl Inner {
    /// Finds or starts the transaction `gtid`: a live one, a stored one
    /// (taken over first if it is waiting for recovery), or a new one made
    /// by `make`.
    ///
    /// A client-chosen gtid is checked against the log (a repeat finds the
    /// first call's transaction). That read is made under the gtid's start
    /// lock, not the live-table lock, so a slow store (a shared one is a
    /// network round trip away) holds up only starts of the same stripe;
    /// the live table is checked again, locked, before a new one goes in.
    /// Only a start can make a gtid live here, and starts of one gtid are
    /// serialised, so nothing can start and finish it in between.
    pub(super) async fn start(
        self: &Arc<Self>,
        gtid: Gtid,
        chosen: bool,
        make: impl FnOnce() -> (Txn, Vec<Command>),
    ) -> Result<Start, CoordError> {
        if !chosen {
            // A gtid this coordinator just made is new.
            return Ok(self.insert_new(self.live_table(), gtid, make()));
        }
        let _start = self.start_locks.of(&gtid).lock().await;
        {
            let mut live = self.live_table();
            if let Some(entry) = live.get(&gtid) {
                return Ok(Start::Live(entry.clone()));
            }
            if let Some(entry) = self.claim_locked(&mut live, gtid, None)? {
                return Ok(Start::Live(entry));
            }
        }
        let stored = self.log.lookup(&gtid)?;
        let live = self.live_table();
        if let Some(entry) = live.get(&gtid) {
            // Taken over by recovery or a request meanwhile.
            return Ok(Start::Live(entry.clone()));
        }
        match stored {
            Lookup::Record(rec) => return Ok(Start::Stored(rec)),
            // Never on the clock: a record with it may have been removed.
            Lookup::Purged => {
                return Err(CoordError::InvalidArgument(format!(
                    "gtid {gtid}: no transaction has it, but retention has removed transactions \
                     with gtids as old (one with it may have finished and been removed); use a \
                     new gtid"
                )));
            }
            Lookup::Unknown => {}
        }
        self.check_new_gtid(&gtid)?;
        let (mut txn, cmds) = make();
        if self.maybe_sent_before(&gtid) {
            txn = txn.with_phase_one_maybe_sent_before();
        }
        Ok(self.insert_new(live, gtid, (txn.with_forced_abort(), cmds)))
    }

    fn insert_new(
        &self,
        mut live: std::sync::MutexGuard<'_, HashMap<Gtid, Arc<Entry>>>,
        gtid: Gtid,
        (txn, cmds): (Txn, Vec<Command>),
    ) -> Start {
        let entry = self.new_entry(txn);
        live.insert(gtid, entry.clone());
        Start::New(entry, cmds)
    }

    /// Whether an earlier incarnation may have sent phase 1 for `gtid`, a
    /// client-chosen gtid with no record: on a local log a start is not
    /// forced (one sync per transaction, not two), so a crash can lose it
    /// after its phase-1 calls went out, and the client's repeat then
    /// sends them again. A gtid whose time is later than this
    /// incarnation's start plus the lead a client clock may have
    /// ([`MAX_GTID_AHEAD`]) was made after the crash: never sent before.
    /// On a shared store a one-shot start is written only with its
    /// decision, so any instance may have sent its phase 1 and stopped
    /// before writing it, at any time; a fresh local log, or one that
    /// loses no write, had no earlier incarnation that could lose it.
    fn maybe_sent_before(&self, gtid: &Gtid) -> bool {
        if self.log.shared() {
            return true;
        }
        self.log.may_have_lost_starts()
            && crate::log::gtid_ms(gtid)
                .is_none_or(|ms| ms < self.started_ms + MAX_GTID_AHEAD.as_millis() as u64)
    }

    /// A client-chosen gtid must be a UUID v7 of about now: the log keeps
    /// records in gtid order, which must be creation order.
    fn check_new_gtid(&self, gtid: &Gtid) -> Result<(), CoordError> {
        let bad = |why: String| Err(CoordError::InvalidArgument(format!("gtid {gtid}: {why}")));
        let Some(ts) = gtid.get_timestamp().filter(|_| gtid.get_version_num() == 7) else {
            return bad("a new transaction's gtid must be a UUID v7".into());
        };
        let (secs, nanos) = ts.to_unix();
        let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
        let now = self.now();
        // Config validation keeps retention at least 2 min, so this is at
        // least a minute.
        let max_age = MAX_GTID_AGE
            .min(self.config.retention)
            .saturating_sub(MAX_GTID_AHEAD)
            .as_millis() as u64;
        if ms > now + MAX_GTID_AHEAD.as_millis() as u64 {
            return bad("its time is ahead of the coordinator's clock".into());
        }
        if ms + max_age < now {
            return bad(format!(
                "it is older than {} s and no transaction has it (a transaction with it \
                 may have finished and been removed by retention); use a new gtid",
                max_age / 1000
            ));
        }
        Ok(())
    }
}
