//! Idempotent starts: a `Begin` or `Submit` with a client-chosen gtid finds
//! the transaction a first call started instead of starting a second.

use std::sync::Arc;
use std::time::Duration;

use super::{Entry, Inner};
use crate::engine::{Command, NewBranch, Txn};
use crate::error::CoordError;
use crate::model::{Gtid, Mode, TxnRecord};

/// A client-chosen gtid may be at most this far ahead of the coordinator's
/// clock (clock skew between the client and the coordinator).
const MAX_GTID_AHEAD: Duration = Duration::from_secs(60);
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
    Stored(TxnRecord),
}

pub(super) fn same_mode(rec: &TxnRecord, mode: Mode) -> Result<(), CoordError> {
    if rec.mode != mode {
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
    let same = rec.branches.len() == branches.len()
        && rec.branches.iter().zip(branches).all(|(r, b)| {
            r.endpoint == b.endpoint
                && r.resource == b.resource
                && r.payload == b.payload
                && r.mode == b.mode.unwrap_or(mode)
        });
    if !same {
        return Err(CoordError::AlreadyExists(format!(
            "transaction {} already exists with other branches",
            rec.gtid
        )));
    }
    Ok(())
}

impl Inner {
    /// Finds or starts the transaction `gtid`, atomically against the live
    /// table: a live one, a stored one (taken over first if it is waiting
    /// for recovery), or a new one made by `make`.
    pub(super) fn start(
        self: &Arc<Self>,
        gtid: Gtid,
        chosen: bool,
        make: impl FnOnce() -> (Txn, Vec<Command>),
    ) -> Result<Start, CoordError> {
        let mut live = self.live_table();
        // A gtid this coordinator just made is new; a client's may repeat.
        if chosen {
            if let Some(entry) = live.get(&gtid) {
                return Ok(Start::Live(entry.clone()));
            }
            if let Some(entry) = self.claim_locked(&mut live, gtid, None)? {
                return Ok(Start::Live(entry));
            }
            if let Some(rec) = self.log.get(&gtid)? {
                return Ok(Start::Stored(rec));
            }
            self.check_new_gtid(&gtid)?;
        }
        let (mut txn, cmds) = make();
        if chosen {
            txn = txn.with_forced_abort();
        }
        let entry = self.new_entry(txn);
        live.insert(gtid, entry.clone());
        Ok(Start::New(entry, cmds))
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
